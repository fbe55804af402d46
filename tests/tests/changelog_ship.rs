//! Shipping refuses what it cannot prove whole, end to end: `standby serve` with its engine, a
//! real NBD client and a local store. A byte of a sealed, not yet shipped log segment is
//! flipped on disk; the next delta must not publish a point from it: the chain is marked
//! broken, the VM goes to a full resync, and every point published after the writes holds
//! every one of them.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use standby_e2e::repl::*;
use standby_e2e::{run, run_stdout, standby, test_dir, Gateway};

const T: Duration = Duration::from_secs(60);
const SIZE: usize = 16 << 20;

/// Segment files of a disk's log whose footer is written (sealed), oldest first.
fn sealed_segments(dd: &Path, disk: &str) -> Vec<PathBuf> {
    let dir = dd.join("disks").join(format!("{disk}.hrl"));
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .filter(|p| {
            let b = std::fs::read(p).unwrap_or_default();
            b.len() > 72 + 64 && b[b.len() - 64..b.len() - 60] == *b"END1"
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_damaged_sealed_segment_sends_the_vm_to_resync_and_no_point_misses_a_write() {
    let t = test_dir("ship-damaged");
    let dd = site(t.path(), &[("d", "16M")]);
    // Small segments, so the writes below fill and seal several.
    std::fs::write(dd.join("standby.toml"), "[log]\nsegment_size = \"64K\"\n").unwrap();
    // No delta until the test asks for one; resyncs may run at any time.
    fast_policy(&dd, "1h");
    let g = Gateway::start(&dd, &[]);
    run(standby(&dd).args(["protect", "vm", "--disks", "d"]));
    wait_state(&dd, "vm", "Protected", T);
    let before = points(&dd, "vm").len();

    let mut w = OracleWriter::new(g.addr, "d", vec![0u8; SIZE], 41);
    for i in 0..40u64 {
        let data: Vec<u8> = (0..8192u64).map(|j| (i * 31 + j * 7) as u8 | 1).collect();
        w.write(i * 397 * 1024, &data);
    }
    assert_eq!(w.client.flush().unwrap(), 0);

    // The writes fill about five segments: the newest sealed one holds some of them (the
    // segments of the initial replication may still be waiting for their release).
    let seg = wait_for(&dd, "three sealed log segments", T, || {
        let s = sealed_segments(&dd, "d");
        (s.len() >= 3).then(|| s.last().cloned()).flatten()
    });
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let at = (72 + len - 64) / 2;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x04], at).unwrap();
    drop(f);
    assert_eq!(
        points(&dd, "vm").len(),
        before,
        "a point was made before the segment was damaged: the test proves nothing"
    );
    assert!(seg.exists(), "the damaged segment must still be unshipped");

    // Let the engine ship: it must find the damage, break the chain and resync in full.
    let since = id_now();
    fast_policy(&dd, "1s");
    let resync = wait_for(&dd, "a resync job", T, || last_job(&dd, "resync"));
    let show = job_step_details(&dd, resync.id);
    assert!(show.contains("full comparison"), "{show}");
    let log = g.log();
    assert!(
        log.contains("change log is now broken") && log.contains("damaged"),
        "the gateway log should say why the chain broke:\n{log}"
    );
    let newest = synced_point(&dd, "vm", &since, T);
    let made = points(&dd, "vm");
    assert!(made.len() > before, "no point after the resync");
    assert_eq!(made.last(), Some(&newest));
    // Every point published after the writes holds all of them.
    for (i, p) in made[before..].iter().enumerate() {
        assert_same(
            &format!("point {p}"),
            &export(&dd, p, "d", &t.path().join(format!("p{i}.img"))),
            &w.oracle,
        );
    }
    let verify = run_stdout(standby(&dd).args(["store", "verify"]));
    assert!(verify.contains("OK"), "{verify}");
    drop(w);
    assert_eq!(g.stop().code(), Some(0));
}
