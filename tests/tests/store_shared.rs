//! One store, two writers: gateway A (`standby serve`) runs the initial replication of a VM
//! into a store that a second process B (another data directory pointing at the same store)
//! imports into, prunes and garbage-collects with no grace period, over and over, while A's
//! pass runs. Afterwards A's first point is published, `store verify` passes and the point
//! equals A's disk. On the local store (chunks layout) and on Garage (packs, format 5).
//!
//! B's image shares its first quarter with A's disk, so A's pass deduplicates against chunks
//! that B's prune then leaves unreferenced, and every GC run sets aside (fossilizes) whatever
//! A uploaded but has not published yet: exactly the races of docs/replica-store.md, GC.
//! The "long pass" case makes the store's `max_session_secs` shorter than A's pass, so GC
//! also deletes, during the pass, chunks it set aside at the pass's start.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use standby_e2e::garage::Garage;
use standby_e2e::repl::*;
use standby_e2e::{random_file, run, run_stdout, standby, test_dir, Gateway};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);

/// Where the shared store lives, and the environment the CLI and the gateway need for it.
enum Shared<'a> {
    Local,
    S3(&'a Garage),
}

fn env_of(s: &Shared<'_>) -> Vec<(String, String)> {
    match s {
        Shared::Local => Vec::new(),
        Shared::S3(g) => vec![
            ("AWS_ACCESS_KEY_ID".into(), g.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), g.secret_key.clone()),
        ],
    }
}

fn cli(dd: &Path, env: &[(String, String)]) -> std::process::Command {
    let mut c = standby(dd);
    c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    c
}

/// An image of `len` bytes: its first `shared` bytes from `base`, the rest random (`seed`).
fn image(
    dir: &Path,
    name: &str,
    base: &[u8],
    shared: usize,
    len: usize,
    seed: u64,
) -> std::path::PathBuf {
    let p = dir.join(name);
    random_file(&p, len as u64, seed);
    let mut b = std::fs::read(&p).unwrap();
    b[..shared].copy_from_slice(&base[..shared]);
    std::fs::write(&p, &b).unwrap();
    p
}

fn scenario(name: &str, shared: Shared<'_>, max_session: Option<&str>) {
    let t = test_dir(name);
    let env = env_of(&shared);
    let (dd_a, dd_b) = (t.path().join("a"), t.path().join("b"));
    run(standby(&dd_a).args(["disk", "create", "d", "--size", "64M"]));
    let mut init = cli(&dd_a, &env);
    init.args(["store", "init"]);
    match &shared {
        Shared::Local => {
            init.arg("--path").arg(t.path().join("store"));
        }
        Shared::S3(g) => {
            init.args(g.store_init_args()).args(["--s3-prefix", name]);
        }
    }
    if let Some(m) = max_session {
        init.args(["--max-session", m]);
    }
    run(&mut init);
    // B is another site on the same store: its own data directory, the same location file.
    second_site(&dd_a, &dd_b);
    let info: serde_json::Value = serde_json::from_str(&run_stdout(
        cli(&dd_b, &env).args(["store", "info", "--json"]),
    ))
    .unwrap();
    let want_layout = match shared {
        Shared::Local => "chunks",
        Shared::S3(_) => "packs",
    };
    assert_eq!(info["layout"], want_layout, "{info}");

    // A: 48 MiB of data on a 64 MiB disk, 36 MiB of it new, sent at 3 MiB/s: a pass of ~12 s.
    fast_policy(&dd_a, "1s");
    run(standby(&dd_a).args(["policy", "set", "--bandwidth", "3M"]));
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let g = Gateway::start_env(&dd_a, &[], &env_ref);
    let src = t.path().join("src.img");
    random_file(&src, 48 * MIB, 1);
    run(std::process::Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(g.uri("d")));
    let base = std::fs::read(&src).unwrap();
    // B's images: one shares A's first 12 MiB, the other nothing.
    let b_shared = image(
        t.path(),
        "b-shared.img",
        &base,
        12 * MIB as usize,
        16 << 20,
        2,
    );
    let b_other = t.path().join("b-other.img");
    random_file(&b_other, 16 * MIB, 3);
    run(cli(&dd_b, &env)
        .args(["store", "import", "other/d"])
        .arg(&b_shared));

    run(cli(&dd_a, &env).args(["protect", "web", "--disks", "d"]));
    wait_state(&dd_a, "web", "InitialReplication", T);

    // B, until A's pass is over: a point sharing A's chunks, a point that does not, a prune
    // that drops the first (A's deduplicated chunks are unreferenced again), a GC that sets
    // aside everything unreferenced, young or not.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU32::new(0));
    let b = {
        let (stop, rounds, dd_b, env) = (stop.clone(), rounds.clone(), dd_b.clone(), env.clone());
        let (b_shared, b_other) = (b_shared.clone(), b_other.clone());
        std::thread::spawn(move || {
            let mut log = String::new();
            // At most ~20 s: a pass longer than max_session_secs under a GC without grace
            // loses chunks faster than it can copy them again; once B stops, A converges.
            let t0 = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(20) {
                for img in [&b_shared, &b_other] {
                    run(cli(&dd_b, &env)
                        .args(["store", "import", "other/d"])
                        .arg(img));
                }
                run(cli(&dd_b, &env).args(["store", "prune", "--vm", "other", "--keep-last", "1"]));
                log += &run_stdout(cli(&dd_b, &env).args(["store", "gc", "--grace", "0s"]));
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            log
        })
    };
    wait_for(&dd_a, "the end of A's initial replication", T, || {
        (!state(&dd_a, "web").starts_with("InitialReplication")).then_some(())
    });
    let during = rounds.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let gc_log = b.join().unwrap();
    assert!(
        during >= 2,
        "only {during} import/prune/GC rounds of B ran during A's initial replication"
    );
    // "moved N unreferenced chunks ..." (chunks layout), "packs: L listed, N set aside, ...".
    let set_aside: u64 = gc_log
        .lines()
        .filter_map(|l| {
            let n = match l.strip_prefix("packs: ") {
                Some(rest) => rest.split(", ").nth(1)?.strip_suffix(" set aside")?,
                None => l.strip_prefix("moved ")?.split_whitespace().next()?,
            };
            n.parse::<u64>().ok()
        })
        .sum();
    assert!(set_aside > 0, "B's GC runs set nothing aside:\n{gc_log}");
    wait_state(&dd_a, "web", "Protected", T);
    let list: serde_json::Value = serde_json::from_str(&run_stdout(
        cli(&dd_a, &env).args(["points", "list", "web", "--json"]),
    ))
    .unwrap();
    let p = list
        .as_array()
        .and_then(|a| a.last())
        .map(|p| format!("web/{}", p["id"].as_str().unwrap()))
        .expect("A's first point");

    // B collects again (fossils A's point references go back), then both check the store.
    run(cli(&dd_b, &env).args(["store", "gc", "--grace", "0s"]));
    for dd in [&dd_a, &dd_b] {
        let v = run_stdout(cli(dd, &env).args(["store", "verify"]));
        assert!(v.contains("OK"), "store verify:\n{v}");
    }
    let want = read_export(&g.uri("d"), &t.path().join("want.img"));
    let got = t.path().join("got.img");
    run(cli(&dd_a, &env)
        .args(["store", "export", &p])
        .arg(&got)
        .args(["--disk", "d"]));
    assert_same("A's first point", &std::fs::read(&got).unwrap(), &want);
    // What the publishing session had to do about chunks GC took from under the pass.
    let log = g.log();
    let field = |line: &str, key: &str| -> u64 {
        line.split(&format!(" {key}="))
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let adopted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("adopted the chunks a pass stored"))
        .collect();
    let sum = |key: &str| adopted.iter().map(|l| field(l, key)).sum::<u64>();
    let (restored, copied, gone) = (sum("restored"), sum("copied"), sum("gone"));
    let recopies = log.matches("copying them again").count();
    eprintln!(
        "{name}: {during} rounds of B, {set_aside} objects set aside by its GC runs; at A's cuts: \
         {restored} chunks restored in place, {copied} stored again from their fossil, {gone} gone \
         ({recopies} re-copies from the disk)"
    );
    assert!(
        !adopted.is_empty(),
        "no cut checked the pass's chunks:\n{log}"
    );
    if max_session.is_some() {
        assert!(
            restored + copied + gone > 0,
            "the pass outlived max_session_secs under GC, yet the cut found every chunk live"
        );
    }
    assert_eq!(want[..48 * MIB as usize], base[..]);
    assert_eq!(g.stop().code(), Some(0));
}

/// Local store: GC and prune by another process during initial replication.
#[test]
fn gc_by_another_site_during_initial_replication_local() {
    scenario("shared-gc-local", Shared::Local, None);
}

/// Local store whose `max_session_secs` (3 s) is shorter than the pass: fossils of the pass's
/// first chunks are deleted for good while it runs.
#[test]
fn gc_by_another_site_during_an_initial_replication_longer_than_max_session_local() {
    scenario("shared-gc-long", Shared::Local, Some("3s"));
}

/// Garage, packs (format 5): GC, repacking and prune by another process during initial
/// replication.
#[test]
fn gc_by_another_site_during_initial_replication_s3() {
    let garage = Garage::start();
    scenario("shared-gc-s3", Shared::S3(&garage), None);
}

/// Garage, packs, `max_session_secs` shorter than the pass.
#[test]
fn gc_by_another_site_during_an_initial_replication_longer_than_max_session_s3() {
    let garage = Garage::start();
    scenario("shared-gc-s3-long", Shared::S3(&garage), Some("3s"));
}
