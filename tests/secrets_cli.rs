//! No secret in any output (issue 9, acceptance 6): with the broker URL and
//! the Redis URLs carrying passwords in the environment, no command of the
//! `flowgate` binary or of the example's `flowgate-orders` prints them — not
//! in `--help`, not in an error, not in a log line — and `Debug` of the
//! configuration redacts them.

use std::path::{Path, PathBuf};
use std::process::Command;

const AMQP_SECRET: &str = "amqpS3cretPw1x";
const REDIS_SECRET: &str = "redisS3cretPw2y";

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The environment of every command: passwords in every URL (the
/// example's own Redis variable only for the example: the engine refuses
/// an `[orders]` section it does not know).
fn secret_env(port: u16, bin: &Path) -> Vec<(&'static str, String)> {
    let mut env = vec![
        (
            "FLOWGATE__AMQP__URL",
            format!("amqp://fg:{AMQP_SECRET}@127.0.0.1:{port}/%2f"),
        ),
        (
            "FLOWGATE__REDIS__URL",
            format!("redis://:{REDIS_SECRET}@127.0.0.1:{port}"),
        ),
    ];
    if bin.ends_with("flowgate-orders") {
        env.push((
            "FLOWGATE__ORDERS__REDIS_URL",
            format!("redis://:{REDIS_SECRET}@127.0.0.1:{port}"),
        ));
    }
    env
}

/// Runs `bin args` with the secrets in the environment (and `extra`);
/// returns stdout + stderr.
fn run(bin: &Path, args: &[&str], extra: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(bin);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in secret_env(closed_port(), bin) {
        cmd.env(k, v);
    }
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

fn assert_no_secret(what: &str, output: &str) {
    for secret in [AMQP_SECRET, REDIS_SECRET] {
        assert!(
            !output.contains(secret),
            "`{what}` printed a secret:\n{output}"
        );
    }
}

/// A daemon config: a stage with Redis dedup, a short connect timeout.
fn config_file(dir: &Path) -> PathBuf {
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
    .unwrap();
    p
}

#[test]
fn no_flowgate_command_prints_a_secret() {
    let bin = Path::new(env!("CARGO_BIN_EXE_flowgate"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path());
    let cfg = cfg.to_str().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[amqp]\nurll = 1\n").unwrap();
    let bad = bad.to_str().unwrap();
    let helps: &[&[&str]] = &[
        &["--help"],
        &["run", "--help"],
        &["check-config", "--help"],
        &["dlq", "--help"],
        &["dlq", "stats", "--help"],
        &["dlq", "replay", "--help"],
        &["dlq", "purge", "--help"],
        &["no-such-command"],
    ];
    for args in helps {
        assert_no_secret(&args.join(" "), &run(bin, args, &[]));
    }
    let runs: &[&[&str]] = &[
        &["check-config", "--config", cfg],
        &["check-config", "--config", bad],
        &["run", "--config", cfg],
        &["dlq", "stats", "--config", cfg, "--queue", "secrets-q"],
        &["dlq", "replay", "--config", cfg, "--queue", "secrets-q"],
        &[
            "dlq",
            "purge",
            "--config",
            cfg,
            "--queue",
            "secrets-q",
            "--yes",
        ],
    ];
    for args in runs {
        let what = args.join(" ");
        assert_no_secret(&what, &run(bin, args, &[]));
        // Logs at every level of the engine's own code.
        let debug = run(bin, args, &[("RUST_LOG", "debug,lapin=info")]);
        assert_no_secret(&format!("RUST_LOG=debug {what}"), &debug);
    }
    // A malformed URL is refused without echoing it.
    let malformed = format!("amqp://fg:{AMQP_SECRET}@");
    let out = run(
        bin,
        &["check-config", "--config", cfg],
        &[("FLOWGATE__AMQP__URL", &malformed)],
    );
    assert!(out.contains("amqp.url"), "{out}");
    assert_no_secret("check-config with a malformed URL", &out);
}

/// The example's binary, built (or found up to date) beside this test's
/// binaries: `cargo test` of this package does not build another package's.
fn orders_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/secrets_cli-<hash> → target/<profile>/flowgate-orders
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("flowgate-orders");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "flowgate-orders", "--bin", "flowgate-orders"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo builds the example");
    assert!(status.success(), "building flowgate-orders");
    assert!(bin.exists(), "{} built", bin.display());
    bin
}

#[test]
fn no_example_command_prints_a_secret() {
    let bin = orders_bin();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path());
    let cfg = cfg.to_str().unwrap();
    let cmds: &[&[&str]] = &[
        &["--help"],
        &["demo", "--help"],
        &["load", "--help"],
        &["run", "--help"],
        &["worker", "--help"],
        // No broker answers: the hint names the host and port only.
        &["demo", "--quiet"],
        &["demo", "--quiet", "--chaos"],
        &["run", "--config", cfg],
        &["worker", "--config", cfg, "--stage", "s"],
    ];
    for args in cmds {
        assert_no_secret(&args.join(" "), &run(&bin, args, &[]));
    }
}

#[test]
fn debug_of_the_configuration_redacts_every_url() {
    let mut cfg = flowgate::Config::default();
    cfg.amqp.url = format!("amqp://fg:{AMQP_SECRET}@broker:5672/%2f");
    cfg.redis.url = format!("redis://:{REDIS_SECRET}@redis:6379");
    let shown = format!("{cfg:?} {:#?}", cfg);
    assert_no_secret("Debug of Config", &shown);
    assert!(shown.contains("broker"), "still says where: {shown}");
}
