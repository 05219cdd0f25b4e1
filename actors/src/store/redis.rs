//! The Redis checkpoint store (crate `redis` 1.x on tokio, `ConnectionManager`).
//!
//! Keys, per session id `ID`, both carrying the hash tag `{ID}` so they live in
//! the same Redis Cluster slot and one script can touch both:
//! - `<prefix>:{ID}:ck`: the checkpoint envelope (see [`crate::codec`]);
//! - `<prefix>:{ID}:ep`: the session's epoch, an integer.
//!
//! Every write goes through one Lua script that refuses an epoch older than the
//! stored one; both keys expire together `session_ttl` after the last write.
//!
//! One more key, `<prefix>:timers`, is the timer index: a sorted set of the
//! session ids that have a timer set, scored by the earliest one's due time.
//! A write that changes a session's earliest timer updates it in the same
//! script; an activation that finds the session gone drops its entry. (It is
//! one key for the whole store: a Redis Cluster deployment would shard it by
//! hash tag.)
//!
//! Writes are **group-committed**: every `save` of every session on the node goes
//! into one queue; a batcher task takes whatever is queued (up to `batch_max`,
//! optionally waiting `batch_delay` for more) and sends it as one pipeline, with
//! at most `max_inflight` pipelines outstanding. Under load the queue grows while
//! pipelines are in flight, so batches grow by themselves and the round trip is
//! paid once per batch, not once per op; when idle a write leaves at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{Activation, CheckpointStore, StoreError, Wake};
use crate::ids::SessionId;

/// Activation: read the checkpoint and, if there is one, take the next epoch;
/// if there is none, the session leaves the timer index (KEYS[3], member ARGV[2]).
const ACTIVATE_LUA: &str = r"
local ck = redis.call('GET', KEYS[1])
if not ck then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return false
end
local e = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {e, ck}
";

/// Creation: take the first epoch of a new id.
/// Takes the first epoch of a session that does not exist yet; an existing
/// one (another activation created it first) answers minus its epoch.
const CREATE_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then return -tonumber(cur) end
local e = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return e
";

/// Fenced write. Returns 0 when written, else the newer stored epoch. With
/// KEYS[3] (the timer index), ARGV[4] (the session id) and ARGV[5] (a due
/// time, or -1 for none), the index entry moves in the same step.
const SAVE_LUA: &str = r"
local stored = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) < stored then return stored end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
if KEYS[3] then
  if tonumber(ARGV[5]) < 0 then
    redis.call('ZREM', KEYS[3], ARGV[4])
  else
    redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
  end
end
return 0
";

/// Fenced delete; leaves epoch + 1 behind as a tombstone, and drops the
/// session's timer index entry (KEYS[3], member ARGV[3]).
const DELETE_LUA: &str = r"
local stored = tonumber(redis.call('GET', KEYS[2]) or '0')
local e = tonumber(ARGV[1])
if e < stored then return stored end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('SET', KEYS[2], string.format('%d', e + 1), 'PX', ARGV[2])
return 0
";

/// Settings of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    /// `redis://[user:pass@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Sessions expire this long after their last write.
    pub session_ttl: Duration,
    /// Longest wait for any Redis answer; past it the op answers `unavailable`.
    pub op_timeout: Duration,
    /// Most writes in one pipeline.
    pub batch_max: usize,
    /// How long a batch that is not full waits for more writes (zero: send what
    /// is queued at once; batches still grow under load).
    pub batch_delay: Duration,
    /// Most pipelines in flight at once.
    pub max_inflight: usize,
    /// Replicas that must confirm each checkpoint batch (Redis `WAIT`) before
    /// its ops are acknowledged; 0 = do not wait. With a replicated Redis
    /// (Sentinel), 1 or more makes an acknowledged op survive a failover.
    pub wait_replicas: u32,
}

struct SaveReq {
    ck_key: String,
    ep_key: String,
    /// The timer index update: the session id and its due time (-1: none).
    wake: Option<(String, i64)>,
    epoch: u64,
    bytes: Vec<u8>,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

struct Scripts {
    activate: Script,
    create: Script,
    save: Script,
    delete: Script,
}

/// The connection to the current primary. With a plain `redis://` URL it never
/// changes. With `redis+sentinel://h1:p1,h2:p2/name`, the sentinels are asked
/// for the primary at start and again after any failed call (one question at a
/// time), so a promoted replica is followed without a restart.
struct Primary {
    current: std::sync::RwLock<Option<ConnectionManager>>,
    sentinel: Option<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
    refreshing: std::sync::atomic::AtomicBool,
    mcfg: ConnectionManagerConfig,
}

impl Primary {
    fn get(&self) -> Result<ConnectionManager, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::Unavailable("no redis primary known yet (asking the sentinels)".into())
            })
    }

    /// A call failed: with Sentinel, find the primary again.
    fn failed(self: &Arc<Self>) {
        if self.sentinel.is_none() || self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let found = async {
                let mut s = me.sentinel.as_ref().expect("sentinel").lock().await;
                let client = s.async_get_client().await?;
                let addr = client.get_connection_info().addr().to_string();
                ConnectionManager::new_lazy_with_config(client, me.mcfg.clone()).map(|c| (c, addr))
            };
            match tokio::time::timeout(Duration::from_secs(5), found).await {
                Ok(Ok((conn, addr))) => {
                    tracing::info!(primary = %addr, "redis primary (from sentinel)");
                    *me.current.write().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "sentinels did not name a redis primary"),
                Err(_) => tracing::warn!("sentinels did not answer in time"),
            }
            me.refreshing.store(false, Ordering::Release);
        });
    }
}

/// Parses `redis+sentinel://h1:p1,h2:p2/service[/db]` into sentinel URLs,
/// the service name and the database.
fn parse_sentinel_url(url: &str) -> Option<(Vec<String>, String, i64)> {
    let rest = url.strip_prefix("redis+sentinel://")?;
    let (hosts, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    let service = parts.next().filter(|s| !s.is_empty())?.to_owned();
    let db = parts.next().map_or(Some(0), |d| d.parse().ok())?;
    let sentinels: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{h}"))
        .collect();
    (!sentinels.is_empty()).then_some((sentinels, service, db))
}

/// Counters of the group commit, for tests and operators.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Pipelines sent.
    pub batches: AtomicU64,
    /// Checkpoint writes sent in them.
    pub writes: AtomicU64,
}

/// The Redis store. Cheap to clone; the batcher task ends when the last clone is
/// dropped.
#[derive(Clone)]
pub struct RedisStore {
    stats: Arc<BatchStats>,
    primary: Arc<Primary>,
    scripts: Arc<Scripts>,
    queue: mpsc::Sender<SaveReq>,
    cfg: Arc<RedisStoreConfig>,
    target: String,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn count_error(op: &'static str) {
    metrics::counter!("berth_store_errors_total", "op" => op).increment(1);
}

impl RedisStore {
    /// Connects lazily (the node starts even while Redis is down and becomes
    /// ready when it answers) and starts the batcher on the current tokio runtime.
    pub fn new(cfg: RedisStoreConfig) -> Result<Self, StoreError> {
        let mcfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.op_timeout))
            .set_response_timeout(Some(cfg.op_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let (primary, target) = if cfg.url.starts_with("redis+sentinel://") {
            let (sentinels, service, db) = parse_sentinel_url(&cfg.url).ok_or_else(|| {
                StoreError::Unavailable("bad sentinel url: expected redis+sentinel://host:port[,host:port...]/service[/db]".into())
            })?;
            let node = redis::sentinel::SentinelNodeConnectionInfo::default()
                .set_redis_connection_info(redis::RedisConnectionInfo::default().set_db(db));
            let client = redis::sentinel::SentinelClient::build(
                sentinels.clone(),
                service.clone(),
                Some(node),
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|e| StoreError::Unavailable(format!("bad sentinel url: {e}")))?;
            let p = Arc::new(Primary {
                current: std::sync::RwLock::new(None),
                sentinel: Some(tokio::sync::Mutex::new(client)),
                refreshing: Default::default(),
                mcfg,
            });
            p.failed(); // ask for the primary now
            (
                p,
                format!("redis sentinel {} ({service})", sentinels.join(",")),
            )
        } else {
            let client = redis::Client::open(cfg.url.as_str())
                .map_err(|e| StoreError::Unavailable(format!("bad redis url: {e}")))?;
            let target = format!("redis {}", client.get_connection_info().addr());
            let conn = ConnectionManager::new_lazy_with_config(client, mcfg.clone())
                .map_err(unavailable)?;
            let p = Arc::new(Primary {
                current: std::sync::RwLock::new(Some(conn)),
                sentinel: None,
                refreshing: Default::default(),
                mcfg,
            });
            (p, target)
        };
        let scripts = Arc::new(Scripts {
            activate: Script::new(ACTIVATE_LUA),
            create: Script::new(CREATE_LUA),
            save: Script::new(SAVE_LUA),
            delete: Script::new(DELETE_LUA),
        });
        let (queue, rx) = mpsc::channel(cfg.batch_max.max(1) * cfg.max_inflight.max(1) * 8);
        let cfg = Arc::new(cfg);
        let stats = Arc::new(BatchStats::default());
        tokio::spawn(run_batcher(
            rx,
            primary.clone(),
            scripts.clone(),
            cfg.clone(),
            stats.clone(),
        ));
        Ok(RedisStore {
            stats,
            primary,
            scripts,
            queue,
            cfg,
            target,
        })
    }

    /// Group-commit counters since start.
    pub fn batch_stats(&self) -> &BatchStats {
        &self.stats
    }

    fn keys(&self, id: &SessionId) -> (String, String) {
        let p = &self.cfg.key_prefix;
        (format!("{p}:{{{id}}}:ck"), format!("{p}:{{{id}}}:ep"))
    }

    fn timers_key(&self) -> String {
        cfg_timers_key(&self.cfg)
    }

    fn ttl_ms(&self) -> u64 {
        self.cfg.session_ttl.as_millis() as u64
    }

    async fn timed<T>(
        op_timeout: Duration,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        Self::settle(
            op_timeout,
            what,
            tokio::time::timeout(op_timeout, fut).await,
        )
    }

    /// The store's answer for a Redis call bounded by `op_timeout`.
    fn settle<T>(
        op_timeout: Duration,
        what: &'static str,
        r: Result<Result<T, RedisError>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                count_error(what);
                Err(unavailable(e))
            }
            Err(_) => {
                count_error(what);
                Err(StoreError::Unavailable(format!(
                    "no answer from redis within {op_timeout:?}"
                )))
            }
        }
    }
}

fn fenced(stored: u64, ours: u64) -> Result<(), StoreError> {
    if stored == 0 {
        Ok(())
    } else {
        metrics::counter!("berth_fenced_writes_total").increment(1);
        Err(StoreError::Fenced { stored, ours })
    }
}

impl CheckpointStore for RedisStore {
    fn activate(
        &self,
        id: &SessionId,
    ) -> BoxFuture<'static, Result<Option<Activation>, StoreError>> {
        let (ck, ep) = self.keys(id);
        let (timers, member) = (self.timers_key(), id.to_string());
        let (primary, scripts, ttl, t) = (
            self.primary.clone(),
            self.scripts.clone(),
            self.ttl_ms(),
            self.cfg.op_timeout,
        );
        async move {
            let mut conn = primary.get().inspect_err(|_| primary.failed())?;
            let r: Option<(u64, Vec<u8>)> = Self::timed(
                t,
                "activate",
                scripts
                    .activate
                    .key(ck)
                    .key(ep)
                    .key(timers)
                    .arg(ttl)
                    .arg(member)
                    .invoke_async(&mut conn),
            )
            .await
            .inspect_err(|_| primary.failed())?;
            Ok(r.map(|(epoch, checkpoint)| Activation { epoch, checkpoint }))
        }
        .boxed()
    }

    fn create(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>> {
        let (_, ep) = self.keys(id);
        let (primary, scripts, ttl, t) = (
            self.primary.clone(),
            self.scripts.clone(),
            self.ttl_ms(),
            self.cfg.op_timeout,
        );
        async move {
            let mut conn = primary.get().inspect_err(|_| primary.failed())?;
            let e: i64 = Self::timed(
                t,
                "create",
                scripts.create.key(ep).arg(ttl).invoke_async(&mut conn),
            )
            .await
            .inspect_err(|_| primary.failed())?;
            if e <= 0 {
                metrics::counter!("berth_fenced_writes_total").increment(1);
                return Err(StoreError::Fenced {
                    stored: e.unsigned_abs(),
                    ours: 0,
                });
            }
            Ok(e as u64)
        }
        .boxed()
    }

    fn save_waking(
        &self,
        id: &SessionId,
        epoch: u64,
        bytes: Vec<u8>,
        wake: Wake,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let (ck_key, ep_key) = self.keys(id);
        let (tx, rx) = oneshot::channel();
        let wake = match wake {
            Wake::Keep => None,
            Wake::At(at) => Some((id.to_string(), i64::try_from(at).unwrap_or(i64::MAX))),
            Wake::Never => Some((id.to_string(), -1)),
        };
        let req = SaveReq {
            ck_key,
            ep_key,
            wake,
            epoch,
            bytes,
            reply: tx,
        };
        let queue = self.queue.clone();
        let t = self.cfg.op_timeout;
        async move {
            let sent = tokio::time::timeout(t, queue.send(req)).await;
            if !matches!(sent, Ok(Ok(()))) {
                count_error("save");
                return Err(StoreError::Unavailable(
                    "checkpoint queue is full or closed".into(),
                ));
            }
            // The batcher answers every request (its pipeline has its own timeout);
            // the outer bound only guards against a lost reply.
            match tokio::time::timeout(t * 2 + Duration::from_millis(100), rx).await {
                Ok(Ok(r)) => r,
                _ => Err(StoreError::Unavailable(
                    "checkpoint not confirmed in time".into(),
                )),
            }
        }
        .boxed()
    }

    fn delete(&self, id: &SessionId, epoch: u64) -> BoxFuture<'static, Result<(), StoreError>> {
        let (ck, ep) = self.keys(id);
        let (timers, member) = (self.timers_key(), id.to_string());
        let (primary, scripts, ttl, t) = (
            self.primary.clone(),
            self.scripts.clone(),
            self.ttl_ms(),
            self.cfg.op_timeout,
        );
        async move {
            let mut conn = primary.get().inspect_err(|_| primary.failed())?;
            let stored: u64 = Self::timed(
                t,
                "delete",
                scripts
                    .delete
                    .key(ck)
                    .key(ep)
                    .key(timers)
                    .arg(epoch)
                    .arg(ttl)
                    .arg(member)
                    .invoke_async(&mut conn),
            )
            .await
            .inspect_err(|_| primary.failed())?;
            fenced(stored, epoch)
        }
        .boxed()
    }

    fn epoch(&self, id: &SessionId) -> BoxFuture<'static, Result<u64, StoreError>> {
        let (_, ep) = self.keys(id);
        let (primary, t) = (self.primary.clone(), self.cfg.op_timeout);
        async move {
            let mut conn = primary.get().inspect_err(|_| primary.failed())?;
            let e: Option<u64> =
                Self::timed(t, "epoch", redis::cmd("GET").arg(ep).query_async(&mut conn))
                    .await
                    .inspect_err(|_| primary.failed())?;
            Ok(e.unwrap_or(0))
        }
        .boxed()
    }

    fn peek(&self, id: &SessionId) -> BoxFuture<'static, Result<Option<Vec<u8>>, StoreError>> {
        let (ck, _) = self.keys(id);
        let (primary, t) = (self.primary.clone(), self.cfg.op_timeout);
        async move {
            let mut conn = primary.get().inspect_err(|_| primary.failed())?;
            Self::timed(t, "peek", redis::cmd("GET").arg(ck).query_async(&mut conn))
                .await
                .inspect_err(|_| primary.failed())
        }
        .boxed()
    }

    fn due_wakes(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<SessionId>, StoreError>> {
        let (primary, t, key) = (self.primary.clone(), self.cfg.op_timeout, self.timers_key());
        async move {
            let mut conn = primary.get().inspect_err(|_| primary.failed())?;
            let ids: Vec<String> = Self::timed(
                t,
                "due_wakes",
                redis::cmd("ZRANGEBYSCORE")
                    .arg(key)
                    .arg("-inf")
                    .arg(now_ms)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut conn),
            )
            .await
            .inspect_err(|_| primary.failed())?;
            Ok(ids
                .iter()
                .filter_map(|s| SessionId::parse_actor(s))
                .collect())
        }
        .boxed()
    }

    fn ping(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let (primary, t) = (self.primary.clone(), self.cfg.op_timeout);
        async move {
            let mut conn = primary.get().inspect_err(|_| primary.failed())?;
            // A demoted primary still answers PING: ask for the role, so the
            // health loop notices a failover even while no write is failing.
            let role: Vec<redis::Value> =
                Self::timed(t, "ping", redis::cmd("ROLE").query_async(&mut conn))
                    .await
                    .inspect_err(|_| primary.failed())?;
            match role.first() {
                Some(redis::Value::BulkString(r)) if r.as_slice() == b"master" => Ok(()),
                _ => {
                    primary.failed();
                    Err(StoreError::Unavailable(
                        "redis is not a primary (read-only replica)".into(),
                    ))
                }
            }
        }
        .boxed()
    }

    fn is_durable(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.target.clone()
    }
}

async fn run_batcher(
    mut rx: mpsc::Receiver<SaveReq>,
    primary: Arc<Primary>,
    scripts: Arc<Scripts>,
    cfg: Arc<RedisStoreConfig>,
    stats: Arc<BatchStats>,
) {
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight.max(1)));
    let max = cfg.batch_max.max(1);
    // Ends when every RedisStore clone (every sender) is gone.
    while let Some(first) = rx.recv().await {
        // Wait for a pipeline slot first: whatever queues meanwhile joins this batch.
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break;
        };
        let mut batch = Vec::with_capacity(max.min(64));
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if batch.len() < max && !cfg.batch_delay.is_zero() {
            let deadline = tokio::time::sleep(cfg.batch_delay);
            tokio::pin!(deadline);
            while batch.len() < max {
                tokio::select! {
                    r = rx.recv() => match r { Some(r) => batch.push(r), None => break },
                    _ = &mut deadline => break,
                }
            }
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (primary, scripts, cfg) = (primary.clone(), scripts.clone(), cfg.clone());
        tokio::spawn(async move {
            flush(&primary, &scripts, &cfg, batch).await;
            drop(permit);
        });
    }
}

fn cfg_timers_key(cfg: &RedisStoreConfig) -> String {
    format!("{}:timers", cfg.key_prefix)
}

async fn flush(
    primary: &Arc<Primary>,
    scripts: &Scripts,
    cfg: &RedisStoreConfig,
    batch: Vec<SaveReq>,
) {
    let mut conn = match primary.get() {
        Ok(c) => c,
        Err(e) => {
            primary.failed();
            for r in batch {
                let _ = r.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let started = Instant::now();
    let ttl = cfg.session_ttl.as_millis() as u64;
    let mut pipe = redis::pipe();
    for r in &batch {
        let mut call = scripts.save.key(&r.ck_key);
        call.key(&r.ep_key).arg(r.epoch).arg(&r.bytes[..]).arg(ttl);
        if let Some((id, at)) = &r.wake {
            call.key(cfg_timers_key(cfg)).arg(id).arg(*at);
        }
        pipe.invoke_script(&call);
    }
    if cfg.wait_replicas > 0 {
        // Acknowledge only what enough replicas hold: a failover then keeps it.
        let wait_ms = (cfg.op_timeout.as_millis() as u64 / 2).max(1);
        pipe.cmd("WAIT").arg(cfg.wait_replicas).arg(wait_ms);
    }
    let mut result =
        tokio::time::timeout(cfg.op_timeout, pipe.query_async::<Vec<u64>>(&mut conn)).await;
    let no_script = |r: &Result<Result<Vec<u64>, RedisError>, _>| matches!(r, Ok(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript));
    if no_script(&result) {
        // Redis forgets scripts on restart: load it and send the batch again.
        // NOSCRIPT means no command of the pipeline ran, so the retry is safe.
        let loaded = RedisStore::timed(
            cfg.op_timeout,
            "save",
            scripts.save.prepare_invoke().load_async(&mut conn),
        )
        .await;
        if loaded.is_ok() {
            result =
                tokio::time::timeout(cfg.op_timeout, pipe.query_async::<Vec<u64>>(&mut conn)).await;
        }
    }
    let result = RedisStore::settle(cfg.op_timeout, "save", result);
    metrics::histogram!("berth_checkpoint_batch_size").record(batch.len() as f64);
    metrics::histogram!("berth_checkpoint_batch_seconds").record(started.elapsed().as_secs_f64());
    if result.is_err() {
        primary.failed();
    }
    let result = match result {
        Ok(mut v) if cfg.wait_replicas > 0 && v.len() == batch.len() + 1 => {
            let confirmed = v.pop().unwrap_or(0);
            if confirmed < u64::from(cfg.wait_replicas) {
                count_error("save");
                Err(StoreError::Unavailable(format!(
                    "checkpoint reached {confirmed} of {} required replicas: not acknowledged, retry",
                    cfg.wait_replicas
                )))
            } else {
                Ok(v)
            }
        }
        other => other,
    };
    match result {
        Ok(stored) if stored.len() == batch.len() => {
            for (r, stored) in batch.into_iter().zip(stored) {
                let _ = r.reply.send(fenced(stored, r.epoch));
            }
        }
        Ok(other) => {
            let e = StoreError::Unavailable(format!(
                "redis answered {} results for {} writes",
                other.len(),
                batch.len()
            ));
            for r in batch {
                let _ = r.reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, writes = batch.len(), "checkpoint batch failed");
            for r in batch {
                let _ = r.reply.send(Err(e.clone()));
            }
        }
    }
}
