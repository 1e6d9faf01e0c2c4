//! The fault soak (issue 23, item 3): two `flowgate run` daemons on one
//! pipeline, a private broker node and a private Redis, a seeded nemesis
//! (kill -9, SIGTERM, SIGSTOP, closed connections, the broker app and the
//! whole node stopped, memory alarms, Redis restarted; sometimes two at
//! once). Every confirmed message must end arrived — none lost, none
//! dead-lettered, none stuck —, every fault must be recovered from, and no
//! daemon may exit unasked. Duplicates are reported.
//!
//! About 90 s of faults by default; `FLOWGATE_SOAK_SECS=3600` runs an hour,
//! `FLOWGATE_SOAK_SEED=<n>` repeats a schedule. See the test kit's `soak`.

use flowgate_testkit::soak::{self, SoakPlan};

#[test]
fn two_daemons_under_a_seeded_nemesis_lose_nothing_and_get_stuck_nowhere() {
    let plan = SoakPlan::from_env(env!("CARGO_BIN_EXE_flowgate").into(), 90);
    println!("soak: seed {} for {:?}", plan.seed, plan.duration);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let report = rt.block_on(soak::run(plan));
    println!("{}", report.summary());
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "the soak failed (seed {}; daemon logs kept in {}):\n  {}",
        report.seed,
        report.dir.display(),
        failures.join("\n  ")
    );
}
