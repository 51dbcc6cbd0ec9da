//! A room's delivery state under stress, from outside (docs/PROTOCOL.md §9): a store that went back
//! with two replicas on it, a member who joined after a hole it never needed, and resumes longer
//! than a session's queue.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{eventually, Client, Ending, Redis, Server, DEADLINE};

const FAST: [(&str, &str); 2] = [
    ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
    ("CONFAB_LIMITS__BURST", "100000"),
];

fn env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = FAST.to_vec();
    env.extend_from_slice(extra);
    env
}

/// Publishes `texts` back to back (ref = the text's start) while reading, and returns the acked
/// offsets in send order.
async fn publish_all(client: &mut Client, texts: &[String]) -> Vec<u64> {
    let (mut sink, mut stream) = (&mut client.ws).split();
    let frames: Vec<String> = texts
        .iter()
        .map(|t| {
            // Refs are at most 64 characters; the texts' number prefixes keep these unique.
            let reference: String = t.chars().take(60).collect();
            json!({"type":"message","text":t,"ref":reference}).to_string()
        })
        .collect();
    let send = async move {
        for f in frames {
            sink.feed(Message::text(f)).await.expect("send");
        }
        sink.flush().await.expect("flush");
    };
    let want = texts.len();
    let read = async move {
        let mut acks = Vec::new();
        while acks.len() < want {
            let msg = tokio::time::timeout(DEADLINE, stream.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("frame");
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_ne!(v["type"], "error", "{v}");
                if v["type"] == "ack" {
                    acks.push(v["offset"].as_u64().unwrap());
                }
            }
        }
        acks
    };
    let ((), acks) = tokio::join!(send, read);
    acks
}

/// Reads until `text` arrives; returns the `(offset, text)` of every message and whether a
/// `reset` came before the first of them. A close fails the test.
async fn messages_until(client: &mut Client, text: &str) -> (bool, Vec<(u64, String)>) {
    let mut reset_first = false;
    let mut seen: Vec<(u64, String)> = Vec::new();
    while seen.last().map(|(_, t)| t.as_str()) != Some(text) {
        let v = client.next().await;
        match v["type"].as_str() {
            Some("reset") if seen.is_empty() => reset_first = true,
            Some("message") => seen.push((
                v["offset"].as_u64().unwrap(),
                v["text"].as_str().unwrap().to_owned(),
            )),
            _ => {}
        }
    }
    (reset_first, seen)
}

/// How many times the replica has (re)subscribed to the bus.
fn subscriptions(server: &Server) -> usize {
    server.log().matches("subscribed to").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_went_back_under_two_replicas_resets_their_members_and_delivers_what_follows()
{
    let redis = Redis::start();
    let a = Server::replica(&redis, "back2", "a", &FAST).await;
    let b = Server::replica(&redis, "back2", "b", &FAST).await;
    let (mut on_a, _) = a.join("/ws/back2?user=ra").await;
    let (mut on_b, _) = b.join("/ws/back2?user=rb").await;
    let (mut writer, _) = a.join("/ws/back2?user=writer").await;
    let first: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
    assert_eq!(
        publish_all(&mut writer, &first).await,
        (1..=10).collect::<Vec<_>>()
    );
    for member in [&mut on_a, &mut on_b] {
        let (_, seen) = messages_until(member, "m10").await;
        assert_eq!(seen.len(), 10);
    }

    // A lagging Redis replica promoted: the room is three messages behind, and every
    // connection drops.
    let (meta, history) = ("back2:{back2}:meta", "back2:{back2}:history");
    redis.cmd(&["HSET", meta, "offset", "7"]).await;
    redis.cmd(&["XDEL", history, "8-0", "9-0", "10-0"]).await;
    let reply = redis.cmd(&["XSETID", history, "7-0"]).await;
    assert!(reply.starts_with("+OK"), "XSETID said {reply}");
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    redis
        .cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .await;
    for server in [&a, &b] {
        eventually(DEADLINE, "the replica subscribed again", || async {
            subscriptions(server) >= 2
        })
        .await;
        server.wait_ready(true).await;
    }

    let mut acked = Vec::new();
    for text in ["n1", "n2", "n3"] {
        acked.push((writer.say(text, text).await, text.to_owned()));
    }
    assert!(
        acked[0].0 > 10,
        "no offset a client saw is reused: {acked:?}"
    );
    for (name, member) in [("a", &mut on_a), ("b", &mut on_b)] {
        let (reset_first, seen) = messages_until(member, "n3").await;
        assert!(
            reset_first,
            "replica {name}'s member is told of the new epoch"
        );
        assert_eq!(seen, acked, "replica {name} delivers the acked offsets");
    }
    assert!(
        !a.log().contains("slow consumer") && !b.log().contains("slow consumer"),
        "nobody was slow:\n{}\n{}",
        a.log(),
        b.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_joined_after_a_hole_older_than_history_is_not_closed_for_it() {
    let redis = Redis::start();
    // Replica b connects as its own Redis user, so only its connections can be killed.
    let b_url = redis.user_url("bee").await;
    let small = env(&[("CONFAB_HISTORY__SIZE", "10")]);
    let a = Server::replica(&redis, "late", "a", &small).await;
    let mut b_env = small.clone();
    b_env.push(("CONFAB_REDIS__URL", &b_url));
    let b = Server::replica(&redis, "late", "b", &b_env).await;

    let (mut old, _) = b.join("/ws/late?user=old").await;
    let (mut writer, _) = a.join("/ws/late?user=writer").await;
    let first: Vec<String> = (1..=2).map(|i| format!("m{i}")).collect();
    publish_all(&mut writer, &first).await;
    messages_until(&mut old, "m2").await;

    // b stops; its subscription dies while a publishes far more than history keeps.
    b.signal(libc::SIGSTOP);
    redis
        .cmd(&["CLIENT", "KILL", "USER", "bee", "TYPE", "pubsub"])
        .await;
    let burst: Vec<String> = (3..=402).map(|i| format!("m{i}")).collect();
    publish_all(&mut writer, &burst).await;
    b.signal(libc::SIGCONT);

    // A session joins b, perhaps before b noticed; one more message follows its head read.
    let (mut young, welcome) = b.join("/ws/late?user=young").await;
    let promised = welcome["offset"].as_u64().unwrap();
    assert_eq!(promised, 402, "{welcome}");
    let offset = writer.say("after", "after").await;
    assert_eq!(offset, 403);

    let (ending, _) = old.ending(Duration::from_secs(20)).await;
    assert_eq!(
        ending,
        Ending::Closed(4008),
        "the member with a gap is told"
    );
    let v = young.next_of("message").await;
    assert_eq!(
        (v["offset"].as_u64(), v["text"].as_str()),
        (Some(403), Some("after")),
        "the member whose welcome said 402 gets 403 and stays"
    );
    writer.say("later", "later").await;
    let v = young.next_of("message").await;
    assert_eq!(v["offset"], 404, "{v}");
}

/// Offsets of the messages a resumed session is sent before its presence frame (the end of
/// its replay), read at full speed.
async fn replay_offsets(client: &mut Client) -> Vec<u64> {
    let mut offsets = Vec::new();
    loop {
        let v = client.next_of_any(&["message", "presence"]).await;
        if v["type"] == "presence" {
            return offsets;
        }
        offsets.push(v["offset"].as_u64().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_longer_than_the_session_queue_reaches_a_client_reading_at_full_speed() {
    const STORED: u64 = 600;
    let redis = Redis::start();
    let small = env(&[("CONFAB_LIMITS__SESSION_QUEUE", "32")]);
    // The writer reads its own burst on a replica with the default queue.
    let a = Server::replica(&redis, "long", "a", &FAST).await;
    let server = Server::replica(&redis, "long", "b", &small).await;
    let (mut writer, welcome) = a.join("/ws/long?user=writer").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let texts: Vec<String> = (1..=STORED).map(|i| format!("m{i}")).collect();
    publish_all(&mut writer, &texts).await;

    let (mut reader, welcome) = server
        .join(&format!("/ws/long?user=reader&since=0&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(
        replay_offsets(&mut reader).await,
        (1..=STORED).collect::<Vec<_>>(),
        "every stored message, in order, once"
    );
    writer.say("live", "live").await;
    let v = reader.next_of("message").await;
    assert_eq!(
        (v["offset"].as_u64(), v["text"].as_str()),
        (Some(STORED + 1), Some("live"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_streams_while_live_messages_arrive_misses_and_repeats_nothing() {
    let redis = Redis::start();
    let small = env(&[("CONFAB_LIMITS__SESSION_QUEUE", "32")]);
    // The writer reads its own burst on a replica with the default queue.
    let a = Server::replica(&redis, "mixed", "a", &FAST).await;
    let server = Server::replica(&redis, "mixed", "b", &small).await;
    let (mut writer, welcome) = a.join("/ws/mixed?user=writer").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let texts: Vec<String> = (1..=300).map(|i| format!("m{i}")).collect();
    publish_all(&mut writer, &texts).await;

    let mut reader = server
        .connect(&format!("/ws/mixed?user=reader&since=0&epoch={epoch}"))
        .await;
    // Live traffic while the replay streams, at a chat's pace (each message waits for its
    // ack): a burst of 200 at once would overfill a live member's 32-frame queue by itself.
    let publishing = tokio::spawn(async move {
        for i in 301..=500 {
            let text = format!("m{i}");
            writer.say(&text, &text).await;
        }
        writer
    });
    let mut next = 1;
    while next <= 500 {
        let v = reader.next().await;
        if v["type"] == "message" {
            assert_eq!(v["offset"], next, "{v}");
            next += 1;
        }
    }
    let _writer = publishing.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_client_that_never_reads_is_dropped_and_holds_no_queue_of_what_went_by() {
    let redis = Redis::start();
    let small = env(&[
        ("CONFAB_LIMITS__SESSION_QUEUE", "32"),
        ("CONFAB_WEBSOCKET__PING_INTERVAL_SECS", "1"),
        ("CONFAB_WEBSOCKET__CLIENT_TIMEOUT_SECS", "3"),
    ]);
    // The writer reads its own burst on a replica with the default queue.
    let a = Server::replica(&redis, "stuck", "a", &FAST).await;
    let server = Server::replica(&redis, "stuck", "b", &small).await;
    let (mut writer, welcome) = a.join("/ws/stuck?user=writer").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    // Big messages, so the unread replay fills the socket's buffers.
    let long = "x".repeat(3000);
    let texts: Vec<String> = (1..=900).map(|i| format!("{i}{long}")).collect();
    publish_all(&mut writer, &texts).await;
    let _stuck = Client::connect_small_window(
        &server.url(&format!("/ws/stuck?user=stuck&since=0&epoch={epoch}")),
    )
    .await;
    // The room moves on by more than a queue's worth while it reads nothing: nothing of that
    // is queued for it (it would read it from the store), and its socket's stall timeout
    // ends the session.
    let more: Vec<String> = (901..=1000).map(|i| format!("{i}")).collect();
    publish_all(&mut writer, &more).await;
    eventually(
        Duration::from_secs(20),
        "the client that reads nothing is dropped",
        || async { server.log().contains("user=stuck disconnected") },
    )
    .await;
}
