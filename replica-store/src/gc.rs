//! Garbage collection: mark and sweep with a grace period and two-phase deletion through
//! "fossils", safe while other gateways upload.
//!
//! One run:
//! 1. **Mark**: read every published point and its indexes; the referenced set R. Any
//!    unreadable point or index aborts the run (never sweep on an incomplete mark).
//! 2. **Old collections**: for each fossil collection written by an earlier run, fossils now
//!    referenced (a point published by a session that started before they were collected) are
//!    moved back to `chunks/`; unreferenced fossils of collections older than the store's
//!    `max_session_secs` are deleted for good.
//! 3. **Candidates**: chunks not in R and older than the grace period.
//! 4. **Re-mark**: points published meanwhile are read and their chunks removed from the
//!    candidates.
//! 5. **Fossilize**: a collection object `gc/collection-<time>-<rand>` listing the candidates
//!    is written, then each candidate is moved to `fossils/`.
//!
//! **Packs** (format 5, see `pack.rs`) follow the same two phases with the pack as the unit:
//! a pack none of whose chunks R references, older than the grace period, is fossilized by
//! moving its *index* from `packidx/` to `packfossils/` (the pack object stays where it is,
//! so its chunks stay readable); a pack whose referenced chunks fill less than half its
//! bytes is **repacked**: its referenced chunks are copied into new packs (durable, with
//! their indexes) and then the old pack is fossilized. The collection lists fossil packs
//! (`packs`); a later run resurrects a fossil pack any of whose chunks a point now
//! references (index moved back) and deletes the others (index, then pack object) once the
//! collection is older than `max_session_secs`. Pack objects that have no index at all
//! (uploads interrupted between the pack and its index) are deleted once older than the
//! grace period.
//!
//! Why this is safe: an upload session that found a chunk present (dedup) or inherited it from
//! a parent may still publish a point referencing it after the mark. Moving it to `fossils/`
//! (instead of deleting) keeps it readable (readers fall back to the fossil key) and makes
//! sessions that start later upload it again. Fossils are deleted only after
//! `max_session_secs`, by which time every session that could reference them has published
//! (sessions refuse to publish after `max_session_secs`) and the next run's mark sees it.
//!
//! For packs, "a session that starts later uploads it again" holds because a session
//! refreshes its pack view when it starts (`pack.rs`): it lists `packidx/` and then `gc/`,
//! and drops every pack a collection names. If the collection was visible then, the
//! session never deduplicates against the pack. If not, the collection was written after
//! the session started, so it is deleted no earlier than `max_session_secs` after the
//! session's start, when the session has published or given up, and the deleting run's
//! mark sees its point and resurrects the pack instead.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::chunk::{ChunkId, MAGIC_BLOB};
use crate::error::{Error, Result};
use crate::pack::{
    decode_index, pack_fossil_key, pack_id_of, pack_index_key, pack_key, Layout, PackEntry, Packer,
    MAGIC_PACK_INDEX,
};
use crate::point::PointMeta;
use crate::store::{now_unix_ms, Store};

/// GC options.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Unreferenced chunks younger than this are kept (they may belong to an upload in
    /// progress).
    pub grace: Duration,
    /// Report only.
    pub dry_run: bool,
    /// Delete fossils after this delay instead of the store's `max_session_secs` (tests).
    pub fossil_delay: Option<Duration>,
    /// The time this run takes as "now" for the grace period and the fossil delay; `None` is
    /// the wall clock. Tests move it forward instead of sleeping, so a run that compared the
    /// wrong timestamps fails deterministically rather than by luck of the scheduler.
    pub now: Option<SystemTime>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            dry_run: false,
            fossil_delay: None,
            now: None,
        }
    }
}

/// What a GC run found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Published points read.
    pub points: usize,
    /// Distinct chunks referenced by them.
    pub referenced_chunks: usize,
    /// Chunk objects listed.
    pub chunks_listed: usize,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub kept_young: usize,
    /// Chunks moved to fossils (or that would be, in a dry run).
    pub fossilized: usize,
    /// Bytes of those chunks.
    pub fossilized_bytes: u64,
    /// Fossils restored because a point references them.
    pub resurrected: usize,
    /// Fossils deleted for good.
    pub deleted: usize,
    /// Bytes deleted for good.
    pub deleted_bytes: u64,
    /// Orphan index objects (of never-published points) deleted.
    pub orphan_indexes_deleted: usize,
    /// Packs layout: live packs listed.
    pub packs_listed: usize,
    /// Packs fossilized because none of their chunks is referenced.
    pub packs_fossilized: usize,
    /// Packs repacked (referenced chunks copied to new packs, then the pack fossilized).
    pub packs_repacked: usize,
    /// Chunks copied by repacking, and their bytes.
    pub chunks_repacked: usize,
    /// Bytes copied by repacking.
    pub bytes_repacked: u64,
    /// Fossil packs deleted for good (with their bytes in `deleted_bytes`).
    pub packs_deleted: usize,
    /// Pack objects without an index (interrupted uploads) deleted.
    pub orphan_packs_deleted: usize,
}

/// A pack is repacked when its referenced chunks fill less than this percentage of its bytes.
pub const REPACK_BELOW_PERCENT: u64 = 50;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Collection {
    pub(crate) created_unix_ms: u64,
    fossils: Vec<String>,
    /// Packs whose index was moved to `packfossils/` (packs layout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) packs: Vec<String>,
}

impl Store {
    /// Read a GC collection object.
    pub(crate) async fn read_collection(&self, key: &str) -> Result<Collection> {
        let raw = self
            .get_object(MAGIC_BLOB, key, Self::MAX_BLOB_BYTES)
            .await?;
        serde_json::from_slice(&raw).map_err(|e| Error::corrupt_object(key, e.to_string()))
    }

    async fn mark(&self, points: &[PointMeta], into: &mut HashSet<ChunkId>) -> Result<()> {
        let mut futs = Vec::new();
        // Patch objects that refer to chunks (read once each: points share chain prefixes).
        let mut with_refs = Vec::new();
        let mut seen_refs = HashSet::new();
        for p in points {
            for d in &p.disks {
                for r in &d.patches {
                    into.insert(r.chunk_id()?);
                    if r.chunk_refs > 0 && seen_refs.insert(r.id.clone()) {
                        with_refs.push((p.clone(), r.clone()));
                    }
                }
                let (store, p, d) = (self.clone(), p.clone(), d.name.clone());
                futs.push(async move {
                    match store.load_index(&p, &d).await {
                        Ok(i) => Ok(Some(i)),
                        // Pruned while we were marking: its chunks need no protection.
                        Err(e)
                            if !e.is_recoverable()
                                && store
                                    .backend()
                                    .head(&crate::point::point_key(&p.vm, &p.id))
                                    .await?
                                    .is_none() =>
                        {
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    }
                });
            }
        }
        let mut s = stream::iter(futs).buffer_unordered(8);
        while let Some(idx) = s.next().await {
            if let Some(idx) = idx? {
                into.extend(idx.entries().iter().filter(|e| !e.is_zero()).copied());
            }
        }
        // The chunks a cut stored whole and its patch objects refer to.
        let mut s = stream::iter(with_refs.into_iter().map(|(p, r)| async move {
            match self.patch_chunk_refs(std::slice::from_ref(&r)).await {
                Ok(ids) => Ok(ids),
                // Pruned (and its patch collected) while we were marking.
                Err(e)
                    if !e.is_recoverable()
                        && self
                            .backend()
                            .head(&crate::point::point_key(&p.vm, &p.id))
                            .await?
                            .is_none() =>
                {
                    Ok(Vec::new())
                }
                Err(e) => Err(e),
            }
        }))
        .buffer_unordered(8);
        while let Some(ids) = s.next().await {
            into.extend(ids?.into_iter().map(|(id, _)| id));
        }
        Ok(())
    }

    /// Run garbage collection.
    pub async fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        let mut report = GcReport::default();
        let now = opts.now.unwrap_or_else(SystemTime::now);
        let now_ms = match opts.now {
            Some(t) => t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            None => now_unix_ms(),
        };
        let fossil_delay = opts
            .fossil_delay
            .unwrap_or(Duration::from_secs(self.settings().max_session_secs));

        // 1. Mark.
        let points = self.list_points(None).await?;
        let mut seen: HashSet<String> = points.iter().map(|p| p.full_id()).collect();
        let mut referenced = HashSet::new();
        self.mark(&points, &mut referenced).await?;
        report.points = points.len();

        // 2. Earlier fossil collections.
        let backend = self.backend().clone();
        let collections = backend.list("gc/").await?;
        let mut in_collection: HashSet<String> = HashSet::new();
        let mut in_collection_packs: HashSet<String> = HashSet::new();
        // Chunks live packs hold: a fossil pack comes back only for chunks no live pack has.
        let mut in_live_packs: HashSet<ChunkId> = HashSet::new();
        if self.layout() == Layout::Packs {
            let (live, _) = self.pack_contents().await?;
            in_live_packs.extend(live.values().flat_map(|es| es.iter().map(|e| e.id)));
        }
        for c in &collections {
            let col = self.read_collection(&c.key).await?;
            let old = now_ms.saturating_sub(col.created_unix_ms) >= fossil_delay.as_millis() as u64;
            for pid in &col.packs {
                if pack_id_of(pid) != Some(pid.as_str()) {
                    continue;
                }
                in_collection_packs.insert(pid.clone());
                self.old_fossil_pack(
                    pid,
                    &referenced,
                    &in_live_packs,
                    old,
                    opts.dry_run,
                    &mut report,
                )
                .await?;
            }
            for h in &col.fossils {
                let Some(id) = ChunkId::from_hex(h) else {
                    continue;
                };
                in_collection.insert(h.clone());
                if referenced.contains(&id) {
                    if !opts.dry_run {
                        self.resurrect(&id).await?;
                    }
                    report.resurrected += 1;
                } else if old {
                    if let Some(m) = backend.head(&self.fossil_key(&id)).await? {
                        report.deleted += 1;
                        report.deleted_bytes += m.size;
                    }
                    if !opts.dry_run {
                        backend.delete(&self.fossil_key(&id)).await?;
                    }
                }
            }
            if old && !opts.dry_run {
                backend.delete(&c.key).await?;
            }
        }

        // 3. Candidates (plus stray fossils no collection lists, e.g. after a crash).
        let chunks = backend.list("chunks/").await?;
        report.chunks_listed = chunks.len();
        let cutoff = now
            .checked_sub(opts.grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut candidates: HashMap<ChunkId, u64> = HashMap::new();
        for o in &chunks {
            let Some(id) = o.key.rsplit('/').next().and_then(ChunkId::from_hex) else {
                continue;
            };
            if referenced.contains(&id) {
                continue;
            }
            if o.modified >= cutoff {
                report.kept_young += 1;
                continue;
            }
            candidates.insert(id, o.size);
        }
        // 3b. Packs: dead packs, sparse packs, packs without an index, stray fossil packs.
        let mut pack_plan = PackPlan::default();
        if self.layout() == Layout::Packs {
            pack_plan = self
                .plan_packs(&referenced, &in_collection_packs, cutoff, &mut report)
                .await?;
        }
        let mut stray = Vec::new();
        for o in backend.list("fossils/").await? {
            let Some(h) = o.key.rsplit('/').next() else {
                continue;
            };
            if !in_collection.contains(h) {
                if let Some(id) = ChunkId::from_hex(h) {
                    stray.push(id);
                }
            }
        }

        // 4. Re-mark with points published meanwhile.
        let later: Vec<PointMeta> = self
            .list_points(None)
            .await?
            .into_iter()
            .filter(|p| !seen.contains(&p.full_id()))
            .collect();
        if !later.is_empty() {
            let mut more = HashSet::new();
            self.mark(&later, &mut more).await?;
            candidates.retain(|id, _| !more.contains(id));
            for id in stray.iter().filter(|id| more.contains(id)) {
                if !opts.dry_run {
                    self.resurrect(id).await?;
                }
                report.resurrected += 1;
            }
            stray.retain(|id| !more.contains(id));
            pack_plan
                .dead
                .retain(|(_, es)| !es.iter().any(|e| more.contains(&e.id)));
            referenced.extend(more);
            seen.extend(later.iter().map(|p| p.full_id()));
            report.points += later.len();
        }
        stray.retain(|id| !referenced.contains(id));
        report.referenced_chunks = referenced.len();
        report.fossilized = candidates.len();
        report.fossilized_bytes = candidates.values().sum();

        report.packs_fossilized = pack_plan.dead.len();
        report.packs_repacked = pack_plan.sparse.len();

        // 5a. Repack: the referenced chunks of sparse packs into new packs, durable (with
        // their indexes) before the old packs are set aside below.
        let mut fossil_packs: Vec<String> = Vec::new();
        if !opts.dry_run && !pack_plan.sparse.is_empty() {
            let (n, bytes) = self.repack(&pack_plan.sparse, &referenced).await?;
            report.chunks_repacked = n;
            report.bytes_repacked = bytes;
        }
        fossil_packs.extend(pack_plan.dead.iter().map(|(p, _)| p.to_string()));
        fossil_packs.extend(pack_plan.sparse.iter().map(|(p, _)| p.to_string()));
        fossil_packs.extend(pack_plan.stray.iter().cloned());

        // 5. Fossilize.
        if !opts.dry_run
            && (!candidates.is_empty() || !stray.is_empty() || !fossil_packs.is_empty())
        {
            let col = Collection {
                created_unix_ms: now_ms,
                fossils: candidates
                    .keys()
                    .chain(stray.iter())
                    .map(|id| id.to_hex())
                    .collect(),
                packs: fossil_packs.clone(),
            };
            let key = format!("gc/collection-{now_ms:013}-{:08x}", rand::random::<u32>());
            let json = serde_json::to_vec(&col).map_err(|e| Error::Config(e.to_string()))?;
            self.put_object(MAGIC_BLOB, &key, &json).await?;
            stream::iter(candidates.keys().copied())
                .map(|id| {
                    let b = backend.clone();
                    let (key, fossil) = (self.chunk_key(&id), self.fossil_key(&id));
                    async move {
                        match b.rename(&key, &fossil).await {
                            Err(e) if e.is_not_found() => Ok(()),
                            r => r,
                        }
                    }
                })
                .buffer_unordered(16)
                .try_collect::<Vec<()>>()
                .await?;
            // Pack indexes move to packfossils/ (stray ones are there already).
            let moving: Vec<Arc<str>> = pack_plan
                .dead
                .iter()
                .chain(pack_plan.sparse.iter())
                .map(|entry| entry.0.clone())
                .collect();
            stream::iter(moving)
                .map(|pid| {
                    let b = backend.clone();
                    async move {
                        match b
                            .rename(&pack_index_key(&pid), &pack_fossil_key(&pid))
                            .await
                        {
                            Err(e) if e.is_not_found() => Ok(()),
                            r => r,
                        }
                    }
                })
                .buffer_unordered(16)
                .try_collect::<Vec<()>>()
                .await?;
            self.forget_packs();
        }
        if !opts.dry_run {
            for key in &pack_plan.orphans {
                backend.delete(key).await?;
            }
        }

        // Orphan indexes: written by sessions that never published, older than the delay. An
        // index a live point refers to (a delta point shares its parent's) is never one.
        let live_indexes: HashSet<String> = self
            .list_points(None)
            .await?
            .iter()
            .flat_map(|p| p.disks.iter().map(|d| d.index_key.clone()))
            .collect();
        let idx_cutoff = now
            .checked_sub(fossil_delay)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        for o in backend.list("indexes/").await? {
            let mut parts = o.key.splitn(4, '/');
            let (_, Some(vm), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if seen.contains(&format!("{vm}/{id}"))
                || live_indexes.contains(&o.key)
                || o.modified >= idx_cutoff
            {
                continue;
            }
            if backend
                .head(&crate::point::point_key(vm, id))
                .await?
                .is_some()
            {
                continue;
            }
            report.orphan_indexes_deleted += 1;
            if !opts.dry_run {
                backend.delete(&o.key).await?;
            }
        }
        tracing::info!(?report, dry_run = opts.dry_run, "gc finished");
        Ok(report)
    }

    /// A fossil pack of an earlier collection: resurrected if a point references one of its
    /// chunks, deleted (index, then pack) if not and the collection is old.
    async fn old_fossil_pack(
        &self,
        pid: &str,
        referenced: &HashSet<ChunkId>,
        in_live_packs: &HashSet<ChunkId>,
        old: bool,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<()> {
        let b = self.backend();
        let fkey = pack_fossil_key(pid);
        let entries = match self.get_object(MAGIC_PACK_INDEX, &fkey, 64 << 20).await {
            Ok(raw) => decode_index(&raw, &fkey)?.1,
            // Already resurrected or deleted (a crash after part of a run).
            Err(e) if e.is_not_found() => {
                if old && !dry_run && b.head(&pack_index_key(pid)).await?.is_none() {
                    b.delete(&pack_key(pid)).await?;
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if entries
            .iter()
            .any(|e| referenced.contains(&e.id) && !in_live_packs.contains(&e.id))
        {
            report.resurrected += 1;
            if !dry_run {
                b.rename(&fkey, &pack_index_key(pid)).await?;
                self.forget_packs();
            }
        } else if old {
            if let Some(m) = b.head(&pack_key(pid)).await? {
                report.deleted_bytes += m.size;
            }
            report.packs_deleted += 1;
            if !dry_run {
                b.delete(&fkey).await?;
                b.delete(&pack_key(pid)).await?;
            }
        }
        Ok(())
    }

    /// Which packs to fossilize, repack or delete.
    async fn plan_packs(
        &self,
        referenced: &HashSet<ChunkId>,
        in_collection: &HashSet<String>,
        cutoff: SystemTime,
        report: &mut GcReport,
    ) -> Result<PackPlan> {
        let mut plan = PackPlan::default();
        let objects = self.backend().list("packs/").await?;
        let (live, fossil) = self.pack_contents().await?;
        report.packs_listed = live.len();
        for o in &objects {
            let Some(pid) = pack_id_of(&o.key) else {
                continue;
            };
            if o.modified >= cutoff {
                continue;
            }
            if let Some(entries) = live.get(pid) {
                let total: u64 = entries.iter().map(|e| u64::from(e.len)).sum();
                let used: u64 = entries
                    .iter()
                    .filter(|e| referenced.contains(&e.id))
                    .map(|e| u64::from(e.len))
                    .sum();
                if used == 0 {
                    plan.dead.push((Arc::from(pid), entries.clone()));
                } else if used * 100 < total * REPACK_BELOW_PERCENT {
                    plan.sparse.push((Arc::from(pid), entries.clone()));
                }
            } else if fossil.contains_key(pid) {
                if !in_collection.contains(pid) {
                    plan.stray.push(pid.to_string());
                }
            } else {
                // No index anywhere: an interrupted upload (its index would be younger than
                // the pack, and the pack is past the grace period).
                let gone = self.backend().head(&pack_index_key(pid)).await?.is_none()
                    && self.backend().head(&pack_fossil_key(pid)).await?.is_none();
                if gone {
                    plan.orphans.push(o.key.clone());
                    report.orphan_packs_deleted += 1;
                }
            }
        }
        Ok(plan)
    }

    /// Copy the referenced chunks of `packs` into new packs (one GET per old pack); returns
    /// (chunks, bytes) copied. Afterwards the copies are durable and indexed.
    async fn repack(
        &self,
        packs: &[(Arc<str>, Arc<Vec<PackEntry>>)],
        referenced: &HashSet<ChunkId>,
    ) -> Result<(usize, u64)> {
        let packer = Packer::new(self);
        let mut copied: HashSet<ChunkId> = HashSet::new();
        let (mut n, mut bytes) = (0usize, 0u64);
        for (pid, entries) in packs {
            let data = self.backend().get(&pack_key(pid)).await?;
            for e in entries.iter() {
                if !referenced.contains(&e.id) || !copied.insert(e.id) {
                    continue;
                }
                let (start, end) = (e.offset as usize, e.offset as usize + e.len as usize);
                let obj = data.get(start..end).ok_or_else(|| {
                    Error::corrupt_object(pack_key(pid), "shorter than its index says")
                })?;
                packer.append(e.id, obj).await?;
                n += 1;
                bytes += u64::from(e.len);
            }
        }
        packer.flush().await?;
        Ok((n, bytes))
    }

    async fn resurrect(&self, id: &ChunkId) -> Result<()> {
        let b = self.backend();
        let (key, fossil) = (self.chunk_key(id), self.fossil_key(id));
        if b.head(&key).await?.is_some() {
            return b.delete(&fossil).await;
        }
        match b.rename(&fossil, &key).await {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }
}

/// What a run does with packs.
#[derive(Debug, Default)]
struct PackPlan {
    /// No chunk referenced: fossilize.
    dead: Vec<(Arc<str>, Arc<Vec<PackEntry>>)>,
    /// Mostly unreferenced: repack, then fossilize.
    sparse: Vec<(Arc<str>, Arc<Vec<PackEntry>>)>,
    /// Fossil packs no collection names (a crash between moving and recording): recorded.
    stray: Vec<String>,
    /// Pack objects without an index: deleted.
    orphans: Vec<String>,
}
