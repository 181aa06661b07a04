//! `lifeboat demo`: the whole cycle on a sample volume, no root needed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use lifeboat_capture::diff::diff_indexes;
use lifeboat_capture::restore::{restore_volume, RestoreOptions};
use lifeboat_capture::scan::{create_point, CreateOptions, NoProgress, VolumeSpec};
use lifeboat_copy::{copy, digest, CopyOptions, Endpoint};
use lifeboat_store::{InitOptions, Secret, Vault};

use crate::cmd::vault::parse_size;
use crate::common::{human, print_json};
use crate::sample;

#[derive(Args)]
#[command(
    after_help = "Creates a vault and a sparse sample volume, takes a point, changes 1 % of the volume \
in 64 KiB writes, takes another, shows the diff, restores both points and verifies them against copies of \
the volume; then runs a recovery site (server) and a primary (agent) on loopback with mutual TLS, \
replicates a 20 MB/s workload with live RPO, checks the hot replica and a point restored at the recovery \
site against the primary, and prints a report.\n\nExamples:\n  lifeboat demo\n  lifeboat demo --dir /tmp/lb --size 1GiB --json"
)]
pub struct DemoArgs {
    /// Work directory (default: a new temporary directory, removed afterwards)
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Nominal size of the sample volume (half of it holds data)
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub size: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Step {
    step: String,
    seconds: f64,
    detail: String,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let tmp;
    let dir: PathBuf = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempdir()?;
            tmp.0.clone()
        }
    };
    let mut steps: Vec<Step> = Vec::new();
    let say = |steps: &mut Vec<Step>, json: bool, step: &str, t: Instant, detail: String| {
        let s = Step {
            step: step.into(),
            seconds: t.elapsed().as_secs_f64(),
            detail,
        };
        if !json {
            println!("{:<28} {:>7.2}s  {}", s.step, s.seconds, s.detail);
        }
        steps.push(s);
    };

    let vol = dir.join("volume.raw");
    let vault_dir = dir.join("vault");
    if vault_dir.exists() {
        bail!(
            "{} already holds a vault: pick an empty --dir",
            vault_dir.display()
        );
    }
    let t = Instant::now();
    let data = sample::make_image(&vol, a.size, a.size / 2, 1)?;
    say(
        &mut steps,
        a.json,
        "make sample volume",
        t,
        format!(
            "{} nominal, {} data (half random, half text)",
            human(a.size),
            human(data)
        ),
    );

    let t = Instant::now();
    let key = lifeboat_store::crypto::random_bytes::<32>();
    std::fs::write(dir.join("vault.key"), hex::encode(key))?;
    let vault = Arc::new(Vault::init(
        lifeboat_store::open_backend(vault_dir.to_str().context("path")?)?,
        &Secret::KeyFile(hex::encode(key).into_bytes()),
        &InitOptions::default(),
    )?);
    say(
        &mut steps,
        a.json,
        "vault init",
        t,
        format!(
            "{} (key file {})",
            vault.location(),
            dir.join("vault.key").display()
        ),
    );

    let specs = vec![VolumeSpec {
        name: "disk0".parse()?,
        path: vol.clone(),
    }];
    let t = Instant::now();
    let p1 = create_point(
        &vault,
        &specs,
        &CreateOptions {
            tags: vec!["demo".into()],
            ..Default::default()
        },
        &NoProgress,
    )?;
    say(
        &mut steps,
        a.json,
        "point 1 (initial)",
        t,
        format!(
            "{} read, {} stored ({:.1}x smaller)",
            human(p1.data_bytes),
            human(p1.stored.new_stored_bytes),
            p1.data_bytes as f64 / p1.stored.new_stored_bytes.max(1) as f64
        ),
    );

    // Keep a copy of the volume as it was, to verify the first restore.
    let t = Instant::now();
    let v1 = dir.join("volume-at-point1.raw");
    copy(
        &Endpoint::Local(vol.clone()),
        &Endpoint::Local(v1.clone()),
        &CopyOptions::default(),
        &NoProgress,
    )?;
    say(
        &mut steps,
        a.json,
        "lifeboat copy (sparse)",
        t,
        format!("kept the volume as of point 1 in {}", v1.display()),
    );

    let t = Instant::now();
    let written = sample::mutate(&vol, 0.01, 64 << 10, 2)?;
    say(
        &mut steps,
        a.json,
        "change 1 % of the volume",
        t,
        format!("{} in random 64 KiB writes", human(written)),
    );

    let t = Instant::now();
    let p2 = create_point(&vault, &specs, &CreateOptions::default(), &NoProgress)?;
    say(
        &mut steps,
        a.json,
        "point 2 (incremental)",
        t,
        format!(
            "{} new stored for {} written ({:.2}x)",
            human(p2.stored.new_stored_bytes),
            human(written),
            p2.stored.new_stored_bytes as f64 / written.max(1) as f64
        ),
    );

    let t = Instant::now();
    let m1 = vault.load_manifest(&p1.id)?;
    let m2 = vault.load_manifest(&p2.id)?;
    let i1 = vault.load_fixed_index(&p1.id, &m1.volumes[0])?;
    let i2 = vault.load_fixed_index(&p2.id, &m2.volumes[0])?;
    let changed = diff_indexes(&i1, &i2);
    let changed_bytes: u64 = changed.iter().map(|r| r.end - r.start).sum();
    say(
        &mut steps,
        a.json,
        "point diff",
        t,
        format!(
            "{} in {} ranges changed",
            human(changed_bytes),
            changed.len()
        ),
    );

    let mut restores = Vec::new();
    for (n, (p, reference)) in [(p1.id, &v1), (p2.id, &vol)].into_iter().enumerate() {
        let out = dir.join(format!("restored-point{}.raw", n + 1));
        let t = Instant::now();
        if !restore_and_compare(&vault, &p, &out, reference)? {
            bail!("restored point {p} differs from the volume it was taken of");
        }
        say(
            &mut steps,
            a.json,
            &format!("restore point {} + verify", n + 1),
            t,
            format!("byte-identical to the volume at point {} (BLAKE3)", n + 1),
        );
        restores.push(out);
    }

    let stored: u64 = vault.backend().list("packs/")?.iter().map(|o| o.size).sum();
    let logical = p1.data_bytes + p2.data_bytes;
    let vault_location = vault.location();
    drop(vault);

    if !a.json {
        println!("\ntwo sites on this machine: primary (agent) -> recovery (server), mutual TLS on loopback");
    }
    let sites = crate::cmd::demo_sites::run(
        &dir,
        &vol,
        &vault_dir,
        &hex::encode(key),
        a.json,
        &mut |step: &str, t: Instant, detail: String| say(&mut steps, a.json, step, t, detail),
    )?;
    let report = serde_json::json!({
        "dir": dir, "vault": vault_location, "volume_nominal": a.size, "volume_data": data,
        "points": [p1.id, p2.id], "change_written": written, "change_stored": p2.stored.new_stored_bytes,
        "vault_bytes": stored, "logical_bytes": logical,
        "dedup_compression_ratio": logical as f64 / stored.max(1) as f64, "steps": steps,
        "replication": {"initial_sync_secs": sites.initial_sync_secs, "written": sites.written,
            "rpo_p50_ms": sites.rpo_p50_ms, "rpo_max_ms": sites.rpo_max_ms, "point": sites.point},
    });
    if a.json {
        print_json(&report)?;
    } else {
        println!();
        println!("vault holds {} for {} of data in 2 points: {:.1}x less (dedup + compression), encrypted", human(stored), human(logical), logical as f64 / stored.max(1) as f64);
        println!(
            "1 % change: {} written, {} stored ({:.2}x)",
            human(written),
            human(p2.stored.new_stored_bytes),
            p2.stored.new_stored_bytes as f64 / written.max(1) as f64
        );
        println!(
            "replication: {} written at ~20 MB/s, RPO p50 {} ms, max {} ms; replica and recovered point byte-identical",
            human(sites.written),
            sites.rpo_p50_ms,
            sites.rpo_max_ms
        );
        if a.dir.is_some() {
            println!(
                "everything is in {} (try: lifeboat point list {} --key-file {})",
                dir.display(),
                vault_dir.display(),
                dir.join("vault.key").display()
            );
        }
    }
    Ok(())
}

/// Restore volume `disk0` of `point` to `out` (verified) and say whether it
/// is byte-identical (BLAKE3) to `reference`.
pub fn restore_and_compare(
    vault: &Arc<Vault>,
    point: &lifeboat_format::PointId,
    out: &std::path::Path,
    reference: &std::path::Path,
) -> Result<bool> {
    restore_volume(
        vault,
        point,
        "disk0",
        out,
        &RestoreOptions {
            verify: true,
            ..Default::default()
        },
        &NoProgress,
    )?;
    Ok(digest(&Endpoint::Local(out.to_path_buf()))?
        == digest(&Endpoint::Local(reference.to_path_buf()))?)
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn tempdir() -> Result<TempDir> {
    let base = std::env::temp_dir().join(format!(
        "lifeboat-demo-{}",
        hex::encode(lifeboat_store::crypto::random_bytes::<4>())
    ));
    std::fs::create_dir_all(&base)?;
    Ok(TempDir(base))
}
