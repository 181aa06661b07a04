//! Every on-disk and wire format of Lifeboat, in one place.
//!
//! This crate owns the byte layout of everything Lifeboat writes: sealed
//! blobs, packs and their indexes, the fixed-size chunk index of a volume,
//! recovery-point manifests, the vault config and lock records. It does no
//! I/O and no cryptography; the store crate seals and opens the bytes
//! described here.
//!
//! Invariants:
//! * every format starts with a magic derived from a versioned name (see
//!   [`magic`]) and carries an explicit version number; decoders reject an
//!   unknown (newer) version with [`FormatError::UnsupportedVersion`];
//! * every container with a body carries a BLAKE3 checksum of that body;
//! * decoding never panics, whatever the input (property tests below and the
//!   fuzz targets in `fuzz/` check this): it returns a [`FormatError`] that
//!   names what was being decoded.

pub mod blob;
pub mod config;
pub mod dirtymap;
pub mod error;
pub mod ids;
pub mod index;
pub mod journal;
pub mod lock;
pub mod magic;
pub mod manifest;
pub mod nbd;
pub mod pack;
pub mod proto;
mod wire;

pub use error::FormatError;
pub use ids::{ChunkId, PackId, PointId, VolumeName};

/// Result type of every decoder in this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
