//! Replication end to end: `standby serve` with its engine, real NBD clients (fio, qemu-img,
//! raw protocol writers), a local store and the real S3 server; points exported and compared
//! with an oracle of the bytes written.
//!
//! Long (~930 lines, 32 tests) because one test binary keeps the suite's start-up cost down;
//! the fixtures are in the e2e crate's `repl` module, and each test reads on its own.

use std::process::Command;
use std::time::Duration;

use standby_e2e::garage::Garage;
use standby_e2e::repl::*;
use standby_e2e::{random_file, require_tool, run, run_stdout, standby, test_dir, Gateway};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

fn fails_with(cmd: &mut Command, needle: &str) -> String {
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{cmd:?} should fail");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{cmd:?}: expected {needle:?} in:\n{err}"
    );
    err
}

fn fill(g: &Gateway, export: &str, bytes: u64, seed: u64, dir: &std::path::Path) {
    let f = dir.join(format!("fill-{export}-{seed}.bin"));
    random_file(&f, bytes, seed);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&f)
        .arg(g.uri(export)));
}

/// fio writes through NBD while initial replication runs; the first point and every delta
/// point after it equal the bytes written (the oracle), on two disks.
#[test]
fn initial_replication_under_fio_then_deltas_match_the_oracle() {
    require_tool("fio");
    let t = test_dir("repl-ir");
    let dd = site(t.path(), &[("a", "96M"), ("b", "32M")]);
    // A slow initial copy so fio overlaps it.
    run(standby(&dd).args(["policy", "set", "--bandwidth", "24M"]));
    let g = Gateway::start(&dd, &[]);
    fill(&g, "a", 64 * MIB, 1, t.path());
    fill(&g, "b", 8 * MIB, 2, t.path());
    run(standby(&dd).args(["protect", "web", "--disks", "a,b"]));
    wait_state(&dd, "web", "InitialReplication", T);
    let fio = run_stdout(Command::new("fio").current_dir(t.path()).args([
        "--name=during-ir",
        "--ioengine=nbd",
        &format!("--uri={}", g.uri("a")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=96M",
        "--time_based",
        "--runtime=3",
        "--randseed=5",
    ]));
    assert!(fio.contains("WRITE:"), "fio output: {fio}");
    // Still copying when fio ended: the writes were made during initial replication.
    let st = state(&dd, "web");
    assert!(
        st.starts_with("InitialReplication"),
        "initial replication should outlast fio (state {st})"
    );
    run(standby(&dd).args(["policy", "set", "--bandwidth", "0"]));
    wait_state(&dd, "web", "Protected", T);
    let since = id_now();
    let a0 = read_export(&g.uri("a"), &t.path().join("a0.img"));
    let b0 = read_export(&g.uri("b"), &t.path().join("b0.img"));
    let p = synced_point(&dd, "web", &since, T);
    assert_same(
        "disk a after initial replication",
        &export(&dd, &p, "a", &t.path().join("pa")),
        &a0,
    );
    assert_same(
        "disk b after initial replication",
        &export(&dd, &p, "b", &t.path().join("pb")),
        &b0,
    );
    let ir = last_job(&dd, "initial-replication").expect("an initial-replication job");
    assert!(ir.detail.contains("bytes sent"), "{ir:?}");

    // Deltas: random writes on both disks, plus zeroing, each round checked against the oracle.
    let mut wa = OracleWriter::new(g.addr, "a", a0, 11);
    let mut wb = OracleWriter::new(g.addr, "b", b0, 12);
    for round in 0..3 {
        wa.random_writes(40);
        wb.random_writes(10);
        if round == 1 {
            run(Command::new("qemu-io")
                .args(["-f", "raw", "-c", "write -z 1M 3M"])
                .arg(g.uri("a")));
            wa.oracle[MIB as usize..4 * MIB as usize].fill(0);
        }
        let since = id_now();
        let p = synced_point(&dd, "web", &since, T);
        let what = format!("round {round} point {p}");
        assert_same(
            &format!("{what} disk a"),
            &export(&dd, &p, "a", &t.path().join("da")),
            &wa.oracle,
        );
        assert_same(
            &format!("{what} disk b"),
            &export(&dd, &p, "b", &t.path().join("db")),
            &wb.oracle,
        );
    }
    let verify = run_stdout(standby(&dd).args(["store", "verify"]));
    assert!(verify.contains("OK"), "{verify}");
    // Every job step is visible.
    let j = jobs_json(&dd);
    assert!(
        jobs_of_kind(&dd, "delta-replication") > 0 && jobs_of_kind(&dd, "finalize-protection") > 0,
        "{j:?}"
    );
    let show = job_show(&dd, j[0]["id"].as_i64().expect("job id"));
    assert!(
        !show["steps"].as_array().expect("steps").is_empty(),
        "{show}"
    );
    assert_eq!(g.stop().code(), Some(0));
}

/// A write on disk x acknowledged before a write on disk y starts is never missing from a
/// point that holds the write on y.
#[test]
fn points_are_consistent_across_the_disks_of_a_vm() {
    let t = test_dir("repl-consistency");
    let dd = site(t.path(), &[("x", "4M"), ("y", "4M")]);
    fast_policy(&dd, "continuous");
    let g = Gateway::start(&dd, &[]);
    run(standby(&dd).args(["protect", "db", "--disks", "x,y"]));
    wait_state(&dd, "db", "Protected", T);
    let first = points(&dd, "db").len();
    let (addr, stop) = (
        g.addr,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let s2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut x = standby_e2e::nbd_client::RawClient::connect(addr).unwrap();
        x.go("x").unwrap();
        let mut y = standby_e2e::nbd_client::RawClient::connect(addr).unwrap();
        y.go("y").unwrap();
        let mut n: u64 = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let block = vec![n.to_le_bytes(); 512].concat();
            let off = (n % 64) * 4096;
            assert_eq!(x.write(off, &block).unwrap(), 0);
            assert_eq!(y.write(off, &block).unwrap(), 0);
        }
        n
    });
    wait_for(&dd, "6 points cut during the write pairs", T, || {
        (points(&dd, "db").len() >= first + 6).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = writer.join().unwrap();
    assert!(total > 100, "only {total} write pairs");
    let max_seq = |img: &[u8]| {
        img[..64 * 4096]
            .chunks(4096)
            .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
            .max()
            .unwrap()
    };
    let pts = points(&dd, "db");
    let mut checked = 0;
    for p in pts.iter().skip(first) {
        let x = max_seq(&export(&dd, p, "x", &t.path().join("x.img")));
        let y = max_seq(&export(&dd, p, "y", &t.path().join("y.img")));
        assert!(
            y <= x && x <= y + 1,
            "point {p}: x at {x}, y at {y}: the cut split a write pair"
        );
        checked += 1;
    }
    assert!(checked >= 6);
    assert_eq!(g.stop().code(), Some(0));
}

/// Unshipped log past 50% of the disk marks the VM for resync, which hashes only the chunks
/// the log names and sends only those; a full resync afterwards finds nothing to send.
#[test]
fn resync_after_the_fifty_percent_rule_sends_only_changed_chunks() {
    let t = test_dir("repl-resync");
    let dd = site(t.path(), &[("d", "64M")]);
    let g = Gateway::start(&dd, &[]);
    fill(&g, "d", 16 * MIB, 3, t.path());
    run(standby(&dd).args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    // Ship nothing for an hour: the log only grows; no automatic resync until asked.
    fast_policy(&dd, "1h");
    hold_resyncs(&dd);
    let img = t.path().join("new.bin");
    random_file(&img, 36 * MIB, 4);
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -s {} 20M 36M", img.display()))
        .arg(g.uri("d")));
    wait_state(&dd, "vm", "ResyncRequired", T);
    let reason = vm_json(&dd, "vm").unwrap()["reason"].to_string();
    assert!(reason.contains("50%"), "{reason}");
    run(standby(&dd).args(["resync", "vm"]));
    wait_for(&dd, "a resync job", T, || last_job(&dd, "resync"));
    wait_state(&dd, "vm", "Protected", T);
    let first = last_job(&dd, "resync").unwrap();
    let detail = first.detail.clone();
    let num = |key: &str| -> u64 {
        let i = detail
            .find(key)
            .unwrap_or_else(|| panic!("{key} in {detail}"));
        detail[i + key.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (read, sent) = (num("read "), num("sent "));
    assert!(
        read <= 37 * MIB,
        "resync hashed {read} bytes for 36 MiB changed: {detail}"
    );
    assert!(
        (36 * MIB..=37 * MIB).contains(&sent),
        "resync sent {sent} bytes: {detail}"
    );
    let want = read_export(&g.uri("d"), &t.path().join("want.img"));
    let p = points(&dd, "vm").pop().unwrap();
    assert_same(
        "after resync",
        &export(&dd, &p, "d", &t.path().join("got.img")),
        &want,
    );

    // A full resync hashes every chunk and sends nothing: the replica is already equal.
    run(standby(&dd).args(["resync", "vm", "--full"]));
    wait_for(&dd, "the full resync", T, || {
        last_job(&dd, "resync").filter(|j| j.id != first.id)
    });
    wait_state(&dd, "vm", "Protected", T);
    let full_job = last_job(&dd, "resync").unwrap();
    let show = job_step_details(&dd, full_job.id);
    let full = full_job.detail;
    // 64 MiB in chunks of the default 64 KiB.
    assert!(show.contains("all 1024 chunks"), "{show}");
    // Every data chunk read (holes are known from the image's allocation map), none sent.
    assert!(full.contains(&format!("read {} bytes", 52 * MIB)), "{full}");
    assert!(full.contains("sent 0 bytes"), "{full}");
    assert_eq!(g.stop().code(), Some(0));
}

/// A log that overflows (file system "full") keeps the disk writable; the dirty bitmap makes
/// the resync hash only the chunks written meanwhile.
#[test]
fn log_overflow_resyncs_from_the_dirty_bitmap() {
    let t = test_dir("repl-overflow");
    let dd = site(t.path(), &[("d", "64M")]);
    let g = Gateway::start(&dd, &[]);
    fill(&g, "d", 32 * MIB, 5, t.path());
    run(standby(&dd).args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    fast_policy(&dd, "1h");
    assert_eq!(g.stop().code(), Some(0));
    // Now every free-space check fails: the next rotation overflows the log.
    std::fs::write(
        dd.join("standby.toml"),
        "[log]\nsegment_size = \"64K\"\nmin_free = \"1000T\"\nmin_free_percent = 100\n",
    )
    .unwrap();
    // Hold automatic resyncs back (a window 12 hours away) until every write is made.
    hold_resyncs(&dd);
    let g = Gateway::start(&dd, &[]);
    let initial = read_export(&g.uri("d"), &t.path().join("i.img"));
    let mut w = OracleWriter::new(g.addr, "d", initial, 21);
    for i in 0..24u64 {
        w.write(i * 2 * MIB + 4096, &vec![i as u8 + 1; 8192]);
    }
    assert_eq!(w.client.flush().unwrap(), 0);
    wait_state(&dd, "vm", "ResyncRequired", T);
    let reason = vm_json(&dd, "vm").unwrap()["reason"].to_string();
    assert!(reason.contains("overflow"), "{reason}");
    run(standby(&dd).args(["resync", "vm"]));
    wait_for(&dd, "the overflow resync", T, || last_job(&dd, "resync"));
    let show = job_step_details(&dd, last_job(&dd, "resync").unwrap().id);
    assert!(show.contains("changed per log and bitmap"), "{show}");
    // 24 writes of 8 KiB: 24 chunks hashed, not all 1,024.
    assert!(show.contains("24 of 1024 chunks"), "{show}");
    let p = points(&dd, "vm").pop().unwrap();
    assert_same(
        "after overflow resync",
        &export(&dd, &p, "d", &t.path().join("o.img")),
        &w.oracle,
    );
    drop(w);
    g.stop();
}

/// The store on the real S3 server: an outage makes deltas fail and retry on the back-off
/// schedule (Warning, next retry shown); when the server returns, replication converges.
#[test]
fn s3_outage_retries_then_converges() {
    let mut garage = Garage::start();
    let t = test_dir("repl-s3");
    let dd = t.path().join("dd");
    run(standby(&dd).args(["disk", "create", "d", "--size", "32M"]));
    let (ak, sk) = (garage.access_key.clone(), garage.secret_key.clone());
    // CLI calls of this test (one process per test) reach the store with these.
    std::env::set_var("AWS_ACCESS_KEY_ID", &ak);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &sk);
    let env = [
        ("AWS_ACCESS_KEY_ID", ak.as_str()),
        ("AWS_SECRET_ACCESS_KEY", sk.as_str()),
    ];
    run(standby(&dd)
        .envs(env)
        .args(["store", "init"])
        .args(garage.store_init_args()));
    fast_policy(&dd, "1s");
    let g = Gateway::start_env(&dd, &[], &env);
    fill(&g, "d", 8 * MIB, 6, t.path());
    run(standby(&dd)
        .envs(env)
        .args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    let initial = read_export(&g.uri("d"), &t.path().join("i.img"));
    let mut w = OracleWriter::new(g.addr, "d", initial, 31);

    garage.stop();
    w.random_writes(30);
    wait_for(&dd, "a failed delta with a retry scheduled", T, || {
        let v = vm_json(&dd, "vm")?;
        (v["next_retry_ms"].is_u64() && v["health"] == "warning").then_some(v)
    });
    wait_for(
        &dd,
        "a third failed attempt",
        Duration::from_secs(90),
        || (jobs_in_state(&dd, "failed") >= 3).then_some(()),
    );
    let failed_before_restart = jobs_in_state(&dd, "failed");
    garage.restart();
    let since = id_now();
    let p = synced_point(&dd, "vm", &since, Duration::from_secs(120));
    assert_same(
        "after the outage",
        &export_env(&dd, &p, "d", &t.path().join("o.img"), &env),
        &w.oracle,
    );
    let v = vm_json(&dd, "vm").unwrap();
    assert!(v["last_error"] == "" && v["next_retry_ms"].is_null(), "{v}");
    assert!(failed_before_restart >= 3);
    // A resync on the S3 store: full comparison against the replica's digests. Only the chunks
    // the last point carried as patches travel (the resync stores them as whole chunks).
    run(standby(&dd).args(["resync", "vm", "--full"]));
    wait_for(&dd, "the resync on S3", T, || last_job(&dd, "resync"));
    wait_state(&dd, "vm", "Protected", T);
    let detail = last_job(&dd, "resync").unwrap().detail;
    let sent: u64 = detail
        .split("sent ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {detail}"));
    assert!(
        sent < 8 << 20,
        "a full resync of an equal replica sent {sent} bytes: {detail}"
    );
    let since = id_now();
    let p = synced_point(&dd, "vm", &since, T);
    let got = export_env(&dd, &p, "d", &t.path().join("s.img"), &env);
    assert_same("after the resync on S3", &got, &w.oracle);
    drop(w);
    g.stop();
}

fn export_env(
    dd: &std::path::Path,
    p: &str,
    disk: &str,
    out: &std::path::Path,
    env: &[(&str, &str)],
) -> Vec<u8> {
    run(standby(dd)
        .envs(env.iter().copied())
        .args(["store", "export", p])
        .arg(out)
        .args(["--disk", disk]));
    std::fs::read(out).unwrap()
}

/// Wrong credentials are not retried: the VM turns Critical with the reason until an admin
/// resumes it.
#[test]
fn s3_auth_failure_is_critical_without_retries() {
    let garage = Garage::start();
    let t = test_dir("repl-auth");
    let dd = t.path().join("dd");
    run(standby(&dd).args(["disk", "create", "d", "--size", "16M"]));
    std::env::set_var("AWS_ACCESS_KEY_ID", &garage.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &garage.secret_key);
    let env = [
        ("AWS_ACCESS_KEY_ID", garage.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", garage.secret_key.as_str()),
    ];
    run(standby(&dd)
        .envs(env)
        .args(["store", "init"])
        .args(garage.store_init_args()));
    fast_policy(&dd, "1s");
    let g = Gateway::start_env(&dd, &[], &env);
    run(standby(&dd)
        .envs(env)
        .args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    assert_eq!(g.stop().code(), Some(0));

    let bad = [
        ("AWS_ACCESS_KEY_ID", garage.access_key.as_str()),
        (
            "AWS_SECRET_ACCESS_KEY",
            "0000000000000000000000000000000000000000000000000000000000000000",
        ),
    ];
    let g = Gateway::start_env(&dd, &[], &bad);
    let mut c = standby_e2e::nbd_client::RawClient::connect(g.addr).unwrap();
    c.go("d").unwrap();
    assert_eq!(c.write(0, &[7u8; 4096]).unwrap(), 0);
    wait_state(&dd, "vm", "Critical", T);
    let v = vm_json(&dd, "vm").unwrap();
    assert_eq!(v["health"], "critical", "{v}");
    let failed = jobs_in_state(&dd, "failed");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        jobs_in_state(&dd, "failed"),
        failed,
        "a Critical VM must not retry"
    );
    assert!(state(&dd, "vm").starts_with("Critical"));
    g.stop();

    // Fixed: resume, and replication carries on with the write made meanwhile.
    let g = Gateway::start_env(&dd, &[], &env);
    run(standby(&dd).args(["resume", "vm"]));
    wait_state(&dd, "vm", "Protected", T);
    let since = id_now();
    let p = synced_point(&dd, "vm", &since, T);
    let img = export_env(&dd, &p, "d", &t.path().join("r.img"), &env);
    assert!(img[..4096].iter().all(|&b| b == 7));
    g.stop();
}

/// kill -9 of the gateway in initial replication, then in a resync: each resumes where its
/// checkpoint left it and converges to the right bytes.
#[test]
fn kill9_in_initial_replication_and_resync_resumes() {
    let t = test_dir("repl-kill");
    let dd = site(t.path(), &[("d", "128M")]);
    run(standby(&dd).args(["policy", "set", "--bandwidth", "16M"]));
    let g = Gateway::start(&dd, &[]);
    fill(&g, "d", 96 * MIB, 7, t.path());
    run(standby(&dd).args(["protect", "vm", "--disks", "d"]));
    wait_for(&dd, "initial replication past 25%", T, || {
        let s = state(&dd, "vm");
        let pct: f64 = s
            .strip_prefix("InitialReplication ")
            .and_then(|p| p.trim_end_matches('%').parse().ok())
            .unwrap_or(0.0);
        (pct >= 25.0).then_some(())
    });
    g.kill9();
    let g = Gateway::start(&dd, &[]);
    // Writes after the crash land in the log and in the first point.
    let mut w = OracleWriter::new(
        g.addr,
        "d",
        read_export(&g.uri("d"), &t.path().join("i.img")),
        41,
    );
    w.random_writes(20);
    run(standby(&dd).args(["policy", "set", "--bandwidth", "0"]));
    wait_state(&dd, "vm", "Protected", T);
    assert!(
        jobs_in_state(&dd, "interrupted") > 0,
        "{:?}",
        jobs_json(&dd)
    );
    let ir = last_job(&dd, "initial-replication").unwrap();
    let show = job_step_names(&dd, ir.id);
    assert!(
        show.iter().any(|s| s == "resume d"),
        "the second run must resume, not restart:\n{show:?}"
    );
    let since = id_now();
    let p = synced_point(&dd, "vm", &since, T);
    assert_same(
        "after kill -9 in initial replication",
        &export(&dd, &p, "d", &t.path().join("a.img")),
        &w.oracle,
    );

    // A full resync, slowed down, killed half way, resumed. It sends only the chunks the
    // store lacks (about 18 MB here), and its progress shows at checkpoints 2 s apart: at
    // 2 MB/s it lasts ~9 s, so several checkpoints show before it ends (at 8 MB/s it could end
    // 0.2 s after the first, and the kill came too late). The policy is set after the writes
    // so that a delta shipping them is not slowed down too.
    w.random_writes(200);
    run(standby(&dd).args(["policy", "set", "--bandwidth", "2M"]));
    run(standby(&dd).args(["resync", "vm", "--full"]));
    wait_for(&dd, "the resync to be under way", T, || {
        let s = state(&dd, "vm");
        s.strip_prefix("Resyncing ")
            .and_then(|p| p.trim_end_matches('%').parse::<f64>().ok())
            .filter(|p| *p >= 10.0)
    });
    drop(w);
    g.kill9();
    let g = Gateway::start(&dd, &[]);
    let mut w = OracleWriter::new(
        g.addr,
        "d",
        read_export(&g.uri("d"), &t.path().join("j.img")),
        42,
    );
    w.random_writes(10);
    run(standby(&dd).args(["policy", "set", "--bandwidth", "0"]));
    wait_state(&dd, "vm", "Protected", T);
    let since = id_now();
    let p = synced_point(&dd, "vm", &since, T);
    assert_same(
        "after kill -9 in resync",
        &export(&dd, &p, "d", &t.path().join("b.img")),
        &w.oracle,
    );
    let rs = last_job(&dd, "resync").unwrap();
    let show = job_step_names(&dd, rs.id);
    assert!(show.iter().any(|s| s == "resume d"), "{show:?}");
    drop(w);
    g.stop();
}

/// Bad requests get clear errors and change nothing.
#[test]
fn protection_commands_refuse_bad_input() {
    let t = test_dir("repl-bad");
    let dd = site(t.path(), &[("a", "8M"), ("b", "8M")]);
    fails_with(
        standby(&dd).args(["protect", "vm", "--disks", "nope"]),
        "nope",
    );
    fails_with(
        standby(&dd).args(["protect", "vm", "--disks", "a,a"]),
        "twice",
    );
    fails_with(
        standby(&dd).args(["protect", "bad/name", "--disks", "a"]),
        "name",
    );
    fails_with(standby(&dd).args(["resume", "ghost"]), "not protected");
    fails_with(standby(&dd).args(["unprotect", "ghost"]), "not protected");
    fails_with(
        standby(&dd).args(["policy", "set", "--resync-window", "25:00-01:00"]),
        "window",
    );
    fails_with(
        standby(&dd).args(["policy", "set", "--retention", "0s"]),
        "retention",
    );
    fails_with(standby(&dd).args(["job", "show", "999"]), "no job");
    let st: serde_json::Value =
        serde_json::from_str(&run_stdout(standby(&dd).args(["status", "--json"]))).unwrap();
    assert_eq!(st["vms"].as_array().map(Vec::len), Some(0), "{st}");
    run(standby(&dd).args(["protect", "vm", "--disks", "a"]));
    fails_with(
        standby(&dd).args(["protect", "vm", "--disks", "b"]),
        "already protected",
    );
    fails_with(
        standby(&dd).args(["protect", "other", "--disks", "a"]),
        "already belongs",
    );
    fails_with(standby(&dd).args(["resync", "vm"]), "EnablingProtection");
    // A disk the running gateway does not serve: Critical with the reason, no retries.
    let g = Gateway::start(&dd, &[]);
    run(standby(&dd).args(["disk", "create", "late", "--size", "8M"]));
    run(standby(&dd).args(["protect", "late-vm", "--disks", "late"]));
    wait_state(&dd, "late-vm", "Critical", T);
    let reason = vm_json(&dd, "late-vm").unwrap()["reason"].to_string();
    assert!(reason.contains("not served by this gateway"), "{reason}");
    wait_state(&dd, "vm", "Protected", T);
    run(standby(&dd).args(["unprotect", "late-vm"]));
    assert!(vm_json(&dd, "late-vm").is_none());
    // Unprotecting stops change tracking at once: the log goes away, writes keep working.
    assert!(dd.join("disks/a.hrl").exists());
    run(standby(&dd).args(["unprotect", "vm"]));
    wait_for(&dd, "the change log of disk a to be removed", T, || {
        (!dd.join("disks/a.hrl").exists()).then_some(())
    });
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 3 0 64k"])
        .arg(g.uri("a")));
    g.stop();
}

/// kill -9 of the gateway at random moments while deltas run (continuous mode, writes going
/// on): after each restart replication resumes and the newest point equals the bytes written.
#[test]
fn kill9_during_delta_replication_converges() {
    use rand::{Rng, SeedableRng};
    let t = test_dir("repl-kill-delta");
    let dd = site(t.path(), &[("d", "32M")]);
    fast_policy(&dd, "continuous");
    let mut g = Gateway::start(&dd, &[]);
    run(standby(&dd).args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    let mut oracle = vec![0u8; 32 << 20];
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    for round in 0..4 {
        let mut w = OracleWriter::new(g.addr, "d", oracle, 100 + round);
        w.random_writes(60);
        oracle = w.oracle.clone();
        drop(w);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
        g.kill9();
        g = Gateway::start(&dd, &[]);
    }
    wait_state(&dd, "vm", "Protected", T);
    let since = id_now();
    let p = synced_point(&dd, "vm", &since, T);
    assert_same(
        "after 4 kills during deltas",
        &export(&dd, &p, "d", &t.path().join("k.img")),
        &oracle,
    );
    let verify = run_stdout(standby(&dd).args(["store", "verify"]));
    assert!(verify.contains("OK"), "{verify}");
    g.stop();
}

/// App-consistent points run the freeze and thaw hooks around the cut and are marked app.
#[test]
fn app_consistent_points_run_freeze_and_thaw() {
    let t = test_dir("repl-app");
    let dd = site(t.path(), &[("d", "8M")]);
    let hooks = t.path().join("hooks.log");
    run(standby(&dd)
        .args(["policy", "set", "--app-consistent", "2s"])
        .arg("--freeze-cmd")
        .arg(format!("echo freeze $STANDBY_VM >> {}", hooks.display()))
        .arg("--thaw-cmd")
        .arg(format!("echo thaw $STANDBY_VM >> {}", hooks.display())));
    let g = Gateway::start(&dd, &[]);
    run(standby(&dd).args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    wait_for(&dd, "an app-consistent point", T, || {
        run_stdout(standby(&dd).args(["point", "list", "vm"]))
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some("app"))
            .then_some(())
    });
    let log = std::fs::read_to_string(&hooks).unwrap();
    assert!(log.starts_with("freeze vm\nthaw vm\n"), "{log}");
    // A failing freeze hook is a recoverable error: retried, shown in status.
    run(standby(&dd).args(["policy", "set", "--freeze-cmd", "exit 3"]));
    wait_for(&dd, "the hook failure in status", T, || {
        vm_json(&dd, "vm")?["last_error"]
            .as_str()?
            .contains("freeze hook failed")
            .then_some(())
    });
    g.stop();
}

/// Past the hard limit (4 × `--fold-patch-bytes`) a cut folds its disk's patches inline
/// (back-pressure when writes outpace background consolidation); the folded points read back
/// exactly.
#[test]
fn patch_chains_past_the_hard_limit_fold_inline() {
    let t = test_dir("repl-fold");
    let dd = site(t.path(), &[("d", "16M")]);
    // Hard limit 400 KiB: every round's 512 KiB write passes it.
    run(standby(&dd).args(["policy", "set", "--fold-patch-bytes", "100K"]));
    let g = Gateway::start(&dd, &[]);
    run(standby(&dd).args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    let mut w = OracleWriter::new(g.addr, "d", vec![0u8; 16 << 20], 9);
    for round in 0..5u64 {
        w.write(round * 3 * MIB, &vec![round as u8 + 1; 512 << 10]);
        w.random_writes(8);
        let since = id_now();
        let p = synced_point(&dd, "vm", &since, T);
        assert_same(
            &format!("round {round}"),
            &export(&dd, &p, "d", &t.path().join("f.img")),
            &w.oracle,
        );
    }
    let j = jobs_json(&dd);
    assert!(
        j.iter().any(|j| j["kind"] == "delta-replication"
            && j["detail"]
                .as_str()
                .unwrap()
                .contains("patch chain 0 bytes")),
        "no delta folded its patches:\n{j:?}"
    );
    assert!(g.log().contains("folded inline"), "{}", g.log());
    assert!(state(&dd, "vm").starts_with("Protected"));
    drop(w);
    g.stop();
}

/// Patch chains past `--fold-patch-bytes` are consolidated in the background (the cut never
/// waits) and a later cut rebases onto the result. Every round's point exports exactly the
/// bytes written before it, also after a GC with no grace period run while consolidations may
/// be in flight, after a kill -9 of the gateway (consolidation state lost), and after a final
/// GC; `store verify` passes.
fn consolidation_rounds(label: &str, garage: Option<&Garage>) {
    let t = test_dir(label);
    let dd = t.path().join("dd");
    run(standby(&dd).args(["disk", "create", "d", "--size", "16M"]));
    let env: Vec<(&str, String)> = match garage {
        Some(g) => vec![
            ("AWS_ACCESS_KEY_ID", g.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", g.secret_key.clone()),
        ],
        None => vec![],
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // The helpers' CLI calls (one process per test under nextest) reach the store with these.
    for (k, v) in &env {
        std::env::set_var(k, v);
    }
    let cli = || {
        let mut c = standby(&dd);
        c.envs(env.iter().copied());
        c
    };
    match garage {
        Some(g) => run(cli().args(["store", "init"]).args(g.store_init_args())),
        None => run(cli().args(["store", "init"])),
    };
    fast_policy(&dd, "continuous");
    // Soft limit 256 KiB (consolidate in the background), hard limit 1 MiB.
    run(cli().args(["policy", "set", "--fold-patch-bytes", "256K"]));
    let mut g = Gateway::start_env(&dd, &[], &env);
    run(cli().args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    let mut w = OracleWriter::new(g.addr, "d", vec![0u8; 16 << 20], 21);
    let mut logs = String::new();
    let mut checked: Vec<(String, Vec<u8>)> = Vec::new();
    for round in 0..12u64 {
        // About 300 KiB per round: each round's chain passes the soft limit, rarely the hard one.
        w.write((round % 16) * MIB, &vec![round as u8 + 7; 64 << 10]);
        w.random_writes(2);
        let since = id_now();
        let p = synced_point(&dd, "vm", &since, T);
        let got = export_env(&dd, &p, "d", &t.path().join("c.img"), &env);
        assert_same(&format!("{label} round {round} point {p}"), &got, &w.oracle);
        checked.push((p, w.oracle.clone()));
        if round == 4 {
            run(cli().args(["store", "gc", "--grace", "0s"]));
        }
        if round == 7 {
            logs += &g.log();
            let oracle = std::mem::take(&mut w.oracle);
            drop(w);
            g.kill9();
            g = Gateway::start_env(&dd, &[], &env);
            w = OracleWriter::new(g.addr, "d", oracle, 22);
        }
        // Give a background consolidation time to finish now and then.
        std::thread::sleep(Duration::from_millis(300 * (round % 3)));
    }
    logs += &g.log();
    assert!(
        logs.contains("rebased onto a background consolidation"),
        "{label}: no cut rebased onto a consolidation:\n{logs}"
    );
    run(cli().args(["store", "gc", "--grace", "0s"]));
    for (p, want) in &checked {
        let got = export_env(&dd, p, "d", &t.path().join("c.img"), &env);
        assert_same(&format!("{label} point {p} after gc"), &got, want);
    }
    let verify = run_stdout(cli().args(["store", "verify"]));
    assert!(verify.contains("OK"), "{verify}");
    assert!(state(&dd, "vm").starts_with("Protected"));
    drop(w);
    g.stop();
}

#[test]
fn background_consolidation_rebases_and_points_stay_exact() {
    consolidation_rounds("repl-consolidate", None);
}

#[test]
fn background_consolidation_on_s3_packs() {
    let garage = Garage::start();
    consolidation_rounds("repl-consolidate-s3", Some(&garage));
}

/// The engine retries on `RetryState`'s schedule and `standby status` judges health with
/// `health::evaluate`: a recoverable failure (no room for the change logs of a sparse disk
/// larger than twice the free space) is attempted again after exactly the delays
/// `RetryState::fail` computes, the VM shows the retry and Warning, and `standby resume`
/// starts the back-off over with an attempt at once. A re-implemented schedule in the engine
/// fails this test.
#[test]
fn recoverable_failures_retry_on_the_schedule_of_retry_state() {
    use gateway::replication::health::{evaluate, HealthInput};
    use gateway::replication::retry::{ErrorClass, RetrySchedule, RetryState};
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = test_dir("repl-retry");
    let dd = t.path().join("dd");
    std::fs::create_dir_all(&dd).unwrap();
    // SAFETY: statvfs writes only into `st`, on this stack frame; the path is NUL-terminated.
    let free = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        let p = std::ffi::CString::new(dd.to_str().unwrap()).unwrap();
        assert_eq!(libc::statvfs(p.as_ptr(), &mut st), 0);
        st.f_bavail as u64 * st.f_frsize as u64
    };
    let size_mib = ((free * 4) >> 20).max(1024);
    run(standby(&dd).args(["disk", "create", "big", "--size", &format!("{size_mib}M")]));
    run(standby(&dd).args(["store", "init"]));
    fast_policy(&dd, "1s"); // retries 60× faster: 1 s, 2 s, 4 s …
    let g = Gateway::start(&dd, &[]);
    run(standby(&dd).args(["protect", "vm", "--disks", "big"]));

    let failed_jobs = || -> Vec<serde_json::Value> {
        let j: serde_json::Value =
            serde_json::from_str(&run_stdout(standby(&dd).args(["jobs", "--json"]))).unwrap();
        let mut v: Vec<serde_json::Value> = j
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["kind"] == "enable-protection" && j["state"] == "failed")
            .cloned()
            .collect();
        v.sort_by_key(|j| j["id"].as_i64());
        v
    };
    let v = wait_for(&dd, "three failed attempts", T, || {
        let v = vm_json(&dd, "vm")?;
        (v["failures"].as_u64() >= Some(3)).then_some(v)
    });
    let jobs = failed_jobs();
    assert!(jobs.len() >= 3, "{jobs:?}");
    let error = v["last_error"].as_str().unwrap().to_string();
    assert!(error.contains("not enough local space"), "{error}");

    // Replay the attempts through RetryState: each retry starts when the state said it was
    // due, never before, and the row holds the next attempt RetryState computed.
    let schedule = RetrySchedule::default().scaled(60);
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    let ms = |j: &serde_json::Value, f: &str| j[f].as_u64().unwrap();
    let mut r = RetryState::default();
    let failures = v["failures"].as_u64().unwrap() as usize;
    let tail = &jobs[jobs.len() - failures..];
    for (i, j) in tail.iter().enumerate() {
        if i > 0 {
            let due = r.next_attempt.unwrap();
            let started = at(ms(j, "created_ms"));
            assert!(
                started >= due - Duration::from_millis(5),
                "attempt {} started {:?} before it was due",
                i + 1,
                due.duration_since(started).unwrap_or_default()
            );
            // Within a few engine ticks of being due.
            assert!(
                started.duration_since(due).unwrap_or_default() < Duration::from_millis(1500),
                "attempt {} started late",
                i + 1
            );
        }
        r.fail(
            &schedule,
            ErrorClass::Recoverable,
            error.clone(),
            at(ms(j, "finished_ms")),
        );
    }
    let next = at(v["next_retry_ms"].as_u64().expect("a retry is scheduled"));
    let want = r.next_attempt.unwrap();
    let diff = if next > want {
        next.duration_since(want).unwrap()
    } else {
        want.duration_since(next).unwrap()
    };
    assert!(
        diff < Duration::from_millis(250),
        "next retry {next:?}, RetryState says {want:?} (after {failures} failures)"
    );

    // Health as health::evaluate judges a first point that is being retried.
    let (h, reasons) = evaluate(&HealthInput {
        now: SystemTime::now(),
        interval: Duration::from_secs(1),
        newest_point: None,
        cycles_due: 0,
        cycles_missed: 0,
        halted: false,
        first_point_pending: true,
        resync: None,
        last_step_failed: true,
    });
    assert_eq!(v["health"], format!("{h:?}").to_lowercase());
    assert_eq!(v["health_reasons"], serde_json::json!(reasons));

    // Resume: the back-off starts over, the next attempt runs at once.
    let before = failed_jobs().len();
    run(standby(&dd).args(["resume", "vm"]));
    wait_for(
        &dd,
        "an attempt right after resume",
        Duration::from_secs(3),
        || (failed_jobs().len() > before).then_some(()),
    );
    let v = vm_json(&dd, "vm").unwrap();
    assert!(v["failures"].as_u64() <= Some(2), "{v}");
    g.stop();
}
