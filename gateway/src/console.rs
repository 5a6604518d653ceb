//! The web console and the JS client, served from the binary (compiled in with
//! `include_str!`, so a gateway needs no files beside it and the console always matches the
//! gateway's protocol):
//!
//! - `GET /` redirects to `/console/`;
//! - `GET /console/` (`index.html`), `/console/console.js`, `/console/console.css`: the
//!   console, plain HTML, CSS and an ES module (source in `gateway/console/`);
//! - `GET /syncline.js` and `/syncline.d.ts`: the JS client and its TypeScript types (source
//!   in `gateway/js/`, also packaged for npm).
//!
//! The console reads the JSON views of [`crate::admin`] and follows tables with the JS client
//! over `/v1/ws`; it sends the token typed into it as `Authorization: Bearer` (and as the
//! WebSocket's `auth` frame), so the brokers' ACLs decide what it shows.

use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_str!("../console/index.html"),
    content_type: "text/html; charset=utf-8",
};
const CONSOLE_JS: Asset = Asset {
    body: include_str!("../console/console.js"),
    content_type: "text/javascript; charset=utf-8",
};
const CONSOLE_CSS: Asset = Asset {
    body: include_str!("../console/console.css"),
    content_type: "text/css; charset=utf-8",
};
const CLIENT_JS: Asset = Asset {
    body: include_str!("../js/syncline.js"),
    content_type: "text/javascript; charset=utf-8",
};
const CLIENT_TYPES: Asset = Asset {
    body: include_str!("../js/syncline.d.ts"),
    content_type: "application/typescript; charset=utf-8",
};

fn serve(asset: &'static Asset) -> Response {
    (
        [
            (header::CONTENT_TYPE, asset.content_type),
            // Served from the binary: a gateway upgrade changes them, so revalidate.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        asset.body,
    )
        .into_response()
}

/// The console's and the JS client's routes.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(|| async { serve(&INDEX) }))
        .route("/console/console.js", get(|| async { serve(&CONSOLE_JS) }))
        .route(
            "/console/console.css",
            get(|| async { serve(&CONSOLE_CSS) }),
        )
        .route("/syncline.js", get(|| async { serve(&CLIENT_JS) }))
        .route("/syncline.d.ts", get(|| async { serve(&CLIENT_TYPES) }))
}
