// berth.d.ts as an app's TypeScript sees it: `tsc --noEmit --strict` must
// accept every use below and reject each line marked @ts-expect-error (an
// error that does not happen fails the check too). Run by
// tests/it/js_client.rs; never executed.
import {
  BerthClient,
  BerthError,
  PROTOCOL_VERSION,
  memoryStorage,
  webStorage,
  type BerthStorage,
  type Json,
  type OpDetail,
  type StateChange,
  type StopReason,
} from '../berth.js';

const v: 1 = PROTOCOL_VERSION;

// Storage: memory, a Web Storage, an AsyncStorage-like store, the app's own.
const stores: BerthStorage[] = [
  memoryStorage(),
  memoryStorage({berth: '{}'}),
  webStorage(),
  webStorage({
    getItem: async (k: string) => (k ? null : ''),
    setItem: async () => {},
    removeItem: async () => {},
  }),
  {
    get: async () => null,
    set: async () => {},
    remove: async () => {},
  },
];

const client = new BerthClient({
  urls: ['wss://a.example/ws', 'wss://b.example/ws'],
  storage: stores[0],
  credential: async () => 'jwt',
  newSessionOnLoss: true,
  backoffBaseMs: 250,
  onEvent: async (body: Json, seq: number) => {
    void body;
    void seq;
  },
  onState: (s: StateChange) => {
    const why: StopReason | undefined = s.reason;
    void why;
  },
});

async function app(): Promise<void> {
  await client.start();
  const n = await client.op<number>('incr', {key: 'n'});
  const doubled: number = n * 2;
  const d: OpDetail<number> = await client.op<number>('incr', {key: 'n'}, {detail: true});
  const version: number = d.version;
  const dup: boolean = d.duplicate;
  void [doubled, version, dup, v];
  const off = client.on('event', (body, seq) => {
    const s: number = seq;
    void [body, s];
  });
  off();
  client.on('state', (s) => {
    if (s.state === 'stopped' && s.reason === 'taken_over') client.close();
  });
  try {
    await client.op('get', {key: 'n'});
  } catch (e) {
    if (e instanceof BerthError) {
      const code: string = e.code;
      const id: number | undefined = e.id;
      void [code, id];
    }
  }
  await client.idle(1000);
  await client.reconnect();
  await client.end();
  await client.resetSession();
  const pending: {id: number; op: string; args: Json}[] = client.pending;
  const session: string | null = client.session;
  void [pending, session];
}
void app;

// What the declarations must refuse.
// @ts-expect-error: an unknown option
new BerthClient({url: 'wss://a.example/ws', retries: 3});
// @ts-expect-error: args are JSON, not functions
void client.op('set', {key: () => 1});
// @ts-expect-error: an unknown event
client.on('message', () => {});
// @ts-expect-error: the state is read-only
client.state = 'connected';
// @ts-expect-error: not a state
const bad: StateChange = {state: 'open'};
void bad;
