//! TLS on both ports, bearer tokens with file rotation, HMAC-keyed packets.
//! Certificates are generated at test time with rcgen.

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::*;
use packet_ingest::{
    frame::{sha256_frame, Channel},
    pb::{packets_client::PacketsClient, PublishRequest, SubscribeRequest},
};
use packet_ingest_protocol::{
    client::{
        grpc_channel, make_frame, publish_request, tls_connector, BearerToken, TlsClientArgs,
    },
    digest::hmac_digest,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let path =
            std::env::temp_dir().join(format!("packet-ingest-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("temp dir");
        Dir(path)
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write file");
        path.to_str().expect("utf-8 path").to_owned()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki(dir: &Dir) -> Pki {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(vec!["client".into()]);
    Pki {
        ca: dir.write("ca.pem", ca_cert.pem()),
        server_cert: dir.write("server.pem", server_cert),
        server_key: dir.write("server.key", server_key),
        client_cert: dir.write("client.pem", client_cert),
        client_key: dir.write("client.key", client_key),
    }
}

fn tls_args(pki: &Pki, with_client_cert: bool) -> TlsClientArgs {
    TlsClientArgs {
        ca_cert: Some(PathBuf::from(&pki.ca)),
        server_name: Some("localhost".into()),
        client_cert: with_client_cert.then(|| PathBuf::from(&pki.client_cert)),
        client_key: with_client_cert.then(|| PathBuf::from(&pki.client_key)),
    }
}

async fn tls_subscribe(
    server: &packet_ingest::server::RunningServer,
    tls: &TlsClientArgs,
) -> Result<tonic::Streaming<packet_ingest::pb::SubscribeResponse>, String> {
    let channel = grpc_channel(&server.grpc_addr.to_string(), tls)
        .await
        .map_err(|error| error.to_string())?;
    PacketsClient::new(channel)
        .subscribe(SubscribeRequest::default())
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| status.to_string())
}

async fn tls_send(
    server: &packet_ingest::server::RunningServer,
    tls: &TlsClientArgs,
    bytes: &[u8],
) -> std::io::Result<()> {
    let stream = tokio::net::TcpStream::connect(server.ingest_addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = tls_connector(tls)
        .expect("connector")
        .connect(name, stream)
        .await?;
    stream.write_all(bytes).await?;
    stream.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_with_the_right_ca_succeeds_on_both_ports() {
    let dir = Dir::new("tls-ok");
    let pki = pki(&dir);
    let server = start(&["--tls-cert", &pki.server_cert, "--tls-key", &pki.server_key]).await;
    let tls = tls_args(&pki, false);
    let mut stream = tls_subscribe(&server, &tls).await.expect("TLS subscribe");
    tls_send(&server, &tls, &wire(&frames(2, 10, 100, 0)))
        .await
        .expect("TLS ingest");
    let (packets, _) = collect(&mut stream, 10).await;
    assert_ordered(&packets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_against_tls_ports_fail() {
    let dir = Dir::new("tls-plain");
    let pki = pki(&dir);
    let server = start(&["--tls-cert", &pki.server_cert, "--tls-key", &pki.server_key]).await;
    let plain = TlsClientArgs::default();
    assert!(
        tls_subscribe(&server, &plain).await.is_err(),
        "plaintext gRPC must fail"
    );
    let mut stream = tls_subscribe(&server, &tls_args(&pki, false))
        .await
        .expect("TLS subscribe");
    // Plain frames on the TLS ingest port are refused: the connection closes
    // and nothing is published. A TLS packet sent afterwards is the first one.
    let mut plain_tcp = tokio::net::TcpStream::connect(server.ingest_addr)
        .await
        .expect("connect");
    plain_tcp
        .write_all(&wire(&frames(1, 3, 10, 0)))
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, plain_tcp.read_to_end(&mut sink))
        .await
        .expect("closed");
    tls_send(&server, &tls_args(&pki, false), &wire(&frames(7, 1, 10, 1)))
        .await
        .expect("TLS ingest");
    let (packets, _) = collect(&mut stream, 1).await;
    assert_eq!((packets[0].channel, packets[0].sequence), (7, 1));
    let handshakes = "packet_ingest_protocol_errors_packets_total{reason=\"tls_handshake\"}";
    assert!(metric(&server, handshakes).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_on_both_ports() {
    let dir = Dir::new("mtls");
    let pki = pki(&dir);
    let server = start(&[
        "--tls-cert",
        &pki.server_cert,
        "--tls-key",
        &pki.server_key,
        "--tls-client-ca",
        &pki.ca,
    ])
    .await;
    assert!(tls_subscribe(&server, &tls_args(&pki, false))
        .await
        .is_err());
    let with_cert = tls_args(&pki, true);
    let mut stream = tls_subscribe(&server, &with_cert)
        .await
        .expect("mTLS subscribe");
    // Without a client certificate the ingest handshake fails (the error may
    // surface on write or on close, so only delivery is asserted).
    let _ = tls_send(&server, &tls_args(&pki, false), &wire(&frames(1, 1, 10, 0))).await;
    tls_send(&server, &with_cert, &wire(&frames(5, 1, 10, 1)))
        .await
        .expect("mTLS ingest");
    let (packets, _) = collect(&mut stream, 1).await;
    assert_eq!((packets[0].channel, packets[0].sequence), (5, 1));
}

fn run_binary(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_packet-ingest"))
        .args(LOOPBACK_ADDRS)
        .args(args)
        .output()
        .expect("run binary")
}

#[test]
fn unreadable_or_mismatched_tls_files_exit_64_naming_the_file() {
    let dir = Dir::new("tls-bad");
    let pki = pki(&dir);
    let other_key = dir.write(
        "other.key",
        KeyPair::generate().expect("key").serialize_pem(),
    );
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                &pki.server_key,
            ],
            "/nonexistent/cert.pem",
        ),
        (
            &["--tls-cert", &pki.server_cert, "--tls-key", &other_key],
            &other_key,
        ),
        (
            &["--tls-cert", &pki.server_key, "--tls-key", &pki.server_key],
            &pki.server_key,
        ),
    ];
    for (args, named) in cases {
        let output = run_binary(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(named), "{stderr} should name {named}");
    }
}

async fn authed_subscribe(
    server: &packet_ingest::server::RunningServer,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let channel = grpc_channel(&server.grpc_addr.to_string(), &TlsClientArgs::default())
        .await
        .expect("connect");
    PacketsClient::with_interceptor(channel, BearerToken::new(token).expect("token"))
        .subscribe(SubscribeRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_missing_wrong_right_and_rotation() {
    let dir = Dir::new("tokens");
    let file = dir.write("tokens", "# team A\nfirst-token\n\n");
    let server = start(&["--auth-token-file", &file]).await;

    let missing = authed_subscribe(&server, None).await.expect_err("missing");
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(missing.message().contains("authorization: Bearer"));
    let wrong = authed_subscribe(&server, Some("nope"))
        .await
        .expect_err("wrong");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    authed_subscribe(&server, Some("first-token"))
        .await
        .expect("right token");
    // Health needs no token: probes carry none.
    let health = packet_ingest::tools::health(packet_ingest::tools::HealthArgs {
        addr: server.grpc_addr.to_string(),
        service: String::new(),
        tls: TlsClientArgs::default(),
    })
    .await
    .expect("health without token");
    assert!(health);

    // Rotate: the new token starts working and the old one stops, no restart.
    let rotated = dir.0.join("tokens.new");
    std::fs::write(&rotated, "second-token\n").expect("write");
    std::fs::rename(&rotated, Path::new(&file)).expect("swap");
    eventually("rotated token accepted", || async {
        authed_subscribe(&server, Some("second-token"))
            .await
            .is_ok()
    })
    .await;
    let old = authed_subscribe(&server, Some("first-token"))
        .await
        .expect_err("old token");
    assert_eq!(old.code(), Code::Unauthenticated);
}

fn authed_client(
    channel: tonic::transport::Channel,
    token: &str,
) -> PacketsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
> {
    PacketsClient::with_interceptor(channel, BearerToken::new(Some(token)).expect("token"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_permissions_limit_channels_and_calls() {
    let dir = Dir::new("permissions");
    let file = dir.write(
        "tokens",
        "reader subscribe=1,2 stream-info\nwriter publish=7\nadmin\n",
    );
    let server = start(&["--auth-token-file", &file]).await;
    let channel = grpc_channel(&server.grpc_addr.to_string(), &TlsClientArgs::default())
        .await
        .expect("connect");
    let mut reader = authed_client(channel.clone(), "reader");
    let mut writer = authed_client(channel.clone(), "writer");
    let mut admin = authed_client(channel, "admin");

    // The reader: its channels only; no filter means its channels.
    let outside = reader
        .subscribe(SubscribeRequest {
            channels: vec![1, 3],
            ..Default::default()
        })
        .await
        .expect_err("channel 3 is not the reader's");
    assert_eq!(outside.code(), Code::PermissionDenied);
    assert!(
        outside.message().contains("channel 3"),
        "{}",
        outside.message()
    );
    let mut mine = reader
        .subscribe(SubscribeRequest::default())
        .await
        .expect("no filter: the reader's channels")
        .into_inner();
    reader
        .stream_info(packet_ingest::pb::StreamInfoRequest {})
        .await
        .expect("the reader may call StreamInfo");
    let denied = reader
        .publish(futures::stream::iter([publish_request(&make_frame(
            Channel(1),
            Bytes::from_static(b"x"),
            None,
        ))]))
        .await
        .expect_err("the reader may not publish");
    assert_eq!(denied.code(), Code::PermissionDenied);

    // The writer: channel 7 only; the packets before a refused one stay.
    let frames = [7u32, 7, 8].map(|channel| {
        publish_request(&make_frame(
            Channel(channel),
            Bytes::from_static(b"w"),
            None,
        ))
    });
    let refused = writer
        .publish(futures::stream::iter(frames))
        .await
        .expect_err("channel 8 is not the writer's");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let no_info = writer
        .stream_info(packet_ingest::pb::StreamInfoRequest {})
        .await
        .expect_err("the writer may not call StreamInfo");
    assert_eq!(no_info.code(), Code::PermissionDenied);
    let info = admin
        .stream_info(packet_ingest::pb::StreamInfoRequest {})
        .await
        .expect("a bare token may do everything")
        .into_inner();
    assert_eq!(
        info.next_sequence, 3,
        "the writer's two packets on channel 7 went in"
    );

    // What the reader's unfiltered stream gets: channels 1 and 2 only.
    let sent = admin
        .publish(futures::stream::iter([1u32, 5, 2].map(|channel| {
            publish_request(&make_frame(
                Channel(channel),
                Bytes::from_static(b"a"),
                None,
            ))
        })))
        .await
        .expect("admin publishes anywhere")
        .into_inner();
    assert_eq!(sent.accepted, 3);
    let (packets, _) = collect(&mut mine, 2).await;
    assert_eq!(
        packets
            .iter()
            .map(|packet| packet.channel)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
}

fn hmac_frame_bytes(key: &[u8], channel: u32, payload: &'static [u8]) -> bytes::BytesMut {
    wire(&[make_frame(
        Channel(channel),
        Bytes::from_static(payload),
        Some(key),
    )])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_right_key_wrong_key_and_unflagged_with_require_hmac() {
    let dir = Dir::new("hmac");
    let key_file = dir.write("key", "the-key\n");
    let server = start(&["--hmac-key-file", &key_file, "--require-hmac"]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    let mut bytes = hmac_frame_bytes(b"the-key", 1, b"signed");
    bytes.extend_from_slice(&hmac_frame_bytes(b"wrong-key", 2, b"forged"));
    bytes.extend_from_slice(&wire(&[sha256_frame(
        Channel(3),
        Bytes::from_static(b"plain"),
    )]));
    bytes.extend_from_slice(&hmac_frame_bytes(b"the-key", 4, b"signed too"));
    send_bytes(&server, &bytes).await;
    let (packets, _) = collect(&mut stream, 2).await;
    assert_eq!(
        packets.iter().map(|p| p.channel).collect::<Vec<_>>(),
        vec![1, 4]
    );
    assert_eq!(
        packets
            .iter()
            .map(|p| p.source_sequence)
            .collect::<Vec<_>>(),
        vec![0, 3]
    );
    let mismatch = "packet_ingest_rejected_packets_total{reason=\"digest_mismatch\"}";
    let required = "packet_ingest_rejected_packets_total{reason=\"hmac_required\"}";
    assert_eq!(metric(&server, mismatch).await, 1.0);
    assert_eq!(metric(&server, required).await, 1.0);

    // Publish follows the same rules.
    let header = packet_ingest::frame::signed_header(Channel(9), 1, 3);
    let signed = PublishRequest {
        channel: 9,
        payload: Bytes::from_static(b"pub"),
        digest: Bytes::copy_from_slice(&hmac_digest(b"the-key", &header, b"pub")),
        hmac: true,
    };
    let forged = PublishRequest {
        digest: Bytes::copy_from_slice(&hmac_digest(b"bad", &header, b"pub")),
        ..signed.clone()
    };
    let response = client(&server)
        .await
        .publish(futures::stream::iter(vec![signed, forged]))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!((response.accepted, response.rejected), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_hmac_flag_but_no_key_is_failed_precondition() {
    let server = start(&[]).await;
    let request = PublishRequest {
        channel: 1,
        payload: Bytes::from_static(b"x"),
        digest: Bytes::from_static(&[0; 32]),
        hmac: true,
    };
    let status = client(&server)
        .await
        .publish(futures::stream::iter(vec![request]))
        .await
        .expect_err("no key");
    assert_eq!(status.code(), Code::FailedPrecondition);
}
