//! Failover commands: `attach` / `detach` a recovery point, and `failover test | cleanup |
//! prepare | start | commit VM`.
//!
//! Every subcommand names its action first and the VM last, so any VM name works (a VM named
//! `commit` included). These actions are the running gateway's: they go to its API
//! ([`crate::api_client`]), whose engine validates and carries them out at once
//! ([`gateway::failover::actions`]); this file prints where the disks are and the VM a test
//! failover launched (the gateway launches and stops it: [`gateway::failover::test_vm`]),
//! and follows the long jobs (planned failover, commit) through the API. With no gateway
//! running, `detach` and `failover cleanup` (which then stops the recorded VM itself) change
//! the state database themselves, and the others say what is wrong with the request, then
//! that the gateway must run.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use gateway::failover::actions::CleanedUp;
use gateway::failover::actions::{
    self, AttachRequest, CommitStarted, FailoverMode, FailoverRequest, FailoverStarted,
};
use gateway::failover::test_vm::{LaunchOutcome, VmState};
use gateway::replication::actions::ActionError;
use gateway::replication::db::Db;
use gateway::DataDir;

use crate::api_client::{self, seg, Api, Target};
use crate::cmd_store::{human, open_store, time_of};
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
        /// Do not launch the configured failover command (the gateway launches it otherwise).
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

/// With no gateway running: what is wrong with a request to serve a point of `vm` (the
/// store's points, a store that went back in time), said before that the gateway must run.
async fn check_offline(dd: &DataDir, vm: &str, point: &str, accept_rollback: bool) -> Result<()> {
    if let Target::Gateway(_) = api_client::target(dd.root())? {
        return Ok(());
    }
    let store = open_store(dd.root()).await?;
    let listing = store.list_points_checked(Some(vm)).await?;
    crate::store_seen::report_junk(&listing.junk);
    let db = db(dd)?;
    actions::check_points(&db, vm, &listing.points, accept_rollback).map_err(action)?;
    actions::pick_point(&listing.points, vm, point).map_err(action)?;
    Ok(())
}

/// The API of the gateway serving `dd`, or an error saying one must run (these actions are
/// carried out by the gateway: with none running there is nothing to serve the disks).
fn running(dd: &DataDir, what: &str) -> Result<Api> {
    match api_client::target(dd.root())? {
        Target::Gateway(api) => Ok(api),
        Target::Offline => bail!(
            "no gateway serves {}: {what} needs the running gateway (start `standby serve`)",
            dd.root().display()
        ),
    }
}

pub async fn attach(dd: &DataDir, a: AttachArgs) -> Result<()> {
    let req = AttachRequest::from_spec(&a.spec, a.rw, a.accept_store_rollback).map_err(action)?;
    actions::check_attach_names(&req).map_err(action)?;
    check_offline(dd, &req.vm, &req.point, req.accept_store_rollback).await?;
    let api = running(dd, "attach")?;
    let at = api
        .post("/attachments", Some(serde_json::to_value(&req)?))
        .await?;
    let s = |k: &str| at[k].as_str().unwrap_or_default().to_string();
    if let Some(w) = at["warning"].as_str() {
        eprintln!("warning: {w}");
    }
    println!(
        "{}/{}@{} served as {} ({}; {} disk)",
        s("vm"),
        s("disk"),
        s("point"),
        s("uri"),
        if at["rw"].as_bool() == Some(true) {
            "writable through a local overlay"
        } else {
            "read-only"
        },
        human(at["size_bytes"].as_u64().unwrap_or(0))
    );
    Ok(())
}

pub async fn detach(dd: &DataDir, export: &str) -> Result<()> {
    match api_client::target(dd.root())? {
        Target::Gateway(api) => {
            api.post(&format!("/attachments/{}/detach", seg(export)), None)
                .await?;
        }
        Target::Offline => {
            actions::detach(&db(dd)?, export).map_err(action)?;
        }
    }
    println!("{export} detached (its overlay, if any, is removed)");
    Ok(())
}

pub async fn failover(dd: &DataDir, cmd: FailoverCommand) -> Result<()> {
    match cmd {
        FailoverCommand::Test { point, no_launch } => {
            start(dd, FailoverMode::Test, point, !no_launch).await
        }
        FailoverCommand::Start { point } => start(dd, FailoverMode::Failover, point, false).await,
        FailoverCommand::Cleanup { vm } => cleanup(dd, &vm).await,
        FailoverCommand::Prepare { vm, wait } => prepare(dd, &vm, wait).await,
        FailoverCommand::Commit { vm, wait } => commit(dd, &vm, wait).await,
    }
}

async fn start(dd: &DataDir, mode: FailoverMode, a: PointArgs, launch: bool) -> Result<()> {
    let req = FailoverRequest {
        vm: a.vm,
        point: a.point,
        accept_store_rollback: a.accept_store_rollback,
        launch,
    };
    actions::check_failover_name(&req).map_err(action)?;
    check_offline(dd, &req.vm, &req.point, req.accept_store_rollback).await?;
    let api = running(
        dd,
        match mode {
            FailoverMode::Test => "a test failover",
            FailoverMode::Failover => "a failover",
        },
    )?;
    let path = match mode {
        FailoverMode::Test => "test",
        FailoverMode::Failover => "start",
    };
    let mut body = serde_json::json!({
        "point": req.point,
        "accept_store_rollback": req.accept_store_rollback,
    });
    if mode == FailoverMode::Test {
        body["launch"] = serde_json::Value::Bool(launch);
    }
    let r = tokio::time::timeout(
        Duration::from_secs(a.wait.max(1)),
        api.post(
            &format!("/vms/{}/failover/{path}", seg(&req.vm)),
            Some(body),
        ),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "the gateway did not answer within {} s: see `standby jobs --vm {}`",
            a.wait,
            req.vm
        )
    })??;
    let s: FailoverStarted = serde_json::from_value(r).context("the API's answer")?;
    if let Some(w) = &s.warning {
        eprintln!("warning: {w}");
    }
    println!("{}", report(&s));
    Ok(())
}

/// What a served (test) failover prints, with the VM the gateway launched.
fn report(s: &FailoverStarted) -> String {
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
        s.served_secs
    )];
    for ((disk, _), uri) in s.exports.iter().zip(&s.uris) {
        lines.push(format!("  {disk}: {uri}"));
    }
    if s.mode == FailoverMode::Failover {
        lines.push(format!(
            "  hydrating into local images in the background (see `standby status`); then `standby failover commit {vm}`"
        ));
        return lines.join("\n");
    }
    match (s.launch, &s.vm_process) {
        (LaunchOutcome::Launched, Some(p)) => {
            lines.push(format!("  VM launched (pid {}), output in {}", p.pid, p.log));
            if p.state == VmState::Exited {
                lines.push(format!(
                    "  the VM process {}",
                    p.exit.as_deref().unwrap_or("exited")
                ));
            }
        }
        (LaunchOutcome::NoCommand, _) => lines.push(
            "  no failover command configured (`standby policy set --failover-command ...`): boot the VM from the exports above".into(),
        ),
        _ => {}
    }
    lines.push(format!(
        "  replication continues; remove with `standby failover cleanup {vm}`"
    ));
    lines.join("\n")
}

async fn cleanup(dd: &DataDir, vm: &str) -> Result<()> {
    let done: CleanedUp = match api_client::target(dd.root())? {
        Target::Gateway(api) => {
            // The gateway stops the VM it launched, then drops the exports and overlays.
            let r = api
                .post(&format!("/vms/{}/failover/cleanup", seg(vm)), None)
                .await?;
            serde_json::from_value(r).context("the API's answer")?
        }
        Target::Offline => {
            // Stopping the VM waits (up to twice the stop grace): not on a runtime worker.
            let (dd, vm) = (dd.clone(), vm.to_string());
            tokio::task::spawn_blocking(move || {
                let db = db(&dd)?;
                actions::cleanup_test(&dd, &db, &vm).map_err(action)
            })
            .await
            .context("the cleanup task")??
        }
    };
    for s in &done.stopped_vms {
        println!("VM process {} {}", s.pid, s.detail);
    }
    println!(
        "test failover of VM {vm} removed ({} disks)",
        done.exports.len()
    );
    Ok(())
}

async fn prepare(dd: &DataDir, vm: &str, wait: u64) -> Result<()> {
    if let Target::Offline = api_client::target(dd.root())? {
        // Say what is wrong with the request first, then that the gateway must run.
        actions::check_prepare(&db(dd)?, vm).map_err(action)?;
    }
    let api = running(dd, "a planned failover")?;
    let r = api
        .post(&format!("/vms/{}/failover/prepare", seg(vm)), None)
        .await?;
    let job = r["job"].as_i64().context("the API's answer has no job")?;
    let j = api_client::wait_job(&api, job, Duration::from_secs(wait), |_| {}).await?;
    if j["state"].as_str() != Some("succeeded") {
        bail!(
            "{}",
            j["error"].as_str().unwrap_or("the planned failover failed")
        );
    }
    // The job's detail: "final point ID; protection stopped here".
    let point = j["detail"]
        .as_str()
        .and_then(|d| d.strip_prefix("final point "))
        .and_then(|d| d.split(';').next())
        .unwrap_or_default()
        .to_string();
    println!(
        "VM {vm}: final changes replicated (point {point}); protection stopped here. Fail over on the recovery gateway with `standby failover start {vm} --point {point}`"
    );
    Ok(())
}

async fn commit(dd: &DataDir, vm: &str, wait: u64) -> Result<()> {
    if let Target::Offline = api_client::target(dd.root())? {
        actions::check_commit(&db(dd)?, vm).map_err(action)?;
    }
    let api = running(dd, "a failover commit")?;
    let r = api
        .post(&format!("/vms/{}/failover/commit", seg(vm)), None)
        .await?;
    let s: CommitStarted = serde_json::from_value(r).context("the API's answer")?;
    let bar = Progress::percent(&format!("committing VM {vm}: hydration"));
    let j = api_client::wait_job(&api, s.job, Duration::from_secs(wait), |pct| {
        bar.set_percent(pct)
    })
    .await?;
    if j["state"].as_str() != Some("succeeded") {
        bail!("{}", j["error"].as_str().unwrap_or("the commit failed"));
    }
    bar.finish();
    println!(
        "VM {vm} failover committed: disks {} are local disks of this gateway. Protect it again (reverse replication sends only changed chunks): standby protect {vm} --disks {}",
        s.exports.join(", "),
        s.exports.join(",")
    );
    Ok(())
}
