//! A backend that fills up or dies mid-write: the writer fails with a clear
//! error, no point appears, and everything already in the vault stays
//! readable and verifiable.

use std::sync::Arc;

use lifeboat_format::blob::BlobKind;
use lifeboat_store::backend::fault::FaultBackend;
use lifeboat_store::backend::memory::MemoryBackend;
use lifeboat_store::verify::verify;
use lifeboat_store::{DynBackend, InitOptions, Secret, Vault};

fn add_chunks(v: &Arc<Vault>, seed: u8, n: u8) -> Result<(), lifeboat_store::StoreError> {
    let (_lock, w) = v.begin_write()?;
    for i in 0..n {
        let data = vec![seed.wrapping_mul(31).wrapping_add(i); 4096];
        let id = v.keys().chunk_id(&data);
        w.add(BlobKind::Data, id, &data)?;
    }
    w.flush().map(|_| ())
}

#[test]
fn a_full_or_dead_backend_loses_nothing_already_stored() {
    let inner: DynBackend = Arc::new(MemoryBackend::new());
    let faulty = Arc::new(FaultBackend::new(inner.clone()));
    let secret = Secret::Password(b"pw".to_vec());
    let opts = InitOptions {
        chunk_size: 4096,
        pack_size: 64 << 10,
        ..Default::default()
    };
    let v = Arc::new(Vault::init(faulty.clone(), &secret, &opts).unwrap());
    add_chunks(&v, 1, 40).unwrap();
    let stored_before = inner.list("").unwrap();

    // the disk fills up after two more objects
    faulty.fail_puts_after(2);
    let e = add_chunks(&v, 2, 40).unwrap_err().to_string();
    assert!(
        e.contains("os error 28") || e.contains("writing a pack failed"),
        "{e}"
    );
    faulty.fail_puts_after(-1);

    // the peer dies
    faulty.kill();
    let e = Vault::open(faulty.clone(), &secret)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("connection refused") && e.contains("retrying may help"),
        "{e}"
    );

    // through the healthy backend: what was there is intact, nothing damaged
    let v2 = Vault::open(inner.clone(), &secret).unwrap();
    for o in &stored_before {
        assert!(inner.get(&o.key).is_ok(), "{} survived", o.key);
    }
    let r = verify(&v2, true, |_| {}).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert!(v2.list_points().unwrap().is_empty());
}
