//! A [`Bus`] wrapper that times publishes and counts what was published, so the WebSocket and
//! the HTTP API (the two ways in) are measured in one place.

use std::sync::Arc;
use std::time::Instant;

use super::{
    Bus, BusFuture, HistoryPage, NewMessage, PresenceChange, PresenceSnapshot, Published, Renewed,
    Replay, RoomHead, SharedBus,
};
use crate::domain::{Epoch, Offset, RoomName, UserId};
use crate::metrics::Metrics;

pub struct MeteredBus {
    inner: SharedBus,
    metrics: Arc<Metrics>,
}

impl MeteredBus {
    pub fn wrap(inner: SharedBus, metrics: Arc<Metrics>) -> SharedBus {
        Arc::new(Self { inner, metrics })
    }
}

impl MeteredBus {
    /// Times one message's publish and counts it once stored.
    fn measured(&self, call: BusFuture<Published>, started: Instant) -> BusFuture<Published> {
        let metrics = Arc::clone(&self.metrics);
        Box::pin(async move {
            let result = call.await;
            if let Ok(p) = &result {
                metrics
                    .bus_publish_seconds
                    .observe(started.elapsed().as_secs_f64());
                if !p.duplicate {
                    metrics.messages_published.inc();
                }
            }
            result
        })
    }
}

impl Bus for MeteredBus {
    fn publish(&self, room: &RoomName, msg: NewMessage) -> BusFuture<Published> {
        self.metrics.messages_received.inc();
        let started = Instant::now();
        // Called now, not when polled: the inner bus orders publishes by call (see `Bus`).
        let call = self.inner.publish(room, msg);
        self.measured(call, started)
    }

    fn publish_run(&self, room: &RoomName, msgs: Vec<NewMessage>) -> Vec<BusFuture<Published>> {
        self.metrics.messages_received.inc_by(msgs.len() as u64);
        let started = Instant::now();
        let calls = self.inner.publish_run(room, msgs);
        calls
            .into_iter()
            .map(|call| self.measured(call, started))
            .collect()
    }

    fn typing(&self, room: &RoomName, user: &UserId) -> BusFuture<()> {
        self.inner.typing(room, user)
    }

    fn head(&self, room: &RoomName) -> BusFuture<RoomHead> {
        self.inner.head(room)
    }

    fn replay(
        &self,
        room: &RoomName,
        since: Offset,
        epoch: &Epoch,
        limit: usize,
    ) -> BusFuture<Replay> {
        self.inner.replay(room, since, epoch, limit)
    }

    fn renew_epoch(&self, room: &RoomName, stale: &Epoch, floor: Offset) -> BusFuture<Renewed> {
        self.inner.renew_epoch(room, stale, floor)
    }

    fn history(
        &self,
        room: &RoomName,
        before: Option<Offset>,
        limit: usize,
    ) -> BusFuture<HistoryPage> {
        self.inner.history(room, before, limit)
    }

    fn join(&self, room: &RoomName, user: &UserId) -> BusFuture<()> {
        self.inner.join(room, user)
    }

    fn leave(&self, room: &RoomName, user: &UserId) -> BusFuture<()> {
        self.inner.leave(room, user)
    }

    fn presence_changes(&self, room: &RoomName, changes: Vec<PresenceChange>) -> BusFuture<()> {
        self.inner.presence_changes(room, changes)
    }

    fn presence(&self, room: &RoomName) -> BusFuture<Vec<UserId>> {
        self.inner.presence(room)
    }

    fn presence_snapshot(&self, room: &RoomName) -> BusFuture<PresenceSnapshot> {
        self.inner.presence_snapshot(room)
    }

    fn readiness(&self) -> Result<(), String> {
        self.inner.readiness()
    }
}
