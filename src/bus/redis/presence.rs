//! Presence on the Redis bus: who is in which room on which replica, with per-replica leases
//! so a dead replica's members leave together.
//!
//! Per room `R` (all under the room's `{R}` hash tag, so each script stays in one Cluster
//! slot): `P:{R}:presence:users` (hash: user → number of replicas holding the user),
//! `P:{R}:presence:node:<node>` (set: the users `<node>` holds there) and
//! `P:{R}:presence:nodes` (hash: node → how many users it holds there). A join or leave
//! touches one field of each, so its cost does not grow with the room; `join`/`leave` events
//! go out when a user's count moves 0 → 1 or 1 → 0, each moving the counter
//! `P:{R}:presence:version` on by one (its value goes into the event's envelope; the members
//! script reads it with the list, see `bus::PresenceVersion`).
//!
//! Per replica: `P:nodes` (sorted set: node → lease expiry in ms of Redis's own clock),
//! `P:node:<node>:room-members` (hash: room → this node's members there; a room is dropped
//! when its last member leaves, and the key expires [`NODE_ROOMS_TTL`] after the node's last
//! lease tick) and `P:node:<node>:owner` (the instance token of the process running under
//! that node id, with the lease as TTL). A survivor that sees a lease run out reaps that
//! node: for each room in its hash, one script removes its set and publishes the `leave`s,
//! in time linear in that node's members of the room.
//!
//! Node-id clash policy: a process takes the owner key with a random token before it records
//! any presence (the replica is not ready until then). If another token holds it, the
//! process waits: a crashed predecessor's key runs out within one lease. If the key is still
//! held by the foreign token one lease and one tick later, its owner is alive and renewing,
//! and the process exits non-zero with an error naming `server.node_id`. A clash that shows
//! up later (Redis restarted empty and the other process took the key first) is logged as an
//! error on every lease tick. A clean shutdown releases the key, so a restart is not delayed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::scripts::Script;
use futures_util::FutureExt;
use parking_lot::Mutex;

use super::{sent, strip_comments, unavailable, RedisBus};
use crate::bus::{BusError, BusFuture, PresenceChange, PresenceSnapshot};
use crate::domain::{now_ms, RoomName, UserId};
use crate::logctx;
use crate::protocol::ServerFrame;

const CHANGE_LUA: &str = include_str!("../lua/presence.lua");
/// The change script as sent with every EVAL (see `presence_changes`).
static CHANGE_BODY: LazyLock<String> = LazyLock::new(|| strip_comments(CHANGE_LUA));
const MEMBERS_LUA: &str = include_str!("../lua/members.lua");
const REAP_LUA: &str = include_str!("../lua/reap.lua");
const LEASE_LUA: &str = include_str!("../lua/lease.lua");
const OWNER_LUA: &str = include_str!("../lua/owner.lua");
const ROOMS_LUA: &str = include_str!("../lua/rooms.lua");

/// How long a replica's room hash outlives its last lease tick. Survivors reap a dead replica
/// within a lease or so, and a replica that starts after the whole cluster was down reaps it
/// on its first tick; only a cluster down longer than this leaves that replica's members in
/// the rooms' keys (hidden from presence lists, as their holder's lease ran out).
const NODE_ROOMS_TTL: Duration = Duration::from_secs(24 * 3600);

/// The presence scripts and this process's claim on its node id.
pub(super) struct Presence {
    members: Script,
    reap: Script,
    lease: Script,
    owner: Script,
    rooms: Script,
    /// Random per process: tells this process apart from another one under the same node id.
    token: String,
    /// `None` once this process holds its node id and has cleared its previous life's
    /// members; else why presence cannot be recorded yet.
    pending: Mutex<Option<String>>,
    /// Set by a clean shutdown: a lease tick still running must not take the id back.
    released: AtomicBool,
    /// Held by a lease tick while it runs, so a clean shutdown's release comes after it.
    ticking: tokio::sync::Mutex<()>,
}

impl Presence {
    pub(super) fn new() -> Self {
        Self {
            members: Script::from_lua(MEMBERS_LUA),
            reap: Script::from_lua(REAP_LUA),
            lease: Script::from_lua(LEASE_LUA),
            owner: Script::from_lua(OWNER_LUA),
            rooms: Script::from_lua(ROOMS_LUA),
            token: format!("{:016x}", rand::random::<u64>()),
            pending: Mutex::new(Some("claiming server.node_id".into())),
            released: AtomicBool::new(false),
            ticking: tokio::sync::Mutex::new(()),
        }
    }

    /// `Err(reason)` until the replica may record presence.
    pub(super) fn ready(&self) -> Result<(), String> {
        self.pending.lock().clone().map_or(Ok(()), Err)
    }

    fn set_pending(&self, reason: Option<String>) {
        *self.pending.lock() = reason;
    }
}

/// The keys of one room's presence.
struct PresenceKeys {
    users: String,
    holders: String,
    /// The room's presence version (a counter, see `lua/presence.lua`).
    version: String,
    /// Prefix of the per-node sets; the node id completes it.
    node_set: String,
}

impl PresenceKeys {
    fn node(&self, node: &str) -> String {
        format!("{}{node}", self.node_set)
    }
}

/// Why a process may not run under its node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "another confab process is running with server.node_id `{node}`: it kept renewing its \
     presence lease for {waited:?} after this one started. Give every replica its own \
     server.node_id (CONFAB_SERVER__NODE_ID)"
)]
pub struct NodeIdTaken {
    pub node: String,
    pub waited: Duration,
}

impl RedisBus {
    /// The room's presence users hash: read.lua checks whether anybody is in the room.
    pub(super) fn presence_users_key(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:presence:users", self.prefix)
    }

    fn presence_keys(&self, room: &RoomName) -> PresenceKeys {
        let p = &self.prefix;
        PresenceKeys {
            users: self.presence_users_key(room),
            holders: format!("{p}:{{{room}}}:presence:nodes"),
            version: format!("{p}:{{{room}}}:presence:version"),
            node_set: format!("{p}:{{{room}}}:presence:node:"),
        }
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    fn node_rooms_key(&self, node: &str) -> String {
        format!("{}:node:{node}:room-members", self.prefix)
    }

    fn owner_key(&self) -> String {
        format!("{}:node:{}:owner", self.prefix, self.node)
    }

    /// How often the lease is renewed: three times per lease.
    pub(in crate::bus) fn tick_every(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(200))
    }

    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }

    /// Takes or renews this process's hold on its node id; `false` when another process
    /// holds it.
    async fn hold_node_id(&self) -> Result<bool, fred::error::Error> {
        if self.presence.released.load(Ordering::Acquire) {
            return Ok(true);
        }
        let held = self.owner_call("hold", self.lease_ms()).await?;
        Ok(held == 1)
    }

    /// Runs the `owner` script for this process's token (`hold` with a TTL, or `release`).
    async fn owner_call(&self, action: &str, ttl_ms: i64) -> Result<i64, fred::error::Error> {
        self.presence
            .owner
            .evalsha_with_reload(
                &self.client,
                vec![self.owner_key()],
                vec![
                    action.to_owned(),
                    self.presence.token.clone(),
                    ttl_ms.to_string(),
                ],
            )
            .await
    }

    /// A clean shutdown's last words: gives up this replica's presence lease at once (its
    /// members still recorded leave now, with their `leave` events, instead of when the lease
    /// runs out) and frees the node id, so a restart under it need not wait a lease.
    pub(crate) async fn release_node_id(&self) {
        self.presence.released.store(true, Ordering::Release);
        // A lease tick already running finishes first; later ones do nothing.
        let _tick = self.presence.ticking.lock().await;
        let node = Arc::clone(&self.node);
        match self.reap_node(&node).await {
            Ok(()) => log::info!("{} released its presence lease", logctx::node(&self.node)),
            Err(e) => log::warn!(
                "{} could not release its presence lease (it runs out by itself): {e}",
                logctx::node(&self.node)
            ),
        }
        let released = self.owner_call("release", 0).await;
        if let Err(e) = released {
            log::warn!(
                "{} could not release its node id: {e}",
                logctx::node(&self.node)
            );
        }
    }

    /// Start-up: waits until this process holds its node id (see the module doc), then clears
    /// what a previous process under the same id left behind and takes the first lease. Only
    /// then may the replica record presence.
    pub(in crate::bus) async fn claim_node_id(&self) -> Result<(), NodeIdTaken> {
        let every = self.tick_every();
        // A crashed predecessor's key lasts at most one lease from its last renewal; one more
        // tick covers a renewal that landed just before we first looked.
        let patience = self.lease + every;
        let mut foreign_since: Option<Instant> = None;
        loop {
            match self.hold_node_id().await {
                Ok(true) => break,
                Ok(false) => {
                    let since = *foreign_since.get_or_insert_with(|| {
                        log::warn!(
                            "{} another process holds this server.node_id; waiting up to \
                             {patience:?} for its lease to run out (a crashed predecessor's does)",
                            logctx::node(&self.node)
                        );
                        Instant::now()
                    });
                    if since.elapsed() > patience {
                        return Err(NodeIdTaken {
                            node: self.node.to_string(),
                            waited: since.elapsed(),
                        });
                    }
                    self.presence.set_pending(Some(format!(
                        "waiting for server.node_id `{}` to be free",
                        self.node
                    )));
                }
                Err(e) => log::debug!(
                    "{} cannot claim its node id yet: {e}",
                    logctx::node(&self.node)
                ),
            }
            tokio::time::sleep(every).await;
        }
        // Members a previous process under this id left behind (it was killed): nobody holds
        // them now. Retried until Redis answers, as nothing may be recorded before.
        loop {
            let node = self.node.clone();
            match self.reap_node(&node).await {
                Ok(()) => match self.lease_tick().await {
                    Ok(()) => break,
                    Err(e) => log::debug!(
                        "{} first lease not taken yet: {e}",
                        logctx::node(&self.node)
                    ),
                },
                Err(e) => log::debug!(
                    "{} cannot clear stale presence yet: {e}",
                    logctx::node(&self.node)
                ),
            }
            tokio::time::sleep(every).await;
        }
        self.presence.set_pending(None);
        Ok(())
    }

    /// Renews this replica's lease (and its node-id hold and room-hash TTL), then reaps the
    /// members of replicas whose lease ran out (publishing their `leave` events).
    pub(in crate::bus) async fn lease_tick(&self) -> Result<(), fred::error::Error> {
        let _tick = self.presence.ticking.lock().await;
        if self.presence.released.load(Ordering::Acquire) {
            return Ok(()); // shut down cleanly: the lease is given up, not renewed
        }
        if !self.hold_node_id().await? {
            log::error!(
                "{} another confab process is running with this server.node_id; both \
                 replicas' presence is unreliable (each may reap the other's members). Give \
                 every replica its own server.node_id",
                logctx::node(&self.node)
            );
        }
        let dead: Vec<String> = self
            .presence
            .lease
            .evalsha_with_reload(
                &self.client,
                vec![self.nodes_key()],
                vec![
                    "renew".to_owned(),
                    self.node.to_string(),
                    self.lease_ms().to_string(),
                ],
            )
            .await?;
        let _: i64 = self
            .client
            .expire(
                self.node_rooms_key(&self.node),
                NODE_ROOMS_TTL.as_secs() as i64,
                None,
            )
            .await?;
        for node in dead {
            self.reap_node(&node).await?;
        }
        Ok(())
    }

    /// Removes a dead replica's members, room by room. Only the replica that wins the ZREM
    /// does the work (or the node itself, clearing a previous life at start-up).
    async fn reap_node(&self, node: &str) -> Result<(), fred::error::Error> {
        let removed: i64 = self.client.zrem(self.nodes_key(), node).await?;
        if removed == 0 && node != &*self.node {
            return Ok(());
        }
        let rooms_key = self.node_rooms_key(node);
        let rooms: Vec<String> = self.client.hkeys(&rooms_key).await?;
        log::info!(
            "{} reaping replica {node}: {} rooms",
            logctx::node(&self.node),
            rooms.len()
        );
        for room in rooms.iter().filter_map(|r| RoomName::parse(r).ok()) {
            let keys = self.presence_keys(&room);
            let room_keys = self.keys(&room);
            let [head, before_user, middle, tail] = leave_template(&room);
            let gone: Vec<String> = self
                .presence
                .reap
                .evalsha_with_reload(
                    &self.client,
                    vec![
                        keys.users.clone(),
                        keys.node(node),
                        keys.holders.clone(),
                        room_keys.meta,
                        keys.version.clone(),
                    ],
                    vec![
                        node.to_owned(),
                        room_keys.channel,
                        head,
                        before_user,
                        middle,
                        tail,
                        self.empty_room_ttl_secs.to_string(),
                    ],
                )
                .await?;
            log::debug!(
                "{} {} users left with replica {node}",
                logctx::node(&self.node).room(&room),
                gone.len()
            );
        }
        let _: i64 = self.client.del(&rooms_key).await?;
        Ok(())
    }

    /// Adds `delta` to this replica's member count of `room` (dropping the room at 0).
    async fn count_room(&self, room: &str, delta: i64) -> Result<(), fred::error::Error> {
        let _: i64 = self
            .presence
            .rooms
            .evalsha_with_reload(
                &self.client,
                vec![self.node_rooms_key(&self.node)],
                vec![
                    room.to_owned(),
                    delta.to_string(),
                    NODE_ROOMS_TTL.as_secs().to_string(),
                ],
            )
            .await?;
        Ok(())
    }

    /// Records a run of joins and leaves of this replica's in one room, in order, with one
    /// script call (see `lua/presence.lua`).
    pub(super) fn presence_changes(
        self: &Arc<Self>,
        room: &RoomName,
        changes: Vec<PresenceChange>,
    ) -> BusFuture<()> {
        if let Err(e) = self.check_ready() {
            return futures_util::future::ready(Err(e)).boxed();
        }
        if changes.is_empty() {
            return futures_util::future::ready(Ok(())).boxed();
        }
        let ts = now_ms();
        let keys = self.presence_keys(room);
        let room_keys = self.keys(room);
        let script_keys = vec![
            keys.users.clone(),
            keys.node(&self.node),
            keys.holders,
            room_keys.meta,
            keys.version,
        ];
        let mut args = Vec::with_capacity(4 + 4 * changes.len());
        args.extend([
            self.node.to_string(),
            room_keys.channel,
            self.ttl_secs.to_string(),
            self.empty_room_ttl_secs.to_string(),
        ]);
        for change in &changes {
            let user = &change.user;
            let (kind, frame) = if change.joined {
                ("join", ServerFrame::Join { room, user, ts }.to_text())
            } else {
                ("leave", ServerFrame::Leave { room, user, ts }.to_text())
            };
            let (event_head, event_tail) = Self::presence_envelope(kind, user, &frame);
            args.extend([kind.to_owned(), user.to_string(), event_head, event_tail]);
        }
        let joins = changes.iter().filter(|c| c.joined).count() as i64;
        let bus = Arc::clone(self);
        let room = room.to_string();
        // Both commands are sent now, in this order: the hub calls join and leave in the
        // order its sessions came and went, and Redis must record them in that order (a
        // quick reconnect's join must not land before the old connection's leave).
        let count = (joins > 0).then(|| {
            let (bus, room) = (Arc::clone(&bus), room.clone());
            // Counted before the members are recorded: a crash in between leaves the room
            // listed for nothing (harmless), never a member no survivor can find.
            sent(async move { bus.count_room(&room, joins).await })
        });
        let client = bus.client.clone();
        let change = sent(async move {
            // EVAL with the body: a NOSCRIPT retry would land after later changes.
            client
                .eval::<Vec<i64>, _, _, _>(CHANGE_BODY.as_str(), script_keys, args)
                .await
        });
        async move {
            if let Some(count) = count {
                count.await.map_err(unavailable)?;
            }
            let reply: Vec<i64> = change.await.map_err(unavailable)?;
            // A repeated join recorded nothing, so it takes its count back; a leave that
            // removed a member takes one away, which drops the room after its last member.
            let back = changes
                .iter()
                .zip(reply.chunks(2))
                .filter(|(c, r)| c.joined != (r.first() == Some(&1)))
                .count() as i64;
            if back == 0 {
                return Ok(());
            }
            if let Err(e) = bus.count_room(&room, -back).await {
                // The changes themselves are recorded; a stale count only keeps the room
                // listed for the reaper, which then finds nothing there.
                log::warn!(
                    "{} cannot update its room list: {e}",
                    logctx::node(&bus.node).room(&room)
                );
            }
            Ok(())
        }
        .boxed()
    }

    /// The room's users held by live replicas, sorted, with the presence version.
    pub(super) fn members(self: &Arc<Self>, room: &RoomName) -> BusFuture<PresenceSnapshot> {
        let keys = self.presence_keys(room);
        let bus = Arc::clone(self);
        async move {
            let mut args: Vec<String> = bus
                .presence
                .lease
                .evalsha_with_reload(
                    &bus.client,
                    vec![bus.nodes_key()],
                    vec!["live".to_owned(), bus.node.to_string(), "0".into()],
                )
                .await
                .map_err(unavailable)?;
            // Our own members count even before the first lease tick lists us.
            args.push(bus.node.to_string());
            args.insert(0, keys.node_set);
            let reply: Value = bus
                .presence
                .members
                .evalsha_with_reload(
                    &bus.client,
                    vec![keys.users, keys.holders, keys.version],
                    args,
                )
                .await
                .map_err(unavailable)?;
            parse_members(reply)
        }
        .boxed()
    }
}

/// `{version, users, hidden}` from the members script.
fn parse_members(reply: Value) -> Result<PresenceSnapshot, BusError> {
    let mut parts = reply.into_array().into_iter();
    let version = parts
        .next()
        .and_then(|v| v.as_u64())
        .ok_or_else(|| BusError::Internal("unexpected reply from the members script".into()))?;
    let users = |part: Option<Value>| -> Vec<UserId> {
        let users = part.map(Value::into_array).unwrap_or_default();
        let mut users: Vec<UserId> = users
            .iter()
            .filter_map(|u| u.as_str().and_then(|u| UserId::parse(&u).ok()))
            .collect();
        users.sort();
        users
    };
    Ok(PresenceSnapshot {
        users: users(parts.next()),
        version,
        hidden: users(parts.next()),
    })
}

/// The `leave` envelope of `room` cut around its presence version and its two user ids, for
/// the reap script: `a + version + b + user + c + user + d` is a `leave` envelope as
/// [`RedisBus::presence_envelope`] makes it.
fn leave_template(room: &RoomName) -> [String; 4] {
    // A one-letter id: `"user":"x"` occurs exactly once in the frame (the room is in
    // `"room":"…"`).
    const MARK: &str = "x";
    let user = UserId::parse(MARK).unwrap_or_else(|_| UserId::guest());
    let frame = ServerFrame::Leave {
        room,
        user: &user,
        ts: now_ms(),
    }
    .to_text();
    let cut = format!(r#""user":"{user}""#);
    let (frame_head, frame_tail) = frame.split_once(cut.as_str()).unwrap_or_default();
    [
        r#"{"kind":"leave","version":"#.to_owned(),
        r#","user":""#.to_owned(),
        format!(r#"","frame":{frame_head}"user":""#),
        format!(r#""{frame_tail}}}"#),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_or_leave_touches_single_fields_never_a_whole_room() {
        // The cost of one change must not grow with the room: no command that reads or
        // walks a whole hash or set (the old script scanned every user with HKEYS).
        let commands: Vec<&str> = CHANGE_LUA
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .flat_map(|l| l.split("redis.call('").skip(1))
            .filter_map(|c| c.split('\'').next())
            .collect();
        assert!(!commands.is_empty());
        for c in &commands {
            assert!(
                [
                    "SADD", "SREM", "HINCRBY", "HDEL", "HGET", "EXISTS", "EXPIRE", "PUBLISH",
                    "TIME", "SET", "INCR", "PERSIST"
                ]
                .contains(c),
                "{c} in the presence change script"
            );
        }
    }

    #[test]
    fn the_reap_template_rebuilds_the_leave_envelope_for_any_user() {
        for room in ["lobby", "x", "user", "9"] {
            let room = RoomName::parse(room).unwrap();
            let [head, before_user, middle, tail] = leave_template(&room);
            for user in ["ann", "x", "user-1.b_c"] {
                let version = 1_765_110_000_123_456_u64;
                let rebuilt = format!("{head}{version}{before_user}{user}{middle}{user}{tail}");
                let v: serde_json::Value = serde_json::from_str(&rebuilt).unwrap();
                assert_eq!(v["kind"], "leave");
                assert_eq!(v["version"], version);
                assert_eq!(v["user"], user);
                assert_eq!(v["frame"]["type"], "leave");
                assert_eq!(v["frame"]["room"], room.as_str());
                assert_eq!(v["frame"]["user"], user);
                assert!(v["frame"]["ts"].as_u64().is_some());
            }
        }
    }
}
