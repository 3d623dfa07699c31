//! Counters, gauges and histograms for every row of SPEC §2 and §6, in one
//! Prometheus registry. Hot paths hold pre-resolved handles (atomics), so a
//! metric costs no lookup or allocation per packet.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
        info::Info,
    },
    registry::Registry,
};

use packet_ingest_protocol::digest::Rejection;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// How old a batch is (since its bytes were read from the producer) when it
/// reaches each stage of the live path: where a packet's latency goes.
/// Each is observed once per batch (`taken`: once per subscriber delivery).
#[derive(Clone, Debug)]
pub struct BatchAge {
    /// A verify thread starts on it (queueing and the wake-up to the pool).
    pub verify_start: Histogram,
    /// Verified and encoded.
    pub verified: Histogram,
    /// Its producer task has it back (the wake-up back from the pool).
    pub publishing: Histogram,
    /// Its publish returned: numbered and in the ring (without a log,
    /// visible to subscribers; in cluster mode: handed to the sequencer).
    pub sequenced: Histogram,
    /// A live subscriber's stream took it from the ring (the wake-up of the
    /// stream); what follows is HTTP/2 and the network.
    pub taken: Histogram,
}

impl BatchAge {
    fn register(registry: &mut Registry) -> BatchAge {
        let family =
            Family::<StageLabel, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                // 10 µs to about 5 s.
                Histogram::new(exponential_buckets(1e-5, 2.0, 20))
            });
        registry.register(
            "batch_age_seconds",
            "Age of a batch since its bytes were read, as it reaches each stage of the live path",
            family.clone(),
        );
        let stage = |stage| family.get_or_create(&StageLabel { stage }).clone();
        BatchAge {
            verify_start: stage("verify_start"),
            verified: stage("verified"),
            publishing: stage("publishing"),
            sequenced: stage("sequenced"),
            taken: stage("taken"),
        }
    }
}

/// Seconds since `received_unix_nanos` (the wall clock the batch was stamped
/// with when read); 0 if the clock stepped back.
pub fn age_seconds(received_unix_nanos: i64) -> f64 {
    (crate::verify::unix_nanos_now() - received_unix_nanos).max(0) as f64 / 1e9
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The reasons a family has counted so far: `Family` cannot be iterated,
/// and the console lists them. Reasons are few, fixed strings.
#[derive(Clone, Debug, Default)]
struct SeenReasons(Arc<Mutex<BTreeSet<&'static str>>>);

impl SeenReasons {
    fn note(&self, reason: &'static str) {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(reason);
    }

    fn snapshot(&self, count: impl Fn(&ReasonLabel) -> u64) -> BTreeMap<&'static str, u64> {
        let reasons = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        reasons
            .into_iter()
            .map(|reason| (reason, count(&ReasonLabel { reason })))
            .collect()
    }
}

/// Per-reason counters of one kind of refusal.
#[derive(Clone, Debug, Default)]
pub struct ReasonCounters {
    packets: Family<ReasonLabel, Counter>,
    bytes: Family<ReasonLabel, Counter>,
    seen: SeenReasons,
}

impl ReasonCounters {
    pub fn add(&self, reason: &'static str, packets: u64, bytes: u64) {
        let label = ReasonLabel { reason };
        self.seen.note(reason);
        self.packets.get_or_create(&label).inc_by(packets);
        if bytes > 0 {
            self.bytes.get_or_create(&label).inc_by(bytes);
        }
    }

    /// Packets counted so far, by reason.
    pub fn packets_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.seen
            .snapshot(|label| self.packets.get(label).map_or(0, |counter| counter.get()))
    }
}

/// A counter per reason, for events that carry no packets.
#[derive(Clone, Debug, Default)]
pub struct ReasonCount {
    family: Family<ReasonLabel, Counter>,
    seen: SeenReasons,
}

impl ReasonCount {
    pub fn inc(&self, reason: &'static str) {
        self.seen.note(reason);
        self.family.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn get(&self, reason: &'static str) -> u64 {
        self.family.get_or_create(&ReasonLabel { reason }).get()
    }

    /// Counts so far, by reason.
    pub fn by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.seen
            .snapshot(|label| self.family.get(label).map_or(0, |counter| counter.get()))
    }
}

/// Every metric the service exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub packets_received: Counter,
    pub bytes_received: Counter,
    pub packets_accepted: Counter,
    pub bytes_accepted: Counter,
    /// Frames verified and dropped (digest mismatch, HMAC required).
    pub rejected: ReasonCounters,
    /// Connections or streams closed for bad framing, and truncated frames.
    pub protocol_errors: ReasonCounters,
    pub ingest_connections: Gauge,
    pub ingest_connections_total: Counter,
    pub subscribers: Gauge,
    pub packets_delivered: Counter,
    pub packets_missed: Counter,
    pub subscribers_disconnected: ReasonCounters,
    pub hub_retained_bytes: Gauge,
    pub hub_retained_packets: Gauge,
    /// Evicted batches still held by deliveries not yet sent.
    pub hub_pinned_bytes: Gauge,
    /// Bytes read from producers and not yet in the hub (partial frames,
    /// batches being verified), all connections and Publish streams together.
    pub ingest_buffered_bytes: Gauge,
    pub grpc_connections: Gauge,
    pub grpc_connections_total: Counter,
    /// gRPC connections closed by the server, by reason.
    pub grpc_connections_closed: ReasonCount,
    pub publishers: Gauge,
    /// Torn log tails cut at start (a write the previous run did not finish).
    pub log_truncated_bytes: Counter,
    pub log_corrupt_records: Counter,
    pub log_write_errors: Counter,
    pub log_bytes: Gauge,
    pub log_segments: Gauge,
    pub log_first_sequence: Gauge,
    /// Bytes of the last segment that start-up read to find its valid end
    /// (bounded by one index interval and a record, whatever the log's size).
    pub log_recovery_scanned_bytes: Gauge,
    /// Bytes read from the log for subscribers (replay and catch-up).
    pub log_read_bytes: Counter,
    /// Bytes the log wrote with O_DIRECT (`--log-io direct`, full buffers).
    pub log_direct_write_bytes: Counter,
    /// RPCs refused or ended by a limit, by reason.
    pub requests_refused: ReasonCount,
    /// `--compression`: messages and bytes in and out, per encoding.
    pub compression: crate::compression::CompressionMetrics,
    pub verify_seconds: Histogram,
    pub batch_age: BatchAge,
    /// Pre-resolved `rejected{reason}` handles, in `Rejection::ALL` order.
    pub rejection_handles: [(Counter, Counter); 2],
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("packet_ingest");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let metric = Counter::default();
            registry.register(name, help, metric.clone());
            metric
        };
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let metric = Gauge::default();
            registry.register(name, help, metric.clone());
            metric
        };
        let reasons = |registry: &mut Registry, name: &str, help: &str| {
            let counters = ReasonCounters::default();
            registry.register(
                format!("{name}_packets"),
                format!("{help} (packets)"),
                counters.packets.clone(),
            );
            registry.register(
                format!("{name}_bytes"),
                format!("{help} (bytes)"),
                counters.bytes.clone(),
            );
            counters
        };

        let packets_received =
            counter(&mut registry, "received_packets", "Well-formed frames read");
        let bytes_received = counter(
            &mut registry,
            "received_bytes",
            "Bytes of well-formed frames read",
        );
        let packets_accepted = counter(
            &mut registry,
            "accepted_packets",
            "Packets verified and published",
        );
        let bytes_accepted = counter(
            &mut registry,
            "accepted_bytes",
            "Frame bytes verified and published",
        );
        let rejected = reasons(
            &mut registry,
            "rejected",
            "Frames dropped by verification, by reason",
        );
        let protocol_errors = reasons(
            &mut registry,
            "protocol_errors",
            "Connections closed or frames discarded for bad framing, by reason",
        );
        let ingest_connections = gauge(
            &mut registry,
            "ingest_connections",
            "Open TCP ingest connections",
        );
        let ingest_connections_total = counter(
            &mut registry,
            "ingest_connections_accepted",
            "TCP ingest connections accepted",
        );
        let subscribers = gauge(&mut registry, "subscribers", "Open Subscribe streams");
        let packets_delivered = counter(
            &mut registry,
            "delivered_packets",
            "Packets handed to subscriber streams",
        );
        let packets_missed = counter(
            &mut registry,
            "missed_packets",
            "Packets subscribers lost by lagging, reported to them in `missed`",
        );
        let subscribers_disconnected = reasons(
            &mut registry,
            "subscribers_disconnected",
            "Subscribe streams ended by the server, by reason",
        );
        let hub_retained_bytes = gauge(
            &mut registry,
            "hub_retained_bytes",
            "Bytes held for history and lagging subscribers",
        );
        let hub_retained_packets = gauge(
            &mut registry,
            "hub_retained_packets",
            "Packets held for history and lagging subscribers",
        );
        let hub_pinned_bytes = gauge(
            &mut registry,
            "hub_pinned_bytes",
            "Bytes of evicted batches still held by unsent deliveries (charged to --memory-limit)",
        );
        let ingest_buffered_bytes = gauge(
            &mut registry,
            "ingest_buffered_bytes",
            "Bytes read from producers and not yet published (partial frames, batches in verification)",
        );
        let grpc_connections = gauge(&mut registry, "grpc_connections", "Open gRPC connections");
        let grpc_connections_total = counter(
            &mut registry,
            "grpc_connections_accepted",
            "gRPC connections accepted",
        );
        let count = |registry: &mut Registry, name: &str, help: &str| {
            let family = ReasonCount::default();
            registry.register(name, help, family.family.clone());
            family
        };
        let grpc_connections_closed = count(
            &mut registry,
            "grpc_connections_closed",
            "gRPC connections closed by the server, by reason",
        );
        let publishers = gauge(&mut registry, "publishers", "Open Publish streams");
        let log_truncated_bytes = counter(
            &mut registry,
            "log_truncated_bytes",
            "Bytes of torn log tail cut at start-up",
        );
        let log_corrupt_records = counter(
            &mut registry,
            "log_corrupt_records",
            "Log records that failed their checksum when read (reported, never delivered)",
        );
        let log_write_errors = counter(
            &mut registry,
            "log_write_errors",
            "Failed log writes (ingest pauses until writes succeed again)",
        );
        let log_bytes = gauge(&mut registry, "log_bytes", "Bytes in the log's segments");
        let log_segments = gauge(&mut registry, "log_segments", "Segments in the log");
        let log_first_sequence = gauge(
            &mut registry,
            "log_first_sequence",
            "Oldest sequence still in the log",
        );
        let log_recovery_scanned_bytes = gauge(
            &mut registry,
            "log_recovery_scanned_bytes",
            "Bytes of the log's tail read at start-up to find its valid end",
        );
        let log_read_bytes = counter(
            &mut registry,
            "log_read_bytes",
            "Bytes read from the log for replaying and catching-up subscribers",
        );
        let log_direct_write_bytes = counter(
            &mut registry,
            "log_direct_write_bytes",
            "Bytes the log wrote with O_DIRECT, past the page cache",
        );
        let requests_refused = count(
            &mut registry,
            "requests_refused",
            "RPCs refused or ended by a limit, by reason",
        );
        let compression = crate::compression::CompressionMetrics::default();
        compression.register(&mut registry);
        let verify_seconds = Histogram::new(exponential_buckets(1e-6, 4.0, 12));
        registry.register(
            "verify_batch_seconds",
            "Time to verify and encode one batch of frames on the pool",
            verify_seconds.clone(),
        );
        let batch_age = BatchAge::register(&mut registry);
        registry.register(
            "build",
            "Build information",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        let rejection_handles = Rejection::ALL.map(|rejection| {
            let label = ReasonLabel {
                reason: rejection.reason(),
            };
            // Counted through these handles, never `add`: listed from the start.
            rejected.seen.note(rejection.reason());
            (
                rejected.packets.get_or_create(&label).clone(),
                rejected.bytes.get_or_create(&label).clone(),
            )
        });
        Arc::new(Metrics {
            registry,
            packets_received,
            bytes_received,
            packets_accepted,
            bytes_accepted,
            rejected,
            protocol_errors,
            ingest_connections,
            ingest_connections_total,
            subscribers,
            packets_delivered,
            packets_missed,
            subscribers_disconnected,
            hub_retained_bytes,
            hub_retained_packets,
            hub_pinned_bytes,
            ingest_buffered_bytes,
            grpc_connections,
            grpc_connections_total,
            grpc_connections_closed,
            publishers,
            log_truncated_bytes,
            log_corrupt_records,
            log_write_errors,
            log_bytes,
            log_segments,
            log_first_sequence,
            log_recovery_scanned_bytes,
            log_read_bytes,
            log_direct_write_bytes,
            requests_refused,
            compression,
            verify_seconds,
            batch_age,
            rejection_handles,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
