//! Replication commands: protect, unprotect, policy, resync, resume, status, jobs, job.
//!
//! The reads (status, jobs, policy show) read the replication state database in the data
//! directory. The actions go to the running gateway's API when one serves the data directory
//! (its engine carries them out at once, see [`crate::api_client`]); with no gateway running,
//! they validate and write the database themselves, and the gateway reads it when it starts.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use gateway::failover::replica::OverlayKind;
use gateway::failover::test_vm::VmState;
use gateway::replication::db::{Db, JobState};
use gateway::replication::status::{vm_statuses, AttachmentView, HealthState, JobView};
use gateway::replication::{actions, now_ms, Policy, ProtectionState};
use gateway::DataDir;

use crate::api_client::{self, seg, Target};
use crate::cmd_store::{human, open_store, time_of, time_of_ms};

#[derive(clap::Args)]
pub struct ProtectArgs {
    /// VM name (a group of disks replicated together).
    pub vm: String,
    /// The VM's disks, comma separated (disks of this data directory).
    #[arg(long, value_delimiter = ',', required = true)]
    pub disks: Vec<String>,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Show the site's replication policy.
    Show {
        /// JSON (the fields of GET /api/v1/policy, see docs/api.md).
        #[arg(long)]
        json: bool,
    },
    /// Change settings of the site's replication policy (others keep their value).
    Set(Box<PolicySetArgs>),
}

#[derive(clap::Args)]
pub struct PolicySetArgs {
    /// Copy frequency: 30s, 5m, 15m (or any duration), or "continuous".
    #[arg(long)]
    pub interval: Option<String>,
    /// Keep recovery points for this long, e.g. 24h, 7d.
    #[arg(long)]
    pub retention: Option<String>,
    /// Cut an app-consistent point this often (e.g. 4h), or "off".
    #[arg(long)]
    pub app_consistent: Option<String>,
    /// Command run before an app-consistent cut (e.g. a guest-agent fsfreeze); $STANDBY_VM
    /// names the VM. "none" clears it.
    #[arg(long)]
    pub freeze_cmd: Option<String>,
    /// Command run after an app-consistent cut. "none" clears it.
    #[arg(long)]
    pub thaw_cmd: Option<String>,
    /// Start initial replication "now" or at a Unix time (seconds).
    #[arg(long)]
    pub initial_start: Option<String>,
    /// Local-time window for resynchronization, "HH:MM-HH:MM" or "always".
    #[arg(long)]
    pub resync_window: Option<String>,
    /// Upload limit per second, e.g. 100M; 0 = none.
    #[arg(long)]
    pub bandwidth: Option<String>,
    /// Consolidate a disk's patches into chunks in the background beyond this size, e.g. 256M
    /// (a cut folds inline past 4x this).
    #[arg(long)]
    pub fold_patch_bytes: Option<String>,
    /// Command a test failover launches, e.g. a qemu command line using {disk0} (NBD URI of
    /// the first disk), {disk:NAME}, {vm}, {point}, {dir}. Run without a shell: each value
    /// stays inside its argument; also in STANDBY_* variables. "none" clears it.
    #[arg(long)]
    pub failover_command: Option<String>,
    /// Divide retry delays by this factor (for tests and drills).
    #[arg(long, hide = true)]
    pub retry_time_scale: Option<u32>,
}

#[derive(clap::Args)]
pub struct JobsArgs {
    /// Only this VM's jobs.
    #[arg(long)]
    pub vm: Option<String>,
    /// How many (newest first).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Keep showing running jobs (progress bars on a terminal) until none runs.
    #[arg(long, conflicts_with = "json")]
    pub watch: bool,
    /// JSON (the fields of GET /api/v1/jobs, see docs/api.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum JobCommand {
    /// One job with its steps and timings.
    Show {
        id: i64,
        /// JSON (the fields of GET /api/v1/jobs/ID, see docs/api.md).
        #[arg(long)]
        json: bool,
    },
}

fn open_db(dd: &DataDir) -> Result<Db> {
    Db::open(dd.root()).context("opening the replication state")
}

fn action(e: actions::ActionError) -> anyhow::Error {
    anyhow::anyhow!(e)
}

pub async fn protect(dd: &DataDir, a: ProtectArgs) -> Result<()> {
    let req = actions::ProtectRequest {
        vm: a.vm,
        disks: a.disks,
    };
    let notes = match api_client::target(dd.root())? {
        Target::Gateway(api) => {
            let r = api.post("/vms", Some(serde_json::to_value(&req)?)).await?;
            serde_json::from_value::<Vec<String>>(r["notes"].clone()).unwrap_or_default()
        }
        Target::Offline => {
            let db = open_db(dd)?;
            actions::check_protect(dd, &db, &req).map_err(action)?;
            // The store must be reachable with the right key before anything is recorded.
            open_store(dd.root())
                .await
                .context("the replica store is not usable")?;
            actions::protect(dd, &db, &req).map_err(action)?.notes
        }
    };
    for n in notes {
        eprintln!("note: {n}");
    }
    println!(
        "VM {} registered for protection (disks {}); the gateway enables protection and starts initial replication",
        req.vm,
        req.disks.join(", ")
    );
    Ok(())
}

pub async fn unprotect(dd: &DataDir, vm: &str) -> Result<()> {
    match api_client::target(dd.root())? {
        Target::Gateway(api) => {
            api.post(&format!("/vms/{}/unprotect", seg(vm)), None)
                .await?;
        }
        Target::Offline => {
            let db = open_db(dd)?;
            actions::unprotect(dd, &db, vm).map_err(action)?;
        }
    }
    println!(
        "VM {vm} unprotected: replication stopped; its recovery points stay in the store (remove them with `standby point prune`)"
    );
    Ok(())
}

pub async fn policy(dd: &DataDir, cmd: PolicyCommand) -> Result<()> {
    let p = match cmd {
        PolicyCommand::Show { json: true } => {
            println!("{}", serde_json::to_string_pretty(&open_db(dd)?.policy()?)?);
            return Ok(());
        }
        PolicyCommand::Show { json: false } => open_db(dd)?.policy()?,
        PolicyCommand::Set(a) => {
            let a = *a;
            let change = actions::PolicyChange {
                interval: a.interval,
                retention: a.retention,
                app_consistent: a.app_consistent,
                freeze_cmd: a.freeze_cmd,
                thaw_cmd: a.thaw_cmd,
                initial_start: a.initial_start,
                resync_window: a.resync_window,
                bandwidth: a.bandwidth,
                fold_patch_bytes: a.fold_patch_bytes,
                failover_command: a.failover_command,
                retry_time_scale: a.retry_time_scale,
            };
            // Validated here first: a bad value is refused before anything is sent or written.
            change.apply(open_db(dd)?.policy()?).map_err(action)?;
            match api_client::target(dd.root())? {
                Target::Gateway(api) => serde_json::from_value(
                    api.post("/policy", Some(serde_json::to_value(&change)?))
                        .await?,
                )
                .context("the API's policy")?,
                Target::Offline => actions::set_policy(&open_db(dd)?, &change).map_err(action)?,
            }
        }
    };
    print_policy(&p);
    Ok(())
}

fn print_policy(p: &Policy) {
    let interval = if p.interval_secs == 0 {
        "continuous".to_string()
    } else {
        format!("{} s", p.interval_secs)
    };
    println!("copy frequency        {interval}");
    println!("retention             {} h", p.retention_hours);
    if p.app_consistent_hours > 0.0 {
        println!("app-consistent every  {} h", p.app_consistent_hours);
    } else {
        println!("app-consistent every  off");
    }
    println!(
        "freeze / thaw         {} / {}",
        p.freeze_cmd.as_deref().unwrap_or("-"),
        p.thaw_cmd.as_deref().unwrap_or("-")
    );
    println!(
        "initial replication   {}",
        p.initial_start_unix
            .map(|t| time_of(t * 1000))
            .unwrap_or_else(|| "now".into())
    );
    println!("resync window         {}", p.resync_window);
    println!(
        "bandwidth limit       {}",
        if p.bandwidth_bytes_per_sec == 0 {
            "none".to_string()
        } else {
            format!("{}/s", human(p.bandwidth_bytes_per_sec))
        }
    );
    println!("fold patches beyond   {}", human(p.fold_patch_bytes));
    println!(
        "failover command      {}",
        p.failover_command.as_deref().unwrap_or("-")
    );
    if p.retry_time_scale > 1 {
        println!("retry time scale      1/{}", p.retry_time_scale);
    }
}

pub async fn resync(dd: &DataDir, vm: &str, full: bool) -> Result<()> {
    match api_client::target(dd.root())? {
        Target::Gateway(api) => {
            api.post(
                &format!("/vms/{}/resync", seg(vm)),
                Some(serde_json::json!({ "full": full })),
            )
            .await?;
        }
        Target::Offline => {
            actions::resync(&open_db(dd)?, vm, full).map_err(action)?;
        }
    }
    println!("VM {vm}: resynchronization starts now");
    Ok(())
}

pub async fn resume(dd: &DataDir, vm: &str) -> Result<()> {
    let (resumed, state) = match api_client::target(dd.root())? {
        Target::Gateway(api) => {
            let r = api.post(&format!("/vms/{}/resume", seg(vm)), None).await?;
            (
                r["outcome"].as_str() == Some("resumed"),
                r["state"].as_str().unwrap_or("?").to_string(),
            )
        }
        Target::Offline => match actions::resume(&open_db(dd)?, vm).map_err(action)? {
            actions::ResumeOutcome::NothingToResume(p) => (false, p.to_string()),
            actions::ResumeOutcome::Resumed(p) => (true, p.to_string()),
        },
    };
    if resumed {
        println!("VM {vm} resumed: {state}");
    } else {
        println!("VM {vm} is {state}: nothing to resume");
    }
    Ok(())
}

fn ago(ms: u64) -> String {
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

pub fn status(dd: &DataDir, json: bool) -> Result<()> {
    let db = open_db(dd)?;
    let vms = vm_statuses(&db)?;
    let attachments: Vec<AttachmentView> =
        gateway::failover::test_vm::attachment_views(dd.root(), &db)?;
    if json {
        let out = serde_json::json!({"vms": vms, "attachments": attachments});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if vms.is_empty() {
        println!("no protected VM (protect one with `standby protect VM --disks a,b`)");
    }
    for v in vms {
        let phase = ProtectionState::of(v.state, v.progress_percent, &v.reason);
        let health = match v.health {
            HealthState::Normal => "Normal",
            HealthState::Warning => "Warning",
            HealthState::Critical => "Critical",
        };
        println!("VM {}", v.name);
        println!("  state        {phase}");
        println!(
            "  health       {health}{}",
            if v.health_reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", v.health_reasons.join("; "))
            }
        );
        match v.last_cycle_ms {
            Some(t) => println!(
                "  RPO          {} (replica current as of {})",
                ago(t),
                time_of_ms(t)
            ),
            None => println!("  RPO          - (no recovery point yet)"),
        }
        if let Some(p) = &v.last_point {
            println!("  last point   {}/{}", v.name, p);
        }
        for d in &v.disks {
            match (d.size_bytes, d.backlog_bytes, &d.log_state) {
                (Some(size), Some(backlog), Some(state)) => println!(
                    "  disk {:<12} size {}  log backlog {} ({:.1}%)  log {}",
                    d.name,
                    human(size),
                    human(backlog),
                    100.0 * backlog as f64 / size.max(1) as f64,
                    state
                ),
                _ => println!(
                    "  disk {:<12} (not reported: is `standby serve` running?)",
                    d.name
                ),
            }
        }
        if !v.last_error.is_empty() {
            println!("  last error   {}", v.last_error);
        }
        if let Some(t) = v.next_retry_ms {
            println!(
                "  next retry   in {} s (attempt {})",
                t.saturating_sub(now_ms()).div_ceil(1000),
                v.failures + 1
            );
        }
    }
    print_attachments(&attachments);
    Ok(())
}

fn print_attachments(attachments: &[AttachmentView]) {
    if attachments.is_empty() {
        return;
    }
    println!("Recovery points served");
    for a in attachments {
        let what = match a.kind {
            OverlayKind::Test => "test failover",
            OverlayKind::Failover => "failover",
            OverlayKind::Attach => "attached",
        };
        let mut line = format!(
            "  {:<40} {what:<14} {}/{}@{} {} {}",
            a.export,
            a.vm,
            a.disk,
            a.point,
            if a.writable { "rw" } else { "ro" },
            a.state
        );
        if a.kind == OverlayKind::Failover {
            line.push_str(&format!(" (hydrated {:.0}%)", a.hydrated_percent));
        }
        if let Some(p) = &a.vm_process {
            let state = match p.state {
                VmState::Running => "running".to_string(),
                VmState::Exited => p.exit.clone().unwrap_or_else(|| "exited".into()),
            };
            line.push_str(&format!(" VM pid {} {state} (output in {})", p.pid, p.log));
        }
        if !a.error.is_empty() {
            line.push_str(&format!(" error: {}", a.error));
        }
        println!("{line}");
    }
}

pub async fn jobs(dd: &DataDir, a: JobsArgs) -> Result<()> {
    let db = open_db(dd)?;
    if a.json {
        let jobs: Vec<JobView> = db
            .jobs(a.limit, a.vm.as_deref())?
            .into_iter()
            .map(JobView::from)
            .collect();
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(());
    }
    if !a.watch {
        print_jobs(&db, &a)?;
        return Ok(());
    }
    if std::io::stdout().is_terminal() {
        return watch_bars(&db, &a).await;
    }
    // Not a terminal: one line per change of a running job, until none runs.
    let mut last = String::new();
    loop {
        let running: Vec<_> = db
            .jobs(a.limit, a.vm.as_deref())?
            .into_iter()
            .filter(|j| j.state == JobState::Running)
            .collect();
        let line = running
            .iter()
            .map(|j| {
                format!(
                    "#{} {} {} {:.0}% {}",
                    j.id,
                    job_owner(j),
                    j.kind,
                    j.progress,
                    j.detail
                )
            })
            .collect::<Vec<_>>()
            .join(" | ");
        if line != last {
            println!(
                "{}",
                if line.is_empty() {
                    "no running job"
                } else {
                    &line
                }
            );
            last = line;
        }
        if running.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn watch_bars(db: &Db, a: &JobsArgs) -> Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let mp = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:30} [{bar:40}] {pos:>3}% {msg}")
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> ");
    let mut bars: std::collections::BTreeMap<i64, ProgressBar> = Default::default();
    loop {
        let jobs = db.jobs(a.limit, a.vm.as_deref())?;
        let mut any = false;
        for j in &jobs {
            let running = j.state == JobState::Running;
            if let Some(b) = bars.get(&j.id) {
                b.set_position(j.progress as u64);
                b.set_message(j.detail.clone());
                if !running && !b.is_finished() {
                    b.finish_with_message(format!("{} {}", j.state, j.error));
                }
            } else if running {
                let b = mp.add(ProgressBar::new(100).with_style(style.clone()));
                b.set_prefix(format!("#{} {} {}", j.id, job_owner(j), j.kind));
                b.set_position(j.progress as u64);
                bars.insert(j.id, b);
            }
            any |= running;
        }
        if !any {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The VM column of a job: `-` for a job of the whole site (a store verification).
fn job_owner(j: &gateway::replication::db::JobRow) -> &str {
    if j.vm.is_empty() {
        "-"
    } else {
        &j.vm
    }
}

fn print_jobs(db: &Db, a: &JobsArgs) -> Result<()> {
    let jobs = db.jobs(a.limit, a.vm.as_deref())?;
    if jobs.is_empty() {
        println!("no jobs");
        return Ok(());
    }
    println!(
        "{:>6}  {:<12} {:<20} {:<12} {:>5}  {:<21} {:>9}  detail",
        "id", "vm", "kind", "state", "%", "started", "duration"
    );
    for j in jobs {
        let dur = j
            .finished_ms
            .unwrap_or_else(now_ms)
            .saturating_sub(j.created_ms);
        let detail = if j.error.is_empty() {
            &j.detail
        } else {
            &j.error
        };
        println!(
            "{:>6}  {:<12} {:<20} {:<12} {:>5.0}  {:<21} {:>7.1} s  {}",
            j.id,
            job_owner(&j),
            j.kind,
            j.state,
            j.progress,
            time_of(j.created_ms),
            dur as f64 / 1000.0,
            detail
        );
    }
    Ok(())
}

pub fn job(dd: &DataDir, cmd: JobCommand) -> Result<()> {
    let db = open_db(dd)?;
    let JobCommand::Show { id, json } = cmd;
    let Some((j, steps)) = db.job(id)? else {
        bail!("no job {id} (see `standby jobs`)");
    };
    if json {
        let v = JobView::detail(&db, j, steps)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if j.vm.is_empty() {
        println!("job {} : {} of the replica store", j.id, j.kind);
    } else {
        println!("job {} : {} of VM {}", j.id, j.kind, j.vm);
    }
    println!("  state     {} ({:.0}%)", j.state, j.progress);
    println!("  started   {}", time_of(j.created_ms));
    if let Some(f) = j.finished_ms {
        println!(
            "  finished  {} ({:.1} s)",
            time_of(f),
            f.saturating_sub(j.created_ms) as f64 / 1000.0
        );
    }
    if !j.detail.is_empty() {
        println!("  detail    {}", j.detail);
    }
    if !j.error.is_empty() {
        println!("  error     {}", j.error);
    }
    println!("  steps:");
    for s in steps {
        let dur = s
            .finished_ms
            .unwrap_or_else(now_ms)
            .saturating_sub(s.started_ms);
        println!(
            "    {:>2}. {:<36} {:<12} {:>7.1} s  {}",
            s.seq,
            s.name,
            s.state,
            dur as f64 / 1000.0,
            s.detail
        );
    }
    Ok(())
}
