//! Reproducible sample volumes for the demo and the benchmarks: a sparse
//! image whose data is half random (incompressible) and half text-like.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};

/// splitmix64: small, fast, reproducible.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "recovery",
    "site",
    "volume",
    "replica",
    "failover",
    "database",
    "primary",
    "journal",
    "checkpoint",
    "transaction",
    "commit",
    "server",
    "network",
    "storage",
    "backup",
    "restore",
    "point",
    "consistent",
    "write",
    "read",
    "block",
    "sector",
    "log",
    "sequence",
    "apply",
    "plan",
    "group",
    "health",
    "probe",
    "dns",
    "record",
];

/// Fill `buf` with text-like data (words, numbers, newlines).
pub fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let r = rng.next();
        let w: &[u8] = if r.is_multiple_of(11) {
            b"\n"
        } else if r.is_multiple_of(7) {
            b" 4096"
        } else {
            WORDS[(r >> 8) as usize % WORDS.len()].as_bytes()
        };
        for b in w.iter().chain(b" ".iter()) {
            if i < buf.len() {
                buf[i] = *b;
                i += 1;
            }
        }
    }
}

/// Create a sparse image of `size` bytes with `data` bytes of data in 1 MiB
/// extents spread over it, alternating random and text. Returns data bytes.
///
/// # Errors
/// I/O errors.
pub fn make_image(path: &Path, size: u64, data: u64, seed: u64) -> Result<u64> {
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(size)?;
    let ext = 1u64 << 20;
    let n = (data / ext).max(1).min(size / ext);
    let stride = size / ext / n.max(1); // in extents
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; ext as usize];
    for i in 0..n {
        if i % 2 == 0 {
            rng.fill(&mut buf);
        } else {
            fill_text(&mut rng, &mut buf);
        }
        f.write_all_at(&buf, i * stride * ext)?;
    }
    f.sync_all()?;
    Ok(n * ext)
}

/// Overwrite `fraction` of the image's size with random writes of
/// `write_size` bytes at 4 KiB-aligned random offsets (like a file system).
/// Returns the bytes written.
///
/// # Errors
/// I/O errors.
pub fn mutate(path: &Path, fraction: f64, write_size: u64, seed: u64) -> Result<u64> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let size = f.metadata()?.len();
    let writes = ((size as f64 * fraction) / write_size as f64).ceil() as u64;
    let mut rng = Rng::new(seed.wrapping_mul(7919));
    let mut buf = vec![0u8; write_size as usize];
    let slots = (size - write_size) / 4096;
    for _ in 0..writes {
        let off = (rng.next() % slots.max(1)) * 4096;
        rng.fill(&mut buf);
        f.write_all_at(&buf, off)?;
    }
    f.sync_all()?;
    Ok(writes * write_size)
}
