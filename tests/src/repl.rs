//! Helpers for replication tests: a site (data directory with disks and a store), waiting for
//! protection states and points, exporting points, writing through NBD with an oracle.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

use crate::nbd_client::RawClient;
use crate::{run, run_stdout, standby};

/// `standby status` output.
pub fn status(dd: &Path) -> String {
    run_stdout(standby(dd).arg("status"))
}

/// `standby status --json`: the VM named `vm`, if protected.
pub fn vm_json(dd: &Path, vm: &str) -> Option<serde_json::Value> {
    let s: serde_json::Value =
        serde_json::from_str(&run_stdout(standby(dd).args(["status", "--json"])))
            .expect("status --json");
    s["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|v| v["name"] == vm)
        .cloned()
}

/// The state of a VM as `standby status` shows it ("Protected", "InitialReplication 40%",
/// "Critical (reason)"), read from `status --json`; empty when the VM is not protected.
pub fn state(dd: &Path, vm: &str) -> String {
    let Some(v) = vm_json(dd, vm) else {
        return String::new();
    };
    let st = v["state"].as_str().expect("state");
    let reason = v["reason"].as_str().unwrap_or_default();
    match st {
        "InitialReplication" | "Resyncing" => {
            format!("{st} {:.0}%", v["progress_percent"].as_f64().unwrap_or(0.0))
        }
        "Critical" | "ResyncRequired" => format!("{st} ({reason})"),
        _ => st.to_string(),
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout` with `what` and
/// the gateway's status and jobs.
pub fn wait_for<T>(
    dd: &Path,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\nstatus:\n{}\njobs:\n{}",
                status(dd),
                jobs(dd)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the VM's state line starts with `prefix`.
pub fn wait_state(dd: &Path, vm: &str, prefix: &str, timeout: Duration) {
    wait_for(dd, &format!("VM {vm} to be {prefix}"), timeout, || {
        state(dd, vm).starts_with(prefix).then_some(())
    });
}

/// `standby jobs --limit 50` output.
pub fn jobs(dd: &Path) -> String {
    run_stdout(standby(dd).args(["jobs", "--limit", "50"]))
}

/// Point ids (`VM/ID`) of a VM, oldest first (`standby point list VM --json`).
pub fn points(dd: &Path, vm: &str) -> Vec<String> {
    let p: serde_json::Value = serde_json::from_str(&run_stdout(
        standby(dd).args(["point", "list", vm, "--json"]),
    ))
    .expect("points list --json");
    p.as_array()
        .expect("points")
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["vm"].as_str().expect("vm"),
                p["id"].as_str().expect("id")
            )
        })
        .collect()
}

/// UTC now in the point-id time format (`YYYYMMDDTHHMMSS.mmmZ`): ids compare as strings.
pub fn id_now() -> String {
    let o = Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%S.%3NZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// When the VM's replica was last current (`last_cycle_ms` of `standby status --json`), as
/// an [`id_now`] value.
pub fn current_as_of(dd: &Path, vm: &str) -> Option<String> {
    let ms = vm_json(dd, vm)?["last_cycle_ms"].as_u64()?;
    Some(replica_store::point::format_utc_ms(ms))
}

/// Waits until the replica of `vm` is current as of a moment after `since` (an [`id_now`]
/// value taken after the writes to check), then returns its newest point.
pub fn synced_point(dd: &Path, vm: &str, since: &str, timeout: Duration) -> String {
    wait_for(
        dd,
        &format!("{vm} to be replicated as of {since}"),
        timeout,
        || current_as_of(dd, vm).filter(|t| t.as_str() > since),
    );
    points(dd, vm).pop().expect("a point")
}

/// Exports one disk of a point to a file and returns its bytes.
pub fn export(dd: &Path, point: &str, disk: &str, out: &Path) -> Vec<u8> {
    run(standby(dd)
        .args(["store", "export", point])
        .arg(out)
        .args(["--disk", disk]));
    std::fs::read(out).expect("read export")
}

/// Asserts two disk images are equal, naming the first differing 4 KiB block.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{what}: content differs, first at byte {i} (block {} of 4 KiB)",
            i / 4096
        );
    }
}

/// A connection writing to an export while keeping the expected disk bytes.
pub struct OracleWriter {
    pub client: RawClient,
    pub oracle: Vec<u8>,
    rng: rand::rngs::StdRng,
}

impl OracleWriter {
    /// Connects to `export` and starts from `initial` (the disk's current bytes).
    pub fn new(addr: std::net::SocketAddr, export: &str, initial: Vec<u8>, seed: u64) -> Self {
        let mut client = RawClient::connect(addr).expect("connect");
        assert_eq!(client.go(export).expect("go"), crate::nbd_client::REP_ACK);
        OracleWriter {
            client,
            oracle: initial,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Writes `data` at `offset` and records it.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        assert_eq!(self.client.write(offset, data).expect("write"), 0);
        self.oracle[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    /// `n` random writes (sizes 512 B .. 256 KiB, 512-aligned) anywhere in the disk.
    pub fn random_writes(&mut self, n: usize) -> u64 {
        let size = self.oracle.len() as u64;
        let mut total = 0;
        for _ in 0..n {
            let len = self.rng.gen_range(1..=512u64) * 512;
            let off = self.rng.gen_range(0..(size - len) / 512) * 512;
            let mut buf = vec![0u8; len as usize];
            self.rng.fill_bytes(&mut buf);
            self.write(off, &buf);
            total += len;
        }
        assert_eq!(self.client.flush().expect("flush"), 0);
        total
    }
}

/// Reads a whole export through NBD with qemu-img (a real client) into a file's bytes.
pub fn read_export(uri: &str, out: &Path) -> Vec<u8> {
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(out));
    std::fs::read(out).expect("read")
}

/// A data directory with a local store, the given disks and a fast policy.
pub fn site(root: &Path, disks: &[(&str, &str)]) -> PathBuf {
    let dd = root.join("dd");
    for (name, size) in disks {
        run(standby(&dd).args(["disk", "create", name, "--size", size]));
    }
    run(standby(&dd).args(["store", "init"]));
    fast_policy(&dd, "1s");
    dd
}

/// Interval as given, resync window always, retries 60× faster.
pub fn fast_policy(dd: &Path, interval: &str) {
    run(standby(dd).args([
        "policy",
        "set",
        "--interval",
        interval,
        "--resync-window",
        "always",
        "--retry-time-scale",
        "60",
    ]));
}

/// `standby jobs --limit 50 --json`: the jobs, newest first (fields of GET /api/v1/jobs).
pub fn jobs_json(dd: &Path) -> Vec<serde_json::Value> {
    let out = run_stdout(standby(dd).args(["jobs", "--limit", "50", "--json"]));
    match serde_json::from_str(&out).expect("jobs --json") {
        serde_json::Value::Array(a) => a,
        other => panic!("jobs --json is not an array: {other}"),
    }
}

/// How many of the newest 50 jobs are in `state` ("failed", "interrupted", …).
pub fn jobs_in_state(dd: &Path, state: &str) -> usize {
    jobs_json(dd).iter().filter(|j| j["state"] == state).count()
}

/// How many of the newest 50 jobs are of `kind` ("delta-replication", …).
pub fn jobs_of_kind(dd: &Path, kind: &str) -> usize {
    jobs_json(dd).iter().filter(|j| j["kind"] == kind).count()
}

/// A job as `standby jobs --json` reports it: the fields the tests read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub detail: String,
}

/// The newest succeeded job of `kind`, from `standby jobs --json`.
pub fn last_job(dd: &Path, kind: &str) -> Option<Job> {
    jobs_json(dd)
        .iter()
        .find(|j| j["kind"] == kind && j["state"] == "succeeded")
        .map(|j| Job {
            id: j["id"].as_i64().expect("job id"),
            detail: j["detail"].as_str().expect("job detail").to_string(),
        })
}

/// `standby job show ID --json`: the job with its `steps`.
pub fn job_show(dd: &Path, id: i64) -> serde_json::Value {
    serde_json::from_str(&run_stdout(standby(dd).args([
        "job",
        "show",
        &id.to_string(),
        "--json",
    ])))
    .expect("job show --json")
}

/// The step names of job `id` (`job show --json`), in order ("resume d", …).
pub fn job_step_names(dd: &Path, id: i64) -> Vec<String> {
    job_show(dd, id)["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["name"].as_str().expect("step name").to_string())
        .collect()
}

/// The step details of job `id` (`job show --json`), one per line, for checks on what a
/// step did.
pub fn job_step_details(dd: &Path, id: i64) -> String {
    let j = job_show(dd, id);
    j["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            format!(
                "{} {}: {}",
                s["name"].as_str().expect("step name"),
                s["state"].as_str().expect("step state"),
                s["detail"].as_str().expect("step detail")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the VM launched by a test failover of `vm` has exited: the `pid` of its
/// attachment in `status --json` names no process any more.
pub fn test_vm_exited(dd: &Path, vm: &str) -> bool {
    let s: serde_json::Value =
        serde_json::from_str(&run_stdout(standby(dd).args(["status", "--json"])))
            .expect("status --json");
    s["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .filter(|a| a["vm"] == vm && a["kind"] == "test")
        .filter_map(|a| a["pid"].as_u64())
        .any(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Sets the resync window to one minute twelve hours away, so a resync starts only when a
/// test asks for it (`standby resync VM`), after its writes.
pub fn hold_resyncs(dd: &Path) {
    let hour = run_stdout(Command::new("date").arg("+%H"))
        .trim()
        .parse::<u32>()
        .expect("hour");
    let away = (hour + 12) % 24;
    run(standby(dd).args([
        "policy",
        "set",
        "--resync-window",
        &format!("{away:02}:00-{away:02}:01"),
    ]));
}

/// Another site on the same store (a recovery gateway, a second gateway): the data directory
/// `dd`, created, holding a copy of `from`'s store location file and nothing else.
pub fn second_site(from: &Path, dd: &Path) {
    std::fs::create_dir_all(dd).expect("creating the second site's data directory");
    std::fs::copy(
        from.join("replica-store.toml"),
        dd.join("replica-store.toml"),
    )
    .expect("copying the store location file");
}
