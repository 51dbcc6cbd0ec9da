//! The built-in web client: the page, its script, the client module it imports (`confab.js`)
//! and its style, compiled into the binary, and what the page asks before connecting
//! (`/client.json`).

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;

const INDEX: &str = include_str!("../../static/index.html");
const SCRIPT: &str = include_str!("../../static/app.js");
/// The client module the page's script imports, and any web app may (`GET /confab.js`).
const MODULE: &str = include_str!("../../static/confab.js");
const STYLE: &str = include_str!("../../static/app.css");

/// The page's policy: code and style only from the files below (no inline code, so markup a
/// chat message might smuggle into the page could not run), sockets and fetches to this host,
/// no plugins, no forms posting elsewhere, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub async fn index() -> HttpResponse {
    file("text/html; charset=utf-8", INDEX)
}

pub async fn script() -> HttpResponse {
    file("text/javascript; charset=utf-8", SCRIPT)
}

/// A web app on another origin imports the module cross-origin, which browsers fetch in CORS
/// mode: it is public code, so any origin may read it. (Opening sessions from that origin is
/// still `server.allowed_origins`' call.)
pub async fn module() -> HttpResponse {
    let mut response = file("text/javascript; charset=utf-8", MODULE);
    response.headers_mut().insert(
        actix_web::http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
        actix_web::http::header::HeaderValue::from_static("*"),
    );
    response
}

pub async fn style() -> HttpResponse {
    file("text/css; charset=utf-8", STYLE)
}

/// `no-cache` lets browsers keep a copy but check it, so a new version shows after a restart.
fn file(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Content-Security-Policy", CONTENT_SECURITY_POLICY))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Cache-Control", "no-cache"))
        .body(body)
}

/// What the page must know before it connects: whether it needs a token. A browser cannot
/// read the 401 of a failed WebSocket handshake, so it asks here first.
pub async fn client_config(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(json!({"auth": state.verifier.is_some()}))
}
