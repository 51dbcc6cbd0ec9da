//! The `Hub`: this replica's directory of rooms. It creates a room actor when the first
//! session joins (placing rooms round-robin over arbiters, so rooms do not all share one
//! thread), forwards joins and leaves, and stops a room when its last local session leaves.
//!
//! Bus events do not pass through the hub: the bus looks rooms up in the shared
//! [`RoomDirectory`] and sends straight to the room actor.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;

use super::member::MemberHandle;
use super::room::{Event, Join, Leave, Resync, Room};
use crate::bus::{EventSink, RoomEvent, SharedBus};
use crate::domain::{RoomName, SessionId};

/// Close code for sessions closed by a draining replica.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Rooms with local members, as the bus sees them. Written by the hub only.
#[derive(Clone, Default)]
pub struct RoomDirectory(Arc<RwLock<HashMap<RoomName, Addr<Room>>>>);

impl RoomDirectory {
    fn insert(&self, room: RoomName, addr: Addr<Room>) {
        if let Ok(mut map) = self.0.write() {
            map.insert(room, addr);
        }
    }

    fn remove(&self, room: &RoomName) {
        if let Ok(mut map) = self.0.write() {
            map.remove(room);
        }
    }
}

impl EventSink for RoomDirectory {
    fn deliver(&self, event: RoomEvent) {
        let Ok(map) = self.0.read() else { return };
        // A room with no local members has no actor: the event is dropped here, cheaply.
        let Some(addr) = map.get(&event.room) else {
            return;
        };
        if let Err(e) = addr.try_send(Event(event)) {
            // The room reads the hole from history when the next message arrives.
            let room = &e.into_inner().0.room;
            log::warn!("room={room} is lagging or gone; an event was dropped");
        }
    }

    fn has_room(&self, room: &str) -> bool {
        self.0.read().is_ok_and(|map| map.contains_key(room))
    }

    fn resync_all(&self) {
        let Ok(map) = self.0.read() else { return };
        for addr in map.values() {
            // Rare (a reconnect), one per room, and must not be lost: not bounded.
            addr.do_send(Resync);
        }
    }
}

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

/// Start-up → hub: close every session with 1001, in batches spread over `grace`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain {
    pub grace: Duration,
}

/// Anyone → hub: how many sessions are attached.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct SessionCount;

struct RoomEntry {
    addr: Addr<Room>,
    sessions: usize,
}

pub struct Hub {
    bus: SharedBus,
    directory: RoomDirectory,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    queue_limit: usize,
    rooms: HashMap<RoomName, RoomEntry>,
    sessions: HashMap<SessionId, MemberHandle>,
}

impl Hub {
    pub fn new(
        bus: SharedBus,
        directory: RoomDirectory,
        arbiters: Vec<ArbiterHandle>,
        queue_limit: usize,
    ) -> Self {
        Self {
            bus,
            directory,
            arbiters,
            next_arbiter: 0,
            queue_limit,
            rooms: HashMap::new(),
            sessions: HashMap::new(),
        }
    }

    /// The room's entry, starting its actor on the next arbiter if it has none.
    fn room(&mut self, name: &RoomName) -> &mut RoomEntry {
        let Self {
            bus,
            directory,
            arbiters,
            next_arbiter,
            queue_limit,
            rooms,
            ..
        } = self;
        rooms.entry(name.clone()).or_insert_with(|| {
            let room = Room::new(name.clone(), Arc::clone(bus), *queue_limit);
            let addr = if arbiters.is_empty() {
                room.start()
            } else {
                let arbiter = &arbiters[*next_arbiter % arbiters.len()];
                *next_arbiter = next_arbiter.wrapping_add(1);
                Room::start_in_arbiter(arbiter, |_| room)
            };
            directory.insert(name.clone(), addr.clone());
            RoomEntry { addr, sessions: 0 }
        })
    }
}

impl Actor for Hub {
    type Context = Context<Self>;
}

impl Handler<Connect> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Self::Context) {
        self.sessions
            .insert(msg.join.session, msg.join.member.clone());
        let entry = self.room(&msg.room);
        entry.sessions += 1;
        entry.addr.do_send(msg.join);
    }
}

impl Handler<Disconnect> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Self::Context) {
        self.sessions.remove(&msg.session);
        let Some(entry) = self.rooms.get_mut(&msg.room) else {
            return;
        };
        entry.addr.do_send(Leave {
            session: msg.session,
        });
        entry.sessions = entry.sessions.saturating_sub(1);
        if entry.sessions == 0 {
            // The room stops once it has handled the leave and no address remains.
            self.rooms.remove(&msg.room);
            self.directory.remove(&msg.room);
            log::debug!("room={} has no local members; reaped", msg.room);
        }
    }
}

impl Handler<SessionCount> for Hub {
    type Result = usize;

    fn handle(&mut self, _: SessionCount, _: &mut Self::Context) -> usize {
        self.sessions.len()
    }
}

impl Handler<Drain> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Drain, ctx: &mut Self::Context) {
        // Spread the closes over most of the grace period so reconnecting clients do not
        // stampede the other replicas; the rest is left for the close handshakes.
        const TICK: Duration = Duration::from_millis(100);
        let total = self.sessions.len();
        let ticks = ((msg.grace.as_millis() * 8 / 10) / TICK.as_millis()).max(1) as usize;
        let per_tick = total.div_ceil(ticks).max(1);
        log::info!(
            "draining {total} sessions in batches of {per_tick} over {:?}",
            msg.grace
        );
        let mut queue: Vec<MemberHandle> = self.sessions.values().cloned().collect();
        // Once the queue is empty the ticks do nothing; the process exits soon after.
        ctx.run_interval(TICK, move |_, _| {
            let split = queue.len().saturating_sub(per_tick);
            for member in queue.drain(split..) {
                member.close(CLOSE_GOING_AWAY, "server shutting down");
            }
        });
    }
}
