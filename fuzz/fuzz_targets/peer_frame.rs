//! The peer link: bytes from another node's TCP connection, through the
//! link's framing (length prefix, `MAX_FRAME`), bincode with the peer
//! module's configuration, and both sides of the handshake (with a fixed test
//! secret and nonces, see `berth_cluster::peer::fuzzing`).
//!
//! The first byte picks what the rest is (one path per input: the link's
//! codec reserves up to 16 MiB for a frame header, so running all three on
//! every input made it three times slower):
//! 0: frames on an established link; 1: an inbound connection (the dialer's
//! `Hello`, `Proof`, frames); 2: the answer to our dial (the listener's
//! `Challenge`, frames). Other values are taken modulo 3.
//!
//! Not reached: the bodies of requests and pushes, which the router decodes
//! in `src/route/wire.rs` (private to the `berth` crate).
#![no_main]

use berth_cluster::peer::fuzzing;
use libfuzzer_sys::fuzz_target;

/// Every frame that decoded goes back on the wire and reads the same.
fn round_trip(out: &fuzzing::Outcome) {
    for f in &out.frames {
        let again = fuzzing::link(&fuzzing::frame_bytes(f));
        assert!(again.error.is_none(), "{f:?}: {:?}", again.error);
        assert_eq!(again.frames.as_slice(), std::slice::from_ref(f));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => round_trip(&fuzzing::link(bytes)),
        1 => {
            if let Ok((_, out)) = fuzzing::accept(bytes) {
                round_trip(&out);
            }
        }
        _ => {
            if let Ok((_, out)) = fuzzing::dial(bytes) {
                round_trip(&out);
            }
        }
    }
});
