//! `redis-server` processes on free loopback ports: a standalone [`Redis`]
//! (without persistence, or with an append-only file fsynced on every write)
//! and a [`SentinelSet`] (a primary, two replicas, three Sentinels).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bin::find_bin;
use crate::net::free_port;

/// How a [`Redis`] is started ([`Redis::start_opts`]); the default is
/// [`Redis::start`]'s: no persistence, a data directory of its own, no log.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only file with `appendfsync always`, so a restart keeps
    /// everything.
    pub persistent: bool,
    /// Its data directory, left in place on drop; by default a fresh one in
    /// the temporary directory, removed on drop.
    pub dir: Option<PathBuf>,
    /// A file its stdout (its log) goes to, created at the start and appended
    /// to on a restart; by default the log is dropped.
    pub log: Option<PathBuf>,
}

/// A `redis-server` on a free port of 127.0.0.1; killed on drop.
pub struct Redis {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    /// Whether `dir` is this guard's own (removed on drop).
    own_dir: bool,
    opts: RedisOptions,
    /// The primary's port when this is a replica.
    replica_of: Option<u16>,
}

/// How many ports a start tries (another process may take a free port
/// before the server binds it).
const START_TRIES: usize = 5;
/// How long a start waits for the first PING answer.
const START_WAIT: Duration = Duration::from_secs(5);
/// How long a restart waits: a persistent server loads its append-only file
/// first (it answers `LOADING` meanwhile).
const RESTART_WAIT: Duration = Duration::from_secs(10);

impl Redis {
    /// A server without persistence; panics when it cannot start (with how to
    /// install `redis-server` when it is missing).
    pub fn start() -> Redis {
        Self::start_opts(RedisOptions::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A server that keeps its data across [`Redis::restart`] (AOF,
    /// `appendfsync always`); panics when it cannot start.
    pub fn start_persistent() -> Redis {
        Self::start_opts(RedisOptions {
            persistent: true,
            ..RedisOptions::default()
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A server started as `opts` says, answering PING; an error when
    /// `redis-server` is missing or does not start.
    pub fn start_opts(opts: RedisOptions) -> io::Result<Redis> {
        Self::start_inner(opts, None)
    }

    /// A replica of `primary` (without persistence; [`Redis::restart`]
    /// makes it a replica again), in sync when this returns; panics when it
    /// cannot start or sync.
    pub fn start_replica_of(primary: &Redis) -> Redis {
        let replica = Self::start_inner(RedisOptions::default(), Some(primary.port))
            .unwrap_or_else(|e| panic!("replica: {e}"));
        primary.wait_replicas_online(1);
        replica
    }

    /// Waits (up to 15 s) until `n` replicas are connected to this primary
    /// and online; panics when they are not.
    pub fn wait_replicas_online(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let info: String = ::redis::cmd("INFO")
                .arg("replication")
                .query(&mut self.conn())
                .unwrap();
            if info.contains(&format!("connected_slaves:{n}"))
                && info.matches("state=online").count() == n
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} replicas never came online: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_inner(opts: RedisOptions, replica_of: Option<u16>) -> io::Result<Redis> {
        let bin = find_bin("redis-server")?;
        for _ in 0..START_TRIES {
            let port = free_port();
            let (dir, own_dir) = match &opts.dir {
                Some(d) => (d.clone(), false),
                None => (
                    std::env::temp_dir()
                        .join(format!("berth-testkit-redis-{port}-{}", std::process::id())),
                    true,
                ),
            };
            std::fs::create_dir_all(&dir)?;
            let mut r = Redis {
                child: None,
                port,
                bin: bin.clone(),
                dir,
                own_dir,
                opts: opts.clone(),
                replica_of,
            };
            r.child = Some(r.spawn(false)?);
            if r.wait_up(START_WAIT) {
                return Ok(r);
            }
            // Dropping `r` kills it; the next try takes another port.
        }
        Err(io::Error::other(format!(
            "redis-server did not start ({START_TRIES} ports tried)"
        )))
    }

    fn spawn(&self, restart: bool) -> io::Result<Child> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        if let Some(primary) = self.replica_of {
            cmd.args(["--appendonly", "no"]).args([
                "--replicaof",
                "127.0.0.1",
                &primary.to_string(),
            ]);
        } else if self.opts.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no", "--appendfsync", "no"]);
        }
        let stdout = match &self.opts.log {
            Some(path) => Stdio::from(open_log(path, restart)?),
            None => Stdio::null(),
        };
        cmd.arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
    }

    /// Whether it answers PING within `within`.
    fn wait_up(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(c) = ::redis::Client::open(self.url()) {
                if let Ok(mut conn) = c.get_connection() {
                    if ::redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGKILL); nothing if it is stopped.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty unless persistent); panics
    /// when it does not answer.
    pub fn restart(&mut self) {
        self.try_restart()
            .unwrap_or_else(|e| panic!("redis-server did not restart: {e}"));
    }

    /// [`Redis::restart`], with an error instead of a panic (the port may be
    /// taken meanwhile).
    pub fn try_restart(&mut self) -> io::Result<()> {
        self.stop();
        self.child = Some(self.spawn(true)?);
        if self.wait_up(RESTART_WAIT) {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "redis-server did not answer on port {} within {RESTART_WAIT:?}",
                self.port
            )))
        }
    }

    /// A new synchronous connection.
    pub fn conn(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

/// A log file: created (truncated) at a start, appended to on a restart.
fn open_log(path: &Path, append: bool) -> io::Result<File> {
    if append {
        OpenOptions::new().create(true).append(true).open(path)
    } else {
        File::create(path)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        if self.own_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A Redis primary, two replicas and three Sentinels (master name
/// `mymaster`, quorum 2) on loopback ports; every process killed on drop.
pub struct SentinelSet {
    /// The primary at the start.
    pub primary: Redis,
    /// Its two replicas, in sync when [`SentinelSet::start`] returns.
    pub replicas: Vec<Redis>,
    sentinels: Vec<Child>,
    /// The Sentinels' ports on 127.0.0.1.
    pub sentinel_ports: Vec<u16>,
    dir: PathBuf,
}

impl SentinelSet {
    /// Starts the set and waits until both replicas are online; panics when
    /// it cannot.
    pub fn start() -> SentinelSet {
        let primary = Redis::start();
        let replicas: Vec<Redis> = (0..2)
            .map(|_| {
                Redis::start_inner(RedisOptions::default(), Some(primary.port))
                    .unwrap_or_else(|e| panic!("replica: {e}"))
            })
            .collect();
        let dir = std::env::temp_dir().join(format!(
            "berth-testkit-sentinels-{}-{}",
            primary.port,
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut set = SentinelSet {
            primary,
            replicas,
            sentinels: Vec::new(),
            sentinel_ports: Vec::new(),
            dir,
        };
        for i in 0..3 {
            let port = free_port();
            let conf = set.dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 2\n",
                    set.dir.display(),
                    set.primary.port
                ),
            )
            .unwrap();
            set.sentinels.push(
                Command::new(&set.primary.bin)
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn redis-server --sentinel"),
            );
            set.sentinel_ports.push(port);
        }
        // Replicas in sync before anyone writes.
        set.primary.wait_replicas_online(2);
        set
    }

    /// `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
