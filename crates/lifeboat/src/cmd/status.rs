//! `lifeboat status`: replication health from the server's REST API.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use lifeboat_server::api::Status;

use crate::common::{human, print_json};

#[derive(Args)]
pub struct StatusArgs {
    /// The server's API address
    #[arg(long, default_value = lifeboat_server::config::defaults::API, env = "LIFEBOAT_API")]
    pub api: String,
    /// The server's API token (SERVER_DIR/api.token), for a server whose
    /// reads need it (`api_reads = "token"`); else LIFEBOAT_API_TOKEN
    #[arg(long)]
    pub api_token_file: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// GET a JSON document from the API (plain HTTP/1.1 on the local network).
pub fn get(api: &str, path: &str) -> Result<String> {
    request(api, "GET", path, None)
}

/// [`get`] with the API token when one is given (`file`, else
/// `LIFEBOAT_API_TOKEN`): a server may ask for it on reads too.
pub fn get_with_token(api: &str, path: &str, file: Option<&std::path::Path>) -> Result<String> {
    request(api, "GET", path, given_api_token(file)?.as_deref())
}

/// POST (no body) to the API with its token; returns the JSON answer.
pub fn post(api: &str, path: &str, token: &str) -> Result<String> {
    request(api, "POST", path, Some(token))
}

/// The API token for calls that change state: `LIFEBOAT_API_TOKEN`, or the
/// file given (the server directory's `api.token`).
pub fn api_token(file: Option<&std::path::Path>) -> Result<String> {
    match given_api_token(file)? {
        Some(t) => Ok(t),
        None => bail!(
            "this call needs the server's API token: --api-token-file SERVER_DIR/api.token \
             or LIFEBOAT_API_TOKEN"
        ),
    }
}

/// The API token from `file`, else from LIFEBOAT_API_TOKEN, if either
/// gives one.
fn given_api_token(file: Option<&std::path::Path>) -> Result<Option<String>> {
    if let Some(f) = file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the API token from {}", f.display()))?;
        return Ok(Some(t.trim().to_string()));
    }
    Ok(std::env::var("LIFEBOAT_API_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

fn request(api: &str, method: &str, path: &str, token: Option<&str>) -> Result<String> {
    let addr = api.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).with_context(|| {
        format!("cannot reach the Lifeboat API at {addr} (is `lifeboat server run` up?)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n{auth}Content-Length: 0\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP status line")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    if code != 200 {
        bail!("the API answered {code}: {body}");
    }
    Ok(body)
}

fn dechunk(b: &str) -> String {
    let mut out = String::new();
    let mut rest = b;
    while let Some((len, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn run(a: StatusArgs) -> Result<()> {
    let body = get_with_token(&a.api, "/api/v1/status", a.api_token_file.as_deref())?;
    let st: Status =
        serde_json::from_str(&body).context("the API answered something unexpected")?;
    if a.json {
        return print_json(&st);
    }
    println!(
        "site {} (lifeboat {}, up {} s)",
        st.site, st.version, st.uptime_secs
    );
    if st.volumes.is_empty() {
        println!("no protected volumes yet: enroll an agent and `lifeboat protect` a volume");
        return Ok(());
    }
    println!(
        "{:<24} {:<13} {:>9} {:>10} {:>10} {:>12}  last point",
        "item/volume", "state", "RPO", "lag", "rate/s", "seq"
    );
    for v in st.volumes {
        println!(
            "{:<24} {:<13} {:>9} {:>10} {:>10} {:>12}  {}",
            format!("{}/{}", v.item, v.volume),
            if v.sync_total_bytes > 0 {
                format!(
                    "{} {:.0}%",
                    v.state,
                    v.sync_done_bytes as f64 * 100.0 / v.sync_total_bytes as f64
                )
            } else {
                v.state.clone()
            },
            v.rpo_ms
                .map(|m| format!("{:.1}s", m as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            human(v.lag_bytes),
            human(v.throughput_bytes_per_sec),
            v.applied_seq,
            v.last_point.unwrap_or_else(|| "-".into())
        );
        if v.sync_total_bytes > 0 {
            println!(
                "    syncing: {} of {} data compared{}",
                human(v.sync_done_bytes),
                human(v.sync_total_bytes),
                v.sync_eta_secs
                    .map(|s| format!(", about {s} s to go"))
                    .unwrap_or_default()
            );
        }
        if let Some(e) = v.error {
            println!("    error: {e}");
        }
    }
    Ok(())
}
