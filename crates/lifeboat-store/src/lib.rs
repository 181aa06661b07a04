//! The Lifeboat vault: where recovery points live.
//!
//! Owns: backends ([`backend`]), keys and sealing ([`crypto`]), packs and the
//! chunk index ([`vault`]), retention and garbage collection ([`prune`]) and
//! integrity checks ([`verify`]).
//!
//! Guarantees:
//! * every object but `config` is sealed with AES-256-GCM under a key derived
//!   from the master key; chunk ids are keyed hashes of plaintext;
//! * a recovery point's manifest is written only after every chunk and index
//!   piece it names is durably stored, so a crash leaves at worst unreferenced
//!   packs, never a point with missing data;
//! * concurrent writers never corrupt each other: packs are content-addressed
//!   and immutable; prune deletes packs only under the condemned-list rule
//!   (see [`prune`]), so a running `point create` never loses a chunk it
//!   deduplicated against.

pub mod backend;
pub mod crypto;
pub mod error;
pub mod prune;
pub mod vault;
pub mod verify;

pub use backend::{open as open_backend, Backend, BackendError, DynBackend};
pub use error::{Result, StoreError};
pub use vault::{InitOptions, PackWriter, Secret, Vault, WriteStats};

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This machine's host name, for lock records and manifests.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
