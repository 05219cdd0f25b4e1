//! The chat example (`examples/chat`) as a person uses it: its page in two
//! tabs of a headless Chromium, each tab on a different node of a
//! three-node cluster (real Consul, real Redis), two people signing in,
//! joining a room, talking, sending a direct message, and the third node,
//! which owns the room, SIGKILLed in the middle of the conversation.

use std::path::PathBuf;

use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};

use crate::browser::{js, Browser, Tab};
use crate::common::*;

/// The demo secret of examples/chat/chat.toml (and of its page).
const DEMO_SECRET: &str = "berth-chat-demo-secret-do-not-use-in-production";

/// The chat example's binary (built by `scripts/test.sh`).
pub(crate) fn chat_bin() -> PathBuf {
    example_bin("chat")
}

/// Signs `tab` in as `name` and waits until it is connected.
async fn sign_in(b: &mut Browser, tab: &Tab, name: &str) {
    b.eval(
        tab,
        &format!(
            "document.getElementById('name').value = {}; \
             document.getElementById('signin').requestSubmit(); true",
            js(name)
        ),
    )
    .await;
    b.wait(
        tab,
        "document.getElementById('status').textContent.startsWith('connected')",
        "connected",
    )
    .await;
}

/// Submits form `form` after setting input `input` to `value`.
async fn submit(b: &mut Browser, tab: &Tab, input: &str, value: &str, form: &str) {
    b.eval(
        tab,
        &format!(
            "document.getElementById({}).value = {}; \
             document.getElementById({}).requestSubmit(); true",
            js(input),
            js(value),
            js(form)
        ),
    )
    .await;
}

/// How many lines of the open conversation read `text`.
fn count_lines(text: &str) -> String {
    format!(
        "[...document.querySelectorAll('#lines li')].filter(l => l.dataset.text === {}).length",
        js(text)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_in_two_tabs_through_two_nodes_while_the_rooms_node_is_killed() {
    let consul = Consul::start();
    let redis = Redis::start();
    let ids = ["a", "b", "c"];
    let mut nodes: Vec<Berth> = ids
        .iter()
        .map(|id| {
            let mut env = cluster_env(&consul, &redis, id);
            env.extend([
                ("BERTH__CLUSTER__TTL_MS".to_string(), "1000".to_string()),
                ("BERTH__AUTH__REQUIRED".into(), "true".into()),
                ("BERTH__AUTH__HS256_SECRET".into(), DEMO_SECRET.into()),
            ]);
            Berth::start_bin(&chat_bin(), &env, &[])
        })
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &ids).await;
    // A room owned by c, the node no tab is connected to.
    let ring = Ring::new(ids.iter().map(|m| MemberId(m.to_string())), DEFAULT_VNODES);
    let room = (0..1000)
        .map(|i| format!("lobby{i}"))
        .find(|r| ring.owner(&format!("room/{r}")).unwrap().as_str() == "c")
        .unwrap();

    let mut b = Browser::start().await;
    let page = |n: &Berth| format!("http://{}/", n.public);
    let alice = b.open(&page(&nodes[0])).await;
    let bob = b.open(&page(&nodes[1])).await;
    sign_in(&mut b, &alice, "alice").await;
    sign_in(&mut b, &bob, "bob").await;
    submit(&mut b, &alice, "room-input", &room, "join-form").await;
    submit(&mut b, &bob, "room-input", &room, "join-form").await;
    // Each sees the other as a member of the room, online.
    for (tab, other) in [(&alice, "bob"), (&bob, "alice")] {
        b.wait(
            tab,
            &format!(
                "document.querySelector('#members li[data-user={}] .dot.on')",
                js(other)
            ),
            "the other member online",
        )
        .await;
    }

    // A conversation, with the room's node SIGKILLed after the third line.
    let lines: Vec<String> = (1..=6).map(|i| format!("line {i}")).collect();
    for (i, text) in lines.iter().enumerate() {
        let (from, to) = if i % 2 == 0 {
            (&alice, &bob)
        } else {
            (&bob, &alice)
        };
        submit(&mut b, from, "text", text, "compose").await;
        if i == 2 {
            nodes[2].kill9();
            converge(&[&nodes[0], &nodes[1]], &["a", "b"]).await;
        }
        b.wait(to, &format!("{} === 1", count_lines(text)), text)
            .await;
    }
    // Every line exactly once, in order, in both tabs, and numbered 1..6
    // by the room (history kept across the kill).
    for tab in [&alice, &bob] {
        let shown = b
            .eval(
                tab,
                "[...document.querySelectorAll('#lines li[data-seq]')].map(l => [Number(l.dataset.seq), l.dataset.text])",
            )
            .await;
        let want: Vec<(u64, String)> = lines
            .iter()
            .enumerate()
            .map(|(i, t)| (i as u64 + 1, t.clone()))
            .collect();
        let got: Vec<(u64, String)> = serde_json::from_value(shown).unwrap();
        assert_eq!(got, want, "every line once, in order");
    }

    // A direct message: bob opens a conversation with alice.
    submit(&mut b, &bob, "dm-input", "alice", "dm-form").await;
    submit(&mut b, &bob, "text", "psst, alice", "compose").await;
    b.wait(
        &alice,
        "document.querySelector('#people li[data-key=\"dm:bob\"]')",
        "a conversation with bob",
    )
    .await;
    b.eval(
        &alice,
        "document.querySelector('#people li[data-key=\"dm:bob\"]').click(); true",
    )
    .await;
    b.wait(
        &alice,
        &format!("{} === 1", count_lines("psst, alice")),
        "the DM",
    )
    .await;
    // bob's own tab shows what he sent, once.
    b.wait(
        &bob,
        &format!("{} === 1", count_lines("psst, alice")),
        "the DM",
    )
    .await;

    // A reload of alice's tab resumes her session and shows the room again.
    b.eval(&alice, "location.reload(); true").await;
    b.wait(
        &alice,
        "document.readyState === 'complete' && document.getElementById('status').textContent.startsWith('connected')",
        "resumed after reload",
    )
    .await;
    let room_item = format!(
        "document.querySelector('#rooms li[data-key={}]')",
        js(&format!("room:{room}"))
    );
    b.wait(&alice, &room_item, "the room listed again").await;
    b.eval(&alice, &format!("{room_item}.click(); true")).await;
    b.wait(
        &alice,
        &format!("{} === 1", count_lines("line 6")),
        "history after reload",
    )
    .await;
}
