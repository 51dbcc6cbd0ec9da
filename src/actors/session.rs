//! The `Session` actor: one per WebSocket on `/ws/{room}`.
//!
//! The session runs on its own socket after the upgrade ([`super::socket`]), not on
//! actix-http's HTTP/1 dispatcher, so an idle connection costs a few hundred bytes of buffers
//! rather than 16 KiB.
//!
//! A session turns client frames into requests (parsing in [`crate::protocol`], reassembly in
//! [`crate::wsframe`]), publishes through the bus, and writes what its room delivers. Nothing is
//! written before the welcome, and frames the client sends before it are held and handled right
//! after it (docs/PROTOCOL.md §4): a message sent at once on connecting is then published after the
//! room read its head for the welcome, so it comes back to its sender like any other.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use actix_http::ws::{Frame, ProtocolError};
use bytestring::ByteString;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{FuturesOrdered, StreamExt};

use super::hub::{AskPresence, Connect, Disconnect, Hub};
use super::member::{InboxReader, Outbound, QueueLimits};
use super::room::Join;
use super::socket::{self, fail, handle_frame, Upgraded, WsSocket};
use crate::auth::{Identity, LEEWAY};
use crate::bus::{BusError, NewMessage, SharedBus, StoredMessage};
use crate::close::Close;
use crate::domain::{Epoch, Offset, RoomName, SessionId, UserId};
use crate::http::admission::Quotas;
use crate::logctx;
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode, Request, ServerFrame};
use crate::ratelimit::TokenBucket;
use crate::wsframe::{Assembler, Inbound};

/// The subprotocol confab speaks; echoed when the client offers it.
pub const SUBPROTOCOL: &str = "confab.v1";

/// Writes the answers to a session's publishes as they come back, in send order. Spawned
/// while publishes are in flight (`until_below: None`, done when none is left), or waited on
/// when a session has too many in flight (done once fewer than the cap are).
struct Answers {
    until_below: Option<usize>,
}

impl ActorFuture<Session> for Answers {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        session: &mut Session,
        ctx: &mut Context<Session>,
        task: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::task::Poll;
        loop {
            if self
                .until_below
                .is_some_and(|max| session.answers.len() < max)
            {
                return Poll::Ready(());
            }
            match session.answers.poll_next_unpin(task) {
                Poll::Ready(Some(frame)) => session.socket.text(frame, ctx),
                Poll::Ready(None) => {
                    if self.until_below.is_none() {
                        session.answering = false;
                    }
                    return Poll::Ready(());
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Longest timer set for an expiry; a token valid for longer outlives any process anyway.
const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Publishes one session may have waiting on the bus. At the cap the session stops reading
/// its socket until one completes, so a fast client is slowed by TCP backpressure instead of
/// queueing work without bound.
const MAX_PUBLISHES_IN_FLIGHT: usize = 256;

/// Most messages handed to the bus in one run (one script call on Redis).
const MAX_RUN: usize = 64;

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
            metrics,
        }
    }
}

/// What the upgrade request asked for.
pub struct SessionRequest {
    pub room: RoomName,
    /// Who the token (or, in anonymous mode, the query) says the client is.
    pub identity: Identity,
    /// Whether the token's `publish` globs allow this room.
    pub may_publish: bool,
    pub resume: Option<(Offset, Epoch)>,
    pub history: usize,
    /// Message budgets shared with the other sessions of this address and user.
    pub quotas: Quotas,
}

pub struct Session {
    id: SessionId,
    label: String,
    room: RoomName,
    user: UserId,
    /// Display name from the token, shown with this session's messages.
    name: Option<Arc<str>>,
    may_publish: bool,
    /// When the token expires; the session is closed with 4001 then.
    expires: Option<SystemTime>,
    resume: Option<(Offset, Epoch)>,
    history: usize,
    hub: Addr<Hub>,
    bus: SharedBus,
    cfg: Arc<SessionConfig>,
    frames: Assembler,
    bucket: TokenBucket,
    quotas: Quotas,
    violations: u32,
    last_heard: Instant,
    /// Client text frames not handled yet: those that arrived before the welcome, and after
    /// it those behind a read that holds the session (a history request among frames sent
    /// before the welcome: each read waits for the one before, in order).
    held: Vec<ByteString>,
    /// Bytes in `held` before the welcome, bounded by `limits.session_queue_bytes`.
    held_bytes: usize,
    /// The welcome went out: held frames are handled ([`Session::handle_held`]).
    welcomed: bool,
    /// What the room sends this session, drained by [`Deliveries`].
    inbox: InboxReader,
    /// Answers (ack or error) to the publishes in flight, in the order they were sent, so
    /// acks arrive in send order too. One queue driven by one future ([`Answers`]): a wake-up
    /// of this actor polls only the publishes that made progress, not every one in flight.
    answers: FuturesOrdered<BoxFuture<'static, ByteString>>,
    /// An [`Answers`] future is spawned and drives `answers`.
    answering: bool,
    /// Messages read but not yet handed to the bus: those of one read go as one run
    /// ([`Session::send_run`]).
    run: Vec<NewMessage>,
    /// Wakes [`Deliveries`], which sends the run, when a run begins.
    run_waker: Option<std::task::Waker>,
    socket: WsSocket,
    /// The admission slot (connection caps); released when the session ends.
    _slot: Box<dyn Send>,
}

impl Session {
    /// Starts the session on the socket the upgrade handed over.
    pub fn start(
        request: SessionRequest,
        hub: Addr<Hub>,
        bus: SharedBus,
        cfg: Arc<SessionConfig>,
        slot: Box<dyn Send>,
        conn: Upgraded,
    ) -> Addr<Self> {
        Self::create(move |ctx| {
            let socket = WsSocket::start(conn, cfg.max_frame_bytes, cfg.client_timeout, ctx);
            let id: SessionId = rand::random();
            let now = Instant::now();
            Self {
                id,
                label: format!("{}-{id:016x}", cfg.node),
                room: request.room,
                user: request.identity.user,
                name: request.identity.name,
                may_publish: request.may_publish,
                expires: request.identity.expires,
                resume: request.resume,
                history: request.history,
                hub,
                bus,
                frames: Assembler::new(cfg.max_frame_bytes),
                bucket: TokenBucket::new(cfg.messages_per_sec, cfg.burst, now),
                quotas: request.quotas,
                violations: 0,
                last_heard: now,
                held: Vec::new(),
                held_bytes: 0,
                welcomed: false,
                inbox: InboxReader::new(),
                answers: FuturesOrdered::new(),
                answering: false,
                run: Vec::new(),
                run_waker: None,
                cfg,
                socket,
                _slot: slot,
            }
        })
    }

    /// Who this session's log lines are about: `session=… room=… user=…`.
    fn about(&self) -> logctx::About<'_> {
        logctx::session(&self.label)
            .room(&self.room)
            .user(&self.user)
    }

    /// Fails the session for what the client sent, counted with the bad frames by close code.
    fn fail_for_frames(&mut self, why: Close) {
        self.cfg.metrics.bad_frame(why.code());
        fail(&mut self.socket, why)
    }

    /// A complete text frame from the client: held until the welcome, then handled.
    fn on_text(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        if self.welcomed {
            if self.held.is_empty() {
                return self.handle_text(&text, ctx);
            }
            // Behind held frames, handled in turn: [`Deliveries`] runs right after this.
            return self.held.push(text);
        }
        // Bounded like the outbound queue, in frames and in bytes: a client has no reason to
        // send more than a few frames before the welcome, which comes within one bus round
        // trip.
        if self.held.len() >= self.cfg.session_queue
            || self.held_bytes + text.len() > self.cfg.session_queue_bytes
        {
            return self.fail_for_frames(Close::TooEarly);
        }
        self.held_bytes += text.len();
        self.held.push(text);
    }

    /// Handles held frames in order until one starts a read that holds the session (a
    /// history request, see [`Session::history`]); the rest go on once it is answered.
    fn handle_held(&mut self, ctx: &mut Context<Self>) {
        let held = std::mem::take(&mut self.held);
        let mut frames = held.into_iter();
        for text in frames.by_ref() {
            self.handle_text(&text, ctx);
            if ctx.waiting() {
                break;
            }
        }
        self.held = frames.collect();
    }

    /// Handles a frame after the welcome, so every reply (ack, error, pong…) follows it.
    fn handle_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let request = match protocol::parse_request(text, self.cfg.max_message_chars) {
            Ok(r) => r,
            Err(rejection) => {
                // A refused frame costs a token like a message (docs/PROTOCOL.md §11): a client
                // that only sends garbage is closed with 1008 like one that floods with messages.
                if !self.bucket.try_take(Instant::now()) {
                    return self.rate_limited(rejection.reference.as_deref(), ctx);
                }
                log::debug!(
                    "{} bad frame: {}",
                    logctx::session(&self.label),
                    rejection.message
                );
                self.cfg.metrics.rejected(rejection.code);
                let frame = protocol::rejection_frame(&rejection, Some(&self.room));
                return self.socket.text(frame, ctx);
            }
        };
        // Typing takes its token below, where it is dropped silently instead. A message also
        // spends from its address's and user's budgets, shared with their other sessions.
        let now = Instant::now();
        let allowed = match request {
            Request::Typing => true,
            Request::Message { .. } => self.bucket.try_take(now) && self.quotas.try_take(now),
            _ => self.bucket.try_take(now),
        };
        if !allowed {
            let reference = match &request {
                Request::Message { reference, .. } | Request::History { reference, .. } => {
                    reference.as_deref()
                }
                _ => None,
            };
            return self.rate_limited(reference, ctx);
        }
        if !matches!(request, Request::Message { .. }) {
            // Messages read before this request reach the bus before it does (a typing
            // signal lands after them on the channel), as they did when each went at once.
            self.send_run(ctx);
        }
        match request {
            Request::Ping => self.socket.text(ServerFrame::Pong.to_text(), ctx),
            Request::Typing => {
                // Typing is droppable: over the limit it is skipped without a word.
                if self.bucket.try_take(Instant::now()) {
                    let typing = self.bus.typing(&self.room, &self.user);
                    ctx.spawn(async move { drop(typing.await) }.into_actor(self));
                }
            }
            Request::Message { text, reference } => self.publish(text, reference, ctx),
            Request::Presence => self.presence(ctx),
            Request::History {
                before,
                limit,
                reference,
            } => self.history(before, limit, reference, ctx),
        }
    }

    fn rate_limited(&mut self, reference: Option<&str>, ctx: &mut Context<Self>) {
        self.cfg.metrics.rate_limited.inc();
        self.violations += 1;
        if self.violations > self.cfg.max_violations {
            log::info!(
                "{} closed for flooding",
                logctx::session(&self.label).room(&self.room)
            );
            return self.fail_for_frames(Close::Flooding);
        }
        let frame = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down: rate limit exceeded",
            reference,
            room: Some(&self.room),
        }
        .to_text();
        self.socket.text(frame, ctx);
    }

    fn publish(&mut self, text: String, reference: Option<String>, ctx: &mut Context<Self>) {
        if !self.may_publish {
            // Answered in turn with the acks of earlier messages, and never stored.
            self.cfg.metrics.rejected(ErrorCode::Forbidden);
            let frame = ServerFrame::Error {
                code: ErrorCode::Forbidden,
                message: "your token does not allow posting in this room",
                reference: reference.as_deref(),
                room: Some(&self.room),
            }
            .to_text();
            return self.answer(vec![futures_util::future::ready(frame).boxed()], ctx);
        }
        self.run.push(NewMessage {
            user: self.user.clone(),
            name: self.name.clone(),
            text,
            reference,
        });
        if self.run.len() == 1 {
            // [`Deliveries`] sends it once the frames read with it are handled.
            if let Some(waker) = &self.run_waker {
                waker.wake_by_ref();
            }
        }
        if self.run.len() >= MAX_RUN
            || self.answers.len() + self.run.len() >= MAX_PUBLISHES_IN_FLIGHT
        {
            self.send_run(ctx);
        }
    }

    /// Hands the messages read so far to the bus as one run (one script call on Redis), in
    /// the order the client sent them; their acks come back in that order too.
    fn send_run(&mut self, ctx: &mut Context<Self>) {
        if self.run.is_empty() {
            return;
        }
        let run = std::mem::take(&mut self.run);
        let references: Vec<Option<String>> = run.iter().map(|m| m.reference.clone()).collect();
        // The bus call is made (and sent) now, in send order; only the answers wait.
        let calls = self.bus.publish_run(&self.room, run);
        let answers = calls
            .into_iter()
            .zip(references)
            .map(|(call, reference)| {
                let room = self.room.clone();
                async move {
                    match call.await {
                        Ok(p) => ServerFrame::Ack {
                            reference: reference.as_deref(),
                            room: &room,
                            offset: p.offset,
                        }
                        .to_text(),
                        Err(e) => bus_error_frame(&e, reference.as_deref(), &room),
                    }
                }
                .boxed()
            })
            .collect();
        self.answer(answers, ctx);
    }

    /// Queues answers behind those in flight, and makes sure they are written as they come.
    fn answer(&mut self, answers: Vec<BoxFuture<'static, ByteString>>, ctx: &mut Context<Self>) {
        self.answers.extend(answers);
        if self.answers.len() >= MAX_PUBLISHES_IN_FLIGHT {
            // `wait` holds back every other event of this actor, the socket included, until
            // answers came back below the cap.
            ctx.wait(Answers {
                until_below: Some(MAX_PUBLISHES_IN_FLIGHT),
            });
        } else if !self.answering {
            self.answering = true;
            ctx.spawn(Answers { until_below: None });
        }
    }

    /// Answered by the room, through this session's inbox: the room knows which joins and leaves
    /// this client was told, so the list and those frames stay one set (docs/PROTOCOL.md §12).
    fn presence(&mut self, _: &mut Context<Self>) {
        self.hub.do_send(AskPresence {
            room: self.room.clone(),
            session: self.id,
        });
    }

    fn history(
        &mut self,
        before: Option<Offset>,
        limit: usize,
        reference: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let page = self.bus.history(&self.room, before, limit);
        // The read holds the session until its reply is written, so each session has at most
        // one in flight: a client that asks for twenty pages and reads none holds one reply's
        // bytes, not twenty (the socket then holds the actor until the client takes it).
        // Deliveries wait meanwhile, one bus round trip.
        ctx.wait(page.into_actor(self).map(move |result, session, ctx| {
            let frame = match result {
                Ok(page) => ServerFrame::History {
                    reference: reference.as_deref(),
                    room: &session.room,
                    epoch: &page.epoch,
                    messages: newest_within(&page.messages, session.cfg.session_queue_bytes / 2)
                        .iter()
                        .filter_map(|m| protocol::raw_json(&m.json))
                        .collect(),
                }
                .to_text(),
                Err(e) => bus_error_frame(&e, reference.as_deref(), &session.room),
            };
            session.socket.text(frame, ctx);
        }));
    }

    fn welcome(
        &mut self,
        epoch: Epoch,
        offset: Offset,
        recovered: Option<bool>,
        ctx: &mut Context<Self>,
    ) {
        let frame = ServerFrame::Welcome {
            room: &self.room,
            user: &self.user,
            session: &self.label,
            node: &self.cfg.node,
            epoch: &epoch,
            offset,
            recovered,
        }
        .to_text();
        self.socket.text(frame, ctx);
        self.welcomed = true;
        self.held_bytes = 0;
        self.handle_held(ctx);
    }
}

/// The newest messages of a page (oldest first) whose stored bytes fit `budget`, at least
/// one: a page of padded messages is shortened from its old end, and the client pages on
/// with `before` = the oldest offset it got, as it does anyway.
fn newest_within(messages: &[StoredMessage], budget: usize) -> &[StoredMessage] {
    let mut bytes = 0;
    let kept = messages
        .iter()
        .rev()
        .take_while(|m| {
            bytes += m.json.len();
            bytes <= budget
        })
        .count()
        .max(1)
        .min(messages.len());
    &messages[messages.len() - kept..]
}

fn bus_error_frame(e: &BusError, reference: Option<&str>, room: &RoomName) -> ByteString {
    let code = match e {
        BusError::Unavailable(_) => ErrorCode::Unavailable,
        BusError::Internal(_) => ErrorCode::Internal,
    };
    ServerFrame::Error {
        code,
        message: &e.to_string(),
        reference,
        room: Some(room),
    }
    .to_text()
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
            ctx.run_later(left, |session, _| {
                log::info!("{} token expired", session.about());
                fail(&mut session.socket, Close::TokenExpired)
            });
        }
        let tick = self.cfg.ping_interval.min(self.cfg.client_timeout / 2);
        ctx.run_interval(tick, |session, ctx| {
            if session.last_heard.elapsed() > session.cfg.client_timeout {
                log::info!("{} timed out", session.about());
                return fail(&mut session.socket, Close::NoPong);
            }
            session.socket.ping(b"", ctx);
            session.inbox.trim();
        });
        log::info!("{} connected", self.about());
        let limits = QueueLimits {
            frames: self.cfg.session_queue,
            bytes: self.cfg.session_queue_bytes,
        };
        let member = self.inbox.handle(limits);
        self.socket.interrupt_with(self.inbox.interrupter());
        ctx.spawn(Deliveries);
        self.hub.do_send(Connect {
            room: self.room.clone(),
            join: Join {
                session: self.id,
                user: self.user.clone(),
                member,
                resume: self.resume.take(),
                history: self.history,
            },
        });
    }

    fn stopping(&mut self, ctx: &mut Self::Context) -> Running {
        // Frames read before a welcome that never came (`echo hi | websocat`: the line, then
        // the close) are handled now like any others: what the server read is stored. Their
        // answers go nowhere, the socket is closing.
        for text in std::mem::take(&mut self.held) {
            self.handle_text(&text, ctx);
        }
        // Messages read just before the end (a send, then a close) are still stored, as
        // they would have been sent one by one; nobody is left to take their acks.
        if !self.run.is_empty() {
            drop(
                self.bus
                    .publish_run(&self.room, std::mem::take(&mut self.run)),
            );
        }
        self.cfg.metrics.sessions_open.dec();
        self.hub.do_send(Disconnect {
            room: self.room.clone(),
            session: self.id,
        });
        log::info!("{} disconnected", self.about());
        Running::Stop
    }
}

impl StreamHandler<Result<Frame, ProtocolError>> for Session {
    fn handle(&mut self, item: Result<Frame, ProtocolError>, ctx: &mut Self::Context) {
        self.on_frame(item, ctx);
        if ctx.waiting() {
            // Writing an answer filled the socket: actix polls nothing but the wait until
            // the client reads, [`Deliveries`] included, and the messages read must not wait
            // on it.
            self.send_run(ctx);
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        socket::finished(&self.socket, ctx);
    }
}

impl Session {
    fn on_frame(&mut self, item: Result<Frame, ProtocolError>, ctx: &mut Context<Self>) {
        self.last_heard = Instant::now();
        let metrics = Some(&*self.cfg.metrics);
        match handle_frame(&mut self.frames, &mut self.socket, item, ctx, metrics) {
            Some(Inbound::Text(text)) => self.on_text(text, ctx),
            Some(_) => self.fail_for_frames(Close::Binary),
            None => {}
        }
    }
}

/// Writes what the room puts in the session's inbox, for the life of the session. Pauses
/// while the socket is backpressured (the socket's `ctx.wait`), so the room's counts stay the
/// backlog; actix polls it again once the wait is over. It must stop only there or at an
/// empty inbox (which keeps its waker): a pause for any other reason, a per-poll cap say,
/// needs a wake-up of its own or the session hangs.
///
/// It first sends the messages read so far as one run ([`Session::send_run`]): actix polls an
/// actor's futures after its socket's stream has handled the frames at hand (16 at a time,
/// sometimes a few rounds), so a run holds what one read brought, and [`Session::publish`]
/// wakes it for a run that began after it was polled. Not a future spawned per run: a spawn
/// makes actix poll the stream again before yielding, so a client sending fast kept its
/// session reading with nothing else on its thread running (its own backlog then reached the
/// room at once and closed it with 4008).
struct Deliveries;

impl ActorFuture<Session> for Deliveries {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        session: &mut Session,
        ctx: &mut Context<Session>,
        task: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if session.welcomed && !session.held.is_empty() {
            // Frames held behind a read that has been answered since.
            session.handle_held(ctx);
            if ctx.waiting() {
                return std::task::Poll::Pending;
            }
        }
        session.send_run(ctx);
        if !session
            .run_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(task.waker()))
        {
            session.run_waker = Some(task.waker().clone());
        }
        if ctx.waiting() {
            // The run filled the in-flight cap: nothing more until answers came back.
            return std::task::Poll::Pending;
        }
        while let Some(out) = session.inbox.next(task.waker()) {
            session.deliver(out, ctx);
            if ctx.waiting() {
                session.inbox.settle_now();
                break;
            }
        }
        std::task::Poll::Pending
    }
}

impl Session {
    fn deliver(&mut self, out: Outbound, ctx: &mut Context<Self>) {
        match out {
            Outbound::Welcome {
                epoch,
                offset,
                recovered,
            } => self.welcome(epoch, offset, recovered, ctx),
            Outbound::Frame(text) => self.socket.text(text, ctx),
            Outbound::Close(why) => fail(&mut self.socket, why),
        }
    }
}
