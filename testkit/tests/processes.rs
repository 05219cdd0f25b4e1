//! The guards against the real binaries (`redis-server`, `consul`:
//! `scripts/install-deps.sh` installs them): each starts, answers, and is
//! gone once dropped.

use std::process::Stdio;
use std::time::Duration;

use berth_testkit::{require_bin, Consul, Redis, RedisOptions, SentinelSet};

/// Whether process `pid` still exists (a zombie counts: the guards wait for
/// their children, so theirs are reaped).
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn set(r: &Redis, v: &str) {
    redis::cmd("SET")
        .arg("k")
        .arg(v)
        .query::<()>(&mut r.conn())
        .unwrap();
}

fn get(r: &Redis) -> Option<String> {
    redis::cmd("GET").arg("k").query(&mut r.conn()).unwrap()
}

#[test]
fn a_redis_restart_keeps_data_only_when_persistent_and_drop_kills_it() {
    let mut plain = Redis::start();
    set(&plain, "a");
    let port = plain.port;
    plain.restart();
    assert_eq!((plain.port, get(&plain)), (port, None), "nothing persisted");

    let mut kept = Redis::start_persistent();
    assert_eq!(kept.url(), format!("redis://127.0.0.1:{}", kept.port));
    set(&kept, "b");
    kept.stop();
    assert!(redis::Client::open(kept.url())
        .unwrap()
        .get_connection()
        .is_err());
    kept.restart();
    assert_eq!(get(&kept).as_deref(), Some("b"));

    let pid = kept.pid().unwrap();
    drop(kept);
    assert!(!alive(pid), "killed and reaped on drop");
}

#[test]
fn a_redis_in_a_given_dir_logs_there_and_leaves_the_dir() {
    let dir = std::env::temp_dir().join(format!("berth-testkit-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("redis.log");
    let mut r = Redis::start_opts(RedisOptions {
        persistent: true,
        dir: Some(dir.clone()),
        log: Some(log.clone()),
    })
    .unwrap();
    set(&r, "c");
    r.restart();
    assert_eq!(get(&r).as_deref(), Some("c"));
    drop(r);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("Ready to accept connections").count(),
        2,
        "the restart appends to the log: {text}"
    );
    assert!(dir.join("appendonlydir").is_dir(), "the given dir is kept");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_sentinel_set_has_two_replicas_in_sync_and_three_sentinels() {
    let s = SentinelSet::start();
    assert_eq!((s.replicas.len(), s.sentinel_ports.len()), (2, 3));
    let url = s.url();
    assert!(
        url.starts_with("redis+sentinel://127.0.0.1:") && url.ends_with("/mymaster"),
        "{url}"
    );
    let master: Vec<String> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("mymaster")
        .query(
            &mut redis::Client::open(format!("redis://127.0.0.1:{}", s.sentinel_ports[0]))
                .unwrap()
                .get_connection()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(master, ["127.0.0.1", &s.primary.port.to_string()]);
}

#[test]
fn a_consul_dev_agent_leads_itself_and_drop_kills_it() {
    let c = Consul::start();
    assert_eq!(c.leader(), Some(c.server_port), "its own raft port leads");
    assert_eq!(c.addr(), format!("http://127.0.0.1:{}", c.http));
    let pid = c.pid();
    drop(c);
    assert!(!alive(pid));
}

#[test]
fn a_consul_with_acls_denies_an_anonymous_write() {
    let token = "0b5c7f5e-8d43-4a0e-9a4f-5a3c1c2b7d10";
    let c = Consul::start_acl(token);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], c.http));
    let (status, _) = berth_testkit::http(addr, "PUT", "/v1/kv/x", &[]);
    assert_eq!(status, 403, "default policy deny");
    let bad = Consul::spawn_dev(&require_bin("consul"), Stdio::null(), Some("a b"));
    assert!(bad.is_err(), "a token that is not letters, digits and '-'");
    assert!(c.wait_leader(Duration::from_secs(1)));
}
