//! Failover actions: attach (`POST /api/v1/attachments`) and detach
//! (`POST /api/v1/attachments/{export}/detach`) a recovery point; test failover, its cleanup,
//! planned failover (prepare), failover and commit (`POST /api/v1/vms/{vm}/failover/{test,
//! cleanup,prepare,start,commit}`), through [`crate::failover::actions`] (the CLI's code).
//!
//! Each action is handed to the replication engine ([`crate::replication::requests`]), which
//! carries it out at once. Attach answers once the export is served, so the answer's `uri`
//! can be opened at once; a (test) failover answers `202 Accepted` once its disks are served
//! (its job has finished then); prepare and commit answer `202 Accepted` with their job at
//! once and the engine finishes the job — `GET /api/v1/jobs/{id}` tells the outcome. Every
//! refusal (4xx) happens before any write.
//!
//! A test failover launches the policy's failover command once its disks are served (unless
//! the body says `"launch": false`) and answers after the launch's grace period, with the VM
//! process (`vm_process`); a launch that fails is answered `500 launch_failed` with the
//! job's error (the exports stay served). The cleanup stops that VM before it drops the
//! exports ([`crate::failover::test_vm`]), whoever asks for it.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use replica_store::PointMeta;
use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::failover::actions::{
    self, AttachRequest, Attached, CleanedUp, CommitStarted, FailoverMode, FailoverRequest,
    FailoverStarted,
};
use crate::failover::test_vm::LaunchOutcome;

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

/// The gateway's NBD address.
async fn nbd_addr(s: &Arc<ApiState>) -> Result<String, ApiError> {
    s.blocking(|_, db| Ok(actions::nbd_addr(db)?)).await
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
    let attached = s.engine.attach(req, points).await?;
    let addr = nbd_addr(&s).await?;
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
    let a = s.engine.detach(export).await?;
    Ok(Json(Detached {
        export: a.export,
        vm: a.vm,
        disk: a.disk,
        point: a.point,
    }))
}

/// Body of `POST /api/v1/vms/{vm}/failover/test|start` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverBody {
    /// `latest` (default), `app`, a point id or a UTC time.
    pub point: Option<String>,
    #[serde(default)]
    pub accept_store_rollback: bool,
    /// Test failover only: launch the policy's failover command (default true).
    pub launch: Option<bool>,
}

async fn start(
    s: Arc<ApiState>,
    mode: FailoverMode,
    vm: Result<Path<String>, PathRejection>,
    body: &[u8],
) -> Result<(StatusCode, Json<FailoverStarted>), ApiError> {
    let vm = super::path(vm)?;
    let b: FailoverBody = optional_body(body)?;
    if mode == FailoverMode::Failover && b.launch.is_some() {
        return Err(ApiError::bad_request(
            "\"launch\" applies to a test failover only (POST .../failover/test)",
        ));
    }
    let req = FailoverRequest {
        vm,
        point: b.point.unwrap_or_else(|| "latest".into()),
        accept_store_rollback: b.accept_store_rollback,
        launch: b.launch.unwrap_or(true),
    };
    actions::check_failover_name(&req)?;
    let points = points(&s, &req.vm).await?;
    let started = s.engine.failover(mode, req, points).await?;
    if started.launch == LaunchOutcome::Failed {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "launch_failed",
            started
                .launch_error
                .unwrap_or_else(|| "the failover command failed".into()),
        ));
    }
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

/// Stops the test failover's VM, then drops its exports and overlays; the answer's
/// `stopped_vms` says what happened to the VM.
pub async fn cleanup(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
) -> Result<Json<CleanedUp>, ApiError> {
    let vm = super::path(vm)?;
    Ok(Json(s.engine.cleanup(vm).await?))
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
    let started = s.engine.prepare(vm).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(JobStarted {
            vm: started.vm,
            job: started.job,
        }),
    ))
}

/// Answers the job and the exports that become local disks.
pub async fn commit(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<CommitStarted>), ApiError> {
    let vm = super::path(vm)?;
    Ok((StatusCode::ACCEPTED, Json(s.engine.commit(vm).await?)))
}
