//! What the chat's actors say to each other, and the rules every one of them
//! checks (names, text length, how much history is kept).
//!
//! One message type for the three actors: each takes the variants meant for
//! it and refuses the others (a refusal bounces to the sender's
//! `on_undeliverable`).

use berth::{Address, AppError, Cx};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest chat line or direct message, in characters.
pub const MAX_TEXT_CHARS: usize = 2000;
/// Lines a room keeps and hands to whoever joins.
pub const ROOM_HISTORY: usize = 50;
/// Direct messages a user keeps (both directions).
pub const USER_DMS: usize = 100;
/// Rooms one user may be in.
pub const MAX_ROOMS_PER_USER: usize = 50;
/// Devices (sessions) one user may have at once; the oldest is forgotten first.
pub const MAX_DEVICES_PER_USER: usize = 20;

/// A line said in a room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// The room.
    pub room: String,
    /// Its place in the room, from 1, without gaps.
    pub seq: u64,
    /// Who said it.
    pub user: String,
    /// What was said.
    pub text: String,
    /// When the room took it (ms since the epoch).
    pub at: u64,
}

/// A direct message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dm {
    /// Sender.
    pub from: String,
    /// Receiver.
    pub to: String,
    /// The text.
    pub text: String,
    /// When the sender's session sent it (ms since the epoch).
    pub at: u64,
}

/// Every message of the chat, tagged by `t`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ChatMsg {
    // ----- a device (session) to its user -----
    /// This session is one of the user's devices: show it everything.
    Attach,
    /// This session signs out.
    Detach,
    /// Join `room` (the user's rooms are the user's, on all devices).
    JoinRoom { room: String },
    /// Leave `room`.
    LeaveRoom { room: String },

    // ----- a user to a room -----
    /// `user` joins (again: the room answers with its history either way).
    Join { user: String },
    /// `user` leaves.
    Leave { user: String },
    /// `user` has devices (`on`) or has none left.
    Online { user: String, on: bool },

    // ----- a device to a room -----
    /// `user` says `text` in the room.
    Say { user: String, text: String },

    // ----- a room to its members (users) -----
    /// The answer to `Join`: the room as it is now.
    Joined {
        room: String,
        history: Vec<Line>,
        members: Vec<String>,
        online: Vec<String>,
    },
    /// The answer to `Leave`.
    Left { room: String },
    /// A new line.
    Said(Line),
    /// Someone joined, left, came online or went offline.
    Presence {
        room: String,
        user: String,
        member: bool,
        online: bool,
    },

    // ----- a device to a user (the receiver, and the sender's own user) -----
    /// A direct message.
    Direct(Dm),

    // ----- a user to its devices -----
    /// An event for the device's client, as is.
    Show(Value),
}

/// The entity holding user `name`'s rooms, devices and direct messages.
pub fn user_address(name: &str) -> Result<Address, AppError> {
    Address::entity("user", name)
        .map_err(|e| AppError::bad_args(format!("user name {name:?}: {e}")))
}

/// The entity of room `name`.
pub fn room_address(name: &str) -> Result<Address, AppError> {
    Address::entity("room", name)
        .map_err(|e| AppError::bad_args(format!("room name {name:?}: {e}")))
}

/// An entity's own key: a room's or a user's name.
pub fn key_of<S: Clone>(cx: &Cx<S>) -> String {
    match cx.address() {
        Address::Entity { key, .. } => key,
        Address::Session(id) => id.to_string(),
    }
}

/// Checks a line or direct message: not blank, at most [`MAX_TEXT_CHARS`].
pub fn check_text(text: &str) -> Result<(), AppError> {
    if text.trim().is_empty() {
        return Err(AppError::bad_args("say something: the text is empty"));
    }
    let n = text.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(AppError::bad_args(format!(
            "the text is {n} characters, over the limit of {MAX_TEXT_CHARS}"
        )));
    }
    Ok(())
}

/// The refusal of a message an actor does not take.
pub fn not_for_me(who: &str, msg: &ChatMsg) -> AppError {
    AppError::bad_args(format!("a {who} does not take {msg:?}"))
}
