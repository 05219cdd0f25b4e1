//! Identity (`[auth]`, `hello.credential`) against real processes: the probe
//! application (`tests/apps/probe.rs`, whose `whoami` answers `cx.user()`)
//! as one node or two with Consul and Redis, real WebSockets, tokens signed
//! here with `jsonwebtoken` and keys made by `openssl`.

use std::time::{SystemTime, UNIX_EPOCH};

use berth_cluster::ring::{MemberId, Ring, DEFAULT_VNODES};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::app::probe;
use crate::common::*;

/// The HS256 secret of these tests (32+ bytes).
const HS_SECRET: &str = "berth-it-hs256-secret-of-32-bytes!";
/// The audience the nodes are configured with.
const AUDIENCE: &str = "berth-it";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `env` plus an HS256 secret, the audience, and `extra`.
pub(crate) fn with_auth(
    mut env: Vec<(String, String)>,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    env.push(("BERTH__AUTH__HS256_SECRET".into(), HS_SECRET.into()));
    env.push(("BERTH__AUTH__AUDIENCE".into(), AUDIENCE.into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// Good claims for `sub`: ten minutes to live, the right audience.
pub(crate) fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600, "aud": AUDIENCE})
}

pub(crate) fn hs(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// Connects and says hello with a credential; answers the client (session
/// and token remembered on a welcome) and the first frame.
pub(crate) async fn hello(
    url: &str,
    session: Option<&str>,
    token: Option<&str>,
    credential: Option<&str>,
) -> (Client, Value) {
    let mut c = Client::connect(url).await;
    let mut hello = json!({"type": "hello", "session": session, "token": token});
    if let Some(cred) = credential {
        hello["credential"] = json!(cred);
    }
    c.send(hello).await;
    let w = c.recv_json().await;
    if w["type"] == "welcome" {
        c.session = w["session"].as_str().map(str::to_owned);
        c.token = w["token"].as_str().map(str::to_owned);
        c.set_next_id(w["last_op"].as_u64().unwrap() + 1);
    }
    (c, w)
}

/// The hello was refused as protocol.md says for a bad credential:
/// `bad_token`, then close 1008.
async fn assert_refused(mut c: Client, first: Value, what: &str) {
    assert_eq!(first["type"], "error", "{what}: {first}");
    assert_eq!(first["code"], "bad_token", "{what}: {first}");
    assert_eq!(c.recv_close().await, Some(1008), "{what}");
}

fn failures(node: &Berth, reason: &str) -> f64 {
    metric_labeled(
        &node.admin_get("/metrics").1,
        "berth_auth_failures_total",
        &format!("reason=\"{reason}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_binds_the_session_and_only_its_subject_resumes_it() {
    let node = probe(&with_auth(base_env(), &[]));
    let url = node.ws_url();
    let (mut alice, w) = hello(&url, None, None, Some(&hs(&claims("alice")))).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(alice.op("whoami", Value::Null).await["value"], "alice");
    assert_eq!(alice.op("add", json!({"by": 5})).await["value"], 5);
    let (id, token) = (alice.session.clone().unwrap(), alice.token.clone().unwrap());

    // Bob has alice's resume token: refused, and alice's connection is not
    // taken over (no 4000): she goes on as before.
    let (c, first) = hello(&url, Some(&id), Some(&token), Some(&hs(&claims("bob")))).await;
    assert_refused(c, first, "another subject").await;
    // No credential at all on a bound session: refused too.
    let (c, first) = hello(&url, Some(&id), Some(&token), None).await;
    assert_refused(c, first, "anonymous resume of a bound session").await;
    assert_eq!(alice.op("add", json!({"by": 1})).await["value"], 6);
    assert_eq!(failures(&node, "subject"), 2.0);
    drop(alice);

    // Alice, on a new connection: her session, intact.
    let (mut again, w) = hello(&url, Some(&id), Some(&token), Some(&hs(&claims("alice")))).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["resumed"], true);
    assert_eq!(again.op("get", Value::Null).await["value"], 6);
    assert_eq!(again.op("whoami", Value::Null).await["value"], "alice");

    // Anonymous hellos are allowed by default: no user; and a credential
    // does not claim an anonymous session afterwards.
    let mut anon = Client::new_session(&url).await;
    assert_eq!(anon.op("whoami", Value::Null).await["value"], Value::Null);
    let (id, token) = (anon.session.clone().unwrap(), anon.token.clone().unwrap());
    let (c, first) = hello(&url, Some(&id), Some(&token), Some(&hs(&claims("eve")))).await;
    assert_refused(c, first, "a credential on an anonymous session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_credentials_are_refused_with_bad_token_and_counted_by_reason() {
    let node = probe(&with_auth(base_env(), &[]));
    let url = node.ws_url();
    let wrong_key = encode(
        &Header::new(Algorithm::HS256),
        &claims("alice"),
        &EncodingKey::from_secret(b"not-the-configured-secret-at-all!!").unwrap(),
    )
    .unwrap();
    let cases = [
        (
            hs(&json!({"sub": "alice", "exp": now() - 3600, "aud": AUDIENCE})),
            "expired",
        ),
        (
            hs(&json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 3600, "aud": AUDIENCE})),
            "expired",
        ),
        (wrong_key, "signature"),
        (
            hs(&json!({"sub": "alice", "exp": now() + 600, "aud": "someone-else"})),
            "audience",
        ),
        (hs(&json!({"sub": "alice", "exp": now() + 600})), "audience"),
        ("not.a.jwt".to_owned(), "malformed"),
        (
            hs(&json!({"exp": now() + 600, "aud": AUDIENCE})),
            "malformed",
        ),
        // Past auth.max_token_bytes (8 KiB): not even parsed.
        ("x".repeat(9000), "malformed"),
    ];
    for (credential, reason) in &cases {
        let (c, first) = hello(&url, None, None, Some(credential)).await;
        assert_refused(c, first, reason).await;
    }
    for reason in ["expired", "signature", "audience", "malformed"] {
        let want = cases.iter().filter(|(_, r)| *r == reason).count() as f64;
        assert_eq!(failures(&node, reason), want, "{reason}");
    }
    assert_eq!(node.metric("berth_sessions_live"), 0.0, "no session made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_refuses_anonymous_hellos_and_a_node_without_a_key_does_not_start() {
    let node = probe(&with_auth(
        base_env(),
        &[
            ("BERTH__AUTH__REQUIRED", "true"),
            ("BERTH__AUTH__ISSUER", "https://id.example"),
        ],
    ));
    let url = node.ws_url();
    let (c, first) = hello(&url, None, None, None).await;
    assert_refused(c, first, "anonymous").await;
    assert_eq!(failures(&node, "required"), 1.0);
    // The issuer is configured: required in the token.
    let (c, first) = hello(&url, None, None, Some(&hs(&claims("alice")))).await;
    assert_refused(c, first, "no iss").await;
    assert_eq!(failures(&node, "issuer"), 1.0);
    let mut good = claims("alice");
    good["iss"] = json!("https://id.example");
    let (mut c, w) = hello(&url, None, None, Some(&hs(&good))).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(c.op("whoami", Value::Null).await["value"], "alice");

    // auth.required without a key: start-up stops, naming the key.
    let mut env = base_env();
    env.push(("BERTH__AUTH__REQUIRED".into(), "true".into()));
    let out = std::process::Command::new(crate::app::probe_bin())
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.required"), "{err}");
}

fn openssl(args: &[&str], dir: &std::path::Path) {
    let ok = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "openssl {args:?} (scripts/install-deps.sh installs it)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_tokens_verify_with_public_keys_from_a_pem_file() {
    let dir = std::env::temp_dir().join(format!("berth-it-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rsa = [
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "rsa.pem",
    ];
    openssl(&rsa, &dir);
    openssl(
        &["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"],
        &dir,
    );
    let ec = [
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "ec.pem",
    ];
    openssl(&ec, &dir);
    openssl(
        &["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub"],
        &dir,
    );
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let mut keys = read("rsa.pub");
    keys.extend(read("ec.pub"));
    let keys_file = dir.join("keys.pem");
    std::fs::write(&keys_file, keys).unwrap();

    let mut env = base_env();
    env.push((
        "BERTH__AUTH__PUBLIC_KEYS_FILE".into(),
        keys_file.to_str().unwrap().into(),
    ));
    let node = probe(&env);
    let url = node.ws_url();
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "rita", "exp": now() + 600}),
        &EncodingKey::from_rsa_pem(&read("rsa.pem")).unwrap(),
    )
    .unwrap();
    let es = encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "ernie", "exp": now() + 600}),
        &EncodingKey::from_ec_pem(&read("ec.pem")).unwrap(),
    )
    .unwrap();
    for (token, sub) in [(rs, "rita"), (es, "ernie")] {
        let (mut c, w) = hello(&url, None, None, Some(&token)).await;
        assert_eq!(w["type"], "welcome", "{w}");
        assert_eq!(c.op("whoami", Value::Null).await["value"], sub);
    }
    // No HS256 key is configured: an HS256 token is refused, whatever its secret.
    let (c, first) = hello(&url, None, None, Some(&hs(&claims("mallory")))).await;
    assert_refused(c, first, "HS256 without an HS256 key").await;
    assert_eq!(failures(&node, "signature"), 1.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subject_is_bound_and_checked_by_the_owner_when_the_hello_lands_elsewhere() {
    let consul = Consul::start();
    let redis = Redis::start();
    let mut nodes: Vec<Berth> = ["a", "b"]
        .iter()
        .map(|id| probe(&with_auth(cluster_env(&consul, &redis, id), &[])))
        .collect();
    converge(&[&nodes[0], &nodes[1]], &["a", "b"]).await;
    let ring = Ring::new(
        ["a", "b"].iter().map(|m| MemberId(m.to_string())),
        DEFAULT_VNODES,
    );
    let (a, b) = (nodes[0].ws_url(), nodes[1].ws_url());
    // New sessions are placed by the ring here (cluster_env): hellos on a
    // until one creates a session b owns, so the creating hello reached its
    // owner over the peer link (PeerReq::AttachAs).
    let mut alice = None;
    for _ in 0..40 {
        let (c, w) = hello(&a, None, None, Some(&hs(&claims("alice")))).await;
        assert_eq!(w["type"], "welcome", "{w}");
        let id = c.session.clone().unwrap();
        if ring.owner(&id).unwrap().as_str() == "b" {
            alice = Some(c);
            break;
        }
    }
    let mut alice = alice.expect("a session owned by b within 40 tries");
    assert_eq!(alice.op("whoami", Value::Null).await["value"], "alice");
    assert_eq!(alice.op("add", json!({"by": 3})).await["value"], 3);
    let (id, token) = (alice.session.clone().unwrap(), alice.token.clone().unwrap());
    assert!(
        nodes[0].metric("berth_forwarded_attaches_total") >= 1.0,
        "a forwarded the hello"
    );

    // Another subject through the non-owner, and through the owner; no
    // credential through the non-owner: all refused, counted by the owner.
    for (url, cred) in [
        (&a, Some(hs(&claims("bob")))),
        (&b, Some(hs(&claims("bob")))),
        (&a, None),
    ] {
        let (c, first) = hello(url, Some(&id), Some(&token), cred.as_deref()).await;
        assert_refused(c, first, &format!("{url} {cred:?}")).await;
    }
    assert_eq!(failures(&nodes[1], "subject"), 3.0);
    assert_eq!(failures(&nodes[0], "subject"), 0.0);
    assert_eq!(alice.op("get", Value::Null).await["value"], 3, "untouched");
    drop(alice);

    // The owner dies: a activates the session from its checkpoint, user
    // included, and keeps the rule.
    nodes[1].kill9();
    converge(&[&nodes[0]], &["a"]).await;
    let (c, first) = hello(&a, Some(&id), Some(&token), Some(&hs(&claims("bob")))).await;
    assert_refused(c, first, "bob after the failover").await;
    let (mut c, w) = hello(&a, Some(&id), Some(&token), Some(&hs(&claims("alice")))).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(c.op("whoami", Value::Null).await["value"], "alice");
    assert_eq!(c.op("get", Value::Null).await["value"], 3);
}
