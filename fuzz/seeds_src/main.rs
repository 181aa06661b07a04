//! Writes valid encodings of every format into fuzz/corpus/<target>/, so the
//! fuzzers start past the magics and checksums and mutate real structure.
use lifeboat_format::blob::{inner_header, sealed_header, BlobKind, Compression};
use lifeboat_format::index::FixedIndex;
use lifeboat_format::manifest::{Manifest, PointKind, VolumeEntry};
use lifeboat_format::pack::{encode_pack_index, PackEntry};
use lifeboat_format::{ChunkId, PointId};
use std::path::Path;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let entries: Vec<PackEntry> = (0..3u8)
        .map(|i| PackEntry { id: ChunkId([i; 32]), kind: BlobKind::Data, offset: 8 + 100 * i as u64, len: 100, raw_len: 65536 })
        .collect();
    let pidx = encode_pack_index(&entries);
    let mut ix = FixedIndex::empty(4096, 5 * 4096 + 17);
    ix.chunks[1] = ChunkId([9; 32]);
    let fidx = ix.encode();
    let m = Manifest {
        id: PointId::new(1_700_000_000, 7),
        time: 1_700_000_000,
        kind: PointKind::AppConsistent,
        tags: vec!["seed".into()],
        parent: Some(PointId::new(1_600_000_000, 1)),
        hostname: "h".into(),
        chunk_size: 65536,
        journal_seq: Some(42),
        volumes: vec![VolumeEntry {
            name: "disk0".parse().unwrap(),
            size: 1 << 20,
            data_bytes: 4096,
            data_chunks: 1,
            source: "/dev/x".into(),
            index: vec![ChunkId([1; 32])],
        }],
    };
    let man = m.encode();
    let mut blob = sealed_header(BlobKind::Data, &[3; 12]).to_vec();
    blob.extend_from_slice(&inner_header(Compression::Zstd, 65536));
    blob.extend_from_slice(&[0u8; 40]);
    put("pack_index", "valid", &pidx);
    put("fixed_index", "valid", &fidx);
    put("manifest", "valid", &man);
    for (n, b) in [("pack_index", &pidx), ("fixed_index", &fidx), ("manifest", &man), ("blob", &blob)] {
        put("decoders", n, b);
    }
    let mut seg = lifeboat_format::journal::encode_segment_header(1).to_vec();
    seg.extend_from_slice(&lifeboat_format::journal::encode_record_header(lifeboat_format::journal::RecordKind::Write, 1, 4096, 4, b"abcd"));
    seg.extend_from_slice(b"abcd");
    put("decoders", "journal", &seg);
    println!("seeds written");
    // replication frames (without the length prefix, as the decoder sees them)
    use lifeboat_format::proto::{self, Frame, Rec, RecKind};
    let recs = vec![Rec { kind: RecKind::Write, seq: 1, offset: 0, len: 4, data: b"abcd".to_vec() }, Rec { kind: RecKind::Barrier, seq: 2, offset: 0, len: 0, data: vec![] }];
    let payload = proto::encode_records(&recs);
    put("proto", "records", &payload);
    let frames = [
        Frame::Hello { version: proto::PROTO_VERSION, item: "db".into(), volume: "disk0".into(), size: 1 << 20, chunk_size: 65536, journal_id: [3; 16], durable: 9, follows: Some(([4; 16], 7)) },
        Frame::Batch { codec: 0, raw_len: payload.len() as u32, payload },
        Frame::Hashes { chunks: vec![(1, [5; 32]), (4, proto::ZERO_HASH)] },
        Frame::Status(proto::Health { state: proto::VolumeState::Protected, rpo_ms: 1, lag_bytes: 2, journal_bytes: 3, sent_bytes: 4, resync_bytes: 5, written_bytes: 6, pass_total_bytes: 7, pass_done_bytes: 8, pass_eta_ms: 9 }),
        Frame::Error { code: 1, message: "x".into() },
    ];
    for (i, f) in frames.iter().enumerate() {
        put("proto", &format!("frame{i}"), &f.encode()[4..]);
    }
}
