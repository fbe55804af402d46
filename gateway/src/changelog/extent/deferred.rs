//! Deferred small writes: a small write logged inline may be recorded as an extent flagged
//! [`FLAG_DEFERRED`] — 40 bytes, its data in the image only — and its bytes are logged later,
//! by [`ExtentMap::log_deferred`], at the next FLUSH and before every cut.
//!
//! **Why.** Copying each 4 KiB write into the log on the write path doubles the page-cache
//! copies of random small writes: a tracked disk ran random 4 KiB writes at 0.47–0.87× of an
//! untracked one (BENCHMARKS.md, "Change log"). ZFS's intent log does the same for
//! asynchronous writes: their data is copied into the log only when a sync asks for it.
//! Writes over the same bytes between two FLUSHes are logged once.
//!
//! **What holds** (beside the rules of the parent module, which a deferred piece follows as
//! any piece of an extent):
//! * *Durability.* A FLUSH logs every deferred piece (one forward pass over the disk, every
//!   LSN) before its sync round, which then syncs the log only: a write acknowledged before
//!   the FLUSH is either logged with its bytes by that pass or covered by a later record
//!   (whose own bytes are logged or in the image as any record's are). If the image cannot
//!   be read, the FLUSH syncs the image instead (`note_image_dependent`).
//! * *Cuts.* [`crate::Disk::cut`] runs a pass while writes go on, then another with writes
//!   paused, right before the barrier: a cut holds no deferred piece, so no copy-before-write
//!   is ever needed for one (a write-once overwrite after a cut would otherwise save and sync
//!   4 KiB preimages one by one). If a pass fails, the cut fails and nothing was cut.
//! * *Order.* A piece's bytes are read while the log holds its range
//!   ([`ChangeLog::log_image_bytes`]), so the write record that follows the extent holds the
//!   image's bytes at its own LSN. Replay and the shipper take the later record over the
//!   extent, as for any two records.
//! * *Crashes.* The extent record is in the log's page cache before the image changes, as
//!   every record is, so a process crash leaves the log describing the image. After a host
//!   crash an unsynced piece's bytes may be lost from the image; its extent record, if it
//!   survived, says "the image's bytes", which is what the image then holds, and the hot
//!   extent rule makes recovery log that part again as for any write. Recovery syncs the
//!   image, so reopened logs hold no deferred piece (the map loads them as cut extents).
//! * *Bound.* A write is deferred only while the deferred bytes stay within
//!   [`crate::changelog::LogOptions::defer_max`] (default 1 GiB), which bounds a FLUSH's or
//!   a cut's logging; past it, small writes log their data with them as before.

use std::io;

use super::{lock, ExtentMap};
use crate::changelog::format::FLAG_DEFERRED;
use crate::changelog::ChangeLog;

/// Largest run of adjacent deferred pieces logged as one record (pieces are not split to
/// meet it; none is larger than the largest write logged inline, 1 MiB).
const RUN_MAX: u64 = 1 << 20;

const _: () = assert!(FLAG_DEFERRED != 0);

/// Testing only: bytes of deferred writes logged by [`ExtentMap::log_deferred`] (all maps).
#[cfg(any(test, feature = "testing"))]
pub static DEFERRED_LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl ExtentMap {
    /// Bytes of deferred pieces newer than the last cut (what the next FLUSH logs).
    pub fn deferred_bytes(&self) -> u64 {
        lock(&self.inner).deferred
    }

    /// Testing only: every piece, as `[start, end)`.
    #[cfg(any(test, feature = "testing"))]
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        lock(&self.inner)
            .pieces
            .iter()
            .map(|(&s, p)| (s, p.end))
            .collect()
    }

    /// Testing only: the index of live deferred pieces and their byte count match the
    /// pieces themselves.
    #[cfg(any(test, feature = "testing"))]
    pub fn check_deferred_index(&self) -> Result<(), String> {
        let inner = lock(&self.inner);
        let cut = inner.cut_lsn;
        let want: Vec<u64> = inner
            .pieces
            .iter()
            .filter(|(_, p)| p.deferred && p.lsn > cut)
            .map(|(&s, _)| s)
            .collect();
        let have: Vec<u64> = inner.live.iter().copied().collect();
        if want != have {
            return Err(format!("live index {have:?}, deferred pieces {want:?}"));
        }
        let bytes: u64 = want.iter().map(|s| inner.pieces[s].end - s).sum();
        if bytes != inner.deferred {
            return Err(format!(
                "{} deferred bytes counted, {bytes} held",
                inner.deferred
            ));
        }
        Ok(())
    }

    /// Logs the image's bytes of every deferred piece newer than the last cut as write
    /// records, in one forward pass over the disk; writes may go on meanwhile (pieces added
    /// behind the pass are left for the next one). Returns the bytes logged. Blocking.
    pub fn log_deferred(&self, log: &ChangeLog) -> io::Result<u64> {
        let mut from = 0u64;
        let mut logged = 0u64;
        while let Some((start, end)) = self.deferred_run(log, from) {
            let (mut next, mut got) = (end, 0);
            let lsn = log.log_image_bytes(start, end, || {
                let Some((a, b)) = self.held_run(start, end) else {
                    return Ok(None);
                };
                let data = crate::fastio::pread_exact(&self.image, a, (b - a) as usize)?;
                // The range is held: nothing changed the pieces there since `held_run`.
                lock(&self.inner).remove(a, b);
                (next, got) = (b, b - a);
                Ok(Some((a, data)))
            })?;
            if lsn.is_some() {
                logged += got;
            }
            from = next;
        }
        #[cfg(any(test, feature = "testing"))]
        DEFERRED_LOGGED.fetch_add(logged, std::sync::atomic::Ordering::Relaxed);
        Ok(logged)
    }

    /// The first run of adjacent deferred pieces newer than the cut that starts at or after
    /// `from`, at most [`RUN_MAX`] long (unless its first piece is longer).
    fn deferred_run(&self, log: &ChangeLog, from: u64) -> Option<(u64, u64)> {
        let mut inner = lock(&self.inner);
        self.follow_chain(&mut inner, log);
        let mut run: Option<(u64, u64)> = None;
        for &s in inner.live.range(from..) {
            let Some(p) = inner.pieces.get(&s) else { break };
            match run {
                None => run = Some((s, p.end)),
                Some((a, b)) if s == b && p.end - a <= RUN_MAX => run = Some((a, p.end)),
                Some(_) => break,
            }
        }
        run
    }

    /// With `[start, end)` held by the log: the first run of adjacent deferred pieces newer
    /// than the cut inside it, clipped to it (requests that ran since [`Self::deferred_run`]
    /// may have replaced or split pieces).
    fn held_run(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        let inner = lock(&self.inner);
        let cut = inner.cut_lsn;
        let first = super::first_overlapping(&inner.pieces, start);
        let mut run: Option<(u64, u64)> = None;
        for (&s, p) in inner.pieces.range(first..end) {
            let live = p.deferred && p.lsn > cut;
            let (a, b) = (s.max(start), p.end.min(end));
            match run {
                None if live => run = Some((a, b)),
                None => {}
                Some((ra, rb)) if live && a == rb => run = Some((ra, b)),
                Some(_) => break,
            }
        }
        run
    }
}
