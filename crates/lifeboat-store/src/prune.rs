//! Retention (which points to keep) and garbage collection (which packs to
//! delete), each computed as a plan first so `--dry-run` is free.
//!
//! # Safety with concurrent writers
//! Packs are never rewritten. Garbage collection *condemns* packs that no
//! manifest references (and packs that have no index object), recording the
//! time in the `condemned` object. A writer takes its lock first, then reads
//! the condemned list, and never deduplicates against a condemned pack.
//! Prune deletes a condemned pack only if it is still unreferenced and every
//! live writer lock started after the pack was condemned — such a writer has
//! seen the list, so it cannot depend on the pack. Prune writes the list
//! before it reads the locks, so a writer whose lock it misses must have read
//! the list afterwards. When no writer runs, condemned packs are deleted in
//! the same run.

use std::collections::{BTreeMap, HashMap, HashSet};

use lifeboat_format::lock::{Condemned, LockKind};
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
    let mut sorted: Vec<_> = points.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0))); // newest first
    let mut reasons: HashMap<PointId, Vec<String>> = HashMap::new();
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
    let mut out: Vec<_> = sorted
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
    /// Condemned packs kept because a writer that started earlier still runs.
    pub deferred: Vec<PackId>,
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

/// Apply a retention policy and collect garbage.
///
/// # Errors
/// A damaged manifest or index (nothing is deleted then), backend errors.
pub fn prune(vault: &Vault, policy: &RetentionPolicy, dry_run: bool) -> Result<PruneReport> {
    if policy.is_empty() {
        return Err(StoreError::Invalid(
            "no retention rule given: pass at least one --keep-* option (nothing was removed)"
                .into(),
        ));
    }
    let _lock = if dry_run {
        None
    } else {
        Some(vault.lock(LockKind::Prune)?)
    };
    vault.reload_index()?;
    let mut manifests = Vec::new();
    for (id, m) in vault.load_all_manifests()? {
        manifests.push(m.map_err(|e| {
            StoreError::Corrupt(format!(
                "point {id} cannot be read ({e}); prune stopped, nothing was removed"
            ))
        })?);
    }
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
    let gc = plan_gc(vault, &referenced)?;
    let report = PruneReport {
        points: decisions.clone(),
        removed_points: removed,
        gc: gc.clone(),
        dry_run,
    };
    if dry_run {
        return Ok(report);
    }
    // 1. remove manifests; 2. condemn; 3. read locks; 4. delete.
    for d in decisions.iter().filter(|d| !d.keep) {
        vault.delete_manifest(&d.id)?;
    }
    let now = crate::now_secs();
    let mut condemned = vault.load_condemned()?;
    let already: HashSet<PackId> = condemned.packs.iter().map(|(p, _)| *p).collect();
    for p in &gc.condemn {
        if !already.contains(p) {
            condemned.packs.push((*p, now));
        }
    }
    vault.save_condemned(&condemned)?;
    let still_used = packs_in_use(vault, &referenced);
    let (delete, deferred) = deletable(vault, &condemned, &still_used)?;
    let mut done = Vec::new();
    for p in &delete {
        // Index first: a pack without index is garbage to the next prune,
        // an index without pack would be a dangling promise.
        vault.backend().delete(&index_key(p))?;
        vault.backend().delete(&pack_key(p))?;
        done.push(*p);
    }
    let gone: HashSet<PackId> = done.iter().copied().collect();
    let remaining = Condemned {
        // A pack a point references again (a writer that raced the previous
        // prune) is no longer condemned.
        packs: condemned
            .packs
            .into_iter()
            .filter(|(p, _)| !gone.contains(p) && !still_used.contains(p))
            .collect(),
    };
    vault.save_condemned(&remaining)?;
    vault.reload_index()?;
    let mut report = report;
    report.gc.delete = done;
    report.gc.deferred = deferred;
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

fn deletable(
    vault: &Vault,
    condemned: &Condemned,
    still_used: &HashSet<PackId>,
) -> Result<(Vec<PackId>, Vec<PackId>)> {
    let writers: Vec<u64> = vault
        .live_locks()?
        .into_iter()
        .filter(|(_, r)| r.kind == LockKind::Writer)
        .map(|(_, r)| r.started)
        .collect();
    let (mut del, mut defer) = (Vec::new(), Vec::new());
    for (p, when) in &condemned.packs {
        if still_used.contains(p) {
            continue;
        }
        // A writer that started in the same second as the condemnation may
        // have read the list before it: require strictly later.
        if writers.iter().all(|started| *started > *when) {
            del.push(*p);
        } else {
            defer.push(*p);
        }
    }
    Ok((del, defer))
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
}
