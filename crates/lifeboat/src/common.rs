//! Shared CLI pieces: the vault secret, progress bars, output.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lifeboat_capture::scan::Progress;
use lifeboat_store::{Secret, Vault};

/// How to unlock a vault. The password is never taken from argv.
#[derive(Args, Debug, Clone, Default)]
pub struct SecretArgs {
    /// File whose first line is the vault password (default: $LIFEBOAT_PASSWORD)
    #[arg(long, value_name = "FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Key file that unlocks the vault instead of a password (32+ random bytes)
    #[arg(
        long,
        value_name = "FILE",
        global = true,
        conflicts_with = "password_file"
    )]
    pub key_file: Option<PathBuf>,
}

impl SecretArgs {
    pub fn secret(&self) -> Result<Secret> {
        if let Some(k) = &self.key_file {
            let c = std::fs::read(k)
                .with_context(|| format!("cannot read key file {}", k.display()))?;
            if c.trim_ascii().len() < 16 {
                bail!("key file {} is too short: use at least 32 random bytes (e.g. `head -c 32 /dev/urandom | base64 > key`)", k.display());
            }
            return Ok(Secret::KeyFile(c));
        }
        if let Some(p) = &self.password_file {
            let c = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read password file {}", p.display()))?;
            let line = c.lines().next().unwrap_or("").to_string();
            if line.is_empty() {
                bail!("password file {} is empty", p.display());
            }
            return Ok(Secret::Password(line.into_bytes()));
        }
        match std::env::var("LIFEBOAT_PASSWORD") {
            Ok(p) if !p.is_empty() => Ok(Secret::Password(p.into_bytes())),
            _ => bail!("no vault secret: set LIFEBOAT_PASSWORD, or pass --password-file FILE or --key-file FILE"),
        }
    }
}

pub fn open_vault(location: &str, secret: &SecretArgs) -> Result<Arc<Vault>> {
    let backend = lifeboat_store::open_backend(location)?;
    Ok(Arc::new(Vault::open(backend, &secret.secret()?)?))
}

pub fn open_vault_config(location: &str, secret: &SecretArgs) -> Result<Arc<Vault>> {
    let backend = lifeboat_store::open_backend(location)?;
    Ok(Arc::new(Vault::open_config(backend, &secret.secret()?)?))
}

/// An indicatif bar over data bytes, on stderr when it is a terminal.
pub struct Bar {
    bar: ProgressBar,
    label: String,
}

impl Bar {
    pub fn new(label: &str, quiet: bool) -> Self {
        let bar = if quiet || !std::io::stderr().is_terminal() {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        Bar {
            bar,
            label: label.into(),
        }
    }
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn start(&self, total: u64, nominal: u64) {
        self.bar.set_length(total);
        self.bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{spinner}} {} [{{bar:30}}] {{bytes}}/{{total_bytes}} of data ({} nominal) {{binary_bytes_per_sec}} ETA {{eta}}",
                self.label,
                indicatif::BinaryBytes(nominal)
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }
}

pub fn human(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

pub fn fmt_time(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
