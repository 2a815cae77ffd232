//! The terminal page: `GET /ui/sandboxes/{id}/terminal` and its assets under `/ui/assets/`,
//! embedded in the binary (xterm.js from the npm registry, vendored by `ui/vendor.sh`; no CDN).
//! The page holds no data and no credential: it reads the sandbox id from its path and the
//! credential from its URL fragment, and opens `WS /sandboxes/{id}/pty` itself.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::error::Error;

const PAGE: &str = include_str!("../../ui/terminal.html");
/// The page's own policy: its scripts, its WebSocket, nothing else; never framed. xterm.js
/// styles its rows with `<style>` elements it creates, hence inline styles (never scripts).
const PAGE_POLICY: &str =
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                           connect-src 'self'; img-src 'self' data:; font-src 'self'; \
                           base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `(name, media type, bytes)` of every asset.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "terminal.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/terminal.js"),
    ),
    (
        "terminal.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/terminal.css"),
    ),
    (
        "xterm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/vendor/xterm.css"),
    ),
    (
        "addon-fit.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/addon-fit.js"),
    ),
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ui/sandboxes/{id}/terminal", get(page))
        .route("/ui/assets/{name}", get(asset))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
        .into_response()
}

async fn asset(Path(name): Path<String>) -> Result<Response, Error> {
    let Some((_, media, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return Err(Error::RouteNotFound(format!("GET /ui/assets/{name}")));
    };
    Ok((
        [
            (header::CONTENT_TYPE, *media),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        *bytes,
    )
        .into_response())
}
