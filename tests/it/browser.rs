//! A headless Chromium (Debian's `chromium`) driven over the DevTools
//! protocol, for tests of the pages berth serves: open a tab on a URL,
//! evaluate JavaScript in it, wait until an expression holds.
//!
//! The browser is kept off every network but loopback: no background
//! networking, no component updates, no sync, and every host name resolves
//! to nothing but 127.0.0.x addresses. It is
//! killed, and its profile directory removed, when the guard drops.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `v` as a JavaScript literal, to splice into an expression to evaluate.
pub fn js(v: &(impl serde::Serialize + ?Sized)) -> String {
    serde_json::to_string(v).unwrap()
}

/// A running headless Chromium.
pub struct Browser {
    child: Child,
    ws: Ws,
    next_id: u64,
    profile: PathBuf,
}

/// A tab: the DevTools session attached to it.
#[derive(Clone, Debug)]
pub struct Tab(String);

fn chromium() -> PathBuf {
    berth_testkit::require_bin("chromium")
}

impl Browser {
    /// Starts a headless Chromium with a fresh profile.
    pub async fn start() -> Browser {
        static N: AtomicU64 = AtomicU64::new(0);
        let profile = std::env::temp_dir().join(format!(
            "berth-chromium-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-default-apps",
                "--disable-domain-reliability",
                "--metrics-recording-only",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.*",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // Its DevTools address comes on stderr; the rest of stderr is drained
        // by the same thread so that chromium never blocks on a full pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("chromium printed no DevTools address within 30 s");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to chromium's DevTools");
        Browser {
            child,
            ws,
            next_id: 0,
            profile,
        }
    }

    /// Sends a DevTools command (to `tab`'s session, or to the browser) and
    /// returns its result; events read meanwhile are dropped.
    async fn call(&mut self, tab: Option<&Tab>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(t) = tab {
            msg["sessionId"] = json!(t.0);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send to chromium");
        let read = async {
            loop {
                let frame = self
                    .ws
                    .next()
                    .await
                    .expect("chromium closed")
                    .expect("read");
                let Message::Text(t) = frame else { continue };
                let v: Value = serde_json::from_str(&t).expect("DevTools JSON");
                if v["id"] == id {
                    return v;
                }
            }
        };
        let v = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| panic!("chromium did not answer {method} within 30 s"));
        assert!(v.get("error").is_none(), "{method}: {v}");
        v["result"].clone()
    }

    /// Opens a new tab on `url` (waits for its load).
    pub async fn open(&mut self, url: &str) -> Tab {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let session = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let tab = Tab(session["sessionId"].as_str().unwrap().to_owned());
        self.call(Some(&tab), "Page.navigate", json!({"url": url}))
            .await;
        let loaded = format!(
            "location.href === {} && document.readyState === 'complete'",
            serde_json::to_string(url).unwrap()
        );
        self.wait(&tab, &loaded, "page load").await;
        tab
    }

    /// Evaluates `js` in `tab` (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, tab: &Tab, js: &str) -> Value {
        let r = self
            .call(
                Some(tab),
                "Runtime.evaluate",
                json!({"expression": js, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{js} threw: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// A PNG of `tab` drawn at `width` x `height` CSS pixels (its viewport
    /// is set to that size first).
    pub async fn screenshot(&mut self, tab: &Tab, width: u32, height: u32) -> Vec<u8> {
        use base64::Engine as _;
        self.call(
            Some(tab),
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        let shot = self
            .call(
                Some(tab),
                "Page.captureScreenshot",
                json!({"format": "png"}),
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64")
    }

    /// Waits (up to 20 s) until `js` is true in `tab`.
    pub async fn wait(&mut self, tab: &Tab, js: &str, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = self
                .call(
                    Some(tab),
                    "Runtime.evaluate",
                    json!({"expression": format!("!!({js})"), "returnByValue": true}),
                )
                .await;
            if r["result"]["value"] == true {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited 20 s for {what} ({js}); the tab shows: {}",
                self.eval(tab, "document.body.innerText").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
