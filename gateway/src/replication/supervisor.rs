//! The engine's supervisor: one loop per gateway. At start it reads the durable state (the
//! protected VMs, the attachments to serve, commits under way) and starts a worker per VM;
//! then it takes the admin requests ([`super::requests`], handled in [`super::handler`]) as
//! they come, acting on each at once, and does its own housekeeping once a second
//! (restarting a worker that ended, adopting hydrated disks of a commit). On shutdown it
//! waits for every worker, then flushes the served overlays.
//!
//! Invariants: at most one worker per VM at a time; an unprotected VM's worker is woken, finds
//! its row gone and stops change tracking of its disks; the state database is never scanned
//! for requests (what the CLI writes while no gateway runs is read at the next start); the
//! per-disk figures `standby status` shows are written only when they change (or every 10 s).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use tracing::{info, warn};

use super::db::AttachmentState;
use super::db::{DiskStat, Phase, VmRow};
use super::engine::{blocking, Engine, SUPERVISOR_TICK, TICK};
use super::now_ms;
use crate::disk::{Disk, DiskError};
use crate::failover::replica::OverlayKind;

/// The running workers, one per protected VM, each with the bell that wakes it.
#[derive(Default)]
pub(crate) struct Workers {
    map: HashMap<String, (tokio::task::JoinHandle<()>, Arc<Notify>)>,
}

impl Workers {
    /// Starts the worker of `vm` unless one runs.
    pub(crate) fn ensure(&mut self, engine: &Arc<Engine>, vm: &str) {
        if self.map.get(vm).is_some_and(|(h, _)| !h.is_finished()) {
            return;
        }
        let wake = Arc::new(Notify::new());
        let (me, name, w) = (Arc::clone(engine), vm.to_string(), Arc::clone(&wake));
        let h = tokio::spawn(async move { me.worker(name, w).await });
        self.map.insert(vm.to_string(), (h, wake));
    }

    /// Makes the worker of `vm` look at its row now.
    pub(crate) fn wake(&self, vm: &str) {
        if let Some((_, w)) = self.map.get(vm) {
            w.notify_one();
        }
    }

    pub(crate) fn wake_all(&self) {
        for (_, w) in self.map.values() {
            w.notify_one();
        }
    }
}

impl Engine {
    /// Runs until shutdown: a worker per protected VM, and the admin requests.
    pub async fn run(self: Arc<Self>) {
        let mut workers = Workers::default();
        let mut shutdown = self.shutdown.clone();
        let mut requests = self
            .requests_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // The durable state at start: VMs recorded while no gateway ran, points to serve again,
        // commits under way.
        let mut commits = std::collections::BTreeSet::new();
        match self.db(|d| d.vms()) {
            Ok(vms) => {
                for v in vms {
                    workers.ensure(&self, &v.name);
                }
            }
            Err(e) => warn!("replication: cannot read the state database: {e}"),
        }
        if let Ok(rows) = self.db(|d| d.attachments()) {
            commits.extend(
                rows.into_iter()
                    .filter(|r| r.state == AttachmentState::Commit)
                    .map(|r| r.vm),
            );
        }
        self.sync_attachments().await;
        let mut housekeeping = tokio::time::interval(SUPERVISOR_TICK);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(req) = async {
                    match requests.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.handle_request(req, &mut workers, &mut commits).await,
                _ = housekeeping.tick() => self.housekeeping(&mut workers, &mut commits).await,
                _ = shutdown.changed() => {}
            }
            if self.stopping() {
                break;
            }
        }
        // Requests still queued are answered "not running" when the channel drops.
        drop(requests);
        for (_, (h, w)) in workers.map {
            w.notify_one();
            let _ = h.await;
        }
        for (_, a) in self.attached.lock().await.drain() {
            if let Some(h) = a.hydration {
                h.abort();
            }
            if let Err(e) = a.disk.flush().await {
                warn!(disk = %a.disk.name(), "flushing an overlay at shutdown failed: {e}");
            }
        }
        info!("replication engine stopped");
    }

    /// The supervisor's own work: restart a worker that ended while its VM is still
    /// protected; adopt the disks of commits once hydrated.
    async fn housekeeping(
        self: &Arc<Self>,
        workers: &mut Workers,
        commits: &mut std::collections::BTreeSet<String>,
    ) {
        let ended: Vec<String> = workers
            .map
            .iter()
            .filter(|(_, (h, _))| h.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for vm in ended {
            workers.map.remove(&vm);
            if let Ok(Some(_)) = self.db(|d| d.vm(&vm)) {
                warn!(vm = %vm, "replication worker ended: starting it again");
                workers.ensure(self, &vm);
            }
        }
        if !commits.is_empty() {
            self.sync_attachments().await;
            if let Ok(rows) = self.db(|d| d.attachments()) {
                commits.retain(|vm| {
                    rows.iter()
                        .any(|r| &r.vm == vm && r.kind == OverlayKind::Failover)
                });
            }
        }
    }

    pub(crate) async fn worker(self: Arc<Self>, vm: String, wake: Arc<Notify>) {
        info!(vm = %vm, "replication worker started");
        let mut shutdown = self.shutdown.clone();
        loop {
            if self.stopping() {
                break;
            }
            let row = match self.db(|d| d.vm(&vm)) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.unprotected(&vm).await;
                    break;
                }
                Err(e) => {
                    warn!(vm = %vm, "cannot read VM state: {e}");
                    tokio::time::sleep(TICK).await;
                    continue;
                }
            };
            self.publish_stats(&row);
            if let Err(e) = self.tick(row).await {
                warn!(vm = %vm, "replication step error: {e}");
            }
            let wait = self.next_wait(&vm);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// How long a worker sleeps before its next step: [`TICK`], or less when a protected VM's
    /// next delta cycle is due sooner (continuous mode: the cycle starts when it is due, not
    /// up to a tick later, which added up to 0.2 s to every point's age).
    fn next_wait(&self, vm: &str) -> Duration {
        let Ok((Some(row), policy)) = self.db(|d| Ok((d.vm(vm)?, d.policy()?))) else {
            return TICK;
        };
        let Some(last) = row.last_cycle_ms else {
            return TICK;
        };
        if row.phase != Phase::Protected || row.failures > 0 {
            return TICK;
        }
        let due = last.saturating_add(policy.interval().as_millis() as u64);
        match due.checked_sub(now_ms()) {
            // Due already, yet the step did not cycle: it waits for something else.
            None | Some(0) => TICK,
            Some(ms) => Duration::from_millis(ms).min(TICK),
        }
    }

    /// The VM was unprotected: stop logging into the void (segments are released; tracking
    /// itself ends when the disk is next opened).
    pub(crate) async fn unprotected(&self, vm: &str) {
        info!(vm, "VM unprotected: stopping change tracking of its disks");
        let all: Vec<Disk> = self.live_disks().values().cloned().collect();
        for d in &all {
            match self.dd.disk(d.name()) {
                Ok(rec) if !rec.tracked && d.change_log().is_some() => {}
                _ => continue,
            }
            let (dc, dir) = (d.clone(), self.dd.log_dir(d.name()));
            let r = blocking(move || -> Result<(), DiskError> {
                dc.detach_log()?;
                crate::changelog::log::remove_log_dir(&dir)?;
                Ok(())
            })
            .await;
            match r {
                Ok(()) => info!(disk = %d.name(), "change tracking stopped, log removed"),
                Err(e) => warn!(disk = %d.name(), "cannot stop change tracking: {e}"),
            }
        }
    }

    pub(crate) fn publish_stats(&self, row: &VmRow) {
        for name in &row.disks {
            let Some(d) = self.live_disks().get(name).cloned() else {
                continue;
            };
            let (backlog, state) = match d.change_log() {
                Some(l) => (l.unshipped_bytes(), l.state().to_string()),
                None => (0, "untracked".to_string()),
            };
            {
                let mut m = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                let fresh = m.get(name).is_some_and(|(b, s, t)| {
                    *b == backlog && *s == state && t.elapsed() < Duration::from_secs(10)
                });
                if fresh {
                    continue;
                }
                m.insert(name.clone(), (backlog, state.clone(), Instant::now()));
            }
            let s = DiskStat {
                vm: row.name.clone(),
                disk: name.clone(),
                size: d.size(),
                backlog,
                log_state: state,
                updated_ms: now_ms(),
            };
            let _ = self.db(|db| db.put_disk_stat(&s));
        }
    }
}
