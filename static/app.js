// confab's built-in web page: the UI on top of confab.js, which holds the connection, the
// rooms, resume, the outboxes and the backoff (read confab.js for the protocol's rules; this
// file only draws them).
//
// What the page adds:
// - A room list (`#rooms`) on one connection: `#join` adds the room in `#room` and shows it;
//   clicking a room shows it; rooms not shown count their unread messages; × leaves a room.
// - `#messages` holds only the shown room's messages, one child each, placed by (run, offset):
//   our messages still waiting for their ack stay below every stored one, and the first
//   message after a gap carries the reason in `data-gap` (drawn by CSS, so it is not a child).
// - The open rooms are in the URL hash, the shown one first: `/#lobby` or `/#lobby,team-a`.
//   Opening such a link joins them all.
// - User text reaches the page only through `textContent`, never as markup.

import { Confab, NAME_RE } from "/confab.js";

const $ = (id) => document.getElementById(id);

// ---- State ------------------------------------------------------------------------------------
let auth = false;        // the server wants a token (GET /client.json says so)
let client = null;       // the connection, made once /client.json answered
let typedName = "";      // the name field at the last join ("" = a guest)
let shown = null;        // the room whose messages are in #messages
let countdownTimer = null;
let titleUnread = 0;     // messages from others that came while the tab was hidden
const views = new Map(); // room -> what the page keeps for it (see `view`)

// A room's screen state. While the room is not shown its messages wait in `holder`.
function view(name) {
  if (!views.has(name)) {
    views.set(name, {
      name,
      holder: document.createElement("div"),
      gapNotes: new Map(),  // run -> why it could not follow on from the run before
      pending: new Map(),   // ref -> element of our message until its ack
      unread: 0,
    });
  }
  return views.get(name);
}

const boxOf = (v) => (v.name === shown ? $("messages") : v.holder);

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

function updateTitle() {
  document.title = (titleUnread ? `(${titleUnread}) ` : "") + (shown ? `#${shown} · confab` : "confab");
}

// The open rooms, the shown one first: a link to this screen (room names need no escaping).
function updateHash() {
  const names = [...views.keys()].sort((a, b) => (a === shown ? -1 : b === shown ? 1 : 0));
  history.replaceState(null, "", names.length ? "#" + names.join(",") : location.pathname);
}

function roomsFromHash() {
  return location.hash.slice(1).split(",").filter((r) => NAME_RE.test(r));
}

// ---- Rendering messages -----------------------------------------------------------------------
// A message's element: time, user (a token's display name when it has one), text; all of it
// set as text.
function messageElement(from, text, ts, name, mine) {
  const el = document.createElement("div");
  el.className = mine ? "msg mine" : "msg";
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
function place(v, el, run, offset) {
  const box = boxOf(v);
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
  if (v.gapNotes.has(run) && !(after && after.dataset.run === String(run))) {
    const next = el.nextElementSibling;
    if (next && next.dataset.run === String(run)) delete next.dataset.gap;
    el.dataset.gap = v.gapNotes.get(run);
  }
  if (stick && box === $("messages")) box.scrollTop = box.scrollHeight;
}

function updateOlder() {
  const button = $("older");
  const room = shown && client && client.rooms.get(shown);
  button.hidden = !room || room.oldest === null || room.oldest <= 1 || room.olderDone;
  button.disabled = Boolean(room && room.olderRef);
  button.textContent = room && room.olderRef ? "Loading…" : "Load older messages";
}

// ---- The room list ----------------------------------------------------------------------------
// A room's entry: made once and then only updated, so a click (or the keyboard focus) on it
// is never lost to a redraw.
function roomItem(v) {
  if (v.li) return v.li;
  const li = document.createElement("li");
  li.dataset.room = v.name;
  // A button, so the keyboard reaches it; its click goes on to the entry's.
  const name = document.createElement("button");
  name.type = "button";
  name.className = "name";
  name.textContent = "#" + v.name;
  const unread = document.createElement("span");
  unread.className = "unread";
  const leave = document.createElement("button");
  leave.type = "button";
  leave.className = "leave";
  leave.textContent = "×";
  leave.setAttribute("aria-label", `Leave ${v.name}`);
  leave.addEventListener("click", (e) => { e.stopPropagation(); leaveRoom(v.name); });
  li.append(name, leave);
  li.addEventListener("click", () => show(v.name));
  v.li = li;
  v.unreadEl = unread;
  return li;
}

function renderRooms() {
  const items = [...views.values()].map((v) => {
    const li = roomItem(v);
    const room = client && client.rooms.get(v.name);
    li.classList.toggle("shown", v.name === shown);
    li.setAttribute("aria-current", v.name === shown ? "true" : "false");
    // joining (waiting for its welcome), joined, or refused by the server (with why).
    li.dataset.state = room && room.subscribed ? "joined" : room && room.refused ? "refused" : "joining";
    li.classList.toggle("refused", Boolean(room && room.refused));
    li.title = room && room.refused ? `not joined: ${room.refused.message || room.refused.code}` : "";
    // The count is there only while the room is not shown and has something unread.
    if (v.unread && v.name !== shown) {
      v.unreadEl.textContent = String(v.unread);
      v.unreadEl.title = `${v.unread} unread`;
      if (!v.unreadEl.isConnected) li.lastElementChild.before(v.unreadEl);
    } else {
      v.unreadEl.remove();
    }
    return li;
  });
  const list = $("rooms");
  if (items.length !== list.children.length || items.some((li, i) => list.children[i] !== li)) {
    list.replaceChildren(...items);
  }
}

// Shows a room: its messages move into #messages, the others' wait in their holders.
function show(name) {
  if (shown === name) return;
  const old = shown && views.get(shown);
  if (old) old.holder.append(...$("messages").children);
  shown = name;
  const v = name && views.get(name);
  $("messages").replaceChildren(...(v ? v.holder.children : []));
  if (v) {
    v.unread = 0;
    $("room").value = name;        // the field names the room on screen
  }
  $("messages").scrollTop = $("messages").scrollHeight;
  $("chat").setAttribute("aria-label", name ? `Chat in #${name}` : "Chat");
  renderRooms();
  renderUsers();
  renderTyping();
  updateOlder();
  updateTitle();
  updateHash();
}

function leaveRoom(name) {
  client.leave(name);
  views.delete(name);
  note(`left #${name}`);
  if (shown === name) {
    shown = null;
    $("messages").replaceChildren();
    const next = views.keys().next();
    show(next.done ? null : next.value);
  } else {
    renderRooms();
    updateHash();
  }
}

// ---- Presence and typing (the shown room's) ---------------------------------------------------
function renderUsers() {
  const room = shown && client && client.rooms.get(shown);
  const online = room ? [...room.users].sort() : [];
  const items = online.map((u) => {
    const li = document.createElement("li");
    li.textContent = u === client.user ? u + " (you)" : u;
    return li;
  });
  $("users").replaceChildren(...items);
  $("online-count").textContent = online.length ? `(${online.length})` : "";
}

function renderTyping() {
  const room = shown && client && client.rooms.get(shown);
  const names = room ? room.typingUsers : [];
  $("typing").textContent = names.length === 0 ? ""
    : names.join(", ") + (names.length === 1 ? " is" : " are") + " typing…";
}

// ---- What the client reports ------------------------------------------------------------------
function onStatus(s) {
  clearInterval(countdownTimer);
  countdownTimer = null;
  switch (s.status) {
    case "connecting": setStatus(s.resuming ? "reconnecting…" : "connecting…", "warn"); break;
    case "connected": setStatus("connected", "ok"); break;
    case "offline": {
      const tick = () => setStatus(`offline, reconnecting in ${Math.ceil((s.retryAt - Date.now()) / 1000)} s`, "bad");
      tick();
      countdownTimer = setInterval(tick, 250);
      break;
    }
    case "stopped":
      if (s.reason === "closed") break;
      setStatus(s.reason, "bad");
      note(s.reason);
      if (s.why === "token" && auth) {
        sessionStorage.removeItem("confab.token");
        $("token").value = "";
        $("token").focus();
      }
      break;
  }
}

// Our message, shown as "sending" below the stored ones until its ack.
function onQueued({ room, entry, again }) {
  const v = view(room);
  let el = v.pending.get(entry.ref);
  if (again && el) {
    el.classList.replace("failed", "pending");
    el.querySelectorAll("button").forEach((n) => n.remove());
  } else {
    el = messageElement(client.user || typedName, entry.text, Date.now(), null, true);
    el.classList.add("pending");
    const state = document.createElement("span");
    state.className = "state";
    el.append(state);
    v.pending.set(entry.ref, el);
    boxOf(v).append(el);
  }
  el.querySelector(".state").textContent = "sending…";
  if (room === shown) $("messages").scrollTop = $("messages").scrollHeight;
}

// Stored at `offset`: the element moves into place, or goes when the message came first.
function onAck({ room, run, entry, offset, arrived }) {
  const v = view(room);
  const el = v.pending.get(entry.ref);
  v.pending.delete(entry.ref);
  if (!el) return;
  if (arrived) {
    el.remove();
    return;
  }
  el.classList.remove("pending", "failed");
  el.querySelectorAll(".state, button").forEach((n) => n.remove());
  // Queued before any welcome said who we are (a token's user): say it now.
  const who = el.querySelector(".user");
  if (!who.textContent) who.textContent = client.user;
  place(v, el, run, offset);
}

// Refused: say why, and leave the decision (send again, or edit) to the user.
function onRefused({ room, entry, message, canRetry }) {
  const v = view(room);
  const el = v.pending.get(entry.ref);
  if (!el) return;
  el.classList.replace("pending", "failed");
  el.querySelector(".state").textContent = "not sent: " + message;
  const button = document.createElement("button");
  button.type = "button";
  if (canRetry) {
    button.textContent = "Send again";
    button.addEventListener("click", () => client.retry(entry));
  } else {
    button.textContent = "Edit";
    button.addEventListener("click", () => {
      client.discard(entry);
      v.pending.delete(entry.ref);
      el.remove();
      $("message").value = entry.text;
      $("message").focus();
    });
  }
  el.append(button);
}

function onMessage({ room, run, message: m, older, mine, fresh }) {
  const v = views.get(room);
  if (!v) return;
  const box = boxOf(v);
  const fromBottom = box.scrollHeight - box.scrollTop;
  place(v, messageElement(m.user, m.text, m.ts, m.name, mine), run, m.offset);
  if (older && room === shown) box.scrollTop = box.scrollHeight - fromBottom; // keep the reader's place
  if (fresh && room !== shown) { v.unread++; renderRooms(); }
  if (fresh && document.hidden) { titleUnread++; updateTitle(); }
  if (room === shown) { renderTyping(); updateOlder(); }
}

function start() {
  client.on("status", onStatus);
  client.on("queued", onQueued);
  client.on("ack", onAck);
  client.on("refused", onRefused);
  client.on("message", onMessage);
  client.on("named", ({ room, run, offset, user, name }) => {
    const v = views.get(room);
    const who = v && boxOf(v).querySelector(`[data-run="${run}"][data-offset="${offset}"] .user`);
    if (who) { who.textContent = name; who.title = user; }
  });
  client.on("gap", ({ room, run, reason }) => {
    view(room).gapNotes.set(run, reason);
    note(`#${room}: ${reason}`);
  });
  client.on("welcome", ({ room, user }) => {
    // A guest keeps its generated name across reconnects and reloads of this tab, so its
    // refs stay its own (the server de-duplicates a ref per user).
    if (!typedName && !auth) sessionStorage.setItem("confab.guest", user);
    if (room === shown) { renderUsers(); updateOlder(); }
    renderRooms();
  });
  for (const kind of ["presence", "join", "leave"]) {
    client.on(kind, ({ room, user }) => {
      if (kind !== "presence") note(`${user} ${kind === "join" ? "joined" : "left"} #${room}`);
      if (room === shown) { renderUsers(); renderTyping(); }
    });
  }
  client.on("typing", ({ room }) => { if (room === shown) renderTyping(); });
  client.on("older", ({ room }) => { if (room === shown) updateOlder(); });
  client.on("retrying", ({ room, entry, code }) => note(entry
    ? `not sent yet (${code}), sending again shortly`
    : `#${room} not joined yet (${code}), asking again shortly`));
  client.on("refused-room", ({ room, code, message }) => {
    note(`#${room} refused (${code}): ${message}`);
    if (room === shown) setStatus(`not allowed in #${room}: ${message || code}`, "bad");
    renderRooms();
  });
  client.on("unsubscribed", ({ room, code, reason, resubscribing }) => {
    note(`#${room} ended by the server (${code}${reason ? ": " + reason : ""})` +
      (resubscribing ? ", joining again" : ""));
    renderRooms();
  });
  client.on("closed", ({ code, reason }) => {
    note(`connection closed (code ${code}${reason ? ": " + reason : ""})`);
    renderTyping();
    renderRooms();
  });
  client.on("error", ({ room, code, message }) => note(`error ${code}${room ? " in #" + room : ""}: ${message}`));
}

// ---- What the user does -----------------------------------------------------------------------
// Joins the room in #room (or `rooms`, from a link) and shows the first. A changed name or
// token, or a connection that was stopped, connects again: every room resumes.
function join(rooms) {
  const name = auth ? "" : $("name").value.trim();   // with tokens the server ignores `user`
  let wanted = rooms || [$("room").value.trim()];
  // The first join of a page opened from a link (held back for a token) takes all its rooms.
  const linked = roomsFromHash();
  if (!rooms && views.size === 0 && linked[0] === wanted[0]) wanted = linked;
  if (name && (name.length > 32 || !NAME_RE.test(name))) {
    setStatus("invalid name: up to 32 letters, digits, _ . - (starting with a letter or digit)", "bad");
    $("name").focus();
    return;
  }
  if (!wanted.length || !wanted.every((r) => NAME_RE.test(r))) {
    setStatus("invalid room: up to 64 letters, digits, _ . - (starting with a letter or digit)", "bad");
    $("room").focus();
    return;
  }
  let token = "";
  if (auth) {
    token = $("token").value.trim() || sessionStorage.getItem("confab.token") || "";
    if (!token) {
      setStatus("this server needs a token: enter one to join", "bad");
      $("token").focus();
      return;
    }
    sessionStorage.setItem("confab.token", token);
  } else {
    try { localStorage.setItem("confab.name", name); } catch { /* not remembered, that is all */ }
  }
  const again = client.status === "idle" || client.stopped || name !== typedName || token !== client.token;
  if (again) {
    typedName = name;
    client.user = name || sessionStorage.getItem("confab.guest") || "";
    client.token = token;
  }
  // A room held already is only shown (or asked for again, if the server refused it).
  for (const r of wanted) {
    view(r);
    client.join(r);
  }
  if (again) client.reconnect();
  shown === wanted[0] ? renderRooms() : show(wanted[0]);
  updateHash();
  $("message").focus();
}

function sendMessage() {
  const input = $("message");
  const text = input.value;
  if (!text.trim()) return;
  if (!shown) { setStatus("join a room first", "bad"); return; }
  client.send(shown, text);        // sent now if subscribed, else after the room's welcome
  input.value = "";
}

function loadOlder() {
  if (shown && client.loadOlder(shown)) updateOlder();
}

// ---- Start ------------------------------------------------------------------------------------
// Joining waits for `ready`: until /client.json answered, the page does not know about tokens.
const ready = boot();
$("join").addEventListener("click", () => ready.then(() => join()));
for (const id of ["name", "room", "token"]) {
  $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") ready.then(() => join()); });
}
$("send").addEventListener("click", sendMessage);
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.isComposing) { e.preventDefault(); sendMessage(); }
});
$("message").addEventListener("input", () => {
  if ($("message").value && shown) client.typing(shown);
});
$("older").addEventListener("click", loadOlder);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) { titleUnread = 0; updateTitle(); }
});
// Back online, or back on the tab: skip the rest of the backoff wait.
for (const [target, event] of [[window, "online"], [document, "visibilitychange"]]) {
  target.addEventListener(event, () => { if (client && !document.hidden) client.skipWait(); });
}
// A link edited by hand, or followed within the page: join what it names, show its first.
window.addEventListener("hashchange", () => {
  const rooms = roomsFromHash();
  if (rooms.length && (rooms[0] !== shown || rooms.some((r) => !views.has(r)))) {
    $("room").value = rooms[0];
    ready.then(() => join(rooms));
  }
});
// A page that breaks its own policy should say so where a developer looks.
document.addEventListener("securitypolicyviolation", (e) => {
  note(`blocked by the Content-Security-Policy: ${e.violatedDirective}`);
});

async function boot() {
  // Fields are filled before the first await, so nothing typed meanwhile is overwritten.
  $("token").value = sessionStorage.getItem("confab.token") || "";
  $("name").value = localStorage.getItem("confab.name") || "";
  // Older servers have no /client.json: anything but a clear answer means no token.
  try {
    const r = await fetch("/client.json", { cache: "no-store" });
    auth = r.ok && (await r.json()).auth === true;
  } catch { auth = false; }
  client = new Confab({ connect: false });
  // For tests and the curious: the connection this page holds.
  window.confab = client;
  start();
  $("token-field").hidden = !auth;
  $("name").closest(".field").hidden = auth;   // with tokens, the token says who we are
  if (auth && !$("token").value) setStatus("this server needs a token: enter one to join", "warn");
  // A link with rooms in its hash opens them at once.
  const rooms = roomsFromHash();
  if (rooms.length) {
    $("room").value = rooms[0];
    if (!auth || $("token").value) { join(rooms); return; }
  }
  (auth && !$("token").value ? $("token") : $("name")).focus();
}
