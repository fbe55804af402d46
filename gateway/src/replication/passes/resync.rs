//! Resynchronization: the log restarts as a new chain, and only the chunks that may differ
//! from the replica are read and hashed — those the old log and the dirty bitmap name and
//! those the last point patches, or every chunk when no record can be trusted (a broken
//! chain, a lost bitmap, `--full`). Chunks whose digest equals the replica index's are not
//! sent; the point is cut as after initial replication.
//!
//! Invariant: the scan of the old log's tail, the bitmap and the restart happen while writes
//! are held back, so no write falls between the old chain and the new one.

use std::collections::BTreeSet;

use replica_store::DiskIndex;
use tracing::info;

use super::super::db::{Checkpoint, CheckpointKind, JobKind, Phase, VmRow};
use super::super::engine::{blocking, chain_hex, Engine, ReplError, R};
use super::super::logscan::{chunks_in_log, restart};
use super::super::now_ms;
use super::super::policy::Policy;
use super::copy::RECOPY_ATTEMPTS;
use crate::changelog::ship::Reach;
use crate::changelog::{ChangeLog, LogError, LogState};
use crate::disk::Disk;

impl Engine {
    pub(crate) async fn resync(&self, row: &VmRow, policy: &Policy) -> R<()> {
        let disks = self.disks_of(row)?;
        let ds = &disks;
        let store = self.store().await?;
        let row2 = row.clone();
        let p = self
            .job(&row.name, JobKind::Resync, |job| async move {
                let row = &row2;
                let cs = store.chunk_size() as u64;
                let parent = match store.latest_point(&row.name).await? {
                    Some(p) if p.disks.iter().all(|e| row.disks.contains(&e.name)) => Some(p),
                    _ => None,
                };
                let mut cks = Vec::new();
                let mut bases = Vec::new();
                for d in ds {
                    let log = match d.change_log() {
                        Some(l) => l,
                        None => self.attach(d).await?,
                    };
                    let (base, patched) = match &parent {
                        Some(p) if p.disk(d.name()).is_ok_and(|e| e.size == d.size()) => {
                            let (idx, patch) = store.load_disk(p, d.name()).await?;
                            (idx, patch.touched_chunks(cs))
                        }
                        _ => (DiskIndex::new(d.size(), cs as u32)?, BTreeSet::new()),
                    };
                    let valid = self.db(|db| db.checkpoint(&row.name, d.name()))?.filter(|c| {
                        c.kind == CheckpointKind::Resync && c.chain == chain_hex(&log) && log.is_logging()
                    });
                    let ck = match valid {
                        Some(c) => {
                            self.step(job, &format!("resume {}", d.name()), &format!("{} of {}", c.position, c.total))?;
                            c
                        }
                        None => {
                            self.step(job, &format!("restart change log of {}", d.name()), "")?;
                            let entry = parent.as_ref().and_then(|p| p.disk(d.name()).ok());
                            let same_chain = parent.as_ref().is_some_and(|p| {
                                p.labels.get(&format!("chain.{}", d.name())) == Some(&chain_hex(&log))
                            });
                            let after = match (entry, same_chain) {
                                (Some(e), true) => Some(e.source_lsn),
                                _ => None,
                            };
                            let full_wanted = row.resync_full || parent.is_none() || after.is_none();
                            let (todo, full) =
                                self.restart_log(d, &log, after, full_wanted, cs).await?;
                            let mut todo: BTreeSet<u64> = todo;
                            todo.extend(patched.iter().copied());
                            let todo_bytes: Vec<u8> = if full {
                                Vec::new()
                            } else {
                                todo.iter().flat_map(|c| c.to_le_bytes()).collect()
                            };
                            let nchunks = base.len();
                            self.step(
                                job,
                                &format!("compare {}", d.name()),
                                &if full {
                                    format!("all {nchunks} chunks (full comparison: {})", if row.resync_full { "requested, or the chain broke" } else { "no trustworthy change record" })
                                } else {
                                    format!("{} of {nchunks} chunks changed per log and bitmap", todo.len())
                                },
                            )?;
                            let c = Checkpoint {
                                vm: row.name.clone(),
                                disk: d.name().to_string(),
                                kind: CheckpointKind::Resync,
                                chain: chain_hex(&log),
                                start_lsn: 0,
                                position: 0,
                                total: if full { nchunks } else { todo.len() as u64 },
                                bytes_read: 0,
                                bytes_sent: 0,
                                index: base.to_bytes(),
                                todo: todo_bytes,
                                done: false,
                            };
                            // An empty todo list means a full pass: mark done at once instead.
                            let mut c = c;
                            if !full && todo.is_empty() {
                                c.done = true;
                            }
                            self.db(|db| db.put_checkpoint(&c))?;
                            c
                        }
                    };
                    cks.push(ck);
                    bases.push((base, patched));
                }
                let total: u64 = ds.iter().map(|d| d.size()).sum::<u64>().max(1);
                let mut attempt = 0;
                let (p, cut_ms) = loop {
                    let mut before = 0;
                    for ((d, ck), base) in ds.iter().zip(cks.iter_mut()).zip(bases.iter()) {
                        if !ck.done {
                            self.step(job, &format!("send differing chunks of {}", d.name()), "")?;
                            self.pass(job, row, d, &store, ck, Some(base), policy, before, total).await?;
                        }
                        before += d.size();
                    }
                    self.step(job, "cut recovery point", "")?;
                    let cut_ms = now_ms();
                    match self.cut_point(row, ds, &store, &cks, None).await {
                        Ok(p) => break (p, cut_ms),
                        Err(e) => {
                            attempt += 1;
                            if attempt >= RECOPY_ATTEMPTS || !self.requeue_gone(&mut cks, &e)? {
                                return Err(e);
                            }
                        }
                    }
                };
                let sent: u64 = cks.iter().map(|c| c.bytes_sent).sum();
                let read: u64 = cks.iter().map(|c| c.bytes_read).sum();
                let summary = format!(
                    "point {} ; resync read {read} bytes, sent {sent} bytes for {total} bytes of disk ({:.2}%)",
                    p.id,
                    100.0 * sent as f64 / total as f64
                );
                self.db(|db| db.job_progress(job, 100.0, &summary))?;
                Ok((p, summary, cut_ms))
            })
            .await?;
        let (p, summary, cut_ms) = (p.0, p.1, p.2);
        self.point_made(row, &disks, &p, Phase::Protected, cut_ms)
            .await?;
        self.succeeded(&row.name, |v| {
            if v.phase == Phase::Protected {
                v.reason.clear();
                v.resync_now = false;
                v.resync_full = false;
            }
        })?;
        info!(vm = %row.name, "{summary}");
        Ok(())
    }

    /// Starts a new log chain on a disk and returns the chunks that may differ from the
    /// replica (everything logged after `after`, plus the dirty bitmap) — or `full` when no
    /// trustworthy record exists.
    pub(crate) async fn restart_log(
        &self,
        d: &Disk,
        log: &ChangeLog,
        after: Option<u64>,
        full_wanted: bool,
        cs: u64,
    ) -> R<(BTreeSet<u64>, bool)> {
        let dirty = d.dirty_map();
        let (l, dc) = (log.clone(), d.clone());
        let r = blocking(move || -> Result<(BTreeSet<u64>, bool), LogError> {
            let mut full = full_wanted || matches!(l.state(), LogState::Broken { .. });
            let mut todo = BTreeSet::new();
            if !full {
                // Scan what is logged so far (writes continue meanwhile) ...
                let (set, last) = chunks_in_log(&l, after.unwrap_or(0), cs, Reach::Live)?;
                todo = set;
                // ... then hold writes back, scan the rest and restart the chain.
                dc.with_writes_paused(|| -> Result<(), LogError> {
                    let (rest, _) = chunks_in_log(&l, last, cs, Reach::Quiesced)?;
                    todo.extend(rest);
                    if let Some(m) = &dirty {
                        if !m.trusted() && !l.is_logging() {
                            full = true;
                        }
                        todo.extend(m.dirty_chunks(cs));
                    }
                    restart(&l, dirty.as_deref())
                })?;
            } else {
                dc.with_writes_paused(|| restart(&l, dirty.as_deref()))?;
            }
            Ok((todo, full))
        })
        .await
        .map_err(|e| ReplError::log(d.name(), e))?;
        Ok(r)
    }
}
