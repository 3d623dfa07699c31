//! Producer acknowledgements on the TCP port (SPEC §9). A connection that
//! sends a frame with flag bit 1 gets 28-byte records back, coalesced:
//!
//! ```text
//! offset size field
//! 0      2    magic          "PA"
//! 2      1    version        1
//! 3      1    reserved       0
//! 4      8    settled        frames 0..settled-1 of this connection are settled:
//!                            accepted and durable, or rejected
//! 12     8    last_sequence  sequence of the last accepted frame among them (0: none)
//! 20     8    rejected       frames of this connection rejected so far
//! ```
//!
//! all integers big-endian. Each record supersedes the ones before it.

pub const ACK_LEN: usize = 28;
pub const ACK_MAGIC: [u8; 2] = *b"PA";
pub const ACK_VERSION: u8 = 1;

/// What one acknowledgement record says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    pub settled: u64,
    pub last_sequence: u64,
    pub rejected: u64,
}

impl Ack {
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut record = [0u8; ACK_LEN];
        record[0..2].copy_from_slice(&ACK_MAGIC);
        record[2] = ACK_VERSION;
        record[4..12].copy_from_slice(&self.settled.to_be_bytes());
        record[12..20].copy_from_slice(&self.last_sequence.to_be_bytes());
        record[20..28].copy_from_slice(&self.rejected.to_be_bytes());
        record
    }

    /// Decodes one record; `None` if it is not a version-1 acknowledgement.
    pub fn decode(record: &[u8; ACK_LEN]) -> Option<Ack> {
        if record[0..2] != ACK_MAGIC || record[2] != ACK_VERSION || record[3] != 0 {
            return None;
        }
        let u64_at = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&record[at..at + 8]);
            u64::from_be_bytes(raw)
        };
        Some(Ack {
            settled: u64_at(4),
            last_sequence: u64_at(12),
            rejected: u64_at(20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let ack = Ack {
            settled: 1 << 40,
            last_sequence: u64::MAX,
            rejected: 3,
        };
        let record = ack.encode();
        assert_eq!(&record[0..4], b"PA\x01\x00");
        assert_eq!(Ack::decode(&record), Some(ack));
        let mut bad = record;
        bad[2] = 2;
        assert_eq!(Ack::decode(&bad), None);
    }
}
