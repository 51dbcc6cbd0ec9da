//! Bridge benchmark: two replicas of the real (release) binary on one real `redis-server`,
//! all on loopback, plus one replica on the embedded bus for the phases that compare buses.
//! Every phase is bounded in count and time, and reports what it saw as numbers (a miss, an
//! inversion, a loss) instead of failing, so an older build can be measured with it too.
//!
//! Phases, in the order they run (`BENCH_PHASES`, comma-separated, picks some; default all):
//! - `memory`: memory per idle session (2,000 sessions over 100 rooms on B).
//! - `echo`: first message echo: connect, send a plain line before reading the welcome, time
//!   connect → the sender's own `message` frame (100 tries, 3 s each; Redis A and embedded).
//! - `order`: per-connection order: one session sends 2,000 messages back to back, reading
//!   all along; inversions = consecutive sends whose ack offsets do not increase.
//! - `steady`: one session on A publishes at 200 msg/s for 5 s: send → ack, send → own echo.
//! - `latency`: publish → deliver latency from A to a client on B at a steady rate.
//! - `fanout`: one publisher on A at 100 msg/s for 5 s into a room with 1,000 receivers on B:
//!   delivery latency and deliveries out of offset order.
//! - `ramp`: ramps the rate to find the most messages per second A → B carries with no loss.
//!
//! ```text
//! cargo build --release                                   # the server under test (another package)
//! cargo bench -p confab-bench --bench bridge              # defaults below
//! cargo bench -p confab-bench --bench bridge -- 1000 10   # latency rate (msg/s) and seconds
//! BENCH_SENDERS=1 cargo bench -p confab-bench --bench bridge   # the ramp from one session, not ten
//! BENCH_PHASES=echo,order,steady,fanout cargo bench -p confab-bench --bench bridge
//! BENCH_BINARY=/path/to/confab cargo bench -p confab-bench --bench bridge   # another build
//! ```
//! ```
//!
//! Not a test: numbers vary with the machine; see docs/bench.md for a recorded run.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Throughput ramp: target rates in messages per second, each held for `RAMP_SECS`.
const RAMP: [u64; 6] = [2_000, 5_000, 10_000, 20_000, 40_000, 80_000];
const RAMP_SECS: u64 = 3;
/// Sessions on replica A that share each ramp step's load (`BENCH_SENDERS` overrides).
const SENDERS: usize = 10;
/// How long delivery may lag behind the last send before the rest counts as lost.
const DRAIN: Duration = Duration::from_secs(5);
/// First message echo: tries per bus, and how long one may take before it is a miss.
const ECHO_TRIES: usize = 100;
const ECHO_DEADLINE: Duration = Duration::from_secs(3);
/// Per-connection order: messages one session sends back to back, and the phase's bound.
const ORDER_COUNT: usize = 2_000;
const ORDER_DEADLINE: Duration = Duration::from_secs(60);
/// Steady publish → ack and echo on one session.
const STEADY_RATE: u64 = 200;
const STEADY_SECS: u64 = 5;
/// Fan-out: receivers on B, publisher rate and seconds on A.
const FANOUT_RECEIVERS: usize = 1_000;
const FANOUT_RATE: u64 = 100;
const FANOUT_SECS: u64 = 5;
/// Bound on any single connect (upgrade to the session's presence frame).
const CONNECT_DEADLINE: Duration = Duration::from_secs(20);

const ALL_PHASES: [&str; 7] = [
    "memory", "echo", "order", "steady", "latency", "fanout", "ramp",
];

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_redis() -> (Proc, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(child), port)
}

/// The binary under test: `BENCH_BINARY`, else the release server in this bench's target
/// directory. The server is another package of the workspace, so Cargo neither builds it for
/// this bench nor names it (`CARGO_BIN_EXE_*` is only for the bench's own package): this
/// bench runs as `<target>/release/deps/bridge-<hash>`, the server is `<target>/release/confab`.
fn binary() -> String {
    if let Ok(path) = std::env::var("BENCH_BINARY") {
        return path;
    }
    let exe = std::env::current_exe().expect("this bench's own path");
    let server = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or(&exe)
        .join("confab");
    assert!(
        server.is_file(),
        "{} is missing: run `cargo build --release` first (the server is another package of \
         the workspace), or set BENCH_BINARY=/path/to/confab",
        server.display()
    );
    server.to_string_lossy().into_owned()
}

/// Settings newer builds know, newest first: each is tried with everything after it, and an
/// older build that refuses an unknown key is started with the next set.
const MODERN_ENV: &[(&str, &str)] = &[
    // Every bench client comes from 127.0.0.1.
    ("CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP", "0"),
    ("CONFAB_LIMITS__UPGRADES_PER_IP_PER_SEC", "0"),
    // The ramp backs up far more than 4 MiB on B: raised like the frame bound.
    ("CONFAB_LIMITS__SESSION_QUEUE_BYTES", "1000000000"),
];

/// Starts a replica on the Redis at `redis_port`, or on the embedded bus when `None`.
fn start_replica(redis_port: Option<u16>, node: &str) -> (Proc, String) {
    for skip in 0..=MODERN_ENV.len() {
        if let Some(started) = spawn_replica(redis_port, node, &MODERN_ENV[skip..]) {
            return started;
        }
        if let Some((key, _)) = MODERN_ENV.get(skip) {
            eprintln!("{node}: this build refuses {key}; trying without it");
        }
    }
    panic!("{node}: the replica did not start");
}

fn spawn_replica(
    redis_port: Option<u16>,
    node: &str,
    extra: &[(&str, &str)],
) -> Option<(Proc, String)> {
    let mut cmd = Command::new(binary());
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,confab::startup=info")
        .env_remove("CONFAB_REDIS__URL")
        .env("CONFAB_REDIS__PREFIX", "bench")
        .env("CONFAB_SERVER__NODE_ID", node)
        .env("CONFAB_LIMITS__MESSAGES_PER_SEC", "10000000")
        .env("CONFAB_LIMITS__BURST", "10000000")
        .env("CONFAB_LIMITS__SESSION_QUEUE", "1000000")
        .envs(extra.iter().copied())
        .stderr(Stdio::piped());
    if let Some(port) = redis_port {
        cmd.env("CONFAB_REDIS__URL", format!("redis://127.0.0.1:{port}"));
    }
    let mut child = cmd.spawn().expect("spawn confab");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            } else if line.contains("WARN") || line.contains("ERROR") {
                // What the replicas complain about under load belongs in the report.
                eprintln!("{line}");
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Some((Proc(child), addr)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // Exited at start-up (stderr closed): refused a setting.
            let _ = child.wait();
            None
        }
        Err(e) => panic!("replica {node} did not start: {e}"),
    }
}

async fn wait_ready(addr: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < end, "replica {addr} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect(addr: &str, room: &str, user: &str) -> Ws {
    let url = format!("ws://{addr}/ws/{room}?user={user}");
    let attached = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        // Wait for the presence frame: the session is attached and live.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.contains("\"presence\"") => return ws,
                Some(Ok(_)) => {}
                other => panic!("{user} in {room}: connection ended before presence: {other:?}"),
            }
        }
    };
    tokio::time::timeout(CONNECT_DEADLINE, attached)
        .await
        .unwrap_or_else(|_| panic!("{user} in {room}: no presence within {CONNECT_DEADLINE:?}"))
}

/// What the sender saw: how long sending took, and how many publishes were acked or refused
/// (`error unavailable` when the bus could not keep up within its command timeout).
struct Sent {
    took: Duration,
    acked: u64,
    refused: u64,
    /// From the first send to the last ack or error.
    answered_in: Duration,
    /// The server closed the session before everything was sent.
    cut: bool,
}

/// Sends `count` messages at `rate` per second, then waits for their acks and errors.
async fn send_paced(ws: Ws, count: u64, rate: u64, epoch: Instant) -> Sent {
    let (mut tx, mut rx) = ws.split();
    let started = Instant::now();
    // The sender's own socket is read all along (acks, errors, its echo), or it backs up.
    let replies = tokio::spawn(async move {
        let (mut acked, mut refused) = (0u64, 0u64);
        let mut last = started;
        while acked + refused < count {
            match tokio::time::timeout(DRAIN, rx.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if t.starts_with(r#"{"type":"ack""#) {
                        acked += 1;
                        last = Instant::now();
                    } else if t.starts_with(r#"{"type":"error""#) {
                        refused += 1;
                        last = Instant::now();
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        (acked, refused, last.duration_since(started))
    });
    // Every 5 ms, send what is due by now: an even rate without rounding per tick.
    let mut interval = tokio::time::interval(Duration::from_millis(5));
    let mut sent = 0;
    let mut cut = false;
    'paced: while sent < count {
        interval.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(count);
        while sent < due {
            let t = epoch.elapsed().as_nanos() as u64;
            let frame = json!({"type":"message","text":format!("{sent} {t}")});
            if tx.send(Message::text(frame.to_string())).await.is_err() {
                // Closed by the server (e.g. 4008): reported, not fatal.
                cut = true;
                break 'paced;
            }
            sent += 1;
        }
    }
    let took = started.elapsed();
    let (acked, refused, answered_in) = replies.await.unwrap_or((0, 0, Duration::ZERO));
    let _ = tx.close().await;
    Sent {
        took,
        acked,
        refused,
        answered_in,
        cut,
    }
}

/// Receives message frames until `count` arrived or nothing came for `DRAIN`; returns
/// latencies (ns), the delivery window and how many `reset` frames came.
async fn receive(mut ws: Ws, count: u64, epoch: Instant) -> (Vec<u64>, Duration, u64) {
    let mut latencies = Vec::with_capacity(count as usize);
    let mut resets = 0;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while (latencies.len() as u64) < count {
        match tokio::time::timeout(DRAIN, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = match serde_json::from_str(&t) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if v["type"] == "reset" {
                    resets += 1;
                }
                if v["type"] != "message" {
                    continue;
                }
                let now = epoch.elapsed().as_nanos() as u64;
                let sent_at: u64 = v["text"]
                    .as_str()
                    .and_then(|s| s.split(' ').nth(1))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(now);
                latencies.push(now.saturating_sub(sent_at));
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
            }
            Ok(Some(Ok(Message::Close(c)))) => {
                eprintln!("receiver closed: {c:?}");
                break;
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    let window = first.map_or(Duration::ZERO, |f| last.duration_since(f));
    (latencies, window, resets)
}

/// Resident memory of a process, from /proc (Linux), in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Opens `n` idle sessions over `rooms` rooms on one replica and reports its memory per
/// session (resident set growth divided by sessions).
async fn memory_per_session(addr: &str, pid: u32, n: usize, rooms: usize) {
    let before = rss_kib(pid);
    let mut sessions = Vec::with_capacity(n);
    for i in 0..n {
        sessions.push(connect(addr, &format!("idle-{}", i % rooms), &format!("u{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    println!("## Memory per idle session");
    println!();
    println!(
        "{n} sessions in {rooms} rooms on one replica: resident set {before} KiB → {after} KiB, \
         {:.1} KiB per session",
        after.saturating_sub(before) as f64 / n as f64
    );
    println!();
    for mut ws in sessions {
        let _ = ws.close(None).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1e6
}

/// One try of the first message echo: connect, send a plain line before reading anything,
/// read until the sender's own `message` frame with that line. Returns connect → echo and
/// whether the welcome came first, or `None` on a miss (deadline, refused, closed).
async fn echo_once(addr: &str, i: usize) -> Option<(Duration, bool)> {
    let url = format!("ws://{addr}/ws/echo-{i}?user=u{i}");
    let text = format!("hello {i}");
    let user = format!("u{i}");
    let start = Instant::now();
    let attempt = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.ok()?;
        // As `echo hi | websocat …` does: the line goes out before the welcome is read.
        ws.send(Message::text(text.clone())).await.ok()?;
        let mut first_frame: Option<String> = None;
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let Ok(v) = serde_json::from_str::<Value>(&t) else {
                continue;
            };
            let kind = v["type"].as_str().unwrap_or("").to_owned();
            first_frame.get_or_insert_with(|| kind.clone());
            if kind == "message" && v["text"] == text.as_str() && v["user"] == user.as_str() {
                let took = start.elapsed();
                let _ = ws.close(None).await;
                return Some((took, first_frame.as_deref() == Some("welcome")));
            }
        }
        None
    };
    tokio::time::timeout(ECHO_DEADLINE, attempt)
        .await
        .ok()
        .flatten()
}

async fn first_message_echo(addr: &str, bus: &str) {
    let mut lat = Vec::with_capacity(ECHO_TRIES);
    let (mut misses, mut welcome_not_first) = (0, 0);
    let started = Instant::now();
    for i in 0..ECHO_TRIES {
        match echo_once(addr, i).await {
            Some((took, welcome_first)) => {
                lat.push(took.as_nanos() as u64);
                if !welcome_first {
                    welcome_not_first += 1;
                }
            }
            None => misses += 1,
        }
    }
    lat.sort_unstable();
    println!("## First message echo, {bus}");
    println!();
    println!(
        "{ECHO_TRIES} connections, each to a new room, a plain line sent before the welcome is \
         read ({:.1} s): misses (no own echo within {ECHO_DEADLINE:?}) {misses}, echoes with \
         a frame before the welcome {welcome_not_first}",
        started.elapsed().as_secs_f64()
    );
    println!(
        "connect → own echo: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    println!();
}

async fn per_connection_order(addr: &str, bus: &str) {
    let room = "order";
    let ws = connect(addr, room, "fast").await;
    let (mut tx, mut rx) = ws.split();
    let started = Instant::now();
    let send = async move {
        for i in 0..ORDER_COUNT {
            let frame = json!({"type":"message","text":format!("m{i}"),"ref":format!("r{i}")});
            if tx.feed(Message::text(frame.to_string())).await.is_err() {
                return;
            }
        }
        let _ = tx.flush().await;
    };
    let read = async move {
        // (send index, offset) of each ack; echoes' send indexes in arrival order.
        let mut acks: Vec<(usize, u64)> = Vec::with_capacity(ORDER_COUNT);
        let mut echoes: Vec<usize> = Vec::with_capacity(ORDER_COUNT);
        let mut errors = 0usize;
        let mut ended = None;
        let mut last_answer = Duration::ZERO;
        let end = started + ORDER_DEADLINE;
        while acks.len() + errors < ORDER_COUNT || echoes.len() < acks.len() {
            let left = end.saturating_duration_since(Instant::now()).min(DRAIN);
            match tokio::time::timeout(left, rx.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let Ok(v) = serde_json::from_str::<Value>(&t) else {
                        continue;
                    };
                    let index = |field: &str| -> Option<usize> {
                        v[field].as_str()?.get(1..)?.parse().ok()
                    };
                    match v["type"].as_str() {
                        Some("ack") => {
                            if let (Some(i), Some(o)) = (index("ref"), v["offset"].as_u64()) {
                                acks.push((i, o));
                                last_answer = started.elapsed();
                            }
                        }
                        Some("message") if v["user"] == "fast" => {
                            if let Some(i) = index("text") {
                                echoes.push(i);
                            }
                        }
                        Some("error") => {
                            errors += 1;
                            last_answer = started.elapsed();
                            if errors <= 3 {
                                eprintln!("order, {bus}: {t}");
                            }
                        }
                        _ => {}
                    }
                }
                Ok(Some(Ok(Message::Close(c)))) => {
                    ended = Some(format!("closed {c:?}"));
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => {
                    ended = Some(format!("ended {other:?}"));
                    break;
                }
                Err(_) => {
                    ended = Some("timed out".to_owned());
                    break;
                }
            }
        }
        (acks, echoes, errors, ended, last_answer)
    };
    let ((), (acks, echoes, errors, ended, last_answer)) = tokio::join!(send, read);
    let mut by_send = acks.clone();
    by_send.sort_unstable();
    let ack_inversions = by_send.windows(2).filter(|w| w[1].1 <= w[0].1).count();
    let echo_inversions = echoes.windows(2).filter(|w| w[1] <= w[0]).count();
    let acks_out_of_arrival = acks.windows(2).filter(|w| w[1].0 <= w[0].0).count();
    println!("## Per-connection order, {bus}");
    println!();
    println!(
        "{ORDER_COUNT} messages sent back to back by one session: acked {}, errors {errors}, \
         echoes {}{}",
        acks.len(),
        echoes.len(),
        ended.map_or(String::new(), |e| format!(", reading stopped: {e}"))
    );
    println!(
        "inversions (consecutive sends whose ack offsets do not increase): {ack_inversions}; \
         echoes not in send order: {echo_inversions}; acks arriving out of send order: \
         {acks_out_of_arrival}"
    );
    println!(
        "all answered in {:.0} ms ({:.0} acks/s)",
        last_answer.as_secs_f64() * 1e3,
        acks.len() as f64 / last_answer.as_secs_f64().max(1e-9)
    );
    println!();
}

async fn steady_publish(addr: &str, epoch: Instant) {
    let count = STEADY_RATE * STEADY_SECS;
    let ws = connect(addr, "steady", "steady").await;
    let (mut tx, mut rx) = ws.split();
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let (mut acks, mut echoes) = (Vec::new(), Vec::new());
        let mut errors = 0u64;
        while (acks.len() as u64) + errors < count || echoes.len() < acks.len() {
            match tokio::time::timeout(DRAIN, rx.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let now = epoch.elapsed().as_nanos() as u64;
                    let Ok(v) = serde_json::from_str::<Value>(&t) else {
                        continue;
                    };
                    // The send time rides in the ref ("s<i>-<ns>") and the text ("<i> <ns>").
                    let sent_at = |field: &str, sep: char| -> Option<u64> {
                        v[field].as_str()?.split(sep).nth(1)?.parse().ok()
                    };
                    match v["type"].as_str() {
                        Some("ack") => {
                            if let Some(s) = sent_at("ref", '-') {
                                acks.push(now.saturating_sub(s));
                            }
                        }
                        Some("message") => {
                            if let Some(s) = sent_at("text", ' ') {
                                echoes.push(now.saturating_sub(s));
                            }
                        }
                        Some("error") => errors += 1,
                        _ => {}
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        (acks, echoes, errors)
    });
    let mut interval = tokio::time::interval(Duration::from_millis(5));
    let mut sent = 0;
    while sent < count {
        interval.tick().await;
        let due = ((started.elapsed().as_secs_f64() * STEADY_RATE as f64) as u64 + 1).min(count);
        while sent < due {
            let t = epoch.elapsed().as_nanos() as u64;
            let frame =
                json!({"type":"message","text":format!("{sent} {t}"),"ref":format!("s{sent}-{t}")});
            if tx.send(Message::text(frame.to_string())).await.is_err() {
                sent = count;
                break;
            }
            sent += 1;
        }
    }
    let (mut acks, mut echoes, errors) = reader.await.unwrap_or_default();
    let _ = tx.close().await;
    acks.sort_unstable();
    echoes.sort_unstable();
    println!("## Steady publish → ack and own echo, one session on A (Redis bus)");
    println!();
    println!(
        "{count} messages at {STEADY_RATE} msg/s: acked {}, echoed {}, errors {errors}",
        acks.len(),
        echoes.len()
    );
    println!(
        "send → ack: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; send → own echo: p50 {:.2} ms, \
         p99 {:.2} ms, max {:.2} ms",
        percentile(&acks, 0.50),
        percentile(&acks, 0.99),
        percentile(&acks, 1.0),
        percentile(&echoes, 0.50),
        percentile(&echoes, 0.99),
        percentile(&echoes, 1.0)
    );
    println!();
}

/// What one fan-out receiver saw.
#[derive(Default)]
struct Received {
    latencies: Vec<u64>,
    out_of_order: u64,
    resets: u64,
    closed: bool,
}

/// Reads one receiver's socket until `count` messages arrived or the shared stop time (ns
/// since `epoch`, 0 = not yet known) passed; counts offsets that are not previous + 1.
async fn fan_receive(mut ws: Ws, count: usize, epoch: Instant, stop: Arc<AtomicU64>) -> Received {
    #[derive(serde::Deserialize)]
    struct Frame<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        text: &'a str,
    }
    let mut got = Received::default();
    let mut prev: Option<u64> = None;
    while got.latencies.len() < count {
        match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let Ok(f) = serde_json::from_str::<Frame>(&t) else {
                    continue;
                };
                if f.kind == "reset" {
                    got.resets += 1;
                }
                if f.kind != "message" {
                    continue;
                }
                let now = epoch.elapsed().as_nanos() as u64;
                let sent_at = f
                    .text
                    .split(' ')
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(now);
                got.latencies.push(now.saturating_sub(sent_at));
                if prev.is_some_and(|p| f.offset != p + 1) {
                    got.out_of_order += 1;
                }
                prev = Some(f.offset);
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                got.closed = true;
                break;
            }
            Ok(Some(Ok(_))) => {}
            Err(_) => {
                let s = stop.load(Ordering::Relaxed);
                if s != 0 && epoch.elapsed().as_nanos() as u64 > s {
                    break;
                }
            }
        }
    }
    let _ = ws.close(None).await;
    got
}

async fn fanout(addr_a: &str, addr_b: &str, epoch: Instant) {
    let room = "fanout";
    let count = (FANOUT_RATE * FANOUT_SECS) as usize;
    let stop = Arc::new(AtomicU64::new(0));
    let connecting = Instant::now();
    let mut receivers = Vec::with_capacity(FANOUT_RECEIVERS);
    // Connected 25 at a time; each one is read from the moment it is attached (the joins of
    // the later ones reach it too).
    for batch in (0..FANOUT_RECEIVERS).collect::<Vec<_>>().chunks(25) {
        let sockets = futures_util::future::join_all(
            batch
                .iter()
                .map(|i| async move { connect(addr_b, room, &format!("f{i}")).await }),
        )
        .await;
        for ws in sockets {
            receivers.push(tokio::spawn(fan_receive(
                ws,
                count,
                epoch,
                Arc::clone(&stop),
            )));
        }
    }
    let connected_in = connecting.elapsed();
    // Let the join storm settle before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tx = connect(addr_a, room, "pub").await;
    let sent = send_paced(tx, count as u64, FANOUT_RATE, epoch).await;
    stop.store(
        (epoch.elapsed() + DRAIN).as_nanos() as u64,
        Ordering::Relaxed,
    );
    let mut lat = Vec::with_capacity(count * FANOUT_RECEIVERS);
    let (mut out_of_order, mut receivers_out_of_order, mut short, mut closed) = (0, 0, 0, 0);
    let mut resets = 0;
    for r in receivers {
        let got = r.await.unwrap_or_default();
        out_of_order += got.out_of_order;
        resets += got.resets;
        receivers_out_of_order += usize::from(got.out_of_order > 0);
        short += usize::from((got.latencies.len() as u64) < sent.acked);
        closed += usize::from(got.closed);
        lat.extend(got.latencies);
    }
    lat.sort_unstable();
    let expected = sent.acked * FANOUT_RECEIVERS as u64;
    println!(
        "## Fan-out, 1 publisher on A → {FANOUT_RECEIVERS} receivers on B, one room (Redis bus)"
    );
    println!();
    println!(
        "{FANOUT_RECEIVERS} receivers attached in {:.1} s; {count} messages at {FANOUT_RATE} \
         msg/s: acked {}, refused {}; deliveries {} of {expected} (lost {}), receivers short \
         {short}, closed {closed}",
        connected_in.as_secs_f64(),
        sent.acked,
        sent.refused,
        lat.len(),
        expected.saturating_sub(lat.len() as u64)
    );
    println!(
        "out-of-order deliveries (offset ≠ previous + 1): {out_of_order}, on \
         {receivers_out_of_order} receivers; resets {resets}"
    );
    println!(
        "publish → deliver: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&lat, 0.50),
        percentile(&lat, 0.90),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    println!();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rate: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let phases: Vec<String> = match std::env::var("BENCH_PHASES") {
        Ok(p) if !p.trim().is_empty() => p.split(',').map(|s| s.trim().to_owned()).collect(),
        _ => ALL_PHASES.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(bad) = phases.iter().find(|p| !ALL_PHASES.contains(&p.as_str())) {
        panic!("BENCH_PHASES: unknown phase {bad:?}; known: {ALL_PHASES:?}");
    }
    let on = |name: &str| phases.iter().any(|p| p == name);
    println!("Binary: {}", binary());
    println!();
    let (_redis, port) = start_redis();
    let (_a, addr_a) = start_replica(Some(port), "bench-a");
    let (b, addr_b) = start_replica(Some(port), "bench-b");
    wait_ready(&addr_a).await;
    wait_ready(&addr_b).await;
    // A third replica on the embedded bus, for the phases that compare buses.
    let embedded = if on("echo") || on("order") {
        let (e, addr_e) = start_replica(None, "bench-e");
        wait_ready(&addr_e).await;
        Some((e, addr_e))
    } else {
        None
    };
    let epoch = Instant::now();

    // What a session costs.
    if on("memory") {
        memory_per_session(&addr_b, b.0.id(), 2000, 100).await;
    }

    // A message sent right after connecting comes back to its sender.
    if on("echo") {
        first_message_echo(&addr_a, "replica A (Redis bus)").await;
        if let Some((_, addr_e)) = &embedded {
            first_message_echo(addr_e, "embedded bus").await;
        }
    }

    // One connection's fast messages get offsets in the order it sent them.
    if on("order") {
        per_connection_order(&addr_a, "replica A (Redis bus)").await;
        if let Some((_, addr_e)) = &embedded {
            per_connection_order(addr_e, "embedded bus").await;
        }
    }
    drop(embedded);

    if on("steady") {
        steady_publish(&addr_a, epoch).await;
    }

    // Latency at a steady rate, A → B.
    if on("latency") {
        let count = rate * secs;
        let rx = connect(&addr_b, "latency", "rx").await;
        let tx = connect(&addr_a, "latency", "tx").await;
        let receiver = tokio::spawn(receive(rx, count, epoch));
        let sent = send_paced(tx, count, rate, epoch).await;
        let (mut lat, _, resets) = receiver.await.unwrap();
        lat.sort_unstable();
        println!("## Publish → deliver latency, replica A → client on replica B");
        println!();
        println!(
            "{count} messages at {rate} msg/s: acked {}, refused {}, delivered {}, lost (acked, not delivered) {}, resets at B {resets}",
            sent.acked,
            sent.refused,
            lat.len(),
            sent.acked.saturating_sub(lat.len() as u64)
        );
        println!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            percentile(&lat, 0.50),
            percentile(&lat, 0.90),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            percentile(&lat, 1.0)
        );
        println!();
    }

    // Many receivers of one room on the other replica.
    if on("fanout") {
        fanout(&addr_a, &addr_b, epoch).await;
    }

    // Ramp until loss or saturation.
    if on("ramp") {
        ramp(&addr_a, &addr_b, epoch).await;
    }
}

async fn ramp(addr_a: &str, addr_b: &str, epoch: Instant) {
    let n_senders: usize = std::env::var("BENCH_SENDERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(SENDERS);
    println!("## Throughput ramp, {n_senders} sessions on A → one on B ({RAMP_SECS} s per step)");
    println!();
    println!("| target msg/s | sent msg/s | acked | refused | acked msg/s | delivered | lost | delivered msg/s | p99 ms | resets at B | senders closed |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut best = 0.0f64;
    for target in RAMP {
        let room = format!("ramp-{target}");
        // A whole number of messages per sender, so "all acked" can hold.
        let count = target * RAMP_SECS / n_senders as u64 * n_senders as u64;
        let rx = connect(addr_b, &room, "rx").await;
        // Load comes from many sessions, as in a real room: one session is rate-limited and
        // holds at most 256 publishes in flight, which is not what this step measures.
        let mut senders = Vec::with_capacity(n_senders);
        for i in 0..n_senders {
            let tx = connect(addr_a, &room, &format!("tx{i}")).await;
            senders.push(tokio::spawn(send_paced(
                tx,
                count / n_senders as u64,
                target / n_senders as u64,
                epoch,
            )));
        }
        let receiver = tokio::spawn(receive(rx, count, epoch));
        let mut sent = Sent {
            took: Duration::ZERO,
            acked: 0,
            refused: 0,
            answered_in: Duration::ZERO,
            cut: false,
        };
        let mut cut = 0;
        for s in senders {
            let one = s.await.unwrap();
            sent.took = sent.took.max(one.took);
            sent.answered_in = sent.answered_in.max(one.answered_in);
            sent.acked += one.acked;
            sent.refused += one.refused;
            cut += usize::from(one.cut);
        }
        let (mut lat, window, resets) = receiver.await.unwrap();
        lat.sort_unstable();
        let sent_rate = count as f64 / sent.took.as_secs_f64();
        let delivered = lat.len() as u64;
        // Lost: acked (stored) but never delivered. Refused publishes were never promised.
        let lost = sent.acked.saturating_sub(delivered);
        let delivered_rate = delivered as f64 / window.max(sent.took).as_secs_f64();
        let acked_rate = sent.acked as f64 / sent.answered_in.max(sent.took).as_secs_f64();
        println!(
            "| {target} | {sent_rate:.0} | {} | {} | {acked_rate:.0} | {delivered} | {lost} | {delivered_rate:.0} | {:.1} | {resets} | {cut} |",
            sent.acked,
            sent.refused,
            percentile(&lat, 0.99)
        );
        if lost > 0 || sent.acked < count || cut > 0 {
            // Something was refused, never acked, or lost: this rate is past what it carries.
            break;
        }
        best = best.max(delivered_rate);
        if sent_rate < target as f64 * 0.9 {
            // The sender itself saturated; a higher target would only measure that.
            break;
        }
    }
    println!();
    println!("Most messages per second carried A → B with nothing refused or lost: {best:.0}");
}
