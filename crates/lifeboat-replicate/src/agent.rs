//! `lifeboat agent`: the primary site's side.
//!
//! Reads `agent.toml` (protected items and their volumes), enrolls with a
//! server once (credentials in `<state_dir>/tls/`), then for every volume in
//! `splitter` mode serves it over NBD with a journal and a dirty map
//! (`<state_dir>/journals/ITEM/VOLUME/`) and ships the journal to the
//! server. `lifeboat protect`/`unprotect` edit the config; a running agent
//! picks the change up within two seconds.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lifeboat_capture::dirtymap::DirtyMap;
use lifeboat_capture::extents::volume_size;
use lifeboat_capture::journal::{Journal, MemoryBudget};
use lifeboat_capture::nbd::{serve_listener, Export};
use lifeboat_format::proto::{Frame, PROTO_VERSION};
// (Frame is also used for app-consistent cut answers)
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::framed::{read_frame, write_frame};
use crate::shipper::{ship_forever, ShipOptions, ShipStatus, Source};
use crate::throttle::parse_size;
use crate::tls;

/// Chunk size of the dirty map and of resync compares.
pub const CHUNK_SIZE: u32 = 64 << 10;

pub mod defaults {
    pub const JOURNAL_MAX: &str = "8GiB";
    pub const JOURNAL_MEMORY: &str = "1GiB";
    pub const STATE_DIR: &str = "/var/lib/lifeboat/agent";
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's name (shown on the server).
    pub name: String,
    /// The server's agent address, HOST:PORT.
    pub server: String,
    /// Credentials and journals.
    pub state_dir: PathBuf,
    /// Limit on the wire, e.g. "80mbit" or "20MiB" (per second).
    pub bandwidth: Option<String>,
    /// Other limits at certain times of day (local time), e.g.
    /// `[{ from = "08:00", to = "18:00", rate = "20mbit" }]`.
    pub bandwidth_windows: Vec<crate::throttle::Window>,
    /// Outage buffer per volume; beyond it the dirty map takes over.
    pub journal_max: String,
    /// The newest records of the volumes' journals are kept in memory, up
    /// to this much for all of them together (a volume far behind may use
    /// all of it), and written to disk only when replication falls behind
    /// further (or at a clean stop); "0" writes every record to disk. A
    /// crash of the agent loses the memory part: the dirty map then bounds
    /// the resync. Read at the agent's start.
    pub journal_memory: String,
    #[serde(rename = "item")]
    pub items: Vec<ItemConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ItemConfig {
    pub name: String,
    /// Run before an app-consistent cut (e.g. `fsfreeze -f /srv/db` or a
    /// database checkpoint); a failure aborts the cut.
    #[serde(default)]
    pub freeze: Option<String>,
    /// Run after the cut marker is written, whatever happened (e.g.
    /// `fsfreeze -u /srv/db`).
    #[serde(default)]
    pub thaw: Option<String>,
    /// Replication paused (`lifeboat pause`): the volumes stay served and
    /// journaled, nothing ships until `lifeboat resume`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    #[serde(rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    /// Raw image or block device.
    pub path: PathBuf,
    /// `splitter` (every write through the agent's NBD or FUSE export,
    /// RPO seconds) or `scan` (the volume is compared by hash on a schedule
    /// and only changed chunks travel, RPO minutes; works on anything).
    #[serde(default = "default_mode")]
    pub mode: String,
    /// `scan` mode: how often (e.g. "5m").
    #[serde(default)]
    pub interval: Option<String>,
    /// Unix socket of the NBD export.
    pub nbd_socket: Option<PathBuf>,
    /// TCP address of the NBD export.
    pub nbd_listen: Option<String>,
    /// Directory where a FUSE single-file export of the volume is mounted
    /// (`<dir>/<volume name>`; loop-mount that file for a local file system).
    #[serde(default)]
    pub fuse_mount: Option<PathBuf>,
}

fn default_mode() -> String {
    "splitter".into()
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: hostname(),
            server: "127.0.0.1:7443".into(),
            state_dir: PathBuf::from(defaults::STATE_DIR),
            bandwidth: None,
            bandwidth_windows: vec![],
            journal_max: defaults::JOURNAL_MAX.into(),
            journal_memory: defaults::JOURNAL_MEMORY.into(),
            items: vec![],
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "agent".into())
}

impl AgentConfig {
    /// # Errors
    /// A missing or invalid file.
    pub fn load(p: &Path) -> Result<AgentConfig> {
        let s = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the agent config {}", p.display()))?;
        let c: AgentConfig = toml::from_str(&s)
            .with_context(|| format!("{} is not a valid agent config", p.display()))?;
        c.validate()?;
        Ok(c)
    }

    /// # Errors
    /// Bad sizes, rates, modes or duplicate names.
    pub fn validate(&self) -> Result<()> {
        parse_size(&self.journal_max).context("journal_max")?;
        parse_size(&self.journal_memory).context("journal_memory")?;
        crate::throttle::Schedule::parse(self.bandwidth.as_deref(), &self.bandwidth_windows)
            .context("bandwidth")?;
        let mut seen = std::collections::HashSet::new();
        for i in &self.items {
            for v in &i.volumes {
                if !seen.insert((i.name.clone(), v.name.clone())) {
                    bail!("volume {}/{} is listed twice", i.name, v.name);
                }
                match v.mode.as_str() {
                    "splitter" => {}
                    "scan" => {
                        let iv = v.interval.as_deref().with_context(|| {
                            format!(
                                "volume {}/{}: scan mode needs interval = \"5m\" (or similar)",
                                i.name, v.name
                            )
                        })?;
                        crate::throttle::parse_duration(iv)
                            .with_context(|| format!("volume {}/{}: interval", i.name, v.name))?;
                        if v.nbd_socket.is_some()
                            || v.nbd_listen.is_some()
                            || v.fuse_mount.is_some()
                        {
                            bail!("volume {}/{}: scan mode serves nothing (drop nbd_socket/nbd_listen/fuse_mount, or use splitter)", i.name, v.name);
                        }
                        continue;
                    }
                    m => bail!(
                        "volume {}/{}: mode {m:?} is not supported (use \"splitter\" or \"scan\")",
                        i.name,
                        v.name
                    ),
                }
                if v.nbd_socket.is_none() && v.nbd_listen.is_none() && v.fuse_mount.is_none() {
                    bail!(
                        "volume {}/{}: give nbd_socket, nbd_listen or fuse_mount (where the workload reaches the volume)",
                        i.name,
                        v.name
                    );
                }
            }
        }
        Ok(())
    }

    /// Write atomically.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, p: &Path) -> Result<()> {
        let tmp = p.with_extension("toml.partial");
        std::fs::write(&tmp, self.to_toml())?;
        std::fs::rename(&tmp, p)?;
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

/// Credentials of an enrolled agent.
pub struct Credentials {
    pub agent_id: String,
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

fn tls_dir(state: &Path) -> PathBuf {
    state.join("tls")
}

/// Load the credentials from `state_dir`.
///
/// # Errors
/// Not enrolled yet.
pub fn credentials(state: &Path) -> Result<Credentials> {
    let d = tls_dir(state);
    let rd = |n: &str| {
        std::fs::read(d.join(n)).with_context(|| {
            format!(
                "this agent is not enrolled ({} is missing): run `lifeboat agent enroll` with a token from `lifeboat server token create`",
                d.join(n).display()
            )
        })
    };
    Ok(Credentials {
        agent_id: String::from_utf8_lossy(&rd("agent.id")?).trim().to_string(),
        ca: rd("ca.crt")?,
        cert: rd("agent.crt")?,
        key: rd("agent.key")?,
    })
}

/// Enroll with the server at `server` using `token`; stores the credentials.
///
/// # Errors
/// A bad or used token, a server that does not match the token, I/O errors.
pub async fn enroll(server: &str, token: &str, name: &str, state: &Path) -> Result<String> {
    let t: tls::Token = token.parse()?;
    let d = tls_dir(state);
    if d.join("agent.crt").exists() {
        bail!(
            "{} already holds credentials; remove it to enroll again",
            d.display()
        );
    }
    // the key pair is made here and its private half never leaves this machine
    let (key_der, public_key, proof) = tls::enrollment_key(&t.to_string())?;
    let s = crate::shipper::connect(server, tls::enroll_config(&t.ca_pin)?).await?;
    let (mut rd, mut wr) = tokio::io::split(s);
    write_frame(
        &mut wr,
        &Frame::Enroll {
            version: PROTO_VERSION,
            token: t.to_string(),
            agent: name.to_string(),
            public_key,
            proof,
        },
    )
    .await?;
    match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut rd)).await {
        Ok(Ok(Some(Frame::Enrolled {
            agent_id,
            cert_der,
            ca_der,
        }))) => {
            if tls::fingerprint(&ca_der) != t.ca_pin {
                bail!("the server sent a CA that does not match the token");
            }
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("ca.crt"), &ca_der)?;
            std::fs::write(d.join("agent.crt"), &cert_der)?;
            std::fs::write(d.join("agent.id"), &agent_id)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(d.join("agent.key"))?;
            std::io::Write::write_all(&mut f, &key_der)?;
            f.sync_all()?;
            Ok(agent_id)
        }
        Ok(Ok(Some(Frame::Error { message, .. }))) => bail!("enrollment refused: {message}"),
        Ok(Ok(Some(_))) => bail!("unexpected answer from the server"),
        Ok(Ok(None)) => bail!("the server closed the connection"),
        Ok(Err(e)) => Err(e),
        Err(_) => bail!("the server did not answer within 30 s"),
    }
}

/// A running protected volume.
struct Running {
    cfg: VolumeConfig,
    status: Arc<ShipStatus>,
    stop: watch::Sender<bool>,
    nbd_stop: Arc<AtomicBool>,
    /// The NBD listeners' threads (they end once their clients' have).
    nbd_threads: Vec<std::thread::JoinHandle<()>>,
    task: tokio::task::JoinHandle<()>,
    fuse: Option<lifeboat_capture::fuse::Mounted>,
    journal: Arc<Journal>,
    dirty: Arc<DirtyMap>,
    export: Arc<Export>,
}

fn start_volume(
    cfg: &AgentConfig,
    item: &str,
    v: &VolumeConfig,
    opts: &ShipOptions,
    budget: &Arc<MemoryBudget>,
) -> Result<Running> {
    let scan = v.mode == "scan";
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!scan)
        .open(&v.path)
        .with_context(|| format!("cannot open {}", v.path.display()))?;
    let size = volume_size(&file)?;
    let jdir = cfg.state_dir.join("journals").join(item).join(&v.name);
    let journal = Arc::new(
        Journal::open_with_budget(&jdir, budget.clone())
            .with_context(|| format!("journal in {}", jdir.display()))?,
    );
    let dirty = Arc::new(
        DirtyMap::open(&jdir.join("dirty.map"), CHUNK_SIZE, size)
            .with_context(|| format!("dirty map in {}", jdir.display()))?,
    );
    let export = Arc::new(Export::new(
        &v.name,
        file.try_clone()?,
        size,
        scan,
        Some(journal.clone()),
        Some(dirty.clone()),
    ));
    let nbd_stop = Arc::new(AtomicBool::new(false));
    let mut nbd_threads = Vec::new();
    if let Some(sock) = &v.nbd_socket {
        let _ = std::fs::remove_file(sock);
        if let Some(d) = sock.parent() {
            std::fs::create_dir_all(d)?;
        }
        let l = std::os::unix::net::UnixListener::bind(sock)
            .with_context(|| format!("cannot listen on {}", sock.display()))?;
        let (e, s) = (export.clone(), nbd_stop.clone());
        nbd_threads.push(std::thread::spawn(move || {
            serve_listener(move || l.accept().map(|(s, _)| s), e, s)
        }));
        tracing::info!(
            "{item}/{}: NBD export at nbd+unix:///{}?socket={}",
            v.name,
            v.name,
            sock.display()
        );
    }
    if let Some(addr) = &v.nbd_listen {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr}"))?;
        let (e, s) = (export.clone(), nbd_stop.clone());
        tracing::info!(
            "{item}/{}: NBD export at nbd://{}/{}",
            v.name,
            l.local_addr()?,
            v.name
        );
        nbd_threads.push(std::thread::spawn(move || {
            serve_listener(
                move || {
                    l.accept().map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        s
                    })
                },
                e,
                s,
            )
        }));
    }
    let fuse = match &v.fuse_mount {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let m = lifeboat_capture::fuse::mount(export.clone(), dir)
                .with_context(|| format!("cannot mount the FUSE export at {}", dir.display()))?;
            tracing::info!(
                "{item}/{}: FUSE export at {}",
                v.name,
                dir.join(&v.name).display()
            );
            Some(m)
        }
        None => None,
    };
    let src = Arc::new(Source {
        item: item.to_string(),
        volume: v.name.clone(),
        file: Arc::new(file),
        size,
        journal: journal.clone(),
        dirty: dirty.clone(),
    });
    let status = Arc::new(ShipStatus::default());
    let (stop, stop_rx) = watch::channel(false);
    let mut opts = opts.clone();
    if scan {
        opts.scan_interval = v
            .interval
            .as_deref()
            .map(crate::throttle::parse_duration)
            .transpose()?;
        tracing::info!(
            "{item}/{}: scan export at {} every {}",
            v.name,
            v.path.display(),
            v.interval.as_deref().unwrap_or("?")
        );
    }
    let task = tokio::spawn(ship_forever(src, opts, status.clone(), stop_rx));
    Ok(Running {
        cfg: v.clone(),
        status,
        stop,
        nbd_stop,
        nbd_threads,
        task,
        fuse,
        journal,
        dirty,
        export,
    })
}

/// Stop volumes together, off the runtime's workers: a stop waits (for
/// NBD clients to go, for the flush of the volume), and one volume's wait
/// must neither hold the others' nor stall the shipping of the rest.
async fn stop_volumes(rs: Vec<Running>) {
    let stops: Vec<_> = rs
        .into_iter()
        .map(|r| {
            let name = r.cfg.name.clone();
            (name, tokio::task::spawn_blocking(move || stop_volume(r)))
        })
        .collect();
    for (name, h) in stops {
        // (a stop that panicked leaves the journal and map not closed
        // cleanly: a restart of the volume compares their dirty groups)
        if let Err(e) = h.await {
            tracing::error!("{name}: stopping the volume failed: {e}");
        }
    }
}

fn stop_volume(r: Running) {
    // whatever happens below (a panic included), the shipper does not
    // outlive the stop
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _abort = AbortOnDrop(r.task.abort_handle());
    let _ = r.stop.send(true);
    r.nbd_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // unblock the accept loops so they see the flag
    if let Some(s) = &r.cfg.nbd_socket {
        let _ = std::os::unix::net::UnixStream::connect(s);
        let _ = std::fs::remove_file(s);
    }
    if let Some(a) = &r.cfg.nbd_listen {
        use std::net::ToSocketAddrs;
        // bounded: a filtered address must not hold the stop for minutes
        if let Some(sa) = a.to_socket_addrs().ok().and_then(|mut s| s.next()) {
            let _ = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1));
        }
    }
    // every client disconnected and its requests done (the listener waits
    // up to 10 s for them; this up to 15 s for the listener)
    let t = std::time::Instant::now();
    while r.nbd_threads.iter().any(|h| !h.is_finished())
        && t.elapsed() < std::time::Duration::from_secs(15)
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if r.nbd_threads.iter().any(|h| !h.is_finished()) {
        tracing::warn!("{}: the NBD export did not stop within 15 s", r.cfg.name);
    }
    r.task.abort();
    drop(r.fuse);
    // Bits stay set for a while after their records are acknowledged (the
    // hot set saves re-marking a busy region); at a stop every chunk the
    // recovery site holds (and that the flush makes durable here) can be
    // cleared, so a restart compares none of them.
    let acked = r.status.acked.load(std::sync::atomic::Ordering::Relaxed);
    // no write lands after the journal and map are closed
    r.export.close();
    if let Err(e) = r.export.flush() {
        tracing::warn!("{}: flush at stop: {e}", r.cfg.name);
    }
    if let Err(e) = r
        .journal
        .set_cleared(acked)
        .and_then(|_| r.dirty.clear_acked(acked))
    {
        tracing::warn!("dirty map: {e}");
    }
    if let Err(e) = r.dirty.close_clean() {
        tracing::warn!("dirty map: {e}");
    }
    if let Err(e) = r.journal.close_clean() {
        tracing::warn!("journal: {e}");
    }
}

fn hook(what: &str, cmd: &str) -> Result<()> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run the {what} hook"))?;
    let t = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                bail!("the {what} hook `{cmd}` failed ({st})");
            }
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            bail!("the {what} hook `{cmd}` took over 60 s and was killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An app-consistent cut: freeze, append the cut marker to all the item's
/// journals at once (the freeze hook makes the file system's state reach
/// the volumes before the marker), thaw (always).
fn app_cut(item: &ItemConfig, journals: &[Arc<Journal>], cut_id: u64) -> Result<String> {
    if journals.is_empty() {
        bail!("no volume of {} is being served", item.name);
    }
    if let Some(f) = &item.freeze {
        hook("freeze", f)?;
    }
    let r = (|| -> Result<()> {
        let js: Vec<&Journal> = journals.iter().map(|j| &**j).collect();
        Journal::group_cut(&js, cut_id)?;
        Ok(())
    })();
    let thawed = match &item.thaw {
        Some(t) => hook("thaw", t),
        None => Ok(()),
    };
    r?;
    thawed?;
    Ok(format!(
        "{} volume(s) cut{}",
        journals.len(),
        if item.freeze.is_some() {
            " under the freeze hook"
        } else {
            ""
        }
    ))
}

/// Run the agent with the config at `path` until `shutdown` resolves.
///
/// # Errors
/// A bad config, missing credentials, or a volume that cannot be served.
pub async fn run(path: PathBuf, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let mut cfg = AgentConfig::load(&path)?;
    let creds = credentials(&cfg.state_dir)?;
    let tls_cfg = tls::agent_config(&creds.ca, &creds.cert, &creds.key)?;
    let (control_tx, mut control_rx) =
        tokio::sync::mpsc::unbounded_channel::<crate::shipper::QuiesceRequest>();
    let opts = |cfg: &AgentConfig| -> Result<ShipOptions> {
        Ok(ShipOptions {
            server: cfg.server.clone(),
            tls: tls_cfg.clone(),
            bandwidth: crate::throttle::Schedule::parse(
                cfg.bandwidth.as_deref(),
                &cfg.bandwidth_windows,
            )?,
            journal_max: parse_size(&cfg.journal_max)?,
            batch_max: 4 << 20,
            window: 64 << 20,
            control: Some(control_tx.clone()),
            scan_interval: None,
        })
    };
    let mut running: HashMap<(String, String), Running> = HashMap::new();
    // the journals' memory tails share one budget
    let budget = MemoryBudget::new(parse_size(&cfg.journal_memory)?);
    // the shipping options of volumes started from now on (rebuilt on reload)
    let mut o = opts(&cfg)?;
    let mut mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut first = true;
    loop {
        // (re)concile the running set with the config
        let want: HashMap<(String, String), VolumeConfig> = cfg
            .items
            .iter()
            .flat_map(|i| {
                i.volumes
                    .iter()
                    .map(move |v| ((i.name.clone(), v.name.clone()), v.clone()))
            })
            .collect();
        let gone: Vec<_> = running
            .iter()
            .filter(|(k, r)| want.get(*k) != Some(&r.cfg))
            .map(|(k, _)| k.clone())
            .collect();
        let mut stopping = Vec::new();
        for k in gone {
            if let Some(r) = running.remove(&k) {
                tracing::info!("{}/{}: no longer protected", k.0, k.1);
                stopping.push(r);
            }
        }
        // (a changed volume starts again below, once its old self stopped)
        stop_volumes(stopping).await;
        for (k, v) in &want {
            if running.contains_key(k) {
                continue;
            }
            match start_volume(&cfg, &k.0, v, &o, &budget) {
                Ok(r) => {
                    running.insert(k.clone(), r);
                }
                Err(e) if first => return Err(e.context(format!("{}/{}", k.0, k.1))),
                Err(e) => tracing::error!("{}/{}: cannot protect: {e:#}", k.0, k.1),
            }
        }
        first = false;
        // pause / resume without disturbing the served volumes
        for item in &cfg.items {
            for v in &item.volumes {
                if let Some(r) = running.get(&(item.name.clone(), v.name.clone())) {
                    r.status
                        .paused
                        .store(item.paused, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        // consistency groups: the volumes of an item share a cut marker
        // every second (see Journal::group_cut)
        let cut_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1)
            .max(1);
        for item in &cfg.items {
            let js: Vec<&Journal> = item
                .volumes
                .iter()
                .filter_map(|v| running.get(&(item.name.clone(), v.name.clone())))
                .map(|r| &*r.journal)
                .collect();
            if js.len() >= 2 {
                if let Err(e) = Journal::group_cut(&js, cut_id) {
                    tracing::error!("{}: consistency-group cut: {e}", item.name);
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
            Some(q) = control_rx.recv() => {
                let item = cfg.items.iter().find(|i| i.name == q.item).cloned();
                let journals: Vec<Arc<Journal>> = item
                    .iter()
                    .flat_map(|i| i.volumes.iter())
                    .filter_map(|v| running.get(&(q.item.clone(), v.name.clone())))
                    .map(|r| r.journal.clone())
                    .collect();
                let (ok, message) = match item {
                    None => (false, format!("item {} is not protected by this agent", q.item)),
                    Some(i) => {
                        let r = tokio::task::spawn_blocking(move || app_cut(&i, &journals, q.cut_id)).await;
                        match r {
                            Ok(Ok(m)) => (true, m),
                            Ok(Err(e)) => (false, format!("{e:#}")),
                            Err(e) => (false, e.to_string()),
                        }
                    }
                };
                if ok {
                    tracing::info!("{}: app-consistent cut {}: {message}", q.item, q.cut_id);
                } else {
                    tracing::warn!("{}: app-consistent cut {} failed: {message}", q.item, q.cut_id);
                }
                q.reply.outbox.lock().unwrap().push(Frame::Quiesced { cut_id: q.cut_id, ok, message });
                continue;
            }
        }
        // config changes (protect / unprotect)
        let m = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if m != mtime {
            mtime = m;
            match AgentConfig::load(&path) {
                Ok(c) => {
                    tracing::info!("{}: config changed, reloading", path.display());
                    if c.journal_memory != cfg.journal_memory {
                        tracing::warn!(
                            "journal_memory changed to {}: it takes effect when the agent restarts",
                            c.journal_memory
                        );
                    }
                    match opts(&c) {
                        Ok(x) => {
                            o = x;
                            cfg = c;
                        }
                        Err(e) => tracing::error!("{e:#}; keeping the previous config"),
                    }
                }
                Err(e) => tracing::error!("{e:#}; keeping the previous config"),
            }
        }
    }
    stop_volumes(running.into_values().collect()).await;
    Ok(())
}
