//! Delta replication (a Protected VM): first the resync rules (tracking off, a broken or
//! overflowed log, an unshipped log at 50% of the disk), then every interval a cut whose
//! records become patches of a new point (bytes uploaded ≈ bytes written), app-consistent with
//! the freeze and thaw hooks when due, and pruning by retention at most once a minute.
//!
//! Invariant: a cycle with nothing to ship publishes nothing but still marks the replica
//! current (the newest point is the disks' state).

use std::time::{Duration, Instant};

use replica_store::{Consistency, RetentionPolicy};

use super::super::db::{JobKind, Phase, VmRow};
use super::super::engine::{Engine, ReplError, PRUNE_EVERY, R};
use super::super::hooks::run_hook;
use super::super::now_ms;
use super::super::policy::Policy;
use super::super::vm::decay;
use crate::changelog::LogState;

impl Engine {
    pub(crate) async fn protected(&self, row: &VmRow, policy: &Policy) -> R<()> {
        let disks = self.disks_of(row)?;
        let ds = &disks;
        // The resync rules.
        for d in &disks {
            let Some(log) = d.change_log() else {
                return Err(ReplError::NeedsResync {
                    disk: d.name().to_string(),
                    reason: "change tracking is off".into(),
                    full: true,
                });
            };
            let st = log.state();
            if !st.is_healthy() {
                return Err(ReplError::NeedsResync {
                    disk: d.name().to_string(),
                    reason: format!("the change log is {st}"),
                    full: matches!(st, LogState::Broken { .. }),
                });
            }
            if log.unshipped_ratio() >= 0.5 {
                return Err(ReplError::NeedsResync {
                    disk: d.name().to_string(),
                    reason: format!(
                        "unshipped log ({} bytes) reached 50% of the disk size",
                        log.unshipped_bytes()
                    ),
                    full: false,
                });
            }
        }
        let now = now_ms();
        let due = row
            .last_cycle_ms
            .is_none_or(|t| now >= t + policy.interval().as_millis() as u64);
        if !due && row.failures == 0 {
            return Ok(());
        }
        let changed = disks.iter().any(|d| {
            d.change_log().is_some_and(|l| {
                l.active_segment().is_some_and(|a| a.records > 0) || !l.sealed_segments().is_empty()
            })
        });
        let app_due = policy.app_consistent_hours > 0.0
            && row
                .last_app_ms
                .is_none_or(|t| now >= t + (policy.app_consistent_hours * 3_600_000.0) as u64);
        if !changed && !app_due {
            // Nothing to ship: the newest point is still the disks' state.
            self.succeeded(&row.name, |v| {
                v.last_cycle_ms = Some(now);
                v.cycles_due = v.cycles_due.saturating_add(1);
                decay(v);
            })?;
            return Ok(());
        }
        let store = self.store().await?;
        let row2 = row.clone();
        let p = self
            .job(&row.name, JobKind::DeltaReplication, |job| async move {
                self.step(job, "find parent point", &row2.last_point)?;
                let parent = match store.load_point(&row2.name, &row2.last_point).await {
                    Ok(p) => p,
                    Err(e) if e.is_not_found() || !e.is_recoverable() => {
                        return Err(ReplError::NeedsResync {
                            disk: row2.disks.join(","),
                            reason: format!(
                                "the last recovery point {} is not readable in the store ({e}): replica invalid",
                                row2.last_point
                            ),
                            full: false,
                        })
                    }
                    Err(e) => return Err(e.into()),
                };
                let consistency = if app_due {
                    self.step(job, "freeze", "app-consistent point")?;
                    run_hook("freeze", policy.freeze_cmd.as_deref(), &row2.name).await?;
                    Consistency::App
                } else {
                    Consistency::Crash
                };
                self.step(job, "cut and ship", "")?;
                let r = self
                    .cut_point(&row2, ds, &store, &[], Some((&parent, consistency)))
                    .await;
                if app_due {
                    self.step(job, "thaw", "")?;
                    run_hook("thaw", policy.thaw_cmd.as_deref(), &row2.name).await?;
                }
                let p = r?;
                // Pruning lists every point of the VM: at most once a minute.
                let prune_due = {
                    let mut m = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
                    let due = m.get(&row2.name).is_none_or(|t| t.elapsed() >= PRUNE_EVERY);
                    if due {
                        m.insert(row2.name.clone(), Instant::now());
                    }
                    due
                };
                let pr = if prune_due {
                    self.step(job, "prune", &format!("keep {} h", policy.retention_hours))?;
                    let keep = RetentionPolicy {
                        keep_last: Some(1),
                        keep_within: Some(Duration::from_secs_f64(policy.retention_hours * 3600.0)),
                    };
                    store.prune(Some(&row2.name), keep, false).await?
                } else {
                    Default::default()
                };
                let sizes: u64 = p
                    .disks
                    .iter()
                    .flat_map(|d| d.patches.iter())
                    .map(|x| x.bytes)
                    .sum();
                self.db(|db| {
                    db.job_progress(
                        job,
                        100.0,
                        &format!(
                            "point {} ; patch chain {} bytes ; {} points pruned",
                            p.id,
                            sizes,
                            pr.removed.len()
                        ),
                    )
                })?;
                Ok(p)
            })
            .await?;
        self.point_made(row, &disks, &p, Phase::Protected, now)
            .await?;
        self.db(|db| {
            db.modify_vm(&row.name, |v| {
                v.cycles_due = v.cycles_due.saturating_add(1);
                decay(v);
            })
        })?;
        Ok(())
    }
}
