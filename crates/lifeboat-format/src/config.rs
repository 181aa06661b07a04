//! The vault config: the one plaintext object of a vault (`config`).
//!
//! Layout: `CONFIG_V1 | version u32 | len u32 | JSON body | blake3(body)`.
//! It holds the parameters every writer must agree on and the wrapped master
//! key. Its integrity against tampering is checked with `mac`, a keyed hash
//! under a key derived from the master key, verified after unwrapping.

use serde::{Deserialize, Serialize};

use crate::magic::CONFIG_V1;
use crate::wire::{decode_framed, encode_framed};
use crate::FormatError;

pub const CONFIG_VERSION: u32 = 1;

/// How the master key is wrapped in one key slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KeySlot {
    /// Wrapping key = Argon2id(passphrase, salt).
    Password {
        salt: String,
        m_cost_kib: u32,
        t_cost: u32,
        p_cost: u32,
        /// hex(nonce | AES-256-GCM(master key) | tag)
        wrapped: String,
    },
    /// Wrapping key = BLAKE3 derive_key over the contents of a key file.
    KeyFile { wrapped: String },
}

/// Parameters of a vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Random id of this vault (hex), also mixed into key derivation.
    pub vault_id: String,
    pub created: u64,
    pub chunk_size: u32,
    /// zstd level used by writers.
    pub compression_level: i32,
    /// Target size of a pack in bytes.
    pub pack_size: u32,
    pub key_slots: Vec<KeySlot>,
    /// hex keyed-BLAKE3 of the config with `mac` empty.
    #[serde(default)]
    pub mac: String,
}

impl VaultConfig {
    pub fn encode(&self) -> Vec<u8> {
        encode_framed(&CONFIG_V1, CONFIG_VERSION, &self.body())
    }

    /// The JSON body, as hashed for [`VaultConfig::mac`] when `mac` is empty.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("config serializes")
    }

    /// # Errors
    /// Bad magic, newer version, checksum mismatch or malformed body.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (_v, body) = decode_framed("vault config", &CONFIG_V1, CONFIG_VERSION, bytes)?;
        let c: VaultConfig = serde_json::from_slice(body)
            .map_err(|e| FormatError::malformed("vault config", e.to_string()))?;
        crate::index::check_chunk_size(c.chunk_size)
            .map_err(|e| FormatError::malformed("vault config", e.to_string()))?;
        if c.key_slots.is_empty() {
            return Err(FormatError::malformed("vault config", "no key slots"));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let c = VaultConfig {
            vault_id: "ab".into(),
            created: 1,
            chunk_size: 65536,
            compression_level: 1,
            pack_size: 16 << 20,
            key_slots: vec![KeySlot::KeyFile {
                wrapped: "00".into(),
            }],
            mac: String::new(),
        };
        assert_eq!(VaultConfig::decode(&c.encode()).unwrap(), c);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = VaultConfig::decode(&bytes);
        }
    }
}
