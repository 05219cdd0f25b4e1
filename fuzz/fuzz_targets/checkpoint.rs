//! The checkpoint decoder: bytes read back from the store, as a session
//! actor re-activates from them (`actors/src/session.rs`, `started()`):
//! `codec::decode`, then `SessionState::from_checkpoint` with the built-in
//! `kv` application, then what a live session does with that state.
#![no_main]

use berth_actors::codec::{self, Checkpoint};
use berth_actors::kv::KvApp;
use berth_actors::runtime::Typed;
use berth_actors::state::SessionState;
use berth_fuzz::{same_json, same_json_bytes};
use libfuzzer_sys::fuzz_target;

/// Watermark rows in a fixed order (a session keeps them in a map).
fn sorted(marks: &[(String, codec::Mark)]) -> Vec<(String, u64, u64, u64)> {
    let mut v: Vec<_> = marks
        .iter()
        .map(|(k, m)| (k.clone(), m.inc, m.seq, m.at_ms))
        .collect();
    v.sort();
    v
}

/// `a` and `b` hold the same session (JSON compared by [`same_json`]).
fn same_checkpoint(a: &Checkpoint, b: &Checkpoint) -> bool {
    same_json_bytes(&a.app, &b.app)
        && a.version == b.version
        && a.last_op == b.last_op
        && match (&a.last_reply, &b.last_reply) {
            (Some(x), Some(y)) => same_json_bytes(x, y),
            (x, y) => x == y,
        }
        && a.app_version == b.app_version
        && a.user == b.user
        && (a.mail_inc, a.mail_seq) == (b.mail_inc, b.mail_seq)
        && a.outgoing.len() == b.outgoing.len()
        && a.outgoing.iter().zip(&b.outgoing).all(|(x, y)| {
            (x.seq, &x.to, x.at_ms) == (y.seq, &y.to, y.at_ms) && same_json(&x.body, &y.body)
        })
        && sorted(&a.marks) == sorted(&b.marks)
        && a.timers == b.timers
        && a.token_hash == b.token_hash
        && a.next_seq == b.next_seq
        && a.events.len() == b.events.len()
        && a.events
            .iter()
            .zip(&b.events)
            .all(|(x, y)| x.seq == y.seq && x.due_ms == y.due_ms && same_json(&x.body, &y.body))
}

fuzz_target!(|data: &[u8]| {
    let kv = Typed::new(KvApp);
    let Ok(ck) = codec::decode(data) else {
        return; // "stored checkpoint is unreadable"
    };
    let again = codec::decode(&codec::encode(ck.clone())).expect("a decoded checkpoint re-encodes");
    assert!(same_checkpoint(&again, &ck), "{again:?} != {ck:?}");
    let Ok(mut state) = SessionState::from_checkpoint(&kv, ck) else {
        return;
    };
    // Checkpointing the re-activated state gives it back.
    let ck = state.to_checkpoint(&kv);
    let bytes = codec::encode(ck.clone());
    let back = codec::decode(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|ck| SessionState::from_checkpoint(&kv, ck))
        .expect("the checkpoint of a re-activated state reads back");
    let back = back.to_checkpoint(&kv);
    assert!(same_checkpoint(&back, &ck), "{back:?} != {ck:?}");
    let _ = state.checkpoint_estimate(bytes.len());
    let _ = state.next_timer();
    // A client resuming with any ack: replay, the next timer, acknowledgement.
    for ack in [0, state.outbox.last_seq(), u64::MAX] {
        let _ = state.outbox.due_after(ack, u64::MAX).count();
        let _ = state.outbox.next_due_after(ack);
    }
    let _ = state.outbox.checkpoint_bytes();
    state.outbox.ack(state.outbox.last_seq(), u64::MAX);
    state.outbox.ack(u64::MAX, u64::MAX);
    assert!(
        state.outbox.is_empty(),
        "everything due and acknowledged is forgotten"
    );
    assert_eq!(
        state.outbox.checkpoint_bytes(),
        0,
        "an empty outbox takes no room"
    );
});
