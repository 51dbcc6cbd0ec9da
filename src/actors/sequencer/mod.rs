//! A room's delivery state on one replica, as a plain state machine with no actix in it.
//!
//! The [`Room`](super::room::Room) actor feeds it what happens (bus events, members joining,
//! history reads finishing) and carries out what it asks for (read history, start a new epoch). It
//! keeps the room's promise to every member (docs/PROTOCOL.md §9): each member sees a contiguous
//! run of offsets per epoch, or is told — a `reset` frame when the room moves to another epoch,
//! close 4008 when what it missed is no longer in history.
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

mod presence;

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use bytestring::ByteString;

use crate::bus::{
    EventKind, PresenceSnapshot, Renewed, Replay, RoomEvent, RoomHead, StoredMessage,
};
use crate::close::Close;
use crate::domain::{Epoch, Offset, RoomName, SessionId, UserId};
use crate::logctx;
use crate::protocol::ServerFrame;

use super::outlet::Encoded;
pub use super::outlet::{Offer, Outbound, Outlet};

/// Most messages in one run ([`Sequencer::on_events`]); a quarter of a member's queue when that
/// is smaller.
const RUN_FRAMES: usize = 64;
/// Most bytes of frames in one run: a socket's backpressure threshold
/// ([`crate::actors::socket::HIGH_WATERMARK`]), so a member copies at most that much at once.
const RUN_BYTES: usize = 16 * 1024;

/// Room events held while history is read; past it they are let go and read again.
const HOLD_LIMIT: usize = 16 * 1024;

/// Join and leave events kept after they were fanned out, for members given a presence
/// snapshot that was read before them (a refresh answered late). Past it such a member
/// waits for the next refresh.
const RECENT_PRESENCE: usize = 256;

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
    /// The newest offset of `epoch` known to be stored when the read was issued (delivered
    /// here, or held as a live event): a head below it means the store went back. Only what
    /// was known before the read counts, since the store moves on while it runs.
    pub floor: Offset,
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

/// A member the sequencer let go of; the actor tells its session to close (the session then
/// leaves through the hub, which updates presence).
#[derive(Debug)]
pub struct Closed<H> {
    pub session: SessionId,
    pub user: UserId,
    pub handle: H,
    pub why: Close,
}

/// The next page of a resuming member's replay: `bus.replay(room, after, epoch, limit)`,
/// then [`Sequencer::page_done`]. Pages run beside the room's own step: they deliver to
/// their member only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub session: SessionId,
    pub epoch: Epoch,
    pub after: Offset,
}

/// What one call asks of the actor.
#[derive(Debug)]
pub struct Outcome<H> {
    pub closed: Vec<Closed<H>>,
    pub step: Option<Step>,
    /// Pages to read for resuming members.
    pub pages: Vec<Page>,
    /// Resuming members whose queue is too full for their next page: the actor asks their
    /// outlet to wake the room when it has drained ([`Sequencer::drained`]).
    pub watch: Vec<SessionId>,
}

impl<H> Default for Outcome<H> {
    fn default() -> Self {
        Self {
            closed: Vec::new(),
            step: None,
            pages: Vec::new(),
            watch: Vec::new(),
        }
    }
}

/// What the sequencer did since the actor last asked ([`Sequencer::take_stats`]): plain
/// numbers the actor adds to the replica's metrics once per call, so counting costs no lock
/// or atomic per delivered frame and this module stays free of any metrics library.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Message frames the room's fan-out handed to members, live or from a catch-up read
    /// (not the backlog a joining member is sent with its welcome).
    pub delivered: u64,
    /// Typing frames skipped because a member's queue was half full.
    pub typing_dropped: u64,
    /// Members closed with 4008 because their queue was full.
    pub evicted: u64,
    /// Messages taken from history reads rather than live events.
    pub replayed: u64,
    /// Holes no longer in history (members behind were closed).
    pub gaps: u64,
    /// Times the room moved to a new epoch.
    pub epoch_resets: u64,
    /// Members that missed a join or leave (told nothing more until a fresh presence).
    pub presence_gaps: u64,
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
    /// The resume's replay goes on after `delivered`, page by page, as the member's queue
    /// drains; `tail` (the presence frame) is sent once it has caught up.
    pub more: bool,
    pub tail: Vec<ByteString>,
}

struct Member<H> {
    user: UserId,
    handle: H,
    /// Set from the join until the welcome. Boxed: a member needs it only while its welcome
    /// and backlog are read, and every member of every room carries the field (a
    /// subscription's memory, docs/PERFORMANCE.md "Many rooms on one connection").
    syncing: Option<Box<Syncing>>,
    epoch: Option<Epoch>,
    delivered: Offset,
    /// The presence set the member was given, so joins and leaves keep it right.
    presence: presence::Cursor,
    /// Set while the member's resume is read page by page (see [`Paging`]).
    /// Boxed: most members never page, and every member of every room carries the field.
    paging: Option<Box<Paging>>,
}

/// What a member holds between its join and its welcome.
struct Syncing {
    /// Events that arrived meanwhile, delivered after the welcome and backlog.
    held: Vec<RoomEvent>,
    /// What the room knew to be stored when the member joined (before its head was read):
    /// a welcome head below it means the store went back.
    known_at_join: Option<(Epoch, Offset)>,
}

/// A resuming member that is still reading its replay. Live messages are not held for it:
/// they are in the store, and it pages on until it reaches what the room delivered, then
/// goes live. Joins and leaves (not stored) are held, at most `hold_per_member`; typing is
/// dropped.
struct Paging {
    /// Sent once the member has caught up: the presence frame read with its welcome.
    tail: Vec<ByteString>,
    held: Vec<RoomEvent>,
    /// A page read is outstanding.
    reading: bool,
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
    /// The epoch this room's renewal started, with its first head: every later read of that
    /// epoch ran after it existed, so a head below that means the store went back again.
    created: Option<(Epoch, Offset)>,
    /// Join and leave frames go to members only while the room has at most this many of
    /// them: in a bigger room every arrival told to everyone costs N²/2 frames to fill it.
    announce_max: usize,
    /// A join or leave was not told because the room was big: its members' lists are stale
    /// until they ask, or until the room is small again and gets a fresh `presence`.
    presence_missed: bool,
    /// The latest join and leave events, oldest first (see [`RECENT_PRESENCE`]).
    recent_presence: VecDeque<RoomEvent>,
    stats: Stats,
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
            created: None,
            announce_max: usize::MAX,
            presence_missed: false,
            recent_presence: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Sets the room size above which join and leave frames are not sent.
    pub fn with_announce_limit(mut self, max: usize) -> Self {
        self.announce_max = max;
        self
    }

    /// True once when the room is small enough again after joins or leaves went untold:
    /// the actor then sends every member the room's presence.
    pub fn take_presence_stale(&mut self) -> bool {
        let stale = self.presence_missed && self.members.len() <= self.announce_max;
        if stale {
            self.presence_missed = false;
        }
        stale
    }

    /// What happened since the last call; the counts start again from zero.
    pub fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.stats)
    }

    /// Whether a bus call it asked for is still outstanding.
    pub fn busy(&self) -> bool {
        self.held.is_some()
    }

    /// A session joins; its events are held until [`Self::synced`].
    pub fn add(&mut self, session: SessionId, user: UserId, handle: H) {
        // The room's own mark, not every member's cursor: joining stays O(1) in a big room,
        // and a lower floor only means a later check, never a false one.
        let known_at_join = self
            .seen
            .as_ref()
            .map(|m| (m.epoch.clone(), m.offset.max(self.held_max(&m.epoch))));
        self.members.insert(
            session,
            Member {
                user,
                handle,
                syncing: Some(Box::new(Syncing {
                    held: Vec::new(),
                    known_at_join,
                })),
                epoch: None,
                delivered: 0,
                paging: None,
                presence: presence::Cursor::default(),
            },
        );
    }

    /// The outlet of a member, if it is still here.
    pub fn handle(&self, session: SessionId) -> Option<&H> {
        self.members.get(&session).map(|m| &m.handle)
    }

    /// A session left; returns its user and handle.
    pub fn remove(&mut self, session: SessionId) -> Option<(UserId, H)> {
        self.members.remove(&session).map(|m| (m.user, m.handle))
    }

    /// The presence snapshot a syncing member is sent with its welcome (its last frame of
    /// [`Synced::frames`]); call before [`Self::synced`]. Joins and leaves already in it are
    /// not told to the member.
    pub fn presence_read(&mut self, session: SessionId, snapshot: &PresenceSnapshot) {
        if let Some(member) = self.members.get_mut(&session) {
            member.presence.given(snapshot);
        }
    }

    /// The member's sync read finished: welcome, backlog, then what arrived meanwhile.
    pub fn synced(&mut self, session: SessionId, synced: Synced) -> Outcome<H> {
        let mut out = Outcome::default();
        let room = self.room.clone();
        let Some(member) = self.members.get(&session) else {
            return out;
        };
        let known_at_join = member
            .syncing
            .as_ref()
            .and_then(|s| s.known_at_join.as_ref());
        let floor = match known_at_join {
            Some((epoch, floor)) if *epoch == synced.epoch => *floor,
            _ => 0,
        }
        .max(self.created_base(&synced.epoch));
        // (On an epoch the room already left, the head is simply old: the member is brought to
        // where the room stands below.)
        if synced.offset < floor && !self.retired.contains(&synced.epoch) {
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
        if synced.more {
            member.paging = Some(Box::new(Paging {
                tail: synced.tail,
                held: Vec::new(),
                reading: false,
            }));
        }
        let welcome = Outbound::Welcome {
            epoch: synced.epoch,
            offset: synced.offset,
            recovered: synced.recovered,
        };
        let mut ok = member.handle.offer(welcome, false) == Offer::Sent;
        for frame in synced.frames {
            ok = ok && member.handle.offer(Outbound::Frame(frame), false) == Offer::Sent;
        }
        let held = member.syncing.take().map(|s| s.held).unwrap_or_default();
        for event in held {
            if let EventKind::Message { epoch, .. } = &event.kind {
                // Of an epoch the store left behind, older than the member's view: skipped.
                let current = self.seen.as_ref().is_some_and(|m| m.epoch == *epoch);
                if self.retired.contains(epoch)
                    || (!current && member.epoch.as_ref() != Some(epoch))
                {
                    continue;
                }
            }
            if let Some(paging) = member.paging.as_mut() {
                // A member that pages its replay reads these messages from the store, after
                // the pages before them (delivered now, they would jump its cursor: a gap);
                // presence changes wait until it is live, as they do while it pages.
                if matches!(event.kind, EventKind::Join { .. } | EventKind::Leave { .. }) {
                    paging.held.push(event);
                }
                continue;
            }
            ok = ok && member.deliver(&room, &event, &mut self.stats) == Offer::Sent;
        }
        if !ok {
            self.evict(session, &mut out);
        } else if self
            .members
            .get(&session)
            .is_some_and(|m| m.paging.is_some())
        {
            self.next_page(session, &mut out);
            return out;
        }
        self.note_presence_gaps();
        // Only this member changed: the others were brought up when the last step ended.
        self.catch_up_laggards(Some(session), &mut out);
        out
    }

    /// Asks for a resuming member's next page if its queue has room for one, else for a
    /// wake-up when it has drained.
    fn next_page(&mut self, session: SessionId, out: &mut Outcome<H>) {
        let Some(member) = self.members.get_mut(&session) else {
            return;
        };
        let (Some(paging), Some(epoch)) = (member.paging.as_mut(), member.epoch.clone()) else {
            return;
        };
        if paging.reading {
            return;
        }
        if member.handle.has_room() {
            paging.reading = true;
            out.pages.push(Page {
                session,
                epoch,
                after: member.delivered,
            });
        } else {
            out.watch.push(session);
        }
    }

    /// A resuming member's queue drained: its next page may go in.
    pub fn drained(&mut self, session: SessionId) -> Outcome<H> {
        let mut out = Outcome::default();
        self.next_page(session, &mut out);
        out
    }

    /// A page of a resuming member's replay was read (`None`: the bus failed; the actor
    /// retries the page later).
    pub fn page_done(&mut self, page: &Page, result: Option<Replay>) -> Outcome<H> {
        let mut out = Outcome::default();
        let session = page.session;
        let Some(member) = self.members.get_mut(&session) else {
            return out;
        };
        if member.paging.is_none() || member.epoch.as_ref() != Some(&page.epoch) {
            return out;
        }
        let Some(replay) = result else {
            out.pages.push(page.clone());
            return out;
        };
        let (head, messages) = match replay {
            Replay::Recovered { head, messages } if head.epoch == page.epoch => (head, messages),
            // The epoch moved on or the rest of the replay was trimmed while the member read
            // it: its resume now reports `recovered:false`.
            _ => {
                self.close(session, Close::MissedHistory, &mut out);
                return out;
            }
        };
        let empty = messages.is_empty();
        for m in messages {
            if m.offset <= member.delivered {
                continue;
            }
            if !member.handle.has_room() {
                // Big messages: the rest of the page is read again once the queue drained.
                break;
            }
            if m.offset != member.delivered + 1
                || member.handle.offer(Outbound::Frame(m.json), false) != Offer::Sent
            {
                // A hole in the store, or a queue the page did not fit after all.
                self.evict(session, &mut out);
                return out;
            }
            member.delivered = m.offset;
        }
        // Caught up once it has what the room delivered of the epoch (later events reach it
        // live); nothing more stored means the room is ahead of the store, which the room's
        // own reads sort out.
        let room_at = match &self.seen {
            Some(mark) if mark.epoch == page.epoch => mark.offset.max(head.offset),
            _ => head.offset,
        };
        if member.delivered >= room_at || empty {
            self.go_live(session, &mut out);
        } else {
            if let Some(paging) = member.paging.as_mut() {
                paging.reading = false;
            }
            self.next_page(session, &mut out);
        }
        out
    }

    /// A resuming member has read its replay: presence, what was held for it, then live.
    fn go_live(&mut self, session: SessionId, out: &mut Outcome<H>) {
        let room = self.room.clone();
        let Some(member) = self.members.get_mut(&session) else {
            return;
        };
        let Some(paging) = member.paging.take() else {
            return;
        };
        let mut ok = true;
        for frame in paging.tail {
            ok = ok && member.handle.offer(Outbound::Frame(frame), false) == Offer::Sent;
        }
        for event in paging.held {
            ok = ok && member.deliver(&room, &event, &mut self.stats) == Offer::Sent;
        }
        if !ok {
            return self.evict(session, out);
        }
        self.catch_up_laggards(Some(session), out);
    }

    /// Brings every synced member to where the room stands, once no step is outstanding:
    /// - a member on an epoch the store left behind (it read its head before the room moved
    ///   on) is told with a `reset` to the room's position;
    /// - a member on an epoch the room does not know (it read its head after the store moved
    ///   on) makes the room read that epoch, which then becomes the room's or is retired;
    /// - a member behind the room's newest offset with nothing held to fill the difference
    ///   (the room jumped to a head it did not read: a renewal, a reset) is brought up from
    ///   history: the room re-reads from the lowest such member.
    fn catch_up_laggards(&mut self, only: Option<SessionId>, out: &mut Outcome<H>) {
        if self.held.is_some() {
            return; // checked again when the step is done
        }
        let Some(seen) = self.seen.clone() else {
            return;
        };
        // Members on an epoch the store left behind are told where the room stands.
        let retired = &self.retired;
        let stale: Vec<SessionId> = self
            .synced_members(only)
            .filter(|(_, m)| m.epoch.as_ref().is_some_and(|e| retired.contains(e)))
            .map(|(id, _)| *id)
            .collect();
        self.reset(stale, &seen.epoch, seen.offset, out);
        let unknown = self
            .synced_members(only)
            .find_map(|(_, m)| m.epoch.clone().filter(|e| *e != seen.epoch));
        if let Some(epoch) = unknown {
            let read = Read {
                epoch,
                after: 0,
                floor: 0,
            };
            return self.start(Step::Read(read), Vec::new(), out);
        }
        let low = self
            .synced_members(only)
            .filter(|(_, m)| m.epoch.as_ref() == Some(&seen.epoch))
            .map(|(_, m)| m.delivered)
            .min()
            .unwrap_or(seen.offset);
        if low < seen.offset {
            self.seen = Some(Mark {
                epoch: seen.epoch.clone(),
                offset: low,
                print: None,
            });
            let read = Read {
                epoch: seen.epoch,
                after: low,
                floor: 0,
            };
            self.start(Step::Read(read), Vec::new(), out);
        }
    }

    /// The synced members, or just `only` (a join looks at its own member, not the whole
    /// room: filling a room stays O(N)).
    fn synced_members(
        &self,
        only: Option<SessionId>,
    ) -> Box<dyn Iterator<Item = (&SessionId, &Member<H>)> + '_> {
        let synced = |(_, m): &(&SessionId, &Member<H>)| m.syncing.is_none() && m.paging.is_none();
        match only {
            Some(s) => Box::new(self.members.get_key_value(&s).into_iter().filter(synced)),
            None => Box::new(self.members.iter().filter(synced)),
        }
    }

    /// A frame for every synced member that may be dropped under load (a presence refresh).
    pub fn broadcast(&mut self, json: ByteString) -> Outcome<H> {
        let mut out = Outcome::default();
        let evict: Vec<SessionId> = self
            .members
            .iter()
            .filter(|(_, m)| m.syncing.is_none() && m.paging.is_none())
            .filter(|(_, m)| m.handle.offer(Outbound::Frame(json.clone()), true) == Offer::Evict)
            .map(|(id, _)| *id)
            .collect();
        for id in evict {
            self.evict(id, &mut out);
        }
        out
    }

    /// The room's presence as the bus has it now (a refresh): sent to every synced member
    /// whose set is older or lost, followed by the joins and leaves that arrived since it was
    /// read; a member whose set is as new is sent nothing. Droppable, like typing: a member
    /// that does not get it is told no joins or leaves until the next one.
    pub fn presence_refresh(&mut self, snapshot: &PresenceSnapshot) -> Outcome<H> {
        let mut out = Outcome::default();
        let frame = ServerFrame::Presence {
            room: &self.room,
            users: &snapshot.users,
        }
        .to_text();
        // In a room over the limit members are told no joins or leaves, replayed or live.
        let tell = self.members.len() <= self.announce_max;
        let mut evict = Vec::new();
        for (id, member) in &mut self.members {
            if member.syncing.is_some() || !member.presence.behind(snapshot.version) {
                continue;
            }
            if let Some(paging) = member.paging.as_mut() {
                // Its list goes out once it has read its replay; the changes held for it
                // meanwhile are then told from this version on.
                paging.tail = vec![frame.clone()];
                member.presence.given(snapshot);
                continue;
            }
            match member.handle.offer(Outbound::Frame(frame.clone()), true) {
                Offer::Sent => member.presence.given(snapshot),
                Offer::Dropped => {
                    member.presence.lost();
                    continue;
                }
                Offer::Evict => {
                    evict.push(*id);
                    continue;
                }
            }
            let newer = self
                .recent_presence
                .iter()
                .filter(|e| tell && newer(e, snapshot));
            for event in newer {
                if member.deliver(&self.room, event, &mut self.stats) == Offer::Evict {
                    evict.push(*id);
                    break;
                }
            }
        }
        for id in evict {
            self.evict(id, &mut out);
        }
        self.note_presence_gaps();
        out
    }

    /// The answer to a member's `{"type":"presence"}`: the room's presence, then the joins
    /// and leaves that arrived since it was read, so the member's set goes on from there.
    pub fn presence_answer(
        &mut self,
        session: SessionId,
        snapshot: &PresenceSnapshot,
    ) -> Outcome<H> {
        let mut out = Outcome::default();
        let frame = ServerFrame::Presence {
            room: &self.room,
            users: &snapshot.users,
        }
        .to_text();
        let tell = self.members.len() <= self.announce_max;
        let Some(member) = self.members.get_mut(&session) else {
            return out;
        };
        if let Some(paging) = member.paging.as_mut() {
            // Answered once it has read its replay, in place of the older list it would get
            // then (sent now, that older list would follow it and undo it).
            paging.tail = vec![frame];
            member.presence.given(snapshot);
            return out;
        }
        let mut ok = member.handle.offer(Outbound::Frame(frame), false) == Offer::Sent;
        // A member still syncing is given its own snapshot when its welcome goes out.
        if member.syncing.is_none() {
            member.presence.given(snapshot);
            let newer = self
                .recent_presence
                .iter()
                .filter(|e| tell && newer(e, snapshot));
            for event in newer {
                ok = ok && member.deliver(&self.room, event, &mut self.stats) == Offer::Sent;
            }
        }
        if !ok {
            self.evict(session, &mut out);
        }
        self.note_presence_gaps();
        out
    }

    /// A frame for one member that answers its request (not droppable).
    pub fn answer(&mut self, session: SessionId, frame: ByteString) -> Outcome<H> {
        let mut out = Outcome::default();
        let sent = self
            .members
            .get(&session)
            .map(|m| m.handle.offer(Outbound::Frame(frame), false));
        if sent.is_some_and(|s| s != Offer::Sent) {
            self.evict(session, &mut out);
        }
        out
    }

    /// A member missed a join or leave: the actor refreshes presence once the room is small
    /// enough to tell them (see [`Self::take_presence_stale`]).
    fn note_presence_gaps(&mut self) {
        if self.stats.presence_gaps > 0 {
            self.presence_missed = true;
        }
    }

    /// A live event from the bus.
    pub fn on_event(&mut self, event: RoomEvent) -> Outcome<H> {
        let mut out = Outcome::default();
        self.event(event, &mut out);
        out
    }

    /// Live events from the bus that were queued together, in order. The same as one
    /// [`Self::on_event`] per event, only cheaper: a run of the room's next messages (one
    /// epoch, consecutive offsets, nothing outstanding) walks the members once and reaches
    /// each in one offer ([`Outlet::offer_run`]), not one walk and one offer per message.
    pub fn on_events(&mut self, events: impl IntoIterator<Item = RoomEvent>) -> Outcome<H> {
        let mut out = Outcome::default();
        let mut run: Vec<RoomEvent> = Vec::new();
        let mut bytes = 0;
        // A run goes to each member whole: capped, it leaves a caught-up member's queue room
        // many times over and stays under a socket's backpressure threshold, as one frame at a
        // time did (a stall of the room's thread must not turn into one run a queue refuses).
        let max_frames = (self.hold_per_member / 4).clamp(1, RUN_FRAMES);
        for event in events {
            let fits = run.len() < max_frames && bytes + event.json.len() <= RUN_BYTES;
            if !(fits && self.continues(&run, &event)) {
                self.accept_run(&mut run, &mut out);
                bytes = 0;
                if !self.continues(&run, &event) {
                    self.event(event, &mut out);
                    continue;
                }
            }
            bytes += event.json.len();
            run.push(event);
        }
        self.accept_run(&mut run, &mut out);
        out
    }

    /// Whether `event` is the message right after `run` (or, for an empty run, after what the
    /// room has seen) that [`Self::event`] would accept as it is: no step outstanding, the
    /// seen epoch, the next offset.
    fn continues(&self, run: &[RoomEvent], event: &RoomEvent) -> bool {
        let EventKind::Message { epoch, offset } = &event.kind else {
            return false;
        };
        let Some(mark) = self.seen.as_ref().filter(|_| self.held.is_none()) else {
            return false;
        };
        let after = match run.last().map(|e| &e.kind) {
            Some(EventKind::Message { offset, .. }) => *offset,
            _ => mark.offset,
        };
        mark.epoch == *epoch && *offset == after + 1 && !self.retired.contains(epoch)
    }

    /// Accepts a run of next messages (see [`Self::continues`]) and empties it.
    fn accept_run(&mut self, run: &mut Vec<RoomEvent>, out: &mut Outcome<H>) {
        if run.len() <= 1 {
            if let Some(event) = run.pop() {
                self.accept(event, out);
            }
            return;
        }
        if let Some(last) = run.last() {
            if let EventKind::Message { epoch, offset } = &last.kind {
                self.seen = Some(Mark {
                    epoch: epoch.clone(),
                    offset: *offset,
                    print: Some(fingerprint(&last.json)),
                });
            }
        }
        self.fan_out_run(run, out);
        run.clear();
    }

    /// [`Self::fan_out`] of a run of next messages, member by member. The run is encoded
    /// once, for every member that takes all of it; in a room of one (a publisher alone on
    /// its replica) that would only be a copy more.
    fn fan_out_run(&mut self, run: &[RoomEvent], out: &mut Outcome<H>) {
        // Encoded at the first member that takes the whole run (none may: all syncing, paging
        // or part-replayed).
        let encoded = std::cell::OnceCell::new();
        let shared = (self.members.len() > 1).then_some(&encoded);
        let mut evict = Vec::new();
        for (id, member) in &mut self.members {
            if let Some(syncing) = member.syncing.as_mut() {
                // One at a time, the message that finds its hold full evicts it.
                if syncing.held.len() + run.len() > self.hold_per_member {
                    evict.push(*id);
                } else {
                    syncing.held.extend(run.iter().cloned());
                }
                continue;
            }
            // A paging member reads messages from the store (see `fan_out`).
            if member.paging.is_some() {
                continue;
            }
            if member.deliver_run(&self.room, run, shared, &mut self.stats) == Offer::Evict {
                evict.push(*id);
            }
        }
        for id in evict {
            self.evict(id, out);
        }
        self.note_presence_gaps();
    }

    /// Events may have been missed (a resubscribe, a dropped event): read history from the
    /// newest offset delivered.
    pub fn resync(&mut self) -> Outcome<H> {
        let mut out = Outcome::default();
        if self.held.is_some() {
            self.again = true;
            return out;
        }
        if let Some(read) = self.resync_read() {
            self.start(Step::Read(read), Vec::new(), &mut out);
        }
        out
    }

    /// The read a resync needs: from the newest message delivered, or, in a room that saw
    /// none yet, from its members' cursors.
    fn resync_read(&self) -> Option<Read> {
        if let Some(mark) = &self.seen {
            return Some(read_from(mark));
        }
        self.members
            .values()
            .filter(|m| m.syncing.is_none() && m.paging.is_none())
            .filter_map(|m| m.epoch.clone().map(|e| (e, m.delivered)))
            .min_by_key(|(_, delivered)| *delivered)
            .map(|(epoch, after)| Read {
                epoch,
                after,
                floor: 0,
            })
    }

    /// The history read asked for by a [`Step::Read`] finished; `None` when the bus failed
    /// (the actor retries the same step later).
    pub fn read_done(&mut self, read: &Read, result: Option<Replay>) -> Outcome<H> {
        let mut out = Outcome::default();
        let Some(replay) = result else {
            out.step = Some(self.issue(Step::Read(read.clone())));
            return out;
        };
        let head = match &replay {
            Replay::Recovered { head, .. } | Replay::NotRecovered { head } => head,
        };
        // An offset of this epoch known to be stored before the read is beyond the store's
        // head: the store handed it out, then went back past it.
        let floor = read.floor.max(self.created_base(&read.epoch));
        if head.epoch == read.epoch && floor > head.offset {
            return self.went_back(&read.epoch, floor);
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
                let newest = self
                    .seen
                    .as_ref()
                    .filter(|m| m.epoch == head.epoch)
                    .map_or(0, |m| m.offset);
                for m in messages.into_iter().filter(|m| m.offset > newest) {
                    self.stats.replayed += 1;
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
                self.gap(&head, read.after, &mut out);
            }
            Replay::NotRecovered { head } => {
                // The room has a new epoch (its history was lost or expired): read it from the
                // start, then tell members. The epoch asked for is gone for good.
                self.retire(&read.epoch);
                let read = match self.seen.as_ref().filter(|m| m.epoch == head.epoch) {
                    // The room is on that epoch already (what it asked about was a straggler):
                    // go on from what it delivered, checking the store still holds it.
                    Some(mark) => read_from(mark),
                    None => Read {
                        epoch: head.epoch,
                        after: 0,
                        floor: 0,
                    },
                };
                out.step = Some(self.issue(Step::Read(read)));
                return out;
            }
        }
        self.release(&mut out);
        out
    }

    /// The bus moved the room to a new epoch after the store went back (`None`: it failed and
    /// the actor retries the step later).
    pub fn renewed(&mut self, stale: &Epoch, floor: Offset, done: Option<Renewed>) -> Outcome<H> {
        let mut out = Outcome::default();
        let Some(Renewed { head, created }) = done else {
            out.step = Some(Step::Renew {
                stale: stale.clone(),
                floor,
            });
            return out;
        };
        log::warn!(
            "{} the store went back in time (offset {floor} of epoch {stale} was lost \
             or replaced); new epoch {} from offset {}, members are told to reset",
            logctx::room(&self.room),
            head.epoch,
            head.offset
        );
        self.retire(stale);
        if created {
            self.created = Some((head.epoch.clone(), head.offset));
        }
        self.reset_members(&head.epoch, head.offset, &mut out);
        // A room already on that epoch (an older renewal was answered late) keeps its mark:
        // its check of the newest delivered message stays possible.
        if self.seen.as_ref().map_or(true, |m| m.epoch != head.epoch) {
            self.seen = Some(Mark {
                epoch: head.epoch,
                offset: head.offset,
                print: None,
            });
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
                floor: 0,
            };
            self.start(Step::Read(read), vec![event], out);
            return;
        }
        let (offset, last) = (*offset, mark.offset);
        if offset == last + 1 {
            self.accept(event, out);
        } else if offset > last + 1 {
            log::warn!(
                "{} missed offsets {}..{}; reading them from history",
                logctx::room(&self.room),
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
            self.stats.epoch_resets += 1;
            if self.retired.len() == 4 {
                self.retired.pop_front();
            }
            self.retired.push_back(epoch.clone());
        }
    }

    /// Starts a step, holding `held` and whatever arrives until it finishes.
    fn start(&mut self, step: Step, held: Vec<RoomEvent>, out: &mut Outcome<H>) {
        self.held = Some(held);
        out.step = Some(self.issue(step));
    }

    /// A step as it is handed to the actor, which issues it at once: a read records what is
    /// known to be stored of its epoch at this moment.
    fn issue(&self, step: Step) -> Step {
        match step {
            Step::Read(mut read) => {
                read.floor = read.floor.max(self.known(&read.epoch));
                Step::Read(read)
            }
            renew => renew,
        }
    }

    /// The first head of `epoch` if this room's renewal started it, else 0.
    fn created_base(&self, epoch: &Epoch) -> Offset {
        match &self.created {
            Some((e, base)) if e == epoch => *base,
            _ => 0,
        }
    }

    /// The newest offset of `epoch` known to be stored: delivered here or held live.
    fn known(&self, epoch: &Epoch) -> Offset {
        self.delivered_max(epoch).max(self.held_max(epoch))
    }

    /// Asks for a new epoch continuing after everything of `stale` any client may have seen.
    fn went_back(&mut self, stale: &Epoch, floor: Offset) -> Outcome<H> {
        Outcome {
            step: Some(Step::Renew {
                stale: stale.clone(),
                floor: floor.max(self.known(stale)),
            }),
            ..Outcome::default()
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
        if std::mem::take(&mut self.again) {
            // A resync was asked for while the step ran (a reconnect: the store may have
            // changed under it), or held events were let go: read again before the held
            // events go out, so the read is checked against them too.
            if let Some(read) = self.resync_read() {
                out.step = Some(self.issue(Step::Read(read)));
                return;
            }
        }
        let held = self.held.take().unwrap_or_default();
        for event in held {
            // If one of these starts another step, the rest are held for it, in order.
            self.event(event, out);
        }
        self.catch_up_laggards(None, out);
    }

    /// The hole is no longer in history: members that would have a gap are closed, the room
    /// goes on from the store's head. Members still on an older epoch (the room's history was
    /// lost, and the new epoch's start is trimmed too) are told with a `reset` at the head.
    ///
    /// Only members that need what the read found missing are closed: those at or behind
    /// `after` (the store no longer holds `after + 1`, nor anything before it). A member
    /// further on (it joined after the hole, its welcome promised a newer offset) may need
    /// only what is still stored: it is left behind the head and brought up by the next read
    /// ([`Self::catch_up_laggards`]), which closes it in turn if that is gone too.
    fn gap(&mut self, head: &RoomHead, after: Offset, out: &mut Outcome<H>) {
        self.stats.gaps += 1;
        if let Some(old) = self.seen.as_ref().filter(|m| m.epoch != head.epoch) {
            let old = old.epoch.clone();
            self.retire(&old);
        }
        self.reset_members(&head.epoch, head.offset, out);
        log::warn!(
            "{} missed messages after offset {after} are no longer in history; members \
             at or behind it are closed with 4008 and the room goes on",
            logctx::room(&self.room)
        );
        let behind: Vec<SessionId> = self
            .members
            .iter()
            .filter(|(_, m)| m.syncing.is_none() && m.paging.is_none())
            .filter(|(_, m)| {
                m.epoch.as_ref() == Some(&head.epoch)
                    && m.delivered < head.offset
                    && m.delivered <= after
            })
            .map(|(id, _)| *id)
            .collect();
        for id in behind {
            self.close(id, Close::MissedHistory, out);
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
        let others: Vec<SessionId> = self
            .members
            .iter()
            .filter(|(_, m)| m.syncing.is_none() && m.paging.is_none())
            .filter(|(_, m)| m.epoch.as_ref() != Some(epoch))
            .map(|(id, _)| *id)
            .collect();
        self.reset(others, epoch, offset, out);
    }

    /// Sends these members one `reset` frame (serialized once) and moves their cursors there.
    fn reset(&mut self, ids: Vec<SessionId>, epoch: &Epoch, offset: Offset, out: &mut Outcome<H>) {
        if ids.is_empty() {
            return;
        }
        let frame = ServerFrame::Reset {
            room: &self.room,
            epoch,
            offset,
        }
        .to_text();
        for id in ids {
            let Some(m) = self.members.get_mut(&id) else {
                continue;
            };
            m.epoch = Some(epoch.clone());
            m.delivered = offset;
            if m.handle.offer(Outbound::Frame(frame.clone()), false) != Offer::Sent {
                self.evict(id, out);
            }
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
        let presence_change =
            matches!(event.kind, EventKind::Join { .. } | EventKind::Leave { .. });
        if presence_change {
            if self.recent_presence.len() == RECENT_PRESENCE {
                self.recent_presence.pop_front();
            }
            self.recent_presence.push_back(event.clone());
        }
        if presence_change && self.members.len() > self.announce_max {
            // Members' sets stay where they are: the next change told is a jump for them,
            // and they are told nothing until the room is small again and refreshes them.
            self.presence_missed = true;
            return;
        }
        let mut evict = Vec::new();
        for (id, member) in &mut self.members {
            if let EventKind::Typing { user } = &event.kind {
                // A user is not told of their own typing (nor of their own arrival, below).
                if *user == member.user {
                    continue;
                }
            }
            if let Some(syncing) = member.syncing.as_mut() {
                let held = &mut syncing.held;
                if held.len() >= self.hold_per_member {
                    evict.push(*id);
                } else {
                    held.push(event.clone());
                }
                continue;
            }
            if let Some(paging) = member.paging.as_mut() {
                // Messages it reads from the store, however far the room moves on meanwhile:
                // a paging member costs a cursor and at most a page, not a queue of what went
                // by. One that reads slower than the room grows falls out of the store's
                // window, and its next page finds the gap (4008); one that reads nothing is
                // dropped by its socket's stall timeout. (Counting live messages that went by
                // while its queue was full closed clients that read at full speed, when the
                // room was busy right as they joined.) Typing may go; presence changes wait.
                if matches!(event.kind, EventKind::Join { .. } | EventKind::Leave { .. }) {
                    if paging.held.len() >= self.hold_per_member {
                        evict.push(*id);
                    } else {
                        paging.held.push(event.clone());
                    }
                }
                continue;
            }
            if member.deliver(&self.room, event, &mut self.stats) == Offer::Evict {
                evict.push(*id);
            }
        }
        for id in evict {
            self.evict(id, out);
        }
        self.note_presence_gaps();
    }

    /// Closes a slow consumer (4008), counted apart from the gaps' closes. A member whose
    /// session already stopped is only dropped: its leave is on the way, and it was not slow.
    fn evict(&mut self, session: SessionId, out: &mut Outcome<H>) {
        match self.members.get(&session) {
            Some(m) if m.handle.gone() => {
                self.members.remove(&session);
                return;
            }
            Some(_) => self.stats.evicted += 1,
            None => {}
        }
        self.close(session, Close::SlowConsumer, out);
    }

    fn close(&mut self, session: SessionId, why: Close, out: &mut Outcome<H>) {
        if let Some(m) = self.members.remove(&session) {
            out.closed.push(Closed {
                session,
                user: m.user,
                handle: m.handle,
                why,
            });
        }
    }
}

/// The read that fills a hole after `mark`. It starts one message early when the marked
/// message's bytes are known, so [`Sequencer::read_done`] can check the store still holds it
/// as it was delivered.
fn read_from(mark: &Mark) -> Read {
    let early = u64::from(mark.print.is_some() && mark.offset > 0);
    Read {
        epoch: mark.epoch.clone(),
        after: mark.offset - early,
        floor: 0,
    }
}

impl<H: Outlet> Member<H> {
    /// [`Self::deliver`] of a run of next messages (`encoded`: the run encoded, if it is
    /// shared): what this member has not had yet goes to its outlet in one offer. A member
    /// on another epoch (a reset first) or behind the run (a hole) takes them one at a time.
    fn deliver_run(
        &mut self,
        room: &RoomName,
        run: &[RoomEvent],
        encoded: Option<&std::cell::OnceCell<Encoded>>,
        stats: &mut Stats,
    ) -> Offer {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Offer::Sent;
        };
        let (
            EventKind::Message {
                epoch,
                offset: from,
            },
            EventKind::Message { offset: to, .. },
        ) = (&first.kind, &last.kind)
        else {
            return Offer::Sent;
        };
        if self.epoch.as_ref() != Some(epoch) || *from > self.delivered + 1 {
            for event in run {
                if self.deliver(room, event, stats) == Offer::Evict {
                    return Offer::Evict;
                }
            }
            return Offer::Sent;
        }
        // Offsets up to `delivered` came with a replay already.
        let had = usize::try_from(self.delivered + 1 - from).unwrap_or(usize::MAX);
        let fresh = run.get(had..).unwrap_or_default();
        if fresh.is_empty() {
            return Offer::Sent;
        }
        self.delivered = self.delivered.max(*to);
        let (sent, offer) = match encoded.filter(|_| had == 0) {
            Some(encoded) => {
                let encoded = encoded.get_or_init(|| Encoded::texts(run.iter().map(|e| &e.json)));
                match self.handle.offer(Outbound::Encoded(encoded.clone()), false) {
                    Offer::Sent => (run.len(), Offer::Sent),
                    refused => (0, refused),
                }
            }
            None => self.handle.offer_run(fresh.iter().map(|e| &e.json)),
        };
        stats.delivered += sent as u64;
        if offer == Offer::Sent {
            Offer::Sent
        } else {
            Offer::Evict
        }
    }

    fn deliver(&mut self, room: &RoomName, event: &RoomEvent, stats: &mut Stats) -> Offer {
        match &event.kind {
            EventKind::Message { epoch, offset } => {
                if self.epoch.as_ref() != Some(epoch) {
                    // The history this member knew is gone: say so before the new epoch's messages,
                    // so the client drops its saved offset (docs/PROTOCOL.md §5.6 `reset`).
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
                    Offer::Sent => {
                        stats.delivered += 1;
                        Offer::Sent
                    }
                    _ => Offer::Evict,
                }
            }
            EventKind::Typing { .. } => {
                match self.handle.offer(Outbound::Frame(event.json.clone()), true) {
                    Offer::Evict => Offer::Evict,
                    Offer::Dropped => {
                        stats.typing_dropped += 1;
                        Offer::Sent
                    }
                    Offer::Sent => Offer::Sent,
                }
            }
            EventKind::Join { user, .. } | EventKind::Leave { user, .. } => {
                match self.presence.admit(&event.kind) {
                    // A user is not told of their own arrival or departure (their presence
                    // says it), but it moves their set on all the same.
                    presence::Verdict::Tell if *user != self.user => {
                        match self
                            .handle
                            .offer(Outbound::Frame(event.json.clone()), false)
                        {
                            Offer::Sent => Offer::Sent,
                            _ => Offer::Evict,
                        }
                    }
                    presence::Verdict::Missed => {
                        stats.presence_gaps += 1;
                        Offer::Sent
                    }
                    _ => Offer::Sent,
                }
            }
        }
    }
}

/// Whether a join or leave event is newer than a presence snapshot.
fn newer(event: &RoomEvent, snapshot: &PresenceSnapshot) -> bool {
    match &event.kind {
        EventKind::Join { version, .. } | EventKind::Leave { version, .. } => {
            *version > snapshot.version
        }
        _ => false,
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
mod tests;
