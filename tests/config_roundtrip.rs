//! Property: for any valid configuration, load → serialize → load gives the
//! same configuration, and serializing it again gives the same text (the
//! serialized form is a fixed point). No broker needed.

use flowgate::config::{Concurrency, QueueKind};
use flowgate::Config;
use proptest::prelude::*;
use std::time::Duration;

/// One stage's knobs, as a config file would write them.
#[derive(Debug, Clone)]
struct StageGen {
    prefetch: u32,
    concurrency: (u32, Option<u32>),
    delay_ms: Option<u64>,
    rate: Option<u32>,
    retry: Option<(u32, Vec<u64>)>,
    dedup: &'static str,
    verify: Option<&'static str>,
    /// `order_by` and `missing_key`.
    order: Option<(&'static str, Option<&'static str>)>,
}

/// One queue's knobs.
#[derive(Debug, Clone)]
struct QueueGen {
    classic: bool,
    dead_letter: bool,
    delivery_limit: Option<u32>,
    watermark: Option<(u64, u64)>,
    single_active_consumer: bool,
    /// `partitions` and `partition_key`.
    partitions: Option<(u16, Option<&'static str>)>,
}

#[derive(Debug, Clone)]
struct Gen {
    stages: Vec<(StageGen, QueueGen)>,
    grace_ms: u64,
    rate: u32,
    burst: u32,
    max_waiters: u32,
    confirm_timeout_ms: u64,
    depth_interval_ms: u64,
    spool_max_bytes: Option<u64>,
    /// `[partitioning]`: (instance_index, instance_count).
    partitioning: Option<(u32, u32)>,
}

fn stage() -> impl Strategy<Value = StageGen> {
    (
        1u32..=1000,
        (1u32..=32, proptest::option::of(0u32..=32)),
        proptest::option::of(1u64..=5_000),
        proptest::option::of(1u32..=100_000),
        proptest::option::of((1u32..=10, proptest::collection::vec(1u64..=600_000, 1..=4))),
        prop_oneof![Just("off"), Just("memory"), Just("redis")],
        proptest::option::of(Just("off")),
        proptest::option::of((
            prop_oneof![
                Just("message_id"),
                Just("routing_key"),
                Just("correlation_id"),
                Just("header:account")
            ],
            proptest::option::of(prop_oneof![Just("reject"), Just("shared")]),
        )),
    )
        .prop_map(
            |(prefetch, (min, extra), delay_ms, rate, retry, dedup, verify, order)| StageGen {
                prefetch,
                concurrency: (min, extra.map(|e| min + e)),
                delay_ms,
                rate,
                retry,
                dedup,
                verify,
                order,
            },
        )
}

fn queue() -> impl Strategy<Value = QueueGen> {
    (
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(1u32..=1000),
        proptest::option::of((1u64..=100_000, 1u64..=100_000)),
        any::<bool>(),
        proptest::option::of((
            1u16..=256,
            proptest::option::of(prop_oneof![
                Just("message_id"),
                Just("routing_key"),
                Just("correlation_id"),
                Just("header:account")
            ]),
        )),
    )
        .prop_map(
            |(classic, dead_letter, delivery_limit, wm, sac, partitions)| QueueGen {
                classic,
                dead_letter,
                delivery_limit,
                single_active_consumer: sac,
                watermark: wm.map(|(a, b)| (a.max(b) + 1, a.min(b))),
                partitions,
            },
        )
}

fn config() -> impl Strategy<Value = Gen> {
    (
        proptest::collection::vec((stage(), queue()), 1..=4),
        1u64..=600_000,
        0u32..=100_000,
        1u32..=10_000,
        1u32..=10_000,
        1u64..=120_000,
        10u64..=60_000,
        proptest::option::of(1024u64..=1 << 34),
        proptest::option::of((0u32..=16, 1u32..=16)),
    )
        .prop_map(
            |(stages, grace_ms, rate, burst, max_waiters, confirm, depth, spool, part)| Gen {
                stages,
                grace_ms,
                rate,
                burst,
                max_waiters,
                confirm_timeout_ms: confirm,
                depth_interval_ms: depth,
                spool_max_bytes: spool,
                partitioning: part.map(|(i, extra)| (i, i + extra)),
            },
        )
}

/// The config file `g` stands for.
fn toml_of(g: &Gen) -> String {
    let mut t = format!(
        "[amqp]\nurl = \"amqp://app:secret@127.0.0.1:5672/%2f\"\n\
         [http]\nbind = \"127.0.0.1:0\"\n\
         [shutdown]\ngrace = \"{}ms\"\n\
         [publisher]\nrate = {}\nburst = {}\nmax_waiters = {}\nconfirm_timeout = \"{}ms\"\n\
         [depth]\ninterval = \"{}ms\"\n",
        g.grace_ms, g.rate, g.burst, g.max_waiters, g.confirm_timeout_ms, g.depth_interval_ms
    );
    if let Some(b) = g.spool_max_bytes {
        t += &format!("[spool]\nmax_bytes = {b}\n");
    }
    if let Some((index, count)) = g.partitioning {
        t += &format!("[partitioning]\ninstance_index = {index}\ninstance_count = {count}\n");
    }
    if g.stages.iter().any(|(s, _)| s.dedup == "redis") {
        t += "[redis]\nurl = \"redis://127.0.0.1:6379\"\n";
    }
    t += "[[exchanges]]\nname = \"ex\"\n";
    let n = g.stages.len();
    for (i, (_, q)) in g.stages.iter().enumerate() {
        t += &format!(
            "[[queues]]\nname = \"q{i}\"\nkind = \"{}\"\ndead_letter = {}\n\
             bindings = [{{ exchange = \"ex\", routing_key = \"k{i}\" }}]\n",
            if q.classic { "classic" } else { "quorum" },
            q.dead_letter
        );
        if let Some(l) = q.delivery_limit {
            t += &format!("delivery_limit = {l}\n");
        }
        if let Some((high, low)) = q.watermark {
            t += &format!("watermark = {{ high = {high}, low = {low} }}\n");
        }
        if q.single_active_consumer {
            t += "single_active_consumer = true\n";
        }
        if let Some((n, key)) = q.partitions {
            t += &format!("partitions = {n}\n");
            if let Some(k) = key {
                t += &format!("partition_key = \"{k}\"\n");
            }
        }
    }
    t += &format!(
        "[[queues]]\nname = \"sink\"\nbindings = [{{ exchange = \"ex\", routing_key = \"k{n}\" }}]\n"
    );
    for (i, (s, _)) in g.stages.iter().enumerate() {
        t += &format!(
            "[[stages]]\nname = \"s{i}\"\nqueue = \"q{i}\"\nhandler = \"forward\"\nprefetch = {}\n\
             dedup = \"{}\"\noutput = {{ exchange = \"ex\", routing_key = \"k{}\" }}\n",
            s.prefetch,
            s.dedup,
            i + 1
        );
        t += &match s.concurrency {
            (n, None) => format!("concurrency = {n}\n"),
            (min, Some(max)) => format!("concurrency = {{ min = {min}, max = {max} }}\n"),
        };
        if let Some(d) = s.delay_ms {
            t += &format!("delay = \"{d}ms\"\n");
        }
        if let Some(r) = s.rate {
            t += &format!("rate = {r}\n");
        }
        if let Some(v) = s.verify {
            t += &format!("verify = \"{v}\"\n");
        }
        if let Some((by, missing)) = s.order {
            t += &format!("order_by = \"{by}\"\n");
            if let Some(m) = missing {
                t += &format!("missing_key = \"{m}\"\n");
            }
        }
        if let Some((max_attempts, backoff)) = &s.retry {
            let list: Vec<String> = backoff.iter().map(|ms| format!("\"{ms}ms\"")).collect();
            t += &format!(
                "retry = {{ max_attempts = {max_attempts}, backoff = [{}] }}\n",
                list.join(", ")
            );
        }
    }
    t
}

/// The whole configuration as a value (Config has no `PartialEq`; every
/// field is serialized, so equal values mean equal configurations).
fn value(cfg: &Config) -> serde_json::Value {
    serde_json::to_value(cfg).expect("a config serializes")
}

/// `cfg` holds what `g` wrote.
fn matches(g: &Gen, cfg: &Config) -> Result<(), TestCaseError> {
    prop_assert_eq!(cfg.shutdown.grace, Duration::from_millis(g.grace_ms));
    prop_assert_eq!(
        cfg.partitioning
            .instance_index
            .zip(cfg.partitioning.instance_count),
        g.partitioning
    );
    prop_assert_eq!(cfg.publisher.rate, g.rate);
    prop_assert_eq!(cfg.publisher.burst, g.burst);
    prop_assert_eq!(cfg.publisher.max_waiters, g.max_waiters);
    prop_assert_eq!(
        cfg.publisher.confirm_timeout,
        Duration::from_millis(g.confirm_timeout_ms)
    );
    prop_assert_eq!(
        cfg.depth.interval,
        Duration::from_millis(g.depth_interval_ms)
    );
    if let Some(b) = g.spool_max_bytes {
        prop_assert_eq!(cfg.spool.max_bytes, b);
    }
    prop_assert_eq!(cfg.stages.len(), g.stages.len());
    prop_assert_eq!(cfg.queues.len(), g.stages.len() + 1);
    for (i, (s, q)) in g.stages.iter().enumerate() {
        let st = &cfg.stages[i];
        prop_assert_eq!(st.prefetch, s.prefetch);
        prop_assert_eq!(st.delay, s.delay_ms.map(Duration::from_millis));
        prop_assert_eq!(st.rate, s.rate);
        let concurrency = match s.concurrency {
            (n, None) => Concurrency::Fixed(n),
            (min, Some(max)) => Concurrency::Range { min, max },
        };
        prop_assert_eq!(st.concurrency, concurrency);
        prop_assert_eq!(
            serde_json::to_value(st.dedup).unwrap(),
            serde_json::Value::from(s.dedup)
        );
        prop_assert_eq!(
            st.retry.as_ref().map(|r| (
                r.max_attempts,
                r.backoff
                    .iter()
                    .map(|d| d.as_millis() as u64)
                    .collect::<Vec<_>>()
            )),
            s.retry.clone()
        );
        prop_assert_eq!(st.order_by.as_deref(), s.order.map(|(by, _)| by));
        prop_assert_eq!(
            st.missing_key.map(|m| serde_json::to_value(m).unwrap()),
            s.order.and_then(|(_, m)| m).map(serde_json::Value::from)
        );
        let qc = &cfg.queues[i];
        prop_assert_eq!(qc.single_active_consumer, q.single_active_consumer);
        prop_assert_eq!(qc.partitions, q.partitions.map(|(n, _)| n));
        prop_assert_eq!(
            qc.partition_key.as_deref(),
            q.partitions.and_then(|(_, k)| k)
        );
        prop_assert_eq!(qc.kind == QueueKind::Classic, q.classic);
        prop_assert_eq!(qc.dead_letter, q.dead_letter);
        prop_assert_eq!(qc.watermark.map(|w| (w.high, w.low)), q.watermark);
        if let Some(l) = q.delivery_limit {
            prop_assert_eq!(qc.delivery_limit, Some(l));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn load_serialize_load_is_the_identity(g in config()) {
        let text = toml_of(&g);
        let first = Config::from_toml(&text)
            .map_err(|e| TestCaseError::fail(format!("generated config rejected: {e}\n{text}")))?;
        // What was written is what was loaded.
        matches(&g, &first)?;
        let serialized = toml::to_string(&first)
            .map_err(|e| TestCaseError::fail(format!("serialize: {e}")))?;
        let second = Config::from_toml(&serialized).map_err(|e| {
            TestCaseError::fail(format!("the serialized config does not load: {e}\n{serialized}"))
        })?;
        // Checked field by field against what was written (a field the
        // serializer skipped would vanish from both values below), then as
        // a whole.
        matches(&g, &second)?;
        prop_assert_eq!(value(&first), value(&second), "{}", serialized);
        let again = toml::to_string(&second)
            .map_err(|e| TestCaseError::fail(format!("serialize: {e}")))?;
        prop_assert_eq!(serialized, again);
    }
}
