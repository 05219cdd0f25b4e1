//! The outbox: a session's unacknowledged events, in `seq` order.
//!
//! Events get increasing `seq`s (from 1), wait here until the client
//! acknowledges them, and are delivered in `seq` order once due: an event is
//! never due before the one ahead of it.

use std::collections::VecDeque;

use serde_json::Value;

use crate::protocol::Event;

/// One stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Sequence number.
    pub seq: u64,
    /// When it may be delivered, in ms since the Unix epoch.
    pub due_ms: u64,
    /// Payload.
    pub body: Value,
}

/// Bytes a checkpoint spends on each event besides its body (seq, due time,
/// length prefix: an upper bound of their varint encoding).
const EVENT_OVERHEAD: usize = 24;

pub(crate) fn body_len(body: &Value) -> usize {
    // A Value always serializes; this is the length the checkpoint stores.
    serde_json::to_vec(body).map_or(0, |b| b.len())
}

/// Unacknowledged events, in `seq` order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outbox {
    pub(crate) events: VecDeque<StoredEvent>,
    /// The `seq` the next event gets (sequences start at 1).
    pub(crate) next_seq: u64,
    /// Encoded bytes of the held events' bodies.
    pub(crate) body_bytes: usize,
}

impl Outbox {
    /// Number of events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// What the held events take in a checkpoint, in bytes.
    pub fn checkpoint_bytes(&self) -> usize {
        self.body_bytes + EVENT_OVERHEAD * self.events.len()
    }

    /// The `seq` the next event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.max(1)
    }

    /// Highest `seq` handed out so far (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.max(1) - 1
    }

    pub(crate) fn push(&mut self, body: Value, due_ms: u64) -> u64 {
        let seq = self.next_seq.max(1);
        self.next_seq = seq + 1;
        // Delivery is in seq order: an event is never due before the one ahead of it.
        let due_ms = self
            .events
            .back()
            .map_or(due_ms, |prev| due_ms.max(prev.due_ms));
        self.body_bytes += body_len(&body);
        self.events.push_back(StoredEvent { seq, due_ms, body });
        seq
    }

    /// Forgets events up to `seq` that are due (an event not yet delivered cannot
    /// have been received, whatever the client says).
    pub fn ack(&mut self, seq: u64, now_ms: u64) -> bool {
        let before = self.events.len();
        while self
            .events
            .front()
            .is_some_and(|e| e.seq <= seq && e.due_ms <= now_ms)
        {
            if let Some(e) = self.events.pop_front() {
                self.body_bytes = self.body_bytes.saturating_sub(body_len(&e.body));
            }
        }
        before != self.events.len()
    }

    /// Events with `seq > after` that are due at `now_ms`, in order.
    pub fn due_after(&self, after: u64, now_ms: u64) -> impl Iterator<Item = Event> + '_ {
        self.events
            .iter()
            .skip_while(move |e| e.seq <= after)
            .take_while(move |e| e.due_ms <= now_ms)
            .map(|e| Event {
                seq: e.seq,
                body: e.body.clone(),
            })
    }

    /// When the first event with `seq > after` falls due, if one is held.
    pub fn next_due_after(&self, after: u64) -> Option<u64> {
        self.events.iter().find(|e| e.seq > after).map(|e| e.due_ms)
    }

    /// Takes back the events numbered `from` and later (pushed by an op whose
    /// checkpoint failed): the next event is numbered `from` again.
    pub(crate) fn take_back(&mut self, from: u64) {
        while self.events.back().is_some_and(|e| e.seq >= from) {
            if let Some(e) = self.events.pop_back() {
                self.body_bytes = self.body_bytes.saturating_sub(body_len(&e.body));
            }
        }
        self.next_seq = from;
    }

    /// Rebuilds an outbox from a checkpoint's events.
    pub(crate) fn from_parts(events: Vec<StoredEvent>, next_seq: u64) -> Self {
        Outbox {
            body_bytes: events.iter().map(|e| body_len(&e.body)).sum(),
            events: events.into(),
            next_seq,
        }
    }
}
