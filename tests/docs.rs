//! The README documents every metric and every configuration key.

use std::collections::BTreeSet;

const README: &str = include_str!("../README.md");
const TABLE_START: &str = "<!-- metrics table: generated from Metrics::describe() -->\n";
const TABLE_END: &str = "<!-- end of metrics table -->";

/// The README's metrics table is `Metrics::readme_table()`, exactly: every
/// registered metric with its type, labels and help, nothing else.
/// `FLOWGATE_BLESS=1 cargo test --test docs` rewrites it.
#[test]
fn the_readme_metrics_table_is_generated_from_the_declarations() {
    let want = flowgate::Metrics::readme_table();
    assert!(
        flowgate::Metrics::describe().len() > 30,
        "found the metrics"
    );
    let start = README.find(TABLE_START).expect("the table's start marker") + TABLE_START.len();
    let end = start
        + README[start..]
            .find(TABLE_END)
            .expect("the table's end marker");
    let got = &README[start..end];
    if got != want && std::env::var_os("FLOWGATE_BLESS").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let text = format!("{}{want}{}", &README[..start], &README[end..]);
        std::fs::write(path, text).expect("README written");
        return;
    }
    assert!(
        got == want,
        "README metrics table is stale (FLOWGATE_BLESS=1 cargo test --test docs rewrites it); want:\n{want}"
    );
}

/// Collects `a.b[].c` paths of every key in a JSON value.
fn paths(prefix: &str, v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                let nested = matches!(v, serde_json::Value::Object(_))
                    || matches!(v, serde_json::Value::Array(a) if a.first().is_some_and(|x| x.is_object()));
                if !nested || k == "stock" {
                    out.insert(p.clone());
                }
                paths(&p, v, out);
            }
        }
        serde_json::Value::Array(a) => {
            if let Some(first) = a.first().filter(|x| x.is_object()) {
                paths(&format!("{prefix}[]"), first, out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_config_key_is_in_the_readme_reference() {
    // Every section and nested table present once.
    let cfg = flowgate::Config::from_toml(
        r#"
        [[exchanges]]
        name = "shop"
        [[queues]]
        name = "orders"
        bindings = [{ exchange = "shop", routing_key = "order.created" }]
        watermark = { high = 10, low = 5 }
        [[stages]]
        name = "s"
        queue = "orders"
        output = { exchange = "shop", routing_key = "x" }
        retry = { max_attempts = 3, backoff = ["1s"] }
        http = { url = "http://127.0.0.1:8000/" }
        batch = { size = 10 }
        [ingress]
        routes = [{ exchange = "shop" }]
        "#,
    )
    .expect("sample config");
    let json = serde_json::to_value(&cfg).expect("config serializes");
    let mut keys = BTreeSet::new();
    paths("", &json, &mut keys);
    assert!(keys.len() > 40, "walked the config: {keys:?}");
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !README.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "config keys missing from README: {missing:?}"
    );
}

/// The README's "Ordering" section names every form `order_by` takes, both
/// `missing_key` choices, the reason and header a keyless or failed
/// delivery's dead letter carries, the metrics of ordering, and the
/// partitions' keys, plugin, instance index and depth sampling.
#[test]
fn the_ordering_section_names_what_it_documents() {
    let start = README.find("### Ordering\n").expect("an Ordering section");
    let end = start + 13 + README[start + 13..].find("\n## ").expect("its end");
    let section = &README[start..end];
    for needle in [
        "`message_id`",
        "`routing_key`",
        "`correlation_id`",
        "`header:<name>`",
        "EngineBuilder::order_key",
        "`missing_key = \"reject\"`",
        "`\"shared\"`",
        flowgate::envelope::Reason::MissingKey.as_str(),
        flowgate::envelope::ORDER_KEY,
        "consumer_timeout",
        "single_active_consumer",
        flowgate::Metrics::LANE_WAITS.name,
        flowgate::Metrics::CONSUMER_ACTIVE.name,
        "tier=\"in-place\"",
        "`partitions = N`",
        "`partition_key`",
        "`instance_index`",
        "FLOWGATE__PARTITIONING__INSTANCE_INDEX",
        flowgate::topology::CONSISTENT_HASH,
        flowgate::topology::CONSISTENT_HASH_PLUGIN,
        "`Partition-Key`",
        "Depth and watermarks",
    ] {
        assert!(
            section.contains(needle),
            "the README's Ordering section does not mention {needle}"
        );
    }
}
