//! Where vault objects live: the [`Backend`] trait and its implementations.
//!
//! Keys are `/`-separated relative names (`config`, `packs/ab/<id>`, …).
//! Every implementation guarantees that [`Backend::put`] is atomic: a reader
//! sees the whole object or none of it, never a prefix (local: temporary
//! file, fsync, rename, fsync of the directory; object stores: a single PUT).
//!
//! Implementations: [`local::LocalBackend`], [`memory::MemoryBackend`],
//! [`object::ObjectBackend`] (S3, Azure Blob, GCS via `object_store`).
//! Wrappers add behaviour around any backend: [`fault::FaultBackend`]
//! injects failures for tests.

pub mod fault;
pub mod local;
pub mod memory;
pub mod object;

use std::ops::Range;
use std::sync::Arc;

/// An object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{location}: object {key:?} not found")]
    NotFound { location: String, key: String },
    #[error("{location}: object {key:?} already exists")]
    AlreadyExists { location: String, key: String },
    #[error("{location}: {op} {key:?} failed: {source}")]
    Io {
        location: String,
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {op} {key:?} failed: {message} (check the endpoint, credentials and network; retrying may help)")]
    Remote {
        location: String,
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("{0}")]
    Config(String),
}

impl BackendError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, BackendError::NotFound { .. })
    }
}

pub type BResult<T> = Result<T, BackendError>;

/// Storage for vault objects. Synchronous: callers parallelise with threads;
/// async object stores run on a runtime owned by their implementation.
pub trait Backend: Send + Sync + 'static {
    /// Human-readable location, e.g. `file:///srv/vault` or `s3://b/p`.
    fn location(&self) -> String;
    /// Store `data` under `key`, atomically, replacing any old object.
    fn put(&self, key: &str, data: &[u8]) -> BResult<()>;
    /// Store `data` under `key` only if no object has that key.
    ///
    /// # Errors
    /// [`BackendError::AlreadyExists`] if it exists.
    fn put_if_absent(&self, key: &str, data: &[u8]) -> BResult<()>;
    fn get(&self, key: &str) -> BResult<Vec<u8>>;
    fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Vec<u8>>;
    /// Size of `key`, or `None` if it does not exist.
    fn head(&self, key: &str) -> BResult<Option<u64>>;
    /// All objects whose key starts with `prefix` (a folder, ending in `/`).
    fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>>;
    /// Remove `key`; removing a missing object is not an error.
    fn delete(&self, key: &str) -> BResult<()>;
}

pub type DynBackend = Arc<dyn Backend>;

/// Open the backend for a vault location: a path, `file://`, `s3://`,
/// `az://` (also `azure://`), `gs://` or `memory://` (process-local).
///
/// # Errors
/// An unknown scheme or an object-store configuration error.
pub fn open(location: &str) -> BResult<DynBackend> {
    match location.split_once("://") {
        None => Ok(Arc::new(local::LocalBackend::new(location))),
        Some(("file", path)) => Ok(Arc::new(local::LocalBackend::new(path))),
        Some(("memory", _)) => Ok(Arc::new(memory::MemoryBackend::new())),
        Some(("s3" | "az" | "azure" | "gs", _)) => {
            Ok(Arc::new(object::ObjectBackend::from_url(location)?))
        }
        Some((scheme, _)) => Err(BackendError::Config(format!(
            "{location}: unknown scheme {scheme:?}; use a path, file://, s3://, az:// or gs://"
        ))),
    }
}

/// The conformance suite every backend passes; public so integration tests
/// can run it against emulators.
#[doc(hidden)]
pub mod suite;
