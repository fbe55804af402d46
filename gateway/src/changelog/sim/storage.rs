//! The simulated storage: a [`FileSync`] that remembers what each `fdatasync` made durable,
//! and at the crash point turns every file into what a crash may leave of it.
//!
//! The real log and image code does its I/O on real files (in a temporary directory): their
//! page cache is the *volatile cache*. Every sync of the disk goes through the disk's
//! [`FileSync`] — the seam the real code already has — and here a sync copies the file's
//! current bytes into its *durable* copy. At the crash point (the n-th sync, before it takes
//! effect, or between two operations) [`SimStorage`] captures, per file, the durable and the
//! current bytes; [`materialize`] then writes what survives:
//!
//! * **process crash**: the page cache survives — every file as it is;
//! * **host crash**: per file a write-back pattern from the seed — nothing written back, all
//!   of it, a random subset of 512-byte sectors (torn writes, out-of-order write-back), or a
//!   prefix of them; the length is the durable or the current one, and sectors past the
//!   durable length come back new or as zeroes (the size written, the data not).
//!
//! What is *not* simulated: several versions of one sector between two syncs (a sector
//! comes back as its last synced or its current bytes, not an intermediate version); and
//! directory entries, which are taken as durable at once. The state file and the dirty bitmap
//! are written with an atomic rename and fsynced before the call returns, so they come back as
//! they were. A host crash also rewrites the boot id in the state file, as a reboot would
//! make it differ.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::Rng;

use crate::changelog::durable::{FileSync, Target};
use crate::changelog::log::{StateFile, STATE_FILE};

/// Sector size of the simulated write-back.
pub const SECTOR: usize = 512;

/// A file at the crash point: what the last sync made durable, and what the page cache held.
#[derive(Debug, Clone)]
pub struct FileAtCrash {
    pub durable: Vec<u8>,
    pub current: Vec<u8>,
}

/// Every tracked file at the crash point, by path relative to the simulation root.
pub type Snapshot = BTreeMap<PathBuf, FileAtCrash>;

#[derive(Debug, Default)]
struct St {
    durable: BTreeMap<PathBuf, Vec<u8>>,
    syncs: u64,
    crash_at: Option<u64>,
    snapshot: Option<Snapshot>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct SimStorage {
    root: PathBuf,
    st: Mutex<St>,
}

fn fd_path(f: &File) -> io::Result<PathBuf> {
    fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Files whose writes are fsynced before they return (atomic rename): durable at once.
fn durable_at_once(name: &str) -> bool {
    name == STATE_FILE || name == crate::changelog::dirty::DIRTY_FILE
}

impl SimStorage {
    /// Simulates the files under `root` (the image and the log directory).
    pub fn new(root: &Path) -> Arc<Self> {
        Arc::new(Self {
            root: fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()),
            st: Mutex::new(St::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declares a file's current bytes durable (the image before the simulation starts).
    pub fn mark_durable(&self, path: &Path) -> io::Result<()> {
        let p = fs::canonicalize(path)?;
        let b = fs::read(&p)?;
        self.lock().durable.insert(p, b);
        Ok(())
    }

    /// Syncs seen so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Crashes at the `n`-th sync from now (1: the next one), before it takes effect.
    pub fn crash_at_sync(&self, n: u64) {
        let mut st = self.lock();
        st.crash_at = Some(st.syncs + n);
    }

    /// Crashes now (if not crashed yet).
    pub fn crash_now(&self) {
        let mut st = self.lock();
        if st.snapshot.is_none() {
            st.snapshot = Some(self.capture(&st));
        }
    }

    pub fn crashed(&self) -> bool {
        self.lock().snapshot.is_some()
    }

    /// The files at the crash point.
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.lock().snapshot.clone()
    }

    /// Reads the files as they are at the crash point. Other threads of the disk may still be
    /// writing while the files are read one by one, which a real crash never allows, so they
    /// are read in the order that keeps what recovery relies on: the state file (its redo
    /// point vouches for the image), then the image (its changes must all have records),
    /// then the log's files, listed again at that point (a record is written before its
    /// change reaches the image). Read the other way round, a write racing the capture could
    /// leave the image with a change whose record the copy of the log lacks.
    fn capture(&self, st: &St) -> Snapshot {
        let mut out = Snapshot::new();
        for phase in 0..3 {
            let mut files = Vec::new();
            collect(&self.root, &mut files);
            files.retain(|p| capture_phase(p) == phase);
            self.capture_files(st, files, &mut out);
        }
        out
    }

    fn capture_files(&self, st: &St, files: Vec<PathBuf>, out: &mut Snapshot) {
        for p in files {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name == "lock" {
                continue;
            }
            let Ok(current) = fs::read(&p) else { continue };
            let durable = if durable_at_once(name) {
                current.clone()
            } else {
                st.durable.get(&p).cloned().unwrap_or_default()
            };
            let rel = p.strip_prefix(&self.root).unwrap_or(&p).to_path_buf();
            out.insert(rel, FileAtCrash { durable, current });
        }
    }
}

/// When [`SimStorage::capture`] reads a file: 0 the state file, 1 the image (anything outside
/// a log directory), 2 the log's segments and side files.
fn capture_phase(p: &Path) -> u8 {
    if p.file_name()
        .is_some_and(|n| n == crate::changelog::log::STATE_FILE)
    {
        return 0;
    }
    let in_log = p
        .components()
        .any(|c| c.as_os_str().to_string_lossy().ends_with(".hrl"));
    if in_log {
        2
    } else {
        1
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => collect(&p, out),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

impl FileSync for SimStorage {
    fn sync(&self, target: Target, file: &File, _all: bool) -> io::Result<()> {
        let mut st = self.lock();
        if st.snapshot.is_some() {
            // After the crash point nothing becomes durable any more.
            return Ok(());
        }
        st.syncs += 1;
        if st.crash_at == Some(st.syncs) {
            st.snapshot = Some(self.capture(&st));
            return Ok(());
        }
        if target == Target::LogDir {
            return Ok(());
        }
        let p = fd_path(file)?;
        let b = fs::read(&p)?;
        st.durable.insert(p, b);
        Ok(())
    }
}

/// How a crash treats the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKind {
    /// `kill -9`: the page cache survives.
    Process,
    /// Power loss or kernel crash: unsynced writes are lost, torn or reordered.
    Host,
}

/// Writes what survives `snap` under `dst` (same relative paths).
pub fn materialize(
    snap: &Snapshot,
    kind: CrashKind,
    dst: &Path,
    rng: &mut impl Rng,
) -> io::Result<()> {
    for (rel, f) in snap {
        let out = match kind {
            CrashKind::Process => f.current.clone(),
            CrashKind::Host => written_back(f, rng),
        };
        let p = dst.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
        }
        fs::write(&p, out)?;
    }
    if kind == CrashKind::Host {
        // A reboot: the state file names the boot the log was open in, which differs now.
        for rel in snap.keys() {
            if rel.file_name().and_then(|n| n.to_str()) == Some(STATE_FILE) {
                let p = dst.join(rel);
                let text = fs::read_to_string(&p)?;
                let mut s: StateFile = toml::from_str(&text).map_err(io::Error::other)?;
                s.boot_id = "simulated-earlier-boot".into();
                fs::write(&p, toml::to_string(&s).map_err(io::Error::other)?)?;
            }
        }
    }
    Ok(())
}

/// What a host crash leaves of one file (see the module documentation).
fn written_back(f: &FileAtCrash, rng: &mut impl Rng) -> Vec<u8> {
    if f.durable == f.current {
        return f.current.clone();
    }
    let len = if rng.gen_bool(0.5) {
        f.durable.len()
    } else {
        f.current.len()
    };
    let sectors = len.div_ceil(SECTOR);
    let pattern = rng.gen_range(0..4u8);
    let prefix = rng.gen_range(0..=sectors);
    let mut out = vec![0u8; len];
    for i in 0..sectors {
        let (s, e) = (i * SECTOR, ((i + 1) * SECTOR).min(len));
        let new = match pattern {
            0 => false,
            1 => true,
            2 => rng.gen_bool(0.5),
            _ => i < prefix,
        };
        let src = if new { &f.current } else { &f.durable };
        for (j, b) in out[s..e].iter_mut().enumerate() {
            *b = src.get(s + j).copied().unwrap_or(0);
        }
    }
    out
}
