//! The replication engine: runs inside `standby serve`, one worker per protected VM, each
//! driving its VM through the phases kept in the state database ([`super::db`]).
//!
//! - **Enable protection**: prerequisites (disks served and writable, store reachable and
//!   writable with the right key, local space for the logs), the relationship recorded in the
//!   store (`protection/<vm>` blob), change tracking attached to the live disks.
//! - **Initial replication**: per disk, a barrier in the change log (every earlier write is in
//!   the image), then a pass over the image that stores every non-zero chunk, checkpointed so
//!   it resumes after a restart. Writes made meanwhile are in the log; the first point is the
//!   pass's chunks plus a patch of every record logged since the barrier, cut at one common
//!   barrier across the VM's disks — so it is exactly the disks' state at that barrier.
//! - **Finalize protection**: the first point is verified, the VM becomes Protected.
//! - **Delta replication** every interval: one common cut, the records since the last point
//!   become patches (bytes uploaded ≈ bytes written), a new point, pruning by retention, and
//!   only then the shipped segments are deleted.
//! - **Resynchronization** (log over 50% of the disk, chain broken, log overflow, replica
//!   missing): the log restarts, then only the chunks that may differ are hashed — those the
//!   old log and the dirty bitmap name, or all of them when neither can be trusted — and the
//!   ones whose digest differs from the replica's index are sent; checkpointed like the
//!   initial pass.
//!
//! Errors: recoverable ones retry on the back-off schedule; non-recoverable ones make the VM
//! Critical until `standby resume`; a broken or overflowed log turns into ResyncRequired.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use replica_store::{
    ChunkId, Consistency, DiskIndex, Patch, PointBuilder, PointMeta, RetentionPolicy, Store,
};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

use super::db::{
    Attachment, AttachmentState, Checkpoint, CheckpointKind, Db, DbError, DiskStat, JobKind,
    JobState, Phase, VmRow,
};
use super::policy::{local_minute_of_day, Policy};
use super::retry::RetryState;
use super::{now_ms, ErrorClass};
use crate::catalog::DataDir;
use crate::changelog::format::Kind;
use crate::changelog::ship::{read_records, Reach};
use crate::changelog::{ChangeLog, LogError, LogState};
use crate::disk::{Disk, DiskError};
use crate::failover::replica::OverlayKind;
use crate::failover::{Device, Overlay, ReplicaDisk};
use nbd_server::{Export, Exports};
use replica_store::ReaderOptions;

/// How often a worker looks at its VM's row.
pub const TICK: Duration = Duration::from_millis(200);
/// How often the engine looks for new VMs and attachment requests (an attach or a test
/// failover is served within this).
const SUPERVISOR_TICK: Duration = Duration::from_millis(100);
/// Checkpoint a pass at least this often.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// Chunks read and hashed per batch of a pass.
const BATCH_CHUNKS: usize = 64;
/// Points are pruned at most this often per VM (pruning lists every point).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Namespace of the protection relationship blobs in the store.
pub const PROTECTION_NS: &str = "protection";

/// Why a replication step failed.
#[derive(Debug, Error)]
pub enum ReplError {
    #[error("replica store: {0}")]
    Store(#[from] replica_store::Error),
    #[error("store location: {0}")]
    Site(#[from] crate::site::SiteError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("disk {disk}: {source}")]
    Disk { disk: String, source: DiskError },
    #[error("disk {disk}: {source}")]
    Io {
        disk: String,
        source: std::io::Error,
    },
    #[error("disk {0} is not served by this gateway (add it with `standby disk create/import` and restart `standby serve`)")]
    DiskNotServed(String),
    #[error("disk {0} is read-only and cannot be protected")]
    DiskReadOnly(String),
    #[error(
        "not enough local space in {path}: {free} bytes free, {needed} needed for change logs"
    )]
    LowSpace {
        path: PathBuf,
        free: u64,
        needed: u64,
    },
    #[error("change log of disk {disk}: {reason}")]
    NeedsResync {
        disk: String,
        reason: String,
        full: bool,
    },
    #[error("replica invalid: {0}")]
    InvalidReplica(String),
    #[error("{what} hook failed: {message}")]
    Hook { what: String, message: String },
    #[error("the gateway is shutting down")]
    Shutdown,
}

impl ReplError {
    fn class(&self) -> ErrorClass {
        match self {
            ReplError::Store(e) if e.is_recoverable() => ErrorClass::Recoverable,
            ReplError::Store(_) | ReplError::Site(_) => ErrorClass::NonRecoverable,
            ReplError::DiskNotServed(_) | ReplError::DiskReadOnly(_) => ErrorClass::NonRecoverable,
            ReplError::InvalidReplica(_) => ErrorClass::NonRecoverable,
            _ => ErrorClass::Recoverable,
        }
    }

    fn log(disk: &str, e: LogError) -> ReplError {
        match e {
            LogError::NotHealthy { state, .. } => ReplError::NeedsResync {
                disk: disk.to_string(),
                full: matches!(state, LogState::Broken { .. }),
                reason: format!("the change log is {state}"),
            },
            other => ReplError::Disk {
                disk: disk.to_string(),
                source: DiskError::Log(other),
            },
        }
    }

    fn disk(disk: &str, e: DiskError) -> ReplError {
        match e {
            DiskError::Log(l) => Self::log(disk, l),
            other => ReplError::Disk {
                disk: disk.to_string(),
                source: other,
            },
        }
    }
}

type R<T> = Result<T, ReplError>;

/// The engine. One per gateway process.
pub struct Engine {
    dd: DataDir,
    /// Live disks served by this process (failover commits add to it).
    disks: std::sync::RwLock<HashMap<String, Disk>>,
    db: Mutex<Db>,
    store: tokio::sync::Mutex<Option<Store>>,
    shutdown: watch::Receiver<bool>,
    /// Last figures written per disk (written again only when they change).
    stats: Mutex<HashMap<String, (u64, String, Instant)>>,
    /// The server's export table (replica disks are added and removed here).
    exports: Arc<Exports<Device>>,
    /// When each VM's points were last pruned.
    pruned: Mutex<HashMap<String, Instant>>,
    /// Replica disks served for attachments, by export name, with their hydration task.
    attached: tokio::sync::Mutex<HashMap<String, Attached>>,
}

struct Attached {
    disk: ReplicaDisk,
    hydration: Option<tokio::task::JoinHandle<()>>,
    /// Overlay directory removed with the export (attach and test failover overlays are
    /// scratch space; a failover's is the VM's data until committed).
    scratch: Option<PathBuf>,
    /// The request this serves (a detach and a new attach under the same name between two
    /// passes is a new request).
    created_ms: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.dd.root())
            .finish()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn chain_hex(log: &ChangeLog) -> String {
    format!("{:016x}", log.chain_id())
}

impl Engine {
    /// An engine over the disks served by this process.
    pub fn new(
        dd: DataDir,
        disks: HashMap<String, Disk>,
        exports: Arc<Exports<Device>>,
        nbd_addr: String,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Engine>, DbError> {
        let db = Db::open(dd.root())?;
        db.set_value("nbd_addr", &nbd_addr)?;
        let n = db.interrupt_running_jobs()?;
        if n > 0 {
            info!(jobs = n, "marked jobs of the previous run interrupted");
        }
        Ok(Arc::new(Engine {
            dd,
            disks: std::sync::RwLock::new(disks),
            db: Mutex::new(db),
            store: tokio::sync::Mutex::new(None),
            shutdown,
            stats: Mutex::new(HashMap::new()),
            exports,
            pruned: Mutex::new(HashMap::new()),
            attached: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    fn db<T>(&self, f: impl FnOnce(&Db) -> Result<T, DbError>) -> Result<T, DbError> {
        let g = self.db.lock().unwrap_or_else(|p| p.into_inner());
        f(&g)
    }

    fn live_disks(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Disk>> {
        self.disks.read().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn store(&self) -> R<Store> {
        let mut g = self.store.lock().await;
        if let Some(s) = &*g {
            return Ok(s.clone());
        }
        let s = crate::site::open_store(self.dd.root()).await?;
        *g = Some(s.clone());
        Ok(s)
    }

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

    /// Serves the attachments the database asks for and stops serving the removed ones.
    async fn sync_attachments(self: &Arc<Self>) {
        let rows = match self.db(|d| d.attachments()) {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot read attachments: {e}");
                return;
            }
        };
        let mut attached = self.attached.lock().await;
        // Removed by the CLI (detach, test-failover cleanup), or replaced by a new request.
        let gone: Vec<String> = attached
            .iter()
            .filter(|(k, a)| {
                !rows
                    .iter()
                    .any(|r| &r.export == *k && r.created_ms == a.created_ms)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for name in gone {
            if let Some(a) = attached.remove(&name) {
                if let Some(h) = a.hydration {
                    h.abort();
                }
                let _ = a.disk.flush().await;
                let still_replica = self
                    .exports
                    .get(&name)
                    .is_some_and(|e| matches!(*e.device, Device::Replica(_)));
                if still_replica {
                    self.exports.remove(&name);
                }
                if let Some(dir) = a.scratch {
                    drop(a.disk);
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        warn!(dir = %dir.display(), "cannot remove an overlay: {e}");
                    }
                }
                info!(export = %name, "replica export removed");
            }
        }
        for row in rows {
            if row.state == AttachmentState::Error {
                continue;
            }
            if row.state == AttachmentState::Commit {
                if let Err(e) = self.commit_failover(&mut attached, &row).await {
                    warn!(export = %row.export, "failover commit failed: {e}");
                    let _ = self.db(|d| {
                        d.set_attachment(
                            &row.export,
                            AttachmentState::Hydrated,
                            &e.to_string(),
                            100.0,
                        )
                    });
                }
                continue;
            }
            if attached.contains_key(&row.export) {
                continue;
            }
            match self.open_attachment(&row).await {
                Ok(disk) => {
                    self.exports.insert(Export {
                        name: row.export.clone(),
                        description: format!(
                            "{}/{}@{} ({})",
                            row.vm, row.disk, row.point, row.kind
                        ),
                        read_only: !row.rw,
                        device: Arc::new(Device::Replica(disk.clone())),
                    });
                    let state = if row.state == AttachmentState::Hydrated {
                        AttachmentState::Hydrated
                    } else {
                        AttachmentState::Served
                    };
                    let _ = self.db(|d| d.set_attachment(&row.export, state, "", row.progress));
                    info!(export = %row.export, point = %row.point, rw = row.rw, "replica export served");
                    let hydration = (row.kind == OverlayKind::Failover
                        && row.state != AttachmentState::Hydrated)
                        .then(|| self.spawn_hydration(&row.export, disk.clone()));
                    let scratch = (row.rw && row.kind != OverlayKind::Failover)
                        .then(|| PathBuf::from(&row.dir));
                    attached.insert(
                        row.export.clone(),
                        Attached {
                            disk,
                            hydration,
                            scratch,
                            created_ms: row.created_ms,
                        },
                    );
                }
                Err(e) => {
                    warn!(export = %row.export, "cannot serve replica: {e}");
                    let _ = self.db(|d| {
                        d.set_attachment(&row.export, AttachmentState::Error, &e.to_string(), 0.0)
                    });
                }
            }
        }
    }

    async fn open_attachment(&self, row: &Attachment) -> R<ReplicaDisk> {
        let store = self.store().await?;
        let point = store.load_point(&row.vm, &row.point).await?;
        // A booting VM or a copy reads sequentially: a deeper read-ahead hides the store's
        // latency (S3 most of all); 64 MiB of cache per disk.
        let opts = ReaderOptions {
            cache_bytes: 64 << 20,
            readahead_bytes: 2 << 20,
        };
        let reader = store.open_disk(&point, &row.disk, opts).await?;
        let overlay = if row.rw {
            let dir = PathBuf::from(&row.dir);
            let size = reader.size();
            let grain = u64::from(reader.index().chunk_size());
            Some(
                blocking(move || Overlay::open(&dir, size, grain))
                    .await
                    .map_err(|e| ReplError::Io {
                        disk: row.export.clone(),
                        source: e,
                    })?,
            )
        } else {
            None
        };
        Ok(ReplicaDisk::new(&row.export, reader, overlay))
    }

    /// Copies a failed-over disk's remaining chunks into its overlay in the background.
    fn spawn_hydration(
        self: &Arc<Self>,
        export: &str,
        disk: ReplicaDisk,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        let export = export.to_string();
        tokio::spawn(async move {
            let mut last = Instant::now();
            let r = disk
                .hydrate(|done, total| {
                    if last.elapsed() >= Duration::from_millis(500) {
                        let pct = 100.0 * done as f64 / total.max(1) as f64;
                        let _ =
                            me.db(|d| d.set_attachment(&export, AttachmentState::Served, "", pct));
                        last = Instant::now();
                    }
                })
                .await;
            match r {
                Ok(()) => {
                    let _ =
                        me.db(|d| d.set_attachment(&export, AttachmentState::Hydrated, "", 100.0));
                    info!(export = %export, "failed-over disk hydrated: a complete local image");
                }
                Err(e) => {
                    warn!(export = %export, "hydration failed (retried at the next start): {e}");
                    let _ = me.db(|d| {
                        d.set_attachment(
                            &export,
                            AttachmentState::Served,
                            &format!("hydration: {e}"),
                            0.0,
                        )
                    });
                }
            }
        })
    }

    /// Turns a hydrated failover disk into a regular disk of this gateway: its overlay image
    /// is adopted in place and the export switches to the live disk.
    async fn commit_failover(
        &self,
        attached: &mut HashMap<String, Attached>,
        row: &Attachment,
    ) -> R<()> {
        let Some(a) = attached.get(&row.export) else {
            return Ok(()); // served first, then committed on a later pass
        };
        if let Some(h) = &a.hydration {
            if !h.is_finished() {
                return Ok(());
            }
        }
        let ov =
            a.disk.overlay().cloned().ok_or_else(|| {
                ReplError::InvalidReplica(format!("{} has no overlay", row.export))
            })?;
        if ov.grains_present() != ov.grains() {
            return Ok(()); // still hydrating
        }
        // No I/O on the replica from here: connections opened before the commit wait, then
        // go to the live disk (its change log records their writes) once it is open.
        let replica = a.disk.clone();
        let handover = replica.begin_handover().await;
        replica.flush().await.map_err(|e| ReplError::Io {
            disk: row.export.clone(),
            source: e,
        })?;
        let image = ov.dir().join(crate::failover::replica::OVERLAY_IMAGE);
        let rec = self
            .dd
            .import_disk(&row.export, &image, false)
            .map_err(|e| {
                ReplError::InvalidReplica(format!("cannot adopt {}: {e}", image.display()))
            })?;
        let disk = self.dd.open_disk(&rec).map_err(|e| {
            ReplError::InvalidReplica(format!("cannot open {}: {e}", image.display()))
        })?;
        handover.complete(disk.clone());
        self.exports.insert(Export {
            name: row.export.clone(),
            description: format!("standby disk {}", row.export),
            read_only: false,
            device: Arc::new(Device::Live(disk.clone())),
        });
        self.disks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(row.export.clone(), disk);
        attached.remove(&row.export);
        let _ = std::fs::remove_file(ov.dir().join(crate::failover::replica::OVERLAY_MAP));
        self.db(|d| d.delete_attachment(&row.export))?;
        info!(export = %row.export, "failover committed: the disk is now a local disk of this gateway");
        Ok(())
    }

    async fn worker(self: Arc<Self>, vm: String) {
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
    async fn unprotected(&self, vm: &str) {
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

    fn publish_stats(&self, row: &VmRow) {
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

    fn disks_of(&self, row: &VmRow) -> R<Vec<Disk>> {
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

    async fn tick(&self, row: VmRow) -> R<()> {
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
    fn failed(&self, row: &VmRow, policy: &Policy, e: &ReplError) -> Result<(), DbError> {
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

    fn succeeded(&self, vm: &str, f: impl FnOnce(&mut VmRow)) -> Result<VmRow, DbError> {
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
    async fn job<T, F: std::future::Future<Output = R<T>>>(
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

    fn step(&self, job: i64, name: &str, detail: &str) -> R<()> {
        self.db(|d| d.step(job, name, detail))?;
        Ok(())
    }

    // ---------------------------------------------------------------- enable protection

    async fn enable(&self, row: &VmRow, _policy: &Policy) -> R<()> {
        self.job(&row.name, JobKind::EnableProtection, |job| async move {
            self.step(job, "check disks", &row.disks.join(","))?;
            let disks = self.disks_of(row)?;
            for d in &disks {
                if d.read_only() {
                    return Err(ReplError::DiskReadOnly(d.name().to_string()));
                }
            }
            self.step(
                job,
                "check replica store",
                "reachable, writable, key matches",
            )?;
            let store = self.store().await?;
            let rel = serde_json::json!({
                "vm": row.name,
                "disks": row.disks,
                "gateway_data_dir": self.dd.root().display().to_string(),
                "since_unix_ms": now_ms(),
            });
            store
                .put_blob(PROTECTION_NS, &row.name, rel.to_string().as_bytes())
                .await?;
            self.step(job, "check local space", "room for the change logs")?;
            let total: u64 = disks.iter().map(|d| d.size()).sum();
            check_space(self.dd.root(), total / 2)?;
            self.step(job, "start change tracking", "")?;
            for d in &disks {
                self.attach(d).await?;
            }
            Ok(())
        })
        .await?;
        self.succeeded(&row.name, |v| {
            if v.phase == Phase::EnablingProtection {
                v.phase = Phase::InitialReplication;
                v.progress = 0.0;
            }
        })?;
        info!(vm = %row.name, "protection enabled; initial replication starts");
        Ok(())
    }

    async fn attach(&self, d: &Disk) -> R<ChangeLog> {
        let rec = self
            .dd
            .disk(d.name())
            .map_err(|_| ReplError::DiskNotServed(d.name().to_string()))?;
        let opts = self
            .dd
            .config()
            .log
            .options()
            .map_err(|e| ReplError::NeedsResync {
                disk: d.name().to_string(),
                reason: e,
                full: true,
            })?;
        if rec.origin != crate::catalog::Origin::Config {
            let _ = self.dd.set_tracked(d.name(), true);
        }
        let (dc, dir, id) = (d.clone(), self.dd.log_dir(d.name()), rec.id.clone());
        blocking(move || dc.attach_log(&dir, &id, opts))
            .await
            .map_err(|e| ReplError::disk(d.name(), e))?;
        d.change_log()
            .ok_or_else(|| ReplError::DiskNotServed(d.name().to_string()))
    }

    fn log_of(&self, d: &Disk) -> R<ChangeLog> {
        d.change_log().ok_or_else(|| ReplError::NeedsResync {
            disk: d.name().to_string(),
            reason: "change tracking is off".into(),
            full: true,
        })
    }

    // ---------------------------------------------------------------- initial replication

    async fn initial(&self, row: &VmRow, policy: &Policy) -> R<()> {
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
                let mut done_before = 0u64;
                for (d, ck) in ds.iter().zip(cks.iter_mut()) {
                    if !ck.done {
                        self.step(
                            job,
                            &format!("copy {}", d.name()),
                            &format!("{} bytes", d.size()),
                        )?;
                        self.pass(job, row, d, &store, ck, None, policy, done_before, total)
                            .await?;
                    }
                    done_before += d.size();
                }
                self.step(job, "cut first recovery point", "")?;
                let cut_ms = now_ms();
                let meta = self.cut_point(row, ds, &store, &cks, None).await?;
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
    async fn start_pass(&self, d: &Disk, log: &ChangeLog) -> R<u64> {
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

    /// Reads, hashes and stores chunks of a disk (all of them, or `ck.todo`), comparing with
    /// `base` (the replica's index) to send only what differs. Checkpoints as it goes.
    #[allow(clippy::too_many_arguments)]
    async fn pass(
        &self,
        job: i64,
        row: &VmRow,
        d: &Disk,
        store: &Store,
        ck: &mut Checkpoint,
        base: Option<&(DiskIndex, BTreeSet<u64>)>,
        policy: &Policy,
        done_before: u64,
        total_bytes: u64,
    ) -> R<()> {
        let mut index = DiskIndex::from_bytes(&ck.index, "checkpoint")?;
        let todo: Vec<u64> = ck
            .todo
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .collect();
        let full = todo.is_empty();
        let count = if full { index.len() } else { todo.len() as u64 };
        let writer = PointBuilder::new(store, &row.name)?.writer();
        let cs = index.chunk_size() as u64;
        let started = Instant::now();
        let sent_at_start = ck.bytes_sent;
        let mut last_ck = Instant::now();
        while ck.position < count {
            if self.stopping() {
                writer.commit().await?;
                ck.index = index.to_bytes();
                self.db(|db| db.put_checkpoint(ck))?;
                return Err(ReplError::Shutdown);
            }
            let end = (ck.position + BATCH_CHUNKS as u64).min(count);
            let batch: Vec<u64> = (ck.position..end)
                .map(|p| if full { p } else { todo[p as usize] })
                .collect();
            // Chunks that are holes in the image are zero chunks: never read.
            let holes = if full {
                hole_chunks(d, ck.position, end, &index).await?
            } else {
                BTreeSet::new()
            };
            let results: Vec<(u64, ChunkId, u64, u64)> =
                futures::stream::iter(batch.into_iter().map(|ci| {
                    let (d, store, writer) = (d.clone(), store.clone(), writer.clone());
                    let len = index.chunk_len(ci);
                    let known = base.and_then(|(b, patched)| {
                        (!patched.contains(&ci)).then(|| b.get(ci)).flatten()
                    });
                    let hole = holes.contains(&ci);
                    async move {
                        if hole {
                            return Ok::<_, ReplError>((ci, ChunkId::ZERO, 0, 0));
                        }
                        let data = d.read(ci * cs, len).await.map_err(|e| ReplError::Io {
                            disk: d.name().to_string(),
                            source: e,
                        })?;
                        let s2 = store.clone();
                        let (id, data) = blocking(move || (s2.digest(&data), data)).await;
                        if known == Some(id) || id.is_zero() {
                            return Ok::<_, ReplError>((ci, id, len as u64, 0));
                        }
                        let out = writer.put_with_id(id, Bytes::from(data)).await?;
                        Ok((ci, id, len as u64, out.uploaded_bytes))
                    }
                }))
                .buffer_unordered(8)
                .try_collect()
                .await?;
            for (ci, id, read, sent) in results {
                index.set(ci, id)?;
                ck.bytes_read += read;
                ck.bytes_sent += sent;
            }
            ck.position = end;
            if policy.bandwidth_bytes_per_sec > 0 {
                let want = Duration::from_secs_f64(
                    (ck.bytes_sent - sent_at_start) as f64 / policy.bandwidth_bytes_per_sec as f64,
                );
                if let Some(wait) = want.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if last_ck.elapsed() >= CHECKPOINT_EVERY || ck.position == count {
                writer.commit().await?;
                ck.index = index.to_bytes();
                ck.done = ck.position == count;
                self.db(|db| db.put_checkpoint(ck))?;
                let disk_done = (d.size() * ck.position)
                    .checked_div(count)
                    .unwrap_or(d.size());
                let pct = 100.0 * (done_before + disk_done) as f64 / total_bytes as f64;
                let detail = format!(
                    "{}: {} of {} chunks, {} bytes read, {} bytes sent",
                    d.name(),
                    ck.position,
                    count,
                    ck.bytes_read,
                    ck.bytes_sent
                );
                self.db(|db| {
                    db.job_progress(job, pct, &detail)?;
                    db.modify_vm(&row.name, |v| v.progress = pct).map(|_| ())
                })?;
                last_ck = Instant::now();
            }
        }
        Ok(())
    }

    /// Cuts all of a VM's disks at one barrier and publishes a point. With `parent`, the
    /// point derives from it (delta); without, each disk's index comes from its checkpoint
    /// (initial replication, resync). Each disk gets a patch of the records logged after its
    /// checkpoint's start (or the parent's LSN).
    async fn cut_point(
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
    async fn point_made(
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

    // ---------------------------------------------------------------- finalize

    async fn finalize(&self, row: &VmRow) -> R<()> {
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

    // ---------------------------------------------------------------- delta replication

    async fn protected(&self, row: &VmRow, policy: &Policy) -> R<()> {
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

    // ---------------------------------------------------------------- resync

    async fn resync(&self, row: &VmRow, policy: &Policy) -> R<()> {
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
                            let idx = store.load_index(p, d.name()).await?;
                            let e = p.disk(d.name())?;
                            let patch = store.load_patches(&e.patches, e.size).await?;
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
                let p = self.cut_point(row, ds, &store, &cks, None).await?;
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
    async fn restart_log(
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

/// Chunks `first..end` of `d` that lie entirely in holes of its image (`SEEK_HOLE`).
async fn hole_chunks(d: &Disk, first: u64, end: u64, index: &DiskIndex) -> R<BTreeSet<u64>> {
    let cs = u64::from(index.chunk_size());
    let start = first * cs;
    let stop = (end * cs).min(d.size());
    let mut out = BTreeSet::new();
    if stop <= start {
        return Ok(out);
    }
    let ext = d
        .extents(start, stop - start)
        .await
        .map_err(|e| ReplError::Io {
            disk: d.name().to_string(),
            source: e,
        })?;
    let mut pos = start;
    for e in ext {
        if e.hole {
            let (a, b) = (pos.div_ceil(cs), (pos + e.length) / cs);
            out.extend(a..b);
            // A hole ending at the disk's end covers its last, shorter chunk too.
            if pos + e.length == d.size() && (d.size() / cs) * cs != d.size() {
                out.insert(d.size() / cs);
            }
        }
        pos += e.length;
    }
    Ok(out)
}

/// Halves the cycle counters now and then so health reflects recent cycles.
fn decay(v: &mut VmRow) {
    if v.cycles_due >= 100 {
        v.cycles_due /= 2;
        v.cycles_missed /= 2;
    }
}

fn check_space(dir: &Path, needed: u64) -> R<()> {
    let free = crate::fastio::free_bytes(dir).map_err(|e| ReplError::Io {
        disk: dir.display().to_string(),
        source: e,
    })?;
    if free < needed {
        return Err(ReplError::LowSpace {
            path: dir.to_path_buf(),
            free,
            needed,
        });
    }
    Ok(())
}

async fn run_hook(what: &str, cmd: Option<&str>, vm: &str) -> R<()> {
    let Some(cmd) = cmd else {
        return Ok(());
    };
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("STANDBY_VM", vm)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .map_err(|_| ReplError::Hook {
            what: what.into(),
            message: "timed out after 300 s".into(),
        })?
        .map_err(|e| ReplError::Hook {
            what: what.into(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ReplError::Hook {
            what: what.into(),
            message: format!(
                "{} exited with {}: {}",
                cmd,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// A new, empty log chain and a clean dirty bitmap (call with writes paused).
fn restart(log: &ChangeLog, dirty: Option<&crate::changelog::DirtyMap>) -> Result<(), LogError> {
    log.reset()?;
    if let Some(m) = dirty {
        m.clear()
            .map_err(LogError::io("cannot save the dirty bitmap of", log.dir()))?;
    }
    Ok(())
}

/// Seals what was cut and deletes every segment whose records all have LSN ≤ `lsn` (they are
/// in the store, or — at the start of a pass — in the image the pass reads).
fn release_through(log: &ChangeLog, lsn: u64) -> Result<(), LogError> {
    log.wait_sealed()?;
    let last = log
        .sealed_segments()
        .iter()
        .filter(|s| s.last_lsn <= lsn)
        .map(|s| s.seq)
        .max();
    match last {
        Some(seq) => log.release(seq),
        None => Ok(()),
    }
}

/// Records of the log's segments with `after < lsn <= upto`, as one patch. Every segment is
/// proven whole first (see [`crate::changelog::ship`]): anything less breaks the chain and
/// returns [`LogError::NotHealthy`] (→ full resync), never a partial patch.
pub fn patch_from_log(
    log: &ChangeLog,
    after: u64,
    upto: u64,
    disk_size: u64,
) -> Result<Patch, LogError> {
    let mut patch = Patch::new(disk_size);
    read_records(log, after, Reach::Through(upto), |h, data| {
        let res = match h.kind {
            Kind::Write | Kind::Extent => patch.write(h.offset, data),
            Kind::Trim | Kind::WriteZeroes => patch.zero(h.offset, h.length),
            Kind::Flush => Ok(()),
        };
        res.map_err(|e| LogError::Io {
            what: "cannot use a record of",
            path: log.dir().to_path_buf(),
            source: std::io::Error::other(format!("LSN {}: {e}", h.lsn)),
        })
    })?;
    Ok(patch)
}

/// Chunks touched by the log's records with LSN > `after`, and the last LSN read. With
/// [`Reach::Live`] writes may continue (the scan stops at a record being written); with
/// [`Reach::Quiesced`] (writes paused) it must reach the log's last LSN. A segment that cannot
/// be proven whole breaks the chain (→ full resync).
fn chunks_in_log(
    log: &ChangeLog,
    after: u64,
    cs: u64,
    reach: Reach,
) -> Result<(BTreeSet<u64>, u64), LogError> {
    let mut out = BTreeSet::new();
    let last = read_records(log, after, reach, |h, _| {
        if h.kind != Kind::Flush && h.length > 0 {
            out.extend(h.offset / cs..=(h.offset + h.length - 1) / cs);
        }
        Ok(())
    })?;
    Ok((out, last))
}

/// Everything the engine needs from `serve`: build it from the served disks.
pub fn disk_map(disks: impl IntoIterator<Item = Disk>) -> HashMap<String, Disk> {
    disks
        .into_iter()
        .map(|d| (d.name().to_string(), d))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect()
}
