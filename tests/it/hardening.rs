//! What a hostile or unlucky client can do to one replica, each as the attack itself: a client
//! that reads nothing, one that asks for pages it never reads, one that pads its text, one
//! that sends garbage, one that closes before its welcome.

use std::time::Duration;

use serde_json::json;

use crate::harness::{eventually, say_big, until_leave, Client, Ending, Redis, Server, DEADLINE};

/// Resident memory of a process, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_at_once_not_after_the_backlog_it_is_about() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
        ("CONFAB_LIMITS__BURST", "100000"),
        // 256 frames of 3,000 bytes: far less than the 6 MB the slow member is sent, and slack
        // enough for the watcher and the sender, which read everything too, to fall behind on
        // a busy machine without being evicted themselves (at 64 the watcher once was).
        ("CONFAB_LIMITS__SESSION_QUEUE", "256"),
        // The stall timeout that used to be the only way out for a session waiting on a
        // client that reads nothing: far longer than this test waits.
        ("CONFAB_WEBSOCKET__CLIENT_TIMEOUT_SECS", "120"),
    ]);
    let mut slow = Client::connect_small_window(&server.url("/ws/evict?user=slow")).await;
    assert_eq!(slow.next().await["type"], "welcome");
    let (watcher, _) = server.join("/ws/evict?user=watcher").await;
    let left = until_leave(watcher, "slow");
    // 6 MB: more than the kernel's buffers and the queue hold for the slow member.
    let (mut sender, _) = server.join("/ws/evict?user=sender").await;
    say_big(&mut sender, 2000).await;
    tokio::time::timeout(DEADLINE, left)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the evicted member did not leave while its client read nothing; log:\n{}",
                server.log()
            )
        })
        .expect("watcher");
    // What the client finds when it finally reads: a prefix with no hole, then the 4008.
    let (ending, seen) = slow.ending(Duration::from_secs(30)).await;
    assert_eq!(ending, Ending::Closed(4008));
    let offsets: Vec<u64> = seen
        .iter()
        .filter(|v| v["type"] == "message")
        .map(|v| v["offset"].as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "no hole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_asked_for_and_never_read_hold_one_reply_per_session() {
    const SESSIONS: usize = 8;
    const ASKS: usize = 20;
    let redis = Redis::start();
    let server = Server::replica(
        &redis,
        "pages",
        "n1",
        &[
            ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
            ("CONFAB_LIMITS__BURST", "100000"),
        ],
    )
    .await;
    // 100 messages of 4,000 four-byte characters: 1.6 MB a page.
    let (mut writer, _) = server.join("/ws/big?user=writer").await;
    let text = "🎉".repeat(4000);
    for i in 0..100 {
        writer.say(&text, &format!("w{i}")).await;
    }
    writer.close().await;
    let before = rss(server.pid());
    let mut hoarders = Vec::new();
    for n in 0..SESSIONS {
        let mut c =
            Client::connect_small_window(&server.url(&format!("/ws/big?user=hoarder{n}"))).await;
        for a in 0..ASKS {
            c.send_json(json!({"type":"history","limit":100,"ref":format!("h{a}")}))
                .await;
        }
        hoarders.push(c);
    }
    // Every reply the server made would be 8 × 20 × 1.6 MB = 256 MB; one per session is 13 MB.
    // Give the server time to read every request it will read and fetch what it will fetch.
    let mut grown = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        grown = grown.max(rss(server.pid()).saturating_sub(before));
    }
    assert!(
        grown < 80 << 20,
        "the server grew by {} MB for {SESSIONS} sessions that read nothing",
        grown >> 20
    );
    // A session that reads gets every page it asked for, in turn.
    let mut reader = hoarders.pop().unwrap();
    assert_eq!(reader.next().await["type"], "welcome");
    for a in 0..ASKS {
        let page = reader.next_of("history").await;
        assert_eq!(page["ref"], format!("h{a}"));
        assert_eq!(page["messages"].as_array().unwrap().len(), 100);
    }
}

#[tokio::test]
async fn a_history_page_of_big_messages_is_cut_to_the_session_budget_from_its_old_end() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
        ("CONFAB_LIMITS__BURST", "100000"),
        ("CONFAB_LIMITS__SESSION_QUEUE_BYTES", "65536"),
    ]);
    let (mut c, _) = server.join("/ws/budget?user=a").await;
    let text = "🎉".repeat(4000);
    for i in 0..10 {
        c.say(&text, &format!("m{i}")).await;
    }
    c.send_json(json!({"type":"history","limit":10,"ref":"h"}))
        .await;
    let page = c.next_of("history").await;
    let offsets: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    // Half of 64 KiB holds one of these 16 KB messages... and a second.
    assert_eq!(offsets, vec![9, 10], "the newest that fit, oldest first");
    // Paging on from the oldest offset got reaches the rest.
    c.send_json(json!({"type":"history","before":9,"limit":10,"ref":"h2"}))
        .await;
    let older = c.next_of("history").await;
    assert_eq!(older["messages"][0]["offset"].as_u64(), Some(7));
}

#[tokio::test]
async fn text_padded_with_control_characters_is_too_long_though_within_the_character_count() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/pad?user=a").await;
    // 4,000 characters (the default limit), 24,000 bytes once stored as JSON.
    let padded = "\u{1}".repeat(4000);
    c.send_json(json!({"type":"message","text":padded,"ref":"p"}))
        .await;
    let e = c.next_of("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("too_long"), Some("p"))
    );
    // A message of 4,000 emoji (16,000 bytes) is what a person can type: stored.
    let emoji = "🎉".repeat(4000);
    assert_eq!(c.say(&emoji, "e").await, 1);
}

#[tokio::test]
async fn refused_frames_and_pings_count_against_the_rate_limit_and_flooding_with_them_closes() {
    for (what, frame) in [
        ("garbage", "{not json".to_owned()),
        ("pings", json!({"type":"ping"}).to_string()),
        (
            "empty texts",
            json!({"type":"message","text":" "}).to_string(),
        ),
    ] {
        let server = Server::start(&[
            ("CONFAB_LIMITS__MESSAGES_PER_SEC", "1"),
            ("CONFAB_LIMITS__BURST", "3"),
            ("CONFAB_LIMITS__MAX_VIOLATIONS", "4"),
        ]);
        let (mut c, _) = server.join("/ws/noise?user=a").await;
        for _ in 0..30 {
            if !c.try_send_text(&frame).await {
                break;
            }
        }
        let (ending, seen) = c.ending(DEADLINE).await;
        assert_eq!(ending, Ending::Closed(1008), "{what}: {seen:?}");
        let limited = seen
            .iter()
            .filter(|v| v["type"] == "error" && v["code"] == "rate_limited")
            .count();
        assert!(limited >= 4, "{what}: {seen:?}");
    }
}

#[tokio::test]
async fn a_message_sent_before_the_welcome_is_stored_even_when_the_client_closes_at_once() {
    let redis = Redis::start();
    let server = Server::replica(&redis, "early", "n1", &[]).await;
    let (mut reader, _) = server.join("/ws/early?user=reader").await;
    // Redis is paused, so no welcome can come: each client's line is read before it, and the
    // client closes right behind it (`echo hi | websocat …`).
    redis.signal(libc::SIGSTOP);
    for n in 0..5 {
        let mut c = server.connect(&format!("/ws/early?user=w{n}")).await;
        c.send_text(&format!("line {n}")).await;
        c.close().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.signal(libc::SIGCONT);
    let mut got = Vec::new();
    while got.len() < 5 {
        let v = reader.next_of("message").await;
        got.push(v["text"].as_str().unwrap().to_owned());
    }
    got.sort();
    assert_eq!(got, (0..5).map(|n| format!("line {n}")).collect::<Vec<_>>());
}

#[tokio::test]
async fn bytes_held_before_the_welcome_are_bounded_too() {
    let redis = Redis::start();
    let server = Server::replica(
        &redis,
        "early-bytes",
        "n1",
        &[("CONFAB_LIMITS__SESSION_QUEUE_BYTES", "65536")],
    )
    .await;
    redis.signal(libc::SIGSTOP);
    let mut c = server.connect("/ws/early?user=big").await;
    // Three frames are far under the 1,024-frame bound, but 90 KB is over 64 KiB.
    let big = "b".repeat(30_000);
    for _ in 0..3 {
        c.send_text(&big).await;
    }
    let (ending, _) = c.ending(DEADLINE).await;
    redis.signal(libc::SIGCONT);
    assert_eq!(ending, Ending::Closed(1008));
    eventually(DEADLINE, "the replica is ready again", || async {
        crate::harness::http(server.addr, "GET", "/readyz", &[])
            .await
            .status
            == 200
    })
    .await;
}

#[tokio::test]
async fn an_address_holding_its_share_of_unfinished_handshakes_gets_no_more_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&[
        ("CONFAB_LIMITS__HANDSHAKES_PER_IP", "4"),
        ("CONFAB_SERVER__HANDSHAKE_TIMEOUT_SECS", "60"),
    ]);
    // Slowloris: each connection sends part of a request head and nothing more.
    let mut conns = Vec::new();
    for _ in 0..10 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut c = socket.connect(server.addr).await.unwrap();
        // The write may fail on a connection the server already closed.
        let _ = c.write_all(b"GET /ws/r HTTP/1.1\r\nHost: x\r\n").await;
        conns.push(c);
    }
    let mut open = Vec::new();
    for mut c in conns {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(1500), c.read(&mut byte)).await {
            Err(_) => open.push(c),
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("the server answered a request head it has not got"),
        }
    }
    assert_eq!(open.len(), 4, "connections the server kept");
    // Another address is not held up by it.
    let (mut other, _) = server
        .open("/ws/r", Some("127.0.0.2"), &[])
        .await
        .expect("another address connects");
    assert_eq!(other.next().await["type"], "welcome");
    // Once they are gone, this address connects again.
    drop(open);
    eventually(DEADLINE, "the address connects again", || async {
        tokio_tungstenite::connect_async(server.url("/ws/r"))
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test]
async fn sessions_of_one_address_share_one_message_budget() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "1000"),
        ("CONFAB_LIMITS__BURST", "1000"),
        ("CONFAB_LIMITS__MESSAGES_PER_SEC_PER_IP", "5"),
    ]);
    let mut clients = Vec::new();
    for n in 0..2 {
        let (c, _) = server
            .open(&format!("/ws/budget?user=u{n}"), Some("127.0.0.1"), &[])
            .await
            .unwrap();
        clients.push(c);
    }
    for c in &mut clients {
        assert_eq!(c.next().await["type"], "welcome");
    }
    // 20 messages, 10 from each session: the address's burst is 10.
    for i in 0..10 {
        for c in &mut clients {
            c.send_json(json!({"type":"message","text":"hi","ref":format!("m{i}")}))
                .await;
        }
    }
    let (mut acked, mut limited) = (0, 0);
    for c in &mut clients {
        while acked + limited < 20 {
            let v = c.next().await;
            match (v["type"].as_str(), v["code"].as_str()) {
                (Some("ack"), _) => acked += 1,
                (Some("error"), Some("rate_limited")) => limited += 1,
                _ => {}
            }
            if v["type"] == "ack" || v["type"] == "error" {
                // Each session's answers are its own ten.
                if (acked + limited) % 10 == 0 {
                    break;
                }
            }
        }
    }
    assert_eq!(acked + limited, 20);
    assert!(
        (10..=13).contains(&acked),
        "the two sessions together got {acked} messages through"
    );
    // Another address has a budget of its own.
    let (mut other, _) = server
        .open("/ws/budget?user=x", Some("127.0.0.2"), &[])
        .await
        .unwrap();
    assert_eq!(other.next().await["type"], "welcome");
    for i in 0..5 {
        other.say("hello", &format!("o{i}")).await;
    }
}

#[tokio::test]
async fn an_address_in_its_share_of_rooms_is_refused_a_new_room_with_429() {
    let server = Server::start(&[("CONFAB_LIMITS__ROOMS_PER_IP", "2")]);
    let mut held = Vec::new();
    for room in ["one", "two", "one"] {
        let (c, _) = server
            .open(&format!("/ws/{room}"), Some("127.0.0.1"), &[])
            .await
            .unwrap_or_else(|e| panic!("room {room}: {e:?}"));
        held.push(c);
    }
    let (code, body) = server
        .open("/ws/three", Some("127.0.0.1"), &[])
        .await
        .err()
        .expect("a third room from one address is refused");
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("rooms_per_ip"), "{body}");
    assert!(server
        .open("/ws/three", Some("127.0.0.2"), &[])
        .await
        .is_ok());
}

#[tokio::test]
async fn history_requests_sent_before_the_welcome_are_answered_in_order() {
    let redis = Redis::start();
    let server = Server::replica(&redis, "order", "n1", &[]).await;
    let (mut writer, _) = server.join("/ws/order?user=w").await;
    for i in 1..=3 {
        writer.say(&format!("m{i}"), &format!("w{i}")).await;
    }
    // Redis paused: the requests are read before the welcome and held; each history read
    // holds the session, and they must still be answered in the order they were sent.
    redis.signal(libc::SIGSTOP);
    let mut c = server.connect("/ws/order?user=r").await;
    for (i, before) in [(0, 4), (1, 3), (2, 2)] {
        c.send_json(json!({"type":"history","before":before,"limit":1,"ref":format!("h{i}")}))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.signal(libc::SIGCONT);
    assert_eq!(c.next().await["type"], "welcome");
    for (i, offset) in [(0, 3), (1, 2), (2, 1)] {
        let page = c.next_of("history").await;
        assert_eq!(page["ref"], format!("h{i}"), "{page}");
        assert_eq!(page["messages"][0]["offset"], offset);
    }
}
