//! A vault in a local directory.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{BResult, Backend, BackendError, ObjectInfo};

/// Objects are files under `root`; `put` writes `.<name>.tmp-<rand>`,
/// fsyncs, renames and fsyncs the directory.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    pub fn new(root: impl AsRef<Path>) -> Self {
        LocalBackend {
            root: root.as_ref().to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn io(&self, op: &'static str, key: &str, source: std::io::Error) -> BackendError {
        if source.kind() == ErrorKind::NotFound && op != "put" {
            return BackendError::NotFound {
                location: self.location(),
                key: key.to_string(),
            };
        }
        BackendError::Io {
            location: self.location(),
            op,
            key: key.to_string(),
            source,
        }
    }

    fn write_tmp(&self, key: &str, data: &[u8]) -> BResult<(PathBuf, PathBuf)> {
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| self.io("put", key, e))?;
            // make the new directory entry durable too
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            fsync_dir(parent).map_err(|e| self.io("put", key, e))?;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("obj");
        let tmp = dir.join(format!(".{name}.tmp-{:08x}", rand_u32()));
        let res = if data.len() >= DIRECT_MIN {
            write_direct(&tmp, data)
        } else {
            (|| {
                let mut f = File::create(&tmp)?;
                f.write_all(data)?;
                f.sync_all()
            })()
        };
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(self.io("put", key, e));
        }
        Ok((tmp, dir))
    }
}

/// Objects at least this big (packs) are written with O_DIRECT.
const DIRECT_MIN: usize = 1 << 20;
const ALIGN: usize = 4096;

thread_local! {
    /// A reusable, 4 KiB-aligned bounce buffer for O_DIRECT writes.
    static BOUNCE: std::cell::RefCell<Vec<u128>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write `data` to a new file at `path` and fsync it. The 4 KiB-aligned
/// bulk goes through O_DIRECT from a reused buffer: packs are not read back
/// soon, so they should neither evict the workload's page cache nor pay for
/// new page-cache pages; the unaligned tail is written normally. Falls back
/// to buffered writes where O_DIRECT is unsupported (tmpfs).
fn write_direct(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let aligned = data.len() / ALIGN * ALIGN;
    let direct = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc_o_direct())
        .open(path);
    let f = match direct {
        Ok(f) => {
            let r = direct_write_at(&f, &data[..aligned], 0);
            match r {
                Ok(()) => f,
                Err(e) if e.raw_os_error() == Some(22) => {
                    drop(f);
                    let _ = fs::remove_file(path);
                    return write_buffered(path, data);
                }
                Err(e) => return Err(e),
            }
        }
        Err(e) if e.raw_os_error() == Some(22) => return write_buffered(path, data),
        Err(e) => return Err(e),
    };
    drop(f);
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(&data[aligned..], aligned as u64)?;
    f.sync_all()
}

/// Write `data` (a multiple of 4 KiB long) at `off` (4 KiB-aligned) to a
/// file opened with O_DIRECT: straight from `data` when it is 4 KiB-aligned
/// in memory (a pack buffer), otherwise through a reused 4 KiB-aligned
/// bounce buffer of this thread.
///
/// # Errors
/// I/O errors; EINVAL where the file system refuses direct I/O.
pub fn direct_write_at(f: &File, data: &[u8], off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    debug_assert!(data.len().is_multiple_of(ALIGN) && off.is_multiple_of(ALIGN as u64));
    if data.as_ptr().align_offset(ALIGN) == 0 {
        return f.write_all_at(data, off);
    }
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        const STEP: usize = 4 << 20;
        if b.len() * 16 < STEP + ALIGN {
            b.resize((STEP + ALIGN) / 16, 0);
        }
        // SAFETY: u128 storage reinterpreted as bytes (any bit pattern is a
        // valid u8); the start is aligned to 4096 by offsetting.
        let bytes: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut u8, b.len() * 16) };
        let skip = bytes.as_ptr().align_offset(ALIGN);
        let usable = (bytes.len() - skip) / ALIGN * ALIGN;
        let buf = &mut bytes[skip..skip + usable];
        let mut pos = 0;
        while pos < data.len() {
            let n = (data.len() - pos).min(buf.len());
            buf[..n].copy_from_slice(&data[pos..pos + n]);
            f.write_all_at(&buf[..n], off + pos as u64)?;
            pos += n;
        }
        Ok(())
    })
}

/// Open `path` for writing with O_DIRECT, if the file system allows it.
pub fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc_o_direct())
        .open(path)
        .ok()
}

/// Empty `buf` and make room for `cap` bytes that start 4 KiB-aligned in
/// memory, so [`direct_write_at`] writes them without its bounce copy:
/// `buf` is left holding the padding, whose length is returned. The bytes
/// stay aligned while `buf` keeps this allocation (grows within `cap`).
pub fn start_aligned(buf: &mut Vec<u8>, cap: usize) -> usize {
    buf.clear();
    buf.reserve(cap + ALIGN);
    let skip = align_skip(buf, ALIGN);
    buf.resize(skip, 0);
    skip
}

/// Bytes from the start of `buf` to its first `align`-aligned address.
pub fn align_skip(buf: &[u8], align: usize) -> usize {
    buf.as_ptr().align_offset(align).min(align)
}

/// A transparent huge page's size (x86_64, aarch64 with 4 KiB pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// A zeroed `Vec` of `len` bytes whose memory (the 2 MiB-aligned part of
/// it) is advised for transparent huge pages. A big allocation is usually
/// fresh zero pages from the OS that `vec![0; len]` does not touch (no
/// memset), so the advice comes before the first fault; pages the
/// allocator hands out again were touched already and stay small until
/// the kernel collapses them. Big buffers that are filled and read over
/// and over (pack buffers, read buffers, a receiver's frame buffers) then
/// cost one page fault and one TLB entry per 2 MiB instead of 512: in a VM,
/// where a TLB miss walks the guest's and the host's page tables, a point
/// took 5 % less time. Without THP (`never`) the advice does nothing.
pub fn huge_vec(len: usize) -> Vec<u8> {
    let v = vec![0u8; len];
    let p = v.as_ptr() as usize;
    let start = (p + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let end = (p + len) & !(HUGE_PAGE - 1);
    if end > start {
        // SAFETY: the range lies inside `v`'s allocation; MADV_HUGEPAGE
        // changes no contents, only how the range is backed.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
    v
}

/// Make a buffer that is kept for reuse hold at least `len` bytes: when it
/// is shorter it is replaced (its contents dropped) by a [`huge_vec`] of
/// `len`, or of `min` if that is more (fewer regrowths).
pub fn grow_huge(buf: &mut Vec<u8>, len: usize, min: usize) {
    if buf.len() < len {
        *buf = huge_vec(len.max(min));
    }
}

/// A [`huge_vec`] holding `len` bytes from a huge-page boundary on:
/// returns the buffer and that offset.
pub fn huge_buffer(len: usize) -> (Vec<u8>, usize) {
    // whole huge pages past the boundary, wherever it falls
    let buf = huge_vec(len.next_multiple_of(HUGE_PAGE) + HUGE_PAGE);
    let off = align_skip(&buf, HUGE_PAGE);
    (buf, off)
}

/// Alignment that O_DIRECT offsets and lengths need.
pub const DIRECT_ALIGN: usize = ALIGN;

fn write_buffered(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn libc_o_direct() -> i32 {
    0o40000 // O_DIRECT on x86_64 and aarch64 Linux
}

pub(crate) fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("OS random source");
    u32::from_le_bytes(b)
}

pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn put(&self, key: &str, data: &[u8]) -> BResult<()> {
        let (tmp, dir) = self.write_tmp(key, data)?;
        let path = self.path(key);
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(self.io("put", key, e));
        }
        fsync_dir(&dir).map_err(|e| self.io("put", key, e))
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> BResult<()> {
        let (tmp, dir) = self.write_tmp(key, data)?;
        let path = self.path(key);
        // link(2) fails if the target exists: an atomic create-if-absent.
        let res = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match res {
            Ok(()) => fsync_dir(&dir).map_err(|e| self.io("put", key, e)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(BackendError::AlreadyExists {
                location: self.location(),
                key: key.to_string(),
            }),
            Err(e) => Err(self.io("put", key, e)),
        }
    }

    fn get(&self, key: &str) -> BResult<Vec<u8>> {
        fs::read(self.path(key)).map_err(|e| self.io("get", key, e))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Vec<u8>> {
        let mut f = File::open(self.path(key)).map_err(|e| self.io("get", key, e))?;
        let len = range.end.saturating_sub(range.start) as usize;
        let mut buf = vec![0u8; len];
        f.seek(SeekFrom::Start(range.start))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| self.io("get", key, e))?;
        Ok(buf)
    }

    fn head(&self, key: &str) -> BResult<Option<u64>> {
        match fs::metadata(self.path(key)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("head", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let base = self.path(prefix);
        let mut stack = vec![base];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io("list", prefix, e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| self.io("list", prefix, e))?;
                let name = ent.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue; // temporary files of unfinished puts
                }
                let ft = ent.file_type().map_err(|e| self.io("list", prefix, e))?;
                if ft.is_dir() {
                    stack.push(ent.path());
                } else if ft.is_file() {
                    let size = ent.metadata().map(|m| m.len()).unwrap_or(0);
                    let rel = ent
                        .path()
                        .strip_prefix(&self.root)
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    out.push(ObjectInfo { key: rel, size });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> BResult<()> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            // durable, so a crash cannot bring back an index prune removed
            Ok(()) => {
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                fsync_dir(dir).map_err(|e| self.io("delete", key, e))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("delete", key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_backend_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        crate::backend::suite::run(&LocalBackend::new(dir.path()));
    }

    #[test]
    fn big_objects_round_trip_through_direct_io() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        for len in [DIRECT_MIN, DIRECT_MIN + 1, (9 << 20) + 777] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            b.put("packs/x", &data).unwrap();
            assert_eq!(b.get("packs/x").unwrap(), data);
        }
    }

    #[test]
    fn relative_roots_work() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::env::current_dir().unwrap();
        std::env::set_current_dir(dir.path()).unwrap();
        let b = LocalBackend::new("vault");
        let r = b
            .put("config", b"x")
            .and_then(|_| b.put("packs/ab/c", b"y"))
            .and_then(|_| b.delete("packs/ab/c"));
        std::env::set_current_dir(old).unwrap();
        r.unwrap();
        assert!(dir.path().join("vault/config").exists());
    }

    #[test]
    fn put_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.put("a/b", b"x").unwrap();
        let names: Vec<_> = fs::read_dir(dir.path().join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("b")]);
    }
}
