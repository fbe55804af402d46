//! `GET /api/v1/policy` and `POST /api/v1/policy` (partial change in the CLI's syntax, see
//! [`PolicyChange`]; all-or-nothing, carried out by the engine, which wakes every worker).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::replication::actions::PolicyChange;
use crate::replication::Policy;

pub async fn show(State(s): State<Arc<ApiState>>) -> Result<Json<Policy>, ApiError> {
    s.blocking(|_, db| Ok(db.policy()?)).await.map(Json)
}

pub async fn set(
    State(s): State<Arc<ApiState>>,
    change: Result<Json<PolicyChange>, JsonRejection>,
) -> Result<Json<Policy>, ApiError> {
    let change = super::body(change)?;
    Ok(Json(s.engine.set_policy(change).await?))
}
