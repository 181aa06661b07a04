//! `lifeboat debug …` (hidden): reproducible sample images for tests and
//! benchmarks.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use crate::cmd::vault::parse_size;
use crate::sample;

#[derive(Subcommand)]
pub enum DebugCmd {
    /// Create a sparse image with DATA bytes of data (half random, half text)
    MakeImage {
        path: PathBuf,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, value_parser = parse_size)]
        data: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Overwrite PERCENT of an image in random writes of WRITE_SIZE bytes
    Mutate {
        path: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        percent: f64,
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        write_size: u64,
        #[arg(long, default_value_t = 2)]
        seed: u64,
    },
    /// Summarise a write journal, optionally replaying it onto a volume
    Journal {
        dir: PathBuf,
        /// Apply the journal's writes, in order, to this file
        #[arg(long)]
        replay_onto: Option<PathBuf>,
    },
    /// Measure the data path alone (keyed hash + zstd + AES-GCM) on the data
    /// of an image held in memory, on one thread; prints MB/s
    Datapath {
        path: PathBuf,
        #[arg(long, default_value_t = 1)]
        level: i32,
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        chunk_size: u64,
    },
}

pub fn run(c: DebugCmd) -> Result<()> {
    match c {
        DebugCmd::MakeImage {
            path,
            size,
            data,
            seed,
        } => {
            let d = sample::make_image(&path, size, data, seed)?;
            println!("{d}");
        }
        DebugCmd::Mutate {
            path,
            percent,
            write_size,
            seed,
        } => {
            let w = sample::mutate(&path, percent / 100.0, write_size, seed)?;
            println!("{w}");
        }
        DebugCmd::Journal { dir, replay_onto } => {
            let recs = lifeboat_capture::journal::read_all(&dir)?;
            use lifeboat_format::journal::RecordKind;
            let count = |k: RecordKind| recs.iter().filter(|r| r.kind == k).count();
            let bytes: u64 = recs
                .iter()
                .filter(|r| r.kind == RecordKind::Write)
                .map(|r| r.len as u64)
                .sum();
            let map = dir.join("dirty.map");
            // read only: opening the map for use would rewrite its state
            let dirty = if map.exists() {
                Some(lifeboat_capture::dirtymap::DirtyMap::read_ranges(&map)?)
            } else {
                None
            };
            if let Some(p) = replay_onto {
                let f = std::fs::OpenOptions::new().write(true).open(&p)?;
                lifeboat_capture::journal::replay(&recs, &f)?;
            }
            println!(
                "{}",
                serde_json::json!({
                    "records": recs.len(), "writes": count(RecordKind::Write), "zeroes": count(RecordKind::Zero),
                    "trims": count(RecordKind::Trim), "barriers": count(RecordKind::Barrier), "write_bytes": bytes,
                    "first_seq": recs.first().map(|r| r.seq), "last_seq": recs.last().map(|r| r.seq),
                    "dirty_ranges": dirty.as_ref().map(|d| d.len()),
                    "dirty_bytes": dirty.as_deref().map(lifeboat_capture::extents::total),
                })
            );
        }
        DebugCmd::Datapath {
            path,
            level,
            chunk_size,
        } => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(&path)?;
            let size = lifeboat_capture::extents::volume_size(&f)?;
            let ext = lifeboat_capture::extents::data_extents(&f, size)?;
            let mut data = Vec::with_capacity(lifeboat_capture::extents::total(&ext) as usize);
            for r in &ext {
                let start = data.len();
                data.resize(start + (r.end - r.start) as usize, 0);
                f.read_exact_at(&mut data[start..], r.start)?;
            }
            let keys = lifeboat_store::crypto::Keys::from_master(&[7; 32], "bench");
            let t = std::time::Instant::now();
            let mut stored = 0usize;
            // sealed into a reused pack-sized buffer, as the pack writer does
            let bound = lifeboat_store::crypto::sealed_bound(chunk_size as usize);
            // (in huge pages where THP allows, as the pack writer's)
            let plen = (16 << 20) + bound;
            let (mut whole, skip) = lifeboat_store::backend::local::huge_buffer(plen);
            let pack = &mut whole[skip..skip + plen];
            let mut end = 0;
            for c in data.chunks(chunk_size as usize) {
                let id = keys.chunk_id(c);
                if end >= 16 << 20 {
                    end = 0; // a full pack: the next one reuses the buffer
                }
                let n = keys.seal_to(
                    lifeboat_format::blob::BlobKind::Data,
                    &id.0,
                    c,
                    level,
                    &mut pack[end..],
                );
                end += n;
                stored += n;
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{{\"bytes\": {}, \"stored\": {stored}, \"seconds\": {secs:.3}, \"mb_per_s\": {:.0}}}",
                data.len(),
                data.len() as f64 / secs / 1e6
            );
        }
    }
    Ok(())
}
