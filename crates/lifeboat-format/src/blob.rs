//! Sealed blobs: the unit of encrypted storage.
//!
//! ```text
//! outer:  magic[8] | kind u8 | nonce[12] | ciphertext | tag[16]
//! inner (the plaintext under the AEAD):
//!         compression u8 | raw_len u32 | payload
//! ```
//! The AEAD's associated data is `magic | kind | id`, where `id` is the chunk
//! id for chunks and 32 zero bytes otherwise, so a blob cannot be passed off
//! as another kind or another chunk.

use crate::magic::{BLOB_V1, MAGIC_LEN};
use crate::wire::Reader;
use crate::FormatError;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds around its ciphertext.
pub const OUTER_HEADER_LEN: usize = MAGIC_LEN + 1 + NONCE_LEN;
pub const INNER_HEADER_LEN: usize = 5;
const _: () = assert!(OUTER_HEADER_LEN == 21);
/// Largest raw payload a blob may declare (guards allocations on decode).
pub const MAX_RAW_LEN: u32 = 64 << 20;

/// What a blob holds. Part of the AEAD's associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of volume data.
    Data = 1,
    /// A piece of a volume's fixed index.
    Index = 2,
    /// The index of a pack (in the pack trailer and under `index/`).
    PackIndex = 3,
    /// A recovery-point manifest.
    Manifest = 4,
    /// A lock record.
    Lock = 5,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Result<Self, FormatError> {
        Ok(match v {
            1 => BlobKind::Data,
            2 => BlobKind::Index,
            3 => BlobKind::PackIndex,
            4 => BlobKind::Manifest,
            5 => BlobKind::Lock,
            _ => {
                return Err(FormatError::malformed(
                    "sealed blob",
                    format!("unknown kind {v}"),
                ))
            }
        })
    }
}

/// Compression of a blob's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

/// The parts of a sealed blob, borrowed from its bytes.
#[derive(Debug)]
pub struct SealedParts<'a> {
    pub kind: BlobKind,
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the tag.
    pub ciphertext: &'a [u8],
}

/// Split a sealed blob into its parts.
///
/// # Errors
/// Bad magic, unknown kind, or too short to hold a tag.
pub fn parse_sealed(bytes: &[u8]) -> Result<SealedParts<'_>, FormatError> {
    let mut r = Reader::new("sealed blob", bytes);
    r.magic(&BLOB_V1)?;
    let kind = BlobKind::from_u8(r.u8()?)?;
    let nonce = r.array()?;
    let ciphertext = r.bytes(r.remaining())?;
    if ciphertext.len() < TAG_LEN + INNER_HEADER_LEN {
        return Err(FormatError::Truncated {
            what: "sealed blob",
            need: (OUTER_HEADER_LEN + TAG_LEN + INNER_HEADER_LEN) as u64,
            have: bytes.len() as u64,
        });
    }
    Ok(SealedParts {
        kind,
        nonce,
        ciphertext,
    })
}

/// The outer header of a sealed blob.
pub fn sealed_header(kind: BlobKind, nonce: &[u8; NONCE_LEN]) -> [u8; OUTER_HEADER_LEN] {
    let mut h = [0u8; OUTER_HEADER_LEN];
    h[..MAGIC_LEN].copy_from_slice(&BLOB_V1);
    h[MAGIC_LEN] = kind as u8;
    h[MAGIC_LEN + 1..].copy_from_slice(nonce);
    h
}

/// The associated data of the AEAD for a blob of `kind` with `id`.
pub fn associated_data(kind: BlobKind, id: &[u8; 32]) -> [u8; MAGIC_LEN + 1 + 32] {
    let mut ad = [0u8; MAGIC_LEN + 1 + 32];
    ad[..MAGIC_LEN].copy_from_slice(&BLOB_V1);
    ad[MAGIC_LEN] = kind as u8;
    ad[MAGIC_LEN + 1..].copy_from_slice(id);
    ad
}

/// Inner header: what the payload is compressed with and its raw length.
pub fn inner_header(compression: Compression, raw_len: u32) -> [u8; INNER_HEADER_LEN] {
    let mut h = [0u8; INNER_HEADER_LEN];
    h[0] = compression as u8;
    h[1..].copy_from_slice(&raw_len.to_le_bytes());
    h
}

/// Parse the inner header of a decrypted blob: `(compression, raw_len, payload)`.
///
/// # Errors
/// Unknown compression, raw length over [`MAX_RAW_LEN`], or too short.
pub fn parse_inner(plain: &[u8]) -> Result<(Compression, u32, &[u8]), FormatError> {
    let mut r = Reader::new("blob payload", plain);
    let c = match r.u8()? {
        0 => Compression::None,
        1 => Compression::Zstd,
        v => {
            return Err(FormatError::malformed(
                "blob payload",
                format!("unknown compression {v}"),
            ))
        }
    };
    let raw_len = r.u32()?;
    if raw_len > MAX_RAW_LEN {
        return Err(FormatError::malformed(
            "blob payload",
            format!("raw length {raw_len} over the limit {MAX_RAW_LEN}"),
        ));
    }
    let payload = r.bytes(r.remaining())?;
    if c == Compression::None && payload.len() != raw_len as usize {
        return Err(FormatError::malformed(
            "blob payload",
            "stored length differs from raw length",
        ));
    }
    Ok((c, raw_len, payload))
}

/// A cheap guess that zstd would not shrink the concatenation of `parts`:
/// every one of up to `samples` samples of 4 KiB spread over it has a byte
/// entropy above 7.9 bits (random, compressed or encrypted data). Data
/// under 16 KiB, and data with any sample below that, is worth trying.
/// Sample `i` lies at a fixed pseudo-random place within the `i`th of
/// `samples` equal parts, so data that alternates with the period of the
/// parts (random and text regions of one size) is not sampled in one
/// phase only.
pub fn looks_incompressible(parts: &[&[u8]], samples: usize) -> bool {
    const SAMPLE: usize = 4096;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if total < 4 * SAMPLE {
        return false;
    }
    let n = (total / SAMPLE).min(samples.max(1));
    let step = total / n;
    let mut sample = [0u8; SAMPLE];
    (0..n).all(|i| {
        // the SAMPLE bytes at i * step (+ a jitter after the first) of the
        // concatenation
        let jitter = (i as u64).wrapping_mul(0x9E37_79B9) % (step - SAMPLE + 1) as u64;
        let (mut at, mut got) = (i * step + jitter as usize, 0);
        for p in parts {
            if got == SAMPLE {
                break;
            }
            if at >= p.len() {
                at -= p.len();
                continue;
            }
            let k = (p.len() - at).min(SAMPLE - got);
            sample[got..got + k].copy_from_slice(&p[at..at + k]);
            got += k;
            at = 0;
        }
        let mut hist = [0u32; 256];
        for &b in &sample[..got] {
            hist[b as usize] += 1;
        }
        let entropy: f64 = hist
            .iter()
            .filter(|c| **c > 0)
            .map(|&c| {
                let p = c as f64 / SAMPLE as f64;
                -p * p.log2()
            })
            .sum();
        // 4 KiB of uniform random bytes measures ~7.95 bits (sampling bias)
        entropy > 7.9
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip() {
        let nonce = [9u8; NONCE_LEN];
        let mut b = sealed_header(BlobKind::Index, &nonce).to_vec();
        b.extend_from_slice(&[1u8; 40]);
        let p = parse_sealed(&b).unwrap();
        assert_eq!(p.kind, BlobKind::Index);
        assert_eq!(p.nonce, nonce);
        assert_eq!(p.ciphertext.len(), 40);
        let mut inner = inner_header(Compression::None, 3).to_vec();
        inner.extend_from_slice(b"abc");
        assert_eq!(
            parse_inner(&inner).unwrap(),
            (Compression::None, 3, &b"abc"[..])
        );
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_sealed(&bytes);
            let _ = parse_inner(&bytes);
        }

        /// However the data is split into parts, the guess is the same as
        /// for the whole: random bytes look incompressible, a low-entropy
        /// stretch anywhere a sample falls does not.
        #[test]
        fn incompressible_guess_ignores_the_split(
            seed in any::<u64>(),
            cuts in proptest::collection::vec(0usize..65536, 0..6),
            low_at in proptest::option::of(0usize..8),
        ) {
            let mut x = seed | 1;
            let mut data: Vec<u8> = (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if let Some(k) = low_at {
                // one sample's window (of 8, every 8 KiB) of ASCII digits
                for b in &mut data[k * 8192..k * 8192 + 4096] {
                    *b = b'0' + *b % 10;
                }
            }
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut parts: Vec<&[u8]> = Vec::new();
            let mut prev = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                parts.push(&data[prev..c.max(prev)]);
                prev = c.max(prev);
            }
            let whole = looks_incompressible(&[&data], 8);
            prop_assert_eq!(whole, low_at.is_none());
            prop_assert_eq!(looks_incompressible(&parts, 8), whole);
        }
    }
}
