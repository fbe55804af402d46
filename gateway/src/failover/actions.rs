//! Failover actions: attach / detach a recovery point, test failover and its cleanup, planned
//! failover (prepare, on the primary), failover and commit (on the recovery gateway).
//!
//! The one implementation behind both the CLI (`standby attach`, `standby failover …`) and the
//! HTTP API (`POST /api/v1/attachments`, `POST /api/v1/vms/{vm}/failover/…`). Each action takes
//! a typed request, validates all of it — names, the store's points (and a store that went
//! back in time), the attachments and VMs already there — and only then writes: an invalid
//! request changes nothing and returns an [`ActionError`] whose message says what to do.
//!
//! Writing means adding or changing rows of the state database (`attachments`, `jobs`). While
//! a gateway runs, its engine runs these functions itself ([`crate::replication::requests`])
//! and serves or drops the exports right after; the waits ([`await_prepared`],
//! [`await_committed`]) run as the engine's tasks and finish the jobs. With no gateway running,
//! the CLI runs only the ones that need no gateway (detach, cleanup) and the checks.
//!
//! Listing the store's points is async and networked: callers list them
//! (`Store::list_points_checked`) and pass them in; the rollback check ([`check_points`]) is
//! here so both front ends refuse the same stores.
//!
//! A test failover's VM process (the policy's failover command) is launched by the engine
//! once the disks are served and stopped by the cleanup before the exports are dropped
//! ([`super::test_vm`]); here are the rows and steps around it.
//!
//! Synchronous (SQLite, sleeps while waiting): call from a blocking thread, not a tokio worker.
//!
//! Past 700 lines on purpose: every failover action's validation and writes are kept in this
//! one file so that the CLI's offline path and the engine share them line for line; the test
//! VM's process handling is in [`super::test_vm`] and [`super::launch`].

use std::path::Path;
use std::time::{Duration, Instant};

use replica_store::{Consistency, PointMeta};
use serde::{Deserialize, Serialize};

use super::replica::{is_overlay_dir, overlay_dir, OverlayKind};
use super::test_vm::{self, LaunchOutcome, StoppedVm, VmProcess};
use crate::catalog::DataDir;
use crate::replication::actions::ActionError;
use crate::replication::db::{Attachment, AttachmentState, Db, JobKind, JobState, Phase};
use crate::replication::now_ms;

fn invalid(e: impl std::fmt::Display) -> ActionError {
    ActionError::Invalid(e.to_string())
}

fn name(kind: &str, n: &str) -> Result<(), ActionError> {
    replica_store::point::validate_name(kind, n).map_err(invalid)
}

// ---- the store's points ----

fn seen_key(vm: &str) -> String {
    format!("store_seen:{vm}")
}

/// The newest point id of `vm` this gateway has seen in the store (or published).
pub fn seen(db: &Db, vm: &str) -> Result<Option<String>, ActionError> {
    let mut best = db.get_value(&seen_key(vm))?;
    if let Some(v) = db.vm(vm)? {
        if !v.last_point.is_empty() && best.as_deref().is_none_or(|b| v.last_point.as_str() > b) {
            best = Some(v.last_point);
        }
    }
    Ok(best)
}

/// A rollback found: (the newest point this gateway saw, the store's newest or "none").
pub fn rollback(
    db: &Db,
    vm: &str,
    points: &[PointMeta],
) -> Result<Option<(String, String)>, ActionError> {
    let newest = points
        .iter()
        .filter(|p| p.vm == vm)
        .map(|p| p.id.as_str())
        .max();
    let Some(mark) = seen(db, vm)? else {
        return Ok(None);
    };
    match newest {
        Some(n) if n >= mark.as_str() => Ok(None),
        n => Ok(Some((mark, n.unwrap_or("none").to_string()))),
    }
}

/// Raises the seen marks of the VMs in `points` to their newest point.
pub fn record_seen(db: &Db, points: &[PointMeta]) -> Result<(), ActionError> {
    let mut newest: std::collections::BTreeMap<&str, &str> = Default::default();
    for p in points {
        let e = newest.entry(&p.vm).or_insert(&p.id);
        if p.id.as_str() > *e {
            *e = &p.id;
        }
    }
    for (vm, id) in newest {
        if db.get_value(&seen_key(vm))?.is_none_or(|m| id > m.as_str()) {
            db.set_value(&seen_key(vm), id)?;
        }
    }
    Ok(())
}

/// Refuses a store that went back in time for `vm` unless `accept_rollback` (then returns a
/// warning to show). Does not write: the mark is raised by [`record_seen`] once the action
/// is under way.
pub fn check_points(
    db: &Db,
    vm: &str,
    points: &[PointMeta],
    accept_rollback: bool,
) -> Result<Option<String>, ActionError> {
    match rollback(db, vm, points)? {
        None => Ok(None),
        Some((mark, newest)) if accept_rollback => Ok(Some(format!(
            "the store went back in time for VM {vm} (seen {mark}, newest {newest}): accepted"
        ))),
        Some((mark, newest)) => Err(ActionError::Conflict(format!(
            "the store went back in time for VM {vm}: this gateway has seen point {mark}, the \
             store's newest is {newest} (points deleted elsewhere or an old copy of the store \
             restored). Check the store; to use it anyway accept the store rollback \
             (--accept-store-rollback, or \"accept_store_rollback\": true)"
        ))),
    }
}

/// Picks a point of `vm` by spec: `latest` (or empty), `app` (newest app-consistent), a point
/// id or its prefix, or a UTC time `YYYY-MM-DDTHH:MM[:SS]` (the newest point at or before it).
pub fn pick_point(points: &[PointMeta], vm: &str, spec: &str) -> Result<PointMeta, ActionError> {
    let mine: Vec<&PointMeta> = points.iter().filter(|p| p.vm == vm).collect();
    if mine.is_empty() {
        return Err(ActionError::NotFound(format!(
            "VM {vm} has no recovery point in the store (see `standby point list`)"
        )));
    }
    let found = match spec {
        "latest" | "" => mine.last().copied(),
        "app" => mine
            .iter()
            .rev()
            .find(|p| p.consistency == Consistency::App)
            .copied(),
        s if s.len() >= 16 && s.as_bytes().get(4) == Some(&b'-') => {
            // A UTC time: compare in the id format.
            let mut want: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
            if want.len() < 12 {
                return Err(ActionError::Invalid(format!(
                    "{s:?} is not a UTC time: use YYYY-MM-DDTHH:MM[:SS]"
                )));
            }
            while want.len() < 14 {
                want.push('9');
            }
            let key = format!("{}T{}", &want[..8], &want[8..14]);
            mine.iter()
                .rev()
                .find(|p| p.id.get(..15).is_some_and(|id| id <= key.as_str()))
                .copied()
        }
        s => mine
            .iter()
            .find(|p| p.id == s || p.id.starts_with(s))
            .copied(),
    };
    found.cloned().ok_or_else(|| {
        ActionError::NotFound(format!(
            "no point of VM {vm} matches {spec:?} (see `standby point list {vm}`)"
        ))
    })
}

fn default_point() -> String {
    "latest".into()
}

// ---- attach / detach ----

/// `standby attach VM/DISK[@POINT] [--rw]` / `POST /api/v1/attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub vm: String,
    pub disk: String,
    /// `latest` (default), `app`, a point id or a UTC time.
    #[serde(default = "default_point")]
    pub point: String,
    /// Writable through a local copy-on-write overlay (the point itself never changes).
    #[serde(default)]
    pub rw: bool,
    /// Use the store even if its newest point is older than one this gateway has seen.
    #[serde(default)]
    pub accept_store_rollback: bool,
}

impl AttachRequest {
    /// From the CLI's `VM/DISK[@POINT]`.
    pub fn from_spec(
        spec: &str,
        rw: bool,
        accept_store_rollback: bool,
    ) -> Result<Self, ActionError> {
        let (vm, rest) = spec
            .split_once('/')
            .ok_or_else(|| invalid(format!("{spec:?}: give VM/DISK or VM/DISK@POINT")))?;
        let (disk, point) = rest.split_once('@').unwrap_or((rest, "latest"));
        Ok(Self {
            vm: vm.into(),
            disk: disk.into(),
            point: point.into(),
            rw,
            accept_store_rollback,
        })
    }
}

/// What was requested (the engine serves it before answering).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attached {
    pub export: String,
    pub vm: String,
    pub disk: String,
    pub point: String,
    pub rw: bool,
    pub size_bytes: u64,
    /// Set when a store rollback was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Checks the names before the store is listed (a bad name never reaches the store).
pub fn check_attach_names(r: &AttachRequest) -> Result<(), ActionError> {
    name("VM", &r.vm)?;
    name("disk", &r.disk)
}

/// Validates an attach request against the store's `points` and the attachments, then records
/// it. Nothing is written when it is refused.
pub fn attach(
    dd: &DataDir,
    db: &Db,
    r: &AttachRequest,
    points: &[PointMeta],
) -> Result<Attached, ActionError> {
    check_attach_names(r)?;
    let warning = check_points(db, &r.vm, points, r.accept_store_rollback)?;
    let p = pick_point(points, &r.vm, &r.point)?;
    let size = p
        .disk(&r.disk)
        .map_err(|_| {
            ActionError::NotFound(format!("point {} has no disk {}", p.full_id(), r.disk))
        })?
        .size;
    let export = format!("{}.{}@{}", r.vm, r.disk, p.id);
    if db.attachments()?.iter().any(|a| a.export == export) {
        return Err(ActionError::Conflict(format!(
            "{export} is already attached (detach it with `standby detach {export}`)"
        )));
    }
    let dir = overlay_dir(dd.root(), &r.vm, OverlayKind::Attach, &r.disk, Some(&p.id))
        .map_err(invalid)?;
    if warning.is_none() {
        record_seen(db, points)?;
    }
    db.add_attachment(&row(
        &export,
        &r.vm,
        &r.disk,
        &p.id,
        r.rw,
        OverlayKind::Attach,
        &dir,
    ))?;
    Ok(Attached {
        export,
        vm: r.vm.clone(),
        disk: r.disk.clone(),
        point: p.id,
        rw: r.rw,
        size_bytes: size,
        warning,
    })
}

fn row(
    export: &str,
    vm: &str,
    disk: &str,
    point: &str,
    rw: bool,
    kind: OverlayKind,
    dir: &Path,
) -> Attachment {
    Attachment {
        export: export.into(),
        vm: vm.into(),
        disk: disk.into(),
        point: point.into(),
        rw,
        kind,
        dir: dir.display().to_string(),
        created_ms: now_ms(),
        state: AttachmentState::Requested,
        error: String::new(),
        progress: 0.0,
        served_ms: None,
        pid: None,
    }
}

/// Stops serving an attached point (the engine drops the export and its overlay).
pub fn detach(db: &Db, export: &str) -> Result<Attachment, ActionError> {
    let Some(row) = db.attachments()?.into_iter().find(|r| r.export == export) else {
        return Err(ActionError::NotFound(format!(
            "{export} is not attached (see `standby status`)"
        )));
    };
    if row.kind == OverlayKind::Test {
        return Err(ActionError::Conflict(format!(
            "{export} belongs to a test failover of VM {}: remove it with `standby failover cleanup {}`",
            row.vm, row.vm
        )));
    }
    if row.kind != OverlayKind::Attach {
        return Err(ActionError::Conflict(format!(
            "{export} belongs to a failover of VM {}: commit it with `standby failover commit {}`",
            row.vm, row.vm
        )));
    }
    db.delete_attachment(export)?;
    Ok(row)
}

// ---- test failover, failover ----

/// Which failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverMode {
    /// Overlays and exports for every disk at one point; replication is untouched.
    Test,
    /// On the recovery gateway: serve the disks, hydrate them into local images.
    Failover,
}

impl FailoverMode {
    fn overlay(self) -> OverlayKind {
        match self {
            FailoverMode::Test => OverlayKind::Test,
            FailoverMode::Failover => OverlayKind::Failover,
        }
    }

    /// The job kind.
    pub fn job_kind(self) -> JobKind {
        match self {
            FailoverMode::Test => JobKind::TestFailover,
            FailoverMode::Failover => JobKind::Failover,
        }
    }

    fn export(self, vm: &str, disk: &str) -> String {
        match self {
            FailoverMode::Test => format!("{vm}.{disk}.test"),
            FailoverMode::Failover => disk.to_string(),
        }
    }
}

/// `standby failover test|start VM [--point P]` / `POST /api/v1/vms/{vm}/failover/test|start`
/// (the VM comes from the path there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    #[serde(default)]
    pub vm: String,
    /// `latest` (default), `app`, a point id or a UTC time.
    #[serde(default = "default_point")]
    pub point: String,
    /// Use the store even if its newest point is older than one this gateway has seen.
    #[serde(default)]
    pub accept_store_rollback: bool,
    /// Test failover: launch the policy's failover command once the disks are served
    /// (default); ignored by a failover.
    #[serde(default = "yes")]
    pub launch: bool,
}

fn yes() -> bool {
    true
}

/// A test failover or failover under way: its job and exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverStarted {
    pub vm: String,
    pub mode: FailoverMode,
    pub job: i64,
    pub point: String,
    /// Creation time of the point, Unix milliseconds.
    pub point_created_unix_ms: u64,
    pub app_consistent: bool,
    /// (disk, export), disks in the point's order.
    pub exports: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Seconds from the request to every disk served (0 until they are).
    #[serde(default)]
    pub served_secs: f64,
    /// `nbd://HOST:PORT/EXPORT` of every export, in `exports`' order (empty until served).
    #[serde(default)]
    pub uris: Vec<String>,
    /// Test failover: whether its VM was launched.
    #[serde(default)]
    pub launch: LaunchOutcome,
    /// Why the launch failed (`launch` is `failed`; the job failed with this message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_error: Option<String>,
    /// The launched VM process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_process: Option<VmProcess>,
}

/// The `host:port` of the first `nbd://HOST:PORT/EXPORT` URI (empty if none).
pub fn addr_of(uris: &[String]) -> String {
    uris.first()
        .and_then(|u| u.strip_prefix("nbd://"))
        .and_then(|u| u.split_once('/'))
        .map(|(a, _)| a.to_string())
        .unwrap_or_default()
}

/// Checks the VM name before the store is listed.
pub fn check_failover_name(r: &FailoverRequest) -> Result<(), ActionError> {
    name("VM", &r.vm)
}

/// Validates a (test) failover against the store's `points`, the attachments and the data
/// directory, then starts its job and requests its exports. Nothing is written when it is
/// refused.
pub fn start_failover(
    dd: &DataDir,
    db: &Db,
    mode: FailoverMode,
    r: &FailoverRequest,
    points: &[PointMeta],
) -> Result<FailoverStarted, ActionError> {
    check_failover_name(r)?;
    let vm = &r.vm;
    let kind = mode.overlay();
    let existing = db.attachments()?;
    if existing.iter().any(|a| &a.vm == vm && a.kind == kind) {
        return Err(ActionError::Conflict(match mode {
            FailoverMode::Test => format!(
                "VM {vm} already has a test failover: remove it with `standby failover cleanup {vm}`"
            ),
            FailoverMode::Failover => format!(
                "VM {vm} already has a failover: commit it with `standby failover commit {vm}`"
            ),
        }));
    }
    let warning = check_points(db, vm, points, r.accept_store_rollback)?;
    let p = pick_point(points, vm, &r.point)?;
    let mut plan = Vec::new();
    for d in &p.disks {
        name("disk", &d.name)?;
        if mode == FailoverMode::Failover && dd.disk(&d.name).is_ok() {
            return Err(ActionError::Conflict(format!(
                "disk {} exists on this gateway: fail over on the recovery site's gateway (another data directory opening the same store), or remove the disk first",
                d.name
            )));
        }
        let export = mode.export(vm, &d.name);
        if let Some(a) = existing.iter().find(|a| a.export == export) {
            return Err(ActionError::Conflict(format!(
                "export {export} is in use by {} {} of VM {}",
                a.kind, a.export, a.vm
            )));
        }
        let dir = overlay_dir(dd.root(), vm, kind, &d.name, None).map_err(invalid)?;
        plan.push((d.name.clone(), export, dir));
    }
    // Valid: write.
    if warning.is_none() {
        record_seen(db, points)?;
    }
    let job = db.start_job(vm, mode.job_kind())?;
    db.step(job, "choose recovery point", &r.point)?;
    db.step(
        job,
        "create overlays and exports",
        &format!("point {}", p.full_id()),
    )?;
    let mut exports = Vec::new();
    for (disk, export, dir) in plan {
        if mode == FailoverMode::Test && is_overlay_dir(dd.root(), &dir) {
            // A test failover starts from the point: an old overlay's writes are dropped.
            let _ = std::fs::remove_dir_all(&dir);
        }
        db.add_attachment(&row(&export, vm, &disk, &p.id, true, kind, &dir))?;
        exports.push((disk, export));
    }
    Ok(FailoverStarted {
        vm: vm.clone(),
        mode,
        job,
        point: p.id.clone(),
        point_created_unix_ms: p.created_unix_ms,
        app_consistent: p.consistency == Consistency::App,
        exports,
        warning,
        served_secs: 0.0,
        uris: Vec::new(),
        launch: LaunchOutcome::NotRequested,
        launch_error: None,
        vm_process: None,
    })
}

/// Waits until the gateway serves every export (or reports an error for one).
pub fn wait_served(db: &Db, exports: &[String], wait: Duration) -> Result<(), ActionError> {
    let deadline = Instant::now() + wait;
    loop {
        let rows = db.attachments()?;
        let mut all = true;
        for e in exports {
            match rows.iter().find(|r| &r.export == e) {
                Some(r) if r.state == AttachmentState::Error => {
                    return Err(ActionError::Conflict(format!(
                        "the gateway cannot serve {e}: {}",
                        r.error
                    )))
                }
                Some(r) if r.state == AttachmentState::Requested => all = false,
                Some(_) => {}
                None => {
                    return Err(ActionError::Conflict(format!(
                        "export {e} was removed meanwhile"
                    )))
                }
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ActionError::Conflict(format!(
                "the gateway did not serve {} within {} s: is `standby serve` running on this data directory?",
                exports.join(", "),
                wait.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a started (test) failover's exports. On failure its exports are removed and its
/// job fails; on success the job stays running for the caller's last steps
/// ([`finish_failover`]).
pub fn await_served(db: &Db, s: &FailoverStarted, wait: Duration) -> Result<Duration, ActionError> {
    let t0 = Instant::now();
    let names: Vec<String> = s.exports.iter().map(|e| e.1.clone()).collect();
    if let Err(e) = wait_served(db, &names, wait) {
        for n in &names {
            db.delete_attachment(n)?;
        }
        db.finish_job(s.job, JobState::Failed, "", &e.to_string())?;
        return Err(e);
    }
    Ok(t0.elapsed())
}

/// Ends a (test) failover's job: succeeded with `detail`, or failed with `error`.
pub fn finish_failover(
    db: &Db,
    s: &FailoverStarted,
    outcome: Result<&str, &str>,
) -> Result<(), ActionError> {
    match outcome {
        Ok(detail) => db.finish_job(s.job, JobState::Succeeded, detail, "")?,
        Err(error) => db.finish_job(s.job, JobState::Failed, "", error)?,
    }
    Ok(())
}

/// The NBD address the gateway serves on (`host:port`).
pub fn nbd_addr(db: &Db) -> Result<String, ActionError> {
    db.get_value("nbd_addr")?.ok_or_else(|| {
        ActionError::Conflict("the gateway has not run yet: start `standby serve` first".into())
    })
}

/// The attachments of `kind` of one VM.
pub fn vm_attachments(
    db: &Db,
    vm: &str,
    kind: OverlayKind,
) -> Result<Vec<Attachment>, ActionError> {
    Ok(db
        .attachments()?
        .into_iter()
        .filter(|r| r.vm == vm && r.kind == kind)
        .collect())
}

/// What a cleanup removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanedUp {
    pub vm: String,
    pub job: i64,
    pub exports: Vec<String>,
    /// The launched VM processes it stopped (or found gone), before dropping the exports.
    #[serde(default)]
    pub stopped_vms: Vec<StoppedVm>,
}

/// Removes a test failover: stops its VM, drops its exports and overlays. For a data
/// directory no gateway serves (the CLI's offline path); the running engine stops the VM
/// ([`test_vm::cleanup_targets`], [`test_vm::stop`]) without holding its database
/// connection, then runs [`begin_cleanup`], drops the exports, then [`finish_cleanup`].
pub fn cleanup_test(dd: &DataDir, db: &Db, vm: &str) -> Result<CleanedUp, ActionError> {
    let stopped: Vec<StoppedVm> = test_vm::cleanup_targets(db, vm)?
        .into_iter()
        .map(test_vm::stop)
        .collect();
    let (done, rows) = begin_cleanup(db, vm, stopped)?;
    finish_cleanup(dd, db, &done, &rows)?;
    Ok(done)
}

/// The attachment rows of `vm`'s test failover; refuses a bad name or no test failover.
pub fn test_rows(db: &Db, vm: &str) -> Result<Vec<Attachment>, ActionError> {
    name("VM", vm)?;
    let rows = vm_attachments(db, vm, OverlayKind::Test)?;
    if rows.is_empty() {
        return Err(ActionError::NotFound(format!(
            "VM {vm} has no test failover"
        )));
    }
    Ok(rows)
}

/// Validates a cleanup, starts its job (with a "stop VM" step for each of `stopped`, what
/// was done to the VM processes) and removes the attachment rows; returns them for
/// [`finish_cleanup`].
pub fn begin_cleanup(
    db: &Db,
    vm: &str,
    stopped: Vec<StoppedVm>,
) -> Result<(CleanedUp, Vec<Attachment>), ActionError> {
    let rows = test_rows(db, vm)?;
    let job = db.start_job(vm, JobKind::TestFailoverCleanup)?;
    for s in &stopped {
        db.step(job, "stop VM", &format!("pid {}: {}", s.pid, s.detail))?;
    }
    db.step(job, "remove exports and overlays", "")?;
    for r in &rows {
        db.delete_attachment(&r.export)?;
    }
    Ok((
        CleanedUp {
            vm: vm.into(),
            job,
            exports: rows.iter().map(|r| r.export.clone()).collect(),
            stopped_vms: stopped,
        },
        rows,
    ))
}

/// Removes the overlay directories the exports left (once no export uses them) and finishes
/// the cleanup's job.
pub fn finish_cleanup(
    dd: &DataDir,
    db: &Db,
    done: &CleanedUp,
    rows: &[Attachment],
) -> Result<(), ActionError> {
    for r in rows {
        let dir = Path::new(&r.dir);
        if !dir.exists() {
            continue;
        }
        if is_overlay_dir(dd.root(), dir) {
            let _ = std::fs::remove_dir_all(dir);
        } else {
            tracing::warn!(dir = %r.dir, "not removing a directory outside this data directory's overlays");
        }
    }
    let vms: Vec<String> = done
        .stopped_vms
        .iter()
        .map(|s| format!("VM pid {} {}", s.pid, s.detail))
        .collect();
    let mut detail = format!("{} exports removed", rows.len());
    if !vms.is_empty() {
        detail = format!("{}; {detail}", vms.join("; "));
    }
    db.finish_job(done.job, JobState::Succeeded, &detail, "")?;
    Ok(())
}

// ---- planned failover (prepare), commit ----

/// A planned failover under way on the primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrepareStarted {
    pub vm: String,
    pub job: i64,
    /// Only cycles that finish after this count.
    pub since_ms: u64,
}

/// Planned failover, on the primary, after the VM is shut down: validates that the VM is
/// Protected, starts a job and makes its next replication cycle due at once.
pub fn start_prepare(db: &Db, vm: &str) -> Result<PrepareStarted, ActionError> {
    check_prepare(db, vm)?;
    let since_ms = now_ms();
    let job = db.start_job(vm, JobKind::FailoverPrepare)?;
    db.step(job, "replicate the last changes", "")?;
    db.modify_vm(vm, |v| v.last_cycle_ms = Some(0))?;
    Ok(PrepareStarted {
        vm: vm.into(),
        job,
        since_ms,
    })
}

/// Validates a planned failover without writing: a valid VM name, protected here, Protected.
pub fn check_prepare(db: &Db, vm: &str) -> Result<(), ActionError> {
    name("VM", vm)?;
    let v = db.vm(vm)?.ok_or_else(|| {
        ActionError::NotFound(format!("VM {vm} is not protected on this gateway"))
    })?;
    if v.phase != Phase::Protected {
        return Err(ActionError::Conflict(format!(
            "VM {vm} is {}: a planned failover needs it Protected",
            v.phase
        )));
    }
    Ok(())
}

/// What a finished prepare left: the point to fail over to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prepared {
    pub vm: String,
    pub point: String,
}

/// Waits for the final cycle, then stops protecting the VM here; finishes the job.
pub fn await_prepared(
    dd: &DataDir,
    db: &Db,
    s: &PrepareStarted,
    wait: Duration,
) -> Result<Prepared, ActionError> {
    let r = wait_prepared(dd, db, s, wait);
    match &r {
        Ok(p) => db.finish_job(
            s.job,
            JobState::Succeeded,
            &format!("final point {}; protection stopped here", p.point),
            "",
        )?,
        Err(e) => db.finish_job(s.job, JobState::Failed, "", &e.to_string())?,
    }
    r
}

fn wait_prepared(
    dd: &DataDir,
    db: &Db,
    s: &PrepareStarted,
    wait: Duration,
) -> Result<Prepared, ActionError> {
    let vanished = || ActionError::Conflict(format!("VM {} was unprotected meanwhile", s.vm));
    let deadline = Instant::now() + wait;
    loop {
        let v = db.vm(&s.vm)?.ok_or_else(vanished)?;
        if v.last_cycle_ms.is_some_and(|t| t > s.since_ms) && v.phase == Phase::Protected {
            break;
        }
        if v.phase == Phase::Critical {
            return Err(ActionError::Conflict(format!(
                "final replication failed: {}",
                v.reason
            )));
        }
        if Instant::now() > deadline {
            return Err(ActionError::Conflict(format!(
                "final replication did not finish within {} s (last error: {})",
                wait.as_secs(),
                v.last_error
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = db.vm(&s.vm)?.ok_or_else(vanished)?;
    db.delete_vm(&s.vm)?;
    for d in &v.disks {
        // A disk declared in the configuration keeps its declared tracking.
        let _ = dd.set_tracked(d, false);
    }
    Ok(Prepared {
        vm: s.vm.clone(),
        point: v.last_point,
    })
}

/// A commit under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStarted {
    pub vm: String,
    pub job: i64,
    pub exports: Vec<String>,
}

/// Asks the engine to adopt a failed-over VM's disks as local disks once hydrated.
pub fn start_commit(db: &Db, vm: &str) -> Result<CommitStarted, ActionError> {
    let rows = check_commit(db, vm)?;
    let job = db.start_job(vm, JobKind::FailoverCommit)?;
    db.step(job, "wait for hydration, adopt local images", "")?;
    for r in &rows {
        db.set_attachment(&r.export, AttachmentState::Commit, "", r.progress)?;
    }
    Ok(CommitStarted {
        vm: vm.into(),
        job,
        exports: rows.into_iter().map(|r| r.export).collect(),
    })
}

/// Validates a commit without writing; the failover's attachments.
pub fn check_commit(db: &Db, vm: &str) -> Result<Vec<Attachment>, ActionError> {
    name("VM", vm)?;
    let rows = vm_attachments(db, vm, OverlayKind::Failover)?;
    if rows.is_empty() {
        return Err(ActionError::NotFound(format!(
            "VM {vm} has no failover to commit"
        )));
    }
    Ok(rows)
}

/// Hydration of a commit: percent done over all its disks.
pub fn commit_progress(db: &Db, s: &CommitStarted) -> Result<Option<f64>, ActionError> {
    let left = vm_attachments(db, &s.vm, OverlayKind::Failover)?;
    if left.is_empty() {
        return Ok(None);
    }
    let done = s.exports.len() - left.len();
    let sum: f64 = left.iter().map(|r| r.progress).sum::<f64>() + 100.0 * done as f64;
    Ok(Some(sum / s.exports.len().max(1) as f64))
}

/// Waits until the engine adopted every disk (`tick` gets the hydration percent about every
/// 200 ms); finishes the job.
pub fn await_committed(
    db: &Db,
    s: &CommitStarted,
    wait: Duration,
    mut tick: impl FnMut(f64),
) -> Result<(), ActionError> {
    let deadline = Instant::now() + wait;
    loop {
        let Some(pct) = commit_progress(db, s)? else {
            break;
        };
        tick(pct);
        let _ = db.job_progress(s.job, pct, "hydrating");
        if Instant::now() > deadline {
            let msg = vm_attachments(db, &s.vm, OverlayKind::Failover)?
                .iter()
                .map(|r| format!("{} {:.0}% hydrated {}", r.export, r.progress, r.error))
                .collect::<Vec<_>>()
                .join(", ");
            let e = format!(
                "commit not finished within {} s ({msg}); it completes when hydration does — run `standby failover commit {}` again to wait",
                wait.as_secs(),
                s.vm
            );
            db.finish_job(s.job, JobState::Failed, "", &e)?;
            return Err(ActionError::Conflict(e));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    tick(100.0);
    db.finish_job(
        s.job,
        JobState::Succeeded,
        &format!("disks {} are local", s.exports.join(",")),
        "",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(vm: &str, id: &str) -> PointMeta {
        serde_json::from_value(serde_json::json!({
            "format_version": 1, "vm": vm, "id": id, "created_unix_ms": 0, "consistency": "crash", "disks": []
        }))
        .unwrap_or_else(|e| panic!("point json: {e}"))
    }

    #[test]
    fn pick_point_by_spec() {
        let pts = vec![
            point("a", "20260101T000000Z-1"),
            point("a", "20260102T000000Z-2"),
            point("b", "20260103T000000Z-3"),
        ];
        assert_eq!(pick_point(&pts, "a", "latest").unwrap().id, pts[1].id);
        assert_eq!(pick_point(&pts, "a", "20260101").unwrap().id, pts[0].id);
        assert_eq!(
            pick_point(&pts, "a", "2026-01-01T12:00").unwrap().id,
            pts[0].id
        );
        assert!(matches!(
            pick_point(&pts, "a", "2025-01-01T12:00"),
            Err(ActionError::NotFound(_))
        ));
        assert!(matches!(
            pick_point(&pts, "c", "latest"),
            Err(ActionError::NotFound(_))
        ));
        assert!(matches!(
            pick_point(&pts, "a", "2026-01-01T1x:yy:zz"),
            Err(ActionError::Invalid(_))
        ));
    }

    #[test]
    fn refused_requests_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        // Commit, cleanup, prepare of unknown VMs: refused, no job.
        assert!(matches!(
            start_commit(&db, "vm1"),
            Err(ActionError::NotFound(_))
        ));
        assert!(matches!(
            start_prepare(&db, "vm1"),
            Err(ActionError::NotFound(_))
        ));
        assert!(matches!(
            start_prepare(&db, "../x"),
            Err(ActionError::Invalid(_))
        ));
        db.insert_vm("vm1", &["a".into()]).unwrap();
        // Not yet Protected.
        assert!(matches!(
            start_prepare(&db, "vm1"),
            Err(ActionError::Conflict(_))
        ));
        assert!(matches!(detach(&db, "x"), Err(ActionError::NotFound(_))));
        assert!(db.jobs(100, None).unwrap().is_empty(), "no job was started");
        // A store that went back in time.
        db.set_value("store_seen:vm1", "20260105T000000Z-9")
            .unwrap();
        let pts = vec![point("vm1", "20260101T000000Z-1")];
        assert!(matches!(
            check_points(&db, "vm1", &pts, false),
            Err(ActionError::Conflict(_))
        ));
        assert!(check_points(&db, "vm1", &pts, true).unwrap().is_some());
    }
}
