//! Copies to, from and between object stores.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures::{StreamExt, TryStreamExt};
use lifeboat_capture::extents::{data_extents, total, volume_size};
use lifeboat_capture::scan::Progress;
use lifeboat_store::backend::object::runtime;
use lifeboat_store::crypto::is_zero;
use object_store::{ObjectStoreExt, WriteMultipart};

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

/// Upload a local file or device. Holes are not read; objects have no holes,
/// so they are sent as zeros. The object appears only when the multipart
/// upload completes; on error the upload is aborted.
pub(crate) fn local_to_object(
    src: &Path,
    dst: &Endpoint,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let (store, path) = parts(dst);
    let f = File::open(src).map_err(|e| io_err(src, "open", e))?;
    let size = volume_size(&f).map_err(|e| io_err(src, "size", e))?;
    let extents = data_extents(&f, size).map_err(|e| io_err(src, "find data extents", e))?;
    let data = total(&extents);
    progress.start(size, size);
    let part = opts.part_size as usize;
    let res: Result<()> = runtime().block_on(async {
        let upload = store.put_multipart(path).await.map_err(|e| remote(dst, "start upload", e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, part);
        let mut buf = vec![0u8; part];
        let mut pos = 0u64;
        let result: Result<()> = async {
            while pos < size {
                let n = ((size - pos).min(part as u64)) as usize;
                fill_from_extents(&f, src, &extents, pos, &mut buf[..n])?;
                w.wait_for_capacity(opts.parallel).await.map_err(|e| remote(dst, "upload part", e))?;
                w.write(&buf[..n]);
                pos += n as u64;
                progress.advance(n as u64);
            }
            let now = volume_size(&f).map_err(|e| io_err(src, "size", e))?;
            if now != size {
                return Err(CopyError::Invalid(format!("{}: the source changed size during the copy ({size} -> {now}); nothing was published", src.display())));
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                w.finish().await.map_err(|e| remote(dst, "complete upload", e))?;
                Ok(())
            }
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    });
    res?;
    Ok(CopyReport {
        nominal_bytes: size,
        data_bytes: data,
        transferred_bytes: size,
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
