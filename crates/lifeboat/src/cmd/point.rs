//! `lifeboat point …`

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lifeboat_capture::diff::{diff_indexes, VolumeDiff};
use lifeboat_capture::restore::{restore_volume, RestoreOptions};
use lifeboat_capture::scan::{create_point, CreateOptions, VolumeSpec};
use lifeboat_format::manifest::PointKind;

use crate::common::{fmt_time, human, open_vault, open_vault_config, print_json, Bar, SecretArgs};

#[derive(Subcommand)]
pub enum PointCmd {
    /// Take a recovery point of one or more volumes (one consistency group)
    #[command(
        after_help = "Reads only data extents, ships only chunks the vault lacks, writes the manifest last.\n\n\
Examples:\n  lifeboat point create /srv/vault --volume disk0=/var/lib/images/vm.raw\n  \
lifeboat point create /srv/vault --volume db=/dev/vg0/db --volume logs=/dev/vg0/logs \\\n      \
--pre-hook 'fsfreeze -f /srv/db' --post-hook 'fsfreeze -u /srv/db' --tag nightly"
    )]
    Create(CreateArgs),
    /// List recovery points, oldest first
    #[command(after_help = "Example:\n  lifeboat point list /srv/vault --json")]
    List(ListArgs),
    /// Show one point: its volumes, sizes and chunks
    #[command(
        after_help = "POINT is an id, a unique prefix of one, or `latest`.\n\nExample:\n  lifeboat point show /srv/vault latest"
    )]
    Show(ShowArgs),
    /// Changed byte ranges between two points
    #[command(after_help = "Example:\n  lifeboat point diff /srv/vault 6560a1b2 latest --json")]
    Diff(DiffArgs),
    /// Restore a volume of a point to a file or block device
    #[command(
        after_help = "Files are written sparse under a temporary name and renamed on success; block devices \
are written in place.\n\nExample:\n  lifeboat point restore /srv/vault latest --volume disk0 --to /var/lib/images/vm-restored.raw --verify"
    )]
    Restore(RestoreArgs),
    /// Ask a running `lifeboat server` to cut a point of a replicated item now
    #[command(
        after_help = "Crash-consistent by default; --app-consistent runs the item's freeze and thaw hooks on \
the agent around the cut marker (agent.toml: freeze = \"…\", thaw = \"…\").\n\nExamples:\n  \
lifeboat point cut db --api 127.0.0.1:7480 --api-token-file /srv/lifeboat/api.token\n  LIFEBOAT_API_TOKEN=… lifeboat point cut db --app-consistent --json"
    )]
    Cut(CutArgs),
}

#[derive(Args)]
pub struct CutArgs {
    /// The replicated item
    pub item: String,
    /// The server's API address
    #[arg(long, default_value = lifeboat_server::config::defaults::API, env = "LIFEBOAT_API")]
    pub api: String,
    /// The server's API token (the server directory's `api.token`);
    /// LIFEBOAT_API_TOKEN works too
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<std::path::PathBuf>,
    /// Run the item's freeze/thaw hooks on the agent around the cut
    #[arg(long)]
    pub app_consistent: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CreateArgs {
    pub vault: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// NAME=PATH of a raw image file or block device (repeatable)
    #[arg(long = "volume", value_name = "NAME=PATH", required = true)]
    pub volumes: Vec<String>,
    /// Shell command run before reading (e.g. freeze the file system); failure aborts
    #[arg(long, value_name = "CMD")]
    pub pre_hook: Option<String>,
    /// Shell command run after reading, also after a failure (e.g. thaw)
    #[arg(long, value_name = "CMD")]
    pub post_hook: Option<String>,
    /// Tag for the point (repeatable)
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Worker threads for hashing, compression and encryption
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ListArgs {
    pub vault: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    pub vault: String,
    pub point: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DiffArgs {
    pub vault: String,
    pub a: String,
    pub b: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RestoreArgs {
    pub vault: String,
    pub point: String,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// Volume name inside the point
    #[arg(long)]
    pub volume: String,
    /// Destination file (created sparse, replaced atomically) or block device
    #[arg(long)]
    pub to: PathBuf,
    /// Read the result back and compare every chunk
    #[arg(long)]
    pub verify: bool,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

fn run_hook(which: &str, cmd: &str) -> Result<()> {
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .with_context(|| format!("cannot run {which} hook"))?;
    if !st.success() {
        bail!("{which} hook `{cmd}` failed ({st})");
    }
    Ok(())
}

pub fn run(c: PointCmd) -> Result<()> {
    match c {
        PointCmd::Create(a) => create(a),
        PointCmd::Cut(a) => {
            let kind = if a.app_consistent {
                "app-consistent"
            } else {
                "crash-consistent"
            };
            let token = crate::cmd::status::api_token(a.api_token_file.as_deref())?;
            let body = crate::cmd::status::post(
                &a.api,
                &format!("/api/v1/items/{}/points?kind={kind}", a.item),
                &token,
            )?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            if a.json {
                return print_json(&v);
            }
            println!(
                "point {} ({}) of {} at seq {}: {} data, {} added, {:.2} s",
                v["id"].as_str().unwrap_or("?"),
                v["kind"].as_str().unwrap_or("?"),
                a.item,
                v["journal_seq"],
                crate::common::human(v["data_bytes"].as_u64().unwrap_or(0)),
                crate::common::human(v["added_bytes"].as_u64().unwrap_or(0)),
                v["seconds"].as_f64().unwrap_or(0.0)
            );
            Ok(())
        }
        PointCmd::List(a) => {
            let v = open_vault_config(&a.vault, &a.secret)?;
            let mut out = Vec::new();
            for (id, m) in v.load_all_manifests()? {
                match m {
                    Ok(m) => out.push(m),
                    Err(e) => eprintln!("warning: point {id}: {e}"),
                }
            }
            if a.json {
                let list: Vec<_> = out
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "id": m.id, "time": m.time, "time_rfc3339": fmt_time(m.time), "kind": m.kind,
                            "tags": m.tags, "parent": m.parent, "hostname": m.hostname,
                            "volumes": m.volumes.iter().map(|v| serde_json::json!({
                                "name": v.name, "size": v.size, "data_bytes": v.data_bytes, "source": v.source,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                return print_json(&list);
            }
            if out.is_empty() {
                println!("no recovery points in {}", v.location());
            }
            for m in &out {
                let vols: Vec<_> = m
                    .volumes
                    .iter()
                    .map(|v| format!("{}({})", v.name, human(v.size)))
                    .collect();
                println!(
                    "{}  {}  {:16}  {}  {}",
                    m.id,
                    fmt_time(m.time),
                    m.kind.to_string(),
                    vols.join(" "),
                    m.tags.join(",")
                );
            }
            Ok(())
        }
        PointCmd::Show(a) => {
            let v = open_vault_config(&a.vault, &a.secret)?;
            let id = v.resolve_point(&a.point)?;
            let m = v.load_manifest(&id)?;
            if a.json {
                return print_json(&m);
            }
            println!("point {}", m.id);
            println!("  time      {}", fmt_time(m.time));
            println!("  kind      {}", m.kind);
            println!("  host      {}", m.hostname);
            println!(
                "  parent    {}",
                m.parent
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into())
            );
            println!(
                "  tags      {}",
                if m.tags.is_empty() {
                    "-".into()
                } else {
                    m.tags.join(", ")
                }
            );
            println!("  chunks    {}", human(m.chunk_size as u64));
            for vol in &m.volumes {
                println!(
                    "  volume {}: {} nominal, {} data in {} chunks, from {}",
                    vol.name,
                    human(vol.size),
                    human(vol.data_bytes),
                    vol.data_chunks,
                    vol.source
                );
            }
            Ok(())
        }
        PointCmd::Diff(a) => {
            let v = open_vault(&a.vault, &a.secret)?;
            let (ia, ib) = (v.resolve_point(&a.a)?, v.resolve_point(&a.b)?);
            let (ma, mb) = (v.load_manifest(&ia)?, v.load_manifest(&ib)?);
            let mut diffs = Vec::new();
            let mut names: Vec<String> = ma
                .volumes
                .iter()
                .chain(mb.volumes.iter())
                .map(|x| x.name.to_string())
                .collect();
            names.sort();
            names.dedup();
            for n in names {
                let (va, vb) = (ma.volume(&n), mb.volume(&n));
                let d = match (va, vb) {
                    (Some(x), Some(y)) => {
                        let changed = diff_indexes(
                            &v.load_fixed_index(&ia, x)?,
                            &v.load_fixed_index(&ib, y)?,
                        );
                        let changed_bytes = changed.iter().map(|r| r.end - r.start).sum();
                        VolumeDiff {
                            volume: n,
                            status: if changed.is_empty() {
                                "same"
                            } else {
                                "changed"
                            }
                            .into(),
                            size_a: Some(x.size),
                            size_b: Some(y.size),
                            changed,
                            changed_bytes,
                        }
                    }
                    (Some(x), None) => VolumeDiff {
                        volume: n,
                        status: "removed".into(),
                        size_a: Some(x.size),
                        size_b: None,
                        changed: vec![],
                        changed_bytes: x.size,
                    },
                    (None, Some(y)) => VolumeDiff {
                        volume: n,
                        status: "added".into(),
                        size_a: None,
                        size_b: Some(y.size),
                        changed: std::iter::once(0..y.size).collect(),
                        changed_bytes: y.size,
                    },
                    (None, None) => unreachable!(),
                };
                diffs.push(d);
            }
            if a.json {
                return print_json(&serde_json::json!({"a": ia, "b": ib, "volumes": diffs}));
            }
            println!("diff {ia} -> {ib}");
            for d in &diffs {
                println!(
                    "volume {}: {} ({} in {} ranges)",
                    d.volume,
                    d.status,
                    human(d.changed_bytes),
                    d.changed.len()
                );
                for r in d.changed.iter().take(20) {
                    println!("  {}..{} ({})", r.start, r.end, human(r.end - r.start));
                }
                if d.changed.len() > 20 {
                    println!(
                        "  … {} more ranges (use --json for all)",
                        d.changed.len() - 20
                    );
                }
            }
            Ok(())
        }
        PointCmd::Restore(a) => {
            let v = open_vault(&a.vault, &a.secret)?;
            let id = v.resolve_point(&a.point)?;
            let bar = Bar::new("restore", a.json);
            let t = Instant::now();
            let opts = RestoreOptions {
                verify: a.verify,
                threads: a.threads.unwrap_or_else(lifeboat_capture::default_threads),
            };
            let r = restore_volume(&v, &id, &a.volume, &a.to, &opts, &bar)?;
            bar.finish();
            if a.json {
                return print_json(&r);
            }
            println!(
                "restored volume {} of point {} to {} ({} nominal, {} data) in {:.2}s{}",
                r.volume,
                r.point,
                r.to,
                human(r.size),
                human(r.data_bytes_written),
                t.elapsed().as_secs_f64(),
                if r.verified { ", verified" } else { "" }
            );
            Ok(())
        }
    }
}

fn create(a: CreateArgs) -> Result<()> {
    let specs: Vec<VolumeSpec> = a
        .volumes
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let v = open_vault(&a.vault, &a.secret)?;
    let mut opts = CreateOptions {
        tags: a.tags,
        ..Default::default()
    };
    if let Some(t) = a.threads {
        opts.threads = t.max(1);
    }
    if let Some(h) = &a.pre_hook {
        if let Err(e) = run_hook("pre", h) {
            // Undo whatever the pre hook did before it failed (e.g. a freeze
            // of some of several file systems).
            if let Some(post) = &a.post_hook {
                let _ = run_hook("post", post);
            }
            return Err(e.context("no point was taken"));
        }
        opts.kind = PointKind::AppConsistent;
    }
    let bar = Bar::new("scan", a.json);
    let t = Instant::now();
    let res = create_point(&v, &specs, &opts, &bar);
    bar.finish();
    let post = a.post_hook.as_deref().map(|h| run_hook("post", h));
    let r = res?;
    if let Some(Err(e)) = post {
        eprintln!("warning: the point was taken, but {e:#}");
    }
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        return print_json(&serde_json::json!({"point": r, "seconds": secs}));
    }
    println!(
        "created point {} ({}) of {} volume(s): {} data of {} nominal read in {:.2}s, {} new chunks, {} stored",
        r.id,
        r.kind,
        r.volumes.len(),
        human(r.data_bytes),
        human(r.nominal_bytes),
        secs,
        r.stored.new_chunks,
        human(r.stored.new_stored_bytes)
    );
    Ok(())
}
