//! The API's routes: one table ([`ROUTES`]) that the router is built from and that the OpenAPI
//! document is checked against (a test compares the two).
//!
//! Reads (GET) need any token; actions (POST) need an admin token. Unknown paths and methods
//! get the API's JSON error, never an empty body.

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post};
use axum::Router;

use super::auth::{authenticate, require_admin};
use super::error::ApiError;
use super::handlers::{attachments, disks, failover, jobs, metrics, points, policy, store, vms};
use super::{openapi, ApiState};

/// Every route: method and path (axum syntax, `{name}` for a parameter).
pub const ROUTES: &[(Method, &str)] = &[
    (Method::GET, "/api/v1/openapi.json"),
    (Method::GET, "/api/v1/disks"),
    (Method::GET, "/api/v1/disks/{name}"),
    (Method::GET, "/api/v1/vms"),
    (Method::POST, "/api/v1/vms"),
    (Method::GET, "/api/v1/vms/{vm}"),
    (Method::POST, "/api/v1/vms/{vm}/unprotect"),
    (Method::POST, "/api/v1/vms/{vm}/resync"),
    (Method::POST, "/api/v1/vms/{vm}/resume"),
    (Method::GET, "/api/v1/jobs"),
    (Method::GET, "/api/v1/jobs/{id}"),
    (Method::GET, "/api/v1/points"),
    (Method::GET, "/api/v1/policy"),
    (Method::POST, "/api/v1/policy"),
    (Method::GET, "/api/v1/attachments"),
    (Method::POST, "/api/v1/attachments"),
    (Method::POST, "/api/v1/attachments/{export}/detach"),
    (Method::POST, "/api/v1/vms/{vm}/failover/test"),
    (Method::POST, "/api/v1/vms/{vm}/failover/cleanup"),
    (Method::POST, "/api/v1/vms/{vm}/failover/prepare"),
    (Method::POST, "/api/v1/vms/{vm}/failover/start"),
    (Method::POST, "/api/v1/vms/{vm}/failover/commit"),
    (Method::GET, "/api/v1/store"),
    (Method::POST, "/api/v1/store/verify"),
    (Method::GET, "/metrics"),
];

async fn no_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_such_route",
        "no such API path: see /api/v1/openapi.json for the endpoints",
    )
}

async fn bad_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not take that method: see /api/v1/openapi.json",
    )
}

/// The whole application.
pub fn router(state: Arc<ApiState>) -> Router {
    let reads = Router::new()
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/api/v1/disks", get(disks::list))
        .route("/api/v1/disks/{name}", get(disks::one))
        .route("/api/v1/vms", get(vms::list))
        .route("/api/v1/vms/{vm}", get(vms::one))
        .route("/api/v1/jobs", get(jobs::list))
        .route("/api/v1/jobs/{id}", get(jobs::one))
        .route("/api/v1/points", get(points::list))
        .route("/api/v1/policy", get(policy::show))
        .route("/api/v1/attachments", get(attachments::list))
        .route("/api/v1/store", get(store::info))
        .route("/metrics", get(metrics::scrape));
    let actions = Router::new()
        .route("/api/v1/vms", post(vms::protect))
        .route("/api/v1/vms/{vm}/unprotect", post(vms::unprotect))
        .route("/api/v1/vms/{vm}/resync", post(vms::resync))
        .route("/api/v1/vms/{vm}/resume", post(vms::resume))
        .route("/api/v1/policy", post(policy::set))
        .route("/api/v1/store/verify", post(store::verify))
        .route("/api/v1/attachments", post(failover::attach))
        .route(
            "/api/v1/attachments/{export}/detach",
            post(failover::detach),
        )
        .route("/api/v1/vms/{vm}/failover/test", post(failover::test))
        .route("/api/v1/vms/{vm}/failover/cleanup", post(failover::cleanup))
        .route("/api/v1/vms/{vm}/failover/prepare", post(failover::prepare))
        .route("/api/v1/vms/{vm}/failover/start", post(failover::failover))
        .route("/api/v1/vms/{vm}/failover/commit", post(failover::commit))
        .route_layer(from_fn(require_admin));
    reads
        .merge(actions)
        .route_layer(from_fn_with_state(Arc::clone(&state), authenticate))
        // The web console's static files (`/`, `/console/...`): no token, they hold no data.
        .merge(crate::console::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(bad_method)
        .with_state(state)
}
