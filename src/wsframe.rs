//! RFC 6455 message assembly on top of actix-http's frame codec.
//!
//! The codec ([`crate::actors::socket`] reads with it) hands over single frames: continuation
//! fragments, pings between fragments, and protocol errors. This module turns that stream into
//! whole messages, enforces
//! the size cap over all fragments of a message, validates UTF-8 as fragments arrive (so a bad
//! sequence fails fast, not after the last fragment), and names each violation with a [`Fail`],
//! whose close code (the one RFC 6455 §7.4.1 asks for) and reason are in [`crate::close`]. Both the chat session and the conformance echo endpoint use it.
//!
//! Kept rather than replaced by actix-ws or tungstenite's message layer (issue 20): the close
//! codes a client sees are the contract's (1002, 1007, 1009 with their reasons, docs/PROTOCOL.md
//! §8), UTF-8 is checked as fragments arrive rather than once the message is whole, and the
//! size cap counts all fragments together. Autobahn|Testsuite cases 1–7 and 10 pass with no
//! FAILED case through this module (`docs/autobahn/summary.txt`). It is a few hundred lines on
//! top of actix-http's frame codec, which does the parsing.

use actix_http::ws::{CloseReason, Frame, Item, Message, ProtocolError};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

/// One complete thing the peer said.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    Text(ByteString),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    Close(Option<CloseReason>),
    /// A fragment that is not the last one: nothing to act on yet.
    Partial,
}

/// Why the connection must be failed. Its close code and reason (RFC 6455 §7.4.1,
/// docs/PROTOCOL.md §8) are in the one table of closes, [`crate::close::Close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// A frame with reserved bits set, and no extension negotiated to define them.
    ReservedBits,
    /// A continuation frame with no message open.
    ContinuationWithoutStart,
    /// Any other frame RFC 6455 forbids (unmasked, bad opcode, a long control frame, …).
    Protocol,
    /// A text message that is not UTF-8.
    InvalidUtf8,
    /// A message over the size cap, counted over all its fragments.
    TooBig,
}

#[derive(Debug)]
struct Partial {
    text: bool,
    buf: BytesMut,
    /// Bytes at the front of `buf` already known to be valid UTF-8.
    checked: usize,
}

/// Reassembles fragmented messages; one per connection.
#[derive(Debug)]
pub struct Assembler {
    max_bytes: usize,
    partial: Option<Partial>,
}

impl Assembler {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            partial: None,
        }
    }

    /// Feeds one frame as the codec decoded it; a text frame is checked for UTF-8 here.
    pub fn push_frame(&mut self, item: Result<Frame, ProtocolError>) -> Result<Inbound, Fail> {
        let message = match item.map_err(map_protocol_error)? {
            Frame::Text(data) => {
                Message::Text(ByteString::try_from(data).map_err(|_| Fail::InvalidUtf8)?)
            }
            Frame::Binary(data) => Message::Binary(data),
            Frame::Continuation(item) => Message::Continuation(item),
            Frame::Ping(data) => Message::Ping(data),
            Frame::Pong(data) => Message::Pong(data),
            Frame::Close(reason) => Message::Close(reason),
        };
        self.push(message)
    }

    /// Feeds one whole-frame message.
    fn push(&mut self, msg: Message) -> Result<Inbound, Fail> {
        match msg {
            Message::Text(text) => Ok(Inbound::Text(text)),
            Message::Binary(data) => Ok(Inbound::Binary(data)),
            Message::Ping(data) => Ok(Inbound::Ping(data)),
            Message::Pong(_) => Ok(Inbound::Pong),
            Message::Close(reason) => Ok(Inbound::Close(reason)),
            Message::Nop => Ok(Inbound::Partial),
            Message::Continuation(item) => self.continuation(item),
        }
    }

    fn continuation(&mut self, item: Item) -> Result<Inbound, Fail> {
        let is_text = matches!(item, Item::FirstText(_));
        let (data, last) = match item {
            Item::FirstText(data) | Item::FirstBinary(data) => {
                // The codec refuses a new first fragment while one is open, so this is a start.
                self.partial = Some(Partial {
                    text: is_text,
                    buf: BytesMut::new(),
                    checked: 0,
                });
                (data, false)
            }
            Item::Continue(data) => (data, false),
            Item::Last(data) => (data, true),
        };
        let max = self.max_bytes;
        let Some(partial) = self.partial.as_mut() else {
            return Err(Fail::ContinuationWithoutStart);
        };
        if partial.buf.len() + data.len() > max {
            return Err(Fail::TooBig);
        }
        partial.buf.extend_from_slice(&data);
        if partial.text {
            check_utf8(partial, last)?;
        }
        if !last {
            return Ok(Inbound::Partial);
        }
        let Some(done) = self.partial.take() else {
            return Ok(Inbound::Partial);
        };
        let bytes = done.buf.freeze();
        if done.text {
            ByteString::try_from(bytes)
                .map(Inbound::Text)
                .map_err(|_| Fail::InvalidUtf8)
        } else {
            Ok(Inbound::Binary(bytes))
        }
    }
}

/// Validates the bytes added since the last check. An incomplete sequence at the end is fine
/// until the final fragment; an impossible one fails at once.
fn check_utf8(partial: &mut Partial, last: bool) -> Result<(), Fail> {
    match std::str::from_utf8(&partial.buf[partial.checked..]) {
        Ok(_) => {
            partial.checked = partial.buf.len();
            Ok(())
        }
        Err(e) if e.error_len().is_none() && !last => {
            partial.checked += e.valid_up_to();
            Ok(())
        }
        Err(_) => Err(Fail::InvalidUtf8),
    }
}

/// Maps a codec error to why the connection fails, by its variant. The codec's only I/O error
/// is its reserved-bits check (actix-http's own TODO names it `InvalidReservedBits`); the
/// socket's read errors never come here, they end the frame stream
/// (`crate::actors::socket`), where no close frame can be delivered anyway.
fn map_protocol_error(e: ProtocolError) -> Fail {
    match e {
        ProtocolError::Overflow => Fail::TooBig,
        ProtocolError::Io(_) => Fail::ReservedBits,
        _ => Fail::Protocol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::close::Close;

    fn feed(a: &mut Assembler, m: Message) -> Result<Inbound, Fail> {
        a.push(m)
    }

    fn cont(item: Item) -> Message {
        Message::Continuation(item)
    }

    #[test]
    fn fragments_are_reassembled_with_pings_between() {
        let mut a = Assembler::new(100);
        let first = feed(&mut a, cont(Item::FirstText(Bytes::from_static(b"hel"))));
        assert_eq!(first, Ok(Inbound::Partial));
        let ping = feed(&mut a, Message::Ping(Bytes::from_static(b"p")));
        assert_eq!(ping, Ok(Inbound::Ping(Bytes::from_static(b"p"))));
        feed(&mut a, cont(Item::Continue(Bytes::from_static(b"lo ")))).unwrap();
        let done = feed(&mut a, cont(Item::Last(Bytes::from_static(b"world"))));
        assert_eq!(
            done,
            Ok(Inbound::Text(ByteString::from_static("hello world")))
        );
    }

    #[test]
    fn size_cap_counts_all_fragments_together() {
        let mut a = Assembler::new(8);
        feed(&mut a, cont(Item::FirstText(Bytes::from_static(b"12345")))).unwrap();
        let e = feed(&mut a, cont(Item::Last(Bytes::from_static(b"6789")))).unwrap_err();
        assert_eq!(Close::from(e).code(), 1009);
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted() {
        let euro = "€".as_bytes(); // three bytes
        let mut a = Assembler::new(100);
        feed(
            &mut a,
            cont(Item::FirstText(Bytes::copy_from_slice(&euro[..1]))),
        )
        .unwrap();
        feed(
            &mut a,
            cont(Item::Continue(Bytes::copy_from_slice(&euro[1..2]))),
        )
        .unwrap();
        let done = feed(&mut a, cont(Item::Last(Bytes::copy_from_slice(&euro[2..]))));
        assert_eq!(done, Ok(Inbound::Text(ByteString::from_static("€"))));
    }

    #[test]
    fn invalid_utf8_fails_at_the_fragment_that_carries_it() {
        let mut a = Assembler::new(100);
        let e = feed(&mut a, cont(Item::FirstText(Bytes::from_static(b"ok\xff")))).unwrap_err();
        assert_eq!(Close::from(e).code(), 1007);
    }

    #[test]
    fn truncated_utf8_at_the_end_fails() {
        let euro = "€".as_bytes();
        let mut a = Assembler::new(100);
        feed(
            &mut a,
            cont(Item::FirstText(Bytes::copy_from_slice(&euro[..2]))),
        )
        .unwrap();
        let e = feed(&mut a, cont(Item::Last(Bytes::new()))).unwrap_err();
        assert_eq!(Close::from(e).code(), 1007);
    }

    #[test]
    fn binary_fragments_are_not_utf8_checked() {
        let mut a = Assembler::new(100);
        feed(&mut a, cont(Item::FirstBinary(Bytes::from_static(b"\xff")))).unwrap();
        let done = feed(&mut a, cont(Item::Last(Bytes::from_static(b"\xfe"))));
        assert_eq!(done, Ok(Inbound::Binary(Bytes::from_static(b"\xff\xfe"))));
    }

    #[test]
    fn an_invalid_utf8_text_frame_fails_with_1007() {
        let mut a = Assembler::new(100);
        let e = a
            .push_frame(Ok(Frame::Text(Bytes::from_static(b"ok\xff"))))
            .unwrap_err();
        assert_eq!(Close::from(e).code(), 1007);
        let ok = a.push_frame(Ok(Frame::Text(Bytes::from_static(b"ok"))));
        assert_eq!(ok, Ok(Inbound::Text(ByteString::from_static("ok"))));
    }

    #[test]
    fn codec_errors_map_to_close_codes() {
        let mut a = Assembler::new(100);
        let e = a.push_frame(Err(ProtocolError::Overflow)).unwrap_err();
        assert_eq!(Close::from(e).code(), 1009);
        let e = a
            .push_frame(Err(ProtocolError::ContinuationNotStarted))
            .unwrap_err();
        assert_eq!(Close::from(e).code(), 1002);
        let bad = Frame::Text(bytes::Bytes::from_static(&[0xff]));
        let e = a.push_frame(Ok(bad)).unwrap_err();
        assert_eq!(Close::from(e).code(), 1007);
    }

    #[test]
    fn reserved_bits_from_the_codec_fail_with_1002_and_their_reason() {
        use actix_codec::Decoder;
        // A masked text frame "a" with RSV1 set, as a client would send it.
        let mut buf = BytesMut::from(&[0xC1, 0x81, 0, 0, 0, 0, b'a'][..]);
        let decoded = actix_http::ws::Codec::new().decode(&mut buf);
        let e = Assembler::new(100)
            .push_frame(decoded.map(|f| f.expect("a whole frame")))
            .unwrap_err();
        assert_eq!(e, Fail::ReservedBits);
        assert_eq!(
            (Close::from(e).code(), Close::from(e).reason()),
            (1002, "reserved bits set")
        );
    }

    #[test]
    fn each_failure_has_the_close_code_and_reason_the_protocol_names() {
        let table = [
            (Fail::ReservedBits, 1002, "reserved bits set"),
            (
                Fail::ContinuationWithoutStart,
                1002,
                "continuation without a start",
            ),
            (Fail::Protocol, 1002, "protocol error"),
            (Fail::InvalidUtf8, 1007, "invalid UTF-8 in text message"),
            (Fail::TooBig, 1009, "message too big"),
        ];
        for (fail, code, reason) in table {
            assert_eq!(
                (Close::from(fail).code(), Close::from(fail).reason()),
                (code, reason)
            );
        }
    }
}
