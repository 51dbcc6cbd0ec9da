//! `GET /ws/{room}`: checks the request before any upgrade (SPEC §3), then starts a session.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::admission::Refused;
use super::{error, AppState};
use crate::actors::echo::Echo;
use crate::actors::session::{Session, SessionRequest};
use crate::auth::{AuthError, Identity};
use crate::domain::{Epoch, Offset, RoomName, UserId, MAX_OFFSET};
use crate::metrics;
use crate::net::{client_addr, Cidr};
use crate::protocol::MAX_HISTORY_LIMIT;

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    token: Option<String>,
    user: Option<String>,
    since: Option<String>,
    epoch: Option<String>,
    history: Option<String>,
}

/// The subprotocol entry a browser puts its token in, beside `confab.v1`.
const TOKEN_PROTOCOL_PREFIX: &str = "token.";

/// A request refused before the upgrade.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    metric: metrics::Refusal,
}

impl Refusal {
    fn new(
        status: StatusCode,
        code: &'static str,
        message: String,
        metric: metrics::Refusal,
    ) -> Self {
        Self {
            status,
            code,
            message,
            metric,
        }
    }

    fn bad(message: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            message,
            metrics::Refusal::BadRequest,
        )
    }

    fn unauthorized(e: &AuthError) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            e.to_string(),
            metrics::Refusal::Unauthorized,
        )
    }

    fn response(&self) -> HttpResponse {
        let mut response = error(self.status, self.code, &self.message);
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<Refused> for Refusal {
    fn from(r: Refused) -> Self {
        match r {
            Refused::TooFast => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many connection attempts from this address; retry in a second".into(),
                metrics::Refusal::TooFast,
            ),
            Refused::PerIp => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this address holds limits.max_connections_per_ip sessions already".into(),
                metrics::Refusal::PerIp,
            ),
            Refused::Full => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "this replica is at its connection limit".into(),
                metrics::Refusal::Cap,
            ),
        }
    }
}

pub async fn upgrade(
    req: HttpRequest,
    room: web::Path<String>,
    query: web::Query<WsQuery>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let (request, client) = match check(&req, &room, &query, &state) {
        Ok(r) => r,
        Err(refusal) => {
            state.metrics.refused(refusal.metric);
            return Ok(refusal.response());
        }
    };
    let slot = match state.admission.admit(client) {
        Ok(slot) => slot,
        Err(refused) => {
            let refusal = Refusal::from(refused);
            if refused == Refused::Full {
                log::warn!(
                    "refusing a session: limits.max_connections ({}) reached",
                    state.admission.max()
                );
            } else {
                log::info!("refusing a session from {client}: {}", refusal.message);
            }
            state.metrics.refused(refusal.metric);
            return Ok(refusal.response());
        }
    };
    let session = Session::new(
        request,
        state.hub.clone(),
        state.bus.clone(),
        state.sessions.clone(),
        Box::new(slot),
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

/// Every check before the upgrade, cheapest first: the upgrade rate comes before the token so
/// a flood costs no signature checks. Returns the session's request and the client address.
fn check(
    req: &HttpRequest,
    room: &str,
    query: &WsQuery,
    state: &AppState,
) -> Result<(SessionRequest, IpAddr), Refusal> {
    let room = RoomName::parse(room).map_err(|e| Refusal::bad(format!("room name {e}")))?;
    if state.draining.load(Ordering::Acquire) {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this replica is shutting down; reconnect to another".into(),
            metrics::Refusal::Draining,
        ));
    }
    // A request without Origin is not from a browser, so there is no page to protect.
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let allowed = state.allowed_origins.is_empty()
            || origin
                .to_str()
                .is_ok_and(|o| state.allowed_origins.iter().any(|a| a == o));
        if !allowed {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this Origin is not allowed".into(),
                metrics::Refusal::Origin,
            ));
        }
    }
    let client = client_address(req, &state.trusted_proxies);
    state
        .admission
        .check_rate(client, Instant::now())
        .map_err(Refusal::from)?;
    let identity = match &state.verifier {
        Some(verifier) => {
            let token =
                token(req, query).ok_or_else(|| Refusal::unauthorized(&AuthError::Missing))?;
            let identity = verifier
                .verify(token)
                .map_err(|e| Refusal::unauthorized(&e))?;
            if !identity.may_join(&room) {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("this token does not allow room `{room}`"),
                    metrics::Refusal::Room,
                ));
            }
            identity
        }
        // Anonymous mode: the client names itself.
        None => Identity::anonymous(match query.user.as_deref() {
            None | Some("") => UserId::guest(),
            Some(name) => UserId::parse(name).map_err(|e| Refusal::bad(format!("user {e}")))?,
        }),
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
    let may_publish = identity.may_publish(&room);
    Ok((
        SessionRequest {
            room,
            identity,
            may_publish,
            resume,
            history,
        },
        client,
    ))
}

/// The token from `Authorization: Bearer`, the `token.<jwt>` subprotocol (what browsers can
/// send) or `?token=`, in that order.
fn token<'r>(req: &'r HttpRequest, query: &'r WsQuery) -> Option<&'r str> {
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let protocol = || {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(TOKEN_PROTOCOL_PREFIX))
    };
    bearer
        .or_else(protocol)
        .or(query.token.as_deref())
        .filter(|t| !t.is_empty())
}

/// The client's address for per-address limits: the peer, or what a trusted proxy forwarded.
fn client_address(req: &HttpRequest, trusted: &[Cidr]) -> IpAddr {
    let peer = req
        .peer_addr()
        .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>();
    client_addr(peer, forwarded.into_iter(), trusted)
}
