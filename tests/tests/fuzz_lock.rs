//! The fuzz crate (`fuzz/`, a workspace of its own because libFuzzer needs its own build flags)
//! must fuzz the code the workspace ships: every package its lockfile pins must be pinned at a
//! version the workspace's lockfile also uses. (The test command also builds the fuzz targets
//! with `--locked`, which fails when `fuzz/Cargo.lock` no longer matches `fuzz/Cargo.toml`.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn packages(lock: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(lock)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", lock.display()));
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut name = None;
    for line in text.lines() {
        if line == "[[package]]" {
            name = None;
        } else if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let Some(v) = line.strip_prefix("version = ") {
            if let Some(n) = name.take() {
                out.entry(n)
                    .or_default()
                    .insert(v.trim_matches('"').to_string());
            }
        }
    }
    out
}

#[test]
fn the_fuzz_lockfile_pins_the_workspaces_versions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let workspace = packages(&root.join("Cargo.lock"));
    let fuzz = packages(&root.join("fuzz/Cargo.lock"));
    assert!(fuzz.contains_key("gateway") && fuzz.contains_key("nbd-server"));
    let fuzz_only = ["standby-fuzz", "libfuzzer-sys", "arbitrary"];
    let mut wrong = Vec::new();
    for (name, versions) in &fuzz {
        if fuzz_only.contains(&name.as_str()) {
            continue;
        }
        match workspace.get(name) {
            Some(ws) if versions.is_subset(ws) => {}
            other => wrong.push(format!("{name} {versions:?} (workspace: {other:?})")),
        }
    }
    assert!(
        wrong.is_empty(),
        "fuzz/Cargo.lock differs from Cargo.lock; refresh it with `cp Cargo.lock fuzz/Cargo.lock && \
         cargo metadata --manifest-path fuzz/Cargo.toml >/dev/null`:\n{}",
        wrong.join("\n")
    );
}
