//! `local`: a real cluster on loopback for a run — a `redis-server`, a Consul
//! dev agent and N `berth` processes (the same processes the cluster tests
//! start) — and the chaos events applied to it. Everything it starts, it
//! stops (processes are killed when the [`LocalCluster`] is dropped).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A chaos event at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Chaos {
    /// Seconds from the start of the run.
    pub at: Duration,
    /// What happens.
    pub action: Action,
    /// As written (`kill:2@10s`).
    pub text: String,
}

/// What a chaos event does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL node N (1-based).
    Kill(usize),
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

/// Parses `kill:2@10s`, `start@20s`, `drain:1@30s`, `restart-redis@40s`.
pub fn parse_chaos(s: &str) -> Result<Chaos, String> {
    let (what, at) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?}: expected EVENT@TIME, e.g. kill:2@10s"))?;
    let at = parse_duration(at)?;
    let node = |n: &str| -> Result<usize, String> {
        n.parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("{s:?}: node numbers start at 1"))
    };
    let action = match what.split_once(':') {
        Some(("kill", n)) => Action::Kill(node(n)?),
        Some(("drain", n)) => Action::Drain(node(n)?),
        None if what == "start" => Action::Start,
        None if what == "restart-redis" => Action::RestartRedis,
        _ => {
            return Err(format!(
                "{s:?}: events are kill:N, start, drain:N, restart-redis"
            ))
        }
    };
    Ok(Chaos {
        at,
        action,
        text: s.to_owned(),
    })
}

use berth_cluster::dev_agent::free_port;

fn find(bin: &str, hint: Option<&Path>) -> Option<PathBuf> {
    if let Some(h) = hint {
        return h.is_file().then(|| h.to_path_buf());
    }
    // Next to this executable (cargo's target dir), the project's .tools/bin, then PATH.
    let exe_dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    let candidates = [
        exe_dir.join(bin),
        exe_dir.join("../../.tools/bin").join(bin),
        PathBuf::from(".tools/bin").join(bin),
    ];
    candidates.into_iter().find(|p| p.is_file()).or_else(|| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(bin))
                .find(|p| p.is_file())
        })
    })
}

/// A `consul agent -dev` on free loopback ports (see
/// [`berth_cluster::dev_agent`]): the child and its HTTP port.
pub use berth_cluster::dev_agent::spawn as spawn_consul_dev;

/// One berth process.
pub struct Node {
    /// Node id.
    pub id: String,
    /// `ws://…/ws`.
    pub url: String,
    /// `http://…` admin base.
    pub admin: String,
    child: Option<Child>,
}

impl Node {
    /// Its PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A running local cluster.
pub struct LocalCluster {
    dir: PathBuf,
    berth: PathBuf,
    redis_bin: PathBuf,
    redis: Option<Child>,
    redis_port: u16,
    consul: Option<Child>,
    consul_http: u16,
    /// The berth nodes, in start order (node N is `nodes[N-1]`).
    pub nodes: Vec<Node>,
    secret: String,
}

impl LocalCluster {
    /// Starts Redis, Consul and `n` nodes.
    pub fn start(
        n: usize,
        berth: Option<&Path>,
        consul: Option<&Path>,
    ) -> anyhow::Result<LocalCluster> {
        let berth = find("berth", berth).context(
            "berth binary not found: build it (cargo build --release) or pass --berth PATH",
        )?;
        let consul_bin = find("consul", consul)
            .context("consul not found: run scripts/install-deps.sh or pass --consul PATH")?;
        let redis_bin = find("redis-server", None)
            .context("redis-server not found: run scripts/install-deps.sh")?;
        let dir = std::env::temp_dir().join(format!("berth-loadtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut c = LocalCluster {
            dir,
            berth,
            redis_bin,
            redis: None,
            redis_port: free_port(),
            consul: None,
            consul_http: 0,
            nodes: Vec::new(),
            secret: "berth-loadtest-local-secret".into(),
        };
        c.start_redis()?;
        let log = std::fs::File::create(c.dir.join("consul.log"))?;
        let (child, http) =
            spawn_consul_dev(&consul_bin, Stdio::from(log)).context("starting consul")?;
        c.consul = Some(child);
        c.consul_http = http;
        wait_tcp(c.consul_http, Duration::from_secs(15)).context("consul did not start")?;
        std::thread::sleep(Duration::from_millis(1500)); // leader election of the dev agent
        for _ in 0..n {
            c.start_node()?;
        }
        Ok(c)
    }

    fn start_redis(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("redis.log"))?;
        self.redis = Some(
            Command::new(&self.redis_bin)
                .args([
                    "--port",
                    &self.redis_port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(log)
                .stderr(Stdio::null())
                .spawn()
                .context("starting redis-server")?,
        );
        wait_tcp(self.redis_port, Duration::from_secs(10)).context("redis did not start")
    }

    /// Starts one more node; answers its index (1-based).
    pub fn start_node(&mut self) -> anyhow::Result<usize> {
        let i = self.nodes.len() + 1;
        let id = format!("node{i}");
        let log = std::fs::File::create(self.dir.join(format!("{id}.log")))?;
        let mut child = Command::new(&self.berth)
            .current_dir(&self.dir)
            .env("BERTH__SERVER__LISTEN", "127.0.0.1:0")
            .env("BERTH__ADMIN__LISTEN", "127.0.0.1:0")
            .env("BERTH__CLUSTER__PEER_LISTEN", "127.0.0.1:0")
            .env("BERTH__CLUSTER__NODE_ID", &id)
            .env(
                "BERTH__CLUSTER__CONSUL_ADDR",
                format!("http://127.0.0.1:{}", self.consul_http),
            )
            .env("BERTH__CLUSTER__SECRET", &self.secret)
            .env(
                "BERTH__STORE__REDIS_URL",
                format!("redis://127.0.0.1:{}", self.redis_port),
            )
            .env("BERTH__LIMITS__FRAMES_PER_SEC", "100000")
            .env("BERTH__LIMITS__FRAMES_BURST", "100000")
            .env("BERTH__LOG__FILTER", "warn,berth=info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting berth")?;
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        std::thread::spawn(move || for _ in out.lines() {});
        let Some(rest) = line.trim().strip_prefix("berth listening ") else {
            let _ = child.kill();
            bail!(
                "berth did not start; see {}",
                self.dir.join(format!("{id}.log")).display()
            );
        };
        let field = |k: &str| {
            rest.split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or_default()
                .to_owned()
        };
        self.nodes.push(Node {
            id,
            url: format!("ws://{}/ws", field("public")),
            admin: format!("http://{}", field("admin")),
            child: Some(child),
        });
        Ok(i)
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
                if let Some(mut c) = node.child.take() {
                    c.kill()?;
                    let _ = c.wait();
                }
            }
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
            Action::RestartRedis => {
                if let Some(mut r) = self.redis.take() {
                    r.kill()?;
                    let _ = r.wait();
                }
                self.start_redis()?;
            }
        }
        Ok(())
    }

    /// Where the processes' logs are.
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }
}

/// Runs the load of `cfg` against `cluster` and applies `events` at their
/// times, marking each on the charts; answers the run's result.
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
    for ev in &events {
        tokio::time::sleep(ev.at.saturating_sub(live.elapsed())).await;
        if runner.is_finished() {
            break;
        }
        sync(cluster); // record peak RSS of a node before it is killed
        cluster
            .apply(&ev.action)
            .with_context(|| format!("chaos {}", ev.text))?;
        live.mark(ev.text.clone());
        sync(cluster);
        eprintln!("chaos: {} at {:.1}s", ev.text, live.elapsed().as_secs_f64());
    }
    Ok(runner.await?)
}

fn wait_tcp(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on 127.0.0.1:{port}")
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for c in [self.consul.take(), self.redis.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
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
    }
}
