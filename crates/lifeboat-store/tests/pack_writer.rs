//! The pack writer shared by worker threads: each fills its own pack, and
//! what is left at the end goes out as one pack.

mod common;

use common::vault;
use lifeboat_format::blob::BlobKind;
use lifeboat_store::crypto::random_bytes;

fn data(thread: u32, i: u32) -> Vec<u8> {
    // half incompressible, half text, different for every (thread, i)
    let mut d = random_bytes::<2048>().to_vec();
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
    // after flush a chunk is refused, not left in a pack nobody writes
    let late = data(7, 7);
    let late_id = v.keys().chunk_id(&late);
    let e = w.add(BlobKind::Data, late_id, &late).unwrap_err();
    assert!(e.to_string().contains("already flushed"), "{e}");
    assert!(!v.has_usable(&late_id));
}

/// Chunks larger than the slack a pack buffer had before (1 MiB) fill
/// packs past their size and read back.
#[test]
fn big_chunks_fill_packs() {
    let v = vault();
    let (_lock, w) = v.begin_write().unwrap();
    let mut chunks = Vec::new();
    for i in 0..40u8 {
        // 3 MiB, half random half text: blobs around 2 MiB
        let mut d = Vec::with_capacity(3 << 20);
        while d.len() < 3 << 19 {
            d.extend_from_slice(&random_bytes::<4096>());
        }
        d.extend(
            format!("big chunk {i} ")
                .repeat(200_000)
                .bytes()
                .take(3 << 19),
        );
        let id = v.keys().chunk_id(&d);
        assert!(w.add(BlobKind::Data, id, &d).unwrap());
        chunks.push((id, d));
    }
    let stats = w.flush().unwrap();
    assert!(stats.packs >= 2, "{stats:?}");
    for (id, d) in &chunks {
        assert_eq!(&v.read_chunk(id, "test").unwrap(), d);
    }
}

/// Every blob of a pack is checked by `verify --read-data`, the copies the
/// index does not use included; a trailer that disagrees with the pack's
/// index object is named.
#[test]
fn verify_opens_every_blob_a_pack_lists() {
    use lifeboat_store::vault::{index_key, pack_key};
    use lifeboat_store::verify::verify;
    let v = vault();
    let d = data(9, 9);
    let id = v.keys().chunk_id(&d);
    // two writers at once store the same chunk: two packs hold it
    let (_l1, w1) = v.begin_write().unwrap();
    let (_l2, w2) = v.begin_write().unwrap();
    assert!(w1.add(BlobKind::Data, id, &d).unwrap());
    assert!(w2.add(BlobKind::Data, id, &d).unwrap());
    let other = data(1, 2);
    let other_id = v.keys().chunk_id(&other);
    assert!(w2.add(BlobKind::Data, other_id, &other).unwrap());
    w1.flush().unwrap();
    w2.flush().unwrap();
    let r = verify(&v, true, |_| {}).unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.blobs_read, 3);

    // damage the copy the index does not use
    let used = v.locate(&id).unwrap().pack;
    let packs: Vec<String> = v
        .backend()
        .list("packs/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(packs.len(), 2);
    let unused_key = packs
        .iter()
        .find(|k| **k != pack_key(&used))
        .unwrap()
        .clone();
    let unused: lifeboat_format::PackId = unused_key.rsplit('/').next().unwrap().parse().unwrap();
    let entry = v
        .load_pack_index(&unused)
        .unwrap()
        .into_iter()
        .find(|e| e.id == id)
        .unwrap();
    let mut raw = v.backend().get(&unused_key).unwrap();
    raw[entry.offset as usize + 40] ^= 1;
    v.backend().put(&unused_key, &raw).unwrap();
    let r = verify(&v, true, |_| {}).unwrap();
    assert!(!r.ok());
    assert!(
        r.problems
            .iter()
            .any(|p| p.object.as_deref() == Some(unused_key.as_str())
                && p.message
                    .contains("a copy of a chunk the index does not use")),
        "{r:?}"
    );
    raw[entry.offset as usize + 40] ^= 1;
    v.backend().put(&unused_key, &raw).unwrap();
    assert!(verify(&v, true, |_| {}).unwrap().ok());

    // an index object that lists less than the pack's trailer
    let two = v.locate(&other_id).unwrap().pack;
    let mut entries = v.load_pack_index(&two).unwrap();
    assert_eq!(entries.len(), 2);
    entries.retain(|e| e.id != id);
    let plain = lifeboat_format::pack::encode_pack_index(&entries);
    let sealed = v.keys().seal(BlobKind::PackIndex, &two.0, &plain, 1);
    v.backend().put(&index_key(&two), &sealed).unwrap();
    let r = verify(&v, true, |_| {}).unwrap();
    let two_key = pack_key(&two);
    assert!(
        r.problems
            .iter()
            .any(|p| p.object.as_deref() == Some(two_key.as_str())
                && p.message.contains("trailer and its index object differ")),
        "{r:?}"
    );

    // bytes between the last blob and the trailer that no blob holds
    use lifeboat_format::pack::{pack_tail, pack_trailer, PACK_TAIL_LEN};
    let raw = v.backend().get(&two_key).unwrap();
    let trailer = pack_trailer(&raw).unwrap().to_vec();
    let at = raw.len() - PACK_TAIL_LEN - trailer.len();
    let mut padded = raw[..at].to_vec();
    padded.extend_from_slice(&[0x55; 100]);
    padded.extend_from_slice(&trailer);
    padded.extend_from_slice(&pack_tail(trailer.len() as u32));
    v.backend().put(&two_key, &padded).unwrap();
    v.backend().put(&index_key(&two), &trailer).unwrap();
    let r = verify(&v, true, |_| {}).unwrap();
    let gap = format!("bytes {at}..{} of the pack are in no blob", at + 100);
    assert!(
        r.problems
            .iter()
            .any(|p| p.object.as_deref() == Some(two_key.as_str()) && p.message.contains(&gap)),
        "{r:?}"
    );
    // its blobs still read: only the pack is named
    assert_eq!(v.read_chunk(&other_id, "test").unwrap(), other);
}
