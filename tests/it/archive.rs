//! The PostgreSQL archive behind Redis (docs/design.md, "The archive"; SPEC §7): replicas on one
//! Redis copy every acked message into one PostgreSQL, once per (room, epoch, offset), through
//! kills, restarts and outages; reads reach across the Redis window into it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{
    burst_publisher, eventually, run_confab, Client, Postgres, Redis, Server, DEADLINE,
};

const KEY: &str = "archive-api-key";

/// Settings for a replica archiving into `pg`: fast passes and a short lease so a takeover is
/// quick, no rate limit in the way of bursts, and `history` as the Redis window.
fn archive_env(pg: &Postgres, history: &str) -> Vec<(String, String)> {
    [
        ("CONFAB_STORE__URL", pg.url()),
        ("CONFAB_STORE__ARCHIVE_INTERVAL_MS", "50".into()),
        ("CONFAB_STORE__ARCHIVE_LEASE_MS", "1000".into()),
        ("CONFAB_HISTORY__SIZE", history.into()),
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000".into()),
        ("CONFAB_LIMITS__BURST", "100000".into()),
        ("CONFAB_API__KEY", KEY.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn replica(redis: &Redis, prefix: &str, node: &str, env: &[(String, String)]) -> Server {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::replica(redis, prefix, node, &pairs).await
}

/// The archive's rows of `room`: offset → (epoch, text).
async fn archived(pg: &Postgres, room: &str) -> BTreeMap<u64, (String, String)> {
    let store = pg.store().await;
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT msg_offset, epoch, frame FROM messages WHERE room = $1 ORDER BY msg_offset",
    )
    .bind(room)
    .fetch_all(store.pool())
    .await
    .unwrap();
    rows.into_iter()
        .map(|(offset, epoch, frame)| {
            let v: Value = serde_json::from_str(&frame).unwrap();
            assert_eq!(v["offset"], offset, "the frame carries its own offset");
            (
                offset as u64,
                (epoch, v["text"].as_str().unwrap().to_owned()),
            )
        })
        .collect()
}

/// Waits until the archive holds exactly offsets 1..=`head` of `room`.
async fn wait_archived(pg: &Postgres, room: &str, head: u64) -> BTreeMap<u64, (String, String)> {
    let want: Vec<u64> = (1..=head).collect();
    eventually(
        Duration::from_secs(20),
        &format!("{room} archived up to {head}"),
        || async { archived(pg, room).await.keys().copied().collect::<Vec<_>>() == want },
    )
    .await;
    archived(pg, room).await
}

/// The sum over `servers` of a metric's value.
async fn metric(servers: &[&Server], name: &str) -> f64 {
    let mut sum = 0.0;
    for s in servers {
        sum += s.metric(name).await;
    }
    sum
}

/// Sends `count` messages (`{name}-{i}`, ref `{i}`) and waits for every ack; returns the
/// offsets by ref.
async fn say_many(c: &mut Client, name: &str, count: usize) -> Vec<u64> {
    let mut offsets = Vec::with_capacity(count);
    for i in 0..count {
        offsets.push(c.say(&format!("{name}-{i}"), &format!("{name}{i}")).await);
    }
    offsets
}

/// The offsets of the `message` frames before the first `presence` frame (the backlog).
async fn backlog(c: &mut Client) -> Vec<u64> {
    let mut offsets = Vec::new();
    loop {
        let v = c.next_of_any(&["message", "presence"]).await;
        if v["type"] == "presence" {
            return offsets;
        }
        offsets.push(v["offset"].as_u64().unwrap());
    }
}

/// Sends the message `after` (ref `after`) until it is acked, through the `unavailable`s of a
/// replica that has not yet noticed Redis restarted; returns its offset and the `reset` the
/// client got meanwhile, if any.
async fn post_after_restart(c: &mut Client) -> (Option<u64>, Option<Value>) {
    let mut reset = None;
    for _ in 0..200 {
        c.send_json(json!({"type": "message", "text": "after", "ref": "after"}))
            .await;
        let reply = loop {
            let v = c.next_of_any(&["ack", "error", "reset"]).await;
            if v["type"] != "reset" {
                break v;
            }
            reset = Some(v);
        };
        if reply["type"] == "ack" {
            return (reply["offset"].as_u64(), reset);
        }
        assert_eq!(reply["code"], "unavailable", "{reply}");
        // Polling the replica's recovery, bounded by the loop's count.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (None, reset)
}

fn offsets(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn every_acked_message_reaches_postgresql_exactly_once_from_two_replicas() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    let mut env = archive_env(&pg, "1000");
    // The default lease: "copied once" below must not depend on no pass stalling past a
    // short test lease on a busy machine (a takeover may copy again, harmlessly).
    env.push(("CONFAB_STORE__ARCHIVE_LEASE_MS".into(), "5000".into()));
    let a = replica(&redis, "arch1", "a", &env).await;
    let b = replica(&redis, "arch1", "b", &env).await;
    let mut senders = Vec::new();
    for (i, server) in [&a, &b, &a, &b].into_iter().enumerate() {
        let (c, _) = server.join(&format!("/ws/burst?user=u{i}")).await;
        senders.push(burst_publisher(c, format!("u{i}"), 250));
    }
    let (mut quiet, _) = b.join("/ws/quiet?user=q").await;
    say_many(&mut quiet, "q", 3).await;
    for s in senders {
        s.await.unwrap();
    }
    let rows = wait_archived(&pg, "burst", 1000).await;
    let epochs: std::collections::HashSet<_> = rows.values().map(|(e, _)| e.clone()).collect();
    assert_eq!(epochs.len(), 1, "one epoch: {epochs:?}");
    let mut texts: Vec<_> = rows.values().map(|(_, t)| t.clone()).collect();
    texts.sort();
    let mut sent: Vec<_> = (0..4)
        .flat_map(|u| (0..250).map(move |i| format!("u{u}-{i}")))
        .collect();
    sent.sort();
    assert_eq!(texts, sent, "every acked message, each once");
    wait_archived(&pg, "quiet", 3).await;
    // Copied once: the two archivers did not both copy a room (the lease).
    eventually(Duration::from_secs(10), "copied counted", || async {
        metric(&[&a, &b], "confab_archive_copied_total").await == 1003.0
    })
    .await;
    assert_eq!(metric(&[&a, &b], "confab_archive_lost_total").await, 0.0);
}

#[tokio::test]
async fn history_and_resume_read_across_the_redis_window_into_postgresql() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    let env = archive_env(&pg, "20");
    let a = replica(&redis, "arch2", "a", &env).await;
    let b = replica(&redis, "arch2", "b", &env).await;
    let (mut sender, welcome) = a.join("/ws/seam?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    // In steps the archiver keeps up with: a window of 20 holds well under one pass of a
    // burst (docs/design.md, "The archive": the window must outlast the archive lag).
    for step in 0..40 {
        for i in 0..10 {
            let n = step * 10 + i;
            assert_eq!(sender.say(&format!("m-{n}"), &n.to_string()).await, n + 1);
        }
        wait_archived(&pg, "seam", step * 10 + 10).await;
    }
    // The stream was trimmed (`MAXLEN ~ 20` trims whole nodes): reads below it need PostgreSQL.
    let first = redis
        .cmd(&["XRANGE", "arch2:{seam}:history", "-", "+", "COUNT", "1"])
        .await;
    let oldest: u64 = first
        .split("\r\n")
        .find_map(|l| l.strip_suffix("-0")?.parse().ok())
        .unwrap();
    assert!(oldest > 100, "the Redis window starts at {oldest}");

    // A history frame on the other replica, across the seam: no gap, no duplicate.
    let (mut reader, _) = b.join("/ws/seam?user=bob").await;
    let before = oldest + 10;
    reader
        .send_json(json!({"type": "history", "before": before, "limit": 50, "ref": "h1"}))
        .await;
    let page = reader.next_of("history").await;
    assert_eq!(page["epoch"], epoch.as_str());
    assert_eq!(
        offsets(&page["messages"]),
        (before - 50..before).collect::<Vec<_>>()
    );
    assert_eq!(page["messages"][0]["text"], format!("m-{}", before - 51));
    reader
        .send_json(json!({"type": "history", "before": 31, "limit": 30, "ref": "h2"}))
        .await;
    let page = reader.next_of("history").await;
    assert_eq!(offsets(&page["messages"]), (1..=30).collect::<Vec<_>>());

    // The HTTP API reads the same.
    let auth = format!("Bearer {KEY}");
    let reply = b
        .http(
            "GET",
            &format!("/api/rooms/seam/history?before={before}&limit=50"),
            &[("Authorization", auth.as_str())],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(
        offsets(&body["messages"]),
        (before - 50..before).collect::<Vec<_>>(),
        "{body}"
    );

    // A resume from far behind the window replays everything after it, in order, once.
    let (mut again, welcome) = b
        .join(&format!("/ws/seam?user=cid&since=5&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(backlog(&mut again).await, (6..=400).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_replica_killed_mid_burst_and_every_replica_restarted_lose_nothing_acked() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    let env = archive_env(&pg, "1000");
    let mut a = replica(&redis, "arch3", "a", &env).await;
    let b = replica(&redis, "arch3", "b", &env).await;
    let (mut c, _) = a.join("/ws/kill?user=ann").await;
    // Acked messages, then a burst still arriving when `a` is SIGKILLed.
    let acked = say_many(&mut c, "k", 200).await;
    for i in 0..300 {
        c.send_json(json!({"type": "message", "text": format!("late-{i}")}))
            .await;
    }
    a.kill();
    drop(c);
    // `b`'s archiver takes `a`'s leases over once they run out.
    let rows = wait_archived_at_least(&pg, "kill", *acked.last().unwrap()).await;
    for (i, offset) in acked.iter().enumerate() {
        assert_eq!(rows[offset].1, format!("k-{i}"), "acked at {offset}");
    }

    // Every replica restarted: offsets go on in the same epoch, and the archive follows.
    drop(b);
    let a = replica(&redis, "arch3", "a", &env).await;
    let b = replica(&redis, "arch3", "b", &env).await;
    let (mut c, welcome) = b.join("/ws/kill?user=ann").await;
    let head = welcome["offset"].as_u64().unwrap();
    assert_eq!(welcome["epoch"], rows[&1].0.as_str());
    let more = say_many(&mut c, "after", 20).await;
    assert_eq!(more, (head + 1..=head + 20).collect::<Vec<_>>());
    wait_archived(&pg, "kill", head + 20).await;
    drop(a);
}

/// Waits until the archive holds offsets 1..=`at_least` (and maybe more) with no gap.
async fn wait_archived_at_least(
    pg: &Postgres,
    room: &str,
    at_least: u64,
) -> BTreeMap<u64, (String, String)> {
    eventually(
        Duration::from_secs(20),
        &format!("{room} archived up to {at_least}"),
        || async {
            let rows = archived(pg, room).await;
            let max = rows.keys().last().copied().unwrap_or(0);
            max >= at_least && rows.len() as u64 == max
        },
    )
    .await;
    archived(pg, room).await
}

#[tokio::test]
async fn postgresql_down_during_traffic_keeps_the_chat_going_and_the_archive_catches_up() {
    let (redis, mut pg) = (Redis::start(), Postgres::start());
    let env = archive_env(&pg, "1000");
    let a = replica(&redis, "arch4", "a", &env).await;
    let b = replica(&redis, "arch4", "b", &env).await;
    let (mut c, _) = a.join("/ws/down?user=ann").await;
    say_many(&mut c, "before", 10).await;
    wait_archived(&pg, "down", 10).await;

    pg.stop();
    // Publishes still ack: Redis is the store of record for its window.
    assert_eq!(
        say_many(&mut c, "during", 40).await,
        (11..=50).collect::<Vec<_>>()
    );
    for s in [&a, &b] {
        assert_eq!(s.http("GET", "/readyz", &[]).await.status, 200);
    }
    eventually(Duration::from_secs(10), "archive lag shown", || async {
        metric(&[&a, &b], "confab_archive_behind_messages").await >= 40.0
            && metric(&[&a, &b], "confab_archive_lag_seconds").await > 0.0
    })
    .await;
    // A few failed passes later, the outage is still logged once per replica.
    eventually(Duration::from_secs(10), "store errors counted", || async {
        metric(&[&a, &b], "confab_store_errors_total").await >= 3.0
    })
    .await;
    let logged = [&a, &b]
        .iter()
        .map(|s| s.log().matches("PostgreSQL is unavailable").count())
        .collect::<Vec<_>>();
    assert_eq!(logged.iter().sum::<usize>(), 1, "logged once: {logged:?}");

    pg.resume();
    let rows = wait_archived(&pg, "down", 50).await;
    assert_eq!(rows[&50].1, "during-39");
    eventually(Duration::from_secs(10), "lag back to 0", || async {
        metric(&[&a, &b], "confab_archive_behind_messages").await == 0.0
    })
    .await;
    eventually(DEADLINE, "the recovery is logged", || async {
        a.log().contains("PostgreSQL is back") || b.log().contains("PostgreSQL is back")
    })
    .await;
}

#[tokio::test]
async fn redis_restarted_empty_keeps_the_rooms_epoch_and_offsets_with_no_reset() {
    let (mut redis, pg) = (Redis::start(), Postgres::start());
    let env = archive_env(&pg, "1000");
    let a = replica(&redis, "arch5", "a", &env).await;
    let (mut c, welcome) = a.join("/ws/kept?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    say_many(&mut c, "m", 10).await;
    wait_archived(&pg, "kept", 10).await;

    redis.restart();
    // The same epoch, the next offset, and no `reset` on the way (`unavailable` until the
    // replica noticed the restart and is subscribed again).
    let (offset, reset) = post_after_restart(&mut c).await;
    assert!(reset.is_none(), "{reset:?}");
    assert_eq!(offset, Some(11));
    let (_, welcome) = a.join("/ws/kept?user=bob").await;
    assert_eq!(welcome["epoch"], epoch.as_str());
    assert_eq!(welcome["offset"], 11);
    let rows = wait_archived(&pg, "kept", 11).await;
    assert_eq!(rows[&11], (epoch, "after".to_owned()));
}

#[test]
fn confab_config_masks_the_postgresql_password() {
    let out = run_confab(
        &["config"],
        &[
            ("CONFAB_REDIS__URL", "redis://127.0.0.1:6379"),
            ("CONFAB_STORE__URL", "postgres://chat:hunter2@db:5432/chat"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("postgres://chat:***@db:5432/chat"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");
}

/// Rooms whose `{room}` hash tags fall in each of a three-master Cluster's slot ranges.
fn rooms_on_every_master() -> Vec<String> {
    let mut picked: [Vec<String>; 3] = Default::default();
    for i in 0..1000 {
        let room = format!("s{i}");
        let range = match fred::util::redis_keyslot(room.as_bytes()) {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        };
        if picked[range].len() < 2 {
            picked[range].push(room);
        }
    }
    picked.concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_archivers_scan_finds_unarchived_rooms_on_every_master() {
    // Messages stored while no replica archived (nobody saw them go by): a replica that starts
    // with the archive finds them by scanning every master, and copies them all.
    let cluster = crate::fleet::RedisCluster::start();
    let pg = Postgres::start();
    let prefix = format!("t{}-arch", std::process::id());
    let env = |node: &str, archive: bool| {
        let mut env = vec![
            ("CONFAB_REDIS__URL".to_owned(), cluster.url()),
            ("CONFAB_REDIS__PREFIX".to_owned(), prefix.clone()),
            ("CONFAB_SERVER__NODE_ID".to_owned(), node.to_owned()),
        ];
        if archive {
            env.extend(archive_env(&pg, "1000"));
        }
        env
    };
    let start = |env: Vec<(String, String)>| {
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Server::start(&pairs)
    };
    let rooms = rooms_on_every_master();
    assert_eq!(rooms.len(), 6, "{rooms:?}");
    let plain = start(env("plain", false));
    plain.wait_ready(true).await;
    for room in &rooms {
        let (mut c, _) = plain.join(&format!("/ws/{room}?user=ann")).await;
        assert_eq!(say_many(&mut c, room, 5).await, vec![1, 2, 3, 4, 5]);
    }
    drop(plain);

    let archiving = start(env("archiver", true));
    archiving.wait_ready(true).await;
    for room in &rooms {
        let rows = wait_archived(&pg, room, 5).await;
        assert_eq!(rows[&5].1, format!("{room}-4"));
    }
}

#[tokio::test]
async fn postgresql_down_longer_than_the_redis_window_is_counted_and_logged_and_does_not_wedge() {
    let (redis, mut pg) = (Redis::start(), Postgres::start());
    let env = archive_env(&pg, "20");
    let a = replica(&redis, "arch6", "a", &env).await;
    let (mut c, _) = a.join("/ws/gap?user=ann").await;
    say_many(&mut c, "before", 5).await;
    wait_archived(&pg, "gap", 5).await;

    pg.stop();
    // Far more than the window keeps (`MAXLEN ~ 20` trims whole nodes of 100 entries).
    assert_eq!(*say_many(&mut c, "during", 400).await.last().unwrap(), 405);
    pg.resume();
    eventually(Duration::from_secs(20), "the loss counted", || async {
        metric(&[&a], "confab_archive_lost_total").await > 0.0
    })
    .await;
    a.wait_log("were dropped by Redis before they were archived")
        .await;
    // The archive has what Redis still had, up to the head, and goes on after it: every
    // offset is archived or counted lost (read again each time: on a busy machine the loss
    // may be found in more than one pass).
    assert_eq!(say_many(&mut c, "after", 3).await, vec![406, 407, 408]);
    eventually(
        Duration::from_secs(30),
        "archived after the hole",
        || async {
            let rows = archived(&pg, "gap").await;
            let lost = metric(&[&a], "confab_archive_lost_total").await as u64;
            rows.len() as u64 + lost == 408 && rows.keys().last() == Some(&408)
        },
    )
    .await;
    let rows = archived(&pg, "gap").await;
    assert!(
        (1..=5).all(|o| rows.contains_key(&o)),
        "the archived start stays"
    );
}

#[tokio::test]
async fn redis_back_older_than_the_archive_keeps_the_rooms_epoch_and_offsets_with_no_reset() {
    // A restored snapshot (or a failover to a lagging replica): the room's meta is there, at
    // an offset below what PostgreSQL and the clients already have.
    let dir = crate::harness::TempDir::new("older");
    let (mut redis, pg) = (Redis::start_persisting(&dir.path), Postgres::start());
    let env = archive_env(&pg, "1000");
    let a = replica(&redis, "arch7", "a", &env).await;
    let (mut c, welcome) = a.join("/ws/older?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    say_many(&mut c, "m", 5).await;
    wait_archived(&pg, "older", 5).await;
    assert!(redis.cmd(&["SAVE"]).await.starts_with("+OK"));
    assert_eq!(say_many(&mut c, "n", 5).await, (6..=10).collect::<Vec<_>>());
    wait_archived(&pg, "older", 10).await;
    eventually(
        Duration::from_secs(10),
        "nothing left to archive",
        || async { metric(&[&a], "confab_archive_behind_messages").await == 0.0 },
    )
    .await;

    redis.restart();
    assert!(
        redis
            .cmd(&["HGET", "arch7:{older}:meta", "offset"])
            .await
            .ends_with("\r\n5\r\n"),
        "Redis came back with the snapshot's offset 5"
    );
    // The client saw offset 10: the same epoch, the next offset is 11, no `reset`.
    let (offset, reset) = post_after_restart(&mut c).await;
    assert!(reset.is_none(), "{reset:?}");
    assert_eq!(offset, Some(11));
    let rows = wait_archived(&pg, "older", 11).await;
    assert_eq!(rows[&11], (epoch.clone(), "after".to_owned()));
    assert!(rows.values().all(|(e, _)| *e == epoch), "one epoch");
    assert_eq!(rows[&7].1, "n-1", "the archive kept the first message at 7");
    eventually(Duration::from_secs(10), "the raise counted", || async {
        metric(&[&a], "confab_archive_raised_total").await == 1.0
    })
    .await;
    assert_eq!(metric(&[&a], "confab_archive_conflicts_total").await, 0.0);

    // History and resume across the seam (the restored stream, the archive): no gap, no
    // duplicate.
    let (mut reader, welcome) = a.join("/ws/older?user=bob").await;
    assert_eq!(welcome["epoch"], epoch.as_str());
    assert_eq!(welcome["offset"], 11);
    reader
        .send_json(json!({"type": "history", "limit": 50, "ref": "h1"}))
        .await;
    let page = reader.next_of("history").await;
    assert_eq!(offsets(&page["messages"]), (1..=11).collect::<Vec<_>>());
    assert_eq!(page["messages"][6]["text"], "n-1");
    let (mut again, welcome) = a
        .join(&format!("/ws/older?user=cid&since=3&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(backlog(&mut again).await, (4..=11).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_offset_redis_hands_out_again_is_kept_once_in_the_archive_counted_and_the_room_moves_on()
{
    let (redis, pg) = (Redis::start(), Postgres::start());
    let env = archive_env(&pg, "1000");
    let a = replica(&redis, "arch8", "a", &env).await;
    let (mut c, welcome) = a.join("/ws/reused?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    say_many(&mut c, "m", 3).await;
    wait_archived(&pg, "reused", 3).await;
    // The archive holds offset 4 of the epoch for another message than Redis will hand it to
    // (as when Redis came back older and was not raised before a publish).
    let store = pg.store().await;
    let first =
        r#"{"type":"message","room":"reused","offset":4,"user":"zed","text":"first","ts":1}"#;
    sqlx::query(
        "INSERT INTO messages (room, epoch, msg_offset, ts, user_id, client_ref, frame) \
         VALUES ('reused', $1, 4, 1, 'zed', NULL, $2)",
    )
    .bind(&epoch)
    .bind(first)
    .execute(store.pool())
    .await
    .unwrap();

    assert_eq!(c.say("second", "s").await, 4);
    eventually(Duration::from_secs(10), "the conflict counted", || async {
        metric(&[&a], "confab_archive_conflicts_total").await == 1.0
    })
    .await;
    a.wait_log("were handed out again by Redis").await;
    let rows = archived(&pg, "reused").await;
    assert_eq!(
        rows[&4],
        (epoch.clone(), "first".to_owned()),
        "the archive keeps the first"
    );

    // The room moved to a new epoch after the archive's head: no offset of it is reused.
    let (_, welcome) = a.join("/ws/reused?user=bob").await;
    let renewed = welcome["epoch"].as_str().unwrap().to_owned();
    assert_ne!(renewed, epoch);
    assert_eq!(welcome["offset"], 4);
    assert_eq!(c.say("third", "t").await, 5);
    eventually(
        Duration::from_secs(10),
        "the new epoch archived",
        || async {
            archived(&pg, "reused").await.get(&5) == Some(&(renewed.clone(), "third".to_owned()))
        },
    )
    .await;
    assert_eq!(metric(&[&a], "confab_archive_conflicts_total").await, 1.0);
}

#[tokio::test]
async fn a_room_nobody_reads_that_redis_brought_back_older_is_raised_by_the_archiver() {
    // No member, so no read after the reconnect: the archiver's pass, which would copy the
    // snapshot's unarchived tail, compares the room with the archive first.
    let dir = crate::harness::TempDir::new("older-idle");
    let (mut redis, pg) = (Redis::start_persisting(&dir.path), Postgres::start());
    let env = archive_env(&pg, "1000");
    let a = replica(&redis, "arch9", "a", &env).await;
    let (mut c, _) = a.join("/ws/idle?user=ann").await;
    say_many(&mut c, "m", 5).await;
    wait_archived(&pg, "idle", 5).await;
    // The snapshot is taken while the mark is behind (as when it is taken mid-lag).
    redis
        .cmd(&["HSET", "arch9:{idle}:meta", "archived", "3"])
        .await;
    assert!(redis.cmd(&["SAVE"]).await.starts_with("+OK"));
    say_many(&mut c, "n", 5).await;
    wait_archived(&pg, "idle", 10).await;
    drop(c);
    eventually(Duration::from_secs(10), "the room closed", || async {
        metric(&[&a], "confab_rooms_open").await == 0.0
    })
    .await;

    redis.restart();
    eventually(Duration::from_secs(20), "the room raised", || async {
        redis
            .cmd(&["HGET", "arch9:{idle}:meta", "offset"])
            .await
            .ends_with("\r\n10\r\n")
    })
    .await;
    // Counted after the script's answer: waited for, then exactly once.
    eventually(Duration::from_secs(10), "the raise counted", || async {
        metric(&[&a], "confab_archive_raised_total").await >= 1.0
    })
    .await;
    assert_eq!(metric(&[&a], "confab_archive_raised_total").await, 1.0);
    a.wait_log("offset 5 in Redis, 10 archived").await;
    let rows = archived(&pg, "idle").await;
    assert_eq!(rows.len(), 10);
    assert_eq!(rows[&7].1, "n-1");
    assert_eq!(metric(&[&a], "confab_archive_conflicts_total").await, 0.0);
    let (mut c, welcome) = a.join("/ws/idle?user=ann").await;
    assert_eq!(welcome["offset"], 10);
    assert_eq!(c.say("after", "after").await, 11);
}

#[tokio::test]
async fn redis_back_older_with_unarchived_messages_lost_still_resets_clients_that_saw_them() {
    // Clients saw 12, the archive has 10, the snapshot 5: raised to 10, the room is still
    // below what they saw, and offsets 11 and 12 must not be handed out again in the epoch.
    let dir = crate::harness::TempDir::new("older-lost");
    let (mut redis, pg) = (Redis::start_persisting(&dir.path), Postgres::start());
    let env = archive_env(&pg, "1000");
    let a = replica(&redis, "arch10", "a", &env).await;
    let (mut c, welcome) = a.join("/ws/lost?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    say_many(&mut c, "m", 5).await;
    wait_archived(&pg, "lost", 5).await;
    assert!(redis.cmd(&["SAVE"]).await.starts_with("+OK"));
    say_many(&mut c, "n", 5).await;
    wait_archived(&pg, "lost", 10).await;
    // Another holder's lease keeps the archivers off the room: 11 and 12 stay unarchived.
    let lease = redis
        .cmd(&["SET", "arch10:{lost}:archiver", "elsewhere", "PX", "600000"])
        .await;
    assert!(lease.starts_with("+OK"), "{lease}");
    assert_eq!(say_many(&mut c, "u", 2).await, vec![11, 12]);

    redis.restart();
    let (offset, reset) = post_after_restart(&mut c).await;
    let reset = match reset {
        Some(r) => r,
        None => c.next_of("reset").await,
    };
    assert_ne!(reset["epoch"], epoch.as_str(), "{reset}");
    assert_eq!(offset, Some(13), "after everything any client saw");
    let (_, welcome) = a.join("/ws/lost?user=bob").await;
    assert_eq!(welcome["epoch"], reset["epoch"]);
    assert_eq!(welcome["offset"], 13);
    assert_eq!(
        metric(&[&a], "confab_archive_raised_total").await,
        1.0,
        "raised to 10 first"
    );
    assert_eq!(metric(&[&a], "confab_archive_conflicts_total").await, 0.0);
}

#[tokio::test]
async fn redis_lost_with_unarchived_messages_and_every_replica_restarted_reuses_no_offset_a_client_saw(
) {
    // The archive copied up to 105 of a room whose clients saw 255 (a pass copies at most its
    // share of the batch, here 100), then Redis restarted empty and so did every replica: no
    // sequencer remembers 255, only the archive's row, which recorded the head its pass saw.
    let (mut redis, pg) = (Redis::start(), Postgres::start());
    let mut env = archive_env(&pg, "1000");
    env.push(("CONFAB_STORE__ARCHIVE_BATCH".into(), "100".into()));
    let a = replica(&redis, "arch11", "a", &env).await;
    let (mut c, welcome) = a.join("/ws/gone?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    say_many(&mut c, "m", 5).await;
    wait_archived(&pg, "gone", 5).await;
    // Another holder's lease keeps the archivers off the room while 250 more are acked.
    let lease = redis
        .cmd(&["SET", "arch11:{gone}:archiver", "elsewhere", "PX", "600000"])
        .await;
    assert!(lease.starts_with("+OK"), "{lease}");
    assert_eq!(
        say_many(&mut c, "u", 250).await,
        (6..=255).collect::<Vec<_>>()
    );
    drop(c);
    drop(a);
    // An uncommitted row at 150 holds that key: the first pass (6..105, having seen 255)
    // commits, every later one waits on it and fails, so 106..255 stay unarchived.
    let store = pg.store().await;
    let mut hold = store.pool().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO messages (room, epoch, msg_offset, ts, user_id, client_ref, frame) \
         VALUES ('gone', $1, 150, 1, 'zed', NULL, '{}')",
    )
    .bind(&epoch)
    .execute(&mut *hold)
    .await
    .unwrap();
    redis.cmd(&["DEL", "arch11:{gone}:archiver"]).await;
    let b = replica(&redis, "arch11", "b", &env).await;
    eventually(
        Duration::from_secs(20),
        "a pass copied up to 105 having seen 255",
        || async {
            let row: Option<(i64, i64)> =
                sqlx::query_as("SELECT head_offset, seen_offset FROM rooms WHERE room = 'gone'")
                    .fetch_optional(store.pool())
                    .await
                    .unwrap();
            row == Some((105, 255))
        },
    )
    .await;

    // Redis lost, and every replica restarted: a fresh process, no sequencer memory.
    drop(b);
    redis.restart();
    let b = replica(&redis, "arch11", "b", &env).await;
    hold.rollback().await.unwrap();
    let (mut c, welcome) = b
        .join(&format!("/ws/gone?user=ann&since=255&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], false, "{welcome}");
    let renewed = welcome["epoch"].as_str().unwrap().to_owned();
    assert_ne!(
        renewed, epoch,
        "not seeded in the epoch offsets were lost from"
    );
    assert_eq!(welcome["offset"], 255, "{welcome}");
    assert_eq!(c.say("after", "after").await, 256, "no offset reused");
    assert_eq!(metric(&[&b], "confab_archive_lost_total").await, 150.0);
    b.wait_log("unarchived messages were lost with Redis").await;

    // History of the new epoch: only what came after, no duplicate offset.
    c.send_json(json!({"type": "history", "limit": 50, "ref": "h1"}))
        .await;
    let page = c.next_of("history").await;
    assert_eq!(page["epoch"], renewed.as_str());
    assert_eq!(offsets(&page["messages"]), vec![256]);
    eventually(
        Duration::from_secs(10),
        "the new epoch archived",
        || async {
            archived(&pg, "gone").await.get(&256) == Some(&(renewed.clone(), "after".to_owned()))
        },
    )
    .await;
    let rows = archived(&pg, "gone").await;
    assert!(
        rows.range(..=105).all(|(_, (e, _))| *e == epoch),
        "{rows:?}"
    );
    assert_eq!(rows.range(106..=255).count(), 0, "the lost stretch");
    // The new epoch's claim is stamped no older than the row it was seeded from, so its head
    // replaces the old epoch's.
    let row: (String, i64, i64) =
        sqlx::query_as("SELECT epoch, head_offset, seen_offset FROM rooms WHERE room = 'gone'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(row, (renewed.clone(), 256, 256));
}

/// Makes the replica behind `c` take `room`'s archive lease (`key`) and keep it: an
/// uncommitted row at offset `head + 2` holds that key, so the pass copying the next three
/// messages (`n-0`..`n-2`) waits on it (up to half a lease, then again) with the lease taken.
/// Returns that transaction, to be rolled back.
async fn hold_lease(
    redis: &Redis,
    pg: &Postgres,
    c: &mut Client,
    (room, key): (&str, &str),
    epoch: &str,
    head: u64,
    node: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let store = pg.store().await;
    let mut hold = store.pool().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO messages (room, epoch, msg_offset, ts, user_id, client_ref, frame) \
         VALUES ($1, $2, $3, 1, 'zed', NULL, '{}')",
    )
    .bind(room)
    .bind(epoch)
    .bind((head + 2) as i64)
    .execute(&mut *hold)
    .await
    .unwrap();
    assert_eq!(
        say_many(c, "n", 3).await,
        (head + 1..=head + 3).collect::<Vec<_>>()
    );
    // The lease holds the holder's token: the node id, a slash, a random part.
    let token = format!("\r\n{node}/");
    eventually(
        Duration::from_secs(10),
        &format!("{node} holds {room}'s lease"),
        || async { redis.cmd(&["GET", key]).await.contains(&token) },
    )
    .await;
    hold
}

/// Settings for a replica whose archive lease lasts far longer than a test waits, so only a
/// lease given up lets another replica in in time; and a short drain.
fn long_lease_env(pg: &Postgres) -> Vec<(String, String)> {
    let mut env = archive_env(pg, "1000");
    env.push(("CONFAB_STORE__ARCHIVE_LEASE_MS".into(), "30000".into()));
    env.push(("CONFAB_SERVER__SHUTDOWN_GRACE_SECS".into(), "2".into()));
    env
}

#[tokio::test]
async fn a_replica_stopped_cleanly_lets_go_of_its_archive_leases_so_another_archives_its_rooms_at_once(
) {
    let (redis, pg) = (Redis::start(), Postgres::start());
    let env = long_lease_env(&pg);
    let mut a = replica(&redis, "arch12", "a", &env).await;
    let (mut c, welcome) = a.join("/ws/handoff?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    say_many(&mut c, "m", 3).await;
    wait_archived(&pg, "handoff", 3).await;
    let lease_key = "arch12:{handoff}:archiver";
    let hold = hold_lease(&redis, &pg, &mut c, ("handoff", lease_key), &epoch, 3, "a").await;
    // `b` starts while `a` holds the lease: its start's scan finds the room busy, and it would
    // look again only when that lease ran out.
    let b = replica(&redis, "arch12", "b", &env).await;
    let (mut d, _) = b.join("/ws/handoff?user=bob").await;
    assert_eq!(d.say("b-0", "b0").await, 7);

    drop(c);
    a.signal(libc::SIGTERM);
    let status = a.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", a.log());
    hold.rollback().await.unwrap();
    assert_eq!(d.say("b-1", "b1").await, 8);
    // Well under the 30 s lease: `b` took the room over as soon as `a` let it go.
    eventually(Duration::from_secs(10), "b archived the room", || async {
        archived(&pg, "handoff")
            .await
            .keys()
            .copied()
            .collect::<Vec<_>>()
            == (1..=8).collect::<Vec<_>>()
    })
    .await;
    let rows = archived(&pg, "handoff").await;
    assert_eq!(rows[&5], (epoch.clone(), "n-1".to_owned()));
    assert_eq!(rows[&8], (epoch, "b-1".to_owned()));
    assert!(
        a.log().contains("released 1 archive leases"),
        "logged:\n{}",
        a.log()
    );
    let lease = redis.cmd(&["GET", lease_key]).await;
    assert!(!lease.contains("\r\na/"), "a's lease is gone: {lease}");
}

#[tokio::test]
async fn a_replica_stopped_cleanly_leaves_alone_a_lease_another_replica_took_meanwhile() {
    let (redis, pg) = (Redis::start(), Postgres::start());
    let env = long_lease_env(&pg);
    let mut a = replica(&redis, "arch13", "a", &env).await;
    let (mut c, welcome) = a.join("/ws/taken?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    say_many(&mut c, "m", 3).await;
    wait_archived(&pg, "taken", 3).await;
    let lease_key = "arch13:{taken}:archiver";
    let hold = hold_lease(&redis, &pg, &mut c, ("taken", lease_key), &epoch, 3, "a").await;
    // As if `a` had paused past its lease and another replica had taken the room: `a` still
    // counts the room as its own.
    let taken = redis
        .cmd(&["SET", lease_key, "elsewhere", "PX", "600000"])
        .await;
    assert!(taken.starts_with("+OK"), "{taken}");

    drop(c);
    a.signal(libc::SIGTERM);
    let status = a.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", a.log());
    let lease = redis.cmd(&["GET", lease_key]).await;
    assert!(
        lease.contains("\r\nelsewhere\r\n"),
        "the other's lease stays: {lease}"
    );
    assert!(
        a.log().contains("released 0 archive leases"),
        "logged:\n{}",
        a.log()
    );
    hold.rollback().await.unwrap();
}

#[tokio::test]
async fn a_replica_stopped_cleanly_while_redis_is_silent_still_exits_and_its_lease_runs_out_by_itself(
) {
    let (redis, pg) = (Redis::start(), Postgres::start());
    let env = long_lease_env(&pg);
    let mut a = replica(&redis, "arch14", "a", &env).await;
    let (mut c, welcome) = a.join("/ws/silent?user=ann").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    say_many(&mut c, "m", 3).await;
    wait_archived(&pg, "silent", 3).await;
    let lease_key = "arch14:{silent}:archiver";
    let hold = hold_lease(&redis, &pg, &mut c, ("silent", lease_key), &epoch, 3, "a").await;

    // Connections stay open and nothing answers: every step of the release gives up after
    // Redis's command timeout instead of holding the exit.
    redis.signal(libc::SIGSTOP);
    drop(c);
    a.signal(libc::SIGTERM);
    let status = a.wait_exit(Duration::from_secs(30));
    redis.signal(libc::SIGCONT);
    assert!(status.success(), "{status:?}\n{}", a.log());
    assert!(
        a.log().contains("released 0 archive leases"),
        "logged:\n{}",
        a.log()
    );
    let lease = redis.cmd(&["GET", lease_key]).await;
    assert!(lease.contains("\r\na/"), "left to run out: {lease}");
    // Still on its own expiry (the 30 s lease), not kept for good.
    let ttl = redis.cmd(&["PTTL", lease_key]).await;
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap_or(-3);
    assert!(ttl > 0 && ttl <= 30_000, "PTTL {ttl}");
    hold.rollback().await.unwrap();
}
