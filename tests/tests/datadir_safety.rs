//! The data directory is the gateway's alone: one `standby serve` at a time, and everything
//! created in it (images, change-log segments, store chunks, the state database, the Unix
//! socket, overlays) readable by its user only — whatever the umask of whoever started it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use standby_e2e::repl::{fast_policy, wait_state};
use standby_e2e::{run, standby, test_dir, Gateway};

const T: Duration = Duration::from_secs(60);

fn walk(p: &Path, out: &mut Vec<(std::path::PathBuf, u32)>) {
    let m = std::fs::symlink_metadata(p).unwrap();
    out.push((p.to_path_buf(), m.permissions().mode()));
    if m.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            walk(&e.unwrap().path(), out);
        }
    }
}

#[test]
fn one_server_per_data_directory_and_files_for_its_user_only() {
    // SAFETY: umask(2) sets this test process's creation mask (inherited by the CLI).
    unsafe { libc::umask(0o022) };
    let t = test_dir("datadir-safety");
    let dd = t.path().join("dd");
    run(standby(&dd).args(["disk", "create", "os", "--size", "4M"]));
    run(standby(&dd).args(["store", "init"]));
    let img = t.path().join("data.img");
    standby_e2e::random_file(&img, 1 << 20, 3);
    run(standby(&dd)
        .args(["store", "import", "other/data"])
        .arg(&img));
    fast_policy(&dd, "1s");
    let sock = dd.join("nbd.sock");
    let g = Gateway::start(&dd, &["--socket", sock.to_str().unwrap()]);
    run(standby(&dd).args(["protect", "vm", "--disks", "os"]));
    wait_state(&dd, "vm", "Protected", T);

    // A second server on the same data directory stops at once, naming the first.
    let mut second = standby(&dd)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second `standby serve` ran on the same data directory");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(second.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains(&format!("pid {}", g.pid())) && err.contains("another `standby serve`"),
        "{err}"
    );

    // Everything the gateway and the CLI created is its user's only.
    let mut all = Vec::new();
    walk(&dd, &mut all);
    let kinds = |suffix: &str| {
        all.iter()
            .any(|(p, _)| p.to_string_lossy().ends_with(suffix))
    };
    assert!(
        kinds("os.img") && kinds("nbd.sock") && kinds(".point"),
        "{all:#?}"
    );
    assert!(all
        .iter()
        .any(|(p, _)| p.to_string_lossy().contains("/chunks/")));
    assert!(all
        .iter()
        .any(|(p, _)| p.to_string_lossy().contains(".hrl/")));
    let open: Vec<_> = all
        .iter()
        // The test harness's own server log is created by this (umask 022) process.
        .filter(|(p, _)| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("serve-")
        })
        .filter(|(_, m)| m & 0o077 != 0)
        .collect();
    assert!(open.is_empty(), "readable by others: {open:#?}");
    drop(g);
}
