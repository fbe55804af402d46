//! Local-directory backend: one file per object, written to a temporary file, fsynced,
//! renamed into place and the directory fsynced, so an object is either absent or complete
//! and durable.
//!
//! Chunks take a cheaper path ([`Backend::put_staged`] / [`Backend::commit_staged`]): each is
//! written to a temporary file without fsync; the commit makes all of them durable with one
//! `syncfs(2)`, renames them into place and makes the renames durable with a second
//! `syncfs(2)`. A chunk under its final name is therefore always complete and durable; a crash
//! before the commit leaves only temporary files, removed when the store is next opened.
//!
//! Longer than most files (~770 lines): the `Backend` implementation and the staging,
//! `O_DIRECT` and lock helpers that only it uses.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, Backend, ObjectMeta, Staged};
use crate::error::{Error, Result};

/// Staged bytes after which a background `syncfs` starts writing them out.
const BACKGROUND_SYNC_BYTES: u64 = 256 << 20;

/// Name of the directory holding in-flight temporary files (never listed as objects).
const TMP_DIR: &str = ".tmp";

/// A backend storing objects as files under a root directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    seq: AtomicU64,
    /// Staging sessions of this process (see [`Staging`]).
    staging: Arc<Staging>,
    /// Bytes staged since the last background writeback was started.
    unsynced: AtomicU64,
    /// A background `syncfs` is running.
    syncing: Arc<std::sync::atomic::AtomicBool>,
    /// fsync files and directories (disable only for throw-away test stores).
    durable: bool,
    /// Directories known to exist (saves a stat per staged chunk at commit).
    dirs: Mutex<std::collections::HashSet<PathBuf>>,
}

/// Temporary files of dead processes, and any older than this, are removed at open.
const STALE_TMP_AGE: Duration = Duration::from_secs(24 * 3600);

impl LocalBackend {
    /// Open (creating if needed) a local backend rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(root.join(TMP_DIR))
            .map_err(|e| Error::io(format!("creating store directory {}", root.display()), e))?;
        let b = LocalBackend {
            inner: Arc::new(Inner {
                staging: Arc::new(Staging::new(&root)),
                root,
                seq: AtomicU64::new(0),
                unsynced: AtomicU64::new(0),
                syncing: Arc::default(),
                durable: true,
                dirs: Mutex::default(),
            }),
        };
        b.remove_stale_tmp(STALE_TMP_AGE)?;
        Ok(b)
    }

    /// Remove temporary files left by crashed writers: those of processes that no longer run
    /// and those older than `older_than`. Returns how many were removed.
    pub fn remove_stale_tmp(&self, older_than: Duration) -> Result<usize> {
        let dir = self.inner.root.join(TMP_DIR);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let now = SystemTime::now();
        let mut removed = 0;
        let mut markers = Vec::new();
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(MARKER_PREFIX) {
                markers.push((pid.to_string(), ent));
                continue;
            }
            let dead = name
                .split('-')
                .next()
                .and_then(|p| p.parse::<i32>().ok())
                .is_some_and(|pid| !process_alive(pid));
            let old = ent
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() >= older_than)
                .unwrap_or(false);
            if (dead || old) && fs::remove_file(ent.path()).is_ok() {
                removed += 1;
            }
        }
        // Staging files of crashed processes, found through their markers.
        for (pid, ent) in markers {
            let dead = pid.parse::<i32>().is_ok_and(|p| !process_alive(p));
            let old = ent
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() >= older_than)
                .unwrap_or(false);
            if dead || old {
                removed += remove_staging_files(&self.inner.root, &pid);
                let _ = fs::remove_file(ent.path());
            }
        }
        Ok(removed)
    }

    /// Root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Filesystem path of an object (for tests and tooling).
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.inner.root.join(key)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::io("local backend task", std::io::Error::other(e.to_string())))?
    }
}

impl Inner {
    fn tmp_path(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.root.join(TMP_DIR).join(format!(
            "{}-{}-{}",
            std::process::id(),
            n,
            rand::random::<u32>()
        ))
    }

    /// Write `data` to a fresh temporary file and fsync it.
    fn write_tmp(&self, data: &[u8]) -> Result<PathBuf> {
        let tmp = self.tmp_path();
        let res = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            if self.durable {
                f.sync_data()?;
            }
            Ok(())
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("writing {}", tmp.display()), e));
        }
        Ok(tmp)
    }

    fn ensure_parent(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            if !parent.exists() {
                fs::create_dir_all(parent)
                    .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
                if self.durable {
                    if let Some(gp) = parent.parent() {
                        sync_dir(gp)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&self, path: &Path) -> Result<()> {
        if self.durable {
            if let Some(parent) = path.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(())
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.root.join(key);
        self.ensure_parent(&path)?;
        let tmp = self.write_tmp(data)?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("renaming into {}", path.display()), e));
        }
        self.finish(&path)
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        let path = self.root.join(key);
        if path.exists() {
            return Ok(false);
        }
        self.ensure_parent(&path)?;
        let tmp = self.write_tmp(data)?;
        // link(2) fails with EEXIST instead of replacing: an atomic create-if-absent.
        let res = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match res {
            Ok(()) => {
                self.finish(&path)?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(format!("linking {}", path.display()), e)),
        }
    }

    /// Counts staged bytes; every [`BACKGROUND_SYNC_BYTES`] starts a `syncfs` on a background
    /// thread (unless one runs), so the disk writes a session's chunks while later ones are
    /// still being hashed and the commit's own `syncfs` finds little left to write.
    fn note_staged(&self, n: u64) {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed};
        if self.unsynced.fetch_add(n, Relaxed) + n < BACKGROUND_SYNC_BYTES {
            return;
        }
        if self.syncing.swap(true, AcqRel) {
            return;
        }
        self.unsynced.store(0, Relaxed);
        let root = self.root.clone();
        let flag = self.syncing.clone();
        let spawned = std::thread::Builder::new()
            .name("store-writeback".into())
            .spawn(move || {
                if let Ok(d) = File::open(&root) {
                    use std::os::fd::AsRawFd;
                    // SAFETY: syncfs(2) on a descriptor owned by `d`. Errors are ignored: this
                    // is only a head start, the commit's own syncfs reports them.
                    unsafe { libc::syncfs(d.as_raw_fd()) };
                }
                flag.store(false, std::sync::atomic::Ordering::Release);
            });
        if spawned.is_err() {
            self.syncing
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Make every dirty page and inode of the store's filesystem durable (one `syncfs`).
    fn sync_fs(&self) -> Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let d = File::open(&self.root)
                .map_err(|e| Error::io(format!("opening {}", self.root.display()), e))?;
            // SAFETY: syncfs(2) on a descriptor owned by `d`.
            if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
                return Err(Error::io(
                    format!("syncing the filesystem of {}", self.root.display()),
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(())
        }
        #[cfg(not(target_os = "linux"))]
        {
            // SAFETY: sync(2) has no arguments and cannot fail.
            unsafe { libc::sync() };
            Ok(())
        }
    }

    /// Create the parent directory of `path` unless known to exist (no fsync: the caller
    /// syncs the filesystem afterwards).
    fn ensure_parent_nosync(&self, path: &Path) -> Result<()> {
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        if !dirs.contains(parent) {
            fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
            dirs.insert(parent.to_path_buf());
        }
        Ok(())
    }

    /// Write a chunk object to a staging file beside its final name (same directory: the
    /// commit's rename stays inside one directory, and writers of different chunks do not
    /// contend on one staging directory's lock). Not fsynced; see [`Inner::commit_staged`].
    fn put_staged(&self, key: &str, data: &[u8]) -> Result<Staged> {
        let path = self.root.join(key);
        self.ensure_parent_nosync(&path)?;
        let session = self.staging.begin()?;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_file_name(format!(
            "{STAGE_PREFIX}{}-{}-{}",
            std::process::id(),
            n,
            rand::random::<u32>()
        ));
        let res = match write_direct(&tmp, data) {
            Some(r) => r,
            None => (|| -> std::io::Result<()> {
                let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                f.write_all(data)?;
                self.note_staged(data.len() as u64);
                Ok(())
            })(),
        };
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("writing {}", tmp.display()), e));
        }
        Ok(Staged {
            key: key.to_string(),
            tmp: Some(tmp),
            _session: Some(session),
        })
    }

    fn commit_staged(&self, mut staged: Vec<Staged>) -> Result<()> {
        if staged.iter().all(|s| s.tmp.is_none()) {
            return Ok(());
        }
        // 1. Every staged file's data and inode durable.
        if self.durable {
            self.sync_fs()?;
        }
        // 2. Into place. Renaming over an existing chunk replaces it with identical bytes.
        for s in &mut staged {
            let Some(tmp) = s.tmp.as_ref() else { continue };
            // The staging file lives in the same directory (see `put_staged`).
            let path = self.root.join(&s.key);
            fs::rename(tmp, &path)
                .map_err(|e| Error::io(format!("renaming into {}", path.display()), e))?;
            s.tmp = None;
        }
        // 3. The renames (and new directories) durable.
        if self.durable {
            self.sync_fs()?;
        }
        Ok(())
    }

    fn not_found(&self, key: &str) -> Error {
        Error::NotFound {
            backend: format!("local store {}", self.root.display()),
            key: key.into(),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: Option<u64>) -> Result<Bytes> {
        let path = self.root.join(key);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(self.not_found(key)),
            Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
        };
        let res = (|| -> std::io::Result<Vec<u8>> {
            let size = f.metadata()?.len();
            let start = offset.min(size);
            let end = match len {
                Some(l) => start.saturating_add(l).min(size),
                None => size,
            };
            let mut buf = vec![0u8; (end - start) as usize];
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(&mut buf)?;
            Ok(buf)
        })();
        res.map(Bytes::from)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.root.join(key);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
                modified: m.modified().map_err(|e| Error::io("reading mtime", e))?,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        // Walk only the directory that contains the prefix.
        let (dir_part, _) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_part)
        };
        let mut out = Vec::new();
        let mut stack = vec![(start, dir_part.to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
                let name = match ent.file_name().into_string() {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                // The temporary directory and staging files are not objects (keys never
                // have a segment starting with '.').
                if name.starts_with('.') {
                    continue;
                }
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let ft = ent.file_type().map_err(|e| Error::io("listing", e))?;
                if ft.is_dir() {
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        stack.push((ent.path(), key));
                    }
                } else if ft.is_file() && key.starts_with(prefix) {
                    let m = match ent.metadata() {
                        Ok(m) => m,
                        Err(e) if e.kind() == ErrorKind::NotFound => continue,
                        Err(e) => return Err(Error::io("stat during list", e)),
                    };
                    out.push(ObjectMeta {
                        key,
                        size: m.len(),
                        modified: m.modified().map_err(|e| Error::io("reading mtime", e))?,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let src = self.root.join(from);
        let dst = self.root.join(to);
        self.ensure_parent(&dst)?;
        match fs::rename(&src, &dst) {
            Ok(()) => {
                self.finish(&dst)?;
                self.finish(&src)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Err(self.not_found(from)),
            Err(e) => Err(Error::io(
                format!("renaming {} to {}", src.display(), dst.display()),
                e,
            )),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.root.join(key);
        match fs::remove_file(&path) {
            Ok(()) => self.finish(&path),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("deleting {}", path.display()), e)),
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Alignment and size granularity of direct writes.
const DIRECT_ALIGN: usize = 4096;
/// Largest object written with `O_DIRECT` (bare chunks of the default size fit).
const DIRECT_MAX: usize = 1 << 20;

thread_local! {
    /// A reusable [`DIRECT_ALIGN`]-aligned buffer for direct writes.
    static DIRECT_BUF: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
    /// Set once this file system refused `O_DIRECT` (then never tried again by this thread).
    static NO_DIRECT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A heap buffer aligned for `O_DIRECT`, zeroed when allocated (so every byte of it is
/// initialised and slices of it are ordinary `u8` slices). It is allocated once per thread
/// and reused, so the zeroing costs once.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN).ok()?;
        if layout.size() == 0 {
            return None;
        }
        // SAFETY: the layout's size is not zero (checked above), as `alloc_zeroed` requires.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    /// Copies `data` to the start of the buffer and returns that (aligned) copy.
    fn fill(&mut self, data: &[u8]) -> &[u8] {
        assert!(data.len() <= self.layout.size());
        // SAFETY: `ptr` points to `layout.size() >= data.len()` bytes this buffer owns, all
        // initialised (zeroed by `alloc_zeroed`, or written since); `&mut self` makes this the
        // only access to them for the lifetime of the returned slice, and `data` cannot
        // overlap them (the buffer is private to this type).
        let buf = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), data.len()) };
        buf.copy_from_slice(data);
        buf
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Write a new file with `O_DIRECT`: the data goes straight to the disk instead of being
/// copied into (and crowding) the page cache, and the commit's `syncfs` finds it already
/// written. Only for sizes that are a multiple of [`DIRECT_ALIGN`] (bare chunks); `None` if
/// that does not apply or the file system refuses direct I/O (then write it buffered).
fn write_direct(path: &Path, data: &[u8]) -> Option<std::io::Result<()>> {
    use std::os::unix::fs::OpenOptionsExt;
    if data.is_empty() || data.len() & (DIRECT_ALIGN - 1) != 0 || data.len() > DIRECT_MAX {
        return None;
    }
    if NO_DIRECT.with(|c| c.get()) {
        return None;
    }
    let f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            NO_DIRECT.with(|c| c.set(true));
            return None;
        }
        Err(e) => return Some(Err(e)),
    };
    let r = DIRECT_BUF.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = AlignedBuf::new(DIRECT_MAX);
        }
        let Some(buf) = slot.as_mut() else {
            return Err(std::io::Error::from(std::io::ErrorKind::OutOfMemory));
        };
        (&f).write_all(buf.fill(data))
    });
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Direct I/O is not possible here after all: the caller rewrites it buffered.
            drop(f);
            let _ = fs::remove_file(path);
            NO_DIRECT.with(|c| c.set(true));
            None
        }
        r => Some(r),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    sync_dir_io(dir).map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

fn sync_dir_io(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Prefix of staging files (beside their final names; never listed as objects).
pub(crate) const STAGE_PREFIX: &str = ".stage-";
/// Prefix of the per-process staging markers in the temporary directory.
const MARKER_PREFIX: &str = "staging-";
/// A live process's marker is touched at least this often while it stages.
const MARKER_REFRESH: Duration = Duration::from_secs(3600);

/// The staging sessions of one process on one store. While any staged file of this process
/// is outstanding, the marker `.tmp/staging-<pid>` exists (created, and made durable, before
/// the first staging file). A crashed process leaves its marker behind, and the next open
/// (see [`LocalBackend::remove_stale_tmp`]) removes that process's staging files; a store
/// without markers is never walked.
#[derive(Debug)]
pub(crate) struct Staging {
    tmp_dir: PathBuf,
    marker: PathBuf,
    /// Outstanding staged files, and when the marker was last created or touched.
    state: Mutex<(usize, Option<std::time::Instant>)>,
}

impl Staging {
    fn new(root: &Path) -> Self {
        let tmp_dir = root.join(TMP_DIR);
        let marker = tmp_dir.join(format!("{MARKER_PREFIX}{}", std::process::id()));
        Staging {
            tmp_dir,
            marker,
            state: Mutex::new((0, None)),
        }
    }

    /// Count one more staged file (creating or refreshing the marker as needed).
    fn begin(self: &Arc<Self>) -> Result<StagingGuard> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = st.1.is_some_and(|t| t.elapsed() < MARKER_REFRESH);
        if st.0 == 0 || !fresh {
            File::create(&self.marker)
                .and_then(|f| f.set_modified(SystemTime::now()))
                .and_then(|()| sync_dir_io(&self.tmp_dir))
                .map_err(|e| Error::io(format!("creating {}", self.marker.display()), e))?;
            st.1 = Some(std::time::Instant::now());
        }
        st.0 += 1;
        Ok(StagingGuard(Arc::clone(self)))
    }
}

/// One outstanding staged file; dropping the last one removes the marker.
#[derive(Debug)]
pub(crate) struct StagingGuard(Arc<Staging>);

impl Drop for StagingGuard {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(1);
        if st.0 == 0 {
            let _ = fs::remove_file(&self.0.marker);
            st.1 = None;
        }
    }
}

/// Remove every staging file of process `pid` under `dir`; returns how many.
fn remove_staging_files(dir: &Path, pid: &str) -> usize {
    let prefix = format!("{STAGE_PREFIX}{pid}-");
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for ent in rd.flatten() {
            let name = ent.file_name();
            let name = name.to_string_lossy();
            match ent.file_type() {
                Ok(t) if t.is_dir() && name != TMP_DIR => stack.push(ent.path()),
                Ok(t)
                    if t.is_file()
                        && name.starts_with(&prefix)
                        && fs::remove_file(ent.path()).is_ok() =>
                {
                    removed += 1;
                }
                _ => {}
            }
        }
    }
    removed
}

#[async_trait]
impl Backend for LocalBackend {
    fn describe(&self) -> String {
        format!("local store {}", self.inner.root.display())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        validate_key(key)?;
        let key = key.to_string();
        self.blocking(move |i| i.put(&key, &data)).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        validate_key(key)?;
        let key = key.to_string();
        self.blocking(move |i| i.put_if_absent(&key, &data)).await
    }

    async fn put_staged(&self, key: &str, data: Bytes) -> Result<Option<Staged>> {
        validate_key(key)?;
        let key = key.to_string();
        self.blocking(move |i| i.put_staged(&key, &data).map(Some))
            .await
    }

    async fn put_staged_batch(&self, items: Vec<(String, Bytes)>) -> Result<Vec<Option<Staged>>> {
        for (k, _) in &items {
            validate_key(k)?;
        }
        // One blocking task for the whole batch: a stat and a write per object.
        self.blocking(move |i| {
            items
                .iter()
                .map(|(key, data)| {
                    if i.root.join(key).exists() {
                        Ok(None)
                    } else {
                        i.put_staged(key, data).map(Some)
                    }
                })
                .collect()
        })
        .await
    }

    async fn commit_staged(&self, staged: Vec<Staged>) -> Result<()> {
        self.blocking(move |i| i.commit_staged(staged)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        validate_key(key)?;
        let key = key.to_string();
        self.blocking(move |i| i.get_range(&key, 0, None)).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        validate_key(key)?;
        let key = key.to_string();
        self.blocking(move |i| i.get_range(&key, offset, Some(len)))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        validate_key(key)?;
        let key = key.to_string();
        self.blocking(move |i| i.head(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.list(&prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        let key = key.to_string();
        self.blocking(move |i| i.delete(&key)).await
    }

    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        validate_key(from)?;
        validate_key(to)?;
        let (from, to) = (from.to_string(), to.to_string());
        self.blocking(move |i| i.rename(&from, &to)).await
    }
}
