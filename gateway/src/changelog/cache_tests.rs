//! The log's page cache after its syncs (see `DROP_SPAN` in `log.rs`): a FLUSH loop of small
//! writes leaves in the page cache only the page the records go on filling (and the zeroes
//! ahead), every record reads back whole from the disk, and the segment seals and reopens as
//! before; a sync that made more than the span durable leaves its pages cached, and the next
//! small sync drops only what it made durable itself.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::{self, Kind, RECORD_HEADER_LEN};
use super::{ChangeLog, LogOptions};
use crate::mapped::{map_shared, page_cache_dir, page_size};

const SIZE: u64 = 4 << 20;

fn opts() -> LogOptions {
    LogOptions {
        segment_size: 4 << 20,
        min_free_bytes: 0,
        min_free_percent: 0,
        checkpoint_interval: None,
        ..LogOptions::default()
    }
}

fn open(dir: &Path) -> (File, ChangeLog) {
    let image = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("d.img"))
        .unwrap();
    image.set_len(SIZE).unwrap();
    let (log, _) = ChangeLog::open("d", &dir.join("d.hrl"), "id-1", &image, SIZE, opts()).unwrap();
    (image, log)
}

/// The 4 KiB write number `i`: its bytes.
fn data(i: u64) -> Vec<u8> {
    (0..4096u64).map(|b| (b * 7 + i * 13) as u8).collect()
}

fn write(log: &ChangeLog, image: &File, i: u64) {
    let d = data(i);
    let off = (i * 4096) % SIZE;
    log.record(Kind::Write, 0, off, 4096, &d, || {
        image.write_all_at(&d, off)
    })
    .unwrap();
}

/// For each page of `[0, len)` of `file`: is it in the page cache?
fn resident(file: &File, len: u64) -> Vec<bool> {
    let page = page_size();
    let (base, mlen) = map_shared(file, len, libc::PROT_READ).unwrap();
    let mut vec = vec![0u8; mlen.div_ceil(page)];
    // SAFETY: `base` is the start of a mapping of `mlen` bytes made just above; `vec` has
    // room for one answer per page of it. mincore reads no byte of the mapping.
    let r = unsafe { libc::mincore(base.as_ptr().cast(), mlen, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above; nothing refers to it.
    unsafe { libc::munmap(base.as_ptr().cast(), mlen) };
    assert_eq!(r, 0, "mincore: {err}");
    vec.iter().map(|v| v & 1 == 1).collect()
}

/// The active segment's path and the end of its records.
fn active(log: &ChangeLog) -> (std::path::PathBuf, u64) {
    let a = log.active_segment().unwrap();
    (a.path, a.bytes)
}

#[test]
fn a_flush_loop_of_small_writes_keeps_only_the_tail_page_cached() {
    let Some(dir) = page_cache_dir("a_flush_loop_of_small_writes_keeps_only_the_tail_page_cached")
    else {
        return;
    };
    let (image, log) = open(dir.path());
    let n = 64;
    for i in 0..n {
        write(&log, &image, i);
        log.sync().unwrap();
    }
    let (path, pos) = active(&log);
    assert!(pos > 64 * (4096 + RECORD_HEADER_LEN as u64));
    let page = page_size() as u64;
    let seg = File::open(&path).unwrap();
    let cached = resident(&seg, fs::metadata(&path).unwrap().len());
    let behind = (pos / page) as usize;
    let kept: Vec<usize> = (0..behind).filter(|&p| cached[p]).collect();
    assert!(
        kept.is_empty(),
        "pages behind the records still cached: {kept:?} (of {behind})"
    );
    assert!(
        cached[behind],
        "the tail page was dropped: the next append would read it back"
    );

    // Every record reads back whole, from the disk.
    let d = format::decode_segment(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(d.records.len() as u64, n);
    let bytes = fs::read(&path).unwrap();
    for (i, r) in d.records.iter().enumerate() {
        assert_eq!(r.header.offset, i as u64 * 4096);
        assert_eq!(bytes[r.data.clone()], data(i as u64)[..], "record {i}");
    }

    // It seals and reopens as any log.
    log.close().unwrap();
    drop(log);
    let sealed = format::decode_segment(&fs::read(&path).unwrap()).unwrap();
    assert!(matches!(sealed.end, format::End::Sealed(_)));
    assert_eq!(sealed.records.len() as u64, n);
    let (log, report) =
        ChangeLog::open("d", &dir.path().join("d.hrl"), "id-1", &image, SIZE, opts()).unwrap();
    assert_eq!(report.last_lsn, n);
    assert!(report.cut.is_none(), "{report:?}");
    log.close().unwrap();
}

#[test]
fn a_sync_past_the_drop_span_keeps_its_pages_and_the_next_small_one_drops_its_own() {
    let Some(dir) = page_cache_dir(
        "a_sync_past_the_drop_span_keeps_its_pages_and_the_next_small_one_drops_its_own",
    ) else {
        return;
    };
    let (image, log) = open(dir.path());
    // The first write syncs the log (its extent was cold, see `hot`): a small sync.
    write(&log, &image, 0);
    log.sync().unwrap();
    let page = page_size() as u64;
    let (path, start) = active(&log);
    let start = (start / page) as usize;
    // Then 512 KiB of log in one sync: more than the span.
    for i in 1..128 {
        write(&log, &image, i);
    }
    log.sync().unwrap();
    let (_, big) = active(&log);
    let seg = File::open(&path).unwrap();
    let cached = resident(&seg, fs::metadata(&path).unwrap().len());
    let missing: Vec<usize> = (start..(big / page) as usize)
        .filter(|&p| !cached[p])
        .collect();
    assert!(
        missing.is_empty(),
        "a large sync dropped pages: {missing:?}"
    );

    // A small one drops what it made durable, and no page of the large one.
    write(&log, &image, 128);
    log.sync().unwrap();
    let (_, small) = active(&log);
    let cached = resident(&seg, fs::metadata(&path).unwrap().len());
    let first = (big / page) as usize;
    assert!(
        (start..first).all(|p| cached[p]),
        "the small sync dropped pages of the large one"
    );
    assert!(
        (first..(small / page) as usize).all(|p| !cached[p]),
        "the small sync kept the pages it made durable"
    );
    log.close().unwrap();
}
