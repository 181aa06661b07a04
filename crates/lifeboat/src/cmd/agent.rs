//! `lifeboat agent`, `lifeboat protect`, `lifeboat unprotect`: the primary site.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lifeboat_replicate::agent::{self, AgentConfig, ItemConfig, VolumeConfig};

use crate::common::print_json;

#[derive(Subcommand)]
pub enum AgentCmd {
    /// Obtain this agent's certificate from the server with a one-time token
    #[command(
        after_help = "The token comes from LIFEBOAT_ENROLL_TOKEN or --token-file (never the command line).\n\n\
Example:\n  lifeboat agent enroll --server dr1:7443 --token-file token --state-dir /var/lib/lifeboat/agent --name web01"
    )]
    Enroll(EnrollArgs),
    /// Run the agent: serve protected volumes (NBD) and replicate their writes
    #[command(
        after_help = "Serves until interrupted; `lifeboat protect`/`unprotect` change what it protects while it runs.\n\n\
Example:\n  lifeboat agent run --config /etc/lifeboat/agent.toml"
    )]
    Run {
        #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
        config: PathBuf,
    },
    /// Show the agent's configuration
    #[command(
        subcommand,
        after_help = "Example:\n  lifeboat agent config show --config /etc/lifeboat/agent.toml"
    )]
    Config(ConfigCmd),
}

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration (TOML, or --json)
    #[command(
        after_help = "Example:\n  lifeboat agent config show --config /etc/lifeboat/agent.toml"
    )]
    Show {
        #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct EnrollArgs {
    /// The server's agent address, HOST:PORT
    #[arg(long)]
    pub server: String,
    /// File holding the token (`-` for stdin)
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Where credentials and journals live
    #[arg(long, default_value = agent::defaults::STATE_DIR)]
    pub state_dir: PathBuf,
    /// This agent's name
    #[arg(long)]
    pub name: Option<String>,
    /// Write a starting agent config here (if it does not exist)
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Args)]
pub struct ProtectArgs {
    /// Item (application or server) the volume belongs to
    pub item: String,
    /// NAME=PATH of the volume (raw image or block device)
    #[arg(long)]
    pub volume: String,
    /// Serve it to the workload on this Unix socket (NBD)
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// Serve it to the workload on this TCP address (NBD)
    #[arg(long)]
    pub nbd_listen: Option<String>,
    /// Mount a FUSE single-file export of it in this directory (loop-mount DIR/NAME)
    #[arg(long, value_name = "DIR")]
    pub fuse_mount: Option<PathBuf>,
    /// Scan mode instead of the splitter: compare the volume by hash this
    /// often (e.g. 5m) and ship changed chunks; serves nothing
    #[arg(long, value_name = "INTERVAL", conflicts_with_all = ["nbd_socket", "nbd_listen", "fuse_mount"])]
    pub scan_every: Option<String>,
    /// Item hook run before an app-consistent cut (e.g. 'fsfreeze -f /srv/db')
    #[arg(long, value_name = "CMD")]
    pub freeze: Option<String>,
    /// Item hook run after it (e.g. 'fsfreeze -u /srv/db')
    #[arg(long, value_name = "CMD")]
    pub thaw: Option<String>,
    #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
    pub config: PathBuf,
}

#[derive(Args)]
pub struct UnprotectArgs {
    /// Item to stop protecting
    pub item: String,
    /// Only this volume of the item
    #[arg(long)]
    pub volume: Option<String>,
    #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
    pub config: PathBuf,
}

pub fn run(c: AgentCmd) -> Result<()> {
    match c {
        AgentCmd::Enroll(a) => {
            let token = match (&a.token_file, std::env::var("LIFEBOAT_ENROLL_TOKEN")) {
                (Some(p), _) if p.as_os_str() == "-" => {
                    let mut s = String::new();
                    std::io::stdin().read_line(&mut s)?;
                    s
                }
                (Some(p), _) => std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
                (None, Ok(t)) if !t.is_empty() => t,
                _ => bail!("no token: set LIFEBOAT_ENROLL_TOKEN or pass --token-file (make one with `lifeboat server token create`)"),
            };
            let name = a
                .name
                .clone()
                .unwrap_or_else(|| AgentConfig::default().name);
            let rt = tokio::runtime::Runtime::new()?;
            let id = rt.block_on(agent::enroll(&a.server, token.trim(), &name, &a.state_dir))?;
            println!(
                "enrolled as {id} with {}; credentials in {}",
                a.server,
                a.state_dir.join("tls").display()
            );
            if let Some(p) = &a.config {
                if !p.exists() {
                    let cfg = AgentConfig {
                        name,
                        server: a.server.clone(),
                        state_dir: a.state_dir.clone(),
                        ..Default::default()
                    };
                    cfg.save(p)?;
                    println!("wrote {}", p.display());
                }
            }
            Ok(())
        }
        AgentCmd::Run { config } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(agent::run(config, async {
                let _ = tokio::signal::ctrl_c().await;
            }))
        }
        AgentCmd::Config(ConfigCmd::Show { config, json }) => {
            let cfg = AgentConfig::load(&config)?;
            if json {
                print_json(&cfg)
            } else {
                print!("{}", cfg.to_toml());
                Ok(())
            }
        }
    }
}

pub fn protect(a: ProtectArgs) -> Result<()> {
    let mut cfg = AgentConfig::load(&a.config)?;
    let (name, path) = a
        .volume
        .split_once('=')
        .context("--volume: expected NAME=PATH, e.g. disk0=/srv/db.img")?;
    let v = VolumeConfig {
        name: name.to_string(),
        path: PathBuf::from(path),
        mode: if a.scan_every.is_some() {
            "scan"
        } else {
            "splitter"
        }
        .into(),
        interval: a.scan_every.clone(),
        nbd_socket: a.nbd_socket,
        nbd_listen: a.nbd_listen,
        fuse_mount: a.fuse_mount,
    };
    match cfg.items.iter_mut().find(|i| i.name == a.item) {
        Some(i) => {
            if i.volumes.iter().any(|x| x.name == v.name) {
                bail!("{}/{} is already protected", a.item, v.name);
            }
            i.volumes.push(v);
            if a.freeze.is_some() {
                i.freeze = a.freeze.clone();
            }
            if a.thaw.is_some() {
                i.thaw = a.thaw.clone();
            }
        }
        None => cfg.items.push(ItemConfig {
            name: a.item.clone(),
            freeze: a.freeze.clone(),
            thaw: a.thaw.clone(),
            paused: false,
            volumes: vec![v],
        }),
    }
    cfg.validate()?;
    cfg.save(&a.config)?;
    println!(
        "protected {}/{name} (a running agent picks it up within 2 s)",
        a.item
    );
    Ok(())
}

#[derive(Args)]
pub struct PauseArgs {
    /// Item whose replication to pause or resume
    pub item: String,
    #[arg(long, default_value = "/etc/lifeboat/agent.toml")]
    pub config: PathBuf,
}

/// `lifeboat pause` / `lifeboat resume`.
pub fn pause(a: PauseArgs, paused: bool) -> Result<()> {
    let mut cfg = AgentConfig::load(&a.config)?;
    let Some(i) = cfg.items.iter_mut().find(|i| i.name == a.item) else {
        bail!("{} is not protected by this agent", a.item);
    };
    i.paused = paused;
    cfg.save(&a.config)?;
    println!(
        "{} {} (a running agent picks it up within 2 s){}",
        a.item,
        if paused { "paused" } else { "resumed" },
        if paused {
            "; writes stay journaled and are shipped on resume"
        } else {
            ""
        }
    );
    Ok(())
}

pub fn unprotect(a: UnprotectArgs) -> Result<()> {
    let mut cfg = AgentConfig::load(&a.config)?;
    let before: usize = cfg.items.iter().map(|i| i.volumes.len()).sum();
    for i in cfg.items.iter_mut().filter(|i| i.name == a.item) {
        i.volumes
            .retain(|v| a.volume.as_ref().is_some_and(|n| &v.name != n));
    }
    cfg.items.retain(|i| !i.volumes.is_empty());
    let after: usize = cfg.items.iter().map(|i| i.volumes.len()).sum();
    if before == after {
        bail!("{} is not protected by this agent", a.item);
    }
    cfg.save(&a.config)?;
    println!(
        "unprotected {} ({} volume(s)); the recovery site keeps its replica and points",
        a.item,
        before - after
    );
    Ok(())
}
