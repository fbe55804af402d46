//! Small writes absorbed by a large write's piece (see `super::deferred`, "Absorbed
//! writes"), on a tracked `Disk`: the map keeps the large write's piece whole, the FLUSH after
//! them syncs the image (an image-synced barrier, nothing copied), and the cut ships their
//! bytes from that piece — also once a write after the cut has changed them in the image
//! (from the piece's preimage), and across a restart before the cut.

use super::deferred_tests::{
    deferred, every_write_deferred, fixture, inline, logged_writes, open, shipped, warm, SIZE,
};
use crate::changelog::format::{Kind, FLAG_IMAGE_SYNCED};
use crate::changelog::tests::{records, rt};
use crate::disk::Disk;

const BIG: u64 = 256 << 10;

#[test]
fn absorbed_writes_are_synced_by_the_flush_and_shipped_from_the_extent() {
    let f = fixture();
    let rt = rt();
    let disk = open(&f, every_write_deferred());
    let log = disk.change_log().unwrap();
    let map = super::registered(log.dir()).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    warm(&disk);
    model[(SIZE - 4096) as usize..].fill(0xAA);
    let mut put = |disk: &Disk, off: u64, data: Vec<u8>| {
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        inline(disk, off, &data);
    };
    put(&disk, 0, vec![0x11; BIG as usize]);
    let ranges = disk.extent_ranges();
    assert!(ranges.contains(&(0, BIG)), "{ranges:?}");
    // The large write's own FLUSH: the image is synced for it here, not later.
    rt.block_on(disk.flush()).unwrap();
    let n = records(&disk).len();
    put(&disk, 8192, vec![0x22; 4096]);
    put(&disk, 65536, vec![0x33; 8192]);
    let recs = records(&disk).split_off(n);
    assert!(recs.iter().all(deferred), "deferred extents: {recs:?}");
    assert_eq!(
        disk.extent_ranges(),
        ranges,
        "the large write's piece stays whole"
    );
    assert_eq!(map.deferred_bytes(), 0, "nothing for a pass to log");
    // The FLUSH syncs the image for them: a barrier past them, no bytes copied.
    let last = log.last_lsn();
    let n = records(&disk).len();
    rt.block_on(disk.flush()).unwrap();
    let recs = records(&disk).split_off(n);
    assert_eq!(logged_writes(&recs), vec![]);
    let barrier = recs
        .iter()
        .find(|h| h.kind == Kind::Flush && h.flags & FLAG_IMAGE_SYNCED != 0)
        .expect("an image-synced barrier");
    assert!(barrier.offset >= last, "{barrier:?} covers LSN {last}");
    // Absorbed again after the FLUSH, then cut.
    put(&disk, 12288, vec![0x44; 4096]);
    assert_eq!(disk.extent_ranges(), ranges);
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    let at_cut = model.clone();
    // After the cut the large write's piece is in a cut: overwriting the absorbed bytes
    // saves them first.
    rt.block_on(disk.write(8192, vec![0xEE; 8192], false))
        .unwrap();
    assert!(super::ExtentMap::usage(&map).1 >= 8192, "preimage saved");
    assert!(
        shipped(&disk, cut) == at_cut,
        "the cut ships the absorbed writes as they were"
    );
    rt.block_on(disk.close()).unwrap();
}

/// After a restart the map is loaded from the records: an absorbed write is a deferred piece
/// over part of the large write's again, and the next cut logs it and ships it.
#[test]
fn an_absorbed_write_is_a_deferred_piece_after_a_restart() {
    let f = fixture();
    let rt = rt();
    let disk = open(&f, every_write_deferred());
    warm(&disk);
    inline(&disk, 0, &vec![0x11; BIG as usize]);
    inline(&disk, 4096, &[0x22; 4096]);
    rt.block_on(disk.close()).unwrap();
    let disk = open(&f, every_write_deferred());
    let log = disk.change_log().unwrap();
    let map = super::registered(log.dir()).unwrap();
    assert_eq!(map.synced_bytes(), 4096, "a synced deferred piece");
    let n = records(&disk).len();
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    let recs = records(&disk).split_off(n);
    assert_eq!(logged_writes(&recs), vec![(4096, 4096)]);
    let replica = shipped(&disk, cut);
    let mut want = vec![0x11u8; BIG as usize];
    want[4096..8192].fill(0x22);
    assert!(replica[..BIG as usize] == want[..]);
    map.check_deferred_index().unwrap();
    rt.block_on(disk.close()).unwrap();
}
