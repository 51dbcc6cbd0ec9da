//! A highly available Redis under confab: acks that wait for a Redis replica
//! (`redis.replicas_to_ack`), and a Sentinel failover while a client publishes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::say_with_retry;
use crate::fleet::{redis_cli, replica_args, replica_of, wait_until, SentinelSet};
use crate::harness::{http, Client, Redis, Server, DEADLINE};

const KEY: &str = "k-failover";

fn prefix(test: &str) -> String {
    format!("t{}-{test}", std::process::id())
}

fn fast<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
        ("CONFAB_LIMITS__BURST", "100000"),
        ("CONFAB_API__KEY", KEY),
    ];
    env.extend_from_slice(extra);
    env
}

/// Entries in a room's history stream on one Redis.
fn stored(redis: &Redis, prefix: &str, room: &str) -> usize {
    redis_cli(
        redis.port,
        &["XLEN", &format!("{prefix}:{{{room}}}:history")],
    )
    .parse()
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_waits_for_a_redis_replica_and_an_unconfirmed_message_is_retried_with_its_ref() {
    let master = Redis::start();
    let replica = replica_of(master.port);
    let p = prefix("wait");
    let a = Server::replica(
        &master,
        &p,
        "a",
        &fast(&[
            ("CONFAB_REDIS__REPLICAS_TO_ACK", "1"),
            // The default: at 500 ms one WAIT of the burst timed out once on a machine busy
            // with two builds, and the stopped replica below costs the test only 2 s.
            ("CONFAB_REDIS__COMMAND_TIMEOUT_MS", "2000"),
        ]),
    )
    .await;
    let (mut c, _) = a.join("/ws/w?user=ann").await;

    // Back to back: the waits are grouped, and offsets still follow send order.
    const BURST: u64 = 200;
    for i in 1..=BURST {
        c.send_json(json!({"type":"message","text":format!("m{i}"),"ref":format!("r{i}")}))
            .await;
    }
    let mut acks = Vec::new();
    while acks.len() < BURST as usize {
        let v = c.next().await;
        assert_ne!(v["type"], "error", "{v}");
        if v["type"] == "ack" {
            acks.push(v["offset"].as_u64().unwrap());
        }
    }
    assert_eq!(acks, (1..=BURST).collect::<Vec<_>>(), "acks in send order");
    assert_eq!(
        stored(&replica, &p, "w"),
        BURST as usize,
        "every acked message is on the replica"
    );

    // The replica stops answering: the message is stored on the master (and delivered), but
    // not confirmed in time, so the sender hears `unavailable`.
    replica.signal(libc::SIGSTOP);
    c.send_json(json!({"type":"message","text":"late","ref":"late"}))
        .await;
    let mut delivered = None;
    let refused = loop {
        let v = c.next().await;
        match v["type"].as_str() {
            Some("message") => delivered = v["offset"].as_u64(),
            Some("error") => break v,
            Some("ack") => panic!("acked without the replica: {v}"),
            _ => {}
        }
    };
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("unavailable"), Some("late")),
        "{refused}"
    );
    assert_eq!(stored(&master, &p, "w"), BURST as usize + 1);

    // The replica is back: the retry with the same ref finds the stored message, waits for the
    // replica again and acks it under its first offset; nothing is stored or sent twice.
    replica.signal(libc::SIGCONT);
    let offset = say_with_retry(&mut c, "late", "late").await;
    assert_eq!(
        offset,
        BURST + 1,
        "the retry is acked with the first offset"
    );
    if delivered.is_none() {
        let v = c.next_of("message").await;
        delivered = v["offset"].as_u64();
    }
    assert_eq!(delivered, Some(BURST + 1), "delivered live once");
    assert!(
        c.try_next(Duration::from_millis(300)).await.is_none(),
        "no second delivery"
    );
    assert_eq!(stored(&master, &p, "w"), BURST as usize + 1);
    wait_until(DEADLINE, "the replica has it", || {
        stored(&replica, &p, "w") == BURST as usize + 1
    });
}

/// The master's port as the Sentinel on `port` names it.
fn sentinel_master(port: u16) -> Option<u16> {
    let reply = redis_cli(
        port,
        &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", crate::fleet::SERVICE],
    );
    reply.lines().nth(1)?.trim().parse().ok()
}

/// A `redis-server` on `port` replicating `master`, once synced.
fn replica_on(port: u16, master: u16) -> Redis {
    let args = replica_args(port, master);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let replica = Redis::start_with(port, &args);
    wait_until(
        Duration::from_secs(20),
        "the old master syncs as a replica",
        || redis_cli(port, &["INFO", "replication"]).contains("master_link_status:up"),
    );
    replica
}

/// Records whether a replica's `/readyz` went from ready to not ready and back.
fn watch_readiness(server: &Server, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u16>> {
    let addr = server.addr;
    tokio::spawn(async move {
        let mut seen: Vec<u16> = Vec::new();
        let end = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Acquire) && Instant::now() < end {
            let status = http(addr, "GET", "/readyz", &[]).await.status;
            if seen.last() != Some(&status) {
                seen.push(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    })
}

/// Message frames `(epoch, offset, text)` in arrival order, with the epoch a `reset` starts.
async fn read_messages(
    client: &mut Client,
    epoch: &str,
    last_text: &str,
) -> Vec<(String, u64, String)> {
    let mut epoch = epoch.to_owned();
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    while out
        .last()
        .map(|(_, _, t): &(String, u64, String)| t.as_str())
        != Some(last_text)
    {
        // Not `next`'s 10 s: a split Sentinel vote alone holds messages back that long.
        let left = end.saturating_duration_since(Instant::now());
        let Some(v) = client.try_next(left).await else {
            panic!("{last_text} never arrived");
        };
        match v["type"].as_str() {
            Some("reset") => epoch = v["epoch"].as_str().unwrap().to_owned(),
            Some("message") => out.push((
                epoch.clone(),
                v["offset"].as_u64().unwrap(),
                v["text"].as_str().unwrap().to_owned(),
            )),
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_loses_no_acked_message_when_acks_wait_for_a_replica() {
    const MESSAGES: usize = 60;
    const KILL_AFTER: usize = 20;
    let mut set = SentinelSet::start();
    let url = set.url();
    let p = prefix("sentinel");
    let env = fast(&[
        ("CONFAB_REDIS__URL", url.as_str()),
        ("CONFAB_REDIS__REPLICAS_TO_ACK", "1"),
        ("CONFAB_REDIS__COMMAND_TIMEOUT_MS", "1000"),
    ]);
    let mut a_env = env.clone();
    a_env.extend([
        ("CONFAB_REDIS__PREFIX", p.as_str()),
        ("CONFAB_SERVER__NODE_ID", "a"),
    ]);
    let mut b_env = env.clone();
    b_env.extend([
        ("CONFAB_REDIS__PREFIX", p.as_str()),
        ("CONFAB_SERVER__NODE_ID", "b"),
    ]);
    let a = Server::start(&a_env);
    let b = Server::start(&b_env);
    a.wait_ready(true).await;
    b.wait_ready(true).await;

    let (mut on_a, welcome) = a.join("/ws/f?user=ra").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let (mut on_b, _) = b.join("/ws/f?user=rb").await;
    let (mut sender, _) = a.join("/ws/f?user=sender").await;
    let stop = Arc::new(AtomicBool::new(false));
    let watch_a = watch_readiness(&a, Arc::clone(&stop));
    let watch_b = watch_readiness(&b, Arc::clone(&stop));
    let last = format!("m{}", MESSAGES - 1);
    let readers = {
        let (epoch, last) = (epoch.clone(), last.clone());
        tokio::spawn(async move {
            let va = read_messages(&mut on_a, &epoch, &last).await;
            let vb = read_messages(&mut on_b, &epoch, &last).await;
            (va, vb)
        })
    };

    let old_master = set.master.port;
    let promoted_port = set.replica.port;
    let sentinels = set.sentinel_ports.clone();
    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut killed_at = None;
    let mut comeback = None;
    for i in 0..MESSAGES {
        if i == KILL_AFTER {
            set.master.kill();
            killed_at = Some(Instant::now());
            // Once the Sentinels have promoted the replica, the old master comes back empty as
            // a replica of the new one (as a restarted pod would), so acks can be confirmed
            // again. Before the promotion it must stay down: an empty master that comes back
            // in time would be synced from.
            let sentinels = sentinels.clone();
            comeback = Some(tokio::task::spawn_blocking(move || {
                // A split vote among the Sentinels retries after 2 × failover-timeout (10 s);
                // on a loaded machine that can happen twice. All three must name the new
                // master first: a Sentinel still on the old view that sees the old master
                // back once turned the promoted replica into its replica (the run then ended
                // with the empty old master in charge).
                wait_until(
                    Duration::from_secs(60),
                    "every Sentinel names the promoted replica",
                    || {
                        sentinels
                            .iter()
                            .all(|&s| sentinel_master(s) == Some(promoted_port))
                    },
                );
                replica_on(old_master, promoted_port)
            }));
        }
        let text = format!("m{i}");
        let offset = say_with_retry(&mut sender, &text, &format!("r{i}")).await;
        acked.push((text, offset));
    }
    let recovered_in = killed_at.unwrap().elapsed();
    stop.store(true, Ordering::Release);
    assert_eq!(
        set.master_port(),
        Some(set.replica.port),
        "the replica was promoted"
    );
    let _old_master_back = comeback.unwrap().await.unwrap();

    for (name, watch) in [("a", watch_a), ("b", watch_b)] {
        let seen = watch.await.unwrap();
        assert!(
            seen.windows(3).any(|w| w == [200, 503, 200]),
            "replica {name} turned not ready and ready again: {seen:?}"
        );
    }
    let (va, vb) = tokio::time::timeout(Duration::from_secs(60), readers)
        .await
        .unwrap()
        .unwrap();
    for (name, seen) in [("a", &va), ("b", &vb)] {
        let mut at: HashMap<&str, Vec<(&str, u64)>> = HashMap::new();
        for (epoch, offset, text) in seen {
            at.entry(text.as_str())
                .or_default()
                .push((epoch.as_str(), *offset));
        }
        let mut previous = 0;
        for (text, offset) in &acked {
            let copies = at.get(text.as_str()).cloned().unwrap_or_default();
            assert_eq!(
                copies.len(),
                1,
                "acked {text} delivered exactly once on replica {name}: {copies:?}"
            );
            assert_eq!(copies[0].1, *offset, "{text} at its acked offset on {name}");
            let position = seen.iter().position(|(_, _, t)| t == text).unwrap();
            assert!(position >= previous, "{text} in ack order on {name}");
            previous = position;
        }
        let mut keys: Vec<(&str, u64)> = seen.iter().map(|(e, o, _)| (e.as_str(), *o)).collect();
        let before = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), before, "no (epoch, offset) twice on {name}");
    }
    // And in history, from the new master.
    let history = a
        .http(
            "GET",
            "/api/rooms/f/history?limit=100",
            &[("Authorization", &format!("Bearer {KEY}"))],
        )
        .await
        .json();
    let stored: HashMap<String, u64> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m: &Value| {
            (
                m["text"].as_str().unwrap().to_owned(),
                m["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    for (text, offset) in &acked {
        assert_eq!(stored.get(text), Some(offset), "{text} is in history");
    }
    eprintln!("sentinel failover: publishing went on {recovered_in:?} after the kill");
}
