//! Scan capture: read data extents, chunk, dedup, write a point.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lifeboat_format::blob::BlobKind;
use lifeboat_format::index::FixedIndex;
use lifeboat_format::manifest::{Manifest, PointKind, VolumeEntry};
use lifeboat_format::{ChunkId, PointId, VolumeName};
use lifeboat_store::crypto::is_zero;
use lifeboat_store::{PackWriter, Vault, WriteStats};
use serde::Serialize;

use crate::extents::{chunk_runs, data_extents, read_full, total, volume_size};
use crate::{CaptureError, Result};

/// One volume to capture.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub name: VolumeName,
    pub path: PathBuf,
}

impl std::str::FromStr for VolumeSpec {
    type Err = CaptureError;
    /// `NAME=PATH`
    fn from_str(s: &str) -> Result<Self> {
        let (n, p) = s.split_once('=').ok_or_else(|| {
            CaptureError::Invalid(format!(
                "--volume {s:?}: expected NAME=PATH, e.g. disk0=/dev/vdb"
            ))
        })?;
        let name = n
            .parse()
            .map_err(|e| CaptureError::Invalid(format!("--volume {s:?}: {e}")))?;
        Ok(VolumeSpec {
            name,
            path: PathBuf::from(p),
        })
    }
}

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub kind: PointKind,
    pub tags: Vec<String>,
    pub threads: usize,
    /// The journal sequence the point reflects (replicated points).
    pub journal_seq: Option<u64>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            kind: PointKind::CrashConsistent,
            tags: vec![],
            threads: crate::default_threads(),
            journal_seq: None,
        }
    }
}

/// What `point create` did.
#[derive(Debug, Clone, Serialize)]
pub struct CreateReport {
    pub id: PointId,
    pub time: u64,
    pub kind: PointKind,
    pub parent: Option<PointId>,
    pub nominal_bytes: u64,
    pub data_bytes: u64,
    pub stored: WriteStats,
    pub volumes: Vec<VolumeEntry>,
}

/// Progress of a scan: data bytes read so far out of the total.
pub trait Progress: Sync {
    fn start(&self, total_data_bytes: u64, nominal_bytes: u64);
    fn advance(&self, bytes: u64);
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {
    fn start(&self, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
}

struct Source {
    spec: VolumeSpec,
    file: File,
    size: u64,
    runs: Vec<(u64, u64)>,
    data_bytes: u64,
}

/// Chunks per read: 1 MiB reads with 64 KiB chunks.
const RUN_CHUNKS: u64 = 16;

/// Take a recovery point of `volumes` (one consistency group: one manifest).
///
/// # Errors
/// Unreadable volumes, a volume that changes size during the scan, or vault
/// errors. The vault gains no point on error (at worst unreferenced packs,
/// which `vault prune` removes).
pub fn create_point(
    vault: &Arc<Vault>,
    volumes: &[VolumeSpec],
    opts: &CreateOptions,
    progress: &dyn Progress,
) -> Result<CreateReport> {
    if volumes.is_empty() {
        return Err(CaptureError::Invalid("no --volume given".into()));
    }
    let mut names = std::collections::HashSet::new();
    for v in volumes {
        if !names.insert(v.name.clone()) {
            return Err(CaptureError::Invalid(format!(
                "volume name {} given twice",
                v.name
            )));
        }
    }
    let cs = vault.chunk_size() as u64;
    let mut sources = Vec::new();
    for spec in volumes {
        let file = File::open(&spec.path).map_err(|e| CaptureError::io(&spec.path, "open", e))?;
        // read front to back: a larger readahead window
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
        let size = volume_size(&file).map_err(|e| CaptureError::io(&spec.path, "size", e))?;
        let ex = data_extents(&file, size)
            .map_err(|e| CaptureError::io(&spec.path, "find data extents", e))?;
        sources.push(Source {
            runs: chunk_runs(&ex, cs, RUN_CHUNKS),
            data_bytes: total(&ex),
            spec: spec.clone(),
            file,
            size,
        });
    }
    let nominal: u64 = sources.iter().map(|s| s.size).sum();
    let data: u64 = sources.iter().map(|s| s.data_bytes).sum();
    progress.start(
        sources
            .iter()
            .map(|s| s.runs.iter().map(|r| r.1 * cs).sum::<u64>())
            .sum(),
        nominal,
    );

    let (lock, writer) = vault.begin_write()?;
    let parent = vault.list_points()?.last().copied();
    let mut entries = Vec::new();
    for src in &sources {
        let ix = scan_volume(&writer, src, opts.threads, progress)?;
        let after =
            volume_size(&src.file).map_err(|e| CaptureError::io(&src.spec.path, "size", e))?;
        if after != src.size {
            return Err(CaptureError::Invalid(format!(
                "{}: volume changed size during the scan ({} -> {} bytes); take the point again, quiesced with --pre-hook",
                src.spec.path.display(),
                src.size,
                after
            )));
        }
        let data_chunks = ix.chunks.iter().filter(|c| !c.is_zero()).count() as u64;
        let index = vault.store_fixed_index(&writer, &ix)?;
        entries.push(VolumeEntry {
            name: src.spec.name.clone(),
            size: src.size,
            data_bytes: src.data_bytes,
            data_chunks,
            source: src.spec.path.display().to_string(),
            index,
        });
    }
    let stats = writer.flush()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let time = now / 1000;
    let id = PointId::at(
        now,
        u32::from_le_bytes(lifeboat_store::crypto::random_bytes::<4>()),
    );
    let m = Manifest {
        id,
        time,
        kind: opts.kind,
        tags: opts.tags.clone(),
        parent,
        hostname: lifeboat_store::hostname(),
        chunk_size: vault.chunk_size(),
        journal_seq: opts.journal_seq,
        volumes: entries.clone(),
    };
    lock.check_held()?;
    vault.save_manifest(&m)?;
    Ok(CreateReport {
        id,
        time,
        kind: opts.kind,
        parent,
        nominal_bytes: nominal,
        data_bytes: data,
        stored: stats,
        volumes: entries,
    })
}

fn scan_volume(
    w: &PackWriter,
    src: &Source,
    threads: usize,
    progress: &dyn Progress,
) -> Result<FixedIndex> {
    let cs = w.vault().chunk_size() as u64;
    let index = Mutex::new(FixedIndex::empty(cs as u32, src.size));
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<CaptureError>> = Mutex::new(None);
    let keys = w.vault().keys();
    let read = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let len = (cs * RUN_CHUNKS) as usize;
                let (mut whole, skip) = lifeboat_store::backend::local::huge_buffer(len);
                let buf = &mut whole[skip..skip + len];
                let mut found: Vec<(usize, ChunkId)> = Vec::new();
                loop {
                    if failed.lock().unwrap().is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(start, n)) = src.runs.get(i) else {
                        break;
                    };
                    let off = start * cs;
                    let len = ((n * cs).min(src.size - off)) as usize;
                    if let Err(e) = read_full(&src.file, &mut buf[..len], off) {
                        *failed.lock().unwrap() = Some(CaptureError::io(&src.spec.path, "read", e));
                        return;
                    }
                    for (k, chunk) in buf[..len].chunks(cs as usize).enumerate() {
                        let pos = (start as usize) + k;
                        if is_zero(chunk) {
                            continue;
                        }
                        let id = keys.chunk_id(chunk);
                        // stored only if neither the vault nor a pack being
                        // written holds it already
                        if let Err(e) = w.add(BlobKind::Data, id, chunk) {
                            *failed.lock().unwrap() = Some(e.into());
                            return;
                        }
                        found.push((pos, id));
                    }
                    read.fetch_add(len as u64, Ordering::Relaxed);
                    progress.advance(len as u64);
                }
                let mut ix = index.lock().unwrap();
                for (pos, id) in found {
                    ix.chunks[pos] = id;
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    Ok(index.into_inner().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_store::backend::memory::MemoryBackend;
    use lifeboat_store::{InitOptions, Secret};
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::AtomicBool;

    fn vault() -> Arc<Vault> {
        let opts = InitOptions {
            chunk_size: 4096,
            ..Default::default()
        };
        Arc::new(
            Vault::init(
                Arc::new(MemoryBackend::new()),
                &Secret::Password(b"pw".to_vec()),
                &opts,
            )
            .unwrap(),
        )
    }

    /// Grows the volume on the first progress report, as a writer would.
    struct Grow(PathBuf, AtomicBool);
    impl Progress for Grow {
        fn start(&self, _: u64, _: u64) {}
        fn advance(&self, _: u64) {
            if !self.1.swap(true, Ordering::SeqCst) {
                let f = OpenOptions::new().write(true).open(&self.0).unwrap();
                f.set_len(f.metadata().unwrap().len() + 4096).unwrap();
            }
        }
    }

    #[test]
    fn a_volume_that_changes_size_gives_no_point() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vol");
        std::fs::write(&p, vec![5u8; 1 << 20]).unwrap();
        let v = vault();
        let specs = vec![VolumeSpec {
            name: "d".parse().unwrap(),
            path: p.clone(),
        }];
        let e = create_point(
            &v,
            &specs,
            &CreateOptions::default(),
            &Grow(p, AtomicBool::new(false)),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("changed size during the scan"),
            "{e}"
        );
        assert!(v.list_points().unwrap().is_empty());
    }

    #[test]
    fn holes_and_zero_chunks_are_not_stored_and_dedup_works() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vol");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        // two identical data chunks, one explicit zero chunk, the rest holes
        f.write_all_at(&[9u8; 4096], 0).unwrap();
        f.write_all_at(&[9u8; 4096], 8192).unwrap();
        f.write_all_at(&[0u8; 4096], 65536).unwrap();
        let v = vault();
        let specs = vec![VolumeSpec {
            name: "d".parse().unwrap(),
            path: p,
        }];
        let r = create_point(&v, &specs, &CreateOptions::default(), &NoProgress).unwrap();
        // one data chunk (stored once) + the index pieces
        assert_eq!(
            r.stored.new_chunks,
            1 + r.volumes[0].index.len() as u64,
            "{:?}",
            r.stored
        );
        assert_eq!(r.stored.new_raw_bytes - 4096, (32 + 256 * 32 + 32) as u64);
        assert_eq!(r.volumes[0].data_chunks, 2);
        let r2 = create_point(&v, &specs, &CreateOptions::default(), &NoProgress).unwrap();
        assert_eq!(
            r2.stored.new_chunks, 0,
            "an unchanged volume stores nothing"
        );
        assert_eq!(r2.parent, Some(r.id));
    }
}
