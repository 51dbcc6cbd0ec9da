//! Per-session token bucket: `rate` tokens a second, at most `burst` saved up. A plain struct
//! with the clock passed in, so its arithmetic is tested without sleeping.

use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket: a fresh session may send `burst` messages at once.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate_per_sec),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// True when the bucket has refilled to its burst: it remembers nothing worth keeping.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_is_available_at_once_then_refused() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 20, t0);
        assert_eq!((0..25).filter(|_| b.try_take(t0)).count(), 20);
    }

    #[test]
    fn tokens_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 20, t0);
        while b.try_take(t0) {}
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..10).filter(|_| b.try_take(t1)).count(), 5);
    }

    #[test]
    fn refill_never_exceeds_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| b.try_take(later)).count(), 3);
    }
}
