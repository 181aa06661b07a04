//! Hot replicas: one sparse raw image per replicated volume, kept current by
//! the receiver, read by point cuts (and, later, failover).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lifeboat_format::proto::ZERO_HASH;
use lifeboat_replicate::receiver::{ReplicaIo, StreamState};

use crate::db::Db;

/// A replica volume and what the receiver last made of it. Held under one
/// mutex: the receiver applies a batch, a point cut reads the whole image,
/// never both at once.
pub struct Replica {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    pub applied_seq: u64,
    /// A valid crash state of the source (no resync pass half done).
    pub consistent: bool,
    /// Changed since the last recovery point.
    pub changed: bool,
    /// A point cut of the consistency group waits for the stream to stop
    /// at the first cut marker at or past this id.
    pub park_target: Option<u64>,
    /// The cut marker the stream stopped at.
    pub parked_at: Option<u64>,
    /// The last periodic cut marker applied.
    pub last_marker: u64,
}

impl Replica {
    /// Open or create the image at `path`, `size` bytes (sparse).
    ///
    /// # Errors
    /// I/O errors, or an existing image larger than the source (shrinking
    /// is refused: it would drop data).
    pub fn open(path: &Path, size: u64) -> io::Result<Replica> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let have = file.metadata()?.len();
        if have > size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: the replica has {have} bytes, the source {size}: refusing to shrink it",
                    path.display()
                ),
            ));
        }
        if have < size {
            file.set_len(size)?;
            file.sync_all()?;
        }
        Ok(Replica {
            path: path.to_path_buf(),
            file,
            size,
            applied_seq: 0,
            consistent: false,
            changed: false,
            park_target: None,
            parked_at: None,
            last_marker: 0,
        })
    }
}

/// The receiver's view of a replica: the image and the state database.
pub struct Io<'a> {
    pub replica: &'a mut Replica,
    pub db: &'a Arc<Db>,
    pub item: &'a str,
    pub volume: &'a str,
}

fn punch(f: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an owned, open descriptor with plain integers.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // no hole punching here: write zeros
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Whether `[offset, offset+len)` is entirely a hole.
fn is_hole(f: &File, offset: u64, len: u64) -> bool {
    // SAFETY: lseek on an owned descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: no data after offset
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    r as u64 >= offset + len
}

impl ReplicaIo for Io<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.replica.changed = true;
        self.replica.file.write_all_at(data, offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.replica.changed = true;
        punch(&self.replica.file, offset, len)
    }

    fn chunk_hash(&mut self, offset: u64, len: u64) -> io::Result<[u8; 32]> {
        if is_hole(&self.replica.file, offset, len) {
            return Ok(ZERO_HASH);
        }
        let mut b = vec![0u8; len as usize];
        self.replica.file.read_exact_at(&mut b, offset)?;
        Ok(lifeboat_replicate::shipper::chunk_hash(&b))
    }

    fn sync(&mut self) -> io::Result<()> {
        self.replica.file.sync_data()
    }

    fn persist(&mut self, st: &StreamState) -> io::Result<()> {
        self.replica.applied_seq = st.applied_seq;
        self.replica.consistent = st.is_consistent();
        self.db
            .save_stream_state(self.item, self.volume, st)
            .map_err(|e| io::Error::other(format!("state database: {e:#}")))
    }
}
