//! The `Idempotency-Key` header: what a backend may use as a key.
//!
//! A key names the backend's intent: the receiver records `api:<key>` in
//! its table of senders' watermarks, in the same checkpoint as the
//! handler's effects, so the same key to the same receiver is applied once
//! (docs/applications.md, "Sending from a backend", has the window).

use actix_web::HttpRequest;

use super::error::ApiError;

/// The header.
pub const HEADER: &str = "Idempotency-Key";
/// Longest key, in bytes (each costs a row in the receiver's checkpoint).
pub const MAX_KEY_BYTES: usize = 128;

/// Whether `key` may be an idempotency key: 1 to [`MAX_KEY_BYTES`] bytes of
/// `[A-Za-z0-9._:@+=~-]` (a UUID, a ULID, `order-123:shipped`).
pub fn valid(key: &str) -> bool {
    (1..=MAX_KEY_BYTES).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@+=~-".contains(&b))
}

/// The request's key, checked.
pub fn of(req: &HttpRequest) -> Result<String, ApiError> {
    let v = req
        .headers()
        .get(HEADER)
        .ok_or_else(|| ApiError::BadIdempotencyKey(format!("the {HEADER} header is required")))?;
    match v.to_str() {
        Ok(k) if valid(k) => Ok(k.to_owned()),
        _ => Err(ApiError::BadIdempotencyKey(format!(
            "an {HEADER} is 1 to {MAX_KEY_BYTES} bytes of [A-Za-z0-9._:@+=~-]"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_in_length_and_charset() {
        assert!(valid("7b0f6c1e-3a52-4c59-9d2e-0c8b9e1f2a3b"));
        assert!(valid("order-123:shipped"));
        assert!(!valid(""));
        assert!(!valid("has space"));
        assert!(!valid("slash/y"));
        assert!(!valid("ü"));
        assert!(valid(&"k".repeat(MAX_KEY_BYTES)));
        assert!(!valid(&"k".repeat(MAX_KEY_BYTES + 1)));
    }
}
