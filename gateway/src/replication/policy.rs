//! The site's replication policy (one per site, applied to every protected VM).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::retry::RetrySchedule;

/// See `docs/replication.md` for what each setting does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Seconds between delta replications; 0 = continuous (a new cycle as soon as the last
    /// one finished and there are changes, at most one per [`CONTINUOUS_MIN_GAP`]).
    pub interval_secs: u64,
    /// Recovery points older than this are pruned (the newest point is always kept).
    pub retention_hours: f64,
    /// Every this many hours a point is cut app-consistent (0 = never).
    pub app_consistent_hours: f64,
    /// Shell commands run around an app-consistent cut (`$STANDBY_VM` names the VM).
    pub freeze_cmd: Option<String>,
    pub thaw_cmd: Option<String>,
    /// Initial replication starts at this time (Unix seconds) or at once.
    pub initial_start_unix: Option<u64>,
    /// Resynchronization runs inside this local-time window, "HH:MM-HH:MM" (may wrap midnight).
    pub resync_window: String,
    /// Upload limit in bytes per second (0 = none).
    pub bandwidth_bytes_per_sec: u64,
    /// Retry delays are divided by this (tests; 1 in production).
    pub retry_time_scale: u32,
    /// A disk's patches are consolidated into chunks in the background when they hold more
    /// than this many bytes; past [`super::consolidate::INLINE_FACTOR`] × this, the cut folds
    /// them inline.
    pub fold_patch_bytes: u64,
    /// Command a test failover launches (split into words and run without a shell), with `{disk0}`, `{disk1}`, … (NBD URIs of
    /// the VM's disks in name order), `{disk:NAME}`, `{vm}`, `{point}` and `{dir}` replaced.
    pub failover_command: Option<String>,
}

/// Shortest gap between two continuous-mode cycles.
pub const CONTINUOUS_MIN_GAP: Duration = Duration::from_millis(500);

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval_secs: 300,
            retention_hours: 24.0,
            app_consistent_hours: 0.0,
            freeze_cmd: None,
            thaw_cmd: None,
            initial_start_unix: None,
            resync_window: "18:00-08:00".into(),
            bandwidth_bytes_per_sec: 0,
            retry_time_scale: 1,
            fold_patch_bytes: 256 << 20,
            failover_command: None,
        }
    }
}

impl Policy {
    /// Gap between cycles.
    pub fn interval(&self) -> Duration {
        if self.interval_secs == 0 {
            CONTINUOUS_MIN_GAP
        } else {
            Duration::from_secs(self.interval_secs)
        }
    }

    pub fn retry_schedule(&self) -> RetrySchedule {
        RetrySchedule::default().scaled(self.retry_time_scale.max(1))
    }

    /// Checks every field; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.retention_hours.is_nan() || self.retention_hours <= 0.0 {
            return Err("retention must be more than 0 hours".into());
        }
        if self.app_consistent_hours < 0.0 {
            return Err("app-consistent frequency cannot be negative".into());
        }
        if self.app_consistent_hours > 0.0 && self.freeze_cmd.is_none() {
            return Err("app-consistent points need a freeze command (--freeze-cmd)".into());
        }
        parse_window(&self.resync_window)?;
        if self.retry_time_scale == 0 {
            return Err("retry time scale must be at least 1".into());
        }
        Ok(())
    }

    /// Is `minute_of_day` (local time) inside the resync window?
    pub fn in_resync_window(&self, minute_of_day: u32) -> bool {
        match parse_window(&self.resync_window) {
            Ok((a, b)) if a <= b => (a..b).contains(&minute_of_day),
            Ok((a, b)) => minute_of_day >= a || minute_of_day < b,
            Err(_) => true,
        }
    }
}

/// "HH:MM-HH:MM" → minutes of day. "always" = the whole day.
pub fn parse_window(s: &str) -> Result<(u32, u32), String> {
    if s == "always" {
        return Ok((0, 24 * 60));
    }
    let bad = || format!("resync window {s:?} is not HH:MM-HH:MM (or \"always\")");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let hm = |t: &str| -> Result<u32, String> {
        let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(h * 60 + m)
    };
    Ok((hm(a)?, hm(b)?))
}

/// Minute of the day in local time.
pub fn local_minute_of_day(unix_secs: i64) -> u32 {
    let t: libc::time_t = unix_secs as libc::time_t;
    // SAFETY: `libc::tm` is integers and a nullable pointer, for which all-zero bytes are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and writes only into `tm`, both on this stack frame.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return ((unix_secs.rem_euclid(86_400)) / 60) as u32;
    }
    (tm.tm_hour * 60 + tm.tm_min) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_wraps_midnight() {
        let p = Policy::default();
        assert!(p.in_resync_window(19 * 60));
        assert!(p.in_resync_window(3 * 60));
        assert!(!p.in_resync_window(12 * 60));
        let p = Policy {
            resync_window: "always".into(),
            ..Policy::default()
        };
        assert!(p.in_resync_window(12 * 60));
        assert!(parse_window("25:00-01:00").is_err());
        assert!(Policy {
            retention_hours: 0.0,
            ..Policy::default()
        }
        .validate()
        .is_err());
    }
}
