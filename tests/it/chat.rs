//! The chat protocol end to end: welcome, messages, acks, presence, typing, rooms.

use std::collections::HashMap;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Server, DEADLINE};

#[tokio::test]
async fn welcome_comes_first_and_describes_the_room() {
    let server = Server::start(&[]);
    let (_c, welcome) = server.join("/ws/lobby?user=alice").await;
    assert_eq!(welcome["room"], "lobby");
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["node"], "test-node");
    assert_eq!(welcome["offset"], 0);
    assert!(welcome["epoch"].is_string(), "{welcome}");
    assert!(welcome["session"]
        .as_str()
        .is_some_and(|s| s.starts_with("test-node-")));
    assert!(
        welcome.get("recovered").is_none(),
        "recovered only when resuming"
    );
}

#[tokio::test]
async fn anonymous_clients_get_a_guest_name() {
    let server = Server::start(&[]);
    let (_c, welcome) = server.join("/ws/lobby").await;
    assert!(
        welcome["user"].as_str().unwrap().starts_with("guest-"),
        "{welcome}"
    );
}

#[tokio::test]
async fn plain_text_is_published_acked_and_echoed_to_the_sender() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/lobby?user=alice").await;
    c.send_text("hello there").await;
    let mut got = HashMap::new();
    for _ in 0..2 {
        let v = c.next_of_any(&["message", "ack"]).await;
        got.insert(v["type"].as_str().unwrap().to_owned(), v);
    }
    let msg = &got["message"];
    assert_eq!(msg["text"], "hello there");
    assert_eq!(msg["user"], "alice");
    assert_eq!(msg["room"], "lobby");
    assert_eq!(msg["offset"], 1);
    assert!(msg["ts"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(got["ack"]["offset"], 1);
    assert!(got["ack"].get("ref").is_none());
}

#[tokio::test]
async fn a_repeated_ref_is_acked_with_the_first_offset_and_not_published_again() {
    let server = Server::start(&[]);
    let (mut a, _) = server.join("/ws/r?user=alice").await;
    let (mut b, _) = server.join("/ws/r?user=bob").await;
    assert_eq!(a.say("once", "c1").await, 1);
    assert_eq!(
        a.say("once", "c1").await,
        1,
        "retry acked with the original offset"
    );
    assert_eq!(a.say("twice", "c2").await, 2);
    let first = b.next_of("message").await;
    let second = b.next_of("message").await;
    assert_eq!(
        (first["text"].as_str(), second["text"].as_str()),
        (Some("once"), Some("twice"))
    );
    assert_eq!(second["offset"], 2);
}

#[tokio::test]
async fn rooms_are_isolated() {
    let server = Server::start(&[]);
    let (mut a, _) = server.join("/ws/one?user=alice").await;
    let (mut b, _) = server.join("/ws/two?user=bob").await;
    a.say("for room one", "a1").await;
    // Not `say`: it would skip a message frame that arrives before the ack.
    b.send_text("for room two").await;
    let seen = b.next_of("message").await;
    assert_eq!(seen["text"], "for room two", "room two saw: {seen}");
    assert_eq!(seen["offset"], 1, "each room counts its own offsets");
}

#[tokio::test]
async fn presence_lists_users_once_and_join_leave_are_announced() {
    let server = Server::start(&[]);
    let (mut a, _) = server.join("/ws/p?user=alice").await;
    let p = a.next_of("presence").await;
    assert_eq!(p["users"], json!(["alice"]));

    let (mut b, _) = server.join("/ws/p?user=bob").await;
    let p = b.next_of("presence").await;
    assert_eq!(p["users"], json!(["alice", "bob"]));
    let join = a.next_of("join").await;
    assert_eq!(join["user"], "bob");

    // A second connection of the same user is not a new presence entry.
    let (mut b2, _) = server.join("/ws/p?user=bob").await;
    let p = b2.next_of("presence").await;
    assert_eq!(p["users"], json!(["alice", "bob"]));
    b2.close().await;
    b.close().await;
    let leave = a.next_of("leave").await;
    assert_eq!(leave["user"], "bob");
    a.send_json(json!({"type":"presence"})).await;
    let p = a.next_of("presence").await;
    assert_eq!(
        p["users"],
        json!(["alice"]),
        "bob left only after his last connection"
    );
}

#[tokio::test]
async fn typing_is_relayed_to_others_but_not_back() {
    let server = Server::start(&[]);
    let (mut a, _) = server.join("/ws/t?user=alice").await;
    let (mut b, _) = server.join("/ws/t?user=bob").await;
    a.next_of("join").await; // bob arrived: everyone is attached
    a.send_json(json!({"type":"typing"})).await;
    let t = b.next_of("typing").await;
    assert_eq!(t["user"], "alice");
    assert_eq!(t["room"], "t");
    // Alice's own message follows her typing event in room order; she must not see typing.
    a.send_json(json!({"type":"message","text":"done typing","ref":"m"}))
        .await;
    loop {
        let v = a.next().await;
        assert_ne!(v["type"], "typing", "typing came back to its sender");
        if v["type"] == "message" {
            break;
        }
    }
}

#[tokio::test]
async fn app_level_ping_gets_a_pong() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/lobby").await;
    c.send_json(json!({"type":"ping"})).await;
    c.next_of("pong").await;
}

#[tokio::test]
async fn history_request_returns_pages_oldest_first() {
    let server = Server::start(&[("CONFAB_LIMITS__BURST", "50")]);
    let (mut c, _) = server.join("/ws/h?user=alice").await;
    for i in 1..=6 {
        c.say(&format!("m{i}"), &format!("r{i}")).await;
    }
    c.send_json(json!({"type":"history","before":5,"limit":2,"ref":"h1"}))
        .await;
    let h = c.next_of_any(&["history"]).await;
    assert_eq!(h["ref"], "h1");
    assert_eq!(h["room"], "h");
    assert!(h["epoch"].is_string());
    let offsets: Vec<_> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].clone())
        .collect();
    assert_eq!(offsets, vec![json!(3), json!(4)]);
    assert_eq!(h["messages"][0]["text"], "m3");

    c.send_json(json!({"type":"history","limit":3})).await;
    let h = c.next_of_any(&["history"]).await;
    let texts: Vec<_> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].clone())
        .collect();
    assert_eq!(
        texts,
        vec![json!("m4"), json!("m5"), json!("m6")],
        "without before: the latest"
    );
}

#[tokio::test]
async fn three_clients_sending_200_messages_each_see_one_complete_order() {
    const PER_CLIENT: usize = 200;
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
        ("CONFAB_LIMITS__BURST", "100000"),
    ]);
    let mut clients = Vec::new();
    for name in ["ann", "bob", "cid"] {
        clients.push((name, server.join(&format!("/ws/busy?user={name}")).await.0));
    }
    let total = PER_CLIENT * clients.len();
    let mut tasks = Vec::new();
    for (name, client) in clients {
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = client.ws.split();
            let sender = tokio::spawn(async move {
                for i in 0..PER_CLIENT {
                    let frame =
                        json!({"type":"message","text":format!("{name}-{i}"),"ref":format!("{i}")});
                    tx.send(Message::text(frame.to_string())).await.unwrap();
                }
                tx
            });
            let mut messages: Vec<Value> = Vec::new();
            while messages.len() < total {
                let next = tokio::time::timeout(DEADLINE, rx.next()).await;
                let Ok(Some(Ok(Message::Text(t)))) = next else {
                    match next {
                        Ok(Some(Ok(_))) => continue,
                        other => panic!(
                            "{name} stopped after {} messages: {other:?}",
                            messages.len()
                        ),
                    }
                };
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_ne!(v["type"], "error", "{v}");
                if v["type"] == "message" {
                    messages.push(v);
                }
            }
            let _tx = sender.await.unwrap();
            messages
        }));
    }
    let mut views = Vec::new();
    for t in tasks {
        views.push(t.await.unwrap());
    }
    let order: Vec<(u64, String)> = views[0]
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let offsets: Vec<u64> = order.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (1..=total as u64).collect::<Vec<_>>(),
        "contiguous, no gap or repeat"
    );
    for view in &views[1..] {
        let other: Vec<(u64, String)> = view
            .iter()
            .map(|m| {
                (
                    m["offset"].as_u64().unwrap(),
                    m["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(other, order, "every member sees the same sequence");
    }
    for name in ["ann", "bob", "cid"] {
        let mine: Vec<&String> = order
            .iter()
            .map(|(_, t)| t)
            .filter(|t| t.starts_with(name))
            .collect();
        let expected: Vec<String> = (0..PER_CLIENT).map(|i| format!("{name}-{i}")).collect();
        assert_eq!(
            mine,
            expected.iter().collect::<Vec<_>>(),
            "{name}'s messages keep their order"
        );
    }
}

#[tokio::test]
async fn acks_and_errors_name_their_room() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/named?user=a").await;
    c.send_json(json!({"type":"message","text":"hi","ref":"r1"}))
        .await;
    let ack = c.next_of("ack").await;
    assert_eq!(
        (ack["room"].as_str(), ack["ref"].as_str()),
        (Some("named"), Some("r1"))
    );
    c.send_json(json!({"type":"message","text":" ","ref":"r2"}))
        .await;
    let e = c.next_of("error").await;
    assert_eq!(
        (e["room"].as_str(), e["code"].as_str(), e["ref"].as_str()),
        (Some("named"), Some("bad_request"), Some("r2"))
    );
}
