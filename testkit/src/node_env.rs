//! The `BERTH__*` environment of a test node: every listener on a loopback
//! port chosen by the OS (the node prints where in its listening line),
//! debug logs, and short store health and operation timeouts.

use crate::consul::Consul;
use crate::redis::Redis;

/// The shared secret of test clusters.
pub const SECRET: &str = "test-cluster-secret-0123456789";

/// Environment of a node on loopback ports chosen by the OS, with the
/// in-memory store.
pub fn base_env() -> Vec<(String, String)> {
    vec![
        ("BERTH__SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        ("BERTH__ADMIN__LISTEN".into(), "127.0.0.1:0".into()),
        (
            "BERTH__LOG__FILTER".into(),
            "info,berth=debug,berth_actors=debug".into(),
        ),
        ("BERTH__STORE__HEALTH_INTERVAL_MS".into(), "200".into()),
        ("BERTH__STORE__OP_TIMEOUT_MS".into(), "500".into()),
    ]
}

/// [`base_env`] with Redis at `redis` and `extra` settings.
pub fn env_with(redis: &Redis, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = base_env();
    env.push(("BERTH__STORE__REDIS_URL".into(), redis.url()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// Environment of a clustered node `id`: [`base_env`], Redis at `redis`,
/// membership from `consul` (service `berth-it`), peer port chosen by the OS,
/// [`SECRET`].
pub fn cluster_env(consul: &Consul, redis: &Redis, id: &str) -> Vec<(String, String)> {
    let mut env = base_env();
    env.extend([
        ("BERTH__STORE__REDIS_URL".to_string(), redis.url()),
        ("BERTH__CLUSTER__NODE_ID".into(), id.into()),
        ("BERTH__CLUSTER__CONSUL_ADDR".into(), consul.addr()),
        ("BERTH__CLUSTER__SERVICE".into(), "berth-it".into()),
        ("BERTH__CLUSTER__PEER_LISTEN".into(), "127.0.0.1:0".into()),
        ("BERTH__CLUSTER__SECRET".into(), SECRET.into()),
        // Sessions spread over the ring whichever node created them, so the
        // cluster tests exercise the peer hop and the re-route of connections
        // whose owner is elsewhere (the default places new sessions on the
        // node their client connected to: tested on its own).
        ("BERTH__CLUSTER__NEW_SESSIONS_LOCAL".into(), "false".into()),
    ]);
    env
}
