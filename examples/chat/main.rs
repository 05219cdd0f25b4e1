//! `chat`: berth's flagship example, a small chat product. Run it with
//! `cargo run --example chat -- --config examples/chat/chat.toml` and open
//! <http://127.0.0.1:8080/> in two browser tabs (docs/applications.md, "The
//! chat example").
//!
//! Every signed-in person is a **user** entity (`user/NAME`, NAME being the
//! credential's subject): their rooms, their devices, their direct messages.
//! Every browser tab or phone is a **session** (a device) bound to that user
//! by its credential. Every room is a **room** entity (`room/NAME`): its
//! members, who is online, its last lines. A line said in a room goes from
//! the device to the room, from the room to each member's user, and from
//! each user to each of its devices, as messages: each hop is delivered
//! exactly once and in order, across nodes and crashes, so a line is never
//! lost nor shown twice, on any device.
//!
//! # Layout
//! - `msg.rs`: the messages between the three actors, names and limits;
//! - `device.rs`: the session (ops in, events out);
//! - `user.rs`: the user entity;
//! - `room.rs`: the room entity;
//! - `page.html`: the page, served at `/` (it signs its own demo credential:
//!   see its header);
//! - `chat.toml`: the example's configuration (the demo signing secret).

mod device;
mod msg;
mod room;
mod user;

fn main() {
    berth::Server::new(device::Device)
        .page(include_str!("page.html"))
        .entity("user", user::User)
        .entity("room", room::Room)
        .main()
}
