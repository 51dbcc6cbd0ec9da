//! Presence on the Redis bus: the cost of a join or leave does not grow with the room, a
//! replica forgets rooms it no longer has members in, and one node id runs one process. On
//! both buses: a client applying `presence`, `join` and `leave` as set operations holds the
//! room's set (docs/PROTOCOL.md §12).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::{json, Value};

use crate::harness::{eventually, replica_env, Client, Redis, Server};

const CHANGE_LUA: &str = include_str!("../../src/bus/lua/presence.lua");

/// Users seeded into the big room.
const SEEDED: usize = 5_000;

fn prefix(test: &str) -> String {
    format!("t{}-{test}", std::process::id())
}

/// Runs a command given as owned strings.
async fn cmd(redis: &Redis, args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    redis.cmd(&args).await
}

/// The integer of a `:N` reply.
fn integer(reply: &str) -> i64 {
    reply
        .strip_prefix(':')
        .and_then(|r| r.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("not an integer reply: {reply:?}"))
}

/// How long, in µs, Redis spent on the last command before `SLOWLOG GET` (the threshold is
/// 0, so every command is logged; nothing else talks to this Redis while it is read).
async fn last_command_micros(redis: &Redis) -> u64 {
    let reply = redis.cmd(&["SLOWLOG", "GET", "1"]).await;
    // `*1 *6 :id :unix-time :duration …`: the third integer is the duration.
    reply
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .nth(2)
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("unexpected SLOWLOG reply: {reply:?}"))
}

/// Puts `SEEDED` users held by a replica `seed` (with a lease that never runs out) into
/// `room`'s presence, in the layout the presence scripts keep.
async fn seed_room(redis: &Redis, p: &str, room: &str) {
    let users: Vec<String> = (0..SEEDED).map(|i| format!("u{i:05}")).collect();
    let mut counts = vec!["HSET".to_owned(), format!("{p}:{{{room}}}:presence:users")];
    for user in &users {
        counts.push(user.clone());
        counts.push("1".into());
    }
    assert_eq!(integer(&cmd(redis, &counts).await), SEEDED as i64);
    let mut set = vec![
        "SADD".to_owned(),
        format!("{p}:{{{room}}}:presence:node:seed"),
    ];
    set.extend(users);
    assert_eq!(integer(&cmd(redis, &set).await), SEEDED as i64);
    let holders = format!("{p}:{{{room}}}:presence:nodes");
    let n = SEEDED.to_string();
    redis.cmd(&["HSET", &holders, "seed", &n]).await;
    redis
        .cmd(&["ZADD", &format!("{p}:nodes"), "9e15", "seed"])
        .await;
}

/// Runs the presence script once, as a replica `probe` would, and returns Redis's time for it.
async fn time_change(redis: &Redis, p: &str, room: &str, kind: &str) -> u64 {
    let users = format!("{p}:{{{room}}}:presence:users");
    let set = format!("{p}:{{{room}}}:presence:node:probe");
    let holders = format!("{p}:{{{room}}}:presence:nodes");
    let channel = format!("{p}:room:{room}");
    let meta = format!("{p}:{{{room}}}:meta");
    let version = format!("{p}:{{{room}}}:presence:version");
    let head = format!(r#"{{"kind":"{kind}","version":"#);
    let tail = r#","user":"probe","frame":{}}"#;
    let reply = redis
        .cmd(&[
            "EVAL", CHANGE_LUA, "5", &users, &set, &holders, &meta, &version, "probe", &channel,
            "86400", "60", kind, "probe", &head, tail,
        ])
        .await;
    assert!(
        reply.starts_with("*2\r\n:1\r\n:1"),
        "the probe's {kind} changed presence and was published: {reply:?}"
    );
    last_command_micros(redis).await
}

/// Reads `watcher`'s frames until `user` leaves; returns every join/leave of `user` seen.
async fn presence_events_until_leave(watcher: &mut Client, user: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let v = watcher.next().await;
        let kind = v["type"].as_str().unwrap_or_default().to_owned();
        if (kind == "join" || kind == "leave") && v["user"] == user {
            seen.push(kind.clone());
            if kind == "leave" {
                return seen;
            }
        }
    }
}

#[tokio::test]
async fn a_join_and_a_leave_in_a_room_of_5000_are_listed_and_published_once() {
    // That they cost no scan is checked on the script itself (`redis/presence.rs` unit test);
    // the timings are printed, not asserted.
    let redis = Redis::start();
    let p = prefix("big");
    seed_room(&redis, &p, "big").await;

    // The script alone, measured by Redis while nothing else talks to it.
    redis
        .cmd(&["CONFIG", "SET", "slowlog-log-slower-than", "0"])
        .await;
    let join_us = time_change(&redis, &p, "big", "join").await;
    let leave_us = time_change(&redis, &p, "big", "leave").await;
    redis
        .cmd(&["CONFIG", "SET", "slowlog-log-slower-than", "10000"])
        .await;
    eprintln!(
        "presence script in a room of {SEEDED}: join {join_us} µs, leave {leave_us} µs \
         (Redis's own time per call)"
    );

    // The same through the real binary.
    let a = Server::replica(&redis, &p, "a", &[]).await;
    let (mut watcher, _) = a.join("/ws/big?user=watcher").await;
    let listed = watcher.next_of("presence").await;
    assert_eq!(
        listed["users"].as_array().map(Vec::len),
        Some(SEEDED + 1),
        "the seeded users and the watcher"
    );
    let joining = Instant::now();
    let (mut newcomer, _) = a.join("/ws/big?user=newcomer").await;
    let welcomed = joining.elapsed();
    let users = newcomer.next_of("presence").await["users"].clone();
    let users: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(users.len(), SEEDED + 2, "seeded + watcher + newcomer");
    assert!(users.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    assert!(users.contains(&"newcomer") && users.contains(&"u04999"));
    let join = watcher.next_of("join").await;
    let join_seen = joining.elapsed();
    assert_eq!(join["user"], "newcomer");

    let leaving = Instant::now();
    newcomer.close().await;
    let events = presence_events_until_leave(&mut watcher, "newcomer").await;
    let leave_seen = leaving.elapsed();
    assert_eq!(
        events,
        vec!["leave"],
        "after its one join, the newcomer left once and did not join again"
    );
    let counted = redis
        .cmd(&["HLEN", &format!("{p}:{{big}}:presence:users")])
        .await;
    assert_eq!(integer(&counted), SEEDED as i64 + 1, "seeded + watcher");
    eprintln!(
        "through the binary, room of {SEEDED}: welcome in {welcomed:?}, join seen by another \
         member after {join_seen:?}, leave seen {leave_seen:?} after the close"
    );
}

#[tokio::test]
async fn users_held_only_by_a_replica_without_a_live_lease_are_not_listed() {
    let redis = Redis::start();
    let p = prefix("ghost");
    // A replica `ghost` with no lease at all (so nobody reaps it) holds two users.
    let users = format!("{p}:{{g}}:presence:users");
    redis
        .cmd(&["HSET", &users, "spook", "1", "both", "1"])
        .await;
    redis
        .cmd(&[
            "SADD",
            &format!("{p}:{{g}}:presence:node:ghost"),
            "spook",
            "both",
        ])
        .await;
    redis
        .cmd(&["HSET", &format!("{p}:{{g}}:presence:nodes"), "ghost", "2"])
        .await;
    let a = Server::replica(&redis, &p, "a", &[]).await;
    let (_both, _) = a.join("/ws/g?user=both").await;
    let (mut watcher, _) = a.join("/ws/g?user=watcher").await;
    assert_eq!(
        watcher.next_of("presence").await["users"],
        json!(["both", "watcher"]),
        "`both` is also held by a live replica; `spook` only by the lease-less one"
    );
    assert_eq!(
        redis.cmd(&["HGET", &users, "both"]).await,
        "$1\r\n2\r\n",
        "two holders of `both`"
    );
}

#[tokio::test]
async fn a_replica_forgets_a_room_once_its_last_member_there_leaves() {
    let redis = Redis::start();
    let p = prefix("prune");
    let a = Server::replica(&redis, &p, "a", &[]).await;
    let rooms = format!("{p}:node:a:room-members");
    let (ann, _) = a.join("/ws/kept?user=ann").await;
    let (bob, _) = a.join("/ws/gone?user=bob").await;
    let (bob2, _) = a.join("/ws/gone?user=bob").await;
    let (cid, _) = a.join("/ws/gone?user=cid").await;
    assert_eq!(
        redis.cmd(&["HGET", &rooms, "gone"]).await,
        "$1\r\n2\r\n",
        "two users of this replica in `gone`"
    );
    let ttl = integer(&redis.cmd(&["TTL", &rooms]).await);
    assert!(ttl > 0, "the room list expires unless renewed: TTL {ttl}");
    bob.close().await;
    cid.close().await;
    bob2.close().await;
    eventually(Duration::from_secs(10), "`gone` is dropped", || async {
        redis.cmd(&["HEXISTS", &rooms, "gone"]).await == ":0\r\n"
    })
    .await;
    assert_eq!(redis.cmd(&["HGET", &rooms, "kept"]).await, "$1\r\n1\r\n");
    ann.close().await;
    eventually(
        Duration::from_secs(10),
        "the room list is empty",
        || async { redis.cmd(&["EXISTS", &rooms]).await == ":0\r\n" },
    )
    .await;
}

/// A replica's settings with a short lease, as owned pairs for `Server::start`.
fn short_lease_env(redis: &Redis, p: &str, node: &str) -> Vec<(String, String)> {
    let mut env = replica_env(redis, p, node);
    env.push(("CONFAB_REDIS__PRESENCE_LEASE_SECS".into(), "2".into()));
    env
}

const SHORT_LEASE: [(&str, &str); 1] = [("CONFAB_REDIS__PRESENCE_LEASE_SECS", "2")];

#[tokio::test]
async fn a_second_process_with_a_running_replicas_node_id_exits_non_zero_naming_the_setting() {
    let redis = Redis::start();
    let p = prefix("twin");
    let a = Server::replica(&redis, &p, "twin", &SHORT_LEASE).await;
    let (mut alice, _) = a.join("/ws/t?user=alice").await;

    let env = short_lease_env(&redis, &p, "twin");
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut twin = Server::start(&pairs);
    let status = twin.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "refused: {status:?}\n{}", twin.log());
    assert!(
        twin.log().contains("server.node_id `twin`"),
        "the error names the setting and the id:\n{}",
        twin.log()
    );

    // The first replica's members were not touched by the refused one.
    let (mut bob, _) = a.join("/ws/t?user=bob").await;
    assert_eq!(
        bob.next_of("presence").await["users"],
        json!(["alice", "bob"])
    );
    assert_eq!(alice.next_of("join").await["user"], "bob");
    alice.send_json(json!({"type":"presence"})).await;
    assert_eq!(
        alice.next_of("presence").await["users"],
        json!(["alice", "bob"])
    );
}

#[tokio::test]
async fn a_replica_restarted_under_its_node_id_after_a_crash_starts_and_clears_its_old_members() {
    let redis = Redis::start();
    let p = prefix("crash");
    let a = Server::replica(&redis, &p, "a", &SHORT_LEASE).await;
    let b = Server::replica(&redis, &p, "b", &SHORT_LEASE).await;
    let (_alice, _) = a.join("/ws/c?user=alice").await;
    let (mut bob, _) = b.join("/ws/c?user=bob").await;
    assert_eq!(
        bob.next_of("presence").await["users"],
        json!(["alice", "bob"])
    );

    a.signal(libc::SIGKILL);
    let restarted = Instant::now();
    // Its owner key and lease are still live: the new process waits them out, then starts.
    let again = Server::replica(&redis, &p, "a", &SHORT_LEASE).await;
    eprintln!(
        "restarted under the same node id, ready after {:?}",
        restarted.elapsed()
    );
    assert_eq!(bob.next_of("leave").await["user"], "alice");
    let (_alice, _) = again.join("/ws/c?user=alice").await;
    assert_eq!(bob.next_of("join").await["user"], "alice");
    bob.send_json(json!({"type":"presence"})).await;
    assert_eq!(
        bob.next_of("presence").await["users"],
        json!(["alice", "bob"])
    );
}

#[tokio::test]
async fn a_running_replica_logs_an_error_when_another_process_holds_its_node_id() {
    let redis = Redis::start();
    let p = prefix("stolen");
    let a = Server::replica(&redis, &p, "a", &SHORT_LEASE).await;
    // What a second process under the same id would hold after Redis came back empty.
    redis
        .cmd(&[
            "SET",
            &format!("{p}:node:a:owner"),
            "another",
            "PX",
            "60000",
        ])
        .await;
    eventually(Duration::from_secs(10), "the clash is logged", || async {
        a.log()
            .contains("another confab process is running with this server.node_id")
    })
    .await;
}

/// The users a fresh `presence` request lists.
async fn listed(client: &mut Client) -> Vec<String> {
    client.send_json(json!({"type":"presence"})).await;
    let v = client.next_of("presence").await;
    v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_reconnects_at_once_stays_present_and_leaves_when_gone() {
    let redis = Redis::start();
    let p = prefix("again");
    let server = Server::replica(&redis, &p, "a", &[]).await;
    let (mut watcher, _) = server.join("/ws/again?user=watcher").await;
    // Each close empties the room on this replica, so its room actor is reaped and a new one
    // made for the next connection: the old connection's leave must not land after the new
    // one's join.
    let mut client = server.connect("/ws/again?user=bob").await;
    for _ in 0..30 {
        client.close().await;
        client = server.connect("/ws/again?user=bob").await;
    }
    assert_eq!(client.next().await["type"], "welcome");
    poll_listed(&mut watcher, "bob", true).await;
    client.close().await;
    poll_listed(&mut watcher, "bob", false).await;
}

/// Asks for presence until `user` is (or is not) listed, within a deadline.
async fn poll_listed(watcher: &mut Client, user: &str, present: bool) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let users = listed(watcher).await;
        if users.iter().any(|u| u == user) == present {
            return;
        }
        assert!(
            Instant::now() < end,
            "{user} listed should be {present}: {users:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every frame `client` gets within `wait` of quiet.
async fn drain(client: &mut Client, wait: Duration) -> Vec<serde_json::Value> {
    let mut frames = Vec::new();
    while let Some(v) = client.try_next(wait).await {
        frames.push(v);
    }
    frames
}

#[tokio::test]
async fn a_room_over_the_join_limit_tells_no_joins_and_refreshes_presence_when_small_again() {
    let server = Server::start(&[("CONFAB_LIMITS__JOIN_EVENTS_MAX_MEMBERS", "3")]);
    let (mut first, _) = server.join("/ws/big?user=u1").await;
    let mut others = Vec::new();
    for i in 2..=8 {
        let (c, _) = server.join(&format!("/ws/big?user=u{i}")).await;
        others.push(c);
    }
    let frames = drain(&mut first, Duration::from_millis(700)).await;
    let joined: Vec<&str> = frames
        .iter()
        .filter(|f| f["type"] == "join")
        .filter_map(|f| f["user"].as_str())
        .collect();
    // u2 and u3 arrived in a room under the limit; u4's join may race its own session's
    // arrival; u5 to u8 arrived in a room over it.
    assert!(
        joined == ["u2", "u3"] || joined == ["u2", "u3", "u4"],
        "{frames:?}"
    );
    // Asked, the list is whole.
    first.send_json(json!({"type": "presence"})).await;
    let listed = first.next_of("presence").await;
    assert_eq!(
        listed["users"],
        json!(["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"])
    );
    // Five leave: back at the limit, members get the room's presence as it is now.
    for _ in 0..5 {
        others.pop().unwrap().close().await;
    }
    let fresh = first.next_of("presence").await;
    let mut users: Vec<String> = fresh["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    // The refresh may have read the list before the last leave was recorded; then that
    // leave's frame follows, since the room is small again. Every frame has a deadline.
    while users != ["u1", "u2", "u3"] {
        let f = first.next().await;
        match f["type"].as_str() {
            Some("leave") => users.retain(|u| f["user"] != u.as_str()),
            Some("presence") => {
                users = serde_json::from_value(f["users"].clone()).unwrap();
            }
            _ => {}
        }
        assert!(users.len() >= 3, "{users:?} after {f}");
    }
}

/// What one client made of the presence frames it got, applying them as set operations.
#[derive(Default)]
struct SetView {
    /// `None` until the first `presence` frame.
    users: Option<BTreeSet<String>>,
    /// `join`s for a user already in the set.
    spurious_joins: usize,
    /// `leave`s for a user not in the set.
    spurious_leaves: usize,
    /// `join`s or `leave`s before any `presence` frame.
    before_presence: usize,
}

impl SetView {
    fn apply(&mut self, frame: &Value) {
        let user = frame["user"].as_str().unwrap_or_default().to_owned();
        match frame["type"].as_str() {
            Some("presence") => {
                let users = frame["users"].as_array().expect("users").iter();
                self.users = Some(
                    users
                        .filter_map(|u| u.as_str().map(str::to_owned))
                        .collect(),
                );
            }
            Some("join") => match self.users.as_mut() {
                None => self.before_presence += 1,
                Some(set) => self.spurious_joins += usize::from(!set.insert(user)),
            },
            Some("leave") => match self.users.as_mut() {
                None => self.before_presence += 1,
                Some(set) => self.spurious_leaves += usize::from(!set.remove(&user)),
            },
            _ => {}
        }
    }
}

/// A connected client whose frames a task applies to its [`SetView`] until it is told to
/// close.
struct Watcher {
    view: Arc<Mutex<SetView>>,
    close: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    async fn open(server: &Server, room: &str, user: String) -> Watcher {
        Self::asking(server, room, user, 0).await
    }

    /// A watcher that also asks for `{"type":"presence"}` `asks` times, every 30 ms.
    async fn asking(server: &Server, room: &str, user: String, asks: usize) -> Watcher {
        let (mut client, _) = server.join(&format!("/ws/{room}?user={user}")).await;
        let view = Arc::new(Mutex::new(SetView::default()));
        let (close, mut closing) = tokio::sync::oneshot::channel();
        let seen = Arc::clone(&view);
        let task = tokio::spawn(async move {
            let (mut asks, mut asked) = (asks, Instant::now());
            loop {
                if closing.try_recv().is_ok() {
                    return client.close().await;
                }
                if asks > 0 && asked.elapsed() >= Duration::from_millis(30) {
                    client.send_json(json!({"type": "presence"})).await;
                    (asks, asked) = (asks - 1, Instant::now());
                }
                if let Some(frame) = client.try_next(Duration::from_millis(50)).await {
                    seen.lock().unwrap().apply(&frame);
                }
            }
        });
        Watcher { view, close, task }
    }

    async fn close(self) {
        let _ = self.close.send(());
        self.task.await.expect("the watcher's task");
    }
}

/// Opens `users` at once, each on its own connection to `room`.
async fn open_all(server: &Server, room: &str, users: Vec<String>) -> Vec<Watcher> {
    futures_util::future::join_all(users.into_iter().map(|u| Watcher::open(server, room, u))).await
}

/// The room's presence as the HTTP API lists it.
async fn api_presence(server: &Server, room: &str) -> BTreeSet<String> {
    let auth = format!("Bearer {API_KEY}");
    let path = format!("/api/rooms/{room}/presence");
    let reply = server.http("GET", &path, &[("Authorization", &auth)]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let users = reply.json()["users"].as_array().expect("users").clone();
    users
        .iter()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect()
}

/// Asserts no watcher got a `join` for a user already in its set or a `leave` for one not in
/// it, and that every watcher's set comes to equal the room's presence, which must be
/// `expected`.
async fn assert_sets_hold(server: &Server, room: &str, watchers: &[Watcher], expected: usize) {
    let end = Instant::now() + Duration::from_secs(30);
    let truth = loop {
        let truth = api_presence(server, room).await;
        let settled = truth.len() == expected
            && watchers
                .iter()
                .all(|w| w.view.lock().unwrap().users.as_ref() == Some(&truth));
        if settled || Instant::now() > end {
            break truth;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (mut joins, mut leaves, mut early, mut wrong) = (0, 0, 0, 0);
    for w in watchers {
        let view = w.view.lock().unwrap();
        joins += view.spurious_joins;
        leaves += view.spurious_leaves;
        early += view.before_presence;
        wrong += usize::from(view.users.as_ref() != Some(&truth));
    }
    eprintln!(
        "{} watchers of {room}: {joins} joins for users already in the set, {leaves} leaves \
         for users not in it, {early} before any presence, {wrong} sets unlike the room's",
        watchers.len()
    );
    assert_eq!(truth.len(), expected, "the room's presence: {truth:?}");
    assert_eq!(joins, 0, "joins for users already in a client's set");
    assert_eq!(leaves, 0, "leaves for users not in a client's set");
    assert_eq!(early, 0, "joins or leaves before the presence frame");
    assert_eq!(wrong, 0, "clients whose set is not the room's presence");
}

const API_KEY: &str = "presence-set-key";

/// Connections opened at once in the set tests.
const CROWD: usize = 300;

/// Settings under which every join and leave of a crowd is told (the default limit of 100
/// would turn them off).
const TELL_ALL: [(&str, &str); 2] = [
    ("CONFAB_LIMITS__JOIN_EVENTS_MAX_MEMBERS", "100000"),
    ("CONFAB_API__KEY", API_KEY),
];

fn crowd(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:04}")).collect()
}

async fn a_crowd_arriving_at_once_gets_presence_as_a_set(server: &Server) {
    let watchers = open_all(server, "crowd", crowd("u", CROWD)).await;
    assert_sets_hold(server, "crowd", &watchers, CROWD).await;
    for w in watchers {
        w.close().await;
    }
}

async fn clients_asking_for_presence_while_a_crowd_arrives_keep_their_sets_right(server: &Server) {
    // Within the rate limit's burst of 20.
    let asking = crowd("ask", 20)
        .into_iter()
        .map(|u| Watcher::asking(server, "asked", u, 15));
    let mut watchers = futures_util::future::join_all(asking).await;
    watchers.extend(open_all(server, "asked", crowd("u", CROWD - 20)).await);
    assert_sets_hold(server, "asked", &watchers, CROWD).await;
    for w in watchers {
        w.close().await;
    }
}

async fn users_leaving_while_others_join_keep_every_clients_set_right(server: &Server) {
    let stay = open_all(server, "churn", crowd("stay", CROWD / 3)).await;
    let go = open_all(server, "churn", crowd("go", CROWD / 3)).await;
    // The leavers close while newcomers arrive, all at once.
    let leaving = futures_util::future::join_all(go.into_iter().map(Watcher::close));
    let arriving = open_all(server, "churn", crowd("new", CROWD / 3));
    let ((), new) = futures_util::future::join(leaving.map(drop), arriving).await;
    let mut watchers = stay;
    watchers.extend(new);
    assert_sets_hold(server, "churn", &watchers, 2 * (CROWD / 3)).await;
    for w in watchers {
        w.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_arriving_at_once_on_redis_gets_no_join_for_a_user_it_already_has() {
    let redis = Redis::start();
    let server = Server::replica(&redis, &prefix("crowd"), "a", &TELL_ALL).await;
    a_crowd_arriving_at_once_gets_presence_as_a_set(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_arriving_at_once_on_the_embedded_bus_gets_no_join_for_a_user_it_already_has() {
    let server = Server::start(&TELL_ALL);
    a_crowd_arriving_at_once_gets_presence_as_a_set(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_leaving_while_others_join_on_redis_keep_every_clients_set_right() {
    let redis = Redis::start();
    let server = Server::replica(&redis, &prefix("churn"), "a", &TELL_ALL).await;
    users_leaving_while_others_join_keep_every_clients_set_right(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_leaving_while_others_join_on_the_embedded_bus_keep_every_clients_set_right() {
    let server = Server::start(&TELL_ALL);
    users_leaving_while_others_join_keep_every_clients_set_right(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_asking_for_presence_while_a_crowd_arrives_on_redis_keep_their_sets_right() {
    let redis = Redis::start();
    let server = Server::replica(&redis, &prefix("asked"), "a", &TELL_ALL).await;
    clients_asking_for_presence_while_a_crowd_arrives_keep_their_sets_right(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_asking_for_presence_while_a_crowd_arrives_on_the_embedded_bus_keep_their_sets_right(
) {
    let server = Server::start(&TELL_ALL);
    clients_asking_for_presence_while_a_crowd_arrives_keep_their_sets_right(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_arriving_at_once_on_two_replicas_gets_presence_as_a_set_on_both() {
    let redis = Redis::start();
    let p = prefix("pair");
    let a = Server::replica(&redis, &p, "a", &TELL_ALL).await;
    let b = Server::replica(&redis, &p, "b", &TELL_ALL).await;
    let users = crowd("u", CROWD);
    let (on_a, on_b) = users.split_at(CROWD / 2);
    let (mut watchers, on_b) = futures_util::future::join(
        open_all(&a, "pair", on_a.to_vec()),
        open_all(&b, "pair", on_b.to_vec()),
    )
    .await;
    watchers.extend(on_b);
    assert_sets_hold(&a, "pair", &watchers, CROWD).await;
    for w in watchers {
        w.close().await;
    }
}
