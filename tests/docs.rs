//! The README documents every metric and every configuration key.

use std::collections::BTreeSet;

const README: &str = include_str!("../README.md");
const METRICS_SRC: &str = include_str!("../actors/src/metrics.rs");

#[test]
fn every_registered_metric_is_in_the_readme_table() {
    let names: BTreeSet<&str> = METRICS_SRC
        .split('"')
        .filter(|s| {
            s.starts_with("flowgate_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .collect();
    assert!(names.len() > 20, "found the metric names: {names:?}");
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !README.contains(&format!("| `{n}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from README: {missing:?}"
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
