//! Harness for end-to-end tests: runs the real `standby` binary and real clients.
//!
//! Tests fail loudly (never skip) when a client tool they need is missing: install them with
//! the test command in the README.

pub mod api;
pub mod cli_json;
pub mod fuse;
pub mod garage;
pub mod nbd_client;
pub mod pki;
pub mod repl;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of the `standby` binary, built on first use in the same profile as the tests.
pub fn standby_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("STANDBY_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> → target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "standby-tools",
            "--bin",
            "standby",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("run cargo build for the standby binary");
        assert!(status.success(), "building the standby binary failed");
        let bin = profile_dir.join("standby");
        assert!(
            bin.exists(),
            "standby binary not found at {}",
            bin.display()
        );
        bin
    })
    .clone()
}

/// Fails the test with an actionable message when a client tool is missing.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("required test tool '{name}' is not installed: run the README's test command (it installs the test dependencies)");
}

/// Runs a command, failing the test with its output if it does not succeed.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command and returns its stdout as text.
pub fn run_stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// A `standby` CLI invocation on a data directory.
pub fn standby(data_dir: &Path) -> Command {
    let mut c = Command::new(standby_bin());
    c.arg("--data-dir").arg(data_dir);
    c.env_remove("STANDBY_CONFIG");
    c
}

/// A running `standby serve` process.
pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Base URL of the HTTP API (`http://IP:PORT/api/v1`), when it serves one.
    pub api: Option<String>,
    pub data_dir: PathBuf,
    stderr_log: PathBuf,
}

impl Gateway {
    /// Starts `standby serve` on an ephemeral loopback port and waits until it serves.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Gateway {
        Self::start_env(data_dir, extra, &[])
    }

    /// Like [`Gateway::start`], with extra environment variables (e.g. S3 credentials).
    pub fn start_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Gateway {
        let stderr_log = data_dir.join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(data_dir).expect("create data dir");
        let log = std::fs::File::create(&stderr_log).expect("create serve log");
        // Every test gateway serves its API on a port of its own (never the shared default
        // 8080, which parallel tests would race for), unless the test chooses.
        let api_chosen = extra
            .iter()
            .any(|a| a.starts_with("--api-listen") || *a == "--no-api");
        let mut cmd = standby(data_dir);
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        if !api_chosen {
            cmd.args(["--api-listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn standby serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut api = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("standby: API on ") {
                        api = Some(url.trim().to_string());
                    }
                    if let Some(rest) = line.split("nbd://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        let addr: SocketAddr = addr.parse().expect("bound address");
                        return Gateway {
                            child: Some(child),
                            addr,
                            api,
                            data_dir: data_dir.to_path_buf(),
                            stderr_log,
                        };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                    panic!("standby serve did not start within 60 s; its log:\n{log}");
                }
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    /// SIGTERM and wait: the clean shutdown path.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("child");
        wait_timeout(&mut child, Duration::from_secs(30))
    }

    /// SIGKILL and wait: a crash.
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

fn wait_timeout(child: &mut Child, t: Duration) -> ExitStatus {
    let deadline = Instant::now() + t;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {t:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One TCP connection as the kernel lists it in `/proc/net/tcp` (IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    pub local_port: u16,
    pub remote_port: u16,
    /// The kernel's state number (1 ESTABLISHED, 8 CLOSE_WAIT, 9 LAST_ACK, 6 TIME_WAIT, ...).
    pub state: u8,
    /// Bytes received and not yet read by the socket's owner.
    pub rx_queue: u64,
}

/// The gateway's side of the connection from `client_port` to `server_port`, if it is open.
pub fn server_side(server_port: u16, client_port: u16) -> Option<TcpEntry> {
    let text = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next()?, 16).ok();
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let e = TcpEntry {
            local_port: port(f.get(1)?)?,
            remote_port: port(f.get(2)?)?,
            state: u8::from_str_radix(f.get(3)?, 16).ok()?,
            rx_queue: u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?,
        };
        (e.local_port == server_port && e.remote_port == client_port).then_some(e)
    })
}

/// Waits until the gateway has closed its side of a connection (its socket is no longer
/// ESTABLISHED or CLOSE_WAIT). The NBD server closes a connection only after every request it
/// accepted on it has completed, so afterwards nothing that connection sent can still change a
/// disk.
pub fn wait_server_closed(server_port: u16, client_port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while let Some(e) = server_side(server_port, client_port) {
        if e.state != 1 && e.state != 8 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway kept the connection from port {client_port} open for {timeout:?}: {e:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the gateway has read every byte a client sent on a connection (its socket's
/// receive queue is empty).
pub fn wait_server_read_all(server_port: u16, client_port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let e = server_side(server_port, client_port)
            .unwrap_or_else(|| panic!("no connection from port {client_port} to {server_port}"));
        if e.rx_queue == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway left {} bytes unread for {timeout:?}",
            e.rx_queue
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A temporary directory for one test (kept on failure when STANDBY_KEEP_TEST_DIRS is set).
pub fn test_dir(name: &str) -> tempfile::TempDir {
    let base = std::env::var_os("STANDBY_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("test tmp base");
    tempfile::Builder::new()
        .prefix(&format!("standby-{name}-"))
        .tempdir_in(base)
        .expect("tempdir")
}

/// Fills a file with deterministic pseudo-random bytes.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    use rand::{RngCore, SeedableRng};
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.flush().expect("flush");
}
