//! Data extents of files and block devices.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;

use rustix::fs::{seek, SeekFrom as RSeek};

/// Size of a regular file or block device.
///
/// # Errors
/// I/O errors.
pub fn volume_size(f: &File) -> std::io::Result<u64> {
    let md = f.metadata()?;
    if md.file_type().is_block_device() {
        let mut g = f;
        let end = g.seek(SeekFrom::End(0))?;
        g.seek(SeekFrom::Start(0))?;
        Ok(end)
    } else {
        Ok(md.len())
    }
}

pub fn is_block_device(f: &File) -> bool {
    f.metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// The data extents of `f` within `[0, size)`, in order, merged. Where the
/// file system does not report holes, the whole range is one extent.
///
/// # Errors
/// I/O errors other than "holes not supported".
pub fn data_extents(f: &File, size: u64) -> std::io::Result<Vec<Range<u64>>> {
    data_extents_in(f, 0, size)
}

/// The data extents of `f` within `[from, size)`, clipped to it: what
/// [`data_extents`] gives for that window, found without walking the
/// extents before it.
///
/// # Errors
/// As [`data_extents`].
pub fn data_extents_in(f: &File, from: u64, size: u64) -> std::io::Result<Vec<Range<u64>>> {
    data_extents_at_most(f, from, size, usize::MAX)
}

/// As [`data_extents_in`], but stops after `max` extents (the last one may
/// then continue past what is returned only if it is cut by `size`).
///
/// # Errors
/// As [`data_extents`].
pub fn data_extents_at_most(
    f: &File,
    from: u64,
    size: u64,
    max: usize,
) -> std::io::Result<Vec<Range<u64>>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut pos = from;
    while pos < size && out.len() < max {
        let start = match seek(f, RSeek::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break, // no data after pos
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                #[allow(clippy::single_range_in_vec_init)]
                return Ok(if size > from {
                    vec![from..size]
                } else {
                    vec![]
                });
            }
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match seek(f, RSeek::Hole(start)) {
            Ok(e) => e.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        match out.last_mut() {
            Some(last) if last.end >= start => last.end = end,
            _ => out.push(start..end),
        }
        pos = end;
    }
    Ok(out)
}

/// Start writeback of `[offset, offset + len)` without waiting for it
/// (sync_file_range with SYNC_FILE_RANGE_WRITE), so the final fsync of a big
/// write finds most data already on its way to the disk. Errors are ignored:
/// this is only a hint, the fsync that follows is what guarantees.
pub fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a file descriptor we own for its duration.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// pread that fills `buf`; bytes past the end of the file read as zeros
/// (callers that care check the size afterwards).
///
/// # Errors
/// I/O errors other than EINTR.
pub fn read_full(f: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Total bytes in `extents`.
pub fn total(extents: &[Range<u64>]) -> u64 {
    extents.iter().map(|r| r.end - r.start).sum()
}

/// Runs of chunk indexes (start, count) that overlap `extents`, each run at
/// most `max_run` chunks long.
pub fn chunk_runs(extents: &[Range<u64>], chunk_size: u64, max_run: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in extents {
        let first = r.start / chunk_size;
        let last = (r.end - 1) / chunk_size; // inclusive
        let mut s = first;
        // skip a chunk already covered by the previous run
        if let Some((ps, pc)) = runs.last() {
            if ps + pc > s {
                s = ps + pc;
            }
        }
        while s <= last {
            let n = (last - s + 1).min(max_run);
            match runs.last_mut() {
                Some((ps, pc)) if *ps + *pc == s && *pc + n <= max_run => *pc += n,
                _ => runs.push((s, n)),
            }
            s += n;
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_file_extents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[2u8; 8192], 40 << 20).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&p).unwrap();
        let ex = data_extents(&f, 64 << 20).unwrap();
        assert_eq!(total(&ex), 4096 + 8192, "{ex:?}");
        assert_eq!(ex[0].start, 8 << 20);
        // a window starting inside the first extent and ending inside the
        // second: both clipped
        let w = data_extents_in(&f, (8 << 20) + 1000, (40 << 20) + 100).unwrap();
        assert_eq!(
            w,
            vec![
                (8 << 20) + 1000..(8 << 20) + 4096,
                40 << 20..(40 << 20) + 100
            ]
        );
        assert!(data_extents_in(&f, 9 << 20, 40 << 20).unwrap().is_empty());
    }

    #[test]
    fn runs_cover_extents_once() {
        let cs = 65536;
        let ex = vec![
            0..100,
            65536 * 3 + 5..65536 * 3 + 10,
            65536 * 3 + 20..65536 * 40,
        ];
        let runs = chunk_runs(&ex, cs, 16);
        let mut covered = vec![];
        for (s, n) in &runs {
            assert!(*n <= 16);
            covered.extend(*s..*s + *n);
        }
        let mut expect = vec![0];
        expect.extend(3..40);
        assert_eq!(covered, expect);
    }
}
