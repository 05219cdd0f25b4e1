//! The checkpoint codec: the bytes stored for a session.
//!
//! A checkpoint is a bincode 2.0.1 envelope: a `u16` format version, then the
//! body of that version: [`FORMAT_V1`], [`FORMAT_V2`] (format 1 plus the
//! application's state schema version and the session's timers) or
//! [`FORMAT_V3`] (format 2 plus the user and the messaging state). Each
//! checkpoint is written in the oldest format that holds it (a kv session
//! with no timer, user or message is still format 1), so nodes of an earlier
//! release read what they can during a rolling upgrade. A reader that meets a
//! version it does not know answers [`CodecError::UnknownFormat`] instead of
//! guessing; a future format adds a new body type and a migration here
//! (garage's `util/migrate.rs` pattern).

use bincode::{Decode, Encode};

/// The first checkpoint format.
pub const FORMAT_V1: u16 = 1;
/// Format 1 plus the application state's schema version and the timers.
pub const FORMAT_V2: u16 = 2;
/// Format 2 plus the session's user (the subject of its credential) and the
/// actor's messaging: incarnation, last sequence number, outgoing queue and
/// senders' watermarks.
pub const FORMAT_V3: u16 = 3;

/// The most bytes decoding one checkpoint may claim (bincode's limit, about
/// the memory the decoded checkpoint takes). Far above any checkpoint berth
/// writes (`limits.max_checkpoint_bytes`, 1 MiB by default), it stops a
/// corrupt length prefix from making bincode allocate what it claims:
/// gigabytes, or an abort of the node, for a few stored bytes.
pub const MAX_DECODE_BYTES: usize = 256 * 1024 * 1024;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DECODE_BYTES>,
>;

/// `standard()` (the stored format is unchanged), with [`MAX_DECODE_BYTES`].
fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

/// Why stored bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The envelope names a format this build does not know.
    #[error("unknown checkpoint format version {0} (this build reads {FORMAT_V1} to {FORMAT_V3})")]
    UnknownFormat(u16),
    /// The bytes are not a valid envelope or body.
    #[error("corrupt checkpoint: {0}")]
    Corrupt(String),
}

use crate::address::Address;
pub use crate::mail::{Mark, OutMsg};
pub use crate::outbox::StoredEvent;

/// A session's checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Application state, as the application encodes it.
    pub app: Vec<u8>,
    /// The application's schema version of `app` (1 in format 1).
    pub app_version: u32,
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
    /// Timers: name and due time (ms since the Unix epoch); none in format 1.
    pub timers: Vec<(String, u64)>,
    /// The subject of the credential the session was created with (format 3).
    pub user: Option<String>,
    /// Messaging: the incarnation and the last `seq` sent (format 3).
    pub mail_inc: u64,
    /// The last message `seq` given out.
    pub mail_seq: u64,
    /// Unacknowledged outgoing messages.
    pub outgoing: Vec<OutMsg>,
    /// Senders' watermarks, by sender.
    pub marks: Vec<(String, Mark)>,
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

/// Wire shape of [`Checkpoint`], format 2.
#[derive(Encode, Decode)]
struct CheckpointV2 {
    v1: CheckpointV1,
    app_version: u32,
    timers: Vec<(String, u64)>,
}

/// Wire shape of [`OutMsg`].
#[derive(Encode, Decode)]
struct MsgV3 {
    seq: u64,
    to: String,
    body: Vec<u8>,
    at_ms: u64,
}

/// Wire shape of a watermark row.
#[derive(Encode, Decode)]
struct MarkV3 {
    from: String,
    inc: u64,
    seq: u64,
    at_ms: u64,
}

/// Wire shape of [`Checkpoint`], format 3.
#[derive(Encode, Decode)]
struct CheckpointV3 {
    v2: CheckpointV2,
    user: Option<String>,
    mail_inc: u64,
    mail_seq: u64,
    outgoing: Vec<MsgV3>,
    marks: Vec<MarkV3>,
}

/// Encodes a checkpoint (consumes it: no byte is copied twice) in the oldest
/// format that holds it.
pub fn encode(ck: Checkpoint) -> Vec<u8> {
    let v1 = CheckpointV1 {
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
    // Found by fuzz/'s checkpoint target: a `mail_seq` alone must keep
    // format 3 too, or it is lost (and an actor's next send reuses a seq).
    let v3 = ck.user.is_some()
        || ck.mail_inc != 0
        || ck.mail_seq != 0
        || !ck.outgoing.is_empty()
        || !ck.marks.is_empty();
    if !v3 && ck.app_version == 1 && ck.timers.is_empty() {
        return bincode::encode_to_vec((FORMAT_V1, v1), config()).unwrap_or_default();
    }
    let v2 = CheckpointV2 {
        v1,
        app_version: ck.app_version,
        timers: ck.timers,
    };
    if !v3 {
        return bincode::encode_to_vec((FORMAT_V2, v2), config()).unwrap_or_default();
    }
    let body = CheckpointV3 {
        v2,
        user: ck.user,
        mail_inc: ck.mail_inc,
        mail_seq: ck.mail_seq,
        outgoing: ck
            .outgoing
            .into_iter()
            .map(|m| MsgV3 {
                seq: m.seq,
                to: m.to.to_string(),
                body: serde_json::to_vec(&m.body).unwrap_or_default(),
                at_ms: m.at_ms,
            })
            .collect(),
        marks: ck
            .marks
            .into_iter()
            .map(|(from, m)| MarkV3 {
                from,
                inc: m.inc,
                seq: m.seq,
                at_ms: m.at_ms,
            })
            .collect(),
    };
    bincode::encode_to_vec((FORMAT_V3, body), config()).unwrap_or_default()
}

/// Decodes a checkpoint of any known format.
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, CodecError> {
    let corrupt = |e: &dyn std::fmt::Display| CodecError::Corrupt(e.to_string());
    let (format, used): (u16, usize) =
        bincode::decode_from_slice(bytes, config()).map_err(|e| corrupt(&e))?;
    let body = &bytes[used..];
    let v2_of = |v1| CheckpointV2 {
        v1,
        app_version: 1,
        timers: Vec::new(),
    };
    let v3 = match format {
        FORMAT_V1 => {
            let (b, _): (CheckpointV1, usize) =
                bincode::decode_from_slice(body, config()).map_err(|e| corrupt(&e))?;
            CheckpointV3::of(v2_of(b))
        }
        FORMAT_V2 => {
            let (b, _): (CheckpointV2, usize) =
                bincode::decode_from_slice(body, config()).map_err(|e| corrupt(&e))?;
            CheckpointV3::of(b)
        }
        FORMAT_V3 => {
            let (b, _): (CheckpointV3, usize) =
                bincode::decode_from_slice(body, config()).map_err(|e| corrupt(&e))?;
            b
        }
        other => return Err(CodecError::UnknownFormat(other)),
    };
    let (b, app_version, timers) = (v3.v2.v1, v3.v2.app_version, v3.v2.timers);
    let outgoing = v3
        .outgoing
        .into_iter()
        .map(|m| {
            Ok(OutMsg {
                seq: m.seq,
                to: m.to.parse::<Address>().map_err(|e| corrupt(&e))?,
                body: serde_json::from_slice(&m.body).map_err(|e| corrupt(&e))?,
                at_ms: m.at_ms,
            })
        })
        .collect::<Result<_, CodecError>>()?;
    let marks = v3
        .marks
        .into_iter()
        .map(|m| {
            (
                m.from,
                Mark {
                    inc: m.inc,
                    seq: m.seq,
                    at_ms: m.at_ms,
                },
            )
        })
        .collect();
    {
        {
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
                app_version,
                version: b.version,
                last_op: b.last_op,
                last_reply: b.last_reply,
                token_hash: b.token_hash,
                next_seq: b.next_seq,
                events,
                timers,
                user: v3.user,
                mail_inc: v3.mail_inc,
                mail_seq: v3.mail_seq,
                outgoing,
                marks,
            })
        }
    }
}

impl CheckpointV3 {
    /// An older format's body, with nothing format 3 adds.
    fn of(v2: CheckpointV2) -> Self {
        CheckpointV3 {
            v2,
            user: None,
            mail_inc: 0,
            mail_seq: 0,
            outgoing: Vec::new(),
            marks: Vec::new(),
        }
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
            app_version: 1,
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
            timers: Vec::new(),
            user: None,
            mail_inc: 0,
            mail_seq: 0,
            outgoing: Vec::new(),
            marks: Vec::new(),
        }
    }

    #[test]
    fn a_user_or_messages_make_format_3_and_round_trip() {
        let ck = Checkpoint {
            timers: vec![("t".into(), 5)],
            user: Some("alice".into()),
            mail_inc: 77,
            mail_seq: 9,
            outgoing: vec![OutMsg {
                seq: 9,
                to: Address::entity("room", "lobby").unwrap(),
                body: json!({"say": "hi"}),
                at_ms: 3,
            }],
            marks: vec![(
                "room/lobby".into(),
                Mark {
                    inc: 5,
                    seq: 2,
                    at_ms: 4,
                },
            )],
            ..sample()
        };
        let bytes = encode(ck.clone());
        let (v, _): (u16, usize) = bincode::decode_from_slice(&bytes, config()).unwrap();
        assert_eq!(v, FORMAT_V3);
        assert_eq!(decode(&bytes).unwrap(), ck);
    }

    /// What exactly-once costs in a checkpoint, with realistic values (a
    /// random incarnation, a time in ms since the epoch, a session sender):
    /// printed for docs/benchmarks.md (`cargo test -p berth-actors --lib
    /// bookkeeping -- --nocapture`), and checked against the estimates the
    /// checkpoint bound is enforced with (`Post::checkpoint_bytes`), which
    /// must not undercount.
    #[test]
    fn the_exactly_once_bookkeeping_bytes_per_watermark_and_queued_message() {
        let base = Checkpoint {
            mail_inc: 0x9e37_79b9_7f4a_7c15,
            mail_seq: 1,
            ..sample()
        };
        let sender = crate::ids::SessionId::random().to_string();
        let mark = Mark {
            inc: 0x9e37_79b9_7f4a_7c15,
            seq: 123_456,
            at_ms: 1_780_000_000_000,
        };
        let marks = |n: usize| Checkpoint {
            marks: (0..n)
                .map(|i| (format!("{}{i:06}", &sender[..16]), mark))
                .collect(),
            ..base.clone()
        };
        let body = json!({"t": "show", "kind": "line", "seq": 42, "text": "hello"});
        let to = Address::Session(crate::ids::SessionId::random());
        let queued = |n: usize| Checkpoint {
            outgoing: (0..n as u64)
                .map(|i| OutMsg {
                    seq: 1_000 + i,
                    to: to.clone(),
                    body: body.clone(),
                    at_ms: 1_780_000_000_000,
                })
                .collect(),
            ..base.clone()
        };
        let n = 1000;
        let empty = encode(base.clone()).len();
        let per_mark = (encode(marks(n)).len() - empty) as f64 / n as f64;
        let per_msg = (encode(queued(n)).len() - empty) as f64 / n as f64;
        let body_len = crate::outbox::body_len(&body);
        println!(
            "checkpoint bytes: {per_mark:.1} per watermark (sender name {} bytes), \
             {per_msg:.1} per queued message (body {body_len} bytes, address {} bytes)",
            sender.len(),
            to.to_string().len()
        );
        // The estimates behind limits.max_checkpoint_bytes cover the real cost.
        assert!(per_mark <= (sender.len() + crate::mail::MARK_OVERHEAD) as f64);
        assert!(per_msg <= (body_len + to.to_string().len() + crate::mail::MSG_OVERHEAD) as f64);
    }

    #[test]
    fn timers_or_a_newer_schema_make_format_2_and_round_trip() {
        let ck = Checkpoint {
            app_version: 3,
            timers: vec![("remind".into(), 1_700_000_000_000)],
            ..sample()
        };
        let bytes = encode(ck.clone());
        let (v, _): (u16, usize) = bincode::decode_from_slice(&bytes, config()).unwrap();
        assert_eq!(v, FORMAT_V2);
        assert_eq!(decode(&bytes).unwrap(), ck);
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

    /// A bincode varint length prefix of `n`.
    fn len_prefix(n: u64) -> Vec<u8> {
        let mut v = vec![253];
        v.extend_from_slice(&n.to_le_bytes());
        v
    }

    #[test]
    fn the_fuzzers_out_of_memory_input_is_corrupt() {
        // Found by fuzz/'s `checkpoint` target, minimised: format 1, then an
        // `app` of 0xE2FF_D2FF bytes (3.8 GiB), which bincode allocated
        // before finding the bytes missing (a lazily zeroed allocation that a
        // large machine grants; a larger claim aborts, see the next test).
        assert!(matches!(
            decode(&[0x01, 0xfc, 0xff, 0xd2, 0xff, 0xe2]),
            Err(CodecError::Corrupt(_))
        ));
    }

    #[test]
    fn no_length_prefix_makes_decoding_allocate_what_it_claims() {
        // Every length field of the format, claiming 2^40 (an allocation that
        // fails and aborts the process), 2^63 (a capacity overflow panic) and
        // u64::MAX. Each is `Corrupt`, at once.
        let fields: [Vec<u8>; 4] = [
            // format 1, then the `app` bytes
            vec![1],
            // no app bytes, version 0, last_op 0, then `Some` reply bytes
            vec![1, 0, 0, 0, 1],
            // ..., no reply, a token hash, next_seq 1, then the events
            [&[1u8, 0, 0, 0, 0][..], &[0; 32], &[1]].concat(),
            // ..., one event: seq 1, due 0, then its body
            [&[1u8, 0, 0, 0, 0][..], &[0; 32], &[1, 1, 1, 0]].concat(),
        ];
        for prefix in &fields {
            for n in [1 << 40, 1 << 63, u64::MAX] {
                let bytes = [prefix.clone(), len_prefix(n)].concat();
                assert!(
                    matches!(decode(&bytes), Err(CodecError::Corrupt(_))),
                    "{bytes:?}"
                );
            }
        }
    }

    #[test]
    fn the_decode_limit_leaves_room_for_large_checkpoints() {
        // A 64 KiB state and 1000 unacknowledged 64 KiB events (64 MiB; what
        // berth's default state and outbox limits allowed before the
        // checkpoint limit) still decode.
        let body = json!("e".repeat(64 * 1024));
        let ck = Checkpoint {
            app: vec![b'a'; 64 * 1024],
            events: (1..=1000)
                .map(|seq| StoredEvent {
                    seq,
                    due_ms: seq,
                    body: body.clone(),
                })
                .collect(),
            ..sample()
        };
        assert_eq!(decode(&encode(ck.clone())).unwrap(), ck);
    }

    /// Found by fuzz/'s `checkpoint` target: serde_json (without its
    /// `float_roundtrip` feature) writes this float as
    /// `7.777777777777777e+54` and reads that back as `7.777777777777776e54`,
    /// so a float in an event (or in kv state, stored the same way) can move
    /// by its last bit at each re-activation. Not a crash; the fix is that
    /// feature on the workspace's serde_json, outside this module.
    #[test]
    fn event_bodies_with_floats_read_back_exactly() {
        let ck = Checkpoint {
            events: vec![StoredEvent {
                seq: 1,
                due_ms: 0,
                body: json!(7.777777777777777e54),
            }],
            ..sample()
        };
        assert_eq!(decode(&encode(ck.clone())).unwrap(), ck);
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
                app, app_version: 1, version, last_op, last_reply: reply, token_hash: [1; 32], next_seq: 5, timers: Vec::new(),
                user: None, mail_inc: 0, mail_seq: 0, outgoing: Vec::new(), marks: Vec::new(),
                events: seqs.into_iter().map(|(seq, due_ms, b)| StoredEvent { seq, due_ms, body: json!(b) }).collect(),
            };
            prop_assert_eq!(decode(&encode(ck.clone())).unwrap(), ck);
        }
    }
}
