//! A client that behaves like a good mobile app, written from protocol.md:
//! it creates or resumes its session, reconnects with exponential backoff and
//! full jitter on any drop, re-sends an unanswered op with the same id,
//! retries `unavailable`/`rate_limited` answers with the same id, acknowledges
//! events, and obeys close codes (1012 reconnect now; 1001/1011/1013 back off;
//! 4000/4004/1008 stop). While it waits for an answer it probes the
//! connection with a WebSocket ping, so a connection whose far end vanished
//! (a killed container behind a proxy sends no FIN) is noticed in seconds and
//! resumed, while a slow answer on a live connection is simply waited for.
//! Usable on its own.

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
    /// Connect and handshake deadline, and the longest wait for one answer.
    pub read_timeout: Duration,
    /// Silence while an answer is due after which the client pings; silence
    /// for as long again after the ping means the connection is dead.
    pub probe_after: Duration,
    /// First backoff step.
    pub backoff_base: Duration,
    /// Largest backoff.
    pub backoff_cap: Duration,
    /// An op or reconnect slower than this is recorded as a stall.
    pub slow: Duration,
    /// `wss://`: how the server's certificate is checked.
    pub tls: TlsTrust,
}

impl ClientConfig {
    /// Defaults for `urls`.
    pub fn new(urls: Vec<String>) -> Self {
        ClientConfig {
            urls,
            source: None,
            read_timeout: Duration::from_secs(10),
            probe_after: Duration::from_secs(1),
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_secs(5),
            slow: Duration::from_millis(200),
            tls: TlsTrust::default(),
        }
    }
}

/// How a `wss://` client checks the server's certificate.
#[derive(Debug, Clone, Default)]
pub enum TlsTrust {
    /// The web PKI roots (webpki-roots).
    #[default]
    WebPki,
    /// Only the CA certificates of a PEM file (a private CA): see
    /// [`TlsTrust::ca_file`].
    Ca(std::sync::Arc<rustls::ClientConfig>),
    /// Any certificate (signatures are still checked): throw-away test
    /// deployments only.
    Insecure,
}

/// A CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// Not readable, or not PEM.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// PEM without a certificate.
    #[error("{0}: no certificate in the file")]
    Empty(String),
    /// A certificate rustls does not accept as a trust anchor.
    #[error("{path}: {source}")]
    Anchor {
        /// The file.
        path: String,
        /// Why.
        source: rustls::Error,
    },
}

impl TlsTrust {
    /// Trusts the certificates of the PEM file `path` (and nothing else).
    pub fn ca_file(path: &std::path::Path) -> Result<TlsTrust, CaFileError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let name = path.display().to_string();
        let read = |source| CaFileError::Read {
            path: name.clone(),
            source,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path).map_err(read)? {
            roots
                .add(cert.map_err(read)?)
                .map_err(|source| CaFileError::Anchor {
                    path: name.clone(),
                    source,
                })?;
        }
        if roots.is_empty() {
            return Err(CaFileError::Empty(name));
        }
        Ok(TlsTrust::Ca(std::sync::Arc::new(
            client_builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )))
    }

    /// The rustls settings (built once per kind and shared).
    fn config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        use std::sync::{Arc, OnceLock};
        static WEBPKI: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        static INSECURE: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        match self {
            TlsTrust::Ca(cfg) => cfg.clone(),
            TlsTrust::WebPki => WEBPKI
                .get_or_init(|| {
                    let roots = rustls::RootCertStore::from_iter(
                        webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
                    );
                    Arc::new(
                        client_builder()
                            .with_root_certificates(roots)
                            .with_no_client_auth(),
                    )
                })
                .clone(),
            TlsTrust::Insecure => INSECURE
                .get_or_init(|| {
                    Arc::new(
                        client_builder()
                            .dangerous()
                            .with_custom_certificate_verifier(Arc::new(AcceptAny(Arc::new(
                                rustls::crypto::ring::default_provider(),
                            ))))
                            .with_no_client_auth(),
                    )
                })
                .clone(),
        }
    }
}

fn client_builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
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

/// Percent-encodes a query value (everything but RFC 3986's unreserved
/// characters and `:`, which node ids use and queries allow).
fn query_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
    /// The node that answered the last `welcome` (the session's owner): a
    /// routing hint for the proxy on the next connect.
    owner: Option<String>,
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
            owner: None,
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

    /// The URL of the next connect: a resume says `?session=ID&node=OWNER`
    /// (design.md), so a proxy can send it straight to the session's owner.
    fn connect_url(&self) -> String {
        let base = self.url();
        let Some(session) = &self.session else {
            return base.to_owned();
        };
        let sep = if base.contains('?') { '&' } else { '?' };
        let mut url = format!("{base}{sep}session={}", query_escape(session));
        if let Some(node) = &self.owner {
            url.push_str("&node=");
            url.push_str(&query_escape(node));
        }
        url
    }

    /// Whether a connection is up.
    pub fn connected(&self) -> bool {
        self.ws.is_some()
    }

    fn count_error(&mut self, code: &str) {
        *self.stats.errors.entry(code.to_owned()).or_default() += 1;
    }

    async fn dial(&self) -> Result<Ws, String> {
        let url = self.connect_url();
        let (tls, rest) = match (url.strip_prefix("wss://"), url.strip_prefix("ws://")) {
            (Some(r), _) => (true, r),
            (None, Some(r)) => (false, r),
            _ => return Err(format!("{url}: not a ws:// or wss:// URL")),
        };
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
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
        let connector = tls.then(|| tokio_tungstenite::Connector::Rustls(self.cfg.tls.config()));
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
                    self.owner = w["node"].as_str().map(str::to_owned);
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

    /// Drops the connection without `bye` and moves to the next URL, as a
    /// phone that changes networks does; the next call resumes the session.
    pub async fn roam(&mut self) {
        if let Some(mut ws) = self.ws.take() {
            let _ = ws.close(None).await;
        }
        self.url_idx += 1;
    }

    /// The node that answered the last `welcome`.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
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
    /// After `probe_after` of silence it pings; a connection silent for as
    /// long again after the ping is dead. A live connection is waited on for
    /// `read_timeout` at most.
    async fn read_result(&mut self, id: u64) -> Result<Value, Option<u16>> {
        let give_up = tokio::time::Instant::now() + self.cfg.read_timeout;
        let mut probed = false;
        loop {
            let ws = self.ws.as_mut().ok_or(None)?;
            let wait = (tokio::time::Instant::now() + self.cfg.probe_after).min(give_up);
            let m = match tokio::time::timeout_at(wait, ws.next()).await {
                Err(_) if !probed && wait < give_up => {
                    probed = true;
                    if ws.send(Message::Ping(Default::default())).await.is_err() {
                        return Err(None);
                    }
                    continue;
                }
                Err(_) => {
                    self.count_error(if probed {
                        "client_probe_timeout"
                    } else {
                        "client_read_timeout"
                    });
                    return Err(None);
                }
                Ok(None) | Ok(Some(Err(_))) => return Err(None),
                Ok(Some(Ok(m))) => m,
            };
            // Any frame (a pong included) shows the connection is alive.
            probed = false;
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
    fn a_resume_carries_the_session_and_its_owner_for_the_proxy() {
        let mut c = MobileClient::new(ClientConfig::new(vec!["wss://edge:8443/ws".into()]), 0);
        assert_eq!(
            c.connect_url(),
            "wss://edge:8443/ws",
            "a new session has no hint"
        );
        c.session = Some("AbC-_1".into());
        assert_eq!(c.connect_url(), "wss://edge:8443/ws?session=AbC-_1");
        c.owner = Some("3f2a9c:8080".into());
        assert_eq!(
            c.connect_url(),
            "wss://edge:8443/ws?session=AbC-_1&node=3f2a9c:8080"
        );
        c.owner = Some("a b&c".into());
        assert!(c.connect_url().ends_with("&node=a%20b%26c"));
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_with_its_name() {
        let dir = std::env::temp_dir().join(format!("berth-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = TlsTrust::ca_file(&empty).unwrap_err();
        assert!(e.to_string().contains("empty.pem"), "{e}");
        let missing = dir.join("missing.pem");
        assert!(TlsTrust::ca_file(&missing)
            .unwrap_err()
            .to_string()
            .contains("missing.pem"));
        let _ = std::fs::remove_dir_all(dir);
    }

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
