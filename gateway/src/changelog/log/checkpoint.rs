//! Redo durability: FLUSH makes the *log* durable; the image is made durable lazily, by
//! checkpoints.
//!
//! * **Log sync** ([`ChangeLog::sync_log`]): fdatasync of the unsealed segments (and of the
//!   directory when segments were created). After it, every record up to the LSN it noted is
//!   durable (`log_durable`). A sync round (FLUSH, FUA) runs it and, only when an
//!   image-dependent record ([`ChangeLog::note_image_dependent`]) is newer than the last image
//!   sync, syncs the image too.
//! * **Checkpoint** ([`ChangeLog::checkpoint`]): with C = the LSN up to which every change has
//!   reached the image, publish C as *pending* and the previous redo point as the *cooling
//!   mark*, sync the log, sync the image, then record C in `state.toml` (written atomically
//!   and fsynced) as the redo point and the previous one as the *relog point*. Recovery
//!   replays every record after the recorded C, and after a host crash logs again the
//!   extents of the records after the relog point. With nothing new in the image, only the
//!   relog point moves up (no image sync). Run by a background thread once the oldest change
//!   it would cover is `checkpoint_interval` old (`Schedule`; with nothing new, that long
//!   after the last one), when `checkpoint_bytes` of log were appended since the last one,
//!   when more than `hot_limit` extents are hot, and at every seal (so `take` and clean
//!   shutdown), and by `release` before deleting a segment the relog point has not passed: a
//!   segment is deleted only when it is both shipped and below the relog point.
//! * **Hot extents** (see [`super::super::hot`], "Two intervals"): a change to an extent with
//!   no durable record above the cooling mark first syncs the log up to its own record.
//! * **After a host crash** ([`ChangeLog::relog_extents`]): the image's bytes of every extent
//!   touched by a record after the relog point are logged again, so the log describes what the
//!   image holds, including writes whose records the crash took.
//!
//! A failed sync latches (see [`super::super::durable`]) and breaks the chain, as everywhere.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::{lock, ChangeLog, Seg};
use crate::changelog::durable::Target;
use crate::changelog::format::{Kind, RecordHeader, FLAG_IMAGE_SYNCED};
use crate::changelog::hot::HotExtents;
use crate::changelog::hot::Plan;
use crate::changelog::segment;
use crate::changelog::LogError;

/// Largest record written when an extent is logged again after a host crash.
const RELOG_PIECE: u64 = 1 << 20;

/// Wakes the background checkpointer: on a timer, when asked, or to stop.
#[derive(Debug, Default)]
pub(crate) struct Trigger {
    st: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Trigger {
    /// Asks for a checkpoint now.
    fn kick(&self) {
        lock(&self.st).0 = true;
        self.cv.notify_all();
    }

    /// Stops the checkpointer.
    pub(crate) fn stop(&self) {
        lock(&self.st).1 = true;
        self.cv.notify_all();
    }

    /// Waits for a kick, a stop or `tick`; says which came (a stop before a kick).
    fn wait(&self, tick: Duration) -> Wake {
        let mut g = lock(&self.st);
        if !g.0 && !g.1 {
            g = self
                .cv
                .wait_timeout(g, tick)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let kicked = std::mem::take(&mut g.0);
        match (g.1, kicked) {
            (true, _) => Wake::Stop,
            (false, true) => Wake::Kick,
            (false, false) => Wake::Tick,
        }
    }
}

/// What woke the background checkpointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The log is closing: the thread ends.
    Stop,
    /// A checkpoint was asked for (`checkpoint_bytes` of log, `hot_limit` hot extents).
    Kick,
    /// Its tick: time to look whether the timer's checkpoint is due.
    Tick,
}

/// When the background checkpointer's timer checkpoints: once the oldest change the redo
/// point does not cover may be `every` old — the kernel's own rule for dirty pages
/// (`vm.dirty_expire_centisecs`) — not on a fixed grid. Under continuous writes that is
/// every `every`, as a grid would be; a burst of writes shorter than `every` after a quiet
/// spell has its image sync (a write-back of all it dirtied) after the burst, as the
/// kernel's, not in its middle. With nothing new in the image, the cheap checkpoint that
/// only moves the relog point comes `every` after the last one. See docs/changelog.md,
/// "When the timer checkpoints".
#[derive(Debug, Clone, Copy)]
struct Schedule {
    every: Duration,
    /// The last moment the image was known to hold nothing above the redo point (a tick
    /// that found nothing new, or the start of a checkpoint, which covers every change
    /// applied before it): every change not covered is younger than this.
    clean_at: Instant,
    /// The start of the last checkpoint the schedule ran.
    last: Instant,
}

impl Schedule {
    fn new(every: Duration, now: Instant) -> Self {
        Self {
            every,
            clean_at: now,
            last: now,
        }
    }

    /// How often the thread looks: a second, or `every` when shorter. A change is then
    /// between `every` minus a tick and `every` plus a tick old when its checkpoint starts
    /// (the kernel's flusher looks every 5 s).
    fn tick(&self) -> Duration {
        self.every.min(Duration::from_secs(1))
    }

    /// Whether to checkpoint at `now`, woken by `wake`, with `new`: the image holds changes
    /// the redo point does not cover.
    fn due(&mut self, now: Instant, wake: Wake, new: bool) -> bool {
        if !new {
            self.clean_at = now;
        }
        let since = |t: Instant| now.saturating_duration_since(t) >= self.every;
        match wake {
            Wake::Stop => false,
            Wake::Kick => true,
            Wake::Tick if new => since(self.clean_at),
            Wake::Tick => since(self.last),
        }
    }

    /// A checkpoint started at `now`.
    fn ran(&mut self, now: Instant) {
        self.clean_at = now;
        self.last = now;
    }
}

/// Checkpoint and durability bookkeeping of one log.
#[derive(Debug)]
pub(crate) struct Ckpt {
    /// Serializes checkpoints (lock order: `seal_lock` → this → `ap` → `st`).
    lock: Mutex<()>,
    /// The redo point recorded in the state file.
    done: AtomicU64,
    /// The checkpoint being taken (≥ `done`): published before its log sync.
    pub(super) pending: AtomicU64,
    /// The cooling mark: an extent whose durable record is at or below it is cold. The
    /// redo point before the pending checkpoint's, published with `pending` (see `hot`,
    /// "Two intervals").
    pub(super) cool: AtomicU64,
    /// The relog point recorded in the state file (≤ `done`): after a host crash, recovery
    /// logs again the extents of every record above it, so no segment above it is deleted.
    relog: AtomicU64,
    /// Every record up to this LSN is durable in the log.
    log_durable: AtomicU64,
    log_sync_lock: Mutex<()>,
    /// Newest image-dependent record, and the newest one an image sync covered.
    image_dep: AtomicU64,
    image_synced: AtomicU64,
    /// Log bytes appended since the last checkpoint.
    since: AtomicU64,
    pub(crate) hot: HotExtents,
    pub(crate) trigger: Arc<Trigger>,
    /// Notified after every checkpoint recorded.
    recorded: Condvar,
    recorded_m: Mutex<()>,
    /// A background checkpointer runs: seals and releases then never wait for an image sync
    /// (its next checkpoint covers them; see `release`).
    background: AtomicBool,
    /// A checkpoint's syncs are running: a pre-heat then waits for nothing (see
    /// [`ChangeLog::preheat_now`]).
    pub(super) syncing: AtomicBool,
}

impl Ckpt {
    /// `checkpoint` and `relog`: the redo and relog points the state file records.
    pub(crate) fn new(disk_size: u64, extent_min: u64, checkpoint: u64, relog: u64) -> Self {
        Self {
            lock: Mutex::new(()),
            done: AtomicU64::new(checkpoint),
            pending: AtomicU64::new(checkpoint),
            cool: AtomicU64::new(relog),
            relog: AtomicU64::new(relog),
            log_durable: AtomicU64::new(checkpoint),
            log_sync_lock: Mutex::new(()),
            image_dep: AtomicU64::new(0),
            image_synced: AtomicU64::new(0),
            since: AtomicU64::new(0),
            hot: HotExtents::new(disk_size, extent_min),
            trigger: Arc::new(Trigger::default()),
            recorded: Condvar::new(),
            recorded_m: Mutex::new(()),
            background: AtomicBool::new(false),
            syncing: AtomicBool::new(false),
        }
    }

    /// A new chain starts (LSNs restart at 1). Call holding [`ChangeLog::checkpoint_guard`].
    pub(super) fn reset(&self) {
        for a in [
            &self.done,
            &self.pending,
            &self.cool,
            &self.relog,
            &self.log_durable,
            &self.image_dep,
            &self.image_synced,
            &self.since,
        ] {
            a.store(0, Ordering::SeqCst);
        }
        self.hot.clear();
    }
}

impl ChangeLog {
    /// Makes every record appended so far durable: fdatasync of the unsealed segments and,
    /// when segments were created, of the directory.
    pub(super) fn sync_log(&self) -> io::Result<()> {
        let (files, dir_dirty, upto, drop) = {
            let mut ap = lock(&self.sh.ap);
            let mut files: Vec<Arc<Seg>> = ap.retired.iter().map(|a| Arc::clone(&a.seg)).collect();
            let mut drop = None;
            if let Some(a) = ap.active.as_mut() {
                // A sync that drops pages writes its zeroes a page at a time, into the
                // pages it frees (see `LARGE_FILL_PIECE`).
                let range = a.cache_to_drop();
                let piece = range.map_or(super::LARGE_FILL_PIECE, |_| super::page_piece());
                a.fill_ahead(self.sh.opts.segment_size, piece);
                files.push(Arc::clone(&a.seg));
                drop = range.map(|range| (Arc::clone(&a.seg), range));
            }
            let upto = ap.next_lsn.wrapping_sub(1);
            (files, std::mem::take(&mut ap.dir_dirty), upto, drop)
        };
        let dur = &self.sh.dur;
        let r = files
            .iter()
            .try_for_each(|seg| dur.sync_data(Target::Log, &seg.file))
            .and_then(|()| match dir_dirty {
                true => dur.sync_dir(&self.sh.dir),
                false => Ok(()),
            });
        match &r {
            Ok(()) => {
                self.sh.ck.log_durable.fetch_max(upto, Ordering::SeqCst);
                // The pages just made durable, so the zeroes written next reuse their
                // memory (see `DROP_SPAN`). A hint: a failure only keeps them cached.
                if let Some((seg, (from, to))) = drop {
                    if let Err(e) = segment::drop_cached(&seg.file, from, to) {
                        debug!(disk = %self.sh.name, "log pages not dropped from the page cache: {e}");
                    }
                }
            }
            Err(e) => self.sync_failed(e),
        }
        r
    }

    /// The image part of a sync round, before the log's sync: the image is synced only when
    /// an image-dependent record newer than the last image sync exists (the log holds every
    /// other byte). Then a flush barrier flagged [`FLAG_IMAGE_SYNCED`] records up to which
    /// LSN the image is durable (every record up to it had reached the image before the
    /// sync), which the log's sync that follows makes durable: after a host crash, recovery
    /// trusts an extent's bytes to be in the image only up to there
    /// ([`crate::changelog::replay::replay_after_host_crash`]).
    ///
    /// The image part runs under the checkpoint lock, as checkpoints and
    /// [`ChangeLog::reset`] do: a new chain cannot begin between this sync and the barrier and
    /// `image_synced` it leaves, which would otherwise speak of the old chain's LSNs in the
    /// new one.
    pub(super) fn sync_image_if_dependent(&self) -> io::Result<()> {
        let ck = &self.sh.ck;
        let dep = ck.image_dep.load(Ordering::SeqCst);
        if dep <= ck.image_synced.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _g = lock(&ck.lock);
        if dep <= ck.image_synced.load(Ordering::SeqCst) {
            // A checkpoint recorded meanwhile covers it.
            return Ok(());
        }
        // Only what has reached the image is made durable by this sync: a record noted
        // image-dependent but still being applied needs the next round.
        let through = lock(&self.sh.st).applied_upto;
        self.sync_image()?;
        ck.image_synced
            .fetch_max(dep.min(through), Ordering::SeqCst);
        self.append_image_synced(through);
        Ok(())
    }

    /// Appends the flush barrier saying that the image is durable through LSN `through`
    /// ([`FLAG_IMAGE_SYNCED`], the LSN in its offset field). It changes nothing, so it is
    /// complete at once.
    fn append_image_synced(&self, through: u64) {
        let mut h = RecordHeader {
            lsn: 0,
            kind: Kind::Flush,
            flags: FLAG_IMAGE_SYNCED,
            ahead: 0,
            offset: through,
            length: 0,
            data_len: 0,
        };
        let (lsn, rotated) = self.append(&mut h, &[], false);
        self.complete_many(&[], &[lsn]);
        if rotated {
            self.seal_in_background();
        }
    }

    /// fdatasync of the image (a failure latches and breaks the chain).
    pub(super) fn sync_image(&self) -> io::Result<()> {
        self.sh
            .dur
            .sync_data(Target::Image, &self.sh.image)
            .inspect_err(|e| self.sync_failed(e))
    }

    /// The chain and the LSN through which recovery after a host crash will find every change
    /// in the image: the redo point recorded by a checkpoint, or an image-synced barrier of a
    /// sync round (appended, so made durable by the log sync of any round that starts after
    /// this call; if that sync fails, the failure latches and no FLUSH succeeds again). Read
    /// under the append lock, where [`ChangeLog::reset`] starts a new chain, so the two
    /// belong together. The FLUSH pass skips deferred writes up to it (see
    /// [`crate::changelog::extent`], "Deferred small writes").
    pub fn image_trusted(&self) -> (u64, u64) {
        let ap = lock(&self.sh.ap);
        (ap.chain_id, self.sh.ck.image_synced.load(Ordering::SeqCst))
    }

    /// Declares record `lsn` image-dependent: its data was written to the image only (the
    /// log holds no copy). Call it after the record was appended and before its request
    /// completes; the next sync round (FLUSH, FUA) then syncs the image as well as the log.
    /// `record` calls it for every kind [`crate::changelog::replay::image_dependent`] names,
    /// so a new kind only needs its arm there. (Passing a later LSN than the record's is
    /// safe: it can only cause an extra image sync.)
    pub fn note_image_dependent(&self, lsn: u64) {
        self.sh.ck.image_dep.fetch_max(lsn, Ordering::SeqCst);
    }

    /// The hot-extent rule, between appending record `lsn` (a change to
    /// `[offset, offset+len)` whose header says `ahead`) and applying it to the image: if an
    /// extent it touches has no durable record above the cooling mark, or the record heats
    /// a window ahead of a stream, sync the log up to this record first; then its extents
    /// (and window) are hot.
    pub(super) fn guard_image_change(&self, offset: u64, len: u64, ahead: u16, lsn: u64) {
        let ck = &self.sh.ck;
        ck.hot.touch(offset, len, lsn);
        let cool = ck.cool.load(Ordering::SeqCst);
        if ahead == 0 && !ck.hot.needs_sync(offset, len, cool) {
            return;
        }
        if ck.log_durable.load(Ordering::SeqCst) < lsn {
            let _g = lock(&ck.log_sync_lock);
            if ck.log_durable.load(Ordering::SeqCst) < lsn {
                ck.hot.note_sync();
                if let Err(e) = self.sync_log() {
                    self.mark_broken(format!(
                        "the change log could not be synced before a change reached a cold part of the image: {e}"
                    ));
                    self.persist_if_dirty();
                    return;
                }
            }
        }
        ck.hot
            .heat(offset, len, ahead, lsn, ck.pending.load(Ordering::SeqCst));
        if ck.hot.heated() > self.sh.opts.hot_limit {
            ck.trigger.kick();
        }
    }

    /// Log syncs the hot-extent rule made writers wait for (a change reaching a cold part of
    /// the image, or a window heated ahead of a sequential writer), and the windows heated,
    /// since the log was opened.
    pub fn hot_counters(&self) -> (u64, u64) {
        self.sh.ck.hot.counters()
    }

    /// Counts appended log bytes; asks for a checkpoint every `checkpoint_bytes`.
    pub(super) fn note_appended(&self, bytes: u64) {
        let ck = &self.sh.ck;
        let before = ck.since.fetch_add(bytes, Ordering::Relaxed);
        if before < self.sh.opts.checkpoint_bytes && before + bytes >= self.sh.opts.checkpoint_bytes
        {
            ck.trigger.kick();
        }
    }

    /// The redo point recorded in the state file: every change up to this LSN is durable in
    /// the image.
    pub fn checkpoint_lsn(&self) -> u64 {
        self.sh.ck.done.load(Ordering::SeqCst)
    }

    /// Whether a pre-heat should sync now: not while a checkpoint's syncs run (its log sync
    /// would queue behind the image's write-back for seconds, and the writer with it; the
    /// extents stay hot by the cooling mark meanwhile, see `hot`, "Two intervals").
    pub(super) fn preheat_now(&self) -> bool {
        !self.sh.ck.syncing.load(Ordering::SeqCst)
    }

    /// What the hot-extent rule asks of a change to `[offset, offset+len)`, with the current
    /// cooling mark, pending checkpoint and `heat_ahead` window ([`HotExtents::plan`]; with
    /// `claim`, a pre-heat claims its window).
    pub(super) fn plan_hot(&self, offset: u64, len: u64, claim: bool) -> Plan {
        let ck = &self.sh.ck;
        ck.hot.plan(
            offset,
            len,
            ck.cool.load(Ordering::SeqCst),
            ck.pending.load(Ordering::SeqCst),
            self.sh.opts.heat_ahead,
            claim,
        )
    }

    /// Tests: as if a checkpoint's syncs were running (or not), without running one.
    #[cfg(test)]
    pub(crate) fn set_checkpoint_syncing(&self, on: bool) {
        self.sh.ck.syncing.store(on, Ordering::SeqCst);
    }

    /// The relog point recorded in the state file: after a host crash, recovery logs again
    /// the extents of every record above it (see `hot`, "Two intervals").
    pub fn relog_lsn(&self) -> u64 {
        self.sh.ck.relog.load(Ordering::SeqCst)
    }

    /// Takes a checkpoint: every change that has reached the image is made durable there
    /// (log first, then image) and the state file records the LSN up to which that holds,
    /// and the previous redo point as the relog point. Returns the checkpointed LSN.
    /// Blocking. Nothing to do on a log that is not recording.
    ///
    /// With nothing new in the image since the last checkpoint, only the relog point moves
    /// up to the redo point (when it is below it): the cooling mark is published and the log
    /// synced, as below, without the image sync.
    pub fn checkpoint(&self) -> Result<u64, LogError> {
        let ck = &self.sh.ck;
        let _g = lock(&ck.lock);
        let done = ck.done.load(Ordering::SeqCst);
        if !self.sh.logging.load(Ordering::Acquire) {
            return Ok(done);
        }
        let c = lock(&self.sh.st).applied_upto.max(done);
        if c == done && ck.relog.load(Ordering::SeqCst) >= done {
            return Ok(done);
        }
        // Re-heat (`hot`, "Re-heated by the checkpoint"): with the log durable up to here,
        // every extent whose last record is durable gets that record's LSN, so the extents
        // written in the interval that ends stay hot past the cooling mark published below,
        // and their next writes need no log sync while the image syncs. This log sync comes
        // before the image's write-back starts, so it is quick.
        self.sync_log()
            .map_err(LogError::io("cannot sync the change log in", &self.sh.dir))?;
        let reheated = ck.hot.reheat(
            ck.log_durable.load(Ordering::SeqCst),
            self.sh.opts.hot_limit / 2,
        );
        {
            // Published under the append lock: the inline path (`try_record_now`) checks the
            // hot-extent rule and appends under it, so either it saw this cooling mark or its
            // record is appended before this checkpoint's log sync (see `inline`). The cooling
            // mark is the redo point recorded before this one, which this checkpoint records
            // as the relog point: every extent a writer finds hot from now on has a durable
            // record above it.
            let _ap = lock(&self.sh.ap);
            ck.pending.fetch_max(c, Ordering::SeqCst);
            ck.cool.fetch_max(done, Ordering::SeqCst);
        }
        ck.syncing.store(true, Ordering::SeqCst);
        let _syncing = Syncing(&ck.syncing);
        let dir = &self.sh.dir;
        self.sync_log()
            .map_err(LogError::io("cannot sync the change log in", dir))?;
        if c > done {
            if let Err(e) = self.sh.dur.sync_data(Target::Image, &self.sh.image) {
                self.sync_failed(&e);
                return Err(LogError::io("cannot sync the image of", dir)(e));
            }
        }
        {
            let mut st = lock(&self.sh.st);
            if !st.state.is_healthy() {
                return Ok(done);
            }
            st.p.applied_lsn = st.p.applied_lsn.max(c);
            st.p.relog_after = Some(st.p.relog_point().max(done));
        }
        self.persist()?;
        ck.relog.fetch_max(done, Ordering::SeqCst);
        // Only now, with the redo point recorded: recovery after a host crash trusts the
        // image through the recorded redo point or an image-synced barrier, nothing else. A
        // sync round that found `image_synced` advanced by a checkpoint not yet recorded
        // would skip its own image sync and barrier, and an extent (or a deferred write a
        // FLUSH relied on, see `image_trusted`) could then be replayed over after a crash.
        ck.image_synced.fetch_max(c, Ordering::SeqCst);
        {
            let _g = lock(&ck.recorded_m);
            ck.done.fetch_max(c, Ordering::SeqCst);
            ck.recorded.notify_all();
        }
        ck.hot.cooled(reheated);
        ck.since.store(0, Ordering::Relaxed);
        Ok(c)
    }

    /// Waits until a checkpoint at or past `lsn` is recorded (by anyone, e.g. the background
    /// checkpointer), at most `timeout`. Returns whether it was.
    pub fn wait_checkpoint(&self, lsn: u64, timeout: Duration) -> bool {
        let ck = &self.sh.ck;
        let deadline = std::time::Instant::now() + timeout;
        let mut g = lock(&ck.recorded_m);
        loop {
            if ck.done.load(Ordering::SeqCst) >= lsn {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            g = ck
                .recorded
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Whether a background checkpointer runs (then seals and releases leave checkpoints to
    /// it).
    pub(super) fn background_checkpoints(&self) -> bool {
        self.sh.ck.background.load(Ordering::Acquire)
    }

    /// Holds checkpoints back (`reset` takes it after `seal_lock`, before `ap` and `st`).
    pub(super) fn checkpoint_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.sh.ck.lock)
    }

    /// Starts the background checkpointer (when the options ask for one).
    pub(super) fn start_checkpointer(&self) {
        let Some(every) = self.sh.opts.checkpoint_interval else {
            return;
        };
        let weak = Arc::downgrade(&self.sh);
        let trigger = Arc::clone(&self.sh.ck.trigger);
        let spawned = std::thread::Builder::new()
            .name("hrl-ckpt".into())
            .spawn(move || {
                let mut schedule = Schedule::new(every, Instant::now());
                loop {
                    let wake = trigger.wait(schedule.tick());
                    if wake == Wake::Stop {
                        return;
                    }
                    let Some(sh) = weak.upgrade() else { return };
                    let me = ChangeLog { sh };
                    let new = {
                        let st = lock(&me.sh.st);
                        if st.closed {
                            return;
                        }
                        st.applied_upto > me.sh.ck.done.load(Ordering::SeqCst)
                    };
                    let now = Instant::now();
                    if !schedule.due(now, wake, new) {
                        continue;
                    }
                    schedule.ran(now);
                    match me.checkpoint() {
                        // Segments shipped meanwhile can go now that they are checkpointed.
                        Ok(_) => {
                            if let Err(e) = me.release_checkpointed() {
                                warn!(disk = %me.sh.name, "cannot release shipped change-log segments: {e}");
                            }
                        }
                        Err(e) => warn!(disk = %me.sh.name, "change-log checkpoint failed: {e}"),
                    }
                }
            });
        match spawned {
            Ok(_) => self.sh.ck.background.store(true, Ordering::Release),
            Err(e) => {
                warn!(disk = %self.sh.name, "cannot start the checkpoint thread ({e}): the image is checkpointed only at seals and releases")
            }
        }
    }

    /// After a host crash: logs the image's current bytes of every extent in `extents`
    /// (write records), then checkpoints. Until that checkpoint is recorded the redo point
    /// stays where it was, so a crash meanwhile repeats the repair. Returns the bytes logged.
    pub(super) fn relog_extents(&self, extents: &BTreeSet<u64>) -> Result<u64, LogError> {
        let ext = self.sh.ck.hot.extent();
        let size = self.sh.disk_size;
        let dir = &self.sh.dir;
        let mut logged = 0u64;
        for &e in extents {
            let start = e.saturating_mul(ext);
            let end = start.saturating_add(ext).min(size);
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(RELOG_PIECE);
                let mut buf = vec![0u8; n as usize];
                self.sh
                    .image
                    .read_exact_at(&mut buf, pos)
                    .map_err(LogError::io("cannot read the image of", dir))?;
                self.record(Kind::Write, 0, pos, n, &buf, || Ok(()))
                    .map_err(LogError::io("cannot log the image of", dir))?;
                logged += n;
                pos += n;
            }
        }
        self.checkpoint()?;
        info!(disk = %self.sh.name, extents = extents.len(), bytes = logged, "host crash: parts of the image that may hold writes the log lost were logged again");
        Ok(logged)
    }
}

/// Clears the "checkpoint syncing" flag when a checkpoint's syncs end, on every path.
struct Syncing<'a>(&'a AtomicBool);

impl Drop for Syncing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests;
