//! The SQLite store: one file, the default with the embedded bus (`sqlite:data/confab.db`).
//!
//! WAL journal, so history reads run beside the writer; `synchronous = FULL`, so a commit (and
//! so an ack) survives a power cut, not only a killed process. Group commit in the embedded
//! bus pays one fsync per batch, not per message.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use bytestring::ByteString;
use futures_util::FutureExt;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row as _, Sqlite};

use super::{
    check_schema, from_db, limit_of, to_db, user_of, Append, Conflict, Page, PoolOptions,
    RecentRef, RoomState, Store, StoreError, StoreFuture,
};
use crate::bus::StoredMessage;
use crate::domain::{now_ms, Epoch, RoomName};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows one retention statement deletes, so the sweep never holds the write lock long
/// enough to stall the chat's commits.
const DELETE_CHUNK: i64 = 5000;

/// Rows per INSERT: 7 parameters each, well under SQLite's 32,766 parameters per statement.
const ROWS_PER_INSERT: usize = 1000;

/// How long a statement waits for another connection's write lock (the sweep, a reader's
/// checkpoint) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The path in `sqlite:PATH` (also `sqlite://PATH`), without its `?options`.
pub fn path_of(rest: &str) -> &str {
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    rest.split('?').next().unwrap_or("")
}

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating the file and its folder) and migrates the database at `url`.
    pub async fn open(url: &str, pool: impl Into<PoolOptions>) -> Result<Self, StoreError> {
        let store = Self::connect(url, pool).await?;
        store.migrate(url).await?;
        Ok(store)
    }

    /// Opens without migrating (tests tamper with the schema through it).
    pub async fn connect(url: &str, pool: impl Into<PoolOptions>) -> Result<Self, StoreError> {
        let pool = pool.into();
        let open_error = |message: String| StoreError::Open {
            url: url.to_owned(),
            message,
        };
        let rest = url
            .strip_prefix("sqlite:")
            .ok_or_else(|| StoreError::BadUrl(format!("`{url}` is not sqlite:PATH")))?;
        let path = path_of(rest);
        if let Some(dir) = Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| open_error(format!("cannot create {}: {e}", dir.display())))?;
            }
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| open_error(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(pool.size.max(1))
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|e| open_error(e.to_string()))?;
        Ok(Self { pool })
    }

    /// Brings the schema up to this binary's, refusing one that is newer.
    pub async fn migrate(&self, url: &str) -> Result<(), StoreError> {
        let recorded: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&self.pool)
            .await
            .ok()
            .flatten();
        check_schema(url, recorded, &MIGRATOR)?;
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migrate {
                url: url.to_owned(),
                message: e.to_string(),
            })
    }

    /// The pool, for tests that read or change rows behind the store's back.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl Store for SqliteStore {
    fn append_checked(&self, batch: Append) -> StoreFuture<Vec<Conflict>> {
        let pool = self.pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            let mut inserted = 0;
            // Many rows per statement: sqlx runs each statement through its worker thread,
            // and one statement per row cost several times the CPU of the commit itself.
            for chunk in batch.rows.chunks(ROWS_PER_INSERT) {
                let mut insert = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO messages (room, epoch, msg_offset, ts, user_id, client_ref, frame) ",
                );
                insert.push_values(chunk, |mut values, row| {
                    values
                        .push_bind(row.room.as_str())
                        .push_bind(row.epoch.as_str())
                        .push_bind(to_db(row.offset))
                        .push_bind(to_db(row.ts))
                        .push_bind(row.user.as_str())
                        .push_bind(row.reference.as_deref())
                        .push_bind(&*row.frame);
                });
                insert.push(" ON CONFLICT DO NOTHING");
                inserted += insert.build().execute(&mut *tx).await?.rows_affected();
            }
            // Every row new, the usual case: nothing to compare. Else each row's stored frame
            // is read back in the same transaction (rare: a retry, or a reused offset).
            let mut conflicts = Vec::new();
            if inserted < batch.rows.len() as u64 {
                for row in &batch.rows {
                    let frame: Option<String> = sqlx::query_scalar(
                        "SELECT frame FROM messages WHERE room = ? AND epoch = ? AND msg_offset = ?",
                    )
                    .bind(row.room.as_str())
                    .bind(row.epoch.as_str())
                    .bind(to_db(row.offset))
                    .fetch_optional(&mut *tx)
                    .await?;
                    if frame.is_some_and(|f| f != *row.frame) {
                        conflicts.push(Conflict {
                            room: row.room.clone(),
                            epoch: row.epoch.clone(),
                            offset: row.offset,
                        });
                    }
                }
            }
            let now = to_db(now_ms());
            for room in &batch.rooms {
                // Within an epoch each head only goes up; another epoch wins only with a claim
                // time not older than the row's (docs/design.md, "The archive").
                sqlx::query(
                    "INSERT INTO rooms (room, epoch, head_offset, base_offset, seen_offset, \
                     seen_at_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (room) DO UPDATE SET \
                     epoch = excluded.epoch, base_offset = excluded.base_offset, \
                     updated_ms = excluded.updated_ms, \
                     head_offset = CASE WHEN rooms.epoch = excluded.epoch \
                       THEN MAX(rooms.head_offset, excluded.head_offset) \
                       ELSE excluded.head_offset END, \
                     seen_offset = CASE WHEN rooms.epoch = excluded.epoch \
                       THEN MAX(rooms.seen_offset, excluded.seen_offset) \
                       ELSE excluded.seen_offset END, \
                     seen_at_ms = MAX(rooms.seen_at_ms, excluded.seen_at_ms) \
                     WHERE rooms.epoch = excluded.epoch OR rooms.seen_at_ms <= excluded.seen_at_ms",
                )
                .bind(room.room.as_str())
                .bind(room.epoch.as_str())
                .bind(to_db(room.offset))
                .bind(to_db(room.base))
                .bind(to_db(room.seen))
                .bind(to_db(room.seen_at_ms))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(conflicts)
        }
        .boxed()
    }

    fn head(&self, room: &RoomName) -> StoreFuture<Option<RoomState>> {
        let pool = self.pool.clone();
        let room = room.clone();
        async move {
            let row = sqlx::query(
                "SELECT epoch, head_offset, base_offset, seen_offset, seen_at_ms FROM rooms \
                 WHERE room = ?",
            )
            .bind(room.as_str())
            .fetch_optional(&pool)
            .await?;
            row.map(|r| {
                Ok(RoomState {
                    room: room.clone(),
                    epoch: Epoch::from_string(r.try_get::<&str, _>("epoch")?),
                    offset: from_db(r.try_get("head_offset")?),
                    base: from_db(r.try_get("base_offset")?),
                    seen: from_db(r.try_get("seen_offset")?),
                    seen_at_ms: from_db(r.try_get("seen_at_ms")?),
                })
            })
            .transpose()
        }
        .boxed()
    }

    fn page(&self, room: &RoomName, epoch: &Epoch, page: Page) -> StoreFuture<Vec<StoredMessage>> {
        let pool = self.pool.clone();
        let (room, epoch) = (room.clone(), epoch.clone());
        async move {
            let rows = match page {
                Page::After {
                    since,
                    until,
                    limit,
                } => {
                    sqlx::query(
                        "SELECT msg_offset, frame FROM messages \
                         WHERE room = ? AND epoch = ? AND msg_offset > ? AND msg_offset <= ? \
                         ORDER BY msg_offset LIMIT ?",
                    )
                    .bind(room.as_str())
                    .bind(epoch.as_str())
                    .bind(to_db(since))
                    .bind(to_db(until))
                    .bind(limit_of(limit))
                    .fetch_all(&pool)
                    .await?
                }
                Page::Before { before, limit } => {
                    let mut rows = sqlx::query(
                        "SELECT msg_offset, frame FROM messages \
                         WHERE room = ? AND epoch = ? AND msg_offset < ? \
                         ORDER BY msg_offset DESC LIMIT ?",
                    )
                    .bind(room.as_str())
                    .bind(epoch.as_str())
                    .bind(to_db(before))
                    .bind(limit_of(limit))
                    .fetch_all(&pool)
                    .await?;
                    rows.reverse();
                    rows
                }
            };
            rows.iter()
                .map(|r| {
                    Ok(StoredMessage {
                        offset: from_db(r.try_get("msg_offset")?),
                        json: ByteString::from(r.try_get::<String, _>("frame")?),
                    })
                })
                .collect()
        }
        .boxed()
    }

    fn recent_refs(
        &self,
        room: &RoomName,
        epoch: &Epoch,
        since_ts: u64,
    ) -> StoreFuture<Vec<RecentRef>> {
        let pool = self.pool.clone();
        let (room, epoch) = (room.clone(), epoch.clone());
        async move {
            let rows = sqlx::query(
                "SELECT user_id, client_ref, msg_offset, ts FROM messages \
                 WHERE room = ? AND epoch = ? AND ts >= ? AND client_ref IS NOT NULL",
            )
            .bind(room.as_str())
            .bind(epoch.as_str())
            .bind(to_db(since_ts))
            .fetch_all(&pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(RecentRef {
                        user: user_of(r.try_get("user_id")?)?,
                        reference: r.try_get("client_ref")?,
                        offset: from_db(r.try_get("msg_offset")?),
                        ts: from_db(r.try_get("ts")?),
                    })
                })
                .collect()
        }
        .boxed()
    }

    fn delete_before(&self, ts: u64) -> StoreFuture<u64> {
        let pool = self.pool.clone();
        async move {
            let mut deleted = 0;
            loop {
                let done = sqlx::query(
                    "DELETE FROM messages WHERE (room, epoch, msg_offset) IN \
                     (SELECT room, epoch, msg_offset FROM messages WHERE ts < ? LIMIT ?)",
                )
                .bind(to_db(ts))
                .bind(DELETE_CHUNK)
                .execute(&pool)
                .await?
                .rows_affected();
                deleted += done;
                if done < DELETE_CHUNK as u64 {
                    return Ok(deleted);
                }
            }
        }
        .boxed()
    }
}
