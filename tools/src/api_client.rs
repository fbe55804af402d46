//! How the CLI reaches a running gateway: its HTTP API, found through the data directory.
//!
//! [`target`] decides, for a mutating command, where it goes:
//! - no `standby serve` holds the data directory's lock → [`Target::Offline`]: the command
//!   validates and writes the state database itself; the gateway reads it when it starts;
//! - a gateway holds the lock → [`Target::Gateway`]: the command is sent to its API with the
//!   local admin credential it wrote at start (`DATA_DIR/api.local.json`, see
//!   [`gateway::api::local`]), and the gateway's engine carries it out at once. The CLI never
//!   writes the state database while a gateway runs: a gateway without its API (`--no-api`)
//!   or whose credential file is missing or from another run is an error that says so.
//!
//! The lock holder is found without touching the lock (taking it, even briefly, could make a
//! starting gateway fail): the pid written in `serve.lock` counts only if that process has the
//! lock file open (`/proc/PID/fd`). Errors from the API print the API's own message (the
//! sentence an admin acts on).
//!
//! HTTP/1.1 over TCP with hyper's client, one connection per request. A gateway whose API
//! serves HTTPS is reached with its certificate pinned: the CLI accepts exactly the
//! certificate the credential file names, nothing else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use gateway::api::local::{self, LocalAccess, LOCAL_FILE};
use gateway::datadir_lock::LOCK_FILE;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

/// Where a mutating command goes.
pub enum Target {
    /// A gateway serves the data directory: through its API.
    Gateway(Api),
    /// No gateway runs: the CLI writes the state database itself.
    Offline,
}

/// The pid of the `standby serve` holding `data_dir`'s lock, if one does.
pub fn lock_holder(data_dir: &Path) -> Option<u32> {
    let lock = data_dir.join(LOCK_FILE);
    let pid: u32 = std::fs::read_to_string(&lock).ok()?.trim().parse().ok()?;
    let lock = std::fs::canonicalize(&lock).ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == lock))
        .then_some(pid)
}

/// Where a mutating command on `data_dir` goes (see the module documentation).
pub fn target(data_dir: &Path) -> Result<Target> {
    let Some(pid) = lock_holder(data_dir) else {
        return Ok(Target::Offline);
    };
    let file = data_dir.join(LOCAL_FILE);
    let access = local::read(data_dir)
        .with_context(|| format!("reading the gateway's API credential {}", file.display()))?;
    match access {
        None => bail!(
            "a gateway (pid {pid}) serves {} without its HTTP API ({} is missing): this command \
             goes through the API while a gateway runs. Restart `standby serve` with its API \
             (not --no-api, [api] enabled = true), or stop it to change the state offline",
            data_dir.display(),
            file.display()
        ),
        Some(a) if a.pid != pid => bail!(
            "a gateway (pid {pid}) serves {}, but {} belongs to another run (pid {}): restart \
             `standby serve` so that it writes its credential again",
            data_dir.display(),
            file.display(),
            a.pid
        ),
        Some(a) => Ok(Target::Gateway(Api::new(a, file)?)),
    }
}

/// A running gateway's API.
pub struct Api {
    access: LocalAccess,
    file: PathBuf,
    host: String,
    base: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// Percent-encodes a path segment (names are validated, so this is belt and braces).
pub fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Api {
    fn new(access: LocalAccess, file: PathBuf) -> Result<Api> {
        let bad = || anyhow!("{}: bad API URL {:?}", file.display(), access.url);
        let (https, rest) = if let Some(r) = access.url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = access.url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(bad());
        };
        let (host, path) = rest.split_once('/').ok_or_else(bad)?;
        let tls = if https {
            let cert = access.tls_cert.clone().ok_or_else(|| {
                anyhow!(
                    "{}: the API serves HTTPS but the file names no certificate",
                    file.display()
                )
            })?;
            Some(crate::pinned_tls::connector(&cert)?)
        } else {
            None
        };
        Ok(Api {
            host: host.to_string(),
            base: format!("/{path}"),
            access,
            file,
            tls,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(hyper::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(hyper::Method::POST, path, body).await
    }

    async fn call(&self, method: hyper::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: &dyn std::fmt::Display| {
            anyhow!(
                "cannot reach the gateway's API at {} (pid {}): {e}",
                self.access.url,
                self.access.pid
            )
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&self.host),
        )
        .await
        .map_err(|_| unreachable(&"no connection within 10 s"))?
        .map_err(|e| unreachable(&e))?;
        let body_bytes = match &body {
            Some(v) => Bytes::from(serde_json::to_vec(v)?),
            None => Bytes::new(),
        };
        let mut req = hyper::Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(hyper::header::HOST, &self.host)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.access.token),
            );
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body_bytes))
            .context("building the API request")?;
        let resp = match &self.tls {
            None => send(hyper_util::rt::TokioIo::new(tcp), req).await,
            Some(c) => {
                let name = rustls::pki_types::ServerName::try_from("standby-gateway")
                    .map_err(|e| anyhow!("{e}"))?;
                let s = c
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(&format!("TLS: {e}")))?;
                send(hyper_util::rt::TokioIo::new(s), req).await
            }
        }
        .map_err(|e| unreachable(&e))?;
        let (status, bytes) = resp;
        let text = String::from_utf8_lossy(&bytes);
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).with_context(|| {
                format!("the API's answer to {method} {url} is not JSON: {text}")
            });
        }
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("HTTP {status}: {text}"));
        if status == hyper::StatusCode::UNAUTHORIZED {
            bail!(
                "the gateway (pid {}) refused the CLI's local credential from {}: {message}. \
                 The file must be the one this gateway wrote at start: restart `standby serve` \
                 to write it again",
                self.access.pid,
                self.file.display()
            );
        }
        Err(anyhow!(message))
    }
}

async fn send<IO>(
    io: IO,
    req: hyper::Request<Full<Bytes>>,
) -> std::result::Result<(hyper::StatusCode, Bytes), String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    drop(sender);
    let _ = conn.await;
    Ok((status, bytes))
}

/// Waits for a job the API started to end (`tick` gets its percent), up to `wait`; its view.
pub async fn wait_job(
    api: &Api,
    job: i64,
    wait: Duration,
    mut tick: impl FnMut(f64),
) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let j = api.get(&format!("/jobs/{job}")).await?;
        tick(j["progress_percent"].as_f64().unwrap_or(0.0));
        if j["state"].as_str() != Some("running") {
            return Ok(j);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "job {job} is still running after {} s: the gateway carries on with it (see \
                 `standby job show {job}`)",
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
