//! `GET /api/v1/points?vm=`: recovery points in the store, oldest first.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::replication::status::PointView;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointsQuery {
    pub vm: Option<String>,
}

pub async fn list(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<PointsQuery>, QueryRejection>,
) -> Result<Json<Vec<PointView>>, ApiError> {
    let q = super::query(q)?;
    if let Some(vm) = &q.vm {
        replica_store::point::validate_name("VM", vm)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let store = crate::site::open_store(s.dd.root())
        .await
        .map_err(|e| ApiError::unavailable(format!("the replica store is not usable: {e}")))?;
    let listing = store
        .list_points_checked(q.vm.as_deref())
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot list recovery points: {e}")))?;
    Ok(Json(
        listing.points.into_iter().map(PointView::from).collect(),
    ))
}
