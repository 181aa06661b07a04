//! The persistent dirty map (format in `lifeboat_format::dirtymap`): marks
//! the chunks a write touches, durably, before the write is acknowledged.
//! Only clean→dirty transitions cost a write and an fdatasync of the map;
//! writes to chunks already dirty cost nothing (as DRBD's activity log
//! amortises its updates).

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use lifeboat_format::dirtymap::{DirtyMapHeader, HEADER_LEN};

pub struct DirtyMap {
    file: File,
    header: DirtyMapHeader,
    bits: Mutex<Vec<u8>>,
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
            return Ok(DirtyMap {
                file,
                header: want,
                bits: Mutex::new(vec![0; want.bitmap_len() as usize]),
            });
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
        Ok(DirtyMap {
            file,
            header,
            bits: Mutex::new(bits),
        })
    }

    fn chunk_range(&self, offset: u64, len: u64) -> Range<u64> {
        let cs = self.header.chunk_size as u64;
        if len == 0 {
            return 0..0;
        }
        (offset / cs)..((offset + len - 1) / cs + 1).min(self.header.chunks())
    }

    /// Mark the chunks of `[offset, offset+len)` dirty, durably. Returns
    /// whether the map changed (and so was synced).
    ///
    /// # Errors
    /// I/O errors writing the map: the write must then not be acknowledged.
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<bool> {
        let r = self.chunk_range(offset, len);
        if r.is_empty() {
            return Ok(false);
        }
        let mut bits = self.bits.lock().unwrap();
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for c in r {
            let (byte, bit) = ((c / 8) as usize, 1u8 << (c % 8));
            if bits[byte] & bit == 0 {
                bits[byte] |= bit;
                lo = lo.min(byte);
                hi = hi.max(byte + 1);
            }
        }
        if lo == usize::MAX {
            return Ok(false);
        }
        self.file
            .write_all_at(&bits[lo..hi], (HEADER_LEN + lo) as u64)?;
        self.file.sync_data()?;
        Ok(true)
    }

    /// Dirty chunks, as byte ranges of the volume (merged).
    pub fn dirty_ranges(&self) -> Vec<Range<u64>> {
        let bits = self.bits.lock().unwrap();
        let cs = self.header.chunk_size as u64;
        let mut out: Vec<Range<u64>> = Vec::new();
        for c in 0..self.header.chunks() {
            if bits[(c / 8) as usize] & (1 << (c % 8)) != 0 {
                let s = c * cs;
                let e = (s + cs).min(self.header.size);
                match out.last_mut() {
                    Some(r) if r.end == s => r.end = e,
                    _ => out.push(s..e),
                }
            }
        }
        out
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
        assert!(m.mark(8000, 200).unwrap(), "crosses into chunk 2");
        assert!(m.mark(99_999, 1).unwrap());
        drop(m);
        let m = DirtyMap::open(&p, 4096, 100_000).unwrap();
        assert_eq!(m.dirty_ranges(), vec![4096..12288, 98304..100_000]);
        assert!(
            DirtyMap::open(&p, 8192, 100_000).is_err(),
            "another geometry is refused"
        );
    }
}
