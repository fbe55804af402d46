//! FUSE, loop-device and mount helpers for tests (root, /dev/fuse and /dev/loop* needed).
//! Every mount, loop device and file system mounted is released by a Drop guard.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{require_tool, run, run_stdout, standby};

pub fn is_mounted(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let want = dir.to_string_lossy().replace(' ', "\\040");
    text.lines()
        .any(|l| l.split(' ').nth(1).is_some_and(|p| p == want))
}

/// A running `standby mount DIR`; SIGTERM and lazy unmount on drop.
pub struct FuseMount {
    child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl FuseMount {
    pub fn start(data_dir: &Path, dir: &Path) -> FuseMount {
        Self::start_with(data_dir, dir, &[])
    }

    /// `standby mount DIR` with extra arguments (e.g. `--replicas-only`).
    pub fn start_with(data_dir: &Path, dir: &Path, extra: &[&str]) -> FuseMount {
        require_tool("fusermount3");
        std::fs::create_dir_all(dir).unwrap();
        let dir = std::fs::canonicalize(dir).unwrap();
        let log = data_dir.with_extension(format!(
            "mount-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let mut child = standby(data_dir)
            .arg("mount")
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn standby mount");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut m = FuseMount {
            child: Some(child),
            dir: dir.clone(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => assert_eq!(line, format!("standby: mounted at {}", dir.display())),
            Err(_) => panic!(
                "standby mount did not report a mount within 60 s; its log:\n{}",
                m.log_text()
            ),
        }
        assert!(is_mounted(&dir), "{} not in /proc/mounts", dir.display());
        m.dir = dir;
        m
    }

    pub fn disk(&self, name: &str) -> PathBuf {
        self.dir.join("disks").join(name)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child
            .as_ref()
            .map(|c| c.id() as libc::pid_t)
            .unwrap_or(0)
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "standby mount did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; the process must exit 0 and leave nothing mounted.
    pub fn stop_ok(self) {
        let dir = self.dir.clone();
        let log = self.log.clone();
        let status = self.stop();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(status.code(), Some(0), "exit status {status}; log:\n{text}");
        assert!(
            !is_mounted(&dir),
            "still mounted after SIGTERM; log:\n{text}"
        );
    }

    /// SIGKILL: a crash that leaves the mount behind (lazily unmounted when the returned
    /// guard is dropped).
    pub fn kill9(mut self) -> StaleMount {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        StaleMount(std::mem::take(&mut self.dir))
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.dir.as_os_str().is_empty() && is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A mount left by a killed `standby mount`; lazily unmounted on drop.
pub struct StaleMount(pub PathBuf);

impl Drop for StaleMount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A loop device on a file; detached on drop.
pub struct LoopDev(pub String);

impl LoopDev {
    pub fn attach(file: &Path, read_only: bool) -> LoopDev {
        require_tool("losetup");
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if read_only {
            cmd.arg("--read-only");
        }
        let dev = run_stdout(cmd.arg(file)).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev(dev)
    }

    pub fn detach(mut self) {
        run(Command::new("losetup").args(["-d", &self.0]));
        self.0.clear();
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
}

/// A kernel file system mounted on a directory; unmounted on drop.
pub struct KernelMount(pub PathBuf);

impl KernelMount {
    pub fn mount(dev: &str, dir: &Path, read_only: bool) -> KernelMount {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new("mount");
        if read_only {
            cmd.args(["-o", "ro"]);
        }
        run(cmd.arg(dev).arg(dir));
        KernelMount(dir.to_path_buf())
    }

    pub fn unmount(mut self) {
        run(Command::new("umount").arg(&self.0));
        self.0 = PathBuf::new();
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Asserts two files (or a file and a FUSE disk) have the same bytes, chunk by chunk.
pub fn same_content(a: &Path, b: &Path) {
    let (mut x, mut y) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut bx, mut by) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut off = 0u64;
    loop {
        let nx = read_full(&mut x, &mut bx);
        let ny = read_full(&mut y, &mut by);
        assert_eq!(nx, ny, "{} and {} differ in size", a.display(), b.display());
        if nx == 0 {
            return;
        }
        if bx[..nx] != by[..ny] {
            let i = bx[..nx]
                .iter()
                .zip(&by[..ny])
                .position(|(p, q)| p != q)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += nx as u64;
    }
}

pub fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}
