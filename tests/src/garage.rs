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
    ports: [u16; 3],
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

/// A free port on 127.0.0.1 *outside* the kernel's ephemeral range, so that no socket another
/// test connects or binds to port 0 can take it between this check and Garage's own bind (an
/// ephemeral port picked by `bind(:0)` was taken that way in CI: Garage's S3 listener failed with
/// "Address already in use" while its admin API came up healthy). Two Garages picking the same
/// random port at once is still possible; [`Garage::start`] verifies and retries.
pub fn free_port() -> u16 {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // Below the ephemeral range when there is room there, else above it.
    let range = if lo > 12_000 {
        10_000..lo
    } else {
        hi.saturating_add(1).max(1025)..u16::MAX
    };
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(range.clone());
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 in {range:?}")
}

/// Ports on which process `pid` has a listening TCP socket (from /proc: the socket inodes of
/// its file descriptors matched against /proc/net/tcp's LISTEN entries).
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(ino.to_string());
                }
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if cols.len() < 10 || cols[3] != "0A" || !inodes.contains(cols[9]) {
                return None;
            }
            u16::from_str_radix(cols[1].rsplit(':').next()?, 16).ok()
        })
        .collect()
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
        Garage::start_with(None)
    }

    /// [`Garage::start`], with the first attempt on the given (rpc, s3, admin) ports: lets a
    /// test prove that a port taken by another process leads to a retry, not a broken server.
    pub fn start_with(first_ports: Option<[u16; 3]>) -> Garage {
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
        let access_key = format!("GK{}", random_hex(24));
        let secret_key = random_hex(64);
        let bucket = format!("standby-test-{}", random_hex(8));
        let config = dir.path().join("garage.toml");
        let mut g = Garage {
            child: None,
            bin,
            ports: [0; 3],
            config,
            dir,
            s3_endpoint: String::new(),
            admin_addr: String::new(),
            access_key,
            secret_key,
            bucket,
        };
        // Ports are checked free, then bound by Garage a moment later: another test's server
        // may win that race. Each attempt gets new ports and fresh directories.
        const ATTEMPTS: u32 = 5;
        for attempt in 1..=ATTEMPTS {
            g.configure(attempt, first_ports.filter(|_| attempt == 1));
            match g.spawn() {
                Ok(()) => return g,
                Err(e) if attempt < ATTEMPTS => {
                    eprintln!("garage start attempt {attempt} failed ({e}); new ports");
                    g.stop();
                }
                Err(e) => panic!("{e}; log:\n{}", g.log_tail()),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// Writes the configuration for start attempt `attempt`: new ports, its own directories.
    fn configure(&mut self, attempt: u32, ports: Option<[u16; 3]>) {
        let [rpc, s3, admin] = ports.unwrap_or_else(|| [free_port(), free_port(), free_port()]);
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
            meta = self.dir.path().join(format!("meta{attempt}")).display(),
            data = self.dir.path().join(format!("data{attempt}")).display(),
            secret = random_hex(64),
        );
        std::fs::write(&self.config, text).expect("writing garage config");
        self.ports = [rpc, s3, admin];
        self.s3_endpoint = format!("http://127.0.0.1:{s3}");
        self.admin_addr = format!("127.0.0.1:{admin}");
    }

    /// Starts the server on the configured ports and waits until it is healthy *and* holds
    /// all three of its listening sockets (its admin API answers even when the S3 listener
    /// failed to bind).
    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("garage.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("garage log file {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("garage log file: {e}"))?;
        // What this start writes to the log begins here (earlier attempts append too).
        let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
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
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("garage exited with {status} during start-up"));
            }
            let listening = listening_ports(pid);
            if self.ports.iter().all(|p| listening.contains(p))
                && http_status(&self.admin_addr, "/health") == Some(200)
            {
                return Ok(());
            }
            let new_log = std::fs::read(&log_path).unwrap_or_default();
            let new_log = new_log.get(log_start as usize..).unwrap_or_default();
            if String::from_utf8_lossy(new_log).contains("Address already in use") {
                return Err(format!(
                    "a port of {:?} was taken by another process",
                    self.ports
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "garage not healthy on ports {:?} after 30 s (listening on {listening:?})",
                    self.ports
                ));
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
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The ports are not held meanwhile: a listener that never accepts would turn the
        // outage into a hung server (connections queue instead of being refused). They lie
        // outside the ephemeral range, so only another Garage's random choice could take one,
        // and `restart` retries.
    }

    /// Starts the server again after [`Garage::stop`], on the same ports.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            return;
        }
        // A bind race (a socket in TIME_WAIT, another server's listener) is retried for a while.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("garage restart failed ({e}); retrying");
                    self.stop();
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("{e}; log:\n{}", self.log_tail()),
            }
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

    /// The `standby store init` arguments for a store in this server's bucket.
    pub fn store_init_args(&self) -> [&str; 7] {
        [
            "--s3-endpoint",
            &self.s3_endpoint,
            "--s3-bucket",
            &self.bucket,
            "--s3-region",
            "garage",
            "--path-style",
        ]
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
