//! Batched small writes: [`ChangeLog::record_writes`] logs several write requests with one
//! `pwritev` and applies them, for the disk's writer thread (see `crate::disk`'s `writer`).
//!
//! It is [`ChangeLog::record`] for many requests at once, with the same invariants:
//!
//! * **Ranges**: the batch's ranges are registered together, once no in-flight request
//!   overlaps any of them ([`ChangeLog::begin_ranges`]). The caller never puts two
//!   overlapping requests in one batch, so overlapping requests still reach log and image in
//!   the same order.
//! * **LSN order = file order**: under the append lock the batch reserves consecutive LSNs
//!   and consecutive places in the active segment and writes them with one `pwritev` per
//!   segment (a batch that does not fit is split at the rotation), so the log stays a
//!   contiguous prefix.
//! * **The image never holds a change the log lacks**: every record is appended before any
//!   change of the batch is applied; the hot-extent rule runs per record before its change
//!   (the first sync it needs covers the whole batch).
//! * A change that cannot be applied after its record was logged breaks the chain, as in
//!   `record`; every request gets its own result.
//! * **Deferred records**, as inline: for each write without flags the caller's `ready` is
//!   asked under the append lock, last, once its LSN and place are certain
//!   (`ExtentMap::take_uncut` for the disk); `Some(true)` makes its record a 40-byte deferred
//!   extent (its bytes are logged at the next FLUSH or cut, see
//!   `crate::changelog::extent::deferred`), anything else a record with its data. So a write
//!   that waited (a cold extent's log sync, a rotation, a busy lock) costs the log what an
//!   inline one does, and so do the writes queued behind it, which the disk sends here until
//!   the thread is idle: logged with their data they cost 4–5× the CPU of an inline write
//!   (BENCHMARKS.md, "The writer thread defers small writes too").

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{lock, wait, ChangeLog, Inflight};
use crate::changelog::format::{self, Kind, RecordHeader, FLAG_DEFERRED, RECORD_HEADER_LEN};
use crate::changelog::segment::pwritev_all;

/// One write of a batch: its place in the disk and its bytes (logged with the record).
#[derive(Debug, Clone, Copy)]
pub struct BatchWrite<'a> {
    pub offset: u64,
    pub data: &'a [u8],
    /// Record flags ([`format::FLAG_FUA`]).
    pub flags: u8,
}

impl BatchWrite<'_> {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.data.len() as u64)
    }

    fn rec_len(&self) -> u64 {
        (RECORD_HEADER_LEN + self.data.len()) as u64
    }
}

/// Whether `[offset, offset + len)` overlaps a write already in `batch` (the caller then
/// ends the batch before it).
pub fn overlaps(batch: &[BatchWrite<'_>], offset: u64, len: u64) -> bool {
    let end = offset.saturating_add(len);
    batch
        .iter()
        .any(|w| w.offset < end && offset < w.end() && offset < end)
}

impl ChangeLog {
    /// Logs `writes` (small writes, none overlapping another) and applies each with
    /// `apply(i, deferred)`, which changes the image. `ready(i, chain_id, lsn)` is asked
    /// under the append lock, once write `i`'s record is certain to be written with LSN
    /// `lsn` (as [`ChangeLog::try_record_now`]'s), whether it is logged as a deferred extent
    /// (`Some(true)`); `apply` is told. It must not take the log's locks. Blocking: for the
    /// disk's writer thread. Returns one result per write, in order (see the module
    /// documentation).
    pub fn record_writes(
        &self,
        writes: &[BatchWrite<'_>],
        mut ready: impl FnMut(usize, u64, u64) -> Option<bool>,
        mut apply: impl FnMut(usize, bool) -> io::Result<()>,
    ) -> Vec<io::Result<()>> {
        if writes.is_empty() {
            return Vec::new();
        }
        let total: u64 = writes.iter().map(BatchWrite::rec_len).sum();
        let interval = self.sh.opts.space_check_interval.max(1);
        let before = self.sh.appended.fetch_add(total, Ordering::Relaxed);
        if before / interval != (before + total) / interval {
            self.check_space();
        }
        let ids = match self.begin_ranges(writes) {
            Ok(ids) => ids,
            Err(e) => {
                let code = e.raw_os_error().unwrap_or(libc::EIO);
                return writes
                    .iter()
                    .map(|_| Err(io::Error::from_raw_os_error(code)))
                    .collect();
            }
        };
        let (lsns, deferred, rotated) = self.append_batch(writes, &mut ready);
        let mut appended = 0;
        for ((w, lsn), &d) in writes.iter().zip(&lsns).zip(&deferred) {
            if let Some(lsn) = *lsn {
                appended += match d {
                    true => RECORD_HEADER_LEN as u64,
                    false => w.rec_len(),
                };
                self.guard_image_change(w.offset, w.data.len() as u64, 0, lsn);
            }
        }
        if appended > 0 {
            self.note_appended(appended);
            let covered: u64 = writes
                .iter()
                .zip(&lsns)
                .filter(|(_, l)| l.is_some())
                .map(|(w, _)| w.data.len() as u64)
                .sum();
            self.sh.recorded.fetch_add(covered, Ordering::Relaxed);
        }
        let mut out = Vec::with_capacity(writes.len());
        for (i, (w, lsn)) in writes.iter().zip(&lsns).enumerate() {
            let r = apply(i, deferred[i]);
            if let (Err(e), Some(_)) = (&r, lsn) {
                self.mark_broken(format!(
                    "a write at {}+{} was logged but could not be applied to the image: {e}",
                    w.offset,
                    w.data.len()
                ));
            }
            out.push(r);
        }
        self.complete_many(&ids, &lsns);
        if rotated {
            self.seal_in_background();
        }
        self.persist_if_dirty();
        out
    }

    /// Waits until no in-flight request overlaps any of `writes` and registers them all.
    fn begin_ranges(&self, writes: &[BatchWrite<'_>]) -> io::Result<Vec<u64>> {
        let mut st = lock(&self.sh.st);
        loop {
            if st.closed {
                return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
            }
            let busy = st.paused
                || writes.iter().any(|w| {
                    let (start, end) = (w.offset, w.end());
                    start < end && st.inflight.iter().any(|i| i.start < end && start < i.end)
                });
            if !busy {
                break;
            }
            st.range_waiters += 1;
            st = wait(&self.sh.range_cv, st);
            st.range_waiters -= 1;
        }
        let mut ids = Vec::with_capacity(writes.len());
        for w in writes {
            let id = st.next_ticket;
            st.next_ticket += 1;
            st.inflight.push(Inflight {
                id,
                start: w.offset,
                end: w.end(),
            });
            ids.push(id);
        }
        Ok(ids)
    }

    /// [`ChangeLog::complete`] for a batch, under one lock.
    pub(super) fn complete_many(&self, ids: &[u64], lsns: &[Option<u64>]) {
        let mut st = lock(&self.sh.st);
        st.inflight.retain(|i| !ids.contains(&i.id));
        for lsn in lsns.iter().flatten().copied() {
            if lsn == st.applied_upto.wrapping_add(1) {
                let mut w = lsn;
                while st.applied_done.remove(&(w + 1)) {
                    w += 1;
                }
                st.applied_upto = w;
            } else {
                st.applied_done.insert(lsn);
            }
        }
        if st.range_waiters > 0 {
            self.sh.range_cv.notify_all();
        }
    }

    /// Reserves consecutive LSNs and places for `writes` and writes them, one `pwritev` per
    /// segment, under the append lock. Returns each write's LSN (None when the log is not
    /// recording), whether it was logged as a deferred extent (`ready`, see
    /// [`ChangeLog::record_writes`]) and whether the active segment was rotated.
    fn append_batch(
        &self,
        writes: &[BatchWrite<'_>],
        ready: &mut impl FnMut(usize, u64, u64) -> Option<bool>,
    ) -> (Vec<Option<u64>>, Vec<bool>, bool) {
        let n = writes.len();
        let mut lsns = vec![None; n];
        let mut deferred = vec![false; n];
        if !self.sh.logging.load(Ordering::Acquire) {
            return (lsns, deferred, false);
        }
        let seg_size = self.sh.opts.segment_size;
        let mut ap = lock(&self.sh.ap);
        let chain_id = ap.chain_id;
        let mut rotated = false;
        let mut headers: Vec<[u8; RECORD_HEADER_LEN]> = Vec::with_capacity(n);
        let mut i = 0;
        while i < n && self.sh.logging.load(Ordering::Acquire) {
            let full = ap
                .active
                .as_ref()
                .is_some_and(|a| a.count > 0 && a.pos + writes[i].rec_len() > seg_size);
            if full {
                match self.rotate_locked(&mut ap) {
                    Ok(()) => rotated = true,
                    Err(e) => {
                        self.degrade(&e, "cannot start a new log segment");
                        break;
                    }
                }
            }
            let mut next_lsn = ap.next_lsn;
            let Some(a) = ap.active.as_mut() else { break };
            let start = a.pos;
            let first = i;
            headers.clear();
            while i < n {
                let w = &writes[i];
                // The fit is checked with the data, so a record that turns out deferred
                // never passes the segment size either.
                if a.count > 0 && a.pos + w.rec_len() > seg_size {
                    break;
                }
                // Asked last: this record is certain to be written, with this LSN (never
                // for an empty write, which has no range to defer).
                deferred[i] = w.flags == 0
                    && !w.data.is_empty()
                    && ready(i, chain_id, next_lsn) == Some(true);
                let (kind, flags, data) = match deferred[i] {
                    true => (Kind::Extent, FLAG_DEFERRED, &[][..]),
                    false => (Kind::Write, w.flags, w.data),
                };
                let h = RecordHeader {
                    lsn: next_lsn,
                    kind,
                    flags,
                    ahead: 0,
                    offset: w.offset,
                    length: w.data.len() as u64,
                    data_len: data.len() as u32,
                };
                let hb = format::encode_record_header(&h, data);
                a.digest.record(&hb);
                headers.push(hb);
                lsns[i] = Some(next_lsn);
                next_lsn += 1;
                a.pos += (RECORD_HEADER_LEN + data.len()) as u64;
                a.count += 1;
                a.extent_bytes += h.backlog_extra();
                i += 1;
            }
            let seg = Arc::clone(&a.seg);
            ap.next_lsn = next_lsn;
            let mut bufs: Vec<&[u8]> = Vec::with_capacity(2 * (i - first));
            for (j, h) in headers.iter().enumerate() {
                bufs.push(h);
                if !deferred[first + j] {
                    bufs.push(writes[first + j].data);
                }
            }
            if let Err(e) = pwritev_all(&seg.file, &bufs, start) {
                self.degrade(&e, "cannot append to the change log");
            }
        }
        (lsns, deferred, rotated)
    }
}
