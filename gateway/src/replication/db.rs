//! The replication state database: protected VMs, their state, the policy, jobs and resume
//! checkpoints, in one SQLite file (`<data-dir>/replication.db`, WAL mode).
//!
//! The gateway (`standby serve`) runs the engine and writes here; the CLI (`standby protect`,
//! `status`, `jobs`, `resync`, `resume`, `policy`) reads and writes the same file, so the CLI
//! works whether or not the gateway runs, and everything survives restarts. Each update is one
//! transaction.
//!
//! Every state kept here is an enum ([`super::states`], and the attachment kind
//! [`crate::failover::replica::OverlayKind`]) whose one string form is the column's value
//! (unchanged since schema 1, so existing databases open as they are); the SQL binds states as
//! parameters. No code compares states as strings.
//!
//! A job belongs to a VM, or to no VM (`vm` is empty) when it concerns the whole site, such as
//! a store verification; a job's live figures and outcome, when it has them, are JSON documents
//! in `job_data` (a table added without a schema change: older versions ignore it).
//!
//! Longer than most files (~1100 lines): each table's SQL sits next to its row type and
//! accessors, so the whole schema reads in one place; the tests are in `db_tests.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use replica_store::{ChunkId, DiskIndex};
use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use super::policy::Policy;
use super::retry::RetryState;
use crate::failover::replica::OverlayKind;

/// File name inside the data directory.
pub const DB_FILE: &str = "replication.db";
/// 2: checkpoints record the chunks stored since the pass began in `checkpoint_chunks` (the
/// `idx` column is the index the pass started from). A schema-1 database is migrated on open;
/// a standby that knows only schema 1 refuses a schema-2 database instead of resuming a pass
/// without its chunks.
const SCHEMA_VERSION: i64 = 2;
/// Finished jobs kept (the oldest are deleted beyond this).
pub const MAX_FINISHED_JOBS: i64 = 500;

#[derive(Debug, Error)]
pub enum DbError {
    #[error("replication state database {path}: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("replication state database {path} has schema version {found}; this standby knows {SCHEMA_VERSION}")]
    Schema { path: PathBuf, found: i64 },
    #[error("VM {0} is not protected")]
    NoSuchVm(String),
    #[error("VM {0} is already protected (state {1}); run `standby unprotect {0}` first")]
    AlreadyProtected(String, String),
    #[error("stored policy is invalid: {0}")]
    Policy(String),
    #[error("resume checkpoint {0} is damaged")]
    Checkpoint(String),
}

pub use super::states::{AttachmentState, CheckpointKind, JobKind, JobState, Phase, StepState};

/// One protected VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    pub name: String,
    pub disks: Vec<String>,
    pub phase: Phase,
    /// Percent done of the current phase (initial replication, resync).
    pub progress: f64,
    /// Why the VM is Critical or needs a resync.
    pub reason: String,
    /// Phase to go back to when an admin resumes a Critical VM.
    pub resume_phase: Option<Phase>,
    /// An admin asked for the resync to run now (outside the window).
    pub resync_now: bool,
    /// The next resync must hash every chunk (no trustworthy record of what changed).
    pub resync_full: bool,
    pub failures: u32,
    pub last_error: String,
    pub next_retry_ms: Option<u64>,
    pub last_point: String,
    pub last_point_ms: Option<u64>,
    pub last_cycle_ms: Option<u64>,
    pub last_app_ms: Option<u64>,
    pub cycles_due: u32,
    pub cycles_missed: u32,
    pub created_ms: u64,
}

impl VmRow {
    /// The row's retry bookkeeping as [`RetryState`], the one place retry decisions are made
    /// (the engine, `standby resume` and the API all go through it).
    pub fn retry(&self) -> RetryState {
        RetryState {
            failures: self.failures,
            last_error: (!self.last_error.is_empty()).then(|| self.last_error.clone()),
            next_attempt: self
                .next_retry_ms
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
            halted: self.phase == Phase::Critical,
        }
    }

    /// Stores `r` in the row (whether the VM is halted is its phase, set by the caller with
    /// the reason and the phase to resume).
    pub fn set_retry(&mut self, r: &RetryState) {
        self.failures = r.failures;
        self.last_error = r.last_error.clone().unwrap_or_default();
        self.next_retry_ms = r.next_attempt.map(|t| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        });
    }
}

/// Per-disk figures the gateway publishes for `standby status`.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskStat {
    pub vm: String,
    pub disk: String,
    pub size: u64,
    pub backlog: u64,
    pub log_state: String,
    pub updated_ms: u64,
}

/// A job (one run of a replication step).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: i64,
    /// Empty for a job of the whole site (a store verification).
    pub vm: String,
    pub kind: JobKind,
    pub state: JobState,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    pub progress: f64,
    pub detail: String,
    pub error: String,
}

/// A step of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    pub seq: i64,
    pub name: String,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub state: StepState,
    pub detail: String,
}

/// Resume point of a long phase (initial replication or resync) of one disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub vm: String,
    pub disk: String,
    pub kind: CheckpointKind,
    /// Change-log chain id and the LSN the phase started after.
    pub chain: String,
    pub start_lsn: u64,
    /// Position in `todo` (or the chunk index for a full pass) done so far.
    pub position: u64,
    pub total: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    /// The disk index built so far (a `DiskIndex` in its stored form), chunks committed.
    pub index: Vec<u8>,
    /// Chunks to process, as little-endian u64s; empty for a full pass.
    pub todo: Vec<u8>,
    pub done: bool,
}

impl Checkpoint {
    /// The progress to record after storing `stored` (chunk, id) since the last record.
    pub fn progress(&self, stored: Vec<(u64, ChunkId)>) -> CheckpointProgress {
        CheckpointProgress {
            vm: self.vm.clone(),
            disk: self.disk.clone(),
            position: self.position,
            bytes_read: self.bytes_read,
            bytes_sent: self.bytes_sent,
            done: self.done,
            stored,
        }
    }
}

/// A pass's progress since its last record ([`Db::checkpoint_progress`]): counters and the
/// chunks stored meanwhile, never the whole index.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointProgress {
    pub vm: String,
    pub disk: String,
    pub position: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub done: bool,
    pub stored: Vec<(u64, ChunkId)>,
}

/// A recovery point served as an export (attach, test failover, failover).
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub export: String,
    pub vm: String,
    pub disk: String,
    /// Point id.
    pub point: String,
    pub rw: bool,
    pub kind: OverlayKind,
    /// Overlay directory (for a writable attachment).
    pub dir: String,
    pub created_ms: u64,
    pub state: AttachmentState,
    pub error: String,
    /// Hydration percent (failover).
    pub progress: f64,
    pub served_ms: Option<u64>,
    /// Process launched for a test failover (on the first disk's row).
    pub pid: Option<u32>,
}

/// The database handle (one connection; the engine serializes its use).
pub struct Db {
    path: PathBuf,
    conn: Connection,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Db({})", self.path.display())
    }
}

fn now_ms() -> u64 {
    super::now_ms()
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

impl Db {
    /// Opens (creating if needed) the database of a data directory.
    pub fn open(data_dir: &Path) -> Result<Db, DbError> {
        let path = data_dir.join(DB_FILE);
        let e = |source| DbError::Sql {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(e)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(e)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(e)?;
        // WAL + NORMAL: a commit survives a process crash; a power loss may lose the last
        // commits, which only repeats work (checkpoints name committed chunks only, and a host
        // crash breaks the change-log chain, which forces a resync anyway).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(e)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS vms(
                name TEXT PRIMARY KEY, disks TEXT NOT NULL, phase TEXT NOT NULL,
                progress REAL NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',
                resume_phase TEXT NOT NULL DEFAULT '', resync_now INTEGER NOT NULL DEFAULT 0,
                resync_full INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
                last_error TEXT NOT NULL DEFAULT '', next_retry_ms INTEGER,
                last_point TEXT NOT NULL DEFAULT '', last_point_ms INTEGER,
                last_cycle_ms INTEGER, last_app_ms INTEGER,
                cycles_due INTEGER NOT NULL DEFAULT 0, cycles_missed INTEGER NOT NULL DEFAULT 0,
                created_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS disk_stats(
                vm TEXT NOT NULL, disk TEXT NOT NULL, size INTEGER NOT NULL,
                backlog INTEGER NOT NULL, log_state TEXT NOT NULL, updated_ms INTEGER NOT NULL,
                PRIMARY KEY(vm, disk));
             CREATE TABLE IF NOT EXISTS jobs(
                id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, kind TEXT NOT NULL,
                state TEXT NOT NULL, created_ms INTEGER NOT NULL, finished_ms INTEGER,
                progress REAL NOT NULL DEFAULT 0, detail TEXT NOT NULL DEFAULT '',
                error TEXT NOT NULL DEFAULT '');
             CREATE TABLE IF NOT EXISTS job_steps(
                job INTEGER NOT NULL, seq INTEGER NOT NULL, name TEXT NOT NULL,
                started_ms INTEGER NOT NULL, finished_ms INTEGER, state TEXT NOT NULL,
                detail TEXT NOT NULL DEFAULT '', PRIMARY KEY(job, seq));
             CREATE TABLE IF NOT EXISTS checkpoints(
                vm TEXT NOT NULL, disk TEXT NOT NULL, kind TEXT NOT NULL, chain TEXT NOT NULL,
                start_lsn INTEGER NOT NULL, position INTEGER NOT NULL, total INTEGER NOT NULL,
                bytes_read INTEGER NOT NULL, bytes_sent INTEGER NOT NULL, idx BLOB NOT NULL,
                todo BLOB NOT NULL, done INTEGER NOT NULL, PRIMARY KEY(vm, disk));
             CREATE TABLE IF NOT EXISTS attachments(
                export TEXT PRIMARY KEY, vm TEXT NOT NULL, disk TEXT NOT NULL,
                point TEXT NOT NULL, rw INTEGER NOT NULL, kind TEXT NOT NULL, dir TEXT NOT NULL,
                created_ms INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'requested',
                error TEXT NOT NULL DEFAULT '', progress REAL NOT NULL DEFAULT 0,
                served_ms INTEGER, pid INTEGER);
             CREATE TABLE IF NOT EXISTS checkpoint_chunks(
                vm TEXT NOT NULL, disk TEXT NOT NULL, chunk INTEGER NOT NULL, id BLOB NOT NULL,
                PRIMARY KEY(vm, disk, chunk));
             CREATE TABLE IF NOT EXISTS job_data(
                job INTEGER PRIMARY KEY, counts TEXT, result TEXT);
             CREATE TABLE IF NOT EXISTS vm_uploads(
                vm TEXT PRIMARY KEY, points INTEGER NOT NULL, puts INTEGER NOT NULL,
                bytes INTEGER NOT NULL);",
        )
        .map_err(e)?;
        let db = Db { path, conn };
        match db.meta("schema")? {
            None => db.set_meta("schema", &SCHEMA_VERSION.to_string())?,
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            // Schema 1 differs only by the table created above (its checkpoints hold whole
            // indexes, which read the same with no chunk rows).
            Some(v) if v == "1" => db.set_meta("schema", &SCHEMA_VERSION.to_string())?,
            Some(v) => {
                return Err(DbError::Schema {
                    path: db.path.clone(),
                    found: v.parse().unwrap_or(-1),
                })
            }
        }
        Ok(db)
    }

    fn err(&self, source: rusqlite::Error) -> DbError {
        DbError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn meta(&self, key: &str) -> Result<Option<String>, DbError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO meta(key, value) VALUES(?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The site's replication policy (the default until one is set).
    pub fn policy(&self) -> Result<Policy, DbError> {
        match self.meta("policy")? {
            None => Ok(Policy::default()),
            Some(s) => serde_json::from_str(&s).map_err(|e| DbError::Policy(e.to_string())),
        }
    }

    pub fn set_policy(&self, p: &Policy) -> Result<(), DbError> {
        let s = serde_json::to_string(p).map_err(|e| DbError::Policy(e.to_string()))?;
        self.set_meta("policy", &s)
    }

    fn vm_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRow> {
        let disks: String = r.get("disks")?;
        let resume: String = r.get("resume_phase")?;
        Ok(VmRow {
            name: r.get("name")?,
            disks: disks
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            phase: r.get("phase")?,
            progress: r.get("progress")?,
            reason: r.get("reason")?,
            resume_phase: Phase::parse(&resume),
            resync_now: r.get::<_, i64>("resync_now")? != 0,
            resync_full: r.get::<_, i64>("resync_full")? != 0,
            failures: r.get::<_, i64>("failures")?.max(0) as u32,
            last_error: r.get("last_error")?,
            next_retry_ms: opt_u64(r.get("next_retry_ms")?),
            last_point: r.get("last_point")?,
            last_point_ms: opt_u64(r.get("last_point_ms")?),
            last_cycle_ms: opt_u64(r.get("last_cycle_ms")?),
            last_app_ms: opt_u64(r.get("last_app_ms")?),
            cycles_due: r.get::<_, i64>("cycles_due")?.max(0) as u32,
            cycles_missed: r.get::<_, i64>("cycles_missed")?.max(0) as u32,
            created_ms: r.get::<_, i64>("created_ms")?.max(0) as u64,
        })
    }

    pub fn vms(&self) -> Result<Vec<VmRow>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM vms ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], Self::vm_from_row)
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e));
        rows
    }

    pub fn vm(&self, name: &str) -> Result<Option<VmRow>, DbError> {
        self.conn
            .query_row("SELECT * FROM vms WHERE name=?1", [name], Self::vm_from_row)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Registers a VM for protection (phase EnablingProtection).
    pub fn insert_vm(&self, name: &str, disks: &[String]) -> Result<(), DbError> {
        self.write_tx(|| {
            if let Some(v) = self.vm(name)? {
                return Err(DbError::AlreadyProtected(
                    name.to_string(),
                    v.phase.to_string(),
                ));
            }
            self.conn
                .execute(
                    "INSERT INTO vms(name, disks, phase, created_ms) VALUES(?1, ?2, ?3, ?4)",
                    params![
                        name,
                        disks.join(","),
                        Phase::EnablingProtection,
                        now_ms() as i64
                    ],
                )
                .map(|_| ())
                .map_err(|e| self.err(e))
        })
    }

    /// Writes every mutable field of a VM row.
    pub fn update_vm(&self, v: &VmRow) -> Result<(), DbError> {
        let n = self
            .conn
            .execute(
                "UPDATE vms SET phase=?2, progress=?3, reason=?4, resume_phase=?5, resync_now=?6,
                 resync_full=?7, failures=?8, last_error=?9, next_retry_ms=?10, last_point=?11,
                 last_point_ms=?12, last_cycle_ms=?13, last_app_ms=?14, cycles_due=?15,
                 cycles_missed=?16 WHERE name=?1",
                params![
                    v.name,
                    v.phase,
                    v.progress,
                    v.reason,
                    v.resume_phase.map(|p| p.as_str()).unwrap_or(""),
                    v.resync_now as i64,
                    v.resync_full as i64,
                    v.failures as i64,
                    v.last_error,
                    v.next_retry_ms.map(|x| x as i64),
                    v.last_point,
                    v.last_point_ms.map(|x| x as i64),
                    v.last_cycle_ms.map(|x| x as i64),
                    v.last_app_ms.map(|x| x as i64),
                    v.cycles_due as i64,
                    v.cycles_missed as i64,
                ],
            )
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(DbError::NoSuchVm(v.name.clone()));
        }
        Ok(())
    }

    /// Runs `f` in a write transaction taken up front (`BEGIN IMMEDIATE`), so a
    /// read-modify-write never fails on a lock upgrade when the CLI and the gateway race: the
    /// second waits (busy timeout) instead.
    fn write_tx<T>(&self, f: impl FnOnce() -> Result<T, DbError>) -> Result<T, DbError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        match f() {
            Ok(v) => {
                self.conn.execute_batch("COMMIT").map_err(|e| self.err(e))?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Applies `f` to a VM row in one transaction (for CLI requests racing the engine).
    pub fn modify_vm(&self, name: &str, f: impl FnOnce(&mut VmRow)) -> Result<VmRow, DbError> {
        self.write_tx(|| {
            let mut v = self
                .vm(name)?
                .ok_or_else(|| DbError::NoSuchVm(name.to_string()))?;
            f(&mut v);
            self.update_vm(&v)?;
            Ok(v)
        })
    }

    pub fn delete_vm(&self, name: &str) -> Result<bool, DbError> {
        self.write_tx(|| {
            let n = self
                .conn
                .execute("DELETE FROM vms WHERE name=?1", [name])
                .map_err(|e| self.err(e))?;
            for t in [
                "disk_stats",
                "checkpoints",
                "checkpoint_chunks",
                "vm_uploads",
            ] {
                self.conn
                    .execute(&format!("DELETE FROM {t} WHERE vm=?1"), [name])
                    .map_err(|e| self.err(e))?;
            }
            Ok(n > 0)
        })
    }

    /// Adds writes to the store to the VM's totals (for `/metrics`; kept until the VM is
    /// unprotected): a published point's (`PointMeta::upload`, `points` 1) or a pass's chunks
    /// (initial replication, resync: stored by the pass's own session, `points` 0).
    pub fn add_upload(&self, vm: &str, points: u64, puts: u64, bytes: u64) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO vm_uploads(vm, points, puts, bytes) VALUES(?1, ?2, ?3, ?4)
                 ON CONFLICT(vm) DO UPDATE SET points=points+excluded.points,
                   puts=puts+excluded.puts, bytes=bytes+excluded.bytes",
                params![vm, points as i64, puts as i64, bytes as i64],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Every VM's upload totals: (vm, points, puts, bytes).
    pub fn uploads(&self) -> Result<Vec<(String, u64, u64, u64)>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT vm, points, puts, bytes FROM vm_uploads ORDER BY vm")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, i64>(3)? as u64,
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn put_disk_stat(&self, s: &DiskStat) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO disk_stats(vm, disk, size, backlog, log_state, updated_ms)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(vm, disk) DO UPDATE SET size=excluded.size,
                   backlog=excluded.backlog, log_state=excluded.log_state,
                   updated_ms=excluded.updated_ms",
                params![
                    s.vm,
                    s.disk,
                    s.size as i64,
                    s.backlog as i64,
                    s.log_state,
                    s.updated_ms as i64
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn disk_stats(&self, vm: &str) -> Result<Vec<DiskStat>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM disk_stats WHERE vm=?1 ORDER BY disk")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([vm], |r| {
                Ok(DiskStat {
                    vm: r.get("vm")?,
                    disk: r.get("disk")?,
                    size: r.get::<_, i64>("size")?.max(0) as u64,
                    backlog: r.get::<_, i64>("backlog")?.max(0) as u64,
                    log_state: r.get("log_state")?,
                    updated_ms: r.get::<_, i64>("updated_ms")?.max(0) as u64,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e));
        rows
    }

    // ---- jobs ----

    pub fn start_job(&self, vm: &str, kind: JobKind) -> Result<i64, DbError> {
        self.conn
            .execute(
                "INSERT INTO jobs(vm, kind, state, created_ms) VALUES(?1, ?2, ?3, ?4)",
                params![vm, kind, JobState::Running, now_ms() as i64],
            )
            .map_err(|e| self.err(e))?;
        let id = self.conn.last_insert_rowid();
        // Bound the history.
        self.conn
            .execute(
                "DELETE FROM jobs WHERE state!=?2 AND id <= (SELECT id FROM jobs
                 WHERE state!=?2 ORDER BY id DESC LIMIT 1 OFFSET ?1)",
                params![MAX_FINISHED_JOBS, JobState::Running],
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "DELETE FROM job_steps WHERE job NOT IN (SELECT id FROM jobs)",
                [],
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "DELETE FROM job_data WHERE job NOT IN (SELECT id FROM jobs)",
                [],
            )
            .map_err(|e| self.err(e))?;
        Ok(id)
    }

    /// Starts a job of `kind` unless one of that kind is running: `Err(id)` names the running
    /// one. Check and insert are one transaction, so two callers cannot both start one.
    pub fn start_job_alone(&self, vm: &str, kind: JobKind) -> Result<Result<i64, i64>, DbError> {
        self.write_tx(|| {
            let running: Option<i64> = self
                .conn
                .query_row(
                    "SELECT id FROM jobs WHERE kind=?1 AND state=?2 ORDER BY id LIMIT 1",
                    params![kind, JobState::Running],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.err(e))?;
            match running {
                Some(id) => Ok(Err(id)),
                None => self.start_job(vm, kind).map(Ok),
            }
        })
    }

    /// Records a job's live figures (`counts`) or its outcome (`result`), each a JSON
    /// document; `None` leaves the stored one.
    pub fn set_job_data(
        &self,
        id: i64,
        counts: Option<&str>,
        result: Option<&str>,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO job_data(job, counts, result) VALUES(?1, ?2, ?3)
                 ON CONFLICT(job) DO UPDATE SET counts=COALESCE(?2, counts),
                 result=COALESCE(?3, result)",
                params![id, counts, result],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// A job's live figures and outcome as [`Db::set_job_data`] stored them.
    pub fn job_data(&self, id: i64) -> Result<(Option<String>, Option<String>), DbError> {
        self.conn
            .query_row(
                "SELECT counts, result FROM job_data WHERE job=?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| self.err(e))
    }

    pub fn job_progress(&self, id: i64, progress: f64, detail: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "UPDATE jobs SET progress=?2, detail=?3 WHERE id=?1",
                params![id, progress, detail],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn finish_job(
        &self,
        id: i64,
        state: JobState,
        detail: &str,
        error: &str,
    ) -> Result<(), DbError> {
        let progress: Option<f64> = (state == JobState::Succeeded).then_some(100.0);
        self.conn
            .execute(
                "UPDATE jobs SET state=?2, finished_ms=?3, detail=CASE WHEN ?4='' THEN detail ELSE ?4 END,
                 error=?5, progress=COALESCE(?6, progress) WHERE id=?1",
                params![id, state, now_ms() as i64, detail, error, progress],
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "UPDATE job_steps SET state=?2, finished_ms=?3 WHERE job=?1 AND finished_ms IS NULL",
                params![id, state.step_end(), now_ms() as i64],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Jobs left "running" by a gateway that stopped are marked interrupted at start-up.
    pub fn interrupt_running_jobs(&self) -> Result<usize, DbError> {
        let n = self
            .conn
            .execute(
                "UPDATE jobs SET state=?2, finished_ms=?1,
                 error=CASE WHEN kind=?4
                   THEN 'the gateway stopped while the verification ran (nothing resumes it: ask again)'
                   ELSE 'the gateway stopped while the job ran (it resumes in a new job)' END
                 WHERE state=?3",
                params![
                    now_ms() as i64,
                    JobState::Interrupted,
                    JobState::Running,
                    JobKind::StoreVerify
                ],
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "UPDATE job_steps SET state=?2, finished_ms=?1 WHERE finished_ms IS NULL",
                params![now_ms() as i64, StepState::Interrupted],
            )
            .map_err(|e| self.err(e))?;
        Ok(n)
    }

    /// Starts a step (finishing the job's previous one).
    pub fn step(&self, job: i64, name: &str, detail: &str) -> Result<(), DbError> {
        let now = now_ms() as i64;
        self.conn
            .execute(
                "UPDATE job_steps SET state=?3, finished_ms=?2 WHERE job=?1 AND finished_ms IS NULL",
                params![job, now, StepState::Done],
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "INSERT INTO job_steps(job, seq, name, started_ms, state, detail)
                 VALUES(?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_steps WHERE job=?1), ?2, ?3, ?5, ?4)",
                params![job, name, now, detail, StepState::Running],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
        Ok(JobRow {
            id: r.get("id")?,
            vm: r.get("vm")?,
            kind: r.get("kind")?,
            state: r.get("state")?,
            created_ms: r.get::<_, i64>("created_ms")?.max(0) as u64,
            finished_ms: opt_u64(r.get("finished_ms")?),
            progress: r.get("progress")?,
            detail: r.get("detail")?,
            error: r.get("error")?,
        })
    }

    /// The most recent jobs, newest first.
    pub fn jobs(&self, limit: usize, vm: Option<&str>) -> Result<Vec<JobRow>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM jobs WHERE (?1 IS NULL OR vm=?1) ORDER BY id DESC LIMIT ?2")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![vm, limit as i64], Self::job_from_row)
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e));
        rows
    }

    pub fn job(&self, id: i64) -> Result<Option<(JobRow, Vec<StepRow>)>, DbError> {
        let Some(j) = self
            .conn
            .query_row("SELECT * FROM jobs WHERE id=?1", [id], Self::job_from_row)
            .optional()
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        let mut st = self
            .conn
            .prepare("SELECT * FROM job_steps WHERE job=?1 ORDER BY seq")
            .map_err(|e| self.err(e))?;
        let steps = st
            .query_map([id], |r| {
                Ok(StepRow {
                    seq: r.get("seq")?,
                    name: r.get("name")?,
                    started_ms: r.get::<_, i64>("started_ms")?.max(0) as u64,
                    finished_ms: opt_u64(r.get("finished_ms")?),
                    state: r.get("state")?,
                    detail: r.get("detail")?,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        Ok(Some((j, steps)))
    }

    // ---- meta values for the CLI ----

    /// A free-form value the gateway publishes (e.g. its NBD address).
    pub fn get_value(&self, key: &str) -> Result<Option<String>, DbError> {
        self.meta(&format!("value.{key}"))
    }

    pub fn set_value(&self, key: &str, value: &str) -> Result<(), DbError> {
        self.set_meta(&format!("value.{key}"), value)
    }

    // ---- attachments ----

    pub fn add_attachment(&self, a: &Attachment) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO attachments(export, vm, disk, point, rw, kind, dir, created_ms, state)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    a.export,
                    a.vm,
                    a.disk,
                    a.point,
                    a.rw as i64,
                    a.kind,
                    a.dir,
                    a.created_ms as i64,
                    AttachmentState::Requested,
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn attachments(&self) -> Result<Vec<Attachment>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM attachments ORDER BY export")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(Attachment {
                    export: r.get("export")?,
                    vm: r.get("vm")?,
                    disk: r.get("disk")?,
                    point: r.get("point")?,
                    rw: r.get::<_, i64>("rw")? != 0,
                    kind: r.get("kind")?,
                    dir: r.get("dir")?,
                    created_ms: r.get::<_, i64>("created_ms")?.max(0) as u64,
                    state: r.get("state")?,
                    error: r.get("error")?,
                    progress: r.get("progress")?,
                    served_ms: opt_u64(r.get("served_ms")?),
                    pid: r.get::<_, Option<i64>>("pid")?.map(|p| p.max(0) as u32),
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e));
        rows
    }

    pub fn set_attachment(
        &self,
        export: &str,
        state: AttachmentState,
        error: &str,
        progress: f64,
    ) -> Result<(), DbError> {
        // The first time it is served, the row records when.
        let served_now: Option<i64> = (state == AttachmentState::Served).then(|| now_ms() as i64);
        self.conn
            .execute(
                "UPDATE attachments SET state=?2, error=?3, progress=?4,
                 served_ms=COALESCE(served_ms, ?5) WHERE export=?1",
                params![export, state, error, progress, served_now],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// A hydration's progress (`hydrated`: complete) or failure (`error`). Unlike
    /// [`Db::set_attachment`] it never takes a row out of `Commit`: a `failover commit`
    /// requested while the disk hydrates must survive the hydration's own updates (they used
    /// to overwrite it with `Served` / `Hydrated`, and the commit then waited forever).
    pub fn set_hydration(
        &self,
        export: &str,
        hydrated: bool,
        error: &str,
        progress: f64,
    ) -> Result<(), DbError> {
        let state = if hydrated {
            AttachmentState::Hydrated
        } else {
            AttachmentState::Served
        };
        self.conn
            .execute(
                "UPDATE attachments SET state=CASE WHEN state=?5 THEN state ELSE ?2 END,
                 error=?3, progress=?4, served_ms=COALESCE(served_ms, ?6) WHERE export=?1",
                params![
                    export,
                    state,
                    error,
                    progress,
                    AttachmentState::Commit,
                    now_ms() as i64
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn set_attachment_pid(&self, export: &str, pid: Option<u32>) -> Result<(), DbError> {
        self.conn
            .execute(
                "UPDATE attachments SET pid=?2 WHERE export=?1",
                params![export, pid.map(i64::from)],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn delete_attachment(&self, export: &str) -> Result<bool, DbError> {
        self.conn
            .execute("DELETE FROM attachments WHERE export=?1", [export])
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    // ---- checkpoints ----

    /// The checkpoint of a disk's pass, its index complete: the index the pass started from
    /// with every chunk recorded since applied.
    pub fn checkpoint(&self, vm: &str, disk: &str) -> Result<Option<Checkpoint>, DbError> {
        let Some(mut c) = self.checkpoint_row(vm, disk)? else {
            return Ok(None);
        };
        let mut st = self
            .conn
            .prepare("SELECT chunk, id FROM checkpoint_chunks WHERE vm=?1 AND disk=?2")
            .map_err(|e| self.err(e))?;
        let chunks = st
            .query_map([vm, disk], |r| {
                Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))?;
        if !chunks.is_empty() {
            let bad = |e: String| DbError::Checkpoint(format!("{vm}/{disk}: {e}"));
            let mut index =
                DiskIndex::from_bytes(&c.index, "checkpoint").map_err(|e| bad(e.to_string()))?;
            for (ci, id) in chunks {
                let id: [u8; 32] = id
                    .try_into()
                    .map_err(|_| bad(format!("chunk {ci} has an id that is not 32 bytes")))?;
                index.set(ci, ChunkId(id)).map_err(|e| bad(e.to_string()))?;
            }
            c.index = index.to_bytes();
        }
        Ok(Some(c))
    }

    fn checkpoint_row(&self, vm: &str, disk: &str) -> Result<Option<Checkpoint>, DbError> {
        self.conn
            .query_row(
                "SELECT * FROM checkpoints WHERE vm=?1 AND disk=?2",
                [vm, disk],
                |r| {
                    Ok(Checkpoint {
                        vm: r.get("vm")?,
                        disk: r.get("disk")?,
                        kind: r.get("kind")?,
                        chain: r.get("chain")?,
                        start_lsn: r.get::<_, i64>("start_lsn")?.max(0) as u64,
                        position: r.get::<_, i64>("position")?.max(0) as u64,
                        total: r.get::<_, i64>("total")?.max(0) as u64,
                        bytes_read: r.get::<_, i64>("bytes_read")?.max(0) as u64,
                        bytes_sent: r.get::<_, i64>("bytes_sent")?.max(0) as u64,
                        index: r.get("idx")?,
                        todo: r.get("todo")?,
                        done: r.get::<_, i64>("done")? != 0,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Starts a pass's checkpoint: `c.index` is the index the pass starts from (chunks recorded
    /// for an earlier pass of the disk are dropped).
    pub fn put_checkpoint(&self, c: &Checkpoint) -> Result<(), DbError> {
        self.write_tx(|| {
            self.conn
                .execute(
                    "DELETE FROM checkpoint_chunks WHERE vm=?1 AND disk=?2",
                    [&c.vm, &c.disk],
                )
                .map_err(|e| self.err(e))?;
            self.put_checkpoint_row(c)
        })
    }

    /// Records a pass's progress and the chunks it stored since the last record, in one
    /// transaction whose size follows the change (never the whole index).
    pub fn checkpoint_progress(&self, p: &CheckpointProgress) -> Result<(), DbError> {
        self.write_tx(|| {
            let n = self
                .conn
                .execute(
                    "UPDATE checkpoints SET position=?3, bytes_read=?4, bytes_sent=?5, done=?6
                     WHERE vm=?1 AND disk=?2",
                    params![
                        p.vm,
                        p.disk,
                        p.position as i64,
                        p.bytes_read as i64,
                        p.bytes_sent as i64,
                        p.done as i64
                    ],
                )
                .map_err(|e| self.err(e))?;
            if n == 0 {
                return Err(DbError::Checkpoint(format!(
                    "{}/{}: no checkpoint to record progress in",
                    p.vm, p.disk
                )));
            }
            let mut st = self
                .conn
                .prepare_cached(
                    "INSERT INTO checkpoint_chunks(vm, disk, chunk, id) VALUES(?1, ?2, ?3, ?4)
                     ON CONFLICT(vm, disk, chunk) DO UPDATE SET id=excluded.id",
                )
                .map_err(|e| self.err(e))?;
            for (ci, id) in &p.stored {
                st.execute(params![p.vm, p.disk, *ci as i64, &id.0[..]])
                    .map_err(|e| self.err(e))?;
            }
            Ok(())
        })
    }

    fn put_checkpoint_row(&self, c: &Checkpoint) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO checkpoints(vm, disk, kind, chain, start_lsn, position, total,
                   bytes_read, bytes_sent, idx, todo, done)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT(vm, disk) DO UPDATE SET kind=excluded.kind, chain=excluded.chain,
                   start_lsn=excluded.start_lsn, position=excluded.position,
                   total=excluded.total, bytes_read=excluded.bytes_read,
                   bytes_sent=excluded.bytes_sent, idx=excluded.idx, todo=excluded.todo,
                   done=excluded.done",
                params![
                    c.vm,
                    c.disk,
                    c.kind,
                    c.chain,
                    c.start_lsn as i64,
                    c.position as i64,
                    c.total as i64,
                    c.bytes_read as i64,
                    c.bytes_sent as i64,
                    c.index,
                    c.todo,
                    c.done as i64
                ],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn clear_checkpoints(&self, vm: &str) -> Result<(), DbError> {
        self.write_tx(|| {
            for t in ["checkpoints", "checkpoint_chunks"] {
                self.conn
                    .execute(&format!("DELETE FROM {t} WHERE vm=?1"), [vm])
                    .map_err(|e| self.err(e))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
#[path = "db_tests.rs"]
mod tests;
