//! Upgrades with nothing lost: three replicas behind a real load balancer (HAProxy) are
//! restarted one by one with SIGTERM while clients chat through it and reconnect by
//! themselves with `since`/`epoch`. Also what a clean drain owes the others: its presence
//! lease given up at once, and late sessions closed like the rest.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::fleet::Haproxy;
use crate::harness::{eventually, free_port, Ending, Redis, Server, DEADLINE};

const KEY: &str = "k-rolling";
const ROOM: &str = "roll";
const CHATTERS: usize = 3;

fn env(redis: &Redis, prefix: &str, node: &str) -> Vec<(String, String)> {
    [
        ("CONFAB_REDIS__URL", redis.url()),
        ("CONFAB_REDIS__PREFIX", prefix.to_owned()),
        ("CONFAB_SERVER__NODE_ID", node.to_owned()),
        ("CONFAB_SERVER__SHUTDOWN_GRACE_SECS", "2".to_owned()),
        ("CONFAB_API__KEY", KEY.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn start(listen: &str, env: &[(String, String)]) -> Server {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_on(listen, &pairs)
}

/// What the chatters share.
#[derive(Default)]
struct Shared {
    /// Set once every replica has been restarted: chatters then finish their messages.
    restarts_done: AtomicBool,
    /// Chatters that have every message of theirs acked.
    finished_sending: AtomicUsize,
    /// The highest offset acked to anyone.
    max_acked: AtomicU64,
}

/// What one chatter saw.
#[derive(Debug, Default)]
struct Seen {
    name: String,
    epoch: String,
    /// Message frames (offset, text), in arrival order over all its connections.
    received: Vec<(u64, String)>,
    /// Its own messages: text → acked offset.
    acked: BTreeMap<String, u64>,
    connections: usize,
}

/// One frame, or why the connection is over.
enum Read {
    Frame(Value),
    Quiet,
    Over,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn read(ws: &mut Ws, wait: Duration) -> Read {
    match tokio::time::timeout(wait, ws.next()).await {
        Err(_) => Read::Quiet,
        Ok(Some(Ok(Message::Text(t)))) => Read::Frame(serde_json::from_str(&t).unwrap()),
        Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => Read::Over,
        Ok(Some(Ok(_))) => Read::Quiet,
    }
}

/// Connects through the proxy, retrying while no replica takes the session.
async fn connect(proxy: u16, path: &str) -> Ws {
    let url = format!("ws://127.0.0.1:{proxy}{path}");
    for _ in 0..200 {
        if let Ok(Ok((ws, _))) =
            tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(&url)).await
        {
            return ws;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no replica took {url}");
}

/// A client that chats through the proxy: one message at a time (retried with its ref until
/// acked), reconnecting with `since`/`epoch` whenever its session ends, until the restarts
/// are over and it has read everything anyone was acked.
async fn chatter(proxy: u16, name: String, shared: Arc<Shared>) -> Seen {
    let mut seen = Seen {
        name: name.clone(),
        ..Seen::default()
    };
    let mut sent = 0usize;
    let mut pending: Option<(String, String)> = None; // (ref, text) not acked yet
    let mut done_sending = false;
    let end = Instant::now() + Duration::from_secs(90);
    'session: while Instant::now() < end {
        let path = match seen.received.last() {
            Some((offset, _)) => {
                format!("/ws/{ROOM}?user={name}&since={offset}&epoch={}", seen.epoch)
            }
            None => format!("/ws/{ROOM}?user={name}"),
        };
        let mut ws = connect(proxy, &path).await;
        let welcome = match read(&mut ws, DEADLINE).await {
            Read::Frame(v) if v["type"] == "welcome" => v,
            // Closed before its welcome (a replica that began draining): go elsewhere.
            Read::Over => continue 'session,
            _ => panic!("{name}: no welcome on {path}"),
        };
        seen.connections += 1;
        let epoch = welcome["epoch"].as_str().unwrap().to_owned();
        if seen.epoch.is_empty() {
            seen.epoch = epoch;
        } else {
            assert_eq!(epoch, seen.epoch, "{name}: the room kept its epoch");
            assert_eq!(welcome["recovered"], true, "{name}: resumed: {welcome}");
        }
        // A message not acked on the previous connection is sent again with its ref.
        let mut resend = pending.is_some();
        let mut next_send = Instant::now();
        loop {
            if !done_sending && Instant::now() >= next_send {
                if pending.is_none() {
                    if shared.restarts_done.load(Ordering::Acquire) && sent >= 10 {
                        done_sending = true;
                        shared.finished_sending.fetch_add(1, Ordering::AcqRel);
                    } else {
                        pending = Some((format!("{sent}"), format!("{name}-{sent}")));
                        sent += 1;
                        resend = true;
                    }
                }
                if resend {
                    if let Some((reference, text)) = &pending {
                        let frame = json!({"type":"message","text":text,"ref":reference});
                        if ws.send(Message::text(frame.to_string())).await.is_err() {
                            continue 'session;
                        }
                    }
                    resend = false;
                }
            }
            if done_sending
                && shared.finished_sending.load(Ordering::Acquire) == CHATTERS
                && seen.received.last().map_or(0, |(o, _)| *o)
                    >= shared.max_acked.load(Ordering::Acquire)
            {
                break 'session;
            }
            let v = match read(&mut ws, Duration::from_millis(50)).await {
                Read::Frame(v) => v,
                Read::Quiet => continue,
                Read::Over => continue 'session,
            };
            match v["type"].as_str() {
                Some("message") => seen.received.push((
                    v["offset"].as_u64().unwrap(),
                    v["text"].as_str().unwrap().to_owned(),
                )),
                Some("ack") => {
                    let (reference, text) = pending.take().expect("an ack for a pending message");
                    assert_eq!(v["ref"], reference.as_str(), "{name}: {v}");
                    let offset = v["offset"].as_u64().unwrap();
                    seen.acked.insert(text, offset);
                    shared.max_acked.fetch_max(offset, Ordering::AcqRel);
                    next_send = Instant::now() + Duration::from_millis(80);
                }
                Some("error") => {
                    assert_eq!(v["code"], "unavailable", "{name}: {v}");
                    resend = true;
                    next_send = Instant::now() + Duration::from_millis(100);
                }
                Some("reset") => panic!("{name}: the room was reset: {v}"),
                _ => {}
            }
        }
    }
    assert!(Instant::now() < end, "{name} did not finish in time");
    seen
}

/// Every stored message of the room, oldest first, read page by page through the API.
async fn history(addr: SocketAddr) -> Vec<(u64, String)> {
    let auth = format!("Bearer {KEY}");
    let mut all = Vec::new();
    let mut before: Option<u64> = None;
    for _ in 0..100 {
        let path = match before {
            Some(b) => format!("/api/rooms/{ROOM}/history?limit=100&before={b}"),
            None => format!("/api/rooms/{ROOM}/history?limit=100"),
        };
        let page = crate::harness::http(addr, "GET", &path, &[("Authorization", &auth)])
            .await
            .json();
        let messages = page["messages"].as_array().unwrap().clone();
        if messages.is_empty() {
            break;
        }
        before = messages[0]["offset"].as_u64();
        let mut chunk: Vec<(u64, String)> = messages
            .iter()
            .map(|m| {
                (
                    m["offset"].as_u64().unwrap(),
                    m["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        chunk.append(&mut all);
        all = chunk;
        if before == Some(1) {
            break;
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_haproxy_loses_no_acked_message_and_shows_none_twice() {
    let redis = Redis::start();
    let prefix = format!("t{}-rolling", std::process::id());
    let listen: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let envs: Vec<Vec<(String, String)>> = (0..3)
        .map(|i| env(&redis, &prefix, &format!("r{i}")))
        .collect();
    let mut replicas: Vec<Server> = (0..3).map(|i| start(&listen[i], &envs[i])).collect();
    for r in &replicas {
        r.wait_ready(true).await;
    }
    let ports: Vec<u16> = replicas.iter().map(|r| r.addr.port()).collect();
    let proxy = Haproxy::start(&ports);

    let shared = Arc::new(Shared::default());
    let chatters: Vec<_> = (0..CHATTERS)
        .map(|i| tokio::spawn(chatter(proxy.port, format!("c{i}"), Arc::clone(&shared))))
        .collect();
    // Let the chat get going, then restart the replicas one at a time.
    crate::harness::eventually(DEADLINE, "chat under way", || {
        let shared = Arc::clone(&shared);
        async move { shared.max_acked.load(Ordering::Acquire) >= 10 }
    })
    .await;
    let started = Instant::now();
    for i in 0..3 {
        // The chat goes on between restarts too.
        let before = shared.max_acked.load(Ordering::Acquire);
        crate::harness::eventually(DEADLINE, "chat goes on", || {
            let shared = Arc::clone(&shared);
            async move { shared.max_acked.load(Ordering::Acquire) >= before + 6 }
        })
        .await;
        replicas[i].signal(libc::SIGTERM);
        let status = replicas[i].wait_exit(Duration::from_secs(20));
        assert!(
            status.success(),
            "replica r{i} drained and exited 0: {status:?}"
        );
        replicas[i] = start(&listen[i], &envs[i]);
        replicas[i].wait_ready(true).await;
    }
    let restarts_took = started.elapsed();
    shared.restarts_done.store(true, Ordering::Release);

    let mut seen = Vec::new();
    for c in chatters {
        seen.push(
            tokio::time::timeout(Duration::from_secs(120), c)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    for s in &seen {
        for (text, offset) in &s.acked {
            assert!(
                acked.insert(*offset, text.clone()).is_none(),
                "offset {offset} acked twice"
            );
        }
    }
    let last = *acked.keys().last().unwrap();
    for s in &seen {
        let name = &s.name;
        assert!(
            s.connections >= 2,
            "{name} was moved by the restarts ({} connections)",
            s.connections
        );
        let offsets: Vec<u64> = s.received.iter().map(|(o, _)| *o).collect();
        let first = offsets[0];
        assert_eq!(
            offsets,
            (first..=*offsets.last().unwrap()).collect::<Vec<_>>(),
            "{name}: every message once, in order, no gap"
        );
        assert!(*offsets.last().unwrap() >= last, "{name} read to the end");
        for (offset, text) in &s.received {
            if let Some(expected) = acked.get(offset) {
                assert_eq!(text, expected, "{name}: offset {offset}");
            }
        }
        assert!(
            acked.keys().all(|o| *o < first || offsets.contains(o)),
            "{name}: every acked message after it joined"
        );
    }
    // The store holds every acked message at its offset, and no message twice.
    let stored = history(replicas[0].addr).await;
    let texts: HashSet<&String> = stored.iter().map(|(_, t)| t).collect();
    assert_eq!(texts.len(), stored.len(), "no message stored twice");
    let stored: BTreeMap<u64, String> = stored.into_iter().collect();
    for (offset, text) in &acked {
        assert_eq!(stored.get(offset), Some(text), "acked {text} is stored");
    }
    eprintln!(
        "rolling restart: 3 replicas in {restarts_took:?}, {} messages acked, connections per \
         client {:?}",
        acked.len(),
        seen.iter().map(|s| s.connections).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_clean_drain_gives_up_the_presence_lease_at_once() {
    let redis = Redis::start();
    let prefix = format!("t{}-release", std::process::id());
    // A lease far longer than the test: only the release can make it go.
    let lease = [
        ("CONFAB_REDIS__PRESENCE_LEASE_SECS", "300"),
        ("CONFAB_SERVER__SHUTDOWN_GRACE_SECS", "1"),
    ];
    let mut a = Server::replica(&redis, &prefix, "a", &lease).await;
    let b = Server::replica(&redis, &prefix, "b", &lease).await;
    let (_alice, _) = a.join("/ws/p?user=alice").await;
    let (mut bob, _) = b.join("/ws/p?user=bob").await;
    bob.send_json(json!({"type":"presence"})).await;
    let mut users = bob.next_of("presence").await["users"].clone();
    for _ in 0..50 {
        if users == json!(["alice", "bob"]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        bob.send_json(json!({"type":"presence"})).await;
        users = bob.next_of("presence").await["users"].clone();
    }
    assert_eq!(users, json!(["alice", "bob"]));
    let nodes = format!("{prefix}:nodes");
    assert!(redis.cmd(&["ZSCORE", &nodes, "a"]).await.starts_with('$'));
    assert_ne!(redis.cmd(&["ZSCORE", &nodes, "a"]).await, "$-1\r\n");

    a.signal(libc::SIGTERM);
    let status = a.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    assert!(
        a.log().contains("released its presence lease"),
        "{}",
        a.log()
    );
    assert_eq!(
        redis.cmd(&["ZSCORE", &nodes, "a"]).await,
        "$-1\r\n",
        "a's lease is gone as it exits, not {} s later",
        300
    );
    let rooms = format!("{prefix}:node:a:room-members");
    assert_eq!(redis.cmd(&["EXISTS", &rooms]).await, ":0\r\n");
    assert_eq!(bob.next_of("leave").await["user"], "alice");
    bob.send_json(json!({"type":"presence"})).await;
    assert_eq!(bob.next_of("presence").await["users"], json!(["bob"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_open_while_the_drain_begins_are_closed_with_1001_or_refused() {
    let mut server = Server::start(&[("CONFAB_SERVER__SHUTDOWN_GRACE_SECS", "2")]);
    let addr = server.addr;
    let opened = Arc::new(AtomicUsize::new(0));
    // Clients keep opening sessions until the drain refuses them: each is either refused
    // (503) or admitted, and every admitted one must be closed with 1001 before the process
    // exits. An opener ends only at its first 503 (or a broken connection, or its cap).
    let openers: Vec<_> = (0..4)
        .map(|n| {
            let opened = Arc::clone(&opened);
            tokio::spawn(async move {
                let mut admitted = Vec::new();
                let mut refused = false;
                for i in 0..5000 {
                    let url = format!("ws://{addr}/ws/d?user=u{n}-{i}");
                    match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
                        .await
                    {
                        Ok(Ok((ws, _))) => {
                            admitted.push(crate::harness::Client { ws });
                            opened.fetch_add(1, Ordering::AcqRel);
                        }
                        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                            assert_eq!(resp.status().as_u16(), 503);
                            refused = true;
                            break;
                        }
                        Ok(Err(_)) | Err(_) => break,
                    }
                }
                (admitted, refused)
            })
        })
        .collect();
    // The signal comes while every opener is busy opening.
    eventually(DEADLINE, "sessions are being opened", || async {
        opened.load(Ordering::Acquire) >= 8
    })
    .await;
    server.signal(libc::SIGTERM);
    let mut sessions = Vec::new();
    let mut refused = 0;
    for o in openers {
        let (admitted, was_refused) = tokio::time::timeout(DEADLINE, o)
            .await
            .expect("openers stop once the drain refuses them")
            .unwrap();
        sessions.extend(admitted);
        refused += usize::from(was_refused);
    }
    assert!(
        refused > 0,
        "openings went on into the drain and were refused with 503"
    );
    let count = sessions.len();
    for mut s in sessions {
        let (ending, _) = s.ending(DEADLINE).await;
        assert_eq!(ending, Ending::Closed(1001));
    }
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    eprintln!("drain storm: {count} sessions admitted, all closed with 1001");
}
