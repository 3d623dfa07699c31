//! Figures of a `bench` run: CPU from `/proc`, the live progress line, and the
//! text and JSON summaries. Rates use payload bytes and MB = 10^6 bytes.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::{
    produce::ProducerReport, receive::SubStats, BenchArgs, Compression, Content, Plan, Shared,
    Target, Via,
};

/// `/proc/PID/stat` counts CPU time in USER_HZ ticks, which Linux fixes at 100
/// for every architecture it exports to user space.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system, all threads) a process has used so far.
pub(crate) fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in field 2 may hold spaces and parentheses: split after
    // its last ')'. What follows starts at field 3 (state); utime and stime
    // are fields 14 and 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuSample {
    at: Instant,
    own: Option<f64>,
    server: Option<f64>,
}

impl CpuSample {
    pub fn take(server_pids: &[u32]) -> Self {
        let server = server_pids
            .iter()
            .map(|pid| process_cpu_seconds(&pid.to_string()))
            .sum::<Option<f64>>();
        CpuSample {
            at: Instant::now(),
            own: process_cpu_seconds("self"),
            server: server.filter(|_| !server_pids.is_empty()),
        }
    }
}

/// Samples CPU time every 100 ms, so a run whose subscribers wait out the
/// drain timeout (NATS losses) is still measured up to its last delivery.
pub(crate) struct CpuSampler {
    server_pids: Arc<[u32]>,
    samples: Arc<Mutex<Vec<CpuSample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CpuSampler {
    pub fn start(server_pids: Vec<u32>) -> Self {
        let server_pids: Arc<[u32]> = server_pids.into();
        let pids = Arc::clone(&server_pids);
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&samples);
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(100));
            loop {
                ticker.tick().await;
                let sample = CpuSample::take(&pids);
                sink.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(sample);
            }
        });
        CpuSampler {
            server_pids,
            samples,
            task,
        }
    }

    /// The sample closing the window: the first at or after the last
    /// delivery, or one taken now.
    pub fn finish(self, last_delivery: Option<Instant>) -> CpuSample {
        self.task.abort();
        let now = CpuSample::take(&self.server_pids);
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        last_delivery
            .and_then(|last| samples.iter().find(|sample| sample.at >= last).copied())
            .unwrap_or(now)
    }
}

/// Prints the progress line on stderr once a second until aborted.
pub(crate) async fn progress(shared: Arc<Shared>, subscribers: Vec<Arc<Mutex<SubStats>>>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut last_sent = 0;
    let mut last_delivered = 0;
    loop {
        ticker.tick().await;
        let started = shared.started.get().copied().unwrap_or_else(Instant::now);
        let sent = shared.sent_now();
        let (mut min_delivered, mut missed) = (u64::MAX, 0);
        for stats in &subscribers {
            let stats = stats
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            min_delivered = min_delivered.min(stats.packets);
            missed += stats.missed;
        }
        let min_delivered = if subscribers.is_empty() {
            0
        } else {
            min_delivered
        };
        eprint!(
            "\r{:>5.0}s  sent {} ({}/s)  delivered per subscriber {} ({}/s)  missed {}   ",
            started.elapsed().as_secs_f64(),
            si(sent as f64),
            si(sent.saturating_sub(last_sent) as f64),
            si(min_delivered as f64),
            si(min_delivered.saturating_sub(last_delivered) as f64),
            missed
        );
        last_sent = sent;
        last_delivered = min_delivered;
    }
}

/// 1234567 -> "1.23M".
fn si(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

#[derive(Clone, Copy, Debug)]
struct Percentiles {
    count: u64,
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Option<Self> {
        (!histogram.is_empty()).then(|| Percentiles {
            count: histogram.len(),
            p50: histogram.value_at_quantile(0.5),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        })
    }

    fn to_json(self) -> Value {
        let us = |nanos: u64| nanos as f64 / 1e3;
        json!({
            "count": self.count,
            "p50": us(self.p50),
            "p99": us(self.p99),
            "p999": us(self.p999),
            "max": us(self.max),
        })
    }

    fn to_text(self) -> String {
        let us = |nanos: u64| nanos as f64 / 1e3;
        format!(
            "p50 {:.0} us, p99 {:.0} us, p999 {:.0} us, max {:.0} us ({} packets)",
            us(self.p50),
            us(self.p99),
            us(self.p999),
            us(self.max),
            self.count
        )
    }
}

#[derive(Debug)]
struct SubReport {
    packets: u64,
    payload_bytes: u64,
    elapsed: f64,
    responses: u64,
    missed: u64,
    lost: u64,
    order_errors: u64,
    payload_errors: u64,
    foreign: u64,
    slow_consumer_events: u64,
    wire_bytes: Option<u64>,
    error: Option<String>,
}

impl SubReport {
    fn complete(&self) -> bool {
        self.error.is_none()
            && self.missed == 0
            && self.lost == 0
            && self.order_errors == 0
            && self.payload_errors == 0
    }

    fn rate(&self) -> f64 {
        per_second(self.packets as f64, self.elapsed)
    }

    fn mb_rate(&self) -> f64 {
        per_second(self.payload_bytes as f64 / 1e6, self.elapsed)
    }
}

fn per_second(amount: f64, seconds: f64) -> f64 {
    match seconds > 0.0 {
        true => amount / seconds,
        false => 0.0,
    }
}

/// Everything a run measured.
#[derive(Debug)]
pub(crate) struct BenchReport {
    target: Target,
    via: Via,
    producers: usize,
    size: usize,
    content: Content,
    compression: Compression,
    rate: Option<f64>,
    count: Option<u64>,
    duration: Option<Duration>,
    sent: u64,
    send_elapsed: f64,
    publish_accepted: Option<u64>,
    publish_rejected: u64,
    /// Per producer: packets sent and seconds taken.
    producer_figures: Vec<(u64, f64)>,
    subscribers: Vec<SubReport>,
    latency: Option<Percentiles>,
    server_latency: Option<Percentiles>,
    wall: f64,
    own_cpu: Option<f64>,
    server_cpu: Option<f64>,
}

impl BenchReport {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        plan: &Plan,
        args: &BenchArgs,
        shared: &Shared,
        started: Instant,
        producers: &[ProducerReport],
        outcomes: Vec<(Arc<Mutex<SubStats>>, Option<String>)>,
        before: CpuSample,
        after: CpuSample,
    ) -> Self {
        let sent_per_producer: Vec<u64> = shared
            .sent
            .iter()
            .map(|sent| sent.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        let mut latency: Option<Histogram<u64>> = None;
        let mut server_latency: Option<Histogram<u64>> = None;
        let mut subscribers = Vec::new();
        for (stats, error) in outcomes {
            let stats = stats
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            merge(&mut latency, stats.latency.as_ref());
            merge(&mut server_latency, stats.server_latency.as_ref());
            subscribers.push(SubReport {
                packets: stats.packets,
                payload_bytes: stats.payload_bytes,
                elapsed: stats
                    .last_at
                    .map_or(0.0, |last| last.duration_since(started).as_secs_f64()),
                responses: stats.responses,
                missed: stats.missed,
                lost: stats.lost(&sent_per_producer),
                order_errors: stats.order_errors,
                payload_errors: stats.payload_errors,
                foreign: stats.foreign,
                slow_consumer_events: stats.slow_consumer_events,
                wire_bytes: stats
                    .wire_bytes
                    .as_ref()
                    .map(|bytes| bytes.load(std::sync::atomic::Ordering::Relaxed)),
                error,
            });
        }
        let accepted: Option<u64> = producers
            .iter()
            .map(|producer| producer.accepted)
            .sum::<Option<u64>>();
        BenchReport {
            target: plan.target,
            via: plan.via,
            producers: plan.producers,
            size: plan.size,
            content: plan.content,
            compression: args.compression,
            rate: args.rate,
            count: plan.count,
            duration: plan.duration,
            sent: sent_per_producer.iter().sum(),
            send_elapsed: producers
                .iter()
                .map(|producer| producer.elapsed.as_secs_f64())
                .fold(0.0, f64::max),
            publish_accepted: accepted.filter(|_| plan.via == Via::Publish),
            publish_rejected: producers.iter().map(|producer| producer.rejected).sum(),
            producer_figures: producers
                .iter()
                .map(|producer| (producer.sent, producer.elapsed.as_secs_f64()))
                .collect(),
            subscribers,
            latency: latency.as_ref().and_then(Percentiles::of),
            server_latency: server_latency.as_ref().and_then(Percentiles::of),
            wall: after.at.duration_since(before.at).as_secs_f64(),
            own_cpu: after.own.zip(before.own).map(|(a, b)| a - b),
            server_cpu: after.server.zip(before.server).map(|(a, b)| a - b),
        }
    }

    /// True when every subscriber got every packet, in order, and the server
    /// accepted everything that was sent.
    pub fn ok(&self) -> bool {
        self.subscribers.iter().all(SubReport::complete)
            && self.publish_rejected == 0
            && self
                .publish_accepted
                .is_none_or(|accepted| accepted == self.sent)
    }

    fn delivered(&self) -> u64 {
        self.subscribers.iter().map(|sub| sub.packets).sum()
    }

    fn delivered_elapsed(&self) -> f64 {
        self.subscribers
            .iter()
            .map(|sub| sub.elapsed)
            .fold(0.0, f64::max)
    }

    fn aggregate_rate(&self) -> f64 {
        per_second(self.delivered() as f64, self.delivered_elapsed())
    }

    fn aggregate_mb_rate(&self) -> f64 {
        let bytes: u64 = self.subscribers.iter().map(|sub| sub.payload_bytes).sum();
        per_second(bytes as f64 / 1e6, self.delivered_elapsed())
    }

    /// Bytes all subscribers read off their sockets, when they were counted.
    fn wire_bytes(&self) -> Option<u64> {
        self.subscribers.iter().map(|sub| sub.wire_bytes).sum()
    }

    fn total(&self, field: impl Fn(&SubReport) -> u64) -> u64 {
        self.subscribers.iter().map(field).sum()
    }

    fn per_packet_us(cpu: Option<f64>, packets: u64) -> Option<f64> {
        cpu.filter(|_| packets > 0)
            .map(|cpu| cpu * 1e6 / packets as f64)
    }

    pub fn to_json(&self) -> Value {
        let subscribers: Vec<Value> = self
            .subscribers
            .iter()
            .map(|sub| {
                json!({
                    "packets": sub.packets,
                    "payload_bytes": sub.payload_bytes,
                    "elapsed_s": sub.elapsed,
                    "pkts_per_s": sub.rate(),
                    "mb_per_s": sub.mb_rate(),
                    "responses": sub.responses,
                    "missed": sub.missed,
                    "lost": sub.lost,
                    "order_errors": sub.order_errors,
                    "payload_errors": sub.payload_errors,
                    "foreign": sub.foreign,
                    "slow_consumer_events": sub.slow_consumer_events,
                    "wire_bytes": sub.wire_bytes,
                    "complete": sub.complete(),
                    "error": sub.error,
                })
            })
            .collect();
        let producers: Vec<Value> = self
            .producer_figures
            .iter()
            .map(|(sent, elapsed)| {
                json!({
                    "packets": sent,
                    "elapsed_s": elapsed,
                    "pkts_per_s": per_second(*sent as f64, *elapsed),
                })
            })
            .collect();
        let core = |cpu: Option<f64>| cpu.map(|cpu| per_second(cpu, self.wall));
        json!({
            "target": match self.target { Target::PacketIngest => "packet-ingest", Target::Nats => "nats", Target::Jetstream => "jetstream" },
            "via": match self.via { Via::Tcp => "tcp", Via::Publish => "publish" },
            "producers": self.producers,
            "subscribers": self.subscribers.len(),
            "size": self.size,
            "payload": format!("{:?}", self.content).to_lowercase(),
            "compression": format!("{:?}", self.compression).to_lowercase(),
            "rate": self.rate,
            "count_per_producer": self.count,
            "duration_s": self.duration.map(|duration| duration.as_secs_f64()),
            "sent": {
                "packets": self.sent,
                "elapsed_s": self.send_elapsed,
                "pkts_per_s": per_second(self.sent as f64, self.send_elapsed),
                "mb_per_s": per_second(self.sent as f64 * self.size as f64 / 1e6, self.send_elapsed),
                "publish_accepted": self.publish_accepted,
                "publish_rejected": self.publish_rejected,
            },
            "delivered": {
                "packets": self.delivered(),
                "elapsed_s": self.delivered_elapsed(),
                "pkts_per_s": self.aggregate_rate(),
                "mb_per_s": self.aggregate_mb_rate(),
                "min_subscriber_pkts_per_s": self.subscribers.iter().map(SubReport::rate).fold(f64::INFINITY, f64::min),
            },
            "missed": self.total(|sub| sub.missed),
            "lost": self.total(|sub| sub.lost),
            "order_errors": self.total(|sub| sub.order_errors),
            "payload_errors": self.total(|sub| sub.payload_errors),
            "foreign": self.total(|sub| sub.foreign),
            "wire": self.wire_bytes().map(|bytes| json!({
                "subscriber_bytes": bytes,
                "bytes_per_delivered_packet": (self.delivered() > 0).then(|| bytes as f64 / self.delivered() as f64),
            })),
            "complete": self.ok(),
            "latency_us": self.latency.map(Percentiles::to_json),
            "server_latency_us": self.server_latency.map(Percentiles::to_json),
            "cpu": {
                "wall_s": self.wall,
                "bench_s": self.own_cpu,
                "bench_cores": core(self.own_cpu),
                "bench_us_per_delivered_packet": Self::per_packet_us(self.own_cpu, self.delivered()),
                "server_s": self.server_cpu,
                "server_cores": core(self.server_cpu),
                "server_us_per_sent_packet": Self::per_packet_us(self.server_cpu, self.sent),
                "server_us_per_delivered_packet": Self::per_packet_us(self.server_cpu, self.delivered()),
            },
            "producer": producers,
            "subscriber": subscribers,
        })
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let target = match (self.target, self.via) {
            (Target::Nats, _) => "nats",
            (Target::Jetstream, _) => "NATS JetStream (file store, acked publishes)",
            (Target::PacketIngest, Via::Tcp) => "packet-ingest via TCP",
            (Target::PacketIngest, Via::Publish) => "packet-ingest via Publish",
        };
        let pace = match self.rate {
            Some(rate) => format!("paced at {} pkts/s", si(rate)),
            None => "unpaced".to_owned(),
        };
        let _ = writeln!(
            out,
            "bench {target}: {} producer(s), {} subscriber(s), {} B payloads, {pace}",
            self.producers,
            self.subscribers.len(),
            self.size
        );
        let _ = writeln!(
            out,
            "sent        {} packets in {:.3} s: {} pkts/s, {:.1} MB/s",
            self.sent,
            self.send_elapsed,
            si(per_second(self.sent as f64, self.send_elapsed)),
            per_second(self.sent as f64 * self.size as f64 / 1e6, self.send_elapsed)
        );
        for (index, sub) in self.subscribers.iter().enumerate() {
            let _ = write!(
                out,
                "subscriber {index} {} packets in {:.3} s: {} pkts/s, {:.1} MB/s; missed {}, lost {}, order errors {}",
                sub.packets,
                sub.elapsed,
                si(sub.rate()),
                sub.mb_rate(),
                sub.missed,
                sub.lost,
                sub.order_errors
            );
            if sub.payload_errors > 0 || sub.foreign > 0 {
                let _ = write!(
                    out,
                    ", payload errors {}, foreign {}",
                    sub.payload_errors, sub.foreign
                );
            }
            if let Some(error) = &sub.error {
                let _ = write!(out, " ({error})");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(
            out,
            "delivered   {} packets: aggregate {} pkts/s, {:.1} MB/s",
            self.delivered(),
            si(self.aggregate_rate()),
            self.aggregate_mb_rate()
        );
        if let Some(bytes) = self.wire_bytes().filter(|_| self.delivered() > 0) {
            let _ = writeln!(
                out,
                "wire        {bytes} bytes read by subscribers: {:.1} B per delivered packet of {} B ({} payload, compression {})",
                bytes as f64 / self.delivered() as f64,
                self.size,
                format!("{:?}", self.content).to_lowercase(),
                format!("{:?}", self.compression).to_lowercase(),
            );
        }
        if let Some(latency) = self.latency {
            let _ = writeln!(out, "latency     send -> delivery {}", latency.to_text());
        }
        if let Some(latency) = self.server_latency {
            let _ = writeln!(
                out,
                "            server read -> delivery {}",
                latency.to_text()
            );
        }
        let mut cpu = String::new();
        if let Some(own) = self.own_cpu {
            let _ = write!(
                cpu,
                "bench {own:.2} s ({:.2} cores",
                per_second(own, self.wall)
            );
            if let Some(us) = Self::per_packet_us(Some(own), self.delivered()) {
                let _ = write!(cpu, ", {us:.2} us per delivered packet");
            }
            cpu.push(')');
        }
        if let Some(server) = self.server_cpu {
            let _ = write!(
                cpu,
                "; server {server:.2} s ({:.2} cores",
                per_second(server, self.wall)
            );
            if let Some(us) = Self::per_packet_us(Some(server), self.sent) {
                let _ = write!(cpu, ", {us:.2} us per sent packet");
            }
            cpu.push(')');
        }
        if !cpu.is_empty() {
            let _ = writeln!(out, "cpu         {cpu}");
        }
        let _ = writeln!(
            out,
            "result      {}",
            match self.ok() {
                true => "complete and in order",
                false => "INCOMPLETE or out of order (see above)",
            }
        );
        out
    }
}

fn merge(into: &mut Option<Histogram<u64>>, from: Option<&Histogram<u64>>) {
    let Some(from) = from else { return };
    match into {
        None => *into = Some(from.clone()),
        Some(into) => {
            // Same bounds on both sides, so adding cannot fail.
            let _ = into.add(from);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_readable() {
        let cpu = process_cpu_seconds("self").expect("/proc/self/stat");
        assert!(cpu >= 0.0);
        assert!(process_cpu_seconds("0").is_none());
    }

    #[test]
    fn si_suffixes() {
        assert_eq!(si(999.0), "999");
        assert_eq!(si(1500.0), "1.5k");
        assert_eq!(si(2_500_000.0), "2.50M");
    }
}
