//! The NBD export against the real clients users meet: qemu-io, qemu-img,
//! nbdinfo and nbdcopy (installed by scripts/setup-test-deps).

mod common;

use common::have;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lifeboat");

struct Server {
    child: Child,
    uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(img: &Path, sock: &Path, extra: &[&str]) -> Server {
    let child = Command::new(BIN)
        .args([
            "nbd",
            "serve",
            img.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ])
        .args(extra)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        uri: format!("nbd+unix:///disk0?socket={}", sock.display()),
    }
}

fn run(cmd: &str, args: &[&str]) -> Output {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    let o = Command::new(BIN)
        .args([
            "debug",
            "make-image",
            p.to_str().unwrap(),
            "--size",
            "64MiB",
            "--data",
            "8MiB",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    p
}

#[test]
fn qemu_io_writes_and_reads_patterns_through_the_export() {
    if !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let s = serve(&img, &d.path().join("s"), &[]);
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -z 3M 128k",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 1M 64k",
            "-c",
            "read -P 0 3M 128k",
            &s.uri,
        ],
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"));
    drop(s);
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 0xab),
        "the write reached the volume"
    );
    assert!(bytes[3 << 20..(3 << 20) + 131072].iter().all(|b| *b == 0));
}

#[test]
fn qemu_img_and_nbdcopy_read_the_whole_export() {
    if !have("qemu-img") || !have("nbdcopy") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let s = serve(&img, &d.path().join("s"), &["--read-only"]);
    let info = run("qemu-img", &["info", "--output=json", &s.uri]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"], 64 << 20);
    let out = d.path().join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri,
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    let out2 = d.path().join("out2.raw");
    std::fs::File::create(&out2)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run("nbdcopy", &[&s.uri, out2.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out2).unwrap(), std::fs::read(&img).unwrap());
    // read-only: writes are refused
    if have("qemu-io") {
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k", &s.uri])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !o.status.success() || text.contains("ermission") || text.contains("ead-only"),
            "{text}"
        );
    }
}

#[test]
fn nbdinfo_map_reports_holes_and_data() {
    if !have("nbdinfo") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("sparse.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(16 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 1 << 20], 4 << 20).unwrap();
    f.sync_all().unwrap();
    let s = serve(&img, &d.path().join("s"), &[]);
    let o = run("nbdinfo", &["--map", "--json", &s.uri]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let map: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        map,
        vec![
            (0, 4 << 20, 3),
            (4 << 20, 1 << 20, 0),
            (5 << 20, 11 << 20, 3)
        ],
        "{o:?}"
    );
}

#[test]
fn garbage_from_a_client_is_refused_and_changes_nothing() {
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let before = std::fs::read(&img).unwrap();
    let sock = d.path().join("s");
    let _s = serve(&img, &sock, &[]);
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c.write_all(b"this is not an nbd option header at all")
        .unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest); // the server hangs up
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn the_journal_captures_every_write_in_order_and_replays_to_the_same_volume() {
    if !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path());
    let before = d.path().join("before.raw");
    std::fs::copy(&img, &before).unwrap();
    let journal = d.path().join("journal");
    let sock = d.path().join("s");
    let jarg = ["--journal", journal.to_str().unwrap()];
    {
        let s = serve(&img, &sock, &jarg);
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x11 0 4k",
                "-c",
                "write -P 0x22 2M 64k",
                "-c",
                "write -P 0x33 2M 4k",
                "-c",
                "write -z 5M 8k",
                "-c",
                "flush",
                &s.uri,
            ],
        );
    }
    let stats = Command::new(BIN)
        .args(["debug", "journal", journal.to_str().unwrap()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(v["writes"], 3, "{v}");
    assert_eq!(v["zeroes"], 1, "{v}");
    assert!(v["barriers"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["first_seq"], 1);

    // a second session continues the sequence
    {
        let s = serve(&img, &sock, &jarg);
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x44 7M 512",
                "-c",
                "flush",
                &s.uri,
            ],
        );
    }
    // replaying the journal onto the volume as it was gives the volume as it is
    let o = Command::new(BIN)
        .args([
            "debug",
            "journal",
            journal.to_str().unwrap(),
            "--replay-onto",
            before.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["writes"], 4, "{v}");
    // chunks 0, 32 (two writes), 80 (zeroes) and 112 of 64 KiB were
    // written: each marks its 4 MiB group (chunks 0-63 and 64-127)
    assert_eq!(v["dirty_ranges"], 1, "{v}");
    assert_eq!(v["dirty_bytes"], 128 * 65536, "{v}");
    assert_eq!(
        v["last_seq"].as_u64().unwrap(),
        v["records"].as_u64().unwrap(),
        "no gaps: {v}"
    );
    assert_eq!(
        std::fs::read(&before).unwrap(),
        std::fs::read(&img).unwrap()
    );
}
