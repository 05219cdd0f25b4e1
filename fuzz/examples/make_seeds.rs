//! Writes the seed inputs of the fuzz targets into `fuzz/seeds/<target>/`:
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`.
//! The fuzzers find the formats by themselves; seeds only give them a head
//! start past the handshake's MACs and into valid checkpoints.

use std::path::Path;

use berth_actors::codec::{self, Checkpoint, StoredEvent};
use berth_cluster::peer::{fuzzing, Frame};
use serde_json::json;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&dir).expect("create the seed folder");
    std::fs::write(dir.join(name), bytes).expect("write a seed");
}

fn main() {
    // Client frames: docs/protocol.md's examples, and a few more shapes.
    let client = [
        ("hello-new", r#"{"type":"hello","session":null}"#),
        ("hello-bare", r#"{"type":"hello"}"#),
        (
            "hello-resume",
            r#"{"type":"hello","session":"q3Jx0b2mQ1yA8sT4uV6wXg","token":"Zx9_-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789ab","ack":12}"#,
        ),
        (
            "op-incr",
            r#"{"type":"op","id":1,"op":"incr","args":{"key":"n"}}"#,
        ),
        (
            "op-emit",
            r#"{"type":"op","id":2,"op":"emit","args":{"body":"hi","delay_ms":500}}"#,
        ),
        (
            "op-set",
            r#"{"type":"op","id":3,"op":"set","args":{"key":"k\u00e9","value":[1,-2.5e3,true,null,{"a":"\ud83d\ude00"}]}}"#,
        ),
        (
            "op-no-args",
            r#"{"type":"op","id":18446744073709551615,"op":"state"}"#,
        ),
        ("ack", r#"{"type":"ack","seq":1}"#),
        ("bye", r#"{"type":"bye"}"#),
        ("not-a-message", r#"{"type":"nope","id":-1}"#),
    ];
    for (name, text) in client {
        write("client_frame", name, text.as_bytes());
    }

    // Peer links: frames on an established link, and whole connections that
    // pass the handshake (fuzzing::SECRET and the fixed nonces).
    let frames = [
        Frame::Request {
            id: 1,
            body: b"attach".to_vec(),
        },
        Frame::Response {
            id: 300,
            body: vec![0, 1, 2, 250, 251, 255],
        },
        Frame::Push {
            body: b"handoff".to_vec(),
        },
    ];
    // The first byte picks the path (see fuzz_targets/peer_frame.rs).
    let (link, accept, dial) = (0u8, 1u8, 2u8);
    let mut frames_bytes = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let one = fuzzing::frame_bytes(f);
        write(
            "peer_frame",
            &format!("frame-{i}"),
            &[&[link][..], &one].concat(),
        );
        frames_bytes.extend(one);
    }
    write(
        "peer_frame",
        "frames",
        &[&[link][..], &frames_bytes].concat(),
    );
    let opening = fuzzing::valid_dialer_opening("node-a:7070");
    write(
        "peer_frame",
        "accept",
        &[&[accept][..], &opening, &frames_bytes].concat(),
    );
    let opening = fuzzing::valid_listener_opening("node-b:7070");
    write(
        "peer_frame",
        "dial",
        &[&[dial][..], &opening, &frames_bytes].concat(),
    );

    // Checkpoints of kv sessions.
    let empty = Checkpoint {
        app_version: 1,
        timers: vec![],
        app: b"{}".to_vec(),
        version: 0,
        last_op: 0,
        last_reply: None,
        token_hash: [0; 32],
        next_seq: 1,
        events: vec![],
    };
    write("checkpoint", "empty", &codec::encode(empty.clone()));
    // Format 2: a newer application schema and timers.
    let timed = Checkpoint {
        app_version: 2,
        timers: vec![("remind".into(), 1_700_000_000_000), ("x".into(), 0)],
        ..empty
    };
    write("checkpoint", "timers", &codec::encode(timed));
    let busy = Checkpoint {
        app_version: 1,
        timers: vec![],
        app: serde_json::to_vec(&json!({"n": 3, "s": "x", "l": [1, 2], "o": {"a": null}}))
            .expect("json"),
        version: 7,
        last_op: 9,
        last_reply: Some(
            serde_json::to_vec(&json!({"id":9,"ok":true,"value":3,"version":7})).expect("json"),
        ),
        token_hash: [7; 32],
        next_seq: 4,
        events: vec![
            StoredEvent {
                seq: 2,
                due_ms: 1_000,
                body: json!("hi"),
            },
            StoredEvent {
                seq: 3,
                due_ms: 2_000,
                body: json!({"k": [1.5, -2]}),
            },
        ],
    };
    write("checkpoint", "busy", &codec::encode(busy));
    let failed = Checkpoint {
        app_version: 1,
        timers: vec![],
        app: b"{\"a\":1}".to_vec(),
        version: 1,
        last_op: 2,
        last_reply: Some(
            serde_json::to_vec(&json!({"id":2,"ok":false,"version":1,
                "error":{"code":"type_mismatch","message":"m"}}))
            .expect("json"),
        ),
        token_hash: [9; 32],
        next_seq: 1,
        events: vec![],
    };
    write("checkpoint", "failed-reply", &codec::encode(failed));
}
