//! Micro-benchmarks of placement: the consistent-hash ring
//! (`cluster/src/ring.rs`) and the ownership check every routed op makes
//! (`cluster/src/routing.rs`).
//!
//! - `ring/owner/M`: [`Ring::owner`] of a session id, `M` members of
//!   [`DEFAULT_VNODES`] virtual nodes (a SipHash of the id and a binary search).
//! - `routing/owner_of/M`: [`Ownership::owner_of`], what the edge asks for
//!   each op: the placement's lock, the lookup, and a copy of the owner's id.
//! - `ring/rebuild/M`: what a membership change costs a node: the new ring
//!   of `M` members built ([`Ring::new`]: `M × 4096` SipHashes and a sort),
//!   and one ring of that size freed (the old ring going).
//!
//! `cargo bench -p berth-cluster --bench ring`; instruction counts:
//! `scripts/bench-instructions.sh`. See `actors/benches/harness/mod.rs` for
//! the two modes.

#[path = "../../actors/benches/harness/mod.rs"]
mod harness;

use std::hint::black_box;

use berth_cluster::membership::{static_membership, Member};
use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
use berth_cluster::routing::Ownership;

/// Cluster sizes: the reference deployment, a larger cluster, far more than
/// berth is run with (the ring's costs grow with `members × vnodes`).
const MEMBERS: [usize; 3] = [3, 10, 100];

/// Member ids in the shape of the default (`host:port`).
fn members(n: usize) -> Vec<MemberId> {
    (1..=n)
        .map(|i| MemberId::new(format!("berth-{i}:8080")))
        .collect()
}

/// `n` session-id-like keys: 22 characters of URL-safe base64, from a fixed
/// seed (splitmix64), so every run looks up the same keys.
fn session_ids(n: usize) -> Vec<String> {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut s: u64 = 0x6265_7274_685f_6231;
    let mut next = move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| {
            let (a, b) = (next(), next());
            (0..22)
                .map(|i| {
                    let bits = if i < 11 {
                        a >> (i * 6)
                    } else {
                        b >> ((i - 11) * 6)
                    };
                    char::from(B64[(bits & 63) as usize])
                })
                .collect()
        })
        .collect()
}

/// Cycles through `keys`: each iteration looks up the next one, so the
/// figure is an average over many ring positions, the same on every run.
fn cycling<'k>(keys: &'k [String]) -> impl FnMut() -> &'k str {
    let mut at = 0;
    move || {
        at = (at + 1) % keys.len();
        keys[at].as_str()
    }
}

fn main() {
    let mut b = harness::Benches::from_env();
    let keys = session_ids(1024);

    for n in MEMBERS {
        let ring = Ring::new(members(n), DEFAULT_VNODES);
        let mut key = cycling(&keys);
        b.iter(&format!("ring/owner/{n}"), || ring.owner(black_box(key())));
    }

    for n in MEMBERS {
        let view = static_membership(
            members(n)
                .into_iter()
                .map(|id| Member {
                    peer: format!("{id}-peer"),
                    id,
                    public: None,
                    version: None,
                })
                .collect(),
        )
        .view();
        // Member 1 asks: most keys have another owner, so most lookups copy
        // that owner's id, as an edge forwarding an op does.
        let ownership = Ownership::new(MemberId::new("berth-1:8080"), true, DEFAULT_VNODES, view);
        let mut key = cycling(&keys);
        b.iter(&format!("routing/owner_of/{n}"), || {
            ownership.owner_of(black_box(key()))
        });
    }

    for n in MEMBERS {
        let ids = members(n);
        b.batched(
            &format!("ring/rebuild/{n}"),
            || ids.clone(),
            |ids| drop(Ring::new(ids, DEFAULT_VNODES)),
        );
    }

    b.finish();
}
