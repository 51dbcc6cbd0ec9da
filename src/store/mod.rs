//! The store: where a room's history outlives the bus (docs/design.md, "The store").
//!
//! One small interface, [`Store`], with two implementations that pass the same test suite
//! (`tests/it/store.rs`): [`sqlite::SqliteStore`], a file (the default with the embedded bus)
//! and [`postgres::PostgresStore`]. `store.url = memory` has no store at all: the embedded
//! bus keeps history in the process only, as it always did.
//!
//! What the store holds:
//! - `messages`: one row per chat message, keyed by (room, epoch, offset), with its time, its
//!   sender and `ref` (so repeated refs are still recognised after a restart) and the
//!   `message` frame exactly as it was delivered, so a page read from the store is byte for
//!   byte what the bus's in-memory window would have served;
//! - `rooms`: each room's current epoch, latest offset and `base` (where a renewed epoch's own
//!   messages start), so a restart keeps every room's epoch and offsets.
//!
//! Promises every implementation keeps:
//! - [`Store::append`] is one transaction: every row and room of the batch, or none. The
//!   embedded bus hands it everything it gathered while the previous commit ran (group
//!   commit) and acks only after it resolved;
//! - appending a row that is already there (same room, epoch and offset) changes nothing, so a
//!   writer that retries, or two archivers that copy the same message, are harmless;
//!   [`Store::append_checked`] reports the rows that were already there with *another* frame
//!   (an offset handed out twice: the archive keeps the first, docs/design.md "The archive");
//! - a room's head never goes back within an epoch: a write of an older head of the same epoch
//!   is ignored (an archiver that lost its lease while paused commits late; a room is seeded
//!   from this head when Redis comes back empty, so a lower one would hand offsets out twice);
//!   its `seen` head keeps the highest written in the epoch too;
//! - a head of another epoch replaces the row only if its `seen_at_ms` is not older than the
//!   row's (a late commit of an epoch that was renewed meanwhile does not bring it back);
//! - pages are read within one epoch, in offset order;
//! - [`Store::delete_before`] deletes messages only; rooms keep their heads, so offsets go on
//!   after retention emptied a room.
//!
//! The schema is versioned by sqlx's migrator (`migrations/<backend>/`, numbered, never
//! edited once landed): [`open`] migrates at start, `confab migrate` does only that, and a
//! database migrated by a newer binary is refused with both version numbers.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use crate::bus::StoredMessage;
use crate::domain::{Epoch, Offset, RoomName, UserId};

/// What a store call resolves to.
pub type StoreFuture<T> = BoxFuture<'static, Result<T, StoreError>>;

/// Shared handle to the store chosen at start-up.
pub type SharedStore = Arc<dyn Store>;

/// Why the store could not be opened or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store.url: cannot open {url}: {message}")]
    Open { url: String, message: String },
    #[error(
        "store.url: the database {url} has schema version {found}, newer than this binary's \
         {known}: run a newer confab, or restore a backup made for this one"
    )]
    SchemaTooNew { url: String, found: i64, known: i64 },
    #[error("store.url: migrating {url} failed: {message}")]
    Migrate { url: String, message: String },
    #[error("store error: {0}")]
    Query(String),
    /// No connection within `store.acquire_timeout_ms`: the database is down, refuses
    /// connections, or every connection is busy.
    #[error(
        "store error: no database connection within store.acquire_timeout_ms (the database \
         is down, refuses connections, or every connection is busy)"
    )]
    Unreachable,
    #[error("store.url: {0}")]
    BadUrl(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => StoreError::Unreachable,
            e => StoreError::Query(e.to_string()),
        }
    }
}

/// One chat message as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub room: RoomName,
    pub epoch: Epoch,
    pub offset: Offset,
    /// Milliseconds since the Unix epoch, as in the frame's `ts`: retention counts from it.
    pub ts: u64,
    pub user: UserId,
    pub reference: Option<String>,
    /// The `message` frame, serialized once when it was published.
    pub frame: ByteString,
}

/// A room's head as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomState {
    pub room: RoomName,
    pub epoch: Epoch,
    /// Latest offset of the epoch, 0 when it has no message yet.
    pub offset: Offset,
    /// The epoch's own messages are those after `base` (0 unless the epoch was renewed).
    pub base: Offset,
    /// The newest offset of the epoch the writer saw handed out, at or above `offset`: the
    /// Redis archive's head at the claim, which may be ahead of what it copied. A room seeded
    /// from a head with `seen > offset` starts a new epoch after `seen` (docs/design.md, "The
    /// archive"). The embedded bus writes `offset`.
    pub seen: Offset,
    /// The writer's clock (ms) when it saw the head: Redis's `TIME` at the claim, or the
    /// embedded bus's own. Orders epochs: a head of another epoch replaces the row only if
    /// it is not older.
    pub seen_at_ms: u64,
}

/// What one transaction writes: rows, and the heads of the rooms they moved (also a room
/// whose epoch was renewed, with no row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Append {
    pub rows: Vec<Row>,
    pub rooms: Vec<RoomState>,
}

/// A row [`Store::append_checked`] found already there with another frame: its offset was
/// handed out twice in the epoch (Redis came back older and reused it). The store keeps the
/// first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub room: RoomName,
    pub epoch: Epoch,
    pub offset: Offset,
}

/// Which page of one epoch to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The oldest `limit` messages with `since < offset <= until` (a resume, page by page).
    After {
        since: Offset,
        until: Offset,
        limit: usize,
    },
    /// The latest `limit` messages with `offset < before` (a history page), oldest first.
    Before { before: Offset, limit: usize },
}

/// A message sent with a `ref`, for recognising a retry after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentRef {
    pub user: UserId,
    pub reference: String,
    pub offset: Offset,
    pub ts: u64,
}

/// The seam between the bus and durable history (see the module doc).
pub trait Store: Send + Sync + 'static {
    /// Writes the batch in one transaction.
    fn append(&self, batch: Append) -> StoreFuture<()> {
        self.append_checked(batch)
            .map(|done| done.map(drop))
            .boxed()
    }

    /// [`Store::append`], and reports the rows whose key was already there with another
    /// frame (kept as it was), in no particular order. Rows already there with the same
    /// frame (a retry, two archivers) are no conflict.
    fn append_checked(&self, batch: Append) -> StoreFuture<Vec<Conflict>>;

    /// The room's head, `None` for a room the store never saw.
    fn head(&self, room: &RoomName) -> StoreFuture<Option<RoomState>>;

    /// One page of the epoch's messages, oldest first.
    fn page(&self, room: &RoomName, epoch: &Epoch, page: Page) -> StoreFuture<Vec<StoredMessage>>;

    /// Messages of the epoch with a `ref`, sent at `since_ts` or later.
    fn recent_refs(
        &self,
        room: &RoomName,
        epoch: &Epoch,
        since_ts: u64,
    ) -> StoreFuture<Vec<RecentRef>>;

    /// Deletes messages older than `ts` (retention); returns how many.
    fn delete_before(&self, ts: u64) -> StoreFuture<u64>;
}

/// What `store.url` names (after the bus's default was applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// No store: history lives in the bus only.
    None,
    /// `memory`: the embedded bus's in-process history only.
    Memory,
    /// `sqlite:PATH`.
    Sqlite(String),
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
}

impl StoreKind {
    /// Reads `store.url`; `embedded` says whether the bus is the embedded one, for the
    /// default of an empty URL (config/default.toml, `[store]`).
    pub fn parse(url: &str, embedded: bool) -> Result<Self, String> {
        let url = url.trim();
        if url.is_empty() {
            return Ok(if embedded {
                Self::Sqlite(DEFAULT_SQLITE_URL.to_owned())
            } else {
                Self::None
            });
        }
        if url == "memory" {
            return Ok(Self::Memory);
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            if sqlite::path_of(rest).is_empty() {
                return Err(format!("`{url}` names no file (sqlite:PATH)"));
            }
            return Ok(Self::Sqlite(url.to_owned()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        Err(format!(
            "`{}` is not sqlite:PATH, postgres://user:pass@host:port/db, memory or empty",
            crate::settings::mask_url(url)
        ))
    }
}

/// Where the embedded bus keeps history when `store.url` is empty.
pub const DEFAULT_SQLITE_URL: &str = "sqlite:data/confab.db";

/// The connection pool of a store: how many connections, and how long a call waits for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    pub size: u32,
    /// A call that gets no connection within it (the database down or refusing connections)
    /// fails with [`StoreError::Unreachable`] instead of waiting sqlx's default 30 s; the
    /// embedded bus answers it `unavailable`. Connecting at start-up is bounded by it too.
    pub acquire_timeout: Duration,
}

/// A pool of `size` connections with `store.acquire_timeout_ms`'s default (tests, tools).
impl From<u32> for PoolOptions {
    fn from(size: u32) -> Self {
        Self {
            size,
            acquire_timeout: crate::settings::StoreSettings::default().acquire_timeout_ms,
        }
    }
}

impl From<&crate::settings::StoreSettings> for PoolOptions {
    fn from(s: &crate::settings::StoreSettings) -> Self {
        Self {
            size: s.pool_size,
            acquire_timeout: s.acquire_timeout_ms,
        }
    }
}

/// Opens the store `kind` names and migrates its schema; `None` for no store or `memory`.
pub async fn open(
    kind: &StoreKind,
    pool: impl Into<PoolOptions>,
) -> Result<Option<SharedStore>, StoreError> {
    let pool = pool.into();
    Ok(match kind {
        StoreKind::None | StoreKind::Memory => None,
        StoreKind::Sqlite(url) => Some(Arc::new(sqlite::SqliteStore::open(url, pool).await?)),
        StoreKind::Postgres(url) => Some(Arc::new(postgres::PostgresStore::open(url, pool).await?)),
    })
}

/// The retention sweep: every `every`, deletes messages older than `days` days. Runs for the
/// life of the process.
pub async fn retention(
    store: SharedStore,
    days: u64,
    every: std::time::Duration,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let keep_ms = days.saturating_mul(86_400_000);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let cutoff = crate::domain::now_ms().saturating_sub(keep_ms);
        match store.delete_before(cutoff).await {
            Ok(0) => log::debug!("store retention: nothing older than {days} days"),
            Ok(n) => {
                metrics.store_retention_deleted.inc_by(n);
                log::info!("store retention: deleted {n} messages older than {days} days");
            }
            Err(e) => {
                metrics.store_errors.inc();
                log::error!("store retention sweep failed (retried in {every:?}): {e}");
            }
        }
    }
}

/// Refuses a database whose recorded schema is newer than the newest migration this binary
/// carries; `recorded` is the highest version in `_sqlx_migrations` (`None`: a new database).
fn check_schema(
    url: &str,
    recorded: Option<i64>,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), StoreError> {
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    match recorded {
        Some(found) if found > known => Err(StoreError::SchemaTooNew {
            url: crate::settings::mask_url(url),
            found,
            known,
        }),
        _ => Ok(()),
    }
}

/// An offset as the databases store it (they have no unsigned 64-bit integer). Offsets are
/// counts of messages and never reach `i64::MAX`.
fn to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_db(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A page's limit as a SQL `LIMIT` (0 means all).
fn limit_of(limit: usize) -> i64 {
    if limit == 0 {
        i64::MAX
    } else {
        i64::try_from(limit).unwrap_or(i64::MAX)
    }
}

/// User ids read back from the database are ours (validated when written); one that no
/// longer parses is reported, not trusted.
fn user_of(s: &str) -> Result<UserId, StoreError> {
    UserId::parse(s).map_err(|e| StoreError::Query(format!("bad user id `{s}` stored: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_that_gave_no_connection_in_time_is_unreachable_and_names_the_setting() {
        let e = StoreError::from(sqlx::Error::PoolTimedOut);
        assert_eq!(e, StoreError::Unreachable);
        assert!(e.to_string().contains("store.acquire_timeout_ms"), "{e}");
        // Other errors keep sqlx's own words.
        assert!(matches!(
            StoreError::from(sqlx::Error::RowNotFound),
            StoreError::Query(_)
        ));
    }

    #[test]
    fn the_pool_takes_its_size_and_acquire_timeout_from_the_store_settings() {
        let mut s = crate::settings::StoreSettings::default();
        assert_eq!(PoolOptions::from(&s), PoolOptions::from(s.pool_size));
        s.pool_size = 7;
        s.acquire_timeout_ms = Duration::from_millis(350);
        assert_eq!(
            PoolOptions::from(&s),
            PoolOptions {
                size: 7,
                acquire_timeout: Duration::from_millis(350)
            }
        );
    }
}
