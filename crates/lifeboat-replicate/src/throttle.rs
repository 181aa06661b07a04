//! Bandwidth limits: a token bucket on bytes sent, and the parser of
//! `bandwidth = "80mbit"`-style settings.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Paces writes to `rate` bytes per second (bursts of up to 1/4 s).
pub struct Throttle {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(rate: Option<u64>) -> Throttle {
        Throttle {
            rate,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Wait until `n` bytes may go out.
    pub async fn take(&mut self, n: u64) {
        let Some(rate) = self.rate else { return };
        let rate = rate as f64;
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate / 4.0);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / rate)).await;
        }
    }
}

/// Parse a rate: `80mbit`, `1gbit`, `500kbit` (bits per second, decimal) or
/// `10MiB`, `512KiB`, `20MB` (bytes per second). Returns bytes per second.
///
/// # Errors
/// Anything else.
pub fn parse_rate(s: &str) -> Result<u64> {
    let t = s
        .trim()
        .to_ascii_lowercase()
        .replace("bps", "bit")
        .replace("/s", "");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("bandwidth {s:?}: expected e.g. \"80mbit\" or \"10MiB\""))?;
    let mult = match unit.trim() {
        "bit" | "b" => 1.0 / 8.0,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        "" | "byte" | "bytes" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => bail!("bandwidth {s:?}: unknown unit {u:?} (use kbit, mbit, gbit, KiB, MiB, GiB)"),
    };
    let v = (n * mult) as u64;
    if v == 0 {
        bail!("bandwidth {s:?} is zero");
    }
    Ok(v)
}

/// Parse a size: `8GiB`, `512MiB`, `100MB`, `4096`.
///
/// # Errors
/// Anything else.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("size {s:?}: expected e.g. \"8GiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => bail!("size {s:?}: unknown unit {u:?} (use KiB, MiB, GiB, TiB)"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("size {s:?} is too large"))
}

/// Parse a duration: `30s`, `5m`, `1h`, `2d`.
///
/// # Errors
/// Anything else.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("duration {s:?}: expected e.g. \"30s\" or \"5m\""))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        "ms" => return Ok(Duration::from_millis(n)),
        u => bail!("duration {s:?}: unknown unit {u:?} (use ms, s, m, h, d)"),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_sizes_and_durations_parse() {
        assert_eq!(parse_rate("80mbit").unwrap(), 10_000_000);
        assert_eq!(parse_rate("10MiB/s").unwrap(), 10 << 20);
        assert_eq!(parse_rate("1gbps").unwrap(), 125_000_000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0mbit").is_err());
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("9zb").is_err());
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("soon").is_err());
    }

    #[tokio::test]
    async fn the_bucket_paces_bytes() {
        let mut t = Throttle::new(Some(1_000_000));
        let start = Instant::now();
        for _ in 0..10 {
            t.take(100_000).await; // 1 MB at 1 MB/s
        }
        let e = start.elapsed();
        assert!(e >= Duration::from_millis(700), "{e:?}");
    }
}
