//! The subscription table of a [`SessionCore`]: joining and leaving rooms, their welcomes,
//! and a room's own end (docs/PROTOCOL.md §4.1, docs/design.md "Many rooms on one
//! connection").

use std::time::Instant;

use bytestring::ByteString;

use super::{Answer, Effect, SessionCore, Sub, Work};
use crate::actors::member::CONNECTION;
use crate::close::Close;
use crate::domain::{Epoch, Offset, RoomName, SessionId};
use crate::logctx;
use crate::protocol::{ErrorCode, ServerFrame};

/// A subscription whose room's `unsubscribed` is still queued behind answers in flight.
#[derive(Debug)]
pub(super) struct Deferred {
    tag: u32,
    member: SessionId,
    room: RoomName,
    resume: Option<(Offset, Epoch)>,
    history: usize,
}

impl SessionCore {
    pub(super) fn subscribe(
        &mut self,
        room: RoomName,
        resume: Option<(Offset, Epoch)>,
        history: usize,
        reference: Option<String>,
    ) {
        let refused = if !self.identity.may_join(&room) {
            Some((ErrorCode::Forbidden, "your token does not allow this room"))
        } else if self.subs.iter().any(|s| s.room == room) {
            Some((ErrorCode::BadRequest, "already subscribed to this room"))
        } else if self.subs.len() >= self.cfg.rooms_per_connection {
            Some((
                ErrorCode::TooManyRooms,
                "this connection is in limits.rooms_per_connection rooms already",
            ))
        } else if !self.finishing && !self.slots.enter(&room) {
            Some((
                ErrorCode::TooManyRooms,
                "this address's sessions are in limits.rooms_per_ip rooms already",
            ))
        } else {
            None
        };
        if let Some((code, message)) = refused {
            self.cfg
                .metrics
                .subscribe_refusals
                .with_label_values(&[code.as_str()])
                .inc();
            return self.refuse(code, message, reference.as_deref(), Some(&room));
        }
        if self.finishing {
            return;
        }
        let may_publish = self.identity.may_publish(&room);
        self.add(room, may_publish, reference, resume, history);
    }

    /// Adds a subscription and attaches it to its room.
    pub(super) fn add(
        &mut self,
        room: RoomName,
        may_publish: bool,
        reference: Option<String>,
        resume: Option<(Offset, Epoch)>,
        history: usize,
    ) -> u32 {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(CONNECTION + 1);
        let member = self.id.wrapping_add(u64::from(tag));
        // Grown one at a time: a connection in ten rooms keeps ten entries, not sixteen.
        self.subs.reserve_exact(1);
        self.subs.push(Sub {
            tag,
            member,
            room: room.clone(),
            may_publish,
            welcomed: false,
            reference: reference.map(String::into_boxed_str),
            held: Vec::new(),
        });
        self.cfg.metrics.subscriptions_open.inc();
        self.rooms_apart_changed(self.subs.len() - 1);
        let leaving = self
            .answers
            .iter()
            .any(|a| matches!(a, Answer::Unsubscribed { room: r, .. } if *r == room));
        let attach = Deferred {
            tag,
            member,
            room,
            resume,
            history,
        };
        if leaving {
            self.deferred.push(attach);
        } else {
            self.attach(attach);
        }
        tag
    }

    pub(super) fn attach(&mut self, d: Deferred) {
        self.effects.push_back(Effect::Subscribe {
            tag: d.tag,
            member: d.member,
            room: d.room,
            resume: d.resume,
            history: d.history,
        });
    }

    /// Attaches the subscriptions that waited for `room`'s `unsubscribed` to be written, once
    /// no other `unsubscribed` of the room is still queued (a room left twice behind answers
    /// in flight: the new welcome must follow both).
    pub(super) fn attach_deferred(&mut self, room: &RoomName) {
        let leaving = self
            .answers
            .iter()
            .any(|a| matches!(a, Answer::Unsubscribed { room: r, .. } if r == room));
        if leaving {
            return;
        }
        while let Some(at) = self.deferred.iter().position(|d| d.room == *room) {
            let d = self.deferred.swap_remove(at);
            self.attach(d);
        }
    }

    /// Tells the inbox when the connection moved between "its path room alone" and "rooms
    /// apart", as subscriptions come and go; `before` is the count before the change.
    pub(super) fn rooms_apart_changed(&mut self, before: usize) {
        if self.path.is_none() {
            return;
        }
        let apart = |n: usize| n != 1;
        let (was, is) = (apart(before), apart(self.subs.len()));
        // With no path room left the connection is a `/ws` one for good.
        let path_gone = self
            .path
            .is_some_and(|tag| !self.subs.iter().any(|s| s.tag == tag));
        if path_gone {
            self.path = None;
            return self.effects.push_back(Effect::RoomsApart(true));
        }
        if was != is {
            self.effects.push_back(Effect::RoomsApart(is));
        }
    }

    pub(super) fn unsubscribe(&mut self, room: &RoomName, reference: Option<String>, now: Instant) {
        let Some(at) = self.subs.iter().position(|s| s.room == *room) else {
            return self.refuse(
                ErrorCode::BadRequest,
                "this connection is not subscribed to that room",
                reference.as_deref(),
                Some(room),
            );
        };
        let frame = ServerFrame::Unsubscribed {
            room,
            reference: reference.as_deref(),
            code: None,
            reason: None,
        }
        .to_text();
        self.end(at, frame);
        self.go_on(now);
    }

    /// A room's own close for subscription `at`: a gap history no longer holds, or the bus
    /// failing its setup. It ends the connection when that room is its path room alone (as
    /// on `/ws/{room}` ever since), else only the subscription.
    pub(super) fn room_closed(&mut self, at: usize, why: Close) {
        let path_alone = self.subs.len() == 1 && self.path == Some(self.subs[at].tag);
        if path_alone || !why.ends_subscription() {
            return self.close(why);
        }
        log::info!(
            "{} subscription ended with {why}",
            logctx::session(&self.label).room(&self.subs[at].room)
        );
        let frame = ServerFrame::Unsubscribed {
            room: &self.subs[at].room,
            reference: None,
            code: Some(why.code()),
            reason: Some(why.reason()),
        }
        .to_text();
        self.end(at, frame);
    }

    /// Ends subscription `at`: its room is left, nothing more of it is written (its tag is
    /// dead, so what its room still queued is dropped), and `frame` goes out in turn with
    /// the answers in flight, after any ack of the room's own messages.
    pub(super) fn end(&mut self, at: usize, frame: ByteString) {
        self.send_run();
        let before = self.subs.len();
        let sub = self.subs.remove(at);
        self.left(&sub);
        self.rooms_apart_changed(before);
        // Held for a welcome that will not come: refused like a frame for a room not
        // subscribed to, in the order they were sent.
        for request in sub.held {
            self.held -= 1;
            self.held_bytes -= super::weight(&request);
            self.refuse(
                ErrorCode::BadRequest,
                "this connection is not subscribed to that room",
                request.reference(),
                Some(&sub.room),
            );
        }
        self.answers.push_back(Answer::Unsubscribed {
            room: sub.room,
            frame,
        });
        self.write_answers();
    }

    /// Leaves a subscription's room (unless it never was attached to it).
    pub(super) fn left(&mut self, sub: &Sub) {
        self.slots.leave(&sub.room);
        self.cfg.metrics.subscriptions_open.dec();
        if let Some(at) = self.deferred.iter().position(|d| d.tag == sub.tag) {
            self.deferred.swap_remove(at);
            return;
        }
        self.effects.push_back(Effect::Unsubscribe {
            room: sub.room.clone(),
            member: sub.member,
            tag: sub.tag,
        });
    }

    pub(super) fn welcome(
        &mut self,
        at: usize,
        epoch: &Epoch,
        offset: Offset,
        recovered: Option<bool>,
        now: Instant,
    ) {
        let sub = &mut self.subs[at];
        if sub.welcomed {
            return;
        }
        sub.welcomed = true;
        let reference = sub.reference.take();
        let frame = ServerFrame::Welcome {
            room: &sub.room,
            user: &self.identity.user,
            session: &self.label,
            node: &self.cfg.node,
            epoch,
            offset,
            recovered,
            reference: reference.as_deref(),
        }
        .to_text();
        self.write(frame);
        // Requests held for this welcome go first, then whatever waited behind them.
        let held = std::mem::take(&mut self.subs[at].held);
        self.held -= held.len();
        self.held_bytes -= held.iter().map(super::weight).sum::<usize>();
        for request in held.into_iter().rev() {
            self.waiting.push_front(Work::Request(request));
        }
        self.go_on(now);
    }
}
