//! `--check-presence`: whether each member's view of who is in its room stays consistent.
//! A member learns the room's users from its `presence` frame, then `join` and `leave` frames
//! change the set; a join of a user it already knew, or a leave of one it did not, is counted.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::conn::KINDS;

/// Counters every checked connection adds to.
#[derive(Default)]
pub struct Checks {
    pub redundant_joins: AtomicU64,
    pub unknown_leaves: AtomicU64,
    /// Join or leave frames that came before the connection's first presence frame.
    pub before_presence: AtomicU64,
}

/// One connection's view of its room.
#[derive(Default)]
pub struct Roster {
    users: Option<HashSet<String>>,
}

impl Roster {
    pub fn on_frame(&mut self, kind: usize, text: &str, checks: &Checks) {
        let kind = KINDS[kind];
        if !matches!(kind, "presence" | "join" | "leave") {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if kind == "presence" {
            let listed = v["users"].as_array().into_iter().flatten();
            self.users = Some(
                listed
                    .filter_map(|u| u.as_str().map(str::to_owned))
                    .collect(),
            );
            return;
        }
        let (Some(users), Some(user)) = (self.users.as_mut(), v["user"].as_str()) else {
            checks.before_presence.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let counter = if kind == "join" {
            (!users.insert(user.to_owned())).then_some(&checks.redundant_joins)
        } else {
            (!users.remove(user)).then_some(&checks.unknown_leaves)
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::kind_of;

    #[test]
    fn joins_of_known_users_and_leaves_of_unknown_ones_are_counted() {
        let checks = Checks::default();
        let mut r = Roster::default();
        for f in [
            r#"{"type":"join","room":"r","user":"early","ts":1}"#,
            r#"{"type":"presence","room":"r","users":["a","b"]}"#,
            r#"{"type":"join","room":"r","user":"b","ts":1}"#,
            r#"{"type":"join","room":"r","user":"c","ts":1}"#,
            r#"{"type":"leave","room":"r","user":"c","ts":1}"#,
            r#"{"type":"leave","room":"r","user":"c","ts":1}"#,
        ] {
            r.on_frame(kind_of(f), f, &checks);
        }
        assert_eq!(checks.before_presence.load(Ordering::Relaxed), 1);
        assert_eq!(checks.redundant_joins.load(Ordering::Relaxed), 1);
        assert_eq!(checks.unknown_leaves.load(Ordering::Relaxed), 1);
    }
}
