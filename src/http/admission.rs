//! Who gets a session slot (docs/PROTOCOL.md §3.4): the replica's connection cap, open sessions per
//! client address and upgrades per client address per second. The upgrade handler asks before it
//! upgrades; a [`Slot`] is held by the session and released when it ends.
//!
//! Per client address it also keeps what one address may do across all of its connections:
//! TCP connections that are not (yet) sessions ([`Pending`], taken at accept, before a byte of
//! the request head is read), distinct rooms its sessions are in, and one message budget
//! ([`Quota`]) that its sessions share; with auth on, each user has a budget of their own too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::domain::{RoomName, UserId};
use crate::net::limit_key;
use crate::ratelimit::TokenBucket;

/// Every this many rate checks, addresses with nothing open and a refilled bucket are
/// forgotten, so a scan from many addresses leaves no state behind.
const SWEEP_EVERY: u64 = 1024;

/// The caps, each 0 for none (but `sessions`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Sessions on this replica (`limits.max_connections`, worked out at start).
    pub sessions: usize,
    /// `limits.max_connections_per_ip`.
    pub sessions_per_ip: usize,
    /// `limits.upgrades_per_ip_per_sec`.
    pub upgrades_per_sec: u32,
    /// `limits.handshakes_per_ip`: connections of one address that are not sessions.
    pub pending_per_ip: usize,
    /// `limits.rooms_per_ip`: distinct rooms one address's sessions are in.
    pub rooms_per_ip: usize,
    /// `limits.messages_per_sec_per_ip`, with twice that as its burst.
    pub messages_per_ip: u32,
    /// `limits.messages_per_sec_per_user`, with twice that as its burst.
    pub messages_per_user: u32,
}

/// `sessions` is `limits.max_connections` as set, 0 when it is to be derived: start-up
/// replaces it with the cap it planned from the open-file limit.
impl From<&crate::settings::Settings> for Limits {
    fn from(settings: &crate::settings::Settings) -> Self {
        let limits = &settings.limits;
        Self {
            sessions: limits.max_connections,
            sessions_per_ip: limits.max_connections_per_ip,
            upgrades_per_sec: limits.upgrades_per_ip_per_sec,
            pending_per_ip: limits.handshakes_per_ip,
            rooms_per_ip: limits.rooms_per_ip,
            messages_per_ip: limits.messages_per_sec_per_ip,
            messages_per_user: limits.messages_per_sec_per_user,
        }
    }
}

pub struct Admission {
    open: AtomicUsize,
    limits: Limits,
    clients: Mutex<HashMap<IpAddr, Client>>,
    users: Mutex<HashMap<UserId, Arc<Quota>>>,
    checks: AtomicU64,
    /// When the last "replica full" warning was logged (seconds since `started`).
    full_warned: AtomicU64,
    started: Instant,
}

#[derive(Default)]
struct Client {
    open: usize,
    pending: usize,
    upgrades: Option<TokenBucket>,
    /// Sessions per room (by [`room_key`]), while the address has any.
    rooms: HashMap<u64, usize>,
    messages: Option<Arc<Quota>>,
}

impl Client {
    /// Nothing open and nothing to remember: a spent budget is kept until it refilled, or
    /// reconnecting would be a way to a fresh one.
    fn idle(&self, now: Instant) -> bool {
        self.open == 0
            && self.pending == 0
            && !self.upgrades.as_ref().is_some_and(|b| !b.is_full(now))
            && !self.messages.as_ref().is_some_and(|q| !q.is_full(now))
    }
}

/// A message budget shared by every session of one address, or of one user.
#[derive(Debug)]
pub struct Quota(Mutex<TokenBucket>);

impl Quota {
    fn new(rate: u32, now: Instant) -> Arc<Self> {
        Arc::new(Self(Mutex::new(TokenBucket::new(
            rate,
            rate.saturating_mul(2),
            now,
        ))))
    }

    fn is_full(&self, now: Instant) -> bool {
        self.0.lock().is_full(now)
    }

    /// Takes one message's token if there is one.
    pub fn try_take(&self, now: Instant) -> bool {
        self.0.lock().try_take(now)
    }
}

/// The budgets a session's messages are charged to besides its own.
#[derive(Debug, Clone, Default)]
pub struct Quotas {
    pub address: Option<Arc<Quota>>,
    pub user: Option<Arc<Quota>>,
}

impl Quotas {
    /// Takes a token from each budget; false when one of them is spent.
    pub fn try_take(&self, now: Instant) -> bool {
        [&self.address, &self.user]
            .into_iter()
            .flatten()
            .all(|q| q.try_take(now))
    }
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
    /// 429: this address's sessions are in `limits.rooms_per_ip` rooms already.
    Rooms,
}

/// One admitted session; dropping it frees the slot.
pub struct Slot {
    admission: Arc<Admission>,
    key: IpAddr,
    /// The rooms it is counted in (by [`room_key`]): its path room, then those it subscribed
    /// to. Empty (unallocated) while `limits.rooms_per_ip` is 0.
    rooms: Vec<u64>,
    user: Option<UserId>,
    quotas: Quotas,
}

impl Slot {
    /// The shared budgets this session's messages are charged to.
    pub fn quotas(&self) -> Quotas {
        self.quotas.clone()
    }
}

/// A room as the per-address table knows it: a hash, so a slot holds no copy of the name
/// (every session has a slot). Two rooms with one hash count as one, which only errs towards
/// letting a client in.
fn room_key(room: &RoomName) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(room)
}

/// One TCP connection of an address that is not a session (yet): a handshake in progress or
/// a plain HTTP connection. Dropped when it becomes a session or closes.
pub struct Pending {
    admission: Arc<Admission>,
    /// `None` for a trusted proxy's connection, which is not counted.
    key: Option<IpAddr>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            open: AtomicUsize::new(0),
            limits,
            clients: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
            full_warned: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    pub fn max(&self) -> usize {
        self.limits.sessions
    }

    /// Whether a "replica full" warning is due: at most one every 10 s, so a flood against
    /// a full replica does not flood the log.
    pub fn warn_full(&self) -> bool {
        let now = self.started.elapsed().as_secs() + 10;
        let last = self.full_warned.load(Ordering::Relaxed);
        now >= last + 10
            && self
                .full_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Counts a new TCP connection from `peer` before anything of it is read, or refuses it
    /// (the caller drops it) when the address has `limits.handshakes_per_ip` such
    /// connections open: each costs the HTTP dispatcher's buffers until its head is in, or
    /// the handshake timeout. A trusted proxy's connections are not counted (their clients are
    /// known only from the head).
    pub fn pending(self: &Arc<Self>, peer: IpAddr, trusted: bool) -> Option<Pending> {
        let max = self.limits.pending_per_ip;
        if max == 0 || trusted {
            return Some(Pending {
                admission: Arc::clone(self),
                key: None,
            });
        }
        let key = limit_key(peer);
        let mut clients = self.clients.lock();
        let client = clients.entry(key).or_default();
        if client.pending >= max {
            return None;
        }
        client.pending += 1;
        Some(Pending {
            admission: Arc::clone(self),
            key: Some(key),
        })
    }

    /// Sessions admitted now, for tests (`confab_sessions_open` is the metric).
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts one upgrade attempt of `ip`; checked before the token, so a flood costs no
    /// signature checks.
    pub fn check_rate(&self, ip: IpAddr, now: Instant) -> Result<(), Refused> {
        if self.limits.upgrades_per_sec == 0 {
            return Ok(());
        }
        let mut clients = self.clients.lock();
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            clients.retain(|_, c| !c.idle(now));
            let mut users = self.users.lock();
            users.retain(|_, q| Arc::strong_count(q) > 1 || !q.is_full(now));
        }
        let rate = self.limits.upgrades_per_sec;
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

    /// Takes a slot for a session of `ip` in `room`, if the caps allow it; `user` is given
    /// when a token named the user (anonymous users name themselves, so only the address
    /// budget holds for them).
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        room: Option<&RoomName>,
        user: Option<&UserId>,
    ) -> Result<Slot, Refused> {
        let limits = self.limits;
        let key = limit_key(ip);
        let now = Instant::now();
        let mut clients = self.clients.lock();
        let client = clients.entry(key).or_default();
        if limits.sessions_per_ip > 0 && client.open >= limits.sessions_per_ip {
            return Err(Refused::PerIp);
        }
        let room = room.map(room_key);
        if room.is_some_and(|room| !may_enter(client, limits, room)) {
            return Err(Refused::Rooms);
        }
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limits.sessions).then_some(n + 1)
            })
            .map_err(|_| Refused::Full)?;
        client.open += 1;
        let mut rooms = Vec::new();
        if let Some(room) = room.filter(|_| limits.rooms_per_ip > 0) {
            *client.rooms.entry(room).or_default() += 1;
            rooms.push(room);
        }
        let address = (limits.messages_per_ip > 0).then(|| {
            Arc::clone(
                client
                    .messages
                    .get_or_insert_with(|| Quota::new(limits.messages_per_ip, now)),
            )
        });
        drop(clients);
        let user = user.filter(|_| limits.messages_per_user > 0);
        let user_quota = user.map(|u| {
            let mut users = self.users.lock();
            Arc::clone(
                users
                    .entry(u.clone())
                    .or_insert_with(|| Quota::new(limits.messages_per_user, now)),
            )
        });
        Ok(Slot {
            admission: Arc::clone(self),
            key,
            rooms,
            user: user.cloned(),
            quotas: Quotas {
                address,
                user: user_quota,
            },
        })
    }

    /// Addresses remembered now, for tests.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.clients.lock().len()
    }
}

/// Whether one more session of `client` may be in `room` under `limits.rooms_per_ip`.
fn may_enter(client: &Client, limits: Limits, room: u64) -> bool {
    limits.rooms_per_ip == 0
        || client.rooms.len() < limits.rooms_per_ip
        || client.rooms.contains_key(&room)
}

/// Forgets one session's count of `room`.
fn forget(client: &mut Client, room: u64) {
    if let Some(n) = client.rooms.get_mut(&room) {
        *n -= 1;
        if *n == 0 {
            client.rooms.remove(&room);
        }
    }
}

/// A session's `subscribe` counts its room for the session's address, as a path room is
/// counted at admission.
impl crate::actors::session::RoomSlots for Slot {
    fn enter(&mut self, room: &RoomName) -> bool {
        let limits = self.admission.limits;
        if limits.rooms_per_ip == 0 {
            return true;
        }
        let room = room_key(room);
        let mut clients = self.admission.clients.lock();
        let Some(client) = clients.get_mut(&self.key) else {
            return true;
        };
        if !may_enter(client, limits, room) {
            return false;
        }
        *client.rooms.entry(room).or_default() += 1;
        self.rooms.push(room);
        true
    }

    fn leave(&mut self, room: &RoomName) {
        let room = room_key(room);
        let Some(at) = self.rooms.iter().position(|r| *r == room) else {
            return;
        };
        self.rooms.swap_remove(at);
        let mut clients = self.admission.clients.lock();
        if let Some(client) = clients.get_mut(&self.key) {
            forget(client, room);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let a = &self.admission;
        a.open.fetch_sub(1, Ordering::AcqRel);
        let mut clients = a.clients.lock();
        if let Some(c) = clients.get_mut(&self.key) {
            c.open = c.open.saturating_sub(1);
            for room in &self.rooms {
                forget(c, *room);
            }
            if c.open == 0 {
                c.rooms = HashMap::new();
            }
            if c.idle(Instant::now()) {
                clients.remove(&self.key);
            }
        }
        drop(clients);
        if let (Some(user), Some(quota)) = (&self.user, &self.quotas.user) {
            // This slot's clone and the map's are the last two: the user's last session. A
            // spent budget stays until a sweep finds it refilled (see `check_rate`).
            if Arc::strong_count(quota) <= 2 && quota.is_full(Instant::now()) {
                let mut users = a.users.lock();
                users.remove(user);
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut clients = self.admission.clients.lock();
        if let Some(c) = clients.get_mut(&key) {
            c.pending = c.pending.saturating_sub(1);
            if c.idle(Instant::now()) {
                clients.remove(&key);
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

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    fn limits(sessions: usize, sessions_per_ip: usize, upgrades_per_sec: u32) -> Limits {
        Limits {
            sessions,
            sessions_per_ip,
            upgrades_per_sec,
            ..Limits::default()
        }
    }

    impl Admission {
        fn admit_to(self: &Arc<Self>, addr: &str) -> Result<Slot, Refused> {
            self.admit(ip(addr), Some(&room("lobby")), None)
        }
    }

    #[test]
    fn the_per_address_cap_leaves_other_addresses_alone() {
        let a = Arc::new(Admission::new(limits(10, 2, 0)));
        let s1 = a.admit_to("10.0.0.1").unwrap();
        let _s2 = a.admit_to("10.0.0.1").unwrap();
        assert_eq!(a.admit_to("10.0.0.1").err(), Some(Refused::PerIp));
        assert!(a.admit_to("10.0.0.2").is_ok());
        drop(s1);
        assert!(
            a.admit_to("10.0.0.1").is_ok(),
            "a closed session frees its slot"
        );
    }

    #[test]
    fn the_replica_cap_counts_every_address() {
        let a = Arc::new(Admission::new(limits(2, 0, 0)));
        let _s1 = a.admit_to("10.0.0.1").unwrap();
        let _s2 = a.admit_to("10.0.0.2").unwrap();
        assert_eq!(a.admit_to("10.0.0.3").err(), Some(Refused::Full));
        assert_eq!(a.open(), 2);
    }

    #[test]
    fn upgrades_per_second_refill() {
        let a = Admission::new(limits(10, 0, 3));
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
        let a = Admission::new(limits(10, 0, 5));
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

    #[test]
    fn an_address_is_held_to_its_rooms_and_a_room_it_is_in_stays_open_to_it() {
        let a = Arc::new(Admission::new(Limits {
            rooms_per_ip: 2,
            ..limits(10, 0, 0)
        }));
        let one = a.admit(ip("10.0.0.1"), Some(&room("one")), None).unwrap();
        let _two = a.admit(ip("10.0.0.1"), Some(&room("two")), None).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1"), Some(&room("three")), None).err(),
            Some(Refused::Rooms)
        );
        let _one_again = a.admit(ip("10.0.0.1"), Some(&room("one")), None).unwrap();
        assert!(a.admit(ip("10.0.0.2"), Some(&room("three")), None).is_ok());
        drop(one);
        assert!(
            a.admit(ip("10.0.0.1"), Some(&room("three")), None).is_err(),
            "room one still has a session of this address"
        );
    }

    #[test]
    fn sessions_of_one_address_or_one_user_share_one_message_budget() {
        let a = Arc::new(Admission::new(Limits {
            messages_per_ip: 2,
            messages_per_user: 1,
            ..limits(10, 0, 0)
        }));
        let now = Instant::now();
        let (s1, s2) = (
            a.admit_to("10.0.0.1").unwrap(),
            a.admit_to("10.0.0.1").unwrap(),
        );
        let taken = (0..10)
            .filter(|i| if i % 2 == 0 { &s1 } else { &s2 }.quotas().try_take(now))
            .count();
        assert_eq!(taken, 4, "burst of twice the rate, shared");
        let alice = UserId::parse("alice").unwrap();
        let u1 = a
            .admit(ip("10.0.0.2"), Some(&room("r")), Some(&alice))
            .unwrap();
        let u2 = a
            .admit(ip("10.0.0.3"), Some(&room("r")), Some(&alice))
            .unwrap();
        let taken = (0..10)
            .filter(|i| if i % 2 == 0 { &u1 } else { &u2 }.quotas().try_take(now))
            .count();
        assert_eq!(taken, 2, "one user from two addresses");
    }

    #[test]
    fn a_spent_budget_outlives_the_sessions_so_reconnecting_does_not_refill_it() {
        let a = Arc::new(Admission::new(Limits {
            messages_per_ip: 1,
            ..limits(10, 0, 0)
        }));
        let now = Instant::now();
        let slot = a.admit_to("10.0.0.1").unwrap();
        assert!(slot.quotas().try_take(now) && slot.quotas().try_take(now));
        drop(slot);
        let again = a.admit_to("10.0.0.1").unwrap();
        assert!(!again.quotas().try_take(now), "still spent");
    }

    #[test]
    fn connections_that_are_not_sessions_are_capped_per_address_but_not_a_trusted_proxys() {
        let a = Arc::new(Admission::new(Limits {
            pending_per_ip: 2,
            ..limits(10, 0, 0)
        }));
        let p1 = a.pending(ip("10.0.0.1"), false).unwrap();
        let _p2 = a.pending(ip("10.0.0.1"), false).unwrap();
        assert!(a.pending(ip("10.0.0.1"), false).is_none());
        assert!(a.pending(ip("10.0.0.2"), false).is_some());
        assert!((0..5).all(|_| a.pending(ip("10.0.0.1"), true).is_some()));
        drop(p1);
        assert!(a.pending(ip("10.0.0.1"), false).is_some());
    }
}
