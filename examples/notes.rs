//! The example of docs/applications.md ("From an empty crate to one node"),
//! compiled with the workspace so the guide stays true: `cargo run --example notes`.

use std::time::Duration;

use berth::{AppError, Cx, Server, Session};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The application: behaviour, no state.
struct Notes;

/// One session's state: serde, stored as JSON in its checkpoint.
#[derive(Clone, Default, Serialize, Deserialize)]
struct State {
    notes: Vec<String>,
}

/// What a client may send: `{"type":"op","id":1,"op":"add","args":{"text":"hi"}}`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Add { text: String },
    List,
    RemindIn { ms: u64 },
}

impl Session for Notes {
    type State = State;
    type Op = Op;
    type Message = berth::NoMessages;

    async fn on_op(&self, cx: &mut Cx<State>, op: Op) -> Result<Value, AppError> {
        match op {
            Op::Add { text } => {
                cx.state_mut().notes.push(text); // a write: checkpointed first
                Ok(json!(cx.state().notes.len()))
            }
            Op::List => Ok(json!(cx.state().notes)), // a read: no checkpoint
            Op::RemindIn { ms } => {
                cx.set_timer_in("remind", Duration::from_millis(ms))?;
                Ok(Value::Null)
            }
        }
    }

    async fn on_timer(&self, cx: &mut Cx<State>, _name: &str) -> Result<(), AppError> {
        let n = cx.state().notes.len();
        cx.emit(json!({ "reminder": n }))?; // an event to the client
        Ok(())
    }
}

fn main() {
    Server::new(Notes).main()
}
