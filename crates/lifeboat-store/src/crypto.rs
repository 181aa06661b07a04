//! Keys and sealing.
//!
//! A vault has one random 32-byte master key. From it, with BLAKE3
//! `derive_key` and the vault id as context, come:
//! * the AES-256-GCM key that seals every blob (aws-lc-rs),
//! * the key of the keyed BLAKE3 that addresses chunks (so chunk ids reveal
//!   nothing about content to someone without the key),
//! * the key that authenticates the vault config.
//!
//! The master key is stored only wrapped (AES-256-GCM) by a key derived from a
//! passphrase with Argon2id, or from a key file.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use lifeboat_format::blob::{
    associated_data, inner_header, parse_inner, parse_sealed, sealed_header, BlobKind, Compression,
    INNER_HEADER_LEN, NONCE_LEN, OUTER_HEADER_LEN, TAG_LEN,
};
use lifeboat_format::ChunkId;

use crate::error::StoreError;

pub const KEY_LEN: usize = 32;

/// Secret material of an open vault.
pub struct Keys {
    aead: LessSafeKey,
    id_key: [u8; 32],
    mac_key: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<secret>)")
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("OS random source");
    b
}

fn derive(context: &str, vault_id: &str, master: &[u8; KEY_LEN]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(&format!("lifeboat 2026 {context} {vault_id}"));
    h.update(master);
    *h.finalize().as_bytes()
}

impl Keys {
    pub fn from_master(master: &[u8; KEY_LEN], vault_id: &str) -> Self {
        let data = derive("data aead", vault_id, master);
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &data).expect("32-byte key"));
        Keys {
            aead,
            id_key: derive("chunk id", vault_id, master),
            mac_key: derive("config mac", vault_id, master),
        }
    }

    /// Keyed BLAKE3 of a chunk's plaintext: its address.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    pub fn mac(&self, data: &[u8]) -> String {
        blake3::keyed_hash(&self.mac_key, data).to_hex().to_string()
    }

    /// Compress (if it helps) and seal `data` as a blob of `kind`; `id` is
    /// bound into the AEAD (the chunk id, or zeros for non-chunks).
    pub fn seal(&self, kind: BlobKind, id: &[u8; 32], data: &[u8], level: i32) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_into(kind, id, data, level, &mut out);
        out
    }

    /// [`Keys::seal`], appending the sealed blob to `out`. Returns the
    /// blob's length.
    pub fn seal_into(
        &self,
        kind: BlobKind,
        id: &[u8; 32],
        data: &[u8],
        level: i32,
        out: &mut Vec<u8>,
    ) -> usize {
        let start = out.len();
        out.resize(start + sealed_bound(data.len()), 0);
        let n = self.seal_to(kind, id, data, level, &mut out[start..]);
        out.truncate(start + n);
        n
    }

    /// [`Keys::seal`] into the start of `out` (room in a pack being filled,
    /// at least [`sealed_bound`] bytes), each payload byte written once:
    /// zstd compresses straight into `out` and AES-GCM encrypts it there;
    /// data left uncompressed is encrypted from `data` into `out`, not
    /// copied first (a copy of the random half of a disk cost 8 % of a
    /// point's CPU). Returns the blob's length.
    ///
    /// # Panics
    /// `out` is shorter than [`sealed_bound`] of `data`.
    pub fn seal_to(
        &self,
        kind: BlobKind,
        id: &[u8; 32],
        data: &[u8],
        level: i32,
        out: &mut [u8],
    ) -> usize {
        assert!(out.len() >= sealed_bound(data.len()), "seal_to: no room");
        let nonce = random_bytes::<NONCE_LEN>();
        out[..OUTER_HEADER_LEN].copy_from_slice(&sealed_header(kind, &nonce));
        let payload = OUTER_HEADER_LEN + INNER_HEADER_LEN;
        let compressed = if level != i32::MIN && !looks_incompressible(data) {
            // Keep compression only when it saves at least 1/32.
            compress_to(data, level, &mut out[payload..])
                .filter(|n| n + data.len() / 32 < data.len())
        } else {
            None
        };
        let nonce = Nonce::assume_unique_for_key(nonce);
        let aad = Aad::from(associated_data(kind, id));
        let (method, len) = match compressed {
            Some(n) => (Compression::Zstd, n),
            None => (Compression::None, data.len()),
        };
        out[OUTER_HEADER_LEN..payload].copy_from_slice(&inner_header(method, data.len() as u32));
        if compressed.is_some() {
            let tag = self
                .aead
                .seal_in_place_separate_tag(nonce, aad, &mut out[OUTER_HEADER_LEN..payload + len])
                .expect("AES-GCM seal");
            out[payload + len..payload + len + TAG_LEN].copy_from_slice(tag.as_ref());
        } else {
            let (inner, rest) = out[OUTER_HEADER_LEN..].split_at_mut(INNER_HEADER_LEN);
            self.aead
                .seal_in_place_scatter(nonce, aad, inner, data, &mut rest[..len + TAG_LEN])
                .expect("AES-GCM seal");
        }
        payload + len + TAG_LEN
    }

    /// Open a sealed blob of `kind` bound to `id` and decompress it.
    ///
    /// # Errors
    /// [`StoreError::Format`] for a damaged header, [`StoreError::Decrypt`]
    /// when authentication fails (wrong key or tampered bytes).
    pub fn open(
        &self,
        kind: BlobKind,
        id: &[u8; 32],
        sealed: &[u8],
        what: &str,
    ) -> Result<Vec<u8>, StoreError> {
        let mut buf = sealed.to_vec();
        let mut out = Vec::new();
        self.open_append(kind, id, &mut buf, what, &mut out)?;
        Ok(out)
    }

    /// [`Keys::open`], decrypting `sealed` where it lies (its bytes are
    /// left as plaintext) and appending the plaintext to `out`: zstd
    /// decompresses straight into `out`. Returns the plaintext's length;
    /// on error `out` keeps its length.
    ///
    /// # Errors
    /// As [`Keys::open`].
    pub fn open_append(
        &self,
        kind: BlobKind,
        id: &[u8; 32],
        sealed: &mut [u8],
        what: &str,
        out: &mut Vec<u8>,
    ) -> Result<usize, StoreError> {
        let parts = parse_sealed(sealed)?;
        if parts.kind != kind {
            return Err(StoreError::Corrupt(format!(
                "{what}: holds a {:?} blob where a {kind:?} blob was expected",
                parts.kind
            )));
        }
        let nonce = parts.nonce;
        let at = sealed.len() - parts.ciphertext.len();
        let plain = self
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(kind, id)),
                &mut sealed[at..],
            )
            .map_err(|_| StoreError::Decrypt(what.to_string()))?;
        let (comp, raw_len, payload) = parse_inner(plain)?;
        match comp {
            Compression::None => out.extend_from_slice(payload),
            Compression::Zstd => {
                thread_local! {
                    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
                }
                let start = out.len();
                out.reserve(raw_len as usize);
                let n = DCTX
                    .with(|d| {
                        let mut d = d.borrow_mut();
                        if d.is_none() {
                            *d = Some(zstd::bulk::Decompressor::new()?);
                        }
                        let mut cur = std::io::Cursor::new(&mut *out);
                        cur.set_position(start as u64);
                        d.as_mut()
                            .expect("set above")
                            .decompress_to_buffer(payload, &mut cur)
                    })
                    .map_err(|e| {
                        out.truncate(start);
                        StoreError::Corrupt(format!("{what}: cannot decompress: {e}"))
                    })?;
                if n != raw_len as usize {
                    out.truncate(start);
                    return Err(StoreError::Corrupt(format!(
                        "{what}: decompressed length differs"
                    )));
                }
            }
        }
        Ok(raw_len as usize)
    }
}

/// Room a sealed blob of `len` data bytes may take (the compression bound
/// covers data stored raw too).
pub fn sealed_bound(len: usize) -> usize {
    OUTER_HEADER_LEN + INNER_HEADER_LEN + zstd::zstd_safe::compress_bound(len) + TAG_LEN
}

/// Compress `data` with zstd at `level` into the start of `out` (at least
/// the compression bound long). One context per thread and level:
/// creating one per 64 KiB chunk costs more than compressing it. `None` if
/// zstd failed.
fn compress_to(data: &[u8], level: i32, out: &mut [u8]) -> Option<usize> {
    thread_local! {
        static CCTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
    }
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
        }
        let (_, z) = c.as_mut()?;
        z.compress_to_buffer(data, out).ok()
    })
}

/// A cheap guess that zstd would not shrink `data`: the byte entropy of
/// every 4 KiB sample is above 7.9 bits per byte (random or already
/// compressed or encrypted data). Skipping zstd there saves most of its
/// cost on such data; the guess errs towards compressing.
pub fn looks_incompressible(data: &[u8]) -> bool {
    // a 64 KiB chunk: its start and middle; bigger chunks one sample per
    // 128 KiB (two samples of a 4 MiB chunk that alternates random and
    // text MiBs both fell on random ones, and it was stored raw)
    let samples = (data.len() >> 17).max(2);
    lifeboat_format::blob::looks_incompressible(&[data], samples)
}

/// Wrap `master` with `wrapping` key: hex(nonce | ciphertext | tag).
pub fn wrap(wrapping: &[u8; 32], master: &[u8; KEY_LEN]) -> String {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, wrapping).expect("32-byte key"));
    let nonce = random_bytes::<NONCE_LEN>();
    let mut buf = master.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(b"lifeboat master key"),
        &mut buf,
    )
    .expect("seal");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    hex::encode(out)
}

/// Inverse of [`wrap`]; `None` if the wrapping key is wrong.
pub fn unwrap(wrapping: &[u8; 32], wrapped: &str) -> Option<[u8; KEY_LEN]> {
    let raw = hex::decode(wrapped).ok()?;
    if raw.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
        return None;
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, wrapping).ok()?);
    let nonce: [u8; NONCE_LEN] = raw[..NONCE_LEN].try_into().ok()?;
    let mut buf = raw[NONCE_LEN..].to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(b"lifeboat master key"),
            &mut buf,
        )
        .ok()?;
    plain.try_into().ok()
}

/// Argon2id parameters for new password slots.
#[derive(Debug, Clone, Copy)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// OWASP's recommended minimum for Argon2id: 19 MiB, 2 passes.
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 19 * 1024,
            t_cost: 2,
            p_cost: 1,
        }
    }
}

/// Derive a wrapping key from a passphrase.
///
/// # Errors
/// Parameters Argon2 rejects (from a damaged config).
pub fn password_key(password: &[u8], salt: &[u8], p: KdfParams) -> Result<[u8; 32], StoreError> {
    // The config is read before it can be authenticated: refuse parameters
    // that would exhaust memory or never finish.
    if p.m_cost_kib > 4 << 20 || p.t_cost > 64 || p.p_cost > 64 {
        return Err(StoreError::Corrupt(format!(
            "vault config: Argon2 parameters out of range (m={} KiB, t={}, p={}): the config is damaged or forged",
            p.m_cost_kib, p.t_cost, p.p_cost
        )));
    }
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32))
        .map_err(|e| StoreError::Corrupt(format!("vault config: bad Argon2 parameters: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    a.hash_password_into(password, salt, &mut out)
        .map_err(|e| StoreError::Corrupt(format!("vault config: Argon2 failed: {e}")))?;
    Ok(out)
}

/// Derive a wrapping key from the contents of a key file.
pub fn key_file_key(contents: &[u8]) -> [u8; 32] {
    blake3::derive_key("lifeboat 2026 key file", contents.trim_ascii())
}

/// Bytes of an all-zero check, fast: compares 16-byte words.
pub fn is_zero(data: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { data.align_to::<u128>() };
    pre.iter().all(|b| *b == 0) && mid.iter().all(|w| *w == 0) && post.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k = Keys::from_master(&[1; 32], "v");
        let data = b"hello hello hello hello hello hello hello hello".repeat(100);
        let id = k.chunk_id(&data);
        let s = k.seal(BlobKind::Data, &id.0, &data, 1);
        assert!(s.len() < data.len(), "text compresses");
        assert_eq!(k.open(BlobKind::Data, &id.0, &s, "x").unwrap(), data);
        // another id, kind or key fails authentication
        assert!(matches!(
            k.open(BlobKind::Data, &[0; 32], &s, "x"),
            Err(StoreError::Decrypt(_))
        ));
        assert!(k.open(BlobKind::Index, &id.0, &s, "x").is_err());
        let other = Keys::from_master(&[2; 32], "v");
        assert!(matches!(
            other.open(BlobKind::Data, &id.0, &s, "x"),
            Err(StoreError::Decrypt(_))
        ));
        let mut t = s.clone();
        let n = t.len();
        t[n - 20] ^= 1;
        assert!(matches!(
            k.open(BlobKind::Data, &id.0, &t, "x"),
            Err(StoreError::Decrypt(_))
        ));
    }

    #[test]
    fn chunk_ids_are_keyed() {
        let a = Keys::from_master(&[1; 32], "v");
        let b = Keys::from_master(&[1; 32], "w");
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
    }

    #[test]
    fn wrapping() {
        let w = [9u8; 32];
        let m = random_bytes::<32>();
        let s = wrap(&w, &m);
        assert_eq!(unwrap(&w, &s), Some(m));
        assert_eq!(unwrap(&[8; 32], &s), None);
        assert_eq!(unwrap(&w, "zz"), None);
    }

    #[test]
    fn incompressible_guess() {
        let mut random = vec![0u8; 65536];
        getrandom::fill(&mut random).unwrap();
        assert!(looks_incompressible(&random));
        let text = b"the recovery site holds a replica of the volume ".repeat(1400);
        assert!(!looks_incompressible(&text[..65536]));
        assert!(!looks_incompressible(&[0u8; 65536]));
        // a big chunk whose start and middle are random, text between
        let mut mixed = Vec::new();
        for i in 0..4 {
            mixed.extend_from_slice(if i % 2 == 0 { &random } else { &text[..65536] });
        }
        let mixed = mixed.repeat(16); // 4 MiB: random, text, random, text…
        assert!(!looks_incompressible(&mixed));
        let mut big_random = vec![0u8; 4 << 20];
        getrandom::fill(&mut big_random).unwrap();
        assert!(looks_incompressible(&big_random));
        // random bytes are stored raw, text compressed, both round-trip
        let k = Keys::from_master(&[3; 32], "v");
        for d in [&random[..], &text[..65536]] {
            let id = k.chunk_id(d);
            let s = k.seal(BlobKind::Data, &id.0, d, 1);
            assert_eq!(k.open(BlobKind::Data, &id.0, &s, "x").unwrap(), d);
        }
    }

    #[test]
    fn seal_to_fits_the_bound_and_writes_nothing_past_it() {
        // raw data is encrypted from the source into the room (the scatter
        // path), compressed data in place; both fit sealed_bound exactly
        // and open
        let k = Keys::from_master(&[5; 32], "v");
        let mut random = vec![0u8; 65536 + 3];
        getrandom::fill(&mut random).unwrap();
        let text = b"apply the unapplied logs in sequence ".repeat(2000);
        for d in [&random[..], &random[..1], &[][..], &text[..], &text[..7]] {
            for level in [1, i32::MIN] {
                let id = k.chunk_id(d);
                let bound = sealed_bound(d.len());
                // exactly the bound is enough, and given more room (as in
                // a pack buffer) nothing past the bound is written
                let mut exact = vec![0u8; bound];
                let n = k.seal_to(BlobKind::Data, &id.0, d, level, &mut exact);
                assert!(n <= bound);
                let mut room = vec![0xA5u8; bound + 64];
                assert_eq!(k.seal_to(BlobKind::Data, &id.0, d, level, &mut room), n);
                assert!(room[bound..].iter().all(|&b| b == 0xA5));
                assert_eq!(k.open(BlobKind::Data, &id.0, &room[..n], "x").unwrap(), d);
                // tampering anywhere in it is caught, the scatter path's
                // tag included
                for at in [OUTER_HEADER_LEN, n / 2, n - 1] {
                    let mut bad = room[..n].to_vec();
                    bad[at] ^= 1;
                    assert!(k.open(BlobKind::Data, &id.0, &bad, "x").is_err());
                }
            }
        }
    }

    #[test]
    fn seal_into_appends_blobs_one_after_another() {
        // as a pack is filled: each blob appended after the last, the
        // bytes before it untouched, whatever path the payload took (zstd
        // into the buffer, raw after a failed entropy guess, too little
        // gain, compression off)
        let k = Keys::from_master(&[4; 32], "v");
        let mut random = vec![0u8; 65536];
        getrandom::fill(&mut random).unwrap();
        let text = b"every write reaches the recovery site ".repeat(2000);
        let mut half = random[..32768].to_vec();
        half.extend_from_slice(&text[..32768]);
        let mut out = b"PACKHEAD".to_vec();
        let mut at = Vec::new();
        for (d, level) in [
            (&text[..], 1),
            (&random[..], 1),
            (&half[..], 1),
            (&text[..100], 1),
            (&text[..], i32::MIN),
            (&[][..], 1),
        ] {
            let id = k.chunk_id(d);
            let start = out.len();
            let n = k.seal_into(BlobKind::Data, &id.0, d, level, &mut out);
            assert_eq!(out.len(), start + n);
            at.push((start, n, d, id));
        }
        assert_eq!(&out[..8], b"PACKHEAD");
        // opened where they lie, appended one after another
        let mut plain = b"RUN".to_vec();
        for &(start, n, d, id) in &at {
            let blob = &out[start..start + n];
            assert_eq!(k.open(BlobKind::Data, &id.0, blob, "x").unwrap(), d);
            let mut copy = blob.to_vec();
            let before = plain.len();
            let got = k
                .open_append(BlobKind::Data, &id.0, &mut copy, "x", &mut plain)
                .unwrap();
            assert_eq!(got, d.len());
            assert_eq!(&plain[before..], d);
        }
        // a damaged blob, or another chunk's id: an error, `out` unchanged
        let (start, n, _, id) = at[0];
        let len = plain.len();
        let mut bad = out[start..start + n].to_vec();
        bad[n / 2] ^= 1;
        assert!(k
            .open_append(BlobKind::Data, &id.0, &mut bad, "x", &mut plain)
            .is_err());
        let mut other = out[start..start + n].to_vec();
        assert!(k
            .open_append(BlobKind::Data, &[7; 32], &mut other, "x", &mut plain)
            .is_err());
        assert_eq!(plain.len(), len);
        // the text was compressed, the random data not
        assert!(k.seal(BlobKind::Data, &[0; 32], &text, 1).len() < text.len() / 4);
        assert!(k.seal(BlobKind::Data, &[0; 32], &random, 1).len() > random.len());
    }

    #[test]
    fn zero_check() {
        assert!(is_zero(&[0u8; 65536]));
        let mut v = vec![0u8; 65537];
        v[65536] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&v[1..65536]));
    }
}
