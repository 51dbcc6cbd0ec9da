//! Auth (docs/PROTOCOL.md §3): JWTs in each of their three places, every way a token can be wrong,
//! room and publish globs, expiry while connected, and `confab token`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::{run_confab, Ending, Server};

const SECRET: &str = "test-secret-0123456789abcdef0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn hs(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600, "aud": "chat", "iss": "corp"})
}

fn hs_server() -> Server {
    Server::start(&[
        ("CONFAB_AUTH__JWT_SECRET", SECRET),
        ("CONFAB_AUTH__AUDIENCE", "chat"),
        ("CONFAB_AUTH__ISSUER", "corp"),
    ])
}

/// Base64url without padding, for hand-made tokens.
fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A key pair made by `openssl` in a fresh directory: (private PEM, public PEM path, the
/// directory, removed when dropped).
fn key_pair(kind: &str) -> (Vec<u8>, PathBuf, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("confab-keys-{kind}-"))
        .tempdir()
        .unwrap();
    let private = dir.path().join("private.pem");
    let public = dir.path().join("public.pem");
    let args: Vec<&str> = match kind {
        "rsa" => vec![
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        _ => vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
    };
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (scripts/test.sh installs it)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let mut gen = args.clone();
    gen.extend(["-out", private.to_str().unwrap()]);
    run(&gen);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (std::fs::read(&private).unwrap(), public, dir)
}

async fn status_of(server: &Server, token: &str) -> (u16, String) {
    match server
        .open(&format!("/ws/r?token={token}"), None, &[])
        .await
    {
        Ok(_) => (101, String::new()),
        Err(refused) => refused,
    }
}

#[tokio::test]
async fn every_kind_of_bad_token_is_refused_with_401_before_the_upgrade() {
    let server = hs_server();
    let (code, body) = match server.open("/ws/r", None, &[]).await {
        Ok(_) => panic!("a missing token must be refused"),
        Err(refused) => refused,
    };
    assert_eq!(code, 401, "missing token");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");

    let other = EncodingKey::from_secret(b"some-other-secret-entirely-0123456789");
    let far = now() + 600;
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(format!(r#"{{"sub":"alice","exp":{far},"aud":"chat","iss":"corp"}}"#).as_bytes())
    );
    let cases = [
        (
            "expired",
            hs(json!({"sub": "alice", "exp": now() - 60, "aud": "chat", "iss": "corp"})),
        ),
        (
            "bad signature",
            sign(Algorithm::HS256, &other, claims("alice")),
        ),
        ("alg none", none),
        (
            "wrong aud",
            hs(json!({"sub": "alice", "exp": far, "aud": "other", "iss": "corp"})),
        ),
        (
            "wrong iss",
            hs(json!({"sub": "alice", "exp": far, "aud": "chat", "iss": "evil"})),
        ),
        (
            "no exp",
            hs(json!({"sub": "alice", "aud": "chat", "iss": "corp"})),
        ),
        ("bad sub", hs(claims("not a name!"))),
        (
            "empty name",
            hs(json!({"sub": "alice", "exp": far, "aud": "chat", "iss": "corp", "name": ""})),
        ),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (what, token) in &cases {
        let (code, body) = status_of(&server, token).await;
        assert_eq!(code, 401, "{what}: {body}");
        assert!(body.contains("unauthorized"), "{what}: {body}");
    }
    // The same server accepts a good token, so the refusals above are about the tokens.
    assert_eq!(status_of(&server, &hs(claims("alice"))).await.0, 101);
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_and_hs_rs_confusion_is_refused() {
    let (rsa_private, rsa_public, _rsa_dir) = key_pair("rsa");
    let server = Server::start(&[(
        "CONFAB_AUTH__JWT_PUBLIC_KEY_FILE",
        rsa_public.to_str().unwrap(),
    )]);
    let claims = json!({"sub": "alice", "exp": now() + 600});
    let rs = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
        claims.clone(),
    );
    let (mut client, _) = server
        .open(&format!("/ws/r?token={rs}"), None, &[])
        .await
        .expect("RS256 token accepted");
    assert_eq!(client.next().await["user"], "alice");
    // The classic confusion: an HS256 token whose "secret" is the public key everyone has.
    let public_pem = std::fs::read(&rsa_public).unwrap();
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_pem),
        claims.clone(),
    );
    assert_eq!(
        status_of(&server, &confused).await.0,
        401,
        "HS/RS confusion"
    );

    let (ec_private, ec_public, _ec_dir) = key_pair("ec");
    let both = Server::start(&[
        (
            "CONFAB_AUTH__JWT_PUBLIC_KEY_FILE",
            ec_public.to_str().unwrap(),
        ),
        ("CONFAB_AUTH__JWT_SECRET", SECRET),
    ]);
    let es = sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&ec_private).unwrap(),
        claims.clone(),
    );
    assert_eq!(status_of(&both, &es).await.0, 101, "ES256 token accepted");
    assert_eq!(
        status_of(&both, &hs(claims.clone())).await.0,
        101,
        "HS256 too"
    );
    let ec_pem = std::fs::read(&ec_public).unwrap();
    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&ec_pem), claims);
    assert_eq!(
        status_of(&both, &confused).await.0,
        401,
        "HS with the EC key"
    );
    assert_eq!(
        status_of(&both, &rs).await.0,
        401,
        "RS256 is not configured here"
    );
}

#[tokio::test]
async fn the_token_works_in_each_of_its_three_places_and_names_the_user() {
    let server = hs_server();
    let token = hs(claims("alice"));
    // A spoofed (and even invalid) `user` is ignored with auth on.
    let (mut by_query, _) = server
        .open(&format!("/ws/r?token={token}&user=mallory"), None, &[])
        .await
        .expect("query token");
    assert_eq!(by_query.next().await["user"], "alice");
    let (mut by_header, _) = server
        .open(
            "/ws/r?user=not%20valid!",
            None,
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await
        .expect("bearer token");
    assert_eq!(by_header.next().await["user"], "alice");
    // The scheme is case-insensitive (RFC 7235 §2.1), as the HTTP API already took it.
    let (mut lower, _) = server
        .open(
            "/ws/r",
            None,
            &[("Authorization", &format!("bearer {token}"))],
        )
        .await
        .expect("bearer in lower case");
    assert_eq!(lower.next().await["user"], "alice");
    let protocols = format!("confab.v1, token.{token}");
    let (mut by_protocol, resp) = server
        .open(
            "/ws/r",
            None,
            &[("Sec-WebSocket-Protocol", protocols.as_str())],
        )
        .await
        .expect("subprotocol token");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("confab.v1"),
        "the server selects confab.v1, never echoes the token"
    );
    assert_eq!(by_protocol.next().await["user"], "alice");
}

#[tokio::test]
async fn room_globs_allow_or_refuse_with_403_and_publish_globs_answer_forbidden() {
    let server = hs_server();
    let mut c = claims("alice");
    c["rooms"] = json!(["team-*", "lobby"]);
    c["publish"] = json!(["team-*"]);
    c["name"] = json!("Alice A.");
    let token = hs(c);
    assert_eq!(
        status_of_room(&server, "secret", &token).await,
        403,
        "a room outside the token's globs"
    );
    let (mut lobby, _) = server
        .open(&format!("/ws/lobby?token={token}"), None, &[])
        .await
        .expect("lobby is allowed");
    let welcome = lobby.next().await;
    assert_eq!(welcome["type"], "welcome");
    lobby
        .send_json(json!({"type": "message", "text": "hi", "ref": "l1"}))
        .await;
    let refused = lobby.next_of_any(&["error", "ack", "message"]).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "forbidden");
    assert_eq!(refused["ref"], "l1");
    // Nothing was stored: the room's history is empty.
    lobby
        .send_json(json!({"type": "history", "ref": "h1"}))
        .await;
    let history = lobby.next_of("history").await;
    assert_eq!(history["messages"], json!([]), "{history}");

    let (mut team, _) = server
        .open(&format!("/ws/team-a?token={token}"), None, &[])
        .await
        .expect("team-a is allowed");
    team.next_of("welcome").await;
    team.send_json(json!({"type": "message", "text": "hello team", "ref": "t1"}))
        .await;
    // The ack and the message may come in either order.
    let (mut message, mut ack) = (None, None);
    while message.is_none() || ack.is_none() {
        let frame = team.next_of_any(&["message", "ack"]).await;
        match frame["type"].as_str() {
            Some("message") => message = Some(frame),
            _ => ack = Some(frame),
        }
    }
    let message = message.unwrap();
    assert_eq!(message["user"], "alice");
    assert_eq!(message["name"], "Alice A.", "the token's name is shown");
    assert_eq!(ack.unwrap()["ref"], "t1");
}

async fn status_of_room(server: &Server, room: &str, token: &str) -> u16 {
    match server
        .open(&format!("/ws/{room}?token={token}"), None, &[])
        .await
    {
        Ok(_) => 101,
        Err((code, _)) => code,
    }
}

#[tokio::test]
async fn a_session_is_closed_with_4001_when_its_token_expires() {
    let server = hs_server();
    let token = hs(json!({"sub": "alice", "exp": now() + 1, "aud": "chat", "iss": "corp"}));
    let (mut client, _) = server
        .open(&format!("/ws/r?token={token}"), None, &[])
        .await
        .expect("a token valid for a second more");
    assert_eq!(client.next().await["type"], "welcome");
    // exp + the 5 s leeway, plus slack for a loaded machine.
    let (ending, _) = client.ending(Duration::from_secs(20)).await;
    assert_eq!(ending, Ending::Closed(4001));
}

#[tokio::test]
async fn confab_token_prints_a_token_the_server_accepts() {
    let env = [
        ("CONFAB_AUTH__JWT_SECRET", SECRET),
        ("CONFAB_AUTH__AUDIENCE", "chat"),
        ("CONFAB_AUTH__ISSUER", "corp"),
    ];
    let out = run_confab(
        &[
            "token",
            "--sub",
            "bob",
            "--name",
            "Bob",
            "--rooms",
            "team-*,lobby",
            "--publish",
            "team-*",
            "--ttl-secs",
            "120",
        ],
        &env,
    );
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let server = hs_server();
    assert_eq!(status_of_room(&server, "elsewhere", &token).await, 403);
    let (mut team, _) = server
        .open(&format!("/ws/team-x?token={token}"), None, &[])
        .await
        .expect("confab token's token is accepted");
    assert_eq!(team.next().await["user"], "bob");
    team.send_text("hello").await;
    assert_eq!(team.next_of("message").await["name"], "Bob");

    let out = run_confab(&["token", "--sub", "bob"], &[]);
    assert!(!out.status.success(), "no secret: non-zero exit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.jwt_secret"), "names the setting: {err}");
}

#[tokio::test]
async fn the_page_learns_whether_a_token_is_needed_and_anonymous_mode_warns() {
    let anonymous = Server::start(&[]);
    let reply = anonymous.http("GET", "/client.json", &[]).await;
    assert_eq!(reply.json()["auth"], false);
    assert!(
        anonymous.log().contains("ANONYMOUS mode"),
        "a start-up warning: {}",
        anonymous.log()
    );
    let secured = hs_server();
    assert_eq!(
        secured.http("GET", "/client.json", &[]).await.json()["auth"],
        true
    );
}

#[test]
fn an_unreadable_public_key_file_stops_start_up_naming_the_key() {
    let out = run_confab(
        &["--listen", "127.0.0.1:0"],
        &[("CONFAB_AUTH__JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.jwt_public_key_file"), "{err}");
}

#[tokio::test]
async fn tokens_without_aud_or_iss_are_refused_when_the_server_names_them() {
    let server = hs_server();
    let far = now() + 600;
    // Minted for another service with the same key: nothing says it is not for us, so
    // nothing may let it in.
    let no_aud = hs(json!({"sub": "alice", "exp": far, "iss": "corp"}));
    let no_iss = hs(json!({"sub": "alice", "exp": far, "aud": "chat"}));
    for (what, token) in [("no aud", no_aud), ("no iss", no_iss)] {
        let (code, body) = status_of(&server, &token).await;
        assert_eq!(code, 401, "{what}: {body}");
        assert!(body.contains("unauthorized"), "{what}: {body}");
    }
    // Without auth.audience / auth.issuer set, neither claim is needed.
    let plain = Server::start(&[("CONFAB_AUTH__JWT_SECRET", SECRET)]);
    let bare = hs(json!({"sub": "alice", "exp": far}));
    assert_eq!(status_of(&plain, &bare).await.0, 101);
}

#[tokio::test]
async fn a_token_that_is_not_yet_valid_is_refused_and_one_inside_the_leeway_is_not() {
    let server = hs_server();
    let mut early = claims("alice");
    early["nbf"] = json!(now() + 120);
    let (code, body) = status_of(&server, &hs(early)).await;
    assert_eq!(code, 401, "nbf two minutes ahead: {body}");
    assert!(
        body.contains("not valid yet"),
        "the message says why: {body}"
    );
    let mut skewed = claims("alice");
    skewed["nbf"] = json!(now() + 2);
    assert_eq!(status_of(&server, &hs(skewed)).await.0, 101, "within 5 s");
    let mut past = claims("alice");
    past["nbf"] = json!(now() - 60);
    assert_eq!(status_of(&server, &hs(past)).await.0, 101);
}

#[tokio::test]
async fn an_explicit_null_rooms_or_publish_claim_is_refused_not_read_as_every_room() {
    let server = hs_server();
    for claim in ["rooms", "publish"] {
        let mut c = claims("alice");
        c[claim] = Value::Null;
        let (code, body) = status_of(&server, &hs(c)).await;
        assert_eq!(code, 401, "{claim}: null: {body}");
        assert!(body.contains(claim), "the message names the claim: {body}");
    }
}

#[tokio::test]
async fn a_short_hs256_secret_logs_a_warning_at_start_and_a_long_one_does_not() {
    let short = Server::start(&[("CONFAB_AUTH__JWT_SECRET", "only-16-bytes-xx")]);
    crate::harness::eventually(Duration::from_secs(10), "the warning", || async {
        short.log().contains("auth.jwt_secret is 16 bytes")
    })
    .await;
    let long = hs_server();
    // Start-up logs the listening line after the auth check, so the log is complete here.
    assert!(
        long.log().contains("sessions need a token") && !long.log().contains("auth.jwt_secret is"),
        "{}",
        long.log()
    );
}

#[test]
fn confab_config_masks_the_password_in_every_url_and_every_secret() {
    let urls = [
        (
            "redis://confab:hunter2-redis@redis.internal:6379/0",
            "redis://confab:***@redis.internal:6379/0",
        ),
        (
            "rediss://:hunter2-redis@redis.internal:6380",
            "rediss://:***@redis.internal:6380",
        ),
        (
            "redis-sentinel://confab:hunter2-redis@s1:26379/0?sentinelServiceName=m&sentinelUsername=sen&sentinelPassword=hunter2-sentinel&node=s2:26379",
            "redis-sentinel://confab:***@s1:26379/0?sentinelServiceName=m&sentinelUsername=sen&sentinelPassword=***&node=s2:26379",
        ),
        (
            "redis-cluster://confab:hunter2-redis@c1:7000?node=c2:7001",
            "redis-cluster://confab:***@c1:7000?node=c2:7001",
        ),
    ];
    for (url, masked) in urls {
        let out = run_confab(
            &["config"],
            &[
                ("CONFAB_REDIS__URL", url),
                ("CONFAB_API__KEY", "hunter2-api"),
                (
                    "CONFAB_AUTH__JWT_SECRET",
                    "hunter2-jwt-0123456789abcdef0123",
                ),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(!shown.contains("hunter2"), "a secret is printed: {shown}");
        assert!(shown.contains(masked), "{masked} in {shown}");
    }
}
