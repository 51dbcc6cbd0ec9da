//! WebSocket upgrades, served off actix-http's HTTP/1 dispatcher.
//!
//! actix-http hands every request carrying `Upgrade: websocket` here with the connection's
//! framed stream. Requests for `/ws/{room}` (and `/echo` when enabled) get the checks of
//! `super::ws`; a refusal, or any other path, is answered with its JSON error and the
//! connection closed. An accepted request gets the `101` answer, and then its session owns the
//! bare TCP stream and any bytes the client sent right behind its handshake: the dispatcher's
//! two 8 KiB buffers are dropped, which is most of what an idle connection used to cost.
//!
//! The connection stays counted by actix-server (its per-worker count is the descriptor plan
//! in `startup.rs`) until its session ends, but not by keeping the HTTP/1 dispatcher's task
//! alive, which is sized for a whole HTTP connection (about 2.3 KB, a third of an idle
//! session's memory, docs/PERFORMANCE.md "Round 6"): [`accept`] hands back a signal that the
//! connection's service future waits on once the dispatcher, boxed, is done and freed
//! (startup.rs). The session holds the signal's sender; a connection that never becomes a
//! session drops it with its stream.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_codec::{AsyncRead, AsyncWrite, Framed, ReadBuf};
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_http::error::DispatchError;
use actix_http::h1::{Codec, Message};
use actix_http::header::{self, HeaderValue};
use actix_http::{ConnectionType, HttpMessage, Protocol, Request, Response, StatusCode};
use actix_web::dev::Url;
use actix_web::{web, ResponseError};
use bytes::BytesMut;
use futures_util::SinkExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::admission::Pending;
use super::{ws, AppState};
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

/// A TCP connection as the HTTP service sees it: counted against its address's
/// `limits.handshakes_per_ip` from the accept until it becomes a session or closes.
pub struct Counted {
    stream: TcpStream,
    _pending: Pending,
    /// Dropped when the connection is done: with the stream, or by its session at its end.
    done: Option<oneshot::Sender<()>>,
}

/// What [`accept`] hands the HTTP service, and what tells when the connection is done.
pub type AcceptedConn = (
    (Counted, Protocol, Option<SocketAddr>),
    oneshot::Receiver<()>,
);

/// Takes a new connection, or refuses it (closed at once, nothing read) when its address has
/// `limits.handshakes_per_ip` connections that are not sessions: a client that opens
/// hundreds of sockets and sends its request heads slowly would otherwise hold the HTTP
/// parser's buffers for each until the handshake timeout.
pub fn accept(stream: TcpStream, state: &AppState) -> Result<AcceptedConn, DispatchError> {
    let peer = stream.peer_addr().ok();
    let ip = peer.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let trusted = state.trusted_proxies.iter().any(|c| c.contains(ip));
    let Some(pending) = state.admission.pending(ip, trusted) else {
        state.metrics.refused(crate::metrics::Refusal::Handshakes);
        log::debug!("closing a connection from {ip}: limits.handshakes_per_ip reached");
        return Err(DispatchError::Io(io::ErrorKind::ConnectionRefused.into()));
    };
    // Small frames go out at once: with Nagle's algorithm a frame written right after another
    // waits for the client's delayed ACK (about 40 ms).
    let _ = stream.set_nodelay(true);
    let (done, ended) = oneshot::channel();
    let conn = Counted {
        stream,
        _pending: pending,
        done: Some(done),
    };
    Ok(((conn, Protocol::Http1, peer), ended))
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
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

/// Serves one upgrade request; returns once its session (or echo) runs on the connection,
/// which then holds the connection's `done` signal (see the module doc).
pub async fn serve(
    req: Request,
    mut framed: Framed<Counted, Codec>,
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
    let (stream, read, done) = hand_over(framed);
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
    Ok(())
}

/// The bare stream and the bytes the client sent right behind its handshake (a copy, sized to
/// them). Everything else of the dispatcher's, its two 8 KiB buffers above all, is dropped
/// here, before the session's long wait, and the connection stops counting as pending.
fn hand_over(framed: Framed<Counted, Codec>) -> (TcpStream, BytesMut, oneshot::Sender<()>) {
    let parts = framed.into_parts();
    let read = BytesMut::from(&parts.read_buf[..]);
    let Counted {
        stream, mut done, ..
    } = parts.io;
    // Taken once, here; a connection is upgraded at most once.
    let done = done.take().unwrap_or_else(|| oneshot::channel().0);
    (stream, read, done)
}

/// Which endpoint the request is for, after its checks; else the response to refuse it with.
fn route(req: &Request, state: &AppState) -> Result<Accepted, Response<BoxBody>> {
    let url = Url::new(req.uri().clone());
    let accepted = match ws::endpoint(url.path()) {
        Some(ws::Endpoint::Session(room)) => {
            let query = req.uri().query().unwrap_or_default();
            ws::accept(req.headers(), req.peer_addr(), room, query, state)
                .map(|accepted| Accepted::Session(Box::new(accepted)))
                .map_err(|refusal| refusal.error)
        }
        Some(ws::Endpoint::Echo) if state.echo_endpoint => Ok(Accepted::Echo),
        Some(ws::Endpoint::Echo) => Err(ws::echo_disabled()),
        None => Err(ws::no_endpoint()),
    };
    accepted.map_err(|e| e.error_response().into())
}

/// Whether the client offers confab's subprotocol.
fn offers_subprotocol(req: &Request) -> bool {
    super::offered_protocols(req.headers()).any(|p| p == SUBPROTOCOL)
}

/// Writes a refusal and lets the connection close.
async fn refuse(
    response: Response<BoxBody>,
    framed: &mut Framed<Counted, Codec>,
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
