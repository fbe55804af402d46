//! Local-directory backend: one file per object, written to a temporary file, fsynced,
//! renamed into place and the directory fsynced, so an object is either absent or complete
//! and durable.
//!
//! Chunks take a cheaper path ([`Backend::put_staged`] / [`Backend::commit_staged`]): each is
//! written to a temporary file without fsync; the commit makes all of them durable with one
//! `syncfs(2)`, renames them into place and makes the renames durable with a second
//! `syncfs(2)`. A chunk under its final name is therefore always complete and durable; a crash
//! before the commit leaves only temporary files, removed when the store is next opened.

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
                root,
                seq: AtomicU64::new(0),
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
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
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

    /// Write `data` to a fresh temporary file and (with `sync`) fsync it.
    fn write_tmp(&self, data: &[u8], sync: bool) -> Result<PathBuf> {
        let tmp = self.tmp_path();
        let res = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            if sync && self.durable {
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
        let tmp = self.write_tmp(data, true)?;
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
        let tmp = self.write_tmp(data, true)?;
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

    fn put_staged(&self, key: &str, data: &[u8]) -> Result<Staged> {
        let tmp = self.write_tmp(data, false)?;
        Ok(Staged {
            key: key.to_string(),
            tmp: Some(tmp),
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
            let path = self.root.join(&s.key);
            self.ensure_parent_nosync(&path)?;
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
                if rel.is_empty() && name == TMP_DIR {
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

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
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
