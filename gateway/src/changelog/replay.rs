//! Applying change-log records to an image: recovery's redo, tests, and (later) the replica
//! store.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::extent::LaterExtents;
use super::format::{self, End, Kind, RecordHeader, FLAG_MAY_TRIM};
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
        // Its bytes are in the image already (see `super::extent`).
        Kind::Flush | Kind::Extent => Ok(()),
    }
}

/// Replays `segments` (in order) onto `image`, skipping records with an LSN `<= after_lsn`.
///
/// Every segment must decode; a sealed one must match its footer hash; the last one may be
/// the active segment (no footer), in which case it is replayed up to its last whole record.
/// LSNs must be contiguous across segments. The image is not synced.
pub fn replay_after(
    segments: &[PathBuf],
    image: &File,
    after_lsn: u64,
) -> Result<ReplayStats, LogError> {
    let mut stats = ReplayStats::default();
    let mut expected: Option<u64> = None;
    let later = later_extents(segments, after_lsn)?;
    for (i, path) in segments.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(LogError::io("cannot read segment", path))?;
        let d = format::decode_segment(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
        let last = i + 1 == segments.len();
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
        for r in &d.records {
            if r.header.lsn <= after_lsn {
                continue;
            }
            later
                .apply(image, &r.header, &bytes[r.data.clone()])
                .map_err(LogError::io("cannot apply record to image", path))?;
            stats.records += 1;
            stats.bytes_written += u64::from(r.header.data_len);
            stats.first_lsn.get_or_insert(r.header.lsn);
            stats.last_lsn = Some(r.header.lsn);
        }
        stats.segments += 1;
    }
    Ok(stats)
}

/// Which parts of the records after `after_lsn` a later extent covers (they apply nothing
/// there: the image holds the extent's newer bytes; see `super::extent`). A first pass over
/// the segments; what does not decode is left to the replay itself to report.
fn later_extents(segments: &[PathBuf], after_lsn: u64) -> Result<LaterExtents, LogError> {
    let mut recs = Vec::new();
    for path in segments {
        let bytes = std::fs::read(path).map_err(LogError::io("cannot read segment", path))?;
        if let Ok(d) = format::decode_segment(&bytes) {
            recs.extend(
                d.records
                    .iter()
                    .map(|r| r.header)
                    .filter(|h| h.lsn > after_lsn)
                    .map(|h| (h.lsn, h.kind, h.offset, h.length)),
            );
        }
    }
    Ok(LaterExtents::new(&recs))
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
