//! The checkpoint codec: the bytes stored for a session.
//!
//! A checkpoint is a bincode 2.0.1 envelope: a `u16` format version, then the
//! body of that version (today only [`FORMAT_V1`]). A reader that meets a
//! version it does not know answers [`CodecError::UnknownFormat`] instead of
//! guessing; a future format adds a new body type and a migration here
//! (garage's `util/migrate.rs` pattern).

use bincode::{Decode, Encode};
use serde_json::Value;

/// The current checkpoint format.
pub const FORMAT_V1: u16 = 1;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Why stored bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The envelope names a format this build does not know.
    #[error("unknown checkpoint format version {0} (this build reads {FORMAT_V1})")]
    UnknownFormat(u16),
    /// The bytes are not a valid envelope or body.
    #[error("corrupt checkpoint: {0}")]
    Corrupt(String),
}

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

/// A session's checkpoint, format 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Application state, as the application encodes it.
    pub app: Vec<u8>,
    /// State version.
    pub version: u64,
    /// Highest op id applied.
    pub last_op: u64,
    /// JSON of the reply to `last_op`, if kept.
    pub last_reply: Option<Vec<u8>>,
    /// SHA-256 of the resume token.
    pub token_hash: [u8; 32],
    /// Next event sequence number.
    pub next_seq: u64,
    /// Unacknowledged events.
    pub events: Vec<StoredEvent>,
}

/// Wire shape of [`StoredEvent`] (event bodies are stored as JSON text).
#[derive(Encode, Decode)]
struct EventV1 {
    seq: u64,
    due_ms: u64,
    body: Vec<u8>,
}

/// Wire shape of [`Checkpoint`], format 1.
#[derive(Encode, Decode)]
struct CheckpointV1 {
    app: Vec<u8>,
    version: u64,
    last_op: u64,
    last_reply: Option<Vec<u8>>,
    token_hash: [u8; 32],
    next_seq: u64,
    events: Vec<EventV1>,
}

/// Encodes a checkpoint in the current format (consumes it: no byte is copied twice).
pub fn encode(ck: Checkpoint) -> Vec<u8> {
    let body = CheckpointV1 {
        app: ck.app,
        version: ck.version,
        last_op: ck.last_op,
        last_reply: ck.last_reply,
        token_hash: ck.token_hash,
        next_seq: ck.next_seq,
        events: ck
            .events
            .iter()
            .map(|e| EventV1 {
                seq: e.seq,
                due_ms: e.due_ms,
                body: serde_json::to_vec(&e.body).unwrap_or_default(),
            })
            .collect(),
    };
    // Encoding plain owned data into a Vec cannot fail.
    bincode::encode_to_vec((FORMAT_V1, body), config()).unwrap_or_default()
}

/// Decodes a checkpoint of any known format.
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, CodecError> {
    let corrupt = |e: &dyn std::fmt::Display| CodecError::Corrupt(e.to_string());
    let (format, used): (u16, usize) =
        bincode::decode_from_slice(bytes, config()).map_err(|e| corrupt(&e))?;
    match format {
        FORMAT_V1 => {
            let (b, _): (CheckpointV1, usize) =
                bincode::decode_from_slice(&bytes[used..], config()).map_err(|e| corrupt(&e))?;
            let events = b
                .events
                .into_iter()
                .map(|e| {
                    Ok(StoredEvent {
                        seq: e.seq,
                        due_ms: e.due_ms,
                        body: serde_json::from_slice(&e.body).map_err(|e| corrupt(&e))?,
                    })
                })
                .collect::<Result<_, CodecError>>()?;
            Ok(Checkpoint {
                app: b.app,
                version: b.version,
                last_op: b.last_op,
                last_reply: b.last_reply,
                token_hash: b.token_hash,
                next_seq: b.next_seq,
                events,
            })
        }
        other => Err(CodecError::UnknownFormat(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn sample() -> Checkpoint {
        Checkpoint {
            app: br#"{"a":1}"#.to_vec(),
            version: 3,
            last_op: 9,
            last_reply: Some(br#"{"id":9}"#.to_vec()),
            token_hash: [7; 32],
            next_seq: 4,
            events: vec![StoredEvent {
                seq: 3,
                due_ms: 12,
                body: json!({"hi": [1, 2]}),
            }],
        }
    }

    #[test]
    fn round_trip() {
        let ck = sample();
        assert_eq!(decode(&encode(ck.clone())).unwrap(), ck);
    }

    #[test]
    fn envelope_starts_with_the_format_version() {
        let bytes = encode(sample());
        let (v, _): (u16, usize) = bincode::decode_from_slice(&bytes, config()).unwrap();
        assert_eq!(v, FORMAT_V1);
    }

    #[test]
    fn unknown_format_is_an_error_not_a_panic() {
        let mut bytes = bincode::encode_to_vec(42u16, config()).unwrap();
        bytes.extend_from_slice(&encode(sample())[1..]);
        assert!(matches!(decode(&bytes), Err(CodecError::UnknownFormat(42))));
    }

    #[test]
    fn truncated_and_empty_are_corrupt() {
        let bytes = encode(sample());
        assert!(matches!(
            decode(&bytes[..bytes.len() / 2]),
            Err(CodecError::Corrupt(_))
        ));
        assert!(matches!(decode(&[]), Err(CodecError::Corrupt(_))));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn any_checkpoint_round_trips(
            app in prop::collection::vec(any::<u8>(), 0..64),
            version in any::<u64>(), last_op in any::<u64>(),
            reply in prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
            seqs in prop::collection::vec((any::<u64>(), any::<u64>(), any::<i32>()), 0..8),
        ) {
            let ck = Checkpoint {
                app, version, last_op, last_reply: reply, token_hash: [1; 32], next_seq: 5,
                events: seqs.into_iter().map(|(seq, due_ms, b)| StoredEvent { seq, due_ms, body: json!(b) }).collect(),
            };
            prop_assert_eq!(decode(&encode(ck.clone())).unwrap(), ck);
        }
    }
}
