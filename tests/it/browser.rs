//! The built-in page in real browsers (headless Chromium, see `webdriver.rs`): chat, presence,
//! typing, text that stays text, history pages, and messages that survive a server restart.

use std::time::Duration;

use serde_json::json;

use crate::harness::{eventually, replica_env, Redis, Server};
use crate::webdriver::{screenshot_dir, Driver, ENTER};

/// Reconnecting waits out a random backoff of up to 10 s after a few failed attempts.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(30);

fn has_message(text: &str) -> String {
    format!(
        "return Array.from(document.querySelectorAll('#messages > [data-offset] .text'))
             .some(e => e.textContent === {})",
        json!(text)
    )
}

const OFFLINE: &str =
    "return document.getElementById('status').textContent.startsWith('offline, reconnecting in')";

const NOTHING_SENDING: &str =
    "return document.querySelectorAll('#messages > .pending, #messages > .failed').length === 0";

#[tokio::test]
async fn two_browsers_chat_and_see_each_others_presence_and_typing() {
    let server = Server::start(&[]);
    let driver = Driver::start().await;
    let base = format!("http://{}/", server.addr);
    let alice = driver.browser("alice").await;
    let bob = driver.browser("bob").await;
    alice.resize(960, 600).await;
    alice.join(&base, "alice", "e2e").await;
    bob.join(&base, "bob", "e2e").await;

    // Presence: each lists the other (alice from bob's join, bob from the presence list).
    alice
        .wait_for(
            "return document.getElementById('users').textContent.includes('bob')",
            "alice sees bob online",
        )
        .await;
    bob.wait_for(
        "return document.getElementById('users').textContent.includes('alice')",
        "bob sees alice online",
    )
    .await;
    assert_eq!(
        alice.script("return location.hash").await,
        json!("#e2e"),
        "the room is in the URL, so the link can be shared"
    );

    alice.send("hello from alice").await;
    bob.wait_for(&has_message("hello from alice"), "bob sees alice's message")
        .await;
    bob.send("hi alice, how is the release going?").await;
    alice.send("tests are green, shipping after lunch").await;
    for browser in [&alice, &bob] {
        browser
            .wait_for(
                &has_message("tests are green, shipping after lunch"),
                "both see the last message",
            )
            .await;
        browser
            .wait_for(NOTHING_SENDING, "every message acked")
            .await;
    }

    // Typing: bob types without sending; alice is told, bob is not told about himself.
    bob.fill("#message", "great, I will write the notes").await;
    alice
        .wait_for(
            "return document.getElementById('typing').textContent === 'bob is typing…'",
            "alice sees bob typing",
        )
        .await;
    assert_eq!(
        bob.script("return document.getElementById('typing').textContent")
            .await,
        json!("")
    );
    let shot = screenshot_dir().join("chat.png");
    alice.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "{shot:?}");

    // His message ends the notice at once; alice's tab, hidden meanwhile, counts it as unread.
    alice
        .script("Object.defineProperty(document, 'hidden', {value: true, configurable: true})")
        .await;
    bob.keys("#message", ENTER).await;
    alice
        .wait_for(
            "return document.title === '(1) #e2e · confab'",
            "unread count in the title",
        )
        .await;
    alice
        .script("delete document.hidden; document.dispatchEvent(new Event('visibilitychange'))")
        .await;
    assert_eq!(
        alice.script("return document.title").await,
        json!("#e2e · confab")
    );
    alice
        .wait_for(
            &has_message("great, I will write the notes"),
            "alice sees bob's message",
        )
        .await;
    alice
        .wait_for(
            "return document.getElementById('typing').textContent === ''",
            "bob's typing notice ends with his message",
        )
        .await;

    // Each message is one child of #messages, once, in the same order in both windows.
    let expected = [
        "hello from alice",
        "hi alice, how is the release going?",
        "tests are green, shipping after lunch",
        "great, I will write the notes",
    ];
    bob.wait_for(NOTHING_SENDING, "bob's last message acked")
        .await;
    for browser in [&alice, &bob] {
        assert_eq!(browser.stored_texts().await, expected);
        assert_eq!(browser.messages().await.len(), expected.len());
    }

    // Bob leaves: alice's list drops him.
    bob.quit().await;
    alice
        .wait_for(
            "return !document.getElementById('users').textContent.includes('bob')",
            "alice sees bob leave",
        )
        .await;
    alice.quit().await;
}

#[tokio::test]
async fn markup_in_a_message_is_shown_as_text_and_runs_nothing() {
    let server = Server::start(&[]);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice
        .join(&format!("http://{}/", server.addr), "alice", "xss")
        .await;

    // From another client, so the text comes from the server as any message would; and from
    // the page itself, which shows it while sending and after the ack.
    let payload = r#"<img src=x onerror="window.pwned='img'"><script>window.pwned='script'</script><b>bold</b>"#;
    let (mut mallory, _) = server.join("/ws/xss?user=mallory").await;
    mallory.say(payload, "x1").await;
    alice
        .wait_for(
            &has_message(payload),
            "alice sees mallory's message as text",
        )
        .await;
    alice.send(&format!("{payload} (quoted)")).await;
    alice
        .wait_for(
            &has_message(&format!("{payload} (quoted)")),
            "alice's own copy is stored",
        )
        .await;

    assert_eq!(
        alice.script("return window.pwned === undefined").await,
        json!(true)
    );
    assert_eq!(
        alice
            .script("return document.querySelectorAll('#messages img, #messages script, #messages b').length")
            .await,
        json!(0),
        "markup became elements"
    );
    assert_eq!(
        alice
            .script("return document.querySelectorAll('img, script:not([src])').length")
            .await,
        json!(0)
    );
    // The page itself runs under its policy without tripping it.
    assert_eq!(
        alice
            .script("return document.getElementById('events').textContent.includes('Content-Security-Policy')")
            .await,
        json!(false)
    );
    alice.quit().await;
}

#[tokio::test]
async fn load_older_fetches_earlier_pages_of_history() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "1000"),
        ("CONFAB_LIMITS__BURST", "1000"),
    ]);
    let (mut bot, _) = server.join("/ws/older?user=bot").await;
    for i in 1..120 {
        bot.send_json(json!({"type": "message", "text": format!("line {i}")}))
            .await;
    }
    assert_eq!(bot.say("line 120", "last").await, 120);

    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice
        .join(&format!("http://{}/", server.addr), "alice", "older")
        .await;
    let offsets = "return Array.from(document.querySelectorAll('#messages > [data-offset]'))
                       .map(e => Number(e.dataset.offset))";
    let count = |n: usize| {
        format!("return document.querySelectorAll('#messages > [data-offset]').length === {n}")
    };
    alice.wait_for(&count(50), "the latest 50 on joining").await;
    assert_eq!(
        alice.script(offsets).await,
        json!((71..=120).collect::<Vec<_>>())
    );

    alice.click("#older").await;
    alice.wait_for(&count(100), "a second page").await;
    assert_eq!(
        alice.script(offsets).await,
        json!((21..=120).collect::<Vec<_>>())
    );
    assert_eq!(
        alice
            .script("return document.getElementById('older').hidden")
            .await,
        json!(false)
    );

    alice.click("#older").await;
    alice.wait_for(&count(120), "the last page").await;
    assert_eq!(
        alice.script(offsets).await,
        json!((1..=120).collect::<Vec<_>>())
    );
    assert_eq!(
        alice.stored_texts().await.first().map(String::as_str),
        Some("line 1")
    );
    alice
        .wait_for(
            "return document.getElementById('older').hidden",
            "no button once the first message is shown",
        )
        .await;
    alice.quit().await;
}

#[tokio::test]
async fn a_refused_message_says_why_and_is_not_sent_again_on_a_phone_sized_screen() {
    let server = Server::start(&[("CONFAB_LIMITS__MAX_MESSAGE_CHARS", "20")]);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice.resize(360, 740).await;
    alice.goto(&format!("http://{}/", server.addr)).await;

    // Keyboard only: Enter in the room field joins, Enter in the message field sends.
    alice.fill("#name", "alice").await;
    alice.fill("#room", "phone").await;
    alice.keys("#room", ENTER).await;
    alice.wait_connected(Duration::from_secs(15)).await;
    assert_eq!(
        alice.script("return document.activeElement.id").await,
        json!("message"),
        "joining puts the focus where the user types"
    );

    // Nothing sticks out sideways; the composer is on screen; every field has a label.
    let layout = alice
        .script(
            "const r = document.getElementById('send').getBoundingClientRect();
             return [document.documentElement.scrollWidth <= innerWidth,
                     r.right <= innerWidth && r.bottom <= innerHeight && r.width > 0,
                     Array.from(document.querySelectorAll('input')).every(i => i.labels.length > 0)]",
        )
        .await;
    assert_eq!(layout, json!([true, true, true]));

    let long = "this one is far longer than twenty characters";
    alice.send(long).await;
    alice
        .wait_for(
            "const e = document.querySelector('#messages > .failed .state');
             return e !== null && e.textContent.includes('longer than 20 characters')",
            "the refusal is shown with the server's reason",
        )
        .await;
    assert_eq!(
        alice
            .script("return localStorage.getItem('confab.outbox.phone')")
            .await,
        json!(null),
        "a refused message is not kept for sending again"
    );
    let refused = || async {
        let m = server.http("GET", "/metrics", &[]).await.body;
        m.lines()
            .find(|l| l.starts_with("confab_rejected_frames_total{code=\"too_long\"}"))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(refused().await.as_deref(), Some("1"));

    // Joining again (a resume) sends what is waiting, but not the refused message.
    alice.click("#join").await;
    alice.wait_connected(Duration::from_secs(15)).await;
    alice.send("short one").await;
    alice
        .wait_for(&has_message("short one"), "the next message is stored")
        .await;
    assert_eq!(
        refused().await.as_deref(),
        Some("1"),
        "the refused message was sent again"
    );

    alice.screenshot(&screenshot_dir().join("phone.png")).await;

    // Edit puts the text back into the message field.
    alice.click("#messages > .failed button").await;
    assert_eq!(
        alice.script("return [document.getElementById('message').value, document.querySelectorAll('#messages > .failed').length]").await,
        json!([long, 0])
    );
    alice.quit().await;
}

#[tokio::test]
async fn a_rate_limited_message_is_not_resent_and_a_1008_close_stops_reconnecting() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "1"),
        ("CONFAB_LIMITS__BURST", "1"),
        ("CONFAB_LIMITS__MAX_VIOLATIONS", "1"),
    ]);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice
        .join(&format!("http://{}/", server.addr), "alice", "flood")
        .await;
    // Three messages in one go (Enter in the message field, no typing notices): the first
    // passes, the second is refused as rate limited, the third closes the session with 1008.
    alice
        .script(
            "const m = document.getElementById('message');
             for (const t of ['one', 'two', 'three']) {
               m.value = t;
               m.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}));
             }",
        )
        .await;
    alice
        .wait_for(
            "return document.getElementById('status').textContent.includes('1008')",
            "the page says why it stopped",
        )
        .await;
    alice
        .wait_for(
            "const e = document.querySelector('#messages > .failed');
             return e !== null && e.querySelector('.text').textContent === 'two'
               && e.querySelector('.state').textContent.includes('rate limit')
               && e.querySelector('button').textContent === 'Send again'",
            "the refused message says why and offers to send again",
        )
        .await;
    // Stopped means stopped: no reconnect within three times the first backoff's longest wait.
    let end = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < end {
        let status = alice
            .script("return document.getElementById('status').textContent")
            .await;
        assert!(
            status.as_str().unwrap().contains("1008"),
            "reconnected: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // "three" got no answer, so it waits; "one" too if the close beat its ack (it is then
    // stored already, and sending it again with its ref does not store it twice).
    let waiting = alice
        .script("return JSON.parse(localStorage.getItem('confab.outbox.flood')).map(e => e.text)")
        .await;
    assert!(
        waiting == json!(["three"]) || waiting == json!(["one", "three"]),
        "only unanswered messages wait to be sent: {waiting}"
    );

    // Joining again is the user's call; then what waits is sent (paced by the page if the
    // limit bites), each once, and the refused message is not.
    alice.click("#join").await;
    alice.wait_connected(Duration::from_secs(15)).await;
    alice
        .wait_for(&has_message("three"), "the waiting message is sent")
        .await;
    alice
        .wait_for(
            "return document.querySelectorAll('#messages > .pending').length === 0",
            "every waiting message acked",
        )
        .await;
    assert_eq!(alice.stored_texts().await, ["one", "three"]);
    assert_eq!(
        alice
            .script("return document.querySelector('#messages > .failed .text').textContent")
            .await,
        json!("two")
    );
    alice.quit().await;
}

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
