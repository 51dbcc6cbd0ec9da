//! `GET /ws/{room}` and `GET /ws`: checks the request before any upgrade (docs/PROTOCOL.md §3).
//! On `/ws` the client subscribes with frames; `since`, `epoch` and `history` need a room, so
//! there they are refused with `400` naming the parameter (they go in the `subscribe` frame). Upgrades
//! themselves are served by [`super::upgrade`], off the HTTP/1 dispatcher; the routes here answer
//! requests to the same paths that ask for no upgrade, with the same checks and then the handshake
//! error.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Instant;

use actix_web::http::header::{self, HeaderMap};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::admission::{Refused, Slot};
use super::{AppState, HttpError};
use crate::actors::session::SessionRequest;
use crate::auth::{AuthError, Identity};
use crate::domain::{Epoch, Offset, RoomName, UserId, MAX_OFFSET};
use crate::metrics;
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

/// A request refused before the upgrade: the answer, and the `reason` it is counted under in
/// `confab_upgrade_refusals_total`.
pub struct Refusal {
    pub error: HttpError,
    metric: metrics::Refusal,
}

impl Refusal {
    fn new(error: HttpError, metric: metrics::Refusal) -> Self {
        Self { error, metric }
    }

    fn bad(message: String) -> Self {
        Self::new(HttpError::BadRequest(message), metrics::Refusal::BadRequest)
    }

    fn unauthorized(e: &AuthError) -> Self {
        Self::new(
            HttpError::Unauthorized(e.to_string()),
            metrics::Refusal::Unauthorized,
        )
    }

    /// A `429` the client may retry in a second.
    fn rate_limited(message: &str, metric: metrics::Refusal) -> Self {
        Self::new(
            HttpError::RateLimited {
                retry_after: 1,
                message: message.to_owned(),
            },
            metric,
        )
    }
}

impl From<Refused> for Refusal {
    fn from(r: Refused) -> Self {
        match r {
            Refused::TooFast => Self::rate_limited(
                "too many connection attempts from this address; retry in a second",
                metrics::Refusal::TooFast,
            ),
            Refused::PerIp => Self::rate_limited(
                "this address holds limits.max_connections_per_ip sessions already",
                metrics::Refusal::PerIp,
            ),
            Refused::Full => Self::new(
                HttpError::Unavailable("this replica is at its connection limit".into()),
                metrics::Refusal::Cap,
            ),
            Refused::Rooms => Self::rate_limited(
                "this address's sessions are in limits.rooms_per_ip rooms already",
                metrics::Refusal::Rooms,
            ),
        }
    }
}

/// A WebSocket endpoint, as a request's path names it.
#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint<'p> {
    /// `/ws/{room}`: a chat session in this room (not yet checked as a room name), or `/ws`
    /// (`None`): a chat session that subscribes to rooms with frames.
    Session(Option<&'p str>),
    /// `/echo`: the conformance echo, when `websocket.echo_endpoint` is on.
    Echo,
}

/// The one parser of WebSocket paths, for the upgrade path (`super::upgrade`) and the routes
/// that answer the same paths without an upgrade. `path` is the request's path as actix
/// requotes it (`actix_web::dev::Url`), the one its router matches.
pub fn endpoint(path: &str) -> Option<Endpoint<'_>> {
    if let Some(room) = path.strip_prefix("/ws/").filter(|r| !r.contains('/')) {
        return Some(Endpoint::Session(Some(room)));
    }
    if path == "/ws" {
        return Some(Endpoint::Session(None));
    }
    (path == "/echo").then_some(Endpoint::Echo)
}

/// `GET /ws/{room}` and `GET /echo` without `Upgrade: websocket`: refused as the upgrade
/// would be, else answered with the handshake error.
pub async fn not_upgraded(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, HttpError> {
    match endpoint(req.match_info().as_str()) {
        Some(Endpoint::Session(room)) => {
            // The same answers as an upgrade would get, but no session slot: none will be used.
            validate(
                req.headers(),
                req.peer_addr(),
                room,
                req.query_string(),
                &state,
            )
            .map_err(|refusal| refusal.error)?;
        }
        Some(Endpoint::Echo) if state.echo_endpoint => {}
        Some(Endpoint::Echo) => return Err(echo_disabled()),
        None => return Err(no_endpoint()),
    }
    Err(match actix_http::ws::verify_handshake(req.head()) {
        Err(e) => HttpError::Handshake(e),
        Ok(()) => HttpError::BadRequest("this request was not upgraded".into()),
    })
}

/// The answer to `/echo` without `websocket.echo_endpoint`.
pub fn echo_disabled() -> HttpError {
    HttpError::NotFound("the echo endpoint is disabled")
}

/// The answer to an upgrade of a path [`endpoint`] does not know.
pub fn no_endpoint() -> HttpError {
    HttpError::NotFound("no WebSocket endpoint at this path")
}

/// Every check of a session request on `/ws/{room}`: the request and the client's address,
/// or the refusal to answer with (counted in the metrics).
fn validate(
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    room: Option<&str>,
    query: &str,
    state: &AppState,
) -> Result<(SessionRequest, IpAddr), Refusal> {
    web::Query::<WsQuery>::from_query(query)
        .map_err(|e| Refusal::bad(format!("bad query string: {e}")))
        .and_then(|query| check(headers, peer, room, &query, state))
        .inspect_err(|refusal| state.metrics.refused(refusal.metric))
}

/// [`validate`], then a slot under the connection caps: the session to start, or the refusal
/// to answer with (counted in the metrics).
pub fn accept(
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    room: Option<&str>,
    query: &str,
    state: &AppState,
) -> Result<(SessionRequest, Slot), Refusal> {
    let (mut request, client) = validate(headers, peer, room, query, state)?;
    // Only a token's user is known to be one person; anonymous clients name themselves.
    let user = state.verifier.as_ref().map(|_| &request.identity.user);
    match state.admission.admit(client, request.room.as_ref(), user) {
        Ok(slot) => {
            request.quotas = slot.quotas();
            Ok((request, slot))
        }
        Err(refused) => {
            let refusal = Refusal::from(refused);
            if refused != Refused::Full {
                // Per refusal, so at debug: a flood must not flood the log too.
                log::debug!("refusing a session from {client}: {}", refusal.error);
            } else if state.admission.warn_full() {
                log::warn!(
                    "refusing sessions: limits.max_connections ({}) reached",
                    state.admission.max()
                );
            }
            state.metrics.refused(refusal.metric);
            Err(refusal)
        }
    }
}

/// Every check before the upgrade, cheapest first: the upgrade rate comes before the token so
/// a flood costs no signature checks. Returns the session's request and the client address.
fn check(
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    room: Option<&str>,
    query: &WsQuery,
    state: &AppState,
) -> Result<(SessionRequest, IpAddr), Refusal> {
    let room = room
        .map(|room| RoomName::parse(room).map_err(|e| Refusal::bad(format!("room name {e}"))))
        .transpose()?;
    if room.is_none() {
        // They are about a room: on `/ws` they go in each `subscribe` frame.
        let about_a_room = [
            ("since", &query.since),
            ("epoch", &query.epoch),
            ("history", &query.history),
        ];
        if let Some((name, _)) = about_a_room.iter().find(|(_, v)| v.is_some()) {
            return Err(Refusal::bad(format!(
                "{name} needs a room: on /ws it goes in the subscribe frame"
            )));
        }
    }
    if state.draining.load(Ordering::Acquire) {
        return Err(Refusal::new(
            HttpError::Unavailable("this replica is shutting down; reconnect to another".into()),
            metrics::Refusal::Draining,
        ));
    }
    // A request without Origin is not from a browser, so there is no page to protect.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = state.allowed_origins.is_empty()
            || origin
                .to_str()
                .is_ok_and(|o| state.allowed_origins.iter().any(|a| a == o));
        if !allowed {
            return Err(Refusal::new(
                HttpError::Forbidden("this Origin is not allowed".into()),
                metrics::Refusal::Origin,
            ));
        }
    }
    let client = super::client_address(headers, peer, &state.trusted_proxies);
    state
        .admission
        .check_rate(client, Instant::now())
        .map_err(Refusal::from)?;
    let identity = match &state.verifier {
        Some(verifier) => {
            let token =
                token(headers, query).ok_or_else(|| Refusal::unauthorized(&AuthError::Missing))?;
            let identity = verifier
                .verify(token)
                .map_err(|e| Refusal::unauthorized(&e))?;
            if room.as_ref().is_some_and(|room| !identity.may_join(room)) {
                return Err(Refusal::new(
                    HttpError::Forbidden(format!(
                        "this token does not allow room `{}`",
                        room.as_ref().map_or("", |r| r.as_str())
                    )),
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
    let may_publish = room.as_ref().is_some_and(|room| identity.may_publish(room));
    Ok((
        SessionRequest {
            room,
            identity,
            may_publish,
            resume,
            history,
            quotas: Default::default(),
        },
        client,
    ))
}

/// The token from `Authorization: Bearer`, the `token.<jwt>` subprotocol (what browsers can
/// send) or `?token=`, in that order.
fn token<'r>(headers: &'r HeaderMap, query: &'r WsQuery) -> Option<&'r str> {
    let protocol =
        || super::offered_protocols(headers).find_map(|p| p.strip_prefix(TOKEN_PROTOCOL_PREFIX));
    super::bearer(headers)
        .or_else(protocol)
        .or(query.token.as_deref())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_names_a_session_room_the_echo_or_nothing() {
        assert_eq!(
            endpoint("/ws/lobby"),
            Some(Endpoint::Session(Some("lobby")))
        );
        // An empty room is the room check's to refuse (400), not a missing endpoint.
        assert_eq!(endpoint("/ws/"), Some(Endpoint::Session(Some(""))));
        assert_eq!(endpoint("/ws"), Some(Endpoint::Session(None)));
        assert_eq!(endpoint("/echo"), Some(Endpoint::Echo));
        assert_eq!(endpoint("/ws/a/b"), None);
        assert_eq!(endpoint("/echo/"), None);
        assert_eq!(endpoint("/"), None);
    }
}
