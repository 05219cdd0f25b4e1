//! Addresses: what names an actor, and who sent a message.
//!
//! An actor is a **session** (the actor a client's WebSocket attaches to,
//! named by its random id) or an **entity** (a server-side actor named by the
//! application: a `kind` it registered and a `key` within that kind, such as
//! `room/lobby`). Both live in the same registry, on the same ring, under the
//! same fencing epochs: an address's [`Address::actor_id`] is the key the
//! host, the store and the ring use. A session id never contains `/` (it is
//! URL-safe base64), so the two kinds of ids never collide, and a client
//! cannot attach to an entity (its id is not a session id).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::SessionId;

/// Longest entity kind, in bytes.
pub const MAX_KIND: usize = 32;
/// Longest entity key, in bytes.
pub const MAX_KEY: usize = 128;

/// The name of an actor: a session or an entity.
///
/// Written as text (and in JSON) as the session's id, or as `kind/key` for an
/// entity.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    /// The session with this id.
    Session(SessionId),
    /// The entity `key` of the registered `kind`.
    Entity {
        /// The kind, as the application registered it (`[a-z0-9_-]`, 1 to
        /// [`MAX_KIND`] bytes).
        kind: String,
        /// The key within the kind (`[A-Za-z0-9._:@+=~-]`, 1 to [`MAX_KEY`] bytes).
        key: String,
    },
}

/// Why text is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Neither a session id nor `kind/key`.
    #[error("not a session id nor an entity address `kind/key`")]
    Malformed,
    /// The entity kind has a character or length it may not have.
    #[error("an entity kind is 1 to {MAX_KIND} bytes of [a-z0-9_-]")]
    BadKind,
    /// The entity key has a character or length it may not have.
    #[error("an entity key is 1 to {MAX_KEY} bytes of [A-Za-z0-9._:@+=~-]")]
    BadKey,
}

/// Whether `kind` may name an entity kind.
pub fn valid_kind(kind: &str) -> bool {
    (1..=MAX_KIND).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Whether `key` may name an entity of a kind.
pub fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@+=~-".contains(&b))
}

impl Address {
    /// The length of its text form (`to_string().len()`), without making it.
    pub fn text_len(&self) -> usize {
        match self {
            Address::Session(id) => id.as_str().len(),
            Address::Entity { kind, key } => kind.len() + 1 + key.len(),
        }
    }

    /// The entity `key` of `kind`, checked.
    pub fn entity(kind: &str, key: &str) -> Result<Self, AddressError> {
        if !valid_kind(kind) {
            return Err(AddressError::BadKind);
        }
        if !valid_key(key) {
            return Err(AddressError::BadKey);
        }
        Ok(Address::Entity {
            kind: kind.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The session `id`.
    pub fn session(id: SessionId) -> Self {
        Address::Session(id)
    }

    /// The id the host, the store and the ring know this actor by.
    pub fn actor_id(&self) -> SessionId {
        match self {
            Address::Session(id) => id.clone(),
            Address::Entity { kind, key } => SessionId::from_checked(format!("{kind}/{key}")),
        }
    }

    /// The address of the actor registered under `id`.
    pub fn of_actor(id: &SessionId) -> Self {
        match id.as_str().split_once('/') {
            Some((kind, key)) => Address::Entity {
                kind: kind.to_owned(),
                key: key.to_owned(),
            },
            None => Address::Session(id.clone()),
        }
    }

    /// The entity kind, if this is an entity.
    pub fn kind(&self) -> Option<&str> {
        match self {
            Address::Entity { kind, .. } => Some(kind),
            Address::Session(_) => None,
        }
    }

    /// Whether this is a session.
    pub fn is_session(&self) -> bool {
        matches!(self, Address::Session(_))
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        match s.split_once('/') {
            Some((kind, key)) => Address::entity(kind, key),
            None => SessionId::parse(s)
                .map(Address::Session)
                .ok_or(AddressError::Malformed),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Session(id) => f.write_str(id.as_str()),
            Address::Entity { kind, key } => write!(f, "{kind}/{key}"),
        }
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who sent a message: another actor, or a backend through the API.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sender {
    /// The actor at this address.
    Actor(Address),
    /// A backend, through the backend API, with the request's
    /// `Idempotency-Key`.
    Backend(String),
}

impl Sender {
    /// The key of this sender's row in a receiver's table of watermarks.
    pub(crate) fn mark_key(&self) -> String {
        match self {
            Sender::Actor(a) => a.to_string(),
            Sender::Backend(k) => format!("api:{k}"),
        }
    }
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sender::Actor(a) => a.fmt(f),
            Sender::Backend(k) => write!(f, "backend({k})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_as_text_and_json() {
        let s = Address::Session(SessionId::random());
        let e = Address::entity("room", "lobby-1").unwrap();
        for a in [s, e] {
            assert_eq!(a.to_string().parse::<Address>().unwrap(), a);
            let j = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Address>(&j).unwrap(), a);
            assert_eq!(Address::of_actor(&a.actor_id()), a);
            assert_eq!(a.text_len(), a.to_string().len());
        }
    }

    #[test]
    fn bad_addresses_are_refused() {
        assert_eq!("x".parse::<Address>(), Err(AddressError::Malformed));
        assert_eq!("Room/a".parse::<Address>(), Err(AddressError::BadKind));
        assert_eq!("room/".parse::<Address>(), Err(AddressError::BadKey));
        assert_eq!("room/a/b".parse::<Address>(), Err(AddressError::BadKey));
        assert_eq!("room/{x}".parse::<Address>(), Err(AddressError::BadKey));
        let long = "k".repeat(MAX_KEY + 1);
        assert_eq!(Address::entity("room", &long), Err(AddressError::BadKey));
    }

    #[test]
    fn an_entity_id_is_never_a_session_id() {
        let e = Address::entity("room", "AAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert_eq!(SessionId::parse(e.actor_id().as_str()), None);
    }
}
