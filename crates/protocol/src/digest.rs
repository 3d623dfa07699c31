//! Digests of the wire format (SPEC §2): SHA-256, or HMAC-SHA256 with the
//! deployment key, over header bytes 0..12 and the payload. `Verifier` is
//! what the server checks frames with; `hmac_digest` is what a producer signs
//! with. Comparisons are constant-time; keys are never printed.

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::frame::Frame;

type HmacSha256 = Hmac<Sha256>;

/// Why a well-formed frame was dropped. The connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("digest does not match header and payload")]
    DigestMismatch,
    #[error("plain SHA-256 digest while --require-hmac is set")]
    HmacRequired,
}

impl Rejection {
    pub const ALL: [Rejection; 2] = [Rejection::DigestMismatch, Rejection::HmacRequired];

    /// Stable label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::DigestMismatch => "digest_mismatch",
            Rejection::HmacRequired => "hmac_required",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Checks digests. Holds the HMAC key (pre-keyed state); never prints it.
#[derive(Clone)]
pub struct Verifier {
    hmac: Option<HmacSha256>,
    require_hmac: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hmac_key", &self.hmac.as_ref().map(|_| "<redacted>"))
            .field("require_hmac", &self.require_hmac)
            .finish()
    }
}

impl Verifier {
    pub fn new(hmac_key: Option<&[u8]>, require_hmac: bool) -> Self {
        Verifier {
            // HMAC accepts keys of any length, so this cannot fail.
            hmac: hmac_key.and_then(|key| HmacSha256::new_from_slice(key).ok()),
            require_hmac,
        }
    }

    pub fn has_hmac_key(&self) -> bool {
        self.hmac.is_some()
    }

    pub fn check(&self, frame: &Frame) -> Result<(), Rejection> {
        if !frame.is_hmac() {
            if self.require_hmac {
                return Err(Rejection::HmacRequired);
            }
            let mut hasher = Sha256::new();
            hasher.update(frame.signed_header);
            hasher.update(&frame.payload);
            let computed: [u8; 32] = hasher.finalize().into();
            return match digests_equal(&computed, &frame.digest.0) {
                true => Ok(()),
                false => Err(Rejection::DigestMismatch),
            };
        }
        let Some(keyed) = &self.hmac else {
            // The framer refuses these before they get here; never accept one.
            return Err(Rejection::DigestMismatch);
        };
        let mut mac = keyed.clone();
        mac.update(&frame.signed_header);
        mac.update(&frame.payload);
        mac.verify_slice(&frame.digest.0)
            .map_err(|_| Rejection::DigestMismatch)
    }
}

/// Constant-time equality of two digests: every byte pair is XOR-folded
/// without branching and only the folded value is compared (with `subtle`),
/// several times cheaper than a byte-wise black-boxed comparison.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    difference.ct_eq(&0).into()
}

/// The plain SHA-256 digest of a frame's signed header and payload.
pub fn sha256_digest(signed_header: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(signed_header);
    hasher.update(payload);
    hasher.finalize().into()
}

/// The digest a producer sends for `frame`'s header and payload with `key`.
pub fn hmac_digest(key: &[u8], signed_header: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(signed_header);
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{sha256_frame, signed_header, Channel, Digest, FLAG_HMAC};
    use bytes::Bytes;

    fn hmac_frame(key: &[u8], payload: &'static [u8]) -> Frame {
        let header = signed_header(Channel(3), FLAG_HMAC, payload.len() as u32);
        Frame {
            signed_header: header,
            digest: Digest(hmac_digest(key, &header, payload)),
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn sha256_frame_verifies_and_any_flipped_bit_is_rejected() {
        let verifier = Verifier::new(None, false);
        let frame = sha256_frame(Channel(9), Bytes::from_static(b"payload"));
        assert_eq!(verifier.check(&frame), Ok(()));
        for byte in 0..32 {
            for bit in 0..8 {
                let mut bad = frame.clone();
                bad.digest.0[byte] ^= 1 << bit;
                assert_eq!(verifier.check(&bad), Err(Rejection::DigestMismatch));
            }
        }
        let mut bad_channel = frame.clone();
        bad_channel.signed_header[7] ^= 1;
        assert_eq!(verifier.check(&bad_channel), Err(Rejection::DigestMismatch));
    }

    #[test]
    fn hmac_right_key_wrong_key_and_require_hmac() {
        let verifier = Verifier::new(Some(b"secret"), true);
        assert_eq!(verifier.check(&hmac_frame(b"secret", b"x")), Ok(()));
        assert_eq!(
            verifier.check(&hmac_frame(b"other", b"x")),
            Err(Rejection::DigestMismatch)
        );
        let plain = sha256_frame(Channel(3), Bytes::from_static(b"x"));
        assert_eq!(verifier.check(&plain), Err(Rejection::HmacRequired));
        let keyless = Verifier::new(None, false);
        assert_eq!(
            keyless.check(&hmac_frame(b"secret", b"x")),
            Err(Rejection::DigestMismatch)
        );
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let verifier = Verifier::new(Some(b"topsecretkey"), false);
        assert!(!format!("{verifier:?}").contains("topsecret"));
    }
}
