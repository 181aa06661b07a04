//! Retention (which points to keep) and garbage collection (which packs to
//! delete), each computed as a plan first so `--dry-run` is free.
//!
//! # Safety with concurrent writers
//! Packs are never rewritten. Garbage collection *condemns* packs that no
//! manifest references (and packs that have no index object), recording them
//! in the `condemned` object. A writer takes its lock first, then loads the
//! pack indexes and the condemned list, and never deduplicates against a
//! condemned or deleted pack.
//!
//! Prune writes the condemned list, then reads the locks. If any writer lock
//! is live (or a lock cannot be read), it deletes nothing and defers: a
//! running writer may have loaded its view before the packs were condemned.
//! Otherwise it re-reads the indexes and manifests — so a writer that
//! finished while prune ran is seen — and deletes the condemned packs that
//! are still unreferenced, leaving tombstones in the list. A writer that
//! starts after prune read the locks loads the list written before that, so
//! it avoids the condemned packs. Only one prune runs at a time.

use std::collections::{BTreeMap, HashMap, HashSet};

use lifeboat_format::lock::{LockKind, TOMBSTONE_SECS};
use lifeboat_format::manifest::Manifest;
use lifeboat_format::{ChunkId, PackId, PointId};
use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{Result, StoreError};
use crate::vault::{index_key, pack_key, Vault};

/// How many points to keep, restic/borg style. A point is kept if any rule
/// keeps it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RetentionPolicy {
    pub keep_last: usize,
    pub keep_hourly: usize,
    pub keep_daily: usize,
    pub keep_weekly: usize,
    pub keep_monthly: usize,
    pub keep_yearly: usize,
    /// Points with any of these tags are always kept.
    pub keep_tags: Vec<String>,
    /// Only points with this tag are considered (others are kept): one
    /// item's points in a vault shared by several.
    pub scope_tag: Option<String>,
}

impl RetentionPolicy {
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_hourly == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
            && self.keep_yearly == 0
            && self.keep_tags.is_empty()
    }
}

/// The decision for one point.
#[derive(Debug, Clone, Serialize)]
pub struct PointDecision {
    pub id: PointId,
    pub time: u64,
    pub keep: bool,
    /// Which rules keep it (empty when removed).
    pub reasons: Vec<String>,
}

/// Decide which points to keep. Pure: `points` are (id, time, tags).
pub fn plan_retention(
    points: &[(PointId, u64, Vec<String>)],
    policy: &RetentionPolicy,
) -> Vec<PointDecision> {
    let in_scope = |tags: &Vec<String>| policy.scope_tag.as_ref().is_none_or(|t| tags.contains(t));
    let mut reasons: HashMap<PointId, Vec<String>> = HashMap::new();
    for (id, _, tags) in points {
        if !in_scope(tags) {
            reasons.entry(*id).or_default().push("out-of-scope".into());
        }
    }
    let mut sorted: Vec<_> = points.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0))); // newest first
    let all = sorted.clone();
    sorted.retain(|(_, _, tags)| in_scope(tags));
    for (i, (id, _, _)) in sorted.iter().enumerate() {
        if i < policy.keep_last {
            reasons.entry(*id).or_default().push("last".into());
        }
    }
    type Bucket = fn(OffsetDateTime) -> (i32, u32);
    let rules: [(&str, usize, Bucket); 5] = [
        ("hourly", policy.keep_hourly, |t| {
            (t.year(), t.ordinal() as u32 * 24 + t.hour() as u32)
        }),
        ("daily", policy.keep_daily, |t| {
            (t.year(), t.ordinal() as u32)
        }),
        ("weekly", policy.keep_weekly, |t| {
            let (y, w, _) = t.to_iso_week_date();
            (y, w as u32)
        }),
        ("monthly", policy.keep_monthly, |t| {
            (t.year(), t.month() as u32)
        }),
        ("yearly", policy.keep_yearly, |t| (t.year(), 0)),
    ];
    for (name, n, bucket) in rules {
        if n == 0 {
            continue;
        }
        let mut last = None;
        let mut kept = 0;
        for (id, time, _) in &sorted {
            let t = OffsetDateTime::from_unix_timestamp(*time as i64)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            let b = bucket(t);
            if last != Some(b) {
                last = Some(b);
                reasons.entry(*id).or_default().push(name.into());
                kept += 1;
                if kept == n {
                    break;
                }
            }
        }
    }
    for (id, _, tags) in &sorted {
        for t in tags {
            if policy.keep_tags.contains(t) {
                reasons.entry(*id).or_default().push(format!("tag:{t}"));
            }
        }
    }
    let mut out: Vec<_> = all
        .iter()
        .map(|(id, time, _)| {
            let r = reasons.remove(id).unwrap_or_default();
            PointDecision {
                id: *id,
                time: *time,
                keep: !r.is_empty(),
                reasons: r,
            }
        })
        .collect();
    out.reverse(); // oldest first for display
    out
}

/// What garbage collection will do.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcPlan {
    /// Packs no remaining point references (or without index), newly condemned.
    pub condemn: Vec<PackId>,
    /// Condemned packs that are safe to delete now.
    pub delete: Vec<PackId>,
    /// Condemned packs kept because a writer runs (see `blocked_by`).
    pub deferred: Vec<PackId>,
    /// Why deletion was deferred: the live locks that block it.
    pub blocked_by: Vec<String>,
    pub delete_bytes: u64,
    /// Bytes of unreferenced blobs inside packs that are still in use.
    pub unreferenced_in_live_packs: u64,
}

/// Result of `vault prune`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub points: Vec<PointDecision>,
    pub removed_points: usize,
    pub gc: GcPlan,
    pub dry_run: bool,
}

/// Every blob a set of manifests needs: data chunks and index pieces.
///
/// # Errors
/// A missing or damaged index piece (prune refuses to guess).
pub fn referenced_chunks(vault: &Vault, manifests: &[Manifest]) -> Result<HashSet<ChunkId>> {
    let mut set = HashSet::new();
    for m in manifests {
        for v in &m.volumes {
            set.extend(v.index.iter().copied());
            let ix = vault.load_fixed_index(&m.id, v)?;
            set.extend(ix.chunks.into_iter().filter(|c| !c.is_zero()));
        }
    }
    Ok(set)
}

/// Every chunk the kept points need must have a known location: otherwise
/// an index object is missing and prune must not guess.
fn check_located(vault: &Vault, referenced: &HashSet<ChunkId>) -> Result<()> {
    let missing = referenced
        .iter()
        .filter(|c| vault.locate(c).is_none())
        .count();
    if missing > 0 {
        return Err(StoreError::Corrupt(format!(
            "{missing} chunk(s) that kept points need are in no pack index; prune stopped, nothing was deleted (run `lifeboat vault verify`)"
        )));
    }
    Ok(())
}

fn load_manifests(vault: &Vault) -> Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for (id, m) in vault.load_all_manifests()? {
        out.push(m.map_err(|e| {
            StoreError::Corrupt(format!(
                "point {id} cannot be read ({e}); prune stopped, nothing was removed"
            ))
        })?);
    }
    Ok(out)
}

/// Apply a retention policy and collect garbage.
///
/// # Errors
/// Another prune is running, a damaged manifest or index (nothing is
/// deleted then), backend errors.
pub fn prune(vault: &Vault, policy: &RetentionPolicy, dry_run: bool) -> Result<PruneReport> {
    if policy.is_empty() {
        return Err(StoreError::Invalid(
            "no retention rule given: pass at least one --keep-* option (nothing was removed)"
                .into(),
        ));
    }
    let lock = if dry_run {
        None
    } else {
        Some(vault.lock(LockKind::Prune)?)
    };
    if let Some(l) = &lock {
        for (key, r) in vault.live_locks()? {
            if key != l.name() && r.as_ref().is_none_or(|r| r.kind == LockKind::Prune) {
                return Err(StoreError::Invalid(format!(
                    "another prune holds {key}{}; run prune again when it has finished (nothing was removed)",
                    r.map(|r| format!(" (host {}, pid {})", r.hostname, r.pid)).unwrap_or_default()
                )));
            }
        }
    }
    vault.reload_index()?;
    let manifests = load_manifests(vault)?;
    let points: Vec<_> = manifests
        .iter()
        .map(|m| (m.id, m.time, m.tags.clone()))
        .collect();
    let decisions = plan_retention(&points, policy);
    let keep: HashSet<PointId> = decisions.iter().filter(|d| d.keep).map(|d| d.id).collect();
    let kept: Vec<Manifest> = manifests
        .into_iter()
        .filter(|m| keep.contains(&m.id))
        .collect();
    let removed = decisions.len() - kept.len();

    let referenced = referenced_chunks(vault, &kept)?;
    check_located(vault, &referenced)?;
    let gc = plan_gc(vault, &referenced)?;
    let mut report = PruneReport {
        points: decisions.clone(),
        removed_points: removed,
        gc,
        dry_run,
    };
    let Some(lock) = lock else { return Ok(report) };

    // 1. remove manifests; 2. condemn; 3. read locks; 4. fresh view; 5. delete.
    for d in decisions.iter().filter(|d| !d.keep) {
        vault.delete_manifest(&d.id)?;
    }
    let mut condemned = vault.load_condemned()?;
    let already: HashSet<PackId> = condemned.packs.iter().map(|(p, _)| *p).collect();
    let now = crate::now_secs();
    for p in &report.gc.condemn {
        if !already.contains(p) {
            condemned.packs.push((*p, now));
        }
    }
    vault.save_condemned(&condemned)?;

    let blockers: Vec<String> = vault
        .live_locks()?
        .into_iter()
        .filter(|(key, r)| {
            key != lock.name() && r.as_ref().is_none_or(|r| r.kind == LockKind::Writer)
        })
        .map(|(key, r)| match r {
            Some(r) => format!("{key} (writer on {}, pid {})", r.hostname, r.pid),
            None => format!("{key} (unreadable; remove it if no Lifeboat process runs)"),
        })
        .collect();
    if !blockers.is_empty() {
        report.gc.deferred = condemned.packs.iter().map(|(p, _)| *p).collect();
        report.gc.delete = vec![];
        report.gc.blocked_by = blockers;
        return Ok(report);
    }

    // No writer runs now, and one that starts from here on sees the list.
    // Re-read everything: a writer may have finished while we planned.
    vault.reload_index()?;
    let fresh = load_manifests(vault)?;
    let referenced_now = referenced_chunks(vault, &fresh)?;
    check_located(vault, &referenced_now)?;
    let still_used = packs_in_use(vault, &referenced_now);
    let now = crate::now_secs();
    let mut done = Vec::new();
    let mut keep_condemned = Vec::new();
    for (p, when) in std::mem::take(&mut condemned.packs) {
        if still_used.contains(&p) {
            continue; // referenced again: no longer condemned
        }
        // Index first: a pack without index is garbage to the next prune,
        // an index without pack would be a dangling promise.
        match vault
            .backend()
            .delete(&index_key(&p))
            .and_then(|_| vault.backend().delete(&pack_key(&p)))
        {
            Ok(()) => {
                done.push(p);
                condemned.deleted.push((p, now));
            }
            Err(e) => {
                tracing::warn!("cannot delete pack {p}: {e}");
                keep_condemned.push((p, when));
            }
        }
    }
    condemned.packs = keep_condemned;
    condemned
        .deleted
        .retain(|(_, t)| now.saturating_sub(*t) < TOMBSTONE_SECS);
    vault.save_condemned(&condemned)?;
    vault.reload_index()?;
    report.gc.delete = done;
    Ok(report)
}

/// Which packs are unreferenced, given what the kept points reference.
fn plan_gc(vault: &Vault, referenced: &HashSet<ChunkId>) -> Result<GcPlan> {
    let index = vault.index_snapshot();
    let mut by_pack: HashMap<PackId, (bool, u64)> = HashMap::new();
    for (id, loc) in &index {
        let e = by_pack.entry(loc.pack).or_insert((false, 0));
        if referenced.contains(id) {
            e.0 = true;
        } else {
            e.1 += loc.len as u64;
        }
    }
    let mut plan = GcPlan::default();
    let sizes: BTreeMap<String, u64> = vault
        .backend()
        .list("packs/")?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    for (key, size) in &sizes {
        let Some(name) = key.rsplit('/').next() else {
            continue;
        };
        let Ok(pack) = name.parse::<PackId>() else {
            continue;
        };
        match by_pack.get(&pack) {
            Some((true, unref)) => plan.unreferenced_in_live_packs += unref,
            // unreferenced, or no index (a crashed writer's leftover)
            _ => {
                plan.condemn.push(pack);
                plan.delete_bytes += size;
            }
        }
    }
    Ok(plan)
}

fn packs_in_use(vault: &Vault, referenced: &HashSet<ChunkId>) -> HashSet<PackId> {
    vault
        .index_snapshot()
        .iter()
        .filter(|(id, _)| referenced.contains(id))
        .map(|(_, loc)| loc.pack)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(t: u64) -> PointId {
        PointId::new(t, 0)
    }

    #[test]
    fn keep_last_and_daily() {
        let day = 86_400;
        let pts: Vec<_> = (0..10)
            .map(|i| {
                (
                    pid(1_700_000_000 + i * day / 2),
                    1_700_000_000 + i * day / 2,
                    vec![],
                )
            })
            .collect();
        let p = RetentionPolicy {
            keep_last: 2,
            keep_daily: 3,
            ..Default::default()
        };
        let d = plan_retention(&pts, &p);
        let kept: Vec<_> = d.iter().filter(|d| d.keep).map(|d| d.time).collect();
        // points are 12 h apart from 2023-11-14 22:13 UTC: the newest two
        // (days 19 and 18) and the newest of day 17 (index 6)
        assert_eq!(kept, vec![pts[6].1, pts[8].1, pts[9].1], "{d:?}");
        assert!(!d[0].keep);
    }

    #[test]
    fn tags_are_kept() {
        let pts = vec![(pid(1), 1, vec!["golden".to_string()]), (pid(2), 2, vec![])];
        let p = RetentionPolicy {
            keep_last: 1,
            keep_tags: vec!["golden".into()],
            ..Default::default()
        };
        assert!(plan_retention(&pts, &p).iter().all(|d| d.keep));
    }

    #[test]
    fn a_scope_tag_leaves_other_points_alone() {
        let pts = vec![
            (pid(1), 1, vec!["item:a".to_string()]),
            (pid(2), 2, vec!["item:a".to_string()]),
            (pid(3), 3, vec!["item:b".to_string()]),
        ];
        let p = RetentionPolicy {
            keep_last: 1,
            scope_tag: Some("item:a".into()),
            ..Default::default()
        };
        let d = plan_retention(&pts, &p);
        let kept: Vec<_> = d.iter().filter(|d| d.keep).map(|d| d.time).collect();
        assert_eq!(kept, vec![2, 3], "{d:?}");
    }
}
