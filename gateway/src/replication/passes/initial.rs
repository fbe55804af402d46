//! Initial replication and finalizing protection.
//!
//! Per disk, a barrier in the change log (every earlier write is then in the image) and a
//! resumable pass over the image ([`super::copy`]); the first point is cut at one common
//! barrier across the VM's disks with a patch of every record logged since each disk's
//! barrier, so it is exactly the disks' state at the cut although the pass read moving disks.
//! A checkpoint is valid only for the chain it was taken on; finalizing verifies the first
//! point before the VM is Protected.

use replica_store::DiskIndex;
use tracing::info;

use super::super::db::{Checkpoint, CheckpointKind, JobKind, Phase, VmRow};
use super::super::engine::{blocking, chain_hex, Engine, ReplError, R};
use super::super::logscan::release_through;
use super::super::now_ms;
use super::super::policy::Policy;
use super::copy::RECOPY_ATTEMPTS;
use crate::changelog::ChangeLog;
use crate::disk::Disk;

impl Engine {
    pub(crate) async fn initial(&self, row: &VmRow, policy: &Policy) -> R<()> {
        let disks = self.disks_of(row)?;
        let ds = &disks;
        let store = self.store().await?;
        let point = self
            .job(&row.name, JobKind::InitialReplication, |job| async move {
                let cs = store.chunk_size() as u64;
                let mut cks = Vec::new();
                for d in ds {
                    let log = match d.change_log() {
                        Some(l) => l,
                        None => self.attach(d).await?,
                    };
                    let valid = self
                        .db(|db| db.checkpoint(&row.name, d.name()))?
                        .filter(|c| {
                            c.kind == CheckpointKind::Initial
                                && c.chain == chain_hex(&log)
                                && log.is_logging()
                        });
                    let ck = match valid {
                        Some(c) => {
                            self.step(
                                job,
                                &format!("resume {}", d.name()),
                                &format!("at chunk {} of {}", c.position, c.total),
                            )?;
                            c
                        }
                        None => {
                            let start = self.start_pass(d, &log).await?;
                            let index = DiskIndex::new(d.size(), cs as u32)?;
                            let c = Checkpoint {
                                vm: row.name.clone(),
                                disk: d.name().to_string(),
                                kind: CheckpointKind::Initial,
                                chain: chain_hex(&log),
                                start_lsn: start,
                                position: 0,
                                total: index.len(),
                                bytes_read: 0,
                                bytes_sent: 0,
                                index: index.to_bytes(),
                                todo: Vec::new(),
                                done: false,
                            };
                            self.db(|db| db.put_checkpoint(&c))?;
                            c
                        }
                    };
                    cks.push(ck);
                }
                let total: u64 = ds.iter().map(|d| d.size()).sum::<u64>().max(1);
                let mut attempt = 0;
                let (meta, cut_ms) = loop {
                    let mut done_before = 0u64;
                    for (d, ck) in ds.iter().zip(cks.iter_mut()) {
                        if !ck.done {
                            self.step(
                                job,
                                &format!("copy {}", d.name()),
                                &format!("{} chunks", ck.total),
                            )?;
                            self.pass(job, row, d, &store, ck, None, policy, done_before, total)
                                .await?;
                        }
                        done_before += d.size();
                    }
                    self.step(job, "cut first recovery point", "")?;
                    let cut_ms = now_ms();
                    match self.cut_point(row, ds, &store, &cks, None).await {
                        Ok(m) => break (m, cut_ms),
                        Err(e) => {
                            attempt += 1;
                            if attempt >= RECOPY_ATTEMPTS || !self.requeue_gone(&mut cks, &e)? {
                                return Err(e);
                            }
                        }
                    }
                };
                let sent: u64 = cks.iter().map(|c| c.bytes_sent).sum();
                self.db(|db| {
                    db.job_progress(
                        job,
                        100.0,
                        &format!(
                            "point {} ; {} bytes sent for {} bytes of disk",
                            meta.id, sent, total
                        ),
                    )
                })?;
                Ok((meta, cut_ms))
            })
            .await?;
        self.point_made(row, &disks, &point.0, Phase::FinalizeProtection, point.1)
            .await
    }

    /// Starts a pass over a disk: a barrier, after which every earlier write is in the image,
    /// and the earlier segments released. Returns the barrier's LSN.
    pub(crate) async fn start_pass(&self, d: &Disk, log: &ChangeLog) -> R<u64> {
        let dc = d.clone();
        let lsn = blocking(move || Disk::cut(&[dc]))
            .await
            .map_err(|e| ReplError::disk(d.name(), e))?[0];
        let l = log.clone();
        blocking(move || release_through(&l, lsn))
            .await
            .map_err(|e| ReplError::log(d.name(), e))?;
        Ok(lsn)
    }

    pub(crate) async fn finalize(&self, row: &VmRow) -> R<()> {
        let store = self.store().await?;
        self.job(&row.name, JobKind::FinalizeProtection, |job| async move {
            self.step(job, "verify first recovery point", &row.last_point)?;
            let p = store.load_point(&row.name, &row.last_point).await?;
            let rep = store.verify_point(&p).await?;
            if !rep.is_ok() {
                return Err(ReplError::InvalidReplica(format!(
                    "first point {} failed verification: {:?}",
                    p.full_id(),
                    rep.bad_objects
                )));
            }
            Ok(())
        })
        .await?;
        self.succeeded(&row.name, |v| {
            if v.phase == Phase::FinalizeProtection {
                v.phase = Phase::Protected;
                v.reason.clear();
            }
        })?;
        info!(vm = %row.name, "VM protected");
        Ok(())
    }
}
