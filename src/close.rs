//! Every close the server sends, in one enum: the variant says why, [`Close::code`] and
//! [`Close::reason`] are the one table of codes and reason texts (docs/PROTOCOL.md §8).
//!
//! Sites choose a variant, never a number, so a code or reason can only change here, and a
//! test checks the table against the protocol document. Clients and tests read the reasons:
//! they must stay byte-for-byte what §8 says. Plain code, no actix: the sequencer and the
//! member inbox carry a `Close`; the socket turns it into a close frame.

use std::fmt;

use crate::wsframe::Fail;

/// Why the server closes a WebSocket session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The peer broke RFC 6455 (1002, 1007, 1009): found by the message assembler.
    Frame(Fail),
    /// A binary message: the chat protocol is text only.
    Binary,
    /// Rate-limited more than `limits.max_violations` times.
    Flooding,
    /// Over the frames or bytes a session may send before its welcome.
    TooEarly,
    /// The token's `exp` (plus leeway) passed.
    TokenExpired,
    /// Nothing heard from the client for `websocket.client_timeout_secs`.
    NoPong,
    /// The replica is draining.
    ShuttingDown,
    /// The bus failed while the session was set up; no welcome was sent.
    BusUnavailable,
    /// The session's outbound queue is full.
    SlowConsumer,
    /// Messages the session was not sent are no longer in history.
    MissedHistory,
}

impl Close {
    /// The close code on the wire.
    pub fn code(self) -> u16 {
        match self {
            Self::Frame(Fail::ReservedBits | Fail::ContinuationWithoutStart | Fail::Protocol) => {
                1002
            }
            Self::Frame(Fail::InvalidUtf8) => 1007,
            Self::Frame(Fail::TooBig) => 1009,
            Self::Binary => 1003,
            Self::Flooding | Self::TooEarly => 1008,
            Self::TokenExpired => 4001,
            Self::NoPong | Self::ShuttingDown => 1001,
            Self::BusUnavailable => 1013,
            Self::SlowConsumer | Self::MissedHistory => 4008,
        }
    }

    /// Whether this is about one room rather than the connection: on a connection with
    /// several rooms it ends only that room's subscription (`unsubscribed` with this code and
    /// reason, docs/PROTOCOL.md §4), and the other rooms go on.
    pub fn ends_subscription(self) -> bool {
        matches!(self, Self::MissedHistory | Self::BusUnavailable)
    }

    /// The close frame's reason text.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Frame(Fail::ReservedBits) => "reserved bits set",
            Self::Frame(Fail::ContinuationWithoutStart) => "continuation without a start",
            Self::Frame(Fail::Protocol) => "protocol error",
            Self::Frame(Fail::InvalidUtf8) => "invalid UTF-8 in text message",
            Self::Frame(Fail::TooBig) => "message too big",
            Self::Binary => "binary frames are not supported",
            Self::Flooding => "rate limit exceeded too often",
            Self::TooEarly => "too many frames before the welcome",
            Self::TokenExpired => "token expired",
            Self::NoPong => "no pong within the client timeout",
            Self::ShuttingDown => "server shutting down",
            Self::BusUnavailable => "message bus unavailable; try again",
            Self::SlowConsumer => "slow consumer: resume to catch up",
            Self::MissedHistory => "missed messages are no longer in history: resume to catch up",
        }
    }
}

impl From<Fail> for Close {
    fn from(fail: Fail) -> Self {
        Self::Frame(fail)
    }
}

/// `4008: slow consumer: resume to catch up`, as log lines (`closed with …`) show it.
impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant; the match makes a new variant fail to compile until it is listed.
    fn all() -> Vec<Close> {
        let every = [
            Close::Frame(Fail::ReservedBits),
            Close::Frame(Fail::ContinuationWithoutStart),
            Close::Frame(Fail::Protocol),
            Close::Frame(Fail::InvalidUtf8),
            Close::Frame(Fail::TooBig),
            Close::Binary,
            Close::Flooding,
            Close::TooEarly,
            Close::TokenExpired,
            Close::NoPong,
            Close::ShuttingDown,
            Close::BusUnavailable,
            Close::SlowConsumer,
            Close::MissedHistory,
        ];
        for close in every {
            match close {
                Close::Frame(
                    Fail::ReservedBits
                    | Fail::ContinuationWithoutStart
                    | Fail::Protocol
                    | Fail::InvalidUtf8
                    | Fail::TooBig,
                )
                | Close::Binary
                | Close::Flooding
                | Close::TooEarly
                | Close::TokenExpired
                | Close::NoPong
                | Close::ShuttingDown
                | Close::BusUnavailable
                | Close::SlowConsumer
                | Close::MissedHistory => {}
            }
        }
        every.to_vec()
    }

    /// (code, reason) pairs of docs/PROTOCOL.md §8's table: the backticked texts of its
    /// "reason text" column.
    fn documented() -> Vec<(u16, String)> {
        let doc = include_str!("../docs/PROTOCOL.md");
        let start = doc.find("## 8. Close codes").expect("§8 in PROTOCOL.md");
        let section = &doc[start..];
        let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
        let mut pairs = Vec::new();
        for row in section[..end].lines().filter(|l| l.starts_with("| ")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let Ok(code) = cells[0].trim_start_matches("| ").trim().parse::<u16>() else {
                continue;
            };
            let reasons = cells.get(2).copied().unwrap_or_default();
            for (i, text) in reasons.split('`').enumerate() {
                if i % 2 == 1 {
                    pairs.push((code, text.to_owned()));
                }
            }
        }
        pairs
    }

    #[test]
    fn every_close_the_server_sends_is_documented_with_its_code_and_exact_reason() {
        let documented = documented();
        for close in all() {
            let pair = (close.code(), close.reason().to_owned());
            assert!(
                documented.contains(&pair),
                "{close:?} sends {pair:?}, not in PROTOCOL.md §8: {documented:?}"
            );
        }
    }

    #[test]
    fn every_documented_close_is_one_the_server_can_send() {
        let sent: Vec<(u16, String)> = all()
            .into_iter()
            .map(|c| (c.code(), c.reason().to_owned()))
            .collect();
        let documented = documented();
        assert!(documented.len() >= 14, "§8 parsed: {documented:?}");
        for pair in documented {
            assert!(sent.contains(&pair), "{pair:?} has no variant");
        }
    }

    #[test]
    fn a_close_shows_in_logs_as_its_code_then_its_reason() {
        assert_eq!(
            Close::SlowConsumer.to_string(),
            "4008: slow consumer: resume to catch up"
        );
    }
}
