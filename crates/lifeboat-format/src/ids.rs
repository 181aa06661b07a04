//! Newtypes for ids that cross crate boundaries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::FormatError;

fn parse_hex32(what: &'static str, s: &str) -> Result<[u8; 32], FormatError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|e| FormatError::malformed(what, format!("{s:?} is not 64 hex digits: {e}")))?;
    Ok(out)
}

macro_rules! hex32_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &hex::encode(self.0)[..16])
            }
        }
        impl FromStr for $name {
            type Err = FormatError;
            fn from_str(s: &str) -> Result<Self, FormatError> {
                parse_hex32($what, s).map($name)
            }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex32_id!(
    /// Address of a chunk: keyed BLAKE3 of its plaintext. [`ChunkId::ZERO`]
    /// stands for a chunk that is all zeros or a hole; it is never stored.
    ChunkId,
    "chunk id"
);
hex32_id!(
    /// Address of a pack: BLAKE3 of its (encrypted) bytes.
    PackId,
    "pack id"
);

impl ChunkId {
    /// The id of an all-zero chunk (or a hole). Never stored, never read.
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }
}

/// Id of a recovery point: 64 bits shown as 16 hex digits. The high 32 bits
/// are the creation time in seconds, the next 10 the milliseconds, the low 22
/// random, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointId(pub u64);

impl PointId {
    pub fn new(unix_secs: u64, random: u32) -> Self {
        PointId(((unix_secs & 0xffff_ffff) << 32) | random as u64)
    }

    /// An id for a point created now: seconds, milliseconds, randomness.
    pub fn at(unix_millis: u64, random: u32) -> Self {
        let secs = unix_millis / 1000;
        let ms = (unix_millis % 1000) as u32;
        Self::new(secs, (ms << 22) | (random & 0x3f_ffff))
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
impl fmt::Debug for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PointId({self})")
    }
}
impl FromStr for PointId {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, FormatError> {
        if s.len() != 16 {
            return Err(FormatError::malformed(
                "point id",
                format!("{s:?} is not 16 hex digits"),
            ));
        }
        u64::from_str_radix(s, 16)
            .map(PointId)
            .map_err(|e| FormatError::malformed("point id", format!("{s:?}: {e}")))
    }
}
impl Serialize for PointId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
impl<'de> Deserialize<'de> for PointId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Name of a volume inside a recovery point: 1–64 characters of
/// `[A-Za-z0-9._-]`, not starting with `.` (it becomes part of object names).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VolumeName {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, FormatError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(VolumeName(s.to_string()))
        } else {
            Err(FormatError::malformed(
                "volume name",
                format!("{s:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with '.')"),
            ))
        }
    }
}
impl<'de> Deserialize<'de> for VolumeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeName({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let c = ChunkId([7; 32]);
        assert_eq!(c.to_string().parse::<ChunkId>().unwrap(), c);
        let p = PointId::new(1_700_000_000, 0xdead_beef);
        assert_eq!(p.to_string().parse::<PointId>().unwrap(), p);
        assert!(PointId::new(2, 0) > PointId::new(1, u32::MAX));
        assert!(PointId::at(1_000_001, u32::MAX) < PointId::at(1_000_002, 0));
        assert!("x".parse::<PointId>().is_err());
        assert!("zz".parse::<ChunkId>().is_err());
    }

    #[test]
    fn volume_names_are_checked() {
        assert!("disk0".parse::<VolumeName>().is_ok());
        assert!("db-data.raw".parse::<VolumeName>().is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(bad.parse::<VolumeName>().is_err(), "{bad:?}");
        }
    }
}
