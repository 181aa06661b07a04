//! End-to-end tests of the `lifeboat` binary on temporary directories.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lifeboat");

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }
    fn vault(&self) -> String {
        self.p("vault").display().to_string()
    }
    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("LIFEBOAT_PASSWORD", "correct horse")
            .env("LIFEBOAT_STATE_DIR", self.p("state"))
            .output()
            .unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "lifeboat {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
    fn fail(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "lifeboat {args:?} should fail");
        String::from_utf8(o.stderr).unwrap()
    }
    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }
    fn image(&self, name: &str, size: &str, data: &str, seed: u64) -> PathBuf {
        let p = self.p(name);
        self.ok(&[
            "debug",
            "make-image",
            p.to_str().unwrap(),
            "--size",
            size,
            "--data",
            data,
            "--seed",
            &seed.to_string(),
        ]);
        p
    }
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn point_cycle_create_list_show_diff_restore() {
    let e = Env::new();
    let v = e.vault();
    e.ok(&["vault", "init", &v]);
    let img = e.image("disk.raw", "64MiB", "16MiB", 1);
    let logs = e.image("logs.raw", "8MiB", "2MiB", 3);
    let c1 = e.json(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("disk0={}", img.display()),
        "--volume",
        &format!("logs={}", logs.display()),
        "--tag",
        "first",
        "--json",
    ]);
    let p1 = c1["point"]["id"].as_str().unwrap().to_string();
    assert_eq!(c1["point"]["data_bytes"], 18 << 20);
    std::fs::copy(&img, e.p("disk-at-p1.raw")).unwrap();

    e.ok(&["debug", "mutate", img.to_str().unwrap(), "--percent", "1"]);
    let c2 = e.json(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("disk0={}", img.display()),
        "--volume",
        &format!("logs={}", logs.display()),
        "--json",
    ]);
    let p2 = c2["point"]["id"].as_str().unwrap().to_string();
    // the 1 % change (~640 KiB) must not store anywhere near the whole volume
    let stored = c2["point"]["stored"]["new_stored_bytes"].as_u64().unwrap();
    assert!(stored > 0 && stored < (3 * 700) << 10, "stored {stored}");

    let list = e.json(&["point", "list", &v, "--json"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    for k in ["id", "time", "kind", "tags", "volumes"] {
        assert!(list[0].get(k).is_some(), "point list --json lacks {k}");
    }
    assert_eq!(list[0]["id"], p1.as_str());
    assert_eq!(list[0]["tags"][0], "first");
    assert_eq!(list[0]["kind"], "crash-consistent");
    assert_eq!(list[0]["volumes"].as_array().unwrap().len(), 2);

    let show = e.json(&["point", "show", &v, &p2[..13], "--json"]);
    assert_eq!(show["parent"], p1.as_str());
    assert!(e.ok(&["point", "show", &v, "latest"]).contains(&p2));

    let d = e.json(&["point", "diff", &v, &p1, &p2, "--json"]);
    let vols = d["volumes"].as_array().unwrap();
    let disk = vols.iter().find(|x| x["volume"] == "disk0").unwrap();
    let logsd = vols.iter().find(|x| x["volume"] == "logs").unwrap();
    assert_eq!(disk["status"], "changed");
    assert!(disk["changed_bytes"].as_u64().unwrap() >= 640 << 10);
    assert_eq!(logsd["status"], "same");

    let out1 = e.p("r1.raw");
    e.ok(&[
        "point",
        "restore",
        &v,
        &p1,
        "--volume",
        "disk0",
        "--to",
        out1.to_str().unwrap(),
        "--verify",
    ]);
    assert!(same(&out1, &e.p("disk-at-p1.raw")));
    let out2 = e.p("r2.raw");
    e.ok(&[
        "point",
        "restore",
        &v,
        "latest",
        "--volume",
        "disk0",
        "--to",
        out2.to_str().unwrap(),
    ]);
    assert!(same(&out2, &img));
    // restored files are sparse: far fewer blocks than the nominal size
    let md = std::fs::metadata(&out2).unwrap();
    assert!(
        md.blocks() * 512 < md.len() / 2,
        "restore is not sparse: {} of {}",
        md.blocks() * 512,
        md.len()
    );
    let out3 = e.p("r3.raw");
    e.ok(&[
        "point",
        "restore",
        &v,
        "latest",
        "--volume",
        "logs",
        "--to",
        out3.to_str().unwrap(),
    ]);
    assert!(same(&out3, &logs));

    let err = e.fail(&[
        "point",
        "restore",
        &v,
        "latest",
        "--volume",
        "nope",
        "--to",
        e.p("x").to_str().unwrap(),
    ]);
    assert!(
        err.contains("has no volume \"nope\"") && err.contains("disk0"),
        "{err}"
    );
    assert!(e
        .ok(&["vault", "verify", &v, "--read-data"])
        .contains("no problems found"));
}

#[test]
fn wrong_password_and_missing_secret_are_refused() {
    let e = Env::new();
    let v = e.vault();
    e.ok(&["vault", "init", &v]);
    let o = Command::new(BIN)
        .args(["point", "list", &v])
        .env("LIFEBOAT_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("wrong password or key file"));
    let o = Command::new(BIN)
        .args(["point", "list", &v])
        .env_remove("LIFEBOAT_PASSWORD")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("set LIFEBOAT_PASSWORD"));
    let err = e.fail(&["vault", "init", &v]);
    assert!(err.contains("already exists"), "{err}");
    let err = e.fail(&["point", "list", e.p("nothing").to_str().unwrap()]);
    assert!(err.contains("no vault at"), "{err}");
}

#[test]
fn key_file_and_password_file_unlock() {
    let e = Env::new();
    let v = e.vault();
    std::fs::write(e.p("key"), "0123456789abcdef0123456789abcdef").unwrap();
    let k = e.p("key");
    e.ok(&["vault", "init", &v, "--key-file", k.to_str().unwrap()]);
    e.ok(&["point", "list", &v, "--key-file", k.to_str().unwrap()]);
    std::fs::write(e.p("other"), "ffffffffffffffffffffffffffffffff").unwrap();
    let err = e.fail(&[
        "point",
        "list",
        &v,
        "--key-file",
        e.p("other").to_str().unwrap(),
    ]);
    assert!(err.contains("wrong password or key file"), "{err}");
    let v2 = e.p("v2").display().to_string();
    std::fs::write(e.p("pw"), "from a file\n").unwrap();
    let o = Command::new(BIN)
        .args([
            "vault",
            "init",
            &v2,
            "--password-file",
            e.p("pw").to_str().unwrap(),
        ])
        .env_remove("LIFEBOAT_PASSWORD")
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = Command::new(BIN)
        .args(["point", "list", &v2])
        .env("LIFEBOAT_PASSWORD", "from a file")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn pack_files(v: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for d in std::fs::read_dir(v.join("packs")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

#[test]
fn corrupt_chunk_is_named_and_restore_leaves_destination_alone() {
    let e = Env::new();
    let v = e.vault();
    e.ok(&["vault", "init", &v]);
    let img = e.image("disk.raw", "32MiB", "8MiB", 5);
    let c = e.json(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("disk0={}", img.display()),
        "--json",
    ]);
    let id = c["point"]["id"].as_str().unwrap().to_string();
    // flip one byte in the middle of the biggest pack
    let packs = pack_files(Path::new(&v));
    let big = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(big).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    // and one in its trailer (the sealed index at the end of the pack)
    let end = bytes.len() - 40;
    bytes[end] ^= 0x55;
    std::fs::write(big, &bytes).unwrap();

    // the cheap check does not read data; --read-data finds the damage
    let o = e.run(&["vault", "verify", &v, "--read-data"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("DAMAGED: point {id} volume disk0 offset")),
        "{out}"
    );
    assert!(out.contains("pack trailer: authentication failed"), "{out}");

    let dst = e.p("restored.raw");
    std::fs::write(&dst, b"previous").unwrap();
    let err = e.fail(&[
        "point",
        "restore",
        &v,
        &id,
        "--volume",
        "disk0",
        "--to",
        dst.to_str().unwrap(),
    ]);
    assert!(
        err.contains("authentication failed") || err.contains("damaged"),
        "{err}"
    );
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous");
    let names: Vec<_> = std::fs::read_dir(e.dir.path())
        .unwrap()
        .map(|x| x.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("lifeboat-restore")),
        "temporary file left: {names:?}"
    );

    // a missing pack is named too
    std::fs::remove_file(big).unwrap();
    let o = e.run(&["vault", "verify", &v]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("DAMAGED: point {id} volume disk0"))
            && (out.contains("gone") || out.contains("missing")),
        "{out}"
    );
}

#[test]
fn damaged_manifest_and_newer_config_are_clear_errors() {
    let e = Env::new();
    let v = e.vault();
    e.ok(&["vault", "init", &v]);
    let img = e.image("disk.raw", "8MiB", "2MiB", 5);
    let c = e.json(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("disk0={}", img.display()),
        "--json",
    ]);
    let id = c["point"]["id"].as_str().unwrap().to_string();
    let m = Path::new(&v).join("points").join(&id);
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&m, &bytes[..bytes.len() / 2]).unwrap();
    let err = e.fail(&["point", "show", &v, &id]);
    assert!(
        err.contains(&id) && (err.contains("authentication failed") || err.contains("truncated")),
        "{err}"
    );
    let o = e.run(&["vault", "verify", &v]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("DAMAGED: point {id}")));

    let cfg = Path::new(&v).join("config");
    let mut c = std::fs::read(&cfg).unwrap();
    c[8] = 7; // version field
    std::fs::write(&cfg, &c).unwrap();
    let err = e.fail(&["point", "list", &v]);
    assert!(
        err.contains("newer than this Lifeboat understands"),
        "{err}"
    );
}

#[test]
fn prune_plans_then_removes_and_keeps_the_rest_restorable() {
    let e = Env::new();
    let v = e.vault();
    e.ok(&["vault", "init", &v]);
    let img = e.image("disk.raw", "16MiB", "4MiB", 1);
    let mut ids = vec![];
    for seed in 0..3 {
        // each point gets unique data of its own
        e.image("disk.raw", "16MiB", "4MiB", 10 + seed);
        let c = e.json(&[
            "point",
            "create",
            &v,
            "--volume",
            &format!("disk0={}", img.display()),
            "--json",
        ]);
        ids.push(c["point"]["id"].as_str().unwrap().to_string());
        std::thread::sleep(std::time::Duration::from_millis(1100)); // distinct ids by time
    }
    let before: u64 = pack_files(Path::new(&v))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let plan = e.json(&[
        "vault",
        "prune",
        &v,
        "--keep-last",
        "1",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(plan["removed_points"], 2);
    assert_eq!(
        e.json(&["point", "list", &v, "--json"])
            .as_array()
            .unwrap()
            .len(),
        3,
        "dry run changed nothing"
    );
    let err = e.fail(&["vault", "prune", &v]);
    assert!(err.contains("no retention rule"), "{err}");

    let r = e.json(&["vault", "prune", &v, "--keep-last", "1", "--json"]);
    assert_eq!(r["removed_points"], 2);
    let after: u64 = pack_files(Path::new(&v))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        after < before / 2,
        "garbage not collected: {before} -> {after}"
    );
    let list = e.json(&["point", "list", &v, "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], ids[2].as_str());
    let out = e.p("r.raw");
    e.ok(&[
        "point",
        "restore",
        &v,
        "latest",
        "--volume",
        "disk0",
        "--to",
        out.to_str().unwrap(),
        "--verify",
    ]);
    assert!(same(&out, &img));
    assert!(e
        .ok(&["vault", "verify", &v, "--read-data"])
        .contains("no problems found"));
}

#[test]
fn copy_is_sparse_atomic_and_resumable() {
    let e = Env::new();
    let src = e.image("src.raw", "64MiB", "16MiB", 4);
    let dst = e.p("dst.raw");
    let r = e.json(&[
        "copy",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--verify",
        "--json",
    ]);
    assert_eq!(r["copy"]["data_bytes"], 16 << 20);
    assert_eq!(r["copy"]["nominal_bytes"], 64 << 20);
    assert_eq!(r["copy"]["verified"], true);
    assert!(same(&src, &dst));
    let md = std::fs::metadata(&dst).unwrap();
    assert!(md.blocks() * 512 <= 20 << 20, "copy is not sparse");

    // interrupted after a checkpoint: the destination is untouched
    let dst2 = e.p("dst2.raw");
    std::fs::write(&dst2, b"old").unwrap();
    let o = Command::new(BIN)
        .args([
            "copy",
            src.to_str().unwrap(),
            dst2.to_str().unwrap(),
            "--checkpoint-every",
            "4MiB",
        ])
        .env("LIFEBOAT_TEST_FAIL_COPY_AFTER", "8388608")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&dst2).unwrap(), b"old");
    assert!(e.p(".dst2.raw.lifeboat-partial").exists());
    let r = e.json(&[
        "copy",
        src.to_str().unwrap(),
        dst2.to_str().unwrap(),
        "--resume",
        "--verify",
        "--json",
        "--checkpoint-every",
        "4MiB",
    ]);
    assert!(
        r["copy"]["resumed_from"].as_u64().unwrap() >= 8 << 20,
        "{r}"
    );
    assert!(r["copy"]["transferred_bytes"].as_u64().unwrap() < 16 << 20);
    assert!(same(&src, &dst2));
    assert!(!e.p(".dst2.raw.lifeboat-partial").exists());

    let dst3 = e.p("dst3.raw");
    e.ok(&[
        "copy",
        "--no-fsync",
        "--verify",
        src.to_str().unwrap(),
        dst3.to_str().unwrap(),
    ]);
    assert!(same(&src, &dst3));

    let err = e.fail(&[
        "copy",
        e.p("missing").to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    assert!(
        err.contains("missing") && err.contains("no such file"),
        "{err}"
    );
}

fn emulator(var: &str) -> bool {
    if std::env::var(var).is_ok() {
        return true;
    }
    assert!(
        std::env::var("LIFEBOAT_REQUIRE_EMULATORS").is_err(),
        "{var} required"
    );
    eprintln!("skipped: {var} not set");
    false
}

fn object_round_trip(scheme: &str) {
    let e = Env::new();
    let unique = hex(8);
    let v = format!("{scheme}://lifeboat-test/vault-{unique}");
    e.ok(&["vault", "init", &v]);
    let img = e.image("disk.raw", "32MiB", "8MiB", 9);
    e.ok(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("disk0={}", img.display()),
    ]);
    e.ok(&["debug", "mutate", img.to_str().unwrap()]);
    e.ok(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("disk0={}", img.display()),
    ]);
    let out = e.p("r.raw");
    e.ok(&[
        "point",
        "restore",
        &v,
        "latest",
        "--volume",
        "disk0",
        "--to",
        out.to_str().unwrap(),
        "--verify",
    ]);
    assert!(same(&out, &img));
    assert!(e
        .ok(&["vault", "verify", &v, "--read-data"])
        .contains("no problems found"));

    // copy: up, server-side within the store, down; all verified
    let obj = format!("{scheme}://lifeboat-test/img-{unique}.raw");
    let obj2 = format!("{scheme}://lifeboat-test/img-{unique}-copy.raw");
    let r = e.json(&[
        "copy",
        img.to_str().unwrap(),
        &obj,
        "--verify",
        "--json",
        "--part-size",
        "5MiB",
    ]);
    assert_eq!(r["copy"]["method"], "multipart-upload");
    // an upload interrupted after some parts: nothing is published, and
    // --resume sends only the missing parts
    let obj3 = format!("{scheme}://lifeboat-test/img-{unique}-resumed.raw");
    let o = Command::new(BIN)
        .args([
            "copy",
            img.to_str().unwrap(),
            &obj3,
            "--part-size",
            "5MiB",
            "--parallel",
            "1",
        ])
        .env("LIFEBOAT_PASSWORD", "correct horse")
        .env("LIFEBOAT_STATE_DIR", e.p("state"))
        .env("LIFEBOAT_TEST_FAIL_COPY_AFTER", (10u64 << 20).to_string())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = e.fail(&["copy", &obj3, e.p("nothing.raw").to_str().unwrap()]);
    assert!(err.contains("img-"), "the object must not exist yet: {err}");
    let r = e.json(&[
        "copy",
        img.to_str().unwrap(),
        &obj3,
        "--part-size",
        "5MiB",
        "--resume",
        "--verify",
        "--json",
    ]);
    assert_eq!(r["copy"]["resumed_from"], 10 << 20, "{r}");
    assert_eq!(r["copy"]["transferred_bytes"], 22 << 20, "{r}");
    assert_eq!(r["copy"]["verified"], true);
    assert_eq!(
        std::fs::read_dir(e.p("state/uploads")).unwrap().count(),
        0,
        "the checkpoint goes once the upload is complete"
    );
    let r = e.json(&["copy", &obj, &obj2, "--verify", "--json"]);
    assert_eq!(r["copy"]["method"], "server-side");
    let down = e.p("down.raw");
    let r = e.json(&[
        "copy",
        &obj2,
        down.to_str().unwrap(),
        "--verify",
        "--json",
        "--part-size",
        "5MiB",
    ]);
    assert_eq!(r["copy"]["method"], "ranged-download");
    assert!(same(&down, &img));
    let md = std::fs::metadata(&down).unwrap();
    assert!(md.blocks() * 512 < md.len(), "download should stay sparse");
}

fn hex(n: usize) -> String {
    let b = std::fs::read("/proc/sys/kernel/random/uuid").unwrap();
    String::from_utf8_lossy(&b).trim().replace('-', "")[..n].to_string()
}

#[test]
fn vault_and_copy_on_azurite() {
    if emulator("LIFEBOAT_TEST_AZURITE") {
        object_round_trip("az");
    }
}

#[test]
fn vault_and_copy_on_s3_emulator() {
    if emulator("LIFEBOAT_TEST_S3") {
        object_round_trip("s3");
    }
}

#[test]
fn full_disk_during_restore_is_clear_and_leaves_nothing() {
    let e = Env::new();
    let mnt = e.p("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: cannot mount a small tmpfs (needs root)");
        return;
    }
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    let v = e.vault();
    e.ok(&["vault", "init", &v]);
    let img = e.image("disk.raw", "32MiB", "16MiB", 2);
    e.ok(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("disk0={}", img.display()),
    ]);
    let dst = mnt.join("restored.raw");
    let err = e.fail(&[
        "point",
        "restore",
        &v,
        "latest",
        "--volume",
        "disk0",
        "--to",
        dst.to_str().unwrap(),
    ]);
    assert!(err.contains("disk is full"), "{err}");
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "nothing may be left on the full disk"
    );
    let err = e.fail(&["copy", img.to_str().unwrap(), dst.to_str().unwrap()]);
    assert!(err.contains("disk full"), "{err}");
}

#[test]
fn help_explains_every_command_with_an_example() {
    let e = Env::new();
    for cmd in [
        vec!["vault", "init"],
        vec!["vault", "verify"],
        vec!["vault", "prune"],
        vec!["vault", "info"],
        vec!["point", "create"],
        vec!["point", "list"],
        vec!["point", "show"],
        vec!["point", "diff"],
        vec!["point", "restore"],
        vec!["copy"],
        vec!["demo"],
    ] {
        let mut args = cmd.clone();
        args.push("--help");
        let out = e.ok(&args);
        assert!(out.contains("Example"), "{cmd:?} --help has no example");
    }
}

#[test]
fn demo_runs_end_to_end() {
    let e = Env::new();
    let r = e.json(&[
        "demo",
        "--dir",
        e.p("demo").to_str().unwrap(),
        "--size",
        "32MiB",
        "--json",
    ]);
    assert_eq!(r["points"].as_array().unwrap().len(), 2);
    assert!(r["dedup_compression_ratio"].as_f64().unwrap() > 1.5);
    assert!(r["change_stored"].as_u64().unwrap() <= 3 * r["change_written"].as_u64().unwrap());
}

#[test]
fn hooks_run_around_the_point_and_a_failed_pre_hook_aborts() {
    let e = Env::new();
    let v = e.vault();
    e.ok(&["vault", "init", &v]);
    let img = e.image("disk.raw", "8MiB", "2MiB", 5);
    let log = e.p("hooks.log");
    let pre = format!("echo pre >> {}", log.display());
    let post = format!("echo post >> {}", log.display());
    let c = e.json(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("d={}", img.display()),
        "--pre-hook",
        &pre,
        "--post-hook",
        &post,
        "--json",
    ]);
    assert_eq!(c["point"]["kind"], "app-consistent");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost\n");

    let err = e.fail(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("d={}", img.display()),
        "--pre-hook",
        "exit 3",
        "--post-hook",
        &post,
    ]);
    assert!(
        err.contains("pre hook") && err.contains("no point was taken"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre\npost\npost\n",
        "post hook undoes a failed pre hook"
    );
    assert_eq!(
        e.json(&["point", "list", &v, "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let err = e.fail(&["point", "create", &v, "--volume", "bad name=/x"]);
    assert!(err.contains("volume name"), "{err}");
    let err = e.fail(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("d={}", e.p("missing").display()),
    ]);
    assert!(err.contains("missing") && err.contains("open"), "{err}");
}

#[test]
fn restore_into_a_block_device_in_place() {
    let e = Env::new();
    let v = e.vault();
    e.ok(&["vault", "init", &v]);
    let img = e.image("disk.raw", "16MiB", "4MiB", 7);
    e.ok(&[
        "point",
        "create",
        &v,
        "--volume",
        &format!("d={}", img.display()),
    ]);
    // a loop device over a file full of old data stands in for a disk
    let backing = e.p("backing");
    std::fs::write(&backing, vec![0xeeu8; 16 << 20]).unwrap();
    let o = Command::new("losetup")
        .args(["--find", "--show", backing.to_str().unwrap()])
        .output();
    let dev = match o {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
        _ => {
            eprintln!("skipped: no loop device (needs root)");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _d = Detach(dev.clone());
    e.ok(&[
        "point", "restore", &v, "latest", "--volume", "d", "--to", &dev, "--verify",
    ]);
    let got = std::fs::read(&backing).unwrap();
    assert_eq!(
        got,
        std::fs::read(&img).unwrap(),
        "device holds the volume, old data in holes zeroed"
    );

    // lifeboat copy to the device: in place, every hole (the trailing one too) zeroed
    std::fs::write(&backing, vec![0xeeu8; 16 << 20]).unwrap();
    let small = e.p("small.raw");
    let f = std::fs::File::create(&small).unwrap();
    f.set_len(16 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 65536], 1 << 20).unwrap();
    drop(f);
    e.ok(&["copy", small.to_str().unwrap(), &dev]);
    assert_eq!(
        std::fs::read(&backing).unwrap(),
        std::fs::read(&small).unwrap()
    );
}
