//! The persistent dirty map (format in `lifeboat_format::dirtymap`): marks
//! the chunks a write touches, durably, before the write is acknowledged,
//! as DRBD's activity log does. Only clean→dirty transitions cost a write
//! and an fdatasync of the map (~0.1 ms here, 0.3 ms while the disk is
//! busy), and a clean chunk marks its whole group of [`MARK_GROUP`] chunks
//! (4 MiB, DRBD's extent size) and the clean groups of its region (up to
//! 64 MiB): writes to a group already dirty cost nothing. The map is
//! therefore exact after a process crash *and* after a machine crash.
//!
//! Replication clears bits again, a group at a time: a group is cleared
//! once the recovery site has acknowledged every journal record that
//! touched its region (their last sequence, kept in memory), those writes
//! are durable in the local volume (a flush, or the agent's own sync
//! before clearing: a machine crash can lose a write the recovery site
//! holds, and that chunk must then be compared), and no resync of it is
//! pending. The caller keeps recently written groups hot (see the
//! shipper), so a busy region is not cleared and re-marked over and over. Bits found set at open
//! (after a crash or restart) are pending resyncs: they are compared by hash
//! with the replica, so only chunks that differ travel.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lifeboat_format::dirtymap::{DirtyMapHeader, HEADER_LEN};

/// Chunks marked together (see [`DirtyMap::mark`]).
pub const MARK_GROUP: u64 = 64;
/// Groups a clean group's mark takes along at most (an aligned region of
/// 16 groups, 64 MiB with 64 KiB chunks), and never more than 1/64 of the
/// volume (see [`DirtyMap::mark`]).
pub const MARK_REGION_MAX: u64 = 16;
const _: () = assert!(
    MARK_GROUP.is_multiple_of(8),
    "a mark group is whole bytes of the bitmap"
);

pub struct DirtyMap {
    file: File,
    header: DirtyMapHeader,
    bits: Mutex<Vec<u8>>,
    track: Mutex<Track>,
    /// `<map>.state`: the boot id of the running agent and whether it
    /// stopped cleanly.
    state: std::path::PathBuf,
    /// Writes of bits to the file so far (a generation number); the last
    /// one of them an fdatasync covered. The sync runs outside the bits'
    /// lock: writes into groups already marked do not wait for it, and
    /// marks made meanwhile share the next one.
    written: AtomicU64,
    synced: AtomicU64,
    sync_lock: Mutex<()>,
    /// A write or sync of the map failed: the bits on disk are unknown, so
    /// every later mark fails too (an fdatasync error is reported once; a
    /// later sync that "succeeds" proves nothing) until the map is reopened.
    failed: std::sync::atomic::AtomicBool,
    /// Closed cleanly: nothing is written any more (a clear pass still
    /// finishing after the stop must not write this map's bits over those
    /// of the map a restart of the volume opened on the same file).
    closed: std::sync::atomic::AtomicBool,
}

/// Whether chunk `c`'s bit is set.
fn bit(bits: &[u8], c: u64) -> bool {
    bits[(c / 8) as usize] & (1u8 << (c % 8)) != 0
}

/// Set (`on`) or clear chunk `c`'s bit.
fn put_bit(bits: &mut [u8], c: u64, on: bool) {
    let (b, m) = ((c / 8) as usize, 1u8 << (c % 8));
    if on {
        bits[b] |= m;
    } else {
        bits[b] &= !m;
    }
}

/// Byte ranges (merged) of the chunks whose bits are set.
fn ranges(h: &DirtyMapHeader, bits: &[u8]) -> Vec<Range<u64>> {
    let cs = h.chunk_size as u64;
    let mut out: Vec<Range<u64>> = Vec::new();
    for c in 0..h.chunks() {
        if bit(bits, c) {
            let s = c * cs;
            let e = (s + cs).min(h.size);
            match out.last_mut() {
                Some(r) if r.end == s => r.end = e,
                _ => out.push(s..e),
            }
        }
    }
    out
}

fn state_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("state")
}

pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The state file `p` ("<boot id> <how>", how: running, running-memory or
/// clean) of a map or journal, if there is one.
pub(crate) fn read_state(p: &Path) -> Option<(String, String)> {
    let s = std::fs::read_to_string(p).ok()?;
    let mut it = s.split_whitespace();
    Some((it.next()?.to_string(), it.next().unwrap_or("").to_string()))
}

/// Whether the state file `p` says its owner was left open by another
/// boot: the machine crashed while it ran.
pub(crate) fn left_open_by_another_boot(p: &Path) -> bool {
    read_state(p).is_some_and(|(boot, how)| how != "clean" && boot != boot_id())
}

/// Replace the file `p` with `bytes`, durably: a temporary name beside it,
/// synced, renamed over it, the directory synced.
pub(crate) fn write_atomic(p: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, p)?;
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// In-memory state per chunk for replication.
struct Track {
    /// Sequence of the last journal record that touched the chunk (which
    /// chunks to flag when records are dropped).
    last_seq: Vec<u64>,
    /// 0: nothing pending; 1: needs a resync; 2: in the current resync pass.
    needs: Vec<u8>,
    /// How many entries of `needs` are not 0 (asked every few ms by the
    /// shipper: kept, not counted).
    pending: u64,
    /// Records up to this sequence are durable in the local volume.
    volume_synced: u64,
    /// The volume was synced since the map was opened (until then even the
    /// data a resync pass sent from the page cache may not be on disk).
    volume_sync_seen: bool,
    /// Writes marked but not yet journaled (`mark` .. `note`), per chunk:
    /// a chunk with one in flight is never cleared.
    inflight: Vec<u32>,
    /// Per mark group: the map write that set its bits (durable once the
    /// synced generation reaches it; 0: read from the file).
    gen: Vec<u64>,
    /// Per mark group: the count of marks when it was last written to
    /// (0: not since the map was opened), for the hot set.
    touch: Vec<u64>,
    marks: u64,
    /// Groups per region (see [`DirtyMap::mark`]).
    region: u64,
    /// Per region: the sequence of the last journal record that touched
    /// it. A region's groups are cleared only once it holds no record
    /// newer than the clear's limit (which covers each group's own
    /// records): the groups a mark took along are not cleared (and marked
    /// again) while their region is being written.
    region_seq: Vec<u64>,
}

impl Track {
    fn new(chunks: u64, bits: &[u8]) -> Track {
        let groups = chunks.div_ceil(MARK_GROUP);
        // at most 1/64 of the volume per mark
        let region = (groups / 64).clamp(1, MARK_REGION_MAX);
        let needs: Vec<u8> = (0..chunks).map(|c| bit(bits, c) as u8).collect();
        Track {
            last_seq: vec![0; chunks as usize],
            pending: needs.iter().filter(|n| **n != 0).count() as u64,
            needs,
            volume_synced: 0,
            volume_sync_seen: false,
            inflight: vec![0; chunks as usize],
            gen: vec![0; groups as usize],
            touch: vec![0; groups as usize],
            marks: 0,
            region,
            region_seq: vec![0; groups.div_ceil(region) as usize],
        }
    }

    /// Flag chunk `c` as needing a resync.
    fn flag(&mut self, c: usize) {
        if self.needs[c] == 0 {
            self.pending += 1;
        }
        self.needs[c] = 1;
    }
}

impl DirtyMap {
    /// Open the map at `path`, or create it (all clean) for a volume of
    /// `size` bytes in chunks of `chunk_size`. A map for another geometry, or
    /// with a damaged header, is an error: the caller must resync fully.
    ///
    /// # Errors
    /// I/O errors, or a map that does not match the volume.
    pub fn open(path: &Path, chunk_size: u32, size: u64) -> io::Result<DirtyMap> {
        let want = DirtyMapHeader { chunk_size, size };
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if !exists || file.metadata()?.len() == 0 {
            let mut all = want.encode().to_vec();
            all.resize(HEADER_LEN + want.bitmap_len() as usize, 0);
            file.write_all_at(&all, 0)?;
            file.sync_all()?;
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            let bits = vec![0; want.bitmap_len() as usize];
            let m = DirtyMap {
                file,
                header: want,
                track: Mutex::new(Track::new(want.chunks(), &bits)),
                bits: Mutex::new(bits),
                state: state_path(path),
                written: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                sync_lock: Mutex::new(()),
                failed: false.into(),
                closed: false.into(),
            };
            m.check_boot()?;
            return Ok(m);
        }
        let mut h = [0u8; HEADER_LEN];
        file.read_exact_at(&mut h, 0)?;
        let header = DirtyMapHeader::decode(&h).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        if header != want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: made for {} bytes in chunks of {}, the volume has {size} in chunks of {chunk_size}", path.display(), header.size, header.chunk_size),
            ));
        }
        let mut bits = vec![0u8; header.bitmap_len() as usize];
        file.read_exact_at(&mut bits, HEADER_LEN as u64)?;
        // bits a crashed process wrote but did not sync yet count as
        // durable from now on (marks into their groups do not sync again)
        file.sync_data()?;
        let m = DirtyMap {
            file,
            header,
            track: Mutex::new(Track::new(header.chunks(), &bits)),
            bits: Mutex::new(bits),
            state: state_path(path),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            failed: false.into(),
            closed: false.into(),
        };
        m.check_boot()?;
        Ok(m)
    }

    /// Whether the agent that last had the map open stopped cleanly. The
    /// map is exact either way (its marks are synced before the writes they
    /// cover are acknowledged); after a machine crash its dirty groups are
    /// what the recovery site must compare.
    fn check_boot(&self) -> io::Result<()> {
        if left_open_by_another_boot(&self.state) {
            tracing::warn!(
                "{}: the machine restarted without a clean stop of the agent: the {} dirty \
                 chunks will be compared",
                self.state.display(),
                self.pending()
            );
        }
        write_atomic(&self.state, format!("{} running\n", boot_id()).as_bytes())
    }

    /// Stop cleanly: the map is synced and marked exact for the next start,
    /// even after a reboot.
    ///
    /// # Errors
    /// I/O errors.
    pub fn close_clean(&self) -> io::Result<()> {
        {
            // after any write in progress (they hold the bits' lock)
            let _bits = self.bits.lock().unwrap();
            self.closed.store(true, Ordering::SeqCst);
        }
        self.file.sync_all()?;
        write_atomic(&self.state, format!("{} clean\n", boot_id()).as_bytes())
    }

    fn chunk_range(&self, offset: u64, len: u64) -> Range<u64> {
        let cs = self.header.chunk_size as u64;
        if len == 0 {
            return 0..0;
        }
        (offset / cs)..((offset + len - 1) / cs + 1).min(self.header.chunks())
    }

    /// Mark the chunks of `[offset, offset+len)` dirty, durably. A clean
    /// chunk marks its whole group of [`MARK_GROUP`] chunks (4 MiB with 64 KiB
    /// chunks), as DRBD's activity log marks extents: sequential and nearby
    /// writes then cost one synced map update per group, not one per chunk;
    /// a resync after a crash compares the group by hash. The same write
    /// also marks the clean groups of the group's aligned region (up to
    /// [`MARK_REGION_MAX`] groups, at most 1/64 of the volume): random writes
    /// spread over a volume then pay one fdatasync per region, not one per
    /// group, for at most a region per mark to compare after a crash (the
    /// caller's hot set bounds what stays marked). Returns whether the map
    /// changed (and so was written and synced).
    ///
    /// # Errors
    /// I/O errors writing the map: the write must then not be acknowledged.
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<bool> {
        let r = self.chunk_range(offset, len);
        if r.is_empty() {
            return Ok(false);
        }
        self.check_failed()?;
        let (changed, needed) = {
            let mut bits = self.bits.lock().unwrap();
            let mut t = self.track.lock().unwrap();
            // in flight until `note` gives the record's sequence: a clearing
            // pass in between must not clear these bits (a count, as
            // several writes to one chunk may be in flight; one that fails
            // keeps its chunk dirty until the next start)
            for c in r.clone() {
                t.inflight[c as usize] += 1;
            }
            t.marks += 1;
            let now = t.marks;
            for grp in r.start / MARK_GROUP..=(r.end - 1) / MARK_GROUP {
                t.touch[grp as usize] = now;
            }
            let (mut lo, mut hi) = (usize::MAX, 0usize);
            let mut groups = Vec::new();
            let chunks = self.header.chunks();
            let ngroups = chunks.div_ceil(MARK_GROUP);
            let region = t.region;
            for c in r.clone() {
                if bit(&bits, c) {
                    continue;
                }
                // the group and the clean groups of its region: one synced
                // write instead of one for each as random writes reach them
                let r0 = c / MARK_GROUP / region * region;
                for grp in r0..(r0 + region).min(ngroups) {
                    let g = grp * MARK_GROUP..((grp + 1) * MARK_GROUP).min(chunks);
                    let (b0, b1) = ((g.start / 8) as usize, g.end.div_ceil(8) as usize);
                    if g.clone().all(|x| bit(&bits, x)) {
                        continue;
                    }
                    for x in g {
                        put_bit(&mut bits, x, true);
                    }
                    lo = lo.min(b0);
                    hi = hi.max(b1);
                    groups.push(grp);
                }
            }
            if lo != usize::MAX {
                let g = self.write_bits(&bits, lo, hi)?;
                for grp in groups {
                    t.gen[grp as usize] = g;
                    // the region is hot together (kept, then cleared, as one)
                    t.touch[grp as usize] = now;
                }
            }
            // the write waits for the map write that set its groups' bits,
            // its own or one still being synced for another write
            let needed = (r.start / MARK_GROUP..=(r.end - 1) / MARK_GROUP)
                .map(|grp| t.gen[grp as usize])
                .max()
                .unwrap_or(0);
            (lo != usize::MAX, needed)
        };
        // durable before the write it covers is acknowledged
        self.synced_to(needed)?;
        Ok(changed)
    }

    /// Write the bitmap bytes `lo..hi` to the file (under the bits' lock,
    /// so the file follows memory in order); returns the write's
    /// generation, for [`DirtyMap::synced_to`]. A failure fails the map.
    fn write_bits(&self, bits: &[u8], lo: usize, hi: usize) -> io::Result<u64> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::other("the dirty map was closed"));
        }
        if let Err(e) = self
            .file
            .write_all_at(&bits[lo..hi], (HEADER_LEN + lo) as u64)
        {
            self.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        Ok(self.written.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Make the map's writes up to generation `needed` durable: one
    /// fdatasync covers every write made before it started, so writers
    /// waiting here together share it.
    fn synced_to(&self, needed: u64) -> io::Result<()> {
        self.check_failed()?;
        // writes into groups already durable do not wait for a sync
        if self.synced.load(Ordering::SeqCst) >= needed {
            return Ok(());
        }
        let _g = self.sync_lock.lock().unwrap();
        self.check_failed()?;
        if self.synced.load(Ordering::SeqCst) >= needed {
            return Ok(());
        }
        let target = self.written.load(Ordering::SeqCst);
        if let Err(e) = self.file.sync_data() {
            self.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
        self.synced.store(target, Ordering::SeqCst);
        Ok(())
    }

    fn check_failed(&self) -> io::Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "the dirty map could not be written or synced earlier; restart the agent",
            ));
        }
        Ok(())
    }

    /// The dirty ranges recorded in the map at `path`, read without
    /// opening it for use (no boot check, nothing written): for inspection.
    ///
    /// # Errors
    /// I/O errors or a damaged header.
    pub fn read_ranges(path: &Path) -> io::Result<Vec<Range<u64>>> {
        let bytes = std::fs::read(path)?;
        let header = DirtyMapHeader::decode(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        let bits = bytes
            .get(HEADER_LEN..HEADER_LEN + header.bitmap_len() as usize)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: truncated", path.display()),
                )
            })?;
        Ok(ranges(&header, bits))
    }

    pub fn chunk_size(&self) -> u32 {
        self.header.chunk_size
    }

    /// Journal record `seq` touched `[offset, offset+len)` (called under the
    /// journal lock, so sequences per chunk only grow).
    pub fn note(&self, offset: u64, len: u64, seq: u64) {
        let r = self.chunk_range(offset, len);
        let mut t = self.track.lock().unwrap();
        for c in r.clone() {
            let c = c as usize;
            t.last_seq[c] = t.last_seq[c].max(seq);
            t.inflight[c] = t.inflight[c].saturating_sub(1);
        }
        if !r.is_empty() {
            let per = MARK_GROUP * t.region;
            for reg in r.start / per..=(r.end - 1) / per {
                let s = &mut t.region_seq[reg as usize];
                *s = (*s).max(seq);
            }
        }
    }

    /// Chunks touched by records after `acked` need a resync (their
    /// records are being dropped): flag them and make sure their bits are
    /// set on disk. Returns how many were flagged.
    ///
    /// # Errors
    /// I/O errors writing the map.
    pub fn flag_unacked(&self, acked: u64) -> io::Result<u64> {
        let mut bits = self.bits.lock().unwrap();
        let mut t = self.track.lock().unwrap();
        let mut n = 0;
        for c in 0..self.header.chunks() as usize {
            if t.last_seq[c] > acked || t.inflight[c] > 0 {
                t.flag(c);
                put_bit(&mut bits, c as u64, true);
                n += 1;
            }
        }
        let g = self.write_bits(&bits, 0, bits.len())?;
        self.synced_to(g)?;
        Ok(n)
    }

    /// Flag every chunk as needing a resync (a full compare by hash).
    pub fn flag_all(&self) {
        let mut t = self.track.lock().unwrap();
        for c in 0..t.needs.len() {
            t.flag(c);
        }
    }

    /// Chunks pending a resync.
    pub fn pending(&self) -> u64 {
        self.track.lock().unwrap().pending
    }

    /// Start a resync pass: the chunks that need one, now "in the pass".
    pub fn pass_begin(&self) -> Vec<u64> {
        let mut t = self.track.lock().unwrap();
        let mut out = Vec::new();
        for (c, n) in t.needs.iter_mut().enumerate() {
            if *n != 0 {
                *n = 2;
                out.push(c as u64);
            }
        }
        out
    }

    /// End a resync pass: acknowledged by the recovery site (`ok`) or not.
    /// Chunks flagged again during the pass stay pending.
    pub fn pass_end(&self, ok: bool) {
        let mut t = self.track.lock().unwrap();
        let mut cleared = 0;
        for n in t.needs.iter_mut() {
            if *n == 2 {
                *n = if ok { 0 } else { 1 };
                cleared += ok as u64;
            }
        }
        t.pending -= cleared;
    }

    /// Records up to `seq` are durable in the local volume (it was synced
    /// after they were applied).
    pub fn volume_synced(&self, seq: u64) {
        let mut t = self.track.lock().unwrap();
        t.volume_synced = t.volume_synced.max(seq);
        t.volume_sync_seen = true;
    }

    /// Whether the volume was synced since the map was opened.
    pub fn volume_sync_seen(&self) -> bool {
        self.track.lock().unwrap().volume_sync_seen
    }

    /// Records up to this sequence are durable in the local volume.
    pub fn volume_synced_upto(&self) -> u64 {
        self.track.lock().unwrap().volume_synced
    }

    /// Clear the groups of chunks the recovery site holds: in each, no
    /// resync pending and every record touching a chunk at or below both
    /// `acked` and the volume's synced sequence. Returns how many bits were
    /// cleared (the map is synced if any).
    ///
    /// # Errors
    /// I/O errors writing the map.
    pub fn clear_acked(&self, acked: u64) -> io::Result<u64> {
        self.clear_acked_keeping(acked, 0)
    }

    /// [`DirtyMap::clear_acked`], keeping the `hot` groups written to most
    /// recently set (as DRBD's activity log keeps its extents): a working
    /// set that is written again and again is not marked (and synced)
    /// again each time. A crash then compares those groups too.
    ///
    /// # Errors
    /// As [`DirtyMap::clear_acked`].
    pub fn clear_acked_keeping(&self, acked: u64, hot: usize) -> io::Result<u64> {
        let mut bits = self.bits.lock().unwrap();
        let t = self.track.lock().unwrap();
        if !t.volume_sync_seen {
            return Ok(0);
        }
        let groups = self.clearable(&bits, &t, acked.min(t.volume_synced), hot);
        let chunks = self.header.chunks() as usize;
        let (mut lo, mut hi, mut n) = (usize::MAX, 0usize, 0u64);
        for g0 in groups {
            let g = g0..(g0 + MARK_GROUP as usize).min(chunks);
            for c in g {
                if bit(&bits, c as u64) {
                    put_bit(&mut bits, c as u64, false);
                    lo = lo.min(c / 8);
                    hi = hi.max(c / 8 + 1);
                    n += 1;
                }
            }
        }
        drop(t);
        if n > 0 {
            let g = self.write_bits(&bits, lo, hi)?;
            drop(bits);
            self.synced_to(g)?;
        }
        Ok(n)
    }

    /// Whether [`DirtyMap::clear_acked_keeping`] would clear anything once
    /// the writes up to `acked` are durable in the volume (so the volume
    /// is synced only when that pays).
    pub fn would_clear(&self, acked: u64, hot: usize) -> bool {
        let bits = self.bits.lock().unwrap();
        let t = self.track.lock().unwrap();
        !self.clearable(&bits, &t, acked, hot).is_empty()
    }

    /// The first chunks of the groups that have bits set and may be
    /// cleared: no resync pending, no write in flight, every record up to
    /// `upto`, and not among the `hot` groups marked most recently.
    fn clearable(&self, bits: &[u8], t: &Track, upto: u64, hot: usize) -> Vec<usize> {
        let chunks = self.header.chunks() as usize;
        // a group's bits are whole bytes (MARK_GROUP is a multiple of 8):
        // an all-zero group costs one look at its bytes
        let empty = |g0: usize| {
            let end = (g0 + MARK_GROUP as usize).min(chunks).div_ceil(8);
            bits[g0 / 8..end].iter().all(|b| *b == 0)
        };
        let mut out = Vec::new();
        for g0 in (0..chunks).step_by(MARK_GROUP as usize) {
            if empty(g0) {
                continue;
            }
            let g = g0..(g0 + MARK_GROUP as usize).min(chunks);
            let mut any = false;
            let mut clearable = true;
            for c in g {
                if bit(bits, c as u64) {
                    any = true;
                    clearable &= t.needs[c] == 0 && t.inflight[c] == 0;
                }
            }
            // no record after `upto` touched the group's region (nor so
            // the group: `note` raises a region's sequence with its chunks')
            let reg = g0 / (MARK_GROUP * t.region) as usize;
            if any && clearable && t.region_seq[reg] <= upto {
                out.push(g0);
            }
        }
        if hot > 0 {
            // the hot set: the `hot` groups (with bits set) touched last
            let mut touched: Vec<u64> = (0..chunks)
                .step_by(MARK_GROUP as usize)
                .filter(|&g0| !empty(g0))
                .map(|g0| t.touch[g0 / MARK_GROUP as usize])
                .filter(|&x| x > 0)
                .collect();
            let threshold = if touched.len() > hot {
                let k = touched.len() - hot;
                *touched.select_nth_unstable(k).1
            } else {
                1
            };
            out.retain(|&g0| t.touch[g0 / MARK_GROUP as usize] < threshold);
        }
        out
    }

    /// Dirty chunks, as byte ranges of the volume (merged).
    pub fn dirty_ranges(&self) -> Vec<Range<u64>> {
        ranges(&self.header, &self.bits.lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_persist_and_only_transitions_sync() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.map");
        let m = DirtyMap::open(&p, 4096, 100_000).unwrap();
        assert!(m.mark(5000, 10).unwrap());
        assert!(!m.mark(4096, 4096).unwrap(), "already dirty: no sync");
        assert!(
            !m.mark(8000, 200).unwrap(),
            "the first mark took the whole group"
        );
        drop(m);
        let m = DirtyMap::open(&p, 4096, 100_000).unwrap();
        assert_eq!(m.dirty_ranges(), vec![0..100_000]);
        // a map with more than one group marks only the group written
        let p2 = d.path().join("big.map");
        let m = DirtyMap::open(&p2, 4096, 4096 * 200).unwrap();
        assert!(m.mark(4096 * 70, 1).unwrap());
        assert_eq!(m.dirty_ranges(), vec![4096 * 64..4096 * 128]);
        assert!(
            DirtyMap::open(&p, 8192, 100_000).is_err(),
            "another geometry is refused"
        );
    }

    #[test]
    fn a_clean_group_marks_the_clean_groups_of_its_region_in_one_write() {
        let d = tempfile::tempdir().unwrap();
        let cs = 4096u64;
        let group = cs * MARK_GROUP;
        let region = group * MARK_REGION_MAX;
        let p = d.path().join("dirty.map");
        let m = DirtyMap::open(&p, cs as u32, region * 64).unwrap();
        // a group of region 2 is dirty already: a mark leaves its state alone
        assert!(m.mark(region * 2 + group, 1).unwrap());
        m.note(region * 2 + group, 1, 1);
        assert_eq!(m.dirty_ranges(), vec![region * 2..region * 3]);
        let writes = m.written.load(Ordering::SeqCst);
        assert!(m.mark(region * 3 + group * 5 + 7, 1).unwrap());
        assert_eq!(
            m.written.load(Ordering::SeqCst),
            writes + 1,
            "one write of the map for the region"
        );
        assert_eq!(m.dirty_ranges(), vec![region * 2..region * 4]);
        assert_eq!(
            DirtyMap::read_ranges(&p).unwrap(),
            m.dirty_ranges(),
            "the region is in the file when the mark returns"
        );
        m.note(region * 3 + group * 5 + 7, 1, 1);
        // the rest of the region costs nothing now
        assert!(!m.mark(region * 3 + group * 15, cs).unwrap());
        m.note(region * 3 + group * 15, cs, 2);
        // a write across the boundary marks the next region, not a third
        assert!(m.mark(region * 4 - 1, 2).unwrap());
        m.note(region * 4 - 1, 2, 3);
        assert_eq!(m.dirty_ranges(), vec![region * 2..region * 5]);
        // a region holding a record newer than the limit keeps all its
        // groups, those taken along too (they are not cleared, then
        // marked again, while it is being written)
        m.volume_synced(3);
        assert_eq!(m.clear_acked_keeping(2, 0).unwrap(), MARK_GROUP * 16);
        assert_eq!(m.dirty_ranges(), vec![region * 3..region * 5]);
        // the groups a mark took along are hot with it: keeping 16 groups
        // keeps the region marked last (and the group written with it)
        assert_eq!(m.clear_acked_keeping(3, 16).unwrap(), 15 * MARK_GROUP);
        assert_eq!(m.dirty_ranges(), vec![group * 63..region * 5]);
        // closed cleanly: a late clear writes nothing over the file
        m.close_clean().unwrap();
        assert!(m.clear_acked(3).is_err());
        assert_eq!(
            DirtyMap::read_ranges(&p).unwrap(),
            vec![group * 63..region * 5]
        );
        // the last region of a volume whose size is not a multiple of the
        // region (nor of the group) is marked up to the volume's end
        let size = region * 64 + group * 3 + cs * 5;
        let m = DirtyMap::open(&d.path().join("odd.map"), cs as u32, size).unwrap();
        assert!(m.mark(size - 1, 1).unwrap());
        assert_eq!(m.dirty_ranges(), vec![region * 64..size]);
        // a small volume: a mark takes at most 1/64 of it (here 2 groups)
        let m = DirtyMap::open(&d.path().join("small.map"), cs as u32, group * 128).unwrap();
        assert!(m.mark(group * 3, 1).unwrap());
        assert_eq!(m.dirty_ranges(), vec![group * 2..group * 4]);
    }

    #[test]
    fn concurrent_marks_each_return_with_their_groups_in_the_file() {
        // 4 threads mark 64 groups (some twice, some in the same group at
        // once); when a mark returns, its group is in the file (a reader of
        // the file, as after a crash, sees it)
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.map");
        let cs = 4096u64;
        let group = cs * MARK_GROUP;
        let m = DirtyMap::open(&p, cs as u32, group * 64).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (m, p) = (&m, &p);
                s.spawn(move || {
                    for i in 0..32u64 {
                        let g = (i * 2 + t / 2) % 64;
                        let off = g * group + (t % 2) * cs;
                        m.mark(off, 1).unwrap();
                        let on_disk = DirtyMap::read_ranges(p).unwrap();
                        assert!(
                            on_disk.iter().any(|r| r.contains(&off)),
                            "group {g} not in the file after its mark returned"
                        );
                    }
                });
            }
        });
        assert_eq!(DirtyMap::read_ranges(&p).unwrap(), vec![0..group * 64]);
    }

    #[test]
    fn the_groups_written_last_stay_set_as_a_hot_set() {
        let d = tempfile::tempdir().unwrap();
        let cs = 4096u64;
        let group = cs * MARK_GROUP;
        let m = DirtyMap::open(&d.path().join("dirty.map"), cs as u32, group * 10).unwrap();
        for g in 0..10u64 {
            m.mark(g * group, 1).unwrap();
            m.note(g * group, 1, g + 1);
        }
        // nothing is cleared before the volume was synced since the open
        // (not even at sequence 0: a resync pass sends page-cache data)
        assert_eq!(m.clear_acked(10).unwrap(), 0);
        assert!(!m.volume_sync_seen());
        m.volume_synced(10);
        assert!(m.would_clear(10, 3));
        // the 3 groups written last stay
        assert_eq!(m.clear_acked_keeping(10, 3).unwrap(), 7 * MARK_GROUP);
        assert_eq!(m.dirty_ranges(), vec![7 * group..10 * group]);
        assert!(!m.would_clear(10, 3), "only hot groups are left");
        // group 0 written again: it joins the hot set, the oldest leaves
        m.mark(0, 1).unwrap();
        m.note(0, 1, 11);
        m.volume_synced(11);
        assert_eq!(m.clear_acked_keeping(11, 3).unwrap(), MARK_GROUP);
        assert_eq!(m.dirty_ranges(), vec![0..group, 8 * group..10 * group]);
        // a clean stop keeps none
        assert_eq!(m.clear_acked(11).unwrap(), 3 * MARK_GROUP);
        assert!(m.dirty_ranges().is_empty());
    }

    #[test]
    fn bits_clear_only_when_acknowledged_and_no_resync_is_pending() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.map");
        // two groups of 64 chunks and one of 2
        let m = DirtyMap::open(&p, 4096, 4096 * 130).unwrap();
        m.mark(0, 10).unwrap();
        m.note(0, 10, 5);
        m.mark(4096, 10).unwrap();
        m.note(4096, 10, 7);
        m.mark(4096 * 64, 10).unwrap();
        m.note(4096 * 64, 10, 6);
        m.volume_synced(100);
        assert_eq!(
            m.clear_acked(6).unwrap(),
            64,
            "the second group is acked; the first not (its chunk 1 is at 7)"
        );
        assert_eq!(m.dirty_ranges(), vec![0..4096 * 64]);
        // a restart: the group is pending a resync until a pass is acked
        drop(m);
        let m = DirtyMap::open(&p, 4096, 4096 * 130).unwrap();
        m.volume_synced(100);
        assert_eq!(m.pending(), 64);
        assert_eq!(m.clear_acked(100).unwrap(), 0);
        assert_eq!(m.pass_begin(), (0..64).collect::<Vec<u64>>());
        m.pass_end(false);
        assert_eq!(m.pass_begin().len(), 64);
        m.pass_end(true);
        assert_eq!(m.clear_acked(100).unwrap(), 64);
        assert!(m.dirty_ranges().is_empty());
        // acknowledged, but not yet durable in the local volume: kept, since
        // a machine crash could lose the write the recovery site holds
        m.mark(4096 * 128, 1).unwrap();
        m.note(4096 * 128, 1, 101);
        assert_eq!(m.clear_acked(200).unwrap(), 0);
        m.volume_synced(101);
        assert_eq!(m.clear_acked(200).unwrap(), 2);
        // dropped records flag their chunks
        m.mark(8192, 1).unwrap();
        m.note(8192, 1, 209);
        assert_eq!(m.flag_unacked(208).unwrap(), 1);
        assert_eq!(m.pass_begin(), vec![2]);
    }

    #[test]
    fn the_map_is_exact_after_a_process_crash_a_machine_crash_and_a_clean_stop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.map");
        let size = 4096 * 64 * 10;
        let m = DirtyMap::open(&p, 4096, size).unwrap();
        m.mark(4096 * 64 * 3 + 5, 4096).unwrap();
        m.close_clean().unwrap();
        drop(m);
        let state = d.path().join("dirty.state");
        let group3: Vec<Range<u64>> = std::iter::once(4096 * 64 * 3..4096 * 64 * 4).collect();
        // a clean stop, even across a reboot
        std::fs::write(&state, "another-boot clean\n").unwrap();
        let m = DirtyMap::open(&p, 4096, size).unwrap();
        assert_eq!((m.pending(), m.dirty_ranges()), (64, group3.clone()));
        drop(m);
        // a process crash (same boot, no clean stop)
        let m = DirtyMap::open(&p, 4096, size).unwrap();
        assert_eq!((m.pending(), m.dirty_ranges()), (64, group3.clone()));
        drop(m);
        // the machine went down with the agent running: the marks were
        // synced before their writes were acknowledged, so the map holds
        std::fs::write(&state, "another-boot running\n").unwrap();
        let m = DirtyMap::open(&p, 4096, size).unwrap();
        assert_eq!((m.pending(), m.dirty_ranges()), (64, group3));
    }
}
