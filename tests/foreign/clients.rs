//! The foreign AMQP clients (pika, amqplib), installed once per build by
//! `tests/foreign/setup.sh` into the build's target dir; shared by the test
//! binaries that run them (`#[path]`-included).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The scripts' folder.
pub const FOREIGN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/foreign");

/// Where the clients are installed, or why they could not be.
pub fn clients() -> &'static Result<PathBuf, String> {
    static CLIENTS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CLIENTS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("foreign-clients");
        let out = std::process::Command::new("bash")
            .arg(format!("{FOREIGN}/setup.sh"))
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run setup.sh: {e}"))?;
        if out.status.success() {
            Ok(dir)
        } else {
            Err(format!(
                "setup.sh failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
}

/// The installed clients, or `None` after a loud skip (never under CI).
pub fn clients_or_skip(test: &str) -> Option<PathBuf> {
    match clients() {
        Ok(dir) => Some(dir.clone()),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: foreign clients unavailable under CI: {e}")
        }
        Err(e) => {
            // Straight to the process's stderr, past the test harness's
            // capture: a skip shows even when the test "passes".
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: foreign clients unavailable (set CI=true to fail): {e}"
            );
            None
        }
    }
}
