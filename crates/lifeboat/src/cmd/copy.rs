//! `lifeboat copy SRC DST`

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use lifeboat_copy::{copy, CopyOptions, Endpoint};

use crate::common::{human, print_json, Bar};

#[derive(Args)]
#[command(
    after_help = "SRC and DST: a local file, a block device, file:///path, or s3://bucket/key, \
az://container/blob, gs://bucket/key (credentials from the usual AWS_*, AZURE_*, GOOGLE_* variables).\n\n\
Progress counts data bytes (holes are neither read nor sent). Nothing appears at DST until the copy is \
complete; after an interruption DST is unchanged and --resume continues the copy: a local DST from its \
hidden partial file, an object DST by uploading only the parts still missing (the checkpoint is kept in \
$LIFEBOAT_STATE_DIR, else ~/.local/state/lifeboat/uploads).\n\n\
Examples:\n  lifeboat copy vm.raw /mnt/backup/vm.raw --verify\n  lifeboat copy vm.raw az://images/vm.raw\n  \
lifeboat copy s3://images/vm.raw /var/lib/images/vm.raw --resume"
)]
pub struct CopyArgs {
    pub src: String,
    pub dst: String,
    /// Continue an interrupted copy from its last checkpoint
    #[arg(long)]
    pub resume: bool,
    /// Compare BLAKE3 digests of source and destination afterwards
    #[arg(long)]
    pub verify: bool,
    /// Concurrent ranged transfers for object stores
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Part size for object stores
    #[arg(long, default_value = "16MiB", value_parser = crate::cmd::vault::parse_size)]
    pub part_size: u64,
    /// Do not fsync a local destination before publishing it (faster, like
    /// cp; a power cut soon after may lose it — a kill or Ctrl-C never does)
    #[arg(long)]
    pub no_fsync: bool,
    /// Bytes between checkpoints of a copy to a local file
    #[arg(long, default_value = "256MiB", value_parser = crate::cmd::vault::parse_size, hide = true)]
    pub checkpoint_every: u64,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: CopyArgs) -> Result<()> {
    let src = Endpoint::parse(&a.src)?;
    let dst = Endpoint::parse(&a.dst)?;
    let opts = CopyOptions {
        resume: a.resume,
        verify: a.verify,
        parallel: a.parallel.max(1),
        part_size: a.part_size.max(5 << 20),
        checkpoint_every: a.checkpoint_every.max(1 << 20),
        fsync: !a.no_fsync,
        // Test hook (crash after a checkpoint); not for users.
        fail_after_checkpoint: std::env::var("LIFEBOAT_TEST_FAIL_COPY_AFTER")
            .ok()
            .and_then(|v| v.parse().ok()),
    };
    let bar = Bar::new("copy", a.json);
    let t = Instant::now();
    let r = copy(&src, &dst, &opts, &bar)?;
    bar.finish();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        return print_json(&serde_json::json!({"copy": r, "seconds": secs}));
    }
    println!(
        "copied {} -> {}: {} data of {} nominal in {:.2}s ({}){}{}",
        r.src,
        r.dst,
        human(r.data_bytes),
        human(r.nominal_bytes),
        secs,
        r.method,
        if r.resumed_from > 0 {
            format!(", resumed at {}", human(r.resumed_from))
        } else {
            String::new()
        },
        r.blake3
            .as_deref()
            .map(|d| format!(", verified blake3 {}", &d[..16]))
            .unwrap_or_default()
    );
    Ok(())
}
