//! confab: a self-hosted real-time chat backend.
//!
//! Web clients open a WebSocket on `/ws/{room}`. Each connection is a
//! [`Session`](actors::session::Session) actor; each active room on a replica is a
//! [`Room`](actors::room::Room) actor holding its local members; the
//! [`Hub`](actors::hub::Hub) creates rooms on demand over several threads and reaps them.
//!
//! Message flow: session → [`Bus::publish`](bus::Bus::publish) (offset assigned, stored,
//! published) → the bus delivers the event to the room actor of every replica → the room
//! pushes the once-serialized frame to its sessions. Local members get their messages the same
//! way remote ones do, so every replica delivers a room in one order.
//!
//! Modules:
//! - [`settings`]: layered settings and their validation.
//! - [`auth`]: JWT validation, room and publish globs; [`net`]: client addresses behind
//!   proxies.
//! - [`startup`]: composition root; [`cli`]: the command line.
//! - [`protocol`]: the JSON frames; [`domain`]: validated names, offsets, epochs.
//! - [`wsframe`]: RFC 6455 message assembly on top of actix-http's codec; [`close`]: every
//!   close code and reason the server sends, in one enum.
//! - [`ratelimit`]: the per-session token bucket.
//! - [`actors`]: session, room, hub (and the conformance echo).
//! - [`bus`]: the bus contract and the embedded bus.
//! - [`store`]: history that outlives the bus (SQLite, PostgreSQL) behind one trait.
//! - [`metrics`]: the Prometheus registry of a replica; [`logctx`]: the `node=`/`room=`/
//!   `session=` prefix of log lines.
//! - [`http`] holds the routes: WebSocket upgrade, health, `/metrics`, the HTTP API.

pub mod actors;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod close;
pub mod domain;
pub mod http;
pub mod logctx;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod ratelimit;
pub mod settings;
pub mod startup;
pub mod store;
pub mod trim;
pub mod wsframe;
