// A client app that the test SIGKILLs: it keeps five `incr` ops queued on
// the session stored in the file argv[2], through the nodes argv[3..], and
// prints each answer (`answered N`).
import {BerthClient} from '../berth.js';
import {fileStorage} from './harness.mjs';

const [file, ...urls] = process.argv.slice(2);
const client = new BerthClient({urls, storage: fileStorage(file), newSessionOnLoss: false});
client.on('result', r => console.log('restored', JSON.stringify(r)));
await client.start();
let answered = 0, outstanding = 0;
// Bounded: the test kills it within seconds; alone, it ends after about a minute.
for (let round = 0; round < 12000; round++) {
  while (outstanding < 5) {
    outstanding++;
    client.op('incr', {key: 'n'})
      .then(v => console.log('answered', ++answered, v), e => console.log('error', e.code))
      .finally(() => outstanding--);
  }
  await new Promise(r => setTimeout(r, 5));
}
process.exit(0);
