//! What a room holds of each session: a bounded path to its outbound queue.
//!
//! A room never waits for a session and never uses `do_send` for fan-out (it ignores mailbox
//! bounds). It counts the frames and bytes it handed to a session that the session has not
//! yet written; past half of either bound droppable frames (typing) are skipped, and at the
//! bound the session is a slow consumer: it is detached and told to close with 4008. The
//! session's actor is not polled while its socket is backpressured, so these counts are
//! exactly the backlog.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;

pub use super::outlet::{Offer, Outbound, Outlet};
pub use super::sequencer::CLOSE_SLOW_CONSUMER;

/// Room → session: something to write to the socket, in order.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Deliver(pub Outbound);

/// How much one session may have queued: `limits.session_queue` frames and
/// `limits.session_queue_bytes` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub frames: usize,
    pub bytes: usize,
}

/// Frames and bytes handed to a session and not yet written; shared by the room's handle and
/// the session.
#[derive(Debug, Default)]
pub struct Pending {
    frames: AtomicUsize,
    bytes: AtomicUsize,
}

impl Pending {
    /// Session side: one frame of `bytes` written.
    pub fn written(&self, bytes: usize) {
        // Saturating: a racing eviction may already have reset expectations.
        let _ = self
            .frames
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(bytes))
            });
    }
}

/// The room's handle on one session.
#[derive(Clone)]
pub struct MemberHandle {
    recipient: Recipient<Deliver>,
    pending: Arc<Pending>,
    limits: QueueLimits,
}

impl MemberHandle {
    pub fn new(recipient: Recipient<Deliver>, pending: Arc<Pending>, limits: QueueLimits) -> Self {
        Self {
            recipient,
            pending,
            limits,
        }
    }

    /// Tells a detached member to close. The one message sent past the bound, so that even a
    /// full queue ends with the close frame.
    pub fn close(&self, code: u16, reason: &'static str) {
        self.recipient
            .do_send(Deliver(Outbound::Close { code, reason }));
    }
}

impl Outlet for MemberHandle {
    /// Offers a frame without waiting.
    fn offer(&self, out: Outbound, droppable: bool) -> Offer {
        let frames = self.pending.frames.load(Ordering::Relaxed);
        let bytes = self.pending.bytes.load(Ordering::Relaxed);
        let size = out.bytes();
        let QueueLimits {
            frames: max_frames,
            bytes: max_bytes,
        } = self.limits;
        if droppable && (frames >= max_frames / 2 || bytes >= max_bytes / 2) {
            return Offer::Dropped;
        }
        // One frame larger than the whole byte bound still goes to a session that is caught
        // up; otherwise it could never be delivered.
        if frames >= max_frames || (bytes > 0 && bytes + size > max_bytes) {
            return Offer::Evict;
        }
        self.pending.frames.fetch_add(1, Ordering::Relaxed);
        self.pending.bytes.fetch_add(size, Ordering::Relaxed);
        match self.recipient.try_send(Deliver(out)) {
            Ok(()) => Offer::Sent,
            Err(_) => {
                self.pending.written(size);
                if droppable {
                    Offer::Dropped
                } else {
                    Offer::Evict
                }
            }
        }
    }

    fn gone(&self) -> bool {
        !self.recipient.connected()
    }
}
