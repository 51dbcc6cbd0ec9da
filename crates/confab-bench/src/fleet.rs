//! Many connections at once: open them (bounded concurrency), wait for every one to attach,
//! wait for the frames they set off to settle, and close them in order.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::args::Global;
use crate::conn::{self, Dialer, Shared, Sink, Spec};
use crate::track::Tracker;

/// What every scenario gets.
pub struct Ctx {
    pub global: Global,
    pub dialer: Arc<Dialer>,
    pub shared: Arc<Shared>,
    /// The phase the progress line names.
    pub phase: Arc<Mutex<String>>,
    /// Messages the bench has sent, for the progress line.
    pub sent: Arc<std::sync::atomic::AtomicU64>,
}

impl Ctx {
    pub fn set_phase(&self, phase: impl Into<String>) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase.into();
    }
}

pub struct Fleet {
    handles: Vec<Option<JoinHandle<Option<Tracker>>>>,
    stops: Vec<Option<oneshot::Sender<()>>>,
    /// Write halves of the attached connections, by index (`None` = failed).
    pub sinks: Vec<Option<Sink>>,
    /// Why connections failed, with how many failed that way.
    pub failures: std::collections::BTreeMap<String, u64>,
    pub attached: usize,
    /// From the first connect to the last attach.
    pub connect_secs: f64,
}

impl Fleet {
    /// Opens one connection per spec (with its tracker, if any) and waits until each is
    /// attached or failed.
    pub async fn open(ctx: &Ctx, specs: Vec<Spec>, trackers: Vec<Option<Tracker>>) -> Fleet {
        let started = Instant::now();
        let permit = Arc::new(Semaphore::new(ctx.global.connect_concurrency.max(1)));
        let (mut handles, mut stops, mut waits) = (Vec::new(), Vec::new(), Vec::new());
        for (spec, tracker) in specs.into_iter().zip(trackers) {
            let (attached_tx, attached_rx) = oneshot::channel();
            let (stop_tx, stop_rx) = oneshot::channel();
            handles.push(Some(tokio::spawn(conn::run(
                spec,
                Arc::clone(&ctx.dialer),
                Arc::clone(&ctx.shared),
                Arc::clone(&permit),
                attached_tx,
                tracker,
                stop_rx,
            ))));
            stops.push(Some(stop_tx));
            waits.push(attached_rx);
        }
        let mut fleet = Fleet {
            handles,
            stops,
            sinks: Vec::with_capacity(waits.len()),
            failures: Default::default(),
            attached: 0,
            connect_secs: 0.0,
        };
        for wait in waits {
            match wait.await {
                Ok(Ok(sink)) => {
                    fleet.sinks.push(Some(sink));
                    fleet.attached += 1;
                }
                Ok(Err(e)) => {
                    fleet.sinks.push(None);
                    *fleet.failures.entry(reason(&e)).or_default() += 1;
                }
                Err(_) => {
                    fleet.sinks.push(None);
                    *fleet.failures.entry("task ended".into()).or_default() += 1;
                }
            }
        }
        fleet.connect_secs = started.elapsed().as_secs_f64();
        fleet
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Closes connections `range` (they send a close and read the server's answer), while
    /// the others keep reading; returns their trackers.
    pub async fn close(&mut self, range: std::ops::Range<usize>) -> Vec<Option<Tracker>> {
        for i in range.clone() {
            if let Some(stop) = self.stops[i].take() {
                let _ = stop.send(());
            }
        }
        let mut out = Vec::with_capacity(range.len());
        for i in range {
            out.push(match self.handles[i].take() {
                Some(h) => h.await.ok().flatten(),
                None => None,
            });
        }
        out
    }

    /// Closes every connection, `batch` at a time in index order; returns the trackers.
    pub async fn close_all(&mut self, batch: usize) -> Vec<Option<Tracker>> {
        let mut out = Vec::with_capacity(self.len());
        let mut start = 0;
        while start < self.len() {
            let end = (start + batch.max(1)).min(self.len());
            out.extend(self.close(start..end).await);
            start = end;
        }
        out
    }
}

/// A failure's reason without the per-connection details (ports, codes stay).
fn reason(e: &str) -> String {
    e.chars().take(120).collect()
}

/// Waits until no frame arrived for `quiet` (or `max` passed); returns how long it took.
pub async fn settle(shared: &Shared, quiet: Duration, max: Duration) -> Duration {
    let started = Instant::now();
    let total = || shared.frames().iter().sum::<u64>();
    let mut last = total();
    let mut since = Instant::now();
    while started.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = total();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    started.elapsed()
}

/// Prints a progress line to stderr every `every` until aborted.
pub async fn progress(ctx: Arc<Ctx>, every: Duration) {
    let started = Instant::now();
    let mut prev = (
        ctx.shared.frames(),
        ctx.sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    loop {
        tokio::time::sleep(every).await;
        let frames = ctx.shared.frames();
        let sent = ctx.sent.load(Ordering::Relaxed);
        let dt = prev.2.elapsed().as_secs_f64().max(1e-9);
        let msg_rate = (frames[conn::MESSAGE] - prev.0[conn::MESSAGE]) as f64 / dt;
        let send_rate = (sent - prev.1) as f64 / dt;
        let attached = ctx.shared.attached.load(Ordering::Relaxed);
        let ended = ctx.shared.ended.load(Ordering::Relaxed);
        let phase = ctx.phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let kinds: Vec<String> = conn::KINDS
            .iter()
            .zip(frames)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        eprintln!(
            "[{:6.1}s] {phase} | open {} | sent {sent} ({send_rate:.0}/s) | delivered {:.0}/s | frames: {}",
            started.elapsed().as_secs_f64(),
            attached.saturating_sub(ended),
            msg_rate,
            kinds.join(", ")
        );
        prev = (frames, sent, Instant::now());
    }
}
