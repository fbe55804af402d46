//! A tracked disk's change tracking: its change log, dirty bitmap and extent map, and the
//! rules a write or FLUSH applies to them before and after the image changes — when a small
//! write is deferred (its bytes logged at the next FLUSH or cut) or logged with its data
//! (past `defer_max`, or between frequent FLUSHes), what a FLUSH logs of the deferred
//! writes, and what a change the log did not record leaves in the dirty bitmap.
//!
//! Invariant: every change to the image of a tracked disk passes [`Tracking::before_write`]
//! first (the preimages a cut still needs are durable) and [`Tracking::note`] after; the
//! deferral choice only changes what a FLUSH has to copy, never what it makes durable.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tracing::warn;

use super::DiskError;
use crate::changelog::durable::Durability;
use crate::changelog::extent::{ExtentMap, Pass};
use crate::changelog::{ChangeLog, DirtyMap, LogOptions};

pub(super) struct Tracking {
    pub(super) log: ChangeLog,
    pub(super) dirty: Arc<DirtyMap>,
    /// Extents a cut may still need (see [`crate::changelog::extent`]).
    pub(super) extents: Arc<ExtentMap>,
    /// Writes of at least this many bytes are logged as extents.
    pub(super) extent_min: u64,
    /// Small writes logged inline are deferred while the deferred bytes stay within this
    /// (`0`: never; see [`crate::changelog::extent`], "Deferred small writes").
    defer_max: u64,
    /// A FLUSH facing at least this many live deferred bytes syncs the image instead of
    /// logging them (`0`: never).
    image_flush_min: u64,
    /// Small writes since the last FLUSH (counted where the inline path picks their bound).
    since_flush: AtomicU64,
    /// Whether the last FLUSH came after at most `flush_heavy_writes` of them: then small
    /// writes are logged with their data instead of deferred (see [`Tracking::defer_max`]).
    flush_heavy: AtomicBool,
    /// [`LogOptions::flush_heavy_writes`].
    flush_heavy_writes: u32,
}

/// Testing only: small writes logged with their data because FLUSHes came often (all disks;
/// see [`Tracking::defer_max`]).
#[cfg(any(test, feature = "testing"))]
pub static FLUSH_HEAVY_WRITES: AtomicU64 = AtomicU64::new(0);

impl Tracking {
    pub(super) fn new(
        log: ChangeLog,
        size: u64,
        image: &File,
        dur: &Arc<Durability>,
        opts: &LogOptions,
    ) -> Result<Self, DiskError> {
        let dirty = Arc::new(DirtyMap::open(log.dir(), size, log.opened_clean()));
        let extents = ExtentMap::open(&log, image, Arc::clone(dur))?;
        Ok(Tracking {
            log,
            dirty,
            extents,
            extent_min: opts.extent_min,
            // A log that must rebuild an image from a base copy logs every byte.
            defer_max: match opts.extent_min {
                u64::MAX => 0,
                _ => opts.defer_max,
            },
            image_flush_min: opts.image_flush_min,
            since_flush: AtomicU64::new(0),
            flush_heavy: AtomicBool::new(false),
            flush_heavy_writes: opts.flush_heavy_writes,
        })
    }

    /// The bound on deferred bytes for the next small write: `defer_max`, or `0` (its bytes
    /// logged with it) while FLUSHes come after at most `flush_heavy_writes` small writes
    /// each — a database's commits, a journal's: for the first `flush_heavy_writes` small
    /// writes after a FLUSH that followed at most that many. Deferring saves copies when a
    /// block is written again before the FLUSH; with a FLUSH after nearly every write it
    /// only adds work: a 40-byte record now, then a read of the bytes from the image and
    /// their write record at the FLUSH, where logging them now is one record. Either way
    /// the FLUSH makes them durable; only the cost differs. The writes past that count are
    /// deferred again, so a burst of writes without FLUSH after a run of commits is not
    /// logged with its data until its own FLUSH.
    pub(super) fn defer_max(&self) -> u64 {
        let n = self.since_flush.fetch_add(1, Ordering::Relaxed);
        if n < u64::from(self.flush_heavy_writes) && self.flush_heavy.load(Ordering::Relaxed) {
            #[cfg(any(test, feature = "testing"))]
            FLUSH_HEAVY_WRITES.fetch_add(1, Ordering::Relaxed);
            0
        } else {
            self.defer_max
        }
    }

    /// At a FLUSH: whether the writes since the last one make the next small writes be
    /// logged with their data (see [`Self::defer_max`]).
    pub(super) fn note_flush(&self) {
        let writes = self.since_flush.swap(0, Ordering::Relaxed);
        let heavy = self.flush_heavy_writes > 0 && writes <= u64::from(self.flush_heavy_writes);
        self.flush_heavy.store(heavy, Ordering::Relaxed);
    }

    /// Makes the deferred small writes durable with the FLUSH's sync round: logs the bytes
    /// of the live ones (the synced ones are durable in the image already). With at least
    /// `image_flush_min` bytes of them, or when the image cannot be read for it, the sync
    /// round syncs the image instead, which makes them durable where they are: one write of
    /// each dirty block instead of a copy into the log now and the image's write-back at the
    /// next checkpoint (see [`crate::changelog::extent`], "Deferred small writes").
    pub(super) fn log_deferred(&self) {
        let live = self.extents.settle(&self.log);
        if live == 0 {
            return;
        }
        if self.image_flush_min > 0 && live >= self.image_flush_min {
            self.log.note_image_dependent(self.log.last_lsn());
            return;
        }
        if let Err(e) = self.extents.log_deferred(&self.log, Pass::Flush) {
            warn!(
                disk = %self.log.dir().display(),
                "cannot log the bytes of deferred writes ({e}); this FLUSH syncs the image instead"
            );
            self.log.note_image_dependent(self.log.last_lsn());
        }
    }

    /// Before any change of `[offset, offset + len)` reaches the image: preimages of the
    /// extents a cut still needs there (see [`ExtentMap::before_write`]).
    pub(super) fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        self.extents.before_write(&self.log, offset, len)
    }

    /// Called after a change reached the image: a change the log did not record (overflow,
    /// broken chain) is remembered in the dirty bitmap.
    pub(super) fn note(&self, offset: u64, len: u64) {
        if !self.log.is_logging() {
            self.dirty.mark(offset, len);
        }
    }
}
