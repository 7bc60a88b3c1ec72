//! The operator console: one page and its assets, embedded in the binary at compile time (no
//! CDN, no build step), served under `/messenger/console` with a strict Content-Security-Policy.
//! The page reads the same public API an operator could script: stats, events (WebSocket),
//! messages, retry, the toggle and the run history.

use poem::http::StatusCode;
use poem::web::Path;
use poem::{handler, IntoResponse, Response};

/// Only our own scripts, styles and connections; no frames, no inline code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX: &str = include_str!("../../console/index.html");

/// The files of the console besides the page: name, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../console/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../../console/favicon.svg"),
    ),
];

fn secured(body: &'static str, content_type: &str, cache: &str) -> Response {
    Response::builder()
        .content_type(content_type)
        .header("Content-Security-Policy", CSP)
        .header("X-Content-Type-Options", "nosniff")
        .header("Referrer-Policy", "no-referrer")
        .header("Cache-Control", cache)
        .body(body)
}

/// `GET /messenger/console`: the page (always revalidated, so a new binary's page is seen).
#[handler]
pub fn page() -> Response {
    secured(INDEX, "text/html; charset=utf-8", "no-cache")
}

/// `GET /messenger/console/:file`: an embedded asset (cached for an hour).
#[handler]
pub fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => secured(body, content_type, "public, max-age=3600"),
        None => herald_core::ApiError::new(herald_core::ErrorCode::RouteNotFound, "No such console file.")
            .as_response_owned()
            .into_response()
            .with_status(StatusCode::NOT_FOUND)
            .into_response(),
    }
}
