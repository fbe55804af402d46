//! Admin requests to the running engine, as typed messages.
//!
//! The HTTP API (and through it the CLI, the web console and scripts) hands every mutating
//! action to the engine as a [`Request`] over a channel ([`EngineHandle`]). The engine's
//! supervisor ([`super::supervisor`]) takes each at once: it runs the action's validation and
//! writes ([`super::actions`], [`crate::failover::actions`]) on the blocking pool, then acts
//! on it in the same turn — starts the new VM's worker, wakes a worker, serves or drops
//! exports — and only then answers on the request's reply channel. Nobody polls the state
//! database for requests.
//!
//! Invariants:
//! - an invalid request changes nothing (the actions validate before they write) and is
//!   answered with the [`ActionError`] whose message the API returns to the admin;
//! - what must survive a crash is still written to the state database before the answer (the
//!   VM row, the policy, the attachment rows, the jobs): the engine reads those at start, so a
//!   request answered before a crash is carried out after the restart;
//! - the answer comes after the action took effect (an attach is answered once its export is
//!   served, a (test) failover once its disks are served, its VM launched and its job
//!   finished), except for the long ones (planned failover, commit), answered with their job
//!   id while the engine works on them.

use replica_store::PointMeta;
use tokio::sync::{mpsc, oneshot};

use super::actions::{ActionError, PolicyChange, ProtectOutcome, ProtectRequest, ResumeOutcome};
use super::db::{Attachment, Phase};
use super::policy::Policy;
use crate::failover::actions::{
    AttachRequest, Attached, CleanedUp, CommitStarted, FailoverMode, FailoverRequest,
    FailoverStarted, PrepareStarted,
};

/// The reply channel of one request.
pub type Reply<T> = oneshot::Sender<Result<T, ActionError>>;

/// How many requests may wait for the engine (senders wait beyond that).
pub const QUEUE: usize = 64;

/// One admin request and where to answer it.
#[derive(Debug)]
pub enum Request {
    /// Record a VM for protection and start its worker (the caller checked the store opens).
    Protect(ProtectRequest, Reply<ProtectOutcome>),
    /// Stop protecting a VM; answers its disks.
    Unprotect(String, Reply<Vec<String>>),
    /// Resynchronize now (`full`: hash every chunk).
    Resync {
        vm: String,
        full: bool,
        reply: Reply<Phase>,
    },
    Resume(String, Reply<ResumeOutcome>),
    SetPolicy(PolicyChange, Reply<Policy>),
    /// Serve a point (the caller listed the store's points of the VM).
    Attach {
        req: AttachRequest,
        points: Vec<PointMeta>,
        reply: Reply<Attached>,
    },
    Detach(String, Reply<Attachment>),
    /// Test failover or failover of every disk of a VM (a test failover also launches its
    /// VM, answered after the launch's grace period).
    Failover {
        mode: FailoverMode,
        req: FailoverRequest,
        points: Vec<PointMeta>,
        reply: Reply<FailoverStarted>,
    },
    /// Remove a test failover: stop its VM, drop its exports and overlays.
    Cleanup {
        vm: String,
        reply: Reply<CleanedUp>,
    },
    /// Planned failover on the primary: answered with the job, finished by the engine.
    Prepare(String, Reply<PrepareStarted>),
    /// Adopt a failed-over VM's disks once hydrated: answered with the job.
    Commit(String, Reply<CommitStarted>),
}

/// The sending side, for the API and other in-process callers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
}

fn gone() -> ActionError {
    ActionError::Conflict("the replication engine is not running (the gateway is stopping)".into())
}

impl EngineHandle {
    pub(crate) fn new(tx: mpsc::Sender<Request>) -> Self {
        Self { tx }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, ActionError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn protect(&self, r: ProtectRequest) -> Result<ProtectOutcome, ActionError> {
        self.call(|reply| Request::Protect(r, reply)).await
    }

    pub async fn unprotect(&self, vm: String) -> Result<Vec<String>, ActionError> {
        self.call(|reply| Request::Unprotect(vm, reply)).await
    }

    pub async fn resync(&self, vm: String, full: bool) -> Result<Phase, ActionError> {
        self.call(|reply| Request::Resync { vm, full, reply }).await
    }

    pub async fn resume(&self, vm: String) -> Result<ResumeOutcome, ActionError> {
        self.call(|reply| Request::Resume(vm, reply)).await
    }

    pub async fn set_policy(&self, c: PolicyChange) -> Result<Policy, ActionError> {
        self.call(|reply| Request::SetPolicy(c, reply)).await
    }

    pub async fn attach(
        &self,
        req: AttachRequest,
        points: Vec<PointMeta>,
    ) -> Result<Attached, ActionError> {
        self.call(|reply| Request::Attach { req, points, reply })
            .await
    }

    pub async fn detach(&self, export: String) -> Result<Attachment, ActionError> {
        self.call(|reply| Request::Detach(export, reply)).await
    }

    pub async fn failover(
        &self,
        mode: FailoverMode,
        req: FailoverRequest,
        points: Vec<PointMeta>,
    ) -> Result<FailoverStarted, ActionError> {
        self.call(|reply| Request::Failover {
            mode,
            req,
            points,
            reply,
        })
        .await
    }

    pub async fn cleanup(&self, vm: String) -> Result<CleanedUp, ActionError> {
        self.call(|reply| Request::Cleanup { vm, reply }).await
    }

    pub async fn prepare(&self, vm: String) -> Result<PrepareStarted, ActionError> {
        self.call(|reply| Request::Prepare(vm, reply)).await
    }

    pub async fn commit(&self, vm: String) -> Result<CommitStarted, ActionError> {
        self.call(|reply| Request::Commit(vm, reply)).await
    }
}
