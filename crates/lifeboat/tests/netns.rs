//! Two sites in two network namespaces joined by a veth pair: the agent in
//! one, the server in the other, the link between them cut with `ip link
//! set down` while the workload writes, then restored. Needs root and
//! iproute2; skipped otherwise unless LIFEBOAT_REQUIRE_EMULATORS is set.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_lifeboat");

fn ip(args: &str) {
    let o = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

struct Net {
    a: String,
    b: String,
    veth_a: String,
}

impl Net {
    fn new() -> Net {
        let n = std::process::id() % 100_000;
        let net = Net {
            a: format!("lbA{n}"),
            b: format!("lbB{n}"),
            veth_a: format!("lbva{n}"),
        };
        let vb = format!("lbvb{n}");
        let sub = n % 250;
        ip(&format!("netns add {}", net.a));
        ip(&format!("netns add {}", net.b));
        ip(&format!("link add {} type veth peer name {vb}", net.veth_a));
        ip(&format!("link set {} netns {}", net.veth_a, net.a));
        ip(&format!("link set {vb} netns {}", net.b));
        ip(&format!(
            "-n {} addr add 10.77.{sub}.1/24 dev {}",
            net.a, net.veth_a
        ));
        ip(&format!("-n {} addr add 10.77.{sub}.2/24 dev {vb}", net.b));
        for ns in [&net.a, &net.b] {
            ip(&format!("-n {ns} link set lo up"));
        }
        ip(&format!("-n {} link set {} up", net.a, net.veth_a));
        ip(&format!("-n {} link set {vb} up", net.b));
        net
    }

    fn server_addr(&self) -> String {
        format!("10.77.{}.2:7443", std::process::id() % 100_000 % 250)
    }

    fn link(&self, up: bool) {
        ip(&format!(
            "-n {} link set {} {}",
            self.a,
            self.veth_a,
            if up { "up" } else { "down" }
        ));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn in_ns(dir: &Path, ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .current_dir(dir)
        .env("LIFEBOAT_PASSWORD", "pw")
        .args(["netns", "exec", ns, BIN])
        .args(args)
        .output()
        .unwrap()
}

fn spawn_in_ns(dir: &Path, ns: &str, args: &[&str], log: &str) -> Proc {
    let f = std::fs::File::create(dir.join(log)).unwrap();
    let child = Command::new("ip")
        .current_dir(dir)
        .env("LIFEBOAT_PASSWORD", "pw")
        .env("LIFEBOAT_LOG", "info")
        .args(["netns", "exec", ns, BIN])
        .args(args)
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Proc { child }
}

fn status(dir: &Path, net: &Net) -> serde_json::Value {
    let o = in_ns(
        dir,
        &net.b,
        &["status", "--api", "127.0.0.1:7480", "--json"],
    );
    if !o.status.success() {
        return serde_json::Value::Null;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["volumes"][0].clone()
}

fn converge(dir: &Path, net: &Net) -> serde_json::Value {
    common::converge(dir, &dir.join("srv/replicas/db/disk0.img"), || {
        status(dir, net)
    })
}

#[test]
fn a_cut_link_between_two_namespaces_heals_without_a_reseed() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 || !have("ip") || !have("qemu-io") {
        assert!(
            std::env::var("LIFEBOAT_REQUIRE_EMULATORS").is_err(),
            "root, iproute2 and qemu-io are required"
        );
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let net = Net::new();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(lb(dir, &["vault", "init", "vault"]));
    ok(lb(
        dir,
        &[
            "server",
            "init",
            "srv",
            "--vault",
            dir.join("vault").to_str().unwrap(),
            "--listen",
            &net.server_addr(),
            "--api",
            "127.0.0.1:7480",
            "--point-interval",
            "1h",
        ],
    ));
    let _server = spawn_in_ns(dir, &net.b, &["server", "run", "srv"], "server.log");
    let token = ok(lb(
        dir,
        &["server", "token", "create", "srv", "--site", "primary"],
    ));
    std::fs::write(dir.join("token"), token).unwrap();
    let t = Instant::now();
    loop {
        let o = in_ns(
            dir,
            &net.a,
            &[
                "agent",
                "enroll",
                "--server",
                &net.server_addr(),
                "--token-file",
                "token",
                "--state-dir",
                "agent",
                "--name",
                "web01",
                "--config",
                "agent.toml",
            ],
        );
        if o.status.success() {
            break;
        }
        // the server may still be starting in its namespace
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(lb(
        dir,
        &[
            "debug",
            "make-image",
            "--size",
            "64M",
            "--data",
            "16M",
            "src.img",
        ],
    ));
    ok(lb(
        dir,
        &[
            "protect",
            "db",
            "--volume",
            "disk0=src.img",
            "--nbd-socket",
            "db.sock",
            "--config",
            "agent.toml",
        ],
    ));
    let _agent = spawn_in_ns(
        dir,
        &net.a,
        &["agent", "run", "--config", "agent.toml"],
        "agent.log",
    );
    let before = converge(dir, &net);

    // cut the link, write 4 MiB through the export, restore the link
    net.link(false);
    let uri = format!("nbd+unix:///disk0?socket={}", dir.join("db.sock").display());
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &uri]);
    for w in scattered_writes(64, 331) {
        c.args(["-c", &w]);
    }
    assert!(c.output().unwrap().status.success());
    std::thread::sleep(Duration::from_secs(5));
    // the recovery site has not seen the writes
    assert_ne!(
        std::fs::read(dir.join("srv/replicas/db/disk0.img")).unwrap(),
        std::fs::read(dir.join("src.img")).unwrap()
    );
    net.link(true);
    let st = converge(dir, &net);
    // the same TCP stream may survive a short cut (retransmits) or be
    // replaced; either way no chunk is compared again and what travels is
    // what was written
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let reconnected = st["bytes_received"].as_u64() < before["bytes_received"].as_u64();
    let compared = if reconnected {
        n(&st, "resync_chunks_compared")
    } else {
        n(&st, "resync_chunks_compared") - n(&before, "resync_chunks_compared")
    };
    assert_eq!(compared, 0, "the journal closed the gap: {st}");
    let written = n(&st, "written_bytes") - n(&before, "written_bytes");
    assert_eq!(written, 64 * 65536);
}
