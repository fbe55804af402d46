//! The file-sync seam: every `fdatasync` that makes a disk's data durable — change-log
//! segments, the log directory, the image — goes through the disk's [`Durability`], which
//! latches the first failure.
//!
//! **Why a latch** (the PostgreSQL "fsyncgate" lesson): when `fdatasync` fails, Linux may
//! already have dropped the dirty pages it could not write and reports the error once; a later
//! `fdatasync` of the same file then succeeds although the data is gone. So once a sync of a
//! disk's log or image has failed:
//!
//! * every later FLUSH and FUA write of that disk fails with EIO — no later success vouches
//!   for data that may have been dropped;
//! * its change log, if it has one, is marked broken (persistently), so the engine resyncs
//!   the replica in full from the image instead of trusting the log.
//!
//! The latch lives as long as the disk is open: an admin clears it by restarting
//! `standby serve` (the disk is reopened; the guest, which was told EIO, decides what its data
//! is worth). The broken chain stays broken across that restart until the full resync that
//! follows (automatic in the resync window, or `standby resync VM`) starts a new chain.
//!
//! With the `testing` feature (and in unit tests), [`FaultySync`] fails chosen syncs the way
//! Linux does — once, after which the same file syncs "successfully" again — so tests prove
//! that the latch, not the kernel, keeps FLUSH failing.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tracing::error;

/// What a sync makes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A change-log segment file.
    Log,
    /// The change-log directory (segment creations and removals).
    LogDir,
    /// The disk image.
    Image,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Log => "change-log segment",
            Target::LogDir => "change-log directory",
            Target::Image => "image",
        }
    }
}

/// How data is made durable: the operating system, or a fault-injecting stand-in in tests.
pub trait FileSync: Send + Sync + 'static {
    /// `fdatasync` (`all`: `fsync`, metadata too) of `file`, which is a `target`.
    fn sync(&self, target: Target, file: &File, all: bool) -> io::Result<()>;
}

/// The operating system's `fdatasync`/`fsync`.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsSync;

impl FileSync for OsSync {
    fn sync(&self, _target: Target, file: &File, all: bool) -> io::Result<()> {
        if all {
            file.sync_all()
        } else {
            file.sync_data()
        }
    }
}

/// The syncs of one disk, with the latch (see the module documentation). Shared by the disk
/// and its change log.
pub struct Durability {
    disk: String,
    sync: Arc<dyn FileSync>,
    latched: Mutex<Option<String>>,
}

impl std::fmt::Debug for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durability")
            .field("disk", &self.disk)
            .field("latched", &self.latched())
            .finish()
    }
}

impl Durability {
    pub fn new(disk: &str, sync: Arc<dyn FileSync>) -> Arc<Self> {
        Arc::new(Self {
            disk: disk.to_string(),
            sync,
            latched: Mutex::new(None),
        })
    }

    /// The operating system's syncs.
    pub fn os(disk: &str) -> Arc<Self> {
        Self::new(disk, Arc::new(OsSync))
    }

    /// `fdatasync` of `file`; the first failure latches (and every later call fails).
    pub fn sync_data(&self, target: Target, file: &File) -> io::Result<()> {
        self.run(target, file, false)
    }

    /// `fsync` (data and metadata) of `file`, latched like [`Self::sync_data`].
    pub fn sync_all(&self, target: Target, file: &File) -> io::Result<()> {
        self.run(target, file, true)
    }

    /// `fsync` of a directory, latched like [`Self::sync_data`].
    pub fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let d = File::open(dir)?;
        self.run(Target::LogDir, &d, true)
    }

    fn run(&self, target: Target, file: &File, all: bool) -> io::Result<()> {
        self.check()?;
        match self.sync.sync(target, file, all) {
            Ok(()) => Ok(()),
            Err(e) => {
                let reason = format!(
                    "fdatasync of the {} failed ({e}): writes since the last successful flush may be lost",
                    target.name()
                );
                self.latch(reason);
                Err(self.check().err().unwrap_or(e))
            }
        }
    }

    /// Latches a failure (the first reason is kept).
    fn latch(&self, reason: String) {
        let mut l = self.latched.lock().unwrap_or_else(|p| p.into_inner());
        if l.is_none() {
            error!(disk = %self.disk, "{reason}; every FLUSH of this disk now fails with EIO until `standby serve` is restarted, and its replica needs a full resync");
            *l = Some(reason);
        }
    }

    /// Why syncs of this disk fail, once one has.
    pub fn latched(&self) -> Option<String> {
        self.latched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `Err(EIO)` once a sync has failed.
    pub fn check(&self) -> io::Result<()> {
        match self.latched() {
            None => Ok(()),
            Some(reason) => Err(io::Error::other(format!(
                "disk '{}': an earlier {reason}; FLUSH fails until `standby serve` is restarted",
                self.disk
            ))),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
pub use self::faulty::FaultySync;

#[cfg(any(test, feature = "testing"))]
mod faulty {
    use super::*;

    /// Fails chosen syncs once each, with EIO, like Linux after a write-back error (the next
    /// sync of the same file succeeds); every other sync is the operating system's.
    #[derive(Debug, Default)]
    pub struct FaultySync {
        st: Mutex<Plan>,
        cv: std::sync::Condvar,
    }

    #[derive(Debug, Default)]
    struct Plan {
        /// (target, n): fail the n-th sync of `target` from now (1 = the next one).
        fail: Vec<(Target, u64)>,
        seen: Vec<(Target, u64)>,
        failed: u64,
        /// Syncs of these targets wait (before doing anything) until released.
        held: Vec<Target>,
        /// Syncs waiting on `held`, per target.
        waiting: Vec<Target>,
    }

    impl FaultySync {
        pub fn new() -> Arc<Self> {
            Arc::new(Self::default())
        }

        /// Fails the `n`-th sync of `target` counted from now (1: the next one).
        pub fn fail_nth(&self, target: Target, n: u64) {
            let mut p = self.st.lock().unwrap_or_else(|p| p.into_inner());
            let base = p
                .seen
                .iter()
                .find(|(t, _)| *t == target)
                .map(|(_, c)| *c)
                .unwrap_or(0);
            p.fail.push((target, base + n));
        }

        /// Syncs of `target` seen so far (failed ones included).
        pub fn syncs(&self, target: Target) -> u64 {
            let p = self.st.lock().unwrap_or_else(|p| p.into_inner());
            p.seen
                .iter()
                .find(|(t, _)| *t == target)
                .map(|(_, c)| *c)
                .unwrap_or(0)
        }

        /// Syncs that failed so far.
        pub fn failed(&self) -> u64 {
            self.st.lock().unwrap_or_else(|p| p.into_inner()).failed
        }

        /// Makes every later sync of `target` wait until [`Self::release`] (a slow disk).
        pub fn hold(&self, target: Target) {
            self.st
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .held
                .push(target);
        }

        /// Lets the syncs of `target` held by [`Self::hold`] go on.
        pub fn release(&self, target: Target) {
            self.st
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .held
                .retain(|&t| t != target);
            self.cv.notify_all();
        }

        /// Syncs of `target` waiting on [`Self::hold`] now.
        pub fn waiting(&self, target: Target) -> usize {
            let p = self.st.lock().unwrap_or_else(|p| p.into_inner());
            p.waiting.iter().filter(|&&t| t == target).count()
        }
    }

    impl FileSync for FaultySync {
        fn sync(&self, target: Target, file: &File, all: bool) -> io::Result<()> {
            {
                let mut p = self.st.lock().unwrap_or_else(|p| p.into_inner());
                if p.held.contains(&target) {
                    p.waiting.push(target);
                    while p.held.contains(&target) {
                        p = self.cv.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                    if let Some(i) = p.waiting.iter().position(|&t| t == target) {
                        p.waiting.swap_remove(i);
                    }
                }
                let count = match p.seen.iter_mut().find(|(t, _)| *t == target) {
                    Some((_, c)) => {
                        *c += 1;
                        *c
                    }
                    None => {
                        p.seen.push((target, 1));
                        1
                    }
                };
                if let Some(i) = p.fail.iter().position(|&(t, n)| t == target && n == count) {
                    p.fail.swap_remove(i);
                    p.failed += 1;
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
            OsSync.sync(target, file, all)
        }
    }
}
