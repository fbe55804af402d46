//! Records copied into a mapping of the active segment (see `super::segmap`): every write keeps
//! its record across the zeroes written ahead, rotations and a crash, and a cut ships exactly
//! the image — as with records written by `pwritev`.

use std::fs;

use super::tests::{records, rt};
use super::{LogOptions, LogState};
use crate::disk::Disk;
use crate::replication::engine::patch_from_log;

const SIZE: u64 = 1 << 20;

/// Small segments (64 KiB: zeroes ahead run to the segment's end, 1,600 records of 40 bytes
/// fill one), every small write deferred, no background checkpoint.
fn opts(mapped_records: bool) -> LogOptions {
    LogOptions {
        segment_size: 64 << 10,
        min_free_bytes: 0,
        min_free_percent: 0,
        checkpoint_interval: None,
        flush_heavy_writes: 0,
        mapped_records,
        ..LogOptions::default()
    }
}

/// A temporary directory on a file system where segments are mapped: the temporary
/// directory's, else the memory file system's (every Linux has one of the two).
fn mappable_dir() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    if super::segmap::supported(t.path()) {
        return t;
    }
    let shm = tempfile::tempdir_in("/dev/shm").expect("a temporary directory on /dev/shm");
    assert!(
        super::segmap::supported(shm.path()),
        "neither the temporary directory nor /dev/shm is on ext4, XFS or tmpfs"
    );
    shm
}

/// 5,000 small writes (4 KiB and 512 bytes, over 256 places, so most rewrite a live deferred
/// piece), taken inline where nothing waits, and a FLUSH after every 1,000; then a crash (the
/// disk dropped without closing), a reopen and a cut. Checks that the log, before and after
/// the crash, holds at least one record per write with contiguous LSNs across its segments,
/// and that the cut ships exactly the image the writes made. Returns the records copied into a
/// mapping.
fn writes_crash_and_ship(mapped_records: bool) -> u64 {
    let t = mappable_dir();
    let image = t.path().join("d.img");
    fs::write(&image, vec![0u8; SIZE as usize]).unwrap();
    let log = t.path().join("d.hrl");
    let rt = rt();
    let (disk, report) =
        Disk::open_tracked("d", &image, &log, "disk-id", opts(mapped_records)).unwrap();
    assert_eq!(report.state, LogState::Healthy);
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..5000u64 {
        let off = (i * 97 % 256) * 4096;
        let len = if i % 3 == 0 { 512 } else { 4096 };
        let data = vec![(i % 251) as u8 + 1; len];
        model[off as usize..off as usize + len].copy_from_slice(&data);
        // As the NBD server does: inline if nothing waits, else by the writer thread.
        match disk.write_now(off, &data, false) {
            Some(r) => r.unwrap(),
            None => rt.block_on(disk.write(off, data, false)).unwrap(),
        }
        if i % 1000 == 999 {
            rt.block_on(disk.flush()).unwrap();
        }
    }
    let before = records(&disk);
    let mapped = disk.change_log().unwrap().mapped_records();
    assert!(before.len() >= 5000, "{} records", before.len());
    assert!(
        before.windows(2).all(|w| w[1].lsn == w[0].lsn + 1),
        "contiguous LSNs across segments"
    );
    drop(disk); // a crash: nothing closed, nothing sealed
    let (disk, report) =
        Disk::open_tracked("d", &image, &log, "disk-id", opts(mapped_records)).unwrap();
    assert_eq!(report.state, LogState::Healthy, "{report:?}");
    assert_eq!(
        report.last_lsn,
        before.last().unwrap().lsn,
        "every record survived"
    );
    assert!(records(&disk)[..before.len()] == before[..]);
    assert!(rt.block_on(disk.read(0, SIZE as usize)).unwrap()[..] == model[..]);
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    let patch = patch_from_log(&disk.change_log().unwrap(), 0, cut, SIZE).unwrap();
    let mut replica = vec![0u8; SIZE as usize];
    patch.apply(0, &mut replica).unwrap();
    assert!(replica == model, "the cut ships every write");
    rt.block_on(disk.close()).unwrap();
    mapped
}

#[test]
fn mapped_records_keep_every_write_across_a_crash() {
    let mapped = writes_crash_and_ship(true);
    // Most records are a deferred write's 40 bytes taken inline; those near a segment's end
    // (the inline path leaves room for a data record) go through the writer thread.
    assert!(mapped > 3000, "{mapped} records copied into the mapping");
}

#[test]
fn written_records_keep_every_write_across_a_crash() {
    assert_eq!(writes_crash_and_ship(false), 0, "mapped_records = false");
}

/// The mapping is made only on file systems that overwrite written blocks in place (a copy
/// into a block a copy-on-write file system must allocate could kill the process on a full
/// file system); a memory file system is one, /proc is not.
#[test]
fn mapping_is_refused_where_a_write_may_need_new_space() {
    let t = mappable_dir();
    assert!(super::segmap::supported(t.path()));
    assert!(!super::segmap::supported(std::path::Path::new("/proc")));
    assert!(!super::segmap::supported(std::path::Path::new(
        "/nonexistent/standby-test"
    )));
}
