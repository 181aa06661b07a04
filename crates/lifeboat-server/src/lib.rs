//! `lifeboat server`: the recovery site.
//!
//! Owns a server directory:
//! ```text
//! server.toml        config (ServerConfig)
//! state.db           control-plane state (SQLite, see db.rs)
//! tls/               ca.crt, ca.key, server.crt, server.key (keys mode 0600)
//! replicas/ITEM/VOLUME.img   hot replicas (sparse raw images)
//! ```
//! It accepts agents over mutual TLS (enrollment without a certificate,
//! replication only with a valid, unrevoked one), applies their streams to
//! hot replicas, cuts crash-consistent recovery points of each item into
//! the vault on a schedule (or on request) with retention, and serves a REST
//! API under `/api/v1`.

pub mod api;
pub mod config;
mod conn;
pub mod db;
pub mod points;
pub mod replica;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use lifeboat_replicate::tls::{self, Ca};
use lifeboat_store::{Secret, Vault};

pub use config::ServerConfig;
use db::Db;
use replica::Replica;

const CA_CERT: &str = "tls/ca.crt";
const CA_KEY: &str = "tls/ca.key";
const SERVER_CERT: &str = "tls/server.crt";
const SERVER_KEY: &str = "tls/server.key";
/// The API's bearer token for calls that change state (mode 0600).
pub const API_TOKEN: &str = "api.token";

/// The API token of a server directory, made on first use.
///
/// # Errors
/// I/O errors, or a token file that is not a token.
pub fn api_token(dir: &Path) -> Result<String> {
    let p = dir.join(API_TOKEN);
    if !p.exists() {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("random: {e}"))?;
        let t: String = b.iter().map(|x| format!("{x:02x}")).collect();
        write_private(&p, format!("lbapi1.{t}\n").as_bytes())?;
    }
    let t = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let t = t.trim();
    if !t.starts_with("lbapi1.") {
        anyhow::bail!("{} does not hold an API token (lbapi1.…)", p.display());
    }
    Ok(t.to_string())
}

fn ca_name(site: &str) -> String {
    format!("Lifeboat CA ({site})")
}

fn write_private(p: &Path, b: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .with_context(|| format!("cannot create {}", p.display()))?;
    std::io::Write::write_all(&mut f, b)?;
    f.sync_all()?;
    Ok(())
}

/// Make a server directory: config, CA, server certificate, state database.
///
/// # Errors
/// A directory that already holds a server, or I/O errors.
pub fn init(dir: &Path, cfg: &ServerConfig) -> Result<()> {
    if dir.join("server.toml").exists() {
        anyhow::bail!(
            "{} already holds a Lifeboat server (server.toml exists); nothing was changed",
            dir.display()
        );
    }
    fs::create_dir_all(dir.join("tls"))?;
    let ca = Ca::create(&ca_name(&cfg.site))?;
    let (scert, skey) = ca.issue_server()?;
    fs::write(dir.join(CA_CERT), &ca.cert_der)?;
    write_private(&dir.join(CA_KEY), ca.key_pem().as_bytes())?;
    fs::write(dir.join(SERVER_CERT), &scert)?;
    write_private(&dir.join(SERVER_KEY), &skey)?;
    Db::open(&dir.join("state.db"))?;
    api_token(dir)?;
    fs::create_dir_all(cfg.replica_dir(dir))?;
    let tmp = dir.join("server.toml.partial");
    fs::write(&tmp, cfg.to_toml())?;
    fs::rename(&tmp, dir.join("server.toml"))?;
    Ok(())
}

/// The CA of a server directory.
///
/// # Errors
/// Missing or damaged files.
pub fn load_ca(dir: &Path, cfg: &ServerConfig) -> Result<Ca> {
    let cert = fs::read(dir.join(CA_CERT)).context("reading the CA certificate")?;
    let key = fs::read_to_string(dir.join(CA_KEY)).context("reading the CA key")?;
    Ca::load(&ca_name(&cfg.site), cert, &key)
}

/// Open the state database of a server directory.
///
/// # Errors
/// SQLite errors.
pub fn open_db(dir: &Path) -> Result<Db> {
    Db::open(&dir.join("state.db"))
}

/// A new enrollment token for `site`, valid for the configured TTL.
///
/// # Errors
/// Database errors.
pub fn create_token(dir: &Path, site: &str) -> Result<(tls::Token, i64)> {
    let cfg = ServerConfig::load(dir)?;
    let ca = fs::read(dir.join(CA_CERT)).context("reading the CA certificate")?;
    let t = tls::Token::new(&ca);
    let exp = open_db(dir)?.add_token(
        &tls::Token::secret_hash(&t.secret),
        site,
        cfg.token_ttl()?.as_secs() as i64,
    )?;
    Ok((t, exp))
}

/// Live state of a replicated volume.
pub struct LiveVolume {
    pub item: String,
    pub volume: String,
    pub agent: String,
    pub replica: Arc<Mutex<Replica>>,
    pub connected: bool,
    pub last_contact: Option<Instant>,
    /// What the agent last reported.
    pub report: Option<lifeboat_format::proto::Health>,
    pub error: Option<String>,
    pub bytes_received: u64,
    pub resync_chunks_compared: u64,
    pub resync_chunks_received: u64,
    pub resync_bytes_received: u64,
    /// Bytes/s received, smoothed.
    pub throughput: f64,
    pub last_bytes: u64,
    /// Requests for the agent on this stream.
    pub control: Option<tokio::sync::mpsc::UnboundedSender<lifeboat_format::proto::Frame>>,
    /// The agent's last answer to an app-consistent cut: (cut id, ok, message).
    pub quiesced: Option<(u64, bool, String)>,
}

/// Everything the server's tasks share.
pub struct State {
    pub dir: PathBuf,
    pub cfg: ServerConfig,
    pub db: Arc<Db>,
    pub ca: Ca,
    pub vault: Option<Arc<Vault>>,
    pub volumes: Mutex<HashMap<(String, String), LiveVolume>>,
    pub started: Instant,
    /// Serializes point cuts.
    pub cut_lock: tokio::sync::Mutex<()>,
    /// BLAKE3 of the API token (compared in constant time).
    pub api_token: blake3::Hash,
}

/// Addresses a running server listens on.
#[derive(Debug, Clone)]
pub struct Bound {
    pub listen: std::net::SocketAddr,
    pub api: std::net::SocketAddr,
}

/// Run the server until `shutdown` resolves. `ready` gets the bound
/// addresses (port 0 in the config picks free ports).
///
/// # Errors
/// A bad server directory, an unusable vault, or addresses in use.
pub async fn run(
    dir: PathBuf,
    secret: Option<Secret>,
    ready: tokio::sync::oneshot::Sender<Bound>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("server directory {}", dir.display()))?;
    let cfg = ServerConfig::load(&dir)?;
    let db = Arc::new(open_db(&dir)?);
    let ca = load_ca(&dir, &cfg)?;
    let scert = fs::read(dir.join(SERVER_CERT))?;
    let skey = fs::read(dir.join(SERVER_KEY))?;
    let tls_cfg = tls::server_config(&ca.cert_der, &scert, &skey)?;
    let vault = match &cfg.vault {
        Some(loc) => {
            let secret = secret.context(
                "the vault needs a secret: set LIFEBOAT_PASSWORD or password_file/key_file in server.toml",
            )?;
            let loc2 = loc.clone();
            let v = tokio::task::spawn_blocking(move || -> Result<Vault> {
                let b = lifeboat_store::backend::open(&loc2)?;
                Ok(Vault::open(b, &secret)?)
            })
            .await?
            .with_context(|| format!("cannot open the vault {loc}"))?;
            Some(Arc::new(v))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let api_listener = tokio::net::TcpListener::bind(&cfg.api)
        .await
        .with_context(|| format!("cannot serve the API on {}", cfg.api))?;
    let bound = Bound {
        listen: listener.local_addr()?,
        api: api_listener.local_addr()?,
    };
    let state = Arc::new(State {
        dir: dir.clone(),
        cfg,
        db,
        ca,
        vault,
        volumes: Mutex::new(HashMap::new()),
        started: Instant::now(),
        cut_lock: tokio::sync::Mutex::new(()),
        api_token: blake3::hash(api_token(&dir)?.as_bytes()),
    });
    tracing::info!(
        "lifeboat server: agents on {}, API on http://{}",
        bound.listen,
        bound.api
    );
    let _ = ready.send(bound);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_cfg);
    let st = state.clone();
    let accept = async move {
        loop {
            match listener.accept().await {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    let st = st.clone();
                    let acc = acceptor.clone();
                    tokio::spawn(async move {
                        if let Err(e) = conn::handle(s, acc, st).await {
                            tracing::warn!("connection from {peer}: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    };
    let api = axum::serve(api_listener, api::router(state.clone()));
    let sched = points::scheduler(state.clone());
    tokio::select! {
        _ = accept => {}
        r = api => r.context("API server")?,
        _ = sched => {}
        _ = shutdown => {}
    }
    Ok(())
}
