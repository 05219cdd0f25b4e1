//! Timer precision: how late `on_timer` runs after its due time, on live
//! sessions, on passivated ones, and after the owner is killed. Drives the
//! probe application (`tests/apps/probe.rs`, whose timer events carry the
//! firing time and the due time) over real WebSockets; bounded in sessions
//! and time, stops by itself. Commands and results: docs/benchmarks.md.
//!
//! ```sh
//! timer_bench live       URL SESSIONS AFTER_MS
//! timer_bench passivated URL SESSIONS AFTER_MS        # the node's detach timeout < AFTER_MS
//! timer_bench failover   URL SESSIONS AFTER_MS PID RESUME_URL MEMBERS KILLED [KILL_AFTER_MS]
//! ```
//! `failover` sets the timers through URL, SIGKILLs PID (the node KILLED of
//! the comma-separated MEMBERS) KILL_AFTER_MS later (default at once), and
//! after the due time resumes every session through RESUME_URL; it reports
//! the sessions KILLED owned apart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a frame within 30 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).expect("json");
        }
    }
}

async fn hello(url: &str, session: Option<(&str, &str)>) -> (Ws, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let (s, t) = session.unzip();
    send(
        &mut ws,
        json!({"type":"hello","session":s,"token":t,"ack":0}),
    )
    .await;
    let w = recv(&mut ws).await;
    assert_eq!(w["type"], "welcome", "{w}");
    (ws, w)
}

/// Lateness (ms) of the first timer event on `ws`.
async fn lateness(ws: &mut Ws) -> u64 {
    loop {
        let v = recv(ws).await;
        if v["type"] == "event" {
            let at = v["body"]["at"].as_u64().expect("at");
            let key = v["body"]["key"].as_str().expect("key");
            let due: u64 = key
                .rsplit(':')
                .next()
                .and_then(|d| d.parse().ok())
                .expect("due");
            assert!(at >= due, "a timer fired before its time: {v}");
            return at - due;
        }
    }
}

fn report(what: &str, h: &Histogram<u64>) {
    println!(
        "{what}: {} timers, lateness p50 {} ms, p99 {} ms, max {} ms",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i)
            .unwrap_or_else(|| panic!("argument {i} missing (see the doc comment)"))
    };
    let (mode, url) = (arg(0).as_str(), arg(1).clone());
    let sessions: usize = arg(2).parse::<usize>().expect("sessions").min(5000);
    let after: u64 = arg(3).parse::<u64>().expect("after_ms").min(600_000);
    let mut clients = Vec::new();
    for i in 0..sessions {
        let (mut ws, w) = hello(&url, None).await;
        let creds = (
            w["session"].as_str().unwrap().to_owned(),
            w["token"].as_str().unwrap().to_owned(),
        );
        // Spread the due times over 200 ms so they do not all fall at once.
        let ms = after + (i as u64 % 200);
        send(
            &mut ws,
            json!({"type":"op","id":1,"op":"timer","args":{"name":"t","ms":ms}}),
        )
        .await;
        let r = recv(&mut ws).await;
        assert_eq!(r["ok"], true, "{r}");
        clients.push((ws, creds));
    }
    let set_at = now_ms();
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    match mode {
        "live" => {
            for (ws, _) in &mut clients {
                all.record(lateness(ws).await).expect("record");
            }
            report("live sessions", &all);
        }
        "passivated" => {
            let creds: Vec<_> = clients.into_iter().map(|(_, c)| c).collect();
            tokio::time::sleep(Duration::from_millis(
                (set_at + after + 2_000).saturating_sub(now_ms()),
            ))
            .await;
            for (s, t) in &creds {
                let (mut ws, _) = hello(&url, Some((s, t))).await;
                all.record(lateness(&mut ws).await).expect("record");
            }
            report("passivated sessions", &all);
        }
        "failover" => {
            let (pid, resume) = (arg(4), arg(5).clone());
            let members: Vec<MemberId> =
                arg(6).split(',').map(|m| MemberId(m.to_owned())).collect();
            let killed = arg(7).clone();
            let ring = Ring::new(members, DEFAULT_VNODES);
            let creds: Vec<_> = clients.into_iter().map(|(_, c)| c).collect();
            let kill_after: u64 = args.get(8).map_or(0, |a| a.parse().expect("kill_after_ms"));
            tokio::time::sleep(Duration::from_millis(kill_after.min(600_000))).await;
            let status = std::process::Command::new("kill")
                .args(["-9", pid])
                .status()
                .expect("kill");
            assert!(status.success(), "kill -9 {pid}");
            let killed_at = now_ms();
            tokio::time::sleep(Duration::from_millis(
                (set_at + after + 5_000).saturating_sub(now_ms()),
            ))
            .await;
            let mut moved = Histogram::<u64>::new(3).expect("histogram");
            for (s, t) in &creds {
                let (mut ws, _) = hello(&resume, Some((s, t))).await;
                let late = lateness(&mut ws).await;
                all.record(late).expect("record");
                if ring.owner(s).is_some_and(|o| o.as_str() == killed) {
                    moved.record(late).expect("record");
                }
            }
            println!(
                "owner killed {} ms after the timers were set, {} ms before the earliest was due",
                killed_at - set_at,
                (set_at + after).saturating_sub(killed_at)
            );
            report("all sessions", &all);
            report("sessions of the killed node", &moved);
        }
        other => panic!("mode must be live, passivated or failover, not {other}"),
    }
}
