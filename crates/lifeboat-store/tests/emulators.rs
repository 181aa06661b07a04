//! The backend suite and a vault round trip against real object-store
//! emulators: Azurite (Azure Blob) and moto (S3). `scripts/test` starts them
//! and sets LIFEBOAT_TEST_AZURITE / LIFEBOAT_TEST_S3; with
//! LIFEBOAT_REQUIRE_EMULATORS=1 a missing emulator fails the test instead of
//! skipping it.

use std::sync::Arc;

use lifeboat_format::blob::BlobKind;
use lifeboat_store::backend::suite;
use lifeboat_store::{open_backend, InitOptions, Secret, Vault};

fn target(var: &str, scheme: &str) -> Option<String> {
    if std::env::var(var).is_err() {
        assert!(
            std::env::var("LIFEBOAT_REQUIRE_EMULATORS").is_err(),
            "{var} is not set but LIFEBOAT_REQUIRE_EMULATORS is: start them with scripts/emulators start"
        );
        eprintln!("skipped: {var} not set (run through scripts/test)");
        return None;
    }
    let unique = hex::encode(lifeboat_store::crypto::random_bytes::<6>());
    Some(format!("{scheme}://lifeboat-test/t-{unique}"))
}

fn round_trip(url: &str) {
    let b = open_backend(url).unwrap();
    suite::run(b.as_ref());
    // a vault on it: init, write chunks through packs, reopen, read back
    let secret = Secret::Password(b"pw".to_vec());
    let opts = InitOptions {
        pack_size: 1 << 20,
        ..Default::default()
    };
    let v = Arc::new(Vault::init(b.clone(), &secret, &opts).unwrap());
    assert!(
        Vault::init(b.clone(), &secret, &opts).is_err(),
        "init must not overwrite"
    );
    let (_lock, w) = v.begin_write().unwrap();
    let mut ids = vec![];
    for i in 0..40u32 {
        let data = vec![i as u8; 65536];
        let id = v.keys().chunk_id(&data);
        w.add(BlobKind::Data, id, &data).unwrap();
        ids.push((id, data));
    }
    let st = w.flush().unwrap();
    assert_eq!(st.new_chunks, 40);
    assert!(st.packs >= 1);
    let v2 = Vault::open(b.clone(), &secret).unwrap();
    for (id, data) in &ids {
        assert_eq!(&v2.read_chunk(id, "test").unwrap(), data);
    }
    assert!(matches!(
        Vault::open(b.clone(), &Secret::Password(b"wrong".to_vec())),
        Err(lifeboat_store::StoreError::WrongSecret(_))
    ));
    for o in b.list("").unwrap() {
        b.delete(&o.key).unwrap();
    }
}

#[test]
fn azurite() {
    if let Some(url) = target("LIFEBOAT_TEST_AZURITE", "az") {
        round_trip(&url);
    }
}

#[test]
fn s3_emulator() {
    if let Some(url) = target("LIFEBOAT_TEST_S3", "s3") {
        round_trip(&url);
    }
}

#[test]
fn memory_and_local_vaults_round_trip() {
    round_trip("memory://");
    let d = tempfile::tempdir().unwrap();
    round_trip(d.path().to_str().unwrap());
}
