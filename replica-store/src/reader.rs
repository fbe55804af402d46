//! Reading a recovery point's disk as a random-access device: verified chunks through a
//! bounded LRU cache, sequential read-ahead, and hole (zero) extents for block status.
//!
//! A disk with a patch chain is opened through [`Store::load_disk`]: the reader's index already
//! holds the chunks the chain refers to whole, and the residual patch (no chunk references)
//! is applied over each fetched chunk — the same resolution the fold uses.
//!
//! The cache's hits and misses are counted process-wide ([`cache_stats`]): a read of a stored
//! chunk found in a reader's cache is a hit; one that has to wait for a fetch (its own, or a
//! read-ahead or concurrent read already under way) is a miss. Holes are neither.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use lru::LruCache;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::manifest::DiskIndex;
use crate::patch::Patch;
use crate::point::PointMeta;
use crate::store::Store;

/// Reader tuning, in bytes so memory does not depend on the store's chunk size.
#[derive(Debug, Clone, Copy)]
pub struct ReaderOptions {
    /// Plaintext bytes of verified chunks kept in the LRU cache (at least one chunk).
    pub cache_bytes: u64,
    /// Bytes fetched ahead when reads are sequential, rounded up to whole chunks (0 disables
    /// read-ahead).
    pub readahead_bytes: u64,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            cache_bytes: 16 << 20,
            readahead_bytes: 512 << 10,
        }
    }
}

impl ReaderOptions {
    /// Cache capacity in chunks of `chunk_size` bytes (at least 1).
    fn cache_chunks(&self, chunk_size: u64) -> usize {
        (self.cache_bytes / chunk_size.max(1)).max(1) as usize
    }

    /// Read-ahead depth in chunks of `chunk_size` bytes.
    fn readahead_chunks(&self, chunk_size: u64) -> u64 {
        self.readahead_bytes.div_ceil(chunk_size.max(1))
    }
}

/// A run of bytes that is either all data or a hole (reads as zeros, not stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// True for a hole.
    pub zero: bool,
}

static CACHE_HITS: AtomicU64 = AtomicU64::new(0);
static CACHE_MISSES: AtomicU64 = AtomicU64::new(0);

/// Chunk-cache hits and misses of every reader of this process since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

/// The readers' cache counts so far (see the module documentation).
pub fn cache_stats() -> CacheStats {
    CacheStats {
        hits: CACHE_HITS.load(Ordering::Relaxed),
        misses: CACHE_MISSES.load(Ordering::Relaxed),
    }
}

type Fetch = Shared<BoxFuture<'static, Result<Bytes>>>;

/// Random-access reader of one disk of one point. Cheap to clone (shares cache).
#[derive(Clone)]
pub struct DiskReader {
    inner: Arc<ReaderInner>,
}

struct ReaderInner {
    store: Store,
    point: String,
    index: DiskIndex,
    /// Patches of the point's disk, merged (applied over fetched chunks).
    patch: Option<Arc<Patch>>,
    opts: ReaderOptions,
    cache: Mutex<LruCache<u64, Bytes>>,
    inflight: Mutex<HashMap<u64, Fetch>>,
    next_sequential: AtomicU64,
}

impl std::fmt::Debug for DiskReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DiskReader({}, {} bytes)",
            self.inner.point,
            self.inner.index.disk_size()
        )
    }
}

impl Store {
    /// Open disk `disk` of `point` for reading.
    pub async fn open_disk(
        &self,
        point: &PointMeta,
        disk: &str,
        opts: ReaderOptions,
    ) -> Result<DiskReader> {
        // Index with the chunks the chain refers to whole; the rest of the chain merged.
        let (index, patch) = self.load_disk(point, disk).await?;
        let mut r = DiskReader::new(
            self.clone(),
            format!("{}:{}", point.full_id(), disk),
            index,
            opts,
        );
        if !patch.is_empty() {
            if let Some(inner) = Arc::get_mut(&mut r.inner) {
                inner.patch = Some(Arc::new(patch));
            }
        }
        Ok(r)
    }
}

impl DiskReader {
    /// A reader over an already loaded index.
    pub fn new(store: Store, name: String, index: DiskIndex, opts: ReaderOptions) -> Self {
        let cap = NonZeroUsize::new(opts.cache_chunks(index.chunk_size() as u64))
            .unwrap_or(NonZeroUsize::MIN);
        DiskReader {
            inner: Arc::new(ReaderInner {
                store,
                point: name,
                index,
                patch: None,
                opts,
                cache: Mutex::new(LruCache::new(cap)),
                inflight: Mutex::new(HashMap::new()),
                next_sequential: AtomicU64::new(u64::MAX),
            }),
        }
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.index.disk_size()
    }

    /// The index.
    pub fn index(&self) -> &DiskIndex {
        &self.inner.index
    }

    /// Data/hole extents covering `[offset, offset+len)` (clipped to the disk), adjacent
    /// extents of the same kind merged.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let idx = &self.inner.index;
        let end = offset.saturating_add(len).min(idx.disk_size());
        let mut out: Vec<Extent> = Vec::new();
        let cs = idx.chunk_size() as u64;
        let mut pos = offset;
        while pos < end {
            let ci = pos / cs;
            let cend = ((ci + 1) * cs).min(end);
            let zero = idx.get(ci).is_none_or(|e| e.is_zero()) && !self.patched(ci, true);
            match out.last_mut() {
                Some(last) if last.zero == zero && last.offset + last.length == pos => {
                    last.length += cend - pos
                }
                _ => out.push(Extent {
                    offset: pos,
                    length: cend - pos,
                    zero,
                }),
            }
            pos = cend;
        }
        out
    }

    /// True if `[offset, offset+len)` is entirely holes.
    pub fn is_zero(&self, offset: u64, len: u64) -> bool {
        self.extents(offset, len).iter().all(|e| e.zero)
    }

    /// Read `len` bytes at `offset` (clipped at the end of the disk).
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let idx = &self.inner.index;
        let end = offset.saturating_add(len as u64).min(idx.disk_size());
        if offset >= end {
            return Ok(Bytes::new());
        }
        let cs = idx.chunk_size() as u64;
        let first = offset / cs;
        let last = (end - 1) / cs;
        // Sequential detection: the read starts where the previous one ended (chunk-wise).
        let prev = self.inner.next_sequential.swap(last + 1, Ordering::Relaxed);
        if self.inner.opts.readahead_bytes > 0 && (prev == first || prev == first + 1 || first == 0)
        {
            self.readahead(last + 1);
        }
        if first == last {
            let c = self.chunk(first).await?;
            let s = (offset - first * cs) as usize;
            return Ok(c.slice(s..s + (end - offset) as usize));
        }
        // Fetch all chunks of the range concurrently, then assemble.
        let futs: Vec<_> = (first..=last).map(|ci| self.chunk(ci)).collect();
        let chunks = futures::future::try_join_all(futs).await?;
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (k, c) in chunks.iter().enumerate() {
            let ci = first + k as u64;
            let cstart = ci * cs;
            let s = offset.saturating_sub(cstart) as usize;
            let e = ((end - cstart) as usize).min(c.len());
            out.extend_from_slice(&c[s..e]);
        }
        Ok(out.freeze())
    }

    /// Read into `buf` at `offset`; returns the bytes read (short only at the end of the disk).
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let b = self.read_at(offset, buf.len()).await?;
        buf[..b.len()].copy_from_slice(&b);
        Ok(b.len())
    }

    fn readahead(&self, from: u64) {
        let n = self.inner.index.len();
        let depth = self
            .inner
            .opts
            .readahead_chunks(self.inner.index.chunk_size() as u64);
        for ci in from..(from + depth).min(n) {
            let id = self.inner.index.get(ci).unwrap_or(ChunkId::ZERO);
            if id.is_zero() || self.cached(ci).is_some() {
                continue;
            }
            let f = self.fetch(ci, id);
            tokio::spawn(async move {
                // Errors surface when the chunk is actually read.
                let _ = f.await;
            });
        }
    }

    fn cached(&self, ci: u64) -> Option<Bytes> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ci)
            .cloned()
    }

    /// One verified chunk (zeros for holes).
    pub async fn chunk(&self, ci: u64) -> Result<Bytes> {
        let idx = &self.inner.index;
        let id = idx
            .get(ci)
            .ok_or_else(|| Error::InvalidArgument(format!("chunk {ci} out of range")))?;
        if id.is_zero() && !self.patched(ci, false) {
            return Ok(zeros(idx.chunk_len(ci)));
        }
        if let Some(b) = self.cached(ci) {
            CACHE_HITS.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        CACHE_MISSES.fetch_add(1, Ordering::Relaxed);
        self.fetch(ci, id).await
    }

    /// True if the point's patches change chunk `ci` (`data_only`: with data, not zeroes).
    fn patched(&self, ci: u64, data_only: bool) -> bool {
        let Some(p) = &self.inner.patch else {
            return false;
        };
        let cs = self.inner.index.chunk_size() as u64;
        let start = ci * cs;
        p.touches(
            start,
            start + self.inner.index.chunk_len(ci) as u64,
            data_only,
        )
    }

    fn fetch(&self, ci: u64, id: ChunkId) -> Fetch {
        let mut inflight = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(f) = inflight.get(&ci) {
            return f.clone();
        }
        let me = self.clone();
        let len = self.inner.index.chunk_len(ci);
        let fut: BoxFuture<'static, Result<Bytes>> = async move {
            let mut r = me.inner.store.get_chunk(&id, Some(len)).await;
            if let (Ok(b), Some(p)) = (&r, &me.inner.patch) {
                let start = ci * me.inner.index.chunk_size() as u64;
                if p.touches(start, start + len as u64, false) {
                    let mut buf = b.to_vec();
                    r = p.apply(start, &mut buf).map(|()| Bytes::from(buf));
                }
            }
            if let Ok(b) = &r {
                me.inner
                    .cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .put(ci, b.clone());
            }
            me.inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ci);
            r
        }
        .boxed();
        let shared = fut.shared();
        inflight.insert(ci, shared.clone());
        shared
    }
}

fn zeros(n: usize) -> Bytes {
    static ZEROS: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let z = ZEROS.get_or_init(|| Bytes::from(vec![0u8; 4 << 20]));
    if n <= z.len() {
        z.slice(..n)
    } else {
        Bytes::from(vec![0u8; n])
    }
}

#[cfg(test)]
mod tests {
    use super::ReaderOptions;

    #[test]
    fn cache_and_read_ahead_follow_the_chunk_size() {
        let o = ReaderOptions::default();
        assert_eq!(o.cache_chunks(64 << 10), 256);
        assert_eq!(o.cache_chunks(256 << 10), 64);
        assert_eq!(o.readahead_chunks(256 << 10), 2);
        // Rounded up to whole chunks; a cache always holds at least one chunk.
        assert_eq!(o.readahead_chunks(1 << 20), 1);
        assert_eq!(o.cache_chunks(64 << 20), 1);
        let none = ReaderOptions {
            cache_bytes: 0,
            readahead_bytes: 0,
        };
        assert_eq!(none.cache_chunks(4096), 1);
        assert_eq!(none.readahead_chunks(4096), 0);
    }
}
