//! `vault verify`: find every damaged point, volume and offset.
//!
//! Without `read_data`: every manifest decodes, every index piece is
//! readable, every chunk a point needs is in an index and its pack exists.
//! With `read_data`: additionally every pack is read once and every blob in
//! it is decrypted and checked against its id.

use std::collections::{HashMap, HashSet};

use lifeboat_format::blob::BlobKind;
use lifeboat_format::pack::{
    decode_pack_index, pack_trailer, PackEntry, PACK_HEADER, PACK_TAIL_LEN,
};
use lifeboat_format::{ChunkId, PackId};
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::vault::{pack_key, Vault};

/// One problem, as precise as we can name it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub point: Option<String>,
    pub volume: Option<String>,
    /// Byte offset in the volume of the damaged chunk.
    pub offset: Option<u64>,
    pub object: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = &self.point {
            write!(f, "point {p}")?;
        }
        if let Some(v) = &self.volume {
            write!(f, " volume {v}")?;
        }
        if let Some(o) = self.offset {
            write!(f, " offset {o}")?;
        }
        if let Some(o) = &self.object {
            write!(
                f,
                "{}object {o}",
                if self.point.is_some() { " " } else { "" }
            )?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub points: usize,
    pub chunks_referenced: usize,
    pub packs: usize,
    pub blobs_read: usize,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
    /// Packs with no index object: leftovers of interrupted writers, not
    /// damage (no point can reference them); `vault prune` removes them.
    pub unindexed_packs: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check the vault. Problems are collected, not returned as errors.
///
/// # Errors
/// Only when the vault cannot be listed at all.
pub fn verify(
    vault: &Vault,
    read_data: bool,
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport> {
    let mut r = VerifyReport::default();
    if let Err(e) = vault.reload_index() {
        r.problems.push(Problem {
            point: None,
            volume: None,
            offset: None,
            object: Some("index/".into()),
            message: e.to_string(),
        });
    }
    let packs: HashSet<PackId> = vault
        .backend()
        .list("packs/")?
        .into_iter()
        .filter_map(|o| o.key.rsplit('/').next()?.parse().ok())
        .collect();
    r.packs = packs.len();
    let indexed: HashSet<PackId> = vault.index_snapshot().values().map(|l| l.pack).collect();
    let mut unindexed: Vec<String> = packs.difference(&indexed).map(pack_key).collect();
    unindexed.sort();
    r.unindexed_packs = unindexed;

    // Bad blobs found by reading packs: id -> reason.
    let mut bad: HashMap<ChunkId, String> = HashMap::new();
    if read_data {
        let index = vault.index_snapshot();
        let mut by_pack: HashMap<PackId, Vec<(ChunkId, crate::vault::Location)>> = HashMap::new();
        for (id, loc) in index {
            by_pack.entry(loc.pack).or_default().push((id, loc));
        }
        // every pack there is (one whose blobs the index uses nowhere too)
        // and every pack the index points to
        let mut all: Vec<PackId> = packs.iter().copied().collect();
        all.extend(by_pack.keys().filter(|p| !packs.contains(p)));
        for pack in all {
            let blobs = by_pack.remove(&pack).unwrap_or_default();
            let index_object = vault.load_pack_index(&pack);
            if blobs.is_empty()
                && matches!(&index_object, Err(StoreError::Backend(e)) if e.is_not_found())
            {
                // a writer stopped between the pack and its index object:
                // nothing can use it (listed in `unindexed_packs`)
                continue;
            }
            let raw = match vault.backend().get(&pack_key(&pack)) {
                Ok(raw) => raw,
                Err(e) => {
                    for (id, _) in blobs {
                        bad.insert(id, format!("pack {pack} unreadable: {e}"));
                    }
                    continue;
                }
            };
            r.bytes_read += raw.len() as u64;
            progress(raw.len() as u64);
            let mut pack_problem = |message: String| {
                r.problems.push(Problem {
                    point: None,
                    volume: None,
                    offset: None,
                    object: Some(pack_key(&pack)),
                    message,
                })
            };
            // Every byte of a pack is in a blob or the trailer (checked
            // below), each authenticated by AES-GCM: opening them all checks
            // the pack. The trailer lists every blob (copies the index does
            // not use included) and is bound to the pack id (to the zero id
            // in packs written before 2026-11-30).
            let trailer = pack_trailer(&raw);
            let trailer_at = trailer
                .as_ref()
                .map_or(0, |t| raw.len() - PACK_TAIL_LEN - t.len());
            let listed = trailer
                .map_err(|e| format!("pack trailer: {e}"))
                .and_then(|t| {
                    let keys = vault.keys();
                    keys.open(BlobKind::PackIndex, &pack.0, t, "pack trailer")
                        .or_else(|_| keys.open(BlobKind::PackIndex, &[0; 32], t, "pack trailer"))
                        .map_err(|e| e.to_string())
                })
                .and_then(|plain| {
                    decode_pack_index(&plain).map_err(|e| format!("pack trailer: {e}"))
                });
            let mut listed = match listed {
                Ok(entries) => {
                    match index_object {
                        Ok(ix) if ix == entries => {}
                        Ok(_) => {
                            pack_problem("the pack's trailer and its index object differ".into())
                        }
                        Err(e) => pack_problem(format!("index object: {e}")),
                    }
                    if let Some((a, b)) = first_gap(&entries, trailer_at as u64) {
                        pack_problem(format!(
                            "bytes {a}..{b} of the pack are in no blob its trailer lists, or in two"
                        ));
                    }
                    entries
                }
                Err(e) => {
                    pack_problem(e);
                    Vec::new()
                }
            };
            // the blobs the index uses, where the trailer does not list them
            let known: HashSet<(ChunkId, u64)> = listed.iter().map(|e| (e.id, e.offset)).collect();
            for (id, loc) in &blobs {
                if !known.contains(&(*id, loc.offset)) {
                    listed.push(PackEntry {
                        id: *id,
                        kind: loc.kind,
                        offset: loc.offset,
                        len: loc.len,
                        raw_len: 0,
                    });
                }
            }
            let used: HashSet<(ChunkId, u64)> =
                blobs.iter().map(|(id, loc)| (*id, loc.offset)).collect();
            for e in listed {
                r.blobs_read += 1;
                let end = e.offset + e.len as u64;
                let res = if end as usize > raw.len() {
                    Err(format!(
                        "blob at {}..{end} lies past the end of pack {pack}",
                        e.offset
                    ))
                } else {
                    vault
                        .open_blob(
                            &e.id,
                            e.kind,
                            &raw[e.offset as usize..end as usize],
                            "verify",
                        )
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                };
                match res {
                    Err(m) if used.contains(&(e.id, e.offset)) => {
                        bad.insert(e.id, m);
                    }
                    Err(m) => {
                        pack_problem(format!("a copy of a chunk the index does not use: {m}"))
                    }
                    Ok(()) => {}
                }
            }
        }
    }

    let mut referenced = HashSet::new();
    for (id, m) in vault.load_all_manifests()? {
        r.points += 1;
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                r.problems.push(Problem {
                    point: Some(id.to_string()),
                    volume: None,
                    offset: None,
                    object: None,
                    message: e.to_string(),
                });
                continue;
            }
        };
        for v in &m.volumes {
            let vol = Some(v.name.to_string());
            let point = Some(id.to_string());
            let ix = match vault.load_fixed_index(&id, v) {
                Ok(ix) => ix,
                Err(e) => {
                    r.problems.push(Problem {
                        point,
                        volume: vol,
                        offset: None,
                        object: None,
                        message: format!("index unreadable: {e}"),
                    });
                    continue;
                }
            };
            for (i, c) in ix.chunks.iter().enumerate() {
                if c.is_zero() {
                    continue;
                }
                referenced.insert(*c);
                let offset = Some(ix.range(i).start);
                let msg = match vault.locate(c) {
                    None => Some(format!("chunk {} is missing", &c.to_hex()[..16])),
                    Some(loc) if !packs.contains(&loc.pack) => Some(format!(
                        "chunk {} is in pack {} which is gone",
                        &c.to_hex()[..16],
                        loc.pack
                    )),
                    Some(_) => bad
                        .get(c)
                        .map(|m| format!("chunk {} is damaged: {m}", &c.to_hex()[..16])),
                };
                if let Some(message) = msg {
                    r.problems.push(Problem {
                        point: point.clone(),
                        volume: vol.clone(),
                        offset,
                        object: None,
                        message,
                    });
                }
            }
        }
    }
    r.chunks_referenced = referenced.len();
    Ok(r)
}

/// The first bytes of a pack, between its header and its trailer (at
/// `trailer_at`), that no listed blob covers or that two blobs share.
fn first_gap(entries: &[PackEntry], trailer_at: u64) -> Option<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = entries
        .iter()
        .map(|e| (e.offset, e.offset + e.len as u64))
        .collect();
    spans.sort_unstable();
    let mut at = PACK_HEADER.len() as u64;
    for (a, b) in spans {
        if a != at {
            return Some((at.min(a), at.max(a)));
        }
        at = b;
    }
    (at != trailer_at).then_some((at.min(trailer_at), at.max(trailer_at)))
}
