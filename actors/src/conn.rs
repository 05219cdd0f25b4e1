//! The attachment point between a session actor and a client connection.
//!
//! The actor never touches a socket: it pushes [`ConnMsg`]s (events, a close)
//! into a bounded channel that the connection's task drains. If a client reads
//! so slowly that the channel fills, the actor does not wait for it: the
//! connection is told to close with 1013 ("try again later") and the client
//! resumes, replaying whatever it missed from the outbox.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use crate::protocol::{CloseCode, Event};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// What an actor sends to a connection.
#[derive(Debug, Clone, PartialEq)]
///
/// Kept at 24 bytes (payloads boxed): the channel allocates its first block of
/// 32 slots with every connection, idle or not.
pub enum ConnMsg {
    /// A session event to write.
    Event(Box<Event>),
    /// Close the connection with this code and reason, after what is queued.
    Close(CloseCode, Box<str>),
    /// The session left this actor (handed off to another owner): the
    /// connection keeps its client and routes to the session's new owner.
    Moved,
}

#[derive(Debug, Default)]
struct Forced {
    close: Mutex<Option<(CloseCode, String)>>,
    notify: Notify,
}

/// The actor's side: cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    id: u64,
    tx: mpsc::Sender<ConnMsg>,
    forced: Arc<Forced>,
}

/// The connection task's side.
#[derive(Debug)]
pub struct ConnReceiver {
    rx: mpsc::Receiver<ConnMsg>,
    forced: Arc<Forced>,
}

/// A new connection attachment holding at most `capacity` undelivered messages.
pub fn conn_channel(capacity: usize) -> (ConnHandle, ConnReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let forced = Arc::new(Forced::default());
    (
        ConnHandle {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            tx,
            forced: forced.clone(),
        },
        ConnReceiver { rx, forced },
    )
}

impl ConnHandle {
    /// Unique id of this connection within the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues an event; `false` if the connection is gone or too slow (then it is
    /// being closed with 1013).
    pub fn send_event(&self, e: Event) -> bool {
        match self.tx.try_send(ConnMsg::Event(Box::new(e))) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.force_close(
                    CloseCode::TryAgainLater,
                    "client is not reading fast enough",
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Closes the connection after the messages already queued.
    pub fn close(&self, code: CloseCode, reason: impl Into<String>) {
        let reason = reason.into();
        if let Err(mpsc::error::TrySendError::Full(_)) = self
            .tx
            .try_send(ConnMsg::Close(code, reason.as_str().into()))
        {
            self.force_close(code, reason);
        }
    }

    /// Tells the connection its session moved (after what is queued); if it
    /// cannot be told, it is closed with 1012 so its client resumes.
    pub fn moved(&self) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(ConnMsg::Moved) {
            self.force_close(CloseCode::Restart, "session moved: resume");
        }
    }

    /// Closes the connection now, dropping whatever is queued.
    pub fn force_close(&self, code: CloseCode, reason: impl Into<String>) {
        let mut slot = self.forced.close.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((code, reason.into()));
            self.forced.notify.notify_one();
        }
    }
}

impl ConnReceiver {
    /// The next message; `None` once every handle is gone.
    pub async fn recv(&mut self) -> Option<ConnMsg> {
        loop {
            if let Some((code, reason)) = self
                .forced
                .close
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                return Some(ConnMsg::Close(code, reason.into()));
            }
            tokio::select! {
                biased;
                _ = self.forced.notify.notified() => continue,
                m = self.rx.recv() => return m,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_message_stays_small() {
        // Every connection's channel allocates 32 slots up front.
        assert!(
            std::mem::size_of::<ConnMsg>() <= 24,
            "{}",
            std::mem::size_of::<ConnMsg>()
        );
    }
}
