//! The replication engine: runs inside `standby serve` and drives every protected VM through
//! the phases kept in the state database ([`super::db`]). This file holds the engine's shared
//! state and errors; the work is split by responsibility:
//!
//! - [`super::supervisor`]: one worker per protected VM, admin requests ([`super::requests`],
//!   taken as typed messages and acted on at once), shutdown;
//! - [`super::vm`]: the per-VM state machine (which step runs, retries, outcomes);
//! - [`super::passes`]: enable protection, initial replication, the chunk pass, cutting a
//!   point, delta replication, resynchronization;
//! - [`super::consolidate`] folds long patch chains in the background, off the cut path;
//! - [`super::logscan`] reads change logs, [`super::hooks`] runs the freeze and thaw commands;
//! - [`crate::failover::attachments`] and [`crate::failover::hydrate`] serve recovery points.
//!
//! Invariants: one engine per gateway process (the data directory lock); every state change
//! of a VM is one transaction on its row, made through [`Engine::db`]; errors are classified
//! once ([`ReplError::class`]): recoverable ones retry on the back-off schedule,
//! non-recoverable ones make the VM Critical until `standby resume`, and a broken or
//! overflowed log turns into ResyncRequired.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replica_store::Store;
use thiserror::Error;
use tokio::sync::watch;
use tracing::info;

use super::db::{Db, DbError};
use super::ErrorClass;
use crate::catalog::DataDir;
use crate::changelog::{ChangeLog, LogError, LogState};
use crate::disk::{Disk, DiskError};
use crate::failover::attachments::Attached;
use crate::failover::Device;
use nbd_server::Exports;

pub use super::logscan::patch_from_log;

/// How often a worker looks at its VM's row when nothing wakes it (its own schedule: the
/// copy interval, retries, progress of passes); an admin request wakes it at once.
pub const TICK: Duration = Duration::from_millis(200);
/// How often the supervisor does its own housekeeping (restarting a worker that ended,
/// adopting hydrated disks of a commit). Requests never wait for it.
pub(crate) const SUPERVISOR_TICK: Duration = Duration::from_secs(1);
/// Checkpoint a pass at least this often.
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// Chunks read and hashed per batch of a pass.
pub(crate) const BATCH_CHUNKS: usize = 64;
/// Points are pruned at most this often per VM (pruning lists every point).
pub(crate) const PRUNE_EVERY: Duration = Duration::from_secs(60);
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
    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            ReplError::Store(e) if e.is_recoverable() => ErrorClass::Recoverable,
            ReplError::Store(_) | ReplError::Site(_) => ErrorClass::NonRecoverable,
            ReplError::DiskNotServed(_) | ReplError::DiskReadOnly(_) => ErrorClass::NonRecoverable,
            ReplError::InvalidReplica(_) => ErrorClass::NonRecoverable,
            _ => ErrorClass::Recoverable,
        }
    }

    pub(crate) fn log(disk: &str, e: LogError) -> ReplError {
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

    pub(crate) fn disk(disk: &str, e: DiskError) -> ReplError {
        match e {
            DiskError::Log(l) => Self::log(disk, l),
            other => ReplError::Disk {
                disk: disk.to_string(),
                source: other,
            },
        }
    }
}

pub(crate) type R<T> = Result<T, ReplError>;

/// The engine. One per gateway process.
pub struct Engine {
    pub(crate) dd: DataDir,
    /// Live disks served by this process (failover commits add to it).
    pub(crate) disks: std::sync::RwLock<HashMap<String, Disk>>,
    pub(crate) db: Arc<Mutex<Db>>,
    pub(crate) store: tokio::sync::Mutex<Option<Store>>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Last figures written per disk (written again only when they change).
    pub(crate) stats: Mutex<HashMap<String, (u64, String, Instant)>>,
    /// The server's export table (replica disks are added and removed here).
    pub(crate) exports: Arc<Exports<Device>>,
    /// When each VM's points were last pruned.
    pub(crate) pruned: Mutex<HashMap<String, Instant>>,
    /// Replica disks served for attachments, by export name, with their hydration task.
    pub(crate) attached: tokio::sync::Mutex<HashMap<String, Attached>>,
    /// Admin requests ([`super::requests`]): the sending side handed out by [`Engine::handle`].
    requests_tx: tokio::sync::mpsc::Sender<super::requests::Request>,
    /// Taken by [`Engine::run`].
    pub(crate) requests_rx: Mutex<Option<tokio::sync::mpsc::Receiver<super::requests::Request>>>,
    /// Background consolidations of patch chains ([`super::consolidate`]).
    pub(crate) consolidations: Arc<super::consolidate::Consolidations>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.dd.root())
            .finish()
    }
}

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

pub(crate) fn chain_hex(log: &ChangeLog) -> String {
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
        let (requests_tx, rx) = tokio::sync::mpsc::channel(super::requests::QUEUE);
        Ok(Arc::new(Engine {
            requests_tx,
            requests_rx: Mutex::new(Some(rx)),
            dd,
            disks: std::sync::RwLock::new(disks),
            db: Arc::new(Mutex::new(db)),
            store: tokio::sync::Mutex::new(None),
            shutdown,
            stats: Mutex::new(HashMap::new()),
            exports,
            pruned: Mutex::new(HashMap::new()),
            attached: tokio::sync::Mutex::new(HashMap::new()),
            consolidations: Arc::default(),
        }))
    }

    /// Where admin requests go (the API's handlers hold one).
    pub fn handle(&self) -> super::requests::EngineHandle {
        super::requests::EngineHandle::new(self.requests_tx.clone())
    }

    /// Runs `f` with the database. SQLite may wait on file I/O (a commit's sync), so the call
    /// tells the runtime that this worker blocks (`block_in_place`): the worker's other tasks
    /// move to another thread meanwhile, and the NBD and API tasks never wait behind it. The
    /// engine only runs on the multi-threaded runtime that `standby serve` builds (on a
    /// current-thread runtime `block_in_place` would panic); off the runtime (a blocking-pool
    /// thread) the call simply runs `f`.
    pub(crate) fn db<T>(&self, f: impl FnOnce(&Db) -> Result<T, DbError>) -> Result<T, DbError> {
        tokio::task::block_in_place(|| {
            let g = self.db.lock().unwrap_or_else(|p| p.into_inner());
            f(&g)
        })
    }

    /// Runs `f` with the database on the blocking pool: for writes that wait on SQLite's
    /// file I/O in a pass (checkpoints), which must not stall a runtime worker.
    pub(crate) async fn db_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            let g = db.lock().unwrap_or_else(|p| p.into_inner());
            f(&g)
        })
        .await
    }

    pub(crate) fn live_disks(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Disk>> {
        self.disks.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) async fn store(&self) -> R<Store> {
        let mut g = self.store.lock().await;
        if let Some(s) = &*g {
            return Ok(s.clone());
        }
        let s = crate::site::open_store(self.dd.root()).await?;
        *g = Some(s.clone());
        Ok(s)
    }
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
