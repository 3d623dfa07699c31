//! Client helpers shared by the `send`, `tail` and `health` tools, the bench
//! and the examples: reaching a server (TLS, bearer token), building frames
//! and Publish requests as a producer, printing packets.

use std::path::PathBuf;

use bytes::Bytes;
use clap::Args;

use crate::{
    digest::{hmac_digest, sha256_digest},
    frame::{signed_header, Channel, Digest, Frame, FLAG_HMAC},
    pb::Packet,
};

/// Response header naming the stream (SPEC §7).
pub const STREAM_ID_HEADER: &str = "packet-ingest-stream-id";

pub type ToolError = Box<dyn std::error::Error + Send + Sync>;

/// How a tool reaches a server that may use TLS.
#[derive(Clone, Debug, Default, Args)]
pub struct TlsClientArgs {
    /// PEM CA that signed the server's certificate; turns TLS on.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Name to verify in the server's certificate (default: the host of --addr).
    #[arg(long)]
    pub server_name: Option<String>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// Opens a gRPC channel to `addr` (`host:port` or a URL), with TLS if asked.
pub async fn grpc_channel(
    addr: &str,
    tls: &TlsClientArgs,
) -> Result<tonic::transport::Channel, ToolError> {
    Ok(grpc_endpoint(addr, tls)?.connect().await?)
}

/// The endpoint [`grpc_channel`] connects to, for callers that bring their
/// own connector (the bench counts the bytes its subscribers read).
pub fn grpc_endpoint(
    addr: &str,
    tls: &TlsClientArgs,
) -> Result<tonic::transport::Endpoint, ToolError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let url = match (addr.contains("://"), tls.ca_cert.is_some()) {
        (true, true) => addr.replacen("http://", "https://", 1),
        (true, false) => addr.to_owned(),
        (false, true) => format!("https://{addr}"),
        (false, false) => format!("http://{addr}"),
    };
    let mut endpoint =
        Endpoint::from_shared(url)?.connect_timeout(std::time::Duration::from_secs(5));
    if let Some(ca) = &tls.ca_cert {
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        if let Some(name) = &tls.server_name {
            config = config.domain_name(name.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
            config = config.identity(Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ));
        }
        endpoint = endpoint.tls_config(config)?;
    }
    Ok(endpoint)
}

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone, Debug)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, ToolError> {
        let value = match token {
            Some(token) => Some(format!("Bearer {token}").parse()?),
            None => None,
        };
        Ok(BearerToken(value))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Builds the frame for `payload`, HMAC-signed when a key is given.
pub fn make_frame(channel: Channel, payload: Bytes, hmac_key: Option<&[u8]>) -> Frame {
    make_frame_with(channel, payload, hmac_key, 0)
}

/// `make_frame` with further flag bits (e.g. `frame::FLAG_ACK`), which the
/// digest covers like the rest of the header.
pub fn make_frame_with(
    channel: Channel,
    payload: Bytes,
    hmac_key: Option<&[u8]>,
    flags: u8,
) -> Frame {
    let flags = flags | if hmac_key.is_some() { FLAG_HMAC } else { 0 };
    let header = signed_header(channel, flags, payload.len() as u32);
    let digest = match hmac_key {
        Some(key) => hmac_digest(key, &header, &payload),
        None => sha256_digest(&header, &payload),
    };
    Frame {
        signed_header: header,
        digest: Digest(digest),
        payload,
    }
}

/// The Publish request carrying exactly what `frame` carries on the TCP port.
pub fn publish_request(frame: &Frame) -> crate::pb::PublishRequest {
    crate::pb::PublishRequest {
        channel: frame.channel().0,
        payload: frame.payload.clone(),
        digest: Bytes::copy_from_slice(&frame.digest.0),
        hmac: frame.is_hmac(),
    }
}

/// A rustls client for the ingest port, trusting `--ca-cert`.
pub fn tls_connector(tls: &TlsClientArgs) -> Result<tokio_rustls::TlsConnector, ToolError> {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &tls.ca_cert {
        for cert in CertificateDer::pem_file_iter(ca)? {
            roots.add(cert?)?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key)?)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// A packet as one JSON object; the payload as text when it is UTF-8, else hex.
pub fn packet_json(packet: &Packet) -> serde_json::Value {
    let mut value = serde_json::json!({
        "sequence": packet.sequence,
        "channel": packet.channel,
        "source": packet.source,
        "source_sequence": packet.source_sequence,
        "received_unix_nanos": packet.received_unix_nanos,
        "digest": hex::encode(&packet.digest),
    });
    match std::str::from_utf8(&packet.payload) {
        Ok(text) => value["payload"] = text.into(),
        Err(_) => value["payload_hex"] = hex::encode(&packet.payload).into(),
    }
    value
}
