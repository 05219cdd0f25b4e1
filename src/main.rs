//! `berth`: one node of the berth session cluster, running the built-in `kv`
//! application (protocol.md). Everything else is the library: see `src/lib.rs`.

#![forbid(unsafe_code)]

fn main() {
    berth::Server::new(berth::KvApp)
        .page(berth::KV_DEMO_PAGE)
        .main()
}
