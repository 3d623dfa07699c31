//! The live console on the admin port, over real sockets: the page, the
//! `/api/status` figures next to what `StreamInfo` answers, the SSE tail
//! (replay, live packets, a browser that does not read, the subscriber and
//! tail limits, shutdown), and the page itself in headless Chromium.
//!
//! The browser test drives Debian's headless `chromium` through
//! `chromedriver` (WebDriver, with `fantoccini`); without them it is skipped
//! with a printed reason, unless `PACKET_INGEST_REQUIRE_CHROMIUM=1` (set by
//! CI), where a missing browser fails.

mod common;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use bytes::Bytes;
use common::*;
use packet_ingest::{
    console::{Status, TailPacket, MAX_TAILS, PREVIEW_BYTES},
    frame::{sha256_frame, Channel, Frame},
    pb::StreamInfoRequest,
    server::RunningServer,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream},
};

/// One plain HTTP/1.0 request (the response is delimited by close).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect admin port");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("write request");
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .expect("response in time")
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a full response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    (code, head.to_owned(), body.to_owned())
}

async fn status(server: &RunningServer) -> Status {
    let (code, _, body) = http_get(server.metrics_addr, "/api/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

fn text_frames(channel: u32, label: &str, count: usize) -> Vec<Frame> {
    (0..count)
        .map(|index| {
            sha256_frame(
                Channel(channel),
                Bytes::from(format!("{label}-{index}").into_bytes()),
            )
        })
        .collect()
}

/// An event of the tail.
#[derive(Debug)]
enum TailEvent {
    Packet(TailPacket),
    Missed(u64),
    End(String),
}

/// A console tail read over a raw socket.
struct Tail {
    lines: BufReader<TcpStream>,
}

impl Tail {
    /// Opens `/api/tail?channel=N`; `Err` holds the status code and body of a refusal.
    async fn open(addr: SocketAddr, channel: u32) -> Result<Tail, (u16, String)> {
        Tail::open_on(TcpStream::connect(addr).await.expect("connect"), channel).await
    }

    async fn open_on(mut stream: TcpStream, channel: u32) -> Result<Tail, (u16, String)> {
        stream
            .write_all(
                format!("GET /api/tail?channel={channel} HTTP/1.0\r\nHost: test\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write request");
        let mut lines = BufReader::new(stream);
        let mut head = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            loop {
                let mut line = String::new();
                lines.read_line(&mut line).await.expect("read head");
                if line.trim_end().is_empty() {
                    break;
                }
                head.push(line.trim_end().to_owned());
            }
        })
        .await
        .expect("response head in time");
        let code: u16 = head[0]
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status code");
        if code != 200 {
            let mut body = String::new();
            let _ = lines.read_to_string(&mut body).await;
            return Err((code, body));
        }
        assert!(
            head.iter()
                .any(|line| line.eq_ignore_ascii_case("content-type: text/event-stream")),
            "{head:?}"
        );
        Ok(Tail { lines })
    }

    /// The next event; `None` at the end of the response.
    async fn next(&mut self) -> Option<TailEvent> {
        let (mut kind, mut data) = (String::new(), String::new());
        tokio::time::timeout(PATIENCE, async {
            loop {
                let mut line = String::new();
                if self.lines.read_line(&mut line).await.expect("read event") == 0 {
                    return None;
                }
                let line = line.trim_end_matches(['\r', '\n']);
                if let Some(value) = line.strip_prefix("event: ") {
                    kind = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                } else if line.is_empty() && !kind.is_empty() {
                    let value: serde_json::Value = serde_json::from_str(&data).expect("JSON");
                    return Some(match kind.as_str() {
                        "packet" => {
                            TailEvent::Packet(serde_json::from_value(value).expect("packet"))
                        }
                        "missed" => TailEvent::Missed(value["missed"].as_u64().expect("missed")),
                        "end" => TailEvent::End(value["reason"].as_str().unwrap_or("").to_owned()),
                        other => panic!("unexpected event {other:?}"),
                    });
                }
                // Comments (keep-alive) and blank lines between them are skipped.
            }
        })
        .await
        .expect("an event in time")
    }

    async fn packets(&mut self, count: usize) -> Vec<TailPacket> {
        let mut packets = Vec::new();
        while packets.len() < count {
            match self.next().await {
                Some(TailEvent::Packet(packet)) => packets.push(packet),
                other => panic!("expected a packet, got {other:?}"),
            }
        }
        packets
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_what_stream_info_does_with_rates_lag_and_rejects() {
    let server = start(&[]).await;
    let before = status(&server).await;
    assert_eq!(before.totals.accepted_packets, 0);
    let mut stream = subscribe(&server, vec![3], None).await;
    let mut sent = frames(3, 100, 64, 0);
    sent[10].digest.0[0] ^= 1;
    send_bytes(&server, &wire(&sent)).await;
    let (packets, _) = collect(&mut stream, 99).await;

    // The first look after them: its rates span back to a look before
    // them, however long ago, so they account for all of them.
    let first = status(&server).await;
    let rates = &first.rates;
    assert!(rates.window_seconds > 0.0, "{rates:?}");
    assert!(
        (rates.accepted_packets_per_second * rates.window_seconds - 99.0).abs() < 0.01,
        "{rates:?}"
    );
    assert!(
        (rates.accepted_bytes_per_second * rates.window_seconds
            - first.totals.accepted_bytes as f64)
            .abs()
            < 1.0,
        "{rates:?}"
    );
    assert!(rates.delivered_packets_per_second > 0.0);

    // The subscriber has read everything: it is listed with no lag.
    let next = packets.last().expect("packets").sequence + 1;
    eventually("the subscriber caught up", || async {
        status(&server)
            .await
            .subscribers
            .list
            .first()
            .map(|s| s.lag)
            == Some(0)
    })
    .await;
    let now = status(&server).await;
    let info = client(&server)
        .await
        .stream_info(StreamInfoRequest {})
        .await
        .expect("StreamInfo")
        .into_inner();
    assert_eq!(now.stream.stream_id, info.stream_id);
    assert_eq!(now.stream.stream_id, &*server.stream_id);
    assert_eq!(
        (
            now.stream.first_sequence,
            now.stream.next_sequence,
            now.stream.retained_packets,
            now.stream.retained_bytes,
            now.stream.durable,
        ),
        (
            info.first_sequence,
            info.next_sequence,
            info.retained_packets,
            info.retained_bytes,
            info.durable
        )
    );
    assert_eq!(
        (now.memory.first_sequence, now.memory.next_sequence),
        (1, next)
    );
    assert_eq!(now.memory.retained_packets, 99);
    assert!(now.disk.is_none());
    assert_eq!(now.totals.accepted_packets, 99);
    assert_eq!(now.totals.delivered_packets, 99);
    assert_eq!(now.subscribers.count, 1);
    let subscriber = &now.subscribers.list[0];
    assert!(
        subscriber.who.starts_with("grpc/127.0.0.1:"),
        "{subscriber:?}"
    );
    assert_eq!(subscriber.channels, vec![3]);
    assert_eq!(subscriber.cursor, next);
    assert_eq!(now.rejects["verify"]["digest_mismatch"], 1);
    assert_eq!(now.rejects["verify"]["hmac_required"], 0);

    // A refused RPC shows up under its reason.
    let refused = client(&server)
        .await
        .subscribe(packet_ingest::pb::SubscribeRequest {
            stream_id: "another-stream".into(),
            ..Default::default()
        })
        .await;
    assert!(refused.is_err());
    // Counted before the refusal is sent.
    let refused = &status(&server).await.rejects["refused"];
    assert_eq!(refused.get("stream_mismatch"), Some(&1), "{refused:?}");

    // The page itself, as served.
    let (code, head, body) = http_get(server.metrics_addr, "/").await;
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{head}"
    );
    assert!(body.contains("/api/status") && body.contains("/api/tail"));
    assert!(
        !body.contains("src=\"http"),
        "the page loads nothing from elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_disk_range_with_a_data_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().to_str().expect("utf-8 path");
    let server = start(&["--data-dir", data_dir]).await;
    send_bytes(&server, &wire(&frames(1, 50, 100, 0))).await;
    eventually("the log holds all 50", || async {
        status(&server)
            .await
            .disk
            .is_some_and(|disk| disk.end_sequence == 51)
    })
    .await;
    let status = status(&server).await;
    let disk = status.disk.expect("a disk range");
    assert_eq!(disk.first_sequence, 1);
    assert!(disk.retained_bytes > 50 * 100);
    assert!(status.stream.durable);
    assert_eq!(status.stream.first_sequence, 1);
    assert_eq!(status.stream.retained_bytes, disk.retained_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_replays_its_channels_recent_packets_then_streams_live_ones() {
    let server = start(&[]).await;
    let mut mixed = text_frames(7, "before", 5);
    mixed.extend(text_frames(8, "other", 5));
    mixed.push(sha256_frame(
        Channel(7),
        Bytes::from_static(b"<img src=x onerror=alert(1)>\x00\x01"),
    ));
    send_bytes(&server, &wire(&mixed)).await;
    eventually("all accepted", || async {
        status(&server).await.totals.accepted_packets == 11
    })
    .await;

    let mut tail = Tail::open(server.metrics_addr, 7)
        .await
        .expect("tail opens");
    let replayed = tail.packets(6).await;
    let texts: Vec<&str> = replayed.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "before-0",
            "before-1",
            "before-2",
            "before-3",
            "before-4",
            "<img src=x onerror=alert(1)>.."
        ]
    );
    assert!(replayed.iter().all(|p| p.channel == 7));
    assert_eq!(
        replayed.iter().map(|p| p.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 11]
    );
    assert_eq!(replayed[0].hex, hex_of(b"before-0"));
    assert!(replayed[0].source.starts_with("tcp/127.0.0.1:"));

    // The tail is a subscriber like any other.
    let listed = status(&server).await.subscribers;
    assert_eq!(listed.count, 1);
    assert!(listed.list[0].who.starts_with("console/127.0.0.1:"));
    assert_eq!(listed.list[0].channels, vec![7]);

    let mut live = text_frames(7, "live", 3);
    live.push(sha256_frame(Channel(7), Bytes::from(vec![b'z'; 1000])));
    send_bytes(&server, &wire(&live)).await;
    let live = tail.packets(4).await;
    assert_eq!(
        live.iter()
            .map(|p| p.text.as_str())
            .take(3)
            .collect::<Vec<_>>(),
        ["live-0", "live-1", "live-2"]
    );
    // Only a preview of a large payload travels.
    assert_eq!(live[3].size, 1000);
    assert_eq!(live[3].text.len(), PREVIEW_BYTES);
    assert_eq!(live[3].hex.len(), 2 * PREVIEW_BYTES);

    // The browser leaves: its subscription goes with it.
    drop(tail);
    eventually("the tail's subscription is gone", || async {
        status(&server).await.subscribers.count == 0
    })
    .await;
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_that_does_not_read_costs_dropped_packets_not_memory_or_producers() {
    // Block mode: a subscriber that held the hub back would stall the producer.
    let server = start(&["--slow-subscriber", "block", "--block-timeout", "60s"]).await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let stream = socket.connect(server.metrics_addr).await.expect("connect");
    let mut tail = Tail::open_on(stream, 7).await.expect("tail opens");
    const SENT: u64 = 40_000;
    send_bytes(&server, &wire(&frames(7, SENT as usize, 200, 0))).await;
    // Nothing read yet, and still every packet is accepted and the tail's
    // subscription is at the head: it is not what the hub waits for.
    eventually("everything accepted and read off the hub", || async {
        let status = status(&server).await;
        status.totals.accepted_packets == SENT
            && status.subscribers.list.first().map(|s| s.lag) == Some(0)
    })
    .await;

    // Now read: what was shown plus what was reported missed is everything.
    let (mut shown, mut missed, mut last) = (0u64, 0u64, 0u64);
    let mut missed_events = 0;
    while shown + missed < SENT {
        match tail.next().await.expect("the tail stays open") {
            TailEvent::Packet(packet) => {
                assert!(packet.sequence > last, "in order");
                last = packet.sequence;
                shown += 1;
            }
            TailEvent::Missed(count) => {
                missed += count;
                missed_events += 1;
            }
            TailEvent::End(reason) => panic!("tail ended: {reason}"),
        }
    }
    assert_eq!(shown + missed, SENT);
    assert!(
        missed > 0 && missed_events > 0,
        "shown {shown}, missed {missed}"
    );
    // The queue is all it held: what reached this socket is a bounded
    // amount, far less than the 40,000 packets' events.
    assert!(shown < SENT / 2, "shown {shown} of {SENT}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tails_count_against_max_subscribers_and_their_own_cap() {
    let server = start(&["--max-subscribers", "1"]).await;
    let tail = Tail::open(server.metrics_addr, 1)
        .await
        .expect("tail opens");
    let (code, body) = Tail::open(server.metrics_addr, 2)
        .await
        .err()
        .expect("a second subscriber is refused");
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("--max-subscribers"), "{body}");
    let mut grpc = client(&server).await;
    let refused = grpc
        .subscribe(packet_ingest::pb::SubscribeRequest::default())
        .await
        .expect_err("the tail holds the only subscriber slot");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    drop(tail);
    eventually("the slot is free again", || async {
        status(&server).await.subscribers.count == 0
    })
    .await;
    grpc.subscribe(packet_ingest::pb::SubscribeRequest::default())
        .await
        .expect("a gRPC subscriber gets the slot back");

    let server = start(&[]).await;
    let mut tails = Vec::new();
    for channel in 0..MAX_TAILS as u32 {
        tails.push(
            Tail::open(server.metrics_addr, channel)
                .await
                .expect("tail"),
        );
    }
    let (code, body) = Tail::open(server.metrics_addr, 99)
        .await
        .err()
        .expect("one tail too many");
    assert_eq!(code, 429);
    assert!(body.contains("console tails"), "{body}");
    // Probes and scrapes still get through while tails are open.
    assert_eq!(http_get(server.metrics_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(server.metrics_addr, "/metrics").await.0, 200);

    let (code, _, _) = http_get(server.metrics_addr, "/api/tail?channel=seven").await;
    assert_eq!(code, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_tail() {
    let server = start(&[]).await;
    let mut tail = Tail::open(server.metrics_addr, 1)
        .await
        .expect("tail opens");
    send_bytes(&server, &wire(&text_frames(1, "x", 1))).await;
    tail.packets(1).await;
    server.shutdown();
    match tail.next().await {
        Some(TailEvent::End(reason)) => assert!(reason.contains("shutting down"), "{reason}"),
        other => panic!("expected the end, got {other:?}"),
    }
    assert!(tail.next().await.is_none(), "the response ends");
    tokio::time::timeout(PATIENCE, server.wait())
        .await
        .expect("the server stops with a tail open");
}

/// Debian's `chromium` and `chromedriver`, or why the browser test cannot run.
fn browser_available() -> bool {
    let runs = |name: &str| {
        std::process::Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    let available = runs("chromium") && runs("chromedriver");
    if !available {
        assert!(
            std::env::var("PACKET_INGEST_REQUIRE_CHROMIUM").is_err(),
            "PACKET_INGEST_REQUIRE_CHROMIUM is set but chromium or chromedriver is missing"
        );
        eprintln!(
            "skipping: chromium and chromedriver are not installed \
             (apt-get install chromium chromium-driver)"
        );
    }
    available
}

/// A chromedriver on a free port, ended when dropped.
struct Driver {
    _process: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let mut process = tokio::process::Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let stdout = process.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("read chromedriver") {
                // "ChromeDriver was started successfully on port 34987."
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').parse::<u16>().expect("port");
                }
            }
            panic!("chromedriver exited before listening");
        })
        .await
        .expect("chromedriver starts");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Driver {
            _process: process,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A headless Chromium session in a fresh profile.
    async fn browser(&self, profile: &std::path::Path) -> fantoccini::Client {
        let mut args: Vec<String> = common::HEADLESS_CHROMIUM.map(String::from).to_vec();
        args.extend([
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1200,900".to_owned(),
            format!("--user-data-dir={}", profile.display()),
        ]);
        let options = serde_json::json!({ "args": args });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

/// The text of the element that `xpath` finds once it exists.
async fn wait_for_text(browser: &fantoccini::Client, xpath: &str) -> String {
    browser
        .wait()
        .at_most(PATIENCE)
        .every(Duration::from_millis(50))
        .for_element(fantoccini::Locator::XPath(xpath))
        .await
        .unwrap_or_else(|error| panic!("{xpath} never appeared: {error}"))
        .text()
        .await
        .expect("element text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_shows_live_packets_and_figures() {
    if !browser_available() {
        return;
    }
    let server = start(&[]).await;
    // Sent before the page loads: the tail replays them from the ring.
    let mut before = text_frames(7, "console-before", 3);
    before.push(sha256_frame(
        Channel(7),
        Bytes::from_static(b"<b id=injected>bold</b>"),
    ));
    before.extend(text_frames(8, "console-other-channel", 2));
    let mut bad = text_frames(7, "tampered", 1);
    bad[0].digest.0[0] ^= 1;
    before.extend(bad);
    send_bytes(&server, &wire(&before)).await;
    eventually("all accepted", || async {
        status(&server).await.totals.accepted_packets == 6
    })
    .await;

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let browser = driver.browser(profile.path()).await;
    let url = format!("http://{}/?channel=7", server.metrics_addr);
    browser.goto(&url).await.expect("open the console");

    wait_for_text(&browser, "//td[contains(., 'console-before-2')]").await;
    // Live: sent after the page's tail subscribed.
    send_bytes(&server, &wire(&text_frames(7, "console-live", 3))).await;
    wait_for_text(&browser, "//td[contains(., 'console-live-2')]").await;
    let stream_id = wait_for_text(
        &browser,
        &format!("//code[@id='stream-id' and . = '{}']", server.stream_id),
    )
    .await;
    assert_eq!(stream_id, &*server.stream_id);
    // The figures: the page's own subscription with its channel and no lag,
    // the rejected frame under its reason, the accepted total.
    wait_for_text(
        &browser,
        "//tbody[@id='subscribers']/tr[td[starts-with(., 'console/127.0.0.1:')] and td[2] = '7' and td[4] = '0']",
    )
    .await;
    wait_for_text(
        &browser,
        "//table[@id='rejects']/tr[td[2] = 'digest_mismatch' and td[3] = '1']",
    )
    .await;
    wait_for_text(&browser, "//td[@id='total-accepted' and . = '9']").await;

    let source = browser.source().await.expect("page source");
    assert!(!source.contains("console-other-channel"), "only channel 7");
    // The payload is text, not markup.
    assert!(
        source.contains("&lt;b id=injected&gt;bold&lt;/b&gt;"),
        "{source}"
    );
    let injected = browser
        .find_all(fantoccini::Locator::Css("#injected"))
        .await
        .expect("query");
    assert!(injected.is_empty(), "a payload became an element");

    // `PACKET_INGEST_CONSOLE_SCREENSHOT=docs/console.png` keeps a picture
    // of the page while packets flow (the README's).
    if let Ok(path) = std::env::var("PACKET_INGEST_CONSOLE_SCREENSHOT") {
        let _watcher = subscribe(&server, vec![], None).await;
        let ingest = server.ingest_addr;
        let flow = tokio::spawn(async move {
            let mut producer = TcpStream::connect(ingest).await.expect("connect");
            for round in 0..200 {
                let mut batch = text_frames(
                    7,
                    &format!("reading round={round} temp=21.{}", round % 10),
                    1,
                );
                batch.extend(frames(8, 40, 512, round));
                producer.write_all(&wire(&batch)).await.expect("send");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        });
        wait_for_text(&browser, "//td[contains(., 'reading round=60 ')]").await;
        let png = browser.screenshot().await.expect("screenshot");
        std::fs::write(&path, png).expect("write the screenshot");
        flow.abort();
    }
    browser.close().await.expect("close the session");
}
