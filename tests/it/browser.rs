//! The built-in page in real browsers (headless Chromium, see `webdriver.rs`): chat, presence,
//! typing, text that stays text, history pages, refusals. Reconnecting: `browser_reconnect.rs`.

use std::time::Duration;

use serde_json::json;

use crate::harness::Server;
use crate::webdriver::{has_message, screenshot_dir, Driver, ENTER, NOTHING_SENDING};

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
