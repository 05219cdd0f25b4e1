//! The reference deployment (docker/compose.yml) with real containers: two
//! nginx TLS edges, three berth nodes, a raft of three Consul servers, Redis
//! primary + two replicas + three Sentinels. Images are built locally by
//! docker/build-images.sh.
//!
//! Not yet part of the README's test command: run it with
//! `docker/build-images.sh && cargo test --features deploy-tests --test deploy -- --nocapture`.
//! Status: every phase passed on the last runs, after three fixes this suite
//! led to (stale actors after a partition, a re-attach closing its own
//! connection as taken over, containers advertising an IP that changes on
//! reconnect). It joins the README's test command once it has passed often
//! enough to be trusted in CI.

#[path = "../it/common.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_loadtest::result::RunResult;
use berth_loadtest::run::{self, RunConfig, Scenario};

use common::*;

struct Deployment {
    project: String,
    compose: PathBuf,
    https: [u16; 2],
    http: [u16; 2],
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
        let d = Deployment {
            project: format!("berthit{}", std::process::id()),
            compose: root.join("docker/compose.yml"),
            https: [free_port(), free_port()],
            http: [free_port(), free_port()],
        };
        d.compose_cmd(&["up", "-d"]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while d.healthy_berth() < 3 {
            assert!(
                Instant::now() < deadline,
                "berth containers never became healthy:\n{}",
                d.logs()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        d
    }

    fn compose_cmd(&self, args: &[&str]) -> String {
        let out = Command::new("docker-compose")
            .args(["-p", &self.project, "-f"])
            .arg(&self.compose)
            .args(args)
            .env("NGINX1_HTTPS", self.https[0].to_string())
            .env("NGINX2_HTTPS", self.https[1].to_string())
            .env("NGINX1_HTTP", self.http[0].to_string())
            .env("NGINX2_HTTP", self.http[1].to_string())
            .output()
            .expect("docker-compose");
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn docker(&self, args: &[&str]) {
        let out = Command::new("docker").args(args).output().expect("docker");
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn container(&self, service: &str, n: u32) -> String {
        format!("{}_{service}_{n}", self.project)
    }

    fn healthy_berth(&self) -> usize {
        let out = Command::new("docker")
            .args([
                "ps",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.project),
            ])
            .args([
                "--filter",
                "label=com.docker.compose.service=berth",
                "--filter",
                "health=healthy",
                "-q",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    fn logs(&self) -> String {
        let out = Command::new("docker-compose")
            .args(["-p", &self.project, "-f"])
            .arg(&self.compose)
            .args(["logs", "--tail", "30"])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
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
            insecure: true,
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = Command::new("docker-compose")
            .args(["-p", &self.project, "-f"])
            .arg(&self.compose)
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
}

fn assert_clean(what: &str, r: &RunResult) {
    let v = &r.verify;
    eprintln!(
        "{what}: {} ops, {:.0} ops/s, p99 {:.1} ms, max {:.1} ms, reconnects {}, errors {:?}, verify {v:?}",
        r.ops, r.ops_per_s, r.latency_ms.p99, r.latency_ms.max, r.reconnects, r.errors
    );
    assert!(r.ops > 0, "{what}: no op was served");
    assert_eq!(
        v.sessions_checked, r.sessions,
        "{what}: every session verified"
    );
    assert_eq!(
        (
            v.lost_acked_ops,
            v.duplicate_ops,
            v.state_mismatches,
            v.event_gaps,
            v.event_duplicates
        ),
        (0, 0, 0, 0, 0),
        "{what}: nothing lost, nothing applied twice, state never went backwards"
    );
}

/// Runs traffic for `secs` and applies `chaos` after `at`.
async fn under_load(
    d: &Deployment,
    what: &str,
    secs: u64,
    at: Duration,
    chaos: impl FnOnce(),
) -> RunResult {
    let runner = tokio::spawn(run::run(d.load(60, secs), run::live()));
    tokio::time::sleep(at).await;
    chaos();
    let r = runner.await.unwrap();
    assert_clean(what, &r);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_deployment_survives_nodes_redis_consul_and_a_partition() {
    let d = Deployment::up();

    // The protocol through nginx over TLS (the harness's client speaks wss).
    let r = run::run(d.load(20, 3), run::live()).await;
    assert_clean("through nginx over TLS", &r);
    // Plain HTTP is redirected; operator routes are not exposed.
    let (status, head) = http(
        std::net::SocketAddr::from(([127, 0, 0, 1], d.http[0])),
        "GET",
        "/",
        &[],
    );
    assert_eq!(status, 301, "{head}");
    assert!(head.to_lowercase().contains("location: https://"), "{head}");
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("https://127.0.0.1:{}/metrics", d.https[0]))
        .output();
    if let Ok(o) = out {
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "404",
            "admin routes are not reachable through nginx"
        );
    }

    under_load(
        &d,
        "docker kill of a berth container",
        12,
        Duration::from_secs(4),
        || d.docker(&["kill", &d.container("berth", 2)]),
    )
    .await;

    under_load(&d, "scale berth to 4", 14, Duration::from_secs(4), || {
        d.compose_cmd(&["up", "-d", "--no-recreate", "--scale", "berth=4"]);
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.healthy_berth() < 4 {
        assert!(
            Instant::now() < deadline,
            "the fourth node never became healthy"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    under_load(
        &d,
        "Redis primary killed (Sentinel failover)",
        20,
        Duration::from_secs(4),
        || d.docker(&["kill", &d.container("redis1", 1)]),
    )
    .await;

    under_load(
        &d,
        "one berth node cut off the network",
        20,
        Duration::from_secs(4),
        || {
            let net = format!("{}_berth", d.project);
            let victim = d.container("berth", 1);
            d.docker(&["network", "disconnect", &net, &victim]);
            std::thread::sleep(Duration::from_secs(5));
            d.docker(&["network", "connect", &net, &victim]);
        },
    )
    .await;

    under_load(
        &d,
        "one Consul server killed",
        12,
        Duration::from_secs(4),
        || d.docker(&["kill", &d.container("consul1", 1)]),
    )
    .await;
}
