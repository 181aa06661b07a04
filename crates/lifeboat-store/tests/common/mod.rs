//! Shared by the store's integration tests.

use std::sync::Arc;

use lifeboat_store::backend::memory::MemoryBackend;
use lifeboat_store::{InitOptions, Secret, Vault};

/// A fresh in-memory vault with 4 KiB chunks.
pub fn vault() -> Arc<Vault> {
    let opts = InitOptions {
        chunk_size: 4096,
        ..Default::default()
    };
    Arc::new(
        Vault::init(
            Arc::new(MemoryBackend::new()),
            &Secret::Password(b"pw".to_vec()),
            &opts,
        )
        .unwrap(),
    )
}
