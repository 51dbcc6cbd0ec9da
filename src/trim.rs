//! Gives the heap that many ended sessions freed back to the system.
//!
//! glibc keeps freed memory in its arenas: after a spike of sessions (or of big rooms' join
//! storms) ends, a replica's resident memory stays at its high-water mark (docs/PERFORMANCE.md,
//! "RSS is not given back"), which an operator reads as a leak and a memory-based autoscaler
//! as load. Once the sessions attached fell to half of their peak, and by at least
//! [`MIN_FREED`], `malloc_trim` hands the free pages back, on a thread of its own so that no
//! actor waits for it.
//!
//! A storm of sessions opening at once leaves pages behind too: thousands of handshakes in
//! flight together each touch the HTTP/1 dispatcher's buffers (2 × 8 KiB) and are freed at the
//! upgrade, scattered between the sessions' own blocks, so glibc can give none of it back by
//! itself (10,000 at once held 9.3 KB per session against 6.8 KB opened 64 at a time;
//! `malloc_trim` brought it to 7.4 KB, docs/PERFORMANCE.md). So a trim is also asked for once
//! the sessions grew by [`MIN_FREED`] and a quarter since the last one, and it runs when the
//! asks have stopped for [`SETTLE`]: once after a storm, a few times over a slow ramp.

use std::sync::mpsc::{self, Sender};
use std::time::Duration;

/// Sessions that must have ended since the peak (or begun since the last trim) before a trim
/// is worth its walk of the heap.
pub const MIN_FREED: usize = 1000;

/// A trim waits until no ask came for this long: a storm of sessions arriving (or leaving)
/// is trimmed once, after it.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Watches the number of attached sessions; owned by the hub.
#[derive(Debug, Default)]
pub struct Trimmer {
    peak: usize,
    /// The fewest sessions since the last trim: growth above it is a storm's.
    low: usize,
    /// A trim runs again this long after the first: what ended sessions leave behind for a
    /// while (closed sockets that linger) is freed by then.
    again_after: Duration,
    /// To the trim thread, started at the first trim; asks arriving while it works are
    /// answered by one more round.
    asks: Option<Sender<()>>,
}

impl Trimmer {
    pub fn new(again_after: Duration) -> Self {
        Self {
            again_after,
            ..Self::default()
        }
    }

    /// Called with the number of sessions after each change. Returns whether a trim was asked
    /// for.
    pub fn sessions(&mut self, now: usize) -> bool {
        self.peak = self.peak.max(now);
        self.low = self.low.min(now);
        let fell = self.peak - now >= MIN_FREED && now <= self.peak / 2;
        let grew = now >= self.low + MIN_FREED.max(self.low / 4);
        if !fell && !grew {
            return false;
        }
        self.peak = now;
        self.low = now;
        if let Some(asks) = &self.asks {
            if asks.send(()).is_ok() {
                return true;
            }
        }
        let (asks, asked) = mpsc::channel();
        let again_after = self.again_after;
        let spawned = std::thread::Builder::new()
            .name("confab-trim".into())
            .spawn(move || {
                while asked.recv().is_ok() {
                    // One round for every ask until they stop for a while.
                    while asked.recv_timeout(SETTLE).is_ok() {}
                    release_free_heap();
                    // Ended sessions' sockets may still linger, scattered over pages the
                    // first trim could not free: once more after them.
                    std::thread::sleep(again_after);
                    release_free_heap();
                }
            });
        match spawned {
            Ok(_) => {
                let _ = asks.send(());
                self.asks = Some(asks);
                true
            }
            Err(e) => {
                log::warn!("cannot start a thread to give freed memory back: {e}");
                false
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_heap() {
    // SAFETY: malloc_trim only takes glibc's arena locks; any thread may call it at any time.
    let released = unsafe { libc::malloc_trim(0) };
    log::debug!("gave freed heap back to the system: {}", released == 1);
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_begins_once_sessions_fell_to_half_the_peak_and_by_enough() {
        let mut t = Trimmer::default();
        assert!(
            t.sessions(10_000),
            "grown from nothing: asked for as a storm's"
        );
        assert!(!t.sessions(6_000), "above half the peak");
        assert!(t.sessions(5_000), "half the peak, 5,000 fewer");
        assert!(!t.sessions(2_600), "the peak is now 5,000: above half");
        assert!(
            t.sessions(2_500),
            "asked again, also while a trim may still run"
        );
        // Small replicas never trim: too few sessions for the walk to be worth it.
        let mut small = Trimmer::default();
        assert!(!small.sessions(999));
        assert!(!small.sessions(600));
    }

    #[test]
    fn a_trim_is_asked_for_after_sessions_grew_by_enough_and_a_quarter() {
        let mut t = Trimmer::default();
        assert!(!t.sessions(999));
        assert!(t.sessions(1_000), "1,000 new sessions since the start");
        assert!(!t.sessions(1_999));
        assert!(t.sessions(2_000));
        // From 8,000 on, a quarter more is needed: a slow ramp trims O(log n) times.
        let mut big = Trimmer::default();
        assert!(big.sessions(8_000));
        assert!(
            !big.sessions(9_999),
            "1,999 more is under a quarter of 8,000"
        );
        assert!(big.sessions(10_000));
        // Falling resets the base growth is counted from.
        assert!(!big.sessions(9_500));
        assert!(!big.sessions(10_499));
        assert!(big.sessions(11_875), "a quarter more than 9,500");
    }
}
