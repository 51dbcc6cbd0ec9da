//! The `Hub`: this replica's directory of rooms. It creates a room actor when the first
//! session joins (placing rooms round-robin over arbiters, so rooms do not all share one
//! thread), forwards joins and leaves, and stops a room when its last local session leaves.
//!
//! It also owns this replica's presence towards the bus: it sees every connect and
//! disconnect of the replica in order and sends `join`/`leave` in that order, so a client that
//! reconnects at once cannot have its new join recorded before its old leave (which a room
//! actor being reaped could not promise). A room's joins and leaves queue in order and go to
//! the bus as runs, one run per room on the way at a time ([`PresenceQueue`]): a reconnect
//! storm brings hundreds of joins to a room at once, and one script call records those that
//! gathered while the previous run was answered. A run that fails is sent again (the changes
//! are idempotent) for `redis.join_retry_ms`; leaves the bus still could not take are kept
//! here and retried after the bus reconnects, when every local user's join is also
//! re-recorded.
//!
//! Bus events do not pass through the hub: the bus looks rooms up in the shared
//! [`RoomDirectory`] and sends straight to the room actor.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use parking_lot::RwLock;

use super::member::MemberHandle;
use super::member::QueueLimits;
use super::room::{
    EventsQueued, Join, Leave, PresenceAsked, RefreshPresence, Resync, Room, RoomQueue,
    RoomSettings,
};
use super::socket::CLOSE_GRACE;
use crate::bus::{BusError, CatchUpDone, EventSink, PresenceChange, RoomEvent, SharedBus};
use crate::close::Close;
use crate::domain::{RoomName, SessionId, UserId};
use crate::logctx;
use crate::metrics::Metrics;
use crate::trim::Trimmer;

/// Pause before a failed run of presence changes is sent again: a bus that refuses at once
/// (not ready) is not asked in a tight loop.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A room actor as the directory knows it.
#[derive(Clone)]
struct RoomSlot {
    addr: Addr<Room>,
    /// Its events, and whether a [`Resync`] is on its way to it.
    queue: Arc<RoomQueue>,
}

/// Rooms with local members, as the bus sees them. Written by the hub only.
#[derive(Clone, Default)]
pub struct RoomDirectory {
    rooms: Arc<RwLock<HashMap<RoomName, RoomSlot>>>,
    /// Told when the bus reconnected, to re-record presence; set once the hub runs.
    hub: Arc<OnceLock<Recipient<Reassert>>>,
}

impl RoomDirectory {
    fn insert(&self, room: RoomName, slot: RoomSlot) {
        self.rooms.write().insert(room, slot);
    }

    fn remove(&self, room: &RoomName) {
        self.rooms.write().remove(room);
    }
}

impl EventSink for RoomDirectory {
    fn deliver(&self, event: RoomEvent) {
        let map = self.rooms.read();
        // A room with no local members has no actor: the event is dropped here, cheaply.
        let Some(slot) = map.get(&event.room) else {
            return;
        };
        match slot.queue.push(event) {
            Ok(true) => slot.addr.do_send(EventsQueued),
            Ok(false) => {}
            Err(event) => {
                let room = &event.room;
                log::warn!(
                    "{} is lagging; an event was dropped and is read from history",
                    logctx::room(&room)
                );
                // Catch up now, not when the next message shows the hole: a quiet room would hold
                // its last messages back. One resync covers a burst of drops.
                if !slot.queue.resync_asked.swap(true, Ordering::AcqRel) {
                    slot.addr.do_send(Resync { done: None });
                }
            }
        }
    }

    fn has_room(&self, room: &str) -> bool {
        self.rooms.read().contains_key(room)
    }

    fn resync_all(&self, done: Option<CatchUpDone>) {
        let map = self.rooms.read();
        for slot in map.values() {
            // Rare (a reconnect), one per room, and must not be lost: not bounded.
            slot.queue.resync_asked.store(true, Ordering::Release);
            slot.addr.do_send(Resync { done: done.clone() });
        }
    }

    fn reassert_presence(&self) {
        if let Some(hub) = self.hub.get() {
            hub.do_send(Reassert);
        }
    }
}

/// Bus → hub: the bus reconnected (Redis may have restarted empty): record every local
/// user's join again and retry the leaves that failed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reassert;

/// Session → hub: attach me to a room (the hub passes `join` on to the room actor).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub room: RoomName,
    pub join: Join,
}

/// Session → hub: I am gone (sent exactly once, from the session's `stopping`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub room: RoomName,
    pub session: SessionId,
}

/// Session → hub: a connection with no path room (on `/ws`, or on `/ws/{room}` once it left
/// that room), to be closed by a drain even while it is in no room. Other connections are
/// known by their path room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub session: SessionId,
    pub member: MemberHandle,
}

/// Session → hub: the connection of a [`Register`] ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub session: SessionId,
}

/// Session → hub: the client asked for the room's presence (`{"type":"presence"}`); the
/// room answers through the session's inbox.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AskPresence {
    pub room: RoomName,
    pub session: SessionId,
}

/// Start-up → hub: close every session with 1001, in batches spread over `grace`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain {
    pub grace: Duration,
}

/// Anyone → hub: how many room memberships (subscriptions) are attached, plus the `/ws`
/// connections registered: none left means no client to drain.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct SessionCount;

struct RoomEntry {
    addr: Addr<Room>,
    sessions: usize,
    /// Local connections per user, for presence.
    users: HashMap<UserId, usize>,
    /// Joins not passed to the room yet: a presence change of the room is still queued, and
    /// the joining session's presence is read only after its own join went to the bus.
    held: Vec<Join>,
}

/// A room's joins and leaves on their way to the bus, in the order sessions came and went.
#[derive(Default)]
struct PresenceQueue {
    /// Not sent yet.
    waiting: Vec<PresenceChange>,
    /// A run is on the bus (or waits to be sent again); `waiting` goes when it is answered.
    sending: bool,
    /// When the run now on the bus first failed: it is sent again until
    /// `redis.join_retry_ms` after that.
    failing_since: Option<Instant>,
}

pub struct Hub {
    bus: SharedBus,
    directory: RoomDirectory,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    limits: QueueLimits,
    /// For the rooms it creates.
    room_settings: RoomSettings,
    rooms: HashMap<RoomName, RoomEntry>,
    /// Room memberships: one per session on `/ws/{room}`, one per subscription on `/ws`.
    sessions: HashMap<SessionId, (UserId, MemberHandle)>,
    /// Connections on `/ws`, for the drain (see [`Register`]).
    connections: HashMap<SessionId, MemberHandle>,
    /// Leaves the bus could not record (it was down); retried after it reconnects.
    unrecorded_leaves: HashSet<(RoomName, UserId)>,
    /// Joins and leaves per room not yet recorded by the bus.
    presence: HashMap<RoomName, PresenceQueue>,
    /// Set by [`Drain`]: a session that was admitted just before the drain began (its upgrade
    /// passed the check before the replica turned not-ready) and attaches now is closed too.
    draining: bool,
    /// Gives freed heap back after many sessions ended.
    trimmer: Trimmer,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(
        bus: SharedBus,
        directory: RoomDirectory,
        arbiters: Vec<ArbiterHandle>,
        limits: QueueLimits,
        room_settings: RoomSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            room_settings,
            presence: HashMap::new(),
            metrics,
            bus,
            directory,
            arbiters,
            next_arbiter: 0,
            limits,
            rooms: HashMap::new(),
            sessions: HashMap::new(),
            connections: HashMap::new(),
            // Closed sockets linger up to `CLOSE_GRACE` (socket.rs) before their memory is free.
            trimmer: Trimmer::new(CLOSE_GRACE + Duration::from_secs(1)),
            unrecorded_leaves: HashSet::new(),
            draining: false,
        }
    }

    /// Records a user's first local connection to a room: queued behind the room's changes
    /// before it, and sent at once when none is on the bus. Joins to the room are held until
    /// it was sent, so the joining session's presence read comes after it.
    fn record_join(&mut self, room: &RoomName, user: &UserId, ctx: &mut Context<Self>) {
        self.unrecorded_leaves.remove(&(room.clone(), user.clone()));
        self.queue_change(room, user, true, ctx);
    }

    /// Records a user's last local connection leaving; kept for a retry after the bus
    /// reconnects if it cannot be recorded, so no ghost stays in presence after an outage.
    fn record_leave(&mut self, room: &RoomName, user: &UserId, ctx: &mut Context<Self>) {
        self.queue_change(room, user, false, ctx);
    }

    fn queue_change(
        &mut self,
        room: &RoomName,
        user: &UserId,
        joined: bool,
        ctx: &mut Context<Self>,
    ) {
        let queue = self.presence.entry(room.clone()).or_default();
        queue.waiting.push(PresenceChange {
            user: user.clone(),
            joined,
        });
        self.send_presence(room, ctx);
    }

    /// Sends the room's waiting changes as one run, unless a run is already on the bus;
    /// then passes on the joins that waited for them.
    fn send_presence(&mut self, room: &RoomName, ctx: &mut Context<Self>) {
        let Some(queue) = self.presence.get_mut(room) else {
            return;
        };
        if queue.sending || queue.waiting.is_empty() {
            return;
        }
        queue.sending = true;
        let run = std::mem::take(&mut queue.waiting);
        // Sent now: whatever the room reads for the joins below reaches the bus after it.
        let call = self.bus.presence_changes(room, run.clone());
        if let Some(entry) = self.rooms.get_mut(room) {
            // Taken, not drained: a storm's worth of capacity is not kept by every room.
            for join in std::mem::take(&mut entry.held) {
                entry.addr.do_send(join);
            }
        }
        let room = room.clone();
        ctx.spawn(call.into_actor(self).map(move |result, hub, ctx| {
            hub.presence_answered(room, run, result, ctx);
        }));
    }

    fn presence_answered(
        &mut self,
        room: RoomName,
        run: Vec<PresenceChange>,
        result: Result<(), BusError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(queue) = self.presence.get_mut(&room) else {
            return;
        };
        let Err(e) = result else {
            queue.sending = false;
            queue.failing_since = None;
            if queue.waiting.is_empty() {
                self.presence.remove(&room);
            } else {
                self.send_presence(&room, ctx);
            }
            return;
        };
        let since = *queue.failing_since.get_or_insert_with(Instant::now);
        // The rooms' setup reads are retried as long: a session waits for both.
        if since.elapsed() < self.room_settings.retry_within {
            // Idempotent changes: the whole run goes again, ahead of what queued meanwhile.
            log::debug!(
                "{} {} presence changes not recorded yet: {e}; retrying",
                logctx::room(&room),
                run.len()
            );
            let later = std::mem::take(&mut queue.waiting);
            queue.waiting = run;
            queue.waiting.extend(later);
            ctx.run_later(RETRY_PAUSE, move |hub, ctx| {
                if let Some(queue) = hub.presence.get_mut(&room) {
                    queue.sending = false;
                }
                hub.send_presence(&room, ctx);
            });
            return;
        }
        queue.sending = false;
        queue.failing_since = None;
        for change in run {
            let user = change.user;
            if change.joined {
                log::warn!(
                    "{} cannot record that {user} joined: {e}; retrying after reconnect",
                    logctx::room(&room)
                );
                continue;
            }
            log::warn!(
                "{} cannot record that {user} left: {e}; retrying after reconnect",
                logctx::room(&room)
            );
            let back = self
                .rooms
                .get(&room)
                .is_some_and(|entry| entry.users.contains_key(&user));
            if !back {
                self.unrecorded_leaves.insert((room.clone(), user));
            }
        }
        if self
            .presence
            .get(&room)
            .is_some_and(|q| q.waiting.is_empty())
        {
            self.presence.remove(&room);
        }
        self.send_presence(&room, ctx);
    }

    /// The room's entry, starting its actor on the next arbiter if it has none.
    fn room(&mut self, name: &RoomName) -> &mut RoomEntry {
        let Self {
            bus,
            directory,
            arbiters,
            next_arbiter,
            limits,
            room_settings,
            rooms,
            metrics,
            ..
        } = self;
        rooms.entry(name.clone()).or_insert_with(|| {
            let queue = Arc::new(RoomQueue::default());
            let room = Room::new(
                name.clone(),
                Arc::clone(bus),
                limits.frames,
                *room_settings,
                Arc::clone(&queue),
                Arc::clone(metrics),
            );
            let addr = if arbiters.is_empty() {
                room.start()
            } else {
                let arbiter = &arbiters[*next_arbiter % arbiters.len()];
                *next_arbiter = next_arbiter.wrapping_add(1);
                Room::start_in_arbiter(arbiter, |_| room)
            };
            let slot = RoomSlot {
                addr: addr.clone(),
                queue,
            };
            directory.insert(name.clone(), slot);
            RoomEntry {
                addr,
                sessions: 0,
                users: HashMap::new(),
                held: Vec::new(),
            }
        })
    }
}

impl Actor for Hub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let _ = self.directory.hub.set(ctx.address().recipient());
    }
}

impl Handler<Connect> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Connect, ctx: &mut Self::Context) {
        if self.draining {
            // Not attached, so no join is recorded; the session sends its Disconnect anyway.
            msg.join.member.close(Close::ShuttingDown);
            return;
        }
        let user = msg.join.user.clone();
        self.sessions
            .insert(msg.join.session, (user.clone(), msg.join.member.clone()));
        self.trimmer.sessions(self.sessions.len());
        let entry = self.room(&msg.room);
        entry.sessions += 1;
        let count = entry.users.entry(user.clone()).or_insert(0);
        *count += 1;
        let first = *count == 1;
        if first {
            self.record_join(&msg.room, &user, ctx);
        }
        let waiting = self
            .presence
            .get(&msg.room)
            .is_some_and(|q| !q.waiting.is_empty());
        if let Some(entry) = self.rooms.get_mut(&msg.room) {
            // Behind a change still queued (its own join, or one before it), or behind
            // joins already held: passed on in order once that change was sent.
            if waiting || !entry.held.is_empty() {
                entry.held.push(msg.join);
            } else {
                entry.addr.do_send(msg.join);
            }
        }
    }
}

impl Handler<Disconnect> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Self::Context) {
        let Some((user, _)) = self.sessions.remove(&msg.session) else {
            return;
        };
        if self.trimmer.sessions(self.sessions.len()) {
            log::info!(
                "{} sessions left of a peak twice that or more: giving freed memory back",
                self.sessions.len()
            );
        }
        let Some(entry) = self.rooms.get_mut(&msg.room) else {
            return;
        };
        // A join still held never reached the room: it must not reach it after this leave.
        entry.held.retain(|join| join.session != msg.session);
        entry.addr.do_send(Leave {
            session: msg.session,
        });
        entry.sessions = entry.sessions.saturating_sub(1);
        let last = match entry.users.get_mut(&user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                entry.users.remove(&user);
                true
            }
        };
        let empty = entry.sessions == 0;
        if last {
            self.record_leave(&msg.room, &user, ctx);
        }
        if empty {
            // The room stops once it has handled the leave and no address remains.
            self.rooms.remove(&msg.room);
            self.directory.remove(&msg.room);
            log::debug!("{} has no local members; reaped", logctx::room(&msg.room));
        }
    }
}

impl Handler<AskPresence> for Hub {
    type Result = ();

    fn handle(&mut self, msg: AskPresence, _: &mut Self::Context) {
        // A session not attached (it is leaving) has nobody to answer.
        if let Some(entry) = self.rooms.get(&msg.room) {
            entry.addr.do_send(PresenceAsked {
                session: msg.session,
            });
        }
    }
}

impl Handler<Reassert> for Hub {
    type Result = ();

    fn handle(&mut self, _: Reassert, ctx: &mut Self::Context) {
        for (room, user) in std::mem::take(&mut self.unrecorded_leaves) {
            let back = self
                .rooms
                .get(&room)
                .is_some_and(|entry| entry.users.contains_key(&user));
            if !back {
                self.record_leave(&room, &user, ctx);
            }
        }
        // A join already recorded is a no-op on the bus.
        let joins: Vec<(RoomName, UserId)> = self
            .rooms
            .iter()
            .flat_map(|(room, entry)| entry.users.keys().map(move |u| (room.clone(), u.clone())))
            .collect();
        for (room, user) in joins {
            self.record_join(&room, &user, ctx);
        }
        // The joins above are on their way to the bus or queued behind a run that is; a
        // refresh read before one of them lands is followed by its event (versions keep the
        // members' sets right either way).
        for entry in self.rooms.values() {
            entry.addr.do_send(RefreshPresence);
        }
    }
}

impl Handler<SessionCount> for Hub {
    type Result = usize;

    fn handle(&mut self, _: SessionCount, _: &mut Self::Context) -> usize {
        self.sessions.len() + self.connections.len()
    }
}

impl Handler<Register> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Register, _: &mut Self::Context) {
        if self.draining {
            return msg.member.close(Close::ShuttingDown);
        }
        self.connections.insert(msg.session, msg.member);
    }
}

impl Handler<Unregister> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _: &mut Self::Context) {
        self.connections.remove(&msg.session);
    }
}

impl Handler<Drain> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Drain, ctx: &mut Self::Context) {
        self.draining = true;
        // Spread the closes over most of the grace period so reconnecting clients do not
        // stampede the other replicas; the rest is left for the close handshakes.
        const TICK: Duration = Duration::from_millis(100);
        let total = self.sessions.len() + self.connections.len();
        let ticks = ((msg.grace.as_millis() * 8 / 10) / TICK.as_millis()).max(1) as usize;
        let per_tick = total.div_ceil(ticks).max(1);
        log::info!(
            "draining {total} sessions in batches of {per_tick} over {:?}",
            msg.grace
        );
        // A connection in several rooms is in the queue once per room: closing it twice is
        // a no-op.
        let mut queue: Vec<MemberHandle> = self
            .sessions
            .values()
            .map(|(_, m)| m)
            .chain(self.connections.values())
            .cloned()
            .collect();
        // Once the queue is empty the ticks do nothing; the process exits soon after.
        ctx.run_interval(TICK, move |_, _| {
            let split = queue.len().saturating_sub(per_tick);
            for member in queue.drain(split..) {
                member.close(Close::ShuttingDown);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::member::{InboxReader, Outbound};
    use crate::bus::memory::MemoryBus;

    /// A session joining the lobby; its inbox stands in for the session, read by the test.
    fn join(session: SessionId, inbox: &InboxReader) -> Connect {
        Connect {
            room: RoomName::parse("lobby").unwrap(),
            join: Join {
                session,
                user: UserId::parse(&format!("u{session}")).unwrap(),
                member: inbox.handle(1),
                resume: None,
                history: 0,
            },
        }
    }

    /// Reads what arrived and keeps it in `seen`.
    fn read(inbox: &mut InboxReader, seen: &mut Vec<Outbound>) {
        seen.extend(std::iter::from_fn(|| {
            inbox
                .next(futures_util::task::noop_waker_ref())
                .map(|(_, out)| out)
        }));
    }

    fn closed_with(seen: &[Outbound]) -> Option<Close> {
        seen.iter().find_map(|o| match o {
            Outbound::Close(why) => Some(*why),
            _ => None,
        })
    }

    #[actix_web::test]
    async fn a_session_that_attaches_after_the_drain_began_is_closed_too() {
        let directory = RoomDirectory::default();
        let bus: SharedBus = Arc::new(MemoryBus::new(
            100,
            Duration::from_secs(60),
            Arc::new(directory.clone()),
        ));
        let limits = QueueLimits {
            frames: 64,
            bytes: 1 << 20,
        };
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Hub::new(
            bus,
            directory,
            Vec::new(),
            limits,
            RoomSettings {
                announce_max: usize::MAX,
                resume_max: u64::MAX,
                retry_within: Duration::from_secs(5),
            },
            metrics,
        )
        .start();
        let (mut before, mut before_seen) = (InboxReader::new(limits), Vec::new());
        hub.send(join(1, &before)).await.unwrap();
        assert_eq!(hub.send(SessionCount).await.unwrap(), 1);

        hub.send(Drain {
            grace: Duration::from_millis(200),
        })
        .await
        .unwrap();
        // Admitted just before the drain (its upgrade was checked before), attached after.
        let (mut late, mut late_seen) = (InboxReader::new(limits), Vec::new());
        hub.send(join(2, &late)).await.unwrap();
        assert_eq!(
            hub.send(SessionCount).await.unwrap(),
            1,
            "the late session is not attached"
        );

        let end = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            read(&mut before, &mut before_seen);
            read(&mut late, &mut late_seen);
            let closed = closed_with(&before_seen).is_some() && closed_with(&late_seen).is_some();
            if closed || std::time::Instant::now() > end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(closed_with(&before_seen), Some(Close::ShuttingDown));
        // Its inbox is closing, so nothing but this close could reach it anyway; that it is
        // not attached is the `SessionCount` above.
        assert_eq!(closed_with(&late_seen), Some(Close::ShuttingDown));
    }
}
