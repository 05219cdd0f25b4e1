//! The reference deployment (docker/compose.yml) with real containers: two
//! nginx TLS edges, three berth nodes, a raft of three Consul servers, Redis
//! primary + two replicas + three Sentinels. Images are built locally by
//! docker/build-images.sh; scripts/test.sh (the README's test command) builds
//! them and runs this suite with `--features deploy-tests`.
//!
//! One deployment is brought up and driven through nginx over TLS by
//! berth-loadtest's verifying clients, phase after phase:
//! 1. the protocol over TLS with a certificate made for the test (from a
//!    mounted directory, then from base64 environment), HTTP redirected,
//!    admin routes not reachable, the demo page cached, resumes routed to
//!    their owner;
//! 2. `docker kill` of a berth container;
//! 3. scaling berth to 4;
//! 4. killing the Redis primary (Sentinel failover);
//! 5. one berth container cut off the network, then reconnected;
//!    then a partial partition: one berth container cut from the Consul
//!    servers and the other berth containers only (iptables in its network
//!    namespace), still reaching Redis and nginx: it isolates itself;
//! 6. `docker stop` of a berth container (drain on SIGTERM as PID 1);
//! 7. one Consul server killed;
//! 8. every Consul server killed.
//!
//! The edges route to the passing members in Consul (blocking queries): a
//! killed node leaves them, new nodes join them, and with Consul gone they
//! keep their last upstreams.
//!
//! Every phase checks that nothing acknowledged was lost or applied twice,
//! and prints the sessions its event affected and how long they waited; a
//! phase that finds a problem prints every log line naming its sessions
//! (`BERTH_DEPLOY_LOG=info,berth=debug` sets the nodes' log filter;
//! `BERTH_DEPLOY_KEEP_LOGS=DIR` keeps every container's log in DIR).

#[path = "../it/common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_loadtest::client::{ClientConfig, MobileClient, TlsTrust};
use berth_loadtest::result::RunResult;
use berth_loadtest::run::{self, RunConfig, Scenario};
use serde_json::{json, Value};

use common::*;

/// Sessions driven in each failure phase.
const SESSIONS: usize = 60;

/// Runs `cmd`, panicking with its stderr when it fails; answers stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} could not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A certificate authority made for the test and a server certificate it
/// signed for 127.0.0.1 / localhost (openssl, as the images use).
struct TestCa {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    fn make(dir: &Path, name: &str) -> TestCa {
        let p = |f: &str| dir.join(format!("{name}-{f}"));
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-nodes", "-days", "2"])
                .args(ec)
                .args(["-subj", &format!("/CN=berth test CA {name}")])
                .arg("-keyout")
                .arg(p("ca.key"))
                .arg("-out")
                .arg(p("ca.pem")),
        );
        run_ok(
            Command::new("openssl")
                .args(["req", "-nodes"])
                .args(ec)
                .args(["-subj", "/CN=localhost"])
                .arg("-keyout")
                .arg(p("key.pem"))
                .arg("-out")
                .arg(p("csr.pem")),
        );
        std::fs::write(
            p("ext.cnf"),
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
                .arg("-in")
                .arg(p("csr.pem"))
                .arg("-CA")
                .arg(p("ca.pem"))
                .arg("-CAkey")
                .arg(p("ca.key"))
                .arg("-extfile")
                .arg(p("ext.cnf"))
                .arg("-out")
                .arg(p("cert.pem")),
        );
        TestCa {
            ca: p("ca.pem"),
            cert: p("cert.pem"),
            key: p("key.pem"),
        }
    }

    fn trust(&self) -> TlsTrust {
        TlsTrust::ca_file(&self.ca).expect("the test CA loads")
    }
}

fn base64(path: &Path) -> String {
    base64_text(std::fs::read(path).unwrap())
}

fn base64_text(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

struct Deployment {
    project: String,
    compose: PathBuf,
    https: [u16; 2],
    http: [u16; 2],
    /// Prometheus's published port (the compose profile "monitoring").
    prometheus: u16,
    /// Variables every docker-compose call gets (the compose file reads them).
    env: Mutex<Vec<(String, String)>>,
    trust: Mutex<TlsTrust>,
    _tls_dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Deployment {
    fn up() -> Deployment {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        for image in ["berth-base:local", "berth:local"] {
            let ok = Command::new("docker")
                .args(["image", "inspect", image])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(
                ok,
                "image {image} is missing: run docker/build-images.sh (scripts/test.sh does)"
            );
        }
        let project = format!("berthit{}", std::process::id());
        let tls_dir = std::env::temp_dir().join(&project);
        std::fs::create_dir_all(&tls_dir).unwrap();
        let ca = TestCa::make(&tls_dir, "files");
        // nginx reads TLS_DIR/cert.pem and key.pem (the mounted-file path).
        std::fs::copy(&ca.cert, tls_dir.join("cert.pem")).unwrap();
        std::fs::copy(&ca.key, tls_dir.join("key.pem")).unwrap();
        let (https, http) = ([free_port(), free_port()], [free_port(), free_port()]);
        let prometheus = free_port();
        // berth's cluster.secret, by environment (a fresh one per run).
        let secret = berth_actors::ids::new_token().0;
        // Peer links over TLS, as docker/up.sh sets them up: a cluster CA and
        // a node certificate made by docker/peer-tls.sh, by base64 env.
        let peer_tls = tls_dir.join("peer-tls");
        run_ok(
            Command::new(root.join("docker/peer-tls.sh"))
                .arg(&peer_tls)
                .arg("node"),
        );
        let env = vec![
            (
                "PEER_TLS_CA_BASE64".into(),
                base64(&peer_tls.join("ca.pem")),
            ),
            (
                "PEER_TLS_CERT_BASE64".into(),
                base64(&peer_tls.join("node.pem")),
            ),
            (
                "PEER_TLS_KEY_BASE64".into(),
                base64(&peer_tls.join("node-key.pem")),
            ),
            ("NGINX1_HTTPS".into(), https[0].to_string()),
            ("NGINX2_HTTPS".into(), https[1].to_string()),
            ("NGINX1_HTTP".into(), http[0].to_string()),
            ("NGINX2_HTTP".into(), http[1].to_string()),
            ("PROMETHEUS_PORT".into(), prometheus.to_string()),
            ("TLS_DIR".into(), tls_dir.display().to_string()),
            ("BERTH_SECRET".into(), secret),
            // A whole config file by base64 environment (under the BERTH__*
            // variables the compose file sets).
            (
                "BERTH_CONFIG_BASE64".into(),
                base64_text(format!(
                    "[session]\ndetach_timeout_s = 300\n[log]\nfilter = \"{}\"\n",
                    std::env::var("BERTH_DEPLOY_LOG").unwrap_or_else(|_| "info".into())
                )),
            ),
        ];
        let d = Deployment {
            project,
            compose: root.join("docker/compose.yml"),
            https,
            http,
            prometheus,
            env: Mutex::new(env),
            trust: Mutex::new(ca.trust()),
            _tls_dir: TempDir(tls_dir),
        };
        d.compose_cmd(&["up", "-d"]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while d.healthy_berth() < 3 || !d.edges_answer() {
            assert!(
                Instant::now() < deadline,
                "the deployment never became healthy:\n{}",
                d.logs()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        let first = d.docker(&["logs", &d.container("berth", 1)]);
        let first = first + &d.docker_stderr(&["logs", &d.container("berth", 1)]);
        assert!(
            first.contains("peer links: TLS 1.3"),
            "the reference deployment runs its peer links over TLS:\n{first}"
        );
        d
    }

    /// What `docker ARGS` wrote to stderr (container logs go there too).
    fn docker_stderr(&self, args: &[&str]) -> String {
        Command::new("docker")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }

    /// `docker-compose` on this deployment's project, with its variables.
    fn compose(&self, args: &[&str]) -> Command {
        let env = self.env.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut cmd = Command::new("docker-compose");
        cmd.args(["-p", &self.project, "-f"])
            .arg(&self.compose)
            .args(args)
            .envs(env);
        cmd
    }

    fn compose_cmd(&self, args: &[&str]) -> String {
        run_ok(&mut self.compose(args))
    }

    fn docker(&self, args: &[&str]) -> String {
        run_ok(Command::new("docker").args(args))
    }

    fn container(&self, service: &str, n: u32) -> String {
        format!("{}_{service}_{n}", self.project)
    }

    fn berth_containers(&self, healthy_only: bool) -> Vec<String> {
        let mut cmd = Command::new("docker");
        cmd.args(["ps", "--format", "{{.Names}}", "--filter"])
            .arg(format!("label=com.docker.compose.project={}", self.project))
            .args(["--filter", "label=com.docker.compose.service=berth"]);
        if healthy_only {
            cmd.args(["--filter", "health=healthy"]);
        }
        run_ok(&mut cmd).lines().map(str::to_owned).collect()
    }

    fn healthy_berth(&self) -> usize {
        self.berth_containers(true).len()
    }

    /// Both edges answer the demo page over TLS.
    fn edges_answer(&self) -> bool {
        self.https.iter().all(|p| {
            Command::new("curl")
                .args(["-skf", "-o", "/dev/null"])
                .arg(format!("https://127.0.0.1:{p}/"))
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
    }

    /// GET on a berth container's admin port, from inside it.
    fn admin(&self, container: &str, path: &str) -> String {
        Command::new("docker")
            .args(["exec", container, "curl", "-fsS", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:9090{path}"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Metric `name` summed over the berth containers running now.
    fn metric(&self, name: &str) -> f64 {
        self.berth_containers(false)
            .iter()
            .map(|c| metric_sum(&self.admin(c, "/metrics"), name))
            .sum()
    }

    /// Log lines of the berth containers that contain `needle`.
    fn berth_log_lines(&self, needle: &str) -> usize {
        self.berth_containers(false)
            .iter()
            .map(|c| {
                let out = Command::new("docker").args(["logs", c]).output();
                out.map(|o| {
                    [o.stdout, o.stderr]
                        .iter()
                        .map(|b| String::from_utf8_lossy(b).matches(needle).count())
                        .sum::<usize>()
                })
                .unwrap_or(0)
            })
            .sum()
    }

    /// The lines of every berth container's log (stopped ones too) and of
    /// both edges' that mention one of `needles`: what a failed phase prints
    /// about its problem sessions.
    fn lines_mentioning(&self, needles: &[String]) -> String {
        let mut cmd = Command::new("docker");
        cmd.args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
            .arg(format!("label=com.docker.compose.project={}", self.project));
        let mut out = String::new();
        for c in run_ok(&mut cmd).lines() {
            let Ok(o) = Command::new("docker").args(["logs", "-t", c]).output() else {
                continue;
            };
            for b in [o.stdout, o.stderr] {
                for l in String::from_utf8_lossy(&b).lines() {
                    if needles.iter().any(|n| l.contains(n.as_str())) {
                        out.push_str(&format!("{c}: {l}\n"));
                    }
                }
            }
        }
        out
    }

    /// GET `path` on Prometheus's HTTP API (published on loopback): its
    /// `data`, or `None` while it does not answer.
    fn prometheus_api(&self, path: &str) -> Option<Value> {
        let out = Command::new("curl")
            .args(["-fsS", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:{}{path}", self.prometheus))
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["status"] == "success").then(|| v["data"].clone())
    }

    /// The members each edge routes to now (node ids, sorted), as its
    /// entrypoint last wrote them from Consul.
    fn edge_members(&self) -> Vec<Vec<String>> {
        ["nginx1", "nginx2"]
            .iter()
            .map(|e| {
                let out = Command::new("docker")
                    .args(["exec", &self.container(e, 1), "cat", "/tmp/members"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let mut ids: Vec<String> = out
                    .lines()
                    .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
                    .collect();
                ids.sort();
                ids
            })
            .collect()
    }

    /// Node ids of the berth containers running now (each one's
    /// `/health/live` says its node id).
    fn node_id(&self, container: &str) -> String {
        let live: Value = serde_json::from_str(&self.admin(container, "/health/live"))
            .unwrap_or_else(|e| panic!("{container}: /health/live is not JSON: {e}"));
        live["node"].as_str().expect("node id").to_owned()
    }

    /// The addresses of `container` on its networks.
    fn ips(&self, container: &str) -> Vec<String> {
        self.docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            container,
        ])
        .split_whitespace()
        .map(str::to_owned)
        .collect()
    }

    /// Cuts `victim` off from the three Consul servers and the other berth
    /// containers, both ways, while it still reaches Redis, the Sentinels and
    /// nginx: DROP rules in a chain of the test's own in the container's
    /// network namespace (entered from the host; needs root and iptables).
    /// Docker's own rules there (its DNS, in the nat table) are not touched.
    fn partial_cut(&self, victim: &str) -> PartialCut {
        let pid = self
            .docker(&["inspect", "-f", "{{.State.Pid}}", victim])
            .trim()
            .to_owned();
        let mut peers: Vec<String> = (1..=3)
            .map(|n| self.container(&format!("consul{n}"), 1))
            .collect();
        peers.extend(
            self.berth_containers(false)
                .into_iter()
                .filter(|c| c != victim),
        );
        let ips: Vec<String> = peers.iter().flat_map(|c| self.ips(c)).collect();
        assert!(
            ips.len() >= 4,
            "addresses of the Consul servers and the other nodes: {ips:?}"
        );
        let cut = PartialCut {
            netns: format!("--net=/proc/{pid}/ns/net"),
        };
        cut.iptables(&["-N", PartialCut::CHAIN]);
        for ip in &ips {
            cut.iptables(&["-A", PartialCut::CHAIN, "-s", ip, "-j", "DROP"]);
            cut.iptables(&["-A", PartialCut::CHAIN, "-d", ip, "-j", "DROP"]);
        }
        cut.iptables(&["-I", "INPUT", "-j", PartialCut::CHAIN]);
        cut.iptables(&["-I", "OUTPUT", "-j", PartialCut::CHAIN]);
        cut
    }

    /// How many members each running berth container sees.
    fn member_counts(&self) -> Vec<usize> {
        self.berth_containers(false)
            .iter()
            .map(|c| {
                serde_json::from_str::<Value>(&self.admin(c, "/cluster")).unwrap_or_default()
                    ["members"]
                    .as_array()
                    .map_or(0, Vec::len)
            })
            .collect()
    }

    fn logs(&self) -> String {
        self.compose(&["logs", "--tail", "30"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn urls(&self) -> Vec<String> {
        self.https
            .iter()
            .map(|p| format!("wss://127.0.0.1:{p}/ws"))
            .collect()
    }

    fn load(&self, sessions: usize, secs: u64) -> RunConfig {
        RunConfig {
            urls: self.urls(),
            admin: Arc::new(Mutex::new(Vec::new())),
            sessions,
            duration: Duration::from_secs(secs),
            ramp: Duration::from_millis(500),
            scenario: Scenario::Kv,
            rate: None,
            payload: 16,
            source_ips: Vec::new(),
            progress: false,
            pids: Arc::default(),
            tls: self.trust.lock().unwrap().clone(),
            chat: Default::default(),
        }
    }

    /// Waits until `n` berth containers (default: as many as run) are healthy
    /// and each sees exactly that many members.
    async fn converged(&self, n: Option<usize>, what: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = n.unwrap_or_else(|| self.berth_containers(false).len());
            let counts = self.member_counts();
            if self.healthy_berth() == n && counts.len() == n && counts.iter().all(|c| *c == n) {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the cluster never converged on {n} members: {counts:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A partial partition made by [`Deployment::partial_cut`].
struct PartialCut {
    netns: String,
}

impl PartialCut {
    const CHAIN: &'static str = "BERTH_TEST_CUT";

    fn iptables(&self, args: &[&str]) {
        let ok = Command::new("nsenter")
            .arg(&self.netns)
            .args(["iptables", "-w"])
            .args(args)
            .status()
            .unwrap_or_else(|e| {
                panic!("nsenter could not start ({e}): the partial partition needs root, nsenter (util-linux) and iptables on the host")
            });
        assert!(ok.success(), "iptables {args:?} in {} failed", self.netns);
    }

    /// Removes exactly the test's chain and the jumps to it.
    fn heal(self) {
        self.iptables(&["-D", "INPUT", "-j", Self::CHAIN]);
        self.iptables(&["-D", "OUTPUT", "-j", Self::CHAIN]);
        self.iptables(&["-F", Self::CHAIN]);
        self.iptables(&["-X", Self::CHAIN]);
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // BERTH_DEPLOY_KEEP_LOGS=DIR keeps every container's log there.
        if let Some(dir) = std::env::var_os("BERTH_DEPLOY_KEEP_LOGS") {
            let dir = PathBuf::from(dir);
            let _ = std::fs::create_dir_all(&dir);
            let mut ps = Command::new("docker");
            ps.args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
                .arg(format!("label=com.docker.compose.project={}", self.project));
            let names = ps
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for c in names.lines() {
                if let Ok(o) = Command::new("docker").args(["logs", "-t", c]).output() {
                    let _ =
                        std::fs::write(dir.join(format!("{c}.log")), [o.stdout, o.stderr].concat());
                }
            }
        }
        // With the profile, or its Prometheus would be left behind.
        let _ = self
            .compose(&[
                "--profile",
                "monitoring",
                "down",
                "-v",
                "--remove-orphans",
                "-t",
                "5",
            ])
            .output();
    }
}

fn assert_clean(what: &str, r: &RunResult) {
    let v = &r.verify;
    eprintln!(
        "{what}: {} ops, {:.0} ops/s, p99 {:.1} ms, max {:.1} ms, reconnects {}, errors {:?}, verify {v:?}",
        r.ops, r.ops_per_s, r.latency_ms.p99, r.latency_ms.max, r.reconnects, r.errors
    );
    for f in &r.failover {
        eprintln!(
            "{what}: event {:?} at {:.1} s: {} sessions affected, waited p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            f.event, f.at_s, f.sessions_affected, f.window_ms.p50, f.window_ms.p99, f.window_ms.max
        );
    }
    assert!(r.ops > 0, "{what}: no op was served");
    assert_eq!(
        v.sessions_checked, r.sessions,
        "{what}: every session verified"
    );
    let problems: Vec<String> = r
        .problems
        .iter()
        .map(berth_loadtest::report::problem_line)
        .collect();
    assert_eq!(
        (
            v.lost_acked_ops,
            v.sessions_sent_away,
            v.duplicate_ops,
            v.state_mismatches,
            v.event_gaps,
            v.event_duplicates
        ),
        (0, 0, 0, 0, 0, 0),
        "{what}: nothing lost, no client sent away, nothing applied twice, state never went backwards; {} problem sessions:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Runs traffic for `secs` and, after `at`, marks the event (for the
/// failover window) and applies `chaos`.
async fn under_load(
    d: &Deployment,
    what: &str,
    secs: u64,
    at: Duration,
    chaos: impl FnOnce(),
) -> RunResult {
    let live = run::live();
    let runner = tokio::spawn(run::run(d.load(SESSIONS, secs), live.clone()));
    tokio::time::sleep(at).await;
    live.mark(what);
    // The chaos runs docker commands and sleeps: keep the clients' worker free.
    tokio::task::block_in_place(chaos);
    let r = runner.await.unwrap();
    // A phase where some client waited over 3 s: what the nodes said of
    // sessions they could not reach, and their warnings.
    if r.failover.iter().any(|f| f.window_ms.max > 3000.0) {
        eprintln!(
            "{what}: a client waited over 3 s; the nodes said:\n{}",
            d.lines_mentioning(&[
                "for the hold time".into(),
                "\"WARN\"".into(),
                "\"ERROR\"".into()
            ])
        );
    }
    if !r.problems.is_empty() {
        let ids: Vec<String> = r
            .problems
            .iter()
            .filter_map(|p| p.session.clone())
            .collect();
        eprintln!(
            "{what}: log lines about the problem sessions {ids:?}:\n{}",
            d.lines_mentioning(&ids)
        );
    }
    assert_clean(what, &r);
    r
}

/// The peer-hop share of ops while `f` runs: forwarded ops / all ops.
async fn hop_share<F: std::future::Future<Output = ()>>(d: &Deployment, f: F) -> (f64, f64) {
    let (fwd0, ops0) = (
        d.metric("berth_forwarded_ops_total"),
        d.metric("berth_ops_total"),
    );
    f.await;
    (
        d.metric("berth_forwarded_ops_total") - fwd0,
        d.metric("berth_ops_total") - ops0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_deployment_survives_nodes_redis_consul_and_a_partition() {
    let d = Deployment::up();

    // 1. The protocol through nginx over TLS, the certificate checked against
    // the test's CA (the harness's client speaks wss).
    let (hops, ops) = hop_share(&d, async {
        let r = run::run(d.load(20, 3), run::live()).await;
        assert_clean("through nginx over TLS", &r);
    })
    .await;
    eprintln!("new sessions: {hops} of {ops} ops took a peer hop");
    assert!(ops > 0.0);
    assert!(
        hops <= ops * 0.05,
        "a new session lives on the node its client reached: {hops} of {ops} ops forwarded"
    );

    // Resumes name their owner (?session=&node=) and nginx sends them there:
    // a client that roams to the other edge still reaches its owner directly.
    let (hops, ops) = hop_share(&d, async {
        let mut cfg = ClientConfig::new(d.urls());
        cfg.tls = d.trust.lock().unwrap().clone();
        for i in 0..20 {
            let mut c = MobileClient::new(cfg.clone(), i);
            let deadline = Instant::now() + Duration::from_secs(10);
            let r = c.call("set", json!({"key":"k","value":i}), deadline).await;
            assert_eq!(r.unwrap()["ok"], true);
            let owner = c.owner().map(str::to_owned);
            c.roam().await;
            let r = c.call("get", json!({"key":"k"}), deadline).await.unwrap();
            assert_eq!(r["value"], i, "{r}");
            assert_eq!(c.owner().map(str::to_owned), owner, "the same owner");
        }
    })
    .await;
    eprintln!("roaming resumes with the owner hint: {hops} of {ops} ops took a peer hop");
    assert_eq!(hops, 0.0, "resumes were routed to their owner");

    // berth's configuration by environment, base64 file and defaults, as the
    // node inside the container sees it (the secret is masked).
    let effective = d.docker(&["exec", &d.container("berth", 1), "berth", "--print-config"]);
    assert!(
        effective.contains("session.detach_timeout_s = 300"),
        "BERTH_CONFIG_BASE64 applies: {effective}"
    );
    let secret = d
        .env
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k == "BERTH_SECRET")
        .unwrap()
        .1
        .clone();
    assert!(
        !effective.contains(&secret) && effective.contains("cluster.secret = "),
        "the secret is set and masked: {effective}"
    );

    // Each node registers with one Consul server and keeps passing its check
    // there, although `consul` names all three.
    assert_eq!(
        d.berth_log_lines("does not have associated TTL"),
        0,
        "a TTL pass went to a Consul agent the node is not registered with"
    );

    // Plain HTTP is redirected to the published HTTPS port.
    let (status, head) = http(
        std::net::SocketAddr::from(([127, 0, 0, 1], d.http[0])),
        "GET",
        "/",
        &[],
    );
    assert_eq!(status, 301, "{head}");
    let want = format!("location: https://127.0.0.1:{}/", d.https[0]);
    assert!(head.to_lowercase().contains(&want), "{want} in {head}");
    // The admin port listens on the compose network (Prometheus, the edges'
    // node map), but a drain from another container is refused.
    let from_nginx = d.docker(&[
        "exec",
        &d.container("nginx1", 1),
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        &format!("http://{}:9090/drain", d.container("berth", 1)),
    ]);
    assert_eq!(
        from_nginx, "403",
        "drain over the network without admin.drain_token"
    );
    assert_eq!(d.healthy_berth(), 3, "the refused drain changed nothing");

    // The demo page is served from nginx's cache after the first request.
    let cache_status = || {
        let head = run_ok(
            Command::new("curl")
                .args(["-sk", "-D", "-", "-o", "/dev/null"])
                .arg(format!("https://127.0.0.1:{}/", d.https[1])),
        );
        head.lines()
            .find_map(|l| {
                l.to_lowercase()
                    .strip_prefix("x-cache-status:")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let first = cache_status();
    assert_eq!(
        cache_status(),
        "hit",
        "the demo page is cached (first: {first})"
    );
    // Operator routes are not reachable through nginx.
    for path in ["/metrics", "/health/ready", "/cluster", "/drain"] {
        let code = run_ok(
            Command::new("curl")
                .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("https://127.0.0.1:{}{path}", d.https[0])),
        );
        assert_eq!(code, "404", "{path} is not reachable through nginx");
    }

    // The certificate from base64 environment: nginx2 is recreated with a
    // certificate of another CA, which clients trusting only that CA accept
    // there and refuse on nginx1.
    let other = TestCa::make(&d._tls_dir.0, "base64");
    d.env.lock().unwrap().extend([
        ("TLS_CERT_BASE64".to_string(), base64(&other.cert)),
        ("TLS_KEY_BASE64".to_string(), base64(&other.key)),
    ]);
    d.compose_cmd(&["up", "-d", "--no-deps", "nginx2"]);
    let mut only_other = ClientConfig::new(vec![d.urls()[1].clone()]);
    only_other.tls = other.trust();
    let mut c = MobileClient::new(only_other.clone(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = c.call("set", json!({"key":"k","value":1}), deadline).await;
    assert_eq!(
        r.unwrap()["ok"],
        true,
        "nginx2 serves the base64 certificate"
    );
    only_other.urls = vec![d.urls()[0].clone()];
    let mut c = MobileClient::new(only_other, 0);
    let r = c
        .ensure_connected(Instant::now() + Duration::from_secs(2))
        .await;
    assert!(
        r.is_err() && c.stats.errors.contains_key("client_connect"),
        "nginx1 still serves the mounted file's certificate: {r:?} {:?}",
        c.stats.errors
    );
    // From here on the clients trust both CAs.
    let bundle = d._tls_dir.0.join("both-ca.pem");
    let pem = [&d._tls_dir.0.join("files-ca.pem"), &other.ca]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<String>();
    std::fs::write(&bundle, pem).unwrap();
    *d.trust.lock().unwrap() = TlsTrust::ca_file(&bundle).unwrap();

    // Prometheus (compose profile "monitoring") is off by default; started,
    // it scrapes every node through the compose DNS and loads berth's alert
    // rules.
    let prometheus_containers = || {
        run_ok(
            Command::new("docker")
                .args(["ps", "-q", "--filter"])
                .arg(format!("label=com.docker.compose.project={}", d.project))
                .args(["--filter", "label=com.docker.compose.service=prometheus"]),
        )
    };
    assert!(
        prometheus_containers().trim().is_empty(),
        "Prometheus is off by default"
    );
    d.compose_cmd(&[
        "--profile",
        "monitoring",
        "up",
        "-d",
        "--no-deps",
        "prometheus",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let up = loop {
        let up = d
            .prometheus_api("/api/v1/targets")
            .and_then(|t| t["activeTargets"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|t| t["health"] == "up")
            .count();
        if up == 3 {
            break up;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the 3 nodes ({up} up): {:?}",
            d.prometheus_api("/api/v1/targets")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rules = d
        .prometheus_api("/api/v1/rules")
        .expect("Prometheus's rules");
    let alerts: Vec<String> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["type"] == "alerting")
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    eprintln!("Prometheus: {up} nodes scraped, alert rules loaded: {alerts:?}");
    assert!(
        alerts.iter().any(|a| a == "BerthNodeDown") && alerts.len() >= 10,
        "berth's alert rules are loaded: {alerts:?}"
    );

    // The edges route to the passing members in Consul.
    let running = |d: &Deployment| {
        let mut ids: Vec<String> = d
            .berth_containers(false)
            .iter()
            .map(|c| d.node_id(c))
            .collect();
        ids.sort();
        ids
    };
    let all = running(&d);
    assert_eq!(
        d.edge_members(),
        [all.clone(), all.clone()],
        "edges route to every node"
    );

    // 2. A berth container killed under load: it leaves both edges'
    // upstreams once its TTL check lapses in Consul.
    let killed = d.node_id(&d.container("berth", 2));
    let mut left_edges = None;
    let r = under_load(
        &d,
        "docker kill of a berth container",
        12,
        Duration::from_secs(4),
        || {
            d.docker(&["kill", &d.container("berth", 2)]);
            let at = Instant::now();
            while at.elapsed() < Duration::from_secs(7) {
                if d.edge_members().iter().all(|m| !m.contains(&killed)) {
                    left_edges = Some(at.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        },
    )
    .await;
    assert!(r.failover[0].sessions_affected > 0, "the kill hit sessions");
    let left_edges = left_edges.unwrap_or_else(|| {
        panic!(
            "the killed node was still an upstream 7 s later: {:?}\n{}",
            d.edge_members(),
            d.logs()
        )
    });
    eprintln!(
        "the killed node left both edges' upstreams {:.2} s after the kill (cluster.ttl_ms 1000)",
        left_edges.as_secs_f64()
    );
    let left = d.converged(None, "after the kill").await;
    eprintln!("after the kill: {left} berth nodes serve");

    // 3. Scaled to 4 (starting the killed container again if its restart
    // policy did not, and adding new ones).
    let handoffs = d.metric("berth_handoffs_total");
    under_load(&d, "scale berth to 4", 14, Duration::from_secs(4), || {
        d.compose_cmd(&["up", "-d", "--no-recreate", "--scale", "berth=4"]);
    })
    .await;
    d.converged(Some(4), "after scaling").await;
    let moved = d.metric("berth_handoffs_total") - handoffs;
    eprintln!("scale berth to 4: {moved} sessions handed off to the new nodes");
    assert!(moved > 0.0, "sessions moved to the new nodes");
    // Both edges route to all four, and new sessions reach every node
    // (nginx round-robins a connection without a session id).
    let all = running(&d);
    let deadline = Instant::now() + Duration::from_secs(15);
    while d.edge_members() != [all.clone(), all.clone()] {
        assert!(
            Instant::now() < deadline,
            "the edges never routed to the 4 nodes {all:?}: {:?}",
            d.edge_members()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let served = |d: &Deployment| -> Vec<f64> {
        d.berth_containers(false)
            .iter()
            .map(|c| metric_sum(&d.admin(c, "/metrics"), "berth_ops_total"))
            .collect()
    };
    let before = served(&d);
    let r = run::run(d.load(40, 3), run::live()).await;
    assert_clean("new sessions after scaling", &r);
    let per_node: Vec<f64> = served(&d).iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!("new sessions after scaling: ops served per node {per_node:?}");
    assert!(
        per_node.iter().all(|n| *n > 0.0),
        "every node, the new ones too, serves new sessions: {per_node:?}"
    );

    // 4. The Redis primary killed: Sentinel promotes a replica, berth follows.
    under_load(
        &d,
        "Redis primary killed (Sentinel failover)",
        20,
        Duration::from_secs(4),
        || {
            d.docker(&["kill", &d.container("redis1", 1)]);
        },
    )
    .await;

    // 5. One berth container cut off the network for 5 s while clients write.
    let fenced = d.metric("berth_fenced_writes_total");
    let victim = d.container("berth", 1);
    under_load(
        &d,
        "one berth node cut off the network",
        20,
        Duration::from_secs(4),
        || {
            let net = format!("{}_berth", d.project);
            d.docker(&["network", "disconnect", &net, &victim]);
            std::thread::sleep(Duration::from_secs(5));
            d.docker(&["network", "connect", &net, &victim]);
        },
    )
    .await;
    d.converged(Some(4), "after the partition").await;
    eprintln!(
        "partition: {} checkpoint writes fenced off; the cut-off node rejoined",
        d.metric("berth_fenced_writes_total") - fenced
    );

    // 5b. A partial partition: one berth container cut from the Consul
    // servers and from the other berth containers, still reaching Redis and
    // nginx, with clients writing through nginx throughout. Once its check
    // has lapsed and no peer vouches for it, it isolates itself (releases
    // its sessions, closes its clients with 1012, answers upgrades 503,
    // which nginx takes for "next upstream"); it rejoins after the cut heals.
    let fenced = d.metric("berth_fenced_writes_total");
    let victim = d.container("berth", 2);
    let released = || metric_sum(&d.admin(&victim, "/metrics"), "berth_handoffs_total");
    let released_before = released();
    let mut isolated_after = None;
    let r = under_load(
        &d,
        "one berth node cut from Consul and its peers (partial partition)",
        24,
        Duration::from_secs(4),
        || {
            let cut = d.partial_cut(&victim);
            let at = Instant::now();
            let deadline = at + Duration::from_secs(15);
            while Instant::now() < deadline {
                if metric_sum(&d.admin(&victim, "/metrics"), "berth_isolated") == 1.0 {
                    isolated_after = Some(at.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // Cut for 8 s in all.
            std::thread::sleep(Duration::from_secs(8).saturating_sub(at.elapsed()));
            cut.heal();
        },
    )
    .await;
    let isolated_after = isolated_after
        .unwrap_or_else(|| panic!("the cut-off node never isolated itself:\n{}", d.logs()));
    // Sessions the cut-off node released (its handoffs, whether it left
    // the ring by isolating or the others' sessions came back afterwards).
    let released = released() - released_before;
    d.converged(Some(4), "after the partial partition").await;
    eprintln!(
        "partial partition: isolated {:.1} s after the cut; {} sessions affected; the cut-off node released {released} sessions; {} checkpoint writes fenced off; the node rejoined",
        isolated_after.as_secs_f64(),
        r.failover.first().map_or(0, |f| f.sessions_affected),
        d.metric("berth_fenced_writes_total") - fenced
    );

    // 6. A berth container stopped (SIGTERM to berth as PID 1): it drains,
    // hands its sessions off, closes its clients with 1012, exits 0 within
    // the stop grace period.
    let leaving = d.container("berth", 3);
    under_load(
        &d,
        "docker stop of a berth container (drain)",
        14,
        Duration::from_secs(4),
        || {
            d.docker(&["stop", "-t", "15", &leaving]);
        },
    )
    .await;
    let exit = d.docker(&["inspect", "-f", "{{.State.ExitCode}}", &leaving]);
    assert_eq!(exit.trim(), "0", "berth drained and exited by itself");
    d.converged(Some(3), "after the drain").await;

    // 7. One Consul server killed: nothing changes at the edges (they ask
    // the next server; the nodes registered with it register again).
    let routed = d.edge_members();
    let mut changed = Vec::new();
    under_load(
        &d,
        "one Consul server killed",
        12,
        Duration::from_secs(4),
        || {
            d.docker(&["kill", &d.container("consul1", 1)]);
            let at = Instant::now();
            while at.elapsed() < Duration::from_secs(7) {
                let now = d.edge_members();
                if now != routed {
                    changed.push((at.elapsed(), now));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        },
    )
    .await;
    assert!(
        changed.is_empty(),
        "the edges' upstreams changed after a Consul server was killed (before: {routed:?}): {changed:?}"
    );

    // 8. Consul gone entirely: the edges keep their last upstreams and the
    // cluster serves on.
    // (`docker stop`: a killed container is restarted by its policy.)
    d.docker(&[
        "stop",
        "-t",
        "1",
        &d.container("consul1", 1),
        &d.container("consul2", 1),
        &d.container("consul3", 1),
    ]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = run::run(d.load(20, 4), run::live()).await;
    assert_clean("every Consul server killed", &r);
    assert_eq!(
        d.edge_members(),
        routed,
        "the edges keep their last upstreams while Consul is unreachable"
    );
}
