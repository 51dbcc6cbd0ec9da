//! The embedded bus: the whole [`Bus`] contract inside one process, for a single
//! replica with no Redis. Replicas started this way do not see each other.
//!
//! One mutex guards all rooms. Events are handed to the sink while it is held, so the order in
//! which offsets are assigned is the order in which rooms receive them.
//!
//! With a store (`store.url` SQLite or PostgreSQL, see [`durable`]) publishes go through one
//! writer task instead: it takes everything queued since its last commit, assigns offsets,
//! commits the batch to the store in one transaction, and only then applies it here, delivers
//! it (under the mutex, in offset order) and acks it. The in-memory window is then a cache of
//! the store's newest messages; reads that reach past it are served from the store.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{ready, FutureExt};
use parking_lot::{Mutex, MutexGuard};

use super::{
    Bus, BusError, BusFuture, EventKind, EventSink, HistoryPage, NewMessage, PresenceSnapshot,
    PresenceVersion, Published, Renewed, Replay, RoomEvent, RoomHead, StoredMessage, REF_TTL,
};
use crate::domain::{now_ms, Epoch, Offset, RoomName, UserId};
use crate::logctx;
use crate::metrics::Metrics;
use crate::protocol::ServerFrame;
use crate::store::SharedStore;

mod durable;

/// Idle rooms are swept after this many bus operations, to bound memory without a timer.
const SWEEP_EVERY: u64 = 4096;
/// `history.empty_room_ttl_secs`' default, for buses built without settings (tests).
const DEFAULT_EMPTY_ROOM_TTL: Duration = Duration::from_secs(60);
/// Remembered refs per room before expired ones are pruned.
const REF_PRUNE_AT: usize = 1024;

pub struct MemoryBus {
    inner: Arc<Inner>,
}

/// What the bus's futures and its writer task share.
struct Inner {
    state: Mutex<State>,
    sink: Arc<dyn EventSink>,
    /// The store and its writer; `None` for `store.url = memory`.
    durable: Option<durable::Durable>,
}

impl Inner {
    /// The state; a `Result` so the operations read as every bus's do. parking_lot's lock
    /// does not poison: a panic elsewhere leaves the state as the last operation left it.
    fn lock(&self) -> Result<MutexGuard<'_, State>, BusError> {
        Ok(self.state.lock())
    }
}

#[derive(Debug)]
struct State {
    history_size: usize,
    ttl: Duration,
    /// How long a room with no message outlives its last member.
    empty_ttl: Duration,
    rooms: HashMap<RoomName, RoomLog>,
    presence: HashMap<RoomName, RoomPresence>,
    /// Presence changes in all rooms so far: a room's presence starts its versions here, so
    /// a room emptied and filled again never reuses a version (see `bus::PresenceVersion`).
    presence_changes: u64,
    ops: u64,
    /// Rooms' epochs and offsets live in a store: an idle room drops its window, not its
    /// epoch, and a room not in `rooms` must be loaded from the store before it is used.
    durable: bool,
}

/// Who is in one room, and the version of that set.
#[derive(Debug, Default)]
struct RoomPresence {
    users: BTreeMap<UserId, usize>,
    version: PresenceVersion,
}

#[derive(Debug)]
struct RoomLog {
    epoch: Epoch,
    offset: Offset,
    messages: VecDeque<StoredMessage>,
    last_write: Instant,
    /// When the room was created or its last member left; what an empty room's life counts
    /// from.
    last_seen: Instant,
    refs: HashMap<(UserId, String), (Offset, Instant)>,
    /// Where a renewed epoch continues: messages up to it are the retired epoch's.
    base: Offset,
}

impl RoomLog {
    fn new(now: Instant) -> Self {
        Self {
            epoch: Epoch::generate(),
            offset: 0,
            messages: VecDeque::new(),
            last_write: now,
            last_seen: now,
            refs: HashMap::new(),
            base: 0,
        }
    }

    /// A room as the store left it (`None`: a room the store never saw), with the refs it
    /// still remembers, so a retry after a restart is still recognised.
    fn restored(
        head: Option<crate::store::RoomState>,
        refs: Vec<crate::store::RecentRef>,
        now: Instant,
        now_ms: u64,
    ) -> Self {
        let mut log = Self::new(now);
        if let Some(head) = head {
            log.epoch = head.epoch;
            log.offset = head.offset;
            log.base = head.base;
        }
        for r in refs {
            let age = Duration::from_millis(now_ms.saturating_sub(r.ts));
            let at = now.checked_sub(age).unwrap_or(now);
            log.refs.insert((r.user, r.reference), (r.offset, at));
        }
        log
    }

    /// Puts a stored message in the window (trimmed to `size`) and remembers its `ref` for
    /// retries; the in-process path and the store's writer both append through here.
    fn append(
        &mut self,
        offset: Offset,
        json: bytestring::ByteString,
        key: Option<(UserId, String)>,
        size: usize,
        now: Instant,
    ) {
        self.messages.push_back(StoredMessage { offset, json });
        while self.messages.len() > size {
            self.messages.pop_front();
        }
        self.last_write = now;
        if let Some(key) = key {
            if self.refs.len() >= REF_PRUNE_AT {
                self.refs
                    .retain(|_, (_, at)| now.saturating_duration_since(*at) < REF_TTL);
            }
            self.refs.insert(key, (offset, now));
        }
    }

    fn head(&self) -> RoomHead {
        RoomHead {
            epoch: self.epoch.clone(),
            offset: self.offset,
        }
    }

    /// The oldest offset still stored (one past the newest when history is empty).
    fn oldest(&self) -> Offset {
        self.messages.front().map_or(self.offset + 1, |m| m.offset)
    }
}

impl State {
    fn new(history_size: usize, ttl: Duration, durable: bool) -> Self {
        Self {
            history_size,
            ttl,
            empty_ttl: DEFAULT_EMPTY_ROOM_TTL,
            rooms: HashMap::new(),
            presence: HashMap::new(),
            presence_changes: 0,
            ops: 0,
            durable,
        }
    }

    /// The room's log, starting a new epoch if it sat idle past the TTL.
    fn log(&mut self, room: &RoomName, now: Instant) -> &mut RoomLog {
        self.ops += 1;
        if self.ops % SWEEP_EVERY == 0 {
            self.sweep(now, Some(room));
        }
        let (ttl, durable) = (self.ttl, self.durable);
        let log = self
            .rooms
            .entry(room.clone())
            .or_insert_with(|| RoomLog::new(now));
        if now.saturating_duration_since(log.last_write) > ttl {
            if durable {
                // The store keeps the epoch and its messages; only the window expires.
                log.messages.clear();
                log.last_write = now;
            } else {
                log::debug!(
                    "{} history expired; starting a new epoch",
                    logctx::room(&room)
                );
                *log = RoomLog::new(now);
            }
        }
        log
    }

    /// Forgets rooms nobody is in whose history expired, and rooms that never got a message
    /// once `empty_ttl` has passed since their last member left.
    /// `keep` is the room being used: never swept from under its caller.
    fn sweep(&mut self, now: Instant, keep: Option<&RoomName>) {
        let (ttl, empty_ttl) = (self.ttl, self.empty_ttl);
        let presence = &self.presence;
        self.rooms.retain(|room, log| {
            Some(room) == keep
                || presence.contains_key(room)
                || if log.offset == 0 {
                    now.saturating_duration_since(log.last_seen) <= empty_ttl
                } else {
                    now.saturating_duration_since(log.last_write) <= ttl
                }
        });
    }

    fn publish(
        &mut self,
        room: &RoomName,
        msg: NewMessage,
        now: Instant,
    ) -> (Published, Option<RoomEvent>) {
        let size = self.history_size;
        let log = self.log(room, now);
        let key = msg.reference.map(|r| (msg.user.clone(), r));
        if let Some(key) = &key {
            if let Some(&(offset, at)) = log.refs.get(key) {
                if now.saturating_duration_since(at) < REF_TTL {
                    let published = Published {
                        epoch: log.epoch.clone(),
                        offset,
                        duplicate: true,
                    };
                    return (published, None);
                }
            }
        }
        log.offset += 1;
        let offset = log.offset;
        let json = ServerFrame::Message {
            room,
            offset,
            user: &msg.user,
            name: msg.name.as_deref(),
            text: &msg.text,
            ts: now_ms(),
        }
        .to_text();
        log.append(offset, json.clone(), key, size, now);
        let epoch = log.epoch.clone();
        let event = RoomEvent {
            room: room.clone(),
            kind: EventKind::Message {
                epoch: epoch.clone(),
                offset,
            },
            json,
        };
        let published = Published {
            epoch,
            offset,
            duplicate: false,
        };
        (published, Some(event))
    }

    fn replay(
        &mut self,
        room: &RoomName,
        since: Offset,
        epoch: &Epoch,
        limit: usize,
        now: Instant,
    ) -> Replay {
        let log = self.log(room, now);
        let head = log.head();
        // A renewed epoch's own messages start after its base.
        let since = since.max(log.base);
        // `since` may equal the newest offset (nothing missed) but not pass it, and the first
        // missed message (since + 1) must still be stored.
        if *epoch != log.epoch || since > log.offset || since + 1 < log.oldest() {
            return Replay::NotRecovered { head };
        }
        let limit = if limit == 0 { usize::MAX } else { limit };
        let messages = log
            .messages
            .iter()
            .filter(|m| m.offset > since)
            .take(limit)
            .cloned()
            .collect();
        Replay::Recovered { head, messages }
    }

    fn renew_epoch(
        &mut self,
        room: &RoomName,
        stale: &Epoch,
        floor: Offset,
        now: Instant,
    ) -> Renewed {
        let log = self.log(room, now);
        let created = log.epoch == *stale;
        if created {
            log.epoch = Epoch::generate();
            log.offset = log.offset.max(floor);
            log.base = log.offset;
            // Stored messages stay: they were acked, and remain the new epoch's history.
            log.refs.clear();
        }
        Renewed {
            head: log.head(),
            created,
        }
    }

    fn history(
        &mut self,
        room: &RoomName,
        before: Option<Offset>,
        limit: usize,
        now: Instant,
    ) -> HistoryPage {
        let log = self.log(room, now);
        let below = before.unwrap_or(Offset::MAX);
        let mut messages: Vec<StoredMessage> = log
            .messages
            .iter()
            .rev()
            .filter(|m| m.offset < below)
            .take(limit)
            .cloned()
            .collect();
        messages.reverse();
        HistoryPage {
            epoch: log.epoch.clone(),
            messages,
        }
    }

    /// Counts a user in; the version of the change when this is their first connection.
    fn join(&mut self, room: &RoomName, user: &UserId) -> Option<PresenceVersion> {
        let start = self.presence_changes;
        let presence = self
            .presence
            .entry(room.clone())
            .or_insert_with(|| RoomPresence {
                users: BTreeMap::new(),
                version: start,
            });
        let count = presence.users.entry(user.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            return None;
        }
        self.presence_changes += 1;
        presence.version += 1;
        Some(presence.version)
    }

    /// Counts a user out; the version of the change when this was their last connection.
    fn leave(&mut self, room: &RoomName, user: &UserId, now: Instant) -> Option<PresenceVersion> {
        let presence = self.presence.get_mut(room)?;
        let gone = match presence.users.get_mut(user) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                presence.users.remove(user);
                true
            }
            None => false,
        };
        let version = gone.then(|| {
            presence.version += 1;
            presence.version
        });
        self.presence_changes += u64::from(gone);
        if presence.users.is_empty() {
            self.presence.remove(room);
            if let Some(log) = self.rooms.get_mut(room) {
                log.last_seen = now;
            }
        }
        version
    }
}

impl MemoryBus {
    /// The embedded bus with history in the process only (`store.url = memory`).
    pub fn new(history_size: usize, ttl: Duration, sink: Arc<dyn EventSink>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new(history_size, ttl, false)),
                sink,
                durable: None,
            }),
        }
    }

    /// The embedded bus over a store: acks after commit, rooms outlive the process. Starts
    /// the writer task, so it must be called inside a Tokio runtime.
    pub fn with_store(
        history_size: usize,
        ttl: Duration,
        sink: Arc<dyn EventSink>,
        store: SharedStore,
        metrics: Option<Arc<Metrics>>,
        commit_timeout: Duration,
    ) -> Self {
        let (durable, writer) = durable::Durable::new(store, metrics, commit_timeout);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::new(history_size, ttl, true)),
            sink,
            durable: Some(durable),
        });
        tokio::spawn(durable::writer(Arc::downgrade(&inner), writer));
        Self { inner }
    }

    /// Sets how long a room that never got a message outlives its last member.
    pub fn with_empty_room_ttl(self, ttl: Duration) -> Self {
        self.inner.state.lock().empty_ttl = ttl;
        self
    }

    /// Forgets rooms that expired; start-up calls it on a timer, since a quiet replica runs
    /// no operations that would sweep.
    pub fn sweep(&self) {
        if let Ok(mut s) = self.lock() {
            s.sweep(Instant::now(), None);
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, BusError> {
        self.inner.lock()
    }

    fn presence_event(
        room: &RoomName,
        user: &UserId,
        joined: bool,
        version: PresenceVersion,
    ) -> RoomEvent {
        let ts = now_ms();
        let user_id = user.clone();
        let (json, kind) = if joined {
            (
                ServerFrame::Join { room, user, ts }.to_text(),
                EventKind::Join {
                    user: user_id,
                    version,
                },
            )
        } else {
            (
                ServerFrame::Leave { room, user, ts }.to_text(),
                EventKind::Leave {
                    user: user_id,
                    version,
                },
            )
        };
        RoomEvent {
            room: room.clone(),
            kind,
            json,
        }
    }
}

/// Wraps an immediate answer in the contract's future type.
fn done<T: Send + 'static>(value: Result<T, BusError>) -> BusFuture<T> {
    ready(value).boxed()
}

impl Bus for MemoryBus {
    fn publish(&self, room: &RoomName, msg: NewMessage) -> BusFuture<Published> {
        if let Some(d) = &self.inner.durable {
            return d.publish_run(room, vec![msg]).pop().unwrap_or_else(|| {
                done(Err(BusError::Internal(
                    "a run of one gave no answer".into(),
                )))
            });
        }
        let result = self.lock().map(|mut state| {
            let (published, event) = state.publish(room, msg, Instant::now());
            if let Some(event) = event {
                // Still under the lock: rooms see events in offset order.
                self.inner.sink.deliver(event);
            }
            published
        });
        done(result)
    }

    fn publish_run(&self, room: &RoomName, msgs: Vec<NewMessage>) -> Vec<BusFuture<Published>> {
        match &self.inner.durable {
            // One command for the run: it lands in one commit, in order.
            Some(d) => d.publish_run(room, msgs),
            None => msgs
                .into_iter()
                .map(|msg| self.publish(room, msg))
                .collect(),
        }
    }

    fn typing(&self, room: &RoomName, user: &UserId) -> BusFuture<()> {
        self.inner.sink.deliver(RoomEvent {
            room: room.clone(),
            kind: EventKind::Typing { user: user.clone() },
            json: ServerFrame::Typing { room, user }.to_text(),
        });
        done(Ok(()))
    }

    fn head(&self, room: &RoomName) -> BusFuture<RoomHead> {
        if self.inner.durable.is_some() {
            return durable::head(Arc::clone(&self.inner), room.clone());
        }
        done(self.lock().map(|mut s| s.log(room, Instant::now()).head()))
    }

    fn replay(
        &self,
        room: &RoomName,
        since: Offset,
        epoch: &Epoch,
        limit: usize,
    ) -> BusFuture<Replay> {
        if self.inner.durable.is_some() {
            let inner = Arc::clone(&self.inner);
            return durable::replay(inner, room.clone(), since, epoch.clone(), limit);
        }
        done(
            self.lock()
                .map(|mut s| s.replay(room, since, epoch, limit, Instant::now())),
        )
    }

    fn renew_epoch(&self, room: &RoomName, stale: &Epoch, floor: Offset) -> BusFuture<Renewed> {
        if let Some(d) = &self.inner.durable {
            return d.renew_epoch(room, stale, floor);
        }
        done(
            self.lock()
                .map(|mut s| s.renew_epoch(room, stale, floor, Instant::now())),
        )
    }

    fn history(
        &self,
        room: &RoomName,
        before: Option<Offset>,
        limit: usize,
    ) -> BusFuture<HistoryPage> {
        if self.inner.durable.is_some() {
            let inner = Arc::clone(&self.inner);
            return durable::history(inner, room.clone(), before, limit);
        }
        done(
            self.lock()
                .map(|mut s| s.history(room, before, limit, Instant::now())),
        )
    }

    fn join(&self, room: &RoomName, user: &UserId) -> BusFuture<()> {
        done(self.lock().map(|mut s| {
            if let Some(version) = s.join(room, user) {
                self.inner
                    .sink
                    .deliver(Self::presence_event(room, user, true, version));
            }
        }))
    }

    fn leave(&self, room: &RoomName, user: &UserId) -> BusFuture<()> {
        done(self.lock().map(|mut s| {
            if let Some(version) = s.leave(room, user, Instant::now()) {
                self.inner
                    .sink
                    .deliver(Self::presence_event(room, user, false, version));
            }
        }))
    }

    fn presence_snapshot(&self, room: &RoomName) -> BusFuture<PresenceSnapshot> {
        done(self.lock().map(|s| match s.presence.get(room) {
            Some(p) => PresenceSnapshot {
                users: p.users.keys().cloned().collect(),
                version: p.version,
                hidden: Vec::new(),
            },
            // An empty room's next change starts from here (see `State::join`).
            None => PresenceSnapshot {
                version: s.presence_changes,
                ..PresenceSnapshot::default()
            },
        }))
    }

    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// Collects what the bus delivers, in order.
    #[derive(Default)]
    struct Collect(Mutex<Vec<RoomEvent>>);

    impl EventSink for Collect {
        fn deliver(&self, event: RoomEvent) {
            self.0.lock().push(event);
        }

        fn resync_all(&self, _: Option<crate::bus::CatchUpDone>) {}

        fn reassert_presence(&self) {}

        fn has_room(&self, _: &str) -> bool {
            true
        }
    }

    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn msg(text: &str, reference: Option<&str>) -> NewMessage {
        NewMessage {
            user: user("ann"),
            name: None,
            text: text.into(),
            reference: reference.map(str::to_owned),
        }
    }

    fn bus(size: usize) -> (MemoryBus, Arc<Collect>) {
        let sink = Arc::new(Collect::default());
        (
            MemoryBus::new(size, Duration::from_secs(3600), sink.clone()),
            sink,
        )
    }

    /// Every embedded-bus future is already complete.
    fn now<T>(f: BusFuture<T>) -> Result<T, BusError> {
        f.now_or_never().expect("embedded bus answers at once")
    }

    #[test]
    fn offsets_start_at_one_and_grow_by_one() {
        let (bus, sink) = bus(10);
        let r = room("r");
        let offsets: Vec<_> = (0..3)
            .map(|i| {
                now(bus.publish(&r, msg(&format!("m{i}"), None)))
                    .unwrap()
                    .offset
            })
            .collect();
        assert_eq!(offsets, vec![1, 2, 3]);
        let delivered: Vec<_> = sink.0.lock().iter().map(|e| e.kind.clone()).collect();
        assert_eq!(delivered.len(), 3);
        assert!(matches!(
            &delivered[2],
            EventKind::Message { offset: 3, .. }
        ));
    }

    #[test]
    fn rooms_have_their_own_offsets_and_epochs() {
        let (bus, _) = bus(10);
        let a = now(bus.publish(&room("a"), msg("x", None))).unwrap();
        let b = now(bus.publish(&room("b"), msg("y", None))).unwrap();
        assert_eq!((a.offset, b.offset), (1, 1));
        assert_ne!(a.epoch, b.epoch);
    }

    #[test]
    fn history_is_bounded_to_the_configured_size() {
        let (bus, _) = bus(5);
        let r = room("r");
        for i in 0..12 {
            now(bus.publish(&r, msg(&format!("m{i}"), None))).unwrap();
        }
        let page = now(bus.history(&r, None, 100)).unwrap();
        let offsets: Vec<_> = page.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, vec![8, 9, 10, 11, 12]);
        let page = now(bus.history(&r, Some(10), 2)).unwrap();
        let offsets: Vec<_> = page.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, vec![8, 9], "latest two below 10, oldest first");
    }

    #[test]
    fn resume_from_the_oldest_retained_edge() {
        let (bus, _) = bus(5);
        let r = room("r");
        for i in 0..12 {
            now(bus.publish(&r, msg(&format!("m{i}"), None))).unwrap();
        }
        let epoch = now(bus.head(&r)).unwrap().epoch;
        // Oldest stored is 8: since=7 misses nothing that was dropped.
        match now(bus.replay(&r, 7, &epoch, 0)).unwrap() {
            Replay::Recovered { messages, head } => {
                assert_eq!(messages.first().map(|m| m.offset), Some(8));
                assert_eq!(messages.len(), 5);
                assert_eq!(head.offset, 12);
            }
            other => panic!("expected recovery, got {other:?}"),
        }
        // since=6 would need offset 7, which is gone.
        assert!(matches!(
            now(bus.replay(&r, 6, &epoch, 0)).unwrap(),
            Replay::NotRecovered { .. }
        ));
    }

    #[test]
    fn a_replay_is_paged_and_a_renewed_epoch_replays_only_what_came_after_its_start() {
        let (bus, _) = bus(50);
        let r = room("r");
        for i in 0..10 {
            now(bus.publish(&r, msg(&format!("m{i}"), None))).unwrap();
        }
        let epoch = now(bus.head(&r)).unwrap().epoch;
        let offsets = |replay: Replay| match replay {
            Replay::Recovered { messages, .. } => messages.iter().map(|m| m.offset).collect(),
            other => panic!("expected recovery, got {other:?}"),
        };
        let page: Vec<_> = offsets(now(bus.replay(&r, 2, &epoch, 3)).unwrap());
        assert_eq!(page, vec![3, 4, 5], "the oldest three after 2");
        let renewed = now(bus.renew_epoch(&r, &epoch, 12)).unwrap();
        assert!(renewed.created);
        now(bus.publish(&r, msg("new", None))).unwrap();
        let after: Vec<_> = offsets(now(bus.replay(&r, 0, &renewed.head.epoch, 0)).unwrap());
        assert_eq!(after, vec![13], "1..10 were the old epoch's");
    }

    #[test]
    fn resume_at_the_newest_offset_is_recovered_and_empty() {
        let (bus, _) = bus(5);
        let r = room("r");
        now(bus.publish(&r, msg("a", None))).unwrap();
        let head = now(bus.head(&r)).unwrap();
        assert_eq!(
            now(bus.replay(&r, 1, &head.epoch, 0)).unwrap(),
            Replay::Recovered {
                head: head.clone(),
                messages: vec![]
            }
        );
    }

    #[test]
    fn resume_beyond_the_newest_or_with_a_wrong_epoch_is_not_recovered() {
        let (bus, _) = bus(5);
        let r = room("r");
        now(bus.publish(&r, msg("a", None))).unwrap();
        let head = now(bus.head(&r)).unwrap();
        assert!(matches!(
            now(bus.replay(&r, 2, &head.epoch, 0)).unwrap(),
            Replay::NotRecovered { .. }
        ));
        let wrong = Epoch::from_string("not-this-one");
        assert!(matches!(
            now(bus.replay(&r, 0, &wrong, 0)).unwrap(),
            Replay::NotRecovered { .. }
        ));
    }

    #[test]
    fn repeated_ref_is_acked_with_the_first_offset_and_not_published() {
        let (bus, sink) = bus(5);
        let r = room("r");
        let first = now(bus.publish(&r, msg("a", Some("c1")))).unwrap();
        let again = now(bus.publish(&r, msg("a", Some("c1")))).unwrap();
        assert_eq!(again.offset, first.offset);
        assert!(again.duplicate && !first.duplicate);
        assert_eq!(sink.0.lock().len(), 1);
        let other_user = NewMessage {
            user: user("bob"),
            ..msg("a", Some("c1"))
        };
        assert_eq!(
            now(bus.publish(&r, other_user)).unwrap().offset,
            2,
            "refs are per user"
        );
    }

    #[test]
    fn idle_history_expires_into_a_new_epoch() {
        let sink = Arc::new(Collect::default());
        let bus = MemoryBus::new(5, Duration::from_secs(10), sink);
        let r = room("r");
        let t0 = Instant::now();
        let mut state = bus.inner.state.lock();
        let (first, _) = state.publish(&r, msg("a", None), t0);
        let (second, _) = state.publish(&r, msg("b", None), t0 + Duration::from_secs(11));
        assert_ne!(first.epoch, second.epoch);
        assert_eq!(second.offset, 1, "offsets restart in the new epoch");
    }

    #[test]
    fn presence_is_per_user_and_announces_first_and_last_connection() {
        let (bus, sink) = bus(5);
        let r = room("r");
        now(bus.join(&r, &user("ann"))).unwrap();
        now(bus.join(&r, &user("ann"))).unwrap();
        now(bus.join(&r, &user("bob"))).unwrap();
        assert_eq!(
            now(bus.presence(&r)).unwrap(),
            vec![user("ann"), user("bob")]
        );
        now(bus.leave(&r, &user("ann"))).unwrap();
        assert_eq!(
            now(bus.presence(&r)).unwrap().len(),
            2,
            "ann still has a connection"
        );
        now(bus.leave(&r, &user("ann"))).unwrap();
        assert_eq!(now(bus.presence(&r)).unwrap(), vec![user("bob")]);
        let kinds: Vec<_> = sink.0.lock().iter().map(|e| e.kind.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::Join {
                    user: user("ann"),
                    version: 1
                },
                EventKind::Join {
                    user: user("bob"),
                    version: 2
                },
                EventKind::Leave {
                    user: user("ann"),
                    version: 3
                },
            ]
        );
    }
}
