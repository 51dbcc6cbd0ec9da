//! Integration tests: the real binary, real sockets, one harness.

mod harness;

mod admission;
mod api;
mod auth;
mod bench;
mod browser;
mod chat;
mod cluster;
mod frames;
mod integrity;
mod lifecycle;
mod limits;
mod presence;
mod resume;
