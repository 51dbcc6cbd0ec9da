//! Throttles guessing of the HTTP API's key (docs/PROTOCOL.md §15.4): after `api.max_key_failures`
//! wrong keys from one client address within `api.key_failure_window_secs`, that address gets 429
//! for every API call, the right key included, until the window that began with its first wrong key
//! has passed. A guesser then learns nothing from a hit, and the key's strength is measured in
//! windows, not in requests. Addresses are counted like WebSocket admission's (`net::limit_key`:
//! IPv4 address, IPv6 /64), behind trusted proxies by `X-Forwarded-For`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::net::limit_key;

/// Most addresses remembered at once. A guess from a new address past this, with no expired
/// entry to forget, counts under one shared overflow entry: a flood from many addresses is
/// throttled together instead of growing the map without bound.
const MAX_TRACKED: usize = 65_536;
/// The key the overflow entry counts under; no client has it (`::` is unspecified).
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

pub struct KeyGuesses {
    max: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

/// Wrong keys of one address in the window that began with the first of them.
#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}

impl KeyGuesses {
    /// `max` of 0 turns the throttle off.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` while `ip` is throttled: how long until its window passes.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.max == 0 {
            return Ok(());
        }
        let mut failures = self.failures.lock();
        let key = if failures.contains_key(&limit_key(ip)) {
            limit_key(ip)
        } else {
            OVERFLOW
        };
        let Some(f) = failures.get(&key).copied() else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(f.since);
        if elapsed >= self.window {
            failures.remove(&key);
            return Ok(());
        }
        if f.count >= self.max {
            return Err(self.window - elapsed);
        }
        Ok(())
    }

    /// Counts one wrong key from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if self.max == 0 {
            return;
        }
        let mut failures = self.failures.lock();
        let mut key = limit_key(ip);
        if !failures.contains_key(&key) && failures.len() >= MAX_TRACKED {
            let window = self.window;
            failures.retain(|_, f| now.saturating_duration_since(f.since) < window);
            if failures.len() >= MAX_TRACKED {
                key = OVERFLOW;
            }
        }
        let f = failures.entry(key).or_insert(Failures {
            since: now,
            count: 0,
        });
        if now.saturating_duration_since(f.since) >= self.window {
            *f = Failures {
                since: now,
                count: 0,
            };
        }
        f.count = f.count.saturating_add(1);
    }

    /// Addresses remembered now, for tests.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.failures.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn an_address_is_throttled_after_max_failures_until_its_window_passes() {
        let g = KeyGuesses::new(3, MINUTE);
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(g.check(ip("10.0.0.1"), t0).is_ok(), "guess {i}");
            g.failed(ip("10.0.0.1"), t0 + Duration::from_secs(i));
        }
        let later = t0 + Duration::from_secs(20);
        assert_eq!(g.check(ip("10.0.0.1"), later), Err(Duration::from_secs(40)));
        assert!(g.check(ip("10.0.0.2"), later).is_ok(), "per address");
        assert!(g.check(ip("10.0.0.1"), t0 + MINUTE).is_ok(), "window over");
        assert_eq!(g.remembered(), 0, "an expired address is forgotten");
    }

    #[test]
    fn ipv6_guessers_count_per_64_and_zero_turns_it_off() {
        let g = KeyGuesses::new(2, MINUTE);
        let t0 = Instant::now();
        g.failed(ip("2001:db8::1"), t0);
        g.failed(ip("2001:db8::2"), t0);
        assert!(g.check(ip("2001:db8::3"), t0).is_err());
        let off = KeyGuesses::new(0, MINUTE);
        for _ in 0..100 {
            off.failed(ip("10.0.0.1"), t0);
        }
        assert!(off.check(ip("10.0.0.1"), t0).is_ok());
        assert_eq!(off.remembered(), 0);
    }

    #[test]
    fn a_guess_from_too_many_addresses_counts_in_one_overflow_entry() {
        let g = KeyGuesses::new(3, MINUTE);
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            g.failed(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t0);
        }
        for i in 0..3u32 {
            g.failed(IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i)), t0);
        }
        assert_eq!(g.remembered(), MAX_TRACKED + 1, "bounded");
        assert!(
            g.check(ip("11.9.9.9"), t0).is_err(),
            "new addresses share the throttled overflow entry"
        );
        assert!(
            g.check(ip("10.0.0.1"), t0).is_ok(),
            "tracked ones keep their own"
        );
        // Once the window passed, the old entries make room again.
        let later = t0 + MINUTE;
        g.failed(ip("12.0.0.1"), later);
        assert!(g.remembered() <= 2, "{}", g.remembered());
    }
}
