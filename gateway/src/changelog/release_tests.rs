//! Releasing shipped segments (see `log/release.rs`): with the background checkpointer, a cut
//! (`take`) and a release never wait for the image's sync; segments are deleted only once
//! both shipped and checkpointed; shipped segments waiting for their checkpoint are not
//! backlog; without the checkpointer, seals and releases checkpoint on the spot as before.
//! The image's syncs are held back by the fault-injecting sync layer (a disk that is slow to
//! sync the image), so "does not wait" is checked, not timed.

use std::fs;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::durable::{FaultySync, Target};
use super::tests::rt;
use super::*;
use crate::disk::Disk;

const SIZE: u64 = 1 << 20;

fn opts(background: bool) -> LogOptions {
    LogOptions {
        segment_size: 1 << 20,
        min_free_bytes: 0,
        min_free_percent: 0,
        // The background checkpointer on a short timer (its only trigger here).
        checkpoint_interval: background.then(|| Duration::from_millis(100)),
        checkpoint_bytes: 1 << 40,
        ..LogOptions::default()
    }
}

fn open(dir: &Path, o: LogOptions, faults: &Arc<FaultySync>) -> Disk {
    fs::write(dir.join("d.img"), vec![0u8; SIZE as usize]).unwrap();
    Disk::open_tracked_with_sync(
        "d",
        &dir.join("d.img"),
        &dir.join("d.hrl"),
        "id-1",
        o,
        Arc::clone(faults) as _,
    )
    .unwrap()
    .0
}

/// A tracked 1 MiB disk whose syncs go through a fault-injecting layer, its log and a
/// runtime; `background`: with the background checkpointer.
fn setup(
    background: bool,
) -> (
    tempfile::TempDir,
    Arc<FaultySync>,
    Disk,
    ChangeLog,
    tokio::runtime::Runtime,
) {
    let t = tempfile::tempdir().unwrap();
    let faults = FaultySync::new();
    let disk = open(t.path(), opts(background), &faults);
    let log = disk.change_log().unwrap();
    (t, faults, disk, log, rt())
}

/// Runs `f` on a thread of its own; its result, or `None` if it has not returned in 20 s.
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).ok()
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_cut_and_a_release_do_not_wait_for_the_image_sync() {
    let (_t, faults, disk, log, rt) = setup(true);
    for i in 0..8u64 {
        rt.block_on(disk.write(i * 4096, vec![i as u8 + 1; 4096], false))
            .unwrap();
    }
    faults.hold(Target::Image);
    // The cut seals its segment (the log's sync only) and returns although the image's sync
    // is held; the checkpointer's next checkpoint waits on that sync.
    let l = log.clone();
    let segs = within(move || l.take().unwrap()).expect("take waited for the image's sync");
    let lsn = segs.last().unwrap().last_lsn;
    until("the checkpointer syncs the image", || {
        faults.waiting(Target::Image) == 1
    });
    assert!(
        log.checkpoint_lsn() < lsn,
        "checkpointed without an image sync"
    );
    // Shipped: released at once, deleted later. No longer backlog.
    let l = log.clone();
    within(move || l.release_shipped(lsn).unwrap()).expect("release waited for the image");
    assert_eq!(log.shipped_through(), lsn);
    assert_eq!(
        log.sealed_segments().len(),
        segs.len(),
        "deleted before its checkpoint"
    );
    for s in &segs {
        assert!(
            s.path.exists(),
            "{} deleted before its checkpoint",
            s.path.display()
        );
    }
    let active = log.active_segment().map_or(0, |a| a.bytes + a.extent_bytes);
    assert_eq!(
        log.unshipped_bytes(),
        active,
        "shipped segments counted as backlog"
    );
    // The image syncs: the checkpoint is recorded and the shipped segments go.
    faults.release(Target::Image);
    assert!(log.wait_checkpoint(lsn, Duration::from_secs(60)));
    // (The list is updated before the files go.)
    until("the shipped segments are deleted", || {
        log.sealed_segments().is_empty() && segs.iter().all(|s| !s.path.exists())
    });
    // Writes go on and the next cut is shipped the same way.
    rt.block_on(disk.write(0, vec![9; 4096], false)).unwrap();
    let segs = log.take().unwrap();
    let lsn2 = segs.last().unwrap().last_lsn;
    assert!(lsn2 > lsn);
    log.release_shipped(lsn2).unwrap();
    until("the second cut is deleted", || {
        log.sealed_segments().is_empty()
    });
    rt.block_on(disk.close()).unwrap();
}

#[test]
fn nothing_above_the_shipped_lsn_is_released() {
    let (_t, _faults, disk, log, rt) = setup(true);
    rt.block_on(disk.write(0, vec![1; 4096], false)).unwrap();
    let first = log.take().unwrap().last().unwrap().last_lsn;
    rt.block_on(disk.write(4096, vec![2; 4096], false)).unwrap();
    let second = log.take().unwrap();
    assert_eq!(second.len(), 2);
    // Only the first cut is shipped; both get checkpointed.
    log.release_shipped(first).unwrap();
    assert!(log.wait_checkpoint(second[1].last_lsn, Duration::from_secs(60)));
    until("the first cut is deleted", || {
        log.sealed_segments().len() == 1
    });
    assert_eq!(log.sealed_segments()[0].seq, second[1].seq);
    assert!(second[1].path.exists());
    // The unshipped one is still backlog.
    assert!(log.unshipped_bytes() >= second[1].bytes);
    // A new chain forgets the shipped LSN: its segments (numbered from 0 again) stay.
    log.reset().unwrap();
    assert_eq!(log.shipped_through(), 0);
    rt.block_on(disk.write(0, vec![3; 4096], false)).unwrap();
    let fresh = log.take().unwrap();
    assert!(log.wait_checkpoint(fresh[0].last_lsn, Duration::from_secs(60)));
    // The checkpointer releases after each checkpoint, one after the other: once a later
    // checkpoint is recorded, the release that followed the one covering `fresh` has run.
    rt.block_on(disk.write(4096, vec![4; 4096], false)).unwrap();
    let later = log.take().unwrap().last().unwrap().last_lsn;
    assert!(log.wait_checkpoint(later, Duration::from_secs(60)));
    assert_eq!(
        log.sealed_segments()[0].seq,
        fresh[0].seq,
        "a new chain's segment was released"
    );
    assert!(
        fresh[0].path.exists(),
        "{fresh:?} {:?}",
        fs::read_dir(log.dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );
    rt.block_on(disk.close()).unwrap();
}

#[test]
fn without_a_background_checkpointer_seals_and_releases_checkpoint_on_the_spot() {
    let (_t, faults, disk, log, rt) = setup(false);
    rt.block_on(disk.write(0, vec![1; 4096], false)).unwrap();
    let before = faults.syncs(Target::Image);
    let segs = log.take().unwrap();
    let lsn = segs.last().unwrap().last_lsn;
    assert!(
        faults.syncs(Target::Image) > before,
        "the seal did not sync the image"
    );
    assert!(log.checkpoint_lsn() >= lsn);
    log.release_shipped(lsn).unwrap();
    assert!(log.sealed_segments().is_empty());
    assert!(!segs[0].path.exists());
    rt.block_on(disk.close()).unwrap();
}
