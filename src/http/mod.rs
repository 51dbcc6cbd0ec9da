//! HTTP routes: the WebSocket upgrade, health and readiness, and the built-in page.

mod health;
mod page;
mod ws;

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::actors::hub::Hub;
use crate::actors::session::SessionConfig;
use crate::bus::SharedBus;

/// What every request handler may use; one per replica.
pub struct AppState {
    pub hub: Addr<Hub>,
    pub bus: SharedBus,
    pub sessions: Arc<SessionConfig>,
    /// Set on SIGTERM/SIGINT: not ready, no new sessions.
    pub draining: Arc<AtomicBool>,
    pub connections: Arc<AtomicUsize>,
    pub max_connections: usize,
    /// Browser origins allowed to open sessions; empty allows all.
    pub allowed_origins: Vec<String>,
    pub echo_endpoint: bool,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(page::index))
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/ws/{room}", web::get().to(ws::upgrade))
        .route("/echo", web::get().to(ws::echo));
}

/// The JSON error body every endpoint uses: `{"error":{"code","message"}}`.
fn error(status: actix_web::http::StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({"error": {"code": code, "message": message}}))
}
