//! The `Room` actor: the local members of one room on this replica.
//!
//! It only moves messages: bus events, joins and leaves go into the room's
//! [`Sequencer`], which decides what each member is sent; the actor writes nothing itself
//! and carries out the history reads and epoch renewals the sequencer asks for. Presence
//! (`join`/`leave` towards the bus) is the hub's: it sees every connection of the replica in
//! order, so a quick reconnect cannot record its join before the old connection's leave.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;

use super::member::MemberHandle;
use super::sequencer::{Outcome, Page, Sequencer, Step, Synced};
use crate::bus::{BusError, CatchUpDone, PresenceSnapshot, Replay, RoomEvent, SharedBus};
use crate::domain::{Epoch, Offset, RoomName, SessionId, UserId};
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, ServerFrame, MAX_HISTORY_LIMIT};

/// Events a room may have queued before the bus sees it as lagging (and drops into a hole
/// that the room then fills from history).
pub const ROOM_MAILBOX: usize = 8192;

/// Close code when a session cannot be set up because the bus is down: "try again later".
const CLOSE_TRY_AGAIN: u16 = 1013;

/// How long a failed history read or epoch renewal waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

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

/// Bus → room: something happened in this room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Event(pub RoomEvent);

pub struct Room {
    name: RoomName,
    bus: SharedBus,
    seq: Sequencer<MemberHandle>,
    /// Messages per page of a resume's replay: a quarter of a session's queue, so a page
    /// fits in whatever room the member's queue had when it was asked for.
    page: usize,
    /// `limits.resume_max_messages`.
    resume_max: u64,
    /// Set by the directory when it sent a [`Resync`] for a dropped event; cleared here, so
    /// a burst of drops asks for one resync, not one each.
    resync_asked: Arc<AtomicBool>,
    /// Held until the current catch-up is done (see [`Resync`]).
    catch_up_done: Vec<CatchUpDone>,
    /// A presence refresh is being read; `Some(true)` when another was asked for meanwhile
    /// (it is read once this one is answered, so a burst asks the bus once or twice).
    refreshing: Option<bool>,
    metrics: Arc<Metrics>,
}

impl Room {
    pub fn new(
        name: RoomName,
        bus: SharedBus,
        hold_per_member: usize,
        announce_max: usize,
        resume_max: u64,
        resync_asked: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            page: (hold_per_member / 4).clamp(1, 256),
            resume_max,
            seq: Sequencer::new(name.clone(), hold_per_member).with_announce_limit(announce_max),
            name,
            bus,
            resync_asked,
            catch_up_done: Vec::new(),
            refreshing: None,
        }
    }

    /// Carries out what the sequencer asked for.
    fn apply(&mut self, outcome: Outcome<MemberHandle>, ctx: &mut Context<Self>) {
        self.count();
        for closed in outcome.closed {
            log::info!(
                "room={} session={:x} user={} closed with {}: {}",
                self.name,
                closed.session,
                closed.user,
                closed.code,
                closed.reason
            );
            closed.handle.close(closed.code, closed.reason);
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
            .map_err(|e| log::warn!("room={} cannot {what}: {e}; retrying", self.name))
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

/// Reads what a joining session needs: replay when it resumes, else the latest `history`.
/// A resume's replay is read `page` messages at a time (the first page here, the rest by the
/// room as the session drains its queue); one that would replay more than `resume_max`
/// messages is not recovered (SPEC §5: the client pages `history` instead).
async fn sync(
    bus: SharedBus,
    room: RoomName,
    resume: Option<(Offset, Epoch)>,
    history: usize,
    page: usize,
    resume_max: u64,
) -> Result<(Synced, PresenceSnapshot), BusError> {
    let (head, recovered, backlog) = match resume {
        Some((since, epoch)) => match bus.replay(&room, since, &epoch, page).await? {
            Replay::Recovered { head, .. } if head.offset.saturating_sub(since) > resume_max => {
                (head, Some(false), Vec::new())
            }
            Replay::Recovered { head, messages } => (head, Some(true), messages),
            Replay::NotRecovered { head } => (head, Some(false), Vec::new()),
        },
        None => (bus.head(&room).await?, None, Vec::new()),
    };
    let mut backlog = backlog;
    let mut epoch = head.epoch.clone();
    if recovered != Some(true) && history > 0 {
        let page = bus
            .history(&room, None, history.min(MAX_HISTORY_LIMIT))
            .await?;
        epoch = page.epoch;
        backlog = page.messages;
    }
    // A replay that did not reach the head goes on page by page after its last message.
    let more = recovered == Some(true) && backlog.last().is_some_and(|m| m.offset < head.offset);
    let delivered = match backlog.last() {
        Some(m) if more => m.offset,
        last => last.map_or(head.offset, |m| m.offset.max(head.offset)),
    };
    // Read after the hub recorded this member's join (the bus sent it at once), so the
    // member is listed; joins and leaves up to its version are not told again. A member that
    // pages its replay gets the list once it has caught up.
    let presence = bus.presence_snapshot(&room).await?;
    let mut frames: Vec<ByteString> = backlog.into_iter().map(|m| m.json).collect();
    let listed = ServerFrame::Presence {
        room: &room,
        users: &presence.users,
    }
    .to_text();
    let mut tail = Vec::new();
    if more {
        tail.push(listed);
    } else {
        frames.push(listed);
    }
    let synced = Synced {
        epoch,
        offset: head.offset,
        recovered,
        frames,
        delivered,
        more,
        tail,
    };
    Ok((synced, presence))
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(ROOM_MAILBOX);
        self.metrics.rooms_open.inc();
        log::debug!("room={} started", self.name);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.metrics.rooms_open.dec();
        log::debug!("room={} stopped", self.name);
    }
}

impl Handler<Join> for Room {
    type Result = ();

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) {
        let session = msg.session;
        self.seq.add(session, msg.user, msg.member);
        let fut = sync(
            Arc::clone(&self.bus),
            self.name.clone(),
            msg.resume,
            msg.history,
            self.page,
            self.resume_max,
        );
        ctx.spawn(
            fut.into_actor(self)
                .map(move |synced, room, ctx| match synced {
                    Ok((synced, presence)) => {
                        room.seq.presence_read(session, &presence);
                        let outcome = room.seq.synced(session, synced);
                        room.apply(outcome, ctx);
                        room.refresh_if_stale(ctx);
                    }
                    Err(e) => {
                        log::warn!("room={} session={session:x} cannot start: {e}", room.name);
                        room.count();
                        if let Some((_, handle)) = room.seq.remove(session) {
                            handle.close(CLOSE_TRY_AGAIN, "message bus unavailable; try again");
                        }
                    }
                }),
        );
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
        self.resync_asked.store(false, Ordering::Release);
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
                    let frame = ServerFrame::Error {
                        code: match e {
                            BusError::Unavailable(_) => ErrorCode::Unavailable,
                            BusError::Internal(_) => ErrorCode::Internal,
                        },
                        message: &e.to_string(),
                        reference: None,
                        room: Some(&room.name),
                    }
                    .to_text();
                    room.seq.answer(msg.session, frame)
                }
            };
            room.apply(outcome, ctx);
            room.refresh_if_stale(ctx);
        }));
    }
}

impl Handler<Event> for Room {
    type Result = ();

    fn handle(&mut self, msg: Event, ctx: &mut Self::Context) {
        let outcome = self.seq.on_event(msg.0);
        self.apply(outcome, ctx);
        self.refresh_if_stale(ctx);
    }
}
