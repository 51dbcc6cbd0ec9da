//! Process-level behaviour: health, the page, settings errors, Origin policy, drain.

use std::time::Duration;

use crate::harness::{eventually, run_confab, Ending, Server, DEADLINE};

#[tokio::test]
async fn health_and_readiness_answer_200_when_running() {
    let server = Server::start(&[]);
    let h = server.http("GET", "/healthz", &[]).await;
    assert_eq!(h.status, 200);
    let r = server.http("GET", "/readyz", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ready"], true);
}

#[tokio::test]
async fn the_page_has_the_elements_browser_tests_use() {
    let server = Server::start(&[]);
    let page = server.http("GET", "/", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page
        .head
        .to_ascii_lowercase()
        .contains("content-type: text/html"));
    for id in [
        "name", "room", "join", "message", "send", "messages", "status",
    ] {
        assert!(page.body.contains(&format!("id=\"{id}\"")), "missing #{id}");
    }
    // Script and style are files of this server: nothing inline, nothing from elsewhere.
    assert!(page.body.contains(r#"<script src="/app.js""#));
    assert!(page
        .body
        .contains(r#"<link rel="stylesheet" href="/app.css">"#));
    assert!(!page.body.contains("<script>") && !page.body.contains("<style"));
    assert!(!page.body.contains("//cdn") && !page.body.contains("https://"));
    let script = server.http("GET", "/app.js", &[]).await;
    assert_eq!(script.status, 200);
    assert!(header(&script.head, "content-type").starts_with("text/javascript"));
    assert!(
        !script.body.contains("innerHTML"),
        "text is rendered as text"
    );
    let style = server.http("GET", "/app.css", &[]).await;
    assert_eq!(style.status, 200);
    assert!(header(&style.head, "content-type").starts_with("text/css"));
}

#[tokio::test]
async fn the_page_is_served_with_a_policy_that_forbids_inline_code() {
    let server = Server::start(&[]);
    for path in ["/", "/app.js", "/app.css"] {
        let reply = server.http("GET", path, &[]).await;
        let csp = header(&reply.head, "content-security-policy");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-eval"), "{path}: {csp}");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(
                csp.contains(directive),
                "{path}: {directive} missing in {csp}"
            );
        }
        assert_eq!(header(&reply.head, "x-content-type-options"), "nosniff");
    }
}

/// The value of a response header (case-insensitive name), or "" when absent.
fn header(head: &str, name: &str) -> String {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_echo_endpoint_is_off_unless_enabled() {
    let server = Server::start(&[]);
    assert_eq!(server.refused_status("/echo").await, 404);
    let echo = Server::start(&[("CONFAB_WEBSOCKET__ECHO_ENDPOINT", "true")]);
    let mut c = echo.connect("/echo").await;
    c.send_text("{\"not\":\"parsed\"}").await;
    assert_eq!(c.next().await["not"], "parsed");
}

#[test]
fn bad_settings_stop_start_up_naming_the_key() {
    let out = run_confab(
        &["--listen", "127.0.0.1:0"],
        &[("CONFAB_LIMITS__BURTS", "3")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.burts"), "{err}");

    let out = run_confab(
        &["--listen", "127.0.0.1:0"],
        &[("CONFAB_HISTORY__SIZE", "many")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("history.size"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[websocket]\nping_interval = 5\n").unwrap();
    let out = run_confab(&["serve", "--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("websocket.ping_interval"));
}

#[test]
fn config_prints_the_effective_settings() {
    let out = run_confab(
        &["config", "--listen", "127.0.0.1:9999"],
        &[("CONFAB_HISTORY__SIZE", "7")],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:9999\""), "{text}");
    assert!(text.contains("size = 7"), "{text}");
}

#[test]
fn help_explains_the_settings_layers() {
    let out = run_confab(&["--help"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CONFAB_<SECTION>__<KEY>") && text.contains("--config"),
        "{text}"
    );
}

#[tokio::test]
async fn origins_outside_the_allowed_list_are_refused_with_403() {
    let server = Server::start(&[("CONFAB_SERVER__ALLOWED_ORIGINS", "https://chat.example")]);
    let evil = server
        .http(
            "GET",
            "/ws/lobby",
            &ws_headers(Some("https://evil.example")),
        )
        .await;
    assert_eq!(evil.status, 403);
    let good = server
        .http(
            "GET",
            "/ws/lobby",
            &ws_headers(Some("https://chat.example")),
        )
        .await;
    assert_eq!(good.status, 101);
    let tool = server.http("GET", "/ws/lobby", &ws_headers(None)).await;
    assert_eq!(tool.status, 101, "no Origin: not a browser, not refused");
}

fn ws_headers(origin: Option<&'static str>) -> Vec<(&'static str, &'static str)> {
    let mut h = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    if let Some(o) = origin {
        h.push(("Origin", o));
    }
    h
}

#[tokio::test]
async fn sigterm_drains_sessions_with_1001_and_exits_0() {
    let mut server = Server::start(&[("CONFAB_SERVER__SHUTDOWN_GRACE_SECS", "3")]);
    let (mut a, _) = server.join("/ws/lobby?user=alice").await;
    let (mut b, _) = server.join("/ws/other?user=bob").await;
    server.signal(libc::SIGTERM);
    let addr = server.addr;
    eventually(DEADLINE, "readyz turns 503", || async move {
        crate::harness::http(addr, "GET", "/readyz", &[])
            .await
            .status
            == 503
    })
    .await;
    let r = server.http("GET", "/readyz", &[]).await;
    assert_eq!(r.json()["reason"], "draining");
    let refused = server.http("GET", "/ws/lobby", &ws_headers(None)).await;
    assert_eq!(refused.status, 503, "no new sessions while draining");
    assert_eq!(a.ending(DEADLINE).await.0, Ending::Closed(1001));
    assert_eq!(b.ending(DEADLINE).await.0, Ending::Closed(1001));
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_websocket_path_gets_the_same_refusal_with_and_without_an_upgrade() {
    let server = Server::start(&[]);
    for (path, status, code) in [
        ("/ws/-bad", 400, "bad_request"),
        ("/ws/ok?since=3", 400, "bad_request"),
        ("/echo", 404, "not_found"),
    ] {
        let upgrade = server.http("GET", path, &ws_headers(None)).await;
        let plain = server.http("GET", path, &[]).await;
        assert_eq!(upgrade.status, status, "{path}: {}", upgrade.body);
        assert_eq!(upgrade.json()["error"]["code"], code, "{path}");
        assert_eq!(
            (plain.status, plain.json()),
            (upgrade.status, upgrade.json()),
            "{path}"
        );
    }
    // Only an upgrade reaches the WebSocket parser here; the router answers a plain request.
    let nowhere = server.http("GET", "/ws/a/b", &ws_headers(None)).await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.json()["error"]["code"], "not_found");
}
