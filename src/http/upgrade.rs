//! WebSocket upgrades, served off actix-http's HTTP/1 dispatcher.
//!
//! actix-http hands every request carrying `Upgrade: websocket` here with the connection's
//! framed stream. Requests for `/ws/{room}` (and `/echo` when enabled) get the checks of
//! `super::ws`; a refusal, or any other path, is answered with its JSON error and the
//! connection closed. An accepted request gets the `101` answer, and then its session owns the
//! bare TCP stream and any bytes the client sent right behind its handshake: the dispatcher's
//! two 8 KiB buffers are dropped, which is most of what an idle connection used to cost.
//!
//! The future returned here lives until the session ends, so actix-server's per-worker
//! connection count (the descriptor plan in `startup.rs`) still counts sessions.

use std::fmt;

use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_http::h1::{Codec, Message};
use actix_http::header::{self, HeaderValue};
use actix_http::{ConnectionType, HttpMessage, Request, Response, StatusCode};
use actix_web::dev::Url;
use actix_web::web;
use bytes::BytesMut;
use futures_util::SinkExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::{error, ws, AppState};
use crate::actors::echo::Echo;
use crate::actors::session::{Session, SUBPROTOCOL};
use crate::actors::socket::Upgraded;

/// The connection broke while the handshake's answer was written.
#[derive(Debug)]
pub struct UpgradeError(std::io::Error);

impl fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "websocket upgrade: {}", self.0)
    }
}

impl From<UpgradeError> for Response<BoxBody> {
    fn from(_: UpgradeError) -> Self {
        Response::new(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// What an upgrade request turned out to be.
enum Accepted {
    Session(
        Box<(
            crate::actors::session::SessionRequest,
            super::admission::Slot,
        )>,
    ),
    Echo,
}

/// Serves one upgrade request; returns when its session has ended.
pub async fn serve(
    req: Request,
    mut framed: Framed<TcpStream, Codec>,
    state: web::Data<AppState>,
) -> Result<(), UpgradeError> {
    // A malformed handshake is refused before the checks: it costs no token check and no
    // session slot.
    let accepted = actix_http::ws::verify_handshake(req.head())
        .map_err(Response::from)
        .and_then(|()| route(&req, &state));
    let accepted = match accepted {
        Ok(accepted) => accepted,
        Err(response) => return refuse(response, &mut framed).await,
    };
    let mut response = actix_http::ws::handshake_response(req.head()).finish();
    if matches!(accepted, Accepted::Session(_)) && offers_subprotocol(&req) {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    drop(req);
    framed
        .send(Message::Item((response.drop_body(), BodySize::None)))
        .await
        .map_err(UpgradeError)?;
    let (stream, read) = hand_over(framed);
    let (done, ended) = oneshot::channel();
    let conn = Upgraded { stream, read, done };
    match accepted {
        Accepted::Session(accepted) => {
            let (request, slot) = *accepted;
            Session::start(
                request,
                state.hub.clone(),
                state.bus.clone(),
                state.sessions.clone(),
                Box::new(slot),
                conn,
            );
        }
        Accepted::Echo => {
            Echo::start(state.sessions.max_frame_bytes, conn);
        }
    }
    drop(state);
    // Resolves (as an error) when the actor, and with it the sender, is gone.
    let _ = ended.await;
    Ok(())
}

/// The bare stream and the bytes the client sent right behind its handshake (a copy, sized to
/// them). Everything else of the dispatcher's, its two 8 KiB buffers above all, is dropped
/// here, before the session's long wait.
fn hand_over(framed: Framed<TcpStream, Codec>) -> (TcpStream, BytesMut) {
    let parts = framed.into_parts();
    let read = BytesMut::from(&parts.read_buf[..]);
    (parts.io, read)
}

/// Which endpoint the request is for, after its checks; else the response to refuse it with.
fn route(req: &Request, state: &AppState) -> Result<Accepted, Response<BoxBody>> {
    let url = Url::new(req.uri().clone());
    let path = url.path();
    if let Some(room) = path.strip_prefix("/ws/").filter(|r| !r.contains('/')) {
        let query = req.uri().query().unwrap_or_default();
        return ws::accept(req.headers(), req.peer_addr(), room, query, state)
            .map(|accepted| Accepted::Session(Box::new(accepted)))
            .map_err(|refusal| refusal.response().into());
    }
    if path == "/echo" {
        return if state.echo_endpoint {
            Ok(Accepted::Echo)
        } else {
            Err(ws::echo_disabled().into())
        };
    }
    Err(error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no WebSocket endpoint at this path",
    )
    .into())
}

/// Whether the client offers confab's subprotocol.
fn offers_subprotocol(req: &Request) -> bool {
    super::offered_protocols(req.headers()).any(|p| p == SUBPROTOCOL)
}

/// Writes a refusal and lets the connection close.
async fn refuse(
    response: Response<BoxBody>,
    framed: &mut Framed<TcpStream, Codec>,
) -> Result<(), UpgradeError> {
    let (mut head, body) = response.into_parts();
    head.head_mut().set_connection_type(ConnectionType::Close);
    let body = body.try_into_bytes().unwrap_or_default();
    // Head and body in one write: a client may read the refusal from its first segment only.
    framed
        .feed(Message::Item((head, BodySize::Sized(body.len() as u64))))
        .await
        .map_err(UpgradeError)?;
    framed
        .feed(Message::Chunk(Some(body)))
        .await
        .map_err(UpgradeError)?;
    framed
        .send(Message::Chunk(None))
        .await
        .map_err(UpgradeError)?;
    Ok(())
}
