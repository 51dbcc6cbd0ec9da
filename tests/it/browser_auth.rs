//! The built-in page against a server that requires tokens (docs/PROTOCOL.md §3): it asks for one,
//! sends it as the `token.<jwt>` subprotocol, shows the token's display name, and asks again
//! when a token is refused or expires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use crate::harness::Server;
use crate::webdriver::{has_message, Driver};

const SECRET: &str = "browser-test-secret-0123456789abcdef";

fn token(sub: &str, name: &str, ttl_secs: u64) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + ttl_secs;
    jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": sub, "name": name, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn the_page_asks_for_a_token_uses_it_and_asks_again_when_it_expires() {
    let server = Server::start(&[("CONFAB_AUTH__JWT_SECRET", SECRET)]);
    let driver = Driver::start().await;
    let page = driver.browser("auth").await;
    page.goto(&format!("http://{}/#lobby", server.addr)).await;
    page.wait_for(
        "return !document.getElementById('token-field').hidden",
        "the token field shows when the server needs one",
    )
    .await;

    // A token signed with another secret is refused before the upgrade: the page stops and asks.
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": "mallory", "exp": 4_000_000_000u64}),
        &EncodingKey::from_secret(b"not-the-secret-at-all-0123456789"),
    )
    .unwrap();
    page.fill("#token", &forged).await;
    page.click("#join").await;
    page.wait_for(
        "return document.getElementById('status').textContent.includes('enter a new one')",
        "a refused token is reported",
    )
    .await;

    // A good token that expires soon: the page joins as its user and shows its name.
    page.fill("#token", &token("alice", "Alice Liddell", 2))
        .await;
    page.click("#join").await;
    page.wait_connected(Duration::from_secs(20)).await;
    page.send("signed in").await;
    page.wait_for(&has_message("signed in"), "the message is stored")
        .await;
    let shown = page.messages().await.join("\n");
    assert!(
        shown.contains("Alice Liddell"),
        "display name shown: {shown}"
    );

    // Expiry (exp + 5 s leeway) closes with 4001: the page asks for a new token.
    page.wait_for_within(
        Duration::from_secs(30),
        "return document.getElementById('status').textContent.includes('token expired')",
        "the page says the token expired",
    )
    .await;
    // A fresh token resumes in the same room, with the earlier message still there once.
    page.fill("#token", &token("alice", "Alice Liddell", 600))
        .await;
    page.click("#join").await;
    page.wait_connected(Duration::from_secs(20)).await;
    page.send("back again").await;
    page.wait_for(&has_message("back again"), "sent after renewing")
        .await;
    let texts = page.stored_texts().await;
    assert_eq!(
        texts,
        vec!["signed in", "back again"],
        "once each, in order"
    );
    page.quit().await;
}
