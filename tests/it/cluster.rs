//! Several replicas on one real Redis: shared rooms, one order, resume across replicas, and
//! no acked message lost to Redis faults.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{burst_publisher, eventually, Client, Redis, Server, DEADLINE};

const FAST: [(&str, &str); 2] = [
    ("CONFAB_LIMITS__MESSAGES_PER_SEC", "100000"),
    ("CONFAB_LIMITS__BURST", "100000"),
];

fn prefix(test: &str) -> String {
    format!("t{}-{test}", std::process::id())
}

/// Collects `n` message frames (skipping everything else) within the deadline per frame.
async fn collect(client: &mut Client, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v = client.next().await;
        assert_ne!(v["type"], "error", "{v}");
        if v["type"] == "message" {
            out.push(v);
        }
    }
    out
}

fn offsets(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_deliver_two_publishers_in_one_order() {
    const EACH: usize = 300;
    let redis = Redis::start();
    let p = prefix("order");
    let a = Server::replica(&redis, &p, "a", &FAST).await;
    let b = Server::replica(&redis, &p, "b", &FAST).await;
    let c = Server::replica(&redis, &p, "c", &FAST).await;
    let (mut on_a, _) = a.join("/ws/x?user=ann").await;
    let (mut on_b, _) = b.join("/ws/x?user=bob").await;
    let (mut on_c, _) = c.join("/ws/x?user=cid").await;
    let (pa, _) = a.join("/ws/x?user=pa").await;
    let (pb, _) = b.join("/ws/x?user=pb").await;
    let mut senders = Vec::new();
    for (name, client) in [("pa", pa), ("pb", pb)] {
        senders.push(burst_publisher(client, name.to_owned(), EACH));
    }
    let total = 2 * EACH;
    let (va, vb, vc) = tokio::join!(
        collect(&mut on_a, total),
        collect(&mut on_b, total),
        collect(&mut on_c, total)
    );
    for s in senders {
        s.await.unwrap();
    }
    assert_eq!(
        offsets(&va),
        (1..=total as u64).collect::<Vec<_>>(),
        "contiguous offsets"
    );
    let texts = |v: &[Value]| {
        v.iter()
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        texts(&va),
        texts(&vb),
        "replica b delivers the same sequence"
    );
    assert_eq!(
        texts(&va),
        texts(&vc),
        "replica c delivers the same sequence"
    );
}

#[tokio::test]
async fn a_client_resumes_on_another_replica_after_its_replica_is_killed() {
    let redis = Redis::start();
    let p = prefix("kill");
    let a = Server::replica(&redis, &p, "a", &[]).await;
    let b = Server::replica(&redis, &p, "b", &[]).await;
    let (mut alice, welcome) = a.join("/ws/r?user=alice").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let mut last = 0;
    for i in 1..=3 {
        last = alice.say(&format!("m{i}"), &format!("{i}")).await;
    }
    assert_eq!(last, 3);
    a.signal(libc::SIGKILL);
    let (mut bob, _) = b.join("/ws/r?user=bob").await;
    for i in 4..=6 {
        bob.say(&format!("m{i}"), &format!("{i}")).await;
    }
    let (mut back, welcome) = b
        .join(&format!("/ws/r?user=alice&since={last}&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    let missed = collect(&mut back, 3).await;
    assert_eq!(offsets(&missed), vec![4, 5, 6]);
    assert_eq!(missed[0]["text"], "m4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_pubsub_connections_loses_no_acked_message() {
    const MESSAGES: u64 = 300;
    let redis = Redis::start();
    let p = prefix("clientkill");
    let a = Server::replica(&redis, &p, "a", &FAST).await;
    let b = Server::replica(&redis, &p, "b", &FAST).await;
    let (mut on_a, _) = a.join("/ws/k?user=ra").await;
    let (mut on_b, _) = b.join("/ws/k?user=rb").await;
    let (mut sender, _) = a.join("/ws/k?user=sender").await;
    let readers = tokio::spawn(async move {
        let (va, vb) = tokio::join!(
            collect_until(&mut on_a, MESSAGES),
            collect_until(&mut on_b, MESSAGES)
        );
        (va, vb)
    });
    let mut acked = Vec::new();
    let mut kills = 0;
    for i in 0..MESSAGES {
        if i % 100 == 50 {
            let reply = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
            assert!(reply.starts_with(':'), "CLIENT KILL said {reply}");
            kills += 1;
        }
        // A publish refused while the replica resubscribes is retried with the same ref.
        acked.push(say_with_retry(&mut sender, &format!("m{i}"), &format!("r{i}")).await);
    }
    assert_eq!(kills, 3);
    for replica in [&a, &b] {
        // A replica with nothing to publish notices a killed subscription by itself, so it
        // may log its resubscription a moment after the last ack.
        eventually(
            DEADLINE,
            "the replica noticed the kills and resubscribed",
            || async { replica.log().matches("subscribed to").count() >= 2 },
        )
        .await;
    }
    assert_eq!(
        acked,
        (1..=MESSAGES).collect::<Vec<_>>(),
        "acks are contiguous"
    );
    let (va, vb) = tokio::time::timeout(Duration::from_secs(60), readers)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        va, acked,
        "every acked message exactly once, in order, on replica a"
    );
    assert_eq!(
        vb, acked,
        "every acked message exactly once, in order, on replica b"
    );
}

/// Reads message offsets until `last` has arrived; panics on a repeat or a frame out of order.
async fn collect_until(client: &mut Client, last: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let v = client.next().await;
        if v["type"] == "message" {
            seen.push(v["offset"].as_u64().unwrap());
        }
    }
    seen
}

pub(crate) async fn say_with_retry(client: &mut Client, text: &str, reference: &str) -> u64 {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        client
            .send_json(json!({"type":"message","text":text,"ref":reference}))
            .await;
        loop {
            let v = client.next().await;
            if v["type"] == "ack" && v["ref"] == reference {
                return v["offset"].as_u64().unwrap();
            }
            if v["type"] == "error" && v["ref"] == reference {
                assert_eq!(v["code"], "unavailable", "{v}");
                break;
            }
        }
        assert!(Instant::now() < end, "publish never went through");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_redis_restart_turns_replicas_unready_then_resets_rooms() {
    let mut redis = Redis::start();
    let p = prefix("restart");
    let a = Server::replica(&redis, &p, "a", &[]).await;
    let b = Server::replica(&redis, &p, "b", &[]).await;
    let (mut on_a, welcome) = a.join("/ws/z?user=ann").await;
    let old_epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let (mut on_b, _) = b.join("/ws/z?user=bob").await;
    on_a.say("before", "b1").await;
    collect(&mut on_b, 1).await;

    redis.kill();
    a.wait_ready(false).await;
    b.wait_ready(false).await;
    let reason = a.http("GET", "/readyz", &[]).await.json();
    assert!(
        reason["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{reason}"
    );
    on_a.send_json(json!({"type":"message","text":"during","ref":"d1"}))
        .await;
    let e = on_a.next_of("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("unavailable"), Some("d1"))
    );

    let restarted = Instant::now();
    redis.restart();
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    assert!(
        restarted.elapsed() < Duration::from_secs(15),
        "recovered in {:?}",
        restarted.elapsed()
    );

    // Sessions stayed open; the first message of the new epoch comes after a reset.
    let (mut sender, _) = a.join("/ws/z?user=dan").await;
    let offset = say_with_retry(&mut sender, "after", "a1").await;
    assert_eq!(offset, 1, "offsets restart in the new epoch");
    for client in [&mut on_b, &mut on_a] {
        let reset = client.next_of("reset").await;
        assert_ne!(reset["epoch"], old_epoch.as_str());
        let m = client.next_of("message").await;
        assert_eq!(
            (m["offset"].as_u64(), m["text"].as_str()),
            (Some(1), Some("after"))
        );
    }
    let (_c, welcome) = b
        .join(&format!("/ws/z?user=cid&since=1&epoch={old_epoch}"))
        .await;
    assert_eq!(
        welcome["recovered"], false,
        "no partial replay across a lost history"
    );
}

#[tokio::test]
async fn presence_and_typing_span_replicas_and_a_dead_replicas_users_leave() {
    let redis = Redis::start();
    let p = prefix("presence");
    let lease = [("CONFAB_REDIS__PRESENCE_LEASE_SECS", "2")];
    let a = Server::replica(&redis, &p, "a", &lease).await;
    let b = Server::replica(&redis, &p, "b", &lease).await;
    let (mut alice, _) = a.join("/ws/p?user=alice").await;
    let (mut bob, _) = b.join("/ws/p?user=bob").await;
    let presence = bob.next_of("presence").await;
    assert_eq!(presence["users"], json!(["alice", "bob"]));
    assert_eq!(alice.next_of("join").await["user"], "bob");
    alice.send_json(json!({"type":"typing"})).await;
    assert_eq!(
        bob.next_of("typing").await["user"],
        "alice",
        "typing crosses replicas"
    );

    let killed = Instant::now();
    b.signal(libc::SIGKILL);
    let leave = alice.next_of("leave").await;
    assert_eq!(leave["user"], "bob");
    assert!(killed.elapsed() < Duration::from_secs(30));
    alice.send_json(json!({"type":"presence"})).await;
    assert_eq!(alice.next_of("presence").await["users"], json!(["alice"]));
}

#[tokio::test]
async fn a_silent_redis_is_noticed_within_seconds() {
    let redis = Redis::start();
    let p = prefix("silent");
    let a = Server::replica(&redis, &p, "a", &[]).await;
    let (mut c, _) = a.join("/ws/s?user=ann").await;
    assert_eq!(c.say("before", "b").await, 1);
    // Frozen, not gone: TCP stays up and nothing answers, as with a hung host.
    redis.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    a.wait_ready(false).await;
    assert!(
        frozen.elapsed() < Duration::from_secs(10),
        "noticed after {:?}",
        frozen.elapsed()
    );
    redis.signal(libc::SIGCONT);
    a.wait_ready(true).await;
    assert_eq!(
        say_with_retry(&mut c, "after", "a").await,
        2,
        "same epoch, nothing lost"
    );
}
