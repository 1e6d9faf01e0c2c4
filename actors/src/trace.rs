//! W3C trace context (`traceparent`) carried in AMQP headers.

use lapin::types::{AMQPValue, LongString};
use lapin::BasicProperties;

/// The header name.
pub const TRACEPARENT: &str = "traceparent";

fn random_hex(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes * 2);
    while s.len() < bytes * 2 {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(bytes * 2);
    s
}

/// A new root `traceparent` (sampled).
pub fn new_traceparent() -> String {
    format!("00-{}-{}-01", random_hex(16), random_hex(8))
}

/// A child of `parent`: same trace id, new span id. Returns a new root if
/// `parent` is not a valid version-00 traceparent.
pub fn child_of(parent: &str) -> String {
    let parts: Vec<&str> = parent.split('-').collect();
    if parts.len() == 4 && parts[0] == "00" && parts[1].len() == 32 && parts[2].len() == 16 {
        format!("00-{}-{}-{}", parts[1], random_hex(8), parts[3])
    } else {
        new_traceparent()
    }
}

/// Reads the traceparent header from properties.
pub fn traceparent_of(props: &BasicProperties) -> Option<String> {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(TRACEPARENT))
        .and_then(crate::message::header_string)
}

/// Sets a traceparent header.
pub fn set_traceparent(props: &mut BasicProperties, value: String) {
    crate::message::set_header(
        props,
        TRACEPARENT,
        AMQPValue::LongString(LongString::from(value)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_keeps_trace_id_and_changes_span() {
        let root = new_traceparent();
        let child = child_of(&root);
        assert_eq!(root.len(), 55);
        assert_eq!(&root[3..35], &child[3..35]);
        assert_ne!(&root[36..52], &child[36..52]);
        assert_ne!(child_of("garbage")[3..35], root[3..35]);
    }
}
