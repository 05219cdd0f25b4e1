//! Peer links: authenticated, multiplexed node-to-node connections.
//!
//! One TCP connection carries any number of concurrent requests in both
//! directions, plus one-way pushes, as length-delimited frames (4-byte big
//! endian length, at most [`MAX_FRAME`]) whose body is a bincode 2.0.1
//! [`Frame`]. What a request or push *means* is the caller's business: bodies
//! are opaque bytes here, so this module knows nothing of sessions.
//!
//! # Transport
//! Plain TCP, or TLS 1.3 with mutual certificate verification against the
//! cluster CA when the node has a [`PeerTls`] ([`crate::tls`]); the handshake
//! below runs inside the TLS session. Both ends of a link must agree: a TLS
//! dialer meeting a plain listener (or the reverse) fails the handshake with
//! [`PeerError::Tls`].
//!
//! # Handshake (mutual, HMAC-SHA256 over the cluster secret)
//! ```text
//! dialer   -> listener : Hello { id, nonce_d, contract_d }
//! listener -> dialer   : Challenge { id, nonce_l, contract_l,
//!                          mac_l = HMAC(secret, "berth-peer-l" | nonce_d | nonce_l | id_l | contract_l) }
//! dialer   -> listener : Proof { mac_d = HMAC(secret, "berth-peer-d" | nonce_l | nonce_d | id_d | contract_d) }
//! ```
//! Each side checks the other's MAC in constant time before anything else is
//! read; a peer that cannot prove it knows the secret is dropped (and the
//! listener logs it). Fresh random nonces on both sides stop replays.
//!
//! The `contract` is the [`RingContract`] (placement version and
//! `cluster.vnodes`): once the MACs check, each side refuses a peer whose
//! contract differs from its own ([`PeerError::Contract`]), since the two
//! would place sessions on different members.
//!
//! Nothing waits forever: every request has a deadline, and a link that dies
//! fails all of its pending requests at once with [`PeerError::Closed`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bincode::{Decode, Encode};
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::either::Either;

use crate::ring::{MemberId, RingContract};
use crate::tls::PeerTls;

/// Largest frame on a peer link.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames queued for writing on one link before senders wait.
const WRITE_QUEUE: usize = 4096;
/// Inbound connections that may be in their handshake at once; more are
/// closed at once. Anyone who reaches the peer port can open connections
/// before proving anything: this bounds what they cost (a task, a TLS
/// handshake, up to 5 s each) while real peers, a few
/// links each, never come near it.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Why a peer call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// Could not connect.
    #[error("cannot reach peer: {0}")]
    Connect(String),
    /// The peer failed the handshake (wrong secret, or not a berth node).
    #[error("peer authentication failed: {0}")]
    Auth(String),
    /// The link closed before an answer.
    #[error("peer link closed")]
    Closed,
    /// No answer within the deadline.
    #[error("peer did not answer within {0:?}")]
    Timeout(Duration),
    /// A frame could not be encoded or decoded.
    #[error("bad frame: {0}")]
    Codec(String),
    /// The TLS handshake failed (a certificate not issued by the cluster CA,
    /// the wrong server name, or one side without TLS).
    #[error("peer TLS failed: {0} (every node needs cluster.tls with the same CA)")]
    Tls(String),
    /// The peer proved the secret but places sessions differently.
    #[error("peer {peer} uses {theirs}, this node {ours}: every node must use the same cluster.vnodes and a build with the same placement")]
    Contract {
        /// The peer's id.
        peer: String,
        /// This node's contract.
        ours: RingContract,
        /// The peer's.
        theirs: RingContract,
    },
}

/// What travels on a link after the handshake.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum Frame {
    /// A request expecting one response with the same id.
    Request {
        /// Correlation id, unique per link and direction.
        id: u64,
        /// Opaque body.
        body: Vec<u8>,
    },
    /// The answer to a request.
    Response {
        /// The request's id.
        id: u64,
        /// Opaque body.
        body: Vec<u8>,
    },
    /// A one-way message.
    Push {
        /// Opaque body.
        body: Vec<u8>,
    },
}

#[derive(Debug, Encode, Decode)]
enum Handshake {
    Hello {
        id: String,
        nonce: [u8; 32],
        contract: RingContract,
    },
    Challenge {
        id: String,
        nonce: [u8; 32],
        mac: [u8; 32],
        contract: RingContract,
    },
    Proof {
        mac: [u8; 32],
    },
}

/// The most bytes decoding one frame may claim (bincode's limit). A frame of
/// at most [`MAX_FRAME`] bytes decodes into at most a few bytes more (varint
/// integers widen), so every frame a link can carry decodes; without a limit,
/// a length prefix inside a frame (a `Hello`'s id, before any proof) made
/// bincode allocate whatever it claimed: gigabytes, or an abort of the node.
const DECODE_LIMIT: usize = MAX_FRAME + 64;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_LIMIT>,
>;

/// `standard()` (the wire format is unchanged), with [`DECODE_LIMIT`].
fn cfg() -> Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

fn encode<T: Encode>(v: &T) -> Result<bytes::Bytes, PeerError> {
    bincode::encode_to_vec(v, cfg())
        .map(bytes::Bytes::from)
        .map_err(|e| PeerError::Codec(e.to_string()))
}

fn decode<T: Decode<()>>(b: &[u8]) -> Result<T, PeerError> {
    bincode::decode_from_slice(b, cfg())
        .map(|(v, _)| v)
        .map_err(|e| PeerError::Codec(e.to_string()))
}

/// What one side's MAC covers besides the secret.
struct Signed<'a> {
    label: &'a [u8],
    a: &'a [u8; 32],
    b: &'a [u8; 32],
    id: &'a str,
    contract: RingContract,
}

impl Signed<'_> {
    fn hmac(&self, secret: &[u8]) -> Hmac<Sha256> {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
        m.update(self.label);
        m.update(self.a);
        m.update(self.b);
        m.update(self.id.as_bytes());
        m.update(&self.contract.to_bytes());
        m
    }

    fn mac(&self, secret: &[u8]) -> [u8; 32] {
        self.hmac(secret).finalize().into_bytes().into()
    }

    fn verify(&self, secret: &[u8], tag: &[u8; 32]) -> bool {
        self.hmac(secret).verify_slice(tag).is_ok() // constant time
    }
}

/// What a node's links prove and check: the secret to prove ourselves with
/// and every secret whose proof we accept (the signing one included; extra
/// accepted secrets make rotation possible without a cluster-wide stop, see
/// docs/operations.md), the [`RingContract`] a peer must share, and the TLS
/// configuration, if links are encrypted.
#[derive(Clone)]
pub struct PeerAuth {
    sign: Vec<u8>,
    accept: Vec<Vec<u8>>,
    contract: RingContract,
    tls: Option<PeerTls>,
}

impl PeerAuth {
    /// Sign with `secret`; accept it and every one of `also_accept`. Plain
    /// TCP and the default contract until set otherwise.
    pub fn new(secret: impl Into<Vec<u8>>, also_accept: impl IntoIterator<Item = Vec<u8>>) -> Self {
        let sign = secret.into();
        let mut accept = vec![sign.clone()];
        accept.extend(also_accept.into_iter().filter(|s| !s.is_empty()));
        PeerAuth {
            sign,
            accept,
            contract: RingContract::default(),
            tls: None,
        }
    }

    /// Requires peers to place sessions by `contract`.
    pub fn with_contract(mut self, contract: RingContract) -> Self {
        self.contract = contract;
        self
    }

    /// Runs links over TLS with `tls` (`None`: plain TCP).
    pub fn with_tls(mut self, tls: Option<PeerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Whether links are encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn verify(&self, signed: &Signed<'_>, tag: &[u8; 32]) -> bool {
        // Every candidate is checked (no early exit), each in constant time.
        self.accept
            .iter()
            .fold(false, |ok, secret| signed.verify(secret, tag) | ok)
    }

    /// The listener's MAC in its `Challenge` (see the module docs).
    fn challenge_mac(&self, nonce_d: &[u8; 32], nonce_l: &[u8; 32], me: &str) -> [u8; 32] {
        Signed {
            label: b"berth-peer-l",
            a: nonce_d,
            b: nonce_l,
            id: me,
            contract: self.contract,
        }
        .mac(&self.sign)
    }

    /// The dialer's MAC in its `Proof`.
    fn proof_mac(&self, nonce_l: &[u8; 32], nonce_d: &[u8; 32], me: &str) -> [u8; 32] {
        Signed {
            label: b"berth-peer-d",
            a: nonce_l,
            b: nonce_d,
            id: me,
            contract: self.contract,
        }
        .mac(&self.sign)
    }

    /// The dialer's check of a `Challenge` from `who` (the MAC only: the
    /// dialer checks the contract after sending its proof).
    fn check_challenge(
        &self,
        nonce_d: &[u8; 32],
        nonce_l: &[u8; 32],
        id: &str,
        contract: RingContract,
        mac: &[u8; 32],
        who: &str,
    ) -> Result<(), PeerError> {
        let signed = Signed {
            label: b"berth-peer-l",
            a: nonce_d,
            b: nonce_l,
            id,
            contract,
        };
        if self.verify(&signed, mac) {
            Ok(())
        } else {
            Err(PeerError::Auth(format!(
                "{who} does not know the cluster secret"
            )))
        }
    }

    /// The listener's check of a dialer's `Hello` and `Proof`: the MAC, then
    /// the contract.
    fn check_proof(
        &self,
        nonce_l: &[u8; 32],
        nonce_d: &[u8; 32],
        id: &str,
        contract: RingContract,
        mac: &[u8; 32],
    ) -> Result<(), PeerError> {
        let signed = Signed {
            label: b"berth-peer-d",
            a: nonce_l,
            b: nonce_d,
            id,
            contract,
        };
        if !self.verify(&signed, mac) {
            return Err(PeerError::Auth(format!(
                "peer claiming to be {id:?} does not know the cluster secret"
            )));
        }
        self.check_contract(id, contract)
    }

    fn check_contract(&self, peer: &str, theirs: RingContract) -> Result<(), PeerError> {
        if theirs == self.contract {
            Ok(())
        } else {
            Err(PeerError::Contract {
                peer: peer.to_owned(),
                ours: self.contract,
                theirs,
            })
        }
    }
}

impl std::fmt::Debug for PeerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PeerAuth({} accepted secrets, {}, {})",
            self.accept.len(),
            self.contract,
            if self.tls.is_some() { "TLS" } else { "plain" }
        )
    }
}

impl From<&[u8]> for PeerAuth {
    fn from(secret: &[u8]) -> Self {
        PeerAuth::new(secret.to_vec(), [])
    }
}

impl<const N: usize> From<&[u8; N]> for PeerAuth {
    fn from(secret: &[u8; N]) -> Self {
        PeerAuth::new(secret.to_vec(), [])
    }
}

impl From<Vec<u8>> for PeerAuth {
    fn from(secret: Vec<u8>) -> Self {
        PeerAuth::new(secret, [])
    }
}

/// Resolves once the flag is set (drops the borrow, so the future stays `Send`).
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rng().fill_bytes(&mut n);
    n
}

/// A link's byte stream: plain TCP or TLS over it.
type Io = Either<TcpStream, tokio_rustls::TlsStream<TcpStream>>;

type Transport = Framed<Io, LengthDelimitedCodec>;

/// The link's framing: a 4-byte big-endian length, at most [`MAX_FRAME`].
fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

fn framed(s: Io) -> Transport {
    Framed::new(s, codec())
}

/// How long data sent on a link may stay unacknowledged by the peer's
/// kernel before the connection fails (`TCP_USER_TIMEOUT`). A peer that
/// vanished without a close (its address gone, a cut network, a container
/// moved to a new address) otherwise leaves an open-looking link on which
/// every request times out, one after another, for the ~15 minutes of the
/// kernel's retransmissions: the pool kept using it. A live peer's kernel
/// acknowledges at once, however slow its handler, so this never closes a
/// link to a live peer.
const LINK_USER_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle link is probed after this long without traffic (TCP keepalive)...
const LINK_KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// ...every this long, and fails after this many unanswered probes.
const LINK_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const LINK_KEEPALIVE_PROBES: u32 = 3;

/// Sets a link's TCP options: no Nagle delay, and the kernel finds a dead
/// peer ([`LINK_USER_TIMEOUT`], keepalive). A failure to set them is
/// logged: the link works, only slower to notice a dead peer.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(LINK_KEEPALIVE_IDLE)
        .with_interval(LINK_KEEPALIVE_INTERVAL)
        .with_retries(LINK_KEEPALIVE_PROBES);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "peer link: TCP keepalive could not be set");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(LINK_USER_TIMEOUT)) {
        tracing::warn!(error = %e, "peer link: TCP_USER_TIMEOUT could not be set");
    }
}

/// The dialer's side of the transport: TCP, then TLS if configured.
async fn dial_io(addr: &str, auth: &PeerAuth) -> Result<Io, PeerError> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| PeerError::Connect(format!("{addr}: timed out")))?
        .map_err(|e| PeerError::Connect(format!("{addr}: {e}")))?;
    tune(&stream);
    let Some(tls) = &auth.tls else {
        return Ok(Either::Left(stream));
    };
    let connect = tls.connector().connect(tls.server_name().clone(), stream);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
        Ok(Ok(s)) => Ok(Either::Right(s.into())),
        Ok(Err(e)) => Err(PeerError::Tls(format!("{addr}: {e}"))),
        Err(_) => Err(PeerError::Tls(format!("{addr}: handshake timed out"))),
    }
}

/// The listener's side of the transport: TLS if configured.
async fn accept_io(stream: TcpStream, auth: &PeerAuth) -> Result<Io, PeerError> {
    tune(&stream);
    let Some(tls) = &auth.tls else {
        return Ok(Either::Left(stream));
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => Ok(Either::Right(s.into())),
        Ok(Err(e)) => Err(PeerError::Tls(e.to_string())),
        Err(_) => Err(PeerError::Tls("handshake timed out".into())),
    }
}

async fn next_handshake(t: &mut Transport) -> Result<Handshake, PeerError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, t.next()).await {
        Ok(Some(Ok(b))) => decode(&b),
        Ok(Some(Err(e))) => Err(PeerError::Auth(e.to_string())),
        Ok(None) => Err(PeerError::Auth("peer closed during the handshake".into())),
        Err(_) => Err(PeerError::Auth("handshake timed out".into())),
    }
}

async fn send_handshake(t: &mut Transport, h: &Handshake) -> Result<(), PeerError> {
    t.send(encode(h)?)
        .await
        .map_err(|e| PeerError::Auth(e.to_string()))
}

/// Answers what arrives on links: requests (one answer each) and pushes.
pub trait PeerHandler: Send + Sync + 'static {
    /// A request from `from`; the returned bytes are its response.
    fn request(&self, from: MemberId, link: Link, body: Vec<u8>) -> BoxFuture<'static, Vec<u8>>;
    /// A one-way message from `from`.
    fn push(&self, from: MemberId, link: Link, body: Vec<u8>);
    /// `link` to `peer` ended (the peer died, left or the network broke).
    /// Another link to the same peer may still be open.
    fn closed(&self, _peer: MemberId, _link: Link) {}
}

struct LinkInner {
    peer: MemberId,
    out: mpsc::Sender<Frame>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>,
    next_id: AtomicU64,
    closed: watch::Sender<bool>,
}

/// One authenticated link to a peer. Cheap to clone.
#[derive(Clone)]
pub struct Link {
    inner: Arc<LinkInner>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({})", self.inner.peer)
    }
}

impl Link {
    /// The peer's member id (as it proved it).
    pub fn peer(&self) -> &MemberId {
        &self.inner.peer
    }

    /// Whether `other` is this very link (not merely a link to the same peer).
    pub fn same(&self, other: &Link) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether the link has closed.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// Resolves when the link closes.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Sends a request and waits for its response, at most `timeout`.
    pub async fn request(&self, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, PeerError> {
        if self.is_closed() {
            return Err(PeerError::Closed);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let sent =
            tokio::time::timeout(timeout, self.inner.out.send(Frame::Request { id, body })).await;
        let result = match sent {
            Ok(Ok(())) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(body)) => Ok(body),
                Ok(Err(_)) => Err(PeerError::Closed),
                Err(_) => Err(PeerError::Timeout(timeout)),
            },
            Ok(Err(_)) => Err(PeerError::Closed),
            Err(_) => Err(PeerError::Timeout(timeout)),
        };
        if result.is_err() {
            self.inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
        result
    }

    /// Starts a request now: it is queued on the link before this returns, so
    /// requests started one after another are sent (and handled) in that order.
    /// The returned future waits for the answer, at most `timeout`.
    pub fn start_request(
        &self,
        body: Vec<u8>,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, PeerError>> + Send + 'static {
        let link = self.clone();
        let queued = if self.is_closed() {
            Err(PeerError::Closed)
        } else {
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, tx);
            match self.inner.out.try_send(Frame::Request { id, body }) {
                Ok(()) => Ok((id, rx)),
                Err(_) => {
                    self.inner
                        .pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    Err(PeerError::Closed)
                }
            }
        };
        async move {
            let (id, rx) = queued?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(body)) => Ok(body),
                Ok(Err(_)) => Err(PeerError::Closed),
                Err(_) => {
                    link.inner
                        .pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    Err(PeerError::Timeout(timeout))
                }
            }
        }
    }

    /// Closes the link (both directions); pending requests fail with `Closed`.
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// Sends a one-way message (waits only for room in the write queue).
    pub async fn push(&self, body: Vec<u8>) -> Result<(), PeerError> {
        self.inner
            .out
            .send(Frame::Push { body })
            .await
            .map_err(|_| PeerError::Closed)
    }

    /// Sends a one-way message without waiting; `false` if the queue is full or the link closed.
    pub fn try_push(&self, body: Vec<u8>) -> bool {
        self.inner.out.try_send(Frame::Push { body }).is_ok()
    }

    fn fail_pending(&self) {
        let pending: Vec<_> = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        drop(pending); // dropping the senders answers every waiter with Closed
    }
}

/// Runs an authenticated transport: one task reads, one writes.
fn run_link(t: Transport, peer: MemberId, handler: Arc<dyn PeerHandler>) -> Link {
    let (out, mut out_rx) = mpsc::channel::<Frame>(WRITE_QUEUE);
    let (closed, _) = watch::channel(false);
    let link = Link {
        inner: Arc::new(LinkInner {
            peer: peer.clone(),
            out,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed,
        }),
    };
    let (mut sink, mut stream) = t.split();
    let writer_link = link.clone();
    tokio::spawn(async move {
        let mut closed = writer_link.inner.closed.subscribe();
        loop {
            tokio::select! {
                f = out_rx.recv() => {
                    let Some(f) = f else { break };
                    let Ok(bytes) = encode(&f) else { continue };
                    if sink.send(bytes).await.is_err() {
                        break;
                    }
                }
                _ = until_true(&mut closed) => break,
            }
        }
        writer_link.inner.closed.send_replace(true);
        let _ = sink.close().await;
    });
    let reader_link = link.clone();
    tokio::spawn(async move {
        let mut closed = reader_link.inner.closed.subscribe();
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = until_true(&mut closed) => break,
            };
            let bytes = match next {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    tracing::debug!(peer = %reader_link.peer(), error = %e, "peer link read failed");
                    break;
                }
                None => break,
            };
            match decode::<Frame>(&bytes) {
                Ok(Frame::Response { id, body }) => {
                    let waiter = reader_link
                        .inner
                        .pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    if let Some(w) = waiter {
                        let _ = w.send(body);
                    }
                }
                Ok(Frame::Request { id, body }) => {
                    let fut =
                        handler.request(reader_link.peer().clone(), reader_link.clone(), body);
                    let l = reader_link.clone();
                    tokio::spawn(async move {
                        let body = fut.await;
                        let _ = l.inner.out.send(Frame::Response { id, body }).await;
                    });
                }
                Ok(Frame::Push { body }) => {
                    handler.push(reader_link.peer().clone(), reader_link.clone(), body)
                }
                Err(e) => {
                    tracing::warn!(peer = %reader_link.peer(), error = %e, "undecodable frame on peer link; closing it");
                    break;
                }
            }
        }
        reader_link.inner.closed.send_replace(true);
        reader_link.fail_pending();
        handler.closed(reader_link.peer().clone(), reader_link.clone());
    });
    link
}

/// Dials `addr`, authenticates with `auth` as `me`, and runs the link.
pub async fn connect(
    addr: &str,
    me: &MemberId,
    auth: impl Into<PeerAuth>,
    handler: Arc<dyn PeerHandler>,
) -> Result<Link, PeerError> {
    let auth: PeerAuth = auth.into();
    let mut t = framed(dial_io(addr, &auth).await?);
    let nonce_d = nonce();
    send_handshake(
        &mut t,
        &Handshake::Hello {
            id: me.to_string(),
            nonce: nonce_d,
            contract: auth.contract,
        },
    )
    .await?;
    let Handshake::Challenge {
        id,
        nonce: nonce_l,
        mac: mac_l,
        contract,
    } = next_handshake(&mut t).await?
    else {
        return Err(PeerError::Auth("expected a challenge".into()));
    };
    auth.check_challenge(&nonce_d, &nonce_l, &id, contract, &mac_l, addr)?;
    let proof = auth.proof_mac(&nonce_l, &nonce_d, me.as_str());
    send_handshake(&mut t, &Handshake::Proof { mac: proof }).await?;
    // Checked after the proof is sent, so that the listener learns of a
    // mismatch too (and says so in its log) rather than of a dialer that hung up.
    auth.check_contract(&id, contract)?;
    Ok(run_link(t, MemberId(id), handler))
}

/// Authenticates an inbound connection; the peer's id on success.
async fn accept_one(
    stream: TcpStream,
    me: &MemberId,
    auth: &PeerAuth,
) -> Result<(Transport, MemberId), PeerError> {
    let mut t = framed(accept_io(stream, auth).await?);
    let Handshake::Hello {
        id,
        nonce: nonce_d,
        contract,
    } = next_handshake(&mut t).await?
    else {
        return Err(PeerError::Auth("expected hello".into()));
    };
    let nonce_l = nonce();
    let mac_l = auth.challenge_mac(&nonce_d, &nonce_l, me.as_str());
    send_handshake(
        &mut t,
        &Handshake::Challenge {
            id: me.to_string(),
            nonce: nonce_l,
            mac: mac_l,
            contract: auth.contract,
        },
    )
    .await?;
    let Handshake::Proof { mac: mac_d } = next_handshake(&mut t).await? else {
        return Err(PeerError::Auth("expected proof".into()));
    };
    auth.check_proof(&nonce_l, &nonce_d, &id, contract, &mac_d)?;
    Ok((t, MemberId(id)))
}

/// Lets a log line through at most once per period and counts the ones held
/// back, so a flood of refused connections cannot flood the log.
struct LogEvery {
    period: Duration,
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogEvery {
    fn new(period: Duration) -> Self {
        LogEvery {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// Whether to log now (else the line is counted as suppressed).
    fn due(&self) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if g.0.is_some_and(|t| now.duration_since(t) < self.period) {
            g.1 += 1;
            false
        } else {
            g.0 = Some(now);
            true
        }
    }

    /// Lines held back since the last one logged.
    fn take_suppressed(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).1)
    }
}

/// A running peer listener.
pub struct ListenerHandle {
    /// The bound address.
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ListenerHandle {
    /// Stops accepting (links already up keep running until they close).
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// Binds `addr` and serves authenticated links; each new link is also
/// reported to `on_link`.
pub async fn spawn_listener(
    addr: &str,
    me: MemberId,
    auth: impl Into<PeerAuth>,
    handler: Arc<dyn PeerHandler>,
    on_link: impl Fn(Link) + Send + Sync + 'static,
) -> std::io::Result<ListenerHandle> {
    let listener = TcpListener::bind(addr).await?;
    spawn_listener_on(listener, me, auth, handler, on_link).await
}

/// Like [`spawn_listener`], on an already bound listener.
pub async fn spawn_listener_on(
    listener: TcpListener,
    me: MemberId,
    auth: impl Into<PeerAuth>,
    handler: Arc<dyn PeerHandler>,
    on_link: impl Fn(Link) + Send + Sync + 'static,
) -> std::io::Result<ListenerHandle> {
    let local_addr = listener.local_addr()?;
    let (stop, mut stop_rx) = watch::channel(false);
    let secret: Arc<PeerAuth> = Arc::new(auth.into());
    let on_link = Arc::new(on_link);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let refusals = Arc::new(LogEvery::new(Duration::from_secs(1)));
    let task = tokio::spawn(async move {
        loop {
            let (stream, from) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "peer accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = until_true(&mut stop_rx) => return,
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                drop(stream);
                metrics::counter!("berth_peer_auth_failures_total", "reason" => "overload")
                    .increment(1);
                if refusals.due() {
                    tracing::warn!(%from, limit = MAX_PENDING_HANDSHAKES, suppressed = refusals.take_suppressed(), "peer connection closed: too many handshakes in progress");
                }
                continue;
            };
            let (me, secret, handler, on_link, refusals) = (
                me.clone(),
                secret.clone(),
                handler.clone(),
                on_link.clone(),
                refusals.clone(),
            );
            tokio::spawn(async move {
                let accepted = accept_one(stream, &me, &secret).await;
                drop(permit);
                match accepted {
                    Ok((t, peer)) => {
                        tracing::debug!(%peer, %from, "peer link accepted");
                        on_link(run_link(t, peer, handler));
                    }
                    Err(e) => {
                        let reason = match &e {
                            PeerError::Tls(_) => "tls",
                            PeerError::Contract { .. } => "contract",
                            _ => "handshake",
                        };
                        metrics::counter!("berth_peer_auth_failures_total", "reason" => reason)
                            .increment(1);
                        // A configuration mismatch is always said; anonymous
                        // garbage at most once a second.
                        if reason == "contract" {
                            tracing::error!(%from, error = %e, "peer refused");
                        } else if refusals.due() {
                            tracing::warn!(%from, error = %e, suppressed = refusals.take_suppressed(), "peer refused");
                        }
                    }
                }
            });
        }
    });
    Ok(ListenerHandle {
        local_addr,
        stop,
        task,
    })
}

#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    //! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`,
    //! never enabled by the `berth` binary).
    //!
    //! Each one takes the bytes a peer would write on the TCP connection and
    //! runs them through what a link does with them, without a socket: the
    //! link's framing (length prefix, [`MAX_FRAME`]), bincode with the peer
    //! module's configuration, and the handshake's checks with [`SECRET`].
    //! The one difference from a real link is that "our" nonce is fixed
    //! ([`LISTENER_NONCE`], [`DIALER_NONCE`]) instead of random, so that an
    //! input can carry a valid proof and reach the frames after the
    //! handshake.

    use super::*;
    use tokio_util::codec::{Decoder, Encoder};

    /// The cluster secret of the fuzzed node.
    pub const SECRET: &[u8] = b"berth-fuzzing-secret";
    /// The fuzzed listener's nonce (a real one is random).
    pub const LISTENER_NONCE: [u8; 32] = [0x4c; 32];
    /// The fuzzed dialer's nonce (a real one is random).
    pub const DIALER_NONCE: [u8; 32] = [0x44; 32];

    /// What a link made of the bytes after the handshake.
    #[derive(Debug, Default)]
    pub struct Outcome {
        /// The frames decoded, in order.
        pub frames: Vec<Frame>,
        /// Why reading stopped before the end of the bytes, if it did (a
        /// real link closes there).
        pub error: Option<PeerError>,
    }

    /// The bytes of a connection, split as a link's transport splits them.
    struct Wire {
        buf: bytes::BytesMut,
        codec: LengthDelimitedCodec,
    }

    impl Wire {
        fn new(bytes: &[u8]) -> Self {
            Wire {
                buf: bytes::BytesMut::from(bytes),
                codec: codec(),
            }
        }

        /// The next frame; `None` at a clean end of the stream (as `Framed`:
        /// `decode`, then `decode_eof` once the bytes are all there).
        fn next(&mut self) -> Option<Result<bytes::BytesMut, std::io::Error>> {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => Some(Ok(f)),
                Ok(None) => self.codec.decode_eof(&mut self.buf).transpose(),
                Err(e) => Some(Err(e)),
            }
        }

        /// As `next_handshake`.
        fn handshake(&mut self) -> Result<Handshake, PeerError> {
            match self.next() {
                Some(Ok(b)) => decode(&b),
                Some(Err(e)) => Err(PeerError::Auth(e.to_string())),
                None => Err(PeerError::Auth("peer closed during the handshake".into())),
            }
        }

        /// As the reader task of `run_link`, without handling the frames.
        fn frames(mut self) -> Outcome {
            let mut out = Outcome::default();
            while let Some(next) = self.next() {
                match next.map_err(|e| PeerError::Codec(e.to_string())) {
                    Ok(b) => match decode::<Frame>(&b) {
                        Ok(f) => out.frames.push(f),
                        Err(e) => {
                            out.error = Some(e);
                            break;
                        }
                    },
                    Err(e) => {
                        out.error = Some(e);
                        break;
                    }
                }
            }
            out
        }
    }

    /// Bytes a peer sends on an established link.
    pub fn link(bytes: &[u8]) -> Outcome {
        Wire::new(bytes).frames()
    }

    /// An inbound connection: the bytes are what the dialer sends (`Hello`,
    /// then `Proof`, then frames). As `accept_one`, then `run_link`: the
    /// dialer's id once it proved it knows [`SECRET`], and what the link read.
    pub fn accept(bytes: &[u8]) -> Result<(MemberId, Outcome), PeerError> {
        let auth = PeerAuth::from(SECRET);
        let mut wire = Wire::new(bytes);
        let Handshake::Hello {
            id,
            nonce: nonce_d,
            contract,
        } = wire.handshake()?
        else {
            return Err(PeerError::Auth("expected hello".into()));
        };
        let nonce_l = LISTENER_NONCE;
        // (Here the listener sends its challenge.)
        let Handshake::Proof { mac: mac_d } = wire.handshake()? else {
            return Err(PeerError::Auth("expected proof".into()));
        };
        auth.check_proof(&nonce_l, &nonce_d, &id, contract, &mac_d)?;
        Ok((MemberId(id), wire.frames()))
    }

    /// An outbound connection after our `Hello` (with [`DIALER_NONCE`]): the
    /// bytes are what the listener answers (`Challenge`, then frames). As
    /// `connect`, then `run_link`.
    pub fn dial(bytes: &[u8]) -> Result<(MemberId, Outcome), PeerError> {
        let auth = PeerAuth::from(SECRET);
        let mut wire = Wire::new(bytes);
        let nonce_d = DIALER_NONCE;
        let Handshake::Challenge {
            id,
            nonce: nonce_l,
            mac: mac_l,
            contract,
        } = wire.handshake()?
        else {
            return Err(PeerError::Auth("expected a challenge".into()));
        };
        auth.check_challenge(&nonce_d, &nonce_l, &id, contract, &mac_l, "the listener")?;
        auth.check_contract(&id, contract)?;
        // (Here the dialer sends its proof.)
        Ok((MemberId(id), wire.frames()))
    }

    /// `body` as one frame on the wire (length prefix and all).
    pub fn wire(body: &[u8]) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        codec()
            .encode(bytes::Bytes::copy_from_slice(body), &mut out)
            .expect("a test body fits in a frame");
        out.to_vec()
    }

    /// `frame` as a link writes it on the wire.
    pub fn frame_bytes(frame: &Frame) -> Vec<u8> {
        wire(&encode(frame).expect("a frame encodes"))
    }

    /// A dialer `id` that knows [`SECRET`] opening a connection to the fuzzed
    /// listener: its `Hello` and `Proof` frames (see [`accept`]).
    pub fn valid_dialer_opening(id: &str) -> Vec<u8> {
        let nonce_d = [0x64; 32];
        let auth = PeerAuth::from(SECRET);
        let hello = Handshake::Hello {
            id: id.to_string(),
            nonce: nonce_d,
            contract: auth.contract,
        };
        let proof = Handshake::Proof {
            mac: auth.proof_mac(&LISTENER_NONCE, &nonce_d, id),
        };
        let mut out = wire(&encode(&hello).expect("encodes"));
        out.extend(wire(&encode(&proof).expect("encodes")));
        out
    }

    /// A listener `id` that knows [`SECRET`] answering the fuzzed dialer: its
    /// `Challenge` frame (see [`dial`]).
    pub fn valid_listener_opening(id: &str) -> Vec<u8> {
        let nonce_l = [0x6c; 32];
        let auth = PeerAuth::from(SECRET);
        let challenge = Handshake::Challenge {
            id: id.to_string(),
            nonce: nonce_l,
            mac: auth.challenge_mac(&DIALER_NONCE, &nonce_l, id),
            contract: auth.contract,
        };
        wire(&encode(&challenge).expect("encodes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio_util::codec::Decoder;

    /// Echoes requests with a prefix and records pushes.
    struct Echo {
        pushes: mpsc::UnboundedSender<(MemberId, Vec<u8>)>,
    }

    impl PeerHandler for Echo {
        fn request(
            &self,
            from: MemberId,
            _link: Link,
            body: Vec<u8>,
        ) -> BoxFuture<'static, Vec<u8>> {
            async move {
                if body == b"slow" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let mut out = format!("{from}:").into_bytes();
                out.extend(body);
                out
            }
            .boxed()
        }
        fn push(&self, from: MemberId, _link: Link, body: Vec<u8>) {
            let _ = self.pushes.send((from, body));
        }
    }

    type Pushes = mpsc::UnboundedReceiver<(MemberId, Vec<u8>)>;

    fn echo() -> (Arc<dyn PeerHandler>, Pushes) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Echo { pushes: tx }), rx)
    }

    async fn listener(secret: &[u8]) -> (ListenerHandle, mpsc::UnboundedReceiver<Link>, Pushes) {
        listener_pushes(PeerAuth::from(secret.to_vec())).await
    }

    /// A listener with `auth` on loopback; its links and their pushes.
    async fn listener_pushes(
        auth: PeerAuth,
    ) -> (ListenerHandle, mpsc::UnboundedReceiver<Link>, Pushes) {
        let (h, pushes) = echo();
        let (ltx, lrx) = mpsc::unbounded_channel();
        let l = spawn_listener(
            "127.0.0.1:0",
            MemberId("server".into()),
            auth,
            h,
            move |link| {
                let _ = ltx.send(link);
            },
        )
        .await
        .unwrap();
        (l, lrx, pushes)
    }

    /// Whether no link arrives within 300 ms.
    async fn no_link(links: &mut mpsc::UnboundedReceiver<Link>) -> bool {
        tokio::time::timeout(Duration::from_millis(300), links.recv())
            .await
            .is_err()
    }

    #[tokio::test]
    async fn requests_and_pushes_flow_both_ways() {
        let (l, mut links, mut server_pushes) = listener(b"s3cret").await;
        let (h, mut client_pushes) = echo();
        let link = connect(
            &l.local_addr.to_string(),
            &MemberId("client".into()),
            b"s3cret",
            h,
        )
        .await
        .unwrap();
        assert_eq!(link.peer().as_str(), "server");
        // Many concurrent requests on one link, each answered to its caller.
        let answers = futures_util::future::join_all((0..100).map(|i| {
            let link = link.clone();
            async move {
                link.request(format!("r{i}").into_bytes(), Duration::from_secs(5))
                    .await
            }
        }))
        .await;
        for (i, a) in answers.into_iter().enumerate() {
            assert_eq!(a.unwrap(), format!("client:r{i}").into_bytes());
        }
        link.push(b"hi".to_vec()).await.unwrap();
        assert_eq!(
            server_pushes.recv().await.unwrap(),
            (MemberId("client".into()), b"hi".to_vec())
        );
        // The accepted side can call back over the same connection.
        let back = links.recv().await.unwrap();
        assert_eq!(back.peer().as_str(), "client");
        assert_eq!(
            back.request(b"x".to_vec(), Duration::from_secs(5))
                .await
                .unwrap(),
            b"server:x"
        );
        back.push(b"yo".to_vec()).await.unwrap();
        assert_eq!(client_pushes.recv().await.unwrap().1, b"yo");
        l.shutdown().await;
    }

    #[tokio::test]
    async fn a_peer_with_the_wrong_secret_is_refused() {
        let (l, mut links, _) = listener(b"right").await;
        let (h, _) = echo();
        let err = connect(
            &l.local_addr.to_string(),
            &MemberId("intruder".into()),
            b"wrong",
            h,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PeerError::Auth(_)), "{err:?}");
        assert!(no_link(&mut links).await, "no link was accepted");
    }

    #[tokio::test]
    async fn the_secret_rotates_in_three_steps_without_refusals() {
        let (old, new) = (b"old-secret".to_vec(), b"new-secret".to_vec());
        /// (listener signs, listener also accepts, dialer signs, dialer also accepts, link expected)
        type Step<'a> = (&'a [u8], &'a [u8], &'a [u8], &'a [u8], bool);
        let steps: [Step<'_>; 4] = [
            // 1: every node learns to accept the new secret, still signing with the old.
            (&old, &new, &old, b"", true),
            // 2: nodes switch to signing with the new one, still accepting the old.
            (&new, &old, &old, &new, true),
            // 3: the old one is dropped.
            (&new, b"", &new, b"", true),
            // Skipping step 1 is refused: a node that only knows the old secret.
            (&new, b"", &old, b"", false),
        ];
        for (i, (ls, la, ds, da, ok)) in steps.into_iter().enumerate() {
            let (h, _) = echo();
            let l = spawn_listener(
                "127.0.0.1:0",
                MemberId("server".into()),
                PeerAuth::new(ls.to_vec(), [la.to_vec()]),
                h,
                |_| {},
            )
            .await
            .unwrap();
            let (h, _) = echo();
            let r = connect(
                &l.local_addr.to_string(),
                &MemberId("c".into()),
                PeerAuth::new(ds.to_vec(), [da.to_vec()]),
                h,
            )
            .await;
            assert_eq!(r.is_ok(), ok, "step {}: {r:?}", i + 1);
            if let Ok(link) = r {
                assert_eq!(
                    link.request(b"x".to_vec(), Duration::from_secs(2))
                        .await
                        .unwrap(),
                    b"c:x"
                );
            }
            l.shutdown().await;
        }
    }

    #[tokio::test]
    async fn a_fake_listener_is_refused_by_the_dialer() {
        // The dialer checks the listener too: a server without the secret cannot
        // receive requests meant for a member.
        let (l, _, _) = listener(b"not-the-secret").await;
        let (h, _) = echo();
        let err = connect(
            &l.local_addr.to_string(),
            &MemberId("client".into()),
            b"the-secret",
            h,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, PeerError::Auth(m) if m.contains("does not know the cluster secret"))
        );
    }

    /// A listener with `auth` on loopback and its links.
    async fn listener_with(auth: PeerAuth) -> (ListenerHandle, mpsc::UnboundedReceiver<Link>) {
        let (l, links, _) = listener_pushes(auth).await;
        (l, links)
    }

    async fn dial(l: &ListenerHandle, auth: PeerAuth) -> Result<Link, PeerError> {
        let (h, _) = echo();
        connect(&l.local_addr.to_string(), &MemberId("c".into()), auth, h).await
    }

    fn secret() -> PeerAuth {
        PeerAuth::from(b"the-cluster-secret")
    }

    #[tokio::test]
    async fn tls_links_carry_requests_and_refuse_other_cas_and_plain_peers() {
        let ca = crate::tls::dev::DevCa::new("cluster CA");
        let (l, mut links) = listener_with(secret().with_tls(Some(ca.peer_tls().unwrap()))).await;

        // Two nodes with certificates of the cluster CA: a working link, both ways.
        let link = dial(&l, secret().with_tls(Some(ca.peer_tls().unwrap())))
            .await
            .unwrap();
        assert_eq!(
            link.request(b"x".to_vec(), Duration::from_secs(5))
                .await
                .unwrap(),
            b"c:x"
        );
        let back = links.recv().await.unwrap();
        assert_eq!(
            back.request(b"y".to_vec(), Duration::from_secs(5))
                .await
                .unwrap(),
            b"server:y"
        );

        // A dialer whose certificate another CA issued (it trusts the
        // cluster CA, so only the listener's check of the client stops it).
        let other = crate::tls::dev::DevCa::new("another CA");
        let n = other.issue(&[crate::tls::DEFAULT_SERVER_NAME]);
        let foreign = crate::tls::PeerTls::from_pem(
            ca.ca_pem().as_bytes(),
            n.cert_pem.as_bytes(),
            n.key_pem.as_bytes(),
            crate::tls::DEFAULT_SERVER_NAME,
        )
        .unwrap();
        assert!(dial(&l, secret().with_tls(Some(foreign))).await.is_err());
        // A dialer that trusts another CA refuses the listener.
        let err = dial(&l, secret().with_tls(Some(other.peer_tls().unwrap())))
            .await
            .unwrap_err();
        assert!(matches!(err, PeerError::Tls(_)), "{err:?}");
        // A certificate without the cluster's server name is refused by the dialer.
        let n = ca.issue(&["somebody-else"]);
        let (l2, _) = listener_with(
            secret().with_tls(Some(
                crate::tls::PeerTls::from_pem(
                    ca.ca_pem().as_bytes(),
                    n.cert_pem.as_bytes(),
                    n.key_pem.as_bytes(),
                    "somebody-else",
                )
                .unwrap(),
            )),
        )
        .await;
        let err = dial(&l2, secret().with_tls(Some(ca.peer_tls().unwrap())))
            .await
            .unwrap_err();
        assert!(matches!(err, PeerError::Tls(_)), "{err:?}");
        // A plain dialer cannot talk to a TLS listener, nor the reverse.
        assert!(dial(&l, secret()).await.is_err());
        let (plain, _) = listener_with(secret()).await;
        let err = dial(&plain, secret().with_tls(Some(ca.peer_tls().unwrap())))
            .await
            .unwrap_err();
        assert!(matches!(err, PeerError::Tls(_)), "{err:?}");
        // None of the refused attempts became a link.
        assert!(no_link(&mut links).await, "only the good dialer got a link");
        for l in [l, l2, plain] {
            l.shutdown().await;
        }
    }

    #[tokio::test]
    async fn a_peer_with_another_ring_contract_is_refused_on_both_sides() {
        let ours = RingContract::new(4096);
        let (l, mut links) = listener_with(secret().with_contract(ours)).await;
        // Same secret, other vnodes: the dialer refuses the listener...
        let err = dial(&l, secret().with_contract(RingContract::new(1024)))
            .await
            .unwrap_err();
        match err {
            PeerError::Contract {
                ours: o, theirs, ..
            } => {
                assert_eq!((o.vnodes, theirs.vnodes), (1024, 4096))
            }
            other => panic!("expected a contract error, got {other:?}"),
        }
        // ... and another placement version is refused too.
        let newer = RingContract {
            placement: crate::ring::PLACEMENT_VERSION + 1,
            vnodes: 4096,
        };
        assert!(matches!(
            dial(&l, secret().with_contract(newer)).await,
            Err(PeerError::Contract { .. })
        ));
        // The dialer refused after its proof, so no link was made.
        assert!(no_link(&mut links).await);
        // The same contract links.
        assert!(dial(&l, secret().with_contract(ours)).await.is_ok());
        l.shutdown().await;
    }

    #[test]
    fn the_listener_refuses_a_dialer_whose_contract_differs() {
        // The listener's side (the test above stops at the dialer's check):
        // a valid proof made over a 1024-vnode contract is still refused.
        let auth = secret();
        let nonce_l = [7u8; 32];
        let nonce_d = [9u8; 32];
        let theirs = RingContract::new(1024);
        let signed = Signed {
            label: b"berth-peer-d",
            a: &nonce_l,
            b: &nonce_d,
            id: "x",
            contract: theirs,
        };
        let tag = signed.mac(b"the-cluster-secret");
        assert!(auth.verify(&signed, &tag), "the proof itself is good");
        assert!(matches!(
            auth.check_contract("x", theirs),
            Err(PeerError::Contract { .. })
        ));
        // And a tag made over one contract does not verify for another.
        let forged = Signed {
            contract: RingContract::default(),
            ..signed
        };
        assert!(!auth.verify(&forged, &tag));
    }

    #[tokio::test]
    async fn silent_connections_hold_at_most_the_handshake_limit_and_the_rest_close_at_once() {
        let (l, _) = listener_with(secret()).await;
        // Connections that never say a word each hold a handshake slot until
        // HANDSHAKE_TIMEOUT; one more than the limit is closed at once.
        let mut held = Vec::new();
        for _ in 0..MAX_PENDING_HANDSHAKES {
            held.push(TcpStream::connect(l.local_addr).await.unwrap());
        }
        // The listener accepts in order: once it has taken the ones above,
        // every further connection finds no slot and reads EOF at once.
        let started = std::time::Instant::now();
        let mut closed = 0;
        for _ in 0..20 {
            let mut extra = TcpStream::connect(l.local_addr).await.unwrap();
            let mut buf = [0u8; 1];
            match tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::AsyncReadExt::read(&mut extra, &mut buf),
            )
            .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
                other => panic!("an extra connection was not closed: {other:?}"),
            }
        }
        assert_eq!(closed, 20);
        assert!(
            started.elapsed() < HANDSHAKE_TIMEOUT,
            "closed at once, not at the handshake timeout"
        );
        // Once the silent ones are gone, a real peer links again.
        drop(held);
        let mut linked = None;
        for _ in 0..50 {
            if let Ok(link) = dial(&l, secret()).await {
                linked = Some(link);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(linked.is_some(), "slots come back when connections end");
        l.shutdown().await;
    }

    #[test]
    fn log_every_lets_one_line_a_period_through_and_counts_the_rest() {
        let log = LogEvery::new(Duration::from_secs(3600));
        assert!(log.due());
        assert!(!log.due());
        assert!(!log.due());
        assert_eq!(log.take_suppressed(), 2);
        assert_eq!(log.take_suppressed(), 0);
    }

    /// A bincode varint length prefix of `n`.
    fn len_prefix(n: u64) -> Vec<u8> {
        let mut v = vec![253];
        v.extend_from_slice(&n.to_le_bytes());
        v
    }

    #[test]
    fn the_fuzzers_crash_input_is_a_codec_error() {
        // Found by fuzz/'s `peer_frame` target, minimised: one 11-byte frame,
        // a `Challenge` whose id claims 0xFAFA_2CFD_FDFD_FDFD bytes (a
        // capacity overflow panic in bincode before the limit).
        let wire = [
            0x00, 0x00, 0x00, 0x0b, 0x01, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0x2c, 0xfa, 0xfa,
            0xff,
        ];
        let frame = codec()
            .decode(&mut bytes::BytesMut::from(&wire[..]))
            .unwrap()
            .unwrap();
        assert!(matches!(
            decode::<Handshake>(&frame),
            Err(PeerError::Codec(_))
        ));
    }

    #[test]
    fn no_length_prefix_makes_decoding_allocate_what_it_claims() {
        // Every length field a peer sends, claiming 2^40 (an allocation that
        // fails and aborts the process), 2^63 (a capacity overflow panic) and
        // u64::MAX bytes: a codec error, at once.
        for n in [1 << 40, 1 << 63, u64::MAX] {
            // A `Hello`'s id, before the peer proved anything; a `Challenge`'s.
            for variant in [0u8, 1] {
                let bytes = [vec![variant], len_prefix(n)].concat();
                assert!(matches!(
                    decode::<Handshake>(&bytes),
                    Err(PeerError::Codec(_))
                ));
            }
            // The body of a request (id 1), a response (id 1) and a push.
            for prefix in [&[0u8, 1][..], &[1, 1], &[2]] {
                let bytes = [prefix.to_vec(), len_prefix(n)].concat();
                assert!(matches!(decode::<Frame>(&bytes), Err(PeerError::Codec(_))));
            }
        }
    }

    #[test]
    fn the_largest_frame_still_decodes() {
        // Variant, id 0 and a 5-byte length: exactly MAX_FRAME bytes, which
        // decode into a little more (the limit's slack).
        let f = Frame::Request {
            id: 0,
            body: vec![7; MAX_FRAME - 7],
        };
        let bytes = encode(&f).unwrap();
        assert_eq!(bytes.len(), MAX_FRAME);
        assert_eq!(decode::<Frame>(&bytes).unwrap(), f);
    }

    #[tokio::test]
    async fn a_hello_claiming_a_huge_id_is_refused_and_the_listener_lives_on() {
        use tokio::io::AsyncWriteExt;
        let (l, mut links, _) = listener(b"k").await;
        // An unauthenticated client sends a Hello whose id claims 2^40 bytes.
        let mut s = TcpStream::connect(l.local_addr).await.unwrap();
        let body = [vec![0u8], len_prefix(1 << 40)].concat();
        s.write_all(&(body.len() as u32).to_be_bytes())
            .await
            .unwrap();
        s.write_all(&body).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest),
        )
        .await
        .expect("the listener drops the connection");
        assert!(read.is_err() || rest.is_empty(), "no challenge: {rest:?}");
        // The node is still there for a real peer.
        let (h, _) = echo();
        let link = connect(&l.local_addr.to_string(), &MemberId("c".into()), b"k", h)
            .await
            .unwrap();
        assert_eq!(links.recv().await.unwrap().peer().as_str(), "c");
        link.close();
        l.shutdown().await;
    }

    #[tokio::test]
    async fn link_sockets_let_the_kernel_find_a_dead_peer() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(server.local_addr().unwrap())
            .await
            .unwrap();
        tune(&client);
        let sock = socket2::SockRef::from(&client);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(LINK_USER_TIMEOUT));
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), LINK_KEEPALIVE_IDLE);
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            LINK_KEEPALIVE_INTERVAL
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), LINK_KEEPALIVE_PROBES);
        assert!(client.nodelay().unwrap());
    }

    #[tokio::test]
    async fn pending_requests_fail_when_the_link_dies_and_none_waits_forever() {
        let (l, mut links, _) = listener(b"k").await;
        let (h, _) = echo();
        let link = connect(&l.local_addr.to_string(), &MemberId("c".into()), b"k", h)
            .await
            .unwrap();
        let err = link
            .request(b"slow".to_vec(), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err, PeerError::Timeout(Duration::from_millis(50)));
        let server_side = links.recv().await.unwrap();
        let pending = {
            let link = link.clone();
            tokio::spawn(async move {
                link.request(b"slow".to_vec(), Duration::from_secs(10))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Kill the link from the server side.
        server_side.inner.closed.send_replace(true);
        let r = tokio::time::timeout(Duration::from_secs(2), pending)
            .await
            .expect("answered at once")
            .unwrap();
        assert_eq!(r, Err(PeerError::Closed));
        tokio::time::timeout(Duration::from_secs(2), link.closed())
            .await
            .unwrap();
        assert_eq!(
            link.request(b"x".to_vec(), Duration::from_secs(1)).await,
            Err(PeerError::Closed)
        );
    }
}
