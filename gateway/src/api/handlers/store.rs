//! `GET /api/v1/store`: where the replica store is, its settings and usage (chunk count and
//! bytes, objects by size, points per VM) — what `standby store info` shows. `POST /api/v1/store/verify`: re-read
//! and re-hash a point's chunks or the whole store (`standby store verify`); the answer comes
//! when the verification is done.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

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
    /// `chunks` (one object per chunk) or `packs`.
    pub layout: replica_store::Layout,
    /// Bytes per pack object (0 for the `chunks` layout).
    pub pack_size_bytes: u32,
    /// Objects, chunk and pack counts, objects by size: what `standby store info` prints.
    pub usage: replica_store::Usage,
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
    Ok(Json(store_info(&store).await.map_err(|e| unavailable(&e))?))
}

/// The store's settings and usage: the body of `GET /api/v1/store` and of
/// `standby store info --json`. Lists the whole store (see [`replica_store::usage`]).
pub async fn store_info(store: &replica_store::Store) -> replica_store::Result<StoreInfo> {
    let usage = store.usage().await?;
    let points = store.list_points(None).await?;
    let mut vms = BTreeMap::new();
    for p in &points {
        *vms.entry(p.vm.clone()).or_insert(0) += 1;
    }
    let st = store.settings();
    Ok(StoreInfo {
        location: store.backend().describe(),
        store_id: st.store_id.clone(),
        format_version: st.format_version,
        chunk_size_bytes: st.chunk_size,
        compression: format!("{:?}", st.compression).to_lowercase(),
        encrypted: st.encryption.is_some(),
        layout: st.layout,
        pack_size_bytes: st.pack_size,
        chunks: usage.chunks,
        chunk_bytes: usage.chunk_bytes,
        usage,
        points: points.len() as u64,
        vms,
    })
}

/// Body of `POST /api/v1/store/verify` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// `VM/ID`, `ID` or `VM/latest`; none: the whole store.
    pub point: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChunkProblemView {
    pub chunk: String,
    pub reason: String,
    pub points: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BadObject {
    pub key: String,
    pub reason: String,
}

/// The verification's outcome (200 whether or not the store is intact: see `ok`).
#[derive(Debug, Serialize)]
pub struct VerifyView {
    pub ok: bool,
    pub points_checked: usize,
    pub chunks_checked: usize,
    pub bytes_checked: u64,
    pub missing: Vec<ChunkProblemView>,
    pub corrupt: Vec<ChunkProblemView>,
    pub bad_objects: Vec<BadObject>,
    pub broken_points: Vec<String>,
}

fn problems(v: Vec<replica_store::verify::ChunkProblem>) -> Vec<ChunkProblemView> {
    v.into_iter()
        .map(|p| ChunkProblemView {
            chunk: p.id.to_string(),
            reason: p.reason,
            points: p.points,
        })
        .collect()
}

pub async fn verify(
    State(s): State<Arc<ApiState>>,
    body: axum::body::Bytes,
) -> Result<Json<VerifyView>, ApiError> {
    // The body is optional: none means the whole store.
    let req = if body.iter().all(u8::is_ascii_whitespace) {
        VerifyRequest::default()
    } else {
        serde_json::from_slice::<VerifyRequest>(&body)
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?
    };
    let r = crate::site::verify_store(s.dd.root(), req.point.as_deref())
        .await
        .map_err(|e| {
            use crate::site::SiteError::Store;
            use replica_store::Error as E;
            match &e {
                Store(E::PointNotFound { .. }) => ApiError::not_found(e.to_string()),
                Store(E::InvalidArgument(_)) => ApiError::bad_request(e.to_string()),
                _ => ApiError::unavailable(format!("cannot verify the store: {e}")),
            }
        })?;
    Ok(Json(VerifyView {
        ok: r.is_ok(),
        points_checked: r.points_checked,
        chunks_checked: r.chunks_checked,
        bytes_checked: r.bytes_checked,
        missing: problems(r.missing),
        corrupt: problems(r.corrupt),
        bad_objects: r
            .bad_objects
            .into_iter()
            .map(|(key, reason)| BadObject { key, reason })
            .collect(),
        broken_points: r.broken_points,
    }))
}
