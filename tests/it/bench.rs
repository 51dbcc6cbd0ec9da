//! `confab-bench` against the real server: every published message reaches every member, none
//! lost, duplicated or out of order, and the frame counts are reported. Seconds long; no
//! assertion on timings (the machine is shared).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::harness::Server;

/// confab-bench's /proc reader, shared rather than written again; the tests use a part of it.
#[path = "../../crates/confab-bench/src/procs.rs"]
#[allow(dead_code)]
mod procs;

/// The confab-bench binary. It is another package of the workspace, so Cargo gives this test
/// no `CARGO_BIN_EXE_confab-bench`; it builds it into the same directory as confab when the
/// whole workspace is tested (`cargo test --workspace`, as scripts/test.sh does; confab-bench's
/// own integration test makes Cargo build the binary). Missing means a narrower command ran:
/// fail saying so rather than skip.
fn bench_binary() -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_confab")).with_file_name("confab-bench");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo test --workspace` (or `cargo build -p \
         confab-bench`) before `cargo test --test it`",
        path.display()
    );
    path
}

/// Runs confab-bench against `server` with `args` and returns its JSON report.
fn bench(server: &Server, args: &[&str]) -> Value {
    let out = Command::new(bench_binary())
        .args(["--url", &format!("ws://{}", server.addr)])
        .args(["--pid", &server.pid().to_string()])
        .args(["--json", "--progress-secs", "0", "--max-secs", "60"])
        .args(args)
        .output()
        .expect("run confab-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "confab-bench failed:\n{stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("confab-bench printed no JSON ({e}):\n{stderr}"))
}

fn server() -> Server {
    Server::start(&[
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "1000000"),
        ("CONFAB_LIMITS__BURST", "1000000"),
    ])
}

#[test]
fn fanout_delivers_every_message_to_every_member_once_and_in_order() {
    let server = server();
    let (rooms, members, publishers) = (2u64, 15u64, 2u64);
    let r = bench(
        &server,
        &[
            "fanout",
            "--rooms",
            &rooms.to_string(),
            "--members",
            &members.to_string(),
            "--publishers",
            &publishers.to_string(),
            "--rates",
            "40,80",
            "--warmup-secs",
            "0.5",
            "--step-secs",
            "1",
            "--drain-secs",
            "10",
            // Only delivery is judged here, never time: every step runs whatever its latency.
            "--max-p99-ms",
            "1000000",
            "--keep-going",
        ],
    );
    assert_eq!(
        r["latency_from"], "sent",
        "the default, named in the report"
    );
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{r:#}");
    for s in steps {
        let sent = s["sent"].as_u64().unwrap();
        assert!(sent > 0, "{s}");
        assert_eq!(s["expected"].as_u64(), Some(sent * members), "{s}");
        assert_eq!(
            s["delivered"], s["expected"],
            "every member got every message: {s}"
        );
        assert_eq!(s["delivered_measured"], s["expected_measured"], "{s}");
        for k in ["lost", "duplicated", "out_of_order"] {
            assert_eq!(s[k], 0, "{k}: {s}");
        }
    }
    let pairs = &r["pairs"];
    assert_eq!(pairs["pairs"].as_u64(), Some(rooms * members * publishers));
    for k in ["lost", "with_loss", "with_duplicates", "with_out_of_order"] {
        assert_eq!(pairs[k], 0, "{k}: {pairs}");
    }
    for k in ["offset_inversions", "offset_gaps", "foreign_messages"] {
        assert_eq!(r[k], 0, "{k}: {r:#}");
    }
    let fill = &r["frames"]["fill"];
    let n = rooms * members;
    assert_eq!(fill["welcome"].as_u64(), Some(n), "{fill}");
    assert!(fill["presence"].as_u64() >= Some(n), "{fill}");
    assert!(fill["per_connection"].as_f64().is_some(), "{fill}");
    let delivered: u64 = steps.iter().map(|s| s["delivered"].as_u64().unwrap()).sum();
    assert_eq!(r["frames"]["total"]["message"].as_u64(), Some(delivered));
    assert_eq!(r["closed_by_server"], serde_json::json!({}), "{r:#}");
}

#[test]
fn idle_reports_memory_per_connection_and_the_frames_to_fill_and_empty_rooms() {
    let server = server();
    let r = bench(
        &server,
        &[
            "idle",
            "--connections",
            "60",
            "--rooms",
            "3",
            "--hold-secs",
            "0.5",
            // Closed in batches of 8, so members still open hear the earlier batches leave
            // (closed all at once, every leave may find nobody left to tell).
            "--connect-concurrency",
            "8",
        ],
    );
    assert_eq!(r["connections"]["attached"], 60, "{r:#}");
    let fill = &r["frames"]["fill"];
    assert_eq!(fill["welcome"], 60, "{fill}");
    assert!(fill["presence"].as_u64() >= Some(60), "{fill}");
    // Each room's later members join while the earlier ones listen.
    assert!(fill["join"].as_u64() > Some(0), "{fill}");
    assert!(
        r["frames"]["close"]["frames"]["leave"].as_u64() > Some(0),
        "{r:#}"
    );
    let srv = &r["servers"][0];
    assert_eq!(srv["pid"].as_u64(), Some(server.pid() as u64));
    assert!(srv["held"]["rss_kib"].as_u64() > Some(0), "{srv}");
    assert!(
        srv["bytes_per_connection"].as_f64() > Some(0.0),
        "memory per connection measured: {srv}"
    );
    assert_eq!(r["closed_by_server"], serde_json::json!({}), "{r:#}");
}

#[test]
fn idle_with_several_rooms_per_connection_subscribes_each_connection_to_all_of_them() {
    let server = server();
    let r = bench(
        &server,
        &[
            "idle",
            "--connections",
            "20",
            "--rooms",
            "10",
            "--rooms-per-conn",
            "5",
            "--hold-secs",
            "0.5",
        ],
    );
    assert_eq!(r["connections"]["attached"], 20, "{r:#}");
    assert_eq!(r["rooms_per_connection"], 5, "{r:#}");
    // Five welcomes and presences per connection: one per room it subscribed to.
    let fill = &r["frames"]["fill"];
    assert_eq!(fill["welcome"], 100, "{fill}");
    assert!(fill["presence"].as_u64() >= Some(100), "{fill}");
    // 20 × 5 subscriptions over 10 rooms: 10 members a room, 45 joins each at most; the bench
    // computes the bound, the frames counted are the server's.
    assert_eq!(r["expected_joins"], 450, "{r:#}");
    let joins = fill["join"].as_u64().unwrap_or(0);
    assert!(joins > 0 && joins <= 450, "joins heard: {joins}\n{fill}");
    let srv = &r["servers"][0];
    assert!(
        srv["bytes_per_subscription"].as_f64() > Some(0.0),
        "memory per subscription measured: {srv}"
    );
    assert_eq!(r["closed_by_server"], serde_json::json!({}), "{r:#}");
}

/// Resident memory of a process, KiB, read the way confab-bench reads it.
fn rss_kib(pid: i32) -> u64 {
    procs::sample(pid as u32).expect("/proc/PID").rss_kib
}

#[test]
fn memory_freed_by_thousands_of_ended_sessions_goes_back_to_the_system() {
    let server = server();
    let r = bench(
        &server,
        &[
            "idle",
            "--connections",
            "2500",
            "--rooms",
            "25",
            "--hold-secs",
            "0.5",
        ],
    );
    assert_eq!(r["connections"]["attached"], 2500, "{r:#}");
    let srv = &r["servers"][0];
    let before = srv["before"]["rss_kib"].as_u64().expect("before");
    let held = srv["held"]["rss_kib"].as_u64().expect("held");
    assert!(held > before + 5_000, "2,500 sessions took memory: {srv}");
    // Without a trim glibc keeps the high-water mark (RSS stays near `held`).
    let line = before + (held - before) / 2;
    // The second trim comes after closed sockets stopped lingering (up to 5 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut now = rss_kib(server.pid());
    while now > line && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        now = rss_kib(server.pid());
    }
    assert!(
        now <= line,
        "RSS {now} KiB after every session ended; {before} before, {held} held"
    );
}
