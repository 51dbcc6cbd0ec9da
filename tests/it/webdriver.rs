//! Headless Chromium driven over the W3C WebDriver protocol by ChromeDriver (Debian's
//! chromium-driver, which scripts/test.sh installs). A machine without them fails the browser
//! tests; they never skip.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::request;

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// WebDriver's key code for Enter.
pub const ENTER: &str = "\u{E007}";
/// How long a page may take to show what a test waits for, unless the test says otherwise.
pub const PAGE_DEADLINE: Duration = Duration::from_secs(15);

pub struct Driver {
    child: Child,
    addr: SocketAddr,
    /// Browser profiles, removed when the driver is dropped (after Chromium is killed).
    profiles: tempfile::TempDir,
}

impl Driver {
    pub async fn start() -> Driver {
        let binary = ["chromedriver", "/usr/bin/chromedriver"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("chromedriver not found: install chromium and chromium-driver (scripts/test.sh does)");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own process group, which the browsers it starts join: dropping the driver ends
        // them all, also when a test panics before quitting its browsers.
        let child = Command::new(binary)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let profiles = tempfile::Builder::new()
            .prefix("confab-browser-")
            .tempdir()
            .unwrap();
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

    /// A new browser window with its own profile (its own localStorage).
    pub async fn browser(&self, name: &str) -> Browser {
        let profile = self.profiles.path().join(name);
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
        // SAFETY: signalling the process group of our own child (its pid is the group id).
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

pub struct Browser {
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

    pub async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({ "url": url })).await;
    }

    /// Resizes the window, e.g. to a phone's width.
    pub async fn resize(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            json!({"width": width, "height": height}),
        )
        .await;
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

    /// Types into an element as a user would (key events, so `input` handlers run).
    pub async fn keys(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.cmd("POST", &format!("/element/{e}/clear"), json!({}))
            .await;
        self.keys(css, text).await;
    }

    pub async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), json!({}))
            .await;
    }

    pub async fn script(&self, js: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": js, "args": []}))
            .await
    }

    /// Polls a script until it returns true.
    pub async fn wait_for(&self, js: &str, what: &str) {
        self.wait_for_within(PAGE_DEADLINE, js, what).await;
    }

    pub async fn wait_for_within(&self, within: Duration, js: &str, what: &str) {
        let end = Instant::now() + within;
        while self.script(js).await != json!(true) {
            assert!(
                Instant::now() < end,
                "{what}: not true within {within:?}; status: {}, events: {}",
                self.script("return document.getElementById('status').textContent")
                    .await,
                self.script("return document.getElementById('events').textContent")
                    .await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the connection badge says `connected`.
    pub async fn wait_connected(&self, within: Duration) {
        self.wait_for_within(
            within,
            "return document.getElementById('status').textContent === 'connected'",
            "page connected",
        )
        .await;
    }

    /// The text of each child of `#messages` (a message, with its time and user).
    pub async fn messages(&self) -> Vec<String> {
        self.strings(
            "return Array.from(document.querySelectorAll('#messages > *')).map(e => e.textContent)",
        )
        .await
    }

    /// The message texts of `#messages`, stored ones only (not those still sending).
    pub async fn stored_texts(&self) -> Vec<String> {
        self.strings(
            "return Array.from(document.querySelectorAll('#messages > [data-offset]'))
                 .map(e => e.querySelector('.text').textContent)",
        )
        .await
    }

    async fn strings(&self, js: &str) -> Vec<String> {
        let v = self.script(js).await;
        v.as_array()
            .unwrap_or_else(|| panic!("not an array: {v}"))
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_owned())
            .collect()
    }

    pub async fn join(&self, base: &str, name: &str, room: &str) {
        self.goto(base).await;
        self.fill("#name", name).await;
        self.fill("#room", room).await;
        self.click("#join").await;
        self.wait_connected(PAGE_DEADLINE).await;
    }

    /// Types a message and presses Enter, as a keyboard user does.
    pub async fn send(&self, text: &str) {
        self.fill("#message", text).await;
        self.keys("#message", ENTER).await;
    }

    /// Writes a PNG of the window to `path`, creating its folder.
    pub async fn screenshot(&self, path: &std::path::Path) {
        let v = self.cmd("GET", "/screenshot", json!({})).await;
        let png = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("screenshot is base64"))
                .expect("screenshot is base64")
        };
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    pub async fn quit(self) {
        self.cmd("DELETE", "", json!({})).await;
    }
}

/// A script: whether a stored message with exactly this text is on the page.
pub fn has_message(text: &str) -> String {
    format!(
        "return Array.from(document.querySelectorAll('#messages > [data-offset] .text'))
             .some(e => e.textContent === {})",
        json!(text)
    )
}

/// A script: whether the badge says the page is offline and waiting to reconnect.
pub const OFFLINE: &str =
    "return document.getElementById('status').textContent.startsWith('offline, reconnecting in')";

/// A script: whether none of our messages is still sending or refused.
pub const NOTHING_SENDING: &str =
    "return document.querySelectorAll('#messages > .pending, #messages > .failed').length === 0";

/// Where a test run writes what people look at: `<target dir>/screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let target = if target.is_absolute() {
        target
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(target)
    };
    target.join("screenshots")
}

/// The room list of the page (`#rooms`, SPEC §3).
impl Browser {
    /// Joins one more room on the page's connection (fills `#room`, clicks `#join`) and waits
    /// until the server welcomed it.
    pub async fn add_room(&self, room: &str) {
        self.fill("#room", room).await;
        self.click("#join").await;
        self.wait_for(&room_joined(room), &format!("#{room} joined"))
            .await;
    }

    /// Clicks a room in the list, which shows it.
    pub async fn show_room(&self, room: &str) {
        self.click(&format!("#rooms > [data-room=\"{room}\"]"))
            .await;
        self.wait_for(
            &format!(
                "return document.querySelector('#rooms > .shown')?.dataset.room === {}",
                json!(room)
            ),
            &format!("#{room} shown"),
        )
        .await;
    }

    /// The rooms in the list, in order, each with its unread count (None: no `.unread`).
    pub async fn rooms(&self) -> Vec<(String, Option<String>)> {
        let v = self
            .script(
                "return Array.from(document.querySelectorAll('#rooms > [data-room]')).map(e =>
                   [e.dataset.room, e.querySelector('.unread')?.textContent ?? null])",
            )
            .await;
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"))
    }
}

impl Browser {
    /// Runs an async script: its last argument (`arguments[arguments.length - 1]`) is the
    /// callback that returns its value. Bounded by WebDriver's script timeout (30 s).
    pub async fn script_async(&self, js: &str) -> Value {
        self.cmd("POST", "/execute/async", json!({"script": js, "args": []}))
            .await
    }
}

/// A script: whether the page holds `room` on its connection, welcomed.
pub fn room_joined(room: &str) -> String {
    format!(
        "return document.querySelector('#rooms > [data-room={}]')?.dataset.state === 'joined'",
        json!(room)
    )
}

/// A script: whether every room in the list is welcomed on the current connection.
pub const ALL_ROOMS_JOINED: &str = "const r = document.querySelectorAll('#rooms > [data-room]');
     return r.length > 0 && Array.from(r).every(e => e.dataset.state === 'joined')
       && document.getElementById('status').textContent === 'connected'";
