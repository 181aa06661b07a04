//! `lifeboat copy`: big sparse images between files, block devices and
//! object stores, with honest progress and atomic publish.
//!
//! Guarantees:
//! * holes of a local source are never read; progress counts data bytes of
//!   the source (objects have no holes: every byte of an object is data);
//! * nothing is visible at the destination until the copy is complete: local
//!   files are written to a hidden `.NAME.lifeboat-partial` beside the
//!   destination and renamed; objects are written with a multipart upload
//!   that becomes visible only on completion (or one server-side copy);
//! * an interrupted copy keeps what it did and a checkpoint (a local
//!   destination: its partial file; an object destination: the multipart
//!   upload, with the checkpoint in the state directory), and `--resume`
//!   continues from the checkpoint if the source is unchanged (same size and
//!   modification time, or ETag for objects);
//! * a source that changes size during the copy is an error, and the
//!   destination is left unchanged.
//!
//! Block devices as destination are written in place: they cannot be renamed.

mod local;
mod object;

use std::path::PathBuf;
use std::sync::Arc;

use lifeboat_capture::scan::Progress;
use lifeboat_store::backend::object::{build_stores, ObjectUrl};
use object_store::ObjectStore;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{path}: {op}: {source}{hint}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{url}: {op}: {message}")]
    Remote {
        url: String,
        op: &'static str,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err(
    path: &std::path::Path,
    op: &'static str,
    source: std::io::Error,
) -> CopyError {
    let hint = match source.raw_os_error() {
        Some(28) => " (disk full: free space and run again with --resume)",
        Some(2) => " (no such file or directory)",
        Some(13) | Some(1) => " (permission denied)",
        _ => "",
    };
    CopyError::Io {
        path: path.display().to_string(),
        op,
        source,
        hint,
    }
}

pub type Result<T, E = CopyError> = std::result::Result<T, E>;

/// One side of a copy.
#[derive(Clone)]
pub enum Endpoint {
    Local(PathBuf),
    Object {
        url: ObjectUrl,
        store: Arc<dyn ObjectStore>,
        /// The same client's multipart API (resumable uploads).
        multipart: Arc<dyn object_store::multipart::MultipartStore>,
        path: object_store::path::Path,
    },
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

impl Endpoint {
    /// A path, `file://PATH`, or `s3://`, `az://`, `gs://` object URL.
    ///
    /// # Errors
    /// Unknown scheme, no object key, or a client that cannot be configured.
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once("://") {
            None => Ok(Endpoint::Local(PathBuf::from(s))),
            Some(("file", p)) => Ok(Endpoint::Local(PathBuf::from(p))),
            Some(_) => {
                let url = ObjectUrl::parse(s).map_err(|e| CopyError::Invalid(e.to_string()))?;
                if url.prefix.is_empty() {
                    return Err(CopyError::Invalid(format!(
                        "{s}: name an object, e.g. {}://{}/disk.img",
                        url.scheme, url.bucket
                    )));
                }
                let (store, multipart) =
                    build_stores(&url).map_err(|e| CopyError::Invalid(e.to_string()))?;
                let path = object_store::path::Path::from(url.prefix.as_str());
                Ok(Endpoint::Object {
                    url,
                    store,
                    multipart,
                    path,
                })
            }
        }
    }

    pub fn display(&self) -> String {
        match self {
            Endpoint::Local(p) => p.display().to_string(),
            Endpoint::Object { url, .. } => url.display(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub resume: bool,
    pub verify: bool,
    /// Concurrent ranged transfers to or from object stores.
    pub parallel: usize,
    /// Bytes per ranged transfer / multipart part.
    pub part_size: u64,
    /// Bytes between checkpoints of a local-destination copy.
    pub checkpoint_every: u64,
    /// Make a local destination durable (fsync) before publishing it.
    pub fsync: bool,
    /// Test hook: fail once a checkpoint at or past this offset is written
    /// (simulates a crash or Ctrl-C after a checkpoint).
    pub fail_after_checkpoint: Option<u64>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            resume: false,
            verify: false,
            parallel: 8,
            part_size: 16 << 20,
            checkpoint_every: 256 << 20,
            fsync: true,
            fail_after_checkpoint: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CopyReport {
    pub src: String,
    pub dst: String,
    pub nominal_bytes: u64,
    pub data_bytes: u64,
    /// Bytes moved by this run (less than `data_bytes` after `--resume`).
    pub transferred_bytes: u64,
    pub resumed_from: u64,
    /// How the bytes moved: `reflink`, `read-write`, `server-side`,
    /// `multipart-upload`, `ranged-download`.
    pub method: String,
    pub blake3: Option<String>,
    pub verified: bool,
}

/// Copy `src` to `dst`.
///
/// # Errors
/// Unreadable source, unwritable destination, a source that changed, or a
/// verification mismatch; the destination is unchanged in each case.
pub fn copy(
    src: &Endpoint,
    dst: &Endpoint,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let mut report = match (src, dst) {
        (Endpoint::Local(s), Endpoint::Local(d)) => local::local_to_local(s, d, opts, progress)?,
        (Endpoint::Local(s), Endpoint::Object { .. }) => {
            object::local_to_object(s, dst, opts, progress)?
        }
        (Endpoint::Object { .. }, Endpoint::Local(d)) => {
            object::object_to_local(src, d, opts, progress)?
        }
        (Endpoint::Object { .. }, Endpoint::Object { .. }) => {
            object::object_to_object(src, dst, opts, progress)?
        }
    };
    report.src = src.display();
    report.dst = dst.display();
    // Local destinations are verified before they are published; an object
    // destination can only be read back after its upload completed.
    if opts.verify && !report.verified {
        let a = digest(src)?;
        let b = digest(dst)?;
        if a != b {
            return Err(CopyError::Invalid(format!(
                "verification failed: BLAKE3 of {} is {a}, of {} is {b}",
                src.display(),
                dst.display()
            )));
        }
        report.blake3 = Some(a);
        report.verified = true;
    }
    Ok(report)
}

/// Compare BLAKE3 of `src` with that of a finished partial file, before it
/// is published.
pub(crate) fn verify_before_publish(src: &Endpoint, partial: &std::path::Path) -> Result<String> {
    let a = digest(src)?;
    let b = local::digest(partial)?;
    if a != b {
        let _ = std::fs::remove_file(partial);
        return Err(CopyError::Invalid(format!(
            "verification failed: BLAKE3 of {} is {a}, of the copy {b}; the destination was not changed",
            src.display()
        )));
    }
    Ok(a)
}

/// BLAKE3 of the full logical content (holes read as zeros without I/O).
///
/// # Errors
/// Read errors.
pub fn digest(e: &Endpoint) -> Result<String> {
    match e {
        Endpoint::Local(p) => local::digest(p),
        Endpoint::Object { .. } => object::digest(e),
    }
}
