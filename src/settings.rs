//! Settings (every key is in config/default.toml): built-in defaults < TOML file <
//! `CONFAB_<SECTION>__<KEY>` environment variables < command-line flags. Every layer is checked
//! against the defaults, so an unknown key or a value of the wrong type stops start-up with a
//! message that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// Environment variables that configure confab start with this.
pub const ENV_PREFIX: &str = "CONFAB_";
/// Names the config file; read by the CLI, not a setting itself.
pub const ENV_CONFIG_FILE: &str = "CONFAB_CONFIG";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub redis: RedisSettings,
    pub limits: LimitSettings,
    pub history: HistorySettings,
    pub websocket: WebSocketSettings,
    pub auth: AuthSettings,
    pub api: ApiSettings,
    pub store: StoreSettings,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// HS256 shared secret; empty = no HS256 tokens.
    pub jwt_secret: String,
    /// PEM public key (RSA for RS256, P-256 for ES256); empty = none.
    pub jwt_public_key_file: String,
    /// Required `aud` of every token when set.
    pub audience: String,
    /// Required `iss` of every token when set.
    pub issuer: String,
}

impl AuthSettings {
    /// True when connections need a token; otherwise they are anonymous.
    pub fn enabled(&self) -> bool {
        !self.jwt_secret.is_empty() || !self.jwt_public_key_file.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Bearer key of the HTTP API; empty means the API is disabled (403).
    pub key: String,
    /// Wrong keys a client address may send within `key_failure_window_secs` before every
    /// API call from it gets 429 until that window passes; 0 = no limit.
    pub max_key_failures: u32,
    #[serde(with = "secs")]
    pub key_failure_window_secs: Duration,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            key: String::new(),
            max_key_failures: 5,
            key_failure_window_secs: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: String,
    /// Empty means "use the host name", which is unique per pod in Kubernetes.
    pub node_id: String,
    pub allowed_origins: Vec<String>,
    #[serde(with = "secs")]
    pub shutdown_grace_secs: Duration,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Arbiters (threads) that room actors are spread over; 0 means one per core.
    pub room_threads: usize,
    /// Proxies (CIDRs) whose `X-Forwarded-For` names the client; empty = none is believed.
    pub trusted_proxies: Vec<String>,
    /// A connection that has not sent its whole request head by then is cut.
    #[serde(with = "secs")]
    pub handshake_timeout_secs: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// Empty means the embedded in-process bus (one replica).
    pub url: String,
    pub prefix: String,
    /// A bus command that takes longer fails, and the client gets `error unavailable`.
    #[serde(with = "millis")]
    pub command_timeout_ms: Duration,
    /// How long a joining session's setup reads and the replica's presence changes are
    /// retried after a bus call failed (a timeout under a reconnect storm) before the session
    /// is closed with 1013 or the change waits for the bus to reconnect.
    #[serde(with = "millis")]
    pub join_retry_ms: Duration,
    /// A replica that has not renewed its presence lease this long is dead; its members leave.
    #[serde(with = "secs")]
    pub presence_lease_secs: Duration,
    /// Redis replicas that must confirm a message (`WAIT`) before it is acked; 0 = stored on
    /// the master is enough.
    pub replicas_to_ack: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    pub max_frame_bytes: usize,
    pub max_message_chars: usize,
    pub messages_per_sec: u32,
    pub burst: u32,
    pub max_violations: u32,
    /// 0 means "the open-file limit minus a reserve", worked out at start-up.
    pub max_connections: usize,
    pub session_queue: usize,
    pub session_queue_bytes: usize,
    /// Open sessions per client address; 0 = no limit.
    pub max_connections_per_ip: usize,
    /// WebSocket upgrades a client address may start per second; 0 = no limit.
    pub upgrades_per_ip_per_sec: u32,
    /// TCP connections of one client address that are not sessions (handshakes in progress,
    /// plain HTTP), counted from the accept; 0 = no limit.
    pub handshakes_per_ip: usize,
    /// Messages per second all sessions of one client address may send together (burst
    /// twice that); 0 = no limit.
    pub messages_per_sec_per_ip: u32,
    /// Messages per second all sessions of one user (with auth on) may send together (burst
    /// twice that); 0 = no limit.
    pub messages_per_sec_per_user: u32,
    /// Distinct rooms the sessions of one client address may be in at once; 0 = no limit.
    pub rooms_per_ip: usize,
    /// Rooms one connection may be subscribed to at once, its path room included
    /// (docs/PROTOCOL.md §4); a `subscribe` over it gets `error too_many_rooms`.
    pub rooms_per_connection: usize,
    /// Most messages one resume replays; a longer one is `recovered:false` (docs/PROTOCOL.md §9).
    pub resume_max_messages: u64,
    /// Rooms with more members than this on a replica send no join/leave frames.
    pub join_events_max_members: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    pub size: usize,
    #[serde(with = "secs")]
    pub ttl_secs: Duration,
    /// How long a room that never got a message outlives its last member.
    #[serde(with = "secs")]
    pub empty_room_ttl_secs: Duration,
}

/// Where history outlives the bus (docs/design.md, "The store").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `sqlite:PATH`, `postgres://user:pass@host:port/db`, `memory`, or empty: the bus's
    /// default (`sqlite:data/confab.db` with the embedded bus, none with Redis).
    pub url: String,
    /// Messages older than this many days are deleted; 0 keeps them forever.
    pub retention_days: u64,
    /// How often the retention sweep runs.
    #[serde(with = "secs")]
    pub retention_sweep_secs: Duration,
    /// Database connections the store keeps open (one writer, the rest for history reads).
    pub pool_size: u32,
    /// How long a store call waits for a connection (the database down or refusing them)
    /// before it fails and the client gets `error unavailable`.
    #[serde(with = "millis")]
    pub acquire_timeout_ms: Duration,
    /// How long the embedded bus waits for a commit before it answers the batch
    /// `unavailable` and reloads its rooms (a database that never answers).
    #[serde(with = "millis")]
    pub commit_timeout_ms: Duration,
    /// With Redis and PostgreSQL: how often each replica's archiver copies new messages of
    /// the rooms it leases into PostgreSQL (docs/design.md, "The archive").
    #[serde(with = "millis")]
    pub archive_interval_ms: Duration,
    /// How long an archiver's lease on a room lasts without renewal: a killed replica's rooms
    /// are taken over after at most this long.
    #[serde(with = "millis")]
    pub archive_lease_ms: Duration,
    /// Most messages one archiver pass copies, shared by the rooms it claims (each at least
    /// 100), so one transaction stays bounded also when every room is behind.
    pub archive_batch: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            retention_days: 0,
            retention_sweep_secs: Duration::from_secs(3600),
            pool_size: 4,
            acquire_timeout_ms: Duration::from_millis(2000),
            commit_timeout_ms: Duration::from_millis(5000),
            archive_interval_ms: Duration::from_millis(100),
            archive_lease_ms: Duration::from_millis(5000),
            archive_batch: 5000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketSettings {
    #[serde(with = "secs")]
    pub ping_interval_secs: Duration,
    #[serde(with = "secs")]
    pub client_timeout_secs: Duration,
    /// Serves `/echo`, a plain echo endpoint with the same frame handling as `/ws/{room}`, for
    /// WebSocket conformance suites (Autobahn). Off in production.
    pub echo_endpoint: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            node_id: String::new(),
            allowed_origins: Vec::new(),
            shutdown_grace_secs: Duration::from_secs(30),
            workers: 0,
            room_threads: 0,
            trusted_proxies: Vec::new(),
            handshake_timeout_secs: Duration::from_secs(10),
        }
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            prefix: "confab".into(),
            command_timeout_ms: Duration::from_millis(2000),
            join_retry_ms: Duration::from_millis(5000),
            presence_lease_secs: Duration::from_secs(15),
            replicas_to_ack: 0,
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_frame_bytes: 65536,
            max_message_chars: 4000,
            messages_per_sec: 10,
            burst: 20,
            max_violations: 50,
            max_connections: 0,
            session_queue: 1024,
            session_queue_bytes: 4 << 20,
            max_connections_per_ip: 1000,
            upgrades_per_ip_per_sec: 50,
            handshakes_per_ip: 64,
            messages_per_sec_per_ip: 200,
            messages_per_sec_per_user: 30,
            rooms_per_ip: 200,
            rooms_per_connection: 100,
            resume_max_messages: 10000,
            join_events_max_members: 100,
        }
    }
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            size: 1000,
            ttl_secs: Duration::from_secs(86400),
            empty_room_ttl_secs: Duration::from_secs(60),
        }
    }
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        Self {
            ping_interval_secs: Duration::from_secs(25),
            client_timeout_secs: Duration::from_secs(60),
            echo_endpoint: false,
        }
    }
}

/// A duration under a `_secs` key: whole seconds in files, the environment and `confab config`
/// (SPEC §2 names the keys), a `Duration` in the code.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// A duration under a `_ms` key: whole milliseconds outside, a `Duration` in the code.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        // Read from a whole number of milliseconds, so it fits back in one.
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Why the settings could not be loaded. Always names the key or the file.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("setting `{key}` ({origin}): {message}")]
    Key {
        key: String,
        origin: String,
        message: String,
    },
}

fn key_error(key: &str, origin: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::Key {
        key: key.to_owned(),
        origin: origin.to_owned(),
        message: message.into(),
    }
}

/// What the command line may override; `None` leaves the lower layers alone.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub listen: Option<String>,
    pub redis_url: Option<String>,
}

impl Settings {
    /// Loads all layers: defaults, the file, the given environment, the command line.
    pub fn load(
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut table = defaults_table();
        if let Some(path) = &overrides.config_file {
            let file = read_file(path)?;
            merge_file(&mut table, file, &path.display().to_string())?;
        }
        merge_env(&mut table, env)?;
        if let Some(listen) = &overrides.listen {
            set(
                &mut table,
                "server",
                "listen",
                Value::String(listen.clone()),
            );
        }
        if let Some(url) = &overrides.redis_url {
            set(&mut table, "redis", "url", Value::String(url.clone()));
        }
        let settings: Settings = Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| key_error("?", "merged settings", e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks relations and ranges that types alone cannot express: the rules of [`RULES`] in
    /// order, reporting the first that fails under its key.
    fn validate(&self) -> Result<(), SettingsError> {
        for rule in RULES {
            rule.check(self)
                .map_err(|message| key_error(rule.key, "value", message))?;
        }
        Ok(())
    }

    /// What `store.url` names once the bus's default is applied.
    pub fn store_kind(&self) -> crate::store::StoreKind {
        crate::store::StoreKind::parse(&self.store.url, self.redis.url.is_empty())
            // Validated at load.
            .unwrap_or(crate::store::StoreKind::None)
    }

    /// The settings as TOML, for `confab config`; secrets are shown as `***` so the output
    /// can be pasted into a bug report: the secret keys, and the password of every URL-valued
    /// setting (found by value, so a URL setting added later is masked too).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        for secret in [&mut shown.api.key, &mut shown.auth.jwt_secret] {
            if !secret.is_empty() {
                *secret = "***".into();
            }
        }
        // Masked as a TOML value, then printed from the struct again, so sections and keys
        // keep their order (a `toml::Table` would sort them).
        let masked = Value::try_from(&shown).ok().and_then(|mut value| {
            mask_urls(&mut value);
            value.try_into::<Settings>().ok()
        });
        // Serializing and reading back a valid `Settings` cannot fail; if it ever did, print
        // nothing rather than an unmasked URL.
        masked
            .and_then(|m| toml::to_string_pretty(&m).ok())
            .unwrap_or_default()
    }
}

/// One check made at load, and the key its failure names.
struct Rule {
    key: &'static str,
    check: Check,
}

enum Check {
    /// The value must be greater than 0: a size, rate or duration of nothing is a mistake.
    Positive(fn(&Settings) -> u64),
    /// Likewise for a duration.
    PositiveDuration(fn(&Settings) -> Duration),
    /// Anything else; the error says what is wrong.
    Holds(fn(&Settings) -> Result<(), String>),
}

impl Rule {
    const fn positive(key: &'static str, value: fn(&Settings) -> u64) -> Self {
        Self {
            key,
            check: Check::Positive(value),
        }
    }

    const fn positive_duration(key: &'static str, value: fn(&Settings) -> Duration) -> Self {
        Self {
            key,
            check: Check::PositiveDuration(value),
        }
    }

    const fn holds(key: &'static str, check: fn(&Settings) -> Result<(), String>) -> Self {
        Self {
            key,
            check: Check::Holds(check),
        }
    }

    fn check(&self, settings: &Settings) -> Result<(), String> {
        match self.check {
            Check::Positive(value) if value(settings) == 0 => Err("must be greater than 0".into()),
            Check::PositiveDuration(value) if value(settings).is_zero() => {
                Err("must be greater than 0".into())
            }
            Check::Positive(_) | Check::PositiveDuration(_) => Ok(()),
            Check::Holds(check) => check(settings),
        }
    }
}

/// Every check of [`Settings::validate`], in the order they are made: when several fail, the
/// first is the one reported (the positive checks come before the minimums, so a 0 is told
/// "greater than 0").
const RULES: &[Rule] = &[
    Rule::holds("server.listen", |s| {
        match s.server.listen.parse::<SocketAddr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("`{}` is not an address:port", s.server.listen)),
        }
    }),
    Rule::positive("limits.max_frame_bytes", |s| {
        s.limits.max_frame_bytes as u64
    }),
    Rule::positive("limits.max_message_chars", |s| {
        s.limits.max_message_chars as u64
    }),
    Rule::positive("limits.messages_per_sec", |s| {
        u64::from(s.limits.messages_per_sec)
    }),
    Rule::positive("limits.burst", |s| u64::from(s.limits.burst)),
    Rule::positive("limits.resume_max_messages", |s| {
        s.limits.resume_max_messages
    }),
    Rule::positive("limits.session_queue", |s| s.limits.session_queue as u64),
    Rule::positive("limits.rooms_per_connection", |s| {
        s.limits.rooms_per_connection as u64
    }),
    Rule::positive("limits.session_queue_bytes", |s| {
        s.limits.session_queue_bytes as u64
    }),
    Rule::positive("history.size", |s| s.history.size as u64),
    Rule::positive_duration("api.key_failure_window_secs", |s| {
        s.api.key_failure_window_secs
    }),
    Rule::positive_duration("redis.command_timeout_ms", |s| s.redis.command_timeout_ms),
    Rule::positive_duration("redis.join_retry_ms", |s| s.redis.join_retry_ms),
    Rule::positive_duration("redis.presence_lease_secs", |s| s.redis.presence_lease_secs),
    Rule::positive_duration("history.ttl_secs", |s| s.history.ttl_secs),
    Rule::positive_duration("history.empty_room_ttl_secs", |s| {
        s.history.empty_room_ttl_secs
    }),
    Rule::positive_duration("server.handshake_timeout_secs", |s| {
        s.server.handshake_timeout_secs
    }),
    Rule::positive_duration("websocket.ping_interval_secs", |s| {
        s.websocket.ping_interval_secs
    }),
    Rule::positive_duration("websocket.client_timeout_secs", |s| {
        s.websocket.client_timeout_secs
    }),
    Rule::positive_duration("store.retention_sweep_secs", |s| {
        s.store.retention_sweep_secs
    }),
    Rule::positive("store.pool_size", |s| u64::from(s.store.pool_size)),
    Rule::positive_duration("store.acquire_timeout_ms", |s| s.store.acquire_timeout_ms),
    Rule::positive_duration("store.commit_timeout_ms", |s| s.store.commit_timeout_ms),
    Rule::positive_duration("store.archive_interval_ms", |s| s.store.archive_interval_ms),
    Rule::holds("store.archive_lease_ms", |s| {
        match s.store.archive_lease_ms > s.store.archive_interval_ms * 2 {
            true => Ok(()),
            false => Err(
                "must be more than twice store.archive_interval_ms, or a lease runs \
                          out between two passes of the archiver that holds it"
                    .into(),
            ),
        }
    }),
    Rule::positive("store.archive_batch", |s| s.store.archive_batch),
    Rule::holds("limits.max_frame_bytes", |s| {
        at_least(
            s.limits.max_frame_bytes,
            1024,
            "must be at least 1024 so a maximal chat message fits",
        )
    }),
    Rule::holds("websocket.client_timeout_secs", |s| {
        if s.websocket.client_timeout_secs > s.websocket.ping_interval_secs {
            return Ok(());
        }
        Err("must be longer than websocket.ping_interval_secs, or every client times out".into())
    }),
    Rule::holds("redis.url", redis_url_usable),
    Rule::holds("redis.prefix", |s| {
        let prefix = &s.redis.prefix;
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':');
        if !prefix.is_empty() && prefix.bytes().all(allowed) {
            return Ok(());
        }
        Err(
            "must be letters, digits, '_', '-', '.' or ':' (it starts every key and channel)"
                .into(),
        )
    }),
    Rule::holds("limits.session_queue_bytes", |s| {
        at_least(
            s.limits.session_queue_bytes,
            65536,
            "must be at least 65536",
        )
    }),
    Rule::holds("server.trusted_proxies", |s| {
        for (i, cidr) in s.server.trusted_proxies.iter().enumerate() {
            if let Err(e) = cidr.parse::<crate::net::Cidr>() {
                return Err(format!("entry {} `{cidr}`: {e}", i + 1));
            }
        }
        Ok(())
    }),
    Rule::holds("auth.jwt_public_key_file", |s| {
        let file = &s.auth.jwt_public_key_file;
        if file.is_empty() {
            return Ok(());
        }
        crate::auth::read_public_key(file)
            .map(drop)
            .map_err(|e| e.to_string())
    }),
    Rule::holds("store.url", store_url_usable),
    Rule::holds("limits.session_queue", |s| {
        at_least(s.limits.session_queue, 8, "must be at least 8")
    }),
];

fn at_least(value: usize, min: usize, message: &str) -> Result<(), String> {
    if value < min {
        return Err(message.into());
    }
    Ok(())
}

/// `redis.url`, when set, has a Redis scheme and parses as fred's config.
fn redis_url_usable(settings: &Settings) -> Result<(), String> {
    const SCHEMES: [&str; 6] = [
        "redis://",
        "rediss://",
        "redis-sentinel://",
        "rediss-sentinel://",
        "redis-cluster://",
        "rediss-cluster://",
    ];
    let url = &settings.redis.url;
    if url.is_empty() {
        return Ok(());
    }
    let parsed = if SCHEMES.iter().any(|s| url.starts_with(s)) {
        fred::types::config::Config::from_url(url)
            .map(drop)
            .map_err(|e| e.to_string())
    } else {
        Err(format!("the scheme must be one of {}", SCHEMES.join(", ")))
    };
    parsed.map_err(|e| format!("not a usable Redis URL: {e}"))
}

/// `store.url` must name a store this bus can use: replicas on Redis cannot share a SQLite
/// file (PostgreSQL beside Redis is the archive).
fn store_url_usable(settings: &Settings) -> Result<(), String> {
    use crate::store::StoreKind;
    let embedded = settings.redis.url.is_empty();
    match StoreKind::parse(&settings.store.url, embedded) {
        Err(e) => Err(e.to_string()),
        Ok(StoreKind::Sqlite(_)) if !embedded => Err(
            "a SQLite file cannot be shared by replicas on Redis: use postgres://… or leave it \
             empty"
                .into(),
        ),
        Ok(_) => Ok(()),
    }
}

/// Masks the password in every string of `value` that is a URL.
fn mask_urls(value: &mut Value) {
    match value {
        Value::String(s) if s.contains("://") => *s = mask_url(s),
        Value::Table(t) => t.iter_mut().for_each(|(_, v)| mask_urls(v)),
        Value::Array(a) => a.iter_mut().for_each(mask_urls),
        _ => {}
    }
}

/// A URL with its secrets replaced by `***`, for output and logs: the password of its
/// user-info (`redis://user:***@host`; user-info without `:` may be a bare password, so it is
/// masked whole) and every query parameter whose name mentions a password or secret
/// (`sentinelPassword=***`, PostgreSQL's `password=***`). Hosts, ports and paths stay, since
/// they are what a bug report needs.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
    let (before_query, query) = rest.split_at(query_at);
    // The last `@` before the query ends the user-info: a password may hold `/` or `@`.
    let location = match before_query.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("***@{host}"),
        },
        None => before_query.to_owned(),
    };
    let query = match query.strip_prefix('?') {
        Some(pairs) => {
            let (pairs, fragment) = match pairs.split_once('#') {
                Some((p, f)) => (p, format!("#{f}")),
                None => (pairs, String::new()),
            };
            let masked: Vec<String> = pairs
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if is_secret_name(name) => format!("{name}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("?{}{fragment}", masked.join("&"))
        }
        None => query.to_owned(),
    };
    format!("{scheme}://{location}{query}")
}

fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "passwd", "secret", "token"]
        .iter()
        .any(|s| name.contains(s))
}

fn defaults_table() -> Table {
    match Value::try_from(Settings::default()) {
        Ok(Value::Table(t)) => t,
        _ => Table::new(),
    }
}

fn read_file(path: &Path) -> Result<Table, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<Table>().map_err(|e| SettingsError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn set(table: &mut Table, section: &str, key: &str, value: Value) {
    if let Some(Value::Table(s)) = table.get_mut(section) {
        s.insert(key.to_owned(), value);
    }
}

/// The default value at `section.key`, or an error naming the unknown key.
fn default_at<'t>(
    table: &'t Table,
    section: &str,
    key: &str,
    origin: &str,
) -> Result<&'t Value, SettingsError> {
    let name = format!("{section}.{key}");
    match table.get(section) {
        Some(Value::Table(s)) => s
            .get(key)
            .ok_or_else(|| key_error(&name, origin, "unknown setting")),
        _ => Err(key_error(
            &name,
            origin,
            format!("unknown section `{section}`"),
        )),
    }
}

fn merge_file(table: &mut Table, file: Table, origin: &str) -> Result<(), SettingsError> {
    for (section, body) in file {
        let Value::Table(body) = body else {
            return Err(key_error(&section, origin, "expected a [section] table"));
        };
        for (key, value) in body {
            let name = format!("{section}.{key}");
            let default = default_at(table, &section, &key, origin)?;
            let value = conform(default, value).map_err(|m| key_error(&name, origin, m))?;
            set(table, &section, &key, value);
        }
    }
    Ok(())
}

/// Accepts `value` where `default` stands only if it has the same type (and is not negative,
/// since every number confab takes is a count or a duration).
fn conform(default: &Value, value: Value) -> Result<Value, String> {
    match (default, &value) {
        (Value::Integer(_), Value::Integer(i)) if *i < 0 => {
            Err(format!("must not be negative, got {i}"))
        }
        (Value::Integer(_), Value::Integer(_))
        | (Value::String(_), Value::String(_))
        | (Value::Boolean(_), Value::Boolean(_)) => Ok(value),
        (Value::Array(_), Value::Array(items)) if items.iter().all(Value::is_str) => Ok(value),
        _ => Err(format!(
            "expected {}, got {}",
            describe(default),
            describe(&value)
        )),
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Integer(_) => "a whole number",
        Value::String(_) => "a string",
        Value::Boolean(_) => "true or false",
        Value::Array(_) => "a list of strings",
        Value::Float(_) => "a decimal number",
        Value::Datetime(_) => "a date",
        Value::Table(_) => "a table",
    }
}

fn merge_env(
    table: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), SettingsError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if name == ENV_CONFIG_FILE {
            continue;
        }
        let Some((section, key)) = rest.split_once("__") else {
            return Err(key_error(
                &name,
                "environment",
                "expected CONFAB_<SECTION>__<KEY>, e.g. CONFAB_SERVER__LISTEN",
            ));
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let origin = format!("environment {name}");
        let full = format!("{section}.{key}");
        let default = default_at(table, &section, &key, &origin)?;
        let value = parse_env_value(default, &raw).map_err(|m| key_error(&full, &origin, m))?;
        set(table, &section, &key, value);
    }
    Ok(())
}

/// Reads an environment string as the type the default has: lists are comma-separated.
fn parse_env_value(default: &Value, raw: &str) -> Result<Value, String> {
    let raw = raw.trim();
    match default {
        Value::Integer(_) => match raw.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(Value::Integer(n)),
            _ => Err(format!("expected a whole number, got `{raw}`")),
        },
        Value::Boolean(_) => match raw {
            "true" | "1" | "yes" => Ok(Value::Boolean(true)),
            "false" | "0" | "no" => Ok(Value::Boolean(false)),
            _ => Err(format!("expected true or false, got `{raw}`")),
        },
        Value::Array(_) => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        )),
        _ => Ok(Value::String(raw.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A settings file holding `text`, deleted when dropped.
    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .prefix("confab-settings-")
            .suffix(".toml")
            .tempfile()
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_need_no_file() {
        let s = Settings::load(&Overrides::default(), env(&[])).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.server.listen, "0.0.0.0:8080");
        assert_eq!(s.limits.session_queue, 1024);
    }

    #[test]
    fn later_layers_win() {
        let f = file(
            "[server]\nlisten = \"127.0.0.1:1\"\nshutdown_grace_secs = 5\n[history]\nsize = 10\n",
        );
        let o = Overrides {
            config_file: Some(f.path().to_owned()),
            listen: Some("127.0.0.1:3".into()),
            ..Default::default()
        };
        let s = Settings::load(
            &o,
            env(&[
                ("CONFAB_HISTORY__SIZE", "20"),
                ("CONFAB_SERVER__LISTEN", "127.0.0.1:2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:3", "flag beats env and file");
        assert_eq!(s.history.size, 20, "env beats file");
        assert_eq!(
            s.server.shutdown_grace_secs,
            Duration::from_secs(5),
            "file beats default"
        );
    }

    #[test]
    fn env_lists_are_comma_separated() {
        let s = Settings::load(
            &Overrides::default(),
            env(&[(
                "CONFAB_SERVER__ALLOWED_ORIGINS",
                "https://a.example, https://b.example",
            )]),
        )
        .unwrap();
        assert_eq!(
            s.server.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn unknown_file_key_is_named() {
        let f = file("[limits]\nburts = 3\n");
        let o = Overrides {
            config_file: Some(f.path().to_owned()),
            ..Default::default()
        };
        let e = Settings::load(&o, env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("limits.burts") && e.contains("unknown setting"),
            "{e}"
        );
    }

    #[test]
    fn unknown_section_is_named() {
        let f = file("[limit]\nburst = 3\n");
        let o = Overrides {
            config_file: Some(f.path().to_owned()),
            ..Default::default()
        };
        let e = Settings::load(&o, env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("limit.burst") && e.contains("unknown section"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let f = file("[history]\nsize = \"big\"\n");
        let o = Overrides {
            config_file: Some(f.path().to_owned()),
            ..Default::default()
        };
        let e = Settings::load(&o, env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("history.size") && e.contains("whole number"),
            "{e}"
        );
    }

    #[test]
    fn bad_env_value_is_named() {
        let e = Settings::load(
            &Overrides::default(),
            env(&[("CONFAB_LIMITS__BURST", "-1")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("limits.burst") && e.contains("CONFAB_LIMITS__BURST"),
            "{e}"
        );
        let e = Settings::load(&Overrides::default(), env(&[("CONFAB_NOPE__X", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.x"), "{e}");
    }

    #[test]
    fn unrelated_environment_is_ignored() {
        assert!(Settings::load(
            &Overrides::default(),
            env(&[("PATH", "/bin"), ("CONFAB_CONFIG", "x")])
        )
        .is_ok());
    }

    #[test]
    fn invalid_values_are_named() {
        let e = Settings::load(
            &Overrides::default(),
            env(&[("CONFAB_SERVER__LISTEN", "nowhere")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("server.listen"), "{e}");
        let e = Settings::load(
            &Overrides::default(),
            env(&[("CONFAB_WEBSOCKET__CLIENT_TIMEOUT_SECS", "10")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("websocket.client_timeout_secs"), "{e}");
    }

    #[test]
    fn redis_url_is_checked_at_load() {
        let ok = Settings::load(
            &Overrides::default(),
            env(&[("CONFAB_REDIS__URL", "redis://127.0.0.1:6379")]),
        );
        assert!(ok.is_ok());
        let e = Settings::load(
            &Overrides::default(),
            env(&[("CONFAB_REDIS__URL", "http://nope")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("redis.url"), "{e}");
        let e = Settings::load(
            &Overrides::default(),
            env(&[("CONFAB_REDIS__PREFIX", "a b")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("redis.prefix"), "{e}");
    }

    #[test]
    fn redis_url_flag_beats_the_environment() {
        let o = Overrides {
            redis_url: Some("redis://127.0.0.1:7000".into()),
            ..Default::default()
        };
        let s =
            Settings::load(&o, env(&[("CONFAB_REDIS__URL", "redis://127.0.0.1:6379")])).unwrap();
        assert_eq!(s.redis.url, "redis://127.0.0.1:7000");
    }

    #[test]
    fn the_api_key_is_a_setting_and_is_not_printed() {
        let s = Settings::load(&Overrides::default(), env(&[("CONFAB_API__KEY", "k1")])).unwrap();
        assert_eq!(s.api.key, "k1");
        let shown = s.to_toml();
        assert!(shown.contains("key = \"***\""), "{shown}");
        assert!(!shown.contains("k1"), "{shown}");
    }

    #[test]
    fn url_passwords_are_masked_and_the_rest_kept() {
        let cases = [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://u:p@h:1/0", "redis://u:***@h:1/0"),
            ("rediss://:p@h", "rediss://:***@h"),
            ("redis://p@h", "redis://***@h"),
            ("redis://u:p/a@ss@h:1", "redis://u:***@h:1"),
            (
                "redis-sentinel://u:p@s1:26379,s2:26379/0?sentinelServiceName=m&sentinelPassword=q",
                "redis-sentinel://u:***@s1:26379,s2:26379/0?sentinelServiceName=m&sentinelPassword=***",
            ),
            ("redis-cluster://u:p@c1:7000,c2:7001", "redis-cluster://u:***@c1:7000,c2:7001"),
            (
                "postgres://app:p@db:5432/chat?sslmode=require&password=q#x",
                "postgres://app:***@db:5432/chat?sslmode=require&password=***#x",
            ),
            ("sqlite:data/confab.db", "sqlite:data/confab.db"),
        ];
        for (url, masked) in cases {
            assert_eq!(mask_url(url), masked, "{url}");
        }
    }

    #[test]
    fn every_url_valued_setting_is_printed_masked() {
        let s = Settings::load(
            &Overrides::default(),
            env(&[
                ("CONFAB_REDIS__URL", "redis://u:hunter2@h:1"),
                (
                    "CONFAB_SERVER__ALLOWED_ORIGINS",
                    "https://u:hunter3@app.example",
                ),
            ]),
        )
        .unwrap();
        let shown = s.to_toml();
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("redis://u:***@h:1"), "{shown}");
    }

    #[test]
    fn the_store_defaults_to_a_sqlite_file_with_the_embedded_bus_and_none_with_redis() {
        use crate::store::StoreKind;
        let s = Settings::load(&Overrides::default(), env(&[])).unwrap();
        assert_eq!(
            s.store_kind(),
            StoreKind::Sqlite("sqlite:data/confab.db".into())
        );
        let s = Settings::load(
            &Overrides::default(),
            env(&[("CONFAB_REDIS__URL", "redis://127.0.0.1:6379")]),
        )
        .unwrap();
        assert_eq!(s.store_kind(), StoreKind::None);
        let s = Settings::load(
            &Overrides::default(),
            env(&[("CONFAB_STORE__URL", "memory")]),
        )
        .unwrap();
        assert_eq!(s.store_kind(), StoreKind::Memory);
    }

    #[test]
    fn a_sqlite_store_with_redis_or_an_unknown_scheme_is_refused_naming_store_url() {
        for (redis, store) in [
            ("redis://127.0.0.1:6379", "sqlite:data/confab.db"),
            ("", "mysql://h/db"),
            ("", "sqlite:"),
        ] {
            let e = Settings::load(
                &Overrides::default(),
                env(&[("CONFAB_REDIS__URL", redis), ("CONFAB_STORE__URL", store)]),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("store.url"), "{redis} {store}: {e}");
        }
    }

    #[test]
    fn postgresql_beside_redis_is_the_archive_and_its_lease_must_outlast_two_passes() {
        let redis = ("CONFAB_REDIS__URL", "redis://127.0.0.1:6379");
        let pg = ("CONFAB_STORE__URL", "postgres://u:p@h:5432/db");
        let s = Settings::load(&Overrides::default(), env(&[redis, pg])).unwrap();
        assert_eq!(
            s.store_kind(),
            crate::store::StoreKind::Postgres("postgres://u:p@h:5432/db".into())
        );
        let short = ("CONFAB_STORE__ARCHIVE_LEASE_MS", "150");
        let e = Settings::load(&Overrides::default(), env(&[redis, pg, short]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.archive_lease_ms"), "{e}");
    }

    #[test]
    fn every_validation_rule_names_a_setting() {
        let defaults = defaults_table();
        for rule in RULES {
            let (section, key) = rule.key.split_once('.').unwrap();
            assert!(
                default_at(&defaults, section, key, "test").is_ok(),
                "{} names no setting",
                rule.key
            );
        }
    }

    #[test]
    fn zero_is_refused_for_every_setting_that_must_be_positive_naming_it() {
        let positive = RULES
            .iter()
            .filter(|r| matches!(r.check, Check::Positive(_) | Check::PositiveDuration(_)));
        let mut checked = 0;
        for rule in positive {
            let var = format!(
                "CONFAB_{}",
                rule.key.to_ascii_uppercase().replace('.', "__")
            );
            let e = Settings::load(&Overrides::default(), env(&[(&var, "0")]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(rule.key) && e.contains("greater than 0"),
                "{var}=0: {e}"
            );
            checked += 1;
        }
        assert_eq!(
            checked, 24,
            "every positive rule of the old list is kept, the archive's, rooms_per_connection \
             and the store's acquire timeout"
        );
    }

    #[test]
    fn durations_are_read_and_printed_as_whole_numbers_under_their_secs_and_ms_keys() {
        let f = file("[server]\nshutdown_grace_secs = 7\n[redis]\njoin_retry_ms = 1500\n");
        let o = Overrides {
            config_file: Some(f.path().to_owned()),
            ..Default::default()
        };
        let s = Settings::load(&o, env(&[("CONFAB_WEBSOCKET__PING_INTERVAL_SECS", "9")])).unwrap();
        assert_eq!(s.server.shutdown_grace_secs, Duration::from_secs(7));
        assert_eq!(s.redis.join_retry_ms, Duration::from_millis(1500));
        assert_eq!(s.websocket.ping_interval_secs, Duration::from_secs(9));
        let shown = s.to_toml();
        for line in [
            "shutdown_grace_secs = 7\n",
            "join_retry_ms = 1500\n",
            "ping_interval_secs = 9\n",
            "command_timeout_ms = 2000\n",
        ] {
            assert!(shown.contains(line), "{line}: {shown}");
        }
        let e = Settings::load(
            &Overrides::default(),
            env(&[("CONFAB_SERVER__SHUTDOWN_GRACE_SECS", "30s")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("server.shutdown_grace_secs") && e.contains("whole number"),
            "{e}"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let o = Overrides {
            config_file: Some(PathBuf::from("/nonexistent/confab.toml")),
            ..Default::default()
        };
        let e = Settings::load(&o, env(&[])).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/confab.toml"), "{e}");
    }

    #[test]
    fn shipped_default_file_matches_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let shipped: Settings = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(shipped, Settings::default());
        let o = Overrides {
            config_file: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml")),
            ..Default::default()
        };
        assert!(Settings::load(&o, env(&[])).is_ok());
    }
}
