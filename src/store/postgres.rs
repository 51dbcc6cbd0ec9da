//! The PostgreSQL store: the same schema and promises as the SQLite one, for a database
//! several processes can reach (with the embedded bus today; the Redis archive later).
//!
//! A batch is two statements in one transaction whatever its size: rows go in as arrays
//! through `UNNEST`, so a group commit costs the same round trips for one message or a
//! thousand.

use bytestring::ByteString;
use futures_util::FutureExt;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row as _;

use super::{
    check_schema, from_db, limit_of, to_db, user_of, Append, Conflict, Page, PoolOptions,
    RecentRef, RoomState, Store, StoreError, StoreFuture,
};
use crate::bus::StoredMessage;
use crate::domain::{now_ms, Epoch, RoomName};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to and migrates the database at `url`.
    pub async fn open(url: &str, pool: impl Into<PoolOptions>) -> Result<Self, StoreError> {
        let store = Self::connect(url, pool).await?;
        store.migrate(url).await?;
        Ok(store)
    }

    /// Connects without migrating.
    pub async fn connect(url: &str, pool: impl Into<PoolOptions>) -> Result<Self, StoreError> {
        let pool = pool.into();
        let pool = PgPoolOptions::new()
            .max_connections(pool.size.max(1))
            .acquire_timeout(pool.acquire_timeout)
            .connect(url)
            .await
            .map_err(|e| StoreError::Open {
                url: crate::settings::mask_url(url),
                message: e.to_string(),
            })?;
        Ok(Self { pool })
    }

    /// Brings the schema up to this binary's, refusing one that is newer.
    pub async fn migrate(&self, url: &str) -> Result<(), StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        let recorded: Option<i64> = if exists {
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
                .fetch_one(&self.pool)
                .await?
        } else {
            None
        };
        check_schema(url, recorded, &MIGRATOR)?;
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migrate {
                url: crate::settings::mask_url(url),
                message: e.to_string(),
            })
    }

    /// The pool, for tests that read or change rows behind the store's back.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Store for PostgresStore {
    fn append_checked(&self, batch: Append) -> StoreFuture<Vec<Conflict>> {
        let pool = self.pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            let mut conflicts = Vec::new();
            if !batch.rows.is_empty() {
                let rows = &batch.rows;
                let rooms: Vec<&str> = rows.iter().map(|r| r.room.as_str()).collect();
                let epochs: Vec<&str> = rows.iter().map(|r| r.epoch.as_str()).collect();
                let offsets: Vec<i64> = rows.iter().map(|r| to_db(r.offset)).collect();
                let ts: Vec<i64> = rows.iter().map(|r| to_db(r.ts)).collect();
                let users: Vec<&str> = rows.iter().map(|r| r.user.as_str()).collect();
                let refs: Vec<Option<&str>> =
                    rows.iter().map(|r| r.reference.as_deref()).collect();
                let frames: Vec<&str> = rows.iter().map(|r| &*r.frame).collect();
                let inserted = sqlx::query(
                    "INSERT INTO messages (room, epoch, msg_offset, ts, user_id, client_ref, frame) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], \
                     $5::text[], $6::text[], $7::text[]) ON CONFLICT DO NOTHING",
                )
                .bind(&rooms)
                .bind(&epochs)
                .bind(&offsets)
                .bind(&ts)
                .bind(&users)
                .bind(&refs)
                .bind(&frames)
                .execute(&mut *tx)
                .await?;
                // Every row new, the usual case: nothing to compare. Else the rows already
                // there are read back in the same transaction, where a frame that differs
                // from the one sent is an offset handed out twice.
                if inserted.rows_affected() < rows.len() as u64 {
                    let found = sqlx::query(
                        "SELECT m.msg_offset, m.room, m.epoch FROM messages m \
                         JOIN UNNEST($1::text[], $2::text[], $3::int8[], $4::text[]) \
                         AS t(r, e, o, f) ON m.room = t.r AND m.epoch = t.e AND m.msg_offset = t.o \
                         WHERE m.frame <> t.f",
                    )
                    .bind(&rooms)
                    .bind(&epochs)
                    .bind(&offsets)
                    .bind(&frames)
                    .fetch_all(&mut *tx)
                    .await?;
                    for r in &found {
                        conflicts.push(Conflict {
                            room: RoomName::parse(r.try_get::<&str, _>("room")?).map_err(|e| {
                                StoreError::Query(format!("bad room name stored: {e}"))
                            })?,
                            epoch: Epoch::from_string(r.try_get::<&str, _>("epoch")?),
                            offset: from_db(r.try_get("msg_offset")?),
                        });
                    }
                }
            }
            if !batch.rooms.is_empty() {
                let heads = &batch.rooms;
                let rooms: Vec<&str> = heads.iter().map(|r| r.room.as_str()).collect();
                let epochs: Vec<&str> = heads.iter().map(|r| r.epoch.as_str()).collect();
                let offsets: Vec<i64> = heads.iter().map(|r| to_db(r.offset)).collect();
                let bases: Vec<i64> = heads.iter().map(|r| to_db(r.base)).collect();
                let seen: Vec<i64> = heads.iter().map(|r| to_db(r.seen)).collect();
                let at: Vec<i64> = heads.iter().map(|r| to_db(r.seen_at_ms)).collect();
                // Within an epoch each head only goes up; another epoch wins only with a claim
                // time not older than the row's (docs/design.md, "The archive").
                sqlx::query(
                    "INSERT INTO rooms (room, epoch, head_offset, base_offset, seen_offset, \
                     seen_at_ms, updated_ms) \
                     SELECT r, e, o, b, s, a, $7 FROM UNNEST($1::text[], $2::text[], $3::int8[], \
                     $4::int8[], $5::int8[], $6::int8[]) AS u(r, e, o, b, s, a) \
                     ON CONFLICT (room) DO UPDATE SET \
                     epoch = excluded.epoch, base_offset = excluded.base_offset, \
                     updated_ms = excluded.updated_ms, \
                     head_offset = CASE WHEN rooms.epoch = excluded.epoch \
                       THEN GREATEST(rooms.head_offset, excluded.head_offset) \
                       ELSE excluded.head_offset END, \
                     seen_offset = CASE WHEN rooms.epoch = excluded.epoch \
                       THEN GREATEST(rooms.seen_offset, excluded.seen_offset) \
                       ELSE excluded.seen_offset END, \
                     seen_at_ms = GREATEST(rooms.seen_at_ms, excluded.seen_at_ms) \
                     WHERE rooms.epoch = excluded.epoch OR rooms.seen_at_ms <= excluded.seen_at_ms",
                )
                .bind(&rooms)
                .bind(&epochs)
                .bind(&offsets)
                .bind(&bases)
                .bind(&seen)
                .bind(&at)
                .bind(to_db(now_ms()))
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
                 WHERE room = $1",
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
                         WHERE room = $1 AND epoch = $2 AND msg_offset > $3 AND msg_offset <= $4 \
                         ORDER BY msg_offset LIMIT $5",
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
                         WHERE room = $1 AND epoch = $2 AND msg_offset < $3 \
                         ORDER BY msg_offset DESC LIMIT $4",
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
                 WHERE room = $1 AND epoch = $2 AND ts >= $3 AND client_ref IS NOT NULL",
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
            // PostgreSQL's MVCC lets writers go on beside a long delete: one statement.
            let done = sqlx::query("DELETE FROM messages WHERE ts < $1")
                .bind(to_db(ts))
                .execute(&pool)
                .await?;
            Ok(done.rows_affected())
        }
        .boxed()
    }
}
