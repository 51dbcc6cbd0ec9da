//! The built-in page across connection losses, in real browsers: a lost history shown as a
//! gap, and messages that survive a server restart, each shown once.

use std::time::Duration;

use serde_json::json;

use crate::harness::{eventually, replica_env, Redis, Server};
use crate::webdriver::{has_message, Driver, NOTHING_SENDING, OFFLINE};

/// Reconnecting waits out a random backoff of up to 10 s after a few failed attempts.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_lost_history_is_marked_as_a_gap_not_hidden() {
    let mut server = Server::start(&[]);
    let addr = server.addr;
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice.join(&format!("http://{addr}/"), "alice", "gap").await;
    alice.send("before the loss").await;
    alice
        .wait_for(&has_message("before the loss"), "stored")
        .await;

    // The embedded bus keeps history in memory: a new process starts the room afresh.
    server.kill();
    alice.wait_for(OFFLINE, "the badge shows the loss").await;
    let _server = Server::start_on(&addr.to_string(), &[]);
    alice.wait_connected(RECONNECT_DEADLINE).await;
    alice.send("after the loss").await;
    alice
        .wait_for(&has_message("after the loss"), "stored")
        .await;

    assert_eq!(
        alice.stored_texts().await,
        ["before the loss", "after the loss"]
    );
    let gaps = alice
        .script(
            "return Array.from(document.querySelectorAll('#messages > *')).map(e => e.dataset.gap || null)",
        )
        .await;
    assert_eq!(gaps[0], json!(null), "{gaps}");
    assert!(
        gaps[1]
            .as_str()
            .is_some_and(|g| g.contains("history was reset")),
        "the first message after the loss carries the gap: {gaps}; events: {}",
        alice
            .script("return document.getElementById('events').textContent")
            .await
    );
    alice.quit().await;
}

/// Bytes waiting in the receive queue of each established socket on 127.0.0.1:`port`, by
/// socket inode (Linux `/proc/net/tcp`).
fn receive_queues(port: u16) -> std::collections::HashMap<String, u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[1] != local || f[3] != "01" {
                return None;
            }
            let rx = u64::from_str_radix(f[4].split(':').nth(1)?, 16).ok()?;
            Some((f[9].to_owned(), rx))
        })
        .collect()
}

#[tokio::test]
async fn a_message_sent_across_a_server_restart_appears_once_for_everyone() {
    let redis = Redis::start();
    let mut a = Server::replica(&redis, "restart", "node-a", &[]).await;
    let addr = a.addr;
    let base = format!("http://{addr}/");
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    let bob = driver.browser("bob").await;
    alice.join(&base, "alice", "restart").await;
    bob.join(&base, "bob", "restart").await;
    alice.send("before the restart").await;
    bob.wait_for(&has_message("before the restart"), "bob sees it")
        .await;
    alice.wait_for(NOTHING_SENDING, "acked").await;

    // 1. Stored, but the ack never comes: Redis is stopped while alice sends, the server
    //    hands the publish to Redis's socket and dies; Redis then runs it.
    redis.signal(libc::SIGSTOP);
    let before = receive_queues(redis.port);
    alice.send("stored, never acked").await;
    eventually(
        Duration::from_secs(10),
        "the publish waits in Redis's socket",
        || async {
            receive_queues(redis.port)
                .iter()
                .any(|(inode, rx)| *rx >= before.get(inode).copied().unwrap_or(0) + 300)
        },
    )
    .await;
    a.kill();
    redis.signal(libc::SIGCONT);
    eventually(
        Duration::from_secs(10),
        "Redis stored the message",
        || async {
            redis
                .cmd(&["XRANGE", "restart:{restart}:history", "-", "+"])
                .await
                .contains("stored, never acked")
        },
    )
    .await;

    // 2. Typed while the server is down, then the tab is closed: only localStorage has it.
    alice.wait_for(OFFLINE, "the badge shows the loss").await;
    alice.send("typed while down").await;
    alice
        .wait_for(
            "const o = JSON.parse(localStorage.getItem('confab.outbox.restart') || '[]');
             return o.map(e => e.text).join('|') === 'stored, never acked|typed while down'",
            "both unacked messages kept in localStorage",
        )
        .await;
    alice.goto("about:blank").await;

    // 3. Meanwhile another client posts through a second replica on the same Redis.
    let b = Server::replica(&redis, "restart", "node-b", &[]).await;
    let (mut carol, _) = b.join("/ws/restart?user=carol").await;
    for i in 1..=3 {
        carol.say(&format!("meanwhile {i}"), &format!("c{i}")).await;
    }

    // 4. The server comes back on the same port (under a new node id: the dead process's
    //    would be held for a presence lease). Bob's page reconnects by itself; alice opens
    //    the room's link again.
    let env = replica_env(&redis, "restart", "node-a2");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let a2 = Server::start_on(&addr.to_string(), &env);
    a2.wait_ready(true).await;
    alice.goto(&format!("{base}#restart")).await;

    let expected = [
        "before the restart",
        "stored, never acked",
        "meanwhile 1",
        "meanwhile 2",
        "meanwhile 3",
        "typed while down",
    ];
    for (who, browser) in [("alice", &alice), ("bob", &bob)] {
        browser.wait_connected(RECONNECT_DEADLINE).await;
        browser
            .wait_for(&has_message("typed while down"), "the last message arrives")
            .await;
        browser
            .wait_for(NOTHING_SENDING, "nothing left sending")
            .await;
        assert_eq!(browser.stored_texts().await, expected, "{who}");
        assert_eq!(browser.messages().await.len(), expected.len(), "{who}");
        let offsets = browser
            .script("return Array.from(document.querySelectorAll('#messages > *')).map(e => Number(e.dataset.offset))")
            .await;
        assert_eq!(offsets, json!([1, 2, 3, 4, 5, 6]), "{who}");
        assert_eq!(
            browser
                .script("return document.querySelector('[data-gap]') === null")
                .await,
            json!(true),
            "{who} resumed without a gap"
        );
    }
    assert_eq!(
        alice
            .script("return localStorage.getItem('confab.outbox.restart')")
            .await,
        json!(null)
    );
    // The resend of the stored message was acked with its first offset, not stored again.
    assert_eq!(
        redis
            .cmd(&["XLEN", "restart:{restart}:history"])
            .await
            .trim(),
        ":6"
    );
    alice.quit().await;
    bob.quit().await;
}
