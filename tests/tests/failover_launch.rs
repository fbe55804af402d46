//! The gateway launches a test failover's VM, from every front end: the policy's failover
//! command is a real program (qemu-img copying the served disk, then a sleeping "VM") started
//! by a test failover from the CLI and from a raw API POST; its pid is recorded and shown
//! (`vm_process`), it runs in a session of its own, and a cleanup (API or CLI) stops it —
//! the process is gone — then drops the exports and overlays. A gateway restart leaves the VM
//! running and still stoppable. `launch: false` boots nothing.
//! A failover command that cannot be executed, or that exits 3 at once, fails the request
//! (`500 launch_failed`, the CLI exits non-zero) and the job with the error and the VM log's
//! last lines; the exports stay served and the cleanup still works.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use standby_e2e::api::{origin, request, token, Answer};
use standby_e2e::repl::wait_for;
use standby_e2e::{require_tool, run, run_stdout, standby, test_dir, Gateway};

const T: Duration = Duration::from_secs(60);

fn get(base: &str, path: &str, t: &str) -> Answer {
    request("GET", &format!("{base}{path}"), Some(t), None, &[])
}

fn post(base: &str, path: &str, t: &str, body: Option<&str>) -> Answer {
    request("POST", &format!("{base}{path}"), Some(t), body, &[])
}

/// A data directory whose store holds one point of VM `vm` with disk `os` (`img`'s bytes).
fn site_with_point(root: &Path) -> (PathBuf, Vec<u8>) {
    let dd = root.join("dd");
    run(standby(&dd).args(["store", "init"]));
    let img = root.join("os.img");
    standby_e2e::random_file(&img, 2 << 20, 11);
    run(standby(&dd).args(["store", "import", "vm/os"]).arg(&img));
    (dd, std::fs::read(&img).expect("reading the image"))
}

/// The "VM": copies the served disk with qemu-img (a real NBD client reading the export),
/// then keeps running like a VM would.
fn copying_vm() -> String {
    let qemu_img = require_tool("qemu-img");
    format!(
        r#"sh -c '"$1" convert -f raw -O raw "$2" "$STANDBY_DIR/copy.img" && exec sleep 120' vm {} {{disk0}}"#,
        qemu_img.display()
    )
}

/// Whether `pid` runs (a zombie left to a non-reaping parent after the gateway exited does
/// not count).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 1..]
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Session id (field 6 of /proc/PID/stat).
fn session_of(pid: u64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..]
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The test failover's VM process as `GET /api/v1/attachments` shows it.
fn vm_process(base: &str, t: &str) -> Value {
    let a = get(base, "/api/v1/attachments", t);
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()
        .as_array()
        .expect("attachments")
        .iter()
        .find_map(|a| a.get("vm_process").cloned())
        .unwrap_or(Value::Null)
}

/// The newest job of `kind`, with its steps.
fn newest_job(base: &str, t: &str, kind: &str) -> Value {
    let jobs = get(base, "/api/v1/jobs?vm=vm&limit=20", t).json();
    let id = jobs
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} job: {jobs}"))["id"]
        .as_i64()
        .expect("job id");
    get(base, &format!("/api/v1/jobs/{id}"), t).json()
}

fn served(uri: &str) -> bool {
    Command::new("qemu-img")
        .args(["info", uri])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Waits for the copying VM's copy and checks it holds the point's bytes.
fn copy_matches(dd: &Path, want: &[u8]) {
    let copy = dd.join("failover/vm/test/copy.img");
    wait_for(dd, "the VM to copy its disk", T, || {
        (std::fs::read(&copy).ok()? == want).then_some(())
    });
}

fn assert_cleaned(dd: &Path, g: &Gateway, pid: u64) {
    assert!(!alive(pid), "the VM process {pid} survived the cleanup");
    assert!(!dd.join("failover/vm/test/os").exists(), "overlay left");
    assert!(!served(&g.uri("vm.os.test")), "export served after cleanup");
}

#[test]
fn test_failover_launches_the_vm_from_the_cli_and_the_api() {
    require_tool("qemu-img");
    let t = test_dir("launch");
    let (dd, want) = site_with_point(t.path());
    let admin = token(&dd, "ops", false);
    let mut g = Gateway::start(&dd, &["--api-listen", "127.0.0.1:0"]);
    let mut base = origin(&g.api.clone().expect("API address"));
    run(standby(&dd)
        .args(["policy", "set", "--failover-command"])
        .arg(copying_vm()));

    // (1) From the CLI: the gateway launches it; the CLI prints what the API answered.
    let out = run_stdout(standby(&dd).args(["failover", "test", "vm"]));
    let pid: u64 = out
        .split("VM launched (pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no launched VM in: {out}"));
    assert!(out.contains("failover/vm/test/vm.log"), "{out}");
    copy_matches(&dd, &want);
    assert!(alive(pid), "the VM exited");
    assert_eq!(
        session_of(pid),
        Some(pid),
        "the VM has no session of its own"
    );
    assert_ne!(session_of(pid), session_of(u64::from(g.pid())));
    let p = vm_process(&base, &admin);
    assert_eq!(p["pid"].as_u64(), Some(pid), "{p}");
    assert_eq!(p["state"], "running", "{p}");
    let job = newest_job(&base, &admin, "test-failover");
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        job["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .any(|s| s["name"] == "launch VM"),
        "{job}"
    );
    assert!(
        job["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("pid {pid}")),
        "{job}"
    );
    // `standby status` says the same.
    let st = run_stdout(standby(&dd).arg("status"));
    assert!(st.contains(&format!("VM pid {pid} running")), "{st}");
    // Cleanup through the API stops it.
    let a = post(&base, "/api/v1/vms/vm/failover/cleanup", &admin, None);
    assert_eq!(a.status, 200, "{}", a.body);
    let done = a.json();
    assert_eq!(done["stopped_vms"][0]["pid"].as_u64(), Some(pid), "{done}");
    assert_eq!(done["stopped_vms"][0]["outcome"], "stopped", "{done}");
    assert_cleaned(&dd, &g, pid);
    let job = newest_job(&base, &admin, "test-failover-cleanup");
    assert!(
        job["steps"][0]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("stopped"),
        "{job}"
    );
    std::fs::remove_file(dd.join("failover/vm/test/copy.img")).expect("removing the copy");

    // (2) A raw API POST (what the console does): the VM runs, its pid is in the answer.
    let a = post(&base, "/api/v1/vms/vm/failover/test", &admin, None);
    assert_eq!(a.status, 202, "{}", a.body);
    let s = a.json();
    assert_eq!(s["launch"], "launched", "{s}");
    let pid = s["vm_process"]["pid"].as_u64().expect("vm_process.pid");
    assert_eq!(s["vm_process"]["state"], "running", "{s}");
    copy_matches(&dd, &want);
    assert!(alive(pid));
    assert_eq!(vm_process(&base, &admin)["pid"].as_u64(), Some(pid));
    // A gateway restart does not stop the VM; the new gateway still knows it.
    g.stop();
    assert!(alive(pid), "the VM died with the gateway");
    g = Gateway::start(&dd, &["--api-listen", "127.0.0.1:0"]);
    base = origin(&g.api.clone().expect("API address"));
    let p = vm_process(&base, &admin);
    assert_eq!(p["pid"].as_u64(), Some(pid), "{p}");
    assert_eq!(p["state"], "running", "{p}");
    // Cleanup through the CLI (which asks the gateway).
    let out = run_stdout(standby(&dd).args(["failover", "cleanup", "vm"]));
    assert!(out.contains(&format!("VM process {pid} stopped")), "{out}");
    assert_cleaned(&dd, &g, pid);

    // (3) `launch: false`: the disks only.
    let a = post(
        &base,
        "/api/v1/vms/vm/failover/test",
        &admin,
        Some(r#"{"launch": false}"#),
    );
    assert_eq!(a.status, 202, "{}", a.body);
    let s = a.json();
    assert_eq!(s["launch"], "not_requested", "{s}");
    assert!(s.get("vm_process").is_none(), "{s}");
    assert!(served(&g.uri("vm.os.test")));
    assert_eq!(vm_process(&base, &admin), Value::Null);
    // `launch` belongs to a test failover only.
    post(
        &base,
        "/api/v1/vms/vm/failover/start",
        &admin,
        Some(r#"{"launch": true}"#),
    )
    .assert_error(400, "invalid_request");
    let a = post(&base, "/api/v1/vms/vm/failover/cleanup", &admin, None);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["stopped_vms"], serde_json::json!([]));
    g.stop();
}

#[test]
fn a_failing_failover_command_fails_the_job_and_keeps_the_exports() {
    require_tool("qemu-img");
    let t = test_dir("launch-fail");
    let (dd, _) = site_with_point(t.path());
    let admin = token(&dd, "ops", false);
    let g = Gateway::start(&dd, &["--api-listen", "127.0.0.1:0"]);
    let base = origin(&g.api.clone().expect("API address"));

    for (command, says) in [
        (
            "/nonexistent/standby-test-vm {disk0}",
            vec![
                "cannot execute \"/nonexistent/standby-test-vm\"",
                "No such file",
            ],
        ),
        (
            "sh -c 'echo boom-from-the-vm >&2; exit 3'",
            vec!["exited with status 3", "boom-from-the-vm", "\"sh\""],
        ),
    ] {
        run(standby(&dd)
            .args(["policy", "set", "--failover-command"])
            .arg(command));
        let a = post(&base, "/api/v1/vms/vm/failover/test", &admin, None);
        a.assert_error(500, "launch_failed");
        let msg = a.json()["error"].as_str().unwrap_or_default().to_string();
        for s in says
            .iter()
            .chain(&["standby failover cleanup vm", "vm.os.test"])
        {
            assert!(msg.contains(s), "{s:?} missing from: {msg}");
        }
        let job = newest_job(&base, &admin, "test-failover");
        assert_eq!(job["state"], "failed", "{job}");
        assert_eq!(job["error"].as_str(), Some(msg.as_str()), "{job}");
        let launch = job["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .find(|s| s["name"] == "launch VM")
            .cloned()
            .unwrap_or_else(|| panic!("no launch step: {job}"));
        assert_eq!(launch["state"], "failed", "{job}");
        if command.starts_with("sh ") {
            // The attachment says how the VM ended.
            let p = vm_process(&base, &admin);
            assert_eq!(p["state"], "exited", "{p}");
            assert_eq!(p["exit_code"].as_i64(), Some(3), "{p}");
            assert_eq!(p["exit"], "exited with status 3", "{p}");
        }
        // The exports stay: the admin can boot by hand.
        assert!(
            served(&g.uri("vm.os.test")),
            "export gone after a failed launch"
        );
        let a = post(&base, "/api/v1/vms/vm/failover/cleanup", &admin, None);
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(!served(&g.uri("vm.os.test")));
        assert!(!dd.join("failover/vm/test/os").exists(), "overlay left");
    }

    // The CLI says the same and exits non-zero.
    let o = standby(&dd)
        .args(["failover", "test", "vm"])
        .output()
        .expect("running standby");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("exited with status 3") && err.contains("boom-from-the-vm"),
        "{err}"
    );
    assert!(served(&g.uri("vm.os.test")));
    run(standby(&dd).args(["failover", "cleanup", "vm"]));
    assert!(!served(&g.uri("vm.os.test")));
    g.stop();
}
