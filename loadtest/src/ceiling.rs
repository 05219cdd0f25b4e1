//! The transport ceiling: a minimal actix-ws server that speaks just enough of
//! the protocol (`hello` -> `welcome`, `op` -> `result` echoing `args.value`)
//! with no sessions, no state and no store. Driven by the same client with the
//! same options, it gives "berth reaches X% of the raw WebSocket ceiling"
//! measured in one run on the same machine.

use std::net::SocketAddr;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures_util::StreamExt;
use serde_json::{json, Value};

async fn ws(req: HttpRequest, body: web::Payload) -> actix_web::Result<HttpResponse> {
    let (resp, mut session, stream) = actix_ws::handle(&req, body)?;
    let mut stream = stream.max_frame_size(64 * 1024).aggregate_continuations();
    actix_web::rt::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                actix_ws::AggregatedMessage::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or_default();
                    let out = match v["type"].as_str() {
                        Some("hello") => {
                            json!({"type":"welcome","session":"ceiling","token":"ceiling","resumed":false,"version":0,"last_op":0,"node":"ceiling"})
                        }
                        Some("op") => {
                            json!({"type":"result","id":v["id"],"ok":true,"value":v["args"]["value"],"version":0})
                        }
                        _ => continue,
                    };
                    if session.text(out.to_string()).await.is_err() {
                        break;
                    }
                }
                actix_ws::AggregatedMessage::Ping(b) if session.pong(&b).await.is_err() => break,
                actix_ws::AggregatedMessage::Close(_) => break,
                _ => {}
            }
        }
        let _ = session.close(None).await;
    });
    Ok(resp)
}

/// Starts the ceiling server on its own thread (actix system) with `workers`
/// workers; answers the bound address. It runs until the process exits.
pub fn spawn(listen: &str, workers: usize) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let sys = actix_web::rt::System::new();
        sys.block_on(async move {
            let server = HttpServer::new(|| App::new().route("/ws", web::get().to(ws)))
                .workers(workers.max(1))
                .disable_signals()
                .listen(listener)
                .expect("listen")
                .run();
            let _ = server.await;
        });
    });
    Ok(addr)
}
