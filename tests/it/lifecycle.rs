//! Configuration sources, SIGHUP, SIGTERM and drain, through the real binary.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

fn tmp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("berth-it-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("berth.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn berth() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.current_dir(std::env::temp_dir());
    for (k, _) in std::env::vars() {
        if k.starts_with("BERTH") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn config_precedence_file_then_base64_then_env() {
    let file = tmp_file(
        "prec",
        "[store]\nkey_prefix = \"from-file\"\nbatch_max = 7\nop_timeout_ms = 111\n",
    );
    let out = berth()
        .arg("--config")
        .arg(&file)
        .arg("--print-config")
        .env(
            "BERTH_CONFIG_BASE64",
            b64("[store]\nkey_prefix = \"from-base64\"\nop_timeout_ms = 222\n"),
        )
        .env("BERTH__STORE__KEY_PREFIX", "from-env")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("store.batch_max = 7"),
        "file beats defaults:\n{text}"
    );
    assert!(
        text.contains("store.op_timeout_ms = 222"),
        "base64 beats file:\n{text}"
    );
    assert!(
        text.contains("store.key_prefix = \"from-env\""),
        "env beats base64:\n{text}"
    );
    assert!(
        text.contains("server.listen = \"0.0.0.0:8080\""),
        "defaults fill the rest:\n{text}"
    );
    // BERTH_CONFIG names the file too.
    let out = berth()
        .arg("--print-config")
        .env("BERTH_CONFIG", &file)
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().contains("from-file"));
}

#[test]
fn a_bad_value_stops_start_up_naming_key_and_source() {
    let out = berth()
        .env("BERTH__SERVER__MAX_FRAME_BYTES", "huge")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("server.max_frame_bytes") && err.contains("BERTH__SERVER__MAX_FRAME_BYTES"),
        "{err}"
    );

    let file = tmp_file("bad", "[server]\nlisten = \"port eighty\"\n");
    let out = berth().arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("server.listen") && err.contains(file.to_str().unwrap()),
        "{err}"
    );

    let out = berth()
        .env(
            "BERTH_CONFIG_BASE64",
            b64("[store]\ndurability = \"maybe\"\n"),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("store.durability") && err.contains("BERTH_CONFIG_BASE64"),
        "{err}"
    );
}

#[tokio::test]
async fn sighup_reloads_limits_and_log_filter() {
    let redis = Redis::start();
    let cfg = |max_state: u32, filter: &str| {
        format!("[store]\nredis_url = \"{}\"\n[limits]\nmax_state_bytes = {max_state}\n[log]\nfilter = \"{filter}\"\n[server]\nlisten = \"127.0.0.1:0\"\nping_interval_ms = 60000\n[admin]\nlisten = \"127.0.0.1:0\"\n", redis.url())
    };
    let file = tmp_file("hup", &cfg(65536, "info"));
    let node = Berth::start_with(&[], &["--config", file.to_str().unwrap()]);
    let mut c = Client::new_session(&node.ws_url()).await;
    assert_eq!(
        c.op("set", json!({"key":"a","value":"x".repeat(200)}))
            .await["ok"],
        true
    );

    std::fs::write(
        &file,
        cfg(100, "debug") + "[session]\ndetach_timeout_s = 5\n",
    )
    .unwrap();
    node.signal("HUP");
    node.wait_log("limits.max_state_bytes: 65536 -> 100");
    node.wait_log("log.filter");
    node.wait_log("session.detach_timeout_s: 120 -> 5");
    node.wait_log("takes effect after a restart");
    let r = c
        .op("set", json!({"key":"b","value":"y".repeat(200)}))
        .await;
    assert_eq!(r["error"]["code"], "too_large", "new limit applies: {r}");

    // A bad file on reload keeps the running configuration.
    std::fs::write(&file, "[limits]\nmax_state_bytes = \"lots\"\n").unwrap();
    node.signal("HUP");
    node.wait_log("configuration rejected; keeping the running one");
    assert_eq!(c.op("echo", json!({"value":1})).await["ok"], true);
}

#[tokio::test]
async fn sigterm_checkpoints_live_sessions_and_closes_1001() {
    // Interval durability with a long interval: acknowledged writes are only in
    // memory until the shutdown checkpoints them.
    let redis = Redis::start();
    let mut env = base_env();
    env.push(("BERTH__STORE__REDIS_URL".into(), redis.url()));
    env.push(("BERTH__STORE__DURABILITY".into(), "interval".into()));
    env.push((
        "BERTH__STORE__CHECKPOINT_INTERVAL_MS".into(),
        "600000".into(),
    ));
    let mut node = Berth::start_with(&env, &[]);
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = Client::new_session(&node.ws_url()).await;
        for _ in 0..=i {
            c.op("incr", json!({"key":"n"})).await;
        }
        clients.push(c);
    }
    node.signal("TERM");
    for c in &mut clients {
        assert_eq!(c.recv_close().await, Some(1001));
    }
    let status = node.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    node.wait_log("checkpointed=20");

    let fresh = Berth::start_redis(&redis.url());
    for (i, c) in clients.iter().enumerate() {
        let (mut r, w) = Client::resume(
            &fresh.ws_url(),
            c.session.as_deref().unwrap(),
            c.token.as_deref().unwrap(),
            0,
        )
        .await;
        assert_eq!(w["last_op"], i as u64 + 1);
        assert_eq!(r.op("get", json!({"key":"n"})).await["value"], i as u64 + 1);
    }
}

#[tokio::test]
async fn drain_checkpoints_closes_1012_and_exits() {
    let redis = Redis::start();
    let mut node = Berth::start_redis(&redis.url());
    let mut c = Client::new_session(&node.ws_url()).await;
    c.op("set", json!({"key":"k","value":"v"})).await;
    let (status, _) = http(node.admin, "POST", "/drain", &[]);
    assert_eq!(status, 202);
    assert_eq!(c.recv_close().await, Some(1012));
    assert!(node.wait_exit(Duration::from_secs(15)).success());
    let fresh = Berth::start_redis(&redis.url());
    let (mut r, _) = Client::resume(
        &fresh.ws_url(),
        c.session.as_deref().unwrap(),
        c.token.as_deref().unwrap(),
        0,
    )
    .await;
    assert_eq!(r.op("get", json!({"key":"k"})).await["value"], "v");
}

/// While a node drains, a new WebSocket upgrade is answered 503 at once (a
/// proxy then tries its next upstream): the listener is not paused, which
/// would leave the connection unanswered in its backlog until the node
/// exits. Redis is stopped (SIGSTOP) so that the drain's final checkpoint
/// keeps the node draining for a while.
#[tokio::test]
async fn a_draining_node_answers_new_upgrades_503_at_once() {
    let redis = Redis::start();
    let mut node = Berth::start_with(
        &env_with(&redis, &[("BERTH__STORE__OP_TIMEOUT_MS", "3000")]),
        &[],
    );
    let mut c = Client::new_session(&node.ws_url()).await;
    c.op("incr", json!({"key":"n"})).await;
    let redis_pid = redis.pid().expect("redis runs").to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &redis_pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} redis");
    };
    signal("-STOP");
    let (status, _) = http(node.admin, "POST", "/drain", &[]);
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let answer = upgrade_status(&node.ws_url()).await;
    let waited = started.elapsed();
    let refused = metric_labeled(
        &node.admin_get("/metrics").1,
        "berth_connections_refused_total",
        "reason=\"stopping\"",
    );
    signal("-CONT");
    assert_eq!(
        answer, 503,
        "an upgrade during the drain (after {waited:?})"
    );
    assert_eq!(refused, 1.0);
    assert!(node.wait_exit(Duration::from_secs(15)).success());
}

#[tokio::test]
async fn drain_with_a_token_needs_the_token_and_refuses_everything_else() {
    let mut env = base_env();
    env.push(("BERTH__ADMIN__DRAIN_TOKEN".into(), "drain-me-please".into()));
    let mut node = Berth::start_with(&env, &[]);
    let mut c = Client::new_session(&node.ws_url()).await;
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-token")],
        vec![("Authorization", "drain-me-please")],
    ] {
        let (status, body) = http(node.admin, "POST", "/drain", &headers);
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert!(body.contains("admin.drain_token"), "{body}");
    }
    // Refused drains change nothing: the node still serves.
    assert_eq!(c.op("incr", json!({"key":"n"})).await["value"], 1);
    let (_, ready) = node.admin_get("/health/ready");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let (status, _) = http(
        node.admin,
        "POST",
        "/drain",
        &[("Authorization", "Bearer drain-me-please")],
    );
    assert_eq!(status, 202);
    assert_eq!(c.recv_close().await, Some(1012));
    assert!(node.wait_exit(Duration::from_secs(15)).success());
}

#[tokio::test]
async fn detached_sessions_passivate_and_reactivate() {
    let redis = Redis::start();
    let mut env = base_env();
    env.push(("BERTH__STORE__REDIS_URL".into(), redis.url()));
    env.push(("BERTH__SESSION__DETACH_TIMEOUT_S".into(), "1".into()));
    let node = Berth::start_with(&env, &[]);
    let mut c = Client::new_session(&node.ws_url()).await;
    c.op("incr", json!({"key":"n"})).await;
    let (sid, tok) = (c.session.clone().unwrap(), c.token.clone().unwrap());
    drop(c);
    let live = || {
        let (_, body) = node.admin_get("/cluster");
        let v: serde_json::Value =
            serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        v["sessions_live"].as_u64().unwrap()
    };
    eventually("passivation", || live() == 0).await;
    let (mut c, w) = Client::resume(&node.ws_url(), &sid, &tok, 0).await;
    assert_eq!(w["resumed"], true);
    assert_eq!(live(), 1);
    assert_eq!(c.op_with_id(2, "get", json!({"key":"n"})).await["value"], 1);
}
