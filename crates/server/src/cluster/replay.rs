//! Replay in cluster mode: a `from_sequence` older than the local hub's
//! history is served from the JetStream stream. A binary search on the
//! messages' `Pi-First` finds where to start, an ordered consumer reads on
//! from there, and each stored batch becomes one delivery of the packets
//! the subscriber asked for, until the hub's history takes over. Markers
//! (empty messages) add nothing and are skipped.

use std::sync::Arc;

use async_nats::jetstream::consumer::{push, DeliverPolicy};
use futures::{Stream, StreamExt};

use super::{message, Cluster};
use crate::wire::{ChannelFilter, Delivery, SequencedBatch};

impl Cluster {
    /// Deliveries of stored packets with `from <= sequence < until`, oldest
    /// first: how `from_sequence` older than the local history is served.
    pub fn replay(
        self: &Arc<Self>,
        from: u64,
        until: u64,
        filter: ChannelFilter,
    ) -> impl Stream<Item = Result<Delivery, tonic::Status>> + Send + 'static {
        let cluster = Arc::clone(self);
        futures::stream::once(async move {
            cluster
                .replay_consumer(from)
                .await
                .map(|messages| (messages, filter))
        })
        .flat_map(move |opened| match opened {
            Err(status) => futures::stream::once(async move { Err(status) }).boxed(),
            Ok((messages, filter)) => replay_deliveries(messages, from, until, filter).boxed(),
        })
    }

    /// The stream sequence of the message holding packet `from` (or of the
    /// oldest message, when retention removed it): a binary search for the
    /// last message whose first sequence is at most `from`. First sequences
    /// never decrease along the stream; a marker shares its `Pi-First` with
    /// the batch after it, so markers before that batch are passed over.
    pub(super) async fn locate(&self, from: u64) -> Result<u64, String> {
        let mut stream = self.stream.clone();
        let state = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .clone();
        let (mut low, mut high) = (state.first_sequence.max(1), state.last_sequence);
        while low < high {
            let middle = low + (high - low).div_ceil(2);
            let stored = self
                .stream
                .get_raw_message(middle)
                .await
                .map_err(|e| e.to_string())?;
            let place = message::placement(Some(&stored.headers)).map_err(|e| e.to_string())?;
            if place.first <= from {
                low = middle;
            } else {
                high = middle - 1;
            }
        }
        Ok(low)
    }

    async fn replay_consumer(&self, from: u64) -> Result<push::Ordered, tonic::Status> {
        let unavailable = |error: &dyn std::fmt::Display| {
            tonic::Status::unavailable(format!("cannot replay from JetStream: {error}; retry"))
        };
        let start = self.locate(from).await.map_err(|e| unavailable(&e))?;
        let consumer = self
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.jetstream.client().new_inbox(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&e))?;
        consumer.messages().await.map_err(|e| unavailable(&e))
    }
}

/// Turns replayed messages into deliveries (one per stored batch), stopping
/// at `until` or the stream's end.
fn replay_deliveries(
    messages: push::Ordered,
    from: u64,
    until: u64,
    filter: ChannelFilter,
) -> impl Stream<Item = Result<Delivery, tonic::Status>> + Send + 'static {
    let batches = messages.map(|message| {
        message.map(|message| {
            let pending = message.info().map_or(0, |info| info.pending);
            let batch = message::decode(message.headers.as_ref(), message.payload.clone());
            (batch.ok(), pending)
        })
    });
    replay_batches(batches, from, until, filter)
}

/// The deliveries of `batches` (each decoded message, `None` if it is not a
/// batch, with the count of messages after it), from `from` until `until`
/// or the last message. A message that adds nothing for the subscriber (a
/// marker, packets it filters out) sends nothing, not even an empty response.
fn replay_batches<E: std::fmt::Display>(
    batches: impl Stream<Item = Result<(Option<SequencedBatch>, u64), E>> + Send + Unpin + 'static,
    from: u64,
    until: u64,
    filter: ChannelFilter,
) -> impl Stream<Item = Result<Delivery, tonic::Status>> + Send + 'static {
    let state = (batches, from, false);
    futures::stream::unfold(state, move |(mut batches, mut expected, done)| {
        let filter = filter.clone();
        async move {
            if done || expected >= until {
                return None;
            }
            loop {
                let (batch, pending) = match batches.next().await {
                    Some(Ok(decoded)) => decoded,
                    Some(Err(error)) => {
                        let status = tonic::Status::unavailable(format!("JetStream replay failed: {error}; resubscribe from the last sequence you saw"));
                        return Some((Err(status), (batches, expected, true)));
                    }
                    None => return None,
                };
                let delivery = match batch {
                    Some(batch) => deliver_range(&batch, &mut expected, until, &filter),
                    None => Delivery::default(),
                };
                let finished = pending == 0 || expected >= until;
                if delivery.packets() > 0 || delivery.missed > 0 {
                    return Some((Ok(delivery), (batches, expected, finished)));
                }
                if finished {
                    return None;
                }
            }
        }
    })
}

/// The packets of `batch` in `expected..until` that `filter` takes; moves
/// `expected` past them and counts a gap before them as missed.
fn deliver_range(
    batch: &SequencedBatch,
    expected: &mut u64,
    until: u64,
    filter: &ChannelFilter,
) -> Delivery {
    let mut delivery = Delivery::default();
    let end = batch.end_sequence().min(until);
    if end <= *expected {
        return delivery;
    }
    if batch.first_sequence > *expected && filter.channels().is_none() {
        delivery.missed += batch.first_sequence - *expected;
    }
    let start = (*expected).max(batch.first_sequence);
    let offset = |sequence: u64| (sequence - batch.first_sequence) as usize;
    let mut run_start = None;
    for index in offset(start)..offset(end) {
        match (filter.matches(batch.channel(index)), run_start) {
            (true, None) => run_start = Some(index),
            (false, Some(from)) => {
                delivery.push(batch.records(from..index), index - from);
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(from) = run_start {
        delivery.push(batch.records(from..offset(end)), offset(end) - from);
    }
    *expected = end;
    delivery
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{batch, marker};

    #[test]
    fn replay_takes_the_requested_range_and_counts_gaps() {
        let stored = batch(10, &[1, 2, 1, 1, 2]);
        let mut expected = 8;
        let all = deliver_range(&stored, &mut expected, 13, &ChannelFilter::default());
        assert_eq!((all.packets(), all.missed, expected), (3, 2, 13));
        let mut expected = 11;
        let ones = deliver_range(&stored, &mut expected, 100, &ChannelFilter::new(vec![1]));
        assert_eq!((ones.packets(), ones.missed, expected), (2, 0, 15));
        let mut expected = 15;
        let past = deliver_range(&stored, &mut expected, 100, &ChannelFilter::default());
        assert_eq!((past.packets(), expected), (0, 15));
    }

    #[test]
    fn a_marker_in_a_replayed_range_delivers_nothing_and_hides_no_gap() {
        let all = ChannelFilter::default();
        // At the expected sequence: nothing to deliver, nothing missed.
        let mut expected = 7;
        let at = deliver_range(&marker(7), &mut expected, 100, &all);
        assert_eq!((at.packets(), at.missed, expected), (0, 0, 7));
        // Behind it: already delivered.
        let mut expected = 9;
        let behind = deliver_range(&marker(7), &mut expected, 100, &all);
        assert_eq!((behind.packets(), behind.missed, expected), (0, 0, 9));
        // Ahead of it, after retention removed the batches before it: those
        // packets are missed, as after a batch (unfiltered subscribers only).
        let mut expected = 3;
        let ahead = deliver_range(&marker(7), &mut expected, 100, &all);
        assert_eq!((ahead.packets(), ahead.missed, expected), (0, 4, 7));
        let mut expected = 3;
        let filtered = deliver_range(&marker(7), &mut expected, 100, &ChannelFilter::new(vec![1]));
        assert_eq!((filtered.missed, expected), (0, 7));
    }

    /// Sequences and missed counts a replay sends for `stored` (each message
    /// with the count of messages after it, as JetStream reports it).
    async fn replayed(stored: Vec<SequencedBatch>, from: u64, until: u64) -> Vec<(usize, u64)> {
        let count = stored.len() as u64;
        let messages = stored
            .into_iter()
            .enumerate()
            .map(move |(index, batch)| Ok::<_, String>((Some(batch), count - 1 - index as u64)));
        replay_batches(
            futures::stream::iter(messages),
            from,
            until,
            ChannelFilter::default(),
        )
        .map(|delivery| {
            let delivery = delivery.expect("replays");
            (delivery.packets(), delivery.missed)
        })
        .collect()
        .await
    }

    #[tokio::test]
    async fn replay_skips_markers_anywhere_and_sends_no_empty_response() {
        let stored = vec![
            marker(1),
            batch(1, &[1, 2, 3]),
            marker(4),
            marker(4),
            batch(4, &[1, 1]),
            marker(6),
        ];
        assert_eq!(replayed(stored, 1, 100).await, vec![(3, 0), (2, 0)]);
        // Retention left only markers and a later batch: the expired packets
        // are missed once, then the batch follows.
        let stored = vec![marker(6), marker(6), batch(6, &[1]), marker(7)];
        assert_eq!(replayed(stored, 2, 100).await, vec![(0, 4), (1, 0)]);
        // Only a marker left: nothing retained at or after it.
        assert_eq!(replayed(vec![marker(9)], 9, 100).await, vec![]);
    }
}
