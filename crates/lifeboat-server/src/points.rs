//! Recovery points from hot replicas: crash-consistent cuts of each item
//! (all its volumes at once) on a schedule or on request, then retention.
//!
//! A cut holds the replica locks of all volumes of the item, so no record
//! is applied meanwhile: every volume is at a record boundary of its
//! stream, which is a crash state the source went through.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lifeboat_capture::scan::{create_point, CreateOptions, NoProgress, VolumeSpec};
use lifeboat_format::manifest::PointKind;
use lifeboat_store::prune::{prune, RetentionPolicy};
use serde::Serialize;

use lifeboat_format::proto::Frame;

use lifeboat_format::proto::APP_CUT;

use crate::db::PointRow;
use crate::State;

#[derive(Debug, Clone, Serialize)]
pub struct Cut {
    pub id: String,
    pub kind: String,
    pub item: String,
    pub volumes: Vec<String>,
    pub journal_seq: u64,
    pub data_bytes: u64,
    pub added_bytes: u64,
    pub seconds: f64,
}

/// Cut a point of `item` now. `force`: even if nothing changed since the last.
///
/// # Errors
/// No vault configured, an item that is unknown or not consistent (initial
/// sync or a resync in progress), or vault errors.
pub async fn cut(
    st: &Arc<State>,
    item: &str,
    force: bool,
    tag: Option<&str>,
    app: bool,
) -> Result<Option<Cut>> {
    let Some(vault) = st.vault.clone() else {
        bail!("no vault is configured (set `vault` in server.toml)");
    };
    let _g = st.cut_lock.lock().await;
    let reps: Vec<(String, Arc<std::sync::Mutex<crate::replica::Replica>>)> = {
        let vols = st.volumes.lock().unwrap();
        let mut v: Vec<_> = vols
            .values()
            .filter(|v| v.item == item)
            .map(|v| (v.volume.clone(), v.replica.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    if reps.is_empty() {
        bail!("no replicated item named {item:?}");
    }
    // a scheduled cut of an unchanged item is skipped before any stream is
    // parked (the check is repeated under the locks below)
    if !force && !reps.iter().any(|(_, r)| r.lock().unwrap().changed) {
        return Ok(None);
    }
    let kind = if app {
        PointKind::AppConsistent
    } else {
        PointKind::CrashConsistent
    };
    // a consistency group (or an app-consistent cut): stop every volume's
    // stream at the same cut marker; the streams go on when `_parked` drops
    let group = reps.len() >= 2 || app;
    let mut cut_marker = None;
    let _parked = group.then(|| Parked(reps.iter().map(|r| r.1.clone()).collect()));
    if group {
        let target = if app {
            // app-consistent markers live above every periodic one; the
            // agent appends exactly this id
            let millis = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(1);
            APP_CUT | millis
        } else {
            // the next periodic marker after any a stream has applied (the
            // agent's clock names them; ours does not matter)
            reps.iter()
                .map(|(_, r)| r.lock().unwrap().last_marker)
                .max()
                .unwrap_or(0)
                + 1
        };
        for (_, r) in &reps {
            let mut g = r.lock().unwrap();
            g.park_target = Some(target);
            g.parked_at = None;
        }
        let t = Instant::now();
        if app {
            // ask the agent: freeze hook, marker in every journal, thaw hook
            let ctl = {
                let mut vols = st.volumes.lock().unwrap();
                let mut c = None;
                for v in vols.values_mut().filter(|v| v.item == item) {
                    v.quiesced = None;
                    if c.is_none() {
                        c = v.control.clone();
                    }
                }
                c
            };
            let sent = ctl.is_some_and(|c| c.send(Frame::Quiesce { cut_id: target }).is_ok());
            if !sent {
                bail!("{item}: the agent is not connected; no app-consistent point");
            }
        }
        let limit = if app {
            Duration::from_secs(90)
        } else {
            Duration::from_secs(30)
        };
        loop {
            if app {
                let failed = st
                    .volumes
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|v| v.item == item)
                    .find_map(|v| match &v.quiesced {
                        Some((id, false, m)) if *id == target => Some(m.clone()),
                        _ => None,
                    });
                if let Some(m) = failed {
                    bail!("{item}: the agent could not take an app-consistent cut: {m}");
                }
            }
            let at: Vec<Option<u64>> = reps
                .iter()
                .map(|(_, r)| r.lock().unwrap().parked_at)
                .collect();
            if at.iter().all(|a| a.is_some()) {
                if at.windows(2).all(|w| w[0] == w[1]) {
                    cut_marker = at[0];
                    break;
                }
                bail!(
                    "{item}: the volumes stopped at different cut markers {at:?}; no group point"
                );
            }
            if t.elapsed() > limit {
                bail!("{item}: not every volume reached the cut marker within {} s (is the agent streaming all of them, and keeping up?)", limit.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let item = item.to_string();
    let tag = tag.map(str::to_string);
    let st2 = st.clone();

    let r = tokio::task::spawn_blocking(move || -> Result<Option<Cut>> {
        let started = Instant::now();
        let mut guards = Vec::new();
        for (_, r) in &reps {
            guards.push(r.lock().unwrap());
        }
        if group && guards.iter().any(|g| g.parked_at != cut_marker) {
            bail!(
                "{item}: a stream left the cut marker before the point was taken; no group point"
            );
        }
        if let Some((n, _)) = reps.iter().zip(&guards).find(|(_, g)| !g.consistent) {
            bail!(
                "{item}/{} is not consistent yet (initial sync or resync in progress)",
                n.0
            );
        }
        if !force && !guards.iter().any(|g| g.changed) {
            return Ok(None);
        }
        let mut specs = Vec::new();
        for ((name, _), g) in reps.iter().zip(&guards) {
            g.file.sync_data()?;
            specs.push(VolumeSpec {
                name: name
                    .parse()
                    .with_context(|| format!("volume name {name}"))?,
                path: g.path.clone(),
            });
        }
        let seq = guards.iter().map(|g| g.applied_seq).max().unwrap_or(0);
        let mut tags = vec![format!("item:{item}"), "replica".to_string()];
        tags.extend(tag);
        let rep = create_point(
            &vault,
            &specs,
            &CreateOptions {
                kind,
                tags,
                journal_seq: Some(seq),
                ..Default::default()
            },
            &NoProgress,
        )?;
        for g in guards.iter_mut() {
            g.changed = false;
        }
        drop(guards);
        let added = rep.stored.new_stored_bytes;
        st2.db.add_point(&PointRow {
            id: rep.id.to_string(),
            item: item.clone(),
            time: rep.time as i64,
            kind: kind.to_string(),
            journal_seq: Some(seq as i64),
            data_bytes: rep.data_bytes as i64,
            added_bytes: added as i64,
        })?;
        let cut = Cut {
            id: rep.id.to_string(),
            kind: kind.to_string(),
            item: item.clone(),
            volumes: reps.iter().map(|r| r.0.clone()).collect(),
            journal_seq: seq,
            data_bytes: rep.data_bytes,
            added_bytes: added,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            "{item}: point {} at seq {seq} ({} data bytes, {added} added) in {:.2} s",
            cut.id,
            cut.data_bytes,
            cut.seconds
        );
        // retention of this item's points
        let p = &st2.cfg.points;
        let policy = RetentionPolicy {
            keep_last: p.keep_last.max(1),
            keep_hourly: p.keep_hourly,
            keep_daily: p.keep_daily,
            keep_weekly: p.keep_weekly,
            scope_tag: Some(format!("item:{item}")),
            ..Default::default()
        };
        match prune(&vault, &policy, false) {
            Ok(r) => {
                let gone: Vec<String> = r
                    .points
                    .iter()
                    .filter(|d| !d.keep)
                    .map(|d| d.id.to_string())
                    .collect();
                st2.db.forget_points(&gone)?;
            }
            Err(e) => tracing::warn!("{item}: retention deferred: {e}"),
        }
        Ok(Some(cut))
    })
    .await;
    let cut = r??;
    if let (Some(c), Some(m)) = (&cut, cut_marker) {
        tracing::info!("{}: group point {} at cut marker {m}", c.item, c.id);
    }
    Ok(cut)
}

/// Clears the park targets of a cut's replicas when the cut ends, however
/// it ends (an error, or its caller going away).
struct Parked(Vec<Arc<std::sync::Mutex<crate::replica::Replica>>>);

impl Drop for Parked {
    fn drop(&mut self) {
        for r in &self.0 {
            if let Ok(mut g) = r.lock() {
                g.park_target = None;
            }
        }
    }
}

/// Every second: smooth throughput figures, and cut a point of every item
/// whose interval has passed.
pub async fn scheduler(st: Arc<State>) {
    let interval = st.cfg.point_interval().unwrap_or(Duration::from_secs(60));
    let mut last_cut: std::collections::HashMap<String, Instant> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let items: Vec<String> = {
            let mut vols = st.volumes.lock().unwrap();
            for v in vols.values_mut() {
                let d = v.bytes_received.saturating_sub(v.last_bytes) as f64;
                v.last_bytes = v.bytes_received;
                v.throughput = v.throughput * 0.7 + d * 0.3;
            }
            let mut i: Vec<String> = vols.values().map(|v| v.item.clone()).collect();
            i.sort();
            i.dedup();
            i
        };
        if st.vault.is_none() {
            continue;
        }
        for item in items {
            let due = last_cut.get(&item).is_none_or(|t| t.elapsed() >= interval);
            if !due {
                continue;
            }
            match cut(&st, &item, false, None, false).await {
                Ok(_) => {
                    last_cut.insert(item, Instant::now());
                }
                Err(e) => tracing::debug!("{item}: no point now: {e:#}"),
            }
        }
    }
}
