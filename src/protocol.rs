//! The wire format of docs/PROTOCOL.md §5–§7: what clients send and what the server answers, as
//! plain data. Nothing here knows about actors or the bus; parsing and validation are pure
//! functions so every rule about bad input is unit-tested without a socket.

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::domain::{Epoch, Offset, RoomName, UserId, MAX_OFFSET};

/// Longest `ref` a client may attach to a frame.
pub const MAX_REF_CHARS: usize = 64;
/// Most messages one history request (or `history=N` on connect) returns.
pub const MAX_HISTORY_LIMIT: usize = 100;
/// History page size when a request names none.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;

/// A client frame as it appears on the wire (JSON form).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum WireFrame {
    Message {
        text: String,
        #[serde(rename = "ref", default)]
        reference: Option<String>,
    },
    Typing,
    Presence,
    Ping,
    History {
        #[serde(default)]
        before: Option<Offset>,
        #[serde(default)]
        limit: Option<usize>,
        #[serde(rename = "ref", default)]
        reference: Option<String>,
    },
}

/// A validated request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Message {
        text: String,
        reference: Option<String>,
    },
    Typing,
    Presence,
    Ping,
    History {
        before: Option<Offset>,
        limit: usize,
        reference: Option<String>,
    },
}

/// The `code` of an `error` frame (and of the HTTP refusals that share its meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    TooLong,
    RateLimited,
    Forbidden,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire (and in metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::TooLong => "too_long",
            Self::RateLimited => "rate_limited",
            Self::Forbidden => "forbidden",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// Written as [`ErrorCode::as_str`]: one spelling of each code, on the wire and in metrics.
impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A client frame that was refused; becomes an `error` frame and the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
    pub reference: Option<String>,
}

impl Rejection {
    fn bad(message: impl Into<String>, reference: Option<String>) -> Self {
        Self {
            code: ErrorCode::BadRequest,
            message: message.into(),
            reference,
        }
    }
}

/// Parses one complete text message from a client.
///
/// Text that does not start with `{` is a chat message as it stands, so `websocat` and
/// tutorial-style pages work without knowing the JSON protocol.
pub fn parse_request(frame: &str, max_message_chars: usize) -> Result<Request, Rejection> {
    if !frame.starts_with('{') {
        check_text(frame, max_message_chars, &None)?;
        return Ok(Request::Message {
            text: frame.to_owned(),
            reference: None,
        });
    }
    let wire: WireFrame = serde_json::from_str(frame).map_err(|e| {
        // Try to find the ref even in a frame we cannot use, so the client can match the error.
        let reference = serde_json::from_str::<serde_json::Value>(frame)
            .ok()
            .and_then(|v| v.get("ref")?.as_str().map(str::to_owned));
        Rejection::bad(describe_json_error(&e), reference)
    })?;
    match wire {
        WireFrame::Message { text, reference } => {
            check_ref(&reference)?;
            check_text(&text, max_message_chars, &reference)?;
            Ok(Request::Message { text, reference })
        }
        WireFrame::Typing => Ok(Request::Typing),
        WireFrame::Presence => Ok(Request::Presence),
        WireFrame::Ping => Ok(Request::Ping),
        WireFrame::History {
            before,
            limit,
            reference,
        } => {
            check_ref(&reference)?;
            let limit = match check_page(before, limit) {
                Ok(limit) => limit,
                Err(message) => return Err(Rejection::bad(message, reference)),
            };
            Ok(Request::History {
                before,
                limit,
                reference,
            })
        }
    }
}

/// Checks a history page request (a `history` frame's or the HTTP API's): `before` 1 to
/// [`MAX_OFFSET`], `limit` 1 to [`MAX_HISTORY_LIMIT`]. Returns the limit, defaulted.
pub fn check_page(before: Option<Offset>, limit: Option<usize>) -> Result<usize, String> {
    let limit = limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
    if limit == 0 || limit > MAX_HISTORY_LIMIT {
        return Err(format!("limit must be 1 to {MAX_HISTORY_LIMIT}"));
    }
    if before.is_some_and(|b| b == 0 || b > MAX_OFFSET) {
        return Err(format!("before must be 1 to {MAX_OFFSET}"));
    }
    Ok(limit)
}

/// Checks a chat message's text and `ref` as a `message` frame's are checked; the HTTP API
/// uses it so both ways in refuse the same things.
pub fn check_message(
    text: &str,
    reference: &Option<String>,
    max_message_chars: usize,
) -> Result<(), Rejection> {
    check_ref(reference)?;
    check_text(text, max_message_chars, reference)
}

fn describe_json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.starts_with("unknown variant") {
        "unknown frame type (expected message, typing, presence, ping or history)".to_owned()
    } else if e.is_syntax() || e.is_eof() {
        format!("malformed JSON: {text}")
    } else {
        format!("invalid frame: {text}")
    }
}

fn check_ref(reference: &Option<String>) -> Result<(), Rejection> {
    match reference {
        Some(r) if r.chars().count() > MAX_REF_CHARS => Err(Rejection::bad(
            format!("ref is longer than {MAX_REF_CHARS} characters"),
            None,
        )),
        _ => Ok(()),
    }
}

fn check_text(text: &str, max_chars: usize, reference: &Option<String>) -> Result<(), Rejection> {
    if text.trim().is_empty() {
        return Err(Rejection::bad("message text is empty", reference.clone()));
    }
    // Count characters, not bytes: the limit is what a person typed, in any script.
    if text.chars().count() > max_chars {
        return Err(Rejection {
            code: ErrorCode::TooLong,
            message: format!("message text is longer than {max_chars} characters"),
            reference: reference.clone(),
        });
    }
    // What is stored is JSON, where a control character takes six bytes (`\u0001`): a text of
    // `max_chars` control characters would cost 6× its count in history and on every wire.
    // Four bytes a character is the most any printable text needs in UTF-8, so only such
    // padding is refused.
    let max_bytes = max_chars.saturating_mul(MAX_BYTES_PER_CHAR);
    if escaped_len(text) > max_bytes {
        return Err(Rejection {
            code: ErrorCode::TooLong,
            message: format!(
                "message text takes more than {max_bytes} bytes as JSON (control characters count 6 each)"
            ),
            reference: reference.clone(),
        });
    }
    Ok(())
}

/// Stored bytes a message may take per character of `limits.max_message_chars`.
pub const MAX_BYTES_PER_CHAR: usize = 4;

/// The length of `text` as a JSON string's contents, escaped as serde_json escapes it.
pub fn escaped_len(text: &str) -> usize {
    text.chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum()
}

/// A frame the server sends. Each is serialized once and the bytes shared by every receiver.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Welcome {
        room: &'a RoomName,
        user: &'a UserId,
        session: &'a str,
        node: &'a str,
        epoch: &'a Epoch,
        offset: Offset,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    Message {
        room: &'a RoomName,
        offset: Offset,
        user: &'a UserId,
        /// The display name from the sender's token, when it has one.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<&'a str>,
        text: &'a str,
        ts: u64,
    },
    Join {
        room: &'a RoomName,
        user: &'a UserId,
        ts: u64,
    },
    Leave {
        room: &'a RoomName,
        user: &'a UserId,
        ts: u64,
    },
    Presence {
        room: &'a RoomName,
        users: &'a [UserId],
    },
    Typing {
        room: &'a RoomName,
        user: &'a UserId,
    },
    Reset {
        room: &'a RoomName,
        epoch: &'a Epoch,
        offset: Offset,
    },
    Ack {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        room: &'a RoomName,
        offset: Offset,
    },
    History {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        room: &'a RoomName,
        epoch: &'a Epoch,
        /// Stored `message` frames, oldest first, spliced in as they were stored.
        messages: Vec<&'a RawValue>,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        /// The room the refused request was about, when known (docs/PROTOCOL.md §5.10).
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a RoomName>,
    },
}

impl ServerFrame<'_> {
    /// The frame as a WebSocket text payload.
    pub fn to_text(&self) -> ByteString {
        // Serializing these types cannot fail: every field is a string, number or raw JSON.
        ByteString::from(serde_json::to_string(self).unwrap_or_else(|e| {
            log::error!("cannot serialize a server frame: {e}");
            r#"{"type":"error","code":"internal","message":"serialization failed"}"#.to_owned()
        }))
    }
}

/// The `error` frame for a refused request about `room`.
pub fn rejection_frame(r: &Rejection, room: Option<&RoomName>) -> ByteString {
    ServerFrame::Error {
        code: r.code,
        message: &r.message,
        reference: r.reference.as_deref(),
        room,
    }
    .to_text()
}

/// Parses a stored `message` frame for splicing into a `history` frame; a frame that is not
/// valid JSON (never written by this server) is left out rather than corrupting the page.
pub fn raw_json(text: &str) -> Option<&RawValue> {
    serde_json::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, Rejection> {
        parse_request(s, 10)
    }

    #[test]
    fn escaped_len_is_what_serde_json_writes() {
        for text in [
            "plain",
            "quote \" and \\",
            "tab\tnl\ncr\r",
            "\u{1}\u{8}\u{c}\u{1f}\u{7f}",
            "héllo 🎉",
        ] {
            let json = serde_json::to_string(text).unwrap();
            assert_eq!(escaped_len(text), json.len() - 2, "{json}");
        }
    }

    #[test]
    fn control_character_padding_is_too_long_though_within_the_character_count() {
        // 10 characters allowed, 40 bytes stored: 7 control characters take 42.
        let padded = "\u{1}".repeat(7);
        assert_eq!(parse(&padded).unwrap_err().code, ErrorCode::TooLong);
        let emoji = "🎉".repeat(10);
        assert!(parse(&emoji).is_ok(), "ten 4-byte characters fit");
    }

    #[test]
    fn plain_text_is_a_chat_message() {
        assert_eq!(
            parse("hello"),
            Ok(Request::Message {
                text: "hello".into(),
                reference: None
            })
        );
    }

    #[test]
    fn json_message_keeps_its_ref() {
        assert_eq!(
            parse(r#"{"type":"message","text":"hi","ref":"c1"}"#),
            Ok(Request::Message {
                text: "hi".into(),
                reference: Some("c1".into())
            })
        );
    }

    #[test]
    fn unit_frames_parse() {
        assert_eq!(parse(r#"{"type":"typing"}"#), Ok(Request::Typing));
        assert_eq!(parse(r#"{"type":"presence"}"#), Ok(Request::Presence));
        assert_eq!(parse(r#"{"type":"ping"}"#), Ok(Request::Ping));
    }

    #[test]
    fn malformed_json_is_a_bad_request() {
        let e = parse(r#"{"type":"message","#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("malformed JSON"), "{}", e.message);
    }

    #[test]
    fn unknown_type_is_a_bad_request_naming_the_problem() {
        let e = parse(r#"{"type":"shout","ref":"r9"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("unknown frame type"));
        assert_eq!(e.reference.as_deref(), Some("r9"));
    }

    #[test]
    fn empty_and_whitespace_text_are_refused() {
        for s in ["   ", "\n\t", r#"{"type":"message","text":" "}"#] {
            assert_eq!(parse(s).unwrap_err().code, ErrorCode::BadRequest, "{s:?}");
        }
    }

    #[test]
    fn length_is_counted_in_characters_not_bytes() {
        // Ten 3-byte characters are within a 10-character limit; eleven are not.
        assert!(parse(&"€".repeat(10)).is_ok());
        let e = parse(&format!(
            r#"{{"type":"message","text":"{}","ref":"x"}}"#,
            "€".repeat(11)
        ))
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLong);
        assert_eq!(e.reference.as_deref(), Some("x"));
    }

    #[test]
    fn overlong_ref_is_refused() {
        let frame = format!(
            r#"{{"type":"message","text":"hi","ref":"{}"}}"#,
            "r".repeat(65)
        );
        assert_eq!(parse(&frame).unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn history_limit_defaults_and_is_bounded() {
        assert_eq!(
            parse(r#"{"type":"history"}"#),
            Ok(Request::History {
                before: None,
                limit: DEFAULT_HISTORY_LIMIT,
                reference: None
            })
        );
        assert!(parse(r#"{"type":"history","limit":101}"#).is_err());
        assert!(parse(r#"{"type":"history","limit":0}"#).is_err());
    }

    #[test]
    fn server_frames_carry_their_type_and_omit_absent_fields() {
        let room = RoomName::parse("r").unwrap();
        let user = UserId::parse("u").unwrap();
        let epoch = Epoch::from_string("e1");
        let welcome = ServerFrame::Welcome {
            room: &room,
            user: &user,
            session: "s",
            node: "n",
            epoch: &epoch,
            offset: 0,
            recovered: None,
        }
        .to_text();
        let v: serde_json::Value = serde_json::from_str(&welcome).unwrap();
        assert_eq!(v["type"], "welcome");
        assert_eq!(v["epoch"], "e1");
        assert!(v.get("recovered").is_none());

        let room = RoomName::parse("lobby").unwrap();
        let ack = ServerFrame::Ack {
            reference: Some("c1"),
            room: &room,
            offset: 7,
        }
        .to_text();
        assert_eq!(
            &*ack,
            r#"{"type":"ack","ref":"c1","room":"lobby","offset":7}"#
        );
    }

    #[test]
    fn history_frames_splice_stored_messages() {
        let room = RoomName::parse("r").unwrap();
        let epoch = Epoch::from_string("e");
        let stored = r#"{"type":"message","offset":1}"#;
        let text = ServerFrame::History {
            reference: None,
            room: &room,
            epoch: &epoch,
            messages: vec![raw_json(stored).unwrap()],
        }
        .to_text();
        assert!(
            text.contains(r#""messages":[{"type":"message","offset":1}]"#),
            "{text}"
        );
    }
}
