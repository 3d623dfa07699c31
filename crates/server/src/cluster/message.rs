//! The JetStream message format of cluster mode: one message per stored
//! batch. Its body is the batch's `SubscribeResponse.packets` records exactly
//! as subscribers receive them, sequences already written in; its headers
//! say where the batch sits in the packet numbering (`Pi-First`, `Pi-Count`)
//! and when its oldest packet arrived (`Pi-Received`). A reader anywhere in
//! the stream numbers what it reads from the headers alone and hands the body
//! to its hub without re-encoding; the body is checked against the headers
//! on the way in, so a message that disagrees with its own headers is never
//! delivered.
//!
//! A message with `Pi-Count: 0` and an empty body is a *marker*: the genesis
//! marker at 1 that anchors an empty stream, or a keepalive tip that a replica
//! stores at the stream's next packet sequence so that `--cluster-max-age`
//! never removes the last message. A marker may stand anywhere in the stream;
//! it decodes as an empty batch, which moves a reader's tip and delivers
//! nothing.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::{
    frame::Channel,
    wire::{read_varint, SequencedBatch},
};

/// First packet sequence of the message.
pub const FIRST: &str = "Pi-First";
/// Packets in the message (0 for a marker: genesis or keepalive tip).
pub const COUNT: &str = "Pi-Count";
/// `received_unix_nanos` of the message's oldest packet.
pub const RECEIVED: &str = "Pi-Received";

const RECORD_TAG: u8 = (1 << 3) | 2;
const SEQUENCE_TAG: u8 = 1 << 3;
const CHANNEL_TAG: u8 = 2 << 3;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("header {0} is missing or not a number")]
    Header(&'static str),
    #[error("body does not hold {count} packets numbered from {first}")]
    Body { first: u64, count: u64 },
}

/// Where a message sits in the packet numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub first: u64,
    pub count: u64,
}

impl Placement {
    /// The first sequence of the message after this one.
    pub fn next(self) -> u64 {
        self.first + self.count
    }
}

fn number(headers: &HeaderMap, name: &'static str) -> Result<u64, MessageError> {
    headers
        .get(name)
        .and_then(|value| value.as_str().parse().ok())
        .ok_or(MessageError::Header(name))
}

/// Reads a message's placement from its headers.
pub fn placement(headers: Option<&HeaderMap>) -> Result<Placement, MessageError> {
    let headers = headers.ok_or(MessageError::Header(FIRST))?;
    Ok(Placement {
        first: number(headers, FIRST)?,
        count: number(headers, COUNT)?,
    })
}

/// Headers for a message holding `batch`.
pub fn headers(batch: &SequencedBatch) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(FIRST, batch.first_sequence.to_string().as_str());
    headers.insert(COUNT, batch.len().to_string().as_str());
    headers.insert(RECEIVED, batch.received_unix_nanos().to_string().as_str());
    headers
}

/// Headers of a marker: an empty message that says the next packet is
/// `next` (no `Pi-Received`: it holds no packet).
pub fn marker_headers(next: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(FIRST, next.to_string().as_str());
    headers.insert(COUNT, "0");
    headers
}

/// Headers of the genesis marker: the marker that anchors numbering at 1.
pub fn genesis_headers() -> HeaderMap {
    marker_headers(1)
}

/// The batch a message holds, checked against its headers: every record is
/// whole and carries the sequence the headers give it.
pub fn decode(headers: Option<&HeaderMap>, body: Bytes) -> Result<SequencedBatch, MessageError> {
    let place = placement(headers)?;
    let received = headers
        .and_then(|headers| headers.get(RECEIVED))
        .and_then(|value| value.as_str().parse::<i64>().ok())
        .unwrap_or(0);
    let bad = MessageError::Body {
        first: place.first,
        count: place.count,
    };
    let mut entries = Vec::with_capacity(place.count as usize);
    let mut at = 0usize;
    while at < body.len() {
        let sequence = place.first + entries.len() as u64;
        let (channel, end) = record_at(&body, at, sequence).ok_or(bad.clone())?;
        let end32 = u32::try_from(end).map_err(|_| bad.clone())?;
        entries.push((channel, end32));
        at = end;
    }
    if entries.len() as u64 != place.count {
        return Err(bad);
    }
    SequencedBatch::from_parts(place.first, body, entries, received).ok_or(bad)
}

/// Checks the record at `at`: its sequence must be `sequence`. Returns its
/// channel and end offset.
fn record_at(body: &[u8], at: usize, sequence: u64) -> Option<(Channel, usize)> {
    if *body.get(at)? != RECORD_TAG {
        return None;
    }
    let (len, used) = read_varint(body.get(at + 1..)?)?;
    let start = at + 1 + used;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    let record = body.get(start..end)?;
    if *record.first()? != SEQUENCE_TAG {
        return None;
    }
    let (stamped, used) = read_varint(&record[1..])?;
    if stamped != sequence {
        return None;
    }
    let rest = &record[1 + used..];
    let channel = match rest.first() {
        Some(&CHANNEL_TAG) => u32::try_from(read_varint(&rest[1..])?.0).ok()?,
        _ => 0,
    };
    Some((Channel(channel), end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::batch as batch_on;

    /// `count` packets from `first`, on channels 0, 1, 2, 0, ...
    fn batch(first: u64, count: usize) -> SequencedBatch {
        let channels: Vec<u32> = (0..count as u32).map(|index| index % 3).collect();
        batch_on(first, &channels)
    }

    #[test]
    fn a_batch_round_trips_through_headers_and_body() {
        for (first, count) in [(1, 1), (120, 20), (16_380, 10), (1 << 40, 3)] {
            let sent = batch(first, count);
            let decoded = decode(Some(&headers(&sent)), sent.body().clone()).expect("decodes");
            assert_eq!(decoded.first_sequence, first);
            assert_eq!(decoded.len(), count);
            assert_eq!(decoded.body(), sent.body());
            assert_eq!(
                decoded.entries().collect::<Vec<_>>(),
                sent.entries().collect::<Vec<_>>()
            );
            assert_eq!(decoded.received_unix_nanos(), 5);
        }
    }

    #[test]
    fn a_body_that_disagrees_with_its_headers_is_refused() {
        let sent = batch(10, 4);
        let mut wrong_first = headers(&sent);
        wrong_first.insert(FIRST, "11");
        assert!(decode(Some(&wrong_first), sent.body().clone()).is_err());
        let mut wrong_count = headers(&sent);
        wrong_count.insert(COUNT, "5");
        assert!(decode(Some(&wrong_count), sent.body().clone()).is_err());
        let cut = sent.body().slice(..sent.body().len() - 1);
        assert!(decode(Some(&headers(&sent)), cut).is_err());
        assert_eq!(
            decode(None, sent.body().clone()).err(),
            Some(MessageError::Header(FIRST))
        );
    }

    #[test]
    fn the_genesis_marker_is_an_empty_batch_at_one() {
        let decoded = decode(Some(&genesis_headers()), Bytes::new()).expect("decodes");
        assert_eq!((decoded.first_sequence, decoded.len()), (1, 0));
    }

    #[test]
    fn a_keepalive_tip_is_an_empty_batch_at_the_next_sequence() {
        let decoded = decode(Some(&marker_headers(4321)), Bytes::new()).expect("decodes");
        assert_eq!(
            (decoded.first_sequence, decoded.end_sequence()),
            (4321, 4321)
        );
        assert!(decoded.is_empty());
        assert_eq!(
            placement(Some(&marker_headers(4321))),
            Ok(Placement {
                first: 4321,
                count: 0
            })
        );
    }

    #[test]
    fn a_marker_with_a_body_is_refused() {
        let records = batch(9, 2).body().clone();
        assert_eq!(
            decode(Some(&marker_headers(9)), records).err(),
            Some(MessageError::Body { first: 9, count: 0 })
        );
    }
}
