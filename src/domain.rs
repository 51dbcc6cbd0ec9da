//! Validated domain types shared by every layer. Nothing here knows about actix or Redis, so the
//! rules (what a room or user name may be) live in one place and are unit-tested without sockets.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// Why a name taken from a client was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must be 1 to {max} characters")]
    Length { max: usize },
    #[error("must start with a letter or digit and use only letters, digits, '_', '.', '-'")]
    Charset,
}

/// Checks `^[A-Za-z0-9][A-Za-z0-9_.-]{0,max-1}$` without pulling in a regex engine.
fn check_name(s: &str, max: usize) -> Result<(), NameError> {
    if s.is_empty() || s.len() > max {
        return Err(NameError::Length { max });
    }
    let mut bytes = s.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(NameError::Charset)
    }
}

/// A room name as clients write it in `/ws/{room}`. Cheap to clone: rooms are named in every
/// event that crosses the bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RoomName(Arc<str>);

impl RoomName {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, NameError> {
        check_name(s, Self::MAX_LEN)?;
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by room be searched with a `&str` taken from a channel name, with no
/// allocation (hash and equality are those of the string, as `Borrow` requires).
impl std::borrow::Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user id: the anonymous display name, or later the token's subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(Arc<str>);

impl UserId {
    pub const MAX_LEN: usize = 32;

    pub fn parse(s: &str) -> Result<Self, NameError> {
        check_name(s, Self::MAX_LEN)?;
        Ok(Self(Arc::from(s)))
    }

    /// A fresh `guest-` name for clients that gave none: 64 random bits, so even millions of
    /// guests are very unlikely to share one (24 bits collided among a few thousand).
    pub fn guest() -> Self {
        let n: u64 = rand::random();
        Self(Arc::from(format!("guest-{n:016x}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Position of a message in its room's history: 1 for the first message of an epoch, +1 each.
pub type Offset = u64;

/// The largest offset a client may name (`since`, `before`): 2^53 - 1, the largest integer
/// that JavaScript clients and Redis's Lua numbers hold exactly.
pub const MAX_OFFSET: Offset = (1 << 53) - 1;

/// Names one life of a room's history. When history is lost or expires the room gets a new
/// epoch and offsets restart at 1, so a saved `(epoch, offset)` pair can never point into the
/// wrong history.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// A new random epoch: 16 hex digits, unique enough across replicas and restarts.
    pub fn generate() -> Self {
        let n: u64 = rand::random();
        Self(Arc::from(format!("{n:016x}")))
    }

    pub fn from_string(s: &str) -> Self {
        Self(Arc::from(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A session id, unique per replica process; shown to clients prefixed by the node id.
pub type SessionId = u64;

/// Milliseconds since the Unix epoch, the `ts` of every event.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_follow_the_published_pattern() {
        for ok in ["a", "lobby", "team-1", "A.b_c-d", "9", &"x".repeat(64)] {
            assert!(RoomName::parse(ok).is_ok(), "{ok} should be accepted");
        }
        for bad in [
            "",
            "-a",
            "_a",
            ".a",
            "a b",
            "a/b",
            "é",
            &"x".repeat(65),
            "a%20",
        ] {
            assert!(RoomName::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn rooms_are_found_by_plain_str() {
        let mut map = std::collections::HashMap::new();
        map.insert(RoomName::parse("lobby").unwrap(), 1);
        assert_eq!(map.get("lobby"), Some(&1));
        assert_eq!(map.get("other"), None);
    }

    #[test]
    fn user_ids_are_at_most_32_characters() {
        assert!(UserId::parse(&"u".repeat(32)).is_ok());
        assert_eq!(
            UserId::parse(&"u".repeat(33)),
            Err(NameError::Length { max: 32 })
        );
    }

    #[test]
    fn guest_ids_are_valid_user_ids() {
        let g = UserId::guest();
        assert!(g.as_str().starts_with("guest-"));
        assert!(UserId::parse(g.as_str()).is_ok());
    }

    #[test]
    fn epochs_differ_between_generations() {
        assert_ne!(Epoch::generate(), Epoch::generate());
    }
}
