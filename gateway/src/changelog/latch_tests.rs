//! The fsync latch with the fault-injecting sync layer: after one failed `fdatasync` of the
//! image or the log, every later FLUSH and FUA write fails (although the layer, like Linux,
//! lets the next sync succeed), the chain is broken persistently, and reopening the disk
//! clears the latch while the chain stays broken until a reset (the full resync).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::durable::{FaultySync, Target};
use super::log::read_state;
use super::tests::rt;
use super::{LogOptions, LogState};
use crate::disk::Disk;

const SIZE: u64 = 1 << 20;

fn opts() -> LogOptions {
    LogOptions {
        segment_size: 16 << 10,
        min_free_bytes: 0,
        min_free_percent: 0,
        checkpoint_interval: None,
        ..LogOptions::default()
    }
}

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("d.img");
    fs::write(&p, vec![0u8; SIZE as usize]).unwrap();
    p
}

fn tracked(dir: &Path, img: &Path, sync: Arc<FaultySync>) -> Disk {
    Disk::open_tracked_with_sync("d", img, &dir.join("d.hrl"), "id-1", opts(), sync)
        .unwrap()
        .0
}

fn assert_eio(r: std::io::Result<()>, what: &str) {
    let e = r.expect_err(what);
    // Not a kind the NBD server maps to anything but EIO.
    assert_eq!(e.kind(), std::io::ErrorKind::Other, "{what}: {e}");
    assert!(e.to_string().contains("fdatasync"), "{what}: {e}");
}

/// `target`'s next sync fails: the log's in the next FLUSH, the image's in the next
/// checkpoint (FLUSH syncs only the log).
fn latches_on(target: Target) {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let rt = rt();
    let faults = FaultySync::new();
    let d = tracked(t.path(), &img, Arc::clone(&faults));
    rt.block_on(async {
        d.write(0, vec![1u8; 4096], false).await.unwrap();
        d.flush().await.unwrap();
        faults.fail_nth(target, 1);
        d.write(4096, vec![2u8; 4096], false).await.unwrap();
        if target == Target::Image {
            let log = d.change_log().unwrap();
            let e = log
                .checkpoint()
                .expect_err("the checkpoint whose image sync fails");
            assert!(
                e.to_string().contains("fdatasync")
                    || e.to_string().contains("EIO")
                    || e.to_string().contains("I/O"),
                "{e}"
            );
            assert_eio(d.flush().await, "the first flush after it");
        } else {
            assert_eio(d.flush().await, "the flush whose sync fails");
        }
        assert_eq!(faults.failed(), 1);
        // The layer would let the next sync succeed; the latch does not.
        assert_eio(d.flush().await, "a later flush");
        assert_eio(d.write(8192, vec![3u8; 512], true).await, "a FUA write");
        assert_eio(
            d.trim(8192, 4096, true).await,
            "a FUA trim after the failure",
        );
        // Writes without FUA keep working (to the page cache), reads too.
        d.write(12288, vec![4u8; 4096], false).await.unwrap();
        assert_eq!(d.read(12288, 4096).await.unwrap(), vec![4u8; 4096]);
    });
    let reason = d.sync_failure().expect("latched");
    assert!(reason.contains(target.name()), "{reason}");
    let log = d.change_log().unwrap();
    assert!(
        matches!(log.state(), LogState::Broken { reason } if reason.contains("fdatasync")),
        "{:?}",
        log.state()
    );
    assert_eq!(
        read_state(log.dir()).unwrap().unwrap().state,
        super::log::ChainHealth::Broken
    );
    // A clean close cannot vouch for the image either.
    assert!(rt.block_on(d.close()).is_err());
    drop(log);
    drop(d);

    // The admin restarts the gateway: the disk is reopened, FLUSH works again; the chain
    // stays broken until the full resync resets it.
    let d = tracked(t.path(), &img, FaultySync::new());
    rt.block_on(async {
        d.write(0, vec![5u8; 4096], false).await.unwrap();
        d.flush().await.unwrap();
    });
    let log = d.change_log().unwrap();
    assert_eq!(log.state().label(), "broken");
    log.reset().unwrap();
    assert!(log.state().is_healthy());
    rt.block_on(async {
        d.write(0, vec![6u8; 4096], true).await.unwrap();
        d.flush().await.unwrap();
    });
    assert_eq!(
        read_state(log.dir()).unwrap().unwrap().state,
        super::log::ChainHealth::Healthy
    );
}

#[test]
fn a_failed_image_sync_latches() {
    latches_on(Target::Image);
}

#[test]
fn a_failed_log_sync_latches() {
    latches_on(Target::Log);
}

#[test]
fn a_failed_seal_sync_breaks_the_chain_and_latches() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let rt = rt();
    let faults = FaultySync::new();
    let d = tracked(t.path(), &img, Arc::clone(&faults));
    let log = d.change_log().unwrap();
    faults.fail_nth(Target::Log, 1);
    // 8 KiB writes into 16 KiB segments: the second rotation seals (syncs) a segment.
    rt.block_on(async {
        for i in 0..6u64 {
            d.write(i * 8192, vec![i as u8; 8192], false).await.unwrap();
        }
    });
    // The seal runs on a background thread: wait for it (its error went to the log state).
    let _ = log.wait_sealed();
    assert_eq!(faults.failed(), 1);
    assert_eq!(log.state().label(), "broken");
    assert_eio(rt.block_on(d.flush()), "a flush after the failed seal");
}

#[test]
fn flush_syncs_the_log_and_the_image_only_for_image_dependent_records() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let rt = rt();
    let faults = FaultySync::new();
    let d = tracked(t.path(), &img, Arc::clone(&faults));
    let log = d.change_log().unwrap();
    let image_syncs = || faults.syncs(Target::Image);
    let log_syncs = || faults.syncs(Target::Log);
    let (i0, l0) = (image_syncs(), log_syncs());
    rt.block_on(async {
        d.write(0, vec![1u8; 4096], false).await.unwrap();
        d.flush().await.unwrap();
        d.write(4096, vec![1u8; 4096], true).await.unwrap();
    });
    assert_eq!(image_syncs(), i0, "FLUSH and FUA sync the log only");
    assert!(log_syncs() >= l0 + 2);
    // An image-dependent record (its data is in the image only): the next round syncs the
    // image too, once.
    rt.block_on(d.write(8192, vec![2u8; 4096], false)).unwrap();
    log.note_image_dependent(log.last_lsn());
    rt.block_on(d.flush()).unwrap();
    assert_eq!(image_syncs(), i0 + 1);
    rt.block_on(d.flush()).unwrap();
    assert_eq!(image_syncs(), i0 + 1, "nothing image-dependent since");
    // A checkpoint syncs the image and records the redo point.
    let c = log.checkpoint().unwrap();
    assert_eq!(c, log.last_lsn());
    assert_eq!(image_syncs(), i0 + 2);
    assert_eq!(read_state(log.dir()).unwrap().unwrap().applied_lsn, c);
    assert_eq!(log.checkpoint_lsn(), c);
}

#[test]
fn an_untracked_disk_latches_too() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let faults = FaultySync::new();
    let d = Disk::open_with_sync("d", &img, false, Arc::clone(&faults) as _).unwrap();
    rt().block_on(async {
        d.write(0, vec![1u8; 4096], true).await.unwrap();
        faults.fail_nth(Target::Image, 1);
        assert_eio(d.write(0, vec![2u8; 4096], true).await, "the FUA write");
        assert_eio(d.flush().await, "a later flush");
        assert_eio(d.flush().await, "and the next");
    });
    assert_eq!(faults.failed(), 1);
    // Reopened (the gateway restarted): syncs work again.
    let d = Disk::open("d", &img, false).unwrap();
    rt().block_on(d.flush()).unwrap();
}
