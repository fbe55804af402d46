//! Redo durability: checkpoints, release after checkpoint, recovery after a host crash (hot
//! extents logged again), and replay's rule for image-dependent records.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::RecordHeader;
use super::log::{read_state, StateFile, STATE_FILE};
use super::replay::replay_after_with;
use super::segment::list_segments;
use super::tests::rt;
use super::*;
use crate::disk::Disk;

const SIZE: u64 = 256 << 10;

fn opts(segment_size: u64) -> LogOptions {
    LogOptions {
        segment_size,
        min_free_bytes: 0,
        min_free_percent: 0,
        checkpoint_interval: None,
        // Redo: every small write logged with its data (a deferred one's bytes are in the
        // image until a FLUSH or cut logs them; `extent::deferred_tests` has those).
        defer_max: 0,
        ..LogOptions::default()
    }
}

fn open(dir: &Path, o: LogOptions) -> (Disk, RecoveryReport) {
    Disk::open_tracked("d", &dir.join("d.img"), &dir.join("d.hrl"), "id-1", o).unwrap()
}

/// As if the host had restarted: the state file names another boot.
fn other_boot(log_dir: &Path) {
    let path = log_dir.join(STATE_FILE);
    let mut p: StateFile = toml::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    p.boot_id = "an-earlier-boot".into();
    fs::write(&path, toml::to_string(&p).unwrap()).unwrap();
}

fn replay_onto(initial: &[u8], log_dir: &Path, dir: &Path) -> Vec<u8> {
    let copy = dir.join("replayed.img");
    fs::write(&copy, initial).unwrap();
    let img = OpenOptions::new().write(true).open(&copy).unwrap();
    replay_dir(log_dir, &img).unwrap();
    fs::read(&copy).unwrap()
}

#[test]
fn a_host_crash_keeps_the_chain_and_logs_the_hot_extents_again() {
    let t = tempfile::tempdir().unwrap();
    let initial = vec![7u8; SIZE as usize];
    fs::write(t.path().join("d.img"), &initial).unwrap();
    let rt = rt();
    let (disk, _) = open(t.path(), opts(1 << 20));
    let log = disk.change_log().unwrap();
    rt.block_on(async {
        disk.write(0, vec![1u8; 8192], false).await.unwrap();
        disk.flush().await.unwrap();
    });
    let c = log.checkpoint().unwrap();
    rt.block_on(async {
        disk.write(16384, vec![2u8; 4096], false).await.unwrap();
        disk.flush().await.unwrap();
    });
    drop(log);
    drop(disk); // crash
    other_boot(&t.path().join("d.hrl"));
    // The host crash left a write in the image whose record the log lost (written back
    // before the log's page): within the hot extent, as the hot-extent rule guarantees.
    let img = OpenOptions::new()
        .write(true)
        .open(t.path().join("d.img"))
        .unwrap();
    img.write_all_at(&[9u8; 512], 32768).unwrap();
    drop(img);
    let (disk, report) = open(t.path(), opts(1 << 20));
    assert_eq!(report.state, LogState::Healthy, "{report:?}");
    assert!(report.host_crash);
    assert!(report.relogged >= SIZE.min(hot::MIN_EXTENT), "{report:?}");
    let log = disk.change_log().unwrap();
    assert!(log.checkpoint_lsn() > c);
    let now = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
    assert_eq!(&now[..8192], &[1u8; 8192][..]);
    assert_eq!(&now[16384..20480], &[2u8; 4096][..]);
    assert_eq!(&now[32768..33280], &[9u8; 512][..]);
    // The log describes the image exactly again, the stray write included.
    assert!(replay_onto(&initial, &t.path().join("d.hrl"), t.path()) == now);
    // A second open (same boot) has nothing to repair.
    rt.block_on(disk.close()).unwrap();
    drop(log);
    drop(disk);
    let (_disk, report) = open(t.path(), opts(1 << 20));
    assert_eq!(report.state, LogState::Healthy);
    assert!(!report.host_crash);
    assert_eq!(report.relogged, 0);
}

/// One checkpoint moves the redo point; the relog point follows one checkpoint later (see
/// `hot`, "Two intervals"): a host crash between them logs the extent again, a host crash
/// after both has nothing to repair.
#[test]
fn a_host_crash_after_two_checkpoints_has_nothing_to_repair() {
    for checkpoints in [1, 2] {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("d.img"), vec![0u8; SIZE as usize]).unwrap();
        let rt = rt();
        let (disk, _) = open(t.path(), opts(1 << 20));
        rt.block_on(disk.write(0, vec![1u8; 4096], false)).unwrap();
        let log = disk.change_log().unwrap();
        let c = log.checkpoint().unwrap();
        assert_eq!((log.checkpoint_lsn(), log.relog_lsn()), (c, 0));
        if checkpoints == 2 {
            // Nothing new in the image: only the relog point moves (no image sync).
            assert_eq!(log.checkpoint().unwrap(), c);
            assert_eq!(log.relog_lsn(), c);
        }
        let state = read_state(log.dir()).unwrap().unwrap();
        assert_eq!(state.relog_point(), log.relog_lsn());
        drop(log);
        drop(disk);
        other_boot(&t.path().join("d.hrl"));
        let (disk, report) = open(t.path(), opts(1 << 20));
        assert_eq!(report.state, LogState::Healthy);
        assert!(report.host_crash);
        assert_eq!(report.redone, 0);
        match checkpoints {
            1 => assert_eq!(report.relogged, SIZE.min(hot::MIN_EXTENT), "{report:?}"),
            _ => assert_eq!(report.relogged, 0, "{report:?}"),
        }
        let now = rt.block_on(disk.read(0, 4096)).unwrap();
        assert_eq!(now, vec![1u8; 4096]);
    }
}

/// While a checkpoint's syncs run, a stream neither makes nor claims a pre-heat (its log sync
/// would queue behind the image's write-back); the first write after it does.
#[test]
fn a_stream_skips_its_preheats_while_a_checkpoint_syncs() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("d.img"), vec![0u8; SIZE as usize]).unwrap();
    let rt = rt();
    let o = LogOptions {
        hot_extent_min: 4096,
        heat_ahead: 8,
        // Logged as extents, on the path streams take (small writes are batched, no windows).
        extent_min: 4096,
        ..opts(1 << 20)
    };
    let (disk, _) = open(t.path(), o);
    let log = disk.change_log().unwrap();
    let write = |extent: u64| rt.block_on(disk.write(extent * 4096, vec![9u8; 4096], false));
    // Extent 0 starts the stream (a sync, no window); extent 1 continues it and is cold: a
    // sync that heats the window 2..=9 with it.
    write(0).unwrap();
    write(1).unwrap();
    assert_eq!(log.hot_counters(), (2, 1));
    // Extents 6..=8 would pre-heat (the middle of their window is cold), but a checkpoint
    // is syncing: they go on in the hot window, no sync, no window, no claim.
    log.set_checkpoint_syncing(true);
    for e in 2..=8 {
        write(e).unwrap();
    }
    assert_eq!(log.hot_counters(), (2, 1));
    // After it, the next write pre-heats (nothing claimed the window meanwhile).
    log.set_checkpoint_syncing(false);
    write(9).unwrap();
    assert_eq!(log.hot_counters(), (3, 2));
    let now = rt.block_on(disk.read(0, 10 * 4096)).unwrap();
    assert_eq!(now, vec![9u8; 10 * 4096]);
}

/// Extents written in every interval stay hot past the checkpoints that end them (each
/// checkpoint's first log sync re-heats them): rewriting them syncs the log only the first
/// time, and recovery after a host crash still finds the image as written.
#[test]
fn extents_written_every_interval_stay_hot_across_checkpoints() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("d.img"), vec![0u8; SIZE as usize]).unwrap();
    let rt = rt();
    let o = LogOptions {
        hot_extent_min: 4096,
        // One segment: no sealer thread still running to rewrite the state file.
        ..opts(8 << 20)
    };
    let (disk, _) = open(t.path(), o);
    let log = disk.change_log().unwrap();
    let extents = SIZE / 4096;
    let write_all = |round: u8| {
        for e in 0..extents {
            let data = vec![round.wrapping_add(e as u8); 4096];
            rt.block_on(disk.write(e * 4096, data, false)).unwrap();
        }
    };
    write_all(1);
    let (first, _) = log.hot_counters();
    assert!(first >= 1);
    for round in 2..=4 {
        log.checkpoint().unwrap();
        write_all(round);
    }
    assert_eq!(log.hot_counters().0, first, "a rewritten extent went cold");
    rt.block_on(disk.flush()).unwrap();
    drop(log);
    drop(disk);
    other_boot(&t.path().join("d.hrl"));
    let (disk, report) = open(t.path(), o);
    assert_eq!(report.state, LogState::Healthy);
    assert!(report.host_crash && report.relogged <= SIZE, "{report:?}");
    let now = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
    for e in 0..extents as usize {
        assert!(now[e * 4096..(e + 1) * 4096]
            .iter()
            .all(|&b| b == 4u8.wrapping_add(e as u8)));
    }
}

/// A state file of an older build has no relog point: its redo point is taken (those builds
/// relogged after it). A relog point above the redo point is never believed.
#[test]
fn the_relog_point_of_older_state_files_is_the_redo_point() {
    let mut p: StateFile = toml::from_str(
        "format = 1\ndisk_id = \"d\"\nchain_id = \"0000000000000001\"\nfirst_seq = 0\nfirst_lsn = 1\napplied_lsn = 42\nclean = false\nimage_mtime_ns = 0\nboot_id = \"\"\nstate = \"healthy\"\n",
    )
    .unwrap();
    assert_eq!((p.relog_after, p.relog_point()), (None, 42));
    p.relog_after = Some(50);
    assert_eq!(p.relog_point(), 42);
    p.relog_after = Some(7);
    assert_eq!(p.relog_point(), 7);
    assert!(toml::to_string(&p).unwrap().contains("relog_after = 7"));
}

#[test]
fn segments_are_released_only_when_checkpointed() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("d.img"), vec![0u8; SIZE as usize]).unwrap();
    let rt = rt();
    let (disk, _) = open(t.path(), opts(8192));
    let log = disk.change_log().unwrap();
    for i in 0..6u64 {
        rt.block_on(disk.write(i * 4096, vec![i as u8; 4096], false))
            .unwrap();
    }
    let segs = log.take().unwrap();
    assert!(segs.len() >= 2);
    // Every seal checkpoints: the redo point covers what was taken.
    let last = segs.last().unwrap().last_lsn;
    assert!(log.checkpoint_lsn() >= last);
    assert!(read_state(log.dir()).unwrap().unwrap().applied_lsn >= last);
    log.release(segs.last().unwrap().seq).unwrap();
    assert!(list_segments(log.dir()).unwrap().len() <= 1);
}

#[test]
fn a_checkpoint_recorded_past_the_log_start_is_required() {
    // The state file says the image holds less than what was released: broken.
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("d.img"), vec![0u8; SIZE as usize]).unwrap();
    let rt = rt();
    let (disk, _) = open(t.path(), opts(8192));
    for i in 0..6u64 {
        rt.block_on(disk.write(i * 4096, vec![1; 4096], false))
            .unwrap();
    }
    let log = disk.change_log().unwrap();
    let segs = log.take().unwrap();
    log.release(segs.last().unwrap().seq).unwrap();
    drop(log);
    drop(disk);
    let path = t.path().join("d.hrl").join(STATE_FILE);
    let mut p: StateFile = toml::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    p.applied_lsn = 1;
    fs::write(&path, toml::to_string(&p).unwrap()).unwrap();
    let (_d, report) = open(t.path(), opts(8192));
    assert!(
        matches!(&report.state, LogState::Broken { reason } if reason.contains("checkpointed only up to")),
        "{report:?}"
    );
}

#[test]
fn replay_lets_a_later_image_dependent_record_supersede_earlier_data() {
    let t = tempfile::tempdir().unwrap();
    let img_path = t.path().join("d.img");
    fs::write(&img_path, vec![0u8; SIZE as usize]).unwrap();
    let rt = rt();
    let (disk, _) = open(t.path(), opts(1 << 20));
    rt.block_on(async {
        disk.write(0, vec![b'A'; 8192], false).await.unwrap(); // LSN 1
        disk.write(4096, vec![b'B'; 8192], false).await.unwrap(); // LSN 2 (image-dependent)
        disk.write(8192, vec![b'C'; 8192], false).await.unwrap(); // LSN 3
    });
    drop(disk);
    let segs: Vec<_> = list_segments(&t.path().join("d.hrl"))
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    // The image holds the image-dependent record's bytes ('X' here): replay must keep them
    // where no later record wrote, and write none of LSN 1's bytes there.
    let target = t.path().join("target.img");
    fs::write(&target, vec![b'X'; SIZE as usize]).unwrap();
    let img = OpenOptions::new().write(true).open(&target).unwrap();
    let dep = |h: &RecordHeader| h.lsn == 2;
    let stats = replay_after_with(&segs, &img, 0, &dep).unwrap();
    assert_eq!(stats.records, 3);
    let b = fs::read(&target).unwrap();
    assert!(b[..4096].iter().all(|&x| x == b'A'));
    assert!(b[4096..8192].iter().all(|&x| x == b'X'), "LSN 1 superseded");
    assert!(b[8192..16384].iter().all(|&x| x == b'C'), "LSN 3 is later");
    assert!(b[16384..].iter().all(|&x| x == b'X'));
    // Without the mark, replay is plain last-writer-wins.
    let img = OpenOptions::new().write(true).open(&target).unwrap();
    replay_after_with(&segs, &img, 0, &|_| false).unwrap();
    let b = fs::read(&target).unwrap();
    assert!(b[4096..8192].iter().all(|&x| x == b'B'));
    // And after LSN 2 only LSN 3 applies.
    fs::write(&target, vec![b'X'; SIZE as usize]).unwrap();
    let img = OpenOptions::new().write(true).open(&target).unwrap();
    let stats = replay_after_with(&segs, &img, 2, &dep).unwrap();
    assert_eq!(stats.records, 1);
    let b = fs::read(&target).unwrap();
    assert!(b[..8192].iter().all(|&x| x == b'X'));
}

#[test]
fn a_flush_syncs_the_image_once_the_log_no_longer_records() {
    use super::durable::{FaultySync, Target};
    use std::sync::Arc;
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("d.img"), vec![0u8; SIZE as usize]).unwrap();
    let faults = FaultySync::new();
    let (disk, _) = Disk::open_tracked_with_sync(
        "d",
        &t.path().join("d.img"),
        &t.path().join("d.hrl"),
        "id-1",
        opts(1 << 20),
        Arc::clone(&faults) as _,
    )
    .unwrap();
    let rt = rt();
    rt.block_on(async {
        disk.write(0, vec![1u8; 4096], false).await.unwrap();
        disk.flush().await.unwrap();
    });
    let before = faults.syncs(Target::Image);
    let _ = disk.change_log().unwrap().break_chain("test".into());
    rt.block_on(async {
        disk.write(0, vec![2u8; 4096], false).await.unwrap();
        disk.flush().await.unwrap();
    });
    assert_eq!(faults.syncs(Target::Image), before + 1);
}

#[test]
fn the_background_checkpointer_runs_on_its_timer_and_on_log_volume() {
    use std::time::Duration;
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("d.img"), vec![0u8; SIZE as usize]).unwrap();
    let rt = rt();
    // Volume: a checkpoint every 16 KiB of log (the timer would wait an hour).
    let o = LogOptions {
        checkpoint_interval: Some(Duration::from_secs(3600)),
        checkpoint_bytes: 16 << 10,
        ..opts(1 << 20)
    };
    let (disk, _) = open(t.path(), o);
    let log = disk.change_log().unwrap();
    for i in 0..5u64 {
        rt.block_on(disk.write(i * 4096, vec![1; 4096], false))
            .unwrap();
    }
    // The fourth record passes 16 KiB: the checkpointer covers at least the three before.
    assert!(
        log.wait_checkpoint(3, Duration::from_secs(60)),
        "no checkpoint after 16 KiB of log"
    );
    assert!(read_state(log.dir()).unwrap().unwrap().applied_lsn >= 3);
    rt.block_on(disk.close()).unwrap();
    drop(log);
    drop(disk);
    // Timer: a short interval checkpoints without any other trigger.
    let o = LogOptions {
        checkpoint_interval: Some(Duration::from_millis(20)),
        ..opts(1 << 20)
    };
    let (disk, _) = open(t.path(), o);
    let log = disk.change_log().unwrap();
    rt.block_on(disk.write(0, vec![2; 4096], false)).unwrap();
    let last = log.last_lsn();
    assert!(
        log.wait_checkpoint(last, Duration::from_secs(60)),
        "the timer never checkpointed"
    );
}
