//! The session: one device (a browser tab, a phone) of a signed-in user.
//! Its ops turn into messages to the user's entity or to a room; what comes
//! back (`Show`) becomes an event to the client. It keeps no state of its
//! own: the user entity does.

use berth::{AppError, Bounce, Cx, ErrorCode, Sender, Session};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::msg::{check_text, not_for_me, room_address, user_address, ChatMsg, Dm};

/// The device's behaviour.
pub struct Device;

/// What a client may ask.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Show this device everything of its user (once after a new session;
    /// again is harmless).
    Start,
    /// Join a room: its history comes as an event.
    Join { room: String },
    /// Leave a room.
    Leave { room: String },
    /// Say something in a room.
    Say { room: String, text: String },
    /// A direct message to another user.
    Dm { to: String, text: String },
    /// This device signs out (send `bye` next).
    SignOut,
}

/// The signed-in user (the credential's subject).
fn me(cx: &Cx<()>) -> Result<String, AppError> {
    cx.user().map(str::to_owned).ok_or_else(|| {
        AppError::new(
            ErrorCode::BadToken,
            "sign in first: hello needs a credential",
        )
    })
}

impl Session for Device {
    type State = ();
    type Op = Op;
    type Message = ChatMsg;

    async fn on_op(&self, cx: &mut Cx<()>, op: Op) -> Result<Value, AppError> {
        let me = me(cx)?;
        let my_user = user_address(&me)?;
        match op {
            Op::Start => cx.send(&my_user, &ChatMsg::Attach)?,
            Op::Join { room } => {
                room_address(&room)?;
                cx.send(&my_user, &ChatMsg::JoinRoom { room })?
            }
            Op::Leave { room } => cx.send(&my_user, &ChatMsg::LeaveRoom { room })?,
            Op::Say { room, text } => {
                check_text(&text)?;
                cx.send(&room_address(&room)?, &ChatMsg::Say { user: me, text })?
            }
            Op::Dm { to, text } => {
                check_text(&text)?;
                let dm = Dm {
                    from: me.clone(),
                    to: to.clone(),
                    text,
                    at: cx.now_ms(),
                };
                cx.send(&user_address(&to)?, &ChatMsg::Direct(dm.clone()))?;
                if to != me {
                    cx.send(&my_user, &ChatMsg::Direct(dm))?; // my other devices
                }
            }
            Op::SignOut => cx.send(&my_user, &ChatMsg::Detach)?,
        }
        // Sent: the message is committed with this op, and delivered exactly
        // once from now on, whatever node dies.
        Ok(json!({"sent": true}))
    }

    async fn on_message(
        &self,
        cx: &mut Cx<()>,
        _from: Sender,
        msg: ChatMsg,
    ) -> Result<(), AppError> {
        match msg {
            ChatMsg::Show(event) => cx.emit(event).map(|_| ()),
            other => Err(not_for_me("device", &other)),
        }
    }

    /// A room or user that refused what this device sent: tell the client.
    async fn on_undeliverable(&self, cx: &mut Cx<()>, b: Bounce) -> Result<(), AppError> {
        let why = match &b.why {
            berth::BounceReason::Refused(e) => e.message.clone(),
            other => format!("{other:?}"),
        };
        cx.emit(json!({"kind": "error", "to": b.to.to_string(), "message": why}))
            .map(|_| ())
    }
}
