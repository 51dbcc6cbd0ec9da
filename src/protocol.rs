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
        #[serde(default)]
        room: Option<String>,
    },
    Typing {
        #[serde(default)]
        room: Option<String>,
    },
    Presence {
        #[serde(default)]
        room: Option<String>,
    },
    Ping,
    History {
        #[serde(default)]
        before: Option<Offset>,
        #[serde(default)]
        limit: Option<usize>,
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        #[serde(default)]
        room: Option<String>,
    },
    Subscribe {
        room: String,
        #[serde(default)]
        since: Option<Offset>,
        #[serde(default)]
        epoch: Option<String>,
        #[serde(default)]
        history: Option<usize>,
        #[serde(rename = "ref", default)]
        reference: Option<String>,
    },
    Unsubscribe {
        room: String,
        #[serde(rename = "ref", default)]
        reference: Option<String>,
    },
}

/// A validated request from a client. `room` is the room a frame names (docs/PROTOCOL.md §4):
/// `None` means the connection's path room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Message {
        text: String,
        reference: Option<String>,
        room: Option<RoomName>,
    },
    Typing {
        room: Option<RoomName>,
    },
    Presence {
        room: Option<RoomName>,
    },
    Ping,
    History {
        before: Option<Offset>,
        limit: usize,
        reference: Option<String>,
        room: Option<RoomName>,
    },
    /// Join a room on this connection: its welcome carries `reference`.
    Subscribe {
        room: RoomName,
        resume: Option<(Offset, Epoch)>,
        history: usize,
        reference: Option<String>,
    },
    Unsubscribe {
        room: RoomName,
        reference: Option<String>,
    },
}

impl Request {
    /// The `ref` the client gave, for the answer to carry.
    pub fn reference(&self) -> Option<&str> {
        match self {
            Self::Message { reference, .. }
            | Self::History { reference, .. }
            | Self::Subscribe { reference, .. }
            | Self::Unsubscribe { reference, .. } => reference.as_deref(),
            Self::Typing { .. } | Self::Presence { .. } | Self::Ping => None,
        }
    }

    /// The room the frame is about, when it names one.
    pub fn room(&self) -> Option<&RoomName> {
        match self {
            Self::Message { room, .. }
            | Self::Typing { room }
            | Self::Presence { room }
            | Self::History { room, .. } => room.as_ref(),
            Self::Subscribe { room, .. } | Self::Unsubscribe { room, .. } => Some(room),
            Self::Ping => None,
        }
    }
}

/// The `code` of an `error` frame (and of the HTTP refusals that share its meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    TooLong,
    RateLimited,
    Forbidden,
    Unavailable,
    /// A `subscribe` over `limits.rooms_per_connection` (or the address's `rooms_per_ip`).
    TooManyRooms,
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
            Self::TooManyRooms => "too_many_rooms",
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
    /// The room the frame named, when it names a valid one.
    pub room: Option<RoomName>,
}

impl Rejection {
    fn bad(message: impl Into<String>, reference: Option<String>) -> Self {
        Self {
            code: ErrorCode::BadRequest,
            message: message.into(),
            reference,
            room: None,
        }
    }

    fn about(mut self, room: &Option<RoomName>) -> Self {
        self.room = room.clone();
        self
    }
}

/// A room a frame names: `None` when it names none, a refusal when the name is not one.
fn named_room(
    room: Option<String>,
    reference: &Option<String>,
) -> Result<Option<RoomName>, Rejection> {
    room.map(|r| {
        RoomName::parse(&r).map_err(|e| Rejection::bad(format!("room name {e}"), reference.clone()))
    })
    .transpose()
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
            room: None,
        });
    }
    let wire: WireFrame = serde_json::from_str(frame).map_err(|e| {
        // Try to find the ref (and room) even in a frame we cannot use, so the client can
        // match the error.
        let value = serde_json::from_str::<serde_json::Value>(frame).ok();
        let field = |name: &str| value.as_ref()?.get(name)?.as_str().map(str::to_owned);
        let room = field("room").and_then(|r| RoomName::parse(&r).ok());
        Rejection::bad(describe_json_error(&e), field("ref")).about(&room)
    })?;
    match wire {
        WireFrame::Message {
            text,
            reference,
            room,
        } => {
            check_ref(&reference)?;
            let room = named_room(room, &reference)?;
            check_text(&text, max_message_chars, &reference).map_err(|r| r.about(&room))?;
            Ok(Request::Message {
                text,
                reference,
                room,
            })
        }
        WireFrame::Typing { room } => Ok(Request::Typing {
            room: named_room(room, &None)?,
        }),
        WireFrame::Presence { room } => Ok(Request::Presence {
            room: named_room(room, &None)?,
        }),
        WireFrame::Ping => Ok(Request::Ping),
        WireFrame::History {
            before,
            limit,
            reference,
            room,
        } => {
            check_ref(&reference)?;
            let room = named_room(room, &reference)?;
            let limit = match check_page(before, limit) {
                Ok(limit) => limit,
                Err(message) => return Err(Rejection::bad(message, reference).about(&room)),
            };
            Ok(Request::History {
                before,
                limit,
                reference,
                room,
            })
        }
        WireFrame::Subscribe {
            room,
            since,
            epoch,
            history,
            reference,
        } => {
            check_ref(&reference)?;
            let room = RoomName::parse(&room)
                .map_err(|e| Rejection::bad(format!("room name {e}"), reference.clone()))?;
            let named = Some(room.clone());
            // As in the URL query of `/ws/{room}` (docs/PROTOCOL.md §3).
            let resume = match (since, epoch) {
                (None, None) => None,
                (Some(since), Some(epoch)) if !epoch.is_empty() && since <= MAX_OFFSET => {
                    Some((since, Epoch::from_string(&epoch)))
                }
                (Some(_), Some(epoch)) if !epoch.is_empty() => {
                    let message = format!("since must be 0 to {MAX_OFFSET}");
                    return Err(Rejection::bad(message, reference).about(&named));
                }
                _ => {
                    let message = "since and epoch go together";
                    return Err(Rejection::bad(message, reference).about(&named));
                }
            };
            Ok(Request::Subscribe {
                room,
                resume,
                history: history.unwrap_or(0).min(MAX_HISTORY_LIMIT),
                reference,
            })
        }
        WireFrame::Unsubscribe { room, reference } => {
            check_ref(&reference)?;
            let room = RoomName::parse(&room)
                .map_err(|e| Rejection::bad(format!("room name {e}"), reference.clone()))?;
            Ok(Request::Unsubscribe { room, reference })
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
        "unknown frame type (expected message, typing, presence, ping, history, subscribe or unsubscribe)".to_owned()
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
            room: None,
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
            room: None,
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
        /// The `ref` of the `subscribe` it answers.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
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
    /// A subscription ended: the client asked (`reference`), or the server ended it
    /// (`code` and `reason`, docs/PROTOCOL.md §4).
    Unsubscribed {
        room: &'a RoomName,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
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
                reference: None,
                room: None
            })
        );
    }

    #[test]
    fn json_message_keeps_its_ref() {
        assert_eq!(
            parse(r#"{"type":"message","text":"hi","ref":"c1"}"#),
            Ok(Request::Message {
                text: "hi".into(),
                reference: Some("c1".into()),
                room: None
            })
        );
    }

    #[test]
    fn unit_frames_parse() {
        assert_eq!(
            parse(r#"{"type":"typing"}"#),
            Ok(Request::Typing { room: None })
        );
        assert_eq!(
            parse(r#"{"type":"presence"}"#),
            Ok(Request::Presence { room: None })
        );
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
    fn room_frames_name_their_room_and_a_bad_name_is_refused_with_the_ref() {
        let lobby = RoomName::parse("lobby").unwrap();
        assert_eq!(
            parse(r#"{"type":"message","text":"hi","room":"lobby"}"#),
            Ok(Request::Message {
                text: "hi".into(),
                reference: None,
                room: Some(lobby.clone())
            })
        );
        assert_eq!(
            parse(r#"{"type":"typing","room":"lobby"}"#),
            Ok(Request::Typing {
                room: Some(lobby.clone())
            })
        );
        let bad = parse(r#"{"type":"message","text":"hi","room":"no such","ref":"c"}"#);
        let bad = bad.unwrap_err();
        assert_eq!(
            (bad.code, bad.reference.as_deref()),
            (ErrorCode::BadRequest, Some("c"))
        );
        let long = parse(r#"{"type":"message","text":"far too long a text","room":"lobby"}"#);
        assert_eq!(
            long.unwrap_err().room,
            Some(lobby),
            "the error names the room"
        );
    }

    #[test]
    fn subscribe_takes_a_resume_and_a_capped_history_and_unsubscribe_a_room() {
        let lobby = RoomName::parse("lobby").unwrap();
        assert_eq!(
            parse(
                r#"{"type":"subscribe","room":"lobby","since":4,"epoch":"e","history":500,"ref":"s1"}"#
            ),
            Ok(Request::Subscribe {
                room: lobby.clone(),
                resume: Some((4, Epoch::from_string("e"))),
                history: MAX_HISTORY_LIMIT,
                reference: Some("s1".into())
            })
        );
        let alone = parse(r#"{"type":"subscribe","room":"lobby","since":4,"ref":"s2"}"#);
        let alone = alone.unwrap_err();
        assert_eq!(
            (alone.reference.as_deref(), alone.room),
            (Some("s2"), Some(lobby.clone())),
            "since without epoch"
        );
        let bad = parse(r#"{"type":"subscribe","room":"-x","ref":"s3"}"#).unwrap_err();
        assert_eq!(
            (bad.code, bad.reference.as_deref()),
            (ErrorCode::BadRequest, Some("s3"))
        );
        assert_eq!(
            parse(r#"{"type":"unsubscribe","room":"lobby"}"#),
            Ok(Request::Unsubscribe {
                room: lobby,
                reference: None
            })
        );
    }

    #[test]
    fn history_limit_defaults_and_is_bounded() {
        assert_eq!(
            parse(r#"{"type":"history"}"#),
            Ok(Request::History {
                before: None,
                limit: DEFAULT_HISTORY_LIMIT,
                reference: None,
                room: None
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
            reference: None,
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
