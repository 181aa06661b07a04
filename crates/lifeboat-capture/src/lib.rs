//! Capture of block volumes into recovery points, and the way back.
//!
//! This crate owns the *scan* capture mode: it reads only the data extents
//! of raw images and block devices (SEEK_DATA/SEEK_HOLE, so holes cost
//! nothing), cuts them into the vault's fixed-size chunks, and ships only
//! chunks the vault lacks ([`scan`]). It also restores a volume of a point
//! to a sparse file or a block device, atomically ([`restore`]), and computes
//! the changed byte ranges between two points ([`diff`]).
//!
//! Invariants: a point's manifest is written only after all its chunks; a
//! restore never leaves a half-written file at the destination name.

pub mod diff;
pub mod dirtymap;
pub mod extents;
pub mod fuse;
pub mod journal;
pub mod nbd;
pub mod restore;
pub mod scan;
pub mod splitter;

use lifeboat_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl CaptureError {
    pub(crate) fn io(path: &std::path::Path, op: &'static str, source: std::io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(28) => " (the disk is full: free space or restore elsewhere)",
            Some(13) | Some(1) => " (permission denied: run as a user that can access it)",
            _ => "",
        };
        CaptureError::Io {
            path: format!("{}{hint}", path.display()),
            op,
            source,
        }
    }
}

pub type Result<T, E = CaptureError> = std::result::Result<T, E>;

/// Number of worker threads for the data path.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 16)
}
