//! Hot extents: which parts of the image may hold writes that a host crash could take out of
//! the log (DRBD's activity log, kept inside the change log).
//!
//! **The problem.** With redo durability the image is synced lazily (at checkpoints), the log
//! at FLUSH. Between two syncs the kernel writes dirty pages back in any order, so after a
//! *host* crash the image may hold a write whose log record never reached the disk. The log
//! then no longer describes the image, and a replica built from it would miss that write
//! forever. (A process crash cannot do this: the page cache survives it, and every record is
//! in the log's page cache before its change reaches the image's.)
//!
//! **The rule.** The image is divided into extents ([`extent_size`]). An extent is *hot* when
//! the log holds a **durable** record touching it with an LSN above the checkpoint. Before a
//! change to a cold extent reaches the image, the log is synced up to that change's record
//! (one `fdatasync` of the log, shared by concurrent writers), and the extent becomes hot. So
//! every change in the image that the log may have lost lies in an extent touched by a durable
//! record after the checkpoint, and recovery after a host crash knows every extent to repair:
//! it re-logs the image's bytes of those extents (write records), after which the log again
//! describes the image exactly. A checkpoint (image synced up to LSN C) cools every extent
//! whose hot record is `<= C`.
//!
//! **Ordering with a checkpoint.** A writer appends its record, *then* compares the extent's
//! hot LSN with the checkpoint's *pending* LSN (published before the checkpoint syncs the
//! log). If it read the old checkpoint, its record was appended before the checkpoint's log
//! sync, so that sync made it durable: it is a durable record above the new checkpoint.
//!
//! Cost: one log sync per extent that turns hot, per checkpoint interval (writers touching
//! many cold extents share those syncs); a checkpoint is requested when more than
//! `hot_limit` extents are hot, which bounds what recovery re-logs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Smallest extent (DRBD's activity-log extent is 4 MiB too).
pub const MIN_EXTENT: u64 = 4 << 20;
/// At most this many extents are tracked per disk (memory: 8 bytes each).
const MAX_EXTENTS: u64 = 1 << 16;

/// The extent size for a disk of `disk_size` bytes: [`MIN_EXTENT`], or larger so that no
/// more than 65,536 extents exist.
pub fn extent_size(disk_size: u64) -> u64 {
    let mut e = MIN_EXTENT;
    while disk_size.div_ceil(e) > MAX_EXTENTS {
        e *= 2;
    }
    e
}

/// See the module documentation.
#[derive(Debug)]
pub struct HotExtents {
    extent: u64,
    disk_size: u64,
    /// Per extent: the LSN of a durable record touching it (0: none known).
    lsn: Vec<AtomicU64>,
    /// Extents that turned hot since the last checkpoint (an estimate for the trigger).
    heated: AtomicUsize,
}

impl HotExtents {
    pub fn new(disk_size: u64) -> Self {
        let extent = extent_size(disk_size);
        let n = disk_size.div_ceil(extent).max(1) as usize;
        Self {
            extent,
            disk_size,
            lsn: (0..n).map(|_| AtomicU64::new(0)).collect(),
            heated: AtomicUsize::new(0),
        }
    }

    pub fn extent(&self) -> u64 {
        self.extent
    }

    /// Extent indexes that `[offset, offset+len)` touches.
    pub fn extents_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        extents_of(self.extent, self.disk_size, offset, len)
    }

    /// Whether a change to `[offset, offset+len)` needs the log synced first: some extent it
    /// touches has no durable record above `checkpoint`.
    pub fn needs_sync(&self, offset: u64, len: u64, checkpoint: u64) -> bool {
        self.extents_of(offset, len).any(|e| {
            self.lsn
                .get(e as usize)
                .is_some_and(|l| l.load(Ordering::SeqCst) <= checkpoint)
        })
    }

    /// Records that the log is durable up to `lsn`, a record touching `[offset, offset+len)`.
    pub fn heat(&self, offset: u64, len: u64, lsn: u64, checkpoint: u64) {
        for e in self.extents_of(offset, len) {
            if let Some(l) = self.lsn.get(e as usize) {
                let before = l.fetch_max(lsn, Ordering::SeqCst);
                if before <= checkpoint {
                    self.heated.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Forgets every hot extent (a new chain: LSNs restart).
    pub fn clear(&self) {
        for l in &self.lsn {
            l.store(0, Ordering::SeqCst);
        }
        self.heated.store(0, Ordering::Relaxed);
    }

    /// Extents heated since the last [`Self::cooled`].
    pub fn heated(&self) -> usize {
        self.heated.load(Ordering::Relaxed)
    }

    /// A checkpoint completed (extents whose LSN it passed are cold by comparison).
    pub fn cooled(&self) {
        self.heated.store(0, Ordering::Relaxed);
    }
}

/// Extent indexes that `[offset, offset+len)` touches, with extents of `extent` bytes.
pub fn extents_of(
    extent: u64,
    disk_size: u64,
    offset: u64,
    len: u64,
) -> std::ops::RangeInclusive<u64> {
    let end = offset.saturating_add(len.max(1)).min(disk_size.max(1));
    let first = offset / extent;
    let last = end.saturating_sub(1).max(offset) / extent;
    first..=last
}

/// Extents (of `extent` bytes) touched by the records with an LSN above `after` in
/// `segments`: what recovery after a host crash logs again.
pub fn extents_after(
    segments: &[std::path::PathBuf],
    after: u64,
    extent: u64,
    disk_size: u64,
) -> Result<std::collections::BTreeSet<u64>, super::LogError> {
    use super::format::{self, Kind};
    let mut out = std::collections::BTreeSet::new();
    for path in segments {
        let bytes =
            std::fs::read(path).map_err(super::LogError::io("cannot read segment", path))?;
        let d = format::decode_segment(&bytes).map_err(|e| super::LogError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        for r in &d.records {
            let h = &r.header;
            if h.lsn > after && h.kind != Kind::Flush && h.length > 0 {
                out.extend(extents_of(extent, disk_size, h.offset, h.length));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_heat_and_cool_by_checkpoint() {
        let h = HotExtents::new(64 << 20);
        assert_eq!(h.extent(), MIN_EXTENT);
        assert_eq!(h.extents_of(0, 1), 0..=0);
        assert_eq!(h.extents_of(MIN_EXTENT - 1, 2), 0..=1);
        assert!(h.needs_sync(100, 10, 0));
        h.heat(100, 10, 5, 0);
        assert!(!h.needs_sync(100, 10, 0));
        assert!(!h.needs_sync(100, 10, 4));
        // A checkpoint at or past the hot record cools the extent.
        assert!(h.needs_sync(100, 10, 5));
        // A range spanning a cold extent needs the sync.
        assert!(h.needs_sync(MIN_EXTENT - 1, 2, 0));
        assert_eq!(h.heated(), 1);
        h.cooled();
        assert_eq!(h.heated(), 0);
        // Huge disks get larger extents, never more than 65,536 of them.
        assert_eq!(extent_size(1 << 40), 16 << 20);
    }
}
