//! The client wire protocol, version 1 (`../shared/protocol.md`), as Rust types.
//!
//! These types are the contract with mobile clients: fields may be added, never
//! renamed or removed. Every error that reaches a client is named by an
//! [`ErrorCode`], and every way a connection ends by a [`CloseCode`]; mapping
//! internal failures to them happens here and nowhere else.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A frame sent by a client. One JSON object per WebSocket text frame, tagged by
/// `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Must be the first frame: create (`session: null`) or resume a session.
    Hello {
        /// Session to resume, or `None` to create one.
        #[serde(default)]
        session: Option<String>,
        /// Resume token from `welcome`.
        #[serde(default)]
        token: Option<String>,
        /// Highest event `seq` the client has received.
        #[serde(default)]
        ack: u64,
        /// A JWT naming the user (an addition to protocol v1): a new session
        /// is bound to its subject, a resume must present the same subject.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential: Option<String>,
    },
    /// Run an operation on the session.
    Op {
        /// Client-chosen id, increasing per session.
        id: u64,
        /// Operation name.
        op: String,
        /// Operation arguments.
        #[serde(default)]
        args: Value,
    },
    /// The client has received events up to `seq`.
    Ack {
        /// Highest event sequence number received.
        seq: u64,
    },
    /// End the session: its state is deleted.
    Bye,
    /// Is the connection alive? Answered at once with `pong` (an addition
    /// to protocol v1): browsers cannot send WebSocket ping frames, and a
    /// client waiting for an answer must notice a dead connection in seconds.
    Ping {
        /// Echoed in the `pong`, when given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

/// A frame sent by the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Answer to `hello`.
    Welcome(Welcome),
    /// Answer to `op`.
    Result(OpReply),
    /// A server-initiated message.
    Event(Event),
    /// A problem with a frame that is not an op.
    Error(ErrorBody),
    /// The answer to a client's `ping` (an addition to protocol v1).
    Pong {
        /// The ping's `id`, when it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

/// The `welcome` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Session id.
    pub session: String,
    /// Resume token (the same one the client presented, or a new one for a new session).
    pub token: String,
    /// Whether an existing session was resumed.
    pub resumed: bool,
    /// State version.
    pub version: u64,
    /// Highest op id applied.
    pub last_op: u64,
    /// Id of the node that answered.
    pub node: String,
}

/// The `result` frame: the answer to one op.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpReply {
    /// The op's id.
    pub id: u64,
    /// Whether the op succeeded.
    pub ok: bool,
    /// The op's value, when `ok` (a present `null` stays `Some(Null)`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub value: Option<Value>,
    /// The session's state version after the op.
    pub version: u64,
    /// Why the op failed, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Set on the answer to a retried op id that had already been applied
    /// (an addition to protocol v1: clients may ignore it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl OpReply {
    /// A successful result.
    pub fn ok(id: u64, value: Value, version: u64) -> Self {
        OpReply {
            id,
            ok: true,
            value: Some(value),
            version,
            error: None,
            duplicate: false,
        }
    }

    /// The answer to a retried op id whose own answer is not kept: applied
    /// before, nothing to repeat.
    pub fn duplicate(id: u64, version: u64) -> Self {
        OpReply {
            id,
            ok: true,
            value: None,
            version,
            error: None,
            duplicate: true,
        }
    }

    /// A failed result.
    pub fn err(id: u64, code: ErrorCode, message: impl Into<String>, version: u64) -> Self {
        OpReply {
            id,
            ok: false,
            value: None,
            version,
            error: Some(ErrorBody::new(code, message)),
            duplicate: false,
        }
    }
}

/// The `event` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number, increasing per session, starting at 1.
    pub seq: u64,
    /// Application payload.
    pub body: Value,
}

/// `{code, message}`, used by `error` frames and failed `result`s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

/// Every error code of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A frame that is not valid JSON or not a known message (the connection stays usable).
    BadFrame,
    /// A frame other than `hello` arrived before `hello`.
    HelloRequired,
    /// The resume token does not match (followed by close 1008).
    BadToken,
    /// The `Origin` header is not on the allow-list (followed by close 1008).
    BadOrigin,
    /// The session is unknown or expired (followed by close 4004).
    SessionNotFound,
    /// The op name is not known to the application.
    UnknownOp,
    /// The op's arguments are missing or of the wrong shape.
    BadArgs,
    /// The value at the key is not of the type the op needs.
    TypeMismatch,
    /// The session's state would exceed its configured limit.
    TooLarge,
    /// Too many frames, or too many unacknowledged events: retry later with the same id.
    RateLimited,
    /// The op was NOT applied (owner or store unreachable): retry with the same id.
    Unavailable,
    /// An unexpected server-side failure.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::BadOrigin => "bad_origin",
            ErrorCode::SessionNotFound => "session_not_found",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::BadArgs => "bad_args",
            ErrorCode::TypeMismatch => "type_mismatch",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether an op that failed with this code was applied (and its id consumed).
    ///
    /// `unavailable` and `rate_limited` mean "not applied, retry with the same id";
    /// every other failure is a deterministic answer of the application, recorded
    /// like a success so that a retry gets the same answer.
    pub fn consumes_op_id(self) -> bool {
        !matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal
        )
    }
}

/// WebSocket close codes and what they mean to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: after `bye`.
    Normal,
    /// 1001: the node is going away; reconnect with backoff and resume.
    GoingAway,
    /// 1008: bad token or origin; do not retry with the same credentials.
    Policy,
    /// 1009: frame too large.
    TooBig,
    /// 1011: internal error; reconnect with backoff and resume.
    Internal,
    /// 1012: node draining or session moved; reconnect now and resume.
    Restart,
    /// 1013: overloaded (or the client reads too slowly); reconnect later.
    TryAgainLater,
    /// 4000: a newer connection took this session over; do not reconnect.
    TakenOver,
    /// 4004: session unknown or expired; start a new session.
    SessionNotFound,
}

impl CloseCode {
    /// Every close code, in declaration order.
    pub const ALL: [CloseCode; 9] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::Policy,
        CloseCode::TooBig,
        CloseCode::Internal,
        CloseCode::Restart,
        CloseCode::TryAgainLater,
        CloseCode::TakenOver,
        CloseCode::SessionNotFound,
    ];

    /// The numeric code sent in the close frame.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::Restart => 1012,
            CloseCode::TryAgainLater => 1013,
            CloseCode::TakenOver => 4000,
            CloseCode::SessionNotFound => 4004,
        }
    }

    /// The close code numbered `code` (the inverse of [`CloseCode::code`]);
    /// `None` for a number berth does not send.
    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_close_code_is_listed_once_and_read_back_from_its_number() {
        // Exhaustive: a new variant fails to compile here until it has a
        // place in ALL (the position this match gives it).
        let position = |c: CloseCode| match c {
            CloseCode::Normal => 0,
            CloseCode::GoingAway => 1,
            CloseCode::Policy => 2,
            CloseCode::TooBig => 3,
            CloseCode::Internal => 4,
            CloseCode::Restart => 5,
            CloseCode::TryAgainLater => 6,
            CloseCode::TakenOver => 7,
            CloseCode::SessionNotFound => 8,
        };
        for (i, c) in CloseCode::ALL.into_iter().enumerate() {
            assert_eq!(position(c), i);
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
        }
        assert_eq!(CloseCode::from_code(1002), None);
        assert_eq!(CloseCode::from_code(0), None);
    }

    #[test]
    fn hello_defaults_and_nulls() {
        let m: ClientMsg = serde_json::from_str(r#"{"type":"hello","session":null}"#).unwrap();
        assert_eq!(
            m,
            ClientMsg::Hello {
                session: None,
                token: None,
                ack: 0,
                credential: None,
            }
        );
        let m: ClientMsg =
            serde_json::from_str(r#"{"type":"hello","session":null,"credential":"a.b.c"}"#)
                .unwrap();
        assert!(matches!(m, ClientMsg::Hello { credential: Some(c), .. } if c == "a.b.c"));
        let m: ClientMsg = serde_json::from_str(r#"{"type":"hello"}"#).unwrap();
        assert!(matches!(m, ClientMsg::Hello { session: None, .. }));
    }

    #[test]
    fn ping_with_or_without_an_id_and_its_pong() {
        let m: ClientMsg = serde_json::from_str(r#"{"type":"ping"}"#).unwrap();
        assert_eq!(m, ClientMsg::Ping { id: None });
        let m: ClientMsg = serde_json::from_str(r#"{"type":"ping","id":7}"#).unwrap();
        assert_eq!(m, ClientMsg::Ping { id: Some(7) });
        assert_eq!(
            serde_json::to_value(ServerMsg::Pong { id: Some(7) }).unwrap(),
            json!({"type":"pong","id":7})
        );
        assert_eq!(
            serde_json::to_value(ServerMsg::Pong { id: None }).unwrap(),
            json!({"type":"pong"})
        );
    }

    #[test]
    fn op_without_args_is_null_args() {
        let m: ClientMsg = serde_json::from_str(r#"{"type":"op","id":3,"op":"state"}"#).unwrap();
        assert_eq!(
            m,
            ClientMsg::Op {
                id: 3,
                op: "state".into(),
                args: Value::Null
            }
        );
    }

    #[test]
    fn bye_and_unknown_type() {
        assert_eq!(
            serde_json::from_str::<ClientMsg>(r#"{"type":"bye"}"#).unwrap(),
            ClientMsg::Bye
        );
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"op","id":-1,"op":"x"}"#).is_err());
    }

    #[test]
    fn server_frames_match_the_contract() {
        let r = ServerMsg::Result(OpReply::ok(7, json!(3), 2));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"type":"result","id":7,"ok":true,"value":3,"version":2})
        );
        let r = ServerMsg::Result(OpReply::err(8, ErrorCode::TypeMismatch, "x", 2));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"type":"result","id":8,"ok":false,"version":2,
                   "error":{"code":"type_mismatch","message":"x"}})
        );
        let e = ServerMsg::Event(Event {
            seq: 1,
            body: json!({"a":1}),
        });
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type":"event","seq":1,"body":{"a":1}})
        );
        let e = ServerMsg::Error(ErrorBody::new(ErrorCode::HelloRequired, "m"));
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type":"error","code":"hello_required","message":"m"})
        );
    }

    #[test]
    fn error_codes_serialize_as_documented() {
        for code in [
            ErrorCode::BadFrame,
            ErrorCode::HelloRequired,
            ErrorCode::BadToken,
            ErrorCode::BadOrigin,
            ErrorCode::SessionNotFound,
            ErrorCode::UnknownOp,
            ErrorCode::BadArgs,
            ErrorCode::TypeMismatch,
            ErrorCode::TooLarge,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                Value::String(code.as_str().into())
            );
        }
    }
}
