//! `GET /api/v1/points?vm=`: recovery points in the store, oldest first.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::api::ApiState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointsQuery {
    pub vm: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PointDiskView {
    pub name: String,
    pub size_bytes: u64,
    pub source_lsn: u64,
}

#[derive(Debug, Serialize)]
pub struct PointView {
    pub vm: String,
    pub id: String,
    pub created_ms: u64,
    /// crash or app.
    pub consistency: replica_store::Consistency,
    pub parent: Option<String>,
    pub disks: Vec<PointDiskView>,
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
        listing
            .points
            .into_iter()
            .map(|p| PointView {
                disks: p
                    .disks
                    .iter()
                    .map(|d| PointDiskView {
                        name: d.name.clone(),
                        size_bytes: d.size,
                        source_lsn: d.source_lsn,
                    })
                    .collect(),
                vm: p.vm,
                id: p.id,
                created_ms: p.created_unix_ms,
                consistency: p.consistency,
                parent: p.parent,
            })
            .collect(),
    ))
}
