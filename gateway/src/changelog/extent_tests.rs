//! Reference-model test of extents and copy-before-write: random writes of mixed sizes (small
//! ones logged with their data, large ones as extents), trims and zeroes, cuts, shipments
//! (the replication engine's own `patch_from_log`) and reopen after a clean stop or a crash,
//! interleaved on a tracked `Disk`; writes go inline (`Disk::write_now`) when the disk takes
//! them, as the NBD server sends them. Every shipped cut must equal the model as it was at that
//! cut, the image must equal the model, and recovery's redo (which skips what later extents
//! cover) must leave the image equal to the model.

use std::fs;
use std::path::PathBuf;

use nbd_server::ZeroFlags;
use proptest::prelude::*;
use rand::{RngCore, SeedableRng};

use crate::changelog::tests::rt;
use crate::changelog::{LogOptions, LogState};
use crate::disk::Disk;
use crate::replication::engine::patch_from_log;

const SIZE: u64 = 1 << 20;
const BIG: u64 = 64 << 10;

struct Fixture {
    _t: tempfile::TempDir,
    image: PathBuf,
    log: PathBuf,
    initial: Vec<u8>,
}

fn fixture(seed: u64) -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let image = t.path().join("d.img");
    let mut data = vec![0u8; SIZE as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    fs::write(&image, &data).unwrap();
    let log = t.path().join("d.hrl");
    Fixture {
        _t: t,
        image,
        log,
        initial: data,
    }
}

fn opts(segment_size: u64, image_flush_min: u64) -> LogOptions {
    LogOptions {
        segment_size,
        image_flush_min,
        min_free_bytes: 0,
        min_free_percent: 0,
        extent_min: BIG,
        ..LogOptions::default()
    }
}

fn open(f: &Fixture, seg: u64, flush_min: u64) -> Disk {
    let o = opts(seg, flush_min);
    let (d, report) = Disk::open_tracked("d", &f.image, &f.log, "disk-id", o).unwrap();
    assert_eq!(report.state, LogState::Healthy);
    d
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Cut,
    /// FLUSH: logs the bytes of the deferred small writes (or syncs the image, past
    /// `image_flush_min`).
    Flush,
    /// A checkpoint: the deferred writes up to it are synced (a FLUSH skips them).
    Checkpoint,
    /// Ship the oldest pending cut, or (`skip`) the newest, skipping the ones between.
    Ship {
        skip: bool,
    },
    Reopen {
        clean: bool,
    },
}

/// Small ranges (logged with data) and large ones (extents), overlapping often; and 4 KiB
/// blocks among a few, so that the same range is often written again while its deferred
/// piece is live (`take_uncut`'s shortcut).
fn arb_range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        2 => (0u64..SIZE, 1u64..20_000).prop_map(|(off, len)| (off, len.min(SIZE - off))),
        1 => (0u64..8).prop_map(|b| (b * 4096, 4096)),
        3 => (0u64..SIZE - 4 * BIG, BIG..4 * BIG),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (arb_range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => arb_range().prop_map(|(off, len)| Op::Trim { off, len }),
        1 => arb_range().prop_map(|(off, len)| Op::Zero { off, len }),
        3 => Just(Op::Cut),
        2 => Just(Op::Flush),
        1 => Just(Op::Checkpoint),
        3 => any::<bool>().prop_map(|skip| Op::Ship { skip }),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Ships the cut at `lsn` from the replica's last point: the engine's patch, applied to the
/// replica, then the shipped segments released (as the engine does).
fn ship(disk: &Disk, replica: &mut [u8], shipped: &mut u64, lsn: u64) {
    let log = disk.change_log().unwrap();
    let patch = patch_from_log(&log, *shipped, lsn, SIZE).unwrap();
    patch.apply(0, replica).unwrap();
    *shipped = lsn;
    log.wait_sealed().unwrap();
    let last = log
        .sealed_segments()
        .iter()
        .filter(|s| s.last_lsn <= lsn)
        .map(|s| s.seq)
        .max();
    if let Some(seq) = last {
        log.release(seq).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::changelog::tests::cases(40), ..ProptestConfig::default() })]

    #[test]
    fn shipped_cuts_equal_the_model(
        ops in proptest::collection::vec(arb_op(), 1..60),
        seg in prop_oneof![Just(64u64 << 10), Just(1 << 20)],
        flush_min in prop_oneof![Just(0u64), Just(8192), Just(64 << 20)],
    ) {
        let f = fixture(11);
        let rt = rt();
        let mut model = f.initial.clone();
        let mut replica = f.initial.clone();
        let mut shipped = 0u64;
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut disk = open(&f, seg, flush_min);
        for op in &ops {
            match op.clone() {
                Op::Write { off, len, seed } => {
                    let data = pattern(len, seed);
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    // As the NBD server does: inline when the disk takes it, else the path
                    // that may wait.
                    match disk.write_now(off, &data, false) {
                        Some(r) => r.unwrap(),
                        None => rt.block_on(disk.write(off, data, false)).unwrap(),
                    }
                }
                Op::Trim { off, len } => {
                    model[off as usize..(off + len) as usize].fill(0);
                    rt.block_on(disk.trim(off, len, false)).unwrap();
                }
                Op::Zero { off, len } => {
                    model[off as usize..(off + len) as usize].fill(0);
                    rt.block_on(disk.write_zeroes(off, len, ZeroFlags::default())).unwrap();
                }
                Op::Flush => rt.block_on(disk.flush()).unwrap(),
                Op::Checkpoint => {
                    disk.change_log().unwrap().checkpoint().unwrap();
                }
                Op::Cut => {
                    let lsn = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
                    pending.push((lsn, model.clone()));
                }
                Op::Ship { skip } => {
                    if pending.is_empty() {
                        continue;
                    }
                    let (lsn, want) = if skip {
                        let last = pending.pop().unwrap();
                        pending.clear();
                        last
                    } else {
                        pending.remove(0)
                    };
                    ship(&disk, &mut replica, &mut shipped, lsn);
                    prop_assert!(replica == want, "the cut at LSN {} differs from the model", lsn);
                }
                Op::Reopen { clean } => {
                    if clean {
                        rt.block_on(disk.close()).unwrap();
                    } else {
                        disk.change_log().unwrap().wait_sealed().unwrap();
                    }
                    drop(disk);
                    disk = open(&f, seg, flush_min);
                }
            }
            prop_assert!(disk.change_log().unwrap().state().is_healthy());
            let map = super::registered(disk.change_log().unwrap().dir()).unwrap();
            if let Err(e) = map.check_deferred_index() {
                prop_assert!(false, "{}", e);
            }
        }
        let image = rt.block_on(disk.read(0, SIZE as usize)).unwrap();
        prop_assert!(image == model, "image differs from the model");
        for (lsn, want) in std::mem::take(&mut pending) {
            ship(&disk, &mut replica, &mut shipped, lsn);
            prop_assert!(replica == want, "the cut at LSN {} differs from the model", lsn);
        }
        // Everything shipped is released, preimages included.
        let lsn = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
        ship(&disk, &mut replica, &mut shipped, lsn);
        prop_assert!(replica == model);
        let _ = Disk::cut(std::slice::from_ref(&disk)).unwrap();
        let sides = fs::read_dir(&f.log).unwrap().flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".cbw")).count();
        prop_assert_eq!(sides, 0, "side files of released segments remain");
        rt.block_on(disk.close()).unwrap();
    }
}

/// The copy-before-write path by hand: an extent in a cut, overwritten after the cut by a
/// small write and by another extent, still ships as it was; the preimage is in a side file
/// and survives a restart.
#[test]
fn an_overwritten_extent_ships_its_preimage_across_a_restart() {
    let f = fixture(5);
    let rt = rt();
    let disk = open(&f, 1 << 20, 0);
    let a = pattern(BIG * 2, 1);
    rt.block_on(disk.write(0, a.clone(), false)).unwrap();
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    let mut at_cut = f.initial.clone();
    at_cut[..a.len()].copy_from_slice(&a);
    // After the cut: a small write and an extent over the first extent.
    rt.block_on(disk.write(100, vec![9u8; 1000], false))
        .unwrap();
    rt.block_on(disk.write(BIG, pattern(BIG * 2, 2), false))
        .unwrap();
    let (_, saved) =
        super::ExtentMap::usage(&super::registered(disk.change_log().unwrap().dir()).unwrap());
    assert_eq!(saved, 1000 + BIG, "only the overwritten parts were saved");
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    let disk = open(&f, 1 << 20, 0);
    let mut replica = f.initial.clone();
    let mut shipped = 0;
    ship(&disk, &mut replica, &mut shipped, cut);
    assert!(replica == at_cut, "the cut lost the extent's bytes");
    rt.block_on(disk.close()).unwrap();
}

/// The backlog (what the 50 % resync rule reads) counts the bytes an extent stands for, not
/// just its 40-byte record: in the active segment, once sealed, and after a restart.
#[test]
fn backlog_counts_the_bytes_of_extents() {
    let f = fixture(6);
    let rt = rt();
    let disk = open(&f, 1 << 20, 0);
    let log = disk.change_log().unwrap().clone();
    let empty = log.unshipped_bytes();
    rt.block_on(disk.write(0, pattern(BIG * 4, 3), false))
        .unwrap();
    // A small write: a deferred extent (its bytes logged at the next FLUSH or cut), which
    // stands for its 4 KiB as a large write's extent does.
    rt.block_on(disk.write(BIG * 8, vec![1u8; 4096], false))
        .unwrap();
    let expect = empty + 40 + BIG * 4 + 40 + 4096;
    assert_eq!(log.unshipped_bytes(), expect, "active segment");
    let sealed = log.take().unwrap();
    assert_eq!(sealed.len(), 1);
    assert_eq!(sealed[0].extent_bytes, BIG * 4 + 4096);
    let after_take = log.unshipped_bytes();
    assert!(
        after_take >= expect,
        "sealed segment: {after_take} < {expect}"
    );
    assert_eq!(
        after_take,
        sealed[0].bytes + sealed[0].extent_bytes + log.active_segment().map_or(0, |a| a.bytes)
    );
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    let disk = open(&f, 1 << 20, 0);
    let log = disk.change_log().unwrap();
    let again = log.sealed_segments();
    assert_eq!(again[0].extent_bytes, BIG * 4 + 4096, "recomputed at open");
    assert!(log.unshipped_bytes() >= BIG * 4);
    rt.block_on(disk.close()).unwrap();
}

/// A small write over an extent newer than the last cut is logged inline (its record replaces
/// that part of the extent in the same cut); over an extent of a cut it is not (the extent's
/// bytes must be saved first), and the cut still ships the extent as it was.
#[test]
fn small_writes_over_uncut_extents_stay_inline() {
    let f = fixture(21);
    let rt = rt();
    // No background checkpoint: one between the writes could cool the extent, and a write
    // into a cold extent syncs the log first (not inline either).
    let o = LogOptions {
        checkpoint_interval: None,
        ..opts(1 << 20, 0)
    };
    let (disk, _) = Disk::open_tracked("d", &f.image, &f.log, "disk-id", o).unwrap();
    let mut model = f.initial.clone();
    let big = pattern(BIG * 2, 4);
    model[..big.len()].copy_from_slice(&big);
    rt.block_on(disk.write(0, big, false)).unwrap();
    let small = vec![7u8; 4096];
    model[4096..8192].copy_from_slice(&small);
    assert!(
        disk.write_now(4096, &small, false)
            .is_some_and(|r| r.is_ok()),
        "a small write over an extent of no cut is taken inline"
    );
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    let at_cut = model.clone();
    let later = vec![8u8; 4096];
    assert!(
        disk.write_now(BIG, &later, false).is_none(),
        "a piece of a cut needs its bytes saved first: not inline"
    );
    rt.block_on(disk.write(BIG, later.clone(), false)).unwrap();
    model[BIG as usize..(BIG + 4096) as usize].copy_from_slice(&later);
    let mut replica = f.initial.clone();
    let mut shipped = 0;
    ship(&disk, &mut replica, &mut shipped, cut);
    assert!(
        replica == at_cut,
        "the cut ships the extent as it was at the cut"
    );
    assert!(rt.block_on(disk.read(0, SIZE as usize)).unwrap() == model);
    rt.block_on(disk.close()).unwrap();
}

/// A large write is logged inline as an extent when nothing waits: its 40-byte record, the
/// range a piece of the map, the backlog counting its bytes, and the next FLUSH syncs the
/// image (its bytes are there only). Over a piece of a cut it is not taken inline (the piece's
/// bytes must be saved first), and the cut still ships what it held.
#[test]
fn large_writes_are_extents_logged_inline_unless_a_cut_needs_their_bytes() {
    use crate::changelog::durable::{FaultySync, Target};
    use crate::changelog::format::{decode_segment, Kind};
    let f = fixture(22);
    let rt = rt();
    let o = LogOptions {
        checkpoint_interval: None,
        ..opts(1 << 20, 0)
    };
    let faults = FaultySync::new();
    let (disk, _) =
        Disk::open_tracked_with_sync("d", &f.image, &f.log, "disk-id", o, faults.clone()).unwrap();
    let log = disk.change_log().unwrap().clone();
    let mut model = f.initial.clone();
    // The first write into a cold extent syncs the log: not inline, nothing logged.
    let first = pattern(BIG, 1);
    assert!(disk.write_now(0, &first, false).is_none(), "cold extent");
    assert_eq!(log.last_lsn(), 0);
    rt.block_on(disk.write(0, first.clone(), false)).unwrap();
    model[..first.len()].copy_from_slice(&first);
    rt.block_on(disk.flush()).unwrap();
    let backlog = log.unshipped_bytes();
    let images = faults.syncs(Target::Image);

    // Hot now: a large write is taken inline, as an extent.
    let big = pattern(BIG * 2, 2);
    assert!(
        disk.write_now(BIG, &big, false).is_some_and(|r| r.is_ok()),
        "a large write into a hot extent is taken inline"
    );
    model[BIG as usize..(BIG * 3) as usize].copy_from_slice(&big);
    let lsn = log.last_lsn();
    assert_eq!(disk.extent_ranges(), vec![(0, BIG), (BIG, BIG * 3)]);
    assert_eq!(log.unshipped_bytes(), backlog + 40 + BIG * 2);
    rt.block_on(disk.flush()).unwrap();
    assert_eq!(
        faults.syncs(Target::Image),
        images + 1,
        "the FLUSH after an extent syncs the image"
    );
    let seg = log.segments().last().unwrap().path.clone();
    let dec = decode_segment(&fs::read(seg).unwrap()).unwrap();
    let rec = dec
        .records
        .iter()
        .find(|r| r.header.lsn == lsn)
        .expect("the extent's record");
    assert_eq!(rec.header.kind, Kind::Extent);
    assert_eq!((rec.header.offset, rec.header.length), (BIG, BIG * 2));
    assert_eq!((rec.header.flags, rec.data.len()), (0, 0));

    // After a cut, a large write over one of its pieces saves the bytes first: not inline.
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    let at_cut = model.clone();
    let over = pattern(BIG, 3);
    assert!(
        disk.write_now(BIG * 2, &over, false).is_none(),
        "a piece of a cut needs its bytes saved first: not inline"
    );
    rt.block_on(disk.write(BIG * 2, over.clone(), false))
        .unwrap();
    model[(BIG * 2) as usize..(BIG * 3) as usize].copy_from_slice(&over);
    // Beside the cut's pieces, inline again.
    let beside = pattern(BIG, 4);
    assert!(disk
        .write_now(BIG * 4, &beside, false)
        .is_some_and(|r| r.is_ok()));
    model[(BIG * 4) as usize..(BIG * 5) as usize].copy_from_slice(&beside);
    let mut replica = f.initial.clone();
    let mut shipped = 0;
    ship(&disk, &mut replica, &mut shipped, cut);
    assert!(
        replica == at_cut,
        "the cut ships the extents as they were at the cut"
    );
    let end = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    ship(&disk, &mut replica, &mut shipped, end);
    assert!(replica == model, "the next cut ships the writes after it");
    assert!(rt.block_on(disk.read(0, SIZE as usize)).unwrap() == model);
    rt.block_on(disk.close()).unwrap();
}
