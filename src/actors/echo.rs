//! `/echo`: sends every message back as it came. Only served with `websocket.echo_endpoint`;
//! it exists so WebSocket conformance suites (Autobahn), which expect an echo server, can test
//! the very socket and frame handling (`socket::handle_frame`) that chat sessions use.

use actix::prelude::*;
use actix_http::ws::{Frame, ProtocolError};

use super::socket::{self, handle_frame, Upgraded, WsSocket};
use crate::wsframe::{Assembler, Inbound};

/// How long an echo peer may take nothing of a full backlog (sessions use
/// `websocket.client_timeout_secs`); Autobahn's big-message cases read steadily.
const ECHO_STALL: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Echo {
    frames: Assembler,
    socket: WsSocket,
}

impl Echo {
    /// Starts echoing on the socket the upgrade handed over.
    pub fn start(max_frame_bytes: usize, conn: Upgraded) -> Addr<Self> {
        Self::create(move |ctx| Self {
            frames: Assembler::new(max_frame_bytes),
            socket: WsSocket::start(conn, max_frame_bytes, ECHO_STALL, ctx),
        })
    }
}

impl Actor for Echo {
    type Context = Context<Self>;
}

impl StreamHandler<Result<Frame, ProtocolError>> for Echo {
    fn handle(&mut self, item: Result<Frame, ProtocolError>, ctx: &mut Self::Context) {
        match handle_frame(&mut self.frames, &mut self.socket, item, ctx, None) {
            Some(Inbound::Text(text)) => self.socket.text(text, ctx),
            Some(Inbound::Binary(data)) => self.socket.binary(data, ctx),
            _ => {}
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        socket::finished(&self.socket, ctx);
    }
}
