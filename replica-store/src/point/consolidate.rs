//! Background consolidation of a disk's patch chain, and rebasing a later point onto it.
//!
//! A delta point only appends patches to its parent's list and keeps its parent's index
//! object, so a disk's patch chain grows with every cut. Folding the chain into chunks
//! (reading, patching and storing every touched chunk) takes time proportional to the chunks
//! touched; done while cutting, no point is published meanwhile. Instead:
//!
//! 1. [`Store::consolidate`] takes a **published** point `P` and one disk, folds `P`'s patches
//!    into chunks in its own upload session, commits them and writes the folded index as an
//!    index object of its own (`indexes/<vm>/<consolidation-id>/<disk>.idx`). The result,
//!    [`Consolidated`], states: "index I is `P`'s disk with `P`'s first `k` patches applied".
//!    Nothing references I yet; no point changes.
//! 2. A later cut ([`PointBuilder::rebase`]), building on a descendant `L` of `P`, replaces
//!    `L`'s disk — base index `B`, patches `p1..pn` — by I plus `p(k+1)..pn`, if `L`'s base is
//!    still `P`'s base index `B` and `L`'s patch list starts with exactly `P`'s first `k`
//!    patches (a delta only appends, so this holds unless a fold or a resync replaced the
//!    index in between; then the result is discarded). The content is unchanged:
//!    `B + p1..pk + p(k+1)..pn = I + p(k+1)..pn`, since patches apply in order, each over the
//!    result of the previous ones.
//!
//! **GC safety.** The consolidation's chunks and index are referenced by no point until the
//! rebased point is published, exactly like the chunks of any upload session before it
//! publishes. The store's rule for sessions (publish within `max_session_secs` of the
//! session's start, or not at all) therefore carries over: a rebase accepts a consolidation
//! only while it is younger than half of `max_session_secs`, and the rebasing builder takes
//! the consolidation's start as its own, so [`PointBuilder::publish`] refuses past the limit.
//! GC's orphan-index rule deletes unreferenced indexes only after `max_session_secs`, so I is
//! still there when the rebased point refers to it.
//!
//! **Crash safety.** A consolidation that is interrupted, fails, or whose result is never
//! used leaves unreferenced chunks and an orphan index: GC removes them; no point is wrong.

use std::collections::HashSet;
use std::time::Instant;

use crate::chunk::{ChunkId, MAGIC_INDEX};
use crate::error::{Error, Result};
use crate::manifest::DiskIndex;
use crate::store::{now_unix_ms, Store};

use super::{index_key, new_point_id, DiskState, PatchRef, PointBuilder, PointMeta};

/// The result of [`Store::consolidate`]: `index` equals disk `disk` of point `base_point`
/// with its first `covered.len()` patches applied.
#[derive(Debug, Clone)]
pub struct Consolidated {
    /// VM of the point.
    pub vm: String,
    /// The disk.
    pub disk: String,
    /// Id of the point whose patches were folded.
    pub base_point: String,
    /// That point's index object for the disk (the one its patches apply over).
    pub base_index_key: String,
    /// The folded patches, oldest first (a prefix of the point's list).
    pub covered: Vec<PatchRef>,
    /// The folded index.
    pub index: DiskIndex,
    /// Its index object (already stored) and checksum.
    pub index_key: String,
    pub index_checksum: String,
    /// When its upload session started (GC safety, see the module header).
    pub started: Instant,
    /// Chunks rewritten and bytes uploaded.
    pub chunks: u64,
    pub uploaded: u64,
}

impl Consolidated {
    /// Bytes of patch objects this consolidation folded.
    pub fn covered_bytes(&self) -> u64 {
        self.covered.iter().map(|p| p.bytes).sum()
    }
}

impl Store {
    /// Fold the patches of disk `disk` of the published point `point` into chunks, in an
    /// upload session of its own, and store the folded index. See the module header.
    pub async fn consolidate(&self, point: &PointMeta, disk: &str) -> Result<Consolidated> {
        let entry = point.disk(disk)?.clone();
        let mut b = PointBuilder::new(self, &point.vm)?;
        let started = b.started;
        let index = self.load_index(point, disk).await?;
        *b.writer.known.lock().unwrap_or_else(|p| p.into_inner()) = index
            .entries()
            .iter()
            .copied()
            .filter(|e| !e.is_zero())
            .collect::<HashSet<ChunkId>>();
        b.disks.insert(
            disk.to_string(),
            DiskState {
                index,
                source_lsn: entry.source_lsn,
                patches: entry.patches.clone(),
                inherited: None,
                // P's chunks (its index's and those its patches refer to) are referenced by
                // P and by every descendant the result can be rebased into (they share P's
                // index and the covered patches), so none needs adopting.
                adopted: false,
            },
        );
        let (chunks, mut uploaded) = b.fold(disk).await?;
        // The folded chunks are durable before the index naming them is written.
        b.writer.commit().await?;
        let index = b.index(disk)?.clone();
        let id = new_point_id(now_unix_ms());
        let key = index_key(&point.vm, &id, disk);
        uploaded += self
            .put_object_len(MAGIC_INDEX, &key, &index.to_bytes())
            .await?;
        tracing::info!(
            point = %point.full_id(), disk, patches = entry.patches.len(), chunks, uploaded,
            elapsed = ?started.elapsed(), "consolidated patches into chunks"
        );
        Ok(Consolidated {
            vm: point.vm.clone(),
            disk: disk.to_string(),
            base_point: point.id.clone(),
            base_index_key: entry.index_key.clone(),
            covered: entry.patches,
            index_checksum: hex::encode(index.checksum()),
            index,
            index_key: key,
            started,
            chunks,
            uploaded,
        })
    }
}

/// Why [`PointBuilder::rebase`] did not use a consolidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebaseSkipped {
    /// The disk's index is no longer the one the consolidation started from (folded,
    /// resynchronized or resized since).
    OtherBase,
    /// The disk's patch list does not start with the consolidated patches.
    OtherPatches,
    /// The consolidation is older than half the store's `max_session_secs`.
    TooOld,
}

impl std::fmt::Display for RebaseSkipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RebaseSkipped::OtherBase => "the disk's index changed since",
            RebaseSkipped::OtherPatches => "the disk's patches do not start with the folded ones",
            RebaseSkipped::TooOld => "older than half the store's max_session_secs",
        })
    }
}

impl PointBuilder {
    /// Rebase disk `c.disk` onto the consolidation `c` (see the module header): its index
    /// becomes `c`'s and the patches `c` folded are dropped from the front of its list. The
    /// disk's content is unchanged. Returns why not, if `c` does not apply.
    pub fn rebase(&mut self, c: &Consolidated) -> Result<std::result::Result<(), RebaseSkipped>> {
        if c.vm != self.vm {
            return Err(Error::InvalidArgument(format!(
                "consolidation of VM {} offered to a point of VM {}",
                c.vm, self.vm
            )));
        }
        let max = self.store.settings().max_session_secs;
        if c.started.elapsed().as_secs().saturating_mul(2) >= max {
            return Ok(Err(RebaseSkipped::TooOld));
        }
        let d = self.disk_mut(&c.disk)?;
        match &d.inherited {
            Some((key, _)) if *key == c.base_index_key => {}
            _ => return Ok(Err(RebaseSkipped::OtherBase)),
        }
        if d.index.disk_size() != c.index.disk_size()
            || d.index.chunk_size() != c.index.chunk_size()
        {
            return Ok(Err(RebaseSkipped::OtherBase));
        }
        if d.patches.len() < c.covered.len() || d.patches[..c.covered.len()] != c.covered[..] {
            return Ok(Err(RebaseSkipped::OtherPatches));
        }
        d.index = c.index.clone();
        d.patches.drain(..c.covered.len());
        d.inherited = Some((c.index_key.clone(), c.index_checksum.clone()));
        if c.started < self.started {
            // The point now relies on the consolidation's uploads: its session's age counts.
            self.started = c.started;
        }
        self.writer
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(c.index.entries().iter().copied().filter(|e| !e.is_zero()));
        Ok(Ok(()))
    }
}
