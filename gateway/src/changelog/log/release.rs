//! Releasing shipped segments without waiting for the image.
//!
//! A sealed segment may be deleted only when it is both **shipped** (the replicator stored
//! every record in it) and **checkpointed twice** (the relog point, the redo point before the
//! last, is at or past its last LSN: recovery replays from the redo point and, after a host
//! crash, reads the records after the relog point, so it needs every segment after it). Before this
//! module, a release checkpointed on the spot when a segment was not yet checkpointed, and
//! every seal (so every cut) checkpointed too: the replication cycle waited for an
//! `fdatasync` of the image, whose cost grows with what was written since the last one (on a
//! sparse image it allocates those blocks), and every checkpoint cooled every hot extent.
//!
//! Now, with the background checkpointer running (the default), [`ChangeLog::release_shipped`]
//! only notes the shipped LSN (`shipped_through`, in memory) and deletes the segments that
//! are already checkpointed; after each of its checkpoints (timer, log volume, hot extents)
//! the checkpointer deletes the shipped segments it covered
//! ([`ChangeLog::release_checkpointed`]). Nothing asks it for an extra checkpoint: one per
//! cut would sync the image and cool every hot extent twice a second under continuous
//! replication. Shipped segments that wait for it no longer count as backlog
//! ([`ChangeLog::unshipped_bytes`]); they hold at most two checkpoint intervals of log on disk.
//!
//! Invariants:
//! * Nothing above the relog point is ever deleted (`release` checkpoints first, twice at
//!   most, when asked to go past it, and here only segments whose last LSN is at or below
//!   both marks are asked for, so it never has to).
//! * `shipped_through` only grows within a chain and is cleared with the chain (`reset`); it
//!   is not persisted: after a restart the replicator's next release names it again, and
//!   until then the segments are merely kept (and shipped again only if a point needs them).
//! * Without a background checkpointer (`checkpoint_interval` off, or its thread could not
//!   start) `release_shipped` is `release` of the same segments: it checkpoints on the spot.
//! * Listing and deleting happen under `seal_lock`, which `reset` holds too: a new chain
//!   numbers its segments from 0 again, and a release of the old chain must not delete them.

use super::{lock, ChangeLog};
use crate::changelog::LogError;

impl ChangeLog {
    /// The replicator has stored every record with LSN ≤ `lsn`: the sealed segments wholly at
    /// or below it may go, each as soon as it is checkpointed. Never waits for an image sync
    /// while a background checkpointer runs (see the module documentation).
    pub fn release_shipped(&self, lsn: u64) -> Result<(), LogError> {
        // Held throughout, against `reset`: the LSN and the segments are the same chain's.
        let _s = lock(&self.sh.seal_lock);
        if !self.background_checkpoints() {
            let last = lock(&self.sh.st)
                .sealed
                .iter()
                .filter(|s| s.last_lsn <= lsn)
                .map(|s| s.seq)
                .max();
            return match last {
                Some(seq) => self.release_locked(seq),
                None => Ok(()),
            };
        }
        {
            let mut st = lock(&self.sh.st);
            st.shipped_through = st.shipped_through.max(lsn);
        }
        self.release_checkpointed_locked()
    }

    /// Every record up to this LSN is in the store (0: none said so since the log was opened
    /// or the chain restarted). Segments at or below it may still exist, waiting for a
    /// checkpoint; nothing needs their extents' bytes any more.
    pub fn shipped_through(&self) -> u64 {
        lock(&self.sh.st).shipped_through
    }

    /// Deletes the sealed segments that are both shipped and checkpointed (oldest first; stops
    /// at the first that is not both).
    pub(super) fn release_checkpointed(&self) -> Result<(), LogError> {
        let _s = lock(&self.sh.seal_lock);
        self.release_checkpointed_locked()
    }

    fn release_checkpointed_locked(&self) -> Result<(), LogError> {
        // The relog point (≤ the redo point): recovery after a host crash reads the records
        // above it.
        let ck = self.relog_lsn();
        let seq = {
            let st = lock(&self.sh.st);
            st.sealed
                .iter()
                .take_while(|s| s.last_lsn <= st.shipped_through && s.last_lsn <= ck)
                .map(|s| s.seq)
                .last()
        };
        match seq {
            Some(seq) => self.release_locked(seq),
            None => Ok(()),
        }
    }
}
