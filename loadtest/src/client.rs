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

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a client gave up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// Closed for good by the server (4000 taken over, 4004 unknown session, 1008 bad token).
    #[error("stopped by the server: {0}")]
    Terminal(Stop),
    /// The deadline passed before an answer.
    #[error("no answer before the deadline")]
    Deadline,
}

/// Why the server told a client to stop: protocol.md says not to reconnect
/// (or not with the same credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Closed with a code that says not to reconnect (1000, 1008, 4000, 4004).
    Close(u16),
    /// `hello` refused with `session_not_found`.
    SessionNotFound,
    /// `hello` refused with `bad_token`.
    BadToken,
}

impl Stop {
    /// The stop that a refusal of `hello` with error `code` means, if it
    /// means one (other refusals are retried).
    pub fn of_refusal(code: &str) -> Option<Stop> {
        match code {
            "session_not_found" => Some(Stop::SessionNotFound),
            "bad_token" => Some(Stop::BadToken),
            _ => None,
        }
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Close(code) => write!(f, "close {code}"),
            Stop::SessionNotFound => f.write_str("session_not_found"),
            Stop::BadToken => f.write_str("bad_token"),
        }
    }
}

/// How a client's last connection, or its last attempt at one, ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnEnd {
    /// The server's close frame (1006 when the frame had no code).
    Closed {
        /// The close code.
        code: u16,
        /// The close reason (may be empty).
        reason: String,
    },
    /// The server answered `hello` with an `error` frame.
    Refused {
        /// Its error code (`session_not_found`, `bad_token`, `unavailable`, ...).
        code: String,
    },
    /// Lost without a close frame: reset, end of stream, a failed send, or
    /// no answer to a probe or within the read timeout.
    Dropped,
    /// No connection: the connect, TLS or WebSocket handshake failed, or
    /// `hello` had no answer.
    Unreachable,
}

impl ConnEnd {
    /// The end a close frame says (`None`: a close frame without a code).
    fn closed(frame: Option<CloseFrame>) -> ConnEnd {
        match frame {
            Some(f) => ConnEnd::Closed {
                code: u16::from(f.code),
                reason: f.reason.to_string(),
            },
            None => ConnEnd::Closed {
                code: u16::from(WsCloseCode::Abnormal),
                reason: String::new(),
            },
        }
    }

    /// The close code, if the server sent one.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ConnEnd::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for ConnEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnEnd::Closed { code, reason } if reason.is_empty() => write!(f, "close {code}"),
            ConnEnd::Closed { code, reason } => write!(f, "close {code} {reason:?}"),
            ConnEnd::Refused { code } => write!(f, "hello refused: {code}"),
            ConnEnd::Dropped => f.write_str("dropped without a close frame"),
            ConnEnd::Unreachable => f.write_str("unreachable"),
        }
    }
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
    /// The first [`REGRESSIONS_KEPT`] of them: when, and what the welcome
    /// said.
    pub regressions: Vec<(Instant, String)>,
}

/// Resume regressions a client describes at most (it counts them all).
pub const REGRESSIONS_KEPT: usize = 4;

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
    /// A JWT sent as `hello.credential` on every connect (the first and
    /// every resume: a session bound to a user resumes only with a
    /// credential of the same subject). `None`: no credential.
    pub credential: Option<String>,
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
            credential: None,
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

/// What came back for `hello`.
enum HelloAnswer {
    /// A text frame (`welcome` or `error`).
    Frame(Value),
    /// A close frame.
    Closed(ConnEnd),
    /// Nothing: the send failed, or the connection dropped or stayed silent.
    Nothing,
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
    /// Events received, in order (scenarios read them, and may take them).
    pub received: Vec<Received>,
    /// Counters.
    pub stats: ClientStats,
    /// Set once the server told us to stop.
    pub stopped: Option<Stop>,
    /// Id of the last state-changing op that was acknowledged (set by the
    /// scenario): a resume whose `welcome.last_op` is below it lost that op.
    pub last_acked_write: u64,
    /// How the last connection that ended (or the last failed attempt at
    /// one) ended, even if a later one is up; `None` if none has.
    pub last_end: Option<ConnEnd>,
    /// The session's `version` in the last `welcome` or `result` received.
    pub last_version: u64,
    /// The latest [`TRAIL`] things that happened to its connections, when
    /// (welcomes, failed connects, losses and their closes, drops and roams
    /// on purpose): what a problem report shows.
    pub trail: VecDeque<(Instant, String)>,
}

/// An event as the client received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// Its `seq`.
    pub seq: u64,
    /// Its `body`.
    pub body: Value,
    /// When its frame was read (delivery latencies are measured to it).
    pub at: Instant,
}

/// Entries a client's [`MobileClient::trail`] keeps.
pub const TRAIL: usize = 24;

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
            last_end: None,
            last_version: 0,
            trail: VecDeque::new(),
        }
    }

    /// A new client for this client's session, on a fresh connection: the
    /// same URLs and TLS settings, and it resumes (`hello` with the session
    /// id, token and `ack`, the `?session=&node=` hints in the URL) where
    /// this one is, going on from the same op id, with counters of its own
    /// and no stop. `None` before the first `welcome`: there is no session
    /// to resume.
    pub fn fresh_resume(&self) -> Option<MobileClient> {
        self.session.as_ref()?;
        Some(MobileClient {
            cfg: self.cfg.clone(),
            url_idx: self.url_idx,
            ws: None,
            session: self.session.clone(),
            token: self.token.clone(),
            owner: self.owner.clone(),
            next_id: self.next_id,
            last_seq: self.last_seq,
            acked_seq: self.acked_seq,
            received: Vec::new(),
            stats: ClientStats::default(),
            stopped: None,
            last_acked_write: self.last_acked_write,
            last_end: None,
            last_version: self.last_version,
            trail: VecDeque::new(),
        })
    }

    fn url(&self) -> &str {
        &self.cfg.urls[self.url_idx % self.cfg.urls.len()]
    }

    /// The `host:port` of the current URL.
    fn authority(&self) -> &str {
        let url = self.url();
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        rest.split(['/', '?']).next().unwrap_or(rest)
    }

    /// Adds `what` to the trail, now.
    fn note(&mut self, what: String) {
        if self.trail.len() == TRAIL {
            self.trail.pop_front();
        }
        self.trail.push_back((Instant::now(), what));
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

    /// How many URLs it has.
    pub fn url_count(&self) -> usize {
        self.cfg.urls.len()
    }

    /// Moves to the URL `n` places on: the next connect goes there.
    pub fn skip_urls(&mut self, n: usize) {
        self.url_idx += n;
    }

    /// The `host:port` the next connect goes to.
    pub fn next_authority(&self) -> &str {
        self.authority()
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
            if let Some(why) = self.stopped {
                return Err(ClientError::Terminal(why));
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Deadline);
            }
            let t = Instant::now();
            let mut ws = match self.dial().await {
                Ok(ws) => ws,
                Err(e) => {
                    self.count_error("client_connect");
                    self.note(format!("connect to {} failed: {e}", self.authority()));
                    self.last_end = Some(ConnEnd::Unreachable);
                    self.url_idx += 1;
                    self.pause(&mut attempt).await;
                    continue;
                }
            };
            let resuming = self.session.is_some();
            match self.hello(&mut ws).await {
                HelloAnswer::Frame(w) if w["type"] == "welcome" => {
                    let us = t.elapsed().as_micros().max(1) as u64;
                    self.owner = w["node"].as_str().map(str::to_owned);
                    self.saw_version(&w);
                    self.note(format!(
                        "welcome on {} from {} ({}, last_op {})",
                        self.authority(),
                        self.owner().unwrap_or("?"),
                        if resuming { "resumed" } else { "new" },
                        w["last_op"]
                    ));
                    if resuming {
                        self.stats.resumes_ok += 1;
                        self.stats.resume_us.push(us);
                        let last_op = w["last_op"].as_u64().unwrap_or(0);
                        if last_op < self.last_acked_write {
                            self.stats.resume_regressions += 1;
                            let what = format!(
                                "welcome on {} from {} says last_op {last_op}, below the last \
                                 acknowledged write {} (version {})",
                                self.authority(),
                                self.owner().unwrap_or("?"),
                                self.last_acked_write,
                                w["version"]
                            );
                            if self.stats.regressions.len() < REGRESSIONS_KEPT {
                                self.stats.regressions.push((Instant::now(), what.clone()));
                            }
                            self.note(what);
                        }
                    } else {
                        self.stats.connect_us.push(us);
                        self.session = w["session"].as_str().map(str::to_owned);
                        self.token = w["token"].as_str().map(str::to_owned);
                    }
                    self.ws = Some(ws);
                }
                HelloAnswer::Frame(w) if w["type"] == "error" => {
                    let code = w["code"].as_str().unwrap_or("unknown").to_owned();
                    self.count_error(&code);
                    self.note(format!("hello on {} refused: {code}", self.authority()));
                    self.stopped = Stop::of_refusal(&code);
                    self.last_end = Some(ConnEnd::Refused { code });
                    if self.stopped.is_some() {
                        if resuming {
                            self.stats.resumes_failed += 1;
                        }
                    } else {
                        self.pause(&mut attempt).await;
                    }
                }
                answer => {
                    self.count_error("client_hello");
                    let end = match answer {
                        HelloAnswer::Closed(end) => end,
                        _ => ConnEnd::Unreachable,
                    };
                    self.note(format!("hello on {}: {end}", self.authority()));
                    if self.ended(end) == OnClose::Stop {
                        if resuming {
                            self.stats.resumes_failed += 1;
                        }
                    } else {
                        self.url_idx += 1;
                        self.pause(&mut attempt).await;
                    }
                }
            }
        }
        if began.elapsed() > self.cfg.slow {
            self.stats.stalls.push((began, Instant::now()));
        }
        Ok(())
    }

    /// Says `hello` on a new connection and reads the answer.
    async fn hello(&self, ws: &mut Ws) -> HelloAnswer {
        let mut hello =
            json!({"type":"hello","session":self.session,"token":self.token,"ack":self.last_seq});
        if let Some(credential) = &self.cfg.credential {
            hello["credential"] = json!(credential);
        }
        if ws.send(Message::text(hello.to_string())).await.is_err() {
            return HelloAnswer::Nothing;
        }
        loop {
            match tokio::time::timeout(self.cfg.read_timeout, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    return serde_json::from_str(&t)
                        .map_or(HelloAnswer::Nothing, HelloAnswer::Frame)
                }
                Ok(Some(Ok(Message::Close(f)))) => return HelloAnswer::Closed(ConnEnd::closed(f)),
                Ok(Some(Ok(_))) => continue,
                _ => return HelloAnswer::Nothing,
            }
        }
    }

    /// Sleeps the backoff of retry `attempt`, then counts it.
    async fn pause(&self, attempt: &mut u32) {
        tokio::time::sleep(backoff(
            self.cfg.backoff_base,
            self.cfg.backoff_cap,
            *attempt,
        ))
        .await;
        *attempt += 1;
    }

    /// Notes the session `version` a `welcome` or `result` frame carries.
    fn saw_version(&mut self, frame: &Value) {
        if let Some(v) = frame["version"].as_u64() {
            self.last_version = v;
        }
    }

    /// Drops the connection without `bye` and moves to the next URL, as a
    /// phone that changes networks does; the next call resumes the session.
    pub async fn roam(&mut self) {
        if let Some(mut ws) = self.ws.take() {
            self.note(format!("roamed away from {}", self.authority()));
            let _ = ws.close(None).await;
        }
        self.url_idx += 1;
    }

    /// The node that answered the last `welcome`.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// Records how a connection ended and answers what that tells the
    /// client to do; a close code that says not to reconnect stops it.
    fn ended(&mut self, end: ConnEnd) -> OnClose {
        let code = end.close_code();
        let then = on_close(code);
        if let (OnClose::Stop, Some(code)) = (then, code) {
            self.stopped = Some(Stop::Close(code));
        }
        self.last_end = Some(end);
        then
    }

    /// The connection ended as `end` says: forget it and wait as its close
    /// code says before the next connect.
    async fn lost(&mut self, end: ConnEnd) {
        self.ws = None;
        self.note(format!("lost on {}: {end}", self.authority()));
        self.stats.reconnects += 1;
        if self.ended(end) == OnClose::Backoff {
            self.url_idx += 1;
            tokio::time::sleep(backoff(self.cfg.backoff_base, self.cfg.backoff_cap, 1)).await;
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
        self.received.push(Received {
            seq,
            body,
            at: Instant::now(),
        });
    }

    /// Reads frames until the result of op `id` (events on the way are recorded).
    /// After `probe_after` of silence it pings; a connection silent for as
    /// long again after the ping is dead. A live connection is waited on for
    /// `read_timeout` at most. Fails with how the connection ended.
    async fn read_result(&mut self, id: u64) -> Result<Value, ConnEnd> {
        let give_up = tokio::time::Instant::now() + self.cfg.read_timeout;
        let mut probed = false;
        loop {
            let ws = self.ws.as_mut().ok_or(ConnEnd::Dropped)?;
            let wait = (tokio::time::Instant::now() + self.cfg.probe_after).min(give_up);
            let m = match tokio::time::timeout_at(wait, ws.next()).await {
                Err(_) if !probed && wait < give_up => {
                    probed = true;
                    if ws.send(Message::Ping(Default::default())).await.is_err() {
                        return Err(ConnEnd::Dropped);
                    }
                    continue;
                }
                Err(_) => {
                    self.count_error(if probed {
                        "client_probe_timeout"
                    } else {
                        "client_read_timeout"
                    });
                    return Err(ConnEnd::Dropped);
                }
                Ok(None) | Ok(Some(Err(_))) => return Err(ConnEnd::Dropped),
                Ok(Some(Ok(m))) => m,
            };
            // Any frame (a pong included) shows the connection is alive.
            probed = false;
            match m {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("result") if v["id"] == id => {
                            self.saw_version(&v);
                            return Ok(v);
                        }
                        Some("event") => {
                            let seq = v["seq"].as_u64().unwrap_or(0);
                            self.on_event(seq, v["body"].clone());
                        }
                        _ => {}
                    }
                }
                Message::Close(f) => return Err(ConnEnd::closed(f)),
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
    /// `deadline`. Answers the `result` frame. The id is used up either way:
    /// an op that got no answer may have been applied, so no later op may
    /// reuse its id (the server would answer that op's stored result).
    pub async fn call(
        &mut self,
        op: &str,
        args: Value,
        deadline: Instant,
    ) -> Result<Value, ClientError> {
        let id = self.take_id();
        self.run_op(id, op, args, None, deadline).await
    }

    /// Like [`MobileClient::call`], but the connection is lost with the op in
    /// flight, as when a phone loses its network just after sending: the op
    /// is sent, then the connection is dropped at once without a close frame
    /// (`roam`: closed, and the next connect goes to the next URL), so its
    /// answer cannot arrive; the session is resumed and the op re-sent with
    /// the same id, which the server applies at most once.
    pub async fn call_cut(
        &mut self,
        op: &str,
        args: Value,
        roam: bool,
        deadline: Instant,
    ) -> Result<Value, ClientError> {
        let id = self.take_id();
        self.run_op(id, op, args, Some(roam), deadline).await
    }

    /// Sends op `id` again, an id this client has used already (as an app
    /// does that is not sure the answer arrived), and retries it like
    /// [`MobileClient::call`]. The server must not apply it again: protocol.md
    /// answers a retried id with `duplicate: true` (and the stored result if
    /// it is the latest op).
    pub async fn resend(
        &mut self,
        id: u64,
        op: &str,
        args: Value,
        deadline: Instant,
    ) -> Result<Value, ClientError> {
        debug_assert!(id < self.next_id, "op {id} was never sent");
        self.run_op(id, op, args, None, deadline).await
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends op `id` until it is answered (see [`MobileClient::call`]);
    /// `cut`: drop the connection right after the first send (see
    /// [`MobileClient::call_cut`]).
    async fn run_op(
        &mut self,
        id: u64,
        op: &str,
        args: Value,
        mut cut: Option<bool>,
        deadline: Instant,
    ) -> Result<Value, ClientError> {
        let frame = json!({"type":"op","id":id,"op":op,"args":args}).to_string();
        let started = Instant::now();
        let mut attempt = 0u32;
        let result = loop {
            if let Err(e) = self.ensure_connected(deadline).await {
                break Err(e);
            }
            self.ack().await;
            let sent = self
                .ws
                .as_mut()
                .expect("connected")
                .send(Message::text(frame.clone()))
                .await;
            if sent.is_err() {
                self.lost(ConnEnd::Dropped).await;
                continue;
            }
            if let Some(roam) = cut.take() {
                self.note(format!(
                    "op {id} sent on {}, then cut off",
                    self.authority()
                ));
                if roam {
                    self.roam().await;
                } else {
                    self.drop_connection();
                }
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
                            self.pause(&mut attempt).await;
                        }
                        Some(c) => {
                            self.count_error(c);
                            break Ok(v);
                        }
                        None => break Ok(v),
                    }
                }
                Err(end) => {
                    self.lost(end).await;
                    if let Some(why) = self.stopped {
                        break Err(ClientError::Terminal(why));
                    }
                }
            }
        };
        if started.elapsed() > self.cfg.slow {
            self.stats.stalls.push((started, Instant::now()));
        }
        result
    }

    /// Reads (and records) whatever events arrive within `for_`. A close on
    /// the way is obeyed as on any other read (a stop code stops the client).
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
                Ok(Some(Ok(Message::Close(f)))) => {
                    self.lost(ConnEnd::closed(f)).await;
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(_) => {
                    self.lost(ConnEnd::Dropped).await;
                    break;
                }
                Err(_) => break,
            }
        }
        self.ack().await;
    }

    /// Drops the connection without a close frame (the socket is closed), as
    /// a phone that loses its network does; the next call resumes the
    /// session on the same URL.
    pub fn drop_connection(&mut self) {
        if self.ws.take().is_some() {
            self.note(format!("dropped on {}", self.authority()));
        }
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
                Ok(Some(Ok(Message::Close(f)))) => self.lost(ConnEnd::closed(f)).await,
                Ok(Some(Ok(_))) => {}
                Ok(_) => self.lost(ConnEnd::Dropped).await,
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
    fn a_close_that_says_stop_stops_the_client_and_is_kept() {
        let mut c = MobileClient::new(ClientConfig::new(vec!["ws://127.0.0.1:1/ws".into()]), 0);
        assert_eq!(c.ended(ConnEnd::Dropped), OnClose::Backoff);
        assert_eq!(
            (c.stopped, c.last_end.clone()),
            (None, Some(ConnEnd::Dropped))
        );
        let restart = ConnEnd::Closed {
            code: 1012,
            reason: "node draining: resume".into(),
        };
        assert_eq!(c.ended(restart.clone()), OnClose::Now);
        assert_eq!((c.stopped, c.last_end.clone()), (None, Some(restart)));
        let taken = ConnEnd::Closed {
            code: 4000,
            reason: "taken over".into(),
        };
        assert_eq!(c.ended(taken.clone()), OnClose::Stop);
        assert_eq!(c.stopped, Some(Stop::Close(4000)));
        assert_eq!(c.last_end, Some(taken));
    }

    #[test]
    fn only_unknown_session_and_bad_token_refusals_stop() {
        assert_eq!(
            Stop::of_refusal("session_not_found"),
            Some(Stop::SessionNotFound)
        );
        assert_eq!(Stop::of_refusal("bad_token"), Some(Stop::BadToken));
        for code in ["unavailable", "bad_origin", "hello_required", "unknown"] {
            assert_eq!(Stop::of_refusal(code), None, "{code}");
        }
    }

    #[test]
    fn connection_ends_name_their_code_and_reason() {
        assert_eq!(
            ConnEnd::closed(None),
            ConnEnd::Closed {
                code: 1006,
                reason: String::new()
            }
        );
        let taken = ConnEnd::closed(Some(CloseFrame {
            code: WsCloseCode::from(4000),
            reason: "taken over".into(),
        }));
        assert_eq!(taken.close_code(), Some(4000));
        assert_eq!(taken.to_string(), "close 4000 \"taken over\"");
        assert_eq!(ConnEnd::closed(None).to_string(), "close 1006");
        assert_eq!(ConnEnd::Dropped.close_code(), None);
        assert_eq!(
            ConnEnd::Refused {
                code: "bad_token".into()
            }
            .to_string(),
            "hello refused: bad_token"
        );
    }

    #[test]
    fn a_fresh_resume_goes_on_where_the_client_is_without_its_stop() {
        let mut c = MobileClient::new(ClientConfig::new(vec!["ws://edge/ws".into()]), 0);
        assert!(c.fresh_resume().is_none(), "no session yet");
        c.session = Some("s1".into());
        c.token = Some("t1".into());
        c.owner = Some("n1".into());
        c.next_id = 7;
        c.last_seq = 3;
        c.last_version = 9;
        c.stopped = Some(Stop::Close(4000));
        c.last_end = Some(ConnEnd::Dropped);
        c.stats.reconnects = 2;
        let f = c.fresh_resume().unwrap();
        assert_eq!(f.connect_url(), "ws://edge/ws?session=s1&node=n1");
        assert_eq!(
            (f.token.as_deref(), f.next_id, f.last_seq, f.last_version),
            (Some("t1"), 7, 3, 9)
        );
        assert_eq!((f.stopped, f.last_end.clone()), (None, None));
        assert_eq!(f.stats.reconnects, 0);
        assert!(!f.connected());
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
