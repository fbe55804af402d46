//! `standby serve` driven by real NBD clients: qemu-img, qemu-io, nbdinfo, nbdcopy, fio.

use std::path::Path;
use std::process::Command;

use standby_e2e::{random_file, require_tool, run, run_stdout, standby, test_dir, Gateway};

const MIB: u64 = 1 << 20;

fn gateway_with_disk(name: &str, size: &str) -> (tempfile::TempDir, Gateway) {
    let t = test_dir(name);
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "vm1", "--size", size]));
    let g = Gateway::start(&dd, &[]);
    (t, g)
}

fn same_files(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "sizes differ");
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

#[test]
fn qemu_img_info_convert_compare() {
    require_tool("qemu-img");
    let (t, g) = gateway_with_disk("qemu-img", "64M");
    let uri = g.uri("vm1");
    let info = run_stdout(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");

    let src = t.path().join("src.raw");
    random_file(&src, 64 * MIB, 1);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    let back = t.path().join("back.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&back));
    same_files(&src, &back);
    // A different image must not compare equal.
    let other = t.path().join("other.raw");
    random_file(&other, 64 * MIB, 2);
    let st = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&other)
        .arg(&uri)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1), "compare must report a difference");
}

#[test]
fn qemu_io_patterns_discard_and_zero() {
    require_tool("qemu-io");
    let (_t, g) = gateway_with_disk("qemu-io", "64M");
    let uri = g.uri("vm1");
    let mut w = Command::new("qemu-io");
    w.args(["-f", "raw"]);
    let mut r = Command::new("qemu-io");
    r.args(["-f", "raw"]);
    // Many offsets, aligned and not, small and large.
    let cases: Vec<(u64, u64, u8)> = (0..24u64)
        .map(|i| {
            let off = (i * 2_654_435_761) % (60 * MIB);
            let len = [512, 4096, 65536, 1 << 20, 3000, 131_072][(i % 6) as usize];
            (off, len, (0x10 + i) as u8)
        })
        .collect();
    // Write in order, so later writes win on overlaps; verify the non-overlapped ones.
    for (off, len, p) in &cases {
        w.args(["-c", &format!("write -P {p} {off} {len}")]);
    }
    w.arg(&uri);
    let out = run_stdout(&mut w);
    assert_eq!(out.matches("wrote").count(), cases.len(), "{out}");
    for (i, (off, len, p)) in cases.iter().enumerate() {
        let overlapped = cases[i + 1..]
            .iter()
            .any(|(o, l, _)| o < &(off + len) && off < &(o + l));
        if !overlapped {
            r.args(["-c", &format!("read -P {p} {off} {len}")]);
        }
    }
    r.arg(&uri);
    let out = run_stdout(&mut r);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let out = run_stdout(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 0 4M",
        "-c",
        "discard 1M 1M",
        "-c",
        "write -z 2M 1M",
        "-c",
        "read -P 0 1M 2M",
        "-c",
        "read -P 0x77 0 1M",
        "-c",
        "read -P 0x77 3M 1M",
        &uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
}

#[test]
fn nbdinfo_list_map_and_flags() {
    require_tool("nbdinfo");
    let (t, g) = gateway_with_disk("nbdinfo", "32M");
    let dd = t.path().join("data");
    let list = run_stdout(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", g.addr)]));
    assert!(list.contains("export=\"vm1\""), "{list}");
    for flag in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "df",
        "cache",
    ] {
        let st = Command::new("nbdinfo")
            .args(["--can", flag, &g.uri("vm1")])
            .status()
            .unwrap();
        assert!(st.success(), "--can {flag}");
    }
    let st = Command::new("nbdinfo")
        .args(["--is", "read-only", &g.uri("vm1")])
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2), "vm1 is writable");

    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 1 0 8M",
        "-c",
        "discard 1M 1M",
        "-c",
        "write -z 4M 2M",
        &g.uri("vm1"),
    ]));
    let map = run_stdout(Command::new("nbdinfo").args(["--map", &g.uri("vm1")]));
    let holes: Vec<&str> = map.lines().filter(|l| l.contains("hole")).collect();
    assert!(
        holes
            .iter()
            .any(|l| l.split_whitespace().next() == Some("1048576")),
        "trimmed range is a hole:\n{map}"
    );
    assert!(
        holes
            .iter()
            .any(|l| l.split_whitespace().next() == Some("4194304")),
        "zeroed range is a hole:\n{map}"
    );
    assert!(
        map.lines()
            .any(|l| l.trim_start().starts_with("0 ") && l.contains("data")),
        "{map}"
    );

    // Read-only export.
    drop(g);
    let ro = t.path().join("ro.raw");
    std::fs::write(&ro, vec![3u8; 1 << 20]).unwrap();
    run(standby(&dd)
        .args(["disk", "import", "golden", "--read-only"])
        .arg(&ro));
    let g = Gateway::start(&dd, &[]);
    let st = Command::new("nbdinfo")
        .args(["--is", "read-only", &g.uri("golden")])
        .status()
        .unwrap();
    assert!(st.success(), "golden is read-only");
}

#[test]
fn nbdcopy_round_trip() {
    require_tool("nbdcopy");
    let (t, g) = gateway_with_disk("nbdcopy", "96M");
    let src = t.path().join("src.raw");
    random_file(&src, 96 * MIB, 3);
    // Leave a zero region so sparse paths are used too.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&vec![0u8; 16 << 20], 32 << 20).unwrap();
    }
    run(Command::new("nbdcopy").arg(&src).arg(g.uri("vm1")));
    let back = t.path().join("back.raw");
    run(Command::new("nbdcopy").arg(g.uri("vm1")).arg(&back));
    same_files(&src, &back);
    // Two connections at once (multi-conn) with the default 4 connections.
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=32"])
        .arg(g.uri("vm1"))
        .arg(t.path().join("back2.raw")));
    same_files(&src, &t.path().join("back2.raw"));
}

fn fio(args: &[String], out: &Path) {
    require_tool("fio");
    let mut c = Command::new("fio");
    // fio leaves verify state files in its working directory.
    c.current_dir(out.parent().unwrap())
        .args(args)
        .arg(format!("--output={}", out.display()))
        .arg("--output-format=json");
    let o = c.output().unwrap();
    let json = std::fs::read_to_string(out).unwrap_or_default();
    assert!(
        o.status.success(),
        "fio failed: {}\n{}\n{json}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        json.contains("\"error\" : 0"),
        "fio reported an error:\n{json}"
    );
}

fn fio_verify_job(uri: &str, name: &str, offset: u64, size: u64, seed: u64) -> Vec<String> {
    vec![
        format!("--name={name}"),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=32".into(),
        format!("--offset={offset}"),
        format!("--size={size}"),
        "--verify=crc32c".into(),
        "--verify_fatal=1".into(),
        "--do_verify=1".into(),
        format!("--randseed={seed}"),
    ]
}

#[test]
fn fio_random_writes_verify() {
    let (t, g) = gateway_with_disk("fio", "64M");
    let args = fio_verify_job(&g.uri("vm1"), "verify", 0, 32 * MIB, 7);
    fio(&args, &t.path().join("fio.json"));
}

#[test]
fn two_concurrent_clients_on_one_export() {
    let (t, g) = gateway_with_disk("concurrent", "64M");
    let uri = g.uri("vm1");
    let a = fio_verify_job(&uri, "a", 0, 24 * MIB, 11);
    let b = fio_verify_job(&uri, "b", 32 * MIB, 24 * MIB, 12);
    let (pa, pb) = (t.path().join("a.json"), t.path().join("b.json"));
    let ha = std::thread::spawn(move || fio(&a, &pa));
    let hb = std::thread::spawn(move || fio(&b, &pb));
    ha.join().unwrap();
    hb.join().unwrap();
}

/// A FLUSH after every write on four connections at once (fio's nbd engine, `--fsync=1`,
/// four writes in flight each), on an untracked disk and on a tracked one: the FLUSHes are
/// answered from the disk's sync thread (the test checks the gateway has it), their replies
/// written to each socket beside the writes' replies (queued for each connection's writer).
/// fio checks every reply by its cookie and every block's data after its writes.
#[test]
fn fio_write_and_flush_on_four_connections_verifies() {
    for tracked in [false, true] {
        let t = test_dir(if tracked { "flush4-log" } else { "flush4" });
        let dd = t.path().join("data");
        run(standby(&dd).args(["disk", "create", "vm1", "--size", "64M"]));
        if tracked {
            run(standby(&dd).args(["log", "enable", "vm1"]));
        }
        let g = Gateway::start(&dd, &[]);
        let uri = g.uri("vm1");
        let jobs: Vec<_> = (0..4u64)
            .map(|i| {
                let mut a = fio_verify_job(&uri, &format!("j{i}"), i * 16 * MIB, 8 * MIB, 20 + i);
                a.retain(|x| !x.starts_with("--iodepth"));
                a.extend(["--iodepth=4".to_string(), "--fsync=1".to_string()]);
                let out = t.path().join(format!("j{i}.json"));
                std::thread::spawn(move || fio(&a, &out))
            })
            .collect();
        for j in jobs {
            j.join().unwrap();
        }
        // The FLUSHes went to the disk's sync thread (through the gateway's export device,
        // which must forward them), not to the blocking pool.
        let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", g.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect();
        assert!(
            threads.iter().any(|n| n == "disk-sync-vm1"),
            "no sync thread in the gateway: {threads:?}"
        );
        drop(g);
    }
}
