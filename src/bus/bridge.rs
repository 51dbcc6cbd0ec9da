//! The `RedisBridge` actor: owns the subscriber client, PSUBSCRIBEs `{prefix}:room:*`, hands
//! each event to the room directory, and watches the connection.
//!
//! While it is not subscribed the replica is not ready and publishes fail with `unavailable`.
//! fred's `manage_subscriptions` is not used: after every reconnect the bridge subscribes
//! itself, and only then marks the replica ready and tells every active room to read what it
//! missed from history before live traffic goes on (a `Lagged` receiver counts as a miss too).
//! It also claims this replica's node id, renews its presence lease and reaps dead replicas'
//! members.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message as PubSubMessage;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use super::redis::{NodeIdTaken, RedisBus};
use super::EventSink;
use crate::logctx;
use crate::metrics::Metrics;

/// How long rooms' catch-up after a resubscribe may hold the replica's readiness back.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(5);

/// How often the bridge checks its subscription and pings Redis.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// The actor that owns the subscription (see the module doc).
pub struct RedisBridge {
    bus: Arc<RedisBus>,
    subscriber: SubscriberClient,
    sink: Arc<dyn EventSink>,
    subscribed: bool,
    subscribing: bool,
    /// Told once if another process holds this node id; start-up then exits.
    refused: Option<oneshot::Sender<NodeIdTaken>>,
    /// Counts subscriptions, so a catch-up of an older one does not mark the replica ready.
    generation: u64,
    metrics: Arc<Metrics>,
}

/// Subscriber → bridge: the connection came back (its subscriptions did not).
struct Reconnected;

impl RedisBridge {
    pub fn new(
        bus: Arc<RedisBus>,
        subscriber: SubscriberClient,
        sink: Arc<dyn EventSink>,
        refused: oneshot::Sender<NodeIdTaken>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            bus,
            subscriber,
            sink,
            subscribed: false,
            subscribing: false,
            refused: Some(refused),
            generation: 0,
        }
    }

    /// Renews the lease three times per lease period, reaping dead replicas as it goes.
    fn renew_lease(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.bus.tick_every(), |bridge, ctx| {
            let bus = Arc::clone(&bridge.bus);
            ctx.spawn(
                async move {
                    if let Err(e) = bus.lease_tick().await {
                        log::warn!(
                            "{} cannot renew its presence lease: {e}",
                            logctx::node(&bus.node)
                        );
                    }
                }
                .into_actor(bridge),
            );
        });
    }

    fn lost(&mut self, reason: String) {
        if self.subscribed {
            log::warn!(
                "{} lost the Redis subscription: {reason}",
                logctx::node(&self.bus.node)
            );
        }
        self.subscribed = false;
        self.bus.set_not_ready(Some(reason));
    }

    fn watch(&mut self, ctx: &mut Context<Self>) {
        if !self.subscriber.is_connected() {
            self.lost("Redis subscriber disconnected".into());
            return;
        }
        if !self.subscribed {
            self.subscribe(ctx);
            return;
        }
        // A ping through the subscriber connection: a silent Redis shows here within seconds
        // (fred closes the connection as unresponsive; we see it on the next tick).
        let subscriber = self.subscriber.clone();
        let ping = async move { subscriber.ping::<Value>(None).await };
        ctx.spawn(ping.into_actor(self).map(|result, bridge, _| {
            if let Err(e) = result {
                bridge.lost(format!("Redis did not answer a ping: {e}"));
            }
        }));
    }

    fn subscribe(&mut self, ctx: &mut Context<Self>) {
        if self.subscribing {
            return;
        }
        self.subscribing = true;
        let pattern = self.bus.pattern();
        let released = self.bus.released_channel();
        let subscriber = self.subscriber.clone();
        let fut = async move {
            // The archive's notices of released leases, on a channel of their own.
            if let Some(channel) = released {
                subscriber.subscribe(channel).await?;
            }
            subscriber.psubscribe(pattern).await
        };
        ctx.spawn(fut.into_actor(self).map(|result, bridge, ctx| {
            bridge.subscribing = false;
            match result {
                Ok(()) => {
                    if bridge.generation > 0 {
                        // Not the first subscription: the bridge had lost it and got it back.
                        bridge.metrics.bus_reconnects.inc();
                    }
                    bridge.subscribed = true;
                    log::info!(
                        "{} subscribed to {}; rooms catch up from history",
                        logctx::node(&bridge.bus.node),
                        bridge.bus.pattern()
                    );
                    bridge.catch_up(ctx);
                }
                Err(e) => bridge.lost(format!("cannot subscribe: {e}")),
            }
        }));
    }

    /// Whatever was published while we were not subscribed is in history: every room reads
    /// it, and checks the store did not go back, before the replica takes publishes again.
    /// A room whose reads keep failing holds readiness back for at most [`CATCH_UP_LIMIT`].
    fn catch_up(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        self.bus
            .set_not_ready(Some("catching rooms up from history".into()));
        let (done, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
        self.sink.resync_all(Some(done));
        // Messages published while we were not subscribed were not seen: the archiver scans.
        self.bus.archive_rescan();
        let bus = Arc::clone(&self.bus);
        let wait = async move {
            // Redis may have restarted without its scripts: publishes call them by SHA.
            bus.load_scripts().await;
            tokio::time::timeout(CATCH_UP_LIMIT, all_done.recv())
                .await
                .is_ok()
        };
        ctx.spawn(wait.into_actor(self).map(move |in_time, bridge, _| {
            if !bridge.subscribed || bridge.generation != generation {
                return; // lost again meanwhile; the next subscription catches up anew
            }
            if !in_time {
                log::warn!(
                    "{} some rooms are still catching up after {CATCH_UP_LIMIT:?}; ready anyway",
                    logctx::node(&bridge.bus.node)
                );
            }
            bridge.bus.set_not_ready(None);
            bridge.sink.reassert_presence();
        }));
    }
}

impl Actor for RedisBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.add_stream(BroadcastStream::new(self.subscriber.message_rx()));
        ctx.add_stream(BroadcastStream::new(self.subscriber.reconnect_rx()).map(|_| Reconnected));
        let _task = self.subscriber.connect();
        self.bus.connect();
        ctx.run_interval(WATCH_EVERY, |bridge, ctx| bridge.watch(ctx));
        // Presence waits until this process holds its node id (see `redis/presence.rs`); a
        // process that cannot have it tells start-up, which exits.
        let bus = Arc::clone(&self.bus);
        let claim = async move { bus.claim_node_id().await };
        ctx.spawn(claim.into_actor(self).map(|claimed, bridge, ctx| {
            let refused = bridge.refused.take();
            match claimed {
                Ok(()) => bridge.renew_lease(ctx),
                Err(e) => {
                    log::error!("{} {e}", logctx::node(&bridge.bus.node));
                    if let Some(refused) = refused {
                        let _ = refused.send(e);
                    }
                }
            }
        }));
    }
}

impl StreamHandler<Result<PubSubMessage, BroadcastStreamRecvError>> for RedisBridge {
    fn handle(
        &mut self,
        item: Result<PubSubMessage, BroadcastStreamRecvError>,
        _: &mut Context<Self>,
    ) {
        match item {
            Ok(msg) => {
                // The archiver copies every room's messages, here or not.
                self.bus.saw_event(&msg.channel, &msg.value);
                // Most of a busy cluster's events are for rooms with nobody here: drop those
                // before parsing anything.
                let local = self
                    .bus
                    .room_of(&msg.channel)
                    .is_some_and(|room| self.sink.has_room(room));
                if let Some(event) = local.then(|| self.bus.decode(&msg)).flatten() {
                    self.sink.deliver(event);
                }
            }
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                // Those events are in history: every room reads what it missed.
                log::warn!(
                    "{} fell {n} bus events behind; rooms catch up from history",
                    logctx::node(&self.bus.node)
                );
                self.sink.resync_all(None);
                self.bus.archive_rescan();
            }
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        log::error!(
            "{} the Redis message stream ended",
            logctx::node(&self.bus.node)
        );
    }
}

impl StreamHandler<Reconnected> for RedisBridge {
    fn handle(&mut self, _: Reconnected, ctx: &mut Context<Self>) {
        // A new connection has no subscriptions: subscribe again, then catch up.
        self.lost("Redis subscriber reconnected; resubscribing".into());
        self.subscribe(ctx);
    }

    fn finished(&mut self, _: &mut Context<Self>) {}
}
