//! How the engine carries out an admin request ([`super::requests::Request`]) the moment the
//! supervisor takes it: the action's validation and writes on the blocking pool (one
//! implementation: [`super::actions`], [`crate::failover::actions`]), then its effect — a
//! worker started or woken, exports served or dropped, a test failover's VM launched
//! ([`crate::failover::test_vm`]; its 2 s grace runs as a task beside the engine, which answers
//! the request when it ends) or stopped — and then the answer.
//!
//! The planned failover and the commit answer with their job at once; their waits run as
//! tasks of the engine (with a database connection of their own) that finish the job.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::actions::{self, ActionError};
use super::db::Db;
use super::engine::{blocking, Engine};
use super::requests::Request;
use super::supervisor::Workers;
use crate::catalog::DataDir;
use crate::failover::actions as fa;
use crate::failover::test_vm::{self, LaunchOutcome, PendingLaunch};

/// How long a planned failover waits for its final replication.
const PREPARE_WAIT: Duration = Duration::from_secs(600);
/// How long a commit waits for hydration.
const COMMIT_WAIT: Duration = Duration::from_secs(3600);

impl Engine {
    /// Runs `f` with the engine's database connection on the blocking pool.
    async fn act<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DataDir, &Db) -> Result<T, ActionError> + Send + 'static,
    ) -> Result<T, ActionError> {
        let (db, dd) = (Arc::clone(&self.db), self.dd.clone());
        blocking(move || {
            let g = db.lock().unwrap_or_else(|p| p.into_inner());
            f(&dd, &g)
        })
        .await
    }

    /// Runs `f` in the background on the blocking pool with a connection of its own (for a
    /// long wait that must not hold the engine's); its errors are in its job.
    fn in_background(
        &self,
        what: &'static str,
        f: impl FnOnce(&DataDir, &Db) -> Result<(), ActionError> + Send + 'static,
    ) {
        let dd = self.dd.clone();
        tokio::task::spawn_blocking(move || {
            let r = Db::open(dd.root())
                .map_err(ActionError::from)
                .and_then(|db| f(&dd, &db));
            if let Err(e) = r {
                warn!("{what}: {e}");
            }
        });
    }

    /// Carries out one request and answers it (a caller that went away is ignored).
    pub(crate) async fn handle_request(
        self: &Arc<Self>,
        req: Request,
        workers: &mut Workers,
        commits: &mut BTreeSet<String>,
    ) {
        let t0 = Instant::now();
        let what = request_name(&req);
        match req {
            Request::Protect(r, reply) => {
                let vm = r.vm.clone();
                let out = self.act(move |dd, db| actions::protect(dd, db, &r)).await;
                if out.is_ok() {
                    workers.ensure(self, &vm);
                }
                let _ = reply.send(out);
            }
            Request::Unprotect(vm, reply) => {
                let v = vm.clone();
                let out = self.act(move |dd, db| actions::unprotect(dd, db, &v)).await;
                workers.wake(&vm);
                let _ = reply.send(out);
            }
            Request::Resync { vm, full, reply } => {
                let v = vm.clone();
                let out = self.act(move |_, db| actions::resync(db, &v, full)).await;
                workers.wake(&vm);
                let _ = reply.send(out);
            }
            Request::Resume(vm, reply) => {
                let v = vm.clone();
                let out = self.act(move |_, db| actions::resume(db, &v)).await;
                workers.wake(&vm);
                let _ = reply.send(out);
            }
            Request::SetPolicy(c, reply) => {
                let out = self.act(move |_, db| actions::set_policy(db, &c)).await;
                workers.wake_all();
                let _ = reply.send(out);
            }
            Request::Attach { req, points, reply } => {
                let _ = reply.send(self.serve_attach(req, points).await);
            }
            Request::Detach(export, reply) => {
                let out = self.act(move |_, db| fa::detach(db, &export)).await;
                if out.is_ok() {
                    self.sync_attachments().await;
                }
                let _ = reply.send(out);
            }
            Request::Failover {
                mode,
                req,
                points,
                reply,
            } => match self.serve_failover(mode, req, points, t0).await {
                // The launched VM's grace period runs beside the engine, which takes the next
                // requests meanwhile (its pid is recorded: a cleanup stops it).
                Ok((st, Some(pending))) => {
                    let me = Arc::clone(self);
                    tokio::spawn(async move {
                        let _ = reply.send(me.await_test_vm(st, pending).await);
                    });
                }
                Ok((st, None)) => {
                    let _ = reply.send(Ok(st));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Cleanup { vm, reply } => {
                let _ = reply.send(self.serve_cleanup(vm).await);
            }
            Request::Prepare(vm, reply) => {
                let v = vm.clone();
                let out = self.act(move |_, db| fa::start_prepare(db, &v)).await;
                if let Ok(st) = &out {
                    let st = st.clone();
                    self.in_background("planned failover", move |dd, db| {
                        fa::await_prepared(dd, db, &st, PREPARE_WAIT).map(|_| ())
                    });
                }
                // Its next cycle is due now.
                workers.wake(&vm);
                let _ = reply.send(out);
            }
            Request::Commit(vm, reply) => {
                let v = vm.clone();
                let out = self.act(move |_, db| fa::start_commit(db, &v)).await;
                if let Ok(st) = &out {
                    commits.insert(vm);
                    self.sync_attachments().await;
                    let st = st.clone();
                    self.in_background("failover commit", move |_, db| {
                        fa::await_committed(db, &st, COMMIT_WAIT, |_| {})
                    });
                }
                let _ = reply.send(out);
            }
        }
        info!(
            request = what,
            ms = t0.elapsed().as_millis() as u64,
            "admin request carried out"
        );
    }

    async fn serve_attach(
        self: &Arc<Self>,
        req: fa::AttachRequest,
        points: Vec<replica_store::PointMeta>,
    ) -> Result<fa::Attached, ActionError> {
        let at = self
            .act(move |dd, db| fa::attach(dd, db, &req, &points))
            .await?;
        self.sync_attachments().await;
        let export = at.export.clone();
        self.act(move |_, db| {
            let r = fa::wait_served(db, std::slice::from_ref(&export), Duration::ZERO);
            if r.is_err() {
                db.delete_attachment(&export)?;
            }
            r
        })
        .await?;
        Ok(at)
    }

    /// Serves a (test) failover's disks; a test failover then launches its VM (unless asked
    /// not to): its job finishes once the launch's grace period is over
    /// ([`Engine::await_test_vm`]).
    async fn serve_failover(
        self: &Arc<Self>,
        mode: fa::FailoverMode,
        req: fa::FailoverRequest,
        points: Vec<replica_store::PointMeta>,
        t0: Instant,
    ) -> Result<(fa::FailoverStarted, Option<PendingLaunch>), ActionError> {
        let launch = mode == fa::FailoverMode::Test && req.launch;
        let mut st = self
            .act(move |dd, db| fa::start_failover(dd, db, mode, &req, &points))
            .await?;
        self.sync_attachments().await;
        let s = st.clone();
        let served = self
            .act(move |_, db| {
                fa::await_served(db, &s, Duration::ZERO)?;
                fa::nbd_addr(db)
            })
            .await;
        let addr = match served {
            Ok(a) => a,
            Err(e) => {
                // await_served removed the rows and failed the job: drop what was served.
                self.sync_attachments().await;
                return Err(e);
            }
        };
        st.served_secs = t0.elapsed().as_secs_f64();
        st.uris = st
            .exports
            .iter()
            .map(|(_, e)| format!("nbd://{addr}/{e}"))
            .collect();
        if launch {
            let pending = self.launch_test_vm(&mut st).await?;
            if pending.is_some() || st.launch == LaunchOutcome::Failed {
                return Ok((st, pending));
            }
        }
        let s = st.clone();
        self.act(move |_, db| fa::finish_failover(db, &s, Ok(&test_vm::served_detail(&s))))
            .await?;
        Ok((st, None))
    }

    /// Stops the test failover's VM (on the blocking pool, not holding the engine's database
    /// connection), then removes its exports and overlays.
    async fn serve_cleanup(self: &Arc<Self>, vm: String) -> Result<fa::CleanedUp, ActionError> {
        let v = vm.clone();
        let targets = self
            .act(move |_, db| test_vm::cleanup_targets(db, &v))
            .await?;
        let stopped = blocking(move || targets.into_iter().map(test_vm::stop).collect()).await;
        let (done, rows) = self
            .act(move |_, db| fa::begin_cleanup(db, &vm, stopped))
            .await?;
        // Drops the exports and their overlays.
        self.sync_attachments().await;
        let d = done.clone();
        self.act(move |dd, db| fa::finish_cleanup(dd, db, &d, &rows))
            .await?;
        Ok(done)
    }
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Protect(..) => "protect",
        Request::Unprotect(..) => "unprotect",
        Request::Resync { .. } => "resync",
        Request::Resume(..) => "resume",
        Request::SetPolicy(..) => "policy set",
        Request::Attach { .. } => "attach",
        Request::Detach(..) => "detach",
        Request::Failover {
            mode: fa::FailoverMode::Test,
            ..
        } => "test failover",
        Request::Failover { .. } => "failover",
        Request::Cleanup { .. } => "test failover cleanup",
        Request::Prepare(..) => "planned failover",
        Request::Commit(..) => "failover commit",
    }
}
