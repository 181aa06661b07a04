//! `lifeboat server`: the recovery site (see lifeboat-server).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use lifeboat_server::ServerConfig;

use crate::common::{print_json, SecretArgs};

#[derive(Subcommand)]
pub enum ServerCmd {
    /// Make a server directory: config, private CA, server certificate, state database
    #[command(
        after_help = "Example:\n  lifeboat server init /srv/lifeboat --vault /srv/vault --site dr1\n  \
LIFEBOAT_PASSWORD=s3cret lifeboat server run /srv/lifeboat"
    )]
    Init(InitArgs),
    /// Run the server: accept agents, keep hot replicas, cut recovery points, serve the API
    #[command(
        after_help = "Serves until interrupted. The vault secret comes from LIFEBOAT_PASSWORD, \
--password-file/--key-file, or password_file/key_file in server.toml.\n\nExample:\n  \
LIFEBOAT_PASSWORD=s3cret lifeboat server run /srv/lifeboat"
    )]
    Run(RunArgs),
    /// Show the effective configuration
    #[command(
        subcommand,
        after_help = "Example:\n  lifeboat server config show /srv/lifeboat"
    )]
    Config(ConfigCmd),
    /// Enrollment tokens for agents
    #[command(
        subcommand,
        after_help = "Example:\n  lifeboat server token create /srv/lifeboat --site primary > token"
    )]
    Token(TokenCmd),
    /// Enrolled agents: list, revoke
    #[command(
        subcommand,
        after_help = "Example:\n  lifeboat server agent list /srv/lifeboat\n  lifeboat server agent revoke /srv/lifeboat web01"
    )]
    Agent(AgentAdminCmd),
}

#[derive(Args)]
pub struct InitArgs {
    /// Server directory to create
    pub dir: PathBuf,
    /// Name of this site
    #[arg(long, default_value = "recovery")]
    pub site: String,
    /// Where agents connect
    #[arg(long, default_value = lifeboat_server::config::defaults::LISTEN)]
    pub listen: String,
    /// Where the REST API listens
    #[arg(long, default_value = lifeboat_server::config::defaults::API)]
    pub api: String,
    /// Vault for recovery points (path or URL; made with `lifeboat vault init`)
    #[arg(long)]
    pub vault: Option<String>,
    /// Cut a crash-consistent point of each item this often
    #[arg(long, default_value = lifeboat_server::config::defaults::POINT_INTERVAL)]
    pub point_interval: String,
}

#[derive(Args)]
pub struct RunArgs {
    /// Server directory
    pub dir: PathBuf,
    #[command(flatten)]
    pub secret: SecretArgs,
}

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration (TOML, or --json)
    #[command(after_help = "Example:\n  lifeboat server config show /srv/lifeboat")]
    Show {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Issue a one-time enrollment token for an agent of site NAME
    #[command(
        after_help = "The token is printed on stdout; hand it to the agent over a safe channel (it works once, for token_ttl).\n\n\
Example:\n  lifeboat server token create /srv/lifeboat --site primary > token\n  \
lifeboat agent enroll --server dr1:7443 --token-file token --state-dir /var/lib/lifeboat/agent"
    )]
    Create {
        dir: PathBuf,
        #[arg(long)]
        site: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AgentAdminCmd {
    /// List enrolled agents
    #[command(after_help = "Example:\n  lifeboat server agent list /srv/lifeboat --json")]
    List {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent (by id or name): its streams are closed and refused from now on
    #[command(after_help = "Example:\n  lifeboat server agent revoke /srv/lifeboat web01")]
    Revoke { dir: PathBuf, agent: String },
}

pub fn run(c: ServerCmd) -> Result<()> {
    match c {
        ServerCmd::Init(a) => {
            let mut cfg = ServerConfig {
                site: a.site,
                listen: a.listen,
                api: a.api,
                vault: a.vault,
                ..Default::default()
            };
            cfg.points.interval = a.point_interval;
            cfg.point_interval()?;
            lifeboat_server::init(&a.dir, &cfg)?;
            println!(
                "server directory {} ready (site {}); start it with `lifeboat server run {}`",
                a.dir.display(),
                cfg.site,
                a.dir.display()
            );
            Ok(())
        }
        ServerCmd::Run(a) => {
            let cfg = ServerConfig::load(&a.dir)?;
            // --password-file/--key-file, else server.toml's, else LIFEBOAT_PASSWORD
            let args = if a.secret.password_file.is_some() || a.secret.key_file.is_some() {
                a.secret.clone()
            } else {
                SecretArgs {
                    password_file: cfg.password_file.clone(),
                    key_file: cfg.key_file.clone(),
                }
            };
            let secret = match &cfg.vault {
                Some(_) => Some(args.secret()?),
                None => None,
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let dir = a.dir.clone();
                let h = tokio::spawn(lifeboat_server::run(dir, secret, tx, async {
                    let _ = tokio::signal::ctrl_c().await;
                }));
                if let Ok(b) = rx.await {
                    eprintln!(
                        "lifeboat server: agents on {}, API on http://{}",
                        b.listen, b.api
                    );
                }
                h.await?
            })
        }
        ServerCmd::Config(ConfigCmd::Show { dir, json }) => {
            let cfg = ServerConfig::load(&dir)?;
            if json {
                print_json(&cfg)
            } else {
                print!("{}", cfg.to_toml());
                Ok(())
            }
        }
        ServerCmd::Token(TokenCmd::Create { dir, site, json }) => {
            let (t, exp) = lifeboat_server::create_token(&dir, &site)?;
            if json {
                print_json(
                    &serde_json::json!({"token": t.to_string(), "site": site, "expires": exp}),
                )
            } else {
                println!("{t}");
                Ok(())
            }
        }
        ServerCmd::Agent(AgentAdminCmd::List { dir, json }) => {
            let agents = lifeboat_server::open_db(&dir)?.agents()?;
            if json {
                return print_json(&agents);
            }
            println!(
                "{:<20} {:<16} {:<12} {:<10} fingerprint",
                "id", "name", "site", "state"
            );
            for a in agents {
                println!(
                    "{:<20} {:<16} {:<12} {:<10} {}",
                    a.id,
                    a.name,
                    a.site,
                    if a.revoked.is_some() {
                        "revoked"
                    } else {
                        "enrolled"
                    },
                    &a.fingerprint[..16]
                );
            }
            Ok(())
        }
        ServerCmd::Agent(AgentAdminCmd::Revoke { dir, agent }) => {
            let n = lifeboat_server::open_db(&dir)?.revoke(&agent)?;
            if n == 0 {
                anyhow::bail!("no enrolled, unrevoked agent with id or name {agent:?}");
            }
            println!("revoked {agent}");
            Ok(())
        }
    }
}
