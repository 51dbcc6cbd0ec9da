//! What a log line is about: the one way to put `node=`, `room=`, `session=` and `user=` in
//! front of a line.
//!
//! Every log call about a replica, a room or a session starts its text with an [`About`]:
//! `log::info!("{} connected", logctx::session(&label).room(&room).user(&user))` renders
//! `session=… room=… user=… connected`. The keys come in the order the call names them, so a
//! line reads from what it is mainly about; operators and tests grep these prefixes
//! (`user=stuck disconnected`, `closed with 4008`). It borrows what it shows and allocates
//! nothing: a line filtered out by `RUST_LOG` costs nothing to describe.

use std::fmt::{self, Display};

use crate::domain::SessionId;

/// The most keys a line names: node, room, session, user.
const KEYS: usize = 4;

#[derive(Clone, Copy)]
enum Value<'a> {
    Shown(&'a dyn Display),
    /// A room's session ids are shown in hex, as the session's own label shows them.
    Hex(SessionId),
}

/// The `key=value` prefix of a log line, rendered by `Display` with one space between keys.
#[derive(Clone, Copy)]
pub struct About<'a> {
    keys: [(&'static str, Value<'a>); KEYS],
    len: usize,
}

impl<'a> About<'a> {
    fn with(mut self, key: &'static str, value: Value<'a>) -> Self {
        // Each key has one method and a line names each once, so four always fit.
        debug_assert!(self.len < KEYS, "a log line names {key} twice");
        if let Some(slot) = self.keys.get_mut(self.len) {
            *slot = (key, value);
            self.len += 1;
        }
        self
    }

    /// Adds `room=`.
    pub fn room(self, room: &'a dyn Display) -> Self {
        self.with("room", Value::Shown(room))
    }

    /// Adds `session=`: the session's label.
    pub fn session(self, label: &'a dyn Display) -> Self {
        self.with("session", Value::Shown(label))
    }

    /// Adds `session=`: a session id, in hex.
    pub fn session_id(self, id: SessionId) -> Self {
        self.with("session", Value::Hex(id))
    }

    /// Adds `user=`.
    pub fn user(self, user: &'a dyn Display) -> Self {
        self.with("user", Value::Shown(user))
    }
}

fn start<'a>(key: &'static str, value: Value<'a>) -> About<'a> {
    About {
        keys: [("", Value::Hex(0)); KEYS],
        len: 0,
    }
    .with(key, value)
}

/// A line about a replica: `node=…`.
pub fn node(node: &dyn Display) -> About<'_> {
    start("node", Value::Shown(node))
}

/// A line about a room: `room=…`.
pub fn room(room: &dyn Display) -> About<'_> {
    start("room", Value::Shown(room))
}

/// A line about a session, by its label: `session=…`.
pub fn session(label: &dyn Display) -> About<'_> {
    start("session", Value::Shown(label))
}

impl Display for About<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.keys[..self.len].iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match value {
                Value::Shown(v) => write!(f, "{key}={v}")?,
                Value::Hex(id) => write!(f, "{key}={id:x}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_line_names_session_room_and_user_in_that_order() {
        let about = session(&"a-00000000000000ff").room(&"lobby").user(&"stuck");
        assert_eq!(
            format!("{about} disconnected"),
            "session=a-00000000000000ff room=lobby user=stuck disconnected"
        );
    }

    #[test]
    fn a_room_line_shows_a_session_id_in_hex() {
        let about = room(&"lobby").session_id(0x2a).user(&"ann");
        assert_eq!(
            format!("{about} closed with 4008"),
            "room=lobby session=2a user=ann closed with 4008"
        );
    }

    #[test]
    fn a_line_names_only_the_keys_it_was_given() {
        assert_eq!(node(&"a").to_string(), "node=a");
        assert_eq!(node(&"a").room(&"r").to_string(), "node=a room=r");
        assert_eq!(room(&"r").to_string(), "room=r");
    }
}
