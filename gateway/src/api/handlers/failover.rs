//! Failover actions: attach (`POST /api/v1/attachments`) and detach
//! (`POST /api/v1/attachments/{export}/detach`) a recovery point; test failover, its cleanup,
//! planned failover (prepare), failover and commit (`POST /api/v1/vms/{vm}/failover/{test,
//! cleanup,prepare,start,commit}`), through [`crate::failover::actions`] (the CLI's code).
//!
//! Attach answers once the export is served (the engine serves within a second), so the
//! answer's `uri` can be opened at once. The failovers start a job and answer `202 Accepted`
//! with its id at once; a blocking task (with its own database connection, so the API's
//! shared one is never held while waiting) waits for the gateway and finishes the job —
//! `GET /api/v1/jobs/{id}` tells the outcome. Every refusal (4xx) happens before any write.
//!
//! The API never launches the failover command (a test failover from the API serves the
//! exports; the CLI's `standby failover test` also starts the VM), and its cleanup refuses
//! while a VM the CLI launched still runs.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use replica_store::PointMeta;
use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::failover::actions::{
    self, AttachRequest, Attached, CleanedUp, FailoverMode, FailoverRequest, FailoverStarted,
};
use crate::replication::actions::ActionError;
use crate::replication::Db;

/// How long attach waits for the gateway to serve the export.
const ATTACH_WAIT: Duration = Duration::from_secs(60);
/// How long a (test) failover's task waits for its exports.
const SERVE_WAIT: Duration = Duration::from_secs(60);
/// How long a prepare's task waits for the final replication.
const PREPARE_WAIT: Duration = Duration::from_secs(600);
/// How long a commit's task waits for hydration.
const COMMIT_WAIT: Duration = Duration::from_secs(3600);

/// The store's valid points of `vm`.
async fn points(s: &ApiState, vm: &str) -> Result<Vec<PointMeta>, ApiError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::unavailable(format!("the replica store cannot be read: {e}"))
    };
    let store = crate::site::open_store(s.dd.root())
        .await
        .map_err(|e| unavailable(&e))?;
    let listing = store
        .list_points_checked(Some(vm))
        .await
        .map_err(|e| unavailable(&e))?;
    for j in &listing.junk {
        tracing::warn!(key = %j.key, reason = %j.reason, "ignoring an invalid point in the store");
    }
    Ok(listing.points)
}

/// Runs `f` on a blocking thread with a database connection of its own (for waits).
async fn waiting<T: Send + 'static>(
    s: &Arc<ApiState>,
    f: impl FnOnce(&crate::catalog::DataDir, &Db) -> Result<T, ActionError> + Send + 'static,
) -> Result<T, ApiError> {
    let dd = s.dd.clone();
    tokio::task::spawn_blocking(move || {
        let db = Db::open(dd.root()).map_err(ActionError::from)?;
        f(&dd, &db)
    })
    .await
    .map_err(|e| ApiError::internal(format!("request task failed: {e}")))?
    .map_err(ApiError::from)
}

/// Runs `f` in the background (blocking thread, own connection); its errors are in the job.
fn background(
    s: &Arc<ApiState>,
    what: &'static str,
    f: impl FnOnce(&crate::catalog::DataDir, &Db) -> Result<(), ActionError> + Send + 'static,
) {
    let dd = s.dd.clone();
    tokio::task::spawn_blocking(move || {
        let r = Db::open(dd.root())
            .map_err(ActionError::from)
            .and_then(|db| f(&dd, &db));
        if let Err(e) = r {
            tracing::warn!("{what}: {e}");
        }
    });
}

/// An optional JSON body: none (or blanks) is `T::default()`.
fn optional_body<T: serde::de::DeserializeOwned + Default>(b: &[u8]) -> Result<T, ApiError> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

#[derive(Debug, Serialize)]
pub struct AttachedView {
    #[serde(flatten)]
    pub attached: Attached,
    /// `nbd://HOST:PORT/EXPORT`.
    pub uri: String,
}

pub async fn attach(
    State(s): State<Arc<ApiState>>,
    req: Result<Json<AttachRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<AttachedView>), ApiError> {
    let req = super::body(req)?;
    actions::check_attach_names(&req)?;
    let points = points(&s, &req.vm).await?;
    let r = req.clone();
    let attached = s
        .blocking(move |s, db| Ok(actions::attach(&s.dd, db, &r, &points)?))
        .await?;
    let export = attached.export.clone();
    let addr = waiting(&s, move |_, db| {
        if let Err(e) = actions::wait_served(db, std::slice::from_ref(&export), ATTACH_WAIT) {
            db.delete_attachment(&export)?;
            return Err(e);
        }
        actions::nbd_addr(db)
    })
    .await?;
    let uri = format!("nbd://{addr}/{}", attached.export);
    Ok((StatusCode::CREATED, Json(AttachedView { attached, uri })))
}

#[derive(Debug, Serialize)]
pub struct Detached {
    pub export: String,
    pub vm: String,
    pub disk: String,
    pub point: String,
}

pub async fn detach(
    State(s): State<Arc<ApiState>>,
    export: Result<Path<String>, PathRejection>,
) -> Result<Json<Detached>, ApiError> {
    let export = super::path(export)?;
    s.blocking(move |_, db| {
        let a = actions::detach(db, &export)?;
        Ok(Detached {
            export: a.export,
            vm: a.vm,
            disk: a.disk,
            point: a.point,
        })
    })
    .await
    .map(Json)
}

/// Body of `POST /api/v1/vms/{vm}/failover/test|start` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverBody {
    /// `latest` (default), `app`, a point id or a UTC time.
    pub point: Option<String>,
    #[serde(default)]
    pub accept_store_rollback: bool,
}

async fn start(
    s: Arc<ApiState>,
    mode: FailoverMode,
    vm: Result<Path<String>, PathRejection>,
    body: &[u8],
) -> Result<(StatusCode, Json<FailoverStarted>), ApiError> {
    let vm = super::path(vm)?;
    let b: FailoverBody = optional_body(body)?;
    let req = FailoverRequest {
        vm,
        point: b.point.unwrap_or_else(|| "latest".into()),
        accept_store_rollback: b.accept_store_rollback,
    };
    actions::check_failover_name(&req)?;
    let points = points(&s, &req.vm).await?;
    let started = s
        .blocking(move |s, db| Ok(actions::start_failover(&s.dd, db, mode, &req, &points)?))
        .await?;
    let st = started.clone();
    background(&s, "failover", move |_, db| {
        let served_in = actions::await_served(db, &st, SERVE_WAIT)?;
        let addr = actions::nbd_addr(db)?;
        let exports: Vec<String> = st
            .exports
            .iter()
            .map(|(_, e)| format!("nbd://{addr}/{e}"))
            .collect();
        actions::finish_failover(
            db,
            &st,
            Ok(&format!(
                "disks served in {:.2} s: {}",
                served_in.as_secs_f64(),
                exports.join(" ")
            )),
        )
    });
    Ok((StatusCode::ACCEPTED, Json(started)))
}

pub async fn test(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<FailoverStarted>), ApiError> {
    start(s, FailoverMode::Test, vm, &body).await
}

pub async fn failover(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<FailoverStarted>), ApiError> {
    start(s, FailoverMode::Failover, vm, &body).await
}

pub async fn cleanup(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
) -> Result<Json<CleanedUp>, ApiError> {
    let vm = super::path(vm)?;
    // Waits up to seconds for the engine to drop the overlays: its own connection.
    waiting(&s, move |dd, db| actions::cleanup_test(dd, db, &vm, None))
        .await
        .map(Json)
}

/// A job started in the background.
#[derive(Debug, Serialize)]
pub struct JobStarted {
    pub vm: String,
    pub job: i64,
}

pub async fn prepare(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<JobStarted>), ApiError> {
    let vm = super::path(vm)?;
    let started = s
        .blocking(move |_, db| Ok(actions::start_prepare(db, &vm)?))
        .await?;
    let st = started.clone();
    background(&s, "planned failover", move |dd, db| {
        actions::await_prepared(dd, db, &st, PREPARE_WAIT).map(|_| ())
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(JobStarted {
            vm: started.vm,
            job: started.job,
        }),
    ))
}

pub async fn commit(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<JobStarted>), ApiError> {
    let vm = super::path(vm)?;
    let started = s
        .blocking(move |_, db| Ok(actions::start_commit(db, &vm)?))
        .await?;
    let st = started.clone();
    background(&s, "failover commit", move |_, db| {
        actions::await_committed(db, &st, COMMIT_WAIT, |_| {})
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(JobStarted {
            vm: started.vm,
            job: started.job,
        }),
    ))
}
