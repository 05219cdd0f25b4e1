//! The edge: client WebSocket connections at `GET /ws`, and the demo page.
//!
//! One task per connection. It parses frames, enforces the per-connection
//! limits (frame size, frame rate, ops in flight), turns `hello` into an
//! attachment to the session's actor, forwards ops and acks to it, and writes
//! back results (in op order), events and closes. It never holds session state:
//! losing a connection only detaches it from its session.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::{http::header, web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseReason, ProtocolError, Session as WsSession};
use berth_actors::app::Application;
use berth_actors::conn::{conn_channel, ConnMsg};
use berth_actors::ids::SessionId;
use berth_actors::kv::KvApp;
use berth_actors::protocol::{ClientMsg, CloseCode, ErrorBody, ErrorCode, OpReply, ServerMsg};
use berth_actors::session::{Ack, Attach, AttachError, Bye, Detach, Op, SessionActor};
use futures_util::future::LocalBoxFuture;
use futures_util::stream::{FuturesOrdered, StreamExt};

use crate::node::Node;

/// Capacity of the actor -> connection channel (events and closes).
const CONN_CHANNEL: usize = 2048;
/// Attempts to attach when the actor found stopped between lookup and attach.
const ATTACH_ATTEMPTS: usize = 3;

/// `GET /ws`: upgrade and hand the connection to its own task.
pub async fn ws_route(
    req: HttpRequest,
    body: web::Payload,
    node: web::Data<Node>,
) -> actix_web::Result<HttpResponse> {
    let origin_ok = match req.headers().get(header::ORIGIN) {
        None => true,
        Some(o) => {
            let allowed = &node.cfg.server.origins;
            allowed.is_empty() || o.to_str().is_ok_and(|o| allowed.iter().any(|a| a == o))
        }
    };
    let (resp, ws, stream) = actix_ws::handle(&req, body)?;
    let max = node.cfg.server.max_frame_bytes;
    let stream = stream
        .max_frame_size(max)
        .aggregate_continuations()
        .max_continuation_size(max);
    let node = node.into_inner();
    actix_web::rt::spawn(async move {
        let live = node.connections.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("berth_connections").increment(1.0);
        let refuse = if !origin_ok {
            Some((
                ErrorCode::BadOrigin,
                CloseCode::Policy,
                "origin not allowed",
            ))
        } else if live > node.cfg.server.max_connections {
            Some((
                ErrorCode::Unavailable,
                CloseCode::TryAgainLater,
                "node is at its connection limit",
            ))
        } else if node.is_stopping() {
            Some((
                ErrorCode::Unavailable,
                CloseCode::GoingAway,
                "node is going away",
            ))
        } else {
            None
        };
        match refuse {
            Some((code, close, why)) => {
                let mut ws = ws;
                let _ = send(&mut ws, &ServerMsg::Error(ErrorBody::new(code, why))).await;
                let _ = ws.close(Some(reason(close, why))).await;
            }
            None => Conn::new(node.clone(), ws).run(stream).await,
        }
        node.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("berth_connections").decrement(1.0);
    });
    Ok(resp)
}

fn reason(code: CloseCode, why: &str) -> CloseReason {
    CloseReason {
        code: code.code().into(),
        description: Some(why.to_owned()),
    }
}

async fn send(ws: &mut WsSession, msg: &ServerMsg) -> Result<(), actix_ws::Closed> {
    // Serializing our own message types cannot fail.
    ws.text(serde_json::to_string(msg).unwrap_or_default())
        .await
}

/// How a connection ends.
enum Exit {
    /// We close with this code.
    Close(CloseCode, String),
    /// The peer closed or vanished.
    Gone,
}

/// A finished op, in the order the ops arrived.
struct Done {
    reply: OpReply,
    label: &'static str,
    started: Instant,
}

/// Token bucket for frames.
struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
    /// When we last told the client it is being limited (told at most once a second).
    last_warned: Option<Instant>,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Bucket {
            tokens: burst as f64,
            last: Instant::now(),
            rate: rate as f64,
            burst: burst as f64,
            last_warned: None,
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Conn {
    node: Arc<Node>,
    ws: WsSession,
    attached: Option<Addr<SessionActor<KvApp>>>,
    conn: berth_actors::conn::ConnHandle,
    rx: Option<berth_actors::conn::ConnReceiver>,
    inflight: FuturesOrdered<LocalBoxFuture<'static, Done>>,
    bucket: Bucket,
    max_inflight: usize,
    last_seen: Instant,
}

impl Conn {
    fn new(node: Arc<Node>, ws: WsSession) -> Self {
        let limits = node.limits();
        let (conn, rx) = conn_channel(CONN_CHANNEL);
        Conn {
            node,
            ws,
            attached: None,
            conn,
            rx: Some(rx),
            inflight: FuturesOrdered::new(),
            bucket: Bucket::new(limits.frames_per_sec, limits.frames_burst),
            max_inflight: limits.max_inflight_ops,
            last_seen: Instant::now(),
        }
    }

    async fn run(mut self, mut stream: actix_ws::AggregatedMessageStream) {
        let mut rx = self.rx.take().expect("receiver");
        let ping_every = self.node.cfg.ping_interval();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let mut stopping = self.node.stopping.subscribe();
        let exit = loop {
            tokio::select! {
                // Sessions close their own connections at shutdown (after their
                // final checkpoint); connections without one close here.
                _ = stopping.wait_for(|s| *s), if self.attached.is_none() => {
                    break Exit::Close(CloseCode::GoingAway, "node going away".into());
                }
                m = rx.recv() => {
                    // `None` cannot happen: this task holds a handle itself.
                    let sent = match m {
                        Some(ConnMsg::Event(e)) => send(&mut self.ws, &ServerMsg::Event(e)).await,
                        Some(ConnMsg::Close(code, why)) => break Exit::Close(code, why),
                        None => Ok(()),
                    };
                    if sent.is_err() { break Exit::Gone; }
                }
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if self.finish(done).await.is_err() { break Exit::Gone; }
                }
                frame = stream.recv(), if self.inflight.len() < self.max_inflight => {
                    self.last_seen = Instant::now();
                    match frame {
                        None => break Exit::Gone,
                        Some(Err(e)) => break protocol_exit(&e),
                        Some(Ok(AggregatedMessage::Close(_))) => break Exit::Close(CloseCode::Normal, String::new()),
                        Some(Ok(AggregatedMessage::Ping(b))) => {
                            if self.ws.pong(&b).await.is_err() { break Exit::Gone; }
                        }
                        Some(Ok(AggregatedMessage::Pong(_))) => {}
                        Some(Ok(AggregatedMessage::Binary(_))) => {
                            if self.error(ErrorCode::BadFrame, "binary frames are not accepted: send JSON text frames").await.is_err() { break Exit::Gone; }
                        }
                        Some(Ok(AggregatedMessage::Text(text))) => {
                            match self.on_text(&text).await {
                                Ok(None) => {}
                                Ok(Some(exit)) => break exit,
                                Err(_) => break Exit::Gone,
                            }
                        }
                    }
                }
                _ = ping.tick() => {
                    if self.last_seen.elapsed() > ping_every * 2 {
                        tracing::debug!("dropping a connection silent for two ping intervals");
                        break Exit::Gone;
                    }
                    if self.ws.ping(b"").await.is_err() { break Exit::Gone; }
                    // Pick up reloaded limits.
                    let limits = self.node.limits();
                    self.max_inflight = limits.max_inflight_ops;
                    self.bucket.rate = limits.frames_per_sec as f64;
                    self.bucket.burst = limits.frames_burst as f64;
                }
            }
        };
        if let Some(addr) = &self.attached {
            addr.do_send(Detach {
                conn_id: self.conn.id(),
            });
        }
        if let Exit::Close(code, why) = exit {
            // Answer what is already finished before closing.
            while let Some(Some(done)) = futures_util::FutureExt::now_or_never(self.inflight.next())
            {
                if self.finish(done).await.is_err() {
                    return;
                }
            }
            let _ = self.ws.close(Some(reason(code, &why))).await;
        }
    }

    async fn finish(&mut self, done: Done) -> Result<(), actix_ws::Closed> {
        let result = match &done.reply.error {
            None => "ok",
            Some(e) => e.code.as_str(),
        };
        metrics::counter!("berth_ops_total", "op" => done.label, "result" => result).increment(1);
        metrics::histogram!("berth_op_duration_seconds", "op" => done.label)
            .record(done.started.elapsed().as_secs_f64());
        send(&mut self.ws, &ServerMsg::Result(done.reply)).await
    }

    async fn error(
        &mut self,
        code: ErrorCode,
        msg: impl Into<String>,
    ) -> Result<(), actix_ws::Closed> {
        send(&mut self.ws, &ServerMsg::Error(ErrorBody::new(code, msg))).await
    }

    /// Handles one text frame; `Ok(Some(exit))` ends the connection.
    async fn on_text(&mut self, text: &str) -> Result<Option<Exit>, actix_ws::Closed> {
        let limited = !self.bucket.take();
        let msg = match serde_json::from_str::<ClientMsg>(text) {
            Ok(m) => m,
            Err(e) => {
                if !limited {
                    self.error(ErrorCode::BadFrame, format!("not a protocol message: {e}"))
                        .await?;
                }
                return Ok(None);
            }
        };
        if limited {
            if let ClientMsg::Op { id, .. } = msg {
                let reply = OpReply::err(
                    id,
                    ErrorCode::RateLimited,
                    "too many frames: slow down and retry with the same id",
                    0,
                );
                let started = Instant::now();
                self.inflight.push_back(Box::pin(async move {
                    Done {
                        reply,
                        label: "limited",
                        started,
                    }
                }));
            } else if self
                .bucket
                .last_warned
                .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
            {
                self.bucket.last_warned = Some(Instant::now());
                self.error(ErrorCode::RateLimited, "too many frames: slow down")
                    .await?;
            }
            return Ok(None);
        }
        match msg {
            ClientMsg::Hello {
                session,
                token,
                ack,
            } => self.hello(session, token, ack).await,
            _ if self.attached.is_none() => {
                self.error(ErrorCode::HelloRequired, "the first frame must be hello")
                    .await?;
                Ok(None)
            }
            ClientMsg::Op { id, op, args } => {
                let addr = self.attached.clone().expect("attached");
                let label = self.node.host.app().op_label(&op);
                let started = Instant::now();
                let msg = Op {
                    conn_id: self.conn.id(),
                    id,
                    op,
                    args,
                };
                self.inflight.push_back(Box::pin(async move {
                    let reply = addr.send(msg).await.unwrap_or_else(|_| {
                        OpReply::err(
                            id,
                            ErrorCode::Unavailable,
                            "session stopped before the op ran: retry",
                            0,
                        )
                    });
                    Done {
                        reply,
                        label,
                        started,
                    }
                }));
                Ok(None)
            }
            ClientMsg::Ack { seq } => {
                if let Some(addr) = &self.attached {
                    addr.do_send(Ack {
                        conn_id: self.conn.id(),
                        seq,
                    });
                }
                Ok(None)
            }
            ClientMsg::Bye => {
                let addr = self.attached.clone().expect("attached");
                // The actor deletes the session and closes us with 1000.
                if addr
                    .send(Bye {
                        conn_id: self.conn.id(),
                    })
                    .await
                    .is_err()
                {
                    return Ok(Some(Exit::Close(
                        CloseCode::Internal,
                        "session stopped: resume and retry".into(),
                    )));
                }
                Ok(None)
            }
        }
    }

    async fn hello(
        &mut self,
        session: Option<String>,
        token: Option<String>,
        ack: u64,
    ) -> Result<Option<Exit>, actix_ws::Closed> {
        if self.attached.is_some() {
            self.error(
                ErrorCode::BadFrame,
                "hello was already received on this connection",
            )
            .await?;
            return Ok(None);
        }
        let host = &self.node.host;
        let (id, token) = match session {
            None => {
                let (id, token, _) = host.create_session();
                (id, token)
            }
            Some(raw) => {
                let Some(id) = SessionId::parse(&raw) else {
                    return self.refuse(AttachError::NotFound).await;
                };
                let Some(token) = token else {
                    return self.refuse(AttachError::BadToken).await;
                };
                (id, token)
            }
        };
        for _ in 0..ATTACH_ATTEMPTS {
            let addr = host.session(&id);
            let msg = Attach {
                conn: self.conn.clone(),
                token: token.clone(),
                ack,
            };
            match addr.send(msg).await {
                Ok(Ok(welcome)) => {
                    self.attached = Some(addr);
                    send(&mut self.ws, &ServerMsg::Welcome(welcome)).await?;
                    return Ok(None);
                }
                Ok(Err(e)) => return self.refuse(e).await,
                // The actor stopped between lookup and attach (passivated): again.
                Err(_) => continue,
            }
        }
        self.refuse(AttachError::Unavailable(
            "session is restarting: retry".into(),
        ))
        .await
    }

    /// Answers a failed `hello` and closes as protocol.md says.
    async fn refuse(&mut self, e: AttachError) -> Result<Option<Exit>, actix_ws::Closed> {
        let (code, close) = match &e {
            AttachError::BadToken => (ErrorCode::BadToken, CloseCode::Policy),
            AttachError::NotFound => (ErrorCode::SessionNotFound, CloseCode::SessionNotFound),
            AttachError::Unavailable(_) => (ErrorCode::Unavailable, CloseCode::TryAgainLater),
            AttachError::Moved => (ErrorCode::Unavailable, CloseCode::Restart),
            AttachError::ShuttingDown => (ErrorCode::Unavailable, CloseCode::GoingAway),
            AttachError::Corrupt(_) => (ErrorCode::Internal, CloseCode::Internal),
        };
        let msg = e.to_string();
        self.error(code, msg.clone()).await?;
        Ok(Some(Exit::Close(close, msg)))
    }
}

fn protocol_exit(e: &ProtocolError) -> Exit {
    match e {
        ProtocolError::Overflow => Exit::Close(CloseCode::TooBig, "frame too large".into()),
        ProtocolError::Io(io) if io.to_string().contains("continuation size") => {
            Exit::Close(CloseCode::TooBig, "message too large".into())
        }
        other => {
            tracing::debug!(error = %other, "websocket protocol error");
            Exit::Gone
        }
    }
}

/// The demo page, embedded at build time.
const DEMO_PAGE: &str = include_str!("../static/index.html");

/// `GET /`: the demo page, with validators and a cache lifetime a proxy can use.
pub async fn demo_page(req: HttpRequest, node: web::Data<Node>) -> HttpResponse {
    let etag = &node.demo_etag;
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    resp.insert_header((header::ETAG, etag.as_str()))
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if fresh {
        resp.finish()
    } else {
        resp.content_type("text/html; charset=utf-8")
            .body(DEMO_PAGE)
    }
}

/// The ETag of the demo page: a hash of its bytes.
pub fn demo_etag() -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(DEMO_PAGE.as_bytes());
    format!(
        "\"{}\"",
        h.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}
