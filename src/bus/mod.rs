//! The bus contract: where a room's messages are ordered, stored and spread.
//!
//! A replica never delivers a client's message straight to its local members. It hands the
//! message to the bus, which assigns the room's next offset, stores it in the room's history,
//! and publishes it; every replica (this one included) gets it back as a [`RoomEvent`] through
//! the [`EventSink`] it gave the bus, and only then pushes it to sessions. So every replica
//! delivers a room in the same order, and nothing is delivered that was not stored.
//!
//! Promises every implementation keeps (docs/PROTOCOL.md §9, §10, §12):
//! - offsets of a room start at 1 within an epoch and grow by 1 per message, with no gaps;
//! - a message is stored before [`Bus::publish`] resolves (so an ack means "stored");
//! - publishes are stored in the order `publish` was called, not the order their futures are
//!   polled: one connection's messages get offsets in the order it sent them
//!   (docs/PROTOCOL.md §10). The same holds for `join` and `leave`, which the hub calls in the
//!   order sessions came and went;
//! - history keeps at least the last `history.size` messages of a room; a room idle for
//!   `history.ttl_secs` (or whose history was lost) starts a new epoch with offsets from 1;
//! - a repeated `ref` from the same user in the same room within [`REF_TTL`] resolves to the
//!   first publish's offset and is not published again;
//! - presence is per user: `join`/`leave` events mark a user's first and last connection;
//! - presence is versioned per room: every change that is published as a `join`/`leave`
//!   moves the room's [`PresenceVersion`] on by exactly one and its event carries the version
//!   it produced, and a [`PresenceSnapshot`] carries the version it was read at. So a
//!   snapshot at `v` followed by the events after `v`, in order, is the room's set; a version
//!   that jumps means events were missed. A room's versions never go back, also when its
//!   presence keys expire or are lost (they start again above any earlier one).
//!
//! Events may reach a room twice or with a hole (a reconnect, a full mailbox), and a store may
//! come back older than what was delivered (a failover to a lagging replica); rooms drop
//! repeats by offset, fill holes from [`Bus::replay`] and move a room that went back to a new
//! epoch with [`Bus::renew_epoch`] (see `actors::sequencer`), so the contract above is enough.

pub mod bridge;
pub mod memory;
pub mod metered;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use futures_util::future::BoxFuture;

use crate::domain::{Epoch, Offset, RoomName, UserId};

/// How long a message `ref` is remembered for safe retries.
pub const REF_TTL: Duration = Duration::from_secs(300);

/// What a bus call resolves to.
pub type BusFuture<T> = BoxFuture<'static, Result<T, BusError>>;

/// Why a bus call failed. Clients see `unavailable` or `internal`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("the message bus is unavailable: {0}")]
    Unavailable(String),
    #[error("message bus error: {0}")]
    Internal(String),
}

impl BusError {
    /// The `error` frame's code a client is told.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        match self {
            Self::Unavailable(_) => crate::protocol::ErrorCode::Unavailable,
            Self::Internal(_) => crate::protocol::ErrorCode::Internal,
        }
    }

    /// The `error` frame that tells a client of this failure, about `room`.
    pub fn frame(&self, reference: Option<&str>, room: &RoomName) -> ByteString {
        crate::protocol::ServerFrame::Error {
            code: self.code(),
            message: &self.to_string(),
            reference,
            room: Some(room),
        }
        .to_text()
    }
}

/// A chat message to be stored and published.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub user: UserId,
    /// Display name shown with the message (from the sender's token).
    pub name: Option<Arc<str>>,
    pub text: String,
    pub reference: Option<String>,
}

/// Where a published message landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub epoch: Epoch,
    pub offset: Offset,
    /// True when the `ref` was seen before and nothing new was published.
    pub duplicate: bool,
}

/// The current state of a room's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomHead {
    pub epoch: Epoch,
    /// Latest offset, 0 when the epoch has no message yet.
    pub offset: Offset,
}

/// What [`Bus::renew_epoch`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    /// The room's head afterwards.
    pub head: RoomHead,
    /// True when this call started the epoch (else another replica already had).
    pub created: bool,
}

/// A stored `message` frame, serialized once when it was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub offset: Offset,
    pub json: ByteString,
}

/// The answer to a resume request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// The stored messages after `since`, oldest first, up to `head` or the read's limit.
    Recovered {
        head: RoomHead,
        messages: Vec<StoredMessage>,
    },
    /// `since` is outside history or the epoch changed: no partial replay is offered.
    NotRecovered { head: RoomHead },
}

/// One page of history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub epoch: Epoch,
    /// Oldest first.
    pub messages: Vec<StoredMessage>,
}

/// What happened in a room, as the bus delivers it to the replica's rooms.
#[derive(Debug, Clone)]
pub struct RoomEvent {
    pub room: RoomName,
    pub kind: EventKind,
    /// The server frame, serialized once for every member on every replica.
    pub json: ByteString,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Message {
        epoch: Epoch,
        offset: Offset,
    },
    /// `version`: the room's presence version this change produced.
    Join {
        user: UserId,
        version: PresenceVersion,
    },
    Leave {
        user: UserId,
        version: PresenceVersion,
    },
    Typing {
        user: UserId,
    },
}

/// One join or leave of this replica's, for [`Bus::presence_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub user: UserId,
    /// `true` for a join (the user's first connection here), `false` for a leave (its last).
    pub joined: bool,
}

/// A room's presence version (see the module doc): one more per published join or leave.
pub type PresenceVersion = u64;

/// The users present in a room, read in one step with the version they are the set of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresenceSnapshot {
    /// Sorted.
    pub users: Vec<UserId>,
    pub version: PresenceVersion,
    /// Users the bus still counts (their `leave` is yet to come) but leaves out of `users`:
    /// held only by replicas whose lease ran out and that were not reaped yet. Their `leave`
    /// events are not for a client given this snapshot.
    pub hidden: Vec<UserId>,
}

/// Held by each room until its catch-up after a resubscribe is done; the receiving side sees
/// the channel close when every room has dropped its clone.
pub type CatchUpDone = tokio::sync::mpsc::Sender<()>;

/// Receives the events of every room; given to the bus at construction.
pub trait EventSink: Send + Sync + 'static {
    /// Called in room order; must not block.
    fn deliver(&self, event: RoomEvent);

    /// Whether this replica has the room: lets a bus drop other rooms' events before it
    /// parses them.
    fn has_room(&self, room: &str) -> bool;

    /// Events may have been missed (a resubscribe, a lagging receiver): every room reads
    /// history from the newest offset it saw. Each room holds a clone of `done` until its
    /// catch-up has finished, so the caller learns when all have (the channel closes).
    fn resync_all(&self, done: Option<CatchUpDone>);

    /// The bus reconnected and is ready again: record this replica's presence again (Redis
    /// may have restarted empty) and retry the leaves that failed meanwhile.
    fn reassert_presence(&self);
}

/// The seam between rooms and the transport that connects replicas.
pub trait Bus: Send + Sync + 'static {
    /// Stores the message under the room's next offset, then publishes it. The work is
    /// started by this call, so calls are stored in call order.
    fn publish(&self, room: &RoomName, msg: NewMessage) -> BusFuture<Published>;

    /// Publishes a run of one room's messages in order, exactly as `publish` would one after
    /// another (offsets in order, each acked for itself), returning one future per message.
    /// A bus may store the run in one round trip: the Redis bus makes one script call of it.
    fn publish_run(&self, room: &RoomName, msgs: Vec<NewMessage>) -> Vec<BusFuture<Published>> {
        msgs.into_iter()
            .map(|msg| self.publish(room, msg))
            .collect()
    }

    /// Relays a typing signal; not stored.
    fn typing(&self, room: &RoomName, user: &UserId) -> BusFuture<()>;

    /// The room's epoch and latest offset (creating the epoch if the room is new).
    fn head(&self, room: &RoomName) -> BusFuture<RoomHead>;

    /// Messages after `since` if `epoch` is current and `since` still inside history: the
    /// oldest `limit` of them (all when 0), so a long resume is read page by page (the
    /// caller asks again after the last offset it got until it reaches the head). An epoch
    /// started by [`Self::renew_epoch`] holds only what came after its start: older entries
    /// are the retired epoch's messages and are never replayed under the new one.
    fn replay(
        &self,
        room: &RoomName,
        since: Offset,
        epoch: &Epoch,
        limit: usize,
    ) -> BusFuture<Replay>;

    /// The store went back in time (a lagging replica promoted, a backup restored): if the
    /// room is still on `stale`, moves it to a new epoch whose offsets continue after
    /// `floor` (and after anything stored since), so no offset a client saw is reused within
    /// an epoch. Returns the room's head, which a racing replica may already have renewed.
    fn renew_epoch(&self, room: &RoomName, stale: &Epoch, floor: Offset) -> BusFuture<Renewed>;

    /// Up to `limit` latest messages with offsets below `before` (all, when `None`).
    fn history(
        &self,
        room: &RoomName,
        before: Option<Offset>,
        limit: usize,
    ) -> BusFuture<HistoryPage>;

    /// This replica now holds a connection of `user` in `room` (its first here).
    fn join(&self, room: &RoomName, user: &UserId) -> BusFuture<()>;

    /// This replica no longer holds any connection of `user` in `room`.
    fn leave(&self, room: &RoomName, user: &UserId) -> BusFuture<()>;

    /// Records a run of one room's joins and leaves in order, exactly as `join` and `leave`
    /// would one after another (each published with its own version), resolving once all
    /// are recorded. The work is started by this call, like theirs. Each change is
    /// idempotent, so a run that failed may be sent again whole. A bus may record the run in
    /// one round trip: the Redis bus makes one script call of it (a reconnect storm brings
    /// hundreds of joins to a room at once).
    fn presence_changes(&self, room: &RoomName, changes: Vec<PresenceChange>) -> BusFuture<()> {
        let calls: Vec<BusFuture<()>> = changes
            .iter()
            .map(|c| match c.joined {
                true => self.join(room, &c.user),
                false => self.leave(room, &c.user),
            })
            .collect();
        Box::pin(async move {
            for call in calls {
                call.await?;
            }
            Ok(())
        })
    }

    /// Users present in the room on every replica, sorted.
    fn presence(&self, room: &RoomName) -> BusFuture<Vec<UserId>> {
        let snapshot = self.presence_snapshot(room);
        Box::pin(async move { snapshot.await.map(|s| s.users) })
    }

    /// The room's presence with the version it was read at.
    fn presence_snapshot(&self, room: &RoomName) -> BusFuture<PresenceSnapshot>;

    /// `Ok` while the bus can take publishes; else why not (for `/readyz`).
    fn readiness(&self) -> Result<(), String>;
}

/// Shared handle to the bus chosen at start-up.
pub type SharedBus = Arc<dyn Bus>;
