//! The web console: a static page, a stylesheet and one JavaScript module, embedded in the
//! binary (`include_str!`) and served by the API listener at `/console/` (`/` redirects there).
//!
//! Design and invariants:
//! - The assets hold no data and no secret, so they are served without a token; everything the
//!   page shows comes from `/api/v1/...` with the token the operator types (kept in the tab's
//!   `sessionStorage`, sent as `Authorization: Bearer`). The console can do nothing the token
//!   could not do with curl.
//! - Nothing is loaded from elsewhere (no CDN, no fonts, no inline script or style): the
//!   Content-Security-Policy ([`CSP`]) allows only this origin, forbids framing, plugins, forms
//!   posting elsewhere and `<base>`; a unit test checks that the page names no other origin.
//! - Every answer carries its exact content type (`nosniff`), `Cache-Control: no-cache` and a
//!   strong ETag (SHA-256 of the asset), so a browser revalidates (`304`) and never runs a
//!   stale script after an upgrade.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

/// The path the console lives under.
pub const BASE: &str = "/console/";

/// Only this origin; no inline script or style; no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

/// One embedded file.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Every file of the console.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/console/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("assets/index.html"),
    },
    Asset {
        path: "/console/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
    Asset {
        path: "/console/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/style.css"),
    },
];

/// The strong ETag of each asset, in [`ASSETS`] order (computed once).
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let d = Sha256::digest(a.body.as_bytes());
                let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

/// Headers every console answer carries.
fn security_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The answer for asset `i` given the request's headers (`If-None-Match` → 304).
fn serve(i: usize, req: &HeaderMap) -> Response {
    let asset = &ASSETS[i];
    let etag = &etags()[i];
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = res.headers_mut();
    security_headers(h);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    res
}

/// The console's routes, to be merged into the API router outside its token check.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new()
        .route("/", get(|| async { Redirect::to(BASE) }))
        .route("/console", get(|| async { Redirect::to(BASE) }));
    for (i, a) in ASSETS.iter().enumerate() {
        r = r.route(a.path, get(move |h: HeaderMap| async move { serve(i, &h) }));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_loads_only_its_own_assets() {
        let html = ASSETS[0].body;
        for a in &ASSETS[1..] {
            let name = a.path.trim_start_matches(BASE);
            assert!(html.contains(&format!("\"{name}\"")), "index names {name}");
        }
        for a in ASSETS {
            for bad in [
                "http://",
                "https://",
                "//cdn",
                "<style",
                " style=\"",
                "onclick=",
            ] {
                assert!(!a.body.contains(bad), "{} contains {bad:?}", a.path);
            }
        }
        // Inline script would be refused by the CSP: the page has only the module tag.
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script type=\"module\" src=\"app.js\"></script>"));
    }

    #[test]
    fn etag_answers_304_and_headers_are_strict() {
        let none = HeaderMap::new();
        let r = serve(1, &none);
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::CACHE_CONTROL], "no-cache");
        let tag = h[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, tag);
        assert_eq!(serve(1, &again).status(), StatusCode::NOT_MODIFIED);
        let mut other = HeaderMap::new();
        other.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"x\""));
        assert_eq!(serve(1, &other).status(), StatusCode::OK);
        assert_ne!(etags()[0], etags()[1]);
    }
}
