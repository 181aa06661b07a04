//! An open vault: config and keys, the chunk index, packs, manifests, locks.
//!
//! Object layout under the vault's location:
//! ```text
//! config                  plaintext VaultConfig (wrapped master key)
//! packs/<xx>/<pack id>    packs of sealed blobs (immutable)
//! index/<pack id>         sealed pack index, written after its pack
//! points/<point id>       sealed manifests, written last
//! locks/<kind>-<random>   sealed lock records of running writers / prune
//! condemned               sealed list of packs prune found unreferenced
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lifeboat_format::blob::BlobKind;
use lifeboat_format::config::{KeySlot, VaultConfig};
use lifeboat_format::index::{check_chunk_size, FixedIndex};
use lifeboat_format::lock::{Condemned, LockKind, LockRecord, REFRESH_SECS};
use lifeboat_format::manifest::{Manifest, VolumeEntry};
use lifeboat_format::pack::{
    decode_pack_index, encode_pack_index, pack_tail, PackEntry, PACK_HEADER,
};
use lifeboat_format::{ChunkId, PackId, PointId};

use crate::backend::DynBackend;
use crate::crypto::{self, KdfParams, Keys, KEY_LEN};
use crate::error::{Result, StoreError};

/// How the user proves they may open the vault.
pub enum Secret {
    Password(Vec<u8>),
    KeyFile(Vec<u8>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Password(_) => "Secret::Password(<hidden>)",
            Secret::KeyFile(_) => "Secret::KeyFile(<hidden>)",
        })
    }
}

/// Parameters of a new vault.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub chunk_size: u32,
    pub compression_level: i32,
    pub pack_size: u32,
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: 64 << 10,
            compression_level: 1,
            pack_size: 16 << 20,
            kdf: KdfParams::default(),
        }
    }
}

/// Where a blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub offset: u64,
    pub len: u32,
    pub kind: BlobKind,
}

pub fn pack_key(p: &PackId) -> String {
    let h = p.to_hex();
    format!("packs/{}/{h}", &h[..2])
}
pub fn index_key(p: &PackId) -> String {
    format!("index/{}", p.to_hex())
}
pub fn point_key(p: &PointId) -> String {
    format!("points/{p}")
}
const CONDEMNED_KEY: &str = "condemned";

fn point_aad(p: &PointId) -> [u8; 32] {
    let mut a = [0u8; 32];
    a[..8].copy_from_slice(&p.0.to_le_bytes());
    a
}

/// An open vault.
pub struct Vault {
    backend: DynBackend,
    keys: Arc<Keys>,
    config: VaultConfig,
    /// Every blob in every pack with an index. Condemned packs included.
    index: RwLock<HashMap<ChunkId, Location>>,
    condemned: RwLock<HashSet<PackId>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vault({})", self.backend.location())
    }
}

fn derive_wrapping(slot: &KeySlot, secret: &Secret) -> Result<Option<[u8; 32]>> {
    Ok(match (slot, secret) {
        (
            KeySlot::Password {
                salt,
                m_cost_kib,
                t_cost,
                p_cost,
                ..
            },
            Secret::Password(pw),
        ) => {
            let salt = hex::decode(salt).map_err(|_| {
                StoreError::Corrupt("vault config: key slot salt is not hex".into())
            })?;
            let p = KdfParams {
                m_cost_kib: *m_cost_kib,
                t_cost: *t_cost,
                p_cost: *p_cost,
            };
            Some(crypto::password_key(pw, &salt, p)?)
        }
        (KeySlot::KeyFile { .. }, Secret::KeyFile(c)) => Some(crypto::key_file_key(c)),
        _ => None,
    })
}

impl Vault {
    /// Create a vault at `backend`.
    ///
    /// # Errors
    /// [`StoreError::VaultExists`] if one is there (never overwritten), backend
    /// errors, or an invalid chunk size.
    pub fn init(backend: DynBackend, secret: &Secret, opts: &InitOptions) -> Result<Vault> {
        check_chunk_size(opts.chunk_size)?;
        if backend.head("config")?.is_some() {
            return Err(StoreError::VaultExists(backend.location()));
        }
        let master = crypto::random_bytes::<KEY_LEN>();
        let slot = match secret {
            Secret::Password(pw) => {
                let salt = crypto::random_bytes::<16>();
                let wk = crypto::password_key(pw, &salt, opts.kdf)?;
                KeySlot::Password {
                    salt: hex::encode(salt),
                    m_cost_kib: opts.kdf.m_cost_kib,
                    t_cost: opts.kdf.t_cost,
                    p_cost: opts.kdf.p_cost,
                    wrapped: crypto::wrap(&wk, &master),
                }
            }
            Secret::KeyFile(c) => KeySlot::KeyFile {
                wrapped: crypto::wrap(&crypto::key_file_key(c), &master),
            },
        };
        let mut config = VaultConfig {
            vault_id: hex::encode(crypto::random_bytes::<16>()),
            created: crate::now_secs(),
            chunk_size: opts.chunk_size,
            compression_level: opts.compression_level,
            pack_size: opts.pack_size,
            key_slots: vec![slot],
            mac: String::new(),
        };
        let keys = Arc::new(Keys::from_master(&master, &config.vault_id));
        config.mac = keys.mac(&config.body());
        backend
            .put_if_absent("config", &config.encode())
            .map_err(|e| match e {
                crate::BackendError::AlreadyExists { .. } => {
                    StoreError::VaultExists(backend.location())
                }
                e => e.into(),
            })?;
        Ok(Vault {
            backend,
            keys,
            config,
            index: RwLock::default(),
            condemned: RwLock::default(),
        })
    }

    /// Open the vault at `backend` and load its chunk index.
    ///
    /// # Errors
    /// [`StoreError::NotAVault`], [`StoreError::WrongSecret`], a damaged or
    /// newer config, or backend errors.
    pub fn open(backend: DynBackend, secret: &Secret) -> Result<Vault> {
        let v = Self::open_config(backend, secret)?;
        v.reload_index()?;
        Ok(v)
    }

    /// Open and unlock without loading the chunk index (for reading
    /// manifests only).
    ///
    /// # Errors
    /// As [`Vault::open`].
    pub fn open_config(backend: DynBackend, secret: &Secret) -> Result<Vault> {
        let raw = match backend.get("config") {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Err(StoreError::NotAVault(backend.location())),
            Err(e) => return Err(e.into()),
        };
        let config = VaultConfig::decode(&raw)
            .map_err(|e| StoreError::Corrupt(format!("{}/config: {e}", backend.location())))?;
        let mut master = None;
        for slot in &config.key_slots {
            if let Some(wk) = derive_wrapping(slot, secret)? {
                let wrapped = match slot {
                    KeySlot::Password { wrapped, .. } | KeySlot::KeyFile { wrapped } => wrapped,
                };
                if let Some(m) = crypto::unwrap(&wk, wrapped) {
                    master = Some(m);
                    break;
                }
            }
        }
        let Some(master) = master else {
            return Err(StoreError::WrongSecret(backend.location()));
        };
        let keys = Arc::new(Keys::from_master(&master, &config.vault_id));
        let mut unsigned = config.clone();
        unsigned.mac = String::new();
        if keys.mac(&unsigned.body()) != config.mac {
            return Err(StoreError::Corrupt(format!(
                "{}/config: authentication failed: the config was altered",
                backend.location()
            )));
        }
        Ok(Vault {
            backend,
            keys,
            config,
            index: RwLock::default(),
            condemned: RwLock::default(),
        })
    }

    pub fn backend(&self) -> &DynBackend {
        &self.backend
    }
    pub fn location(&self) -> String {
        self.backend.location()
    }
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }
    pub fn keys(&self) -> &Keys {
        &self.keys
    }
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    /// Read every pack index and the condemned list.
    ///
    /// # Errors
    /// Backend errors; a damaged index is an error naming it.
    pub fn reload_index(&self) -> Result<()> {
        let mut map = HashMap::new();
        for obj in self.backend.list("index/")? {
            let Some(name) = obj.key.strip_prefix("index/") else {
                continue;
            };
            let pack: PackId = name.parse().map_err(|e| {
                StoreError::Corrupt(format!("{}/{}: {e}", self.location(), obj.key))
            })?;
            for e in self.load_pack_index(&pack)? {
                map.entry(e.id).or_insert(Location {
                    pack,
                    offset: e.offset,
                    len: e.len,
                    kind: e.kind,
                });
            }
        }
        *self.index.write().unwrap() = map;
        self.reload_condemned()
    }

    /// Re-read the condemned list (writers do this after taking their lock).
    ///
    /// # Errors
    /// Backend errors or a damaged list.
    pub fn reload_condemned(&self) -> Result<()> {
        let c = self.load_condemned()?;
        *self.condemned.write().unwrap() = c
            .packs
            .into_iter()
            .chain(c.deleted)
            .map(|(p, _)| p)
            .collect();
        Ok(())
    }

    pub(crate) fn load_condemned(&self) -> Result<Condemned> {
        match self.backend.get(CONDEMNED_KEY) {
            Ok(raw) => {
                let plain = self
                    .keys
                    .open(BlobKind::Lock, &[1; 32], &raw, "condemned list")?;
                Ok(Condemned::decode(&plain)?)
            }
            Err(e) if e.is_not_found() => Ok(Condemned::default()),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn save_condemned(&self, c: &Condemned) -> Result<()> {
        let sealed = self.keys.seal(BlobKind::Lock, &[1; 32], &c.encode(), 1);
        self.backend.put(CONDEMNED_KEY, &sealed)?;
        Ok(())
    }

    /// The entries of one pack's index object.
    ///
    /// # Errors
    /// Missing, undecryptable or damaged index.
    pub fn load_pack_index(&self, pack: &PackId) -> Result<Vec<PackEntry>> {
        let key = index_key(pack);
        let raw = self.backend.get(&key)?;
        let what = format!("{}/{key}", self.location());
        let plain = self.keys.open(BlobKind::PackIndex, &pack.0, &raw, &what)?;
        decode_pack_index(&plain).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
    }

    /// Where a blob is, if the vault has it.
    pub fn locate(&self, id: &ChunkId) -> Option<Location> {
        self.index.read().unwrap().get(id).copied()
    }

    /// Whether a new point may reuse this chunk (present and not condemned).
    pub fn has_usable(&self, id: &ChunkId) -> bool {
        match self.locate(id) {
            Some(l) => !self.condemned.read().unwrap().contains(&l.pack),
            None => false,
        }
    }

    /// Number of blobs and packs known.
    pub fn index_stats(&self) -> (usize, usize) {
        let ix = self.index.read().unwrap();
        let packs: HashSet<_> = ix.values().map(|l| l.pack).collect();
        (ix.len(), packs.len())
    }

    pub(crate) fn index_snapshot(&self) -> HashMap<ChunkId, Location> {
        self.index.read().unwrap().clone()
    }

    fn insert_pack(&self, pack: PackId, entries: &[PackEntry]) {
        let mut ix = self.index.write().unwrap();
        for e in entries {
            ix.insert(
                e.id,
                Location {
                    pack,
                    offset: e.offset,
                    len: e.len,
                    kind: e.kind,
                },
            );
        }
    }

    /// Read, open and check one blob.
    ///
    /// # Errors
    /// [`StoreError::MissingChunk`], decryption failure, or an id mismatch.
    pub fn read_chunk(&self, id: &ChunkId, needed_by: &str) -> Result<Vec<u8>> {
        let loc = self.locate(id).ok_or_else(|| StoreError::MissingChunk {
            id: id.to_hex(),
            needed_by: needed_by.to_string(),
        })?;
        let raw = self
            .backend
            .get_range(
                &pack_key(&loc.pack),
                loc.offset..loc.offset + loc.len as u64,
            )
            .map_err(|e| match e {
                e if e.is_not_found() => StoreError::MissingChunk {
                    id: id.to_hex(),
                    needed_by: format!("{needed_by}; its pack {} is gone", loc.pack),
                },
                e => e.into(),
            })?;
        self.open_blob(id, loc.kind, &raw, needed_by)
    }

    /// Open a sealed blob read from a pack and check its id.
    ///
    /// # Errors
    /// Decryption failure or id mismatch.
    pub fn open_blob(
        &self,
        id: &ChunkId,
        kind: BlobKind,
        raw: &[u8],
        needed_by: &str,
    ) -> Result<Vec<u8>> {
        let mut plain = Vec::new();
        self.open_blob_append(id, kind, &mut raw.to_vec(), needed_by, &mut plain)?;
        Ok(plain)
    }

    /// [`Vault::open_blob`], decrypting `raw` where it lies and appending
    /// the plaintext to `out` (see [`crypto::Keys::open_append`]). Returns
    /// the plaintext's length; on error `out` keeps its length.
    ///
    /// # Errors
    /// As [`Vault::open_blob`].
    pub fn open_blob_append(
        &self,
        id: &ChunkId,
        kind: BlobKind,
        raw: &mut [u8],
        needed_by: &str,
        out: &mut Vec<u8>,
    ) -> Result<usize> {
        let what = || format!("chunk {} ({needed_by})", &id.to_hex()[..16]);
        let start = out.len();
        let n = self.keys.open_append(kind, &id.0, raw, &what(), out)?;
        if self.keys.chunk_id(&out[start..]) != *id {
            out.truncate(start);
            return Err(StoreError::Corrupt(format!(
                "{}: content does not match its id",
                what()
            )));
        }
        Ok(n)
    }

    /// Store a fixed index as `Index` pieces through `w`; returns the piece ids.
    ///
    /// # Errors
    /// Backend errors while flushing packs.
    pub fn store_fixed_index(&self, w: &PackWriter, ix: &FixedIndex) -> Result<Vec<ChunkId>> {
        let enc = ix.encode();
        let mut ids = Vec::new();
        for piece in enc.chunks(self.chunk_size() as usize) {
            let id = self.keys.chunk_id(piece);
            w.add(BlobKind::Index, id, piece)?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// Load the fixed index of a volume of a point.
    ///
    /// # Errors
    /// Missing or damaged pieces.
    pub fn load_fixed_index(&self, point: &PointId, vol: &VolumeEntry) -> Result<FixedIndex> {
        let needed_by = format!("index of volume {} of point {point}", vol.name);
        let mut enc = Vec::new();
        for id in &vol.index {
            enc.extend_from_slice(&self.read_chunk(id, &needed_by)?);
        }
        let ix = FixedIndex::decode(&enc)
            .map_err(|e| StoreError::Corrupt(format!("{needed_by}: {e}")))?;
        if ix.size != vol.size {
            return Err(StoreError::Corrupt(format!(
                "{needed_by}: index covers {} bytes, manifest says {}",
                ix.size, vol.size
            )));
        }
        Ok(ix)
    }

    /// Write a manifest. Call only after every chunk it names is stored.
    ///
    /// # Errors
    /// Backend errors.
    pub fn save_manifest(&self, m: &Manifest) -> Result<()> {
        let sealed = self
            .keys
            .seal(BlobKind::Manifest, &point_aad(&m.id), &m.encode(), 3);
        self.backend.put_if_absent(&point_key(&m.id), &sealed)?;
        Ok(())
    }

    /// # Errors
    /// [`StoreError::PointNotFound`], decryption failure or a damaged manifest.
    pub fn load_manifest(&self, id: &PointId) -> Result<Manifest> {
        let key = point_key(id);
        let raw = self.backend.get(&key).map_err(|e| match e {
            e if e.is_not_found() => StoreError::PointNotFound(id.to_string()),
            e => e.into(),
        })?;
        let what = format!("{}/{key}", self.location());
        let plain = self
            .keys
            .open(BlobKind::Manifest, &point_aad(id), &raw, &what)?;
        let m =
            Manifest::decode(&plain).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))?;
        if m.id != *id {
            return Err(StoreError::Corrupt(format!("{what}: holds point {}", m.id)));
        }
        Ok(m)
    }

    /// Ids of every point, oldest first.
    ///
    /// # Errors
    /// Backend errors.
    pub fn list_points(&self) -> Result<Vec<PointId>> {
        let mut ids: Vec<PointId> = self
            .backend
            .list("points/")?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix("points/")?.parse().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every manifest, oldest first. Damaged manifests are returned as errors
    /// beside the good ones so one bad point does not hide the others.
    ///
    /// # Errors
    /// Backend errors listing points.
    pub fn load_all_manifests(&self) -> Result<Vec<(PointId, Result<Manifest>)>> {
        Ok(self
            .list_points()?
            .into_iter()
            .map(|id| (id, self.load_manifest(&id)))
            .collect())
    }

    /// Resolve `latest`, a full id or a unique prefix of one.
    ///
    /// # Errors
    /// No match or an ambiguous prefix.
    pub fn resolve_point(&self, spec: &str) -> Result<PointId> {
        let ids = self.list_points()?;
        if spec == "latest" {
            return ids.last().copied().ok_or_else(|| {
                StoreError::PointNotFound("latest (the vault has no points)".into())
            });
        }
        let matches: Vec<_> = ids
            .iter()
            .filter(|i| i.to_string().starts_with(spec))
            .collect();
        match matches.as_slice() {
            [one] => Ok(**one),
            [] => Err(StoreError::PointNotFound(spec.into())),
            _ => Err(StoreError::Invalid(format!(
                "point prefix {spec:?} is ambiguous ({} points match); give more digits",
                matches.len()
            ))),
        }
    }

    pub fn delete_manifest(&self, id: &PointId) -> Result<()> {
        self.backend.delete(&point_key(id))?;
        Ok(())
    }

    /// Take a lock of `kind` (removed on drop, refreshed in the background).
    ///
    /// # Errors
    /// Backend errors.
    pub fn lock(&self, kind: LockKind) -> Result<LockGuard> {
        let now = crate::now_secs();
        let rec = LockRecord {
            kind: kind.clone(),
            hostname: crate::hostname(),
            pid: std::process::id(),
            started: now,
            refreshed: now,
        };
        let name = format!(
            "locks/{}-{}",
            match kind {
                LockKind::Writer => "writer",
                LockKind::Prune => "prune",
            },
            hex::encode(crypto::random_bytes::<8>())
        );
        let sealed = self.keys.seal(BlobKind::Lock, &[0; 32], &rec.encode(), 1);
        self.backend.put(&name, &sealed)?;
        // Dropping the sender stops the refresher at once (a command that
        // holds the lock for two seconds must not wait out a polling sleep).
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let last_ok = Arc::new(AtomicU64::new(now));
        let refresher = {
            let last_ok = last_ok.clone();
            let backend = self.backend.clone();
            let mut rec = rec.clone();
            let name = name.clone();
            let sealer = self.keys.clone();
            std::thread::spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(Duration::from_secs(REFRESH_SECS))
                {
                    rec.refreshed = crate::now_secs();
                    let sealed = sealer.seal(BlobKind::Lock, &[0; 32], &rec.encode(), 1);
                    match backend.put(&name, &sealed) {
                        Ok(()) => last_ok.store(rec.refreshed, Ordering::SeqCst),
                        Err(e) => tracing::warn!("cannot refresh lock {name}: {e}"),
                    }
                }
            })
        };
        Ok(LockGuard {
            backend: self.backend.clone(),
            name,
            stop: Some(stop),
            last_ok,
            refresher: Some(refresher),
        })
    }

    /// Live (not stale) locks; `None` for a lock object that cannot be read
    /// (written by a newer Lifeboat, or damaged): callers must assume the
    /// worst of it.
    ///
    /// # Errors
    /// Backend errors.
    pub fn live_locks(&self) -> Result<Vec<(String, Option<LockRecord>)>> {
        let now = crate::now_secs();
        let mut out = Vec::new();
        for o in self.backend.list("locks/")? {
            let raw = match self.backend.get(&o.key) {
                Ok(r) => r,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            let rec = self
                .keys
                .open(BlobKind::Lock, &[0; 32], &raw, &o.key)
                .ok()
                .and_then(|p| LockRecord::decode(&p).ok());
            match rec {
                Some(r) if r.is_stale(now) => {}
                r => out.push((o.key, r)),
            }
        }
        Ok(out)
    }

    /// Start writing: take a writer lock, then load the pack indexes and the
    /// condemned list (in that order: see [`crate::prune`]).
    ///
    /// # Errors
    /// Backend errors.
    pub fn begin_write(self: &Arc<Self>) -> Result<(LockGuard, PackWriter)> {
        let lock = self.lock(LockKind::Writer)?;
        // Both after the lock: a prune that missed our lock wrote its
        // condemned list (with tombstones of what it deletes) before.
        self.reload_index()?;
        Ok((lock, PackWriter::new(self.clone())))
    }
}

/// A held lock; dropping it removes the lock object.
pub struct LockGuard {
    backend: DynBackend,
    name: String,
    /// Dropped to stop the refresher.
    stop: Option<std::sync::mpsc::Sender<()>>,
    /// Time of the last successful write of the lock record.
    last_ok: Arc<AtomicU64>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

impl LockGuard {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fail if the lock may have gone stale (refreshes failed, or the process
    /// was suspended): prune may then have deleted packs this holder relies
    /// on. Writers call this before writing a manifest.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] when the lock is close to stale.
    pub fn check_held(&self) -> Result<()> {
        let age = crate::now_secs().saturating_sub(self.last_ok.load(Ordering::SeqCst));
        if age + REFRESH_SECS >= lifeboat_format::lock::STALE_AFTER_SECS {
            return Err(StoreError::Invalid(format!(
                "lock {} was not refreshed for {age} s (backend unreachable or process suspended); \
                 no point was written, take it again",
                self.name
            )));
        }
        Ok(())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        if let Err(e) = self.backend.delete(&self.name) {
            tracing::warn!("cannot remove lock {}: {e}", self.name);
        }
    }
}

/// What a writer added to the vault.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct WriteStats {
    pub new_chunks: u64,
    pub new_raw_bytes: u64,
    pub new_stored_bytes: u64,
    pub packs: u64,
}

/// A pack being filled: `data[start..end]`. `data` is initialized over its
/// whole length, so blobs are sealed straight into the room after `end`.
/// The pack starts 4 KiB-aligned in memory while `data` keeps its first
/// allocation (which covers a full pack), so the local backend writes it
/// with O_DIRECT without copying it through a bounce buffer.
struct PackBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
    entries: Vec<PackEntry>,
}

impl PackBuf {
    /// A new pack of up to `cap` bytes in `data` (the buffer of an uploaded
    /// pack, whose pages are already mapped, or a new one).
    fn new(cap: usize, data: Option<Vec<u8>>) -> Self {
        let align = crate::backend::local::DIRECT_ALIGN;
        let mut data = data.unwrap_or_default();
        crate::backend::local::grow_huge(&mut data, cap + align, 0);
        let start = crate::backend::local::align_skip(&data, align);
        let end = start + PACK_HEADER.len();
        data[start..end].copy_from_slice(&PACK_HEADER);
        PackBuf {
            data,
            start,
            end,
            entries: Vec::new(),
        }
    }

    /// The pack's bytes so far.
    fn pack(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    /// `n` bytes of room after the pack. Growing `data` (a blob larger
    /// than the slack past the pack size) moves it off its alignment: the
    /// pack is then written through the bounce buffer.
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.data.len() < self.end + n {
            self.data.resize(self.end + n, 0);
        }
        &mut self.data[self.end..self.end + n]
    }

    fn push(&mut self, bytes: &[u8]) {
        self.room(bytes.len()).copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Append the blobs of `other` (their sealed bytes, unchanged).
    fn absorb(&mut self, other: &PackBuf) {
        for e in &other.entries {
            let at = e.offset as usize;
            let offset = self.len() as u64;
            self.push(&other.pack()[at..at + e.len as usize]);
            self.entries.push(PackEntry { offset, ..*e });
        }
    }
}

/// Collects sealed blobs into packs and uploads them; safe to share between
/// worker threads. Full packs go to background uploader threads through a
/// bounded queue, so hashing and compression go on while a pack is written
/// and fsynced. A pack's index object is written after the pack, and its
/// entries become visible to dedup only then.
pub struct PackWriter {
    shared: Arc<WriterShared>,
    /// Packs being filled, one per thread adding at the moment: a thread
    /// takes one, seals a blob straight into it and puts it back.
    /// `None` once [`PackWriter::flush`] took them: an add then fails
    /// rather than leave a blob in a pack nobody uploads.
    bufs: Mutex<Option<Vec<PackBuf>>>,
    tx: Mutex<Option<std::sync::mpsc::SyncSender<PackBuf>>>,
    uploaders: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct WriterShared {
    vault: Arc<Vault>,
    /// Chunks added but not yet in an uploaded pack.
    pending: Mutex<HashSet<ChunkId>>,
    /// The first upload error; later adds and flush return it.
    failed: Mutex<Option<String>>,
    new_chunks: AtomicU64,
    new_raw: AtomicU64,
    new_stored: AtomicU64,
    packs: AtomicU64,
    /// Buffers of uploaded packs, kept for the next packs: a new 17 MiB
    /// buffer costs 4,000 page faults and as many zeroed pages.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Room a pack buffer has past the pack size: the last blob (the pack is
/// sent once it reaches the size) and the trailer, at 49 bytes per entry.
/// A pack of small, very compressible chunks may need more: its buffer
/// then grows (and is written through the bounce buffer).
fn pack_slack(c: &lifeboat_format::config::VaultConfig) -> usize {
    let chunks = (c.pack_size / c.chunk_size.max(1)) as usize;
    let trailer = 4 * (chunks + 64) * lifeboat_format::pack::ENTRY_LEN;
    (crypto::sealed_bound(c.chunk_size as usize) + trailer + 4096).max(1 << 20)
}

/// Packs being uploaded at once (and queued): bounds memory to a few packs.
const UPLOADERS: usize = 2;

impl PackWriter {
    fn new(vault: Arc<Vault>) -> Self {
        let shared = Arc::new(WriterShared {
            vault,
            pending: Mutex::default(),
            failed: Mutex::default(),
            new_chunks: AtomicU64::new(0),
            new_raw: AtomicU64::new(0),
            new_stored: AtomicU64::new(0),
            packs: AtomicU64::new(0),
            spare: Mutex::default(),
        });
        let (tx, rx) = std::sync::mpsc::sync_channel::<PackBuf>(UPLOADERS);
        let rx = Arc::new(Mutex::new(rx));
        let uploaders = (0..UPLOADERS)
            .map(|_| {
                let rx = rx.clone();
                let shared = shared.clone();
                std::thread::spawn(move || loop {
                    let next = rx.lock().unwrap().recv();
                    let Ok(b) = next else { return };
                    if shared.failed.lock().unwrap().is_some() {
                        continue; // drain: nothing more is written after an error
                    }
                    if let Err(e) = shared.upload(b) {
                        *shared.failed.lock().unwrap() = Some(e.to_string());
                    }
                })
            })
            .collect();
        PackWriter {
            shared,
            bufs: Mutex::new(Some(Vec::new())),
            tx: Mutex::new(Some(tx)),
            uploaders: Mutex::new(uploaders),
        }
    }

    pub fn vault(&self) -> &Arc<Vault> {
        &self.shared.vault
    }

    fn check(&self) -> Result<()> {
        match &*self.shared.failed.lock().unwrap() {
            Some(e) => Err(StoreError::Invalid(format!("writing a pack failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Whether `id` is stored (usable) or already pending in this writer.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.shared.vault.has_usable(id) || self.shared.pending.lock().unwrap().contains(id)
    }

    /// Seal and add `data` (whose id is `id`) unless the vault or a pack
    /// this writer is filling holds it.
    /// Returns whether it was new.
    ///
    /// # Errors
    /// An earlier upload failed, or the writer was flushed.
    pub fn add(&self, kind: BlobKind, id: ChunkId, data: &[u8]) -> Result<bool> {
        self.check()?;
        let sh = &self.shared;
        let flushed = || StoreError::Invalid("pack writer already flushed".into());
        if self.bufs.lock().unwrap().is_none() {
            return Err(flushed());
        }
        {
            // unless the vault or a pending pack holds it, `id` is ours
            let mut p = sh.pending.lock().unwrap();
            if sh.vault.has_usable(&id) || !p.insert(id) {
                return Ok(false);
            }
        }
        // seal straight into a pack this thread takes for the moment
        let pack_size = sh.vault.config.pack_size as usize;
        let taken = self.bufs.lock().unwrap().as_mut().and_then(Vec::pop);
        let mut b = taken.unwrap_or_else(|| {
            let spare = sh.spare.lock().unwrap().pop();
            PackBuf::new(pack_size + pack_slack(&sh.vault.config), spare)
        });
        let offset = b.len() as u64;
        let level = sh.vault.config.compression_level;
        let room = b.room(crypto::sealed_bound(data.len()));
        let len = sh.vault.keys.seal_to(kind, &id.0, data, level, room);
        b.end += len;
        let raw_len = data.len() as u32;
        b.entries.push(PackEntry {
            id,
            kind,
            offset,
            len: len as u32,
            raw_len,
        });
        sh.new_chunks.fetch_add(1, Ordering::Relaxed);
        sh.new_raw.fetch_add(raw_len as u64, Ordering::Relaxed);
        sh.new_stored.fetch_add(len as u64, Ordering::Relaxed);
        if b.len() >= pack_size {
            self.send(b)?;
        } else {
            match self.bufs.lock().unwrap().as_mut() {
                Some(bufs) => bufs.push(b),
                None => {
                    // flushed meanwhile: this blob (claimed in `pending`)
                    // would be in no pack, so the writer fails
                    let e = flushed();
                    sh.failed.lock().unwrap().get_or_insert(e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    fn send(&self, b: PackBuf) -> Result<()> {
        let tx = self.tx.lock().unwrap().clone();
        match tx {
            Some(tx) => {
                if tx.send(b).is_err() {
                    // the pack's chunks stay claimed: nothing may be
                    // written that counts on them
                    let msg = "pack uploaders stopped";
                    self.shared.failed.lock().unwrap().get_or_insert(msg.into());
                    return Err(StoreError::Invalid(msg.into()));
                }
                Ok(())
            }
            None => Err(StoreError::Invalid("pack writer already flushed".into())),
        }
    }

    /// Upload the last partial pack and wait for every upload. Call before
    /// writing a manifest; the writer takes no more blobs afterwards.
    ///
    /// # Errors
    /// Backend errors of any upload.
    pub fn flush(&self) -> Result<WriteStats> {
        // The threads' partly filled packs go out merged (up to the pack
        // size): a small point leaves one small pack, not one per thread.
        let mut bufs = self.bufs.lock().unwrap().take().unwrap_or_default();
        bufs.retain(|b| !b.entries.is_empty());
        bufs.sort_by_key(|b| std::cmp::Reverse(b.len()));
        let pack_size = self.shared.vault.config.pack_size as usize;
        let mut merged: Option<PackBuf> = None;
        for b in bufs {
            merged = match merged {
                Some(mut m) if m.len() + b.len() <= pack_size => {
                    m.absorb(&b);
                    Some(m)
                }
                Some(m) => {
                    self.send(m)?;
                    Some(b)
                }
                None => Some(b),
            };
        }
        if let Some(m) = merged {
            self.send(m)?;
        }
        self.tx.lock().unwrap().take();
        for t in self.uploaders.lock().unwrap().drain(..) {
            if t.join().is_err() {
                let msg = "a pack uploader panicked";
                self.shared.failed.lock().unwrap().get_or_insert(msg.into());
            }
        }
        self.check()?;
        Ok(self.stats())
    }

    pub fn stats(&self) -> WriteStats {
        let sh = &self.shared;
        WriteStats {
            new_chunks: sh.new_chunks.load(Ordering::Relaxed),
            new_raw_bytes: sh.new_raw.load(Ordering::Relaxed),
            new_stored_bytes: sh.new_stored.load(Ordering::Relaxed),
            packs: sh.packs.load(Ordering::Relaxed),
        }
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // Stop the uploaders; a writer dropped without flush (an error path)
        // leaves at most unreferenced packs, which prune removes.
        self.tx.lock().unwrap().take();
        for t in self.uploaders.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

impl WriterShared {
    fn upload(&self, mut b: PackBuf) -> Result<()> {
        if b.entries.is_empty() {
            return Ok(());
        }
        let keys = &self.vault.keys;
        let index = encode_pack_index(&b.entries);
        // A pack is named by a random id, not by a hash of its bytes: each
        // blob in it is authenticated by AES-GCM, and so is the trailer,
        // bound to the id (`vault verify --read-data` opens them all and
        // compares the trailer with the index object); hashing every pack
        // once more cost 5 % of a point's CPU. (Packs written before
        // 2026-11-30 are named by their BLAKE3 and their trailer is bound
        // to the zero id.)
        let pack = PackId(crypto::random_bytes::<32>());
        let trailer = keys.seal(BlobKind::PackIndex, &pack.0, &index, 1);
        b.push(&trailer);
        b.push(&pack_tail(trailer.len() as u32));
        let backend = &self.vault.backend;
        backend.put(&pack_key(&pack), b.pack())?;
        // the index object is the same sealed list, for reading without the pack
        backend.put(&index_key(&pack), &trailer)?;
        self.vault.insert_pack(pack, &b.entries);
        let mut p = self.pending.lock().unwrap();
        for e in &b.entries {
            p.remove(&e.id);
        }
        self.packs.fetch_add(1, Ordering::Relaxed);
        drop(p);
        let mut spare = self.spare.lock().unwrap();
        if spare.len() < UPLOADERS {
            spare.push(b.data);
        }
        Ok(())
    }
}
