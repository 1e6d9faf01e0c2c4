//! `flowgate run` as a child process, for tests of the daemon itself: its
//! signals (`kill -9`, SIGTERM and its exit status, SIGSTOP/SIGCONT), its
//! readiness and its metrics over `[http] bind`.
//!
//! The test names the binary (`env!("CARGO_BIN_EXE_flowgate")` in the
//! flowgate package's tests) and the config; [`Daemon::start`] adds the
//! `[http]` listener on a free port and writes the daemon's log next to the
//! config. Dropping a `Daemon` kills it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `flowgate run` process.
pub struct Daemon {
    exe: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
    /// The `[http] bind` port (`/metrics`, `/readyz`).
    pub http: u16,
}

impl Daemon {
    /// Writes `toml` (with `[http] bind` on a free port in front) to
    /// `<dir>/<name>.toml` and runs `exe run --config` on it, its log in
    /// `<dir>/<name>.log`.
    pub fn start(exe: &Path, dir: &Path, name: &str, toml: &str) -> Daemon {
        let http = crate::node::free_port().expect("a free port");
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!("[http]\nbind = \"127.0.0.1:{http}\"\n{toml}"),
        )
        .expect("write the daemon's config");
        let mut d = Daemon {
            exe: exe.to_owned(),
            log: dir.join(format!("{name}.log")),
            config,
            child: None,
            stopped: false,
            http,
        };
        d.spawn();
        d
    }

    /// Starts the process again on the same config (after it exited or was
    /// killed); its log is appended to.
    pub fn restart(&mut self) {
        assert!(!self.is_running(), "restart of a running daemon");
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the daemon's log");
        let child = Command::new(&self.exe)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,lapin=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("flowgate runs");
        self.child = Some(child);
        self.stopped = false;
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// True while the process has not exited (a stopped one runs).
    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none() && self.child.is_some()
    }

    /// Its exit status, if it exited since the last look (the status is
    /// reported once; the daemon then counts as not running).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }

    /// `kill -9`, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    /// SIGTERM, then waits up to `within` for the exit: its status, or
    /// `None` if it did not exit in time (it is then killed).
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        if self.stopped {
            self.cont();
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// SIGSTOP: the process freezes (its connections stay open, silent).
    pub fn stop(&mut self) {
        self.signal(libc::SIGSTOP);
        self.stopped = true;
    }

    /// SIGCONT after [`stop`](Self::stop).
    pub fn cont(&mut self) {
        self.signal(libc::SIGCONT);
        self.stopped = false;
    }

    /// True between [`stop`](Self::stop) and [`cont`](Self::cont).
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    async fn get(&self, path: &str) -> Option<String> {
        let mut s = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(("127.0.0.1", self.http)),
        )
        .await
        .ok()?
        .ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body))
            .await
            .ok()?
            .ok()?;
        Some(body)
    }

    /// A metric's value from `/metrics`: the first line starting with
    /// `line_prefix` (e.g. `flowgate_messages_acked_total{stage="s1"}`);
    /// 0 when absent or unreachable.
    pub async fn metric(&self, line_prefix: &str) -> f64 {
        self.get("/metrics")
            .await
            .and_then(|body| {
                body.lines()
                    .find(|l| l.starts_with(line_prefix))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// The whole HTTP answer (status line, headers, body) to `GET path` on
    /// `[http] bind`; `None` when unreachable.
    pub async fn http_get(&self, path: &str) -> Option<String> {
        self.get(path).await
    }

    /// `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        self.get("/readyz").await.is_some_and(|body| {
            body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200")
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.stopped {
            self.cont();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `key-seq` message ids the `record` handler wrote to `path`, per
/// key, in file order (a missing file is none).
pub fn recorded(path: &Path) -> HashMap<String, Vec<u32>> {
    let mut out: HashMap<String, Vec<u32>> = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if let Some((k, n)) = line.rsplit_once('-') {
            out.entry(k.to_owned())
                .or_default()
                .push(n.parse().unwrap_or(u32::MAX));
        }
    }
    out
}

/// Asserts that `handled`, the sequence numbers of `key`'s events in
/// handling order, is the published one `0..events` with at most repeats
/// of a suffix: each handling continues the run before it (`s + 1`) or
/// starts a repeat at or before it (a redelivery), nothing is handled
/// before every earlier event of its key was, and all were.
pub fn in_order_with_repeats(key: &str, handled: &[u32], events: u32) {
    assert_eq!(handled.first(), Some(&0), "{key}: {handled:?}");
    for w in handled.windows(2) {
        assert!(
            w[1] == w[0] + 1 || w[1] <= w[0],
            "{key}: {} handled right after {} (an inversion): {handled:?}",
            w[1],
            w[0]
        );
    }
    assert_eq!(
        handled.iter().max(),
        Some(&(events - 1)),
        "{key}: {handled:?}"
    );
}
