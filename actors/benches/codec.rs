//! Micro-benchmarks of the checkpoint codec (`actors/src/codec.rs`).
//!
//! The checkpoints are what the session actor writes for a kv session after
//! a durable `incr` (format 1, state of 100 B, 4 KiB, 32 KiB of JSON), and a
//! messaging actor's (format 3: a user, 2 unacknowledged events, 4 queued
//! messages, 8 watermarks): see `fixtures/mod.rs`.
//!
//! - `codec/encode/S`: [`codec::encode`] (consumes its checkpoint: the
//!   clone it is given is made in setup, not measured).
//! - `codec/decode/S`: [`codec::decode`] of those bytes.
//! - `codec/activate/S`: decode, then [`SessionState::from_checkpoint`]
//!   (which parses the application's JSON state): what re-activating a
//!   session costs on a resume, a failover or a handoff, besides the read.
//!
//! `cargo bench -p berth-actors --bench codec`; instruction counts:
//! `scripts/bench-instructions.sh`.

mod fixtures;
mod harness;

use berth_actors::codec::{self, Checkpoint};
use berth_actors::state::SessionState;

fn main() {
    let mut b = harness::Benches::from_env();
    let rt = fixtures::runtime();

    let mut cases: Vec<(&str, Checkpoint)> = fixtures::SIZES
        .iter()
        .map(|&(label, bytes)| (label, fixtures::kv_checkpoint(bytes)))
        .collect();
    cases.push(("mail", fixtures::mail_checkpoint()));

    for (label, ck) in &cases {
        b.batched(
            &format!("codec/encode/{label}"),
            || ck.clone(),
            codec::encode,
        );
    }
    for (label, ck) in &cases {
        let bytes = codec::encode(ck.clone());
        b.iter(&format!("codec/decode/{label}"), || {
            codec::decode(&bytes).expect("decodes")
        });
    }
    for (label, ck) in &cases {
        let bytes = codec::encode(ck.clone());
        b.iter(&format!("codec/activate/{label}"), || {
            let ck = codec::decode(&bytes).expect("decodes");
            SessionState::from_checkpoint(&*rt, ck).expect("activates")
        });
    }

    b.finish();
}
