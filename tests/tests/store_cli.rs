//! `standby store` / `standby points` from the command line, on the local store.

use std::process::Command;

use standby_e2e::{random_file, run, run_stdout, standby, test_dir};

const MIB: u64 = 1 << 20;

fn fails_with(cmd: &mut Command, needle: &str) {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{cmd:?} should fail");
    assert!(
        err.contains(needle),
        "{cmd:?}: expected '{needle}' in:\n{err}"
    );
}

#[test]
fn import_list_export_verify_gc_prune() {
    let t = test_dir("store-cli");
    let dd = t.path().join("data");
    let a = t.path().join("a.raw");
    let b = t.path().join("b.raw");
    random_file(&a, 6 * MIB, 21);
    // b: zeros with a random middle: zero chunks must not be stored.
    std::fs::write(&b, vec![0u8; 8 * MIB as usize]).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&std::fs::read(&a).unwrap()[..MIB as usize], 3 * MIB)
            .unwrap();
    }
    fails_with(standby(&dd).args(["points", "list"]), "store");
    // Bad layout settings are refused before anything is written.
    fails_with(
        standby(&dd).args(["store", "init", "--fan-out-digits", "5"]),
        "must be 1 to 4",
    );
    fails_with(
        standby(&dd).args(["store", "init", "--chunk-size", "100000"]),
        "power of two",
    );
    run(standby(&dd).args(["store", "init"]));
    fails_with(standby(&dd).args(["store", "init"]), "exist");

    // One point with two disks; a second import dedups everything.
    run(standby(&dd)
        .args(["store", "import", "vm1/a"])
        .arg(&a)
        .arg("vm1/b")
        .arg(&b));
    let again = run_stdout(standby(&dd).args(["store", "import", "vm1/a"]).arg(&a));
    assert!(
        again.contains("0 chunks uploaded") || again.contains(" 0 uploaded"),
        "{again}"
    );
    let list = run_stdout(standby(&dd).args(["points", "list"]));
    assert_eq!(
        list.lines().filter(|l| l.starts_with("vm1")).count(),
        2,
        "{list}"
    );
    let info = store_info(&dd);
    // 6 MiB of a + its first MiB again inside b (deduplicated) = 96 chunks of 64 KiB, in
    // 256 fan-out directories at most.
    assert_eq!(info["chunks"], 96, "{info}");
    assert_eq!(info["format_version"], 4, "{info}");
    assert_eq!(info["layout"], "chunks", "{info}");
    let text = run_stdout(standby(&dd).args(["store", "info"]));
    assert!(text.contains("2 hex digits (256 directories)"), "{text}");
    let fan_out = std::fs::read_dir(dd.join("store").join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    assert!(
        !fan_out.is_empty() && fan_out.iter().all(|n| n.len() == 2),
        "{fan_out:?}"
    );

    // Export both disks of the first point and compare byte for byte.
    let first = list
        .lines()
        .find(|l| l.starts_with("vm1"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_string();
    for (disk, src) in [("a", &a), ("b", &b)] {
        let out = t.path().join(format!("{disk}.out"));
        run(standby(&dd)
            .args(["store", "export", &format!("vm1/{first}"), "--disk", disk])
            .arg(&out));
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(src).unwrap(),
            "{disk} differs"
        );
    }
    assert!(run_stdout(standby(&dd).args(["store", "verify"])).contains("OK"));

    // Corrupt one chunk file: verify names it and fails; export refuses to return bad data.
    let chunk = walk(&dd.join("store").join("chunks"))
        .into_iter()
        .next()
        .expect("a chunk file");
    let mut bytes = std::fs::read(&chunk).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&chunk, bytes).unwrap();
    let out = standby(&dd).args(["store", "verify"]).output().unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.to_lowercase().contains("corrupt"), "{text}");

    // Prune to the newest point, then GC (dry run first) removes nothing still referenced.
    run(standby(&dd).args(["store", "prune", "--keep-last", "1"]));
    let list = run_stdout(standby(&dd).args(["points", "list"]));
    assert_eq!(
        list.lines().filter(|l| l.starts_with("vm1")).count(),
        1,
        "{list}"
    );
    run(standby(&dd).args(["store", "gc", "--dry-run", "--grace", "0s"]));
    fails_with(
        standby(&dd).args(["store", "export", "vm1/nope", "x.raw"]),
        "nope",
    );
}

#[test]
fn encrypted_store_needs_its_key() {
    let t = test_dir("store-key");
    let dd = t.path().join("data");
    let a = t.path().join("a.raw");
    random_file(&a, 2 * MIB, 5);
    run(standby(&dd).args(["store", "init", "--encrypt"]));
    run(standby(&dd).args(["store", "import", "vm/a"]).arg(&a));
    let out = t.path().join("a.out");
    run(standby(&dd)
        .args(["store", "export", "vm/latest"])
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap());
    // Replace the key with another one: refused with a clear error.
    let key = dd.join("store.key");
    let len = std::fs::read(&key).unwrap().len();
    let other = t.path().join("other");
    run(standby(&other).args(["store", "init", "--encrypt"]));
    std::fs::copy(other.join("store.key"), &key).unwrap();
    assert_eq!(std::fs::read(&key).unwrap().len(), len);
    fails_with(standby(&dd).args(["points", "list"]), "key");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The CLI on a real S3 server (Garage on 127.0.0.1): a new store keeps chunks in packs
/// (format 5), import / verify / export / gc work, `store info` shows the layout and the
/// object size distribution, and far fewer objects than chunks are written.
#[test]
fn s3_store_uses_packs() {
    let garage = standby_e2e::garage::Garage::start();
    std::env::set_var("AWS_ACCESS_KEY_ID", &garage.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &garage.secret_key);
    let t = test_dir("store-cli-s3");
    let dd = t.path().join("data");
    let a = t.path().join("a.raw");
    random_file(&a, 40 * MIB, 31);
    run(standby(&dd)
        .args(["store", "init"])
        .args(garage.store_init_args()));
    run(standby(&dd).args(["store", "import", "vm1/a"]).arg(&a));
    let info = store_info(&dd);
    assert_eq!(info["format_version"], 5, "{info}");
    assert_eq!(info["layout"], "packs", "{info}");
    assert_eq!(info["pack_size_bytes"], 16 << 20, "{info}");
    // 40 MiB of chunks = 640, in 3 packs.
    assert_eq!(info["chunks"], 640, "{info}");
    assert_eq!(info["usage"]["packs"], 3, "{info}");
    // 3 packs and their 3 indexes, store.toml, one disk index, the point.
    assert_eq!(info["usage"]["objects"], 9, "{info}");
    let sizes = info["usage"]["sizes"].as_array().expect("size classes");
    let big = sizes
        .iter()
        .filter(|c| c["min_bytes"].as_u64() >= Some(1 << 20))
        .filter_map(|c| c["objects"].as_u64())
        .sum::<u64>();
    assert_eq!(
        big, 3,
        "the 3 packs are the only objects of 1 MiB or more: {info}"
    );
    let text = run_stdout(standby(&dd).args(["store", "info"]));
    assert!(
        text.contains("layout:          packs of 16.0 MiB"),
        "{text}"
    );
    assert!(run_stdout(standby(&dd).args(["store", "verify"])).contains("OK"));
    let again = run_stdout(standby(&dd).args(["store", "import", "vm1/a"]).arg(&a));
    assert!(again.contains("0 chunks uploaded"), "{again}");
    let out = t.path().join("a.out");
    run(standby(&dd)
        .args(["store", "export", "vm1/latest"])
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap());
    run(standby(&dd).args(["store", "prune", "--keep-last", "1"]));
    run(standby(&dd).args(["store", "gc", "--grace", "0s"]));
    assert!(run_stdout(standby(&dd).args(["store", "verify"])).contains("OK"));
}

/// `standby store info --json`.
fn store_info(dd: &std::path::Path) -> serde_json::Value {
    let out = run_stdout(standby(dd).args(["store", "info", "--json"]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("store info --json: {e}: {out}"))
}
