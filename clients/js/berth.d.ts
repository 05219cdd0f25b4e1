// Type declarations of berth.js (hand-written; keep in step with it).
// The guarantees and the state machine: docs/clients.md.

/** Version of the wire protocol this client speaks. */
export declare const PROTOCOL_VERSION: 1;

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | {[key: string]: Json};

/**
 * Where the client keeps its session, token, acknowledged event and pending
 * ops. Strings in, strings out, every call a promise: React Native's
 * AsyncStorage fits through `webStorage(AsyncStorage)`.
 */
export interface BerthStorage {
  get(key: string): Promise<string | null>;
  set(key: string, value: string): Promise<void>;
  remove(key: string): Promise<void>;
}

/** Storage for the life of the page or process. */
export declare function memoryStorage(initial?: Record<string, string>): BerthStorage;

/** Storage over `localStorage`, `sessionStorage` or an AsyncStorage-like store (the default is `localStorage`). */
export declare function webStorage(store?: {
  getItem(key: string): string | null | Promise<string | null>;
  setItem(key: string, value: string): void | Promise<void>;
  removeItem(key: string): void | Promise<void>;
}): BerthStorage;

/** What `op()` rejects with, and what `error` listeners get. */
export declare class BerthError extends Error {
  /**
   * A protocol error code (`bad_args`, `unknown_op`, `type_mismatch`,
   * `too_large`, `bad_token`, ... or the application's own) or one of the
   * client: `session_lost` (the session is gone: close 4004, or
   * `resetSession()`), `session_ended` (`end()`, close 1000), `too_large`
   * (the op's frame is over `maxFrameBytes`; not sent), `timeout` (`idle()`).
   */
  readonly code: string;
  /** The op's id, for an op's error. */
  readonly id?: number;
  /** The op's name, for an op's error. */
  readonly op?: string;
  /** The session's state version with the answer, when the server gave one. */
  readonly version?: number;
  constructor(code: string, message: string, extra?: {id?: number; op?: string; version?: number});
}

export type BerthState = 'idle' | 'connecting' | 'resuming' | 'connected' | 'stopped';

/** Why a client stopped. */
export type StopReason =
  /** `close()` was called. */
  | 'closed'
  /** The session ended (`end()`, or close 1000): its record is forgotten. */
  | 'ended'
  /** 1008: the token or the credential was refused; `start()` again once the credential is fixed. */
  | 'unauthorized'
  /** 1009: a frame was too large for the server. */
  | 'frame_too_large'
  /** 4000: a newer connection (another tab, device or client instance) took the session. */
  | 'taken_over'
  /** 4004 and `newSessionOnLoss` is false: the session is unknown or expired. */
  | 'session_lost';

export interface CloseInfo {
  code: number;
  reason: string;
  /** The `error` frame that came before the close, if any. */
  error: {code: string; message: string} | null;
}

export interface StateChange {
  state: BerthState;
  /** `stopped`: why. */
  reason?: StopReason;
  /** `stopped`: the close code that stopped it, if one did. */
  code?: number;
  /** `stopped`: the server's message. */
  message?: string;
  /** `connected`: the node that owns the session. */
  node?: string;
  /** `connected`: whether an existing session was resumed. */
  resumed?: boolean;
  /** `connected`: the URL of the connection (from `urls`). */
  url?: string;
  /** `connecting` / `resuming`: reconnect attempts since the last welcome. */
  attempt?: number;
  /** `connecting` / `resuming` while backing off: when the next attempt starts. */
  retryInMs?: number;
  /** How the last connection ended. */
  lastClose?: CloseInfo | null;
}

export interface Welcome {
  type: 'welcome';
  session: string;
  token: string;
  resumed: boolean;
  version: number;
  last_op: number;
  node: string;
}

/** The answer to an op stored by an earlier instance of the app (its promise is gone). */
export interface RestoredResult {
  id: number;
  op: string;
  args: Json;
  ok: boolean;
  value?: Json;
  error?: {code: string; message: string};
}

export interface OpDetail<T = Json> {
  id: number;
  value: T;
  /** The session's state version after the op. */
  version: number;
  /** The op had been applied before (its answer repeated after a reconnect). */
  duplicate: boolean;
}

export interface BerthOptions {
  /** Node URLs (`wss://host/ws`), tried in turn: after each lost connection, the next one. */
  urls?: string[];
  /** One URL (a load balancer). */
  url?: string;
  /** Where the session is kept (default: memory, lost with the process). */
  storage?: BerthStorage;
  /** The key of the record in `storage` (default `berth`): one per session the app keeps. */
  storageKey?: string;
  /** A JWT for `hello.credential`, or a function giving a fresh one; called before every connection. */
  credential?: string | null | (() => string | null | Promise<string | null>);
  /** On close 4004 (session unknown or expired), start a new session instead of stopping (default false). */
  newSessionOnLoss?: boolean;
  /** The WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: new (url: string) => WebSocket;
  /** Full-jitter backoff: attempt n waits random(0, min(cap, base * 2^n)) ms. Defaults 250 and 10000. */
  backoffBaseMs?: number;
  backoffCapMs?: number;
  /** Gives up a connection not open after this (default 5000). */
  openTimeoutMs?: number;
  /** Gives up a connection whose `welcome` did not come after this (default 10000). */
  welcomeTimeoutMs?: number;
  /** Sends a `ping` after this much silence while an answer is due (default 1500). */
  pingAfterMs?: number;
  /** ... and after this much silence otherwise (default 15000). */
  idlePingMs?: number;
  /** A connection that answers nothing this long after a `ping` is dead (default 3000). */
  pongTimeoutMs?: number;
  /** An op unanswered this long on a live connection: the connection is dropped and the op sent again on a new one (default 30000). */
  answerTimeoutMs?: number;
  /** Acknowledges handled events after this delay (default 100) ... */
  ackDelayMs?: number;
  /** ... or at once when this many are unacknowledged (default 32). */
  ackEvery?: number;
  /** The server's largest frame (default 65536): larger ops are refused with `too_large`, not sent. */
  maxFrameBytes?: number;
  /**
   * After a resuming connection is given up before its `welcome`, a close
   * 4000 within this window (default 15000) is taken for that connection's
   * late `hello` (its node may still attach it) and resumed once, instead of
   * stopping with `taken_over`.
   */
  zombieWindowMs?: number;
  /** Shorthand for `on('event', ...)`. */
  onEvent?: (body: Json, seq: number) => void | Promise<void>;
  /** Shorthand for `on('state', ...)`. */
  onState?: (s: StateChange) => void;
}

export interface BerthEvents {
  /** A server event, in order, once; acknowledged once every handler returned (promises awaited). */
  event: (body: Json, seq: number) => void | Promise<void>;
  state: (s: StateChange) => void;
  welcome: (w: Welcome) => void;
  /** A new session (the first one, or one that replaced a lost session). */
  session: (s: {session: string; node: string}) => void;
  result: (r: RestoredResult) => void;
  /** An op got its id and joined the queue (before it is stored and sent). */
  queued: (q: {id: number; op: string; args: Json}) => void;
  /** A server `error` frame (as a BerthError), a storage failure, a handler that threw. */
  error: (e: unknown) => void;
}

export declare class BerthClient {
  constructor(options: BerthOptions);
  /** The connection state; `stateDetail` says more. */
  readonly state: BerthState;
  readonly stateDetail: Omit<StateChange, 'state'>;
  /** The session id, once known. */
  readonly session: string | null;
  /** The node owning the session, from the last welcome. */
  readonly node: string | null;
  /** The URL of the open connection, or null. */
  readonly url: string | null;
  /** Ops not answered yet, in the order they are applied. */
  readonly pending: {id: number; op: string; args: Json}[];
  on<K extends keyof BerthEvents>(type: K, fn: BerthEvents[K]): () => void;
  /** Loads the stored session and connects; resolves once loaded. Again after a stop to restart. */
  start(): Promise<void>;
  /** Runs an op: resolves with its durable value, rejects with a BerthError. */
  op<T = Json>(name: string, args?: Json, opts?: {detail?: false}): Promise<T>;
  op<T = Json>(name: string, args: Json | undefined, opts: {detail: true}): Promise<OpDetail<T>>;
  /** Resolves when no op is pending. */
  idle(timeoutMs?: number): Promise<void>;
  /** Stops (no reconnect); the session and pending ops stay stored. */
  close(): void;
  /** Drops the connection and connects again now (also restarts a stopped client). */
  reconnect(): Promise<void>;
  /** `bye`: ends the session on the server; pending ops are rejected with `session_ended`. */
  end(): Promise<void>;
  /** Forgets the stored session (pending ops rejected with `session_lost`); a running client starts a new one. */
  resetSession(): Promise<void>;
}
