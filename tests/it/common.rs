//! Real processes for the integration tests: `redis-server` and the `berth`
//! binary on free loopback ports, each killed when its guard drops (chitchat's
//! `KillOnDrop`), and a WebSocket client (tokio-tungstenite).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

/// A `redis-server` on a free loopback port, without persistence; killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// Append-only file with fsync on every write, so a restart keeps everything.
    persistent: bool,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_opts(false)
    }

    /// A Redis that keeps its data across `restart` (AOF, `appendfsync always`).
    pub fn start_persistent() -> Redis {
        Self::start_opts(true)
    }

    fn start_opts(persistent: bool) -> Redis {
        let bin = which("redis-server").unwrap_or_else(|| {
            panic!("redis-server is not installed: run `scripts/install-deps.sh` (installs Debian's redis-server)")
        });
        for _ in 0..5 {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("berth-it-redis-{port}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut r = Redis {
                child: None,
                port,
                dir,
                persistent,
            };
            r.child = Some(r.spawn(&bin));
            if r.wait_up() {
                return r;
            }
        }
        panic!("redis-server did not start");
    }

    fn spawn(&self, bin: &PathBuf) -> Child {
        Command::new(bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
            })
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server")
    }

    fn wait_up(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(c) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = c.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing was persisted).
    pub fn restart(&mut self) {
        self.stop();
        let bin = which("redis-server").unwrap();
        self.child = Some(self.spawn(&bin));
        assert!(self.wait_up(), "redis-server did not restart");
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `berth` binary; killed on drop. Its stderr is collected for assertions.
pub struct Berth {
    child: Option<Child>,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub node: String,
    log: Arc<Mutex<String>>,
}

/// Environment for a node on loopback ports chosen by the OS.
pub fn base_env() -> Vec<(String, String)> {
    vec![
        ("BERTH__SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        ("BERTH__ADMIN__LISTEN".into(), "127.0.0.1:0".into()),
        (
            "BERTH__LOG__FILTER".into(),
            "info,berth=debug,berth_actors=debug".into(),
        ),
        ("BERTH__STORE__HEALTH_INTERVAL_MS".into(), "200".into()),
        ("BERTH__STORE__OP_TIMEOUT_MS".into(), "500".into()),
    ]
}

/// [`base_env`] with Redis at `redis` and `extra` settings.
pub fn env_with(redis: &Redis, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = base_env();
    env.push(("BERTH__STORE__REDIS_URL".into(), redis.url()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

impl Berth {
    /// A node with the in-memory store.
    pub fn start_memory() -> Berth {
        Self::start_with(&base_env(), &[])
    }

    /// A node with Redis at `url`.
    pub fn start_redis(url: &str) -> Berth {
        let mut env = base_env();
        env.push(("BERTH__STORE__REDIS_URL".into(), url.into()));
        Self::start_with(&env, &[])
    }

    pub fn start_with(env: &[(String, String)], args: &[&str]) -> Berth {
        Self::start_bin(Path::new(env!("CARGO_BIN_EXE_berth")), env, args)
    }

    /// Any berth node binary (an application built on the library).
    pub fn start_bin(bin: &Path, env: &[(String, String)], args: &[&str]) -> Berth {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .current_dir(std::env::temp_dir()) // no config/berth.toml picked up by accident
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("BERTH") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn berth");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("read berth stdout");
        std::thread::spawn(move || for _ in out.lines() {});
        let Some(rest) = line.trim().strip_prefix("berth listening ") else {
            let _ = child.kill();
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "berth did not start: stdout {line:?}, stderr:\n{}",
                log.lock().unwrap()
            );
        };
        let field = |name: &str| {
            rest.split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap()
                .to_owned()
        };
        Berth {
            child: Some(child),
            public: field("public").parse().unwrap(),
            admin: field("admin").parse().unwrap(),
            node: field("node"),
            log,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("berth never logged {needle:?}; log:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("berth did not exit within {within:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin port: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http(self.admin, "GET", path, &[])
    }

    /// The sum of the samples of Prometheus metric `name` on `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        metric_sum(&self.admin_get("/metrics").1, name)
    }
}

/// The sum of every sample of metric `name` (any labels) in a Prometheus text
/// exposition; 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    metric_labeled(text, name, "")
}

/// The sum of the samples of metric `name` whose labels contain `label`
/// (e.g. `reason="tls"`; "" for all); 0 when absent.
pub fn metric_labeled(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name).is_some_and(|rest| {
                (rest.starts_with(' ') && label.is_empty())
                    || (rest.starts_with('{') && rest.contains(label))
            })
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Drop for Berth {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal HTTP/1.1 request (no client crate needed for a loopback GET).
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A protocol client for tests: raw frames in, JSON values out.
pub struct Client {
    pub ws: Ws,
    pub session: Option<String>,
    pub token: Option<String>,
    next_id: u64,
}

/// What `Client::recv` saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    Json(Value),
    Close(Option<u16>, String),
    Ended,
}

impl Got {
    pub fn json(self) -> Value {
        match self {
            Got::Json(v) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }
}

impl Client {
    /// Wraps an already connected stream.
    pub fn from_ws(ws: Ws) -> Client {
        Client {
            ws,
            session: None,
            token: None,
            next_id: 1,
        }
    }

    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timeout")
            .expect("connect");
        Client {
            ws,
            session: None,
            token: None,
            next_id: 1,
        }
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s.to_owned())).await.unwrap();
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Next text or close frame (pings are answered by tungstenite).
    pub async fn recv(&mut self) -> Got {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("recv timeout");
            match m {
                None | Some(Err(_)) => return Got::Ended,
                Some(Ok(Message::Text(t))) => return Got::Json(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(f))) => {
                    let f: Option<CloseFrame> = f;
                    return Got::Close(
                        f.as_ref().map(|f| u16::from(f.code)),
                        f.map(|f| f.reason.to_string()).unwrap_or_default(),
                    );
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        self.recv().await.json()
    }

    /// Waits for a close frame, skipping other frames; its code.
    pub async fn recv_close(&mut self) -> Option<u16> {
        loop {
            match self.recv().await {
                Got::Close(code, _) => return code,
                Got::Ended => return None,
                Got::Json(_) => continue,
            }
        }
    }

    /// `hello`; returns the welcome and remembers session and token.
    pub async fn hello(&mut self, session: Option<&str>, token: Option<&str>, ack: u64) -> Value {
        self.send(json!({"type":"hello","session":session,"token":token,"ack":ack}))
            .await;
        let w = self.recv_json().await;
        if w["type"] == "welcome" {
            self.session = w["session"].as_str().map(str::to_owned);
            self.token = w["token"].as_str().map(str::to_owned);
            self.next_id = w["last_op"].as_u64().unwrap() + 1;
        }
        w
    }

    /// A new session.
    pub async fn new_session(url: &str) -> Client {
        let mut c = Client::connect(url).await;
        let w = c.hello(None, None, 0).await;
        assert_eq!(w["type"], "welcome", "{w}");
        c
    }

    /// Resume `other`'s session on a new connection.
    pub async fn resume(url: &str, session: &str, token: &str, ack: u64) -> (Client, Value) {
        let mut c = Client::connect(url).await;
        let w = c.hello(Some(session), Some(token), ack).await;
        (c, w)
    }

    /// Sends an op with the next id and returns its `result` (events in between are skipped).
    pub async fn op(&mut self, name: &str, args: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.op_with_id(id, name, args).await
    }

    pub async fn op_with_id(&mut self, id: u64, name: &str, args: Value) -> Value {
        self.send(json!({"type":"op","id":id,"op":name,"args":args}))
            .await;
        loop {
            let v = self.recv_json().await;
            if v["type"] == "result" {
                assert_eq!(v["id"], id, "results come in op order: {v}");
                return v;
            }
        }
    }

    /// After an immediate `emit`: its event and its result, which may arrive in
    /// either order, as `[event, result]`.
    pub async fn recv_event_and_result(&mut self) -> [Value; 2] {
        let mut got = [self.recv_json().await, self.recv_json().await];
        got.sort_by_key(|v| v["type"].as_str().unwrap().to_owned());
        got
    }

    pub fn set_next_id(&mut self, id: u64) {
        self.next_id = id;
    }
}

/// Polls `f` until it is true.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn consul_bin() -> PathBuf {
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/consul");
    if local.is_file() {
        return local;
    }
    which("consul").unwrap_or_else(|| {
        panic!("consul is not installed: run `scripts/install-deps.sh` (Consul 1.8.7 from Debian 11, into .tools/bin)")
    })
}

/// A `consul agent -dev` on free loopback ports; killed on drop.
pub struct Consul {
    child: Child,
    pub http: u16,
    /// Raft port (servers of a multi-server cluster).
    pub server_port: u16,
    dir: Option<PathBuf>,
}

impl Consul {
    pub fn start() -> Consul {
        let (child, http_port) =
            berth_loadtest::local::spawn_consul_dev(&consul_bin(), Stdio::null())
                .expect("spawn consul");
        let c = Consul {
            child,
            http: http_port,
            server_port: 0,
            dir: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if c.leader().is_some() {
                return c;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("consul did not elect itself leader");
    }

    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// Three Consul servers (a raft of three) on loopback ports.
    pub fn start_three() -> Vec<Consul> {
        let lan: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for (i, port) in lan.iter().enumerate() {
            let http_port = free_port();
            let server_port = free_port();
            let dir = std::env::temp_dir().join(format!(
                "berth-it-consul-{}-{http_port}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut cmd = Command::new(consul_bin());
            cmd.args([
                "agent",
                "-server",
                "-bootstrap-expect",
                "3",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            // Production raft timing (multiplier 1): elections in about a second.
            .args(["-hcl", "performance { raft_multiplier = 1 }"])
            .args(["-node", &format!("consul-{i}")])
            .arg("-data-dir")
            .arg(&dir)
            .args(["-dns-port", "-1", "-grpc-port", "-1"])
            .args(["-http-port", &http_port.to_string()])
            .args(["-serf-lan-port", &port.to_string()])
            .args(["-serf-wan-port", &free_port().to_string()])
            .args(["-server-port", &server_port.to_string()]);
            for (j, other) in lan.iter().enumerate() {
                if j != i {
                    cmd.arg(format!("-retry-join=127.0.0.1:{other}"));
                }
            }
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn consul server");
            servers.push(Consul {
                child,
                http: http_port,
                server_port,
                dir: Some(dir),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if servers.iter().all(|c| c.leader().is_some()) {
                return servers;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the three consul servers did not elect a leader");
    }

    /// The raft port of the current leader, as this agent sees it.
    pub fn leader(&self) -> Option<u16> {
        let (status, body) = http(
            SocketAddr::from(([127, 0, 0, 1], self.http)),
            "GET",
            "/v1/status/leader",
            &[],
        );
        if status != 200 {
            return None;
        }
        body.rsplit("\"127.0.0.1:")
            .next()?
            .split('"')
            .next()?
            .parse()
            .ok()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.kill();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The shared secret of test clusters.
pub const SECRET: &str = "test-cluster-secret-0123456789";

/// Environment of a clustered node `id` (Consul membership, peer port chosen by the OS).
pub fn cluster_env(consul: &Consul, redis: &Redis, id: &str) -> Vec<(String, String)> {
    let mut env = base_env();
    env.extend([
        ("BERTH__STORE__REDIS_URL".to_string(), redis.url()),
        ("BERTH__CLUSTER__NODE_ID".into(), id.into()),
        ("BERTH__CLUSTER__CONSUL_ADDR".into(), consul.addr()),
        ("BERTH__CLUSTER__SERVICE".into(), "berth-it".into()),
        ("BERTH__CLUSTER__PEER_LISTEN".into(), "127.0.0.1:0".into()),
        ("BERTH__CLUSTER__SECRET".into(), SECRET.into()),
        // Sessions spread over the ring whichever node created them, so the
        // cluster tests exercise the peer hop and the re-route of connections
        // whose owner is elsewhere (the default places new sessions on the
        // node their client connected to: tested on its own).
        ("BERTH__CLUSTER__NEW_SESSIONS_LOCAL".into(), "false".into()),
    ]);
    env
}

impl Berth {
    /// Member ids in this node's view (from `/cluster`).
    pub fn members(&self) -> Vec<String> {
        let (_, body) = self.admin_get("/cluster");
        let v: Value =
            serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap_or("{}")).unwrap_or_default();
        v["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `/cluster` as JSON.
    pub fn cluster(&self) -> Value {
        let (_, body) = self.admin_get("/cluster");
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap_or("{}")).unwrap_or_default()
    }
}

/// Waits until every node sees exactly `ids` as members.
pub async fn converge(nodes: &[&Berth], ids: &[&str]) {
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(&format!("members {want:?}"), || {
        nodes.iter().all(|n| n.members() == want)
    })
    .await;
}

/// A Redis primary, two replicas and three Sentinels on loopback ports.
pub struct SentinelSet {
    pub primary: Redis,
    pub replicas: Vec<Redis>,
    sentinels: Vec<Child>,
    pub sentinel_ports: Vec<u16>,
    dir: PathBuf,
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        let bin = which("redis-server").expect("redis-server: run scripts/install-deps.sh");
        let primary = Redis::start();
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let port = free_port();
            let dir = std::env::temp_dir()
                .join(format!("berth-it-replica-{port}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut r = Redis {
                child: None,
                port,
                dir,
                persistent: false,
            };
            r.child = Some(
                Command::new(&bin)
                    .args([
                        "--port",
                        &port.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    .args(["--replicaof", "127.0.0.1", &primary.port.to_string()])
                    .arg("--dir")
                    .arg(&r.dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            assert!(r.wait_up());
            replicas.push(r);
        }
        let dir = std::env::temp_dir().join(format!(
            "berth-it-sentinels-{}-{}",
            primary.port,
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 2\n",
                    dir.display(),
                    primary.port
                ),
            )
            .unwrap();
            sentinels.push(
                Command::new(&bin)
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            sentinel_ports.push(port);
        }
        // Replicas in sync before anyone writes.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut primary.conn())
                .unwrap();
            if info.contains("connected_slaves:2") && info.matches("state=online").count() == 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replicas never came online: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        SentinelSet {
            primary,
            replicas,
            sentinels,
            sentinel_ports,
            dir,
        }
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
