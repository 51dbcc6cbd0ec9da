//! The `Room` actor: the local members of one room on this replica.
//!
//! It only moves messages: bus events, joins and leaves go into the room's
//! [`Sequencer`], which decides what each member is sent; the actor writes nothing itself
//! and carries out the history reads and epoch renewals the sequencer asks for. Presence
//! (`join`/`leave` towards the bus) is the hub's: it sees every connection of the replica in
//! order, so a quick reconnect cannot record its join before the old connection's leave.
//!
//! Joining sessions are set up in batches: while one setup read (the head, the latest
//! history, the presence snapshot) is on the bus, sessions that join meanwhile wait for the
//! next one, so a reconnect storm of hundreds into one room costs a few reads, not hundreds
//! each. Each still gets a welcome whose head was read after it joined, and a resume its own
//! replay. A read that fails is tried again for `redis.join_retry_ms` before the sessions it
//! was for are closed with 1013.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;

use super::member::MemberHandle;
use super::sequencer::{Outcome, Page, Sequencer, Step, Synced};
use crate::bus::{
    BusError, CatchUpDone, HistoryPage, PresenceSnapshot, Replay, RoomEvent, RoomHead, SharedBus,
};
use crate::close::Close;
use crate::domain::{Epoch, Offset, RoomName, SessionId, UserId};
use crate::logctx;
use crate::metrics::Metrics;
use crate::protocol::{ServerFrame, MAX_HISTORY_LIMIT};

/// Events a room may have queued before the bus sees it as lagging (and drops into a hole
/// that the room then fills from history).
pub const ROOM_QUEUE: usize = 8192;

/// What the bus hands a room, shared by the room and the bus's side of the directory.
///
/// Events wait in a plain queue under a lock, as a session's frames do in its inbox, rather
/// than as one mailbox message each: the room takes all that are there at once, so messages
/// published together (a session's run, or what Redis sent while the room's thread waited
/// for a core) reach each member in one offer, and the room is woken once per batch
/// ([`EventsQueued`]) rather than once per message.
#[derive(Default)]
pub struct RoomQueue {
    events: parking_lot::Mutex<Vec<RoomEvent>>,
    /// A [`Resync`] is on its way to the room: a burst of dropped events asks for one.
    pub resync_asked: AtomicBool,
}

impl RoomQueue {
    /// Queues an event: `Ok(true)` when the room must be told (the queue was empty), the
    /// event back when [`ROOM_QUEUE`] already wait (the room is lagging).
    pub fn push(&self, event: RoomEvent) -> Result<bool, RoomEvent> {
        let mut events = self.events.lock();
        if events.len() >= ROOM_QUEUE {
            return Err(event);
        }
        events.push(event);
        Ok(events.len() == 1)
    }

    /// Swaps what is queued into `into` (empty), whose buffer the queue keeps.
    fn take(&self, into: &mut Vec<RoomEvent>) {
        std::mem::swap(&mut *self.events.lock(), into);
    }
}

/// Bus → room: events wait in its [`RoomQueue`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct EventsQueued;

/// How long a failed history read or epoch renewal waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Pause before a failed setup read is tried again: a bus that refuses at once (not ready)
/// is not asked in a tight loop.
const SETUP_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Hub → room: a session joins.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub session: SessionId,
    pub user: UserId,
    pub member: MemberHandle,
    /// `since` and `epoch` from the URL, when the client resumes.
    pub resume: Option<(Offset, Epoch)>,
    /// `history=N` from the URL (already capped).
    pub history: usize,
}

/// Hub → room: a session left (closed, evicted or failed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub session: SessionId,
}

/// Bus → room: events may have been missed (the bus resubscribed or lagged, or the room's
/// mailbox was full): read history from the newest offset seen, and refresh presence.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync {
    /// Dropped once the catch-up is done; the bridge keeps the replica not ready until every
    /// room has, so no publish lands in a store that went back before the room noticed.
    pub done: Option<CatchUpDone>,
}

/// Hub → room: the replica's joins were recorded again after a reconnect; send members the
/// room's presence as it stands (joins and leaves during the outage were missed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RefreshPresence;

/// Member inbox → room: a resuming member's queue drained; its next page may go in.
#[derive(Message)]
#[rtype(result = "()")]
struct Drained {
    session: SessionId,
}

impl Handler<Drained> for Room {
    type Result = ();

    fn handle(&mut self, msg: Drained, ctx: &mut Self::Context) {
        let outcome = self.seq.drained(msg.session);
        self.apply(outcome, ctx);
    }
}

/// Hub → room: a member asked for the room's presence.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PresenceAsked {
    pub session: SessionId,
}

pub struct Room {
    name: RoomName,
    bus: SharedBus,
    seq: Sequencer<MemberHandle>,
    /// Messages per page of a resume's replay: a quarter of a session's queue, so a page
    /// fits in whatever room the member's queue had when it was asked for.
    page: usize,
    /// `limits.resume_max_messages`.
    resume_max: u64,
    /// Events from the bus; its `resync_asked` is set by the directory when it sent a
    /// [`Resync`] for a dropped event and cleared here.
    queue: Arc<RoomQueue>,
    /// The queue's events being handled; its buffer goes back to the queue.
    taken: Vec<RoomEvent>,
    /// Held until the current catch-up is done (see [`Resync`]).
    catch_up_done: Vec<CatchUpDone>,
    /// A presence refresh is being read; `Some(true)` when another was asked for meanwhile
    /// (it is read once this one is answered, so a burst asks the bus once or twice).
    refreshing: Option<bool>,
    /// Joined sessions waiting for the next setup read, in join order.
    joining: Vec<Joining>,
    /// A setup read is on the bus (or waits to be tried again).
    setting_up: bool,
    /// `redis.join_retry_ms`: how long a session's setup is retried after failed reads.
    retry_within: Duration,
    metrics: Arc<Metrics>,
}

/// What every room of a replica is started with (from the settings).
#[derive(Debug, Clone, Copy)]
pub struct RoomSettings {
    /// Rooms with more local members than this get no join/leave frames
    /// (`limits.join_events_max_members`).
    pub announce_max: usize,
    /// `limits.resume_max_messages`.
    pub resume_max: u64,
    /// `redis.join_retry_ms`: how long a session's setup is retried after failed reads.
    pub retry_within: Duration,
}

impl From<&crate::settings::Settings> for RoomSettings {
    fn from(settings: &crate::settings::Settings) -> Self {
        Self {
            announce_max: settings.limits.join_events_max_members,
            resume_max: settings.limits.resume_max_messages,
            retry_within: settings.redis.join_retry_ms,
        }
    }
}

/// A joined session waiting for its welcome.
struct Joining {
    session: SessionId,
    resume: Option<(Offset, Epoch)>,
    history: usize,
    /// Past it, a failed read closes the session (1013) instead of being tried again.
    give_up_at: Instant,
}

impl Room {
    pub fn new(
        name: RoomName,
        bus: SharedBus,
        hold_per_member: usize,
        settings: RoomSettings,
        queue: Arc<RoomQueue>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            joining: Vec::new(),
            setting_up: false,
            retry_within: settings.retry_within,
            page: (hold_per_member / 4).clamp(1, 256),
            resume_max: settings.resume_max,
            seq: Sequencer::new(name.clone(), hold_per_member)
                .with_announce_limit(settings.announce_max),
            name,
            bus,
            queue,
            taken: Vec::new(),
            catch_up_done: Vec::new(),
            refreshing: None,
        }
    }

    /// Carries out what the sequencer asked for.
    fn apply(&mut self, outcome: Outcome<MemberHandle>, ctx: &mut Context<Self>) {
        self.count();
        for closed in outcome.closed {
            log::info!(
                "{} closed with {}",
                logctx::room(&self.name)
                    .session_id(closed.session)
                    .user(&closed.user),
                closed.why
            );
            closed.handle.close(closed.why);
        }
        if let Some(step) = outcome.step {
            self.run(step, ctx);
        }
        for page in outcome.pages {
            self.read_page(page, ctx);
        }
        for session in outcome.watch {
            if let Some(handle) = self.seq.handle(session) {
                let room = ctx.address();
                // One wake-up per page at most: a bounded number of messages.
                handle.on_drained(Box::new(move || room.do_send(Drained { session })));
            }
        }
        if !self.seq.busy() {
            self.catch_up_done.clear();
        }
    }

    /// Adds what the sequencer counted to the replica's metrics: one atomic add per kind
    /// per room event, whatever the number of members.
    fn count(&mut self) {
        let stats = self.seq.take_stats();
        let m = &self.metrics;
        for (counter, n) in [
            (&m.messages_delivered, stats.delivered),
            (&m.typing_dropped, stats.typing_dropped),
            (&m.slow_consumer_evictions, stats.evicted),
            (&m.replayed_messages, stats.replayed),
            (&m.unrecoverable_gaps, stats.gaps),
            (&m.epoch_resets, stats.epoch_resets),
        ] {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }

    fn run(&mut self, step: Step, ctx: &mut Context<Self>) {
        let bus = Arc::clone(&self.bus);
        let room = self.name.clone();
        match step {
            Step::Read(read) => {
                self.metrics.catch_ups.inc();
                let call = bus.replay(&room, read.after, &read.epoch, 0);
                ctx.spawn(call.into_actor(self).map(move |result, room, ctx| {
                    let replay = room.succeeded(result, "read history");
                    let failed = replay.is_none();
                    let outcome = room.seq.read_done(&read, replay);
                    room.apply_later(outcome, failed, ctx);
                }));
            }
            Step::Renew { stale, floor } => {
                let call = bus.renew_epoch(&room, &stale, floor);
                ctx.spawn(call.into_actor(self).map(move |result, room, ctx| {
                    let head = room.succeeded(result, "start a new epoch");
                    let failed = head.is_none();
                    let outcome = room.seq.renewed(&stale, floor, head);
                    room.apply_later(outcome, failed, ctx);
                }));
            }
        }
    }

    /// Reads the next page of a resuming member's replay.
    fn read_page(&mut self, page: Page, ctx: &mut Context<Self>) {
        let call = self
            .bus
            .replay(&self.name, page.after, &page.epoch, self.page);
        ctx.spawn(call.into_actor(self).map(move |result, room, ctx| {
            let replay = room.succeeded(result, "read a resume's page");
            let failed = replay.is_none();
            let outcome = room.seq.page_done(&page, replay);
            room.apply_later(outcome, failed, ctx);
        }));
    }

    /// Refreshes presence when members missed joins or leaves and the room is small enough
    /// to tell them (see `Sequencer::take_presence_stale`).
    fn refresh_if_stale(&mut self, ctx: &mut Context<Self>) {
        if self.seq.take_presence_stale() {
            self.refresh_presence(ctx);
        }
    }

    fn succeeded<T>(&self, result: Result<T, BusError>, what: &str) -> Option<T> {
        result
            .map_err(|e| log::warn!("{} cannot {what}: {e}; retrying", logctx::room(&self.name)))
            .ok()
    }

    /// Like [`Self::apply`], but a step retried after a failure waits a little first.
    fn apply_later(
        &mut self,
        outcome: Outcome<MemberHandle>,
        failed: bool,
        ctx: &mut Context<Self>,
    ) {
        if !failed {
            return self.apply(outcome, ctx);
        }
        ctx.run_later(RETRY_AFTER, move |room, ctx| room.apply(outcome, ctx));
    }

    /// Sends every synced member whose presence set is older the room's presence as the bus
    /// has it now: repairs a `join` or `leave` that was dropped on the way or not told.
    fn refresh_presence(&mut self, ctx: &mut Context<Self>) {
        if let Some(again) = self.refreshing.as_mut() {
            *again = true;
            return;
        }
        self.refreshing = Some(false);
        let call = self.bus.presence_snapshot(&self.name);
        ctx.spawn(call.into_actor(self).map(|result, room, ctx| {
            let again = room.refreshing.take() == Some(true);
            if let Ok(snapshot) = result {
                let outcome = room.seq.presence_refresh(&snapshot);
                room.apply(outcome, ctx);
            }
            if again || room.seq.take_presence_stale() {
                room.refresh_presence(ctx);
            }
        }));
    }
}

/// What one setup read found for every session of its batch.
struct SetupRead {
    /// The room's head, when a session of the batch does not resume.
    head: Option<RoomHead>,
    /// The latest messages, as many as the batch's largest `history=N` asked for.
    history: Option<HistoryPage>,
    /// Read after every session of the batch had its join sent to the bus, so each is listed.
    presence: PresenceSnapshot,
    /// `presence`'s frame, serialized once for every session of the batch (a storm's batch
    /// into a big room would otherwise serialize the same long list once per session).
    listed: ByteString,
    /// Each resuming session's replay (its first page), by its place in the batch.
    replays: Vec<Option<Result<Replay, BusError>>>,
}

/// Reads what a batch of joining sessions needs, all at once: one head, one history page and
/// one presence snapshot for all of them, and a replay for each that resumes (a resume's
/// replay is read `page` messages at a time: the first page here, the rest by the room as
/// the session drains its queue).
async fn read_setup(
    bus: SharedBus,
    room: RoomName,
    batch: Vec<(Option<(Offset, Epoch)>, usize)>,
    page: usize,
) -> Result<SetupRead, BusError> {
    let replays = futures_util::future::join_all(batch.iter().map(|(resume, _)| {
        let replay = resume
            .as_ref()
            .map(|(since, epoch)| bus.replay(&room, *since, epoch, page));
        async move {
            match replay {
                Some(replay) => Some(replay.await),
                None => None,
            }
        }
    }));
    let fresh = batch.iter().any(|(resume, _)| resume.is_none());
    let head = async {
        match fresh {
            true => bus.head(&room).await.map(Some),
            false => Ok(None),
        }
    };
    let most = batch.iter().map(|(_, history)| *history).max().unwrap_or(0);
    let history = async {
        match most {
            0 => Ok(None),
            n => bus
                .history(&room, None, n.min(MAX_HISTORY_LIMIT))
                .await
                .map(Some),
        }
    };
    let (replays, head, history, presence) =
        futures_util::join!(replays, head, history, bus.presence_snapshot(&room));
    let presence = presence?;
    let listed = ServerFrame::Presence {
        room: &room,
        users: &presence.users,
    }
    .to_text();
    Ok(SetupRead {
        head: head?,
        history: history?,
        presence,
        listed,
        replays,
    })
}

/// What one joining session is sent, from its batch's read: its replay when it resumes, else
/// the head; the latest `history` messages when it is not recovered. A resume that would
/// replay more than `resume_max` messages is not recovered (docs/PROTOCOL.md §9: the client pages
/// `history` instead).
fn setup_of(
    read: &SetupRead,
    resume: Option<(Offset, Replay)>,
    history: usize,
    resume_max: u64,
) -> Result<Synced, BusError> {
    let missing = || BusError::Internal("a setup read left out what a session needs".into());
    let (head, recovered, backlog) = match resume {
        Some((since, replay)) => match replay {
            Replay::Recovered { head, .. } if head.offset.saturating_sub(since) > resume_max => {
                (head, Some(false), Vec::new())
            }
            Replay::Recovered { head, messages } => (head, Some(true), messages),
            Replay::NotRecovered { head } => (head, Some(false), Vec::new()),
        },
        None => (read.head.clone().ok_or_else(missing)?, None, Vec::new()),
    };
    let mut backlog = backlog;
    let mut epoch = head.epoch.clone();
    if recovered != Some(true) && history > 0 {
        let page = read.history.as_ref().ok_or_else(missing)?;
        epoch = page.epoch.clone();
        // The batch read the most any of its sessions asked for: this one's are the newest.
        let skip = page.messages.len().saturating_sub(history);
        backlog = page.messages[skip..].to_vec();
    }
    // A replay that did not reach the head goes on page by page after its last message.
    let more = recovered == Some(true) && backlog.last().is_some_and(|m| m.offset < head.offset);
    let delivered = match backlog.last() {
        Some(m) if more => m.offset,
        last => last.map_or(head.offset, |m| m.offset.max(head.offset)),
    };
    // Joins and leaves up to the snapshot's version are not told again. A member that pages
    // its replay gets the list once it has caught up.
    let mut frames: Vec<ByteString> = backlog.into_iter().map(|m| m.json).collect();
    let listed = read.listed.clone();
    let mut tail = Vec::new();
    if more {
        tail.push(listed);
    } else {
        frames.push(listed);
    }
    Ok(Synced {
        epoch,
        offset: head.offset,
        recovered,
        frames,
        delivered,
        more,
        tail,
    })
}

impl Room {
    /// Starts a setup read for every session waiting for one, unless a read is on the bus:
    /// then they wait for the next, which starts when it is answered.
    fn set_up(&mut self, ctx: &mut Context<Self>) {
        if self.setting_up {
            return;
        }
        // Sessions that left while they waited need nothing read.
        let seq = &self.seq;
        self.joining.retain(|j| seq.handle(j.session).is_some());
        if self.joining.is_empty() {
            return;
        }
        self.setting_up = true;
        let batch = std::mem::take(&mut self.joining);
        let wants = batch
            .iter()
            .map(|j| (j.resume.clone(), j.history))
            .collect();
        let read = read_setup(Arc::clone(&self.bus), self.name.clone(), wants, self.page);
        ctx.spawn(read.into_actor(self).map(move |read, room, ctx| {
            room.setting_up = false;
            room.set_up_done(batch, read, ctx);
            room.set_up(ctx);
        }));
    }

    /// Welcomes the sessions a setup read was for; those it failed for wait for the next
    /// read, or are closed with 1013 once they have waited `redis.join_retry_ms`.
    fn set_up_done(
        &mut self,
        batch: Vec<Joining>,
        read: Result<SetupRead, BusError>,
        ctx: &mut Context<Self>,
    ) {
        let mut again = Vec::new();
        let mut replays = Vec::new();
        let read = match read {
            Ok(mut read) => {
                replays = std::mem::take(&mut read.replays);
                Ok(read)
            }
            Err(e) => Err(e),
        };
        replays.resize_with(batch.len(), || None);
        for (joining, replay) in batch.into_iter().zip(replays) {
            let session = joining.session;
            if self.seq.handle(session).is_none() {
                continue; // left meanwhile
            }
            let synced = read.as_ref().map_err(Clone::clone).and_then(|read| {
                let resume = match (&joining.resume, replay) {
                    (Some((since, _)), Some(replay)) => Some((*since, replay?)),
                    _ => None,
                };
                setup_of(read, resume, joining.history, self.resume_max)
                    .map(|synced| (synced, &read.presence))
            });
            match synced {
                Ok((synced, presence)) => {
                    self.seq.presence_read(session, presence);
                    let outcome = self.seq.synced(session, synced);
                    self.apply(outcome, ctx);
                }
                Err(e) if Instant::now() < joining.give_up_at => {
                    log::debug!(
                        "{} setup read failed: {e}; retrying",
                        logctx::room(&self.name).session_id(session)
                    );
                    again.push(joining);
                }
                Err(e) => {
                    log::warn!(
                        "{} cannot start: {e}",
                        logctx::room(&self.name).session_id(session)
                    );
                    self.count();
                    if let Some((_, handle)) = self.seq.remove(session) {
                        handle.close(Close::BusUnavailable);
                    }
                }
            }
        }
        self.refresh_if_stale(ctx);
        if again.is_empty() {
            return;
        }
        // Ahead of those who joined meanwhile, after a pause; nothing else is read until then.
        again.append(&mut self.joining);
        self.joining = again;
        self.setting_up = true;
        ctx.run_later(SETUP_RETRY_PAUSE, |room, ctx| {
            room.setting_up = false;
            room.set_up(ctx);
        });
    }
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.metrics.rooms_open.inc();
        log::debug!("{} started", logctx::room(&self.name));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.metrics.rooms_open.dec();
        log::debug!("{} stopped", logctx::room(&self.name));
    }
}

impl Handler<Join> for Room {
    type Result = ();

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) {
        self.seq.add(msg.session, msg.user, msg.member);
        self.joining.push(Joining {
            session: msg.session,
            resume: msg.resume,
            history: msg.history,
            give_up_at: Instant::now() + self.retry_within,
        });
        self.set_up(ctx);
    }
}

impl Handler<Leave> for Room {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Self::Context) {
        self.seq.remove(msg.session);
        self.refresh_if_stale(ctx);
    }
}

impl Handler<Resync> for Room {
    type Result = ();

    fn handle(&mut self, msg: Resync, ctx: &mut Self::Context) {
        self.queue.resync_asked.store(false, Ordering::Release);
        // After a reconnect (`done` given) presence is refreshed once the hub has recorded
        // this replica's joins again (see `RefreshPresence`): read now, a Redis that came back
        // empty would list nobody.
        let reconnect = msg.done.is_some();
        self.catch_up_done.extend(msg.done);
        let outcome = self.seq.resync();
        self.apply(outcome, ctx);
        if !reconnect {
            self.refresh_presence(ctx);
        }
    }
}

impl Handler<RefreshPresence> for Room {
    type Result = ();

    fn handle(&mut self, _: RefreshPresence, ctx: &mut Self::Context) {
        self.refresh_presence(ctx);
    }
}

impl Handler<PresenceAsked> for Room {
    type Result = ();

    fn handle(&mut self, msg: PresenceAsked, ctx: &mut Self::Context) {
        let call = self.bus.presence_snapshot(&self.name);
        ctx.spawn(call.into_actor(self).map(move |result, room, ctx| {
            let outcome = match result {
                Ok(snapshot) => room.seq.presence_answer(msg.session, &snapshot),
                Err(e) => {
                    let frame = e.frame(None, &room.name);
                    room.seq.answer(msg.session, frame)
                }
            };
            room.apply(outcome, ctx);
            room.refresh_if_stale(ctx);
        }));
    }
}

impl Handler<EventsQueued> for Room {
    type Result = ();

    fn handle(&mut self, _: EventsQueued, ctx: &mut Self::Context) {
        self.queue.take(&mut self.taken);
        if self.taken.is_empty() {
            // Taken with an earlier notice's batch.
            return;
        }
        let outcome = self.seq.on_events(self.taken.drain(..));
        // A burst's buffer goes back, as a member's inbox gives back its own.
        if self.taken.capacity() > 64 {
            self.taken = Vec::new();
        }
        self.apply(outcome, ctx);
        self.refresh_if_stale(ctx);
    }
}
