//! A simple closed-loop benchmark client: N sessions, each sending durable
//! `incr` ops one at a time for a fixed duration; prints ops/s and latency
//! percentiles (hdrhistogram). Bounded in sessions and time; stops by itself.
//!
//! ```sh
//! cargo run --release --example incr_bench -- ws://127.0.0.1:8080/ws 1000 20
//! ```
//! Arguments: URL (default `ws://127.0.0.1:8080/ws`), sessions (default 1000),
//! seconds (default 20, at most 600), op (`incr`, the default, or `echo`). The full load-test harness is `berth-loadtest`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into());
    let sessions: usize = args.next().map_or(1000, |s| s.parse().expect("sessions"));
    let secs: u64 = args
        .next()
        .map_or(20, |s| s.parse().expect("seconds"))
        .min(600);
    // `incr` (durable write) or `echo` (no state change, no checkpoint).
    let op_name: &'static str = match args.next().as_deref() {
        None | Some("incr") => "incr",
        Some("echo") => "echo",
        Some(other) => panic!("op must be incr or echo, not {other}"),
    };
    let errors = Arc::new(AtomicU64::new(0));

    // Connect everyone first, then start the clock.
    let mut conns = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        ws.send(Message::text(
            json!({"type":"hello","session":null}).to_string(),
        ))
        .await
        .unwrap();
        let w = ws.next().await.unwrap().unwrap();
        let w: Value = serde_json::from_str(w.to_text().unwrap()).unwrap();
        assert_eq!(w["type"], "welcome", "{w}");
        conns.push(ws);
    }
    eprintln!("{sessions} sessions connected; running {secs} s");
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut ws| {
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut id = 1u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    let op =
                        json!({"type":"op","id":id,"op":op_name,"args":{"key":"n","value":id}});
                    if ws.send(Message::text(op.to_string())).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    // Skip the server's pings (tungstenite answers them).
                    let m = loop {
                        match ws.next().await {
                            Some(Ok(Message::Text(t))) => break Some(t),
                            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                            _ => break None,
                        }
                    };
                    let Some(m) = m else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    };
                    let v: Value = serde_json::from_str(&m).unwrap_or_default();
                    if v["ok"] != true || v["value"] != id {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                    id += 1;
                }
                let _ = ws.close(None).await;
                h
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "sessions={sessions} ops={} ops_per_s={:.0} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2} errors={}",
        all.len(),
        all.len() as f64 / elapsed,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        all.max() as f64 / 1000.0,
        errors.load(Ordering::Relaxed)
    );
}
