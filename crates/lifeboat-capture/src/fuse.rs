//! A FUSE single-file export of a volume: the splitter's front end for a
//! local file system on a machine without nbd/ublk modules. The mount point
//! holds one file, named after the export, of the volume's size; loop-mount
//! it (`losetup`, `mount`) and every write the file system makes goes
//! through [`Export`] — dirty map, journal, volume — before it returns.
//! `fsync`/`fdatasync` are barriers; `fallocate(PUNCH_HOLE)` is a trim and
//! `fallocate(ZERO_RANGE)` a zeroing. Files are opened in direct-I/O mode,
//! so the kernel keeps no second copy in the page cache and every write
//! reaches the journal in the order the loop device issues it.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use crate::extents::read_full;
use crate::splitter::Export;

const TTL: Duration = Duration::from_secs(1);
const FILE: INodeNo = INodeNo(2);

struct Fs {
    export: Arc<Export>,
    uid: u32,
    gid: u32,
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Fs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let dir = ino == INodeNo::ROOT;
        let now = SystemTime::now();
        FileAttr {
            ino,
            size: if dir { 0 } else { self.export.size },
            blocks: if dir {
                0
            } else {
                self.export.size.div_ceil(512)
            },
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir {
                0o755
            } else if self.export.read_only {
                0o400
            } else {
                0o600
            },
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_BIG_WRITES);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == OsStr::new(&self.export.name) {
            reply.entry(&TTL, &self.attr(FILE), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == FILE {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // a volume has a fixed size; times and modes are not kept
        if size.is_some_and(|s| s != self.export.size) {
            reply.error(Errno::EINVAL);
            return;
        }
        reply.attr(&TTL, &self.attr(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        let acc = flags.0 & libc::O_ACCMODE;
        if self.export.read_only && acc != libc::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = (offset + size as u64).min(self.export.size);
        if offset >= end {
            reply.data(&[]);
            return;
        }
        let mut b = vec![0u8; (end - offset) as usize];
        match read_full(&self.export.file, &mut b, offset) {
            Ok(()) => reply.data(&b),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if offset + data.len() as u64 > self.export.size {
            reply.error(Errno::ENOSPC);
            return;
        }
        let r = self.export.write(offset, data).and_then(|_| {
            if flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0 {
                self.export.flush()
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.export.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let end = (offset + length).min(self.export.size);
        let len = end.saturating_sub(offset);
        let r = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            self.export.trim(offset, len)
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            self.export.zero(offset, len, false)
        } else if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
            Ok(()) // preallocation: the volume is already its full size
        } else {
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, self.export.name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted FUSE export; unmounted when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// Mount `export` at `mountpoint` (an existing, empty directory) as a
/// single file named after the export, served by two threads.
///
/// # Errors
/// FUSE not available (`/dev/fuse`), or mount errors.
pub fn mount(export: Arc<Export>, mountpoint: &Path) -> io::Result<Mounted> {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(format!("lifeboat:{}", export.name)),
        MountOption::Subtype("lifeboat".into()),
        MountOption::DefaultPermissions,
    ];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(2);
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = Fs { export, uid, gid };
    let s = fuser::spawn_mount(fs, mountpoint, &cfg)?;
    Ok(Mounted { session: Some(s) })
}
