//! The one test suite every backend must pass (run against local, memory,
//! and — from the integration tests — Azurite and an S3 emulator).

use super::Backend;

/// Exercise every operation of `b`, which must start empty.
pub fn run(b: &dyn Backend) {
    assert_eq!(b.list("").unwrap(), vec![]);
    assert!(b.get("missing").unwrap_err().is_not_found());
    assert_eq!(b.head("missing").unwrap(), None);
    b.delete("missing").unwrap();

    b.put("packs/aa/one", b"hello world").unwrap();
    b.put("packs/bb/two", &vec![7u8; 100_000]).unwrap();
    b.put("points/p1", b"m").unwrap();
    assert_eq!(b.get("packs/aa/one").unwrap(), b"hello world");
    assert_eq!(b.get_range("packs/aa/one", 6..11).unwrap(), b"world");
    assert_eq!(b.head("packs/bb/two").unwrap(), Some(100_000));

    let keys: Vec<_> = b
        .list("packs/")
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("packs/aa/one".to_string(), 11),
            ("packs/bb/two".to_string(), 100_000)
        ]
    );
    assert_eq!(b.list("points/").unwrap().len(), 1);
    assert_eq!(b.list("nothing/").unwrap().len(), 0);

    b.put("points/p1", b"replaced").unwrap();
    assert_eq!(b.get("points/p1").unwrap(), b"replaced");

    b.put_if_absent("locks/a", b"1").unwrap();
    let e = b.put_if_absent("locks/a", b"2").unwrap_err();
    assert!(
        matches!(e, super::BackendError::AlreadyExists { .. }),
        "{e}"
    );
    assert_eq!(b.get("locks/a").unwrap(), b"1");

    b.delete("packs/aa/one").unwrap();
    assert!(b.get("packs/aa/one").unwrap_err().is_not_found());
    for k in ["packs/bb/two", "points/p1", "locks/a"] {
        b.delete(k).unwrap();
    }
    assert_eq!(b.list("").unwrap(), vec![]);
}
