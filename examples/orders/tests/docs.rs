//! The example's README documents every `[orders]` key.

const README: &str = include_str!("../README.md");

#[test]
fn every_orders_key_is_in_the_readme_reference() {
    let json = serde_json::to_value(flowgate_orders::OrdersConfig::default())
        .expect("the section serializes");
    let keys: Vec<String> = json
        .as_object()
        .expect("a table")
        .keys()
        .map(|k| format!("orders.{k}"))
        .collect();
    assert!(keys.len() > 10, "walked the section: {keys:?}");
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !README.contains(&format!("| `{k}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "[orders] keys missing from README: {missing:?}"
    );
}
