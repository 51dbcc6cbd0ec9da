//! The embedded bus over a store: a message is acked only after it is committed (docs/design.md,
//! "The store").
//!
//! Publishes are not applied where they are called. `publish_run` queues one command on an
//! unbounded channel, synchronously, so commands are in call order (one connection's messages
//! get offsets in the order it sent them). One writer task takes every command queued since
//! its last commit (group commit: one transaction for a run, and for whatever other sessions
//! queued meanwhile), stages offsets on top of the rooms' state, commits, and only then, under
//! the bus's mutex, applies the batch to the in-memory windows and delivers it in offset
//! order; the acks go out after. A failed commit changes nothing: every message of the batch
//! is answered `unavailable` and no offset is used, so there is no gap.
//!
//! The channel's bound is the sessions': each has at most `MAX_PUBLISHES_IN_FLIGHT`
//! publishes waiting for their answer.
//!
//! Rooms are loaded lazily: the first use of a room not in memory reads its head (and the
//! refs of its last [`REF_TTL`]) from the store. Only the writer moves a loaded room's epoch
//! and offset, so a load that finds the room already present keeps what is there.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};

use super::{Inner, RoomLog, State};
use crate::bus::{
    BusError, BusFuture, EventKind, HistoryPage, NewMessage, Published, Renewed, Replay, RoomEvent,
    RoomHead, StoredMessage, REF_TTL,
};
use crate::domain::{now_ms, Epoch, Offset, RoomName, UserId};
use crate::metrics::Metrics;
use crate::protocol::ServerFrame;
use crate::store::{Append, Page, RoomState, Row, SharedStore, StoreError};

/// Most commands one commit takes, so one transaction stays a bounded piece of work.
const MAX_BATCH: usize = 1024;

type Ack = oneshot::Sender<Result<Published, BusError>>;

/// Work for the writer, in call order.
pub(super) enum Command {
    Publish {
        room: RoomName,
        msgs: Vec<(NewMessage, Ack)>,
    },
    Renew {
        room: RoomName,
        stale: Epoch,
        floor: Offset,
        reply: oneshot::Sender<Result<Renewed, BusError>>,
    },
}

/// The store side of the bus.
pub(super) struct Durable {
    store: SharedStore,
    writer: mpsc::UnboundedSender<Command>,
    metrics: Option<Arc<Metrics>>,
    /// `store.commit_timeout_ms`.
    commit_timeout: Duration,
}

impl Durable {
    pub(super) fn new(
        store: SharedStore,
        metrics: Option<Arc<Metrics>>,
        commit_timeout: Duration,
    ) -> (Self, mpsc::UnboundedReceiver<Command>) {
        let (writer, commands) = mpsc::unbounded_channel();
        (
            Self {
                store,
                writer,
                metrics,
                commit_timeout,
            },
            commands,
        )
    }

    pub(super) fn publish_run(
        &self,
        room: &RoomName,
        msgs: Vec<NewMessage>,
    ) -> Vec<BusFuture<Published>> {
        let (msgs, answers): (Vec<_>, Vec<_>) = msgs
            .into_iter()
            .map(|msg| {
                let (ack, answer) = oneshot::channel();
                ((msg, ack), answer)
            })
            .unzip();
        // A send fails only when the writer is gone (shutting down): every answer below then
        // resolves to `unavailable`, since its sender was dropped with the command.
        let _ = self.writer.send(Command::Publish {
            room: room.clone(),
            msgs,
        });
        answers.into_iter().map(|a| answer(a).boxed()).collect()
    }

    pub(super) fn renew_epoch(
        &self,
        room: &RoomName,
        stale: &Epoch,
        floor: Offset,
    ) -> BusFuture<Renewed> {
        let (reply, answered) = oneshot::channel();
        let _ = self.writer.send(Command::Renew {
            room: room.clone(),
            stale: stale.clone(),
            floor,
            reply,
        });
        answer(answered).boxed()
    }

    /// Counts and logs a store failure; what the client sees of it.
    fn failed(&self, what: &str, e: StoreError) -> BusError {
        if let Some(m) = &self.metrics {
            m.store_errors.inc();
        }
        log::error!("store: {what} failed: {e}");
        BusError::Unavailable(format!("the store is unavailable: {e}"))
    }
}

async fn answer<T>(answered: oneshot::Receiver<Result<T, BusError>>) -> Result<T, BusError> {
    answered
        .await
        .unwrap_or_else(|_| Err(BusError::Unavailable("the store writer has stopped".into())))
}

/// The writer task: one commit at a time, each taking everything queued meanwhile.
pub(super) async fn writer(inner: Weak<Inner>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut batch = Vec::new();
    while let Some(first) = commands.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else {
            break;
        };
        commit(&inner, std::mem::take(&mut batch)).await;
    }
}

/// A room's state as the batch moves it, before it is committed.
struct Overlay {
    epoch: Epoch,
    offset: Offset,
    base: Offset,
    /// Refs first used in this batch.
    refs: HashMap<(UserId, String), Offset>,
    /// The epoch was renewed in this batch: the room's remembered refs no longer count.
    renewed: bool,
}

/// One answer the batch owes, in command order.
enum Staged {
    New {
        room: RoomName,
        epoch: Epoch,
        offset: Offset,
        json: bytestring::ByteString,
        key: Option<(UserId, String)>,
        ack: Ack,
    },
    Duplicate {
        published: Published,
        ack: Ack,
    },
    Renew {
        room: RoomName,
        renewed: Renewed,
        base: Offset,
        reply: oneshot::Sender<Result<Renewed, BusError>>,
    },
    Failed {
        error: BusError,
        ack: Answer,
    },
}

/// Where a failure goes.
enum Answer {
    Publish(Ack),
    Renew(oneshot::Sender<Result<Renewed, BusError>>),
}

impl Answer {
    fn fail(self, error: BusError) {
        match self {
            Self::Publish(ack) => drop(ack.send(Err(error))),
            Self::Renew(reply) => drop(reply.send(Err(error))),
        }
    }
}

impl Staged {
    fn fail(self, error: BusError) {
        match self {
            Self::New { ack, .. } | Self::Duplicate { ack, .. } => drop(ack.send(Err(error))),
            Self::Renew { reply, .. } => drop(reply.send(Err(error))),
            Self::Failed { error, ack } => ack.fail(error),
        }
    }
}

async fn commit(inner: &Inner, batch: Vec<Command>) {
    let Some(d) = &inner.durable else {
        return;
    };
    let mut unloaded: HashMap<RoomName, BusError> = HashMap::new();
    let mut touched: Vec<RoomName> = Vec::new();
    for cmd in &batch {
        let room = match cmd {
            Command::Publish { room, .. } | Command::Renew { room, .. } => room,
        };
        if !touched.contains(room) {
            touched.push(room.clone());
        }
        if !unloaded.contains_key(room) {
            if let Err(e) = load(inner, room).await {
                unloaded.insert(room.clone(), e);
            }
        }
    }
    let (staged, append) = match inner.lock() {
        Ok(mut state) => stage(&mut state, batch, &unloaded),
        Err(e) => {
            for cmd in batch {
                fail_command(cmd, e.clone());
            }
            return;
        }
    };
    let result = if append.rows.is_empty() && append.rooms.is_empty() {
        Ok(())
    } else {
        let started = Instant::now();
        let rows = append.rows.len();
        // A commit the database never answers is given up like one whose answer was lost:
        // dropped (sqlx closes its connection, so it cannot commit later unseen unless
        // COMMIT was already out), answered `unavailable`, and its rooms read again below.
        let result = tokio::time::timeout(d.commit_timeout, d.store.append(append))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Query(format!(
                    "no answer within store.commit_timeout_ms ({} ms)",
                    d.commit_timeout.as_millis()
                )))
            });
        if let Some(m) = &d.metrics {
            m.store_commit_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if result
            .as_ref()
            .is_err_and(|e| !matches!(e, StoreError::Unreachable))
        {
            // The outcome is unknown: a connection lost after COMMIT went out may have
            // stored the batch all the same. The rooms it touched are read again from the
            // store at their next use, so an offset the store may hold is not given out a
            // second time (its row would stay and the new message would not be stored), and
            // a retry finds its ref. No connection at all (`Unreachable`) sent nothing.
            forget(inner, &touched);
        }
        result.map_err(|e| d.failed(&format!("committing {rows} messages"), e))
    };
    if let Err(e) = result {
        for s in staged {
            s.fail(e.clone());
        }
        return;
    }
    apply(inner, staged);
}

/// Drops rooms from memory: their next use loads them from the store (see [`load`]).
fn forget(inner: &Inner, rooms: &[RoomName]) {
    if let Ok(mut state) = inner.lock() {
        for room in rooms {
            state.rooms.remove(room);
        }
    }
}

fn fail_command(cmd: Command, error: BusError) {
    match cmd {
        Command::Publish { msgs, .. } => {
            for (_, ack) in msgs {
                let _ = ack.send(Err(error.clone()));
            }
        }
        Command::Renew { reply, .. } => {
            let _ = reply.send(Err(error));
        }
    }
}

/// Assigns offsets and epochs on top of the rooms' state, without changing it.
fn stage(
    state: &mut State,
    batch: Vec<Command>,
    unloaded: &HashMap<RoomName, BusError>,
) -> (Vec<Staged>, Append) {
    let now = Instant::now();
    let ts = now_ms();
    let mut overlays: HashMap<RoomName, Overlay> = HashMap::new();
    let mut staged = Vec::new();
    let mut rows = Vec::new();
    for cmd in batch {
        let room = match &cmd {
            Command::Publish { room, .. } | Command::Renew { room, .. } => room.clone(),
        };
        let missing = || {
            unloaded.get(&room).cloned().unwrap_or_else(|| {
                BusError::Unavailable(format!("room {room} was swept while loading; retry"))
            })
        };
        let Some(log) = state.rooms.get(&room) else {
            let error = missing();
            match cmd {
                Command::Publish { msgs, .. } => {
                    for (_, ack) in msgs {
                        staged.push(Staged::Failed {
                            error: error.clone(),
                            ack: Answer::Publish(ack),
                        });
                    }
                }
                Command::Renew { reply, .. } => staged.push(Staged::Failed {
                    error,
                    ack: Answer::Renew(reply),
                }),
            }
            continue;
        };
        let overlay = overlays.entry(room.clone()).or_insert_with(|| Overlay {
            epoch: log.epoch.clone(),
            offset: log.offset,
            base: log.base,
            refs: HashMap::new(),
            renewed: false,
        });
        match cmd {
            Command::Publish { msgs, .. } => {
                for (msg, ack) in msgs {
                    let key = msg.reference.clone().map(|r| (msg.user.clone(), r));
                    let seen = key.as_ref().and_then(|k| {
                        overlay.refs.get(k).copied().or_else(|| {
                            let remembered = log
                                .refs
                                .get(k)
                                .filter(|(_, at)| now.saturating_duration_since(*at) < REF_TTL);
                            remembered.filter(|_| !overlay.renewed).map(|(o, _)| *o)
                        })
                    });
                    if let Some(offset) = seen {
                        let published = Published {
                            epoch: overlay.epoch.clone(),
                            offset,
                            duplicate: true,
                        };
                        staged.push(Staged::Duplicate { published, ack });
                        continue;
                    }
                    overlay.offset += 1;
                    let offset = overlay.offset;
                    let json = ServerFrame::Message {
                        room: &room,
                        offset,
                        user: &msg.user,
                        name: msg.name.as_deref(),
                        text: &msg.text,
                        ts,
                    }
                    .to_text();
                    if let Some(k) = &key {
                        overlay.refs.insert(k.clone(), offset);
                    }
                    rows.push(Row {
                        room: room.clone(),
                        epoch: overlay.epoch.clone(),
                        offset,
                        ts,
                        user: msg.user.clone(),
                        reference: msg.reference.clone(),
                        frame: json.clone(),
                    });
                    staged.push(Staged::New {
                        room: room.clone(),
                        epoch: overlay.epoch.clone(),
                        offset,
                        json,
                        key,
                        ack,
                    });
                }
            }
            Command::Renew {
                stale,
                floor,
                reply,
                ..
            } => {
                let created = overlay.epoch == stale;
                if created {
                    overlay.epoch = Epoch::generate();
                    overlay.offset = overlay.offset.max(floor);
                    overlay.base = overlay.offset;
                    overlay.refs.clear();
                    overlay.renewed = true;
                }
                let renewed = Renewed {
                    head: RoomHead {
                        epoch: overlay.epoch.clone(),
                        offset: overlay.offset,
                    },
                    created,
                };
                staged.push(Staged::Renew {
                    room: room.clone(),
                    renewed,
                    base: overlay.base,
                    reply,
                });
            }
        }
    }
    // Only rooms whose head moved are written. A single writer sees what it hands out, and its
    // own clock orders its epochs in the row (docs/design.md, "The archive").
    let rooms = overlays
        .into_iter()
        .filter(|(room, o)| {
            state
                .rooms
                .get(room)
                .is_some_and(|log| log.offset != o.offset || log.epoch != o.epoch)
        })
        .map(|(room, o)| RoomState {
            room,
            epoch: o.epoch,
            offset: o.offset,
            base: o.base,
            seen: o.offset,
            seen_at_ms: ts,
        })
        .collect();
    (staged, Append { rows, rooms })
}

/// The batch is committed: applies it to the windows, delivers it in offset order under the
/// mutex, then answers.
fn apply(inner: &Inner, staged: Vec<Staged>) {
    let mut state = match inner.lock() {
        Ok(state) => state,
        Err(e) => {
            for s in staged {
                s.fail(e.clone());
            }
            return;
        }
    };
    let now = Instant::now();
    let size = state.history_size;
    let mut answers = Vec::with_capacity(staged.len());
    for s in staged {
        match s {
            Staged::New {
                room,
                epoch,
                offset,
                json,
                key,
                ack,
            } => {
                // A room swept since staging is read from the store next time; it still gets
                // its event and its ack.
                if let Some(log) = state.rooms.get_mut(&room) {
                    log.epoch = epoch.clone();
                    log.offset = offset;
                    log.append(offset, json.clone(), key, size, now);
                }
                inner.sink.deliver(RoomEvent {
                    room,
                    kind: EventKind::Message {
                        epoch: epoch.clone(),
                        offset,
                    },
                    json,
                });
                let published = Published {
                    epoch,
                    offset,
                    duplicate: false,
                };
                answers.push((Answer::Publish(ack), Ok(published)));
            }
            Staged::Duplicate { published, ack } => {
                answers.push((Answer::Publish(ack), Ok(published)));
            }
            Staged::Renew {
                room,
                renewed,
                base,
                reply,
            } => {
                if renewed.created {
                    if let Some(log) = state.rooms.get_mut(&room) {
                        log.epoch = renewed.head.epoch.clone();
                        log.offset = renewed.head.offset;
                        log.base = base;
                        log.refs.clear();
                    }
                }
                let _ = reply.send(Ok(renewed));
            }
            Staged::Failed { error, ack } => ack.fail(error),
        }
    }
    drop(state);
    for (answer, result) in answers {
        if let Answer::Publish(ack) = answer {
            let _ = ack.send(result);
        }
    }
}

/// Makes sure the room is in memory, reading it from the store if it is not.
async fn load(inner: &Inner, room: &RoomName) -> Result<(), BusError> {
    if inner.lock()?.rooms.contains_key(room) {
        return Ok(());
    }
    let Some(d) = &inner.durable else {
        return Ok(());
    };
    let head = d
        .store
        .head(room)
        .await
        .map_err(|e| d.failed(&format!("reading room {room}"), e))?;
    let refs = match &head {
        Some(h) => {
            let since = now_ms().saturating_sub(REF_TTL.as_millis() as u64);
            d.store
                .recent_refs(room, &h.epoch, since)
                .await
                .map_err(|e| d.failed(&format!("reading refs of room {room}"), e))?
        }
        None => Vec::new(),
    };
    let (now, ms) = (Instant::now(), now_ms());
    inner
        .lock()?
        .rooms
        .entry(room.clone())
        .or_insert_with(|| RoomLog::restored(head, refs, now, ms));
    Ok(())
}

/// Runs `f` on the state once the room is in memory (it is never swept while `f` runs: the
/// check and the call share one lock).
async fn with_room<T>(
    inner: &Inner,
    room: &RoomName,
    mut f: impl FnMut(&mut State) -> T,
) -> Result<T, BusError> {
    // A sweep between the load and the lock is rare; a second one in a row rarer still.
    for _ in 0..3 {
        {
            let mut state = inner.lock()?;
            if state.rooms.contains_key(room) {
                return Ok(f(&mut state));
            }
        }
        load(inner, room).await?;
    }
    Err(BusError::Unavailable(format!(
        "room {room} keeps being swept; retry"
    )))
}

pub(super) fn head(inner: Arc<Inner>, room: RoomName) -> BusFuture<RoomHead> {
    async move { with_room(&inner, &room, |s| s.log(&room, Instant::now()).head()).await }.boxed()
}

/// A read the window answers, or the store page it needs.
enum Plan<T> {
    Ready(T),
    Store {
        epoch: Epoch,
        head: RoomHead,
        page: Page,
    },
}

pub(super) fn replay(
    inner: Arc<Inner>,
    room: RoomName,
    since: Offset,
    epoch: Epoch,
    limit: usize,
) -> BusFuture<Replay> {
    async move {
        let plan = with_room(&inner, &room, |s| {
            let now = Instant::now();
            let log = s.log(&room, now);
            let from = since.max(log.base);
            // The epoch is current and `since` inside it, but the window starts later.
            if epoch == log.epoch && from <= log.offset && from + 1 < log.oldest() {
                return Plan::Store {
                    epoch: log.epoch.clone(),
                    head: log.head(),
                    page: Page::After {
                        since: from,
                        until: log.offset,
                        limit,
                    },
                };
            }
            Plan::Ready(s.replay(&room, since, &epoch, limit, now))
        })
        .await?;
        let (epoch, head, page) = match plan {
            Plan::Ready(replay) => return Ok(replay),
            Plan::Store { epoch, head, page } => (epoch, head, page),
        };
        let Page::After { since, .. } = page else {
            return Ok(Replay::NotRecovered { head });
        };
        let messages = read(&inner, &room, &epoch, page).await?;
        // Recovered only when the first missed message is still stored (retention may have
        // deleted it).
        if messages.first().map(|m| m.offset) == Some(since + 1) {
            Ok(Replay::Recovered { head, messages })
        } else {
            Ok(Replay::NotRecovered { head })
        }
    }
    .boxed()
}

pub(super) fn history(
    inner: Arc<Inner>,
    room: RoomName,
    before: Option<Offset>,
    limit: usize,
) -> BusFuture<HistoryPage> {
    async move {
        let plan = with_room(&inner, &room, |s| {
            let now = Instant::now();
            let page = s.history(&room, before, limit, now);
            let log = s.log(&room, now);
            // The window is enough when it gave a full page or holds the epoch's start.
            if page.messages.len() >= limit || log.oldest() <= log.base + 1 {
                return Plan::Ready(page);
            }
            // Nothing after the head: a commit not yet applied is not history yet.
            let below = before.unwrap_or(Offset::MAX).min(log.offset + 1);
            Plan::Store {
                epoch: log.epoch.clone(),
                head: log.head(),
                page: Page::Before {
                    before: below,
                    limit,
                },
            }
        })
        .await?;
        match plan {
            Plan::Ready(page) => Ok(page),
            Plan::Store { epoch, page, .. } => {
                let messages = read(&inner, &room, &epoch, page).await?;
                Ok(HistoryPage { epoch, messages })
            }
        }
    }
    .boxed()
}

async fn read(
    inner: &Inner,
    room: &RoomName,
    epoch: &Epoch,
    page: Page,
) -> Result<Vec<StoredMessage>, BusError> {
    let Some(d) = &inner.durable else {
        return Ok(Vec::new());
    };
    d.store
        .page(room, epoch, page)
        .await
        .map_err(|e| d.failed(&format!("reading history of room {room}"), e))
}
