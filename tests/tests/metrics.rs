//! `/metrics` of a running gateway, parsed by the Python `prometheus_client` OpenMetrics parser
//! (a real, strict parser: a malformed exposition fails the test), with values checked against
//! known activity: writes and reads by qemu-io, a protected VM reaching Protected, its jobs,
//! the bytes its writes appended to the change log (and the log syncs a sequential writer
//! waits for: a few windows of extents heated ahead, not one per extent), the store's
//! objects and bytes against
//! `store info --json`, the chunk cache's hits when an attached point is read twice. The store
//! figures again on an S3 store (Garage on 127.0.0.1): equal to `store info --json` after the
//! first point, refreshed after a later replication job, cache hits and misses moving when an
//! attached point is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use standby_e2e::api::{origin, request, token};
use standby_e2e::garage::Garage;
use standby_e2e::nbd_client::RawClient;
use standby_e2e::repl::{fast_policy, site, wait_for};
use standby_e2e::{require_tool, run, run_stdout, standby, Gateway};

/// One sample: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    family: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The parser's Python. Debian's python3-prometheus-client installs for the system Python.
fn python() -> PathBuf {
    let p = PathBuf::from("/usr/bin/python3");
    if p.exists() {
        p
    } else {
        require_tool("python3")
    }
}

const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    # A family with no series yet still counts as served.
    out.append({"family": fam.name, "name": fam.name, "labels": {}, "value": None})
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "unit": fam.unit,
                    "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// Parses an OpenMetrics exposition with prometheus_client; panics with the parser's error.
fn parse(text: &str) -> Vec<Sample> {
    let mut child = Command::new(python())
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write exposition");
    }
    let out = child.wait_with_output().expect("python3");
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("No module named") {
        panic!(
            "the Python prometheus_client package is missing (Debian: python3-prometheus-client, \
             installed by tools/lib/deps.sh): {err}"
        );
    }
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused /metrics: {err}\n{text}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("parser output");
    v.as_array()
        .expect("samples")
        .iter()
        .map(|s| Sample {
            family: s["family"].as_str().unwrap_or_default().to_string(),
            name: s["name"].as_str().unwrap_or_default().to_string(),
            labels: s["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            value: s["value"].as_f64().unwrap_or(f64::NAN),
        })
        .collect()
}

/// The value of the sample with this name and these labels (a subset of its labels).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// Attaches VM v1's disk d1 (newest point) and reads it twice with qemu-img: the first read
/// must fetch chunks from the store (cache misses), the second must find all of them in the
/// reader's cache (hits, no new miss). Returns the export's name and the (hits, misses)
/// counters before, after the first and after the second read.
fn attach_and_read_twice(
    base: &str,
    admin: &str,
    ro: &str,
    back: &Path,
) -> (String, [(f64, f64); 3]) {
    let a = request(
        "POST",
        &format!("{base}/api/v1/attachments"),
        Some(admin),
        Some(r#"{"vm":"v1","disk":"d1"}"#),
        &[],
    );
    assert_eq!(a.status, 201, "{}", a.body);
    let at: serde_json::Value = serde_json::from_str(&a.body).expect("attachment");
    let uri = at["uri"].as_str().expect("uri").to_string();
    let export = at["export"].as_str().expect("export").to_string();
    let qemu_img = require_tool("qemu-img");
    let counters = || {
        let (_, s) = scrape(base, ro);
        (
            value(&s, "standby_store_cache_hits_total", &[]).expect("hits"),
            value(&s, "standby_store_cache_misses_total", &[]).expect("misses"),
        )
    };
    let read = || {
        run(Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(back))
    };
    let c0 = counters();
    read();
    let c1 = counters();
    assert!(
        c1.1 - c0.1 >= 1.0,
        "the first read fetched chunks: misses {} then {}",
        c0.1,
        c1.1
    );
    read();
    let c2 = counters();
    assert!(
        c2.0 - c1.0 >= 1.0,
        "the second read found its chunks in the cache: hits {}, {}, {}",
        c0.0,
        c1.0,
        c2.0
    );
    assert_eq!(c2.1, c1.1, "the second read fetched nothing from the store");
    (export, [c0, c1, c2])
}

fn scrape(base: &str, t: &str) -> (String, Vec<Sample>) {
    let a = request("GET", &format!("{base}/metrics"), Some(t), None, &["-i"]);
    assert_eq!(a.status, 200, "{}", a.body);
    let (head, body) = a.body.split_once("\r\n\r\n").expect("headers");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    (body.to_string(), parse(body))
}

#[test]
fn metrics_count_real_activity() {
    let qemu_io = require_tool("qemu-io");
    let t = standby_e2e::test_dir("metrics");
    let dd = site(t.path(), &[("d1", "16M")]);
    let ro = token(&dd, "prometheus", true);
    let g = Gateway::start(&dd, &["--api-listen", "127.0.0.1:0"]);
    let base = origin(g.api.as_deref().expect("API address"));

    // Without a token: refused like every request.
    let a = request("GET", &format!("{base}/metrics"), None, None, &[]);
    assert_eq!(a.status, 401, "{}", a.body);

    // 25 writes of 64 KiB and 10 reads of 4 KiB, then a flush.
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..25u64 {
        args.push("-c".into());
        args.push(format!("write -P {} {} 64k", i + 1, i * 65536));
    }
    for i in 0..10u64 {
        args.push("-c".into());
        args.push(format!("read {} 4k", i * 4096));
    }
    args.push("-c".into());
    args.push("flush".into());
    args.push(g.uri("d1"));
    run(Command::new(&qemu_io).args(&args));

    let (text, s) = scrape(&base, &ro);
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    let w = [("disk", "d1"), ("command", "write")];
    let r = [("disk", "d1"), ("command", "read")];
    let writes = value(&s, "standby_nbd_requests_total", &w).expect("write counter");
    assert!(writes >= 25.0, "writes {writes}");
    let wbytes = value(&s, "standby_nbd_payload_bytes_total", &w).expect("write bytes");
    assert!(wbytes >= 25.0 * 65536.0, "write bytes {wbytes}");
    let reads = value(&s, "standby_nbd_requests_total", &r).expect("read counter");
    assert!(reads >= 10.0, "reads {reads}");
    let rbytes = value(&s, "standby_nbd_payload_bytes_total", &r).expect("read bytes");
    assert!(rbytes >= 10.0 * 4096.0, "read bytes {rbytes}");
    let flushes = value(
        &s,
        "standby_nbd_requests_total",
        &[("disk", "d1"), ("command", "flush")],
    )
    .expect("flush counter");
    assert!(flushes >= 1.0);
    let lat = value(&s, "standby_nbd_request_duration_seconds_count", &w).expect("histogram");
    assert_eq!(lat, writes, "one latency observation per write");
    let inf = value(
        &s,
        "standby_nbd_request_duration_seconds_bucket",
        &[("disk", "d1"), ("command", "write"), ("le", "+Inf")],
    )
    .expect("+Inf bucket");
    assert_eq!(inf, writes);
    assert_eq!(
        value(&s, "standby_nbd_request_errors_total", &w),
        Some(0.0),
        "no write failed"
    );

    // A write beyond the end (a raw client: qemu-io would not send it): refused by the
    // server, and counted as an error.
    let mut c = RawClient::connect(g.addr).unwrap();
    c.go("d1").unwrap();
    assert_ne!(c.write(16 << 20, &[0u8; 4096]).unwrap(), 0, "refused");
    drop(c);

    // Protect the VM: its state, health, RPO, last point and jobs appear.
    let admin = token(&dd, "ops", false);
    protect_v1(&base, &admin);
    let s = wait_for(
        &dd,
        "v1 Protected in /metrics",
        Duration::from_secs(60),
        || {
            let (_, s) = scrape(&base, &ro);
            (value(
                &s,
                "standby_vm_state",
                &[("vm", "v1"), ("state", "Protected")],
            ) == Some(1.0)
                && value(
                    &s,
                    "standby_vm_last_point_timestamp_seconds",
                    &[("vm", "v1")],
                )
                .is_some())
            .then_some(s)
        },
    );
    assert_eq!(value(&s, "standby_vm_health", &[("vm", "v1")]), Some(0.0));
    let rpo = value(&s, "standby_vm_rpo_seconds", &[("vm", "v1")]).expect("rpo");
    assert!((0.0..120.0).contains(&rpo), "rpo {rpo}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = value(
        &s,
        "standby_vm_last_point_timestamp_seconds",
        &[("vm", "v1")],
    )
    .unwrap();
    assert!(
        (now - 300.0..=now + 5.0).contains(&last),
        "last point {last}"
    );
    assert_eq!(
        value(&s, "standby_vm_progress_ratio", &[("vm", "v1")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "standby_disk_size_bytes",
            &[("vm", "v1"), ("disk", "d1")]
        ),
        Some(16.0 * 1048576.0)
    );
    assert!(value(
        &s,
        "standby_disk_log_unshipped_bytes",
        &[("vm", "v1"), ("disk", "d1")]
    )
    .is_some());
    // Change log: 8 more writes of 64 KiB through NBD are recorded in d1's log (512 KiB of
    // disk covered; the log files grow by at least a record each); the dirty bitmap stays
    // empty while the log records everything.
    let d1 = [("disk", "d1")];
    let logged = value(&s, "standby_disk_log_written_bytes_total", &d1).expect("log written");
    let covered = value(&s, "standby_disk_log_recorded_bytes_total", &d1).expect("log recorded");
    let mut more: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..8u64 {
        more.push("-c".into());
        more.push(format!("write -P 9 {} 64k", (100 + i) * 65536));
    }
    more.push(g.uri("d1"));
    run(Command::new(&qemu_io).args(&more));
    let (_, s_log) = scrape(&base, &ro);
    let logged2 = value(&s_log, "standby_disk_log_written_bytes_total", &d1).unwrap();
    let covered2 = value(&s_log, "standby_disk_log_recorded_bytes_total", &d1).unwrap();
    assert_eq!(
        covered2 - covered,
        8.0 * 65536.0,
        "log records covered {covered} then {covered2} bytes around 512 KiB of writes"
    );
    assert!(
        logged2 - logged >= 8.0 * 32.0,
        "log files grew from {logged} to {logged2} bytes for 8 writes"
    );
    assert_eq!(value(&s_log, "standby_disk_dirty_ratio", &d1), Some(0.0));
    // Uploads: the first point wrote at least a chunk object (or pack), an index and the
    // point object; its bytes at least cover the 25 distinct (compressed) 64 KiB chunks.
    let v1 = [("vm", "v1")];
    assert!(value(&s, "standby_vm_points_total", &v1).unwrap_or(0.0) >= 1.0);
    let puts = value(&s, "standby_vm_upload_requests_total", &v1).expect("upload requests");
    assert!(puts >= 3.0, "{puts} PUTs for the first point");
    let up = value(&s, "standby_vm_uploaded_bytes_total", &v1).expect("uploaded bytes");
    assert!(up >= 25.0 * 32.0, "{up} bytes uploaded for the first point");
    let initial = [("kind", "initial-replication"), ("state", "succeeded")];
    assert_eq!(
        value(&s, "standby_jobs_finished_total", &initial),
        Some(1.0)
    );
    let n = value(
        &s,
        "standby_job_duration_seconds_count",
        &[("kind", "initial-replication")],
    );
    assert_eq!(n, Some(1.0));
    let errors = value(&s, "standby_nbd_request_errors_total", &w).unwrap();
    assert!(
        errors >= 1.0,
        "the write beyond the end counted as an error"
    );

    // The store: its objects and bytes as `store info --json` lists them, once the refresh
    // task has listed the store since the first point (within its spacing: 15 s).
    let (s, info) = wait_for(
        &dd,
        "store figures in /metrics matching store info",
        Duration::from_secs(90),
        || {
            let info: serde_json::Value =
                serde_json::from_str(&run_stdout(standby(&dd).args(["store", "info", "--json"])))
                    .expect("store info --json");
            let (_, s) = scrape(&base, &ro);
            let all = [("kind", "all")];
            let u = &info["usage"];
            (value(&s, "standby_store_objects", &all) == u["objects"].as_f64()
                && value(&s, "standby_store_bytes", &all) == u["object_bytes"].as_f64()
                && value(&s, "standby_store_objects", &[("kind", "chunks")])
                    == u["chunks"].as_f64())
            .then_some((s, info))
        },
    );
    let chunks = [("kind", "chunks")];
    assert!(value(&s, "standby_store_objects", &chunks).unwrap() > 0.0);
    assert_eq!(
        value(&s, "standby_store_bytes", &chunks),
        info["usage"]["chunk_bytes"].as_f64()
    );
    assert!(value(&s, "standby_store_bytes", &[("kind", "all")]).unwrap() > 0.0);
    let age = value(
        &s,
        "standby_store_usage_age_seconds",
        &[("store", info["store_id"].as_str().expect("store_id"))],
    )
    .expect("usage age");
    assert!((0.0..300.0).contains(&age), "usage age {age}");

    // The chunk cache: an attached point read twice; the second read finds its chunks in
    // the reader's cache (16 MiB by default, the whole disk).
    let (export, [(hits0, misses0), (hits1, misses1), (hits2, misses2)]) =
        attach_and_read_twice(&base, &admin, &ro, &t.path().join("back.img"));
    eprintln!(
        "store: {} objects, {} bytes, {} chunks ({} bytes), usage age {age:.1} s; cache: \
         hits {hits0} -> {hits1} -> {hits2}, misses {misses0} -> {misses1} -> {misses2}",
        info["usage"]["objects"],
        info["usage"]["object_bytes"],
        info["usage"]["chunks"],
        info["usage"]["chunk_bytes"],
    );
    let a = request(
        "POST",
        &format!("{base}/api/v1/attachments/{export}/detach"),
        Some(&admin),
        None,
        &[],
    );
    assert_eq!(a.status, 200, "{}", a.body);

    // Every metric the Grafana dashboard and docs/metrics.md name is one the gateway serves.
    let names: std::collections::BTreeSet<&str> = s
        .iter()
        .flat_map(|x| [x.name.as_str(), x.family.as_str()])
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["contrib/grafana/standby.json", "docs/metrics.md"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut named = 0;
        for (i, _) in text.match_indices("standby_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name.len() <= "standby_".len() {
                continue;
            }
            named += 1;
            let served = ["", "_bucket", "_count"]
                .iter()
                .any(|suffix| names.contains(format!("{name}{suffix}").as_str()));
            assert!(served, "{file} names {name}, which /metrics does not serve");
        }
        assert!(named >= 10, "{file}: {named} metric names");
    }

    // Counted once: a second scrape does not count the same jobs again.
    let (_, s2) = scrape(&base, &ro);
    assert_eq!(
        value(&s2, "standby_jobs_finished_total", &initial),
        Some(1.0)
    );

    // Unprotected: the VM's series disappear.
    let a = request(
        "POST",
        &format!("{base}/api/v1/vms/v1/unprotect"),
        Some(&admin),
        None,
        &[],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let (_, s3) = scrape(&base, &ro);
    assert!(value(&s3, "standby_vm_health", &[("vm", "v1")]).is_none());
    g.stop();
}

/// `/metrics`' store objects and bytes (all, chunks, packs) against `store info --json`:
/// `Some((samples, info))` when they are equal.
fn store_figures_match(
    dd: &std::path::Path,
    env: &[(&str, &str)],
    base: &str,
    t: &str,
) -> Option<(Vec<Sample>, serde_json::Value)> {
    let info: serde_json::Value = serde_json::from_str(&run_stdout(
        standby(dd)
            .envs(env.iter().copied())
            .args(["store", "info", "--json"]),
    ))
    .expect("store info --json");
    let (_, s) = scrape(base, t);
    let u = &info["usage"];
    let same = |name: &str, kind: &str, field: &str| {
        value(&s, name, &[("kind", kind)]) == u[field].as_f64()
    };
    (same("standby_store_objects", "all", "objects")
        && same("standby_store_objects", "chunks", "chunks")
        && same("standby_store_objects", "packs", "packs")
        && same("standby_store_bytes", "all", "object_bytes")
        && same("standby_store_bytes", "chunks", "chunk_bytes"))
    .then_some((s, info))
}

/// A sequential writer heats windows of extents ahead of itself (docs/changelog.md, "Heating
/// ahead of a stream"): qemu-io writing 200 MiB in order, 1 MiB at a time, on a protected
/// disk crosses 50 extents of 4 MiB, and its writes wait for a few log syncs, not one per
/// extent; the bytes read back.
#[test]
fn sequential_writes_heat_extents_ahead() {
    let qemu_io = require_tool("qemu-io");
    let t = standby_e2e::test_dir("metrics-heat");
    let dd = site(t.path(), &[("d1", "256M")]);
    let ro = token(&dd, "prometheus", true);
    let admin = token(&dd, "ops", false);
    let g = Gateway::start(&dd, &["--api-listen", "127.0.0.1:0"]);
    let base = origin(g.api.as_deref().expect("API address"));
    protect_v1(&base, &admin);
    let d1 = [("disk", "d1")];
    let s0 = wait_for(
        &dd,
        "d1's change log in /metrics",
        Duration::from_secs(60),
        || {
            let (_, s) = scrape(&base, &ro);
            let protected = value(
                &s,
                "standby_vm_state",
                &[("vm", "v1"), ("state", "Protected")],
            ) == Some(1.0);
            (protected && value(&s, "standby_disk_log_hot_syncs_total", &d1).is_some()).then_some(s)
        },
    );
    let counter =
        |s: &[Sample], name: &str| value(s, name, &d1).unwrap_or_else(|| panic!("{name}"));
    let syncs0 = counter(&s0, "standby_disk_log_hot_syncs_total");
    let windows0 = counter(&s0, "standby_disk_log_windows_heated_total");

    write_patterns(&qemu_io, &g.uri("d1"), 0, 200);

    let (_, s1) = scrape(&base, &ro);
    let syncs = counter(&s1, "standby_disk_log_hot_syncs_total") - syncs0;
    let windows = counter(&s1, "standby_disk_log_windows_heated_total") - windows0;
    eprintln!("200 MiB written in order: {syncs} log syncs, {windows} windows heated");
    // One sync per window (a few: one each 16 extents, and one after each checkpoint the
    // replication's cuts and the timer take meanwhile), against 50 with `heat_ahead = 0`.
    assert!(
        windows >= 2.0,
        "{windows} windows heated for 200 MiB written in order"
    );
    assert!(
        (1.0..=25.0).contains(&syncs),
        "{syncs} log syncs for 50 extents written in order ({windows} windows)"
    );
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in [0u64, 63, 64, 127, 128, 199] {
        args.push("-c".into());
        args.push(format!("read -P {} {} 1M", i + 1, i << 20));
    }
    args.push(g.uri("d1"));
    let out = run_stdout(Command::new(&qemu_io).args(&args));
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// Protects VM v1 of disk d1 through the API.
fn protect_v1(base: &str, admin: &str) {
    let a = request(
        "POST",
        &format!("{base}/api/v1/vms"),
        Some(admin),
        Some(r#"{"vm":"v1","disks":["d1"]}"#),
        &[],
    );
    assert_eq!(a.status, 201, "{}", a.body);
}

/// qemu-io writes of 1 MiB, each with its own pattern byte (nothing deduplicates).
fn write_patterns(qemu_io: &std::path::Path, uri: &str, first: u64, n: u64) {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in first..first + n {
        args.push("-c".into());
        args.push(format!("write -P {} {} 1M", i + 1, i << 20));
    }
    args.push("-c".into());
    args.push("flush".into());
    args.push(uri.into());
    run(Command::new(qemu_io).args(&args));
}

/// The store figures on an S3 store (Garage): `standby_store_objects` / `_bytes` equal
/// `store info --json` once the first point is published, and again (higher) after a later
/// replication job stored more; the usage age is recent; reading an attached point twice
/// moves the cache misses, then the hits.
#[test]
fn store_metrics_on_s3() {
    let qemu_io = require_tool("qemu-io");
    let garage = Garage::start();
    let t = standby_e2e::test_dir("metrics-s3");
    let dd = t.path().join("dd");
    let env = [
        ("AWS_ACCESS_KEY_ID", garage.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", garage.secret_key.as_str()),
    ];
    run(standby(&dd).args(["disk", "create", "d1", "--size", "16M"]));
    run(standby(&dd)
        .envs(env)
        .args(["store", "init"])
        .args(garage.store_init_args()));
    fast_policy(&dd, "1s");
    let ro = token(&dd, "prometheus", true);
    let admin = token(&dd, "ops", false);
    let g = Gateway::start_env(&dd, &["--api-listen", "127.0.0.1:0"], &env);
    let base = origin(g.api.as_deref().expect("API address"));
    write_patterns(&qemu_io, &g.uri("d1"), 0, 4);
    protect_v1(&base, &admin);

    wait_for(&dd, "v1 Protected", Duration::from_secs(90), || {
        let a = request(
            "GET",
            &format!("{base}/api/v1/vms/v1"),
            Some(&ro),
            None,
            &[],
        );
        (a.status == 200 && a.body.contains(r#""state":"Protected""#)).then_some(())
    });

    // After the first point: the figures are the S3 store's, as `store info` lists them.
    let (s, info) = wait_for(
        &dd,
        "S3 store figures in /metrics matching store info",
        Duration::from_secs(90),
        || store_figures_match(&dd, &env, &base, &ro),
    );
    assert!(
        info["location"]
            .as_str()
            .unwrap_or_default()
            .contains(&garage.bucket),
        "{info}"
    );
    let objects1 = value(&s, "standby_store_objects", &[("kind", "all")]).unwrap();
    let bytes1 = value(&s, "standby_store_bytes", &[("kind", "all")]).unwrap();
    let data_objects = value(&s, "standby_store_objects", &[("kind", "chunks")]).unwrap()
        + value(&s, "standby_store_objects", &[("kind", "packs")]).unwrap();
    assert!(data_objects >= 1.0, "the first point stored chunks: {info}");
    let store_id = info["store_id"].as_str().expect("store_id").to_string();

    // More data: a later replication job stores it; the figures follow (refreshed after the
    // job), still equal to the listing.
    write_patterns(&qemu_io, &g.uri("d1"), 8, 4);
    let (s, info) = wait_for(
        &dd,
        "S3 store figures refreshed after a replication job",
        Duration::from_secs(90),
        || {
            store_figures_match(&dd, &env, &base, &ro).filter(|(s, _)| {
                value(s, "standby_store_bytes", &[("kind", "all")]).unwrap_or(0.0) > bytes1
            })
        },
    );
    let objects2 = value(&s, "standby_store_objects", &[("kind", "all")]).unwrap();
    assert!(objects2 > objects1, "objects {objects1} then {objects2}");
    let age = value(
        &s,
        "standby_store_usage_age_seconds",
        &[("store", &store_id)],
    )
    .expect("usage age");
    assert!((0.0..60.0).contains(&age), "usage age {age}");

    // Cache: the first read of an attached point fetches chunks from S3 (misses), the second
    // finds them in the cache (hits).
    let (_export, [(hits0, misses0), (hits1, misses1), (hits2, misses2)]) =
        attach_and_read_twice(&base, &admin, &ro, &t.path().join("back.img"));
    eprintln!(
        "S3 store: objects {objects1} -> {objects2}, bytes {bytes1} -> {}, usage age {age:.1} s; \
         cache hits {hits0} -> {hits1} -> {hits2}, misses {misses0} -> {misses1} -> {misses2}",
        info["usage"]["object_bytes"]
    );
    g.stop();
}
