//! [`ChangeLog`]: the live change log of one disk.
//!
//! **Write path** (`record`): under the request lock the request waits until no in-flight
//! request overlaps its range and registers its range. Under the append lock it reserves the
//! next LSN and its place in the active segment (rotating first if the segment is full) and
//! writes header and data with one `pwritev` — so records reach the log file in LSN order and
//! the log is always a contiguous prefix. Then (after the hot-extent rule of [`super::hot`]:
//! a change to a cold extent first syncs the log up to its record) it applies the change to
//! the image and releases its range. So the image never holds a change the log lacks — in
//! the page cache; on disk after a host crash only within hot extents, which recovery logs
//! again — and overlapping requests reach log and image in the same order. [`batch`] does the
//! same for a batch of small writes (the disk's writer thread) with one `pwritev`. The active
//! segment is written ahead with zeroes by each log sync (`Active::fill_ahead`), so a sync
//! rarely changes the file's size; decoding ends a segment at zeroes that run to the end of
//! the file. A sync that made at most [`DROP_SPAN`] bytes of records durable then drops their
//! pages from the page cache, so the zeroes written next reuse that memory
//! (`Active::cache_to_drop`). Small writes may also be logged inline on the caller's thread
//! when nothing has to wait ([`ChangeLog::try_record_now`], in [`inline`]); their 40-byte
//! records are copied into a mapping of the active segment instead of written
//! ([`super::segmap`]: same page cache, no system call), which needs the zeroes ahead too
//! (`Active::write_mapped`).
//!
//! **Sync** (`sync`, used by FLUSH and FUA): group commit. A caller needs one sync round that
//! starts after it arrived; the first waiter becomes the leader of the next round, everyone
//! who arrived before that round started shares it. A round waits for the requests reserved
//! before it to complete, then fdatasyncs the unsealed segments and the directory when
//! segments were created — the *log*, not the image (redo durability; the image is synced
//! only when an image-dependent record asks for it, first, followed by an image-synced
//! barrier that the log's sync makes durable). See [`checkpoint`]. The bytes of deferred
//! small writes are logged before the round by the disk ([`deferred`] has the log's side).
//!
//! **Checkpoints** ([`checkpoint`]): the image is made durable lazily — by a background
//! thread every few seconds and every N MiB of log — and the state
//! file then records the checkpointed LSN (the redo point) and the one before it (the relog
//! point). Segments are deleted only when both shipped and below the relog point
//! ([`release`]); a cut never waits for the image's sync.
//! Without the background thread (`checkpoint_interval` off) seals and releases checkpoint
//! themselves.
//!
//! **Rotation**: when the next record would pass the segment size, a new segment is started
//! and the old one is sealed in the background (after its in-flight requests drain): footer
//! with the seal digest (kept up to date as records are appended, see [`format`]),
//! fdatasync (the next checkpoint covers it). `take` does the same at a flush barrier and
//! waits for the seal; `close` seals the active segment at clean shutdown.
//!
//! **Recovery** (`open`): verify sealed segments, cut the torn tail, replay every record after
//! the checkpoint into the image and sync it; after a host crash (boot id changed, no clean
//! shutdown) extents supersede earlier records only up to the last image sync the log knows
//! of (`replay::replay_after_host_crash`), and the hot extents (of the records after the
//! relog point) are logged again. This file is
//! past 700 lines because recovery, the write path and the sync rounds share the log's
//! private state; new logic goes to [`checkpoint`] and sibling modules.
//!
//! **State file** (`state.toml`): chain id, first live segment and LSN (after `release`), the
//! redo and relog points, clean-shutdown flag with the image's mtime and the boot id, and the persistent
//! health (healthy / broken / overflow with the reason).

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use super::durable::{Durability, Target};
use super::format::{self, End, Kind, RecordHeader, SegmentHeader, HEADER_LEN, RECORD_HEADER_LEN};
use super::segmap::{self, SegMap};
use super::segment::{self, create_segment, list_segments, pwritev_all, seal_file};
use super::{hot, replay, LogError, LogOptions, LogState};
use crate::catalog::write_atomic;

mod batch;
mod checkpoint;
mod deferred;
mod inline;
mod release;

pub use batch::{overlaps, BatchWrite};

pub const STATE_FILE: &str = "state.toml";
const LOCK_FILE: &str = "lock";

/// One segment of the chain, as the replicator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub seq: u64,
    pub first_lsn: u64,
    /// `first_lsn - 1` when the segment holds no record.
    pub last_lsn: u64,
    pub records: u64,
    /// File size (for the active segment: bytes reserved so far).
    pub bytes: u64,
    /// Bytes its extent records stand for (their data is in the image, not in this file;
    /// shipping sends them). The backlog of a segment is `bytes + extent_bytes`.
    pub extent_bytes: u64,
    pub path: PathBuf,
    pub sealed: bool,
}

/// Where recovery cut a torn tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub seq: u64,
    /// Length of the segment kept (header and whole records).
    pub at: u64,
    /// Bytes dropped from that segment and from the segments after it.
    pub dropped_bytes: u64,
    /// Later segment files that were discarded entirely.
    pub discarded_segments: Vec<u64>,
    pub reason: String,
}

/// What opening (and recovering) a log found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub fresh: bool,
    pub segments: usize,
    pub cut: Option<Cut>,
    /// Records re-applied to the image (those after the checkpoint).
    pub redone: u64,
    /// The host restarted since the log was last open, without a clean shutdown.
    pub host_crash: bool,
    /// Image bytes logged again after a host crash (the hot extents).
    pub relogged: u64,
    pub last_lsn: u64,
    pub state: LogState,
}

/// The persistent state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    pub disk_id: String,
    /// Hex, 16 digits.
    pub chain_id: String,
    /// First segment not yet released, and its first LSN.
    pub first_seq: u64,
    pub first_lsn: u64,
    /// Every record with an LSN up to this one is known to be in the image.
    pub applied_lsn: u64,
    /// The log was closed cleanly (then `image_mtime_ns` is the mtime the close gave the image:
    /// one second before that moment, which no later write can produce).
    pub clean: bool,
    pub image_mtime_ns: i64,
    pub boot_id: String,
    /// The chain's health (with `reason` when it is not healthy).
    pub state: ChainHealth,
    #[serde(default)]
    pub reason: String,
    /// LSN of the last cut (recovery point) of this chain, recorded before the writes after
    /// it resume ([`ChangeLog::note_cut`]): the extents a reopened map loads up to it belong
    /// to a cut, later ones do not (see [`super::extent`], "After a restart"). Absent from
    /// the state files of older builds, which did not record it: opening such a log takes
    /// its last LSN (every record then counts as cut, as those builds assumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cut_lsn: Option<u64>,
    /// The relog point: the redo point before the last one (see
    /// [`super::hot`], "Two intervals"). After a host crash, recovery logs again the
    /// image's bytes of the extents of every record above it, so the segments above it are
    /// kept. Absent from the state files of older builds, which relogged after the redo
    /// point: [`StateFile::relog_point`] then takes `applied_lsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relog_after: Option<u64>,
}

/// The chain's health as the state file stores it (`state = "healthy"` …); [`LogState`] with
/// the reason is the in-memory form, and [`StateFile::log_state`] / [`StateFile::set_state`]
/// are the one conversion between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainHealth {
    Healthy,
    Broken,
    Overflow,
}

impl ChainHealth {
    pub fn label(self) -> &'static str {
        match self {
            ChainHealth::Healthy => "healthy",
            ChainHealth::Broken => "broken",
            ChainHealth::Overflow => "overflow",
        }
    }
}

impl std::fmt::Display for ChainHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl StateFile {
    fn fresh(disk_id: &str) -> Self {
        Self {
            format: 1,
            disk_id: disk_id.to_string(),
            chain_id: format!("{:016x}", random_u64()),
            first_seq: 0,
            first_lsn: 1,
            applied_lsn: 0,
            clean: false,
            image_mtime_ns: 0,
            boot_id: boot_id(),
            state: ChainHealth::Healthy,
            reason: String::new(),
            last_cut_lsn: Some(0),
            relog_after: Some(0),
        }
    }

    /// The relog point (never above the redo point).
    pub fn relog_point(&self) -> u64 {
        self.relog_after
            .unwrap_or(self.applied_lsn)
            .min(self.applied_lsn)
    }

    pub fn log_state(&self) -> LogState {
        let reason = self.reason.clone();
        match self.state {
            ChainHealth::Healthy => LogState::Healthy,
            ChainHealth::Overflow => LogState::Overflow { reason },
            ChainHealth::Broken => LogState::Broken { reason },
        }
    }

    fn set_state(&mut self, s: &LogState) {
        self.state = match s {
            LogState::Healthy => ChainHealth::Healthy,
            LogState::Broken { .. } => ChainHealth::Broken,
            LogState::Overflow { .. } => ChainHealth::Overflow,
        };
        self.reason = s.reason().unwrap_or_default().to_string();
    }
}

/// Reads the state file of a log directory (`None` when there is none).
pub fn read_state(dir: &Path) -> Result<Option<StateFile>, LogError> {
    let path = dir.join(STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io("cannot read", &path)(e)),
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| LogError::BadState {
            path,
            reason: e.to_string(),
        })
}

fn random_u64() -> u64 {
    let id = crate::catalog::new_id();
    u64::from_str_radix(&id[..16.min(id.len())], 16).unwrap_or(0x5eed)
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn mtime_ns(f: &File) -> io::Result<i64> {
    let m = f.metadata()?;
    Ok(m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec()))
}

/// Gives the image of a log closed cleanly an mtime that no later write can give it: one
/// second before now (the kernel stamps a write with its coarse clock, which never reads that
/// far back), then syncs it with the inode. Opening compares the mtime with this stamp, so a
/// write made without the log is seen even within the file system's timestamp granularity,
/// where comparing with the mtime of the last logged write would miss it.
fn stamp_mtime(f: &File, dur: &Durability) -> io::Result<i64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(io::Error::other)?;
    let secs = now.as_secs().saturating_sub(1);
    let nanos = now.subsec_nanos();
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: nanos as libc::c_long,
        },
    ];
    // SAFETY: futimens on an open descriptor with a two-element array that outlives the call.
    if unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Timestamps are inode metadata: fdatasync may leave them unwritten.
    dur.sync_all(Target::Image, f)?;
    mtime_ns(f)
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

struct Seg {
    seq: u64,
    first_lsn: u64,
    path: PathBuf,
    file: File,
}

struct Active {
    seg: Arc<Seg>,
    pos: u64,
    /// The file's length: bytes from `pos` up to here are zeroes written ahead of the
    /// records (see [`Self::fill_ahead`]).
    filled: u64,
    count: u64,
    /// Sum of the lengths of its extent records (see [`SegmentInfo::extent_bytes`]).
    extent_bytes: u64,
    /// The seal digest of the records written so far (header, then each record header):
    /// sealing needs no read of the segment.
    digest: format::SealDigest,
    /// A writable mapping of the segment for the inline path's records without data (see
    /// [`super::segmap`]); `None` where the file system or the option does not allow it.
    /// Dropped when the segment is retired.
    map: Option<SegMap>,
    /// The page-cache pages below this offset were dropped after a log sync made them durable,
    /// or left to the kernel (see [`Self::cache_to_drop`]).
    cache_done: u64,
}

/// Zeroes written ahead of the records of the active segment at a time.
const FILL_AHEAD: u64 = 1 << 20;
/// The zeroes go out in writes of [`LARGE_FILL_PIECE`] bytes, or of one page each when the
/// log sync that writes them drops the pages it made durable ([`DROP_SPAN`]); each write ends
/// on a multiple of its size.
///
/// A buffered write allocates page-cache folios as large as itself (kernels with large folios
/// on ext4, 6.16 and later), and a small write into a large folio costs more: in a loop of
/// 4,136-byte appends (a 4 KiB write's record; `tools/bench/append.py`), appends into zeroes
/// written as one 1 MiB write took 1.55–1.69 µs each, into zeroes written in 16–256 KiB
/// pieces 0.78–0.98 µs; with an `fdatasync` every 64 appends, zeroes in 256 KiB pieces cost
/// about 8 µs less per append than page-sized ones (fewer writes, fewer folios to write back).
/// Page-sized folios are what lets a sync's dropped pages serve as the next zeroes' pages: the
/// kernel keeps freed single pages on per-CPU lists and hands them out again first, while a
/// freed large folio goes back to the buddy allocator, where a hypervisor that takes free
/// guest memory back (free page reporting) may reclaim it, so the next page written there
/// faults in the host first. Measured on the flush row (BENCHMARKS.md, "The flush row's
/// pages, recycled"): page-sized zeroes and dropped pages ran the row at 1.17–1.24× the rate
/// of 256 KiB zeroes and kept pages; either change alone did not move it.
const LARGE_FILL_PIECE: u64 = 256 << 10;

/// One page, the zeroes' piece where the sync drops pages (at least 512 bytes, at most
/// [`LARGE_FILL_PIECE`]).
fn page_piece() -> u64 {
    (crate::mapped::page_size() as u64).clamp(512, LARGE_FILL_PIECE)
}

/// A log sync drops the page-cache pages it made durable — whole pages behind the records,
/// from where the last sync left off — when they span at most this many bytes: the log of a
/// FLUSH loop of small writes, which would otherwise grow into a new page of memory per
/// write or two. Its pages are read back from the disk when the segment is shipped, a few
/// bytes per FLUSH. A sync that made more durable (large writes between FLUSHes, a
/// checkpoint's sync of a log written without FLUSH) leaves its pages to the kernel, so
/// the shipper finds them cached. The tail page, which the next records go on filling, is
/// never dropped.
const DROP_SPAN: u64 = 256 << 10;

/// A buffer of [`LARGE_FILL_PIECE`] zeroes.
fn zeroes() -> &'static [u8] {
    static Z: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    Z.get_or_init(|| vec![0u8; LARGE_FILL_PIECE as usize].into_boxed_slice())
}

/// Writes zeroes over `[from, to)` of `file` in pieces of `piece` bytes (at most
/// [`LARGE_FILL_PIECE`]), each ending on a multiple of it; returns where the zeroes written
/// without a gap end.
pub(super) fn write_zeroes(file: &File, from: u64, to: u64, piece: u64) -> u64 {
    let piece = piece.clamp(1, LARGE_FILL_PIECE);
    let mut at = from;
    while at < to {
        let end = ((at / piece + 1) * piece).min(to);
        if file
            .write_all_at(&zeroes()[..(end - at) as usize], at)
            .is_err()
        {
            break;
        }
        at = end;
    }
    at
}

impl Active {
    /// Keeps the file written (with zeroes) ahead of the records: when the records reach
    /// the zeroes' end, the next [`FILL_AHEAD`] bytes (never past the segment size, unless a
    /// record already did) are written as zeroes. Appends then overwrite allocated blocks
    /// inside the file's size, so the `fdatasync` of a FLUSH writes the records' pages
    /// without an inode-size update (a journal commit on ext4 and XFS) for all but one sync
    /// per [`FILL_AHEAD`] bytes. Called by the log sync (`sync_log`), just before its
    /// `fdatasync`, and by the mapped path when a record does not fit below the zeroes
    /// ([`Self::write_mapped`]: a copy into the mapping must land in written blocks), not
    /// per append: a log of records with data that is never synced (writes without FLUSH)
    /// pays no zeroes, and one synced often pays them once per [`FILL_AHEAD`] / 2 bytes, as
    /// an append-time fill would. Call under the append lock after the records up to `pos`
    /// were written: the zeroes start at `max(pos, filled)`, never over a record. Decoding
    /// ends a segment at zeroes that run to the end of the file (see
    /// [`format::decode_segment`]). A failure is harmless (the next append extends the file
    /// as before), so it is ignored. `piece`: the size of the zeroes' writes (see
    /// [`LARGE_FILL_PIECE`]).
    fn fill_ahead(&mut self, segment_size: u64, piece: u64) {
        if self.pos + FILL_AHEAD / 2 <= self.filled {
            return;
        }
        let from = self.pos.max(self.filled);
        let target = (self.pos + FILL_AHEAD).min(segment_size);
        if target <= from {
            self.filled = from;
            return;
        }
        self.filled = write_zeroes(&self.seg.file, from, target, piece);
        if let Some(m) = self.map.as_mut() {
            m.drop_behind(self.pos);
        }
    }

    /// The page-cache range a log sync may drop once it has made the records up to `pos`
    /// durable: the whole pages from where the last sync left off up to the page holding
    /// `pos` (which the next records go on filling) or the first page the segment's mapping
    /// may map, when they span at most [`DROP_SPAN`] bytes; `None` otherwise, and larger
    /// spans are left to the kernel. Either way the next sync starts where this one ends.
    /// Call under the append lock, when the sync takes its files: every record below `pos`
    /// was written then, and the sync makes its pages clean.
    fn cache_to_drop(&mut self) -> Option<(u64, u64)> {
        let page = crate::mapped::page_size() as u64;
        // Pages the segment's mapping may still map are not dropped (the kernel would keep
        // them, after draining every CPU's page lists to try again): records copied into
        // the mapping wait until its page tables are dropped behind them.
        let mapped = self.map.as_ref().map_or(u64::MAX, SegMap::mapped_from);
        let to = (self.pos / page * page).min(mapped);
        if to <= self.cache_done {
            return None;
        }
        let from = std::mem::replace(&mut self.cache_done, to);
        (to - from <= DROP_SPAN).then_some((from, to))
    }

    /// Writes the record `parts` at `pos` through the segment's mapping if it has one and
    /// the record fits below the zeroes ahead (writing more zeroes first when it does not,
    /// see [`Self::fill_ahead`]); `false`: the caller writes it with `pwritev`. Call under
    /// the append lock, with `pos` the records' end (before it is moved past this one).
    fn write_mapped(&mut self, pos: u64, parts: &[&[u8]], segment_size: u64) -> bool {
        // The zeroes start at `self.pos`: a record past it would land in a hole.
        if self.map.is_none() || pos != self.pos {
            return false;
        }
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if pos + len > self.filled {
            self.fill_ahead(segment_size, LARGE_FILL_PIECE);
        }
        let filled = self.filled;
        self.map
            .as_mut()
            .is_some_and(|m| m.write(pos, parts, filled))
    }
}

struct Inflight {
    id: u64,
    start: u64,
    end: u64,
}

/// Request bookkeeping: ranges in flight, health, sealed segments, persistent state.
struct St {
    state: LogState,
    sealed: Vec<SegmentInfo>,
    inflight: Vec<Inflight>,
    next_ticket: u64,
    /// LSNs completed (applied to the image) above `applied_upto`.
    applied_done: BTreeSet<u64>,
    /// Every LSN up to this one has completed.
    applied_upto: u64,
    range_waiters: usize,
    closed: bool,
    paused: bool,
    p: StateFile,
    /// The replicator has stored every record up to this LSN (see [`release`]): sealed
    /// segments at or below it wait only for a checkpoint to be deleted, and no longer count
    /// as backlog. In memory only: after a restart the next release says it again.
    shipped_through: u64,
}

/// The append side: LSNs, the active segment and the segments waiting to be sealed. Its lock
/// is held across the `pwritev` (or the copy into the mapping) of a record, so records reach
/// the log in LSN order and the
/// log is always a contiguous prefix (lock order: `ap` before `st`, never the reverse).
struct Ap {
    chain_id: u64,
    next_lsn: u64,
    active: Option<Active>,
    /// Full segments waiting to be sealed, oldest first.
    retired: VecDeque<Active>,
    dir_dirty: bool,
}

#[derive(Default)]
struct SyncSt {
    started: u64,
    completed: u64,
    running: bool,
    failed_gen: u64,
    last_error: String,
}

struct Shared {
    name: String,
    dir: PathBuf,
    disk_id: [u8; 16],
    disk_size: u64,
    opts: LogOptions,
    image: File,
    /// The disk's syncs (log and image); a failure latches (see [`super::durable`]).
    dur: Arc<Durability>,
    st: Mutex<St>,
    ap: Mutex<Ap>,
    /// Mirrors `st.state.is_healthy()` for the append path.
    logging: AtomicBool,
    range_cv: Condvar,
    sync: Mutex<SyncSt>,
    sync_cv: Condvar,
    seal_lock: Mutex<()>,
    persist_lock: Mutex<()>,
    state_dirty: AtomicBool,
    appended: AtomicU64,
    /// Disk bytes covered by the records appended (writes, zeroes, trims; for `/metrics`).
    recorded: AtomicU64,
    sync_rounds: AtomicU64,
    /// Records copied into a segment's mapping (see [`super::segmap`]).
    mapped: AtomicU64,
    /// Checkpoints, log/image durability watermarks, hot extents (see [`checkpoint`]).
    ck: checkpoint::Ckpt,
    /// Opened after a clean shutdown (or fresh).
    opened_clean: bool,
    /// Segments are mapped for the inline path's records (`LogOptions::mapped_records` and a
    /// file system that overwrites in place, see [`super::segmap`]).
    map_records: bool,
    _lock: File,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.ck.trigger.stop();
    }
}

/// The change log of one disk. Cheap to clone (clones share the log).
#[derive(Clone)]
pub struct ChangeLog {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for ChangeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeLog")
            .field("disk", &self.sh.name)
            .field("dir", &self.sh.dir)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

/// Takes the log directory's lock, retrying for up to a second (a log being closed in this
/// process may still be releasing it).
fn lock_dir_retry(dir: &Path) -> Result<File, LogError> {
    let mut tries = 0;
    loop {
        match lock_dir(dir) {
            Err(LogError::Locked(_)) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Takes an exclusive, non-blocking `flock` on the log directory's lock file.
fn lock_dir(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(LogError::io("cannot open", &path))?;
    // SAFETY: flock on a valid descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LogError::Locked(dir.to_path_buf()));
        }
        return Err(LogError::io("cannot lock", &path)(e));
    }
    Ok(f)
}

/// Whether another process holds the log directory (e.g. a running `standby serve`).
pub fn is_locked(dir: &Path) -> bool {
    matches!(lock_dir(dir), Err(LogError::Locked(_)))
}

/// Removes a log directory (refused while a process has the log open).
pub fn remove_log_dir(dir: &Path) -> Result<(), LogError> {
    if !dir.exists() {
        return Ok(());
    }
    let _guard = lock_dir(dir)?;
    fs::remove_dir_all(dir).map_err(LogError::io("cannot remove", dir))
}

/// What recovery of the segment files produced.
struct Recovered {
    sealed: Vec<SegmentInfo>,
    next_seq: u64,
    next_lsn: u64,
}

pub(crate) struct Ctx<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) disk_id: [u8; 16],
    pub(crate) chain_id: u64,
    pub(crate) disk_size: u64,
}

pub(crate) fn check_header(h: &SegmentHeader, seq: u64, cx: &Ctx<'_>) -> Result<(), String> {
    if h.seq != seq {
        return Err(format!("segment file {seq} says it is segment {}", h.seq));
    }
    if h.disk_id != cx.disk_id {
        return Err(format!("segment {seq} belongs to another disk"));
    }
    if h.chain_id != cx.chain_id {
        return Err(format!(
            "segment {seq} belongs to another log chain ({:016x})",
            h.chain_id
        ));
    }
    if h.disk_size != cx.disk_size {
        return Err(format!(
            "segment {seq} was written for a disk of {} bytes, the disk now has {}",
            h.disk_size, cx.disk_size
        ));
    }
    Ok(())
}

fn info_of(seq: u64, path: &Path, d: &format::Decoded, bytes: u64) -> SegmentInfo {
    SegmentInfo {
        seq,
        first_lsn: d.header.first_lsn,
        last_lsn: d.last_lsn(),
        records: d.records.len() as u64,
        bytes,
        extent_bytes: d.records.iter().map(|r| r.header.backlog_extra()).sum(),
        path: path.to_path_buf(),
        sealed: true,
    }
}

/// Verifies the sealed segments, cuts and seals the unsealed tail. `Err` is a broken chain.
fn recover_segments(
    cx: &Ctx<'_>,
    dur: &Durability,
    p: &StateFile,
    report: &mut RecoveryReport,
) -> Result<Recovered, String> {
    let segs = list_segments(cx.dir).map_err(|e| format!("cannot list segments: {e}"))?;
    let mut expect_seq = p.first_seq;
    let mut expect_lsn = p.first_lsn;
    let mut sealed = Vec::new();
    let mut in_tail = false;
    let mut cut: Option<Cut> = None;
    let n = segs.len();
    for (idx, (seq, path)) in segs.into_iter().enumerate() {
        if seq < p.first_seq {
            // Released but not yet deleted when the process stopped.
            let _ = fs::remove_file(&path);
            continue;
        }
        let bytes = fs::read(&path).map_err(|e| format!("cannot read segment {seq}: {e}"))?;
        if let Some(c) = cut.as_mut() {
            // After a cut: discard, unless the file is sealed (which a cut cannot explain).
            if let Ok(d) = format::decode_segment(&bytes) {
                if d.sealed() {
                    return Err(format!(
                        "segment {} is damaged at byte {} ({}) but segment {seq} after it is sealed",
                        c.seq, c.at, c.reason
                    ));
                }
            }
            c.dropped_bytes += bytes.len() as u64;
            c.discarded_segments.push(seq);
            fs::remove_file(&path).map_err(|e| format!("cannot remove segment {seq}: {e}"))?;
            continue;
        }
        if seq != expect_seq {
            return Err(format!(
                "segment {expect_seq} is missing (the next one present is {seq})"
            ));
        }
        let d = match format::decode_segment(&bytes) {
            Ok(d) => d,
            Err(e)
                if segment::is_stub(bytes.len() as u64)
                    || bytes[..HEADER_LEN].iter().all(|&b| b == 0) =>
            {
                // Torn while being created: it cannot hold any record. (A header still all
                // zeroes: a host crash kept the file's size but not its data, which no sync
                // had covered. Every sync covers the older segments first, so no later
                // segment was synced either: nothing from here on was acknowledged. A sealed
                // segment after it breaks the chain below.)
                cut = Some(Cut {
                    seq,
                    at: 0,
                    dropped_bytes: bytes.len() as u64,
                    discarded_segments: vec![seq],
                    reason: e.to_string(),
                });
                fs::remove_file(&path).map_err(|e| format!("cannot remove segment {seq}: {e}"))?;
                continue;
            }
            Err(e) => return Err(format!("segment {seq}: {e}")),
        };
        check_header(&d.header, seq, cx)?;
        match &d.end {
            End::Sealed(_) if in_tail => {
                return Err(format!(
                    "segment {seq} is sealed but follows an unsealed segment"
                ))
            }
            End::Sealed(_) => {
                if d.header.first_lsn != expect_lsn {
                    return Err(format!(
                        "LSN gap: segment {seq} starts at LSN {} but LSN {expect_lsn} was expected",
                        d.header.first_lsn
                    ));
                }
                expect_lsn = d.last_lsn().wrapping_add(1);
                expect_seq = seq + 1;
                sealed.push(info_of(seq, &path, &d, bytes.len() as u64));
                report.segments += 1;
            }
            End::Open if p.clean => {
                // Clean shutdown seals every segment: this one lost its footer.
                return Err(format!(
                    "segment {seq} is not sealed although the log was closed cleanly"
                ));
            }
            End::Open | End::Torn { .. } => {
                in_tail = true;
                let last = idx + 1 == n;
                if d.header.first_lsn != expect_lsn {
                    if d.header.first_lsn < expect_lsn {
                        return Err(format!(
                            "LSN overlap: segment {seq} starts at LSN {} but LSN {expect_lsn} was expected",
                            d.header.first_lsn
                        ));
                    }
                    // Records reserved at the end of the previous segment never reached
                    // it: nothing from here on can be in the image or acknowledged as
                    // durable, so it is cut.
                    cut = Some(Cut {
                        seq,
                        at: 0,
                        dropped_bytes: bytes.len() as u64,
                        discarded_segments: vec![seq],
                        reason: format!(
                            "starts at LSN {} but the log ends at LSN {}",
                            d.header.first_lsn,
                            expect_lsn.wrapping_sub(1)
                        ),
                    });
                    fs::remove_file(&path)
                        .map_err(|e| format!("cannot remove segment {seq}: {e}"))?;
                    continue;
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| format!("cannot open segment {seq}: {e}"))?;
                if let End::Torn { reason } = &d.end {
                    warn!(
                        segment = seq,
                        at = d.valid_len,
                        dropped = bytes.len() as u64 - d.valid_len,
                        "cutting torn tail of the change log: {reason}"
                    );
                    cut = Some(Cut {
                        seq,
                        at: d.valid_len,
                        dropped_bytes: bytes.len() as u64 - d.valid_len,
                        discarded_segments: Vec::new(),
                        reason: reason.clone(),
                    });
                }
                expect_lsn = d.last_lsn().wrapping_add(1);
                if d.records.is_empty() && (last || cut.is_some()) {
                    // An empty last segment: the new active segment takes its place.
                    drop(file);
                    fs::remove_file(&path)
                        .map_err(|e| format!("cannot remove segment {seq}: {e}"))?;
                    expect_seq = seq;
                    continue;
                }
                let len = seal_file(
                    &file,
                    d.valid_len,
                    d.records.len() as u64,
                    d.last_lsn(),
                    format::seal_digest(&bytes, &d.records, d.valid_len as usize),
                    |f| dur.sync_data(Target::Log, f),
                )
                .map_err(|e| format!("cannot seal segment {seq}: {e}"))?;
                let mut info = info_of(seq, &path, &d, len);
                info.sealed = true;
                sealed.push(info);
                expect_seq = seq + 1;
                report.segments += 1;
            }
        }
    }
    if let (Some(c), true) = (&cut, p.clean) {
        return Err(format!(
            "segment {} is damaged at byte {} ({}) although the log was closed cleanly",
            c.seq, c.at, c.reason
        ));
    }
    report.cut = cut;
    dur.sync_dir(cx.dir)
        .map_err(|e| format!("cannot sync log directory: {e}"))?;
    Ok(Recovered {
        sealed,
        next_seq: expect_seq,
        next_lsn: expect_lsn,
    })
}

impl ChangeLog {
    /// Opens (creating if needed) the change log in `dir` for a disk, recovering it.
    ///
    /// `image` is the disk image (open for writing): recovery re-applies records it may
    /// lack, and sync rounds fdatasync it together with the log.
    pub fn open(
        name: &str,
        dir: &Path,
        disk_id: &str,
        image: &File,
        disk_size: u64,
        opts: LogOptions,
    ) -> Result<(ChangeLog, RecoveryReport), LogError> {
        Self::open_with(
            name,
            dir,
            disk_id,
            image,
            disk_size,
            opts,
            Durability::os(name),
        )
    }

    /// [`Self::open`] with the disk's syncs (shared with the disk, so a failed sync of the
    /// image or the log latches for both; see [`super::durable`]).
    pub fn open_with(
        name: &str,
        dir: &Path,
        disk_id: &str,
        image: &File,
        disk_size: u64,
        opts: LogOptions,
        dur: Arc<Durability>,
    ) -> Result<(ChangeLog, RecoveryReport), LogError> {
        fs::create_dir_all(dir).map_err(LogError::io("cannot create", dir))?;
        let lock_file = lock_dir_retry(dir)?;
        let image = image
            .try_clone()
            .map_err(LogError::io("cannot duplicate image descriptor for", dir))?;
        let existing = list_segments(dir).map_err(LogError::io("cannot list", dir))?;
        let (mut p, fresh) = match read_state(dir)? {
            Some(p) => (p, false),
            None => {
                let mut p = StateFile::fresh(disk_id);
                if !existing.is_empty() {
                    p.set_state(&LogState::Broken {
                        reason: "the log's state file is missing".into(),
                    });
                }
                (p, existing.is_empty())
            }
        };
        let mut state = p.log_state();
        let chain_id = u64::from_str_radix(&p.chain_id, 16).unwrap_or(0);
        if state.is_healthy() && p.disk_id != disk_id {
            state = LogState::Broken {
                reason: format!("the log belongs to disk id {}", p.disk_id),
            };
        }
        let mut report = RecoveryReport {
            fresh,
            segments: 0,
            cut: None,
            redone: 0,
            host_crash: false,
            relogged: 0,
            last_lsn: p.first_lsn.wrapping_sub(1),
            state: LogState::Healthy,
        };
        let cx = Ctx {
            dir,
            disk_id: format::disk_id_bytes(disk_id),
            chain_id,
            disk_size,
        };
        let mut rec = Recovered {
            sealed: Vec::new(),
            next_seq: p.first_seq,
            next_lsn: p.first_lsn,
        };
        if state.is_healthy() {
            match recover_segments(&cx, &dur, &p, &mut report) {
                Ok(r) => rec = r,
                Err(reason) => state = LogState::Broken { reason },
            }
        }
        let last_lsn = rec.next_lsn.wrapping_sub(1);
        report.last_lsn = last_lsn;
        let mut host_crash = false;
        if state.is_healthy() && !fresh {
            let mtime = mtime_ns(&image).map_err(LogError::io("cannot stat image of", dir))?;
            let boot = boot_id();
            if p.clean && mtime != p.image_mtime_ns {
                state = LogState::Broken {
                    reason: "the image was modified after the last clean shutdown without the change log (newer than its log)".into(),
                };
            } else if p.applied_lsn > last_lsn {
                state = LogState::Broken {
                    reason: format!(
                        "the image holds changes up to LSN {} but the log ends at LSN {last_lsn}",
                        p.applied_lsn
                    ),
                };
            } else if p.first_lsn > p.applied_lsn.wrapping_add(1) {
                state = LogState::Broken {
                    reason: format!(
                        "the log starts at LSN {} but the image is checkpointed only up to LSN {}",
                        p.first_lsn, p.applied_lsn
                    ),
                };
            } else if !p.clean && !p.boot_id.is_empty() && !boot.is_empty() && p.boot_id != boot {
                // The host restarted without a clean shutdown: the log is durable up to every
                // acknowledged flush (sealed segments and synced records survive), the image
                // only up to the checkpoint. Redo below brings the image forward, and the
                // parts of the image that may hold writes whose records were lost are logged
                // again (see `hot`).
                host_crash = true;
                warn!(disk = name, checkpoint = p.applied_lsn, last_lsn, "the host restarted without a clean shutdown: replaying the log after the checkpoint");
            }
        }
        let mut relog = std::collections::BTreeSet::new();
        // After a host crash, the extents of the records above the relog point (the redo
        // point before the last) are logged again, even when the redo point is the log's
        // end: a write whose record the crash took may lie in one (see `hot`).
        let relog_after = p.relog_point();
        if host_crash && p.first_lsn > relog_after.wrapping_add(1) {
            state = LogState::Broken {
                reason: format!(
                    "the log starts at LSN {} but recovery after a host crash needs its records from LSN {}",
                    p.first_lsn,
                    relog_after + 1
                ),
            };
        }
        let from = match host_crash {
            true => relog_after,
            false => p.applied_lsn,
        };
        if state.is_healthy() && from < last_lsn {
            let paths: Vec<PathBuf> = rec
                .sealed
                .iter()
                .filter(|s| s.last_lsn > from)
                .map(|s| s.path.clone())
                .collect();
            let ext = hot::extent_size(disk_size, opts.hot_extent_min);
            let redo = match host_crash {
                true => replay::replay_after_host_crash,
                false => replay::replay_after,
            };
            let replayed = redo(&paths, &image, p.applied_lsn).and_then(|stats| {
                if host_crash {
                    relog = hot::extents_after(&paths, relog_after, ext, disk_size)?;
                }
                Ok(stats)
            });
            match replayed {
                Ok(stats) => {
                    report.redone = stats.records;
                    dur.sync_data(Target::Image, &image)
                        .map_err(LogError::io("cannot sync image of", dir))?;
                }
                Err(e) => {
                    state = LogState::Broken {
                        reason: format!("redo after a crash failed: {e}"),
                    }
                }
            }
        }
        if let (true, Some(reason)) = (state.is_healthy(), dur.latched()) {
            state = LogState::Broken { reason };
        }
        if state.is_healthy() && relog.is_empty() {
            // Everything the log holds is now durable in the image, and the image holds
            // nothing the log lacks. (After a host crash with extents to log again, the redo
            // and relog points move only when that is done.)
            p.applied_lsn = last_lsn;
            p.relog_after = Some(last_lsn);
        }
        if state.is_healthy() {
            p.first_seq = rec.sealed.first().map(|s| s.seq).unwrap_or(rec.next_seq);
            p.first_lsn = rec
                .sealed
                .first()
                .map(|s| s.first_lsn)
                .unwrap_or(rec.next_lsn);
        }
        let opened_clean = fresh || p.clean;
        p.clean = false;
        // A state file of an older build: which barrier was a cut is unknown, so every
        // record kept counts as cut. Never past the log's end either: after a host crash
        // the state file may name a cut whose barrier was lost with the log's unsynced
        // tail, and the LSNs after the end are given out again — to records of no cut (an
        // LSN at or below the cut would make a deferred write count as cut, and a FLUSH
        // would not log it).
        let cut = p.last_cut_lsn.get_or_insert(last_lsn);
        *cut = (*cut).min(last_lsn);
        p.boot_id = boot_id();
        p.set_state(&state);
        if let Some(reason) = state.reason() {
            error!(disk = name, "change log is {}: {reason}", state.label());
        }
        let (p_applied, p_relog) = (p.applied_lsn, p.relog_point());
        let st = St {
            state: state.clone(),
            sealed: rec.sealed,
            inflight: Vec::new(),
            next_ticket: 0,
            applied_done: BTreeSet::new(),
            applied_upto: last_lsn,
            range_waiters: 0,
            closed: false,
            paused: false,
            p,
            shipped_through: 0,
        };
        let ap = Ap {
            chain_id,
            next_lsn: rec.next_lsn,
            active: None,
            retired: VecDeque::new(),
            dir_dirty: false,
        };
        let log = ChangeLog {
            sh: Arc::new(Shared {
                name: name.to_string(),
                dir: dir.to_path_buf(),
                disk_id: cx.disk_id,
                disk_size,
                opts,
                image,
                dur,
                st: Mutex::new(st),
                ap: Mutex::new(ap),
                logging: AtomicBool::new(state.is_healthy()),
                range_cv: Condvar::new(),
                sync: Mutex::new(SyncSt::default()),
                sync_cv: Condvar::new(),
                seal_lock: Mutex::new(()),
                persist_lock: Mutex::new(()),
                state_dirty: AtomicBool::new(false),
                appended: AtomicU64::new(0),
                recorded: AtomicU64::new(0),
                sync_rounds: AtomicU64::new(0),
                mapped: AtomicU64::new(0),
                ck: checkpoint::Ckpt::new(disk_size, opts.hot_extent_min, p_applied, p_relog),
                opened_clean,
                map_records: opts.mapped_records && segmap::supported(dir),
                _lock: lock_file,
            }),
        };
        if state.is_healthy() {
            let mut ap = lock(&log.sh.ap);
            if let Err(e) = log.start_segment(&mut ap, rec.next_seq) {
                log.degrade(&e, "cannot create the first segment");
            }
        }
        log.persist()?;
        if log.state().is_healthy() {
            log.check_space();
        }
        if log.state().is_healthy() && !relog.is_empty() {
            report.relogged = log.relog_extents(&relog)?;
        }
        if log.state().is_healthy() {
            log.start_checkpointer();
        }
        report.host_crash = host_crash;
        report.state = log.state();
        info!(disk = name, segments = report.segments, last_lsn = report.last_lsn, redone = report.redone, cut = ?report.cut, state = %report.state, "change log opened");
        Ok((log, report))
    }

    fn start_segment(&self, ap: &mut Ap, seq: u64) -> io::Result<()> {
        let header = SegmentHeader {
            disk_id: self.sh.disk_id,
            chain_id: ap.chain_id,
            seq,
            first_lsn: ap.next_lsn,
            disk_size: self.sh.disk_size,
        };
        let (path, file) = create_segment(&self.sh.dir, &header)?;
        let digest = format::SealDigest::new(&format::encode_header(&header));
        let map = match self.sh.map_records {
            true => SegMap::new(&file, self.sh.opts.segment_size)
                .map_err(|e| debug!(disk = %self.sh.name, "segment not mapped, records go through pwritev: {e}"))
                .ok(),
            false => None,
        };
        ap.active = Some(Active {
            seg: Arc::new(Seg {
                seq,
                first_lsn: ap.next_lsn,
                path,
                file,
            }),
            pos: HEADER_LEN as u64,
            filled: HEADER_LEN as u64,
            count: 0,
            extent_bytes: 0,
            digest,
            map,
            cache_done: 0,
        });
        ap.dir_dirty = true;
        Ok(())
    }

    /// Retires the active segment and starts the next one.
    fn rotate_locked(&self, ap: &mut Ap) -> io::Result<()> {
        let Some(mut old) = ap.active.take() else {
            return Ok(());
        };
        // Nothing copies into a retired segment; sealing truncates it (see `segmap`).
        old.map = None;
        let seq = old.seg.seq + 1;
        match self.start_segment(ap, seq) {
            Ok(()) => {
                ap.retired.push_back(old);
                Ok(())
            }
            Err(e) => {
                ap.active = Some(old);
                Err(e)
            }
        }
    }

    /// Leaves the healthy state after a log I/O error: out of space → overflow, else broken.
    fn degrade(&self, e: &io::Error, what: &str) {
        let mut st = lock(&self.sh.st);
        if !st.state.is_healthy() {
            return;
        }
        st.state = if is_no_space(e) {
            LogState::Overflow {
                reason: format!("{what}: {e}"),
            }
        } else {
            LogState::Broken {
                reason: format!("{what}: {e}"),
            }
        };
        self.sh.logging.store(false, Ordering::Release);
        error!(disk = %self.sh.name, "change log is now {}; writes continue to the image, the disk needs a full resync", st.state);
        let s = st.state.clone();
        st.p.set_state(&s);
        self.sh.state_dirty.store(true, Ordering::Release);
    }

    fn mark_broken(&self, reason: String) {
        let mut st = lock(&self.sh.st);
        if let LogState::Broken { .. } = st.state {
            return;
        }
        error!(disk = %self.sh.name, "change log is now broken: {reason}; the disk needs a full resync");
        st.state = LogState::Broken { reason };
        self.sh.logging.store(false, Ordering::Release);
        let s = st.state.clone();
        st.p.set_state(&s);
        self.sh.state_dirty.store(true, Ordering::Release);
    }

    fn persist_if_dirty(&self) {
        if self.sh.state_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.persist() {
                error!(disk = %self.sh.name, "cannot record the change log's state: {e}");
                self.sh.state_dirty.store(true, Ordering::Release);
            }
        }
    }

    /// Writes the state file (serialized; always the newest state).
    fn persist(&self) -> Result<(), LogError> {
        let _g = lock(&self.sh.persist_lock);
        let p = lock(&self.sh.st).p.clone();
        let path = self.sh.dir.join(STATE_FILE);
        let text = toml::to_string(&p).map_err(|e| LogError::BadState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, text.as_bytes()).map_err(LogError::io("cannot write", &path))
    }

    fn check_space(&self) {
        if let Some(reason) = self.low_space() {
            let mut st = lock(&self.sh.st);
            if st.state.is_healthy() {
                st.state = LogState::Overflow { reason };
                self.sh.logging.store(false, Ordering::Release);
                error!(disk = %self.sh.name, "change log is now {}; writes continue to the image, the disk needs a full resync", st.state);
                let s = st.state.clone();
                st.p.set_state(&s);
                self.sh.state_dirty.store(true, Ordering::Release);
            }
            drop(st);
            self.persist_if_dirty();
        }
    }

    /// `Some(reason)` when the log's file system is below its free-space floor.
    fn low_space(&self) -> Option<String> {
        let c = std::ffi::CString::new(self.sh.dir.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: `libc::statvfs` is plain integers, for which all-zero bytes are valid.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs with a valid NUL-terminated path and a zeroed out-struct.
        let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
        if r != 0 {
            return None;
        }
        let frsize = s.f_frsize as u64;
        let avail = (s.f_bavail as u64).saturating_mul(frsize);
        let total = (s.f_blocks as u64).saturating_mul(frsize);
        let pct_floor = total / 100 * u64::from(self.sh.opts.min_free_percent);
        let floor = self.sh.opts.min_free_bytes.min(pct_floor);
        (avail < floor).then(|| {
            format!("only {avail} bytes free on the log's file system (floor {floor} bytes)")
        })
    }

    /// Waits until no in-flight request overlaps `[start, end)` and registers this one.
    /// Adds `n` to the appended-bytes counter and checks the free space when that crosses a
    /// check interval.
    fn count_appended(&self, n: u64) {
        let interval = self.sh.opts.space_check_interval.max(1);
        let before = self.sh.appended.fetch_add(n, Ordering::Relaxed);
        if before / interval != (before + n) / interval {
            self.check_space();
        }
    }

    fn begin_range(&self, start: u64, end: u64) -> io::Result<u64> {
        let mut st = lock(&self.sh.st);
        loop {
            if st.closed {
                return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
            }
            let busy = st.paused
                || (start < end && st.inflight.iter().any(|i| i.start < end && start < i.end));
            if !busy {
                break;
            }
            st.range_waiters += 1;
            st = wait(&self.sh.range_cv, st);
            st.range_waiters -= 1;
        }
        let id = st.next_ticket;
        st.next_ticket += 1;
        st.inflight.push(Inflight { id, start, end });
        Ok(id)
    }

    fn complete(&self, id: u64, lsn: Option<u64>) {
        self.complete_many(&[id], &[lsn]);
    }

    /// Reserves the next LSN and writes the record, under the append lock. Returns the LSN
    /// (None when the log is not recording) and whether the active segment was rotated.
    fn append(
        &self,
        h: &mut RecordHeader,
        data: &[u8],
        barrier_rotate: bool,
    ) -> (Option<u64>, bool) {
        if !self.sh.logging.load(Ordering::Acquire) {
            return (None, false);
        }
        let rec_len = (RECORD_HEADER_LEN + data.len()) as u64;
        let mut ap = lock(&self.sh.ap);
        let mut rotated = false;
        let full = ap
            .active
            .as_ref()
            .is_some_and(|a| a.count > 0 && a.pos + rec_len > self.sh.opts.segment_size);
        if full {
            match self.rotate_locked(&mut ap) {
                Ok(()) => rotated = true,
                Err(e) => {
                    self.degrade(&e, "cannot start a new log segment");
                    return (None, false);
                }
            }
        }
        let lsn = ap.next_lsn;
        let Some(a) = ap.active.as_mut() else {
            return (None, rotated);
        };
        h.lsn = lsn;
        let hb = format::encode_record_header(h, data);
        a.digest.record(&hb);
        let pos = a.pos;
        a.pos += rec_len;
        a.count += 1;
        a.extent_bytes += h.backlog_extra();
        let file = Arc::clone(&a.seg);
        ap.next_lsn += 1;
        if let Err(e) = pwritev_all(&file.file, &[&hb, data], pos) {
            self.degrade(&e, "cannot append to the change log");
        }
        if barrier_rotate {
            match self.rotate_locked(&mut ap) {
                Ok(()) => rotated = true,
                Err(e) => self.degrade(&e, "cannot start a new log segment"),
            }
        }
        (Some(lsn), rotated)
    }

    /// Logs one change and applies it with `apply` (which changes the image), in the order
    /// described in the module documentation. Blocking; call from the blocking pool.
    ///
    /// `apply` failing after the record was logged breaks the chain (the log then holds a
    /// change the image does not): its error is returned.
    pub fn record(
        &self,
        kind: Kind,
        flags: u8,
        offset: u64,
        length: u64,
        data: &[u8],
        apply: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        self.record_inner(kind, flags, offset, length, data, false, |_| apply())
    }

    /// [`Self::record`] whose `apply` is told the record's LSN (`None` when the log is not
    /// recording): extents (see [`super::extent`]) remember which record they are.
    pub fn record_lsn(
        &self,
        kind: Kind,
        flags: u8,
        offset: u64,
        length: u64,
        data: &[u8],
        apply: impl FnOnce(Option<u64>) -> io::Result<()>,
    ) -> io::Result<()> {
        self.record_inner(kind, flags, offset, length, data, false, apply)
    }

    #[allow(clippy::too_many_arguments)]
    fn record_inner(
        &self,
        kind: Kind,
        flags: u8,
        offset: u64,
        length: u64,
        data: &[u8],
        barrier_rotate: bool,
        apply: impl FnOnce(Option<u64>) -> io::Result<()>,
    ) -> io::Result<()> {
        let rec_len = (RECORD_HEADER_LEN + data.len()) as u64;
        self.count_appended(rec_len);
        let (start, end) = match kind {
            Kind::Flush => (0, 0),
            _ => (offset, offset.saturating_add(length)),
        };
        let id = self.begin_range(start, end)?;
        let ahead = match kind {
            Kind::Flush => 0,
            _ => {
                // While a checkpoint's syncs run, a pre-heat is neither claimed nor made:
                // its log sync would wait behind the image's write-back (the window stays
                // hot by the cooling mark meanwhile; a writer after the checkpoint claims it).
                let now = self.preheat_now();
                let p = self.plan_hot(offset, length, now);
                match p.preheat() && !now {
                    true => 0,
                    false => p.ahead,
                }
            }
        };
        let mut h = RecordHeader {
            lsn: 0,
            kind,
            flags,
            ahead,
            offset,
            length,
            data_len: data.len() as u32,
        };
        let (lsn, rotated) = self.append(&mut h, data, barrier_rotate);
        if let Some(lsn) = lsn {
            self.note_appended(rec_len);
            self.sh.recorded.fetch_add(end - start, Ordering::Relaxed);
            if replay::image_dependent(&h) {
                // Its data is in the image only: the next sync round syncs the image too.
                self.note_image_dependent(lsn);
            }
            if kind != Kind::Flush {
                self.guard_image_change(offset, length, ahead, lsn);
            }
        }
        let r = apply(lsn);
        if let Err(e) = &r {
            if lsn.is_some() {
                self.mark_broken(format!(
                    "a {} at {offset}+{length} was logged but could not be applied to the image: {e}",
                    kind.name()
                ));
            }
        }
        self.complete(id, lsn);
        if rotated && !barrier_rotate {
            self.seal_in_background();
        }
        self.persist_if_dirty();
        r
    }

    /// Seals the retired segments on a thread of their own (inline if none can be started).
    fn seal_in_background(&self) {
        let weak = Arc::downgrade(&self.sh);
        let spawned = std::thread::Builder::new()
            .name("hrl-seal".into())
            .spawn(move || {
                let Some(sh) = weak.upgrade() else { return };
                let me = ChangeLog { sh };
                if let Err(e) = me.seal_retired() {
                    error!(disk = %me.sh.name, "sealing a change-log segment failed: {e}");
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the segment sealer thread ({e}); sealing inline");
            if let Err(e) = self.seal_retired() {
                error!(disk = %self.sh.name, "sealing a change-log segment failed: {e}");
            }
        }
    }

    /// Appends a flush barrier and makes every completed change durable (log and image).
    pub fn flush(&self) -> io::Result<()> {
        match self.record(Kind::Flush, 0, 0, 0, &[], || Ok(())) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESHUTDOWN) => {}
            Err(e) => return Err(e),
        }
        self.sync()
    }

    /// Makes every change completed before this call durable: group commit.
    ///
    /// Once a sync of the log or the image has failed, this fails for good (EIO): no later
    /// success may vouch for data the kernel may have dropped (see [`super::durable`]).
    pub fn sync(&self) -> io::Result<()> {
        self.sh.dur.check()?;
        let mut s = lock(&self.sh.sync);
        let target = s.started + 1;
        loop {
            if s.completed >= target {
                if s.failed_gen >= target {
                    return Err(io::Error::other(format!(
                        "change log sync failed: {}",
                        s.last_error
                    )));
                }
                drop(s);
                return self.sh.dur.check();
            }
            if !s.running {
                s.running = true;
                s.started += 1;
                let generation = s.started;
                drop(s);
                let r = self.sync_round();
                s = lock(&self.sh.sync);
                s.running = false;
                s.completed = generation;
                if let Err(e) = r {
                    s.failed_gen = generation;
                    s.last_error = e.to_string();
                }
                self.sh.sync_cv.notify_all();
                continue;
            }
            s = wait(&self.sh.sync_cv, s);
        }
    }

    fn sync_round(&self) -> io::Result<()> {
        self.sh.sync_rounds.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = lock(&self.sh.st);
            let b = st.next_ticket;
            while st.inflight.iter().any(|i| i.id < b) {
                st.range_waiters += 1;
                st = wait(&self.sh.range_cv, st);
                st.range_waiters -= 1;
            }
        }
        // Redo durability: the log holds every byte a FLUSH vouches for; the image is synced
        // by checkpoints, and here only when an image-dependent record needs it — first, so
        // that the barrier saying so is made durable by the log's sync below.
        if self.sh.logging.load(Ordering::Acquire) {
            self.sync_image_if_dependent()?;
            self.sync_log()
        } else {
            // Broken or overflowed: changes go to the image without a record, so the image
            // is what a FLUSH must make durable.
            self.sync_log()?;
            self.sync_image()
        }
    }

    /// After a failed sync: a latched failure (fdatasync) breaks the chain for good; anything
    /// else (the directory could not even be opened) is retried by the next round.
    fn sync_failed(&self, e: &io::Error) {
        match self.sh.dur.latched() {
            Some(reason) => self.mark_broken(reason),
            None => {
                lock(&self.sh.ap).dir_dirty = true;
                warn!(disk = %self.sh.name, "change log sync failed: {e}");
            }
        }
        self.persist_if_dirty();
    }

    /// Seals the retired segments, oldest first (after their requests have completed).
    fn seal_retired(&self) -> Result<(), LogError> {
        let _g = lock(&self.sh.seal_lock);
        let mut sealed_any = false;
        loop {
            let Some((seg, len, count, extent_bytes, digest)) =
                lock(&self.sh.ap).retired.front().map(|a| {
                    (
                        Arc::clone(&a.seg),
                        a.pos,
                        a.count,
                        a.extent_bytes,
                        a.digest.clone().finish(),
                    )
                })
            else {
                break;
            };
            let last_lsn = (seg.first_lsn + count).wrapping_sub(1);
            {
                let mut st = lock(&self.sh.st);
                while st.applied_upto < last_lsn {
                    st.range_waiters += 1;
                    st = wait(&self.sh.range_cv, st);
                    st.range_waiters -= 1;
                }
            }
            if !self.sh.logging.load(Ordering::Acquire) {
                lock(&self.sh.ap).retired.clear();
                break;
            }
            let sealed = seal_file(&seg.file, len, count, last_lsn, digest, |f| {
                self.sh.dur.sync_data(Target::Log, f)
            });
            let bytes = match sealed {
                Ok(n) => n,
                Err(e) => {
                    match self.sh.dur.latched() {
                        Some(reason) => self.mark_broken(reason),
                        None => self.degrade(&e, "cannot seal a change-log segment"),
                    }
                    self.persist_if_dirty();
                    return Err(LogError::io("cannot seal", &seg.path)(e));
                }
            };
            {
                let mut ap = lock(&self.sh.ap);
                ap.retired.pop_front();
                let mut st = lock(&self.sh.st);
                st.sealed.push(SegmentInfo {
                    seq: seg.seq,
                    first_lsn: seg.first_lsn,
                    last_lsn,
                    records: count,
                    bytes,
                    extent_bytes,
                    path: seg.path.clone(),
                    sealed: true,
                });
            }
            self.persist()?;
            sealed_any = true;
        }
        if sealed_any && !self.background_checkpoints() {
            // Without a background checkpointer every seal is a checkpoint, so that a sealed
            // segment can be released once shipped. With one, its next checkpoint covers the
            // segment: a cut never waits for the image's sync (see `release`).
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Seals the active segment at a flush barrier (if it holds any record) and returns every
    /// sealed segment not yet released, oldest first: what the replicator should ship. New
    /// writes go to the next segment meanwhile.
    pub fn take(&self) -> Result<Vec<SegmentInfo>, LogError> {
        self.barrier()?;
        self.seal_retired()?;
        self.require_healthy()?;
        Ok(lock(&self.sh.st).sealed.clone())
    }

    /// Cuts the log at a barrier without waiting for the seal: when the active segment holds
    /// records, a flush record ends it and new writes go to the next segment. Returns the LSN
    /// of the last record in the cut. Call it while writes to the disk are paused (then the
    /// cut is exact); [`Self::wait_sealed`] then seals the cut segments.
    pub fn barrier(&self) -> Result<u64, LogError> {
        self.require_healthy()?;
        let has_records = lock(&self.sh.ap)
            .active
            .as_ref()
            .is_some_and(|a| a.count > 0);
        if has_records {
            self.record_inner(Kind::Flush, 0, 0, 0, &[], true, |_| Ok(()))
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ESHUTDOWN) => LogError::Closed(self.sh.name.clone()),
                    _ => LogError::Io {
                        what: "cannot write a barrier to",
                        path: self.sh.dir.clone(),
                        source: e,
                    },
                })?;
        }
        self.require_healthy()?;
        Ok(self.last_lsn())
    }

    /// Records (in the state file, durably) that a cut ends at `lsn`. [`crate::Disk::cut`]
    /// calls it while the disk's writes are still paused, so that no write after the cut
    /// runs before a reopened extent map can know where the cut was (see
    /// [`super::extent`], "After a restart"). Never moves back. Blocking.
    pub fn note_cut(&self, lsn: u64) -> Result<(), LogError> {
        {
            let mut st = lock(&self.sh.st);
            let last = st.p.last_cut_lsn.get_or_insert(0);
            if *last >= lsn {
                return Ok(());
            }
            *last = lsn;
        }
        self.persist()
    }

    /// The LSN of the last cut recorded by [`Self::note_cut`] (for a log whose state file
    /// predates the record: its last LSN when it was opened).
    pub fn last_cut(&self) -> u64 {
        lock(&self.sh.st).p.last_cut_lsn.unwrap_or(0)
    }

    /// True while changes are being logged (false once the chain is broken or overflowed).
    pub fn is_logging(&self) -> bool {
        self.sh.logging.load(Ordering::Acquire)
    }

    /// True if the log was opened after a clean shutdown (or created fresh).
    pub fn opened_clean(&self) -> bool {
        self.sh.opened_clean
    }

    /// Deletes the sealed segments up to and including `upto_seq` (shipped by the replicator).
    pub fn release(&self, upto_seq: u64) -> Result<(), LogError> {
        // Against `reset` (which holds it too): the files listed below are deleted by path,
        // and a new chain numbers its segments from 0 again, so a reset between listing and
        // deleting would lose the new chain's files. (The checkpointer thread releases too.)
        let _s = lock(&self.sh.seal_lock);
        self.release_locked(upto_seq)
    }

    /// [`Self::release`], for a caller holding `seal_lock`.
    fn release_locked(&self, upto_seq: u64) -> Result<(), LogError> {
        // A segment is deleted only when shipped *and* checkpointed twice (recovery replays
        // from the redo point and logs again the extents of the records after the relog
        // point).
        let needs = lock(&self.sh.st)
            .sealed
            .iter()
            .filter(|s| s.seq <= upto_seq)
            .map(|s| s.last_lsn)
            .max();
        if let Some(needs) = needs {
            // Two checkpoints at most: the first records the redo point past the segments,
            // the second moves the relog point there (a segment goes only when neither redo
            // nor relog after a host crash needs it).
            for _ in 0..2 {
                if needs <= self.relog_lsn() {
                    break;
                }
                self.checkpoint()?;
            }
            if needs > self.relog_lsn() {
                return Err(LogError::NotHealthy {
                    disk: self.sh.name.clone(),
                    state: self.state(),
                });
            }
        }
        let removed: Vec<SegmentInfo> = {
            let ap = lock(&self.sh.ap);
            let unsealed = ap
                .retired
                .iter()
                .map(|a| a.seg.seq)
                .chain(ap.active.as_ref().map(|a| a.seg.seq))
                .find(|&s| s <= upto_seq);
            if let Some(seq) = unsealed {
                return Err(LogError::NotSealed {
                    disk: self.sh.name.clone(),
                    seq,
                });
            }
            let mut st = lock(&self.sh.st);
            let (gone, keep): (Vec<_>, Vec<_>) =
                st.sealed.drain(..).partition(|s| s.seq <= upto_seq);
            st.sealed = keep;
            if let Some(last) = gone.last() {
                st.p.first_seq = last.seq + 1;
                st.p.first_lsn = last.last_lsn + 1;
            }
            gone
        };
        if removed.is_empty() {
            return Ok(());
        }
        self.persist()?;
        for s in &removed {
            fs::remove_file(&s.path).map_err(LogError::io("cannot remove", &s.path))?;
        }
        self.sh
            .dur
            .sync_dir(&self.sh.dir)
            .map_err(LogError::io("cannot sync", &self.sh.dir))
    }

    /// Clean shutdown: waits for in-flight requests, seals the active segment, syncs the image
    /// and records a clean state. Later writes fail.
    pub fn close(&self) -> Result<(), LogError> {
        {
            let mut st = lock(&self.sh.st);
            if st.closed {
                return Ok(());
            }
            st.closed = true;
            self.sh.ck.trigger.stop();
            while !st.inflight.is_empty() {
                st.range_waiters += 1;
                st = wait(&self.sh.range_cv, st);
                st.range_waiters -= 1;
            }
        }
        let healthy = self.sh.logging.load(Ordering::Acquire);
        if healthy {
            let mut ap = lock(&self.sh.ap);
            if let Some(mut a) = ap.active.take() {
                a.map = None;
                if a.count > 0 {
                    ap.retired.push_back(a);
                } else {
                    fs::remove_file(&a.seg.path)
                        .map_err(LogError::io("cannot remove", &a.seg.path))?;
                    ap.dir_dirty = true;
                }
            }
        }
        if healthy {
            self.seal_retired()?;
        }
        let dir = &self.sh.dir;
        let mtime = stamp_mtime(&self.sh.image, &self.sh.dur)
            .map_err(LogError::io("cannot sync image of", dir))?;
        self.sh
            .dur
            .sync_dir(dir)
            .map_err(LogError::io("cannot sync", dir))?;
        let last = lock(&self.sh.ap).next_lsn.wrapping_sub(1);
        {
            let mut st = lock(&self.sh.st);
            st.p.clean = true;
            st.p.image_mtime_ns = mtime;
            if st.state.is_healthy() {
                st.p.applied_lsn = last;
                st.p.relog_after = Some(last);
            }
        }
        self.persist()?;
        // Later openers (in this process too) may take the log over now.
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.sh._lock.as_raw_fd(), libc::LOCK_UN) };
        info!(disk = %self.sh.name, state = %self.state(), "change log closed");
        Ok(())
    }

    /// Starts a new, empty chain (after a full resync): every segment is deleted.
    pub fn reset(&self) -> Result<(), LogError> {
        let _g = lock(&self.sh.seal_lock);
        let _c = self.checkpoint_guard();
        {
            let mut st = lock(&self.sh.st);
            if st.closed {
                return Err(LogError::Closed(self.sh.name.clone()));
            }
            st.paused = true;
            while !st.inflight.is_empty() {
                st.range_waiters += 1;
                st = wait(&self.sh.range_cv, st);
                st.range_waiters -= 1;
            }
        }
        // Nothing is in flight and nothing can start: lock order ap → st holds.
        let mut ap = lock(&self.sh.ap);
        let mut st = lock(&self.sh.st);
        let result = (|| -> Result<(), LogError> {
            ap.active = None;
            ap.retired.clear();
            st.sealed.clear();
            st.shipped_through = 0;
            let dir = &self.sh.dir;
            for (_, path) in list_segments(dir).map_err(LogError::io("cannot list", dir))? {
                fs::remove_file(&path).map_err(LogError::io("cannot remove", &path))?;
            }
            let disk_id = st.p.disk_id.clone();
            st.p = StateFile::fresh(&disk_id);
            ap.chain_id = u64::from_str_radix(&st.p.chain_id, 16).unwrap_or(0);
            st.state = LogState::Healthy;
            ap.next_lsn = 1;
            st.applied_upto = 0;
            st.applied_done.clear();
            self.sh.ck.reset();
            self.start_segment(&mut ap, 0)
                .map_err(LogError::io("cannot create a segment in", dir))?;
            self.sh.logging.store(true, Ordering::Release);
            Ok(())
        })();
        st.paused = false;
        self.sh.range_cv.notify_all();
        drop(st);
        drop(ap);
        result?;
        self.persist()?;
        info!(disk = %self.sh.name, "change log reset: new chain");
        Ok(())
    }

    fn require_healthy(&self) -> Result<(), LogError> {
        let st = lock(&self.sh.st);
        if st.closed {
            return Err(LogError::Closed(self.sh.name.clone()));
        }
        if !st.state.is_healthy() {
            return Err(LogError::NotHealthy {
                disk: self.sh.name.clone(),
                state: st.state.clone(),
            });
        }
        Ok(())
    }

    /// Waits until segments retired by size rotation are sealed.
    pub fn wait_sealed(&self) -> Result<(), LogError> {
        self.seal_retired()
    }

    /// Health of the chain.
    pub fn state(&self) -> LogState {
        lock(&self.sh.st).state.clone()
    }

    /// Bytes not yet shipped (sealed segments above the shipped LSN, segments being sealed
    /// and the active one): their files plus the bytes their extent records stand for (what
    /// shipping them sends).
    pub fn unshipped_bytes(&self) -> u64 {
        let ap = lock(&self.sh.ap);
        let st = lock(&self.sh.st);
        st.sealed
            .iter()
            .filter(|s| s.last_lsn > st.shipped_through)
            .map(|s| s.bytes + s.extent_bytes)
            .sum::<u64>()
            + ap.retired
                .iter()
                .chain(ap.active.as_ref())
                .map(|a| a.pos + a.extent_bytes)
                .sum::<u64>()
    }

    /// Record bytes (headers and data) appended since the log was opened (for `/metrics`).
    pub fn appended_bytes(&self) -> u64 {
        self.sh.appended.load(Ordering::Relaxed)
    }

    /// Disk bytes the records appended since the log was opened cover (for `/metrics`):
    /// large writes are logged as extent records whose data stays in the image, so this is
    /// the change rate, [`Self::appended_bytes`] what the log files took.
    pub fn recorded_bytes(&self) -> u64 {
        self.sh.recorded.load(Ordering::Relaxed)
    }

    /// Unshipped log bytes divided by the disk size (the resync rule fires at 0.5).
    pub fn unshipped_ratio(&self) -> f64 {
        self.unshipped_bytes() as f64 / self.sh.disk_size.max(1) as f64
    }

    /// Sealed segments not yet released, oldest first.
    pub fn sealed_segments(&self) -> Vec<SegmentInfo> {
        lock(&self.sh.st).sealed.clone()
    }

    /// The active segment (what has been reserved in it so far).
    pub fn active_segment(&self) -> Option<SegmentInfo> {
        let ap = lock(&self.sh.ap);
        ap.active.as_ref().map(|a| SegmentInfo {
            seq: a.seg.seq,
            first_lsn: a.seg.first_lsn,
            last_lsn: (a.seg.first_lsn + a.count).wrapping_sub(1),
            records: a.count,
            bytes: a.pos,
            extent_bytes: a.extent_bytes,
            path: a.seg.path.clone(),
            sealed: false,
        })
    }

    /// Every segment of the chain at one instant, oldest first: the sealed ones (`sealed`
    /// true), then those retired and waiting for their seal, then the active one (both
    /// `sealed` false; `last_lsn` and `bytes` are what was reserved in them so far).
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let ap = lock(&self.sh.ap);
        let st = lock(&self.sh.st);
        let mut out = st.sealed.clone();
        out.extend(
            ap.retired
                .iter()
                .chain(ap.active.as_ref())
                .map(|a| SegmentInfo {
                    seq: a.seg.seq,
                    first_lsn: a.seg.first_lsn,
                    last_lsn: (a.seg.first_lsn + a.count).wrapping_sub(1),
                    records: a.count,
                    bytes: a.pos,
                    extent_bytes: a.extent_bytes,
                    path: a.seg.path.clone(),
                    sealed: false,
                }),
        );
        out
    }

    /// What every segment header of this chain must say: disk id, chain id, disk size.
    pub(crate) fn identity(&self) -> ([u8; 16], u64, u64) {
        (self.sh.disk_id, self.chain_id(), self.sh.disk_size)
    }

    /// Marks the chain broken (persistently) because a reader found it cannot be trusted, and
    /// returns the error that sends the disk to a full resync.
    pub fn break_chain(&self, reason: String) -> LogError {
        self.mark_broken(reason);
        self.persist_if_dirty();
        LogError::NotHealthy {
            disk: self.sh.name.clone(),
            state: self.state(),
        }
    }

    /// LSN of the last record reserved.
    pub fn last_lsn(&self) -> u64 {
        lock(&self.sh.ap).next_lsn.wrapping_sub(1)
    }

    /// Sync rounds run so far (each serves every flusher waiting when it started).
    pub fn sync_rounds(&self) -> u64 {
        self.sh.sync_rounds.load(Ordering::Relaxed)
    }

    /// Records copied into a mapping of their segment so far (the others were written with
    /// `pwritev`; see [`super::segmap`]).
    pub fn mapped_records(&self) -> u64 {
        self.sh.mapped.load(Ordering::Relaxed)
    }

    pub fn chain_id(&self) -> u64 {
        lock(&self.sh.ap).chain_id
    }

    pub fn dir(&self) -> &Path {
        &self.sh.dir
    }
}
