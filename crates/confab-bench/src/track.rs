//! What receivers saw of the publishers' messages: per (publisher, receiver) sequence
//! tracking (delivered, duplicated, out of order; lost is sent minus delivered), per-step
//! counters every receiver adds to, and latency histograms.
//!
//! A bench message's text is `STEP PUBLISHER SEQ SENT_NS MEASURED[ pad]`: the step it was sent
//! in, the publisher's global id, its sequence (per publisher, from 0, across steps), the time
//! it was due (ns since the bench started; open loop, so a late send shows as latency), and 1
//! if it falls in the step's measured window (0 during the warm-up).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

/// Histogram shards: receivers spread their records over them to keep locks uncontended.
const SHARDS: usize = 8;
/// Latencies are recorded in microseconds, up to 100 s, 3 significant digits.
const MAX_US: u64 = 100_000_000;

/// Counters of one step, summed over every receiver.
#[derive(Default)]
pub struct StepCounters {
    /// First deliveries of a (publisher, seq) at a receiver.
    pub unique: AtomicU64,
    /// Of those, messages from the measured window.
    pub measured: AtomicU64,
    pub duplicated: AtomicU64,
    pub out_of_order: AtomicU64,
    /// Receive times of the first and last measured delivery, ns since the bench started.
    pub first_ns: AtomicU64,
    pub last_ns: AtomicU64,
}

/// Latency histograms per step: `[same replica, across replicas]`.
pub type StepHists = [Histogram<u64>; 2];

pub struct Stats {
    pub steps: Vec<StepCounters>,
    shards: Vec<Mutex<Vec<Option<StepHists>>>>,
    /// A receiver's room offsets that did not increase, or skipped one.
    pub offset_inversions: AtomicU64,
    pub offset_gaps: AtomicU64,
    /// Message frames whose text is not a bench text of this room's publishers.
    pub foreign: AtomicU64,
}

impl Stats {
    pub fn new(steps: usize) -> Stats {
        Stats {
            steps: (0..steps)
                .map(|_| StepCounters {
                    first_ns: AtomicU64::new(u64::MAX),
                    ..Default::default()
                })
                .collect(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new((0..steps).map(|_| None).collect()))
                .collect(),
            offset_inversions: AtomicU64::new(0),
            offset_gaps: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        }
    }

    fn record(&self, shard: usize, latencies: &[(usize, bool, u64)]) {
        let mut hists = self.shards[shard % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for &(step, cross, us) in latencies {
            let h = hists[step].get_or_insert_with(|| [new_hist(), new_hist()]);
            h[usize::from(cross)].saturating_record(us.clamp(1, MAX_US));
        }
    }

    /// One step's latencies, all shards merged.
    pub fn hists(&self, step: usize) -> StepHists {
        let mut out = [new_hist(), new_hist()];
        for shard in &self.shards {
            let hists = shard.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = &hists[step] {
                for i in 0..2 {
                    // Same bounds on both sides: adding cannot fail.
                    let _ = out[i].add(&h[i]);
                }
            }
        }
        out
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// The parsed header of a bench text.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    pub step: usize,
    pub publisher: usize,
    pub seq: u64,
    pub sent_ns: u64,
    pub measured: bool,
}

pub fn text(h: &Header, pad: &str) -> String {
    format!(
        "{} {} {} {} {}{pad}",
        h.step,
        h.publisher,
        h.seq,
        h.sent_ns,
        u8::from(h.measured)
    )
}

pub fn parse(text: &str) -> Option<Header> {
    let mut it = text.split(' ');
    let mut next = || it.next()?.parse::<u64>().ok();
    Some(Header {
        step: next()? as usize,
        publisher: next()? as usize,
        seq: next()?,
        sent_ns: next()?,
        measured: next()? == 1,
    })
}

/// One (publisher, receiver) pair.
#[derive(Debug, Default, Clone)]
pub struct Pair {
    /// Bit per sequence number seen.
    seen: Vec<u64>,
    max: Option<u64>,
    /// Unique deliveries per step.
    pub delivered: Vec<u64>,
    pub duplicated: u64,
    pub out_of_order: u64,
}

/// Counts a receiver adds to its step's shared counters at its next flush.
#[derive(Debug, Default, Clone, Copy)]
struct Batch {
    unique: u64,
    measured: u64,
    duplicated: u64,
    out_of_order: u64,
    first_ns: Option<u64>,
    last_ns: u64,
}

/// One receiver's view of its room's publishers. It counts locally and adds to the shared
/// counters in [`Tracker::flush`] (when its socket has nothing more to read right now), so a
/// burst costs no shared cache line per message.
pub struct Tracker {
    stats: Arc<Stats>,
    /// Publishers' global ids are `room * per_room + k`.
    room: usize,
    per_room: usize,
    receiver: usize,
    target: usize,
    /// Target index of every publisher, by global id.
    pub_target: Arc<Vec<usize>>,
    pub pairs: Vec<Pair>,
    prev_offset: Option<u64>,
    batch: Vec<Batch>,
    /// (step, across replicas, microseconds) not yet in the histograms.
    latencies: Vec<(usize, bool, u64)>,
    pending: usize,
    inversions: u64,
    gaps: u64,
    foreign: u64,
}

impl Tracker {
    pub fn new(
        stats: Arc<Stats>,
        room: usize,
        per_room: usize,
        receiver: usize,
        target: usize,
        pub_target: Arc<Vec<usize>>,
    ) -> Tracker {
        let steps = stats.steps.len();
        Tracker {
            stats,
            room,
            per_room,
            receiver,
            target,
            pub_target,
            pairs: vec![
                Pair {
                    delivered: vec![0; steps],
                    ..Pair::default()
                };
                per_room
            ],
            prev_offset: None,
            batch: vec![Batch::default(); steps],
            latencies: Vec::new(),
            pending: 0,
            inversions: 0,
            gaps: 0,
            foreign: 0,
        }
    }

    pub fn room(&self) -> usize {
        self.room
    }

    pub fn on_message(&mut self, offset: u64, text: &str, now_ns: u64) {
        self.pending += 1;
        if let Some(prev) = self.prev_offset {
            if offset <= prev {
                self.inversions += 1;
            } else if offset > prev + 1 {
                self.gaps += 1;
            }
        }
        self.prev_offset = Some(self.prev_offset.map_or(offset, |p| p.max(offset)));
        let Some(h) = parse(text).filter(|h| {
            h.step < self.stats.steps.len()
                && h.publisher / self.per_room == self.room
                && h.publisher < self.pub_target.len()
        }) else {
            self.foreign += 1;
            return;
        };
        let b = &mut self.batch[h.step];
        let pair = &mut self.pairs[h.publisher % self.per_room];
        let (word, bit) = ((h.seq / 64) as usize, 1u64 << (h.seq % 64));
        if pair.seen.len() <= word {
            pair.seen.resize(word + 1, 0);
        }
        if pair.seen[word] & bit != 0 {
            pair.duplicated += 1;
            b.duplicated += 1;
            return;
        }
        pair.seen[word] |= bit;
        if pair.max.is_some_and(|m| h.seq < m) {
            pair.out_of_order += 1;
            b.out_of_order += 1;
        }
        pair.max = Some(pair.max.map_or(h.seq, |m| m.max(h.seq)));
        pair.delivered[h.step] += 1;
        b.unique += 1;
        if h.measured {
            b.measured += 1;
            b.first_ns.get_or_insert(now_ns);
            b.last_ns = b.last_ns.max(now_ns);
            let cross = self.pub_target[h.publisher] != self.target;
            let us = now_ns.saturating_sub(h.sent_ns).div_ceil(1000);
            self.latencies.push((h.step, cross, us));
        }
    }

    /// Adds what was counted since the last flush to the shared counters and histograms.
    pub fn flush(&mut self) {
        if self.pending == 0 {
            return;
        }
        self.pending = 0;
        let st = &self.stats;
        for (b, step) in self.batch.iter_mut().zip(&st.steps) {
            if b.unique + b.duplicated == 0 {
                continue;
            }
            step.unique.fetch_add(b.unique, Ordering::Relaxed);
            step.measured.fetch_add(b.measured, Ordering::Relaxed);
            step.duplicated.fetch_add(b.duplicated, Ordering::Relaxed);
            step.out_of_order
                .fetch_add(b.out_of_order, Ordering::Relaxed);
            if let Some(first) = b.first_ns {
                step.first_ns.fetch_min(first, Ordering::Relaxed);
                step.last_ns.fetch_max(b.last_ns, Ordering::Relaxed);
            }
            *b = Batch::default();
        }
        for (counter, n) in [
            (&st.offset_inversions, &mut self.inversions),
            (&st.offset_gaps, &mut self.gaps),
            (&st.foreign, &mut self.foreign),
        ] {
            if *n > 0 {
                counter.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
        if !self.latencies.is_empty() {
            st.record(self.receiver, &self.latencies);
            self.latencies.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(steps: usize) -> (Arc<Stats>, Tracker) {
        let stats = Arc::new(Stats::new(steps));
        let t = Tracker::new(Arc::clone(&stats), 1, 2, 7, 0, Arc::new(vec![0, 0, 0, 1]));
        (stats, t)
    }

    fn msg(step: usize, publisher: usize, seq: u64) -> String {
        let h = Header {
            step,
            publisher,
            seq,
            sent_ns: 1_000,
            measured: true,
        };
        text(&h, " xx")
    }

    #[test]
    fn texts_round_trip_with_padding() {
        let h = Header {
            step: 3,
            publisher: 12,
            seq: 99,
            sent_ns: 123_456,
            measured: false,
        };
        assert_eq!(parse(&text(&h, " xxxx")), Some(h));
    }

    #[test]
    fn duplicates_and_late_sequences_are_counted_per_pair() {
        let (stats, mut t) = tracker(1);
        for (offset, seq) in [(1, 0), (2, 2), (3, 1), (4, 2)] {
            t.on_message(offset, &msg(0, 2, seq), 2_000_000);
        }
        assert_eq!(
            stats.steps[0].unique.load(Ordering::Relaxed),
            0,
            "counted locally"
        );
        t.flush();
        let s = &stats.steps[0];
        assert_eq!(s.unique.load(Ordering::Relaxed), 3);
        assert_eq!(s.duplicated.load(Ordering::Relaxed), 1);
        assert_eq!(s.out_of_order.load(Ordering::Relaxed), 1);
        assert_eq!(t.pairs[0].delivered, vec![3]);
        assert_eq!(stats.hists(0)[0].len(), 3);
    }

    #[test]
    fn offsets_that_go_back_or_skip_and_other_rooms_texts_are_counted() {
        let (stats, mut t) = tracker(1);
        t.on_message(5, &msg(0, 3, 0), 2_000);
        t.on_message(5, &msg(0, 3, 1), 2_000);
        t.on_message(7, &msg(0, 0, 0), 2_000);
        t.on_message(8, "hello", 2_000);
        t.flush();
        assert_eq!(stats.offset_inversions.load(Ordering::Relaxed), 1);
        assert_eq!(stats.offset_gaps.load(Ordering::Relaxed), 1);
        assert_eq!(stats.foreign.load(Ordering::Relaxed), 2);
        // Publisher 3 is on another target than this receiver: its latencies are "cross".
        assert_eq!(stats.hists(0)[1].len(), 2);
    }
}
