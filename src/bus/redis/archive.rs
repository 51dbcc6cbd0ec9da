//! The PostgreSQL archive behind Redis (docs/design.md, "The archive").
//!
//! Redis assigns offsets and keeps each room's recent window; every replica runs an archiver
//! that copies acked messages into the store, once per (room, epoch, offset):
//! - each room's meta hash carries its archived mark (`aepoch`, `archived`), in the room's
//!   hash slot, so the scripts that read and move it touch one slot (Redis Cluster);
//! - an archiver learns of rooms with new messages from the bridge, which sees every message
//!   of every room on every replica, and, after a start or a resubscribe (events may have been
//!   missed), from a scan of the rooms' meta keys on every Redis node;
//! - a pass claims due rooms with a lease (`archive.lua`: SET PX, renewed each pass while
//!   there is something to copy, let go when there is not), reads each room from its mark to
//!   the stream's head, appends everything in one store transaction (idempotent by key), then
//!   moves each mark (`archived.lua`: only if the lease and the epoch are still the same);
//! - a room leased by another replica is looked at again when that lease would run out, so a
//!   killed replica's rooms are taken over within `store.archive_lease_ms`;
//! - a clean shutdown ([`RedisBus::stop_archiver`], after the drain) stops the passes (the one
//!   in progress gets one Redis command timeout to finish), gives up every lease still held
//!   (`release.lua`: only where the lease still holds this process's token) and names those
//!   rooms on [`RELEASED_CHANNEL`], so the other replicas look at them at once rather
//!   than when the leases would have run out.
//!
//! PostgreSQL down does not stop the chat: the pass fails, is logged once per outage, counted
//! in `confab_store_errors_total`, and retried; Redis keeps the messages meanwhile, and
//! `confab_archive_behind_messages`/`confab_archive_lag_seconds` show how far behind the archive
//! is. Messages Redis dropped before they were copied are logged and counted
//! (`confab_archive_lost_total`); the mark moves past them.
//!
//! The archive is also where a room's epoch outlives Redis: a room whose meta is gone is
//! seeded from the store's `rooms` row ([`RedisBus::seed`]) before it is used again. The row
//! also records the Redis head each pass saw and Redis's clock at the claim: a room whose seen
//! head is above what was copied is seeded in a new epoch after it (no offset a client saw is
//! reused), and a late commit of an older epoch does not replace a newer one.
//! A room whose meta came back *older* than that row (a restored snapshot, a lagging
//! failover) is raised to it ([`RedisBus::raise_if_older`]); an offset handed out again
//! anyway is caught by the copy (`Store::append_checked`), counted, and the room moves to a
//! new epoch.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::scripts::Script;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::Notify;

use super::{unavailable, RedisBus};
use crate::bus::{Bus, BusError, RoomHead};
use crate::domain::{now_ms, Epoch, Offset, RoomName, UserId};
use crate::logctx;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::{Append, Conflict, RoomState, Row, SharedStore};

const ARCHIVE_LUA: &str = include_str!("../lua/archive.lua");
const ARCHIVED_LUA: &str = include_str!("../lua/archived.lua");
const SEED_LUA: &str = include_str!("../lua/seed.lua");
const RAISE_LUA: &str = include_str!("../lua/raise.lua");
const RELEASE_LUA: &str = include_str!("../lua/release.lua");

/// The channel (after `{prefix}:`) that carries a stopping replica's released leases: the
/// room names, one a line. Outside `{prefix}:room:*`, which SPEC §6 keeps for room envelopes
/// (whoever subscribes there sees only those); the bridge subscribes to it beside its pattern
/// when the archive is on.
const RELEASED_CHANNEL: &str = "archive:released";

/// Fewest messages of one room a pass copies (see `store.archive_batch`).
const MIN_PER_ROOM: u64 = 100;

/// Most rooms one pass claims.
const MAX_ROOMS_PER_PASS: usize = 256;

/// Longest a room waits after a failed pass (Redis or the store unavailable); at most a third
/// of the lease, so the holder renews its leases through an outage.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a failed commit makes reads skip the store (a failing archiver retries well
/// within it, so it holds for the whole outage while there is traffic).
const DOWN_FOR: Duration = Duration::from_secs(5);

/// Most rooms remembered as compared with the archive since the last reconnect.
const CHECKED_MAX: usize = 100_000;

/// The archive side of a Redis bus: its store, and the rooms the bridge saw messages in.
pub struct Archive {
    pub(super) store: SharedStore,
    metrics: Arc<Metrics>,
    /// Rooms with a message since the archiver last took this set.
    dirty: Mutex<HashSet<RoomName>>,
    /// Set after a (re)subscribe: the archiver scans for rooms it may not have heard of.
    rescan: AtomicBool,
    /// Rooms whose Redis head was compared with the archive's since the last (re)subscribe.
    /// Redis can only come back older across a reconnect (a restart, a failover), after which
    /// the bridge resubscribes and this is emptied: so each room costs one store read per
    /// reconnect, not one per read ([`RedisBus::raise_if_older`]).
    /// Bounded by [`CHECKED_MAX`]: a replica that touches ever new rooms forgets them all
    /// at once then, and each is compared again at its next read (one store read each).
    checked: Mutex<HashSet<RoomName>>,
    /// When the archiver's last commit failed, if it did: reads that may do without the store
    /// do not wait for it meanwhile. It counts for [`DOWN_FOR`] only, since without traffic
    /// no commit would clear it.
    down: Mutex<Option<Instant>>,
    wake: Notify,
    /// Rooms whose lease this archiver may hold (claimed, not yet let go): what a clean
    /// shutdown releases. A superset is harmless: the release compares the token.
    held: Mutex<HashSet<RoomName>>,
    /// Rooms another replica's archiver gave up at its shutdown: looked at again at once.
    released: Mutex<HashSet<RoomName>>,
    /// Set at a clean shutdown: the archiver stops its passes.
    stop: tokio::sync::watch::Sender<bool>,
    /// Notified once the archiver has stopped (no pass in progress).
    stopped: Notify,
    /// Redis's command timeout: bounds a stopping archiver's last pass and its releases.
    command_timeout: Duration,
    /// This process's lease token (the node id and a random part: a restarted process under
    /// the same node id does not inherit a lease it cannot know the state of).
    token: String,
    lease_ms: u64,
    /// How long a room waits after a failed pass.
    retry: Duration,
    /// Longest a store call may take: half a lease. sqlx waits up to 30 s for a connection
    /// to a PostgreSQL that refuses them, and a pass stuck that long would let its leases
    /// run out (and a history read would hang).
    timeout: Duration,
    interval: Duration,
    batch: u64,
    claim: Script,
    mark: Script,
    seed: Script,
    raise: Script,
    release: Script,
}

impl Archive {
    /// Remembers that `room`'s Redis head was compared with the archive's.
    fn mark_checked(&self, room: &RoomName) {
        let mut checked = self.checked.lock();
        if checked.len() >= CHECKED_MAX {
            *checked = HashSet::new();
        }
        checked.insert(room.clone());
    }

    pub fn new(store: SharedStore, settings: &Settings, node: &str, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            dirty: Mutex::new(HashSet::new()),
            rescan: AtomicBool::new(true),
            checked: Mutex::new(HashSet::new()),
            down: Mutex::new(None),
            wake: Notify::new(),
            held: Mutex::new(HashSet::new()),
            released: Mutex::new(HashSet::new()),
            stop: tokio::sync::watch::Sender::new(false),
            stopped: Notify::new(),
            command_timeout: settings.redis.command_timeout_ms,
            token: format!("{node}/{:016x}", rand::random::<u64>()),
            lease_ms: settings.store.archive_lease_ms.as_millis() as u64,
            retry: RETRY_AFTER.min(settings.store.archive_lease_ms / 3),
            timeout: settings.store.archive_lease_ms / 2,
            interval: settings.store.archive_interval_ms,
            batch: settings.store.archive_batch,
            claim: Script::from_lua(ARCHIVE_LUA),
            mark: Script::from_lua(ARCHIVED_LUA),
            seed: Script::from_lua(SEED_LUA),
            raise: Script::from_lua(RAISE_LUA),
            release: Script::from_lua(RELEASE_LUA),
        }
    }

    /// A store call, bounded by [`Archive::timeout`].
    pub(super) async fn bounded<T>(
        &self,
        call: crate::store::StoreFuture<T>,
    ) -> Result<T, crate::store::StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(crate::store::StoreError::Query(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// Another replica's archiver stopped and gave up the leases of the rooms `payload` names
    /// (one a line): they are looked at again at once, not when those leases would have run
    /// out.
    fn saw_released(&self, payload: &Value) {
        let text = match payload {
            Value::String(s) => s.to_string(),
            Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            _ => return,
        };
        let rooms = text.lines().filter_map(|r| RoomName::parse(r).ok());
        self.released.lock().extend(rooms);
        self.wake.notify_one();
    }

    /// Whether the archiver's last commit failed lately (the store is likely down).
    pub(super) fn is_down(&self) -> bool {
        self.down.lock().is_some_and(|at| at.elapsed() < DOWN_FOR)
    }

    /// Counts and logs a failed store read; what the client sees of it.
    pub(super) fn read_failed(&self, room: &RoomName, e: crate::store::StoreError) -> BusError {
        self.metrics.store_errors.inc();
        log::warn!("{} reading the archive failed: {e}", logctx::room(room));
        BusError::Unavailable(format!("the archive is unavailable: {e}"))
    }
}

/// What [`RedisBus::seed`] did.
pub(super) enum Seeded {
    /// The meta is there (seeded now from the archive, or by someone else meanwhile).
    Ready,
    /// The archive has no epoch for the room (or cannot be read): the room starts a new one.
    NotArchived,
}

/// What `archive.lua` answered for one room.
enum Claim {
    Busy(u64),
    Gone,
    Done,
    Copy {
        epoch: Epoch,
        offset: Offset,
        archived: Offset,
        base: Offset,
        entries: Vec<Entry>,
        /// Redis's clock at the claim (ms): orders epochs in the archive's `rooms` row.
        at_ms: u64,
    },
}

/// One stream entry as the archive needs it.
struct Entry {
    offset: Offset,
    frame: String,
    reference: Option<String>,
}

/// The fields of a stored `message` frame the archive's row keeps beside the frame.
#[derive(Deserialize)]
struct FrameFields<'a> {
    #[serde(borrow)]
    user: &'a str,
    ts: u64,
}

impl RedisBus {
    /// The channel of released leases (see [`RELEASED_CHANNEL`]), when the archive is on.
    pub(in crate::bus) fn released_channel(&self) -> Option<String> {
        self.archive
            .as_ref()
            .map(|_| format!("{}:{RELEASED_CHANNEL}", self.prefix))
    }

    fn lease_key(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:archiver", self.prefix)
    }

    /// The bridge saw a channel message: if it is a chat message, its room has something to
    /// archive. Called for every event of every room: a prefix test and, for a room already
    /// noted, one lookup without allocating.
    pub(in crate::bus) fn saw_event(&self, channel: &str, payload: &Value) {
        let Some(archive) = &self.archive else {
            return;
        };
        let is_message = match payload {
            Value::String(s) => s.starts_with(r#"{"kind":"message""#),
            Value::Bytes(b) => b.starts_with(br#"{"kind":"message""#),
            _ => false,
        };
        if !is_message {
            let released = channel
                .strip_prefix(&*self.prefix)
                .and_then(|c| c.strip_prefix(':'))
                == Some(RELEASED_CHANNEL);
            if released {
                archive.saw_released(payload);
            }
            return;
        }
        let Some(room) = self.room_of(channel) else {
            return;
        };
        let mut dirty = archive.dirty.lock();
        if !dirty.contains(room) {
            if let Ok(room) = RoomName::parse(room) {
                dirty.insert(room);
            }
        }
    }

    /// Events may have been missed (a start, a resubscribe): the archiver scans for rooms.
    pub(in crate::bus) fn archive_rescan(&self) {
        if let Some(archive) = &self.archive {
            // Redis may have come back older: every room's head is compared with the
            // archive's again at its next read.
            archive.checked.lock().clear();
            archive.rescan.store(true, Ordering::Release);
            archive.wake.notify_one();
        }
    }

    /// The rooms whose meta key exists, on every node of a Cluster.
    async fn scan_rooms(&self) -> Result<Vec<RoomName>, BusError> {
        let pattern = format!("{}:{{*}}:meta", self.prefix);
        let head = format!("{}:{{", self.prefix);
        let mut keys = if self.client.is_clustered() {
            self.client
                .scan_cluster_buffered(pattern, Some(1000), None)
                .boxed()
        } else {
            self.client.scan_buffered(pattern, Some(1000), None).boxed()
        };
        let mut rooms = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(unavailable)?;
            let room = key
                .as_str()
                .and_then(|k| k.strip_prefix(head.as_str()))
                .and_then(|k| k.strip_suffix("}:meta"))
                .and_then(|r| RoomName::parse(r).ok());
            rooms.extend(room);
        }
        Ok(rooms)
    }

    async fn claim(
        &self,
        archive: &Archive,
        room: &RoomName,
        count: u64,
    ) -> Result<Claim, BusError> {
        let keys = self.keys(room);
        let args: Vec<Value> = vec![
            archive.token.as_str().into(),
            archive.lease_ms.to_string().into(),
            count.to_string().into(),
        ];
        let reply: Value = archive
            .claim
            .evalsha_with_reload(
                &self.client,
                vec![keys.meta, keys.history, self.lease_key(room)],
                args,
            )
            .await
            .map_err(unavailable)?;
        parse_claim(reply)
    }

    /// Moves the room's mark to `upto`; how many messages remain after it (-1: not moved).
    async fn mark(
        &self,
        archive: &Archive,
        room: &RoomName,
        epoch: &Epoch,
        upto: Offset,
    ) -> Result<i64, BusError> {
        let args: Vec<Value> = vec![
            archive.token.as_str().into(),
            epoch.as_str().into(),
            upto.to_string().into(),
        ];
        archive
            .mark
            .evalsha_with_reload(
                &self.client,
                vec![self.keys(room).meta, self.lease_key(room)],
                args,
            )
            .await
            .map_err(unavailable)
    }

    /// The room has no meta in Redis (restarted empty, or the room idled out): sets it from
    /// the archive's `rooms` row, so the room keeps its epoch and offsets, unless the meta
    /// came back meanwhile.
    pub(super) async fn seed(&self, room: &RoomName) -> Seeded {
        let Some(archive) = &self.archive else {
            return Seeded::NotArchived;
        };
        if archive.is_down() {
            // Rather than make every new room's first read wait for a store that just failed:
            // as if it could not be read (below).
            // Debug: a new room is the usual case (`confab_epoch_resets_total` counts the rest).
            log::debug!(
                "{} has no Redis meta and the archive is down: it starts a new epoch",
                logctx::room(room)
            );
            return Seeded::NotArchived;
        }
        let state = match archive.bounded(archive.store.head(room)).await {
            Ok(Some(state)) => state,
            Ok(None) => return Seeded::NotArchived,
            Err(e) => {
                // Redis and PostgreSQL both failed at once: the chat goes on, in a new epoch.
                archive.metrics.store_errors.inc();
                log::error!(
                    "{} lost its Redis meta and the archive cannot be read ({e}): it starts a \
                     new epoch",
                    logctx::room(room)
                );
                return Seeded::NotArchived;
            }
        };
        // Redis had handed out more of the epoch than the archive holds (the last pass saw
        // a head it had not copied yet, and Redis lost the rest): a client may have seen those
        // offsets, and with every replica restarted no sequencer remembers them. The room is
        // not seeded in that epoch but starts a new one after the seen head: no offset is
        // handed out twice, and clients get a `reset` (messages were lost).
        let lost = state.seen.saturating_sub(state.offset);
        let (epoch, offset, base) = if lost > 0 {
            (Epoch::generate(), state.seen, state.seen)
        } else {
            (state.epoch.clone(), state.offset, state.base)
        };
        let keys = self.keys(room);
        let args: Vec<Value> = vec![
            epoch.as_str().into(),
            offset.to_string().into(),
            base.to_string().into(),
            Value::from(self.ttl_secs as i64),
            state.seen_at_ms.to_string().into(),
        ];
        match archive
            .seed
            .evalsha_with_reload::<i64, _, _>(&self.client, vec![keys.meta, keys.history], args)
            .await
        {
            Ok(1) => {
                // Set from the archive's head just now: nothing to compare it with.
                archive.mark_checked(room);
                if lost > 0 {
                    archive.metrics.archive_lost.inc_by(lost);
                    log::warn!(
                        "{} restored from the archive in a new epoch {epoch} after offset \
                         {offset}: Redis had handed out offsets up to {offset} of epoch {}, the \
                         archive holds up to {}; {lost} unarchived messages were lost with Redis",
                        logctx::room(room),
                        state.epoch,
                        state.offset
                    );
                } else {
                    log::info!(
                        "{} restored from the archive: epoch {epoch} at offset {offset}",
                        logctx::room(room)
                    );
                }
                Seeded::Ready
            }
            Ok(_) => Seeded::Ready,
            Err(e) => {
                log::warn!("{} cannot seed its meta: {e}", logctx::room(room));
                Seeded::Ready
            }
        }
    }
}

impl RedisBus {
    /// A clean shutdown, after the drain: stops the archiver (its pass in progress gets one
    /// Redis command timeout to finish), then gives up every lease it still holds, so the
    /// other replicas archive those rooms now rather than when the leases would have run out.
    /// Each step is bounded by the command timeout: a Redis that is down does not hold the
    /// exit (the leases then run out by themselves, as after a kill).
    pub async fn stop_archiver(&self) {
        let Some(archive) = &self.archive else {
            return;
        };
        let timeout = archive.command_timeout;
        archive.stop.send_replace(true);
        // The pass gets one timeout; the second is slack for a tick or a scan in flight.
        if tokio::time::timeout(2 * timeout, archive.stopped.notified())
            .await
            .is_err()
        {
            log::warn!(
                "{} archive: the archiver did not stop within {:?}; releasing its leases anyway",
                logctx::node(&self.node),
                2 * timeout
            );
        }
        let rooms: Vec<RoomName> = archive.held.lock().drain().collect();
        let released = if rooms.is_empty() || !self.client.is_connected() {
            Vec::new()
        } else {
            self.release_leases(archive, rooms).await
        };
        log::info!(
            "{} released {} archive leases",
            logctx::node(&self.node),
            released.len()
        );
        if released.is_empty() {
            return;
        }
        let channel = format!("{}:{RELEASED_CHANNEL}", self.prefix);
        let names: Vec<&str> = released.iter().map(RoomName::as_str).collect();
        let notice = self.client.publish::<i64, _, _>(channel, names.join("\n"));
        match tokio::time::timeout(timeout, notice).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::warn!(
                "{} archive: cannot tell the other replicas of the released leases (they \
                 look at those rooms when the leases would have run out): {e}",
                logctx::node(&self.node)
            ),
            Err(_) => log::warn!(
                "{} archive: cannot tell the other replicas of the released leases within \
                 {timeout:?} (they look at those rooms when the leases would have run out)",
                logctx::node(&self.node)
            ),
        }
    }

    /// Deletes the leases of `rooms` that still hold this process's token (`release.lua`,
    /// one call per room: each lease is in its room's slot); the rooms released.
    async fn release_leases(&self, archive: &Archive, rooms: Vec<RoomName>) -> Vec<RoomName> {
        let calls = rooms.iter().map(|room| {
            archive.release.evalsha_with_reload::<i64, _, _>(
                &self.client,
                vec![self.lease_key(room)],
                vec![Value::from(archive.token.as_str())],
            )
        });
        let replies = match tokio::time::timeout(
            archive.command_timeout,
            futures_util::future::join_all(calls),
        )
        .await
        {
            Ok(replies) => replies,
            Err(_) => {
                log::warn!(
                    "{} archive: Redis did not answer the lease releases within {:?}; the \
                     leases run out by themselves",
                    logctx::node(&self.node),
                    archive.command_timeout
                );
                return Vec::new();
            }
        };
        let mut failed = None;
        let mut released = Vec::new();
        for (room, reply) in rooms.into_iter().zip(replies) {
            match reply {
                Ok(1) => released.push(room),
                Ok(_) => {}
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            // One line for the lot: the same outage fails every call.
            log::warn!(
                "{} archive: cannot release some leases (they run out by themselves): {e}",
                logctx::node(&self.node)
            );
        }
        released
    }

    /// Whether `room` still needs its Redis head compared with the archive's.
    pub(super) fn needs_older_check(&self, room: &RoomName) -> bool {
        self.archive
            .as_ref()
            .is_some_and(|a| !a.checked.lock().contains(room))
    }

    /// Redis came back older (a restored snapshot, a failover to a lagging replica) if the
    /// archive's head of the room's epoch is above `head`: raises the meta to it
    /// (`raise.lua`), so no offset the archive holds is handed out again and clients that saw
    /// up to it get no `reset`. True when the meta is now above `head` (raised by this call or
    /// another replica): the caller reads again. Done once per room per Redis connection; a
    /// store that cannot be read leaves the room unchecked (the next read tries again) and
    /// the read goes on from Redis.
    pub(super) async fn raise_if_older(&self, room: &RoomName, head: &RoomHead) -> bool {
        let Some(archive) = &self.archive else {
            return false;
        };
        if archive.is_down() {
            return false;
        }
        let state = match archive.bounded(archive.store.head(room)).await {
            Ok(state) => state,
            Err(e) => {
                archive.metrics.store_errors.inc();
                log::warn!(
                    "{} cannot compare its Redis head with the archive's (tried again at its \
                     next read): {e}",
                    logctx::room(room)
                );
                return false;
            }
        };
        let Some(state) = state.filter(|s| s.epoch == head.epoch && s.offset > head.offset) else {
            archive.mark_checked(room);
            return false;
        };
        let keys = self.keys(room);
        let args: Vec<Value> = vec![state.epoch.as_str().into(), state.offset.to_string().into()];
        let reply: Result<Vec<i64>, _> = archive
            .raise
            .evalsha_with_reload(&self.client, vec![keys.meta, keys.history], args)
            .await;
        match reply.as_deref() {
            Ok([1, before]) => {
                log::warn!(
                    "{} came back from Redis older than the archive (epoch {}: offset {before} \
                     in Redis, {} archived): raised to the archive's head, no reset",
                    logctx::room(room),
                    state.epoch,
                    state.offset
                );
                // Counted once logged, as every archive count: the metric names a log line.
                archive.metrics.archive_raised.inc();
            }
            Ok(_) => {}
            Err(e) => {
                log::warn!("{} cannot raise its meta: {e}", logctx::room(room));
                return false;
            }
        }
        archive.mark_checked(room);
        true
    }
}

fn bad(what: &str) -> BusError {
    BusError::Internal(format!("unexpected reply from the archive script: {what}"))
}

fn parse_claim(reply: Value) -> Result<Claim, BusError> {
    let mut parts = reply.into_array().into_iter();
    let kind = parts
        .next()
        .and_then(|v| v.as_string())
        .ok_or_else(|| bad("kind"))?;
    let mut number = |what| {
        parts
            .next()
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad(what))
    };
    match kind.as_str() {
        // PTTL is -1 or -2 for a key without expiry or gone: look again soon.
        "busy" => Ok(Claim::Busy(number("pttl").unwrap_or(0))),
        "gone" => Ok(Claim::Gone),
        "done" => Ok(Claim::Done),
        "copy" => {
            let epoch = parts
                .next()
                .and_then(|v| v.as_string())
                .ok_or_else(|| bad("epoch"))?;
            let mut number = |what| {
                parts
                    .next()
                    .and_then(|v| v.as_u64())
                    .ok_or_else(|| bad(what))
            };
            let offset = number("offset")?;
            let archived = number("archived")?;
            let base = number("base")?;
            let raw = parts.next().map(Value::into_array).unwrap_or_default();
            let at_ms = parts
                .next()
                .and_then(|v| v.as_u64())
                .ok_or_else(|| bad("ms"))?;
            let mut entries = Vec::with_capacity(raw.len());
            for entry in raw {
                let mut entry = entry.into_array().into_iter();
                let id = entry
                    .next()
                    .and_then(|v| v.as_string())
                    .ok_or_else(|| bad("id"))?;
                let offset = id
                    .split('-')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| bad("id"))?;
                let mut fields = entry
                    .next()
                    .map(Value::into_array)
                    .unwrap_or_default()
                    .into_iter();
                let (mut frame, mut reference) = (None, None);
                while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    match name.as_str().as_deref() {
                        Some("f") => frame = value.as_string(),
                        Some("r") => reference = value.as_string(),
                        _ => {}
                    }
                }
                entries.push(Entry {
                    offset,
                    frame: frame.ok_or_else(|| bad("frame"))?,
                    reference,
                });
            }
            Ok(Claim::Copy {
                epoch: Epoch::from_string(&epoch),
                offset,
                archived,
                base,
                entries,
                at_ms,
            })
        }
        other => Err(bad(other)),
    }
}

/// A copy staged in a pass, waiting for the store's commit.
struct Copied {
    room: RoomName,
    epoch: Epoch,
    /// The newest offset copied: the mark moves here after the commit.
    upto: Offset,
    /// Messages Redis no longer had (trimmed or expired before they were copied).
    lost: u64,
    /// Redis's clock at the claim.
    at_ms: u64,
}

/// The archiver: runs until [`RedisBus::stop_archiver`] (see the module doc).
pub async fn run(bus: Arc<RedisBus>) {
    let Some(archive) = bus.archive.as_ref() else {
        return;
    };
    passes(&bus, archive).await;
    archive.stopped.notify_one();
}

/// The archiver's passes, until a clean shutdown stops them.
async fn passes(bus: &Arc<RedisBus>, archive: &Archive) {
    let mut stop = archive.stop.subscribe();
    // Room → when to look at it next.
    let mut rooms: HashMap<RoomName, Instant> = HashMap::new();
    let mut outage: Option<Instant> = None;
    let mut tick = tokio::time::interval(archive.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A pass left rooms with more to copy: the next one starts at once, not at the next
    // tick, so a room further behind than one batch catches up at the store's pace.
    let mut again = false;
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if !again {
            tokio::select! {
                _ = tick.tick() => {}
                _ = archive.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
        again = false;
        if !bus.client.is_connected() {
            continue;
        }
        let now = Instant::now();
        if archive.rescan.swap(false, Ordering::AcqRel) {
            match bus.scan_rooms().await {
                Ok(found) => {
                    for room in found {
                        rooms.entry(room).or_insert(now);
                    }
                }
                Err(e) => {
                    archive.rescan.store(true, Ordering::Release);
                    log::warn!(
                        "{} archive: cannot scan Redis for rooms (retried): {e}",
                        logctx::node(&bus.node)
                    );
                }
            }
        }
        // Given up by a stopping replica: due now, even if its lease had us wait.
        for room in std::mem::take(&mut *archive.released.lock()) {
            rooms.insert(room, now);
        }
        for room in std::mem::take(&mut *archive.dirty.lock()) {
            rooms.entry(room).or_insert(now);
        }
        if rooms.is_empty() {
            archive.metrics.archive_behind.set(0);
            archive.metrics.archive_lag_seconds.set(0.0);
            continue;
        }
        let due: Vec<RoomName> = rooms
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(room, _)| room.clone())
            .take(MAX_ROOMS_PER_PASS)
            .collect();
        if due.is_empty() {
            continue;
        }
        // Stopped during a scan: no claim after the leases were given up.
        if *stop.borrow() {
            return;
        }
        {
            let pass = pass(bus, archive, due, &mut rooms, &mut outage);
            tokio::pin!(pass);
            tokio::select! {
                _ = &mut pass => {}
                _ = stop.changed() => {
                    // A pass that is moving its marks finishes in a round trip; one stuck on
                    // a store or Redis that does not answer is dropped (its copy is made
                    // again by the next holder: idempotent).
                    let _ = tokio::time::timeout(archive.command_timeout, pass).await;
                    return;
                }
            }
        }
        let now = Instant::now();
        again = outage.is_none() && rooms.values().any(|at| *at <= now);
    }
}

/// One pass over `due`: claim, copy in one transaction, move the marks.
async fn pass(
    bus: &Arc<RedisBus>,
    archive: &Archive,
    due: Vec<RoomName>,
    rooms: &mut HashMap<RoomName, Instant>,
    outage: &mut Option<Instant>,
) {
    let now = Instant::now();
    // `store.archive_batch` is shared by the pass's rooms, so one transaction stays well
    // inside its time bound (half a lease) also when every room is far behind, as after an
    // outage; each room gets at least MIN_PER_ROOM.
    let count = (archive.batch / due.len() as u64).max(MIN_PER_ROOM);
    // What a clean shutdown gives up, noted before the claims: one dropped at a shutdown (or
    // unanswered) may have taken the lease all the same.
    archive.held.lock().extend(due.iter().cloned());
    let claims =
        futures_util::future::join_all(due.iter().map(|r| bus.claim(archive, r, count))).await;
    {
        // A `copy` took or renewed the lease; any other answer means another replica holds it
        // or the script let it go (or never took it).
        let mut held = archive.held.lock();
        for (room, claim) in due.iter().zip(&claims) {
            match claim {
                Ok(Claim::Copy { .. }) | Err(_) => {}
                Ok(_) => {
                    held.remove(room);
                }
            }
        }
    }
    // A room not compared with the archive since the last reconnect (Redis may have come
    // back older) is compared before it is copied: raised, it is looked at again at once,
    // from its raised mark, rather than copied from the old one into offsets the archive
    // already holds.
    let raised: HashSet<RoomName> = {
        let checks = due
            .iter()
            .zip(&claims)
            .filter_map(|(room, claim)| match claim {
                Ok(Claim::Copy { epoch, offset, .. }) if bus.needs_older_check(room) => {
                    let head = RoomHead {
                        epoch: epoch.clone(),
                        offset: *offset,
                    };
                    Some(async move { bus.raise_if_older(room, &head).await.then(|| room.clone()) })
                }
                _ => None,
            });
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect()
    };
    // One warning per pass, not one per room.
    let mut redis_ok = true;
    let mut batch = Append::default();
    let mut copies = Vec::new();
    let mut behind = 0u64;
    let mut oldest_ts: Option<u64> = None;
    for (room, claim) in due.into_iter().zip(claims) {
        match claim {
            Err(e) => {
                if redis_ok {
                    log::warn!(
                        "{} archive: a Redis call failed (retried): {e}",
                        logctx::node(&bus.node)
                    );
                }
                redis_ok = false;
                rooms.insert(room, now + archive.retry);
            }
            Ok(Claim::Busy(ms)) => {
                // Another replica holds it: look again when its lease would have run out.
                let wait = Duration::from_millis(ms).max(archive.interval);
                rooms.insert(room, now + wait);
            }
            Ok(Claim::Gone | Claim::Done) => {
                rooms.remove(&room);
            }
            Ok(Claim::Copy { .. }) if raised.contains(&room) => {
                rooms.insert(room, now);
            }
            Ok(Claim::Copy {
                epoch,
                offset,
                archived,
                base,
                entries,
                at_ms,
            }) => {
                behind += offset.saturating_sub(archived);
                let first = entries.first().map_or(offset + 1, |e| e.offset);
                let lost = first.saturating_sub(archived + 1);
                let upto = entries.last().map_or(offset, |e| e.offset);
                for entry in entries {
                    match frame_fields(&entry.frame) {
                        Some((user, ts)) => {
                            oldest_ts = Some(oldest_ts.map_or(ts, |o| o.min(ts)));
                            batch.rows.push(Row {
                                room: room.clone(),
                                epoch: epoch.clone(),
                                offset: entry.offset,
                                ts,
                                user,
                                reference: entry.reference,
                                frame: entry.frame.into(),
                            });
                        }
                        None => log::error!(
                            "{} archive: stored message {} has no user or ts; skipped",
                            logctx::room(&room),
                            entry.offset
                        ),
                    }
                }
                // What Redis had handed out at the claim, copied or not: a room seeded from
                // this row never hands those offsets out again in the epoch.
                batch.rooms.push(RoomState {
                    room: room.clone(),
                    epoch: epoch.clone(),
                    offset: upto,
                    base,
                    seen: offset.max(upto),
                    seen_at_ms: at_ms,
                });
                copies.push(Copied {
                    room,
                    epoch,
                    upto,
                    lost,
                    at_ms,
                });
            }
        }
    }
    if copies.is_empty() {
        // Nothing of this replica's is behind (other replicas hold the busy rooms).
        archive.metrics.archive_behind.set(0);
        archive.metrics.archive_lag_seconds.set(0.0);
        return;
    }
    let lag = || oldest_ts.map_or(0.0, |ts| now_ms().saturating_sub(ts) as f64 / 1000.0);
    // Until the commit answers: everything claimed is behind, the oldest for this long.
    archive.metrics.archive_behind.set(behind as i64);
    archive.metrics.archive_lag_seconds.set(lag());
    let rows = batch.rows.len() as u64;
    let conflicts = match archive.bounded(archive.store.append_checked(batch)).await {
        Ok(conflicts) => conflicts,
        Err(e) => {
            archive.metrics.store_errors.inc();
            *archive.down.lock() = Some(Instant::now());
            if outage.is_none() {
                *outage = Some(now);
                log::error!(
                    "{} archive: PostgreSQL is unavailable ({e}); the chat goes on from Redis, \
                     which keeps each room's last {} messages for {} s; copying is retried every \
                     {:?} (see confab_archive_lag_seconds)",
                    logctx::node(&bus.node),
                    bus.history_size,
                    bus.ttl_secs,
                    archive.retry
                );
            }
            for c in copies {
                rooms.insert(c.room, now + archive.retry);
            }
            return;
        }
    };
    *archive.down.lock() = None;
    if let Some(since) = outage.take() {
        log::info!(
            "{} archive: PostgreSQL is back after {:.1} s; copying what Redis kept",
            logctx::node(&bus.node),
            since.elapsed().as_secs_f64()
        );
    }
    archive.metrics.archive_copied.inc_by(rows);
    let marks = futures_util::future::join_all(
        copies
            .iter()
            .map(|c| bus.mark(archive, &c.room, &c.epoch, c.upto)),
    )
    .await;
    let claimed_at: HashMap<RoomName, u64> =
        copies.iter().map(|c| (c.room.clone(), c.at_ms)).collect();
    let mut still_behind = 0u64;
    for (c, marked) in copies.into_iter().zip(marks) {
        match marked {
            Ok(rest) if rest >= 0 => {
                if c.lost > 0 {
                    log::error!(
                        "{} archive: {} messages of epoch {} before offset {} were dropped by \
                         Redis before they were archived (PostgreSQL was unavailable longer \
                         than the Redis window: history.size / history.ttl_secs)",
                        logctx::room(&c.room),
                        c.lost,
                        c.epoch,
                        c.upto
                    );
                    archive.metrics.archive_lost.inc_by(c.lost);
                }
                if rest == 0 {
                    // `archived.lua` let the lease go.
                    archive.held.lock().remove(&c.room);
                    rooms.remove(&c.room);
                } else {
                    still_behind += rest as u64;
                    rooms.insert(c.room, now);
                }
            }
            // Lease or epoch changed under us: look again (the copy is harmless either way).
            Ok(_) => {
                rooms.insert(c.room, now);
            }
            Err(e) => {
                log::warn!(
                    "{} archive: cannot move the mark: {e}",
                    logctx::room(&c.room)
                );
                rooms.insert(c.room, now + archive.retry);
            }
        }
    }
    for (room, (epoch, offsets)) in by_room(conflicts) {
        let at_ms = claimed_at.get(&room).copied().unwrap_or(0);
        reused_offsets(bus, archive, &room, &epoch, &offsets, at_ms).await;
        rooms.insert(room, now);
    }
    // The lag stays at what this pass's oldest message waited until it was committed: under
    // steady load every pass sets it, so samples of it are the archive's latency.
    archive.metrics.archive_behind.set(still_behind as i64);
    archive.metrics.archive_lag_seconds.set(lag());
}

/// The conflicts of one commit, by room: the epoch and the offsets.
fn by_room(conflicts: Vec<Conflict>) -> HashMap<RoomName, (Epoch, Vec<Offset>)> {
    let mut rooms: HashMap<RoomName, (Epoch, Vec<Offset>)> = HashMap::new();
    for c in conflicts {
        rooms
            .entry(c.room)
            .or_insert_with(|| (c.epoch, Vec::new()))
            .1
            .push(c.offset);
    }
    rooms
}

/// The archive already held other messages at `offsets` of the room's `epoch`: Redis handed
/// those offsets out again (it came back older, and the room was not raised before a
/// publish). The archive keeps its first messages; the new ones stay in Redis's window under
/// the old epoch. The room moves to a new epoch after the archive's head, so that no further
/// offset it holds is handed out again (its members get a `reset`). `at_ms`: Redis's clock at
/// the pass's claim of the room, which stamps the new epoch's head (the renewal came after it).
async fn reused_offsets(
    bus: &Arc<RedisBus>,
    archive: &Archive,
    room: &RoomName,
    epoch: &Epoch,
    offsets: &[Offset],
    at_ms: u64,
) {
    let newest = offsets.iter().copied().max().unwrap_or(0);
    // The archive's head of the epoch is the floor: offsets up to it are taken there.
    let floor = match archive.bounded(archive.store.head(room)).await {
        Ok(Some(head)) if head.epoch == *epoch => head.offset.max(newest),
        _ => newest,
    };
    log::error!(
        "{} archive: offsets {offsets:?} of epoch {epoch} were handed out again by Redis for \
         other messages than the archive holds (Redis came back older); the archive keeps the \
         first, the others stay in Redis's window only; moving the room to a new epoch after \
         offset {floor}",
        logctx::room(room)
    );
    // Counted once logged: whoever the metric alerts finds the line.
    archive
        .metrics
        .archive_conflicts
        .inc_by(offsets.len() as u64);
    match Bus::renew_epoch(bus, room, epoch, floor).await {
        Ok(renewed) if renewed.created => {
            // The archive's head follows, so a room seeded from it later starts in the new
            // epoch; a failure here is repaired by the epoch's first copied message.
            let head = Append {
                rows: Vec::new(),
                rooms: vec![RoomState {
                    room: room.clone(),
                    epoch: renewed.head.epoch.clone(),
                    offset: renewed.head.offset,
                    base: renewed.head.offset,
                    seen: renewed.head.offset,
                    seen_at_ms: at_ms,
                }],
            };
            if let Err(e) = archive.bounded(archive.store.append(head)).await {
                archive.metrics.store_errors.inc();
                log::warn!(
                    "{} archive: cannot record the new epoch {}: {e}",
                    logctx::room(room),
                    renewed.head.epoch
                );
            }
        }
        Ok(_) => {}
        Err(e) => log::error!(
            "{} archive: cannot move the room to a new epoch after reused offsets: {e}",
            logctx::room(room)
        ),
    }
}

/// The sender and time of a stored `message` frame.
fn frame_fields(frame: &str) -> Option<(UserId, u64)> {
    let fields: FrameFields = serde_json::from_str(frame).ok()?;
    Some((UserId::parse(fields.user).ok()?, fields.ts))
}
