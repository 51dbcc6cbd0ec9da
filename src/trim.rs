//! Gives the heap that many ended sessions freed back to the system.
//!
//! glibc keeps freed memory in its arenas: after a spike of sessions (or of big rooms' join
//! storms) ends, a replica's resident memory stays at its high-water mark (docs/PERFORMANCE.md,
//! "RSS is not given back"), which an operator reads as a leak and a memory-based autoscaler
//! as load. Once the sessions attached fell to half of their peak, and by at least
//! [`MIN_FREED`], `malloc_trim` hands the free pages back, on a thread of its own so that no
//! actor waits for it.

use std::sync::mpsc::{self, Sender};
use std::time::Duration;

/// Sessions that must have ended since the peak before a trim is worth its walk of the heap.
pub const MIN_FREED: usize = 1000;

/// Watches the number of attached sessions; owned by the hub.
#[derive(Debug, Default)]
pub struct Trimmer {
    peak: usize,
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
        if self.peak - now < MIN_FREED || now > self.peak / 2 {
            return false;
        }
        self.peak = now;
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
                    // One round for every ask that came meanwhile.
                    while asked.try_recv().is_ok() {}
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
        assert!(!t.sessions(10_000));
        assert!(!t.sessions(6_000), "above half the peak");
        assert!(t.sessions(5_000), "half the peak, 5,000 fewer");
        assert!(!t.sessions(2_600), "the peak is now 5,000: above half");
        assert!(
            t.sessions(2_500),
            "asked again, also while a trim may still run"
        );
        // Small replicas never trim: too few sessions for the walk to be worth it.
        let mut small = Trimmer::default();
        assert!(!small.sessions(1_500));
        assert!(!small.sessions(600));
    }
}
