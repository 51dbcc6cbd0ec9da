// confab's built-in web client, and the reference for writing one (protocol: docs/PROTOCOL.md).
//
// What a client has to get right, and where this one does it:
// - Nothing typed is lost. Each message goes into the outbox with a fresh `ref` and stays
//   there (also in localStorage, so a reload keeps it) until the server's `ack`. After every
//   (re)connect, `onWelcome` sends the outbox again with the same refs: the server acks a ref
//   it already stored with its first offset and does not publish it twice.
// - Nothing is missed or shown twice. Messages are keyed by epoch and offset; a reconnect
//   resumes with `since`/`epoch`. When that cannot be recovered (history trimmed, lost or
//   reset) the latest messages are loaded and the gap is marked on screen, not hidden.
// - Reconnecting: exponential backoff with full jitter, capped; the close code decides whether
//   to try again at all (`planFor`).
// - User text reaches the page only through `textContent`, never as markup.
"use strict";

// ---- Tunables ---------------------------------------------------------------------------------
const HISTORY_PAGE = 50;        // messages shown on joining, and fetched per "load older"
const BACKOFF_BASE_MS = 500;    // the first reconnect waits up to this, doubling per failure,
const BACKOFF_CAP_MS = 10000;   // never more than this (a restarted server is not stampeded)
const TYPING_EVERY_MS = 3000;   // send at most one typing notice per this while typing
const TYPING_SHOW_MS = 5000;    // show someone as typing this long after their last notice
const PING_EVERY_MS = 25000;    // a browser cannot see WebSocket pings, so ask with `ping`
const SILENCE_MS = 35000;       // and give a connection up when nothing came for this long
const MAX_FRAME_BYTES = 65536;  // the server's default limits.max_frame_bytes
const MAX_TRIES = 5;            // `unavailable`/`internal` answers before a message is given up
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/; // room and user names (docs/PROTOCOL.md §3.1)

const $ = (id) => document.getElementById(id);

// ---- State ------------------------------------------------------------------------------------
let auth = false;       // the server wants a token (GET /client.json says so)
let room = null;        // the room joined, or being joined
let typedName = "";     // the name field when joining ("" = a guest)
let user = "";          // the name we connect as; a guest keeps the one the server gave it
let ws = null;          // the live socket; events of any older socket are ignored
let welcomed = false;   // `ws` has had its welcome, so frames may be sent
let epoch = null;       // the epoch offsets belong to; null until the room's first welcome
let cursor = 0;         // every message up to this offset has been received: resume from here
let shown = new Set();  // "epoch:offset" of each message on screen, so none shows twice
let run = 0;            // messages are shown in runs with no gap inside; a gap starts a new run
let gapNotes = new Map(); // run -> why it could not follow on from the run before
let oldest = null;      // lowest offset shown in the current run ("load older" reads before it)
let olderDone = false;  // history has nothing older than `oldest`
let olderRef = null;    // ref of the "load older" request in flight
let outbox = [];        // our messages not yet acked, oldest first (see `queue`)
let attempt = 0;        // failed connects in a row, for the backoff
let connects = 0;       // sockets opened so far, to tell whether a late answer is still wanted
let stopped = false;    // reconnecting was given up (auth, policy) until the user joins again
let retryTimer = null, countdownTimer = null, pingTimer = null, flushTimer = null;
let lastFrameAt = 0, lastTypingSent = 0, unread = 0, seq = 0;
const typers = new Map(); // user -> timer that clears their typing notice
const online = new Set();

// ---- Small helpers ----------------------------------------------------------------------------
function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").className = kind || "";
}

// A line in the Events panel, newest first.
function note(text) {
  const el = document.createElement("div");
  el.textContent = new Date().toLocaleTimeString() + " " + text;
  $("events").prepend(el);
  while ($("events").childElementCount > 50) $("events").lastElementChild.remove();
}

// A ref unique enough to be remembered by the server for 5 minutes. getRandomValues works
// on plain http too (randomUUID needs a secure context).
function newRef(kind) {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return kind + "-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("") + (++seq);
}

function send(frame) {
  if (!ws || !welcomed) return false;
  ws.send(JSON.stringify(frame));
  return true;
}

function updateTitle() {
  document.title = (unread ? `(${unread}) ` : "") + (room ? `#${room} · confab` : "confab");
}

// ---- Rendering messages -----------------------------------------------------------------------
// A message's element: time, user (a token's display name when it has one), text; all of it
// set as text.
function messageElement(from, text, ts, name) {
  const el = document.createElement("div");
  el.className = from === user ? "msg mine" : "msg";
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  time.title = new Date(ts).toLocaleString();
  const who = document.createElement("span");
  who.className = "user";
  who.textContent = name || from;
  if (name && name !== from) who.title = from;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.append(time, who, body);
  return el;
}

function nearBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
}

// Places a stored message by (run, offset). Our own messages still waiting for their ack stay
// below every stored one, in the order they were typed.
function place(el, offset) {
  const box = $("messages");
  const stick = nearBottom(box);
  el.remove();                     // an acked message moves from below the stored ones
  el.dataset.run = run;
  el.dataset.offset = offset;
  let after = box.lastElementChild;
  while (after && (after.dataset.offset === undefined || Number(after.dataset.run) > run ||
                   (Number(after.dataset.run) === run && Number(after.dataset.offset) > offset))) {
    after = after.previousElementSibling;
  }
  if (after) after.after(el); else box.prepend(el);
  // The first message of a run that follows a gap carries the note saying so.
  if (gapNotes.has(run) && !(after && after.dataset.run === String(run))) {
    const next = el.nextElementSibling;
    if (next && next.dataset.run === String(run)) delete next.dataset.gap;
    el.dataset.gap = gapNotes.get(run);
  }
  if (stick) box.scrollTop = box.scrollHeight;
}

// Shows a stored message once, whether it came live, in a backlog or in a history page.
// Returns false when it was already on screen.
function showMessage(m) {
  const key = epoch + ":" + m.offset;
  if (typeof m.offset !== "number") return false;
  if (shown.has(key)) {
    // Our own message went up when its ack came; its echo brings the token's display name.
    const who = m.name && $("messages").querySelector(
      `[data-run="${run}"][data-offset="${m.offset}"] .user`);
    if (who) { who.textContent = m.name; who.title = m.user; }
    return false;
  }
  shown.add(key);
  place(messageElement(m.user, m.text, m.ts || Date.now(), m.name), m.offset);
  if (oldest === null || m.offset < oldest) oldest = m.offset;
  return true;
}

// A gap we cannot fill: what follows is a new run, with the reason shown above it.
function startRun(why) {
  run++;
  gapNotes.set(run, why);
  oldest = null;
  olderDone = false;
  note(why);
}

function updateOlder() {
  const button = $("older");
  button.hidden = oldest === null || oldest <= 1 || olderDone;
  button.disabled = olderRef !== null;
  button.textContent = olderRef ? "Loading…" : "Load older messages";
}

function clearRoom() {
  $("messages").replaceChildren();
  shown = new Set();
  gapNotes = new Map();
  run = 0;
  epoch = null;
  cursor = 0;
  oldest = null;
  olderDone = false;
  olderRef = null;
  online.clear();
  renderUsers();
  clearTypers();
  updateOlder();
}

// ---- Presence and typing ----------------------------------------------------------------------
function renderUsers() {
  const items = [...online].sort().map((u) => {
    const li = document.createElement("li");
    li.textContent = u === user ? u + " (you)" : u;
    return li;
  });
  $("users").replaceChildren(...items);
  $("online-count").textContent = online.size ? `(${online.size})` : "";
}

function renderTyping() {
  const names = [...typers.keys()].sort();
  $("typing").textContent = names.length === 0 ? ""
    : names.join(", ") + (names.length === 1 ? " is" : " are") + " typing…";
}

function stopTyping(u) {
  if (!typers.has(u)) return;
  clearTimeout(typers.get(u));
  typers.delete(u);
  renderTyping();
}

function clearTypers() {
  typers.forEach((t) => clearTimeout(t));
  typers.clear();
  renderTyping();
}

// ---- The outbox: our messages until their ack -------------------------------------------------
const outboxKey = () => "confab.outbox." + room;

// Only what is needed to send again; a failed message is the user's to retry, not the page's.
function saveOutbox() {
  try {
    const keep = outbox.filter((e) => !e.failed).map(({ ref, text }) => ({ ref, text }));
    if (keep.length) localStorage.setItem(outboxKey(), JSON.stringify(keep));
    else localStorage.removeItem(outboxKey());
  } catch { /* storage disabled or full: the outbox still lives in memory */ }
}

function loadOutbox() {
  let saved = [];
  try { saved = JSON.parse(localStorage.getItem(outboxKey()) || "[]"); } catch { saved = []; }
  outbox = [];
  for (const e of Array.isArray(saved) ? saved : []) {
    if (typeof e.ref === "string" && typeof e.text === "string") queue(e.text, e.ref);
  }
}

// Adds a message to the outbox and shows it as "sending" below the stored ones.
function queue(text, ref) {
  const entry = {
    ref, text,
    sent: false,      // sent on the current connection (answer pending)
    resent: false,    // sent by the page after a (re)connect rather than by the user's Enter
    tries: 0,         // answers worth a retry so far (see onError)
    failed: false,    // refused: shown with the reason until the user acts
    el: messageElement(user, text, Date.now()),
  };
  entry.el.classList.add("pending");
  const state = document.createElement("span");
  state.className = "state";
  state.textContent = "sending…";
  entry.el.append(state);
  const box = $("messages");
  box.append(entry.el);
  box.scrollTop = box.scrollHeight;
  outbox.push(entry);
  saveOutbox();
  return entry;
}

// Sends, in order, every outbox message not sent on this connection yet.
function flushOutbox() {
  clearTimeout(flushTimer);
  for (const e of outbox) {
    if (e.sent || e.failed) continue;
    const frame = { type: "message", text: e.text, ref: e.ref };
    if (new TextEncoder().encode(JSON.stringify(frame)).length > MAX_FRAME_BYTES) {
      fail(e, "too long to send");   // the server would close the connection over it
      continue;
    }
    if (!send(frame)) return;
    e.sent = true;
  }
}

function settle(entry) {
  outbox = outbox.filter((e) => e !== entry);
  saveOutbox();
}

// The server acked our message: it is stored at `offset`.
function onAck(f) {
  const entry = outbox.find((e) => e.ref === f.ref);
  if (!entry) return;
  settle(entry);
  if (shown.has(epoch + ":" + f.offset)) {
    entry.el.remove();             // the message itself arrived first
  } else {
    shown.add(epoch + ":" + f.offset);
    entry.el.classList.remove("pending", "failed");
    entry.el.querySelectorAll(".state, button").forEach((n) => n.remove());
    place(entry.el, f.offset);
  }
}

// Refused for a reason that sending the same again would meet again: say why, and leave the
// decision to the user.
function fail(entry, why, code) {
  entry.failed = true;
  settle(entry);
  outbox.push(entry);              // kept in memory (not storage) until the user acts on it
  entry.el.classList.replace("pending", "failed");
  entry.el.querySelector(".state").textContent = "not sent: " + why;
  const button = document.createElement("button");
  button.type = "button";
  if (code === "rate_limited") {
    button.textContent = "Send again";
    button.addEventListener("click", () => {
      button.remove();
      entry.failed = false;
      entry.sent = false;
      entry.resent = false;       // the user's own send again, judged as such
      entry.tries = 0;
      entry.el.classList.replace("failed", "pending");
      entry.el.querySelector(".state").textContent = "sending…";
      saveOutbox();
      flushOutbox();
    });
  } else {
    button.textContent = "Edit";
    button.addEventListener("click", () => {
      outbox = outbox.filter((e) => e !== entry);
      entry.el.remove();
      $("message").value = entry.text;
      $("message").focus();
    });
  }
  entry.el.append(button);
}

function onError(f) {
  const entry = f.ref && outbox.find((e) => e.ref === f.ref);
  if (entry) {
    // Worth trying again shortly: the server could not store it (`unavailable`, `internal`;
    // the ref makes a retry safe), or it met the rate limit while the page itself re-sent the
    // outbox after a reconnect (the page's burst, not the user's). Anything else would meet
    // the same answer again, so the user decides.
    const ours = f.code === "rate_limited" && entry.resent;
    if ((f.code === "unavailable" || f.code === "internal" || ours) && ++entry.tries < MAX_TRIES) {
      entry.sent = false;
      clearTimeout(flushTimer);
      flushTimer = setTimeout(flushOutbox, 1000 + Math.random() * 2000);
      note(`not sent yet (${f.code}), sending again shortly`);
    } else {
      fail(entry, f.message || f.code, f.code);
    }
    return;
  }
  if (f.ref && f.ref === olderRef) { olderRef = null; updateOlder(); }
  note(`error ${f.code}: ${f.message}`);
}

// ---- Connecting -------------------------------------------------------------------------------
function stopTimers() {
  clearTimeout(retryTimer); clearInterval(countdownTimer); clearInterval(pingTimer);
  clearTimeout(flushTimer);
  retryTimer = countdownTimer = pingTimer = flushTimer = null;
}

// Opens the room's socket. The same URL serves a first join and a resume: `history` asks for
// the latest messages, which the server sends only when there is nothing to resume from.
function connect() {
  stopTimers();
  const params = new URLSearchParams({ history: String(HISTORY_PAGE) });
  if (user) params.set("user", user);
  if (epoch !== null) {
    params.set("since", String(cursor));
    params.set("epoch", epoch);
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/ws/${encodeURIComponent(room)}?${params}`;
  // Browsers cannot set headers on a WebSocket: the token rides as a subprotocol (docs/PROTOCOL.md
  // §3.2).
  const token = sessionStorage.getItem("confab.token") || "";
  const sock = auth ? new WebSocket(url, ["confab.v1", "token." + token]) : new WebSocket(url);
  ws = sock;
  connects++;
  welcomed = false;
  let opened = false;
  setStatus(epoch === null ? "connecting…" : "reconnecting…", "warn");

  sock.onopen = () => { opened = true; };
  sock.onmessage = (ev) => {
    if (sock !== ws) return;
    lastFrameAt = Date.now();
    let f;
    try { f = JSON.parse(ev.data); } catch { return; }
    handle(f);
  };
  sock.onclose = (ev) => {
    if (sock !== ws) return;       // a deliberate close (room switch) or a superseded socket
    lost(ev.code, ev.reason, opened);
  };
}

// The connection is gone: decide, from how it ended, whether and when to connect again.
function lost(code, reason, opened) {
  ws = null;
  welcomed = false;
  stopTimers();
  clearTypers();
  for (const e of outbox) e.sent = false;
  note(`connection closed (code ${code}${reason ? ": " + reason : ""})`);
  if (code === 1009) {
    // A frame was over the server's size limit: give up the largest message in flight, or
    // sending it again after the reconnect would close the connection again.
    const big = outbox.filter((e) => !e.failed).sort((a, b) => b.text.length - a.text.length)[0];
    if (big) fail(big, "too large for this server");
  }
  if (auth && !opened) {
    // A browser never learns the HTTP status of a refused handshake. If the server answers
    // and is ready, the refusal was about us (401/403: the token or the room): stop and ask
    // for a new token. If it does not answer, it is down or draining: try again later.
    const asked = connects;
    fetch("/readyz", { cache: "no-store" }).then((r) => r.ok, () => false).then((serverUp) => {
      if (connects !== asked || stopped) return;   // the user joined again meanwhile
      if (serverUp) stop("the server refused the token (invalid, expired, or not for this room): enter a new one", true);
      else reconnectLater();
    });
    return;
  }
  switch (planFor(code)) {
    case "now": reconnectNow(); break;
    case "stop":
      stop(code === 4001 ? "token expired: enter a new one"
        : `disconnected by the server (${code}${reason ? ": " + reason : ""})`, code >= 4000);
      break;
    default: reconnectLater();
  }
}

// What a close code means for reconnecting (docs/PROTOCOL.md §8, RFC 6455 §7.4.1).
function planFor(code) {
  if (code === 4008) return "now";   // fell behind: resume at once to catch up
  if (code >= 4000 && code <= 4999) return "stop"; // 4001 token expired and other auth codes
  if (code === 1008) return "stop";  // policy (flooding): reconnecting would repeat it
  if (code === 1002 || code === 1003 || code === 1007) return "stop"; // a bug in this page
  return "later";                    // 1001 drain, 1006 dropped, 1011, 1013, …
}

function reconnectNow() {
  attempt = 0;
  connect();
}

// Full jitter: a random wait in [0, min(cap, base·2^attempt)], so clients dropped together by
// a restart do not all come back at the same moment.
function reconnectLater() {
  const delay = Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
  attempt++;
  const due = Date.now() + delay;
  const tick = () => setStatus(`offline, reconnecting in ${Math.ceil((due - Date.now()) / 1000)} s`, "bad");
  tick();
  countdownTimer = setInterval(tick, 250);
  retryTimer = setTimeout(connect, delay);
}

function stop(why, askForToken) {
  stopped = true;
  setStatus(why, "bad");
  note(why);
  if (askForToken && auth) {
    sessionStorage.removeItem("confab.token");
    $("token").value = "";
    $("token").focus();
  }
}

// ---- Frames from the server -------------------------------------------------------------------
function handle(f) {
  switch (f.type) {
    case "welcome": onWelcome(f); break;
    case "message": {
      const isNew = showMessage(f);
      if (f.offset > cursor) cursor = f.offset;
      stopTyping(f.user);
      if (isNew && document.hidden && f.user !== user) { unread++; updateTitle(); }
      updateOlder();
      break;
    }
    case "ack": onAck(f); break;
    case "history": onHistory(f); break;
    case "reset":
      // The room's history was lost or expired: offsets start again. Keep what is on screen,
      // mark the gap, and load what the new epoch already has.
      startRun("The room's history was reset here; messages before it may be gone.");
      epoch = f.epoch;
      cursor = f.offset;
      send({ type: "history", limit: HISTORY_PAGE, ref: newRef("h") });
      updateOlder();
      break;
    case "presence":
      online.clear();
      (f.users || []).forEach((u) => online.add(u));
      renderUsers();
      break;
    case "join":
      online.add(f.user); renderUsers();
      note(`${f.user} joined`);
      break;
    case "leave":
      online.delete(f.user); renderUsers(); stopTyping(f.user);
      note(`${f.user} left`);
      break;
    case "typing":
      if (f.user === user) break;
      clearTimeout(typers.get(f.user));
      typers.set(f.user, setTimeout(() => stopTyping(f.user), TYPING_SHOW_MS));
      renderTyping();
      break;
    case "error": onError(f); break;
    case "pong": break;
  }
}

// The one place that decides what happens after a (re)connect.
function onWelcome(f) {
  welcomed = true;
  attempt = 0;
  stopped = false;
  // Who the server says we are: the name asked for, a generated guest name, or the token's
  // subject. A guest keeps its name across reconnects and reloads of this tab, so its refs
  // stay its own (the server de-duplicates a ref per user).
  user = f.user;
  if (!typedName && !auth) sessionStorage.setItem("confab.guest", f.user);
  // 1. Continuity. The server sends what follows the welcome; only a gap needs us.
  if (epoch === null) {
    // First connect to this room: the latest messages follow (?history), then live ones.
  } else if (f.recovered === true) {
    // Resumed: every message after `cursor` follows, then live ones. Nothing to do.
  } else if (cursor > 0) {
    // Not resumable (the history we had is trimmed, lost or reset): the latest messages
    // follow (?history). Keep what is on screen and mark the gap between the two.
    startRun(f.epoch === epoch
      ? "Messages were missed here: they are no longer in the room's history."
      : "The room's history was reset here; messages before it may be gone.");
  } else {
    // We had seen no message of that epoch: an empty room the server forgot meanwhile.
    note("the room started afresh");
  }
  if (f.recovered !== true) {
    epoch = f.epoch;
    cursor = f.offset;
  }
  // 2. Our unacked messages, oldest first, with their original refs: a ref the server already
  //    stored (its ack was lost with the connection) is acked with its first offset and not
  //    published again, so each message appears once. The server keeps our send order.
  for (const e of outbox) {
    e.sent = false;
    e.resent = true;
  }
  flushOutbox();

  setStatus("connected", "ok");
  pingTimer = setInterval(() => {
    if (Date.now() - lastFrameAt > SILENCE_MS) {
      // Half-open connections never close by themselves: give this one up.
      const sock = ws;
      lost(1006, "no answer from the server", true);
      sock.close();
    } else {
      send({ type: "ping" });
    }
  }, PING_EVERY_MS);
  renderUsers();
}

function onHistory(f) {
  if (f.epoch !== epoch) return;   // from before a reset; that reset reloads history itself
  const box = $("messages");
  const older = f.ref === olderRef;
  const fromBottom = box.scrollHeight - box.scrollTop;
  const messages = f.messages || [];
  messages.forEach(showMessage);
  for (const m of messages) if (m.offset > cursor && !older) cursor = m.offset;
  if (older) {
    olderRef = null;
    if (messages.length < HISTORY_PAGE) olderDone = true;
    box.scrollTop = box.scrollHeight - fromBottom; // keep the messages being read in place
  }
  updateOlder();
}

function loadOlder() {
  if (olderRef || oldest === null) return;
  olderRef = newRef("h");
  if (!send({ type: "history", before: oldest, limit: HISTORY_PAGE, ref: olderRef })) olderRef = null;
  updateOlder();
}

// ---- What the user does -----------------------------------------------------------------------
function join() {
  const name = auth ? "" : $("name").value.trim();   // with tokens the server ignores `user`
  const r = $("room").value.trim();
  if (name && (name.length > 32 || !NAME_RE.test(name))) {
    setStatus("invalid name: up to 32 letters, digits, _ . - (starting with a letter or digit)", "bad");
    $("name").focus();
    return;
  }
  if (!NAME_RE.test(r)) {
    setStatus("invalid room: up to 64 letters, digits, _ . - (starting with a letter or digit)", "bad");
    $("room").focus();
    return;
  }
  if (auth) {
    const token = $("token").value.trim() || sessionStorage.getItem("confab.token") || "";
    if (!token) {
      setStatus("this server needs a token: enter one to join", "bad");
      $("token").focus();
      return;
    }
    sessionStorage.setItem("confab.token", token);
  }
  if (!auth) {
    try { localStorage.setItem("confab.name", name); } catch { /* not remembered, that is all */ }
  }

  // Deliberate close: clearing `ws` first makes the old socket's onclose a no-op.
  const old = ws;
  ws = null;
  if (old) old.close(1000, "leaving");
  stopTimers();
  attempt = 0;
  stopped = false;
  // The same room as the same user (a retry, a new token): resume and keep the screen.
  if (r !== room || name !== typedName || epoch === null) {
    room = r;
    typedName = name;
    user = name || sessionStorage.getItem("confab.guest") || "";
    clearRoom();
    loadOutbox();
    unread = 0;
    updateTitle();
    history.replaceState(null, "", "#" + room);   // a link to this room (names need no escaping)
  }
  connect();
  $("message").focus();
}

function sendMessage() {
  const input = $("message");
  const text = input.value;
  if (!text.trim()) return;
  if (!room) { setStatus("join a room first", "bad"); return; }
  queue(text, newRef("m"));
  flushOutbox();                   // sent now if connected, else after the next welcome
  input.value = "";
  lastTypingSent = 0;
}

// ---- Start ------------------------------------------------------------------------------------
// Joining waits for `ready`: until /client.json answered, the page does not know about tokens.
const ready = start();
$("join").addEventListener("click", () => ready.then(join));
for (const id of ["name", "room", "token"]) {
  $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") ready.then(join); });
}
$("send").addEventListener("click", sendMessage);
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.isComposing) { e.preventDefault(); sendMessage(); }
});
$("message").addEventListener("input", () => {
  const now = Date.now();
  if ($("message").value && now - lastTypingSent >= TYPING_EVERY_MS && send({ type: "typing" })) {
    lastTypingSent = now;
  }
});
$("older").addEventListener("click", loadOlder);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) { unread = 0; updateTitle(); }
});
// Back online, or back on the tab: skip the rest of the backoff wait.
for (const [target, event] of [[window, "online"], [document, "visibilitychange"]]) {
  target.addEventListener(event, () => { if (retryTimer && !document.hidden) reconnectNow(); });
}
window.addEventListener("hashchange", () => {
  const r = location.hash.slice(1);
  if (NAME_RE.test(r) && r !== room) { $("room").value = r; ready.then(join); }
});
// A page that breaks its own policy should say so where a developer looks.
document.addEventListener("securitypolicyviolation", (e) => {
  note(`blocked by the Content-Security-Policy: ${e.violatedDirective}`);
});

async function start() {
  // Fields are filled before the first await, so nothing typed meanwhile is overwritten.
  $("token").value = sessionStorage.getItem("confab.token") || "";
  $("name").value = localStorage.getItem("confab.name") || "";
  // Older servers have no /client.json: anything but a clear answer means no token.
  try {
    const r = await fetch("/client.json", { cache: "no-store" });
    auth = r.ok && (await r.json()).auth === true;
  } catch { auth = false; }
  $("token-field").hidden = !auth;
  $("name").closest(".field").hidden = auth;   // with tokens, the token says who we are
  if (auth && !$("token").value) setStatus("this server needs a token: enter one to join", "warn");
  // A link with a room in its hash opens that room at once.
  const fromHash = location.hash.slice(1);
  if (NAME_RE.test(fromHash)) {
    $("room").value = fromHash;
    if (!auth || $("token").value) { join(); return; }
  }
  (auth && !$("token").value ? $("token") : $("name")).focus();
}
