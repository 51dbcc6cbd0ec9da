//! What a room holds of each session: a bounded inbox the room fills and the session drains.
//!
//! A room never waits for a session. It counts the frames and bytes it put in a session's
//! inbox that the session has not yet written; past half of either bound droppable frames
//! (typing) are skipped, and at the bound the session is a slow consumer: it is detached and
//! told to close with 4008. The session stops draining while its socket is backpressured, so
//! these counts are the backlog (frames the session wrote during its current batch are
//! credited back when the batch ends or pauses: at most one socket's worth, 16 KiB, of slack).
//!
//! One inbox serves every room of a connection (docs/design.md, "Many rooms on one connection"):
//! each subscription's handle stamps what it puts in with the subscription's tag, so the
//! session can drop frames of a room it left, and the bounds (and the slow-consumer close)
//! are the connection's. A subscription's own end (a gap history no longer holds) goes in as a
//! tagged close behind its room's frames when the connection has other rooms; otherwise it
//! closes the connection as before.
//!
//! The inbox is a plain queue under a lock rather than the session's actor mailbox: a
//! delivery is one push into a buffer that keeps its capacity, where a mailbox message is
//! two allocations freed on another thread, and the session is woken only when its inbox
//! goes from empty to not empty, so a burst to a busy session costs no wake-ups at all. In a
//! room of 1,000 the mailbox path was about 40 % of the server's CPU (docs/PERFORMANCE.md).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Waker;

use bytestring::ByteString;
use parking_lot::{Mutex, MutexGuard};

pub use super::outlet::{Encoded, Offer, Outbound, Outlet};
use super::socket::Interrupt;
use crate::close::Close;

/// How much one session may have queued: `limits.session_queue` frames and
/// `limits.session_queue_bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueLimits {
    pub frames: usize,
    pub bytes: usize,
}

impl From<&crate::settings::Settings> for QueueLimits {
    fn from(settings: &crate::settings::Settings) -> Self {
        Self {
            frames: settings.limits.session_queue,
            bytes: settings.limits.session_queue_bytes,
        }
    }
}

/// Queue capacity a session keeps while it is busy; more is given back each time its inbox
/// runs empty, and all of it once a ping interval went by without a frame
/// ([`InboxReader::trim`]).
const KEPT_CAPACITY: usize = 4;

/// Frames for one session, shared by the room's [`MemberHandle`] and the session's
/// [`InboxReader`].
#[derive(Debug, Default)]
pub struct Inbox {
    state: Mutex<State>,
    /// The connection's bounds, the same for every room: kept here once rather than in every
    /// room's handle.
    limits: QueueLimits,
    /// `State::closing`, readable without the lock: the session checks it for every frame of
    /// a batch it drains, and the lock is the room's too.
    closing: AtomicBool,
    /// The tag of the path room while it is the connection's only room: its own close (see
    /// [`Close::ends_subscription`]) then ends the connection. Any other tag's close ends only
    /// that subscription; [`CONNECTION`] when no room is alone. A tag, not a flag: a room the
    /// client just left may still close its stale member, and must not close the connection.
    alone: AtomicU32,
}

/// The tag of what concerns the whole connection rather than one subscription (a close for
/// a slow consumer, a drain). Subscriptions are tagged from 1.
pub const CONNECTION: u32 = 0;

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<(u32, Outbound)>,
    /// Frames and bytes put in and not yet written: the queue plus what the session took
    /// out and has not handled yet.
    frames: usize,
    bytes: usize,
    /// The session's task, parked on an empty inbox.
    waker: Option<Waker>,
    /// The session's task, waiting on its socket ([`InboxReader::interrupt`]).
    socket_waker: Option<Waker>,
    /// The room told the session to close: the queue holds only the close, and the session
    /// drops what it took out and has not written.
    closing: bool,
    /// The session is gone: nothing is accepted any more.
    closed: bool,
    /// Called once when the backlog falls to these frames and bytes (a resuming member's
    /// next page of replay waits for it): one hook per subscription that waits, so rooms
    /// replaying at once on one connection each get theirs.
    drained: Option<Box<Drained>>,
}

/// The hooks waiting for a connection's backlog to fall to `frames` and `bytes`.
#[derive(Debug)]
struct Drained {
    frames: usize,
    bytes: usize,
    hooks: Vec<(u32, Hook)>,
}

/// What the room asked to be told when a member's queue drained.
pub struct Hook(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// True once the room told the session to close (the socket's wait then ends, and the close
/// goes out at once); until then the waker is kept, for [`MemberHandle::close`] to wake.
impl Interrupt for Inbox {
    fn interrupted(&self, waker: &Waker) -> bool {
        if self.closing.load(Ordering::Acquire) {
            return true;
        }
        let mut state = self.lock();
        if state.closing {
            return true;
        }
        if !state
            .socket_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(waker))
        {
            state.socket_waker = Some(waker.clone());
        }
        false
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }
}

/// Puts a frame in and wakes the session if it waits for one.
fn put(mut state: MutexGuard<'_, State>, tag: u32, out: Outbound, size: usize) {
    state.frames += out.frames();
    state.queue.push_back((tag, out));
    state.bytes += size;
    let waker = state.waker.take();
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// The room's handle on one subscription of a session. Small (a pointer and a tag): every
/// room member and the hub's entry for it hold one.
#[derive(Clone)]
pub struct MemberHandle {
    inbox: Arc<Inbox>,
    /// Stamped on everything this handle puts in the inbox.
    tag: u32,
}

impl MemberHandle {
    pub fn new(inbox: Arc<Inbox>, tag: u32) -> Self {
        Self { inbox, tag }
    }

    /// Calls `wake` once the queue is at most half full (at once if it already is), so the
    /// room can offer the next page of a replay. A later call replaces an earlier hook of the
    /// same subscription; other subscriptions of the connection keep theirs.
    pub fn on_drained(&self, wake: Box<dyn FnOnce() + Send>) {
        let limits = self.inbox.limits;
        let (frames, bytes) = (limits.frames / 2, limits.bytes / 2);
        let mut state = self.inbox.lock();
        if state.closed || state.closing {
            return;
        }
        if state.frames <= frames && state.bytes <= bytes {
            drop(state);
            return wake();
        }
        let drained = state.drained.get_or_insert_with(|| {
            Box::new(Drained {
                frames,
                bytes,
                hooks: Vec::new(),
            })
        });
        drained.hooks.retain(|(tag, _)| *tag != self.tag);
        drained.hooks.push((self.tag, Hook(wake)));
    }

    /// Tells a detached member to close, at once: the backlog is dropped (every frame in it
    /// is in history, and the client resumes from the last offset it got), the close goes
    /// first, and a session waiting on its socket stops waiting. A slow consumer's close no
    /// longer waits behind the megabytes it is about, holding its slot and presence until the
    /// client reads them.
    ///
    /// A close that ends only a subscription ([`Close::ends_subscription`]) on a connection
    /// with rooms apart goes in behind the room's frames instead, tagged, and bounds aside:
    /// the session answers it with `unsubscribed`, and its other rooms go on.
    pub fn close(&self, why: Close) {
        let mut state = self.inbox.lock();
        if state.closed || state.closing {
            return;
        }
        if why.ends_subscription() && self.inbox.alone.load(Ordering::Acquire) != self.tag {
            if let Some(drained) = state.drained.as_mut() {
                drained.hooks.retain(|(tag, _)| *tag != self.tag);
            }
            return put(state, self.tag, Outbound::Close(why), 0);
        }
        state.closing = true;
        self.inbox.closing.store(true, Ordering::Release);
        state.drained = None;
        state.queue = VecDeque::new();
        state.frames = 0;
        state.bytes = 0;
        let socket_waker = state.socket_waker.take();
        put(state, CONNECTION, Outbound::Close(why), 0);
        if let Some(waker) = socket_waker {
            waker.wake();
        }
    }
}

impl Outlet for MemberHandle {
    /// Offers a frame without waiting.
    fn offer(&self, out: Outbound, droppable: bool) -> Offer {
        let size = out.bytes();
        let count = out.frames();
        let QueueLimits {
            frames: max_frames,
            bytes: max_bytes,
        } = self.inbox.limits;
        let state = self.inbox.lock();
        let (frames, bytes) = (state.frames, state.bytes);
        if state.closed || state.closing {
            return if droppable {
                Offer::Dropped
            } else {
                Offer::Evict
            };
        }
        if droppable && (frames >= max_frames / 2 || bytes >= max_bytes / 2) {
            return Offer::Dropped;
        }
        // One frame larger than the whole byte bound still goes to a session that is caught
        // up; otherwise it could never be delivered.
        // (A run of several frames gets no such pass: its frames after the first must fit.)
        if frames + count > max_frames || ((bytes > 0 || count > 1) && bytes + size > max_bytes) {
            return Offer::Evict;
        }
        put(state, self.tag, out, size);
        Offer::Sent
    }

    /// One lock and at most one wake-up for the whole run, where a frame at a time took
    /// both per frame: in a busy room of 1,000 the offers were the room thread's largest cost.
    fn offer_run<'a>(&self, frames: impl Iterator<Item = &'a ByteString>) -> (usize, Offer) {
        let limits = self.inbox.limits;
        let mut state = self.inbox.lock();
        if state.closed || state.closing {
            return (0, Offer::Evict);
        }
        let mut sent = 0;
        let mut verdict = Offer::Sent;
        for text in frames {
            let size = text.len();
            // The bounds of [`Self::offer`], frame by frame.
            if state.frames >= limits.frames
                || (state.bytes > 0 && state.bytes + size > limits.bytes)
            {
                verdict = Offer::Evict;
                break;
            }
            state
                .queue
                .push_back((self.tag, Outbound::Frame(text.clone())));
            state.frames += 1;
            state.bytes += size;
            sent += 1;
        }
        let waker = if sent > 0 { state.waker.take() } else { None };
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        (sent, verdict)
    }

    /// Also true once the connection was told to close (another of its rooms found it slow):
    /// it is leaving every room, so one slow connection counts as one eviction, not one per
    /// room it was in.
    fn gone(&self) -> bool {
        self.inbox.closing.load(Ordering::Acquire) || self.inbox.lock().closed
    }

    fn has_room(&self) -> bool {
        let state = self.inbox.lock();
        let limits = self.inbox.limits;
        state.frames <= limits.frames / 2 && state.bytes <= limits.bytes / 2
    }
}

/// The session's side of its inbox. Dropped with the session, which closes the inbox: the
/// room then sees the member as gone, not as slow.
#[derive(Debug)]
pub struct InboxReader {
    inbox: Arc<Inbox>,
    /// Frames taken out of the inbox in one go and not yet handled.
    batch: VecDeque<(u32, Outbound)>,
    /// Frames and bytes handled since the inbox was last told.
    handled: (usize, usize),
    /// A frame came since the last [`Self::trim`].
    busy: bool,
}

impl InboxReader {
    /// An inbox bounded by `limits` (see [`MemberHandle`]'s offers).
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            inbox: Arc::new(Inbox {
                limits,
                ..Inbox::default()
            }),
            batch: VecDeque::new(),
            handled: (0, 0),
            busy: false,
        }
    }

    /// A handle for the room of the subscription tagged `tag` (from 1).
    pub fn handle(&self, tag: u32) -> MemberHandle {
        MemberHandle::new(Arc::clone(&self.inbox), tag)
    }

    /// Drops the replay hook of a subscription that was left, so a client that subscribes and
    /// unsubscribes while its queue is past half full leaves none behind.
    pub fn forget(&self, tag: u32) {
        if let Some(drained) = self.inbox.lock().drained.as_mut() {
            drained.hooks.retain(|(t, _)| *t != tag);
        }
    }

    /// Which subscription's own close ends the connection: its path room's `tag` while that is
    /// its only room, [`CONNECTION`] (none) otherwise.
    pub fn set_alone(&self, tag: u32) {
        self.inbox.alone.store(tag, Ordering::Release);
    }

    /// The next frame to handle, with the tag of the subscription it is for ([`CONNECTION`]
    /// for a close of the connection). At an empty inbox it returns `None` and remembers
    /// `waker`, woken by the next frame put in.
    pub fn next(&mut self, waker: &Waker) -> Option<(u32, Outbound)> {
        if !self.batch.is_empty() && self.inbox.closing.load(Ordering::Acquire) {
            // Told to close: what was taken out and not written goes too.
            self.batch = VecDeque::new();
            self.handled = (0, 0);
        }
        if self.batch.is_empty() {
            let mut state = self.inbox.lock();
            Self::settle(&mut state, &mut self.handled);
            if state.queue.is_empty() {
                if !state.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    state.waker = Some(waker.clone());
                }
                // A burst's buffers go back, so a big room's join storm or a backlog leaves
                // no kilobytes behind in every member.
                if state.queue.capacity() > KEPT_CAPACITY {
                    state.queue = VecDeque::new();
                }
                if self.batch.capacity() > KEPT_CAPACITY {
                    self.batch = VecDeque::new();
                }
                return None;
            }
            // Takes everything at once; the emptied batch's buffer becomes the inbox's.
            std::mem::swap(&mut state.queue, &mut self.batch);
        }
        let out = self.batch.pop_front()?;
        self.busy = true;
        self.handled.0 += out.1.frames();
        self.handled.1 += out.1.bytes();
        Some(out)
    }

    /// Tells the room what was handled, so its counts are the backlog again. Called when the
    /// session pauses for its socket; [`Self::next`] does it before each new batch.
    pub fn settle_now(&mut self) {
        Self::settle(&mut self.inbox.lock(), &mut self.handled);
    }

    /// What ends the session's wait on its socket once the room told it to close (see
    /// [`super::socket::Interrupt`]): the inbox itself, which [`MemberHandle::close`] wakes.
    pub fn interrupter(&self) -> Arc<dyn Interrupt> {
        Arc::clone(&self.inbox) as Arc<dyn Interrupt>
    }

    fn settle(state: &mut State, handled: &mut (usize, usize)) {
        let (frames, bytes) = std::mem::take(handled);
        // Every frame handled was counted in when it was put in (a close zeroes the counts).
        debug_assert!(state.closing || (frames <= state.frames && bytes <= state.bytes));
        state.frames = state.frames.saturating_sub(frames);
        state.bytes = state.bytes.saturating_sub(bytes);
        let low = matches!(state.drained.as_deref(), Some(d) if state.frames <= d.frames && state.bytes <= d.bytes);
        if low {
            if let Some(drained) = state.drained.take() {
                // Under the inbox's lock: a hook only posts a message to its room's mailbox,
                // which never takes this lock.
                for (_, Hook(wake)) in drained.hooks {
                    wake();
                }
            }
        }
    }

    /// Gives back the buffers of a session that got nothing since the last call; called on
    /// the session's ping tick, so a quiet session holds none.
    pub fn trim(&mut self) {
        if std::mem::take(&mut self.busy) || !self.batch.is_empty() {
            return;
        }
        self.batch = VecDeque::new();
        let mut state = self.inbox.lock();
        if state.queue.is_empty() {
            state.queue = VecDeque::new();
        }
    }
}

impl Drop for InboxReader {
    fn drop(&mut self) {
        let mut state = self.inbox.lock();
        state.closed = true;
        state.waker = None;
        state.socket_waker = None;
        state.drained = None;
        // Frames share their bytes with other members; let them go now, not with the room's
        // handle.
        state.queue = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytestring::ByteString;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The next frame, its tag aside.
    fn next(reader: &mut InboxReader, waker: &Waker) -> Option<Outbound> {
        reader.next(waker).map(|(_, out)| out)
    }

    fn frame(text: &str) -> Outbound {
        Outbound::Frame(ByteString::from(text.to_owned()))
    }

    const LIMITS: QueueLimits = QueueLimits {
        frames: 4,
        bytes: 100,
    };

    #[test]
    fn frames_come_out_in_order_and_only_an_empty_inbox_wakes_the_session() {
        let mut reader = InboxReader::new(LIMITS);
        let handle = reader.handle(1);
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&wakes));
        assert_eq!(next(&mut reader, &waker), None);
        assert_eq!(handle.offer(frame("a"), false), Offer::Sent);
        assert_eq!(handle.offer(frame("b"), false), Offer::Sent);
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "woken once for two frames"
        );
        assert_eq!(next(&mut reader, &waker), Some(frame("a")));
        assert_eq!(handle.offer(frame("c"), false), Offer::Sent);
        assert_eq!(next(&mut reader, &waker), Some(frame("b")));
        assert_eq!(next(&mut reader, &waker), Some(frame("c")));
        assert_eq!(next(&mut reader, &waker), None);
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "never parked in between"
        );
    }

    #[test]
    fn a_run_goes_in_with_one_wake_up_and_stops_at_the_bound_like_frames_one_at_a_time() {
        let mut reader = InboxReader::new(LIMITS);
        let handle = reader.handle(1);
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&wakes));
        assert_eq!(next(&mut reader, &waker), None);
        let texts: Vec<ByteString> = ["1", "2", "3"].map(ByteString::from).to_vec();
        assert_eq!(handle.offer_run(texts.iter()), (3, Offer::Sent));
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "one wake-up for the run"
        );
        // One more frame fits (4 frames): the run's second one finds the bound.
        assert_eq!(handle.offer_run(texts.iter()), (1, Offer::Evict));
        for text in ["1", "2", "3", "1"] {
            assert_eq!(next(&mut reader, &waker), Some(frame(text)));
        }
        assert_eq!(next(&mut reader, &waker), None);
        let big = ByteString::from("x".repeat(60));
        assert_eq!(
            handle.offer_run([big.clone(), big].iter()),
            (1, Offer::Evict),
            "the byte bound holds within a run"
        );
    }

    #[test]
    fn an_encoded_run_counts_each_of_its_frames_against_the_bound() {
        let mut reader = InboxReader::new(LIMITS);
        let handle = reader.handle(1);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let three: Vec<ByteString> = ["1", "2", "3"].map(ByteString::from).to_vec();
        let run = Outbound::Encoded(Encoded::texts(three.iter()));
        assert_eq!(handle.offer(run.clone(), false), Offer::Sent);
        assert_eq!(
            handle.offer(run.clone(), false),
            Offer::Evict,
            "3 + 3 > 4 frames"
        );
        assert_eq!(handle.offer(frame("4"), false), Offer::Sent, "3 + 1 fit");
        assert_eq!(next(&mut reader, &waker), Some(run.clone()));
        assert_eq!(next(&mut reader, &waker), Some(frame("4")));
        assert_eq!(next(&mut reader, &waker), None, "settles all four");
        assert_eq!(handle.offer(run, false), Offer::Sent);
        // A run larger than the byte bound gets no pass for being first in an empty queue.
        let mut reader = InboxReader::new(LIMITS);
        let handle = reader.handle(1);
        let two: Vec<ByteString> = ["x".repeat(60), "y".repeat(60)]
            .map(ByteString::from)
            .to_vec();
        let over = Outbound::Encoded(Encoded::texts(two.iter()));
        assert_eq!(handle.offer(over, false), Offer::Evict, "124 bytes > 100");
        assert_eq!(next(&mut reader, &waker), None);
    }

    #[test]
    fn frames_handled_count_against_the_bound_until_the_session_reports_them() {
        let mut reader = InboxReader::new(LIMITS);
        let handle = reader.handle(1);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        for text in ["1", "2", "3", "4"] {
            assert_eq!(handle.offer(frame(text), false), Offer::Sent);
        }
        assert_eq!(
            handle.offer(frame("5"), false),
            Offer::Evict,
            "4 frames queued"
        );
        // Handled one of the four, but the room is told only at the next batch or pause.
        assert_eq!(next(&mut reader, &waker), Some(frame("1")));
        assert_eq!(handle.offer(frame("5"), false), Offer::Evict);
        reader.settle_now();
        assert_eq!(handle.offer(frame("5"), false), Offer::Sent);
        assert_eq!(
            handle.offer(frame("t"), true),
            Offer::Dropped,
            "typing over half"
        );
    }

    #[test]
    fn the_byte_bound_holds_and_one_big_frame_still_reaches_a_caught_up_session() {
        let mut reader = InboxReader::new(LIMITS);
        let handle = reader.handle(1);
        let big = "x".repeat(150);
        assert_eq!(handle.offer(frame(&big), false), Offer::Sent);
        assert_eq!(handle.offer(frame("y"), false), Offer::Evict);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        assert!(next(&mut reader, &waker).is_some());
        assert_eq!(next(&mut reader, &waker), None, "settles the 150 bytes");
        assert_eq!(handle.offer(frame("y"), false), Offer::Sent);
    }

    #[test]
    fn a_connection_one_room_closed_as_slow_is_gone_for_its_other_rooms() {
        let reader = InboxReader::new(LIMITS);
        let (a, b) = (reader.handle(1), reader.handle(2));
        assert!(!b.gone());
        a.close(Close::SlowConsumer);
        // Room b's next offer fails too, but the connection is leaving, not slow a second
        // time: the room drops it without counting another eviction.
        assert!(b.gone());
        assert_eq!(b.offer(frame("x"), false), Offer::Evict);
    }

    #[test]
    fn a_dropped_reader_is_gone_and_takes_nothing_more() {
        let reader = InboxReader::new(LIMITS);
        let handle = reader.handle(1);
        assert!(!handle.gone());
        drop(reader);
        assert!(handle.gone());
        assert_eq!(handle.offer(frame("a"), false), Offer::Evict);
        assert_eq!(handle.offer(frame("a"), true), Offer::Dropped);
        handle.close(Close::SlowConsumer);
        let state = handle.inbox.lock();
        assert!(
            state.queue.is_empty() && state.frames == 0,
            "not even the close"
        );
    }

    #[test]
    fn a_close_drops_the_backlog_even_what_the_session_took_out_and_goes_at_once() {
        let mut reader = InboxReader::new(LIMITS);
        let handle = reader.handle(1);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        for text in ["1", "2", "3", "4"] {
            assert_eq!(handle.offer(frame(text), false), Offer::Sent);
        }
        assert_eq!(
            next(&mut reader, &waker),
            Some(frame("1")),
            "a batch taken out"
        );
        let interrupt = reader.interrupter();
        let interrupted = |w: &Waker| interrupt.interrupted(w);
        let socket_wakes = Arc::new(Count(AtomicUsize::new(0)));
        let socket_waker = Waker::from(Arc::clone(&socket_wakes));
        assert!(!interrupted(&socket_waker), "nothing to interrupt yet");
        handle.close(Close::SlowConsumer);
        assert_eq!(
            socket_wakes.0.load(Ordering::Relaxed),
            1,
            "a wait on the socket is woken"
        );
        assert!(interrupted(&socket_waker));
        let all: Vec<_> = std::iter::from_fn(|| next(&mut reader, &waker)).collect();
        assert!(
            matches!(all[..], [Outbound::Close(Close::SlowConsumer)]),
            "{all:?}"
        );
        assert_eq!(handle.offer(frame("5"), false), Offer::Evict);
        handle.close(Close::MissedHistory);
        assert_eq!(next(&mut reader, &waker), None, "one close only");
    }

    #[test]
    fn a_room_just_left_closing_its_stale_member_ends_only_that_subscription() {
        let mut reader = InboxReader::new(LIMITS);
        let (path, left) = (reader.handle(1), reader.handle(2));
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        // The client left room 2; its path room 1 is alone again before room 2 heard of it.
        reader.set_alone(1);
        left.close(Close::MissedHistory);
        assert_eq!(
            reader.next(&waker),
            Some((2, Outbound::Close(Close::MissedHistory))),
            "tagged: the session drops it (the tag is gone)"
        );
        assert_eq!(
            path.offer(frame("on"), false),
            Offer::Sent,
            "the connection goes on"
        );
        assert_eq!(next(&mut reader, &waker), Some(frame("on")));
        // The path room's own close, while alone, ends the connection.
        path.close(Close::MissedHistory);
        assert_eq!(
            reader.next(&waker),
            Some((CONNECTION, Outbound::Close(Close::MissedHistory)))
        );
    }

    #[test]
    fn a_burst_leaves_no_big_buffers_behind_and_a_quiet_session_keeps_none() {
        let mut reader = InboxReader::new(QueueLimits {
            frames: 1000,
            bytes: 1 << 20,
        });
        let handle = reader.handle(1);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        for n in 0..100 {
            assert_eq!(handle.offer(frame(&n.to_string()), false), Offer::Sent);
        }
        assert_eq!(
            std::iter::from_fn(|| next(&mut reader, &waker)).count(),
            100
        );
        let capacities = |r: &InboxReader| (r.batch.capacity(), r.inbox.lock().queue.capacity());
        let (batch, queue) = capacities(&reader);
        assert!(
            batch <= KEPT_CAPACITY && queue <= KEPT_CAPACITY,
            "{batch} {queue}"
        );

        assert_eq!(handle.offer(frame("a"), false), Offer::Sent);
        assert!(next(&mut reader, &waker).is_some());
        assert!(next(&mut reader, &waker).is_none());
        reader.trim();
        assert_ne!(
            capacities(&reader),
            (0, 0),
            "busy since the last tick: kept"
        );
        reader.trim();
        assert_eq!(capacities(&reader), (0, 0), "a quiet tick: all given back");
    }
}
