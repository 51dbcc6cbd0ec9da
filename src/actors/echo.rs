//! `/echo`: sends every message back as it came. Only served with `websocket.echo_endpoint`;
//! it exists so WebSocket conformance suites (Autobahn), which expect an echo server, can test
//! the very frame handling (`handle_frame`) that chat sessions use.

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;

use super::session::handle_frame;
use crate::wsframe::{Assembler, Inbound};

pub struct Echo {
    frames: Assembler,
}

impl Echo {
    pub fn start(
        max_frame_bytes: usize,
        req: &HttpRequest,
        payload: web::Payload,
    ) -> Result<HttpResponse, actix_web::Error> {
        let echo = Self {
            frames: Assembler::new(max_frame_bytes),
        };
        ws::WsResponseBuilder::new(echo, req, payload)
            .frame_size(max_frame_bytes)
            .start()
    }
}

impl Actor for Echo {
    type Context = ws::WebsocketContext<Self>;
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Echo {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match handle_frame(&mut self.frames, item, ctx, None) {
            Some(Inbound::Text(text)) => ctx.text(text),
            Some(Inbound::Binary(data)) => ctx.binary(data),
            _ => {}
        }
    }
}
