//! The failover command: how a test failover launches its VM, and how its cleanup stops it.
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
//! **Stopping.** The VM's pid is stored with the process's start time (field 22 of
//! `/proc/PID/stat`, in clock ticks since boot). [`stop_pid`] opens the pid as a pidfd,
//! checks that the process behind it still has that start time — a pid the kernel reused
//! for another process has another one — and only then signals it, through the pidfd (so
//! the check and the signal concern the same process), and waits on the pidfd for its exit
//! (no polling of the pid with sleeps).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

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
                        None => bail!("failover command: unterminated ' quote"),
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
                            None => bail!("failover command: ends with \\"),
                        },
                        Some(c) => w.push(c),
                        None => bail!("failover command: unterminated \" quote"),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => cur.get_or_insert_with(String::new).push(c),
                None => bail!("failover command: ends with \\"),
            },
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = cur {
        words.push(w);
    }
    if words.is_empty() {
        bail!("failover command is empty");
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
                        bail!(
                            "failover command: {{{}}} would begin an argument with '-' ({val:?}); refused",
                            &after[..close]
                        );
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The process was gone already.
    Gone,
    /// The pid now belongs to another process (other start time): not signalled.
    Reused,
    /// Stopped by SIGTERM.
    Terminated,
    /// Did not stop within the grace period: SIGKILL.
    Killed,
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
}
