//! `local`: a real cluster on loopback for a run — a `redis-server`, a Consul
//! dev agent and N `berth` processes, started through the same
//! `berth-testkit` guards as the integration tests' — and the chaos events
//! applied to it. Everything it starts, it stops (processes are killed when
//! the [`LocalCluster`] is dropped).
//!
//! Chaos is a list of events at times (`kill:2@10s`, `restart:2@13s`,
//! `start@20s`, `drain:1@30s`, `restart-redis@40s`) and at most one soak
//! (`soak:kills=50,kill-every=10s,restart-after=3s,seed=7`), which
//! [`Soak::plan`] turns into such events: a node chosen at random (seeded)
//! is killed about every `kill-every` and restarted on its own ports and id
//! `restart-after` later, at most one node down at a time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use berth_testkit::{Berth, BerthCommand, Consul, Redis, RedisOptions};

/// A chaos event at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Chaos {
    /// Seconds from the start of the run.
    pub at: Duration,
    /// What happens.
    pub action: Action,
    /// As written (`kill:2@10s`), or as a soak names it (`kill:2 (soak 3/50)`).
    pub text: String,
    /// The kill this event belongs to when a soak planned it (1-based): a
    /// soak never kills the last live node.
    pub soak: Option<u32>,
}

/// What a chaos event does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL node N (1-based).
    Kill(usize),
    /// Start node N (1-based) again after a kill: the same node id and the
    /// same public, admin and peer ports, so clients find it where it was.
    Restart(usize),
    /// Start a new node.
    Start,
    /// `POST /drain` to node N (1-based).
    Drain(usize),
    /// Restart Redis (it keeps its data: AOF with fsync always).
    RestartRedis,
}

/// Parses a duration like `500ms`, `10s`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 10s or 2m"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("{s:?} is not a positive duration"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

/// Parses `kill:2@10s`, `restart:2@13s`, `start@20s`, `drain:1@30s`,
/// `restart-redis@40s`.
pub fn parse_chaos(s: &str) -> Result<Chaos, String> {
    let (what, at) = s.split_once('@').ok_or_else(|| {
        if s.contains('=') {
            format!("{s:?}: soak settings follow soak:, e.g. soak:kills=3,kill-every=10s")
        } else {
            format!("{s:?}: expected EVENT@TIME, e.g. kill:2@10s")
        }
    })?;
    let at = parse_duration(at)?;
    let node = |n: &str| -> Result<usize, String> {
        n.parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("{s:?}: node numbers start at 1"))
    };
    let action = match what.split_once(':') {
        Some(("kill", n)) => Action::Kill(node(n)?),
        Some(("restart", n)) => Action::Restart(node(n)?),
        Some(("drain", n)) => Action::Drain(node(n)?),
        None if what == "start" => Action::Start,
        None if what == "restart-redis" => Action::RestartRedis,
        _ => {
            return Err(format!(
                "{s:?}: events are kill:N, restart:N, start, drain:N, restart-redis (and soak:...)"
            ))
        }
    };
    Ok(Chaos {
        at,
        action,
        text: s.to_owned(),
        soak: None,
    })
}

/// A soak: `kills` SIGKILLs, each of a node chosen at random (seeded, so a
/// soak is the same schedule every time), about every `kill_every`; each
/// killed node is restarted `restart_after` later, before the next kill.
#[derive(Debug, Clone, PartialEq)]
pub struct Soak {
    /// Kills in all (each followed by its restart).
    pub kills: u32,
    /// Mean time between two kills.
    pub kill_every: Duration,
    /// Each gap between kills is `kill_every` plus or minus up to this
    /// (uniform).
    pub jitter: Duration,
    /// A killed node is restarted this long after its kill.
    pub restart_after: Duration,
    /// Time of the first kill, from the start of the run.
    pub first: Duration,
    /// Seed of the victims and the gaps.
    pub seed: u64,
}

/// The keys of `soak:` (see [`parse_soak`]).
pub const SOAK_KEYS: &str = "kills, kill-every, restart-after, jitter, first, seed";

/// The most kills one soak may plan.
pub const MAX_SOAK_KILLS: u32 = 10_000;

/// How long the load must go on after the last chaos event: its failover
/// window counts the stalls that begin up to 3 s after it, and they need
/// time to end.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Parses `soak:kills=N[,kill-every=D][,restart-after=D][,jitter=D][,first=D][,seed=N]`
/// (defaults: `kill-every=10s`, `restart-after=3s`, `jitter` a fifth of
/// `kill-every`, `first` = `kill-every`, `seed=1`). `restart-after` must be
/// shorter than the shortest gap between two kills (`kill-every - jitter`):
/// a soak has at most one node down at a time, so with 2 nodes or more the
/// cluster always has a live one.
pub fn parse_soak(s: &str) -> Result<Soak, String> {
    let usage = "soak:kills=N[,kill-every=10s,restart-after=3s,jitter=2s,first=10s,seed=1]";
    let body = s
        .strip_prefix("soak:")
        .ok_or_else(|| format!("{s:?}: expected {usage}"))?;
    let (mut kills, mut every, mut restart, mut jitter, mut first, mut seed) =
        (None, None, None, None, None, None);
    for kv in body.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| format!("{s:?}: {kv:?} is not KEY=VALUE (keys: {SOAK_KEYS})"))?;
        let dur = |v: &str| parse_duration(v).map_err(|e| format!("{s:?}: {k}: {e}"));
        let twice = || format!("{s:?}: {k} is given twice");
        match k {
            "kills" => {
                let n = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_SOAK_KILLS).contains(n))
                    .ok_or_else(|| {
                        format!("{s:?}: kills must be a whole number from 1 to {MAX_SOAK_KILLS}")
                    })?;
                kills.replace(n).map_or(Ok(()), |_| Err(twice()))?
            }
            "kill-every" => every.replace(dur(v)?).map_or(Ok(()), |_| Err(twice()))?,
            "restart-after" => restart.replace(dur(v)?).map_or(Ok(()), |_| Err(twice()))?,
            "jitter" => jitter.replace(dur(v)?).map_or(Ok(()), |_| Err(twice()))?,
            "first" => first.replace(dur(v)?).map_or(Ok(()), |_| Err(twice()))?,
            "seed" => {
                let n = v
                    .parse::<u64>()
                    .map_err(|_| format!("{s:?}: seed must be a whole number"))?;
                seed.replace(n).map_or(Ok(()), |_| Err(twice()))?
            }
            other => return Err(format!("{s:?}: unknown key {other:?} (keys: {SOAK_KEYS})")),
        }
    }
    let kills = kills.ok_or_else(|| format!("{s:?}: kills=N is required ({usage})"))?;
    let kill_every = every.unwrap_or(Duration::from_secs(10));
    if kill_every.is_zero() {
        return Err(format!("{s:?}: kill-every must be above 0"));
    }
    let jitter = jitter.unwrap_or(kill_every / 5);
    if jitter >= kill_every {
        return Err(format!(
            "{s:?}: jitter ({jitter:?}) must be below kill-every ({kill_every:?})"
        ));
    }
    let restart_after = restart.unwrap_or(Duration::from_secs(3));
    let shortest = kill_every - jitter;
    if restart_after >= shortest {
        return Err(format!(
            "{s:?}: restart-after ({restart_after:?}) must be shorter than the shortest gap \
             between two kills (kill-every - jitter = {shortest:?}): a soak keeps at most \
             one node down at a time"
        ));
    }
    Ok(Soak {
        kills,
        kill_every,
        jitter,
        restart_after,
        first: first.unwrap_or(kill_every),
        seed: seed.unwrap_or(1),
    })
}

/// SplitMix64: a tiny PRNG whose sequence for a seed never changes (a
/// library's may, between versions), so a soak's seed names one schedule.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is below 2^-40 for the
    /// small `n` used here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Soak {
    /// The events of this soak on a cluster of `nodes` (the victims are
    /// nodes 1..=`nodes`): for kill i, `kill:N (soak i/K)` and, after
    /// `restart_after`, `restart:N (soak i/K)`. The first kill is at
    /// `first`; each next one `kill_every ± jitter` (uniform, whole
    /// milliseconds) after the one before. At most one node is down at a
    /// time, so a soak needs 2 nodes or more.
    pub fn plan(&self, nodes: usize) -> Result<Vec<Chaos>, String> {
        if nodes < 2 {
            return Err(format!(
                "a soak needs 2 nodes or more (--nodes {nodes}): it never kills the last live one"
            ));
        }
        let mut rng = SplitMix64(self.seed);
        let (every, jitter) = (
            self.kill_every.as_millis() as u64,
            self.jitter.as_millis() as u64,
        );
        let mut at = self.first;
        let mut out = Vec::with_capacity(2 * self.kills as usize);
        for i in 1..=self.kills {
            if i > 1 {
                let gap = every - jitter + rng.below(2 * jitter + 1);
                at += Duration::from_millis(gap);
            }
            let node = 1 + rng.below(nodes as u64) as usize;
            let of = format!("(soak {i}/{})", self.kills);
            out.push(Chaos {
                at,
                action: Action::Kill(node),
                text: format!("kill:{node} {of}"),
                soak: Some(i),
            });
            out.push(Chaos {
                at: at + self.restart_after,
                action: Action::Restart(node),
                text: format!("restart:{node} {of}"),
                soak: Some(i),
            });
        }
        Ok(out)
    }
}

impl std::fmt::Display for Soak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "soak:kills={},kill-every={}ms,restart-after={}ms,jitter={}ms,first={}ms,seed={}",
            self.kills,
            self.kill_every.as_millis(),
            self.restart_after.as_millis(),
            self.jitter.as_millis(),
            self.first.as_millis(),
            self.seed
        )
    }
}

/// The chaos of a run: every event in time order (a soak's included), and
/// the soak if there is one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChaosPlan {
    /// Every event, in time order.
    pub events: Vec<Chaos>,
    /// The soak, if one was given.
    pub soak: Option<Soak>,
}

impl ChaosPlan {
    /// Parses the `--chaos` values for a cluster of `nodes`: events and at
    /// most one soak, each value comma-separated. The `KEY=VALUE` settings
    /// after a `soak:` belong to it (`soak:kills=3,kill-every=8s`), so in one
    /// value a soak and events can be mixed: `kill:1@5s,soak:kills=3,seed=2`.
    pub fn parse(args: &[String], nodes: usize) -> Result<ChaosPlan, String> {
        let mut events = Vec::new();
        let mut soak_text: Option<String> = None;
        for arg in args {
            // Whether the tokens of this value go to the soak just begun.
            let mut in_soak = false;
            for token in arg.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if token.starts_with("soak:") {
                    if soak_text.is_some() {
                        return Err(format!("{token:?}: only one soak per run"));
                    }
                    soak_text = Some(token.to_owned());
                    in_soak = true;
                } else if in_soak && !token.contains('@') {
                    if let Some(s) = soak_text.as_mut() {
                        s.push(',');
                        s.push_str(token);
                    }
                } else {
                    in_soak = false;
                    events.push(parse_chaos(token)?);
                }
            }
        }
        let soak = soak_text.as_deref().map(parse_soak).transpose()?;
        if let Some(s) = &soak {
            events.extend(s.plan(nodes)?);
        }
        events.sort_by_key(|c| c.at);
        Ok(ChaosPlan { events, soak })
    }

    /// How long the load (ramp and duration) must run to hold every event
    /// and [`SETTLE`] after the last one; `None` without events.
    pub fn needed_load(&self) -> Option<Duration> {
        self.events.iter().map(|c| c.at).max().map(|t| t + SETTLE)
    }

    /// The `--duration` of a run with `ramp`: `given` if it is long enough
    /// for the events ([`ChaosPlan::needed_load`]), an error saying how
    /// long it must be if not; without `given`, the longer of `default` and
    /// what the events need.
    pub fn duration(
        &self,
        given: Option<Duration>,
        default: Duration,
        ramp: Duration,
    ) -> Result<Duration, String> {
        let Some(needed) = self.needed_load() else {
            return Ok(given.unwrap_or(default));
        };
        let least = needed.saturating_sub(ramp);
        match given {
            Some(d) if d < least => {
                let last = needed - SETTLE;
                Err(format!(
                    "--duration {:.1}s is too short for the chaos: its last event is at {:.1}s \
                     and the load must go on {}s after it (failover windows), so with --ramp \
                     {:.1}s the duration must be at least {}s; pass a longer --duration or \
                     leave it out to derive it",
                    d.as_secs_f64(),
                    last.as_secs_f64(),
                    SETTLE.as_secs(),
                    ramp.as_secs_f64(),
                    least.as_secs_f64().ceil()
                ))
            }
            Some(d) => Ok(d),
            None => Ok(default.max(Duration::from_secs(least.as_secs_f64().ceil() as u64))),
        }
    }
}

/// `bin` at `hint` (made absolute: the nodes run in the cluster's own
/// directory, where a relative `--berth ./berth` would name nothing), or
/// where [`berth_testkit::find_bin`] finds it: next to this executable
/// (cargo's target dir), the project's `.tools/bin`, then `PATH`.
fn find(bin: &str, hint: Option<&Path>) -> Option<PathBuf> {
    match hint {
        Some(h) => h.is_file().then(|| h.canonicalize().ok()).flatten(),
        None => berth_testkit::find_bin(bin).ok(),
    }
}

/// One berth process.
pub struct Node {
    /// Node id.
    pub id: String,
    /// `ws://…/ws`.
    pub url: String,
    /// `http://…` admin base.
    pub admin: String,
    /// Where it listens (a restart listens there again).
    listen: Listen,
    /// Its process while running (`None` once killed).
    process: Option<Berth>,
}

impl Node {
    /// Its PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Berth::pid)
    }

    /// Whether its process is running (not killed).
    pub fn running(&self) -> bool {
        self.process.is_some()
    }
}

/// The addresses a node listens on (`127.0.0.1:0` before its first start).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listen {
    public: String,
    admin: String,
    peer: String,
}

impl Listen {
    fn any() -> Listen {
        let any = "127.0.0.1:0".to_owned();
        Listen {
            public: any.clone(),
            admin: any.clone(),
            peer: any,
        }
    }
}

/// The nodes' log filter: `warn,berth=info`, or `BERTH_LOADTEST_LOG_FILTER`
/// when set (`warn,berth=debug,berth_actors=debug` to follow attaches).
fn node_log_filter() -> String {
    std::env::var("BERTH_LOADTEST_LOG_FILTER").unwrap_or_else(|_| "warn,berth=info".into())
}

/// How many times a restart is tried (another socket may hold one of the
/// node's ports for a moment) and the pause between two tries.
const RESTART_TRIES: u32 = 10;
const RESTART_PAUSE: Duration = Duration::from_millis(300);

/// A running local cluster.
pub struct LocalCluster {
    dir: PathBuf,
    berth: PathBuf,
    /// A dev agent, its log in `dir`/consul.log.
    consul: Consul,
    /// Persistent (AOF, fsync always), its data and `redis.log` in `dir`.
    redis: Redis,
    /// The berth nodes, in start order (node N is `nodes[N-1]`).
    pub nodes: Vec<Node>,
    secret: String,
    /// Peer-link TLS: a throwaway cluster CA whose certificates the nodes use.
    tls: Option<berth_cluster::tls::dev::DevCa>,
    /// More environment for every node (after the cluster's own, so it
    /// wins): what a scenario's application needs (`chat`: `[auth]`).
    env: Vec<(String, String)>,
}

impl LocalCluster {
    /// Starts Redis, Consul and `n` nodes (plain peer links).
    pub fn start(
        n: usize,
        berth: Option<&Path>,
        consul: Option<&Path>,
    ) -> anyhow::Result<LocalCluster> {
        Self::start_with_tls(n, berth, consul, false)
    }

    /// As [`LocalCluster::start`]; with `peer_tls`, the nodes' peer links
    /// run TLS with certificates of a cluster CA made for this run (files in
    /// the log directory).
    pub fn start_with_tls(
        n: usize,
        berth: Option<&Path>,
        consul: Option<&Path>,
        peer_tls: bool,
    ) -> anyhow::Result<LocalCluster> {
        Self::start_with_env(n, berth, consul, peer_tls, Vec::new())
    }

    /// As [`LocalCluster::start_with_tls`], every node (also those started
    /// or restarted later) with the environment variables `env` besides the
    /// cluster's own (`BERTH__AUTH__REQUIRED`, say).
    pub fn start_with_env(
        n: usize,
        berth: Option<&Path>,
        consul: Option<&Path>,
        peer_tls: bool,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<LocalCluster> {
        let berth = find("berth", berth).context(
            "berth binary not found: build it (cargo build --release) or pass --berth PATH",
        )?;
        let consul_bin = find("consul", consul)
            .context("consul not found: run scripts/install-deps.sh or pass --consul PATH")?;
        let dir = std::env::temp_dir().join(format!("berth-loadtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let redis = Redis::start_opts(RedisOptions {
            persistent: true,
            dir: Some(dir.clone()),
            log: Some(dir.join("redis.log")),
        })
        .context("starting redis-server")?;
        let log = std::fs::File::create(dir.join("consul.log"))?;
        let consul =
            Consul::spawn_dev(&consul_bin, Stdio::from(log), None).context("starting consul")?;
        if !consul.wait_leader(Duration::from_secs(15)) {
            bail!(
                "consul did not elect itself leader; see {}",
                dir.join("consul.log").display()
            );
        }
        let mut c = LocalCluster {
            dir,
            berth,
            consul,
            redis,
            nodes: Vec::new(),
            secret: "berth-loadtest-local-secret".into(),
            tls: peer_tls.then(|| berth_cluster::tls::dev::DevCa::new("berth-loadtest local CA")),
            env,
        };
        if let Some(ca) = &c.tls {
            std::fs::write(c.dir.join("peer-ca.pem"), ca.ca_pem())?;
        }
        for _ in 0..n {
            c.start_node()?;
        }
        Ok(c)
    }

    /// Starts one more node; answers its index (1-based).
    pub fn start_node(&mut self) -> anyhow::Result<usize> {
        let i = self.nodes.len() + 1;
        let id = format!("node{i}");
        let (process, listen) = self.spawn(&id, &Listen::any(), false)?;
        self.nodes.push(Node {
            id,
            url: format!("ws://{}/ws", listen.public),
            admin: format!("http://{}", listen.admin),
            listen,
            process: Some(process),
        });
        Ok(i)
    }

    /// Starts node `n` (1-based) again after a kill, with its id and on its
    /// ports; tries `RESTART_TRIES` times if a port is still taken.
    pub fn restart_node(&mut self, n: usize) -> anyhow::Result<()> {
        let node = self.nodes.get(n - 1).context("no such node")?;
        if node.running() {
            bail!("node {n} is running");
        }
        let (id, listen) = (node.id.clone(), node.listen.clone());
        let mut tries = 0;
        let process = loop {
            tries += 1;
            match self.spawn(&id, &listen, true) {
                Ok((process, got)) if got == listen => break process,
                Ok((process, got)) => {
                    drop(process); // killed
                    bail!("node {n} came back on {got:?}, not on {listen:?}");
                }
                Err(e) if tries >= RESTART_TRIES => {
                    return Err(e.context(format!("restarting node {n}: {tries} tries")))
                }
                Err(_) => std::thread::sleep(RESTART_PAUSE),
            }
        };
        self.nodes[n - 1].process = Some(process);
        Ok(())
    }

    /// Starts a berth process with node id `id` listening on `listen`
    /// (its log appended to, on a restart); answers it and where it listens.
    fn spawn(&self, id: &str, listen: &Listen, restart: bool) -> anyhow::Result<(Berth, Listen)> {
        let path = self.dir.join(format!("{id}.log"));
        let mut log = if restart {
            std::fs::OpenOptions::new().append(true).open(&path)?
        } else {
            std::fs::File::create(&path)?
        };
        if restart {
            writeln!(log, "--- berth-loadtest: restarting {id} on {listen:?} ---")?;
        }
        let mut cmd = BerthCommand::new(&self.berth);
        if let Some(ca) = &self.tls {
            // A certificate per node, as an operator would issue them.
            let (cert, key) = (
                self.dir.join(format!("{id}-peer.pem")),
                self.dir.join(format!("{id}-peer-key.pem")),
            );
            if !restart {
                let n = ca.issue(&[berth_cluster::tls::DEFAULT_SERVER_NAME]);
                std::fs::write(&cert, n.cert_pem)?;
                std::fs::write(&key, n.key_pem)?;
            }
            cmd = cmd
                .env("BERTH__CLUSTER__TLS__CA_FILE", self.dir.join("peer-ca.pem"))
                .env("BERTH__CLUSTER__TLS__CERT_FILE", cert)
                .env("BERTH__CLUSTER__TLS__KEY_FILE", key);
        }
        let mut cmd = cmd
            .current_dir(&self.dir)
            .env("BERTH__SERVER__LISTEN", &listen.public)
            .env("BERTH__ADMIN__LISTEN", &listen.admin)
            .env("BERTH__CLUSTER__PEER_LISTEN", &listen.peer)
            .env("BERTH__CLUSTER__NODE_ID", id)
            .env("BERTH__CLUSTER__CONSUL_ADDR", self.consul.addr())
            .env("BERTH__CLUSTER__SECRET", &self.secret)
            .env("BERTH__STORE__REDIS_URL", self.redis.url())
            .env("BERTH__LIMITS__FRAMES_PER_SEC", "100000")
            .env("BERTH__LIMITS__FRAMES_BURST", "100000")
            // Every virtual client comes from one source: no per-source
            // connection rate (churning clients reconnect hundreds of times
            // a second).
            .env("BERTH__LIMITS__CONNECTIONS_PER_SEC_PER_SOURCE", "0")
            .env("BERTH__LOG__FILTER", node_log_filter());
        for (k, v) in &self.env {
            cmd = cmd.env(k, v);
        }
        let process = cmd
            .log_file(log)
            .spawn()
            .with_context(|| format!("berth did not start; see {}", path.display()))?;
        let got = Listen {
            public: process.public.to_string(),
            admin: process.admin.to_string(),
            // Without it, a restart lets the node pick a new peer port (it
            // registers it in Consul).
            peer: process.peer.clone().unwrap_or_else(|| listen.peer.clone()),
        };
        Ok((process, got))
    }

    /// Why event `ev` is not applied now, if it is not: a kill of a node
    /// that is not running, a restart of one that is, or a soak's kill of
    /// the last live node.
    pub fn skip_reason(&self, ev: &Chaos) -> Option<String> {
        let running = |n: usize| self.nodes.get(n - 1).map(Node::running);
        match ev.action {
            Action::Kill(n) | Action::Restart(n) | Action::Drain(n) if running(n).is_none() => {
                Some(format!("there is no node {n}"))
            }
            Action::Kill(n) | Action::Drain(n) if running(n) == Some(false) => {
                Some(format!("node {n} is not running"))
            }
            Action::Restart(n) if running(n) == Some(true) => Some(format!("node {n} is running")),
            Action::Kill(n)
                if ev.soak.is_some()
                    && !self
                        .nodes
                        .iter()
                        .enumerate()
                        .any(|(i, node)| i + 1 != n && node.running()) =>
            {
                Some(format!("node {n} is the last live node"))
            }
            _ => None,
        }
    }

    /// WebSocket URLs of the nodes started so far.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// Admin bases of the nodes started so far.
    pub fn admins(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.admin.clone()).collect()
    }

    /// Applies a chaos action.
    pub fn apply(&mut self, a: &Action) -> anyhow::Result<()> {
        match a {
            Action::Kill(n) => {
                let node = self.nodes.get_mut(n - 1).context("no such node")?;
                if let Some(mut p) = node.process.take() {
                    p.kill9();
                }
            }
            Action::Restart(n) => self.restart_node(*n)?,
            Action::Start => {
                self.start_node()?;
            }
            Action::Drain(n) => {
                let node = self.nodes.get(n - 1).context("no such node")?;
                let addr = node.admin.trim_start_matches("http://").to_owned();
                use std::io::Write;
                let mut s = std::net::TcpStream::connect(&addr)?;
                s.write_all(format!("POST /drain HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())?;
            }
            Action::RestartRedis => self
                .redis
                .try_restart()
                .context("restarting redis-server")?,
        }
        Ok(())
    }

    /// Where the processes' logs are.
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }
}

/// Runs the load of `cfg` against `cluster` and applies `events` at their
/// times, marking each on the charts; answers the run's result. An event
/// that does not apply (see [`LocalCluster::skip_reason`]) is skipped and
/// said so on stderr, without a mark; so are the events still due when the
/// load has ended.
pub async fn run_with_chaos(
    cluster: &mut LocalCluster,
    cfg: crate::run::RunConfig,
    mut events: Vec<Chaos>,
) -> anyhow::Result<crate::result::RunResult> {
    events.sort_by_key(|c| c.at);
    let (admin, pids) = (cfg.admin.clone(), cfg.pids.clone());
    let sync = |c: &LocalCluster| {
        let mut p = pids.lock().unwrap_or_else(|p| p.into_inner());
        for n in &c.nodes {
            if let Some(pid) = n.pid() {
                p.insert(n.id.clone(), pid);
            }
        }
        *admin.lock().unwrap_or_else(|p| p.into_inner()) = c.admins();
    };
    sync(cluster);
    let live = crate::run::live();
    let runner = tokio::spawn(crate::run::run(cfg, live.clone()));
    let (mut applied, mut skipped) = (0usize, 0usize);
    for ev in &events {
        tokio::time::sleep(ev.at.saturating_sub(live.elapsed())).await;
        if runner.is_finished() {
            break;
        }
        sync(cluster); // record peak RSS of a node before it is killed
        if let Some(why) = cluster.skip_reason(ev) {
            skipped += 1;
            eprintln!(
                "chaos: {} at {:.1}s skipped: {why}",
                ev.text,
                live.elapsed().as_secs_f64()
            );
            continue;
        }
        // Starting a node blocks for as long as it takes; off the runtime's
        // workers, so the clients are not held up by it.
        blocking(|| cluster.apply(&ev.action)).with_context(|| format!("chaos {}", ev.text))?;
        live.mark(ev.text.clone());
        applied += 1;
        sync(cluster);
        eprintln!("chaos: {} at {:.1}s", ev.text, live.elapsed().as_secs_f64());
    }
    if applied + skipped < events.len() {
        eprintln!(
            "chaos: the load ended before {} of {} events; they were not applied",
            events.len() - applied - skipped,
            events.len()
        );
    }
    Ok(runner.await?)
}

/// Runs `f`, which blocks, off the async workers when the runtime has
/// several (in place on a current-thread runtime).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // The nodes first (killed as their guards drop), then Consul and
        // Redis, as the fields drop.
        self.nodes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaos_specs_parse() {
        assert_eq!(parse_chaos("kill:2@10s").unwrap().action, Action::Kill(2));
        assert_eq!(
            parse_chaos("start@1.5s").unwrap().at,
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_chaos("drain:1@2m").unwrap().at,
            Duration::from_secs(120)
        );
        assert_eq!(
            parse_chaos("restart-redis@500ms").unwrap().action,
            Action::RestartRedis
        );
        assert!(parse_chaos("kill:0@1s").is_err());
        assert!(parse_chaos("explode@1s").is_err());
        assert!(parse_chaos("kill:1").is_err());
        assert!(parse_duration("soon").is_err());
        let r = parse_chaos("restart:2@13s").unwrap();
        assert_eq!(
            (r.action, r.at),
            (Action::Restart(2), Duration::from_secs(13))
        );
        assert!(parse_chaos("restart:0@1s").is_err());
        assert!(parse_chaos("restart@1s").is_err());
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_soak_parses_with_defaults_and_every_key() {
        let s = parse_soak("soak:kills=50").unwrap();
        assert_eq!(
            s,
            Soak {
                kills: 50,
                kill_every: secs(10.0),
                jitter: secs(2.0),
                restart_after: secs(3.0),
                first: secs(10.0),
                seed: 1,
            }
        );
        let s = parse_soak(
            "soak:kill-every=8s, restart-after=2500ms,kills=3,jitter=1s,first=5s,seed=7",
        )
        .unwrap();
        assert_eq!(
            s,
            Soak {
                kills: 3,
                kill_every: secs(8.0),
                jitter: secs(1.0),
                restart_after: secs(2.5),
                first: secs(5.0),
                seed: 7,
            }
        );
        // Display writes what parses back to the same soak.
        assert_eq!(parse_soak(&s.to_string()).unwrap(), s);
        assert_eq!(
            parse_soak("soak:kills=1,jitter=0s").unwrap().jitter,
            secs(0.0)
        );
    }

    #[test]
    fn a_bad_soak_is_refused_with_the_reason() {
        let err = |s: &str| parse_soak(s).unwrap_err();
        assert!(
            err("soak:").contains("kills=N is required"),
            "{}",
            err("soak:")
        );
        assert!(err("soak:kill-every=5s").contains("kills=N is required"));
        for bad in [
            "soak:kills=0",
            "soak:kills=-1",
            "soak:kills=x",
            "soak:kills=10001",
        ] {
            assert!(err(bad).contains("kills must be"), "{bad}: {}", err(bad));
        }
        assert!(err("soak:kills=3,boom=1").contains("unknown key \"boom\""));
        assert!(err("soak:kills=3,boom=1").contains(SOAK_KEYS));
        assert!(err("soak:kills=3,kill-every").contains("is not KEY=VALUE"));
        assert!(err("soak:kills=3,kill-every=soon").contains("kill-every"));
        assert!(err("soak:kills=3,kills=4").contains("kills is given twice"));
        assert!(err("soak:kills=3,seed=-1").contains("seed must be"));
        assert!(err("soak:kills=3,kill-every=0s").contains("kill-every must be above 0"));
        assert!(err("soak:kills=3,kill-every=5s,jitter=5s").contains("jitter"));
        // 3 s down, but kills may come 8 s - 6 s = 2 s apart: two nodes down.
        let e = err("soak:kills=3,kill-every=8s,jitter=6s,restart-after=3s");
        assert!(
            e.contains("restart-after") && e.contains("at most one node down"),
            "{e}"
        );
        assert!(
            err("soak:kills=3,kill-every=3s,jitter=0s,restart-after=3s").contains("restart-after")
        );
        assert!(err("kills=3").contains("expected soak:"));
    }

    #[test]
    fn a_soak_plan_is_reproducible_and_keeps_one_node_down_at_most() {
        let soak = parse_soak("soak:kills=50,kill-every=10s,restart-after=3s,seed=7").unwrap();
        let plan = soak.plan(3).unwrap();
        assert_eq!(plan, soak.plan(3).unwrap(), "the same seed, the same plan");
        let other = Soak {
            seed: 8,
            ..soak.clone()
        }
        .plan(3)
        .unwrap();
        assert_ne!(plan, other, "another seed, another plan");
        assert_eq!(plan.len(), 100);
        let mut victims = std::collections::BTreeSet::new();
        for (i, pair) in plan.chunks(2).enumerate() {
            let [kill, restart] = pair else {
                unreachable!()
            };
            let Action::Kill(n) = kill.action else {
                panic!("{kill:?}")
            };
            assert!((1..=3).contains(&n), "{kill:?}");
            victims.insert(n);
            assert_eq!(restart.action, Action::Restart(n));
            assert_eq!(restart.at, kill.at + secs(3.0));
            let k = i as u32 + 1;
            assert_eq!((kill.soak, restart.soak), (Some(k), Some(k)));
            assert_eq!(kill.text, format!("kill:{n} (soak {k}/50)"));
            assert_eq!(restart.text, format!("restart:{n} (soak {k}/50)"));
            if i == 0 {
                assert_eq!(kill.at, secs(10.0), "the first kill at first=");
            } else {
                let gap = kill.at - plan[2 * i - 2].at;
                assert!(gap >= secs(8.0) && gap <= secs(12.0), "{gap:?}");
                // The node killed before is back before this kill.
                assert!(plan[2 * i - 1].at < kill.at);
            }
        }
        assert_eq!(victims.len(), 3, "every node is killed some time");
        let gaps: std::collections::BTreeSet<_> = plan
            .chunks(2)
            .map(|p| p[0].at.as_millis() % 10_000)
            .collect();
        assert!(gaps.len() > 10, "jittered gaps");
        let e = soak.plan(1).unwrap_err();
        assert!(e.contains("2 nodes or more"), "{e}");
    }

    #[test]
    fn the_soak_prng_is_splitmix64() {
        // The reference sequence of SplitMix64 for seed 0: a seed names the
        // same schedule in every version.
        let mut r = SplitMix64(0);
        assert_eq!(r.next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next(), 0x6E78_9E6A_A1B9_65F4);
    }

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn chaos_values_hold_events_and_one_soak() {
        let plan = ChaosPlan::parse(
            &args(&[
                "soak:kills=2,kill-every=8s,first=5s,seed=3,start@40s",
                "kill:1@1s",
            ]),
            3,
        )
        .unwrap();
        let soak = plan.soak.clone().unwrap();
        assert_eq!((soak.kills, soak.kill_every, soak.seed), (2, secs(8.0), 3));
        assert_eq!(plan.events.len(), 6);
        assert_eq!(plan.events[0].text, "kill:1@1s");
        assert_eq!(plan.events[5].text, "start@40s");
        assert!(
            plan.events.windows(2).all(|w| w[0].at <= w[1].at),
            "in time order"
        );
        assert_eq!(plan.events.iter().filter(|c| c.soak.is_some()).count(), 4);
        // Settings after a soak, then events, then nothing more for it.
        let e = ChaosPlan::parse(&args(&["soak:kills=2,kill:1@1s,seed=3"]), 3).unwrap_err();
        assert!(e.contains("soak settings follow soak:"), "{e}");
        let e = ChaosPlan::parse(&args(&["soak:kills=1", "soak:kills=2"]), 3).unwrap_err();
        assert!(e.contains("only one soak"), "{e}");
        let e = ChaosPlan::parse(&args(&["soak:kills=1"]), 1).unwrap_err();
        assert!(e.contains("2 nodes or more"), "{e}");
        let e = ChaosPlan::parse(&args(&["soak:kills=1,bogus=2"]), 3).unwrap_err();
        assert!(e.contains("unknown key"), "{e}");
        assert_eq!(ChaosPlan::parse(&[], 3).unwrap(), ChaosPlan::default());
    }

    #[test]
    fn the_duration_holds_every_event_or_is_refused() {
        let ten = secs(10.0);
        let ramp = secs(1.0);
        let none = ChaosPlan::default();
        assert_eq!(none.duration(None, ten, ramp), Ok(ten));
        assert_eq!(none.duration(Some(secs(2.0)), ten, ramp), Ok(secs(2.0)));
        let plan =
            ChaosPlan::parse(&args(&["soak:kills=3,kill-every=8s,first=5s,seed=1"]), 3).unwrap();
        let last = plan.events.last().unwrap().at;
        assert_eq!(plan.needed_load(), Some(last + SETTLE));
        // Derived: the load (ramp + duration) reaches SETTLE past the last event.
        let d = plan.duration(None, ten, ramp).unwrap();
        assert!(
            ramp + d >= last + SETTLE && ramp + d < last + SETTLE + secs(1.0),
            "{d:?}"
        );
        assert_eq!(plan.duration(Some(secs(100.0)), ten, ramp), Ok(secs(100.0)));
        let e = plan.duration(Some(secs(20.0)), ten, ramp).unwrap_err();
        assert!(e.contains("too short") && e.contains("at least"), "{e}");
        // An early event: the default is kept.
        let early = ChaosPlan::parse(&args(&["kill:1@2s"]), 3).unwrap();
        assert_eq!(early.duration(None, ten, ramp), Ok(ten));
    }
}
