//! `room/NAME`: a chat room. It keeps its members (users, not devices), who
//! of them is online, and its last [`ROOM_HISTORY`] lines, numbered without
//! gaps. Every line goes to every member's user entity, which shows it on
//! each of that user's devices.

use std::collections::{BTreeSet, VecDeque};

use berth::{AppError, Bounce, Cx, Entity, Sender};
use serde::{Deserialize, Serialize};

use crate::msg::{key_of, not_for_me, user_address, ChatMsg, Line, ROOM_HISTORY};

/// Most members of one room: a line is one message per member, queued in
/// the room's checkpoint until delivered.
pub const MAX_MEMBERS: usize = 1000;
/// Above this many members a room stops telling everybody of every join,
/// leave and change of presence (n members joining would cost n^2
/// messages); members still get the list, and who is online, when they
/// join or come back.
pub const PRESENCE_MAX_MEMBERS: usize = 100;

/// The room's behaviour.
pub struct Room;

/// One room's state.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct RoomState {
    /// Members by user name.
    members: BTreeSet<String>,
    /// Members with at least one device.
    online: BTreeSet<String>,
    /// The last lines, oldest first.
    history: VecDeque<Line>,
    /// The last line's seq.
    seq: u64,
}

/// Sends `msg` to every member but `except`.
fn tell_members(
    cx: &mut Cx<RoomState>,
    msg: &ChatMsg,
    except: Option<&str>,
) -> Result<(), AppError> {
    let members: Vec<String> = cx.state().members.iter().cloned().collect();
    for m in members.iter().filter(|m| Some(m.as_str()) != except) {
        cx.send(&user_address(m)?, msg)?;
    }
    Ok(())
}

impl Room {
    fn presence(cx: &mut Cx<RoomState>, user: &str, except: Option<&str>) -> Result<(), AppError> {
        if cx.state().members.len() > PRESENCE_MAX_MEMBERS {
            return Ok(());
        }
        let msg = ChatMsg::Presence {
            room: key_of(cx),
            user: user.to_owned(),
            member: cx.state().members.contains(user),
            online: cx.state().online.contains(user),
        };
        tell_members(cx, &msg, except)
    }
}

impl Entity for Room {
    type State = RoomState;
    type Message = ChatMsg;

    async fn on_message(
        &self,
        cx: &mut Cx<RoomState>,
        from: Sender,
        msg: ChatMsg,
    ) -> Result<(), AppError> {
        let room = key_of(cx);
        match msg {
            ChatMsg::Join { user } => {
                let new = !cx.state().members.contains(&user);
                if new && cx.state().members.len() >= MAX_MEMBERS {
                    return Err(AppError::bad_args(format!(
                        "room {room} is full ({MAX_MEMBERS} members)"
                    )));
                }
                if new {
                    let s = cx.state_mut();
                    s.members.insert(user.clone());
                    s.online.insert(user.clone());
                    Room::presence(cx, &user, Some(&user))?;
                }
                let s = cx.state();
                let joined = ChatMsg::Joined {
                    room,
                    history: s.history.iter().cloned().collect(),
                    members: s.members.iter().cloned().collect(),
                    online: s.online.iter().cloned().collect(),
                };
                cx.send(&user_address(&user)?, &joined)
            }
            ChatMsg::Leave { user } => {
                if cx.state_mut().members.remove(&user) {
                    cx.state_mut().online.remove(&user);
                    Room::presence(cx, &user, None)?;
                }
                cx.send(&user_address(&user)?, &ChatMsg::Left { room })
            }
            ChatMsg::Online { user, on } => {
                if !cx.state().members.contains(&user) || cx.state().online.contains(&user) == on {
                    return Ok(());
                }
                let s = cx.state_mut();
                if on {
                    s.online.insert(user.clone());
                } else {
                    s.online.remove(&user);
                }
                Room::presence(cx, &user, Some(&user))
            }
            ChatMsg::Say { user, text } => {
                if !cx.state().members.contains(&user) {
                    return Err(AppError::bad_args(format!(
                        "{user} is not in room {room}: join it first"
                    )));
                }
                let at = cx.now_ms();
                let s = cx.state_mut();
                s.seq += 1;
                let line = Line {
                    room,
                    seq: s.seq,
                    user,
                    text,
                    at,
                };
                s.history.push_back(line.clone());
                while s.history.len() > ROOM_HISTORY {
                    s.history.pop_front();
                }
                tell_members(cx, &ChatMsg::Said(line), None)
            }
            other => {
                let _ = from;
                Err(not_for_me("room", &other))
            }
        }
    }

    /// A member's user entity cannot be gone (entities are made by the
    /// first message), so nothing comes back but refusals, which the room
    /// has nobody to tell.
    async fn on_undeliverable(&self, _cx: &mut Cx<RoomState>, _b: Bounce) -> Result<(), AppError> {
        Ok(())
    }
}
