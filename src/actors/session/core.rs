//! `SessionCore`: the chat protocol of one connection as a plain state machine, with no actix
//! and no I/O (docs/design.md, "The session core"). The session actor ([`super::Session`])
//! feeds it what happens (a client text frame, a room's delivery, a bus answer, a timer tick)
//! and carries out the [`Effect`]s it asks for, in order.
//!
//! What it owns: parsing and the rate limit (one token bucket and one violation count per
//! connection), the subscription table (rooms this connection is in, each with its tag, its
//! `publish` permission and its welcome state), frames held until their room's welcome,
//! runs of messages (one room at a time, so each room's send order is its offset order), the
//! answers to publishes in send order, the cap on publishes in flight, and the one history
//! read in flight per connection.
//!
//! Holding: on `/ws/{room}` nothing is handled before the path room's welcome (docs/PROTOCOL.md
//! §5: a message sent at once on connecting comes back after the welcome). A frame naming a
//! room subscribed to but not yet welcomed is held in that subscription and handled right
//! after its welcome. While a history read is on the bus or the publishes in flight reach the
//! cap, frames wait in order (the shell stops reading the socket meanwhile, see
//! [`SessionCore::wants_input`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytestring::ByteString;

use super::SessionConfig;
use crate::actors::member::{Encoded, Outbound, CONNECTION};
use crate::auth::Identity;
use crate::bus::{BusError, HistoryPage, NewMessage, Published, StoredMessage};
use crate::close::Close;
use crate::domain::{Epoch, Offset, RoomName, SessionId, UserId};
use crate::http::admission::Quotas;
use crate::logctx;
use crate::protocol::{self, ErrorCode, Request, ServerFrame};
use crate::ratelimit::TokenBucket;

/// Publishes one session may have waiting on the bus. At the cap the session stops reading
/// its socket until one completes, so a fast client is slowed by TCP backpressure instead of
/// queueing work without bound.
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 256;

/// Most messages handed to the bus in one run (one script call on Redis).
pub const MAX_RUN: usize = 64;

/// What the shell does for the core, in the order given.
#[derive(Debug)]
pub enum Effect {
    /// Write this text frame to the client.
    Write(ByteString),
    /// Hand these messages to the bus as one run; answer each with
    /// [`SessionCore::published`], in this order.
    Publish {
        room: RoomName,
        messages: Vec<NewMessage>,
    },
    /// Read a history page; answer with [`SessionCore::history_read`].
    History {
        room: RoomName,
        before: Option<Offset>,
        limit: usize,
    },
    /// Attach subscription `tag` to its room as member `member` (the hub's `Connect`).
    Subscribe {
        tag: u32,
        member: SessionId,
        room: RoomName,
        resume: Option<(Offset, Epoch)>,
        history: usize,
    },
    /// Detach member `member` from its room (the hub's `Disconnect`).
    Unsubscribe {
        room: RoomName,
        member: SessionId,
        /// The subscription's tag, whose replay hook the inbox drops.
        tag: u32,
    },
    /// Ask the room for its presence, answered through the inbox.
    AskPresence { room: RoomName, member: SessionId },
    /// Send a typing signal to the room.
    Typing { room: RoomName },
    /// Send a WebSocket ping.
    Ping,
    /// Whether a room's own close (a gap) ends only its subscription (see
    /// `InboxReader::set_rooms_apart`).
    RoomsApart(bool),
    /// Close the connection; nothing is written after it.
    Close(Close),
}

/// Admission's per-address room count, asked on every `subscribe` (`limits.rooms_per_ip`).
pub trait RoomSlots: Send {
    /// Counts `room` for this connection's address; false when the address is in
    /// `limits.rooms_per_ip` other rooms already.
    fn enter(&mut self, room: &RoomName) -> bool;
    /// Forgets one count of `room`.
    fn leave(&mut self, room: &RoomName);
}

/// The room a connection's path named (`/ws/{room}`), as the upgrade checked it.
#[derive(Debug)]
pub struct PathRoom {
    pub room: RoomName,
    /// Whether the token's `publish` globs allow it.
    pub may_publish: bool,
    /// `since` and `epoch` from the query.
    pub resume: Option<(Offset, Epoch)>,
    /// `history=N` from the query, capped.
    pub history: usize,
}

/// One room this connection is in. Small: a connection may hold a hundred.
#[derive(Debug)]
struct Sub {
    tag: u32,
    member: SessionId,
    room: RoomName,
    may_publish: bool,
    welcomed: bool,
    /// The `ref` of the `subscribe`, until its welcome carries it.
    reference: Option<Box<str>>,
    /// Requests naming this room read before its welcome; empty (unallocated) after it.
    held: Vec<Request>,
}

/// Work not done yet, in the order the client sent it.
#[derive(Debug)]
enum Work {
    Text(ByteString),
    /// A request held for its room's welcome, released behind a read that holds the session.
    Request(Request),
}

/// An answer to a publish (or a refusal answered in turn with them), in send order.
#[derive(Debug)]
enum Answer {
    Pending {
        room: RoomName,
        reference: Option<String>,
    },
    Ready(ByteString),
    /// A room's `unsubscribed`: a new subscription of the room attaches only once it is
    /// written, so its welcome cannot overtake it.
    Unsubscribed {
        room: RoomName,
        frame: ByteString,
    },
}

/// What a delivery gives the socket to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// One text frame's payload.
    Text(ByteString),
    /// A run of frames the room encoded once for all its members.
    Encoded(Encoded),
}

pub struct SessionCore {
    cfg: Arc<SessionConfig>,
    id: SessionId,
    label: Arc<str>,
    identity: Identity,
    quotas: Quotas,
    slots: Box<dyn RoomSlots>,
    bucket: TokenBucket,
    /// `subscribe` and `unsubscribe` spend from a budget of their own, a burst of
    /// `limits.rooms_per_connection` (or `limits.burst` if larger) refilled at
    /// `limits.messages_per_sec`: a page opening
    /// the rooms of a link (or resuming all of them after a reconnect) must not be refused,
    /// nor use up the messages' burst, while churning through rooms is still bounded.
    room_bucket: TokenBucket,
    violations: u32,
    last_heard: Instant,
    subs: Vec<Sub>,
    /// The subscription of the room in the path (`/ws/{room}`), while it lasts.
    path: Option<u32>,
    /// The path room's name, for log lines (kept after it is left).
    path_name: Option<RoomName>,
    next_tag: u32,
    /// Frames not handled yet (see the module doc).
    waiting: VecDeque<Work>,
    /// Bytes in `waiting` before the path room's welcome, bounded by
    /// `limits.session_queue_bytes`.
    early_bytes: usize,
    /// Frames held in subscriptions and what they weigh ([`weight`]), bounded like the queue
    /// in frames and bytes: a client may subscribe and send megabytes before a slow welcome.
    held: usize,
    held_bytes: usize,
    /// Messages read but not yet handed to the bus, all for `run_room`.
    run: Vec<NewMessage>,
    run_room: Option<RoomName>,
    answers: VecDeque<Answer>,
    /// `Answer::Pending` entries in `answers`.
    in_flight: usize,
    /// Subscriptions not attached yet (see [`Answer::Unsubscribed`]); almost always empty.
    deferred: Vec<subscriptions::Deferred>,
    /// The history read on the bus: its room and `ref`.
    reading: Option<(RoomName, Option<String>)>,
    /// A close went out: nothing more is written.
    closed: bool,
    /// The connection is ending: writes go nowhere, held messages are still stored.
    finishing: bool,
    effects: VecDeque<Effect>,
}

impl SessionCore {
    /// A session for `identity`, in `path` from the start when the URL named a room (its
    /// [`Effect::Subscribe`] is queued at once).
    pub fn new(
        cfg: Arc<SessionConfig>,
        id: SessionId,
        identity: Identity,
        path: Option<PathRoom>,
        quotas: Quotas,
        slots: Box<dyn RoomSlots>,
        now: Instant,
    ) -> Self {
        let mut core = Self {
            label: Arc::from(format!("{}-{id:016x}", cfg.node)),
            bucket: TokenBucket::new(cfg.messages_per_sec, cfg.burst, now),
            room_bucket: TokenBucket::new(
                cfg.messages_per_sec,
                u32::try_from(cfg.rooms_per_connection)
                    .unwrap_or(u32::MAX)
                    .max(cfg.burst),
                now,
            ),
            cfg,
            id,
            identity,
            quotas,
            slots,
            violations: 0,
            last_heard: now,
            subs: Vec::new(),
            path: None,
            path_name: None,
            next_tag: CONNECTION + 1,
            waiting: VecDeque::new(),
            early_bytes: 0,
            held: 0,
            held_bytes: 0,
            run: Vec::new(),
            run_room: None,
            answers: VecDeque::new(),
            in_flight: 0,
            deferred: Vec::new(),
            reading: None,
            closed: false,
            finishing: false,
            effects: VecDeque::new(),
        };
        match path {
            Some(path) => {
                core.path_name = Some(path.room.clone());
                let tag = core.add(path.room, path.may_publish, None, path.resume, path.history);
                core.path = Some(tag);
            }
            None => core.effects.push_back(Effect::RoomsApart(true)),
        }
        core
    }

    /// `{node}-{id}`: the `session` of every welcome, and the log's name for it.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// Who this session's log lines are about: `session=… room=… user=…` (the room when the
    /// path named one).
    pub fn about(&self) -> logctx::About<'_> {
        let about = logctx::session(&self.label);
        match &self.path_name {
            Some(room) => about.room(room),
            None => about,
        }
        .user(&self.identity.user)
    }

    pub fn user(&self) -> &UserId {
        &self.identity.user
    }

    /// The next effect to carry out.
    pub fn next_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Whether the shell should read the socket: not while a history read is on the bus or
    /// the publishes in flight are at the cap (frames read meanwhile wait in order).
    pub fn wants_input(&self) -> bool {
        self.reading.is_none() && self.in_flight < MAX_PUBLISHES_IN_FLIGHT
    }

    /// A run of messages waits for [`Self::end_of_batch`].
    pub fn has_run(&self) -> bool {
        !self.run.is_empty()
    }

    // ---- inputs ----------------------------------------------------------------------

    /// Something was heard from the client (any frame, pongs included).
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// A complete text frame from the client.
    pub fn text(&mut self, text: ByteString, now: Instant) {
        if self.closed {
            return;
        }
        if self.blocked() || !self.waiting.is_empty() {
            if self.before_path_welcome() {
                // Bounded like the outbound queue, in frames and in bytes: a client has no
                // reason to send more than a few frames before the welcome, which comes
                // within one bus round trip.
                if self.waiting.len() >= self.cfg.session_queue
                    || self.early_bytes + text.len() > self.cfg.session_queue_bytes
                {
                    return self.fail_for_frames(Close::TooEarly);
                }
                self.early_bytes += text.len();
            }
            self.waiting.push_back(Work::Text(text));
            return;
        }
        self.handle_text(&text, now);
    }

    /// The client's frames read together were handled: the messages among them go to the
    /// bus as one run.
    pub fn end_of_batch(&mut self) {
        self.send_run();
    }

    /// A room's delivery for subscription `tag`. Returns what to write when it is a plain
    /// frame (or a run of them) of a live, welcomed subscription (the fast path: no effect
    /// queued); otherwise queues what it calls for, or drops it (a room left since).
    pub fn deliver(&mut self, tag: u32, out: Outbound, now: Instant) -> Option<Delivery> {
        if self.closed {
            return None;
        }
        if tag == CONNECTION {
            if let Outbound::Close(why) = out {
                self.close(why);
            }
            return None;
        }
        // Sorted by tag: tags only grow, `add` appends and `end` removes in place. Only after
        // 2^32 subscribes on one connection do tags wrap; a miss then looks the slow way.
        let at = match self.subs.binary_search_by_key(&tag, |s| s.tag) {
            Ok(at) => at,
            Err(_) => self.subs.iter().position(|s| s.tag == tag)?,
        };
        match out {
            Outbound::Frame(text) if self.subs[at].welcomed => Some(Delivery::Text(text)),
            Outbound::Encoded(run) if self.subs[at].welcomed => Some(Delivery::Encoded(run)),
            // The room writes nothing before the welcome.
            Outbound::Frame(_) | Outbound::Encoded(_) => None,
            Outbound::Welcome {
                epoch,
                offset,
                recovered,
            } => {
                self.welcome(at, &epoch, offset, recovered, now);
                None
            }
            Outbound::Close(why) => {
                self.room_closed(at, why);
                None
            }
        }
    }

    /// The answer to the oldest publish in flight.
    pub fn published(&mut self, result: Result<Published, BusError>, now: Instant) {
        let Some(pos) = self
            .answers
            .iter()
            .position(|a| matches!(a, Answer::Pending { .. }))
        else {
            return;
        };
        if let Some(Answer::Pending { room, reference }) = self.answers.get(pos) {
            let frame = match result {
                Ok(p) => ServerFrame::Ack {
                    reference: reference.as_deref(),
                    room,
                    offset: p.offset,
                }
                .to_text(),
                Err(e) => e.frame(reference.as_deref(), room),
            };
            self.answers[pos] = Answer::Ready(frame);
        }
        self.in_flight -= 1;
        self.write_answers();
        self.go_on(now);
    }

    /// The answer to the history read in flight.
    pub fn history_read(&mut self, result: Result<HistoryPage, BusError>, now: Instant) {
        let Some((room, reference)) = self.reading.take() else {
            return;
        };
        if !self.subs.iter().any(|s| s.room == room) {
            // Left while the read was on the bus: after `unsubscribed` nothing of the room
            // is written (docs/PROTOCOL.md §4.1).
            return self.go_on(now);
        }
        let frame = match result {
            Ok(page) => ServerFrame::History {
                reference: reference.as_deref(),
                room: &room,
                epoch: &page.epoch,
                messages: newest_within(&page.messages, self.cfg.session_queue_bytes / 2)
                    .iter()
                    .filter_map(|m| protocol::raw_json(&m.json))
                    .collect(),
            }
            .to_text(),
            Err(e) => e.frame(reference.as_deref(), &room),
        };
        self.write(frame);
        self.go_on(now);
    }

    /// The heartbeat: a ping, or the close of a client not heard from for the timeout.
    pub fn tick(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if now.saturating_duration_since(self.last_heard) > self.cfg.client_timeout {
            log::info!("{} timed out", self.about());
            return self.close(Close::NoPong);
        }
        self.effects.push_back(Effect::Ping);
    }

    /// The token expired (plus leeway).
    pub fn expired(&mut self) {
        log::info!("{} token expired", self.about());
        self.close(Close::TokenExpired);
    }

    /// The shell closed the connection itself (a bad frame): nothing more is written.
    pub fn closed_by_shell(&mut self) {
        self.closed = true;
    }

    /// The connection is ending. Frames read and not handled (`echo hi | websocat`: the
    /// line, then the close; or messages held for a welcome that never came) are handled
    /// now like any others, so what the server read is stored; their answers go nowhere.
    /// Then every room is left.
    pub fn finish(&mut self, now: Instant) {
        self.finishing = true;
        self.closed = true;
        self.reading = None;
        while let Some(work) = self.waiting.pop_front() {
            self.work(work, now);
        }
        for at in 0..self.subs.len() {
            for request in std::mem::take(&mut self.subs[at].held) {
                self.route(request, now);
            }
        }
        self.send_run();
        for sub in std::mem::take(&mut self.subs) {
            self.left(&sub);
        }
        self.path = None;
    }

    // ---- handling --------------------------------------------------------------------

    fn before_path_welcome(&self) -> bool {
        self.path
            .and_then(|tag| self.subs.iter().find(|s| s.tag == tag))
            .is_some_and(|s| !s.welcomed)
    }

    /// Frames wait rather than being handled now.
    fn blocked(&self) -> bool {
        !self.finishing && (!self.wants_input() || self.before_path_welcome())
    }

    /// Handles waiting frames in order until one blocks the session again.
    fn go_on(&mut self, now: Instant) {
        while !self.closed && !self.blocked() {
            let Some(work) = self.waiting.pop_front() else {
                break;
            };
            if let Work::Text(text) = &work {
                self.early_bytes = self.early_bytes.saturating_sub(text.len());
            }
            self.work(work, now);
        }
        if self.waiting.is_empty() {
            self.early_bytes = 0;
        }
    }

    fn work(&mut self, work: Work, now: Instant) {
        match work {
            Work::Text(text) => self.handle_text(&text, now),
            Work::Request(request) => self.route(request, now),
        }
    }

    fn handle_text(&mut self, text: &str, now: Instant) {
        let request = match protocol::parse_request(text, self.cfg.max_message_chars) {
            Ok(r) => r,
            Err(rejection) => {
                // A refused frame costs a token like a message (docs/PROTOCOL.md §11): a client
                // that only sends garbage is closed with 1008 like one that floods.
                if !self.bucket.try_take(now) {
                    let room = rejection.room.clone();
                    return self.rate_limited(rejection.reference.as_deref(), room.as_ref());
                }
                log::debug!(
                    "{} bad frame: {}",
                    logctx::session(&self.label),
                    rejection.message
                );
                self.cfg.metrics.rejected(rejection.code);
                let room = rejection.room.clone().or_else(|| self.path_room().cloned());
                return self.write(protocol::rejection_frame(&rejection, room.as_ref()));
            }
        };
        // Typing takes its token where it is handled, dropped silently instead. A message
        // also spends from its address's and user's budgets, shared with their other
        // sessions.
        let allowed = match request {
            Request::Typing { .. } => true,
            Request::Message { .. } => self.bucket.try_take(now) && self.quotas.try_take(now),
            Request::Subscribe { .. } | Request::Unsubscribe { .. } => {
                self.room_bucket.try_take(now)
            }
            _ => self.bucket.try_take(now),
        };
        if !allowed {
            let room = request
                .room()
                .cloned()
                .or_else(|| self.path_room().cloned());
            return self.rate_limited(request.reference(), room.as_ref());
        }
        self.route(request, now);
    }

    /// The connection's id; its subscriptions' member ids follow it.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The path room's subscription tag, while subscribed to it.
    pub fn path_tag(&self) -> Option<u32> {
        self.path
    }

    /// The room in the path, while subscribed to it.
    pub fn path_room(&self) -> Option<&RoomName> {
        let tag = self.path?;
        self.subs.iter().find(|s| s.tag == tag).map(|s| &s.room)
    }

    /// Sends a parsed request where it goes: to its room's subscription (held there until
    /// the welcome), or handled at once.
    fn route(&mut self, request: Request, now: Instant) {
        match request {
            Request::Ping => {
                self.send_run();
                self.write(ServerFrame::Pong.to_text());
            }
            Request::Subscribe {
                room,
                resume,
                history,
                reference,
            } => {
                self.send_run();
                self.subscribe(room, resume, history, reference);
            }
            Request::Unsubscribe { room, reference } => {
                self.send_run();
                self.unsubscribe(&room, reference, now);
            }
            request => {
                let Some(at) = self.sub_for(&request) else {
                    return;
                };
                if !self.subs[at].welcomed && !self.finishing {
                    let weight = weight(&request);
                    if self.held >= self.cfg.session_queue
                        || self.held_bytes + weight > self.cfg.session_queue_bytes
                    {
                        return self.fail_for_frames(Close::TooEarly);
                    }
                    self.held += 1;
                    self.held_bytes += weight;
                    return self.subs[at].held.push(request);
                }
                self.handle(at, request, now);
            }
        }
    }

    /// The subscription a room frame is for; answers `bad_request` when there is none.
    fn sub_for(&mut self, request: &Request) -> Option<usize> {
        let at = match request.room() {
            Some(room) => self.subs.iter().position(|s| s.room == *room),
            None => self
                .path
                .and_then(|tag| self.subs.iter().position(|s| s.tag == tag)),
        };
        if at.is_none() {
            self.send_run();
            let message = match request.room() {
                Some(_) => "this connection is not subscribed to that room",
                None => "this connection has no room in its path: name the room",
            };
            self.refuse(
                ErrorCode::BadRequest,
                message,
                request.reference(),
                request.room(),
            );
        }
        at
    }

    /// A room frame of a welcomed subscription.
    fn handle(&mut self, at: usize, request: Request, now: Instant) {
        let room = self.subs[at].room.clone();
        if !matches!(request, Request::Message { .. }) {
            // Messages read before this request reach the bus before it does (a typing
            // signal lands after them on the channel).
            self.send_run();
        }
        match request {
            Request::Message {
                text, reference, ..
            } => self.publish(at, text, reference),
            Request::Typing { .. } => {
                // Typing is droppable: over the limit it is skipped without a word.
                if self.bucket.try_take(now) && !self.finishing {
                    self.effects.push_back(Effect::Typing { room });
                }
            }
            Request::Presence { .. } => {
                let member = self.subs[at].member;
                self.effects.push_back(Effect::AskPresence { room, member });
            }
            Request::History {
                before,
                limit,
                reference,
                ..
            } => {
                if self.finishing {
                    return;
                }
                // One read per connection: frames after it wait until it is answered, so a
                // client that asks for twenty pages and reads none holds one reply's bytes.
                self.reading = Some((room.clone(), reference));
                self.effects.push_back(Effect::History {
                    room,
                    before,
                    limit,
                });
            }
            Request::Ping | Request::Subscribe { .. } | Request::Unsubscribe { .. } => {}
        }
    }

    fn publish(&mut self, at: usize, text: String, reference: Option<String>) {
        let sub = &self.subs[at];
        if !sub.may_publish {
            // Answered in turn with the acks of earlier messages, and never stored.
            self.send_run();
            self.cfg.metrics.rejected(ErrorCode::Forbidden);
            let room = self.subs[at].room.clone();
            let frame = ServerFrame::Error {
                code: ErrorCode::Forbidden,
                message: "your token does not allow posting in this room",
                reference: reference.as_deref(),
                room: Some(&room),
            }
            .to_text();
            return self.answer(frame);
        }
        if self.run_room.as_ref().is_some_and(|r| *r != sub.room) {
            // A run is one room's: its messages get offsets in the order they were sent.
            self.send_run();
        }
        let room = self.subs[at].room.clone();
        self.run_room = Some(room);
        self.run.push(NewMessage {
            user: self.identity.user.clone(),
            name: self.identity.name.clone(),
            text,
            reference,
        });
        if self.run.len() >= MAX_RUN || self.in_flight + self.run.len() >= MAX_PUBLISHES_IN_FLIGHT {
            self.send_run();
        }
    }

    /// Hands the messages read so far to the bus as one run, in the order the client sent
    /// them; their acks come back in that order too.
    fn send_run(&mut self) {
        if self.run.is_empty() {
            return;
        }
        let messages = std::mem::take(&mut self.run);
        let Some(room) = self.run_room.take() else {
            return;
        };
        for m in &messages {
            self.answers.push_back(Answer::Pending {
                room: room.clone(),
                reference: m.reference.clone(),
            });
        }
        self.in_flight += messages.len();
        self.effects.push_back(Effect::Publish { room, messages });
    }

    /// Writes a frame in turn with the answers to publishes in flight.
    fn answer(&mut self, frame: ByteString) {
        self.answers.push_back(Answer::Ready(frame));
        self.write_answers();
    }

    fn write_answers(&mut self) {
        while let Some(Answer::Ready(_) | Answer::Unsubscribed { .. }) = self.answers.front() {
            match self.answers.pop_front() {
                Some(Answer::Ready(frame)) => self.write(frame),
                Some(Answer::Unsubscribed { room, frame }) => {
                    self.write(frame);
                    self.attach_deferred(&room);
                }
                _ => {}
            }
        }
        if self.answers.is_empty() && self.answers.capacity() > 4 {
            self.answers = VecDeque::new();
        }
    }

    fn rate_limited(&mut self, reference: Option<&str>, room: Option<&RoomName>) {
        self.cfg.metrics.rate_limited.inc();
        self.violations += 1;
        if self.violations > self.cfg.max_violations {
            log::info!("{} closed for flooding", self.about());
            return self.fail_for_frames(Close::Flooding);
        }
        let frame = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down: rate limit exceeded",
            reference,
            room,
        }
        .to_text();
        self.write(frame);
    }

    fn refuse(
        &mut self,
        code: ErrorCode,
        message: &str,
        reference: Option<&str>,
        room: Option<&RoomName>,
    ) {
        self.cfg.metrics.rejected(code);
        let frame = ServerFrame::Error {
            code,
            message,
            reference,
            room,
        }
        .to_text();
        self.write(frame);
    }

    /// Closes for what the client sent, counted with the bad frames by close code.
    fn fail_for_frames(&mut self, why: Close) {
        self.cfg.metrics.bad_frame(why.code());
        self.close(why);
    }

    fn close(&mut self, why: Close) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.effects.push_back(Effect::Close(why));
    }

    fn write(&mut self, frame: ByteString) {
        if !self.closed {
            self.effects.push_back(Effect::Write(frame));
        }
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

mod subscriptions;

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

/// What a request held for its room's welcome weighs against `limits.session_queue_bytes`:
/// its text and `ref`, and a little for the rest of it.
fn weight(request: &Request) -> usize {
    let text = match request {
        Request::Message { text, .. } => text.len(),
        _ => 0,
    };
    text + request.reference().map_or(0, str::len) + 64
}
