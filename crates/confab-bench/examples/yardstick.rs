//! The yardstick: a bare tokio + tokio-tungstenite broadcast server, for measuring confab
//! against on the same machine in the same run. Not a product: no history, no Redis, no
//! limits, no auth, no presence beyond one frame; a member that falls behind the broadcast
//! channel's capacity silently loses messages (tokio's `Lagged`), which confab-bench counts.
//!
//! It speaks enough of confab's wire shape for confab-bench's `idle` and `fanout` scenarios:
//! `GET /ws/{room}?user=U` upgrades; the server sends `welcome`, then `presence` (the bench's
//! "attached" signal); each text a client sends (plain, or JSON with a `text` field) gets the
//! room's next offset and is sent to every member of the room, the sender too, as
//! `{"type":"message","room":…,"offset":N,"user":…,"text":…,"ts":…}`, serialized once.
//!
//! ```text
//! cargo run --release -p confab-bench --example yardstick -- --listen 127.0.0.1:9100 [--capacity 1024]
//! ```
//!
//! `--capacity` is each room's broadcast buffer in messages, allocated when the room is made
//! (about 50 bytes a slot): 1024 matches confab's default per-session queue
//! (`limits.session_queue`); a member more than that behind loses messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// One room: its channel, and the offset counter whose lock also orders the sends.
struct Room {
    tx: broadcast::Sender<Arc<str>>,
    offset: Mutex<u64>,
}

type Rooms = Arc<Mutex<HashMap<String, Arc<Room>>>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("yardstick [--listen 127.0.0.1:9100] [--capacity 1024]: bare tokio broadcast chat (see crates/confab-bench/examples/yardstick.rs)");
        return;
    }
    let listen = flag("--listen").unwrap_or_else(|| "127.0.0.1:9100".into());
    let capacity: usize = flag("--capacity")
        .and_then(|c| c.parse().ok())
        .unwrap_or(1024);
    // The same raise as confab's own start-up: the soft open-file limit up to the hard one.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(&listen).await.expect("bind");
        eprintln!(
            "yardstick listening on {}",
            listener.local_addr().expect("addr")
        );
        let rooms: Rooms = Arc::default();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(session(tcp, Arc::clone(&rooms), capacity));
        }
    });
}

async fn session(tcp: TcpStream, rooms: Rooms, capacity: usize) {
    let _ = tcp.set_nodelay(true);
    let mut path = String::new();
    // tungstenite's callback type fixes the error variant's size.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        path = req.uri().to_string();
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    let (room_name, user) = parse_path(&path);
    let room = Arc::clone(
        rooms
            .lock()
            .unwrap()
            .entry(room_name.clone())
            .or_insert_with(|| {
                Arc::new(Room {
                    tx: broadcast::channel(capacity).0,
                    offset: Mutex::new(0),
                })
            }),
    );
    let mut rx = room.tx.subscribe();
    let (mut sink, mut stream) = ws.split();
    let offset = *room.offset.lock().unwrap();
    let welcome = format!(
        r#"{{"type":"welcome","room":"{room_name}","user":"{user}","session":"y","node":"yardstick","epoch":"0","offset":{offset}}}"#
    );
    let presence = format!(r#"{{"type":"presence","room":"{room_name}","users":["{user}"]}}"#);
    if sink.send(Message::text(welcome)).await.is_err()
        || sink.send(Message::text(presence)).await.is_err()
    {
        return;
    }
    // Out: everything the room broadcasts, written in batches.
    let writer = tokio::spawn(async move {
        loop {
            let frame = match rx.recv().await {
                Ok(f) => f,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if sink.feed(Message::text(frame.to_string())).await.is_err() {
                return;
            }
            while let Ok(f) = rx.try_recv() {
                if sink.feed(Message::text(f.to_string())).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    // In: each text becomes the room's next message.
    let user_json = serde_json::to_string(&user).unwrap_or_default();
    let room_json = serde_json::to_string(&room_name).unwrap_or_default();
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(t) = msg else { continue };
        let text = if t.starts_with('{') {
            match serde_json::from_str::<serde_json::Value>(&t) {
                Ok(v) => v["text"].as_str().unwrap_or_default().to_owned(),
                Err(_) => continue,
            }
        } else {
            t
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let text_json = serde_json::to_string(&text).unwrap_or_default();
        let mut offset = room.offset.lock().unwrap();
        *offset += 1;
        let frame = format!(
            r#"{{"type":"message","room":{room_json},"offset":{},"user":{user_json},"text":{text_json},"ts":{ts}}}"#,
            *offset
        );
        let _ = room.tx.send(Arc::from(frame));
    }
    writer.abort();
}

/// `/ws/{room}?user=U` → (room, user); anything missing gets a default.
fn parse_path(path: &str) -> (String, String) {
    let (p, query) = path.split_once('?').unwrap_or((path, ""));
    let room = p
        .rsplit('/')
        .next()
        .filter(|r| !r.is_empty())
        .unwrap_or("lobby");
    let user = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("user="))
        .unwrap_or("guest");
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || "_.-".contains(*c))
            .take(64)
            .collect()
    };
    (clean(room), clean(user))
}
