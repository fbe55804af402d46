//! `GET /api/v1/store`: where the replica store is, its settings and usage (chunk count and
//! bytes, points per VM) — what `standby store info` shows.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::api::error::ApiError;
use crate::api::ApiState;

#[derive(Debug, Serialize)]
pub struct StoreInfo {
    /// The backend's description (local path, or S3 endpoint and bucket; never credentials).
    pub location: String,
    pub store_id: String,
    pub format_version: u32,
    pub chunk_size_bytes: u32,
    pub compression: String,
    pub encrypted: bool,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub points: u64,
    /// Points per VM.
    pub vms: BTreeMap<String, u64>,
}

pub async fn info(State(s): State<Arc<ApiState>>) -> Result<Json<StoreInfo>, ApiError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::unavailable(format!("the replica store cannot be read: {e}"))
    };
    let store = crate::site::open_store(s.dd.root())
        .await
        .map_err(|e| unavailable(&e))?;
    let chunks = store
        .backend()
        .list("chunks/")
        .await
        .map_err(|e| unavailable(&e))?;
    let points = store.list_points(None).await.map_err(|e| unavailable(&e))?;
    let mut vms = BTreeMap::new();
    for p in &points {
        *vms.entry(p.vm.clone()).or_insert(0) += 1;
    }
    let st = store.settings();
    Ok(Json(StoreInfo {
        location: store.backend().describe(),
        store_id: st.store_id.clone(),
        format_version: st.format_version,
        chunk_size_bytes: st.chunk_size,
        compression: format!("{:?}", st.compression).to_lowercase(),
        encrypted: st.encryption.is_some(),
        chunks: chunks.len() as u64,
        chunk_bytes: chunks.iter().map(|o| o.size).sum(),
        points: points.len() as u64,
        vms,
    }))
}
