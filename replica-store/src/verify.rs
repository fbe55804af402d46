//! Verify: re-read and re-hash chunks of a point or of the whole store; report missing and
//! corrupt chunks and the points they break.
//!
//! Two passes: the points' indexes are read (which chunks, of what length), then every chunk
//! is fetched and re-hashed, eight at a time. A caller that wants to show progress passes a
//! [`VerifyProgress`]: plain atomic counters the passes bump (one relaxed add per index or
//! chunk, nothing else), read by whoever polls them; the report itself never depends on them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::{self, StreamExt};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::point::PointMeta;
use crate::store::Store;

/// A chunk that could not be verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkProblem {
    /// The chunk.
    pub id: ChunkId,
    /// Why.
    pub reason: String,
    /// Points (`vm/id`) that reference it (empty for an unreferenced chunk).
    pub points: Vec<String>,
}

/// Result of a verification.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Points whose indexes were read.
    pub points_checked: usize,
    /// Chunks read and re-hashed.
    pub chunks_checked: usize,
    /// Plaintext bytes re-hashed.
    pub bytes_checked: u64,
    /// Referenced chunks that are missing.
    pub missing: Vec<ChunkProblem>,
    /// Chunks that failed verification.
    pub corrupt: Vec<ChunkProblem>,
    /// Point or index objects that could not be read, with the reason.
    pub bad_objects: Vec<(String, String)>,
    /// Points (`vm/id`) that cannot be fully restored.
    pub broken_points: Vec<String>,
}

/// Live counters of a running verification (see the module documentation). Totals are known
/// once the indexes are read (`chunks_total` is 0 before).
#[derive(Debug, Default)]
pub struct VerifyProgress {
    /// Points to read.
    pub points_total: AtomicU64,
    /// Points whose indexes were read.
    pub points_read: AtomicU64,
    /// Chunks to fetch and re-hash.
    pub chunks_total: AtomicU64,
    /// Chunks fetched so far (including missing and corrupt ones).
    pub chunks_done: AtomicU64,
    /// Plaintext bytes expected: exact for referenced chunks; an unreferenced chunk (whole-store
    /// verify) counts as one chunk size.
    pub bytes_total: AtomicU64,
    /// Plaintext bytes re-hashed so far.
    pub bytes_checked: AtomicU64,
}

/// A point-in-time copy of [`VerifyProgress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyCounts {
    pub points_total: u64,
    pub points_read: u64,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub bytes_total: u64,
    pub bytes_checked: u64,
}

impl VerifyProgress {
    /// The counters now.
    pub fn counts(&self) -> VerifyCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VerifyCounts {
            points_total: g(&self.points_total),
            points_read: g(&self.points_read),
            chunks_total: g(&self.chunks_total),
            chunks_done: g(&self.chunks_done),
            bytes_total: g(&self.bytes_total),
            bytes_checked: g(&self.bytes_checked),
        }
    }
}

impl VerifyCounts {
    /// Percent done: reading the indexes is the first 5 %, fetching the chunks the rest (by
    /// count: chunks are of one size but the last of a disk, and the byte total is an estimate).
    pub fn percent(&self) -> f64 {
        let ratio = |done: u64, total: u64| {
            if total == 0 {
                0.0
            } else {
                done as f64 / total as f64
            }
        };
        let idx = if self.points_total == 0 && self.chunks_total > 0 {
            1.0
        } else {
            ratio(self.points_read, self.points_total)
        };
        (5.0 * idx + 95.0 * ratio(self.chunks_done, self.chunks_total)).clamp(0.0, 100.0)
    }
}

impl VerifyReport {
    /// True if nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty() && self.bad_objects.is_empty()
    }
}

impl Store {
    /// Verify one point: its indexes and every chunk it references.
    pub async fn verify_point(&self, point: &PointMeta) -> Result<VerifyReport> {
        self.verify_point_with(point, &VerifyProgress::default())
            .await
    }

    /// [`Store::verify_point`], counting into `progress`.
    pub async fn verify_point_with(
        &self,
        point: &PointMeta,
        progress: &VerifyProgress,
    ) -> Result<VerifyReport> {
        self.verify_points(std::slice::from_ref(point), false, progress)
            .await
    }

    /// Verify every point and every chunk object of the store (unreferenced ones too).
    pub async fn verify_all(&self) -> Result<VerifyReport> {
        self.verify_all_with(&VerifyProgress::default()).await
    }

    /// [`Store::verify_all`], counting into `progress`.
    pub async fn verify_all_with(&self, progress: &VerifyProgress) -> Result<VerifyReport> {
        let points = self.list_points(None).await?;
        self.verify_points(&points, true, progress).await
    }

    async fn verify_points(
        &self,
        points: &[PointMeta],
        all_chunks: bool,
        progress: &VerifyProgress,
    ) -> Result<VerifyReport> {
        let mut report = VerifyReport {
            points_checked: points.len(),
            ..Default::default()
        };
        let add = |a: &AtomicU64, n: u64| {
            a.fetch_add(n, Ordering::Relaxed);
        };
        add(&progress.points_total, points.len() as u64);
        // chunk -> (expected length, points)
        let mut refs: BTreeMap<ChunkId, (usize, BTreeSet<String>)> = BTreeMap::new();
        let mut broken: BTreeSet<String> = BTreeSet::new();
        let mut patch_refs: std::collections::HashMap<String, Option<Vec<(ChunkId, u64)>>> =
            std::collections::HashMap::new();
        for p in points {
            for d in &p.disks {
                for r in &d.patches {
                    match r.chunk_id() {
                        Ok(id) => {
                            let e = refs
                                .entry(id)
                                .or_insert((r.bytes as usize, BTreeSet::new()));
                            e.1.insert(p.full_id());
                        }
                        Err(e) => {
                            report.bad_objects.push((r.id.clone(), e.to_string()));
                            broken.insert(p.full_id());
                        }
                    }
                }
                // Chunks the patches refer to (a cut stored them whole); each patch object
                // read once (points share chain prefixes).
                for r in d.patches.iter().filter(|r| r.chunk_refs > 0) {
                    if !patch_refs.contains_key(&r.id) {
                        let got = match self.patch_chunk_refs(std::slice::from_ref(r)).await {
                            Ok(ids) => Some(ids),
                            Err(e) if e.is_recoverable() => return Err(e),
                            // The patch object itself is checked (and reported) as a chunk.
                            Err(_) => None,
                        };
                        patch_refs.insert(r.id.clone(), got);
                    }
                    match &patch_refs[&r.id] {
                        Some(ids) => {
                            for &(id, len) in ids {
                                let e = refs.entry(id).or_insert((len as usize, BTreeSet::new()));
                                e.1.insert(p.full_id());
                            }
                        }
                        None => {
                            broken.insert(p.full_id());
                        }
                    }
                }
                match self.load_index(p, &d.name).await {
                    Ok(idx) => {
                        for (i, id) in idx.entries().iter().enumerate() {
                            if !id.is_zero() {
                                let e = refs
                                    .entry(*id)
                                    .or_insert((idx.chunk_len(i as u64), BTreeSet::new()));
                                e.1.insert(p.full_id());
                            }
                        }
                    }
                    Err(e) if e.is_recoverable() => return Err(e),
                    Err(e) => {
                        report
                            .bad_objects
                            .push((d.index_key.clone(), e.to_string()));
                        broken.insert(p.full_id());
                    }
                }
            }
            add(&progress.points_read, 1);
        }
        let mut todo: Vec<(ChunkId, Option<usize>)> =
            refs.iter().map(|(id, (l, _))| (*id, Some(*l))).collect();
        if all_chunks && self.layout() == crate::pack::Layout::Packs {
            let (live, _) = self.pack_contents().await?;
            let mut seen = BTreeSet::new();
            for e in live.values().flat_map(|es| es.iter()) {
                if !refs.contains_key(&e.id) && seen.insert(e.id) {
                    todo.push((e.id, None));
                }
            }
        }
        if all_chunks {
            for o in self.backend().list("chunks/").await? {
                if let Some(id) = o.key.rsplit('/').next().and_then(ChunkId::from_hex) {
                    if !refs.contains_key(&id) {
                        todo.push((id, None));
                    }
                }
            }
        }
        add(&progress.chunks_total, todo.len() as u64);
        let chunk_size = u64::from(self.chunk_size());
        add(
            &progress.bytes_total,
            todo.iter()
                .map(|(_, l)| l.map_or(chunk_size, |l| l as u64))
                .sum(),
        );
        let mut results = stream::iter(todo)
            .map(|(id, len)| async move { (id, self.get_chunk(&id, len).await) })
            .buffer_unordered(8);
        while let Some((id, r)) = results.next().await {
            let pts = || {
                refs.get(&id)
                    .map(|(_, s)| s.iter().cloned().collect())
                    .unwrap_or_default()
            };
            add(&progress.chunks_done, 1);
            match r {
                Ok(b) => {
                    report.chunks_checked += 1;
                    report.bytes_checked += b.len() as u64;
                    add(&progress.bytes_checked, b.len() as u64);
                }
                Err(Error::MissingChunk { .. }) => {
                    let points: Vec<String> = pts();
                    broken.extend(points.iter().cloned());
                    report.missing.push(ChunkProblem {
                        id,
                        reason: "missing".into(),
                        points,
                    });
                }
                Err(Error::CorruptChunk { reason, .. }) => {
                    report.chunks_checked += 1;
                    let points: Vec<String> = pts();
                    broken.extend(points.iter().cloned());
                    report.corrupt.push(ChunkProblem { id, reason, points });
                }
                Err(e) => return Err(e),
            }
        }
        report.missing.sort_by_key(|p| p.id);
        report.corrupt.sort_by_key(|p| p.id);
        report.broken_points = broken.into_iter().collect();
        Ok(report)
    }
}
