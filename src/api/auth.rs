//! Bearer keys: who may call the backend API.
//!
//! Keys are kept as SHA-256 digests and a presented key is hashed, then
//! compared with every accepted digest in constant time (`subtle`), all of
//! them every time: neither the key's length nor which key it resembles
//! shows in the timing. The set is replaced on SIGHUP (rotation).

use std::sync::{Arc, RwLock};

use actix_web::dev::Payload;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{web, FromRequest, HttpRequest};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::error::ApiError;
use super::ApiState;

/// The accepted keys, as digests.
#[derive(Debug, Default)]
pub struct Keys {
    digests: RwLock<Arc<Vec<[u8; 32]>>>,
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl Keys {
    /// A set accepting `keys`.
    pub fn new(keys: &[String]) -> Keys {
        let k = Keys::default();
        k.replace(keys);
        k
    }

    /// Accepts `keys` from now on, and no other.
    pub fn replace(&self, keys: &[String]) {
        let digests = keys.iter().map(|k| digest(k.as_bytes())).collect();
        *self.digests.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(digests);
    }

    fn current(&self) -> Arc<Vec<[u8; 32]>> {
        self.digests
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `presented` is one of the keys (constant time, see the module docs).
    pub fn accepts(&self, presented: &str) -> bool {
        let d = digest(presented.as_bytes());
        let hit = self
            .current()
            .iter()
            .fold(Choice::from(0), |acc, k| acc | k.ct_eq(&d));
        bool::from(hit)
    }
}

/// Proof that the request carried an accepted key: an extractor, so a
/// handler that takes it cannot run for anyone else (checked before the
/// body is read).
pub struct Authorized;

impl FromRequest for Authorized {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Authorized, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let ok = req
            .app_data::<web::Data<ApiState>>()
            .zip(
                req.headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer ")),
            )
            .is_some_and(|(state, key)| state.node.api_keys.accepts(key.trim()));
        std::future::ready(if ok {
            Ok(Authorized)
        } else {
            Err(ApiError::Unauthorized)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_keys_pass_and_a_replace_rotates_them() {
        let k = Keys::new(&["old-key-0123456789".into(), "new-key-0123456789".into()]);
        assert!(k.accepts("old-key-0123456789"));
        assert!(k.accepts("new-key-0123456789"));
        assert!(!k.accepts("new-key-012345678"));
        assert!(!k.accepts(""));
        k.replace(&["new-key-0123456789".into()]);
        assert!(!k.accepts("old-key-0123456789"));
        assert!(k.accepts("new-key-0123456789"));
        assert!(!Keys::default().accepts(""), "no key: nobody passes");
    }
}
