//! Manifest: decode must not panic; a decoded manifest round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lifeboat_format::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }
});
