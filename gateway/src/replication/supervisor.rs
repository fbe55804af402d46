//! The engine's supervisor: one loop per gateway that starts a worker per protected VM (and
//! restarts one that ended), serves the attachment requests of the state database
//! ([`crate::failover::attachments`]), and on shutdown waits for every worker, then flushes the
//! served overlays.
//!
//! Invariants: at most one worker per VM at a time; a VM removed from the database
//! (`standby unprotect`) ends its worker, which stops change tracking of its disks; the
//! per-disk figures `standby status` shows are written only when they change (or every 10 s).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::db::{DiskStat, VmRow};
use super::engine::{blocking, Engine, SUPERVISOR_TICK, TICK};
use super::now_ms;
use crate::disk::{Disk, DiskError};

impl Engine {
    /// Runs until shutdown: a worker per protected VM.
    pub async fn run(self: Arc<Self>) {
        let mut workers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut shutdown = self.shutdown.clone();
        loop {
            match self.db(|d| d.vms()) {
                Ok(vms) => {
                    for v in vms {
                        let running = workers.get(&v.name).is_some_and(|h| !h.is_finished());
                        if !running {
                            let me = Arc::clone(&self);
                            let name = v.name.clone();
                            workers.insert(
                                v.name.clone(),
                                tokio::spawn(async move { me.worker(name).await }),
                            );
                        }
                    }
                }
                Err(e) => warn!("replication: cannot read the state database: {e}"),
            }
            workers.retain(|_, h| !h.is_finished());
            self.sync_attachments().await;
            tokio::select! {
                _ = tokio::time::sleep(SUPERVISOR_TICK) => {}
                _ = shutdown.changed() => {}
            }
            if self.stopping() {
                break;
            }
        }
        for (_, h) in workers {
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

    pub(crate) async fn worker(self: Arc<Self>, vm: String) {
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
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => {}
            }
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
