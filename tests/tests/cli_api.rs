//! The CLI's actions while a gateway runs go through its HTTP API (found through the local
//! credential file the gateway writes in its data directory), and the engine carries them out
//! as typed requests; with no gateway running the CLI writes the state database itself, and the
//! gateway picks that up when it starts.
//!
//! The gateway's log is the witness: every action the CLI sends shows there as an API action
//! of the token `local-cli` and as an admin request the engine carried out. A CLI that wrote
//! the database behind the running gateway's back would leave neither.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use standby_e2e::pki::Pki;
use standby_e2e::repl::{site, vm_json, wait_state};
use standby_e2e::{run, run_stdout, standby, test_dir, Gateway};

const CRED: &str = "api.local.json";

fn fails(cmd: &mut Command, needle: &str) -> String {
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{cmd:?} should fail");
    assert!(
        err.contains(needle),
        "{cmd:?}: expected {needle:?} in {err}"
    );
    err
}

/// Waits until the gateway's log holds `needle` (log lines are written asynchronously).
fn logged(g: &Gateway, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !g.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the gateway's log lacks {needle:?}:\n{}",
            g.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The CLI's request for `path` reached the API with the local credential, and the engine
/// carried out `request`.
fn through_api(g: &Gateway, path: &str, request: &str) {
    logged(
        g,
        &format!("token=local-cli method=POST path=/api/v1{path}"),
    );
    logged(g, &format!("request=\"{request}\""));
}

/// `standby disk list --json`: (name, served) of every disk.
fn disks_served(dd: &Path) -> Vec<(String, bool)> {
    let v: serde_json::Value =
        serde_json::from_str(&run_stdout(standby(dd).args(["disk", "list", "--json"]))).unwrap();
    v.as_array()
        .expect("a list of disks")
        .iter()
        .map(|d| {
            (
                d["name"].as_str().expect("name").to_string(),
                d["served"].as_bool().expect("served"),
            )
        })
        .collect()
}

fn policy_interval(dd: &Path) -> u64 {
    let p: serde_json::Value =
        serde_json::from_str(&run_stdout(standby(dd).args(["policy", "show", "--json"]))).unwrap();
    p["interval_secs"].as_u64().expect("interval_secs")
}

#[test]
fn cli_actions_go_through_the_running_gateways_api() {
    let t = test_dir("cli_api");
    let dd = site(t.path(), &[("d1", "4M"), ("d2", "4M")]);
    let g = Gateway::start(&dd, &[]);

    // The credential file: private, naming this gateway.
    let cred = dd.join(CRED);
    let meta = std::fs::metadata(&cred).expect("the gateway writes its local credential");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&cred).unwrap()).unwrap();
    assert_eq!(c["pid"].as_u64(), Some(u64::from(g.pid())));
    assert_eq!(
        c["url"].as_str(),
        g.api.as_deref(),
        "the URL the gateway printed"
    );

    // disk list --json: `served` from the running gateway.
    assert_eq!(
        disks_served(&dd),
        [("d1".to_string(), true), ("d2".to_string(), true)]
    );

    // protect: answered once the engine recorded the VM and started its worker.
    let t0 = Instant::now();
    run(standby(&dd).args(["protect", "v1", "--disks", "d1"]));
    let took = t0.elapsed();
    through_api(&g, "/vms", "protect");
    logged(&g, "replication worker started vm=v1");
    assert!(
        vm_json(&dd, "v1").is_some(),
        "recorded when protect returns"
    );
    eprintln!("protect through the API took {took:?}");
    wait_state(&dd, "v1", "Protected", Duration::from_secs(60));

    // policy set: validated before anything is sent (a bad value never reaches the gateway).
    let before = g.log().matches("request=\"policy set\"").count();
    fails(
        standby(&dd).args(["policy", "set", "--interval", "5x"]),
        "interval",
    );
    assert_eq!(
        g.log().matches("request=\"policy set\"").count(),
        before,
        "an invalid change is refused by the CLI"
    );
    run(standby(&dd).args(["policy", "set", "--interval", "1h"]));
    through_api(&g, "/policy", "policy set");
    assert_eq!(policy_interval(&dd), 3600);

    // resync and resume: the engine's refusals come back as the admin's message.
    fails(
        standby(&dd).args(["resync", "ghost"]),
        "VM ghost is not protected",
    );
    let out = run_stdout(standby(&dd).args(["resync", "v1"]));
    assert!(out.contains("resynchronization starts now"), "{out}");
    through_api(&g, "/vms/v1/resync", "resync");
    let out = run_stdout(standby(&dd).args(["resume", "v1"]));
    assert!(out.contains("nothing to resume"), "{out}");
    through_api(&g, "/vms/v1/resume", "resume");
    wait_state(&dd, "v1", "Protected", Duration::from_secs(60));

    // store verify: the gateway verifies.
    let out = run_stdout(standby(&dd).args(["store", "verify"]));
    assert!(out.contains("OK"), "{out}");
    logged(&g, "token=local-cli method=POST path=/api/v1/store/verify");

    // A wrong credential: refused with a message that names the file and what to do.
    let good = std::fs::read(&cred).unwrap();
    let mut wrong: serde_json::Value = serde_json::from_slice(&good).unwrap();
    wrong["token"] = format!("sbl_{}", "0".repeat(64)).into();
    std::fs::write(&cred, serde_json::to_vec(&wrong).unwrap()).unwrap();
    let err = fails(
        standby(&dd).args(["resync", "v1"]),
        "refused the CLI's local credential",
    );
    assert!(err.contains(CRED) && err.contains("restart"), "{err}");
    // A missing one: the CLI does not fall back to writing the database.
    std::fs::remove_file(&cred).unwrap();
    let err = fails(
        standby(&dd).args(["unprotect", "v1"]),
        "without its HTTP API",
    );
    assert!(err.contains(&g.pid().to_string()), "{err}");
    assert!(vm_json(&dd, "v1").is_some(), "nothing was written");
    std::fs::write(&cred, &good).unwrap();

    // unprotect: the worker is woken and stops tracking at once.
    run(standby(&dd).args(["unprotect", "v1"]));
    through_api(&g, "/vms/v1/unprotect", "unprotect");
    logged(&g, "VM unprotected: stopping change tracking");
    assert!(vm_json(&dd, "v1").is_none());

    // A clean exit removes the credential; offline, the CLI writes the database itself and
    // the next gateway carries it out from there.
    assert!(g.stop().success());
    assert!(!cred.exists(), "removed at a clean exit");
    assert_eq!(
        disks_served(&dd),
        [("d1".to_string(), false), ("d2".to_string(), false)],
        "no gateway: nothing served"
    );
    run(standby(&dd).args(["protect", "v2", "--disks", "d2"]));
    run(standby(&dd).args(["policy", "set", "--interval", "1s"]));
    let g = Gateway::start(&dd, &[]);
    wait_state(&dd, "v2", "Protected", Duration::from_secs(60));
    assert!(
        !g.log().contains("token=local-cli"),
        "nothing went through the API"
    );

    // After a crash the stale file names a dead process: the CLI works offline.
    g.kill9();
    assert!(cred.exists(), "a crash leaves the file");
    let out = run_stdout(standby(&dd).args(["resync", "v2"]));
    assert!(out.contains("resynchronization starts now"), "{out}");

    // A gateway without its API: actions are refused, nothing is written.
    let g = Gateway::start(&dd, &["--no-api"]);
    assert!(
        !cred.exists() || {
            // The crashed run's file is still there: it names another pid.
            let c: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&cred).unwrap()).unwrap();
            c["pid"].as_u64() != Some(u64::from(g.pid()))
        }
    );
    fails(standby(&dd).args(["unprotect", "v2"]), "pid");
    assert!(vm_json(&dd, "v2").is_some(), "nothing was written");
    assert!(g.stop().success());
}

/// An API served over HTTPS: the CLI pins the certificate the credential file names.
#[test]
fn cli_reaches_an_https_api_with_the_certificate_pinned() {
    let t = test_dir("cli_api_tls");
    let dd = t.path().join("dd");
    run(standby(&dd).args(["disk", "create", "d1", "--size", "1M"]));
    let (cert, key) = Pki::new(&t.path().join("pki")).self_signed("server");
    let g = Gateway::start(
        &dd,
        &[
            "--api-listen",
            "127.0.0.1:0",
            "--api-tls-cert",
            &cert,
            "--api-tls-key",
            &key,
        ],
    );
    assert!(g.api.as_deref().unwrap_or_default().starts_with("https://"));
    run(standby(&dd).args(["policy", "set", "--interval", "2m"]));
    through_api(&g, "/policy", "policy set");
    assert_eq!(policy_interval(&dd), 120);
    // Another certificate in the file: the TLS handshake is refused.
    let (other, _) = Pki::new(&t.path().join("pki2")).self_signed("other");
    let cred = dd.join(CRED);
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&cred).unwrap()).unwrap();
    c["tls_cert"] = other.into();
    std::fs::write(&cred, serde_json::to_vec(&c).unwrap()).unwrap();
    fails(
        standby(&dd).args(["policy", "set", "--interval", "3m"]),
        "not the one its credential file names",
    );
    assert_eq!(policy_interval(&dd), 120, "nothing changed");
    assert!(g.stop().success());
}

/// One noun per object: `point list|show|prune` for recovery points, `store ...` for the
/// store; the old spellings (`points list`, `store prune`) still work for scripts, hidden.
#[test]
fn point_and_store_nouns() {
    let t = test_dir("cli_nouns");
    let dd = t.path().join("dd");
    run(standby(&dd).args(["store", "init"]));
    for seed in [1, 2] {
        let img = t.path().join(format!("d{seed}.img"));
        standby_e2e::random_file(&img, 256 << 10, seed);
        run(standby(&dd).args(["store", "import", "vm/d"]).arg(&img));
    }
    let list = run_stdout(standby(&dd).args(["point", "list", "vm", "--json"]));
    let old = run_stdout(standby(&dd).args(["points", "list", "vm", "--json"]));
    assert_eq!(list, old, "the old spelling lists the same points");
    let points: serde_json::Value = serde_json::from_str(&list).unwrap();
    let newest = points.as_array().unwrap().last().unwrap().clone();
    let shown: serde_json::Value = serde_json::from_str(&run_stdout(standby(&dd).args([
        "point",
        "show",
        "vm/latest",
        "--json",
    ])))
    .unwrap();
    assert_eq!(
        shown, newest,
        "point show: the fields of GET /api/v1/points"
    );
    let text = run_stdout(standby(&dd).args(["point", "show", "vm/latest"]));
    assert!(
        text.contains("disk d") && text.contains("256.0 KiB"),
        "{text}"
    );
    for args in [
        &["point", "prune", "--keep-last", "1", "--dry-run"][..],
        &["store", "prune", "--keep-last", "1", "--dry-run"],
    ] {
        let out = run_stdout(standby(&dd).args(args));
        assert!(
            out.contains("kept 1 points, would remove 1"),
            "{args:?}: {out}"
        );
    }
    let help = run_stdout(standby(&dd).arg("--help"));
    let listed = |help: &str, cmd: &str| {
        help.lines()
            .any(|l| l.split_whitespace().next() == Some(cmd))
    };
    assert!(listed(&help, "point") && !listed(&help, "points"), "{help}");
    let help = run_stdout(standby(&dd).args(["store", "--help"]));
    assert!(listed(&help, "verify") && !listed(&help, "prune"), "{help}");
}
