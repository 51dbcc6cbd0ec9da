//! Replicas on a three-master Redis Cluster (`redis-cluster://` URL): rooms whose keys live
//! on every master keep one order across replicas, resume on another replica, and share
//! presence.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fleet::{redis_cli, RedisCluster};
use crate::harness::{burst_publisher, Client, Server, DEADLINE};

/// Messages each of a room's two publishers (one per replica) sends.
const EACH: usize = 15;

/// Two rooms in each master's slot range (0–5460, 5461–10922, 10923–16383, as
/// `redis-cli --cluster create` splits them). A room's keys share the `{room}` hash tag.
fn rooms_over_all_slot_ranges() -> Vec<String> {
    let mut picked: [Vec<String>; 3] = Default::default();
    for i in 0..1000 {
        let room = format!("c{i}");
        let slot = fred::util::redis_keyslot(room.as_bytes());
        let range = match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        };
        if picked[range].len() < 2 {
            picked[range].push(room);
        }
        if picked.iter().all(|p| p.len() == 2) {
            break;
        }
    }
    picked.concat()
}

/// The next `n` message frames as (offset, text).
async fn messages(client: &mut Client, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v = client.next().await;
        assert_ne!(v["type"], "error", "{v}");
        if v["type"] == "message" {
            out.push((
                v["offset"].as_u64().unwrap(),
                v["text"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// Asks for presence until it lists `want` (joins are recorded as sessions attach).
async fn presence_until(client: &mut Client, want: &Value) {
    let end = Instant::now() + DEADLINE;
    loop {
        client.send_json(json!({"type":"presence"})).await;
        let users = client.next_of("presence").await["users"].clone();
        if &users == want {
            return;
        }
        assert!(Instant::now() < end, "presence {users}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_carries_rooms_on_every_master_in_one_order_with_resume_and_presence() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let prefix = format!("t{}-cluster", std::process::id());
    let env = |node: &'static str| {
        vec![
            ("CONFAB_REDIS__URL", url.clone()),
            ("CONFAB_REDIS__PREFIX", prefix.clone()),
            ("CONFAB_SERVER__NODE_ID", node.to_owned()),
            ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000".to_owned()),
            ("CONFAB_LIMITS__BURST", "100000".to_owned()),
        ]
    };
    let start = |node: &'static str| {
        let env = env(node);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Server::start(&pairs)
    };
    let (a, b) = (start("a"), start("b"));
    a.wait_ready(true).await;
    b.wait_ready(true).await;

    let rooms = rooms_over_all_slot_ranges();
    assert_eq!(rooms.len(), 6, "{rooms:?}");
    for room in &rooms {
        let (mut on_a, welcome) = a.join(&format!("/ws/{room}?user=oa")).await;
        let epoch = welcome["epoch"].as_str().unwrap().to_owned();
        let (mut on_b, _) = b.join(&format!("/ws/{room}?user=ob")).await;
        let (pa, _) = a.join(&format!("/ws/{room}?user=pa")).await;
        let (pb, _) = b.join(&format!("/ws/{room}?user=pb")).await;
        presence_until(&mut on_a, &json!(["oa", "ob", "pa", "pb"])).await;
        presence_until(&mut on_b, &json!(["oa", "ob", "pa", "pb"])).await;

        let senders = [
            burst_publisher(pa, format!("{room}-a"), EACH),
            burst_publisher(pb, format!("{room}-b"), EACH),
        ];
        let (va, vb) = tokio::join!(messages(&mut on_a, 2 * EACH), messages(&mut on_b, 2 * EACH));
        for s in senders {
            s.await.unwrap();
        }
        let offsets: Vec<u64> = va.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (1..=2 * EACH as u64).collect::<Vec<_>>(),
            "{room}: contiguous offsets"
        );
        assert_eq!(va, vb, "{room}: both replicas deliver one order");
        for side in ["a", "b"] {
            let mine: Vec<&String> = va
                .iter()
                .map(|(_, t)| t)
                .filter(|t| t.starts_with(&format!("{room}-{side}-")))
                .collect();
            let sent: Vec<String> = (0..EACH).map(|i| format!("{room}-{side}-{i}")).collect();
            assert_eq!(
                mine,
                sent.iter().collect::<Vec<_>>(),
                "{room}: each sender's order kept"
            );
        }

        // Resume on the other replica after missing some.
        on_a.close().await;
        let (mut late, _) = b.join(&format!("/ws/{room}?user=pl")).await;
        for i in 0..3 {
            late.say(&format!("{room}-late-{i}"), &format!("l{i}"))
                .await;
        }
        let since = 2 * EACH;
        let (mut back, welcome) = b
            .join(&format!("/ws/{room}?user=oa&since={since}&epoch={epoch}"))
            .await;
        assert_eq!(welcome["recovered"], true, "{room}: {welcome}");
        let missed = messages(&mut back, 3).await;
        assert_eq!(
            missed.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            vec![since as u64 + 1, since as u64 + 2, since as u64 + 3],
            "{room}: resumed without gap or repeat"
        );
    }
    for node in &cluster.nodes {
        let keys: u64 = redis_cli(node.port, &["DBSIZE"]).parse().unwrap_or(0);
        assert!(keys > 0, "master {} holds some rooms' keys", node.port);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_an_ack_waits_for_a_replica_of_the_master_that_holds_the_room() {
    let cluster = RedisCluster::start();
    // Only the first master (slots 0-5460) has a replica.
    let _replica = cluster.add_replica(0);
    let url = cluster.url();
    let prefix = format!("t{}-clusterwait", std::process::id());
    let a = Server::start(&[
        ("CONFAB_REDIS__URL", url.as_str()),
        ("CONFAB_REDIS__PREFIX", prefix.as_str()),
        ("CONFAB_SERVER__NODE_ID", "a"),
        ("CONFAB_REDIS__REPLICAS_TO_ACK", "1"),
        ("CONFAB_REDIS__COMMAND_TIMEOUT_MS", "300"),
    ]);
    a.wait_ready(true).await;
    let rooms = rooms_over_all_slot_ranges();
    for (i, room) in rooms.iter().enumerate() {
        let (mut c, _) = a.join(&format!("/ws/{room}?user=ann")).await;
        c.send_json(json!({"type":"message","text":"hi","ref":"r"}))
            .await;
        let answer = c.next_of_any(&["ack", "error"]).await;
        if i < 2 {
            // The WAIT went to the room's master, whose replica confirmed.
            assert_eq!(answer["type"], "ack", "{room}: {answer}");
        } else {
            // The room's master has no replica: a WAIT routed anywhere else would pass.
            assert_eq!(
                (answer["type"].as_str(), answer["code"].as_str()),
                (Some("error"), Some("unavailable")),
                "{room}: {answer}"
            );
        }
    }
}
