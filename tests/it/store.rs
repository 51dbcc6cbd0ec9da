//! The store (docs/design.md, "The store"): the same interface suite on SQLite and PostgreSQL, and
//! the embedded bus over a store through the real binary: restarts (SIGTERM and SIGKILL) keep every
//! room's epoch and offsets and lose nothing acked, history and resume reach past the in-memory
//! window, retention, migrations, and `store.url = memory` as before.

use std::collections::BTreeMap;
use std::time::Duration;

use bytestring::ByteString;
use std::sync::Arc;

use confab::bus::memory::MemoryBus;
use confab::bus::{Bus, EventSink, NewMessage, RoomEvent, StoredMessage};
use confab::domain::{Epoch, RoomName, UserId};
use confab::store::postgres::PostgresStore;
use confab::store::sqlite::SqliteStore;
use confab::store::StoreFuture;
use confab::store::{
    Append, Conflict, Page, PoolOptions, RecentRef, RoomState, Row, Store, StoreError,
};
use serde_json::{json, Value};

use crate::harness::{eventually, request, run_confab, Client, Postgres, Server, TempDir};

const KEY: &str = "store-test-key";

/// Fast senders: the rate limit is not under test here.
fn env_with<'a>(store: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("CONFAB_STORE__URL", store),
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
        ("CONFAB_LIMITS__BURST", "100000"),
        ("CONFAB_API__KEY", KEY),
    ];
    env.extend_from_slice(extra);
    env
}

fn row(room: &RoomName, epoch: &Epoch, offset: u64, ts: u64, reference: Option<&str>) -> Row {
    Row {
        room: room.clone(),
        epoch: epoch.clone(),
        offset,
        ts,
        user: UserId::parse("ann").unwrap(),
        reference: reference.map(str::to_owned),
        // Not ASCII, and with JSON escapes: stored and read back byte for byte.
        frame: ByteString::from(format!(
            r#"{{"type":"message","room":"{room}","offset":{offset},"text":"héllo \"{offset}\" ✓"}}"#
        )),
    }
}

fn offsets(page: &[StoredMessage]) -> Vec<u64> {
    page.iter().map(|m| m.offset).collect()
}

/// The promises of `confab::store`'s module doc, for any implementation.
async fn keeps_the_store_promises(store: &dyn Store) {
    let room = RoomName::parse("lobby").unwrap();
    let other = RoomName::parse("other").unwrap();
    let epoch = Epoch::from_string("e1");
    assert_eq!(store.head(&room).await.unwrap(), None, "a room never seen");

    let t0 = 1_700_000_000_000;
    let rows: Vec<Row> = (1..=5)
        .map(|i| row(&room, &epoch, i, t0 + i * 1000, (i % 2 == 1).then_some("r")))
        .collect();
    let head = RoomState {
        room: room.clone(),
        epoch: epoch.clone(),
        offset: 5,
        base: 0,
        seen: 5,
        seen_at_ms: 1000,
    };
    store
        .append(Append {
            rows: rows.clone(),
            rooms: vec![head.clone()],
        })
        .await
        .unwrap();
    assert_eq!(store.head(&room).await.unwrap(), Some(head.clone()));

    // Appending a row again changes nothing (a retry, or two archivers); a checked append
    // reports the one whose key was already there with another frame (an offset handed out
    // twice), not the one that is the same message again.
    let mut again = row(&room, &epoch, 3, t0, None);
    again.frame = ByteString::from_static("{\"changed\":true}");
    let conflicts = store
        .append_checked(Append {
            rows: vec![rows[1].clone(), again, rows[3].clone()],
            rooms: vec![],
        })
        .await
        .unwrap();
    assert_eq!(
        conflicts,
        vec![Conflict {
            room: room.clone(),
            epoch: epoch.clone(),
            offset: 3
        }]
    );
    assert_eq!(
        store
            .append_checked(Append {
                rows: rows.clone(),
                rooms: vec![],
            })
            .await
            .unwrap(),
        vec![],
        "the same rows again are no conflict"
    );

    let all = store
        .page(
            &room,
            &epoch,
            Page::Before {
                before: u64::MAX >> 1,
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(offsets(&all), vec![1, 2, 3, 4, 5]);
    for (got, sent) in all.iter().zip(&rows) {
        assert_eq!(got.json, sent.frame, "frames are kept byte for byte");
    }
    let page = |p| store.page(&room, &epoch, p);
    let after = page(Page::After {
        since: 1,
        until: 4,
        limit: 0,
    });
    assert_eq!(offsets(&after.await.unwrap()), vec![2, 3, 4]);
    let first_two = page(Page::After {
        since: 0,
        until: 5,
        limit: 2,
    });
    assert_eq!(offsets(&first_two.await.unwrap()), vec![1, 2]);
    let before = page(Page::Before {
        before: 5,
        limit: 2,
    });
    assert_eq!(
        offsets(&before.await.unwrap()),
        vec![3, 4],
        "the latest two below 5, oldest first"
    );
    let elsewhere = store
        .page(
            &other,
            &epoch,
            Page::After {
                since: 0,
                until: 5,
                limit: 0,
            },
        )
        .await
        .unwrap();
    assert!(elsewhere.is_empty(), "pages are per room");
    let other_epoch = store
        .page(
            &room,
            &Epoch::from_string("e0"),
            Page::After {
                since: 0,
                until: 5,
                limit: 0,
            },
        )
        .await
        .unwrap();
    assert!(other_epoch.is_empty(), "pages are per epoch");

    let mut refs = store.recent_refs(&room, &epoch, t0 + 2000).await.unwrap();
    refs.sort_by_key(|r| r.offset);
    assert_eq!(
        refs,
        vec![
            RecentRef {
                user: UserId::parse("ann").unwrap(),
                reference: "r".into(),
                offset: 3,
                ts: t0 + 3000,
            },
            RecentRef {
                user: UserId::parse("ann").unwrap(),
                reference: "r".into(),
                offset: 5,
                ts: t0 + 5000,
            },
        ]
    );

    // A renewed epoch: a head with no row.
    let renewed = RoomState {
        room: room.clone(),
        epoch: Epoch::from_string("e2"),
        offset: 9,
        base: 9,
        seen: 9,
        seen_at_ms: 2000,
    };
    store
        .append(Append {
            rows: vec![],
            rooms: vec![renewed.clone()],
        })
        .await
        .unwrap();
    assert_eq!(store.head(&room).await.unwrap(), Some(renewed.clone()));

    // Retention deletes messages older than the cut, never a room's head.
    assert_eq!(store.delete_before(t0 + 3000).await.unwrap(), 2);
    let left = page(Page::After {
        since: 0,
        until: 5,
        limit: 0,
    });
    assert_eq!(offsets(&left.await.unwrap()), vec![3, 4, 5]);
    assert_eq!(store.head(&room).await.unwrap(), Some(renewed));
    assert_eq!(store.delete_before(t0).await.unwrap(), 0);

    epochs_are_ordered_by_claim_time(store).await;
}

/// A late commit of an old epoch (an archiver paused past its lease while the room was
/// renewed) does not replace a newer epoch's head; a later epoch does. Within an epoch the
/// head and the seen head only go up.
async fn epochs_are_ordered_by_claim_time(store: &dyn Store) {
    let room = RoomName::parse("ordered").unwrap();
    let head = |epoch: &str, offset, seen, at| RoomState {
        room: room.clone(),
        epoch: Epoch::from_string(epoch),
        offset,
        base: 0,
        seen,
        seen_at_ms: at,
    };
    let write = |h: RoomState| {
        store.append(Append {
            rows: vec![],
            rooms: vec![h],
        })
    };
    write(head("e1", 10, 12, 1_000)).await.unwrap();
    write(head("e2", 3, 3, 3_000)).await.unwrap();
    write(head("e1", 20, 25, 2_000)).await.unwrap();
    assert_eq!(
        store.head(&room).await.unwrap(),
        Some(head("e2", 3, 3, 3_000)),
        "a late write of e1, claimed before e2's, does not replace it"
    );
    write(head("e2", 2, 2, 3_500)).await.unwrap();
    write(head("e2", 4, 9, 3_400)).await.unwrap();
    assert_eq!(
        store.head(&room).await.unwrap(),
        Some(head("e2", 4, 9, 3_500)),
        "within an epoch the head and the seen head only go up"
    );
    write(head("e3", 1, 1, 3_500)).await.unwrap();
    assert_eq!(
        store.head(&room).await.unwrap(),
        Some(head("e3", 1, 1, 3_500)),
        "a later epoch (claim time not older) replaces it"
    );
}

#[tokio::test]
async fn the_sqlite_store_keeps_the_store_promises() {
    let dir = TempDir::new("sqlite");
    let url = format!("sqlite:{}", dir.path.join("nested/dir/h.db").display());
    let store = SqliteStore::open(&url, 2).await.unwrap();
    keeps_the_store_promises(&store).await;
    assert!(
        dir.path.join("nested/dir/h.db").is_file(),
        "the file and its folder are created"
    );
}

#[tokio::test]
async fn the_postgres_store_keeps_the_store_promises() {
    let pg = Postgres::start();
    let store = pg.store().await;
    keeps_the_store_promises(&store).await;
}

/// The offsets of the `message` frames before the first `presence` frame: the backlog a
/// joining session is sent.
async fn backlog(c: &mut Client) -> Vec<Value> {
    let mut messages = Vec::new();
    loop {
        let v = c.next_of_any(&["message", "presence"]).await;
        if v["type"] == "presence" {
            return messages;
        }
        messages.push(v);
    }
}

fn offsets_of(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

/// Sends `count` messages without waiting, then collects acks until `acked` have come;
/// returns ref → offset of what was acked.
async fn burst_until_acked(c: &mut Client, count: usize, acked: usize) -> BTreeMap<String, u64> {
    for i in 0..count {
        c.send_json(json!({"type":"message","text":format!("t{i}"),"ref":format!("r{i}")}))
            .await;
    }
    let mut acks = BTreeMap::new();
    while acks.len() < acked {
        let v = c.next().await;
        assert_ne!(v["type"], "error", "{v}");
        if v["type"] == "ack" {
            acks.insert(
                v["ref"].as_str().unwrap().to_owned(),
                v["offset"].as_u64().unwrap(),
            );
        }
    }
    acks
}

/// A burst into room `room`, the server SIGKILLed while messages are still arriving, a
/// restart on the same store: every acked message is there, in the same epoch, with no gap,
/// and offsets go on after it.
async fn acked_messages_survive_a_sigkill(url: &str, room: &str, burst: usize, min_acked: usize) {
    let env = env_with(url, &[]);
    let mut server = Server::start(&env);
    let (mut c, welcome) = server.join(&format!("/ws/{room}?user=ann")).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let acks = burst_until_acked(&mut c, burst, min_acked).await;
    // Killed while messages are still arriving: whatever was acked must survive.
    server.kill();
    drop(c);

    let server = Server::start(&env);
    let (mut again, welcome) = server
        .join(&format!("/ws/{room}?user=ann&since=0&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["epoch"], epoch.as_str(), "the room keeps its epoch");
    let head = welcome["offset"].as_u64().unwrap();
    let replayed = backlog(&mut again).await;
    assert_eq!(
        offsets_of(&replayed),
        (1..=head).collect::<Vec<_>>(),
        "no gap"
    );
    for (reference, offset) in &acks {
        let m = &replayed[*offset as usize - 1];
        let i = &reference[1..];
        assert_eq!(m["text"], format!("t{i}"), "acked {reference} at {offset}");
    }
    // Offsets go on after the restart.
    assert_eq!(again.say("after", "after").await, head + 1);
}

#[tokio::test]
async fn after_a_sigkill_every_acked_message_is_still_there_in_the_same_epoch() {
    let dir = TempDir::new("kill");
    acked_messages_survive_a_sigkill(&dir.sqlite_url(), "k", 400, 150).await;
}

#[tokio::test]
async fn after_a_sigterm_restart_a_resume_from_before_it_is_recovered_with_what_was_missed() {
    let dir = TempDir::new("term");
    let url = dir.sqlite_url();
    let env = env_with(&url, &[]);
    let mut server = Server::start(&env);
    let (a, welcome) = server.join("/ws/t?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let (mut b, _) = server.join("/ws/t?user=bob").await;
    for i in 1..=5 {
        b.say(&format!("m{i}"), &format!("{i}")).await;
    }
    a.close().await;
    for i in 6..=8 {
        b.say(&format!("m{i}"), &format!("{i}")).await;
    }
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(40)).success());
    drop(b);

    let server = Server::start(&env);
    let (mut a, welcome) = server
        .join(&format!("/ws/t?user=ann&since=5&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(
        (welcome["epoch"].as_str(), welcome["offset"].as_u64()),
        (Some(epoch.as_str()), Some(8))
    );
    let missed = backlog(&mut a).await;
    assert_eq!(offsets_of(&missed), vec![6, 7, 8]);
    assert_eq!(missed[0]["text"], "m6");
    // A retried ref from before the restart is still recognised (within 5 minutes).
    let (mut b, _) = server.join("/ws/t?user=bob").await;
    assert_eq!(b.say("m8", "8").await, 8, "acked with the first offset");
    assert_eq!(b.say("m9", "9").await, 9);
}

async fn history_frame(c: &mut Client, before: Option<u64>, limit: u64) -> Value {
    let mut frame = json!({"type":"history","limit":limit,"ref":"h"});
    if let Some(before) = before {
        frame["before"] = json!(before);
    }
    c.send_json(frame).await;
    c.next_of("history").await
}

fn history_offsets(h: &Value) -> Vec<u64> {
    offsets_of(h["messages"].as_array().unwrap())
}

#[tokio::test]
async fn history_and_resume_reach_past_the_in_memory_window_without_gap_or_duplicate() {
    let dir = TempDir::new("seam");
    let url = dir.sqlite_url();
    let env = env_with(&url, &[("CONFAB_HISTORY__SIZE", "5")]);
    let mut server = Server::start(&env);
    let (mut c, welcome) = server.join("/ws/s?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for i in 1..=20 {
        c.say(&format!("m{i}"), &format!("{i}")).await;
    }
    // The window holds 16..=20; the rest comes from the store.
    let all = history_frame(&mut c, None, 50).await;
    assert_eq!(history_offsets(&all), (1..=20).collect::<Vec<_>>());
    assert_eq!(all["epoch"], epoch.as_str());
    let seam = history_frame(&mut c, Some(18), 5).await;
    assert_eq!(history_offsets(&seam), vec![13, 14, 15, 16, 17]);
    let api = request(
        server.addr,
        "GET",
        "/api/rooms/s/history?before=21&limit=12",
        &[("Authorization", &format!("Bearer {KEY}"))],
        "",
    )
    .await;
    assert_eq!(api.status, 200, "{}", api.body);
    assert_eq!(history_offsets(&api.json()), (9..=20).collect::<Vec<_>>());
    let (mut r, welcome) = server
        .join(&format!("/ws/s?user=bob&since=2&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    let replayed = backlog(&mut r).await;
    assert_eq!(offsets_of(&replayed), (3..=20).collect::<Vec<_>>());
    assert_eq!(
        replayed[..],
        all["messages"].as_array().unwrap()[2..],
        "the same frames from the store as from the window"
    );

    // After a restart the window is empty: everything is served from the store, the same.
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(40)).success());
    drop((c, r));
    let server = Server::start(&env);
    let (mut c, _) = server.join("/ws/s?user=ann").await;
    let restarted = history_frame(&mut c, None, 50).await;
    assert_eq!(restarted["messages"], all["messages"]);
}

#[tokio::test]
async fn messages_older_than_the_retention_are_deleted_by_the_sweep() {
    let dir = TempDir::new("retention");
    let url = dir.sqlite_url();
    let env = env_with(
        &url,
        &[
            ("CONFAB_STORE__RETENTION_DAYS", "1"),
            ("CONFAB_STORE__RETENTION_SWEEP_SECS", "1"),
        ],
    );
    let mut server = Server::start(&env);
    let (mut c, welcome) = server.join("/ws/old?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        c.say(&format!("m{i}"), &format!("{i}")).await;
    }
    // Ages the first two messages by two days, behind the server's back.
    let db = SqliteStore::connect(&url, 1).await.unwrap();
    let two_days: i64 = 2 * 86_400_000;
    sqlx::query("UPDATE messages SET ts = ts - ? WHERE msg_offset <= 2")
        .bind(two_days)
        .execute(db.pool())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the sweep deletes old messages",
        || {
            let pool = db.pool().clone();
            async move {
                let left: Vec<i64> =
                    sqlx::query_scalar("SELECT msg_offset FROM messages ORDER BY msg_offset")
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                left == vec![3]
            }
        },
    )
    .await;
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(40)).success());
    drop(c);
    let server = Server::start(&env);
    let (mut c, welcome) = server.join("/ws/old?user=ann").await;
    assert_eq!(welcome["offset"], 3, "the room keeps its offsets");
    assert_eq!(
        history_offsets(&history_frame(&mut c, None, 50).await),
        vec![3]
    );
    let (_, welcome) = server
        .join(&format!("/ws/old?user=bob&since=0&epoch={epoch}"))
        .await;
    assert_eq!(
        welcome["recovered"], false,
        "what was deleted cannot be replayed"
    );
}

#[tokio::test]
async fn confab_migrate_creates_the_schema_and_a_newer_schema_stops_start_up_naming_it() {
    let dir = TempDir::new("migrate");
    let url = dir.sqlite_url();
    let env = [("CONFAB_STORE__URL", url.as_str())];
    let out = run_confab(&["migrate"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = SqliteStore::connect(&url, 1).await.unwrap();
    let rooms: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM rooms")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rooms, 0, "the schema is there");
    assert!(
        run_confab(&["migrate"], &env).status.success(),
        "migrating again is a no-op"
    );

    // As if a newer confab had migrated this database (its newest migration, 99).
    sqlx::query(
        "UPDATE _sqlx_migrations SET version = 99 \
         WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    for args in [&["migrate"][..], &["serve", "--listen", "127.0.0.1:0"][..]] {
        let out = run_confab(args, &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail: {err}");
        assert!(
            err.contains("store.url") && err.contains("99") && err.contains("newer"),
            "{args:?}: {err}"
        );
    }
}

#[tokio::test]
async fn a_sqlite_store_with_redis_is_refused_at_start_naming_store_url() {
    let out = run_confab(
        &["serve", "--listen", "127.0.0.1:0"],
        &[
            ("CONFAB_REDIS__URL", "redis://127.0.0.1:1"),
            ("CONFAB_STORE__URL", "sqlite:/tmp/never-created.db"),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("store.url"), "{err}");
}

#[tokio::test]
async fn with_store_url_memory_a_restart_forgets_rooms_as_before() {
    let mut server = Server::start(&env_with("memory", &[]));
    let (mut c, welcome) = server.join("/ws/m?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    c.say("one", "1").await;
    server.kill();
    drop(c);
    let server = Server::start(&env_with("memory", &[]));
    let (_, welcome) = server
        .join(&format!("/ws/m?user=ann&since=1&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], false, "{welcome}");
    assert_eq!(welcome["offset"], 0, "a new epoch from 1");
    assert_ne!(welcome["epoch"], epoch.as_str());
}

#[tokio::test]
async fn the_embedded_bus_on_postgres_keeps_epochs_and_offsets_across_a_sigkill() {
    let pg = Postgres::start();
    let _ = pg.store().await; // waits until PostgreSQL accepts connections
    acked_messages_survive_a_sigkill(&pg.url(), "pg", 200, 80).await;
}

#[tokio::test]
async fn a_failed_commit_is_answered_unavailable_and_uses_no_offset() {
    let dir = TempDir::new("fail");
    let url = dir.sqlite_url();
    let server = Server::start(&env_with(&url, &[]));
    let (mut c, _) = server.join("/ws/f?user=ann").await;
    assert_eq!(c.say("one", "1").await, 1);
    // The table the commit writes to disappears behind the server's back.
    let db = SqliteStore::connect(&url, 1).await.unwrap();
    sqlx::query("ALTER TABLE messages RENAME TO messages_away")
        .execute(db.pool())
        .await
        .unwrap();
    refused_unavailable(&mut c, "lost", "2").await;
    sqlx::query("ALTER TABLE messages_away RENAME TO messages")
        .execute(db.pool())
        .await
        .unwrap();
    // The retry gets the next offset: the failed one used none, so there is no gap.
    assert_eq!(c.say("lost", "2").await, 2);
    let (mut d, welcome) = server.join("/ws/f?user=bob&history=10").await;
    assert_eq!(welcome["offset"], 2);
    assert_eq!(offsets_of(&backlog(&mut d).await), vec![1, 2]);
    let metrics = request(server.addr, "GET", "/metrics", &[], "").await;
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l.starts_with("confab_store_errors_total ") && !l.ends_with(" 0")),
        "{}",
        metrics.body
    );
}

#[tokio::test]
async fn a_postgres_store_whose_server_is_down_fails_a_call_as_unreachable_within_its_acquire_timeout(
) {
    let mut pg = Postgres::start();
    let _ = pg.store().await; // waits until PostgreSQL accepts connections
    let pool = PoolOptions {
        size: 1,
        acquire_timeout: Duration::from_millis(300),
    };
    let store = PostgresStore::open(&pg.url(), pool).await.unwrap();
    let room = RoomName::parse("gone").unwrap();
    assert_eq!(store.head(&room).await, Ok(None));
    pg.stop();
    // The deadline only keeps a hang from blocking the suite; the error is the assertion.
    let failed = tokio::time::timeout(Duration::from_secs(10), store.head(&room))
        .await
        .expect("a store call waited on past its acquire timeout");
    assert_eq!(failed, Err(StoreError::Unreachable));
    pg.resume();
    eventually(
        Duration::from_secs(30),
        "the store answers again",
        || async { store.head(&room).await.is_ok() },
    )
    .await;
}

/// After a failed `during` (ref 2) between `before` (1) and `after`: the retry is acked at
/// offset 2 (the failed attempt used none), `after` at 3, and `bob` got the three once each,
/// in order.
async fn retry_and_next_are_delivered_once(ann: &mut Client, bob: &mut Client) {
    assert_eq!(say_until_acked(ann, "during", "2").await, 2);
    assert_eq!(ann.say("after", "3").await, 3);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = bob.next_of("message").await;
        seen.push((
            m["offset"].as_u64().unwrap(),
            m["text"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(
        seen,
        vec![
            (1, "before".to_owned()),
            (2, "during".to_owned()),
            (3, "after".to_owned())
        ],
        "every message delivered once, in order"
    );
}

/// Sends `text` with `reference` and expects it refused with `unavailable` for that ref (the
/// harness's receive deadline bounds the wait).
async fn refused_unavailable(c: &mut Client, text: &str, reference: &str) {
    c.send_json(json!({"type":"message","text":text,"ref":reference}))
        .await;
    let error = c.next_of("error").await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("unavailable"), Some(reference)),
        "{error}"
    );
}

/// Sends `text` with `reference` until it is acked, while `error unavailable` answers it (the
/// store is still coming back); returns the ack's offset.
async fn say_until_acked(c: &mut Client, text: &str, reference: &str) -> u64 {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        c.send_json(json!({"type":"message","text":text,"ref":reference}))
            .await;
        let v = c.next_of_any(&["ack", "error"]).await;
        if v["type"] == "ack" && v["ref"] == reference {
            return v["offset"].as_u64().unwrap();
        }
        assert_eq!(v["code"], "unavailable", "{v}");
        assert!(
            std::time::Instant::now() < end,
            "still unavailable 30 s after the store came back: {v}"
        );
    }
}

#[tokio::test]
async fn with_postgres_down_a_message_is_answered_unavailable_within_seconds_and_its_retry_is_delivered_once(
) {
    let mut pg = Postgres::start();
    let _ = pg.store().await; // waits until PostgreSQL accepts connections
                              // The default `store.acquire_timeout_ms`: what a deployment gets without setting it.
    let server = Server::start(&env_with(&pg.url(), &[]));
    let (mut ann, _) = server.join("/ws/down?user=ann").await;
    let (mut bob, _) = server.join("/ws/down?user=bob").await;
    assert_eq!(ann.say("before", "1").await, 1);

    pg.stop();
    // The refusal comes within the harness's DEADLINE (10 s); sqlx's own default would keep
    // the message waiting 30 s for a connection.
    refused_unavailable(&mut ann, "during", "2").await;
    assert!(server.metric("confab_store_errors_total").await > 0.0);
    // The embedded bus is still there: readiness does not look at the store
    // (docs/OPERATIONS.md, "Failure"), the replica keeps taking sessions.
    assert_eq!(server.http("GET", "/readyz", &[]).await.status, 200);

    pg.resume();
    // The retry takes the next offset: the failed attempt used none.
    retry_and_next_are_delivered_once(&mut ann, &mut bob).await;
}

/// A SQLite store whose next commit goes through but is reported failed: what a connection
/// lost after COMMIT went out (and before its answer came back) looks like to the bus.
struct AnswerLost {
    store: SqliteStore,
    lose_next: std::sync::atomic::AtomicBool,
}

impl Store for AnswerLost {
    fn append_checked(&self, batch: Append) -> StoreFuture<Vec<Conflict>> {
        let lose = self
            .lose_next
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let commit = self.store.append_checked(batch);
        Box::pin(async move {
            let conflicts = commit.await?;
            if lose {
                return Err(StoreError::Query(
                    "connection lost after COMMIT was sent".into(),
                ));
            }
            Ok(conflicts)
        })
    }

    fn head(&self, room: &RoomName) -> StoreFuture<Option<RoomState>> {
        self.store.head(room)
    }

    fn page(&self, room: &RoomName, epoch: &Epoch, page: Page) -> StoreFuture<Vec<StoredMessage>> {
        self.store.page(room, epoch, page)
    }

    fn recent_refs(
        &self,
        room: &RoomName,
        epoch: &Epoch,
        since_ts: u64,
    ) -> StoreFuture<Vec<RecentRef>> {
        self.store.recent_refs(room, epoch, since_ts)
    }

    fn delete_before(&self, ts: u64) -> StoreFuture<u64> {
        self.store.delete_before(ts)
    }
}

/// Takes the bus's events and drops them: this test reads the store.
struct NoRooms;

impl EventSink for NoRooms {
    fn deliver(&self, _: RoomEvent) {}

    fn has_room(&self, _: &str) -> bool {
        false
    }

    fn resync_all(&self, _: Option<confab::bus::CatchUpDone>) {}

    fn reassert_presence(&self) {}
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_gives_no_offset_twice_and_every_acked_message_is_stored() {
    let dir = TempDir::new("lost");
    let url = format!("sqlite:{}", dir.path.join("h.db").display());
    let store = Arc::new(AnswerLost {
        store: SqliteStore::open(&url, 2).await.unwrap(),
        lose_next: false.into(),
    });
    let bus = MemoryBus::with_store(
        100,
        Duration::from_secs(3600),
        Arc::new(NoRooms),
        store.clone(),
        None,
        Duration::from_secs(5),
    );
    let room = RoomName::parse("lost").unwrap();
    let say = |text: &str| NewMessage {
        user: UserId::parse("ann").unwrap(),
        name: None,
        text: text.into(),
        reference: Some(text.into()),
    };
    assert_eq!(bus.publish(&room, say("one")).await.unwrap().offset, 1);
    // Committed, but the bus hears a failure: the sender is told `unavailable`.
    store
        .lose_next
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(bus.publish(&room, say("two")).await.is_err());
    // The next message must not be given the offset the lost answer's message holds.
    let three = bus.publish(&room, say("three")).await.unwrap();
    // The sender of `two` retries with its ref: the message it already stored.
    let two = bus.publish(&room, say("two")).await.unwrap();
    assert_eq!((two.offset, two.duplicate), (2, true), "{two:?}");
    assert_eq!(three.offset, 3, "{three:?}");
    let head = store.head(&room).await.unwrap().unwrap();
    let stored = store
        .page(
            &room,
            &head.epoch,
            Page::After {
                since: 0,
                until: 100,
                limit: 10,
            },
        )
        .await
        .unwrap();
    let texts: Vec<(u64, String)> = stored
        .iter()
        .map(|m| {
            let v: Value = serde_json::from_str(&m.json).unwrap();
            (m.offset, v["text"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        texts,
        [(1, "one".into()), (2, "two".into()), (3, "three".into())],
        "every acked message is stored, each under the offset it was acked with"
    );
}

#[tokio::test]
async fn a_commit_the_database_never_answers_is_answered_unavailable_and_the_bus_goes_on() {
    let pg = Postgres::start();
    let store = pg.store().await;
    let server = Server::start(&env_with(
        &pg.url(),
        &[("CONFAB_STORE__COMMIT_TIMEOUT_MS", "1000")],
    ));
    let (mut ann, _) = server.join("/ws/hung?user=ann").await;
    let (mut bob, _) = server.join("/ws/hung?user=bob").await;
    assert_eq!(ann.say("before", "1").await, 1);

    // Another session holds the messages table: the writer's INSERT waits on the lock and
    // PostgreSQL answers nothing, as when it is paused or cut off without a reset.
    let mut hold = store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    // Within the harness's DEADLINE (10 s): before, the writer waited on the lock for good
    // and every later message of the replica with it.
    refused_unavailable(&mut ann, "during", "2").await;
    hold.rollback().await.unwrap();

    // The retry and the next message go through; each is stored and delivered once.
    retry_and_next_are_delivered_once(&mut ann, &mut bob).await;
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT msg_offset, frame FROM messages WHERE room = 'hung' ORDER BY 1")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(
        rows.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        [1, 2, 3],
        "stored once each"
    );
}
