//! The per-disk change log (`.hrl`): every write, trim and zero of a tracked disk, in order,
//! with its data, in segment files beside the disk (`disks/NAME.hrl/NNNN….log`).
//!
//! * [`format`]: the byte layout of segments (header, records, footer) — pure functions.
//! * [`segment`]: segment files (naming, appends, sealing, offline inspection).
//! * [`log`]: [`ChangeLog`], the live log: appends, group commit, rotation, `take`/`release`,
//!   recovery and accounting.
//! * [`replay`]: applying segments to an image.
//! * [`durable`]: the file-sync seam; the first failed `fdatasync` of a disk latches (EIO on
//!   every later FLUSH, broken chain).
//! * [`ship`]: reading segments for shipping, each proven whole (seal, checksums, LSNs).
//! * [`hot`]: hot extents, the parts of the image a host crash may leave ahead of the log.
//! * [`extent`]: large writes logged as extents (bytes stay in the image), the preimages a
//!   cut still needs (copy-before-write), and the replay rule for them.
//!
//! Rules (see `docs/changelog.md`):
//! * A record is appended to the active segment before its change reaches the image; records
//!   are appended in LSN order (so the log file is always a contiguous prefix and the image
//!   never holds a change the log lacks). Overlapping requests are serialized: for them log
//!   order = image order = acknowledgement order. Small writes are logged in batches (one
//!   `pwritev` per batch) by the disk's writer thread (`ChangeLog::record_writes`); the
//!   active segment is written ahead with zeroes, which decoding reads as its end.
//! * FLUSH (and FUA) fdatasync the unsealed log segments before the reply (the image too only
//!   when an image-dependent record is pending); concurrent flushers share one sync round
//!   (group commit). The image is made durable lazily by checkpoints, which record the redo
//!   point in the state file.
//! * Recovery at open verifies sealed segments, cuts a torn tail at the last whole record,
//!   replays the records after the checkpoint, after a host crash logs the hot extents of the
//!   image again ([`hot`]), and marks the chain broken on anything it cannot prove consistent.

pub mod bufpool;
pub mod dirty;
pub mod durable;
pub mod extent;
pub mod format;
pub mod hot;
pub mod log;
pub mod replay;
pub mod segmap;
pub mod segment;
pub mod ship;
#[cfg(any(test, feature = "testing"))]
pub mod sim;

#[cfg(test)]
mod cache_tests;
#[cfg(test)]
mod latch_tests;
#[cfg(test)]
mod mapped_tests;
#[cfg(test)]
mod redo_tests;
#[cfg(test)]
mod release_tests;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use self::dirty::DirtyMap;
pub use self::durable::{Durability, FileSync, OsSync, Target};
pub use self::log::{ChangeLog, Cut, RecoveryReport, SegmentInfo};
pub use self::replay::{replay, replay_after, replay_dir, ReplayStats};

/// Default segment size limit.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;
/// Default free-space floor (absolute) of the log's file system.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 1 << 30;
/// Default free-space floor (percent of the file system).
pub const DEFAULT_MIN_FREE_PERCENT: u8 = 5;

/// Default age of the oldest change at a background checkpoint: the kernel's own write-back
/// age for dirty pages (`vm.dirty_expire_centisecs`, 30 s), so a checkpoint's image sync
/// mostly finds pages the kernel writes back anyway (measured, and what it costs:
/// docs/changelog.md, "Why every 30 s" and "When the timer checkpoints").
pub const DEFAULT_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// Default log bytes between checkpoints.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 256 << 20;
/// Default number of hot extents that asks for a checkpoint: 1,024 extents of 4 MiB bound
/// what recovery re-logs after a host crash at about 4 GiB per checkpoint interval (two
/// intervals are re-logged). 256 made random writes over a
/// 2 GiB disk checkpoint (and then sync the log for every re-heated extent) about twice as
/// often, halving their IOPS (BENCHMARKS.md, "Change log").
pub const DEFAULT_HOT_LIMIT: usize = 1024;

/// Default bound on the bytes of deferred small writes (see [`LogOptions::defer_max`]): 4 GiB,
/// with at most [`extent::PIECES_MAX`] pieces (see there why).
pub const DEFAULT_DEFER_MAX: u64 = 4 << 30;

/// Default for [`LogOptions::heat_ahead`]: 32 extents (128 MiB of 4 MiB extents).
pub const DEFAULT_HEAT_AHEAD: u16 = 32;

/// Default for [`LogOptions::image_flush_min`].
pub const DEFAULT_IMAGE_FLUSH_MIN: u64 = 64 << 20;

/// Default for [`LogOptions::flush_heavy_writes`].
pub const DEFAULT_FLUSH_HEAVY_WRITES: u32 = 8;

/// Tunables of a change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// A segment is sealed and a new one started when the next record would pass this size.
    pub segment_size: u64,
    /// The log overflows when free space on its file system drops below
    /// `min(min_free_bytes, min_free_percent % of the file system)`.
    pub min_free_bytes: u64,
    pub min_free_percent: u8,
    /// Free space is checked every this many appended bytes (and at every rotation).
    pub space_check_interval: u64,
    /// A background checkpoint (image synced, redo point recorded) runs once the oldest
    /// change it would cover is this old — under continuous writes, this often; with
    /// nothing new, one that only moves the relog point comes this long after the last
    /// (`None`: no background thread; checkpoints then happen at seals, releases and on
    /// request). See docs/changelog.md, "When the timer checkpoints".
    pub checkpoint_interval: Option<std::time::Duration>,
    /// ... and whenever this many log bytes were appended since the last checkpoint ...
    pub checkpoint_bytes: u64,
    /// ... and when more than this many extents turned hot (bounds what recovery after a host
    /// crash logs again: this many extents of [`hot::extent_size`] per checkpoint interval,
    /// of the last two; see [`hot`], "Two intervals").
    pub hot_limit: usize,
    /// Hot extents (see [`hot`]) are this large at least (a power of two; more on disks of
    /// over 65,536 extents). Not in the configuration file: recovery after a host crash must
    /// use the size the crashed run used, and nothing records it, so it is fixed in
    /// production ([`hot::MIN_EXTENT`]); tests use small extents to have many on small disks.
    pub hot_extent_min: u64,
    /// A record that continues a sequential stream may heat this many extents after its own
    /// (see [`hot`], "Heating ahead"); `0`: never. Each record says how many it heated, so
    /// recovery needs no setting.
    pub heat_ahead: u16,
    /// Writes of at least this many bytes are logged as extents: the record carries no data,
    /// the bytes stay in the image (see [`extent`]). `u64::MAX`: never.
    pub extent_min: u64,
    /// Small writes logged inline are recorded as deferred extents (bytes in the image, logged
    /// at the next FLUSH or cut) while the bytes so held stay below this; `0`: never (every
    /// small write's bytes are logged with it). See [`extent`], "Deferred small writes".
    pub defer_max: u64,
    /// A FLUSH that finds at least this many bytes of deferred small writes to log syncs the
    /// image instead (they are then durable where they are, and later FLUSHes skip them);
    /// `0`: never. See [`extent`], "Deferred small writes".
    pub image_flush_min: u64,
    /// While each FLUSH follows at most this many small writes (a database's commits, a
    /// journal's), small writes are logged with their data instead of deferred; `0`: never.
    /// See [`extent`], "Deferred small writes".
    pub flush_heavy_writes: u32,
    /// The inline path's records without data (40 bytes: deferred small writes, large
    /// writes' extents) are copied into a shared mapping of the active segment instead of
    /// written with `pwritev`, on file systems that overwrite in place; `false`: always
    /// `pwritev`. See [`segmap`].
    pub mapped_records: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_size: DEFAULT_SEGMENT_SIZE,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            min_free_percent: DEFAULT_MIN_FREE_PERCENT,
            space_check_interval: 16 << 20,
            checkpoint_interval: Some(DEFAULT_CHECKPOINT_INTERVAL),
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            hot_limit: DEFAULT_HOT_LIMIT,
            hot_extent_min: hot::MIN_EXTENT,
            heat_ahead: DEFAULT_HEAT_AHEAD,
            extent_min: extent::DEFAULT_EXTENT_MIN,
            defer_max: DEFAULT_DEFER_MAX,
            image_flush_min: DEFAULT_IMAGE_FLUSH_MIN,
            flush_heavy_writes: DEFAULT_FLUSH_HEAVY_WRITES,
            mapped_records: true,
        }
    }
}

/// The health of a log chain. Anything but `Healthy` means the replica needs a full resync;
/// writes to the disk keep working in every state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogState {
    Healthy,
    /// The chain cannot be trusted (gap, corrupt or missing segment, image changed behind the
    /// log's back, I/O error on the log).
    Broken {
        reason: String,
    },
    /// The log's file system ran (nearly) out of space; changes since then are not logged.
    Overflow {
        reason: String,
    },
}

impl LogState {
    pub fn is_healthy(&self) -> bool {
        matches!(self, LogState::Healthy)
    }

    /// "healthy", "broken" or "overflow".
    pub fn label(&self) -> &'static str {
        match self {
            LogState::Healthy => "healthy",
            LogState::Broken { .. } => "broken",
            LogState::Overflow { .. } => "overflow",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            LogState::Healthy => None,
            LogState::Broken { reason } | LogState::Overflow { reason } => Some(reason),
        }
    }
}

impl std::fmt::Display for LogState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason() {
            None => f.write_str(self.label()),
            Some(r) => write!(f, "{} ({r})", self.label()),
        }
    }
}

/// Change-log errors.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("change log: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("change log {0} is in use by another process: stop `standby serve` first")]
    Locked(PathBuf),
    #[error("change log segment {path} is damaged: {reason}; the disk needs a full resync")]
    Corrupt { path: PathBuf, reason: String },
    #[error("change log state file {path} is damaged: {reason}; disable and re-enable tracking (`standby log disable`, `standby log enable`) and resync the disk")]
    BadState { path: PathBuf, reason: String },
    #[error("the change log of disk '{disk}' is {state}: it cannot be shipped; the disk needs a full resync")]
    NotHealthy { disk: String, state: LogState },
    #[error("the change log of disk '{0}' is closed")]
    Closed(String),
    #[error("segment {seq} of disk '{disk}' cannot be released: only sealed segments can be")]
    NotSealed { disk: String, seq: u64 },
}

impl LogError {
    pub(crate) fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| LogError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<LogError> for io::Error {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Io { source, .. } => source,
            other => io::Error::other(other.to_string()),
        }
    }
}
