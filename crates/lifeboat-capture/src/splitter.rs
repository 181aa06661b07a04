//! The IO splitter's write path, shared by its front ends (NBD, FUSE):
//! every change to a protected volume is marked in the dirty map, appended
//! to the journal and applied to the volume under the journal lock (so the
//! journal order is the volume's order), before it is acknowledged.
//! Flushes are barriers: the volume is synced, then a barrier record is
//! appended and the journal synced.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use lifeboat_format::journal::RecordKind;
use lifeboat_format::nbd::*;

use crate::dirtymap::DirtyMap;
use crate::journal::Journal;

/// What a server exports.
pub struct Export {
    pub name: String,
    pub file: File,
    pub size: u64,
    pub read_only: bool,
    /// Where writes are captured, in order, before they are acknowledged.
    pub journal: Option<std::sync::Arc<Journal>>,
    /// Chunks written since the replica last caught up (see dirtymap.rs for
    /// what survives which crash).
    pub dirty: Option<std::sync::Arc<DirtyMap>>,
    /// Set by [`Export::close`]: changes are refused from then on (held
    /// shared by every change, so closing waits for those in progress).
    closed: std::sync::RwLock<bool>,
}

impl Export {
    pub(crate) fn tflags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_CACHE
            | TFLAG_SEND_DF
            | TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        }
        f
    }
}

impl Export {
    /// An export of `file` (`size` bytes) with optional capture.
    pub fn new(
        name: &str,
        file: File,
        size: u64,
        read_only: bool,
        journal: Option<std::sync::Arc<Journal>>,
        dirty: Option<std::sync::Arc<DirtyMap>>,
    ) -> Export {
        Export {
            name: name.to_string(),
            file,
            size,
            read_only,
            journal,
            dirty,
            closed: std::sync::RwLock::new(false),
        }
    }

    /// Refuse every change from now on (clients get an I/O error), after
    /// the changes in progress are done: the journal and dirty map can then
    /// be closed without a write slipping in after them.
    pub fn close(&self) {
        *self.closed.write().unwrap() = true;
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{offset}+{len} is past the end ({})", self.size),
            ));
        }
        Ok(())
    }

    /// Apply a change, journaled first when there is a journal (`shared`:
    /// the same data, given away, so a journal's memory tail keeps it
    /// without a copy).
    fn change(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
        shared: Option<std::sync::Arc<Vec<u8>>>,
        apply: &dyn Fn() -> io::Result<()>,
    ) -> io::Result<()> {
        self.check(offset, len)?;
        let closed = self.closed.read().unwrap();
        if *closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("{}: the export is stopping", self.name),
            ));
        }
        // The dirty map first: whatever happens next, a resync covers it.
        if let Some(d) = &self.dirty {
            d.mark(offset, len)?;
        }
        match &self.journal {
            Some(j) => {
                // records hold at most MAX_RECORD_DATA; zero/trim carry no data
                let applied = |seq| {
                    apply()?;
                    if let Some(d) = &self.dirty {
                        d.note(offset, len, seq);
                    }
                    Ok(())
                };
                match shared {
                    Some(s) => j.record_shared(kind, offset, s, applied)?,
                    None => j.record(kind, offset, len as u32, data, applied)?,
                };
            }
            None => apply()?,
        }
        Ok(())
    }

    /// Write `data` at `offset`.
    ///
    /// # Errors
    /// Read-only export, out of range, I/O errors (then nothing is acknowledged).
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.change(
            RecordKind::Write,
            offset,
            data.len() as u64,
            data,
            None,
            &|| self.file.write_all_at(data, offset),
        )
    }

    /// [`Export::write`] of data the caller gives away (no copy into the
    /// journal's memory tail).
    ///
    /// # Errors
    /// As [`Export::write`].
    pub fn write_shared(&self, offset: u64, data: std::sync::Arc<Vec<u8>>) -> io::Result<()> {
        let d = data.clone();
        self.change(
            RecordKind::Write,
            offset,
            d.len() as u64,
            &d,
            Some(data),
            &|| self.file.write_all_at(&d, offset),
        )
    }

    /// Make `[offset, offset+len)` read as zeros (punching a hole if allowed).
    ///
    /// # Errors
    /// As [`Export::write`].
    pub fn zero(&self, offset: u64, len: u64, may_punch: bool) -> io::Result<()> {
        for (o, l) in pieces(offset, len) {
            self.change(RecordKind::Zero, o, l, &[], None, &|| {
                if may_punch && punch(&self.file, o, l).is_ok() {
                    return Ok(());
                }
                let zeros = vec![0u8; (l as usize).min(1 << 20)];
                let mut pos = 0u64;
                while pos < l {
                    let n = (l - pos).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], o + pos)?;
                    pos += n as u64;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Discard `[offset, offset+len)` (advisory: a hole where possible).
    ///
    /// # Errors
    /// As [`Export::write`].
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        for (o, l) in pieces(offset, len) {
            self.change(RecordKind::Trim, o, l, &[], None, &|| {
                let _ = punch(&self.file, o, l);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// A barrier: the volume durable, then the journal's barrier record.
    ///
    /// # Errors
    /// I/O errors.
    pub fn flush(&self) -> io::Result<()> {
        match &self.journal {
            Some(j) => {
                // every record up to `c` is applied (under the journal lock)
                let c = j.committed();
                j.barrier(|| self.file.sync_data())?;
                if let Some(d) = &self.dirty {
                    d.volume_synced(c);
                }
                Ok(())
            }
            None => self.file.sync_data(),
        }
    }
}

/// Split a range into pieces a journal record's u32 length can hold.
fn pieces(offset: u64, len: u64) -> Vec<(u64, u64)> {
    const MAX: u64 = 1 << 30;
    let mut v = Vec::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MAX);
        v.push((offset + at, n));
        at += n;
    }
    v
}

pub(crate) fn punch(f: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    fallocate(
        f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io::Error::from)
}
