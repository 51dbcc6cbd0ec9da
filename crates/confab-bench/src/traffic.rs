//! `fanout`, `rooms` and `cross`: rooms of members, the first few of each publishing at
//! stepped open-loop rates; every member (publishers too) receives every message of its room.
//!
//! A step sends for warm-up + measured seconds at its rate, then waits (drain) until every
//! expected delivery arrived or the drain time passed. Latency and deliveries per second come
//! from the measured window only; loss, duplicates and order from the whole step.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::args::{LatencyFrom, Traffic};
use crate::conn::{Sink, Spec};
use crate::fleet::{settle, Ctx, Fleet};
use crate::idle::{closed_by_server, connections_json};
use crate::procs;
use crate::report::{frames_json, latency_json};
use crate::track::{self, Header, Stats, Tracker};

/// What one publisher sent in one step.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    all: u64,
    measured: u64,
    /// Most a send ran behind its due time, ms.
    lag_ms: f64,
    /// The connection failed under the publisher.
    cut: bool,
}

pub async fn run(ctx: &Ctx, t: &Traffic) -> Result<Value, String> {
    let targets = ctx.dialer.targets.len();
    if t.cross && targets < 2 {
        return Err("cross needs two --url targets (publishers on the first)".into());
    }
    let per_step = t.warmup + t.step + t.drain + Duration::from_secs(1);
    let planned = per_step * t.rates.len() as u32;
    if planned.as_secs() + 30 > ctx.global.max_secs {
        return Err(format!(
            "the steps alone take up to {planned:?}; raise --max-secs or shorten the steps"
        ));
    }
    let (n, p) = (t.rooms * t.members, t.publishers);
    // Connection c is member c % members of room c / members; the first p publish.
    let target_of = |c: usize| -> usize {
        let j = c % t.members;
        match (t.cross, j < p) {
            (false, _) => c % targets,
            (true, true) => 0,
            (true, false) => 1 + c % (targets - 1),
        }
    };
    // The last `stalled` members of each room stop reading once attached.
    let is_stalled = |c: usize| c % t.members >= t.members - t.stalled;
    let pub_conn = |id: usize| (id / p) * t.members + id % p;
    let pub_target: Arc<Vec<usize>> =
        Arc::new((0..t.rooms * p).map(|id| target_of(pub_conn(id))).collect());
    let stats = Arc::new(Stats::new(t.rates.len()));
    let specs: Vec<Spec> = (0..n)
        .map(|c| Spec {
            index: c,
            target: target_of(c),
            room: format!("{}-{}", ctx.global.prefix, c / t.members),
            // Quiet room j has `members` members: connection c holds c·K … c·K+K−1 of
            // rooms × K.
            subscribe: (0..t.extra_rooms)
                .map(|k| {
                    let j = (c * t.extra_rooms + k) % (t.rooms * t.extra_rooms);
                    format!("{}-quiet-{j}", ctx.global.prefix)
                })
                .collect(),
            user: format!("{}{c}", ctx.global.prefix),
            stalled: is_stalled(c),
        })
        .collect();
    let trackers = (0..n)
        .map(|c| {
            if is_stalled(c) {
                return None;
            }
            let t = Tracker::new(
                Arc::clone(&stats),
                c / t.members,
                p,
                c,
                target_of(c),
                Arc::clone(&pub_target),
            );
            Some(t)
        })
        .collect();
    let pids = &ctx.global.pids;
    let before = procs::sample_all(pids);
    ctx.set_phase(format!(
        "connecting {n} ({} rooms of {})",
        t.rooms, t.members
    ));
    let mut fleet = Fleet::open(ctx, specs, trackers).await;
    if fleet.attached < n {
        fleet.close_all(n).await;
        return Err(format!(
            "{} of {n} connections failed: {:?}",
            n - fleet.attached,
            fleet.failures
        ));
    }
    ctx.set_phase("settling");
    settle(&ctx.shared, Duration::from_secs(1), Duration::from_secs(30)).await;
    let fill = ctx.shared.frames();
    let filled = procs::sample_all(pids);
    let sinks: Vec<Sink> = (0..t.rooms * p)
        .filter_map(|id| fleet.sinks[pub_conn(id)].clone())
        .collect();

    let mut steps = Vec::new();
    let mut sent_by_pub: Vec<Vec<u64>> = vec![Vec::new(); sinks.len()];
    let mut seqs = vec![0u64; sinks.len()];
    let mut best: Option<Value> = None;
    for (s, rate) in t.rates.iter().enumerate() {
        ctx.set_phase(format!("step {s}: {rate} msg/s per room"));
        let cpu0 = procs::sample_all(pids);
        let own0 = procs::sample(std::process::id()).unwrap_or_default();
        let start_ns = ctx.shared.now_ns() + 20_000_000;
        let jobs: Vec<_> = sinks
            .iter()
            .enumerate()
            .map(|(id, sink)| {
                let job = Job {
                    step: s,
                    publisher: id,
                    first_seq: seqs[id],
                    rate: rate / p as f64,
                    // Publishers are spread over one interval, not all due at once.
                    start_ns: start_ns
                        + (1e9 * p as f64 / rate * id as f64 / sinks.len() as f64) as u64,
                    warmup: t.warmup,
                    step_len: t.step,
                    tick: t.tick,
                    latency_from: t.latency_from,
                    pad: " ".repeat(usize::from(t.pad > 0)) + &"x".repeat(t.pad.saturating_sub(1)),
                };
                tokio::spawn(publish(
                    job,
                    Arc::clone(sink),
                    Arc::clone(&ctx.shared),
                    Arc::clone(&ctx.sent),
                ))
            })
            .collect();
        let mut sent = Vec::with_capacity(jobs.len());
        for j in jobs {
            sent.push(j.await.unwrap_or(Sent {
                cut: true,
                ..Sent::default()
            }));
        }
        for (id, one) in sent.iter().enumerate() {
            seqs[id] += one.all;
            sent_by_pub[id].push(one.all);
        }
        let members = (t.members - t.stalled) as u64;
        let expected: u64 = sent.iter().map(|x| x.all * members).sum();
        let expected_measured: u64 = sent.iter().map(|x| x.measured * members).sum();
        ctx.set_phase(format!("step {s}: draining"));
        let c = &stats.steps[s];
        let drain_end = Instant::now() + t.drain;
        while c.unique.load(Ordering::Relaxed) < expected && Instant::now() < drain_end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu1 = procs::sample_all(pids);
        let own1 = procs::sample(std::process::id()).unwrap_or_default();
        let unique = c.unique.load(Ordering::Relaxed);
        let measured = c.measured.load(Ordering::Relaxed);
        let (dup, ooo) = (
            c.duplicated.load(Ordering::Relaxed),
            c.out_of_order.load(Ordering::Relaxed),
        );
        let hists = stats.hists(s);
        // Delivered per second in the measured window: from its first due send to its last
        // delivery, or the window itself if deliveries kept up.
        let window_start = start_ns + t.warmup.as_nanos() as u64;
        let window = (c
            .last_ns
            .load(Ordering::Relaxed)
            .saturating_sub(window_start) as f64
            / 1e9)
            .max(t.step.as_secs_f64());
        let cpu = procs::cpu_between(&cpu0, &cpu1);
        let per_cpu = (!pids.is_empty() && cpu > 0.0).then(|| unique as f64 / cpu);
        let sent_total: u64 = sent.iter().map(|x| x.all).sum();
        let worst_p99 = hists
            .iter()
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(0.99))
            .max()
            .unwrap_or(0) as f64
            / 1000.0;
        let lost = expected.saturating_sub(unique);
        let cut = sent.iter().filter(|x| x.cut).count();
        let mut why = Vec::new();
        if lost > 0 {
            why.push(format!("{lost} lost"));
        }
        if dup > 0 {
            why.push(format!("{dup} duplicated"));
        }
        if ooo > 0 {
            why.push(format!("{ooo} out of order"));
        }
        if worst_p99 > t.max_p99_ms {
            why.push(format!("p99 {worst_p99:.1} ms > {} ms", t.max_p99_ms));
        }
        if cut > 0 {
            why.push(format!("{cut} publishers cut off"));
        }
        let step = json!({
            "step": s,
            "rate_per_room": rate,
            "rate_total": rate * t.rooms as f64,
            "sent": sent_total,
            "sent_measured": sent.iter().map(|x| x.measured).sum::<u64>(),
            "send_lag_max_ms": sent.iter().map(|x| x.lag_ms).fold(0.0, f64::max),
            "expected": expected,
            "delivered": unique,
            "expected_measured": expected_measured,
            "delivered_measured": measured,
            "lost": lost,
            "duplicated": dup,
            "out_of_order": ooo,
            "deliveries_per_sec": measured as f64 / window,
            "server_cpu_secs": (!pids.is_empty()).then_some(cpu),
            "deliveries_per_cpu_sec": per_cpu,
            "bench_cpu_secs": own1.cpu_secs - own0.cpu_secs,
            "servers_rss_kib": cpu1.iter().map(|x| x.rss_kib).collect::<Vec<_>>(),
            "servers_cpu_secs": cpu0.iter().zip(&cpu1).map(|(a, b)| b.cpu_secs - a.cpu_secs).collect::<Vec<_>>(),
            "latency_ms": {"same": latency_json(&hists[0]), "cross": latency_json(&hists[1])},
            "passed": why.is_empty(),
            "why": why.join(", "),
        });
        eprintln!("step {s}: {rate} msg/s per room: delivered {unique} of {expected}, p99 {worst_p99:.2} ms{}",
            if why.is_empty() { String::new() } else { format!(" — FAILED: {}", why.join(", ")) });
        let passed = why.is_empty();
        if passed {
            best = Some(step.clone());
        }
        steps.push(step);
        if !passed && !t.keep_going {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A backlog still draining after the last step is late, not lost: wait for it (bounded).
    ctx.set_phase("final drain");
    settle(&ctx.shared, Duration::from_secs(1), Duration::from_secs(30)).await;
    ctx.set_phase("closing");
    let trackers = fleet.close_all(n).await;
    let pairs = pair_summary(&trackers, &sent_by_pub, p);
    // What arrived after a step's drain, before the connections closed: late, not lost.
    for step in &mut steps {
        let s = step["step"].as_u64().unwrap_or(0) as usize;
        let by_end = stats.steps[s].unique.load(Ordering::Relaxed);
        let at_drain = step["delivered"].as_u64().unwrap_or(0);
        let expected = step["expected"].as_u64().unwrap_or(0);
        step["late"] = json!(by_end.saturating_sub(at_drain));
        step["never_delivered"] = json!(expected.saturating_sub(by_end));
    }
    let n_f = n as f64;
    Ok(json!({
        "connections": connections_json(&fleet, n),
        "rooms": t.rooms,
        "members": t.members,
        "extra_rooms_per_connection": t.extra_rooms,
        "publishers_per_room": p,
        "stalled_per_room": t.stalled,
        "step_secs": t.step.as_secs_f64(),
        "warmup_secs": t.warmup.as_secs_f64(),
        "drain_secs": t.drain.as_secs_f64(),
        "max_p99_ms": t.max_p99_ms,
        "latency_from": t.latency_from.name(),
        "frames": {"fill": frames_json(&fill, n_f), "total": frames_json(&ctx.shared.frames(), n_f)},
        "servers": pids.iter().enumerate().map(|(i, pid)| json!({
            "pid": pid, "before": procs::to_json(&before[i]), "filled": procs::to_json(&filled[i]),
            "bytes_per_connection": (filled[i].rss_kib.saturating_sub(before[i].rss_kib) * 1024) as f64 / n_f,
        })).collect::<Vec<_>>(),
        "steps": steps,
        "best": best,
        "pairs": pairs,
        "offset_inversions": stats.offset_inversions.load(Ordering::Relaxed),
        "offset_gaps": stats.offset_gaps.load(Ordering::Relaxed),
        "foreign_messages": stats.foreign.load(Ordering::Relaxed),
        "closed_by_server": closed_by_server(&ctx.shared),
        "stalled_ends": json!(ctx.shared.stalled_ends.lock().unwrap_or_else(|e| e.into_inner())
            .iter().map(|(code, n)| (code.to_string(), *n)).collect::<std::collections::BTreeMap<_, _>>()),
    }))
}

/// Per (publisher, receiver) pair over every step: how many pairs lost, duplicated or
/// reordered anything.
fn pair_summary(trackers: &[Option<Tracker>], sent_by_pub: &[Vec<u64>], p: usize) -> Value {
    let (mut pairs, mut lossy, mut dup, mut ooo, mut lost) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for tr in trackers.iter().flatten() {
        for (k, pair) in tr.pairs.iter().enumerate() {
            let Some(sent) = sent_by_pub.get(tr.room() * p + k) else {
                continue;
            };
            pairs += 1;
            let missing: u64 = sent
                .iter()
                .zip(&pair.delivered)
                .map(|(s, d)| s.saturating_sub(*d))
                .sum();
            lost += missing;
            lossy += u64::from(missing > 0);
            dup += u64::from(pair.duplicated > 0);
            ooo += u64::from(pair.out_of_order > 0);
        }
    }
    json!({"pairs": pairs, "lost": lost, "with_loss": lossy, "with_duplicates": dup, "with_out_of_order": ooo})
}

struct Job {
    step: usize,
    publisher: usize,
    first_seq: u64,
    /// Messages per second of this publisher.
    rate: f64,
    start_ns: u64,
    warmup: Duration,
    step_len: Duration,
    tick: Duration,
    latency_from: LatencyFrom,
    pad: String,
}

/// Sends one step's messages on schedule (open loop): message i is due at start + i / rate
/// and carries that due time; each tick sends what is due, however late.
async fn publish(
    job: Job,
    sink: Sink,
    shared: Arc<crate::conn::Shared>,
    counter: Arc<std::sync::atomic::AtomicU64>,
) -> Sent {
    let interval_ns = 1e9 / job.rate;
    let total = ((job.warmup + job.step_len).as_secs_f64() * job.rate).round() as u64;
    let measure_from = job.start_ns + job.warmup.as_nanos() as u64;
    let mut out = Sent::default();
    // No faster than one message is due: a slow publisher (the `rooms` scenario's 1 msg/s)
    // must not wake every `--tick-ms` and take CPU from the server it measures. Due times are
    // absolute, so the schedule stays open-loop either way.
    let tick = job.tick.max(Duration::from_secs_f64(1.0 / job.rate));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sink = sink.lock().await;
    while out.all < total {
        ticker.tick().await;
        let now = shared.now_ns();
        let mut fed = false;
        while out.all < total {
            let due = job.start_ns + (out.all as f64 * interval_ns) as u64;
            if due > now {
                break;
            }
            let h = Header {
                step: job.step,
                publisher: job.publisher,
                seq: job.first_seq + out.all,
                sent_ns: match job.latency_from {
                    LatencyFrom::Sent => shared.now_ns(),
                    LatencyFrom::Due => due,
                },
                measured: due >= measure_from,
            };
            if sink
                .feed(Message::text(track::text(&h, &job.pad)))
                .await
                .is_err()
            {
                out.cut = true;
                return out;
            }
            fed = true;
            out.all += 1;
            out.measured += u64::from(h.measured);
            out.lag_ms = out
                .lag_ms
                .max(shared.now_ns().saturating_sub(due) as f64 / 1e6);
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if fed && sink.flush().await.is_err() {
            out.cut = true;
            return out;
        }
    }
    out
}
