//! `GET /api/v1/attachments`: recovery points served as exports (attach, test failover,
//! failover with its hydration).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::replication::status::AttachmentView;

pub async fn list(State(s): State<Arc<ApiState>>) -> Result<Json<Vec<AttachmentView>>, ApiError> {
    s.blocking(|_, db| {
        Ok(db
            .attachments()?
            .into_iter()
            .map(AttachmentView::from)
            .collect())
    })
    .await
    .map(Json)
}
