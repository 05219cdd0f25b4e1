//! Helpers shared by the fuzz targets.

use serde_json::Value;

/// Whether `a` and `b` are the same JSON, except that two floats may differ
/// in their last bit.
///
/// Why the slack: without serde_json's `float_roundtrip` feature (berth does
/// not enable it), parsing the text that serde_json wrote for a float can
/// give its neighbour: `7.777777777777777e54` is written as
/// `7.777777777777777e+54`, which reads back as `7.777777777777776e54`. The
/// checkpoint target found it; see README.md here. Anything more than that
/// last bit is still a failure.
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || ulps(x, y) <= 1,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// How many representable floats apart `x` and `y` are (same sign only).
fn ulps(x: f64, y: f64) -> u64 {
    if x.is_sign_negative() != y.is_sign_negative() {
        return u64::MAX;
    }
    x.to_bits().abs_diff(y.to_bits())
}

/// Whether `a` and `b` are the same JSON text (as [`same_json`]); bytes that
/// are not JSON must be equal.
pub fn same_json_bytes(a: &[u8], b: &[u8]) -> bool {
    match (
        serde_json::from_slice::<Value>(a),
        serde_json::from_slice::<Value>(b),
    ) {
        (Ok(x), Ok(y)) => same_json(&x, &y),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_cluster::peer::{fuzzing, Frame};
    use serde_json::json;

    #[test]
    fn the_seed_openings_pass_the_handshake() {
        let push = fuzzing::frame_bytes(&Frame::Push { body: vec![1] });
        let bytes = [fuzzing::valid_dialer_opening("a"), push.clone()].concat();
        let (peer, out) = fuzzing::accept(&bytes).unwrap();
        assert_eq!((peer.as_str(), out.frames.len()), ("a", 1));
        assert!(out.error.is_none());
        let bytes = [fuzzing::valid_listener_opening("b"), push].concat();
        let (peer, out) = fuzzing::dial(&bytes).unwrap();
        assert_eq!((peer.as_str(), out.frames.len()), ("b", 1));
        // A wrong proof is refused, and so is a dialer's opening sent to a dialer.
        let mut bad = fuzzing::valid_dialer_opening("a");
        *bad.last_mut().unwrap() ^= 1;
        assert!(fuzzing::accept(&bad).is_err());
        assert!(fuzzing::dial(&fuzzing::valid_dialer_opening("a")).is_err());
    }

    #[test]
    fn floats_may_differ_in_their_last_bit_only() {
        let x = 7.777777777777777e54_f64;
        let next = f64::from_bits(x.to_bits() - 1);
        let far = f64::from_bits(x.to_bits() - 2);
        assert!(same_json(&json!([x]), &json!([next])));
        assert!(!same_json(&json!([x]), &json!([far])));
        assert!(!same_json(&json!(1), &json!(1.0)));
        assert!(same_json(&json!({"a": [1, "x"]}), &json!({"a": [1, "x"]})));
        assert!(!same_json(&json!({"a": 1}), &json!({"b": 1})));
    }
}
