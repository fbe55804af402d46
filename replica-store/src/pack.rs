//! Packs: the storage layout of format-5 stores, where chunks are appended to large pack
//! objects instead of being one object each.
//!
//! Change granularity and storage granularity are separate: chunks (64 KiB by default) stay
//! the unit of dedup, of disk indexes, of patches and of resync comparison; a **pack** is the
//! unit of storage (one PUT per ~16 MiB instead of one per chunk).
//!
//! Objects of one pack `<pid>` (128 random bits, 32 hex digits):
//! - `packs/<pid[0..2]>/<pid>`: the chunk objects, each encoded exactly as a chunk object of
//!   the `chunks` layout (bare or enveloped, verified on every read), concatenated;
//! - `packidx/<pid[0..2]>/<pid>`: the pack's index (an `SBPI` envelope: chunk id, offset,
//!   length per chunk), written only after the pack object is durable. **A pack exists for
//!   readers and for dedup only once its index exists**; a pack object without an index is
//!   garbage (an interrupted upload) that GC deletes after the grace period.
//! - `packfossils/<pid[0..2]>/<pid>`: the index of a pack GC has set aside (see `gc.rs`); the
//!   pack object itself stays in place, so it is still readable.
//!
//! Invariants:
//! - A session ([`Packer`]) references a chunk only after the pack holding it and that pack's
//!   index are durable ([`Packer::flush`] runs before any disk index is written).
//! - Each store handle keeps the pack indexes in memory ([`PackCache`]); a session refreshes
//!   it when it starts (list `packidx/`, fetch new indexes, forget packs whose index is gone,
//!   then forget packs that a GC collection in `gc/` names): a session never deduplicates
//!   against a pack that was fossilized before it started. See `gc.rs` for why that is the
//!   condition GC's safety needs.
//! - Several packs may hold the same chunk (two sessions uploading it at once, or a repack);
//!   any copy is good, since every chunk is verified by its id on read.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::store::Store;

/// Magic of pack index objects.
pub const MAGIC_PACK_INDEX: [u8; 4] = *b"SBPI";
/// Default target size of a pack object.
pub const DEFAULT_PACK_SIZE: u32 = 16 << 20;
/// Smallest and largest pack size a store may have.
pub const PACK_SIZES: std::ops::RangeInclusive<u32> = (1 << 20)..=(256 << 20);
/// Default number of pack uploads one session keeps in flight.
pub const DEFAULT_PACK_UPLOADS: usize = 6;
/// Largest plaintext of a pack index (a 256 MiB pack of 4 KiB chunks: 65,536 entries).
const MAX_PACK_INDEX_BYTES: u64 = 8 << 20;
const INDEX_HEADER: &[u8; 8] = b"SBPIDATA";
const INDEX_VERSION: u32 = 1;
const ENTRY_LEN: usize = 32 + 8 + 4;

/// How a store keeps its chunks (`layout` in `store.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One object per chunk (`chunks/<fan-out>/<id>`): formats 2 to 4, and the default of
    /// local stores, where a file per chunk is fastest.
    #[default]
    Chunks,
    /// Chunks appended to pack objects of ~`pack_size` bytes (format 5; the default on S3).
    Packs,
}

/// Key of a pack object.
pub fn pack_key(pid: &str) -> String {
    format!("packs/{}/{pid}", &pid[..2])
}

/// Key of a pack's index.
pub fn pack_index_key(pid: &str) -> String {
    format!("packidx/{}/{pid}", &pid[..2])
}

/// Key of a pack's index while GC holds the pack as a fossil.
pub fn pack_fossil_key(pid: &str) -> String {
    format!("packfossils/{}/{pid}", &pid[..2])
}

/// The pack id at the end of a `packs/`, `packidx/` or `packfossils/` key, if it is one.
pub fn pack_id_of(key: &str) -> Option<&str> {
    let pid = key.rsplit('/').next()?;
    (pid.len() == 32
        && pid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(pid)
}

fn new_pack_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// One chunk inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Offset of its encoded object in the pack.
    pub offset: u64,
    /// Length of its encoded object.
    pub len: u32,
}

/// Plaintext of a pack index: header, entry count, entries, pack length.
pub(crate) fn encode_index(entries: &[PackEntry], pack_len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(INDEX_HEADER);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&pack_len.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    out
}

/// Parse a pack index; every entry must lie inside the pack and no entry may be a hole.
pub(crate) fn decode_index(raw: &[u8], key: &str) -> Result<(u64, Vec<PackEntry>)> {
    let bad = |why: &str| Error::corrupt_object(key, why.to_string());
    if raw.len() < 28 || &raw[..8] != INDEX_HEADER {
        return Err(bad("not a pack index"));
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    if version != INDEX_VERSION {
        return Err(bad("unknown pack index version (upgrade standby)"));
    }
    let pack_len = word(12);
    let n = word(20);
    let body = &raw[28..];
    if n.checked_mul(ENTRY_LEN as u64) != Some(body.len() as u64) {
        return Err(bad("entry count does not match the index length"));
    }
    let mut entries = Vec::with_capacity(n as usize);
    for e in body.chunks_exact(ENTRY_LEN) {
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[..32]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&e[32..40]);
        let offset = u64::from_le_bytes(off);
        let len = u32::from_le_bytes([e[40], e[41], e[42], e[43]]);
        let entry = PackEntry {
            id: ChunkId(id),
            offset,
            len,
        };
        if entry.id.is_zero() || offset.saturating_add(u64::from(len)) > pack_len {
            return Err(bad(
                "an entry lies outside the pack or names the zero chunk",
            ));
        }
        entries.push(entry);
    }
    Ok((pack_len, entries))
}

/// Where a chunk is: pack id, offset, length.
#[derive(Debug, Clone)]
pub(crate) struct Loc {
    pub(crate) pack: Arc<str>,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// In-memory view of the pack indexes of a store handle (shared by its clones).
#[derive(Debug, Default)]
pub(crate) struct PackCache {
    /// Packs whose index is under `packidx/` (as of the last refresh), minus those a GC
    /// collection names: usable for dedup and reads.
    live: HashMap<Arc<str>, Arc<Vec<PackEntry>>>,
    /// Packs held as fossils (or named by a collection): reads only, never dedup.
    fossil: HashMap<Arc<str>, Arc<Vec<PackEntry>>>,
    /// Chunk → location, over `live`.
    map: HashMap<ChunkId, Loc>,
    /// Collections already applied.
    collections: HashSet<String>,
    /// Packs named by some collection, with the creation time (unix ms) of the oldest one:
    /// GC deletes a fossil pack only once that collection is older than `max_session_secs`.
    collected: HashMap<String, u64>,
    loaded: bool,
}

impl PackCache {
    fn add_live(&mut self, pid: Arc<str>, entries: Arc<Vec<PackEntry>>) {
        if self.collected.contains_key(&*pid) {
            self.fossil.insert(pid, entries);
            return;
        }
        for e in entries.iter() {
            self.map.entry(e.id).or_insert(Loc {
                pack: pid.clone(),
                offset: e.offset,
                len: e.len,
            });
        }
        self.live.insert(pid, entries);
    }

    /// Drop packs from `live` (they become read-only fossils if `keep_for_reads`), then
    /// rebuild the chunk map (another live pack may hold the same chunks).
    fn retire(&mut self, pids: &[Arc<str>], keep_for_reads: bool) {
        if pids.is_empty() {
            return;
        }
        for p in pids {
            if let Some(e) = self.live.remove(p) {
                if keep_for_reads {
                    self.fossil.insert(p.clone(), e);
                }
            }
        }
        self.map.clear();
        let live: Vec<_> = self.live.drain().collect();
        for (p, e) in live {
            self.add_live(p, e);
        }
    }
}

/// Totals of a store's packs (for `store info`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackTotals {
    /// Live packs.
    pub packs: u64,
    /// Chunk entries in them.
    pub chunks: u64,
}

impl Store {
    fn packs(&self) -> std::sync::MutexGuard<'_, PackCache> {
        self.inner.packs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetch indexes under `prefix` that the cache lacks; returns (listed ids, fetched).
    async fn fetch_indexes(
        &self,
        prefix: &str,
        known: &HashSet<Arc<str>>,
    ) -> Result<(HashSet<Arc<str>>, Vec<(Arc<str>, Arc<Vec<PackEntry>>)>)> {
        let listed: HashSet<Arc<str>> = self
            .backend()
            .list(prefix)
            .await?
            .iter()
            .filter_map(|o| pack_id_of(&o.key).map(Arc::from))
            .collect();
        let todo: Vec<Arc<str>> = listed
            .iter()
            .filter(|p| !known.contains(*p))
            .cloned()
            .collect();
        let fossils = prefix.starts_with("packfossils/");
        let mut fetched = Vec::new();
        let mut s = stream::iter(todo)
            .map(|pid| async move {
                let key = if fossils {
                    pack_fossil_key(&pid)
                } else {
                    pack_index_key(&pid)
                };
                match self
                    .get_object(MAGIC_PACK_INDEX, &key, MAX_PACK_INDEX_BYTES)
                    .await
                {
                    Ok(raw) => Ok(Some((pid, Arc::new(decode_index(&raw, &key)?.1)))),
                    // Moved by a GC since the listing: the next refresh sees where it went.
                    Err(e) if e.is_not_found() => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(32);
        while let Some(r) = s.next().await {
            fetched.extend(r?);
        }
        Ok((listed, fetched))
    }

    /// Bring the pack cache up to date: new indexes fetched, packs whose index left
    /// `packidx/` forgotten for dedup, packs named by GC collections forgotten for dedup.
    /// With `fossils`, fossil indexes are loaded too (for reads of set-aside chunks).
    pub(crate) async fn refresh_packs(&self, fossils: bool) -> Result<()> {
        let known: HashSet<Arc<str>> = self.packs().live.keys().cloned().collect();
        let (listed, fetched) = self.fetch_indexes("packidx/", &known).await?;
        {
            let mut c = self.packs();
            let gone: Vec<Arc<str>> = c
                .live
                .keys()
                .filter(|p| !listed.contains(*p))
                .cloned()
                .collect();
            c.retire(&gone, true);
            for (pid, e) in fetched {
                c.add_live(pid, e);
            }
            c.loaded = true;
        }
        // Collections written by GC runs: their packs are set aside (see gc.rs).
        let cols = self.backend().list("gc/").await?;
        for col in cols {
            if self.packs().collections.contains(&col.key) {
                continue;
            }
            let (packs, at) = match self.read_collection(&col.key).await {
                Ok(c) => (c.packs, c.created_unix_ms),
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            let mut c = self.packs();
            let pids: Vec<Arc<str>> = packs.iter().map(|p| Arc::from(p.as_str())).collect();
            for p in packs {
                let t = c.collected.entry(p).or_insert(at);
                *t = (*t).min(at);
            }
            c.collections.insert(col.key.clone());
            c.retire(&pids, true);
        }
        if fossils {
            let known: HashSet<Arc<str>> = self.packs().fossil.keys().cloned().collect();
            let (_, fetched) = self.fetch_indexes("packfossils/", &known).await?;
            let mut c = self.packs();
            for (pid, e) in fetched {
                c.fossil.insert(pid, e);
            }
        }
        Ok(())
    }

    /// A live pack holding `id` (dedup), if the cache knows one.
    pub(crate) fn pack_has(&self, id: &ChunkId) -> bool {
        self.packs().map.contains_key(id)
    }

    fn locate_cached(&self, id: &ChunkId) -> Option<Loc> {
        let c = self.packs();
        if let Some(l) = c.map.get(id) {
            return Some(l.clone());
        }
        c.fossil.iter().find_map(|(p, es)| {
            es.iter().find(|e| e.id == *id).map(|e| Loc {
                pack: p.clone(),
                offset: e.offset,
                len: e.len,
            })
        })
    }

    /// Where chunk `id` is stored; refreshes the cache (with fossils) once on a miss.
    pub(crate) async fn locate_chunk(&self, id: &ChunkId, fresh: bool) -> Result<Option<Loc>> {
        if !self.packs().loaded {
            self.refresh_packs(false).await?;
        }
        if !fresh {
            if let Some(l) = self.locate_cached(id) {
                return Ok(Some(l));
            }
        }
        self.refresh_packs(true).await?;
        Ok(self.locate_cached(id))
    }

    /// Chunks of set-aside packs that no live pack holds → (pack, creation time of the
    /// oldest GC collection naming the pack, `None` if none does), after a refresh with
    /// fossils.
    pub(crate) async fn fossil_chunks(&self) -> Result<HashMap<ChunkId, (Arc<str>, Option<u64>)>> {
        self.refresh_packs(true).await?;
        let c = self.packs();
        let mut out = HashMap::new();
        for (p, es) in &c.fossil {
            let at = c.collected.get(&**p).copied();
            for e in es.iter().filter(|e| !c.map.contains_key(&e.id)) {
                out.entry(e.id).or_insert((p.clone(), at));
            }
        }
        Ok(out)
    }

    /// Moves a set-aside pack's index back to `packidx/` (as GC does when a point references
    /// it): true if the pack is live afterwards (moved, or someone else moved it).
    pub(crate) async fn resurrect_pack(&self, pid: &str) -> Result<bool> {
        let b = self.backend();
        match b.rename(&pack_fossil_key(pid), &pack_index_key(pid)).await {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(b.head(&pack_index_key(pid)).await?.is_some()),
            Err(e) => Err(e),
        }
    }

    /// Read one chunk object out of its pack (`None` if no pack holds it).
    pub(crate) async fn get_packed(&self, id: &ChunkId, retry: bool) -> Result<Option<Bytes>> {
        let Some(loc) = self.locate_chunk(id, retry).await? else {
            return Ok(None);
        };
        match self
            .backend()
            .get_range(&pack_key(&loc.pack), loc.offset, u64::from(loc.len))
            .await
        {
            Ok(b) if b.len() == loc.len as usize => Ok(Some(b)),
            // Truncated pack: a corrupt chunk (its verification names it).
            Ok(b) => Ok(Some(b)),
            Err(e) if e.is_not_found() && !retry => Box::pin(self.get_packed(id, true)).await,
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Ids of the chunks in live packs, with their pack (verify, GC). Refreshes first.
    pub(crate) async fn pack_contents(
        &self,
    ) -> Result<(
        HashMap<Arc<str>, Arc<Vec<PackEntry>>>,
        HashMap<Arc<str>, Arc<Vec<PackEntry>>>,
    )> {
        self.refresh_packs(true).await?;
        let c = self.packs();
        Ok((c.live.clone(), c.fossil.clone()))
    }

    /// Live packs and their chunk entries, as of a fresh listing.
    pub async fn pack_totals(&self) -> Result<PackTotals> {
        let (live, _) = self.pack_contents().await?;
        Ok(PackTotals {
            packs: live.len() as u64,
            chunks: live.values().map(|e| e.len() as u64).sum(),
        })
    }

    /// Forget everything cached about packs (after GC moved indexes).
    pub(crate) fn forget_packs(&self) {
        *self.packs() = PackCache::default();
    }
}

/// A pack being filled.
#[derive(Debug, Default)]
struct OpenPack {
    data: BytesMut,
    entries: Vec<PackEntry>,
}

/// The pack writer of one upload session: appends encoded chunks to an open pack and
/// uploads full packs in the background, at most `uploads` at a time (a caller appending
/// while all are busy waits: memory stays bounded by `(uploads + 1) × pack_size`).
#[derive(Debug)]
pub(crate) struct Packer {
    store: Store,
    open: Mutex<OpenPack>,
    uploads: Arc<Semaphore>,
    pending: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// First failed upload of the session (reported by the next append or flush).
    failed: Arc<Mutex<Option<Error>>>,
    refreshed: tokio::sync::OnceCell<()>,
    pub(crate) puts: Arc<AtomicU64>,
    pub(crate) put_bytes: Arc<AtomicU64>,
}

impl Packer {
    pub(crate) fn new(store: &Store) -> Self {
        Packer {
            store: store.clone(),
            open: Mutex::default(),
            uploads: Arc::new(Semaphore::new(store.pack_uploads())),
            pending: Mutex::default(),
            failed: Arc::default(),
            refreshed: tokio::sync::OnceCell::new(),
            puts: Arc::default(),
            put_bytes: Arc::default(),
        }
    }

    /// Refresh the store's pack cache once per session, before its first dedup decision.
    pub(crate) async fn start(&self) -> Result<()> {
        self.refreshed
            .get_or_try_init(|| async {
                let t = Instant::now();
                self.store.refresh_packs(false).await?;
                tracing::debug!(elapsed = ?t.elapsed(), "pack indexes refreshed for a session");
                Ok::<(), Error>(())
            })
            .await
            .map(|_| ())
    }

    /// Append one encoded chunk object; uploads the pack when it is full.
    pub(crate) async fn append(&self, id: ChunkId, obj: &[u8]) -> Result<()> {
        self.failure()?;
        let full = {
            let mut p = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let offset = p.data.len() as u64;
            p.data.extend_from_slice(obj);
            p.entries.push(PackEntry {
                id,
                offset,
                len: obj.len() as u32,
            });
            (p.data.len() >= self.store.settings().pack_size as usize)
                .then(|| std::mem::take(&mut *p))
        };
        match full {
            Some(pack) => self.upload(pack).await,
            None => Ok(()),
        }
    }

    async fn upload(&self, pack: OpenPack) -> Result<()> {
        if pack.entries.is_empty() {
            return Ok(());
        }
        let permit = self
            .uploads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Config("pack uploader closed".into()))?;
        let store = self.store.clone();
        let (puts, put_bytes) = (self.puts.clone(), self.put_bytes.clone());
        let failed = self.failed.clone();
        let task = tokio::spawn(async move {
            let _permit = permit;
            let r = async {
                let pid = new_pack_id();
                let data = pack.data.freeze();
                let n = data.len() as u64;
                // The pack first, then its index: an index never names a pack that is not
                // durable.
                store.backend().put(&pack_key(&pid), data).await?;
                let key = pack_index_key(&pid);
                let idx = encode_index(&pack.entries, n);
                let idx_len = store.put_object_len(MAGIC_PACK_INDEX, &key, &idx).await?;
                puts.fetch_add(2, Ordering::Relaxed);
                put_bytes.fetch_add(n + idx_len, Ordering::Relaxed);
                store
                    .packs()
                    .add_live(Arc::from(pid.as_str()), Arc::new(pack.entries));
                Ok::<(), Error>(())
            }
            .await;
            if let Err(e) = r {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
            }
        });
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|h| !h.is_finished());
        pending.push(task);
        Ok(())
    }

    fn failure(&self) -> Result<()> {
        match self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Upload the open pack and wait for every upload of the session: afterwards every
    /// chunk appended so far is durable and listed in a pack index.
    pub(crate) async fn flush(&self) -> Result<()> {
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(|p| p.into_inner()));
        self.upload(open).await?;
        let handles = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            h.await
                .map_err(|e| Error::Config(format!("pack upload task failed: {e}")))?;
        }
        self.failure()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_roundtrip_and_bounds() {
        let e = vec![
            PackEntry {
                id: ChunkId([1; 32]),
                offset: 0,
                len: 10,
            },
            PackEntry {
                id: ChunkId([2; 32]),
                offset: 10,
                len: 5,
            },
        ];
        let raw = encode_index(&e, 15);
        assert_eq!(decode_index(&raw, "k").unwrap(), (15, e.clone()));
        assert!(decode_index(&encode_index(&e, 14), "k").is_err());
        assert!(decode_index(&raw[..raw.len() - 1], "k").is_err());
        assert_eq!(
            pack_id_of("packs/ab/ab0123456789abcdef0123456789abcd"),
            Some("ab0123456789abcdef0123456789abcd")
        );
        assert_eq!(pack_id_of("packs/ab/xyz"), None);
    }
}
