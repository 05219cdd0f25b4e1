//! `berth-loadtest`: drive berth like a crowd of mobile clients, verify that
//! nothing acknowledged was lost, break nodes on purpose.
//!
//! ```text
//! berth-loadtest run --url ws://127.0.0.1:8080/ws --sessions 1000 --duration 30s
//! berth-loadtest local --nodes 3 --sessions 600 --duration 30s --chaos kill:2@10s
//! berth-loadtest local --nodes 3 --sessions 300 --scenario kv-churn \
//!     --chaos 'soak:kills=50,kill-every=10s,restart-after=3s,seed=7'
//! berth-loadtest ceiling --sessions 1000 --duration 20s --scenario echo
//! berth-loadtest local --nodes 3 --berth target/release/examples/chat \
//!     --scenario chat --sessions 300 --rooms 10 --rate 300 --duration 30s
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use berth_loadtest::chat::{ChatConfig, ChatPlan, DEMO_SECRET};
use berth_loadtest::client::TlsTrust;
use berth_loadtest::local::{parse_duration, ChaosPlan, LocalCluster};
use berth_loadtest::result::RunResult;
use berth_loadtest::run::{self, RunConfig, Scenario};
use berth_loadtest::{ceiling, report, threshold};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Load-test harness for berth: real mobile clients, zero-loss verification, chaos"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run against running nodes.
    Run {
        /// WebSocket URL of a node (repeat for several; sessions are spread over them).
        #[arg(long = "url", required = true)]
        urls: Vec<String>,
        /// Admin base URL of a node (repeat), sampled for sessions and memory.
        #[arg(long = "admin")]
        admin: Vec<String>,
        #[command(flatten)]
        load: Load,
    },
    /// Start a local cluster (Redis, Consul, N berth nodes), run, apply chaos, stop it all.
    Local {
        /// berth nodes to start.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Chaos events: kill:N@T, restart:N@T, start@T, drain:N@T, restart-redis@T
        /// (repeat or comma-separate), and at most one soak:
        /// soak:kills=N[,kill-every=10s,restart-after=3s,jitter=2s,first=10s,seed=1]
        /// (kills a random node, seeded, about every kill-every and restarts it
        /// restart-after later on its own ports; never the last live node).
        /// Without --duration the load runs until 5 s after the last event.
        #[arg(long)]
        chaos: Vec<String>,
        /// The berth binary (default: next to this one, then PATH).
        #[arg(long)]
        berth: Option<PathBuf>,
        /// The consul binary (default: .tools/bin/consul, then PATH).
        #[arg(long)]
        consul: Option<PathBuf>,
        /// Peer links over TLS (cluster.tls), with certificates of a cluster
        /// CA made for this run.
        #[arg(long)]
        peer_tls: bool,
        #[command(flatten)]
        load: Load,
    },
    /// The raw WebSocket ceiling: a minimal actix-ws echo server, same client, same options.
    Ceiling {
        /// Where the ceiling server listens.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Its worker threads (match berth's for a fair ratio).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[command(flatten)]
        load: Load,
    },
}

#[derive(Args, Clone)]
struct Load {
    /// Virtual clients (sessions).
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// How long ops are sent (500ms, 30s, 2m) [default: 10s; `local` with
    /// chaos: long enough for its last event, and too short a one is refused].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Clients start spread over this.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    ramp: Duration,
    /// What the clients do.
    #[arg(long, value_enum, default_value = "kv")]
    scenario: Scenario,
    /// Open model: total ops per second (latency from the intended send time). Default: closed model.
    #[arg(long)]
    rate: Option<f64>,
    /// Payload bytes in writes and echoes.
    #[arg(long, default_value_t = 16)]
    payload: usize,
    /// Spread client sockets over 127.0.0.1..127.0.0.N (default: one per 20,000 sessions).
    #[arg(long)]
    source_ips: Option<u8>,
    /// Write the result as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Fail (exit 1) unless this holds, e.g. p99<20ms, lost_acked_ops==0, sessions_sent_away==0, errors<0.1% (repeat).
    #[arg(long = "threshold")]
    thresholds: Vec<String>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    /// With wss:// URLs: trust only the CA certificates of this PEM file
    /// (a private CA, or the reference deployment's own certificate authority).
    #[arg(long, conflicts_with = "insecure")]
    ca_cert: Option<PathBuf>,
    /// With wss:// URLs: accept any server certificate (throw-away self-signed
    /// test deployments only).
    #[arg(long)]
    insecure: bool,
    /// chat: rooms the users are spread over.
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    /// chat: members per room [default: sessions / rooms, rounded up: every
    /// user in one room; larger rooms put users in several].
    #[arg(long)]
    room_size: Option<usize>,
    /// chat: percent of messages that are direct messages to a random user.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    dm_percent: u32,
    /// chat: the HS256 secret clients sign their credentials (JWTs) with;
    /// `local` gives it to its nodes as auth.hs256_secret.
    #[arg(long, default_value = DEMO_SECRET)]
    jwt_secret: String,
    /// chat: after the load, how long clients keep reading for messages owed
    /// to them; one not arrived by then counts as lost.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain: Duration,
}

/// `--duration` when it is not given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

impl Load {
    fn config(&self, urls: Vec<String>, admin: Vec<String>) -> anyhow::Result<RunConfig> {
        let n = self
            .source_ips
            .map(usize::from)
            .unwrap_or_else(|| self.sessions.div_ceil(20_000))
            .max(1);
        let source_ips = if n > 1 {
            (1..=n)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i as u8)))
                .collect()
        } else {
            Vec::new()
        };
        let tls = match (&self.ca_cert, self.insecure) {
            (Some(path), _) => TlsTrust::ca_file(path)?,
            (None, true) => TlsTrust::Insecure,
            (None, false) => TlsTrust::WebPki,
        };
        let chat = chat_config(self);
        if self.scenario == Scenario::Chat {
            ChatPlan::new(self.sessions, &chat, "check").context("--scenario chat")?;
        }
        Ok(RunConfig {
            chat,
            urls,
            admin: Arc::new(Mutex::new(admin)),
            sessions: self.sessions,
            duration: self.duration.unwrap_or(DEFAULT_DURATION),
            ramp: self.ramp,
            scenario: self.scenario,
            rate: self.rate,
            payload: self.payload,
            source_ips,
            progress: !self.quiet,
            pids: Arc::default(),
            tls,
        })
    }
}

/// The chat scenario's settings of `load`.
fn chat_config(load: &Load) -> ChatConfig {
    ChatConfig {
        rooms: load.rooms,
        room_size: load.room_size,
        dm_percent: load.dm_percent,
        jwt_secret: load.jwt_secret.clone(),
        drain: load.drain,
    }
}

fn finish(load: &Load, r: &RunResult) -> anyhow::Result<bool> {
    let parsed = load
        .thresholds
        .iter()
        .map(|t| threshold::parse(t).map_err(|e| anyhow::anyhow!("--threshold {t:?}: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let checks: Vec<_> = parsed.iter().map(|t| t.check(r)).collect();
    println!("{}", report::summary(r, &checks));
    // chat: a message lost, duplicated or out of order fails the run
    // without a threshold.
    let messages_ok = r.messages.is_none() || {
        let v = &r.verify;
        v.lost_messages + v.duplicate_messages + v.messages_out_of_order + v.state_mismatches == 0
    };
    if !messages_ok {
        eprintln!("berth-loadtest: chat messages lost, duplicated or out of order");
    }
    if let Some(p) = &load.json {
        std::fs::write(p, report::json(r)).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &load.report {
        std::fs::write(p, report::html(r, &checks))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(messages_ok && checks.iter().all(|c| c.ok))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ok = match cli.cmd {
        Cmd::Run { urls, admin, load } => {
            let r = run::run(load.config(urls, admin)?, run::live()).await;
            finish(&load, &r)?
        }
        Cmd::Ceiling {
            listen,
            workers,
            load,
        } => {
            if !matches!(load.scenario, Scenario::Echo | Scenario::Idle) {
                bail!("the ceiling server only echoes: use --scenario echo (or idle)");
            }
            let addr = ceiling::spawn(&listen, workers)?;
            eprintln!("ceiling server on {addr}");
            let r = run::run(
                load.config(vec![format!("ws://{addr}/ws")], Vec::new())?,
                run::live(),
            )
            .await;
            finish(&load, &r)?
        }
        Cmd::Local {
            nodes,
            chaos,
            berth,
            consul,
            peer_tls,
            load,
        } => {
            let plan =
                ChaosPlan::parse(&chaos, nodes).map_err(|e| anyhow::anyhow!("--chaos: {e}"))?;
            let mut load = load;
            load.duration = Some(
                plan.duration(load.duration, DEFAULT_DURATION, load.ramp)
                    .map_err(anyhow::Error::msg)?,
            );
            if let Some(soak) = &plan.soak {
                let last = plan.events.last().map_or(0.0, |c| c.at.as_secs_f64());
                eprintln!(
                    "chaos: {soak}: {} kills, the last restart at {last:.1}s; the load runs {:.1}s",
                    soak.kills,
                    (load.ramp + load.duration.unwrap_or(DEFAULT_DURATION)).as_secs_f64()
                );
            }
            let env = match load.scenario {
                Scenario::Chat => {
                    berth_loadtest::chat::node_env(&chat_config(&load), load.sessions)
                }
                _ => Vec::new(),
            };
            let mut cluster = LocalCluster::start_with_env(
                nodes,
                berth.as_deref(),
                consul.as_deref(),
                peer_tls,
                env,
            )?;
            eprintln!(
                "local cluster: {} nodes, peer links {}, logs in {}",
                cluster.nodes.len(),
                if peer_tls { "TLS" } else { "plain" },
                cluster.log_dir().display()
            );
            let cfg = load.config(cluster.urls(), cluster.admins())?;
            let r = berth_loadtest::local::run_with_chaos(&mut cluster, cfg, plan.events).await?;
            drop(cluster);
            finish(&load, &r)?
        }
    };
    if !ok {
        eprintln!("berth-loadtest: the run failed");
        std::process::exit(1);
    }
    Ok(())
}
