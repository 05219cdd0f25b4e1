// berth.js: the berth client for browsers, React Native and Node (20+).
//
// One ES module, no dependencies. It keeps the guarantees of the wire
// protocol (docs/protocol.md) for the application:
//   - an op's promise resolves only with its durable result, and the op is
//     applied exactly once: it is stored before it is sent and re-sent with
//     the same id across reconnects (and app restarts) until answered;
//   - ONE op in flight per session, in order (see `_pump`): the server takes
//     an id at or below the highest applied one for a duplicate, so an op
//     answered `unavailable` / `rate_limited` (not applied) can be sent again
//     with the same id only if no later op was sent meanwhile;
//   - events reach the app in order and once (replays dropped by `seq`), and
//     are acknowledged (in batches) after the app's handlers return;
//   - resume with the stored session and token, routing hints in the URL,
//     full-jitter exponential backoff, close codes as protocol.md says, and
//     a dead connection noticed within seconds by `ping`/`pong` frames.
// docs/clients.md explains the state machine step by step.

/** Version of the wire protocol this client speaks. */
export const PROTOCOL_VERSION = 1;

/** Result error codes meaning "NOT applied: send the same op again". */
const NOT_APPLIED = new Set(['unavailable', 'rate_limited', 'internal']);

/** Why a client stopped, by close code (protocol.md's "Close codes"). */
const STOP_REASON = {
  1000: 'ended',
  1008: 'unauthorized',
  1009: 'frame_too_large',
  4000: 'taken_over',
  4004: 'session_lost',
};

const DEFAULTS = {
  storageKey: 'berth',
  newSessionOnLoss: false,
  backoffBaseMs: 250,
  backoffCapMs: 10000,
  openTimeoutMs: 5000,
  welcomeTimeoutMs: 10000,
  pingAfterMs: 1500,
  idlePingMs: 15000,
  pongTimeoutMs: 3000,
  answerTimeoutMs: 30000,
  ackDelayMs: 100,
  ackEvery: 32,
  maxFrameBytes: 65536,
  zombieWindowMs: 15000,
};

/** An error the server (or this client) gives for an op or a connection. */
export class BerthError extends Error {
  /**
   * @param {string} code protocol error code (`bad_args`, `type_mismatch`, ...)
   *   or a client one (`session_lost`, `session_ended`, `too_large`)
   * @param {string} message
   * @param {object} [extra] `id`, `op`, `version` for an op's error
   */
  constructor(code, message, extra) {
    super(message);
    this.name = 'BerthError';
    this.code = code;
    if (extra) Object.assign(this, extra);
  }
}

/**
 * Storage that lives as long as the page or process (tests, or an app that
 * does not need to survive a restart).
 * @param {Record<string,string>} [initial]
 */
export function memoryStorage(initial) {
  const m = new Map(Object.entries(initial || {}));
  return {
    async get(k) { return m.has(k) ? m.get(k) : null; },
    async set(k, v) { m.set(k, String(v)); },
    async remove(k) { m.delete(k); },
  };
}

/**
 * Storage over anything with `getItem`/`setItem`/`removeItem`, synchronous
 * (`localStorage`, `sessionStorage`) or returning promises (React Native's
 * AsyncStorage).
 * @param {{getItem(k:string):any, setItem(k:string,v:string):any, removeItem(k:string):any}} [store]
 */
export function webStorage(store) {
  const s = store || globalThis.localStorage;
  if (!s) throw new TypeError('webStorage: no store given and no localStorage here');
  return {
    async get(k) { const v = await s.getItem(k); return v == null ? null : v; },
    async set(k, v) { await s.setItem(k, v); },
    async remove(k) { await s.removeItem(k); },
  };
}

const now = () => Date.now();
/** UTF-8 length of `s` (no TextEncoder needed: older React Native engines lack it). */
function byteLength(s) {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c < 0xdc00 && i + 1 < s.length) { n += 4; i++; } // a surrogate pair
    else n += 3;
  }
  return n;
}

/** A fresh persisted record: what survives an app restart. */
function blank() {
  return {v: 1, session: null, token: null, node: null, ack: 0, lastOp: 0, nextId: 1, pending: []};
}

function readRecord(text) {
  let r = null;
  try { r = JSON.parse(text); } catch (e) { /* unreadable: start over */ }
  if (!r || typeof r !== 'object' || r.v !== 1) return blank();
  const b = blank();
  if (typeof r.session === 'string') b.session = r.session;
  if (typeof r.token === 'string') b.token = r.token;
  if (typeof r.node === 'string') b.node = r.node;
  b.ack = Number(r.ack) || 0;
  b.lastOp = Number(r.lastOp) || 0;
  b.nextId = Math.max(1, Number(r.nextId) || 1);
  if (Array.isArray(r.pending)) {
    b.pending = r.pending.filter(p => p && Number.isSafeInteger(p.id) && typeof p.op === 'string')
      .map(p => ({id: p.id, op: p.op, args: p.args === undefined ? {} : p.args}))
      .sort((a, c) => a.id - c.id);
  }
  for (const p of b.pending) b.nextId = Math.max(b.nextId, p.id + 1);
  return b;
}

/**
 * A client of one berth session. See berth.d.ts for the types and
 * docs/clients.md for the guarantees.
 */
export class BerthClient {
  /** @param {import('./berth').BerthOptions} options */
  constructor(options) {
    const o = Object.assign({}, DEFAULTS, options || {});
    const urls = o.urls || (o.url ? [o.url] : null);
    if (!Array.isArray(urls) || !urls.length) throw new TypeError('BerthClient: `urls` (or `url`) is required');
    this._o = o;
    this._urls = urls.slice();
    this._urlIndex = 0;
    this._storage = o.storage || memoryStorage();
    this._key = o.storageKey;
    this._WS = o.WebSocket || globalThis.WebSocket;
    if (typeof this._WS !== 'function') throw new TypeError('BerthClient: no WebSocket here: pass `WebSocket`');
    this._credential = o.credential;
    this._listeners = new Map();
    if (o.onEvent) this.on('event', o.onEvent);
    if (o.onState) this._on('state', o.onState);

    this._st = blank();            // the persisted record
    this._queue = [];              // ops not answered yet, in id order: {id, op, args, resolve?, reject?, detail, saved}
    this._inflight = null;         // the queue's head while it is sent on the current connection
    this._events = [];             // received, not handled yet
    this._received = 0;            // highest event seq received (replays at or below it are dropped)
    this._draining = false;
    this._epoch = 0;               // bumped when the session changes: events of an older one are not acknowledged
    this._ackSent = 0;
    this._ackTimer = null;
    this._conn = null;
    this._retryTimer = null;
    this._opRetryTimer = null;
    this._attempt = 0;
    this._opAttempt = 0;
    this._fastRetry = true;        // the first 1012 reconnects at once, later ones back off
    this._running = false;
    this._ending = null;           // {resolve} while end() waits for the server's close
    this._pingId = 0;
    this._lastClose = null;
    this._lastError = null;
    this._zombieUntil = 0;         // see `_closeConn`: a 4000 before it may come from our own abandoned hello
    this._saving = Promise.resolve();
    this._saveQueued = false;
    this._loaded = null;
    this.state = 'idle';
    this.stateDetail = {};
  }

  // ---------------------------------------------------------------- public

  /** The session id, once known. */
  get session() { return this._st.session; }
  /** The node that owns the session, from the last `welcome`. */
  get node() { return this._st.node; }
  /** The URL of the current connection (null when none is open). */
  get url() { return this._conn ? this._conn.url : null; }
  /** Ops not answered yet (in the order they will be applied). */
  get pending() { return this._queue.map(e => ({id: e.id, op: e.op, args: e.args})); }

  /**
   * Subscribes to `event` (handler(body, seq), awaited; the event is
   * acknowledged after every handler returned), `state`, `welcome`,
   * `queued` (an op got its id),
   * `session`, `result` (answers to ops restored from storage, whose
   * promises died with the previous app instance) or `error`.
   * @returns {() => void} unsubscribes
   */
  on(type, fn) {
    const off = this._on(type, fn);
    if (type === 'event') this._drain();
    return off;
  }

  /**
   * Loads the stored session and pending ops, then connects (and keeps
   * reconnecting until stopped). Resolves once loaded, not once connected:
   * watch `state`. Calling it again after a stop starts again.
   */
  async start() {
    await this._load();
    if (this._running) return;
    this._running = true;
    this._attempt = 0;
    this._fastRetry = true;
    this._connect();
  }

  /**
   * Runs op `name` on the session. Resolves with the op's value once it is
   * durable (or, with `{detail: true}`, with `{id, value, version,
   * duplicate}`); rejects with a BerthError for an application error
   * (`bad_args`, `type_mismatch`, ...) or when the session is lost
   * (`session_lost`, `session_ended`). While the client is stopped the op
   * waits (stored) until it starts again.
   * @param {string} name
   * @param {object} [args]
   * @param {{detail?: boolean}} [opts]
   */
  async op(name, args, opts) {
    if (typeof name !== 'string' || !name) throw new TypeError('op: a name is required');
    await this._load();
    const a = args === undefined ? {} : args;
    // Refused here rather than by the server's close 1009, which would stop the client.
    const size = byteLength(JSON.stringify({type: 'op', id: Number.MAX_SAFE_INTEGER, op: name, args: a}));
    if (size > this._o.maxFrameBytes) {
      throw new BerthError('too_large', `op frame of ${size} bytes is over maxFrameBytes (${this._o.maxFrameBytes})`, {op: name});
    }
    let entry;
    const p = new Promise((resolve, reject) => {
      entry = {id: this._st.nextId++, op: name, args: a, resolve, reject, detail: !!(opts && opts.detail), saved: false};
    });
    this._queue.push(entry);
    this._emit('queued', {id: entry.id, op: name, args: a});
    // Stored before it is sent: a restarted app sends it again with its id.
    await this._save();
    entry.saved = true;
    this._pump();
    return p;
  }

  /**
   * Resolves once every op is answered (ops added meanwhile included).
   * @param {number} [timeoutMs] rejects after it (default: never)
   */
  idle(timeoutMs) {
    return new Promise((resolve, reject) => {
      const t0 = now();
      const check = () => {
        if (!this._queue.length) return resolve();
        if (timeoutMs != null && now() - t0 > timeoutMs) {
          return reject(new BerthError('timeout', `${this._queue.length} op(s) still pending after ${timeoutMs} ms`));
        }
        setTimeout(check, 20);
      };
      check();
    });
  }

  /**
   * Stops: closes the connection, no more reconnects. The session, its
   * token and the pending ops stay stored; `start()` resumes them.
   */
  close() {
    this._stop('closed', null);
  }

  /**
   * Ends the session (`bye`: the server deletes its state). Ops not yet
   * answered are rejected with `session_ended`. Resolves once the server
   * closed the connection with 1000 (it waits for a connection to send
   * `bye` on, as long as the client runs).
   */
  async end() {
    await this._load();
    if (!this._st.session) { await this._forget('session_ended', 'the session was ended'); this._stop('ended', null); return; }
    const done = new Promise(resolve => { this._ending = {resolve}; });
    if (this._conn && this._conn.welcomed) this._send({type: 'bye'});
    else if (!this._running) { this._running = true; this._connect(); }
    return done;
  }

  /**
   * Drops the current connection (if any) and connects again now, resuming:
   * for a network change the app knows of (the browser's `online` event,
   * React Native's NetInfo) or a stopped client the user asks to retry.
   */
  async reconnect() {
    await this._load();
    this._closeConn();
    this._running = true;
    this._attempt = 0;
    this._connect();
  }

  /**
   * Forgets the stored session (it is left to expire on the server) and
   * rejects pending ops with `session_lost`; a running client then starts
   * a new session.
   */
  async resetSession() {
    await this._load();
    await this._forget('session_lost', 'the session was reset by the app');
    if (this._running) { this._closeConn(); this._attempt = 0; this._connect(); }
  }

  // --------------------------------------------------------------- storage

  _load() {
    if (!this._loaded) {
      this._loaded = (async () => {
        const text = await this._storage.get(this._key);
        if (text != null) this._st = readRecord(text);
        this._received = this._st.ack;
        this._ackSent = this._st.ack;
        // Ops stored by an earlier instance: answered through the `result` event.
        for (const p of this._st.pending) {
          this._queue.push({id: p.id, op: p.op, args: p.args, resolve: null, reject: null, detail: false, saved: true});
        }
      })();
    }
    return this._loaded;
  }

  _snapshot() {
    const s = this._st;
    return JSON.stringify({v: 1, session: s.session, token: s.token, node: s.node, ack: s.ack,
      lastOp: s.lastOp, nextId: s.nextId, pending: this._queue.map(e => ({id: e.id, op: e.op, args: e.args}))});
  }

  /** Writes the record; the promise settles after a write that started after this call. */
  _save() {
    if (!this._saveQueued) {
      this._saveQueued = true;
      this._saving = this._saving.then(async () => {
        this._saveQueued = false;
        try { await this._storage.set(this._key, this._snapshot()); } catch (e) { this._emit('error', e); }
      });
    }
    return this._saving;
  }

  // ------------------------------------------------------------ connection

  _setState(state, detail) {
    this.state = state;
    this.stateDetail = detail || {};
    this._emit('state', Object.assign({state}, this.stateDetail));
  }

  async _connect() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (!this._running || this._conn) return;
    const resuming = !!this._st.session;
    this._setState(resuming ? 'resuming' : 'connecting', {attempt: this._attempt, lastClose: this._lastClose});
    const conn = {ws: null, url: null, welcomed: false, lastRecv: now(), pingAt: 0, timers: []};
    this._conn = conn;
    let credential = null;
    try {
      credential = typeof this._credential === 'function' ? await this._credential() : (this._credential || null);
    } catch (e) {
      this._emit('error', e);
      if (this._conn === conn) this._lost(conn, 1006, 'credential: ' + (e && e.message));
      return;
    }
    if (this._conn !== conn) return;
    const base = this._urls[this._urlIndex % this._urls.length];
    let url = base;
    if (this._st.session) {
      // Routing hints (protocol.md, Transport): a proxy may send the
      // connection straight to the owner; the server never relies on them.
      url += (base.includes('?') ? '&' : '?') + 'session=' + encodeURIComponent(this._st.session);
      if (this._st.node) url += '&node=' + encodeURIComponent(this._st.node);
    }
    conn.url = base;
    let ws;
    try { ws = new this._WS(url); } catch (e) { this._emit('error', e); this._lost(conn, 1006, 'cannot open: ' + e.message); return; }
    conn.ws = ws;
    const timer = (ms, fn) => { conn.timers.push(setTimeout(fn, ms)); };
    timer(this._o.openTimeoutMs, () => { if (ws.readyState !== 1) this._drop(conn, 'connect timeout'); });
    ws.onopen = () => {
      if (this._conn !== conn) return;
      conn.lastRecv = now();
      const hello = {type: 'hello', session: this._st.session, token: this._st.token, ack: this._st.ack};
      if (credential) hello.credential = credential;
      conn.helloSent = this._sendOn(conn, hello) && !!this._st.session;
      // The edge answers nothing else before `welcome` (it may hold the
      // hello while the session moves), so the hello has its own deadline.
      timer(this._o.welcomeTimeoutMs, () => { if (!conn.welcomed) this._drop(conn, 'no welcome'); });
    };
    ws.onmessage = ev => {
      if (this._conn !== conn) return;
      conn.lastRecv = now();
      conn.pingAt = 0;
      let m;
      try { m = JSON.parse(typeof ev.data === 'string' ? ev.data : String(ev.data)); } catch (e) { return; }
      if (m && typeof m === 'object') this._frame(conn, m);
    };
    ws.onclose = ev => { if (this._conn === conn) this._lost(conn, ev.code || 1006, ev.reason || ''); };
    ws.onerror = () => { /* a close follows */ };
    conn.tick = setInterval(() => this._tick(conn), 250);
  }

  /** Dead-connection detection: a `ping` after silence while an answer is due. */
  _tick(conn) {
    if (this._conn !== conn || !conn.welcomed) return;
    const t = now();
    if (this._inflight && t - this._inflight.sentAt > this._o.answerTimeoutMs) {
      // Alive but not answering: a new connection sends the op again (same id).
      this._drop(conn, 'no answer to op ' + this._inflight.id);
      return;
    }
    if (conn.pingAt) {
      if (t - conn.pingAt > this._o.pongTimeoutMs) this._drop(conn, 'no answer to ping');
      return;
    }
    const due = this._inflight || this._ending;
    if (t - conn.lastRecv > (due ? this._o.pingAfterMs : this._o.idlePingMs)) {
      conn.pingAt = t;
      this._sendOn(conn, {type: 'ping', id: ++this._pingId});
    }
  }

  _sendOn(conn, obj) {
    if (!conn || !conn.ws || conn.ws.readyState !== 1) return false;
    try { conn.ws.send(JSON.stringify(obj)); return true; } catch (e) { return false; }
  }

  _send(obj) { return this._sendOn(this._conn, obj); }

  /** Closes the current connection without reading its close code. */
  _closeConn() {
    const conn = this._conn;
    if (!conn) return;
    this._conn = null;
    if (conn.helloSent && !conn.welcomed) {
      // A resuming hello we gave up on may still be worked on by its node
      // (which retries reaching the session's owner for a while) and take
      // the session from our next connection: that 4000 is our own doing.
      this._zombieUntil = now() + this._o.zombieWindowMs;
    }
    for (const t of conn.timers) clearTimeout(t);
    clearInterval(conn.tick);
    if (conn.ws) {
      conn.ws.onopen = conn.ws.onmessage = conn.ws.onclose = conn.ws.onerror = null;
      try { conn.ws.close(); } catch (e) { /* already closed */ }
    }
    this._inflight = null;
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
  }

  /** This client decided the connection is dead. */
  _drop(conn, why) {
    if (this._conn !== conn) return;
    this._lost(conn, 1006, why);
  }

  _lost(conn, code, reason) {
    if (this._conn !== conn) return;
    this._closeConn();
    const error = this._lastError;
    this._lastError = null;
    this._lastClose = {code, reason, error};
    if (!this._running) return;
    // The next attempt goes to the next URL: this node may be gone.
    this._urlIndex = (this._urlIndex + 1) % this._urls.length;
    if (this._ending && (code === 1000 || code === 4004)) {
      this._forget('session_ended', 'the session was ended').then(() => this._stop('ended', this._lastClose));
      return;
    }
    switch (code) {
      case 1000:
        this._forget('session_ended', 'the server ended the session').then(() => this._stop('ended', this._lastClose));
        return;
      case 4000:
        if (now() < this._zombieUntil) {
          // Taken over, most likely by our own abandoned hello (above):
          // resume once. Another client taking it again stops us then.
          this._zombieUntil = 0;
          this._emit('error', new BerthError('taken_over', 'taken over soon after a connection attempt was given up: resuming once'));
          break;
        }
        this._stop(STOP_REASON[code], this._lastClose);
        return;
      case 1008: case 1009:
        this._stop(STOP_REASON[code], this._lastClose);
        return;
      case 4004: this._sessionNotFound(); return;
      case 1012:
        if (this._fastRetry) { this._fastRetry = false; this._retry(0); return; }
        break;
      case 1013: this._retry(null, 1000); return;
      default: break;
    }
    this._retry(null, 0);
  }

  /** Reconnects after `ms`, or after a full-jitter exponential delay (at least `minMs`). */
  _retry(ms, minMs) {
    let delay = ms;
    if (delay == null) {
      const cap = Math.min(this._o.backoffCapMs, this._o.backoffBaseMs * 2 ** this._attempt);
      delay = Math.max(minMs || 0, Math.random() * cap);
      this._attempt = Math.min(this._attempt + 1, 30);
    }
    this._setState(this._st.session ? 'resuming' : 'connecting',
      {attempt: this._attempt, retryInMs: Math.round(delay), lastClose: this._lastClose});
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._connect(), delay);
  }

  _stop(reason, close) {
    this._running = false;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    clearTimeout(this._opRetryTimer);
    this._opRetryTimer = null;
    this._closeConn();
    const detail = {reason};
    if (close) { detail.code = close.code; detail.message = (close.error && close.error.message) || close.reason; }
    this._setState('stopped', detail);
    if (this._ending) { const e = this._ending; this._ending = null; e.resolve(); }
  }

  /** Close 4004: the session is unknown or expired. */
  async _sessionNotFound() {
    if (this._st.lastOp === 0) {
      // Nothing was ever applied to it (a new session is written by its first
      // op: its node died before that): its pending ops provably were not
      // applied, and go to a new session, numbered again from 1.
      const ops = this._queue;
      this._st = Object.assign(blank(), {nextId: 1});
      this._resetEvents();
      for (const e of ops) e.id = this._st.nextId++;
      await this._save();
      this._retry(0);
      return;
    }
    await this._forget('session_lost', 'the session is unknown or expired (close 4004)');
    if (this._o.newSessionOnLoss) this._retry(0);
    else this._stop('session_lost', this._lastClose);
  }

  /** Drops the session: pending ops are rejected with `code`. */
  async _forget(code, message) {
    const ops = this._queue;
    this._queue = [];
    this._inflight = null;
    clearTimeout(this._opRetryTimer);
    this._opRetryTimer = null;
    this._st = blank();
    this._resetEvents();
    await this._save();
    for (const e of ops) this._answer(e, {id: e.id, ok: false, error: {code, message}});
  }

  _resetEvents() {
    this._epoch++;
    this._events = [];
    this._received = 0;
    this._ackSent = 0;
  }

  // ---------------------------------------------------------------- frames

  _frame(conn, m) {
    switch (m.type) {
      case 'welcome': this._welcome(conn, m); break;
      case 'result': this._result(m); break;
      case 'event': this._event(m); break;
      case 'pong': break;
      case 'error':
        this._lastError = {code: m.code, message: m.message};
        this._emit('error', new BerthError(m.code, m.message));
        break;
      default: break; // a later addition to the protocol
    }
  }

  _welcome(conn, m) {
    const fresh = m.session !== this._st.session;
    this._st.session = m.session;
    this._st.token = m.token;
    this._st.node = m.node;
    const lastOp = Number(m.last_op) || 0;
    this._st.lastOp = Math.max(fresh ? 0 : this._st.lastOp, lastOp);
    this._st.nextId = Math.max(this._st.nextId, lastOp + 1);
    conn.welcomed = true;
    this._attempt = 0;
    this._fastRetry = true;
    this._save();
    this._setState('connected', {node: m.node, resumed: !!m.resumed, url: conn.url});
    this._emit('welcome', m);
    if (fresh) this._emit('session', {session: m.session, node: m.node});
    if (this._ending) { this._send({type: 'bye'}); return; }
    this._pump();
  }

  /** Sends the oldest unanswered op, if none is in flight. */
  _pump() {
    if (this._inflight || this._opRetryTimer || this._ending) return;
    const conn = this._conn;
    if (!conn || !conn.welcomed) return;
    const e = this._queue[0];
    if (!e || !e.saved) return;
    this._inflight = e;
    e.sentAt = now();
    this._sendOn(conn, {type: 'op', id: e.id, op: e.op, args: e.args});
  }

  _result(r) {
    const e = this._inflight;
    if (!e || r.id !== e.id) return; // an answer to an earlier connection's frame
    this._inflight = null;
    if (!r.ok && r.error && NOT_APPLIED.has(r.error.code)) {
      // Not applied: the same id again, later (nothing after it was sent).
      const cap = Math.min(this._o.backoffCapMs, this._o.backoffBaseMs * 2 ** this._opAttempt);
      this._opAttempt = Math.min(this._opAttempt + 1, 30);
      this._opRetryTimer = setTimeout(() => { this._opRetryTimer = null; this._pump(); }, Math.random() * cap);
      return;
    }
    this._opAttempt = 0;
    this._queue.shift();
    // Any other answer consumed the id (an application error is recorded like a success).
    this._st.lastOp = Math.max(this._st.lastOp, r.id);
    this._save();
    this._answer(e, r);
    this._pump();
  }

  _answer(e, r) {
    if (!e.resolve) {
      this._emit('result', {id: e.id, op: e.op, args: e.args, ok: !!r.ok, value: r.value, error: r.error});
      return;
    }
    if (r.ok) {
      e.resolve(e.detail ? {id: e.id, value: r.value, version: r.version, duplicate: !!r.duplicate} : r.value);
    } else {
      const err = r.error || {code: 'internal', message: 'no error given'};
      e.reject(new BerthError(err.code, err.message, {id: e.id, op: e.op, version: r.version}));
    }
  }

  _event(m) {
    const seq = Number(m.seq);
    if (!(seq > this._received)) return; // a replay of what we have
    this._received = seq;
    this._events.push({seq, body: m.body});
    this._drain();
  }

  /** Hands events to the app one at a time, in order; acknowledges each after its handlers. */
  async _drain() {
    if (this._draining) return;
    this._draining = true;
    try {
      while (this._events.length && (this._listeners.get('event') || []).length) {
        const e = this._events.shift();
        const epoch = this._epoch;
        for (const fn of (this._listeners.get('event') || []).slice()) {
          try { await fn(e.body, e.seq); } catch (err) { this._emit('error', err); }
        }
        // Dropped meanwhile by a session change: not ours to acknowledge.
        if (epoch !== this._epoch) continue;
        this._st.ack = Math.max(this._st.ack, e.seq);
        this._save();
        this._scheduleAck();
      }
    } finally {
      this._draining = false;
    }
  }

  _scheduleAck() {
    if (this._st.ack <= this._ackSent) return;
    const flush = () => {
      clearTimeout(this._ackTimer);
      this._ackTimer = null;
      if (this._st.ack > this._ackSent && this._conn && this._conn.welcomed && this._send({type: 'ack', seq: this._st.ack})) {
        this._ackSent = this._st.ack;
      }
    };
    if (this._st.ack - this._ackSent >= this._o.ackEvery) flush();
    else if (!this._ackTimer) this._ackTimer = setTimeout(flush, this._o.ackDelayMs);
  }

  // ---------------------------------------------------------------- events

  _on(type, fn) {
    if (typeof fn !== 'function') throw new TypeError('on: a function is required');
    if (!this._listeners.has(type)) this._listeners.set(type, []);
    this._listeners.get(type).push(fn);
    return () => {
      const l = this._listeners.get(type) || [];
      const i = l.indexOf(fn);
      if (i >= 0) l.splice(i, 1);
    };
  }

  _emit(type, value) {
    for (const fn of (this._listeners.get(type) || []).slice()) {
      try { fn(value); } catch (e) { if (type !== 'error') this._emit('error', e); }
    }
  }
}
