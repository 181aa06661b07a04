//! The second half of `lifeboat demo`: a primary and a recovery site on one
//! machine (loopback, no root). A `lifeboat server` (in-process) keeps a hot
//! replica and cuts points into the demo's vault; an enrolled agent ships
//! every write of the sample volume's splitter over mutual TLS while a
//! workload writes at ~20 MB/s; the demo prints the live RPO, then checks
//! the replica and a point cut at the recovery site against the primary.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lifeboat_capture::dirtymap::DirtyMap;
use lifeboat_capture::extents::volume_size;
use lifeboat_capture::journal::Journal;
use lifeboat_capture::splitter::Export;
use lifeboat_copy::{digest, Endpoint};
use lifeboat_replicate::agent::{credentials, enroll, CHUNK_SIZE};
use lifeboat_replicate::shipper::{ship_forever, ShipOptions, ShipStatus, Source};
use lifeboat_server::api::Status;
use lifeboat_server::ServerConfig;
use lifeboat_store::{Secret, Vault};

use crate::cmd::status::{get, post};
use crate::common::human;

pub struct SitesReport {
    pub initial_sync_secs: f64,
    pub written: u64,
    pub rpo_p50_ms: u64,
    pub rpo_max_ms: u64,
    pub point: String,
}

fn status(api: &str) -> Result<lifeboat_server::api::VolumeStatus> {
    let s: Status = serde_json::from_str(&get(api, "/api/v1/status")?)?;
    s.volumes.into_iter().next().context("no volume yet")
}

/// Run the two-site part in `dir`, replicating `vol`, cutting points into
/// the vault at `vault_dir` (key file `key_hex`).
pub fn run(
    dir: &Path,
    vol: &Path,
    vault_dir: &Path,
    key_hex: &str,
    json: bool,
    say: &mut dyn FnMut(&str, Instant, String),
) -> Result<SitesReport> {
    let rt = tokio::runtime::Runtime::new()?;
    let site_dir = dir.join("recovery-site");
    let cfg = ServerConfig {
        site: "recovery".into(),
        listen: "127.0.0.1:0".into(),
        api: "127.0.0.1:0".into(),
        vault: Some(vault_dir.to_string_lossy().into_owned()),
        ..Default::default()
    };
    lifeboat_server::init(&site_dir, &cfg)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let secret = Secret::KeyFile(key_hex.as_bytes().to_vec());
    let server = rt.spawn(lifeboat_server::run(
        site_dir.clone(),
        Some(secret),
        tx,
        async {
            let _ = stop_rx.await;
        },
    ));
    let bound = rt.block_on(rx).context("the recovery site did not start")?;
    let api = bound.api.to_string();

    // enroll the primary's agent with a one-time token
    let t = Instant::now();
    let (token, _) = lifeboat_server::create_token(&site_dir, "primary")?;
    let agent_dir = dir.join("primary-site");
    rt.block_on(enroll(
        &bound.listen.to_string(),
        &token.to_string(),
        "demo-agent",
        &agent_dir,
    ))?;
    let creds = credentials(&agent_dir)?;
    say(
        "recovery site + enrollment",
        t,
        format!(
            "server on {} (mutual TLS), API http://{api}; agent {} enrolled",
            bound.listen, creds.agent_id
        ),
    );

    // protect the volume: splitter + journal + dirty map, shipped to the server
    let t = Instant::now();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(vol)?;
    let size = volume_size(&file)?;
    let jdir = agent_dir.join("journals/app/disk0");
    let journal = Arc::new(Journal::open_with_memory(&jdir, 256 << 20)?);
    let dirty = Arc::new(DirtyMap::open(&jdir.join("dirty.map"), CHUNK_SIZE, size)?);
    let export = Arc::new(Export::new(
        "disk0",
        file.try_clone()?,
        size,
        false,
        Some(journal.clone()),
        Some(dirty.clone()),
    ));
    let src = Arc::new(Source {
        item: "app".into(),
        volume: "disk0".into(),
        file: Arc::new(file),
        size,
        journal,
        dirty,
    });
    let opts = ShipOptions {
        server: bound.listen.to_string(),
        tls: lifeboat_replicate::tls::agent_config(&creds.ca, &creds.cert, &creds.key)?,
        bandwidth: lifeboat_replicate::throttle::Schedule::fixed(None),
        journal_max: 1 << 30,
        batch_max: 4 << 20,
        window: 64 << 20,
        control: None,
        scan_interval: None,
    };
    let ship_status = Arc::new(ShipStatus::default());
    let (ship_stop, ship_stop_rx) = tokio::sync::watch::channel(false);
    let shipper = rt.spawn(ship_forever(src, opts, ship_status.clone(), ship_stop_rx));
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        if let Ok(s) = status(&api) {
            if s.state == "protected" && s.consistent {
                break s;
            }
        }
        if Instant::now() > deadline {
            bail!("the initial sync did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let initial = t.elapsed().as_secs_f64();
    say(
        "initial sync to the replica",
        t,
        format!(
            "{} compared by hash, {} sent (data extents only)",
            st.resync_chunks_compared,
            human(st.resync_bytes_received)
        ),
    );

    // a workload writes through the splitter (the path NBD and FUSE writes take)
    let t = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let wexport = export.clone();
    let wstop = stop.clone();
    let writer = std::thread::spawn(move || -> Result<u64> {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 64 << 10];
        let chunks = wexport.size / buf.len() as u64;
        let start = Instant::now();
        let mut n = 0u64;
        while !wstop.load(Ordering::Relaxed) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            buf[..8].copy_from_slice(&seed.to_le_bytes());
            buf[8..16].copy_from_slice(&n.to_le_bytes());
            wexport.write((seed % chunks) * buf.len() as u64, &buf)?;
            n += 1;
            if n.is_multiple_of(64) {
                wexport.flush()?;
            }
            // ~20 MB/s
            let due = Duration::from_secs_f64(n as f64 * buf.len() as f64 / 20e6);
            if let Some(d) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(d);
            }
        }
        wexport.flush()?;
        Ok(n * buf.len() as u64)
    });
    let mut rpos = Vec::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(s) = status(&api) {
            let rpo = s.rpo_ms.unwrap_or(0);
            rpos.push(rpo);
            if !json {
                println!(
                    "    live: state {:<10} RPO {:>5} ms  received {:>10}  rate {:>10}/s  seq {}",
                    s.state,
                    rpo,
                    human(s.bytes_received),
                    human(s.throughput_bytes_per_sec),
                    s.applied_seq
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    rpos.sort_unstable();
    say(
        "replicate a 20 MB/s workload",
        t,
        format!(
            "{} in random 64 KiB writes; RPO p50 {} ms, max {} ms",
            human(written),
            rpos.get(rpos.len() / 2).copied().unwrap_or(0),
            rpos.last().copied().unwrap_or(0)
        ),
    );

    // the replica catches up and equals the primary; a point is cut there
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&api)?;
        if s.lag_bytes == 0 && s.rpo_ms == Some(0) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the replica did not catch up within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let replica = site_dir.join("replicas/app/disk0.img");
    if digest(&Endpoint::Local(replica.clone()))? != digest(&Endpoint::Local(vol.to_path_buf()))? {
        bail!("the hot replica differs from the primary volume");
    }
    let token = lifeboat_server::api_token(&site_dir)?;
    let cut: serde_json::Value =
        serde_json::from_str(&post(&api, "/api/v1/items/app/points", &token)?)?;
    let point = cut["id"].as_str().context("no point id")?.to_string();
    say(
        "hot replica + point",
        t,
        format!("replica byte-identical to the primary (BLAKE3); point {point} cut at the recovery site"),
    );

    let t = Instant::now();
    let vault = Arc::new(Vault::open(
        lifeboat_store::open_backend(vault_dir.to_str().context("path")?)?,
        &Secret::KeyFile(key_hex.as_bytes().to_vec()),
    )?);
    let out = dir.join("recovered.raw");
    if !crate::cmd::demo::restore_and_compare(&vault, &point.parse()?, &out, vol)? {
        bail!("the point restored at the recovery site differs from the primary");
    }
    say(
        "restore at the recovery site",
        t,
        "byte-identical to the primary volume".into(),
    );

    let _ = ship_stop.send(true);
    let _ = rt.block_on(shipper);
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    Ok(SitesReport {
        initial_sync_secs: initial,
        written,
        rpo_p50_ms: rpos.get(rpos.len() / 2).copied().unwrap_or(0),
        rpo_max_ms: rpos.last().copied().unwrap_or(0),
        point,
    })
}
