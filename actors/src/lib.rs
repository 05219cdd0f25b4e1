//! Sessions for berth: one actor per live session.
pub mod app;
pub mod codec;
pub mod ids;
pub mod kv;
pub mod protocol;
pub mod state;
pub mod store;
