//! What a room hands a session: frames to write, offered through a bounded [`Outlet`] that
//! never blocks the room. Plain types, no actix: the sequencer and its tests use them, the
//! room's `MemberHandle` implements the outlet over the session's inbox.

use actix_http::ws::{OpCode, Parser};
use bytes::{Bytes, BytesMut};
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
    /// A run of message frames, encoded once for all members that take the whole run.
    Encoded(Encoded),
    /// Close the connection, for this reason.
    Close(Close),
}

impl Outbound {
    /// What the frame weighs in a session's byte bound.
    pub fn bytes(&self) -> usize {
        match self {
            Outbound::Frame(text) => text.len(),
            Outbound::Encoded(run) => run.bytes.len(),
            // The welcome is small and built by the session; count a typical size.
            Outbound::Welcome { .. } => 256,
            Outbound::Close(_) => 0,
        }
    }
}

impl Outbound {
    /// How many frames it counts for in a session's frame bound.
    pub fn frames(&self) -> usize {
        match self {
            Outbound::Encoded(run) => run.frames,
            _ => 1,
        }
    }
}

/// Text frames encoded as the socket writes them (final, unmasked), back to back: what
/// every member that takes a whole run of a room's messages writes as it is. Encoding the
/// run once in the room leaves each member one shared buffer to queue, count and copy into
/// its socket, where frame by frame it was a queue entry, a reference count and a frame
/// header each (docs/PERFORMANCE.md, "Round 6").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    bytes: Bytes,
    frames: usize,
}

impl Encoded {
    /// Encodes `texts` as final text frames, in order.
    pub fn texts<'a>(texts: impl Iterator<Item = &'a ByteString> + Clone) -> Self {
        // Payload plus the longest header a server frame of that size needs.
        let size: usize = texts.clone().map(|t| t.len() + 10).sum();
        let mut buf = BytesMut::with_capacity(size);
        let mut frames = 0;
        for text in texts {
            Parser::write_message(&mut buf, text.as_bytes(), OpCode::Text, true, false);
            frames += 1;
        }
        Self {
            bytes: buf.freeze(),
            frames,
        }
    }

    /// The encoded frames, as they go on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The texts back, in order: what tests check a member was given.
    #[cfg(test)]
    pub fn decode(&self) -> Vec<ByteString> {
        let mut buf = BytesMut::from(&self.bytes[..]);
        let mut texts = Vec::with_capacity(self.frames);
        while let Ok(Some((_, _, payload))) = Parser::parse(&mut buf, false, usize::MAX) {
            // An empty frame has no payload.
            let bytes = payload.map(BytesMut::freeze).unwrap_or_default();
            texts.push(ByteString::try_from(bytes).expect("text frames are UTF-8"));
        }
        texts
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_its_texts_as_final_unmasked_frames_back_to_back_at_every_header_size() {
        let texts: Vec<ByteString> = [0, 1, 125, 126, 65_535, 65_536, 3]
            .map(|n| ByteString::from("é".repeat(n / 2) + &"x".repeat(n % 2)))
            .to_vec();
        let run = Encoded::texts(texts.iter());
        assert_eq!(Outbound::Encoded(run.clone()).frames(), texts.len());
        // Not assert_eq: the texts run to 64 KiB.
        assert!(run.decode() == texts, "decodes to its texts");
        let mut one_by_one = BytesMut::new();
        for text in &texts {
            Parser::write_message(&mut one_by_one, text.as_bytes(), OpCode::Text, true, false);
        }
        assert!(
            run.as_bytes() == &one_by_one[..],
            "the socket's own encoding"
        );
        // RFC 6455 §5.2 by hand, not the encoder again: FIN + text, no mask bit, then the
        // length in 7 bits, 7+16 or 7+64, for the frames of 0, 1, 125, 126 and 65,536 bytes.
        let b = run.as_bytes();
        assert_eq!(b[..2], [0x81, 0]);
        assert_eq!(b[2..4], [0x81, 1]);
        let at_125 = 2 + 3;
        assert_eq!(b[at_125..at_125 + 2], [0x81, 125]);
        let at_126 = at_125 + 2 + 125;
        assert_eq!(b[at_126..at_126 + 4], [0x81, 126, 0, 126]);
        let at_65535 = at_126 + 4 + 126;
        assert_eq!(b[at_65535..at_65535 + 4], [0x81, 126, 0xff, 0xff]);
        let at_65536 = at_65535 + 4 + 65_535;
        assert_eq!(
            b[at_65536..at_65536 + 10],
            [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]
        );
    }
}
