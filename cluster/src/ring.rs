//! The consistent-hash ring: which member owns which session.
//!
//! This module owns the placement function of the cluster and nothing else: no
//! I/O, no clocks, no randomness. Membership decides *who* is in the set; the
//! ring decides *where* each session lives, and every node must reach the same
//! answer on its own.
//!
//! # Invariants
//! - **A pure function of the member set.** [`Ring::new`] sorts and de-duplicates
//!   its input, so two nodes that see the same set (in any order, with repeats)
//!   build identical rings, and `Ring`'s equality is set-and-`vnodes` equality.
//! - **The same answer on every build and platform.** Ring positions are SipHash
//!   of explicit bytes (below), never of `std::hash::Hash` output of `String`s or
//!   tuples, whose byte layout the standard library does not promise to keep.
//! - **Minimal movement.** Adding a member moves keys only onto it; removing a
//!   member moves only the keys it owned. This is what bounds the work of a
//!   handoff or a failover to the sessions that really must move.
//! - `owner` is `None` only for an empty ring.
//!
//! # Hashing contract
//! Changing any line of this contract moves sessions between nodes in a cluster
//! whose nodes run different builds, so it is part of the cluster protocol;
//! `golden_owners_are_pinned` fails when it changes.
//! - The hash is `hashring`'s `DefaultHashBuilder`: SipHash-2-4 with both keys
//!   zero (a fixed key, so every node agrees; it is not there to resist hash
//!   flooding, and member ids come from the operator, not from clients).
//! - Member `m` has `vnodes` virtual nodes, `i` in `0..vnodes`, each at position
//!   `SipHash(utf8(m) ++ b"#" ++ be32(i))`, where `be32(i)` is `i` as 4
//!   big-endian bytes. The index is fixed-width, so the bytes name exactly one
//!   `(member, index)` pair even when member ids contain `#`.
//! - A session id `k` sits at `SipHash(utf8(k))`.
//! - The owner of `k` is the member of the virtual node with the smallest
//!   position `>= SipHash(utf8(k))`, wrapping around to the smallest position.
//! - Every node must use the same `vnodes` (see [`DEFAULT_VNODES`]); a
//!   different count is a different ring.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use hashring::{DefaultHashBuilder, HashRing};
use serde::{Deserialize, Serialize};

/// Virtual nodes per member in the default ring.
///
/// A member's share of the key space is the sum of `vnodes` arcs, so its
/// relative spread is about `1 / sqrt(vnodes)`: 1.6 % at 4096. Chosen as the
/// smallest power of two for which, for 3 to 10 members, the busiest member owns
/// at most 1.05 times the mean share. Measured exactly, by summing arc lengths
/// on the ring (not by sampling keys), as the worst of four naming schemes
/// (`node-1..`, `node-a..`, `berth-1:8080..`, `10.0.0.1:7000..`):
///
/// | members  | 3     | 4     | 5     | 6     | 7     | 8     | 9     | 10    |
/// |----------|-------|-------|-------|-------|-------|-------|-------|-------|
/// | max/mean | 1.020 | 1.019 | 1.031 | 1.028 | 1.030 | 1.036 | 1.040 | 1.036 |
///
/// (`default_vnodes_balance_within_5_percent` re-measures these.)
///
/// At 2048 the worst case above was 1.054 (5 members). Any count leaves some
/// id sets above the bound; 4096 makes them rare: of 300 random sets of 10
/// `host-xxxxxxxx:8080` ids, 15 exceeded 1.05 at 2048, 1 at 4096 (1.054) and
/// none at 8192 (worst 1.036), which would double the cost. That cost is
/// small: 10 members make 40,960 points of 24 bytes (under 1 MiB), built in
/// about 2 ms in a release build (40 ms in debug), and a lookup is a binary
/// search of 16 steps.
pub const DEFAULT_VNODES: u32 = 4096;

/// Version of the hashing contract above. Bump it with any change to that
/// contract: nodes exchange it (with their `vnodes`) in the peer handshake and
/// refuse a peer that places sessions differently.
pub const PLACEMENT_VERSION: u32 = 1;

/// What two nodes must agree on to place every session on the same member:
/// the hashing contract's version and the virtual nodes per member. Two
/// nodes with different contracts build different rings from the same member
/// set, so each would think it owns sessions the other also owns (fencing
/// keeps the data safe, but both sides would keep taking the sessions from
/// each other). Peer links carry it in their handshake and refuse a mismatch
/// ([`crate::peer::PeerError::Contract`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub struct RingContract {
    /// [`PLACEMENT_VERSION`] of the build.
    pub placement: u32,
    /// `cluster.vnodes`.
    pub vnodes: u32,
}

impl RingContract {
    /// This build's contract with `vnodes` virtual nodes per member.
    pub fn new(vnodes: u32) -> Self {
        RingContract {
            placement: PLACEMENT_VERSION,
            vnodes,
        }
    }

    /// The contract as fixed bytes (for the handshake's MACs).
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.placement.to_be_bytes());
        b[4..].copy_from_slice(&self.vnodes.to_be_bytes());
        b
    }
}

impl Default for RingContract {
    fn default() -> Self {
        RingContract::new(DEFAULT_VNODES)
    }
}

impl fmt::Display for RingContract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "placement v{} with {} virtual nodes per member (cluster.vnodes)",
            self.placement, self.vnodes
        )
    }
}

/// The id of a cluster member (a node), as registered in membership.
///
/// Its ring positions hash its UTF-8 bytes (see the module's hashing contract);
/// the derived `Hash` is only for in-memory maps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemberId(pub String);

impl MemberId {
    /// Wraps an id.
    pub fn new(id: impl Into<String>) -> Self {
        MemberId(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for MemberId {
    fn from(id: String) -> Self {
        MemberId(id)
    }
}

impl From<&str> for MemberId {
    fn from(id: &str) -> Self {
        MemberId(id.to_owned())
    }
}

/// One virtual node. Its `Hash` writes exactly the contract's bytes:
/// `utf8(member) ++ b"#" ++ be32(index)`.
#[derive(Clone)]
struct VNode {
    /// Shared by the member's `vnodes` points, so a point stays 24 bytes.
    member: Arc<MemberId>,
    index: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // SipHash is a streaming hash: these writes hash their concatenation
        // (tested against a single write in `vnode_position_hashes_contract_bytes`).
        state.write(self.member.as_str().as_bytes());
        state.write(b"#");
        state.write(&self.index.to_be_bytes());
    }
}

/// A session id as ring input. Its `Hash` writes exactly `utf8(id)`: `str`'s own
/// `Hash` appends a terminator byte that is an implementation detail of std.
struct KeyBytes<'a>(&'a str);

impl Hash for KeyBytes<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// A consistent-hash ring over a set of members, with virtual nodes.
///
/// Immutable: a membership change builds a new ring (cheap, see
/// [`DEFAULT_VNODES`]), so a reader never sees a half-updated one.
#[derive(Clone)]
pub struct Ring {
    /// Sorted and de-duplicated: the set the ring is a function of.
    members: Vec<MemberId>,
    vnodes: u32,
    ring: HashRing<VNode, DefaultHashBuilder>,
}

impl Ring {
    /// Builds the ring of a member set with `vnodes` virtual nodes per member.
    ///
    /// Order and duplicates in `members` do not matter. A `vnodes` of 0 is
    /// taken as 1, so a ring with members always has an owner for every key.
    /// Memory and build time grow with `members × vnodes`.
    pub fn new(members: impl IntoIterator<Item = MemberId>, vnodes: u32) -> Ring {
        let vnodes = vnodes.max(1);
        let mut members: Vec<MemberId> = members.into_iter().collect();
        members.sort_unstable();
        members.dedup();

        let mut points = Vec::with_capacity(members.len() * vnodes as usize);
        for member in &members {
            let member = Arc::new(member.clone());
            points.extend((0..vnodes).map(|index| VNode {
                member: Arc::clone(&member),
                index,
            }));
        }
        // Points are added in a canonical order (sorted members, ascending
        // index) and `batch_add` sorts stably by position, so even a 64-bit
        // position collision resolves the same way on every node.
        let mut ring = HashRing::with_hasher(DefaultHashBuilder);
        ring.batch_add(points);

        Ring {
            members,
            vnodes,
            ring,
        }
    }

    /// The member that owns session `key`; `None` only when the ring is empty.
    pub fn owner(&self, key: &str) -> Option<&MemberId> {
        self.ring.get(&KeyBytes(key)).map(|vnode| &*vnode.member)
    }

    /// A key owned by `me`, drawn from `draw` (a generator of fresh random
    /// keys): berth gives a new session an id its creating node owns, so the
    /// session lives where its client connected. A member owning a share `s`
    /// needs `1/s` draws on average; up to `8 × members` are tried (at most
    /// 4096), which fails with probability about `e^-8` on a balanced ring.
    /// `None` when `me` is not on the ring or no draw landed on it.
    pub fn draw_owned<K: AsRef<str>>(
        &self,
        me: &MemberId,
        mut draw: impl FnMut() -> K,
    ) -> Option<K> {
        if !self.contains(me) {
            return None;
        }
        let tries = (self.members.len() * 8).clamp(8, 4096);
        (0..tries)
            .map(|_| draw())
            .find(|key| self.owner(key.as_ref()) == Some(me))
    }

    /// The members, sorted, without duplicates.
    pub fn members(&self) -> &[MemberId] {
        &self.members
    }

    /// Whether `member` is on the ring.
    pub fn contains(&self, member: &MemberId) -> bool {
        self.members.binary_search(member).is_ok()
    }

    /// Number of members (not of virtual nodes).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the ring has no members (then no key has an owner).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Virtual nodes per member.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// Estimated fraction of the key space each member owns, for the operator
    /// view: the share of `samples` synthetic keys that land on it.
    ///
    /// The keys are the same on every call and every node, so the estimate is
    /// repeatable; its error is about `sqrt(share / samples)` (0.1 percentage
    /// point for 100,000 samples and 10 members). Every member is in the map;
    /// with `samples == 0` every share is 0.
    pub fn shares(&self, samples: usize) -> BTreeMap<MemberId, f64> {
        let mut counts = vec![0usize; self.members.len()];
        let mut key = String::new();
        for i in 0..samples {
            key.clear();
            write!(key, "berth-ring-probe-{i}").expect("writing to a String cannot fail");
            if let Some(owner) = self.owner(&key) {
                if let Ok(at) = self.members.binary_search(owner) {
                    counts[at] += 1;
                }
            }
        }
        let total = samples.max(1) as f64;
        self.members
            .iter()
            .zip(counts)
            .map(|(member, count)| (member.clone(), count as f64 / total))
            .collect()
    }
}

/// Rings are equal when they have the same member set and `vnodes`: the ring
/// is a function of exactly these.
impl PartialEq for Ring {
    fn eq(&self, other: &Ring) -> bool {
        self.vnodes == other.vnodes && self.members == other.members
    }
}

impl Eq for Ring {}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The points are a function of these two fields and would flood logs.
        f.debug_struct("Ring")
            .field("members", &self.members)
            .field("vnodes", &self.vnodes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;

    /// SipHash-2-4 (zero keys) of `bytes`, in one write: the contract, stated
    /// independently of `VNode`'s `Hash` impl.
    fn sip(bytes: &[u8]) -> u64 {
        let mut h = DefaultHashBuilder.build_hasher();
        h.write(bytes);
        h.finish()
    }

    fn vnode_bytes(member: &MemberId, index: u32) -> Vec<u8> {
        let mut b = member.as_str().as_bytes().to_vec();
        b.push(b'#');
        b.extend_from_slice(&index.to_be_bytes());
        b
    }

    /// The ring's points as the contract defines them, sorted by position.
    fn contract_points(ring: &Ring) -> Vec<(u64, &MemberId)> {
        let mut points: Vec<(u64, &MemberId)> = ring
            .members()
            .iter()
            .flat_map(|m| (0..ring.vnodes()).map(move |i| (sip(&vnode_bytes(m, i)), m)))
            .collect();
        points.sort_by_key(|p| p.0);
        points
    }

    /// The contract's owner rule, written out: first position >= the key's, wrapping.
    fn contract_owner<'a>(points: &[(u64, &'a MemberId)], key: &str) -> Option<&'a MemberId> {
        let k = sip(key.as_bytes());
        let at = points.partition_point(|p| p.0 < k);
        points.get(at).or(points.first()).map(|p| p.1)
    }

    /// Exact fraction of the key space per member: each point owns the arc from
    /// the previous point (exclusive) to itself (inclusive).
    fn exact_shares(ring: &Ring) -> BTreeMap<MemberId, f64> {
        let points = contract_points(ring);
        let mut arcs: BTreeMap<MemberId, u128> = BTreeMap::new();
        let mut prev = points.last().map_or(0, |p| p.0);
        for &(pos, member) in &points {
            *arcs.entry(member.clone()).or_default() += u128::from(pos.wrapping_sub(prev));
            prev = pos;
        }
        let circle = 2f64.powi(64);
        arcs.into_iter()
            .map(|(m, arc)| (m, arc as f64 / circle))
            .collect()
    }

    fn max_over_mean(shares: &BTreeMap<MemberId, f64>) -> f64 {
        let max = shares.values().copied().fold(0.0, f64::max);
        let mean = shares.values().sum::<f64>() / shares.len() as f64;
        max / mean
    }

    /// `n` deterministic session-id-like keys (16 pseudo-random bytes, as hex).
    fn keys(seed: u64, n: usize) -> Vec<String> {
        let mut s = seed;
        let mut next = move || {
            // splitmix64
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        (0..n)
            .map(|_| format!("{:016x}{:016x}", next(), next()))
            .collect()
    }

    fn ids(names: &[&str]) -> Vec<MemberId> {
        names.iter().map(|&n| MemberId::from(n)).collect()
    }

    /// Member naming schemes the balance of [`DEFAULT_VNODES`] is measured on.
    fn schemes(n: usize) -> [Vec<MemberId>; 4] {
        let make = |f: &dyn Fn(usize) -> String| (0..n).map(|i| MemberId(f(i))).collect();
        [
            make(&|i| format!("node-{}", i + 1)),
            make(&|i| format!("node-{}", char::from(b'a' + i as u8))),
            make(&|i| format!("berth-{}:8080", i + 1)),
            make(&|i| format!("10.0.0.{}:7000", i + 1)),
        ]
    }

    fn member_id() -> impl Strategy<Value = MemberId> {
        "[a-z0-9.:#-]{1,12}".prop_map(MemberId)
    }

    fn vnodes() -> impl Strategy<Value = u32> {
        prop_oneof![1u32..=64, Just(DEFAULT_VNODES)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn same_set_in_any_order_with_duplicates_gives_same_owners(
            (members, shuffled) in prop::collection::vec(member_id(), 0..8).prop_flat_map(|m| {
                let doubled: Vec<MemberId> = m.iter().chain(&m).cloned().collect();
                (Just(m), Just(doubled).prop_shuffle())
            }),
            vnodes in vnodes(),
            seed in any::<u64>(),
        ) {
            let a = Ring::new(members.clone(), vnodes);
            let b = Ring::new(shuffled, vnodes);
            prop_assert_eq!(&a, &b);
            for key in keys(seed, 2000) {
                let owner = a.owner(&key);
                prop_assert_eq!(owner, b.owner(&key));
                prop_assert_eq!(owner.is_some(), !members.is_empty());
                if let Some(owner) = owner {
                    prop_assert!(a.contains(owner));
                }
            }
        }

        #[test]
        fn adding_a_member_moves_keys_only_onto_it(
            members in prop::collection::btree_set(member_id(), 0..8),
            new in member_id(),
            vnodes in vnodes(),
            seed in any::<u64>(),
        ) {
            prop_assume!(!members.contains(&new));
            let before = Ring::new(members.iter().cloned(), vnodes);
            let after = Ring::new(members.iter().cloned().chain([new.clone()]), vnodes);
            for key in keys(seed, 2000) {
                let (was, is) = (before.owner(&key), after.owner(&key));
                if was != is {
                    prop_assert_eq!(is, Some(&new), "key {} moved from {:?}", key, was);
                }
            }
        }

        #[test]
        fn removing_a_member_moves_only_its_keys(
            members in prop::collection::btree_set(member_id(), 2..8),
            gone in any::<prop::sample::Index>(),
            vnodes in vnodes(),
            seed in any::<u64>(),
        ) {
            let members: Vec<MemberId> = members.into_iter().collect();
            let gone = members[gone.index(members.len())].clone();
            let before = Ring::new(members.iter().cloned(), vnodes);
            let after = Ring::new(members.iter().filter(|&m| *m != gone).cloned(), vnodes);
            prop_assert!(!after.contains(&gone));
            for key in keys(seed, 2000) {
                let (was, is) = (before.owner(&key), after.owner(&key));
                if was == Some(&gone) {
                    prop_assert!(is.is_some() && is != Some(&gone));
                } else {
                    prop_assert_eq!(was, is, "key {} moved though its owner stayed", key);
                }
            }
        }

        #[test]
        fn owners_follow_the_written_contract(
            members in prop::collection::vec(member_id(), 1..6),
            vnodes in 1u32..=64,
            seed in any::<u64>(),
        ) {
            let ring = Ring::new(members, vnodes);
            let points = contract_points(&ring);
            for key in keys(seed, 2000) {
                prop_assert_eq!(ring.owner(&key), contract_owner(&points, &key));
            }
        }
    }

    /// With [`DEFAULT_VNODES`], for 3..=10 members the busiest member owns at
    /// most 1.05x the mean share: exactly (arc lengths) for every naming scheme,
    /// and as seen through 100,000 sampled keys for `host:port` ids, the shape
    /// of the default member id (sampling all schemes costs seconds in debug).
    #[test]
    fn default_vnodes_balance_within_5_percent() {
        let keys = keys(0x6265_7274_6800_0001, 100_000);
        for n in 3..=10 {
            for (scheme, members) in schemes(n).into_iter().enumerate() {
                let name = members[0].to_string();
                let started = Instant::now();
                let ring = Ring::new(members, DEFAULT_VNODES);
                let built = started.elapsed();
                let exact = max_over_mean(&exact_shares(&ring));
                eprintln!(
                    "members={n:2} first={name:14} max/mean exact={exact:.4} build={built:?}"
                );
                assert!(exact <= 1.05, "{n} members ({name}..): max/mean {exact:.4}");
                if scheme != 2 {
                    continue;
                }
                let mut counts: BTreeMap<&MemberId, f64> = BTreeMap::new();
                for key in &keys {
                    *counts.entry(ring.owner(key).unwrap()).or_default() += 1.0;
                }
                let mean = keys.len() as f64 / n as f64;
                let sampled = counts.values().copied().fold(0.0, f64::max) / mean;
                eprintln!("members={n:2} first={name:14} max/mean sampled={sampled:.4}");
                assert!(
                    sampled <= 1.05,
                    "{n} members ({name}..): sampled {sampled:.4}"
                );
            }
        }
    }

    #[test]
    fn shares_estimate_the_exact_shares() {
        let ring = Ring::new(schemes(7)[2].clone(), DEFAULT_VNODES);
        let exact = exact_shares(&ring);
        let sampled = ring.shares(100_000);
        assert_eq!(sampled.len(), 7);
        assert!((sampled.values().sum::<f64>() - 1.0).abs() < 1e-9);
        for (member, share) in &sampled {
            // 0.01 is more than 6 standard deviations of a 100k-sample estimate.
            assert!(
                (share - exact[member]).abs() < 0.01,
                "{member}: {share} vs {}",
                exact[member]
            );
        }
        assert_eq!(ring.shares(100), ring.shares(100), "repeatable");
        assert!(ring.shares(0).values().all(|&s| s == 0.0));
        assert!(Ring::new(Vec::new(), 8).shares(100).is_empty());
    }

    /// Owners computed by an independent implementation of the hashing contract
    /// (SipHash-2-4 written out in Python, checked against the reference test
    /// vectors). A failure here means sessions would move between nodes running
    /// different builds: change the contract on purpose or not at all.
    #[test]
    fn golden_owners_are_pinned() {
        // SipHash-2-4, zero keys: the hash the contract names.
        assert_eq!(sip(b""), 0x1e92_4b9d_7377_00d7);
        assert_eq!(
            sip(&vnode_bytes(&MemberId::from("node-a"), 0)),
            0x68ec_e10c_e3d1_9079
        );
        assert_eq!(sip(b"AAAAAAAAAAAAAAAAAAAAAA"), 0xa737_2b1b_2ada_cfd1);

        let keys = [
            "AAAAAAAAAAAAAAAAAAAAAA",
            "q1w2e3r4t5y6u7i8o9p0aQ",
            "Zm9vYmFyYmF6cXV4cXV1eA",
            "session-1",
            "session-2",
            "",
        ];
        let cases: [(&[&str], u32, [&str; 6]); 3] = [
            (
                &["node-a", "node-b", "node-c"],
                4096,
                ["node-c", "node-c", "node-c", "node-a", "node-b", "node-b"],
            ),
            (
                &[
                    "berth-1:8080",
                    "berth-2:8080",
                    "berth-3:8080",
                    "berth-4:8080",
                    "berth-5:8080",
                ],
                4096,
                [
                    "berth-2:8080",
                    "berth-5:8080",
                    "berth-1:8080",
                    "berth-2:8080",
                    "berth-3:8080",
                    "berth-5:8080",
                ],
            ),
            (
                &["10.0.0.1:7000", "10.0.0.2:7000"],
                16,
                [
                    "10.0.0.1:7000",
                    "10.0.0.1:7000",
                    "10.0.0.1:7000",
                    "10.0.0.2:7000",
                    "10.0.0.2:7000",
                    "10.0.0.2:7000",
                ],
            ),
        ];
        for (members, vnodes, owners) in cases {
            let ring = Ring::new(ids(members), vnodes);
            for (key, owner) in keys.iter().zip(owners) {
                assert_eq!(
                    ring.owner(key).map(MemberId::as_str),
                    Some(owner),
                    "{members:?} vnodes={vnodes} key={key:?}"
                );
            }
        }
    }

    #[test]
    fn vnode_position_hashes_contract_bytes() {
        let member = Arc::new(MemberId::from("berth-1:8080#x"));
        for index in [0, 1, 255, 256, 4095, u32::MAX] {
            let vnode = VNode {
                member: Arc::clone(&member),
                index,
            };
            assert_eq!(
                DefaultHashBuilder.hash_one(&vnode),
                sip(&vnode_bytes(&member, index))
            );
        }
        assert_eq!(DefaultHashBuilder.hash_one(KeyBytes("abc")), sip(b"abc"));
    }

    #[test]
    fn empty_and_degenerate_rings() {
        let empty = Ring::new(Vec::new(), DEFAULT_VNODES);
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        assert_eq!(empty.owner("anything"), None);

        // vnodes 0 is taken as 1: a ring with members always has owners.
        let one = Ring::new(ids(&["solo"]), 0);
        assert_eq!(one.vnodes(), 1);
        assert_eq!(one.owner("anything"), Some(&MemberId::from("solo")));

        let ring = Ring::new(ids(&["b", "a", "b", "c"]), 8);
        assert_eq!(ring.members(), ids(&["a", "b", "c"]).as_slice());
        assert_eq!(ring.len(), 3);
        assert!(ring.contains(&MemberId::from("b")));
        assert!(!ring.contains(&MemberId::from("d")));
        assert_ne!(ring, Ring::new(ids(&["a", "b", "c"]), 9));
        assert!(
            format!("{ring:?}").len() < 200,
            "Debug lists members, not points"
        );
    }

    #[test]
    fn member_id_as_text() {
        let id = MemberId::new("node-a:8080");
        assert_eq!(id.to_string(), "node-a:8080");
        assert_eq!(id.as_str(), "node-a:8080");
        assert_eq!(MemberId::from("x"), MemberId::from(String::from("x")));
    }

    #[test]
    fn ring_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Ring>();
    }

    #[test]
    fn drawn_keys_are_owned_by_the_member_that_asked() {
        let ids: Vec<MemberId> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| MemberId::new(*s))
            .collect();
        let ring = Ring::new(ids.clone(), 256);
        let mut n = 0u64;
        let mut counter = || {
            n += 1;
            format!("session-{n}")
        };
        for me in &ids {
            for _ in 0..50 {
                let key = ring
                    .draw_owned(me, &mut counter)
                    .expect("a balanced ring finds one");
                assert_eq!(ring.owner(&key), Some(me));
            }
        }
        // Not a member: nothing to own.
        assert_eq!(ring.draw_owned(&MemberId::new("z"), &mut counter), None);
        // A generator that never lands on `a` gives up after a bounded number of draws.
        let mut draws = 0;
        let b_key = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| ring.owner(k) == Some(&ids[1]))
            .unwrap();
        assert_eq!(
            ring.draw_owned(&ids[0], || {
                draws += 1;
                b_key.clone()
            }),
            None
        );
        assert_eq!(draws, 40, "8 draws per member");
    }
}
