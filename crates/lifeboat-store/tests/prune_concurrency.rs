//! Prune while a writer runs: the writer never loses a chunk it
//! deduplicated against, and garbage goes once nobody can depend on it.

mod common;

use std::sync::Arc;

use common::vault;
use lifeboat_format::blob::BlobKind;
use lifeboat_format::index::FixedIndex;
use lifeboat_format::manifest::{Manifest, PointKind, VolumeEntry};
use lifeboat_format::{ChunkId, PointId};
use lifeboat_store::backend::memory::MemoryBackend;
use lifeboat_store::prune::{prune, RetentionPolicy};
use lifeboat_store::{InitOptions, PackWriter, Secret, Vault};

fn point(v: &Vault, w: &PackWriter, id: u64, chunks: &[ChunkId], tags: &[&str]) -> Manifest {
    let mut ix = FixedIndex::empty(v.chunk_size(), chunks.len() as u64 * v.chunk_size() as u64);
    ix.chunks.copy_from_slice(chunks);
    let index = v.store_fixed_index(w, &ix).unwrap();
    w.flush().unwrap();
    let m = Manifest {
        id: PointId::new(1_700_000_000 + id, 0),
        time: 1_700_000_000 + id,
        kind: PointKind::CrashConsistent,
        tags: tags.iter().map(|s| s.to_string()).collect(),
        parent: None,
        hostname: "t".into(),
        chunk_size: v.chunk_size(),
        journal_seq: None,
        volumes: vec![VolumeEntry {
            name: "d".parse().unwrap(),
            size: ix.size,
            data_bytes: ix.size,
            data_chunks: chunks.len() as u64,
            source: String::new(),
            index,
        }],
    };
    v.save_manifest(&m).unwrap();
    m
}

fn chunk(v: &Vault, w: &PackWriter, seed: u8) -> ChunkId {
    let data = vec![seed; v.chunk_size() as usize];
    let id = v.keys().chunk_id(&data);
    w.add(BlobKind::Data, id, &data).unwrap();
    id
}

#[test]
fn prune_defers_packs_a_running_writer_may_use() {
    let v = vault();

    // point A holds chunk x
    let (lock, w) = v.begin_write().unwrap();
    let x = chunk(&v, &w, 1);
    let a = point(&v, &w, 1, &[x], &[]);
    drop(lock);

    // writer B starts and deduplicates against x
    let (lock_b, wb) = v.begin_write().unwrap();
    assert!(wb.contains(&x), "x is usable before prune");

    // prune removes A; x's pack is condemned but B runs: deferred
    let policy = RetentionPolicy {
        keep_tags: vec!["keep".into()],
        ..Default::default()
    };
    let r = prune(&v, &policy, false).unwrap();
    assert_eq!(r.removed_points, 1);
    assert!(r.gc.delete.is_empty(), "{:?}", r.gc);
    assert!(!r.gc.deferred.is_empty());
    assert!(
        r.gc.blocked_by[0].contains("writer"),
        "{:?}",
        r.gc.blocked_by
    );
    assert!(v.read_chunk(&x, "test").is_ok(), "B's chunk survived");

    // B finishes with a point that references x without storing it again
    let y = chunk(&v, &wb, 2);
    let b = point(&v, &wb, 2, &[x, y], &["keep"]);
    assert_eq!(
        wb.stats().new_chunks,
        2,
        "x was not stored again (y and the index piece were)"
    );
    drop(lock_b);

    // next prune: B references x, so its pack is un-condemned, not deleted
    let r = prune(&v, &policy, false).unwrap();
    assert_eq!(r.removed_points, 0);
    assert!(r.gc.delete.is_empty(), "{:?}", r.gc);
    let ix = v.load_fixed_index(&b.id, &b.volumes[0]).unwrap();
    for c in &ix.chunks {
        v.read_chunk(c, "test").unwrap();
    }
    let _ = a;

    // a new writer may use x again
    let (_l, wc) = v.begin_write().unwrap();
    assert!(wc.contains(&x));
}

#[test]
fn garbage_is_deleted_at_once_when_no_writer_runs() {
    let v = vault();
    let (lock, w) = v.begin_write().unwrap();
    let x = chunk(&v, &w, 1);
    point(&v, &w, 1, &[x], &[]);
    drop(lock);
    let (lock, w) = v.begin_write().unwrap();
    let y = chunk(&v, &w, 2);
    point(&v, &w, 2, &[y], &[]);
    drop(lock);
    let r = prune(
        &v,
        &RetentionPolicy {
            keep_last: 1,
            ..Default::default()
        },
        false,
    )
    .unwrap();
    assert_eq!(r.removed_points, 1);
    assert_eq!(r.gc.delete.len(), 1);
    assert!(v.read_chunk(&x, "t").is_err());
    assert!(v.read_chunk(&y, "t").is_ok());
    assert!(
        v.backend().list("locks/").unwrap().is_empty(),
        "locks are released"
    );
}

#[test]
fn a_writer_that_finished_before_the_deletion_step_keeps_its_chunks() {
    // B used A's chunk x and finished; prune removes A: the fresh re-read
    // before deleting must see B's point and keep x.
    let v = vault();
    let (lock, w) = v.begin_write().unwrap();
    let x = chunk(&v, &w, 1);
    point(&v, &w, 1, &[x], &[]);
    drop(lock);
    let (lock_b, wb) = v.begin_write().unwrap();
    let b = point(&v, &wb, 2, &[x], &["keep"]);
    drop(lock_b);
    let r = prune(
        &v,
        &RetentionPolicy {
            keep_tags: vec!["keep".into()],
            ..Default::default()
        },
        false,
    )
    .unwrap();
    assert_eq!(r.removed_points, 1);
    let ix = v.load_fixed_index(&b.id, &b.volumes[0]).unwrap();
    for c in &ix.chunks {
        v.read_chunk(c, "test").unwrap();
    }
}

#[test]
fn deleted_packs_stay_unusable_for_a_writer_with_an_old_view() {
    let secret = Secret::Password(b"pw".to_vec());
    let backend: Arc<MemoryBackend> = Arc::new(MemoryBackend::new());
    let v = Arc::new(
        Vault::init(
            backend.clone(),
            &secret,
            &InitOptions {
                chunk_size: 4096,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let (lock, w) = v.begin_write().unwrap();
    let x = chunk(&v, &w, 1);
    point(&v, &w, 1, &[x], &[]);
    drop(lock);
    // a second process opened the vault before prune deleted x's pack
    let other = Arc::new(Vault::open(backend.clone(), &secret).unwrap());
    assert!(other.has_usable(&x));
    let r = prune(
        &v,
        &RetentionPolicy {
            keep_tags: vec!["keep".into()],
            ..Default::default()
        },
        false,
    )
    .unwrap();
    assert!(!r.gc.delete.is_empty());
    // when it starts writing it reloads, and the tombstone keeps x unusable
    let (_l, wo) = other.begin_write().unwrap();
    assert!(!wo.contains(&x));
}

#[test]
fn two_prunes_do_not_run_at_once() {
    let secret = Secret::Password(b"pw".to_vec());
    let v = Arc::new(
        Vault::init(
            Arc::new(MemoryBackend::new()),
            &secret,
            &InitOptions::default(),
        )
        .unwrap(),
    );
    let _other = v.lock(lifeboat_format::lock::LockKind::Prune).unwrap();
    let e = prune(
        &v,
        &RetentionPolicy {
            keep_last: 1,
            ..Default::default()
        },
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("another prune"), "{e}");
}
