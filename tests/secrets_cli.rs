//! No secret in any output (issue 9, acceptance 6): with the broker URL and
//! the Redis URL carrying passwords in the environment, no command of the
//! `flowgate` binary prints them — not in `--help`, not in an error, not in
//! a log line — and `Debug` of the configuration redacts them. (The
//! example's binary has the same test in `examples/orders/tests`.)

use flowgate_testkit::secrets::{assert_no_secret, config_file, run, AMQP_SECRET, REDIS_SECRET};
use std::path::Path;

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

#[test]
fn debug_of_the_configuration_redacts_every_url() {
    let mut cfg = flowgate::Config::default();
    cfg.amqp.url = format!("amqp://fg:{AMQP_SECRET}@broker:5672/%2f");
    cfg.redis.url = format!("redis://:{REDIS_SECRET}@redis:6379");
    let shown = format!("{cfg:?} {:#?}", cfg);
    assert_no_secret("Debug of Config", &shown);
    assert!(shown.contains("broker"), "still says where: {shown}");
}
