//! The HTTP API for backend services (docs/PROTOCOL.md §15): publish into a room, read its history,
//! see who is present. Every call needs `Authorization: Bearer <api.key>`.
//!
//! A publish takes the same path as a WebSocket message: the same validation, then
//! [`Bus::publish`](crate::bus::Bus::publish), so it gets the room's next offset, is stored
//! before the answer, reaches every member on every replica, and a repeated `ref` (per user
//! and room, as on the WebSocket) resolves to the first offset. Errors are the `error`
//! frame's codes as JSON, plus `unauthorized` (401) and `too_large` (413): see [`HttpError`].

use std::time::Instant;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use subtle::{Choice, ConstantTimeEq};

use super::{AppState, HttpError};
use crate::bus::NewMessage;
use crate::domain::{Epoch, RoomName, UserId};
use crate::protocol::{self, ErrorCode};

/// The user an API message is posted as when the body names none.
pub const DEFAULT_API_USER: &str = "api";

/// The body of `POST /api/rooms/{room}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    text: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(rename = "ref", default)]
    reference: Option<String>,
}

/// The query of `GET /api/rooms/{room}/history`, parsed by hand for clear messages.
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    before: Option<String>,
    limit: Option<String>,
}

/// `POST /api/rooms/{room}/messages` → 201 `{"offset","epoch"}`; 200 with the first offset
/// when the `ref` was seen before (nothing new was created).
pub async fn publish(
    req: HttpRequest,
    room: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, HttpError> {
    authorize(&req, &state)?;
    let room = parse_room(&room)?;
    let limit = state.sessions.max_frame_bytes;
    let body = read_body(&req, payload, limit).await?;
    let body: PublishBody = serde_json::from_slice(&body)
        .map_err(|e| HttpError::BadRequest(format!("invalid JSON body: {e}")))?;
    let user = match body.user.as_deref() {
        None => UserId::parse(DEFAULT_API_USER),
        Some(name) => UserId::parse(name),
    }
    .map_err(|e| HttpError::BadRequest(format!("user {e}")))?;
    protocol::check_message(
        &body.text,
        &body.reference,
        state.sessions.max_message_chars,
    )
    .map_err(|r| match r.code {
        ErrorCode::TooLong => HttpError::TooLong(r.message),
        _ => HttpError::BadRequest(r.message),
    })?;
    let msg = NewMessage {
        user,
        name: None,
        text: body.text,
        reference: body.reference,
    };
    let published = state.bus.publish(&room, msg).await?;
    let status = if published.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(HttpResponse::build(status)
        .json(json!({"offset": published.offset, "epoch": published.epoch})))
}

/// `GET /api/rooms/{room}/history?before=N&limit=50` → `{"room","epoch","messages"}`, oldest
/// first; without `before`, the latest `limit`.
pub async fn history(
    req: HttpRequest,
    room: web::Path<String>,
    query: web::Query<HistoryQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, HttpError> {
    authorize(&req, &state)?;
    let room = parse_room(&room)?;
    // Numbers as text first (a query string has no types), then the checks a `history`
    // frame gets.
    let before = whole_number(&query.before, "before")?;
    let limit = whole_number(&query.limit, "limit")?;
    let limit = protocol::check_page(before, limit).map_err(HttpError::BadRequest)?;
    let page = state.bus.history(&room, before, limit).await?;
    // The stored frames are spliced in as they were stored, as in the `history` frame.
    let messages: Vec<_> = page
        .messages
        .iter()
        .filter_map(|m| protocol::raw_json(&m.json))
        .collect();
    // A struct, not `json!`: `json!` would parse each raw frame back into a `Value`.
    #[derive(serde::Serialize)]
    struct Page<'a> {
        room: &'a RoomName,
        epoch: &'a Epoch,
        messages: Vec<&'a serde_json::value::RawValue>,
    }
    Ok(HttpResponse::Ok().json(Page {
        room: &room,
        epoch: &page.epoch,
        messages,
    }))
}

/// `GET /api/rooms/{room}/presence` → `{"room","users"}`, cluster-wide, sorted.
pub async fn presence(
    req: HttpRequest,
    room: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, HttpError> {
    authorize(&req, &state)?;
    let room = parse_room(&room)?;
    let users = state.bus.presence(&room).await?;
    Ok(HttpResponse::Ok().json(json!({"room": room, "users": users})))
}

/// An optional query parameter that must be a whole number.
fn whole_number<T: std::str::FromStr>(
    value: &Option<String>,
    name: &str,
) -> Result<Option<T>, HttpError> {
    value
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|_| HttpError::BadRequest(format!("{name} must be a whole number")))
}

fn parse_room(room: &str) -> Result<RoomName, HttpError> {
    RoomName::parse(room).map_err(|e| HttpError::BadRequest(format!("room name {e}")))
}

/// Checks the bearer key: 403 when no key is configured (the API is off), 429 while the
/// client's address is throttled for wrong keys (before the key is looked at, so a right
/// guess then tells nothing), 401 when it is missing or wrong. Only a wrong key counts
/// toward the throttle: a missing one guesses nothing.
fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), HttpError> {
    let key = &state.api_key;
    if key.is_empty() {
        return Err(HttpError::ApiDisabled);
    }
    let client = super::client_address(req.headers(), req.peer_addr(), &state.trusted_proxies);
    let now = Instant::now();
    if let Err(wait) = state.key_guesses.check(client, now) {
        // Whole seconds, rounded up: a client retrying at once would find the window open.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let secs = secs.max(1);
        return Err(HttpError::RateLimited {
            retry_after: secs,
            message: format!("too many wrong API keys from this address: retry in {secs} s"),
        });
    }
    match super::bearer(req.headers()) {
        Some(token) if constant_time_eq(token.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => {
            state.key_guesses.failed(client, now);
            log::info!("api: wrong key from {client}");
            Err(unauthorized())
        }
        None => Err(unauthorized()),
    }
}

fn unauthorized() -> HttpError {
    HttpError::Unauthorized(
        "missing or wrong API key (send Authorization: Bearer <api.key>)".to_owned(),
    )
}

/// Compares in constant time (`subtle`), so the time taken does not tell a guesser how many
/// leading bytes were right. subtle answers a length mismatch at once, which would tell the
/// key's length: a key of another length is compared with the key itself instead, so the
/// time depends only on the configured key's length.
fn constant_time_eq(given: &[u8], key: &[u8]) -> bool {
    let same_len = given.len() == key.len();
    let compared = if same_len { given } else { key };
    (compared.ct_eq(key) & Choice::from(u8::from(same_len))).into()
}

/// Reads the body up to `limit` bytes; a larger one is refused without reading it all.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<bytes::BytesMut, HttpError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(HttpError::TooLarge(limit));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| HttpError::BadRequest(format!("cannot read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(HttpError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
        assert!(!constant_time_eq(b"sec", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
