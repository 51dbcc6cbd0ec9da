//! What a room holds of each session: a bounded path to its outbound queue.
//!
//! A room never waits for a session and never uses `do_send` for fan-out (it ignores mailbox
//! bounds). It counts frames it handed to a session that the session has not yet written; past
//! half of `limits.session_queue` droppable frames (typing) are skipped, and at the limit the
//! session is a slow consumer: it is detached and told to close with 4008. The session's
//! actor is not polled while its socket is backpressured, so this count is exactly the backlog.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;

use crate::domain::{Epoch, Offset};

/// Close code for a session that fell too far behind (SPEC §5).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;

/// Room → session: something to write to the socket, in order.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Deliver(pub Outbound);

#[derive(Debug, Clone)]
pub enum Outbound {
    /// The session's first frame: where the room stands.
    Welcome {
        epoch: Epoch,
        offset: Offset,
        recovered: Option<bool>,
    },
    /// One server frame, serialized once for all members.
    Frame(ByteString),
    /// Several frames that must go out back to back (history, replay).
    Batch(Vec<ByteString>),
    /// Close the connection with this code.
    Close { code: u16, reason: &'static str },
}

/// Result of offering a frame to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Sent,
    Dropped,
    /// The member is a slow consumer (or gone) and must be detached.
    Evict,
}

/// The room's handle on one session.
#[derive(Clone)]
pub struct MemberHandle {
    recipient: Recipient<Deliver>,
    pending: Arc<AtomicUsize>,
}

impl MemberHandle {
    pub fn new(recipient: Recipient<Deliver>, pending: Arc<AtomicUsize>) -> Self {
        Self { recipient, pending }
    }

    /// Offers a frame without waiting; `limit` is `limits.session_queue`.
    pub fn offer(&self, out: Outbound, droppable: bool, limit: usize) -> Offer {
        let pending = self.pending.load(Ordering::Relaxed);
        if droppable && pending >= limit / 2 {
            return Offer::Dropped;
        }
        if pending >= limit {
            return Offer::Evict;
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        match self.recipient.try_send(Deliver(out)) {
            Ok(()) => Offer::Sent,
            Err(_) => {
                self.pending.fetch_sub(1, Ordering::Relaxed);
                if droppable {
                    Offer::Dropped
                } else {
                    Offer::Evict
                }
            }
        }
    }

    /// Tells a detached member to close. The one message sent past the bound, so that even a
    /// full queue ends with the close frame.
    pub fn close(&self, code: u16, reason: &'static str) {
        self.recipient
            .do_send(Deliver(Outbound::Close { code, reason }));
    }
}

/// Session side of the count: one frame written.
pub fn written(pending: &AtomicUsize) {
    // Saturating: a racing eviction may already have reset expectations.
    let _ = pending.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
}
