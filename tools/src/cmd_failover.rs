//! Failover commands: attach / detach a recovery point, test failover (and its cleanup),
//! failover (prepare on the primary, fail over on the recovery gateway), commit.
//!
//! Requests go into the replication state database; the gateway (`standby serve`) serves them
//! within a second. These commands wait for it and print where the disks are.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gateway::failover::{is_overlay_dir, overlay_dir, OverlayKind};
use gateway::replication::db::{Attachment, AttachmentState, Db, JobKind, JobState, Phase};
use gateway::replication::now_ms;
use gateway::DataDir;
use replica_store::{Consistency, PointMeta};

use crate::cmd_store::{human, open_store, time_of};
use crate::launch::{self, LaunchValues, Stopped};
use crate::store_seen::checked_points;

#[derive(clap::Args)]
pub struct AttachArgs {
    /// VM/DISK@POINT: POINT is `latest` (default), `app` (newest app-consistent), a point id,
    /// or a UTC time `YYYY-MM-DDTHH:MM[:SS]` (the newest point at or before it).
    pub spec: String,
    /// Writable through a local copy-on-write overlay (the point itself never changes).
    #[arg(long)]
    pub rw: bool,
    /// Use the store even if its newest point is older than one this gateway has seen.
    #[arg(long)]
    pub accept_store_rollback: bool,
}

#[derive(clap::Args)]
pub struct FailoverArgs {
    /// VM name (for `commit`: the VM whose failed-over disks to commit).
    pub vm: String,
    /// Point to use (latest, app, an id or a UTC time; default latest).
    #[arg(long, default_value = "latest")]
    pub point: String,
    /// Test failover: overlays and exports for every disk at one point; the replica and
    /// replication are untouched.
    #[arg(long, conflicts_with_all = ["test_cleanup", "prepare"])]
    pub test: bool,
    /// With --test: do not launch the configured failover command.
    #[arg(long, requires = "test")]
    pub no_launch: bool,
    /// Remove a test failover: stop its VM, drop its exports and overlays.
    #[arg(long)]
    pub test_cleanup: bool,
    /// Planned failover, on the primary: after the VM is shut down, replicate the last
    /// changes (no data loss), then stop protecting it here.
    #[arg(long)]
    pub prepare: bool,
    /// Seconds to wait for the gateway to serve the disks.
    #[arg(long, default_value_t = 60)]
    pub wait: u64,
    /// Use the store even if its newest point is older than one this gateway has seen
    /// (points deleted elsewhere, or an old copy of the store restored).
    #[arg(long)]
    pub accept_store_rollback: bool,
}

fn db(dd: &DataDir) -> Result<Db> {
    Db::open(dd.root()).context("opening the replication state")
}

/// Picks a point of `vm` by spec.
pub fn pick_point(points: &[PointMeta], vm: &str, spec: &str) -> Result<PointMeta> {
    let mine: Vec<&PointMeta> = points.iter().filter(|p| p.vm == vm).collect();
    if mine.is_empty() {
        bail!("VM {vm} has no recovery point in the store (see `standby points list`)");
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
            let want: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
            let mut want = want;
            while want.len() < 14 {
                want.push('9');
            }
            let key = format!("{}T{}", &want[..8], &want[8..14]);
            mine.iter().rev().find(|p| p.id[..15] <= *key).copied()
        }
        s => mine
            .iter()
            .find(|p| p.id == s || p.id.starts_with(s))
            .copied(),
    };
    found.cloned().with_context(|| {
        format!("no point of VM {vm} matches {spec:?} (see `standby points list {vm}`)")
    })
}

fn nbd_addr(db: &Db) -> Result<String> {
    db.get_value("nbd_addr")?
        .context("the gateway has not run yet: start `standby serve` first")
}

/// Waits until the gateway serves every export (or reports an error for one).
fn wait_served(db: &Db, exports: &[String], secs: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let rows = db.attachments()?;
        let mut all = true;
        for e in exports {
            match rows.iter().find(|r| &r.export == e) {
                Some(r) if r.state == AttachmentState::Error => {
                    bail!("the gateway cannot serve {e}: {}", r.error)
                }
                Some(r) if r.state == AttachmentState::Requested => all = false,
                Some(_) => {}
                None => bail!("export {e} was removed meanwhile"),
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the gateway did not serve {} within {secs} s: is `standby serve` running on this data directory?",
                exports.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub async fn attach(dd: &DataDir, a: AttachArgs) -> Result<()> {
    let (vm, rest) = a
        .spec
        .split_once('/')
        .context("give VM/DISK or VM/DISK@POINT")?;
    let (disk, spec) = rest.split_once('@').unwrap_or((rest, "latest"));
    replica_store::point::validate_name("VM", vm)?;
    replica_store::point::validate_name("disk", disk)?;
    let store = open_store(dd.root()).await?;
    let points = checked_points(dd, &store, vm, a.accept_store_rollback).await?;
    let p = pick_point(&points, vm, spec)?;
    p.disk(disk)
        .with_context(|| format!("point {} has no disk {disk}", p.full_id()))?;
    let export = format!("{vm}.{disk}@{}", p.id);
    let db = db(dd)?;
    if db.attachments()?.iter().any(|r| r.export == export) {
        bail!("{export} is already attached (detach it with `standby detach {export}`)");
    }
    let dir = overlay_dir(dd.root(), vm, OverlayKind::Attach, disk, Some(&p.id))?;
    db.add_attachment(&Attachment {
        export: export.clone(),
        vm: vm.into(),
        disk: disk.into(),
        point: p.id.clone(),
        rw: a.rw,
        kind: OverlayKind::Attach,
        dir: dir.display().to_string(),
        created_ms: now_ms(),
        state: AttachmentState::Requested,
        error: String::new(),
        progress: 0.0,
        served_ms: None,
        pid: None,
    })?;
    let addr = nbd_addr(&db);
    if let Err(e) = wait_served(&db, std::slice::from_ref(&export), 60) {
        db.delete_attachment(&export)?;
        return Err(e);
    }
    println!(
        "{}/{disk}@{} served as nbd://{}/{export} ({}; {} disk)",
        vm,
        p.id,
        addr.unwrap_or_else(|_| "?".into()),
        if a.rw {
            "writable through a local overlay"
        } else {
            "read-only"
        },
        human(p.disk(disk)?.size)
    );
    Ok(())
}

pub fn detach(dd: &DataDir, export: &str) -> Result<()> {
    let db = db(dd)?;
    let Some(row) = db.attachments()?.into_iter().find(|r| r.export == export) else {
        bail!("{export} is not attached (see `standby status`)");
    };
    if row.kind != OverlayKind::Attach {
        bail!(
            "{export} belongs to a {} of VM {}: use `standby failover {} {}`",
            row.kind,
            row.vm,
            row.vm,
            if row.kind == OverlayKind::Test {
                "--test-cleanup"
            } else {
                "commit"
            }
        );
    }
    db.delete_attachment(export)?;
    println!("{export} detached (its overlay, if any, is removed)");
    Ok(())
}

pub async fn failover(dd: &DataDir, a: FailoverArgs) -> Result<()> {
    if a.test_cleanup {
        return test_cleanup(dd, &a.vm);
    }
    if a.prepare {
        return prepare(dd, &a).await;
    }
    let db = db(dd)?;
    let kind = if a.test {
        OverlayKind::Test
    } else {
        OverlayKind::Failover
    };
    if db
        .attachments()?
        .iter()
        .any(|r| r.vm == a.vm && r.kind == kind)
    {
        bail!(
            "VM {} already has a {}: {}",
            a.vm,
            if a.test { "test failover" } else { "failover" },
            if a.test {
                format!("remove it with `standby failover {} --test-cleanup`", a.vm)
            } else {
                format!("commit it with `standby failover commit {}`", a.vm)
            }
        );
    }
    let job = db.start_job(
        &a.vm,
        if a.test {
            JobKind::TestFailover
        } else {
            JobKind::Failover
        },
    )?;
    let r = failover_inner(dd, &db, &a, kind, job).await;
    match &r {
        Ok(detail) => db.finish_job(job, JobState::Succeeded, detail, "")?,
        Err(e) => db.finish_job(job, JobState::Failed, "", &format!("{e:#}"))?,
    }
    r.map(|d| println!("{d}"))
}

async fn failover_inner(
    dd: &DataDir,
    db: &Db,
    a: &FailoverArgs,
    kind: OverlayKind,
    job: i64,
) -> Result<String> {
    db.step(job, "choose recovery point", &a.point)?;
    replica_store::point::validate_name("VM", &a.vm)?;
    let store = open_store(dd.root()).await?;
    let points = checked_points(dd, &store, &a.vm, a.accept_store_rollback).await?;
    let p = pick_point(&points, &a.vm, &a.point)?;
    if kind == OverlayKind::Failover {
        for d in &p.disks {
            if dd.disk(&d.name).is_ok() {
                bail!(
                    "disk {} exists on this gateway: fail over on the recovery site's gateway (another data directory opening the same store), or remove the disk first",
                    d.name
                );
            }
        }
    }
    db.step(
        job,
        "create overlays and exports",
        &format!("point {}", p.full_id()),
    )?;
    let mut exports = Vec::new();
    for d in &p.disks {
        let export = if kind == OverlayKind::Test {
            format!("{}.{}.test", a.vm, d.name)
        } else {
            d.name.clone()
        };
        let dir = overlay_dir(dd.root(), &a.vm, kind, &d.name, None)?;
        if kind == OverlayKind::Test && is_overlay_dir(dd.root(), &dir) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        db.add_attachment(&Attachment {
            export: export.clone(),
            vm: a.vm.clone(),
            disk: d.name.clone(),
            point: p.id.clone(),
            rw: true,
            kind,
            dir: dir.display().to_string(),
            created_ms: now_ms(),
            state: AttachmentState::Requested,
            error: String::new(),
            progress: 0.0,
            served_ms: None,
            pid: None,
        })?;
        exports.push((d.name.clone(), export));
    }
    let names: Vec<String> = exports.iter().map(|e| e.1.clone()).collect();
    let t0 = Instant::now();
    if let Err(e) = wait_served(db, &names, a.wait) {
        for n in &names {
            db.delete_attachment(n)?;
        }
        return Err(e);
    }
    let served_in = t0.elapsed();
    let addr = nbd_addr(db)?;
    let mut lines = vec![format!(
        "VM {} {} from point {} ({}, {}): disks served in {:.2} s",
        a.vm,
        if kind == OverlayKind::Test {
            "test failover"
        } else {
            "failed over"
        },
        p.id,
        time_of(p.created_unix_ms),
        match p.consistency {
            Consistency::App => "app-consistent",
            Consistency::Crash => "crash-consistent",
        },
        served_in.as_secs_f64()
    )];
    for (disk, export) in &exports {
        lines.push(format!("  {disk}: nbd://{addr}/{export}"));
    }
    if kind == OverlayKind::Test {
        let policy = db.policy()?;
        match (&policy.failover_command, a.no_launch) {
            (Some(cmd), false) => {
                db.step(job, "launch VM", cmd)?;
                // `a.vm` passed validate_name above: the directory is inside the data directory.
                let dir = dd.root().join("failover").join(&a.vm).join("test");
                std::fs::create_dir_all(&dir)?;
                let vals = LaunchValues {
                    addr: &addr,
                    vm: &a.vm,
                    point: &p.id,
                    dir: &dir,
                    exports: &exports,
                };
                let argv = launch::expand(cmd, &vals)?;
                let log = std::fs::File::create(dir.join("vm.log"))?;
                let child = std::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .envs(vals.env())
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("launching {argv:?}"))?;
                let started = launch::start_time(child.id()).unwrap_or(0);
                db.set_value(&pid_start_key(&exports[0].1), &started.to_string())?;
                db.set_attachment_pid(&exports[0].1, Some(child.id()))?;
                lines.push(format!(
                    "  VM launched (pid {}), output in {}",
                    child.id(),
                    dir.join("vm.log").display()
                ));
            }
            (None, false) => lines.push(
                "  no failover command configured (`standby policy set --failover-command ...`): boot the VM from the exports above".into(),
            ),
            _ => {}
        }
        lines.push(format!(
            "  replication continues; remove with `standby failover {} --test-cleanup`",
            a.vm
        ));
    } else {
        lines.push(format!(
            "  hydrating into local images in the background (see `standby status`); then `standby failover commit {}`",
            a.vm
        ));
    }
    Ok(lines.join("\n"))
}

/// The attachments of `kind` of one VM.
fn vm_attachments(db: &Db, vm: &str, kind: OverlayKind) -> Result<Vec<Attachment>> {
    Ok(db
        .attachments()?
        .into_iter()
        .filter(|r| r.vm == vm && r.kind == kind)
        .collect())
}

fn test_cleanup(dd: &DataDir, vm: &str) -> Result<()> {
    let db = db(dd)?;
    let rows: Vec<Attachment> = vm_attachments(&db, vm, OverlayKind::Test)?;
    if rows.is_empty() {
        bail!("VM {vm} has no test failover");
    }
    let job = db.start_job(vm, JobKind::TestFailoverCleanup)?;
    for r in &rows {
        if let Some(pid) = r.pid {
            let started = db
                .get_value(&pid_start_key(&r.export))?
                .and_then(|v| v.parse::<u64>().ok());
            let what = match started {
                Some(t) => match launch::stop_pid(pid, t, Duration::from_secs(5)) {
                    Stopped::Gone => "already exited",
                    Stopped::Reused => {
                        "already exited (its pid is now another process's: not signalled)"
                    }
                    Stopped::Terminated => "stopped",
                    Stopped::Killed => "killed after 5 s",
                },
                None => "not signalled (no start time recorded for its pid)",
            };
            db.step(job, "stop VM", &format!("pid {pid}: {what}"))?;
        }
    }
    db.step(job, "remove exports and overlays", "")?;
    for r in &rows {
        db.delete_attachment(&r.export)?;
    }
    // The gateway drops the exports and overlays within a second; without one, remove them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && rows.iter().any(|r| Path::new(&r.dir).exists()) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for r in &rows {
        let dir = Path::new(&r.dir);
        if is_overlay_dir(dd.root(), dir) {
            let _ = std::fs::remove_dir_all(dir);
        } else {
            tracing::warn!(dir = %r.dir, "not removing a directory outside this data directory's overlays");
        }
    }
    db.finish_job(
        job,
        JobState::Succeeded,
        &format!("{} exports removed", rows.len()),
        "",
    )?;
    println!("test failover of VM {vm} removed ({} disks)", rows.len());
    Ok(())
}

/// State-database key of the start time of a launched VM's process (see [`launch`]).
fn pid_start_key(export: &str) -> String {
    format!("vm_pid_start:{export}")
}

async fn prepare(dd: &DataDir, a: &FailoverArgs) -> Result<()> {
    let db = db(dd)?;
    let v = db
        .vm(&a.vm)?
        .with_context(|| format!("VM {} is not protected on this gateway", a.vm))?;
    if v.phase != Phase::Protected {
        bail!(
            "VM {} is {}: a planned failover needs it Protected",
            a.vm,
            v.phase
        );
    }
    let t0 = now_ms();
    // Make the next cycle due at once.
    db.modify_vm(&a.vm, |v| v.last_cycle_ms = Some(0))?;
    let deadline = Instant::now() + Duration::from_secs(a.wait);
    loop {
        let v = db.vm(&a.vm)?.context("VM vanished")?;
        if v.last_cycle_ms.is_some_and(|t| t > t0) && v.phase == Phase::Protected {
            break;
        }
        if v.phase == Phase::Critical {
            bail!("final replication failed: {}", v.reason);
        }
        if Instant::now() > deadline {
            bail!(
                "final replication did not finish within {} s (last error: {})",
                a.wait,
                v.last_error
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = db.vm(&a.vm)?.context("VM vanished")?;
    db.delete_vm(&a.vm)?;
    for d in &v.disks {
        let _ = dd.set_tracked(d, false);
    }
    println!(
        "VM {}: final changes replicated (point {}); protection stopped here. Fail over on the recovery gateway with `standby failover {} --point {}`",
        a.vm, v.last_point, a.vm, v.last_point
    );
    Ok(())
}

pub fn commit(dd: &DataDir, vm: &str, wait: u64) -> Result<()> {
    let db = db(dd)?;
    let rows: Vec<Attachment> = vm_attachments(&db, vm, OverlayKind::Failover)?;
    if rows.is_empty() {
        bail!("VM {vm} has no failover to commit");
    }
    let job = db.start_job(vm, JobKind::FailoverCommit)?;
    db.step(job, "wait for hydration, adopt local images", "")?;
    for r in &rows {
        db.set_attachment(&r.export, AttachmentState::Commit, "", r.progress)?;
    }
    let deadline = Instant::now() + Duration::from_secs(wait);
    loop {
        let left: Vec<Attachment> = vm_attachments(&db, vm, OverlayKind::Failover)?;
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let msg = left
                .iter()
                .map(|r| format!("{} {:.0}% hydrated {}", r.export, r.progress, r.error))
                .collect::<Vec<_>>()
                .join(", ");
            db.finish_job(
                job,
                JobState::Failed,
                "",
                &format!("not committed within {wait} s: {msg}"),
            )?;
            bail!("commit not finished within {wait} s ({msg}); it completes when hydration does — run `standby failover commit {vm}` again to wait");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let names: Vec<String> = rows.iter().map(|r| r.export.clone()).collect();
    db.finish_job(
        job,
        JobState::Succeeded,
        &format!("disks {} are local", names.join(",")),
        "",
    )?;
    println!(
        "VM {vm} failover committed: disks {} are local disks of this gateway. Protect it again (reverse replication sends only changed chunks): standby protect {vm} --disks {}",
        names.join(", "),
        names.join(",")
    );
    Ok(())
}
