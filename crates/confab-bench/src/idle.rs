//! `idle`: N connections over R rooms, held. Reports the servers' resident memory per
//! connection and the frames it cost to fill the rooms (welcome, presence, joins) and to
//! empty them (leaves).

use std::time::Duration;

use serde_json::{json, Value};

use crate::args::IdleArgs;
use crate::conn::{Shared, Spec};
use crate::fleet::{settle, Ctx, Fleet};
use crate::procs;
use crate::report::frames_json;

pub async fn run(ctx: &Ctx, a: &IdleArgs) -> Result<Value, String> {
    if a.connections == 0 || a.rooms == 0 {
        return Err("--connections and --rooms must be at least 1".into());
    }
    if a.rooms_per_conn == 0 || a.rooms_per_conn > a.rooms {
        return Err("--rooms-per-conn must be between 1 and --rooms".into());
    }
    let hold = Duration::try_from_secs_f64(a.hold_secs).map_err(|e| format!("--hold-secs: {e}"))?;
    let pids = &ctx.global.pids;
    let targets = ctx.dialer.targets.len();
    let room = |r: usize| format!("{}-{}", ctx.global.prefix, r % a.rooms);
    let specs: Vec<Spec> = (0..a.connections)
        .map(|i| Spec {
            index: i,
            target: i % targets,
            // Several rooms: all by subscribe on `/ws`, the way a multi-room client holds them.
            room: if a.rooms_per_conn > 1 {
                String::new()
            } else {
                room(i)
            },
            subscribe: subscriptions(i, a.rooms_per_conn, a.rooms)
                .map(room)
                .collect(),
            user: format!("{}{i}", ctx.global.prefix),
            stalled: false,
        })
        .collect();
    let before = procs::sample_all(pids);
    ctx.set_phase(format!("idle: connecting {}", a.connections));
    let mut fleet = Fleet::open(ctx, specs, (0..a.connections).map(|_| None).collect()).await;
    ctx.set_phase("idle: settling");
    let settled_in = settle(&ctx.shared, Duration::from_secs(1), Duration::from_secs(30)).await;
    let fill = ctx.shared.frames();
    let filled = procs::sample_all(pids);
    ctx.set_phase(format!("idle: holding {} for {hold:?}", fleet.attached));
    tokio::time::sleep(hold).await;
    let held = procs::sample_all(pids);
    let after_hold = ctx.shared.frames();
    let n = fleet.attached.max(1) as f64;
    // An attached connection holds all its rooms (it waited for each one's presence).
    let subscriptions = n * a.rooms_per_conn as f64;
    let mut close = Value::Null;
    let mut closed = Vec::new();
    if a.close {
        ctx.set_phase("idle: closing");
        let started = std::time::Instant::now();
        fleet.close_all(ctx.global.connect_concurrency).await;
        let secs = started.elapsed().as_secs_f64();
        settle(
            &ctx.shared,
            Duration::from_millis(500),
            Duration::from_secs(10),
        )
        .await;
        let emptied = ctx.shared.frames();
        let delta: Vec<u64> = emptied.iter().zip(after_hold).map(|(e, h)| e - h).collect();
        closed = procs::sample_all(pids);
        close = json!({"secs": secs, "frames": frames_json(&delta, n)});
    }
    let servers: Vec<Value> = pids
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            let grew = |s: &[procs::Sample]| s[i].rss_kib.saturating_sub(before[i].rss_kib);
            json!({
                "pid": pid,
                "before": procs::to_json(&before[i]),
                "filled": procs::to_json(&filled[i]),
                "held": procs::to_json(&held[i]),
                "closed": closed.get(i).map(procs::to_json),
                "rss_growth_kib": grew(&held),
                "bytes_per_connection": (grew(&held) * 1024) as f64 / n,
                "bytes_per_subscription": (grew(&held) * 1024) as f64 / subscriptions,
                "anon_bytes_per_connection":
                    (held[i].anon_kib.saturating_sub(before[i].anon_kib) * 1024) as f64 / n,
                "fill_cpu_secs": filled[i].cpu_secs - before[i].cpu_secs,
            })
        })
        .collect();
    // If each member heard each later member's join once: m(m-1)/2 per room of m.
    let mut members = vec![0usize; a.rooms];
    for i in 0..a.connections {
        for r in rooms_of(i, a.rooms_per_conn, a.rooms) {
            members[r] += 1;
        }
    }
    let expected_joins: usize = members.iter().map(|m| m * m.saturating_sub(1) / 2).sum();
    Ok(json!({
        "connections": connections_json(&fleet, a.connections),
        "rooms": a.rooms,
        "rooms_per_connection": a.rooms_per_conn,
        "expected_joins": expected_joins,
        "settle_secs": settled_in.as_secs_f64(),
        "hold_secs": a.hold_secs,
        "frames": {
            "fill": frames_json(&fill, n),
            "hold": frames_json(&after_hold.iter().zip(fill).map(|(h, f)| h - f).collect::<Vec<_>>(), n),
            "close": close,
        },
        "servers": servers,
        "closed_by_server": closed_by_server(&ctx.shared),
    }))
}

/// The rooms connection `i` subscribes to when it holds `per` rooms of `rooms` (none with
/// one: that one is its path room, `i % rooms`).
fn subscriptions(i: usize, per: usize, rooms: usize) -> impl Iterator<Item = usize> {
    let n = if per > 1 { per } else { 0 };
    (0..n).map(move |k| (i * per + k) % rooms)
}

/// Every room connection `i` is in, whichever way it joined.
fn rooms_of(i: usize, per: usize, rooms: usize) -> Vec<usize> {
    if per > 1 {
        subscriptions(i, per, rooms).collect()
    } else {
        vec![i % rooms]
    }
}

pub fn connections_json(fleet: &Fleet, requested: usize) -> Value {
    json!({
        "requested": requested,
        "attached": fleet.attached,
        "failed": requested - fleet.attached,
        "failures": fleet.failures,
        "connect_secs": fleet.connect_secs,
    })
}

pub fn closed_by_server(shared: &Shared) -> Value {
    let map = shared
        .closed_by_server
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    json!(map
        .iter()
        .map(|(code, n)| (code.to_string(), *n))
        .collect::<std::collections::BTreeMap<_, _>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_holding_several_rooms_gets_distinct_ones_spread_over_all() {
        assert_eq!(subscriptions(0, 1, 10).count(), 0, "one room: the path's");
        assert_eq!(rooms_of(13, 1, 10), [3]);
        assert_eq!(rooms_of(0, 3, 10), [0, 1, 2]);
        assert_eq!(
            rooms_of(3, 3, 10),
            [9, 0, 1],
            "wraps around, still distinct"
        );
        assert_eq!(rooms_of(7, 10, 10), (0..10).collect::<Vec<_>>());
        // 10 connections × 3 rooms over 10 rooms: every room gets 3 members.
        let mut members = [0; 10];
        for i in 0..10 {
            for r in rooms_of(i, 3, 10) {
                members[r] += 1;
            }
        }
        assert_eq!(members, [3; 10]);
    }
}
