//! "Acked means replicated, when asked": with `redis.replicas_to_ack` > 0 a publish is acked
//! only after that many Redis replicas confirmed it, with `WAIT` on the connection that ran
//! the publish script.
//!
//! `WAIT n timeout` blocks the connection it runs on until `n` replicas have acknowledged
//! every write that connection made before it, or until the timeout; it answers how many did.
//! Every publish of this process to one Redis node goes over one connection (fred keeps one
//! per node), and Redis runs nothing else from a connection while its `WAIT` blocks. So one
//! `WAIT` per publish would hold every later publish back by a replication round trip each.
//! Instead the waits are grouped, like a database's group commit: at most one `WAIT` per
//! node is in flight; publishes that ran their script meanwhile join the next batch, and that
//! batch's single `WAIT` (sent after all their scripts, so it covers them) answers them all.
//!
//! The order that makes this right: a publish sends its script first ([`super::sent`]), then
//! joins a batch; a batch's `WAIT` is sent only after every member joined.
//!
//! And the connection must be the same: fred re-establishes a dropped connection by itself
//! and sends what was queued meanwhile on the new one, where a `WAIT` covers nothing written
//! before and answers at once. So each publish notes the id (`CLIENT ID`, which fred caches
//! per connection before it sends anything on it) of the node's connection when it joins,
//! and a `WAIT` acks only the publishes whose id is still the connection's id after the
//! `WAIT` returned; the others get `unavailable` and their clients retry with the same ref,
//! which writes the ref key again on the current connection for the next `WAIT` to cover. On a Redis
//! Cluster the `WAIT` is routed by the room's hash slot, like the script, so it reaches the
//! same node's connection (a slot moving between the two is not covered: its `WAIT` would
//! count another node's replicas).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::ClusterHash;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::bus::BusError;

/// What a batch's `WAIT` tells each of its publishes.
type Outcome = Result<(), BusError>;

/// The `WAIT`s of one process, grouped per Redis node.
pub(super) struct Replication {
    replicas: i64,
    timeout: Duration,
    /// Per node (`None` when Redis is not a Cluster): publishes waiting for the next batch,
    /// and whether a batch's `WAIT` is in flight.
    gates: Arc<Mutex<HashMap<Option<String>, Gate>>>,
}

#[derive(Default)]
struct Gate {
    in_flight: bool,
    next: Vec<Waiter>,
}

/// One publish waiting for a `WAIT`: where to answer, and the id of the connection its
/// script went out on (`None`: not connected then, so it went out on a later one).
struct Waiter {
    tx: oneshot::Sender<Outcome>,
    connection: Option<i64>,
}

/// What a waiter is told when the batch's `WAIT` said `outcome` on the connection `after`.
fn answer(outcome: &Outcome, joined_on: Option<i64>, after: Option<i64>) -> Outcome {
    match outcome {
        Ok(()) if joined_on.is_none() || joined_on != after => Err(BusError::Unavailable(
            "the connection to Redis was re-established between the publish and its WAIT, \
             so the WAIT did not cover it; retry with the same ref"
                .into(),
        )),
        other => other.clone(),
    }
}

/// The id of this process's connection to `node` (`None` on a Cluster means the one node of
/// a standalone or Sentinel setup), as fred cached it when the connection was set up.
fn connection_id(client: &Client, node: Option<&str>) -> Option<i64> {
    let ids = client.connection_ids();
    match node {
        Some(node) => ids
            .iter()
            .find(|(server, _)| server.to_string() == node)
            .map(|(_, id)| *id),
        // Standalone and Sentinel keep one connection (to the master); more than one would
        // leave it unclear which one the script used.
        None if ids.len() == 1 => ids.values().next().copied(),
        None => None,
    }
}

impl Replication {
    pub(super) fn new(replicas: u32, timeout: Duration) -> Self {
        Self {
            replicas: i64::from(replicas),
            timeout,
            gates: Arc::default(),
        }
    }

    /// Whether publishes wait for replicas at all.
    pub(super) fn enabled(&self) -> bool {
        self.replicas > 0
    }

    /// Joins the next batch for the node that holds `key`; resolves when a `WAIT` sent after
    /// this call says enough replicas have every write made before it. Call it right after
    /// the script was sent, never before.
    pub(super) fn confirm(
        &self,
        client: &Client,
        key: &str,
    ) -> impl std::future::Future<Output = Outcome> + Send + 'static {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let node = client
            .cached_cluster_state()
            .and_then(|state| state.get_server(slot).map(|s| s.to_string()));
        let (tx, rx) = oneshot::channel();
        let connection = connection_id(client, node.as_deref());
        let start = {
            let mut gates = self.gates.lock();
            let gate = gates.entry(node.clone()).or_default();
            gate.next.push(Waiter { tx, connection });
            !std::mem::replace(&mut gate.in_flight, true)
        };
        if start {
            let batches = Batches {
                client: client.clone(),
                gates: Arc::clone(&self.gates),
                node,
                slot,
                replicas: self.replicas,
                timeout: self.timeout,
                finished: false,
            };
            tokio::spawn(batches.run());
        }
        async move {
            rx.await.unwrap_or_else(|_| {
                Err(BusError::Unavailable(
                    "the replication check was dropped".into(),
                ))
            })
        }
    }
}

/// Sends one node's `WAIT`s, a batch at a time, until nobody waits.
struct Batches {
    client: Client,
    gates: Arc<Mutex<HashMap<Option<String>, Gate>>>,
    node: Option<String>,
    slot: u16,
    replicas: i64,
    timeout: Duration,
    /// Set when `run` ended by itself; else dropping it (its runtime shut down) hands the
    /// node back, so later publishes start a batch of their own instead of waiting forever.
    finished: bool,
}

impl Drop for Batches {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(gate) = self.gates.lock().get_mut(&self.node) {
            gate.in_flight = false;
            // Their receivers see the senders go: `unavailable`, and the client retries.
            gate.next.clear();
        }
    }
}

impl Batches {
    async fn run(mut self) {
        // Bounded: each turn answers at least one publish, and publishes are bounded per
        // session; the loop ends when a turn finds nobody waiting.
        loop {
            let batch = {
                let mut gates = self.gates.lock();
                let gate = gates.entry(self.node.clone()).or_default();
                if gate.next.is_empty() {
                    gate.in_flight = false;
                    self.finished = true;
                    return;
                }
                std::mem::take(&mut gate.next)
            };
            let outcome = self.wait().await;
            // Read after the WAIT's answer: fred caches a new connection's id before it sends
            // anything on it, so a WAIT that went out on a newer connection shows here.
            let after = connection_id(&self.client, self.node.as_deref());
            for waiter in batch {
                let _ = waiter.tx.send(answer(&outcome, waiter.connection, after));
            }
        }
    }

    /// One `WAIT`, covering every write this process sent to the node before it.
    async fn wait(&self) -> Outcome {
        let timeout_ms = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
        let options = Options {
            // On a Cluster: the node that holds the room, as for the publish script.
            cluster_hash: Some(ClusterHash::Custom(self.slot)),
            // Redis answers by its own timeout; give the answer time to arrive.
            timeout: Some(self.timeout + Duration::from_secs(1)),
            ..Default::default()
        };
        let acked: i64 = self
            .client
            .with_options(&options)
            .wait(self.replicas, timeout_ms)
            .await
            .map_err(|e| BusError::Unavailable(format!("waiting for Redis replicas: {e}")))?;
        if acked >= self.replicas {
            Ok(())
        } else {
            Err(BusError::Unavailable(format!(
                "stored, but only {acked} of {} Redis replicas confirmed it within {:?}; \
                 retry with the same ref",
                self.replicas, self.timeout
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_wait_on_the_connection_the_publish_joined_on_acks_it() {
        let ok: Outcome = Ok(());
        assert!(answer(&ok, Some(7), Some(7)).is_ok());
        for (joined, after) in [(Some(7), Some(8)), (None, Some(8)), (Some(7), None)] {
            assert!(
                matches!(answer(&ok, joined, after), Err(BusError::Unavailable(_))),
                "{joined:?} then {after:?}"
            );
        }
        let late = BusError::Unavailable("late".into());
        assert_eq!(
            answer(&Err(late.clone()), Some(7), Some(7))
                .unwrap_err()
                .to_string(),
            late.to_string(),
            "a failed WAIT fails its batch whatever the connection"
        );
    }
}
