//! Protobuf encoding of delivered packets, done once per batch and shared.
//!
//! A `SubscribeResponse` is just `missed` plus concatenated `Packet` records, so
//! the verification stage pre-encodes every field of a packet except `sequence`
//! (fields may appear in any order on the wire) into one buffer per batch. The hub
//! stamps the batch with its first sequence, and each subscriber's encoder writes
//! `tag | len | sequence | pre-encoded body` straight into tonic's buffer: no
//! per-subscriber prost encode, no per-packet allocation. `SubscribeCodec` plugs
//! this into the generated `Subscribe` handler; the bytes it writes decode as the
//! ordinary `packetingest.v1.SubscribeResponse`.

use std::{ops::Range, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};
use tonic::{
    codec::{Codec, EncodeBuf, Encoder},
    Status,
};

use crate::frame::Channel;

const PACKET_SEQUENCE_TAG: u8 = 1 << 3; // field 1, varint
const PACKET_CHANNEL_TAG: u8 = 2 << 3; // field 2, varint
const PACKET_PAYLOAD_TAG: u8 = (3 << 3) | 2; // field 3, length-delimited
const PACKET_DIGEST_TAG: u8 = (4 << 3) | 2;
const PACKET_SOURCE_TAG: u8 = (5 << 3) | 2;
const PACKET_SOURCE_SEQUENCE_TAG: u8 = 6 << 3;
const PACKET_RECEIVED_TAG: u8 = 7 << 3;
const RESPONSE_PACKETS_TAG: u8 = (1 << 3) | 2; // SubscribeResponse.packets
const RESPONSE_MISSED_TAG: u8 = 2 << 3; // SubscribeResponse.missed

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

/// Everything about an accepted packet except its hub sequence.
pub struct PacketFields<'a> {
    pub channel: Channel,
    pub payload: &'a [u8],
    pub digest: &'a [u8; 32],
    pub source: &'a str,
    pub source_sequence: u64,
    pub received_unix_nanos: i64,
}

/// Accepted packets of one batch, pre-encoded (all fields but `sequence`).
#[derive(Debug, Default)]
pub struct EncodedPackets {
    body: Bytes,
    /// Per packet: channel and the end offset of its body in `body`.
    entries: Vec<(Channel, u32)>,
}

impl EncodedPackets {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held by this batch (what memory accounting charges).
    pub fn byte_size(&self) -> usize {
        self.body.len() + self.entries.len() * std::mem::size_of::<(Channel, u32)>()
    }

    pub fn channel(&self, index: usize) -> Channel {
        self.entries[index].0
    }

    fn body(&self, index: usize) -> &[u8] {
        &self.body[self.body_range(index)]
    }

    /// Packet `index`'s encoded fields (a `Packet` message without `sequence`),
    /// sharing this batch's buffer.
    pub fn body_bytes(&self, index: usize) -> Bytes {
        self.body.slice(self.body_range(index))
    }

    fn body_range(&self, index: usize) -> Range<usize> {
        let start = match index {
            0 => 0,
            _ => self.entries[index - 1].1 as usize,
        };
        start..self.entries[index].1 as usize
    }
}

/// Builds an `EncodedPackets` one packet at a time.
pub struct EncodedPacketsBuilder {
    body: BytesMut,
    entries: Vec<(Channel, u32)>,
}

impl EncodedPacketsBuilder {
    pub fn with_capacity(packets: usize, bytes: usize) -> Self {
        EncodedPacketsBuilder {
            body: BytesMut::with_capacity(bytes),
            entries: Vec::with_capacity(packets),
        }
    }

    pub fn push(&mut self, fields: &PacketFields<'_>) {
        let body = &mut self.body;
        if fields.channel.0 != 0 {
            body.put_u8(PACKET_CHANNEL_TAG);
            put_varint(body, u64::from(fields.channel.0));
        }
        if !fields.payload.is_empty() {
            body.put_u8(PACKET_PAYLOAD_TAG);
            put_varint(body, fields.payload.len() as u64);
            body.put_slice(fields.payload);
        }
        body.put_u8(PACKET_DIGEST_TAG);
        body.put_u8(32);
        body.put_slice(fields.digest);
        body.put_u8(PACKET_SOURCE_TAG);
        put_varint(body, fields.source.len() as u64);
        body.put_slice(fields.source.as_bytes());
        if fields.source_sequence != 0 {
            body.put_u8(PACKET_SOURCE_SEQUENCE_TAG);
            put_varint(body, fields.source_sequence);
        }
        if fields.received_unix_nanos != 0 {
            body.put_u8(PACKET_RECEIVED_TAG);
            // int64 travels as its two's-complement u64.
            put_varint(body, fields.received_unix_nanos as u64);
        }
        self.entries.push((fields.channel, body.len() as u32));
    }

    /// Appends a packet already encoded by `push` elsewhere (cluster mode:
    /// the body of a JetStream message).
    pub fn push_encoded(&mut self, channel: Channel, body: &[u8]) {
        self.body.put_slice(body);
        self.entries.push((channel, self.body.len() as u32));
    }

    pub fn finish(self) -> EncodedPackets {
        EncodedPackets {
            body: self.body.freeze(),
            entries: self.entries,
        }
    }
}

/// A batch as the hub stores it: pre-encoded packets plus their first sequence.
#[derive(Debug)]
pub struct SequencedBatch {
    pub first_sequence: u64,
    pub packets: EncodedPackets,
}

impl SequencedBatch {
    /// One past the last sequence in this batch.
    pub fn end_sequence(&self) -> u64 {
        self.first_sequence + self.packets.len() as u64
    }

    /// Encoded size of packet `index` as a `SubscribeResponse.packets` record.
    pub fn record_len(&self, index: usize) -> usize {
        let packet_len = self.packet_len(index);
        1 + varint_len(packet_len as u64) + packet_len
    }

    fn packet_len(&self, index: usize) -> usize {
        let sequence = self.first_sequence + index as u64;
        1 + varint_len(sequence) + self.packets.body(index).len()
    }

    fn encode_record(&self, index: usize, dst: &mut impl BufMut) {
        let sequence = self.first_sequence + index as u64;
        dst.put_u8(RESPONSE_PACKETS_TAG);
        put_varint(dst, self.packet_len(index) as u64);
        dst.put_u8(PACKET_SEQUENCE_TAG);
        put_varint(dst, sequence);
        dst.put_slice(self.packets.body(index));
    }
}

/// Which channels a subscriber wants; empty means all.
#[derive(Clone, Debug, Default)]
pub struct ChannelFilter(Option<Arc<[u32]>>);

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

    pub fn matches(&self, channel: Channel) -> bool {
        match &self.0 {
            None => true,
            Some(channels) => channels.binary_search(&channel.0).is_ok(),
        }
    }
}

/// A run of one stored batch that a subscriber is about to receive.
#[derive(Debug)]
pub struct Segment {
    pub batch: Arc<SequencedBatch>,
    pub range: Range<usize>,
}

/// One `SubscribeResponse` on its way out, encoded lazily by `DeliveryEncoder`.
#[derive(Debug, Default)]
pub struct Delivery {
    pub missed: u64,
    pub segments: Vec<Segment>,
    pub filter: ChannelFilter,
    /// Encoded size of the packet records, computed while collecting.
    pub encoded_len: usize,
}

impl Delivery {
    fn encode(&self, dst: &mut EncodeBuf<'_>) {
        dst.reserve(self.encoded_len + 11);
        if self.missed > 0 {
            dst.put_u8(RESPONSE_MISSED_TAG);
            put_varint(dst, self.missed);
        }
        for segment in &self.segments {
            for index in segment.range.clone() {
                if self.filter.matches(segment.batch.packets.channel(index)) {
                    segment.batch.encode_record(index, dst);
                }
            }
        }
    }
}

/// Writes `Delivery` values as `SubscribeResponse` bytes.
#[derive(Debug, Default)]
pub struct DeliveryEncoder;

impl Encoder for DeliveryEncoder {
    type Item = Delivery;
    type Error = Status;

    fn encode(&mut self, item: Delivery, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst);
        Ok(())
    }
}

/// Codec for `Subscribe`: prost decodes the request, `DeliveryEncoder` writes responses.
#[derive(Debug, Default)]
pub struct SubscribeCodec;

impl Codec for SubscribeCodec {
    type Encode = Delivery;
    type Decode = crate::pb::SubscribeRequest;
    type Encoder = DeliveryEncoder;
    type Decoder = tonic_prost::ProstDecoder<crate::pb::SubscribeRequest>;

    fn encoder(&mut self) -> DeliveryEncoder {
        DeliveryEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}
