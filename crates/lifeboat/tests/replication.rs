//! Two sites on one machine (loopback): `lifeboat server` at the recovery
//! site, `lifeboat agent` at the primary serving a volume over NBD, real
//! qemu-io/qemu-img/nbdinfo as the workload. Outages are made by stopping
//! processes (kill, kill -9).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn splitter_writes_reach_the_hot_replica_and_recovery_points() {
    if !have("qemu-io") || !have("nbdinfo") || !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let s = Sites::new(d.path(), "8GiB");
    // initial sync: only the data extents' chunks travel
    let st = s.converge();
    assert_eq!(st["resync_chunks_compared"], 1024, "{st}");
    assert_eq!(st["resync_bytes_received"], 16 << 20, "{st}");
    s.qemu_io(&[
        "write -P 0xab 1M 64k".into(),
        "write -P 0xcd 40M 1M".into(),
        "write -z 2M 4M".into(),
        "flush".into(),
        "write -P 0x11 63M 4k".into(),
        "discard 50M 1M".into(),
    ]);
    let st = s.converge();
    assert!(st["applied_seq"].as_u64().unwrap() >= 6, "{st}");
    assert_eq!(st["consistent"], true);
    // the export reads back through qemu-img and maps holes with nbdinfo
    let out = d.path().join("via-nbd.raw");
    ok(Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri(),
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&s.src).unwrap());
    let map = ok(Command::new("nbdinfo")
        .args(["--map", &s.uri()])
        .output()
        .unwrap());
    assert!(map.contains("hole"), "{map}");
    // a point cut now restores byte-identical to the source
    // a call that changes state needs the API token
    let (code, e) = http(&s.api, "POST", "/api/v1/items/db/points");
    assert_eq!(code, 401, "{e}");
    assert!(e["error"].as_str().unwrap().contains("api.token"), "{e}");
    let (code, cut) = s.cut();
    assert_eq!(code, 200, "{cut}");
    let id = cut["id"].as_str().unwrap().to_string();
    ok(lb(
        d.path(),
        &[
            "point",
            "restore",
            "vault",
            &id,
            "--volume",
            "disk0",
            "--to",
            "restored.img",
        ],
    ));
    assert_eq!(
        std::fs::read(d.path().join("restored.img")).unwrap(),
        std::fs::read(&s.src).unwrap()
    );
    let (_, pts) = http(&s.api, "GET", "/api/v1/points?item=db");
    assert!(
        pts.as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == id.as_str()),
        "{pts}"
    );
    // status on the CLI
    let out = ok(lb(d.path(), &["status", "--api", &s.api]));
    assert!(
        out.contains("db/disk0") && out.contains("protected"),
        "{out}"
    );
}

#[test]
fn outages_and_kill_9_converge_without_a_full_reseed() {
    let Some((_d, mut s)) = Sites::ready("8GiB") else {
        return;
    };
    // 1. the link is down (server stopped) while 4 MiB are written
    s.server.as_mut().unwrap().stop();
    s.qemu_io(&scattered_writes(64, 997));
    s.start_server();
    let st = s.converge();
    // the journal was replayed: no chunk had to be compared or resent
    assert_eq!(st["resync_chunks_compared"], 0, "{st}");
    let received = st["bytes_received"].as_u64().unwrap();
    assert!(
        received <= (64 * 65536) * 12 / 10,
        "resent {received} for 4 MiB written"
    );

    // 2. kill -9 the agent in the middle of a stream of writes
    let uri = s.uri();
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &uri]);
    for i in 0..400u64 {
        cmd.args([
            "-c",
            &format!("write -P {} {} 32k", i % 200 + 7, (i * 7919 % 2000) * 32768),
        ]);
    }
    let mut w = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    s.agent.as_mut().unwrap().kill9();
    let _ = w.wait();
    s.start_agent();
    s.converge();

    // 3. kill -9 the server in the middle of applying
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &uri]);
    for i in 0..400u64 {
        cmd.args([
            "-c",
            &format!(
                "write -P {} {} 64k",
                i % 100 + 3,
                (i * 104_729 % 1000) * 65536
            ),
        ]);
    }
    let mut w = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    s.server.as_mut().unwrap().kill9();
    let _ = w.wait();
    s.start_server();
    let st = s.converge();
    // resync was bounded: nothing like the 16 MiB of data was re-sent
    assert!(
        st["resync_bytes_received"].as_u64().unwrap() < 8 << 20,
        "{st}"
    );
}

#[test]
fn a_journal_overflow_resyncs_only_the_dirty_chunks() {
    let Some((d, mut s)) = Sites::ready("1MiB") else {
        return;
    };
    s.server.as_mut().unwrap().stop();
    // 40 scattered 64 KiB writes (2.5 MiB): more than the 1 MiB journal
    s.qemu_io(&scattered_writes(40, 13));
    std::thread::sleep(Duration::from_millis(1500));
    s.start_server();
    let st = s.converge();
    let compared = st["resync_chunks_compared"].as_u64().unwrap();
    let received = st["resync_chunks_received"].as_u64().unwrap();
    assert!(compared <= 64, "a dirty pass, not a full one: {st}");
    assert!(received <= 40, "{st}");
    let log = std::fs::read_to_string(d.path().join("agent.log")).unwrap();
    assert!(
        log.contains("dropped; resyncing from the dirty map"),
        "{log}"
    );
}

#[test]
fn no_certificate_revoked_agents_and_reused_tokens_are_refused() {
    let Some((d, mut s)) = Sites::ready("8GiB") else {
        return;
    };
    // a reused token
    let o = lb(
        d.path(),
        &[
            "agent",
            "enroll",
            "--server",
            &s.listen,
            "--token-file",
            "token",
            "--state-dir",
            "agent2",
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already used"));
    // an agent that never enrolled
    let cfg = std::fs::read_to_string(d.path().join("agent.toml"))
        .unwrap()
        .replace("state_dir = \"agent\"", "state_dir = \"agent2\"");
    std::fs::write(d.path().join("agent2.toml"), cfg).unwrap();
    let o = lb(d.path(), &["agent", "run", "--config", "agent2.toml"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not enrolled"));
    // a garbage peer on the agent port changes nothing and the server lives on
    let before = std::fs::read(s.replica()).unwrap();
    let mut g = std::net::TcpStream::connect(&s.listen).unwrap();
    let _ = g.write_all(b"GET / HTTP/1.0\r\n\r\n garbage garbage");
    drop(g);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(std::fs::read(s.replica()).unwrap(), before);
    assert_eq!(s.status()["connected"], true, "the real stream goes on");
    // revoke: the stream is closed, later writes do not reach the replica
    ok(lb(d.path(), &["server", "agent", "revoke", "srv", "web01"]));
    let t = Instant::now();
    loop {
        let st = s.status();
        if st["connected"] == false {
            break;
        }
        // frames keep flowing (status every second) so the check runs
        assert!(t.elapsed() < Duration::from_secs(20), "{st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    s.qemu_io(&["write -P 0x77 0 64k".into()]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(std::fs::read(s.replica()).unwrap(), before);
    let st = s.status();
    assert!(
        st["error"].as_str().unwrap_or("").contains("revoked"),
        "{st}"
    );
    let log = std::fs::read_to_string(d.path().join("agent.log")).unwrap();
    assert!(log.contains("revoked"), "{log}");
    s.agent.as_mut().unwrap().stop();
}

#[test]
fn a_consistency_group_is_cut_at_the_same_marker_on_every_volume() {
    let Some((d, s)) = Sites::ready("8GiB") else {
        return;
    };
    // a second volume of the same item
    ok(lb(
        d.path(),
        &[
            "debug",
            "make-image",
            "--size",
            "16M",
            "--data",
            "4M",
            "src1.img",
        ],
    ));
    ok(lb(
        d.path(),
        &[
            "protect",
            "db",
            "--volume",
            "disk1=src1.img",
            "--nbd-socket",
            "db1.sock",
            "--config",
            "agent.toml",
        ],
    ));
    let t = Instant::now();
    while !d.path().join("db1.sock").exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "disk1 not served");
        std::thread::sleep(Duration::from_millis(50));
    }
    let uri1 = format!(
        "nbd+unix:///disk1?socket={}",
        d.path().join("db1.sock").display()
    );
    let io = |uri: &str, i: u32| {
        let o = Command::new("qemu-io")
            .args(["-f", "raw", uri, "-c", &format!("write -P {i} 0 4k")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // counter i goes to disk0, then (after it is acknowledged) to disk1:
    // any consistent state has disk1 <= disk0 <= disk1 + 1
    let (api, token) = (s.api.clone(), s.api_token());
    let cutter = std::thread::spawn(move || {
        let mut ids = Vec::new();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1500));
            let (code, cut) = http_as(&api, "POST", "/api/v1/items/db/points", Some(&token));
            assert_eq!(code, 200, "{cut}");
            ids.push(cut["id"].as_str().unwrap().to_string());
        }
        ids
    });
    let uri0 = s.uri();
    let mut i = 1u32;
    while !cutter.is_finished() && i < 250 {
        io(&uri0, i);
        io(&uri1, i);
        i += 1;
    }
    let ids = cutter.join().unwrap();
    for id in &ids {
        let mut v = Vec::new();
        for vol in ["disk0", "disk1"] {
            let out = format!("{id}-{vol}.img");
            ok(lb(
                d.path(),
                &[
                    "point", "restore", "vault", id, "--volume", vol, "--to", &out,
                ],
            ));
            v.push(std::fs::read(d.path().join(&out)).unwrap()[0] as u32);
        }
        let (a, b) = (v[0], v[1]);
        assert!(
            b <= a && a <= b + 1,
            "point {id}: disk0 at {a}, disk1 at {b}"
        );
    }
    let log = std::fs::read_to_string(d.path().join("server.log")).unwrap();
    assert!(log.contains("group point"), "{log}");
}

#[test]
fn app_consistent_points_run_the_agents_hooks_around_the_cut() {
    let Some((d, s)) = Sites::ready("8GiB") else {
        return;
    };
    let set_hooks = |freeze: &str| {
        let p = d.path().join("agent.toml");
        let c = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .filter(|l| !(l.starts_with("freeze =") || l.starts_with("thaw =")))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(
                "[[item]]\nname = \"db\"\n",
                &format!("[[item]]\nname = \"db\"\nfreeze = \"{freeze}\"\nthaw = \"echo thaw >> hooks.log\"\n"),
            );
        std::fs::write(&p, c + "\n").unwrap();
        std::thread::sleep(Duration::from_millis(2500)); // the agent reloads its config
    };
    set_hooks("echo freeze >> hooks.log");
    s.qemu_io(&["write -P 0x42 4M 1M".into()]);
    let out = ok(lb(
        d.path(),
        &[
            "point",
            "cut",
            "db",
            "--app-consistent",
            "--api",
            &s.api,
            "--api-token-file",
            "srv/api.token",
            "--json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "app-consistent", "{v}");
    assert_eq!(
        std::fs::read_to_string(d.path().join("hooks.log")).unwrap(),
        "freeze\nthaw\n"
    );
    let id = v["id"].as_str().unwrap();
    let shown = ok(lb(d.path(), &["point", "show", "vault", id, "--json"]));
    assert!(
        shown.contains("app-consistent") || shown.contains("AppConsistent"),
        "{shown}"
    );
    ok(lb(
        d.path(),
        &[
            "point", "restore", "vault", id, "--volume", "disk0", "--to", "app.img",
        ],
    ));
    assert_eq!(
        std::fs::read(d.path().join("app.img")).unwrap(),
        std::fs::read(&s.src).unwrap()
    );
    // a failing freeze hook aborts the cut with its reason; replication goes on
    set_hooks("exit 3");
    let o = lb(
        d.path(),
        &[
            "point",
            "cut",
            "db",
            "--app-consistent",
            "--api",
            &s.api,
            "--api-token-file",
            "srv/api.token",
        ],
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("freeze hook"), "{e}");
    s.qemu_io(&["write -P 0x43 5M 64k".into()]);
    s.converge();
}

#[test]
fn scan_mode_ships_only_the_chunks_that_changed() {
    let d = tempfile::tempdir().unwrap();
    let vol = Vol {
        size: "64M",
        data: "16M",
        frontend: ["--scan-every", "1s"],
    };
    let s = Sites::with(d.path(), "8GiB", &vol);
    let first = s.converge();
    let received = first["resync_chunks_received"].as_u64().unwrap();
    assert_eq!(received, 256, "{first}");
    // the workload writes the image directly (no splitter in scan mode)
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&s.src)
            .unwrap();
        for (i, off) in [0u64, 20 << 20, 63 << 20].into_iter().enumerate() {
            f.write_all_at(&[i as u8 + 1; 1000], off + 100).unwrap();
        }
    }
    let st = s.converge();
    let more = st["resync_chunks_received"].as_u64().unwrap() - received;
    assert_eq!(more, 3, "only the 3 changed chunks travel: {st}");
    let out = ok(lb(
        d.path(),
        &["agent", "config", "show", "--config", "agent.toml"],
    ));
    assert!(out.contains("mode = \"scan\""), "{out}");
}

#[test]
fn a_replica_already_at_the_recovery_site_seeds_the_sync_by_hash() {
    let Some((d, mut s)) = Sites::ready("8GiB") else {
        return;
    };
    // the agent loses its journal (a rebuilt primary) and the source moves on
    // meanwhile; the recovery site still holds the old replica
    s.agent.as_mut().unwrap().stop();
    std::fs::remove_dir_all(d.path().join("agent/journals")).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&s.src)
            .unwrap();
        f.write_all_at(&[7u8; 4096], 3 << 20).unwrap();
        f.write_all_at(&[9u8; 4096], 40 << 20).unwrap();
    }
    s.start_agent();
    let st = s.converge();
    // another journal: every chunk compared by hash, only the two changed sent
    assert_eq!(st["resync_chunks_compared"], 1024, "{st}");
    assert_eq!(st["resync_chunks_received"], 2, "{st}");
}

#[test]
fn pause_holds_replication_and_resume_ships_what_was_written() {
    let Some((d, s)) = Sites::ready("8GiB") else {
        return;
    };
    ok(lb(d.path(), &["pause", "db", "--config", "agent.toml"]));
    let t = Instant::now();
    while s.status()["state"] != "paused" {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", s.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = std::fs::read(s.replica()).unwrap();
    s.qemu_io(&["write -P 0x61 8M 1M".into()]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        std::fs::read(s.replica()).unwrap(),
        before,
        "nothing ships while paused"
    );
    let out = ok(lb(d.path(), &["status", "--api", &s.api]));
    assert!(out.contains("paused"), "{out}");
    ok(lb(d.path(), &["resume", "db", "--config", "agent.toml"]));
    s.converge();
}

#[test]
fn reads_need_the_api_token_when_the_server_says_so() {
    let Some((d, mut s)) = Sites::ready("8GiB") else {
        return;
    };
    // open reads by default
    let out = ok(lb(d.path(), &["status", "--api", &s.api]));
    assert!(out.contains("db/disk0"), "{out}");
    s.server.as_mut().unwrap().stop();
    let p = d.path().join("srv/server.toml");
    let c = std::fs::read_to_string(&p).unwrap();
    assert!(
        c.contains("api_reads = \"open\""),
        "the default is written: {c}"
    );
    let c = c.replace("api_reads = \"open\"", "api_reads = \"token\"");
    std::fs::write(&p, c).unwrap();
    s.start_server();
    let shown = ok(lb(d.path(), &["server", "config", "show", "srv"]));
    assert!(shown.contains("api_reads = \"token\""), "{shown}");
    let (code, e) = http(&s.api, "GET", "/api/v1/status");
    assert_eq!(code, 401, "{e}");
    assert!(e["error"].as_str().unwrap().contains("api.token"), "{e}");
    let (code, v) = http_as(&s.api, "GET", "/api/v1/status", Some(&s.api_token()));
    assert_eq!(code, 200, "{v}");
    // the CLI: refused without the token (saying where it is), fine with it
    let o = lb(d.path(), &["status", "--api", &s.api]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("api.token"),
        "{o:?}"
    );
    let out = ok(lb(
        d.path(),
        &[
            "status",
            "--api",
            &s.api,
            "--api-token-file",
            "srv/api.token",
        ],
    ));
    assert!(out.contains("db/disk0"), "{out}");
    // a value that means nothing is refused at start
    let c = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        c.replace("api_reads = \"token\"", "api_reads = \"yes\""),
    )
    .unwrap();
    let o = lb(d.path(), &["server", "config", "show", "srv"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("api_reads"),
        "{o:?}"
    );
}

#[test]
fn a_machine_crash_compares_the_regions_the_marks_took_along() {
    if !have("qemu-io") {
        return;
    }
    // 1 GiB: 256 groups of 4 MiB, so a clean group's mark takes its region
    // of 4 groups (16 MiB) along
    let d = tempfile::tempdir().unwrap();
    let vol = Vol {
        size: "1G",
        data: "16M",
        frontend: ["--nbd-socket", "db.sock"],
    };
    let mut s = Sites::with(d.path(), "8GiB", &vol);
    s.converge();
    // 8 writes, each in a region of its own, and a ninth in another group
    // of the second's region (already marked: no mark of its own)
    let mib = 1u64 << 20;
    let mut writes: Vec<String> = (0..8u64)
        .map(|i| {
            format!(
                "write -P {} {} 64k",
                i + 1,
                i * 100 * mib + (i % 4) * 4 * mib
            )
        })
        .collect();
    writes.push(format!("write -P 77 {} 64k", 108 * mib));
    s.qemu_io(&writes);
    s.converge();
    // idle past the 5 s window, then the machine "crashes": the regions
    // are hot (the 256-group hot set holds all 32 of their groups), so
    // exactly they are compared, and the replica converges byte-identical
    std::thread::sleep(Duration::from_secs(7));
    s.machine_crash();
    let st = s.converge_consistent();
    assert_eq!(st["consistent"], true, "{st}");
    assert_eq!(st["resync_chunks_compared"], 8 * 4 * 64, "{st}");
}

#[test]
fn unprotect_disconnects_the_volumes_nbd_clients() {
    use std::io::Read;
    let Some((d, s)) = Sites::ready("8GiB") else {
        return;
    };
    // a client connected to the export, in the middle of its handshake
    let mut c = std::os::unix::net::UnixStream::connect(&s.sock).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    ok(lb(d.path(), &["unprotect", "db", "--config", "agent.toml"]));
    // the agent stops the volume: it shuts the client's connection (and
    // waits for its thread) rather than leaving it open on a closed export
    let mut b = [0u8; 1];
    match c.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection stayed open: {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(25), "{:?}", t.elapsed());
    // (the agent removes the socket as it stops the listener, which may be
    // a moment after the connection was shut)
    while s.sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(25), "the socket stays");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_clean_restart_of_the_agent_compares_nothing() {
    let Some((_d, mut s)) = Sites::ready("8GiB") else {
        return;
    };
    s.qemu_io(&scattered_writes(16, 7));
    s.converge();
    // the chunks just written stay dirty for a few seconds while running (the
    // hot set); a clean stop clears every acknowledged one
    s.agent.as_mut().unwrap().stop();
    s.start_agent();
    std::thread::sleep(Duration::from_millis(1500));
    let st = s.converge();
    assert_eq!(st["resync_chunks_compared"], 0, "{st}");
}

#[test]
fn a_machine_crash_under_the_agent_compares_only_the_dirty_chunks() {
    let Some((d, mut s)) = Sites::ready("8GiB") else {
        return;
    };
    s.converge();
    // writes in two 4 MiB groups, then the machine "crashes": the agent dies
    // and its state files say it was left running by another boot
    let jdir = d.path().join("agent/journals/db/disk0");
    s.qemu_io(&scattered_writes(16, 7));
    s.machine_crash();
    let st = s.converge();
    // the journal started over, the replica continued from the dirty map:
    // its two groups were compared, not the volume's 1,024 chunks
    let compared = st["resync_chunks_compared"].as_u64().unwrap();
    assert!(compared > 0 && compared <= 128, "{st}");
    let log = std::fs::read_to_string(d.path().join("agent.log")).unwrap();
    assert!(log.contains("starts over under a new identity"), "{log}");
    assert!(!log.contains("a full compare follows"), "{log}");
    // and replication goes on under the new journal
    s.qemu_io(&scattered_writes(8, 31));
    let st = s.converge();
    assert!(
        st["resync_chunks_compared"].as_u64().unwrap() <= 128,
        "{st}"
    );
    // a crash while idle: the groups written last are kept dirty (the hot
    // set: the 4 groups the last 8 writes touched), so they are compared,
    // and nothing else
    let crash_and_settle = |s: &mut Sites| {
        std::thread::sleep(Duration::from_secs(7));
        s.machine_crash();
        s.converge_consistent()
    };
    let st = crash_and_settle(&mut s);
    assert_eq!(st["consistent"], true, "{st}");
    assert_eq!(st["resync_chunks_compared"], 4 * 64, "{st}");
    // nothing written since that restart: its groups are cleared once
    // compared, and the next idle crash has an empty pass, which still
    // makes the replica a crash state of the new journal
    let st = crash_and_settle(&mut s);
    assert_eq!(st["consistent"], true, "{st}");
    assert_eq!(st["resync_chunks_compared"], 0, "{st}");
    assert!(
        !jdir.join("journal.follows").exists(),
        "forgotten once the pass is acknowledged"
    );
}
