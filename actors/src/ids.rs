//! Session ids and resume tokens.
//!
//! A session id is 128 random bits, a token 256 random bits, both written as
//! unpadded URL-safe base64 so they travel in query strings untouched. Only a
//! SHA-256 hash of the token is ever stored, and presented tokens are compared
//! against it in constant time.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Bytes of randomness in a session id (128 bits).
pub const SESSION_ID_BYTES: usize = 16;
/// Bytes of randomness in a resume token (256 bits).
pub const TOKEN_BYTES: usize = 32;

/// A validated session id: 22 characters of URL-safe base64 (128 bits).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut b = [0u8; SESSION_ID_BYTES];
        rand::rng().fill_bytes(&mut b);
        SessionId(URL_SAFE_NO_PAD.encode(b))
    }

    /// Parses a client-supplied id; `None` when it cannot be an id berth issued.
    pub fn parse(s: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
        // Reject non-canonical encodings so one session has exactly one spelling.
        (bytes.len() == SESSION_ID_BYTES && URL_SAFE_NO_PAD.encode(&bytes) == s)
            .then(|| SessionId(s.to_owned()))
    }

    /// An actor id already checked by its maker ([`crate::address::Address`]).
    pub(crate) fn from_checked(s: String) -> Self {
        SessionId(s)
    }

    /// Parses a stored actor id: a session id or an entity's `kind/key`
    /// (what the store's timer index holds). Clients' ids go through
    /// [`SessionId::parse`], which refuses entity ids.
    pub fn parse_actor(s: &str) -> Option<Self> {
        Self::parse(s).or_else(|| {
            s.parse::<crate::address::Address>()
                .ok()
                .map(|a| a.actor_id())
        })
    }

    /// Whether this id names an entity (`kind/key`), not a session.
    pub fn is_entity(&self) -> bool {
        self.0.contains('/')
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SessionId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

/// A fresh resume token and the hash that is stored in its place.
pub fn new_token() -> (String, TokenHash) {
    let mut b = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut b);
    let token = URL_SAFE_NO_PAD.encode(b);
    let hash = TokenHash::of(&token);
    (token, hash)
}

/// SHA-256 of a resume token. Tokens are long random strings, so a plain hash
/// (no salt, no stretching) is enough: there is nothing to brute-force.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Hashes a presented token.
    pub fn of(token: &str) -> Self {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `token` is the token this hash was made from, in constant time.
    pub fn verify(&self, token: &str) -> bool {
        let presented = Self::of(token);
        bool::from(self.0.ct_eq(&presented.0))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = SessionId::random();
        assert_eq!(id.as_str().len(), 22);
        assert_eq!(SessionId::parse(id.as_str()), Some(id.clone()));
        assert_ne!(SessionId::random(), id);
        assert_eq!(SessionId::parse(""), None);
        assert_eq!(SessionId::parse("not an id"), None);
        assert_eq!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAAAAA"), None); // 18 bytes
        assert_eq!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAAB"), None); // non-canonical tail
    }

    #[test]
    fn tokens_verify_only_themselves() {
        let (t, h) = new_token();
        assert!(t.len() >= 43);
        assert!(h.verify(&t));
        assert!(!h.verify(""));
        assert!(!h.verify(&format!("{t}x")));
        let (t2, _) = new_token();
        assert!(!h.verify(&t2));
    }
}
