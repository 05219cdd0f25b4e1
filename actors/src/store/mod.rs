//! Checkpoint stores: where sessions survive their node.
//!
//! [`CheckpointStore`] is the one interface the session actors use. Every
//! implementation keeps, per session, the checkpoint bytes and an **epoch**: each
//! activation takes a strictly larger epoch ([`CheckpointStore::activate`],
//! [`CheckpointStore::create`]), and a write or delete carrying an epoch older
//! than the stored one is refused with [`StoreError::Fenced`]. That is the
//! fencing the cluster relies on: two nodes that both believe they own a session
//! can never both have writes accepted.
//!
//! # Layout
//! - [`memory`]: in-process store, the single-node default and for unit tests.
//! - [`redis`]: Redis store, one key pair per session with a hash tag, fenced
//!   writes in one Lua script, group commit into pipelined batches.

pub mod memory;
pub mod redis;

use futures_util::future::BoxFuture;

use crate::ids::SessionId;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached, or did not confirm in time: a write
    /// may or may not have happened (no answer, a lost connection, too few
    /// replicas confirmed it). Retryable; a session actor whose checkpoint
    /// gets it re-activates itself from the store before it writes again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A newer activation holds the session: this writer is stale and must stop.
    #[error("write fenced: stored epoch {stored} is newer than ours ({ours})")]
    Fenced {
        /// Epoch found in the store.
        stored: u64,
        /// Epoch of the refused write.
        ours: u64,
    },
}

/// The answer to an activation.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    /// The epoch this activation owns.
    pub epoch: u64,
    /// The checkpoint bytes.
    pub checkpoint: Vec<u8>,
}

/// What a write does to the store's index of sessions with timers (the index
/// a node scans to wake passivated sessions whose timer is due). Written in the
/// same atomic step as the checkpoint, so the index never disagrees with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Leave the session's entry as it is (the common case: no timer changed).
    Keep,
    /// Wake the session at this time (ms since the Unix epoch).
    At(u64),
    /// The session has no timer: drop its entry.
    Never,
}

/// A place to keep checkpoints, shared by all session actors of a node.
///
/// Futures are `'static` so actors can hold them across their own awaits.
pub trait CheckpointStore: Send + Sync + 'static {
    /// Takes the next epoch for an existing session and reads its checkpoint;
    /// `Ok(None)` if the session is unknown or expired (no epoch is taken).
    fn activate(
        &self,
        id: &SessionId,
    ) -> BoxFuture<'static, Result<Option<Activation>, StoreError>>;

    /// Takes the first epoch for a brand-new session id; refused with
    /// [`StoreError::Fenced`] (`ours: 0`) if the session exists already (two
    /// activations created the same new id, e.g. a create retried at another
    /// node: the second must not overwrite the first).
    fn create(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>>;

    /// Writes a checkpoint under `epoch` (refused if a newer epoch exists) and
    /// refreshes the session's time to live.
    fn save(
        &self,
        id: &SessionId,
        epoch: u64,
        bytes: Vec<u8>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        self.save_waking(id, epoch, bytes, Wake::Keep)
    }

    /// [`CheckpointStore::save`], updating the timer index as `wake` says in
    /// the same atomic step.
    fn save_waking(
        &self,
        id: &SessionId,
        epoch: u64,
        bytes: Vec<u8>,
        wake: Wake,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Up to `limit` sessions whose timer index entry is due at `now_ms`,
    /// earliest first. An entry stays until a write of its session moves or
    /// drops it, or an activation finds the session gone.
    fn due_wakes(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<SessionId>, StoreError>>;

    /// Deletes a session (after `bye`), fenced like `save`. The epoch stays
    /// behind as a tombstone so a stale writer cannot bring the session back.
    fn delete(&self, id: &SessionId, epoch: u64) -> BoxFuture<'static, Result<(), StoreError>>;

    /// The session's current epoch in the store (0 if none): an actor whose
    /// own epoch is lower has been superseded by a newer activation.
    fn epoch(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>>;

    /// The session's checkpoint bytes, if it has one, read without taking an
    /// epoch or refreshing its time to live (a status question must not
    /// move the session nor keep it alive).
    fn peek(&self, id: &SessionId) -> BoxFuture<'static, Result<Option<Vec<u8>>, StoreError>>;

    /// Checks that the store answers (readiness).
    fn ping(&self) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Whether checkpoints outlive this process (the in-memory store's do not).
    fn is_durable(&self) -> bool;

    /// A short description for logs and `/cluster` (no credentials).
    fn describe(&self) -> String;
}
