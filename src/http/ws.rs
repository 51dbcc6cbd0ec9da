//! `GET /ws/{room}`: checks the request before any upgrade (SPEC §3), then starts a session.

use std::sync::atomic::Ordering;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::{error, AppState};
use crate::actors::echo::Echo;
use crate::actors::session::{ConnectionGuard, Session, SessionRequest};
use crate::domain::{Epoch, Offset, RoomName, UserId, MAX_OFFSET};
use crate::metrics;
use crate::protocol::MAX_HISTORY_LIMIT;

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    user: Option<String>,
    since: Option<String>,
    epoch: Option<String>,
    history: Option<String>,
}

/// A request refused before the upgrade.
struct Refusal(StatusCode, &'static str, String);

impl Refusal {
    fn bad(message: String) -> Self {
        Self(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn response(&self) -> HttpResponse {
        error(self.0, self.1, &self.2)
    }
}

pub async fn upgrade(
    req: HttpRequest,
    room: web::Path<String>,
    query: web::Query<WsQuery>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let request = match check(&req, &room, &query, &state) {
        Ok(r) => r,
        Err(refusal) => {
            // `check` refuses for exactly these three reasons, one status each.
            let why = match refusal.0 {
                StatusCode::FORBIDDEN => metrics::Refusal::Origin,
                StatusCode::SERVICE_UNAVAILABLE => metrics::Refusal::Draining,
                _ => metrics::Refusal::BadRequest,
            };
            state.metrics.refused(why);
            return Ok(refusal.response());
        }
    };
    let Some(slot) = ConnectionGuard::acquire(&state.connections, state.max_connections) else {
        state.metrics.refused(metrics::Refusal::Cap);
        log::warn!(
            "refusing a session: limits.max_connections ({}) reached",
            state.max_connections
        );
        return Ok(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this replica is at its connection limit".into(),
        )
        .response());
    };
    let session = Session::new(
        request,
        state.hub.clone(),
        state.bus.clone(),
        state.sessions.clone(),
        slot,
    );
    session.start(&req, payload)
}

/// `GET /echo`, for conformance suites; 404 unless `websocket.echo_endpoint` is on.
pub async fn echo(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    if !state.echo_endpoint {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the echo endpoint is disabled",
        ));
    }
    Echo::start(state.sessions.max_frame_bytes, &req, payload)
}

fn check(
    req: &HttpRequest,
    room: &str,
    query: &WsQuery,
    state: &AppState,
) -> Result<SessionRequest, Refusal> {
    let room = RoomName::parse(room).map_err(|e| Refusal::bad(format!("room name {e}")))?;
    if state.draining.load(Ordering::Acquire) {
        return Err(Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this replica is shutting down; reconnect to another".into(),
        ));
    }
    // A request without Origin is not from a browser, so there is no page to protect.
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let allowed = state.allowed_origins.is_empty()
            || origin
                .to_str()
                .is_ok_and(|o| state.allowed_origins.iter().any(|a| a == o));
        if !allowed {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this Origin is not allowed".into(),
            ));
        }
    }
    let user = match query.user.as_deref() {
        None | Some("") => UserId::guest(),
        Some(name) => UserId::parse(name).map_err(|e| Refusal::bad(format!("user {e}")))?,
    };
    let resume = match (&query.since, &query.epoch) {
        (None, None) => None,
        (Some(since), Some(epoch)) if !epoch.is_empty() => {
            let since: Offset = since
                .parse()
                .ok()
                .filter(|s| *s <= MAX_OFFSET)
                .ok_or_else(|| Refusal::bad(format!("since must be 0 to {MAX_OFFSET}")))?;
            Some((since, Epoch::from_string(epoch)))
        }
        _ => return Err(Refusal::bad("since and epoch go together".into())),
    };
    let history = match &query.history {
        None => 0,
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| Refusal::bad("history must be a whole number".into()))?
            .min(MAX_HISTORY_LIMIT),
    };
    Ok(SessionRequest {
        room,
        user,
        resume,
        history,
    })
}
