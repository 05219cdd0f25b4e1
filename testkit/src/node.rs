//! A berth node as a process: the `berth` binary or any application binary
//! built on the berth library, which prints
//! `berth listening public=ADDR admin=ADDR node=ID peer=ADDR` on stdout once
//! it listens. [`Berth::start_bin`] starts one the way the integration tests
//! do; a [`BerthCommand`] says more (working directory, inherited
//! environment, log file) and answers an error instead of panicking.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::metrics::metric_sum;
use crate::net::{http, WAIT};

/// What a node's `berth listening ...` line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    /// The public (WebSocket) address.
    pub public: SocketAddr,
    /// The admin address.
    pub admin: SocketAddr,
    /// The node id.
    pub node: String,
    /// The peer address it advertises (a host name may stand for the IP),
    /// when the line has one.
    pub peer: Option<String>,
}

impl Listening {
    /// Parses `berth listening public=ADDR admin=ADDR node=ID [peer=ADDR]`
    /// (surrounding white space ignored); `None` for any other line.
    pub fn parse(line: &str) -> Option<Listening> {
        let rest = line.trim().strip_prefix("berth listening ")?;
        let field = |name: &str| {
            rest.split(' ')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(Listening {
            public: field("public")?.parse().ok()?,
            admin: field("admin")?.parse().ok()?,
            node: field("node")?,
            peer: field("peer"),
        })
    }
}

/// How a node is started: its binary, arguments, environment, working
/// directory and where its log (stderr) goes. By default the process
/// inherits this one's environment and working directory, and its stderr is
/// captured for [`Berth::log`]; stdin is closed and stdout is read for the
/// listening line.
#[derive(Debug)]
pub struct BerthCommand {
    bin: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: Option<PathBuf>,
    isolated: bool,
    log_file: Option<File>,
}

impl BerthCommand {
    /// A node of binary `bin`.
    pub fn new(bin: impl AsRef<Path>) -> BerthCommand {
        BerthCommand {
            bin: bin.as_ref().to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            isolated: false,
            log_file: None,
        }
    }

    /// One more argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> BerthCommand {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// More arguments.
    pub fn args<I, S>(mut self, args: I) -> BerthCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// One environment variable (set after [`BerthCommand::isolated`]'s
    /// removals, whatever the order of the calls).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> BerthCommand {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// More environment variables.
    pub fn envs<I, K, V>(mut self, vars: I) -> BerthCommand
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.env.extend(
            vars.into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
        self
    }

    /// Its working directory.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> BerthCommand {
        self.dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// As the integration tests run a node: `RUST_LOG` and every `BERTH*`
    /// variable of this process left out, and, unless
    /// [`BerthCommand::current_dir`] says otherwise, the temporary directory
    /// as working directory (so no `config/berth.toml` is picked up by
    /// accident).
    pub fn isolated(mut self) -> BerthCommand {
        self.isolated = true;
        self
    }

    /// Its stderr (its log) goes to `file` instead of [`Berth::log`], which
    /// then stays empty.
    pub fn log_file(mut self, file: File) -> BerthCommand {
        self.log_file = Some(file);
        self
    }

    /// Starts the node and reads its listening line; an error when it cannot
    /// be started or exits (or prints something else) first. Blocks until
    /// the node prints its first line.
    pub fn spawn(self) -> io::Result<Berth> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if self.isolated {
            cmd.current_dir(std::env::temp_dir()).env_remove("RUST_LOG");
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("BERTH") {
                    cmd.env_remove(k);
                }
            }
        }
        if let Some(d) = &self.dir {
            cmd.current_dir(d);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let captured = self.log_file.is_none();
        cmd.stderr(match self.log_file {
            Some(f) => Stdio::from(f),
            None => Stdio::piped(),
        });
        let mut child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {}: {e}", self.bin.display())))?;
        let log = Arc::new(Mutex::new(String::new()));
        let reader: Option<JoinHandle<()>> = captured.then(|| {
            let stderr = child.stderr.take().expect("piped stderr");
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut g = log.lock().unwrap_or_else(|p| p.into_inner());
                    g.push_str(&line);
                    g.push('\n');
                }
            })
        });
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let read = out.read_line(&mut line);
        let Some(listening) = read.is_ok().then(|| Listening::parse(&line)).flatten() else {
            let _ = child.kill();
            let _ = child.wait();
            // The process is gone: its stderr ends, and the log is whole.
            if let Some(r) = reader {
                let _ = r.join();
            }
            let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let stdout = match read {
                Ok(_) => format!("{line:?}"),
                Err(e) => format!("unreadable ({e})"),
            };
            return Err(io::Error::other(if captured {
                format!(
                    "{} did not start: stdout {stdout}, stderr:\n{log}",
                    self.bin.display()
                )
            } else {
                format!(
                    "{} did not start: stdout {stdout} (stderr went to its log file)",
                    self.bin.display()
                )
            }));
        };
        // Whatever else it prints is read and dropped (a full pipe would
        // block it).
        std::thread::spawn(move || for _ in out.lines() {});
        Ok(Berth {
            child: Some(child),
            public: listening.public,
            admin: listening.admin,
            node: listening.node,
            peer: listening.peer,
            log,
        })
    }
}

/// A running berth node; killed (SIGKILL) on drop. Unless it was started
/// with a log file, its stderr is collected for assertions ([`Berth::log`]).
pub struct Berth {
    child: Option<Child>,
    /// Its public (WebSocket) address, from its listening line.
    pub public: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
    /// Its node id.
    pub node: String,
    /// The peer address it advertises, when its listening line has one.
    pub peer: Option<String>,
    log: Arc<Mutex<String>>,
}

impl Berth {
    /// Starts node binary `bin` (`berth`, or an application built on the
    /// library) with exactly `env` as its `BERTH*` environment
    /// ([`BerthCommand::isolated`]) and `args`; panics with its log when it
    /// does not start.
    pub fn start_bin(bin: &Path, env: &[(String, String)], args: &[&str]) -> Berth {
        BerthCommand::new(bin)
            .isolated()
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ws://PUBLIC/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    /// Its stderr so far (empty when it goes to a log file).
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the log contains `needle`; panics with the log after
    /// [`WAIT`].
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("berth never logged {needle:?}; log:\n{}", self.log());
    }

    /// Its pid; panics once it has been killed or waited for.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends signal `sig` (a name such as `TERM` or `HUP`) with `kill`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} {}", self.pid());
    }

    /// SIGKILL, no goodbye (nothing if it was killed already).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; its exit status. Panics (after a
    /// SIGKILL) with the log when it runs longer than `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("berth did not exit within {within:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin port: (status, the whole response).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http(self.admin, "GET", path, &[])
    }

    /// The sum of the samples of Prometheus metric `name` on `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        metric_sum(&self.admin_get("/metrics").1, name)
    }

    /// `/cluster` as JSON (`null` when it does not answer).
    pub fn cluster(&self) -> Value {
        let (_, body) = self.admin_get("/cluster");
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap_or("{}")).unwrap_or_default()
    }

    /// Member ids in this node's view (from `/cluster`).
    pub fn members(&self) -> Vec<String> {
        self.cluster()["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_parses_with_or_without_a_peer() {
        let l = Listening::parse(
            "berth listening public=127.0.0.1:8080 admin=127.0.0.1:9090 node=n1 peer=host:7070\n",
        )
        .unwrap();
        assert_eq!(l.public, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(l.admin, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(
            (l.node.as_str(), l.peer.as_deref()),
            ("n1", Some("host:7070"))
        );
        let l =
            Listening::parse("berth listening public=[::1]:1 admin=127.0.0.1:2 node=x").unwrap();
        assert_eq!(l.peer, None);
        assert!(Listening::parse("berth listening public=nope admin=127.0.0.1:2 node=x").is_none());
        assert!(Listening::parse("berth listening admin=127.0.0.1:2 node=x").is_none());
        assert!(Listening::parse("error: bad config").is_none());
        assert!(Listening::parse("").is_none());
    }

    #[test]
    fn a_binary_that_prints_something_else_did_not_start_and_its_log_is_in_the_error() {
        let e = BerthCommand::new("/bin/sh")
            .args(["-c", "echo oops >&2; echo hello"])
            .spawn()
            .err()
            .expect("not a node");
        let e = e.to_string();
        assert!(
            e.contains("did not start") && e.contains("\"hello\\n\""),
            "{e}"
        );
        assert!(e.contains("oops"), "{e}");
    }

    #[test]
    fn any_binary_that_prints_the_line_is_a_node_with_its_env_and_args() {
        // A stand-in node: prints its listening line from its arguments and
        // environment, logs, then waits to be killed.
        let script =
            "echo \"berth listening public=127.0.0.1:1 admin=127.0.0.1:2 node=$NODE_ID peer=$1\"; \
                      echo started >&2; exec sleep 30";
        let mut b = Berth::start_bin(
            Path::new("/bin/sh"),
            &[("NODE_ID".into(), "n7".into())],
            &["-c", script, "sh", "p:3"],
        );
        assert_eq!((b.node.as_str(), b.peer.as_deref()), ("n7", Some("p:3")));
        assert_eq!(b.ws_url(), "ws://127.0.0.1:1/ws");
        b.wait_log("started");
        b.signal("TERM");
        assert!(!b.wait_exit(WAIT).success());
    }

    #[test]
    fn isolated_runs_in_the_temporary_directory_with_the_given_env() {
        let script = "echo \"berth listening public=127.0.0.1:1 admin=127.0.0.1:2 node=$PWD peer=${BERTH_TESTKIT_PROBE:-absent}\"";
        let b = BerthCommand::new("/bin/sh")
            .args(["-c", script])
            .env("BERTH_TESTKIT_PROBE", "given")
            .isolated()
            .spawn()
            .unwrap();
        let tmp = std::env::temp_dir().canonicalize().unwrap();
        assert_eq!(Path::new(&b.node).canonicalize().unwrap(), tmp);
        assert_eq!(b.peer.as_deref(), Some("given"));
    }
}
