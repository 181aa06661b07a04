//! Copies to, from and between object stores.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures::{StreamExt, TryStreamExt};
use lifeboat_capture::extents::{data_extents, total, volume_size};
use lifeboat_capture::scan::Progress;
use lifeboat_store::backend::object::runtime;
use lifeboat_store::crypto::is_zero;
use object_store::{ObjectStoreExt, WriteMultipart};
use serde::{Deserialize, Serialize};

use crate::local::{open_partial, publish, save_checkpoint, Checkpoint};
use crate::{io_err, CopyError, CopyOptions, CopyReport, Endpoint, Result};

/// A ranged GET pinned to the version the copy started from (If-Match on
/// the ETag), so a source overwritten mid-copy fails instead of mixing old
/// and new bytes; the length is checked too.
async fn get_pinned(
    e: &Endpoint,
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    path: &object_store::path::Path,
    r: std::ops::Range<u64>,
    etag: Option<&str>,
) -> Result<bytes::Bytes> {
    let opts = object_store::GetOptions {
        range: Some(object_store::GetRange::Bounded(r.clone())),
        if_match: etag.map(str::to_string),
        ..Default::default()
    };
    let res = store.get_opts(path, opts).await.map_err(|err| match err {
        object_store::Error::Precondition { .. } => CopyError::Invalid(format!(
            "{}: the object changed during the copy; nothing was published, run the copy again",
            e.display()
        )),
        err => remote(e, "read range", err),
    })?;
    let b = res
        .bytes()
        .await
        .map_err(|err| remote(e, "read range", err))?;
    if b.len() as u64 != r.end - r.start {
        return Err(CopyError::Invalid(format!(
            "{}: short read at {} (the object changed or is truncated); nothing was published",
            e.display(),
            r.start
        )));
    }
    Ok(b)
}

fn remote(e: &Endpoint, op: &'static str, err: impl std::fmt::Display) -> CopyError {
    CopyError::Remote {
        url: e.display(),
        op,
        message: format!("{err} (check the URL, credentials and network; retrying may help)"),
    }
}

fn parts(
    e: &Endpoint,
) -> (
    &std::sync::Arc<dyn object_store::ObjectStore>,
    &object_store::path::Path,
) {
    match e {
        Endpoint::Object { store, path, .. } => (store, path),
        Endpoint::Local(_) => unreachable!("object endpoint expected"),
    }
}

/// What an upload has done, kept in the user's state directory (the
/// destination is an object, so there is no "beside it"): the multipart
/// upload and the parts already in the store.
#[derive(Debug, Serialize, Deserialize)]
struct UploadCheckpoint {
    src: String,
    src_size: u64,
    /// mtime (ns) of the source when the upload started.
    src_version: String,
    dst: String,
    part_size: u64,
    upload_id: String,
    /// part index → the store's id for it
    parts: BTreeMap<usize, String>,
}

/// `$LIFEBOAT_STATE_DIR`, else `$XDG_STATE_HOME/lifeboat`, else
/// `~/.local/state/lifeboat`.
fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LIFEBOAT_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("lifeboat");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/state/lifeboat")
}

/// Where the checkpoint of an upload of `src` to `dst` lives.
pub(crate) fn upload_checkpoint_path(src: &Path, dst: &Endpoint) -> PathBuf {
    let abs = std::fs::canonicalize(src).unwrap_or_else(|_| src.to_path_buf());
    let key = blake3::hash(format!("{}\n{}", abs.display(), dst.display()).as_bytes());
    state_dir()
        .join("uploads")
        .join(format!("{}.json", &key.to_hex()[..32]))
}

fn save_upload(path: &Path, c: &UploadCheckpoint) -> Result<()> {
    let dir = path.parent().expect("in a directory");
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, "create state directory", e))?;
    crate::local::save_json(path, c)
}

/// Upload a local file or device. Holes are not read; objects have no holes,
/// so they are sent as zeros. Parts go up in parallel through the store's
/// multipart API and each finished part is recorded in a checkpoint; the
/// object appears only when the upload is completed. After a network error
/// or an interruption the upload and its checkpoint are kept, and
/// `--resume` uploads only the missing parts (if the source is unchanged);
/// a new copy without `--resume` aborts the old upload. A source that
/// changes size aborts the upload.
pub(crate) fn local_to_object(
    src: &Path,
    dst: &Endpoint,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let Endpoint::Object {
        store,
        multipart,
        path,
        ..
    } = dst
    else {
        unreachable!("object endpoint expected")
    };
    let f = File::open(src).map_err(|e| io_err(src, "open", e))?;
    let md = f.metadata().map_err(|e| io_err(src, "stat", e))?;
    let size = volume_size(&f).map_err(|e| io_err(src, "size", e))?;
    let extents = data_extents(&f, size).map_err(|e| io_err(src, "find data extents", e))?;
    let data = total(&extents);
    let version = format!("{}.{}", md.mtime(), md.mtime_nsec());
    let part = opts.part_size.max(1);
    let nparts = size.div_ceil(part) as usize;
    let ckpt_path = upload_checkpoint_path(src, dst);
    progress.start(size, size);
    if size == 0 {
        runtime()
            .block_on(store.put(path, object_store::PutPayload::default()))
            .map_err(|e| remote(dst, "upload", e))?;
        return Ok(CopyReport {
            method: "multipart-upload".into(),
            ..Default::default()
        });
    }
    let old: Option<UploadCheckpoint> = std::fs::read(&ckpt_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let src_name = src.display().to_string();
    let res: Result<(u64, u64)> = runtime().block_on(async {
        let resumable = old.as_ref().is_some_and(|c| {
            c.src == src_name
                && c.src_size == size
                && c.src_version == version
                && c.dst == dst.display()
                && c.part_size == part
        });
        let mut ck = match old {
            Some(c) if opts.resume && resumable => c,
            old => {
                if let Some(c) = old {
                    if opts.resume {
                        tracing::warn!(
                            "{}: the upload checkpoint does not match the source; starting over",
                            ckpt_path.display()
                        );
                    }
                    // a new copy replaces the interrupted one
                    let _ = multipart.abort_multipart(path, &c.upload_id).await;
                }
                let id = multipart
                    .create_multipart(path)
                    .await
                    .map_err(|e| remote(dst, "start upload", e))?;
                UploadCheckpoint {
                    src: src_name.clone(),
                    src_size: size,
                    src_version: version.clone(),
                    dst: dst.display(),
                    part_size: part,
                    upload_id: id,
                    parts: BTreeMap::new(),
                }
            }
        };
        save_upload(&ckpt_path, &ck)?;
        let len_of = |i: usize| (size - i as u64 * part).min(part);
        let resumed: u64 = ck.parts.keys().map(|&i| len_of(i)).sum();
        progress.advance(resumed);
        let todo: Vec<usize> = (0..nparts).filter(|i| !ck.parts.contains_key(i)).collect();
        let id = ck.upload_id.clone();
        let mut sent = 0u64;
        let mut results = futures::stream::iter(todo)
            .map(|i| {
                let (f, extents, id) = (&f, &extents, &id);
                async move {
                    let n = len_of(i) as usize;
                    let mut buf = vec![0u8; n];
                    fill_from_extents(f, src, extents, i as u64 * part, &mut buf)?;
                    let pid = multipart
                        .put_part(path, id, i, buf.into())
                        .await
                        .map_err(|e| remote(dst, "upload part", e))?;
                    Ok::<_, CopyError>((i, pid, n as u64))
                }
            })
            .buffer_unordered(opts.parallel.max(1));
        while let Some(r) = results.next().await {
            let (i, pid, n) = r?;
            ck.parts.insert(i, pid.content_id);
            save_upload(&ckpt_path, &ck)?;
            sent += n;
            progress.advance(n);
            if opts
                .fail_after_checkpoint
                .is_some_and(|at| resumed + sent >= at)
            {
                return Err(CopyError::Invalid(
                    "test hook: interrupted after a checkpoint".into(),
                ));
            }
        }
        drop(results);
        let now = volume_size(&f).map_err(|e| io_err(src, "size", e))?;
        if now != size {
            let _ = multipart.abort_multipart(path, &id).await;
            let _ = std::fs::remove_file(&ckpt_path);
            return Err(CopyError::Invalid(format!(
                "{}: the source changed size during the copy ({size} -> {now}); nothing was published",
                src.display()
            )));
        }
        let parts = (0..nparts)
            .map(|i| object_store::multipart::PartId {
                content_id: ck.parts[&i].clone(),
            })
            .collect();
        multipart
            .complete_multipart(path, &id, parts)
            .await
            .map_err(|e| remote(dst, "complete upload", e))?;
        let _ = std::fs::remove_file(&ckpt_path);
        Ok((resumed, sent))
    });
    let (resumed, sent) = res.map_err(|e| match e {
        CopyError::Remote { url, op, message } => CopyError::Remote {
            url,
            op,
            message: format!(
                "{message}; nothing was published, and `lifeboat copy --resume` with the same \
                 arguments uploads only the missing parts"
            ),
        },
        e => e,
    })?;
    Ok(CopyReport {
        nominal_bytes: size,
        data_bytes: data,
        transferred_bytes: sent,
        resumed_from: resumed,
        method: "multipart-upload".into(),
        ..Default::default()
    })
}

/// Read `buf.len()` bytes at `pos`, reading only data extents.
fn fill_from_extents(
    f: &File,
    src: &Path,
    extents: &[std::ops::Range<u64>],
    pos: u64,
    buf: &mut [u8],
) -> Result<()> {
    buf.fill(0);
    let end = pos + buf.len() as u64;
    for r in extents.iter().filter(|r| r.start < end && pos < r.end) {
        let s = r.start.max(pos);
        let e = r.end.min(end);
        f.read_exact_at(&mut buf[(s - pos) as usize..(e - pos) as usize], s)
            .map_err(|e| io_err(src, "read", e))?;
    }
    Ok(())
}

/// Write `buf` at `off`, skipping all-zero 64 KiB blocks so the file stays
/// sparse (its length was set beforehand), and merging the rest into runs.
fn write_nonzero(f: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
    const BLOCK: usize = 64 << 10;
    let mut run: Option<usize> = None;
    for (i, b) in buf.chunks(BLOCK).enumerate() {
        let start = i * BLOCK;
        match (is_zero(b), run) {
            (false, None) => run = Some(start),
            (true, Some(r)) => {
                f.write_all_at(&buf[r..start], off + r as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(r) = run {
        f.write_all_at(&buf[r..], off + r as u64)?;
    }
    Ok(())
}

/// Download with parallel ranged GETs into a partial file; all-zero blocks
/// are not written, so the file stays sparse. Resumable by checkpoint.
pub(crate) fn object_to_local(
    src: &Endpoint,
    dst: &Path,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let (store, path) = parts(src);
    let meta = runtime()
        .block_on(store.head(path))
        .map_err(|e| remote(src, "head", e))?;
    let size = meta.size;
    let version = meta
        .e_tag
        .clone()
        .unwrap_or_else(|| meta.last_modified.to_rfc3339());
    progress.start(size, size);
    let (f, done, part, ckpt, dir) =
        open_partial(dst, &src.display(), size, &version, opts.resume)?;
    let ps = opts.part_size;
    progress.advance(done / ps * ps);
    let ranges: Vec<_> = (done / ps * ps..size)
        .step_by(ps as usize)
        .map(|s| s..(s + ps).min(size))
        .collect();
    let transferred = AtomicU64::new(0);
    // Contiguous prefix of finished parts, for the checkpoint.
    // (prefix end, finished part starts beyond it, prefix at the last checkpoint)
    let start = done / ps * ps;
    let finished = Mutex::new((start, std::collections::BTreeSet::new(), start));
    let res: Result<()> = runtime().block_on(async {
        futures::stream::iter(ranges.into_iter().map(|r| {
            let f = &f;
            let part = &part;
            let transferred = &transferred;
            let finished = &finished;
            let ckpt = &ckpt;
            let version = &version;
            let etag = meta.e_tag.as_deref();
            async move {
                let bytes = get_pinned(src, store, path, r.clone(), etag).await?;
                write_nonzero(f, &bytes, r.start).map_err(|e| io_err(part, "write", e))?;
                transferred.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                progress.advance(bytes.len() as u64);
                let mut fin = finished.lock().unwrap();
                fin.1.insert(r.start);
                let mut advanced = false;
                loop {
                    let next = fin.0;
                    if !fin.1.remove(&next) {
                        break;
                    }
                    fin.0 = (fin.0 + ps).min(size);
                    advanced = true;
                }
                if advanced && fin.0 >= fin.2 + 16 * ps {
                    fin.2 = fin.0;
                    f.sync_data().map_err(|e| io_err(part, "fsync", e))?;
                    save_checkpoint(
                        ckpt,
                        &Checkpoint {
                            src: src.display(),
                            src_size: size,
                            src_version: version.clone(),
                            done: fin.0,
                        },
                    )?;
                }
                Ok::<_, CopyError>(())
            }
        }))
        .buffer_unordered(opts.parallel.max(1))
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
    });
    res?;
    let digest = if opts.verify {
        Some(crate::verify_before_publish(src, &part)?)
    } else {
        None
    };
    publish(&f, &part, &ckpt, &dir, dst, opts.fsync)?;
    Ok(CopyReport {
        blake3: digest.clone(),
        verified: digest.is_some(),
        nominal_bytes: size,
        data_bytes: size,
        transferred_bytes: transferred.into_inner(),
        resumed_from: done / ps * ps,
        method: "ranged-download".into(),
        ..Default::default()
    })
}

/// Server-side copy within one store; otherwise parallel ranged GETs into a
/// multipart upload.
pub(crate) fn object_to_object(
    src: &Endpoint,
    dst: &Endpoint,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let (ss, sp) = parts(src);
    let (ds, dp) = parts(dst);
    let (Endpoint::Object { url: su, .. }, Endpoint::Object { url: du, .. }) = (src, dst) else {
        unreachable!()
    };
    let meta = runtime()
        .block_on(ss.head(sp))
        .map_err(|e| remote(src, "head", e))?;
    let size = meta.size;
    let etag = meta.e_tag.clone();
    progress.start(size, size);
    // S3 copies one object in one request only up to 5 GiB.
    let server_side =
        su.scheme == du.scheme && su.bucket == du.bucket && !(su.scheme == "s3" && size > 5 << 30);
    if server_side {
        runtime()
            .block_on(ss.copy(sp, dp))
            .map_err(|e| remote(dst, "server-side copy", e))?;
        progress.advance(size);
        return Ok(CopyReport {
            nominal_bytes: size,
            data_bytes: size,
            transferred_bytes: 0,
            method: "server-side".into(),
            ..Default::default()
        });
    }
    let ps = opts.part_size;
    runtime().block_on(async {
        let upload = ds
            .put_multipart(dp)
            .await
            .map_err(|e| remote(dst, "start upload", e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, ps as usize);
        let ranges: Vec<_> = (0..size)
            .step_by(ps as usize)
            .map(|s| s..(s + ps).min(size))
            .collect();
        let etag = etag.as_deref();
        let mut stream =
            futures::stream::iter(ranges.into_iter().map(|r| get_pinned(src, ss, sp, r, etag)))
                .buffered(opts.parallel.max(1));
        let r: Result<()> = async {
            while let Some(b) = stream.next().await {
                let b = b?;
                w.wait_for_capacity(opts.parallel)
                    .await
                    .map_err(|e| remote(dst, "upload part", e))?;
                progress.advance(b.len() as u64);
                w.put(b);
            }
            Ok(())
        }
        .await;
        match r {
            Ok(()) => w
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| remote(dst, "complete upload", e)),
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    })?;
    Ok(CopyReport {
        nominal_bytes: size,
        data_bytes: size,
        transferred_bytes: size,
        method: "multipart-upload".into(),
        ..Default::default()
    })
}

pub(crate) fn digest(e: &Endpoint) -> Result<String> {
    let (store, path) = parts(e);
    runtime().block_on(async {
        let mut s = store
            .get(path)
            .await
            .map_err(|err| remote(e, "read", err))?
            .into_stream();
        let mut h = blake3::Hasher::new();
        while let Some(b) = s.next().await {
            h.update(&b.map_err(|err| remote(e, "read", err))?);
        }
        Ok(h.finalize().to_hex().to_string())
    })
}
