//! The peer wire format: the bodies routers send each other over peer links
//! (the links, `berth_cluster::peer`, carry them as opaque bytes).
//!
//! A body is one of the enums below in bincode 2.0.1's standard
//! configuration: [`PeerReq`] (an edge asks an owner, or a node asks a
//! member), [`PeerResp`] (its answer) and [`PeerPush`] (one-way, both
//! directions).
//!
//! # Compatibility
//! The format is internal to berth, but nodes of two releases talk to each
//! other during a rolling upgrade, and the peer handshake does not version
//! bodies: its `RingContract` (`PLACEMENT_VERSION`, `vnodes`) versions
//! placement only. A body is read by position (a variant's index, then its
//! fields in order), so reordering variants or fields, or changing a field's
//! type, makes an older node misread it. `tests::bodies_keep_their_bytes`
//! pins the bytes of every message; a change that breaks it needs a guard
//! both sides check (a version in the handshake) before it ships.

use berth_actors::session::{AttachError, Claim, Origin};
use bincode::{Decode, Encode};

/// Requests an edge sends to an owner.
#[derive(Debug, Encode, Decode)]
pub(super) enum PeerReq {
    Attach(AttachReq),
    /// `origin` names the edge connection (with its process: a node
    /// restarted under the same id counts connections from 1 again).
    Op {
        origin: Origin,
        id: u64,
        op: String,
        args: String,
    },
    Stats,
    /// Is `member` in your membership view? (The isolation rule's question:
    /// see `src/isolation.rs`.)
    Sees {
        member: String,
    },
    /// Deliver messages to an actor the receiver owns.
    Deliver(DeliverReq),
    /// A backend API question (`src/route/api.rs`), after every variant
    /// older nodes know: they cannot decode it and answer `Moved`.
    Api(ApiReq),
    /// [`PeerReq::Attach`] for a client whose `hello` carried a credential:
    /// `user` is its subject, verified by the edge (the owner's actor binds
    /// a new session to it and checks it on a resume). An anonymous attach
    /// is still sent as `Attach`, so nodes of an earlier release read it.
    AttachAs {
        req: AttachReq,
        user: String,
    },
    /// This member's dashboard sample (`src/dashboard/sample.rs`), after
    /// every variant older nodes know: they cannot decode it and answer
    /// `Moved`, which the dashboard shows as "no sample".
    Sample,
}

/// What the backend API asks a member (inside [`PeerReq::Api`]; add new
/// questions at the end).
#[derive(Debug, Encode, Decode)]
pub(super) enum ApiReq {
    /// Your live sessions bound to `user`.
    UserSessions { user: String },
    /// Is actor `actor` (an actor id) live on you, and at which version?
    Status { actor: String },
    /// End session `session` (you own it): the backend's `bye`.
    End { session: String },
}

/// A member's answer to an [`ApiReq`] (inside [`PeerResp::Api`]; add new
/// answers at the end).
#[derive(Debug, Encode, Decode)]
pub(super) enum ApiResp {
    /// The live sessions of the user asked about (session ids).
    Sessions(Vec<String>),
    /// The actor is live here.
    Live { version: u64, epoch: u64 },
    /// The actor is not live here.
    NotLive,
    /// The session was ended.
    Ended,
    /// There is no such session to end.
    Gone,
    /// Not now (not the owner, moving, store down): ask again.
    Retry(String),
}

/// A batch of messages for an actor (see `berth_actors::session::Deliver`).
#[derive(Debug, Encode, Decode)]
pub(super) struct DeliverReq {
    /// The receiver's address (`Address`'s text).
    pub to: String,
    /// The sender (`Sender` as JSON).
    pub from: String,
    pub inc: u64,
    /// Sequence number, body (JSON text), commit time (ms).
    pub msgs: Vec<(u64, String, u64)>,
}

/// Attach an edge connection to a session hosted by the receiver.
#[derive(Debug, Encode, Decode)]
pub(super) struct AttachReq {
    pub session: String,
    pub token: String,
    pub ack: u64,
    /// The client connection (`origin.conn` is the edge's connection id).
    pub origin: Origin,
    /// This attempt: pushes for it carry it, and a later attempt of the same
    /// connection wins over an earlier one that completes late.
    pub attempt: u64,
    pub create: bool,
    /// `None` for a hello; the connection's claim when it routes again.
    pub reattach: Option<Claim>,
}

/// Answers of an owner.
#[derive(Debug, Encode, Decode)]
pub(super) enum PeerResp {
    Welcome {
        json: String,
        claim: Claim,
    },
    AttachErr(Refusal),
    NotOwner,
    Reply(String),
    Moved,
    Stats {
        sessions: u64,
        proxied: u64,
    },
    Sees {
        present: bool,
    },
    /// What the receiver did with a `Deliver`: done up to `upto`; refused
    /// ones with their error (`AppError`'s code as JSON, and message); why it
    /// stopped early.
    Delivered {
        upto: u64,
        refused: Vec<(u64, String, String)>,
        stalled: Option<String>,
    },
    /// A `Deliver` that reached nobody: 0 gone, 1 unknown kind, 2 retry.
    Undelivered {
        kind: u8,
        why: String,
    },
    /// The answer to a [`PeerReq::Api`]. After every variant older nodes
    /// know.
    Api(ApiResp),
    /// The answer to a [`PeerReq::Sample`]: the sample as JSON text, so its
    /// fields can grow without touching this format. Last.
    Sample {
        json: String,
    },
}

/// One-way messages, both directions.
#[derive(Debug, Encode, Decode)]
pub(super) enum PeerPush {
    // edge -> owner: `origin` names the edge connection, as in `PeerReq::Op`.
    Ack {
        origin: Origin,
        seq: u64,
    },
    /// The edge connection ended or gave up on `attempt` (and every earlier one).
    Detach {
        origin: Origin,
        attempt: u64,
    },
    Bye {
        origin: Origin,
    },
    // owner -> edge: each names the attach attempt whose proxy sends it, so
    // a proxy of an abandoned attempt cannot reach a connection routed anew.
    Event {
        edge_conn: u64,
        attempt: u64,
        seq: u64,
        body: String,
    },
    /// `code` is a [`CloseCode`](berth_actors::protocol::CloseCode)'s
    /// number (read back with `CloseCode::from_code`).
    Close {
        edge_conn: u64,
        attempt: u64,
        code: u16,
        reason: String,
    },
    Moved {
        edge_conn: u64,
        attempt: u64,
    },
}

/// Why an owner refused an attach: an [`AttachError`] as it travels, its
/// kind and its text. Converted both ways by exhaustive matches, so a new
/// [`AttachError`] variant does not compile until it has a kind here.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub(super) struct Refusal {
    kind: RefusalKind,
    /// The error's text (what `Unavailable` and `Corrupt` carry back).
    message: String,
}

/// [`AttachError`]'s variants on the wire, by position: `BadToken` is 1 and
/// `Superseded` 7, the numbers the first release wrote by hand; 0 is never
/// sent. Add new kinds at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
enum RefusalKind {
    /// Never sent; read as `Unavailable`.
    Unspecified,
    BadToken,
    NotFound,
    Unavailable,
    Moved,
    ShuttingDown,
    Corrupt,
    Superseded,
}

impl From<&AttachError> for Refusal {
    fn from(e: &AttachError) -> Refusal {
        let kind = match e {
            AttachError::BadToken => RefusalKind::BadToken,
            AttachError::NotFound => RefusalKind::NotFound,
            AttachError::Unavailable(_) => RefusalKind::Unavailable,
            AttachError::Moved => RefusalKind::Moved,
            AttachError::ShuttingDown => RefusalKind::ShuttingDown,
            AttachError::Corrupt(_) => RefusalKind::Corrupt,
            AttachError::Superseded => RefusalKind::Superseded,
        };
        // The text the variant carries, not its display (which prefixes it):
        // the receiving side rebuilds the variant around it.
        let message = match e {
            AttachError::Unavailable(m) | AttachError::Corrupt(m) => m.clone(),
            other => other.to_string(),
        };
        Refusal { kind, message }
    }
}

impl From<Refusal> for AttachError {
    fn from(r: Refusal) -> AttachError {
        match r.kind {
            RefusalKind::BadToken => AttachError::BadToken,
            RefusalKind::NotFound => AttachError::NotFound,
            RefusalKind::Unspecified | RefusalKind::Unavailable => {
                AttachError::Unavailable(r.message)
            }
            RefusalKind::Moved => AttachError::Moved,
            RefusalKind::ShuttingDown => AttachError::ShuttingDown,
            RefusalKind::Corrupt => AttachError::Corrupt(r.message),
            RefusalKind::Superseded => AttachError::Superseded,
        }
    }
}

/// A body's bytes.
pub(super) fn enc<T: Encode>(v: &T) -> Vec<u8> {
    bincode::encode_to_vec(v, bincode::config::standard()).unwrap_or_default()
}

/// The most a peer message body may claim while decoding: a body is at most
/// one peer frame, so a length prefix past that is a lie that must not make
/// bincode allocate it (fuzz/ found this in the link's own frames).
const BODY_DECODE_LIMIT: usize = berth_cluster::peer::MAX_FRAME + 64;

/// A body read back; `None` if it is not one.
pub(super) fn dec<T: Decode<()>>(b: &[u8]) -> Option<T> {
    let cfg = bincode::config::standard().with_limit::<BODY_DECODE_LIMIT>();
    bincode::decode_from_slice(b, cfg).ok().map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_actors::protocol::CloseCode;

    #[test]
    fn a_peer_body_claiming_huge_lengths_is_refused_without_allocating_them() {
        // PeerReq::Attach (variant 0), then its `session` string claiming
        // 2^40 bytes: without the limit bincode tries to allocate that and
        // the process aborts.
        let mut body = vec![0u8, 253];
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(dec::<PeerReq>(&body).is_none());
        let mut push = vec![3u8, 0, 0, 253]; // PeerPush::Event, conn 0, attempt 0, seq
        push.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(dec::<PeerPush>(&push).is_none());
        // A real body still decodes.
        let ok = enc(&PeerReq::Stats);
        assert!(matches!(dec::<PeerReq>(&ok), Some(PeerReq::Stats)));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn every_attach_error() -> [AttachError; 7] {
        [
            AttachError::BadToken,
            AttachError::NotFound,
            AttachError::Unavailable("u".into()),
            AttachError::Moved,
            AttachError::ShuttingDown,
            AttachError::Corrupt("c".into()),
            AttachError::Superseded,
        ]
    }

    /// The bytes of every message, as the release before `Refusal` (with
    /// hand-numbered `kind: u8` refusals) wrote them: nodes of both talk.
    #[test]
    fn bodies_keep_their_bytes() {
        let origin = Origin {
            edge: 0x0102030405060708,
            conn: 300,
        };
        let claim = Claim { epoch: 9, seq: 2 };
        let bodies = [
            (
                enc(&PeerReq::Attach(AttachReq {
                    session: "s1".into(),
                    token: "t".into(),
                    ack: 5,
                    origin,
                    attempt: 7,
                    create: true,
                    reattach: Some(claim),
                })),
                "00027331017405fd0807060504030201fb2c010701010902",
            ),
            (
                enc(&PeerReq::Op {
                    origin,
                    id: 3,
                    op: "incr".into(),
                    args: "{}".into(),
                }),
                "01fd0807060504030201fb2c010304696e6372027b7d",
            ),
            (enc(&PeerReq::Stats), "02"),
            (
                enc(&PeerReq::Sees {
                    member: "n2".into(),
                }),
                "03026e32",
            ),
            // Variant 6 (after `Api`): the `Attach` body, then the user.
            (
                enc(&PeerReq::AttachAs {
                    req: AttachReq {
                        session: "s1".into(),
                        token: "t".into(),
                        ack: 5,
                        origin,
                        attempt: 7,
                        create: true,
                        reattach: Some(claim),
                    },
                    user: "al".into(),
                }),
                "06027331017405fd0807060504030201fb2c01070101090202616c",
            ),
            (
                enc(&PeerResp::Welcome {
                    json: "{}".into(),
                    claim,
                }),
                "00027b7d0902",
            ),
            (enc(&PeerResp::NotOwner), "02"),
            (enc(&PeerResp::Reply("r".into())), "030172"),
            (enc(&PeerResp::Moved), "04"),
            (
                enc(&PeerResp::Stats {
                    sessions: 1000,
                    proxied: 2,
                }),
                "05fbe80302",
            ),
            (enc(&PeerResp::Sees { present: true }), "0601"),
            (
                enc(&PeerPush::Ack { origin, seq: 4 }),
                "00fd0807060504030201fb2c0104",
            ),
            (
                enc(&PeerPush::Detach { origin, attempt: 7 }),
                "01fd0807060504030201fb2c0107",
            ),
            (enc(&PeerPush::Bye { origin }), "02fd0807060504030201fb2c01"),
            (
                enc(&PeerPush::Event {
                    edge_conn: 300,
                    attempt: 7,
                    seq: 4,
                    body: "{}".into(),
                }),
                "03fb2c010704027b7d",
            ),
            (
                enc(&PeerPush::Moved {
                    edge_conn: 300,
                    attempt: 7,
                }),
                "05fb2c0107",
            ),
        ];
        for (bytes, want) in bodies {
            assert_eq!(hex(&bytes), want);
        }
        // The backend API's bodies (appended: PeerReq 5, PeerResp 9).
        let api = [
            (
                enc(&PeerReq::Api(ApiReq::UserSessions { user: "u".into() })),
                "05000175",
            ),
            (
                enc(&PeerReq::Api(ApiReq::Status { actor: "a".into() })),
                "05010161",
            ),
            (
                enc(&PeerReq::Api(ApiReq::End {
                    session: "s".into(),
                })),
                "05020173",
            ),
            (
                enc(&PeerResp::Api(ApiResp::Sessions(vec!["s".into()]))),
                "0900010173",
            ),
            (
                enc(&PeerResp::Api(ApiResp::Live {
                    version: 3,
                    epoch: 2,
                })),
                "09010302",
            ),
            (enc(&PeerResp::Api(ApiResp::NotLive)), "0902"),
            (enc(&PeerResp::Api(ApiResp::Ended)), "0903"),
            (enc(&PeerResp::Api(ApiResp::Gone)), "0904"),
            (enc(&PeerResp::Api(ApiResp::Retry("r".into()))), "09050172"),
        ];
        for (bytes, want) in api {
            assert_eq!(hex(&bytes), want);
        }
        // The dashboard's sample (appended: PeerReq 7, PeerResp 10).
        assert_eq!(hex(&enc(&PeerReq::Sample)), "07");
        assert_eq!(
            hex(&enc(&PeerResp::Sample { json: "{}".into() })),
            "0a027b7d"
        );
        // AttachErr: variant 1, the kind's byte (1..=7), the message.
        let refusals = [
            "01012c74686520726573756d6520746f6b656e20646f6573206e6f74206d6174636820746869732073657373696f6e",
            "01021a73657373696f6e20756e6b6e6f776e206f722065787069726564",
            "01030175",
            "0104117468652073657373696f6e206d6f766564",
            "010519746865206e6f6465206973207368757474696e6720646f776e",
            // Corrupt carries its inner text (before 0.3 its display, with
            // the prefix "stored session is unreadable: "; both read back).
            "01060163",
            "01072961206e6577657220636f6e6e656374696f6e20746f6f6b20746869732073657373696f6e206f766572",
        ];
        for (e, want) in every_attach_error().iter().zip(refusals) {
            assert_eq!(hex(&enc(&PeerResp::AttachErr(e.into()))), want, "{e:?}");
        }
        // Close: variant 4, conn 300, attempt 7, the code's number, reason "r".
        let closes = [
            "04fb2c0107fbe8030172",
            "04fb2c0107fbe9030172",
            "04fb2c0107fbf0030172",
            "04fb2c0107fbf1030172",
            "04fb2c0107fbf3030172",
            "04fb2c0107fbf4030172",
            "04fb2c0107fbf5030172",
            "04fb2c0107fba00f0172",
            "04fb2c0107fba40f0172",
        ];
        for (c, want) in CloseCode::ALL.into_iter().zip(closes) {
            let push = PeerPush::Close {
                edge_conn: 300,
                attempt: 7,
                code: c.code(),
                reason: "r".into(),
            };
            assert_eq!(hex(&enc(&push)), want, "{c:?}");
        }
    }

    #[test]
    fn every_attach_error_crosses_the_wire_as_itself() {
        for e in every_attach_error() {
            let back = match dec::<PeerResp>(&enc(&PeerResp::AttachErr((&e).into()))) {
                Some(PeerResp::AttachErr(r)) => AttachError::from(r),
                other => panic!("{other:?}"),
            };
            // Corrupt's text crosses once (a release before this one sent
            // its display, so its prefix showed twice at a remote edge).
            assert_eq!(back, e);
        }
        // Kind 0 (never sent) and the text it came with: unavailable.
        assert_eq!(
            dec::<PeerResp>(&[1, 0, 1, b'x']).map(|r| match r {
                PeerResp::AttachErr(r) => AttachError::from(r),
                other => panic!("{other:?}"),
            }),
            Some(AttachError::Unavailable("x".into()))
        );
    }
}
