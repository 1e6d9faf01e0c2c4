//! Secret-leak checks for command-line tests: passwords planted in every
//! URL of the environment, a command run with them, and the check that its
//! output never shows them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The password planted in the broker URL.
pub const AMQP_SECRET: &str = "amqpS3cretPw1x";
/// The password planted in the Redis URLs.
pub const REDIS_SECRET: &str = "redisS3cretPw2y";

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("its address").port()
}

/// A Redis URL carrying [`REDIS_SECRET`] to a closed port.
pub fn redis_url_with_secret() -> String {
    format!("redis://:{REDIS_SECRET}@127.0.0.1:{}", closed_port())
}

/// Runs `bin args` with the engine's broker and Redis URLs carrying the
/// secrets (to a closed port), plus `extra`; returns stdout + stderr.
pub fn run(bin: &Path, args: &[&str], extra: &[(&str, &str)]) -> String {
    let port = closed_port();
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env(
            "FLOWGATE__AMQP__URL",
            format!("amqp://fg:{AMQP_SECRET}@127.0.0.1:{port}/%2f"),
        )
        .env("FLOWGATE__REDIS__URL", redis_url_with_secret());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("command runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Panics if `output` shows either secret.
pub fn assert_no_secret(what: &str, output: &str) {
    for secret in [AMQP_SECRET, REDIS_SECRET] {
        assert!(
            !output.contains(secret),
            "`{what}` printed a secret:\n{output}"
        );
    }
}

/// A daemon config in `dir`: a stage with Redis dedup, a short connect
/// timeout, no HTTP listener.
pub fn config_file(dir: &Path) -> PathBuf {
    let p = dir.join("flowgate.toml");
    std::fs::write(
        &p,
        r#"
[amqp]
connect_timeout = "1s"
[http]
bind = ""
[[exchanges]]
name = "secrets-ex"
[[queues]]
name = "secrets-q"
bindings = [{ exchange = "secrets-ex" }]
[[stages]]
name = "s"
queue = "secrets-q"
handler = "sink"
dedup = "redis"
"#,
    )
    .expect("write the config");
    p
}
