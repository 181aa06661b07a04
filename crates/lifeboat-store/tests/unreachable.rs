//! An unreachable object store gives a clear error in bounded time. Its own
//! test binary: it changes the process environment.

use lifeboat_store::{open_backend, Secret, Vault};

#[test]
fn unreachable_store_is_a_clear_error() {
    std::env::set_var("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
    let b = open_backend("s3://nobucket/x").unwrap();
    let t = std::time::Instant::now();
    let e = Vault::open(b, &Secret::Password(b"pw".to_vec()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("s3://nobucket/x") && e.contains("retrying may help"),
        "{e}"
    );
    assert!(t.elapsed().as_secs() < 60);
}
