//! Request handlers, one file per resource. Each turns axum's extractor rejections into the
//! API's JSON error ([`body`], [`path`], [`query`]) and does its database work on the blocking
//! pool.

pub mod attachments;
pub mod disks;
pub mod failover;
pub mod jobs;
pub mod metrics;
pub mod points;
pub mod policy;
pub mod store;
pub mod vms;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Json, Path, Query};

use super::error::{rejection, ApiError};

/// A JSON body, or a 4xx that says what is wrong with it.
pub fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t)
        .map_err(|r| rejection(r.status(), format!("request body: {}", r.body_text())))
}

pub fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(t)| t)
        .map_err(|r| rejection(r.status(), format!("path: {}", r.body_text())))
}

pub fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|r| rejection(r.status(), format!("query: {}", r.body_text())))
}
