//! Local file and block-device copies.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use lifeboat_capture::extents::{data_extents, is_block_device, total, volume_size};
use lifeboat_capture::scan::Progress;
use serde::{Deserialize, Serialize};

use crate::{io_err, CopyError, CopyOptions, CopyReport, Result};

/// What a resumable copy has done, stored beside the partial file.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Checkpoint {
    pub src: String,
    pub src_size: u64,
    /// Source identity: mtime (ns) for files, ETag for objects.
    pub src_version: String,
    /// Every byte below this offset is in the partial file.
    pub done: u64,
}

pub(crate) fn partial_paths(dst: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let dir = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = dst
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CopyError::Invalid(format!("{}: not a file name", dst.display())))?;
    Ok((
        dir.join(format!(".{name}.lifeboat-partial")),
        dir.join(format!(".{name}.lifeboat-partial.json")),
        dir,
    ))
}

pub(crate) fn load_checkpoint(path: &Path) -> Option<Checkpoint> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

pub(crate) fn save_checkpoint(path: &Path, c: &Checkpoint) -> Result<()> {
    save_json(path, c)
}

/// Write `c` as JSON to `path` atomically and durably (temporary file,
/// fsync, rename).
pub(crate) fn save_json<T: Serialize>(path: &Path, c: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(c).expect("checkpoint serializes");
    (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })()
    .map_err(|e| io_err(path, "write checkpoint", e))
}

/// Open the partial file of a copy: resumed (returning the offset done) if
/// the checkpoint matches the source, fresh otherwise.
pub(crate) fn open_partial(
    dst: &Path,
    src: &str,
    size: u64,
    version: &str,
    resume: bool,
) -> Result<(File, u64, PathBuf, PathBuf, PathBuf)> {
    let (part, ckpt, dir) = partial_paths(dst)?;
    if resume {
        if let Some(c) = load_checkpoint(&ckpt) {
            if c.src == src && c.src_size == size && c.src_version == version && part.exists() {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&part)
                    .map_err(|e| io_err(&part, "open partial", e))?;
                return Ok((f, c.done, part, ckpt, dir));
            }
            tracing::warn!(
                "checkpoint {} does not match the source; starting over",
                ckpt.display()
            );
        }
    }
    let _ = fs::remove_file(&part);
    let _ = fs::remove_file(&ckpt);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&part)
        .map_err(|e| io_err(&part, "create", e))?;
    f.set_len(size).map_err(|e| io_err(&part, "set size", e))?;
    save_checkpoint(
        &ckpt,
        &Checkpoint {
            src: src.into(),
            src_size: size,
            src_version: version.into(),
            done: 0,
        },
    )?;
    Ok((f, 0, part, ckpt, dir))
}

/// fsync, rename over `dst`, fsync the directory, remove the checkpoint.
/// Rename the finished partial file over `dst`. With `durable`, the data is
/// fsynced first and the directory after, so the new content survives a
/// power cut; without, a crash soon after may leave an empty or old file
/// (as with `cp`), though a killed process never does.
pub(crate) fn publish(
    f: &File,
    part: &Path,
    ckpt: &Path,
    dir: &Path,
    dst: &Path,
    durable: bool,
) -> Result<()> {
    if durable {
        f.sync_all().map_err(|e| io_err(part, "fsync", e))?;
    }
    fs::rename(part, dst).map_err(|e| io_err(dst, "rename into place", e))?;
    if durable {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, "fsync directory", e))?;
    }
    let _ = fs::remove_file(ckpt);
    Ok(())
}

fn mtime_version(md: &fs::Metadata) -> String {
    format!("{}.{}", md.mtime(), md.mtime_nsec())
}

pub(crate) fn local_to_local(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let s = File::open(src).map_err(|e| io_err(src, "open", e))?;
    // read front to back: a larger readahead window (as cp asks for)
    let _ = rustix::fs::fadvise(&s, 0, None, rustix::fs::Advice::Sequential);
    let size = volume_size(&s).map_err(|e| io_err(src, "size", e))?;
    let md = s.metadata().map_err(|e| io_err(src, "stat", e))?;
    let extents = data_extents(&s, size).map_err(|e| io_err(src, "find data extents", e))?;
    let data = total(&extents);
    progress.start(data, size);
    let dst_is_block = File::open(dst)
        .map(|f| is_block_device(&f))
        .unwrap_or(false);
    let mut report = CopyReport {
        nominal_bytes: size,
        data_bytes: data,
        ..Default::default()
    };

    if dst_is_block {
        let d = OpenOptions::new()
            .write(true)
            .open(dst)
            .map_err(|e| io_err(dst, "open", e))?;
        let cap = volume_size(&d).map_err(|e| io_err(dst, "size", e))?;
        if cap < size {
            return Err(CopyError::Invalid(format!(
                "{}: device has {cap} bytes, the source {size}",
                dst.display()
            )));
        }
        let zeros = vec![0u8; 1 << 20];
        let mut pos = 0;
        for r in &extents {
            // holes of the source become zeros on the device
            while pos < r.start {
                let n = (r.start - pos).min(zeros.len() as u64) as usize;
                d.write_all_at(&zeros[..n], pos)
                    .map_err(|e| io_err(dst, "write", e))?;
                pos += n as u64;
            }
            report.method = copy_range(&s, &d, src, dst, r.start, r.end, progress)?;
            pos = r.end;
        }
        // and the hole after the last extent
        while pos < size {
            let n = (size - pos).min(zeros.len() as u64) as usize;
            d.write_all_at(&zeros[..n], pos)
                .map_err(|e| io_err(dst, "write", e))?;
            pos += n as u64;
        }
        d.sync_all().map_err(|e| io_err(dst, "fsync", e))?;
        report.transferred_bytes = data;
        check_size(&s, src, size)?;
        return Ok(report);
    }

    let version = mtime_version(&md);
    let src_name = src.display().to_string();
    let (d, done, part, ckpt, dir) = open_partial(dst, &src_name, size, &version, opts.resume)?;
    report.resumed_from = done;
    // Where the file system can share extents (XFS, btrfs), one FICLONE
    // makes the whole copy instantly, sparse as the source.
    let f = Finish {
        s: &s,
        src,
        size,
        d: &d,
        part: &part,
        ckpt: &ckpt,
        dir: &dir,
        dst,
    };
    if done == 0 && rustix::fs::ioctl_ficlone(&d, &s).is_ok() {
        progress.advance(data);
        report.transferred_bytes = data;
        report.method = "reflink".into();
        return f.finish(opts, report);
    }
    let mut since = 0u64;
    let mut last_ckpt = std::time::Instant::now();
    let mut method = String::from("read-write");
    for r in &extents {
        if r.end <= done {
            progress.advance(r.end - r.start);
            continue;
        }
        let start = r.start.max(done);
        progress.advance(start - r.start);
        let mut pos = start;
        while pos < r.end {
            let end = (pos
                + opts
                    .checkpoint_every
                    .saturating_sub(since)
                    .clamp(1 << 20, 64 << 20))
            .min(r.end);
            method = copy_range(&s, &d, src, &part, pos, end, progress)?;
            // overlap writeback with copying; the final fsync then waits less
            if opts.fsync {
                lifeboat_capture::extents::start_writeback(&d, pos, end - pos);
            }
            report.transferred_bytes += end - pos;
            since += end - pos;
            pos = end;
            // Checkpoint by bytes, but not more often than every 10 s: each
            // checkpoint waits for an fsync, which would stall a fast copy.
            let due = opts.fail_after_checkpoint.is_some()
                || last_ckpt.elapsed() >= std::time::Duration::from_secs(10);
            if since >= opts.checkpoint_every && due {
                last_ckpt = std::time::Instant::now();
                d.sync_data().map_err(|e| io_err(&part, "fsync", e))?;
                save_checkpoint(
                    &ckpt,
                    &Checkpoint {
                        src: src_name.clone(),
                        src_size: size,
                        src_version: version.clone(),
                        done: pos,
                    },
                )?;
                since = 0;
                if opts.fail_after_checkpoint.is_some_and(|at| pos >= at) {
                    return Err(CopyError::Invalid(format!(
                        "injected failure after the checkpoint at {pos} (test hook)"
                    )));
                }
            }
        }
    }
    report.method = method;
    f.finish(opts, report)
}

/// The end of a local-to-local copy: the source must still have its size,
/// then optional verification, then publish.
struct Finish<'a> {
    s: &'a File,
    src: &'a Path,
    size: u64,
    d: &'a File,
    part: &'a Path,
    ckpt: &'a Path,
    dir: &'a Path,
    dst: &'a Path,
}

impl Finish<'_> {
    fn finish(self, opts: &CopyOptions, mut report: CopyReport) -> Result<CopyReport> {
        if let Err(e) = check_size(self.s, self.src, self.size) {
            let _ = fs::remove_file(self.part);
            let _ = fs::remove_file(self.ckpt);
            return Err(e);
        }
        if opts.verify {
            let digest = crate::verify_before_publish(
                &crate::Endpoint::Local(self.src.to_path_buf()),
                self.part,
            )?;
            report.blake3 = Some(digest);
            report.verified = true;
        }
        publish(self.d, self.part, self.ckpt, self.dir, self.dst, opts.fsync)?;
        Ok(report)
    }
}

fn check_size(s: &File, src: &Path, size: u64) -> Result<()> {
    let now = volume_size(s).map_err(|e| io_err(src, "size", e))?;
    if now != size {
        return Err(CopyError::Invalid(format!(
            "{}: the source changed size during the copy ({size} -> {now} bytes); the destination was not changed. Stop writers (or copy a recovery point) and run again",
            src.display()
        )));
    }
    Ok(())
}

/// Copy `[start, end)` at the same offsets with pread/pwrite through a
/// 128 KiB buffer that stays in the CPU cache (measured faster here than
/// copy_file_range, which the kernel turns into a splice through fresh
/// pages when it cannot reflink).
fn copy_range(
    s: &File,
    d: &File,
    src: &Path,
    dst: &Path,
    start: u64,
    end: u64,
    progress: &dyn Progress,
) -> Result<String> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 128 << 10]);
    }
    BUF.with(|b| {
        let mut buf = b.borrow_mut();
        let mut pos = start;
        while pos < end {
            let want = ((end - pos).min(buf.len() as u64)) as usize;
            let n = s.read_at(&mut buf[..want], pos).map_err(|e| io_err(src, "read", e))?;
            if n == 0 {
                return Err(CopyError::Invalid(format!(
                    "{}: the source ended at {pos}, before its size said; it changed during the copy",
                    src.display()
                )));
            }
            d.write_all_at(&buf[..n], pos).map_err(|e| io_err(dst, "write", e))?;
            pos += n as u64;
            progress.advance(n as u64);
        }
        Ok("read-write".to_string())
    })
}

/// BLAKE3 of a file or device, hashing zeros for holes without reading them.
pub(crate) fn digest(p: &Path) -> Result<String> {
    let f = File::open(p).map_err(|e| io_err(p, "open", e))?;
    let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Sequential);
    let size = volume_size(&f).map_err(|e| io_err(p, "size", e))?;
    let extents = data_extents(&f, size).map_err(|e| io_err(p, "find data extents", e))?;
    let mut h = blake3::Hasher::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 8 << 20];
    let mut pos = 0u64;
    let feed_zeros = |h: &mut blake3::Hasher, mut n: u64| {
        while n > 0 {
            let k = n.min(zeros.len() as u64) as usize;
            h.update(&zeros[..k]);
            n -= k as u64;
        }
    };
    for r in &extents {
        feed_zeros(&mut h, r.start - pos);
        let mut off = r.start;
        while off < r.end {
            let k = ((r.end - off).min(buf.len() as u64)) as usize;
            f.read_exact_at(&mut buf[..k], off)
                .map_err(|e| io_err(p, "read", e))?;
            h.update(&buf[..k]);
            off += k as u64;
        }
        pos = r.end;
    }
    feed_zeros(&mut h, size - pos);
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Grows the source on the first progress report: a writer that
    /// extends the image while it is copied.
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
    fn source_that_changes_size_is_refused_and_dst_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let dst = d.path().join("dst");
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[7u8; 1 << 20], 1 << 20).unwrap();
        fs::write(&dst, b"old content").unwrap();
        let opts = CopyOptions {
            checkpoint_every: 1 << 19,
            ..Default::default()
        };
        let e = local_to_local(
            &src,
            &dst,
            &opts,
            &Grow(src.clone(), AtomicBool::new(false)),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("changed size during the copy"),
            "{e}"
        );
        assert_eq!(fs::read(&dst).unwrap(), b"old content");
        let left: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            left.iter().all(|n| !n.contains("lifeboat-partial")),
            "{left:?}"
        );
    }
}
