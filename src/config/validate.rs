//! Start-up validation: every mistake names its key.

use super::{Concurrency, Config, ConfigError};
use std::collections::HashSet;

/// Checks a configuration. `handlers` are the handler names available
/// (built-ins plus those a host registered).
pub fn validate(cfg: &Config, handlers: &[String]) -> Result<(), ConfigError> {
    let url = cfg.amqp.resolved_url()?;
    match url::Url::parse(&url) {
        Ok(u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {
            if u.host_str().is_none_or(str::is_empty) {
                return Err(ConfigError::new("amqp.url", "has no host"));
            }
        }
        Ok(u) => {
            return Err(ConfigError::new(
                "amqp.url",
                format!("scheme must be amqp or amqps, not `{}`", u.scheme()),
            ))
        }
        // Never echo the URL: it may hold a password.
        Err(e) => return Err(ConfigError::new("amqp.url", format!("malformed URL ({e})"))),
    }
    if !cfg.http.bind.is_empty() && cfg.http.bind.parse::<std::net::SocketAddr>().is_err() {
        return Err(ConfigError::new(
            "http.bind",
            format!("`{}` is not an address like 127.0.0.1:9464", cfg.http.bind),
        ));
    }
    if cfg.publisher.max_unconfirmed == 0 {
        return Err(ConfigError::new(
            "publisher.max_unconfirmed",
            "must be at least 1",
        ));
    }
    validate_backpressure(cfg)?;
    if cfg.limits.max_message_bytes == 0 {
        return Err(ConfigError::new(
            "limits.max_message_bytes",
            "must be at least 1",
        ));
    }

    let mut exchanges = HashSet::new();
    for (i, e) in cfg.exchanges.iter().enumerate() {
        if e.name.is_empty() || e.name.starts_with("amq.") {
            return Err(ConfigError::new(
                format!("exchanges[{i}].name"),
                "must be non-empty and not start with `amq.`",
            ));
        }
        if !exchanges.insert(e.name.as_str()) {
            return Err(ConfigError::new(
                format!("exchanges[{i}].name"),
                format!("duplicate exchange `{}`", e.name),
            ));
        }
    }
    let mut queues = HashSet::new();
    for (i, q) in cfg.queues.iter().enumerate() {
        if q.name.is_empty() || q.name.starts_with("amq.") || q.name.len() > 240 {
            return Err(ConfigError::new(
                format!("queues[{i}].name"),
                "must be 1..=240 bytes and not start with `amq.`",
            ));
        }
        if !queues.insert(q.name.as_str()) {
            return Err(ConfigError::new(
                format!("queues[{i}].name"),
                format!("duplicate queue `{}`", q.name),
            ));
        }
        for (j, b) in q.bindings.iter().enumerate() {
            if !exchanges.contains(b.exchange.as_str()) && !b.exchange.starts_with("amq.") {
                return Err(ConfigError::new(
                    format!("queues[{i}].bindings[{j}].exchange"),
                    format!(
                        "exchange `{}` is not declared under [[exchanges]]",
                        b.exchange
                    ),
                ));
            }
        }
        if q.delivery_limit == Some(0) {
            return Err(ConfigError::new(
                format!("queues[{i}].delivery_limit"),
                "must be at least 1",
            ));
        }
    }
    let mut stages = HashSet::new();
    for (i, s) in cfg.stages.iter().enumerate() {
        let key = |k: &str| format!("stages[{i}].{k}");
        if s.name.is_empty() {
            return Err(ConfigError::new(key("name"), "must be non-empty"));
        }
        if !stages.insert(s.name.as_str()) {
            return Err(ConfigError::new(
                key("name"),
                format!("duplicate stage `{}`", s.name),
            ));
        }
        if !queues.contains(s.queue.as_str()) {
            return Err(ConfigError::new(
                key("queue"),
                format!("queue `{}` is not declared under [[queues]]", s.queue),
            ));
        }
        if !handlers.iter().any(|h| h == &s.handler) {
            return Err(ConfigError::new(
                key("handler"),
                format!(
                    "unknown handler `{}` (known: {})",
                    s.handler,
                    handlers.join(", ")
                ),
            ));
        }
        if s.prefetch == 0 || s.prefetch > u32::from(u16::MAX) {
            return Err(ConfigError::new(
                key("prefetch"),
                "must be between 1 and 65535",
            ));
        }
        match s.concurrency {
            Concurrency::Fixed(0) => {
                return Err(ConfigError::new(key("concurrency"), "must be at least 1"))
            }
            Concurrency::Range { min, max } if min == 0 || max < min => {
                return Err(ConfigError::new(
                    key("concurrency"),
                    "needs 1 <= min <= max",
                ))
            }
            _ => {}
        }
        if s.handler == "forward" && s.output.is_none() {
            return Err(ConfigError::new(
                key("output"),
                "the `forward` handler needs an output",
            ));
        }
        if let Some(o) = &s.output {
            if !o.exchange.is_empty()
                && !exchanges.contains(o.exchange.as_str())
                && !o.exchange.starts_with("amq.")
            {
                return Err(ConfigError::new(
                    key("output.exchange"),
                    format!(
                        "exchange `{}` is not declared under [[exchanges]]",
                        o.exchange
                    ),
                ));
            }
        }
        if s.rate == Some(0) {
            return Err(ConfigError::new(
                key("rate"),
                "must be at least 1 (omit it for unlimited)",
            ));
        }
    }
    Ok(())
}

/// `[publisher]` rate keys, `[publisher.breaker]`, `[spool]`, `[depth]` and
/// queue watermarks.
fn validate_backpressure(cfg: &Config) -> Result<(), ConfigError> {
    let p = &cfg.publisher;
    if p.rate > 0 && p.burst == 0 {
        return Err(ConfigError::new(
            "publisher.burst",
            "must be at least 1 when a rate is set",
        ));
    }
    if p.breaker.failures == 0 {
        return Err(ConfigError::new(
            "publisher.breaker.failures",
            "must be at least 1",
        ));
    }
    if p.breaker.reset.is_zero() {
        return Err(ConfigError::new(
            "publisher.breaker.reset",
            "must be longer than 0s",
        ));
    }
    if cfg.spool.max_bytes == 0 {
        return Err(ConfigError::new("spool.max_bytes", "must be at least 1"));
    }
    if cfg
        .spool
        .path
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(ConfigError::new(
            "spool.path",
            "must not be empty (omit it for no spool)",
        ));
    }
    if cfg.depth.interval < std::time::Duration::from_millis(10) {
        return Err(ConfigError::new("depth.interval", "must be at least 10ms"));
    }
    for (i, q) in cfg.queues.iter().enumerate() {
        if let Some(w) = q.watermark {
            if w.high == 0 || w.low >= w.high {
                return Err(ConfigError::new(
                    format!("queues[{i}].watermark"),
                    "needs 0 <= low < high",
                ));
            }
        }
    }
    Ok(())
}
