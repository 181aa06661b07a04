//! The pack writer shared by worker threads: each fills its own pack, and
//! what is left at the end goes out as one pack.

use std::sync::Arc;

use lifeboat_format::blob::BlobKind;
use lifeboat_store::backend::memory::MemoryBackend;
use lifeboat_store::{InitOptions, Secret, Vault};

fn vault() -> Arc<Vault> {
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

fn data(thread: u32, i: u32) -> Vec<u8> {
    // half compressible, half not, and different for every (thread, i)
    let mut x = (thread as u64) << 32 | i as u64 | 1;
    let mut d: Vec<u8> = (0..2048)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    d.extend(
        format!("thread {thread} chunk {i} ")
            .repeat(100)
            .bytes()
            .take(2048),
    );
    d
}

#[test]
fn threads_fill_their_own_packs_and_the_rest_leaves_as_one() {
    let v = vault();
    let (_lock, w) = v.begin_write().unwrap();
    let w = &w;
    let ids: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4u32)
            .map(|t| {
                s.spawn(move || {
                    (0..200u32)
                        .map(|i| {
                            let d = data(t, i);
                            let id = w.vault().keys().chunk_id(&d);
                            assert!(w.add(BlobKind::Data, id, &d).unwrap());
                            (id, d)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    // the same chunk again is not stored twice
    assert!(!w.add(BlobKind::Data, ids[0].0, &ids[0].1).unwrap());
    let stats = w.flush().unwrap();
    assert_eq!(stats.new_chunks, 800);
    // 800 chunks of 4 KiB are far from a 16 MiB pack: one pack, not four
    assert_eq!(stats.packs, 1, "{stats:?}");
    for (id, d) in &ids {
        assert_eq!(&v.read_chunk(id, "test").unwrap(), d);
    }
}
