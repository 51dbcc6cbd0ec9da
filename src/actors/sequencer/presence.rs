//! What one member holds of the room's presence, so `join`/`leave` frames keep its set right
//! (docs/PROTOCOL.md §12, "Presence as a set").
//!
//! A member is given a snapshot of the room's presence read at some version (after its
//! welcome, on a refresh); every `join`/`leave` event carries the version its change
//! produced, one more than the one before (`bus::PresenceVersion`). So the member is told an
//! event only when it is the next change after the set it holds: older ones are already in
//! its snapshot (a user who joined while the member's own join was being set up is listed,
//! and not announced again), and after a jump it has missed a change and is told nothing
//! more until it is given a fresh snapshot. A `join` is never for a user in its set, nor a
//! `leave` for one not in it: the bus publishes a join only for a user it did not count, and
//! a leave only for one it did, and a snapshot lists what the bus counts except the users
//! held only by replicas whose lease ran out, whose `leave` the member is then not told.

use crate::bus::{EventKind, PresenceSnapshot, PresenceVersion};
use crate::domain::UserId;

/// Where one member's presence set stands.
#[derive(Debug, Default)]
pub(super) struct Cursor {
    /// The version of the set the member holds; `None` when it holds none that events can be
    /// applied to (not given one yet, or it missed a change).
    version: Option<PresenceVersion>,
    /// Users the member's snapshot left out though the bus still counts them; usually none,
    /// so boxed: every member of every room carries the field.
    hidden: Option<Box<[UserId]>>,
}

/// What to do with a `join`/`leave` event for one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The next change after the member's set: tell it.
    Tell,
    /// Already in its set, not about its set, or it holds no set: nothing to send.
    Skip,
    /// The member missed a change: its set is stale until it gets a fresh snapshot.
    Missed,
}

impl Cursor {
    /// The member was sent `snapshot`.
    pub(super) fn given(&mut self, snapshot: &PresenceSnapshot) {
        self.version = Some(snapshot.version);
        self.hidden = (!snapshot.hidden.is_empty()).then(|| snapshot.hidden.clone().into());
    }

    /// The member's set is now unknown (a snapshot for it was dropped).
    pub(super) fn lost(&mut self) {
        self.version = None;
        self.hidden = None;
    }

    /// Whether a snapshot at `version` would tell the member something it does not hold.
    pub(super) fn behind(&self, version: PresenceVersion) -> bool {
        self.version.map_or(true, |have| have < version)
    }

    /// Applies a presence event to the member's set; other events are [`Verdict::Tell`].
    pub(super) fn admit(&mut self, kind: &EventKind) -> Verdict {
        let (user, version, leave) = match kind {
            EventKind::Join { user, version } => (user, *version, false),
            EventKind::Leave { user, version } => (user, *version, true),
            _ => return Verdict::Tell,
        };
        if version == 0 {
            // Published by a replica that keeps no versions (a rolling upgrade from before
            // them): where it falls is unknown, so the member waits for a fresh list.
            self.lost();
            return Verdict::Missed;
        }
        let Some(have) = self.version else {
            return Verdict::Skip;
        };
        if version <= have {
            return Verdict::Skip;
        }
        if version > have + 1 {
            self.lost();
            return Verdict::Missed;
        }
        self.version = Some(version);
        let at = self
            .hidden
            .as_ref()
            .and_then(|h| h.iter().position(|u| u == user));
        if let Some(i) = at {
            if let Some(list) = self.hidden.take() {
                let mut list = list.into_vec();
                list.swap_remove(i);
                self.hidden = (!list.is_empty()).then(|| list.into_boxed_slice());
            }
            // Left out of the member's set: its leave is not news to the member. (A join
            // cannot come for a user still counted.)
            return if leave { Verdict::Skip } else { Verdict::Tell };
        }
        Verdict::Tell
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(u: &str) -> UserId {
        UserId::parse(u).unwrap()
    }

    fn join(u: &str, version: PresenceVersion) -> EventKind {
        EventKind::Join {
            user: user(u),
            version,
        }
    }

    fn leave(u: &str, version: PresenceVersion) -> EventKind {
        EventKind::Leave {
            user: user(u),
            version,
        }
    }

    fn given(version: PresenceVersion, hidden: &[&str]) -> Cursor {
        let mut cursor = Cursor::default();
        cursor.given(&PresenceSnapshot {
            users: Vec::new(),
            version,
            hidden: hidden.iter().map(|u| user(u)).collect(),
        });
        cursor
    }

    #[test]
    fn changes_already_in_the_snapshot_are_not_told_again() {
        let mut cursor = given(7, &[]);
        assert_eq!(cursor.admit(&join("ann", 6)), Verdict::Skip);
        assert_eq!(cursor.admit(&join("bob", 7)), Verdict::Skip);
        assert_eq!(cursor.admit(&join("cid", 8)), Verdict::Tell);
        assert_eq!(cursor.admit(&leave("cid", 9)), Verdict::Tell);
        assert_eq!(
            cursor.admit(&leave("cid", 9)),
            Verdict::Skip,
            "a repeat is skipped"
        );
    }

    #[test]
    fn a_member_that_missed_a_change_is_told_nothing_until_given_a_fresh_snapshot() {
        let mut cursor = given(3, &[]);
        assert_eq!(cursor.admit(&join("ann", 5)), Verdict::Missed);
        assert_eq!(cursor.admit(&join("bob", 6)), Verdict::Skip);
        assert!(cursor.behind(6));
        cursor.given(&PresenceSnapshot {
            version: 6,
            ..PresenceSnapshot::default()
        });
        assert!(!cursor.behind(6));
        assert_eq!(cursor.admit(&leave("bob", 7)), Verdict::Tell);
    }

    #[test]
    fn an_unversioned_change_from_an_older_replica_waits_for_a_fresh_list() {
        let mut cursor = given(4, &[]);
        assert_eq!(cursor.admit(&join("ann", 0)), Verdict::Missed);
        assert!(cursor.behind(4), "the same version's list is sent again");
    }

    #[test]
    fn a_member_given_no_snapshot_is_told_nothing() {
        let mut cursor = Cursor::default();
        assert_eq!(cursor.admit(&join("ann", 1)), Verdict::Skip);
        assert!(cursor.behind(0));
    }

    #[test]
    fn the_leave_of_a_user_left_out_of_the_snapshot_is_not_told() {
        let mut cursor = given(10, &["ghost"]);
        assert_eq!(cursor.admit(&leave("ghost", 11)), Verdict::Skip);
        assert_eq!(
            cursor.admit(&join("ghost", 12)),
            Verdict::Tell,
            "back, it is news"
        );
        assert_eq!(cursor.admit(&leave("ghost", 13)), Verdict::Tell);
    }

    /// A member's socket: the frames it was offered.
    #[derive(Clone, Default)]
    struct Socket(std::rc::Rc<std::cell::RefCell<Vec<String>>>);

    impl super::super::Outlet for Socket {
        fn offer(&self, out: super::super::Outbound, _: bool) -> super::super::Offer {
            if let super::super::Outbound::Frame(f) = out {
                self.0.borrow_mut().push(f.to_string());
            }
            super::super::Offer::Sent
        }
    }

    fn event(kind: EventKind) -> crate::bus::RoomEvent {
        let (what, user) = match &kind {
            EventKind::Join { user, .. } => ("join", user.to_string()),
            _ => ("leave", String::new()),
        };
        crate::bus::RoomEvent {
            room: crate::domain::RoomName::parse("r").unwrap(),
            json: format!(r#"{{"type":"{what}","user":"{user}"}}"#).into(),
            kind,
        }
    }

    #[test]
    fn a_refresh_read_before_later_changes_is_followed_by_them_and_skips_members_as_new() {
        let mut seq =
            super::super::Sequencer::new(crate::domain::RoomName::parse("r").unwrap(), 64);
        let (old, new) = (Socket::default(), Socket::default());
        for (session, socket, version) in [(1, &old, 1), (2, &new, 3)] {
            seq.add(session, user(&format!("m{session}")), socket.clone());
            let snapshot = PresenceSnapshot {
                version,
                ..PresenceSnapshot::default()
            };
            seq.presence_read(session, &snapshot);
            seq.synced(
                session,
                super::super::Synced {
                    epoch: crate::domain::Epoch::from_string("e"),
                    offset: 0,
                    recovered: None,
                    frames: Vec::new(),
                    delivered: 0,
                    more: false,
                    tail: Vec::new(),
                },
            );
        }
        // Change 2 was lost on the way; 3 and 4 arrive.
        seq.on_event(event(join("ann", 3)));
        seq.on_event(event(join("bob", 4)));
        assert!(seq.take_presence_stale(), "the old member missed change 2");
        assert_eq!(new.0.borrow().len(), 1, "the new member was told bob only");
        // A refresh read at version 3 answers after change 4 arrived.
        let snapshot = PresenceSnapshot {
            users: vec![user("ann"), user("m1"), user("m2")],
            version: 3,
            hidden: Vec::new(),
        };
        seq.presence_refresh(&snapshot);
        let told = old.0.borrow().clone();
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(told[0].contains(r#""type":"presence""#), "{told:?}");
        assert!(
            told[1].contains(r#""user":"bob""#),
            "then bob's join: {told:?}"
        );
        assert_eq!(new.0.borrow().len(), 1, "at version 4 already: nothing");
    }
}
