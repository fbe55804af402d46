//! Recovery points: metadata, building (full or from a parent) and atomic publication.
//!
//! A point belongs to a VM and covers all of its disks. Its objects are:
//! - `indexes/<vm>/<point-id>/<disk>.idx`: one [`DiskIndex`] per disk (written first),
//! - `points/<vm>/<point-id>.point`: the [`PointMeta`] (written last: the atomic commit).
//!
//! Point ids are `YYYYMMDDTHHMMSS.mmmZ-<16 hex random>`: unique per writer, so no two writers
//! ever write the same key and no conditional put is needed.
//!
//! A point object is format version 1, or 2 when a disk's patch chain holds chunk references
//! ([`PatchRef::chunk_refs`], see [`crate::patch`]): builds that cannot see those references
//! refuse such a point rather than collect its chunks. Chains are resolved into "index with
//! overrides + residual patch" by one function, [`Store::resolve_chain`] (readers through
//! [`Store::load_disk`], fold and consolidation directly).
//!
//! Past 700 lines: the chunk writer, the builder and chain loading share the session's
//! private state (known and staged chunks, adopted indexes), which a split would have to expose.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::Staged;
use crate::chunk::{ChunkId, MAGIC_INDEX, MAGIC_POINT};
use crate::error::{Error, Result};
use crate::manifest::DiskIndex;
use crate::pack::{Layout, Packer};
use crate::patch::Patch;
use crate::store::{now_unix_ms, PutKind, PutOutcome, Store};
use futures::{StreamExt, TryStreamExt};

mod consolidate;
pub use consolidate::{Consolidated, RebaseSkipped};

/// Patch objects [`Store::resolve_chain`] fetches at once.
pub const PATCH_FETCHES: usize = 8;

/// Whole chunks a cut hashes and encodes in one blocking task and stages together
/// ([`PointBuilder::add_patch`]).
pub const CUT_BATCH_CHUNKS: usize = 16;
/// Such batches in flight at once.
pub const CUT_BATCHES: usize = 4;

/// Newest version of the point metadata format: 2 when a disk's patches refer to chunks
/// ([`PatchRef::chunk_refs`]), so a build that cannot see those references (and whose GC would
/// collect the chunks) refuses the point instead of misreading it; 1 otherwise, as before.
pub const POINT_FORMAT_VERSION: u32 = 2;
/// Point format of points without chunk references (written as before, read by older builds).
pub const POINT_FORMAT_PLAIN: u32 = 1;

/// How consistent the disks of a point are with each other and with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// As after a power loss, all disks at the same instant.
    #[default]
    Crash,
    /// Application-consistent (guest quiesced).
    App,
}

/// One disk of a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// Disk name (unique within the VM).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size of the index.
    pub chunk_size: u32,
    /// Number of chunks.
    pub chunks: u64,
    /// Number of non-hole chunks.
    pub data_chunks: u64,
    /// Log sequence number of the source's change log this disk image corresponds to.
    pub source_lsn: u64,
    /// Key of the index object.
    pub index_key: String,
    /// Hex SHA-256 over the index's chunk ids.
    pub index_checksum: String,
    /// Patches applied over the index, oldest first (see [`crate::patch`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<PatchRef>,
}

/// A patch object a disk of a point applies over its index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRef {
    /// Chunk id (hex) of the patch object.
    pub id: String,
    /// Length of the patch's plaintext.
    pub bytes: u64,
    /// Data bytes the patch carries.
    pub data_bytes: u64,
    /// Chunk extents the patch holds (see [`crate::patch`]): non-zero only for the data-free
    /// patch objects a cut writes for the chunks it stored whole. GC and verify read these
    /// objects to find the chunks they reference. Absent (0) in points of older builds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_refs: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl PatchRef {
    /// The patch object's chunk id.
    pub fn chunk_id(&self) -> Result<ChunkId> {
        ChunkId::from_hex(&self.id)
            .ok_or_else(|| Error::corrupt_object(self.id.clone(), "patch id is not a chunk id"))
    }
}

/// Metadata of a recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMeta {
    /// Point format version.
    pub format_version: u32,
    /// VM the point belongs to.
    pub vm: String,
    /// Point id (sortable by time).
    pub id: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Consistency level.
    pub consistency: Consistency,
    /// Point this one was derived from.
    #[serde(default)]
    pub parent: Option<String>,
    /// Disks, sorted by name.
    pub disks: Vec<DiskEntry>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What the session that published this point wrote to the store (absent in points of
    /// older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadStats>,
}

/// Writes one publishing session made: objects and their bytes (chunk or pack objects, pack
/// indexes, disk indexes and the point object; for a delta, only what the delta added).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadStats {
    /// Objects written (one PUT each; an object above the multipart threshold takes more).
    pub puts: u64,
    /// Bytes of those objects.
    pub bytes: u64,
    /// Chunks (and patch objects) newly stored.
    pub chunks: u64,
}

impl PointMeta {
    /// `vm/id`.
    pub fn full_id(&self) -> String {
        format!("{}/{}", self.vm, self.id)
    }

    /// The disk named `name`.
    pub fn disk(&self, name: &str) -> Result<&DiskEntry> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| Error::DiskNotFound {
                point: self.full_id(),
                disk: name.into(),
            })
    }

    /// Logical size of all disks.
    pub fn total_size(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }
}

/// `now`, or one more than the last value returned in this process: points published by one
/// process get distinct, increasing creation times, so "latest" is never a coin toss between
/// two points of the same millisecond.
fn monotonic_ms(now: u64) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// Key of a point object.
pub fn point_key(vm: &str, id: &str) -> String {
    format!("points/{vm}/{id}.point")
}

/// Key of an index object.
pub fn index_key(vm: &str, id: &str, disk: &str) -> String {
    format!("indexes/{vm}/{id}/{disk}.idx")
}

/// Validate a name that comes from the user or from the store (VM, disk, point id, blob
/// namespace): 1..=128 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
///
/// This is the one rule for names: such a name becomes a path component (overlay
/// directories, image files), an object key segment, an export name and an argument of the
/// failover command, so it can hold no `/`, can never be `.` or `..`, and can never be
/// taken for an option.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{kind} name {name:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not start with '.' or '-'"
        )))
    }
}

impl PointMeta {
    /// Checks metadata read from the store at `key` before anything uses it: every name it
    /// carries (VM, id, parent, disks) passes [`validate_name`], disk names are unique, each
    /// index key is the one [`index_key`] gives for this VM and disk (so a point can only
    /// name objects of its own VM), and the id's time is the creation time (so an edited
    /// creation time cannot reorder points).
    pub fn check(&self, key: &str) -> Result<()> {
        let bad = |why: String| Err(Error::corrupt_object(key, why));
        for (kind, name) in [("VM", &self.vm), ("point", &self.id)] {
            if let Err(e) = validate_name(kind, name) {
                return bad(e.to_string());
            }
        }
        if let Some(p) = &self.parent {
            if let Err(e) = validate_name("parent point", p) {
                return bad(e.to_string());
            }
        }
        if !self.id.starts_with(&format_utc_ms(self.created_unix_ms)) {
            return bad(format!(
                "point id {} does not carry its creation time {}",
                self.id,
                format_utc_ms(self.created_unix_ms)
            ));
        }
        let mut names = HashSet::new();
        for d in &self.disks {
            if let Err(e) = validate_name("disk", &d.name) {
                return bad(e.to_string());
            }
            if !names.insert(d.name.as_str()) {
                return bad(format!("disk {} is listed twice", d.name));
            }
            let own = d
                .index_key
                .strip_prefix(&format!("indexes/{}/", self.vm))
                .and_then(|r| r.strip_suffix(&format!("/{}.idx", d.name)))
                .is_some_and(|id| validate_name("point", id).is_ok());
            if !own {
                return bad(format!(
                    "disk {} names index {:?}, not one of VM {}",
                    d.name, d.index_key, self.vm
                ));
            }
            if d.chunk_size == 0 {
                return bad(format!("disk {} has chunk size 0", d.name));
            }
        }
        Ok(())
    }
}

/// A new unique point id for the current time.
pub fn new_point_id(unix_ms: u64) -> String {
    format!("{}-{:016x}", format_utc_ms(unix_ms), rand::random::<u64>())
}

/// `YYYYMMDDTHHMMSS.mmmZ`.
pub fn format_utc_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86400) as i64;
    let sod = secs % 86400;
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        unix_ms % 1000
    )
}

#[derive(Debug)]
struct DiskState {
    index: DiskIndex,
    source_lsn: u64,
    patches: Vec<PatchRef>,
    /// The parent's index object (key, checksum) while the index is unchanged: the point
    /// refers to it instead of storing the same index again (deltas only add patches).
    inherited: Option<(String, String)>,
    /// The index came whole from elsewhere ([`PointBuilder::set_index`]): its chunks were
    /// stored by other sessions, checked again by [`PointBuilder::publish`].
    adopted: bool,
}

/// What [`ChunkWriter::adopt`] found for a chunk stored by another session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adopted {
    /// Live: nothing to do.
    Live,
    /// Set aside by GC and made live again in place.
    Restored,
    /// Set aside by GC and stored again by this session from its object.
    Copied,
    /// No longer in the store.
    Gone,
}

/// Uploads chunks for one session; cheap to clone and usable from many tasks at once.
/// Remembers which chunks it saw present, staged or inherited from the parent to skip HEADs.
/// New chunks are staged ([`crate::backend::Backend::put_staged`]) and committed together by
/// [`PointBuilder::publish`] before any index is written.
#[derive(Debug, Clone)]
pub struct ChunkWriter {
    store: Store,
    known: Arc<Mutex<HashSet<ChunkId>>>,
    staged: Arc<Mutex<Vec<Staged>>>,
    /// Packs layout: the session's pack writer.
    packer: Option<Arc<Packer>>,
    /// Chunk objects written (chunks layout) and chunks stored (both layouts).
    chunk_puts: Arc<std::sync::atomic::AtomicU64>,
    chunk_bytes: Arc<std::sync::atomic::AtomicU64>,
    chunks: Arc<std::sync::atomic::AtomicU64>,
}

impl ChunkWriter {
    /// Store one chunk's plaintext; returns its id and what was done.
    pub async fn put(&self, data: Bytes) -> Result<PutOutcome> {
        let codec = self.store.codec().clone();
        let d = data.clone();
        let id = tokio::task::spawn_blocking(move || codec.digest(&d))
            .await
            .map_err(|e| Error::Config(format!("hash task failed: {e}")))?;
        self.put_with_id(id, data).await
    }

    fn new(store: &Store) -> Self {
        ChunkWriter {
            store: store.clone(),
            known: Arc::default(),
            staged: Arc::default(),
            packer: (store.layout() == Layout::Packs).then(|| Arc::new(Packer::new(store))),
            chunk_puts: Arc::default(),
            chunk_bytes: Arc::default(),
            chunks: Arc::default(),
        }
    }

    fn count(&self, out: &PutOutcome, puts: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if out.kind == PutKind::Uploaded {
            self.chunks.fetch_add(1, Relaxed);
            self.chunk_puts.fetch_add(puts, Relaxed);
            self.chunk_bytes
                .fetch_add(if puts > 0 { out.uploaded_bytes } else { 0 }, Relaxed);
        }
    }

    /// What this session has written so far (packs count once uploaded).
    pub fn upload_stats(&self) -> UploadStats {
        use std::sync::atomic::Ordering::Relaxed;
        let (pp, pb) = self.packer.as_ref().map_or((0, 0), |p| {
            (p.puts.load(Relaxed), p.put_bytes.load(Relaxed))
        });
        UploadStats {
            puts: self.chunk_puts.load(Relaxed) + pp,
            bytes: self.chunk_bytes.load(Relaxed) + pb,
            chunks: self.chunks.load(Relaxed),
        }
    }

    /// Packs layout: store `items` (encoded chunk objects) in the session's packs, skipping
    /// chunks a live pack already holds.
    async fn pack_encoded(
        &self,
        packer: &Packer,
        items: Vec<(ChunkId, Bytes)>,
    ) -> Result<Vec<PutOutcome>> {
        packer.start().await?;
        let mut out = Vec::with_capacity(items.len());
        for (id, obj) in items {
            let fresh = self
                .known
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id);
            let o = if fresh && !self.store.pack_has(&id) {
                packer.append(id, &obj).await?;
                PutOutcome {
                    id,
                    uploaded_bytes: obj.len() as u64,
                    kind: PutKind::Uploaded,
                }
            } else {
                PutOutcome {
                    id,
                    uploaded_bytes: 0,
                    kind: PutKind::Deduplicated,
                }
            };
            self.count(&o, 0);
            out.push(o);
        }
        Ok(out)
    }

    /// Store a batch of chunks tagged with the caller's keys: one blocking task hashes them,
    /// skips holes (zero id) and chunks this session already knows, and encodes the rest;
    /// those are staged together ([`Self::stage_encoded`]: one blocking task locally, the
    /// session's packs on packs). Returns (key, length, outcome) per chunk, in order.
    pub async fn put_batch(&self, batch: Vec<(u64, Bytes)>) -> Result<Vec<(u64, u64, PutOutcome)>> {
        let codec = self.store.codec().clone();
        let me = self.clone();
        let (done, items) = tokio::task::spawn_blocking(move || {
            let mut done = Vec::with_capacity(batch.len());
            let mut items = Vec::new();
            for (key, data) in batch {
                let id = codec.digest(&data);
                let len = data.len() as u64;
                let kind = if id.is_zero() {
                    PutKind::Zero
                } else if me.knows(&id) {
                    PutKind::Deduplicated
                } else {
                    items.push((id, codec.encode_chunk_bytes(&id, &data)?));
                    PutKind::Uploaded
                };
                done.push((key, len, id, kind));
            }
            Ok::<_, Error>((done, items))
        })
        .await
        .map_err(|e| Error::Config(format!("chunk encode task failed: {e}")))??;
        let staged = if items.is_empty() {
            Vec::new()
        } else {
            self.stage_encoded(items).await?
        };
        let mut staged = staged.into_iter();
        let mut out = Vec::with_capacity(done.len());
        for (key, len, id, kind) in done {
            let o = match kind {
                PutKind::Uploaded => staged
                    .next()
                    .ok_or_else(|| Error::Config("staging returned too few outcomes".into()))?,
                kind => PutOutcome {
                    id,
                    uploaded_bytes: 0,
                    kind,
                },
            };
            out.push((key, len, o));
        }
        Ok(out)
    }

    /// Store a chunk whose id the caller computed with [`Store::digest`].
    pub async fn put_with_id(&self, id: ChunkId, data: Bytes) -> Result<PutOutcome> {
        if id.is_zero() {
            return Ok(PutOutcome {
                id,
                uploaded_bytes: 0,
                kind: PutKind::Zero,
            });
        }
        if self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
        {
            return Ok(PutOutcome {
                id,
                uploaded_bytes: 0,
                kind: PutKind::Deduplicated,
            });
        }
        if let Some(packer) = &self.packer {
            packer.start().await?;
            if self.store.pack_has(&id) {
                self.known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                return Ok(PutOutcome {
                    id,
                    uploaded_bytes: 0,
                    kind: PutKind::Deduplicated,
                });
            }
            let obj = self.store.encode_chunk(id, data).await?;
            let mut out = self.pack_encoded(packer, vec![(id, obj)]).await?;
            return out
                .pop()
                .ok_or_else(|| Error::Config("pack writer returned no outcome".into()));
        }
        let (out, staged) = self.store.stage_chunk_with_id(id, data).await?;
        self.count(&out, 1);
        if let Some(s) = staged {
            self.staged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s);
        }
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        Ok(out)
    }

    /// Makes chunk `id`, stored by another session, safe for this one to publish (see
    /// [`PointBuilder::adopt_indexes`]). `fossil_packs`: packs layout, the chunks of
    /// set-aside packs.
    async fn adopt(
        &self,
        id: ChunkId,
        fossil_packs: &HashMap<ChunkId, (Arc<str>, Option<u64>)>,
    ) -> Result<Adopted> {
        let store = &self.store;
        let max_ms = store.settings().max_session_secs.saturating_mul(1000);
        if self.packer.is_some() && store.pack_has(&id) {
            self.learn(id);
            return Ok(Adopted::Live);
        }
        let live = match &self.packer {
            Some(_) => match fossil_packs.get(&id) {
                None => false,
                // GC deletes a set-aside pack only once its oldest collection is older than
                // max_session_secs, and only after reading its fossil index: while younger
                // (with a tenth of margin for clocks), moving the index back wins every race.
                Some((pid, Some(at)))
                    if now_unix_ms().saturating_sub(*at) < max_ms - max_ms / 10 =>
                {
                    store.resurrect_pack(pid).await?
                }
                // Older (GC may be deleting it right now) or not recorded: copy the chunk.
                Some(_) => false,
            },
            // A rename wins every race against GC's delete of the fossil (atomic locally;
            // copy-then-delete on S3: once copied, the chunk object is ours).
            None => {
                let b = store.backend();
                let key = store.chunk_key(&id);
                if b.head(&key).await?.is_some() {
                    self.learn(id);
                    return Ok(Adopted::Live);
                }
                match b.rename(&store.fossil_key(&id), &key).await {
                    Ok(()) => true,
                    Err(e) if e.is_not_found() => b.head(&key).await?.is_some(),
                    Err(e) => return Err(e),
                }
            }
        };
        if live {
            self.learn(id);
            return Ok(Adopted::Restored);
        }
        let Some(obj) = store.chunk_object(&id).await? else {
            return Ok(Adopted::Gone);
        };
        self.stage_encoded(vec![(id, obj)]).await?;
        Ok(Adopted::Copied)
    }

    fn learn(&self, id: ChunkId) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
    }

    /// True if this session already stored, staged or inherited chunk `id`.
    pub(crate) fn knows(&self, id: &ChunkId) -> bool {
        id.is_zero()
            || self
                .known
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(id)
    }

    /// The store.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Stage already-encoded chunk objects (ids not zero); returns one outcome per item.
    pub(crate) async fn stage_encoded(
        &self,
        items: Vec<(ChunkId, Bytes)>,
    ) -> Result<Vec<PutOutcome>> {
        if let Some(packer) = &self.packer {
            return self.pack_encoded(packer, items).await;
        }
        let ids: Vec<(ChunkId, u64)> = items.iter().map(|(id, o)| (*id, o.len() as u64)).collect();
        let res = self
            .store
            .backend()
            .put_staged_batch(
                items
                    .into_iter()
                    .map(|(id, o)| (self.store.chunk_key(&id), o))
                    .collect(),
            )
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut staged = Vec::new();
        for ((id, n), r) in ids.into_iter().zip(res) {
            out.push(PutOutcome {
                id,
                uploaded_bytes: if r.is_some() { n } else { 0 },
                kind: if r.is_some() {
                    PutKind::Uploaded
                } else {
                    PutKind::Deduplicated
                },
            });
            staged.extend(r);
        }
        for o in &out {
            self.count(o, 1);
        }
        self.staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(staged);
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(out.iter().map(|o| o.id));
        Ok(out)
    }

    /// Make every chunk staged so far durable and visible (done by [`PointBuilder::publish`];
    /// call it earlier to bound the amount of staged data).
    pub async fn commit(&self) -> Result<()> {
        if let Some(packer) = &self.packer {
            let t = Instant::now();
            packer.flush().await?;
            tracing::debug!(elapsed = ?t.elapsed(), "pack uploads flushed");
            return Ok(());
        }
        let staged = std::mem::take(&mut *self.staged.lock().unwrap_or_else(|p| p.into_inner()));
        if staged.is_empty() {
            return Ok(());
        }
        let n = staged.len();
        let t = Instant::now();
        self.store.backend().commit_staged(staged).await?;
        tracing::debug!(chunks = n, elapsed = ?t.elapsed(), "committed staged chunks");
        Ok(())
    }
}

/// Builds a recovery point. Chunks are uploaded as they come; [`PointBuilder::publish`]
/// writes the indexes and then the point object.
#[derive(Debug)]
pub struct PointBuilder {
    store: Store,
    vm: String,
    parent: Option<String>,
    consistency: Consistency,
    labels: BTreeMap<String, String>,
    disks: BTreeMap<String, DiskState>,
    started: Instant,
    writer: ChunkWriter,
}

impl PointBuilder {
    /// A point for `vm` with no disks yet.
    pub fn new(store: &Store, vm: &str) -> Result<Self> {
        validate_name("VM", vm)?;
        let writer = ChunkWriter::new(store);
        Ok(PointBuilder {
            store: store.clone(),
            vm: vm.to_string(),
            parent: None,
            consistency: Consistency::Crash,
            labels: BTreeMap::new(),
            disks: BTreeMap::new(),
            started: Instant::now(),
            writer,
        })
    }

    /// A point derived from `parent`: same disks, every chunk entry copied from the parent's
    /// indexes (no chunk data is read). Replace the changed entries, then publish.
    pub async fn from_parent(store: &Store, parent: &PointMeta) -> Result<Self> {
        let mut b = Self::new(store, &parent.vm)?;
        b.parent = Some(parent.id.clone());
        b.consistency = parent.consistency;
        let mut known = HashSet::new();
        for d in &parent.disks {
            let index = store.load_index(parent, &d.name).await?;
            known.extend(index.entries().iter().copied().filter(|e| !e.is_zero()));
            b.disks.insert(
                d.name.clone(),
                DiskState {
                    index,
                    source_lsn: d.source_lsn,
                    patches: d.patches.clone(),
                    inherited: Some((d.index_key.clone(), d.index_checksum.clone())),
                    adopted: false,
                },
            );
        }
        *b.writer.known.lock().unwrap_or_else(|p| p.into_inner()) = known;
        Ok(b)
    }

    /// The VM.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// Parent point id, if derived.
    pub fn parent(&self) -> Option<&str> {
        self.parent.as_deref()
    }

    /// Set the consistency level.
    pub fn set_consistency(&mut self, c: Consistency) {
        self.consistency = c;
    }

    /// Set a label.
    pub fn set_label(&mut self, k: &str, v: &str) {
        self.labels.insert(k.into(), v.into());
    }

    /// Add a disk made of holes (or reset an inherited one).
    pub fn add_disk(&mut self, name: &str, size: u64) -> Result<()> {
        validate_name("disk", name)?;
        let index = DiskIndex::new(size, self.store.chunk_size())?;
        self.disks.insert(
            name.to_string(),
            DiskState {
                index,
                source_lsn: 0,
                patches: Vec::new(),
                inherited: None,
                adopted: false,
            },
        );
        Ok(())
    }

    /// Resize an inherited disk. Returns chunk indexes whose content must be rewritten
    /// (a non-hole chunk whose length changed).
    pub fn resize_disk(&mut self, name: &str, size: u64) -> Result<Vec<u64>> {
        let d = self.disk_mut(name)?;
        d.inherited = None;
        Ok(d.index.resize(size))
    }

    /// Drop a disk from the point.
    pub fn remove_disk(&mut self, name: &str) -> Result<()> {
        self.disks
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::DiskNotFound {
                point: format!("{} (unpublished)", self.vm),
                disk: name.into(),
            })
    }

    /// Disk names.
    pub fn disks(&self) -> Vec<String> {
        self.disks.keys().cloned().collect()
    }

    /// Current index of a disk (entries copied from the parent until replaced).
    pub fn index(&self, disk: &str) -> Result<&DiskIndex> {
        self.disks
            .get(disk)
            .map(|d| &d.index)
            .ok_or_else(|| Error::DiskNotFound {
                point: format!("{} (unpublished)", self.vm),
                disk: disk.into(),
            })
    }

    fn disk_mut(&mut self, disk: &str) -> Result<&mut DiskState> {
        let vm = self.vm.clone();
        self.disks.get_mut(disk).ok_or_else(|| Error::DiskNotFound {
            point: format!("{vm} (unpublished)"),
            disk: disk.into(),
        })
    }

    /// Record the source change-log position of a disk.
    pub fn set_source_lsn(&mut self, disk: &str, lsn: u64) -> Result<()> {
        self.disk_mut(disk)?.source_lsn = lsn;
        Ok(())
    }

    /// A handle to upload chunks concurrently; record results with [`Self::set_chunk`].
    pub fn writer(&self) -> ChunkWriter {
        self.writer.clone()
    }

    /// Point chunk `index` of `disk` at `id` (a chunk already stored via [`Self::writer`], or
    /// [`ChunkId::ZERO`] for a hole). Only chunks confirmed stored, or staged by this builder's
    /// writer (committed by [`Self::publish`]), may be recorded.
    pub fn set_chunk(&mut self, disk: &str, index: u64, id: ChunkId) -> Result<()> {
        let d = self.disk_mut(disk)?;
        if d.index.get(index) != Some(id) {
            d.inherited = None;
        }
        d.index.set(index, id)
    }

    /// Upload `data` as chunk `index` of `disk` and record it (serial convenience).
    pub async fn write_chunk(&mut self, disk: &str, index: u64, data: Bytes) -> Result<PutOutcome> {
        let expect = self.index(disk)?.chunk_len(index);
        if data.len() != expect {
            return Err(Error::InvalidArgument(format!(
                "chunk {index} of disk {disk} must be {expect} bytes, got {}",
                data.len()
            )));
        }
        let out = self.writer.put(data).await?;
        self.set_chunk(disk, index, out.id)?;
        Ok(out)
    }

    /// Replace a disk's whole index (and drop its patches): a disk copied by a pass
    /// (initial replication, resync) whose chunks other upload sessions stored, maybe long
    /// before this one started. [`Self::publish`] checks them again (see there).
    pub fn set_index(&mut self, disk: &str, index: DiskIndex) -> Result<()> {
        let d = self.disk_mut(disk)?;
        d.index = index;
        d.patches.clear();
        d.inherited = None;
        d.adopted = true;
        Ok(())
    }

    /// Makes the chunks of adopted indexes ([`Self::set_index`]) this session's own before it
    /// publishes. GC's safety argument covers a chunk only from the moment a session that
    /// publishes within `max_session_secs` saw it live; a pass that stored a chunk hours ago
    /// (or a pass resumed after a restart) gives no such guarantee: GC may have set the chunk
    /// aside, or deleted it once set aside longer than `max_session_secs`. So each chunk this
    /// session does not know yet is looked up now: live (a HEAD on the chunks layout, the
    /// session's pack cache on packs) → kept; set aside → made live again (fossil renamed
    /// back; a pack's index moved back while its collection is young enough that GC cannot
    /// be deleting it) or else stored again by this session from its object (no re-read of
    /// the disk); gone → [`Error::ChunksGone`] with the positions, nothing published. From
    /// then on the chunk was live after this session started, which is what GC's argument
    /// needs. Cost: one HEAD per distinct chunk on the chunks layout, one refresh (with
    /// fossils) on packs.
    async fn adopt_indexes(&self) -> Result<()> {
        let mut ids: HashSet<ChunkId> = HashSet::new();
        for st in self.disks.values().filter(|st| st.adopted) {
            ids.extend(
                st.index
                    .entries()
                    .iter()
                    .filter(|id| !self.writer.knows(id))
                    .copied(),
            );
        }
        if ids.is_empty() {
            return Ok(());
        }
        let w = &self.writer;
        let fossil_packs = match &w.packer {
            Some(p) => {
                p.start().await?;
                if ids.iter().all(|id| self.store.pack_has(id)) {
                    HashMap::new()
                } else {
                    self.store.fossil_chunks().await?
                }
            }
            None => HashMap::new(),
        };
        let fp = &fossil_packs;
        let n = ids.len();
        let outcomes: Vec<(ChunkId, Adopted)> = futures::stream::iter(ids)
            .map(|id| async move { w.adopt(id, fp).await.map(|a| (id, a)) })
            .buffer_unordered(32)
            .try_collect()
            .await?;
        let count = |k: Adopted| outcomes.iter().filter(|(_, a)| *a == k).count();
        let gone: HashSet<ChunkId> = outcomes
            .iter()
            .filter(|(_, a)| *a == Adopted::Gone)
            .map(|(id, _)| *id)
            .collect();
        tracing::info!(
            vm = %self.vm,
            chunks = n,
            live = count(Adopted::Live),
            restored = count(Adopted::Restored),
            copied = count(Adopted::Copied),
            gone = gone.len(),
            "adopted the chunks a pass stored"
        );
        if gone.is_empty() {
            return Ok(());
        }
        let gone = self
            .disks
            .iter()
            .filter(|(_, st)| st.adopted)
            .filter_map(|(name, st)| {
                let pos: Vec<u64> = (0u64..)
                    .zip(st.index.entries())
                    .filter(|(_, id)| gone.contains(id))
                    .map(|(i, _)| i)
                    .collect();
                (!pos.is_empty()).then(|| (name.clone(), pos))
            })
            .collect();
        Err(Error::ChunksGone {
            vm: self.vm.clone(),
            gone,
        })
    }

    /// Patches of a disk, oldest first.
    pub fn patches(&self, disk: &str) -> Result<&[PatchRef]> {
        self.disks
            .get(disk)
            .map(|d| d.patches.as_slice())
            .ok_or_else(|| Error::DiskNotFound {
                point: format!("{} (unpublished)", self.vm),
                disk: disk.into(),
            })
    }

    /// Store `patch` and append it to the disk's patch chain. Returns the bytes uploaded.
    ///
    /// Every chunk the patch rewrites whole (with some data) is stored as a chunk through the
    /// session's writer (dedup, zero elision, packs) and referred to from a data-free patch
    /// object; the rest is split into objects of at most [`crate::patch::MAX_PATCH_DATA`].
    /// A chunk one write covers goes to the writer as a slice of the patch's buffer and, when
    /// stored bare, to the backend as that same buffer: its bytes are never copied here.
    /// All pieces of one call are disjoint, so their order in the chain does not matter.
    pub async fn add_patch(&mut self, disk: &str, mut patch: Patch) -> Result<u64> {
        let index = self.index(disk)?;
        let size = index.disk_size();
        let cs = u64::from(index.chunk_size());
        if patch.disk_size() != size {
            return Err(Error::InvalidArgument(format!(
                "patch for a {}-byte disk applied to disk {disk} of {size} bytes",
                patch.disk_size()
            )));
        }
        let (patch, whole) = tokio::task::spawn_blocking(move || {
            let whole = patch.take_whole_chunks(cs);
            (patch, whole)
        })
        .await
        .map_err(|e| Error::Config(format!("patch scan task failed: {e}")))?;
        let whole = whole?;
        let mut uploaded = 0;
        let mut pieces = patch.split();
        if !whole.is_empty() {
            let writer = self.writer.clone();
            let mut batches = Vec::new();
            let mut it = whole.into_iter().peekable();
            while it.peek().is_some() {
                batches.push(it.by_ref().take(CUT_BATCH_CHUNKS).collect::<Vec<_>>());
            }
            let stored: Vec<Vec<(u64, u64, PutOutcome)>> = futures::stream::iter(batches)
                .map(|batch| writer.put_batch(batch))
                .buffer_unordered(CUT_BATCHES)
                .try_collect()
                .await?;
            let mut refs = Patch::new(size);
            for (ci, len, out) in stored.into_iter().flatten() {
                uploaded += out.uploaded_bytes;
                refs.refer(ci * cs, len, out.id, 0)?;
            }
            pieces.extend(refs.split());
        }
        // Pieces are serialized, hashed and stored in parallel (a cut of a busy interval has
        // several); their refs keep the split order.
        let stored = futures::future::try_join_all(pieces.into_iter().map(|piece| {
            let writer = self.writer.clone();
            async move {
                let data_bytes = piece.data_bytes();
                let chunk_refs = piece.chunk_refs();
                let bytes = tokio::task::spawn_blocking(move || piece.to_bytes())
                    .await
                    .map_err(|e| Error::Config(format!("patch encode task failed: {e}")))?;
                let n = bytes.len() as u64;
                let out = writer.put(Bytes::from(bytes)).await?;
                Ok::<_, Error>((out, n, data_bytes, chunk_refs))
            }
        }))
        .await?;
        let mut refs = Vec::new();
        for (out, n, data_bytes, chunk_refs) in stored {
            uploaded += out.uploaded_bytes;
            refs.push(PatchRef {
                id: out.id.to_hex(),
                bytes: n,
                data_bytes,
                chunk_refs,
            });
        }
        self.disk_mut(disk)?.patches.extend(refs);
        Ok(uploaded)
    }

    /// Fold a disk's patches into its chunks ([`Store::resolve_chain`]): a chunk a patch
    /// refers to whole becomes the index entry (no read, no encode); each chunk the residual
    /// data touches is read once, patched and stored. Afterwards the disk has no patches.
    /// Returns (chunks changed, bytes uploaded).
    pub async fn fold(&mut self, disk: &str) -> Result<(u64, u64)> {
        let refs = self.patches(disk)?.to_vec();
        if refs.is_empty() {
            return Ok((0, 0));
        }
        // Patches added by this builder are only staged: make them readable first.
        self.writer.commit().await?;
        let mut index = self.index(disk)?.clone();
        let (taken, patch) = self.store.resolve_chain(&mut index, &refs).await?;
        let cs = index.chunk_size() as u64;
        let touched: Vec<u64> = patch.touched_chunks(cs).into_iter().collect();
        let patch = Arc::new(patch);
        let writer = self.writer.clone();
        let store = self.store.clone();
        let results: Vec<(u64, PutOutcome)> =
            futures::stream::iter(touched.into_iter().map(|ci| {
                let (patch, writer, store, index) =
                    (patch.clone(), writer.clone(), store.clone(), &index);
                let id = index.get(ci).unwrap_or(ChunkId::ZERO);
                let len = index.chunk_len(ci);
                async move {
                    // A chunk the patches overwrite whole needs no read of its old content.
                    let mut buf = if patch.covers(ci * cs, ci * cs + len as u64) {
                        vec![0u8; len]
                    } else {
                        store.get_chunk(&id, Some(len)).await?.to_vec()
                    };
                    patch.apply(ci * cs, &mut buf)?;
                    let out = writer.put(Bytes::from(buf)).await?;
                    Ok::<_, Error>((ci, out))
                }
            }))
            .buffer_unordered(16)
            .try_collect()
            .await?;
        let mut uploaded = 0;
        let n = results.len() as u64;
        for (ci, out) in results {
            uploaded += out.uploaded_bytes;
            index.set(ci, out.id)?;
        }
        tracing::debug!(
            disk,
            referenced = taken,
            rewritten = n,
            uploaded,
            "folded patches"
        );
        let d = self.disk_mut(disk)?;
        d.index = index;
        d.patches.clear();
        d.inherited = None;
        Ok((n + taken, uploaded))
    }

    /// Write the indexes, then the point object (the commit). Refuses if the session lasted
    /// longer than the store's `max_session_secs` (GC may have collected chunks it relied on).
    pub async fn publish(self) -> Result<PointMeta> {
        let elapsed = self.started.elapsed().as_secs();
        let max = self.store.settings().max_session_secs;
        if elapsed > max {
            return Err(Error::SessionExpired {
                vm: self.vm.clone(),
                elapsed_secs: elapsed,
                max_secs: max,
            });
        }
        if self.disks.is_empty() {
            return Err(Error::InvalidArgument(
                "a recovery point needs at least one disk".into(),
            ));
        }
        self.adopt_indexes().await?;
        // Every chunk the indexes reference must be durable before the first index is written.
        self.writer.commit().await?;
        let created = monotonic_ms(now_unix_ms());
        let id = new_point_id(created);
        let mut disks = Vec::new();
        let mut upload = self.writer.upload_stats();
        for (name, st) in &self.disks {
            let (key, checksum) = match &st.inherited {
                Some((key, sum)) => (key.clone(), sum.clone()),
                None => {
                    let key = index_key(&self.vm, &id, name);
                    upload.bytes += self
                        .store
                        .put_object_len(MAGIC_INDEX, &key, &st.index.to_bytes())
                        .await?;
                    upload.puts += 1;
                    (key, hex::encode(st.index.checksum()))
                }
            };
            disks.push(DiskEntry {
                name: name.clone(),
                size: st.index.disk_size(),
                chunk_size: st.index.chunk_size(),
                chunks: st.index.len(),
                data_chunks: st.index.data_chunks(),
                source_lsn: st.source_lsn,
                index_key: key,
                index_checksum: checksum,
                patches: st.patches.clone(),
            });
        }
        let refs = disks
            .iter()
            .flat_map(|d| &d.patches)
            .any(|p| p.chunk_refs > 0);
        let meta = PointMeta {
            format_version: if refs {
                POINT_FORMAT_VERSION
            } else {
                POINT_FORMAT_PLAIN
            },
            vm: self.vm.clone(),
            id: id.clone(),
            created_unix_ms: created,
            consistency: self.consistency,
            parent: self.parent.clone(),
            disks,
            labels: self.labels.clone(),
            upload: None,
        };
        // The point object itself is one more PUT (its own size is not known before it is
        // serialized: counted as the JSON without these stats).
        let mut meta = meta;
        upload.puts += 1;
        upload.bytes += serde_json::to_vec(&meta).map_or(0, |j| j.len() as u64);
        meta.upload = Some(upload);
        let json = serde_json::to_vec(&meta)
            .map_err(|e| Error::Config(format!("serializing point: {e}")))?;
        self.store
            .put_object(MAGIC_POINT, &point_key(&self.vm, &id), &json)
            .await?;
        tracing::info!(point = %meta.full_id(), disks = meta.disks.len(), ?upload, "published recovery point");
        Ok(meta)
    }
}

impl Store {
    /// Disk `disk` of `point` as "index with overrides + residual patch": its index, with
    /// every chunk its patch chain refers to whole set as that chunk's entry, and the rest of
    /// the chain merged into one patch without chunk extents (see [`Self::resolve_chain`]).
    /// Reading chunk `i` = the index's chunk `i` with the patch applied over it. The one
    /// way readers, export, resync, fold and consolidation compute a point's disk.
    pub async fn load_disk(&self, point: &PointMeta, disk: &str) -> Result<(DiskIndex, Patch)> {
        let mut index = self.load_index(point, disk).await?;
        let entry = point.disk(disk)?;
        let (_, patch) = self.resolve_chain(&mut index, &entry.patches).await?;
        Ok((index, patch))
    }

    /// Merge the patch chain `refs` (oldest first; later extents carve earlier ones, so a
    /// chunk reference in element k supersedes the base and elements before k for its chunk)
    /// and resolve it against `index`: whole chunk references become index entries, partial
    /// ones (later data carved part of the chunk) are read and become data. Returns the number
    /// of index entries set and the residual patch, which holds no chunk extents.
    pub async fn resolve_chain(
        &self,
        index: &mut DiskIndex,
        refs: &[PatchRef],
    ) -> Result<(u64, Patch)> {
        let mut patch = self.load_patches(refs, index.disk_size()).await?;
        let (taken, partial) = patch.resolve_whole(index)?;
        let read: Vec<(u64, u64, u64, Bytes, ChunkId)> = futures::stream::iter(partial)
            .map(|(off, len, id, from)| async move {
                let c = self.get_chunk(&id, None).await?;
                Ok::<_, Error>((off, len, from, c, id))
            })
            .buffer_unordered(PATCH_FETCHES)
            .try_collect()
            .await?;
        for (off, len, from, c, id) in read {
            let part = usize::try_from(from)
                .ok()
                .zip(usize::try_from(from.saturating_add(len)).ok())
                .and_then(|(a, b)| c.get(a..b))
                .ok_or_else(|| {
                    Error::corrupt_object(
                        self.chunk_key(&id),
                        format!(
                            "a patch refers to bytes {from}+{len} of this {}-byte chunk",
                            c.len()
                        ),
                    )
                })?;
            patch.write(off, part)?;
        }
        Ok((taken, patch))
    }

    /// Chunks the patch objects `refs` refer to (reads only those with
    /// [`PatchRef::chunk_refs`]); for GC and verify. Returns (chunk, length) pairs, holes
    /// (zero ids) left out.
    pub async fn patch_chunk_refs(&self, refs: &[PatchRef]) -> Result<Vec<(ChunkId, u64)>> {
        let mut out = Vec::new();
        let mut fetched = futures::stream::iter(
            refs.iter()
                .filter(|r| r.chunk_refs > 0)
                .map(|r| self.load_patch(r, None))
                .collect::<Vec<_>>(),
        )
        .buffered(PATCH_FETCHES);
        while let Some(p) = fetched.next().await {
            for (_, len, piece) in p?.extents() {
                if let crate::patch::Piece::Chunk { id, from } = piece {
                    if !id.is_zero() {
                        // Stored references are whole chunks (from 0): `len` is the chunk's.
                        out.push((id, from + len));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Load one patch object; with `disk_size`, check it is for that disk.
    async fn load_patch(&self, r: &PatchRef, disk_size: Option<u64>) -> Result<Patch> {
        let id = r.chunk_id()?;
        if r.bytes > crate::chunk::MAX_CHUNK_PLAIN {
            return Err(Error::corrupt_object(
                self.chunk_key(&id),
                format!("patch claims {} bytes", r.bytes),
            ));
        }
        let raw = self.get_chunk(&id, Some(r.bytes as usize)).await?;
        let p = Patch::from_bytes(&raw, &self.chunk_key(&id))?;
        match disk_size {
            Some(s) if p.disk_size() != s => Err(Error::corrupt_object(
                self.chunk_key(&id),
                format!(
                    "patch is for a {}-byte disk, the point's disk has {s}",
                    p.disk_size()
                ),
            )),
            _ => Ok(p),
        }
    }

    /// Load patch objects and merge them, oldest first, into one patch (chunk extents not
    /// resolved: use [`Self::load_disk`] or [`Self::resolve_chain`] to read a disk).
    ///
    /// Objects are fetched [`PATCH_FETCHES`] at a time (a long chain on S3 costs one round
    /// trip per [`PATCH_FETCHES`] objects, not per object) and merged in order as they arrive.
    pub(crate) async fn load_patches(&self, refs: &[PatchRef], disk_size: u64) -> Result<Patch> {
        let mut merged = Patch::new(disk_size);
        let mut fetched = futures::stream::iter(
            refs.iter()
                .map(|r| self.load_patch(r, Some(disk_size)))
                .collect::<Vec<_>>(),
        )
        .buffered(PATCH_FETCHES);
        while let Some(p) = fetched.next().await {
            merged.merge(&p?)?;
        }
        Ok(merged)
    }

    /// Load and check one disk index of a point.
    pub async fn load_index(&self, point: &PointMeta, disk: &str) -> Result<DiskIndex> {
        let d = point.disk(disk)?;
        // Header (32 bytes), one 32-byte id per chunk, the checksum (32 bytes).
        let max = d
            .size
            .div_ceil(u64::from(d.chunk_size.max(1)))
            .saturating_mul(32)
            .saturating_add(64);
        let raw = self
            .get_object(MAGIC_INDEX, &d.index_key, max)
            .await
            .map_err(|e| match e {
                Error::NotFound { key, .. } => {
                    Error::corrupt_object(key, format!("index of {} is missing", point.full_id()))
                }
                other => other,
            })?;
        let idx = DiskIndex::from_bytes(&raw, &d.index_key)?;
        if hex::encode(idx.checksum()) != d.index_checksum || idx.disk_size() != d.size {
            return Err(Error::corrupt_object(
                &d.index_key,
                "does not match the point's checksum/size",
            ));
        }
        Ok(idx)
    }

    /// Start a new point for `vm`.
    pub fn point_builder(&self, vm: &str) -> Result<PointBuilder> {
        PointBuilder::new(self, vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_format() {
        assert_eq!(format_utc_ms(0), "19700101T000000.000Z");
        assert_eq!(format_utc_ms(1_700_000_000_123), "20231114T221320.123Z");
        assert!(validate_name("VM", "vm-1.a_b").is_ok());
        assert!(validate_name("VM", "../x").is_err());
        assert!(validate_name("VM", ".x").is_err());
        assert!(validate_name("VM", "-x").is_err());
        assert!(validate_name("VM", "/etc").is_err());
        assert!(validate_name("VM", "..").is_err());
    }
}
