//! The optional configuration file (`standby.toml`).
//!
//! ```toml
//! [serve]
//! listen = "127.0.0.1:10809"       # TCP address for NBD
//! socket = "/run/standby.sock"      # also serve on a Unix socket
//! tls_cert = "server-cert.pem"      # enable STARTTLS
//! tls_key = "server-key.pem"
//! tls_required = false              # refuse clients that do not start TLS (always on
//!                                   #   beyond loopback)
//! tls_client_ca = "clients-ca.pem"  # demand client certificates signed by this CA
//! insecure_no_tls = false           # allow plaintext or unauthenticated clients beyond loopback
//! handshake_timeout = 30            # seconds to finish the NBD (and TLS) handshake
//! idle_timeout = 0                  # seconds without requests before closing; 0 = never
//! reply_timeout = 60                # seconds a client may leave its replies unread
//! max_sessions = 1024               # open connections in total
//! max_sessions_per_client = 256     # open connections per client IP address
//! memory_budget = "1G"              # payload memory of all connections together
//!
//! [serve.allow]                     # exports only these client certificates may open
//! "web01-os" = ["hv1.example.com"]  #   (certificate common name or subject-alternative name)
//!
//! [api]                             # HTTP API and /metrics (docs/api.md)
//! listen = "127.0.0.1:8080"         # beyond loopback it needs tls_cert and tls_key
//! tls_cert = "api-cert.pem"         # serve HTTPS (PEM, as for NBD)
//! tls_key = "api-key.pem"
//! insecure_no_tls = false           # allow plain HTTP beyond loopback
//! enabled = true                    # false: no API listener
//!
//! [log]                             # change logs of tracked disks
//! segment_size = "64M"              # seal a segment and start the next at this size
//! min_free = "1G"                   # overflow (resync needed) when the log's file system
//! min_free_percent = 5              #   has less free than min(min_free, this % of it)
//! extent_min = "64K"                # writes this large are logged as extents (bytes stay
//!                                   #   in the image); "off" logs every write's data
//! defer_max = "4G"                  # smaller writes' bytes are logged at the next FLUSH or
//!                                   #   cut, up to this much at a time; "off": with each write
//! image_flush_min = "64M"           # a FLUSH facing this much of them syncs the image
//!                                   #   instead of logging them; "off": always logs them
//! flush_heavy_writes = 8            # while each FLUSH follows at most this many small
//!                                   #   writes, they are logged with their data; 0: never
//! mapped_records = true             # 40-byte records copied into a mapping of the segment
//!                                   #   (ext4, XFS, tmpfs only); false: written with pwritev
//! checkpoint_interval = "30s"       # background checkpoint (image synced) once the oldest
//!                                   #   change it would cover is this old; "off"
//! checkpoint_bytes = "256M"         #   ... and after this much log since the last one
//! hot_limit = 1024                  #   ... and when more extents than this turned hot (a
//!                                   #   host crash makes recovery re-log two intervals' worth;
//!                                   #   docs/changelog.md)
//! heat_ahead = 32                   # a sequential writer heats this many extents ahead of
//!                                   #   itself (one log sync per window, not per extent); 0: off
//!
//! [[disk]]
//! name = "web01-os"
//! image = "/var/lib/images/web01-os.raw"
//! read_only = false
//! tracked = true                    # keep a change log for this disk
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::changelog::LogOptions;
use crate::units::{parse_duration, parse_size};

/// Default NBD listen address (the IANA NBD port on loopback).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration {path} is invalid: {reason}")]
    Parse { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub listen: Option<String>,
    pub socket: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls_required: bool,
    pub tls_client_ca: Option<PathBuf>,
    #[serde(default)]
    pub insecure_no_tls: bool,
    pub handshake_timeout: Option<u64>,
    pub idle_timeout: Option<u64>,
    pub reply_timeout: Option<u64>,
    pub max_sessions: Option<usize>,
    pub max_sessions_per_client: Option<usize>,
    pub memory_budget: Option<String>,
    /// Export name → client identities allowed to open it.
    #[serde(default)]
    pub allow: BTreeMap<String, Vec<String>>,
}

/// HTTP API settings (`[api]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub insecure_no_tls: bool,
    /// Default true.
    pub enabled: Option<bool>,
}

/// A disk declared in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredDisk {
    pub name: String,
    /// Raw image; relative paths are relative to the data directory.
    pub image: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Stable identity; defaults to "config-NAME".
    pub id: Option<String>,
    /// Keep a change log for this disk.
    #[serde(default)]
    pub tracked: bool,
}

/// Change-log settings (`[log]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Segment size limit, e.g. "64M" (default 64 MiB).
    pub segment_size: Option<String>,
    /// Absolute free-space floor of the log's file system, e.g. "1G" (default 1 GiB).
    pub min_free: Option<String>,
    /// Free-space floor in percent of the file system (default 5).
    pub min_free_percent: Option<u8>,
    /// Smallest write logged as an extent, e.g. "64K" (default), or "off".
    pub extent_min: Option<String>,
    /// Bytes of small writes whose logging waits for the next FLUSH or cut, e.g. "1G"
    /// (default), or "off".
    pub defer_max: Option<String>,
    /// Deferred bytes from which a FLUSH syncs the image instead of logging them, e.g.
    /// "64M" (default), or "off".
    pub image_flush_min: Option<String>,
    /// Small writes per FLUSH up to which they are logged with their data (default 8), or 0.
    pub flush_heavy_writes: Option<u32>,
    /// Records without data copied into a mapping of the segment (default true).
    pub mapped_records: Option<bool>,
    /// Time between background checkpoints, e.g. "30s" (default), or "off".
    pub checkpoint_interval: Option<String>,
    /// Log bytes between checkpoints, e.g. "256M" (default).
    pub checkpoint_bytes: Option<String>,
    /// Hot extents that ask for a checkpoint (default 1024).
    pub hot_limit: Option<usize>,
    /// Extents a sequential writer heats ahead of itself (default 32), or 0.
    pub heat_ahead: Option<u16>,
}

/// A `[log]` size that may be "off" (0); an explicit 0 is refused, as it reads like "no
/// limit" to some and "never" to others.
fn size_or_off(key: &str, s: &str) -> Result<u64, String> {
    if s == "off" {
        return Ok(0);
    }
    match parse_size(s).map_err(|e| format!("log.{key}: {e}"))? {
        0 => Err(format!(
            "log.{key} must be more than 0 (or \"off\"), got {s}"
        )),
        n => Ok(n),
    }
}

impl LogConfig {
    /// The change-log options these settings describe.
    pub fn options(&self) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        if let Some(s) = &self.segment_size {
            o.segment_size = parse_size(s).map_err(|e| format!("log.segment_size: {e}"))?;
            if o.segment_size < 4096 {
                return Err(format!("log.segment_size must be at least 4K, got {s}"));
            }
        }
        if let Some(s) = &self.min_free {
            o.min_free_bytes = parse_size(s).map_err(|e| format!("log.min_free: {e}"))?;
        }
        if let Some(p) = self.min_free_percent {
            if p > 100 {
                return Err(format!("log.min_free_percent must be 0-100, got {p}"));
            }
            o.min_free_percent = p;
        }
        match self.extent_min.as_deref() {
            None => {}
            Some("off") => o.extent_min = u64::MAX,
            Some(s) => {
                o.extent_min = parse_size(s).map_err(|e| format!("log.extent_min: {e}"))?;
                if o.extent_min < 4096 {
                    return Err(format!(
                        "log.extent_min must be at least 4K (or \"off\"), got {s}"
                    ));
                }
            }
        }
        if let Some(s) = &self.defer_max {
            o.defer_max = size_or_off("defer_max", s)?;
        }
        if let Some(s) = &self.image_flush_min {
            o.image_flush_min = size_or_off("image_flush_min", s)?;
        }
        if let Some(n) = self.flush_heavy_writes {
            o.flush_heavy_writes = n;
        }
        if let Some(b) = self.mapped_records {
            o.mapped_records = b;
        }
        match self.checkpoint_interval.as_deref() {
            None => {}
            Some("off") => o.checkpoint_interval = None,
            Some(s) => {
                let d = parse_duration(s).map_err(|e| format!("log.checkpoint_interval: {e}"))?;
                if d.is_zero() {
                    return Err(format!(
                        "log.checkpoint_interval must be at least 1s (or \"off\"), got {s}"
                    ));
                }
                o.checkpoint_interval = Some(d);
            }
        }
        if let Some(s) = &self.checkpoint_bytes {
            o.checkpoint_bytes = parse_size(s).map_err(|e| format!("log.checkpoint_bytes: {e}"))?;
            if o.checkpoint_bytes < 1 << 20 {
                return Err(format!("log.checkpoint_bytes must be at least 1M, got {s}"));
            }
        }
        if let Some(n) = self.hot_limit {
            if n == 0 {
                return Err("log.hot_limit must be at least 1, got 0".to_string());
            }
            o.hot_limit = n;
        }
        if let Some(n) = self.heat_ahead {
            o.heat_ahead = n;
        }
        Ok(o)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub serve: ServeConfig,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DeclaredDisk>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub api: ApiConfig,
}

impl Config {
    /// Parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        c.log.options()?;
        Ok(c)
    }

    /// The explicit file if given, else `DATA_DIR/standby.toml` if it exists, else defaults.
    pub fn locate(explicit: Option<&Path>, data_dir: &Path) -> Result<Self, ConfigError> {
        match explicit {
            Some(p) => Self::load(p),
            None => {
                let p = data_dir.join("standby.toml");
                if p.exists() {
                    Self::load(&p)
                } else {
                    Ok(Self::default())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_reject_typos() {
        let c = Config::parse(
            "[serve]\nlisten = \"127.0.0.1:1\"\n[[disk]]\nname = \"a\"\nimage = \"a.raw\"\n",
        )
        .unwrap();
        assert_eq!(c.serve.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(c.disks.len(), 1);
        let c = Config::parse("[api]\nlisten = \"127.0.0.1:9\"\nenabled = false\n").unwrap();
        assert_eq!(c.api.listen.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(c.api.enabled, Some(false));
        assert!(Config::parse("[api]\nport = 1\n").is_err());
        let e = Config::parse("[serve]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(e.contains("listen_addr"), "{e}");
    }

    #[test]
    fn log_settings_and_tracked_flag() {
        let c = Config::parse(
            "[log]\nsegment_size = \"1M\"\nmin_free_percent = 1\n[[disk]]\nname = \"a\"\nimage = \"a.raw\"\ntracked = true\n",
        )
        .unwrap();
        assert!(c.disks[0].tracked);
        let o = c.log.options().unwrap();
        assert_eq!(o.segment_size, 1 << 20);
        assert_eq!(o.min_free_percent, 1);
        assert_eq!(
            Config::default().log.options().unwrap(),
            LogOptions::default()
        );
        assert!(Config::parse("[log]\nsegment_size = \"12X\"\n").is_err());
        assert!(Config::parse("[log]\nmin_free_percent = 101\n").is_err());
        let ext = |v: &str| {
            Config::parse(&format!("[log]\nextent_min = \"{v}\"\n")).and_then(|c| c.log.options())
        };
        assert_eq!(ext("1M").unwrap().extent_min, 1 << 20);
        assert_eq!(ext("off").unwrap().extent_min, u64::MAX);
        assert!(ext("1K").unwrap_err().contains("at least 4K"));
        assert_eq!(o.extent_min, crate::changelog::extent::DEFAULT_EXTENT_MIN);
        let defer = |v: &str| {
            Config::parse(&format!("[log]\ndefer_max = \"{v}\"\n")).and_then(|c| c.log.options())
        };
        assert_eq!(defer("64M").unwrap().defer_max, 64 << 20);
        assert_eq!(defer("off").unwrap().defer_max, 0);
        assert!(defer("0").unwrap_err().contains("log.defer_max"));
        assert!(defer("lots").unwrap_err().contains("log.defer_max"));
        assert_eq!(o.defer_max, crate::changelog::DEFAULT_DEFER_MAX);
        let image = |v: &str| {
            Config::parse(&format!("[log]\nimage_flush_min = \"{v}\"\n"))
                .and_then(|c| c.log.options())
        };
        assert_eq!(image("8M").unwrap().image_flush_min, 8 << 20);
        assert_eq!(image("off").unwrap().image_flush_min, 0);
        assert!(image("0").unwrap_err().contains("log.image_flush_min"));
        assert!(image("some").unwrap_err().contains("log.image_flush_min"));
        assert_eq!(o.image_flush_min, crate::changelog::DEFAULT_IMAGE_FLUSH_MIN);
        let heavy = |v: &str| {
            Config::parse(&format!("[log]\nflush_heavy_writes = {v}\n"))
                .and_then(|c| c.log.options())
        };
        assert_eq!(heavy("32").unwrap().flush_heavy_writes, 32);
        assert_eq!(heavy("0").unwrap().flush_heavy_writes, 0);
        assert!(heavy("-1").is_err());
        assert!(heavy("\"off\"").is_err());
        assert_eq!(
            o.flush_heavy_writes,
            crate::changelog::DEFAULT_FLUSH_HEAVY_WRITES
        );
        let mapped = |v: &str| {
            Config::parse(&format!("[log]\nmapped_records = {v}\n")).and_then(|c| c.log.options())
        };
        assert!(!mapped("false").unwrap().mapped_records);
        assert!(mapped("true").unwrap().mapped_records);
        assert!(mapped("\"no\"").is_err());
        assert!(o.mapped_records);
    }

    #[test]
    fn checkpoint_settings() {
        let opts = |t: &str| Config::parse(&format!("[log]\n{t}\n")).and_then(|c| c.log.options());
        let o = opts("checkpoint_interval = \"30s\"\ncheckpoint_bytes = \"1G\"\nhot_limit = 4096")
            .unwrap();
        assert_eq!(
            o.checkpoint_interval,
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(o.checkpoint_bytes, 1 << 30);
        assert_eq!(o.hot_limit, 4096);
        assert_eq!(opts("heat_ahead = 0").map(|o| o.heat_ahead), Ok(0));
        assert_eq!(opts("heat_ahead = 8").map(|o| o.heat_ahead), Ok(8));
        assert!(opts("heat_ahead = 70000").is_err());
        assert!(opts("heat_ahead = -1").is_err());
        assert_eq!(
            opts("checkpoint_interval = \"2m\"")
                .unwrap()
                .checkpoint_interval,
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(
            opts("checkpoint_interval = \"off\"")
                .unwrap()
                .checkpoint_interval,
            None
        );
        let d = LogOptions::default();
        assert_eq!(
            d.checkpoint_interval,
            Some(crate::changelog::DEFAULT_CHECKPOINT_INTERVAL)
        );
        assert_eq!(
            d.checkpoint_bytes,
            crate::changelog::DEFAULT_CHECKPOINT_BYTES
        );
        assert_eq!(d.hot_limit, crate::changelog::DEFAULT_HOT_LIMIT);
        let e = opts("checkpoint_interval = \"5x\"").unwrap_err();
        assert!(e.contains("log.checkpoint_interval"), "{e}");
        assert!(opts("checkpoint_interval = \"0s\"")
            .unwrap_err()
            .contains("at least 1s"));
        assert!(opts("checkpoint_bytes = \"4K\"")
            .unwrap_err()
            .contains("at least 1M"));
        assert!(opts("checkpoint_bytes = \"lots\"")
            .unwrap_err()
            .contains("log.checkpoint_bytes"));
        assert!(opts("hot_limit = 0").unwrap_err().contains("at least 1"));
        assert!(opts("hot_limit = -1").is_err());
        assert!(opts("hot_limit = \"many\"").is_err());
    }
}
