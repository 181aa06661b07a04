//! PostgreSQL as the protected workload: ext4 on the loop-mounted FUSE
//! export of a replicated volume, pgbench running, the link cut for 30 s
//! (the server stopped) and restored. Replication must converge by
//! replaying the journal (bytes resent ≈ bytes written meanwhile, no full
//! re-seed), and a recovery point cut during the run must restore at the
//! recovery site to a file system that passes fsck and a database that
//! starts, recovers and passes pg_amcheck.
//!
//! Needs root (loop devices, mount), /dev/fuse and PostgreSQL; skipped
//! otherwise unless LIFEBOAT_REQUIRE_EMULATORS is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn pg_bin(tool: &str) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(tool)))
        .filter(|p| p.exists())
        .collect();
    v.sort();
    v.pop()
}

fn able() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root
        && Path::new("/dev/fuse").exists()
        && pg_bin("initdb").is_some()
        && have("losetup")
        && have("mkfs.ext4")
        && have("runuser");
    if !ok {
        assert!(
            std::env::var("LIFEBOAT_REQUIRE_EMULATORS").is_err(),
            "root, /dev/fuse, PostgreSQL, losetup, mkfs.ext4 and runuser are required (scripts/setup-test-deps)"
        );
        eprintln!("skipped: needs root, FUSE, loop devices and PostgreSQL");
    }
    ok
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn as_pg(cmd: &str) -> String {
    sh(&format!("runuser -u postgres -- sh -c '{cmd}'"))
}

/// A mounted file system on a loop device over `image`; cleaned up on drop.
struct Mount {
    dev: String,
    dir: PathBuf,
    pg: Option<(PathBuf, String)>,
}

impl Mount {
    fn new(image: &Path, dir: &Path, mkfs: bool) -> Mount {
        let dev = sh(&format!("losetup -f --show {}", image.display()));
        if mkfs {
            sh(&format!("mkfs.ext4 -q -E nodiscard {dev}"));
        }
        std::fs::create_dir_all(dir).unwrap();
        sh(&format!("mount {dev} {}", dir.display()));
        Mount {
            dev,
            dir: dir.to_path_buf(),
            pg: None,
        }
    }

    fn start_pg(&mut self, port: u16) {
        let data = self.dir.join("pgdata");
        let ctl = pg_bin("pg_ctl").unwrap();
        as_pg(&format!(
            "{} -D {} -l {}/pg.log -w -t 120 -o \"-p {port} -k /tmp -c listen_addresses=\" start",
            ctl.display(),
            data.display(),
            data.display()
        ));
        self.pg = Some((data, port.to_string()));
    }

    fn stop_pg(&mut self) {
        if let Some((data, _)) = self.pg.take() {
            let ctl = pg_bin("pg_ctl").unwrap();
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(ctl)
                .args(["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"])
                .output();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop_pg();
        let _ = Command::new("umount").arg(&self.dir).output();
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

fn pgbench(port: u16, args: &str) -> Child {
    Command::new("runuser")
        .args(["-u", "postgres", "--", "pgbench", "-h", "/tmp", "-p"])
        .arg(port.to_string())
        .args(args.split_whitespace())
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn postgres_on_a_fuse_export_survives_a_30s_link_cut_and_restores_at_the_recovery_site() {
    if !able() {
        return;
    }
    let outage: u64 = std::env::var("LIFEBOAT_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let d = tempfile::tempdir().unwrap();
    sh(&format!("chmod 755 {}", d.path().display()));
    let vol = Vol {
        size: "2G",
        data: "0",
        frontend: ["--fuse-mount", "mnt"],
    };
    let mut s = Sites::with(d.path(), "8GiB", &vol);
    s.converge();
    let mut fs = Mount::new(&d.path().join("mnt/disk0"), &d.path().join("fs"), true);
    sh(&format!(
        "mkdir {0}/pgdata && chown postgres {0}/pgdata",
        fs.dir.display()
    ));
    let initdb = pg_bin("initdb").unwrap();
    as_pg(&format!(
        "{} -D {}/pgdata -A trust --data-checksums >/dev/null",
        initdb.display(),
        fs.dir.display()
    ));
    let port = 25432;
    fs.start_pg(port);
    let o = pgbench(port, "-i -s 10 -q").wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // pgbench runs while the link is cut and restored
    let bench = pgbench(port, &format!("-c 2 -T {} -n", outage + 25));
    std::thread::sleep(Duration::from_secs(5));
    let before = s.status();
    s.server.as_mut().unwrap().stop();
    let cut_at = Instant::now();
    std::thread::sleep(Duration::from_secs(outage));
    s.start_server();
    // caught up while pgbench still writes: the lag drains
    let t = Instant::now();
    let caught_up = loop {
        let st = s.status();
        if st["state"] == "protected" && st["lag_bytes"] == 0 && st["rpo_ms"].as_u64() < Some(2000)
        {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{st}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // bytes resent against bytes written since the cut
    let written =
        caught_up["written_bytes"].as_u64().unwrap() - before["written_bytes"].as_u64().unwrap();
    let resent = caught_up["bytes_received"].as_u64().unwrap();
    eprintln!(
        "outage {:.0} s: written {written} bytes, resent {resent} bytes, resync chunks {}",
        cut_at.elapsed().as_secs_f64(),
        caught_up["resync_chunks_compared"]
    );
    assert_eq!(
        caught_up["resync_chunks_compared"], 0,
        "no re-seed: {caught_up}"
    );
    assert!(
        resent as f64 <= written as f64 * 1.2 + (1 << 20) as f64,
        "resent {resent} for {written} written"
    );
    // a crash-consistent point in the middle of the run
    let (code, cut) = s.cut();
    assert_eq!(code, 200, "{cut}");
    let id = cut["id"].as_str().unwrap().to_string();
    let o = bench.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // the primary's final state reaches the hot replica
    fs.stop_pg();
    drop(fs);
    s.converge();

    // the recovery site: restore the point, fsck, start PostgreSQL, amcheck
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
            "recovered.img",
        ],
    ));
    let img = d.path().join("recovered.img");
    let o = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(&img)
        .output()
        .unwrap();
    // 0: clean; 1: errors corrected (journal replay of a crash state)
    assert!(
        matches!(o.status.code(), Some(0) | Some(1)),
        "fsck: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    sh(&format!("e2fsck -fn {}", img.display()));
    let mut rec = Mount::new(&img, &d.path().join("recovered"), false);
    let _ = std::fs::remove_file(rec.dir.join("pgdata/postmaster.pid"));
    rec.start_pg(port + 1);
    let n = sh(&format!(
        "runuser -u postgres -- psql -h /tmp -p {} -Atc 'select count(*) from pgbench_accounts' postgres",
        port + 1
    ));
    assert_eq!(n, "1000000");
    let amcheck = pg_bin("pg_amcheck").unwrap();
    sh(&format!(
        "runuser -u postgres -- {} -h /tmp -p {} --install-missing --heapallindexed postgres",
        amcheck.display(),
        port + 1
    ));
    let log = std::fs::read_to_string(rec.dir.join("pgdata/pg.log")).unwrap_or_default();
    assert!(
        log.contains("redo") || log.contains("recover"),
        "PostgreSQL did not recover a crash state: {log}"
    );
}
