//! The report: JSON pieces, and the readable table printed from the same JSON.

use std::fmt::Write;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::conn::KINDS;

/// Frame counts by type, their total, and per connection.
pub fn frames_json(counts: &[u64], connections: f64) -> Value {
    let mut m = serde_json::Map::new();
    for (k, n) in KINDS.iter().zip(counts) {
        m.insert((*k).to_owned(), json!(n));
    }
    let total: u64 = counts.iter().sum();
    m.insert("total".into(), json!(total));
    m.insert(
        "per_connection".into(),
        json!(total as f64 / connections.max(1.0)),
    );
    Value::Object(m)
}

/// Latency quantiles in milliseconds (histograms hold microseconds).
pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p999": q(0.999),
        "max": h.max() as f64 / 1000.0,
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// A number with `prec` decimals, or "-" when absent.
fn num(v: &Value, prec: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |x| format!("{x:.prec$}"))
}

fn frames_line(v: &Value) -> String {
    let mut s = String::new();
    for k in KINDS {
        let n = v[k].as_u64().unwrap_or(0);
        if n > 0 {
            let _ = write!(s, "{k} {n}, ");
        }
    }
    let _ = write!(
        s,
        "total {} = {:.1} per connection",
        v["total"],
        f(&v["per_connection"])
    );
    s
}

/// The report as text, for people.
pub fn table(r: &Value) -> String {
    let mut s = String::new();
    let c = &r["connections"];
    let _ = writeln!(
        s,
        "\n== confab-bench {} → {}",
        r["scenario"].as_str().unwrap_or(""),
        r["targets"]
    );
    let _ = writeln!(
        s,
        "connections: {} attached of {} in {:.1} s, failed {} {}",
        c["attached"],
        c["requested"],
        f(&c["connect_secs"]),
        c["failed"],
        if c["failed"].as_u64().unwrap_or(0) > 0 {
            c["failures"].to_string()
        } else {
            String::new()
        }
    );
    let frames = &r["frames"];
    let _ = writeln!(s, "frames to fill: {}", frames_line(&frames["fill"]));
    if let Some(j) = r["expected_joins"].as_u64() {
        let _ = writeln!(
            s,
            "joins: {} received; {j} if each member heard each later member once (m(m-1)/2 a room)",
            frames["fill"]["join"]
        );
    }
    if frames["close"].is_object() {
        let _ = writeln!(
            s,
            "frames to empty: {}",
            frames_line(&frames["close"]["frames"])
        );
    }
    if let Some(servers) = r["servers"].as_array() {
        for v in servers {
            let rss = |k: &str| v[k]["rss_kib"].as_u64().unwrap_or(0);
            let _ = writeln!(
                s,
                "server pid {}: RSS {} KiB before → {} KiB attached{}; {:.0} bytes per connection{}",
                v["pid"],
                rss("before"),
                rss("filled"),
                if v["held"].is_object() {
                    format!(" → {} KiB held", rss("held"))
                } else {
                    String::new()
                },
                f(&v["bytes_per_connection"]),
                // `idle --rooms-per-conn N`: what each of the N rooms held costs.
                if r["rooms_per_connection"].as_u64().unwrap_or(1) > 1 {
                    format!(", {:.0} per subscription", f(&v["bytes_per_subscription"]))
                } else {
                    String::new()
                }
            );
        }
    }
    if let Some(steps) = r["steps"].as_array() {
        let _ = writeln!(
            s,
            "\nlatency from the message's {} time; send lag (latest send behind schedule) per step in the JSON",
            r["latency_from"].as_str().unwrap_or("sent")
        );
        let _ = writeln!(s, "| rate/room | sent | delivered/expected | lost | dup | ooo | deliveries/s | server CPU s | deliveries/CPU-s | bench CPU s | p50 ms | p99 ms | p99 cross ms | max ms | passed |");
        let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
        for st in steps {
            let l = &st["latency_ms"];
            let _ = writeln!(
                s,
                "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                st["rate_per_room"],
                st["sent"],
                st["delivered"],
                st["expected"],
                st["lost"],
                st["duplicated"],
                st["out_of_order"],
                num(&st["deliveries_per_sec"], 0),
                num(&st["server_cpu_secs"], 2),
                num(&st["deliveries_per_cpu_sec"], 0),
                num(&st["bench_cpu_secs"], 2),
                num(&l["same"]["p50"], 2),
                num(&l["same"]["p99"], 2),
                num(&l["cross"]["p99"], 2),
                num(&json!(f(&l["same"]["max"]).max(f(&l["cross"]["max"]))), 2),
                if st["passed"] == true {
                    "yes".to_owned()
                } else {
                    format!("no: {}", st["why"].as_str().unwrap_or(""))
                }
            );
        }
        let b = &r["best"];
        if b.is_object() {
            let _ = writeln!(
                s,
                "\nhighest passing rate: {} msg/s per room = {} deliveries/s, {} deliveries per server CPU-second",
                b["rate_per_room"], num(&b["deliveries_per_sec"], 0), num(&b["deliveries_per_cpu_sec"], 0)
            );
        } else {
            let _ = writeln!(s, "\nno step passed");
        }
        let p = &r["pairs"];
        let _ = writeln!(
            s,
            "(publisher, receiver) pairs: {}, with loss {}, with duplicates {}, with out of order {}; room offsets: inversions {}, gaps {}; foreign texts {}",
            p["pairs"], p["with_loss"], p["with_duplicates"], p["with_out_of_order"],
            r["offset_inversions"], r["offset_gaps"], r["foreign_messages"]
        );
    }
    if r["stalled_per_room"].as_u64().is_some_and(|n| n > 0) {
        let rss: Vec<String> = r["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|st| st["servers_rss_kib"].to_string())
            .collect();
        let _ = writeln!(
            s,
            "stalled members: {} per room, ended (close code: count, 0 = still open) {}; server RSS KiB after each step: {}",
            r["stalled_per_room"],
            r["stalled_ends"],
            rss.join(" ")
        );
    }
    let pc = &r["presence_check"];
    if pc.is_object() {
        let _ = writeln!(
            s,
            "presence check: joins of users already known {}, leaves of unknown users {}, joins or leaves before presence {}",
            pc["redundant_joins"], pc["unknown_leaves"], pc["before_presence"]
        );
    }
    let closed = &r["closed_by_server"];
    if closed.as_object().is_some_and(|m| !m.is_empty()) {
        let _ = writeln!(s, "closed by the server, by code: {closed}");
    }
    s
}
