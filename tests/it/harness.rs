//! Shared harness: runs the real `confab` binary on a free port and talks to it over real
//! sockets. Every receive has a deadline; a server that does not answer fails the test.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A WebSocket handshake's response.
pub type Handshake = tokio_tungstenite::tungstenite::handshake::client::Response;

/// How long any single expected frame may take.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A running `confab` process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    /// The thread reading the server's stderr into `log`: joined once the process exited, so
    /// the log then holds every line.
    reader: Option<std::thread::JoinHandle<()>>,
    /// The server's own SQLite store when the test named none (removed after the process).
    _store: Option<TempDir>,
}

impl Server {
    /// Starts the binary on 127.0.0.1:0 with these `CONFAB_…` variables.
    pub fn start(env: &[(&str, &str)]) -> Server {
        Self::start_with_files(env, None)
    }

    /// Starts the binary on `listen`: a fixed port, e.g. behind a proxy, or the address of a
    /// server that was killed, so its clients reconnect to the same place.
    pub fn start_on(listen: &str, env: &[(&str, &str)]) -> Server {
        Self::launch(listen, env, None)
    }

    /// Starts the server with its open-file limit (soft and hard) set to `files`, when given.
    pub fn start_with_files(env: &[(&str, &str)], files: Option<u64>) -> Server {
        Self::launch("127.0.0.1:0", env, files)
    }

    fn launch(listen: &str, env: &[(&str, &str)], files: Option<u64>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
        if let Some(files) = files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: files,
                        rlim_max: files,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd.args(["--listen", listen])
            .env("RUST_LOG", "info,actix_server=warn")
            .env("CONFAB_SERVER__NODE_ID", "test-node")
            .env("CONFAB_SERVER__WORKERS", "2")
            .env("CONFAB_SERVER__ROOM_THREADS", "2")
            // Every test client comes from 127.0.0.1: per-address limits are off unless a
            // test sets them (tests/it/admission.rs does).
            .env("CONFAB_LIMITS__MAX_CONNECTIONS_PER_IP", "0")
            .env("CONFAB_LIMITS__UPGRADES_PER_IP_PER_SEC", "0")
            .env("CONFAB_LIMITS__HANDSHAKES_PER_IP", "0")
            .env("CONFAB_LIMITS__MESSAGES_PER_SEC_PER_IP", "0")
            .env("CONFAB_LIMITS__MESSAGES_PER_SEC_PER_USER", "0")
            .env("CONFAB_LIMITS__ROOMS_PER_IP", "0")
            .env_remove("CONFAB_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // With the embedded bus the default store is data/confab.db under the working
        // directory: each server gets its own file instead, so tests start fresh and nothing
        // is written into the repository. A test that names a store (or Redis) keeps it.
        let store = (!env.iter().any(|(k, v)| {
            *k == "CONFAB_STORE__URL" || (*k == "CONFAB_REDIS__URL" && !v.is_empty())
        }))
        .then(|| TempDir::new("server"));
        cmd.env_remove("CONFAB_STORE__URL");
        if let Some(dir) = &store {
            cmd.env("CONFAB_STORE__URL", dir.sqlite_url());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn confab");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!("confab did not start:\n{}", log.lock().unwrap());
            }
        };
        Server {
            child: Some(child),
            addr,
            log,
            reader: Some(reader),
            _store: store,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Opens a session and returns it with its welcome frame (asserted to be first).
    pub async fn join(&self, path: &str) -> (Client, Value) {
        let mut client = self.connect(path).await;
        let welcome = client.next().await;
        assert_eq!(
            welcome["type"], "welcome",
            "first frame must be the welcome: {welcome}"
        );
        (client, welcome)
    }

    pub async fn connect(&self, path: &str) -> Client {
        let (ws, _) =
            tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(self.url(path)))
                .await
                .expect("connect in time")
                .unwrap_or_else(|e| panic!("connect {path}: {e}"));
        Client { ws }
    }

    /// Opens a session from source address `from` (e.g. 127.0.0.2; `None` = any) with extra
    /// request headers. Returns the client and the handshake response, or the status and body
    /// of a refusal.
    pub async fn open(
        &self,
        path: &str,
        from: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<(Client, Handshake), (u16, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut req = self.url(path).into_client_request().expect("request");
        for (k, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(from) = from {
            socket
                .bind(SocketAddr::new(from.parse().unwrap(), 0))
                .expect("bind source address");
        }
        let stream = tokio::time::timeout(DEADLINE, socket.connect(self.addr))
            .await
            .expect("connect in time")
            .expect("connect");
        let handshake = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream));
        match tokio::time::timeout(DEADLINE, handshake)
            .await
            .expect("handshake in time")
        {
            Ok((ws, resp)) => Ok((Client { ws }, resp)),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((resp.status().as_u16(), body))
            }
            Err(e) => panic!("unexpected error opening {path}: {e}"),
        }
    }

    /// The HTTP status a WebSocket upgrade to `path` is refused with.
    pub async fn refused_status(&self, path: &str) -> u16 {
        let attempt =
            tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(self.url(path)));
        match attempt.await.expect("an answer in time") {
            Ok(_) => panic!("upgrade to {path} should have been refused"),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("unexpected error for {path}: {e}"),
        }
    }

    /// A plain HTTP/1.1 request; returns status, headers and body.
    pub async fn http(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpReply {
        http(self.addr, method, path, headers).await
    }

    /// The value of an unlabelled sample on `/metrics`; panics when the server does not
    /// export it, so a renamed metric fails the test instead of reading as 0.
    pub async fn metric(&self, name: &str) -> f64 {
        let body = self.http("GET", "/metrics", &[]).await.body;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no sample {name} on /metrics:\n{body}"))
    }

    /// The log once it holds `needle` (its lines are read on a thread of their own, so a line
    /// written just before an event the test saw may not be in it yet); fails after DEADLINE.
    pub async fn wait_log(&self, needle: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < end, "no `{needle}` in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        // Never pid 0 (an exited server): kill(0, …) would signal the whole process group.
        let pid = self.pid();
        assert!(pid > 0, "the server is not running");
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let end = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                // Its stderr closed with it: the reader ends at once.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < end,
                "confab did not exit within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL: the process vanishes at once, its sockets with it, nothing drained.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(5));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
    }
}

/// Runs the confab binary to completion (a subcommand, or a start-up meant to be refused)
/// with only the given `CONFAB_*` settings; a run that has not ended within 30 s is killed
/// and fails the test, so a start-up that should have been refused cannot hang the suite.
pub fn run_confab(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_confab"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CONFAB_")) {
        cmd.env_remove(k);
    }
    // No store unless the test names one: a run must not leave data/confab.db behind.
    if !env.iter().any(|(k, _)| *k == "CONFAB_STORE__URL") {
        cmd.env("CONFAB_STORE__URL", "memory");
    }
    let child = cmd
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run confab");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("confab's output"),
        Err(_) => {
            // SAFETY: killing our own child, which has not been reaped (its waiter is blocked).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            panic!("confab {args:?} did not finish within 30 s");
        }
    }
}

/// A fresh directory under the system temp directory, removed with its contents on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n: u64 = rand::random();
        let path = std::env::temp_dir().join(format!("confab-it-{tag}-{n:016x}"));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    /// A SQLite store in this directory, as `store.url`.
    pub fn sqlite_url(&self) -> String {
        format!("sqlite:{}", self.path.join("confab.db").display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Stops a child process of ours: SIGTERM, up to 3 s to exit, then SIGKILL.
pub fn stop_child(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `count` messages (`{name}-{i}`, ref `{i}`) from `client` back to back, then reads
/// until every one is acked; an `error` frame or a lost socket fails the test.
pub fn burst_publisher(client: Client, name: String, count: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut tx, mut rx) = client.ws.split();
        for i in 0..count {
            let frame = serde_json::json!({"type": "message", "text": format!("{name}-{i}"), "ref": format!("{i}")});
            tx.send(Message::text(frame.to_string())).await.unwrap();
        }
        let mut acks = 0;
        while acks < count {
            match tokio::time::timeout(DEADLINE, rx.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert_ne!(v["type"], "error", "{name}: {v}");
                    acks += usize::from(v["type"] == "ack");
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("{name} lost its socket: {other:?}"),
            }
        }
    })
}

pub struct HttpReply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpReply {
    request(addr, method, path, headers, "").await
}

/// An HTTP/1.1 request with a body (sent as JSON when not empty).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpReply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        req.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            raw.extend_from_slice(&buf[..n]);
            if n == 0 || complete(&raw) {
                break;
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("HTTP reply in time");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    HttpReply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Whether `raw` holds a whole response: a 101's head (the connection then stays open), or a
/// head and `Content-Length` bytes of body. Otherwise the reader waits for the server to close.
fn complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    if head.starts_with("http/1.1 101") {
        return true;
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_some_and(|len| raw.len() >= end + 4 + len)
}

/// A WebSocket client speaking the confab protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended, as seen by the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    Closed(u16),
    ClosedWithoutCode,
    Dropped,
}

impl Client {
    /// Connects with a tiny receive buffer and returns before reading anything, for tests
    /// that need a client whose socket fills up quickly.
    pub async fn connect_small_window(url: &str) -> Client {
        let addr: SocketAddr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake");
        Client { ws }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends unless the connection is already gone (a server that closed it may reset it).
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        self.ws.send(Message::text(text)).await.is_ok()
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        self.ws
            .send(Message::Binary(data.to_vec()))
            .await
            .expect("send binary");
    }

    /// Sends one raw frame, for fragmentation and malformed-input tests.
    pub async fn send_frame(&mut self, data: &[u8], opcode: OpCode, fin: bool) {
        self.ws
            .send(Message::Frame(Frame::message(data.to_vec(), opcode, fin)))
            .await
            .expect("send frame");
    }

    pub fn text_op() -> OpCode {
        OpCode::Data(Data::Text)
    }

    pub fn continue_op() -> OpCode {
        OpCode::Data(Data::Continue)
    }

    /// The next JSON frame; control frames are skipped.
    pub async fn next(&mut self) -> Value {
        self.try_next(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("no frame within {DEADLINE:?}"))
    }

    /// The next JSON frame within `wait`, or `None`; panics if the connection ends.
    pub async fn try_next(&mut self, wait: Duration) -> Option<Value> {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let msg = match tokio::time::timeout_at(end, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) => panic!("connection ended while waiting for a frame"),
                Ok(Some(Err(e))) => panic!("connection failed while waiting for a frame: {e}"),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    return Some(
                        serde_json::from_str(&t).unwrap_or_else(|e| panic!("bad JSON {t}: {e}")),
                    )
                }
                Message::Close(c) => panic!("closed while waiting for a frame: {c:?}"),
                Message::Binary(_) => panic!("unexpected binary frame"),
                _ => continue,
            }
        }
    }

    /// The next frame of type `kind` (see [`Client::next_of_any`]).
    pub async fn next_of(&mut self, kind: &str) -> Value {
        self.next_of_any(&[kind]).await
    }

    /// The next frame whose type is one of `kinds`, skipping only frames that may
    /// interleave with any request (presence traffic, other acks and messages); an `error`
    /// or anything else unexpected fails the test.
    pub async fn next_of_any(&mut self, kinds: &[&str]) -> Value {
        loop {
            let v = self.next().await;
            if kinds.iter().any(|k| v["type"] == *k) {
                return v;
            }
            let noise = ["join", "leave", "presence", "typing", "ack", "message"];
            assert!(
                noise.iter().any(|n| v["type"] == *n),
                "expected one of {kinds:?}, got {v}"
            );
        }
    }

    /// Reads until the server closes; returns how, and the JSON frames seen before.
    pub async fn ending(&mut self, wait: Duration) -> (Ending, Vec<Value>) {
        let end = tokio::time::Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(end, self.ws.next()).await {
                Err(_) => panic!("connection still open after {wait:?}"),
                Ok(None) | Ok(Some(Err(_))) => return (Ending::Dropped, seen),
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    return (Ending::Closed(u16::from(frame.code)), seen)
                }
                Ok(Some(Ok(Message::Close(None)))) => return (Ending::ClosedWithoutCode, seen),
                Ok(Some(Ok(Message::Text(t)))) => seen.push(serde_json::from_str(&t).unwrap()),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Sends a chat message with a ref and returns the ack's offset. Frames before the ack
    /// (the message itself may come first) are consumed.
    pub async fn say(&mut self, text: &str, reference: &str) -> u64 {
        self.send_json(serde_json::json!({"type":"message","text":text,"ref":reference}))
            .await;
        loop {
            let v = self.next().await;
            if v["type"] == "ack" && v["ref"] == reference {
                return v["offset"].as_u64().expect("ack offset");
            }
            assert!(v["type"] != "error", "error instead of ack: {v}");
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Reads `watcher` in a task of its own (so it answers pings) until `user` leaves the room.
pub fn until_leave(watcher: Client, user: &str) -> tokio::task::JoinHandle<()> {
    let user = user.to_owned();
    tokio::spawn(async move {
        let mut watcher = watcher;
        loop {
            let v = watcher.next().await;
            if v["type"] == "leave" && v["user"] == user.as_str() {
                return;
            }
        }
    })
}

/// Sends `count` messages of 3,000 characters one after another, each waiting for its ack
/// (offsets from 1): megabytes that no kernel buffer holds for a member that reads nothing.
pub async fn say_big(sender: &mut Client, count: u64) {
    let text = "z".repeat(3000);
    for i in 0..count {
        assert_eq!(sender.say(&text, &i.to_string()).await, i + 1);
    }
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    while Instant::now() < end {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not true within {within:?}");
}

/// A `redis-server` of the test's own on a free loopback port, which the test may kill and
/// restart (empty: nothing is saved). Stopped when dropped.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// Further `redis-server` arguments, kept for restarts (e.g. `--replicaof`).
    args: Vec<String>,
}

/// A free TCP port on the loopback interface (bound once, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(free_port(), &[])
    }

    /// A `redis-server` on `port` with these further arguments.
    pub fn start_with(port: u16, args: &[&str]) -> Redis {
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        let mut redis = Redis {
            child: None,
            port,
            args,
        };
        redis.launch();
        redis
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: install it (scripts/test.sh does: apt-get install redis-server)");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        // Ready when it answers PING: an open port alone may be another process's, or this
        // one's in the moment before it fails to bind something else and exits.
        while !self.pings() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("redis-server on {} exited at start: {status}", self.port);
            }
            assert!(
                Instant::now() < end,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a PING on the port gets this server's PONG.
    fn pings(&mut self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 7];
        let pong = stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n";
        pong && self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: Redis vanishes without a word, its data with it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal: SIGSTOP makes Redis silent (connections stay open, nothing answers).
    pub fn signal(&self, sig: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
        }
    }

    /// Starts again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Adds a Redis user with every right (password `pw`) and returns the URL that connects
    /// as it: a replica given its own user can have only its connections killed or locked out.
    pub async fn user_url(&self, user: &str) -> String {
        let reply = self
            .cmd(&["ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all"])
            .await;
        assert!(reply.starts_with("+OK"), "ACL SETUSER said {reply}");
        format!("redis://{user}:pw@127.0.0.1:{}", self.port)
    }

    /// Runs one command over RESP and returns the raw reply.
    pub async fn cmd(&self, args: &[&str]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect redis");
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 65536];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("redis reply in time")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.kill();
    }
}

/// Settings for a replica on `redis` with its own key prefix per test.
pub fn replica_env(redis: &Redis, prefix: &str, node: &str) -> Vec<(String, String)> {
    vec![
        ("CONFAB_REDIS__URL".into(), redis.url()),
        ("CONFAB_REDIS__PREFIX".into(), prefix.into()),
        ("CONFAB_SERVER__NODE_ID".into(), node.into()),
    ]
}

impl Server {
    /// Starts a replica on `redis` and waits until it is ready (subscribed).
    pub async fn replica(
        redis: &Redis,
        prefix: &str,
        node: &str,
        extra: &[(&str, &str)],
    ) -> Server {
        let mut env = replica_env(redis, prefix, node);
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let server = Server::start(&pairs);
        server.wait_ready(true).await;
        server
    }

    /// Waits until `/readyz` says `ready` (or not).
    pub async fn wait_ready(&self, ready: bool) {
        let addr = self.addr;
        let want = if ready { 200 } else { 503 };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if http(addr, "GET", "/readyz", &[]).await.status == want {
                return;
            }
            assert!(
                Instant::now() < end,
                "readyz never became {want}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A throwaway PostgreSQL server: `initdb` into a temp directory and `postgres` on a free
/// port, run as the `postgres` user when the tests run as root (PostgreSQL refuses root).
/// Stopped and removed on drop. Fails loudly when PostgreSQL is not installed
/// (`scripts/test.sh` installs it).
pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    _dir: TempDir,
    /// How to start the server again on the same data ([`Postgres::stop`], [`Postgres::resume`]).
    launch: Command,
}

impl Postgres {
    pub fn start() -> Postgres {
        use std::os::unix::process::CommandExt;
        let bin = postgres_bin();
        let dir = TempDir::new("pg");
        let data = dir.path.join("data");
        // As root, every PostgreSQL process runs as the `postgres` user, owning the directory.
        let owner = (unsafe { libc::geteuid() } == 0).then(|| {
            let name = std::ffi::CString::new("postgres").unwrap();
            // SAFETY: getpwnam reads the passwd database; the pointer is used at once.
            let pw = unsafe { libc::getpwnam(name.as_ptr()) };
            assert!(
                !pw.is_null(),
                "tests run as root and there is no `postgres` user to run PostgreSQL as"
            );
            // SAFETY: checked non-null above.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            std::os::unix::fs::chown(&dir.path, Some(uid), Some(gid)).expect("chown pg dir");
            (uid, gid)
        });
        let as_owner = |cmd: &mut Command| {
            if let Some((uid, gid)) = owner {
                cmd.uid(uid).gid(gid);
            }
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D", data.to_str().unwrap()])
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut server = Command::new(bin.join("postgres"));
        server
            .args(["-D", data.to_str().unwrap()])
            .args(["-p", &port.to_string()])
            .args(["-k", dir.path.to_str().unwrap()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            // A test database: its durability is not what is under test.
            .args(["-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_owner(&mut server);
        let mut pg = Postgres {
            child: None,
            port,
            _dir: dir,
            launch: server,
        };
        pg.resume();
        pg
    }

    /// Stops the server (SIGTERM, then SIGKILL), keeping its data: the archive is down.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < end,
                "postgres still listens 30 s after a stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server (again) on its data and port; returns once it listens.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "postgres is already running");
        self.child = Some(self.launch.spawn().expect("spawn postgres"));
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < end, "postgres did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `postgres` database as `store.url`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Connects the way confab does, retrying while the server finishes starting up.
    pub async fn store(&self) -> confab::store::postgres::PostgresStore {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            match confab::store::postgres::PostgresStore::open(&self.url(), 2).await {
                Ok(store) => return store,
                Err(_) if Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("postgres did not accept connections: {e}"),
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            // SIGTERM is PostgreSQL's "smart" shutdown; stop_child follows with SIGKILL.
            stop_child(child);
        }
    }
}

/// Where `initdb` and `postgres` are: on PATH, or where Debian's `postgresql` package puts
/// them (`/usr/lib/postgresql/<version>/bin`, the newest version).
fn postgres_bin() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return dir;
            }
        }
    }
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect(
        "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): \
         run scripts/test.sh, which installs Debian's postgresql package",
    )
}

impl Redis {
    /// A `redis-server` that saves its RDB snapshot into `dir` when told to (`SAVE`) and loads
    /// it at every (re)start: [`Redis::restart`] then brings back the last snapshot, i.e. an
    /// older copy of the data, as a restored backup or a failover to a lagging replica would.
    pub fn start_persisting(dir: &std::path::Path) -> Redis {
        let dir = dir.display().to_string();
        Redis::start_with(free_port(), &["--dir", &dir, "--dbfilename", "dump.rdb"])
    }
}
