//! The per-VM state machine: each tick reads the VM's row and runs the step its phase calls
//! for (enable protection, initial replication, finalize, delta replication, resync), then
//! records the outcome.
//!
//! Invariants: a step runs only when [`super::retry::RetryState::due`] says so (never while
//! Critical or before the next attempt); a failure is recorded with
//! [`super::retry::RetryState::fail`] — recoverable ones retry on the back-off schedule,
//! non-recoverable ones make the VM Critical with the phase to resume, and a log that cannot
//! carry the changes makes it ResyncRequired (not a failure); an admin's change to the VM
//! while a step ran wins over the step's outcome. Every step is a job with steps in the
//! database.

use super::db::{DbError, JobKind, JobState, Phase, VmRow};
use super::engine::{Engine, ReplError, R};
use super::now_ms;
use super::policy::{local_minute_of_day, Policy};
use super::retry::RetryState;
use crate::disk::Disk;

impl Engine {
    pub(crate) fn disks_of(&self, row: &VmRow) -> R<Vec<Disk>> {
        row.disks
            .iter()
            .map(|n| {
                self.live_disks()
                    .get(n)
                    .cloned()
                    .ok_or_else(|| ReplError::DiskNotServed(n.clone()))
            })
            .collect()
    }

    pub(crate) async fn tick(&self, row: VmRow) -> R<()> {
        let policy = self.db(|d| d.policy())?;
        let now = now_ms();
        // Halted (Critical) or waiting for its next attempt.
        if !row.retry().due(std::time::SystemTime::now()) {
            return Ok(());
        }
        let r = match row.phase {
            Phase::EnablingProtection => self.enable(&row, &policy).await,
            Phase::InitialReplication => {
                if policy
                    .initial_start_unix
                    .is_some_and(|t| now < t.saturating_mul(1000))
                {
                    return Ok(());
                }
                self.initial(&row, &policy).await
            }
            Phase::FinalizeProtection => self.finalize(&row).await,
            Phase::Protected => self.protected(&row, &policy).await,
            Phase::ResyncRequired => {
                let minute = local_minute_of_day((now / 1000) as i64);
                if row.resync_now || policy.in_resync_window(minute) {
                    self.db(|d| {
                        d.modify_vm(&row.name, |v| {
                            if v.phase == Phase::ResyncRequired {
                                v.phase = Phase::Resyncing;
                                v.progress = 0.0;
                            }
                        })
                    })?;
                }
                return Ok(());
            }
            Phase::Resyncing => self.resync(&row, &policy).await,
            Phase::Critical => Ok(()),
        };
        match r {
            Ok(()) => Ok(()),
            Err(ReplError::Shutdown) => Ok(()),
            Err(e) => {
                self.failed(&row, &policy, &e)?;
                Err(e)
            }
        }
    }

    /// Records a failed step: retry later, resync, or Critical.
    pub(crate) fn failed(
        &self,
        row: &VmRow,
        policy: &Policy,
        e: &ReplError,
    ) -> Result<(), DbError> {
        let msg = e.to_string();
        let sched = policy.retry_schedule();
        self.db(|d| {
            d.modify_vm(&row.name, |v| {
                if v.phase != row.phase {
                    // An admin changed the VM meanwhile (resync, resume): theirs wins.
                    return;
                }
                if let ReplError::NeedsResync { full, reason, .. } = e {
                    // Not a failure to retry: the VM changes phase (the message stays shown).
                    if v.phase != Phase::Resyncing {
                        v.phase = Phase::ResyncRequired;
                        v.reason = reason.clone();
                    }
                    v.resync_full |= *full;
                    v.set_retry(&RetryState {
                        last_error: Some(msg.clone()),
                        ..RetryState::default()
                    });
                    return;
                }
                let mut r = v.retry();
                r.fail(&sched, e.class(), msg.clone(), std::time::SystemTime::now());
                v.set_retry(&r);
                if r.halted {
                    v.resume_phase = Some(v.phase);
                    v.phase = Phase::Critical;
                    v.reason = msg.clone();
                } else if v.phase == Phase::Protected {
                    v.cycles_missed = v.cycles_missed.saturating_add(1);
                }
            })
        })?;
        Ok(())
    }

    pub(crate) fn succeeded(&self, vm: &str, f: impl FnOnce(&mut VmRow)) -> Result<VmRow, DbError> {
        self.db(|d| {
            d.modify_vm(vm, |v| {
                let mut r = v.retry();
                r.succeed();
                v.set_retry(&r);
                f(v);
            })
        })
    }

    /// Runs `body` as a job: finished as succeeded or failed with the error.
    pub(crate) async fn job<T, F: std::future::Future<Output = R<T>>>(
        &self,
        vm: &str,
        kind: JobKind,
        body: impl FnOnce(i64) -> F,
    ) -> R<T> {
        let id = self.db(|d| d.start_job(vm, kind))?;
        let r = body(id).await;
        let _ = self.db(|d| match &r {
            Ok(_) => d.finish_job(id, JobState::Succeeded, "", ""),
            Err(ReplError::Shutdown) => {
                d.finish_job(id, JobState::Interrupted, "", "gateway stopping")
            }
            Err(e) => d.finish_job(id, JobState::Failed, "", &e.to_string()),
        });
        r
    }

    pub(crate) fn step(&self, job: i64, name: &str, detail: &str) -> R<()> {
        self.db(|d| d.step(job, name, detail))?;
        Ok(())
    }
}

/// Halves the cycle counters now and then so health reflects recent cycles.
pub(crate) fn decay(v: &mut VmRow) {
    if v.cycles_due >= 100 {
        v.cycles_due /= 2;
        v.cycles_missed /= 2;
    }
}
