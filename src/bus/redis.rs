//! The Redis bus: replicas share rooms through one Redis (standalone, Sentinel or Cluster).
//!
//! [`RedisBus`] implements the bus contract with a publisher client and Lua scripts (`lua/`):
//! - `publish` assigns each message of a run its offset, appends it to the room's history
//!   stream and PUBLISHes it, in one call (sent in call order, see [`Bus::publish`]; never
//!   retried after `NOSCRIPT`);
//! - `read` serves head, resume and history from one snapshot;
//! - `renew` moves a room whose store went back to a new epoch;
//! - presence, with per-replica leases and reaping, lives in the `presence` module and its
//!   scripts (`presence`, `members`, `reap`, `lease`, `owner`, `rooms`).
//!
//! The subscriber side lives in [`RedisBridge`](super::bridge::RedisBridge).
//!
//! Key layout (docs/design.md, "The Redis bus"), `P` the prefix and `R` the room. Per room, all
//! under the `{R}` hash tag so one script may use them together on a Redis Cluster:
//! - `P:{R}:meta` (hash: epoch, offset), `P:{R}:history` (stream, entry id `<offset>-0`,
//!   field `f` = the message frame), `P:{R}:ref:<user>:<ref>` (string "epoch offset", 5 min);
//! - `P:{R}:presence:users` (hash: user → number of replicas holding the user),
//!   `P:{R}:presence:node:<node>` (set: the users that replica holds in the room),
//!   `P:{R}:presence:nodes` (hash: node → number of users it holds in the room),
//!   `P:{R}:presence:version` (counter: one more per published join or leave).
//!
//! Per replica: `P:nodes` (sorted set: node → lease expiry, ms of Redis's clock),
//! `P:node:<node>:room-members` (hash: room → that node's members there; pruned at 0, expires
//! a day after the node's last lease tick), `P:node:<node>:owner` (string: the instance token
//! of the process running under that node id, lease TTL).
//!
//! Channel `P:room:R` carries JSON envelopes
//! `{"kind","epoch"?,"offset"?,"version"?,"user"?,"frame"}` whose `frame` is the client frame
//! as is (`version`: the presence version a join or leave produced).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::{ReconnectPolicy, UnresponsiveConfig};
use fred::types::scripts::Script;
use fred::types::Message as PubSubMessage;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    Bus, BusError, BusFuture, EventKind, HistoryPage, NewMessage, PresenceChange, PresenceSnapshot,
    PresenceVersion, Published, Renewed, Replay, RoomEvent, RoomHead, StoredMessage, REF_TTL,
};
use crate::domain::{now_ms, Epoch, Offset, RoomName, UserId};
use crate::logctx;
use crate::protocol::ServerFrame;
use crate::settings::Settings;
use crate::store::Page;

mod archive;
mod presence;
mod replication;

pub use archive::{run as run_archiver, Archive};
pub use presence::NodeIdTaken;
use presence::Presence;
use replication::Replication;

const PUBLISH_LUA: &str = include_str!("lua/publish.lua");
const READ_LUA: &str = include_str!("lua/read.lua");
const RENEW_LUA: &str = include_str!("lua/renew.lua");

/// Pub/Sub messages the subscriber may buffer before a slow bridge counts as lagging.
const PUBSUB_BUFFER: usize = 8192;

/// What a channel message carries.
#[derive(Debug, Deserialize)]
struct Envelope<'a> {
    kind: &'a str,
    #[serde(default)]
    epoch: Option<&'a str>,
    #[serde(default)]
    offset: Offset,
    #[serde(default)]
    user: Option<&'a str>,
    /// Join and leave: the room's presence version the change produced.
    #[serde(default)]
    version: PresenceVersion,
    #[serde(borrow)]
    frame: &'a RawValue,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

pub struct RedisBus {
    client: Client,
    /// The bridge's subscriber, looked at by readiness itself: the bridge learns of a dead
    /// subscription only at its next check, and `/readyz` must not say 200 meanwhile.
    subscriber: SubscriberClient,
    pub(super) node: Arc<str>,
    prefix: Arc<str>,
    history_size: usize,
    ttl_secs: u64,
    /// How long a room with no message outlives its last member.
    empty_room_ttl_secs: u64,
    pub(super) lease: Duration,
    /// `None` while subscribed; else why the replica is not ready.
    not_ready: Mutex<Option<String>>,
    publish: Script,
    /// A script reload after `NOSCRIPT` is running.
    reloading: AtomicBool,
    read: Script,
    renew: Script,
    presence: Presence,
    /// `WAIT`s for `redis.replicas_to_ack` replicas before an ack (none when 0).
    replication: Replication,
    /// The PostgreSQL archive behind Redis (`store.url = postgres://…`), if any.
    archive: Option<Archive>,
}

/// What the read script found: the head, the entries asked for, and where a renewed epoch
/// continues (0 for one that started empty).
struct Read {
    head: RoomHead,
    messages: Vec<StoredMessage>,
    base: Offset,
}

/// The keys of one room; all share the `{room}` hash tag, so one script may use them together
/// on a Redis Cluster.
struct RoomKeys {
    meta: String,
    history: String,
    channel: String,
}

impl RedisBus {
    /// Builds the clients (not yet connected) for `redis.url`.
    pub fn new(
        settings: &Settings,
        node: Arc<str>,
        archive: Option<Archive>,
    ) -> Result<(Arc<Self>, SubscriberClient), BusError> {
        let timeout = settings.redis.command_timeout_ms;
        let mut config = Config::from_url(&settings.redis.url).map_err(unavailable)?;
        // Keep trying at start-up too: a replica that starts before Redis is not ready, not dead.
        config.fail_fast = false;
        let mut builder = Builder::from_config(config);
        builder
            // Without a policy fred never reconnects. 0 attempts = retry forever.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2000, 2))
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                // A publish is not replayed after a reconnect: it may have run, and the client's
                // retry with the same `ref` is the safe way to find out.
                c.max_command_attempts = 1;
                // Notice a silent Redis (no RST, no reply) within seconds.
                c.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(timeout),
                    interval: Duration::from_millis(500),
                };
                c.tcp.nodelay = Some(true);
            })
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
                p.broadcast_channel_capacity = PUBSUB_BUFFER;
            });
        let client = builder.build().map_err(unavailable)?;
        let subscriber = builder.build_subscriber_client().map_err(unavailable)?;
        let bus = Arc::new(Self {
            client,
            subscriber: subscriber.clone(),
            node,
            prefix: Arc::from(settings.redis.prefix.as_str()),
            history_size: settings.history.size,
            ttl_secs: settings.history.ttl_secs.as_secs(),
            empty_room_ttl_secs: settings.history.empty_room_ttl_secs.as_secs(),
            lease: settings.redis.presence_lease_secs,
            not_ready: Mutex::new(Some("connecting to Redis".into())),
            publish: Script::from_lua(PUBLISH_LUA),
            reloading: AtomicBool::new(false),
            read: Script::from_lua(READ_LUA),
            renew: Script::from_lua(RENEW_LUA),
            presence: Presence::new(),
            replication: Replication::new(settings.redis.replicas_to_ack, timeout),
            archive,
        });
        Ok((bus, subscriber))
    }

    /// Loads the publish script, so publishes can call it by SHA; the bridge does this after
    /// every resubscribe, before the replica takes publishes again.
    pub(super) async fn load_scripts(&self) {
        if let Err(e) = self.publish.load(&self.client).await {
            log::warn!(
                "{} cannot load the publish script: {e}",
                logctx::node(&self.node)
            );
        }
    }

    /// Starts the publisher's connection task (it reconnects by itself).
    pub(super) fn connect(&self) {
        let _task = self.client.connect();
    }

    fn keys(&self, room: &RoomName) -> RoomKeys {
        let p = &self.prefix;
        RoomKeys {
            meta: format!("{p}:{{{room}}}:meta"),
            history: format!("{p}:{{{room}}}:history"),
            channel: format!("{p}:room:{room}"),
        }
    }

    pub(super) fn pattern(&self) -> String {
        format!("{}:room:*", self.prefix)
    }

    pub(super) fn set_not_ready(&self, reason: Option<String>) {
        *self.not_ready.lock() = reason;
    }

    fn check_ready(&self) -> Result<(), BusError> {
        self.ready_state().map_err(BusError::Unavailable)
    }

    fn ready_state(&self) -> Result<(), String> {
        if !self.client.is_connected() {
            return Err("Redis publisher disconnected".into());
        }
        if !self.subscriber.is_connected() {
            return Err("Redis subscriber disconnected".into());
        }
        self.not_ready.lock().clone().map_or(Ok(()), Err)?;
        // Nothing may be recorded before this process holds its node id.
        self.presence.ready()
    }

    /// The room a channel belongs to, if it is one of ours; no allocation.
    pub(super) fn room_of<'c>(&self, channel: &'c str) -> Option<&'c str> {
        channel.strip_prefix(&*self.prefix)?.strip_prefix(":room:")
    }

    /// Turns a channel message into a room event; `None` for anything not ours.
    pub(super) fn decode(&self, msg: &PubSubMessage) -> Option<RoomEvent> {
        let room = self
            .room_of(&msg.channel)
            .and_then(|r| RoomName::parse(r).ok())?;
        let payload = msg.value.as_str()?;
        let envelope: Envelope = match serde_json::from_str(&payload) {
            Ok(e) => e,
            Err(e) => {
                log::warn!(
                    "{} ignoring a malformed bus event: {e}",
                    logctx::room(&room)
                );
                return None;
            }
        };
        let user = || envelope.user.and_then(|u| UserId::parse(u).ok());
        let kind = match envelope.kind {
            "message" => EventKind::Message {
                epoch: Epoch::from_string(envelope.epoch?),
                offset: envelope.offset,
            },
            "join" => EventKind::Join {
                user: user()?,
                version: envelope.version,
            },
            "leave" => EventKind::Leave {
                user: user()?,
                version: envelope.version,
            },
            "typing" => EventKind::Typing { user: user()? },
            _ => return None,
        };
        Some(RoomEvent {
            room,
            kind,
            json: ByteString::from(envelope.frame.get()),
        })
    }

    fn envelope(kind: &str, user: &UserId, frame: &str) -> String {
        // User ids are letters, digits and `_.-`: nothing to escape.
        format!(r#"{{"kind":"{kind}","user":"{user}","frame":{frame}}}"#)
    }

    /// A join or leave envelope cut where its presence version goes: the script that makes
    /// the change knows the version, and puts it between the two.
    fn presence_envelope(kind: &str, user: &UserId, frame: &str) -> (String, String) {
        (
            format!(r#"{{"kind":"{kind}","version":"#),
            format!(r#","user":"{user}","frame":{frame}}}"#),
        )
    }

    /// Parses `{epoch, offset, entries, base}` from the read script.
    fn parse_read(value: Value) -> Result<Read, BusError> {
        let bad = || bad_reply("read");
        let mut parts = value.into_array().into_iter();
        let head = reply_head(&mut parts, "read")?;
        let entries = parts.next().map(Value::into_array).unwrap_or_default();
        let mut messages = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut entry = entry.into_array().into_iter();
            let id = entry.next().and_then(|v| v.as_string()).ok_or_else(bad)?;
            let fields = entry.next().map(Value::into_array).unwrap_or_default();
            let offset = id
                .split('-')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(bad)?;
            let json = fields
                .into_iter()
                .nth(1)
                .and_then(|v| v.as_string())
                .ok_or_else(bad)?;
            messages.push(StoredMessage {
                offset,
                json: ByteString::from(json),
            });
        }
        // Absent from a script of an older confab still cached by SHA: no base.
        let base = parts.next().and_then(|v| v.as_u64()).unwrap_or(0);
        Ok(Read {
            head,
            messages,
            base,
        })
    }

    /// What a failed publish call tells its client.
    fn publish_failed(self: &Arc<Self>, e: fred::error::Error) -> BusError {
        if e.details().starts_with("NOSCRIPT") {
            // Not retried: later messages of this session may already be stored, and a retry
            // would land after them. The client's retry (same `ref`) is a new send. Redis lost
            // its scripts (a restart the bridge has not seen yet): load them again for the
            // next calls. One reload at a time: a burst of publishes in flight all fail alike.
            if !self.reloading.swap(true, Ordering::AcqRel) {
                let bus = Arc::clone(self);
                tokio::spawn(async move {
                    bus.load_scripts().await;
                    bus.reloading.store(false, Ordering::Release);
                });
            }
            return BusError::Unavailable("Redis is loading confab's scripts; try again".into());
        }
        unavailable(e)
    }

    fn read_room(
        self: &Arc<Self>,
        room: &RoomName,
        mode: &'static str,
        offset: Offset,
        limit: usize,
    ) -> BusFuture<Read> {
        let bus = Arc::clone(self);
        let keys = self.keys(room);
        let users = self.presence_users_key(room);
        let room = room.clone();
        async move {
            // With an archive, a room without meta is seeded from it first (then read again);
            // one the archive does not know gets a new epoch as without one.
            let mut seed = bus.archive.is_some();
            for _ in 0..3 {
                let new_epoch = match seed {
                    true => String::new(),
                    false => Epoch::generate().as_str().to_owned(),
                };
                let args: Vec<Value> = vec![
                    mode.into(),
                    // Decimal strings: the script uses them in stream ids as they are.
                    offset.to_string().into(),
                    limit.to_string().into(),
                    new_epoch.into(),
                    Value::from(bus.ttl_secs as i64),
                    Value::from(bus.empty_room_ttl_secs as i64),
                ];
                let reply: Value = bus
                    .read
                    .evalsha_with_reload(
                        &bus.client,
                        vec![keys.meta.clone(), keys.history.clone(), users.clone()],
                        args,
                    )
                    .await
                    .map_err(unavailable)?;
                if !is_seed(&reply) {
                    let read = Self::parse_read(reply)?;
                    // Once per room per Redis connection: Redis may have come back older than
                    // the archive; if it was raised, read again (the raised head, and the
                    // stretch only the archive holds).
                    if bus.needs_older_check(&room) && bus.raise_if_older(&room, &read.head).await {
                        continue;
                    }
                    return Ok(read);
                }
                if let archive::Seeded::NotArchived = bus.seed(&room).await {
                    seed = false;
                }
            }
            Err(BusError::Unavailable(format!(
                "room {room} keeps losing its meta; try again"
            )))
        }
        .boxed()
    }
}

impl Bus for Arc<RedisBus> {
    fn publish(&self, room: &RoomName, msg: NewMessage) -> BusFuture<Published> {
        match self.publish_run(room, vec![msg]).pop() {
            Some(call) => call,
            None => unreachable!("one future per message"),
        }
    }

    fn publish_run(&self, room: &RoomName, msgs: Vec<NewMessage>) -> Vec<BusFuture<Published>> {
        let count = msgs.len();
        let each = |result: Result<Published, BusError>| {
            (0..count)
                .map(|_| futures_util::future::ready(result.clone()).boxed())
                .collect()
        };
        if count == 0 {
            return Vec::new();
        }
        if let Err(e) = self.check_ready() {
            return each(Err(e));
        }
        let keys = self.keys(room);
        let mut script_keys = Vec::with_capacity(2 + count);
        script_keys.push(keys.meta.clone());
        script_keys.push(keys.history.clone());
        let mut args: Vec<Value> = Vec::with_capacity(6 + 3 * count);
        // With an archive the script creates no epoch (''): the room is seeded first.
        let new_epoch = match self.archive {
            Some(_) => String::new(),
            None => Epoch::generate().as_str().to_owned(),
        };
        args.extend([
            keys.channel.into(),
            Value::from(self.history_size as i64),
            Value::from(self.ttl_secs as i64),
            new_epoch.into(),
            Value::from(REF_TTL.as_secs() as i64),
            if self.replication.enabled() { "1" } else { "0" }.into(),
        ]);
        let ts = now_ms();
        for msg in msgs {
            // Each frame is serialized here, once, with a marker where the script puts the
            // offset.
            let frame = ServerFrame::Message {
                room,
                offset: MARK,
                user: &msg.user,
                name: msg.name.as_deref(),
                text: &msg.text,
                ts,
            }
            .to_text();
            let (before, after) = split_at_offset(&frame);
            script_keys.push(match &msg.reference {
                Some(r) => format!("{}:{{{room}}}:ref:{}:{r}", self.prefix, msg.user),
                None => keys.meta.clone(),
            });
            args.extend([
                before.into(),
                after.into(),
                msg.reference.unwrap_or_default().into(),
            ]);
        }
        let client = self.client.clone();
        let sha = self.publish.sha1().clone();
        // Sent now, so one session's messages get their offsets in the order it sent them.
        let call = sent(async move {
            client
                .evalsha::<Value, _, _, _>(sha, script_keys, args)
                .await
        });
        // After the script was sent: the WAIT that answers this comes after it on the wire.
        let replicated = self
            .replication
            .enabled()
            .then(|| self.replication.confirm(&self.client, &keys.meta));
        let bus = Arc::clone(self);
        let room = room.clone();
        let run = async move {
            let reply = call.await.map_err(|e| bus.publish_failed(e))?;
            if is_seed(&reply) {
                // The room's meta is gone and the archive may hold its epoch (rare: a room in
                // use is read, and so seeded, before it takes publishes). Not retried here: a
                // later publish of the same session may already be on its way, and a retry
                // would land after it; the client's retry with its `ref` is the safe one.
                // A read seeds the meta from the archive, or starts a new epoch if it has none.
                let _ = bus.read_room(&room, "head", 0, 0).await;
                return Err(BusError::Unavailable(
                    "the room is being restored from the archive; try again".into(),
                ));
            }
            let mut parts = reply.into_array().into_iter();
            // `epoch, offset, duplicate` for the first message, `offset, duplicate` for each
            // further one.
            let RoomHead { epoch, offset } = reply_head(&mut parts, "publish")?;
            let mut stored = Vec::with_capacity(count);
            for i in 0..count {
                let offset = match i {
                    0 => offset,
                    _ => reply_offset(&mut parts, "publish")?,
                };
                let duplicate = reply_flag(&mut parts, "publish")?;
                stored.push(Published {
                    epoch: epoch.clone(),
                    offset,
                    duplicate,
                });
            }
            if let Some(replicated) = replicated {
                // Stored (and published), but acked only once enough replicas have it. If
                // they do not confirm in time the client retries with its ref, which finds
                // this message and waits for the replicas again.
                replicated.await?;
            }
            Ok::<_, BusError>(stored)
        };
        if count == 1 {
            // The usual run, a client sending one message at a time: nothing to share.
            return vec![run
                .map(|r| r.map(|mut stored| stored.swap_remove(0)))
                .boxed()];
        }
        let run = run.map(|r| r.map(Arc::new)).boxed().shared();
        (0..count)
            .map(|i| {
                let run = run.clone();
                async move { run.await.map(|stored| stored[i].clone()) }.boxed()
            })
            .collect()
    }

    fn typing(&self, room: &RoomName, user: &UserId) -> BusFuture<()> {
        let keys = self.keys(room);
        let frame = ServerFrame::Typing { room, user }.to_text();
        let event = RedisBus::envelope("typing", user, &frame);
        let client = self.client.clone();
        async move {
            let _: () = client
                .publish(keys.channel, event)
                .await
                .map_err(unavailable)?;
            Ok(())
        }
        .boxed()
    }

    fn head(&self, room: &RoomName) -> BusFuture<RoomHead> {
        self.read_room(room, "head", 0, 0)
            .map(|r| r.map(|read| read.head))
            .boxed()
    }

    fn replay(
        &self,
        room: &RoomName,
        since: Offset,
        epoch: &Epoch,
        limit: usize,
    ) -> BusFuture<Replay> {
        let epoch = epoch.clone();
        let read = self.read_room(room, "since", since, limit);
        let (bus, room) = (Arc::clone(self), room.clone());
        async move {
            let Read {
                head,
                messages,
                base,
            } = read.await?;
            // The script read after the base of a renewed epoch: its own messages.
            let since = since.max(base);
            if head.epoch != epoch || since > head.offset {
                return Ok(Replay::NotRecovered { head });
            }
            // Recovered only if the first missed message (since + 1) is still stored.
            let complete = messages
                .first()
                .map_or(since == head.offset, |m| m.offset == since + 1);
            if complete {
                return Ok(Replay::Recovered { head, messages });
            }
            // The stream no longer reaches back to `since`: the archive may (the caller
            // pages on from the last offset it gets, into the stream again).
            let Some(archive) = &bus.archive else {
                return Ok(Replay::NotRecovered { head });
            };
            let page = Page::After {
                since,
                until: head.offset,
                limit,
            };
            let stored = archive
                .bounded(archive.store.page(&room, &head.epoch, page))
                .await
                .map_err(|e| archive.read_failed(&room, e))?;
            let messages = contiguous_from(stored, since + 1);
            if messages.is_empty() {
                return Ok(Replay::NotRecovered { head });
            }
            Ok(Replay::Recovered { head, messages })
        }
        .boxed()
    }

    fn renew_epoch(&self, room: &RoomName, stale: &Epoch, floor: Offset) -> BusFuture<Renewed> {
        let keys = self.keys(room);
        let args: Vec<Value> = vec![
            stale.as_str().into(),
            floor.to_string().into(),
            Epoch::generate().as_str().into(),
            Value::from(self.ttl_secs as i64),
        ];
        let bus = Arc::clone(self);
        async move {
            let reply: Value = bus
                .renew
                .evalsha_with_reload(&bus.client, vec![keys.meta, keys.history], args)
                .await
                .map_err(unavailable)?;
            let mut parts = reply.into_array().into_iter();
            let head = reply_head(&mut parts, "renew")?;
            let created = reply_flag(&mut parts, "renew")?;
            Ok(Renewed { head, created })
        }
        .boxed()
    }

    fn history(
        &self,
        room: &RoomName,
        before: Option<Offset>,
        limit: usize,
    ) -> BusFuture<HistoryPage> {
        let read = self.read_room(room, "before", before.unwrap_or(0), limit);
        let (bus, room) = (Arc::clone(self), room.clone());
        async move {
            let Read {
                head,
                mut messages,
                base,
            } = read.await?;
            // Below what the stream gave: the page is full, or the stream holds the epoch's
            // start, or only the archive can fill it.
            let below = messages
                .first()
                .map_or(before.unwrap_or(Offset::MAX).min(head.offset + 1), |m| {
                    m.offset
                });
            let Some(archive) = bus
                .archive
                .as_ref()
                .filter(|_| messages.len() < limit && below > base + 1)
            else {
                return Ok(HistoryPage {
                    epoch: head.epoch,
                    messages,
                });
            };
            if archive.is_down() {
                // The archiver's last commit failed: serve the window's part at once rather
                // than wait for a store that is likely down.
                return Ok(HistoryPage {
                    epoch: head.epoch,
                    messages,
                });
            }
            let page = Page::Before {
                before: below,
                limit: limit - messages.len(),
            };
            match archive
                .bounded(archive.store.page(&room, &head.epoch, page))
                .await
            {
                Ok(mut older) => {
                    older.append(&mut messages);
                    messages = older;
                }
                // PostgreSQL down does not stop the chat: the window's part is served.
                Err(e) => drop(archive.read_failed(&room, e)),
            }
            Ok(HistoryPage {
                epoch: head.epoch,
                messages,
            })
        }
        .boxed()
    }

    fn join(&self, room: &RoomName, user: &UserId) -> BusFuture<()> {
        let change = PresenceChange {
            user: user.clone(),
            joined: true,
        };
        self.presence_changes(room, vec![change])
    }

    fn leave(&self, room: &RoomName, user: &UserId) -> BusFuture<()> {
        let change = PresenceChange {
            user: user.clone(),
            joined: false,
        };
        self.presence_changes(room, vec![change])
    }

    fn presence_changes(&self, room: &RoomName, changes: Vec<PresenceChange>) -> BusFuture<()> {
        RedisBus::presence_changes(self, room, changes)
    }

    fn presence_snapshot(&self, room: &RoomName) -> BusFuture<PresenceSnapshot> {
        self.members(room)
    }

    fn readiness(&self) -> Result<(), String> {
        self.ready_state()
    }
}

/// The run of `messages` that starts at `first` with no offset missing.
fn contiguous_from(messages: Vec<StoredMessage>, first: Offset) -> Vec<StoredMessage> {
    let mut want = first;
    messages
        .into_iter()
        .take_while(|m| {
            let ok = m.offset == want;
            want += 1;
            ok
        })
        .collect()
}

/// The `{'seed'}` answer of the publish and read scripts: the room has no meta and the
/// archive may hold its epoch.
fn is_seed(reply: &Value) -> bool {
    match reply {
        Value::Array(parts) => parts.len() == 1 && parts[0].as_str().as_deref() == Some("seed"),
        _ => false,
    }
}

fn bad_reply(script: &str) -> BusError {
    BusError::Internal(format!("unexpected reply from the {script} script"))
}

/// The `epoch, offset` that the publish, read and renew scripts' replies start with.
fn reply_head(parts: &mut impl Iterator<Item = Value>, script: &str) -> Result<RoomHead, BusError> {
    let epoch = parts.next().and_then(|v| v.as_string());
    let epoch = epoch.ok_or_else(|| bad_reply(script))?;
    Ok(RoomHead {
        epoch: Epoch::from_string(&epoch),
        offset: reply_offset(parts, script)?,
    })
}

/// An offset in a script's reply.
fn reply_offset(parts: &mut impl Iterator<Item = Value>, script: &str) -> Result<u64, BusError> {
    let offset = parts.next().and_then(|v| v.as_u64());
    offset.ok_or_else(|| bad_reply(script))
}

/// A 0/1 flag in a script's reply.
fn reply_flag(parts: &mut impl Iterator<Item = Value>, script: &str) -> Result<bool, BusError> {
    let flag = parts.next().and_then(|v| v.as_u64());
    flag.map(|f| f == 1).ok_or_else(|| bad_reply(script))
}

/// Starts a Redis call now rather than when its future is first awaited.
///
/// fred puts a command on its connection's queue the first time the command's future is
/// polled. Polling it once here means calls reach Redis in the order they were made, however
/// the caller later polls, spawns or holds back their futures: one session's publishes, and
/// the hub's joins and leaves of one user, keep their order.
pub(super) fn sent<T: Send + 'static>(
    call: impl std::future::Future<Output = T> + Send + 'static,
) -> BoxFuture<'static, T> {
    let mut call = call.boxed();
    match (&mut call).now_or_never() {
        Some(done) => futures_util::future::ready(done).boxed(),
        None => call,
    }
}

/// A Lua script without its whole-line comments.
fn strip_comments(lua: &str) -> String {
    lua.lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The offset a message frame is serialized with before the publish script knows the real one.
const MARK: u64 = 9_999_999_999_999_999;
/// `MARK` as the frame carries it. The key is part of the pattern: a room name may be all
/// digits too.
const MARK_FIELD: &str = r#""offset":9999999999999999"#;

/// Splits a serialized `message` frame around its offset value, so the publish script can put
/// the real offset there.
fn split_at_offset(frame: &str) -> (&str, &str) {
    match frame.find(MARK_FIELD) {
        Some(at) => {
            let value = at + r#""offset":"#.len();
            (&frame[..value], &frame[at + MARK_FIELD.len()..])
        }
        None => (frame, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_spliced_even_when_names_and_text_look_like_the_marker() {
        assert_eq!(MARK_FIELD, format!(r#""offset":{MARK}"#));
        let digits = MARK.to_string();
        let room = RoomName::parse(&digits).unwrap();
        let user = UserId::parse(&digits).unwrap();
        let lookalike = format!("{digits} {MARK_FIELD}");
        let frame = ServerFrame::Message {
            room: &room,
            offset: MARK,
            user: &user,
            name: Some(&lookalike),
            text: &lookalike,
            ts: 1,
        }
        .to_text();
        let (before, after) = split_at_offset(&frame);
        let spliced = format!("{before}42{after}");
        let v: serde_json::Value = serde_json::from_str(&spliced).unwrap();
        assert_eq!(v["offset"], 42);
        assert_eq!(v["room"], digits.as_str());
        assert_eq!(v["user"], digits.as_str());
        assert_eq!(v["text"], lookalike.as_str());
    }

    #[test]
    fn an_archive_page_counts_only_up_to_its_first_missing_offset() {
        let page = |offsets: &[u64]| {
            offsets
                .iter()
                .map(|&offset| StoredMessage {
                    offset,
                    json: ByteString::from("{}"),
                })
                .collect::<Vec<_>>()
        };
        let offsets = |m: Vec<StoredMessage>| m.iter().map(|m| m.offset).collect::<Vec<_>>();
        assert_eq!(offsets(contiguous_from(page(&[6, 7, 8]), 6)), [6, 7, 8]);
        assert_eq!(offsets(contiguous_from(page(&[6, 7, 9, 10]), 6)), [6, 7]);
        assert!(contiguous_from(page(&[7, 8]), 6).is_empty(), "6 is missing");
        assert!(is_seed(&Value::Array(vec![Value::from("seed")])));
        assert!(!is_seed(&Value::Array(vec![
            Value::from("seed"),
            Value::from(1)
        ])));
    }

    fn message(channel: &str, payload: &str) -> PubSubMessage {
        PubSubMessage {
            channel: channel.into(),
            value: Value::from(payload),
            kind: fred::types::MessageKind::PMessage,
            server: fred::types::config::Server::new("127.0.0.1", 6379),
        }
    }

    #[test]
    fn channel_envelopes_become_room_events_with_the_frame_untouched() {
        let mut settings = Settings::default();
        settings.redis.url = "redis://127.0.0.1:1".into();
        let (bus, _) = RedisBus::new(&settings, Arc::from("n"), None).unwrap();
        let frame =
            r#"{"type":"message","room":"lobby","offset":7,"user":"ann","text":"hi","ts":1}"#;
        let payload = format!(r#"{{"kind":"message","epoch":"e1","offset":7,"frame":{frame}}}"#);
        let event = bus.decode(&message("confab:room:lobby", &payload)).unwrap();
        assert_eq!(event.room.as_str(), "lobby");
        assert_eq!(&*event.json, frame);
        assert_eq!(
            event.kind,
            EventKind::Message {
                epoch: Epoch::from_string("e1"),
                offset: 7
            }
        );
        let typing = RedisBus::envelope(
            "typing",
            &UserId::parse("ann").unwrap(),
            r#"{"type":"typing"}"#,
        );
        let event = bus.decode(&message("confab:room:lobby", &typing)).unwrap();
        assert!(matches!(event.kind, EventKind::Typing { .. }));
        assert!(
            bus.decode(&message("other:room:lobby", &payload)).is_none(),
            "not our prefix"
        );
        assert!(bus
            .decode(&message("confab:room:lobby", "not json"))
            .is_none());
    }
}
