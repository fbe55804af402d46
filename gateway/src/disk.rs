//! `Disk`: the one type every front end (NBD, FUSE, replication) reads and writes a VM disk
//! through. Every write, trim and zero of every front end passes through [`Disk::write`],
//! [`Disk::trim`] and [`Disk::write_zeroes`], so later layers (change log, replication) hook in
//! here and nowhere else.
//!
//! I/O is positioned (`pread`/`pwrite`/`fallocate` on one shared file descriptor) and runs on
//! tokio's blocking pool, or inline when it cannot wait for the disk (page-cache reads, small
//! writes); there is no lock on the data path. Nothing that may block — the change log's
//! locks, its condition variables, its state-file and segment syncs — waits on a runtime
//! worker: a small write to a tracked disk is logged inline only when nothing on the way has
//! to wait (`ChangeLog::try_record_now`: locks only tried, no rotation, no log sync), else it
//! goes to the disk's writer thread, which logs them in batches (see [`writer`]); every other
//! request to a tracked disk goes to the blocking pool. The image is also mapped into memory (see [`crate::mapped`]): large reads of
//! cached data can leave as ranges of it, which the NBD server's socket write copies in one
//! go, and large writes are copied into it by the kernel.
//!
//! A *tracked* disk (opened with [`Disk::open_tracked`]) has a [`ChangeLog`]: every write,
//! trim and zero is appended to the log before it reaches the image, and FLUSH/FUA make log
//! and image durable together (see [`crate::changelog`]). Writes of at least
//! [`LogOptions::extent_min`] bytes are logged as *extents* — the record names the range, the
//! bytes go to the image only — and every change first saves the bytes of the extents a cut
//! still needs where it overwrites them (see [`crate::changelog::extent`]); [`Disk::cut`]
//! tells the extent map where each cut is. Small writes logged inline are *deferred*
//! extents: [`Disk::flush`] and [`Disk::cut`] log their bytes first (see
//! [`crate::changelog::extent`], "Deferred small writes") — except between frequent
//! FLUSHes, where they are logged with their data (see [`tracking`]). An untracked disk
//! writes straight to its image.
//!
//! Every sync goes through the disk's [`Durability`] (shared with its change log): once an
//! `fdatasync` of the image or the log has failed, every later FLUSH and FUA write fails with
//! EIO until the disk is reopened (see [`crate::changelog::durable`]).
//!
//! Longer than most files (~1,000 lines, 130 of them tests): the data path of untracked and
//! tracked disks (read, write, trim, zeroes, flush) is one type's methods, kept together so
//! the ordering rules above can be checked in one read; the writer thread is in [`writer`],
//! the cut across disks in [`cut`], what a write or FLUSH does to the change log, dirty
//! bitmap and extent map in [`tracking`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use nbd_server::{BlockDevice, DeviceFlags, Extent, FlushReply, ZeroFlags};
use thiserror::Error;
use tracing::debug;

use crate::changelog::durable::{Durability, FileSync, Target};
use crate::changelog::format::{Kind, FLAG_FUA, FLAG_MAY_TRIM};
use crate::changelog::{ChangeLog, DirtyMap, LogError, LogOptions, RecoveryReport};
use crate::mapped::ImageMap;

mod cut;
mod syncer;
mod tracking;
mod writer;

pub use cut::CutStats;

#[cfg(any(test, feature = "testing"))]
pub use tracking::FLUSH_HEAVY_WRITES;
#[cfg(any(test, feature = "testing"))]
pub use writer::MULTI_WRITE_BATCHES;

use syncer::Syncer;
use tracking::Tracking;
use writer::Writer;

/// Why a disk cannot be opened.
#[derive(Debug, Error)]
pub enum DiskError {
    #[error("disk image {path} cannot be opened: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    #[error("disk image {0} is empty (0 bytes)")]
    Empty(PathBuf),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("disk {0} is read-only: it cannot be tracked")]
    ReadOnly(String),
    #[error("disk {0} has no change log (tracking is off)")]
    NotTracked(String),
}

/// Largest zero buffer written at once when a file system cannot zero a range itself.
const ZERO_CHUNK: usize = 1 << 20;

struct Inner {
    name: String,
    path: PathBuf,
    file: File,
    size: u64,
    read_only: bool,
    /// Syncs of the image (and of the change log): the first failure latches.
    dur: Arc<Durability>,
    /// Change tracking. Every write, trim and zero holds this lock shared while it runs, so
    /// taking it exclusively ([`Disk::attach_log`], [`Disk::cut`]) waits for the writes in
    /// flight and holds new ones back.
    tracking: RwLock<Option<Tracking>>,
    /// The image mapped for large reads and writes (`None` where it cannot be mapped).
    map: Option<Arc<ImageMap>>,
    /// The writer thread for small tracked writes, started by the first one (`None` inside:
    /// no thread could be started, the blocking pool does them).
    writer: std::sync::OnceLock<Option<Writer>>,
    /// The sync thread answering NBD FLUSHes, started by the first one (`None` inside: no
    /// thread could be started, FLUSH uses the blocking pool).
    syncer: std::sync::OnceLock<Option<Syncer>>,
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// A raw disk image. Cheap to clone (all clones share one file).
#[derive(Clone)]
pub struct Disk {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("name", &self.inner.name)
            .field("path", &self.inner.path)
            .field("size", &self.inner.size)
            .field("read_only", &self.inner.read_only)
            .finish()
    }
}

/// Largest read served inline from the page cache. Larger reads go to the blocking pool: they
/// take long enough to copy that running them on the connection's task would stall it, and
/// sequential reads would often find read-ahead pending (`RWF_NOWAIT` then fails anyway).
pub const READ_NOW_MAX: usize = 64 * 1024;

/// Largest write done inline by [`Disk::write_now`].
pub const WRITE_NOW_MAX: usize = 1 << 20;

/// The write path of every front end: log the change (when tracked), then apply it. Blocking:
/// runs on the blocking pool.
fn write_blocking(inner: &Inner, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
    let tracking = read_lock(&inner.tracking);
    if let Some(t) = tracking.as_ref() {
        let flags = if fua { FLAG_FUA } else { 0 };
        let len = data.len() as u64;
        if len >= t.extent_min {
            // An extent: the bytes go to the image only (one buffered copy, not two).
            t.log
                .record_lsn(Kind::Extent, flags, offset, len, &[], |lsn| {
                    t.before_write(offset, len)?;
                    write_image(inner, offset, data)?;
                    if let Some(lsn) = lsn {
                        // (The log has noted it image-dependent: the next sync round
                        // syncs the image too.)
                        t.extents.insert(lsn, offset, len);
                    }
                    Ok(())
                })?;
        } else {
            t.log.record(Kind::Write, flags, offset, len, data, || {
                t.before_write(offset, len)?;
                write_image(inner, offset, data)
            })?;
        }
        t.note(offset, len);
        if fua {
            t.log.sync()?;
        }
        return Ok(());
    }
    write_image(inner, offset, data)?;
    if fua {
        inner.dur.sync_data(Target::Image, &inner.file)?;
    }
    Ok(())
}

/// A cut that could not log the bytes of deferred writes (nothing was cut).
fn deferred_error(log: &ChangeLog, e: io::Error) -> DiskError {
    DiskError::Log(LogError::Io {
        what: "cannot log the bytes of deferred writes before a cut of",
        path: log.dir().to_path_buf(),
        source: e,
    })
}

/// Writes into the image with `pwrite` (the mapping is for reads only: see [`ImageMap`]).
fn write_image(inner: &Inner, offset: u64, data: &[u8]) -> io::Result<()> {
    inner.file.write_all_at(data, offset)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("I/O task failed: {e}"))))
}

impl Disk {
    /// Opens a raw image (a regular file or a block device).
    pub fn open(name: &str, path: &Path, read_only: bool) -> Result<Self, DiskError> {
        Self::open_with_sync(name, path, read_only, Arc::new(crate::changelog::OsSync))
    }

    /// [`Disk::open`] whose syncs go through `sync` (tests inject faults with it).
    pub fn open_with_sync(
        name: &str,
        path: &Path,
        read_only: bool,
        sync: Arc<dyn FileSync>,
    ) -> Result<Self, DiskError> {
        let (file, size) = open_image(path, read_only)?;
        let dur = Durability::new(name, sync);
        Self::from_parts(name, path, file, size, read_only, None, dur)
    }

    fn from_parts(
        name: &str,
        path: &Path,
        file: File,
        size: u64,
        read_only: bool,
        log: Option<(ChangeLog, LogOptions)>,
        dur: Arc<Durability>,
    ) -> Result<Self, DiskError> {
        let map = match ImageMap::new(&file, size) {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                debug!(disk = name, "image not mapped, reads use pread: {e}");
                None
            }
        };
        let tracking = match log {
            Some((l, opts)) => Some(Tracking::new(l, size, &file, &dur, &opts)?),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                path: path.to_path_buf(),
                file,
                map,
                size,
                read_only,
                dur,
                tracking: RwLock::new(tracking),
                writer: std::sync::OnceLock::new(),
                syncer: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Opens a raw image for writing with its change log in `log_dir` (created if needed,
    /// recovered if it exists). `disk_id` is the disk's stable identity.
    pub fn open_tracked(
        name: &str,
        path: &Path,
        log_dir: &Path,
        disk_id: &str,
        opts: LogOptions,
    ) -> Result<(Self, RecoveryReport), DiskError> {
        let sync = Arc::new(crate::changelog::OsSync);
        Self::open_tracked_with_sync(name, path, log_dir, disk_id, opts, sync)
    }

    /// [`Disk::open_tracked`] whose syncs (image and log) go through `sync`.
    pub fn open_tracked_with_sync(
        name: &str,
        path: &Path,
        log_dir: &Path,
        disk_id: &str,
        opts: LogOptions,
        sync: Arc<dyn FileSync>,
    ) -> Result<(Self, RecoveryReport), DiskError> {
        let (file, size) = open_image(path, false)?;
        let dur = Durability::new(name, sync);
        let (log, report) =
            ChangeLog::open_with(name, log_dir, disk_id, &file, size, opts, Arc::clone(&dur))?;
        let disk = Self::from_parts(name, path, file, size, false, Some((log, opts)), dur)?;
        Ok((disk, report))
    }

    /// The change log, when the disk is tracked.
    pub fn change_log(&self) -> Option<ChangeLog> {
        read_lock(&self.inner.tracking)
            .as_ref()
            .map(|t| t.log.clone())
    }

    /// The dirty bitmap (changes the log could not record), when the disk is tracked.
    pub fn dirty_map(&self) -> Option<Arc<DirtyMap>> {
        read_lock(&self.inner.tracking)
            .as_ref()
            .map(|t| Arc::clone(&t.dirty))
    }

    /// Starts change tracking on an open disk (when protection is enabled while it is
    /// served): waits for the writes in flight, then opens (or recovers) the log in
    /// `log_dir`; every later write is logged. Blocking. No-op if the disk is tracked.
    pub fn attach_log(
        &self,
        log_dir: &Path,
        disk_id: &str,
        opts: LogOptions,
    ) -> Result<Option<RecoveryReport>, DiskError> {
        if self.inner.read_only {
            return Err(DiskError::ReadOnly(self.inner.name.clone()));
        }
        let mut t = write_lock(&self.inner.tracking);
        if t.is_some() {
            return Ok(None);
        }
        let (log, report) = ChangeLog::open_with(
            &self.inner.name,
            log_dir,
            disk_id,
            &self.inner.file,
            self.inner.size,
            opts,
            Arc::clone(&self.inner.dur),
        )?;
        *t = Some(Tracking::new(
            log,
            self.inner.size,
            &self.inner.file,
            &self.inner.dur,
            &opts,
        )?);
        Ok(Some(report))
    }

    /// Stops change tracking on an open disk (the VM was unprotected): waits for the writes
    /// in flight, closes the log (sealed, clean) and writes straight to the image from then
    /// on. Blocking. No-op for an untracked disk.
    pub fn detach_log(&self) -> Result<(), DiskError> {
        let mut t = write_lock(&self.inner.tracking);
        if let Some(tr) = t.take() {
            tr.log.close()?;
        }
        Ok(())
    }

    /// Runs `f` while no write, trim or zero runs on this disk (those in flight complete
    /// first; new ones wait). Blocking.
    pub fn with_writes_paused<T>(&self, f: impl FnOnce() -> T) -> T {
        let _g = write_lock(&self.inner.tracking);
        f()
    }

    /// Clean shutdown of a tracked disk: seals the active log segment and records that the
    /// image is in step with the log. Writes after this fail. No-op for an untracked disk.
    pub async fn close(&self) -> io::Result<()> {
        let inner = Arc::clone(&self.inner);
        blocking(move || match read_lock(&inner.tracking).as_ref() {
            Some(t) => {
                // Deferred writes stay as they are: the reopened map loads them as deferred
                // pieces again, synced by the close (see `crate::changelog::extent`, "After
                // a restart"), and the next cut logs their bytes.
                t.log.close().map_err(io::Error::from)?;
                t.dirty.save()
            }
            None => Ok(()),
        })
        .await
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn size(&self) -> u64 {
        self.inner.size
    }

    pub fn read_only(&self) -> bool {
        self.inner.read_only
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is outside disk '{}' ({} bytes)",
                    self.inner.name, self.inner.size
                ),
            )),
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.inner.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("disk '{}' is read-only", self.inner.name),
            ));
        }
        self.check(offset, len)
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.check(offset, len as u64)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || crate::fastio::pread_exact(&inner.file, offset, len)).await
    }

    /// Reads up to [`READ_NOW_MAX`] bytes straight from the page cache without blocking, or
    /// `None` if that is not possible (then use [`Disk::read`]).
    pub fn read_now(&self, offset: u64, len: usize) -> Option<io::Result<Vec<u8>>> {
        if len > READ_NOW_MAX || self.check(offset, len as u64).is_err() {
            return None;
        }
        crate::fastio::pread_nowait(&self.inner.file, offset, len)
    }

    /// A read the NBD server hands to the kernel as mapped memory (see [`crate::mapped`]), or
    /// `None` when the range is small, not all in the page cache, or holds a hole.
    pub fn read_mapped(&self, offset: u64, len: usize) -> Option<nbd_server::MappedRead> {
        self.inner.map.as_ref()?.read(&self.inner.file, offset, len)
    }

    /// Writes `data` at `offset`; with `fua` the data is durable when this returns.
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.check_writable(offset, data.len() as u64)?;
        if !fua {
            if let Some(w) = self.small_writer(data.len()) {
                return w.submit(offset, data).await;
            }
        }
        let inner = Arc::clone(&self.inner);
        blocking(move || write_blocking(&inner, offset, &data, fua)).await
    }

    /// The disk's writer thread, for a write of `len` bytes without FUA to a tracked disk
    /// that is logged with its data (below `extent_min`); `None` for any other write, and
    /// while tracking is being switched or a cut taken (never waits for the lock).
    fn small_writer(&self, len: usize) -> Option<&Writer> {
        let small = match self.inner.tracking.try_read() {
            Ok(g) => g.as_ref().is_some_and(|t| (len as u64) < t.extent_min),
            Err(_) => false,
        };
        if !small {
            return None;
        }
        self.inner
            .writer
            .get_or_init(|| Writer::start(&self.inner))
            .as_ref()
    }

    /// A write without FUA of up to [`WRITE_NOW_MAX`] bytes, done on the caller's thread (a
    /// runtime worker): copied into the image's page cache, which takes a few microseconds —
    /// less than handing it to another thread. On a tracked disk only a write whose logging
    /// needs no wait (no lock held, no overlapping request, no rotation, no log sync, no
    /// preimage) and only while the disk's writer thread is idle: a small one (below
    /// `extent_min`, [`ChangeLog::try_record_now`]) or an extent whose range no cut still
    /// needs ([`ChangeLog::try_record_extent_now`]); its record is one more `pwritev` into
    /// the log's page cache. `None` (then use [`Disk::write`]) for FUA writes, larger ones,
    /// and every write that would wait. Never waits for a lock: while tracking is being
    /// switched or a cut is being taken (the tracking lock is held exclusively), it returns
    /// `None` too.
    pub fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Option<io::Result<()>> {
        if fua || data.len() > WRITE_NOW_MAX {
            return None;
        }
        if let Err(e) = self.check_writable(offset, data.len() as u64) {
            return Some(Err(e));
        }
        let tracking = match self.inner.tracking.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return None,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        let Some(t) = tracking.as_ref() else {
            // Held shared while the image is written, as on the blocking path: attaching a
            // log waits for this write.
            return Some(write_image(&self.inner, offset, data));
        };
        // A tracked write: logged and applied here when nothing has to wait and the writer
        // thread has nothing queued (so writes are taken in arrival order).
        let len = data.len() as u64;
        if self.writer_busy() {
            return None;
        }
        let r = if len >= t.extent_min {
            t.log.try_record_extent_now(
                offset,
                len,
                |chain, lsn| t.extents.take_uncut_extent(chain, lsn, offset, len),
                || write_image(&self.inner, offset, data),
            )?
        } else {
            t.log.try_record_now(
                offset,
                data,
                |chain, lsn| t.extents.take_uncut(chain, lsn, offset, len, t.defer_max()),
                || write_image(&self.inner, offset, data),
            )?
        };
        if r.is_ok() {
            t.note(offset, len);
        }
        Some(r)
    }

    /// Testing only: holds the disk's writer thread (starting it) so that the small writes
    /// submitted until the guard is dropped are taken as one batch.
    #[cfg(any(test, feature = "testing"))]
    pub fn hold_writer(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.inner
            .writer
            .get_or_init(|| Writer::start(&self.inner))
            .as_ref()
            .map(Writer::hold)
    }

    /// Testing only: the ranges whose last record is an extent (bytes in the image only).
    #[cfg(any(test, feature = "testing"))]
    pub fn extent_ranges(&self) -> Vec<(u64, u64)> {
        read_lock(&self.inner.tracking)
            .as_ref()
            .map(|t| t.extents.ranges())
            .unwrap_or_default()
    }

    /// Whether the disk's writer thread has writes queued or in hand.
    fn writer_busy(&self) -> bool {
        self.inner
            .writer
            .get()
            .is_some_and(|w| w.as_ref().is_some_and(Writer::busy))
    }

    /// Why FLUSH fails on this disk (an earlier `fdatasync` failed), if it does.
    pub fn sync_failure(&self) -> Option<String> {
        self.inner.dur.latched()
    }

    /// Makes every completed write durable (`fdatasync`). Fails with EIO for good once a sync
    /// of this disk has failed.
    pub async fn flush(&self) -> io::Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        blocking(move || flush_blocking(&inner)).await
    }

    /// Discards a range: it reads back as zeroes and its blocks are released.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_writable(offset, len)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let tracking = read_lock(&inner.tracking);
            if let Some(t) = tracking.as_ref() {
                let flags = if fua { FLAG_FUA } else { 0 };
                t.log.record(Kind::Trim, flags, offset, len, &[], || {
                    t.before_write(offset, len)?;
                    // Replay zeroes a trimmed range, so the image must read as zeroes too.
                    if punch_hole(&inner.file, offset, len).is_err() {
                        write_zero_buffers(&inner.file, offset, len)?;
                    }
                    Ok(())
                })?;
                t.note(offset, len);
                if fua {
                    t.log.sync()?;
                }
                return Ok(());
            }
            punch_hole(&inner.file, offset, len)?;
            if fua {
                inner.dur.sync_data(Target::Image, &inner.file)?;
            }
            Ok(())
        })
        .await
    }

    /// Makes a range read as zeroes: punches a hole when allowed, else zeroes it in place
    /// (`FALLOC_FL_ZERO_RANGE`), else writes zero buffers (refused with `fast_only`).
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_writable(offset, len)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let f = &inner.file;
            let tracking = read_lock(&inner.tracking);
            if let Some(t) = tracking.as_ref() {
                let log = &t.log;
                let mut rflags = if flags.fua { FLAG_FUA } else { 0 };
                if flags.may_trim {
                    rflags |= FLAG_MAY_TRIM;
                }
                let mut slow = false;
                log.record(Kind::WriteZeroes, rflags, offset, len, &[], || {
                    t.before_write(offset, len)?;
                    let done = (flags.may_trim && punch_hole(f, offset, len).is_ok())
                        || zero_range(f, offset, len).is_ok();
                    if !done {
                        // Logged already: the image must follow the log even when the client
                        // asked for fast zeroing only (it is told "unsupported" afterwards).
                        slow = true;
                        write_zero_buffers(f, offset, len)?;
                    }
                    Ok(())
                })?;
                t.note(offset, len);
                if flags.fua {
                    log.sync()?;
                }
                if slow && flags.fast_only {
                    return Err(io::Error::from(io::ErrorKind::Unsupported));
                }
                return Ok(());
            }
            let done = (flags.may_trim && punch_hole(f, offset, len).is_ok())
                || zero_range(f, offset, len).is_ok();
            if !done {
                if flags.fast_only {
                    return Err(io::Error::from(io::ErrorKind::Unsupported));
                }
                write_zero_buffers(f, offset, len)?;
            }
            if flags.fua {
                inner.dur.sync_data(Target::Image, f)?;
            }
            Ok(())
        })
        .await
    }

    /// Allocation map of `[offset, offset+len)` from `SEEK_DATA`/`SEEK_HOLE`.
    pub async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check(offset, len)?;
        let inner = Arc::clone(&self.inner);
        blocking(move || allocation_map(&inner.file, offset, len)).await
    }
}

/// Opens an image and finds its size (a regular file or a block device, never empty).
fn open_image(path: &Path, read_only: bool) -> Result<(File, u64), DiskError> {
    let err = |source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    let size = if ft.is_file() {
        meta.len()
    } else if ft.is_block_device() {
        use std::io::Seek;
        (&file).seek(io::SeekFrom::End(0)).map_err(err)?
    } else {
        return Err(DiskError::NotAFile(path.to_path_buf()));
    };
    if size == 0 {
        return Err(DiskError::Empty(path.to_path_buf()));
    }
    Ok((file, size))
}

fn fallocate(f: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (off, l) = match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
    };
    // SAFETY: fallocate on a valid, open descriptor with plain integer arguments.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, l) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

pub(crate) fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

pub(crate) fn write_zero_buffers(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let buf = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn lseek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a valid descriptor. The file position it moves is never used: all data
    // I/O is positioned, so concurrent calls cannot disturb each other.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

fn allocation_map(f: &File, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < 4096 {
        // Where does data start at or after pos?
        let data = match lseek(f, pos, libc::SEEK_DATA) {
            Ok(d) => d.unwrap_or(end).min(end),
            Err(e) => {
                // File systems without SEEK_DATA: report the rest as data.
                debug!("SEEK_DATA unsupported: {e}");
                out.push(data_extent(end - pos));
                break;
            }
        };
        if data > pos {
            out.push(Extent {
                length: data - pos,
                hole: true,
                zero: true,
            });
            pos = data;
            continue;
        }
        let hole = lseek(f, pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let hole = hole.max(pos + 1);
        out.push(data_extent(hole - pos));
        pos = hole;
    }
    Ok(out)
}

fn data_extent(length: u64) -> Extent {
    Extent {
        length,
        hole: false,
        zero: false,
    }
}

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn flags(&self) -> DeviceFlags {
        DeviceFlags {
            // One shared file: fdatasync from any connection covers every completed write.
            flush_covers_all_connections: true,
            trim: true,
            fast_zero: true,
            block_status: true,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        Disk::read(self, offset, len).await
    }

    fn read_now(&self, offset: u64, len: usize) -> Option<io::Result<Vec<u8>>> {
        Disk::read_now(self, offset, len)
    }

    fn read_mapped(&self, offset: u64, len: usize) -> Option<nbd_server::MappedRead> {
        Disk::read_mapped(self, offset, len)
    }

    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Option<io::Result<()>> {
        Disk::write_now(self, offset, data, fua)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        Disk::write(self, offset, data, fua).await
    }

    async fn flush(&self) -> io::Result<()> {
        Disk::flush(self).await
    }

    fn flush_detached(&self, reply: FlushReply) -> Option<FlushReply> {
        if self.inner.read_only {
            reply.send(Ok(()));
            return None;
        }
        match self.inner.syncer.get_or_init(|| Syncer::start(&self.inner)) {
            Some(s) => s.submit(reply),
            None => Some(reply),
        }
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        Disk::trim(self, offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        Disk::write_zeroes(self, offset, len, flags).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.extents(offset, len).await
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            // SAFETY: posix_fadvise on a valid descriptor; a hint only.
            unsafe {
                libc::posix_fadvise(
                    inner.file.as_raw_fd(),
                    offset as i64,
                    len as i64,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
            Ok(())
        })
        .await
    }
}

/// Makes every completed write of a writable disk durable: the change log's sync round on a
/// tracked disk (the log is the redo log), the image's `fdatasync` otherwise. Blocks; runs
/// on the blocking pool ([`Disk::flush`]) or the disk's sync thread ([`syncer`]).
fn flush_blocking(inner: &Inner) -> io::Result<()> {
    match read_lock(&inner.tracking).as_ref() {
        Some(t) => {
            t.note_flush();
            t.log_deferred();
            t.log.flush()?;
            if !t.log.is_logging() {
                t.dirty.save()?;
            }
            Ok(())
        }
        None => inner.dur.sync_data(Target::Image, &inner.file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64) -> (tempfile::TempDir, Disk) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        File::create(&p).unwrap().set_len(size).unwrap();
        let d = Disk::open("d", &p, false).unwrap();
        (dir, d)
    }

    #[tokio::test]
    async fn write_read_trim_zero() {
        let (_t, d) = disk(1 << 20);
        d.write(4096, vec![7u8; 8192], false).await.unwrap();
        assert_eq!(d.read(4096, 8192).await.unwrap(), vec![7u8; 8192]);
        d.trim(4096, 4096, false).await.unwrap();
        assert_eq!(d.read(4096, 4096).await.unwrap(), vec![0u8; 4096]);
        // NO_HOLE: zeroed in place (may stay allocated).
        d.write(8192, vec![9u8; 4096], false).await.unwrap();
        d.write_zeroes(8192, 4096, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(d.read(8192, 4096).await.unwrap(), vec![0u8; 4096]);
        // Holes allowed: deallocated.
        let may_trim = ZeroFlags {
            may_trim: true,
            ..ZeroFlags::default()
        };
        d.write_zeroes(8192, 4096, may_trim).await.unwrap();
        assert_eq!(d.read(8192, 4096).await.unwrap(), vec![0u8; 4096]);
        let ext = d.extents(0, 1 << 20).await.unwrap();
        assert!(ext.iter().all(|e| e.hole), "all zeroed again: {ext:?}");
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
    }

    #[tokio::test]
    async fn out_of_range_and_read_only() {
        let (t, d) = disk(4096);
        assert!(d.read(4000, 200).await.is_err());
        assert!(d.write(u64::MAX, vec![1], false).await.is_err());
        let ro = Disk::open("d", &t.path().join("d.img"), true).unwrap();
        let e = ro.write(0, vec![1], false).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(ro.read(0, 1).await.unwrap(), vec![0]);
    }

    #[tokio::test]
    async fn inline_writes_take_the_same_path() {
        let (t, d) = disk(4 << 20);
        // Small writes without FUA are done at once; FUA and very large ones are not.
        assert!(d.write_now(0, &[5u8; 4096], false).unwrap().is_ok());
        assert!(d.write_now(0, &[5u8; 4096], true).is_none());
        assert!(d
            .write_now(0, &vec![5u8; WRITE_NOW_MAX + 1], false)
            .is_none());
        assert_eq!(d.read(0, 4096).await.unwrap(), vec![5u8; 4096]);
        // Bad requests are refused, never half done.
        let e = d.write_now(4 << 20, &[1u8; 1], false).unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let ro = Disk::open("d", &t.path().join("d.img"), true).unwrap();
        let e = ro.write_now(0, &[1u8; 1], false).unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(d.read(0, 1).await.unwrap(), vec![5]);
    }

    #[tokio::test]
    async fn tracked_writes_are_inline_only_when_nothing_waits() {
        let (t, d) = disk(1 << 20);
        // Untracked: done inline, unless the tracking lock is taken (never waited for).
        assert!(d.write_now(0, &[1u8; 4096], false).unwrap().is_ok());
        d.with_writes_paused(|| assert!(d.write_now(0, &[2u8; 4096], false).is_none()));
        assert_eq!(d.read(0, 4096).await.unwrap(), vec![1u8; 4096]);
        let tracked = {
            let img = t.path().join("t.img");
            File::create(&img).unwrap().set_len(1 << 20).unwrap();
            let opts = LogOptions {
                min_free_bytes: 0,
                min_free_percent: 0,
                ..LogOptions::default()
            };
            Disk::open_tracked("t", &img, &t.path().join("t.hrl"), "t", opts)
                .unwrap()
                .0
        };
        let log = tracked.change_log().unwrap();
        // A cold extent needs a log sync first: never on the caller's thread.
        assert!(tracked.write_now(0, &[3u8; 4096], false).is_none());
        assert_eq!(log.last_lsn(), 0, "nothing was logged inline");
        tracked.write(0, vec![3u8; 4096], false).await.unwrap();
        assert_eq!(log.last_lsn(), 1);
        // Now hot: a small write is logged and applied inline.
        assert!(tracked
            .write_now(8192, &[4u8; 4096], false)
            .unwrap()
            .is_ok());
        assert_eq!(log.last_lsn(), 2, "logged inline");
        assert_eq!(tracked.read(8192, 4096).await.unwrap(), vec![4u8; 4096]);
        // FUA, a paused disk: never inline, nothing logged.
        assert!(tracked.write_now(0, &[5u8; 4096], true).is_none());
        tracked.with_writes_paused(|| assert!(tracked.write_now(0, &[5u8; 4096], false).is_none()));
        assert_eq!(log.last_lsn(), 2);
        assert_eq!(tracked.read(0, 4096).await.unwrap(), vec![3u8; 4096]);
        // An extent (64K and more) into the hot extent: inline too, as a 40-byte record.
        assert!(tracked
            .write_now(65536, &[6u8; 65536], false)
            .unwrap()
            .is_ok());
        assert_eq!(log.last_lsn(), 3, "logged inline");
        assert_eq!(tracked.read(65536, 65536).await.unwrap(), vec![6u8; 65536]);
        // Both write records are in the log with their data (the extent's bytes are the
        // image's): the log describes the image.
        tracked.flush().await.unwrap();
        let segs = log.segments();
        let bytes = std::fs::read(&segs.last().unwrap().path).unwrap();
        let dec = crate::changelog::format::decode_segment(&bytes).unwrap();
        let writes: Vec<u64> = dec
            .records
            .iter()
            .filter(|r| r.header.kind == Kind::Write)
            .map(|r| r.header.offset)
            .collect();
        assert_eq!(writes, vec![0, 8192]);
        assert_eq!(dec.end, crate::changelog::format::End::Open);
    }

    #[test]
    fn empty_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.img");
        File::create(&p).unwrap();
        assert!(matches!(
            Disk::open("e", &p, false),
            Err(DiskError::Empty(_))
        ));
        assert!(matches!(
            Disk::open("x", &dir.path().join("missing"), false),
            Err(DiskError::Open { .. })
        ));
    }
}
