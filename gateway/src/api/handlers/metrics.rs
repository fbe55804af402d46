//! `GET /metrics`: Prometheus metrics in the OpenMetrics text format (see docs/metrics.md).
//! Needs a token like every request (Prometheus: `authorization: {credentials: TOKEN}`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::metrics::CONTENT_TYPE;

pub async fn scrape(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let text = s
        .blocking(|s, db| s.metrics.scrape(db, &s.exports).map_err(ApiError::internal))
        .await?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}
