//! A room's delivery state on one replica, as a plain state machine with no actix in it.
//!
//! The [`Room`](super::room::Room) actor feeds it what happens (bus events, members joining,
//! history reads finishing) and carries out what it asks for (read history, start a new epoch).
//! It keeps the room's promise to every member (SPEC §5): each member sees a contiguous run of
//! offsets per epoch, or is told — a `reset` frame when the room moves to another epoch, close
//! 4008 when what it missed is no longer in history.
//!
//! - The room remembers the newest message it saw, with a fingerprint of its bytes. A jump in
//!   offsets means events were lost on the way (a full mailbox, a bus reconnect): live events
//!   are held and the hole is read from history, starting one message early so the store can
//!   be checked to still hold what was delivered.
//! - A store that came back older (a lagging Redis replica promoted, a restored backup) shows
//!   as that check failing, or as a live message reusing the newest seen offset with other
//!   bytes: the room asks the bus for a new epoch and resets its members.
//! - A hole older than history closes the members that would have a gap (4008: their resume
//!   reports `recovered:false`) and the room goes on from the store's head.
//! - Each member has a cursor: replays and live events that overlap are delivered once, and a
//!   member that would skip an offset is closed rather than left with a silent gap.
//!
//! Model: centrifugal/centrifuge `internal/recovery` (buffer while recovering, then merge,
//! de-duplicate and order).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use bytestring::ByteString;

use crate::bus::{EventKind, Replay, RoomEvent, RoomHead, StoredMessage};
use crate::domain::{Epoch, Offset, RoomName, SessionId, UserId};
use crate::protocol::ServerFrame;

/// Close code for a session that fell too far behind (SPEC §5).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;

/// Room events held while history is read; past it they are let go and read again.
const HOLD_LIMIT: usize = 16 * 1024;

/// Something for a session to write to its socket, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// The session's first frame: where the room stands.
    Welcome {
        epoch: Epoch,
        offset: Offset,
        recovered: Option<bool>,
    },
    /// One server frame, serialized once for all members.
    Frame(ByteString),
    /// Close the connection with this code.
    Close { code: u16, reason: &'static str },
}

impl Outbound {
    /// What the frame weighs in a session's byte bound.
    pub fn bytes(&self) -> usize {
        match self {
            Outbound::Frame(text) => text.len(),
            // The welcome is small and built by the session; count a typical size.
            Outbound::Welcome { .. } => 256,
            Outbound::Close { .. } => 0,
        }
    }
}

/// Result of offering a frame to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Sent,
    Dropped,
    /// The member is a slow consumer (or gone) and must be detached.
    Evict,
}

/// Where a member's frames go: a bounded queue that never blocks the room.
pub trait Outlet {
    /// Offers a frame; droppable frames (typing) may be skipped under load.
    fn offer(&self, out: Outbound, droppable: bool) -> Offer;
}

/// The newest message the room delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    epoch: Epoch,
    offset: Offset,
    /// Fingerprint of the message's bytes; `None` when the room jumped to a head it did not
    /// read (a reset or a gap), so there is nothing to check.
    print: Option<u64>,
}

/// A history read the room needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub epoch: Epoch,
    /// Read the messages after this offset.
    pub after: Offset,
    /// When set, the first message read must be `after + 1` with this fingerprint: the room
    /// delivered it, and a store that lost or replaced it went back in time.
    pub expect: Option<u64>,
}

/// What the actor must do for the sequencer; at most one is outstanding at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `bus.replay(room, after, epoch)`, then [`Sequencer::read_done`].
    Read(Read),
    /// The store went back: `bus.renew_epoch(room, stale, floor)`, then
    /// [`Sequencer::renewed`].
    Renew { stale: Epoch, floor: Offset },
}

/// A member the sequencer let go of; the actor closes it and updates presence.
#[derive(Debug)]
pub struct Closed<H> {
    pub session: SessionId,
    pub user: UserId,
    pub handle: H,
    pub code: u16,
    pub reason: &'static str,
}

/// What one call asks of the actor.
#[derive(Debug)]
pub struct Outcome<H> {
    pub closed: Vec<Closed<H>>,
    pub step: Option<Step>,
}

impl<H> Default for Outcome<H> {
    fn default() -> Self {
        Self {
            closed: Vec::new(),
            step: None,
        }
    }
}

/// What a joining member is sent before live events, read by the actor from the bus.
#[derive(Debug, Clone)]
pub struct Synced {
    pub epoch: Epoch,
    /// The room's latest offset, for the welcome.
    pub offset: Offset,
    pub recovered: Option<bool>,
    /// Backlog frames then the presence frame.
    pub frames: Vec<ByteString>,
    /// Newest offset included in (or before) the backlog.
    pub delivered: Offset,
}

struct Member<H> {
    user: UserId,
    handle: H,
    /// Events held while the member's welcome and backlog are being read.
    syncing: Option<Vec<RoomEvent>>,
    epoch: Option<Epoch>,
    delivered: Offset,
}

pub struct Sequencer<H> {
    room: RoomName,
    /// Frames a syncing member may have held for it.
    hold_per_member: usize,
    members: HashMap<SessionId, Member<H>>,
    seen: Option<Mark>,
    /// An epoch this room moved away from because the store went back: its stragglers are
    /// dropped rather than taken for yet another epoch.
    retired: Option<Epoch>,
    /// Events held while a step runs; `Some` exactly while one is outstanding.
    held: Option<Vec<RoomEvent>>,
    /// Some held events were let go, or a resync was asked for meanwhile: read again after.
    again: bool,
}

/// Fingerprint of a stored frame; equal bytes give equal prints.
pub fn fingerprint(json: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    json.hash(&mut h);
    h.finish()
}

impl<H: Outlet> Sequencer<H> {
    pub fn new(room: RoomName, hold_per_member: usize) -> Self {
        Self {
            room,
            hold_per_member,
            members: HashMap::new(),
            seen: None,
            retired: None,
            held: None,
            again: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A session joins; its events are held until [`Self::synced`].
    pub fn add(&mut self, session: SessionId, user: UserId, handle: H) {
        self.members.insert(
            session,
            Member {
                user,
                handle,
                syncing: Some(Vec::new()),
                epoch: None,
                delivered: 0,
            },
        );
    }

    /// A session left; returns its user and handle.
    pub fn remove(&mut self, session: SessionId) -> Option<(UserId, H)> {
        self.members.remove(&session).map(|m| (m.user, m.handle))
    }

    /// Whether the session is still a member (it may have left while its sync was read).
    pub fn contains(&self, session: SessionId) -> bool {
        self.members.contains_key(&session)
    }

    /// The member's sync read finished: welcome, backlog, then what arrived meanwhile.
    pub fn synced(&mut self, session: SessionId, synced: Synced) -> Outcome<H> {
        let mut out = Outcome::default();
        let room = self.room.clone();
        let Some(member) = self.members.get_mut(&session) else {
            return out;
        };
        member.epoch = Some(synced.epoch.clone());
        member.delivered = synced.delivered;
        let welcome = Outbound::Welcome {
            epoch: synced.epoch,
            offset: synced.offset,
            recovered: synced.recovered,
        };
        let mut ok = member.handle.offer(welcome, false) == Offer::Sent;
        for frame in synced.frames {
            ok = ok && member.handle.offer(Outbound::Frame(frame), false) == Offer::Sent;
        }
        for event in member.syncing.take().unwrap_or_default() {
            ok = ok && member.deliver(&room, &event) == Offer::Sent;
        }
        if !ok {
            self.close(session, slow(), &mut out);
        }
        out
    }

    /// A frame for every synced member that may be dropped under load (a presence refresh).
    pub fn broadcast(&mut self, json: ByteString) -> Outcome<H> {
        let mut out = Outcome::default();
        let evict: Vec<SessionId> = self
            .members
            .iter()
            .filter(|(_, m)| m.syncing.is_none())
            .filter(|(_, m)| m.handle.offer(Outbound::Frame(json.clone()), true) == Offer::Evict)
            .map(|(id, _)| *id)
            .collect();
        for id in evict {
            self.close(id, slow(), &mut out);
        }
        out
    }

    /// A live event from the bus.
    pub fn on_event(&mut self, event: RoomEvent) -> Outcome<H> {
        let mut out = Outcome::default();
        self.event(event, &mut out);
        out
    }

    /// Events may have been missed (a resubscribe, a dropped event): read history from the
    /// newest offset delivered.
    pub fn resync(&mut self) -> Outcome<H> {
        let mut out = Outcome::default();
        if self.held.is_some() {
            self.again = true;
            return out;
        }
        // A room that saw no message yet starts from its members' cursors.
        let read = match &self.seen {
            Some(mark) => read_from(mark),
            None => match self
                .members
                .values()
                .filter(|m| m.syncing.is_none())
                .filter_map(|m| m.epoch.clone().map(|e| (e, m.delivered)))
                .min_by_key(|(_, delivered)| *delivered)
            {
                Some((epoch, after)) => Read {
                    epoch,
                    after,
                    expect: None,
                },
                None => return out,
            },
        };
        self.start(Step::Read(read), Vec::new(), &mut out);
        out
    }

    /// The history read asked for by a [`Step::Read`] finished; `None` when the bus failed
    /// (the actor retries the same step later).
    pub fn read_done(&mut self, read: &Read, result: Option<Replay>) -> Outcome<H> {
        let mut out = Outcome::default();
        let Some(replay) = result else {
            out.step = Some(Step::Read(read.clone()));
            return out;
        };
        match replay {
            Replay::Recovered { head, messages } => {
                let mut messages = messages.into_iter().peekable();
                if let Some(expect) = read.expect {
                    let first = messages.next_if(|m| m.offset == read.after + 1);
                    let kept = first.is_some_and(|m| fingerprint(&m.json) == expect);
                    if !kept {
                        // What this room delivered is gone or different: the store went back.
                        return self.went_back(&read.epoch, read.after + 1);
                    }
                }
                for m in messages {
                    self.accept(message_event(&self.room, &head.epoch, m), &mut out);
                }
            }
            Replay::NotRecovered { head } if head.epoch == read.epoch => {
                let seen = self.seen.as_ref().map_or(0, |m| m.offset);
                if read.expect.is_some() && head.offset < seen {
                    return self.went_back(&read.epoch, seen);
                }
                self.gap(&head, &mut out);
            }
            Replay::NotRecovered { head } => {
                // The room has a new epoch (its history was lost or expired): read it from the
                // start, then tell members.
                let read = Read {
                    epoch: head.epoch,
                    after: 0,
                    expect: None,
                };
                out.step = Some(Step::Read(read));
                return out;
            }
        }
        self.release(&mut out);
        out
    }

    /// The bus moved the room to a new epoch after the store went back (`None`: it failed and
    /// the actor retries the step later).
    pub fn renewed(&mut self, stale: &Epoch, floor: Offset, head: Option<RoomHead>) -> Outcome<H> {
        let mut out = Outcome::default();
        let Some(head) = head else {
            out.step = Some(Step::Renew {
                stale: stale.clone(),
                floor,
            });
            return out;
        };
        log::warn!(
            "room={} the store went back in time (offset {floor} of epoch {stale} was lost \
             or replaced); new epoch {} from offset {}, members are told to reset",
            self.room,
            head.epoch,
            head.offset
        );
        self.retired = Some(stale.clone());
        self.reset_members(&head.epoch, head.offset, &mut out);
        self.seen = Some(Mark {
            epoch: head.epoch,
            offset: head.offset,
            print: None,
        });
        self.release(&mut out);
        out
    }

    fn event(&mut self, event: RoomEvent, out: &mut Outcome<H>) {
        if let Some(held) = self.held.as_mut() {
            if held.len() < HOLD_LIMIT {
                held.push(event);
            } else {
                // Messages are in history and will be read again; typing and presence may go.
                self.again = true;
            }
            return;
        }
        let EventKind::Message { epoch, offset } = &event.kind else {
            self.fan_out(&event, out);
            return;
        };
        if self.retired.as_ref() == Some(epoch) {
            return;
        }
        let Some(mark) = &self.seen else {
            self.accept(event, out);
            return;
        };
        if mark.epoch != *epoch {
            if *offset == 1 {
                self.accept(event, out);
            } else {
                // A new epoch whose start we did not see: read it from the beginning.
                let read = Read {
                    epoch: epoch.clone(),
                    after: 0,
                    expect: None,
                };
                self.start(Step::Read(read), vec![event], out);
            }
            return;
        }
        let (offset, last) = (*offset, mark.offset);
        if offset == last + 1 {
            self.accept(event, out);
        } else if offset > last + 1 {
            log::warn!(
                "room={} missed offsets {}..{}; reading them from history",
                self.room,
                last + 1,
                offset - 1
            );
            let read = read_from(mark);
            self.start(Step::Read(read), vec![event], out);
        } else if offset == last && mark.print.is_some_and(|p| p != fingerprint(&event.json)) {
            // The same offset with other bytes: the store reused an offset it had given out.
            let stale = mark.epoch.clone();
            self.start(Step::Renew { stale, floor: last }, Vec::new(), out);
        }
        // Otherwise a repeat (a replay overlapping live events): already delivered.
    }

    /// Starts a step, holding `held` and whatever arrives until it finishes.
    fn start(&mut self, step: Step, held: Vec<RoomEvent>, out: &mut Outcome<H>) {
        self.held = Some(held);
        out.step = Some(step);
    }

    fn went_back(&mut self, stale: &Epoch, floor: Offset) -> Outcome<H> {
        Outcome {
            closed: Vec::new(),
            step: Some(Step::Renew {
                stale: stale.clone(),
                floor,
            }),
        }
    }

    /// Hands what was held during a step back to the live path, then reads again if asked.
    fn release(&mut self, out: &mut Outcome<H>) {
        let held = self.held.take().unwrap_or_default();
        for event in held {
            // If one of these starts another step, the rest are held for it, in order.
            self.event(event, out);
        }
        if self.held.is_none() && std::mem::take(&mut self.again) {
            let next = self.resync();
            out.step = next.step;
        }
    }

    /// The hole is no longer in history: members that would have a gap are closed, the room
    /// goes on from the store's head. Members still on an older epoch (the room's history was
    /// lost, and the new epoch's start is trimmed too) are told with a `reset` at the head.
    fn gap(&mut self, head: &RoomHead, out: &mut Outcome<H>) {
        self.reset_members(&head.epoch, head.offset, out);
        log::warn!(
            "room={} missed messages are no longer in history; members behind offset {} are \
             closed with 4008 and the room goes on",
            self.room,
            head.offset
        );
        let behind: Vec<SessionId> = self
            .members
            .iter()
            .filter(|(_, m)| m.syncing.is_none())
            .filter(|(_, m)| m.epoch.as_ref() == Some(&head.epoch) && m.delivered < head.offset)
            .map(|(id, _)| *id)
            .collect();
        for id in behind {
            self.close(
                id,
                (
                    CLOSE_SLOW_CONSUMER,
                    "missed messages are no longer in history: resume to catch up",
                ),
                out,
            );
        }
        self.seen = Some(Mark {
            epoch: head.epoch.clone(),
            offset: head.offset,
            print: None,
        });
    }

    /// Tells synced members not on `epoch` that the room moved there, continuing after
    /// `offset`.
    fn reset_members(&mut self, epoch: &Epoch, offset: Offset, out: &mut Outcome<H>) {
        let frame = ServerFrame::Reset {
            room: &self.room,
            epoch,
            offset,
        }
        .to_text();
        let mut evict = Vec::new();
        for (id, member) in &mut self.members {
            if member.syncing.is_some() || member.epoch.as_ref() == Some(epoch) {
                continue;
            }
            member.epoch = Some(epoch.clone());
            member.delivered = offset;
            if member.handle.offer(Outbound::Frame(frame.clone()), false) != Offer::Sent {
                evict.push(*id);
            }
        }
        for id in evict {
            self.close(id, slow(), out);
        }
    }

    /// Delivers a message that is next in order (or the first of a new epoch).
    fn accept(&mut self, event: RoomEvent, out: &mut Outcome<H>) {
        if let EventKind::Message { epoch, offset } = &event.kind {
            if self.seen.as_ref().is_some_and(|m| m.epoch != *epoch) {
                // Members on the old epoch learn of the new one from `Member::deliver`; a
                // reset read from history tells them here, before the backlog.
                self.reset_members(epoch, offset.saturating_sub(1), out);
            }
            self.seen = Some(Mark {
                epoch: epoch.clone(),
                offset: *offset,
                print: Some(fingerprint(&event.json)),
            });
        }
        self.fan_out(&event, out);
    }

    fn fan_out(&mut self, event: &RoomEvent, out: &mut Outcome<H>) {
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
                if held.len() >= self.hold_per_member {
                    evict.push(*id);
                } else {
                    held.push(event.clone());
                }
                continue;
            }
            if member.deliver(&self.room, event) == Offer::Evict {
                evict.push(*id);
            }
        }
        for id in evict {
            self.close(id, slow(), out);
        }
    }

    fn close(&mut self, session: SessionId, why: (u16, &'static str), out: &mut Outcome<H>) {
        if let Some(m) = self.members.remove(&session) {
            out.closed.push(Closed {
                session,
                user: m.user,
                handle: m.handle,
                code: why.0,
                reason: why.1,
            });
        }
    }
}

fn slow() -> (u16, &'static str) {
    (CLOSE_SLOW_CONSUMER, "slow consumer: resume to catch up")
}

/// The read that fills a hole after `mark`, re-reading the marked message to check it.
fn read_from(mark: &Mark) -> Read {
    match mark.print {
        Some(print) if mark.offset > 0 => Read {
            epoch: mark.epoch.clone(),
            after: mark.offset - 1,
            expect: Some(print),
        },
        _ => Read {
            epoch: mark.epoch.clone(),
            after: mark.offset,
            expect: None,
        },
    }
}

impl<H: Outlet> Member<H> {
    fn deliver(&mut self, room: &RoomName, event: &RoomEvent) -> Offer {
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
                    if self.handle.offer(Outbound::Frame(reset), false) != Offer::Sent {
                        return Offer::Evict;
                    }
                    self.epoch = Some(epoch.clone());
                    self.delivered = offset.saturating_sub(1);
                }
                if *offset <= self.delivered {
                    return Offer::Sent; // already had it from a replay
                }
                if *offset > self.delivered + 1 {
                    // Never a silent gap: the member resumes and finds out what it missed.
                    return Offer::Evict;
                }
                self.delivered = *offset;
                match self
                    .handle
                    .offer(Outbound::Frame(event.json.clone()), false)
                {
                    Offer::Sent => Offer::Sent,
                    _ => Offer::Evict,
                }
            }
            EventKind::Typing { .. } => {
                match self.handle.offer(Outbound::Frame(event.json.clone()), true) {
                    Offer::Evict => Offer::Evict,
                    _ => Offer::Sent,
                }
            }
            EventKind::Join { .. } | EventKind::Leave { .. } => {
                match self
                    .handle
                    .offer(Outbound::Frame(event.json.clone()), false)
                {
                    Offer::Sent => Offer::Sent,
                    _ => Offer::Evict,
                }
            }
        }
    }
}

pub fn message_event(room: &RoomName, epoch: &Epoch, m: StoredMessage) -> RoomEvent {
    RoomEvent {
        room: room.clone(),
        kind: EventKind::Message {
            epoch: epoch.clone(),
            offset: m.offset,
        },
        json: m.json,
    }
}
