//! `server.toml`: typed, with defaults; `lifeboat server config show`
//! prints the effective config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub mod defaults {
    pub const LISTEN: &str = "0.0.0.0:7443";
    pub const API: &str = "127.0.0.1:7480";
    pub const POINT_INTERVAL: &str = "60s";
    pub const TOKEN_TTL: &str = "24h";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Name of this (recovery) site.
    pub site: String,
    /// Where agents connect (mutual TLS).
    pub listen: String,
    /// The REST API (plain HTTP; keep it on loopback or behind a proxy).
    pub api: String,
    /// Who may read the REST API: "open" (whoever reaches its address) or
    /// "token" (reads need the API token too, as calls that change state
    /// always do).
    pub api_reads: String,
    /// Directory of the hot replicas (default: `<server dir>/replicas`).
    pub replicas: Option<PathBuf>,
    /// Vault that receives recovery points (path or URL); none: no points.
    pub vault: Option<String>,
    /// Passphrase file of the vault (else LIFEBOAT_PASSWORD).
    pub password_file: Option<PathBuf>,
    /// Key file of the vault.
    pub key_file: Option<PathBuf>,
    /// How long an enrollment token stays valid.
    pub token_ttl: String,
    pub points: PointsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PointsConfig {
    /// A crash-consistent point of each item this often (when it changed).
    pub interval: String,
    pub keep_last: usize,
    pub keep_hourly: usize,
    pub keep_daily: usize,
    pub keep_weekly: usize,
}

impl Default for PointsConfig {
    fn default() -> Self {
        PointsConfig {
            interval: defaults::POINT_INTERVAL.into(),
            keep_last: 48,
            keep_hourly: 24,
            keep_daily: 7,
            keep_weekly: 4,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            site: "recovery".into(),
            listen: defaults::LISTEN.into(),
            api: defaults::API.into(),
            api_reads: "open".into(),
            replicas: None,
            vault: None,
            password_file: None,
            key_file: None,
            token_ttl: defaults::TOKEN_TTL.into(),
            points: PointsConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Read `<dir>/server.toml`.
    ///
    /// # Errors
    /// A missing file (run `lifeboat server init`), bad TOML or bad values.
    pub fn load(dir: &Path) -> Result<ServerConfig> {
        let p = dir.join("server.toml");
        let s = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "cannot read {} (make a server directory with `lifeboat server init {}`)",
                p.display(),
                dir.display()
            )
        })?;
        let c: ServerConfig =
            toml::from_str(&s).with_context(|| format!("{} is not a valid config", p.display()))?;
        c.point_interval()?;
        c.token_ttl()?;
        if !matches!(c.api_reads.as_str(), "open" | "token") {
            bail!(
                "{}: api_reads = {:?}: say \"open\" or \"token\"",
                p.display(),
                c.api_reads
            );
        }
        Ok(c)
    }

    /// # Errors
    /// A bad duration.
    pub fn point_interval(&self) -> Result<Duration> {
        lifeboat_replicate::throttle::parse_duration(&self.points.interval)
            .context("points.interval")
    }

    /// # Errors
    /// A bad duration.
    pub fn token_ttl(&self) -> Result<Duration> {
        lifeboat_replicate::throttle::parse_duration(&self.token_ttl).context("token_ttl")
    }

    pub fn replica_dir(&self, dir: &Path) -> PathBuf {
        self.replicas
            .clone()
            .unwrap_or_else(|| dir.join("replicas"))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}
