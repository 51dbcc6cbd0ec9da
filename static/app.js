"use strict";
const $ = (id) => document.getElementById(id);
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const BACKOFF_BASE = 500, BACKOFF_CAP = 15000;

// Connection state. `ws` is the only live socket: handlers of any other socket are ignored,
// which is how a deliberate close (room switch) avoids triggering a reconnect.
let ws = null;
let room = null;          // room we are (or want to be) in
let user = "";            // name to connect as; becomes the server-assigned id after welcome
let epoch = null;         // history epoch the offsets below belong to
let lastOffset = null;    // highest offset rendered in this room+epoch (null: none)
let baseOffset = null;    // latest offset the server reported (welcome/reset), resume fallback
let rendered = new Set(); // offsets already shown in this epoch, for dedupe
let attempt = 0;          // consecutive failed attempts, drives the backoff
let retryTimer = null, countdownTimer = null, pingTimer = null;
let lastTypingSent = 0;
let seq = 0;
const pending = new Map();   // ref -> text of our messages awaiting ack
const typers = new Map();    // user -> timeout clearing their "typing" hint
const online = new Set();

function setStatus(text, cls) {
  $("status").textContent = text;
  $("status").className = cls || "";
}

function note(text) {
  const el = document.createElement("div");
  el.textContent = new Date().toLocaleTimeString() + " " + text;
  const box = $("events");
  box.prepend(el);                               // newest first, no scrolling needed
  while (box.childElementCount > 50) box.lastElementChild.remove();
}

function clearMessages() {
  $("messages").replaceChildren();
  rendered = new Set();
  lastOffset = null;
}

// Inserts a message in offset order (history can arrive after live messages), once per offset.
function renderMessage(m) {
  if (typeof m.offset !== "number" || rendered.has(m.offset)) return;
  rendered.add(m.offset);
  if (lastOffset === null || m.offset > lastOffset) lastOffset = m.offset;

  const el = document.createElement("div");
  el.className = "msg";
  el.dataset.offset = m.offset;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = new Date(m.ts || Date.now()).toLocaleTimeString();
  const who = document.createElement("span");
  who.className = "user";
  who.textContent = m.user;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = m.text;
  el.append(time, who, text);

  const box = $("messages");
  let after = box.lastElementChild;
  while (after && Number(after.dataset.offset) > m.offset) after = after.previousElementSibling;
  if (after) after.after(el); else box.prepend(el);
  box.scrollTop = box.scrollHeight;
  stopTyping(m.user);
}

function renderUsers() {
  const items = [...online].sort().map((u) => {
    const li = document.createElement("li");
    li.textContent = u === user ? u + " (you)" : u;
    return li;
  });
  $("users").replaceChildren(...items);
}

function renderTyping() {
  const names = [...typers.keys()];
  $("typing").textContent = names.length === 0 ? ""
    : names.join(", ") + (names.length === 1 ? " is" : " are") + " typing…";
}

function stopTyping(u) {
  if (!typers.has(u)) return;
  clearTimeout(typers.get(u));
  typers.delete(u);
  renderTyping();
}

function send(obj) {
  if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify(obj)); return true; }
  return false;
}

function nextRef(prefix) { return prefix + "-" + Date.now().toString(36) + "-" + (++seq); }

function stopTimers() {
  clearTimeout(retryTimer); clearInterval(countdownTimer); clearInterval(pingTimer);
  retryTimer = countdownTimer = pingTimer = null;
}

// resume=false: fresh join, ask for recent history. resume=true: continue after our last offset.
function connect(resume) {
  stopTimers();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const params = new URLSearchParams();
  if (user) params.set("user", user);
  if (resume && epoch !== null) {
    params.set("since", String(lastOffset ?? baseOffset ?? 0));
    params.set("epoch", epoch);
  } else {
    params.set("history", "50");
  }
  const sock = new WebSocket(`${proto}//${location.host}/ws/${encodeURIComponent(room)}?${params}`);
  ws = sock;
  const resuming = params.has("since");
  setStatus("connecting");

  sock.onmessage = (ev) => {
    if (sock !== ws) return;
    let f;
    try { f = JSON.parse(ev.data); } catch { return; }
    handle(f, resuming);
  };
  sock.onclose = (ev) => {
    if (sock !== ws) return;              // deliberate close or superseded socket
    ws = null;
    stopTimers();
    typers.forEach((t) => clearTimeout(t)); typers.clear(); renderTyping();
    if (ev.code === 4008) {               // slow consumer: resume right away to catch up
      note("fell behind, catching up");
      connect(true);
    } else {
      scheduleReconnect(ev.code);
    }
  };
}

// Full jitter: a random delay in [0, min(cap, base * 2^attempt)] spreads reconnect storms.
function scheduleReconnect(code) {
  const delay = Math.random() * Math.min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt);
  attempt++;
  note(`connection closed (code ${code})`);
  const due = Date.now() + delay;
  const tick = () => setStatus(`reconnecting in ${(Math.max(0, due - Date.now()) / 1000).toFixed(1)}s`, "bad");
  tick();
  countdownTimer = setInterval(tick, 100);
  retryTimer = setTimeout(() => connect(true), delay);
}

function handle(f, resuming) {
  switch (f.type) {
    case "welcome": {
      attempt = 0;
      user = f.user;                       // keep a generated guest id across reconnects
      baseOffset = f.offset;
      const lost = resuming && (f.recovered === false || f.epoch !== epoch);
      if (f.epoch !== epoch) clearMessages();
      epoch = f.epoch;
      if (lost) {
        clearMessages();
        note("history could not be resumed; showing latest messages");
        send({ type: "history", limit: 50, ref: nextRef("h") });
      }
      setStatus("connected", "ok");
      pingTimer = setInterval(() => send({ type: "ping" }), 25000);
      renderUsers();
      break;
    }
    case "message":
      if (f.room === room) renderMessage(f);
      break;
    case "history":
      if (f.room && f.room !== room) break;
      if (f.epoch && f.epoch !== epoch) { clearMessages(); epoch = f.epoch; }
      (f.messages || []).forEach(renderMessage);
      break;
    case "ack": {
      // If the server does not echo our own message back, show it from the ack; the offset
      // dedupe makes this harmless when it does.
      const text = pending.get(f.ref);
      pending.delete(f.ref);
      if (text !== undefined) renderMessage({ offset: f.offset, user, text, ts: Date.now() });
      break;
    }
    case "join":
      if (f.room !== room) break;
      note(`${f.user} joined`);
      online.add(f.user); renderUsers();
      break;
    case "leave":
      if (f.room !== room) break;
      note(`${f.user} left`);
      online.delete(f.user); stopTyping(f.user); renderUsers();
      break;
    case "presence":
      if (f.room !== room) break;
      online.clear();
      (f.users || []).forEach((u) => online.add(u));
      renderUsers();
      break;
    case "typing": {
      if (f.room !== room || f.user === user) break;
      clearTimeout(typers.get(f.user));
      typers.set(f.user, setTimeout(() => stopTyping(f.user), 3000));
      renderTyping();
      break;
    }
    case "reset":
      if (f.room !== room) break;
      epoch = f.epoch;
      baseOffset = f.offset;
      clearMessages();                     // also drops the saved offset
      note("room history was reset");
      break;
    case "error":
      note(`error ${f.code}: ${f.message}`);
      if (f.ref) pending.delete(f.ref);
      break;
    case "pong":
      break;
  }
}

function join() {
  const name = $("name").value.trim();
  const r = $("room").value.trim();
  if (name && (name.length > 32 || !NAME_RE.test(name))) {
    setStatus("invalid name: 1-32 of letters, digits, _ . - (starting with a letter or digit)", "bad");
    return;
  }
  if (!NAME_RE.test(r)) {
    setStatus("invalid room: 1-64 of letters, digits, _ . - (starting with a letter or digit)", "bad");
    return;
  }
  // Deliberate close: clearing `ws` first makes the old socket's onclose a no-op.
  const old = ws;
  ws = null;
  if (old) old.close(1000, "switching room");
  stopTimers();
  attempt = 0;
  room = r; user = name; epoch = null; baseOffset = null;
  clearMessages();
  pending.clear();
  online.clear(); renderUsers();
  typers.forEach((t) => clearTimeout(t)); typers.clear(); renderTyping();
  connect(false);
}

function sendMessage() {
  const input = $("message");
  const text = input.value;
  if (!text.trim()) return;
  const ref = nextRef("m");
  if (!send({ type: "message", text, ref })) { note("not connected, message not sent"); return; }
  pending.set(ref, text);
  input.value = "";
  lastTypingSent = 0;
}

$("join").addEventListener("click", join);
for (const id of ["name", "room"]) {
  $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") join(); });
}
$("send").addEventListener("click", sendMessage);
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.isComposing) { e.preventDefault(); sendMessage(); }
});
// Throttle typing notices to one per 2 s so a fast typist does not flood the room.
$("message").addEventListener("input", () => {
  const now = Date.now();
  if ($("message").value && now - lastTypingSent >= 2000 && send({ type: "typing" })) {
    lastTypingSent = now;
  }
});
