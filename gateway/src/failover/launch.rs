//! The failover command: how the gateway launches a test failover's VM, reaps it, and how
//! the test failover's cleanup stops it.
//!
//! **No shell.** The configured template is split into words once, as a shell would split a
//! simple command (blanks separate words; `'…'` and `"…"` quote, `\` escapes one character;
//! nothing else is special: no variables, globs, pipes or redirections). Placeholders are
//! then replaced *inside* each word, so a value always stays within the one argument it
//! appears in: a VM, disk or point name read from the store can never add an argument, a
//! redirection or a second command. The first word is executed directly.
//!
//! A value that would begin an argument with `-` (an option) is refused; VM, disk and point
//! names cannot begin with `-` ([`replica_store::point::validate_name`]), NBD URIs begin with
//! `nbd://`, so this only stops a data directory named `-…`.
//!
//! The values are also in the environment: `STANDBY_VM`, `STANDBY_POINT`, `STANDBY_DIR`,
//! `STANDBY_NBD_ADDR`, `STANDBY_DISK0`, `STANDBY_DISK1`, … and `STANDBY_DISK_NAMES` (the disk
//! names, space-separated). An admin who wants a shell writes one explicitly and reads
//! them from there, quoted: `sh -c 'exec qemu-system-x86_64 … -drive "file=$STANDBY_DISK0"'`.
//!
//! **Launching** ([`spawn`]): the argv is executed with stdin from `/dev/null`, stdout and
//! stderr appended to the VM log (after a first line naming the argv), the test failover's
//! directory as working directory, and in a session of its own (`setsid` in the child before
//! `exec`): a terminal's Ctrl-C or hang-up aimed at the gateway, or the gateway's exit or
//! restart, never reaches the VM. A thread of the gateway waits for the child (so it never
//! stays a zombie) and hands its exit status to a callback, which records it. Both the spawn
//! and the wait block: callers run [`spawn`] on a blocking thread.
//!
//! **Stopping.** The VM's pid is stored with the process's start time (field 22 of
//! `/proc/PID/stat`, in clock ticks since boot). [`stop_pid`] opens the pid as a pidfd,
//! checks that the process behind it still has that start time — a pid the kernel reused
//! for another process has another one — and only then signals it, through the pidfd (so
//! the check and the signal concern the same process): SIGTERM, then SIGKILL if it has not
//! exited after the grace period; it waits on the pidfd for the exit (no polling of the pid
//! with sleeps). It blocks for up to twice the grace period: run it on a blocking thread.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Why the failover command could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The template cannot be turned into an argv (quoting, a refused value).
    #[error("failover command: {0}")]
    Template(String),
    /// The test failover's directory or its VM log cannot be created.
    #[error("cannot create {}: {source}", path.display())]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The program could not be executed (missing, not executable, …).
    #[error("cannot execute {argv0:?}: {source}")]
    Spawn {
        argv0: String,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, LaunchError>;

fn bad_template(msg: impl Into<String>) -> LaunchError {
    LaunchError::Template(msg.into())
}

/// The values a failover command may use.
#[derive(Debug, Clone)]
pub struct LaunchValues<'a> {
    /// NBD address (`host:port`).
    pub addr: &'a str,
    pub vm: &'a str,
    pub point: &'a str,
    /// The test failover's directory (VM log and the like).
    pub dir: &'a Path,
    /// (disk name, export name), disks in name order.
    pub exports: &'a [(String, String)],
}

impl LaunchValues<'_> {
    fn placeholders(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("vm".to_string(), self.vm.to_string());
        m.insert("point".to_string(), self.point.to_string());
        m.insert("dir".to_string(), self.dir.display().to_string());
        for (i, (disk, export)) in self.exports.iter().enumerate() {
            let uri = format!("nbd://{}/{export}", self.addr);
            m.insert(format!("disk{i}"), uri.clone());
            m.insert(format!("disk:{disk}"), uri);
        }
        m
    }

    /// The environment given to the command.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("STANDBY_VM".to_string(), self.vm.to_string()),
            ("STANDBY_POINT".to_string(), self.point.to_string()),
            ("STANDBY_DIR".to_string(), self.dir.display().to_string()),
            ("STANDBY_NBD_ADDR".to_string(), self.addr.to_string()),
        ];
        for (i, (_, export)) in self.exports.iter().enumerate() {
            v.push((
                format!("STANDBY_DISK{i}"),
                format!("nbd://{}/{export}", self.addr),
            ));
        }
        let names: Vec<&str> = self.exports.iter().map(|e| e.0.as_str()).collect();
        v.push(("STANDBY_DISK_NAMES".to_string(), names.join(" ")));
        v
    }
}

/// Splits a command template into words (see the module documentation).
pub fn split_words(template: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if let Some(w) = cur.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err(bad_template("unterminated ' quote")),
                    }
                }
            }
            '"' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => w.push(c),
                            None => return Err(bad_template("ends with \\")),
                        },
                        Some(c) => w.push(c),
                        None => return Err(bad_template("unterminated \" quote")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => cur.get_or_insert_with(String::new).push(c),
                None => return Err(bad_template("ends with \\")),
            },
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = cur {
        words.push(w);
    }
    if words.is_empty() {
        return Err(bad_template("it is empty"));
    }
    Ok(words)
}

/// The argv of the failover command: words of the template, placeholders replaced within
/// each word. An unknown `{…}` is left as written.
pub fn expand(template: &str, v: &LaunchValues<'_>) -> Result<Vec<String>> {
    let ph = v.placeholders();
    let mut argv = Vec::new();
    for word in split_words(template)? {
        let mut out = String::new();
        let mut rest = word.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            match after.find('}').and_then(|close| {
                let name = &after[..close];
                ph.get(name).map(|val| (close, val))
            }) {
                Some((close, val)) => {
                    if out.is_empty() && val.starts_with('-') {
                        return Err(bad_template(format!(
                            "{{{}}} would begin an argument with '-' ({val:?}); refused",
                            &after[..close]
                        )));
                    }
                    out.push_str(val);
                    rest = &after[close + 1..];
                }
                None => {
                    out.push('{');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        argv.push(out);
    }
    Ok(argv)
}

/// Start time of process `pid` (clock ticks since boot), if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything: count fields
    // after the last ')'. Field 3 is the first after it; field 22 is the start time.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// How a VM process ended, as recorded by the thread that reaped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Its exit status, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
}

impl ExitRecord {
    pub fn from_status(s: ExitStatus) -> Self {
        Self {
            code: s.code(),
            signal: s.signal(),
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// "exited with status 3", "was killed by signal 9".
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            (None, None) => "exited".into(),
        }
    }
}

/// A launched VM process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`, read right after the spawn (the child cannot have been
    /// reaped yet: only our reaper thread waits for it, and it starts afterwards).
    pub start_time: u64,
}

/// Launches `argv` as described in the module documentation: working directory `dir`
/// (created), output to `log` (created, truncated), environment `env` added to the
/// gateway's. `on_exit(pid, how)` runs on the reaper thread once the process has exited and
/// been reaped. Blocks (fork/exec, file creation): call it on a blocking thread.
pub fn spawn(
    argv: &[String],
    env: &[(String, String)],
    dir: &Path,
    log: &Path,
    on_exit: impl FnOnce(u32, ExitRecord) + Send + 'static,
) -> Result<Spawned> {
    let Some((argv0, args)) = argv.split_first() else {
        return Err(bad_template("it is empty"));
    };
    let log_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LaunchError::Log { path, source }
    };
    std::fs::create_dir_all(dir).map_err(log_err(dir))?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(log)
        .map_err(log_err(log))?;
    writeln!(out, "standby: launching {argv:?}").map_err(log_err(log))?;
    let err = out.try_clone().map_err(log_err(log))?;
    let mut cmd = Command::new(argv0);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called; setsid(2) is one, and the closure touches
    // no memory of the parent (no allocation, no lock).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        argv0: argv0.clone(),
        source,
    })?;
    let pid = child.id();
    let start_time = start_time(pid).unwrap_or(0);
    let log_path = log.to_path_buf();
    let reaper = std::thread::Builder::new()
        .name(format!("vm-reaper-{pid}"))
        .spawn(move || {
            let rec = match child.wait() {
                Ok(s) => ExitRecord::from_status(s),
                Err(e) => {
                    tracing::warn!(pid, "waiting for the VM process failed: {e}");
                    ExitRecord {
                        code: None,
                        signal: None,
                    }
                }
            };
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&log_path) {
                let _ = writeln!(f, "standby: the VM process (pid {pid}) {}", rec.describe());
            }
            on_exit(pid, rec);
        });
    if let Err(e) = reaper {
        // No thread to wait for it: stop the child now and reap it here.
        if start_time != 0 {
            stop_pid(pid, start_time, Duration::from_secs(1));
        }
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child's pid, with a pointer to a local int that
        // outlives the call; the `Child` that owned the pid was dropped with the closure.
        unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        return Err(LaunchError::Spawn {
            argv0: argv0.clone(),
            source: e,
        });
    }
    Ok(Spawned { pid, start_time })
}

/// The last `n` lines of a log file (at most its last 4 KiB), for an error message.
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A pidfd for `pid`, if the process exists.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new file descriptor or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a descriptor the kernel just returned to us and nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_signal(fd: &OwnedFd, sig: i32) -> bool {
    // SAFETY: pidfd_send_signal(2) with a valid pidfd, a signal number, no siginfo (null
    // pointer: the kernel fills it in) and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

/// Waits until the process behind `fd` exits, at most `timeout`; true if it did.
fn pidfd_wait(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1; `p` outlives the call.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r > 0 {
            return true;
        }
        if r == 0 || Instant::now() >= deadline {
            return false;
        }
        // r < 0: EINTR; poll again.
    }
}

/// What [`stop_pid`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stopped {
    /// The process was gone already.
    #[serde(rename = "already_exited")]
    Gone,
    /// The pid now belongs to another process (other start time): not signalled.
    #[serde(rename = "pid_reused")]
    Reused,
    /// Stopped by SIGTERM.
    #[serde(rename = "stopped")]
    Terminated,
    /// Did not stop within the grace period: SIGKILL.
    Killed,
    /// No start time was recorded for the pid, so it could be another process's: not
    /// signalled.
    NotSignalled,
}

impl Stopped {
    /// What happened to the VM, for a job step and the CLI (`grace`: the TERM timeout).
    pub fn describe(self, grace: Duration) -> String {
        match self {
            Stopped::Gone => "already exited".into(),
            Stopped::Reused => {
                "already exited (its pid is now another process's: not signalled)".into()
            }
            Stopped::Terminated => "stopped (SIGTERM)".into(),
            Stopped::Killed => format!(
                "killed (SIGKILL: still running {} s after SIGTERM)",
                grace.as_secs()
            ),
            Stopped::NotSignalled => {
                "not signalled (no start time recorded for its pid: stop it yourself)".into()
            }
        }
    }
}

/// Stops the VM process `pid` that started at `started` (see the module documentation).
pub fn stop_pid(pid: u32, started: u64, grace: Duration) -> Stopped {
    let Some(fd) = pidfd_open(pid) else {
        return Stopped::Gone;
    };
    // The pidfd refers to the process that had `pid` when it was opened. If that process
    // is still running after the start time was read, it held `pid` all along, so the
    // start time read was its own.
    let t = start_time(pid);
    if pidfd_wait(&fd, Duration::ZERO) {
        return Stopped::Gone;
    }
    match t {
        None => return Stopped::Gone,
        Some(t) if t != started => return Stopped::Reused,
        Some(_) => {}
    }
    if !pidfd_signal(&fd, libc::SIGTERM) {
        return Stopped::Gone;
    }
    if pidfd_wait(&fd, grace) {
        return Stopped::Terminated;
    }
    pidfd_signal(&fd, libc::SIGKILL);
    pidfd_wait(&fd, grace);
    Stopped::Killed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals<'a>(dir: &'a Path, exports: &'a [(String, String)]) -> LaunchValues<'a> {
        LaunchValues {
            addr: "127.0.0.1:10809",
            vm: "vm",
            point: "20260101T000000.000Z-00",
            dir,
            exports,
        }
    }

    #[test]
    fn words_and_placeholders_stay_in_their_argument() {
        let ex = vec![("os".to_string(), "vm.os.test".to_string())];
        let dir = Path::new("/d/x y");
        let argv = expand(
            "qemu -drive file={disk0},format=raw 'a b' \"{dir}/s.log\" {disk:os} {nope} x\\ y",
            &vals(dir, &ex),
        )
        .unwrap();
        assert_eq!(
            argv,
            vec![
                "qemu",
                "-drive",
                "file=nbd://127.0.0.1:10809/vm.os.test,format=raw",
                "a b",
                "/d/x y/s.log",
                "nbd://127.0.0.1:10809/vm.os.test",
                "{nope}",
                "x y",
            ]
        );
        // Shell syntax is not interpreted: `;` and `$(…)` are plain characters of a word.
        let argv = expand("echo {vm};rm $(x)", &vals(dir, &ex)).unwrap();
        assert_eq!(argv, vec!["echo", "vm;rm", "$(x)"]);
        assert!(expand("a 'b", &vals(dir, &ex)).is_err());
        assert!(expand("   ", &vals(dir, &ex)).is_err());
    }

    /// The shell form documented in docs/failover.md reaches `sh -c` as one script.
    #[test]
    fn an_explicit_shell_gets_one_script() {
        let t =
            r#"sh -c 'exec qemu -drive "file=$STANDBY_DISK0,format=raw" 2>"$STANDBY_DIR/q.err"'"#;
        assert_eq!(
            split_words(t).unwrap(),
            vec![
                "sh",
                "-c",
                r#"exec qemu -drive "file=$STANDBY_DISK0,format=raw" 2>"$STANDBY_DIR/q.err""#
            ]
        );
    }

    #[test]
    fn a_value_never_becomes_an_option() {
        let ex = vec![];
        let dir = Path::new("-rf");
        assert!(expand("rm {dir}", &vals(dir, &ex)).is_err());
        // Inside a word (not at its start) it is only text.
        assert_eq!(
            expand("x --dir={dir}", &vals(dir, &ex)).unwrap(),
            vec!["x", "--dir=-rf"]
        );
    }

    #[test]
    fn stop_pid_leaves_a_reused_pid_alone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let t = start_time(pid).unwrap();
        // Another start time: the pid "belongs to another process" — nothing is signalled.
        assert_eq!(
            stop_pid(pid, t + 1, Duration::from_secs(5)),
            Stopped::Reused
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "a reused pid was signalled"
        );
        assert_eq!(
            stop_pid(pid, t, Duration::from_secs(5)),
            Stopped::Terminated
        );
        child.wait().unwrap();
    }

    fn session_of(pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 6 (session) is the fourth after the command name.
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()
    }

    #[test]
    fn spawn_runs_in_its_own_session_is_reaped_and_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("t/vm.log");
        let (tx, rx) = std::sync::mpsc::channel();
        let argv: Vec<String> = ["sh", "-c", "echo hello-$STANDBY_T; pwd; exec sleep 30"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let env = vec![("STANDBY_T".to_string(), "x".to_string())];
        let s = spawn(&argv, &env, &dir.path().join("t"), &log, move |pid, r| {
            let _ = tx.send((pid, r));
        })
        .unwrap();
        assert_eq!(session_of(s.pid), Some(s.pid), "not a session leader");
        assert_eq!(start_time(s.pid), Some(s.start_time));
        // Let the shell print before it is stopped.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("hello-x")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            stop_pid(s.pid, s.start_time, Duration::from_secs(5)),
            Stopped::Terminated
        );
        let (pid, rec) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(pid, s.pid);
        assert_eq!(rec.signal, Some(libc::SIGTERM));
        assert!(!rec.success());
        // Reaped: no zombie left behind.
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "zombie left");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.starts_with("standby: launching [\"sh\""), "{text}");
        assert!(text.contains("hello-x"), "{text}");
        assert!(
            text.contains(&dir.path().join("t").display().to_string()),
            "working directory: {text}"
        );
        assert!(text.contains("was killed by signal 15"), "{text}");
        assert!(log_tail(&log, 1).contains("was killed by signal 15"));
    }

    #[test]
    fn spawn_reports_exit_status_and_missing_programs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vm.log");
        let (tx, rx) = std::sync::mpsc::channel();
        let argv: Vec<String> = vec!["sh".into(), "-c".into(), "exit 3".into()];
        spawn(&argv, &[], dir.path(), &log, move |_, r| {
            let _ = tx.send(r);
        })
        .unwrap();
        let rec = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(rec.code, Some(3));
        assert_eq!(rec.describe(), "exited with status 3");
        let missing = vec!["/nonexistent/standby-vm".to_string()];
        match spawn(&missing, &[], dir.path(), &log, |_, _| {}) {
            Err(e @ LaunchError::Spawn { .. }) => {
                let m = e.to_string();
                assert!(
                    m.contains("/nonexistent/standby-vm") && m.contains("No such file"),
                    "{m}"
                );
            }
            other => panic!("expected a spawn error, got {other:?}"),
        }
    }
}
