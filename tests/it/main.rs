//! Integration tests: the real binary, real sockets, one harness.

mod harness;

mod admission;
mod api;
mod archive;
mod auth;
mod bench;
mod browser;
mod browser_auth;
mod browser_reconnect;
mod browser_rooms;
mod chat;
mod cluster;
mod deploy;
mod failover;
mod fleet;
mod frames;
mod hardening;
mod hardening_seq;
mod integrity;
mod lifecycle;
mod limits;
mod presence;
mod redis_cluster;
mod resume;
mod rolling;
mod store;
mod storm;
mod subscribe;
mod webdriver;
