//! Magic numbers of every Lifeboat format.
//!
//! DO NOT MODIFY these values: they are on disk in every vault ever written.
//! Each magic is the first 8 bytes of BLAKE3 of a versioned name (checked by
//! the test below), so a new incompatible layout gets a new name and magic,
//! and old ones stay readable through an explicit upgrade path.

/// `blake3("lifeboat sealed blob v1")[..8]` — an encrypted, compressed blob.
pub const BLOB_V1: [u8; 8] = [0xc8, 0xac, 0x73, 0xf9, 0xd8, 0x73, 0x2c, 0x1c];
/// `blake3("lifeboat pack v1")[..8]` — start of a pack of blobs.
pub const PACK_V1: [u8; 8] = [0x7e, 0x19, 0xcf, 0x13, 0xd3, 0x08, 0x2f, 0x09];
/// `blake3("lifeboat pack end v1")[..8]` — last 8 bytes of a pack.
pub const PACK_END_V1: [u8; 8] = [0x02, 0x52, 0x3b, 0xbc, 0xb7, 0x8a, 0xb0, 0xab];
/// `blake3("lifeboat pack index v1")[..8]` — list of the blobs of one pack.
pub const PACK_INDEX_V1: [u8; 8] = [0xe1, 0x4d, 0xf9, 0xbc, 0x8b, 0xb7, 0xa4, 0xc1];
/// `blake3("lifeboat fixed index v1")[..8]` — chunk index of one volume.
pub const FIXED_INDEX_V1: [u8; 8] = [0xab, 0xe8, 0x90, 0x2f, 0x78, 0xf6, 0x65, 0xa0];
/// `blake3("lifeboat manifest v1")[..8]` — a recovery-point manifest.
pub const MANIFEST_V1: [u8; 8] = [0x7d, 0xf2, 0x9f, 0x19, 0x09, 0xdc, 0x33, 0x3b];
/// `blake3("lifeboat vault config v1")[..8]` — the vault config object.
pub const CONFIG_V1: [u8; 8] = [0xa8, 0x79, 0xd9, 0xad, 0x3e, 0x6e, 0xc4, 0xf3];

/// `blake3("lifeboat journal segment v1")[..8]` — a write-journal segment.
pub const JOURNAL_V1: [u8; 8] = [0x57, 0x72, 0x8b, 0x77, 0x71, 0x49, 0x36, 0x82];

/// `blake3("lifeboat dirty map v1")[..8]` — the splitter's persistent dirty map.
pub const DIRTY_MAP_V1: [u8; 8] = [0x1b, 0xc8, 0x40, 0xc8, 0x29, 0x4d, 0xff, 0x36];

/// `blake3("lifeboat replication v1")[..8]` — first frame of a replication stream.
pub const REPLICATION_V1: [u8; 8] = [0xfe, 0xc9, 0x39, 0x9d, 0xd6, 0xc0, 0xef, 0xe7];

/// Size of every magic.
pub const MAGIC_LEN: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn derive(name: &str) -> [u8; 8] {
        let h = blake3::hash(name.as_bytes());
        h.as_bytes()[..8].try_into().unwrap()
    }

    #[test]
    fn magics_are_derived_from_their_names() {
        assert_eq!(BLOB_V1, derive("lifeboat sealed blob v1"));
        assert_eq!(PACK_V1, derive("lifeboat pack v1"));
        assert_eq!(PACK_END_V1, derive("lifeboat pack end v1"));
        assert_eq!(PACK_INDEX_V1, derive("lifeboat pack index v1"));
        assert_eq!(FIXED_INDEX_V1, derive("lifeboat fixed index v1"));
        assert_eq!(MANIFEST_V1, derive("lifeboat manifest v1"));
        assert_eq!(CONFIG_V1, derive("lifeboat vault config v1"));
        assert_eq!(JOURNAL_V1, derive("lifeboat journal segment v1"));
        assert_eq!(DIRTY_MAP_V1, derive("lifeboat dirty map v1"));
        assert_eq!(REPLICATION_V1, derive("lifeboat replication v1"));
    }
}
