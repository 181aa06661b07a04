//! Pack index: decode must not panic, and what decodes re-encodes the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lifeboat_format::pack::{decode_pack_index, encode_pack_index};

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = decode_pack_index(data) {
        assert_eq!(encode_pack_index(&entries), data);
    }
});
