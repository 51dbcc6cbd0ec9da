//! `archive`: confab on Redis with the PostgreSQL archive (docs/design.md, "The archive").
//!
//! 1. Lag: one publisher per room sends `--rate` messages/s in all, spread over `--rooms`,
//!    for `--secs`; every `--sample-ms` the replicas' `/metrics` are read and the largest
//!    `confab_archive_lag_seconds` is recorded (the age of the oldest acked message not yet in
//!    PostgreSQL). Then the time until `confab_archive_behind_messages` is 0 everywhere.
//! 2. Reads: `--fill` messages go into one room (`PREFIX-deep`) as fast as acks come back,
//!    the archive catches up, then `--reads` pages of `--page` messages at random `before`
//!    offsets below the Redis window are read through `GET /api/rooms/{room}/history` (one
//!    HTTP/1.1 connection, keep-alive): latency p50/p99/max, and each page checked for
//!    `--page` consecutive offsets ending just below `before`.
//!
//! Start the replicas with `CONFAB_STORE__URL=postgres://…`, `CONFAB_API__KEY=…` and the rate
//! limits off (see `--help` of the tool); give the key as `--api-key`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::args::{ArchiveArgs, Target};
use crate::fleet::Ctx;

pub async fn run(ctx: &Ctx, a: &ArchiveArgs) -> Result<Value, String> {
    if a.rooms == 0 || a.rate <= 0.0 || a.page == 0 {
        return Err("--rooms, --rate and --page must be positive".into());
    }
    let targets = ctx.dialer.targets.clone();
    let mut report = serde_json::Map::new();
    if a.secs > 0.0 {
        report.insert("lag".into(), lag(ctx, a, &targets).await?);
    }
    if a.fill > 0 {
        report.insert("reads".into(), reads(ctx, a, &targets).await?);
    }
    Ok(Value::Object(report))
}

/// Counts of one publishing phase.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
}

async fn lag(ctx: &Ctx, a: &ArchiveArgs, targets: &[Target]) -> Result<Value, String> {
    let per_room = a.rate / a.rooms as f64;
    let counts = Arc::new(Counts::default());
    let run_for = Duration::try_from_secs_f64(a.secs).map_err(|e| format!("--secs: {e}"))?;
    ctx.set_phase(format!("archive: {} rooms at {} msg/s", a.rooms, a.rate));
    let mut publishers = Vec::new();
    for r in 0..a.rooms {
        let target = &targets[r % targets.len()];
        let room = format!("{}-{r}", ctx.global.prefix);
        let url = format!("{}/ws/{room}?user={}p{r}", target.base, ctx.global.prefix);
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("connect {room}: {e}"))?;
        let counts = Arc::clone(&counts);
        publishers.push(tokio::spawn(async move {
            publish(ws, per_room, run_for, counts)
                .await
                .map_err(|e| format!("publisher of {room}: {e}"))
        }));
    }
    let started = Instant::now();
    let mut samples = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let every = Duration::from_millis(a.sample_ms.max(10));
    while started.elapsed() < run_for {
        tokio::time::sleep(every).await;
        let lag = max_metric(targets, "confab_archive_lag_seconds").await?;
        let _ = samples.record((lag * 1000.0) as u64);
    }
    for p in publishers {
        p.await.map_err(|e| e.to_string())??;
    }
    // Then until the archive holds everything (bounded by --max-secs).
    let drained = Instant::now();
    loop {
        let behind = sum_metric(targets, "confab_archive_behind_messages").await?;
        if behind == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let secs = run_for.as_secs_f64();
    Ok(json!({
        "rooms": a.rooms,
        "rate": a.rate,
        "secs": a.secs,
        "sent": n(&counts.sent),
        "acked": n(&counts.acked),
        "errors": n(&counts.errors),
        "acked_per_sec": n(&counts.acked) as f64 / secs,
        "lag_samples": samples.len(),
        "lag_ms": {
            "p50": samples.value_at_quantile(0.5),
            "p99": samples.value_at_quantile(0.99),
            "max": samples.max(),
        },
        "drain_ms_after_last_send": drained.elapsed().as_millis() as u64,
    }))
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// One room's publisher: `rate` messages/s for `secs`, open-loop in 10 ms ticks; reads acks.
async fn publish(ws: Ws, rate: f64, secs: Duration, counts: Arc<Counts>) -> Result<(), String> {
    let (mut tx, mut rx) = ws.split();
    // This publisher's own answers: it waits for its own acks at the end.
    let answered = Arc::new(AtomicU64::new(0));
    let (reader_counts, reader_answered) = (Arc::clone(&counts), Arc::clone(&answered));
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            if let Message::Text(t) = msg {
                if t.starts_with(r#"{"type":"ack""#) {
                    reader_counts.acked.fetch_add(1, Ordering::Relaxed);
                    reader_answered.fetch_add(1, Ordering::Relaxed);
                } else if t.starts_with(r#"{"type":"error""#) {
                    reader_counts.errors.fetch_add(1, Ordering::Relaxed);
                    reader_answered.fetch_add(1, Ordering::Relaxed);
                    if reader_counts.errors.load(Ordering::Relaxed) == 1 {
                        eprintln!("first error: {t}");
                    }
                }
            } else if let Message::Close(reason) = msg {
                eprintln!("closed by the server: {reason:?}");
            }
        }
    });
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0u64;
    while started.elapsed() < secs {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let frame =
                json!({"type": "message", "text": format!("a{sent}"), "ref": sent.to_string()});
            tx.feed(Message::text(frame.to_string()))
                .await
                .map_err(|e| e.to_string())?;
            sent += 1;
        }
        tx.flush().await.map_err(|e| e.to_string())?;
    }
    counts.sent.fetch_add(sent, Ordering::Relaxed);
    // Acks of the last sends, bounded.
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end && answered.load(Ordering::Relaxed) < sent {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tx.close().await;
    reader.abort();
    Ok(())
}

async fn reads(ctx: &Ctx, a: &ArchiveArgs, targets: &[Target]) -> Result<Value, String> {
    let room = format!("{}-deep", ctx.global.prefix);
    let target = &targets[0];
    ctx.set_phase(format!("archive: filling {room} with {}", a.fill));
    let url = format!("{}/ws/{room}?user={}filler", target.base, ctx.global.prefix);
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("connect {room}: {e}"))?;
    let (mut tx, mut rx) = ws.split();
    let (mut sent, mut acked, mut head) = (0u64, 0u64, 0u64);
    // Paced at --fill-rate, and by acks (at most 256 in flight): faster than the archive
    // copies, Redis would trim messages before they are archived.
    let filling = Instant::now();
    while acked < a.fill {
        let due = ((filling.elapsed().as_secs_f64() * a.fill_rate) as u64).max(1);
        while sent < a.fill.min(due) && sent - acked < 256 {
            let frame =
                json!({"type": "message", "text": format!("d{sent}"), "ref": sent.to_string()});
            tx.feed(Message::text(frame.to_string()))
                .await
                .map_err(|e| e.to_string())?;
            sent += 1;
        }
        tx.flush().await.map_err(|e| e.to_string())?;
        let next = match sent == acked {
            // Nothing in flight: wait for the schedule.
            true => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            false => rx.next().await,
        };
        match next {
            Some(Ok(Message::Text(t))) if t.starts_with(r#"{"type":"ack""#) => {
                acked += 1;
                let v: Value = serde_json::from_str(&t).map_err(|e| e.to_string())?;
                head = head.max(v["offset"].as_u64().unwrap_or(0));
            }
            Some(Ok(Message::Text(t))) if t.starts_with(r#"{"type":"error""#) => {
                return Err(format!("fill refused: {t}"));
            }
            Some(Ok(_)) => {}
            other => return Err(format!("fill connection ended: {other:?}")),
        }
    }
    let _ = tx.close().await;
    let fill_secs = filling.elapsed().as_secs_f64();
    ctx.set_phase("archive: waiting for the archive to catch up");
    let caught_up = Instant::now();
    while sum_metric(targets, "confab_archive_behind_messages").await? > 0.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let catch_up_ms = caught_up.elapsed().as_millis() as u64;

    ctx.set_phase(format!("archive: {} history reads", a.reads));
    let mut http = Http::connect(target).await?;
    let mut latency = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let page = a.page as u64;
    // Below the Redis window (history.size, at most 1,000 by default) and above the page.
    let top = head.saturating_sub(a.window).max(page + 2);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut bad = 0u64;
    for _ in 0..a.reads {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let before = page + 1 + seed % (top - page - 1);
        let path = format!("/api/rooms/{room}/history?before={before}&limit={page}");
        let started = Instant::now();
        let body = http.get(&path, &a.api_key).await?;
        let _ = latency.record(started.elapsed().as_micros() as u64);
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{path}: {e}"))?;
        let offsets: Vec<u64> = v["messages"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["offset"].as_u64()).collect())
            .unwrap_or_default();
        if offsets != (before - page..before).collect::<Vec<_>>() {
            bad += 1;
        }
    }
    let us = |q| latency.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "room": room,
        "filled": acked,
        "fill_secs": fill_secs,
        "archive_lost_total": sum_metric(targets, "confab_archive_lost_total").await?,
        "head": head,
        "catch_up_ms": catch_up_ms,
        "reads": a.reads,
        "page": a.page,
        "wrong_pages": bad,
        "latency_ms": {"p50": us(0.5), "p99": us(0.99), "max": latency.max() as f64 / 1000.0},
    }))
}

/// One keep-alive HTTP/1.1 connection for GETs.
struct Http {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Http {
    async fn connect(target: &Target) -> Result<Self, String> {
        let stream = TcpStream::connect(target.addr)
            .await
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Self {
            stream: BufReader::new(stream),
            host: target.addr.to_string(),
        })
    }

    async fn get(&mut self, path: &str, key: &str) -> Result<String, String> {
        let auth = match key.is_empty() {
            true => String::new(),
            false => format!("Authorization: Bearer {key}\r\n"),
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}\r\n", self.host);
        let err = |e: std::io::Error| e.to_string();
        self.stream
            .get_mut()
            .write_all(req.as_bytes())
            .await
            .map_err(err)?;
        let mut status = String::new();
        self.stream.read_line(&mut status).await.map_err(err)?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.map_err(err)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().map_err(|_| "bad content-length")?;
                }
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await.map_err(err)?;
        let body = String::from_utf8(body).map_err(|e| e.to_string())?;
        if !status.contains(" 200 ") {
            return Err(format!("GET {path}: {} {body}", status.trim_end()));
        }
        Ok(body)
    }
}

/// A metric's value on each target (0 when absent).
async fn metric_values(targets: &[Target], name: &str) -> Result<Vec<f64>, String> {
    let mut values = Vec::with_capacity(targets.len());
    for t in targets {
        let mut http = Http::connect(t).await?;
        let body = http.get("/metrics", "").await?;
        values.push(
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0.0),
        );
    }
    Ok(values)
}

async fn max_metric(targets: &[Target], name: &str) -> Result<f64, String> {
    Ok(metric_values(targets, name)
        .await?
        .into_iter()
        .fold(0.0, f64::max))
}

async fn sum_metric(targets: &[Target], name: &str) -> Result<f64, String> {
    Ok(metric_values(targets, name).await?.into_iter().sum())
}
