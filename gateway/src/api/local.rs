//! The local admin credential: how the CLI on the gateway's host finds the running gateway's
//! API and is let in.
//!
//! When `standby serve` starts its API it draws a fresh secret (`sbl_` + 64 hex digits, 32
//! bytes from the OS) and writes [`LOCAL_FILE`] in the data directory — the API's URL (on
//! loopback when the API listens on a wildcard address), the secret, the gateway's pid and,
//! for HTTPS, the certificate the CLI pins. The file is created 0600 (only the data
//! directory's owner, who may already read every disk, can read it) under a temporary name
//! and renamed into place, so a reader never sees half of it. The gateway removes it at a
//! clean exit; after a crash the next start replaces it, and the CLI ignores a file whose pid
//! does not hold the data directory's lock.
//!
//! The secret is never stored anywhere else: only its SHA-256 stays in the gateway's memory,
//! and it is valid for this process only. Requests made with it act as the admin token
//! [`LOCAL_TOKEN_NAME`] (the name the API's request log shows).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of the discovery file inside the data directory.
pub const LOCAL_FILE: &str = "api.local.json";
/// The token name requests with the local credential carry.
pub const LOCAL_TOKEN_NAME: &str = "local-cli";
/// Prefix of a local secret.
pub const LOCAL_PREFIX: &str = "sbl_";

/// The content of [`LOCAL_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalAccess {
    /// Base URL of the API, `http[s]://IP:PORT/api/v1`.
    pub url: String,
    /// The secret: `Authorization: Bearer TOKEN`.
    pub token: String,
    /// The gateway's process id.
    pub pid: u32,
    /// For HTTPS: the certificate (PEM) the gateway serves, for the CLI to pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
}

/// The running gateway's credential; removes its file when dropped.
#[derive(Debug)]
pub struct LocalCredential {
    hash: [u8; 32],
    path: PathBuf,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The URL a local client uses for an API bound to `bound`.
pub fn local_url(bound: std::net::SocketAddr, https: bool) -> String {
    let ip = match bound.ip() {
        std::net::IpAddr::V4(a) if a.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(a) if a.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!(
        "{}://{}/api/v1",
        if https { "https" } else { "http" },
        std::net::SocketAddr::new(ip, bound.port())
    )
}

impl LocalCredential {
    /// Draws a secret and writes the discovery file of `data_dir`.
    pub fn create(
        data_dir: &Path,
        url: String,
        tls_cert: Option<PathBuf>,
    ) -> std::io::Result<LocalCredential> {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let token = format!(
            "{LOCAL_PREFIX}{}",
            secret
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let access = LocalAccess {
            url,
            token: token.clone(),
            pid: std::process::id(),
            tls_cert,
        };
        let path = data_dir.join(LOCAL_FILE);
        let tmp = data_dir.join(format!(".{LOCAL_FILE}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let text = serde_json::to_string_pretty(&access).map_err(std::io::Error::other)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(LocalCredential {
            hash: digest(&token),
            path,
        })
    }

    /// Whether `token` is this gateway's local secret.
    pub fn matches(&self, token: &str) -> bool {
        if !token.starts_with(LOCAL_PREFIX) {
            return false;
        }
        // Compares hashes of a 256-bit secret: timing tells nothing useful.
        digest(token) == self.hash
    }

    /// Removes the discovery file (at a clean exit; also done on drop).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// The discovery file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LocalCredential {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The discovery file of `data_dir`, if there is one (it may be stale: check its pid).
pub fn read(data_dir: &Path) -> std::io::Result<Option<LocalAccess>> {
    match std::fs::read_to_string(data_dir.join(LOCAL_FILE)) {
        Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", data_dir.join(LOCAL_FILE).display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn file_is_private_matches_only_its_secret_and_goes_away() {
        let d = tempfile::tempdir().unwrap();
        let c =
            LocalCredential::create(d.path(), "http://127.0.0.1:1/api/v1".into(), None).unwrap();
        let meta = std::fs::metadata(c.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let a = read(d.path()).unwrap().unwrap();
        assert!(c.matches(&a.token));
        assert!(!c.matches("sbl_00"));
        assert!(!c.matches(&a.token.replace("sbl_", "sbt_")));
        assert_eq!(a.pid, std::process::id());
        drop(c);
        assert!(read(d.path()).unwrap().is_none());
        assert_eq!(
            local_url("0.0.0.0:8080".parse().unwrap(), false),
            "http://127.0.0.1:8080/api/v1"
        );
    }
}
