// confab.js: a client for confab's WebSocket protocol (docs/PROTOCOL.md), as an ES module any
// web app can import with no build step: `import { Confab } from "/confab.js"`.
//
// One connection carries any number of rooms: it opens on one of them (`GET /ws/{room}`, or
// `GET /ws` with none) and subscribes the others with frames (`pathRoomFor` says why). What a client has to get right, and
// where this one does it, each rule in one function:
// - Nothing typed is lost (`send`, `flush`, `onAck`, `onRefusal`). Each message goes into its
//   room's outbox with a fresh `ref` and stays there (also in localStorage, per room, so a
//   reload keeps it) until the server's `ack`. After every welcome of that room the outbox is
//   sent again, oldest first, with the same refs: the server acks a ref it already stored with
//   its first offset and does not publish it twice.
// - Nothing is missed or shown twice (`subscribeFrame`, `onWelcome`, `accept`). Messages are
//   keyed by epoch and offset; every (re)subscribe resumes with `since`/`epoch`. When that
//   cannot be recovered (history trimmed, lost or reset) the latest messages are loaded and a
//   gap is reported, not hidden.
// - Reconnecting (`lost`, `planFor`, `reconnectLater`): exponential backoff with full jitter,
//   capped; the close code decides whether to try again at all. 4008 (fell behind) resumes at
//   once; an `unsubscribed` 4008 for one room resubscribes that room alone.
// - A silent connection is given up (`heartbeat`): browsers cannot see WebSocket pings.
//
// The API is small: `new Confab(options)`, `join`, `leave`, `send`, `typing`, `loadOlder`,
// `retry`, `discard`, `reconnect`, `close`, and `on(event, handler)`. README.md documents it.

// ---- Tunables ---------------------------------------------------------------------------------
const HISTORY_PAGE = 50;        // messages asked for on joining, and per `loadOlder`
const BACKOFF_BASE_MS = 500;    // the first reconnect waits up to this, doubling per failure,
const BACKOFF_CAP_MS = 10000;   // never more than this (a restarted server is not stampeded)
const TYPING_EVERY_MS = 3000;   // send at most one typing notice per room per this
const TYPING_SHOW_MS = 5000;    // someone counts as typing this long after their last notice
const PING_EVERY_MS = 25000;    // a browser cannot see WebSocket pings, so ask with `ping`
const SILENCE_MS = 35000;       // and give a connection up when nothing came for this long
const MAX_FRAME_BYTES = 65536;  // the server's default limits.max_frame_bytes
const MAX_TRIES = 5;            // `unavailable`/`internal` answers before a message is given up
const SUBSCRIBE_BURST = 100;    // subscribes sent at once on a new connection, then
const SUBSCRIBE_PER_SEC = 10;   // this many a second: the server's default budget for them
                                // (limits.rooms_per_connection at once, messages_per_sec after)

/** Room and user names (docs/PROTOCOL.md §3.1). */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/** What a close code means for reconnecting (docs/PROTOCOL.md §8, RFC 6455 §7.4.1). */
export function planFor(code) {
  if (code === 4008) return "now";   // fell behind: resume at once to catch up
  if (code >= 4000 && code <= 4999) return "stop"; // 4001 token expired and other auth codes
  if (code === 1008) return "stop";  // policy (flooding): reconnecting would repeat it
  if (code === 1002 || code === 1003 || code === 1007) return "stop"; // a bug in this client
  return "later";                    // 1001 drain, 1006 dropped, 1011, 1013, …
}

/** Full jitter: a random wait in [0, min(cap, base·2^attempt)], so clients dropped together
 * by a restart do not all come back at the same moment. */
export function backoffDelay(attempt, random = Math.random) {
  return random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
}

let seq = 0;
/** A ref unique enough to be remembered by the server for 5 minutes. getRandomValues works on
 * plain http too (randomUUID needs a secure context). */
export function newRef(kind) {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return kind + "-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("") + (++seq);
}

// Storage that may be missing or full: the outbox then lives in memory only.
function memoryStorage() {
  const m = new Map();
  return {
    getItem: (k) => (m.has(k) ? m.get(k) : null),
    setItem: (k, v) => m.set(k, String(v)),
    removeItem: (k) => m.delete(k),
  };
}

/**
 * One room this client holds. Its fields are readable (a UI may show them); change them only
 * through the client's methods.
 */
class Room {
  constructor(name) {
    this.name = name;
    this.subscribed = false; // its welcome came on the current connection
    this.subRef = null;      // ref of the subscribe in flight
    this.epoch = null;       // the epoch offsets belong to; null until the first welcome
    this.cursor = 0;         // every message up to this offset was received: resume from here
    this.seen = new Set();   // "epoch:offset" of each message delivered, so none comes twice
    this.run = 0;            // messages come in runs with no gap inside; a gap starts a new run
    this.oldest = null;      // lowest offset of the current run (`loadOlder` reads before it)
    this.olderDone = false;  // history has nothing older than `oldest`
    this.olderRef = null;    // ref of the `loadOlder` request in flight
    this.outbox = [];        // our messages not yet acked, oldest first
    this.users = new Set();  // who is here (presence, join and leave applied as set operations)
    this.typers = new Map(); // user -> timer that ends their typing notice
    this.lastTypingSent = 0;
    this.flushTimer = null;
    this.refused = null;     // {code, message} when the server refused the subscription
    this.backlogTo = 0;      // offsets up to this came as the backlog of a first subscribe or a
                             // gap: already there when we came, so not `fresh` (unread counts)
  }

  get typingUsers() {
    return [...this.typers.keys()].sort();
  }
}

/**
 * A connection to a confab server holding any number of rooms.
 *
 * Options (all optional): `url` the WebSocket endpoint (default: `ws(s)://<this host>/ws`),
 * `user` the name to ask for in anonymous mode, `token` a JWT (sent as the `token.<jwt>`
 * subprotocol), `history` messages to load on joining (50), `storage` where outboxes are kept
 * (default `localStorage`), `connect` false to wait for `reconnect()`.
 */
export class Confab {
  constructor(options = {}) {
    this.url = options.url || defaultUrl();
    this.user = options.user || "";   // asked for; the welcome says who we are
    this.token = options.token || "";
    this.historyPage = options.history || HISTORY_PAGE;
    this.storage = options.storage || safeLocalStorage();
    this.rooms = new Map();           // name -> Room, in the order joined
    this.status = "idle";             // idle | connecting | connected | offline | stopped
    this.ws = null;                   // the live socket; events of any older one are ignored
    this.opened = false;              // `ws` opened (a refused handshake never does)
    this.attempt = 0;                 // failed connects in a row, for the backoff
    this.connects = 0;                // sockets opened so far (tests and UIs may read it)
    this.stopped = false;             // reconnecting was given up until `reconnect()`
    this.pathRoom = null;             // the room in the current socket's URL, if any
    this.subQueue = [];               // rooms waiting for their subscribe to be sent
    this.subTokens = SUBSCRIBE_BURST; // see `pumpSubscribes`
    this.subRefilled = 0;
    this.subTimer = null;
    this.retryTimer = null;
    this.retryAt = 0;
    this.pingTimer = null;
    this.lastFrameAt = 0;
    this.handlers = new Map();
    if (options.connect !== false) this.connect();
  }

  // ---- Events ---------------------------------------------------------------------------------
  /** Calls `handler(detail)` on each `event`; returns a function that stops it. */
  on(event, handler) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(handler);
    return () => this.handlers.get(event).delete(handler);
  }

  emit(event, detail) {
    for (const h of this.handlers.get(event) || []) {
      try { h(detail); } catch (e) { console.error(`confab ${event} handler`, e); }
    }
  }

  setStatus(status, detail = {}) {
    this.status = status;
    this.emit("status", { status, ...detail });
  }

  // ---- Rooms ----------------------------------------------------------------------------------
  /** Holds `name` on this connection (subscribing now or after the next connect); its saved
   * outbox is loaded and reported as `queued` events. Returns the Room. */
  join(name) {
    if (!NAME_RE.test(name)) throw new Error(`invalid room name: ${name}`);
    let room = this.rooms.get(name);
    if (room) {
      if (room.refused && this.isOpen()) this.subscribe(room); // asked again: maybe allowed now
      return room;
    }
    room = new Room(name);
    this.rooms.set(name, room);
    this.loadOutbox(room);
    if (this.isOpen()) this.subscribe(room);
    else if (!this.ws && !this.retryTimer && !this.stopped && this.status !== "idle") this.connect();
    return room;
  }

  /** Stops holding `name`: unsubscribes, forgets what was seen. Its unacked messages stay in
   * storage and are sent when the room is joined again. */
  leave(name) {
    const room = this.rooms.get(name);
    if (!room) return;
    this.rooms.delete(name);
    clearTimeout(room.flushTimer);
    room.typers.forEach((t) => clearTimeout(t));
    this.subQueue = this.subQueue.filter((r) => r !== room);
    if (room.subscribed || room.subRef || name === this.pathRoom) {
      this.sendFrame({ type: "unsubscribe", room: name, ref: newRef("u") });
    }
    if (name === this.pathRoom) this.pathRoom = null;
  }

  // The subscribe frame is the same for a first join and a resume: `history` asks for the
  // latest messages, which the server sends only when there is nothing to resume from.
  subscribeFrame(room) {
    room.subRef = newRef("s");
    const frame = { type: "subscribe", room: room.name, history: this.historyPage, ref: room.subRef };
    if (room.epoch !== null) {
      frame.since = room.cursor;
      frame.epoch = room.epoch;
    }
    return frame;
  }

  subscribe(room) {
    room.subscribed = false;
    room.refused = null;
    if (!this.subQueue.includes(room)) this.subQueue.push(room);
    this.pumpSubscribes();
  }

  // Subscribes are paced: the server gives subscribes and unsubscribes a budget of their own
  // (a burst of `limits.rooms_per_connection`, refilled at `limits.messages_per_sec`), and a
  // client that kept sending past it would be refused, then closed with 1008 past
  // `limits.max_violations` refusals. A local token bucket (SUBSCRIBE_BURST,
  // SUBSCRIBE_PER_SEC) keeps under the server's defaults; a server set lower answers
  // `rate_limited`, and those are asked again (`resubscribeLater`).
  pumpSubscribes() {
    clearTimeout(this.subTimer);
    this.subTimer = null;
    if (!this.isOpen()) return;
    const now = Date.now();
    this.subTokens = Math.min(SUBSCRIBE_BURST, this.subTokens + (now - this.subRefilled) * SUBSCRIBE_PER_SEC / 1000);
    this.subRefilled = now;
    while (this.subQueue.length && this.subTokens >= 1) {
      const room = this.subQueue.shift();
      if (this.rooms.get(room.name) !== room || room.subscribed) continue; // left meanwhile
      this.subTokens -= 1;
      this.sendFrame(this.subscribeFrame(room));
    }
    if (this.subQueue.length) this.subTimer = setTimeout(() => this.pumpSubscribes(), 1000 / SUBSCRIBE_PER_SEC);
  }

  // ---- Sending --------------------------------------------------------------------------------
  /** Queues `text` for `room` with a fresh ref and sends it when the room is subscribed.
   * Returns the outbox entry `{ref, room, text, state}`; `ack` or `refused` follows. */
  send(roomName, text) {
    const room = this.rooms.get(roomName);
    if (!room) throw new Error(`not in room ${roomName}`);
    const entry = this.queue(room, text, newRef("m"));
    room.lastTypingSent = 0;
    this.flush(room);
    return entry;
  }

  queue(room, text, ref) {
    const entry = {
      ref, text, room: room.name,
      state: "sending", // sending | failed
      sent: false,      // sent on the current connection (answer pending)
      resent: false,    // sent by the client after a (re)subscribe rather than by the user
      tries: 0,         // answers worth a retry so far (see onRefusal)
    };
    room.outbox.push(entry);
    this.saveOutbox(room);
    this.emit("queued", { room: room.name, entry });
    return entry;
  }

  // Sends, in order, every outbox entry of `room` not sent on this connection yet; nothing
  // before the room's welcome, so the server keeps our send order across a resume.
  flush(room) {
    clearTimeout(room.flushTimer);
    if (!room.subscribed) return;
    for (const e of room.outbox) {
      if (e.sent || e.state === "failed") continue;
      const frame = { type: "message", room: room.name, text: e.text, ref: e.ref };
      if (new TextEncoder().encode(JSON.stringify(frame)).length > MAX_FRAME_BYTES) {
        this.fail(room, e, "too_long", "too long to send"); // the server would close the connection
        continue;
      }
      if (!this.sendFrame(frame)) return;
      e.sent = true;
    }
  }

  /** Sends a refused entry again (the user's own retry, judged as such). */
  retry(entry) {
    const room = this.rooms.get(entry.room);
    if (!room || entry.state !== "failed") return;
    entry.state = "sending";
    entry.sent = false;
    entry.resent = false;
    entry.tries = 0;
    this.saveOutbox(room);
    this.emit("queued", { room: room.name, entry, again: true });
    this.flush(room);
  }

  /** Drops an entry from its outbox (e.g. the user edits a refused message instead). */
  discard(entry) {
    const room = this.rooms.get(entry.room);
    if (!room) return;
    room.outbox = room.outbox.filter((e) => e !== entry);
    this.saveOutbox(room);
  }

  /** Tells the room we are typing, at most once per 3 s. Returns whether it was sent. */
  typing(roomName) {
    const room = this.rooms.get(roomName);
    const now = Date.now();
    if (!room || !room.subscribed || now - room.lastTypingSent < TYPING_EVERY_MS) return false;
    room.lastTypingSent = now;
    return this.sendFrame({ type: "typing", room: room.name });
  }

  /** Asks for the page of history before the oldest message of the current run; the messages
   * come as `message` events with `older: true`, then one `older` event. */
  loadOlder(roomName) {
    const room = this.rooms.get(roomName);
    if (!room || room.olderRef || room.oldest === null || !room.subscribed) return false;
    room.olderRef = newRef("h");
    const frame = { type: "history", room: room.name, before: room.oldest, limit: this.historyPage, ref: room.olderRef };
    if (!this.sendFrame(frame)) room.olderRef = null;
    return room.olderRef !== null;
  }

  // ---- The outbox in storage ------------------------------------------------------------------
  outboxKey(room) {
    return "confab.outbox." + room.name;
  }

  // Only what is needed to send again; a refused message is the user's to retry, not ours.
  saveOutbox(room) {
    try {
      const keep = room.outbox.filter((e) => e.state !== "failed").map(({ ref, text }) => ({ ref, text }));
      if (keep.length) this.storage.setItem(this.outboxKey(room), JSON.stringify(keep));
      else this.storage.removeItem(this.outboxKey(room));
    } catch { /* storage disabled or full: the outbox still lives in memory */ }
  }

  loadOutbox(room) {
    let saved = [];
    try { saved = JSON.parse(this.storage.getItem(this.outboxKey(room)) || "[]"); } catch { saved = []; }
    for (const e of Array.isArray(saved) ? saved : []) {
      if (typeof e.ref === "string" && typeof e.text === "string") this.queue(room, e.text, e.ref);
    }
  }

  // ---- Connecting -----------------------------------------------------------------------------
  isOpen() {
    return this.ws !== null && this.opened;
  }

  sendFrame(frame) {
    if (!this.isOpen()) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Connects again now, resuming every room: after `stopped`, or with a new `token`/`user`
   * (set them first). */
  reconnect() {
    const old = this.ws;
    this.ws = null;                  // its close event is then ignored
    if (old) old.close(1000, "reconnecting");
    this.attempt = 0;
    this.stopped = false;
    this.connect();
  }

  /** Closes the connection for good (until `reconnect()`). */
  close() {
    const old = this.ws;
    this.ws = null;
    this.stopTimers();
    if (old) old.close(1000, "closing");
    this.stopped = true;
    this.setStatus("stopped", { reason: "closed" });
  }

  stopTimers() {
    clearTimeout(this.retryTimer);
    clearInterval(this.pingTimer);
    clearTimeout(this.subTimer);
    this.retryTimer = this.pingTimer = this.subTimer = null;
  }

  // The room a connection opens on (`/ws/{room}`), the others are subscribed with frames.
  // A one-room client is then on the wire what it always was (the same URL, no subscribe
  // frame: subscribes count against `limits.messages_per_sec` like any frame), and N rooms
  // cost N-1 subscribes. Only a room the server welcomed before, or a lone room without a
  // token, goes in the path: a refused path room (403, the token's `rooms`) fails the whole
  // handshake, which a browser can only read as a refused token, where a refused subscribe
  // is that room's alone.
  pathRoomFor() {
    const open = [...this.rooms.values()].filter((r) => !r.refused);
    return open.find((r) => r.epoch !== null) || (open.length === 1 && !this.token ? open[0] : null);
  }

  // The URL's query holds what a subscribe frame would: `history` for a first join, and
  // `since`/`epoch` to resume.
  connectUrl(path) {
    const params = new URLSearchParams();
    if (this.user) params.set("user", this.user);
    const query = params.toString();  // (URLSearchParams.size is too new for some browsers)
    if (!path) return this.url + (query ? "?" + query : "");
    for (const [k, v] of Object.entries(this.subscribeFrame(path))) {
      if (k === "history" || k === "since" || k === "epoch") params.set(k, String(v));
    }
    path.subRef = null;              // its welcome answers the URL, so it carries no ref
    return `${this.url}/${encodeURIComponent(path.name)}?${params}`;
  }

  connect() {
    this.stopTimers();
    const path = this.pathRoomFor();
    this.pathRoom = path ? path.name : null;
    const url = this.connectUrl(path);
    // Browsers cannot set headers on a WebSocket: the token rides as a subprotocol beside
    // `confab.v1` (docs/PROTOCOL.md §3.2).
    const sock = this.token ? new WebSocket(url, ["confab.v1", "token." + this.token]) : new WebSocket(url);
    this.ws = sock;
    this.opened = false;
    this.connects++;
    for (const room of this.rooms.values()) room.subscribed = false;
    const resuming = [...this.rooms.values()].some((r) => r.epoch !== null);
    this.setStatus("connecting", { resuming });

    sock.onopen = () => {
      if (sock !== this.ws) return;
      this.opened = true;
      this.lastFrameAt = Date.now();
      // A new session: the server's bucket for it is full.
      this.subQueue = [];
      this.subTokens = SUBSCRIBE_BURST;
      this.subRefilled = Date.now();
      this.heartbeat();
      for (const room of this.rooms.values()) if (room.name !== this.pathRoom) this.subscribe(room);
      if (this.rooms.size === 0) this.connected();
    };
    sock.onmessage = (ev) => {
      if (sock !== this.ws) return;
      this.lastFrameAt = Date.now();
      let f;
      try { f = JSON.parse(ev.data); } catch { return; }
      this.handle(f);
    };
    sock.onclose = (ev) => {
      if (sock !== this.ws) return; // a deliberate close or a superseded socket
      this.lost(ev.code, ev.reason);
    };
  }

  connected() {
    this.attempt = 0;
    if (this.status !== "connected") this.setStatus("connected");
  }

  // Half-open connections never close by themselves: ask with `ping`, give up on silence.
  heartbeat() {
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => {
      if (Date.now() - this.lastFrameAt > SILENCE_MS) {
        const sock = this.ws;
        this.lost(1006, "no answer from the server");
        if (sock) sock.close();
      } else {
        this.sendFrame({ type: "ping" });
      }
    }, PING_EVERY_MS);
  }

  // The connection is gone: decide, from how it ended, whether and when to connect again.
  lost(code, reason) {
    const opened = this.opened;
    this.ws = null;
    this.opened = false;
    this.stopTimers();
    for (const room of this.rooms.values()) {
      room.subscribed = false;
      room.subRef = null;
      room.olderRef = null;
      room.typers.forEach((t) => clearTimeout(t));
      room.typers.clear();
      for (const e of room.outbox) e.sent = false;
      this.emit("typing", { room: room.name, users: [] });
    }
    this.emit("closed", { code, reason });
    if (code === 1009) {
      // A frame was over the server's size limit: give up the largest message in flight, or
      // sending it again after the reconnect would close the connection again.
      const all = [...this.rooms.values()].flatMap((r) => r.outbox.filter((e) => e.state !== "failed"));
      const big = all.sort((a, b) => b.text.length - a.text.length)[0];
      if (big) this.fail(this.rooms.get(big.room), big, "too_long", "too large for this server");
    }
    if (this.token && !opened) {
      // A browser never learns the HTTP status of a refused handshake. If the server answers
      // and is ready, the refusal was about us (401: the token): stop and ask for a new one.
      // If it does not answer, it is down or draining: try again later.
      const asked = this.connects;
      const ready = new URL("/readyz", this.url.replace(/^ws/, "http"));
      fetch(ready, { cache: "no-store" }).then((r) => r.ok, () => false).then((serverUp) => {
        if (this.connects !== asked || this.stopped || this.ws) return; // reconnected meanwhile
        if (serverUp) this.stop("token", "the server refused the token (invalid, expired, or not for this room): enter a new one", code);
        else this.reconnectLater();
      });
      return;
    }
    switch (planFor(code)) {
      case "now": this.attempt = 0; this.connect(); break;
      case "stop":
        this.stop(code === 4001 ? "token" : "closed", code === 4001 ? "token expired: enter a new one"
          : `disconnected by the server (${code}${reason ? ": " + reason : ""})`, code);
        break;
      default: this.reconnectLater();
    }
  }

  reconnectLater() {
    const delay = backoffDelay(this.attempt);
    this.attempt++;
    this.retryAt = Date.now() + delay;
    this.retryTimer = setTimeout(() => { this.retryTimer = null; this.connect(); }, delay);
    this.setStatus("offline", { retryAt: this.retryAt });
  }

  /** When waiting to reconnect, connects now (the network or the tab came back). */
  skipWait() {
    if (this.retryTimer) { this.attempt = 0; this.connect(); }
  }

  stop(why, reason, code) {
    this.stopped = true;
    this.setStatus("stopped", { why, reason, code });
  }

  // ---- Frames from the server -----------------------------------------------------------------
  handle(f) {
    if (f.type === "pong") return;
    if (f.type === "error") { this.onError(f); return; }
    const room = this.rooms.get(f.room);
    if (!room) return;               // a room we left meanwhile
    switch (f.type) {
      case "welcome": this.onWelcome(room, f); break;
      case "message": {
        this.accept(room, f, false);
        if (f.offset > room.cursor) room.cursor = f.offset;
        this.stopTyping(room, f.user);
        break;
      }
      case "ack": this.onAck(room, f); break;
      case "history": this.onHistory(room, f); break;
      case "reset":
        // The room's history was lost or expired: offsets start again. Keep what was
        // delivered, report the gap, and load what the new epoch already has.
        this.startRun(room, "The room's history was reset here; messages before it may be gone.");
        room.epoch = f.epoch;
        room.cursor = f.offset;
        room.backlogTo = f.offset;
        this.sendFrame({ type: "history", room: room.name, limit: this.historyPage, ref: newRef("h") });
        break;
      case "presence":
        room.users = new Set(f.users || []);
        this.emit("presence", { room: room.name, users: room.users });
        break;
      case "join":
        room.users.add(f.user);
        this.emit("join", { room: room.name, user: f.user, users: room.users });
        break;
      case "leave":
        room.users.delete(f.user);
        this.stopTyping(room, f.user);
        this.emit("leave", { room: room.name, user: f.user, users: room.users });
        break;
      case "typing":
        if (f.user === this.user) break;
        clearTimeout(room.typers.get(f.user));
        room.typers.set(f.user, setTimeout(() => this.stopTyping(room, f.user), TYPING_SHOW_MS));
        this.emit("typing", { room: room.name, users: room.typingUsers });
        break;
      case "unsubscribed": this.onUnsubscribed(room, f); break;
    }
  }

  stopTyping(room, user) {
    if (!room.typers.has(user)) return;
    clearTimeout(room.typers.get(user));
    room.typers.delete(user);
    this.emit("typing", { room: room.name, users: room.typingUsers });
  }

  // The one place that decides what happens after a room's (re)subscribe.
  onWelcome(room, f) {
    // Only the answer to our latest subscribe (or the path room's URL) counts.
    if (f.ref ? f.ref !== room.subRef : room.name !== this.pathRoom) return;
    room.subRef = null;
    room.subscribed = true;
    room.refused = null;
    // Who the server says we are: the name asked for, a generated guest name, or the token's
    // subject. Asking for the same name on reconnect keeps our refs ours (they are
    // de-duplicated per user).
    this.user = f.user;
    // 1. Continuity. The server sends what follows the welcome; only a gap needs us.
    let gap = null;
    if (room.epoch === null) {
      // First subscribe: the latest messages follow (`history`), then live ones.
    } else if (f.recovered === true) {
      // Resumed: every message after `cursor` follows, then live ones. Nothing to do.
    } else if (room.cursor > 0) {
      // Not resumable (trimmed, lost or reset history, or a 4008 gap): the latest messages
      // follow. What was delivered stays; the gap between the two is reported.
      gap = f.epoch === room.epoch
        ? "Messages were missed here: they are no longer in the room's history."
        : "The room's history was reset here; messages before it may be gone.";
    }
    if (f.recovered !== true) {
      room.epoch = f.epoch;
      room.cursor = f.offset;
      room.backlogTo = f.offset;   // what follows up to here was there before we came
    }
    if (gap) this.startRun(room, gap);
    this.emit("welcome", { room: room.name, user: f.user, recovered: f.recovered, epoch: f.epoch, offset: f.offset, gap });
    // 2. Our unacked messages, oldest first, with their original refs: a ref the server
    //    already stored (its ack was lost with the connection) is acked with its first offset
    //    and not published again, so each message appears once.
    for (const e of room.outbox) {
      e.sent = false;
      e.resent = true;
    }
    this.flush(room);
    this.connected();
  }

  // A gap we cannot fill: what follows is a new run, reported with the reason.
  startRun(room, why) {
    room.run++;
    room.oldest = null;
    room.olderDone = false;
    this.emit("gap", { room: room.name, run: room.run, reason: why });
  }

  // Delivers a stored message once, whether it came live, in a backlog or in a history page.
  accept(room, m, older) {
    if (typeof m.offset !== "number") return false;
    const key = room.epoch + ":" + m.offset;
    if (room.seen.has(key)) {
      // Our own message, delivered when its ack came; its echo brings the token's display name.
      if (m.name) this.emit("named", { room: room.name, run: room.run, offset: m.offset, user: m.user, name: m.name });
      return false;
    }
    room.seen.add(key);
    if (room.oldest === null || m.offset < room.oldest) room.oldest = m.offset;
    const message = { offset: m.offset, user: m.user, name: m.name, text: m.text, ts: m.ts || Date.now() };
    const mine = m.user === this.user;
    // Fresh: new since we last looked (live, or missed while away and resumed), not a backlog.
    const fresh = !older && !mine && m.offset > room.backlogTo;
    this.emit("message", { room: room.name, run: room.run, message, older, mine, fresh });
    return true;
  }

  // The server acked our message: it is stored at `offset`.
  onAck(room, f) {
    const entry = room.outbox.find((e) => e.ref === f.ref);
    if (!entry) return;
    room.outbox = room.outbox.filter((e) => e !== entry);
    this.saveOutbox(room);
    const key = room.epoch + ":" + f.offset;
    const arrived = room.seen.has(key); // the message itself came first
    room.seen.add(key);
    if (!arrived && (room.oldest === null || f.offset < room.oldest)) room.oldest = f.offset;
    this.emit("ack", { room: room.name, run: room.run, entry, offset: f.offset, arrived });
  }

  // Refused for a reason that sending the same again would meet again: the user decides.
  fail(room, entry, code, message) {
    entry.state = "failed";
    // Kept in memory (not storage), after the others, until retried or discarded.
    room.outbox = room.outbox.filter((e) => e !== entry).concat(entry);
    this.saveOutbox(room);
    this.emit("refused", { room: room.name, entry, code, message, canRetry: code === "rate_limited" });
  }

  onError(f) {
    const room = f.room ? this.rooms.get(f.room) : [...this.rooms.values()].find((r) =>
      f.ref && (r.subRef === f.ref || r.olderRef === f.ref || r.outbox.some((e) => e.ref === f.ref)));
    if (room && f.ref && f.ref === room.subRef) {
      room.subRef = null;
      if (f.code === "rate_limited" || f.code === "unavailable" || f.code === "internal") {
        this.resubscribeLater(room, f.code);
        return;
      }
      // Refused for good (forbidden, too_many_rooms, bad_request): no retry, that would
      // meet the same answer; joining the room again asks again.
      room.refused = { code: f.code, message: f.message };
      this.emit("refused-room", { room: room.name, code: f.code, message: f.message });
      if (![...this.rooms.values()].some((r) => r.subRef)) this.connected();
      return;
    }
    const entry = room && f.ref && room.outbox.find((e) => e.ref === f.ref);
    if (entry) {
      this.onRefusal(room, entry, f);
      return;
    }
    if (room && f.ref && f.ref === room.olderRef) {
      room.olderRef = null;
      this.emit("older", { room: room.name, count: 0, done: room.olderDone });
    }
    this.emit("error", { room: f.room, code: f.code, message: f.message, ref: f.ref });
  }

  // A subscribe that met the rate limit (a server whose subscribe budget is set below what
  // this client sends at once) or a server that could not answer it: asked
  // again after 1-3 s, on the same connection, unless the room was left meanwhile.
  resubscribeLater(room, code) {
    const sock = this.ws;
    setTimeout(() => {
      if (sock === this.ws && this.isOpen() && this.rooms.get(room.name) === room &&
          !room.subscribed && !room.subRef && !this.subQueue.includes(room)) this.subscribe(room);
    }, 1000 + Math.random() * 2000);
    this.emit("retrying", { room: room.name, code });
  }

  // Worth trying again shortly: the server could not store it (`unavailable`, `internal`; the
  // ref makes a retry safe), or it met the rate limit while the client itself re-sent the
  // outbox after a (re)subscribe (our burst, not the user's). Anything else would meet the
  // same answer again.
  onRefusal(room, entry, f) {
    const ours = f.code === "rate_limited" && entry.resent;
    if ((f.code === "unavailable" || f.code === "internal" || ours) && ++entry.tries < MAX_TRIES) {
      entry.sent = false;
      clearTimeout(room.flushTimer);
      room.flushTimer = setTimeout(() => this.flush(room), 1000 + Math.random() * 2000);
      this.emit("retrying", { room: room.name, entry, code: f.code });
    } else {
      this.fail(room, entry, f.code, f.message || f.code);
    }
  }

  onHistory(room, f) {
    if (f.epoch !== room.epoch) return; // from before a reset; that reset reloads history
    const older = f.ref !== undefined && f.ref === room.olderRef;
    const messages = f.messages || [];
    for (const m of messages) {
      this.accept(room, m, older);
      if (!older && m.offset > room.cursor) room.cursor = m.offset;
    }
    if (older) {
      room.olderRef = null;
      if (messages.length < this.historyPage) room.olderDone = true;
      this.emit("older", { room: room.name, count: messages.length, done: room.olderDone });
    }
  }

  // The server ended a subscription. Ours (`leave`) is done already; a 4008 (a gap that
  // history no longer holds) is resubscribed at once with since/epoch: the welcome then says
  // `recovered:false` and the gap is reported. Anything else ends the room and says why.
  onUnsubscribed(room, f) {
    if (f.code === undefined || f.code === null) return;
    room.subscribed = false;
    for (const e of room.outbox) e.sent = false;
    if (f.code === 4008) {
      this.subscribe(room);
    } else {
      room.refused = { code: f.code, message: f.reason };
    }
    this.emit("unsubscribed", { room: room.name, code: f.code, reason: f.reason, resubscribing: f.code === 4008 });
  }
}

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

function safeLocalStorage() {
  try {
    const s = globalThis.localStorage;
    if (s) return s;
  } catch { /* disabled by the browser's settings */ }
  return memoryStorage();
}
