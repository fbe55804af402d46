//! Bearer-token authentication and the read-only / admin split.
//!
//! Every route sits behind [`authenticate`] (401 without a current token); action routes are
//! also behind [`require_admin`] (403 for a read-only token). The gateway's local admin
//! credential ([`super::local`]) is accepted as the admin token `local-cli`. The caller's [`TokenInfo`] is put
//! in the request's extensions for handlers and logs.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::tokens::{Scope, TokenInfo};
use super::ApiState;

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// Refuses a request without a current token.
pub async fn authenticate(
    State(state): State<Arc<ApiState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "this request needs an API token: send `Authorization: Bearer TOKEN` (create one \
             with `standby token create NAME`)",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer TOKEN`"))?
        .to_string();
    if state.local.as_ref().is_some_and(|l| l.matches(&token)) {
        req.extensions_mut().insert(TokenInfo {
            name: super::local::LOCAL_TOKEN_NAME.to_string(),
            scope: Scope::Admin,
            created_ms: 0,
        });
        return Ok(next.run(req).await);
    }
    let found = {
        let state = Arc::clone(&state);
        tokio::task::spawn_blocking(move || state.tokens.verify(&token))
            .await
            .map_err(|e| ApiError::internal(format!("token check failed: {e}")))?
            .map_err(|e| ApiError::internal(e.to_string()))?
    };
    let Some(info) = found else {
        return Err(unauthorized(
            "this API token is not valid (revoked, never created here, or the local credential \
             of a gateway that has since restarted): see `standby token list`",
        ));
    };
    req.extensions_mut().insert(info);
    Ok(next.run(req).await)
}

/// Refuses an action to a read-only token (runs after [`authenticate`]).
pub async fn require_admin(req: Request, next: Next) -> Result<Response, ApiError> {
    match req.extensions().get::<TokenInfo>() {
        Some(t) if t.scope == Scope::Admin => {
            tracing::info!(token = %t.name, method = %req.method(), path = %req.uri().path(), "API action");
            Ok(next.run(req).await)
        }
        Some(t) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} is read-only: actions need a token created without --read-only",
                t.name
            ),
        )),
        None => Err(unauthorized("this request needs an API token")),
    }
}
