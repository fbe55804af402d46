//! The optional configuration file (`standby.toml`).
//!
//! ```toml
//! [serve]
//! listen = "127.0.0.1:10809"       # TCP address for NBD
//! socket = "/run/standby.sock"      # also serve on a Unix socket
//! tls_cert = "server-cert.pem"      # enable STARTTLS
//! tls_key = "server-key.pem"
//! tls_required = false              # refuse clients that do not start TLS
//!
//! [[disk]]
//! name = "web01-os"
//! image = "/var/lib/images/web01-os.raw"
//! read_only = false
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub serve: ServeConfig,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DeclaredDisk>,
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
        toml::from_str(text).map_err(|e| e.to_string())
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
        let e = Config::parse("[serve]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(e.contains("listen_addr"), "{e}");
    }
}
