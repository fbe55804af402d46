//! Object-store backends behind one small async trait.

use std::fmt::Debug;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

#[cfg(feature = "testing")]
pub mod faulty;
pub mod local;
#[cfg(feature = "testing")]
pub mod memory;
pub mod s3;

/// Metadata of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the backend root (`/`-separated).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time as reported by the backend.
    pub modified: SystemTime,
}

/// An object written by [`Backend::put_staged`] and not yet published by
/// [`Backend::commit_staged`]. Dropping it uncommitted discards the staged data.
#[derive(Debug)]
pub struct Staged {
    /// Final key of the object.
    pub key: String,
    /// Local backend: the temporary file holding the (not yet fsynced) object.
    pub(crate) tmp: Option<std::path::PathBuf>,
    /// Local backend: keeps the process's staging marker while the file is outstanding.
    pub(crate) _session: Option<local::StagingGuard>,
}

impl Staged {
    /// A staged object that needs no commit (the backend already stored it durably).
    pub fn done(key: &str) -> Self {
        Staged {
            key: key.to_string(),
            tmp: None,
            _session: None,
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Requests a backend issued (backends that count them: S3, in-memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// PUT requests (a multipart upload counts each part and the completion).
    pub puts: u64,
    /// Bytes sent by them.
    pub put_bytes: u64,
    /// GET requests (whole or ranged).
    pub gets: u64,
    /// Bytes received by them.
    pub get_bytes: u64,
    /// HEAD requests.
    pub heads: u64,
    /// LIST requests (one per page).
    pub lists: u64,
    /// DELETE requests.
    pub deletes: u64,
}

/// Atomic request counters a backend keeps.
#[derive(Debug, Default)]
pub struct RequestCounters {
    puts: std::sync::atomic::AtomicU64,
    put_bytes: std::sync::atomic::AtomicU64,
    gets: std::sync::atomic::AtomicU64,
    get_bytes: std::sync::atomic::AtomicU64,
    heads: std::sync::atomic::AtomicU64,
    lists: std::sync::atomic::AtomicU64,
    deletes: std::sync::atomic::AtomicU64,
}

impl RequestCounters {
    fn add(c: &std::sync::atomic::AtomicU64, n: u64) {
        c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    /// One PUT of `n` bytes.
    pub fn put(&self, n: u64) {
        Self::add(&self.puts, 1);
        Self::add(&self.put_bytes, n);
    }
    /// One GET returning `n` bytes.
    pub fn get(&self, n: u64) {
        Self::add(&self.gets, 1);
        Self::add(&self.get_bytes, n);
    }
    /// One HEAD.
    pub fn head(&self) {
        Self::add(&self.heads, 1);
    }
    /// One LIST page.
    pub fn list(&self) {
        Self::add(&self.lists, 1);
    }
    /// One DELETE.
    pub fn delete(&self) {
        Self::add(&self.deletes, 1);
    }
    /// A snapshot.
    pub fn snapshot(&self) -> RequestCounts {
        let l = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        RequestCounts {
            puts: l(&self.puts),
            put_bytes: l(&self.put_bytes),
            gets: l(&self.gets),
            get_bytes: l(&self.get_bytes),
            heads: l(&self.heads),
            lists: l(&self.lists),
            deletes: l(&self.deletes),
        }
    }
}

/// A flat key/value object store. Keys are `/`-separated relative paths made of
/// `[A-Za-z0-9._-]` segments. All operations are idempotent where it makes sense:
/// deleting a missing key succeeds, putting the same key twice overwrites.
#[async_trait]
pub trait Backend: Send + Sync + Debug {
    /// Human-readable location (for error messages and `store info`).
    fn describe(&self) -> String;

    /// True if new stores on this backend should keep chunks in packs (object stores, where
    /// a request costs more than a byte); false for a local directory, where one file per
    /// chunk is fastest.
    fn prefers_packs(&self) -> bool {
        false
    }

    /// Requests issued so far, if this backend counts them.
    fn requests(&self) -> Option<RequestCounts> {
        None
    }

    /// Store `data` at `key`, replacing any existing object. Atomic: readers see the old or
    /// the new object, never a partial one. Durable once it returns.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;

    /// Store `data` at `key` unless an object already exists there. Returns `true` if this call
    /// wrote it. Best effort on stores that ignore conditional writes (they may overwrite):
    /// callers only use it for content-addressed keys, where overwriting is harmless.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool>;

    /// Read a whole object. Missing objects give [`crate::Error::NotFound`].
    async fn get(&self, key: &str) -> Result<Bytes>;

    /// Read `len` bytes at `offset` of an object (shorter at the end of the object).
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes>;

    /// Metadata of an object, `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;

    /// All objects whose key starts with `prefix`, in lexicographic key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Delete an object. Deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Stage a content-addressed object (a chunk) for a batch commit. The object may stay
    /// invisible and non-durable until [`Backend::commit_staged`] returns for it; only then may
    /// anything reference it. A crash before the commit leaves no object under `key`.
    /// The default stores it at once with [`Backend::put_if_absent`] (right for object stores
    /// whose acknowledged PUT is durable) and returns `None` if it already existed.
    async fn put_staged(&self, key: &str, data: Bytes) -> Result<Option<Staged>> {
        Ok(self
            .put_if_absent(key, data)
            .await?
            .then(|| Staged::done(key)))
    }

    /// Stage many content-addressed objects, skipping those that already exist (`None` in the
    /// result, in input order). The default HEADs each key and then [`Backend::put_staged`]s
    /// the missing ones, all concurrently.
    async fn put_staged_batch(&self, items: Vec<(String, Bytes)>) -> Result<Vec<Option<Staged>>> {
        futures::future::try_join_all(items.into_iter().map(|(key, data)| async move {
            if self.head(&key).await?.is_some() {
                return Ok(None);
            }
            self.put_staged(&key, data).await
        }))
        .await
    }

    /// Make staged objects durable and visible under their keys, all or (on error) some of
    /// them; after `Ok`, every one is complete and durable. The default does nothing.
    async fn commit_staged(&self, staged: Vec<Staged>) -> Result<()> {
        drop(staged);
        Ok(())
    }

    /// Move an object to another key (used by GC). The default copies then deletes; at every
    /// moment the object exists under at least one of the two keys.
    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let data = self.get(from).await?;
        self.put(to, data).await?;
        self.delete(from).await
    }
}

/// Validate a backend key: relative, `/`-separated, segments of `[A-Za-z0-9._-]` not starting
/// with `.` (such names are the backends' own: temporary and staging files).
pub fn validate_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 900
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(crate::Error::InvalidArgument(format!(
            "invalid object key {key:?}"
        )))
    }
}
