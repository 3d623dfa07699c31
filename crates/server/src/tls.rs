//! TLS for both ports: loads `--tls-cert` / `--tls-key` (and `--tls-client-ca`
//! for mutual TLS) once at start, checks they belong together, and hands out
//! a rustls acceptor for each port (the gRPC one offers HTTP/2 by ALPN). Any
//! problem is an error that names the flag and the file.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, server::WebPkiClientVerifier, RootCertStore, ServerConfig};

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {problem}")]
    File {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("{0}")]
    Incomplete(&'static str),
}

/// The TLS flags, as given.
#[derive(Clone, Copy, Debug)]
pub struct TlsPaths<'a> {
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub client_ca: Option<&'a Path>,
}

/// What both listeners need to speak TLS.
#[derive(Clone)]
pub struct TlsSetup {
    pub ingest: tokio_rustls::TlsAcceptor,
    /// The same certificate and client policy, offering HTTP/2 by ALPN.
    pub grpc: tokio_rustls::TlsAcceptor,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::File {
        flag,
        path: path.to_owned(),
        problem: source.to_string(),
    })
}

fn invalid(flag: &'static str, path: &Path, problem: impl ToString) -> TlsError {
    TlsError::File {
        flag,
        path: path.to_owned(),
        problem: problem.to_string(),
    }
}

fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(flag, path, error))?;
    if certs.is_empty() {
        return Err(invalid(flag, path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// Loads and checks the TLS files, if TLS is configured.
pub fn load(paths: TlsPaths<'_>) -> Result<Option<TlsSetup>, TlsError> {
    let (cert_path, key_path) = match (paths.cert, paths.key) {
        (None, None) => {
            return match paths.client_ca {
                Some(_) => Err(TlsError::Incomplete(
                    "--tls-client-ca needs --tls-cert and --tls-key",
                )),
                None => Ok(None),
            }
        }
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err(TlsError::Incomplete("--tls-cert and --tls-key go together")),
    };
    let cert_pem = read("--tls-cert", cert_path)?;
    let key_pem = read("--tls-key", key_path)?;
    let chain = certificates("--tls-cert", cert_path, &cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|error| invalid("--tls-key", key_path, error))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| invalid("--tls-cert", cert_path, error))?;
    let builder = match paths.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let ca_pem = read("--tls-client-ca", ca_path)?;
            let mut roots = RootCertStore::empty();
            for cert in certificates("--tls-client-ca", ca_path, &ca_pem)? {
                roots
                    .add(cert)
                    .map_err(|error| invalid("--tls-client-ca", ca_path, error))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| invalid("--tls-client-ca", ca_path, error))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    // rustls checks that the key matches the certificate's public key here.
    let config = builder.with_single_cert(chain, key).map_err(|error| {
        invalid(
            "--tls-key",
            key_path,
            format!("does not fit --tls-cert {}: {error}", cert_path.display()),
        )
    })?;
    let mut grpc = config.clone();
    // HTTP/1.1 for gRPC-Web clients that do not offer h2.
    grpc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsSetup {
        ingest: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        grpc: tokio_rustls::TlsAcceptor::from(Arc::new(grpc)),
    }))
}
