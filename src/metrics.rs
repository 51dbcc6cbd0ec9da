//! Prometheus metrics of one replica, served as text on `GET /metrics`.
//!
//! Each replica owns its [`Metrics`] with its own [`Registry`] (no global registry), so two
//! replicas in one test process count apart. Counters are atomics: the delivery path adds a
//! whole fan-out with one `inc_by` per room event, never a lock per delivered frame.

use crate::protocol::ErrorCode;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Why a WebSocket upgrade was refused, as the `reason` label of
/// `confab_upgrade_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Origin,
    Cap,
    Draining,
    BadRequest,
    /// 401: a token missing, invalid or expired.
    Unauthorized,
    /// 403: the token's `rooms` do not include the room.
    Room,
    /// 429: the client address holds `limits.max_connections_per_ip` sessions.
    PerIp,
    /// 429: the client address started too many upgrades this second.
    TooFast,
    /// 429: the client address's sessions are in `limits.rooms_per_ip` rooms.
    Rooms,
    /// A connection closed at accept: its address has `limits.handshakes_per_ip`
    /// connections that are not sessions.
    Handshakes,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Self::Origin => "origin",
            Self::Cap => "cap",
            Self::Draining => "draining",
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Room => "room",
            Self::PerIp => "per_ip",
            Self::TooFast => "too_fast",
            Self::Rooms => "rooms_per_ip",
            Self::Handshakes => "handshakes_per_ip",
        }
    }
}

/// Every metric of a replica. Cloning the handles is cheap (they are `Arc`s inside).
pub struct Metrics {
    registry: Registry,
    pub sessions_open: IntGauge,
    /// Rooms sessions are in, summed over sessions: a session on `/ws/{room}` is one, a
    /// session subscribed to five rooms five.
    pub subscriptions_open: IntGauge,
    pub subscribe_refusals: IntCounterVec,
    pub rooms_open: IntGauge,
    pub messages_received: IntCounter,
    pub messages_published: IntCounter,
    pub messages_delivered: IntCounter,
    pub typing_dropped: IntCounter,
    pub slow_consumer_evictions: IntCounter,
    pub rate_limited: IntCounter,
    pub bad_frames: IntCounterVec,
    pub rejected_frames: IntCounterVec,
    pub upgrade_refusals: IntCounterVec,
    pub api_requests: IntCounterVec,
    pub bus_publish_seconds: Histogram,
    pub bus_reconnects: IntCounter,
    pub catch_ups: IntCounter,
    pub replayed_messages: IntCounter,
    pub unrecoverable_gaps: IntCounter,
    pub epoch_resets: IntCounter,
    pub ready: IntGauge,
    pub store_errors: IntCounter,
    pub store_commit_seconds: Histogram,
    pub store_retention_deleted: IntCounter,
    /// The archive (Redis + PostgreSQL): messages of the rooms this replica archives not yet
    /// in PostgreSQL, as its last pass saw them.
    pub archive_behind: IntGauge,
    /// How long the oldest message of the last pass waited until it was committed (or, while
    /// commits fail, has been waiting), seconds; 0 once a pass finds nothing to copy.
    pub archive_lag_seconds: Gauge,
    pub archive_copied: IntCounter,
    /// Messages Redis dropped before they were archived: trimmed or expired, or lost with
    /// Redis itself (seeding then starts a new epoch after them).
    pub archive_lost: IntCounter,
    /// Rooms whose Redis meta came back older than the archive's head and were raised to it.
    pub archive_raised: IntCounter,
    /// Offsets Redis handed out again for another message than the archive holds there.
    pub archive_conflicts: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Why the registry could not be built: a programming error (a duplicate or invalid name),
/// caught by the unit test below and at start-up.
pub type MetricsError = prometheus::Error;

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::with_opts(Opts::new(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::with_opts(Opts::new(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        // From 0.25 ms (a local Redis round trip) to 5 s (past `redis.command_timeout_ms`).
        let buckets = vec![
            0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let bus_publish_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "confab_bus_publish_seconds",
                "Time from handing a message to the bus to its ack (stored and published).",
            )
            .buckets(buckets),
        )?;
        registry.register(Box::new(bus_publish_seconds.clone()))?;
        // From 0.25 ms (SQLite in the page cache) to 5 s (a stalled disk or database).
        let store_commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "confab_store_commit_seconds",
                "Time the embedded bus's writer took to commit one batch of messages to the store.",
            )
            .buckets(vec![
                0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0,
            ]),
        )?;
        registry.register(Box::new(store_commit_seconds.clone()))?;
        let archive_lag_seconds = Gauge::with_opts(Opts::new(
            "confab_archive_lag_seconds",
            "Archive latency: how long the oldest message of this replica's last archiver pass had waited when the pass committed, or, while a pass fails, how long it has been waiting.",
        ))?;
        registry.register(Box::new(archive_lag_seconds.clone()))?;
        let metrics = Self {
            sessions_open: gauge("confab_sessions_open", "WebSocket chat sessions open now.")?,
            subscriptions_open: gauge(
                "confab_subscriptions_open",
                "Room subscriptions of the open sessions (a session's path room counts as one).",
            )?,
            subscribe_refusals: counter_vec(
                "confab_subscribe_refusals_total",
                "subscribe frames refused, by error code.",
                &["code"],
            )?,
            rooms_open: gauge(
                "confab_rooms_open",
                "Rooms with at least one local session on this replica.",
            )?,
            messages_received: counter(
                "confab_messages_received_total",
                "Chat messages received from clients (WebSocket and HTTP API) and handed to the bus.",
            )?,
            messages_published: counter(
                "confab_messages_published_total",
                "Chat messages stored and published by the bus (acked; repeated refs not counted).",
            )?,
            messages_delivered: counter(
                "confab_messages_delivered_total",
                "Message frames a room handed to its local members' outbound queues (not join backlogs).",
            )?,
            typing_dropped: counter(
                "confab_typing_dropped_total",
                "Typing frames dropped because a member's outbound queue was half full.",
            )?,
            slow_consumer_evictions: counter(
                "confab_slow_consumer_evictions_total",
                "Sessions closed with 4008 because their outbound queue was full.",
            )?,
            rate_limited: counter(
                "confab_rate_limited_total",
                "Client frames refused with error rate_limited.",
            )?,
            bad_frames: counter_vec(
                "confab_bad_frames_total",
                "Sessions closed for a protocol violation, by WebSocket close code.",
                &["code"],
            )?,
            rejected_frames: counter_vec(
                "confab_rejected_frames_total",
                "Client frames answered with an error frame (connection kept), by error code.",
                &["code"],
            )?,
            upgrade_refusals: counter_vec(
                "confab_upgrade_refusals_total",
                "WebSocket upgrades refused, by reason (origin, cap, draining, bad_request, unauthorized, room, per_ip, too_fast).",
                &["reason"],
            )?,
            api_requests: counter_vec(
                "confab_api_requests_total",
                "HTTP API requests, by endpoint (publish, history, presence) and status code.",
                &["endpoint", "status"],
            )?,
            bus_publish_seconds,
            bus_reconnects: counter(
                "confab_bus_reconnects_total",
                "Times the Redis bridge subscribed again after losing its subscription.",
            )?,
            catch_ups: counter(
                "confab_catch_ups_total",
                "History reads rooms made to fill a hole or catch up after a reconnect.",
            )?,
            replayed_messages: counter(
                "confab_replayed_messages_total",
                "Messages rooms took from history reads (not from live events).",
            )?,
            unrecoverable_gaps: counter(
                "confab_unrecoverable_gaps_total",
                "Holes in a room no longer in history (its members behind were closed with 4008).",
            )?,
            epoch_resets: counter(
                "confab_epoch_resets_total",
                "Times a room moved to a new epoch (history lost, expired or renewed).",
            )?,
            ready: gauge(
                "confab_ready",
                "1 while the replica is ready (bus connected, not draining), else 0.",
            )?,
            store_errors: counter(
                "confab_store_errors_total",
                "Store operations that failed (commits, whose messages were answered unavailable, and reads).",
            )?,
            store_commit_seconds,
            store_retention_deleted: counter(
                "confab_store_retention_deleted_total",
                "Messages the retention sweep deleted from the store (store.retention_days).",
            )?,
            archive_behind: gauge(
                "confab_archive_behind_messages",
                "Acked messages of the rooms this replica archives that are not yet in PostgreSQL (Redis + PostgreSQL).",
            )?,
            archive_lag_seconds,
            archive_copied: counter(
                "confab_archive_copied_total",
                "Messages this replica's archiver copied from Redis into PostgreSQL.",
            )?,
            archive_lost: counter(
                "confab_archive_lost_total",
                "Messages Redis dropped before they were archived: trimmed or expired (PostgreSQL was down longer than the Redis window), or lost with Redis itself (a room then starts a new epoch).",
            )?,
            archive_raised: counter(
                "confab_archive_raised_total",
                "Rooms whose Redis copy came back older than the archive (a restored snapshot, a failover to a lagging replica) and were raised to the archive's head.",
            )?,
            archive_conflicts: counter(
                "confab_archive_conflicts_total",
                "Messages whose (room, epoch, offset) the archive already held with another frame: Redis reused an offset; the room was moved to a new epoch (alert on any).",
            )?,
            registry,
        };
        Ok(metrics)
    }

    pub fn refused(&self, why: Refusal) {
        self.upgrade_refusals
            .with_label_values(&[why.label()])
            .inc();
    }

    pub fn bad_frame(&self, close_code: u16) {
        self.bad_frames
            .with_label_values(&[&close_code.to_string()])
            .inc();
    }

    pub fn rejected(&self, code: ErrorCode) {
        self.rejected_frames
            .with_label_values(&[code.as_str()])
            .inc();
    }

    pub fn api_request(&self, endpoint: &str, status: u16) {
        self.api_requests
            .with_label_values(&[endpoint, &status.to_string()])
            .inc();
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> Result<String, MetricsError> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_renders_with_help() {
        let m = Metrics::new().unwrap();
        m.messages_published.inc_by(3);
        m.api_request("publish", 401);
        let text = m.render().unwrap();
        assert!(text.contains("confab_messages_published_total 3"), "{text}");
        assert!(
            text.contains(r#"confab_api_requests_total{endpoint="publish",status="401"} 1"#),
            "{text}"
        );
        assert!(text.contains("# HELP confab_bus_publish_seconds "));
    }

    #[test]
    fn two_replicas_in_one_process_count_apart() {
        let (a, b) = (Metrics::new().unwrap(), Metrics::new().unwrap());
        a.rate_limited.inc();
        assert_eq!(b.rate_limited.get(), 0);
    }
}
