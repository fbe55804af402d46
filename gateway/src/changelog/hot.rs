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
//! the log holds a **durable** record touching it with an LSN above the *cooling mark* (the
//! redo point before the last one, see "Two intervals" below). Before a change to a cold
//! extent reaches the image, the log is synced up to that change's record (one `fdatasync`
//! of the log, shared by concurrent writers), and the extent becomes hot. So every change in
//! the image that the log may have lost lies in an extent touched by a durable record after
//! the *relog point* the state file records (the cooling mark, once recorded), and recovery
//! after a host crash knows every extent to repair: it re-logs the image's bytes of those
//! extents (write records), after which the log again describes the image exactly.
//!
//! **Two intervals.** A checkpoint (image synced up to LSN C) does not cool the extents it
//! passed; the *next* one does. Checkpoint k+1 publishes the redo point C(k) of checkpoint k
//! as the cooling mark, then syncs the log and the image, then records C(k+1) as the redo
//! point and C(k) as the relog point. An extent stays hot while a record of the current or
//! the previous interval heated it, so a writer that keeps rewriting the same extents (a
//! stream wrapping round a small disk, random writes over a database file) meets cold ones
//! half as often; and a write that continues a stream heats its window again as soon as
//! the *pending* checkpoint has passed it (`plan`), while the writes go on into the still
//! hot window, so a steady stream never waits for a log sync at a checkpoint. The cost:
//! what recovery re-logs is the extents of two intervals (`hot_limit` each), and a segment
//! is deleted only when the relog point has passed it (two checkpoints). A checkpoint that
//! finds nothing new in the image since the last one only moves the relog point up to the
//! redo point (publish, log sync, state file: no image sync).
//!
//! **Ordering with a checkpoint.** A writer appends its record, *then* compares the extent's
//! hot LSN with the cooling mark (published, with the pending redo point, before the
//! checkpoint syncs the log). If it read the old mark, its record was appended before the
//! checkpoint's log sync, so that sync made it durable: either above the relog point the
//! checkpoint records (its extent is then hot in fact), or at or below it, when its change
//! had reached the image before the previous checkpoint synced the image. A writer that read
//! the new mark found the extent's record above the relog point the checkpoint records.
//!
//! **Re-heated by the checkpoint.** A write to a hot extent heats nothing (it needs no
//! sync), so an extent heated once went cold two checkpoints later however often it was
//! written meanwhile, and its next write synced the log just when the checkpoint's image
//! write-back made log syncs slow (random writes over a whole disk met that at every
//! checkpoint). So every record also notes, per extent, the highest LSN that touched it
//! (`touch`, durable or not), and a checkpoint, *before* it publishes its cooling mark,
//! syncs the log and gives each extent whose last touching record is at or below the
//! durable LSN that record's LSN ([`HotExtents::reheat`]). That keeps the invariant every
//! argument above rests on — an extent's LSN is that of a durable record touching it — so
//! nothing else changes: extents written in the interval that ends stay hot through the
//! next one. An extent whose last record is not yet durable keeps its LSN (its earlier
//! records are not tracked). The log sync comes before the image's write-back starts, so
//! it is quick. Re-heated extents count as heated in the interval that begins, and at most
//! `hot_limit / 2` are re-heated, so the bound below holds.
//!
//! Cost: one log sync per extent that turns hot, per two checkpoint intervals (writers
//! touching many cold extents share those syncs), plus one per checkpoint; a checkpoint is
//! requested when more than `hot_limit` extents turned hot (or were re-heated) since the
//! last, which bounds what recovery re-logs to about twice that.
//!
//! **Heating ahead of a sequential writer** (a read-ahead for the hot set). A writer
//! streaming at 2 GB/s crosses 500 extents of 4 MiB a second, and every checkpoint cooled
//! them all: one log sync per extent, each waiting behind the image's write-back, held the
//! sequential benchmark row at 0.58× of an untracked disk. So a record may say, in its
//! header's `ahead` field, that it heats the `ahead` extents after the one holding its last
//! byte as well as its own ([`HotExtents::plan`] decides; `heat_ahead` extents, 32 by
//! default). The rule stays the same with "touching" read as "touching, or within a
//! record's `ahead`": the sync that makes such a record durable heats its window, and
//! recovery after a host crash re-logs the windows of the records after the relog point
//! too ([`extents_after`]). Which writes get a window:
//! * only a write that continues a stream: it starts within two extents (or two of its own
//!   lengths) of where the previous such write ended, and is at least 1/64 of an extent
//!   (64 KiB for 4 MiB extents), so random writes on a large disk never heat windows (they would fill
//!   `hot_limit` 32 times sooner and checkpoint that much more often);
//! * when its own extent is cold (it syncs anyway; the window comes with the same sync), or
//!   when the extent half a window ahead is cold and no other writer has claimed a window
//!   holding it (a *pre-heat*: that one write takes the slow path and syncs while the
//!   others keep writing into the hot half of the window, so a steady stream never meets a
//!   cold extent between checkpoints);
//! * a pre-heat never while a checkpoint's syncs run (`ChangeLog::preheat_now`): its log
//!   sync would queue behind the image's write-back (seconds, measured), and the other
//!   writers behind it. The window is hot by the cooling mark meanwhile, so the write goes
//!   on inline with no window; the first continuing write after the checkpoint claims it.
//!   Skipping a pre-heat only heats less: the rule is untouched.
//!
//! Why windows keep the rule: a window's extents get the LSN of the record that heated
//! them, only after the log sync that made that record durable, and the record's header
//! names the window, so "a durable record above the cooling mark touches or windows the
//! extent" holds exactly as "touches" did. A write that then skips the sync in such an
//! extent is the case of the ordering paragraph above: either that heating record is
//! above the recorded relog point (recovery re-logs its window), or a checkpoint moved the
//! mark past it after the write read the old mark, so the write's record was appended
//! before that checkpoint's log sync: it is durable, and either above the relog point that
//! checkpoint records (recovery re-logs its extent) or at or below it (its change reached
//! the image before the previous checkpoint's image sync). The simulation fails when
//! recovery ignores the windows, a window is heated before its record's sync, recovery
//! re-logs after the redo point instead of the relog point, or a checkpoint records its
//! own redo point as the relog point (docs/changelog.md, "Tests").
//!
//! A window that is never written costs only its re-logging after a host crash (at most
//! one window per stream beyond what was written).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Smallest extent (DRBD's activity-log extent is 4 MiB too).
pub const MIN_EXTENT: u64 = 4 << 20;
/// At most this many extents are tracked per disk (memory: 8 bytes each).
const MAX_EXTENTS: u64 = 1 << 16;

/// The extent size for a disk of `disk_size` bytes: `min` (a power of two, normally
/// [`MIN_EXTENT`]), or larger so that no more than 65,536 extents exist.
pub fn extent_size(disk_size: u64, min: u64) -> u64 {
    let mut e = min.max(1).next_power_of_two();
    while disk_size.div_ceil(e) > MAX_EXTENTS {
        e *= 2;
    }
    e
}

/// What the hot-extent rule asks of one change (see [`HotExtents::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// An extent the change touches is cold: the log must be synced up to its record before
    /// the change reaches the image.
    pub sync: bool,
    /// Extents after the change's last one that its record may heat (its header's `ahead`).
    pub ahead: u16,
}

impl Plan {
    /// The window is a pre-heat: the change's own extents are hot, the record is to be synced
    /// only to heat its window (the inline path leaves that to the slow path).
    pub fn preheat(&self) -> bool {
        self.ahead > 0 && !self.sync
    }
}

/// Packs a claimed window `lo..=hi` of extent indexes (both below 2^32).
fn pack(lo: u64, hi: u64) -> u64 {
    (lo << 32) | (hi & 0xffff_ffff)
}

/// See the module documentation.
#[derive(Debug)]
pub struct HotExtents {
    extent: u64,
    disk_size: u64,
    /// Per extent: the LSN of a durable record touching it (0: none known).
    lsn: Vec<AtomicU64>,
    /// Per extent: the highest LSN of an appended record touching it, durable or not (see
    /// "Re-heated by the checkpoint"; [`Self::reheat`]).
    touched: Vec<AtomicU64>,
    /// Extents that turned hot since the last checkpoint (an estimate for the trigger).
    heated: AtomicUsize,
    /// Where the last write long enough to stream ended (sequential detection).
    stream_end: AtomicU64,
    /// The window of extents a pre-heat claimed (packed `lo..=hi`; 0: none), so that one
    /// writer syncs for it while the others keep writing.
    claimed: AtomicU64,
    /// Log syncs the rule made (for the metrics), and windows heated ahead of streams.
    syncs: AtomicU64,
    windows: AtomicU64,
}

impl HotExtents {
    /// Extents of [`extent_size`]`(disk_size, extent_min)` bytes.
    pub fn new(disk_size: u64, extent_min: u64) -> Self {
        let extent = extent_size(disk_size, extent_min);
        let n = disk_size.div_ceil(extent).max(1) as usize;
        Self {
            extent,
            disk_size,
            lsn: (0..n).map(|_| AtomicU64::new(0)).collect(),
            touched: (0..n).map(|_| AtomicU64::new(0)).collect(),
            heated: AtomicUsize::new(0),
            stream_end: AtomicU64::new(u64::MAX),
            claimed: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            windows: AtomicU64::new(0),
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
    /// touches has no durable record above `cool` (the cooling mark).
    pub fn needs_sync(&self, offset: u64, len: u64, cool: u64) -> bool {
        self.extents_of(offset, len).any(|e| {
            self.lsn
                .get(e as usize)
                .is_some_and(|l| l.load(Ordering::SeqCst) <= cool)
        })
    }

    /// What a change to `[offset, offset+len)` needs, with the cooling mark `cool` (an
    /// extent whose durable record is at or below it is cold), the pending checkpoint
    /// `pending` (an extent at or below it cools at the next checkpoint: a window is heated
    /// again before that) and windows of `window` extents (0: never heat ahead). Call it
    /// once per record, just before the record is written (it follows the stream). With
    /// `claim`, a pre-heat claims its window (the path that will sync for it); without, a
    /// pre-heat is only reported (the inline path then declines, and the slow path claims
    /// it).
    pub fn plan(
        &self,
        offset: u64,
        len: u64,
        cool: u64,
        pending: u64,
        window: u16,
        claim: bool,
    ) -> Plan {
        let sync = self.needs_sync(offset, len, cool);
        let none = Plan { sync, ahead: 0 };
        if window == 0 || len < (self.extent / 64).max(1) {
            return none;
        }
        let end = offset.saturating_add(len);
        let prev = self.stream_end.swap(end, Ordering::Relaxed);
        if prev == u64::MAX || prev.abs_diff(offset) > 2 * self.extent.max(len) {
            return none;
        }
        let last = *self.extents_of(offset, len).end();
        let n = self.lsn.len() as u64;
        let ahead = u64::from(window).min(n.saturating_sub(last + 1));
        if ahead == 0 {
            return none;
        }
        let window_plan = Plan {
            sync,
            ahead: ahead as u16,
        };
        if sync {
            self.claimed
                .store(pack(last + 1, last + ahead), Ordering::Relaxed);
            return window_plan;
        }
        let mid = last + ahead.div_ceil(2);
        let cooling = self
            .lsn
            .get(mid as usize)
            .is_some_and(|l| l.load(Ordering::SeqCst) <= pending);
        let c = self.claimed.load(Ordering::Relaxed);
        if !cooling || (c != 0 && (c >> 32) <= mid && mid <= (c & 0xffff_ffff)) {
            return none;
        }
        if claim
            && self
                .claimed
                .compare_exchange(
                    c,
                    pack(last + 1, last + ahead),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            // Another writer claimed a window meanwhile.
            return none;
        }
        window_plan
    }

    /// Records that the log is durable up to `lsn`, a record touching `[offset, offset+len)`
    /// whose header says `ahead`: its extents and the `ahead` after them are hot. Those that
    /// were at or below the pending checkpoint `pending` count as heated (for `hot_limit`).
    pub fn heat(&self, offset: u64, len: u64, ahead: u16, lsn: u64, pending: u64) {
        if ahead > 0 {
            self.windows.fetch_add(1, Ordering::Relaxed);
        }
        for e in extents_with_window(self.extent, self.disk_size, offset, len, ahead) {
            if let Some(l) = self.lsn.get(e as usize) {
                let before = l.fetch_max(lsn, Ordering::SeqCst);
                if before <= pending {
                    self.heated.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Notes that record `lsn`, appended, touches `[offset, offset+len)` (durable or not yet:
    /// [`Self::reheat`] uses it only once the log is durable past it).
    pub fn touch(&self, offset: u64, len: u64, lsn: u64) {
        for e in self.extents_of(offset, len) {
            if let Some(t) = self.touched.get(e as usize) {
                t.fetch_max(lsn, Ordering::SeqCst);
            }
        }
    }

    /// The log is durable up to `durable`: every extent whose last touching record is at or
    /// below it gets that record's LSN (a durable record touching it). Called by a checkpoint
    /// after a log sync and before it publishes its cooling mark, so that extents written in
    /// the interval stay hot (see "Re-heated by the checkpoint"). An extent touched since by
    /// a record not yet durable is left as it is (its earlier records are not tracked).
    /// At most `max` extents get a higher LSN (they count as heated in the interval that
    /// begins, see [`Self::cooled`]); returns how many did.
    pub fn reheat(&self, durable: u64, max: usize) -> usize {
        let mut n = 0;
        for (l, t) in self.lsn.iter().zip(&self.touched) {
            if n >= max {
                break;
            }
            let t = t.load(Ordering::SeqCst);
            if t <= durable && l.fetch_max(t, Ordering::SeqCst) < t {
                n += 1;
            }
        }
        n
    }

    /// Counts a log sync the rule made a writer wait for.
    pub fn note_sync(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Log syncs the rule made and windows heated ahead of streams, since the log opened.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.syncs.load(Ordering::Relaxed),
            self.windows.load(Ordering::Relaxed),
        )
    }

    /// Forgets every hot extent (a new chain: LSNs restart).
    pub fn clear(&self) {
        for l in self.lsn.iter().chain(&self.touched) {
            l.store(0, Ordering::SeqCst);
        }
        self.heated.store(0, Ordering::Relaxed);
        self.claimed.store(0, Ordering::Relaxed);
    }

    /// Extents heated since the last [`Self::cooled`].
    pub fn heated(&self) -> usize {
        self.heated.load(Ordering::Relaxed)
    }

    /// A checkpoint completed (extents whose LSN its cooling mark passed are cold by
    /// comparison); `reheated` extents it kept hot ([`Self::reheat`]) count as heated in the
    /// interval that begins (they will be in what recovery re-logs, as heated ones are).
    pub fn cooled(&self, reheated: usize) {
        self.heated.store(reheated, Ordering::Relaxed);
        // A claimed window may be cold again: the next writer that finds it so claims anew.
        self.claimed.store(0, Ordering::Relaxed);
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

/// Extents that `[offset, offset+len)` touches and the `ahead` after its last one, up to
/// the disk's last extent: what a record heats, and what recovery re-logs for it.
pub fn extents_with_window(
    extent: u64,
    disk_size: u64,
    offset: u64,
    len: u64,
    ahead: u16,
) -> std::ops::RangeInclusive<u64> {
    let r = extents_of(extent, disk_size, offset, len);
    let n = disk_size.div_ceil(extent).max(1);
    let last = (*r.end() + u64::from(ahead)).min(n - 1).max(*r.end());
    *r.start()..=last
}

/// Extents (of `extent` bytes) touched by the records with an LSN above `after` (the relog
/// point) in `segments`, and the `ahead` extents after each one's last: what recovery after
/// a host crash logs again.
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
                out.extend(extents_with_window(
                    extent, disk_size, h.offset, h.length, h.ahead,
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::format::Kind;

    #[test]
    fn extents_heat_and_cool_by_checkpoint() {
        let h = HotExtents::new(64 << 20, MIN_EXTENT);
        assert_eq!(h.extent(), MIN_EXTENT);
        assert_eq!(h.extents_of(0, 1), 0..=0);
        assert_eq!(h.extents_of(MIN_EXTENT - 1, 2), 0..=1);
        assert!(h.needs_sync(100, 10, 0));
        h.heat(100, 10, 0, 5, 0);
        assert!(!h.needs_sync(100, 10, 0));
        assert!(!h.needs_sync(100, 10, 4));
        // A checkpoint at or past the hot record cools the extent.
        assert!(h.needs_sync(100, 10, 5));
        // A range spanning a cold extent needs the sync.
        assert!(h.needs_sync(MIN_EXTENT - 1, 2, 0));
        assert_eq!(h.heated(), 1);
        h.cooled(0);
        assert_eq!(h.heated(), 0);
        // Huge disks get larger extents, never more than 65,536 of them.
        assert_eq!(extent_size(1 << 40, MIN_EXTENT), 16 << 20);
        assert_eq!(extent_size(1 << 20, 4096), 4096);
        assert_eq!(extent_size(1 << 20, 3000), 4096);
    }

    #[test]
    fn a_checkpoint_reheats_only_extents_whose_last_record_is_durable() {
        let h = HotExtents::new(8 * E, E);
        // Extents 0..4 heated at LSN 1 (a synced record); later records touch 0, 1 and 2.
        h.heat(0, 4 * E, 0, 1, 0);
        h.touch(0, 1, 5);
        h.touch(E, 1, 9);
        h.touch(2 * E, 1, 6);
        h.touch(2 * E, 1, 12);
        // The log is durable up to 10: 0 and 1 get their records' LSNs; 2's last record
        // (12) is not durable and its earlier ones are not tracked, so it keeps LSN 1.
        assert_eq!(h.reheat(10, usize::MAX), 2);
        assert!(!h.needs_sync(0, 2 * E, 4));
        assert!(h.needs_sync(2 * E, 1, 4));
        // Nothing to raise again; at most `max` extents per call.
        assert_eq!(h.reheat(10, usize::MAX), 0);
        h.touch(5 * E, 3 * E, 11);
        assert_eq!(h.reheat(11, 2), 2);
        assert!(!h.needs_sync(5 * E, 2 * E, 4));
        assert!(h.needs_sync(7 * E, 1, 4));
        // They count as heated in the interval that begins.
        h.cooled(2);
        assert_eq!(h.heated(), 2);
    }

    const E: u64 = MIN_EXTENT;

    #[test]
    fn a_stream_heats_windows_ahead_and_random_writes_never_do() {
        let h = HotExtents::new(1 << 30, E); // 256 extents
        let big = 1 << 20;
        // The first write has no stream to continue: its own extent only.
        let p = h.plan(0, big, 0, 0, 8, true);
        assert_eq!((p.sync, p.ahead, p.preheat()), (true, 0, false));
        h.heat(0, big, p.ahead, 1, 0);
        // The next one continues it, in a hot extent whose half-window ahead is cold: a
        // pre-heat of 8 extents, claimed.
        let p = h.plan(big, big, 0, 0, 8, true);
        assert_eq!((p.sync, p.ahead, p.preheat()), (false, 8, true));
        // A write beside it finds the window claimed: nothing to do (no sync, no window).
        let p = h.plan(2 * big, big, 0, 0, 8, true);
        assert_eq!((p.sync, p.ahead, p.preheat()), (false, 0, false));
        // The claimed pre-heat's record is synced, then its window is hot: extents 1..=8.
        h.heat(big, big, 8, 2, 0);
        assert!(!h.needs_sync(E, 8 * E, 0));
        assert!(h.needs_sync(9 * E, 1, 0));
        assert_eq!(h.heated(), 9);
        // Writes go on inside the window without a sync, until its middle is behind them.
        for i in 3..4 * 4 {
            let p = h.plan(i * big, big, 0, 0, 8, true);
            assert!(!p.sync && p.ahead == 0, "{i}: {p:?}");
        }
        let p = h.plan(16 * big, big, 0, 0, 8, true); // extent 4: its half-window ahead is 8, hot
        assert!(!p.sync && p.ahead == 0, "{p:?}");
        let p = h.plan(20 * big, big, 0, 0, 8, true); // extent 5: 9 is cold, outside the claim
        assert_eq!((p.sync, p.ahead, p.preheat()), (false, 8, true));
        // Without claiming (the inline path), a pre-heat is reported and not claimed.
        let h2 = HotExtents::new(1 << 30, E);
        h2.plan(0, big, 0, 0, 8, false);
        h2.heat(0, big, 0, 1, 0);
        assert!(h2.plan(big, big, 0, 0, 8, false).preheat());
        assert!(h2.plan(2 * big, big, 0, 0, 8, false).preheat());
        // A checkpoint cools everything and drops the claim; a stream that finds its own
        // extent cold gets a window with the sync it needs anyway.
        h.cooled(0);
        let p = h.plan(21 * big, big, 2, 2, 8, true);
        assert_eq!((p.sync, p.ahead, p.preheat()), (true, 8, false));
        // Random writes far apart never get a window, nor writes under 1/64 of an extent.
        let r = HotExtents::new(1 << 30, E);
        for (i, off) in [0u64, 700 << 20, 90 << 20, 400 << 20, 10 << 20]
            .iter()
            .enumerate()
        {
            let p = r.plan(*off, big, 0, 0, 8, true);
            assert_eq!(p.ahead, 0, "{i}");
        }
        let s = HotExtents::new(1 << 30, E);
        for i in 0..64u64 {
            assert_eq!(s.plan(i * 4096, 4096, 0, 0, 8, true).ahead, 0);
        }
        // A window never reaches past the disk's last extent.
        let t = HotExtents::new(10 * E, E);
        t.plan(7 * E, big, 0, 0, 8, true);
        let p = t.plan(7 * E + big, big, 0, 0, 8, true);
        assert_eq!(p.ahead, 2);
        t.heat(7 * E + big, big, p.ahead, 3, 0);
        assert!(!t.needs_sync(7 * E, 3 * E, 0));
        // 0: heating ahead is off.
        let o = HotExtents::new(1 << 30, E);
        o.plan(0, big, 0, 0, 0, true);
        assert_eq!(o.plan(big, big, 0, 0, 0, true).ahead, 0);
    }

    /// Two intervals: an extent heated in the interval the pending checkpoint closes stays
    /// hot (no sync), but a stream's window in it is heated again before the next
    /// checkpoint would cool it.
    #[test]
    fn the_pending_checkpoint_warns_and_the_cooling_mark_cools() {
        let h = HotExtents::new(1 << 30, E);
        let big = 1 << 20;
        h.plan(0, big, 0, 0, 8, true);
        // Extents 0..=16 hot at LSN 5.
        h.heat(0, big, 16, 5, 0);
        // A checkpoint at LSN 7 is pending; the cooling mark is the previous redo point, 0.
        assert!(!h.needs_sync(0, 17 * E, 0));
        let p = h.plan(big, big, 0, 7, 8, true);
        assert_eq!((p.sync, p.ahead, p.preheat()), (false, 8, true));
        h.heat(big, big, 8, 8, 7);
        // The next checkpoint's mark (7) cools what only LSN 5 heated, not the new window.
        assert!(!h.needs_sync(0, 9 * E, 7));
        assert!(h.needs_sync(9 * E, 1, 7));
        // Without a stream, a write in a warm extent neither syncs nor heats ahead.
        let r = HotExtents::new(1 << 30, E);
        r.heat(0, 4096, 0, 5, 0);
        let p = r.plan(0, 4096, 0, 7, 8, true);
        assert_eq!((p.sync, p.ahead), (false, 0));
    }

    #[test]
    fn recovery_relogs_the_windows_records_say_they_heated() {
        use crate::changelog::format::{encode_header, encode_record, RecordHeader, SegmentHeader};
        let d = tempfile::tempdir().unwrap();
        let size = 64 * E;
        let rec = |lsn, offset, length, ahead| {
            encode_record(
                &RecordHeader {
                    lsn,
                    kind: Kind::Extent,
                    flags: 0,
                    ahead,
                    offset,
                    length,
                    data_len: 0,
                },
                &[],
            )
        };
        let mut seg = encode_header(&SegmentHeader {
            disk_id: [1; 16],
            chain_id: 7,
            seq: 1,
            first_lsn: 1,
            disk_size: size,
        })
        .to_vec();
        seg.extend(rec(1, 0, E, 4)); // at the checkpoint: not relogged
        seg.extend(rec(2, 10 * E, 1 << 20, 3)); // 10, and 11..=13
        seg.extend(rec(3, 62 * E, E + 1, 5)); // 62, 63; the window stops at the disk's end
        seg.extend(rec(4, 30 * E, 1, 0)); // 30
        let p = d.path().join("s");
        std::fs::write(&p, &seg).unwrap();
        let got = extents_after(&[p], 1, E, size).unwrap();
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![10, 11, 12, 13, 30, 62, 63]
        );
    }
}
