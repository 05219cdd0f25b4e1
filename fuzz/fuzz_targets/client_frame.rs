//! The client frame decoder: what the edge (`src/edge.rs`, `on_text`) does
//! with a WebSocket text frame from a client, then a round trip of what
//! decoded.
#![no_main]

use berth_actors::ids::{SessionId, TokenHash};
use berth_actors::protocol::ClientMsg;
use berth_fuzz::same_json;
use libfuzzer_sys::fuzz_target;

/// `server.max_frame_bytes`' default: a larger frame is refused (1009) by the
/// WebSocket codec before it is parsed.
const MAX_FRAME_BYTES: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_FRAME_BYTES {
        return;
    }
    // A text frame that is not UTF-8 never reaches `on_text`: actix-ws
    // refuses it as a protocol error (the connection closes), and a binary
    // frame is answered `bad_frame` without being parsed. So only UTF-8 text
    // is parsed, as `&str`.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(msg) = serde_json::from_str::<ClientMsg>(text) else {
        return; // answered `bad_frame`
    };
    if let ClientMsg::Hello {
        session: Some(s),
        token,
        ..
    } = &msg
    {
        // What `hello` does with a resume's credentials.
        if let Some(id) = SessionId::parse(s) {
            assert_eq!(id.as_str(), s);
            assert_eq!(SessionId::parse(id.as_str()), Some(id));
        }
        if let Some(t) = token {
            assert!(TokenHash::of(t).verify(t));
        }
    }
    // What decoded serialises, and reads back as the same message (floats to
    // their last bit, see `same_json`).
    let json = serde_json::to_string(&msg).expect("a decoded client frame serialises");
    let back: ClientMsg =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} does not decode again: {e}"));
    match (&back, &msg) {
        (
            ClientMsg::Op { id, op, args },
            ClientMsg::Op {
                id: id0,
                op: op0,
                args: args0,
            },
        ) => assert!(
            id == id0 && op == op0 && same_json(args, args0),
            "round trip through {json}: {back:?} != {msg:?}"
        ),
        _ => assert_eq!(back, msg, "round trip through {json}"),
    }
});
