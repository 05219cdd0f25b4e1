//! A client that behaves like a good mobile app, written from protocol.md:
//! it creates or resumes its session, reconnects with exponential backoff and
//! full jitter on any drop, re-sends an unanswered op with the same id,
//! retries `unavailable`/`rate_limited` answers with the same id, acknowledges
//! events, and obeys close codes (1012 reconnect now; 1001/1011/1013 back off;
//! 4000/4004/1008 stop). Usable on its own.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a client gave up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// Closed for good by the server (4000 taken over, 4004 unknown session, 1008 bad token).
    #[error("stopped by the server: {0}")]
    Terminal(String),
    /// The deadline passed before an answer.
    #[error("no answer before the deadline")]
    Deadline,
}

/// Counters of one client, merged into the run's result.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    /// Connections lost and made again.
    pub reconnects: u64,
    /// Resumes that found the session.
    pub resumes_ok: u64,
    /// Resumes refused.
    pub resumes_failed: u64,
    /// Error answers by code (`client_*` for client-side failures).
    pub errors: BTreeMap<String, u64>,
    /// Events skipped.
    pub event_gaps: u64,
    /// Events received twice.
    pub event_duplicates: u64,
    /// Events received.
    pub events: u64,
    /// New-session connect times, µs (a few samples per client: histograms
    /// are per run, not per client, to keep 100k clients small).
    pub connect_us: Vec<u64>,
    /// Resume times, µs.
    pub resume_us: Vec<u64>,
    /// Periods this client could not get an answer: (start, end) of every op
    /// or reconnect that took longer than `slow`.
    pub stalls: Vec<(Instant, Instant)>,
    /// Resumes whose `welcome` reported a `last_op` below the last
    /// acknowledged write (checked on every resume).
    pub resume_regressions: u64,
}

/// A new latency histogram (1 µs .. 10 min, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Settings of a client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// WebSocket URLs (`ws://host:port/ws`); reconnects rotate through them.
    pub urls: Vec<String>,
    /// Local address to connect from (spreads sockets over 127.0.0.x).
    pub source: Option<IpAddr>,
    /// A frame not answered within this is treated as a dead connection.
    pub read_timeout: Duration,
    /// First backoff step.
    pub backoff_base: Duration,
    /// Largest backoff.
    pub backoff_cap: Duration,
    /// An op or reconnect slower than this is recorded as a stall.
    pub slow: Duration,
    /// `wss://`: accept any server certificate (self-signed test deployments).
    pub insecure: bool,
}

impl ClientConfig {
    /// Defaults for `urls`.
    pub fn new(urls: Vec<String>) -> Self {
        ClientConfig {
            urls,
            source: None,
            read_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_secs(5),
            slow: Duration::from_millis(200),
            insecure: false,
        }
    }
}

/// TLS settings for `wss://`: the web PKI roots, or (insecure) any certificate.
fn tls_config(insecure: bool) -> std::sync::Arc<rustls::ClientConfig> {
    use std::sync::{Arc, OnceLock};
    static SECURE: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    static INSECURE: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let provider = || Arc::new(rustls::crypto::ring::default_provider());
    if insecure {
        INSECURE
            .get_or_init(|| {
                let cfg = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default versions")
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
                    .with_no_client_auth();
                Arc::new(cfg)
            })
            .clone()
    } else {
        SECURE
            .get_or_init(|| {
                let roots = rustls::RootCertStore::from_iter(
                    webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
                );
                let cfg = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Arc::new(cfg)
            })
            .clone()
    }
}

/// `--insecure`: accepts any server certificate (signatures are still checked).
#[derive(Debug)]
struct AcceptAny(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How a close code tells the client to behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnClose {
    /// Reconnect now (1012).
    Now,
    /// Reconnect with backoff (1001, 1011, 1013, drops).
    Backoff,
    /// Do not reconnect (1000, 1008, 4000, 4004).
    Stop,
}

/// protocol.md's close table.
pub fn on_close(code: Option<u16>) -> OnClose {
    match code {
        Some(1012) => OnClose::Now,
        Some(1000) | Some(1008) | Some(4000) | Some(4004) => OnClose::Stop,
        _ => OnClose::Backoff,
    }
}

/// Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^attempt)].
pub fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(if ms == 0 {
        0
    } else {
        rand::rng().random_range(0..=ms)
    })
}

/// One virtual mobile client.
pub struct MobileClient {
    cfg: ClientConfig,
    url_idx: usize,
    ws: Option<Ws>,
    /// Session id, once welcomed.
    pub session: Option<String>,
    token: Option<String>,
    /// Next op id.
    pub next_id: u64,
    /// Highest event seq received.
    pub last_seq: u64,
    acked_seq: u64,
    /// Event bodies received, in order (scenarios read them).
    pub received: Vec<(u64, Value)>,
    /// Counters.
    pub stats: ClientStats,
    /// Set once the server told us to stop.
    pub stopped: Option<String>,
    /// Id of the last state-changing op that was acknowledged (set by the
    /// scenario): a resume whose `welcome.last_op` is below it lost that op.
    pub last_acked_write: u64,
}

impl MobileClient {
    /// A client; `first_url` picks where it starts.
    pub fn new(cfg: ClientConfig, first_url: usize) -> Self {
        MobileClient {
            url_idx: first_url,
            cfg,
            ws: None,
            session: None,
            token: None,
            next_id: 1,
            last_seq: 0,
            acked_seq: 0,
            received: Vec::new(),
            stats: ClientStats::default(),
            stopped: None,
            last_acked_write: 0,
        }
    }

    fn url(&self) -> &str {
        &self.cfg.urls[self.url_idx % self.cfg.urls.len()]
    }

    /// Whether a connection is up.
    pub fn connected(&self) -> bool {
        self.ws.is_some()
    }

    fn count_error(&mut self, code: &str) {
        *self.stats.errors.entry(code.to_owned()).or_default() += 1;
    }

    async fn dial(&self) -> Result<Ws, String> {
        let url = self.url().to_owned();
        let (tls, rest) = match (url.strip_prefix("wss://"), url.strip_prefix("ws://")) {
            (Some(r), _) => (true, r),
            (None, Some(r)) => (false, r),
            _ => return Err(format!("{url}: not a ws:// or wss:// URL")),
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let host = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:{}", if tls { 443 } else { 80 })
        };
        let addr: SocketAddr = tokio::net::lookup_host(&host)
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        if let Some(ip) = self.cfg.source {
            sock.bind(SocketAddr::new(ip, 0))
                .map_err(|e| e.to_string())?;
        }
        let stream = tokio::time::timeout(self.cfg.read_timeout, sock.connect(addr))
            .await
            .map_err(|_| "connect timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        // Small buffers: tungstenite's default 128 KiB read buffer per
        // connection would make 100k virtual clients cost 12 GiB.
        let wscfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let connector =
            tls.then(|| tokio_tungstenite::Connector::Rustls(tls_config(self.cfg.insecure)));
        let (ws, _) = tokio::time::timeout(
            self.cfg.read_timeout,
            tokio_tungstenite::client_async_tls_with_config(url, stream, Some(wscfg), connector),
        )
        .await
        .map_err(|_| "handshake timeout".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(ws)
    }

    /// Connects and says `hello`: creates the session the first time, resumes
    /// it afterwards (with `ack` = the highest event received). Retries with
    /// backoff until `deadline`.
    pub async fn ensure_connected(&mut self, deadline: Instant) -> Result<(), ClientError> {
        let mut attempt = 0u32;
        let began = Instant::now();
        while self.ws.is_none() {
            if let Some(why) = &self.stopped {
                return Err(ClientError::Terminal(why.clone()));
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Deadline);
            }
            let t = Instant::now();
            let mut ws = match self.dial().await {
                Ok(ws) => ws,
                Err(_) => {
                    self.count_error("client_connect");
                    self.url_idx += 1;
                    tokio::time::sleep(backoff(
                        self.cfg.backoff_base,
                        self.cfg.backoff_cap,
                        attempt,
                    ))
                    .await;
                    attempt += 1;
                    continue;
                }
            };
            let hello = json!({"type":"hello","session":self.session,"token":self.token,"ack":self.last_seq});
            let welcome = async {
                ws.send(Message::text(hello.to_string())).await.ok()?;
                loop {
                    match tokio::time::timeout(self.cfg.read_timeout, ws.next())
                        .await
                        .ok()??
                    {
                        Ok(Message::Text(t)) => return serde_json::from_str::<Value>(&t).ok(),
                        Ok(Message::Close(f)) => {
                            return Some(
                                json!({"type":"closed","code": f.map(|f| u16::from(f.code))}),
                            )
                        }
                        Ok(_) => continue,
                        Err(_) => return None,
                    }
                }
            }
            .await;
            let resuming = self.session.is_some();
            match welcome {
                Some(w) if w["type"] == "welcome" => {
                    let us = t.elapsed().as_micros().max(1) as u64;
                    if resuming {
                        self.stats.resumes_ok += 1;
                        self.stats.resume_us.push(us);
                        if w["last_op"].as_u64().unwrap_or(0) < self.last_acked_write {
                            self.stats.resume_regressions += 1;
                        }
                    } else {
                        self.stats.connect_us.push(us);
                        self.session = w["session"].as_str().map(str::to_owned);
                        self.token = w["token"].as_str().map(str::to_owned);
                    }
                    self.ws = Some(ws);
                }
                Some(w) if w["type"] == "error" => {
                    let code = w["code"].as_str().unwrap_or("unknown").to_owned();
                    self.count_error(&code);
                    match code.as_str() {
                        "session_not_found" | "bad_token" => {
                            if resuming {
                                self.stats.resumes_failed += 1;
                            }
                            self.stopped = Some(code.clone());
                            return Err(ClientError::Terminal(code));
                        }
                        _ => {
                            tokio::time::sleep(backoff(
                                self.cfg.backoff_base,
                                self.cfg.backoff_cap,
                                attempt,
                            ))
                            .await;
                            attempt += 1;
                        }
                    }
                }
                _ => {
                    self.count_error("client_hello");
                    self.url_idx += 1;
                    tokio::time::sleep(backoff(
                        self.cfg.backoff_base,
                        self.cfg.backoff_cap,
                        attempt,
                    ))
                    .await;
                    attempt += 1;
                }
            }
        }
        if began.elapsed() > self.cfg.slow {
            self.stats.stalls.push((began, Instant::now()));
        }
        Ok(())
    }

    /// The connection dropped or closed with `code`: forget it and wait as the
    /// code says before the next connect.
    async fn lost(&mut self, code: Option<u16>) {
        self.ws = None;
        self.stats.reconnects += 1;
        match on_close(code) {
            OnClose::Now => {}
            OnClose::Backoff => {
                self.url_idx += 1;
                tokio::time::sleep(backoff(self.cfg.backoff_base, self.cfg.backoff_cap, 1)).await;
            }
            OnClose::Stop => {
                let why = format!("close {}", code.unwrap_or(0));
                self.stopped = Some(why);
            }
        }
    }

    fn on_event(&mut self, seq: u64, body: Value) {
        self.stats.events += 1;
        if seq <= self.last_seq {
            self.stats.event_duplicates += 1;
            return;
        }
        if seq > self.last_seq + 1 {
            self.stats.event_gaps += seq - self.last_seq - 1;
        }
        self.last_seq = seq;
        self.received.push((seq, body));
    }

    /// Reads frames until the result of op `id` (events on the way are recorded).
    async fn read_result(&mut self, id: u64) -> Result<Value, Option<u16>> {
        loop {
            let ws = self.ws.as_mut().ok_or(None)?;
            let m = match tokio::time::timeout(self.cfg.read_timeout, ws.next()).await {
                Err(_) | Ok(None) | Ok(Some(Err(_))) => return Err(None),
                Ok(Some(Ok(m))) => m,
            };
            match m {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("result") if v["id"] == id => return Ok(v),
                        Some("event") => {
                            let seq = v["seq"].as_u64().unwrap_or(0);
                            self.on_event(seq, v["body"].clone());
                        }
                        _ => {}
                    }
                }
                Message::Close(f) => {
                    return Err(f
                        .map(|f| u16::from(f.code))
                        .or(Some(u16::from(WsCloseCode::Abnormal))))
                }
                _ => {}
            }
        }
    }

    /// Sends an ack for the events received so far, if any are new.
    pub async fn ack(&mut self) {
        if self.last_seq > self.acked_seq {
            if let Some(ws) = self.ws.as_mut() {
                if ws
                    .send(Message::text(
                        json!({"type":"ack","seq":self.last_seq}).to_string(),
                    ))
                    .await
                    .is_ok()
                {
                    self.acked_seq = self.last_seq;
                }
            }
        }
    }

    /// Runs op `op` with the next id until it is answered (re-sent with the same
    /// id across reconnects and `unavailable`/`rate_limited` answers), or until
    /// `deadline`. Answers the `result` frame.
    pub async fn call(
        &mut self,
        op: &str,
        args: Value,
        deadline: Instant,
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        let frame = json!({"type":"op","id":id,"op":op,"args":args}).to_string();
        let started = Instant::now();
        let mut attempt = 0u32;
        let result = loop {
            self.ensure_connected(deadline).await?;
            self.ack().await;
            let sent = self
                .ws
                .as_mut()
                .expect("connected")
                .send(Message::text(frame.clone()))
                .await;
            if sent.is_err() {
                self.lost(None).await;
                continue;
            }
            match self.read_result(id).await {
                Ok(v) => {
                    let code = v["error"]["code"].as_str().map(str::to_owned);
                    match code.as_deref() {
                        Some(c @ ("unavailable" | "rate_limited")) => {
                            // Not applied: retry the same id after a pause.
                            self.count_error(c);
                            if Instant::now() >= deadline {
                                break Err(ClientError::Deadline);
                            }
                            tokio::time::sleep(backoff(
                                self.cfg.backoff_base,
                                self.cfg.backoff_cap,
                                attempt,
                            ))
                            .await;
                            attempt += 1;
                        }
                        Some(c) => {
                            self.count_error(c);
                            break Ok(v);
                        }
                        None => break Ok(v),
                    }
                }
                Err(code) => {
                    self.lost(code).await;
                    if let Some(why) = &self.stopped {
                        break Err(ClientError::Terminal(why.clone()));
                    }
                }
            }
        };
        if started.elapsed() > self.cfg.slow {
            self.stats.stalls.push((started, Instant::now()));
        }
        if result.is_ok() {
            self.next_id += 1;
        }
        result
    }

    /// Reads (and records) whatever events arrive within `for_`.
    pub async fn drain_events(&mut self, for_: Duration) {
        let end = tokio::time::Instant::now() + for_;
        while let Some(ws) = self.ws.as_mut() {
            match tokio::time::timeout_at(end, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or_default();
                    if v["type"] == "event" {
                        self.on_event(v["seq"].as_u64().unwrap_or(0), v["body"].clone());
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(_) => {
                    self.ws = None;
                    break;
                }
                Err(_) => break,
            }
        }
        self.ack().await;
    }

    /// Closes the connection without ending the session.
    pub async fn disconnect(&mut self) {
        if let Some(mut ws) = self.ws.take() {
            let _ = ws.close(None).await;
        }
    }

    /// Waits on an open connection (answering pings) for `for_`; reconnects if it drops.
    pub async fn hold(&mut self, for_: Duration, deadline: Instant) -> Result<(), ClientError> {
        let end = Instant::now() + for_;
        while Instant::now() < end {
            self.ensure_connected(deadline).await?;
            let ws = self.ws.as_mut().expect("connected");
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, ws.next()).await {
                Err(_) => break,
                Ok(Some(Ok(Message::Close(f)))) => self.lost(f.map(|f| u16::from(f.code))).await,
                Ok(Some(Ok(_))) => {}
                Ok(_) => self.lost(None).await,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_the_protocol_table() {
        assert_eq!(on_close(Some(1012)), OnClose::Now);
        for c in [1001, 1011, 1013, 1006] {
            assert_eq!(on_close(Some(c)), OnClose::Backoff, "{c}");
        }
        assert_eq!(on_close(None), OnClose::Backoff);
        for c in [1000, 1008, 4000, 4004] {
            assert_eq!(on_close(Some(c)), OnClose::Stop, "{c}");
        }
    }

    #[test]
    fn backoff_is_full_jitter_below_the_capped_exponential() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..20 {
            let ceiling = (base * 2u32.pow(attempt.min(16))).min(cap);
            for _ in 0..50 {
                assert!(backoff(base, cap, attempt) <= ceiling);
            }
        }
        // Jitter: not always the same value.
        let draws: std::collections::BTreeSet<_> = (0..50).map(|_| backoff(base, cap, 5)).collect();
        assert!(draws.len() > 5);
    }

    #[test]
    fn events_count_gaps_and_duplicates() {
        let mut c = MobileClient::new(ClientConfig::new(vec!["ws://127.0.0.1:1/ws".into()]), 0);
        c.on_event(1, json!(1));
        c.on_event(2, json!(2));
        c.on_event(2, json!(2));
        c.on_event(5, json!(5));
        assert_eq!(
            (c.stats.event_duplicates, c.stats.event_gaps, c.last_seq),
            (1, 2, 5)
        );
        assert_eq!(c.received.len(), 3);
    }
}
