//! Reading a `SubscribeResponse` where it lies: a protobuf walker that yields
//! borrowed views of its packets, so the bench's receive path builds no
//! `Packet` values and allocates nothing per packet.
//!
//! Wire format (proto3): a message is a sequence of `tag | value` fields in any
//! order; the tag is `field_number << 3 | wire_type`. `SubscribeResponse` has
//! `packets` (1, length-delimited `Packet`) and `missed` (2, varint); `Packet`
//! has sequence (1), channel (2), payload (3), digest (4), source (5),
//! source_sequence (6) and received_unix_nanos (7). Unknown fields are skipped.

/// One packet as it lies in a `SubscribeResponse`, borrowed from the buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketView<'a> {
    pub sequence: u64,
    pub channel: u32,
    pub payload: &'a [u8],
    pub digest: &'a [u8],
    pub source: &'a [u8],
    pub source_sequence: u64,
    pub received_unix_nanos: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("message ends inside a field")]
    Truncated,
    #[error("varint longer than 10 bytes")]
    VarintTooLong,
    #[error("unsupported wire type {0}")]
    WireType(u8),
}

fn read_varint(buf: &mut &[u8]) -> Result<u64, WalkError> {
    let mut value = 0u64;
    for (position, byte) in buf.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * position);
        if byte & 0x80 == 0 {
            *buf = &buf[position + 1..];
            return Ok(value);
        }
    }
    match buf.len() >= 10 {
        true => Err(WalkError::VarintTooLong),
        false => Err(WalkError::Truncated),
    }
}

fn read_bytes<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], WalkError> {
    let len = usize::try_from(read_varint(buf)?).map_err(|_| WalkError::Truncated)?;
    if len > buf.len() {
        return Err(WalkError::Truncated);
    }
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(field)
}

fn skip_field(buf: &mut &[u8], wire_type: u8) -> Result<(), WalkError> {
    let len = match wire_type {
        0 => return read_varint(buf).map(|_| ()),
        1 => 8,
        2 => return read_bytes(buf).map(|_| ()),
        5 => 4,
        other => return Err(WalkError::WireType(other)),
    };
    if buf.len() < len {
        return Err(WalkError::Truncated);
    }
    *buf = &buf[len..];
    Ok(())
}

/// Splits a tag into (field number, wire type).
fn read_tag(buf: &mut &[u8]) -> Result<(u64, u8), WalkError> {
    let tag = read_varint(buf)?;
    Ok((tag >> 3, (tag & 7) as u8))
}

fn walk_packet(mut buf: &[u8]) -> Result<PacketView<'_>, WalkError> {
    let mut packet = PacketView::default();
    while !buf.is_empty() {
        match read_tag(&mut buf)? {
            (1, 0) => packet.sequence = read_varint(&mut buf)?,
            // uint32 on the wire is a varint; proto3 keeps the low 32 bits.
            (2, 0) => packet.channel = read_varint(&mut buf)? as u32,
            (3, 2) => packet.payload = read_bytes(&mut buf)?,
            (4, 2) => packet.digest = read_bytes(&mut buf)?,
            (5, 2) => packet.source = read_bytes(&mut buf)?,
            (6, 0) => packet.source_sequence = read_varint(&mut buf)?,
            (7, 0) => packet.received_unix_nanos = read_varint(&mut buf)? as i64,
            (_, wire_type) => skip_field(&mut buf, wire_type)?,
        }
    }
    Ok(packet)
}

/// Walks the bytes of one `SubscribeResponse` in place, calling `on_packet`
/// for every packet in order; returns its `missed`. Fields may come in any
/// order, and unknown ones are skipped, as protobuf requires.
pub fn walk_response<'a>(
    mut buf: &'a [u8],
    mut on_packet: impl FnMut(PacketView<'a>),
) -> Result<u64, WalkError> {
    let mut missed = 0;
    while !buf.is_empty() {
        match read_tag(&mut buf)? {
            (1, 2) => on_packet(walk_packet(read_bytes(&mut buf)?)?),
            (2, 0) => missed = read_varint(&mut buf)?,
            (_, wire_type) => skip_field(&mut buf, wire_type)?,
        }
    }
    Ok(missed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use packet_ingest_protocol::pb::{Packet, SubscribeResponse};
    use prost::Message;

    fn packet(sequence: u64, source_sequence: u64) -> Packet {
        Packet {
            sequence,
            channel: 7,
            payload: Bytes::from(vec![1u8; 20]),
            digest: Bytes::from(vec![2u8; 32]),
            source: "tcp/127.0.0.1:5000".to_owned(),
            source_sequence,
            received_unix_nanos: 1_700_000_000_000_000_000,
        }
    }

    #[test]
    fn walker_reads_what_prost_writes() {
        let response = SubscribeResponse {
            packets: vec![packet(1, 0), packet(300, 1), packet(u64::MAX, 2)],
            missed: 5,
        };
        let bytes = response.encode_to_vec();
        let mut seen = Vec::new();
        let missed = walk_response(&bytes, |view| {
            seen.push((
                view.sequence,
                view.channel,
                view.payload.to_vec(),
                view.digest.len(),
                view.source.to_vec(),
                view.source_sequence,
                view.received_unix_nanos,
            ))
        })
        .expect("valid");
        assert_eq!(missed, 5);
        assert_eq!(seen.len(), 3);
        for (view, original) in seen.iter().zip(&response.packets) {
            assert_eq!(view.0, original.sequence);
            assert_eq!(view.1, original.channel);
            assert_eq!(view.2, original.payload.to_vec());
            assert_eq!(view.3, 32);
            assert_eq!(view.4, original.source.as_bytes());
            assert_eq!(view.5, original.source_sequence);
            assert_eq!(view.6, original.received_unix_nanos);
        }
    }

    #[test]
    fn walker_takes_fields_in_any_order_and_skips_unknown_ones() {
        // Packet: source_sequence, an unknown fixed32 (field 9), sequence.
        let packet = [6 << 3, 4, (9 << 3) | 5, 0, 0, 0, 0, 1 << 3, 42];
        let mut response = vec![2 << 3, 3]; // missed first
        response.extend_from_slice(&[(1 << 3) | 2, packet.len() as u8]);
        response.extend_from_slice(&packet);
        response.extend_from_slice(&[(15 << 3) | 1, 0, 0, 0, 0, 0, 0, 0, 0]); // unknown fixed64
        let mut seen = Vec::new();
        let missed = walk_response(&response, |view| seen.push(view)).expect("valid");
        assert_eq!(missed, 3);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].sequence, 42);
        assert_eq!(seen[0].source_sequence, 4);
        assert_eq!(seen[0].channel, 0);
        assert!(seen[0].source.is_empty());
    }

    #[test]
    fn walker_refuses_truncated_and_malformed_input() {
        let bytes = SubscribeResponse {
            packets: vec![packet(1, 0)],
            missed: 0,
        }
        .encode_to_vec();
        for cut in 1..bytes.len() {
            assert!(walk_response(&bytes[..cut], |_| {}).is_err(), "cut {cut}");
        }
        assert_eq!(
            walk_response(&[0xff; 11], |_| {}),
            Err(WalkError::VarintTooLong)
        );
        assert_eq!(
            walk_response(&[(3 << 3) | 3], |_| {}),
            Err(WalkError::WireType(3))
        );
        assert_eq!(walk_response(&[], |_| {}), Ok(0));
    }
}
