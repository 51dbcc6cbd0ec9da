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

use std::collections::{HashMap, VecDeque};
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
    /// Epochs the store no longer has (it moved on, or went back and was renewed): their
    /// stragglers are dropped rather than taken for yet another epoch change. A few suffice.
    retired: VecDeque<Epoch>,
    /// Events held while a step runs; `Some` exactly while one is outstanding.
    held: Option<Vec<RoomEvent>>,
    /// Some held events were let go, or a resync was asked for meanwhile: read again after.
    again: bool,
    /// A member synced behind what this room delivered of the same epoch while a step ran:
    /// the store went back; renew once the step is done.
    renew_after: Option<(Epoch, Offset)>,
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
            retired: VecDeque::new(),
            held: None,
            again: false,
            renew_after: None,
        }
    }

    /// Whether a bus call it asked for is still outstanding.
    pub fn busy(&self) -> bool {
        self.held.is_some()
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

    /// The member's sync read finished: welcome, backlog, then what arrived meanwhile.
    pub fn synced(&mut self, session: SessionId, synced: Synced) -> Outcome<H> {
        let mut out = Outcome::default();
        let room = self.room.clone();
        if !self.members.contains_key(&session) {
            return out;
        }
        let floor = self.delivered_max(&synced.epoch);
        if synced.offset < floor {
            // The store's head is behind what this room already delivered of the epoch: it
            // went back, and will hand those offsets out again.
            let stale = synced.epoch.clone();
            if self.held.is_some() {
                self.renew_after = Some((stale, floor));
            } else {
                self.start(Step::Renew { stale, floor }, Vec::new(), &mut out);
            }
        }
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
            if let EventKind::Message { epoch, .. } = &event.kind {
                // Of an epoch the store left behind, older than the member's view: skipped.
                let current = self.seen.as_ref().is_some_and(|m| m.epoch == *epoch);
                if self.retired.contains(epoch)
                    || (!current && member.epoch.as_ref() != Some(epoch))
                {
                    continue;
                }
            }
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
        let head = match &replay {
            Replay::Recovered { head, .. } | Replay::NotRecovered { head } => head,
        };
        // An offset of this epoch beyond the store's head was delivered here (or is held
        // live): the store handed it out, then went back past it.
        let floor = self
            .delivered_max(&head.epoch)
            .max(self.held_max(&head.epoch));
        if floor > head.offset {
            return self.went_back(&head.epoch.clone(), floor);
        }
        match replay {
            Replay::Recovered { head, messages } => {
                if let Some(seen) = self.seen.as_ref().filter(|m| m.epoch == head.epoch) {
                    // The store must still hold what this room delivered of the epoch, as it
                    // was: else it went back, and its offsets from there are reused.
                    let replaced = seen.print.is_some_and(|print| {
                        messages
                            .iter()
                            .find(|m| m.offset == seen.offset)
                            .is_some_and(|m| fingerprint(&m.json) != print)
                    });
                    if replaced {
                        let floor = seen.offset;
                        return self.went_back(&read.epoch, floor);
                    }
                }
                let mut messages = messages.into_iter().peekable();
                if let Some(expect) = read.expect {
                    let first = messages.next_if(|m| m.offset == read.after + 1);
                    let kept = first.is_some_and(|m| fingerprint(&m.json) == expect);
                    if !kept {
                        // What this room delivered is gone or different: the store went back.
                        return self.went_back(&read.epoch, read.after + 1);
                    }
                }
                let newest = self
                    .seen
                    .as_ref()
                    .filter(|m| m.epoch == head.epoch)
                    .map_or(0, |m| m.offset);
                for m in messages.filter(|m| m.offset > newest) {
                    self.accept(message_event(&self.room, &head.epoch, m), &mut out);
                }
                if let Some(old) = self.seen.as_ref().filter(|m| m.epoch != head.epoch) {
                    // A new epoch with nothing stored yet: members learn of it now.
                    let old = old.epoch.clone();
                    self.retire(&old);
                    self.reset_members(&head.epoch, head.offset, &mut out);
                    self.seen = Some(Mark {
                        epoch: head.epoch,
                        offset: head.offset,
                        print: None,
                    });
                }
            }
            Replay::NotRecovered { head } if head.epoch == read.epoch => {
                self.gap(&head, &mut out);
            }
            Replay::NotRecovered { head } => {
                // The room has a new epoch (its history was lost or expired): read it from the
                // start, then tell members. The epoch asked for is gone for good.
                self.retire(&read.epoch);
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
        self.retire(stale);
        self.reset_members(&head.epoch, head.offset, &mut out);
        // Members that synced on the new epoch meanwhile may be behind its head: read it
        // from the lowest of them before going on.
        let low = self
            .members
            .values()
            .filter(|m| m.syncing.is_none() && m.epoch.as_ref() == Some(&head.epoch))
            .map(|m| m.delivered)
            .min()
            .map_or(head.offset, |low| low.min(head.offset));
        self.seen = Some(Mark {
            epoch: head.epoch.clone(),
            offset: low,
            print: None,
        });
        if low < head.offset {
            let read = Read {
                epoch: head.epoch,
                after: low,
                expect: None,
            };
            out.step = Some(Step::Read(read));
            return out;
        }
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
        if self.retired.contains(epoch) {
            return;
        }
        let Some(mark) = &self.seen else {
            self.accept(event, out);
            return;
        };
        if mark.epoch != *epoch {
            // Another epoch: the store says whether it is the current one (a straggler of an
            // older one must not move the room back), and the read brings its start.
            let read = Read {
                epoch: epoch.clone(),
                after: 0,
                expect: None,
            };
            self.start(Step::Read(read), vec![event], out);
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

    /// The newest offset of `epoch` this room or any synced member has had.
    fn delivered_max(&self, epoch: &Epoch) -> Offset {
        let seen = self
            .seen
            .as_ref()
            .filter(|m| m.epoch == *epoch)
            .map_or(0, |m| m.offset);
        self.members
            .values()
            .filter(|m| m.syncing.is_none() && m.epoch.as_ref() == Some(epoch))
            .map(|m| m.delivered)
            .fold(seen, Offset::max)
    }

    /// The newest offset of `epoch` among the events held during a step.
    fn held_max(&self, epoch: &Epoch) -> Offset {
        self.held
            .iter()
            .flatten()
            .filter_map(|e| match &e.kind {
                EventKind::Message { epoch: e, offset } if e == epoch => Some(*offset),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    fn retire(&mut self, epoch: &Epoch) {
        if !self.retired.contains(epoch) {
            if self.retired.len() == 4 {
                self.retired.pop_front();
            }
            self.retired.push_back(epoch.clone());
        }
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
        if let Some((stale, floor)) = self.renew_after.take() {
            if !self.retired.contains(&stale) {
                out.step = Some(Step::Renew { stale, floor });
                return;
            }
        }
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
        if let Some(old) = self.seen.as_ref().filter(|m| m.epoch != head.epoch) {
            let old = old.epoch.clone();
            self.retire(&old);
        }
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
            if let Some(old) = self.seen.as_ref().filter(|m| m.epoch != *epoch) {
                // The store moved on: tell members before the new epoch's first message.
                let old = old.epoch.clone();
                self.retire(&old);
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, HashMap};
    use std::rc::Rc;

    use proptest::prelude::*;

    use super::*;

    /// A member's socket as the test sees it: every frame offered, in order.
    #[derive(Clone, Default)]
    struct Socket(Rc<RefCell<Vec<Outbound>>>);

    impl Outlet for Socket {
        fn offer(&self, out: Outbound, _: bool) -> Offer {
            self.0.borrow_mut().push(out);
            Offer::Sent
        }
    }

    fn room() -> RoomName {
        RoomName::parse("r").unwrap()
    }

    /// The store side of the bus: one room, bounded history, epochs, and the faults.
    struct Store {
        epoch: Epoch,
        offset: Offset,
        messages: BTreeMap<Offset, ByteString>,
        size: usize,
        next_id: u64,
        epochs: u64,
    }

    impl Store {
        fn new(size: usize) -> Self {
            Self {
                epoch: Epoch::from_string("e0"),
                offset: 0,
                messages: BTreeMap::new(),
                size,
                next_id: 0,
                epochs: 0,
            }
        }

        fn head(&self) -> RoomHead {
            RoomHead {
                epoch: self.epoch.clone(),
                offset: self.offset,
            }
        }

        fn publish(&mut self) -> RoomEvent {
            self.offset += 1;
            self.next_id += 1;
            let json = ByteString::from(format!(
                r#"{{"type":"message","epoch":"{}","offset":{},"id":{}}}"#,
                self.epoch, self.offset, self.next_id
            ));
            self.messages.insert(self.offset, json.clone());
            while self.messages.len() > self.size {
                self.messages.pop_first();
            }
            RoomEvent {
                room: room(),
                kind: EventKind::Message {
                    epoch: self.epoch.clone(),
                    offset: self.offset,
                },
                json,
            }
        }

        fn new_epoch(&mut self) -> Epoch {
            self.epochs += 1;
            Epoch::from_string(&format!("e{}", self.epochs))
        }

        fn replay(&self, since: Offset, epoch: &Epoch) -> Replay {
            let oldest = self
                .messages
                .keys()
                .next()
                .copied()
                .unwrap_or(self.offset + 1);
            if *epoch != self.epoch || since > self.offset || since + 1 < oldest {
                return Replay::NotRecovered { head: self.head() };
            }
            let messages = self
                .messages
                .range(since + 1..)
                .map(|(o, j)| StoredMessage {
                    offset: *o,
                    json: j.clone(),
                })
                .collect();
            Replay::Recovered {
                head: self.head(),
                messages,
            }
        }

        fn renew(&mut self, stale: &Epoch, floor: Offset) -> RoomHead {
            if self.epoch == *stale {
                self.epoch = self.new_epoch();
                self.offset = self.offset.max(floor);
            }
            self.head()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A message is published; the live event arrives, is lost, or arrives twice.
        Publish(u8),
        Join,
        Sync,
        Leave(usize),
        Resync,
        /// The outstanding bus call answers (or fails).
        Answer(bool),
        /// Redis restarted empty: a new epoch from offset 1.
        Lose,
        /// The store went back to an older state of the same epoch.
        GoBack(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u8..10).prop_map(Op::Publish),
            2 => Just(Op::Join),
            2 => Just(Op::Sync),
            1 => (0usize..8).prop_map(Op::Leave),
            1 => Just(Op::Resync),
            4 => any::<bool>().prop_map(Op::Answer),
            1 => Just(Op::Lose),
            1 => (1u8..6).prop_map(Op::GoBack),
        ]
    }

    struct World {
        store: Store,
        seq: Sequencer<Socket>,
        sockets: HashMap<SessionId, Socket>,
        unsynced: Vec<SessionId>,
        next_session: SessionId,
        step: Option<Step>,
    }

    impl World {
        fn new(size: usize) -> Self {
            Self {
                store: Store::new(size),
                seq: Sequencer::new(room(), 1 << 20),
                sockets: HashMap::new(),
                unsynced: Vec::new(),
                next_session: 1,
                step: None,
            }
        }

        fn take(&mut self, out: Outcome<Socket>) {
            for closed in out.closed {
                closed.handle.0.borrow_mut().push(Outbound::Close {
                    code: closed.code,
                    reason: closed.reason,
                });
            }
            if let Some(step) = out.step {
                assert!(self.step.is_none(), "two bus calls outstanding");
                self.step = Some(step);
            }
        }

        fn answer(&mut self, ok: bool) {
            let Some(step) = self.step.take() else { return };
            let out = match step {
                Step::Read(read) => {
                    let replay = ok.then(|| self.store.replay(read.after, &read.epoch));
                    self.seq.read_done(&read, replay)
                }
                Step::Renew { stale, floor } => {
                    let head = ok.then(|| self.store.renew(&stale, floor));
                    self.seq.renewed(&stale, floor, head)
                }
            };
            self.take(out);
        }

        fn apply(&mut self, op: Op) {
            match op {
                Op::Publish(fate) => {
                    let event = self.store.publish();
                    let times = match fate {
                        0 => 0,
                        1 => 2,
                        _ => 1,
                    };
                    for _ in 0..times {
                        let out = self.seq.on_event(event.clone());
                        self.take(out);
                    }
                }
                Op::Join => {
                    let id = self.next_session;
                    self.next_session += 1;
                    let socket = Socket::default();
                    self.seq
                        .add(id, UserId::parse("u").unwrap(), socket.clone());
                    self.sockets.insert(id, socket);
                    self.unsynced.push(id);
                }
                Op::Sync => {
                    if self.unsynced.is_empty() {
                        return;
                    }
                    let id = self.unsynced.remove(0);
                    let head = self.store.head();
                    let synced = Synced {
                        epoch: head.epoch,
                        offset: head.offset,
                        recovered: None,
                        frames: Vec::new(),
                        delivered: head.offset,
                    };
                    let out = self.seq.synced(id, synced);
                    self.take(out);
                }
                Op::Leave(i) => {
                    let mut ids: Vec<_> = self.sockets.keys().copied().collect();
                    ids.sort();
                    if let Some(id) = ids.get(i) {
                        self.seq.remove(*id);
                        self.sockets.remove(id);
                        self.unsynced.retain(|s| s != id);
                    }
                }
                Op::Resync => {
                    let out = self.seq.resync();
                    self.take(out);
                }
                Op::Answer(ok) => self.answer(ok),
                Op::Lose => {
                    self.store.epoch = self.store.new_epoch();
                    self.store.offset = 0;
                    self.store.messages.clear();
                }
                Op::GoBack(n) => {
                    let back = self.store.offset.saturating_sub(u64::from(n));
                    self.store.offset = back;
                    self.store.messages.retain(|o, _| *o <= back);
                }
            }
        }

        /// Lets the bus answer everything, then asks for one more resync: what a room does
        /// after a reconnect.
        fn settle(&mut self) {
            for _ in 0..2 {
                let mut guard = 0;
                while self.step.is_some() {
                    self.answer(true);
                    guard += 1;
                    assert!(guard < 100, "the sequencer never settles");
                }
                let out = self.seq.resync();
                self.take(out);
            }
            while self.step.is_some() {
                self.answer(true);
            }
        }
    }

    fn field<'a>(json: &'a str, key: &str) -> &'a str {
        let at = json.find(&format!(r#""{key}":"#)).unwrap() + key.len() + 3;
        let rest = &json[at..];
        let end = rest.find([',', '}']).unwrap();
        rest[..end].trim_matches('"')
    }

    /// What one member was told, checked frame by frame: a contiguous run of offsets per
    /// epoch, each offset meaning one message everywhere; returns where it ended, or `None`
    /// when it was closed.
    fn check_member(
        frames: &[Outbound],
        meaning: &mut HashMap<(String, u64), String>,
    ) -> Option<(String, u64)> {
        let mut at: Option<(String, u64)> = None;
        for frame in frames {
            match frame {
                Outbound::Welcome { epoch, offset, .. } => {
                    assert!(at.is_none(), "a second welcome");
                    at = Some((epoch.to_string(), *offset));
                }
                Outbound::Close { code, .. } => {
                    assert_eq!(*code, CLOSE_SLOW_CONSUMER);
                    return None;
                }
                Outbound::Frame(json) => {
                    let (epoch, cursor) = at.as_mut().expect("a frame before the welcome");
                    match field(json, "type") {
                        "reset" => {
                            *epoch = field(json, "epoch").to_owned();
                            *cursor = field(json, "offset").parse().unwrap();
                        }
                        "message" => {
                            let offset: u64 = field(json, "offset").parse().unwrap();
                            assert_eq!(field(json, "epoch"), epoch, "a message of another epoch");
                            assert_eq!(offset, *cursor + 1, "not the next offset: {json}");
                            *cursor = offset;
                            let id = field(json, "id").to_owned();
                            let seen = meaning.entry((epoch.clone(), offset)).or_insert(id.clone());
                            assert_eq!(*seen, id, "offset {offset} of {epoch} reused");
                        }
                        other => panic!("unexpected frame {other}"),
                    }
                }
            }
        }
        at
    }

    fn run(ops: Vec<Op>, size: usize) {
        let mut world = World::new(size);
        for op in ops {
            world.apply(op);
        }
        world.settle();
        let mut meaning = HashMap::new();
        for (id, socket) in &world.sockets {
            let frames = socket.0.borrow();
            let end = check_member(&frames, &mut meaning);
            if world.unsynced.contains(id) {
                continue;
            }
            if let Some((epoch, cursor)) = end {
                let head = world.store.head();
                // A member may not have heard of a new epoch that has no message yet.
                if head.offset > 0 || epoch == head.epoch.as_str() {
                    assert_eq!(
                        (epoch.as_str(), cursor),
                        (head.epoch.as_str(), head.offset),
                        "member {id} was left behind"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_member_sees_contiguous_offsets_per_epoch_or_is_told(
            ops in proptest::collection::vec(op(), 1..120),
            size in 3usize..40,
        ) {
            run(ops, size);
        }
    }

    #[test]
    fn a_hole_is_read_from_history_before_newer_messages() {
        use Op::*;
        run(
            vec![
                Join,
                Sync,
                Publish(5),
                Publish(0),
                Publish(0),
                Publish(5),
                Answer(true),
            ],
            10,
        );
    }

    #[test]
    fn a_hole_older_than_history_closes_members_behind_and_the_room_goes_on() {
        let mut world = World::new(3);
        for op in [Op::Join, Op::Sync, Op::Publish(5)] {
            world.apply(op);
        }
        for _ in 0..10 {
            world.apply(Op::Publish(0));
        }
        world.apply(Op::Publish(5));
        assert!(matches!(world.step, Some(Step::Read(_))));
        world.answer(true);
        let first = world.sockets[&1].0.borrow().last().cloned();
        assert!(matches!(first, Some(Outbound::Close { code: 4008, .. })));
        // A member that joins later gets live messages again.
        for op in [Op::Join, Op::Sync, Op::Publish(5), Op::Publish(5)] {
            world.apply(op);
        }
        let later = world.sockets[&2].0.borrow();
        let messages = later
            .iter()
            .filter(|f| matches!(f, Outbound::Frame(j) if j.contains("message")))
            .count();
        assert_eq!(messages, 2);
    }

    #[test]
    fn a_store_that_went_back_moves_the_room_to_a_new_epoch_with_a_reset() {
        let mut world = World::new(100);
        for op in [Op::Join, Op::Sync] {
            world.apply(op);
        }
        for _ in 0..10 {
            world.apply(Op::Publish(5));
        }
        world.apply(Op::GoBack(3));
        // Offsets 8, 9 and 10 are given out again: the members must not drop them silently.
        for _ in 0..3 {
            world.apply(Op::Publish(5));
        }
        assert!(matches!(world.step, Some(Step::Renew { .. })));
        world.settle();
        world.apply(Op::Publish(5));
        let frames = world.sockets[&1].0.borrow();
        let reset = frames
            .iter()
            .position(|f| matches!(f, Outbound::Frame(j) if j.contains("reset")))
            .expect("a reset");
        let after: Vec<_> = frames[reset..].iter().collect();
        assert!(after.len() >= 2, "live delivery goes on after the reset");
        check_member(&frames, &mut HashMap::new());
    }

    #[test]
    fn a_new_epoch_with_its_start_trimmed_resets_members_at_its_head() {
        let mut world = World::new(3);
        for op in [Op::Join, Op::Sync, Op::Publish(5), Op::Lose] {
            world.apply(op);
        }
        for _ in 0..6 {
            world.apply(Op::Publish(0));
        }
        world.apply(Op::Publish(5));
        world.settle();
        let frames = world.sockets[&1].0.borrow();
        assert!(frames
            .iter()
            .any(|f| matches!(f, Outbound::Frame(j) if j.contains("reset"))));
        assert_eq!(check_member(&frames, &mut HashMap::new()).unwrap().1, 7);
    }
}
