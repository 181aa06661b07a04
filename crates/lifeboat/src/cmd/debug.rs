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
    }
    Ok(())
}
