//! Lock records (`locks/<kind>-<random>`), sealed as `Lock` blobs.
//!
//! Writers (point create) hold a *writer* lock while they run; prune deletes
//! condemned packs only when no writer lock is live. A lock not refreshed for
//! [`STALE_AFTER_SECS`] belongs to a dead process. Lock records and the
//! condemned list are JSON sealed with the vault key (AEAD), not framed with
//! a magic: they are short-lived coordination objects, not data.

use serde::{Deserialize, Serialize};

use crate::FormatError;

/// A lock older than this (since its last refresh) is ignored.
pub const STALE_AFTER_SECS: u64 = 600;
/// How often a holder refreshes its lock.
pub const REFRESH_SECS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockKind {
    /// A writer adding chunks and a manifest.
    Writer,
    /// Prune removing packs.
    Prune,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockRecord {
    pub kind: LockKind,
    pub hostname: String,
    pub pid: u32,
    /// When the holder started (seconds since the epoch).
    pub started: u64,
    /// When the holder last refreshed the lock.
    pub refreshed: u64,
}

impl LockRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("lock serializes")
    }

    /// # Errors
    /// A body that is not a lock record.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        serde_json::from_slice(bytes).map_err(|e| FormatError::malformed("lock", e.to_string()))
    }

    pub fn is_stale(&self, now: u64) -> bool {
        now.saturating_sub(self.refreshed) > STALE_AFTER_SECS
    }
}

/// The condemned-pack list of prune (`condemned`, sealed as a `Lock` blob):
/// packs found unreferenced, with the time they were condemned. Writers never
/// reuse chunks from a condemned (or deleted) pack; prune deletes a
/// condemned pack only when no writer runs and no point references it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condemned {
    /// Condemned packs and when they were condemned.
    pub packs: Vec<(crate::PackId, u64)>,
    /// Tombstones: packs prune deleted, and when. Writers treat them as
    /// condemned, so a writer whose view of `index/` predates the deletion
    /// never uses them; dropped after [`TOMBSTONE_SECS`].
    #[serde(default)]
    pub deleted: Vec<(crate::PackId, u64)>,
}

/// How long a tombstone stays in the condemned list.
pub const TOMBSTONE_SECS: u64 = 86_400;

impl Condemned {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("condemned serializes")
    }
    /// # Errors
    /// A body that is not a condemned list.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        serde_json::from_slice(bytes)
            .map_err(|e| FormatError::malformed("condemned list", e.to_string()))
    }
}
