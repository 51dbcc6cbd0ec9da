//! HTTP routes: the WebSocket upgrade, health and readiness, metrics, the HTTP API and the
//! built-in page.

pub mod admission;
pub mod api;
mod error;
pub mod guesses;
mod health;
mod metrics;
mod page;
mod request_metrics;
pub mod upgrade;
mod ws;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use actix::Addr;
use std::net::{IpAddr, SocketAddr};

use actix_web::http::header::{self, HeaderMap};
use actix_web::web;

pub use self::error::HttpError;

use self::admission::Admission;
use self::request_metrics::counted;
use crate::actors::hub::Hub;
use crate::actors::session::SessionConfig;
use crate::auth::Verifier;
use crate::bus::SharedBus;
use crate::metrics::Metrics;
use crate::net::{client_addr, Cidr};

/// What every request handler may use; one per replica.
pub struct AppState {
    pub hub: Addr<Hub>,
    pub bus: SharedBus,
    pub sessions: Arc<SessionConfig>,
    /// Set on SIGTERM/SIGINT: not ready, no new sessions.
    pub draining: Arc<AtomicBool>,
    /// The connection caps, per replica and per client address.
    pub admission: Arc<Admission>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<Cidr>,
    /// `None` in anonymous mode.
    pub verifier: Option<Verifier>,
    /// Browser origins allowed to open sessions; empty allows all.
    pub allowed_origins: Vec<String>,
    pub echo_endpoint: bool,
    /// `api.key`; empty disables the HTTP API.
    pub api_key: String,
    /// Wrong API keys per client address (`api.max_key_failures`).
    pub key_guesses: guesses::KeyGuesses,
    pub metrics: Arc<Metrics>,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(page::index))
        .route("/app.js", web::get().to(page::script))
        .route("/confab.js", web::get().to(page::module))
        .route("/app.css", web::get().to(page::style))
        .route("/client.json", web::get().to(page::client_config))
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(metrics::metrics))
        .route(
            "/api/rooms/{room}/messages",
            counted(web::post().to(api::publish), "publish"),
        )
        .route(
            "/api/rooms/{room}/history",
            counted(web::get().to(api::history), "history"),
        )
        .route(
            "/api/rooms/{room}/presence",
            counted(web::get().to(api::presence), "presence"),
        )
        .route("/ws", web::get().to(ws::not_upgraded))
        .route("/ws/{room}", web::get().to(ws::not_upgraded))
        .route("/echo", web::get().to(ws::not_upgraded));
}

/// The credentials of `Authorization: Bearer …`; the scheme is case-insensitive (RFC 7235
/// §2.1). Used by the HTTP API's key and the WebSocket's token alike.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim())
}

/// The entries a client offered in `Sec-WebSocket-Protocol` (all headers, comma-separated).
fn offered_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The client's address for per-address limits: the peer, or what a trusted proxy forwarded
/// (`net::client_addr`).
fn client_address(headers: &HeaderMap, peer: Option<SocketAddr>, trusted: &[Cidr]) -> IpAddr {
    let peer = peer.map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let forwarded = headers
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>();
    client_addr(peer, forwarded.into_iter(), trusted)
}
