//! Fixed index: decode must not panic, and what decodes re-encodes the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lifeboat_format::index::FixedIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(ix) = FixedIndex::decode(data) {
        assert_eq!(ix.encode(), data);
    }
});
