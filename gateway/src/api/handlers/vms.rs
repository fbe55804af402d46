//! Protected VMs: `GET /api/v1/vms[/{vm}]` (state, health, RPO, backlog, errors, retries) and
//! the actions protect (`POST /api/v1/vms`), unprotect, resync and resume, through
//! [`crate::replication::actions`] (the CLI's code), carried out by the engine
//! ([`crate::replication::requests`]).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::replication::actions::{self, ProtectOutcome, ProtectRequest, ResumeOutcome};
use crate::replication::status::{vm_status, vm_statuses, VmStatus};
use crate::replication::Phase;

pub async fn list(State(s): State<Arc<ApiState>>) -> Result<Json<Vec<VmStatus>>, ApiError> {
    s.blocking(|_, db| Ok(vm_statuses(db)?)).await.map(Json)
}

pub async fn one(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
) -> Result<Json<VmStatus>, ApiError> {
    let vm = super::path(vm)?;
    s.blocking(move |_, db| {
        let row = actions::vm(db, &vm)?;
        Ok(vm_status(db, row, &db.policy()?)?)
    })
    .await
    .map(Json)
}

#[derive(Serialize)]
pub struct Protected {
    pub vm: String,
    pub disks: Vec<String>,
    #[serde(flatten)]
    pub outcome: ProtectOutcome,
}

/// Validates, checks that the replica store opens, then hands the VM to the engine, which
/// records it and starts its worker (initial replication) before answering.
pub async fn protect(
    State(s): State<Arc<ApiState>>,
    req: Result<Json<ProtectRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Protected>), ApiError> {
    let req = Arc::new(super::body(req)?);
    let r = Arc::clone(&req);
    s.blocking(move |s, db| Ok(actions::check_protect(&s.dd, db, &r)?))
        .await?;
    crate::site::open_store(s.dd.root())
        .await
        .map_err(|e| ApiError::unavailable(format!("the replica store is not usable: {e}")))?;
    let outcome = s.engine.protect((*req).clone()).await?;
    Ok((
        StatusCode::CREATED,
        Json(Protected {
            vm: req.vm.clone(),
            disks: req.disks.clone(),
            outcome,
        }),
    ))
}

#[derive(Serialize)]
pub struct Unprotected {
    pub vm: String,
    pub disks: Vec<String>,
}

pub async fn unprotect(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
) -> Result<Json<Unprotected>, ApiError> {
    let vm = super::path(vm)?;
    let disks = s.engine.unprotect(vm.clone()).await?;
    Ok(Json(Unprotected { vm, disks }))
}

/// Body of `POST /api/v1/vms/{vm}/resync` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncRequest {
    /// Hash every chunk instead of only those the change records name.
    #[serde(default)]
    pub full: bool,
}

#[derive(Serialize)]
pub struct ResyncStarted {
    pub vm: String,
    pub state: Phase,
}

pub async fn resync(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Json<ResyncStarted>, ApiError> {
    let vm = super::path(vm)?;
    // The body is optional: none means `{"full": false}`.
    let full = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        serde_json::from_slice::<ResyncRequest>(&body)
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?
            .full
    };
    let state = s.engine.resync(vm.clone(), full).await?;
    Ok(Json(ResyncStarted { vm, state }))
}

#[derive(Serialize)]
pub struct Resumed {
    pub vm: String,
    #[serde(flatten)]
    pub outcome: ResumeOutcome,
}

pub async fn resume(
    State(s): State<Arc<ApiState>>,
    vm: Result<Path<String>, PathRejection>,
) -> Result<Json<Resumed>, ApiError> {
    let vm = super::path(vm)?;
    let outcome = s.engine.resume(vm.clone()).await?;
    Ok(Json(Resumed { vm, outcome }))
}
