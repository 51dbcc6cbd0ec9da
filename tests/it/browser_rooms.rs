//! The built-in page's room list in real browsers (headless Chromium, see `webdriver.rs`):
//! several rooms on one connection (`GET /ws`), unread counts, every room resumed after a
//! restart, and the open rooms in the URL. Also `GET /confab.js`, the module it runs on.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, request, HttpReply, Server, TempDir};
use crate::webdriver::{
    has_message, room_joined, screenshot_dir, Driver, ALL_ROOMS_JOINED, ENTER, NOTHING_SENDING,
    OFFLINE,
};

const KEY: &str = "browser-rooms-api-key";

/// Reconnecting waits out a random backoff of up to 10 s after a few failed attempts.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// Posts `text` to `room` as `bot` through the HTTP API (not a WebSocket, so the server's
/// session count is the browser's alone).
async fn post(server: &Server, room: &str, text: &str) {
    let body = json!({"text": text, "user": "bot"}).to_string();
    let auth = format!("Bearer {KEY}");
    let path = format!("/api/rooms/{room}/messages");
    let reply = request(
        server.addr,
        "POST",
        &path,
        &[("Authorization", &auth)],
        &body,
    )
    .await;
    assert_eq!(reply.status, 201, "post to {room}: {}", reply.body);
}

async fn presence(server: &Server, room: &str) -> Value {
    let auth = format!("Bearer {KEY}");
    let path = format!("/api/rooms/{room}/presence");
    let reply = request(server.addr, "GET", &path, &[("Authorization", &auth)], "").await;
    reply.json()["users"].clone()
}

/// The server's own count of open WebSocket sessions (`/metrics`).
async fn sessions_open(server: &Server) -> Option<u64> {
    let body = server.http("GET", "/metrics", &[]).await.body;
    body.lines()
        .find_map(|l| l.strip_prefix("confab_sessions_open "))
        .and_then(|v| v.trim().parse().ok())
}

fn header<'r>(reply: &'r HttpReply, name: &str) -> &'r str {
    reply
        .head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map_or("", |(_, v)| v.trim())
}

fn rooms(list: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
    list.iter()
        .map(|(r, u)| ((*r).to_owned(), u.map(str::to_owned)))
        .collect()
}

#[tokio::test]
async fn the_client_module_is_served_as_javascript_under_the_pages_policy() {
    let server = Server::start(&[]);
    let module = server.http("GET", "/confab.js", &[]).await;
    assert_eq!(module.status, 200);
    assert!(header(&module, "content-type").starts_with("text/javascript"));
    assert!(header(&module, "content-security-policy").contains("script-src 'self'"));
    assert_eq!(header(&module, "x-content-type-options"), "nosniff");
    // Another origin's app may import it (module scripts are fetched in CORS mode).
    assert_eq!(header(&module, "access-control-allow-origin"), "*");
    assert!(
        module.body.contains("export class Confab"),
        "the module's API"
    );
    let page = server.http("GET", "/", &[]).await;
    assert!(page.body.contains(r#"src="/app.js" type="module""#));
    assert!(page.body.contains(r#"id="rooms""#));
    let script = server.http("GET", "/app.js", &[]).await;
    assert!(script.body.contains(r#"from "/confab.js""#));
}

#[tokio::test]
async fn two_rooms_share_one_connection_and_the_hidden_one_counts_its_unread_messages() {
    let server = Server::start(&[("CONFAB_API__KEY", KEY)]);
    let base = format!("http://{}/", server.addr);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice.join(&base, "alice", "alpha").await;
    alice.add_room("beta").await;
    assert_eq!(
        alice.rooms().await,
        rooms(&[("alpha", None), ("beta", None)])
    );
    eventually(
        Duration::from_secs(10),
        "the server holds one session",
        || async { sessions_open(&server).await == Some(1) },
    )
    .await;
    assert_eq!(
        alice.script("return window.confab.connects").await,
        json!(1),
        "joining a second room opened no second socket"
    );
    for room in ["alpha", "beta"] {
        let users = presence(&server, room).await;
        assert_eq!(users, json!(["alice"]), "{room}");
    }

    // Beta is shown: alpha's messages count as unread, beta's are on screen.
    post(&server, "alpha", "a1").await;
    post(&server, "alpha", "a2").await;
    post(&server, "beta", "b1").await;
    alice
        .wait_for(&has_message("b1"), "beta's message is shown")
        .await;
    alice
        .wait_for(
            "return document.querySelector('#rooms > [data-room=\"alpha\"] .unread')?.textContent === '2'",
            "alpha counts two unread",
        )
        .await;
    assert_eq!(
        alice.rooms().await,
        rooms(&[("alpha", Some("2")), ("beta", None)])
    );
    assert_eq!(alice.stored_texts().await, ["b1"], "only beta's messages");
    let shot = screenshot_dir().join("rooms.png");
    alice.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "{shot:?}");
    assert_eq!(
        alice.script("return location.hash").await,
        json!("#beta,alpha")
    );

    // Showing alpha shows its messages, clears its count, and beta starts counting.
    alice.show_room("alpha").await;
    assert_eq!(alice.stored_texts().await, ["a1", "a2"]);
    assert_eq!(
        alice.rooms().await,
        rooms(&[("alpha", None), ("beta", None)])
    );
    assert_eq!(
        alice.script("return location.hash").await,
        json!("#alpha,beta")
    );
    alice.send("hello alpha").await;
    alice
        .wait_for(&has_message("hello alpha"), "alice's message is stored")
        .await;
    alice.wait_for(NOTHING_SENDING, "acked").await;
    post(&server, "beta", "b2").await;
    alice
        .wait_for(
            "return document.querySelector('#rooms > [data-room=\"beta\"] .unread')?.textContent === '1'",
            "beta counts one unread",
        )
        .await;
    assert_eq!(alice.stored_texts().await, ["a1", "a2", "hello alpha"]);

    // Back to beta: both of its messages, once each, and nothing of alpha's.
    alice.show_room("beta").await;
    assert_eq!(alice.stored_texts().await, ["b1", "b2"]);
    assert_eq!(alice.messages().await.len(), 2);

    // Leaving beta unsubscribes it; alpha goes on, on the same connection.
    alice.click("#rooms > [data-room=\"beta\"] .leave").await;
    assert_eq!(alice.rooms().await, rooms(&[("alpha", None)]));
    assert_eq!(alice.script("return location.hash").await, json!("#alpha"));
    assert_eq!(alice.stored_texts().await, ["a1", "a2", "hello alpha"]);
    eventually(
        Duration::from_secs(10),
        "alice leaves beta's presence",
        || async { presence(&server, "beta").await == json!([]) },
    )
    .await;
    assert_eq!(presence(&server, "alpha").await, json!(["alice"]));
    post(&server, "beta", "b3").await;
    post(&server, "alpha", "a3").await;
    alice
        .wait_for(&has_message("a3"), "alpha is still live")
        .await;
    assert_eq!(alice.rooms().await, rooms(&[("alpha", None)]));
    assert_eq!(sessions_open(&server).await, Some(1));
    alice.quit().await;
}

#[tokio::test]
async fn every_room_resumes_after_a_server_restart_and_shows_each_message_once() {
    let store = TempDir::new("browser-rooms");
    let url = store.sqlite_url();
    let env = [
        ("CONFAB_API__KEY", KEY),
        ("CONFAB_STORE__URL", url.as_str()),
    ];
    let mut server = Server::start(&env);
    let addr = server.addr;
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice
        .join(&format!("http://{addr}/"), "alice", "north")
        .await;
    alice.add_room("south").await;
    post(&server, "north", "n1").await;
    post(&server, "south", "s1").await;
    alice.send("s2").await;
    alice.wait_for(&has_message("s2"), "stored").await;
    alice.wait_for(NOTHING_SENDING, "acked").await;
    alice.show_room("north").await;
    alice.wait_for(&has_message("n1"), "north's first").await;

    // Down: what alice types in either room waits in that room's outbox.
    server.kill();
    alice.wait_for(OFFLINE, "the badge shows the loss").await;
    alice.send("n2 typed while down").await;
    alice.show_room("south").await;
    alice.send("s3 typed while down").await;
    alice.show_room("north").await;
    for (room, text) in [
        ("north", "n2 typed while down"),
        ("south", "s3 typed while down"),
    ] {
        let saved = alice
            .script(&format!(
                "return JSON.parse(localStorage.getItem('confab.outbox.{room}') || '[]').map(e => e.text)"
            ))
            .await;
        assert_eq!(saved, json!([text]), "{room}'s outbox");
    }

    // Back on the same port and store; others post before or while alice resumes.
    let server = Server::start_on(&addr.to_string(), &env);
    post(&server, "north", "n3").await;
    post(&server, "south", "s4").await;
    alice
        .wait_for_within(RECONNECT_DEADLINE, ALL_ROOMS_JOINED, "every room resumed")
        .await;

    let expect = [
        ("north", vec!["n1", "n2 typed while down", "n3"]),
        ("south", vec!["s1", "s2", "s3 typed while down", "s4"]),
    ];
    // South is hidden: of what came while alice was away, only the bot's message is unread.
    alice
        .wait_for(
            "return document.querySelector('#rooms > [data-room=\"south\"] .unread')?.textContent === '1'",
            "south counts the bot's message as unread",
        )
        .await;
    for (room, texts) in expect {
        alice.show_room(room).await;
        alice
            .wait_for(NOTHING_SENDING, &format!("{room}: nothing left sending"))
            .await;
        for text in &texts {
            alice
                .wait_for(&has_message(text), &format!("{room}: {text}"))
                .await;
        }
        // Once each, in offset order without a hole, and no gap: the resume lost nothing.
        let mut shown = alice.stored_texts().await;
        assert_eq!(shown.len(), texts.len(), "{room}: {shown:?}");
        shown.sort();
        assert_eq!(shown, texts, "{room}");
        let offsets = alice
            .script("return Array.from(document.querySelectorAll('#messages > *')).map(e => Number(e.dataset.offset))")
            .await;
        let expected: Vec<usize> = (1..=texts.len()).collect();
        assert_eq!(offsets, json!(expected), "{room}");
        assert_eq!(
            alice
                .script("return document.querySelector('#messages [data-gap]') === null")
                .await,
            json!(true),
            "{room} resumed without a gap"
        );
        assert_eq!(
            alice
                .script(&format!(
                    "return localStorage.getItem('confab.outbox.{room}')"
                ))
                .await,
            json!(null),
            "{room}'s outbox is empty"
        );
    }
    assert_eq!(sessions_open(&server).await, Some(1));
    alice.quit().await;
}

#[tokio::test]
async fn the_url_names_the_open_rooms_and_a_link_or_reload_reopens_them() {
    let server = Server::start(&[("CONFAB_API__KEY", KEY)]);
    let base = format!("http://{}/", server.addr);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice.join(&base, "alice", "one").await;
    alice.add_room("two").await;
    alice.add_room("three").await;
    // The shown room first, then the others in the order joined.
    assert_eq!(
        alice.script("return location.hash").await,
        json!("#three,one,two")
    );
    alice.show_room("one").await;
    assert_eq!(
        alice.script("return location.hash").await,
        json!("#one,two,three")
    );
    post(&server, "one", "in one").await;
    alice.wait_for(&has_message("in one"), "shown").await;

    // A reload reopens every room on one connection, the first one shown.
    alice.goto("about:blank").await;
    alice.goto(&format!("{base}#one,two,three")).await;
    alice
        .wait_for(ALL_ROOMS_JOINED, "every room reopened")
        .await;
    assert_eq!(
        alice.rooms().await,
        rooms(&[("one", None), ("two", None), ("three", None)])
    );
    assert_eq!(
        alice
            .script("return document.querySelector('#rooms > .shown').dataset.room")
            .await,
        json!("one")
    );
    alice
        .wait_for(&has_message("in one"), "its history is loaded")
        .await;
    assert_eq!(alice.stored_texts().await, ["in one"]);
    assert_eq!(
        alice.script("return window.confab.connects").await,
        json!(1)
    );

    // A link opens its rooms in another browser; what is posted in a room not shown counts.
    let bob = driver.browser("bob").await;
    bob.goto(&format!("{base}#three,two")).await;
    bob.wait_for(ALL_ROOMS_JOINED, "the link's rooms joined")
        .await;
    assert_eq!(bob.rooms().await, rooms(&[("three", None), ("two", None)]));
    bob.send("bob in three").await;
    bob.wait_for(&has_message("bob in three"), "stored").await;
    alice
        .wait_for(
            "return document.querySelector('#rooms > [data-room=\"three\"] .unread')?.textContent === '1'",
            "alice counts bob's message in three",
        )
        .await;
    // The keyboard reaches the list: Enter on a room shows it.
    alice
        .keys("#rooms > [data-room=\"two\"] .name", ENTER)
        .await;
    alice
        .wait_for(
            "return document.querySelector('#rooms > .shown')?.dataset.room === 'two'",
            "Enter on a room shows it",
        )
        .await;
    assert_eq!(
        alice.script("return location.hash").await,
        json!("#two,one,three")
    );
    // Editing the hash by hand shows the room it names first (and joins any new one).
    alice.script("location.hash = '#three,four'").await;
    // The room itself, not "every listed room joined", which already held before the edit.
    alice
        .wait_for(&room_joined("four"), "four joined too")
        .await;
    alice
        .wait_for(&has_message("bob in three"), "three is shown")
        .await;
    assert_eq!(
        alice
            .rooms()
            .await
            .into_iter()
            .map(|(r, _)| r)
            .collect::<Vec<_>>(),
        ["one", "two", "three", "four"]
    );
    alice.quit().await;
    bob.quit().await;
}

#[tokio::test]
async fn a_room_the_token_does_not_allow_is_refused_alone_and_the_others_go_on() {
    const SECRET: &str = "browser-rooms-secret-0123456789abcdef";
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "rooms": ["team-*"], "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let server = Server::start(&[
        ("CONFAB_AUTH__JWT_SECRET", SECRET),
        ("CONFAB_API__KEY", KEY),
    ]);
    let base = format!("http://{}/", server.addr);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;

    // A link naming an allowed and a forbidden room: the forbidden one is refused on its own.
    alice.goto(&format!("{base}#secret,team-a")).await;
    alice
        .wait_for(
            "return !document.getElementById('token-field').hidden",
            "the page asks for a token",
        )
        .await;
    alice.fill("#token", &token).await;
    alice.click("#join").await;
    alice
        .wait_for(&room_joined("team-a"), "the allowed room is joined")
        .await;
    alice
        .wait_for(
            "return document.querySelector('#rooms > [data-room=\"secret\"]')?.dataset.state === 'refused'",
            "the forbidden room is marked refused",
        )
        .await;
    assert_eq!(
        alice
            .script("return document.querySelector('#rooms > [data-room=\"secret\"]').title")
            .await,
        json!("not joined: your token does not allow this room")
    );
    assert_eq!(
        alice.script("return window.confab.stopped").await,
        json!(false),
        "the connection goes on"
    );

    // The allowed room works on the same connection.
    alice.show_room("team-a").await;
    alice.send("hello team").await;
    alice
        .wait_for(&has_message("hello team"), "stored in team-a")
        .await;
    post(&server, "team-a", "from the bot").await;
    alice
        .wait_for(&has_message("from the bot"), "live in team-a")
        .await;
    assert_eq!(presence(&server, "secret").await, json!([]));
    assert_eq!(sessions_open(&server).await, Some(1));
    alice.quit().await;
}

#[tokio::test]
async fn a_link_with_five_rooms_joins_them_all_at_once_under_a_message_burst_of_two() {
    // A message burst of 2: when subscribes were charged like messages, three of the five
    // were refused (and the page had to ask again). They have a budget of their own now.
    let server = Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "2"),
        ("CONFAB_LIMITS__BURST", "2"),
    ]);
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice
        .goto(&format!("http://{}/#r1,r2,r3,r4,r5", server.addr))
        .await;
    alice
        .wait_for_within(
            Duration::from_secs(30),
            ALL_ROOMS_JOINED,
            "every room joined in the end",
        )
        .await;
    assert_eq!(alice.rooms().await.len(), 5, "{:?}", alice.rooms().await);
    let events = alice
        .script("return document.getElementById('events').textContent")
        .await;
    assert!(
        !events.as_str().unwrap_or("").contains("rate_limited"),
        "no subscribe was refused: {events}"
    );
    alice.quit().await;
}

#[tokio::test]
async fn a_web_app_on_another_origin_imports_the_module_and_chats_through_it() {
    let server = Server::start(&[("CONFAB_API__KEY", KEY)]);
    let driver = Driver::start().await;
    let app = driver.browser("app").await;
    // localhost is another origin than 127.0.0.1: the import is a CORS fetch. (The app's own
    // page here is the server's /healthz, for want of another web server.)
    let addr = server.addr;
    app.goto(&format!("http://localhost:{}/healthz", addr.port()))
        .await;
    let done = app
        .script_async(&format!(
            r#"const done = arguments[arguments.length - 1];
            (async () => {{
              const {{ Confab }} = await import("http://{addr}/confab.js");
              const chat = new Confab({{ url: "ws://{addr}/ws", user: "app" }});
              const seen = [];
              chat.on("message", ({{ room, message }}) => seen.push(room + ":" + message.text));
              const acked = new Promise((ok) => chat.on("ack", ({{ room, offset }}) => ok(room + "@" + offset)));
              const welcomed = new Promise((ok) => chat.on("welcome", ok));
              chat.join("apps");
              await welcomed;
              chat.send("apps", "from an app");
              const ack = await acked;
              return [ack, chat.connects, seen];
            }})().then(done, (e) => done("failed: " + e));"#
        ))
        .await;
    assert_eq!(done[0], json!("apps@1"), "{done}");
    assert_eq!(done[1], json!(1), "{done}");
    let auth = format!("Bearer {KEY}");
    let history = request(
        addr,
        "GET",
        "/api/rooms/apps/history",
        &[("Authorization", &auth)],
        "",
    )
    .await
    .json();
    assert_eq!(history["messages"][0]["text"], json!("from an app"));
    assert_eq!(history["messages"][0]["user"], json!("app"));
    app.quit().await;
}

#[tokio::test]
async fn a_link_with_eighty_rooms_joins_them_all_under_the_default_limits() {
    // 80 subscribes at once: charged like messages, they passed the default burst (20) by 60
    // refusals, over the 50 violations that close a session with 1008. They have their own
    // budget now (a burst of limits.rooms_per_connection, 100); this keeps the whole link
    // joined on one connection with nothing refused.
    let server = Server::start(&[]);
    let rooms: Vec<String> = (1..=80).map(|i| format!("r{i}")).collect();
    let driver = Driver::start().await;
    let alice = driver.browser("alice").await;
    alice
        .goto(&format!("http://{}/#{}", server.addr, rooms.join(",")))
        .await;
    alice
        .wait_for_within(
            Duration::from_secs(40),
            ALL_ROOMS_JOINED,
            "every room joined",
        )
        .await;
    assert_eq!(alice.rooms().await.len(), 80);
    assert_eq!(
        alice.script("return window.confab.connects").await,
        json!(1)
    );
    let events = alice
        .script("return document.getElementById('events').textContent")
        .await;
    assert!(
        !events.as_str().unwrap_or("").contains("rate_limited"),
        "no subscribe was refused: {events}"
    );
    alice.quit().await;
}
