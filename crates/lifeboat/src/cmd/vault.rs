//! `lifeboat vault …`

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use lifeboat_store::prune::{prune, RetentionPolicy};
use lifeboat_store::verify::verify;
use lifeboat_store::{InitOptions, Vault};

use crate::common::{human, open_vault, print_json, Bar, SecretArgs};

#[derive(Subcommand)]
pub enum VaultCmd {
    /// Create a vault at LOCATION
    #[command(
        after_help = "LOCATION is a path, file:///path, s3://bucket/prefix (AWS_* variables: \
AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), az://container/prefix \
(AZURE_STORAGE_ACCOUNT_NAME/KEY, or AZURE_STORAGE_USE_EMULATOR=true for Azurite) or gs://bucket/prefix.\n\n\
Examples:\n  LIFEBOAT_PASSWORD=s3cret lifeboat vault init /srv/vault\n  \
lifeboat vault init --key-file /etc/lifeboat/key s3://backups/site-a"
    )]
    Init(InitArgs),
    /// Check every point: manifests, indexes, chunks (--read-data decrypts everything)
    #[command(after_help = "Example:\n  lifeboat vault verify /srv/vault --read-data")]
    Verify(VerifyArgs),
    /// Remove points by a retention policy, then delete unreferenced data
    #[command(
        after_help = "Safe while `point create` runs: packs are only condemned while a writer that \
started earlier is alive and deleted by a later prune.\n\nExample:\n  lifeboat vault prune /srv/vault --keep-last 3 --keep-daily 7 --dry-run"
    )]
    Prune(PruneArgs),
    /// Show the vault's parameters and what it holds
    #[command(after_help = "Example:\n  lifeboat vault info /srv/vault --json")]
    Info(InfoArgs),
}

#[derive(Args)]
pub struct InitArgs {
    /// Where: a path, file://, s3://, az:// or gs:// URL
    pub location: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// Chunk size: the granularity of change tracking (power of two, 4 KiB – 16 MiB)
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// zstd level for new data (1 is fast; higher packs tighter)
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub compression_level: i32,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    pub vault: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// Read and decrypt every pack and check every chunk against its id
    #[arg(long)]
    pub read_data: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PruneArgs {
    pub vault: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    #[arg(long, default_value_t = 0)]
    pub keep_hourly: usize,
    #[arg(long, default_value_t = 0)]
    pub keep_daily: usize,
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: usize,
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: usize,
    #[arg(long, default_value_t = 0)]
    pub keep_yearly: usize,
    /// Always keep points with this tag (repeatable)
    #[arg(long = "keep-tag")]
    pub keep_tags: Vec<String>,
    /// Show the plan; change nothing
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    pub vault: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.find(|c: char| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some(i) => {
            let m = match s[i..].to_ascii_lowercase().as_str() {
                "k" | "kib" | "kb" => 1 << 10,
                "m" | "mib" | "mb" => 1 << 20,
                "g" | "gib" | "gb" => 1 << 30,
                "t" | "tib" | "tb" => 1 << 40,
                "b" => 1,
                u => return Err(format!("unknown unit {u:?}: use KiB, MiB, GiB or TiB")),
            };
            (&s[..i], m)
        }
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("{s:?}: {e}"))
}

pub fn run(c: VaultCmd) -> Result<()> {
    match c {
        VaultCmd::Init(a) => {
            let backend = lifeboat_store::open_backend(&a.location)?;
            let opts = InitOptions {
                chunk_size: u32::try_from(a.chunk_size)
                    .map_err(|_| anyhow::anyhow!("chunk size too large"))?,
                compression_level: a.compression_level,
                ..Default::default()
            };
            let v = Vault::init(backend, &a.secret.secret()?, &opts)?;
            if a.json {
                print_json(
                    &serde_json::json!({"location": v.location(), "vault_id": v.config().vault_id, "chunk_size": v.chunk_size()}),
                )?;
            } else {
                println!(
                    "created vault {} at {} (chunk size {})",
                    v.config().vault_id,
                    v.location(),
                    human(v.chunk_size() as u64)
                );
            }
            Ok(())
        }
        VaultCmd::Verify(a) => {
            let v = open_vault(&a.vault, &a.secret)?;
            let bar = Bar::new("verify", a.json || !a.read_data);
            let r = verify(&v, a.read_data, |n| {
                lifeboat_capture::scan::Progress::advance(&bar, n)
            })?;
            bar.finish();
            if a.json {
                print_json(&r)?;
            } else {
                println!(
                    "checked {} points, {} chunks referenced, {} packs{}",
                    r.points,
                    r.chunks_referenced,
                    r.packs,
                    if a.read_data {
                        format!(", read {} in {} blobs", human(r.bytes_read), r.blobs_read)
                    } else {
                        String::new()
                    }
                );
                for p in &r.problems {
                    println!("DAMAGED: {p}");
                }
                if !r.unindexed_packs.is_empty() {
                    println!(
                        "note: {} pack(s) without an index (left by interrupted writers; `vault prune` removes them)",
                        r.unindexed_packs.len()
                    );
                }
                if r.ok() {
                    println!("no problems found");
                }
            }
            if !r.ok() {
                bail!("{} problem(s) found in {}", r.problems.len(), v.location());
            }
            Ok(())
        }
        VaultCmd::Prune(a) => {
            let v = open_vault(&a.vault, &a.secret)?;
            let policy = RetentionPolicy {
                keep_last: a.keep_last,
                keep_hourly: a.keep_hourly,
                keep_daily: a.keep_daily,
                keep_weekly: a.keep_weekly,
                keep_monthly: a.keep_monthly,
                keep_yearly: a.keep_yearly,
                keep_tags: a.keep_tags,
                scope_tag: None,
            };
            let r = prune(&v, &policy, a.dry_run)?;
            if a.json {
                return print_json(&r);
            }
            for d in &r.points {
                println!(
                    "{} {} {}",
                    if d.keep { "keep  " } else { "remove" },
                    d.id,
                    if d.keep {
                        d.reasons.join(",")
                    } else {
                        String::new()
                    }
                );
            }
            let verb = if a.dry_run { "would remove" } else { "removed" };
            println!(
                "{verb} {} point(s); {} {} unreferenced pack(s) ({}){}",
                r.removed_points,
                if a.dry_run {
                    "would condemn"
                } else {
                    "deleted"
                },
                if a.dry_run {
                    r.gc.condemn.len()
                } else {
                    r.gc.delete.len()
                },
                human(r.gc.delete_bytes),
                if r.gc.deferred.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} pack(s) deferred until running writers finish",
                        r.gc.deferred.len()
                    )
                }
            );
            Ok(())
        }
        VaultCmd::Info(a) => {
            let v = open_vault(&a.vault, &a.secret)?;
            let (blobs, packs) = v.index_stats();
            let stored: u64 = v.backend().list("packs/")?.iter().map(|o| o.size).sum();
            let points = v.list_points()?.len();
            let c = v.config();
            if a.json {
                print_json(&serde_json::json!({
                    "location": v.location(), "vault_id": c.vault_id, "created": c.created,
                    "chunk_size": c.chunk_size, "compression_level": c.compression_level,
                    "pack_size": c.pack_size, "points": points, "blobs": blobs, "packs": packs,
                    "stored_bytes": stored,
                }))
            } else {
                println!("vault {} at {}", c.vault_id, v.location());
                println!(
                    "  chunk size {}, zstd level {}, packs of {}",
                    human(c.chunk_size as u64),
                    c.compression_level,
                    human(c.pack_size as u64)
                );
                println!(
                    "  {points} points, {blobs} blobs in {packs} packs, {} stored",
                    human(stored)
                );
                Ok(())
            }
        }
    }
}
