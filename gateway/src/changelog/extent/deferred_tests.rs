//! Deferred small writes (see `super::deferred`): what is logged when, what a cut holds, the
//! bound, and recovery's rule for extents after a host crash.

use std::fs;

use crate::changelog::format::{self, Kind, RecordHeader, FLAG_DEFERRED, FLAG_IMAGE_SYNCED};
use crate::changelog::tests::{records, rt};
use crate::changelog::{replay, LogOptions, LogState};
use crate::disk::Disk;
use crate::replication::engine::patch_from_log;

pub(super) const SIZE: u64 = 1 << 20;

pub(super) struct Fixture {
    _t: tempfile::TempDir,
    image: std::path::PathBuf,
    log: std::path::PathBuf,
}

pub(super) fn fixture() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let image = t.path().join("d.img");
    fs::write(&image, vec![0u8; SIZE as usize]).unwrap();
    let log = t.path().join("d.hrl");
    Fixture { _t: t, image, log }
}

/// No background checkpoint: one could cool an extent, and a write into a cold extent syncs
/// the log first (not inline).
pub(super) fn opts() -> LogOptions {
    LogOptions {
        min_free_bytes: 0,
        min_free_percent: 0,
        checkpoint_interval: None,
        ..LogOptions::default()
    }
}

/// [`opts`], with small writes deferred however often FLUSHes come.
pub(super) fn every_write_deferred() -> LogOptions {
    LogOptions {
        flush_heavy_writes: 0,
        ..opts()
    }
}

pub(super) fn open(f: &Fixture, o: LogOptions) -> Disk {
    let (d, report) = Disk::open_tracked("d", &f.image, &f.log, "disk-id", o).unwrap();
    assert_eq!(report.state, LogState::Healthy);
    d
}

/// Heats the disk's extent (a first write into a cold extent syncs the log first, so it is
/// not taken inline) with a write to its last 4 KiB; returns the records logged by then.
pub(super) fn warm(disk: &Disk) -> usize {
    rt().block_on(disk.write(SIZE - 4096, vec![0xAA; 4096], true))
        .unwrap();
    records(disk).len()
}

pub(super) fn inline(disk: &Disk, offset: u64, data: &[u8]) {
    let r = disk.write_now(offset, data, false);
    assert!(r.is_some_and(|r| r.is_ok()), "taken inline at {offset}");
}

pub(super) fn deferred(h: &RecordHeader) -> bool {
    h.kind == Kind::Extent && h.flags & FLAG_DEFERRED != 0
}

/// The disk's bytes as its first cut (`cut`, from LSN 0) ships them onto zeroes.
pub(super) fn shipped(disk: &Disk, cut: u64) -> Vec<u8> {
    let log = disk.change_log().unwrap();
    let mut replica = vec![0u8; SIZE as usize];
    patch_from_log(&log, 0, cut, SIZE)
        .unwrap()
        .apply(0, &mut replica)
        .unwrap();
    replica
}

#[test]
fn a_flush_logs_the_bytes_of_deferred_writes_once() {
    let f = fixture();
    let rt = rt();
    let disk = open(&f, opts());
    let map = super::registered(disk.change_log().unwrap().dir()).unwrap();
    let n = warm(&disk);
    inline(&disk, 0, &[1u8; 4096]);
    inline(&disk, 0, &[2u8; 4096]);
    inline(&disk, 4096, &[3u8; 4096]);
    let recs = records(&disk).split_off(n);
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(deferred), "{recs:?}");
    assert_eq!(map.deferred_bytes(), 8192);
    map.check_deferred_index().unwrap();
    rt.block_on(disk.flush()).unwrap();
    assert_eq!(map.deferred_bytes(), 0);
    map.check_deferred_index().unwrap();
    // One record for the two adjacent pieces, holding the last bytes of each.
    let log = disk.change_log().unwrap();
    let seg = log.segments().pop().unwrap();
    let d = format::decode_segment(&fs::read(&seg.path).unwrap()).unwrap();
    let writes: Vec<_> = d
        .records
        .iter()
        .filter(|r| r.header.kind == Kind::Write && r.header.offset < SIZE - 4096)
        .collect();
    assert_eq!(writes.len(), 1);
    let w = writes[0];
    assert_eq!((w.header.offset, w.header.length), (0, 8192));
    let bytes = &fs::read(&seg.path).unwrap()[w.data.clone()];
    assert!(bytes[..4096].iter().all(|&b| b == 2) && bytes[4096..].iter().all(|&b| b == 3));
    // Nothing is left to log: the next FLUSH appends only its barrier.
    let n = records(&disk).len();
    rt.block_on(disk.flush()).unwrap();
    assert_eq!(records(&disk).len(), n + 1);
    rt.block_on(disk.close()).unwrap();
}

#[test]
fn frequent_flushes_have_small_writes_logged_with_their_data() {
    let f = fixture();
    let rt = rt();
    let disk = open(&f, opts());
    let map = super::registered(disk.change_log().unwrap().dir()).unwrap();
    let heavy = opts().flush_heavy_writes as u64;
    assert!(heavy >= 2, "the default logs writes with their data");
    let n = warm(&disk);
    // No FLUSH yet: deferred.
    inline(&disk, 0, &[1; 4096]);
    assert!(deferred(&records(&disk)[n]));
    rt.block_on(disk.flush()).unwrap();
    // The FLUSH followed one small write: the next ones carry their data, and the FLUSH
    // after them appends only its barrier (nothing to copy from the image).
    let n = records(&disk).len();
    inline(&disk, 4096, &[2; 4096]);
    inline(&disk, 8192, &[3; 4096]);
    assert_eq!(map.deferred_bytes(), 0);
    rt.block_on(disk.flush()).unwrap();
    let recs = records(&disk).split_off(n);
    let kinds: Vec<Kind> = recs.iter().map(|h| h.kind).collect();
    assert_eq!(
        kinds,
        vec![Kind::Write, Kind::Write, Kind::Flush],
        "{recs:?}"
    );
    assert_eq!(logged_writes(&recs), vec![(4096, 4096), (8192, 4096)]);
    // More small writes than that before a FLUSH: those past the count are deferred again
    // at once, and so are the writes after that FLUSH.
    let n = records(&disk).len();
    for i in 0..=heavy {
        inline(&disk, 16384 + i * 4096, &[4; 4096]);
    }
    let recs = records(&disk).split_off(n);
    assert_eq!(recs.iter().filter(|h| deferred(h)).count(), 1, "{recs:?}");
    assert!(deferred(recs.last().unwrap()), "{recs:?}");
    rt.block_on(disk.flush()).unwrap();
    let n = records(&disk).len();
    inline(&disk, 0, &[5; 4096]);
    assert!(deferred(&records(&disk)[n]));
    assert_eq!(map.deferred_bytes(), 4096);
    map.check_deferred_index().unwrap();
    // Whichever way they were logged, a cut ships the image as it is.
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    let replica = shipped(&disk, cut);
    assert!(
        replica == fs::read(&f.image).unwrap(),
        "the log holds every write"
    );
    rt.block_on(disk.close()).unwrap();
}

#[test]
fn a_cut_holds_no_deferred_write_and_ships_exactly() {
    let f = fixture();
    let rt = rt();
    let disk = open(&f, opts());
    let map = super::registered(disk.change_log().unwrap().dir()).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    warm(&disk);
    model[(SIZE - 4096) as usize..].fill(0xAA);
    for i in 0..16u64 {
        let data = vec![i as u8 + 1; 4096];
        let off = (i * 7 % 16) * 8192;
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
        inline(&disk, off, &data);
    }
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    assert_eq!(
        map.deferred_bytes(),
        0,
        "the cut logged every deferred write"
    );
    let at_cut = model.clone();
    // Overwrites after the cut are deferred again and save no preimage: nothing of the cut
    // is left in the image only.
    for i in 0..16u64 {
        let off = (i * 7 % 16) * 8192;
        inline(&disk, off, &[0xEE; 4096]);
    }
    assert_eq!(super::ExtentMap::usage(&map).1, 0, "no preimage saved");
    let replica = shipped(&disk, cut);
    assert!(replica == at_cut, "the cut ships the writes as they were");
    rt.block_on(disk.close()).unwrap();
}

/// The write records a pass logged (not the warm-up's block), as (offset, length).
pub(super) fn logged_writes(recs: &[RecordHeader]) -> Vec<(u64, u64)> {
    recs.iter()
        .filter(|h| h.kind == Kind::Write && h.offset < SIZE - 4096)
        .map(|h| (h.offset, h.length))
        .collect()
}

#[test]
fn synced_pieces_are_skipped_by_a_flush_and_logged_by_a_cut() {
    let f = fixture();
    let rt = rt();
    // FLUSHes after a few writes each would have the writes after them logged with their
    // data (see `frequent_flushes_have_small_writes_logged_with_their_data`).
    let disk = open(&f, every_write_deferred());
    let log = disk.change_log().unwrap();
    let map = super::registered(log.dir()).unwrap();
    warm(&disk);
    for off in [0, 4096, 16384] {
        inline(&disk, off, &[off as u8 + 1; 4096]);
    }
    assert_eq!(map.deferred_bytes(), 12288);
    // A checkpoint records a redo point past them: their bytes are durable in the image.
    let c = log.checkpoint().unwrap();
    assert_eq!(log.image_trusted(), (log.chain_id(), c));
    let n = records(&disk).len();
    rt.block_on(disk.flush()).unwrap();
    let recs = records(&disk).split_off(n);
    assert_eq!(logged_writes(&recs), vec![], "the FLUSH copied nothing");
    assert_eq!((map.deferred_bytes(), map.synced_bytes()), (0, 12288));
    map.check_deferred_index().unwrap();
    // The same block written again is live again; only it is logged by the next FLUSH.
    // (The checkpoint cooled the extent: warm it again so that the write is taken inline.)
    warm(&disk);
    inline(&disk, 4096, &[0x77; 4096]);
    assert_eq!((map.deferred_bytes(), map.synced_bytes()), (4096, 8192));
    map.check_deferred_index().unwrap();
    let n = records(&disk).len();
    rt.block_on(disk.flush()).unwrap();
    let recs = records(&disk).split_off(n);
    assert_eq!(logged_writes(&recs), vec![(4096, 4096)]);
    assert_eq!((map.deferred_bytes(), map.synced_bytes()), (0, 8192));
    // A cut logs the synced ones: it holds no deferred piece.
    let n = records(&disk).len();
    Disk::cut(std::slice::from_ref(&disk)).unwrap();
    let recs = records(&disk).split_off(n);
    assert_eq!(logged_writes(&recs), vec![(0, 4096), (16384, 4096)]);
    assert_eq!((map.deferred_bytes(), map.synced_bytes()), (0, 0));
    map.check_deferred_index().unwrap();
    rt.block_on(disk.close()).unwrap();
}

#[test]
fn a_flush_facing_many_deferred_bytes_syncs_the_image_instead() {
    let f = fixture();
    let rt = rt();
    let disk = open(
        &f,
        LogOptions {
            image_flush_min: 8192,
            ..every_write_deferred()
        },
    );
    let log = disk.change_log().unwrap();
    let map = super::registered(log.dir()).unwrap();
    warm(&disk);
    // Below the threshold: logged as before.
    inline(&disk, 0, &[1; 4096]);
    let n = records(&disk).len();
    rt.block_on(disk.flush()).unwrap();
    assert_eq!(logged_writes(&records(&disk).split_off(n)), vec![(0, 4096)]);
    // At it: the image is synced, a barrier says through which LSN, nothing is copied.
    for off in [8192, 12288, 20480] {
        inline(&disk, off, &[2; 4096]);
    }
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
    // The next FLUSH finds them synced and copies nothing either.
    let n = records(&disk).len();
    rt.block_on(disk.flush()).unwrap();
    assert_eq!(logged_writes(&records(&disk).split_off(n)), vec![]);
    assert_eq!((map.deferred_bytes(), map.synced_bytes()), (0, 12288));
    map.check_deferred_index().unwrap();
    rt.block_on(disk.close()).unwrap();
}

/// After a restart, clean or after a process crash, the map knows where the last cut was
/// (the state file records it): a plain extent of the cut still saves its bytes before an
/// overwrite, the deferred writes after the cut are deferred pieces again (synced: recovery
/// synced the image and recorded it), so overwriting them saves nothing, and the next cut
/// logs their bytes. Both cuts ship as the disk was at them.
#[test]
fn a_reopened_map_knows_the_last_cut() {
    for clean in [true, false] {
        let f = fixture();
        let rt = rt();
        let disk = open(&f, opts());
        let mut model = vec![0u8; SIZE as usize];
        let put = |model: &mut Vec<u8>, off: u64, data: &[u8]| {
            model[off as usize..off as usize + data.len()].copy_from_slice(data);
        };
        warm(&disk);
        put(&mut model, SIZE - 4096, &[0xAA; 4096]);
        inline(&disk, 0, &[1; 4096]);
        put(&mut model, 0, &[1; 4096]);
        // A plain extent (the default extent_min is 64 KiB).
        rt.block_on(disk.write(65536, vec![2; 65536], false))
            .unwrap();
        put(&mut model, 65536, &[2; 65536]);
        let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
        let at_cut = model.clone();
        warm(&disk);
        for off in [8192, 16384] {
            inline(&disk, off, &[3; 4096]);
            put(&mut model, off, &[3; 4096]);
        }
        let log = disk.change_log().unwrap().clone();
        assert_eq!(log.last_cut(), cut);
        if clean {
            rt.block_on(disk.close()).unwrap();
        } else {
            // A process crash: nothing closed, the files as they are.
            log.wait_sealed().unwrap();
        }
        drop((log, disk));
        let disk = open(&f, opts());
        let log = disk.change_log().unwrap().clone();
        assert_eq!(log.last_cut(), cut, "clean {clean}");
        let map = super::registered(log.dir()).unwrap();
        map.check_deferred_index().unwrap();
        assert_eq!(map.deferred_bytes(), 0, "clean {clean}: nothing live");
        assert!(
            map.synced_bytes() >= 8192,
            "clean {clean}: the writes after the cut are synced pieces: {}",
            map.synced_bytes()
        );
        // Overwrites of the deferred writes after the cut save nothing; one of the cut's
        // extent saves its bytes.
        rt.block_on(disk.write(8192, vec![4; 4096], false)).unwrap();
        put(&mut model, 8192, &[4; 4096]);
        assert_eq!(
            map.usage().1,
            0,
            "clean {clean}: no preimage for a piece after the cut"
        );
        rt.block_on(disk.write(65536, vec![5; 4096], false))
            .unwrap();
        put(&mut model, 65536, &[5; 4096]);
        assert_eq!(
            map.usage().1,
            4096,
            "clean {clean}: the cut's extent saved its bytes"
        );
        map.check_deferred_index().unwrap();
        let cut2 = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
        assert_eq!(
            (map.deferred_bytes(), map.synced_bytes()),
            (0, 0),
            "clean {clean}: the second cut logged them"
        );
        let mut replica = vec![0u8; SIZE as usize];
        for (from, to, want) in [(0, cut, &at_cut), (cut, cut2, &model)] {
            patch_from_log(&log, from, to, SIZE)
                .unwrap()
                .apply(0, &mut replica)
                .unwrap();
            assert!(
                replica == *want,
                "clean {clean}: the cut at {to} ships as the disk was"
            );
        }
        rt.block_on(disk.close()).unwrap();
    }
}

/// Rewrites the log's state file with `last_cut_lsn` set to `lsn`, or without it (as older
/// builds wrote it); returns its path.
fn set_last_cut(f: &Fixture, lsn: Option<u64>) -> std::path::PathBuf {
    let state = f.log.join(crate::changelog::log::STATE_FILE);
    let text = fs::read_to_string(&state).unwrap();
    assert!(text.contains("last_cut_lsn"), "{text}");
    let edited: String = text
        .lines()
        .filter_map(|l| match (l.starts_with("last_cut_lsn"), lsn) {
            (false, _) => Some(format!("{l}\n")),
            (true, Some(n)) => Some(format!("last_cut_lsn = {n}\n")),
            (true, None) => None,
        })
        .collect();
    fs::write(&state, edited).unwrap();
    state
}

/// A state file written by a build that did not record cuts: every extent of the log counts
/// as cut after the restart (the rule those builds followed), so an overwrite saves its
/// bytes; the next cut is recorded.
#[test]
fn a_state_file_without_the_last_cut_counts_every_extent_as_cut() {
    let f = fixture();
    let rt = rt();
    let disk = open(&f, opts());
    warm(&disk);
    inline(&disk, 0, &[1; 4096]);
    let last = disk.change_log().unwrap().last_lsn();
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    let state = set_last_cut(&f, None);
    let disk = open(&f, opts());
    let log = disk.change_log().unwrap().clone();
    assert_eq!(log.last_cut(), last, "every record kept counts as cut");
    let map = super::registered(log.dir()).unwrap();
    assert_eq!((map.deferred_bytes(), map.synced_bytes()), (0, 0));
    rt.block_on(disk.write(0, vec![2; 4096], false)).unwrap();
    assert_eq!(
        map.usage().1,
        4096,
        "the extent of the old log saved its bytes"
    );
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    assert!(fs::read_to_string(&state)
        .unwrap()
        .contains(&format!("last_cut_lsn = {cut}")));
    rt.block_on(disk.close()).unwrap();
}

#[test]
fn the_bound_and_extent_min_off_log_bytes_with_the_write() {
    let f = fixture();
    let disk = open(
        &f,
        LogOptions {
            defer_max: 8192,
            ..opts()
        },
    );
    let n = warm(&disk);
    for i in 0..3u64 {
        inline(&disk, i * 8192, &[9u8; 4096]);
    }
    let recs = records(&disk).split_off(n);
    assert!(deferred(&recs[0]) && deferred(&recs[1]));
    assert_eq!(
        recs[2].kind,
        Kind::Write,
        "past the bound: logged with its data"
    );
    rt().block_on(disk.close()).unwrap();
    drop(disk);
    let g = fixture();
    let disk = open(
        &g,
        LogOptions {
            extent_min: u64::MAX,
            ..opts()
        },
    );
    let n = warm(&disk);
    inline(&disk, 0, &[9u8; 4096]);
    assert_eq!(
        records(&disk)[n].kind,
        Kind::Write,
        "a log that replays onto a base"
    );
    rt().block_on(disk.close()).unwrap();
}

#[test]
fn the_piece_bound_logs_bytes_with_the_write_until_a_flush() {
    let f = fixture();
    let disk = open(&f, every_write_deferred());
    let map = crate::changelog::extent::registered(&f.log).unwrap();
    map.set_pieces_max(2);
    let n = warm(&disk);
    for i in 0..3u64 {
        inline(&disk, i * 8192, &[7u8; 4096]);
    }
    // The same block again: its piece is renumbered, no new piece.
    inline(&disk, 0, &[8u8; 4096]);
    let kinds: Vec<bool> = records(&disk)[n..].iter().map(deferred).collect();
    assert_eq!(
        kinds,
        [true, true, false, true],
        "deferred while under 2 pieces"
    );
    assert_eq!(
        records(&disk)[n + 2].kind,
        Kind::Write,
        "logged with its data"
    );
    assert_eq!(map.deferred_bytes(), 8192);
    // A FLUSH logs the deferred pieces: room again.
    rt().block_on(disk.flush()).unwrap();
    assert_eq!(map.deferred_bytes(), 0);
    let m = records(&disk).len();
    inline(&disk, 3 * 8192, &[9u8; 4096]);
    assert!(
        deferred(&records(&disk)[m]),
        "deferred again after the FLUSH"
    );
    map.check_deferred_index().unwrap();
    // What was written reads back.
    let rt = rt();
    assert_eq!(rt.block_on(disk.read(0, 4096)).unwrap(), vec![8u8; 4096]);
    assert_eq!(rt.block_on(disk.read(8192, 4096)).unwrap(), vec![7u8; 4096]);
    assert_eq!(
        rt.block_on(disk.read(3 * 8192, 4096)).unwrap(),
        vec![9u8; 4096]
    );
    rt.block_on(disk.close()).unwrap();
}

/// An open segment written record by record (LSNs from 1).
struct SegmentWriter {
    path: std::path::PathBuf,
    bytes: Vec<u8>,
    lsn: u64,
}

impl SegmentWriter {
    fn new(path: &std::path::Path) -> Self {
        let h = format::SegmentHeader {
            disk_id: [0; 16],
            chain_id: 1,
            seq: 0,
            first_lsn: 1,
            disk_size: 4096,
        };
        let w = SegmentWriter {
            path: path.to_path_buf(),
            bytes: format::encode_header(&h).to_vec(),
            lsn: 1,
        };
        fs::write(&w.path, &w.bytes).unwrap();
        w
    }

    fn push(&mut self, kind: Kind, flags: u8, offset: u64, length: u64, data: &[u8]) {
        let h = RecordHeader {
            lsn: self.lsn,
            kind,
            flags,
            ahead: 0,
            offset,
            length,
            data_len: data.len() as u32,
        };
        self.lsn += 1;
        self.bytes.extend(format::encode_record(&h, data));
        fs::write(&self.path, &self.bytes).unwrap();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.push(Kind::Write, 0, offset, data.len() as u64, data);
    }

    fn extent(&mut self, offset: u64, length: u64) {
        self.push(Kind::Extent, 0, offset, length, &[]);
    }

    fn barrier(&mut self, flags: u8, offset: u64) {
        self.push(Kind::Flush, flags, offset, 0, &[]);
    }
}

/// Recovery after a host crash: an extent newer than the last image sync it knows of
/// supersedes nothing (its bytes may be lost), one covered by an image-synced barrier does.
#[test]
fn host_crash_redo_trusts_extents_only_up_to_an_image_sync() {
    let t = tempfile::tempdir().unwrap();
    let seg = t.path().join("0.log");
    let mut w = SegmentWriter::new(&seg);
    w.write(0, &[5u8; 512]); // LSN 1: durable through the log
    w.extent(0, 512); // LSN 2: bytes in the image only
    let image = t.path().join("img");
    fs::write(&image, vec![0u8; 4096]).unwrap();
    let img = fs::OpenOptions::new().write(true).open(&image).unwrap();
    replay::replay_after_host_crash(std::slice::from_ref(&seg), &img, 0).unwrap();
    assert!(
        fs::read(&image).unwrap()[..512].iter().all(|&b| b == 5),
        "the write is redone"
    );
    // With a barrier saying the image was synced after LSN 2, the extent's bytes are trusted.
    fs::write(&image, vec![0u8; 4096]).unwrap();
    w.barrier(FLAG_IMAGE_SYNCED, 2); // LSN 3
    replay::replay_after_host_crash(std::slice::from_ref(&seg), &img, 0).unwrap();
    assert!(
        fs::read(&image).unwrap()[..512].iter().all(|&b| b == 0),
        "the extent wins"
    );
    // A process crash keeps the page cache: the extent always wins.
    let mut w2 = SegmentWriter::new(&seg);
    w2.write(0, &[5u8; 512]);
    w2.extent(0, 512);
    replay::replay_after(std::slice::from_ref(&seg), &img, 0).unwrap();
    assert!(fs::read(&image).unwrap()[..512].iter().all(|&b| b == 0));
}

/// A state file naming a cut past the log's end (a host crash lost the barrier with the log's
/// unsynced tail, the state file was synced): the cut is taken back to the end, so the LSNs
/// given out again belong to no cut, and a deferred write after the restart is logged by the
/// next FLUSH as any other.
#[test]
fn a_recorded_cut_past_the_end_of_the_log_is_taken_back_to_it() {
    let f = fixture();
    let rt = rt();
    let disk = open(&f, opts());
    warm(&disk);
    let last = disk.change_log().unwrap().last_lsn();
    rt.block_on(disk.close()).unwrap();
    drop(disk);
    set_last_cut(&f, Some(last + 100));
    let disk = open(&f, opts());
    let log = disk.change_log().unwrap().clone();
    assert_eq!(log.last_cut(), log.last_lsn(), "taken back to the end");
    let map = super::registered(log.dir()).unwrap();
    warm(&disk);
    let n = records(&disk).len();
    inline(&disk, 0, &[7; 4096]);
    assert_eq!(map.deferred_bytes(), 4096, "a live deferred write");
    map.check_deferred_index().unwrap();
    rt.block_on(disk.flush()).unwrap();
    assert_eq!(
        logged_writes(&records(&disk).split_off(n)),
        vec![(0, 4096)],
        "the FLUSH logged it"
    );
    rt.block_on(disk.close()).unwrap();
}

/// Small writes the disk's writer thread takes (here one batch, held together as the
/// simulation holds its bursts) are deferred as inline ones are: 40-byte records, their
/// pieces in the map, their bytes logged once by the next FLUSH. One over a piece of a cut
/// is logged with its data, after the piece's bytes were saved: the cut still ships them.
#[test]
fn the_writer_thread_defers_small_writes_too() {
    let f = fixture();
    let rt = rt();
    let disk = open(&f, every_write_deferred());
    let map = super::registered(disk.change_log().unwrap().dir()).unwrap();
    warm(&disk);
    // A large write (an extent: its bytes stay in the image), then a cut that holds it.
    rt.block_on(disk.write(65536, vec![9u8; 65536], false))
        .unwrap();
    let cut = Disk::cut(std::slice::from_ref(&disk)).unwrap()[0];
    let n = records(&disk).len();
    let batches = crate::disk::MULTI_WRITE_BATCHES.load(std::sync::atomic::Ordering::Relaxed);
    let results = rt.block_on(async {
        let hold = disk.hold_writer();
        let writes = futures::future::join3(
            disk.write(0, vec![1u8; 4096], false),
            disk.write(4096, vec![2u8; 4096], false),
            disk.write(65536, vec![3u8; 4096], false),
        );
        // `join` polls the three writes (each queues itself) before it lets the thread go.
        futures::future::join(writes, async move { drop(hold) })
            .await
            .0
    });
    results.0.unwrap();
    results.1.unwrap();
    results.2.unwrap();
    assert!(
        crate::disk::MULTI_WRITE_BATCHES.load(std::sync::atomic::Ordering::Relaxed) > batches,
        "the three writes were one batch"
    );
    let recs = records(&disk).split_off(n);
    assert_eq!(recs.len(), 3, "{recs:?}");
    assert!(deferred(&recs[0]) && deferred(&recs[1]), "{recs:?}");
    assert_eq!(
        (recs[2].kind, recs[2].offset, recs[2].length),
        (Kind::Write, 65536, 4096),
        "over a piece of the cut: logged with its data"
    );
    assert_eq!(map.deferred_bytes(), 8192);
    map.check_deferred_index().unwrap();
    // The FLUSH logs the two deferred writes' bytes as one record.
    let n = records(&disk).len();
    rt.block_on(disk.flush()).unwrap();
    assert_eq!(logged_writes(&records(&disk).split_off(n)), vec![(0, 8192)]);
    assert_eq!(map.deferred_bytes(), 0);
    // The cut ships the extent's bytes of the cut, not the later write's.
    let replica = shipped(&disk, cut);
    assert!(replica[65536..131072].iter().all(|&b| b == 9));
    // The image holds every write of the batch.
    let image = fs::read(&f.image).unwrap();
    assert!(image[..4096].iter().all(|&b| b == 1) && image[4096..8192].iter().all(|&b| b == 2));
    assert!(image[65536..69632].iter().all(|&b| b == 3));
    rt.block_on(disk.close()).unwrap();
}

/// One backlog rule for a deferred write, whichever path logged it: inline, in a batch of
/// the writer thread, or the slow path's `append`; and a reopened log counts it the same.
/// Each stands for its bytes (40 + its length), so writes waiting for a FLUSH show in the
/// backlog; the FLUSH's record of their bytes adds them again (see
/// `RecordHeader::backlog_extra`).
#[test]
fn every_path_counts_a_deferred_write_in_the_backlog_the_same() {
    let f = fixture();
    let rt = rt();
    let disk = open(&f, every_write_deferred());
    let log = disk.change_log().unwrap().clone();
    warm(&disk);
    let before = log.unshipped_bytes();
    let n = records(&disk).len();
    inline(&disk, 0, &[1u8; 4096]);
    assert_eq!(log.unshipped_bytes(), before + 40 + 4096, "inline");
    let results = rt.block_on(async {
        let hold = disk.hold_writer();
        let writes = futures::future::join(
            disk.write(8192, vec![2u8; 4096], false),
            disk.write(16384, vec![3u8; 512], false),
        );
        futures::future::join(writes, async move { drop(hold) })
            .await
            .0
    });
    results.0.unwrap();
    results.1.unwrap();
    let recs = records(&disk).split_off(n);
    assert_eq!(recs.len(), 3, "{recs:?}");
    assert!(recs.iter().all(deferred), "{recs:?}");
    let waiting = before + 3 * 40 + 4096 + 4096 + 512;
    assert_eq!(log.unshipped_bytes(), waiting, "writer thread");
    // The FLUSH logs their bytes as three write records (the ranges are not adjacent) and
    // appends its barrier; each counts its bytes in the log.
    rt.block_on(disk.flush()).unwrap();
    let flushed = log.unshipped_bytes();
    assert_eq!(flushed, waiting + 3 * 40 + 4096 + 4096 + 512 + 40);
    // Sealed and reopened: the same count from the records on disk.
    let sealed = log.take().unwrap();
    let extent_bytes: u64 = sealed.iter().map(|s| s.extent_bytes).sum();
    assert_eq!(extent_bytes, 4096 + 4096 + 512);
    rt.block_on(disk.close()).unwrap();
    drop((disk, log));
    let disk = open(&f, every_write_deferred());
    let again: u64 = disk
        .change_log()
        .unwrap()
        .sealed_segments()
        .iter()
        .map(|s| s.extent_bytes)
        .sum();
    assert_eq!(again, extent_bytes, "recounted at open");
    rt.block_on(disk.close()).unwrap();
}
