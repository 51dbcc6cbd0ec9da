//! What a room hands a session: frames to write, offered through a bounded [`Outlet`] that
//! never blocks the room. Plain types, no actix: the sequencer and its tests use them, the
//! room's `MemberHandle` implements the outlet over the session's inbox.

use bytestring::ByteString;

use crate::close::Close;
use crate::domain::{Epoch, Offset};

/// Something for a session to write to its socket, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// The session's first frame: where the room stands.
    Welcome {
        epoch: Epoch,
        offset: Offset,
        recovered: Option<bool>,
    },
    /// One server frame, serialized once for all members.
    Frame(ByteString),
    /// Close the connection, for this reason.
    Close(Close),
}

impl Outbound {
    /// What the frame weighs in a session's byte bound.
    pub fn bytes(&self) -> usize {
        match self {
            Outbound::Frame(text) => text.len(),
            // The welcome is small and built by the session; count a typical size.
            Outbound::Welcome { .. } => 256,
            Outbound::Close(_) => 0,
        }
    }
}

/// Result of offering a frame to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Sent,
    Dropped,
    /// The member is a slow consumer (or gone) and must be detached.
    Evict,
}

/// Where a member's frames go: a bounded queue that never blocks the room.
pub trait Outlet {
    /// Offers a frame; droppable frames (typing) may be skipped under load.
    fn offer(&self, out: Outbound, droppable: bool) -> Offer;

    /// Offers frames in order, none of them droppable, until one is refused: returns how
    /// many went in and the refusal (`Sent` when none was). The room's path for a run of
    /// messages queued together; an outlet shared with another thread takes them under one
    /// lock and wakes its reader once.
    fn offer_run<'a>(&self, frames: impl Iterator<Item = &'a ByteString>) -> (usize, Offer) {
        let mut sent = 0;
        for text in frames {
            match self.offer(Outbound::Frame(text.clone()), false) {
                Offer::Sent => sent += 1,
                refused => return (sent, refused),
            }
        }
        (sent, Offer::Sent)
    }

    /// Whether the queue has room for a page of a replay (at most half full).
    fn has_room(&self) -> bool {
        true
    }

    /// True when the session behind it has already stopped (it is leaving): a failed offer
    /// then means nothing about its speed.
    fn gone(&self) -> bool {
        false
    }
}
