// Real processes for the client's tests: redis-server, a Consul dev agent and
// berth nodes on free loopback ports (as berth-testkit does for the Rust
// tests), killed by pid when the test ends, and a TCP proxy that can cut or
// stall connections. Every wait is bounded.
//
// Binaries: $BERTH_BIN (else target/debug/berth of this repository),
// $REDIS_SERVER_BIN, $CONSUL_BIN (else .tools/bin/consul, else PATH).

import {spawn} from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {fileURLToPath} from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '../../..');
export const SECRET = 'test-cluster-secret-0123456789';

const children = new Set();
process.on('exit', () => { for (const c of children) try { c.kill('SIGKILL'); } catch (e) { /* gone */ } });

export const sleep = ms => new Promise(r => setTimeout(r, ms));

/** Polls `f` (sync or async) every 50 ms until truthy; throws after `ms`. */
export async function eventually(what, f, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try { last = await f(); if (last) return last; } catch (e) { last = e; }
    await sleep(50);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last})`);
}

function findBin(envVar, name, extra) {
  if (process.env[envVar]) return process.env[envVar];
  const dirs = [...(extra || []), path.join(repoRoot, '.tools/bin'), ...(process.env.PATH || '').split(path.delimiter)];
  for (const d of dirs) {
    const p = path.join(d, name);
    try { fs.accessSync(p, fs.constants.X_OK); return p; } catch (e) { /* next */ }
  }
  throw new Error(`${name} not found (set ${envVar}, or put it on PATH; scripts/install-deps.sh installs redis-server and consul)`);
}

export const berthBin = () => findBin('BERTH_BIN', 'berth', [path.join(repoRoot, 'target/debug')]);

/** A free TCP port on 127.0.0.1 (drawn by the OS; may be taken again before use: callers retry). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => { const {port} = s.address(); s.close(() => resolve(port)); });
  });
}

function track(child) {
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

function kill(child) {
  if (child && child.exitCode === null && child.signalCode === null) {
    try { process.kill(child.pid, 'SIGKILL'); } catch (e) { /* gone */ }
  }
}

/** Answers whether a TCP connect to `port` succeeds and `probe` gets a reply containing `want`. */
function tcpProbe(port, probe, want) {
  return new Promise(resolve => {
    const s = net.connect(port, '127.0.0.1');
    let buf = '';
    const done = ok => { s.destroy(); resolve(ok); };
    s.setTimeout(1000, () => done(false));
    s.on('error', () => done(false));
    s.on('connect', () => s.write(probe));
    s.on('data', d => { buf += d; if (buf.includes(want)) done(true); });
  });
}

export async function startRedis() {
  const bin = findBin('REDIS_SERVER_BIN', 'redis-server');
  for (let attempt = 1; attempt <= 5; attempt++) {
    const port = await freePort();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-js-redis-'));
    const child = track(spawn(bin, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir],
      {stdio: 'ignore'}));
    try {
      await eventually('redis PING', () => tcpProbe(port, 'PING\r\n', '+PONG'), 10000);
      return {url: `redis://127.0.0.1:${port}`, port, stop: () => { kill(child); fs.rmSync(dir, {recursive: true, force: true}); }};
    } catch (e) {
      kill(child);
    }
  }
  throw new Error('redis-server did not start (5 ports tried)');
}

async function httpGet(url, timeoutMs = 2000) {
  const r = await fetch(url, {signal: AbortSignal.timeout(timeoutMs)});
  return {status: r.status, body: await r.text()};
}

export async function startConsul() {
  const bin = findBin('CONSUL_BIN', 'consul');
  for (let attempt = 1; attempt <= 3; attempt++) {
    const [http, serf, wan, server] = [await freePort(), await freePort(), await freePort(), await freePort()];
    const child = track(spawn(bin, ['agent', '-dev', '-bind', '127.0.0.1', '-client', '127.0.0.1',
      '-dns-port', '-1', '-grpc-port', '-1', '-http-port', String(http), '-serf-lan-port', String(serf),
      '-serf-wan-port', String(wan), '-server-port', String(server)], {stdio: 'ignore'}));
    try {
      await eventually('a Consul leader', async () => {
        const r = await httpGet(`http://127.0.0.1:${http}/v1/status/leader`);
        return r.status === 200 && r.body.length > 4;
      }, 30000);
      return {addr: `http://127.0.0.1:${http}`, stop: () => kill(child)};
    } catch (e) {
      kill(child);
    }
  }
  throw new Error('consul did not elect itself leader (3 tries)');
}

/** The environment of a node: loopback ports chosen by the OS, as berth-testkit's base_env. */
export function baseEnv(extra) {
  return Object.assign({
    BERTH__SERVER__LISTEN: '127.0.0.1:0',
    BERTH__ADMIN__LISTEN: '127.0.0.1:0',
    BERTH__LOG__FILTER: 'info,berth=debug,berth_actors=debug',
    BERTH__STORE__HEALTH_INTERVAL_MS: '200',
    BERTH__STORE__OP_TIMEOUT_MS: '500',
  }, extra || {});
}

export function clusterEnv(consul, redis, id, extra) {
  return baseEnv(Object.assign({
    BERTH__STORE__REDIS_URL: redis.url,
    BERTH__CLUSTER__NODE_ID: id,
    BERTH__CLUSTER__CONSUL_ADDR: consul.addr,
    BERTH__CLUSTER__SERVICE: 'berth-js',
    BERTH__CLUSTER__PEER_LISTEN: '127.0.0.1:0',
    BERTH__CLUSTER__SECRET: SECRET,
    BERTH__CLUSTER__TTL_MS: '1000',
  }, extra || {}));
}

/**
 * Starts a berth node with `env` (and nothing else of this process's BERTH*
 * variables) in a temporary directory; resolves once it printed
 * `berth listening public=ADDR admin=ADDR node=ID [peer=ADDR]`.
 */
export async function startBerth(env) {
  const cwd = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-js-node-'));
  const clean = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BERTH') && k !== 'RUST_LOG') clean[k] = v;
  const child = track(spawn(berthBin(), [], {cwd, env: Object.assign(clean, env), stdio: ['ignore', 'pipe', 'pipe']}));
  let log = '';
  child.stderr.on('data', d => { log += d; if (log.length > 4e6) log = log.slice(-2e6); });
  const listening = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => { kill(child); reject(new Error('berth printed no listening line within 30 s:\n' + log.slice(-3000))); }, 30000);
    child.stdout.on('data', d => {
      out += d;
      const line = out.split('\n').find(l => l.startsWith('berth listening '));
      if (!line) return;
      clearTimeout(timer);
      const f = name => (line.split(' ').find(kv => kv.startsWith(name + '=')) || '').slice(name.length + 1);
      resolve({public: f('public'), admin: f('admin'), node: f('node')});
    });
    child.on('exit', code => { clearTimeout(timer); reject(new Error(`berth exited (${code}) before listening:\n${log.slice(-3000)}`)); });
  });
  return {
    ...listening,
    id: listening.node,
    wsUrl: `ws://${listening.public}/ws`,
    pid: child.pid,
    log: () => log,
    alive: () => child.exitCode === null && child.signalCode === null,
    kill9: () => kill(child),
    async members() {
      try {
        const r = await httpGet(`http://${listening.admin}/cluster`);
        return (JSON.parse(r.body).members || []).map(m => m.id).sort();
      } catch (e) { return []; }
    },
    stop: () => { kill(child); fs.rmSync(cwd, {recursive: true, force: true}); },
  };
}

/** Waits until every node sees exactly `ids`. */
export async function converge(nodes, ids) {
  const want = JSON.stringify([...ids].sort());
  await eventually(`members ${want}`, async () => {
    for (const n of nodes) if (JSON.stringify(await n.members()) !== want) return false;
    return true;
  }, 30000);
}

/** Redis, Consul and `n` berth nodes ids a, b, c, ... converged. */
export async function startCluster(n = 3, extra) {
  const redis = await startRedis();
  const consul = await startConsul();
  const ids = 'abcdefgh'.slice(0, n).split('');
  const nodes = [];
  try {
    for (const id of ids) nodes.push(await startBerth(clusterEnv(consul, redis, id, extra)));
    await converge(nodes, ids);
  } catch (e) {
    for (const x of nodes) x.stop();
    consul.stop(); redis.stop();
    throw e;
  }
  return {
    redis, consul, nodes,
    byUrl: url => nodes.find(x => url && url.includes(x.public)),
    stop() { for (const x of nodes) x.stop(); consul.stop(); redis.stop(); },
  };
}

/**
 * A TCP proxy on a free loopback port to `target` ("host:port"). `cut()`
 * destroys every open connection (the client sees 1006, the server a reset);
 * `stall(true)` stops forwarding bytes without closing anything (a dead
 * network: only a ping notices).
 */
export async function startProxy(target) {
  const [host, port] = target.split(':');
  const pairs = new Set();
  let stalled = false;
  const server = net.createServer(client => {
    const upstream = net.connect(Number(port), host);
    const pair = {client, upstream};
    pairs.add(pair);
    const end = () => { pairs.delete(pair); client.destroy(); upstream.destroy(); };
    client.on('error', end); upstream.on('error', end);
    client.on('close', end); upstream.on('close', end);
    client.on('data', d => { if (!stalled && !pair.dead) upstream.write(d); });
    upstream.on('data', d => { if (!stalled && !pair.dead) client.write(d); });
  });
  await new Promise(r => server.listen(0, '127.0.0.1', r));
  const addr = `127.0.0.1:${server.address().port}`;
  return {
    addr,
    wsUrl: `ws://${addr}/ws`,
    connections: () => pairs.size,
    cut() { for (const p of [...pairs]) { p.client.destroy(); p.upstream.destroy(); } },
    /** Stalls the connections open now: they stay open and carry nothing. */
    stallOpen() { for (const p of pairs) p.dead = true; },
    stall(on) { stalled = on; },
    stop() { this.cut(); server.close(); },
  };
}

/** Client storage in a file (atomic writes: temp file, then rename), for a client that is killed. */
export function fileStorage(file) {
  const read = async () => { try { return JSON.parse(await fs.promises.readFile(file, 'utf8')); } catch (e) { return {}; } };
  let n = 0;
  const write = async obj => { const tmp = `${file}.${process.pid}.${n++}`; await fs.promises.writeFile(tmp, JSON.stringify(obj)); await fs.promises.rename(tmp, file); };
  return {
    async get(k) { const o = await read(); return k in o ? o[k] : null; },
    async set(k, v) { const o = await read(); o[k] = String(v); await write(o); },
    async remove(k) { const o = await read(); delete o[k]; await write(o); },
  };
}
