//! Inline logging: [`ChangeLog::try_record_now`] (a small write) and
//! [`ChangeLog::try_record_extent_now`] (a large one, logged as an extent) log and apply one
//! write on the caller's thread (a runtime worker, from `Disk::write_now`) when nothing on the
//! way has to wait, and decline otherwise (the caller then hands the write to the disk's
//! writer thread or the blocking pool, which do the same work allowed to wait).
//!
//! **Why.** A write handed to another thread pays two thread wake-ups and a task hop (submit,
//! reply); at 4 KiB those cost more CPU than logging the write itself (a 40-byte deferred
//! extent record whose bytes a FLUSH or cut logs later, see [`crate::changelog::extent`],
//! copied into a mapping of the segment, see [`crate::changelog::segmap`]; a `pwritev` of
//! header and data when the caller says not to defer, or where segments are not mapped). A
//! write to an untracked disk, up to 1 MiB, is already copied into the page cache on the
//! worker (`Disk::write_now`); a tracked one adds its record. Large writes
//! handed to the blocking pool also ran up to eight at a time (one per request in flight on
//! a connection) on two cores, on threads of their own; inline, at most one runs per worker,
//! as on an untracked disk. Measured, sequential 1 MiB at QD8: the tracked disk's CPU per GB
//! went from 1.1–1.9× the untracked disk's to 1.04–1.09× (BENCHMARKS.md, "Large writes
//! logged inline").
//!
//! **What it never does** (any of these → `None`, nothing changed): wait for a lock
//! (`try_lock` only), wait for an overlapping request, start a segment (rotation), sync the
//! log (a change to a cold extent, see [`crate::changelog::hot`]), check the free space
//! (the write that crosses a check interval goes the slow way), write the state file (a
//! failure that changed the log's health is persisted on a thread of its own).
//! What it may do besides the record and the image write: write the zeroes ahead of the
//! records when a record copied into the mapping does not fit below them (up to 1 MiB into
//! the page cache, once per ~26,000 records of 40 bytes; `Active::write_mapped`), as the log
//! sync does otherwise — a buffered write, which waits for the disk no more than the
//! record's own `pwritev` did.
//!
//! **Invariants** — those of `record` (see the parent module):
//! * Ranges: registered under the request lock only when no in-flight request overlaps.
//! * LSN order = file order: LSN and place are reserved and the record written under the
//!   append lock.
//! * The image never holds a change the log lacks: the record is written before `apply`.
//! * Hot extents: the rule is checked *under the append lock*, with the cooling mark that
//!   checkpoints publish under the same lock (`checkpoint`). Either this check saw the new
//!   mark (then a cold extent declines: no record is written), or the record was appended
//!   before the checkpoint published it, and so before that checkpoint's log sync, which
//!   makes the record durable: either above the relog point that checkpoint records (its
//!   extent is then hot in fact), or at or below it, when the change had reached the image
//!   before the previous checkpoint synced the image.
//!   A write that needs no sync never heats an extent (as in `guard_image_change`), and a
//!   write that would heat extents ahead of a stream (`hot`, "Heating ahead") declines too.
//! * An extent's bytes are in the image only: its LSN is noted image-dependent before
//!   `apply`, so the sync round of any FLUSH after the write's reply syncs the image too (as
//!   in `record`). Its preimage rule is the caller's `ready` (`ExtentMap::take_uncut_extent`
//!   declines over a piece of a cut).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::TryLockError;

use super::{ChangeLog, Inflight};
use crate::changelog::format::{self, Kind, RecordHeader, FLAG_DEFERRED, RECORD_HEADER_LEN};
use crate::changelog::segment::pwritev_all;

impl ChangeLog {
    /// Logs the write of `data` at `offset` and applies it with `apply` (which changes the
    /// image) if that can be done without waiting; `None` (nothing done) otherwise.
    /// `ready(chain_id, lsn)` is asked under the append lock, last, whether the caller's own
    /// preparation for the change needs nothing that waits (e.g. no preimage to save); when
    /// it says yes (`Some`) it may do that preparation too, since the record is then certain
    /// to be written, with LSN `lsn`. It must not take the log's locks (it is told the chain
    /// id and the LSN instead).
    /// `Some(true)` logs the write as a *deferred* extent (40 bytes, [`FLAG_DEFERRED`]): the
    /// caller keeps track of it and logs its bytes later (see
    /// [`crate::changelog::extent`], "Deferred small writes").
    pub fn try_record_now(
        &self,
        offset: u64,
        data: &[u8],
        ready: impl FnOnce(u64, u64) -> Option<bool>,
        apply: impl FnOnce() -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        if data.is_empty() {
            return None;
        }
        let full = (RECORD_HEADER_LEN + data.len()) as u64;
        self.try_inline(
            offset,
            data.len() as u64,
            full,
            |chain, lsn| {
                Some(match ready(chain, lsn)? {
                    true => (Kind::Extent, FLAG_DEFERRED, &[][..]),
                    false => (Kind::Write, 0, data),
                })
            },
            apply,
        )
    }

    /// Logs a large write of `len` bytes at `offset` as an *extent* (a 40-byte record, the
    /// bytes in the image only, see [`crate::changelog::extent`]) and applies it with
    /// `apply` if that can be done without waiting; `None` (nothing done) otherwise.
    /// `ready(chain_id, lsn)` as for [`Self::try_record_now`]. The record is noted
    /// image-dependent before `apply` runs, so a FLUSH after this write syncs the image too.
    pub fn try_record_extent_now(
        &self,
        offset: u64,
        len: u64,
        ready: impl FnOnce(u64, u64) -> Option<()>,
        apply: impl FnOnce() -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        if len == 0 {
            return None;
        }
        self.try_inline(
            offset,
            len,
            RECORD_HEADER_LEN as u64,
            |chain, lsn| {
                ready(chain, lsn)?;
                Some((Kind::Extent, 0, &[][..]))
            },
            apply,
        )
    }

    /// The common path of both: `choose(chain_id, lsn)` says, under the append lock, which
    /// record to write (kind, flags, data); `rec_max` is the largest record it may choose.
    fn try_inline<'d>(
        &self,
        offset: u64,
        len: u64,
        rec_max: u64,
        choose: impl FnOnce(u64, u64) -> Option<(Kind, u8, &'d [u8])>,
        apply: impl FnOnce() -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        if !self.sh.logging.load(Ordering::Acquire) {
            return None;
        }
        self.count_appended_unless_check_due(rec_max)?;
        let end = offset.checked_add(len)?;
        let id = {
            let mut st = try_lock(&self.sh.st)?;
            if st.closed || st.paused || st.inflight.iter().any(|i| i.start < end && offset < i.end)
            {
                return None;
            }
            let id = st.next_ticket;
            st.next_ticket += 1;
            st.inflight.push(Inflight {
                id,
                start: offset,
                end,
            });
            id
        };
        let Some((lsn, h)) = self.append_now(offset, len, rec_max, choose) else {
            self.complete_many(&[id], &[None]);
            return None;
        };
        self.note_appended((RECORD_HEADER_LEN as u64) + u64::from(h.data_len));
        self.sh.recorded.fetch_add(len, Ordering::Relaxed);
        if is_extent(&h) {
            // Its bytes are in the image only: the next sync round syncs the image too.
            self.note_image_dependent(lsn);
        }
        let r = apply();
        if let Err(e) = &r {
            self.mark_broken(format!(
                "a write at {offset}+{len} was logged but could not be applied to the image: {e}"
            ));
        }
        self.complete_many(&[id], &[Some(lsn)]);
        if self.sh.state_dirty.load(Ordering::Acquire) {
            self.persist_in_background();
        }
        Some(r)
    }

    /// Adds `n` to the appended-bytes counter unless that crosses a free-space check
    /// interval (`None`: the caller takes the path that checks).
    fn count_appended_unless_check_due(&self, n: u64) -> Option<()> {
        let interval = self.sh.opts.space_check_interval.max(1);
        let mut before = self.sh.appended.load(Ordering::Relaxed);
        loop {
            if before / interval != (before + n) / interval {
                return None;
            }
            match self.sh.appended.compare_exchange_weak(
                before,
                before + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(()),
                Err(b) => before = b,
            }
        }
    }

    /// Under the append lock (if free): checks that a record of up to `rec_max` bytes fits
    /// the active segment, that the hot-extent rule needs no sync and that `choose` accepts,
    /// then reserves the LSN and writes the record `choose` gave. `None`: declined, nothing
    /// written.
    fn append_now<'d>(
        &self,
        offset: u64,
        len: u64,
        rec_max: u64,
        choose: impl FnOnce(u64, u64) -> Option<(Kind, u8, &'d [u8])>,
    ) -> Option<(u64, RecordHeader)> {
        let mut ap = try_lock(&self.sh.ap)?;
        if !self.sh.logging.load(Ordering::Acquire) {
            return None;
        }
        let (lsn, chain_id) = (ap.next_lsn, ap.chain_id);
        let a = ap.active.as_mut()?;
        if a.count > 0 && a.pos + rec_max > self.sh.opts.segment_size {
            return None;
        }
        let plan = self.plan_hot(offset, len, false);
        if plan.sync || (plan.preheat() && self.preheat_now()) {
            // A cold extent, or a window to heat ahead of a stream: both sync the log.
            return None;
        }
        // A deferred write's record is an extent too: the header alone, the bytes stay in
        // the image until they are logged (see `changelog::extent::deferred`).
        let (kind, flags, data) = choose(chain_id, lsn)?;
        let h = RecordHeader {
            lsn,
            kind,
            flags,
            ahead: 0,
            offset,
            length: len,
            data_len: data.len() as u32,
        };
        let hb = format::encode_record_header(&h, data);
        a.digest.record(&hb);
        let pos = a.pos;
        // A record without data is copied into the segment's mapping (no system call, see
        // `changelog::segmap`); one with data, or where there is no mapping, is written.
        let r = match data.is_empty() && a.write_mapped(pos, &[&hb], self.sh.opts.segment_size) {
            true => {
                self.sh.mapped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            false => pwritev_all(&a.seg.file, &[&hb, data], pos),
        };
        a.pos += (RECORD_HEADER_LEN + data.len()) as u64;
        a.count += 1;
        a.extent_bytes += h.backlog_extra();
        ap.next_lsn += 1;
        // Appended: a checkpoint's log sync may keep its extent hot (`hot`, "Re-heated by
        // the checkpoint").
        self.sh.ck.hot.touch(offset, len, lsn);
        if let Err(e) = r {
            self.degrade(&e, "cannot append to the change log");
        }
        Some((lsn, h))
    }

    /// Writes the state file on a thread of its own (inline if none can be started).
    fn persist_in_background(&self) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("hrl-persist".into())
            .spawn(move || me.persist_if_dirty());
        if spawned.is_err() {
            self.persist_if_dirty();
        }
    }
}

/// `try_lock` that treats a poisoned lock as free (as `lock` does) and a held one as `None`.
fn try_lock<T>(m: &std::sync::Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// A large write's extent record (not a deferred small write's, whose bytes the log gets at
/// the next FLUSH or cut).
fn is_extent(h: &RecordHeader) -> bool {
    h.kind == Kind::Extent && h.flags & FLAG_DEFERRED == 0
}
