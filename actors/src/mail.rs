//! Messages between actors, exactly once: an actor's checkpointed outgoing
//! queue and its table of senders' watermarks. Pure data and rules, no I/O.
//!
//! **Sending.** A committed handler's sends get increasing sequence numbers
//! (`seq`, one counter per actor for all destinations) and wait in the
//! sender's outgoing queue, which is part of its checkpoint, until the
//! receiver acknowledges them. The counter belongs to an *incarnation*, a
//! random number drawn at the actor's first send and kept in its checkpoint:
//! an entity that expired and is made again starts a new stream, which
//! receivers do not confuse with the old one.
//!
//! **Receiving.** A receiver keeps, per sender, the incarnation and the
//! highest `seq` it applied, and writes it in the same checkpoint as the
//! handler's effects. A message at or below its sender's watermark is a
//! duplicate and is acknowledged without running anything.
//!
//! **Order.** A sender has at most one batch in flight per destination, and
//! every batch starts at the oldest unacknowledged message to it; the
//! receiver applies a batch in order and stops at the first message it
//! cannot apply now. So a message is applied only after every earlier
//! message of the same sender to the same receiver: no gap, no reordering,
//! even though `seq`s to one destination are not contiguous.
//!
//! **Bounds.** The outgoing queue holds at most `limits.max_outgoing`
//! messages (a send beyond it fails in the handler); a message body is at
//! most `limits.max_message_bytes`; watermarks older than the store's time to
//! live are forgotten (a sender silent that long has nothing left to resend:
//! a resend only happens while a message is unacknowledged, and an
//! unacknowledged message keeps its sender awake), and beyond
//! `limits.max_watermarks` rows the oldest are forgotten first.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use crate::address::Address;

/// A message waiting in its sender's outgoing queue.
#[derive(Debug, Clone, PartialEq)]
pub struct OutMsg {
    /// The sender's sequence number.
    pub seq: u64,
    /// Where it goes.
    pub to: Address,
    /// The message, as JSON.
    pub body: Value,
    /// When it was committed (ms since the Unix epoch), for delivery latency.
    pub at_ms: u64,
}

/// What a receiver remembers of one sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The sender's incarnation.
    pub inc: u64,
    /// The highest `seq` applied from it.
    pub seq: u64,
    /// When it was last applied (ms since the Unix epoch).
    pub at_ms: u64,
}

/// Bytes a checkpoint spends per queued message besides its body and address.
pub(crate) const MSG_OVERHEAD: usize = 24;
/// Bytes a checkpoint spends per watermark besides the sender's name, at
/// most: three u64 varints of up to 9 bytes and the name's length.
pub(crate) const MARK_OVERHEAD: usize = 28;

/// An actor's outgoing queue and its senders' watermarks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Post {
    /// This actor's incarnation as a sender (0 until its first send).
    pub(crate) inc: u64,
    /// The last `seq` given to a message.
    pub(crate) last_seq: u64,
    /// Unacknowledged messages, by `seq`.
    pub(crate) out: BTreeMap<u64, OutMsg>,
    /// The same messages' seqs by destination (an index of `out`: a fan-out
    /// to a thousand receivers must not scan the whole queue per receiver).
    by_dest: HashMap<Address, BTreeSet<u64>>,
    /// Encoded size of `out`'s bodies and addresses.
    out_bytes: usize,
    /// Watermarks, by sender ([`crate::address::Sender::mark_key`]).
    pub(crate) marks: HashMap<String, Mark>,
}

/// Whether a received message is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not applied yet: run the handler.
    Fresh,
    /// Applied before: acknowledge it, run nothing.
    Duplicate,
}

/// What one commit changed in a [`Post`], to take it back.
#[derive(Debug, Clone, Default)]
pub struct PostUndo {
    inc: u64,
    last_seq: u64,
    /// A watermark row as it was before (key, old value).
    mark: Option<(String, Option<Mark>)>,
    /// A message removed by the commit (a bounce), to put back.
    removed: Option<OutMsg>,
}

fn msg_bytes(to: &Address, body: &Value) -> usize {
    crate::outbox::body_len(body) + to.text_len() + MSG_OVERHEAD
}

impl Post {
    /// Rebuilds from a checkpoint's parts.
    pub(crate) fn from_parts(
        inc: u64,
        last_seq: u64,
        out: Vec<OutMsg>,
        marks: impl IntoIterator<Item = (String, Mark)>,
    ) -> Self {
        let mut post = Post {
            inc,
            last_seq,
            marks: marks.into_iter().collect(),
            ..Post::default()
        };
        for m in out {
            post.insert(m);
        }
        post
    }

    /// Queues `m` (and indexes it).
    fn insert(&mut self, m: OutMsg) {
        self.out_bytes += msg_bytes(&m.to, &m.body);
        self.by_dest.entry(m.to.clone()).or_default().insert(m.seq);
        self.out.insert(m.seq, m);
    }

    /// Takes message `seq` out of the queue (and its index).
    fn take(&mut self, seq: u64) -> Option<OutMsg> {
        let m = self.out.remove(&seq)?;
        self.out_bytes -= msg_bytes(&m.to, &m.body);
        if let Some(seqs) = self.by_dest.get_mut(&m.to) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.by_dest.remove(&m.to);
            }
        }
        Some(m)
    }

    /// The queued messages, in `seq` order.
    pub fn queue(&self) -> impl Iterator<Item = &OutMsg> {
        self.out.values()
    }

    /// Whether nothing is queued and nothing is remembered (a checkpoint
    /// without messaging: the older formats are written).
    pub fn is_blank(&self) -> bool {
        self.inc == 0 && self.out.is_empty() && self.marks.is_empty()
    }

    /// Messages waiting to be acknowledged.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// The incarnation, drawn if this is the first send.
    fn incarnation(&mut self) -> u64 {
        while self.inc == 0 {
            self.inc = rand::random();
        }
        self.inc
    }

    /// Starts a commit: what [`Post::undo`] needs.
    pub(crate) fn begin(&self) -> PostUndo {
        PostUndo {
            inc: self.inc,
            last_seq: self.last_seq,
            mark: None,
            removed: None,
        }
    }

    /// Queues a committed handler's message; answers its `seq`.
    pub(crate) fn enqueue(&mut self, to: Address, body: Value, now_ms: u64) -> u64 {
        self.incarnation();
        metrics::counter!("berth_messages_sent_total").increment(1);
        self.last_seq += 1;
        self.insert(OutMsg {
            seq: self.last_seq,
            to,
            body,
            at_ms: now_ms,
        });
        self.last_seq
    }

    /// The sender's incarnation for messages queued so far.
    pub fn inc(&self) -> u64 {
        self.inc
    }

    /// Every destination with a message waiting, once each, oldest first.
    pub fn destinations(&self) -> Vec<Address> {
        let mut firsts: Vec<(u64, &Address)> = self
            .by_dest
            .iter()
            .filter_map(|(to, seqs)| seqs.first().map(|s| (*s, to)))
            .collect();
        firsts.sort_unstable_by_key(|(s, _)| *s);
        firsts.into_iter().map(|(_, to)| to.clone()).collect()
    }

    /// The messages waiting for `to`, in order, at most `max`.
    pub fn pending_for(&self, to: &Address, max: usize) -> Vec<OutMsg> {
        self.by_dest.get(to).map_or_else(Vec::new, |seqs| {
            seqs.iter()
                .take(max)
                .filter_map(|s| self.out.get(s))
                .cloned()
                .collect()
        })
    }

    /// `to` acknowledged every message to it up to `upto`: they leave the
    /// queue. Answers the removed messages.
    pub fn ack(&mut self, to: &Address, upto: u64) -> Vec<OutMsg> {
        self.ack_except(to, upto, &std::collections::HashSet::new())
    }

    /// Like [`Post::ack`], but the messages in `keep` stay queued (they were
    /// refused: their bounce removes them, in its own commit).
    pub fn ack_except(
        &mut self,
        to: &Address,
        upto: u64,
        keep: &std::collections::HashSet<u64>,
    ) -> Vec<OutMsg> {
        let done: Vec<u64> = self.by_dest.get(to).map_or_else(Vec::new, |seqs| {
            seqs.range(..=upto)
                .filter(|s| !keep.contains(s))
                .copied()
                .collect()
        });
        done.into_iter().filter_map(|s| self.take(s)).collect()
    }

    /// The queued message `seq`, if it is still queued.
    pub fn queued_msg(&self, seq: u64) -> Option<&OutMsg> {
        self.out.get(&seq)
    }

    /// Removes message `seq` as part of a commit (a bounce handled).
    pub(crate) fn remove(&mut self, seq: u64, undo: &mut PostUndo) {
        if let Some(m) = self.take(seq) {
            undo.removed = Some(m);
        }
    }

    /// Whether the message `seq` of incarnation `inc` from `from` was applied.
    pub fn seen(&self, from: &str, inc: u64, seq: u64) -> Seen {
        match self.marks.get(from) {
            Some(m) if m.inc == inc && seq <= m.seq => Seen::Duplicate,
            _ => Seen::Fresh,
        }
    }

    /// Records, as part of a commit, that `seq` of `inc` from `from` is applied.
    pub(crate) fn record(
        &mut self,
        from: String,
        inc: u64,
        seq: u64,
        now_ms: u64,
        undo: &mut PostUndo,
    ) {
        let old = self.marks.insert(
            from.clone(),
            Mark {
                inc,
                seq,
                at_ms: now_ms,
            },
        );
        undo.mark = Some((from, old));
    }

    /// Takes a commit back.
    pub(crate) fn undo(&mut self, undo: PostUndo) {
        self.inc = undo.inc;
        self.last_seq = undo.last_seq;
        // Messages this commit queued have seqs above the old last one.
        let queued: Vec<u64> = self
            .out
            .range(undo.last_seq + 1..)
            .map(|(s, _)| *s)
            .collect();
        for s in queued {
            self.take(s);
        }
        if let Some(m) = undo.removed {
            self.insert(m);
        }
        if let Some((key, old)) = undo.mark {
            match old {
                Some(m) => self.marks.insert(key, m),
                None => self.marks.remove(&key),
            };
        }
    }

    /// Forgets watermarks last used before `now_ms - ttl_ms`, then the
    /// oldest beyond `max`. Answers how many rows were dropped.
    pub fn expire(&mut self, now_ms: u64, ttl_ms: u64, max: usize) -> usize {
        let before = self.marks.len();
        let horizon = now_ms.saturating_sub(ttl_ms);
        self.marks.retain(|_, m| m.at_ms >= horizon);
        if self.marks.len() > max {
            let mut ages: Vec<u64> = self.marks.values().map(|m| m.at_ms).collect();
            ages.sort_unstable();
            let cut = ages[self.marks.len() - max - 1];
            self.marks.retain(|_, m| m.at_ms > cut);
        }
        before - self.marks.len()
    }

    /// What the queue and the watermarks take in a checkpoint, in bytes.
    pub fn checkpoint_bytes(&self) -> usize {
        self.out_bytes
            + self
                .marks
                .keys()
                .map(|k| k.len() + MARK_OVERHEAD)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn room(k: &str) -> Address {
        Address::entity("room", k).unwrap()
    }

    #[test]
    fn sends_queue_in_order_and_leave_on_ack() {
        let mut p = Post::default();
        assert!(p.is_blank());
        let a = p.enqueue(room("a"), json!(1), 5);
        let b = p.enqueue(room("b"), json!(2), 5);
        let c = p.enqueue(room("a"), json!(3), 5);
        assert_eq!((a, b, c), (1, 2, 3));
        assert_ne!(p.inc(), 0);
        assert_eq!(p.destinations(), vec![room("a"), room("b")]);
        let to_a: Vec<u64> = p
            .pending_for(&room("a"), 10)
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(to_a, vec![1, 3]);
        assert_eq!(p.ack(&room("a"), 1).len(), 1);
        assert_eq!(p.queued(), 2);
        assert_eq!(p.ack(&room("a"), 9).len(), 1);
        assert_eq!(p.destinations(), vec![room("b")]);
    }

    proptest::proptest! {
        /// The indexed queue answers as a plain scan of the queue would,
        /// whatever the sends, acks (with refusals kept), removals and undos.
        #[test]
        fn the_queue_index_agrees_with_a_scan(
            steps in proptest::collection::vec((0u8..4, 0u8..5, 0u64..40), 1..80)
        ) {
            let mut p = Post::default();
            let mut model: Vec<OutMsg> = Vec::new();
            for (op, dest, n) in steps {
                let to = room(&format!("r{dest}"));
                match op {
                    0 => {
                        let seq = p.enqueue(to.clone(), json!(n), 0);
                        model.push(OutMsg { seq, to, body: json!(n), at_ms: 0 });
                    }
                    1 => {
                        let keep: std::collections::HashSet<u64> =
                            model.iter().map(|m| m.seq).filter(|s| s % 3 == 0).collect();
                        let gone: Vec<u64> =
                            p.ack_except(&to, n, &keep).iter().map(|m| m.seq).collect();
                        let want: Vec<u64> = model
                            .iter()
                            .filter(|m| m.to == to && m.seq <= n && !keep.contains(&m.seq))
                            .map(|m| m.seq)
                            .collect();
                        proptest::prop_assert_eq!(&gone, &want);
                        model.retain(|m| !want.contains(&m.seq));
                    }
                    2 => {
                        let mut u = p.begin();
                        p.remove(n, &mut u);
                        model.retain(|m| m.seq != n);
                    }
                    _ => {
                        // A commit that queues two messages, taken back.
                        let before = p.clone();
                        let u = p.begin();
                        p.enqueue(to.clone(), json!("x"), 0);
                        p.enqueue(room("r9"), json!("y"), 0);
                        p.undo(u);
                        proptest::prop_assert_eq!(&p, &before);
                    }
                }
                let seqs: Vec<u64> = p.queue().map(|m| m.seq).collect();
                let want: Vec<u64> = model.iter().map(|m| m.seq).collect();
                proptest::prop_assert_eq!(seqs, want);
                let mut dests = Vec::new();
                for m in &model {
                    if !dests.contains(&m.to) {
                        dests.push(m.to.clone());
                    }
                }
                proptest::prop_assert_eq!(p.destinations(), dests.clone());
                for d in dests {
                    let got: Vec<u64> = p.pending_for(&d, 3).iter().map(|m| m.seq).collect();
                    let want: Vec<u64> =
                        model.iter().filter(|m| m.to == d).take(3).map(|m| m.seq).collect();
                    proptest::prop_assert_eq!(got, want);
                }
                let bytes: usize = model.iter().map(|m| msg_bytes(&m.to, &m.body)).sum();
                proptest::prop_assert_eq!(p.checkpoint_bytes(), bytes);
            }
        }
    }

    #[test]
    fn watermarks_drop_duplicates_per_incarnation() {
        let mut p = Post::default();
        let mut u = p.begin();
        assert_eq!(p.seen("x", 7, 3), Seen::Fresh);
        p.record("x".into(), 7, 3, 100, &mut u);
        assert_eq!(p.seen("x", 7, 3), Seen::Duplicate);
        assert_eq!(p.seen("x", 7, 2), Seen::Duplicate);
        assert_eq!(p.seen("x", 7, 4), Seen::Fresh);
        // Another incarnation of the same address is another stream.
        assert_eq!(p.seen("x", 8, 1), Seen::Fresh);
    }

    #[test]
    fn undo_takes_a_commit_back_exactly() {
        let mut p = Post::default();
        p.enqueue(room("a"), json!("keep"), 1);
        let mut u0 = p.begin();
        p.record("s".into(), 1, 1, 1, &mut u0);
        let before = p.clone();
        let mut u = p.begin();
        p.enqueue(room("b"), json!("x"), 2);
        p.record("s".into(), 1, 2, 2, &mut u);
        p.remove(1, &mut u);
        assert_ne!(p, before);
        p.undo(u);
        assert_eq!(p, before);
    }

    #[test]
    fn old_and_excess_watermarks_expire() {
        let mut p = Post::default();
        let mut u = p.begin();
        for i in 0..10u64 {
            p.record(format!("s{i}"), 1, 1, 1000 + i, &mut u);
        }
        assert_eq!(p.expire(1005, 2, 100), 3); // at_ms 1000..=1002 are older than 1003
        assert_eq!(p.expire(1005, 1000, 4), 3); // keep the newest 4
        let mut left: Vec<_> = p.marks.keys().cloned().collect();
        left.sort();
        assert_eq!(left, vec!["s6", "s7", "s8", "s9"]);
    }
}
