//! Restore a volume of a point to a sparse file or a block device.
//!
//! Reads are planned per pack: a pack from which most bytes are needed is
//! read whole, otherwise only the needed blobs. Files are written under a
//! temporary name in the destination directory, fsynced and renamed, so the
//! destination name holds the old content or the complete new one. Block
//! devices are written in place (there is no rename for them).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use lifeboat_format::index::FixedIndex;
use lifeboat_format::{ChunkId, PackId, PointId};
use lifeboat_store::backend::local::{direct_write_at, open_direct, start_aligned, DIRECT_ALIGN};
use lifeboat_store::crypto::is_zero;
use lifeboat_store::vault::{pack_key, Location};
use lifeboat_store::{StoreError, Vault};
use serde::Serialize;

use crate::extents::{data_extents, is_block_device, volume_size};
use crate::scan::Progress;
use crate::{CaptureError, Result};

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub verify: bool,
    pub threads: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            verify: false,
            threads: crate::default_threads(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub point: PointId,
    pub volume: String,
    pub to: String,
    pub size: u64,
    pub data_bytes_written: u64,
    pub block_device: bool,
    pub verified: bool,
}

/// Restore `volume` of `point` to `to`.
///
/// # Errors
/// Missing or damaged chunks (the destination is left unchanged for files),
/// a full disk, or a block device smaller than the volume.
pub fn restore_volume(
    vault: &Vault,
    point: &PointId,
    volume: &str,
    to: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let m = vault.load_manifest(point)?;
    let vol = m.volume(volume).ok_or_else(|| {
        let names: Vec<_> = m.volumes.iter().map(|v| v.name.to_string()).collect();
        CaptureError::Invalid(format!(
            "point {point} has no volume {volume:?} (it has: {})",
            names.join(", ")
        ))
    })?;
    let ix = vault.load_fixed_index(point, vol)?;
    let data_bytes: u64 = ix
        .chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.is_zero())
        .map(|(i, _)| {
            let r = ix.range(i);
            r.end - r.start
        })
        .sum();
    progress.start(data_bytes, ix.size);

    let existing = fs::metadata(to).ok();
    let block = existing
        .as_ref()
        .is_some_and(|_| File::open(to).map(|f| is_block_device(&f)).unwrap_or(false));
    let needed_by = format!("point {point} volume {volume}");
    if block {
        let f = OpenOptions::new()
            .write(true)
            .read(true)
            .open(to)
            .map_err(|e| CaptureError::io(to, "open", e))?;
        let dev_size = volume_size(&f).map_err(|e| CaptureError::io(to, "size", e))?;
        if dev_size < ix.size {
            return Err(CaptureError::Invalid(format!(
                "{}: device has {dev_size} bytes, the volume needs {}",
                to.display(),
                ix.size
            )));
        }
        write_chunks(vault, &ix, &f, to, true, opts.threads, &needed_by, progress)?;
        f.sync_all().map_err(|e| CaptureError::io(to, "fsync", e))?;
        if opts.verify {
            verify_target(vault, &ix, &f, to)?;
        }
    } else {
        let dir = to
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = to
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CaptureError::Invalid(format!("{}: not a file name", to.display())))?;
        let tmp: PathBuf = dir.join(format!(
            ".{name}.lifeboat-restore-{:08x}",
            u32::from_le_bytes(lifeboat_store::crypto::random_bytes::<4>())
        ));
        let guard = TempGuard(Some(tmp.clone()));
        let f = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| CaptureError::io(&tmp, "create", e))?;
        f.set_len(ix.size)
            .map_err(|e| CaptureError::io(&tmp, "set size", e))?;
        write_chunks(
            vault,
            &ix,
            &f,
            &tmp,
            false,
            opts.threads,
            &needed_by,
            progress,
        )?;
        f.sync_all()
            .map_err(|e| CaptureError::io(&tmp, "fsync", e))?;
        if opts.verify {
            verify_target(vault, &ix, &f, &tmp)?;
        }
        fs::rename(&tmp, to).map_err(|e| CaptureError::io(to, "rename into place", e))?;
        guard.disarm();
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| CaptureError::io(dir, "fsync directory", e))?;
    }
    Ok(RestoreReport {
        point: *point,
        volume: volume.to_string(),
        to: to.display().to_string(),
        size: ix.size,
        data_bytes_written: data_bytes,
        block_device: block,
        verified: opts.verify,
    })
}

/// Removes a temporary file unless disarmed.
struct TempGuard(Option<PathBuf>);
impl TempGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}
impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// One unit of restore work: the blobs needed from one pack.
struct PackWork {
    pack: PackId,
    /// (chunk, location, positions in the index)
    blobs: Vec<(ChunkId, Location, Vec<usize>)>,
}

#[allow(clippy::too_many_arguments)]
fn write_chunks(
    vault: &Vault,
    ix: &FixedIndex,
    f: &File,
    path: &Path,
    zero_holes: bool,
    threads: usize,
    needed_by: &str,
    progress: &dyn Progress,
) -> Result<()> {
    // Plan: group positions by chunk, chunks by pack.
    let mut positions: HashMap<ChunkId, Vec<usize>> = HashMap::new();
    for (i, c) in ix.chunks.iter().enumerate() {
        if !c.is_zero() {
            positions.entry(*c).or_default().push(i);
        }
    }
    let mut packs: HashMap<PackId, PackWork> = HashMap::new();
    for (id, pos) in positions {
        let loc = vault.locate(&id).ok_or_else(|| StoreError::MissingChunk {
            id: id.to_hex(),
            needed_by: format!(
                "{needed_by} at offset {}",
                pos[0] as u64 * ix.chunk_size as u64
            ),
        })?;
        packs
            .entry(loc.pack)
            .or_insert_with(|| PackWork {
                pack: loc.pack,
                blobs: vec![],
            })
            .blobs
            .push((id, loc, pos));
    }
    let mut work: Vec<PackWork> = packs.into_values().collect();
    for w in &mut work {
        w.blobs.sort_by_key(|b| b.1.offset);
    }
    // Roughly volume order, so writes are mostly sequential.
    work.sort_by_key(|w| w.blobs.iter().map(|b| b.2[0]).min().unwrap_or(0));

    if zero_holes {
        // A block device keeps old data in holes: write zeros there.
        let zeros = vec![0u8; ix.chunk_size as usize];
        for (i, c) in ix.chunks.iter().enumerate() {
            if c.is_zero() {
                let r = ix.range(i);
                f.write_all_at(&zeros[..(r.end - r.start) as usize], r.start)
                    .map_err(|e| CaptureError::io(path, "write", e))?;
            }
        }
    }

    // Decoders (one per thread) turn packs into runs of contiguous plaintext;
    // one writer thread writes them. One writer, not one per decoder: two
    // threads writing one file contend on its inode lock and spin in the
    // kernel, which costs more than the writes.
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<CaptureError>> = Mutex::new(None);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Run>(8);
    std::thread::scope(|s| {
        let failed = &failed;
        s.spawn(move || {
            // Aligned runs go through O_DIRECT where the file system allows
            // it: no page-cache copy, and the final fsync has little left.
            let mut direct = open_direct(path);
            // Bytes written, and the span they cover, since writeback was
            // last started: overlapping writeback with decoding keeps the
            // final fsync short.
            let (mut pending, mut lo, mut hi) = (0u64, u64::MAX, 0u64);
            for run in rx {
                let (off, buf) = (run.off, run.data());
                if failed.lock().unwrap().is_some() {
                    continue; // drain
                }
                if let Some(d) = &direct {
                    if off.is_multiple_of(DIRECT_ALIGN as u64)
                        && buf.len().is_multiple_of(DIRECT_ALIGN)
                    {
                        match direct_write_at(d, buf, off) {
                            Ok(()) => {
                                progress.advance(buf.len() as u64);
                                continue;
                            }
                            // refused after all: buffered from here on
                            Err(e) if e.raw_os_error() == Some(22) => direct = None,
                            Err(e) => {
                                *failed.lock().unwrap() = Some(CaptureError::io(path, "write", e));
                                continue;
                            }
                        }
                    }
                }
                if let Err(e) = f.write_all_at(buf, off) {
                    *failed.lock().unwrap() = Some(CaptureError::io(path, "write", e));
                    continue;
                }
                progress.advance(buf.len() as u64);
                pending += buf.len() as u64;
                lo = lo.min(off);
                hi = hi.max(off + buf.len() as u64);
                if pending >= WRITEBACK_EVERY {
                    crate::extents::start_writeback(f, lo, hi - lo);
                    (pending, lo, hi) = (0, u64::MAX, 0);
                }
            }
        });
        for _ in 0..threads.max(1) {
            let tx = tx.clone();
            let (next, work) = (&next, &work);
            s.spawn(move || {
                let mut plain = Vec::new();
                loop {
                    if failed.lock().unwrap().is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(w) = work.get(i) else { return };
                    if let Err(e) = restore_pack(vault, ix, w, needed_by, &tx, &mut plain) {
                        *failed.lock().unwrap() = Some(e);
                        return;
                    }
                }
            });
        }
        drop(tx);
    });
    match failed.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Bytes written between starts of writeback.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Largest run handed to the writer at once.
const RUN_MAX: usize = 1 << 20;

fn restore_pack(
    vault: &Vault,
    ix: &FixedIndex,
    w: &PackWork,
    needed_by: &str,
    tx: &std::sync::mpsc::SyncSender<Run>,
    plain: &mut Vec<u8>,
) -> Result<()> {
    let key = pack_key(&w.pack);
    let needed: u64 = w.blobs.iter().map(|b| b.1.len as u64).sum();
    let first = w.blobs.first().map(|b| b.1.offset).unwrap_or(0);
    let last = w
        .blobs
        .last()
        .map(|b| b.1.offset + b.1.len as u64)
        .unwrap_or(0);
    // One ranged read over the span when at least half of it is needed;
    // otherwise one read per blob.
    let mut span: Option<Vec<u8>> = if needed * 2 >= last - first {
        Some(
            vault
                .backend()
                .get_range(&key, first..last)
                .map_err(|e| missing(e, &w.pack, needed_by))?,
        )
    } else {
        None
    };
    // The pack's chunks decrypted where they were read and decompressed
    // into one buffer, one after another: (position, start in `plain`).
    let mut places: Vec<(usize, usize)> = Vec::new();
    plain.clear();
    for (id, loc, pos) in &w.blobs {
        let mut raw_owned;
        let raw: &mut [u8] = match &mut span {
            Some(s) => {
                let a = (loc.offset - first) as usize;
                s.get_mut(a..a + loc.len as usize).ok_or_else(|| {
                    StoreError::Corrupt(format!("pack {} is shorter than its index says", w.pack))
                })?
            }
            None => {
                raw_owned = vault
                    .backend()
                    .get_range(&key, loc.offset..loc.offset + loc.len as u64)
                    .map_err(|e| missing(e, &w.pack, needed_by))?;
                &mut raw_owned
            }
        };
        let where_ = format!(
            "{needed_by} at offset {}",
            pos[0] as u64 * ix.chunk_size as u64
        );
        let at = plain.len();
        let n = vault.open_blob_append(id, loc.kind, raw, &where_, plain)?;
        for p in pos {
            let r = ix.range(*p);
            if (n as u64) < r.end - r.start {
                return Err(StoreError::Corrupt(format!(
                    "chunk {id} is shorter than its place in {needed_by}"
                ))
                .into());
            }
            places.push((*p, at));
        }
    }
    // Coalesce contiguous positions into runs of up to RUN_MAX bytes.
    places.sort_unstable();
    let mut run = Run::default();
    for (p, at) in places {
        let r = ix.range(p);
        let n = (r.end - r.start) as usize;
        let ends = !run.is_empty() && (run.end() != r.start || run.len() + n > RUN_MAX);
        if ends && tx.send(std::mem::take(&mut run)).is_err() {
            return Ok(()); // the writer stopped on an error it reports
        }
        if run.is_empty() {
            // (a chunk bigger than RUN_MAX is a run of its own)
            run = Run::new(r.start, n.max(RUN_MAX));
        }
        run.buf.extend_from_slice(&plain[at..at + n]);
    }
    if !run.is_empty() {
        let _ = tx.send(run);
    }
    Ok(())
}

/// Contiguous plaintext for the writer: `buf[skip..]` goes at `off`. The
/// bytes start 4 KiB-aligned in memory, so O_DIRECT writes them without a
/// bounce copy.
#[derive(Default)]
struct Run {
    off: u64,
    buf: Vec<u8>,
    skip: usize,
}

impl Run {
    /// A run at `off` of up to `cap` bytes.
    fn new(off: u64, cap: usize) -> Run {
        let mut buf = Vec::new();
        let skip = start_aligned(&mut buf, cap);
        Run { off, buf, skip }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.skip..]
    }

    fn len(&self) -> usize {
        self.buf.len() - self.skip
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn end(&self) -> u64 {
        self.off + self.len() as u64
    }
}

fn missing(e: lifeboat_store::BackendError, pack: &PackId, needed_by: &str) -> CaptureError {
    if e.is_not_found() {
        StoreError::MissingChunk {
            id: format!("(all of pack {pack})"),
            needed_by: needed_by.to_string(),
        }
        .into()
    } else {
        StoreError::from(e).into()
    }
}

/// Read the target back and compare every chunk with the index.
fn verify_target(vault: &Vault, ix: &FixedIndex, f: &File, path: &Path) -> Result<()> {
    let size = volume_size(f).map_err(|e| CaptureError::io(path, "size", e))?;
    let data = data_extents(f, size).map_err(|e| CaptureError::io(path, "find data extents", e))?;
    let in_data =
        |r: &std::ops::Range<u64>| data.iter().any(|d| d.start < r.end && r.start < d.end);
    let mut buf = vec![0u8; ix.chunk_size as usize];
    for (i, c) in ix.chunks.iter().enumerate() {
        let r = ix.range(i);
        if c.is_zero() && !in_data(&r) {
            continue; // a hole reads as zeros
        }
        let n = (r.end - r.start) as usize;
        f.read_exact_at(&mut buf[..n], r.start)
            .map_err(|e| CaptureError::io(path, "read back", e))?;
        let ok = if c.is_zero() {
            is_zero(&buf[..n])
        } else {
            vault.keys().chunk_id(&buf[..n]) == *c
        };
        if !ok {
            return Err(CaptureError::Invalid(format!(
                "{}: verification failed at offset {}: the written data differs from the point",
                path.display(),
                r.start
            )));
        }
    }
    Ok(())
}
