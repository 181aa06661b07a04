//! The fixed-size chunk index of one volume in one recovery point.
//!
//! ```text
//! FIXED_INDEX_V1 | version u32 | chunk_size u32 | size u64 | count u64   (32-byte header)
//! | chunk id[32] × count | blake3(entries)[32]
//! ```
//! Entry `i` covers bytes `[i·chunk_size, min((i+1)·chunk_size, size))`.
//! [`ChunkId::ZERO`] marks a hole or an all-zero chunk: stored nowhere.
//!
//! The encoded index is split into chunk-sized pieces that are stored as
//! `Index` chunks, so an index whose regions did not change shares pieces
//! with its parent (a two-level index without a second format).

use crate::ids::ChunkId;
use crate::magic::FIXED_INDEX_V1;
use crate::wire::Reader;
use crate::FormatError;

pub const FIXED_INDEX_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// Check a chunk size: a power of two in `[4 KiB, 16 MiB]`.
///
/// # Errors
/// Any other value.
pub fn check_chunk_size(chunk_size: u32) -> Result<(), FormatError> {
    if chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(FormatError::malformed(
            "chunk size",
            format!("{chunk_size} is not a power of two between 4 KiB and 16 MiB"),
        ))
    }
}

/// Chunk index of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedIndex {
    pub chunk_size: u32,
    pub size: u64,
    pub chunks: Vec<ChunkId>,
}

impl FixedIndex {
    /// An index of `size` bytes that is all holes.
    pub fn empty(chunk_size: u32, size: u64) -> Self {
        let n = Self::count_for(chunk_size, size);
        FixedIndex {
            chunk_size,
            size,
            chunks: vec![ChunkId::ZERO; n as usize],
        }
    }

    pub fn count_for(chunk_size: u32, size: u64) -> u64 {
        size.div_ceil(chunk_size as u64)
    }

    /// Byte range covered by chunk `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<u64> {
        let start = i as u64 * self.chunk_size as u64;
        start..(start + self.chunk_size as u64).min(self.size)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.chunks.len() * 32 + 32);
        out.extend_from_slice(&FIXED_INDEX_V1);
        out.extend_from_slice(&FIXED_INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        let mut h = blake3::Hasher::new();
        for c in &self.chunks {
            out.extend_from_slice(&c.0);
            h.update(&c.0);
        }
        out.extend_from_slice(h.finalize().as_bytes());
        out
    }

    /// # Errors
    /// Bad magic, newer version, bad chunk size, a count that does not match
    /// the size, truncation or checksum mismatch.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "fixed index";
        let mut r = Reader::new(WHAT, bytes);
        r.magic(&FIXED_INDEX_V1)?;
        r.version(FIXED_INDEX_VERSION)?;
        let chunk_size = r.u32()?;
        check_chunk_size(chunk_size).map_err(|e| FormatError::malformed(WHAT, e.to_string()))?;
        let size = r.u64()?;
        let count = r.u64()?;
        if count != Self::count_for(chunk_size, size) {
            return Err(FormatError::malformed(
                WHAT,
                format!("{count} entries do not cover {size} bytes in chunks of {chunk_size}"),
            ));
        }
        let need = count.checked_mul(32).filter(|n| *n <= r.remaining() as u64);
        let Some(need) = need else {
            return Err(FormatError::Truncated {
                what: WHAT,
                need: (HEADER_LEN as u64).saturating_add(count.saturating_mul(32)),
                have: bytes.len() as u64,
            });
        };
        let body = r.bytes(need as usize)?;
        let sum: [u8; 32] = r.array()?;
        if r.remaining() != 0 {
            return Err(FormatError::malformed(WHAT, "trailing bytes"));
        }
        if blake3::hash(body).as_bytes() != &sum {
            return Err(FormatError::Checksum { what: WHAT });
        }
        let chunks = body
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("chunks_exact(32)")))
            .collect();
        Ok(FixedIndex {
            chunk_size,
            size,
            chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let mut ix = FixedIndex::empty(65536, 200_000);
        assert_eq!(ix.chunks.len(), 4);
        ix.chunks[1] = ChunkId([5; 32]);
        assert_eq!(ix.range(3), 196_608..200_000);
        let enc = ix.encode();
        assert_eq!(FixedIndex::decode(&enc).unwrap(), ix);
        let mut bad = enc.clone();
        bad[40] ^= 0xff;
        assert!(matches!(
            FixedIndex::decode(&bad),
            Err(FormatError::Checksum { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = FixedIndex::decode(&bytes);
        }

        #[test]
        fn header_fields_never_panic(cs in any::<u32>(), size in any::<u64>(), count in any::<u64>()) {
            let mut b = FIXED_INDEX_V1.to_vec();
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&cs.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            prop_assert!(FixedIndex::decode(&b).is_err() || count == 0);
        }
    }
}
