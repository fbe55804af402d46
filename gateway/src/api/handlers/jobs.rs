//! `GET /api/v1/jobs?vm=&limit=` (newest first; a store-wide job has `vm: null`) and
//! `GET /api/v1/jobs/{id}` (with steps, and the live figures and outcome of a job that has them).

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::replication::status::JobView;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    pub vm: Option<String>,
    /// How many, newest first (default 20, at most 500).
    pub limit: Option<usize>,
}

pub async fn list(
    State(s): State<Arc<ApiState>>,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Json<Vec<JobView>>, ApiError> {
    let q = super::query(q)?;
    let limit = q.limit.unwrap_or(20);
    if limit == 0 || limit > 500 {
        return Err(ApiError::bad_request(format!(
            "limit must be 1-500, got {limit}"
        )));
    }
    s.blocking(move |_, db| {
        Ok(db
            .jobs(limit, q.vm.as_deref())?
            .into_iter()
            .map(JobView::from)
            .collect())
    })
    .await
    .map(Json)
}

pub async fn one(
    State(s): State<Arc<ApiState>>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let id = super::path(id)?;
    s.blocking(move |_, db| {
        let Some((j, steps)) = db.job(id)? else {
            return Err(ApiError::not_found(format!(
                "no job {id} (see GET /api/v1/jobs)"
            )));
        };
        Ok(JobView::detail(db, j, steps)?)
    })
    .await
    .map(Json)
}
