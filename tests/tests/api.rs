//! The HTTP API against a running `standby serve`, with curl: every documented endpoint,
//! tokens (none, wrong, read-only, revoked), bad input refused with a message and nothing
//! changed, an action that drives a real protection to Protected, HTTPS, and the start-up
//! refusal of plain HTTP beyond loopback.
//!
//! Long (~850 lines) because it walks every endpoint of docs/api.md in order, with its refusals.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use standby_e2e::api::{origin, request, token, Answer};
use standby_e2e::pki::Pki;
use standby_e2e::repl::{read_export, second_site, site, wait_for};
use standby_e2e::{require_tool, run, run_stdout, standby, test_dir, Gateway};

fn get(base: &str, path: &str, t: Option<&str>) -> Answer {
    request("GET", &format!("{base}{path}"), t, None, &[])
}

fn post(base: &str, path: &str, t: Option<&str>, body: Option<&str>) -> Answer {
    request("POST", &format!("{base}{path}"), t, body, &[])
}

/// The documented (method, path) pairs, with parameters filled in.
fn documented(base: &str, admin: &str, vm: &str, disk: &str, job: i64) -> Vec<(String, String)> {
    let doc = get(base, "/api/v1/openapi.json", Some(admin));
    assert_eq!(doc.status, 200, "{}", doc.body);
    let doc = doc.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        let p = path
            .replace("{vm}", vm)
            .replace("{name}", disk)
            .replace("{id}", &job.to_string())
            .replace("{export}", "nothing");
        for m in ops.as_object().expect("operations").keys() {
            out.push((m.to_uppercase(), p.clone()));
        }
    }
    assert!(out.len() >= 18, "{out:?}");
    out
}

fn state_of(base: &str, t: &str, vm: &str) -> Option<String> {
    let a = get(base, &format!("/api/v1/vms/{vm}"), Some(t));
    (a.status == 200).then(|| a.json()["state"].as_str().unwrap_or_default().to_string())
}

fn policy(base: &str, t: &str) -> Value {
    let a = get(base, "/api/v1/policy", Some(t));
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()
}

#[test]
fn api_end_to_end() {
    let t = test_dir("api_e2e");
    let dd = site(t.path(), &[("d1", "8M"), ("d2", "8M")]);
    let admin = token(&dd, "ops", false);
    let ro = token(&dd, "grafana", true);
    let g = Gateway::start(&dd, &["--api-listen", "127.0.0.1:0"]);
    let api = g.api.clone().expect("the gateway prints its API address");
    let base = origin(&api);

    // Before anything is protected: refusals, and nothing changes.
    let before = policy(&base, &ro);
    for (body, code, status) in [
        (r#"{"vm":"v1","disks":["nope"]}"#, "invalid_request", 400),
        (
            r#"{"vm":"bad name","disks":["d1"]}"#,
            "invalid_request",
            400,
        ),
        (r#"{"vm":"v1","disks":["d1","d1"]}"#, "invalid_request", 400),
        (r#"{"vm":"v1","disks":[]}"#, "invalid_request", 400),
        (r#"{"vm":"v1"}"#, "invalid_request", 422),
        (
            r#"{"vm":"v1","disks":["d1"],"extra":1}"#,
            "invalid_request",
            422,
        ),
        ("{not json", "invalid_request", 400),
    ] {
        post(&base, "/api/v1/vms", Some(&admin), Some(body)).assert_error(status, code);
    }
    let vms = get(&base, "/api/v1/vms", Some(&ro));
    assert_eq!(vms.json(), serde_json::json!([]), "no VM was recorded");
    for body in [
        r#"{"interval":"5x"}"#,
        r#"{"retention":"0"}"#,
        r#"{"resync_window":"25:00-01:00"}"#,
        r#"{"app_consistent":"4h"}"#,
        r#"{"bandwidth":"fast"}"#,
        r#"{"intervall":"5m"}"#,
    ] {
        let a = post(&base, "/api/v1/policy", Some(&admin), Some(body));
        assert!(
            a.status == 400 || a.status == 422,
            "{body}: {} {}",
            a.status,
            a.body
        );
        a.assert_error(a.status, "invalid_request");
    }
    assert_eq!(policy(&base, &ro), before, "the policy did not change");
    post(&base, "/api/v1/vms/ghost/resync", Some(&admin), None).assert_error(404, "not_found");
    post(&base, "/api/v1/vms/ghost/resume", Some(&admin), None).assert_error(404, "not_found");
    post(&base, "/api/v1/vms/ghost/unprotect", Some(&admin), None).assert_error(404, "not_found");
    get(&base, "/api/v1/vms/ghost", Some(&ro)).assert_error(404, "not_found");
    get(&base, "/api/v1/disks/ghost", Some(&ro)).assert_error(404, "not_found");
    get(&base, "/api/v1/jobs/999999", Some(&ro)).assert_error(404, "not_found");
    get(&base, "/api/v1/jobs/abc", Some(&ro)).assert_error(400, "invalid_request");
    get(&base, "/api/v1/jobs?limit=0", Some(&ro)).assert_error(400, "invalid_request");
    get(&base, "/api/v1/points?vm=..", Some(&ro)).assert_error(400, "invalid_request");
    get(&base, "/api/v1/nothing", Some(&ro)).assert_error(404, "no_such_route");
    request(
        "DELETE",
        &format!("{base}/api/v1/vms"),
        Some(&admin),
        None,
        &[],
    )
    .assert_error(405, "method_not_allowed");

    // An action drives a real protection: initial replication, then Protected.
    let a = post(
        &base,
        "/api/v1/vms",
        Some(&admin),
        Some(r#"{"vm":"v1","disks":["d1"]}"#),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.json()["disks"], serde_json::json!(["d1"]));
    wait_for(&dd, "v1 Protected (API)", Duration::from_secs(60), || {
        (state_of(&base, &ro, "v1").as_deref() == Some("Protected")).then_some(())
    });
    // The same VM again, or its disk in another VM: 409, nothing changed.
    post(
        &base,
        "/api/v1/vms",
        Some(&admin),
        Some(r#"{"vm":"v1","disks":["d2"]}"#),
    )
    .assert_error(409, "conflict");
    post(
        &base,
        "/api/v1/vms",
        Some(&admin),
        Some(r#"{"vm":"v2","disks":["d1"]}"#),
    )
    .assert_error(409, "conflict");
    let vms = get(&base, "/api/v1/vms", Some(&ro)).json();
    assert_eq!(vms.as_array().map(Vec::len), Some(1), "{vms}");
    let v = &vms[0];
    assert_eq!(v["name"], "v1");
    assert_eq!(v["health"], "normal");
    assert!(v["rpo_seconds"].as_f64().is_some(), "{v}");
    assert!(v["last_point"].as_str().is_some(), "{v}");
    assert_eq!(v["disks"][0]["name"], "d1");
    // The CLI sees what the API did, and its --json has the API's fields.
    assert!(standby_e2e::repl::vm_json(&dd, "v1").is_some());
    let keys = |v: &Value| {
        v.as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    let cli: Value =
        serde_json::from_str(&run_stdout(standby(&dd).args(["status", "--json"]))).unwrap();
    assert_eq!(cli["vms"][0]["name"], "v1");
    assert_eq!(cli["vms"][0]["state"], "Protected");
    assert_eq!(keys(&cli["vms"][0]), keys(v));
    assert_eq!(cli["attachments"], serde_json::json!([]));

    // Resources now have content.
    let jobs = get(&base, "/api/v1/jobs?vm=v1&limit=50", Some(&ro)).json();
    let jobs = jobs.as_array().expect("jobs").clone();
    let initial = jobs
        .iter()
        .find(|j| j["kind"] == "initial-replication")
        .unwrap_or_else(|| panic!("{jobs:?}"));
    assert_eq!(initial["state"], "succeeded");
    let id = initial["id"].as_i64().expect("id");
    let job = get(&base, &format!("/api/v1/jobs/{id}"), Some(&ro)).json();
    assert!(!job["steps"].as_array().expect("steps").is_empty(), "{job}");
    let cli: Value = serde_json::from_str(&run_stdout(standby(&dd).args([
        "job",
        "show",
        &id.to_string(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(keys(&cli), keys(&job));
    assert_eq!(cli["id"], id);
    let cli: Value = serde_json::from_str(&run_stdout(
        standby(&dd).args(["jobs", "--vm", "v1", "--limit", "50", "--json"]),
    ))
    .unwrap();
    assert!(cli
        .as_array()
        .expect("jobs")
        .iter()
        .any(|j| j["id"] == id && j["kind"] == "initial-replication"));
    let points = get(&base, "/api/v1/points?vm=v1", Some(&ro)).json();
    assert!(!points.as_array().expect("points").is_empty());
    assert_eq!(points[0]["vm"], "v1");
    let cli: Value = serde_json::from_str(&run_stdout(
        standby(&dd).args(["point", "list", "v1", "--json"]),
    ))
    .unwrap();
    assert_eq!(cli[0]["id"], points[0]["id"]);
    assert_eq!(keys(&cli[0]), keys(&points[0]));
    let store = get(&base, "/api/v1/store", Some(&ro)).json();
    assert!(store["points"].as_u64() >= Some(1), "{store}");
    assert!(store["vms"]["v1"].as_u64() >= Some(1), "{store}");
    // Usage as the store's objects say (the disks are zeros: no chunk is stored), objects by
    // size class adding up.
    assert_eq!(store["layout"], "chunks", "{store}");
    assert_eq!(store["chunks"], 0, "{store}");
    assert_eq!(store["chunks"], store["usage"]["chunks"], "{store}");
    let classes = store["usage"]["sizes"].as_array().expect("size classes");
    let counted: u64 = classes.iter().filter_map(|c| c["objects"].as_u64()).sum();
    assert_eq!(Some(counted), store["usage"]["objects"].as_u64(), "{store}");
    let disks = get(&base, "/api/v1/disks", Some(&ro)).json();
    let d1 = disks
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == "d1"))
        .expect("d1")
        .clone();
    assert_eq!(d1["vm"], "v1");
    assert_eq!(d1["tracked"], true);
    assert_eq!(d1["served"], true);
    assert_eq!(d1["size_bytes"], 8 << 20);
    assert_eq!(
        get(&base, "/api/v1/attachments", Some(&ro)).json(),
        serde_json::json!([])
    );

    // Every documented endpoint: refused without a token and with a wrong one; GETs answer a
    // read-only token; actions refuse it (403) and change nothing.
    let wrong = format!("sbt_{}", "0".repeat(64));
    let before_vm = get(&base, "/api/v1/vms/v1", Some(&ro)).json();
    for (method, path) in documented(&base, &admin, "v1", "d1", id) {
        let url = format!("{base}{path}");
        let body = (method == "POST").then_some("{}");
        request(&method, &url, None, body, &[]).assert_error(401, "unauthorized");
        request(&method, &url, Some(&wrong), body, &[]).assert_error(401, "unauthorized");
        request(&method, &url, Some("garbage"), body, &[]).assert_error(401, "unauthorized");
        if method == "GET" {
            let a = request(&method, &url, Some(&ro), None, &[]);
            assert_eq!(a.status, 200, "GET {path}: {}", a.body);
        } else {
            request(&method, &url, Some(&ro), body, &[]).assert_error(403, "forbidden");
        }
    }
    let after_vm = get(&base, "/api/v1/vms/v1", Some(&ro)).json();
    assert_eq!(after_vm["state"], before_vm["state"]);
    assert_eq!(
        get(&base, "/api/v1/vms", Some(&ro))
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // Store verification: a job of no VM (202 + its id), the whole store, one point; a point
    // that does not exist or a bad body: refused before any job exists.
    let jobs_before = get(&base, "/api/v1/jobs?limit=500", Some(&ro)).json();
    post(
        &base,
        "/api/v1/store/verify",
        Some(&admin),
        Some(r#"{"point":"v1/20000101T000000.000Z-0000000000000000"}"#),
    )
    .assert_error(404, "not_found");
    post(
        &base,
        "/api/v1/store/verify",
        Some(&admin),
        Some(r#"{"pointt":"v1/latest"}"#),
    )
    .assert_error(400, "invalid_request");
    post(&base, "/api/v1/store/verify", Some(&ro), None).assert_error(403, "forbidden");
    assert_eq!(
        get(&base, "/api/v1/jobs?limit=500", Some(&ro)).json(),
        jobs_before,
        "no job was started"
    );
    let a = post(&base, "/api/v1/store/verify", Some(&admin), None);
    assert_eq!(a.status, 202, "{}", a.body);
    let started = a.json();
    assert_eq!(started["point"], Value::Null, "{started}");
    let vj = started["job"].as_i64().expect("job id");
    let j = finished_job(&base, &ro, vj, Duration::from_secs(60));
    assert_eq!(j["kind"], "store-verify", "{j}");
    assert_eq!(j["vm"], Value::Null, "{j}");
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["result"]["ok"], true, "{j}");
    assert!(j["result"]["points_checked"].as_u64() >= Some(1), "{j}");
    assert_eq!(
        j["counts"]["points_read"], j["counts"]["points_total"],
        "{j}"
    );
    let a = post(
        &base,
        "/api/v1/store/verify",
        Some(&admin),
        Some(r#"{"point":"v1/latest"}"#),
    );
    assert_eq!(a.status, 202, "{}", a.body);
    assert!(
        a.json()["point"]
            .as_str()
            .is_some_and(|p| p.starts_with("v1/")),
        "{}",
        a.body
    );
    let j = finished_job(
        &base,
        &ro,
        a.json()["job"].as_i64().expect("job"),
        Duration::from_secs(60),
    );
    assert_eq!(j["result"]["points_checked"], 1, "{j}");
    // The job list shows it as a job of no VM.
    let listed = get(&base, "/api/v1/jobs?limit=5", Some(&ro)).json();
    assert!(
        listed
            .as_array()
            .expect("jobs")
            .iter()
            .any(|x| x["id"] == vj && x["vm"].is_null()),
        "{listed}"
    );

    // The other actions, with the admin token.
    let a = post(
        &base,
        "/api/v1/policy",
        Some(&admin),
        Some(r#"{"retention":"7d"}"#),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["retention_hours"], 168.0);
    // The CLI reads the same policy (the API's fields).
    let cli = standby_e2e::cli_json::json(&dd, &["policy", "show"]);
    assert_eq!(cli["retention_hours"], 168.0, "{cli}");
    let a = post(&base, "/api/v1/vms/v1/resume", Some(&admin), None);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["outcome"], "nothing_to_resume");
    post(
        &base,
        "/api/v1/vms/v1/resync",
        Some(&admin),
        Some(r#"{"fast":true}"#),
    )
    .assert_error(400, "invalid_request");
    let a = post(
        &base,
        "/api/v1/vms/v1/resync",
        Some(&admin),
        Some(r#"{"full":true}"#),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    wait_for(
        &dd,
        "v1 Protected after resync",
        Duration::from_secs(60),
        || {
            let jobs = get(&base, "/api/v1/jobs?vm=v1", Some(&ro)).json();
            let resynced = jobs.as_array().is_some_and(|j| {
                j.iter()
                    .any(|j| j["kind"] == "resync" && j["state"] == "succeeded")
            });
            (resynced && state_of(&base, &ro, "v1").as_deref() == Some("Protected")).then_some(())
        },
    );
    let a = post(&base, "/api/v1/vms/v1/unprotect", Some(&admin), None);
    assert_eq!(a.status, 200, "{}", a.body);
    get(&base, "/api/v1/vms/v1", Some(&ro)).assert_error(404, "not_found");

    // A revoked token stops working at once; `token list` shows no secret.
    run(standby(&dd).args(["token", "revoke", "grafana"]));
    get(&base, "/api/v1/vms", Some(&ro)).assert_error(401, "unauthorized");
    let list = standby_e2e::cli_json::json(&dd, &["token", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .expect("token list")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["ops"], "{list}");
    assert_eq!(list[0]["scope"], "admin", "{list}");
    // Secrets are stored hashed: no output shows one.
    let text = run_stdout(standby(&dd).args(["token", "list"]));
    assert!(
        !text.contains(&admin[4..]) && !list.to_string().contains(&admin[4..]),
        "{text}"
    );
    let o = standby(&dd)
        .args(["token", "create", "ops"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    g.stop();
}

fn job_state(base: &str, t: &str, id: i64) -> Value {
    let a = get(base, &format!("/api/v1/jobs/{id}"), Some(t));
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()
}

/// Waits for a job to end; returns it (asserting it succeeded).
fn job_succeeds(dd: &Path, base: &str, t: &str, id: i64) -> Value {
    let j = wait_for(dd, "the job to end", Duration::from_secs(60), || {
        let j = job_state(base, t, id);
        (j["state"] != "running").then_some(j)
    });
    assert_eq!(j["state"], "succeeded", "{j}");
    j
}

/// The failover actions through the API against a real replica: attach read back with
/// qemu-img and nbdinfo, detach, test failover and its cleanup; bad requests refused with
/// nothing changed (no attachment, no job).
#[test]
fn api_failover_actions() {
    let qemu_img = require_tool("qemu-img");
    let nbdinfo = require_tool("nbdinfo");
    let t = test_dir("api_failover");
    let dd = site(t.path(), &[("d1", "8M"), ("d2", "4M")]);
    let admin = token(&dd, "ops", false);
    let ro = token(&dd, "grafana", true);
    let g = Gateway::start(&dd, &["--api-listen", "127.0.0.1:0"]);
    let base = origin(&g.api.clone().expect("API address"));
    // Known bytes on d1, then a point that holds them.
    let img = t.path().join("d1.img");
    standby_e2e::random_file(&img, 8 << 20, 17);
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&img)
        .arg(g.uri("d1")));
    let a = post(
        &base,
        "/api/v1/vms",
        Some(&admin),
        Some(r#"{"vm":"v1","disks":["d1","d2"]}"#),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    wait_for(&dd, "v1 Protected", Duration::from_secs(60), || {
        (state_of(&base, &ro, "v1").as_deref() == Some("Protected")).then_some(())
    });
    let jobs_before = get(&base, "/api/v1/jobs?limit=500", Some(&ro)).json();

    // Refused, nothing written.
    for (path, body, status, code) in [
        (
            "/api/v1/attachments",
            r#"{"vm":"v1","disk":"nodisk"}"#,
            404,
            "not_found",
        ),
        (
            "/api/v1/attachments",
            r#"{"vm":"v1","disk":"d1","point":"nosuchpoint"}"#,
            404,
            "not_found",
        ),
        (
            "/api/v1/attachments",
            r#"{"vm":"ghost","disk":"d1"}"#,
            404,
            "not_found",
        ),
        (
            "/api/v1/attachments",
            r#"{"vm":"../x","disk":"d1"}"#,
            400,
            "invalid_request",
        ),
        (
            "/api/v1/attachments",
            r#"{"vm":"v1","disk":"d1","writable":true}"#,
            422,
            "invalid_request",
        ),
        (
            "/api/v1/attachments",
            r#"{"vm":"v1"}"#,
            422,
            "invalid_request",
        ),
        ("/api/v1/attachments/nothing/detach", "", 404, "not_found"),
        (
            "/api/v1/vms/v1/failover/test",
            r#"{"point":"nosuchpoint"}"#,
            404,
            "not_found",
        ),
        (
            "/api/v1/vms/v1/failover/test",
            r#"{"pointt":"latest"}"#,
            400,
            "invalid_request",
        ),
        (
            "/api/v1/vms/v1/failover/test",
            "{bad",
            400,
            "invalid_request",
        ),
        ("/api/v1/vms/ghost/failover/test", "", 404, "not_found"),
        ("/api/v1/vms/v1/failover/cleanup", "", 404, "not_found"),
        ("/api/v1/vms/v1/failover/commit", "", 404, "not_found"),
        ("/api/v1/vms/ghost/failover/prepare", "", 404, "not_found"),
        // The disks exist here: a failover belongs on the recovery gateway.
        ("/api/v1/vms/v1/failover/start", "", 409, "conflict"),
    ] {
        let body = (!body.is_empty()).then_some(body);
        let a = post(&base, path, Some(&admin), body);
        assert_eq!(a.status, status, "{path} {body:?}: {}", a.body);
        a.assert_error(status, code);
    }
    assert_eq!(
        get(&base, "/api/v1/attachments", Some(&ro)).json(),
        serde_json::json!([]),
        "no attachment was recorded"
    );
    let jobs_after = get(&base, "/api/v1/jobs?limit=500", Some(&ro)).json();
    let ids = |j: &Value| -> Vec<i64> {
        j.as_array()
            .expect("jobs")
            .iter()
            .filter(|j| j["kind"].as_str().is_some_and(|k| k.contains("failover")))
            .filter_map(|j| j["id"].as_i64())
            .collect()
    };
    assert_eq!(
        ids(&jobs_after),
        ids(&jobs_before),
        "no failover job was started"
    );

    // Attach: served when the answer comes; the point's bytes read back.
    let a = post(
        &base,
        "/api/v1/attachments",
        Some(&admin),
        Some(r#"{"vm":"v1","disk":"d1"}"#),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    let at = a.json();
    let uri = at["uri"].as_str().expect("uri").to_string();
    let export = at["export"].as_str().expect("export").to_string();
    assert_eq!(at["size_bytes"], 8 << 20);
    let info = run_stdout(Command::new(&nbdinfo).args(["--size", &uri]));
    assert_eq!(info.trim(), (8u64 << 20).to_string(), "{info}");
    let back = t.path().join("back.img");
    run(Command::new(&qemu_img)
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == std::fs::read(&img).unwrap(),
        "the attached point holds the written bytes"
    );
    // Twice: 409. Read-only by default: a write is refused by the server.
    post(
        &base,
        "/api/v1/attachments",
        Some(&admin),
        Some(r#"{"vm":"v1","disk":"d1"}"#),
    )
    .assert_error(409, "conflict");
    let o = Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&img)
        .arg(&uri)
        .output()
        .unwrap();
    assert!(!o.status.success(), "a read-only attachment took a write");
    let cli: Value =
        serde_json::from_str(&run_stdout(standby(&dd).args(["status", "--json"]))).unwrap();
    assert_eq!(cli["attachments"][0]["export"], export.as_str());
    let a = post(
        &base,
        &format!("/api/v1/attachments/{export}/detach"),
        Some(&admin),
        None,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        get(&base, "/api/v1/attachments", Some(&ro)).json(),
        serde_json::json!([])
    );

    // Test failover: 202 with the job, which succeeds once every disk is served.
    let a = post(&base, "/api/v1/vms/v1/failover/test", Some(&admin), None);
    assert_eq!(a.status, 202, "{}", a.body);
    let started = a.json();
    let job = started["job"].as_i64().expect("job");
    assert_eq!(
        started["exports"].as_array().map(Vec::len),
        Some(2),
        "{started}"
    );
    let j = job_succeeds(&dd, &base, &ro, job);
    assert_eq!(j["kind"], "test-failover");
    assert!(
        j["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("v1.d1.test"),
        "{j}"
    );
    let test_uri = g.uri("v1.d1.test");
    let info = run_stdout(Command::new(&nbdinfo).args(["--size", &test_uri]));
    assert_eq!(info.trim(), (8u64 << 20).to_string());
    // Writable (an overlay), the replica untouched.
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(t.path().join("back.img"))
        .arg(&test_uri));
    // A second one is refused; a detach of its export too.
    post(&base, "/api/v1/vms/v1/failover/test", Some(&admin), None).assert_error(409, "conflict");
    post(
        &base,
        "/api/v1/attachments/v1.d1.test/detach",
        Some(&admin),
        None,
    )
    .assert_error(409, "conflict");
    let a = post(&base, "/api/v1/vms/v1/failover/cleanup", Some(&admin), None);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["exports"].as_array().map(Vec::len), Some(2));
    let o = Command::new(&nbdinfo).arg(&test_uri).output().unwrap();
    assert!(
        !o.status.success(),
        "test export still served after cleanup"
    );
    assert!(
        !dd.join("failover/v1/test/d1").exists(),
        "overlay left behind"
    );

    // Planned failover on the primary: 202 with the job; it succeeds after a final cycle and
    // the VM is no longer protected here.
    let a = post(&base, "/api/v1/vms/v1/failover/prepare", Some(&admin), None);
    assert_eq!(a.status, 202, "{}", a.body);
    let job = a.json()["job"].as_i64().expect("job");
    let j = job_succeeds(&dd, &base, &ro, job);
    assert_eq!(j["kind"], "failover-prepare");
    assert!(
        j["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("final point"),
        "{j}"
    );
    get(&base, "/api/v1/vms/v1", Some(&ro)).assert_error(404, "not_found");
    g.stop();
}

#[test]
fn api_over_https_and_network_rules() {
    let t = test_dir("api_tls");
    let dd = t.path().join("dd");
    run(standby(&dd).args(["disk", "create", "d1", "--size", "1M"]));
    let admin = token(&dd, "ops", false);
    let (cert, key) = Pki::new(&t.path().join("pki")).self_signed("server");

    // Plain HTTP beyond loopback: refused at start-up, naming the settings to give.
    let o = standby(&dd)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--api-tls-cert") && err.contains("127.0.0.1"),
        "{err}"
    );
    // A configured address that cannot be used is an error too.
    let o = standby(&dd)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "nonsense",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an API listen address"));

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
    let api = g.api.clone().expect("API address");
    assert!(api.starts_with("https://"), "{api}");
    let url = format!("{}/api/v1/disks", origin(&api));
    let a = request("GET", &url, Some(&admin), None, &["--cacert", &cert]);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()[0]["name"], "d1");
    // Plain HTTP to the HTTPS port gets no API answer.
    let plain = url.replace("https://", "http://");
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-H"])
        .arg(format!("Authorization: Bearer {admin}"))
        .arg(&plain)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("\"d1\""),
        "plain HTTP must not be served"
    );
    // An untrusted certificate is refused by the client.
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(&url)
        .output()
        .unwrap();
    assert!(!o.status.success());
    g.stop();

    // `--no-api`: no API line, NBD still served.
    let g = Gateway::start(&dd, &["--no-api"]);
    assert!(g.api.is_none());
    g.stop();
}

/// Polls `GET /api/v1/jobs/{job}` until it is no longer running; the job.
fn finished_job(base: &str, t: &str, job: i64, timeout: Duration) -> Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let j = get(base, &format!("/api/v1/jobs/{job}"), Some(t));
        assert_eq!(j.status, 200, "{}", j.body);
        let j = j.json();
        if j["state"] != "running" {
            return j;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {job} still running after {timeout:?}: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Planned failover through the API only, doing the real work: prepare on the primary
/// replicates the last writes and stops protection there; on a recovery gateway opening the
/// same store, failover start serves the disk at once with those bytes, and commit makes it a
/// local disk of that gateway, with the same bytes.
#[test]
fn api_planned_failover_start_and_commit() {
    let qemu_img = require_tool("qemu-img");
    let t = test_dir("api_failover_commit");
    let primary = site(t.path(), &[("app", "8M")]);
    let admin = token(&primary, "ops", false);
    let g1 = Gateway::start(&primary, &[]);
    let base = origin(&g1.api.clone().expect("API address"));
    let first = t.path().join("first.img");
    standby_e2e::random_file(&first, 8 << 20, 21);
    run(Command::new(&qemu_img)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&first)
        .arg(g1.uri("app")));
    let a = post(
        &base,
        "/api/v1/vms",
        Some(&admin),
        Some(r#"{"vm":"vm","disks":["app"]}"#),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    wait_for(&primary, "vm Protected", Duration::from_secs(60), || {
        (state_of(&base, &admin, "vm").as_deref() == Some("Protected")).then_some(())
    });
    // The VM's last writes, carried by the final replication only: 2 MiB of the 8 MiB disk
    // (a quarter: at half the disk unshipped, the next tick would rightly ask for a resync).
    let qemu_io = require_tool("qemu-io");
    run(Command::new(&qemu_io).args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 1M",
        "-c",
        "write -P 0xa5 5M 1M",
        &g1.uri("app"),
    ]));
    let mut want = std::fs::read(&first).expect("first image");
    want[1 << 20..2 << 20].fill(0x5a);
    want[5 << 20..6 << 20].fill(0xa5);

    let a = post(&base, "/api/v1/vms/vm/failover/prepare", Some(&admin), None);
    assert_eq!(a.status, 202, "{}", a.body);
    let j = finished_job(
        &base,
        &admin,
        a.json()["job"].as_i64().expect("job"),
        Duration::from_secs(120),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["kind"], "failover-prepare", "{j}");
    let detail = j["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("final point "), "{detail}");
    get(&base, "/api/v1/vms/vm", Some(&admin)).assert_error(404, "not_found");
    assert!(g1.stop().success());

    // The recovery gateway: its own data directory on the same store.
    let recovery = t.path().join("recovery");
    second_site(&primary, &recovery);
    let admin2 = token(&recovery, "ops", false);
    let g2 = Gateway::start(&recovery, &[]);
    let base2 = origin(&g2.api.clone().expect("API address"));
    let a = post(&base2, "/api/v1/vms/vm/failover/start", Some(&admin2), None);
    assert_eq!(a.status, 202, "{}", a.body);
    let started = a.json();
    assert_eq!(started["exports"], serde_json::json!([["app", "app"]]));
    assert_eq!(
        started["uris"],
        serde_json::json!([g2.uri("app")]),
        "{started}"
    );
    // Served when answered, with the final delta's bytes; its job already finished.
    assert_eq!(
        read_export(&g2.uri("app"), &t.path().join("served.img")),
        want,
        "the failed-over disk holds the VM's last writes"
    );
    let j = finished_job(
        &base2,
        &admin2,
        started["job"].as_i64().expect("job"),
        Duration::from_secs(1),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    // A second failover of the same VM is refused.
    post(&base2, "/api/v1/vms/vm/failover/start", Some(&admin2), None)
        .assert_error(409, "conflict");

    let a = post(
        &base2,
        "/api/v1/vms/vm/failover/commit",
        Some(&admin2),
        None,
    );
    assert_eq!(a.status, 202, "{}", a.body);
    let c = a.json();
    assert_eq!(c["exports"], serde_json::json!(["app"]), "{c}");
    let j = finished_job(
        &base2,
        &admin2,
        c["job"].as_i64().expect("job"),
        Duration::from_secs(120),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["kind"], "failover-commit", "{j}");
    // Now a local disk of the recovery gateway, served, same bytes; no attachment left.
    let d = get(&base2, "/api/v1/disks/app", Some(&admin2));
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(d.json()["served"], true, "{}", d.body);
    assert_eq!(
        get(&base2, "/api/v1/attachments", Some(&admin2)).json(),
        serde_json::json!([])
    );
    assert_eq!(
        read_export(&g2.uri("app"), &t.path().join("committed.img")),
        want,
        "the committed disk"
    );
    post(
        &base2,
        "/api/v1/vms/vm/failover/commit",
        Some(&admin2),
        None,
    )
    .assert_error(404, "not_found");
    assert!(g2.stop().success());
}

/// Every file under `dir`.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `store verify` as a job: one at a time (409 naming the running job), its figures and
/// result when the store is intact; a corrupted chunk makes the job fail with the chunk and
/// the broken point in its result, and the CLI following the job exits non-zero.
#[test]
fn api_store_verify_job() {
    let qemu_io = require_tool("qemu-io");
    let t = test_dir("api_verify");
    let dd = site(t.path(), &[("d1", "8M")]);
    let admin = token(&dd, "ops", false);
    let g = Gateway::start(&dd, &["--api-listen", "127.0.0.1:0"]);
    let base = origin(g.api.as_deref().expect("API address"));
    // Data, so the point has chunks (different patterns: nothing deduplicates).
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..8u64 {
        args.push("-c".into());
        args.push(format!("write -P {} {} 1M", i + 1, i << 20));
    }
    args.push(g.uri("d1"));
    run(Command::new(&qemu_io).args(&args));
    let a = post(
        &base,
        "/api/v1/vms",
        Some(&admin),
        Some(r#"{"vm":"v1","disks":["d1"]}"#),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    wait_for(&dd, "v1 Protected", Duration::from_secs(60), || {
        (state_of(&base, &admin, "v1").as_deref() == Some("Protected")).then_some(())
    });

    // While a verification runs (started here through the state database, as the gateway
    // starts its own), another is refused with the running job's id.
    let db = gateway::replication::Db::open(&dd).expect("state database");
    let running = db
        .start_job_alone("", gateway::replication::db::JobKind::StoreVerify)
        .expect("database")
        .expect("no verification runs yet");
    let a = post(&base, "/api/v1/store/verify", Some(&admin), None);
    a.assert_error(409, "conflict");
    assert!(a.body.contains(&format!("job {running}")), "{}", a.body);
    db.finish_job(
        running,
        gateway::replication::db::JobState::Failed,
        "",
        "test",
    )
    .expect("database");

    // Intact: the job succeeds; its figures reached their totals.
    let a = post(&base, "/api/v1/store/verify", Some(&admin), None);
    assert_eq!(a.status, 202, "{}", a.body);
    let j = finished_job(
        &base,
        &admin,
        a.json()["job"].as_i64().expect("job"),
        Duration::from_secs(60),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["progress_percent"], 100.0, "{j}");
    let c = &j["counts"];
    assert!(c["chunks_total"].as_u64() > Some(0), "{j}");
    assert_eq!(c["chunks_checked"], c["chunks_total"], "{j}");
    assert_eq!(c["bytes_checked"], c["bytes_total"], "{j}");
    assert_eq!(j["result"]["ok"], true, "{j}");
    assert_eq!(j["result"]["chunks_checked"], c["chunks_checked"], "{j}");
    assert!(
        j["detail"]
            .as_str()
            .unwrap_or_default()
            .starts_with("checked "),
        "{j}"
    );

    // One chunk corrupted at rest.
    let chunk = files_under(&dd.join("store").join("chunks"))
        .into_iter()
        .next()
        .expect("a chunk file");
    let mut bytes = std::fs::read(&chunk).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&chunk, bytes).unwrap();
    let a = post(&base, "/api/v1/store/verify", Some(&admin), None);
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.json()["job"].as_i64().expect("job");
    let j = finished_job(&base, &admin, id, Duration::from_secs(60));
    assert_eq!(j["state"], "failed", "{j}");
    let r = &j["result"];
    assert_eq!(r["ok"], false, "{j}");
    assert_eq!(r["corrupt"].as_array().map(Vec::len), Some(1), "{j}");
    let name = chunk.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.contains(r["corrupt"][0]["chunk"].as_str().unwrap()),
        "{name}: {j}"
    );
    assert!(
        r["corrupt"][0]["points"][0]
            .as_str()
            .unwrap()
            .starts_with("v1/"),
        "{j}"
    );
    assert!(!r["broken_points"].as_array().unwrap().is_empty(), "{j}");
    assert!(j["error"].as_str().unwrap().contains("damaged"), "{j}");

    // The CLI follows a job of its own: plain progress lines (no terminal here), the report,
    // exit status 1; --json prints the result.
    let out = standby(&dd).args(["store", "verify"]).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("CORRUPT chunk"), "{stdout}");
    assert!(stdout.contains("broken points: v1/"), "{stdout}");
    assert!(
        stderr.contains("the running gateway verifies the store (job"),
        "{stderr}"
    );
    assert!(stderr.contains(": finished ("), "{stderr}");
    assert!(stderr.contains("verification failed"), "{stderr}");
    let out = standby(&dd)
        .args(["store", "verify", "v1/latest", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["points_checked"], 1, "{v}");
    assert_eq!(v["corrupt"].as_array().map(Vec::len), Some(1), "{v}");
    // `standby jobs` and `job show` name it a job of the store.
    let text = run_stdout(standby(&dd).args(["job", "show", &id.to_string()]));
    assert!(text.contains("store-verify of the replica store"), "{text}");
    let text = run_stdout(standby(&dd).args(["jobs", "--limit", "50"]));
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{id} ")))
        .unwrap_or_else(|| panic!("job {id} in:\n{text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1..4], ["-", "store-verify", "failed"], "{line}");
    let listed: Value =
        serde_json::from_str(&run_stdout(standby(&dd).args(["jobs", "--json"]))).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id && j["vm"].is_null()),
        "{listed}"
    );
    g.stop();
}
