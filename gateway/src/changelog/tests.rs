//! Change log with a real `Disk`: reference model, recovery, rotation, accounting.
//!
//! Long (~750 lines, 52 tests) because the reference model and its fixtures are shared by all
//! of them; the redo, extent and latch tests have files of their own.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nbd_server::ZeroFlags;
use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};

use super::format::HEADER_LEN;
use super::log::read_state;
use super::segment::list_segments;
use super::*;
use crate::disk::Disk;

const SIZE: u64 = 256 << 10;

struct Fixture {
    _t: tempfile::TempDir,
    image: PathBuf,
    initial: PathBuf,
    log: PathBuf,
}

fn fixture(seed: u64) -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let image = t.path().join("d.img");
    let initial = t.path().join("initial.img");
    let mut data = vec![0u8; SIZE as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    fs::write(&image, &data).unwrap();
    fs::write(&initial, &data).unwrap();
    let log = t.path().join("d.hrl");
    Fixture {
        _t: t,
        image,
        initial,
        log,
    }
}

fn opts(segment_size: u64) -> LogOptions {
    LogOptions {
        segment_size,
        min_free_bytes: 0,
        min_free_percent: 0,
        checkpoint_interval: None,
        // These tests replay the log onto a copy of the initial image, which needs every
        // write's data in the log: no extents (extent_tests.rs covers those).
        extent_min: u64::MAX,
        ..LogOptions::default()
    }
}

fn open(f: &Fixture, o: LogOptions) -> (Disk, RecoveryReport) {
    Disk::open_tracked("d", &f.image, &f.log, "disk-id-1", o).unwrap()
}

/// A two-worker runtime for the tests of the change log (shared by its test modules).
pub(super) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every record header of the disk's log, oldest first (shared by the change log's test
/// modules).
pub(super) fn records(disk: &Disk) -> Vec<format::RecordHeader> {
    let log = disk.change_log().unwrap();
    let mut out = Vec::new();
    for s in log.segments() {
        let d = format::decode_segment(&fs::read(&s.path).unwrap()).unwrap();
        out.extend(d.records.iter().map(|r| r.header));
    }
    out
}

/// Replays the whole log onto a copy of the initial image and returns the result.
fn replayed(f: &Fixture) -> Vec<u8> {
    let copy = f.initial.with_extension("replay");
    fs::copy(&f.initial, &copy).unwrap();
    let img = OpenOptions::new().write(true).open(&copy).unwrap();
    replay_dir(&f.log, &img).unwrap();
    drop(img);
    let out = fs::read(&copy).unwrap();
    fs::remove_file(&copy).unwrap();
    out
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
        may_trim: bool,
    },
    Flush,
    Take {
        release: bool,
    },
    Reopen {
        clean: bool,
    },
}

/// Ranges of every size class the write path distinguishes: small ones (logged with their
/// data) and ones of 64 KiB or more (extents, at the default `extent_min`), placed anywhere
/// (the large ones start low enough to fit whole).
fn arb_range() -> impl Strategy<Value = (u64, u64)> {
    let big = crate::changelog::extent::DEFAULT_EXTENT_MIN;
    prop_oneof![
        3 => (0u64..SIZE, 1u64..20_000).prop_map(|(off, len)| (off, len.min(SIZE - off))),
        1 => (0u64..SIZE - 3 * big, big..3 * big).prop_map(|(off, len)| (off, len)),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (arb_range(), any::<u8>(), any::<bool>()).prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed, fua }),
        1 => arb_range().prop_map(|(off, len)| Op::Trim { off, len }),
        1 => (arb_range(), any::<bool>()).prop_map(|((off, len), may_trim)| Op::Zero { off, len, may_trim }),
        1 => Just(Op::Flush),
        1 => any::<bool>().prop_map(|release| Op::Take { release }),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Cases of a reference-model property test: `n`, or `PROPTEST_CASES` when set (longer
/// campaigns; an explicit `cases` would otherwise override proptest's own reading of it).
pub fn cases(n: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::changelog::tests::cases(48), ..ProptestConfig::default() })]

    /// Random write/trim/zero/flush/take/reopen sequences on a tracked `Disk` and on a
    /// `Vec<u8>` model: the image equals the model, and so does the log replayed onto the
    /// initial image (releases excepted: then only the image is compared).
    #[test]
    fn reference_model(ops in proptest::collection::vec(arb_op(), 1..40), seg in prop_oneof![Just(4096u64), Just(20_000), Just(1 << 20)]) {
        let f = fixture(7);
        let rt = rt();
        let mut model = fs::read(&f.initial).unwrap();
        let (mut disk, _) = open(&f, opts(seg));
        let mut released = false;
        for op in &ops {
            match op.clone() {
                Op::Write { off, len, seed, fua } => {
                    let data = pattern(len, seed);
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    rt.block_on(disk.write(off, data, fua)).unwrap();
                }
                Op::Trim { off, len } => {
                    model[off as usize..(off + len) as usize].fill(0);
                    rt.block_on(disk.trim(off, len, false)).unwrap();
                }
                Op::Zero { off, len, may_trim } => {
                    model[off as usize..(off + len) as usize].fill(0);
                    let flags = ZeroFlags { may_trim, fast_only: false, fua: false };
                    rt.block_on(disk.write_zeroes(off, len, flags)).unwrap();
                }
                Op::Flush => rt.block_on(disk.flush()).unwrap(),
                Op::Take { release } => {
                    let log = disk.change_log().unwrap();
                    let sealed = log.take().unwrap();
                    // Sealed segments are contiguous in LSN.
                    for w in sealed.windows(2) {
                        prop_assert_eq!(w[0].last_lsn + 1, w[1].first_lsn);
                    }
                    if release {
                        if let Some(last) = sealed.last() {
                            log.release(last.seq).unwrap();
                            released = true;
                        }
                    }
                }
                Op::Reopen { clean } => {
                    if clean {
                        rt.block_on(disk.close()).unwrap();
                    } else {
                        disk.change_log().unwrap().wait_sealed().unwrap();
                    }
                    drop(disk);
                    let (d, report) = open(&f, opts(seg));
                    prop_assert_eq!(&report.state, &LogState::Healthy);
                    prop_assert!(report.cut.is_none(), "{:?}", report.cut);
                    disk = d;
                }
            }
            prop_assert!(disk.change_log().unwrap().state().is_healthy());
        }
        let image = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
        prop_assert!(image == model, "image differs from the model");
        rt.block_on(disk.close()).unwrap();
        drop(disk);
        if !released {
            prop_assert!(replayed(&f) == model, "replayed log differs from the model");
        }
    }
}

/// Concurrent overlapping writes: whatever order they land in, replaying the log onto the
/// initial image reproduces the image exactly (log order = image order).
#[test]
fn concurrent_overlapping_writes_replay_to_the_image() {
    let f = fixture(3);
    let rt = rt();
    let (disk, _) = open(&f, opts(64 << 10));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let d = disk.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for i in 0..60u64 {
                    let off = rng.gen_range(0..SIZE - 8192) & !511;
                    let len = rng.gen_range(1..16) * 512;
                    let op = rng.gen_range(0..10);
                    if op < 7 {
                        d.write(off, pattern(len, (t * 61 + i) as u8), false)
                            .await
                            .unwrap();
                    } else if op < 8 {
                        d.trim(off, len, false).await.unwrap();
                    } else if op < 9 {
                        d.write_zeroes(off, len, ZeroFlags::default())
                            .await
                            .unwrap();
                    } else {
                        d.flush().await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let image = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
    let log = disk.change_log().unwrap();
    assert!(log.sealed_segments().len() + 1 >= 2, "rotation happened");
    log.wait_sealed().unwrap();
    // Replay while the log is still open (active segment unsealed) ...
    assert!(replayed(&f) == image);
    rt.block_on(disk.close()).unwrap();
    // ... and after sealing it.
    assert!(replayed(&f) == image);
}

/// Concurrent flushers share sync rounds.
#[test]
fn group_commit_shares_sync_rounds() {
    let f = fixture(4);
    let rt = rt();
    let (disk, _) = open(&f, opts(1 << 20));
    let flushes = 32 * 20;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let d = disk.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20u64 {
                    d.write((t * 20 + i) * 256, vec![t as u8; 256], false)
                        .await
                        .unwrap();
                    d.flush().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let rounds = disk.change_log().unwrap().sync_rounds();
    assert!(
        rounds > 0 && rounds < flushes,
        "{rounds} sync rounds for {flushes} flushes"
    );
}

fn write_some(rt: &tokio::runtime::Runtime, disk: &Disk, n: u64, len: u64) {
    for i in 0..n {
        rt.block_on(disk.write(i * len, pattern(len, i as u8), false))
            .unwrap();
    }
}

/// The active segment's path and length after writes and a crash (drop without close).
fn crashed_with_writes(f: &Fixture, n: u64, len: u64) -> (PathBuf, Vec<u64>) {
    let rt = rt();
    let (disk, _) = open(f, opts(1 << 20));
    write_some(&rt, &disk, n, len);
    let active = disk.change_log().unwrap().active_segment().unwrap();
    drop(disk);
    let mut ends = vec![HEADER_LEN as u64];
    for _ in 0..n {
        ends.push(ends.last().unwrap() + 40 + len);
    }
    // The records, then the zeroes the active segment is written ahead with.
    let bytes = fs::read(&active.path).unwrap();
    let total = *ends.last().unwrap() as usize;
    assert!(bytes.len() > total, "{} bytes", bytes.len());
    assert!(bytes[total..].iter().all(|&b| b == 0));
    (active.path, ends)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A torn active segment cut at every byte position: recovery keeps exactly the whole
/// records before the cut, reports it, and the log stays healthy.
#[test]
fn torn_tail_cut_at_every_position() {
    let f = fixture(5);
    let (active, ends) = crashed_with_writes(&f, 4, 100);
    let saved = f.log.with_extension("saved");
    copy_dir(&f.log, &saved);
    let total = *ends.last().unwrap();
    for n in HEADER_LEN as u64..=total {
        fs::remove_dir_all(&f.log).unwrap();
        copy_dir(&saved, &f.log);
        OpenOptions::new()
            .write(true)
            .open(&active)
            .unwrap()
            .set_len(n)
            .unwrap();
        let (disk, report) = open(&f, opts(1 << 20));
        let keep = *ends.iter().rev().find(|&&e| e <= n).unwrap();
        let records = ends.iter().filter(|&&e| e <= n).count() as u64 - 1;
        assert_eq!(report.state, LogState::Healthy, "at {n}");
        assert_eq!(report.last_lsn, records, "at {n}");
        match &report.cut {
            None => assert_eq!(n, keep, "no cut reported at {n}"),
            Some(c) => {
                assert_ne!(n, keep, "cut reported at a record boundary {n}");
                assert_eq!(c.at, keep, "exact cut at {n}");
                assert_eq!(c.dropped_bytes, n - keep, "at {n}");
            }
        }
        // The next record continues the chain.
        assert_eq!(disk.change_log().unwrap().last_lsn(), records);
        drop(disk);
    }
}

#[test]
fn crash_redoes_records_missing_from_the_image() {
    let f = fixture(6);
    let rt = rt();
    let (disk, _) = open(&f, opts(1 << 20));
    write_some(&rt, &disk, 8, 4096);
    let expect = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
    drop(disk); // crash: no close
                // The image lost the last writes (as if the process died between log and image).
    let img = OpenOptions::new().write(true).open(&f.image).unwrap();
    img.write_all_at(&vec![0xEE; 3 * 4096], 5 * 4096).unwrap();
    drop(img);
    let (disk, report) = open(&f, opts(1 << 20));
    assert_eq!(report.state, LogState::Healthy);
    assert_eq!(report.redone, 8);
    assert!(rt.block_on(disk.read(0, SIZE as usize)).unwrap() == expect);
    // After a clean close nothing needs redoing.
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    let (_disk, report) = open(&f, opts(1 << 20));
    assert_eq!(report.redone, 0);
}

fn closed_log_with_segments(f: &Fixture) -> Vec<(u64, PathBuf)> {
    let rt = rt();
    let (disk, _) = open(f, opts(8192));
    write_some(&rt, &disk, 12, 3000);
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    let segs = list_segments(&f.log).unwrap();
    assert!(segs.len() >= 3, "{segs:?}");
    segs
}

fn reopened_state(f: &Fixture) -> LogState {
    let (disk, report) = open(f, opts(8192));
    let s = disk.change_log().unwrap().state();
    assert_eq!(s, report.state);
    s
}

fn assert_broken(s: &LogState, needle: &str) {
    match s {
        LogState::Broken { reason } => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected broken ({needle}), got {other}"),
    }
}

#[test]
fn corrupt_sealed_segment_breaks_the_chain_persistently() {
    let f = fixture(8);
    let segs = closed_log_with_segments(&f);
    let p = &segs[1].1;
    let mut b = fs::read(p).unwrap();
    b[HEADER_LEN + 100] ^= 1;
    fs::write(p, b).unwrap();
    assert_broken(&reopened_state(&f), "segment 1");
    // Broken is persistent, and writes still work.
    let rt = rt();
    let (disk, _) = open(&f, opts(8192));
    assert!(matches!(
        disk.change_log().unwrap().state(),
        LogState::Broken { .. }
    ));
    rt.block_on(disk.write(0, vec![1; 512], true)).unwrap();
    assert_eq!(rt.block_on(disk.read(0, 512)).unwrap(), vec![1; 512]);
    assert!(matches!(
        disk.change_log().unwrap().take(),
        Err(LogError::NotHealthy { .. })
    ));
    // A reset starts a new healthy chain.
    disk.change_log().unwrap().reset().unwrap();
    assert!(disk.change_log().unwrap().state().is_healthy());
    rt.block_on(disk.write(0, vec![2; 512], false)).unwrap();
    assert_eq!(disk.change_log().unwrap().last_lsn(), 1);
}

#[test]
fn missing_sealed_segment_breaks_the_chain() {
    let f = fixture(9);
    let segs = closed_log_with_segments(&f);
    fs::remove_file(&segs[1].1).unwrap();
    assert_broken(&reopened_state(&f), "segment 1 is missing");
}

#[test]
fn lsn_gap_breaks_the_chain() {
    let f = fixture(10);
    closed_log_with_segments(&f);
    let sp = f.log.join("state.toml");
    let text = fs::read_to_string(&sp).unwrap();
    fs::write(&sp, text.replace("first_lsn = 1\n", "first_lsn = 3\n")).unwrap();
    assert_broken(&reopened_state(&f), "LSN gap");
}

#[test]
fn image_written_behind_the_logs_back_breaks_the_chain() {
    let f = fixture(11);
    closed_log_with_segments(&f);
    // At once, within the file system's timestamp granularity of the close.
    let img = OpenOptions::new().write(true).open(&f.image).unwrap();
    img.write_all_at(b"x", 0).unwrap();
    drop(img);
    assert_broken(&reopened_state(&f), "newer than its log");
    // The same right after a clean close of a reopened (reset) chain, many times over: no
    // write may keep the stamp the close left.
    for i in 0..20u8 {
        let (disk, _) = open(&f, opts(8192));
        let log = disk.change_log().unwrap();
        log.reset().unwrap();
        let rt = rt();
        write_some(&rt, &disk, 2, 100 + u64::from(i));
        rt.block_on(disk.close()).unwrap();
        drop(disk);
        let img = OpenOptions::new().write(true).open(&f.image).unwrap();
        img.write_all_at(&[i], 1).unwrap();
        drop(img);
        assert_broken(&reopened_state(&f), "newer than its log");
    }
}

#[test]
fn missing_state_file_breaks_the_chain() {
    let f = fixture(12);
    closed_log_with_segments(&f);
    fs::remove_file(f.log.join("state.toml")).unwrap();
    assert_broken(&reopened_state(&f), "state file is missing");
}

#[test]
fn overflow_keeps_writes_working() {
    let f = fixture(13);
    let rt = rt();
    let full = LogOptions {
        min_free_bytes: u64::MAX,
        min_free_percent: 100,
        ..opts(1 << 20)
    };
    let (disk, report) = open(&f, full);
    assert!(
        matches!(report.state, LogState::Overflow { .. }),
        "{}",
        report.state
    );
    rt.block_on(disk.write(4096, vec![9; 4096], true)).unwrap();
    rt.block_on(disk.flush()).unwrap();
    assert_eq!(rt.block_on(disk.read(4096, 4096)).unwrap(), vec![9; 4096]);
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    // Persistent, even with space available again.
    let (disk, _) = open(&f, opts(1 << 20));
    assert!(matches!(
        disk.change_log().unwrap().state(),
        LogState::Overflow { .. }
    ));
    let st = read_state(&f.log).unwrap().unwrap();
    assert_eq!(st.state, super::log::ChainHealth::Overflow);
}

#[test]
fn overflow_detected_while_writing() {
    let f = fixture(14);
    let rt = rt();
    let (disk, _) = open(&f, opts(1 << 20));
    write_some(&rt, &disk, 2, 4096);
    drop(disk);
    // Re-open with a floor that cannot be met and a check on every write.
    let o = LogOptions {
        min_free_bytes: u64::MAX,
        min_free_percent: 100,
        space_check_interval: 1,
        ..opts(1 << 20)
    };
    // Opening checks space too: it overflows right away; writes still succeed.
    let (disk, _) = open(&f, o);
    rt.block_on(disk.write(0, vec![3; 4096], false)).unwrap();
    assert!(matches!(
        disk.change_log().unwrap().state(),
        LogState::Overflow { .. }
    ));
}

#[test]
fn take_release_and_accounting() {
    let f = fixture(15);
    let rt = rt();
    let (disk, _) = open(&f, opts(1 << 20));
    let log = disk.change_log().unwrap().clone();
    assert_eq!(log.unshipped_bytes(), HEADER_LEN as u64);
    write_some(&rt, &disk, 10, 4096);
    let before = log.unshipped_bytes();
    assert_eq!(before, HEADER_LEN as u64 + 10 * (40 + 4096));
    assert!((log.unshipped_ratio() - before as f64 / SIZE as f64).abs() < 1e-9);
    let sealed = log.take().unwrap();
    assert_eq!(sealed.len(), 1);
    assert_eq!((sealed[0].first_lsn, sealed[0].last_lsn), (1, 11)); // 10 writes + barrier
    assert!(sealed[0].sealed);
    // New writes go to the next segment.
    write_some(&rt, &disk, 2, 512);
    let active = log.active_segment().unwrap();
    assert_eq!((active.seq, active.first_lsn, active.records), (1, 12, 2));
    assert!(matches!(log.release(1), Err(LogError::NotSealed { .. })));
    log.release(sealed[0].seq).unwrap();
    assert!(!sealed[0].path.exists());
    assert_eq!(log.unshipped_bytes(), active.bytes);
    // A second take with nothing new returns nothing more than was left.
    let again = log.take().unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].first_lsn, 12);
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    // The chain continues across a restart after a release.
    let (disk, report) = open(&f, opts(1 << 20));
    assert_eq!(report.state, LogState::Healthy);
    assert_eq!(disk.change_log().unwrap().last_lsn(), 14);
    assert_eq!(disk.change_log().unwrap().sealed_segments().len(), 1);
}

#[test]
fn second_opener_is_refused() {
    let f = fixture(16);
    let (_disk, _) = open(&f, opts(1 << 20));
    let e = Disk::open_tracked("d", &f.image, &f.log, "disk-id-1", opts(1 << 20)).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    assert!(super::log::is_locked(&f.log));
}

#[test]
fn log_of_another_disk_is_broken() {
    let f = fixture(17);
    closed_log_with_segments(&f);
    let (disk, _) = Disk::open_tracked("d", &f.image, &f.log, "another-id", opts(8192)).unwrap();
    assert_broken(&disk.change_log().unwrap().state(), "belongs to disk id");
}

/// Crash right after a size rotation, before the old segment was sealed: recovery seals it
/// and keeps the chain healthy.
#[test]
fn crash_with_unsealed_retired_segments_recovers() {
    let f = fixture(18);
    let rt = rt();
    let (disk, _) = open(&f, opts(8192));
    write_some(&rt, &disk, 6, 3000);
    let expect = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
    disk.change_log().unwrap().wait_sealed().unwrap();
    drop(disk);
    // Strip the footer of the second-to-last segment: as if sealing had not happened yet.
    let segs = list_segments(&f.log).unwrap();
    let p = &segs[segs.len() - 2].1;
    let len = fs::metadata(p).unwrap().len();
    File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len - format::FOOTER_LEN as u64)
        .unwrap();
    let (disk, report) = open(&f, opts(8192));
    assert_eq!(report.state, LogState::Healthy);
    assert!(report.cut.is_none());
    assert!(rt.block_on(disk.read(0, SIZE as usize)).unwrap() == expect);
    rt.block_on(disk.close()).unwrap();
    assert!(replayed(&f) == expect);
}

/// The active segment is written ahead with zeroes (so a FLUSH's fdatasync does not change
/// the file's size): its length stays put across small appends and syncs, a crash recovers
/// every record without reporting a cut, and sealing cuts the zeroes off.
#[test]
fn active_segment_is_written_ahead_with_zeroes() {
    let f = fixture(19);
    let rt = rt();
    let (disk, _) = open(&f, opts(1 << 20));
    rt.block_on(disk.write(0, pattern(4096, 1), false)).unwrap();
    let active = disk.change_log().unwrap().active_segment().unwrap();
    rt.block_on(disk.flush()).unwrap();
    let len = fs::metadata(&active.path).unwrap().len();
    assert_eq!(
        len,
        1 << 20,
        "written ahead up to the segment size by the sync"
    );
    for i in 1..8u64 {
        rt.block_on(disk.write(i * 4096, pattern(4096, i as u8), false))
            .unwrap();
        rt.block_on(disk.flush()).unwrap();
        assert_eq!(fs::metadata(&active.path).unwrap().len(), len);
    }
    let expect = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
    drop(disk); // crash: the zeroes stay
    let (disk, report) = open(&f, opts(1 << 20));
    assert_eq!(report.state, LogState::Healthy);
    assert!(report.cut.is_none(), "{:?}", report.cut);
    assert_eq!(report.last_lsn, 16);
    assert!(rt.block_on(disk.read(0, SIZE as usize)).unwrap() == expect);
    // Recovery sealed the old tail without its zeroes.
    let sealed = disk.change_log().unwrap().sealed_segments();
    let d = format::decode_segment(&fs::read(&sealed[0].path).unwrap()).unwrap();
    assert!(matches!(d.end, format::End::Sealed(_)));
    assert_eq!(d.records.len(), 16);
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    assert!(replayed(&f) == expect);
}

/// The zeroes written ahead go out in pieces that end on multiples of their size (256 KiB,
/// or a page where the sync drops pages, see `LARGE_FILL_PIECE`): they cover exactly
/// `[from, to)`, leave the bytes before `from` alone, and a file that cannot be written
/// reports how far the zeroes got (nothing).
#[test]
fn zeroes_ahead_cover_exactly_their_range() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("seg");
    fs::write(&p, vec![0xabu8; 1000]).unwrap();
    let file = File::options().read(true).write(true).open(&p).unwrap();
    let to = 1000 + 600_000;
    for piece in [4096, 256 << 10] {
        fs::write(&p, vec![0xabu8; 1000]).unwrap();
        assert_eq!(super::log::write_zeroes(&file, 1000, to, piece), to);
        let bytes = fs::read(&p).unwrap();
        assert_eq!(bytes.len() as u64, to);
        assert!(bytes[..1000].iter().all(|&b| b == 0xab));
        assert!(bytes[1000..].iter().all(|&b| b == 0));
        assert_eq!(
            super::log::write_zeroes(&file, to, to, piece),
            to,
            "empty range"
        );
    }
    drop(file);
    let ro = File::open(&p).unwrap();
    assert_eq!(super::log::write_zeroes(&ro, to, to + 5000, 4096), to);
    assert_eq!(fs::metadata(&p).unwrap().len(), to);
}

/// Clean shutdown seals every segment: one that lost its footer afterwards (its bytes after
/// the last record now zeroes, or gone) breaks the chain.
#[test]
fn clean_log_whose_segment_lost_its_seal_is_broken() {
    let f = fixture(20);
    let segs = closed_log_with_segments(&f);
    let p = &segs.last().unwrap().1;
    let len = fs::metadata(p).unwrap().len();
    let file = File::options().write(true).open(p).unwrap();
    file.write_all_at(&[0u8; format::FOOTER_LEN], len - format::FOOTER_LEN as u64)
        .unwrap();
    drop(file);
    assert_broken(
        &reopened_state(&f),
        "not sealed although the log was closed cleanly",
    );
}

/// A batch of small writes (the disk's writer thread) is split at size rotations, keeps LSN
/// order, gives every write its result, and replays to the image.
#[test]
fn record_writes_splits_at_rotation_and_replays() {
    let f = fixture(21);
    let rt = rt();
    let (disk, _) = open(&f, opts(4096));
    let log = disk.change_log().unwrap();
    let image = OpenOptions::new().write(true).open(&f.image).unwrap();
    let datas: Vec<Vec<u8>> = (0..12u64).map(|i| pattern(900 + i * 7, i as u8)).collect();
    let writes: Vec<log::BatchWrite<'_>> = datas
        .iter()
        .enumerate()
        .map(|(i, d)| log::BatchWrite {
            offset: i as u64 * 4096,
            data: d,
            flags: 0,
        })
        .collect();
    assert!(!log::overlaps(&writes, 12 * 4096, 4096));
    assert!(log::overlaps(&writes, 4096 + 100, 1));
    let mut applied = Vec::new();
    let results = log.record_writes(
        &writes,
        |_, _, _| None,
        |i, deferred| {
            assert!(!deferred);
            applied.push(i);
            image.write_all_at(writes[i].data, writes[i].offset)
        },
    );
    assert_eq!(applied, (0..12).collect::<Vec<_>>());
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(log.last_lsn(), 12);
    log.wait_sealed().unwrap();
    let segs = log.segments();
    assert!(segs.len() >= 3, "{segs:?}");
    for w in segs.windows(2) {
        assert_eq!(w[1].first_lsn, w[0].last_lsn + 1);
    }
    let expect = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    assert!(replayed(&f) == expect);
}

/// Small writes from many tasks go through the disk's writer thread in batches: overlapping
/// ones keep log order = image order (the log replays to the image), FLUSH sees them.
#[test]
fn writer_thread_batches_concurrent_small_writes() {
    let f = fixture(22);
    let rt = rt();
    let (disk, _) = open(&f, opts(16 << 10));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let d = disk.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t);
                for i in 0..40u64 {
                    // A small region so that requests overlap often.
                    let off = rng.gen_range(0..64u64) * 512;
                    let len = rng.gen_range(1..9) * 512;
                    d.write(off, pattern(len, (t * 41 + i) as u8), false)
                        .await
                        .unwrap();
                    if i % 13 == 0 {
                        d.flush().await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let log = disk.change_log().unwrap();
    assert_eq!(log.state(), LogState::Healthy);
    let expect = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    assert!(
        replayed(&f) == expect,
        "replayed log differs from the image"
    );
}
