//! The TCP ingest wire format (SPEC §2): the 44-byte header, an incremental
//! decoder over `BytesMut`, and the encoder producers use.
//!
//! The decoder owns no I/O and does no hashing. It checks every header field as
//! soon as the bytes that carry it have arrived, so garbage and oversized lengths
//! are refused before any payload memory is reserved, and it hands payloads out
//! as zero-copy `Bytes` split off the read buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha2::{Digest as _, Sha256};

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 44;
/// The header prefix covered by the digest: magic, version, flags, channel, length.
pub const SIGNED_HEADER_LEN: usize = 12;
pub const MAGIC: [u8; 2] = *b"PK";
pub const VERSION: u8 = 1;
/// Flags bit 0: the digest is HMAC-SHA256 with the server's key.
pub const FLAG_HMAC: u8 = 0b0000_0001;
/// Flags bit 1: acknowledge this connection (SPEC §9; see [`crate::ack`]).
pub const FLAG_ACK: u8 = 0b0000_0010;
/// Every flag bit this version defines; the others must be 0.
pub const KNOWN_FLAGS: u8 = FLAG_HMAC | FLAG_ACK;
/// Default and usual upper bound for `--max-payload`.
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 20;

/// A channel number, carried by every packet and used by subscribers to filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Channel(pub u32);

/// A SHA-256 or HMAC-SHA256 digest as it travels on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest(pub [u8; 32]);

/// One well-formed frame, not yet verified.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Header bytes 0..12, exactly as received: the digest covers them.
    pub signed_header: [u8; SIGNED_HEADER_LEN],
    pub digest: Digest,
    pub payload: Bytes,
}

impl Frame {
    /// Builds the frame a producer would send; used by Publish, clients and tests.
    pub fn new(channel: Channel, flags: u8, payload: Bytes, digest: Digest) -> Self {
        Frame {
            signed_header: signed_header(channel, flags, payload.len() as u32),
            digest,
            payload,
        }
    }

    pub fn flags(&self) -> u8 {
        self.signed_header[3]
    }

    pub fn is_hmac(&self) -> bool {
        self.flags() & FLAG_HMAC != 0
    }

    /// The producer asks for acknowledgements on this connection.
    pub fn wants_ack(&self) -> bool {
        self.flags() & FLAG_ACK != 0
    }

    pub fn channel(&self) -> Channel {
        Channel(u32::from_be_bytes([
            self.signed_header[4],
            self.signed_header[5],
            self.signed_header[6],
            self.signed_header[7],
        ]))
    }

    /// Bytes this frame occupied on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Appends the frame in wire format to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(self.wire_len());
        dst.put_slice(&self.signed_header);
        dst.put_slice(&self.digest.0);
        dst.put_slice(&self.payload);
    }
}

/// Header bytes 0..12 for the given fields.
pub fn signed_header(channel: Channel, flags: u8, length: u32) -> [u8; SIGNED_HEADER_LEN] {
    let mut header = [0u8; SIGNED_HEADER_LEN];
    header[0..2].copy_from_slice(&MAGIC);
    header[2] = VERSION;
    header[3] = flags;
    header[4..8].copy_from_slice(&channel.0.to_be_bytes());
    header[8..12].copy_from_slice(&length.to_be_bytes());
    header
}

/// A frame with a plain SHA-256 digest, ready to send.
pub fn sha256_frame(channel: Channel, payload: Bytes) -> Frame {
    let header = signed_header(channel, 0, payload.len() as u32);
    let mut hasher = Sha256::new();
    hasher.update(header);
    hasher.update(&payload);
    Frame {
        signed_header: header,
        digest: Digest(hasher.finalize().into()),
        payload,
    }
}

/// Why a byte stream stopped being a valid frame sequence. Each variant closes
/// the connection; digest mismatches are not framing errors (see `verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?}, expected \"PK\"")]
    BadMagic([u8; 2]),
    #[error("unsupported version {0}, expected 1")]
    BadVersion(u8),
    #[error("unknown flag bits {0:#04x}")]
    BadFlags(u8),
    #[error("frame is HMAC-flagged but this server has no HMAC key")]
    HmacNotConfigured,
    #[error("payload length {length} is over the limit of {max} bytes")]
    TooLong { length: u32, max: u32 },
}

impl FrameError {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::BadMagic(_) => "bad_magic",
            FrameError::BadVersion(_) => "bad_version",
            FrameError::BadFlags(_) => "bad_flags",
            FrameError::HmacNotConfigured => "hmac_not_configured",
            FrameError::TooLong { .. } => "too_long",
        }
    }
}

/// What the decoder accepts; fixed for a connection's lifetime.
#[derive(Clone, Copy, Debug)]
pub struct FrameLimits {
    pub max_payload: u32,
    pub hmac_key_configured: bool,
}

impl FrameLimits {
    /// Checks whatever part of the 12-byte signed header `prefix` holds.
    fn check_prefix(&self, prefix: &[u8]) -> Result<Option<u32>, FrameError> {
        if prefix.len() >= 2 && prefix[0..2] != MAGIC {
            return Err(FrameError::BadMagic([prefix[0], prefix[1]]));
        }
        if prefix.len() >= 3 && prefix[2] != VERSION {
            return Err(FrameError::BadVersion(prefix[2]));
        }
        if prefix.len() >= 4 {
            let flags = prefix[3];
            if flags & !KNOWN_FLAGS != 0 {
                return Err(FrameError::BadFlags(flags));
            }
            if flags & FLAG_HMAC != 0 && !self.hmac_key_configured {
                return Err(FrameError::HmacNotConfigured);
            }
        }
        if prefix.len() < SIGNED_HEADER_LEN {
            return Ok(None);
        }
        let length = u32::from_be_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]);
        if length > self.max_payload {
            return Err(FrameError::TooLong {
                length,
                max: self.max_payload,
            });
        }
        Ok(Some(length))
    }
}

/// Incremental decoder: feed it the connection's read buffer after every read.
///
/// Two states, as in tokio-util's length-delimited codec: waiting for a header,
/// or waiting for `frame_len` bytes of a header already validated.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: FrameLimits,
    pending_frame_len: Option<usize>,
}

impl FrameDecoder {
    pub fn new(limits: FrameLimits) -> Self {
        FrameDecoder {
            limits,
            pending_frame_len: None,
        }
    }

    /// Splits the next complete frame off the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed. After an error the stream is
    /// unusable: the caller closes the connection.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let frame_len = match self.pending_frame_len {
            Some(len) => len,
            None => {
                let prefix = &buf[..buf.len().min(SIGNED_HEADER_LEN)];
                match self.limits.check_prefix(prefix)? {
                    Some(length) => {
                        let len = HEADER_LEN + length as usize;
                        self.pending_frame_len = Some(len);
                        len
                    }
                    None => return Ok(None),
                }
            }
        };
        if buf.len() < frame_len {
            return Ok(None);
        }
        self.pending_frame_len = None;
        let mut signed_header = [0u8; SIGNED_HEADER_LEN];
        signed_header.copy_from_slice(&buf[..SIGNED_HEADER_LEN]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&buf[SIGNED_HEADER_LEN..HEADER_LEN]);
        // Copy the 44 header bytes, then split off only the payload: one
        // shared-buffer handle per frame instead of two.
        buf.advance(HEADER_LEN);
        Ok(Some(Frame {
            signed_header,
            digest: Digest(digest),
            payload: buf.split_to(frame_len - HEADER_LEN).freeze(),
        }))
    }

    /// Bytes still needed to finish the frame in progress, if its header is known.
    pub fn pending_frame_len(&self) -> Option<usize> {
        self.pending_frame_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FrameLimits = FrameLimits {
        max_payload: 1024,
        hmac_key_configured: false,
    };

    fn stream_of(frames: &[Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for frame in frames {
            frame.encode(&mut out);
        }
        out
    }

    fn sample_frames() -> Vec<Frame> {
        vec![
            sha256_frame(Channel(1), Bytes::from_static(b"hello")),
            sha256_frame(Channel(0), Bytes::new()),
            sha256_frame(Channel(u32::MAX), Bytes::from(vec![7u8; 300])),
            sha256_frame(Channel(42), Bytes::from_static(b"x")),
        ]
    }

    fn decode_all(
        decoder: &mut FrameDecoder,
        buf: &mut BytesMut,
    ) -> Result<Vec<Frame>, FrameError> {
        let mut out = Vec::new();
        while let Some(frame) = decoder.decode(buf)? {
            out.push(frame);
        }
        Ok(out)
    }

    fn same(a: &Frame, b: &Frame) -> bool {
        a.signed_header == b.signed_header && a.digest == b.digest && a.payload == b.payload
    }

    #[test]
    fn stream_split_at_every_byte_boundary_decodes_identically() {
        let frames = sample_frames();
        let wire = stream_of(&frames);
        for split in 0..=wire.len() {
            let mut decoder = FrameDecoder::new(LIMITS);
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = decode_all(&mut decoder, &mut buf).expect("valid prefix");
            buf.extend_from_slice(&wire[split..]);
            got.extend(decode_all(&mut decoder, &mut buf).expect("valid rest"));
            assert!(buf.is_empty(), "split {split}: leftover bytes");
            assert_eq!(got.len(), frames.len(), "split {split}");
            assert!(frames.iter().zip(&got).all(|(a, b)| same(a, b)));
        }
    }

    #[test]
    fn stream_fed_one_byte_at_a_time_decodes_identically() {
        let frames = sample_frames();
        let wire = stream_of(&frames);
        let mut decoder = FrameDecoder::new(LIMITS);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire.iter() {
            buf.extend_from_slice(&[*byte]);
            got.extend(decode_all(&mut decoder, &mut buf).expect("valid"));
        }
        assert_eq!(got.len(), frames.len());
        assert!(frames.iter().zip(&got).all(|(a, b)| same(a, b)));
    }

    #[test]
    fn header_fields_round_trip() {
        let frame = sha256_frame(Channel(0xDEAD_BEEF), Bytes::from_static(b"abc"));
        assert_eq!(frame.channel(), Channel(0xDEAD_BEEF));
        assert_eq!(frame.flags(), 0);
        assert_eq!(frame.wire_len(), HEADER_LEN + 3);
        let wire = stream_of(&[frame]);
        assert_eq!(&wire[0..4], b"PK\x01\x00");
        assert_eq!(&wire[8..12], &3u32.to_be_bytes());
    }

    #[test]
    fn garbage_is_refused_at_the_first_byte_pair() {
        let mut decoder = FrameDecoder::new(LIMITS);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert_eq!(
            decoder.decode(&mut buf).unwrap_err(),
            FrameError::BadMagic(*b"GE")
        );
    }

    #[test]
    fn bad_version_and_flags_are_refused() {
        let mut header = signed_header(Channel(1), 0, 0);
        header[2] = 2;
        let mut buf = BytesMut::from(&header[..]);
        assert_eq!(
            FrameDecoder::new(LIMITS).decode(&mut buf).unwrap_err(),
            FrameError::BadVersion(2)
        );
        let header = signed_header(Channel(1), 0b100, 0);
        let mut buf = BytesMut::from(&header[..4]);
        assert_eq!(
            FrameDecoder::new(LIMITS).decode(&mut buf).unwrap_err(),
            FrameError::BadFlags(0b100)
        );
    }

    #[test]
    fn hmac_flag_without_key_is_refused_but_allowed_with_one() {
        let header = signed_header(Channel(1), FLAG_HMAC, 0);
        let mut buf = BytesMut::from(&header[..]);
        assert_eq!(
            FrameDecoder::new(LIMITS).decode(&mut buf).unwrap_err(),
            FrameError::HmacNotConfigured
        );
        let with_key = FrameLimits {
            hmac_key_configured: true,
            ..LIMITS
        };
        let mut wire = BytesMut::from(&header[..]);
        wire.extend_from_slice(&[0u8; 32]);
        let frame = FrameDecoder::new(with_key)
            .decode(&mut wire)
            .expect("valid")
            .expect("complete");
        assert!(frame.is_hmac());
    }

    #[test]
    fn oversized_length_closes_before_allocating() {
        let header = signed_header(Channel(1), 0, u32::MAX);
        let mut buf = BytesMut::from(&header[..]);
        let capacity_before = buf.capacity();
        let err = FrameDecoder::new(LIMITS).decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLong {
                length: u32::MAX,
                max: 1024
            }
        );
        assert_eq!(buf.capacity(), capacity_before);
    }

    #[test]
    fn truncated_frame_stays_pending() {
        let wire = stream_of(&sample_frames()[..1]);
        let mut decoder = FrameDecoder::new(LIMITS);
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        assert!(decoder.decode(&mut buf).expect("valid").is_none());
        assert_eq!(decoder.pending_frame_len(), Some(wire.len()));
        assert_eq!(buf.len(), wire.len() - 1);
    }

    #[test]
    fn payload_is_a_zero_copy_slice_of_the_read_buffer() {
        let wire = stream_of(&sample_frames()[2..3]);
        let mut buf = BytesMut::from(&wire[..]);
        let start = buf.as_ptr() as usize;
        let frame = FrameDecoder::new(LIMITS)
            .decode(&mut buf)
            .expect("valid")
            .expect("complete");
        assert_eq!(frame.payload.as_ptr() as usize, start + HEADER_LEN);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn arbitrary_frame() -> impl Strategy<Value = Frame> {
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(channel, payload)| sha256_frame(Channel(channel), Bytes::from(payload)))
        }

        /// Feeds `wire` cut at `cuts` (offsets, any order); returns the frames
        /// and the first error.
        fn feed(wire: &[u8], cuts: &[usize]) -> (Vec<Frame>, Option<FrameError>) {
            let mut points: Vec<usize> = cuts.iter().map(|cut| cut % (wire.len() + 1)).collect();
            points.push(wire.len());
            points.sort_unstable();
            let mut decoder = FrameDecoder::new(LIMITS);
            let mut buf = BytesMut::new();
            let mut frames = Vec::new();
            let mut start = 0;
            for end in points {
                buf.extend_from_slice(&wire[start..end]);
                start = end;
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) => break,
                        Err(error) => return (frames, Some(error)),
                    }
                }
            }
            (frames, None)
        }

        proptest! {
            #[test]
            fn valid_streams_decode_the_same_however_they_are_split(
                frames in proptest::collection::vec(arbitrary_frame(), 0..8),
                cuts in proptest::collection::vec(any::<usize>(), 0..12),
            ) {
                let wire = stream_of(&frames);
                let (got, error) = feed(&wire, &cuts);
                prop_assert!(error.is_none());
                prop_assert_eq!(got.len(), frames.len());
                for (a, b) in frames.iter().zip(&got) {
                    prop_assert!(same(a, b));
                }
            }

            #[test]
            fn arbitrary_bytes_give_the_same_outcome_whatever_the_split(
                bytes in proptest::collection::vec(any::<u8>(), 0..600),
                cuts in proptest::collection::vec(any::<usize>(), 0..12),
            ) {
                let (whole, whole_error) = feed(&bytes, &[]);
                let (split, split_error) = feed(&bytes, &cuts);
                prop_assert_eq!(whole_error, split_error);
                prop_assert_eq!(whole.len(), split.len());
                for (a, b) in whole.iter().zip(&split) {
                    prop_assert!(same(a, b));
                }
            }

            #[test]
            fn a_valid_prefix_followed_by_garbage_keeps_the_valid_frames(
                frames in proptest::collection::vec(arbitrary_frame(), 1..5),
                garbage in proptest::collection::vec(any::<u8>(), 1..100),
                cuts in proptest::collection::vec(any::<usize>(), 0..8),
            ) {
                let mut wire = stream_of(&frames).to_vec();
                wire.extend_from_slice(&garbage);
                let (got, _) = feed(&wire, &cuts);
                prop_assert!(got.len() >= frames.len());
                for (a, b) in frames.iter().zip(&got) {
                    prop_assert!(same(a, b));
                }
            }
        }
    }
}
