//! Many rooms on one connection (docs/PROTOCOL.md §4): `GET /ws`, `subscribe` and
//! `unsubscribe`, every room frame naming its room, each room's promises kept per
//! subscription, and one queue and one slow-consumer rule for the connection.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::{burst_publisher, Client, Ending, Redis, Server};

const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// Subscribes to `room` with `ref` `s-{room}` (and `extra` fields) and returns its welcome,
/// asserting it is the room's and carries the ref.
async fn subscribe(client: &mut Client, room: &str, extra: Value) -> Value {
    let mut frame = json!({"type":"subscribe","room":room,"ref":format!("s-{room}")});
    if let (Some(f), Some(extra)) = (frame.as_object_mut(), extra.as_object()) {
        f.extend(extra.clone());
    }
    client.send_json(frame).await;
    let welcome = client.next_of("welcome").await;
    assert_eq!(welcome["room"], room, "{welcome}");
    assert_eq!(welcome["ref"], format!("s-{room}"), "{welcome}");
    welcome
}

/// The next frame of `room` of type `kind`, skipping presence traffic of any room.
async fn next_in(client: &mut Client, room: &str, kind: &str) -> Value {
    loop {
        let v = client.next().await;
        if v["type"] == kind && v["room"] == room {
            return v;
        }
        assert!(
            ["join", "leave", "presence"].contains(&v["type"].as_str().unwrap_or_default()),
            "expected {kind} of {room}, got {v}"
        );
    }
}

/// The error answering `frame`: its code, and the frame itself for more checks.
async fn refused(client: &mut Client, frame: Value) -> Value {
    client.send_json(frame).await;
    client.next_of("error").await
}

fn token(sub: &str, rooms: &[&str], publish: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = json!({"sub": sub, "exp": exp, "rooms": rooms, "publish": publish});
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

#[tokio::test]
async fn one_connection_chats_in_three_rooms_and_every_frame_names_its_room() {
    let server = Server::start(&[("CONFAB_API__KEY", "k")]);
    let mut ann = server.connect("/ws?user=ann").await;
    let rooms = ["red", "green", "blue"];
    for room in rooms {
        let welcome = subscribe(&mut ann, room, json!({})).await;
        assert_eq!(welcome["user"], "ann");
        assert_eq!(welcome["offset"], 0);
        assert!(welcome.get("recovered").is_none(), "{welcome}");
    }
    // Another client in one of the rooms sees ann's messages there only.
    let (mut bob, _) = server.join("/ws/green?user=bob").await;
    for (i, room) in rooms.iter().enumerate() {
        for n in 1..=2u64 {
            let reference = format!("{room}-{n}");
            let text = format!("{room} says {n}");
            ann.send_json(json!({"type":"message","room":room,"text":text,"ref":reference}))
                .await;
            let ack = ann.next_of("ack").await;
            assert_eq!(ack["ref"], reference.as_str(), "{ack}");
            assert_eq!(ack["room"], *room, "{ack}");
            assert_eq!(ack["offset"], n, "offsets are per room ({i})");
        }
    }
    for n in 1..=2u64 {
        let m = next_in(&mut bob, "green", "message").await;
        assert_eq!(
            (m["offset"].as_u64(), m["user"].as_str()),
            (Some(n), Some("ann"))
        );
        assert_eq!(m["text"], format!("green says {n}"));
    }
    // Bob's message reaches ann on her green subscription, named so.
    bob.say("hi ann", "b1").await;
    let m = loop {
        let v = ann.next().await;
        if v["type"] == "message" && v["user"] == "bob" {
            break v;
        }
    };
    assert_eq!(
        (m["room"].as_str(), m["offset"].as_u64()),
        (Some("green"), Some(3))
    );
    // Presence and history answer per room.
    ann.send_json(json!({"type":"presence","room":"green"}))
        .await;
    let p = next_in(&mut ann, "green", "presence").await;
    assert_eq!(p["users"], json!(["ann", "bob"]));
    // The HTTP API counts a subscription like a connection to the room.
    for (room, users) in [("red", json!(["ann"])), ("green", json!(["ann", "bob"]))] {
        let path = format!("/api/rooms/{room}/presence");
        let reply = server
            .http("GET", &path, &[("Authorization", "Bearer k")])
            .await;
        assert_eq!(reply.json()["users"], users, "{}", reply.body);
    }
    ann.send_json(json!({"type":"history","room":"red","ref":"h"}))
        .await;
    let h = ann.next_of("history").await;
    assert_eq!(
        (h["room"].as_str(), h["ref"].as_str()),
        (Some("red"), Some("h"))
    );
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(texts, ["red says 1", "red says 2"]);
}

#[tokio::test]
async fn subscribes_are_refused_with_their_ref_for_each_reason() {
    let server = Server::start(&[("CONFAB_LIMITS__ROOMS_PER_CONNECTION", "2")]);
    let (mut c, _) = server.join("/ws/home?user=cy").await;
    let e = refused(
        &mut c,
        json!({"type":"subscribe","room":"bad name","ref":"r1"}),
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("bad_request"), Some("r1"))
    );
    let e = refused(&mut c, json!({"type":"subscribe","room":"home","ref":"r2"})).await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str(), e["room"].as_str()),
        (Some("bad_request"), Some("r2"), Some("home")),
        "the path room is subscribed already"
    );
    subscribe(&mut c, "second", json!({})).await;
    let e = refused(
        &mut c,
        json!({"type":"subscribe","room":"third","ref":"r3"}),
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str(), e["room"].as_str()),
        (Some("too_many_rooms"), Some("r3"), Some("third")),
        "two rooms, the path room counted"
    );
    let e = refused(
        &mut c,
        json!({"type":"message","room":"third","text":"x","ref":"m"}),
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("bad_request"), Some("m"))
    );
    let e = refused(
        &mut c,
        json!({"type":"unsubscribe","room":"third","ref":"u"}),
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("bad_request"), Some("u"))
    );
    // The connection is still fine, in both rooms.
    c.send_json(json!({"type":"message","room":"second","text":"ok","ref":"k"}))
        .await;
    assert_eq!(c.next_of("ack").await["room"], "second");
    assert_eq!(
        c.say("home still", "h").await,
        1,
        "no room named: the path room"
    );

    let refused = r#"confab_subscribe_refusals_total{code="too_many_rooms"}"#;
    assert_eq!(server.metric(refused).await, 1.0);
    assert_eq!(server.metric("confab_subscriptions_open").await, 2.0);
}

#[tokio::test]
async fn an_address_s_rooms_are_counted_per_subscribe_and_freed_by_unsubscribe() {
    let server = Server::start(&[("CONFAB_LIMITS__ROOMS_PER_IP", "2")]);
    let (_home, _) = server.join("/ws/home?user=one").await;
    let mut c = server.connect("/ws?user=two").await;
    subscribe(&mut c, "home", json!({})).await;
    subscribe(&mut c, "away", json!({})).await;
    let e = refused(&mut c, json!({"type":"subscribe","room":"third","ref":"s"})).await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str(), e["room"].as_str()),
        (Some("too_many_rooms"), Some("s"), Some("third"))
    );
    assert_eq!(server.refused_status("/ws/third?user=three").await, 429);
    c.send_json(json!({"type":"unsubscribe","room":"away"}))
        .await;
    c.next_of("unsubscribed").await;
    subscribe(&mut c, "third", json!({})).await;
}

#[tokio::test]
async fn on_ws_a_frame_without_a_room_and_plain_text_are_bad_requests() {
    let server = Server::start(&[]);
    let mut c = server.connect("/ws?user=dee").await;
    c.send_text("hello there").await;
    let e = c.next_of("error").await;
    assert_eq!(e["code"], "bad_request", "{e}");
    let e = refused(&mut c, json!({"type":"message","text":"hi","ref":"m1"})).await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("bad_request"), Some("m1"))
    );
    c.send_json(json!({"type":"ping"})).await;
    assert_eq!(c.next().await["type"], "pong", "a ping needs no room");
    // `since`, `epoch` and `history` need a room: on `/ws` they go in the subscribe frame.
    for query in ["since=1&epoch=e", "history=5"] {
        let status = server
            .refused_status(&format!("/ws?user=dee&{query}"))
            .await;
        assert_eq!(status, 400, "{query}");
    }
}

#[tokio::test]
async fn token_rooms_refuse_a_subscribe_and_publish_globs_hold_per_room() {
    let server = Server::start(&[("CONFAB_AUTH__JWT_SECRET", SECRET)]);
    let t = token("eve", &["team-*", "lobby"], &["team-*"]);
    let mut c = server.connect(&format!("/ws?token={t}")).await;
    let e = refused(
        &mut c,
        json!({"type":"subscribe","room":"secret","ref":"s"}),
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str(), e["room"].as_str()),
        (Some("forbidden"), Some("s"), Some("secret"))
    );
    subscribe(&mut c, "team-a", json!({})).await;
    subscribe(&mut c, "lobby", json!({})).await;
    c.send_json(json!({"type":"message","room":"lobby","text":"no","ref":"l"}))
        .await;
    let e = c.next_of("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str(), e["room"].as_str()),
        (Some("forbidden"), Some("l"), Some("lobby"))
    );
    c.send_json(json!({"type":"message","room":"team-a","text":"yes","ref":"t"}))
        .await;
    let ack = c.next_of("ack").await;
    assert_eq!(
        (ack["room"].as_str(), ack["offset"].as_u64()),
        (Some("team-a"), Some(1))
    );
}

#[tokio::test]
async fn unsubscribe_answers_unsubscribed_tells_the_others_leave_and_ends_that_room() {
    let server = Server::start(&[]);
    let mut ann = server.connect("/ws?user=ann").await;
    subscribe(&mut ann, "one", json!({})).await;
    subscribe(&mut ann, "two", json!({})).await;
    let (mut bob, _) = server.join("/ws/one?user=bob").await;
    let p = next_in(&mut bob, "one", "presence").await;
    assert_eq!(p["users"], json!(["ann", "bob"]));
    ann.send_json(json!({"type":"unsubscribe","room":"one","ref":"u1"}))
        .await;
    let u = ann.next_of("unsubscribed").await;
    assert_eq!(u, json!({"type":"unsubscribed","room":"one","ref":"u1"}));
    let leave = next_in(&mut bob, "one", "leave").await;
    assert_eq!(leave["user"], "ann");
    // Nothing more of room one reaches ann; room two goes on.
    bob.say("after", "b").await;
    ann.send_json(json!({"type":"message","room":"two","text":"still here","ref":"t"}))
        .await;
    loop {
        let v = ann.next().await;
        assert_ne!(v["room"], "one", "a frame of a room left: {v}");
        if v["type"] == "message" && v["room"] == "two" {
            break;
        }
    }
    let e = refused(
        &mut ann,
        json!({"type":"message","room":"one","text":"x","ref":"x"}),
    )
    .await;
    assert_eq!(e["code"], "bad_request");
    // Subscribing again works, with a welcome of its own.
    let w = subscribe(&mut ann, "one", json!({})).await;
    assert_eq!(w["offset"], 1);
}

#[tokio::test]
async fn a_subscribe_with_since_and_epoch_resumes_that_room_with_exactly_what_was_missed() {
    let server = Server::start(&[]);
    let (mut writer, welcome) = server.join("/ws/story?user=w").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for n in 1..=5 {
        writer.say(&format!("line {n}"), &n.to_string()).await;
    }
    let mut reader = server.connect("/ws?user=r").await;
    subscribe(&mut reader, "other", json!({})).await;
    let w = subscribe(&mut reader, "story", json!({"since":2,"epoch":epoch})).await;
    assert_eq!(w["recovered"], true, "{w}");
    for n in 3..=5u64 {
        let m = next_in(&mut reader, "story", "message").await;
        assert_eq!(
            (m["offset"].as_u64(), m["text"].as_str()),
            (Some(n), Some(format!("line {n}").as_str()))
        );
    }
    writer.say("line 6", "6").await;
    let m = next_in(&mut reader, "story", "message").await;
    assert_eq!(m["offset"], 6, "then live, with no gap or duplicate");
    // A `history=n` subscribe sends the latest n after the welcome.
    let mut late = server.connect("/ws?user=l").await;
    subscribe(&mut late, "story", json!({"history":2})).await;
    for n in 5..=6u64 {
        assert_eq!(next_in(&mut late, "story", "message").await["offset"], n);
    }
}

#[tokio::test]
async fn a_message_sent_right_after_subscribe_comes_back_after_the_welcome() {
    let server = Server::start(&[]);
    let mut c = server.connect("/ws?user=quick").await;
    c.send_json(json!({"type":"subscribe","room":"fast","ref":"s"}))
        .await;
    c.send_json(json!({"type":"message","room":"fast","text":"at once","ref":"m"}))
        .await;
    let first = c.next().await;
    assert_eq!(
        (first["type"].as_str(), first["ref"].as_str()),
        (Some("welcome"), Some("s"))
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let v = c.next().await;
        if v["type"] == "ack" || v["type"] == "message" {
            seen.push(v);
        }
    }
    assert!(
        seen.iter().any(|v| v["type"] == "ack" && v["offset"] == 1),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|v| v["type"] == "message" && v["text"] == "at once"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_in_several_rooms_is_closed_once_with_4008() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
        ("CONFAB_LIMITS__BURST", "100000"),
        ("CONFAB_LIMITS__MESSAGES_PER_SEC_PER_IP", "0"),
        // 256, not less: a reading watcher in a busy room must not be slow itself.
        ("CONFAB_LIMITS__SESSION_QUEUE", "256"),
        ("CONFAB_WEBSOCKET__CLIENT_TIMEOUT_SECS", "120"),
    ]);
    let mut slow = Client::connect_small_window(&server.url("/ws?user=stuck")).await;
    for room in ["a", "b", "c"] {
        subscribe(&mut slow, room, json!({})).await;
    }
    // In a busy room, so it never waits a whole receive deadline for a frame.
    let (watcher, _) = server.join("/ws/a?user=watch").await;
    let left = crate::harness::until_leave(watcher, "stuck");
    // 6 MB into two of its rooms: more than the kernel's buffers and the queue hold.
    let (mut pa, _) = server.join("/ws/a?user=pa").await;
    let (mut pb, _) = server.join("/ws/b?user=pb").await;
    let big = "z".repeat(3000);
    for i in 0..2000u64 {
        let sender = if i % 2 == 0 { &mut pa } else { &mut pb };
        assert_eq!(sender.say(&big, &i.to_string()).await, i / 2 + 1);
    }
    tokio::time::timeout(Duration::from_secs(20), left)
        .await
        .expect("the slow consumer left its third room too: the connection is gone")
        .unwrap();
    let (ending, seen) = slow.ending(Duration::from_secs(30)).await;
    assert_eq!(ending, Ending::Closed(4008));
    let mut got = 0;
    for room in ["a", "b"] {
        let offsets: Vec<u64> = seen
            .iter()
            .filter(|v| v["type"] == "message" && v["room"] == room)
            .map(|v| v["offset"].as_u64().unwrap())
            .collect();
        assert!(
            offsets.windows(2).all(|w| w[1] == w[0] + 1),
            "no hole in {room}"
        );
        got += offsets.len();
    }
    assert!(
        got > 0,
        "it read some messages before it stalled: the check above saw them"
    );
    let log = server.wait_log("user=stuck disconnected").await;
    assert_eq!(
        log.matches("user=stuck disconnected").count(),
        1,
        "one connection closed once:\n{log}"
    );
    assert_eq!(
        server.metric("confab_slow_consumer_evictions_total").await,
        1.0,
        "one slow connection is one eviction, whatever rooms it was in"
    );
}

/// Senders may go as fast as they like: these tests are about delivery, not rate limits.
const FAST: [(&str, &str); 3] = [
    ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
    ("CONFAB_LIMITS__BURST", "100000"),
    ("CONFAB_LIMITS__MESSAGES_PER_SEC_PER_IP", "0"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_in_five_rooms_on_one_replica_gets_each_room_complete_and_in_order_from_another(
) {
    const COUNT: usize = 300;
    let redis = Redis::start();
    let a = Server::replica(&redis, "five", "a", &FAST).await;
    let b = Server::replica(&redis, "five", "b", &FAST).await;
    let rooms = ["r1", "r2", "r3", "r4", "r5"];
    let mut reader = a.connect("/ws?user=reader").await;
    for room in rooms {
        subscribe(&mut reader, room, json!({})).await;
    }
    // One publisher per room on replica b, all at once.
    let mut publishers = Vec::new();
    for room in rooms {
        let (client, _) = b.join(&format!("/ws/{room}?user=pub-{room}")).await;
        publishers.push(burst_publisher(client, room.to_owned(), COUNT));
    }
    let mut got: std::collections::HashMap<String, Vec<(u64, String)>> = Default::default();
    while got.values().map(Vec::len).sum::<usize>() < COUNT * rooms.len() {
        let v = reader.next().await;
        if v["type"] == "message" {
            let room = v["room"].as_str().unwrap().to_owned();
            let entry = (
                v["offset"].as_u64().unwrap(),
                v["text"].as_str().unwrap().to_owned(),
            );
            got.entry(room).or_default().push(entry);
        }
    }
    for p in publishers {
        p.await.unwrap();
    }
    for room in rooms {
        let want: Vec<(u64, String)> = (0..COUNT)
            .map(|i| (i as u64 + 1, format!("{room}-{i}")))
            .collect();
        assert_eq!(got[room], want, "room {room} complete, in order, once each");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_history_no_longer_holds_ends_only_that_subscription_with_4008() {
    let redis = Redis::start();
    // Replica b connects as its own Redis user, so only its connections can be killed.
    let b_url = redis.user_url("bee").await;
    let mut env = FAST.to_vec();
    env.push(("CONFAB_HISTORY__SIZE", "10"));
    let a = Server::replica(&redis, "gap", "a", &env).await;
    let mut b_env = env.clone();
    b_env.push(("CONFAB_REDIS__URL", &b_url));
    let b = Server::replica(&redis, "gap", "b", &b_env).await;

    let mut member = b.connect("/ws?user=member").await;
    subscribe(&mut member, "deep", json!({})).await;
    subscribe(&mut member, "calm", json!({})).await;
    // On `/ws/{room}` a gap in its only room still closes the connection, as ever.
    let (mut alone, _) = b.join("/ws/deep?user=alone").await;
    let (mut writer, _) = a.join("/ws/deep?user=writer").await;
    let (mut calm, _) = a.join("/ws/calm?user=calmer").await;
    writer.say("first", "first").await;
    assert_eq!(next_in(&mut member, "deep", "message").await["offset"], 1);

    // b stops; its subscription dies while a publishes far more than history keeps.
    b.signal(libc::SIGSTOP);
    redis
        .cmd(&["CLIENT", "KILL", "USER", "bee", "TYPE", "pubsub"])
        .await;
    // Redis trims history approximately: far more than 10, so the hole is surely gone.
    for i in 0..400 {
        writer.say(&format!("m{i}"), &format!("m{i}")).await;
    }
    b.signal(libc::SIGCONT);
    writer.say("after", "after").await;

    let (ending, _) = alone.ending(Duration::from_secs(20)).await;
    assert_eq!(
        ending,
        Ending::Closed(4008),
        "a path room alone: the connection closes"
    );
    let mut last: Option<u64> = None;
    let ended = loop {
        let v = member.next().await;
        if v["type"] == "unsubscribed" {
            break v;
        }
        // Frames of deep before the gap are fine; none with a hole.
        if v["type"] == "message" {
            assert_eq!(v["room"], "deep", "{v}");
            let offset = v["offset"].as_u64().expect("offset");
            if let Some(last) = last {
                assert_eq!(offset, last + 1, "no hole before the gap's end: {v}");
            }
            last = Some(offset);
        }
    };
    assert_eq!(ended["room"], "deep", "{ended}");
    assert_eq!(ended["code"], 4008, "{ended}");
    assert!(ended.get("ref").is_none(), "the server ended it: {ended}");
    assert!(
        ended["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{ended}"
    );
    // The other room goes on, and the client can resume the ended one.
    calm.say("still calm", "c").await;
    let m = next_in(&mut member, "calm", "message").await;
    assert_eq!(m["text"], "still calm");
    let w = subscribe(
        &mut member,
        "deep",
        json!({"since":1,"epoch":w_epoch(&a).await}),
    )
    .await;
    assert_eq!(w["recovered"], false, "the gap is not in history: {w}");
}

/// The current epoch of room `deep`, read from a fresh welcome on `server`.
async fn w_epoch(server: &Server) -> String {
    let (_c, welcome) = server.join("/ws/deep?user=peek").await;
    welcome["epoch"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_drain_closes_connections_on_ws_in_rooms_and_in_none_with_1001_and_one_that_left_its_path_room(
) {
    let mut server = Server::start(&[("CONFAB_SERVER__SHUTDOWN_GRACE_SECS", "2")]);
    let mut bare = server.connect("/ws?user=bare").await;
    bare.send_json(json!({"type":"ping"})).await;
    assert_eq!(bare.next().await["type"], "pong", "the connection is up");
    let mut busy = server.connect("/ws?user=busy").await;
    subscribe(&mut busy, "x", json!({})).await;
    subscribe(&mut busy, "y", json!({})).await;
    // On /ws/{room}, then out of every room: no path room left to be found by.
    let (mut left, _) = server.join("/ws/lobby?user=left").await;
    left.send_json(json!({"type":"unsubscribe","room":"lobby","ref":"u"}))
        .await;
    assert_eq!(left.next_of("unsubscribed").await["ref"], "u");
    server.signal(libc::SIGTERM);
    assert_eq!(
        bare.ending(Duration::from_secs(10)).await.0,
        Ending::Closed(1001)
    );
    assert_eq!(
        busy.ending(Duration::from_secs(10)).await.0,
        Ending::Closed(1001)
    );
    assert_eq!(
        left.ending(Duration::from_secs(10)).await.0,
        Ending::Closed(1001)
    );
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A measurement rather than a check of behaviour, so not run by default:
/// `cargo test --test it -- --ignored subscriptions_cost --nocapture`. Every connection is in
/// one room first (so every room exists and the connections' own cost is in the baseline),
/// then in nine more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn subscriptions_cost_at_most_a_kibibyte_each_on_top_of_their_connection() {
    const CONNECTIONS: usize = 1000;
    const ROOMS: usize = 100;
    let server = Server::start(&[
        ("CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP", "0"),
        ("CONFAB_LIMITS__UPGRADES_PER_IP_PER_SEC", "0"),
        ("CONFAB_LIMITS__ROOMS_PER_IP", "0"),
        // Join frames pass through and are freed; allocator high-water marks of that traffic
        // are not what a subscription keeps (rooms of the issue's 10,000 × 10 are past this
        // limit anyway).
        ("CONFAB_LIMITS__JOIN_EVENTS_MAX_MEMBERS", "1"),
    ]);
    let mut clients = Vec::new();
    for i in 0..CONNECTIONS {
        clients.push(server.connect(&format!("/ws?user=u{i}")).await);
    }
    subscribe_all(&mut clients, 0..1, ROOMS).await;
    let before = rss(server.pid());
    subscribe_all(&mut clients, 1..10, ROOMS).await;
    let after = rss(server.pid());
    let each = after.saturating_sub(before) / (CONNECTIONS * 9) as u64;
    eprintln!(
        "{CONNECTIONS} connections in {ROOMS} rooms: {before} B in one room each, {after} B in ten: {each} B per subscription"
    );
    assert!(each <= 1024, "{each} B per subscription");
}

/// Subscribes connection i to rooms `room{(i + 10k) % rooms}` for k in `ks`, and waits for
/// every welcome.
async fn subscribe_all(clients: &mut [Client], ks: std::ops::Range<usize>, rooms: usize) {
    for (i, c) in clients.iter_mut().enumerate() {
        for k in ks.clone() {
            let room = format!("room{}", (i + k * 10) % rooms);
            c.send_json(json!({"type":"subscribe","room":room})).await;
        }
    }
    for c in clients.iter_mut() {
        let mut welcomes = 0;
        while welcomes < ks.len() {
            welcomes += usize::from(c.next().await["type"] == "welcome");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_resumed_at_once_on_one_connection_each_replay_page_by_page_to_the_end() {
    // A queue of 64 frames: replays go 16 messages a page, the next when the queue is at most
    // half full. Long messages to a small receive window keep the queue over half, so both
    // rooms wait for the connection's one inbox to drain at once.
    let mut env = FAST.to_vec();
    env.push(("CONFAB_LIMITS__SESSION_QUEUE", "64"));
    let server = Server::start(&env);
    let big = "z".repeat(3000);
    let mut epochs = Vec::new();
    for room in ["p", "q"] {
        let (mut writer, welcome) = server.join(&format!("/ws/{room}?user=w{room}")).await;
        epochs.push(welcome["epoch"].as_str().unwrap().to_owned());
        for i in 0..500 {
            writer.say(&big, &i.to_string()).await;
        }
    }
    let mut reader = Client::connect_small_window(&server.url("/ws?user=reader")).await;
    for (room, epoch) in ["p", "q"].iter().zip(&epochs) {
        reader
            .send_json(json!({"type":"subscribe","room":room,"since":0,"epoch":epoch}))
            .await;
    }
    let mut got: std::collections::HashMap<String, Vec<u64>> = Default::default();
    while got.values().map(Vec::len).sum::<usize>() < 1000 {
        let v = reader.next().await;
        match v["type"].as_str() {
            Some("welcome") => assert_eq!(v["recovered"], true, "{v}"),
            Some("message") => got
                .entry(v["room"].as_str().unwrap().to_owned())
                .or_default()
                .push(v["offset"].as_u64().unwrap()),
            _ => {}
        }
    }
    for room in ["p", "q"] {
        assert_eq!(got[room], (1..=500).collect::<Vec<u64>>(), "room {room}");
    }
}
