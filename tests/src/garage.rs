//! A real S3 server for tests: a single-node Garage (<https://garagehq.deuxfleurs.fr>) on
//! 127.0.0.1 with ports chosen per run, a key and a bucket, stopped (SIGTERM) on drop.
//!
//! The `garage` binary is looked up on PATH and in ~/.cargo/bin
//! (`cargo install garage --version 2.5.0 --locked`). If it is missing, [`Garage::start`]
//! panics with instructions: S3 tests fail rather than silently pass. Every test that starts
//! Garage has `s3` in its name (or lives in a test binary named so): `STANDBY_SKIP_S3=1
//! tools/test-all.sh` leaves them out with a nextest filter, so they are reported as skipped,
//! never as passed (and that is refused under `CI=true`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;
use replica_store::backend::s3::{S3Backend, S3Config};
use replica_store::testing::BackendFactory;
use replica_store::Backend;

/// Region Garage is configured with.
pub const REGION: &str = "garage";

/// A running Garage server.
pub struct Garage {
    child: Option<Child>,
    bin: PathBuf,
    config: PathBuf,
    dir: tempfile::TempDir,
    /// S3 endpoint URL, e.g. `http://127.0.0.1:39123`.
    pub s3_endpoint: String,
    /// Admin API address (`127.0.0.1:PORT`).
    pub admin_addr: String,
    /// Access key id with read/write/owner rights on [`Garage::bucket`].
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
    /// Bucket created at start.
    pub bucket: String,
}

impl std::fmt::Debug for Garage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Garage({}, bucket {})", self.s3_endpoint, self.bucket)
    }
}

/// Path of the garage binary, if installed.
pub fn garage_binary() -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("garage");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".cargo/bin/garage");
    p.is_file().then_some(p)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free TCP port on 127.0.0.1")
}

fn random_hex(n: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| format!("{:x}", rng.gen_range(0..16u8)))
        .collect()
}

/// Minimal HTTP GET returning the status code.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

impl Garage {
    /// Start a single-node Garage with a key and a bucket and wait until it is healthy.
    pub fn start() -> Garage {
        let bin = garage_binary().unwrap_or_else(|| {
            panic!(
                "the `garage` binary (S3 server used by the replica-store tests) is not on PATH \
                 nor in ~/.cargo/bin. Install it with `cargo install garage --version 2.5.0 \
                 --locked` (about 15 minutes; the README's test command does it), or run \
                 `STANDBY_SKIP_S3=1 tools/test-all.sh` to leave the real-S3 tests out"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("standby-garage-")
            .tempdir()
            .expect("tempdir");
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        let text = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
            secret = random_hex(64),
        );
        std::fs::write(&config, text).expect("writing garage config");
        let access_key = format!("GK{}", random_hex(24));
        let secret_key = random_hex(64);
        let bucket = format!("standby-test-{}", random_hex(8));
        let mut g = Garage {
            child: None,
            bin,
            config,
            dir,
            s3_endpoint: format!("http://127.0.0.1:{s3}"),
            admin_addr: format!("127.0.0.1:{admin}"),
            access_key,
            secret_key,
            bucket,
        };
        g.spawn();
        g
    }

    fn spawn(&mut self) {
        let log_path = self.dir.path().join("garage.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("garage log file");
        let log2 = log.try_clone().expect("garage log file");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_key)
            .env("GARAGE_DEFAULT_BUCKET", &self.bucket)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        let g = self;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_status(&g.admin_addr, "/health") == Some(200) {
                break;
            }
            if let Some(Ok(Some(status))) = g.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "garage exited with {status} during start-up; log:\n{}",
                    g.log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!("garage not healthy after 30 s; log:\n{}", g.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (an outage); [`Garage::restart`] brings it back with the same data,
    /// ports and keys.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again after [`Garage::stop`].
    pub fn restart(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Last lines of the server log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Working directory of the server (config, data, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An S3 client configuration for `g`'s bucket, objects under `prefix`.
pub fn s3_config(g: &Garage, prefix: &str) -> S3Config {
    S3Config {
        endpoint: Some(g.s3_endpoint.clone()),
        region: Some(REGION.into()),
        bucket: g.bucket.clone(),
        prefix: prefix.into(),
        path_style: true,
        access_key_id: Some(g.access_key.clone()),
        secret_access_key: Some(g.secret_key.clone()),
        ..Default::default()
    }
}

/// The replica store's conformance suite's backend factory on a real Garage: each `fresh`
/// backend is its own prefix of the one bucket.
pub struct S3Factory {
    pub garage: Garage,
    n: AtomicU32,
}

impl S3Factory {
    /// Start Garage and wait until the default bucket answers.
    pub async fn start() -> S3Factory {
        let garage = Garage::start();
        let probe = S3Backend::connect(&s3_config(&garage, "probe"))
            .await
            .expect("S3 client");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match probe.list("").await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for the bucket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("garage bucket not usable: {e}\n{}", garage.log_tail()),
            }
        }
        S3Factory {
            garage,
            n: AtomicU32::new(0),
        }
    }
}

#[async_trait]
impl BackendFactory for S3Factory {
    async fn fresh(&self, name: &str) -> Arc<dyn Backend> {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        Arc::new(
            S3Backend::connect(&s3_config(&self.garage, &format!("{name}-{n}")))
                .await
                .expect("S3 client"),
        )
    }
}
