//! Two sites on one machine (loopback) for the replication tests:
//! `lifeboat server` at the recovery site, `lifeboat agent` at the primary
//! serving a volume (NBD or FUSE). Outages are made by stopping processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lifeboat");

pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("LIFEBOAT_REQUIRE_EMULATORS").is_err(),
            "{tool} is required (scripts/setup-test-deps installs it)"
        );
        eprintln!("skipped: {tool} not installed");
    }
    ok
}

pub fn lb(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .current_dir(dir)
        .env("LIFEBOAT_PASSWORD", "pw")
        .args(args)
        .output()
        .unwrap()
}

pub fn ok(o: std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
    pub fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}

/// Spawn `lifeboat ARGS` with stderr copied to `log`; returns once a stderr
/// line contains `ready` (and that line).
pub fn spawn(dir: &Path, args: &[&str], log: &Path, ready: &str) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .current_dir(dir)
        .env("LIFEBOAT_PASSWORD", "pw")
        .env("LIFEBOAT_LOG", "info")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(f, "{line}");
            if !sent && line.contains(&ready) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("{args:?} did not become ready; see {}", log.display()));
    (Proc { child }, line)
}

/// Wait until `dir/src.img` and `replica` are byte-identical and `status`
/// says the volume is protected with nothing in flight; returns that status.
pub fn converge(dir: &Path, replica: &Path, status: impl Fn() -> Value) -> Value {
    let src = dir.join("src.img");
    let t = Instant::now();
    loop {
        let same = std::fs::read(replica).is_ok_and(|r| r == std::fs::read(&src).unwrap());
        // the data lands before its acknowledgement: let the state catch up
        std::thread::sleep(Duration::from_millis(300));
        let s = status();
        if same && s["state"] == "protected" && s["lag_bytes"] == 0 {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no convergence: {s}\n{}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` qemu-io commands writing 64 KiB at scattered chunks (`mul` spreads them).
pub fn scattered_writes(n: u64, mul: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!("write -P {} {} 64k", i % 250 + 1, (i * mul % 1000) * 65536))
        .collect()
}

pub fn http(api: &str, method: &str, path: &str) -> (u16, Value) {
    http_as(api, method, path, None)
}

/// [`http`] with the API token (calls that change state need it).
pub fn http_as(api: &str, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(api).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut b = String::new();
    s.read_to_string(&mut b).unwrap();
    let (head, body) = b.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Unmounts (lazily) when dropped, so a failed test leaves no mount behind.
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

pub struct Sites {
    pub dir: PathBuf,
    pub server: Option<Proc>,
    pub agent: Option<Proc>,
    pub listen: String,
    pub api: String,
    pub src: PathBuf,
    pub sock: PathBuf,
    /// The agent's FUSE export, unmounted after the agent above is killed
    /// (fields drop in order): a killed agent leaves a dead mount that its
    /// temporary directory cannot be removed through.
    pub fuse: Option<Mounted>,
}

/// The protected volume: its size and data, and how the workload reaches it.
pub struct Vol<'a> {
    pub size: &'a str,
    pub data: &'a str,
    /// `--nbd-socket db.sock` or `--fuse-mount mnt`
    pub frontend: [&'a str; 2],
}

pub const NBD_64M: Vol<'static> = Vol {
    size: "64M",
    data: "16M",
    frontend: ["--nbd-socket", "db.sock"],
};

impl Sites {
    /// A vault, a server, an enrolled agent protecting a 64 MiB image with
    /// 16 MiB of data, with `journal_max`.
    /// Two converged sites in a new temporary directory, if qemu-io (the
    /// workload) is installed.
    pub fn ready(journal_max: &str) -> Option<(tempfile::TempDir, Sites)> {
        if !have("qemu-io") {
            return None;
        }
        let d = tempfile::tempdir().unwrap();
        let s = Sites::new(d.path(), journal_max);
        s.converge();
        Some((d, s))
    }

    pub fn new(dir: &Path, journal_max: &str) -> Sites {
        Self::with(dir, journal_max, &NBD_64M)
    }

    pub fn with(dir: &Path, journal_max: &str, vol: &Vol) -> Sites {
        let d = dir.to_path_buf();
        ok(lb(&d, &["vault", "init", "vault"]));
        ok(lb(
            &d,
            &[
                "server",
                "init",
                "srv",
                "--vault",
                d.join("vault").to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--point-interval",
                "1h",
            ],
        ));
        let mut s = Sites {
            dir: d.clone(),
            server: None,
            agent: None,
            listen: String::new(),
            api: String::new(),
            src: d.join("src.img"),
            sock: d.join("db.sock"),
            fuse: (vol.frontend[0] == "--fuse-mount").then(|| Mounted(d.join(vol.frontend[1]))),
        };
        s.start_server();
        let token = ok(lb(
            &d,
            &["server", "token", "create", "srv", "--site", "primary"],
        ));
        std::fs::write(d.join("token"), token).unwrap();
        ok(lb(
            &d,
            &[
                "agent",
                "enroll",
                "--server",
                &s.listen,
                "--token-file",
                "token",
                "--state-dir",
                "agent",
                "--name",
                "web01",
                "--config",
                "agent.toml",
            ],
        ));
        // the listen port changes on every server start: keep it in the config
        ok(lb(
            &d,
            &[
                "debug",
                "make-image",
                "--size",
                vol.size,
                "--data",
                vol.data,
                "src.img",
            ],
        ));
        let cfg = std::fs::read_to_string(d.join("agent.toml")).unwrap();
        std::fs::write(
            d.join("agent.toml"),
            format!("{cfg}journal_max = \"{journal_max}\"\n")
                .replace("journal_max = \"8GiB\"\n", ""),
        )
        .unwrap();
        ok(lb(
            &d,
            &[
                "protect",
                "db",
                "--volume",
                "disk0=src.img",
                vol.frontend[0],
                vol.frontend[1],
                "--config",
                "agent.toml",
            ],
        ));
        s.start_agent();
        s
    }

    pub fn start_server(&mut self) {
        // reuse the ports of the first start
        if !self.listen.is_empty() {
            let p = self.dir.join("srv/server.toml");
            let c = std::fs::read_to_string(&p).unwrap();
            let c = c
                .lines()
                .map(|l| {
                    if l.starts_with("listen =") {
                        format!("listen = \"{}\"", self.listen)
                    } else if l.starts_with("api =") {
                        format!("api = \"{}\"", self.api)
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(&p, c).unwrap();
        }
        let (p, line) = spawn(
            &self.dir,
            &["server", "run", "srv"],
            &self.dir.join("server.log"),
            "agents on",
        );
        // "lifeboat server: agents on A, API on http://B"
        let a = line.split("agents on ").nth(1).unwrap();
        let (l, api) = a.split_once(", API on http://").unwrap();
        self.listen = l.trim().to_string();
        self.api = api.trim().to_string();
        self.server = Some(p);
        if self.dir.join("agent.toml").exists() {
            let c = std::fs::read_to_string(self.dir.join("agent.toml")).unwrap();
            let c = c
                .lines()
                .map(|x| {
                    if x.starts_with("server =") {
                        format!("server = \"{}\"", self.listen)
                    } else {
                        x.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(self.dir.join("agent.toml"), c + "\n").unwrap();
        }
    }

    pub fn start_agent(&mut self) {
        let (p, _) = spawn(
            &self.dir,
            &["agent", "run", "--config", "agent.toml"],
            &self.dir.join("agent.log"),
            "export at",
        );
        self.agent = Some(p);
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///disk0?socket={}", self.sock.display())
    }

    pub fn qemu_io(&self, cmds: &[String]) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw", &self.uri()]);
        for x in cmds {
            c.args(["-c", x]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    pub fn status(&self) -> Value {
        let (code, v) = http(&self.api, "GET", "/api/v1/status");
        assert_eq!(code, 200, "{v}");
        v["volumes"][0].clone()
    }

    /// The server's API token (for calls that change state).
    pub fn api_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("srv/api.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Cut a point now through the API.
    pub fn cut(&self) -> (u16, Value) {
        http_as(
            &self.api,
            "POST",
            "/api/v1/items/db/points",
            Some(&self.api_token()),
        )
    }

    pub fn replica(&self) -> PathBuf {
        self.dir.join("srv/replicas/db/disk0.img")
    }

    /// Wait until the replica equals the source and the volume is protected.
    pub fn converge(&self) -> Value {
        converge(&self.dir, &self.replica(), || self.status())
    }

    /// The machine "crashes" under the agent: the agent dies (SIGKILL) and
    /// its state files say another boot left it running; it starts again.
    pub fn machine_crash(&mut self) {
        self.agent.as_mut().unwrap().kill9();
        let jdir = self.dir.join("agent/journals/db/disk0");
        for f in ["dirty.state", "journal.state"] {
            std::fs::write(jdir.join(f), "0123-another-boot running\n").unwrap();
        }
        self.start_agent();
    }

    /// [`Sites::converge`] until the replica is also a consistent crash
    /// state (a resync pass done), or 30 s.
    pub fn converge_consistent(&self) -> Value {
        let t = Instant::now();
        loop {
            let st = self.converge();
            if st["consistent"] == true || t.elapsed() > Duration::from_secs(30) {
                return st;
            }
        }
    }
}
