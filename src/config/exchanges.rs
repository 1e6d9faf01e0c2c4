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
