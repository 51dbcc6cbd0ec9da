//! History on connect and resume with `since`/`epoch` (docs/PROTOCOL.md §9).

use serde_json::Value;

use crate::harness::Server;

/// The offsets of the `message` frames that arrive before the first `presence` frame (the
/// end of the backlog a joining session is sent).
async fn backlog(c: &mut crate::harness::Client) -> Vec<u64> {
    let mut offsets = Vec::new();
    loop {
        let v: Value = c.next_of_any(&["message", "presence"]).await;
        if v["type"] == "presence" {
            return offsets;
        }
        offsets.push(v["offset"].as_u64().unwrap());
    }
}

#[tokio::test]
async fn history_on_connect_sends_the_latest_messages_after_the_welcome() {
    let server = Server::start(&[("CONFAB_LIMITS__BURST", "50")]);
    let (mut a, _) = server.join("/ws/h?user=alice").await;
    for i in 1..=10 {
        a.say(&format!("m{i}"), &format!("{i}")).await;
    }
    let (mut b, welcome) = server.join("/ws/h?user=bob&history=3").await;
    assert_eq!(welcome["offset"], 10);
    assert_eq!(backlog(&mut b).await, vec![8, 9, 10]);
    let (mut c, _) = server.join("/ws/h?user=cid&history=1000").await;
    assert_eq!(
        backlog(&mut c).await,
        (1..=10).collect::<Vec<_>>(),
        "capped at 100, all 10 fit"
    );
}

#[tokio::test]
async fn resume_after_disconnect_delivers_exactly_what_was_missed() {
    let server = Server::start(&[("CONFAB_LIMITS__BURST", "50")]);
    let (mut a, welcome) = server.join("/ws/r?user=alice").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let (mut b, _) = server.join("/ws/r?user=bob").await;
    for i in 1..=5 {
        b.say(&format!("m{i}"), &format!("{i}")).await;
    }
    let mut last = 0;
    while last < 5 {
        last = a.next_of("message").await["offset"].as_u64().unwrap();
    }
    a.close().await;
    for i in 6..=9 {
        b.say(&format!("m{i}"), &format!("{i}")).await;
    }
    let (mut a, welcome) = server
        .join(&format!("/ws/r?user=alice&since={last}&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["offset"], 9);
    assert_eq!(backlog(&mut a).await, vec![6, 7, 8, 9]);
    b.say("live", "10").await;
    let live = a.next_of("message").await;
    assert_eq!(
        (live["offset"].as_u64(), live["text"].as_str()),
        (Some(10), Some("live"))
    );
}

#[tokio::test]
async fn resume_at_the_newest_offset_recovers_with_nothing_to_replay() {
    let server = Server::start(&[]);
    let (mut a, welcome) = server.join("/ws/r?user=alice").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    a.say("one", "1").await;
    let (mut again, welcome) = server
        .join(&format!("/ws/r?user=alice&since=1&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true);
    assert!(backlog(&mut again).await.is_empty());
}

#[tokio::test]
async fn resume_with_a_wrong_epoch_or_beyond_the_newest_is_not_recovered() {
    let server = Server::start(&[]);
    let (mut a, welcome) = server.join("/ws/r?user=alice").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    a.say("one", "1").await;
    a.say("two", "2").await;
    let (mut w, welcome) = server
        .join("/ws/r?user=bob&since=1&epoch=somethingelse")
        .await;
    assert_eq!(welcome["recovered"], false);
    assert_eq!(
        welcome["epoch"],
        epoch.as_str(),
        "the welcome tells the current epoch"
    );
    assert!(backlog(&mut w).await.is_empty(), "no partial replay");
    let (mut f, welcome) = server
        .join(&format!("/ws/r?user=bob&since=7&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], false);
    assert!(backlog(&mut f).await.is_empty());
}

#[tokio::test]
async fn resume_from_before_the_oldest_retained_message_is_not_recovered() {
    // History is the bus's window only without a store (with one, tests/it/store.rs).
    let server = Server::start(&[
        ("CONFAB_STORE__URL", "memory"),
        ("CONFAB_HISTORY__SIZE", "3"),
        ("CONFAB_LIMITS__BURST", "50"),
    ]);
    let (mut a, welcome) = server.join("/ws/r?user=alice").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for i in 1..=6 {
        a.say(&format!("m{i}"), &format!("{i}")).await;
    }
    // Kept: 4, 5, 6. since=3 needs 4..6: recovered. since=2 needs 3: gone.
    let (mut ok, welcome) = server
        .join(&format!("/ws/r?user=bob&since=3&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true);
    assert_eq!(backlog(&mut ok).await, vec![4, 5, 6]);
    let (mut gone, welcome) = server
        .join(&format!("/ws/r?user=bob&since=2&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], false);
    assert!(backlog(&mut gone).await.is_empty());
}

#[tokio::test]
async fn an_unrecovered_resume_may_still_ask_for_history() {
    let server = Server::start(&[]);
    let (mut a, _) = server.join("/ws/r?user=alice").await;
    a.say("one", "1").await;
    let (mut b, welcome) = server
        .join("/ws/r?user=bob&since=0&epoch=stale&history=5")
        .await;
    assert_eq!(welcome["recovered"], false);
    assert_eq!(backlog(&mut b).await, vec![1]);
}

#[tokio::test]
async fn a_resume_longer_than_resume_max_messages_is_not_recovered_and_replays_nothing() {
    let server = Server::start(&[
        ("CONFAB_LIMITS__BURST", "50"),
        ("CONFAB_LIMITS__RESUME_MAX_MESSAGES", "20"),
    ]);
    let (mut a, welcome) = server.join("/ws/far?user=alice").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for i in 1..=30 {
        a.say(&format!("m{i}"), &format!("{i}")).await;
    }
    // 30 behind: more than 20, so no partial replay; the latest 5 come as asked instead.
    let (mut far, welcome) = server
        .join(&format!("/ws/far?user=bob&since=0&epoch={epoch}&history=5"))
        .await;
    assert_eq!(welcome["recovered"], false);
    assert_eq!(backlog(&mut far).await, (26..=30).collect::<Vec<_>>());
    // 20 behind is within the limit: every one of them.
    let (mut near, welcome) = server
        .join(&format!("/ws/far?user=cid&since=10&epoch={epoch}"))
        .await;
    assert_eq!(welcome["recovered"], true);
    assert_eq!(backlog(&mut near).await, (11..=30).collect::<Vec<_>>());
}
