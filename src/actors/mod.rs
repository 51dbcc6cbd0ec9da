//! The actors of one replica: a `Session` per WebSocket, a `Room` per active room, and the
//! `Hub` that finds, places and reaps rooms.

pub mod echo;
pub mod hub;
pub mod member;
pub mod outlet;
pub mod room;
pub mod sequencer;
pub mod session;
pub mod socket;
