//! Recovery-point manifests: what a point holds and where its indexes are.
//!
//! Layout: `MANIFEST_V1 | version u32 | len u32 | JSON body | blake3(body)`,
//! stored sealed as a `Manifest` blob under `points/<point id>`.
//! A manifest is written last and atomically, so a point exists only once
//! every chunk it names is in the vault.

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkId, PointId, VolumeName};
use crate::magic::MANIFEST_V1;
use crate::wire::{decode_framed, encode_framed};
use crate::FormatError;

pub const MANIFEST_VERSION: u32 = 1;

/// How consistent a point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// Volumes read as they were, like a power cut.
    CrashConsistent,
    /// Taken between application freeze/thaw hooks that succeeded.
    AppConsistent,
}

impl std::fmt::Display for PointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PointKind::CrashConsistent => "crash-consistent",
            PointKind::AppConsistent => "app-consistent",
        })
    }
}

/// One volume of a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeEntry {
    pub name: VolumeName,
    /// Nominal size in bytes.
    pub size: u64,
    /// Bytes in data extents (what was read; holes excluded).
    pub data_bytes: u64,
    /// Chunks that are not holes or zero.
    pub data_chunks: u64,
    /// Where the volume was read from (for humans).
    #[serde(default)]
    pub source: String,
    /// The pieces of this volume's encoded [`crate::index::FixedIndex`], in order.
    pub index: Vec<ChunkId>,
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub id: PointId,
    /// Creation time, seconds since the Unix epoch (UTC).
    pub time: u64,
    pub kind: PointKind,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub parent: Option<PointId>,
    #[serde(default)]
    pub hostname: String,
    pub chunk_size: u32,
    /// Journal sequence the point was cut at (continuous replication); none
    /// for scan points.
    #[serde(default)]
    pub journal_seq: Option<u64>,
    pub volumes: Vec<VolumeEntry>,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("manifest serializes");
        encode_framed(&MANIFEST_V1, MANIFEST_VERSION, &body)
    }

    /// # Errors
    /// Bad magic, newer version, checksum mismatch or a malformed body.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (_v, body) = decode_framed("manifest", &MANIFEST_V1, MANIFEST_VERSION, bytes)?;
        let m: Manifest = serde_json::from_slice(body)
            .map_err(|e| FormatError::malformed("manifest", e.to_string()))?;
        if m.volumes.is_empty() {
            return Err(FormatError::malformed("manifest", "no volumes"));
        }
        crate::index::check_chunk_size(m.chunk_size)
            .map_err(|e| FormatError::malformed("manifest", e.to_string()))?;
        Ok(m)
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| v.name.as_str() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            id: PointId::new(1_700_000_000, 42),
            time: 1_700_000_000,
            kind: PointKind::CrashConsistent,
            tags: vec!["nightly".into()],
            parent: None,
            hostname: "db1".into(),
            chunk_size: 65536,
            journal_seq: None,
            volumes: vec![VolumeEntry {
                name: "disk0".parse().unwrap(),
                size: 1 << 30,
                data_bytes: 1 << 20,
                data_chunks: 16,
                source: "/dev/vdb".into(),
                index: vec![ChunkId([3; 32])],
            }],
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let m = sample();
        let enc = m.encode();
        assert_eq!(Manifest::decode(&enc).unwrap(), m);
        assert!(matches!(
            Manifest::decode(&enc[..enc.len() - 5]),
            Err(FormatError::Truncated { .. })
        ));
        let mut newer = enc.clone();
        newer[8] = 9;
        assert!(matches!(
            Manifest::decode(&newer),
            Err(FormatError::UnsupportedVersion { version: 9, .. })
        ));
        let mut flipped = enc.clone();
        flipped[30] ^= 1;
        assert!(matches!(
            Manifest::decode(&flipped),
            Err(FormatError::Checksum { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn framed_garbage_body_is_an_error(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let enc = encode_framed(&MANIFEST_V1, 1, &body);
            prop_assert!(Manifest::decode(&enc).is_err());
        }
    }
}
