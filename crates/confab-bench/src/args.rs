//! The command line: global flags (targets, source addresses, server PIDs, bounds) and one
//! subcommand per scenario.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// confab-bench: load and measure confab (or the yardstick) over WebSockets, on loopback only.
///
/// Clients are spread round-robin over the --url targets and the --source addresses. Every
/// run is bounded in connections, messages and time (--max-secs) and stops by itself. Start
/// the servers under test with their per-address limits off and a high message rate, e.g.
/// CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP=0 CONFAB_LIMITS__UPGRADES_PER_IP_PER_SEC=0
/// CONFAB_LIMITS__MESSAGES_PER_SEC=10000000 CONFAB_LIMITS__BURST=10000000.
/// docs/PERFORMANCE.md shows each scenario's command and a recorded baseline.
#[derive(Debug, Parser)]
#[command(name = "confab-bench", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Server base URL(s), ws://127.0.0.1:PORT (a bare 127.0.0.1:PORT works too); repeat or
    /// comma-separate for several replicas. Only 127.0.0.0/8 is accepted.
    #[arg(
        long = "url",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080",
        global = true
    )]
    pub urls: Vec<String>,

    /// Local source addresses to connect from, round-robin (e.g. 127.0.0.2,127.0.0.3), to get
    /// past one address's ephemeral ports; empty = let the kernel pick.
    #[arg(long = "source", value_delimiter = ',', global = true)]
    pub sources: Vec<IpAddr>,

    /// Server process id(s) to sample: resident memory (VmRSS) and CPU time from /proc.
    #[arg(long = "pid", value_delimiter = ',', global = true)]
    pub pids: Vec<u32>,

    /// Print the report as JSON on stdout (the progress line and the table go to stderr).
    #[arg(long, global = true)]
    pub json: bool,

    /// Hard bound on the whole run in seconds: past it, the run stops with an error.
    #[arg(long, default_value_t = 300, global = true)]
    pub max_secs: u64,

    /// Connections being opened at once.
    #[arg(long, default_value_t = 64, global = true)]
    pub connect_concurrency: usize,

    /// Seconds one connection may take from TCP connect to its `presence` frame.
    #[arg(long, default_value_t = 20, global = true)]
    pub connect_timeout: u64,

    /// Prefix of room names (rooms are PREFIX-0, PREFIX-1, …) and of user names.
    #[arg(long, default_value = "bench", global = true)]
    pub prefix: String,

    /// Client runtime threads; 0 = one per core.
    #[arg(long, default_value_t = 0, global = true)]
    pub threads: usize,

    /// Check each member's view of its room: count joins of users it already knew (from its
    /// presence frame or an earlier join) and leaves of users it did not. Costs a set of
    /// names per connection.
    #[arg(long, global = true)]
    pub check_presence: bool,

    /// Seconds between progress lines on stderr; 0 = none.
    #[arg(long, default_value_t = 1.0, global = true)]
    pub progress_secs: f64,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// N connections over R rooms, held idle: memory per connection and the frames it cost
    /// to fill the rooms and to empty them.
    Idle(IdleArgs),
    /// P publishers per room at stepped open-loop rates; every member receives: deliveries,
    /// loss, duplicates, order and latency per step. Defaults: one room of 1,000.
    Fanout(TrafficArgs),
    /// Many small rooms, each with its publishers (defaults: 1,000 rooms of 5, 1 msg/s each).
    Rooms(TrafficArgs),
    /// Publishers on the first --url, every other member on the other --url(s): delivery
    /// across replicas (through Redis for confab).
    Cross(TrafficArgs),
    /// confab on Redis with the PostgreSQL archive: archive lag under load (from the
    /// replicas' /metrics), then history pages read from deep in one archived room.
    Archive(ArchiveArgs),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Idle(_) => "idle",
            Scenario::Fanout(_) => "fanout",
            Scenario::Rooms(_) => "rooms",
            Scenario::Cross(_) => "cross",
            Scenario::Archive(_) => "archive",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Rooms they are spread over (connection i joins room i % rooms).
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Seconds to hold them all open after they are attached and the frames settled.
    #[arg(long, default_value_t = 5.0)]
    pub hold_secs: f64,
    /// Close the connections at the end and count the frames that costs (leave frames).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub close: bool,
    /// Rooms each connection holds: 1 = one room in the path (`/ws/{room}`); N > 1 = one
    /// `/ws` connection subscribed to N rooms (connection i to rooms i·N … i·N+N−1, modulo
    /// --rooms; N ≤ --rooms), for the memory per subscription.
    #[arg(long, default_value_t = 1)]
    pub rooms_per_conn: usize,
}

/// The `archive` scenario (see `archive.rs`).
#[derive(Debug, Clone, Args)]
pub struct ArchiveArgs {
    /// Rooms the load is spread over, one publisher each.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Messages per second in all.
    #[arg(long, default_value_t = 20000.0)]
    pub rate: f64,
    /// Seconds of load for the lag measurement; 0 skips it.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Milliseconds between reads of the lag metric.
    #[arg(long, default_value_t = 100)]
    pub sample_ms: u64,
    /// Messages put into one room (PREFIX-deep) for the history reads; 0 skips them.
    #[arg(long, default_value_t = 0)]
    pub fill: u64,
    /// Messages per second of the fill.
    #[arg(long, default_value_t = 20000.0)]
    pub fill_rate: f64,
    /// History pages to read.
    #[arg(long, default_value_t = 2000)]
    pub reads: usize,
    /// Messages per page (the API's limit, at most 100).
    #[arg(long, default_value_t = 50)]
    pub page: usize,
    /// Newest offsets left out of the reads: the Redis window (history.size), so every read
    /// goes to PostgreSQL.
    #[arg(long, default_value_t = 2000)]
    pub window: u64,
    /// The replicas' api.key, for GET /api/rooms/{room}/history.
    #[arg(long, default_value = "")]
    pub api_key: String,
}

/// Shared by `fanout`, `rooms` and `cross`; their defaults differ (see [`TrafficArgs::resolve`]).
#[derive(Debug, Clone, Args)]
pub struct TrafficArgs {
    /// Rooms [fanout, cross: 1; rooms: 1000].
    #[arg(long)]
    pub rooms: Option<usize>,
    /// Members per room, publishers included [fanout, cross: 1000; rooms: 5].
    #[arg(long)]
    pub members: Option<usize>,
    /// Publishers per room (the room's first members) [1].
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Messages per second per room, one step each, split evenly over the room's publishers
    /// [fanout, cross: 100,200,500,1000,2000,5000; rooms: 1,2,5,10].
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Seconds each step is measured (after its warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub step_secs: f64,
    /// Seconds each step sends before it is measured (counted for loss, not for latency).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Seconds after a step's last send to wait for outstanding deliveries; what has not
    /// arrived by then counts as lost for the step (the report says how much of it came
    /// later, before the run ended: `late`; the rest `never_delivered`).
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// A step fails when its p99 latency is over this many milliseconds.
    #[arg(long, default_value_t = 1000.0)]
    pub max_p99_ms: f64,
    /// Go on to the next rate after a failed step (lost, duplicated, out of order, p99).
    #[arg(long)]
    pub keep_going: bool,
    /// Members per room (its last ones) that stop reading once attached, like a hung
    /// client: they are not expected to receive; the others' delivery and latency are
    /// measured beside them, and the report says how each stalled one ended.
    #[arg(long, default_value_t = 0)]
    pub stalled: usize,
    /// Extra characters appended to each message text (the bench's header is ~30).
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
    /// Milliseconds between a publisher's send ticks (it sends what is due at each tick).
    #[arg(long, default_value_t = 2)]
    pub tick_ms: u64,
    /// Where a message's latency starts: `sent`, when the publisher wrote it (what the
    /// server and the network took), or `due`, its scheduled time (adds how late the bench's
    /// own timer sent it: up to `--tick-ms` plus a millisecond of timer rounding). Either
    /// way the schedule is open-loop and the report gives the latest send (`send lag`).
    #[arg(long, value_enum, default_value_t = LatencyFrom::Sent)]
    pub latency_from: LatencyFrom,
    /// Quiet rooms each connection also subscribes to (`subscribe` frames beside its path
    /// room; no traffic in them, `--members` members each): delivery while every connection
    /// holds many rooms.
    #[arg(long, default_value_t = 0)]
    pub extra_rooms: usize,
}

/// See [`TrafficArgs::latency_from`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LatencyFrom {
    Sent,
    Due,
}

impl LatencyFrom {
    /// The name `--latency-from` takes, for the report.
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned())
    }
}

/// Traffic settings after the scenario's defaults are filled in.
#[derive(Debug, Clone)]
pub struct Traffic {
    pub rooms: usize,
    pub members: usize,
    pub publishers: usize,
    pub rates: Vec<f64>,
    pub step: Duration,
    pub warmup: Duration,
    pub drain: Duration,
    pub max_p99_ms: f64,
    pub keep_going: bool,
    pub pad: usize,
    pub stalled: usize,
    pub tick: Duration,
    pub latency_from: LatencyFrom,
    /// Quiet rooms each connection also holds (`--extra-rooms`).
    pub extra_rooms: usize,
    /// `cross`: publishers on the first URL, the other members on the rest.
    pub cross: bool,
}

impl TrafficArgs {
    pub fn resolve(&self, scenario: &str) -> Result<Traffic, String> {
        let small = scenario == "rooms";
        let rates = if self.rates.is_empty() {
            if small {
                vec![1.0, 2.0, 5.0, 10.0]
            } else {
                vec![100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]
            }
        } else {
            self.rates.clone()
        };
        let t = Traffic {
            rooms: self.rooms.unwrap_or(if small { 1000 } else { 1 }),
            members: self.members.unwrap_or(if small { 5 } else { 1000 }),
            publishers: self.publishers,
            rates,
            step: secs(self.step_secs)?,
            warmup: secs(self.warmup_secs)?,
            drain: secs(self.drain_secs)?,
            max_p99_ms: self.max_p99_ms,
            keep_going: self.keep_going,
            pad: self.pad,
            stalled: self.stalled,
            tick: Duration::from_millis(self.tick_ms.max(1)),
            latency_from: self.latency_from,
            extra_rooms: self.extra_rooms,
            cross: scenario == "cross",
        };
        if t.rooms == 0 || t.members == 0 {
            return Err("--rooms and --members must be at least 1".into());
        }
        if t.publishers == 0 || t.publishers > t.members {
            return Err("--publishers must be between 1 and --members".into());
        }
        if t.publishers + t.stalled > t.members {
            return Err("--publishers plus --stalled must not be more than --members".into());
        }
        if t.rates.iter().any(|r| !r.is_finite() || *r <= 0.0) {
            return Err("--rates must be positive numbers".into());
        }
        Ok(t)
    }
}

fn secs(s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|e| format!("bad duration {s}: {e}"))
}

/// A target replica: where to connect, and the URL base for the handshake.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `ws://host:port`, no trailing slash.
    pub base: String,
}

/// Parses `ws://127.0.0.1:8080`, `http://…` or `127.0.0.1:8080`; refuses non-loopback.
pub fn parse_target(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = if hostport.starts_with("localhost:") {
        hostport.replacen("localhost", "127.0.0.1", 1)
    } else {
        hostport.to_owned()
    };
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|e| format!("--url {url}: want ws://127.0.0.1:PORT ({e})"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--url {url}: only loopback targets (127.0.0.0/8, ::1)"
        ));
    }
    Ok(Target {
        addr,
        base: format!("ws://{addr}"),
    })
}

/// Checks the source addresses: loopback only, same family as the targets.
pub fn check_sources(sources: &[IpAddr], targets: &[Target]) -> Result<(), String> {
    for s in sources {
        if !s.is_loopback() {
            return Err(format!("--source {s}: only loopback addresses"));
        }
        if targets.iter().any(|t| t.addr.is_ipv4() != s.is_ipv4()) {
            return Err(format!("--source {s}: not the targets' address family"));
        }
    }
    Ok(())
}
