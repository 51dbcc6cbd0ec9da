//! The HTTP API (publish, history, presence) and `/metrics`, through the real binary, on the
//! embedded bus and on Redis with two replicas.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, request, Client, Ending, HttpReply, Redis, Server};

const KEY: &str = "s3cret-api-key";

/// A call to the API with `key` as the bearer key (none when `None`).
async fn api(
    server: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> HttpReply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = Vec::new();
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth.as_str()));
    }
    request(server.addr, method, path, &headers, body).await
}

async fn post(server: &Server, room: &str, body: Value) -> HttpReply {
    let path = format!("/api/rooms/{room}/messages");
    api(server, "POST", &path, Some(KEY), &body.to_string()).await
}

/// Asserts the reply is `status` with the JSON error shape and this `code`.
fn assert_error(reply: &HttpReply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{} {}", reply.head, reply.body);
    let v = reply.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// The next message frame at `offset` or later, skipping older ones (a sender may see its
/// own message before or after its ack).
async fn message_at(client: &mut Client, offset: u64) -> Value {
    loop {
        let m = client.next_of("message").await;
        if m["offset"].as_u64().is_some_and(|o| o >= offset) {
            return m;
        }
    }
}

fn offsets(history: &Value) -> Vec<u64> {
    history["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["offset"].as_u64().expect("offset"))
        .collect()
}

#[tokio::test]
async fn an_api_publish_reaches_members_on_both_replicas_and_a_repeated_ref_keeps_its_offset() {
    let redis = Redis::start();
    let a = Server::replica(&redis, "api-pub", "node-a", &[("CONFAB_API__KEY", KEY)]).await;
    let b = Server::replica(&redis, "api-pub", "node-b", &[("CONFAB_API__KEY", KEY)]).await;
    let (mut alice, welcome) = a.join("/ws/ops?user=alice").await;
    let (mut bob, _) = b.join("/ws/ops?user=bob").await;
    assert_eq!(alice.say("first", "c1").await, 1);
    assert_eq!(message_at(&mut bob, 1).await["offset"], 1);

    let reply = post(
        &b,
        "ops",
        json!({"text":"deploy done","user":"deploybot","ref":"d1"}),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["offset"], 2, "{body}");
    assert_eq!(body["epoch"], welcome["epoch"], "{body}");
    for member in [&mut alice, &mut bob] {
        let m = message_at(member, 2).await;
        assert_eq!(
            (m["offset"].as_u64(), m["user"].as_str(), m["text"].as_str()),
            (Some(2), Some("deploybot"), Some("deploy done")),
            "{m}"
        );
    }

    // A retry from the other replica: the original offset, and nothing published again.
    let again = post(
        &a,
        "ops",
        json!({"text":"deploy done","user":"deploybot","ref":"d1"}),
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["offset"], 2);
    let next = post(&a, "ops", json!({"text":"no user given"})).await;
    assert_eq!(next.status, 201, "{}", next.body);
    assert_eq!(next.json()["offset"], 3);
    for member in [&mut alice, &mut bob] {
        let m = message_at(member, 3).await;
        assert_eq!(m["offset"], 3, "the repeat was not published: {m}");
        assert_eq!(m["user"], "api", "{m}");
    }
}

#[tokio::test]
async fn presence_lists_the_users_of_both_replicas() {
    let redis = Redis::start();
    let a = Server::replica(&redis, "api-pres", "node-a", &[("CONFAB_API__KEY", KEY)]).await;
    let b = Server::replica(&redis, "api-pres", "node-b", &[("CONFAB_API__KEY", KEY)]).await;
    let (_alice, _) = a.join("/ws/ops?user=alice").await;
    let (_bob, _) = b.join("/ws/ops?user=bob").await;
    eventually(Duration::from_secs(10), "both users present", || async {
        let reply = api(&a, "GET", "/api/rooms/ops/presence", Some(KEY), "").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json() == json!({"room":"ops","users":["alice","bob"]})
    })
    .await;
    let empty = api(&b, "GET", "/api/rooms/quiet/presence", Some(KEY), "").await;
    assert_eq!(empty.json(), json!({"room":"quiet","users":[]}));
}

#[tokio::test]
async fn the_api_answers_unavailable_while_redis_is_down_and_publishes_again_once_it_is_back() {
    let mut redis = Redis::start();
    let a = Server::replica(&redis, "api-down", "node-a", &[("CONFAB_API__KEY", KEY)]).await;
    redis.kill();
    a.wait_ready(false).await;
    assert_error(
        &post(&a, "ops", json!({"text":"hello"})).await,
        503,
        "unavailable",
    );
    assert_eq!(scrape(&a).await.get("confab_ready"), 0.0);
    // Back, and empty: the bridge subscribes again and the API publishes from offset 1.
    redis.restart();
    a.wait_ready(true).await;
    let m = scrape(&a).await;
    assert!(m.get("confab_bus_reconnects_total") >= 1.0);
    assert_eq!(m.get("confab_ready"), 1.0);
    let reply = post(&a, "ops", json!({"text":"hello again"})).await;
    assert_eq!(
        (reply.status, reply.json()["offset"].as_u64()),
        (201, Some(1))
    );
}

#[tokio::test]
async fn history_pages_back_with_before_and_limit_on_the_embedded_bus() {
    let server = Server::start(&[("CONFAB_API__KEY", KEY)]);
    let (mut carol, welcome) = server.join("/ws/log?user=carol").await;
    for i in 1..=5 {
        let reply = post(&server, "log", json!({"text": format!("line {i}")})).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        assert_eq!(reply.json()["offset"], i);
        assert_eq!(carol.next_of("message").await["offset"], i);
    }
    let get = |q: &'static str| {
        let server = &server;
        async move {
            let reply = api(
                server,
                "GET",
                &format!("/api/rooms/log/history{q}"),
                Some(KEY),
                "",
            )
            .await;
            assert_eq!(reply.status, 200, "{q}: {}", reply.body);
            reply.json()
        }
    };
    let latest = get("").await;
    assert_eq!(latest["room"], "log");
    assert_eq!(latest["epoch"], welcome["epoch"]);
    assert_eq!(offsets(&latest), [1, 2, 3, 4, 5]);
    assert_eq!(latest["messages"][0]["type"], "message");
    assert_eq!(latest["messages"][0]["text"], "line 1");
    assert_eq!(offsets(&get("?limit=2").await), [4, 5]);
    assert_eq!(offsets(&get("?before=4&limit=2").await), [2, 3]);
    assert_eq!(offsets(&get("?before=2").await), [1]);
    assert_eq!(offsets(&get("?before=1").await), Vec::<u64>::new());

    let never = get_room(&server, "never-seen").await;
    assert_eq!(never["room"], "never-seen");
    assert!(never["epoch"].is_string(), "{never}");
    assert_eq!(offsets(&never), Vec::<u64>::new());
}

async fn get_room(server: &Server, room: &str) -> Value {
    let reply = api(
        server,
        "GET",
        &format!("/api/rooms/{room}/history"),
        Some(KEY),
        "",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

#[tokio::test]
async fn history_pages_back_on_redis() {
    let redis = Redis::start();
    let a = Server::replica(&redis, "api-hist", "node-a", &[("CONFAB_API__KEY", KEY)]).await;
    for i in 1..=3 {
        assert_eq!(
            post(&a, "log", json!({"text": format!("l{i}")}))
                .await
                .json()["offset"],
            i
        );
    }
    let reply = api(
        &a,
        "GET",
        "/api/rooms/log/history?before=3&limit=1",
        Some(KEY),
        "",
    )
    .await;
    assert_eq!(offsets(&reply.json()), [2]);
    assert_eq!(
        offsets(&get_room(&a, "empty-room").await),
        Vec::<u64>::new()
    );
}

#[tokio::test]
async fn refused_requests_get_json_errors_with_the_right_status() {
    let server = Server::start(&[
        ("CONFAB_API__KEY", KEY),
        ("CONFAB_LIMITS__MAX_FRAME_BYTES", "1024"),
        ("CONFAB_LIMITS__MAX_MESSAGE_CHARS", "10"),
    ]);
    let path = "/api/rooms/ops/messages";
    let body = r#"{"text":"hi"}"#;
    assert_error(
        &api(&server, "POST", path, None, body).await,
        401,
        "unauthorized",
    );
    assert_error(
        &api(&server, "POST", path, Some("wrong"), body).await,
        401,
        "unauthorized",
    );
    let history = "/api/rooms/ops/history";
    assert_error(
        &api(&server, "GET", history, Some("s3cret"), "").await,
        401,
        "unauthorized",
    );
    assert_error(
        &post(&server, "bad%20room", json!({"text":"hi"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &post(&server, "ops", json!({"text":"  "})).await,
        400,
        "bad_request",
    );
    assert_error(
        &post(&server, "ops", json!({"text":"x", "user":"no spaces"})).await,
        400,
        "bad_request",
    );
    assert_error(
        &post(&server, "ops", json!({"text":"x", "ref": "r".repeat(65)})).await,
        400,
        "bad_request",
    );
    assert_error(
        &post(&server, "ops", json!({"text":"€".repeat(11)})).await,
        400,
        "too_long",
    );
    assert_error(
        &api(&server, "POST", path, Some(KEY), "{not json").await,
        400,
        "bad_request",
    );
    let big = json!({"text": "x".repeat(2000)}).to_string();
    assert_error(
        &api(&server, "POST", path, Some(KEY), &big).await,
        413,
        "too_large",
    );
    for q in [
        "?limit=0",
        "?limit=101",
        "?limit=ten",
        "?before=0",
        "?before=9007199254740992",
    ] {
        let reply = api(&server, "GET", &format!("{history}{q}"), Some(KEY), "").await;
        assert_error(&reply, 400, "bad_request");
    }
    let presence = api(&server, "GET", "/api/rooms/-x/presence", Some(KEY), "").await;
    assert_error(&presence, 400, "bad_request");
    // Ten characters of three bytes each are within the limit.
    assert_eq!(
        post(&server, "ops", json!({"text":"€".repeat(10)}))
            .await
            .status,
        201
    );

    let disabled = Server::start(&[]);
    for (method, path) in [
        ("POST", "/api/rooms/ops/messages"),
        ("GET", "/api/rooms/ops/history"),
        ("GET", "/api/rooms/ops/presence"),
    ] {
        let reply = api(&disabled, method, path, Some("anything"), body).await;
        assert_error(&reply, 403, "forbidden");
    }
}

/// A parsed `/metrics` page: every sample by `name{labels}`, and the families with HELP and
/// TYPE lines.
struct Scrape {
    samples: HashMap<String, f64>,
}

impl Scrape {
    fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }
}

/// Parses the Prometheus text format strictly enough to fail on anything malformed.
fn parse_metrics(text: &str) -> Scrape {
    let mut help = HashMap::new();
    let mut types = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').expect("HELP name and text");
            assert!(!text.trim().is_empty(), "empty HELP for {name}");
            help.insert(name.to_owned(), text.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name and kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            types.insert(name.to_owned(), kind.to_owned());
        } else {
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (key, value) = match line.find('}') {
                Some(end) => (&line[..=end], line[end + 1..].trim()),
                None => line.split_once(' ').expect("name and value"),
            };
            let name = key.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line}"
            );
            if let Some(labels) = key.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                    for pair in labels[1..labels.len() - 1].split(',') {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        assert!(
                            !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                            "{line}"
                        );
                    }
                }
            }
            let value: f64 = value
                .parse()
                .unwrap_or_else(|e| panic!("value of {line} is not a number: {e}"));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
                .unwrap_or(name);
            assert!(help.contains_key(family), "no HELP for {family}");
            assert!(types.contains_key(family), "no TYPE for {family}");
            assert!(family.starts_with("confab_"), "{family}");
            samples.insert(key.to_owned(), value);
        }
    }
    Scrape { samples }
}

async fn scrape(server: &Server) -> Scrape {
    let reply = server.http("GET", "/metrics", &[]).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.head.to_ascii_lowercase().contains("text/plain"),
        "{}",
        reply.head
    );
    parse_metrics(&reply.body)
}

#[tokio::test]
async fn metrics_parse_and_move_by_what_a_scripted_exchange_causes() {
    // A burst of 3 and one message a second: the fourth message in a row is refused.
    let server = Server::start(&[
        ("CONFAB_API__KEY", KEY),
        ("CONFAB_LIMITS__BURST", "3"),
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "1"),
    ]);
    let before = scrape(&server).await;
    for name in [
        "confab_sessions_open",
        "confab_rooms_open",
        "confab_messages_received_total",
        "confab_messages_published_total",
        "confab_messages_delivered_total",
        "confab_typing_dropped_total",
        "confab_slow_consumer_evictions_total",
        "confab_rate_limited_total",
        "confab_bus_reconnects_total",
        "confab_catch_ups_total",
        "confab_replayed_messages_total",
        "confab_unrecoverable_gaps_total",
        "confab_epoch_resets_total",
        "confab_ready",
        "confab_bus_publish_seconds_count",
    ] {
        assert!(before.samples.contains_key(name), "{name} missing");
    }
    assert_eq!(before.get("confab_ready"), 1.0);

    let (mut alice, _) = server.join("/ws/m?user=alice").await;
    let (mut bob, _) = server.join("/ws/m?user=bob").await;
    for i in 1..=3 {
        alice.say(&format!("m{i}"), &format!("c{i}")).await;
    }
    assert_eq!(
        post(&server, "m", json!({"text":"from the api"}))
            .await
            .status,
        201
    );
    let unauthorized = api(&server, "POST", "/api/rooms/m/messages", Some("nope"), "{}").await;
    assert_eq!(unauthorized.status, 401);
    // Bob has all four messages: the room counted each fan-out (to both) as it made it.
    message_at(&mut bob, 4).await;
    // From bob: a refused frame takes a token too (docs/PROTOCOL.md §11), and alice's burst is
    // counted below.
    bob.send_text(r#"{"type":"shout"}"#).await;
    assert_eq!(bob.next_of("error").await["code"], "bad_request");
    assert_eq!(server.refused_status("/ws/-bad-room").await, 400);
    // Refills are one a second: send until one is refused (at most a few are acked).
    let mut acked: u32 = 0;
    let mut refused = 0;
    for i in 0..5 {
        alice
            .send_json(json!({"type":"message","text":"more","ref": format!("x{i}")}))
            .await;
        let answer = alice.next_of_any(&["ack", "error"]).await;
        if answer["type"] == "error" {
            assert_eq!(answer["code"], "rate_limited", "{answer}");
            refused += 1;
            break;
        }
        acked += 1;
    }
    assert_eq!(refused, 1, "the burst was used up");
    if acked > 0 {
        message_at(&mut bob, 4 + u64::from(acked)).await;
    }
    let mut eve = server.connect("/ws/m?user=eve").await;
    let _welcome = eve.next().await;
    eve.send_binary(b"\x01").await;
    let (ending, _) = eve.ending(Duration::from_secs(10)).await;
    assert!(matches!(ending, Ending::Closed(1003)), "{ending:?}");

    let after = scrape(&server).await;
    let delta = |k: &str| after.get(k) - before.get(k);
    let published = 4.0 + f64::from(acked);
    assert_eq!(delta("confab_messages_published_total"), published);
    assert_eq!(delta("confab_messages_received_total"), published);
    assert_eq!(delta("confab_bus_publish_seconds_count"), published);
    // Every message to both members (eve joined after them and was sent none).
    assert_eq!(delta("confab_messages_delivered_total"), 2.0 * published);
    assert_eq!(delta("confab_rate_limited_total"), 1.0);
    assert_eq!(
        delta(r#"confab_api_requests_total{endpoint="publish",status="201"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"confab_api_requests_total{endpoint="publish",status="401"}"#),
        1.0
    );
    assert_eq!(delta(r#"confab_bad_frames_total{code="1003"}"#), 1.0);
    assert_eq!(
        delta(r#"confab_rejected_frames_total{code="bad_request"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"confab_upgrade_refusals_total{reason="bad_request"}"#),
        1.0
    );
    // Eve's session is gone; alice's and bob's are open, in one room.
    eventually(
        Duration::from_secs(10),
        "two sessions left open",
        || async { scrape(&server).await.get("confab_sessions_open") == 2.0 },
    )
    .await;
    assert_eq!(after.get("confab_rooms_open"), 1.0);
}

/// The value of header `name` in a reply's head.
fn header<'r>(reply: &'r HttpReply, name: &str) -> Option<&'r str> {
    reply.head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn wrong_api_keys_from_one_address_get_429_even_with_the_right_key_until_the_window_passes() {
    let server = Server::start(&[
        ("CONFAB_API__KEY", KEY),
        ("CONFAB_API__MAX_KEY_FAILURES", "3"),
        ("CONFAB_API__KEY_FAILURE_WINDOW_SECS", "3"),
        // The harness connects from 127.0.0.1: as a trusted proxy it names each client.
        ("CONFAB_SERVER__TRUSTED_PROXIES", "127.0.0.1"),
    ]);
    let path = "/api/rooms/ops/history";
    let call = |from: &'static str, key: &'static str| {
        let auth = format!("Bearer {key}");
        let addr = server.addr;
        async move {
            let headers = [("Authorization", auth.as_str()), ("X-Forwarded-For", from)];
            request(addr, "GET", path, &headers, "").await
        }
    };
    let guesser = "198.51.100.7";
    for i in 0..3 {
        let reply = call(guesser, "guess").await;
        assert_error(&reply, 401, "unauthorized");
        assert!(header(&reply, "retry-after").is_none(), "guess {i}");
    }
    let throttled = call(guesser, "guess").await;
    assert_error(&throttled, 429, "rate_limited");
    let retry: u64 = header(&throttled, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After in seconds: {}", throttled.head));
    assert!((1..=3).contains(&retry), "within the window: {retry}");
    // Even the right key: a guesser that finally hits it learns nothing until the window ends.
    assert_error(&call(guesser, KEY).await, 429, "rate_limited");
    // Another client address is not held back by the guesser.
    assert_eq!(call("198.51.100.8", KEY).await.status, 200);
    eventually(Duration::from_secs(10), "the window passes", || async {
        call(guesser, KEY).await.status == 200
    })
    .await;
    // And the count starts again.
    assert_error(&call(guesser, "guess").await, 401, "unauthorized");
}

#[tokio::test]
async fn every_api_endpoint_is_counted_under_its_own_label_with_the_status_it_answered() {
    let server = Server::start(&[("CONFAB_API__KEY", KEY)]);
    let before = scrape(&server).await;
    let history = api(&server, "GET", "/api/rooms/r/history", Some(KEY), "").await;
    assert_eq!(history.status, 200, "{}", history.body);
    let bad = api(
        &server,
        "GET",
        "/api/rooms/r/history?limit=x",
        Some(KEY),
        "",
    )
    .await;
    assert_error(&bad, 400, "bad_request");
    let presence = api(&server, "GET", "/api/rooms/r/presence", Some(KEY), "").await;
    assert_eq!(presence.status, 200, "{}", presence.body);
    let wrong = api(&server, "GET", "/api/rooms/r/presence", Some("wrong"), "").await;
    assert_error(&wrong, 401, "unauthorized");
    let too_large = api(
        &server,
        "POST",
        "/api/rooms/r/messages",
        Some(KEY),
        &"x".repeat(70_000),
    )
    .await;
    assert_error(&too_large, 413, "too_large");

    let after = scrape(&server).await;
    let delta = |endpoint: &str, status: u16| {
        let key =
            format!(r#"confab_api_requests_total{{endpoint="{endpoint}",status="{status}"}}"#);
        after.get(&key) - before.get(&key)
    };
    assert_eq!(delta("history", 200), 1.0);
    assert_eq!(delta("history", 400), 1.0);
    assert_eq!(delta("presence", 200), 1.0);
    assert_eq!(delta("presence", 401), 1.0);
    assert_eq!(delta("publish", 413), 1.0);
    assert_eq!(delta("publish", 200) + delta("publish", 201), 0.0);
}
