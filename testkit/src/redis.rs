//! A private `redis-server` (never the shared one on 6379) for tests that
//! stop, kill or restart Redis. Its data survives [`PrivateRedis::stop`]
//! (`shutdown save` writes an RDB that the next start loads) but not
//! [`PrivateRedis::kill`].

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A private Redis on a free port, its files in a temporary directory;
/// killed on drop.
pub struct PrivateRedis {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one and waits (≤ 10 s) until it answers.
    pub fn start() -> PrivateRedis {
        let port = crate::node::free_port().expect("a free port");
        let dir = std::env::temp_dir().join(format!("flowgate-test-redis-{}", crate::unique("r")));
        std::fs::create_dir_all(&dir).expect("the private Redis's directory");
        let mut r = PrivateRedis {
            port,
            dir,
            child: None,
        };
        r.spawn();
        r
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server (again) and waits until it answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the private Redis runs already");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(
                std::time::Instant::now() < deadline,
                "the private Redis starts"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Answers `PING`.
    pub fn ping(&self) -> bool {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    }

    /// Stops the server, saving its data first.
    pub fn stop(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "save"])
            .output();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// `kill -9`: what it held in memory since the last save is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True while the server process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
