//! Every decoder of lifeboat-format on the same input: none may panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lifeboat_format::{blob, config, dirtymap, index, journal, lock, manifest, nbd, pack};

fuzz_target!(|data: &[u8]| {
    let _ = blob::parse_sealed(data);
    let _ = blob::parse_inner(data);
    let _ = pack::decode_pack_index(data);
    let _ = pack::pack_trailer(data);
    let _ = index::FixedIndex::decode(data);
    let _ = manifest::Manifest::decode(data);
    let _ = config::VaultConfig::decode(data);
    let _ = lock::LockRecord::decode(data);
    let _ = lock::Condemned::decode(data);
    let _ = journal::decode_segment(data);
    if let Some(h) = data.get(..journal::RECORD_HEADER_LEN) {
        let _ = journal::record_span(h.try_into().unwrap(), 1);
    }
    let _ = dirtymap::DirtyMapHeader::decode(data);
    let _ = nbd::parse_go(data);
    let _ = nbd::parse_meta_context(data);
    if let Some(h) = data.get(..nbd::REQUEST_LEN) {
        let _ = nbd::parse_request(h.try_into().unwrap());
    }
    if let Some(h) = data.get(..nbd::OPTION_HEADER_LEN) {
        let _ = nbd::parse_option_header(h.try_into().unwrap());
    }
});
