use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;

const INDEX: &str = include_str!("../../static/index.html");

/// The built-in chat page. The policy allows only the page's own inline code and sockets to
/// this host, so nothing a chat message contains can load or run anything.
pub async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; form-action 'none'",
        ))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .body(INDEX)
}

/// What the page must know before it connects: whether it needs a token. A browser cannot
/// read the 401 of a failed WebSocket handshake, so it asks here first.
pub async fn client_config(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(json!({"auth": state.verifier.is_some()}))
}
