//! `[[exchanges]]`: exchanges to declare.

use super::*;

/// AMQP exchange types.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    /// Exact routing-key match.
    Direct,
    /// Pattern routing-key match (default).
    #[default]
    Topic,
    /// Every bound queue.
    Fanout,
    /// Header match.
    Headers,
}

/// `[[exchanges]]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    /// Exchange name. Required.
    pub name: String,
    /// `direct | topic | fanout | headers`. Default `topic`.
    #[serde(default, rename = "type")]
    pub kind: ExchangeType,
}

impl ExchangeType {
    /// Whether a binding key routes `routing_key` on an exchange of this
    /// type. Headers exchanges match on headers, not keys: every binding
    /// counts.
    pub(crate) fn routes(self, binding_key: &str, routing_key: &str) -> bool {
        match self {
            ExchangeType::Fanout | ExchangeType::Headers => true,
            ExchangeType::Direct => binding_key == routing_key,
            ExchangeType::Topic => {
                let pat: Vec<&str> = binding_key.split('.').collect();
                let key: Vec<&str> = routing_key.split('.').collect();
                topic_match(&pat, &key)
            }
        }
    }
}

/// AMQP topic matching: `*` is one word, `#` zero or more.
fn topic_match(pat: &[&str], key: &[&str]) -> bool {
    match pat.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|i| topic_match(rest, &key[i..])),
        Some((p, rest)) => match key.split_first() {
            Some((k, krest)) => (*p == "*" || p == k) && topic_match(rest, krest),
            None => false,
        },
    }
}
