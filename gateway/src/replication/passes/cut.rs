//! Cutting and publishing a point: one barrier across all of a VM's disks (a write
//! acknowledged on one disk before a write on another starts is never missing from a point
//! holding the second), a patch per disk of the records since its parent point or pass, the
//! point published, and only then the shipped segments released. A disk's patch goes to the
//! store through [`PointBuilder::add_patch`]: chunks the interval rewrote whole are stored as
//! chunks there (encoded once; a later fold only updates the index), the rest as patch data.
//!
//! Patch chains are kept short off the cut path ([`super::super::consolidate`]): a cut first
//! rebases each disk onto a finished background consolidation (if it still applies), appends
//! its patch, folds inline only past the hard limit, publishes, and then starts a background
//! consolidation of the point it published for the disks past the soft limit.
//!
//! Invariants: a delta's parent must be on the same log chain as the disk (otherwise the VM
//! needs a resync); segments are released only through the LSN the published point records;
//! a point's content is the same whatever consolidations ran.

use replica_store::{Consistency, DiskIndex, PointBuilder, PointMeta, Store};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::super::consolidate::{chain_action, ChainAction};
use super::super::db::{Checkpoint, Phase, VmRow};
use super::super::engine::{blocking, chain_hex, Engine, ReplError, R};
use super::super::logscan::{patch_from_log, release_through};
use crate::disk::Disk;

impl Engine {
    /// Cuts all of a VM's disks at one barrier and publishes a point. With `parent`, the
    /// point derives from it (delta); without, each disk's index comes from its checkpoint
    /// (initial replication, resync). Each disk gets a patch of the records logged after its
    /// checkpoint's start (or the parent's LSN).
    pub(crate) async fn cut_point(
        &self,
        row: &VmRow,
        disks: &[Disk],
        store: &Store,
        cks: &[Checkpoint],
        parent: Option<(&PointMeta, Consistency)>,
    ) -> R<PointMeta> {
        let t0 = Instant::now();
        let dv: Vec<Disk> = disks.to_vec();
        let lsns = blocking(move || Disk::cut(&dv))
            .await
            .map_err(|e| ReplError::disk(&row.name, e))?;
        let t_barrier = t0.elapsed();
        let mut b = match parent {
            Some((p, consistency)) => {
                let mut b = PointBuilder::from_parent(store, p).await?;
                b.set_consistency(consistency);
                b
            }
            None => PointBuilder::new(store, &row.name)?,
        };
        let policy = self.db(|d| d.policy())?;
        // Finished background consolidations (offered once; a resync's cut has no use for them).
        let ready = self.consolidations.take_ready(&row.name);
        let (mut t_read, mut t_store) = (Duration::ZERO, Duration::ZERO);
        let mut consolidate = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let log = self.log_of(d)?;
            let chain = chain_hex(&log);
            let after = match parent {
                Some((p, _)) => {
                    let entry = p.disk(d.name()).map_err(|_| {
                        ReplError::InvalidReplica(format!(
                            "point {} has no disk {}",
                            p.full_id(),
                            d.name()
                        ))
                    })?;
                    if p.labels.get(&format!("chain.{}", d.name())) != Some(&chain) {
                        return Err(ReplError::NeedsResync {
                            disk: d.name().to_string(),
                            reason: "the change log restarted since the last recovery point".into(),
                            full: false,
                        });
                    }
                    entry.source_lsn
                }
                None => {
                    let ck = &cks[i];
                    b.add_disk(d.name(), d.size())?;
                    b.set_index(d.name(), DiskIndex::from_bytes(&ck.index, "checkpoint")?)?;
                    ck.start_lsn
                }
            };
            if parent.is_some() {
                for c in ready.iter().filter(|c| c.disk == d.name()) {
                    match b.rebase(c)? {
                        Ok(()) => info!(vm = %row.name, disk = %d.name(), base = %c.base_point,
                            folded_patches = c.covered.len(), folded_bytes = c.covered_bytes(),
                            "rebased onto a background consolidation"),
                        Err(why) => info!(vm = %row.name, disk = %d.name(), base = %c.base_point,
                            %why, "background consolidation no longer applies; dropped"),
                    }
                }
            }
            let upto = lsns[i];
            let l = log.clone();
            let size = d.size();
            let t = Instant::now();
            let patch = blocking(move || patch_from_log(&l, after, upto, size))
                .await
                .map_err(|e| ReplError::log(d.name(), e))?;
            t_read += t.elapsed();
            let t = Instant::now();
            if !patch.is_empty() {
                b.add_patch(d.name(), patch).await?;
            }
            t_store += t.elapsed();
            let patches = b.patches(d.name())?;
            let pb: u64 = patches.iter().map(|p| p.bytes).sum();
            match chain_action(pb, patches.len(), policy.fold_patch_bytes) {
                ChainAction::Keep => {}
                ChainAction::Consolidate => consolidate.push(d.name().to_string()),
                ChainAction::FoldInline => {
                    let (n, up) = b.fold(d.name()).await?;
                    warn!(vm = %row.name, disk = %d.name(), chunks = n, uploaded = up, chain_bytes = pb,
                        "patch chain past the hard limit: folded inline (writes outpace background consolidation)");
                }
            }
            b.set_source_lsn(d.name(), upto)?;
            b.set_label(&format!("chain.{}", d.name()), &chain);
        }
        let t = Instant::now();
        let p = b.publish().await?;
        debug!(vm = %row.name, barrier = ?t_barrier, read_log = ?t_read, store_patches = ?t_store,
            publish = ?t.elapsed(), total = ?t0.elapsed(), "cut timings");
        self.consolidations.start(store, &p, consolidate);
        Ok(p)
    }

    /// After a point is published: record it, then release the shipped segments.
    /// `cut_ms`: when the cut began (the replica is current as of then).
    pub(crate) async fn point_made(
        &self,
        row: &VmRow,
        disks: &[Disk],
        p: &PointMeta,
        next: Phase,
        cut_ms: u64,
    ) -> R<()> {
        let now = cut_ms;
        self.db(|db| {
            db.clear_checkpoints(&row.name)?;
            let up = p.upload.unwrap_or_default();
            db.add_upload(&row.name, 1, up.puts, up.bytes)?;
            db.modify_vm(&row.name, |v| {
                if v.phase == row.phase {
                    v.phase = next;
                    v.progress = 100.0;
                }
                let mut r = v.retry();
                r.succeed();
                v.set_retry(&r);
                v.last_point = p.id.clone();
                v.last_point_ms = Some(p.created_unix_ms);
                v.last_cycle_ms = Some(now);
                if p.consistency == Consistency::App {
                    v.last_app_ms = Some(now);
                }
            })
            .map(|_| ())
        })?;
        for d in disks {
            let Ok(entry) = p.disk(d.name()) else {
                continue;
            };
            let lsn = entry.source_lsn;
            let log = self.log_of(d)?;
            blocking(move || release_through(&log, lsn))
                .await
                .map_err(|e| ReplError::log(d.name(), e))?;
        }
        Ok(())
    }
}
