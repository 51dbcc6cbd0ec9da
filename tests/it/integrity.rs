//! Nothing out of order, nothing silently missed (docs/PROTOCOL.md §9, §10): per-connection order,
//! frames sent before the welcome, gaps older than history, a store that went back, offsets too
//! large for the scripts, and the per-session byte bound. Each drives the real binary (and a real
//! `redis-server` where the bus matters) from outside, as clients and operators do.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{eventually, Client, Ending, Redis, Server, DEADLINE};

const FAST: [(&str, &str); 2] = [
    ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
    ("CONFAB_LIMITS__BURST", "100000"),
];

/// Which bus a test runs on; the Redis one owns its `redis-server`.
enum Bus {
    Embedded,
    Redis(Redis),
}

impl Bus {
    async fn server(&self, node: &str, extra: &[(&str, &str)]) -> Server {
        let mut env: Vec<(&str, &str)> = FAST.to_vec();
        env.extend_from_slice(extra);
        match self {
            Bus::Embedded => Server::start(&env),
            Bus::Redis(redis) => Server::replica(redis, node, node, &env).await,
        }
    }
}

/// Sends every frame back to back while reading, until `done` holds for what was read.
async fn send_while_reading(
    client: &mut Client,
    frames: Vec<String>,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let (mut sink, mut stream) = (&mut client.ws).split();
    let send = async move {
        for f in frames {
            sink.feed(Message::text(f)).await.expect("send");
        }
        sink.flush().await.expect("flush");
    };
    let read = async move {
        let mut seen = Vec::new();
        while !done(&seen) {
            let msg = tokio::time::timeout(DEADLINE, stream.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("frame");
            if let Message::Text(t) = msg {
                seen.push(serde_json::from_str::<Value>(&t).unwrap());
            }
        }
        seen
    };
    let ((), seen) = tokio::join!(send, read);
    seen
}

async fn fast_messages_keep_send_order(bus: Bus) {
    const N: usize = 2000;
    let server = bus.server("order", &[]).await;
    let (mut client, _) = server.join("/ws/order?user=fast").await;
    let frames: Vec<String> = (0..N)
        .map(|i| json!({"type":"message","text":format!("m{i}"),"ref":format!("r{i}")}).to_string())
        .collect();
    let seen = send_while_reading(&mut client, frames, |seen| {
        seen.iter().filter(|v| v["type"] == "message").count() == N
            && seen.iter().filter(|v| v["type"] == "ack").count() == N
    })
    .await;
    let acks: Vec<(usize, u64)> = seen
        .iter()
        .filter(|v| v["type"] == "ack")
        .map(|v| {
            let i: usize = v["ref"].as_str().unwrap()[1..].parse().unwrap();
            (i, v["offset"].as_u64().unwrap())
        })
        .collect();
    let arrival: Vec<usize> = acks.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        arrival,
        (0..N).collect::<Vec<_>>(),
        "acks arrive in send order"
    );
    let mut by_send = acks.clone();
    by_send.sort();
    let inversions = by_send.windows(2).filter(|w| w[1].1 <= w[0].1).count();
    assert_eq!(inversions, 0, "acks out of send order: {by_send:?}");
    let texts: Vec<String> = seen
        .iter()
        .filter(|v| v["type"] == "message")
        .map(|v| v["text"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(
        texts, expected,
        "the sender sees its messages in the order it sent them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connections_fast_messages_get_offsets_in_send_order_on_redis() {
    fast_messages_keep_send_order(Bus::Redis(Redis::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connections_fast_messages_get_offsets_in_send_order_on_the_embedded_bus() {
    fast_messages_keep_send_order(Bus::Embedded).await;
}

/// Script calls Redis has run since its statistics were last reset.
async fn evalsha_calls(redis: &Redis) -> u64 {
    let stats = redis.cmd(&["INFO", "commandstats"]).await;
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_stored_in_order_in_few_script_calls_with_a_ref_repeated_in_it_stored_once() {
    const N: usize = 48;
    let bus = Bus::Redis(Redis::start());
    let server = bus.server("burst", &[]).await;
    let Bus::Redis(redis) = &bus else {
        unreachable!()
    };
    let (mut reader, _) = server.join("/ws/burst?user=reader").await;
    let (mut writer, _) = server.join("/ws/burst?user=writer").await;
    // Two retries inside the burst: of an earlier message, and of the one just before.
    let refs: Vec<String> = (0..N)
        .map(|i| match i {
            20 => "r3".to_owned(),
            47 => "r46".to_owned(),
            _ => format!("r{i}"),
        })
        .collect();
    let frames: Vec<String> = refs
        .iter()
        .enumerate()
        .map(|(i, r)| json!({"type":"message","text":format!("m{i}"),"ref":r}).to_string())
        .collect();
    redis.cmd(&["CONFIG", "RESETSTAT"]).await;
    // Written back to back, so the server reads many frames at a time.
    let seen = send_while_reading(&mut writer, frames, |seen| {
        seen.iter().filter(|v| v["type"] == "ack").count() == N
    })
    .await;
    let calls = evalsha_calls(redis).await;

    let acks: Vec<(String, u64)> = seen
        .iter()
        .filter(|v| v["type"] == "ack")
        .map(|v| {
            (
                v["ref"].as_str().unwrap().to_owned(),
                v["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut expected = Vec::new();
    let mut offsets = std::collections::HashMap::new();
    for r in &refs {
        let next = offsets.len() as u64 + 1;
        let offset = *offsets.entry(r.clone()).or_insert(next);
        expected.push((r.clone(), offset));
    }
    assert_eq!(
        acks, expected,
        "acks in send order, a retry acked with the first offset"
    );
    let mut texts = Vec::new();
    while texts.len() < N - 2 {
        let v = reader.next_of("message").await;
        assert_eq!(v["offset"], texts.len() as u64 + 1, "{v}");
        texts.push(v["text"].as_str().unwrap().to_owned());
    }
    let sent: Vec<String> = (0..N)
        .filter(|i| ![20, 47].contains(i))
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(texts, sent, "each message once, in send order");
    assert!(
        reader.try_next(Duration::from_millis(300)).await.is_none(),
        "nothing after them"
    );
    // 0 would mean the count was not read at all.
    assert!(
        (1..=(N / 2) as u64).contains(&calls),
        "{N} messages read together took {calls} script calls"
    );
}

#[tokio::test]
async fn the_publish_script_stores_a_ref_repeated_within_one_call_once() {
    // Whether a retry lands in the same run as its first send depends on how reads fall, so
    // the script is driven directly: two messages with one ref in one call.
    let redis = Redis::start();
    let script = include_str!("../../src/bus/lua/publish.lua");
    let (before, after) = (r#"{"type":"message","offset":"#, r#","text":"hi"}"#);
    let reply = redis
        .cmd(&[
            "EVAL",
            script,
            "4",
            "t:{r}:meta",
            "t:{r}:history",
            "t:{r}:ref:u:a",
            "t:{r}:ref:u:a",
            "t:room:r",
            "100",
            "60",
            "ep1",
            "300",
            "0",
            before,
            after,
            "a",
            before,
            after,
            "a",
        ])
        .await;
    assert_eq!(
        reply, "*5\r\n$3\r\nep1\r\n:1\r\n:0\r\n:1\r\n:1\r\n",
        "epoch, then offset 1 stored and offset 1 again as a duplicate"
    );
    assert_eq!(redis.cmd(&["XLEN", "t:{r}:history"]).await, ":1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_just_before_closing_is_still_stored_and_delivered() {
    let bus = Bus::Redis(Redis::start());
    let server = bus.server("parting", &[]).await;
    let (mut reader, _) = server.join("/ws/parting?user=reader").await;
    for i in 0..10 {
        let (mut writer, _) = server.join(&format!("/ws/parting?user=w{i}")).await;
        // The message and the close frame go out together.
        writer
            .ws
            .feed(Message::text(
                json!({"type":"message","text":format!("bye {i}")}).to_string(),
            ))
            .await
            .unwrap();
        writer.ws.close(None).await.unwrap();
        let v = reader.next_of("message").await;
        assert_eq!(v["text"], format!("bye {i}"));
    }
}

async fn first_message_comes_back(bus: Bus) {
    const TRIES: usize = 40;
    let server = bus.server("first", &[]).await;
    let mut misses = Vec::new();
    for i in 0..TRIES {
        // As `echo hi | websocat …` does: the line goes out before the welcome is read.
        let mut client = server.connect(&format!("/ws/first?user=u{i}")).await;
        client.send_text(&format!("hello {i}")).await;
        let welcome = client.next().await;
        assert_eq!(
            welcome["type"], "welcome",
            "the welcome comes first: {welcome}"
        );
        let mut got = false;
        while let Some(v) = client.try_next(Duration::from_secs(3)).await {
            if v["type"] == "message" && v["text"] == format!("hello {i}") {
                assert_eq!(v["user"], format!("u{i}"));
                got = true;
                break;
            }
        }
        if !got {
            misses.push(i);
        }
        client.close().await;
    }
    assert!(
        misses.is_empty(),
        "senders never got their first message back: {misses:?}"
    );
}

#[tokio::test]
async fn a_message_sent_right_after_connecting_comes_back_to_its_sender_on_redis() {
    first_message_comes_back(Bus::Redis(Redis::start())).await;
}

#[tokio::test]
async fn a_message_sent_right_after_connecting_comes_back_to_its_sender_on_the_embedded_bus() {
    first_message_comes_back(Bus::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_older_than_history_closes_members_with_4008_and_the_room_goes_on() {
    let redis = Redis::start();
    // Replica b connects as its own Redis user, so the test can lock it out for a while.
    let b_url = redis.user_url("bee").await;
    let small = [("CONFAB_HISTORY__SIZE", "10")];
    let mut env = FAST.to_vec();
    env.extend_from_slice(&small);
    let a = Server::replica(&redis, "deep", "a", &env).await;
    let mut b_env = env.clone();
    b_env.push(("CONFAB_REDIS__URL", &b_url));
    let b = Server::replica(&redis, "deep", "b", &b_env).await;

    let (mut member, _) = b.join("/ws/deep?user=reader").await;
    let (mut writer, _) = a.join("/ws/deep?user=writer").await;
    for i in 1..=3 {
        assert_eq!(writer.say(&format!("m{i}"), &format!("w{i}")).await, i);
    }
    for i in 1..=3 {
        assert_eq!(member.next_of("message").await["offset"], i);
    }

    // Lock b out of Redis while a publishes far more than history keeps.
    redis.cmd(&["ACL", "SETUSER", "bee", "off"]).await;
    redis.cmd(&["CLIENT", "KILL", "USER", "bee"]).await;
    b.wait_ready(false).await;
    let frames: Vec<String> = (4..=403)
        .map(|i| json!({"type":"message","text":format!("m{i}"),"ref":format!("w{i}")}).to_string())
        .collect();
    send_while_reading(&mut writer, frames, |seen| {
        seen.iter().filter(|v| v["type"] == "ack").count() == 400
    })
    .await;
    redis.cmd(&["ACL", "SETUSER", "bee", "on"]).await;
    b.wait_ready(true).await;

    let (ending, _) = member.ending(Duration::from_secs(20)).await;
    assert_eq!(ending, Ending::Closed(4008), "a member with a gap is told");
    // The room goes on: a session that joins b now gets live messages again.
    let (mut later, welcome) = b.join("/ws/deep?user=later").await;
    assert_eq!(welcome["offset"], 403);
    writer.say("after the gap", "w404").await;
    let v = later.next_of("message").await;
    assert_eq!(
        (v["offset"].as_u64(), v["text"].as_str()),
        (Some(404), Some("after the gap"))
    );
    // The closed member's resume says it cannot be recovered.
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let (_, resumed) = b
        .join(&format!("/ws/deep?user=reader&since=3&epoch={epoch}"))
        .await;
    assert_eq!(resumed["recovered"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_went_back_moves_the_room_to_a_new_epoch_and_reuses_no_offset() {
    let redis = Redis::start();
    let server = Server::replica(&redis, "back", "a", &FAST).await;
    let (mut member, welcome) = server.join("/ws/back?user=reader").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let (mut writer, _) = server.join("/ws/back?user=writer").await;
    for i in 1..=10 {
        writer.say(&format!("m{i}"), &format!("w{i}")).await;
    }
    for i in 1..=10 {
        assert_eq!(member.next_of("message").await["offset"], i);
    }
    // Redis comes back with an older state of the room (offset 7), as after a failover to a
    // lagging replica: every connection drops and the stored room is three messages behind.
    let meta = "back:{back}:meta";
    let history = "back:{back}:history";
    redis.cmd(&["HSET", meta, "offset", "7"]).await;
    redis.cmd(&["XDEL", history, "8-0", "9-0", "10-0"]).await;
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    redis.cmd(&["CLIENT", "KILL", "TYPE", "normal"]).await;
    eventually(
        DEADLINE,
        "the replica notices the store went back",
        || async { server.log().contains("store went back") },
    )
    .await;
    server.wait_ready(true).await;

    let reset = member.next_of("reset").await;
    assert_ne!(reset["epoch"], epoch.as_str(), "a new epoch");
    assert!(
        reset["offset"].as_u64().unwrap() >= 10,
        "offsets go on after 10: {reset}"
    );
    let offset = writer.say("after", "w11").await;
    assert!(
        offset > 10,
        "no offset a client saw is given out again: {offset}"
    );
    let v = member.next_of("message").await;
    assert_eq!(
        (v["offset"].as_u64(), v["text"].as_str()),
        (Some(offset), Some("after"))
    );
}

#[tokio::test]
async fn huge_offsets_are_refused_at_parse_or_served_never_breaking_the_scripts() {
    let redis = Redis::start();
    let server = Server::replica(&redis, "huge", "a", &FAST).await;
    let (mut client, _) = server.join("/ws/huge?user=ann").await;
    client.say("one", "r1").await;
    client
        .send_json(json!({"type":"history","before":100_000_000_000_000u64,"ref":"h1"}))
        .await;
    let page = client.next_of_any(&["history", "error"]).await;
    assert_eq!(
        page["type"], "history",
        "served, not a script error: {page}"
    );
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    for before in ["9007199254740992", "100000000000000000000", "-1", "0"] {
        client
            .send_text(&format!(
                r#"{{"type":"history","before":{before},"ref":"h2"}}"#
            ))
            .await;
        let v = client.next_of("error").await;
        assert_eq!(v["code"], "bad_request", "before={before}: {v}");
    }
    for since in ["9007199254740992", "18446744073709551616"] {
        let status = server
            .refused_status(&format!("/ws/huge?since={since}&epoch=e"))
            .await;
        assert_eq!(status, 400, "since={since}");
    }
}

#[tokio::test]
async fn a_backlog_past_the_byte_bound_closes_the_session_with_4008() {
    let long = "x".repeat(4000);
    let bounded = [("CONFAB_LIMITS__SESSION_QUEUE_BYTES", "65536")];
    let server = Bus::Embedded.server("bytes", &bounded).await;
    let (mut writer, _) = server.join("/ws/bytes?user=w").await;
    for i in 0..30 {
        writer.say(&long, &format!("r{i}")).await;
    }
    // 30 messages of 4 KB do not fit in 64 KiB of outbound queue.
    let mut reader = server.connect("/ws/bytes?user=r&history=30").await;
    let (ending, _) = reader.ending(DEADLINE).await;
    assert_eq!(ending, Ending::Closed(4008));
    // Within the bound the same backlog arrives whole.
    let (mut reader, _) = server.join("/ws/bytes?user=r2&history=10").await;
    for _ in 0..10 {
        assert_eq!(reader.next_of("message").await["text"], long.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_senders_and_members_joining_mid_stream_cause_no_reset_and_lose_nothing() {
    // A joining member's head is read while other sessions publish: by the time the read
    // returns, the room has delivered newer messages. That must not be taken for a store that
    // went back (a new epoch, resets, lost messages).
    const SENDERS: usize = 8;
    const EACH: usize = 200;
    const JOINERS: usize = 8;
    let redis = Redis::start();
    // Nobody reads until the traffic is over: room to queue it all.
    let mut env = FAST.to_vec();
    env.push(("CONFAB_LIMITS__SESSION_QUEUE", "8192"));
    let server = Server::replica(&redis, "busy", "a", &env).await;
    let (mut reader, _) = server.join("/ws/busy?user=reader").await;
    let mut sending = Vec::new();
    for s in 0..SENDERS {
        let (mut client, _) = server.join(&format!("/ws/busy?user=s{s}")).await;
        sending.push(tokio::spawn(async move {
            // Paced, so the traffic lasts while the members below join.
            for i in 0..EACH {
                client.send_text(&format!("{s}-{i}")).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client
        }));
    }
    let mut late = Vec::new();
    for j in 0..JOINERS {
        tokio::time::sleep(Duration::from_millis(40)).await;
        late.push(server.join(&format!("/ws/busy?user=late{j}")).await);
    }
    let _senders: Vec<Client> = futures_util::future::join_all(sending)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let total = (SENDERS * EACH) as u64;
    let mut members = vec![(reader, 0)];
    members.extend(
        late.drain(..)
            .map(|(c, w)| (c, w["offset"].as_u64().unwrap())),
    );
    // What the test is about: some member joined while the traffic ran, not before or after.
    assert!(
        members[1..]
            .iter()
            .any(|(_, from)| *from > 0 && *from < total),
        "a late member joined mid-stream: {:?}",
        members.iter().map(|(_, f)| f).collect::<Vec<_>>()
    );
    for (member, from) in &mut members {
        let mut next = *from + 1;
        while next <= total {
            let v = member.next().await;
            assert_ne!(
                v["type"],
                "reset",
                "no reset for a store that never went back: {v}\n{}",
                server.log()
            );
            if v["type"] == "message" {
                assert_eq!(
                    v["offset"], next,
                    "a member misses nothing from its welcome on"
                );
                next += 1;
            }
        }
    }
    reader = members.remove(0).0;
    reader.close().await;
    assert!(!server.log().contains("went back"), "{}", server.log());
}
