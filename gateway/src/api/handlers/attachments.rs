//! `GET /api/v1/attachments`: recovery points served as exports (attach, test failover,
//! failover with its hydration), with the process of a test failover's VM.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::failover::test_vm::attachment_views;
use crate::replication::status::AttachmentView;

pub async fn list(State(s): State<Arc<ApiState>>) -> Result<Json<Vec<AttachmentView>>, ApiError> {
    s.blocking(|s, db| Ok(attachment_views(s.dd.root(), db)?))
        .await
        .map(Json)
}
