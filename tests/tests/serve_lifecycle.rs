//! `standby serve` start-up and shutdown behaviour.

use standby_e2e::nbd_client::*;
use standby_e2e::{run, standby, test_dir, Gateway};

#[test]
fn sigterm_finishes_cleanly_and_data_is_durable() {
    let t = test_dir("sigterm");
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "d", "--size", "4M"]));
    let g = Gateway::start(&dd, &[]);
    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go("d").unwrap(), REP_ACK);
    assert_eq!(c.write(8192, &[0xabu8; 4096]).unwrap(), 0);
    let status = g.stop();
    assert!(status.success(), "exit status {status}");
    let img = std::fs::read(dd.join("disks/d.img")).unwrap();
    assert_eq!(&img[8192..12288], &[0xabu8; 4096][..]);
}

#[test]
fn bad_input_on_the_command_line_gets_clear_errors() {
    let t = test_dir("cli");
    let dd = t.path().join("data");
    let out = standby(&dd)
        .args(["disk", "create", "x", "--size", "12Q"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
    let out = standby(&dd)
        .args(["disk", "create", "../evil", "--size", "1M"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid disk name"));
    run(standby(&dd).args(["disk", "create", "x", "--size", "1M"]));
    let out = standby(&dd)
        .args(["disk", "create", "x", "--size", "1M"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // A port in use: a clear error and a non-zero exit.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = standby(&dd)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A configuration typo is named.
    std::fs::write(dd.join("standby.toml"), "[serve]\nlisen = \"x\"\n").unwrap();
    let out = standby(&dd).args(["disk", "list"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));
}

#[test]
fn disks_declared_in_the_config_are_served() {
    let t = test_dir("config");
    let dd = t.path().join("data");
    std::fs::create_dir_all(&dd).unwrap();
    std::fs::write(t.path().join("decl.raw"), vec![0x11u8; 65536]).unwrap();
    std::fs::write(
        dd.join("standby.toml"),
        format!(
            "[[disk]]\nname = \"decl\"\nimage = \"{}\"\nread_only = true\n",
            t.path().join("decl.raw").display()
        ),
    )
    .unwrap();
    let list = standby_e2e::run_stdout(standby(&dd).args(["disk", "list"]));
    assert!(list.contains("decl") && list.contains("config"), "{list}");
    let g = Gateway::start(&dd, &[]);
    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go("decl").unwrap(), REP_ACK);
    assert_eq!(c.read(0, 16).unwrap().data, vec![0x11u8; 16]);
    assert_eq!(c.write(0, &[0u8; 16]).unwrap(), EPERM);
}

#[test]
fn unix_socket_serves_qemu_img() {
    standby_e2e::require_tool("qemu-img");
    let t = test_dir("unix");
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "u1", "--size", "2M"]));
    let sock = t.path().join("standby.sock");
    let g = Gateway::start(&dd, &["--socket", sock.to_str().unwrap()]);
    let uri = format!("nbd+unix:///u1?socket={}", sock.display());
    run(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x3c 0 64k",
        "-c",
        "read -P 0x3c 0 64k",
        &uri,
    ]));
    let info = standby_e2e::run_stdout(std::process::Command::new("qemu-img").args(["info", &uri]));
    assert!(info.contains("2 MiB"), "{info}");
    assert!(g.stop().success());
    assert!(!sock.exists(), "socket removed on shutdown");
}

/// Waits for a process to exit (at most `secs`), killing it if it does not.
fn exit_within(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("standby serve still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_corrupt_replication_database_stops_serve_with_its_name() {
    let t = test_dir("corrupt-db");
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "d", "--size", "1M"]));
    run(standby(&dd).args(["log", "enable", "d"]));
    // Not an SQLite file: the engine cannot open its state, so VMs could not be replicated.
    std::fs::write(dd.join("replication.db"), vec![b'x'; 8192]).unwrap();
    let mut child = standby(&dd)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_within(&mut child, 60);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!status.success(), "serve must fail: {stderr}");
    assert!(
        stderr.contains("replication engine cannot start") && stderr.contains("replication.db"),
        "{stderr}"
    );
    assert!(!stdout.contains("serving"), "nothing announced: {stdout}");
    // The tracked disk's log was sealed on the way out: the next start finds a clean log.
    std::fs::remove_file(dd.join("replication.db")).unwrap();
    let g = Gateway::start(&dd, &[]);
    let health = standby_e2e::cli_json::log_health(&dd, "d");
    assert!(g.stop().success());
    assert_eq!(health, "healthy");
}

/// A tmpfs of `size` mounted on `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},nr_inodes=64,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill it (needs root or CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Writes a file until the file system is full, then creates files until no inode is left.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0x55u8; 64 << 10];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Any last partial page too.
        while f.write_all(&[0u8]).is_ok() {}
        // And every inode: space the log frees at shutdown (cutting a segment's written-ahead
        // zeroes) must not let its state file be written either.
        for i in 0.. {
            match std::fs::File::create(self.0.join(format!("inode-{i}"))) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("using up the tmpfs's inodes: {e}"),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_failed_final_flush_or_log_close_makes_serve_exit_non_zero() {
    let t = test_dir("full-log-fs");
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "d", "--size", "4M"]));
    run(standby(&dd).args(["log", "enable", "d"]));
    // The disk's change log lives on a file system of its own, which fills up while the
    // gateway runs: sealing the log at shutdown cannot be written.
    let fs = Tmpfs::mount(&dd.join("disks/d.hrl"), "2m");
    let g = Gateway::start(&dd, &[]);
    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go("d").unwrap(), REP_ACK);
    assert_eq!(c.write(0, &[0xcdu8; 65536]).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    drop(c);
    fs.fill();
    let log_path = g.data_dir.clone();
    let status = g.stop();
    let log: String = std::fs::read_dir(&log_path)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("serve-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        !status.success(),
        "a failed shutdown exits non-zero; log:\n{log}"
    );
    assert!(log.contains("shutdown was not clean"), "{log}");
    assert!(log.contains("disk d:"), "the disk is named: {log}");
}
