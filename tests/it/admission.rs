//! Limits per client address and the handshake (docs/PROTOCOL.md §3.4): open sessions per address,
//! upgrades per address per second, `X-Forwarded-For` only from trusted proxies, unfinished
//! handshakes cut without taking a session slot, a reserve of descriptors at the cap, and
//! rooms without messages leaving no state behind.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{eventually, Redis, Server, DEADLINE};

async fn status(server: &Server, from: &str, headers: &[(&str, &str)]) -> u16 {
    match server.open("/ws/r", Some(from), headers).await {
        Ok((mut c, _)) => {
            assert_eq!(c.next().await["type"], "welcome");
            // Kept open by the caller through `held` when it matters; here it is closed.
            c.close().await;
            101
        }
        Err((code, _)) => code,
    }
}

#[tokio::test]
async fn the_per_address_cap_answers_429_while_another_address_still_connects() {
    let server = Server::start(&[("CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP", "2")]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let (c, _) = server.open("/ws/r", Some("127.0.0.1"), &[]).await.unwrap();
        held.push(c);
    }
    let (code, body) = server
        .open("/ws/r", Some("127.0.0.1"), &[])
        .await
        .err()
        .expect("a third session from one address is refused");
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("max_connections_per_ip"), "{body}");
    let (other, _) = server
        .open("/ws/r", Some("127.0.0.2"), &[])
        .await
        .expect("another address still connects");
    // A session that ends frees its address's slot.
    held.pop().unwrap().close().await;
    eventually(DEADLINE, "the freed slot is reused", || async {
        status(&server, "127.0.0.1", &[]).await == 101
    })
    .await;
    drop(other);
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP", "1"),
        ("CONFAB_SERVER__TRUSTED_PROXIES", "127.0.0.2/32"),
    ]);
    // 127.0.0.1 is not a proxy: what it forwards is ignored, it is one client.
    let (_a, _) = server
        .open(
            "/ws/r",
            Some("127.0.0.1"),
            &[("X-Forwarded-For", "10.0.0.1")],
        )
        .await
        .unwrap();
    assert_eq!(
        status(&server, "127.0.0.1", &[("X-Forwarded-For", "10.0.0.2")]).await,
        429,
        "a spoofed header does not make a new client"
    );
    // 127.0.0.2 is the trusted proxy: each forwarded client counts on its own.
    let (_b, _) = server
        .open(
            "/ws/r",
            Some("127.0.0.2"),
            &[("X-Forwarded-For", "10.0.0.5")],
        )
        .await
        .expect("first client behind the proxy");
    let (_c, _) = server
        .open(
            "/ws/r",
            Some("127.0.0.2"),
            &[("X-Forwarded-For", "6.6.6.6, 10.0.0.6")],
        )
        .await
        .expect("second client behind the proxy (rightmost entry counts)");
    assert_eq!(
        status(&server, "127.0.0.2", &[("X-Forwarded-For", "10.0.0.5")]).await,
        429,
        "the first forwarded client is at its cap"
    );
}

#[tokio::test]
async fn upgrades_per_address_per_second_are_limited() {
    let server = Server::start(&[("CONFAB_LIMITS__UPGRADES_PER_IP_PER_SEC", "3")]);
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(status(&server, "127.0.0.1", &[]).await);
    }
    assert_eq!(&codes[..3], &[101, 101, 101], "{codes:?}");
    assert!(
        codes.contains(&429),
        "a burst past the rate is refused: {codes:?}"
    );
    assert_eq!(status(&server, "127.0.0.2", &[]).await, 101, "per address");
}

#[tokio::test]
async fn unfinished_handshakes_are_cut_and_hold_no_session_slot() {
    let server = Server::start(&[
        ("CONFAB_SERVER__HANDSHAKE_TIMEOUT_SECS", "1"),
        ("CONFAB_LIMITS__MAX_CONNECTIONS", "2"),
    ]);
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        // A request head that never ends.
        s.write_all(b"GET /ws/r HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    let (_a, _) = server
        .open("/ws/r", None, &[])
        .await
        .expect("first session");
    let (_b, _) = server
        .open("/ws/r", None, &[])
        .await
        .expect("second session");
    for mut s in stalled {
        let mut buf = [0u8; 1024];
        // The server answers 408 and closes, or just closes: either way the read ends.
        let read = async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("an unfinished handshake is cut");
    }
}

#[tokio::test]
async fn at_the_connection_cap_health_checks_still_answer() {
    // A small open-file limit, so the cap derived from it is reached quickly.
    let server =
        Server::start_with_files(&[("CONFAB_SERVER__HANDSHAKE_TIMEOUT_SECS", "2")], Some(256));
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..400 {
        match server.open("/ws/r", None, &[]).await {
            Ok((c, _)) => held.push(c),
            Err((code, _)) => {
                refused = Some(code);
                break;
            }
        }
    }
    assert_eq!(
        refused,
        Some(503),
        "the cap answers 503 after {} sessions",
        held.len()
    );
    assert!(
        held.len() >= 100,
        "only {} sessions under 256 files",
        held.len()
    );
    // Idle sockets on top of the cap: they may wait, but the probe is answered.
    let mut idle = Vec::new();
    for _ in 0..40 {
        if let Ok(s) = TcpStream::connect(server.addr).await {
            idle.push(s);
        }
    }
    let probe = tokio::time::timeout(Duration::from_secs(15), server.http("GET", "/healthz", &[]))
        .await
        .expect("/healthz answers at the cap");
    assert_eq!(probe.status, 200);
    let log = server.log();
    assert!(
        !log.contains("Too many open files"),
        "no EMFILE at the cap:\n{log}"
    );
    drop(idle);
    held.pop();
    eventually(DEADLINE, "a freed slot is usable", || async {
        server.open("/ws/r", None, &[]).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn rooms_without_messages_leave_no_redis_keys_behind() {
    let redis = Redis::start();
    let server = Server::replica(
        &redis,
        "empty",
        "node-a",
        &[("CONFAB_HISTORY__EMPTY_ROOM_TTL_SECS", "1")],
    )
    .await;
    for i in 0..20 {
        let (c, _) = server.join(&format!("/ws/scan-{i}")).await;
        c.close().await;
    }
    let (mut kept, _) = server.join("/ws/talked").await;
    kept.send_text("hello").await;
    kept.next_of("message").await;
    kept.close().await;
    // A quiet room whose member stays keeps its epoch past the empty-room TTL.
    let (_quiet, welcome) = server.join("/ws/quiet").await;
    eventually(
        Duration::from_secs(15),
        "scanned rooms are gone from Redis",
        || async {
            let keys = redis.cmd(&["KEYS", "empty:{scan-*"]).await;
            keys.starts_with("*0")
        },
    )
    .await;
    // The scanned rooms outlived their 1 s; the occupied quiet room lives as long as history.
    let ttl = redis.cmd(&["TTL", "empty:{quiet}:meta"]).await;
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!(
        ttl > 60,
        "an occupied empty room keeps the history TTL: {ttl}"
    );
    let (_second, again) = server.join("/ws/quiet").await;
    assert_eq!(
        welcome["epoch"], again["epoch"],
        "an occupied room keeps its epoch"
    );
    let talked = redis.cmd(&["KEYS", "empty:{talked}:*"]).await;
    assert!(
        talked.contains("meta") && talked.contains("history"),
        "a room with a message keeps its history: {talked}"
    );
}

#[tokio::test]
async fn rooms_without_messages_are_forgotten_by_the_embedded_bus() {
    let server = Server::start(&[("CONFAB_HISTORY__EMPTY_ROOM_TTL_SECS", "1")]);
    let (c, first) = server.join("/ws/scan").await;
    c.close().await;
    let (mut talked, talked_first) = server.join("/ws/talked").await;
    talked.send_text("hello").await;
    talked.next_of("message").await;
    talked.close().await;
    // Waits out the 1 s life (swept every 250 ms); joining sooner would renew it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Forgotten means a new room next time: a new epoch.
    let (_c, again) = server.join("/ws/scan").await;
    assert_ne!(
        again["epoch"], first["epoch"],
        "the empty room was forgotten"
    );
    let (_c, again) = server.join("/ws/talked").await;
    assert_eq!(
        again["epoch"], talked_first["epoch"],
        "a room with history stays"
    );
    assert_eq!(again["offset"], 1);
}
