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
//! Why this is safe: an upload session that found a chunk present (dedup) or inherited it from
//! a parent may still publish a point referencing it after the mark. Moving it to `fossils/`
//! (instead of deleting) keeps it readable (readers fall back to the fossil key) and makes
//! sessions that start later upload it again. Fossils are deleted only after
//! `max_session_secs`, by which time every session that could reference them has published
//! (sessions refuse to publish after `max_session_secs`) and the next run's mark sees it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, MAGIC_BLOB};
use crate::error::{Error, Result};
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
}

#[derive(Debug, Serialize, Deserialize)]
struct Collection {
    created_unix_ms: u64,
    fossils: Vec<String>,
}

impl Store {
    async fn mark(&self, points: &[PointMeta], into: &mut HashSet<ChunkId>) -> Result<()> {
        let mut futs = Vec::new();
        for p in points {
            for d in &p.disks {
                for r in &d.patches {
                    into.insert(r.chunk_id()?);
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
        for c in &collections {
            let raw = self
                .get_object(MAGIC_BLOB, &c.key, Self::MAX_BLOB_BYTES)
                .await?;
            let col: Collection = serde_json::from_slice(&raw)
                .map_err(|e| Error::corrupt_object(&c.key, e.to_string()))?;
            let old = now_ms.saturating_sub(col.created_unix_ms) >= fossil_delay.as_millis() as u64;
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
            referenced.extend(more);
            seen.extend(later.iter().map(|p| p.full_id()));
            report.points += later.len();
        }
        stray.retain(|id| !referenced.contains(id));
        report.referenced_chunks = referenced.len();
        report.fossilized = candidates.len();
        report.fossilized_bytes = candidates.values().sum();

        // 5. Fossilize.
        if !opts.dry_run && (!candidates.is_empty() || !stray.is_empty()) {
            let col = Collection {
                created_unix_ms: now_ms,
                fossils: candidates
                    .keys()
                    .chain(stray.iter())
                    .map(|id| id.to_hex())
                    .collect(),
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
