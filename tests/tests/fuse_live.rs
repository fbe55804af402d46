//! `standby mount`: the FUSE view of live disks, driven by real loop devices, mkfs.ext4,
//! qemu-img/qemu-io, fallocate and the NBD server. Needs root, /dev/fuse and /dev/loop*.
//!
//! Every mount, loop device and file system mounted here is released by a Drop guard, so a
//! failing assertion leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;

use standby_e2e::fuse::*;
use standby_e2e::{random_file, require_tool, run, run_stdout, standby, test_dir, Gateway};

const MIB: u64 = 1 << 20;

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

    // A read-only disk: mode 0400 (owner only, as the images), writes refused (even for root), reads fine.
    let ro = fm.disk("ro");
    let m = std::fs::metadata(&ro).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o400);
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
