//! `confab-bench`: a load tool for confab (and for the yardstick, `examples/yardstick.rs`,
//! which speaks enough of the same wire shape).
//!
//! | module | what it owns |
//! | --- | --- |
//! | `args` | the command line: targets, sources, PIDs, bounds; one subcommand per scenario |
//! | `conn` | one connection: dial from a source address, attach, count frames by type |
//! | `fleet` | many connections: open with bounded concurrency, settle, close in order; progress |
//! | `track` | per (publisher, receiver) delivery tracking, per-step counters, latency histograms |
//! | `idle` | the `idle` scenario: memory per connection, frames to fill and empty rooms |
//! | `traffic` | `fanout`, `rooms`, `cross`: stepped open-loop publishing, every member receives |
//! | `archive` | `archive`: archive lag under load and history reads from PostgreSQL |
//! | `roster` | `--check-presence`: joins of users a member knew, leaves of ones it did not |
//! | `procs` | servers' resident memory and CPU time from /proc; our open-file limit |
//! | `report` | JSON pieces and the readable table |
//!
//! Loopback only, bounded in connections, messages and time (`--max-secs`).

mod archive;
mod args;
mod conn;
mod fleet;
mod idle;
mod procs;
mod report;
mod roster;
mod track;
mod traffic;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

use args::{Cli, Scenario};
use conn::{Dialer, Shared};
use fleet::Ctx;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confab-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let g = cli.global.clone();
    let targets = g
        .urls
        .iter()
        .map(|u| args::parse_target(u))
        .collect::<Result<Vec<_>, _>>()?;
    args::check_sources(&g.sources, &targets)?;
    let nofile = procs::raise_open_file_limit() as u64;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if g.threads > 0 {
        rt.worker_threads(g.threads);
    }
    let rt = rt.enable_all().build().map_err(|e| e.to_string())?;
    let ctx = Arc::new(Ctx {
        global: g.clone(),
        dialer: Arc::new(Dialer {
            targets: targets.clone(),
            sources: g.sources.clone(),
            timeout: Duration::from_secs(g.connect_timeout),
        }),
        shared: Arc::new(Shared::new(g.check_presence)),
        phase: Arc::new(Mutex::new("starting".into())),
        sent: Arc::default(),
    });
    let scenario = cli.scenario.clone();
    let result = rt.block_on(async {
        let progress = (g.progress_secs > 0.0).then(|| {
            tokio::spawn(fleet::progress(
                Arc::clone(&ctx),
                Duration::from_secs_f64(g.progress_secs),
            ))
        });
        let work = async {
            match &scenario {
                Scenario::Idle(a) => idle::run(&ctx, a).await,
                Scenario::Archive(a) => archive::run(&ctx, a).await,
                Scenario::Fanout(a) | Scenario::Rooms(a) | Scenario::Cross(a) => {
                    traffic::run(&ctx, &a.resolve(scenario.name())?).await
                }
            }
        };
        let out = tokio::time::timeout(Duration::from_secs(g.max_secs), work).await;
        if let Some(p) = progress {
            p.abort();
        }
        match out {
            Ok(r) => r,
            Err(_) => Err(format!("stopped at --max-secs {}", g.max_secs)),
        }
    });
    // Connections still open (after a time-out) end with the runtime.
    rt.shutdown_timeout(Duration::from_secs(2));
    let mut report = result?;
    if let Value::Object(m) = &mut report {
        m.insert("scenario".into(), json!(scenario.name()));
        m.insert(
            "targets".into(),
            json!(targets.iter().map(|t| t.base.clone()).collect::<Vec<_>>()),
        );
        m.insert("sources".into(), json!(g.sources));
        m.insert("open_file_limit".into(), json!(nofile));
        if let Some(c) = &ctx.shared.checks {
            let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            m.insert(
                "presence_check".into(),
                json!({
                    "redundant_joins": n(&c.redundant_joins),
                    "unknown_leaves": n(&c.unknown_leaves),
                    "before_presence": n(&c.before_presence),
                }),
            );
        }
    }
    // The archive's report has none of the connection and frame counts the table shows.
    let table = match scenario {
        Scenario::Archive(_) => {
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n"
        }
        _ => report::table(&report),
    };
    if g.json {
        eprint!("{table}");
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print!("{table}");
    }
    Ok(())
}
