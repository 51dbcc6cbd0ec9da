//! Bridge benchmark: two replicas of the real (release) binary on one real `redis-server`,
//! all on loopback. Measures memory per idle session, publish → deliver latency from replica
//! A to a client on replica B at a steady rate, then ramps the rate to find the most messages
//! per second the bridge carries from A to B with zero loss. Every phase is bounded in count
//! and time.
//!
//!     cargo bench --bench bridge                 # defaults below
//!     cargo bench --bench bridge -- 1000 10      # latency rate (msg/s) and seconds
//!     BENCH_SENDERS=1 cargo bench --bench bridge # the ramp from one session instead of ten
//!
//! Not a test: numbers vary with the machine; see docs/bench.md for a recorded run.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
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

fn start_replica(redis_port: u16, node: &str) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,confab::startup=info")
        .env(
            "CONFAB_REDIS__URL",
            format!("redis://127.0.0.1:{redis_port}"),
        )
        .env("CONFAB_REDIS__PREFIX", "bench")
        .env("CONFAB_SERVER__NODE_ID", node)
        .env("CONFAB_LIMITS__MESSAGES_PER_SEC", "10000000")
        .env("CONFAB_LIMITS__BURST", "10000000")
        .env("CONFAB_LIMITS__SESSION_QUEUE", "1000000")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn confab");
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
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("replica started");
    (Proc(child), addr)
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
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    // Wait for the presence frame: the session is attached and live.
    loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            if t.contains("\"presence\"") {
                return ws;
            }
        }
    }
}

/// What the sender saw: how long sending took, and how many publishes were acked or refused
/// (`error unavailable` when the bus could not keep up within its command timeout).
struct Sent {
    took: Duration,
    acked: u64,
    refused: u64,
    /// From the first send to the last ack or error.
    answered_in: Duration,
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
    while sent < count {
        interval.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(count);
        while sent < due {
            let t = epoch.elapsed().as_nanos() as u64;
            let frame = json!({"type":"message","text":format!("{sent} {t}")});
            tx.send(Message::text(frame.to_string()))
                .await
                .expect("send");
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
    }
}

/// Receives message frames until `count` arrived or nothing came for `DRAIN`; returns
/// latencies (ns) and the delivery window.
async fn receive(mut ws: Ws, count: u64, epoch: Instant) -> (Vec<u64>, Duration) {
    let mut latencies = Vec::with_capacity(count as usize);
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while (latencies.len() as u64) < count {
        match tokio::time::timeout(DRAIN, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = match serde_json::from_str(&t) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
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
    (latencies, window)
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rate: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let (_redis, port) = start_redis();
    let (_a, addr_a) = start_replica(port, "bench-a");
    let (b, addr_b) = start_replica(port, "bench-b");
    wait_ready(&addr_a).await;
    wait_ready(&addr_b).await;
    let epoch = Instant::now();

    // Phase 0: what a session costs.
    memory_per_session(&addr_b, b.0.id(), 2000, 100).await;

    // Phase 1: latency at a steady rate, A → B.
    let count = rate * secs;
    let rx = connect(&addr_b, "latency", "rx").await;
    let tx = connect(&addr_a, "latency", "tx").await;
    let receiver = tokio::spawn(receive(rx, count, epoch));
    let sent = send_paced(tx, count, rate, epoch).await;
    let (mut lat, _) = receiver.await.unwrap();
    lat.sort_unstable();
    println!("## Publish → deliver latency, replica A → client on replica B");
    println!();
    println!(
        "{count} messages at {rate} msg/s: acked {}, refused {}, delivered {}, lost (acked, not delivered) {}",
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

    // Phase 2: ramp until loss or saturation.
    let n_senders: usize = std::env::var("BENCH_SENDERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(SENDERS);
    println!("## Throughput ramp, {n_senders} sessions on A → one on B ({RAMP_SECS} s per step)");
    println!();
    println!("| target msg/s | sent msg/s | acked | refused | acked msg/s | delivered | lost | delivered msg/s | p99 ms |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut best = 0.0f64;
    for target in RAMP {
        let room = format!("ramp-{target}");
        let count = target * RAMP_SECS;
        let rx = connect(&addr_b, &room, "rx").await;
        // Load comes from many sessions, as in a real room: one session is rate-limited and
        // holds at most 256 publishes in flight, which is not what this step measures.
        let mut senders = Vec::with_capacity(SENDERS);
        for i in 0..SENDERS {
            let tx = connect(&addr_a, &room, &format!("tx{i}")).await;
            senders.push(tokio::spawn(send_paced(
                tx,
                count / SENDERS as u64,
                target / SENDERS as u64,
                epoch,
            )));
        }
        let receiver = tokio::spawn(receive(rx, count, epoch));
        let mut sent = Sent {
            took: Duration::ZERO,
            acked: 0,
            refused: 0,
            answered_in: Duration::ZERO,
        };
        for s in senders {
            let one = s.await.unwrap();
            sent.took = sent.took.max(one.took);
            sent.answered_in = sent.answered_in.max(one.answered_in);
            sent.acked += one.acked;
            sent.refused += one.refused;
        }
        let (mut lat, window) = receiver.await.unwrap();
        lat.sort_unstable();
        let sent_rate = count as f64 / sent.took.as_secs_f64();
        let delivered = lat.len() as u64;
        // Lost: acked (stored) but never delivered. Refused publishes were never promised.
        let lost = sent.acked.saturating_sub(delivered);
        let delivered_rate = delivered as f64 / window.max(sent.took).as_secs_f64();
        let acked_rate = sent.acked as f64 / sent.answered_in.max(sent.took).as_secs_f64();
        println!(
            "| {target} | {sent_rate:.0} | {} | {} | {acked_rate:.0} | {delivered} | {lost} | {delivered_rate:.0} | {:.1} |",
            sent.acked,
            sent.refused,
            percentile(&lat, 0.99)
        );
        if lost > 0 || sent.acked < count {
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
