//! Failover commands: `attach` / `detach` a recovery point, and `failover test | cleanup |
//! prepare | start | commit VM`.
//!
//! Every subcommand names its action first and the VM last, so any VM name works (a VM named
//! `commit` included). Validation and the writes are [`gateway::failover::actions`], the code
//! the HTTP API runs too; this file lists the store's points, waits in the foreground for the
//! gateway (`standby serve`) to serve the requests, prints where the disks are, and — for a
//! test failover — launches the policy's failover command as the admin's child process
//! ([`crate::launch`]), which the API never does.

use std::time::Duration;

use anyhow::{Context, Result};
use gateway::failover::actions::{
    self, AttachRequest, FailoverMode, FailoverRequest, FailoverStarted,
};
use gateway::replication::actions::ActionError;
use gateway::replication::db::Db;
use gateway::DataDir;
use replica_store::PointMeta;

use crate::cmd_store::{human, open_store, time_of};
use crate::launch::{self, LaunchValues, Stopped};
use crate::progress::Progress;

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

/// `standby failover SUBCOMMAND VM`.
#[derive(clap::Subcommand)]
pub enum FailoverCommand {
    /// Test failover: overlays and exports for every disk at one point, and the configured
    /// failover command launched; the replica and replication are untouched.
    Test {
        #[command(flatten)]
        point: PointArgs,
        /// Do not launch the configured failover command.
        #[arg(long)]
        no_launch: bool,
    },
    /// Remove a test failover: stop its VM, drop its exports and overlays.
    Cleanup {
        /// VM name.
        vm: String,
    },
    /// Planned failover, on the primary: after the VM is shut down, replicate the last
    /// changes (no data loss), then stop protecting it here.
    Prepare {
        /// VM name.
        vm: String,
        /// Seconds to wait for the final replication.
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
    /// Failover, on the recovery gateway: serve the VM's disks from a point and hydrate them
    /// into local images in the background.
    Start {
        #[command(flatten)]
        point: PointArgs,
    },
    /// Wait until the failed-over disks are hydrated, then make them local disks.
    Commit {
        /// VM name.
        vm: String,
        /// Seconds to wait for hydration.
        #[arg(long, default_value_t = 3600)]
        wait: u64,
    },
}

#[derive(clap::Args)]
pub struct PointArgs {
    /// VM name.
    pub vm: String,
    /// Point to use (latest, app, an id or a UTC time).
    #[arg(long, default_value = "latest")]
    pub point: String,
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

fn action(e: ActionError) -> anyhow::Error {
    anyhow::anyhow!(e)
}

/// The valid points of `vm` in the store (junk reported on stderr).
async fn points(dd: &DataDir, vm: &str) -> Result<Vec<PointMeta>> {
    let store = open_store(dd.root()).await?;
    let listing = store.list_points_checked(Some(vm)).await?;
    crate::store_seen::report_junk(&listing.junk);
    Ok(listing.points)
}

pub async fn attach(dd: &DataDir, a: AttachArgs) -> Result<()> {
    let req = AttachRequest::from_spec(&a.spec, a.rw, a.accept_store_rollback).map_err(action)?;
    actions::check_attach_names(&req).map_err(action)?;
    let points = points(dd, &req.vm).await?;
    let db = db(dd)?;
    let at = actions::attach(dd, &db, &req, &points).map_err(action)?;
    if let Some(w) = &at.warning {
        eprintln!("warning: {w}");
    }
    if let Err(e) = actions::wait_served(
        &db,
        std::slice::from_ref(&at.export),
        Duration::from_secs(60),
    ) {
        db.delete_attachment(&at.export)?;
        return Err(action(e));
    }
    let addr = actions::nbd_addr(&db).unwrap_or_else(|_| "?".into());
    println!(
        "{}/{}@{} served as nbd://{addr}/{} ({}; {} disk)",
        at.vm,
        at.disk,
        at.point,
        at.export,
        if at.rw {
            "writable through a local overlay"
        } else {
            "read-only"
        },
        human(at.size_bytes)
    );
    Ok(())
}

pub fn detach(dd: &DataDir, export: &str) -> Result<()> {
    let db = db(dd)?;
    actions::detach(&db, export).map_err(action)?;
    println!("{export} detached (its overlay, if any, is removed)");
    Ok(())
}

pub async fn failover(dd: &DataDir, cmd: FailoverCommand) -> Result<()> {
    match cmd {
        FailoverCommand::Test { point, no_launch } => {
            start(dd, FailoverMode::Test, point, !no_launch).await
        }
        FailoverCommand::Start { point } => start(dd, FailoverMode::Failover, point, false).await,
        FailoverCommand::Cleanup { vm } => cleanup(dd, &vm),
        FailoverCommand::Prepare { vm, wait } => prepare(dd, &vm, wait),
        FailoverCommand::Commit { vm, wait } => commit(dd, &vm, wait),
    }
}

async fn start(dd: &DataDir, mode: FailoverMode, a: PointArgs, launch: bool) -> Result<()> {
    let req = FailoverRequest {
        vm: a.vm,
        point: a.point,
        accept_store_rollback: a.accept_store_rollback,
    };
    actions::check_failover_name(&req).map_err(action)?;
    let points = points(dd, &req.vm).await?;
    let db = db(dd)?;
    let s = actions::start_failover(dd, &db, mode, &req, &points).map_err(action)?;
    if let Some(w) = &s.warning {
        eprintln!("warning: {w}");
    }
    let served_in = actions::await_served(&db, &s, Duration::from_secs(a.wait)).map_err(action)?;
    let r = report(dd, &db, &s, served_in, launch);
    match &r {
        Ok(text) => actions::finish_failover(&db, &s, Ok(text)),
        Err(e) => actions::finish_failover(&db, &s, Err(&format!("{e:#}"))),
    }
    .map_err(action)?;
    println!("{}", r?);
    Ok(())
}

/// What a served (test) failover prints; launches the VM of a test failover.
fn report(
    dd: &DataDir,
    db: &Db,
    s: &FailoverStarted,
    served_in: Duration,
    launch: bool,
) -> Result<String> {
    let addr = actions::nbd_addr(db).map_err(action)?;
    let vm = &s.vm;
    let mut lines = vec![format!(
        "VM {vm} {} from point {} ({}, {}): disks served in {:.2} s",
        match s.mode {
            FailoverMode::Test => "test failover",
            FailoverMode::Failover => "failed over",
        },
        s.point,
        time_of(s.point_created_unix_ms),
        if s.app_consistent {
            "app-consistent"
        } else {
            "crash-consistent"
        },
        served_in.as_secs_f64()
    )];
    for (disk, export) in &s.exports {
        lines.push(format!("  {disk}: nbd://{addr}/{export}"));
    }
    if s.mode == FailoverMode::Failover {
        lines.push(format!(
            "  hydrating into local images in the background (see `standby status`); then `standby failover commit {vm}`"
        ));
        return Ok(lines.join("\n"));
    }
    let policy = db.policy()?;
    match (&policy.failover_command, launch) {
        (Some(cmd), true) => {
            db.step(s.job, "launch VM", cmd)?;
            // `vm` passed validate_name: the directory is inside the data directory.
            let dir = dd.root().join("failover").join(vm).join("test");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            let vals = LaunchValues {
                addr: &addr,
                vm,
                point: &s.point,
                dir: &dir,
                exports: &s.exports,
            };
            let argv = launch::expand(cmd, &vals)?;
            let log_path = dir.join("vm.log");
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let child = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .envs(vals.env())
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().context("duplicating the VM log's descriptor")?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("launching {argv:?}"))?;
            let started = launch::start_time(child.id()).unwrap_or(0);
            let first = &s.exports[0].1;
            db.set_value(&actions::pid_start_key(first), &started.to_string())?;
            db.set_attachment_pid(first, Some(child.id()))?;
            lines.push(format!(
                "  VM launched (pid {}), output in {}",
                child.id(),
                log_path.display()
            ));
        }
        (None, true) => lines.push(
            "  no failover command configured (`standby policy set --failover-command ...`): boot the VM from the exports above".into(),
        ),
        _ => {}
    }
    lines.push(format!(
        "  replication continues; remove with `standby failover cleanup {vm}`"
    ));
    Ok(lines.join("\n"))
}

fn stop_vm(pid: u32, started: Option<u64>) -> String {
    match started {
        Some(t) => match launch::stop_pid(pid, t, Duration::from_secs(5)) {
            Stopped::Gone => "already exited",
            Stopped::Reused => "already exited (its pid is now another process's: not signalled)",
            Stopped::Terminated => "stopped",
            Stopped::Killed => "killed after 5 s",
        },
        None => "not signalled (no start time recorded for its pid)",
    }
    .into()
}

fn cleanup(dd: &DataDir, vm: &str) -> Result<()> {
    let db = db(dd)?;
    let done = actions::cleanup_test(dd, &db, vm, Some(&stop_vm)).map_err(action)?;
    println!(
        "test failover of VM {vm} removed ({} disks)",
        done.exports.len()
    );
    Ok(())
}

fn prepare(dd: &DataDir, vm: &str, wait: u64) -> Result<()> {
    let db = db(dd)?;
    let s = actions::start_prepare(&db, vm).map_err(action)?;
    let p = actions::await_prepared(dd, &db, &s, Duration::from_secs(wait)).map_err(action)?;
    println!(
        "VM {vm}: final changes replicated (point {}); protection stopped here. Fail over on the recovery gateway with `standby failover start {vm} --point {}`",
        p.point, p.point
    );
    Ok(())
}

fn commit(dd: &DataDir, vm: &str, wait: u64) -> Result<()> {
    let db = db(dd)?;
    let s = actions::start_commit(&db, vm).map_err(action)?;
    let bar = Progress::percent(&format!("committing VM {vm}: hydration"));
    actions::await_committed(&db, &s, Duration::from_secs(wait), |pct| {
        bar.set_percent(pct)
    })
    .map_err(action)?;
    bar.finish();
    println!(
        "VM {vm} failover committed: disks {} are local disks of this gateway. Protect it again (reverse replication sends only changed chunks): standby protect {vm} --disks {}",
        s.exports.join(", "),
        s.exports.join(",")
    );
    Ok(())
}
