//! Limits that protect the replica: rate limits, slow consumers, connection caps, timeouts.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{say_big, until_leave, Client, Ending, Server, DEADLINE};

#[tokio::test]
async fn over_the_rate_limit_messages_are_refused_and_flooding_closes_with_1008() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "1"),
        ("CONFAB_LIMITS__BURST", "3"),
        ("CONFAB_LIMITS__MAX_VIOLATIONS", "4"),
    ]);
    let (mut c, _) = server.join("/ws/lobby").await;
    for i in 0..3 {
        c.say("within the burst", &format!("ok{i}")).await;
    }
    c.send_json(json!({"type":"message","text":"too fast","ref":"x"}))
        .await;
    let e = c.next_of("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("rate_limited"), Some("x"))
    );
    // Three more violations are refused one by one; the fifth closes the session, so later
    // sends may find the connection gone.
    for _ in 0..10 {
        if !c.try_send_text("flood").await {
            break;
        }
    }
    let (ending, seen) = c.ending(DEADLINE).await;
    assert_eq!(ending, Ending::Closed(1008));
    let published = seen.iter().filter(|v| v["type"] == "message").count();
    assert!(
        published <= 1,
        "at most one token refilled during the flood: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_4008_while_a_fast_member_gets_everything() {
    const MESSAGES: u64 = 2500;
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
        ("CONFAB_LIMITS__BURST", "100000"),
        ("CONFAB_LIMITS__SESSION_QUEUE", "64"),
    ]);
    // The slow member's socket holds a few KiB and it reads nothing until the end; the
    // server's send buffer (at most 4 MiB here) then fills, and its queue after that.
    let mut slow = Client::connect_small_window(&server.url("/ws/big?user=slow")).await;
    assert_eq!(slow.next().await["type"], "welcome");
    let (fast, _) = server.join("/ws/big?user=fast").await;
    let reader = tokio::spawn(async move {
        let mut fast = fast;
        let mut next_offset = 1;
        while next_offset <= MESSAGES {
            let v = fast.next_of("message").await;
            assert_eq!(
                v["offset"], next_offset,
                "fast member gets every message in order"
            );
            next_offset += 1;
        }
    });
    // One sender, waiting for each ack, so the fast member is never more than a few frames
    // behind: only the slow member's backlog grows.
    let (mut sender, _) = server.join("/ws/big?user=sender").await;
    let text = "z".repeat(3000);
    for i in 0..MESSAGES {
        assert_eq!(sender.say(&text, &i.to_string()).await, i + 1);
    }
    tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("fast member finished in time")
        .expect("fast member saw everything");
    // Now the slow member reads what was queued for it, then the 4008 close.
    let (ending, seen) = slow.ending(Duration::from_secs(30)).await;
    assert_eq!(ending, Ending::Closed(4008));
    let offsets: Vec<u64> = seen
        .iter()
        .filter(|v| v["type"] == "message")
        .map(|v| v["offset"].as_u64().unwrap())
        .collect();
    assert!(
        (offsets.len() as u64) < MESSAGES,
        "the slow member was cut off, got {}",
        offsets.len()
    );
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "what it got has no holes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_takes_nothing_of_a_full_backlog_is_dropped_and_leaves() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
        ("CONFAB_LIMITS__BURST", "100000"),
        ("CONFAB_WEBSOCKET__PING_INTERVAL_SECS", "1"),
        ("CONFAB_WEBSOCKET__CLIENT_TIMEOUT_SECS", "2"),
    ]);
    // A hung client: connected, its TCP stack alive, reading nothing, ever.
    let mut hung = Client::connect_small_window(&server.url("/ws/hang?user=hung")).await;
    assert_eq!(hung.next().await["type"], "welcome");
    // The watcher reads all along (so it answers pings) until it sees the hung user leave.
    let (watcher, _) = server.join("/ws/hang?user=watcher").await;
    let left = until_leave(watcher, "hung");
    // 7.5 MB: more than the kernel's buffers hold for the hung client, so its session waits
    // on its socket, where it runs nothing else, not even its heartbeat.
    let (mut sender, _) = server.join("/ws/hang?user=sender").await;
    say_big(&mut sender, 2500).await;
    tokio::time::timeout(Duration::from_secs(30), left)
        .await
        .expect("the hung client was dropped and left within the client timeout")
        .expect("watcher");
    drop(hung);
}

#[tokio::test]
async fn connections_over_the_limit_get_503() {
    let server = Server::start(&[("CONFAB_LIMITS__MAX_CONNECTIONS", "2")]);
    let (a, _) = server.join("/ws/lobby").await;
    let (_b, _) = server.join("/ws/lobby").await;
    assert_eq!(server.refused_status("/ws/lobby").await, 503);
    a.close().await;
    // The slot comes back once the first session is gone.
    let end = Instant::now() + DEADLINE;
    loop {
        match tokio_tungstenite::connect_async(server.url("/ws/lobby")).await {
            Ok(_) => break,
            Err(_) if Instant::now() < end => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed() {
    let server = Server::start(&[
        ("CONFAB_WEBSOCKET__PING_INTERVAL_SECS", "1"),
        ("CONFAB_WEBSOCKET__CLIENT_TIMEOUT_SECS", "2"),
    ]);
    let (mut c, _) = server.join("/ws/lobby").await;
    // Reading would make tungstenite answer pings; a silent client must not read. Wait for
    // the server to give up, then look at what it sent.
    let started = Instant::now();
    crate::harness::eventually(Duration::from_secs(10), "session timed out", || {
        let log = server.log();
        async move { log.contains("timed out") }
    })
    .await;
    assert!(started.elapsed() >= Duration::from_secs(2));
    let (ending, _) = c.ending(DEADLINE).await;
    assert_eq!(ending, Ending::Closed(1001));
}

#[tokio::test]
async fn a_sessions_log_lines_start_with_its_session_room_and_user() {
    let server = Server::start(&[
        ("CONFAB_WEBSOCKET__PING_INTERVAL_SECS", "1"),
        ("CONFAB_WEBSOCKET__CLIENT_TIMEOUT_SECS", "2"),
    ]);
    // A client that never reads is timed out by the session, which then leaves.
    let (_c, _) = server.join("/ws/lobby?user=ann").await;
    crate::harness::eventually(Duration::from_secs(10), "session left", || {
        let log = server.log();
        async move { log.contains("disconnected") }
    })
    .await;
    let log = server.log();
    for what in ["connected", "timed out", "disconnected"] {
        let line = log
            .lines()
            .find(|l| l.ends_with(&format!(" {what}")))
            .unwrap_or_else(|| panic!("no `{what}` line in:\n{log}"));
        // The harness names the node `test-node`; a session's label is the node and a
        // 16-digit hex id.
        let at = line.find("session=").expect("a session= key");
        let (label, rest) = line[at + "session=".len()..]
            .split_once(' ')
            .expect("keys after the session");
        let id = label.strip_prefix("test-node-").unwrap_or_default();
        assert!(
            id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{line}"
        );
        assert_eq!(rest, format!("room=lobby user=ann {what}"), "{line}");
    }
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let server = Server::start(&[
        ("CONFAB_WEBSOCKET__PING_INTERVAL_SECS", "1"),
        ("CONFAB_WEBSOCKET__CLIENT_TIMEOUT_SECS", "2"),
    ]);
    let (mut c, _) = server.join("/ws/lobby").await;
    // Reading answers the server's pings; nothing but noise should arrive for 4 s.
    let end = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < end {
        if let Some(v) = c.try_next(end - tokio::time::Instant::now()).await {
            assert_eq!(v["type"], "presence", "unexpected {v}");
        }
    }
    assert_eq!(c.say("still here", "s").await, 1);
}
