//! The sequencer's table tests and randomized model test.
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use proptest::prelude::*;

use super::*;
use crate::bus::Renewed;

/// A member's socket as the test sees it: every frame offered, in order.
#[derive(Clone, Default)]
struct Socket(Rc<RefCell<Vec<Outbound>>>);

impl Outlet for Socket {
    fn offer(&self, out: Outbound, _: bool) -> Offer {
        match out {
            // A run is what its frames one by one would be: the checks read those.
            Outbound::Encoded(run) => {
                let frames = run.decode().into_iter().map(Outbound::Frame);
                self.0.borrow_mut().extend(frames);
            }
            out => self.0.borrow_mut().push(out),
        }
        Offer::Sent
    }
}

fn room() -> RoomName {
    RoomName::parse("r").unwrap()
}

/// The store side of the bus: one room, bounded history, epochs, and the faults.
struct Store {
    epoch: Epoch,
    offset: Offset,
    messages: BTreeMap<Offset, ByteString>,
    size: usize,
    next_id: u64,
    epochs: u64,
    /// Epochs started by `renew`: only a store that went back may need one.
    renewals: u64,
    /// Where a renewed epoch continues; what is stored up to it is the old epoch's.
    base: Offset,
    /// The highest offset handed out in the current epoch, also if the store later lost it:
    /// what another replica that saw it renews from.
    high: Offset,
}

impl Store {
    fn new(size: usize) -> Self {
        Self {
            epoch: Epoch::from_string("e0"),
            offset: 0,
            messages: BTreeMap::new(),
            size,
            next_id: 0,
            epochs: 0,
            renewals: 0,
            base: 0,
            high: 0,
        }
    }

    fn head(&self) -> RoomHead {
        RoomHead {
            epoch: self.epoch.clone(),
            offset: self.offset,
        }
    }

    fn publish(&mut self) -> RoomEvent {
        self.offset += 1;
        self.high = self.high.max(self.offset);
        self.next_id += 1;
        let json = ByteString::from(format!(
            r#"{{"type":"message","epoch":"{}","offset":{},"id":{}}}"#,
            self.epoch, self.offset, self.next_id
        ));
        self.messages.insert(self.offset, json.clone());
        while self.messages.len() > self.size {
            self.messages.pop_first();
        }
        RoomEvent {
            room: room(),
            kind: EventKind::Message {
                epoch: self.epoch.clone(),
                offset: self.offset,
            },
            json,
        }
    }

    fn new_epoch(&mut self) -> Epoch {
        self.epochs += 1;
        Epoch::from_string(&format!("e{}", self.epochs))
    }

    fn replay(&self, since: Offset, epoch: &Epoch) -> Replay {
        let since = since.max(self.base);
        let oldest = self
            .messages
            .keys()
            .next()
            .copied()
            .unwrap_or(self.offset + 1);
        if *epoch != self.epoch || since > self.offset || since + 1 < oldest {
            return Replay::NotRecovered { head: self.head() };
        }
        let messages = self
            .messages
            .range(since + 1..)
            .map(|(o, j)| StoredMessage {
                offset: *o,
                json: j.clone(),
            })
            .collect();
        Replay::Recovered {
            head: self.head(),
            messages,
        }
    }

    fn renew(&mut self, stale: &Epoch, floor: Offset) -> Renewed {
        let created = self.epoch == *stale;
        if created {
            self.renewals += 1;
            self.epoch = self.new_epoch();
            self.offset = self.offset.max(floor);
            self.base = self.offset;
            self.high = self.offset;
        }
        Renewed {
            head: self.head(),
            created,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A message is published; the live event arrives, is lost, or arrives twice. Most
    /// arrive at once (with whatever waits in the room's queue before them); some wait in
    /// the queue, for a later arrival or [`Op::Deliver`] to take them as one batch.
    Publish(u8),
    /// The room takes the events waiting in its queue, as one batch (a notice in its
    /// mailbox, [`crate::actors::room::EventsQueued`]).
    Deliver,
    Join,
    Sync,
    Leave(usize),
    Resync,
    /// The outstanding bus call runs on the store now; its answer comes later.
    Execute,
    /// The oldest unsynced member's head read runs on the store now.
    SyncRead,
    /// The outstanding bus call answers (or fails); it runs now if it has not yet.
    Answer(bool),
    /// Redis restarted empty: a new epoch from offset 1.
    Lose,
    /// The store went back to an older state of the same epoch. That takes a failover or a
    /// restore, so the bus reconnects and the room is told to resync before the new store's
    /// events reach it.
    GoBack(u8),
    /// Another replica noticed the store went back first and renewed the epoch, continuing
    /// after everything it had delivered; the stream keeps the old epoch's messages.
    RenewedElsewhere,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..10).prop_map(Op::Publish),
        2 => Just(Op::Deliver),
        2 => Just(Op::Join),
        2 => Just(Op::Sync),
        1 => (0usize..8).prop_map(Op::Leave),
        1 => Just(Op::Resync),
        4 => any::<bool>().prop_map(Op::Answer),
        2 => Just(Op::Execute),
        1 => Just(Op::SyncRead),
        1 => Just(Op::Lose),
        1 => (1u8..6).prop_map(Op::GoBack),
        1 => Just(Op::RenewedElsewhere),
    ]
}

struct World {
    store: Store,
    seq: Sequencer<Socket>,
    sockets: HashMap<SessionId, Socket>,
    unsynced: Vec<SessionId>,
    next_session: SessionId,
    step: Option<Step>,
    /// The outstanding step's result, when it already ran on the store.
    executed: Option<Executed>,
    /// Head reads of syncing members that already ran.
    heads: HashMap<SessionId, RoomHead>,
    /// Events in the room's queue, not yet taken.
    queued: Vec<RoomEvent>,
}

enum Executed {
    Read(Replay),
    Renew(Renewed),
}

impl World {
    fn new(size: usize) -> Self {
        Self {
            store: Store::new(size),
            seq: Sequencer::new(room(), 1 << 20),
            sockets: HashMap::new(),
            unsynced: Vec::new(),
            next_session: 1,
            step: None,
            executed: None,
            heads: HashMap::new(),
            queued: Vec::new(),
        }
    }

    /// The room takes its queue.
    fn deliver(&mut self) {
        let events = std::mem::take(&mut self.queued);
        let out = self.seq.on_events(events);
        self.take(out);
    }

    fn take(&mut self, out: Outcome<Socket>) {
        for closed in out.closed {
            closed
                .handle
                .0
                .borrow_mut()
                .push(Outbound::Close(closed.why));
        }
        if let Some(step) = out.step {
            assert!(self.step.is_none(), "two bus calls outstanding");
            self.step = Some(step);
        }
    }

    fn execute(&mut self) {
        if self.executed.is_some() {
            return;
        }
        self.executed = match &self.step {
            Some(Step::Read(read)) => {
                Some(Executed::Read(self.store.replay(read.after, &read.epoch)))
            }
            Some(Step::Renew { stale, floor }) => {
                Some(Executed::Renew(self.store.renew(stale, *floor)))
            }
            None => None,
        };
    }

    fn answer(&mut self, ok: bool) {
        // A call that ran on the store has its effect even if its answer is lost.
        if ok {
            self.execute();
        }
        let Some(step) = self.step.take() else { return };
        let executed = self.executed.take();
        let out = match (step, executed) {
            (Step::Read(read), Some(Executed::Read(replay))) if ok => {
                self.seq.read_done(&read, Some(replay))
            }
            (Step::Read(read), _) => self.seq.read_done(&read, None),
            (Step::Renew { stale, floor }, Some(Executed::Renew(head))) if ok => {
                self.seq.renewed(&stale, floor, Some(head))
            }
            (Step::Renew { stale, floor }, _) => self.seq.renewed(&stale, floor, None),
        };
        self.take(out);
    }

    fn apply(&mut self, op: Op) {
        if matches!(op, Op::Join | Op::Leave(_) | Op::Resync | Op::GoBack(_)) {
            // These come through the room's mailbox, behind the notice of any event already
            // queued (the bus's reconnect, for GoBack): the room takes its queue first. Bus
            // answers (Sync, Answer) come as futures and may overtake queued events.
            self.deliver();
        }
        match op {
            Op::Publish(fate) => {
                let event = self.store.publish();
                let times = match fate {
                    0 => 0,
                    1 => 2,
                    _ => 1,
                };
                self.queued.extend(std::iter::repeat(event).take(times));
                if fate < 7 {
                    self.deliver();
                }
            }
            Op::Deliver => self.deliver(),
            Op::Join => {
                let id = self.next_session;
                self.next_session += 1;
                let socket = Socket::default();
                self.seq
                    .add(id, UserId::parse("u").unwrap(), socket.clone());
                self.sockets.insert(id, socket);
                self.unsynced.push(id);
            }
            Op::Sync => {
                if self.unsynced.is_empty() {
                    return;
                }
                let id = self.unsynced.remove(0);
                let head = self.heads.remove(&id).unwrap_or_else(|| self.store.head());
                let out = self.seq.synced(id, synced_at(head));
                self.take(out);
            }
            Op::Leave(i) => {
                let mut ids: Vec<_> = self.sockets.keys().copied().collect();
                ids.sort();
                if let Some(id) = ids.get(i) {
                    self.seq.remove(*id);
                    self.sockets.remove(id);
                    self.unsynced.retain(|s| s != id);
                }
            }
            Op::Resync => {
                let out = self.seq.resync();
                self.take(out);
            }
            Op::Answer(ok) => self.answer(ok),
            Op::Execute => self.execute(),
            Op::SyncRead => {
                if let Some(id) = self.unsynced.first() {
                    let head = self.store.head();
                    self.heads.entry(*id).or_insert(head);
                }
            }
            Op::Lose => {
                self.store.epoch = self.store.new_epoch();
                self.store.offset = 0;
                self.store.base = 0;
                self.store.high = 0;
                self.store.messages.clear();
            }
            Op::RenewedElsewhere => {
                if self.store.high > self.store.offset {
                    let (stale, high) = (self.store.epoch.clone(), self.store.high);
                    self.store.renew(&stale, high);
                }
            }
            Op::GoBack(n) => {
                // Not below a renewed epoch's start: a store older than the renewal holds
                // the epoch before it (its base is part of the state that went back).
                let back = self
                    .store
                    .offset
                    .saturating_sub(u64::from(n))
                    .max(self.store.base);
                self.store.offset = back;
                self.store.messages.retain(|o, _| *o <= back);
                let out = self.seq.resync();
                self.take(out);
            }
        }
    }

    /// Lets the bus answer everything, then asks for one more resync: what a room does
    /// after a reconnect.
    fn settle(&mut self) {
        self.deliver();
        for _ in 0..2 {
            let mut guard = 0;
            while self.step.is_some() {
                self.answer(true);
                guard += 1;
                assert!(guard < 100, "the sequencer never settles");
            }
            let out = self.seq.resync();
            self.take(out);
        }
        while self.step.is_some() {
            self.answer(true);
        }
    }
}

fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let at = json.find(&format!(r#""{key}":"#)).unwrap() + key.len() + 3;
    let rest = &json[at..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim_matches('"')
}

/// What one member was told, checked frame by frame: a contiguous run of offsets per
/// epoch, each offset meaning one message everywhere; returns where it ended, or `None`
/// when it was closed.
fn check_member(
    frames: &[Outbound],
    meaning: &mut HashMap<(String, u64), String>,
) -> Option<(String, u64)> {
    let mut at: Option<(String, u64)> = None;
    for frame in frames {
        match frame {
            Outbound::Encoded(_) => unreachable!("the test's socket decodes runs"),
            Outbound::Welcome { epoch, offset, .. } => {
                assert!(at.is_none(), "a second welcome");
                at = Some((epoch.to_string(), *offset));
            }
            Outbound::Close(why) => {
                assert_eq!(why.code(), 4008);
                return None;
            }
            Outbound::Frame(json) => {
                let (epoch, cursor) = at.as_mut().expect("a frame before the welcome");
                match field(json, "type") {
                    "reset" => {
                        *epoch = field(json, "epoch").to_owned();
                        *cursor = field(json, "offset").parse().unwrap();
                    }
                    "message" => {
                        let offset: u64 = field(json, "offset").parse().unwrap();
                        assert_eq!(field(json, "epoch"), epoch, "a message of another epoch");
                        assert_eq!(offset, *cursor + 1, "not the next offset: {json}");
                        *cursor = offset;
                        let id = field(json, "id").to_owned();
                        let seen = meaning.entry((epoch.clone(), offset)).or_insert(id.clone());
                        assert_eq!(*seen, id, "offset {offset} of {epoch} reused");
                    }
                    other => panic!("unexpected frame {other}"),
                }
            }
        }
    }
    at
}

fn run(ops: Vec<Op>, size: usize) {
    let mut world = World::new(size);
    let went_back = ops.iter().any(|op| matches!(op, Op::GoBack(_)));
    for op in ops {
        world.apply(op);
    }
    world.settle();
    if !went_back {
        assert_eq!(
            world.store.renewals, 0,
            "a new epoch for a store that never went back"
        );
    }
    let mut meaning = HashMap::new();
    for (id, socket) in &world.sockets {
        let frames = socket.0.borrow();
        let end = check_member(&frames, &mut meaning);
        if world.unsynced.contains(id) {
            continue;
        }
        if let Some((epoch, cursor)) = end {
            let head = world.store.head();
            // A member may not have heard of a new epoch that has no message yet.
            if head.offset > 0 || epoch == head.epoch.as_str() {
                assert_eq!(
                    (epoch.as_str(), cursor),
                    (head.epoch.as_str(), head.offset),
                    "member {id} was left behind"
                );
            }
        }
    }
    // What members were given of the store's current epoch is what the store holds there:
    // a store that went back and handed offsets out again was noticed, not silently mixed.
    for ((epoch, offset), id) in &meaning {
        if epoch.as_str() == world.store.epoch.as_str() {
            if let Some(stored) = world.store.messages.get(offset) {
                assert_eq!(
                    field(stored, "id"),
                    id,
                    "offset {offset} of {epoch} was replaced"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_member_sees_contiguous_offsets_per_epoch_or_is_told(
        ops in proptest::collection::vec(op(), 1..120),
        size in 3usize..40,
    ) {
        run(ops, size);
    }
}

#[test]
fn a_hole_is_read_from_history_before_newer_messages() {
    use Op::*;
    run(
        vec![
            Join,
            Sync,
            Publish(5),
            Publish(0),
            Publish(0),
            Publish(5),
            Answer(true),
        ],
        10,
    );
}

#[test]
fn a_hole_older_than_history_closes_members_behind_and_the_room_goes_on() {
    let mut world = World::new(3);
    for op in [Op::Join, Op::Sync, Op::Publish(5)] {
        world.apply(op);
    }
    for _ in 0..10 {
        world.apply(Op::Publish(0));
    }
    world.apply(Op::Publish(5));
    assert!(matches!(world.step, Some(Step::Read(_))));
    // The read from before the member's cursor finds the hole; the member's own read then
    // finds what it needs gone as well.
    while world.step.is_some() {
        world.answer(true);
    }
    let first = world.sockets[&1].0.borrow().last().cloned();
    assert!(matches!(first, Some(Outbound::Close(why)) if why.code() == 4008));
    // A member that joins later gets live messages again.
    for op in [Op::Join, Op::Sync, Op::Publish(5), Op::Publish(5)] {
        world.apply(op);
    }
    let later = world.sockets[&2].0.borrow();
    let messages = later
        .iter()
        .filter(|f| matches!(f, Outbound::Frame(j) if j.contains("message")))
        .count();
    assert_eq!(messages, 2);
}

#[test]
fn a_store_that_went_back_moves_the_room_to_a_new_epoch_with_a_reset() {
    let mut world = World::new(100);
    for op in [Op::Join, Op::Sync] {
        world.apply(op);
    }
    for _ in 0..10 {
        world.apply(Op::Publish(5));
    }
    world.apply(Op::GoBack(3));
    // Offsets 8, 9 and 10 are given out again: the members must not drop them silently.
    for _ in 0..3 {
        world.apply(Op::Publish(5));
    }
    // The reconnect's resync reads history and finds offset 10 replaced.
    assert!(matches!(world.step, Some(Step::Read(_))));
    world.answer(true);
    assert!(matches!(world.step, Some(Step::Renew { .. })));
    world.settle();
    world.apply(Op::Publish(5));
    let frames = world.sockets[&1].0.borrow();
    let reset = frames
        .iter()
        .position(|f| matches!(f, Outbound::Frame(j) if j.contains("reset")))
        .expect("a reset");
    let after: Vec<_> = frames[reset..].iter().collect();
    assert!(after.len() >= 2, "live delivery goes on after the reset");
    check_member(&frames, &mut HashMap::new());
}

#[test]
fn a_new_epoch_with_its_start_trimmed_resets_members_at_its_head() {
    let mut world = World::new(3);
    for op in [Op::Join, Op::Sync, Op::Publish(5), Op::Lose] {
        world.apply(op);
    }
    for _ in 0..6 {
        world.apply(Op::Publish(0));
    }
    world.apply(Op::Publish(5));
    world.settle();
    let frames = world.sockets[&1].0.borrow();
    assert!(frames
        .iter()
        .any(|f| matches!(f, Outbound::Frame(j) if j.contains("reset"))));
    assert_eq!(check_member(&frames, &mut HashMap::new()).unwrap().1, 7);
}

#[test]
fn stats_count_each_delivery_once_and_start_again_after_being_taken() {
    let mut world = World::new(100);
    for op in [Op::Join, Op::Sync, Op::Join, Op::Sync] {
        world.apply(op);
    }
    world.seq.take_stats();
    // Three messages, one of them arriving twice: three deliveries to each of two members.
    for op in [Op::Publish(5), Op::Publish(1), Op::Publish(5)] {
        world.apply(op);
    }
    let stats = world.seq.take_stats();
    assert_eq!(stats.delivered, 6, "{stats:?}");
    assert_eq!((stats.evicted, stats.gaps, stats.replayed), (0, 0, 0));
    assert_eq!(world.seq.take_stats(), Stats::default());
}

#[test]
fn stats_count_gaps_and_replayed_messages() {
    let mut world = World::new(10);
    for op in [Op::Join, Op::Sync, Op::Publish(5)] {
        world.apply(op);
    }
    // A short hole, filled from history: the read brings the two lost messages and the live
    // one held meanwhile (which then arrives as a repeat and is not delivered twice).
    world.apply(Op::Publish(0));
    world.apply(Op::Publish(0));
    world.apply(Op::Publish(5));
    world.answer(true);
    let stats = world.seq.take_stats();
    // Delivered: message 1 live, then 2 to 4 from the read.
    assert_eq!((stats.replayed, stats.delivered), (3, 4), "{stats:?}");
    assert_eq!(stats.gaps, 0);
    // A hole older than history: one gap.
    for _ in 0..20 {
        world.apply(Op::Publish(0));
    }
    world.apply(Op::Publish(5));
    world.answer(true);
    assert_eq!(world.seq.take_stats().gaps, 1);
}

#[test]
fn a_big_room_tells_no_joins_and_asks_for_fresh_presence_once_small_again() {
    let mut world = World::new(100);
    world.seq = Sequencer::new(room(), 1 << 20).with_announce_limit(2);
    for op in [Op::Join, Op::Sync, Op::Join, Op::Sync] {
        world.apply(op);
    }
    // Both members hold the room's presence at version 0; each join is the next version.
    let out = world.seq.presence_refresh(&PresenceSnapshot::default());
    world.take(out);
    let join = |name: &str, version| RoomEvent {
        room: room(),
        kind: EventKind::Join {
            user: UserId::parse(name).unwrap(),
            version,
        },
        json: ByteString::from(format!(r#"{{"type":"join","user":"{name}"}}"#)),
    };
    let frames = |world: &World| -> usize {
        world
            .sockets
            .values()
            .map(|s| {
                s.0.borrow()
                    .iter()
                    .filter(|o| matches!(o, Outbound::Frame(f) if f.contains("\"join\"")))
                    .count()
            })
            .sum()
    };
    let out = world.seq.on_event(join("x", 1));
    world.take(out);
    assert_eq!(frames(&world), 2, "a small room tells every member");
    world.apply(Op::Join);
    world.apply(Op::Sync);
    let out = world.seq.on_event(join("y", 2));
    world.take(out);
    assert_eq!(
        frames(&world),
        2,
        "a room of 3 over a limit of 2 tells nobody"
    );
    assert!(!world.seq.take_presence_stale(), "still big");
    let first = *world.sockets.keys().next().unwrap();
    world.seq.remove(first);
    assert!(
        world.seq.take_presence_stale(),
        "small again after a join went untold"
    );
    assert!(!world.seq.take_presence_stale(), "once");
}

/// A member's socket that refuses every frame; `gone` when its session already stopped.
struct Refusing {
    gone: bool,
}

impl Outlet for Refusing {
    fn offer(&self, _: Outbound, _: bool) -> Offer {
        Offer::Evict
    }

    fn gone(&self) -> bool {
        self.gone
    }
}

#[test]
fn a_member_whose_session_already_stopped_is_dropped_not_evicted_as_slow() {
    for gone in [true, false] {
        let mut seq = Sequencer::new(room(), 1 << 20);
        seq.add(7, UserId::parse("u").unwrap(), Refusing { gone });
        let out = seq.synced(
            7,
            Synced {
                epoch: Epoch::from_string("e0"),
                offset: 0,
                recovered: None,
                frames: Vec::new(),
                delivered: 0,
                more: false,
                tail: Vec::new(),
            },
        );
        let stats = seq.take_stats();
        if gone {
            assert!(out.closed.is_empty(), "no 4008 for a session that left");
            assert_eq!(stats.evicted, 0, "not counted as a slow consumer");
        } else {
            assert_eq!(out.closed.len(), 1);
            assert_eq!(out.closed[0].why, Close::SlowConsumer);
            assert_eq!(stats.evicted, 1);
        }
        assert!(seq.remove(7).is_none(), "detached either way");
    }
}

#[test]
fn a_member_that_joined_after_a_hole_older_than_history_is_brought_up_not_closed() {
    let mut world = World::new(3);
    for op in [Op::Join, Op::Sync, Op::Publish(5)] {
        world.apply(op);
    }
    // The room misses 2..11 (only 9..11 are kept); a member joins with the head at 11, and
    // one more message is missed after its welcome.
    for _ in 0..10 {
        world.apply(Op::Publish(0));
    }
    for op in [Op::Join, Op::Sync, Op::Publish(0), Op::Resync] {
        world.apply(op);
    }
    while world.step.is_some() {
        world.answer(true);
    }
    let old = world.sockets[&1].0.borrow();
    assert!(
        matches!(old.last(), Some(Outbound::Close(why)) if why.code() == 4008),
        "the member from before the hole is closed"
    );
    let young = world.sockets[&2].0.borrow();
    assert!(
        !young.iter().any(|f| matches!(f, Outbound::Close(_))),
        "the member whose welcome said 11 needs only 12, which is stored"
    );
    assert_eq!(
        check_member(&young, &mut HashMap::new()),
        Some(("e0".to_owned(), 12))
    );
}

#[test]
fn a_room_that_learns_of_another_replicas_renewal_replays_nothing_of_the_old_epoch() {
    let mut world = World::new(100);
    for op in [Op::Join, Op::Sync] {
        world.apply(op);
    }
    for _ in 0..10 {
        world.apply(Op::Publish(5));
    }
    // The store goes back to 7; another replica renews first, continuing after 10.
    world.store.offset = 7;
    world.store.messages.retain(|o, _| *o <= 7);
    world.apply(Op::RenewedElsewhere);
    world.apply(Op::Resync);
    world.settle();
    for _ in 0..3 {
        world.apply(Op::Publish(5));
    }
    let frames = world.sockets[&1].0.borrow();
    let end = check_member(&frames, &mut HashMap::new());
    assert_eq!(end, Some(("e1".to_owned(), 13)), "reset at 10, then 11..13");
    let messages = frames
        .iter()
        .filter(|f| matches!(f, Outbound::Frame(j) if j.contains("\"message\"")))
        .count();
    assert_eq!(messages, 13, "1..10 once, then the three new ones");
}

#[test]
fn a_resume_is_paged_past_live_messages_and_then_goes_live_without_gap_or_repeat() {
    let mut store = Store::new(100);
    let mut seq = Sequencer::new(room(), 1 << 20);
    let mut events: Vec<RoomEvent> = (0..10).map(|_| store.publish()).collect();
    for event in events.drain(..) {
        seq.on_event(event);
    }
    let socket = Socket::default();
    seq.add(1, UserId::parse("u").unwrap(), socket.clone());
    let first: Vec<ByteString> = store
        .messages
        .range(1..=3)
        .map(|(_, j)| j.clone())
        .collect();
    let out = seq.synced(
        1,
        Synced {
            epoch: store.epoch.clone(),
            offset: 10,
            recovered: Some(true),
            frames: first,
            delivered: 3,
            more: true,
            tail: Vec::new(),
        },
    );
    assert_eq!(out.pages.len(), 1, "the next page is asked for");
    let page = out.pages[0].clone();
    assert_eq!(page.after, 3);
    // A live message while the member pages: not held, it is in the store.
    seq.on_event(store.publish());
    let out = seq.page_done(&page, Some(store.replay(page.after, &page.epoch)));
    assert!(out.pages.is_empty() && out.closed.is_empty(), "caught up");
    seq.on_event(store.publish());
    let offsets: Vec<u64> = socket
        .0
        .borrow()
        .iter()
        .filter_map(|f| match f {
            Outbound::Frame(j) => Some(field(j, "offset").parse().unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(offsets, (1..=12).collect::<Vec<_>>(), "each once, in order");
}

/// A member's socket that keeps the message frames it was given and counts the offers that
/// brought them: one per frame, or one per run.
#[derive(Clone, Default)]
struct Counting {
    frames: Rc<RefCell<Vec<ByteString>>>,
    offers: Rc<std::cell::Cell<usize>>,
}

impl Outlet for Counting {
    fn offer(&self, out: Outbound, _: bool) -> Offer {
        self.offers.set(self.offers.get() + 1);
        match out {
            Outbound::Frame(text) => self.frames.borrow_mut().push(text),
            Outbound::Encoded(run) => self.frames.borrow_mut().extend(run.decode()),
            _ => {}
        }
        Offer::Sent
    }

    fn offer_run<'a>(&self, frames: impl Iterator<Item = &'a ByteString>) -> (usize, Offer) {
        self.offers.set(self.offers.get() + 1);
        let before = self.frames.borrow().len();
        self.frames.borrow_mut().extend(frames.cloned());
        (self.frames.borrow().len() - before, Offer::Sent)
    }
}

/// A plain welcome at `head`: no resume, no backlog.
fn synced_at(head: RoomHead) -> Synced {
    Synced {
        epoch: head.epoch,
        offset: head.offset,
        recovered: None,
        frames: Vec::new(),
        delivered: head.offset,
        more: false,
        tail: Vec::new(),
    }
}

/// The offsets of the message frames a socket was given, in order.
fn offsets(socket: &Counting) -> Vec<u64> {
    socket
        .frames
        .borrow()
        .iter()
        .map(|j| field(j, "offset").parse().unwrap())
        .collect()
}

/// A sequencer with three members synced at the store's head, and their sockets.
fn three_members(store: &Store) -> (Sequencer<Counting>, Vec<Counting>) {
    let mut seq = Sequencer::new(room(), 1 << 20);
    let sockets: Vec<Counting> = (0..3).map(|_| Counting::default()).collect();
    for (id, socket) in (1..).zip(&sockets) {
        seq.add(id, UserId::parse("u").unwrap(), socket.clone());
        seq.synced(id, synced_at(store.head()));
        socket.offers.set(0);
    }
    (seq, sockets)
}

#[test]
fn a_batch_of_next_messages_reaches_each_member_in_one_offer_with_what_one_at_a_time_gives() {
    let mut store = Store::new(100);
    let (mut single, single_sockets) = three_members(&store);
    let (mut batched, batched_sockets) = three_members(&store);
    // The first message sets where the room stands; the batch continues from it.
    let first = store.publish();
    single.on_event(first.clone());
    batched.on_event(first);
    single.take_stats();
    batched.take_stats();
    for socket in single_sockets.iter().chain(&batched_sockets) {
        socket.offers.set(0);
    }
    let events: Vec<RoomEvent> = (0..10).map(|_| store.publish()).collect();
    for event in events.clone() {
        single.on_event(event);
    }
    let out = batched.on_events(events);
    assert!(out.closed.is_empty() && out.step.is_none());
    for (one, run) in single_sockets.iter().zip(&batched_sockets) {
        assert_eq!(*run.frames.borrow(), *one.frames.borrow());
        assert_eq!(run.frames.borrow().len(), 11);
        assert_eq!((one.offers.get(), run.offers.get()), (10, 1));
    }
    assert_eq!(batched.take_stats(), single.take_stats());
}

#[test]
fn a_batch_with_a_hole_delivers_the_run_before_it_and_reads_the_hole() {
    let mut store = Store::new(100);
    let (mut seq, sockets) = three_members(&store);
    seq.on_event(store.publish());
    for socket in &sockets {
        socket.offers.set(0);
    }
    let mut events: Vec<RoomEvent> = (0..6).map(|_| store.publish()).collect();
    // Offset 5 never arrives: 2..4 go as a run, then 6 and 7 wait for the read of 5.
    events.remove(3);
    let out = seq.on_events(events);
    assert!(matches!(&out.step, Some(Step::Read(read)) if read.after <= 4));
    for socket in &sockets {
        assert_eq!(offsets(socket), vec![1, 2, 3, 4]);
        assert_eq!(socket.offers.get(), 1, "2..4 in one offer");
    }
    let out = seq.read_done(
        &match out.step {
            Some(Step::Read(read)) => read,
            _ => unreachable!(),
        },
        Some(store.replay(3, &store.epoch.clone())),
    );
    assert!(out.closed.is_empty());
    for socket in &sockets {
        assert_eq!(
            offsets(socket),
            (1..=7).collect::<Vec<_>>(),
            "each once, in order"
        );
    }
}

#[test]
fn a_batch_that_arrives_while_a_member_is_set_up_is_held_and_sent_after_its_welcome() {
    let mut store = Store::new(100);
    let (mut seq, _) = three_members(&store);
    seq.on_event(store.publish());
    let late = Counting::default();
    seq.add(9, UserId::parse("u").unwrap(), late.clone());
    // Its head is read now, at offset 1; three more messages arrive before the welcome.
    let head = store.head();
    let out = seq.on_events((0..3).map(|_| store.publish()).collect::<Vec<_>>());
    assert!(out.closed.is_empty());
    assert_eq!(late.offers.get(), 0, "nothing before its welcome");
    seq.synced(9, synced_at(head));
    assert_eq!(offsets(&late), vec![2, 3, 4]);
}

#[test]
fn a_long_batch_goes_in_runs_capped_in_frames_and_bytes_and_each_member_gets_all_of_it() {
    let mut store = Store::new(1000);
    let (mut seq, sockets) = three_members(&store);
    seq.on_event(store.publish());
    for socket in &sockets {
        socket.offers.set(0);
    }
    // 200 small messages: runs of 64 (the frame cap), so four offers per member.
    let events: Vec<RoomEvent> = (0..200).map(|_| store.publish()).collect();
    assert!(seq.on_events(events).closed.is_empty());
    for socket in &sockets {
        assert_eq!(offsets(socket), (1..=201).collect::<Vec<_>>());
        assert_eq!(socket.offers.get(), 4, "ceil(200 / 64) runs");
        socket.offers.set(0);
    }
    // Frames of over 8 KiB: two would pass the byte cap, so each goes alone.
    let big: Vec<RoomEvent> = (0..3)
        .map(|_| {
            let mut e = store.publish();
            e.json = ByteString::from(format!("{}{}", e.json, " ".repeat(9000)));
            e
        })
        .collect();
    assert!(seq.on_events(big).closed.is_empty());
    for socket in &sockets {
        assert_eq!(offsets(socket).last(), Some(&204));
        assert_eq!(
            socket.offers.get(),
            3,
            "one offer per frame past the byte cap"
        );
    }
}
