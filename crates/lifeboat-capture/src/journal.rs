//! The splitter's local write journal (format in `lifeboat_format::journal`).
//!
//! Segments `<first seq, 16 hex>.seg` in a directory; records are appended in
//! the order writes are applied to the volume (the journal lock is held
//! across both, so the journal order is the volume's order). A barrier
//! record is followed by fdatasync of the journal, so FLUSH and FUA are
//! durable in the journal before they are acknowledged. On open, a torn tail
//! left by a process crash is cut off and sequence numbers continue.
//!
//! Records are shipped as soon as they are committed, durable or not (the
//! recovery site must not wait for the primary's disk, and records the
//! recovery site acknowledges quickly are deleted before they ever reach
//! it). With a memory tail ([`Journal::open_with_memory`], the agent's
//! default) the newest records stay in memory and reach segments only when
//! the tail is full or at a clean stop. Without one, a process crash loses
//! nothing (the page cache keeps the records). A machine crash may lose
//! records the recovery site already holds, and a crash loses a memory
//! tail, so `journal.state` notes the boot id and the mode: such a journal
//! starts over under a new identity that *follows* the old one
//! (`journal.follows`), and the recovery site, if it holds the old one as
//! far as the dirty map forgot (`journal.cleared`), resyncs only the dirty
//! map's chunks; otherwise it compares every chunk.
//!
//! The journal is also the outage buffer of replication: a [`Cursor`] reads
//! committed records from any sequence on, [`Journal::trim`] drops segments
//! the recovery site has acknowledged, and [`Journal::drop_unshipped`] gives
//! up the whole buffer when it overflows (the dirty map then bounds the
//! resync). `journal.id` names the journal: sequence numbers are only
//! comparable within one journal.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::dirtymap::{boot_id, read_state, write_atomic};

use lifeboat_format::journal::{
    decode_record, decode_segment, encode_record_header, encode_segment_header, record_span,
    segment_first_seq, RecordKind, MAX_RECORD_DATA, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};

/// A segment is closed and a new one started past this size.
pub const SEGMENT_MAX: u64 = 64 << 20;

/// Memory shared by the memory tails of several journals (an agent's
/// volumes): a volume far behind may use all of it while the others are
/// caught up. A soft limit (journals check it, then add).
#[derive(Debug)]
pub struct MemoryBudget {
    max: u64,
    used: std::sync::atomic::AtomicU64,
}

impl MemoryBudget {
    /// A budget of `max` bytes (0: no memory tails).
    pub fn new(max: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            max,
            used: 0.into(),
        })
    }

    /// Bytes the tails hold now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Inner {
    fn mem_mode(&self) -> bool {
        self.budget.max > 0
    }

    fn mem_add(&mut self, n: u64) {
        self.mem_bytes += n;
        self.budget
            .used
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn mem_sub(&mut self, n: u64) {
        self.mem_bytes -= n;
        self.budget
            .used
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // a tail not written out (no clean stop) leaves the budget
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = g.mem_bytes;
        g.mem_sub(n);
    }
}

pub struct Journal {
    dir: PathBuf,
    id: [u8; 16],
    /// The journal this one replaced after a machine crash, and how far the
    /// recovery site had acknowledged it when its changes were last
    /// cleared from the dirty map (`journal.follows`).
    follows: Mutex<Option<([u8; 16], u64)>>,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    len: u64,
    next_seq: u64,
    /// First sequence of the oldest segment kept.
    oldest: u64,
    /// Bytes of all segments kept.
    bytes: u64,
    /// When records not yet released were committed (seq, time), oldest
    /// first: the age of the front is the replication RPO.
    times: VecDeque<(u64, Instant)>,
    /// Bytes changed by records since open (writes, zeroing, trims).
    changed: u64,
    /// Records up to this sequence are durable in the journal.
    synced: u64,
    /// Every record at or below this sequence left the journal after the
    /// recovery site acknowledged it (persisted in `journal.floor`).
    floor: u64,
    /// The dirty map may have forgotten changes up to this sequence: the
    /// recovery site acknowledged them (persisted in `journal.cleared`).
    cleared: u64,
    /// Closed cleanly: `journal.cleared` is not written any more (a clear
    /// pass finishing after the stop must not write over the value of the
    /// journal a restart of the volume opened in the same directory).
    closed: bool,
    /// The memory tail: the newest records, not written to a segment (see
    /// [`Journal::open_with_memory`]). Segments hold the records before it.
    mem: VecDeque<MemRecord>,
    /// Bytes the memory tail holds (records as a segment would).
    mem_bytes: u64,
    /// The memory the tails of all the journals sharing it may hold; a
    /// budget of 0: every record goes to a segment.
    budget: Arc<MemoryBudget>,
    /// First sequence of the segment being written, and the one its next
    /// record must have (records released from the memory tail without
    /// reaching a segment leave a gap: a new segment starts after it).
    seg_first: u64,
    seg_next: u64,
}

/// A record of the memory tail; its data is shared with the shipper.
struct MemRecord {
    kind: RecordKind,
    seq: u64,
    offset: u64,
    len: u32,
    data: Arc<Vec<u8>>,
}

/// Bytes a record takes in a segment besides its data.
const RECORD_OVERHEAD: u64 = lifeboat_format::journal::RECORD_HEADER_LEN as u64;

impl Inner {
    /// The first sequence not in a segment (the memory tail's first).
    fn disk_next(&self) -> u64 {
        self.mem.front().map_or(self.next_seq, |r| r.seq)
    }
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
    /// Open (or create) the journal in `dir`, every record in segments,
    /// cutting off a torn tail.
    ///
    /// # Errors
    /// I/O errors, or a segment whose header is damaged.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        Self::open_with_memory(dir, 0)
    }

    /// Open (or create) the journal in `dir` with a memory tail of up to
    /// `mem_max` bytes: new records stay in memory, shared with the shipper
    /// (no copy into the page cache, no read back), and are written to a
    /// segment only when the tail is full (the recovery site is behind or
    /// unreachable) or at a clean stop. The records of the tail do not
    /// survive a crash of the agent: a journal with a memory tail that was
    /// not closed cleanly starts over under a new identity that follows
    /// the old one, and the dirty map (synced before every acknowledgement)
    /// bounds the resync, as after a machine crash.
    ///
    /// # Errors
    /// As [`Journal::open`].
    pub fn open_with_memory(dir: &Path, mem_max: u64) -> io::Result<Journal> {
        Self::open_with_budget(dir, MemoryBudget::new(mem_max))
    }

    /// [`Journal::open_with_memory`] with a memory tail that shares
    /// `budget` with other journals.
    ///
    /// # Errors
    /// As [`Journal::open`].
    pub fn open_with_budget(dir: &Path, budget: Arc<MemoryBudget>) -> io::Result<Journal> {
        fs::create_dir_all(dir)?;
        let state = dir.join("journal.state");
        let lost_tail = read_state(&state).is_some_and(|(_, how)| how == "running-memory");
        if lost_tail || crate::dirtymap::left_open_by_another_boot(&state) {
            tracing::warn!(
                "{}: {}: records may be lost, so it starts over under a new identity (the \
                 recovery site compares the chunks the dirty map holds)",
                dir.display(),
                if lost_tail {
                    "the agent stopped without closing the journal's memory tail"
                } else {
                    "the machine restarted while the journal was open"
                }
            );
            // the new journal follows the old one: a recovery site that
            // holds the old one up to `cleared` needs only the dirty chunks
            if let Ok(old) = fs::read(dir.join("journal.id")) {
                if old.len() == 16 {
                    let mut f = old;
                    f.extend_from_slice(&read_seq(dir, "journal.cleared")?.to_le_bytes());
                    write_atomic(&dir.join("journal.follows"), &f)?;
                }
            }
            for p in segments(dir)? {
                fs::remove_file(p)?;
            }
            for f in ["journal.id", "journal.floor", "journal.cleared"] {
                match fs::remove_file(dir.join(f)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            File::open(dir)?.sync_all()?;
        }
        let id = journal_id(dir)?;
        let segs = segments(dir)?;
        let (file, len, next_seq, seg_first) = match segs.last() {
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
                }
                // what survived is durable from now on
                f.sync_all()?;
                (f, seg.valid_len as u64, next, seg.first_seq)
            }
            None => {
                let f = Self::new_segment(dir, 1)?;
                (f, lifeboat_format::journal::SEGMENT_HEADER_LEN as u64, 1, 1)
            }
        };
        let mut bytes = 0;
        let mut oldest = next_seq;
        let segs = segments(dir)?;
        for (i, p) in segs.iter().enumerate() {
            bytes += fs::metadata(p)?.len();
            if i == 0 {
                let mut h = [0u8; SEGMENT_HEADER_LEN];
                File::open(p)?.read_exact_at(&mut h, 0)?;
                oldest = segment_first_seq(&h).map_err(|e| bad(p, e))?;
            }
        }
        let running = if budget.max > 0 {
            "running-memory"
        } else {
            "running"
        };
        write_atomic(&state, format!("{} {running}\n", boot_id()).as_bytes())?;
        let follows = match fs::read(dir.join("journal.follows")) {
            Ok(b) if b.len() == 24 => Some((
                b[..16].try_into().expect("16 bytes"),
                u64::from_le_bytes(b[16..].try_into().expect("8 bytes")),
            )),
            _ => None,
        };
        Ok(Journal {
            dir: dir.to_path_buf(),
            id,
            follows: Mutex::new(follows),
            inner: Mutex::new(Inner {
                file,
                len,
                next_seq,
                oldest,
                bytes,
                times: VecDeque::new(),
                changed: 0,
                synced: next_seq - 1,
                floor: read_seq(dir, "journal.floor")?,
                cleared: read_seq(dir, "journal.cleared")?,
                closed: false,
                mem: VecDeque::new(),
                mem_bytes: 0,
                budget,
                seg_first,
                seg_next: next_seq,
            }),
        })
    }

    /// This journal's identity.
    pub fn id(&self) -> [u8; 16] {
        self.id
    }

    /// The journal this one replaced after a machine crash, with the
    /// sequence up to which the dirty map may have forgotten its changes.
    pub fn follows(&self) -> Option<([u8; 16], u64)> {
        *self.follows.lock().unwrap()
    }

    /// The recovery site holds this journal's state (a resync pass under
    /// it was acknowledged): forget the one it followed, so a recovery site
    /// whose state went back to the old journal later is compared in full.
    ///
    /// # Errors
    /// I/O errors removing `journal.follows`.
    pub fn forget_follows(&self) -> io::Result<()> {
        let mut f = self.follows.lock().unwrap();
        if f.is_some() {
            match fs::remove_file(self.dir.join("journal.follows")) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            File::open(&self.dir)?.sync_all()?;
            *f = None;
        }
        Ok(())
    }

    /// The dirty map is about to forget changes up to `acked` (the recovery
    /// site holds them): record it durably first, for [`Journal::follows`].
    ///
    /// # Errors
    /// I/O errors writing `journal.cleared`.
    pub fn set_cleared(&self, acked: u64) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        if acked > g.cleared && !g.closed {
            write_atomic(
                &self.dir.join("journal.cleared"),
                acked.to_string().as_bytes(),
            )?;
            g.cleared = acked;
        }
        Ok(())
    }

    /// Stop cleanly: every record durable, and the next open keeps the
    /// journal even after a reboot.
    ///
    /// # Errors
    /// I/O errors.
    pub fn close_clean(&self) -> io::Result<()> {
        self.inner.lock().unwrap().closed = true;
        self.sync_committed()?;
        write_atomic(
            &self.dir.join("journal.state"),
            format!("{} clean\n", boot_id()).as_bytes(),
        )
    }

    /// The last sequence number whose record is complete (0 if none).
    pub fn committed(&self) -> u64 {
        self.inner.lock().unwrap().next_seq - 1
    }

    /// The last sequence number synced to the segments.
    #[cfg(test)]
    pub fn durable(&self) -> u64 {
        self.inner.lock().unwrap().synced
    }

    /// Make every committed record durable; returns the durable sequence.
    ///
    /// # Errors
    /// I/O errors syncing.
    pub fn sync_committed(&self) -> io::Result<u64> {
        let (c, f) = {
            let mut g = self.inner.lock().unwrap();
            self.spill(&mut g)?;
            if g.seg_next != g.next_seq {
                // records released from the memory tail never reached a
                // segment: an empty one at the next sequence keeps the
                // numbering across a restart
                let next = g.next_seq;
                self.roll_to(&mut g, next)?;
            }
            if g.synced + 1 >= g.next_seq {
                return Ok(g.synced);
            }
            (g.next_seq - 1, g.file.try_clone()?)
        };
        f.sync_data()?;
        let mut g = self.inner.lock().unwrap();
        g.synced = g.synced.max(c);
        Ok(g.synced)
    }

    /// Records at or below this sequence were removed after the recovery
    /// site acknowledged them: a recovery site that reports less lost data
    /// it had acknowledged and needs a full compare.
    pub fn floor(&self) -> u64 {
        self.inner.lock().unwrap().floor
    }

    fn set_floor(&self, g: &mut Inner, v: u64) -> io::Result<()> {
        if v <= g.floor {
            return Ok(());
        }
        write_atomic(&self.dir.join("journal.floor"), v.to_string().as_bytes())?;
        g.floor = v;
        Ok(())
    }

    /// The oldest sequence number still in the journal (the next one when
    /// the journal holds no record).
    pub fn oldest(&self) -> u64 {
        self.inner.lock().unwrap().oldest
    }

    /// Bytes of the volume changed by records since the journal was opened.
    pub fn changed_bytes(&self) -> u64 {
        self.inner.lock().unwrap().changed
    }

    /// Bytes held: segments on disk and the memory tail.
    pub fn bytes(&self) -> u64 {
        let g = self.inner.lock().unwrap();
        g.bytes + g.mem_bytes
    }

    /// The recovery site holds everything up to `acked`: release the
    /// memory tail's records up to it (cheap: call it on every
    /// acknowledgement; [`Journal::trim`] also deletes segments).
    pub fn release(&self, acked: u64) {
        // the buffers are freed after the lock is let go (writers wait on it)
        let mut freed = Vec::new();
        let mut g = self.inner.lock().unwrap();
        while g.mem.front().is_some_and(|r| r.seq <= acked) {
            let r = g.mem.pop_front().expect("front");
            g.mem_sub(r.data.len() as u64 + RECORD_OVERHEAD);
            freed.push(r);
        }
        while g.times.front().is_some_and(|(s, _)| *s <= acked) {
            g.times.pop_front();
        }
        drop(g);
        drop(freed);
    }

    /// Commit time of the oldest record after `acked` recorded by this
    /// process (records found on disk at open have none).
    pub fn oldest_unacked_time(&self, acked: u64) -> Option<Instant> {
        let g = self.inner.lock().unwrap();
        g.times.iter().find(|(s, _)| *s > acked).map(|(_, t)| *t)
    }

    /// The recovery site holds everything up to `acked`: forget commit
    /// times and delete every segment whose records are all at or below it
    /// (never the segment being written).
    ///
    /// # Errors
    /// I/O errors deleting segments.
    pub fn trim(&self, acked: u64) -> io::Result<()> {
        self.release(acked);
        let mut g = self.inner.lock().unwrap();
        let segs = segments(&self.dir)?;
        let mut removed = false;
        for w in segs.windows(2) {
            let next_first = first_of(&w[1])?;
            if next_first > acked + 1 {
                break;
            }
            let len = fs::metadata(&w[0])?.len();
            self.set_floor(&mut g, next_first - 1)?;
            fs::remove_file(&w[0])?;
            g.bytes = g.bytes.saturating_sub(len);
            g.oldest = next_first;
            removed = true;
        }
        if removed {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Give up every record (the buffer overflowed): under the journal lock,
    /// `under_lock` runs (to mark what the records covered as needing a
    /// resync), all segments are deleted and a new one starts. Returns the
    /// sequence number the next record gets.
    ///
    /// # Errors
    /// I/O errors.
    pub fn drop_unshipped<F: FnOnce(u64) -> io::Result<()>>(
        &self,
        acked: u64,
        under_lock: F,
    ) -> io::Result<u64> {
        let mut g = self.inner.lock().unwrap();
        under_lock(g.next_seq)?;
        self.set_floor(&mut g, acked)?;
        g.mem.clear();
        let n = g.mem_bytes;
        g.mem_sub(n);
        let next = g.next_seq;
        // the new segment first, so a crash never leaves no segment (and
        // sequence numbers never restart)
        let name = self.dir.join(segment_name(next));
        if !name.exists() {
            g.file.sync_data()?;
            g.file = Self::new_segment(&self.dir, next)?;
            g.len = SEGMENT_HEADER_LEN as u64;
        }
        g.seg_first = next;
        g.seg_next = next;
        for p in segments(&self.dir)? {
            if p != name {
                fs::remove_file(&p)?;
            }
        }
        File::open(&self.dir)?.sync_all()?;
        g.bytes = g.len;
        g.oldest = next;
        g.synced = next - 1;
        g.times.clear();
        Ok(next)
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
    pub fn record<F: FnOnce(u64) -> io::Result<()>>(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u32,
        data: &[u8],
        apply: F,
    ) -> io::Result<u64> {
        self.record_inner(kind, offset, len, data, None, apply)
    }

    /// [`Journal::record`] for data the caller gives away: a memory tail
    /// keeps it without a copy.
    ///
    /// # Errors
    /// As [`Journal::record`].
    pub fn record_shared<F: FnOnce(u64) -> io::Result<()>>(
        &self,
        kind: RecordKind,
        offset: u64,
        data: Arc<Vec<u8>>,
        apply: F,
    ) -> io::Result<u64> {
        let len = data.len() as u32;
        self.record_inner(kind, offset, len, &data, Some(&data), apply)
    }

    fn record_inner<F: FnOnce(u64) -> io::Result<()>>(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u32,
        data: &[u8],
        shared: Option<&Arc<Vec<u8>>>,
        apply: F,
    ) -> io::Result<u64> {
        let mut g = self.inner.lock().unwrap();
        let seq = self.append(&mut g, kind, offset, len, data, shared, apply)?;
        // a barrier makes the segments durable; the memory tail never is
        // (the dirty map, synced before each acknowledgement, covers it)
        if kind == RecordKind::Barrier && !g.mem_mode() {
            g.file.sync_data()?;
            g.synced = seq;
        }
        Ok(seq)
    }

    /// Write the memory tail to segments, in order.
    fn spill(&self, g: &mut Inner) -> io::Result<()> {
        self.spill_to(g, 0)
    }

    /// Write the memory tail's oldest records to segments, in order, until
    /// it holds at most `keep` bytes.
    fn spill_to(&self, g: &mut Inner, keep: u64) -> io::Result<()> {
        while g.mem_bytes > keep {
            let Some(r) = g.mem.front() else { break };
            let (kind, seq, offset, len, data) = (r.kind, r.seq, r.offset, r.len, r.data.clone());
            let used = self.write_disk(g, kind, seq, offset, len, &data)?;
            g.len += used;
            g.bytes += used;
            g.seg_next = seq + 1;
            g.mem.pop_front();
            g.mem_sub(data.len() as u64 + RECORD_OVERHEAD);
        }
        Ok(())
    }

    /// Write record `seq` at the end of the segment being written (a new
    /// one past [`SEGMENT_MAX`]); returns the bytes it takes, for the caller
    /// to add to `g.len` and `g.bytes` once the record counts (until then
    /// the next record overwrites it).
    fn write_disk(
        &self,
        g: &mut Inner,
        kind: RecordKind,
        seq: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        if g.len >= SEGMENT_MAX || seq != g.seg_next {
            self.roll_to(g, seq)?;
        }
        let h = encode_record_header(kind, seq, offset, len, data);
        let at = g.len;
        // header and data in one system call
        let total = h.len() + data.len();
        let n = rustix::io::pwritev(&g.file, &[io::IoSlice::new(&h), io::IoSlice::new(data)], at)
            .map_err(io::Error::from)?;
        if n < h.len() {
            g.file.write_all_at(&h[n..], at + n as u64)?;
            g.file.write_all_at(data, at + h.len() as u64)?;
        } else if n < total {
            let d = n - h.len();
            g.file.write_all_at(&data[d..], at + n as u64)?;
        }
        // committed by the caller (`g.len += used`) once the record counts
        Ok((h.len() + data.len()) as u64)
    }

    /// Start a new segment whose first record will be `seq` (the current
    /// one is full, or records before `seq` left the memory tail
    /// acknowledged without reaching a segment: then the floor says so, and
    /// an empty current segment is removed).
    fn roll_to(&self, g: &mut Inner, seq: u64) -> io::Result<()> {
        if seq == g.seg_first && g.len == SEGMENT_HEADER_LEN as u64 {
            g.seg_next = seq;
            return Ok(());
        }
        if seq != g.seg_next {
            self.set_floor(g, seq - 1)?;
        }
        g.file.sync_data()?;
        g.synced = g.synced.max(seq - 1);
        let f = Self::new_segment(&self.dir, seq)?;
        let (old, empty) = (
            segment_name(g.seg_first),
            g.len == SEGMENT_HEADER_LEN as u64,
        );
        g.file = f;
        g.len = SEGMENT_HEADER_LEN as u64;
        g.bytes += g.len;
        g.seg_first = seq;
        g.seg_next = seq;
        if empty {
            fs::remove_file(self.dir.join(old))?;
            g.bytes -= SEGMENT_HEADER_LEN as u64;
            File::open(&self.dir)?.sync_all()?;
            if let Some(p) = segments(&self.dir)?.first() {
                g.oldest = first_of(p)?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn append<F: FnOnce(u64) -> io::Result<()>>(
        &self,
        g: &mut Inner,
        kind: RecordKind,
        offset: u64,
        len: u32,
        data: &[u8],
        shared: Option<&Arc<Vec<u8>>>,
        apply: F,
    ) -> io::Result<u64> {
        let seq = g.next_seq;
        let need = data.len() as u64 + RECORD_OVERHEAD;
        let max = g.budget.max;
        if max > 0 && g.budget.used() + need > max {
            // the recovery site is behind: this tail's oldest records go
            // to segments until a quarter of the budget is free (all of
            // it at once held every writer while the whole tail was
            // written, and wrote out records about to be acknowledged)
            let over = (g.budget.used() + need).saturating_sub(max / 4 * 3);
            let keep = g.mem_bytes.saturating_sub(over);
            self.spill_to(g, keep)?;
        }
        // the other journals' tails may fill the budget: then this record
        // goes to a segment (after the others, as this tail is empty)
        if max > 0 && (!g.mem.is_empty() || g.budget.used() + need <= max) {
            apply(seq)?;
            let data = match shared {
                Some(d) => d.clone(),
                None => Arc::new(data.to_vec()),
            };
            g.mem.push_back(MemRecord {
                kind,
                seq,
                offset,
                len,
                data,
            });
            g.mem_add(need);
        } else {
            let used = self.write_disk(g, kind, seq, offset, len, data)?;
            if let Err(e) = apply(seq) {
                // the record of a write that did not happen must not be
                // found by the next open (it would be shipped): cut it off
                let _ = g.file.set_len(g.len).and_then(|_| g.file.sync_data());
                return Err(e);
            }
            g.len += used;
            g.bytes += used;
            g.seg_next = seq + 1;
        }
        g.next_seq += 1;
        g.times.push_back((seq, Instant::now()));
        if kind != RecordKind::Barrier {
            g.changed += len as u64;
        }
        Ok(seq)
    }

    /// A consistency-group cut: a barrier record whose offset is `cut_id`
    /// (non-zero) appended to every journal of the group while all their
    /// locks are held, so no write of any volume falls between the markers:
    /// the records before the markers form one write-order-consistent state
    /// of all the volumes. A cut orders; unlike a flush it does not sync.
    /// The journals must always be passed in the same order.
    ///
    /// # Errors
    /// I/O errors appending (some journals may then hold the marker; a cut
    /// is only used when every volume reaches it).
    pub fn group_cut(journals: &[&Journal], cut_id: u64) -> io::Result<()> {
        assert!(cut_id != 0, "cut ids are non-zero");
        let mut guards: Vec<_> = journals.iter().map(|j| j.inner.lock().unwrap()).collect();
        for (j, g) in journals.iter().zip(guards.iter_mut()) {
            j.append(g, RecordKind::Barrier, cut_id, 0, &[], None, |_| Ok(()))?;
        }
        Ok(())
    }

    /// A barrier: `sync_volume` makes the volume durable, then the barrier
    /// record is appended and the journal made durable.
    ///
    /// # Errors
    /// I/O errors.
    pub fn barrier<F: FnOnce() -> io::Result<()>>(&self, sync_volume: F) -> io::Result<u64> {
        self.record(RecordKind::Barrier, 0, 0, &[], |_| sync_volume())
    }
}

fn first_of(p: &Path) -> io::Result<u64> {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    File::open(p)?.read_exact_at(&mut h, 0)?;
    segment_first_seq(&h).map_err(|e| bad(p, e))
}

/// A sequence number kept in `dir/name` (0 if there is none).
fn read_seq(dir: &Path, name: &str) -> io::Result<u64> {
    match fs::read_to_string(dir.join(name)) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| bad(&dir.join(name), "not a sequence number")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// The journal's identity, made on first use (16 random bytes in `journal.id`).
fn journal_id(dir: &Path) -> io::Result<[u8; 16]> {
    let p = dir.join("journal.id");
    match fs::read(&p) {
        Ok(b) if b.len() == 16 => Ok(b.try_into().expect("16 bytes")),
        Ok(_) => Err(bad(&p, "not a journal id (16 bytes)")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut id = [0u8; 16];
            getrandom::fill(&mut id).map_err(|e| io::Error::other(e.to_string()))?;
            write_atomic(&p, &id)?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// Why a cursor cannot go on.
#[derive(Debug)]
pub enum CursorError {
    /// The records from this sequence on are no longer in the journal.
    Gap {
        wanted: u64,
        oldest: u64,
    },
    Io(io::Error),
}

impl From<io::Error> for CursorError {
    fn from(e: io::Error) -> Self {
        CursorError::Io(e)
    }
}

impl std::fmt::Display for CursorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CursorError::Gap { wanted, oldest } => write!(
                f,
                "journal no longer holds seq {wanted} (oldest is {oldest}): a resync is needed"
            ),
            CursorError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads committed records in order from a sequence number on.
pub struct Cursor {
    next: u64,
    at: Option<(PathBuf, File, u64)>,
    buf: Vec<u8>,
    big: bool,
}

impl Cursor {
    /// A cursor whose next record is `from`.
    pub fn new(from: u64) -> Cursor {
        Cursor {
            next: from,
            at: None,
            buf: Vec::new(),
            big: false,
        }
    }

    /// The sequence number of the next record it returns.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Records from the cursor on, up to `journal.committed()` and about
    /// `max_bytes` of data.
    ///
    /// # Errors
    /// [`CursorError::Gap`] when the journal no longer holds the next record.
    pub fn read(
        &mut self,
        journal: &Journal,
        max_bytes: usize,
    ) -> Result<Vec<OwnedRecord>, CursorError> {
        let mut out = Vec::new();
        let mut used = 0usize;
        loop {
            // the memory tail, or the segments before it
            let committed = {
                let g = journal.inner.lock().unwrap();
                let disk_next = g.disk_next();
                if self.next >= disk_next {
                    let skip = (self.next - disk_next) as usize;
                    for r in g.mem.iter().skip(skip) {
                        if used >= max_bytes {
                            break;
                        }
                        out.push(OwnedRecord {
                            kind: r.kind,
                            seq: r.seq,
                            offset: r.offset,
                            len: r.len,
                            data: r.data.clone(),
                        });
                        used += r.data.len() + RECORD_OVERHEAD as usize;
                        self.next += 1;
                    }
                    // a later read from a segment positions afresh
                    self.at = None;
                    self.big = false;
                    break;
                }
                disk_next - 1
            };
            if self.next > committed || used >= max_bytes {
                break;
            }
            if self.at.is_none() {
                self.position(journal)?;
            }
            let (path, file, pos) = self.at.as_mut().expect("positioned");
            // read what the segment holds from pos (bounded)
            let remaining = file.metadata()?.len().saturating_sub(*pos) as usize;
            // enough for the wanted bytes, or for one record of the largest size
            let want = if self.big {
                remaining.min(MAX_RECORD_DATA as usize + 64)
            } else {
                remaining.min(max_bytes.max(64 << 10) + (64 << 10))
            };
            self.buf.resize(want, 0);
            let n = file.read_at(&mut self.buf, *pos)?;
            self.buf.truncate(n);
            let mut off = 0usize;
            let mut progressed = false;
            while self.next <= committed && used < max_bytes {
                match decode_record(&self.buf[off..], self.next) {
                    Some((r, u)) => {
                        out.push(OwnedRecord {
                            kind: r.kind,
                            seq: r.seq,
                            offset: r.offset,
                            len: r.len,
                            data: Arc::new(r.data.to_vec()),
                        });
                        off += u;
                        used += u;
                        self.next += 1;
                        progressed = true;
                    }
                    None => break,
                }
            }
            *pos += off as u64;
            if used >= max_bytes {
                break;
            }
            if self.next > committed {
                // the segments are read: on to the memory tail
                continue;
            }
            if !progressed && !self.big && n < remaining {
                // a record larger than the read: read more
                self.big = true;
                continue;
            }
            self.big = false;
            if !progressed {
                // the end of this segment: the next one must start here
                let p = path.clone();
                let nextp = journal.dir.join(segment_name(self.next));
                if nextp.exists() && nextp != p {
                    self.at = None;
                    continue;
                }
                // a committed record we cannot read: its segment was dropped
                self.at = None;
                return Err(CursorError::Gap {
                    wanted: self.next,
                    oldest: journal.oldest(),
                });
            }
        }
        Ok(out)
    }

    fn position(&mut self, journal: &Journal) -> Result<(), CursorError> {
        let oldest = journal.oldest();
        if self.next < oldest {
            return Err(CursorError::Gap {
                wanted: self.next,
                oldest,
            });
        }
        let mut found = None;
        for p in segments(&journal.dir)? {
            let first = match first_of(&p) {
                Ok(f) => f,
                Err(_) => continue,
            };
            if first <= self.next {
                found = Some((p, first));
            } else {
                break;
            }
        }
        let Some((p, first)) = found else {
            return Err(CursorError::Gap {
                wanted: self.next,
                oldest,
            });
        };
        let file = File::open(&p)?;
        // skip the records before `next`, reading their headers only (their
        // data is not needed, and the one at `next` is checked when read)
        let mut pos = SEGMENT_HEADER_LEN as u64;
        let mut seq = first;
        let mut h = [0u8; RECORD_HEADER_LEN];
        while seq < self.next {
            let span = file
                .read_exact_at(&mut h, pos)
                .ok()
                .and_then(|_| record_span(&h, seq));
            match span {
                Some(u) => {
                    pos += u as u64;
                    seq += 1;
                }
                None => {
                    return Err(CursorError::Gap {
                        wanted: self.next,
                        oldest,
                    })
                }
            }
        }
        self.at = Some((p, file, pos));
        Ok(())
    }
}

/// One record read back from a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    pub kind: RecordKind,
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub data: Arc<Vec<u8>>,
}

/// Read every record of the journal in `dir`, in order.
///
/// # Errors
/// I/O errors, a damaged header, or sequence numbers that do not continue
/// from one segment to the next.
pub fn read_all(dir: &Path) -> io::Result<Vec<OwnedRecord>> {
    let mut out: Vec<OwnedRecord> = Vec::new();
    // records up to the floor may have left without reaching a segment
    let floor = read_seq(dir, "journal.floor")?;
    for p in segments(dir)? {
        let bytes = fs::read(&p)?;
        let seg = decode_segment(&bytes).map_err(|e| bad(&p, e))?;
        if let Some(last) = out.last() {
            if seg.first_seq != last.seq + 1 && seg.first_seq > floor + 1 {
                return Err(bad(
                    &p,
                    format!("starts at seq {} after {}: a gap", seg.first_seq, last.seq),
                ));
            }
        }
        for r in seg.records {
            out.push(OwnedRecord {
                kind: r.kind,
                seq: r.seq,
                offset: r.offset,
                len: r.len,
                data: Arc::new(r.data.to_vec()),
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
        match r.kind {
            RecordKind::Write => volume.write_all_at(&r.data, r.offset)?,
            RecordKind::Zero => {
                // in bounded pieces: a record may zero up to 1 GiB
                let zeros = vec![0u8; (r.len as usize).min(1 << 20)];
                let mut at = 0u64;
                while at < r.len as u64 {
                    let n = (r.len as u64 - at).min(zeros.len() as u64) as usize;
                    volume.write_all_at(&zeros[..n], r.offset + at)?;
                    at += n as u64;
                }
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
            j.record(RecordKind::Write, 0, 3, b"abc", |_| Ok(()))
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
        j.record(RecordKind::Write, 10, 2, b"xy", |_| Ok(()))
            .unwrap();
        let all = read_all(d.path()).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[2].data.as_slice(), b"xy");
    }

    #[test]
    fn an_apply_error_records_nothing_durably_new() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let e = j.record(RecordKind::Write, 0, 1, b"a", |_| {
            Err(io::Error::from_raw_os_error(28))
        });
        assert!(e.is_err());
        // a restart right after it finds no record of it
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.committed(), 0);
        assert!(read_all(d.path()).unwrap().is_empty());
        // the next record takes its place
        j.record(RecordKind::Write, 0, 1, b"b", |_| Ok(())).unwrap();
        let all = read_all(d.path()).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].data.as_slice(), b"b");
    }

    #[test]
    fn a_cursor_reads_committed_records_and_trim_and_drop_keep_a_floor() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        for i in 0..5u8 {
            j.record(RecordKind::Write, i as u64, 1, &[i], |_| Ok(()))
                .unwrap();
        }
        assert_eq!(j.durable(), 0, "nothing synced yet");
        let mut c = Cursor::new(1);
        let r = c.read(&j, 1 << 20).unwrap();
        assert_eq!(
            r.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        // a cursor that starts inside a segment skips the records before
        // it (by their headers) and reads the rest with their data
        let r = Cursor::new(4).read(&j, 1 << 20).unwrap();
        assert_eq!(
            r.iter()
                .map(|r| (r.seq, r.data.as_slice().to_vec()))
                .collect::<Vec<_>>(),
            vec![(4, vec![3u8]), (5, vec![4u8])]
        );
        // a barrier is durable at once
        j.barrier(|| Ok(())).unwrap();
        assert_eq!(c.read(&j, 1 << 20).unwrap()[0].seq, 6);
        // overflow: everything goes, the floor records what was acknowledged
        let x = j.drop_unshipped(3, |_| Ok(())).unwrap();
        assert_eq!(x, 7);
        assert_eq!(j.oldest(), 7);
        assert_eq!(j.floor(), 3);
        assert!(matches!(
            Cursor::new(4).read(&j, 1 << 20),
            Err(CursorError::Gap {
                wanted: 4,
                oldest: 7
            })
        ));
        j.record(RecordKind::Write, 0, 1, b"z", |_| Ok(())).unwrap();
        drop(j);
        // sequence numbers go on after a restart; the floor persists
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.committed(), 7);
        assert_eq!(j.durable(), 7, "what survived a restart is durable");
        assert_eq!(j.floor(), 3);
        assert_ne!(j.id(), [0; 16]);
    }

    #[test]
    fn a_journal_left_open_by_another_boot_starts_over_under_a_new_identity() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let id = j.id();
        j.record(RecordKind::Write, 0, 1, b"a", |_| Ok(())).unwrap();
        drop(j);
        // a process crash (same boot): the journal and its identity stay
        let j = Journal::open(d.path()).unwrap();
        assert_eq!((j.id(), j.committed()), (id, 1));
        j.close_clean().unwrap();
        drop(j);
        // a clean stop, then a reboot: still the same journal
        std::fs::write(d.path().join("journal.state"), "another-boot clean\n").unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert_eq!((j.id(), j.committed()), (id, 1));
        drop(j);
        // left open by another boot (a machine crash): records not synced
        // may be gone, so it starts over with a new identity
        std::fs::write(d.path().join("journal.state"), "another-boot running\n").unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert_ne!(j.id(), id);
        assert_eq!(j.committed(), 0);
        assert_eq!(j.floor(), 0);
        assert!(Cursor::new(1).read(&j, 1 << 20).unwrap().is_empty());
        // it follows the old one, up to what the dirty map had forgotten
        assert_eq!(j.follows(), Some((id, 0)));
        j.set_cleared(1).unwrap();
        let id2 = j.id();
        drop(j);
        std::fs::write(d.path().join("journal.state"), "another-boot running\n").unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.follows(), Some((id2, 1)));
        assert_eq!(j.committed(), 0);
    }

    /// Bytes of the segment files in `d`.
    fn seg_bytes(d: &Path) -> u64 {
        segments(d)
            .unwrap()
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum()
    }

    #[test]
    fn journals_sharing_a_memory_budget_spill_their_own_records_only() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let budget = MemoryBudget::new(1000);
        let a = Journal::open_with_budget(da.path(), budget.clone()).unwrap();
        let b = Journal::open_with_budget(db.path(), budget.clone()).unwrap();
        let (ea, eb) = (seg_bytes(da.path()), seg_bytes(db.path()));
        let w = |j: &Journal, i: u64| {
            j.record_shared(RecordKind::Write, i, Arc::new(vec![i as u8; 100]), |_| {
                Ok(())
            })
            .unwrap()
        };
        for i in 1..=7 {
            w(&a, i);
        }
        assert_eq!(budget.used(), 7 * 132);
        // a's tail holds the budget: b's record goes to its segment, and
        // none of a's records moves
        w(&b, 1);
        assert_eq!(seg_bytes(db.path()), eb + 132);
        assert_eq!((seg_bytes(da.path()), budget.used()), (ea, 7 * 132));
        // a is acknowledged: b's next records stay in memory
        a.release(7);
        assert_eq!(budget.used(), 0);
        w(&b, 2);
        assert_eq!((seg_bytes(db.path()), budget.used()), (eb + 132, 132));
        // b's records read back in order from its segment and its tail
        let got = Cursor::new(1).read(&b, 1 << 20).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        // a full budget held by the writing journal itself: it spills its
        // own oldest records
        for i in 3..=9 {
            w(&b, i);
        }
        assert!(seg_bytes(db.path()) > eb + 132);
        assert!(budget.used() <= 1000, "{}", budget.used());
        // a journal dropped without a clean stop gives its share back
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_memory_tail_ships_without_segments_spills_when_full_and_is_kept_by_a_clean_stop() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open_with_memory(d.path(), 1000).unwrap();
        let empty = seg_bytes(d.path());
        let w = |j: &Journal, i: u64| {
            j.record_shared(
                RecordKind::Write,
                i * 10,
                Arc::new(vec![i as u8; 100]),
                |_| Ok(()),
            )
            .unwrap()
        };
        for i in 1..=5 {
            assert_eq!(w(&j, i), i);
        }
        assert_eq!(seg_bytes(d.path()), empty, "the tail is in memory");
        assert_eq!(j.bytes(), empty + 5 * 132);
        let mut c = Cursor::new(1);
        let got = c.read(&j, 1 << 20).unwrap();
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(got[2].data.as_slice(), &[3u8; 100][..]);
        // acknowledged: released
        j.release(2);
        assert_eq!(j.bytes(), empty + 3 * 132);
        // full: the oldest records of the tail (3..=5) go to a segment
        // until it is three quarters full with the next one
        for i in 6..=9 {
            w(&j, i);
        }
        assert_eq!(seg_bytes(d.path()), empty);
        w(&j, 10);
        assert_eq!(seg_bytes(d.path()), empty + 3 * 132);
        assert_eq!(j.bytes(), empty + 8 * 132);
        // 1 and 2 left the tail acknowledged: the new segment starts at 3
        assert_eq!((j.floor(), j.oldest()), (2, 3));
        // a cursor that was in the memory tail goes on from the segment
        let got = c.read(&j, 1 << 20).unwrap();
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (6..=10).collect::<Vec<_>>()
        );
        let mut c = Cursor::new(3);
        let got = c.read(&j, 1 << 20).unwrap();
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (3..=10).collect::<Vec<_>>()
        );
        assert!(got.iter().all(|r| r.data.as_slice() == [r.seq as u8; 100]));
        // a clean stop writes the tail; the next open has every record
        j.close_clean().unwrap();
        let id = j.id();
        drop(j);
        let j = Journal::open_with_memory(d.path(), 1000).unwrap();
        assert_eq!((j.id(), j.committed()), (id, 10));
        let got = Cursor::new(3).read(&j, 1 << 20).unwrap();
        assert_eq!(got.len(), 8);
        let all = read_all(d.path()).unwrap();
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (3..=10).collect::<Vec<_>>()
        );
        // a crash of the agent loses the tail: a new journal follows this one
        w(&j, 11);
        drop(j);
        let j = Journal::open_with_memory(d.path(), 1000).unwrap();
        assert_ne!(j.id(), id);
        assert_eq!(j.follows(), Some((id, 0)));
        assert_eq!(j.committed(), 0);
    }

    #[test]
    fn a_clean_stop_after_the_tail_was_released_keeps_the_numbering() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open_with_memory(d.path(), 1 << 20).unwrap();
        for i in 0..3u64 {
            j.record(RecordKind::Write, i, 1, b"x", |_| Ok(())).unwrap();
        }
        j.release(3);
        j.set_cleared(2).unwrap();
        j.close_clean().unwrap();
        // a clear pass finishing after the stop writes nothing
        j.set_cleared(3).unwrap();
        let cleared = std::fs::read_to_string(d.path().join("journal.cleared")).unwrap();
        assert_eq!(cleared, "2");
        let id = j.id();
        drop(j);
        let j = Journal::open_with_memory(d.path(), 1 << 20).unwrap();
        assert_eq!((j.id(), j.committed(), j.floor()), (id, 3, 3));
        assert_eq!(
            j.record(RecordKind::Write, 0, 1, b"y", |_| Ok(())).unwrap(),
            4
        );
        // a follows file is forgotten for good
        j.forget_follows().unwrap();
        assert_eq!(j.follows(), None);
    }
}
