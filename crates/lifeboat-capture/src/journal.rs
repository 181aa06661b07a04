//! The splitter's local write journal (format in `lifeboat_format::journal`).
//!
//! Segments `<first seq, 16 hex>.seg` in a directory; records are appended in
//! the order writes are applied to the volume (the journal lock is held
//! across both, so the journal order is the volume's order). A barrier
//! record is followed by fdatasync of the journal, so FLUSH and FUA are
//! durable in the journal before they are acknowledged. On open, a torn tail
//! left by a crash is cut off and sequence numbers continue.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lifeboat_format::journal::{
    decode_segment, encode_record_header, encode_segment_header, RecordKind,
};

/// A segment is closed and a new one started past this size.
pub const SEGMENT_MAX: u64 = 64 << 20;

pub struct Journal {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    len: u64,
    next_seq: u64,
}

fn segment_name(first: u64) -> String {
    format!("{first:016x}.seg")
}

/// Segment files of `dir`, oldest first.
///
/// # Errors
/// I/O errors listing the directory.
pub fn segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    Ok(v)
}

fn bad(p: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display()))
}

impl Journal {
    /// Open (or create) the journal in `dir`, cutting off a torn tail.
    ///
    /// # Errors
    /// I/O errors, or a segment whose header is damaged.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        fs::create_dir_all(dir)?;
        let segs = segments(dir)?;
        let (file, len, next_seq) = match segs.last() {
            Some(last) => {
                let bytes = fs::read(last)?;
                let seg = decode_segment(&bytes).map_err(|e| bad(last, e))?;
                let next = seg
                    .records
                    .last()
                    .map(|r| r.seq + 1)
                    .unwrap_or(seg.first_seq);
                let f = OpenOptions::new().read(true).write(true).open(last)?;
                if seg.torn {
                    tracing::warn!(
                        "{}: cutting a torn tail of {} bytes",
                        last.display(),
                        bytes.len() - seg.valid_len
                    );
                    f.set_len(seg.valid_len as u64)?;
                    f.sync_all()?;
                }
                (f, seg.valid_len as u64, next)
            }
            None => {
                let f = Self::new_segment(dir, 1)?;
                (f, lifeboat_format::journal::SEGMENT_HEADER_LEN as u64, 1)
            }
        };
        Ok(Journal {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                len,
                next_seq,
            }),
        })
    }

    fn new_segment(dir: &Path, first: u64) -> io::Result<File> {
        let p = dir.join(segment_name(first));
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)?;
        f.write_all(&encode_segment_header(first))?;
        f.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(f)
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.inner.lock().unwrap().next_seq
    }

    /// Append a record and, under the same lock, apply it with `apply`, so
    /// the journal order is the order the volume saw. Returns its sequence.
    ///
    /// # Errors
    /// I/O errors of the journal or of `apply`.
    pub fn record<F: FnOnce() -> io::Result<()>>(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u32,
        data: &[u8],
        apply: F,
    ) -> io::Result<u64> {
        let mut g = self.inner.lock().unwrap();
        if g.len >= SEGMENT_MAX {
            g.file.sync_data()?;
            let f = Self::new_segment(&self.dir, g.next_seq)?;
            g.file = f;
            g.len = lifeboat_format::journal::SEGMENT_HEADER_LEN as u64;
        }
        let seq = g.next_seq;
        let h = encode_record_header(kind, seq, offset, len, data);
        let at = g.len;
        g.file.write_all_at(&h, at)?;
        g.file.write_all_at(data, at + h.len() as u64)?;
        apply()?;
        g.len = at + (h.len() + data.len()) as u64;
        g.next_seq += 1;
        if kind == RecordKind::Barrier {
            g.file.sync_data()?;
        }
        Ok(seq)
    }

    /// A barrier: `sync_volume` makes the volume durable, then the barrier
    /// record is appended and the journal made durable.
    ///
    /// # Errors
    /// I/O errors.
    pub fn barrier<F: FnOnce() -> io::Result<()>>(&self, sync_volume: F) -> io::Result<u64> {
        self.record(RecordKind::Barrier, 0, 0, &[], sync_volume)
    }
}

/// One record read back from a journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OwnedRecord {
    pub kind: String,
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    #[serde(skip)]
    pub data: Vec<u8>,
}

/// Read every record of the journal in `dir`, in order.
///
/// # Errors
/// I/O errors, a damaged header, or sequence numbers that do not continue
/// from one segment to the next.
pub fn read_all(dir: &Path) -> io::Result<Vec<OwnedRecord>> {
    let mut out: Vec<OwnedRecord> = Vec::new();
    for p in segments(dir)? {
        let bytes = fs::read(&p)?;
        let seg = decode_segment(&bytes).map_err(|e| bad(&p, e))?;
        if let Some(last) = out.last() {
            if seg.first_seq != last.seq + 1 {
                return Err(bad(
                    &p,
                    format!("starts at seq {} after {}: a gap", seg.first_seq, last.seq),
                ));
            }
        }
        for r in seg.records {
            out.push(OwnedRecord {
                kind: format!("{:?}", r.kind).to_lowercase(),
                seq: r.seq,
                offset: r.offset,
                len: r.len,
                data: r.data.to_vec(),
            });
        }
    }
    Ok(out)
}

/// Apply writes and zeroing of `records` to `volume`, in order.
///
/// # Errors
/// I/O errors.
pub fn replay(records: &[OwnedRecord], volume: &File) -> io::Result<()> {
    for r in records {
        match r.kind.as_str() {
            "write" => volume.write_all_at(&r.data, r.offset)?,
            "zero" => {
                let zeros = vec![0u8; r.len as usize];
                volume.write_all_at(&zeros, r.offset)?;
            }
            _ => {}
        }
    }
    volume.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_torn_tails_are_cut() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(
            j.record(RecordKind::Write, 0, 3, b"abc", || Ok(()))
                .unwrap(),
            1
        );
        assert_eq!(j.barrier(|| Ok(())).unwrap(), 2);
        drop(j);
        // a crash in the middle of the next record
        let seg = segments(d.path()).unwrap().pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[1, 0, 0, 0, 9]).unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.next_seq(), 3);
        j.record(RecordKind::Write, 10, 2, b"xy", || Ok(()))
            .unwrap();
        let all = read_all(d.path()).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[2].data, b"xy");
    }

    #[test]
    fn an_apply_error_records_nothing_durably_new() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let e = j.record(RecordKind::Write, 0, 1, b"a", || {
            Err(io::Error::from_raw_os_error(28))
        });
        assert!(e.is_err());
        // the failed write's record is overwritten by the next one
        j.record(RecordKind::Write, 0, 1, b"b", || Ok(())).unwrap();
        let all = read_all(d.path()).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].data, b"b");
    }
}
