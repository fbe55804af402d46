//! Failover end to end: a BIOS-bootable disk written through NBD, protected, changed after
//! initial replication, then booted by qemu-system-x86_64 from a test failover's NBD export
//! (and from the FUSE file of the replica); attach, failover with hydration, commit and
//! reverse replication.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use standby_e2e::fuse::{same_content, FuseMount, KernelMount, LoopDev};
use standby_e2e::nbd_client::RawClient;
use standby_e2e::repl::*;
use standby_e2e::{require_tool, run, run_stdout, standby, test_dir, Gateway};

const T: Duration = Duration::from_secs(60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

fn bootimg_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bootimg")
        .join(name)
}

/// The boot image, built once per target directory and reused (the build is deterministic).
fn boot_image() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let cache = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("standby-test-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let img = cache.join("boot-marker-0.img");
    let lock = std::fs::File::create(cache.join("boot.lock")).unwrap();
    // SAFETY: flock on a descriptor we own; serializes builders across test processes.
    unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    if !img.exists() {
        let tmp = cache.join("boot-marker-0.img.tmp");
        run(Command::new(bootimg_script("build.sh"))
            .arg(&tmp)
            .arg("standby-boot-marker-0"));
        std::fs::rename(&tmp, &img).unwrap();
    }
    img
}

fn read_file(img: &Path, path: &str) -> Option<String> {
    let o = Command::new(bootimg_script("read-file.sh"))
        .arg(img)
        .arg(path)
        .output()
        .unwrap();
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).to_string())
}

/// Writes the 4 KiB blocks where `new` differs from `old` through NBD.
fn write_diff(addr: std::net::SocketAddr, export: &str, old: &[u8], new: &[u8]) -> usize {
    let mut c = RawClient::connect(addr).unwrap();
    c.go(export).unwrap();
    let mut n = 0;
    for (i, (a, b)) in old.chunks(4096).zip(new.chunks(4096)).enumerate() {
        if a != b {
            assert_eq!(c.write(i as u64 * 4096, b).unwrap(), 0);
            n += 1;
        }
    }
    assert_eq!(c.flush().unwrap(), 0);
    n
}

fn qemu_cmd(drive: &str, serial: &Path) -> String {
    format!(
        "qemu-system-x86_64 -machine graphics=off -boot reboot-timeout=0 -no-reboot -m 256 \
         -display none -nodefaults -serial file:{} -drive file={drive},format=raw,if=virtio",
        serial.display()
    )
}

/// Boots qemu directly (for the FUSE file) and returns the serial output.
fn boot(drive: &str, dir: &Path) -> String {
    let serial = dir.join(format!("serial-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&serial);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(qemu_cmd(drive, &serial))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "VM did not power off within {BOOT_TIMEOUT:?}; console:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::read_to_string(&serial).unwrap_or_default()
}

fn store_listing(dd: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dd.join("store")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let len = e.metadata().unwrap().len();
                out.push(format!("{} {len}", p.strip_prefix(dd).unwrap().display()));
            }
        }
    }
    out.sort();
    out
}

/// The headline: boot a VM from a test failover of a replica carried by delta replication.
#[test]
fn test_failover_boots_the_replica_and_leaves_the_store_untouched() {
    require_tool("qemu-system-x86_64");
    let base = boot_image();
    let t = test_dir("boot");
    let dd = site(t.path(), &[("boot", "64M")]);
    let g = Gateway::start(&dd, &[]);
    // The image reaches the protected disk through NBD.
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&base)
        .arg(g.uri("boot")));
    run(standby(&dd).args(["protect", "vm", "--disks", "boot"]));
    wait_state(&dd, "vm", "Protected", T);

    // Change the marker after initial replication: only a delta can carry it.
    let old = std::fs::read(&base).unwrap();
    let changed = t.path().join("changed.img");
    std::fs::copy(&base, &changed).unwrap();
    run(Command::new(bootimg_script("set-marker.sh"))
        .arg(&changed)
        .arg("marker-from-delta-1"));
    let new = std::fs::read(&changed).unwrap();
    let blocks = write_diff(g.addr, "boot", &old, &new);
    assert!(blocks > 0 && blocks < 64, "{blocks} blocks changed");
    let since = id_now();
    synced_point(&dd, "vm", &since, T);
    let deltas = jobs_of_kind(&dd, "delta-replication");
    assert!(deltas >= 1);

    // Test failover, launching the VM with the configured command.
    let serial = t.path().join("serial.log");
    run(standby(&dd)
        .args(["policy", "set", "--failover-command"])
        .arg(qemu_cmd("{disk0}", &serial)));
    let store_before = store_listing(&dd);
    let out = run_stdout(standby(&dd).args(["failover", "test", "vm"]));
    assert!(out.contains("VM launched"), "{out}");
    let console = wait_for(
        &dd,
        "the test-failover VM to power off",
        BOOT_TIMEOUT,
        || test_vm_exited(&dd, "vm").then(|| std::fs::read_to_string(&serial).unwrap_or_default()),
    );
    assert!(
        console.contains("STANDBY-MARKER: marker-from-delta-1"),
        "console:\n{console}"
    );
    // The guest's write is in the overlay ...
    let test_img = t.path().join("test.img");
    read_export(&g.uri("vm.boot.test"), &test_img);
    let wrote = read_file(&test_img, "/guest-wrote").unwrap_or_default();
    assert!(
        wrote.contains("guest-write"),
        "guest write missing from the overlay: {wrote:?}"
    );
    // ... and not in the store: same objects, same sizes (replication may add points only).
    let store_after = store_listing(&dd);
    for o in &store_before {
        assert!(
            store_after.contains(o),
            "store object changed or vanished: {o}"
        );
    }
    let p = points(&dd, "vm").pop().unwrap();
    let replica = t.path().join("replica.img");
    export(&dd, &p, "boot", &replica);
    assert!(read_file(&replica, "/guest-wrote").is_none_or(|s| !s.contains("guest-write")));

    // Replication continues while the test failover runs.
    let mut c = RawClient::connect(g.addr).unwrap();
    c.go("boot").unwrap();
    assert_eq!(c.write(60 << 20, &[9u8; 4096]).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    let since = id_now();
    let p2 = synced_point(&dd, "vm", &since, T);
    assert_ne!(p2, p, "a new point while the test failover runs");

    // The same replica booted from its FUSE file (qemu's own snapshot takes the guest's
    // writes: the file is read-only).
    let m = FuseMount::start_with(&dd, &t.path().join("mnt"), &["--replicas-only"]);
    let file = m.dir.join("replicas/vm/boot@latest");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 << 20);
    let console = boot(&format!("{},snapshot=on", file.display()), t.path());
    assert!(
        console.contains("STANDBY-MARKER: marker-from-delta-1"),
        "FUSE boot console:\n{console}"
    );
    m.stop_ok();

    run(standby(&dd).args(["failover", "cleanup", "vm"]));
    assert!(
        !dd.join("failover/vm/test/boot").exists(),
        "overlay left behind"
    );
    let o = Command::new("qemu-img")
        .args(["info", &g.uri("vm.boot.test")])
        .output()
        .unwrap();
    assert!(!o.status.success(), "export still served after cleanup");
    let kinds = succeeded_job_kinds(&dd);
    assert!(
        kinds.iter().any(|k| k == "test-failover")
            && kinds.iter().any(|k| k == "test-failover-cleanup"),
        "{kinds:?}"
    );
    g.stop();
}

/// `standby attach`: a point served read-only (writes refused) and --rw (writes kept in the
/// overlay, the point unchanged); bad specs get clear errors.
#[test]
fn attach_serves_points_read_only_or_through_an_overlay() {
    let t = test_dir("attach");
    let dd = site(t.path(), &[("d", "32M")]);
    let g = Gateway::start(&dd, &[]);
    let mut w = OracleWriter::new(g.addr, "d", vec![0u8; 32 << 20], 3);
    w.random_writes(50);
    run(standby(&dd).args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    let since = id_now();
    let p = synced_point(&dd, "vm", &since, T);
    let id = p.split('/').nth(1).unwrap();
    let out = run_stdout(standby(&dd).args(["attach", &format!("vm/d@{id}")]));
    let export = format!("vm.d@{id}");
    assert!(out.contains(&export), "{out}");
    assert_same(
        "attached point",
        &read_export(&g.uri(&export), &t.path().join("a.img")),
        &w.oracle,
    );
    // Holes are reported as holes (zero chunks never fetched).
    let map = run_stdout(Command::new("nbdinfo").args(["--map", &g.uri(&export)]));
    assert!(map.contains("hole"), "{map}");
    // Read-only: writes refused.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &g.uri(&export)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() || text.contains("ermission") || text.contains("read-only"),
        "{text}"
    );
    run(standby(&dd).args(["detach", &export]));

    // Writable through an overlay; the point itself is unchanged.
    run(standby(&dd).args(["attach", "vm/d@latest", "--rw"]));
    let export = format!("vm.d@{id}");
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 100k 300k",
        &g.uri(&export),
    ]));
    let got = read_export(&g.uri(&export), &t.path().join("b.img"));
    assert!(got[100 << 10..400 << 10].iter().all(|&b| b == 0x77));
    assert_same(
        "outside the write",
        &got[400 << 10..],
        &w.oracle[400 << 10..],
    );
    assert_same("the point", &export_point(&dd, &p), &w.oracle);
    run(standby(&dd).args(["detach", &export]));

    fails(
        standby(&dd).args(["attach", "vm/d@nosuchpoint"]),
        "no point",
    );
    fails(standby(&dd).args(["attach", "vm/nodisk"]), "no disk");
    fails(
        standby(&dd).args(["attach", "ghost/d"]),
        "no recovery point",
    );
    fails(standby(&dd).args(["detach", "nothing"]), "not attached");
    fails(
        standby(&dd).args(["failover", "cleanup", "vm"]),
        "no test failover",
    );
    fails(
        standby(&dd).args(["failover", "commit", "vm"]),
        "no failover",
    );
    // Failing over onto the gateway that still has the disk is refused.
    fails(
        standby(&dd).args(["failover", "start", "vm"]),
        "exists on this gateway",
    );
    g.stop();
}

fn export_point(dd: &Path, p: &str) -> Vec<u8> {
    let out = dd.join("point.img");
    export(dd, p, "d", &out)
}

/// Kinds of the succeeded jobs, from `standby jobs --json` (the API's field names).
fn succeeded_job_kinds(dd: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&run_stdout(
        standby(dd).args(["jobs", "--limit", "500", "--json"]),
    ))
    .expect("jobs --json");
    v.as_array()
        .expect("a list of jobs")
        .iter()
        .filter(|j| j["state"] == "succeeded")
        .filter_map(|j| j["kind"].as_str().map(str::to_string))
        .collect()
}

fn fails(cmd: &mut Command, needle: &str) {
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{cmd:?} should fail");
    assert!(
        err.contains(needle),
        "{cmd:?}: expected {needle:?} in {err}"
    );
}

/// The CLI's syntax and errors: subcommands before the VM (a VM named `commit` or `test` is a
/// VM), a refused request writes nothing (no job), and an OS error is printed once.
#[test]
fn failover_cli_syntax_and_errors() {
    let t = test_dir("failover_cli");
    let dd = t.path().join("dd");
    run(standby(&dd).args(["disk", "create", "d", "--size", "1M"]));
    fails(
        standby(&dd).args(["failover", "cleanup", "commit"]),
        "VM commit has no test failover",
    );
    fails(
        standby(&dd).args(["failover", "commit", "test"]),
        "VM test has no failover to commit",
    );
    fails(
        standby(&dd).args(["failover", "prepare", "commit"]),
        "not protected",
    );
    fails(standby(&dd).args(["failover", "start", "../x"]), "VM name");
    fails(
        standby(&dd).args(["failover", "vm"]),
        "unrecognized subcommand",
    );
    let jobs: serde_json::Value =
        serde_json::from_str(&run_stdout(standby(&dd).args(["jobs", "--json"]))).unwrap();
    assert_eq!(
        jobs,
        serde_json::json!([]),
        "a refused request starts no job"
    );
    // Long store commands report progress on stderr (plain lines off a terminal); stdout keeps
    // the result alone.
    run(standby(&dd).args(["store", "init"]));
    let img = t.path().join("d.img");
    standby_e2e::random_file(&img, 1 << 20, 3);
    let o = standby(&dd)
        .args(["store", "import", "vm/d"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("import vm/d: started")
            && err.contains("import vm/d: finished (1.0 MiB of 1.0 MiB (100%))"),
        "{err}"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("started") && out.contains("published"),
        "{out}"
    );
    let o = standby(&dd).args(["store", "verify"]).output().unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("store verify: finished (100% 16 of 16 chunks (1.0 MiB))"),
        "{err}"
    );
    // Serving a point is the running gateway's work: with none, a valid request is refused
    // at once, saying so.
    for args in [&["attach", "vm/d"][..], &["failover", "test", "vm"]] {
        fails(standby(&dd).args(args), "needs the running gateway");
    }
    std::fs::remove_file(dd.join("replica-store.toml")).unwrap();
    // A store location that cannot be read: the OS error appears once.
    std::fs::create_dir_all(dd.join("replica-store.toml")).unwrap();
    for args in [&["attach", "vm/d"][..], &["failover", "test", "vm"]] {
        let o = standby(&dd).args(args).output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        let os = std::io::Error::from_raw_os_error(libc::EISDIR).to_string();
        assert_eq!(err.matches(&os).count(), 1, "{args:?}: {err}");
        assert!(err.contains("replica-store.toml"), "{err}");
    }
}

/// mkfs.ext4 on a live disk through its FUSE file, files written through a loop device,
/// replicated (initial, then a delta of changes made through FUSE again); the replica's FUSE
/// file, loop-mounted read-only, holds every file.
#[test]
fn fuse_live_disk_to_replica_file_through_loop_mounts() {
    require_tool("mkfs.ext4");
    let t = test_dir("fuse-repl");
    let dd = site(t.path(), &[("fs", "64M")]);
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let write_files = |dir: &Path, round: u64| {
        for i in 0..8u64 {
            let f = dir.join(format!("r{round}-file{i}.bin"));
            standby_e2e::random_file(&f, (i + 1) * 97_000, round * 100 + i);
        }
    };
    // Round 1 (before protection): a file system made and filled through FUSE.
    {
        let m = FuseMount::start(&dd, &t.path().join("live"));
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(m.dir.join("disks/fs")));
        let lo = LoopDev::attach(&m.dir.join("disks/fs"), false);
        let km = KernelMount::mount(&lo.0, &t.path().join("ext4"), false);
        write_files(&src, 1);
        run(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(&km.0));
        km.unmount();
        lo.detach();
        m.stop_ok();
    }
    run(standby(&dd).args(["protect", "vm", "--disks", "fs"]));
    let g = Gateway::start(&dd, &[]);
    wait_state(&dd, "vm", "Protected", T);
    g.stop();
    // Round 2 (protected, gateway stopped): more files through FUSE, logged by the mount.
    {
        let m = FuseMount::start(&dd, &t.path().join("live"));
        let lo = LoopDev::attach(&m.dir.join("disks/fs"), false);
        let km = KernelMount::mount(&lo.0, &t.path().join("ext4"), false);
        write_files(&src, 2);
        run(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(&km.0));
        km.unmount();
        lo.detach();
        m.stop_ok();
    }
    let g = Gateway::start(&dd, &[]);
    let since = id_now();
    synced_point(&dd, "vm", &since, T);
    assert!(succeeded_job_kinds(&dd)
        .iter()
        .any(|k| k == "delta-replication"));
    let m = FuseMount::start_with(&dd, &t.path().join("replicas"), &["--replicas-only"]);
    let lo = LoopDev::attach(&m.dir.join("replicas/vm/fs@latest"), true);
    let km = KernelMount::mount(&lo.0, &t.path().join("ro"), true);
    let mut n = 0;
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        same_content(&e.path(), &km.0.join(e.file_name()));
        n += 1;
    }
    assert_eq!(n, 16);
    // Read-only: the replica file refuses writes.
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(m.dir.join("replicas/vm/fs@latest"))
        .is_err());
    km.unmount();
    lo.detach();
    m.stop_ok();
    g.stop();
}

/// With the store on the real S3 server: a planned failover (final delta on the primary),
/// the disks served at once on the recovery gateway while they hydrate, commit, and reverse
/// replication that sends only the chunks changed after the failover.
#[test]
fn failover_to_another_gateway_on_s3_then_reverse_replication() {
    let garage = standby_e2e::garage::Garage::start();
    std::env::set_var("AWS_ACCESS_KEY_ID", &garage.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &garage.secret_key);
    let t = test_dir("failover-s3");
    let primary = t.path().join("primary");
    run(standby(&primary).args(["disk", "create", "app", "--size", "48M"]));
    run(standby(&primary)
        .args(["store", "init"])
        .args(garage.store_init_args()));
    fast_policy(&primary, "1s");
    let g1 = Gateway::start(&primary, &[]);
    let mut w = OracleWriter::new(g1.addr, "app", vec![0u8; 48 << 20], 5);
    for _ in 0..4 {
        w.random_writes(60);
    }
    run(standby(&primary).args(["protect", "vm", "--disks", "app"]));
    wait_state(&primary, "vm", "Protected", T);
    w.random_writes(20); // carried by the final delta only
    drop(w.client);
    let out = run_stdout(standby(&primary).args(["failover", "prepare", "vm"]));
    assert!(out.contains("final changes replicated"), "{out}");
    let written = w.oracle.clone();
    g1.stop();

    // The recovery site: its own data directory on the same store.
    let recovery = t.path().join("recovery");
    second_site(&primary, &recovery);
    fast_policy(&recovery, "1s");
    let g2 = Gateway::start(&recovery, &[]);
    let out = run_stdout(standby(&recovery).args(["failover", "start", "vm"]));
    assert!(
        out.contains("failed over") && out.contains("hydrating"),
        "{out}"
    );
    // Served at once, with the final delta's bytes.
    assert_same(
        "failed-over disk",
        &read_export(&g2.uri("app"), &t.path().join("f.img")),
        &written,
    );
    let mut w2 = OracleWriter::new(g2.addr, "app", written, 6);
    let changed = w2.random_writes(30);
    let out = run_stdout(standby(&recovery).args(["failover", "commit", "vm", "--wait", "120"]));
    assert!(out.contains("committed"), "{out}");
    let disks = run_stdout(standby(&recovery).args(["disk", "list"]));
    assert!(disks.contains("app"), "{disks}");
    assert_same(
        "committed disk",
        &read_export(&g2.uri("app"), &t.path().join("c.img")),
        &w2.oracle,
    );

    // Reverse replication from the recovery site: only chunks changed since sent.
    run(standby(&recovery).args(["protect", "vm", "--disks", "app"]));
    wait_state(&recovery, "vm", "Protected", T);
    let ir = last_job(&recovery, "initial-replication").unwrap().detail;
    let sent: u64 = ir
        .split("; ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {ir}"));
    // 30 writes of ≤ 256 KiB touch at most 30 × 5 chunks of 64 KiB; the disk holds ~40 MiB.
    assert!(
        sent <= 30 * 5 * 65536 + (1 << 20),
        "reverse replication sent {sent} bytes for {changed} bytes changed: {ir}"
    );
    let since = id_now();
    let p = synced_point(&recovery, "vm", &since, T);
    let got = export(&recovery, &p, "app", &t.path().join("r.img"));
    assert_same("reverse-replicated point", &got, &w2.oracle);
    drop(w2);
    g2.stop();
}
