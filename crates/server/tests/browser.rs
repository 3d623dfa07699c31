//! gRPC-Web from a real browser: headless Chromium loads a page from an
//! origin `--cors-origin` allows (a tiny server in this test), and the page
//! publishes, reads StreamInfo and subscribes with `fetch`, so preflights,
//! exposed headers and streaming bodies are the browser's own. The page
//! POSTs what it saw back to its server, which is what the test waits on.
//!
//! Needs Debian's `chromium` (or `PACKET_INGEST_CHROMIUM=/path`); skipped
//! with a message when it is missing, unless `PACKET_INGEST_REQUIRE_CHROMIUM`
//! is set (as `.ci/run` does).

mod common;

use std::{path::PathBuf, process::Stdio, time::Duration};

use common::{start, PATIENCE};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::Command,
    sync::mpsc,
};

const PAGE: &str = include_str!("browser_page.html");

/// The browser to drive, if there is one.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PACKET_INGEST_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Serves the page on GET and hands each POSTed body to `results`.
async fn serve_page(listener: TcpListener, results: mpsc::Sender<String>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let results = results.clone();
        tokio::spawn(async move {
            let _ = answer(stream, results).await;
        });
    }
}

async fn answer(mut stream: TcpStream, results: mpsc::Sender<String>) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut chunk = [0u8; 4096];
    // Headers, then as much body as content-length says.
    let (head_end, content_length) = loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 || request.len() > 1 << 20 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..read]);
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length);
        }
    };
    while request.len() < head_end + content_length {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..read]);
    }
    let (status, content_type, body) =
        if request.starts_with(b"GET / ") || request.starts_with(b"GET /?") {
            (
                "200 OK",
                "text/html; charset=utf-8",
                PAGE.as_bytes().to_vec(),
            )
        } else if request.starts_with(b"POST /result ") {
            let body = String::from_utf8_lossy(&request[head_end..head_end + content_length]);
            let _ = results.send(body.into_owned()).await;
            ("200 OK", "text/plain", b"ok".to_vec())
        } else {
            ("404 Not Found", "text/plain", b"not found".to_vec())
        };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

#[tokio::test]
async fn a_browser_publishes_and_subscribes_with_grpc_web() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("PACKET_INGEST_REQUIRE_CHROMIUM").is_none(),
            "PACKET_INGEST_REQUIRE_CHROMIUM is set but chromium is not installed"
        );
        eprintln!("skipped: chromium not found (apt-get install chromium)");
        return;
    };
    let page_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind page");
    let page_addr = page_listener.local_addr().expect("page address");
    let origin = format!("http://{page_addr}");
    let server = start(&["--cors-origin", &origin]).await;
    let closed = start(&[]).await; // lists no origin
    let (results_tx, mut results) = mpsc::channel(1);
    tokio::spawn(serve_page(page_listener, results_tx));

    let profile = tempfile::tempdir().expect("profile dir");
    let url = format!(
        "{origin}/?grpc={}&closed={}",
        server.grpc_addr.port(),
        closed.grpc_addr.port()
    );
    // No `--dump-dom`: with it Chromium exits once its virtual-time budget
    // is spent, which on a loaded 2-core machine came before the page's
    // calls had finished. Without it the page stays open until it reports.
    let mut browser = Command::new(&chromium)
        .args(common::HEADLESS_CHROMIUM)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");

    let result = tokio::select! {
        result = results.recv() => result.expect("page server runs"),
        status = browser.wait() => {
            let mut output = String::new();
            if let Some(mut stdout) = browser.stdout.take() {
                let _ = stdout.read_to_string(&mut output).await;
            }
            panic!("chromium exited ({status:?}) before the page reported: {output}");
        }
        _ = tokio::time::sleep(PATIENCE) => panic!("the page did not report within {PATIENCE:?}"),
    };
    let _ = browser.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), browser.wait()).await;

    let result: serde_json::Value = serde_json::from_str(&result).expect("JSON from the page");
    assert!(result.get("error").is_none(), "the page failed: {result}");
    assert_eq!(result["published"]["1"], 3, "accepted: {result}");
    assert_eq!(result["published"]["3"], 3, "last sequence: {result}");
    assert!(result["publishTrailers"]
        .as_str()
        .unwrap_or_default()
        .contains("grpc-status:0"));
    assert_eq!(result["nextSequence"], 4);
    let stream_id = result["streamId"].as_str().unwrap_or_default();
    assert!(stream_id.starts_with("mem-"), "{result}");
    assert_eq!(result["streamIdHeader"], stream_id, "exposed through CORS");
    let packets = result["packets"].as_array().expect("packets");
    let seen: Vec<(u64, String)> = packets
        .iter()
        .map(|packet| {
            (
                packet["sequence"].as_u64().unwrap_or_default(),
                packet["payload"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        (1..=3)
            .map(|n| (n, format!("hello from the browser {n}")))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        result["closedServer"], "blocked",
        "CORS must block other origins"
    );
}
