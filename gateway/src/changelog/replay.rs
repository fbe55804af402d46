//! Applying change-log records to an image: recovery's redo, tests, `standby log replay`.
//!
//! Replay gives the image every record's change in LSN order (last writer wins per byte);
//! records whose data is in the image (image-dependent, see [`image_dependent`]) apply nothing
//! and win over earlier records in their range.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self, End, Kind, RecordHeader, FLAG_IMAGE_SYNCED, FLAG_MAY_TRIM};
use super::LogError;
use crate::disk::{punch_hole, write_zero_buffers, zero_range};

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    pub segments: usize,
    /// Records applied (flush barriers included).
    pub records: u64,
    pub bytes_written: u64,
    pub first_lsn: Option<u64>,
    pub last_lsn: Option<u64>,
}

/// Applies one record to an image. Trim and write-zeroes leave the range reading as zeroes.
pub fn apply_record(image: &File, h: &RecordHeader, data: &[u8]) -> io::Result<()> {
    match h.kind {
        Kind::Write => image.write_all_at(data, h.offset),
        Kind::Trim => {
            if punch_hole(image, h.offset, h.length).is_err() {
                write_zero_buffers(image, h.offset, h.length)?;
            }
            Ok(())
        }
        Kind::WriteZeroes => {
            let done = (h.flags & FLAG_MAY_TRIM != 0
                && punch_hole(image, h.offset, h.length).is_ok())
                || zero_range(image, h.offset, h.length).is_ok();
            if !done {
                write_zero_buffers(image, h.offset, h.length)?;
            }
            Ok(())
        }
        // An extent's bytes are in the image already (see `super::extent`).
        Kind::Flush | Kind::Extent => Ok(()),
    }
}

/// Whether a record's data lives in the image rather than in the log (*image-dependent*).
///
/// Such a record (the extent kind, [`super::extent`]: "these bytes were written to the image
/// only") applies nothing at replay, and supersedes the data of every earlier record in its
/// range: the image holds the newer bytes there. The log's append path calls
/// [`super::ChangeLog::note_image_dependent`] for it, so the next sync round syncs the image.
pub fn image_dependent(h: &RecordHeader) -> bool {
    match h.kind {
        Kind::Extent => true,
        Kind::Write | Kind::Trim | Kind::WriteZeroes | Kind::Flush => false,
    }
}

/// Replays `segments` (in order) onto `image`, skipping records with an LSN `<= after_lsn`.
///
/// Every segment must decode; a sealed one must match its footer hash; the last one may be
/// the active segment (no footer), in which case it is replayed up to its last whole record.
/// LSNs must be contiguous across segments. The image is not synced.
///
/// The result is the same as applying every record in LSN order; it is computed backwards
/// (newest record first), writing only the parts of each record that no later record
/// covers. That is how an image-dependent record ([`image_dependent`]) supersedes earlier
/// data in its range while applying nothing itself, and no byte is written twice.
pub fn replay_after(
    segments: &[PathBuf],
    image: &File,
    after_lsn: u64,
) -> Result<ReplayStats, LogError> {
    replay_after_with(segments, image, after_lsn, &image_dependent)
}

/// Recovery's redo after a *host* crash: as [`replay_after`], except that an extent newer
/// than the last image sync the log knows of — the checkpoint (`after_lsn`) or a sync round's
/// [`FLAG_IMAGE_SYNCED`] barrier — counts as not image-dependent: it applies nothing and
/// supersedes nothing, so earlier records are applied in its range.
///
/// **Why.** An extent's bytes are in the image only, and a host crash may have lost those
/// not yet synced, while its record survived (a later log sync made it durable). Letting it
/// supersede an earlier record — a write made durable by a FLUSH through the log alone —
/// would leave the image's old bytes there and lose that write. Applied instead, the earlier
/// bytes are what the image holds afterwards, and the extent ("the image's bytes") still
/// describes them; the extent's own write was not flushed (a FLUSH after it would have synced
/// the image and left a barrier, or — for a deferred write — logged its bytes), so losing it
/// is what the NBD contract allows. After a process crash the page cache kept every byte, and
/// [`replay_after`]'s rule holds.
pub fn replay_after_host_crash(
    segments: &[PathBuf],
    image: &File,
    after_lsn: u64,
) -> Result<ReplayStats, LogError> {
    let mut synced = after_lsn;
    for (i, path) in segments.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(LogError::io("cannot read segment", path))?;
        let d = check_segment(path, &bytes, i + 1 == segments.len())?;
        for r in &d.records {
            let h = &r.header;
            if h.kind == Kind::Flush && h.flags & FLAG_IMAGE_SYNCED != 0 && h.offset < h.lsn {
                synced = synced.max(h.offset);
            }
        }
    }
    replay_after_with(segments, image, after_lsn, &|h| {
        image_dependent(h) && h.lsn <= synced
    })
}

/// [`replay_after`] with the test of image-dependence given (tests mark records with it).
pub fn replay_after_with(
    segments: &[PathBuf],
    image: &File,
    after_lsn: u64,
    is_image_dependent: &dyn Fn(&RecordHeader) -> bool,
) -> Result<ReplayStats, LogError> {
    // First pass: every segment decodes and the chain is contiguous (nothing is applied
    // from a chain with a gap). Only the headers' LSNs are kept.
    let mut spans: Vec<(u64, u64)> = Vec::with_capacity(segments.len());
    let mut expected: Option<u64> = None;
    for (i, path) in segments.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(LogError::io("cannot read segment", path))?;
        let d = check_segment(path, &bytes, i + 1 == segments.len())?;
        if let Some(e) = expected {
            if d.header.first_lsn != e {
                return Err(corrupt(
                    path,
                    format!(
                        "starts at LSN {} but LSN {e} was expected (gap)",
                        d.header.first_lsn
                    ),
                ));
            }
        }
        expected = Some(d.last_lsn().wrapping_add(1));
        spans.push((d.header.first_lsn, d.last_lsn()));
    }
    // Second pass, newest segment first: apply what no later record covers.
    let mut stats = ReplayStats::default();
    let mut covered = Covered::default();
    for (i, path) in segments.iter().enumerate().rev() {
        if spans[i].1 <= after_lsn {
            break;
        }
        let bytes = std::fs::read(path).map_err(LogError::io("cannot read segment", path))?;
        let d = check_segment(path, &bytes, i + 1 == segments.len())?;
        if (d.header.first_lsn, d.last_lsn()) != spans[i] {
            return Err(corrupt(path, "changed while it was replayed".into()));
        }
        for r in d.records.iter().rev() {
            let h = &r.header;
            if h.lsn <= after_lsn {
                break;
            }
            stats.records += 1;
            stats.first_lsn = Some(h.lsn);
            stats.last_lsn.get_or_insert(h.lsn);
            if h.kind == Kind::Flush || h.length == 0 {
                continue;
            }
            if h.kind == Kind::Extent && !is_image_dependent(h) {
                // An extent whose bytes the image may have lost (a host crash before the
                // image was synced): it neither applies nor supersedes anything, so the
                // earlier records' bytes are applied there (see `after_host_crash`).
                continue;
            }
            let end = h.offset.saturating_add(h.length);
            if !is_image_dependent(h) {
                let data = &bytes[r.data.clone()];
                for (s, e) in covered.gaps(h.offset, end) {
                    let part = RecordHeader {
                        offset: s,
                        length: e - s,
                        ..*h
                    };
                    let piece = match h.kind {
                        Kind::Write => &data[(s - h.offset) as usize..(e - h.offset) as usize],
                        _ => &[][..],
                    };
                    apply_record(image, &part, piece)
                        .map_err(LogError::io("cannot apply record to image", path))?;
                    stats.bytes_written += piece.len() as u64;
                }
            }
            covered.add(h.offset, end);
        }
        stats.segments += 1;
    }
    Ok(stats)
}

/// Decodes a segment for replay: sealed, or (the last one only) open or torn at its end.
fn check_segment(path: &Path, bytes: &[u8], last: bool) -> Result<format::Decoded, LogError> {
    let d = format::decode_segment(bytes).map_err(|e| corrupt(path, e.to_string()))?;
    match &d.end {
        End::Sealed(_) => {}
        End::Open if last => {}
        End::Torn { reason } if last => {
            tracing::debug!(segment = %path.display(), at = d.valid_len, "replay stops at torn tail: {reason}");
        }
        End::Open => {
            return Err(corrupt(
                path,
                "segment is not sealed but is not the last one".into(),
            ))
        }
        End::Torn { reason } => {
            return Err(corrupt(
                path,
                format!("cut at byte {}: {reason}", d.valid_len),
            ))
        }
    }
    Ok(d)
}

/// Disjoint byte ranges already decided by later records (start → end).
#[derive(Debug, Default)]
struct Covered(BTreeMap<u64, u64>);

impl Covered {
    /// The parts of `[start, end)` not covered, in order.
    fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = start;
        // The range starting at or before `start` may cover its beginning.
        let first = self.0.range(..=start).next_back().map(|(&s, &e)| (s, e));
        let later = self
            .0
            .range(start.saturating_add(1)..end)
            .map(|(&s, &e)| (s, e));
        for (s, e) in first.into_iter().chain(later) {
            if e <= pos {
                continue;
            }
            if s > pos {
                out.push((pos, s.min(end)));
            }
            pos = pos.max(e);
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push((pos, end));
        }
        out
    }

    /// Marks `[start, end)` covered (merging neighbours).
    fn add(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let inside: Vec<u64> = self.0.range(start..=end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some(e) = self.0.remove(&s) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }
}

/// Replays every record of `segments` onto `image`.
pub fn replay(segments: &[PathBuf], image: &File) -> Result<ReplayStats, LogError> {
    replay_after(segments, image, 0)
}

/// Replays every segment file of a log directory onto `image` (a convenience for tests and
/// tools).
pub fn replay_dir(dir: &Path, image: &File) -> Result<ReplayStats, LogError> {
    let segs = super::segment::list_segments(dir).map_err(LogError::io("cannot list", dir))?;
    let paths: Vec<PathBuf> = segs.into_iter().map(|(_, p)| p).collect();
    replay(&paths, image)
}

fn corrupt(path: &Path, reason: String) -> LogError {
    LogError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `Covered` against a byte map: gaps are exactly the uncovered bytes, in order.
        #[test]
        fn covered_matches_a_byte_map(ops in proptest::collection::vec((0u64..200, 1u64..40), 1..40)) {
            let mut c = Covered::default();
            let mut map = vec![false; 256];
            for (s, l) in ops {
                let e = s + l;
                let want: Vec<u64> = (s..e).filter(|&i| !map[i as usize]).collect();
                let got: Vec<u64> = c.gaps(s, e).into_iter().flat_map(|(a, b)| a..b).collect();
                prop_assert_eq!(got, want);
                c.add(s, e);
                for i in s..e {
                    map[i as usize] = true;
                }
                // Disjoint and not touching.
                let v: Vec<(u64, u64)> = c.0.iter().map(|(&a, &b)| (a, b)).collect();
                for w in v.windows(2) {
                    prop_assert!(w[0].1 < w[1].0);
                }
            }
        }
    }
}
