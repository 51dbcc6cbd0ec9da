//! Many rooms on one connection (docs/PROTOCOL.md §4): `GET /ws`, `subscribe` and
//! `unsubscribe`, every room frame naming its room, each room's promises kept per
//! subscription, and one queue and one slow-consumer rule for the connection.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::{Client, Ending, Server};

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
    let server = Server::start(&[]);
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

    let metrics = server.http("GET", "/metrics", &[]).await.body;
    assert!(
        metrics.contains(r#"confab_subscribe_refusals_total{code="too_many_rooms"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("confab_subscriptions_open 2"), "{metrics}");
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
        ("CONFAB_LIMITS__SESSION_QUEUE", "64"),
        ("CONFAB_WEBSOCKET__CLIENT_TIMEOUT_SECS", "120"),
    ]);
    let mut slow = Client::connect_small_window(&server.url("/ws?user=stuck")).await;
    for room in ["a", "b", "c"] {
        subscribe(&mut slow, room, json!({})).await;
    }
    let (watcher, _) = server.join("/ws/c?user=watch").await;
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
    }
    let log = server.log();
    assert_eq!(
        log.matches("user=stuck disconnected").count(),
        1,
        "one connection closed once:\n{log}"
    );
}
