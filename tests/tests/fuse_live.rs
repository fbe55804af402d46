//! `standby mount`: the FUSE view of live disks, driven by real loop devices, mkfs.ext4,
//! qemu-img/qemu-io, fallocate and the NBD server. Needs root, /dev/fuse and /dev/loop*.
//!
//! Every mount, loop device and file system mounted here is released by a Drop guard, so a
//! failing assertion leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use standby_e2e::{random_file, require_tool, run, run_stdout, standby, test_dir, Gateway};

const MIB: u64 = 1 << 20;

fn is_mounted(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let want = dir.to_string_lossy().replace(' ', "\\040");
    text.lines()
        .any(|l| l.split(' ').nth(1).is_some_and(|p| p == want))
}

/// A running `standby mount DIR`; SIGTERM and lazy unmount on drop.
struct FuseMount {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

impl FuseMount {
    fn start(data_dir: &Path, dir: &Path) -> FuseMount {
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

    fn disk(&self, name: &str) -> PathBuf {
        self.dir.join("disks").join(name)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> libc::pid_t {
        self.child
            .as_ref()
            .map(|c| c.id() as libc::pid_t)
            .unwrap_or(0)
    }

    /// SIGTERM and wait for the exit status.
    fn stop(mut self) -> ExitStatus {
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
    fn stop_ok(self) {
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
    fn kill9(mut self) -> StaleMount {
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
struct StaleMount(PathBuf);

impl Drop for StaleMount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A loop device on a file; detached on drop.
struct LoopDev(String);

impl LoopDev {
    fn attach(file: &Path, read_only: bool) -> LoopDev {
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

    fn detach(mut self) {
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
struct KernelMount(PathBuf);

impl KernelMount {
    fn mount(dev: &str, dir: &Path, read_only: bool) -> KernelMount {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new("mount");
        if read_only {
            cmd.args(["-o", "ro"]);
        }
        run(cmd.arg(dev).arg(dir));
        KernelMount(dir.to_path_buf())
    }

    fn unmount(mut self) {
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
fn same_content(a: &Path, b: &Path) {
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

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

fn setup(name: &str, disks: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let t = test_dir(name);
    let dd = t.path().join("data");
    for (disk, size) in disks {
        run(standby(&dd).args(["disk", "create", disk, "--size", size]));
    }
    (t, dd)
}

#[test]
fn ext4_on_a_loop_device_over_the_fuse_file_then_read_back_over_nbd() {
    require_tool("mkfs.ext4");
    require_tool("losetup");
    require_tool("qemu-img");
    require_tool("qemu-io");
    let (t, dd) = setup("fuse-ext4", &[("vm1", "128M")]);
    let fm = FuseMount::start(&dd, &t.path().join("mnt"));
    let file = fm.disk("vm1");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 128 * MIB);
    assert_eq!(std::fs::metadata(&file).unwrap().blksize(), 4096);

    // Known content, kept outside the disk for comparison.
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let files = [
        ("small", 1000u64, 1u64),
        ("one-mib", MIB, 2),
        ("odd", 3 * MIB + 123, 3),
        ("sub/big", 20 * MIB, 4),
    ];
    for (name, size, seed) in files {
        random_file(&src.join(name), size, seed);
    }

    let fsdir = t.path().join("fs");
    {
        let lo = LoopDev::attach(&file, false);
        run(Command::new("mkfs.ext4").args(["-q", &lo.0]));
        let km = KernelMount::mount(&lo.0, &fsdir, false);
        std::fs::create_dir_all(fsdir.join("sub")).unwrap();
        for (name, _, _) in files {
            std::fs::copy(src.join(name), fsdir.join(name)).unwrap();
        }
        run(&mut Command::new("sync"));
        km.unmount();
        lo.detach();
    }
    // Mounted again (read-only this time, through a new loop device): every file is intact.
    {
        let lo = LoopDev::attach(&file, true);
        let km = KernelMount::mount(&lo.0, &fsdir, true);
        for (name, _, _) in files {
            same_content(&src.join(name), &fsdir.join(name));
        }
        km.unmount();
        lo.detach();
    }

    // The same disk over NBD (a separate `standby serve`) is byte for byte what FUSE shows.
    let g = Gateway::start(&dd, &[]);
    let out = t.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &g.uri("vm1")])
        .arg(&out));
    same_content(&out, &file);
    same_content(&dd.join("disks/vm1.img"), &file);

    // Coherence: a write through NBD is seen by a file already open (and read) through FUSE.
    let f = File::open(&file).unwrap();
    let mut before = vec![0u8; 65536];
    f.read_exact_at(&mut before, 100 * MIB).unwrap();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 100M 64k", &g.uri("vm1")]));
    let mut after = vec![0u8; 65536];
    f.read_exact_at(&mut after, 100 * MIB).unwrap();
    assert!(
        after.iter().all(|&b| b == 0x77),
        "FUSE read returned stale data after an NBD write"
    );
    drop(f);
    drop(g);
    fm.stop_ok();
}

#[test]
fn qemu_img_and_qemu_io_buffered_and_o_direct() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let (t, dd) = setup("fuse-qemu", &[("vm1", "64M")]);
    let fm = FuseMount::start(&dd, &t.path().join("mnt"));
    let file = fm.disk("vm1");
    let path = file.to_str().unwrap();
    let info = run_stdout(Command::new("qemu-img").args(["info", "--output=json", path]));
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");

    for (cache, pattern, off) in [("writeback", "0x5a", "1M"), ("none", "0xa5", "5M")] {
        let out = run_stdout(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-t",
            cache,
            "-c",
            &format!("write -P {pattern} {off} 1M"),
            "-c",
            &format!("read -P {pattern} {off} 1M"),
            "-c",
            "flush",
            path,
        ]));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        // Unaligned I/O in buffered mode.
        if cache == "writeback" {
            let out = run_stdout(Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                "write -P 0x11 12345 1000",
                "-c",
                "read -P 0x11 12345 1000",
                path,
            ]));
            assert!(!out.contains("Pattern verification failed"), "{out}");
        }
    }
    // The data landed in the image itself.
    let img = File::open(dd.join("disks/vm1.img")).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    img.read_exact_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    img.read_exact_at(&mut buf, 5 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa5));

    // A whole image written through qemu-img (O_DIRECT), compared from both sides.
    let src = t.path().join("src.raw");
    random_file(&src, 64 * MIB, 9);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-t", "none", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&file));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&file));
    same_content(&src, &dd.join("disks/vm1.img"));

    // O_DIRECT from a program: aligned reads and writes work.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&file)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(65536, 4096).unwrap();
    // SAFETY: the layout is non-zero sized; the buffer is freed below.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!ptr.is_null());
    // SAFETY: ptr points to 65536 zeroed bytes owned here.
    let aligned = unsafe { std::slice::from_raw_parts_mut(ptr, 65536) };
    aligned.fill(0x3c);
    f.write_all_at(aligned, 8 * MIB).unwrap();
    aligned.fill(0);
    f.read_exact_at(aligned, 8 * MIB).unwrap();
    let ok = aligned.iter().all(|&b| b == 0x3c);
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    assert!(ok, "O_DIRECT read-back mismatch");
    drop(f);
    fm.stop_ok();
}

#[test]
fn fsync_punch_hole_and_zero_range() {
    require_tool("fallocate");
    let (t, dd) = setup("fuse-fsync", &[("d", "16M")]);
    let fm = FuseMount::start(&dd, &t.path().join("mnt"));
    let file = fm.disk("d");
    let img = dd.join("disks/d.img");

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    f.write_all_at(&vec![0xeeu8; 4 * MIB as usize], 0).unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    let before = std::fs::metadata(&img).unwrap().blocks();
    assert!(before >= 8192, "image not allocated: {before} blocks");
    // The FUSE file reports the image's allocation.
    assert_eq!(std::fs::metadata(&file).unwrap().blocks(), before);

    // Punch a hole: reads as zeroes through FUSE and in the image; blocks are released.
    run(Command::new("fallocate")
        .args(["-p", "-o", "1048576", "-l", "1048576"])
        .arg(&file));
    let mut buf = vec![0xffu8; MIB as usize];
    f.read_exact_at(&mut buf, MIB).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "punched range does not read as zeroes"
    );
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut buf, MIB)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        after < before,
        "punch hole released nothing ({before} -> {after})"
    );
    // Neighbours untouched.
    let mut edge = [0u8; 1];
    f.read_exact_at(&mut edge, MIB - 1).unwrap();
    assert_eq!(edge[0], 0xee);
    f.read_exact_at(&mut edge, 2 * MIB).unwrap();
    assert_eq!(edge[0], 0xee);

    // Zero a range (unaligned).
    run(Command::new("fallocate")
        .args(["-z", "-o", "3000000", "-l", "5000"])
        .arg(&file));
    let mut z = vec![0xffu8; 5000];
    f.read_exact_at(&mut z, 3_000_000).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    f.read_exact_at(&mut edge, 3_005_000).unwrap();
    assert_eq!(edge[0], 0xee);

    // SEEK_DATA/SEEK_HOLE reflect the hole.
    // SAFETY: lseek on an open descriptor.
    let data = unsafe {
        libc::lseek(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            MIB as i64,
            libc::SEEK_DATA,
        )
    };
    assert_eq!(data, 2 * MIB as i64);

    // Parallel writers and readers on one file (as qemu and loop devices do).
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let f = &f;
            s.spawn(move || {
                let off = 8 * MIB + i * 512 * 1024;
                let chunk = vec![i as u8 + 1; 512 * 1024];
                for _ in 0..4 {
                    f.write_all_at(&chunk, off).unwrap();
                    let mut back = vec![0u8; chunk.len()];
                    f.read_exact_at(&mut back, off).unwrap();
                    assert_eq!(back, chunk);
                }
            });
        }
    });
    f.sync_all().unwrap();
    drop(f);
    fm.stop_ok();
    // The image after shutdown holds what the parallel writers wrote.
    let bytes = std::fs::read(&img).unwrap();
    for i in 0..8usize {
        let off = 8 * MIB as usize + i * 512 * 1024;
        assert!(bytes[off..off + 512 * 1024]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let (t, dd) = setup("fuse-bad", &[("d", "1M")]);
    let ro_img = t.path().join("ro.raw");
    std::fs::write(&ro_img, vec![0x42u8; 65536]).unwrap();
    run(standby(&dd)
        .args(["disk", "import", "ro", "--read-only"])
        .arg(&ro_img));
    let fm = FuseMount::start(&dd, &t.path().join("mnt"));
    let file = fm.disk("d");
    let img = dd.join("disks/d.img");

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    // Crossing the end: refused as a whole, nothing written.
    let e = f.write_all_at(&[0x99u8; 4096], MIB - 2048).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
    let e = f.write_all_at(&[0x99u8; 512], MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len() as u64, MIB);
    assert!(bytes[(MIB - 2048) as usize..].iter().all(|&b| b == 0));
    // Reads at or past the end return end-of-file, not an error.
    let mut buf = [0u8; 4096];
    assert_eq!(f.read_at(&mut buf, MIB).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, MIB - 100).unwrap(), 100);

    // Truncation to another size is refused; to the same size it is a no-op.
    let e = f.set_len(MIB / 2).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = f.set_len(2 * MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    f.set_len(MIB).unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), MIB);
    // O_TRUNC would truncate: refused.
    let e = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&file)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // Growing with fallocate is refused too.
    let e = run_fails(
        Command::new("fallocate")
            .args(["-o", "0", "-l", "2M"])
            .arg(&file),
    );
    assert!(e.contains("too large"), "{e}");

    // The set of disks is not changed through the mount.
    let e = File::create(fm.dir.join("disks/new")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = std::fs::remove_file(&file).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    assert!(std::fs::read_dir(fm.dir.join("replicas"))
        .unwrap()
        .next()
        .is_none());

    // A read-only disk: mode 0444, writes refused (even for root), reads fine.
    let ro = fm.disk("ro");
    let m = std::fs::metadata(&ro).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o444);
    assert_eq!(m.len(), 65536);
    let e = OpenOptions::new().write(true).open(&ro).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = run_fails(
        Command::new("fallocate")
            .args(["-p", "-o", "0", "-l", "4096"])
            .arg(&ro),
    );
    assert!(e.contains("ead-only"), "{e}");
    assert_eq!(std::fs::read(&ro).unwrap(), vec![0x42u8; 65536]);
    drop(f);
    fm.stop_ok();
}

fn run_fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sigterm_unmounts_cleanly_and_a_stale_mount_is_reported() {
    let (t, dd) = setup("fuse-sigterm", &[("d", "4M")]);
    let dir = t.path().join("mnt");
    let fm = FuseMount::start(&dd, &dir);
    let dir = fm.dir.clone();
    // Written, not fsynced: the shutdown flush makes it durable.
    OpenOptions::new()
        .write(true)
        .open(fm.disk("d"))
        .unwrap()
        .write_all_at(&[0xabu8; 4096], 8192)
        .unwrap();
    let status = fm.stop();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(!is_mounted(&dir), "still mounted after SIGTERM");
    let img = std::fs::read(dd.join("disks/d.img")).unwrap();
    assert!(img[8192..12288].iter().all(|&b| b == 0xab));

    // A mount left behind by a crash is detected, with the remedy.
    let fm = FuseMount::start(&dd, &dir);
    let stale = fm.kill9();
    assert!(is_mounted(&stale.0));
    let out = standby(&dd).arg("mount").arg(&stale.0).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("stale") && err.contains("fusermount3 -u"),
        "{err}"
    );
    run(Command::new("fusermount3").arg("-u").arg(&stale.0));
    assert!(!is_mounted(&stale.0));
    drop(stale);

    // A missing mount point is named.
    let out = standby(&dd)
        .arg("mount")
        .arg(t.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    // It mounts again afterwards. A file still open at SIGTERM keeps the mount busy: after
    // a grace period the mount is detached anyway and the exit status says what happened.
    let fm = FuseMount::start(&dd, &dir);
    let open = File::open(fm.disk("d")).unwrap();
    let log = fm.log.clone();
    let status = fm.stop();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("busy"), "{text}");
    assert!(!is_mounted(&dir), "{text}");
    drop(open);
}
