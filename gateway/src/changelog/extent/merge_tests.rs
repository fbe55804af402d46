//! Merged deferred pieces (see `super::deferred`, "Merged pieces"): adjacent live deferred
//! writes become one piece inside a 1 MiB-aligned window, a write inside one only renumbers
//! it, a FLUSH logs their bytes as written, and a cut never takes one unlogged.

use std::fs;
use std::sync::Arc;

use crate::changelog::extent::ExtentMap;
use crate::changelog::format::Kind;
use crate::changelog::tests::{records, rt};
use crate::changelog::{ChangeLog, LogOptions, LogState};
use crate::disk::Disk;

/// The 1 MiB windows pieces are merged in; the disk is two of them.
const W: u64 = 1 << 20;

fn open(t: &tempfile::TempDir) -> Disk {
    let image = t.path().join("d.img");
    fs::write(&image, vec![0u8; 2 * W as usize]).unwrap();
    let o = LogOptions {
        min_free_bytes: 0,
        min_free_percent: 0,
        // No background checkpoint (it could cool an extent: such a write is not inline),
        // and every small write deferred however often FLUSHes come.
        checkpoint_interval: None,
        flush_heavy_writes: 0,
        ..LogOptions::default()
    };
    let (d, report) = Disk::open_tracked("d", &image, &t.path().join("d.hrl"), "id", o).unwrap();
    assert_eq!(report.state, LogState::Healthy);
    // Heats both windows' extents (a first write into a cold extent syncs the log first, so
    // it is not taken inline): FUA writes of the last block of each, logged with their data.
    for at in [W - 4096, 2 * W - 4096] {
        rt().block_on(d.write(at, vec![0xAA; 4096], true)).unwrap();
    }
    d
}

/// [`open`]'s disk, with its log and extent map.
fn tracked(t: &tempfile::TempDir) -> (Disk, ChangeLog, Arc<ExtentMap>) {
    let disk = open(t);
    let log = disk.change_log().unwrap();
    let map = super::registered(log.dir()).unwrap();
    (disk, log, map)
}

/// The write records logged after the first `n` records, as (offset, length).
fn writes_since(disk: &Disk, n: usize) -> Vec<(u64, u64)> {
    records(disk)[n..]
        .iter()
        .filter(|h| h.kind == Kind::Write)
        .map(|h| (h.offset, h.length))
        .collect()
}

fn inline(disk: &Disk, offset: u64, byte: u8) {
    let r = disk.write_now(offset, &[byte; 4096], false);
    assert!(r.is_some_and(|r| r.is_ok()), "taken inline at {offset}");
}

#[test]
fn adjacent_deferred_writes_merge_within_a_window() {
    let t = tempfile::tempdir().unwrap();
    let rt = rt();
    let (disk, log, map) = tracked(&t);
    // Out of order: the second joins the first from the left, the third fills the block the
    // warm-up wrote (no piece there) between it and the window's end.
    inline(&disk, W - 8192, 1);
    inline(&disk, W - 12288, 2);
    inline(&disk, W - 4096, 3);
    // Past the window's end: a piece of its own, which the next write joins from the left.
    inline(&disk, W, 4);
    inline(&disk, W + 4096, 5);
    assert_eq!(disk.extent_ranges(), vec![(W - 12288, W), (W, W + 8192)]);
    assert_eq!(map.deferred_bytes(), 20480);
    map.check_deferred_index().unwrap();
    // Inside a merged piece: renumbered, no new piece, no new bytes.
    let n = records(&disk).len();
    inline(&disk, W - 8192, 6);
    assert_eq!(records(&disk).len(), n + 1, "the write's record");
    assert_eq!(disk.extent_ranges(), vec![(W - 12288, W), (W, W + 8192)]);
    assert_eq!(map.deferred_bytes(), 20480);
    map.check_deferred_index().unwrap();
    // The FLUSH logs the image's bytes of both, as one run (runs join adjacent pieces).
    let n = records(&disk).len();
    rt.block_on(disk.flush()).unwrap();
    let d = crate::changelog::format::decode_segment(
        &fs::read(&log.segments().pop().unwrap().path).unwrap(),
    )
    .unwrap();
    let logged: Vec<_> = d.records[n..]
        .iter()
        .filter(|r| r.header.kind == Kind::Write)
        .collect();
    assert_eq!(
        logged.len(),
        1,
        "{:?}",
        d.records[n..].iter().map(|r| r.header).collect::<Vec<_>>()
    );
    assert_eq!(
        (logged[0].header.offset, logged[0].header.length),
        (W - 12288, 20480)
    );
    let bytes = &fs::read(&log.segments().pop().unwrap().path).unwrap()[logged[0].data.clone()];
    let want: Vec<u8> = [2u8, 6, 3, 4, 5].iter().flat_map(|&b| [b; 4096]).collect();
    assert!(bytes == &want[..], "the last bytes of every block");
    assert_eq!(map.deferred_bytes(), 0);
    assert!(disk.extent_ranges().is_empty());
    map.check_deferred_index().unwrap();
    assert_eq!(rt.block_on(disk.read(W - 12288, 20480)).unwrap(), want);
    rt.block_on(disk.close()).unwrap();
}

#[test]
fn pieces_synced_by_a_checkpoint_do_not_merge_with_live_ones() {
    let t = tempfile::tempdir().unwrap();
    let rt = rt();
    let (disk, log, map) = tracked(&t);
    inline(&disk, 0, 1);
    log.checkpoint().unwrap();
    map.settle(&log);
    assert_eq!((map.deferred_bytes(), map.synced_bytes()), (0, 4096));
    // The checkpoint cooled the extent: heat it again so that the writes are inline.
    rt.block_on(disk.write(W - 4096, vec![0xAA; 4096], true))
        .unwrap();
    inline(&disk, 4096, 2);
    // Two pieces: the synced one stays as the FLUSH may skip it; the live one is new.
    assert_eq!(disk.extent_ranges(), vec![(0, 4096), (4096, 8192)]);
    assert_eq!((map.deferred_bytes(), map.synced_bytes()), (4096, 4096));
    map.check_deferred_index().unwrap();
    let n = records(&disk).len();
    rt.block_on(disk.flush()).unwrap();
    let logged = writes_since(&disk, n);
    assert_eq!(logged, vec![(4096, 4096)], "only the live piece");
    rt.block_on(disk.close()).unwrap();
}

#[test]
fn a_cut_never_takes_a_merged_piece_unlogged() {
    let t = tempfile::tempdir().unwrap();
    let rt = rt();
    let (disk, log, map) = tracked(&t);
    inline(&disk, 0, 1);
    inline(&disk, 4096, 2);
    assert_eq!(disk.extent_ranges(), vec![(0, 8192)]);
    // As if a cut's pass had not logged it: the map refuses the cut and changes nothing.
    let e = map.cut_at(&log, log.last_lsn()).unwrap_err();
    assert!(e.to_string().contains("not logged yet"), "{e}");
    assert_eq!(map.deferred_bytes(), 8192);
    assert_eq!(disk.extent_ranges(), vec![(0, 8192)]);
    map.check_deferred_index().unwrap();
    // A cut logs the piece's bytes first, then takes the cut.
    let n = records(&disk).len();
    Disk::cut(std::slice::from_ref(&disk)).unwrap();
    let logged = writes_since(&disk, n);
    assert_eq!(logged, vec![(0, 8192)]);
    assert!(disk.extent_ranges().is_empty());
    map.check_deferred_index().unwrap();
    rt.block_on(disk.close()).unwrap();
}
