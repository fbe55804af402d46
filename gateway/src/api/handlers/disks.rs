//! `GET /api/v1/disks`, `GET /api/v1/disks/{name}`: the data directory's disks (the fields
//! of `standby disk list --json`).

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::catalog::DiskRecord;
use crate::replication::{Db, DbError};

/// A disk as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskView {
    pub name: String,
    pub id: String,
    pub image: String,
    /// None when the image is missing.
    pub size_bytes: Option<u64>,
    pub read_only: bool,
    /// A change log is kept.
    pub tracked: bool,
    /// created, imported or config.
    pub origin: String,
    /// Served as an NBD export by this gateway.
    pub served: bool,
    /// The protected VM the disk belongs to.
    pub vm: Option<String>,
}

fn view(state: &ApiState, db: &Db, rec: DiskRecord) -> Result<DiskView, ApiError> {
    let served = state.exports.get(&rec.name).is_some();
    Ok(disk_view(db, rec, served)?)
}

/// A disk as the API shows it (`served`: whether the running gateway serves it). Also what
/// `standby disk list --json` prints when no gateway runs (nothing served then).
pub fn disk_view(db: &Db, rec: DiskRecord, served: bool) -> Result<DiskView, DbError> {
    let vm = db
        .vms()?
        .into_iter()
        .find(|v| v.disks.contains(&rec.name))
        .map(|v| v.name);
    Ok(DiskView {
        size_bytes: std::fs::metadata(&rec.image).ok().map(|m| m.len()),
        image: rec.image.display().to_string(),
        served,
        origin: format!("{:?}", rec.origin).to_lowercase(),
        read_only: rec.read_only,
        tracked: rec.tracked,
        id: rec.id,
        name: rec.name,
        vm,
    })
}

pub async fn list(State(s): State<Arc<ApiState>>) -> Result<Json<Vec<DiskView>>, ApiError> {
    s.blocking(|s, db| {
        s.dd.disks()?
            .into_values()
            .map(|rec| view(s, db, rec))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map(Json)
}

pub async fn one(
    State(s): State<Arc<ApiState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<DiskView>, ApiError> {
    let name = super::path(name)?;
    s.blocking(move |s, db| view(s, db, s.dd.disk(&name)?))
        .await
        .map(Json)
}
