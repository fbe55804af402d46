//! Helpers for tests of the HTTP API and /metrics: requests with curl (a real HTTP client) and
//! tokens made with the CLI.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::{require_tool, run_stdout, standby};

/// An answer: status code and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// Asserts an error answer: this status, the API's error shape, this code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        let j = self.json();
        assert_eq!(j["code"], code, "{}", self.body);
        let msg = j["error"].as_str().unwrap_or_default();
        assert!(
            msg.len() > 10,
            "an error message an admin can act on: {}",
            self.body
        );
    }
}

/// One request with curl. `token` goes into `Authorization: Bearer`; `body` is sent as JSON.
/// `extra`: more curl arguments (e.g. `--cacert`).
pub fn request(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
    extra: &[&str],
) -> Answer {
    let curl = require_tool("curl");
    let mut c = Command::new(curl);
    c.args([
        "-sS",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        "--max-time",
        "60",
    ]);
    c.args(extra);
    if let Some(t) = token {
        c.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    c.arg(url);
    let out = c.output().expect("run curl");
    assert!(
        out.status.success(),
        "curl {method} {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    Answer {
        status: code.trim().parse().expect("status code"),
        body: body.to_string(),
    }
}

/// `standby token create NAME [--read-only]`: the token.
pub fn token(dd: &Path, name: &str, read_only: bool) -> String {
    let mut c = standby(dd);
    c.args(["token", "create", name]);
    if read_only {
        c.arg("--read-only");
    }
    let t = run_stdout(&mut c).trim().to_string();
    assert!(t.starts_with("sbt_"), "token: {t}");
    t
}

/// The origin (`http://IP:PORT`) of an API base URL (`http://IP:PORT/api/v1`).
pub fn origin(api: &str) -> String {
    api.trim_end_matches("/api/v1").to_string()
}
