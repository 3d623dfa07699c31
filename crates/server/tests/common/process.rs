//! The real binary as a child process: started on loopback ports, addresses
//! read from its JSON "listening" log line.

use std::{net::SocketAddr, process::Stdio};

use packet_ingest::pb::{packets_client::PacketsClient, SubscribeRequest, SubscribeResponse};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::Streaming;

use super::{LOOPBACK_ADDRS, PATIENCE};

pub struct Process {
    pub child: Child,
    pub grpc: SocketAddr,
    pub ingest: SocketAddr,
}

impl Process {
    pub async fn spawn(extra: &[&str]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_packet-ingest"))
            .args(LOOPBACK_ADDRS)
            .args(["--log-format", "json"])
            .args(extra)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn packet-ingest");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let (grpc, ingest) = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("read log") {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let fields = &entry["fields"];
                if fields["message"] == "packet-ingest listening" {
                    let addr = |key: &str| {
                        fields[key]
                            .as_str()
                            .expect("addr")
                            .parse()
                            .expect("socket addr")
                    };
                    return (addr("grpc_addr"), addr("ingest_addr"));
                }
            }
            panic!("the server exited before listening");
        })
        .await
        .expect("server starts");
        // Keep draining the log so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Process {
            child,
            grpc,
            ingest,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub async fn subscribe(&self) -> Streaming<SubscribeResponse> {
        PacketsClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect")
            .max_decoding_message_size(64 << 20)
            .subscribe(SubscribeRequest::default())
            .await
            .expect("subscribe")
            .into_inner()
    }

    /// Peak resident set size in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        let line = status
            .lines()
            .find(|line| line.starts_with("VmHWM:"))
            .expect("VmHWM");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .expect("value")
            .parse()
            .expect("number");
        kib * 1024
    }
}
