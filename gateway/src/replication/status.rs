//! Read models of the replication state: what `standby status`, the HTTP API and `/metrics`
//! show of a VM, a job and an attachment, computed in one place from the state database.
//!
//! Field names are part of the API (`GET /api/v1/vms`, `docs/api.md`): add fields, never rename
//! them. Times are Unix milliseconds (`*_ms`), durations seconds (`*_seconds`), sizes bytes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::db::{
    Attachment, AttachmentState, Db, DbError, JobKind, JobRow, JobState, Phase, StepRow, StepState,
    VmRow,
};
use super::health::{evaluate, Health, HealthInput};
use super::policy::Policy;
use crate::failover::replica::OverlayKind;

/// Health as the API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Normal,
    Warning,
    Critical,
}

impl From<Health> for HealthState {
    fn from(h: Health) -> Self {
        match h {
            Health::Normal => Self::Normal,
            Health::Warning => Self::Warning,
            Health::Critical => Self::Critical,
        }
    }
}

impl HealthState {
    /// 0 normal, 1 warning, 2 critical (the `standby_vm_health` gauge).
    pub fn level(self) -> i64 {
        self as i64
    }
}

/// One disk of a VM as the engine last reported it.
#[derive(Debug, Clone, Serialize)]
pub struct VmDiskStatus {
    pub name: String,
    /// None until `standby serve` reported the disk.
    pub size_bytes: Option<u64>,
    /// Change-log bytes not yet shipped to the store.
    pub backlog_bytes: Option<u64>,
    pub log_state: Option<String>,
    pub reported_ms: Option<u64>,
}

/// One protected VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub state: Phase,
    /// Percent done of initial replication or resynchronization.
    pub progress_percent: f64,
    /// Why the VM is ResyncRequired or Critical.
    pub reason: String,
    pub health: HealthState,
    pub health_reasons: Vec<String>,
    /// Seconds since the replica was last current; None before the first point.
    pub rpo_seconds: Option<f64>,
    pub last_point: Option<String>,
    pub last_point_ms: Option<u64>,
    pub last_cycle_ms: Option<u64>,
    pub last_error: String,
    /// Consecutive failures of the current step.
    pub failures: u32,
    pub next_retry_ms: Option<u64>,
    pub disks: Vec<VmDiskStatus>,
}

fn to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Health and its reasons, as `standby status` shows them: the VM's row as a
/// [`HealthInput`], judged by [`evaluate`].
pub fn vm_health(v: &VmRow, policy: &Policy, now: SystemTime) -> (Health, Vec<String>) {
    let retry = v.retry();
    evaluate(&HealthInput {
        now,
        interval: policy.interval(),
        newest_point: v.last_cycle_ms.map(to_time),
        cycles_due: v.cycles_due,
        cycles_missed: v.cycles_missed,
        halted: retry.halted,
        first_point_pending: matches!(
            v.phase,
            Phase::EnablingProtection | Phase::InitialReplication | Phase::FinalizeProtection
        ),
        resync: matches!(v.phase, Phase::ResyncRequired | Phase::Resyncing)
            .then(|| v.reason.clone()),
        last_step_failed: retry.last_error.is_some(),
    })
}

/// The status of one VM.
pub fn vm_status(db: &Db, v: VmRow, policy: &Policy) -> Result<VmStatus, DbError> {
    let now = SystemTime::now();
    let now_ms = super::now_ms();
    let (health, health_reasons) = vm_health(&v, policy, now);
    let stats = db.disk_stats(&v.name)?;
    let disks = v
        .disks
        .iter()
        .map(|name| {
            let s = stats.iter().find(|s| &s.disk == name);
            VmDiskStatus {
                name: name.clone(),
                size_bytes: s.map(|s| s.size),
                backlog_bytes: s.map(|s| s.backlog),
                log_state: s.map(|s| s.log_state.clone()),
                reported_ms: s.map(|s| s.updated_ms),
            }
        })
        .collect();
    Ok(VmStatus {
        state: v.phase,
        progress_percent: v.progress,
        reason: v.reason,
        health: health.into(),
        health_reasons,
        rpo_seconds: v
            .last_cycle_ms
            .map(|t| now_ms.saturating_sub(t) as f64 / 1000.0),
        last_point: (!v.last_point.is_empty()).then_some(v.last_point),
        last_point_ms: v.last_point_ms,
        last_cycle_ms: v.last_cycle_ms,
        last_error: v.last_error,
        failures: v.failures,
        next_retry_ms: v.next_retry_ms,
        disks,
        name: v.name,
    })
}

/// Every protected VM.
pub fn vm_statuses(db: &Db) -> Result<Vec<VmStatus>, DbError> {
    let policy = db.policy()?;
    db.vms()?
        .into_iter()
        .map(|v| vm_status(db, v, &policy))
        .collect()
}

/// A job step.
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    pub seq: i64,
    pub name: String,
    pub state: StepState,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub detail: String,
}

impl From<StepRow> for StepView {
    fn from(s: StepRow) -> Self {
        Self {
            seq: s.seq,
            name: s.name,
            state: s.state,
            started_ms: s.started_ms,
            finished_ms: s.finished_ms,
            detail: s.detail,
        }
    }
}

/// A replication, failover or store job.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: i64,
    /// None (JSON null) for a job of the whole site: a store verification.
    pub vm: Option<String>,
    pub kind: JobKind,
    pub state: JobState,
    pub progress_percent: f64,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    pub duration_seconds: f64,
    pub detail: String,
    pub error: String,
    /// Only in the detail of one job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepView>>,
    /// Only in the detail of one job that reports them: the figures behind
    /// `progress_percent` (store verify: points, chunks and bytes checked and their totals).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts: Option<serde_json::Value>,
    /// Only in the detail of one finished job that has an outcome (store verify: the
    /// verification report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl JobView {
    /// The detail of one job: its steps, live figures and outcome.
    pub fn detail(db: &Db, j: JobRow, steps: Vec<StepRow>) -> Result<JobView, DbError> {
        let (counts, result) = db.job_data(j.id)?;
        // Written by this program as JSON; a damaged document reads as its text.
        let parse = |t: String| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t));
        let mut v = JobView::from(j);
        v.steps = Some(steps.into_iter().map(StepView::from).collect());
        v.counts = counts.map(parse);
        v.result = result.map(parse);
        Ok(v)
    }
}

impl From<JobRow> for JobView {
    fn from(j: JobRow) -> Self {
        let end = j.finished_ms.unwrap_or_else(super::now_ms);
        Self {
            duration_seconds: end.saturating_sub(j.created_ms) as f64 / 1000.0,
            id: j.id,
            vm: (!j.vm.is_empty()).then_some(j.vm),
            kind: j.kind,
            state: j.state,
            progress_percent: j.progress,
            created_ms: j.created_ms,
            finished_ms: j.finished_ms,
            detail: j.detail,
            error: j.error,
            steps: None,
            counts: None,
            result: None,
        }
    }
}

/// A recovery point served as an export (attach, test failover, failover).
#[derive(Debug, Clone, Serialize)]
pub struct AttachmentView {
    pub export: String,
    pub vm: String,
    pub disk: String,
    pub point: String,
    pub writable: bool,
    /// attach, test or failover.
    pub kind: OverlayKind,
    pub state: AttachmentState,
    pub error: String,
    /// Hydration of a failed-over disk, percent.
    pub hydrated_percent: f64,
    pub created_ms: u64,
    pub served_ms: Option<u64>,
    /// Process id of a launched test-failover VM.
    pub pid: Option<u32>,
    /// That VM process: running or how it exited, its log
    /// ([`crate::failover::test_vm::attachment_views`] fills it in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_process: Option<crate::failover::test_vm::VmProcess>,
}

impl From<Attachment> for AttachmentView {
    fn from(a: Attachment) -> Self {
        Self {
            export: a.export,
            vm: a.vm,
            disk: a.disk,
            point: a.point,
            writable: a.rw,
            kind: a.kind,
            state: a.state,
            error: a.error,
            hydrated_percent: a.progress,
            created_ms: a.created_ms,
            served_ms: a.served_ms,
            pid: a.pid,
            vm_process: None,
        }
    }
}

/// A disk of a recovery point.
#[derive(Debug, Clone, Serialize)]
pub struct PointDiskView {
    pub name: String,
    pub size_bytes: u64,
    /// Change-log position the point was cut at.
    pub source_lsn: u64,
}

/// A recovery point in the store.
#[derive(Debug, Clone, Serialize)]
pub struct PointView {
    pub vm: String,
    pub id: String,
    pub created_ms: u64,
    /// crash or app.
    pub consistency: replica_store::Consistency,
    pub parent: Option<String>,
    pub disks: Vec<PointDiskView>,
}

impl From<replica_store::PointMeta> for PointView {
    fn from(p: replica_store::PointMeta) -> Self {
        Self {
            disks: p
                .disks
                .iter()
                .map(|d| PointDiskView {
                    name: d.name.clone(),
                    size_bytes: d.size,
                    source_lsn: d.source_lsn,
                })
                .collect(),
            vm: p.vm,
            id: p.id,
            created_ms: p.created_unix_ms,
            consistency: p.consistency,
            parent: p.parent,
        }
    }
}
