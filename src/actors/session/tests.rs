//! The session core on its own: table tests (inputs → effects) and a model test that drives
//! it with arbitrary interleavings and checks each room's promises from the client's side.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::metrics::Metrics;

fn cfg(rooms_per_connection: usize) -> Arc<SessionConfig> {
    limited(rooms_per_connection, 1000, 100_000)
}

/// A config with this message rate limit.
fn limited(rooms_per_connection: usize, messages_per_sec: u32, burst: u32) -> Arc<SessionConfig> {
    configured(rooms_per_connection, messages_per_sec, burst, |_| {})
}

/// A config with this message rate limit, then changed by `change`.
fn configured(
    rooms_per_connection: usize,
    messages_per_sec: u32,
    burst: u32,
    change: impl FnOnce(&mut SessionConfig),
) -> Arc<SessionConfig> {
    let mut config = SessionConfig {
        node: Arc::from("n"),
        max_frame_bytes: 65536,
        max_message_chars: 100,
        messages_per_sec,
        burst,
        max_violations: 50,
        session_queue: 64,
        session_queue_bytes: 1 << 20,
        ping_interval: Duration::from_secs(25),
        client_timeout: Duration::from_secs(60),
        rooms_per_connection,
        metrics: Arc::new(Metrics::new().unwrap()),
    };
    change(&mut config);
    Arc::new(config)
}

/// Admission that lets every room in.
struct Open;

impl RoomSlots for Open {
    fn enter(&mut self, _: &RoomName) -> bool {
        true
    }
    fn leave(&mut self, _: &RoomName) {}
}

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

/// A core on `/ws/{path}`, or on `/ws` without one.
fn core(path: Option<&str>, rooms: usize) -> SessionCore {
    let identity = Identity::anonymous(UserId::parse("ann").unwrap());
    let path = path.map(|p| PathRoom {
        room: room(p),
        may_publish: true,
        resume: None,
        history: 0,
    });
    let now = Instant::now();
    SessionCore::new(
        cfg(rooms),
        0,
        identity,
        path,
        Quotas::default(),
        Box::new(Open),
        now,
    )
}

/// Every effect queued, shown as a line: writes as their frame's type and the fields a
/// test cares about.
fn drain(core: &mut SessionCore) -> Vec<String> {
    std::iter::from_fn(|| core.next_effect())
        .map(|e| show(&e))
        .collect()
}

fn show(effect: &Effect) -> String {
    match effect {
        Effect::Write(text) => {
            let v: Value = serde_json::from_str(text).unwrap();
            let mut line = format!("write {}", v["type"].as_str().unwrap_or_default());
            for key in ["room", "ref", "offset", "code"] {
                if let Some(x) = v.get(key) {
                    line += &format!(" {key}={}", x.to_string().trim_matches('"'));
                }
            }
            line
        }
        Effect::Publish { room, messages } => {
            let texts: Vec<&str> = messages.iter().map(|m| m.text.as_str()).collect();
            format!("publish {room} {}", texts.join(","))
        }
        Effect::History { room, .. } => format!("history {room}"),
        Effect::Subscribe { tag, room, .. } => format!("subscribe {room} tag={tag}"),
        Effect::Unsubscribe { room, .. } => format!("unsubscribe {room}"),
        Effect::AskPresence { room, .. } => format!("presence {room}"),
        Effect::Typing { room } => format!("typing {room}"),
        Effect::Ping => "ping".into(),
        Effect::RoomsApart(apart) => format!("apart {apart}"),
        Effect::Close(why) => format!("close {}", why.code()),
    }
}

fn send(core: &mut SessionCore, frame: Value) {
    core.text(ByteString::from(frame.to_string()), Instant::now());
}

fn welcome(core: &mut SessionCore, tag: u32) -> Option<Delivery> {
    let out = Outbound::Welcome {
        epoch: Epoch::from_string("e"),
        offset: 0,
        recovered: None,
    };
    core.deliver(tag, out, Instant::now())
}

fn ok(offset: Offset) -> Result<Published, BusError> {
    Ok(Published {
        epoch: Epoch::from_string("e"),
        offset,
        duplicate: false,
    })
}

fn frame_of(room: &str, n: u64) -> Outbound {
    Outbound::Frame(ByteString::from(
        json!({"type":"message","room":room,"offset":n}).to_string(),
    ))
}

#[test]
fn on_a_path_room_frames_wait_for_its_welcome_and_then_go_as_one_run() {
    let mut c = core(Some("home"), 10);
    assert_eq!(drain(&mut c), ["subscribe home tag=1"]);
    c.text(ByteString::from_static("hi"), Instant::now());
    send(&mut c, json!({"type":"ping"}));
    c.end_of_batch();
    assert!(drain(&mut c).is_empty(), "nothing before the welcome");
    assert_eq!(welcome(&mut c, 1), None);
    c.end_of_batch();
    assert_eq!(
        drain(&mut c),
        [
            "write welcome room=home offset=0",
            "publish home hi",
            "write pong"
        ]
    );
    c.published(ok(1), Instant::now());
    assert_eq!(drain(&mut c), ["write ack room=home offset=1"]);
}

#[test]
fn subscribes_spend_a_budget_of_their_own_and_leave_the_messages_burst_alone() {
    // A message burst of 1 at one a second; subscribes get rooms_per_connection (5) at once.
    let identity = Identity::anonymous(UserId::parse("ann").unwrap());
    let now = Instant::now();
    let mut c = SessionCore::new(
        limited(5, 1, 1),
        0,
        identity,
        None,
        Quotas::default(),
        Box::new(Open),
        now,
    );
    drain(&mut c);
    for (n, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        c.text(
            ByteString::from(json!({"type":"subscribe","room":name}).to_string()),
            now,
        );
        assert_eq!(drain(&mut c), [format!("subscribe {name} tag={}", n + 1)]);
    }
    assert_eq!(welcome(&mut c, 1), None);
    drain(&mut c);
    let message = json!({"type":"message","room":"a","text":"hi","ref":"m"}).to_string();
    c.text(ByteString::from(message.clone()), now);
    c.end_of_batch();
    assert_eq!(
        drain(&mut c),
        ["publish a hi"],
        "the burst of 1 is still there"
    );
    c.text(
        ByteString::from(json!({"type":"unsubscribe","room":"b","ref":"u"}).to_string()),
        now,
    );
    assert_eq!(
        drain(&mut c),
        ["write error room=b ref=u code=rate_limited"],
        "five subscribes used the room budget up"
    );
    c.text(ByteString::from(message), now);
    assert_eq!(
        drain(&mut c),
        ["write error room=a ref=m code=rate_limited"]
    );
}

#[test]
fn a_frame_for_a_room_not_welcomed_yet_is_held_and_others_go_on() {
    let mut c = core(None, 10);
    assert_eq!(drain(&mut c), ["apart true"]);
    send(&mut c, json!({"type":"subscribe","room":"a","ref":"sa"}));
    send(&mut c, json!({"type":"subscribe","room":"b","ref":"sb"}));
    assert_eq!(drain(&mut c), ["subscribe a tag=1", "subscribe b tag=2"]);
    send(
        &mut c,
        json!({"type":"message","room":"a","text":"to a","ref":"m1"}),
    );
    assert_eq!(welcome(&mut c, 2), None);
    send(
        &mut c,
        json!({"type":"message","room":"b","text":"to b","ref":"m2"}),
    );
    c.end_of_batch();
    assert_eq!(
        drain(&mut c),
        ["write welcome room=b ref=sb offset=0", "publish b to b"]
    );
    assert_eq!(welcome(&mut c, 1), None);
    c.end_of_batch();
    assert_eq!(
        drain(&mut c),
        ["write welcome room=a ref=sa offset=0", "publish a to a"]
    );
    // Answers come back in send order: b's first.
    c.published(ok(1), Instant::now());
    c.published(ok(1), Instant::now());
    assert_eq!(
        drain(&mut c),
        [
            "write ack room=b ref=m2 offset=1",
            "write ack room=a ref=m1 offset=1"
        ]
    );
}

#[test]
fn a_run_is_one_room_s_so_each_room_s_send_order_is_its_offset_order() {
    let mut c = core(None, 10);
    for (r, tag) in [("a", 1), ("b", 2)] {
        send(&mut c, json!({"type":"subscribe","room":r}));
        welcome(&mut c, tag);
    }
    drain(&mut c);
    for (r, text) in [("a", "1"), ("a", "2"), ("b", "3"), ("a", "4")] {
        send(&mut c, json!({"type":"message","room":r,"text":text}));
    }
    c.end_of_batch();
    assert_eq!(
        drain(&mut c),
        ["publish a 1,2", "publish b 3", "publish a 4"]
    );
}

#[test]
fn refusals_name_the_ref_and_the_room() {
    let mut c = core(Some("home"), 2);
    welcome(&mut c, 1);
    drain(&mut c);
    send(&mut c, json!({"type":"subscribe","room":"home","ref":"1"}));
    send(&mut c, json!({"type":"subscribe","room":"x","ref":"2"}));
    send(&mut c, json!({"type":"subscribe","room":"y","ref":"3"}));
    send(&mut c, json!({"type":"unsubscribe","room":"z","ref":"4"}));
    send(&mut c, json!({"type":"history","room":"z","ref":"5"}));
    assert_eq!(
        drain(&mut c),
        [
            "write error room=home ref=1 code=bad_request",
            "apart true",
            "subscribe x tag=2",
            "write error room=y ref=3 code=too_many_rooms",
            "write error room=z ref=4 code=bad_request",
            "write error room=z ref=5 code=bad_request",
        ]
    );
    let mut bare = core(None, 2);
    drain(&mut bare);
    bare.text(ByteString::from_static("plain"), Instant::now());
    assert_eq!(drain(&mut bare), ["write error code=bad_request"]);
}

#[test]
fn after_unsubscribed_nothing_of_the_room_is_written_and_acks_before_it_still_are() {
    let mut c = core(None, 10);
    send(&mut c, json!({"type":"subscribe","room":"a"}));
    welcome(&mut c, 1);
    send(
        &mut c,
        json!({"type":"message","room":"a","text":"x","ref":"m"}),
    );
    send(&mut c, json!({"type":"unsubscribe","room":"a","ref":"u"}));
    assert_eq!(
        drain(&mut c)[3..],
        ["publish a x", "unsubscribe a"],
        "the run goes before the unsubscribe"
    );
    assert_eq!(c.deliver(1, frame_of("a", 7), Instant::now()), None);
    c.published(ok(1), Instant::now());
    assert_eq!(
        drain(&mut c),
        [
            "write ack room=a ref=m offset=1",
            "write unsubscribed room=a ref=u"
        ]
    );
    // A new subscription of the room has a new tag; the old one's frames stay dropped.
    send(&mut c, json!({"type":"subscribe","room":"a"}));
    assert_eq!(drain(&mut c), ["subscribe a tag=2"]);
    welcome(&mut c, 2);
    assert_eq!(c.deliver(1, frame_of("a", 8), Instant::now()), None);
    assert!(c.deliver(2, frame_of("a", 8), Instant::now()).is_some());
    // A run the room encoded goes by the same rule: written as it is for the live tag only.
    let texts: Vec<ByteString> = [9, 10]
        .map(|n| ByteString::from(json!({"type":"message","room":"a","offset":n}).to_string()))
        .to_vec();
    let run = Encoded::texts(texts.iter());
    let out = || Outbound::Encoded(run.clone());
    assert_eq!(c.deliver(1, out(), Instant::now()), None);
    assert_eq!(
        c.deliver(2, out(), Instant::now()),
        Some(Delivery::Encoded(run.clone()))
    );
}

#[test]
fn a_resubscribe_waits_for_every_earlier_unsubscribed_of_its_room() {
    let mut c = core(None, 10);
    for (r, tag) in [("x", 1), ("y", 2)] {
        send(&mut c, json!({"type":"subscribe","room":r}));
        welcome(&mut c, tag);
    }
    // x left behind a publish in flight, subscribed again (deferred), then that one left
    // behind another publish in flight, and x subscribed a third time.
    send(&mut c, json!({"type":"message","room":"x","text":"p1"}));
    send(&mut c, json!({"type":"unsubscribe","room":"x","ref":"u1"}));
    send(&mut c, json!({"type":"subscribe","room":"x","ref":"s2"}));
    send(&mut c, json!({"type":"message","room":"y","text":"p2"}));
    send(&mut c, json!({"type":"unsubscribe","room":"x","ref":"u2"}));
    send(&mut c, json!({"type":"subscribe","room":"x","ref":"s3"}));
    drain(&mut c);
    // p1's answer lets u1 out; x's third subscription must still wait for u2.
    c.published(ok(1), Instant::now());
    let after_p1 = drain(&mut c);
    assert!(
        !after_p1.iter().any(|e| e.starts_with("subscribe x")),
        "attached before u2 was written: {after_p1:?}"
    );
    c.published(ok(1), Instant::now());
    assert_eq!(
        drain(&mut c),
        [
            "write ack room=y offset=1",
            "write unsubscribed room=x ref=u2",
            "subscribe x tag=4"
        ]
    );
}

#[test]
fn a_gap_ends_only_its_subscription_unless_the_path_room_is_all_there_is() {
    let mut c = core(None, 10);
    for (r, tag) in [("a", 1), ("b", 2)] {
        send(&mut c, json!({"type":"subscribe","room":r}));
        welcome(&mut c, tag);
    }
    drain(&mut c);
    c.deliver(1, Outbound::Close(Close::MissedHistory), Instant::now());
    assert_eq!(
        drain(&mut c),
        ["unsubscribe a", "write unsubscribed room=a code=4008"]
    );
    assert!(c.deliver(2, frame_of("b", 1), Instant::now()).is_some());

    let mut alone = core(Some("home"), 10);
    welcome(&mut alone, 1);
    drain(&mut alone);
    alone.deliver(1, Outbound::Close(Close::MissedHistory), Instant::now());
    assert_eq!(drain(&mut alone), ["close 4008"]);
    assert_eq!(alone.deliver(1, frame_of("home", 1), Instant::now()), None);
}

#[test]
fn a_path_room_with_company_moves_the_inbox_to_rooms_apart_and_back() {
    let mut c = core(Some("home"), 10);
    welcome(&mut c, 1);
    drain(&mut c);
    send(&mut c, json!({"type":"subscribe","room":"x"}));
    // The inbox learns first, so a gap in either room already ends only its subscription.
    assert_eq!(drain(&mut c), ["apart true", "subscribe x tag=2"]);
    send(&mut c, json!({"type":"unsubscribe","room":"x"}));
    assert_eq!(
        drain(&mut c),
        ["unsubscribe x", "apart false", "write unsubscribed room=x"]
    );
}

#[test]
fn a_history_read_holds_later_frames_until_it_is_answered() {
    let mut c = core(Some("home"), 10);
    welcome(&mut c, 1);
    drain(&mut c);
    send(&mut c, json!({"type":"history","ref":"h"}));
    assert!(!c.wants_input(), "the shell stops reading");
    send(&mut c, json!({"type":"ping"}));
    assert_eq!(drain(&mut c), ["history home"]);
    let page = HistoryPage {
        epoch: Epoch::from_string("e"),
        messages: Vec::new(),
    };
    c.history_read(Ok(page), Instant::now());
    assert!(c.wants_input());
    assert_eq!(
        drain(&mut c),
        ["write history room=home ref=h", "write pong"]
    );
}

#[test]
fn a_history_page_of_a_room_left_while_it_was_read_is_not_written() {
    let mut c = core(None, 10);
    send(&mut c, json!({"type":"subscribe","room":"a"}));
    welcome(&mut c, 1);
    drain(&mut c);
    send(&mut c, json!({"type":"history","room":"a","ref":"h"}));
    c.deliver(1, Outbound::Close(Close::MissedHistory), Instant::now());
    assert_eq!(
        drain(&mut c),
        [
            "history a",
            "unsubscribe a",
            "write unsubscribed room=a code=4008"
        ]
    );
    let page = HistoryPage {
        epoch: Epoch::from_string("e"),
        messages: Vec::new(),
    };
    c.history_read(Ok(page), Instant::now());
    assert!(
        drain(&mut c).is_empty(),
        "nothing of a after its unsubscribed"
    );
    assert!(c.wants_input());
}

#[test]
fn frames_held_for_a_welcome_are_bounded_in_bytes_too() {
    let config = configured(10, 1000, 100_000, |c| {
        c.session_queue_bytes = 10_000;
        c.max_message_chars = 4000;
    });
    let identity = Identity::anonymous(UserId::parse("ann").unwrap());
    let mut c = SessionCore::new(
        config,
        0,
        identity,
        None,
        Quotas::default(),
        Box::new(Open),
        Instant::now(),
    );
    send(&mut c, json!({"type":"subscribe","room":"a"}));
    drain(&mut c);
    // Three messages of 3,000 bytes fit in 10,000 before a's welcome; a fourth does not.
    for _ in 0..3 {
        send(
            &mut c,
            json!({"type":"message","room":"a","text":"x".repeat(3000)}),
        );
    }
    assert!(drain(&mut c).is_empty(), "held");
    send(
        &mut c,
        json!({"type":"message","room":"a","text":"x".repeat(3000)}),
    );
    assert_eq!(drain(&mut c), ["close 1008"]);
}

#[test]
fn publishes_at_the_cap_stop_reading_until_an_answer_comes_back() {
    let mut c = core(Some("home"), 10);
    welcome(&mut c, 1);
    drain(&mut c);
    for n in 0..MAX_PUBLISHES_IN_FLIGHT {
        send(&mut c, json!({"type":"message","text":n.to_string()}));
    }
    assert!(!c.wants_input());
    c.published(ok(1), Instant::now());
    assert!(c.wants_input());
}

#[test]
fn after_a_close_nothing_is_written_and_finish_stores_what_was_read_and_leaves_every_room() {
    let mut c = core(Some("home"), 10);
    send(&mut c, json!({"type":"message","text":"early"}));
    c.tick(Instant::now() + Duration::from_secs(61));
    assert_eq!(drain(&mut c), ["subscribe home tag=1", "close 1001"]);
    assert_eq!(welcome(&mut c, 1), None);
    c.finish(Instant::now());
    assert_eq!(drain(&mut c), ["publish home early", "unsubscribe home"]);
}

// ---- the model ---------------------------------------------------------------------------

const ROOMS: [&str; 3] = ["r0", "r1", "r2"];

#[derive(Debug, Clone)]
enum Op {
    Subscribe(usize, bool),
    Unsubscribe(usize),
    Publish(usize),
    Deliver(usize),
    Welcome(usize),
    Gap(usize),
    Answer,
    EndBatch,
    Close,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, any::<bool>()).prop_map(|(r, resume)| Op::Subscribe(r, resume)),
        (0..3usize).prop_map(Op::Unsubscribe),
        (0..3usize).prop_map(Op::Publish),
        (0..3usize).prop_map(Op::Publish),
        (0..3usize).prop_map(Op::Deliver),
        (0..3usize).prop_map(Op::Deliver),
        (0..3usize).prop_map(Op::Welcome),
        (0..3usize).prop_map(Op::Gap),
        Just(Op::Answer),
        Just(Op::Answer),
        Just(Op::EndBatch),
        Just(Op::Close),
    ]
}

/// The rooms' side of the model: what each room's member (by tag) was sent.
#[derive(Default)]
struct Rooms {
    /// Live members: tag → (room index, welcome sent).
    members: HashMap<u32, (usize, bool)>,
    /// Every tag ever given, by room: a room may still deliver to a member it was told left.
    tags: Vec<(usize, u32)>,
    /// Subscribe effects not matched by an Unsubscribe yet.
    attached: HashMap<u32, usize>,
    rooms_apart: bool,
    in_flight: usize,
    next_frame: u64,
}

/// The client's side: what it can check from the frames it gets.
#[derive(Default)]
struct Client {
    /// Rooms whose welcome came and whose `unsubscribed` did not.
    open: [bool; 3],
    /// Refs of messages sent per room, in order; acks must come in this order.
    sent: [Vec<String>; 3],
    acked: [usize; 3],
    closed: bool,
    refs: u64,
}

impl Client {
    fn see(&mut self, effect: &Effect) -> Result<(), String> {
        match effect {
            Effect::Write(_) | Effect::Close(_) if self.closed => {
                return Err(format!("{effect:?} after the close"))
            }
            Effect::Close(_) => self.closed = true,
            Effect::Write(text) => {
                let v: Value = serde_json::from_str(text).unwrap();
                let kind = v["type"].as_str().unwrap_or_default();
                let Some(r) = ROOMS.iter().position(|r| v["room"] == *r) else {
                    return Ok(());
                };
                match kind {
                    "welcome" if self.open[r] => return Err(format!("second welcome: {v}")),
                    "welcome" => self.open[r] = true,
                    "error" => {}
                    // Also the answer to an unsubscribe before the welcome came.
                    "unsubscribed" => self.open[r] = false,
                    _ if !self.open[r] => return Err(format!("{v} while not subscribed")),
                    "ack" => {
                        let reference = v["ref"].as_str().unwrap_or_default();
                        let at = self.sent[r][self.acked[r]..]
                            .iter()
                            .position(|s| s == reference)
                            .ok_or_else(|| format!("ack out of send order: {v}"))?;
                        self.acked[r] += at + 1;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn run_model(ops: Vec<Op>) -> Result<(), String> {
    let mut c = core(None, 2);
    let (mut rooms, mut client) = (Rooms::default(), Client::default());
    let now = Instant::now();
    let carry = |c: &mut SessionCore, rooms: &mut Rooms, client: &mut Client| {
        while let Some(e) = c.next_effect() {
            client.see(&e)?;
            match e {
                Effect::Subscribe { tag, room, .. } => {
                    let r = ROOMS.iter().position(|x| *x == room.as_str()).unwrap();
                    rooms.members.insert(tag, (r, false));
                    rooms.tags.push((r, tag));
                    rooms.attached.insert(tag, r);
                }
                Effect::Unsubscribe { member, .. } => {
                    let tag = u32::try_from(member).unwrap();
                    rooms.members.remove(&tag);
                    if rooms.attached.remove(&tag).is_none() {
                        return Err(format!("left twice or never joined: {tag}"));
                    }
                }
                Effect::Publish { messages, .. } => rooms.in_flight += messages.len(),
                Effect::RoomsApart(apart) => rooms.rooms_apart = apart,
                _ => {}
            }
        }
        Ok::<(), String>(())
    };
    for op in ops {
        match op {
            Op::Subscribe(r, resume) => {
                let mut f = json!({"type":"subscribe","room":ROOMS[r]});
                if resume {
                    f["since"] = json!(3);
                    f["epoch"] = json!("e");
                }
                send(&mut c, f);
            }
            Op::Unsubscribe(r) => send(&mut c, json!({"type":"unsubscribe","room":ROOMS[r]})),
            Op::Publish(r) => {
                client.refs += 1;
                let reference = client.refs.to_string();
                client.sent[r].push(reference.clone());
                send(
                    &mut c,
                    json!({"type":"message","room":ROOMS[r],"text":"t","ref":reference}),
                );
            }
            Op::Deliver(r) => {
                // To every tag the room ever had: a room may not have seen the leave yet.
                for (_, tag) in rooms.tags.iter().filter(|(x, _)| *x == r) {
                    let welcomed = rooms.members.get(tag).is_some_and(|(_, w)| *w);
                    let dead = !rooms.members.contains_key(tag);
                    if welcomed || dead {
                        rooms.next_frame += 1;
                        let out = frame_of(ROOMS[r], rooms.next_frame);
                        match c.deliver(*tag, out, now) {
                            Some(Delivery::Text(text)) => client.see(&Effect::Write(text))?,
                            Some(Delivery::Encoded(run)) => {
                                for text in run.decode() {
                                    client.see(&Effect::Write(text))?;
                                }
                            }
                            None => {}
                        }
                    }
                }
            }
            Op::Welcome(r) => {
                let tag = rooms
                    .members
                    .iter()
                    .find(|(_, (x, w))| *x == r && !*w)
                    .map(|(t, _)| *t);
                if let Some(tag) = tag {
                    rooms.members.insert(tag, (r, true));
                    if let Some(Delivery::Text(text)) = welcome(&mut c, tag) {
                        client.see(&Effect::Write(text))?;
                    }
                }
            }
            Op::Gap(r) => {
                let tag = rooms
                    .members
                    .iter()
                    .find(|(_, (x, w))| *x == r && *w)
                    .map(|(t, _)| *t);
                if let Some(tag) = tag {
                    // The room detaches the member and closes it, as the sequencer does.
                    rooms.members.remove(&tag);
                    let to = if rooms.rooms_apart { tag } else { CONNECTION };
                    c.deliver(to, Outbound::Close(Close::MissedHistory), now);
                }
            }
            Op::Answer if rooms.in_flight > 0 => {
                rooms.in_flight -= 1;
                c.published(ok(1), now);
            }
            Op::Answer => {}
            Op::EndBatch => c.end_of_batch(),
            Op::Close => {
                c.finish(now);
                carry(&mut c, &mut rooms, &mut client)?;
                break;
            }
        }
        carry(&mut c, &mut rooms, &mut client)?;
    }
    c.finish(now);
    carry(&mut c, &mut rooms, &mut client)?;
    if !rooms.attached.is_empty() {
        return Err(format!("rooms never left: {:?}", rooms.attached));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the order of subscribes, unsubscribes, publishes, deliveries, welcomes,
    /// gaps, answers and the close: no frame of a room outside its welcome..unsubscribed,
    /// one welcome per subscription, acks per room in send order, nothing written after the
    /// close, and every room joined is left exactly once.
    #[test]
    fn every_interleaving_keeps_each_room_s_promises(ops in proptest::collection::vec(op(), 1..60)) {
        if let Err(e) = run_model(ops) {
            prop_assert!(false, "{}", e);
        }
    }
}

#[test]
fn a_subscription_s_entry_in_the_session_table_is_small() {
    // Part of the ≤ 1 KiB a subscription may cost (docs/design.md, "Many rooms on one
    // connection"): the room's member entry and the hub's count the rest.
    let size = std::mem::size_of::<super::Sub>();
    eprintln!("Sub: {size} bytes");
    assert!(size <= 96, "{size}");
}
