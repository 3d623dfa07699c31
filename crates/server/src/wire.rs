//! Protobuf encoding of delivered packets: once per batch, in the very bytes
//! every subscriber receives.
//!
//! A `SubscribeResponse` body is `missed` plus concatenated `packets` records
//! (`0x0A | len | Packet`), and a record's bytes depend only on its packet. So
//! the verification stage encodes each accepted packet's whole record into one
//! buffer per batch, leaving room for `sequence` (field 1, a varint of the width
//! the sequence is expected to need). The hub writes the sequences in when it
//! numbers the batch (`EncodedPackets::stamp`); from then on the batch is
//! immutable and shared. A delivery to a subscriber is a few slices of such
//! batches (one per run of packets its filter takes) behind a small gRPC prefix:
//! nothing is encoded or copied per subscriber, and a stalled stream holds only
//! references to batches the hub accounts for.
//!
//! Hand-written because prost would encode every packet again per subscriber
//! (≈ 50 % more server CPU at 64 B) and cannot write into shared buffers. The
//! tests decode everything written here with prost, at the varint boundaries.

use std::{
    ops::Range,
    sync::{Arc, OnceLock},
};

use bytes::{BufMut, Bytes, BytesMut};

use crate::{
    compression::{CompressionMetrics, Encoding, MIN_COMPRESSED},
    frame::Channel,
};

const PACKET_SEQUENCE_TAG: u8 = 1 << 3; // field 1, varint
const PACKET_CHANNEL_TAG: u8 = 2 << 3; // field 2, varint
const PACKET_PAYLOAD_TAG: u8 = (3 << 3) | 2; // field 3, length-delimited
const PACKET_DIGEST_TAG: u8 = (4 << 3) | 2;
const PACKET_SOURCE_TAG: u8 = (5 << 3) | 2;
const PACKET_SOURCE_SEQUENCE_TAG: u8 = 6 << 3;
const PACKET_RECEIVED_TAG: u8 = 7 << 3;
const RESPONSE_PACKETS_TAG: u8 = (1 << 3) | 2; // SubscribeResponse.packets
const RESPONSE_MISSED_TAG: u8 = 2 << 3; // SubscribeResponse.missed
/// The gRPC message prefix: a compressed flag and a big-endian length.
pub const GRPC_PREFIX_LEN: usize = 5;

/// Bytes a protobuf varint of `value` takes.
pub fn varint_len(value: u64) -> usize {
    // Each byte carries 7 bits; zero still takes one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

pub fn put_varint(dst: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        dst.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    dst.put_u8(value as u8);
}

/// Reads a varint at the front of `src`: (value, bytes used). `None` if cut short.
pub fn read_varint(src: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (index, byte) in src.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

/// The hub's next sequence as last published, readable without its lock:
/// what the verification stage reserves sequence widths by.
#[derive(Clone, Debug, Default)]
pub struct SequenceHint(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl SequenceHint {
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set(&self, next_sequence: u64) {
        self.0
            .store(next_sequence, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Everything about an accepted packet except its hub sequence.
pub struct PacketFields<'a> {
    pub channel: Channel,
    pub payload: &'a [u8],
    pub digest: &'a [u8; 32],
    pub source: &'a str,
    pub source_sequence: u64,
    pub received_unix_nanos: i64,
}

impl PacketFields<'_> {
    /// Encoded size of every field but `sequence` (proto3 omits zero values).
    fn encoded_len(&self) -> usize {
        let mut len = 1 + 1 + 32; // digest
        len += 1 + varint_len(self.source.len() as u64) + self.source.len();
        if self.channel.0 != 0 {
            len += 1 + varint_len(u64::from(self.channel.0));
        }
        if !self.payload.is_empty() {
            len += 1 + varint_len(self.payload.len() as u64) + self.payload.len();
        }
        if self.source_sequence != 0 {
            len += 1 + varint_len(self.source_sequence);
        }
        if self.received_unix_nanos != 0 {
            len += 1 + varint_len(self.received_unix_nanos as u64);
        }
        len
    }

    fn encode(&self, dst: &mut BytesMut) {
        if self.channel.0 != 0 {
            dst.put_u8(PACKET_CHANNEL_TAG);
            put_varint(dst, u64::from(self.channel.0));
        }
        if !self.payload.is_empty() {
            dst.put_u8(PACKET_PAYLOAD_TAG);
            put_varint(dst, self.payload.len() as u64);
            dst.put_slice(self.payload);
        }
        dst.put_u8(PACKET_DIGEST_TAG);
        dst.put_u8(32);
        dst.put_slice(self.digest);
        dst.put_u8(PACKET_SOURCE_TAG);
        put_varint(dst, self.source.len() as u64);
        dst.put_slice(self.source.as_bytes());
        if self.source_sequence != 0 {
            dst.put_u8(PACKET_SOURCE_SEQUENCE_TAG);
            put_varint(dst, self.source_sequence);
        }
        if self.received_unix_nanos != 0 {
            dst.put_u8(PACKET_RECEIVED_TAG);
            // int64 travels as its two's-complement u64.
            put_varint(dst, self.received_unix_nanos as u64);
        }
    }
}

/// Where one packet's record sits in a batch body.
#[derive(Clone, Copy, Debug)]
struct Entry {
    channel: Channel,
    /// End offset of the record in the body.
    end: u32,
}

/// Writes one `packets` record: tag, length, sequence (exactly `width` bytes,
/// so `width` must be `varint_len(sequence)`), then the other fields.
fn put_record(dst: &mut BytesMut, sequence: u64, width: usize, fields: &[u8]) {
    let packet_len = 1 + width + fields.len();
    dst.put_u8(RESPONSE_PACKETS_TAG);
    put_varint(dst, packet_len as u64);
    dst.put_u8(PACKET_SEQUENCE_TAG);
    put_varint(dst, sequence);
    dst.put_slice(fields);
}

/// Accepted packets of one batch, encoded as `packets` records with room for
/// their sequences; the hub numbers them with [`EncodedPackets::stamp`].
#[derive(Debug, Default)]
pub struct EncodedPackets {
    body: Bytes,
    entries: Vec<Entry>,
    /// Varint width reserved for every packet's sequence.
    sequence_width: usize,
    received_unix_nanos: i64,
    /// Set when the records already carry sequences from this one on
    /// (a batch read back from cluster storage): stamping there is free.
    stamped_at: Option<u64>,
}

impl EncodedPackets {
    /// A numbered batch to be handed to the hub again: stamping it at its own
    /// first sequence touches nothing, at another one rewrites the records.
    pub fn from_sequenced(batch: SequencedBatch) -> EncodedPackets {
        EncodedPackets {
            sequence_width: varint_len(batch.first_sequence.max(1)),
            stamped_at: Some(batch.first_sequence),
            body: batch.body,
            entries: batch.entries,
            received_unix_nanos: batch.received_unix_nanos,
        }
    }

    /// Splits the batch into consecutive pieces of at most `max_bytes` of
    /// records each (a single larger record stays whole), sharing the buffer.
    pub fn split(self, max_bytes: usize) -> Vec<EncodedPackets> {
        if self.body.len() <= max_bytes || self.entries.len() <= 1 {
            return vec![self];
        }
        let mut pieces = Vec::new();
        let mut start_packet = 0;
        let mut start_byte = 0usize;
        while start_packet < self.entries.len() {
            let mut end_packet = start_packet;
            while end_packet < self.entries.len()
                && (end_packet == start_packet
                    || self.entries[end_packet].end as usize - start_byte <= max_bytes)
            {
                end_packet += 1;
            }
            let end_byte = self.entries[end_packet - 1].end as usize;
            pieces.push(EncodedPackets {
                body: self.body.slice(start_byte..end_byte),
                entries: self.entries[start_packet..end_packet]
                    .iter()
                    .map(|entry| Entry {
                        channel: entry.channel,
                        end: entry.end - start_byte as u32,
                    })
                    .collect(),
                sequence_width: self.sequence_width,
                received_unix_nanos: self.received_unix_nanos,
                stamped_at: self.stamped_at.map(|first| first + start_packet as u64),
            });
            start_packet = end_packet;
            start_byte = end_byte;
        }
        pieces
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held by this batch (what memory accounting charges).
    pub fn byte_size(&self) -> usize {
        self.body.len() + self.entries.len() * std::mem::size_of::<Entry>()
    }

    pub fn channel(&self, index: usize) -> Channel {
        self.entries[index].channel
    }

    /// When the oldest packet of the batch was received.
    pub fn received_unix_nanos(&self) -> i64 {
        self.received_unix_nanos
    }

    fn record_range(&self, index: usize) -> Range<usize> {
        let start = match index {
            0 => 0,
            _ => self.entries[index - 1].end as usize,
        };
        start..self.entries[index].end as usize
    }

    /// Packet `index`'s fields other than `sequence`: what cluster mode stores
    /// per message, and what `EncodedPacketsBuilder::push_fields` takes back.
    pub fn fields(&self, index: usize) -> &[u8] {
        let record = &self.body[self.record_range(index)];
        fields_of_record(record)
    }

    /// Numbers the packets `first_sequence`, `first_sequence + 1`, … in place.
    /// When a sequence needs another varint width than the one reserved (the
    /// stream crossed 128, 16384, … while the batch was being verified) the
    /// records are rewritten once; otherwise nothing is copied.
    pub fn stamp(self, first_sequence: u64) -> SequencedBatch {
        match self.stamped_at {
            Some(stamped) if stamped == first_sequence => {
                return SequencedBatch {
                    first_sequence,
                    body: self.body,
                    entries: self.entries,
                    received_unix_nanos: self.received_unix_nanos,
                    compressed: Default::default(),
                }
            }
            // Widths were written exactly, not reserved: rewrite the records.
            Some(_) => {
                return Self::restamped(
                    self.body,
                    self.entries,
                    first_sequence,
                    self.received_unix_nanos,
                )
            }
            None => {}
        }
        let count = self.entries.len() as u64;
        let last = first_sequence + count.saturating_sub(1);
        let fits = count == 0
            || (varint_len(first_sequence) == self.sequence_width
                && varint_len(last) == self.sequence_width);
        let mut body = match (fits, self.body.try_into_mut()) {
            (true, Ok(body)) => body,
            (true, Err(shared)) => BytesMut::from(&shared[..]),
            (false, Ok(body)) => {
                return Self::restamped(
                    body.freeze(),
                    self.entries,
                    first_sequence,
                    self.received_unix_nanos,
                )
            }
            (false, Err(shared)) => {
                return Self::restamped(
                    shared,
                    self.entries,
                    first_sequence,
                    self.received_unix_nanos,
                )
            }
        };
        let mut start = 0;
        for (offset, entry) in self.entries.iter().enumerate() {
            // tag, length varint, sequence tag, then the reserved sequence bytes.
            let length_len = read_varint(&body[start + 1..]).map_or(1, |(_, used)| used);
            let at = start + 1 + length_len + 1;
            let mut sequence = &mut body[at..at + self.sequence_width];
            put_varint(&mut sequence, first_sequence + offset as u64);
            start = entry.end as usize;
        }
        SequencedBatch {
            first_sequence,
            body: body.freeze(),
            entries: self.entries,
            received_unix_nanos: self.received_unix_nanos,
            compressed: Default::default(),
        }
    }

    /// The slow path of `stamp`: every record rewritten with exact widths.
    fn restamped(
        body: Bytes,
        entries: Vec<Entry>,
        first_sequence: u64,
        received_unix_nanos: i64,
    ) -> SequencedBatch {
        let mut out = BytesMut::with_capacity(body.len() + entries.len() * 2);
        let mut new_entries = Vec::with_capacity(entries.len());
        let mut start = 0;
        for (offset, entry) in entries.iter().enumerate() {
            let sequence = first_sequence + offset as u64;
            let fields = fields_of_record(&body[start..entry.end as usize]);
            put_record(&mut out, sequence, varint_len(sequence), fields);
            new_entries.push(Entry {
                channel: entry.channel,
                end: out.len() as u32,
            });
            start = entry.end as usize;
        }
        SequencedBatch {
            first_sequence,
            body: out.freeze(),
            entries: new_entries,
            received_unix_nanos,
            compressed: Default::default(),
        }
    }
}

/// The fields after `sequence` in one record written by `put_record`.
fn fields_of_record(record: &[u8]) -> &[u8] {
    let (_, length_len) = read_varint(&record[1..]).unwrap_or((0, 1));
    let sequence_at = 1 + length_len + 1;
    let (_, sequence_len) = read_varint(&record[sequence_at..]).unwrap_or((0, 1));
    &record[sequence_at + sequence_len..]
}

/// Builds an `EncodedPackets` one packet at a time.
pub struct EncodedPacketsBuilder {
    body: BytesMut,
    entries: Vec<Entry>,
    sequence_width: usize,
    received_unix_nanos: i64,
}

impl EncodedPacketsBuilder {
    /// `expected_sequence` is the hub's next sequence as seen now: its varint
    /// width is reserved for every packet (a wrong guess costs one copy).
    pub fn with_capacity(packets: usize, bytes: usize, expected_sequence: u64) -> Self {
        EncodedPacketsBuilder {
            body: BytesMut::with_capacity(bytes),
            entries: Vec::with_capacity(packets),
            sequence_width: varint_len(expected_sequence.max(1)),
            received_unix_nanos: 0,
        }
    }

    pub fn push(&mut self, fields: &PacketFields<'_>) {
        let packet_len = 1 + self.sequence_width + fields.encoded_len();
        self.body
            .reserve(1 + varint_len(packet_len as u64) + packet_len);
        self.body.put_u8(RESPONSE_PACKETS_TAG);
        put_varint(&mut self.body, packet_len as u64);
        self.body.put_u8(PACKET_SEQUENCE_TAG);
        // Placeholder of the reserved width; `stamp` overwrites it.
        for _ in 1..self.sequence_width {
            self.body.put_u8(0x80);
        }
        self.body.put_u8(0);
        fields.encode(&mut self.body);
        self.note(fields.channel, fields.received_unix_nanos);
    }

    /// Appends a packet whose other fields are already encoded (cluster mode:
    /// the body of a JetStream message, as `EncodedPackets::fields` gave it).
    pub fn push_fields(&mut self, channel: Channel, fields: &[u8], received_unix_nanos: i64) {
        let width = self.sequence_width;
        self.body.reserve(fields.len() + 16);
        self.body.put_u8(RESPONSE_PACKETS_TAG);
        put_varint(&mut self.body, (1 + width + fields.len()) as u64);
        self.body.put_u8(PACKET_SEQUENCE_TAG);
        for _ in 1..width {
            self.body.put_u8(0x80);
        }
        self.body.put_u8(0);
        self.body.put_slice(fields);
        self.note(channel, received_unix_nanos);
    }

    fn note(&mut self, channel: Channel, received_unix_nanos: i64) {
        if self.entries.is_empty() {
            self.received_unix_nanos = received_unix_nanos;
        }
        self.entries.push(Entry {
            channel,
            end: self.body.len() as u32,
        });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn finish(self) -> EncodedPackets {
        EncodedPackets {
            body: self.body.freeze(),
            entries: self.entries,
            sequence_width: self.sequence_width,
            received_unix_nanos: self.received_unix_nanos,
            stamped_at: None,
        }
    }
}

/// A numbered batch as the hub keeps it: `packets` records ready to send.
#[derive(Debug)]
pub struct SequencedBatch {
    pub first_sequence: u64,
    body: Bytes,
    entries: Vec<Entry>,
    received_unix_nanos: i64,
    /// The whole batch as one compressed `SubscribeResponse` message, per
    /// encoding, made by the first subscriber that needs it and shared by
    /// the rest (`--compression`).
    compressed: [OnceLock<Bytes>; 2],
}

impl SequencedBatch {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One past the last sequence in this batch.
    pub fn end_sequence(&self) -> u64 {
        self.first_sequence + self.entries.len() as u64
    }

    pub fn channel(&self, index: usize) -> Channel {
        self.entries[index].channel
    }

    pub fn received_unix_nanos(&self) -> i64 {
        self.received_unix_nanos
    }

    /// Bytes held by this batch (what memory accounting charges).
    pub fn byte_size(&self) -> usize {
        self.body.len() + self.entries.len() * std::mem::size_of::<Entry>()
    }

    /// Encoded size of packet `index` as a `SubscribeResponse.packets` record.
    pub fn record_len(&self, index: usize) -> usize {
        self.byte_range(index..index + 1).len()
    }

    fn byte_range(&self, packets: Range<usize>) -> Range<usize> {
        let start = match packets.start {
            0 => 0,
            first => self.entries[first - 1].end as usize,
        };
        let end = match packets.end {
            0 => 0,
            end => self.entries[end - 1].end as usize,
        };
        start..end.max(start)
    }

    /// The largest `end` such that the records of `start..end` take at most
    /// `room` bytes.
    pub fn packets_within(&self, start: usize, room: usize) -> usize {
        let limit = self.byte_range(start..start).start + room;
        start + self.entries[start..].partition_point(|entry| entry.end as usize <= limit)
    }

    /// The records of `packets`, sharing this batch's buffer.
    pub fn records(&self, packets: Range<usize>) -> Bytes {
        self.body.slice(self.byte_range(packets))
    }

    /// All records, e.g. for writing the batch to disk as delivered.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Each packet's channel and the end offset of its record in `body()`:
    /// with `body()`, everything the disk log stores for a batch.
    pub fn entries(&self) -> impl Iterator<Item = (Channel, u32)> + '_ {
        self.entries.iter().map(|entry| (entry.channel, entry.end))
    }

    /// A batch read back from storage. `None` if the entries do not describe
    /// `body` (end offsets increasing, the last one at its end).
    pub fn from_parts(
        first_sequence: u64,
        body: Bytes,
        entries: impl IntoIterator<Item = (Channel, u32)>,
        received_unix_nanos: i64,
    ) -> Option<SequencedBatch> {
        let entries: Vec<Entry> = entries
            .into_iter()
            .map(|(channel, end)| Entry { channel, end })
            .collect();
        let mut previous = 0;
        for entry in &entries {
            if entry.end <= previous {
                return None;
            }
            previous = entry.end;
        }
        if previous as usize != body.len() {
            return None;
        }
        Some(SequencedBatch {
            first_sequence,
            body,
            entries,
            received_unix_nanos,
            compressed: Default::default(),
        })
    }

    /// Consecutive batches as one (copied into one buffer), or `None` if
    /// their numbers do not follow each other.
    pub fn concat(batches: &[SequencedBatch]) -> Option<SequencedBatch> {
        let first = batches.first()?;
        let mut body = BytesMut::with_capacity(batches.iter().map(|batch| batch.body.len()).sum());
        let mut entries = Vec::with_capacity(batches.iter().map(SequencedBatch::len).sum());
        let mut next = first.first_sequence;
        for batch in batches {
            if batch.first_sequence != next {
                return None;
            }
            let base = body.len() as u32;
            body.extend_from_slice(&batch.body);
            entries.extend(batch.entries.iter().map(|entry| Entry {
                channel: entry.channel,
                end: entry.end + base,
            }));
            next = batch.end_sequence();
        }
        Some(SequencedBatch {
            first_sequence: first.first_sequence,
            body: body.freeze(),
            entries,
            received_unix_nanos: first.received_unix_nanos,
            compressed: Default::default(),
        })
    }

    /// True while some delivery still holds part of this batch's buffer.
    pub fn is_referenced_elsewhere(&self) -> bool {
        !self.body.is_unique()
    }
}

/// Which channels a subscriber wants; empty means all.
#[derive(Clone, Debug, Default)]
pub struct ChannelFilter(Option<std::sync::Arc<[u32]>>);

impl ChannelFilter {
    pub fn new(mut channels: Vec<u32>) -> Self {
        if channels.is_empty() {
            return ChannelFilter(None);
        }
        channels.sort_unstable();
        channels.dedup();
        ChannelFilter(Some(channels.into()))
    }

    /// The channels, sorted; `None` means every channel.
    pub fn channels(&self) -> Option<&[u32]> {
        self.0.as_deref()
    }

    /// The same, shared rather than borrowed.
    pub fn shared_channels(&self) -> Option<std::sync::Arc<[u32]>> {
        self.0.clone()
    }

    pub fn matches(&self, channel: Channel) -> bool {
        match &self.0 {
            None => true,
            Some(channels) => channels.binary_search(&channel.0).is_ok(),
        }
    }
}

/// One `SubscribeResponse` on its way out: `missed`, then runs of records
/// shared with the hub's batches.
#[derive(Debug, Default)]
pub struct Delivery {
    pub missed: u64,
    records: Vec<Bytes>,
    records_len: usize,
    packets: usize,
    /// Set while the delivery is exactly one whole batch: its compressed
    /// form can then be shared (see `into_message`).
    whole: Option<Arc<SequencedBatch>>,
}

impl Delivery {
    /// An empty response: the heartbeat of an idle stream.
    pub fn heartbeat() -> Self {
        Delivery::default()
    }

    /// Appends a run of `packets` consecutive records.
    pub fn push(&mut self, records: Bytes, packets: usize) {
        if records.is_empty() {
            return;
        }
        self.records_len += records.len();
        self.packets += packets;
        self.records.push(records);
        self.whole = None;
    }

    /// Appends all of `batch`; if nothing came before, the delivery is that
    /// batch, whose compressed form is shared.
    pub fn push_whole(&mut self, batch: &Arc<SequencedBatch>) {
        let alone = self.packets == 0;
        self.push(batch.body.clone(), batch.len());
        if alone && !batch.is_empty() {
            self.whole = Some(Arc::clone(batch));
        }
    }

    /// True if this delivery is exactly one whole batch.
    pub fn is_whole_batch(&self) -> bool {
        self.whole.is_some()
    }

    /// Whether `into_message` with `encoding` would compress here: false when
    /// it sends the records as they are, or a batch compressed before.
    pub fn needs_compressing(&self, encoding: Encoding) -> bool {
        if self.records_len < MIN_COMPRESSED {
            return false;
        }
        match (&self.whole, self.missed) {
            (Some(batch), 0) => batch.compressed[encoding.index()].get().is_none(),
            _ => true,
        }
    }

    /// The response as chunks to send in order: as `into_chunks`, or, with
    /// `compression`, one compressed message. A whole batch with nothing
    /// missed is compressed once for every subscriber (the batch keeps it);
    /// anything else is compressed here, and small messages not at all.
    pub fn into_message(self, compression: Option<(Encoding, &CompressionMetrics)>) -> Vec<Bytes> {
        let Some((encoding, metrics)) = compression else {
            return self.into_chunks().collect();
        };
        if self.records_len < MIN_COMPRESSED {
            return self.into_chunks().collect();
        }
        if let (Some(batch), 0) = (&self.whole, self.missed) {
            let message = batch.compressed[encoding.index()].get_or_init(|| {
                let message = encoding.compress_message(&batch.body);
                metrics.record(encoding, batch.body.len(), message.len());
                message
            });
            return vec![message.clone()];
        }
        let mut body = BytesMut::with_capacity(self.records_len + 11);
        if self.missed > 0 {
            body.put_u8(RESPONSE_MISSED_TAG);
            put_varint(&mut body, self.missed);
        }
        for records in &self.records {
            body.extend_from_slice(records);
        }
        let message = encoding.compress_message(&body);
        metrics.record(encoding, body.len(), message.len());
        vec![message]
    }

    pub fn packets(&self) -> usize {
        self.packets
    }

    /// Encoded size of the packet records so far.
    pub fn records_len(&self) -> usize {
        self.records_len
    }

    /// The response as gRPC message chunks: a prefix (length and `missed`),
    /// then the shared records, to be sent one after another.
    pub fn into_chunks(self) -> impl Iterator<Item = Bytes> {
        let missed_len = match self.missed {
            0 => 0,
            missed => 1 + varint_len(missed),
        };
        let mut prefix = BytesMut::with_capacity(GRPC_PREFIX_LEN + missed_len);
        prefix.put_u8(0); // not compressed
        prefix.put_u32((missed_len + self.records_len) as u32);
        if self.missed > 0 {
            prefix.put_u8(RESPONSE_MISSED_TAG);
            put_varint(&mut prefix, self.missed);
        }
        std::iter::once(prefix.freeze()).chain(self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{Packet, SubscribeResponse};
    use prost::Message;

    const SOURCE: &str = "tcp/127.0.0.1:5000";

    fn fields(channel: u32, payload: &[u8], source_sequence: u64, nanos: i64) -> PacketFields<'_> {
        PacketFields {
            channel: Channel(channel),
            payload,
            digest: &[7u8; 32],
            source: SOURCE,
            source_sequence,
            received_unix_nanos: nanos,
        }
    }

    fn decode(delivery: Delivery) -> SubscribeResponse {
        let bytes: Vec<u8> = delivery
            .into_chunks()
            .flat_map(|chunk| chunk.to_vec())
            .collect();
        assert_eq!(bytes[0], 0, "uncompressed");
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len, bytes.len() - GRPC_PREFIX_LEN, "prefix length");
        SubscribeResponse::decode(&bytes[GRPC_PREFIX_LEN..]).expect("prost decodes it")
    }

    fn expected(sequence: u64, f: &PacketFields<'_>) -> Packet {
        Packet {
            sequence,
            channel: f.channel.0,
            payload: Bytes::copy_from_slice(f.payload),
            digest: Bytes::copy_from_slice(f.digest),
            source: f.source.to_owned(),
            source_sequence: f.source_sequence,
            received_unix_nanos: f.received_unix_nanos,
        }
    }

    #[test]
    fn varints_match_prost_at_every_width_boundary() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut ours = BytesMut::new();
            put_varint(&mut ours, value);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(value, &mut theirs);
            assert_eq!(&ours[..], &theirs[..], "{value}");
            assert_eq!(varint_len(value), theirs.len(), "{value}");
            assert_eq!(read_varint(&ours), Some((value, theirs.len())));
        }
        assert_eq!(read_varint(&[0x80, 0x80]), None);
    }

    #[test]
    fn records_decode_as_prost_packets_at_boundary_values() {
        let big = vec![0xAB; 200];
        let cases = [
            fields(0, b"", 0, 0),
            fields(1, b"x", 1, 1),
            fields(127, &big[..127], 127, -1),
            fields(128, &big[..128], 128, i64::MIN),
            fields(u32::MAX, &big, u64::MAX, i64::MAX),
        ];
        // First sequences on both sides of each varint width change.
        for first in [1, 126, 127, 128, 16_382, 16_383, 16_384, u64::MAX - 8] {
            for expected_sequence in [1, first, 16_384, u64::MAX - 8] {
                let mut builder = EncodedPacketsBuilder::with_capacity(0, 0, expected_sequence);
                for case in &cases {
                    builder.push(case);
                }
                let batch = builder.finish().stamp(first);
                assert_eq!(batch.first_sequence, first);
                assert_eq!(batch.end_sequence(), first + cases.len() as u64);
                let mut delivery = Delivery::default();
                delivery.push(batch.records(0..batch.len()), batch.len());
                let response = decode(delivery);
                let want: Vec<Packet> = cases
                    .iter()
                    .enumerate()
                    .map(|(offset, case)| expected(first + offset as u64, case))
                    .collect();
                assert_eq!(
                    response.packets, want,
                    "first {first}, guess {expected_sequence}"
                );
                assert_eq!(response.missed, 0);
                for (index, case) in cases.iter().enumerate() {
                    assert_eq!(batch.channel(index), case.channel);
                    let mut alone = Delivery::default();
                    alone.push(batch.records(index..index + 1), 1);
                    assert_eq!(alone.records_len(), batch.record_len(index));
                    assert_eq!(decode(alone).packets, vec![want[index].clone()]);
                }
            }
        }
    }

    #[test]
    fn stamping_in_place_copies_nothing() {
        let mut builder = EncodedPacketsBuilder::with_capacity(2, 256, 300);
        builder.push(&fields(1, b"one", 0, 5));
        builder.push(&fields(2, b"two", 1, 5));
        let packets = builder.finish();
        let before = packets.body.as_ptr();
        let batch = packets.stamp(300);
        assert_eq!(batch.body.as_ptr(), before);
    }

    #[test]
    fn missed_and_runs_of_several_batches_form_one_response() {
        let mut first = EncodedPacketsBuilder::with_capacity(0, 0, 10);
        let mut second = EncodedPacketsBuilder::with_capacity(0, 0, 10);
        for index in 0..4u64 {
            first.push(&fields(index as u32, b"a", index, 9));
            second.push(&fields(index as u32, b"b", index + 4, 9));
        }
        let first = first.finish().stamp(10);
        let second = second.finish().stamp(14);
        let mut delivery = Delivery {
            missed: 300,
            ..Delivery::default()
        };
        delivery.push(first.records(1..2), 1);
        delivery.push(first.records(3..4), 1);
        delivery.push(second.records(0..4), 4);
        delivery.push(second.records(2..2), 0);
        assert_eq!(delivery.packets(), 6);
        let response = decode(delivery);
        assert_eq!(response.missed, 300);
        let sequences: Vec<u64> = response.packets.iter().map(|p| p.sequence).collect();
        assert_eq!(sequences, vec![11, 13, 14, 15, 16, 17]);
    }

    #[test]
    fn heartbeat_is_an_empty_response() {
        let response = decode(Delivery::heartbeat());
        assert_eq!(response, SubscribeResponse::default());
    }

    #[test]
    fn fields_round_trip_through_push_fields() {
        let mut builder = EncodedPacketsBuilder::with_capacity(0, 0, 1);
        builder.push(&fields(9, b"payload", 3, 77));
        let packets = builder.finish();
        let mut again = EncodedPacketsBuilder::with_capacity(0, 0, 200);
        again.push_fields(Channel(9), packets.fields(0), 77);
        let batch = again.finish().stamp(200);
        let mut delivery = Delivery::default();
        delivery.push(batch.records(0..1), 1);
        assert_eq!(
            decode(delivery).packets,
            vec![expected(200, &fields(9, b"payload", 3, 77))]
        );
        assert_eq!(batch.received_unix_nanos(), 77);
    }

    #[test]
    fn only_work_not_done_before_needs_compressing() {
        let payload = [b'a'; 1024];
        let mut builder = EncodedPacketsBuilder::with_capacity(0, 0, 1);
        builder.push(&fields(1, &payload, 0, 1));
        builder.push(&fields(2, &payload, 1, 1));
        let batch = Arc::new(builder.finish().stamp(1));
        let metrics = CompressionMetrics::default();
        let whole = || {
            let mut delivery = Delivery::default();
            delivery.push_whole(&batch);
            delivery
        };
        assert!(whole().needs_compressing(Encoding::Gzip));
        let first = whole().into_message(Some((Encoding::Gzip, &metrics)));
        // The batch keeps its gzip form: the next subscriber takes it as is,
        // and the same bytes; zstd is still to do.
        assert!(!whole().needs_compressing(Encoding::Gzip));
        assert!(whole().needs_compressing(Encoding::Zstd));
        assert_eq!(
            whole().into_message(Some((Encoding::Gzip, &metrics))),
            first
        );
        // Part of a batch is compressed per delivery; small ones never.
        let mut part = Delivery::default();
        part.push(batch.records(0..1), 1);
        assert!(part.needs_compressing(Encoding::Gzip));
        let mut small = EncodedPacketsBuilder::with_capacity(0, 0, 1);
        small.push(&fields(1, b"tiny", 0, 1));
        let small = Arc::new(small.finish().stamp(1));
        let mut tiny = Delivery::default();
        tiny.push_whole(&small);
        assert!(!tiny.needs_compressing(Encoding::Zstd));
    }

    #[test]
    fn a_slice_held_by_a_delivery_marks_the_batch_referenced() {
        let mut builder = EncodedPacketsBuilder::with_capacity(0, 0, 1);
        builder.push(&fields(1, b"x", 0, 1));
        let batch = builder.finish().stamp(1);
        assert!(!batch.is_referenced_elsewhere());
        let held = batch.records(0..1);
        assert!(batch.is_referenced_elsewhere());
        drop(held);
        assert!(!batch.is_referenced_elsewhere());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_packets_stamped_with_any_sequence_decode_as_prost_does(
                packets in proptest::collection::vec(
                    (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..200), any::<u64>(), any::<i64>()),
                    1..20,
                ),
                first in 1..u64::MAX / 2,
                guess in any::<u64>(),
                missed in any::<u64>(),
            ) {
                let mut builder = EncodedPacketsBuilder::with_capacity(0, 0, guess);
                for (channel, payload, source_sequence, nanos) in &packets {
                    builder.push(&fields(*channel, payload, *source_sequence, *nanos));
                }
                let batch = builder.finish().stamp(first);
                let mut delivery = Delivery { missed, ..Delivery::default() };
                delivery.push(batch.records(0..batch.len()), batch.len());
                let response = decode(delivery);
                prop_assert_eq!(response.missed, missed);
                let want: Vec<Packet> = packets
                    .iter()
                    .enumerate()
                    .map(|(offset, (channel, payload, source_sequence, nanos))| {
                        expected(first + offset as u64, &fields(*channel, payload, *source_sequence, *nanos))
                    })
                    .collect();
                prop_assert_eq!(response.packets, want);
            }
        }
    }
}
