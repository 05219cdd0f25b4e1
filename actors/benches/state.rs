//! Micro-benchmarks of the state apply path: one durable op on a kv session
//! (`actors/src/state.rs`), step for step as the session actor runs it
//! (`run_op_now`, `commit_op` and `after_commit` in `actors/src/session.rs`),
//! without the actor, the store or the clock.
//!
//! Each iteration starts from the same session (a clone made in setup,
//! holding a kv state of 100 B, 4 KiB or 32 KiB of JSON; the clone shares
//! the state, as the actor's state and its handler's do):
//!
//! - `op/OP/S`: the whole per-op work for `incr` of a counter and `set` of
//!   an existing key: `begin`, the handler's env, the handler (decode the
//!   op, copy the state to change it, apply, encode the new state),
//!   `commit_op`, then `to_checkpoint_with` + `codec::encode` (the bytes the
//!   store write carries), and freeing one copy of the state (the actor
//!   frees the previous state when the write is confirmed and the undo goes).
//! - `op_parts/handler|commit|checkpoint/incr/S`: the three steps of
//!   `op/incr/S` apart (each one's input made in setup, its output freed
//!   outside the measurement), to see where the cost is.
//!
//! `cargo bench -p berth-actors --bench state`; instruction counts:
//! `scripts/bench-instructions.sh`.

mod fixtures;
mod harness;

use std::sync::Arc;

use berth_actors::state::Limits;
use fixtures::{checkpoint_bytes, run_handler, OP_ID};

fn main() {
    let mut b = harness::Benches::from_env();
    let rt = fixtures::runtime();
    let limits = Limits::default();
    let name: Arc<str> = "AAAAAAAAAAAAAAAAAAAAAA".into();

    for op in ["incr", "set"] {
        for (label, bytes) in fixtures::SIZES {
            let session = fixtures::kv_session(&*rt, bytes);
            b.batched(
                &format!("op/{op}/{label}"),
                || (session.clone(), fixtures::op_args(op)),
                |(mut s, args)| {
                    let (retry, result) = run_handler(&rt, &s, &name, op.to_owned(), args, &limits);
                    let mut outcome = s.commit_op(&*rt, OP_ID, retry, result, &limits);
                    let bytes = checkpoint_bytes(&rt, &s, &mut outcome);
                    // The write is confirmed: the undo goes, and with it
                    // the previous state (here, `s` holds the only copy).
                    drop(outcome.undo);
                    drop(s);
                    (outcome.reply, bytes)
                },
            );
        }
    }

    for (label, bytes) in fixtures::SIZES {
        let session = fixtures::kv_session(&*rt, bytes);
        b.batched(
            &format!("op_parts/handler/incr/{label}"),
            || (session.clone(), fixtures::op_args("incr")),
            |(s, args)| {
                let result = run_handler(&rt, &s, &name, "incr".to_owned(), args, &limits);
                (s, result)
            },
        );
        b.batched(
            &format!("op_parts/commit/incr/{label}"),
            || {
                let s = session.clone();
                let (retry, result) = run_handler(
                    &rt,
                    &s,
                    &name,
                    "incr".into(),
                    fixtures::op_args("incr"),
                    &limits,
                );
                (s, retry, result)
            },
            |(mut s, retry, result)| {
                let outcome = s.commit_op(&*rt, OP_ID, retry, result, &limits);
                (s, outcome)
            },
        );
        b.batched(
            &format!("op_parts/checkpoint/incr/{label}"),
            || {
                let mut s = session.clone();
                let (retry, result) = run_handler(
                    &rt,
                    &s,
                    &name,
                    "incr".into(),
                    fixtures::op_args("incr"),
                    &limits,
                );
                let outcome = s.commit_op(&*rt, OP_ID, retry, result, &limits);
                (s, outcome)
            },
            |(s, mut outcome)| {
                let bytes = checkpoint_bytes(&rt, &s, &mut outcome);
                (s, outcome, bytes)
            },
        );
    }

    b.finish();
}
