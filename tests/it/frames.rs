//! Bad input and RFC 6455 handling: errors keep the connection, violations close it with the
//! code RFC 6455 names, fragmented messages are reassembled.

use serde_json::json;

use crate::harness::{Client, Ending, Server, DEADLINE};

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_stays_open() {
    let server = Server::start(&[("CONFAB_LIMITS__MAX_MESSAGE_CHARS", "10")]);
    let (mut c, _) = server.join("/ws/lobby?user=alice").await;
    let cases = [
        (r#"{"type":"message","#.to_owned(), "bad_request", None),
        (
            r#"{"type":"shout","ref":"s1"}"#.to_owned(),
            "bad_request",
            Some("s1"),
        ),
        (
            r#"{"type":"message","text":"   ","ref":"e1"}"#.to_owned(),
            "bad_request",
            Some("e1"),
        ),
        ("   ".to_owned(), "bad_request", None),
        (
            r#"{"type":"message","text":"this is far too long","ref":"l1"}"#.to_owned(),
            "too_long",
            Some("l1"),
        ),
        ("ŵŵŵŵŵŵŵŵŵŵŵ".to_owned(), "too_long", None),
        (
            json!({"type":"message","text":"hi","ref":"r".repeat(65)}).to_string(),
            "bad_request",
            None,
        ),
        (
            r#"{"type":"history","limit":500,"ref":"h"}"#.to_owned(),
            "bad_request",
            Some("h"),
        ),
        (r#"{"text":"no type"}"#.to_owned(), "bad_request", None),
    ];
    for (frame, code, reference) in cases {
        c.send_text(&frame).await;
        let e = c.next_of("error").await;
        assert_eq!(e["code"], code, "for {frame}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        match reference {
            Some(r) => assert_eq!(e["ref"], r, "for {frame}"),
            None => assert!(
                e.get("ref").is_none() || e["ref"].is_null(),
                "for {frame}: {e}"
            ),
        }
    }
    // Nothing was published, and the session still works.
    assert_eq!(
        c.say("ŵŵŵŵŵŵŵŵŵŵ", "ok").await,
        1,
        "ten characters fit a ten-character limit"
    );
}

#[tokio::test]
async fn binary_frames_close_with_1003() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/lobby").await;
    c.send_binary(&[1, 2, 3]).await;
    assert_eq!(c.ending(DEADLINE).await.0, Ending::Closed(1003));
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let server = Server::start(&[("CONFAB_LIMITS__MAX_FRAME_BYTES", "2048")]);
    let (mut c, _) = server.join("/ws/lobby").await;
    c.send_text(&"x".repeat(3000)).await;
    assert_eq!(c.ending(DEADLINE).await.0, Ending::Closed(1009));
}

#[tokio::test]
async fn fragments_count_together_against_the_size_limit() {
    let server = Server::start(&[("CONFAB_LIMITS__MAX_FRAME_BYTES", "2048")]);
    let (mut c, _) = server.join("/ws/lobby").await;
    let chunk = vec![b'x'; 1500];
    c.send_frame(&chunk, Client::text_op(), false).await;
    c.send_frame(&chunk, Client::continue_op(), true).await;
    assert_eq!(c.ending(DEADLINE).await.0, Ending::Closed(1009));
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/lobby").await;
    let text = "héllo, fragmented wörld";
    let bytes = text.as_bytes();
    // Split inside the two-byte 'é' to prove UTF-8 is checked across fragments, not per frame.
    c.send_frame(&bytes[..2], Client::text_op(), false).await;
    c.send_frame(&bytes[2..10], Client::continue_op(), false)
        .await;
    c.send_frame(&bytes[10..], Client::continue_op(), true)
        .await;
    let m = c.next_of("message").await;
    assert_eq!(m["text"], text);
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/lobby").await;
    c.send_frame(&[b'o', b'k', 0xff, 0xfe], Client::text_op(), true)
        .await;
    assert_eq!(c.ending(DEADLINE).await.0, Ending::Closed(1007));
}

#[tokio::test]
async fn invalid_utf8_split_across_fragments_closes_with_1007() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/lobby").await;
    // 0xE2 0x82 starts '€'; 0x28 cannot continue it.
    c.send_frame(&[b'a', 0xe2], Client::text_op(), false).await;
    c.send_frame(&[0x82, 0x28], Client::continue_op(), true)
        .await;
    assert_eq!(c.ending(DEADLINE).await.0, Ending::Closed(1007));
}

#[tokio::test]
async fn a_continuation_without_a_start_closes_with_1002() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/lobby").await;
    c.send_frame(b"orphan", Client::continue_op(), true).await;
    assert_eq!(c.ending(DEADLINE).await.0, Ending::Closed(1002));
}

#[tokio::test]
async fn a_client_close_is_answered_with_its_code() {
    let server = Server::start(&[]);
    let (mut c, _) = server.join("/ws/lobby").await;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    c.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("close");
    assert_eq!(c.ending(DEADLINE).await.0, Ending::Closed(1000));
}

#[tokio::test]
async fn invalid_room_names_are_refused_before_the_upgrade() {
    let server = Server::start(&[]);
    for room in ["-x", "a%20b", &"r".repeat(65), "%C3%A9"] {
        assert_eq!(
            server.refused_status(&format!("/ws/{room}")).await,
            400,
            "room {room}"
        );
    }
    let reply = server.http("GET", "/ws/-bad", &[]).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "bad_request");
    assert_eq!(server.refused_status("/ws/ok?user=no%20spaces").await, 400);
    assert_eq!(
        server.refused_status("/ws/ok?since=3").await,
        400,
        "since needs epoch"
    );
    assert_eq!(server.refused_status("/ws/ok?history=lots").await, 400);
}

#[tokio::test]
async fn the_confab_subprotocol_is_answered() {
    let server = Server::start(&[]);
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = server.url("/ws/lobby").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "confab.v1, token.abc".parse().unwrap(),
    );
    let (_ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "confab.v1");
}

/// Reads from `s` until the bytes so far contain `needle` or the peer closes; all bytes read.
async fn read_until(s: &mut tokio::net::TcpStream, needle: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !got.windows(needle.len()).any(|w| w == needle) {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("an answer in time");
    got
}

#[tokio::test]
async fn a_frame_with_reserved_bits_closes_with_1002_and_says_why() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start(&[("CONFAB_WEBSOCKET__ECHO_ENDPOINT", "true")]);
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = "GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until(&mut s, b"\r\n\r\n").await;
    assert!(answer.starts_with(b"HTTP/1.1 101"), "{answer:?}");
    // A masked text frame "a" with RSV1 set (zero mask), no extension negotiated.
    s.write_all(&[0xC1, 0x81, 0, 0, 0, 0, b'a']).await.unwrap();
    let reason = b"reserved bits set";
    let close = read_until(&mut s, reason).await;
    let mut expected = vec![0x88, 2 + reason.len() as u8, 0x03, 0xEA];
    expected.extend_from_slice(reason);
    assert!(
        close.windows(expected.len()).any(|w| w == expected),
        "{close:?}"
    );
}
