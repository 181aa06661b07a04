//! The splitter's persistent dirty map: one bit per chunk of a volume, set
//! before a write to that chunk is acknowledged (written, not synced: exact
//! after a process crash; a machine crash makes the agent compare every
//! chunk), cleared when the recovery site holds the chunk. After a crash or a
//! journal overflow, only chunks whose bit is set need a resync.
//!
//! ```text
//! DIRTY_MAP_V1 | version u32 | chunk_size u32 | size u64 | blake3(header)[..8]   (32 bytes)
//! | bitmap: ceil(chunks / 8) bytes, bit i of byte i/8 (LSB first) = chunk i
//! ```
//! The bitmap has no checksum: it is updated in place a byte at a time, and
//! a damaged bitmap can only make a resync larger (a reader that doubts it
//! treats every chunk as dirty).

use crate::index::check_chunk_size;
use crate::magic::DIRTY_MAP_V1;
use crate::wire::Reader;
use crate::FormatError;

pub const DIRTY_MAP_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;

/// Parameters of a dirty map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyMapHeader {
    pub chunk_size: u32,
    pub size: u64,
}

impl DirtyMapHeader {
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }
    pub fn bitmap_len(&self) -> u64 {
        self.chunks().div_ceil(8)
    }
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&DIRTY_MAP_V1);
        h[8..12].copy_from_slice(&DIRTY_MAP_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.size.to_le_bytes());
        let sum = blake3::hash(&h[..24]);
        h[24..].copy_from_slice(&sum.as_bytes()[..8]);
        h
    }

    /// # Errors
    /// Bad magic, newer version, bad chunk size or a header checksum mismatch.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "dirty map";
        let mut r = Reader::new(WHAT, bytes);
        r.magic(&DIRTY_MAP_V1)?;
        r.version(DIRTY_MAP_VERSION)?;
        let chunk_size = r.u32()?;
        let size = r.u64()?;
        let sum: [u8; 8] = r.array()?;
        if blake3::hash(&bytes[..24]).as_bytes()[..8] != sum {
            return Err(FormatError::Checksum { what: WHAT });
        }
        check_chunk_size(chunk_size).map_err(|e| FormatError::malformed(WHAT, e.to_string()))?;
        Ok(DirtyMapHeader { chunk_size, size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trip() {
        let h = DirtyMapHeader {
            chunk_size: 65536,
            size: (1 << 30) + 1,
        };
        assert_eq!(DirtyMapHeader::decode(&h.encode()).unwrap(), h);
        assert_eq!(h.chunks(), 16385);
        assert_eq!(h.bitmap_len(), 2049);
        let mut bad = h.encode();
        bad[20] ^= 1;
        assert!(DirtyMapHeader::decode(&bad).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = DirtyMapHeader::decode(&bytes);
        }
    }
}
