//! The consumer side of cluster mode: every replica runs one ordered
//! JetStream consumer from its tip on and hands each stored batch, as it
//! is, to the local hub (which numbers nothing itself: the batch carries
//! its sequences). It also keeps the replica's tip current with what other
//! replicas store, which the sequencer numbers from and the keepalive
//! watches. Markers (empty messages) move the tip and deliver nothing.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::consumer::{push, DeliverPolicy};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{message, Cluster, Shared, Tip};
use crate::{
    hub::Hub,
    wire::{EncodedPackets, SequencedBatch},
};

impl Cluster {
    /// Feeds the local hub from the stream, starting at stream sequence
    /// `next`, until `stop`. Consumer failures (NATS restarts) recreate the
    /// consumer where it left off.
    pub async fn feed(self: Arc<Self>, hub: Arc<Hub>, mut next: u64, stop: CancellationToken) {
        loop {
            match self.consume_from(&hub, &mut next, &stop).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, next, "JetStream consumer failed; recreating it");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn consume_from(
        &self,
        hub: &Hub,
        next: &mut u64,
        stop: &CancellationToken,
    ) -> Result<(), async_nats::Error> {
        let mut stream = self.stream.clone();
        let last = stream.info().await?.state.last_sequence;
        if last + 1 < *next {
            // JetStream lost messages this replica had read (a crash before
            // its writes reached disk): what it stores next takes their place.
            tracing::warn!(
                last,
                next = *next,
                "JetStream stream is behind this replica's consumer; reading on from its end"
            );
            *next = last + 1;
        }
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.jetstream.client().new_inbox(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: *next,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = stop.cancelled() => return Ok(()),
            };
            let Some(message) = message else {
                return Err("consumer stream ended".into());
            };
            let message = message?;
            let sequence = message.info()?.stream_sequence;
            if sequence < *next {
                continue;
            }
            *next = sequence + 1;
            match message::decode(message.headers.as_ref(), message.payload.clone()) {
                Ok(batch) => hand_over(&self.shared, hub, sequence, batch).await,
                Err(error) => {
                    tracing::warn!(%error, sequence, "ignoring a JetStream message that is not a packet batch");
                }
            }
        }
    }
}

/// Hands the batch of the message stored at stream sequence `sequence` to
/// the hub and moves the replica's tip past it. An empty batch (a marker:
/// genesis or keepalive tip, anywhere in the stream) only moves the tip: it
/// holds no packet, so the hub and its subscribers see nothing of it, no
/// gap and no `missed`.
async fn hand_over(shared: &Shared, hub: &Hub, sequence: u64, batch: SequencedBatch) {
    let end = batch.end_sequence();
    shared.advance(Tip {
        stream_sequence: sequence,
        next_packet: end,
    });
    if batch.is_empty() {
        // Nothing for the hub.
    } else if batch.first_sequence < hub.next_sequence() {
        // Only a stream numbered against its own rules gets here.
        tracing::error!(
            first = batch.first_sequence,
            expected = hub.next_sequence(),
            "JetStream batch overlaps packets already delivered; skipped"
        );
    } else {
        let first = batch.first_sequence;
        hub.publish_at(Some(first), EncodedPackets::from_sequenced(batch))
            .await;
    }
    // Everything before `end` is dealt with, markers included (pacing waits on it).
    shared.fed.send_if_modified(|fed| {
        let moved = end > *fed;
        *fed = (*fed).max(end);
        moved
    });
}

#[cfg(test)]
mod tests {
    use tokio::sync::watch;

    use super::*;
    use crate::{
        cluster::tests::{batch, marker},
        hub::{HubConfig, Next, SlowSubscriberPolicy},
        metrics::Metrics,
        wire::ChannelFilter,
    };

    fn shared_at(tip: Tip) -> Shared {
        Shared {
            tip: watch::Sender::new(tip),
            fed: watch::Sender::new(tip.next_packet),
        }
    }

    fn hub_at(next: u64) -> Arc<Hub> {
        Hub::starting_at(
            HubConfig {
                retain_packets: 1000,
                memory_limit: 1 << 20,
                policy: SlowSubscriberPolicy::Gap,
                block_timeout: Duration::from_millis(200),
                max_delivery_bytes: 1 << 20,
            },
            Metrics::new(),
            next,
        )
    }

    #[tokio::test]
    async fn the_feed_takes_markers_anywhere_as_tips_without_deliveries() {
        let shared = shared_at(Tip {
            stream_sequence: 4,
            next_packet: 5,
        });
        let hub = hub_at(5);
        let mut subscription = hub
            .subscribe(ChannelFilter::default(), None)
            .expect("subscribes");
        // A keepalive tip right at the hub's next sequence: the tip moves,
        // the hub and its subscriber see nothing.
        hand_over(&shared, &hub, 5, marker(5)).await;
        assert_eq!(
            *shared.tip.borrow(),
            Tip {
                stream_sequence: 5,
                next_packet: 5
            }
        );
        assert_eq!((hub.next_sequence(), *shared.fed.borrow()), (5, 5));
        assert!(matches!(
            subscription.next(Duration::from_millis(50)).await,
            Next::Idle
        ));
        // Batches around more markers arrive dense, nothing missed.
        hand_over(&shared, &hub, 6, batch(5, &[1, 2, 3])).await;
        hand_over(&shared, &hub, 7, marker(8)).await;
        hand_over(&shared, &hub, 8, marker(8)).await;
        hand_over(&shared, &hub, 9, batch(8, &[4, 5])).await;
        hand_over(&shared, &hub, 10, marker(10)).await;
        let (mut packets, mut missed) = (0, 0);
        while packets < 5 {
            match subscription.next(Duration::from_secs(5)).await {
                Next::Delivery(delivery) => {
                    packets += delivery.packets();
                    missed += delivery.missed;
                }
                other => panic!("expected packets 5..=9, got {other:?}"),
            }
        }
        assert_eq!((packets, missed), (5, 0));
        assert_eq!(subscription.cursor(), 10);
        assert_eq!(
            *shared.tip.borrow(),
            Tip {
                stream_sequence: 10,
                next_packet: 10
            }
        );
        assert_eq!((hub.next_sequence(), *shared.fed.borrow()), (10, 10));
    }
}
