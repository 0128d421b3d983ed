//! The web client's files, embedded in the binary and served at `/ui/`: one page, its
//! scripts and its style sheet. The page is a client of the public REST API and its live stream
//! only (no route of its own reads the store), so what a browser may do is exactly what its
//! token may do through the API.
//!
//! Every response carries a strict Content-Security-Policy (no inline script or style, nothing
//! from another origin), so text that came from a VM or a peer cannot run as code in an
//! operator's browser even if it reached the page as markup. Assets are versioned by a hash of
//! their contents: the page names `app.js?v=<hash>`, and each answer carries the hash as ETag.

use std::sync::{Arc, OnceLock};

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::app::App;

const INDEX: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const CHARTS_JS: &str = include_str!("../web/charts.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// The policy every web client response carries.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The first 16 hex digits of the sha256 of the files.
fn version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let mut h = Sha256::new();
        for f in [INDEX, APP_JS, CHARTS_JS, APP_CSS] {
            h.update(f.as_bytes());
            h.update([0]);
        }
        h.finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

fn index_html() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| INDEX.replace("__VERSION__", version()))
}

/// The web client's routes (outside the API's prefix; no token: the page asks for one).
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|req: Request| async move { asset(req.headers(), index_html(), "text/html; charset=utf-8") }))
        .route("/ui/app.js", get(|req: Request| async move { asset(req.headers(), APP_JS, "text/javascript; charset=utf-8") }))
        .route("/ui/charts.js", get(|req: Request| async move { asset(req.headers(), CHARTS_JS, "text/javascript; charset=utf-8") }))
        .route("/ui/app.css", get(|req: Request| async move { asset(req.headers(), APP_CSS, "text/css; charset=utf-8") }))
}

fn asset(req: &HeaderMap, body: &'static str, content_type: &'static str) -> Response {
    let etag = format!("\"{}\"", version());
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Revalidated each time (a 304 costs nothing): a new center is seen at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_its_assets_by_version_and_runs_no_inline_code() {
        let page = index_html();
        assert!(!page.contains("__VERSION__"));
        assert!(page.contains(&format!("app.js?v={}", version())));
        assert!(page.contains(&format!("app.css?v={}", version())));
        assert!(page.contains(&format!("charts.js?v={}", version())));
        // The policy forbids inline code; the page must not depend on any.
        let lower = page.to_ascii_lowercase();
        assert!(!lower.contains("<script>"), "an inline script");
        assert!(!lower.contains(" style="), "an inline style");
        assert!(!lower.contains(" onclick="), "an inline handler");
        assert!(
            !lower.contains("http://") && !lower.contains("https://"),
            "a foreign origin"
        );
    }
}
