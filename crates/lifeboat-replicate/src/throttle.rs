//! Bandwidth limits: a token bucket on bytes sent, and the parser of
//! `bandwidth = "80mbit"`-style settings.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// A rate limit that may change with the time of day: `default` outside
/// the windows, each window's rate inside it (local time, `from` inclusive,
/// `to` exclusive; a window may wrap midnight, e.g. 22:00–06:00).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schedule {
    pub default: Option<u64>,
    /// (from minute of day, to minute of day, bytes/s; None: unlimited)
    pub windows: Vec<(u32, u32, Option<u64>)>,
}

/// One window of a bandwidth schedule as written in a config file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// "08:00"
    pub from: String,
    /// "18:00"
    pub to: String,
    /// "20mbit", "5MiB", or "unlimited"
    pub rate: String,
}

fn parse_hhmm(s: &str) -> Result<u32> {
    let (h, m) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("time {s:?}: expected HH:MM"))?;
    let (h, m): (u32, u32) = (
        h.parse()
            .map_err(|_| anyhow::anyhow!("time {s:?}: expected HH:MM"))?,
        m.parse()
            .map_err(|_| anyhow::anyhow!("time {s:?}: expected HH:MM"))?,
    );
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        bail!("time {s:?} is not a time of day");
    }
    Ok(h * 60 + m)
}

impl Schedule {
    /// A fixed rate.
    pub fn fixed(rate: Option<u64>) -> Schedule {
        Schedule {
            default: rate,
            windows: vec![],
        }
    }

    /// From a config's `bandwidth` and `bandwidth_windows`.
    ///
    /// # Errors
    /// Bad rates or times.
    pub fn parse(default: Option<&str>, windows: &[Window]) -> Result<Schedule> {
        let rate = |s: &str| -> Result<Option<u64>> {
            if s.trim() == "unlimited" {
                Ok(None)
            } else {
                parse_rate(s).map(Some)
            }
        };
        Ok(Schedule {
            default: default.map(rate).transpose()?.flatten(),
            windows: windows
                .iter()
                .map(|w| Ok((parse_hhmm(&w.from)?, parse_hhmm(&w.to)?, rate(&w.rate)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// The rate at minute `m` of the day.
    pub fn rate_at(&self, m: u32) -> Option<u64> {
        for (from, to, r) in &self.windows {
            let inside = if from <= to {
                (*from..*to).contains(&m)
            } else {
                m >= *from || m < *to
            };
            if inside {
                return *r;
            }
        }
        self.default
    }

    /// The rate now (local time).
    pub fn rate_now(&self) -> Option<u64> {
        if self.windows.is_empty() {
            return self.default;
        }
        // SAFETY: time and localtime_r with valid pointers to locals.
        let m = unsafe {
            let t = libc::time(std::ptr::null_mut());
            let mut tm: libc::tm = std::mem::zeroed();
            libc::localtime_r(&t, &mut tm);
            (tm.tm_hour * 60 + tm.tm_min) as u32
        };
        self.rate_at(m)
    }
}

/// Paces writes to the schedule's rate (bursts of up to 1/4 s).
pub struct Throttle {
    schedule: Schedule,
    rate: Option<u64>,
    checked: Instant,
    tokens: f64,
    last: Instant,
}

impl Throttle {
    pub fn new(schedule: Schedule) -> Throttle {
        Throttle {
            rate: schedule.rate_now(),
            schedule,
            checked: Instant::now(),
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Wait until `n` bytes may go out.
    pub async fn take(&mut self, n: u64) {
        if self.checked.elapsed() >= Duration::from_secs(10) {
            self.checked = Instant::now();
            self.rate = self.schedule.rate_now();
        }
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

    #[test]
    fn windows_pick_the_rate_of_the_time_of_day() {
        let w = |f: &str, t: &str, r: &str| Window {
            from: f.into(),
            to: t.into(),
            rate: r.into(),
        };
        let s = Schedule::parse(
            Some("80mbit"),
            &[
                w("08:00", "18:00", "20mbit"),
                w("22:00", "06:00", "unlimited"),
            ],
        )
        .unwrap();
        assert_eq!(s.rate_at(9 * 60), Some(2_500_000));
        assert_eq!(s.rate_at(18 * 60), Some(10_000_000));
        assert_eq!(s.rate_at(23 * 60), None);
        assert_eq!(s.rate_at(5 * 60 + 59), None);
        assert!(Schedule::parse(None, &[w("25:00", "01:00", "1mbit")]).is_err());
        assert!(Schedule::parse(None, &[w("8", "9", "1mbit")]).is_err());
    }

    #[tokio::test]
    async fn the_bucket_paces_bytes() {
        let mut t = Throttle::new(Schedule::fixed(Some(1_000_000)));
        let start = Instant::now();
        for _ in 0..10 {
            t.take(100_000).await; // 1 MB at 1 MB/s
        }
        let e = start.elapsed();
        assert!(e >= Duration::from_millis(700), "{e:?}");
    }
}
