//! Unit tests of the hub: sequencing, replay, lag policies, memory bounds.

use super::*;
use crate::wire::{EncodedPacketsBuilder, PacketFields};

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

fn batch(channels: &[u32], payload_size: usize) -> EncodedPackets {
    let payload = vec![0xAB; payload_size];
    let mut builder = EncodedPacketsBuilder::with_capacity(channels.len(), 0);
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

fn sequences(delivery: &Delivery) -> Vec<u64> {
    delivery
        .segments
        .iter()
        .flat_map(|segment| {
            segment
                .range
                .clone()
                .filter(|index| {
                    delivery
                        .filter
                        .matches(segment.batch.packets.channel(*index))
                })
                .map(|index| segment.batch.first_sequence + index as u64)
        })
        .collect()
}

async fn next_delivery(subscription: &mut Subscription) -> Delivery {
    match subscription.next(Duration::from_secs(5)).await {
        Next::Delivery(delivery) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
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
        seen.extend(sequences(&next_delivery(&mut subscription).await));
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
    assert_eq!(delivery.missed, 6);
    assert_eq!(sequences(&delivery), vec![7, 8, 9, 10]);
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
    let got = sequences(&delivery);
    assert_eq!(delivery.missed + got.len() as u64, 20);
    assert_eq!(got.first().copied(), Some(delivery.missed + 1));
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
    assert_eq!(sequences(&next_delivery(&mut live).await), vec![1, 2, 3, 4]);
    // Full: `stuck` has read nothing, so the next publish waits, then cuts it.
    let started = Instant::now();
    let range = hub.publish(batch(&[1], 4)).await;
    assert_eq!(range, 5..6);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(matches!(
        stuck.next(Duration::from_secs(1)).await,
        Next::End(SubscriptionEnd::Stuck(_))
    ));
    assert_eq!(sequences(&next_delivery(&mut live).await), vec![5]);
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
    assert_eq!(sequences(&next_delivery(&mut slow).await), vec![1, 2]);
    let range = publisher.await.expect("publisher");
    assert_eq!(range, 3..5);
    assert_eq!(sequences(&next_delivery(&mut slow).await), vec![3, 4]);
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
    assert_eq!(sequences(&delivery), vec![5]);
}

#[tokio::test]
async fn closing_drains_then_ends_subscribers() {
    let hub = hub(SlowSubscriberPolicy::Gap, 100, 1 << 20);
    let mut subscription = hub
        .subscribe(ChannelFilter::default(), None)
        .expect("subscribe");
    hub.publish(batch(&[1], 4)).await;
    hub.close();
    assert_eq!(sequences(&next_delivery(&mut subscription).await), vec![1]);
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
    let delivered = sequences(&delivery).len() as u64;
    assert!(delivery.missed > 0);
    assert_eq!(
        delivery.missed + delivered,
        50,
        "missed counts channel 2 only"
    );
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
