//! The JavaScript client (`clients/js/berth.js`): its own Node tests
//! (`node --test`, against this package's `berth` binary, real Redis and
//! Consul), and the same client in headless Chromium against a three-node
//! cluster whose node under the client is SIGKILLed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::browser::{js, Browser};
use crate::common::*;

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// Node 20 or later, or a panic that says how to get it (tests never skip).
fn node() -> PathBuf {
    let node = berth_testkit::find_bin("node").unwrap_or_else(|_| {
        panic!(
            "node is not installed: the JavaScript client's tests need Node.js 20 or later \
             on PATH (Debian 12: `apt-get install nodejs` gives 18; use NodeSource's nodejs 20)"
        )
    });
    let out = Command::new(&node)
        .arg("--version")
        .output()
        .expect("run node --version");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "{} is node {version}: the JavaScript client's tests need Node.js 20 or later (WebSocket)",
        node.display()
    );
    node
}

#[test]
fn the_javascript_clients_node_tests_pass_against_real_nodes() {
    let node = node();
    let dir = client_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("test"))
        .expect("clients/js/test")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no clients/js/test/*.test.mjs");
    // Output to files (no pipe to fill), and a deadline: a hung run is
    // killed and its output shown.
    let log_dir = std::env::temp_dir().join(format!("berth-js-tests-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).unwrap();
    let (out_path, err_path) = (log_dir.join("stdout"), log_dir.join("stderr"));
    let mut child = Command::new(node)
        .arg("--experimental-websocket")
        .arg("--no-warnings")
        .arg("--test")
        .arg("--test-reporter=spec")
        .args(&files)
        .current_dir(&dir)
        .env("BERTH_BIN", berth_bin())
        .env(
            "REDIS_SERVER_BIN",
            berth_testkit::require_bin("redis-server"),
        )
        .env("CONSUL_BIN", berth_testkit::require_bin("consul"))
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run node --test");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let text = format!(
        "{}\n{}",
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&log_dir);
    let Some(status) = status else {
        panic!("node --test clients/js/test/*.test.mjs ran over 600 s and was killed:\n{text}");
    };
    assert!(
        status.success(),
        "node --test clients/js/test/*.test.mjs failed ({status}):\n{text}"
    );
    assert!(text.contains("fail 0"), "{text}");
}

/// berth.d.ts as an app's TypeScript sees it (`tsc --noEmit --strict` on
/// clients/js/test/types.ts: every use accepted, every misuse refused), and
/// the same names exported by berth.js as declared there.
#[test]
fn the_typescript_declarations_type_check_and_match_the_module() {
    let tsc = berth_testkit::find_bin("tsc").unwrap_or_else(|_| {
        panic!(
            "tsc is not installed: the declarations' check needs TypeScript \
             (Debian: `apt-get install node-typescript`; scripts/install-deps.sh does)"
        )
    });
    let dir = client_dir();
    let out = Command::new(tsc)
        .args([
            "--noEmit", "--strict", "--target", "es2020", "--module", "es2020",
        ])
        .args(["--moduleResolution", "node", "--lib", "es2020,dom"])
        .arg("test/types.ts")
        .current_dir(&dir)
        .output()
        .expect("run tsc");
    assert!(
        out.status.success(),
        "tsc refused clients/js/test/types.ts against berth.d.ts:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The values berth.js exports, and those berth.d.ts declares.
    let out = Command::new(node())
        .args([
            "--input-type=module",
            "-e",
            "const m = await import('./berth.js'); console.log(Object.keys(m).sort().join(' '))",
        ])
        .current_dir(&dir)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let dts = std::fs::read_to_string(dir.join("berth.d.ts")).unwrap();
    let mut declared: Vec<&str> = dts
        .lines()
        .filter_map(|l| l.strip_prefix("export declare "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|name| name.split(['(', ':', '<']).next().unwrap_or(name))
        .collect();
    declared.sort();
    assert_eq!(
        exported,
        declared.join(" "),
        "berth.js exports what berth.d.ts declares"
    );
}

/// Serves `page` at `/` and clients/js/berth.js at `/berth.js` on a
/// loopback port (the page's origin; berth's nodes are other origins).
async fn serve_page(page: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let js = std::fs::read_to_string(client_dir().join("berth.js")).expect("berth.js");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let js = js.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, kind, body) = match path {
                    "/" => ("200 OK", "text/html; charset=utf-8", page.to_owned()),
                    "/berth.js" => ("200 OK", "text/javascript; charset=utf-8", js),
                    _ => ("404 Not Found", "text/plain", "not found".to_owned()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/")
}

const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>berth.js</title>
<script type="module">
import {BerthClient, webStorage} from '/berth.js';
// The client of this tab, on the nodes the test gives, its session in localStorage.
window.startClient = urls => {
  const c = new BerthClient({urls, storage: webStorage(localStorage)});
  window.client = c; window.got = []; window.restored = [];
  c.on('result', r => window.restored.push(r));
  return c.start();
};
window.loaded = true;
</script>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_client_in_chromium_applies_ops_once_across_a_node_kill_and_a_reload() {
    let consul = Consul::start();
    let redis = Redis::start();
    let ids = ["a", "b", "c"];
    let mut nodes: Vec<Berth> = ids
        .iter()
        .map(|id| {
            let mut env = cluster_env(&consul, &redis, id);
            env.push(("BERTH__CLUSTER__TTL_MS".into(), "1000".into()));
            Berth::start_with(&env, &[])
        })
        .collect();
    converge(&nodes.iter().collect::<Vec<_>>(), &ids).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.ws_url()).collect();
    let page = serve_page(PAGE).await;

    let mut b = Browser::start().await;
    let tab = b.open(&page).await;
    b.wait(&tab, "window.loaded", "berth.js loaded as a module")
        .await;
    b.eval(&tab, &format!("startClient({})", js(&urls))).await;
    b.wait(&tab, "client.state === 'connected'", "connected")
        .await;
    // One op at a time, a little apart, so that the kill lands mid-stream.
    b.eval(
        &tab,
        "window.run = (async () => { for (let i = 0; i < 40; i++) { \
           got.push(await client.op('incr', {key: 'n'})); \
           await new Promise(r => setTimeout(r, 25)); } })(); true",
    )
    .await;
    b.wait(&tab, "got.length >= 15", "15 answers").await;
    let on = b.eval(&tab, "client.url").await;
    let victim = nodes
        .iter()
        .position(|n| on.as_str() == Some(n.ws_url().as_str()))
        .unwrap_or_else(|| panic!("the tab is on none of the nodes: {on}"));
    nodes[victim].kill9();
    b.wait(&tab, "got.length === 40", "every op answered").await;
    let got: Vec<u64> = serde_json::from_value(b.eval(&tab, "got").await).unwrap();
    assert_eq!(got, (1..=40).collect::<Vec<_>>(), "each op once, in order");
    let now_on = b.eval(&tab, "client.url").await;
    assert_ne!(
        now_on.as_str(),
        Some(urls[victim].as_str()),
        "moved off the dead node"
    );

    // Five more, and the tab reloaded at once: what was stored is sent again
    // by the reloaded page's client, each applied once.
    b.eval(
        &tab,
        "for (let i = 0; i < 5; i++) client.op('incr', {key: 'n'}); \
         window.beforeReload = true; location.reload(); true",
    )
    .await;
    b.wait(
        &tab,
        "!window.beforeReload && document.readyState === 'complete' && window.loaded",
        "reloaded",
    )
    .await;
    b.eval(&tab, &format!("startClient({})", js(&urls))).await;
    b.wait(
        &tab,
        "client.state === 'connected'",
        "resumed after the reload",
    )
    .await;
    let r = b
        .eval(
            &tab,
            "client.idle(20000).then(() => client.op('get', {key: 'n'}, {detail: true}))",
        )
        .await;
    // Every id the session ever used was an incr, but this get.
    assert_eq!(
        r["value"].as_u64().unwrap(),
        r["id"].as_u64().unwrap() - 1,
        "{r}"
    );
    let value = r["value"].as_u64().unwrap();
    assert!((40..=45).contains(&value), "{r}");
    assert_eq!(b.eval(&tab, "client.pending.length").await, Value::from(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_demo_page_runs_on_the_javascript_client_and_resumes_after_a_reload() {
    let redis = Redis::start();
    let node = Berth::start_redis(&redis.url());
    let mut b = Browser::start().await;
    let tab = b.open(&format!("http://{}/", node.public)).await;
    let connected = "document.getElementById('status').textContent === 'connected'";
    b.wait(&tab, connected, "the demo connected").await;
    for _ in 0..3 {
        b.eval(&tab, "document.getElementById('q-incr').click(); true")
            .await;
    }
    b.wait(
        &tab,
        "berthClient.pending.length === 0 && /\"counter\": 3/.test(document.getElementById('state').textContent)",
        "the counter at 3 in the state view",
    )
    .await;
    let session = b.eval(&tab, "berthClient.session").await;
    assert!(session.is_string());
    // `beforeReload` is gone from the reloaded page's window.
    b.eval(&tab, "window.beforeReload = true; location.reload(); true")
        .await;
    b.wait(
        &tab,
        &format!("!window.beforeReload && document.readyState === 'complete' && window.berthClient && {connected}"),
        "connected after the reload",
    )
    .await;
    assert_eq!(b.eval(&tab, "berthClient.session").await, session);
    assert_eq!(
        b.eval(&tab, "document.getElementById('i-resumed').textContent")
            .await,
        Value::from("true")
    );
    b.wait(
        &tab,
        "/\"counter\": 3/.test(document.getElementById('state').textContent)",
        "the state shown again",
    )
    .await;
}
