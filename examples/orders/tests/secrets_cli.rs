//! No secret in any output of the example's binary (issue 9, acceptance 6):
//! with the broker URL and both Redis URLs carrying passwords in the
//! environment, no `flowgate-orders` command prints them — not in `--help`,
//! not in an error (no broker answers), not in a log line.

use flowgate_testkit::secrets::{assert_no_secret, config_file, redis_url_with_secret, run};
use std::path::Path;

#[test]
fn no_example_command_prints_a_secret() {
    let bin = Path::new(env!("CARGO_BIN_EXE_flowgate-orders"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(dir.path());
    let cfg = cfg.to_str().unwrap();
    let orders_redis = redis_url_with_secret();
    let extra = [("FLOWGATE__ORDERS__REDIS_URL", orders_redis.as_str())];
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
        assert_no_secret(&args.join(" "), &run(bin, args, &extra));
    }
}
