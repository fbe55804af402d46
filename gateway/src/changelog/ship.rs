//! Reading the log for shipping: every record a recovery point or a resync decision takes
//! from the log is proven whole first.
//!
//! The replication engine reads segments for two purposes: the records of a cut (the patch of
//! a point) and the chunks written since a point (what a resync must compare). [`read_records`]
//! is the one reader for both. Its rules:
//!
//! * A segment the log lists as sealed must decode up to a valid footer (the CRC32C of every
//!   record, the footer's CRC32C and its seal digest all match); its header
//!   must name this disk, chain, disk size, sequence number and first LSN, and its footer the
//!   record count and last LSN the log holds for it.
//! * Records are taken in LSN order from `after + 1` without a gap; the [`Reach`] says where
//!   they must end.
//! * Anything else — a torn or corrupt record, a header that does not decode, a seal that
//!   does not match, a missing segment, an LSN gap, a cut that ends early — marks the chain
//!   broken, persistently ([`ChangeLog::break_chain`]), and returns
//!   [`LogError::NotHealthy`]. The engine answers a broken chain with a full resync, so
//!   nothing unproven ever becomes part of a published point.
//! * Only a live scan ([`Reach::Live`]) may stop early, at the torn end of a segment that is
//!   still being written (not sealed): that is where concurrent appends are. Its caller scans
//!   the rest again with writes paused ([`Reach::Quiesced`]), which must reach the log's last
//!   LSN.
//! * An I/O error other than a missing file is returned as it is (the engine retries): it
//!   says nothing about the log's content.
//! * An extent record (a large write whose bytes stay in the image) is handed over as the
//!   write it stands for, its bytes read from the image and the preimages saved for its cut
//!   ([`super::extent::ExtentMap::data_of`]); a damaged preimage breaks the chain like a
//!   damaged segment. Its bytes are handed over owned ([`Payload::Owned`], a buffer of the
//!   shippers' pool), so a cut keeps them without a copy; a record's own bytes are lent as a
//!   slice of the segment ([`Payload::Inline`]). A reader that needs only the ranges
//!   written ([`Extents::RangesOnly`]) gets the extent record itself and no image read.

use std::fs;
use std::io;

use bytes::Bytes;

use super::extent;
use super::format::{self, End, Kind, RecordHeader};
use super::log::{check_header, Ctx};
use super::{ChangeLog, LogError, SegmentInfo};

/// How far a read of the log must reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Through this LSN, in sealed segments only (a cut: [`ChangeLog::barrier`] ended the
    /// segments and the reader waits for their seal).
    Through(u64),
    /// As far as the log is written now; writes continue meanwhile, so the segment being
    /// written may end in a partial record (the read stops there).
    Live,
    /// Through the log's last LSN; writes are paused, so every segment must be whole.
    Quiesced,
}

/// What [`read_records`] hands over for an extent record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extents {
    /// The write it stands for, its bytes read from the image and the preimages (a patch).
    Bytes,
    /// The extent record itself with no bytes ([`Payload::Inline`] of an empty slice): for a
    /// reader that needs only the ranges written (the chunks a resync compares), which then
    /// costs no read of the image — a resync's last scan runs with writes paused.
    RangesOnly,
}

/// A record's bytes as [`read_records`] hands them over.
#[derive(Debug)]
pub enum Payload<'a> {
    /// Bytes the record carries, lent from the segment being read.
    Inline(&'a [u8]),
    /// An extent's bytes read from the image, in a buffer the caller may keep.
    Owned(Bytes),
}

impl Payload<'_> {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Inline(b) => b,
            Payload::Owned(b) => b,
        }
    }

    /// As shared bytes: an owned buffer as it is (no copy), lent bytes copied.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Payload::Inline(b) => Bytes::copy_from_slice(b),
            Payload::Owned(b) => b,
        }
    }
}

/// Calls `f` with every record with an LSN above `after`, in LSN order, as far as `reach`
/// says, after proving each segment whole (see the module documentation); extent records as
/// `extents` says. Returns the LSN of the last record read (`after` when there was none).
pub fn read_records(
    log: &ChangeLog,
    after: u64,
    reach: Reach,
    extents: Extents,
    mut f: impl FnMut(&RecordHeader, Payload<'_>) -> Result<(), LogError>,
) -> Result<u64, LogError> {
    let upto = match reach {
        Reach::Through(upto) => {
            log.wait_sealed()?;
            upto
        }
        Reach::Quiesced => {
            log.wait_sealed()?;
            log.last_lsn()
        }
        Reach::Live => u64::MAX,
    };
    let (disk_id, chain_id, disk_size) = log.identity();
    let cx = Ctx {
        dir: log.dir(),
        disk_id,
        chain_id,
        disk_size,
    };
    let mut next = after.saturating_add(1);
    for seg in log.segments() {
        if next > upto || seg.first_lsn > upto {
            break;
        }
        if !seg.sealed && matches!(reach, Reach::Through(_)) {
            // The end check below reports what the sealed segments lack.
            break;
        }
        if seg.last_lsn <= after && seg.sealed {
            continue;
        }
        let bytes = match fs::read(&seg.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(log.break_chain(format!(
                    "segment {} ({}) is missing",
                    seg.seq,
                    seg.path.display()
                )))
            }
            Err(e) => return Err(LogError::io("cannot read", &seg.path)(e)),
        };
        let whole = verify(&cx, &seg, &bytes, reach).map_err(|r| log.break_chain(r))?;
        let d = whole.decoded;
        for r in &d.records {
            let h = &r.header;
            if h.lsn <= after {
                continue;
            }
            if h.lsn > upto {
                break;
            }
            if h.lsn != next {
                return Err(log.break_chain(format!(
                    "segment {} holds LSN {} where LSN {next} was expected (a gap in the chain)",
                    seg.seq, h.lsn
                )));
            }
            if h.kind == Kind::Extent && extents == Extents::Bytes {
                // A deferred write whose bytes its cut has from other records: nothing.
                if let Some((wh, data)) = extent_as_write(log, &seg, h)? {
                    f(&wh, Payload::Owned(data))?;
                }
            } else {
                f(h, Payload::Inline(&bytes[r.data.clone()]))?;
            }
            next += 1;
        }
        if !whole.complete {
            break;
        }
    }
    if !matches!(reach, Reach::Live) && next <= upto {
        return Err(log.break_chain(format!(
            "the change log lacks LSNs {next} to {upto}: a cut must hold every one of them"
        )));
    }
    Ok(next - 1)
}

/// An extent record as the write it stands for: its bytes as of its cut, read from the image
/// and the preimages (see [`super::extent`]); `None` for a deferred write whose cut has its
/// bytes from other records ([`super::extent::ExtentMap::data_of`]). A damaged preimage
/// breaks the chain; other read errors are returned as they are (the engine retries).
fn extent_as_write(
    log: &ChangeLog,
    seg: &SegmentInfo,
    h: &RecordHeader,
) -> Result<Option<(RecordHeader, Bytes)>, LogError> {
    let Some(map) = extent::registered(log.dir()) else {
        return Err(log.break_chain(format!(
            "segment {} holds an extent record (LSN {}) but no image is attached to read it from",
            seg.seq, h.lsn
        )));
    };
    let data = match map.data_of(h) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(log.break_chain(e.to_string()))
        }
        Err(e) => return Err(LogError::io("cannot read an extent of", log.dir())(e)),
    };
    let wh = RecordHeader {
        kind: Kind::Write,
        data_len: data.len() as u32,
        ..*h
    };
    Ok(Some((wh, data)))
}

struct Verified {
    decoded: format::Decoded,
    /// False when a live read found a partial record at the end: later records are not
    /// written yet.
    complete: bool,
}

/// Proves one segment's bytes whole, or says why they are not.
fn verify(cx: &Ctx<'_>, seg: &SegmentInfo, bytes: &[u8], reach: Reach) -> Result<Verified, String> {
    let name = format!("segment {} ({})", seg.seq, seg.path.display());
    let d = format::decode_segment(bytes).map_err(|e| format!("{name}: header: {e}"))?;
    check_header(&d.header, seg.seq, cx)?;
    if d.header.first_lsn != seg.first_lsn {
        return Err(format!(
            "{name} starts at LSN {} but the log has it start at LSN {}",
            d.header.first_lsn, seg.first_lsn
        ));
    }
    let complete = match (&d.end, seg.sealed) {
        (End::Sealed(ft), true) => {
            if ft.record_count != seg.records || ft.last_lsn != seg.last_lsn {
                return Err(format!(
                    "{name}'s seal says {} records up to LSN {}, the log sealed {} up to LSN {}",
                    ft.record_count, ft.last_lsn, seg.records, seg.last_lsn
                ));
            }
            true
        }
        (End::Open, true) => return Err(format!("{name} was sealed but has lost its footer")),
        (End::Torn { reason }, true) => {
            return Err(format!(
                "{name} was sealed but is damaged at byte {}: {reason}",
                d.valid_len
            ))
        }
        (End::Sealed(_) | End::Open, false) => true,
        (End::Torn { .. }, false) if reach == Reach::Live => false,
        (End::Torn { reason }, false) => {
            return Err(format!(
                "{name} is damaged at byte {} although no write is in flight: {reason}",
                d.valid_len
            ))
        }
    };
    Ok(Verified {
        decoded: d,
        complete,
    })
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use super::*;
    use crate::changelog::format::Kind;
    use crate::changelog::log::read_state;
    use crate::changelog::{LogOptions, LogState};

    const SIZE: u64 = 1 << 20;

    fn open(dir: &Path) -> (ChangeLog, File) {
        let img = dir.join("d.img");
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&img)
            .unwrap();
        image.set_len(SIZE).unwrap();
        let opts = LogOptions {
            segment_size: 4096,
            min_free_bytes: 0,
            min_free_percent: 0,
            ..LogOptions::default()
        };
        let (log, _) =
            ChangeLog::open("d", &dir.join("d.hrl"), "disk-id", &image, SIZE, opts).unwrap();
        (log, image)
    }

    /// `n` writes of 1 KiB (four to a segment), applied to the image.
    fn write(log: &ChangeLog, image: &File, n: u64) {
        for i in 0..n {
            let data = vec![i as u8 + 1; 1024];
            let off = (i * 3072) % (SIZE - 1024);
            log.record(Kind::Write, 0, off, 1024, &data, || {
                image.write_all_at(&data, off)
            })
            .unwrap();
        }
    }

    fn all(log: &ChangeLog, after: u64, reach: Reach) -> Result<Vec<u64>, LogError> {
        let mut lsns = Vec::new();
        read_records(log, after, reach, Extents::Bytes, |h, data| {
            assert_eq!(data.as_slice().len() as u64, h.length);
            lsns.push(h.lsn);
            Ok(())
        })?;
        Ok(lsns)
    }

    fn assert_broken(log: &ChangeLog, e: LogError, needle: &str) {
        assert!(
            matches!(&e, LogError::NotHealthy { state: LogState::Broken { reason }, .. } if reason.contains(needle)),
            "expected a broken chain mentioning {needle:?}, got {e}"
        );
        assert_eq!(log.state().label(), "broken");
        // Persistent: the state file says so too.
        let p = read_state(log.dir()).unwrap().unwrap();
        assert_eq!(p.state, crate::changelog::log::ChainHealth::Broken, "{p:?}");
    }

    #[test]
    fn a_cut_yields_every_record_in_order() {
        let t = tempfile::tempdir().unwrap();
        let (log, image) = open(t.path());
        write(&log, &image, 10);
        let upto = log.barrier().unwrap();
        assert_eq!(upto, 11, "ten writes and the barrier");
        assert_eq!(
            all(&log, 0, Reach::Through(upto)).unwrap(),
            (1..=11).collect::<Vec<_>>()
        );
        assert_eq!(all(&log, 4, Reach::Through(7)).unwrap(), vec![5, 6, 7]);
        assert!(log.state().is_healthy());
    }

    #[test]
    fn ranges_only_reads_no_extent_bytes() {
        let t = tempfile::tempdir().unwrap();
        let (log, image) = open(t.path());
        write(&log, &image, 2);
        log.record(Kind::Extent, 0, 8192, 4096, &[], || {
            image.write_all_at(&[9u8; 4096], 8192)
        })
        .unwrap();
        let upto = log.barrier().unwrap();
        // No extent map is attached to this log, so reading an extent's bytes is impossible:
        // the ranges-only read must not try.
        let mut seen = Vec::new();
        let last = read_records(
            &log,
            0,
            Reach::Through(upto),
            Extents::RangesOnly,
            |h, d| {
                seen.push((h.lsn, h.kind, h.offset, h.length, d.as_slice().len()));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(last, upto);
        assert_eq!(seen[2], (3, Kind::Extent, 8192, 4096, 0));
        assert!(log.state().is_healthy());
        // Reading the bytes needs the map: without one the chain breaks (as it must).
        let e = all(&log, 0, Reach::Through(upto)).unwrap_err();
        assert_broken(&log, e, "no image is attached");
    }

    #[test]
    fn every_flipped_byte_of_a_sealed_segment_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (log, image) = open(t.path());
        write(&log, &image, 6);
        let segs = log.take().unwrap();
        assert!(segs.len() >= 2, "{segs:?}");
        let (disk_id, chain_id, disk_size) = log.identity();
        let cx = Ctx {
            dir: log.dir(),
            disk_id,
            chain_id,
            disk_size,
        };
        for seg in &segs {
            let mut b = std::fs::read(&seg.path).unwrap();
            assert!(verify(&cx, seg, &b, Reach::Through(u64::MAX)).is_ok());
            for i in 0..b.len() {
                b[i] ^= 0x20;
                for reach in [Reach::Through(u64::MAX), Reach::Live, Reach::Quiesced] {
                    assert!(
                        verify(&cx, seg, &b, reach).is_err(),
                        "segment {} byte {i} flipped passed as whole ({reach:?})",
                        seg.seq
                    );
                }
                b[i] ^= 0x20;
            }
            // Cut short (a footer lost, a record torn) is refused as well.
            for len in [b.len() - 64, b.len() - 1, b.len() / 2, 10] {
                assert!(
                    verify(&cx, seg, &b[..len], Reach::Live).is_err(),
                    "cut at {len}"
                );
            }
        }
    }

    #[test]
    fn a_damaged_sealed_segment_breaks_the_chain_instead_of_shipping() {
        let t = tempfile::tempdir().unwrap();
        let (log, image) = open(t.path());
        write(&log, &image, 12);
        let upto = log.barrier().unwrap();
        log.wait_sealed().unwrap();
        let segs = log.sealed_segments();
        let mid = &segs[1];
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mid.path)
            .unwrap();
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, 200).unwrap();
        f.write_all_at(&[byte[0] ^ 1], 200).unwrap();
        let e = all(&log, 0, Reach::Through(upto)).unwrap_err();
        assert_broken(&log, e, &format!("segment {}", mid.seq));
        // The engine's next cut is refused too (→ full resync, new chain).
        assert!(matches!(log.barrier(), Err(LogError::NotHealthy { .. })));
        log.reset().unwrap();
        assert!(log.state().is_healthy());
    }

    #[test]
    fn a_missing_segment_or_a_short_cut_breaks_the_chain() {
        let t = tempfile::tempdir().unwrap();
        let (log, image) = open(t.path());
        write(&log, &image, 12);
        let upto = log.barrier().unwrap();
        log.wait_sealed().unwrap();
        std::fs::remove_file(&log.sealed_segments()[1].path).unwrap();
        let e = all(&log, 0, Reach::Through(upto)).unwrap_err();
        assert_broken(&log, e, "is missing");

        let t = tempfile::tempdir().unwrap();
        let (log, image) = open(t.path());
        write(&log, &image, 3);
        // Records not yet cut (still in the active segment) cannot be shipped.
        let e = all(&log, 0, Reach::Through(3)).unwrap_err();
        assert_broken(&log, e, "lacks LSNs 1 to 3");
    }

    #[test]
    fn only_a_live_scan_may_stop_at_a_partial_record() {
        let t = tempfile::tempdir().unwrap();
        let (log, image) = open(t.path());
        write(&log, &image, 7);
        // Seals and the sync they bring are done (a sync writes zeroes ahead of the last
        // record, which would overwrite the partial record below).
        log.wait_sealed().unwrap();
        log.sync().unwrap();
        let active = log.active_segment().unwrap();
        assert!(active.records > 0);
        // A record being written: its header is there, its data not yet.
        let partial = crate::changelog::format::encode_record(
            &RecordHeader {
                lsn: log.last_lsn() + 1,
                kind: Kind::Write,
                flags: 0,
                ahead: 0,
                offset: 0,
                length: 1024,
                data_len: 1024,
            },
            &[9u8; 1024],
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&active.path)
            .unwrap();
        f.write_all_at(&partial[..100], active.bytes).unwrap();
        let live = all(&log, 2, Reach::Live).unwrap();
        assert_eq!(live, (3..=7).collect::<Vec<_>>());
        assert!(log.state().is_healthy());
        let e = all(&log, 2, Reach::Quiesced).unwrap_err();
        assert_broken(&log, e, "no write is in flight");
    }
}
