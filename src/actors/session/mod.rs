//! The `Session` actor: one per WebSocket on `/ws/{room}` or `/ws`, a thin shell around a
//! [`SessionCore`] (docs/design.md, "The session core").
//!
//! The session runs on its own socket after the upgrade ([`super::socket`]), not on
//! actix-http's HTTP/1 dispatcher, so an idle connection costs a few hundred bytes of buffers
//! rather than 16 KiB.
//!
//! The core holds the chat protocol: what a client frame means, which room a delivery is
//! for, what is held until a welcome, runs of messages, answers in send order. The shell
//! feeds it the socket's text frames, the inbox's deliveries, the bus's answers and the
//! heartbeat, and carries out its [`Effect`]s: writes, bus calls, joining and leaving rooms
//! through the hub, the close. One future ([`Pump`]) drives everything that is not a socket
//! frame: the run of messages read together, the publishes' answers, the history read, and
//! the inbox, whose deliveries are written in a tight loop with no allocation per frame.

mod core;

pub use self::core::{Delivery, Effect, PathRoom, RoomSlots, SessionCore, MAX_PUBLISHES_IN_FLIGHT};

use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use actix_http::ws::{Frame, ProtocolError};
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;

use super::hub::{AskPresence, Connect, Disconnect, Hub, Register, Unregister};
use super::member::{InboxReader, QueueLimits, CONNECTION};
use super::room::Join;
use super::socket::{self, fail, handle_frame, Upgraded, WsSocket};
use crate::auth::{Identity, LEEWAY};
use crate::bus::{BusFuture, HistoryPage, Published, SharedBus};
use crate::close::Close;
use crate::domain::{Epoch, Offset, RoomName};
use crate::http::admission::Quotas;
use crate::logctx;
use crate::metrics::Metrics;
use crate::wsframe::{Assembler, Inbound};

/// The subprotocol confab speaks; echoed when the client offers it.
pub const SUBPROTOCOL: &str = "confab.v1";

/// Longest timer set for an expiry; a token valid for longer outlives any process anyway.
const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Settings every session of a replica shares.
#[derive(Debug)]
pub struct SessionConfig {
    pub node: Arc<str>,
    pub max_frame_bytes: usize,
    pub max_message_chars: usize,
    pub messages_per_sec: u32,
    pub burst: u32,
    pub max_violations: u32,
    pub session_queue: usize,
    pub session_queue_bytes: usize,
    pub ping_interval: Duration,
    pub client_timeout: Duration,
    /// `limits.rooms_per_connection`.
    pub rooms_per_connection: usize,
    pub metrics: Arc<Metrics>,
}

impl SessionConfig {
    /// The `limits.*` and `websocket.*` settings a session reads; the node id and the
    /// metrics are not settings (the node id may come from the host name), so this is a
    /// constructor rather than `From<&Settings>`.
    pub fn new(
        settings: &crate::settings::Settings,
        node: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let limits = &settings.limits;
        Self {
            node,
            max_frame_bytes: limits.max_frame_bytes,
            max_message_chars: limits.max_message_chars,
            messages_per_sec: limits.messages_per_sec,
            burst: limits.burst,
            max_violations: limits.max_violations,
            session_queue: limits.session_queue,
            session_queue_bytes: limits.session_queue_bytes,
            ping_interval: settings.websocket.ping_interval_secs,
            client_timeout: settings.websocket.client_timeout_secs,
            rooms_per_connection: limits.rooms_per_connection,
            metrics,
        }
    }
}

/// What the upgrade request asked for.
pub struct SessionRequest {
    /// The room in the path (`/ws/{room}`); `None` on `/ws`, where the client subscribes.
    pub room: Option<RoomName>,
    /// Who the token (or, in anonymous mode, the query) says the client is.
    pub identity: Identity,
    /// Whether the token's `publish` globs allow the path room.
    pub may_publish: bool,
    pub resume: Option<(Offset, Epoch)>,
    pub history: usize,
    /// Message budgets shared with the other sessions of this address and user.
    pub quotas: Quotas,
}

pub struct Session {
    core: SessionCore,
    hub: Addr<Hub>,
    bus: SharedBus,
    cfg: Arc<SessionConfig>,
    /// When the token expires; the session is closed with 4001 then.
    expires: Option<SystemTime>,
    frames: Assembler,
    /// What the rooms send this session, drained by [`Pump`].
    inbox: InboxReader,
    /// Answers to the publishes in flight, in the order they were sent (one queue: a wake-up
    /// polls only the publishes that made progress, not every one in flight).
    answers: FuturesOrdered<BusFuture<Published>>,
    /// The history read in flight (one per connection, see [`SessionCore`]).
    history: Option<BusFuture<HistoryPage>>,
    /// Wakes [`Pump`] when a run of messages began or a bus call was made outside it.
    pump: Option<Waker>,
    /// Registered with the hub, for the drain (see [`Register`] and [`Session::register`]).
    registered: bool,
    socket: WsSocket,
}

impl Session {
    /// Starts the session on the socket the upgrade handed over; `slots` is its admission
    /// slot, which counts its rooms against `limits.rooms_per_ip` and is released with it.
    pub fn start(
        request: SessionRequest,
        hub: Addr<Hub>,
        bus: SharedBus,
        cfg: Arc<SessionConfig>,
        slots: Box<dyn RoomSlots>,
        conn: Upgraded,
    ) -> Addr<Self> {
        Self::create(move |ctx| {
            let socket = WsSocket::start(conn, cfg.max_frame_bytes, cfg.client_timeout, ctx);
            let expires = request.identity.expires;
            let path = request.room.map(|room| PathRoom {
                room,
                may_publish: request.may_publish,
                resume: request.resume,
                history: request.history,
            });
            let core = SessionCore::new(
                Arc::clone(&cfg),
                rand::random(),
                request.identity,
                path,
                request.quotas,
                slots,
                Instant::now(),
            );
            let inbox = InboxReader::new(QueueLimits {
                frames: cfg.session_queue,
                bytes: cfg.session_queue_bytes,
            });
            // A path room starts alone: its own close ends the connection, as ever on
            // `/ws/{room}`.
            inbox.set_alone(core.path_tag().unwrap_or(CONNECTION));
            Self {
                core,
                hub,
                bus,
                expires,
                frames: Assembler::new(cfg.max_frame_bytes),
                inbox,
                answers: FuturesOrdered::new(),
                history: None,
                pump: None,
                registered: false,
                cfg,
                socket,
            }
        })
    }

    fn about(&self) -> logctx::About<'_> {
        self.core.about()
    }

    /// Carries out what the core asked for, in order.
    fn carry_out(&mut self, ctx: &mut Context<Self>) {
        let mut wake = false;
        while let Some(effect) = self.core.next_effect() {
            match effect {
                Effect::Write(frame) => self.socket.text(frame, ctx),
                Effect::Publish { room, messages } => {
                    // The bus call is made (and sent) now, in send order; only the answers wait.
                    self.answers.extend(self.bus.publish_run(&room, messages));
                    wake = true;
                }
                Effect::History {
                    room,
                    before,
                    limit,
                } => {
                    self.history = Some(self.bus.history(&room, before, limit));
                    wake = true;
                }
                Effect::Subscribe {
                    tag,
                    member,
                    room,
                    resume,
                    history,
                } => {
                    self.hub.do_send(Connect {
                        room,
                        join: Join {
                            session: member,
                            user: self.core.user().clone(),
                            member: self.inbox.handle(tag),
                            resume,
                            history,
                        },
                    });
                }
                Effect::Unsubscribe { room, member, tag } => {
                    self.inbox.forget(tag);
                    self.hub.do_send(Disconnect {
                        room,
                        session: member,
                    })
                }
                Effect::AskPresence { room, member } => self.hub.do_send(AskPresence {
                    room,
                    session: member,
                }),
                Effect::Typing { room } => {
                    let typing = self.bus.typing(&room, self.core.user());
                    ctx.spawn(async move { drop(typing.await) }.into_actor(self));
                }
                Effect::Ping => self.socket.ping(b"", ctx),
                Effect::RoomsApart(apart) => {
                    let alone = self.core.path_tag().filter(|_| !apart);
                    self.inbox.set_alone(alone.unwrap_or(CONNECTION));
                }
                Effect::Close(why) => fail(&mut self.socket, why),
            }
        }
        self.socket.set_reading(self.core.wants_input());
        if !self.registered && self.core.path_room().is_none() {
            self.register();
        }
        // A run begun by any input (a frame, or requests held for a welcome that just went
        // out) is sent by [`Pump`] once the frames read with it are handled.
        if wake || self.core.has_run() {
            if let Some(pump) = &self.pump {
                pump.wake_by_ref();
            }
        }
    }

    /// Registers the connection with the hub for the drain once it has no path room: on
    /// `/ws` from the start, on `/ws/{room}` once its path room is left (it may stay in no
    /// room at all, and must still get its 1001).
    fn register(&mut self) {
        self.registered = true;
        self.hub.do_send(Register {
            session: self.core.id(),
            member: self.inbox.handle(CONNECTION),
        });
    }

    fn on_frame(&mut self, item: Result<Frame, ProtocolError>, ctx: &mut Context<Self>) {
        let now = Instant::now();
        self.core.heard(now);
        let metrics = Some(&*self.cfg.metrics);
        match handle_frame(&mut self.frames, &mut self.socket, item, ctx, metrics) {
            Some(Inbound::Text(text)) => {
                self.core.text(text, now);
                self.carry_out(ctx);
            }
            Some(_) => {
                self.cfg.metrics.bad_frame(Close::Binary.code());
                self.core.closed_by_shell();
                fail(&mut self.socket, Close::Binary)
            }
            None => {}
        }
        if self.socket.closing() {
            self.core.closed_by_shell();
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.cfg.metrics.sessions_open.inc();
        if let Some(expires) = self.expires {
            // Closed at expiry plus the leeway the token check allowed; a client that wants
            // to stay renews its token and reconnects with `since`.
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .saturating_add(LEEWAY)
                .min(MAX_TIMER);
            ctx.run_later(left, |session, ctx| {
                session.core.expired();
                session.carry_out(ctx);
            });
        }
        let tick = self.cfg.ping_interval.min(self.cfg.client_timeout / 2);
        ctx.run_interval(tick, |session, ctx| {
            session.core.tick(Instant::now());
            session.carry_out(ctx);
            session.inbox.trim();
        });
        log::info!("{} connected", self.about());
        self.socket.interrupt_with(self.inbox.interrupter());
        ctx.spawn(Pump);
        self.carry_out(ctx);
    }

    fn stopping(&mut self, ctx: &mut Self::Context) -> Running {
        // Messages read and not yet stored still are; nobody is left to take their acks.
        self.core.finish(Instant::now());
        self.answers = FuturesOrdered::new();
        // Its rooms are left now: that must not register it for a drain it no longer needs.
        let registered = std::mem::replace(&mut self.registered, true);
        self.carry_out(ctx);
        if registered {
            self.hub.do_send(Unregister {
                session: self.core.id(),
            });
        }
        self.cfg.metrics.sessions_open.dec();
        log::info!("{} disconnected", self.about());
        Running::Stop
    }
}

impl StreamHandler<Result<Frame, ProtocolError>> for Session {
    fn handle(&mut self, item: Result<Frame, ProtocolError>, ctx: &mut Self::Context) {
        self.on_frame(item, ctx);
        if ctx.waiting() {
            // Writing an answer filled the socket: actix polls nothing but the wait until
            // the client reads, [`Pump`] included, and the messages read must not wait on it.
            self.core.end_of_batch();
            self.carry_out(ctx);
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        socket::finished(&self.socket, ctx);
    }
}

/// Drives the session for its life, after each batch of socket frames: sends the run of
/// messages they brought, writes the answers that came back and the history page, and
/// writes what the rooms put in the inbox. Pauses while the socket is backpressured (the
/// socket's `ctx.wait`), so the rooms' counts stay the backlog; actix polls it again once
/// the wait is over. It must stop only there or when everything it polls is pending (each
/// then holds its waker).
///
/// Not a future spawned per run: a spawn makes actix poll the stream again before
/// yielding, so a client sending fast kept its session reading with nothing else on its
/// thread running (its own backlog then reached the room at once and closed it with 4008).
struct Pump;

impl ActorFuture<Session> for Pump {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        session: &mut Session,
        ctx: &mut Context<Session>,
        task: &mut std::task::Context<'_>,
    ) -> Poll<()> {
        if !session
            .pump
            .as_ref()
            .is_some_and(|w| w.will_wake(task.waker()))
        {
            session.pump = Some(task.waker().clone());
        }
        session.core.end_of_batch();
        session.carry_out(ctx);
        while let Poll::Ready(Some(answer)) = session.answers.poll_next_unpin(task) {
            session.core.published(answer, Instant::now());
            session.carry_out(ctx);
            if ctx.waiting() {
                return Poll::Pending;
            }
        }
        if let Some(read) = session.history.as_mut() {
            if let Poll::Ready(page) = read.poll_unpin(task) {
                session.history = None;
                session.core.history_read(page, Instant::now());
                session.carry_out(ctx);
            }
        }
        if ctx.waiting() {
            return Poll::Pending;
        }
        let now = Instant::now();
        while let Some((tag, out)) = session.inbox.next(task.waker()) {
            match session.core.deliver(tag, out, now) {
                Some(Delivery::Text(frame)) => session.socket.text(frame, ctx),
                Some(Delivery::Encoded(run)) => session.socket.encoded(run.as_bytes(), ctx),
                None => session.carry_out(ctx),
            }
            if ctx.waiting() {
                session.inbox.settle_now();
                break;
            }
        }
        Poll::Pending
    }
}
