//! Inline logging of a small write: [`ChangeLog::try_record_now`] logs and applies one write
//! on the caller's thread (a runtime worker, from `Disk::write_now`) when nothing on the way
//! has to wait, and declines otherwise (the caller then hands the write to the disk's writer
//! thread, which does the same work allowed to wait).
//!
//! **Why.** A small write handed to another thread pays two thread wake-ups and a task hop
//! (submit, reply); at 4 KiB those cost more CPU than logging the write itself (one
//! `pwritev` into the log's page cache: a 40-byte deferred extent record whose bytes a FLUSH
//! or cut logs later, see [`crate::changelog::extent`]; header and data when the caller says
//! not to defer). A write to an untracked disk is already copied into the page cache on the
//! worker (`Disk::write_now`); a tracked one adds one `pwritev`.
//!
//! **What it never does** (any of these → `None`, nothing changed): wait for a lock
//! (`try_lock` only), wait for an overlapping request, start a segment (rotation), sync the
//! log (a change to a cold extent, see [`crate::changelog::hot`]), check the free space
//! (the write that crosses a check interval goes the slow way), write the state file (a
//! failure that changed the log's health is persisted on a thread of its own).
//!
//! **Invariants** — those of `record` (see the parent module):
//! * Ranges: registered under the request lock only when no in-flight request overlaps.
//! * LSN order = file order: LSN and place are reserved and the record written under the
//!   append lock.
//! * The image never holds a change the log lacks: the record is written before `apply`.
//! * Hot extents: the rule is checked *under the append lock*, with the pending checkpoint
//!   LSN that checkpoints publish under the same lock (`checkpoint`). Either this check saw
//!   the new pending LSN (then a cold extent declines: no record is written), or the record
//!   was appended before the checkpoint published it, and so before that checkpoint's log
//!   sync, which makes the record durable with an LSN above the checkpoint (the request had
//!   not completed, so the checkpoint's LSN is below it) — the extent is then hot in fact.
//!   A write that needs no sync never heats an extent (as in `guard_image_change`).

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
        if data.is_empty() || !self.sh.logging.load(Ordering::Acquire) {
            return None;
        }
        let len = data.len() as u64;
        let rec_len = (RECORD_HEADER_LEN + data.len()) as u64;
        self.count_appended_unless_check_due(rec_len)?;
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
        let Some((lsn, deferred)) = self.append_now(offset, data, rec_len, ready) else {
            self.complete_many(&[id], &[None]);
            return None;
        };
        self.note_appended(if deferred {
            RECORD_HEADER_LEN as u64
        } else {
            rec_len
        });
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

    /// Under the append lock (if free): checks that the record fits the active segment, the
    /// hot-extent rule needs no sync and `ready`, then reserves the LSN and writes the
    /// record (a deferred extent when `ready` says so). `None`: declined, nothing written.
    fn append_now(
        &self,
        offset: u64,
        data: &[u8],
        rec_len: u64,
        ready: impl FnOnce(u64, u64) -> Option<bool>,
    ) -> Option<(u64, bool)> {
        let mut ap = try_lock(&self.sh.ap)?;
        if !self.sh.logging.load(Ordering::Acquire) {
            return None;
        }
        let (lsn, chain_id) = (ap.next_lsn, ap.chain_id);
        let a = ap.active.as_mut()?;
        if a.count > 0 && a.pos + rec_len > self.sh.opts.segment_size {
            return None;
        }
        let ck = &self.sh.ck;
        let len = data.len() as u64;
        if ck
            .hot
            .needs_sync(offset, len, ck.pending.load(Ordering::SeqCst))
        {
            return None;
        }
        let deferred = ready(chain_id, lsn)?;
        // A deferred write's record is an extent: the header alone, the bytes stay in the
        // image until they are logged (see `changelog::extent::deferred`).
        let (kind, flags, data) = match deferred {
            true => (Kind::Extent, FLAG_DEFERRED, &[][..]),
            false => (Kind::Write, 0, data),
        };
        let h = RecordHeader {
            lsn,
            kind,
            flags,
            offset,
            length: len,
            data_len: data.len() as u32,
        };
        let hb = format::encode_record_header(&h, data);
        a.digest.record(&hb);
        let pos = a.pos;
        a.pos += (RECORD_HEADER_LEN + data.len()) as u64;
        a.count += 1;
        let r = pwritev_all(&a.seg.file, &[&hb, data], pos);
        ap.next_lsn += 1;
        if let Err(e) = r {
            self.degrade(&e, "cannot append to the change log");
        }
        Some((lsn, deferred))
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
