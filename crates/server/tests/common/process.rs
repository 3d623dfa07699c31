//! The real binary as a child process: started on loopback ports, addresses
//! read from its JSON "listening" log line.

use std::{net::SocketAddr, process::Stdio, sync::OnceLock, time::Duration};

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
    pub metrics: SocketAddr,
    /// The fields of the "packet-ingest listening" log line (stream_id, open_files, ...).
    pub listening: serde_json::Value,
}

/// How to start the binary, beyond its flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct Launch<'a> {
    /// A command to run the binary under, which must exec it so that the pid
    /// is the server's: e.g. `["prlimit", "--nofile=256:256"]`.
    pub wrapper: &'a [&'a str],
    /// Listen-address flags instead of ephemeral loopback ports, e.g. a
    /// previous process's [`Process::listen_args`] to restart on its ports.
    pub listen: Option<&'a [String]>,
}

impl Process {
    pub async fn spawn(extra: &[&str]) -> Process {
        Process::launch(Launch::default(), extra).await
    }

    /// Starts the binary as `launch` says, with `extra` flags.
    pub async fn launch(launch: Launch<'_>, extra: &[&str]) -> Process {
        let binary = env!("CARGO_BIN_EXE_packet-ingest");
        let mut command = match launch.wrapper.split_first() {
            None => Command::new(binary),
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
        };
        match launch.listen {
            Some(listen) => command.args(listen),
            None => command.args(LOOPBACK_ADDRS),
        };
        let mut child = command
            .args(["--log-format", "json"])
            .args(extra)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn packet-ingest");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let listening = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("read log") {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if entry["fields"]["message"] == "packet-ingest listening" {
                    return entry["fields"].clone();
                }
            }
            panic!("the server exited before listening");
        })
        .await
        .expect("server starts");
        let addr = |key: &str| -> SocketAddr {
            listening[key]
                .as_str()
                .expect("addr")
                .parse()
                .expect("socket addr")
        };
        let (grpc, ingest, metrics) =
            (addr("grpc_addr"), addr("ingest_addr"), addr("metrics_addr"));
        // Keep draining the log so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Process {
            child,
            grpc,
            ingest,
            metrics,
            listening,
        }
    }

    /// The flags that make another process listen where this one does.
    pub fn listen_args(&self) -> Vec<String> {
        vec![
            "--grpc-addr".into(),
            self.grpc.to_string(),
            "--ingest-addr".into(),
            self.ingest.to_string(),
            "--metrics-addr".into(),
            self.metrics.to_string(),
        ]
    }

    /// A metric value from this process's /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        super::metric_in(&super::scrape_at(self.metrics).await, name)
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("proc stat");
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').expect("comm") + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second())
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

/// `getconf CLK_TCK`: the unit of the CPU times in /proc/PID/stat.
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let output = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("run getconf");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("CLK_TCK is a number")
    })
}
