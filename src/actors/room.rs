//! The `Room` actor: the local members of one room on this replica, and ordered fan-out.
//!
//! Events come from the bus in offset order. The room serializes nothing per member: each
//! event carries its frame already serialized, and members get clones of the same bytes.
//! Two marks keep delivery exact:
//! - the room remembers the newest offset it saw; a jump means events were lost on the way
//!   (a full mailbox, a bus reconnect), and the room reads the hole from history before it
//!   delivers anything newer;
//! - each member remembers the newest offset it got, so replays and live events that overlap
//!   are delivered once.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;

use super::member::{MemberHandle, Offer, Outbound, CLOSE_SLOW_CONSUMER};
use crate::bus::{BusError, EventKind, Replay, RoomEvent, SharedBus, StoredMessage};
use crate::domain::{Epoch, Offset, RoomName, SessionId, UserId};
use crate::protocol::{ServerFrame, MAX_HISTORY_LIMIT};

/// Events a room may have queued before the bus sees it as lagging (and drops into a hole
/// that the room then fills from history).
pub const ROOM_MAILBOX: usize = 8192;

/// Close code when a session cannot be set up because the bus is down: "try again later".
const CLOSE_TRY_AGAIN: u16 = 1013;

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

/// Bus → room: events may have been missed (the bus resubscribed or lagged); read history
/// from the newest offset seen.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync;

/// Bus → room: something happened in this room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Event(pub RoomEvent);

struct Member {
    user: UserId,
    handle: MemberHandle,
    /// Events held while the member's welcome and backlog are being read.
    syncing: Option<Vec<RoomEvent>>,
    epoch: Option<Epoch>,
    delivered: Offset,
}

pub struct Room {
    name: RoomName,
    bus: SharedBus,
    queue_limit: usize,
    members: HashMap<SessionId, Member>,
    local_users: HashMap<UserId, usize>,
    /// Newest message event seen, to notice holes.
    seen: Option<(Epoch, Offset)>,
    /// Events held while a hole is read from history.
    filling: Option<Vec<RoomEvent>>,
    /// A resync asked for while a catch-up was running.
    resync_again: bool,
    /// Users whose leave the bus could not record (it was down); retried on resync.
    unrecorded_leaves: Vec<UserId>,
}

impl Room {
    pub fn new(name: RoomName, bus: SharedBus, queue_limit: usize) -> Self {
        Self {
            name,
            bus,
            queue_limit,
            members: HashMap::new(),
            local_users: HashMap::new(),
            seen: None,
            filling: None,
            resync_again: false,
            unrecorded_leaves: Vec::new(),
        }
    }

    fn on_event(&mut self, event: RoomEvent, ctx: &mut Context<Self>) {
        if let Some(held) = self.filling.as_mut() {
            held.push(event);
            return;
        }
        if let EventKind::Message { epoch, offset } = &event.kind {
            if let Some(after) = hole(self.seen.as_ref(), epoch, *offset) {
                log::warn!(
                    "room={} missed offsets {}..{}; reading them from history",
                    self.name,
                    after + 1,
                    offset
                );
                let epoch = epoch.clone();
                self.filling = Some(vec![event]);
                self.catch_up(after, epoch, ctx);
                return;
            }
            let newer = match &self.seen {
                Some((e, last)) => e != epoch || offset > last,
                None => true,
            };
            if newer {
                self.seen = Some((epoch.clone(), *offset));
            }
        }
        self.fan_out(&event, ctx);
    }

    /// Reads the messages after `after` from history and delivers them, then what was held
    /// meanwhile. If the room's history was lost (a new epoch), members are sent `reset` and
    /// then the new epoch's messages from offset 1.
    fn catch_up(&mut self, after: Offset, epoch: Epoch, ctx: &mut Context<Self>) {
        if self.filling.is_none() {
            self.filling = Some(Vec::new());
        }
        let bus = Arc::clone(&self.bus);
        let room = self.name.clone();
        let read = async move {
            match bus.replay(&room, after, &epoch).await? {
                Replay::Recovered { head, messages } => Ok((head, false, messages)),
                Replay::NotRecovered { head } if head.epoch != epoch => {
                    match bus.replay(&room, 0, &head.epoch).await? {
                        Replay::Recovered { head, messages } => Ok((head, true, messages)),
                        Replay::NotRecovered { head } => Ok((head, true, Vec::new())),
                    }
                }
                Replay::NotRecovered { head } => Err(BusError::Internal(format!(
                    "offsets after {after} are no longer in history (oldest kept is past them; head {})",
                    head.offset
                ))),
            }
        };
        ctx.spawn(read.into_actor(self).map(move |result, room, ctx| {
            match result {
                Ok((head, reset, messages)) => {
                    if reset {
                        log::warn!(
                            "room={} history was lost; new epoch {}, members are told to reset",
                            room.name,
                            head.epoch
                        );
                        room.reset_members(&head.epoch, ctx);
                        room.seen = Some((head.epoch.clone(), 0));
                    }
                    for m in messages {
                        room.seen = Some((head.epoch.clone(), m.offset));
                        let event = message_event(&room.name, &head.epoch, m);
                        room.fan_out(&event, ctx);
                    }
                }
                Err(e) => log::error!("room={} cannot catch up from history: {e}", room.name),
            }
            let held = room.filling.take().unwrap_or_default();
            for event in held {
                room.on_event(event, ctx);
            }
            if std::mem::take(&mut room.resync_again) {
                room.resync(ctx);
            }
        }));
    }

    /// Tells members still on an older epoch that history was lost.
    fn reset_members(&mut self, epoch: &Epoch, ctx: &mut Context<Self>) {
        let limit = self.queue_limit;
        let frame = ServerFrame::Reset {
            room: &self.name,
            epoch,
            offset: 0,
        }
        .to_text();
        let mut evict = Vec::new();
        for (id, member) in &mut self.members {
            if member.syncing.is_some() || member.epoch.as_ref() == Some(epoch) {
                continue;
            }
            member.epoch = Some(epoch.clone());
            member.delivered = 0;
            if member
                .handle
                .offer(Outbound::Frame(frame.clone()), false, limit)
                == Offer::Evict
            {
                evict.push(*id);
            }
        }
        for id in evict {
            self.evict(id, ctx);
        }
    }

    /// Reads what may have been missed since the newest offset this room delivered.
    fn resync(&mut self, ctx: &mut Context<Self>) {
        if self.filling.is_some() {
            self.resync_again = true;
            return;
        }
        // The newest message seen; a room that saw none yet starts from its members' marks.
        let from = self.seen.clone().or_else(|| {
            self.members
                .values()
                .filter(|m| m.syncing.is_none())
                .filter_map(|m| m.epoch.clone().map(|e| (e, m.delivered)))
                .min_by_key(|(_, delivered)| *delivered)
        });
        if let Some((epoch, after)) = from {
            self.catch_up(after, epoch, ctx);
        }
    }

    fn fan_out(&mut self, event: &RoomEvent, ctx: &mut Context<Self>) {
        let limit = self.queue_limit;
        let mut evict = Vec::new();
        for (id, member) in &mut self.members {
            if let EventKind::Typing { user }
            | EventKind::Join { user }
            | EventKind::Leave { user } = &event.kind
            {
                // A user is not told of their own typing or of their own arrival.
                if *user == member.user {
                    continue;
                }
            }
            if let Some(held) = member.syncing.as_mut() {
                if held.len() >= limit {
                    evict.push(*id);
                } else {
                    held.push(event.clone());
                }
                continue;
            }
            if member.deliver(&self.name, event, limit) == Offer::Evict {
                evict.push(*id);
            }
        }
        for id in evict {
            self.evict(id, ctx);
        }
    }

    fn evict(&mut self, session: SessionId, ctx: &mut Context<Self>) {
        if let Some(member) = self.detach(session, ctx) {
            log::info!(
                "room={} session={session:x} user={} is a slow consumer; closing with 4008",
                self.name,
                member.user
            );
            member
                .handle
                .close(CLOSE_SLOW_CONSUMER, "slow consumer: resume to catch up");
        }
    }

    /// Removes a member; tells the bus when it was the user's last connection here.
    fn detach(&mut self, session: SessionId, ctx: &mut Context<Self>) -> Option<Member> {
        let member = self.members.remove(&session)?;
        let last = match self.local_users.get_mut(&member.user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.local_users.remove(&member.user);
                true
            }
        };
        if last {
            self.record_leave(member.user.clone(), ctx);
        }
        Some(member)
    }

    /// Tells the bus a user's last local connection is gone; remembered for a retry if the
    /// bus cannot take it now, so no ghost stays in presence after an outage.
    fn record_leave(&mut self, user: UserId, ctx: &mut Context<Self>) {
        let leave = self.bus.leave(&self.name, &user);
        ctx.spawn(leave.into_actor(self).map(move |result, room, _| {
            if let Err(e) = result {
                log::warn!(
                    "room={} cannot record that {user} left: {e}; retrying after reconnect",
                    room.name
                );
                room.unrecorded_leaves.push(user);
            }
        }));
    }

    /// After a reconnect: repeat this replica's joins (Redis may have restarted empty; a join
    /// already recorded is a no-op) and the leaves that failed.
    fn reassert_presence(&mut self, ctx: &mut Context<Self>) {
        for user in std::mem::take(&mut self.unrecorded_leaves) {
            if !self.local_users.contains_key(&user) {
                self.record_leave(user, ctx);
            }
        }
        let joins: Vec<_> = self
            .local_users
            .keys()
            .map(|user| self.bus.join(&self.name, user))
            .collect();
        let room = self.name.clone();
        ctx.spawn(
            async move {
                for join in joins {
                    if let Err(e) = join.await {
                        log::warn!("room={room} cannot re-record presence: {e}");
                    }
                }
            }
            .into_actor(self),
        );
    }

    /// Sends the welcome, backlog and presence, then what arrived meanwhile.
    fn finish_sync(
        &mut self,
        session: SessionId,
        synced: Result<Synced, BusError>,
        ctx: &mut Context<Self>,
    ) {
        let limit = self.queue_limit;
        let Some(member) = self.members.get_mut(&session) else {
            return; // left while we were reading
        };
        let synced = match synced {
            Ok(s) => s,
            Err(e) => {
                log::warn!("room={} session={session:x} cannot start: {e}", self.name);
                if let Some(m) = self.detach(session, ctx) {
                    m.handle
                        .close(CLOSE_TRY_AGAIN, "message bus unavailable; try again");
                }
                return;
            }
        };
        member.epoch = Some(synced.epoch.clone());
        member.delivered = synced.delivered;
        let welcome = Outbound::Welcome {
            epoch: synced.epoch,
            offset: synced.offset,
            recovered: synced.recovered,
        };
        let mut ok = member.handle.offer(welcome, false, limit) == Offer::Sent;
        ok = ok
            && member
                .handle
                .offer(Outbound::Batch(synced.frames), false, limit)
                == Offer::Sent;
        let held = member.syncing.take().unwrap_or_default();
        for event in &held {
            ok = ok && member.deliver(&self.name, event, limit) != Offer::Evict;
        }
        if !ok {
            self.evict(session, ctx);
        }
    }
}

impl Member {
    fn deliver(&mut self, room: &RoomName, event: &RoomEvent, limit: usize) -> Offer {
        match &event.kind {
            EventKind::Message { epoch, offset } => {
                if self.epoch.as_ref() != Some(epoch) {
                    // The history this member knew is gone: say so before the new epoch's
                    // messages, so the client drops its saved offset (SPEC §4 `reset`).
                    let reset = ServerFrame::Reset {
                        room,
                        epoch,
                        offset: offset.saturating_sub(1),
                    }
                    .to_text();
                    if self.handle.offer(Outbound::Frame(reset), false, limit) == Offer::Evict {
                        return Offer::Evict;
                    }
                    self.epoch = Some(epoch.clone());
                    self.delivered = offset.saturating_sub(1);
                }
                if *offset <= self.delivered {
                    return Offer::Sent; // already had it from a replay
                }
                self.delivered = *offset;
                self.handle
                    .offer(Outbound::Frame(event.json.clone()), false, limit)
            }
            EventKind::Typing { .. } => {
                self.handle
                    .offer(Outbound::Frame(event.json.clone()), true, limit)
            }
            EventKind::Join { .. } | EventKind::Leave { .. } => {
                self.handle
                    .offer(Outbound::Frame(event.json.clone()), false, limit)
            }
        }
    }
}

/// Where a new event shows a hole: the newest offset before it, when offsets were skipped.
pub fn hole(seen: Option<&(Epoch, Offset)>, epoch: &Epoch, offset: Offset) -> Option<Offset> {
    match seen {
        Some((e, last)) if e == epoch && offset > last + 1 => Some(*last),
        _ => None,
    }
}

fn message_event(room: &RoomName, epoch: &Epoch, m: StoredMessage) -> RoomEvent {
    RoomEvent {
        room: room.clone(),
        kind: EventKind::Message {
            epoch: epoch.clone(),
            offset: m.offset,
        },
        json: m.json,
    }
}

/// What a joining member is sent before live events.
struct Synced {
    epoch: Epoch,
    /// The room's latest offset for the welcome.
    offset: Offset,
    recovered: Option<bool>,
    /// Backlog frames then the presence frame.
    frames: Vec<ByteString>,
    /// Newest offset included in (or before) the backlog.
    delivered: Offset,
}

/// Reads what a joining session needs: replay when it resumes, else the latest `history`.
async fn sync(
    bus: SharedBus,
    room: RoomName,
    user: UserId,
    announce: bool,
    resume: Option<(Offset, Epoch)>,
    history: usize,
) -> Result<Synced, BusError> {
    if announce {
        bus.join(&room, &user).await?;
    }
    let (head, recovered, backlog) = match resume {
        Some((since, epoch)) => match bus.replay(&room, since, &epoch).await? {
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
    let delivered = backlog
        .last()
        .map_or(head.offset, |m| m.offset.max(head.offset));
    let users = bus.presence(&room).await?;
    let mut frames: Vec<ByteString> = backlog.into_iter().map(|m| m.json).collect();
    frames.push(
        ServerFrame::Presence {
            room: &room,
            users: &users,
        }
        .to_text(),
    );
    Ok(Synced {
        epoch,
        offset: head.offset,
        recovered,
        frames,
        delivered,
    })
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(ROOM_MAILBOX);
        log::debug!("room={} started", self.name);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        log::debug!("room={} stopped", self.name);
    }
}

impl Handler<Join> for Room {
    type Result = ();

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) {
        let count = self.local_users.entry(msg.user.clone()).or_insert(0);
        *count += 1;
        let announce = *count == 1;
        self.members.insert(
            msg.session,
            Member {
                user: msg.user.clone(),
                handle: msg.member,
                syncing: Some(Vec::new()),
                epoch: None,
                delivered: 0,
            },
        );
        let session = msg.session;
        let fut = sync(
            Arc::clone(&self.bus),
            self.name.clone(),
            msg.user,
            announce,
            msg.resume,
            msg.history,
        );
        ctx.spawn(
            fut.into_actor(self)
                .map(move |synced, room, ctx| room.finish_sync(session, synced, ctx)),
        );
    }
}

impl Handler<Leave> for Room {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Self::Context) {
        self.detach(msg.session, ctx);
    }
}

impl Handler<Resync> for Room {
    type Result = ();

    fn handle(&mut self, _: Resync, ctx: &mut Self::Context) {
        self.reassert_presence(ctx);
        self.resync(ctx);
    }
}

impl Handler<Event> for Room {
    type Result = ();

    fn handle(&mut self, msg: Event, ctx: &mut Self::Context) {
        self.on_event(msg.0, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_offsets_are_no_hole() {
        let e = Epoch::from_string("e");
        assert_eq!(hole(Some(&(e.clone(), 4)), &e, 5), None);
    }

    #[test]
    fn skipped_offsets_are_a_hole_after_the_newest_seen() {
        let e = Epoch::from_string("e");
        assert_eq!(hole(Some(&(e.clone(), 4)), &e, 9), Some(4));
    }

    #[test]
    fn repeats_a_new_epoch_or_a_fresh_room_are_no_hole() {
        let e = Epoch::from_string("e");
        assert_eq!(hole(Some(&(e.clone(), 4)), &e, 3), None, "a repeat");
        assert_eq!(
            hole(Some(&(e.clone(), 4)), &Epoch::from_string("f"), 7),
            None
        );
        assert_eq!(hole(None, &e, 7), None);
    }
}
