//! The composition root: opens the store, builds the bus, the hub and its room threads, and
//! the HTTP server, then runs until a signal has drained the replica. [`run`] is those three
//! steps: `build_state`, `build_server`, `serve_until_drained`.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::HttpService;
use actix_service::{apply_fn_factory, map_config, IntoServiceFactory, Service, ServiceFactoryExt};
use actix_web::dev::{fn_service, AppConfig, Server};
use actix_web::{web, App};
use tokio::sync::oneshot;

use crate::actors::hub::{Drain, Hub, RoomDirectory, SessionCount};
use crate::actors::member::QueueLimits;
use crate::actors::room::RoomSettings;
use crate::actors::session::SessionConfig;
use crate::auth::Verifier;
use crate::bus::bridge::RedisBridge;
use crate::bus::memory::MemoryBus;
use crate::bus::metered::MeteredBus;
use crate::bus::redis::{NodeIdTaken, RedisBus};
use crate::bus::{EventSink, SharedBus};
use crate::http::admission::{self, Admission};
use crate::http::{self, upgrade, AppState};
use crate::logctx;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::store::{self, SharedStore, StoreKind};

/// File descriptors kept back for listeners, logs, Redis and the runtime, never used by
/// client sockets.
const FD_RESERVE: usize = 64;
/// Most sockets kept above the session cap for plain HTTP and unfinished handshakes.
const MAX_HEADROOM: usize = 256;
/// Connections the kernel may queue before they are accepted (actix-web's default).
const BACKLOG: i32 = 1024;

/// Runs one replica until SIGTERM or SIGINT has drained it.
pub async fn run(settings: Settings) -> io::Result<()> {
    let replica = build_state(&settings).await?;
    let server = build_server(&settings, &replica)?;
    let grace = settings.server.shutdown_grace_secs;
    serve_until_drained(server, replica, grace).await
}

/// A replica's parts, built before the server that serves them and torn down after it.
struct Replica {
    node: Arc<str>,
    /// Threads the room actors run on; stopped once the server has stopped.
    arbiters: Vec<Arbiter>,
    /// What every request handler shares (the hub, the bus, the caps, the drain flag).
    state: web::Data<AppState>,
    redis: Option<RedisSide>,
    /// HTTP worker threads.
    workers: usize,
    caps: Caps,
    /// The open-file limit, as raised.
    files: usize,
}

/// Opens the store, starts the bus, the hub and its room threads, plans the caps from the
/// open-file limit and builds the handlers' shared state.
async fn build_state(settings: &Settings) -> io::Result<Replica> {
    let node: Arc<str> = Arc::from(node_id(settings));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let room_threads = match settings.server.room_threads {
        0 => cores,
        n => n,
    };
    let arbiters: Vec<Arbiter> = (0..room_threads).map(|_| Arbiter::new()).collect();
    let directory = RoomDirectory::default();
    let metrics = Arc::new(Metrics::new().map_err(io::Error::other)?);
    let store = open_store(settings, &metrics).await?;
    let (bus, redis) = start_bus(settings, &node, &directory, &metrics, store)?;
    let bus = MeteredBus::wrap(bus, Arc::clone(&metrics));
    if settings.api.key.is_empty() {
        log::info!("api.key is empty: the HTTP API answers 403");
    }
    let hub = Hub::new(
        bus.clone(),
        directory,
        arbiters.iter().map(Arbiter::handle).collect(),
        QueueLimits::from(settings),
        RoomSettings::from(settings),
        Arc::clone(&metrics),
    )
    .start();

    let workers = match settings.server.workers {
        0 => cores,
        n => n,
    };
    let files = raise_open_file_limit();
    let caps = Caps::plan(
        files,
        settings.limits.max_connections,
        workers + room_threads,
    );
    let state = app_state(settings, &node, hub, bus, caps.sessions, metrics)?;
    Ok(Replica {
        node,
        arbiters,
        state,
        redis,
        workers,
        caps,
        files,
    })
}

/// What every request handler shares: the hub and the bus, the sessions' config, the caps
/// (`sessions` as planned from the open-file limit), the auth and origin policies. Logs the
/// policies that leave the replica open.
fn app_state(
    settings: &Settings,
    node: &Arc<str>,
    hub: Addr<Hub>,
    bus: SharedBus,
    sessions: usize,
    metrics: Arc<Metrics>,
) -> io::Result<web::Data<AppState>> {
    if settings.server.allowed_origins.is_empty() {
        log::warn!("server.allowed_origins is empty: pages from any site may open sessions here");
    }
    let verifier = Verifier::from_settings(&settings.auth).map_err(io::Error::other)?;
    match &verifier {
        Some(v) => log::info!(
            "auth: sessions need a token ({})",
            v.algorithms().join(", ")
        ),
        None => log::warn!(
            "auth: no auth.jwt_secret or auth.jwt_public_key_file set: ANONYMOUS mode, anyone who \
             reaches this port may join any room under any name"
        ),
    }
    // Validated at load, so every entry parses.
    let trusted_proxies = settings
        .server
        .trusted_proxies
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    Ok(web::Data::new(AppState {
        hub,
        bus,
        sessions: Arc::new(SessionConfig::new(
            settings,
            node.clone(),
            Arc::clone(&metrics),
        )),
        draining: Arc::new(AtomicBool::new(false)),
        admission: Arc::new(Admission::new(admission::Limits {
            sessions,
            ..admission::Limits::from(settings)
        })),
        trusted_proxies,
        verifier,
        allowed_origins: settings.server.allowed_origins.clone(),
        echo_endpoint: settings.websocket.echo_endpoint,
        api_key: settings.api.key.clone(),
        key_guesses: http::guesses::KeyGuesses::new(
            settings.api.max_key_failures,
            settings.api.key_failure_window_secs,
        ),
        metrics,
    }))
}

/// Binds `server.listen` and builds the HTTP server over the replica's state; it runs once
/// awaited.
fn build_server(settings: &Settings, replica: &Replica) -> io::Result<Server> {
    let Replica {
        node,
        state,
        workers,
        caps,
        files,
        ..
    } = replica;
    let handshake_timeout = settings.server.handshake_timeout_secs;
    let listeners = bind(&settings.server.listen)?;
    // actix-web's HttpServer, built from its parts so that upgrades go to `upgrade::serve`,
    // which takes WebSockets off the HTTP/1 dispatcher and its buffers.
    let builder = Server::build();
    let shutdown = builder.graceful_shutdown_signal();
    let mut builder = builder
        // Signals are ours: a drain closes sessions in batches before the server stops.
        .disable_signals()
        // Sessions plus handshakes in progress stay under the open-file limit with the
        // reserve to spare, so /healthz, Redis reconnects and logs never hit EMFILE. Sessions
        // count: their upgrade's future lives as long as they do.
        .max_concurrent_connections(caps.sockets.div_ceil(*workers))
        .shutdown_timeout(5)
        .workers(*workers);
    for listener in listeners {
        let addr = listener.local_addr()?;
        log::info!(
            "{} listening on {addr} (max_connections={}, open files {files})",
            logctx::node(&node),
            caps.sessions
        );
        let state = state.clone();
        let shutdown = shutdown.clone();
        builder = builder.listen(format!("confab-{addr}"), listener, move || {
            let app_state = state.clone();
            let ws_state = state.clone();
            let accept_state = state.clone();
            let shutdown = shutdown.clone();
            let app = App::new()
                .app_data(app_state)
                .configure(http::routes)
                .into_factory()
                .map_err(|e: actix_web::Error| e.error_response());
            let http = HttpService::build()
                .graceful_shutdown_signal(move || {
                    let signal = shutdown.clone();
                    async move { signal.notified().await }
                })
                // A connection that never finishes its request head is cut; until then it
                // holds a descriptor but no session slot.
                .client_request_timeout(handshake_timeout)
                // Close the connection as soon as a response asked it closed, instead of
                // lingering for the client to hang up.
                .client_disconnect_timeout(Duration::ZERO)
                .local_addr(addr)
                .upgrade(fn_service(move |(req, framed)| {
                    upgrade::serve(req, framed, ws_state.clone())
                }));
            // Each connection is counted per address from its accept (`upgrade::accept`,
            // which also sets TCP_NODELAY), before the HTTP service reads its head. The
            // dispatcher runs boxed, so its memory goes once it is done (an upgrade hands
            // the socket to a session); the connection's future then waits, small, until the
            // session ends, so the server still counts it (see `upgrade`'s module doc).
            let http = http.finish(map_config(app, |_| AppConfig::default()));
            apply_fn_factory(http, move |io, http| {
                let accepted = upgrade::accept(io, &accept_state)
                    .map(|(conn, done)| (Box::pin(http.call(conn)), done));
                async move {
                    let (dispatch, done) = accepted?;
                    dispatch.await?;
                    let _ = done.await;
                    Ok(())
                }
            })
        })?;
    }
    Ok(builder.run())
}

/// Runs the server until a signal has drained it (sessions closed over `grace`, then the
/// server stopped) or another process turned out to hold the node id; then frees the node id
/// and stops the room threads.
async fn serve_until_drained(server: Server, replica: Replica, grace: Duration) -> io::Result<()> {
    let Replica {
        node,
        arbiters,
        state,
        redis,
        ..
    } = replica;
    let handle = server.handle();
    let hub = state.hub.clone();
    let draining = Arc::clone(&state.draining);
    actix_web::rt::spawn(async move {
        wait_for_signal().await;
        log::info!(
            "{} draining: not ready, closing sessions over {grace:?}",
            logctx::node(&node)
        );
        draining.store(true, Ordering::Release);
        hub.do_send(Drain { grace });
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if hub.send(SessionCount).await.unwrap_or(0) == 0 {
                break;
            }
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
        handle.stop(true).await;
    });
    let (redis_bus, refused) = match redis {
        Some(side) => (Some(side.bus), Some(side.refused)),
        None => (None, None),
    };
    let refused = async move {
        match refused {
            Some(refused) => match refused.await {
                Ok(e) => e,
                // The bridge holds the node id: no refusal will come.
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        served = server => served?,
        e = refused => return Err(io::Error::other(e)),
    }
    if let Some(bus) = redis_bus {
        // Gives up the presence lease (this replica's members leave at once) and frees the
        // node id, so a restart under it does not wait out the lease; meanwhile the archiver
        // stops and gives up its rooms' leases, so another replica archives them now (each
        // bounded by Redis's command timeout).
        let node_id = tokio::time::timeout(Duration::from_secs(5), bus.release_node_id());
        let _ = tokio::join!(node_id, bus.stop_archiver());
    }
    for arbiter in arbiters {
        arbiter.stop();
    }
    log::info!("stopped");
    Ok(())
}

/// What start-up keeps of the Redis bus: the bus, to free the node id at exit, and the word
/// from the bridge if another process holds the node id.
struct RedisSide {
    bus: Arc<RedisBus>,
    refused: oneshot::Receiver<NodeIdTaken>,
}

/// Opens the store `store.url` names (migrating its schema) and starts its retention sweep;
/// `None` for `memory` and for Redis alone.
async fn open_store(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> io::Result<Option<SharedStore>> {
    let kind = settings.store_kind();
    let store = store::open(&kind, &settings.store)
        .await
        .map_err(io::Error::other)?;
    match &kind {
        StoreKind::None => log::info!("store: none; history lives in Redis only"),
        StoreKind::Memory => {
            log::warn!("store.url = memory: history lives in this process only and is lost at exit")
        }
        StoreKind::Sqlite(url) | StoreKind::Postgres(url) => {
            log::info!(
                "store: {} (schema migrated)",
                crate::settings::mask_url(url)
            );
        }
    }
    if let (Some(store), days) = (&store, settings.store.retention_days) {
        if days > 0 {
            let every = settings.store.retention_sweep_secs;
            actix_web::rt::spawn(store::retention(
                Arc::clone(store),
                days,
                every,
                Arc::clone(metrics),
            ));
        }
    }
    Ok(store)
}

/// `confab migrate`: brings the store's schema up to this binary's; what it did, or why not.
pub async fn migrate(settings: &Settings) -> Result<String, store::StoreError> {
    let kind = settings.store_kind();
    match store::open(&kind, &settings.store).await? {
        Some(_) => Ok(match &kind {
            StoreKind::Sqlite(url) | StoreKind::Postgres(url) => {
                format!("migrated {}", crate::settings::mask_url(url))
            }
            _ => String::new(),
        }),
        None => Ok("store.url names no database: nothing to migrate".into()),
    }
}

/// The embedded bus when `redis.url` is empty; else the Redis bus and its bridge actor.
fn start_bus(
    settings: &Settings,
    node: &Arc<str>,
    directory: &RoomDirectory,
    metrics: &Arc<Metrics>,
    store: Option<SharedStore>,
) -> io::Result<(SharedBus, Option<RedisSide>)> {
    let sink: Arc<dyn EventSink> = Arc::new(directory.clone());
    if settings.redis.url.is_empty() {
        log::warn!(
            "{} uses the embedded bus: replicas started this way will not see each other",
            logctx::node(&node)
        );
        let empty_ttl = settings.history.empty_room_ttl_secs;
        let (size, ttl) = (settings.history.size, settings.history.ttl_secs);
        let bus = match store {
            Some(store) => MemoryBus::with_store(
                size,
                ttl,
                sink,
                store,
                Some(Arc::clone(metrics)),
                settings.store.commit_timeout_ms,
            ),
            None => MemoryBus::new(size, ttl, sink),
        };
        let bus = Arc::new(bus.with_empty_room_ttl(empty_ttl));
        let sweeper = Arc::downgrade(&bus);
        // A room is gone at most a quarter of its life after it expired.
        let every = (empty_ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
        actix_web::rt::spawn(async move {
            let mut tick = actix_web::rt::time::interval(every);
            loop {
                tick.tick().await;
                match sweeper.upgrade() {
                    Some(bus) => bus.sweep(),
                    None => break,
                }
            }
        });
        return Ok((bus, None));
    }
    // With `store.url = postgres://…`, the store is the archive behind Redis.
    let archive = store
        .map(|store| crate::bus::redis::Archive::new(store, settings, node, Arc::clone(metrics)));
    let archiving = archive.is_some();
    let (bus, subscriber) =
        RedisBus::new(settings, Arc::clone(node), archive).map_err(io::Error::other)?;
    if archiving {
        actix_web::rt::spawn(crate::bus::redis::run_archiver(Arc::clone(&bus)));
        log::info!(
            "{} archives every room's messages into the store (docs/design.md, \"The archive\")",
            logctx::node(&node)
        );
    }
    let (refused_tx, refused) = oneshot::channel();
    RedisBridge::new(
        Arc::clone(&bus),
        subscriber,
        sink,
        refused_tx,
        Arc::clone(metrics),
    )
    .start();
    log::info!(
        "{} uses Redis at {} with prefix `{}`",
        logctx::node(&node),
        crate::settings::mask_url(&settings.redis.url),
        settings.redis.prefix
    );
    let side = RedisSide {
        bus: Arc::clone(&bus),
        refused,
    };
    Ok((Arc::new(bus), Some(side)))
}

/// Listeners on every address `listen` resolves to, like actix-web's `HttpServer::bind`.
fn bind(listen: &str) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    let mut failure = None;
    for addr in listen.to_socket_addrs()? {
        match listener(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => failure = Some(e),
        }
    }
    match failure {
        Some(e) if listeners.is_empty() => Err(e),
        _ if listeners.is_empty() => Err(io::Error::other(format!("`{listen}` names no address"))),
        _ => Ok(listeners),
    }
}

fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            log::error!("cannot listen for signals; draining on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `server.node_id`, or the host name (the pod name in Kubernetes).
fn node_id(settings: &Settings) -> String {
    if !settings.server.node_id.is_empty() {
        return settings.server.node_id.clone();
    }
    let name = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.is_empty() {
        "confab".to_owned()
    } else {
        name
    }
}

/// How the open-file limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Caps {
    /// Sessions (upgraded WebSockets): `limits.max_connections`.
    sessions: usize,
    /// Accepted sockets of every kind: sessions, handshakes in progress, plain HTTP.
    sockets: usize,
}

impl Caps {
    /// `files` open-file limit; `configured` is `limits.max_connections` (0 = derive it);
    /// `threads` runtime threads, each holding a few descriptors of its own.
    fn plan(files: usize, configured: usize, threads: usize) -> Self {
        let reserve = FD_RESERVE + 4 * threads;
        let sockets = files.saturating_sub(reserve).max(16);
        // Room above the session cap for requests that are not sessions: probes, the API,
        // handshakes that have not finished.
        let headroom = (files / 16).clamp(16, MAX_HEADROOM);
        let derived = sockets.saturating_sub(headroom).max(8);
        let sessions = match configured {
            0 => derived,
            n => n,
        };
        Self {
            sessions,
            sockets: sessions.saturating_add(headroom).min(sockets),
        }
    }
}

/// Raises the open-file soft limit to the hard limit and returns it, at start-up (`confab-bench`
/// carries the same few lines, so the tool does not build the server).
pub fn raise_open_file_limit() -> usize {
    // Raised as far as the hard limit goes (and, where the kernel has one, its per-process
    // maximum); if that is refused, the soft limit as it is, and 1024 if it cannot be read.
    let files = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::Resource::NOFILE.get().map(|(soft, _)| soft));
    files.map_or(1024, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_cap_leaves_a_reserve_and_headroom() {
        let c = Caps::plan(20_000, 0, 4);
        assert_eq!(c.sockets, 20_000 - FD_RESERVE - 16);
        assert_eq!(c.sessions, c.sockets - MAX_HEADROOM);
        assert!(c.sessions >= 19_000, "19,000 sessions fit in 20,000 files");
        let small = Caps::plan(1024, 0, 4);
        assert!(small.sessions + 64 <= small.sockets && small.sockets < 1024);
    }

    #[test]
    fn each_runtime_config_reads_its_own_settings_keys() {
        // Every value distinct, so a field read from the wrong key shows.
        let mut s = Settings::default();
        let l = &mut s.limits;
        (
            l.max_frame_bytes,
            l.max_message_chars,
            l.messages_per_sec,
            l.burst,
        ) = (2001, 2002, 3, 4);
        (l.max_violations, l.session_queue, l.session_queue_bytes) = (5, 2006, 70_007);
        (
            l.max_connections,
            l.max_connections_per_ip,
            l.upgrades_per_ip_per_sec,
        ) = (8, 9, 10);
        (l.handshakes_per_ip, l.rooms_per_ip) = (11, 12);
        (l.messages_per_sec_per_ip, l.messages_per_sec_per_user) = (13, 14);
        (l.resume_max_messages, l.join_events_max_members) = (15, 16);
        s.redis.join_retry_ms = Duration::from_millis(17);
        (
            s.websocket.ping_interval_secs,
            s.websocket.client_timeout_secs,
        ) = (Duration::from_secs(18), Duration::from_secs(19));

        let q = QueueLimits::from(&s);
        assert_eq!((q.frames, q.bytes), (2006, 70_007));
        let r = RoomSettings::from(&s);
        assert_eq!((r.announce_max, r.resume_max), (16, 15));
        assert_eq!(r.retry_within, Duration::from_millis(17));
        let a = admission::Limits::from(&s);
        assert_eq!(
            (
                a.sessions,
                a.sessions_per_ip,
                a.upgrades_per_sec,
                a.pending_per_ip
            ),
            (8, 9, 10, 11)
        );
        assert_eq!(
            (a.rooms_per_ip, a.messages_per_ip, a.messages_per_user),
            (12, 13, 14)
        );
        let metrics = Arc::new(Metrics::new().unwrap());
        let c = SessionConfig::new(&s, Arc::from("n1"), metrics);
        assert_eq!(&*c.node, "n1");
        assert_eq!(
            (
                c.max_frame_bytes,
                c.max_message_chars,
                c.messages_per_sec,
                c.burst
            ),
            (2001, 2002, 3, 4)
        );
        assert_eq!(
            (c.max_violations, c.session_queue, c.session_queue_bytes),
            (5, 2006, 70_007)
        );
        assert_eq!(
            (c.ping_interval, c.client_timeout),
            (Duration::from_secs(18), Duration::from_secs(19))
        );
    }

    #[test]
    fn a_configured_cap_is_kept_and_sockets_stay_under_the_file_limit() {
        let c = Caps::plan(1024, 100, 4);
        assert_eq!(c.sessions, 100);
        assert!(c.sockets < 1024 - FD_RESERVE);
        let over = Caps::plan(1024, 5000, 4);
        assert_eq!(over.sessions, 5000);
        assert!(over.sockets <= 1024 - FD_RESERVE, "{over:?}");
    }
}
