//! `user/NAME`: one person, whatever device they use. It keeps the rooms
//! they are in, their devices (sessions) and their last [`USER_DMS`] direct
//! messages, and shows everything that happens to them on every device.

use std::collections::{BTreeSet, VecDeque};

use berth::{Address, AppError, Bounce, BounceReason, Cx, Entity, Sender};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::msg::{
    key_of, not_for_me, room_address, ChatMsg, Dm, MAX_DEVICES_PER_USER, MAX_ROOMS_PER_USER,
    USER_DMS,
};

/// The user's behaviour.
pub struct User;

/// One user's state.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct UserState {
    /// Devices: session addresses, oldest first.
    devices: VecDeque<Address>,
    /// Rooms joined.
    rooms: BTreeSet<String>,
    /// Direct messages, oldest first.
    dms: VecDeque<Dm>,
}

/// Shows `event` on every device.
fn show_all(cx: &mut Cx<UserState>, event: Value) -> Result<(), AppError> {
    let devices: Vec<Address> = cx.state().devices.iter().cloned().collect();
    let msg = ChatMsg::Show(event);
    for d in &devices {
        cx.send(d, &msg)?;
    }
    Ok(())
}

/// Tells every room whether this user has devices.
fn tell_rooms_online(cx: &mut Cx<UserState>, on: bool) -> Result<(), AppError> {
    let user = key_of(cx);
    let rooms: Vec<String> = cx.state().rooms.iter().cloned().collect();
    for r in &rooms {
        cx.send(
            &room_address(r)?,
            &ChatMsg::Online {
                user: user.clone(),
                on,
            },
        )?;
    }
    Ok(())
}

/// The device behind `from`, if it is a session.
fn device(from: &Sender) -> Result<Address, AppError> {
    match from {
        Sender::Actor(a @ Address::Session(_)) => Ok(a.clone()),
        other => Err(AppError::bad_args(format!("{other} is not a device"))),
    }
}

/// Forgets a device; the last one gone takes the user offline.
fn forget_device(cx: &mut Cx<UserState>, d: &Address) -> Result<(), AppError> {
    let before = cx.state().devices.len();
    cx.state_mut().devices.retain(|x| x != d);
    if before > 0 && cx.state().devices.is_empty() {
        tell_rooms_online(cx, false)?;
    }
    Ok(())
}

impl Entity for User {
    type State = UserState;
    type Message = ChatMsg;

    async fn on_message(
        &self,
        cx: &mut Cx<UserState>,
        from: Sender,
        msg: ChatMsg,
    ) -> Result<(), AppError> {
        let me = key_of(cx);
        match msg {
            ChatMsg::Attach => {
                let d = device(&from)?;
                let first = cx.state().devices.is_empty();
                let s = cx.state_mut();
                if !s.devices.contains(&d) {
                    s.devices.push_back(d.clone());
                    while s.devices.len() > MAX_DEVICES_PER_USER {
                        s.devices.pop_front();
                    }
                }
                if first {
                    tell_rooms_online(cx, true)?;
                }
                let s = cx.state();
                let me_event = json!({
                    "kind": "me",
                    "user": me,
                    "rooms": s.rooms,
                    "dms": s.dms,
                });
                cx.send(&d, &ChatMsg::Show(me_event))?;
                // Each room answers with its history (to every device).
                let rooms: Vec<String> = cx.state().rooms.iter().cloned().collect();
                for r in &rooms {
                    cx.send(&room_address(r)?, &ChatMsg::Join { user: me.clone() })?;
                }
                Ok(())
            }
            ChatMsg::Detach => forget_device(cx, &device(&from)?),
            ChatMsg::JoinRoom { room } => {
                let addr = room_address(&room)?;
                if !cx.state().rooms.contains(&room) && cx.state().rooms.len() >= MAX_ROOMS_PER_USER
                {
                    return Err(AppError::bad_args(format!(
                        "{me} is in {MAX_ROOMS_PER_USER} rooms already: leave one first"
                    )));
                }
                cx.state_mut().rooms.insert(room);
                cx.send(&addr, &ChatMsg::Join { user: me })
            }
            ChatMsg::LeaveRoom { room } => {
                let addr = room_address(&room)?;
                cx.state_mut().rooms.remove(&room);
                cx.send(&addr, &ChatMsg::Leave { user: me })
            }
            ChatMsg::Joined {
                room,
                history,
                members,
                online,
            } => {
                if !cx.state().rooms.contains(&room) {
                    return Ok(()); // left again meanwhile
                }
                show_all(
                    cx,
                    json!({"kind": "joined", "room": room, "history": history,
                           "members": members, "online": online}),
                )
            }
            ChatMsg::Left { room } => show_all(cx, json!({"kind": "left", "room": room})),
            ChatMsg::Said(line) => {
                if !cx.state().rooms.contains(&line.room) {
                    return Ok(()); // a line said before the room heard we left
                }
                let mut v = serde_json::to_value(&line).unwrap_or_default();
                v["kind"] = json!("line");
                show_all(cx, v)
            }
            ChatMsg::Presence {
                room,
                user,
                member,
                online,
            } => show_all(
                cx,
                json!({"kind": "presence", "room": room, "user": user,
                       "member": member, "online": online}),
            ),
            ChatMsg::Direct(dm) => {
                if dm.to != me && dm.from != me {
                    return Err(AppError::bad_args("this direct message is not mine"));
                }
                let s = cx.state_mut();
                s.dms.push_back(dm.clone());
                while s.dms.len() > USER_DMS {
                    s.dms.pop_front();
                }
                let mut v = serde_json::to_value(&dm).unwrap_or_default();
                v["kind"] = json!("dm");
                show_all(cx, v)
            }
            other => Err(not_for_me("user", &other)),
        }
    }

    /// A device that ended or expired is forgotten; anything else that
    /// came back is shown to the devices.
    async fn on_undeliverable(&self, cx: &mut Cx<UserState>, b: Bounce) -> Result<(), AppError> {
        match (&b.to, &b.why) {
            (Address::Session(_), BounceReason::Gone) => forget_device(cx, &b.to),
            (_, BounceReason::Refused(e)) => show_all(
                cx,
                json!({"kind": "error", "to": b.to.to_string(), "message": e.message}),
            ),
            _ => Ok(()),
        }
    }
}
