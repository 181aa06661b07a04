//! Packs: many sealed blobs in one object, so object stores see few large
//! writes instead of one small object per chunk.
//!
//! ```text
//! pack:       PACK_V1 | blob_1 | … | blob_n | trailer | trailer_len u32 | PACK_END_V1
//!             (trailer = the pack index, sealed as a PackIndex blob)
//! pack index: PACK_INDEX_V1 | version u32 | count u32 | entry × count | blake3(entries)
//! entry:      id[32] | kind u8 | offset u64 | len u32 | raw_len u32     (49 bytes)
//! ```
//! The pack index is also stored, sealed, as its own object (`index/<pack>`)
//! so a vault opens by reading indexes only; the trailer lets a lost index be
//! rebuilt from the pack alone.

use crate::blob::{BlobKind, MAX_RAW_LEN};
use crate::ids::ChunkId;
use crate::magic::{PACK_END_V1, PACK_INDEX_V1, PACK_V1};
use crate::wire::Reader;
use crate::FormatError;

pub const PACK_INDEX_VERSION: u32 = 1;
pub const ENTRY_LEN: usize = 32 + 1 + 8 + 4 + 4;
const _: () = assert!(ENTRY_LEN == 49);
/// Bytes at the end of a pack after its trailer: `trailer_len u32 | magic`.
pub const PACK_TAIL_LEN: usize = 4 + 8;
pub const PACK_HEADER: [u8; 8] = PACK_V1;

/// Where one blob lives inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub kind: BlobKind,
    pub offset: u64,
    pub len: u32,
    pub raw_len: u32,
}

/// Encode a pack index.
pub fn encode_pack_index(entries: &[PackEntry]) -> Vec<u8> {
    let mut body = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        body.extend_from_slice(&e.id.0);
        body.push(e.kind as u8);
        body.extend_from_slice(&e.offset.to_le_bytes());
        body.extend_from_slice(&e.len.to_le_bytes());
        body.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    let mut out = Vec::with_capacity(body.len() + 48);
    out.extend_from_slice(&PACK_INDEX_V1);
    out.extend_from_slice(&PACK_INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out
}

/// Decode a pack index.
///
/// # Errors
/// Bad magic, newer version, truncation, checksum mismatch or an entry that
/// is out of bounds.
pub fn decode_pack_index(bytes: &[u8]) -> Result<Vec<PackEntry>, FormatError> {
    const WHAT: &str = "pack index";
    let mut r = Reader::new(WHAT, bytes);
    r.magic(&PACK_INDEX_V1)?;
    r.version(PACK_INDEX_VERSION)?;
    let count = r.u32()? as usize;
    let body = r.bytes(count.saturating_mul(ENTRY_LEN))?;
    let sum: [u8; 32] = r.array()?;
    if r.remaining() != 0 {
        return Err(FormatError::malformed(WHAT, "trailing bytes"));
    }
    if blake3::hash(body).as_bytes() != &sum {
        return Err(FormatError::Checksum { what: WHAT });
    }
    let mut out = Vec::with_capacity(count);
    let mut br = Reader::new(WHAT, body);
    for _ in 0..count {
        let id = ChunkId(br.array()?);
        let kind = BlobKind::from_u8(br.u8()?)?;
        let offset = br.u64()?;
        let len = br.u32()?;
        let raw_len = br.u32()?;
        if raw_len > MAX_RAW_LEN || offset < PACK_HEADER.len() as u64 {
            return Err(FormatError::malformed(WHAT, "entry out of bounds"));
        }
        out.push(PackEntry {
            id,
            kind,
            offset,
            len,
            raw_len,
        });
    }
    Ok(out)
}

/// Find the trailer (the sealed pack index) of a whole pack.
///
/// # Errors
/// Bad magics or a trailer length that does not fit.
pub fn pack_trailer(pack: &[u8]) -> Result<&[u8], FormatError> {
    const WHAT: &str = "pack";
    let min = PACK_HEADER.len() + PACK_TAIL_LEN;
    if pack.len() < min {
        return Err(FormatError::Truncated {
            what: WHAT,
            need: min as u64,
            have: pack.len() as u64,
        });
    }
    let mut r = Reader::new(WHAT, pack);
    r.magic(&PACK_V1)?;
    let tail = &pack[pack.len() - PACK_TAIL_LEN..];
    let mut tr = Reader::new(WHAT, tail);
    let tlen = tr.u32()? as usize;
    tr.magic(&PACK_END_V1)?;
    let end = pack.len() - PACK_TAIL_LEN;
    if tlen > end - PACK_HEADER.len() {
        return Err(FormatError::malformed(WHAT, "trailer length out of bounds"));
    }
    Ok(&pack[end - tlen..end])
}

/// The tail to append after a pack's trailer.
pub fn pack_tail(trailer_len: u32) -> [u8; PACK_TAIL_LEN] {
    let mut t = [0u8; PACK_TAIL_LEN];
    t[..4].copy_from_slice(&trailer_len.to_le_bytes());
    t[4..].copy_from_slice(&PACK_END_V1);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn index_round_trip_and_damage() {
        let entries = vec![
            PackEntry {
                id: ChunkId([1; 32]),
                kind: BlobKind::Data,
                offset: 8,
                len: 100,
                raw_len: 65536,
            },
            PackEntry {
                id: ChunkId([2; 32]),
                kind: BlobKind::Index,
                offset: 108,
                len: 50,
                raw_len: 50,
            },
        ];
        let enc = encode_pack_index(&entries);
        assert_eq!(decode_pack_index(&enc).unwrap(), entries);
        let mut bad = enc.clone();
        bad[20] ^= 1;
        assert_eq!(
            decode_pack_index(&bad),
            Err(FormatError::Checksum { what: "pack index" })
        );
        assert!(matches!(
            decode_pack_index(&enc[..enc.len() - 1]),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn trailer_is_found() {
        let mut pack = PACK_HEADER.to_vec();
        pack.extend_from_slice(b"blobs");
        pack.extend_from_slice(b"trailer");
        pack.extend_from_slice(&pack_tail(7));
        assert_eq!(pack_trailer(&pack).unwrap(), b"trailer");
        let mut bad = pack.clone();
        let n = bad.len();
        bad[n - PACK_TAIL_LEN] = 200;
        assert!(pack_trailer(&bad).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_pack_index(&bytes);
            let _ = pack_trailer(&bytes);
        }

        #[test]
        fn count_field_cannot_force_huge_allocation(count in any::<u32>()) {
            let mut b = PACK_INDEX_V1.to_vec();
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            prop_assert!(decode_pack_index(&b).is_err() || count == 0);
        }
    }
}
