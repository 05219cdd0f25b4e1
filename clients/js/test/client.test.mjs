// The JavaScript client against the real `berth` binary, a real Redis and
// (for the cluster tests) three nodes with a real Consul. Run with
//   node --experimental-websocket --test clients/js/test/
// (tests/it/js_client.rs runs it under `cargo test`).

import {after, test} from 'node:test';
import assert from 'node:assert/strict';
import {spawn} from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {fileURLToPath} from 'node:url';

import {BerthClient, BerthError, memoryStorage} from '../berth.js';
import {
  baseEnv, eventually, fileStorage, sleep, startBerth, startCluster, startProxy, startRedis,
} from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));

// A test that failed may leave a handle behind (a client still reconnecting):
// once every test ran, nothing may keep this file's process alive.
after(() => { setTimeout(() => process.exit(), 2000).unref(); });
const range = n => Array.from({length: n}, (_, i) => i + 1);

/** Awaits `p`, failing with `what` after `ms`. */
async function within(ms, what, p, client) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done within ${ms} ms${client ? ': ' + diag(client) : ''}`)), ms);
  });
  try { return await Promise.race([p, t]); } finally { clearTimeout(timer); }
}

/** What a client was doing, for a failure's message. */
const diag = c => JSON.stringify({state: c.state, detail: c.stateDetail, session: c.session, url: c.url,
  pending: c.pending.slice(0, 3), inflight: c._inflight && c._inflight.id, opRetry: !!c._opRetryTimer,
  states: c.states.slice(-12)});

function newClient(urls, extra) {
  const c = new BerthClient(Object.assign({urls, storage: memoryStorage()}, extra));
  c.states = [];
  c.on('state', s => c.states.push(s));
  c.on('error', () => {});
  return c;
}

test('ops are applied exactly once, in order, while the node the client is on is SIGKILLed twice',
  {timeout: 120000}, async t => {
    const cl = await startCluster(3);
    t.after(() => cl.stop());
    const client = newClient(cl.nodes.map(n => n.wsUrl));
    t.after(() => client.close());
    await client.start();
    await eventually('connected', () => client.state === 'connected');

    const N = 90;
    const got = [];
    const killed = [];
    // SIGKILLed as the 25th and the 55th answers arrive: ops are in flight
    // and queued behind them.
    const all = range(N).map(() => client.op('incr', {key: 'n'}).then(v => {
      got.push(v);
      if (got.length === 25 || got.length === 55) {
        const victim = cl.byUrl(client.url);
        if (victim && victim.alive()) { victim.kill9(); killed.push(victim.id); }
      }
    }));
    await within(90000, 'every op answered', Promise.all(all), client);
    assert.deepEqual(got, range(N), 'each op applied once, in order, each answer its own value');
    assert.equal(await within(20000, 'get', client.op('get', {key: 'n'})), N);
    assert.equal(killed.length, 2);
    assert.ok(!killed.some(id => cl.byUrl(client.url).id === id), 'the client ends on the surviving node');
    const connected = client.states.filter(s => s.state === 'connected');
    assert.ok(connected.length >= 3, `connected after each kill: ${JSON.stringify(connected)}`);
    assert.ok(connected.slice(1).every(s => s.resumed), 'the same session resumed each time');
  });

test('events arrive in order, once, acknowledged, while the socket is cut at random and the node is SIGKILLed',
  {timeout: 120000}, async t => {
    const cl = await startCluster(3);
    t.after(() => cl.stop());
    const proxies = await Promise.all(cl.nodes.map(n => startProxy(n.public)));
    t.after(() => proxies.forEach(p => p.stop()));
    const nodeOf = url => cl.nodes[proxies.findIndex(p => url && url.includes(p.addr))];
    const client = newClient(proxies.map(p => p.wsUrl));
    t.after(() => client.close());
    const seen = [];
    client.on('event', async (body, seq) => {
      seen.push({seq, n: body.n});
      if (Math.random() < 0.3) await sleep(Math.random() * 20); // a slow handler now and then
    });
    await client.start();
    await eventually('connected', () => client.state === 'connected');

    const N = 120;
    let stop = false;
    // Cuts the client's connection every 150-450 ms.
    const chaos = (async () => {
      let cuts = 0;
      while (!stop && cuts < 200) {
        await sleep(150 + Math.random() * 300);
        const p = proxies.find(x => client.url && client.url.includes(x.addr));
        if (p) { p.cut(); cuts++; }
      }
      return cuts;
    })();
    const answers = [];
    const ops = [];
    let killed = null;
    for (const i of range(N)) {
      // Some events now, some a little later (a timer of the session).
      ops.push(client.op('emit', {body: {n: i}, delay_ms: i % 10 === 0 ? 50 : 0}).then(seq => {
        answers.push(seq);
        if (answers.length === N / 2) {
          // The node the client is on, as the 60th emit is answered.
          const victim = nodeOf(client.url);
          if (victim && victim.alive()) { victim.kill9(); killed = victim.id; }
        }
      }));
      ops.push(client.op('incr', {key: 'n'}));
    }
    await within(90000, 'every op answered', Promise.all(ops), client);
    await eventually('every event handled', () => seen.length >= N, 30000);
    stop = true;
    const cuts = await chaos;
    assert.ok(cuts >= 5, `the socket was cut ${cuts} times`);
    assert.ok(killed, 'a node was SIGKILLed');
    await sleep(300);
    // Once each, in the order they were emitted.
    assert.deepEqual(seen.map(e => e.n), range(N));
    assert.deepEqual(seen.map(e => e.seq), range(N));
    assert.deepEqual([...answers].sort((a, b) => a - b), range(N), 'emit answers its event seq');
    assert.equal(await within(20000, 'get', client.op('get', {key: 'n'})), N, 'incr exactly once');
    // Acknowledged: a new connection replays nothing.
    await eventually('acks flushed', () => !client._ackTimer, 5000);
    const other = newClient(proxies.map(p => p.wsUrl), {storage: client._storage});
    t.after(() => other.close());
    client.close();
    const replayed = [];
    other.on('event', (b, seq) => { replayed.push(seq); });
    await other.start();
    await eventually('resumed', () => other.state === 'connected', 20000);
    assert.equal(other.session, client.session);
    await within(20000, 'an op after the resume', other.op('echo', {value: 1}));
    await sleep(200);
    assert.deepEqual(replayed, [], 'every event was acknowledged');
    other.close();
  });

test('a stalled connection (no close, no bytes) is noticed by ping within seconds and the op answered',
  {timeout: 60000}, async t => {
    const redis = await startRedis();
    t.after(() => redis.stop());
    const node = await startBerth(baseEnv({BERTH__STORE__REDIS_URL: redis.url}));
    t.after(() => node.stop());
    const proxy = await startProxy(node.public);
    t.after(() => proxy.stop());
    const client = newClient([proxy.wsUrl]);
    t.after(() => client.close());
    let welcomes = 0;
    client.on('welcome', () => welcomes++);
    await client.start();
    await eventually('connected', () => client.state === 'connected');
    assert.equal(await client.op('incr', {key: 'n'}), 1);
    proxy.stallOpen();
    const t0 = Date.now();
    assert.equal(await within(15000, 'the op after the stall', client.op('incr', {key: 'n'})), 2);
    const took = Date.now() - t0;
    assert.ok(took < 8000, `answered ${took} ms after the stall (ping after 1.5 s, pong within 3 s)`);
    assert.equal(welcomes, 2, 'it reconnected once');
    assert.equal(client.states.filter(s => s.state === 'connected').length, 2);
  });

test('an app SIGKILLed with ops stored resumes them after its restart: each applied once',
  {timeout: 90000}, async t => {
    const redis = await startRedis();
    t.after(() => redis.stop());
    const node = await startBerth(baseEnv({BERTH__STORE__REDIS_URL: redis.url}));
    t.after(() => node.stop());
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'berth-js-app-'));
    t.after(() => fs.rmSync(dir, {recursive: true, force: true}));
    const file = path.join(dir, 'storage.json');

    for (let life = 1; life <= 3; life++) {
      const child = spawn(process.execPath, ['--experimental-websocket', path.join(here, 'child-client.mjs'), file, node.wsUrl],
        {stdio: ['ignore', 'pipe', 'inherit']});
      t.after(() => { try { process.kill(child.pid, 'SIGKILL'); } catch (e) { /* gone */ } });
      let answered = 0;
      child.stdout.on('data', d => { answered += (String(d).match(/^answered /mg) || []).length; });
      await eventually(`life ${life}: 40 answers`, () => answered >= 40, 30000);
      await sleep(Math.random() * 50);
      const exited = new Promise(r => child.on('exit', r));
      process.kill(child.pid, 'SIGKILL');
      await within(10000, 'the app process killed', exited);
    }
    // The stored record has ops the last life sent (or was about to).
    const stored = JSON.parse(JSON.parse(fs.readFileSync(file, 'utf8')).berth);
    assert.ok(stored.pending.length > 0, 'killed with ops pending');

    const client = newClient([node.wsUrl], {storage: fileStorage(file)});
    t.after(() => client.close());
    const restored = [];
    client.on('result', r => restored.push(r));
    await client.start();
    await within(20000, 'the restored ops', client.idle());
    assert.deepEqual(restored.map(r => r.id), stored.pending.map(p => p.id), 'each stored op answered');
    assert.ok(restored.every(r => r.ok));
    // Every op id ever given was an incr: the counter is exactly the ids used.
    const r = await within(20000, 'get', client.op('get', {key: 'n'}, {detail: true}));
    assert.equal(r.value, r.id - 1, 'every stored incr applied exactly once');
  });

test('application errors reject with a BerthError; unknown sessions stop the client or start again',
  {timeout: 60000}, async t => {
    const redis = await startRedis();
    t.after(() => redis.stop());
    const node = await startBerth(baseEnv({BERTH__STORE__REDIS_URL: redis.url}));
    t.after(() => node.stop());
    const storage = memoryStorage();
    const client = newClient([node.wsUrl], {storage});
    t.after(() => client.close());
    await client.start();
    await client.op('set', {key: 's', value: 'x'});
    await assert.rejects(client.op('incr', {key: 's'}), e => e instanceof BerthError && e.code === 'type_mismatch');
    await assert.rejects(client.op('teleport'), e => e.code === 'unknown_op');
    await assert.rejects(client.op('echo', {value: 'x'.repeat(70000)}), e => e.code === 'too_large');
    assert.equal(await client.op('echo', {value: 7}), 7, 'the session goes on');

    // A session the server does not know: close 4004.
    client.close();
    const rec = JSON.parse(await storage.get('berth'));
    rec.session = 'AAAAAAAAAAAAAAAAAAAAAA';
    rec.lastOp = 5;
    await storage.set('berth', JSON.stringify(rec));
    const lost = newClient([node.wsUrl], {storage});
    t.after(() => lost.close());
    await lost.start();
    await eventually('stopped', () => lost.state === 'stopped', 10000);
    assert.equal(lost.stateDetail.reason, 'session_lost');
    assert.equal(lost.stateDetail.code, 4004);

    await storage.set('berth', JSON.stringify(rec));
    const again = newClient([node.wsUrl], {storage, newSessionOnLoss: true});
    t.after(() => again.close());
    const sessions = [];
    again.on('session', s => sessions.push(s.session));
    await again.start();
    // Ops asked before the loss would be rejected (session_lost): ask after.
    await eventually('a new session', () => again.state === 'connected', 10000);
    assert.equal(sessions.length, 1);
    assert.equal(await within(10000, 'an op on the new session', again.op('incr', {key: 'k'})), 1);
    assert.notEqual(again.session, rec.session);

    // Ended: bye, close 1000, the record forgotten.
    await within(10000, 'end', again.end());
    assert.equal(again.state, 'stopped');
    assert.equal(again.stateDetail.reason, 'ended');
    assert.equal(JSON.parse(await storage.get('berth')).session, null);
  });

test('a second client of the same session takes it over: the first stops with taken_over (4000)',
  {timeout: 60000}, async t => {
    const redis = await startRedis();
    t.after(() => redis.stop());
    const node = await startBerth(baseEnv({BERTH__STORE__REDIS_URL: redis.url}));
    t.after(() => node.stop());
    const storage = memoryStorage();
    const first = newClient([node.wsUrl], {storage});
    t.after(() => first.close());
    await first.start();
    await first.op('incr', {key: 'n'});
    const second = newClient([node.wsUrl], {storage: memoryStorage({berth: await storage.get('berth')})});
    t.after(() => second.close());
    await second.start();
    assert.equal(await second.op('incr', {key: 'n'}), 2);
    await eventually('first stopped', () => first.state === 'stopped', 10000);
    assert.deepEqual([first.stateDetail.reason, first.stateDetail.code], ['taken_over', 4000]);
  });
