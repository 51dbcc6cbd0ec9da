//! The built-in page in a real browser: two headless Chromium windows chat through it.
//! Driven over the W3C WebDriver protocol by ChromeDriver (Debian's chromium-driver, which
//! scripts/test.sh installs); a machine without it fails this test, it never skips.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{request, Server};

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    child: Child,
    addr: SocketAddr,
    profiles: PathBuf,
}

impl Driver {
    async fn start() -> Driver {
        let binary = ["chromedriver", "/usr/bin/chromedriver"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("chromedriver not found: install chromium and chromium-driver (scripts/test.sh does)");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let profiles =
            std::env::temp_dir().join(format!("confab-browser-{}-{port}", std::process::id()));
        let driver = Driver {
            child,
            addr,
            profiles,
        };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                let status = request(addr, "GET", "/status", &[], "").await;
                if status.json()["value"]["ready"] == true {
                    return driver;
                }
            }
            assert!(Instant::now() < end, "chromedriver did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn browser(&self, name: &str) -> Browser {
        let profile = self.profiles.join(name);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                // The flags that keep Chromium off the network and quiet as root in a sandbox.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let reply = request(self.addr, "POST", "/session", &[], &caps.to_string()).await;
        let v = reply.json();
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_owned();
        Browser {
            addr: self.addr,
            id,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profiles);
    }
}

struct Browser {
    addr: SocketAddr,
    id: String,
}

impl Browser {
    async fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.id);
        let body = if method == "GET" {
            String::new()
        } else {
            body.to_string()
        };
        let reply = request(self.addr, method, &path, &[], &body).await;
        let v = reply.json();
        assert_eq!(reply.status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({ "url": url })).await;
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_owned()
    }

    async fn fill(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.cmd("POST", &format!("/element/{e}/clear"), json!({}))
            .await;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), json!({}))
            .await;
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": js, "args": []}))
            .await
    }

    /// Polls a script until it returns true.
    async fn wait_for(&self, js: &str, what: &str) {
        let end = Instant::now() + Duration::from_secs(15);
        while self.script(js).await != json!(true) {
            assert!(Instant::now() < end, "{what}: not true within 15 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn messages(&self) -> Vec<String> {
        let v = self
            .script("return Array.from(document.querySelectorAll('#messages > *')).map(e => e.textContent)")
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn join(&self, base: &str, name: &str, room: &str) {
        self.goto(base).await;
        self.fill("#name", name).await;
        self.fill("#room", room).await;
        self.click("#join").await;
        self.wait_for(
            "return document.getElementById('status').textContent === 'connected'",
            "page connected",
        )
        .await;
    }

    async fn send(&self, text: &str) {
        self.fill("#message", text).await;
        self.click("#send").await;
    }

    async fn quit(self) {
        self.cmd("DELETE", "", json!({})).await;
    }
}

#[tokio::test]
async fn two_browser_windows_chat_through_the_built_in_page() {
    let server = Server::start(&[]);
    let driver = Driver::start().await;
    let base = format!("http://{}/", server.addr);
    let alice = driver.browser("alice").await;
    let bob = driver.browser("bob").await;
    alice.join(&base, "alice", "e2e").await;
    bob.join(&base, "bob", "e2e").await;

    alice.send("hello from alice").await;
    bob.wait_for(
        "return Array.from(document.querySelectorAll('#messages > *')).some(e => e.textContent.includes('hello from alice'))",
        "bob sees alice's message",
    )
    .await;

    // Markup in a message is shown as text, never parsed.
    bob.send("<b>bold</b><img src=x onerror=alert(1)>").await;
    alice
        .wait_for(
            "return Array.from(document.querySelectorAll('#messages > *')).some(e => e.textContent.includes('<b>bold</b>'))",
            "alice sees bob's message as text",
        )
        .await;
    assert_eq!(
        alice
            .script("return document.querySelector('#messages b, #messages img') === null")
            .await,
        json!(true)
    );

    // Each message is exactly one child of #messages, once, in both windows.
    for browser in [&alice, &bob] {
        let texts = browser.messages().await;
        assert_eq!(texts.len(), 2, "{texts:?}");
        assert_eq!(
            texts
                .iter()
                .filter(|t| t.contains("hello from alice"))
                .count(),
            1
        );
    }
    alice.quit().await;
    bob.quit().await;
}
