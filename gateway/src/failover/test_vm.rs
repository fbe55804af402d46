//! A test failover's VM: the "launch VM" step of the test-failover job, the launched
//! process's state as the API, the console and `standby status` show it, and its stop when
//! the test failover is cleaned up.
//!
//! Design: once every disk of a test failover is served, the engine launches the policy's
//! failover command ([`super::launch`]) unless the request said `launch: false`. The process
//! is the gateway's child in a session of its own; its pid goes on the first export's
//! attachment row and its start time in the state database (`vm_pid_start:EXPORT`), written
//! before the request is answered, so a cleanup (from any front end, and after a gateway
//! restart) finds and stops exactly that process. A reaper thread records how it ended
//! (`vm_exit:EXPORT`) and appends it to the VM log.
//!
//! The job waits [`LAUNCH_GRACE`] for the process: a spawn error, or an exit with a non-zero
//! status (or by a signal) within it, fails the step and the job with the error, the argv[0]
//! and the last lines of the VM log; the exports stay served (boot by hand or clean up).
//! A process still running then, or one that exited with status 0, succeeds.
//!
//! Invariants: an exit is recorded only for the row that still holds the reaped pid (a later
//! test failover of the same VM is never marked by an old process); a VM is only signalled
//! after its pid's start time matched ([`super::launch::stop_pid`]); stopping (up to twice
//! [`STOP_GRACE`]) runs on a blocking thread without holding the engine's database
//! connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::actions::{self, FailoverStarted};
use super::launch::{self, ExitRecord, LaunchValues, Stopped};
use super::replica::OverlayKind;
use crate::replication::actions::ActionError;
use crate::replication::db::{Attachment, Db, DbError};
use crate::replication::engine::{blocking, Engine};
use crate::replication::status::AttachmentView;

/// How long a launched VM must keep running (or exit with status 0) for its launch to count
/// as successful.
pub const LAUNCH_GRACE: Duration = Duration::from_secs(2);
/// How long a cleanup waits after SIGTERM before SIGKILL (and again after it).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// State-database key of the start time of a launched VM's process.
pub fn pid_start_key(export: &str) -> String {
    format!("vm_pid_start:{export}")
}

fn exit_key(export: &str) -> String {
    format!("vm_exit:{export}")
}

/// The test failover's directory of `vm` (the VM's working directory, its log).
pub fn test_dir(data_dir: &Path, vm: &str) -> PathBuf {
    data_dir.join("failover").join(vm).join("test")
}

/// The launched VM's output.
pub fn vm_log(data_dir: &Path, vm: &str) -> PathBuf {
    test_dir(data_dir, vm).join("vm.log")
}

/// What a test failover did about its VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchOutcome {
    /// A failover (not a test), or a test failover asked with `launch: false`.
    #[default]
    NotRequested,
    /// No failover command is configured: boot a VM from the exports by hand.
    NoCommand,
    /// The failover command was launched (see `vm_process`).
    Launched,
    /// The launch failed (see `launch_error`); the exports stay served.
    Failed,
}

/// Whether a launched VM still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Exited,
}

/// A test failover's VM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    pub pid: u32,
    pub state: VmState,
    /// How it ended ("exited with status 3"), once it has.
    #[serde(default)]
    pub exit: Option<String>,
    /// Its exit status, if it exited (not killed) and the gateway saw it.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Its stdout and stderr.
    pub log: String,
}

/// What a cleanup did to a VM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedVm {
    pub pid: u32,
    pub outcome: Stopped,
    /// The same, as a sentence.
    pub detail: String,
}

/// Records a launched VM on the first export's row of `vm`'s test failover.
pub fn record_launch(db: &Db, vm: &str, pid: u32, start_time: u64) -> Result<(), ActionError> {
    let rows = actions::vm_attachments(db, vm, OverlayKind::Test)?;
    let Some(first) = rows.first() else {
        return Err(ActionError::NotFound(format!(
            "VM {vm} has no test failover (removed while its VM was launched)"
        )));
    };
    db.set_value(&pid_start_key(&first.export), &start_time.to_string())?;
    db.set_value(&exit_key(&first.export), "")?;
    db.set_attachment_pid(&first.export, Some(pid))?;
    Ok(())
}

/// Records how the VM process `pid` of `vm` ended, if a row still holds that pid.
pub fn record_exit(db: &Db, vm: &str, pid: u32, rec: &ExitRecord) -> Result<(), ActionError> {
    let rows = actions::vm_attachments(db, vm, OverlayKind::Test)?;
    if let Some(r) = rows.iter().find(|r| r.pid == Some(pid)) {
        let v = serde_json::to_string(rec).map_err(|e| ActionError::Invalid(e.to_string()))?;
        db.set_value(&exit_key(&r.export), &v)?;
    }
    Ok(())
}

/// The VM process recorded on `row`, if any: running if its pid still has its recorded start
/// time, else exited (how, if the gateway saw it end).
pub fn vm_process(
    data_dir: &Path,
    db: &Db,
    row: &Attachment,
) -> Result<Option<VmProcess>, DbError> {
    let Some(pid) = row.pid else {
        return Ok(None);
    };
    let log = vm_log(data_dir, &row.vm).display().to_string();
    let exit: Option<ExitRecord> = db
        .get_value(&exit_key(&row.export))?
        .and_then(|v| serde_json::from_str(&v).ok());
    if let Some(rec) = exit {
        return Ok(Some(VmProcess {
            pid,
            state: VmState::Exited,
            exit: Some(rec.describe()),
            exit_code: rec.code,
            log,
        }));
    }
    let started = db
        .get_value(&pid_start_key(&row.export))?
        .and_then(|v| v.parse::<u64>().ok());
    let running = started.is_some() && launch::start_time(pid) == started;
    Ok(Some(VmProcess {
        pid,
        state: if running {
            VmState::Running
        } else {
            VmState::Exited
        },
        exit: (!running).then(|| {
            "exited (its status was not seen: the gateway restarted since the launch)".into()
        }),
        exit_code: None,
        log,
    }))
}

/// Every attachment row as the API and `standby status --json` show it, with its VM process.
pub fn attachment_views(data_dir: &Path, db: &Db) -> Result<Vec<AttachmentView>, DbError> {
    db.attachments()?
        .into_iter()
        .map(|a| {
            let p = vm_process(data_dir, db, &a)?;
            let mut v = AttachmentView::from(a);
            v.vm_process = p;
            Ok(v)
        })
        .collect()
}

/// A recorded VM process a cleanup stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmTarget {
    pub pid: u32,
    pub start_time: Option<u64>,
}

/// The VM processes recorded on `vm`'s test failover (validates the request like
/// [`actions::begin_cleanup`], writing nothing).
pub fn cleanup_targets(db: &Db, vm: &str) -> Result<Vec<VmTarget>, ActionError> {
    let rows = actions::test_rows(db, vm)?;
    let mut out = Vec::new();
    for r in rows {
        if let Some(pid) = r.pid {
            let start_time = db
                .get_value(&pid_start_key(&r.export))?
                .and_then(|v| v.parse::<u64>().ok());
            out.push(VmTarget { pid, start_time });
        }
    }
    Ok(out)
}

/// Stops one VM process: SIGTERM, SIGKILL after [`STOP_GRACE`]. Blocks.
pub fn stop(t: VmTarget) -> StoppedVm {
    let outcome = match t.start_time {
        Some(st) if st != 0 => launch::stop_pid(t.pid, st, STOP_GRACE),
        _ => Stopped::NotSignalled,
    };
    StoppedVm {
        pid: t.pid,
        outcome,
        detail: outcome.describe(STOP_GRACE),
    }
}

/// A VM launched, its grace period not yet waited for.
pub(crate) struct PendingLaunch {
    exited: oneshot::Receiver<ExitRecord>,
    argv0: String,
}

fn failed(st: &mut FailoverStarted, why: &str, data_dir: &Path) -> String {
    let log = vm_log(data_dir, &st.vm);
    let tail = launch::log_tail(&log, 10);
    let msg = format!(
        "the test failover of VM {vm} serves its disks ({uris}), but its VM did not start: \
         {why}. Last lines of {log}:\n{tail}\nFix the failover command (`standby policy set \
         --failover-command ...`) and boot the VM from the exports by hand, or remove the test \
         failover with `standby failover cleanup {vm}`",
        vm = st.vm,
        uris = st.uris.join(" "),
        log = log.display(),
    );
    st.launch = LaunchOutcome::Failed;
    st.launch_error = Some(msg.clone());
    msg
}

impl Engine {
    /// The "launch VM" step of a test failover whose disks are served (`st.uris` set). On a
    /// launch error the job is failed and `st.launch` says so (`Ok`: the exports are served).
    pub(crate) async fn launch_test_vm(
        self: &Arc<Self>,
        st: &mut FailoverStarted,
    ) -> Result<Option<PendingLaunch>, ActionError> {
        let command = self.act_db(|db| Ok(db.policy()?.failover_command)).await?;
        let Some(command) = command else {
            st.launch = LaunchOutcome::NoCommand;
            return Ok(None);
        };
        let root = self.dd.root().to_path_buf();
        let dir = test_dir(&root, &st.vm);
        let log = vm_log(&root, &st.vm);
        let addr = actions::addr_of(&st.uris);
        let vals = LaunchValues {
            addr: &addr,
            vm: &st.vm,
            point: &st.point,
            dir: &dir,
            exports: &st.exports,
        };
        let expanded = launch::expand(&command, &vals);
        let env = vals.env();
        let job = st.job;
        let step_detail = match &expanded {
            Ok(argv) => format!("{argv:?}"),
            Err(_) => command.clone(),
        };
        self.act_db(move |db| Ok(db.step(job, "launch VM", &step_detail)?))
            .await?;
        let argv = match expanded {
            Ok(a) => a,
            Err(e) => {
                let msg = failed(st, &e.to_string(), &root);
                self.fail_job(st, msg).await?;
                return Ok(None);
            }
        };
        let (tx, exited) = oneshot::channel();
        let (vm, r) = (st.vm.clone(), root.clone());
        let on_exit = move |pid: u32, rec: ExitRecord| {
            match Db::open(&r) {
                Ok(db) => {
                    if let Err(e) = record_exit(&db, &vm, pid, &rec) {
                        warn!(vm = %vm, "cannot record the test VM's exit: {e}");
                    }
                }
                Err(e) => warn!(vm = %vm, "cannot record the test VM's exit: {e}"),
            }
            let _ = tx.send(rec);
        };
        let a = argv.clone();
        let spawned = blocking(move || launch::spawn(&a, &env, &dir, &log, on_exit)).await;
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                let msg = failed(st, &e.to_string(), &root);
                self.fail_job(st, msg).await?;
                return Ok(None);
            }
        };
        let vm = st.vm.clone();
        self.act_db(move |db| record_launch(db, &vm, spawned.pid, spawned.start_time))
            .await?;
        info!(vm = %st.vm, pid = spawned.pid, argv = ?argv, "test failover VM launched");
        st.launch = LaunchOutcome::Launched;
        st.vm_process = Some(VmProcess {
            pid: spawned.pid,
            state: VmState::Running,
            exit: None,
            exit_code: None,
            log: vm_log(&root, &st.vm).display().to_string(),
        });
        Ok(Some(PendingLaunch {
            exited,
            argv0: argv[0].clone(),
        }))
    }

    /// Waits [`LAUNCH_GRACE`] for a launched VM, then finishes the test failover's job.
    pub(crate) async fn await_test_vm(
        self: &Arc<Self>,
        mut st: FailoverStarted,
        p: PendingLaunch,
    ) -> Result<FailoverStarted, ActionError> {
        let root = self.dd.root().to_path_buf();
        let exit = match tokio::time::timeout(LAUNCH_GRACE, p.exited).await {
            Ok(Ok(rec)) => Some(rec),
            // Timed out (still running), or the reaper is gone (it always sends).
            Ok(Err(_)) | Err(_) => None,
        };
        let pid = st.vm_process.as_ref().map(|v| v.pid).unwrap_or(0);
        if let Some(rec) = exit {
            // The reaper may have seen the exit before the pid was on the row: record it here
            // too, so the attachment shows how it ended.
            let vm = st.vm.clone();
            self.act_db(move |db| record_exit(db, &vm, pid, &rec))
                .await?;
        }
        match exit {
            Some(rec) if !rec.success() => {
                let why = format!(
                    "the failover command ({:?}, pid {pid}) {} within {} s",
                    p.argv0,
                    rec.describe(),
                    LAUNCH_GRACE.as_secs()
                );
                if let Some(v) = st.vm_process.as_mut() {
                    v.state = VmState::Exited;
                    v.exit = Some(rec.describe());
                    v.exit_code = rec.code;
                }
                let msg = failed(&mut st, &why, &root);
                self.fail_job(&st, msg).await?;
            }
            exit => {
                if let (Some(rec), Some(v)) = (exit, st.vm_process.as_mut()) {
                    v.state = VmState::Exited;
                    v.exit = Some(rec.describe());
                    v.exit_code = rec.code;
                }
                let s = st.clone();
                self.act_db(move |db| actions::finish_failover(db, &s, Ok(&served_detail(&s))))
                    .await?;
            }
        }
        Ok(st)
    }

    async fn fail_job(&self, st: &FailoverStarted, msg: String) -> Result<(), ActionError> {
        let s = st.clone();
        self.act_db(move |db| actions::finish_failover(db, &s, Err(&msg)))
            .await
    }

    /// Runs `f` with the engine's database connection on the blocking pool.
    async fn act_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, ActionError> + Send + 'static,
    ) -> Result<T, ActionError> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            let g = db.lock().unwrap_or_else(|p| p.into_inner());
            f(&g)
        })
        .await
    }
}

/// The test failover job's detail once it succeeded.
pub fn served_detail(s: &FailoverStarted) -> String {
    let mut d = format!(
        "disks served in {:.2} s: {}",
        s.served_secs,
        s.uris.join(" ")
    );
    if let Some(v) = &s.vm_process {
        d.push_str(&format!("; VM launched, pid {}", v.pid));
        if let Some(e) = &v.exit {
            d.push_str(&format!(" ({e})"));
        }
        d.push_str(&format!(", output in {}", v.log));
    }
    d
}
