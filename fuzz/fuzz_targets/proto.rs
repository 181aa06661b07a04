//! The replication frame and batch-record decoders: bytes from the network.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lifeboat_format::proto;

fuzz_target!(|data: &[u8]| {
    if let Some(p) = data.get(..4) {
        let _ = proto::Frame::body_len(p.try_into().unwrap());
    }
    if let Ok(f) = proto::Frame::decode(data) {
        // whatever decodes must encode back to the same frame
        let e = f.encode();
        assert_eq!(proto::Frame::decode(&e[4..]).unwrap(), f);
    }
    let _ = proto::decode_records(data);
    // the borrowed decoding a server applies batches with says the same
    if let (Ok(owned), Ok(refs)) = (
        proto::decode_records(data),
        proto::decode_records_ref(data),
    ) {
        assert_eq!(owned, refs.iter().map(|r| r.to_rec()).collect::<Vec<_>>());
    }
    if let Some((_, _, payload)) = proto::Frame::batch_parts(data) {
        let _ = proto::decode_records_ref(payload);
    }
});
