//! One client connection: dial (from a chosen source address), attach (read until the
//! `presence` frame), then read until told to stop, counting every frame by type and handing
//! `message` frames to the connection's tracker.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::args::Target;
use crate::roster::{Checks, Roster};
use crate::track::Tracker;

pub type Ws = WebSocketStream<TcpStream>;
/// A connection's write half, shared by its own task (which closes it) and a publisher.
pub type Sink = Arc<tokio::sync::Mutex<SplitSink<Ws, Message>>>;

/// Frame types counted separately; everything else is `Other`.
pub const KINDS: [&str; 9] = [
    "welcome", "presence", "join", "leave", "message", "ack", "error", "reset", "other",
];
pub const MESSAGE: usize = 4;

/// Counters every connection adds to; read by the progress line and the phases.
pub struct Shared {
    pub epoch: Instant,
    pub frames: [AtomicU64; KINDS.len()],
    pub attached: AtomicU64,
    pub ended: AtomicU64,
    /// Connections the server closed or dropped before we asked, by close code (0 = none).
    pub closed_by_server: Mutex<std::collections::BTreeMap<u16, u64>>,
    /// How stalled members ended, by the close code they found (0 = still open).
    pub stalled_ends: Mutex<std::collections::BTreeMap<u16, u64>>,
    /// Presence consistency counters, when `--check-presence` is on.
    pub checks: Option<Checks>,
}

impl Shared {
    pub fn new(check_presence: bool) -> Shared {
        Shared {
            checks: check_presence.then(Checks::default),
            epoch: Instant::now(),
            frames: Default::default(),
            attached: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            closed_by_server: Mutex::default(),
            stalled_ends: Mutex::default(),
        }
    }

    pub fn frames(&self) -> [u64; KINDS.len()] {
        std::array::from_fn(|i| self.frames[i].load(Ordering::Relaxed))
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// The type of a server frame: read from the `{"type":"…"` prefix confab and the yardstick
/// write, with a JSON parse as the fallback.
pub fn kind_of(text: &str) -> usize {
    let name = match text.strip_prefix(r#"{"type":""#) {
        Some(rest) => rest.split('"').next().unwrap_or(""),
        None => {
            #[derive(serde::Deserialize)]
            struct Typed<'a> {
                #[serde(rename = "type", borrow)]
                kind: std::borrow::Cow<'a, str>,
            }
            return match serde_json::from_str::<Typed>(text) {
                Ok(t) => index_of(&t.kind),
                Err(_) => KINDS.len() - 1,
            };
        }
    };
    index_of(name)
}

fn index_of(name: &str) -> usize {
    KINDS
        .iter()
        .position(|k| *k == name)
        .unwrap_or(KINDS.len() - 1)
}

/// `offset` and `text` of a `message` frame. The bench's own texts hold no escapes, so the
/// fast path slices them out; anything else goes through serde.
pub fn message_fields(frame: &str) -> Option<(u64, std::borrow::Cow<'_, str>)> {
    let fast = || {
        let off = frame.split_once(r#""offset":"#)?.1;
        let end = off.find(|c: char| !c.is_ascii_digit())?;
        let offset = off[..end].parse().ok()?;
        let text = frame.split_once(r#""text":""#)?.1;
        let text = &text[..text.find('"')?];
        (!text.contains('\\')).then_some((offset, std::borrow::Cow::Borrowed(text)))
    };
    fast().or_else(|| {
        let v: serde_json::Value = serde_json::from_str(frame).ok()?;
        Some((
            v["offset"].as_u64()?,
            std::borrow::Cow::Owned(v["text"].as_str()?.to_owned()),
        ))
    })
}

/// Opens TCP connections to the targets from the source addresses, round-robin.
pub struct Dialer {
    pub targets: Vec<Target>,
    pub sources: Vec<IpAddr>,
    pub timeout: Duration,
}

impl Dialer {
    async fn tcp(&self, to: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
        let socket = if to.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(from) = from {
            // Let connect() pick the port per (source, destination), not bind(): without it
            // one source address runs out after ~28,000 ports across all destinations.
            let one: libc::c_int = 1;
            // SAFETY: a valid socket and a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            socket.bind(SocketAddr::new(from, 0))?;
        }
        let stream = socket.connect(to).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Where one connection goes and who it is.
#[derive(Debug, Clone)]
pub struct Spec {
    pub index: usize,
    pub target: usize,
    /// The path room (`/ws/{room}`); empty = `/ws`, rooms only by `subscribe`.
    pub room: String,
    /// Rooms to hold besides the path room, with `subscribe` frames (SPEC §4). Attached once
    /// every room has sent its `presence`.
    pub subscribe: Vec<String>,
    pub user: String,
    /// Stops reading once attached (a member whose client hangs): its socket fills up.
    pub stalled: bool,
}

/// What the connection's task hands back once attached.
pub type Attached = Result<Sink, String>;

/// Runs one connection: dial, attach (reply on `attached` when the `presence` frame came),
/// read until `stop` fires, then close and read what the server still sends for a moment.
pub async fn run(
    spec: Spec,
    dialer: Arc<Dialer>,
    shared: Arc<Shared>,
    permit: Arc<tokio::sync::Semaphore>,
    attached: oneshot::Sender<Attached>,
    mut tracker: Option<Tracker>,
    mut stop: oneshot::Receiver<()>,
) -> Option<Tracker> {
    let target = &dialer.targets[spec.target];
    let from =
        (!dialer.sources.is_empty()).then(|| dialer.sources[spec.index % dialer.sources.len()]);
    let url = if spec.room.is_empty() {
        format!("{}/ws?user={}", target.base, spec.user)
    } else {
        format!("{}/ws/{}?user={}", target.base, spec.room, spec.user)
    };
    // One `presence` per room: the path room's and each subscription's.
    let mut presences_due = (spec.subscribe.len() + usize::from(!spec.room.is_empty())).max(1);
    let mut roster = Roster::default();
    let opening = async {
        let _permit = permit.acquire().await.map_err(|e| e.to_string())?;
        let tcp = dialer
            .tcp(target.addr, from)
            .await
            .map_err(|e| format!("tcp: {e}"))?;
        let (ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut sink, mut stream) = ws.split();
        for (k, room) in spec.subscribe.iter().enumerate() {
            let frame =
                serde_json::json!({"type": "subscribe", "room": room, "ref": format!("s{k}")});
            sink.send(Message::Text(frame.to_string()))
                .await
                .map_err(|e| format!("subscribe: {e}"))?;
        }
        // The frames before `presence` (welcome, history, joins) count like any other.
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    let kind = kind_of(&t);
                    shared.frames[kind].fetch_add(1, Ordering::Relaxed);
                    if let Some(checks) = &shared.checks {
                        roster.on_frame(kind, &t, checks);
                    }
                    if KINDS[kind] == "presence" {
                        presences_due -= 1;
                        if presences_due == 0 {
                            return Ok((sink, stream));
                        }
                    }
                    // A refused subscription (too_many_rooms, forbidden) never attaches.
                    if KINDS[kind] == "error" && !spec.subscribe.is_empty() {
                        return Err(format!("subscribe refused: {}", error_code(&t)));
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(format!("closed before presence: {c:?}"))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("before presence: {e}")),
                None => return Err("ended before presence".to_owned()),
            }
        }
    };
    let (sink, mut stream) = match tokio::time::timeout(dialer.timeout, opening).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            let _ = attached.send(Err(e));
            return tracker;
        }
        Err(_) => {
            let _ = attached.send(Err(format!("no presence within {:?}", dialer.timeout)));
            return tracker;
        }
    };
    shared.attached.fetch_add(1, Ordering::Relaxed);
    let sink: Sink = Arc::new(tokio::sync::Mutex::new(sink));
    let _ = attached.send(Ok(Arc::clone(&sink)));
    if spec.stalled {
        let _ = (&mut stop).await;
        stalled_end(&mut stream, &shared).await;
        shared.ended.fetch_add(1, Ordering::Relaxed);
        return tracker;
    }
    let mut by_server = None;
    let mut counts = [0u64; KINDS.len()];
    loop {
        // Read what is ready without waiting; count locally, and add to the shared counters
        // only when the socket has nothing more for now (or after a long burst).
        let msg = match stream.next().now_or_never() {
            Some(msg) if counts.iter().sum::<u64>() < 1024 => {
                if !matches!(stop.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
                    break;
                }
                msg
            }
            ready => {
                flush(&shared, &mut counts, tracker.as_mut());
                match ready {
                    Some(msg) => msg,
                    None => tokio::select! {
                        biased;
                        _ = &mut stop => break,
                        msg = stream.next() => msg,
                    },
                }
            }
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                let kind = kind_of(&t);
                counts[kind] += 1;
                if let Some(checks) = &shared.checks {
                    roster.on_frame(kind, &t, checks);
                }
                if kind == MESSAGE {
                    if let (Some(tracker), Some((offset, text))) =
                        (tracker.as_mut(), message_fields(&t))
                    {
                        tracker.on_message(offset, &text, shared.now_ns());
                    }
                }
            }
            Some(Ok(Message::Close(c))) => {
                by_server = Some(c.map_or(0, |c| u16::from(c.code)));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                by_server = Some(0);
                break;
            }
        }
    }
    flush(&shared, &mut counts, tracker.as_mut());
    if let Some(code) = by_server {
        *shared
            .closed_by_server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
    } else {
        // Our close: send it, then read until the server's close (bounded).
        let _ = sink.lock().await.close().await;
        let draining = drain(&mut stream, &shared, &mut roster);
        let _ = tokio::time::timeout(Duration::from_secs(2), draining).await;
    }
    shared.ended.fetch_add(1, Ordering::Relaxed);
    tracker
}

/// The `code` of an `error` frame, for a failure's reason.
fn error_code(frame: &str) -> String {
    serde_json::from_str::<serde_json::Value>(frame)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "error".to_owned())
}

fn flush(shared: &Shared, counts: &mut [u64; KINDS.len()], tracker: Option<&mut Tracker>) {
    for (shared, n) in shared.frames.iter().zip(counts.iter_mut()) {
        if *n > 0 {
            shared.fetch_add(std::mem::take(n), Ordering::Relaxed);
        }
    }
    if let Some(t) = tracker {
        t.flush();
    }
}

/// A stalled member at the end: reads its backlog (bounded) to see whether the server
/// closed it, and records how it ended (close code; 0 = still open).
async fn stalled_end(stream: &mut SplitStream<Ws>, shared: &Shared) {
    let reading = async {
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Close(c) = msg {
                return c.map_or(0, |c| u16::from(c.code));
            }
        }
        0
    };
    let code = tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .unwrap_or(0);
    *shared
        .stalled_ends
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(code)
        .or_default() += 1;
}

/// After our close: counts what the server still sends until its close.
async fn drain(stream: &mut SplitStream<Ws>, shared: &Shared, roster: &mut Roster) {
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Text(t) => {
                let kind = kind_of(&t);
                shared.frames[kind].fetch_add(1, Ordering::Relaxed);
                if let Some(checks) = &shared.checks {
                    roster.on_frame(kind, &t, checks);
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_the_type_prefix_or_from_json() {
        assert_eq!(KINDS[kind_of(r#"{"type":"join","room":"r"}"#)], "join");
        assert_eq!(KINDS[kind_of(r#"{"room":"r","type":"leave"}"#)], "leave");
        assert_eq!(KINDS[kind_of(r#"{"type":"pong"}"#)], "other");
        assert_eq!(KINDS[kind_of("not json")], "other");
    }

    #[test]
    fn message_fields_are_read_fast_and_with_escapes() {
        let f = r#"{"type":"message","room":"r","offset":12,"user":"u","text":"0 1 2 3 1","ts":5}"#;
        let (o, t) = message_fields(f).unwrap();
        assert_eq!((o, t.as_ref()), (12, "0 1 2 3 1"));
        let f = r#"{"type":"message","offset":3,"text":"a\"b","ts":5}"#;
        let (o, t) = message_fields(f).unwrap();
        assert_eq!((o, t.as_ref()), (3, "a\"b"));
    }
}
