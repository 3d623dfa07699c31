//! Unit tests of the hub: sequencing, replay, lag policies, memory bounds.

use super::*;
use crate::wire::{Delivery, EncodedPacketsBuilder, PacketFields};
use tokio_util::sync::CancellationToken;

fn hub(policy: SlowSubscriberPolicy, retain: u64, memory: usize) -> Arc<Hub> {
    Hub::new(
        HubConfig {
            retain_packets: retain,
            memory_limit: memory,
            policy,
            block_timeout: Duration::from_millis(200),
            max_delivery_bytes: 1 << 20,
        },
        Metrics::new(),
    )
}

fn hub_config(
    policy: SlowSubscriberPolicy,
    retain_packets: u64,
    memory_limit: usize,
    max_delivery_bytes: usize,
) -> HubConfig {
    HubConfig {
        retain_packets,
        memory_limit,
        policy,
        block_timeout: Duration::from_millis(200),
        max_delivery_bytes,
    }
}

fn batch(channels: &[u32], payload_size: usize) -> EncodedPackets {
    let payload = vec![0xAB; payload_size];
    let mut builder = EncodedPacketsBuilder::with_capacity(channels.len(), 0, 1);
    for (index, channel) in channels.iter().enumerate() {
        builder.push(&PacketFields {
            channel: crate::frame::Channel(*channel),
            payload: &payload,
            digest: &[0; 32],
            source: "test",
            source_sequence: index as u64,
            received_unix_nanos: 1,
        });
    }
    builder.finish()
}

/// Sequences of the packets a delivery carries, decoded with prost.
fn sequences(delivery: Delivery) -> (u64, Vec<u64>) {
    use prost::Message;
    let bytes: Vec<u8> = delivery
        .into_chunks()
        .flat_map(|chunk| chunk.to_vec())
        .collect();
    let response = crate::pb::SubscribeResponse::decode(&bytes[crate::wire::GRPC_PREFIX_LEN..])
        .expect("decodes");
    (
        response.missed,
        response
            .packets
            .iter()
            .map(|packet| packet.sequence)
            .collect(),
    )
}

async fn next_delivery(subscription: &mut Subscription) -> Delivery {
    match subscription.next(Duration::from_secs(5)).await {
        Next::Delivery(delivery) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// Waits (10 s at most) until everything below `end` is durable.
async fn wait_durable(hub: &Hub, end: u64) {
    let mut durable = hub.durable();
    tokio::time::timeout(Duration::from_secs(10), durable.wait_for(|at| *at >= end))
        .await
        .expect("made durable in time")
        .expect("hub alive");
}

/// A subscription whose connection the hub may close (the token says so).
fn subscribe_closable(
    hub: &Arc<Hub>,
    from_sequence: Option<u64>,
) -> (Subscription, CancellationToken) {
    let connection = CancellationToken::new();
    let subscription = hub
        .subscribe_with(SubscribeOptions {
            from_sequence,
            close_connection: Some(connection.clone()),
            ..SubscribeOptions::default()
        })
        .expect("subscribe");
    (subscription, connection)
}

/// Reads on until `end`: every sequence from the first in `got`, nothing missed.
async fn read_to_the_end(subscription: &mut Subscription, mut got: Vec<u64>, end: u64) {
    for _ in 0..10_000 {
        if got.last().is_some_and(|last| last + 1 >= end) {
            break;
        }
        let (missed, more) = sequences(next_delivery(subscription).await);
        assert_eq!(missed, 0);
        got.extend(more);
    }
    assert_eq!(got, (1..end).collect::<Vec<_>>());
}

#[tokio::test]
async fn sequences_start_at_one_and_have_no_gaps() {
    let hub = hub(SlowSubscriberPolicy::Gap, 100, 1 << 20);
    assert_eq!(hub.publish(batch(&[1, 1, 1], 4)).await, 1..4);
    assert_eq!(hub.publish(batch(&[], 4)).await, 4..4);
    assert_eq!(hub.publish(batch(&[2], 4)).await, 4..5);
    assert_eq!(hub.next_sequence(), 5);
}

#[tokio::test]
async fn replay_then_live_has_no_duplicate_and_no_gap() {
    let hub = hub(SlowSubscriberPolicy::Gap, 100, 1 << 20);
    hub.publish(batch(&[1; 5], 4)).await;
    let mut subscription = hub
        .subscribe(ChannelFilter::default(), Some(3))
        .expect("subscribe");
    hub.publish(batch(&[1; 2], 4)).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.extend(sequences(next_delivery(&mut subscription).await).1);
    }
    assert_eq!(seen, vec![3, 4, 5, 6, 7]);
}

#[tokio::test]
async fn from_sequence_older_than_retained_reports_missed() {
    let hub = hub(SlowSubscriberPolicy::Gap, 4, 1 << 20);
    for _ in 0..5 {
        hub.publish(batch(&[1, 1], 4)).await;
    }
    // Retains at least 4 packets in whole batches: sequences 7..=10.
    let mut subscription = hub
        .subscribe(ChannelFilter::default(), Some(1))
        .expect("subscribe");
    let delivery = next_delivery(&mut subscription).await;
    assert_eq!(sequences(delivery), (6, vec![7, 8, 9, 10]));
}

#[tokio::test]
async fn from_sequence_beyond_next_is_out_of_range() {
    let hub = hub(SlowSubscriberPolicy::Gap, 4, 1 << 20);
    hub.publish(batch(&[1], 4)).await;
    assert!(hub.subscribe(ChannelFilter::default(), Some(2)).is_ok());
    assert!(matches!(
        hub.subscribe(ChannelFilter::default(), Some(3)),
        Err(SubscribeError::OutOfRange {
            requested: 3,
            next: 2
        })
    ));
}

#[tokio::test]
async fn lagging_subscriber_in_gap_mode_gets_exact_missed_count() {
    let hub = hub(SlowSubscriberPolicy::Gap, 4, 1 << 20);
    let mut slow = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    for _ in 0..10 {
        hub.publish(batch(&[1, 1], 4)).await;
    }
    let delivery = next_delivery(&mut slow).await;
    let (missed, got) = sequences(delivery);
    assert_eq!(missed + got.len() as u64, 20);
    assert_eq!(got.first().copied(), Some(missed + 1));
}

#[tokio::test]
async fn lagging_subscriber_in_disconnect_mode_is_ended() {
    let hub = hub(SlowSubscriberPolicy::Disconnect, 4, 1 << 20);
    let mut slow = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    for _ in 0..10 {
        hub.publish(batch(&[1, 1], 4)).await;
    }
    match slow.next(Duration::from_secs(1)).await {
        Next::End(SubscriptionEnd::Lagged { behind, .. }) => assert_eq!(behind, 20),
        other => panic!("expected lag end, got {other:?}"),
    }
}

#[tokio::test]
async fn memory_limit_bounds_retained_bytes() {
    let hub = hub(SlowSubscriberPolicy::Gap, 1_000_000, 64 * 1024);
    let _stalled = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    for _ in 0..100 {
        hub.publish(batch(&[1], 10_000)).await;
    }
    let ring = hub.lock();
    assert!(ring.retained_bytes <= 64 * 1024, "{}", ring.retained_bytes);
    assert!(ring.retained_packets >= 5);
}

#[tokio::test]
async fn block_mode_waits_for_the_slowest_then_cuts_it_after_the_timeout() {
    let hub = hub(SlowSubscriberPolicy::Block, 4, 1 << 20);
    let mut stuck = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    let mut live = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    hub.publish(batch(&[1, 1, 1, 1], 4)).await;
    assert_eq!(
        sequences(next_delivery(&mut live).await).1,
        vec![1, 2, 3, 4]
    );
    // Full: `stuck` has read nothing, so the next publish waits, then cuts it.
    let started = Instant::now();
    let range = hub.publish(batch(&[1], 4)).await;
    assert_eq!(range, 5..6);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(matches!(
        stuck.next(Duration::from_secs(1)).await,
        Next::End(SubscriptionEnd::Stuck(_))
    ));
    assert_eq!(sequences(next_delivery(&mut live).await).1, vec![5]);
}

#[tokio::test]
async fn block_mode_resumes_as_soon_as_the_slowest_reads() {
    let hub = hub(SlowSubscriberPolicy::Block, 2, 1 << 20);
    let mut slow = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    hub.publish(batch(&[1, 1], 4)).await;
    let publisher = {
        let hub = Arc::clone(&hub);
        tokio::spawn(async move { hub.publish(batch(&[1, 1], 4)).await })
    };
    assert_eq!(sequences(next_delivery(&mut slow).await).1, vec![1, 2]);
    let range = publisher.await.expect("publisher");
    assert_eq!(range, 3..5);
    assert_eq!(sequences(next_delivery(&mut slow).await).1, vec![3, 4]);
}

#[tokio::test]
async fn filtered_subscriber_skips_other_channels_without_waking_the_client() {
    let hub = hub(SlowSubscriberPolicy::Gap, 100, 1 << 20);
    let mut only_two = hub
        .subscribe(ChannelFilter::new(vec![2]), None)
        .expect("subscribe");
    hub.publish(batch(&[1, 1, 1], 4)).await;
    hub.publish(batch(&[1, 2, 1], 4)).await;
    let delivery = next_delivery(&mut only_two).await;
    assert_eq!(sequences(delivery).1, vec![5]);
}

#[tokio::test]
async fn closing_drains_then_ends_subscribers() {
    let hub = hub(SlowSubscriberPolicy::Gap, 100, 1 << 20);
    let mut subscription = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    hub.publish(batch(&[1], 4)).await;
    hub.close();
    assert_eq!(sequences(next_delivery(&mut subscription).await).1, vec![1]);
    assert!(matches!(
        subscription.next(Duration::from_secs(1)).await,
        Next::End(SubscriptionEnd::ShuttingDown)
    ));
    assert!(matches!(
        hub.subscribe(ChannelFilter::default(), None),
        Err(SubscribeError::ShuttingDown)
    ));
}

#[tokio::test]
async fn idle_subscription_gets_a_heartbeat() {
    let hub = hub(SlowSubscriberPolicy::Gap, 100, 1 << 20);
    let mut subscription = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    assert!(matches!(
        subscription.next(Duration::from_millis(20)).await,
        Next::Idle
    ));
}

#[tokio::test]
async fn filtered_subscriber_that_lags_is_told_exactly_how_many_of_its_packets_it_lost() {
    let hub = hub(SlowSubscriberPolicy::Gap, 10, 1 << 20);
    let mut only_two = hub
        .subscribe(ChannelFilter::new(vec![2]), None)
        .expect("subscribe");
    // 50 batches of [1, 2, 1, 1]: 50 packets on channel 2, most of them evicted.
    for _ in 0..50 {
        hub.publish(batch(&[1, 2, 1, 1], 4)).await;
    }
    let delivery = next_delivery(&mut only_two).await;
    let (missed, got) = sequences(delivery);
    let delivered = got.len() as u64;
    assert!(missed > 0);
    assert_eq!(missed + delivered, 50, "missed counts channel 2 only");
}

#[tokio::test(start_paused = true)]
async fn filtered_subscriber_gets_heartbeats_while_other_channels_are_busy() {
    let hub = hub(SlowSubscriberPolicy::Gap, 100, 1 << 20);
    let mut quiet = hub
        .subscribe(ChannelFilter::new(vec![999]), None)
        .expect("subscribe");
    let busy = {
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            loop {
                hub.publish(batch(&[1], 4)).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = tokio::time::Instant::now();
    assert!(matches!(
        quiet.next(Duration::from_millis(100)).await,
        Next::Idle
    ));
    assert!(started.elapsed() < Duration::from_millis(150));
    busy.abort();
}

#[tokio::test]
async fn a_delivery_held_after_eviction_stays_charged_until_released() {
    let hub = hub(SlowSubscriberPolicy::Gap, 1_000_000, 64 * 1024);
    let mut reader = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    hub.publish(batch(&[1], 20_000)).await;
    // The stream has taken the first batch but not sent it (a stalled client).
    let held = next_delivery(&mut reader).await;
    for _ in 0..10 {
        hub.publish(batch(&[1], 20_000)).await;
    }
    let stats = hub.stats();
    assert!(stats.pinned_bytes >= 20_000, "{stats:?}");
    assert!(
        stats.retained_bytes + stats.pinned_bytes <= 64 * 1024,
        "ring and pinned deliveries share the limit: {stats:?}"
    );
    drop(held);
    hub.publish(batch(&[1], 10)).await;
    assert_eq!(hub.stats().pinned_bytes, 0);
}

#[tokio::test]
async fn pinned_memory_over_half_the_limit_closes_the_laggards_connection() {
    let hub = hub(SlowSubscriberPolicy::Gap, 1_000_000, 64 * 1024);
    let (mut stalled, connection) = subscribe_closable(&hub, None);
    let mut healthy = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    hub.publish(batch(&[1, 1], 20_000)).await;
    let held = next_delivery(&mut stalled).await;
    // 40 KB stays pinned by `held` once the ring moves past it.
    for _ in 0..10 {
        hub.publish(batch(&[1], 4_000)).await;
        let _ = next_delivery(&mut healthy).await;
    }
    assert!(connection.is_cancelled(), "{:?}", hub.stats());
    assert!(matches!(
        stalled.next(Duration::from_secs(1)).await,
        Next::End(SubscriptionEnd::HoldingMemory)
    ));
    drop(held);
    hub.publish(batch(&[1], 10)).await;
    assert_eq!(hub.stats().pinned_bytes, 0);
}

/// Stalled streams pinning ring memory get their connections closed; a
/// catch-up subscriber that is reading from the log holds none of it and
/// keeps its connection.
#[tokio::test]
async fn a_subscriber_reading_the_log_is_not_closed_for_ring_memory() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let opened = open_log(dir.path());
    let mut writer = opened.writer;
    // History only on disk: 64 batches of 4 packets of 1 KiB.
    let next = write_history(&mut writer, 64, 4, 1_000);
    let hub = Hub::with_log(
        hub_config(
            SlowSubscriberPolicy::CatchUp,
            1_000_000,
            64 * 1024,
            8 * 1024,
        ),
        Metrics::new(),
        Arc::clone(&opened.log),
        next,
    );
    let (stop, writer) = spawn_writer(&hub, writer);
    let (mut stalled, stalled_connection) = subscribe_closable(&hub, None);
    let (mut reader, reader_connection) = subscribe_closable(&hub, Some(1));
    let got = sequences(next_delivery(&mut reader).await).1;
    hub.publish(batch(&[1, 1], 20_000)).await;
    let held = next_delivery(&mut stalled).await;
    // 40 KB stays pinned by `held` once the ring moves past it.
    let within = Duration::from_secs(10);
    for _ in 0..10 {
        tokio::time::timeout(within, hub.publish(batch(&[1], 4_000)))
            .await
            .expect("published");
    }
    assert!(stalled_connection.is_cancelled(), "{:?}", hub.stats());
    assert!(
        !reader_connection.is_cancelled(),
        "the log reader keeps its connection"
    );
    read_to_the_end(&mut reader, got, hub.next_sequence()).await;
    drop(held);
    stop.cancel();
    writer.await.expect("writer ends");
}

#[tokio::test]
async fn channel_bookkeeping_exists_only_for_channels_someone_filters_on() {
    let hub = hub(SlowSubscriberPolicy::Gap, 4, 1 << 20);
    for channel in 0..1_000u32 {
        hub.publish(batch(&[channel, channel + 1_000_000], 4)).await;
    }
    assert!(hub.lock().watched.is_empty());
    let filtered = hub
        .subscribe(ChannelFilter::new(vec![5, 6]), None)
        .expect("subscribe");
    assert_eq!(hub.lock().watched.len(), 2);
    drop(filtered);
    assert!(hub.lock().watched.is_empty());
}

#[tokio::test]
async fn filtered_resume_from_the_middle_of_the_ring_counts_exact_losses() {
    let hub = hub(SlowSubscriberPolicy::Gap, 8, 1 << 20);
    for _ in 0..4 {
        hub.publish(batch(&[1, 2], 4)).await;
    }
    // Resume at 5 (channel 1 packets: 5 and 7), then let the ring move on.
    let mut resumed = hub
        .subscribe(ChannelFilter::new(vec![1]), Some(5))
        .expect("subscribe");
    for _ in 0..20 {
        hub.publish(batch(&[1, 2], 4)).await;
    }
    let mut missed = 0;
    let mut got = Vec::new();
    while got.last().copied() != Some(47) {
        let (lost, sequences) = sequences(next_delivery(&mut resumed).await);
        missed += lost;
        got.extend(sequences);
    }
    // Channel 1 holds the odd sequences 5..=47: 22 packets, each seen or missed.
    assert_eq!(missed + got.len() as u64, 22, "{got:?}");
    assert!(got.iter().all(|sequence| sequence % 2 == 1));
}

fn log_options(dir: &std::path::Path) -> crate::log::LogOptions {
    crate::log::LogOptions {
        dir: dir.to_owned(),
        segment_bytes: 64 << 20,
        retention_bytes: None,
        retention_age: None,
        fsync: crate::log::FsyncPolicy::Never,
        fsync_interval: Duration::from_millis(100),
        io: crate::log::LogIo::Direct,
    }
}

fn open_log(dir: &std::path::Path) -> crate::log::Opened {
    crate::log::Log::open(log_options(dir), Metrics::new()).expect("log opens")
}

/// A log with `--fsync interval` at `interval`.
fn open_interval_log(dir: &std::path::Path, interval: Duration) -> crate::log::Opened {
    let mut options = log_options(dir);
    options.fsync = crate::log::FsyncPolicy::Interval;
    options.fsync_interval = interval;
    crate::log::Log::open(options, Metrics::new()).expect("log opens")
}

/// Writes `batches` batches of `packets` packets of `size` bytes straight to
/// the log, from its end; returns the sequence after them.
fn write_history(
    writer: &mut crate::log::LogWriter,
    batches: usize,
    packets: usize,
    size: usize,
) -> u64 {
    let mut next = writer.end_sequence();
    for _ in 0..batches {
        let stamped = Arc::new(batch(&vec![1; packets], size).stamp(next));
        next = stamped.end_sequence();
        writer.write(&[stamped]).expect("log write");
    }
    next
}

/// The hub's log writer task; cancel the token and await the handle to stop it.
fn spawn_writer(
    hub: &Arc<Hub>,
    writer: crate::log::LogWriter,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let (stop, handle, _) = spawn_writer_watching(hub, writer);
    (stop, handle)
}

/// `spawn_writer`, also returning why writes fail while they do.
fn spawn_writer_watching(
    hub: &Arc<Hub>,
    writer: crate::log::LogWriter,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<()>,
    watch::Receiver<Option<String>>,
) {
    let (failing, failing_rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let handle = tokio::spawn(super::persist::write_log(
        Arc::clone(hub),
        writer,
        failing,
        stop.clone(),
    ));
    (stop, handle, failing_rx)
}

/// Producers may publish before the log writer task first runs (it is
/// spawned, and the listeners accept at once): it must write from the log's
/// end, not from wherever the hub has got to, or those packets are
/// acknowledged and never stored (a replay from 1 began at 186, once).
#[tokio::test]
async fn batches_published_before_the_writer_starts_are_written_first() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let opened = open_log(dir.path());
    let hub = Hub::with_log(
        hub_config(SlowSubscriberPolicy::CatchUp, 1 << 20, 64 << 20, 1 << 20),
        Metrics::new(),
        Arc::clone(&opened.log),
        opened.next_sequence,
    );
    for _ in 0..5 {
        hub.publish(batch(&[1; 37], 100)).await;
    }
    let end = hub.next_sequence();
    assert_eq!(end, 1 + 5 * 37);
    let (stop, writer) = spawn_writer(&hub, opened.writer);
    wait_durable(&hub, end).await;
    stop.cancel();
    writer.await.expect("writer ends");
    let read = opened.log.read(1, 1 << 20).expect("log reads");
    assert_eq!(read.skipped, 0);
    let firsts: Vec<u64> = read
        .batches
        .iter()
        .map(|batch| batch.first_sequence)
        .collect();
    assert_eq!(firsts, vec![1, 38, 75, 112, 149]);
}

/// A failed fsync in a round that wrote nothing covers what earlier rounds
/// wrote: that is cut back and written again from the ring (it was once
/// undone with nothing written again: packets were acknowledged that were no
/// longer on disk, then every later write was refused).
#[tokio::test]
async fn a_failed_sync_with_nothing_new_to_write_rewrites_what_it_covered() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let opened = open_interval_log(dir.path(), Duration::from_millis(200));
    opened
        .writer
        .failing_syncs
        .store(1, std::sync::atomic::Ordering::Release);
    let hub = Hub::with_log(
        hub_config(SlowSubscriberPolicy::CatchUp, 1 << 20, 64 << 20, 1 << 20),
        Metrics::new(),
        Arc::clone(&opened.log),
        opened.next_sequence,
    );
    // Written at once; its sync is due only 200 ms later, alone, and fails.
    hub.publish(batch(&[1; 10], 100)).await;
    let (stop, writer, mut failing_rx) = spawn_writer_watching(&hub, opened.writer);
    let within = Duration::from_secs(10);
    tokio::time::timeout(within, failing_rx.wait_for(Option::is_some))
        .await
        .expect("the sync failed in time")
        .expect("writer alive");
    hub.publish(batch(&[1; 10], 100)).await;
    wait_durable(&hub, 21).await;
    stop.cancel();
    writer.await.expect("writer ends");
    let read = opened.log.read(1, 1 << 20).expect("log reads");
    let firsts: Vec<u64> = read
        .batches
        .iter()
        .map(|batch| batch.first_sequence)
        .collect();
    assert_eq!((firsts, read.skipped), (vec![1, 11], 0));
}

/// With `--fsync interval` a slow fsync does not hold deliveries: a batch
/// numbered while one runs is written and delivered before it ends, and
/// made durable once it does (the fsync once ran in the writer's round, so
/// every batch numbered meanwhile waited for the disk).
#[tokio::test]
async fn a_slow_fsync_does_not_hold_deliveries() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let opened = open_interval_log(dir.path(), Duration::from_millis(1));
    let gate = Arc::clone(&opened.writer.sync_gate);
    gate.hold();
    // Released however the test ends: a held fsync would keep the runtime
    // from shutting down after a failed assertion.
    struct Release(Arc<crate::log::SyncGate>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.release();
        }
    }
    let _release = Release(Arc::clone(&gate));
    let hub = Hub::with_log(
        hub_config(SlowSubscriberPolicy::CatchUp, 1 << 20, 64 << 20, 1 << 20),
        Metrics::new(),
        Arc::clone(&opened.log),
        opened.next_sequence,
    );
    let (stop, writer) = spawn_writer(&hub, opened.writer);
    let (mut subscriber, _connection) = subscribe_closable(&hub, None);
    let within = Duration::from_secs(10);
    hub.publish(batch(&[1; 10], 100)).await;
    tokio::time::timeout(within, gate.reached.notified())
        .await
        .expect("an fsync of the first batch started");
    hub.publish(batch(&[1; 10], 100)).await;
    let mut got = Vec::new();
    while got.len() < 20 {
        got.extend(sequences(next_delivery(&mut subscriber).await).1);
    }
    assert_eq!(got, (1..21).collect::<Vec<u64>>());
    assert!(
        *hub.durable().borrow() < 21,
        "nothing past the held fsync is durable yet"
    );
    gate.release();
    wait_durable(&hub, 21).await;
    stop.cancel();
    tokio::time::timeout(within, writer)
        .await
        .expect("the writer finishes in time")
        .expect("writer ends");
}

/// After a failed fsync the pages it should have written may be gone, and a
/// later fsync that succeeds would not say so: everything since the last good
/// fsync is written again, from the ring, which keeps batches until they are
/// durable (with a ring far smaller than what is published: publishers ask
/// for early fsyncs instead of the ring dropping unsynced batches). The
/// injected failure zeroes what it should have written, as lost pages would
/// read back: a plain retry would leave them so.
#[tokio::test]
async fn a_failed_fsync_writes_everything_since_the_last_good_one_again() {
    fsync_failure_is_written_again(64 << 20, 8 << 10).await;
}

/// The same with a segment roll every few batches and a ring 16 times a
/// segment: the failing fsync is then mostly the one that closes a segment.
#[tokio::test]
async fn a_failed_fsync_closing_a_segment_writes_everything_since_again() {
    fsync_failure_is_written_again(4 << 10, 64 << 10).await;
}

async fn fsync_failure_is_written_again(segment_bytes: u64, memory_limit: usize) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut options = log_options(dir.path());
    options.segment_bytes = segment_bytes;
    options.fsync = crate::log::FsyncPolicy::Interval;
    // Only early fsyncs (asked for by held publishers) and the final one.
    options.fsync_interval = Duration::from_secs(3600);
    let metrics = Metrics::new();
    let opened = crate::log::Log::open(options, Arc::clone(&metrics)).expect("log opens");
    let failing_syncs = Arc::clone(&opened.writer.failing_syncs);
    let hub = Hub::with_log(
        hub_config(
            SlowSubscriberPolicy::CatchUp,
            1 << 20,
            memory_limit,
            1 << 20,
        ),
        Arc::clone(&metrics),
        Arc::clone(&opened.log),
        opened.next_sequence,
    );
    let (stop, writer) = spawn_writer(&hub, opened.writer);
    let within = Duration::from_secs(10);
    for round in 0..80 {
        if round == 40 {
            // Far more than the ring holds has been written and synced: the
            // next fsyncs fail.
            failing_syncs.store(2, std::sync::atomic::Ordering::Release);
        }
        tokio::time::timeout(within, hub.publish(batch(&[1; 10], 100)))
            .await
            .expect("published: the ring is freed by fsyncs, early when it is full");
        // The writer keeps up with each batch: only fsyncs are behind.
        tokio::task::yield_now().await;
    }
    stop.cancel();
    tokio::time::timeout(within, writer)
        .await
        .expect("the writer finishes in time")
        .expect("writer ends");
    assert_eq!(
        *hub.durable().borrow(),
        801,
        "everything durable at the end"
    );
    assert_eq!(metrics.log_write_errors.get(), 2);
    let mut firsts = Vec::new();
    let mut from = 1;
    for _ in 0..100 {
        let read = opened.log.read(from, 1 << 20).expect("log reads");
        assert_eq!(read.skipped, 0);
        if read.batches.is_empty() {
            break;
        }
        firsts.extend(read.batches.iter().map(|batch| batch.first_sequence));
        from = read.resume_at;
    }
    assert_eq!(
        firsts,
        (0..80).map(|index| 1 + 10 * index).collect::<Vec<u64>>()
    );
}

/// Block mode with a log: a subscriber replaying history from disk does not
/// hold producers (a slow or idle replaying client would stop ingest), and
/// still gets every packet, from disk, then the ring, without a gap.
#[tokio::test]
async fn block_mode_producers_do_not_wait_for_a_subscriber_replaying_from_disk() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let opened = open_log(dir.path());
    let hub = Hub::with_log(
        hub_config(SlowSubscriberPolicy::Block, 64, 1 << 20, 64 << 10),
        Metrics::new(),
        Arc::clone(&opened.log),
        opened.next_sequence,
    );
    let (stop, writer) = spawn_writer(&hub, opened.writer);
    let within = Duration::from_secs(10);
    for _ in 0..20 {
        tokio::time::timeout(within, hub.publish(batch(&[1; 16], 100)))
            .await
            .expect("published");
    }
    wait_durable(&hub, 320 + 1).await;
    // Replays from 1 (the ring keeps 64 packets) and does not read yet.
    let mut replaying = hub
        .subscribe(ChannelFilter::default(), Some(1))
        .expect("subscribes");
    // A live subscriber that never reads: producers wait for it, then it is
    // cut after the block timeout; the replaying one is not.
    let mut stuck = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribes");
    for _ in 0..200 {
        tokio::time::timeout(within, hub.publish(batch(&[1; 16], 100)))
            .await
            .expect("producers do not wait for the replaying subscriber");
    }
    assert!(matches!(
        stuck.next(Duration::from_secs(1)).await,
        Next::End(SubscriptionEnd::Stuck(_))
    ));
    read_to_the_end(&mut replaying, Vec::new(), hub.next_sequence()).await;
    stop.cancel();
    writer.await.expect("writer ends");
}

/// Block mode with a log: a live subscriber behind what is durable is what
/// holds a producer, and its reading lets the producer in. (Subscribers at or
/// past the durable end do not wake held producers: those wait for an fsync.)
/// The block timeout is an hour and the writer's next round (retention, once
/// a second) would also recheck held producers, so the bound below is what
/// says the read itself released it.
#[tokio::test]
async fn block_mode_a_subscriber_behind_the_durable_end_releases_a_held_producer() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let opened = open_log(dir.path());
    let mut config = hub_config(SlowSubscriberPolicy::Block, 64, 1 << 20, 64 << 10);
    config.block_timeout = Duration::from_secs(3600);
    let hub = Hub::with_log(
        config,
        Metrics::new(),
        Arc::clone(&opened.log),
        opened.next_sequence,
    );
    let (stop, writer) = spawn_writer(&hub, opened.writer);
    let within = Duration::from_secs(10);
    let mut subscriber = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribes");
    for _ in 0..4 {
        tokio::time::timeout(within, hub.publish(batch(&[1; 16], 100)))
            .await
            .expect("64 packets fit the ring");
    }
    wait_durable(&hub, 65).await;
    let held = tokio::spawn({
        let hub = Arc::clone(&hub);
        async move { hub.publish(batch(&[1; 16], 100)).await }
    });
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !held.is_finished(),
        "the subscriber has read nothing: the producer waits"
    );
    let (_, read) = sequences(next_delivery(&mut subscriber).await);
    assert_eq!(read.first(), Some(&1));
    let range = tokio::time::timeout(Duration::from_millis(500), held)
        .await
        .expect("the subscriber's read let the producer in")
        .expect("publish task");
    assert_eq!(range, 65..81);
    stop.cancel();
    writer.await.expect("writer ends");
}

#[tokio::test]
async fn catch_up_reads_share_half_the_memory_limit() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let opened = open_log(dir.path());
    let mut writer = opened.writer;
    // 8 MiB of log: 64 batches of 16 packets of 8 KiB.
    let next = write_history(&mut writer, 64, 16, 8 << 10);
    let memory = 1 << 20;
    let hub = Hub::with_log(
        hub_config(SlowSubscriberPolicy::CatchUp, 16, memory, 64 << 10),
        Metrics::new(),
        opened.log,
        next,
    );
    let held = || hub.disk_read_bytes.load(Ordering::Acquire);
    let mut readers = Vec::new();
    for _ in 0..8 {
        let mut reader = hub
            .subscribe_with(SubscribeOptions {
                from_sequence: Some(1),
                ..SubscribeOptions::default()
            })
            .expect("subscribes");
        match reader.next(Duration::from_secs(5)).await {
            Next::Delivery(delivery) => assert_eq!(sequences(delivery).1[0], 1),
            other => panic!("expected a delivery from the log, got {other:?}"),
        }
        readers.push(reader);
    }
    // The first reader takes half the limit, the rest the smallest read (a
    // whole batch of about 130 KiB here): together far below 8 × 4 MiB.
    let one_batch = 16 * (8 << 10) + 4096;
    assert!(held() >= memory / 2, "{} bytes held", held());
    assert!(
        held() <= memory / 2 + 7 * one_batch,
        "{} bytes held",
        held()
    );
    readers.truncate(1);
    assert!(held() <= memory / 2 + one_batch, "{} bytes held", held());
    readers.clear();
    assert_eq!(held(), 0, "released with the subscriptions");
}

/// While one read from the log is sent, the next is read; both are charged
/// to the read allowance, and both are returned when the reader is back on
/// the ring or goes away.
#[tokio::test]
async fn a_catch_up_reader_reads_ahead_while_it_sends() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let opened = open_log(dir.path());
    let mut writer = opened.writer;
    // 8 MiB of log: 64 batches of 16 packets of 8 KiB, read 4 MiB at a time.
    let next = write_history(&mut writer, 64, 16, 8 << 10);
    let hub = Hub::with_log(
        hub_config(SlowSubscriberPolicy::CatchUp, 16, 64 << 20, 64 << 10),
        Metrics::new(),
        opened.log,
        next,
    );
    let (stop, writer) = spawn_writer(&hub, writer);
    let held = || hub.disk_read_bytes.load(Ordering::Acquire);
    let subscribe = || {
        hub.subscribe_with(SubscribeOptions {
            from_sequence: Some(1),
            ..SubscribeOptions::default()
        })
        .expect("subscribes")
    };
    let mut reader = subscribe();
    let first = sequences(next_delivery(&mut reader).await).1;
    assert_eq!(first[0], 1);
    let ahead = reader.read_ahead.as_ref().expect("reading ahead");
    assert_eq!(ahead.from, reader.disk.back().expect("read").end_sequence());
    assert!(held() > 4 << 20, "{} bytes held", held());

    // The reader's charges stay as they are until it reads again.
    let before = held();
    let mut leaving = subscribe();
    next_delivery(&mut leaving).await;
    assert!(leaving.read_ahead.is_some());
    assert!(held() > before);
    drop(leaving);
    // A read ahead still running returns its charge when it is done.
    for _ in 0..5_000 {
        if held() == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(held(), before, "the leaver's reads are returned");

    read_to_the_end(&mut reader, first, next).await;
    hub.publish(batch(&[1], 8)).await;
    assert_eq!(sequences(next_delivery(&mut reader).await).1, vec![next]);
    assert!(reader.read_ahead.is_none());
    assert_eq!(held(), 0, "back on the ring, nothing is held");
    stop.cancel();
    writer.await.expect("writer ends");
}
