//! A private, throw-away RabbitMQ node for integration tests that disturb a
//! broker (memory alarms, forced connection closes, `stop_app`, ...), so that
//! the shared node on 127.0.0.1:5672 is never touched by such tests.
//!
//! Dependencies: std + anyhow (+ tokio for the `*_async` helpers).
//!
//! How it works (RabbitMQ 3.10 Debian package):
//! * every node lives in its own temp dir `$TMPDIR/flowgate-test-nodes/fg-<random>`
//!   holding mnesia, logs, the generated `rabbitmq.conf`, an empty
//!   `enabled_plugins` file (no management plugin, so nothing binds 15672/15692),
//!   the pid file and a private `home/.erlang.cookie`;
//! * the server and CLI scripts are run straight from `/usr/lib/rabbitmq/bin`
//!   (bypassing Debian's `/usr/sbin` wrapper, which would `su rabbitmq` and use
//!   `/var/lib/rabbitmq/.erlang.cookie`), with `HOME` pointing at the private
//!   home, so the node and our `rabbitmqctl` calls share a cookie of their own;
//! * the node is spawned as a child process (`rabbitmq-server` in the
//!   foreground) and stopped on `Drop` (`rabbitmqctl stop`, then SIGKILL via
//!   the child / pid file as fallback) and its dir removed;
//! * nodes orphaned by a killed test binary are reaped on the next `start()`.
//!
//! All methods are blocking (they run `rabbitmqctl`, ~0.5-1 s each). From a
//! `#[tokio::test]` either use `flavor = "multi_thread"` or wrap calls with
//! [`BrokerNode::blocking`] / [`BrokerNode::start_async`].

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

/// How long `BrokerNode::start` waits for the node to accept AMQP.
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one `rabbitmqctl` invocation made by this module.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

const RMQ_LIB_BIN: &str = "/usr/lib/rabbitmq/bin";

/// A private RabbitMQ node. Cheap to clone (shared handle); the node is
/// stopped and its directory removed when the last clone is dropped.
#[derive(Clone)]
pub struct BrokerNode {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

/// One AMQP connection as reported by `rabbitmqctl list_connections`.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Erlang pid, e.g. `<fg-x@localhost.1660.1234.0>` (what `close_connection` takes).
    pub pid: String,
    /// Broker's name for it, e.g. `127.0.0.1:41234 -> 127.0.0.1:45672`.
    pub name: String,
    /// The client-provided `connection_name` property, if any.
    pub connection_name: Option<String>,
}

/// Node name -> private HOME (cookie) of nodes started by this process, so
/// that the free function [`list_queue`] can address them by name.
fn registry() -> &'static Mutex<HashMap<String, PathBuf>> {
    static REG: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(HashMap::new()))
}

/// AMQP port -> node name of nodes started by this process, so that a
/// client connected by URL can find the node its `rabbitmqctl` must ask.
fn ports() -> &'static Mutex<HashMap<u16, String>> {
    static PORTS: OnceLock<Mutex<HashMap<u16, String>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The private node (started by this process) that serves `url`, or `None`
/// for the shared broker.
pub fn node_for_url(url: &str) -> Option<String> {
    let authority = url.split("://").nth(1)?.split('/').next()?;
    let port: u16 = authority.rsplit(':').next()?.parse().ok()?;
    ports().lock().unwrap().get(&port).cloned()
}

fn base_dir() -> PathBuf {
    std::env::temp_dir().join("flowgate-test-nodes")
}

/// Script path: prefer the unwrapped Debian location, else rely on PATH.
fn rmq_script(name: &str) -> PathBuf {
    let p = Path::new(RMQ_LIB_BIN).join(name);
    if p.exists() {
        p
    } else {
        PathBuf::from(name)
    }
}

fn random_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mix = nanos
        ^ (std::process::id() as u64).rotate_left(32)
        ^ N.fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{:012x}", mix & 0xffff_ffff_ffff)
}

/// Ask the kernel for a free TCP port on 127.0.0.1 (racy by nature, but the
/// window between release and the node binding it is small).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// True if `pid` is alive and its command line mentions `needle` (guards
/// against killing an unrelated process that reused a stale pid).
fn pid_alive_with(pid: u32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

fn kill9(pid: u32) {
    let _ = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Kill nodes whose owning test process is gone (test binary was SIGKILLed).
fn reap_orphans() {
    let Ok(entries) = fs::read_dir(base_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let owner = read_pid(&dir.join("owner.pid"));
        if matches!(owner, Some(p) if pid_alive(p)) {
            continue;
        }
        if owner.is_none() {
            // Being created right now by someone else, or junk: only reap old ones.
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(600));
            if !old {
                continue;
            }
        }
        let short = e.file_name().to_string_lossy().into_owned();
        if let Some(p) = read_pid(&dir.join("node.pid")) {
            if pid_alive_with(p, &short) {
                kill9(p);
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Run a command with a deadline; on timeout kill it and return an error.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Drain pipes on threads so a chatty command cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} timed out after {timeout:?}");
        }
        sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

fn ok_stdout(out: Output, what: &str) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(anyhow!(
            "{what} failed ({}): stdout={} stderr={}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `rabbitmqctl` command for a node: `home` = Some(private HOME) for our
/// private nodes, None for the shared node (Debian wrapper, rabbitmq's cookie).
fn ctl_command(node: Option<&str>, home: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = match home {
        Some(home) => {
            let mut c = Command::new(rmq_script("rabbitmqctl"));
            c.env("HOME", home)
                .env("ERL_EPMD_ADDRESS", "127.0.0.1")
                .env(
                    "RABBITMQ_CONF_ENV_FILE",
                    home.join("..").join("rabbitmq-env.conf"),
                );
            c
        }
        None => Command::new("rabbitmqctl"),
    };
    // Never let a stray RABBITMQ_DIST_PORT leak into the CLI: it derives its own
    // port range from it (+10000) which may overflow for ephemeral ports.
    cmd.env_remove("RABBITMQ_DIST_PORT")
        .env_remove("RABBITMQ_NODENAME")
        .env_remove("RABBITMQ_NODE_PORT");
    if let Some(n) = node {
        cmd.args(["-n", n]);
    }
    cmd.args(args);
    cmd
}

fn parse_queue_line(out: &str, queue: &str) -> Result<Option<(u64, u64, u64)>> {
    for line in out.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() == 4 && cols[0] == queue {
            let n = |s: &str| -> Result<u64> {
                s.trim()
                    .parse()
                    .with_context(|| format!("bad number {s:?} in {line:?}"))
            };
            return Ok(Some((n(cols[1])?, n(cols[2])?, n(cols[3])?)));
        }
    }
    Ok(None)
}

/// `(messages_ready, messages_unacknowledged, consumers)` of `queue` in vhost
/// `/`, via `rabbitmqctl list_queues`. `node = None` is the shared node
/// (rabbit@localhost); `Some(name)` may also name a [`BrokerNode`] started by
/// this process. Errors if the queue does not exist.
pub fn list_queue(node: Option<&str>, queue: &str) -> Result<(u64, u64, u64)> {
    try_list_queue(node, queue)?.ok_or_else(|| anyhow!("queue {queue:?} not found"))
}

/// Like [`list_queue`] but `Ok(None)` when the queue does not exist.
pub fn try_list_queue(node: Option<&str>, queue: &str) -> Result<Option<(u64, u64, u64)>> {
    let home = node.and_then(|n| registry().lock().unwrap().get(n).cloned());
    let cmd = ctl_command(
        node,
        home.as_deref(),
        &[
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ],
    );
    let out = ok_stdout(run_with_timeout(cmd, CTL_TIMEOUT)?, "list_queues")?;
    parse_queue_line(&out, queue)
}

/// Every consumer of the shared node (vhost `/`) as the named `rabbitmqctl
/// list_consumers` columns (`queue_name`, `consumer_tag`, `active`, ...),
/// in that order. Blocking (bounded by [`CTL_TIMEOUT`]).
pub fn list_consumers(columns: &[&str]) -> Result<Vec<Vec<String>>> {
    let mut args = vec!["-q", "list_consumers", "--no-table-headers"];
    args.extend_from_slice(columns);
    let out = ok_stdout(
        run_with_timeout(ctl_command(None, None, &args), CTL_TIMEOUT)?,
        "list_consumers",
    )?;
    Ok(out
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect())
}

fn tail_file(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

/// Extra settings of a private node ([`BrokerNode::start_with`]).
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// Lines appended to the node's `rabbitmq.conf` (new-style keys, e.g.
    /// `listeners.ssl.default = 127.0.0.1:5671`).
    pub conf: String,
    /// Plugins enabled at boot (e.g. `rabbitmq_auth_mechanism_ssl`).
    pub plugins: Vec<String>,
}

impl BrokerNode {
    /// Start a fresh private node and wait (≤ [`NODE_START_TIMEOUT`]) until it
    /// accepts AMQP connections. Blocking (~5-10 s).
    pub fn start() -> Result<BrokerNode> {
        Self::start_with_cookie(None, &NodeOptions::default())
    }

    /// Like [`start`](Self::start), with extra `rabbitmq.conf` lines and
    /// plugins (a TLS listener, an auth mechanism).
    pub fn start_with(options: &NodeOptions) -> Result<BrokerNode> {
        Self::start_with_cookie(None, options)
    }

    /// Like [`start`](Self::start), with this Erlang cookie (nodes that
    /// are to form a cluster share one); `None` makes one up.
    fn start_with_cookie(cookie: Option<&str>, options: &NodeOptions) -> Result<BrokerNode> {
        reap_orphans();
        // Ports are picked racily; retry a couple of times on a failed boot.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::try_start(cookie, options) {
                Ok(n) => return Ok(n),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap())
    }

    /// [`BrokerNode::start`] on tokio's blocking pool.
    pub async fn start_async() -> Result<BrokerNode> {
        tokio::task::spawn_blocking(Self::start).await?
    }

    /// Run a blocking closure against this node on tokio's blocking pool, e.g.
    /// `node.blocking(|n| n.set_memory_alarm(true)).await?`.
    pub async fn blocking<T, F>(&self, f: F) -> T
    where
        F: FnOnce(&BrokerNode) -> T + Send + 'static,
        T: Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .expect("blocking BrokerNode task panicked")
    }

    fn try_start(cookie_value: Option<&str>, options: &NodeOptions) -> Result<BrokerNode> {
        let name = format!("fg-{}@localhost", random_suffix());
        let short = name.split('@').next().unwrap().to_string();
        let dir = base_dir().join(&short);
        fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let port = free_port()?;
        let mut dist_port = free_port()?;
        while dist_port == port {
            dist_port = free_port()?;
        }

        let home = dir.join("home");
        fs::create_dir_all(&home)?;
        fs::create_dir_all(dir.join("mnesia"))?;
        fs::create_dir_all(dir.join("log"))?;
        let cookie = home.join(".erlang.cookie");
        let value = cookie_value.map_or_else(
            || format!("FG{}COOKIE", random_suffix().to_uppercase()),
            str::to_owned,
        );
        fs::write(&cookie, value)?;
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400))?;
        }
        fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "loopback_users = none\n\
                 listeners.tcp.default = 127.0.0.1:{port}\n\
                 log.console = true\n\
                 log.console.level = warning\n\
                 log.file.level = info\n\
                 {}\n",
                options.conf
            ),
        )?;
        fs::write(
            dir.join("enabled_plugins"),
            format!("[{}].\n", options.plugins.join(",")),
        )?;
        fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let child = match server_command(&name, port, dist_port, &dir).and_then(|mut c| {
            c.spawn().with_context(|| {
                format!(
                    "spawning {:?} (is rabbitmq-server installed?)",
                    rmq_script("rabbitmq-server")
                )
            })
        }) {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
        registry().lock().unwrap().insert(name.clone(), home);
        ports().lock().unwrap().insert(port, name.clone());

        let node = BrokerNode {
            inner: Arc::new(Inner {
                name,
                port,
                dist_port,
                dir,
                child: Mutex::new(Some(child)),
            }),
        };
        // On error `node` is dropped here, which stops the node and removes its dir.
        node.wait_ready(NODE_START_TIMEOUT)?;
        Ok(node)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.inner.port));
        loop {
            if let Some(st) = self
                .inner
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "rabbitmq node {} exited during startup ({st}); output tail:\n{}",
                    self.inner.name,
                    self.log_tail()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "rabbitmq node {} did not accept AMQP on {addr} within {timeout:?}; output tail:\n{}",
                    self.inner.name,
                    self.log_tail()
                );
            }
            sleep(Duration::from_millis(100));
        }
        // The port opens before the node has finished booting; on a loaded
        // machine the rest (and the CLI's own start) takes a while.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(30));
        let secs = left.as_secs().to_string();
        let out = run_with_timeout(
            self.ctl_command(&["await_startup", "--timeout", &secs]),
            left + Duration::from_secs(5),
        )?;
        ok_stdout(out, "rabbitmqctl await_startup")
            .with_context(|| format!("output tail:\n{}", self.log_tail()))?;
        Ok(())
    }

    /// Last ~4 KiB of the node's console output (for error messages).
    pub fn log_tail(&self) -> String {
        tail_file(&self.inner.dir.join("server.out"), 4096)
    }

    /// AMQP port (listening on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.inner.port))
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.inner.port)
    }

    /// Erlang node name, `fg-<random>@localhost`.
    pub fn node_name(&self) -> &str {
        &self.inner.name
    }

    /// Erlang distribution port of the node.
    pub fn dist_port(&self) -> u16 {
        self.inner.dist_port
    }

    /// The node's temp dir (logs under `log/`, console output in `server.out`).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn ctl_command(&self, args: &[&str]) -> Command {
        ctl_command(
            Some(&self.inner.name),
            Some(&self.inner.dir.join("home")),
            args,
        )
    }

    /// Runs `rabbitmqctl -n <node> <args...>` (bounded by [`CTL_TIMEOUT`]; a
    /// timed-out or unspawnable command yields a failed `Output`).
    pub fn ctl(&self, args: &[&str]) -> Output {
        match run_with_timeout(self.ctl_command(args), CTL_TIMEOUT) {
            Ok(o) => o,
            Err(e) => {
                use std::os::unix::process::ExitStatusExt;
                Output {
                    status: std::process::ExitStatus::from_raw(127 << 8),
                    stdout: Vec::new(),
                    stderr: format!("{e:#}").into_bytes(),
                }
            }
        }
    }

    /// Like [`ctl`](Self::ctl) but fails on a non-zero exit; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = run_with_timeout(self.ctl_command(args), CTL_TIMEOUT)?;
        ok_stdout(
            out,
            &format!("rabbitmqctl -n {} {}", self.inner.name, args.join(" ")),
        )
    }

    /// Whether a memory resource alarm is currently in effect on the node.
    pub fn memory_alarm_active(&self) -> Result<bool> {
        let out = self.ctl_ok(&["-q", "eval", "rabbit_alarm:get_alarms()."])?;
        Ok(out.contains("resource_limit,memory"))
    }

    /// Raise (`vm_memory_high_watermark 0.0001`) or clear (back to `0.4`) the
    /// memory alarm; returns once the alarm state has actually changed (publishers
    /// get `connection.blocked` when it is on).
    pub fn set_memory_alarm(&self, on: bool) -> Result<()> {
        let wm = if on { "0.0001" } else { "0.4" };
        self.ctl_ok(&["set_vm_memory_high_watermark", wm])?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.memory_alarm_active()? == on {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("memory alarm did not become {on} within 15 s");
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Current AMQP connections on the node.
    pub fn list_connections(&self) -> Result<Vec<ConnInfo>> {
        let out = self.ctl_ok(&[
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "name",
            "client_properties",
        ])?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let mut it = line.splitn(3, '\t');
                let pid = it.next()?.trim().to_string();
                let name = it.next()?.trim().to_string();
                let props = it.next().unwrap_or("");
                if !pid.starts_with('<') {
                    return None;
                }
                Some(ConnInfo {
                    pid,
                    name,
                    connection_name: parse_connection_name(props),
                })
            })
            .collect())
    }

    /// `rabbitmqctl close_all_connections --global <reason>` (clients see a
    /// `connection.close` with code 320 CONNECTION_FORCED).
    pub fn close_all_connections(&self, reason: &str) -> Result<()> {
        self.ctl_ok(&["close_all_connections", "--global", reason])?;
        Ok(())
    }

    /// Close every connection whose client-provided `connection_name` contains
    /// `name_substring` (CONNECTION_FORCED). Returns how many were closed.
    pub fn close_connection_named(&self, name_substring: &str) -> Result<usize> {
        let mut n = 0;
        for c in self.list_connections()? {
            if c.connection_name
                .as_deref()
                .is_some_and(|cn| cn.contains(name_substring))
            {
                self.ctl_ok(&["close_connection", &c.pid, "closed by test"])?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// `rabbitmqctl stop_app`: the Erlang node stays up, AMQP listener goes away
    /// and all connections are closed.
    pub fn stop_app(&self) -> Result<()> {
        self.ctl_ok(&["stop_app"])?;
        Ok(())
    }

    /// `rabbitmqctl start_app`, then wait until AMQP is accepted again. A
    /// loaded machine can take longer than one `rabbitmqctl` bound to boot
    /// the app: up to three attempts (starting a started app does nothing).
    pub fn start_app(&self) -> Result<()> {
        let mut tried = Vec::new();
        for _ in 0..3 {
            match self.ctl_ok(&["start_app"]) {
                Ok(_) => return self.wait_ready(NODE_START_TIMEOUT),
                Err(e) => tried.push(e.to_string()),
            }
        }
        bail!("start_app failed three times: {tried:?}")
    }

    /// Stops the whole node (`rabbitmqctl stop`: the Erlang VM exits, the
    /// AMQP port closes) and waits until its process is gone. Its data dir
    /// and ports stay, so [`start_node`](Self::start_node) brings it back.
    pub fn stop_node(&self) -> Result<()> {
        self.ctl_ok(&["stop"])?;
        let mut guard = self.inner.child.lock().unwrap();
        if let Some(mut c) = guard.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(Duration::from_millis(50));
            }
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        Ok(())
    }

    /// Starts the node again after [`stop_node`](Self::stop_node): same
    /// name, data dir and ports; waits until it accepts AMQP.
    pub fn start_node(&self) -> Result<()> {
        let i = &self.inner;
        let child = server_command(&i.name, i.port, i.dist_port, &i.dir)?
            .spawn()
            .context("spawning rabbitmq-server again")?;
        *i.child.lock().unwrap() = Some(child);
        self.wait_ready(NODE_START_TIMEOUT)
    }

    /// Three (or `n`) private nodes clustered: one Erlang cookie, each
    /// further node joined to the first (`stop_app`, `join_cluster`,
    /// `start_app`). Blocking (~10 s per node). Quorum queues declared
    /// afterwards get a replica on every node.
    pub fn cluster(n: usize) -> Result<Vec<BrokerNode>> {
        let cookie = format!("FG{}CLUSTER", random_suffix().to_uppercase());
        let first = Self::start_with_cookie(Some(&cookie), &NodeOptions::default())?;
        let mut nodes = vec![first];
        for _ in 1..n {
            let node = Self::start_with_cookie(Some(&cookie), &NodeOptions::default())?;
            node.ctl_ok(&["stop_app"])?;
            node.ctl_ok(&["join_cluster", nodes[0].node_name()])?;
            node.start_app()?;
            nodes.push(node);
        }
        let members = nodes[0].ctl_ok(&["-q", "eval", "rabbit_mnesia:cluster_nodes(running)."])?;
        for node in &nodes {
            if !members.contains(node.node_name()) {
                bail!(
                    "{} is not a running cluster member: {members}",
                    node.node_name()
                );
            }
        }
        Ok(nodes)
    }

    /// [`cluster`](Self::cluster) on tokio's blocking pool.
    pub async fn cluster_async(n: usize) -> Result<Vec<BrokerNode>> {
        tokio::task::spawn_blocking(move || Self::cluster(n)).await?
    }

    /// `(messages_ready, messages_unacknowledged, consumers)` for `queue` on this node.
    pub fn list_queue(&self, queue: &str) -> Result<(u64, u64, u64)> {
        list_queue(Some(&self.inner.name), queue)
    }

    /// Like [`list_queue`](Self::list_queue) but `Ok(None)` if the queue is absent.
    pub fn try_list_queue(&self, queue: &str) -> Result<Option<(u64, u64, u64)>> {
        try_list_queue(Some(&self.inner.name), queue)
    }
}

/// The `rabbitmq-server` command of a node living in `dir` (console output
/// appended to `server.out`).
fn server_command(name: &str, port: u16, dist_port: u16, dir: &Path) -> Result<Command> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.out"))?;
    let mut cmd = Command::new(rmq_script("rabbitmq-server"));
    cmd.current_dir(dir)
        .env("HOME", dir.join("home"))
        .env("RABBITMQ_NODENAME", name)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_PID_FILE", dir.join("node.pid"))
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-kernel inet_dist_use_interface {127,0,0,1}",
        )
        .env_remove("RABBITMQ_ALLOW_INPUT")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("ERL_FLAGS")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(cmd)
}

/// Extract `connection_name` from `list_connections client_properties` output,
/// which on 3.10 looks like `[{"product","lapin",longstr}..., {"connection_name","x"}]`
/// or `{"connection_name",longstr,"x"}` depending on version.
fn parse_connection_name(props: &str) -> Option<String> {
    let key = "{\"connection_name\",";
    let start = props.find(key)? + key.len();
    let rest = &props[start..];
    // Take the last quoted string inside this tuple (skips a `longstr,` tag).
    let tuple = &rest[..rest.find('}')?];
    let end = tuple.rfind('"')?;
    let begin = tuple[..end].rfind('"')?;
    Some(tuple[begin + 1..end].to_string())
}

impl Drop for Inner {
    fn drop(&mut self) {
        registry().lock().unwrap().remove(&self.name);
        ports().lock().unwrap().remove(&self.port);
        let home = self.dir.join("home");
        let mut child = self.child.lock().unwrap().take();
        let running = child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if running {
            // Graceful stop (~1-2 s), bounded.
            let _ = run_with_timeout(
                ctl_command(Some(&self.name), Some(&home), &["stop"]),
                Duration::from_secs(20),
            );
        }
        if let Some(mut c) = child {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(Duration::from_millis(50));
            }
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        // Fallback: the beam pid from the pid file (the script may have forked it).
        if let Some(p) = read_pid(&self.dir.join("node.pid")) {
            let short = self.name.split('@').next().unwrap_or(&self.name);
            if pid_alive_with(p, short) {
                kill9(p);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
