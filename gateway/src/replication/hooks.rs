//! The freeze and thaw hooks around an app-consistent cut: shell commands run with
//! `$STANDBY_VM` set, at most 300 s each; a non-zero exit fails the cycle with its stderr.

use std::time::Duration;

use super::engine::{ReplError, R};

pub(crate) async fn run_hook(what: &str, cmd: Option<&str>, vm: &str) -> R<()> {
    let Some(cmd) = cmd else {
        return Ok(());
    };
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("STANDBY_VM", vm)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .map_err(|_| ReplError::Hook {
            what: what.into(),
            message: "timed out after 300 s".into(),
        })?
        .map_err(|e| ReplError::Hook {
            what: what.into(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ReplError::Hook {
            what: what.into(),
            message: format!(
                "{} exited with {}: {}",
                cmd,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}
