//! Cutting and publishing a point: one barrier across all of a VM's disks (a write
//! acknowledged on one disk before a write on another starts is never missing from a point
//! holding the second), a patch per disk of the records since its parent point or pass, the
//! point published, and only then the shipped segments released.
//!
//! Invariants: a delta's parent must be on the same log chain as the disk (otherwise the VM
//! needs a resync); segments are released only through the LSN the published point records.

use replica_store::{Consistency, DiskIndex, PointBuilder, PointMeta, Store};
use tracing::info;

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
        let dv: Vec<Disk> = disks.to_vec();
        let lsns = blocking(move || Disk::cut(&dv))
            .await
            .map_err(|e| ReplError::disk(&row.name, e))?;
        let mut b = match parent {
            Some((p, consistency)) => {
                let mut b = PointBuilder::from_parent(store, p).await?;
                b.set_consistency(consistency);
                b
            }
            None => PointBuilder::new(store, &row.name)?,
        };
        let policy = self.db(|d| d.policy())?;
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
            let upto = lsns[i];
            let l = log.clone();
            let size = d.size();
            let patch = blocking(move || patch_from_log(&l, after, upto, size))
                .await
                .map_err(|e| ReplError::log(d.name(), e))?;
            if !patch.is_empty() {
                b.add_patch(d.name(), patch).await?;
            }
            let pb: u64 = b.patches(d.name())?.iter().map(|p| p.bytes).sum();
            if pb > policy.fold_patch_bytes {
                let (n, up) = b.fold(d.name()).await?;
                info!(vm = %row.name, disk = %d.name(), chunks = n, uploaded = up, "folded patches into chunks");
            }
            b.set_source_lsn(d.name(), upto)?;
            b.set_label(&format!("chain.{}", d.name()), &chain);
        }
        Ok(b.publish().await?)
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
