//! Who gets a session slot (SPEC §3): the replica's connection cap, open sessions per client
//! address and upgrades per client address per second. The upgrade handler asks before it
//! upgrades; a [`Slot`] is held by the session and released when it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::net::limit_key;
use crate::ratelimit::TokenBucket;

/// Every this many rate checks, addresses with nothing open and a refilled bucket are
/// forgotten, so a scan from many addresses leaves no state behind.
const SWEEP_EVERY: u64 = 1024;

pub struct Admission {
    open: AtomicUsize,
    max: usize,
    per_ip_max: usize,
    upgrades_per_sec: u32,
    clients: Mutex<HashMap<IpAddr, Client>>,
    checks: AtomicU64,
}

#[derive(Default)]
struct Client {
    open: usize,
    upgrades: Option<TokenBucket>,
}

/// Why a client gets no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// 429: this address started more than `limits.upgrades_per_ip_per_sec` upgrades.
    TooFast,
    /// 429: this address holds `limits.max_connections_per_ip` sessions.
    PerIp,
    /// 503: the replica holds `limits.max_connections` sessions.
    Full,
}

/// One admitted session; dropping it frees the slot.
pub struct Slot {
    admission: Arc<Admission>,
    key: IpAddr,
}

impl Admission {
    /// `per_ip_max` and `upgrades_per_sec` of 0 mean no limit.
    pub fn new(max: usize, per_ip_max: usize, upgrades_per_sec: u32) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max,
            per_ip_max,
            upgrades_per_sec,
            clients: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Sessions admitted now, for tests (`confab_sessions_open` is the metric).
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts one upgrade attempt of `ip`; checked before the token, so a flood costs no
    /// signature checks.
    pub fn check_rate(&self, ip: IpAddr, now: Instant) -> Result<(), Refused> {
        if self.upgrades_per_sec == 0 {
            return Ok(());
        }
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            clients
                .retain(|_, c| c.open > 0 || c.upgrades.as_ref().is_some_and(|b| !b.is_full(now)));
        }
        let rate = self.upgrades_per_sec;
        let client = clients.entry(limit_key(ip)).or_default();
        let bucket = client
            .upgrades
            .get_or_insert_with(|| TokenBucket::new(rate, rate, now));
        if bucket.try_take(now) {
            Ok(())
        } else {
            Err(Refused::TooFast)
        }
    }

    /// Takes a slot for a session of `ip`, if both caps allow it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let key = limit_key(ip);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let client = clients.entry(key).or_default();
        if self.per_ip_max > 0 && client.open >= self.per_ip_max {
            return Err(Refused::PerIp);
        }
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .map_err(|_| Refused::Full)?;
        client.open += 1;
        Ok(Slot {
            admission: Arc::clone(self),
            key,
        })
    }

    /// Addresses remembered now, for tests.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.clients.lock().map_or(0, |c| c.len())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let a = &self.admission;
        a.open.fetch_sub(1, Ordering::AcqRel);
        let mut clients = a.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get_mut(&self.key) {
            c.open = c.open.saturating_sub(1);
            if c.open == 0 && c.upgrades.is_none() {
                clients.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_per_address_cap_leaves_other_addresses_alone() {
        let a = Arc::new(Admission::new(10, 2, 0));
        let s1 = a.admit(ip("10.0.0.1")).unwrap();
        let _s2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::PerIp));
        assert!(a.admit(ip("10.0.0.2")).is_ok());
        drop(s1);
        assert!(
            a.admit(ip("10.0.0.1")).is_ok(),
            "a closed session frees its slot"
        );
    }

    #[test]
    fn the_replica_cap_counts_every_address() {
        let a = Arc::new(Admission::new(2, 0, 0));
        let _s1 = a.admit(ip("10.0.0.1")).unwrap();
        let _s2 = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.3")).err(), Some(Refused::Full));
        assert_eq!(a.open(), 2);
    }

    #[test]
    fn upgrades_per_second_refill() {
        let a = Admission::new(10, 0, 3);
        let t0 = Instant::now();
        let ok = (0..5)
            .filter(|_| a.check_rate(ip("10.0.0.1"), t0).is_ok())
            .count();
        assert_eq!(ok, 3);
        assert!(a.check_rate(ip("10.0.0.2"), t0).is_ok(), "per address");
        assert!(a
            .check_rate(ip("10.0.0.1"), t0 + Duration::from_secs(1))
            .is_ok());
    }

    #[test]
    fn a_scan_from_many_addresses_is_forgotten() {
        let a = Admission::new(10, 0, 5);
        let t0 = Instant::now();
        for i in 0..(SWEEP_EVERY as u32) {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = a.check_rate(addr, t0);
        }
        let later = t0 + Duration::from_secs(2);
        for _ in 0..SWEEP_EVERY {
            let _ = a.check_rate(ip("192.0.2.1"), later);
        }
        assert!(a.remembered() <= 2, "remembered {}", a.remembered());
    }
}
