//! Replication figures read from the state database at each scrape: per VM (state, health,
//! RPO, last point time, progress, consecutive failures, points published and the objects and
//! bytes they wrote to the store, summed from each point's upload record as it is
//! published), per protected disk (size and change log bytes not yet shipped) and per job kind
//! (finished jobs by outcome, their durations, jobs running now).
//!
//! VM and disk gauges are cleared and refilled on each scrape, so an unprotected VM's series
//! disappear. Finished jobs are counted once each: the ids already counted are remembered
//! (only those still in the job history, so the set stays bounded), and a job that finished
//! between two scrapes is counted at the next one.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::replication::db::{Db, DbError, MAX_FINISHED_JOBS};
use crate::replication::status::vm_statuses;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VmLabel {
    pub vm: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VmState {
    pub vm: String,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VmDisk {
    pub vm: String,
    pub disk: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct JobKind {
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct JobOutcome {
    pub kind: String,
    pub state: String,
}

type FGauge = Gauge<f64, AtomicU64>;

fn job_histogram() -> Histogram {
    // 0.1 s .. ~7 h.
    Histogram::new(exponential_buckets(0.1, 4.0, 9))
}

pub struct StateMetrics {
    vm_state: Family<VmState, Gauge>,
    vm_health: Family<VmLabel, Gauge>,
    vm_rpo: Family<VmLabel, FGauge>,
    vm_last_point: Family<VmLabel, FGauge>,
    vm_progress: Family<VmLabel, FGauge>,
    vm_failures: Family<VmLabel, Gauge>,
    vm_points: Family<VmLabel, Counter>,
    vm_upload_requests: Family<VmLabel, Counter>,
    vm_uploaded: Family<VmLabel, Counter>,
    disk_size: Family<VmDisk, Gauge>,
    disk_unshipped: Family<VmDisk, Gauge>,
    jobs_running: Family<JobKind, Gauge>,
    jobs_finished: Family<JobOutcome, Counter>,
    job_duration: Family<JobKind, Histogram, fn() -> Histogram>,
    counted: HashSet<i64>,
}

impl StateMetrics {
    pub fn new(r: &mut Registry) -> Self {
        let m = Self {
            vm_state: Family::default(),
            vm_health: Family::default(),
            vm_rpo: Family::default(),
            vm_last_point: Family::default(),
            vm_progress: Family::default(),
            vm_failures: Family::default(),
            vm_points: Family::default(),
            vm_upload_requests: Family::default(),
            vm_uploaded: Family::default(),
            disk_size: Family::default(),
            disk_unshipped: Family::default(),
            jobs_running: Family::default(),
            jobs_finished: Family::default(),
            job_duration: Family::new_with_constructor(job_histogram as fn() -> Histogram),
            counted: HashSet::new(),
        };
        r.register(
            "standby_vm_state",
            "1 for the protection state a protected VM is in",
            m.vm_state.clone(),
        );
        r.register(
            "standby_vm_health",
            "Replication health of a VM: 0 normal, 1 warning, 2 critical",
            m.vm_health.clone(),
        );
        r.register_with_unit(
            "standby_vm_rpo",
            "Seconds since the VM's replica was last current (absent before its first point)",
            Unit::Seconds,
            m.vm_rpo.clone(),
        );
        r.register_with_unit(
            "standby_vm_last_point_timestamp",
            "Unix time of the VM's newest recovery point",
            Unit::Seconds,
            m.vm_last_point.clone(),
        );
        r.register_with_unit(
            "standby_vm_progress",
            "Done fraction of the VM's initial replication or resynchronization",
            Unit::Other("ratio".into()),
            m.vm_progress.clone(),
        );
        r.register(
            "standby_vm_consecutive_failures",
            "Failures of the VM's current step since its last success",
            m.vm_failures.clone(),
        );
        r.register(
            "standby_vm_points",
            "Recovery points the gateway published for the VM since it was protected",
            m.vm_points.clone(),
        );
        r.register(
            "standby_vm_upload_requests",
            "Object writes (PUTs) to the store for the VM's published points since it was protected",
            m.vm_upload_requests.clone(),
        );
        r.register_with_unit(
            "standby_vm_uploaded",
            "Bytes written to the store for the VM's published points since it was protected",
            Unit::Bytes,
            m.vm_uploaded.clone(),
        );
        r.register_with_unit(
            "standby_disk_size",
            "Size of a protected disk as the engine last reported it",
            Unit::Bytes,
            m.disk_size.clone(),
        );
        r.register_with_unit(
            "standby_disk_log_unshipped",
            "Change-log bytes of a protected disk not yet shipped to the store",
            Unit::Bytes,
            m.disk_unshipped.clone(),
        );
        r.register(
            "standby_jobs_running",
            "Jobs running now, by kind",
            m.jobs_running.clone(),
        );
        r.register(
            "standby_jobs_finished",
            "Jobs finished, by kind and outcome (counted from the job history at each scrape)",
            m.jobs_finished.clone(),
        );
        r.register_with_unit(
            "standby_job_duration",
            "Durations of finished jobs, by kind",
            Unit::Seconds,
            m.job_duration.clone(),
        );
        m
    }

    pub fn refresh(&mut self, db: &Db) -> Result<(), DbError> {
        let vms = vm_statuses(db)?;
        for f in [&self.vm_health, &self.vm_failures] {
            f.clear();
        }
        for f in [&self.vm_rpo, &self.vm_last_point, &self.vm_progress] {
            f.clear();
        }
        self.vm_state.clear();
        for f in [&self.vm_points, &self.vm_upload_requests, &self.vm_uploaded] {
            f.clear();
        }
        let protected: HashSet<&str> = vms.iter().map(|v| v.name.as_str()).collect();
        for (vm, points, puts, bytes) in db.uploads()? {
            if !protected.contains(vm.as_str()) {
                continue;
            }
            let l = VmLabel { vm };
            let set = |f: &Family<VmLabel, Counter>, v: u64| {
                f.get_or_create(&l)
                    .inner()
                    .store(v, std::sync::atomic::Ordering::Relaxed)
            };
            set(&self.vm_points, points);
            set(&self.vm_upload_requests, puts);
            set(&self.vm_uploaded, bytes);
        }
        self.disk_size.clear();
        self.disk_unshipped.clear();
        for v in &vms {
            let l = VmLabel { vm: v.name.clone() };
            self.vm_state
                .get_or_create(&VmState {
                    vm: v.name.clone(),
                    state: v.state.as_str().to_string(),
                })
                .set(1);
            self.vm_health.get_or_create(&l).set(v.health.level());
            if let Some(r) = v.rpo_seconds {
                self.vm_rpo.get_or_create(&l).set(r);
            }
            if let Some(t) = v.last_point_ms {
                self.vm_last_point.get_or_create(&l).set(t as f64 / 1000.0);
            }
            self.vm_progress
                .get_or_create(&l)
                .set(v.progress_percent / 100.0);
            self.vm_failures
                .get_or_create(&l)
                .set(i64::from(v.failures));
            for d in &v.disks {
                let dl = VmDisk {
                    vm: v.name.clone(),
                    disk: d.name.clone(),
                };
                if let Some(s) = d.size_bytes {
                    self.disk_size.get_or_create(&dl).set(s as i64);
                }
                if let Some(b) = d.backlog_bytes {
                    self.disk_unshipped.get_or_create(&dl).set(b as i64);
                }
            }
        }

        let jobs = db.jobs(MAX_FINISHED_JOBS as usize + 100, None)?;
        self.jobs_running.clear();
        let mut present = HashSet::with_capacity(jobs.len());
        for j in &jobs {
            present.insert(j.id);
            let kind = JobKind {
                kind: j.kind.as_str().to_string(),
            };
            match j.finished_ms {
                None => {
                    self.jobs_running.get_or_create(&kind).inc();
                }
                Some(end) => {
                    if self.counted.insert(j.id) {
                        self.jobs_finished
                            .get_or_create(&JobOutcome {
                                kind: j.kind.as_str().to_string(),
                                state: j.state.as_str().to_string(),
                            })
                            .inc();
                        self.job_duration
                            .get_or_create(&kind)
                            .observe(end.saturating_sub(j.created_ms) as f64 / 1000.0);
                    }
                }
            }
        }
        self.counted.retain(|id| present.contains(id));
        Ok(())
    }
}
