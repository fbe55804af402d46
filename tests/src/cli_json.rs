//! Reading `standby` read commands through their `--json` output: the tests check facts
//! (states, counts, names) by field, never by scraping the aligned text an admin reads.
//! Error messages (stderr) stay text checks: their wording is what they test.

use std::path::Path;

use crate::{run_stdout, standby};

/// Runs `standby ARGS --json` in data directory `dd` and parses its stdout.
pub fn json(dd: &Path, args: &[&str]) -> serde_json::Value {
    let out = run_stdout(standby(dd).args(args).arg("--json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("standby {args:?} --json: {e}\n{out}"))
}

/// `standby log list DISK --json`: `state` (the log's state file or null), `segments`.
pub fn log_list(dd: &Path, disk: &str) -> serde_json::Value {
    json(dd, &["log", "list", disk])
}

/// The chain health of a disk's change log ("healthy", "broken", "overflow").
pub fn log_health(dd: &Path, disk: &str) -> String {
    let l = log_list(dd, disk);
    l["state"]["state"]
        .as_str()
        .unwrap_or_else(|| panic!("no log state for {disk}: {l}"))
        .to_string()
}
