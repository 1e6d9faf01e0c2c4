//! Start-up validation: every mistake names its key.

use super::{Config, ConfigError, DedupMode, IngressAuth, StageContext, VerifyMode};
use lapin::types::MAX_SHORT_STRING_LENGTH as MAX_SHORT_STRING;
use std::collections::HashSet;
use std::time::Duration;

/// Checks a configuration. `handlers` are the handler names available
/// (built-ins plus those a host registered); `None` skips that check (a
/// loaded file may name handlers the host registers later).
pub fn validate(cfg: &Config, handlers: Option<&[String]>) -> Result<(), ConfigError> {
    for url in cfg.amqp.resolved_urls()? {
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
    }
    if cfg.amqp.tls.is_set() {
        if !cfg
            .amqp
            .resolved_urls()?
            .iter()
            .all(|u| u.starts_with("amqps://"))
        {
            return Err(ConfigError::new(
                "amqp.tls",
                "is set, but a broker URL is not amqps:// (TLS settings apply to amqps:// only)",
            ));
        }
        cfg.amqp.tls.settings()?;
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
    validate_telemetry(&cfg.telemetry)?;
    if cfg.limits.max_message_bytes == 0 {
        return Err(ConfigError::new(
            "limits.max_message_bytes",
            "must be at least 1",
        ));
    }

    validate_short_strings(cfg)?;
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
        q.validate_partitions(i)?;
    }
    validate_partition_names(cfg, &mut exchanges)?;
    cfg.partitioning.validate()?;
    let mut stages = HashSet::new();
    let ctx = StageContext {
        exchanges: &exchanges,
        queues: &queues,
        handlers,
        redis_url_set: !cfg.redis.url.is_empty(),
    };
    for (i, s) in cfg.stages.iter().enumerate() {
        if !s.name.is_empty() && !stages.insert(s.name.as_str()) {
            return Err(ConfigError::new(
                format!("stages[{i}].name"),
                format!("duplicate stage `{}`", s.name),
            ));
        }
        s.validate(i, &ctx)?;
    }
    validate_dedup(cfg)?;
    cfg.postgres.validate()?;
    validate_security(cfg)?;
    validate_ingress(cfg, &exchanges)?;
    validate_management(cfg)?;
    Ok(())
}

/// A partitioned queue's exchange (`<queue>`) and partition queues
/// (`<queue>.<p>`) must not clash with a declared exchange or queue; the
/// exchange joins `exchanges`, so outputs, ingress routes and bindings may
/// name it.
fn validate_partition_names<'a>(
    cfg: &'a Config,
    exchanges: &mut HashSet<&'a str>,
) -> Result<(), ConfigError> {
    let mut names: HashSet<String> = cfg.queues.iter().map(|q| q.name.clone()).collect();
    for (i, q) in cfg.queues.iter().enumerate() {
        if q.partitions.is_none() {
            continue;
        }
        if !exchanges.insert(q.name.as_str()) {
            return Err(ConfigError::new(
                format!("queues[{i}].partitions"),
                format!(
                    "the partitions' exchange `{}` is also declared under [[exchanges]]",
                    q.name
                ),
            ));
        }
        for name in q.broker_queues() {
            if !names.insert(name.clone()) {
                return Err(ConfigError::new(
                    format!("queues[{i}].partitions"),
                    format!("partition queue `{name}` is also declared under [[queues]]"),
                ));
            }
        }
    }
    let mut stages: HashSet<String> = cfg.stages.iter().map(|s| s.name.clone()).collect();
    for (i, s) in cfg.stages.iter().enumerate() {
        let Some(n) = cfg.queue(&s.queue).and_then(|q| q.partitions) else {
            continue;
        };
        for p in 0..n {
            let name = format!("{}.{p}", s.name);
            if name.len() > MAX_STAGE_NAME || !stages.insert(name.clone()) {
                return Err(ConfigError::new(
                    format!("stages[{i}].name"),
                    format!(
                        "its consumer of partition {p}, stage `{name}`, clashes with another \
                         stage or is longer than {MAX_STAGE_NAME} bytes"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The longest AMQP short string (exchange names, routing keys).
const SHORT_STRING_MAX: usize = 255;

/// `[management]`: an address of its own and at least one token.
fn validate_management(cfg: &Config) -> Result<(), ConfigError> {
    let m = &cfg.management;
    if m.bind.is_empty() {
        if m.token_file.is_some() || m.token_env.is_some() {
            // Read anyway, so a wrong path is found before it matters.
            m.tokens()?;
        }
        return Ok(());
    }
    if m.bind.parse::<std::net::SocketAddr>().is_err() {
        return Err(ConfigError::new(
            "management.bind",
            format!("`{}` is not an address like 127.0.0.1:9466", m.bind),
        ));
    }
    if !m.bind.ends_with(":0") && (m.bind == cfg.http.bind || m.bind == cfg.ingress.bind) {
        return Err(ConfigError::new(
            "management.bind",
            "must differ from http.bind and ingress.bind: steering the engine has its own listener",
        ));
    }
    if m.tokens()?.is_empty() {
        return Err(ConfigError::new(
            "management.bind",
            "the management API needs management.token_file or management.token_env with at \
             least one token",
        ));
    }
    Ok(())
}

/// `[ingress]`: an address, who may publish (the tokens are read), and
/// routes to declared exchanges.
fn validate_ingress(cfg: &Config, exchanges: &HashSet<&str>) -> Result<(), ConfigError> {
    let ing = &cfg.ingress;
    if ing.bind.is_empty() {
        return Ok(());
    }
    if ing.bind.parse::<std::net::SocketAddr>().is_err() {
        return Err(ConfigError::new(
            "ingress.bind",
            format!("`{}` is not an address like 127.0.0.1:9465", ing.bind),
        ));
    }
    if ing.bind == cfg.http.bind && !ing.bind.ends_with(":0") {
        return Err(ConfigError::new(
            "ingress.bind",
            "must differ from http.bind: publishing and metrics have separate listeners",
        ));
    }
    let tokens = ing.tokens()?;
    match ing.auth {
        IngressAuth::Token if tokens.is_empty() => {
            return Err(ConfigError::new(
                "ingress.auth",
                "`token` needs ingress.token_file or ingress.token_env with at least one token \
                 (or auth = \"none\" to open the ingress to anyone who can reach it)",
            ))
        }
        IngressAuth::None if !tokens.is_empty() => {
            return Err(ConfigError::new(
                "ingress.auth",
                "tokens are configured but auth = \"none\" would ignore them",
            ))
        }
        _ => {}
    }
    if ing.routes.is_empty() {
        return Err(ConfigError::new(
            "ingress.routes",
            "list the routes the ingress may publish to ({ exchange, routing_key })",
        ));
    }
    for (i, r) in ing.routes.iter().enumerate() {
        if !exchanges.contains(r.exchange.as_str()) {
            return Err(ConfigError::new(
                format!("ingress.routes[{i}].exchange"),
                format!(
                    "exchange `{}` is not declared under [[exchanges]]",
                    r.exchange
                ),
            ));
        }
        if r.routing_key.len() > SHORT_STRING_MAX {
            return Err(ConfigError::new(
                format!("ingress.routes[{i}].routing_key"),
                format!("longer than {SHORT_STRING_MAX} bytes"),
            ));
        }
    }
    for (key, v) in [
        ("ingress.max_connections", ing.max_connections),
        ("ingress.max_concurrent", ing.max_concurrent),
    ] {
        if v == 0 {
            return Err(ConfigError::new(key, "must be at least 1"));
        }
    }
    for (key, d) in [
        ("ingress.publish_timeout", ing.publish_timeout),
        ("ingress.header_timeout", ing.header_timeout),
        ("ingress.body_timeout", ing.body_timeout),
    ] {
        if d.is_zero() {
            return Err(ConfigError::new(key, "must be more than 0"));
        }
    }
    Ok(())
}

/// Longest stage name: the stage's consumer tag (`flowgate-<name>-<32 hex>`)
/// is an AMQP short string too.
const MAX_STAGE_NAME: usize = MAX_SHORT_STRING - "flowgate--".len() - 32;

/// Exchange names, queue names and routing keys go on the wire as AMQP short
/// strings (at most 255 bytes): a longer one would fail at the broker, or
/// panic in lapin, long after start-up. Checked here, naming the key.
fn validate_short_strings(cfg: &Config) -> Result<(), ConfigError> {
    fn check(key: String, value: &str, max: usize) -> Result<(), ConfigError> {
        if value.len() > max {
            return Err(ConfigError::new(
                key,
                format!(
                    "is {} bytes; at most {max} (AMQP names and routing keys are short strings)",
                    value.len()
                ),
            ));
        }
        Ok(())
    }
    let max = MAX_SHORT_STRING;
    for (i, e) in cfg.exchanges.iter().enumerate() {
        check(format!("exchanges[{i}].name"), &e.name, max)?;
    }
    for (i, q) in cfg.queues.iter().enumerate() {
        check(format!("queues[{i}].name"), &q.name, max)?;
        for (j, b) in q.bindings.iter().enumerate() {
            let key = |k: &str| format!("queues[{i}].bindings[{j}].{k}");
            check(key("exchange"), &b.exchange, max)?;
            check(key("routing_key"), &b.routing_key, max)?;
        }
    }
    for (i, s) in cfg.stages.iter().enumerate() {
        check(format!("stages[{i}].name"), &s.name, MAX_STAGE_NAME)?;
        check(format!("stages[{i}].queue"), &s.queue, max)?;
        if let Some(o) = &s.output {
            check(format!("stages[{i}].output.exchange"), &o.exchange, max)?;
            check(
                format!("stages[{i}].output.routing_key"),
                &o.routing_key,
                max,
            )?;
        }
    }
    Ok(())
}

/// `[security]` (the key files and variable are read) and each stage's `verify`.
fn validate_security(cfg: &Config) -> Result<(), ConfigError> {
    let key_set = cfg.security.keys()?.is_some();
    for (i, s) in cfg.stages.iter().enumerate() {
        if !key_set && s.verify_mode(false) != VerifyMode::Off {
            return Err(ConfigError::new(
                format!("stages[{i}].verify"),
                "verifying signatures needs a key: set security.hmac_key_file or security.hmac_key_env",
            ));
        }
    }
    Ok(())
}

/// `[dedup]` and `[redis]`.
fn validate_dedup(cfg: &Config) -> Result<(), ConfigError> {
    if cfg.dedup.lease < Duration::from_millis(10) {
        return Err(ConfigError::new("dedup.lease", "must be at least 10ms"));
    }
    if cfg.dedup.ttl < cfg.dedup.lease {
        return Err(ConfigError::new(
            "dedup.ttl",
            "must be at least dedup.lease",
        ));
    }
    if cfg.dedup.capacity == 0 {
        return Err(ConfigError::new("dedup.capacity", "must be at least 1"));
    }
    if cfg.stages.iter().any(|s| s.dedup == DedupMode::Redis) {
        match url::Url::parse(&cfg.redis.url) {
            Ok(u) if u.scheme() == "redis" || u.scheme() == "rediss" => {
                cfg.redis.tls()?;
            }
            // Never echo the URL: it may hold a password.
            _ => {
                return Err(ConfigError::new(
                    "redis.url",
                    "must be a redis:// or rediss:// URL",
                ))
            }
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

/// The smallest valid config, for the key tests below.
#[cfg(test)]
const TEST_BASE: &str = r#"
[[exchanges]]
name = "shop"
[[queues]]
name = "jobs"
[[stages]]
name = "reserve"
queue = "jobs"
handler = "sink"
"#;

#[cfg(test)]
mod failure_keys_tests {
    use crate::config::{Config, DedupMode, Payload};
    use std::time::Duration;

    use super::TEST_BASE as BASE;

    fn with(stage_extra: &str, sections: &str) -> Result<Config, crate::config::ConfigError> {
        Config::from_toml(&format!("{sections}\n{BASE}{stage_extra}\n"))
    }

    #[test]
    fn partitions_name_their_key_when_wrong() {
        let cfg = |queue: &str, rest: &str| {
            Config::from_toml(&format!(
                "[http]\nbind = \"\"\n[[queues]]\nname = \"orders\"\n{queue}\n\
                 [[stages]]\nname = \"s\"\nqueue = \"orders\"\nhandler = \"sink\"\n{rest}\n"
            ))
        };
        let ok = cfg("partitions = 4\npartition_key = \"header:entity\"", "").unwrap();
        assert_eq!(
            ok.queues[0].broker_queues(),
            ["orders.0", "orders.1", "orders.2", "orders.3"]
        );
        assert_eq!(
            ok.consumers(&ok.stages[0]).len(),
            4,
            "all without [partitioning]"
        );
        for (queue, rest, key) in [
            ("partitions = 0", "", "queues[0].partitions"),
            ("partitions = 257", "", "queues[0].partitions"),
            (
                "partition_key = \"message_id\"",
                "",
                "queues[0].partition_key",
            ),
            (
                "partitions = 2\npartition_key = \"tenant\"",
                "",
                "queues[0].partition_key",
            ),
            (
                "partitions = 2\npartition_key = \"header:\"",
                "",
                "queues[0].partition_key",
            ),
            (
                "partitions = 2\n[[queues]]\nname = \"orders.1\"",
                "",
                "queues[0].partitions",
            ),
            (
                "partitions = 2\n[[exchanges]]\nname = \"orders\"",
                "",
                "queues[0].partitions",
            ),
            (
                "partitions = 2",
                "[[stages]]\nname = \"s.1\"\nqueue = \"orders\"\nhandler = \"sink\"",
                "stages[0].name",
            ),
            (
                "partitions = 2",
                "[partitioning]\ninstance_index = 2\ninstance_count = 2",
                "partitioning.instance_index",
            ),
        ] {
            let e = cfg(queue, rest).unwrap_err();
            assert_eq!(e.key, key, "{queue} {rest}: {e}");
        }
    }

    #[test]
    fn retry_dedup_and_payload_parse_with_documented_defaults() {
        let cfg = with(
            "retry = { max_attempts = 4, backoff = [\"200ms\", \"1s\"] }\ndedup = \"redis\"\npayload = \"json\"",
            "",
        )
        .unwrap();
        let s = &cfg.stages[0];
        let p = s.retry.as_ref().unwrap().policy();
        assert_eq!(p.max_attempts, 4);
        assert_eq!(
            p.backoff,
            vec![Duration::from_millis(200), Duration::from_secs(1)]
        );
        assert_eq!(s.dedup, DedupMode::Redis);
        assert_eq!(s.payload, Payload::Json);
        assert_eq!(cfg.dedup.lease, Duration::from_secs(30));
        assert_eq!(cfg.dedup.ttl, Duration::from_secs(24 * 3600));
        assert_eq!(cfg.redis.url, "redis://127.0.0.1:6379");
        let d = with("retry = {}", "").unwrap();
        let p = d.stages[0].retry.as_ref().unwrap().policy();
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.backoff.len(), 3);
        assert_eq!(with("", "").unwrap().stages[0].dedup, DedupMode::Off);
    }

    #[test]
    fn management_needs_its_own_address_and_a_token() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, "# ops\nabcdefghijklmnop-ops-1\n").unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "tooshort\n").unwrap();
        let t = tokens.display();
        let off = with("", "").unwrap();
        assert!(off.management.bind.is_empty(), "off by default");
        let on = with(
            "",
            &format!("[management]\nbind = \"127.0.0.1:9466\"\ntoken_file = \"{t}\""),
        )
        .unwrap();
        assert_eq!(on.management.tokens().unwrap().len(), 1);
        for (section, key) in [
            ("[management]\nbind = \"127.0.0.1:9466\"".to_owned(), "management.bind"),
            (format!("[management]\nbind = \"nowhere\"\ntoken_file = \"{t}\""), "management.bind"),
            (
                format!("[http]\nbind = \"127.0.0.1:9466\"\n[management]\nbind = \"127.0.0.1:9466\"\ntoken_file = \"{t}\""),
                "management.bind",
            ),
            (
                format!("[management]\nbind = \"127.0.0.1:9466\"\ntoken_file = \"{}\"", short.display()),
                "management.token_file",
            ),
            (
                "[management]\ntoken_file = \"/nonexistent/flowgate-tokens\"".to_owned(),
                "management.token_file",
            ),
            (
                "[management]\nbind = \"127.0.0.1:9466\"\ntoken_env = \"FLOWGATE_TEST_UNSET_TOKEN_VAR\"".to_owned(),
                "management.token_env",
            ),
        ] {
            let e = with("", &section).unwrap_err();
            assert_eq!(e.key, key, "{section}: {e}");
            assert!(!e.to_string().contains("abcdefghijklmnop"), "never prints a token");
        }
    }

    #[test]
    fn batch_parses_with_documented_defaults_and_fits_in_the_credits() {
        let s = &with("prefetch = 200\nbatch = {}", "").unwrap().stages[0];
        let b = s.batch.unwrap();
        assert_eq!((b.size, b.timeout), (100, Duration::from_millis(50)));
        assert_eq!(b.policy(), flowgate_actors::BatchPolicy::default());
        assert!(with("", "").unwrap().stages[0].batch.is_none());
        let b = with(
            "prefetch = 10\nbatch = { size = 10, timeout = \"20ms\" }",
            "",
        )
        .unwrap()
        .stages[0]
            .batch
            .unwrap();
        assert_eq!((b.size, b.timeout), (10, Duration::from_millis(20)));
        for (extra, bad) in [
            (
                "prefetch = 10\nbatch = { size = 11 }",
                "stages[0].batch.size",
            ),
            ("batch = { size = 0 }", "stages[0].batch.size"),
            ("batch = {}", "stages[0].batch.size"), // default prefetch 50 < 100
            (
                "batch = { size = 5, timeout = \"0s\" }",
                "stages[0].batch.timeout",
            ),
            (
                "batch = { size = 5, timeout = \"2m\" }",
                "stages[0].batch.timeout",
            ),
        ] {
            assert_eq!(with(extra, "").unwrap_err().key, bad, "{extra}");
        }
    }

    #[test]
    fn bad_failure_keys_name_their_key() {
        let e = with("retry = { max_attempts = 0 }", "").unwrap_err();
        assert_eq!(e.key, "stages[0].retry.max_attempts");
        let e = with("retry = { backoff = [] }", "").unwrap_err();
        assert_eq!(e.key, "stages[0].retry.backoff");
        let e = with("dedup = \"redis\"", "[redis]\nurl = \"http://x\"").unwrap_err();
        assert_eq!(e.key, "redis.url");
        let e = with("", "[dedup]\nlease = \"1h\"\nttl = \"1m\"").unwrap_err();
        assert_eq!(e.key, "dedup.ttl");
        let e = with("", "[dedup]\ncapacity = 0").unwrap_err();
        assert_eq!(e.key, "dedup.capacity");
        assert!(with("dedup = \"sometimes\"", "").is_err());
    }
}

#[cfg(test)]
mod security_tests {
    use crate::config::{Config, VerifyMode};

    use super::TEST_BASE as BASE;

    fn with(security: &str, stage_extra: &str) -> Result<Config, crate::config::ConfigError> {
        Config::from_toml(&format!("[security]\n{security}\n{BASE}{stage_extra}\n"))
    }

    fn key_file(contents: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), contents).unwrap();
        f
    }

    #[test]
    fn defaults_off_without_a_key_reject_with_one() {
        let cfg = with("", "").unwrap();
        assert!(cfg.security.sign_outputs);
        assert!(cfg.security.keys().unwrap().is_none());
        assert_eq!(cfg.stages[0].verify_mode(false), VerifyMode::Off);

        let f = key_file("  0123456789abcdef0123456789abcdef\n");
        let cfg = with(&format!("hmac_key_file = {:?}", f.path()), "").unwrap();
        let keys = cfg.security.keys().unwrap().unwrap();
        assert!(keys.previous.is_none());
        assert_eq!(cfg.stages[0].verify_mode(true), VerifyMode::Reject);
        // The file's whitespace is trimmed: it signs like the bare key.
        let bare = flowgate_actors::SigningKey::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let p = lapin::BasicProperties::default();
        assert_eq!(keys.current.sign("k", &p, b"x"), bare.sign("k", &p, b"x"));
        let cfg = with(
            &format!("hmac_key_file = {:?}", f.path()),
            "verify = \"warn\"",
        )
        .unwrap();
        assert_eq!(cfg.stages[0].verify_mode(true), VerifyMode::Warn);
    }

    #[test]
    fn key_from_env_and_previous_key() {
        let var = format!("FLOWGATE_TEST_KEY_{}", uuid::Uuid::new_v4().simple());
        std::env::set_var(&var, "an-env-key-of-enough-bytes");
        let prev = key_file("the-previous-key-0123");
        let cfg = with(
            &format!(
                "hmac_key_env = {var:?}\nhmac_previous_key_file = {:?}",
                prev.path()
            ),
            "",
        )
        .unwrap();
        let keys = cfg.security.keys().unwrap().unwrap();
        assert!(keys.previous.is_some());
        std::env::remove_var(&var);
    }

    #[test]
    fn bad_security_keys_name_their_key_and_hide_the_secret() {
        let e = with("", "verify = \"reject\"").unwrap_err();
        assert_eq!(e.key, "stages[0].verify");
        assert!(with("", "verify = \"off\"").is_ok());
        let e = with("hmac_key_file = \"/nonexistent/flowgate.key\"", "").unwrap_err();
        assert_eq!(e.key, "security.hmac_key_file");
        let short = key_file("short-secret");
        let e = with(&format!("hmac_key_file = {:?}", short.path()), "").unwrap_err();
        assert_eq!(e.key, "security.hmac_key_file");
        assert!(!e.to_string().contains("short-secret"), "{e}");
        let e = with("hmac_key_env = \"FLOWGATE_TEST_UNSET_VARIABLE\"", "").unwrap_err();
        assert_eq!(e.key, "security.hmac_key_env");
        let f = key_file("0123456789abcdef0123456789abcdef");
        let e = with(
            &format!("hmac_key_file = {:?}\nhmac_key_env = \"X\"", f.path()),
            "",
        )
        .unwrap_err();
        assert_eq!(e.key, "security.hmac_key_env");
        let e = with(&format!("hmac_previous_key_file = {:?}", f.path()), "").unwrap_err();
        assert_eq!(e.key, "security.hmac_previous_key_file");
        let e = with("hmac_key = \"inline\"", "").unwrap_err();
        assert!(e.to_string().contains("hmac_key"), "{e}");
        assert!(with("", "verify = \"sometimes\"").is_err());
        // Debug of a loaded config shows where the key is, never the key.
        let cfg = with(&format!("hmac_key_file = {:?}", f.path()), "").unwrap();
        assert!(!format!("{cfg:?}").contains("0123456789abcdef"));
        assert!(!format!("{:?}", cfg.security.keys().unwrap()).contains("0123456789abcdef"));
    }
}

#[cfg(test)]
mod http_keys_tests {
    use crate::config::Config;
    use std::time::Duration;

    use super::TEST_BASE as BASE;

    fn with(stage_extra: &str) -> Result<Config, crate::config::ConfigError> {
        Config::from_toml(&format!("{BASE}{stage_extra}\n"))
    }

    #[test]
    fn the_http_table_parses_with_documented_defaults() {
        let cfg = with("http = { url = \"http://127.0.0.1:8000/handle\" }").unwrap();
        let h = cfg.stages[0].http.as_ref().unwrap();
        assert_eq!(h.timeout, Duration::from_secs(10));
        assert_eq!(h.max_concurrency, 8);
        assert!(h.headers.is_empty());
        assert_eq!(h.retry_after_max, Duration::from_secs(30));
        assert_eq!(h.slow_down_limit, Duration::from_secs(300));
        assert_eq!(h.max_response_bytes, 1 << 20);
        assert_eq!(
            h,
            &crate::config::HttpStageConfig::new("http://127.0.0.1:8000/handle")
        );
    }

    #[test]
    fn bad_http_keys_name_their_key_and_hide_secrets() {
        let e = Config::from_toml(&BASE.replace("\"sink\"", "\"http\"")).unwrap_err();
        assert_eq!(e.key, "stages[0].http", "{e}");
        let e = with("http = { url = \"ftp://x/\" }").unwrap_err();
        assert_eq!(e.key, "stages[0].http.url");
        let e = with("http = { url = \"http://user:s3cret@\" }").unwrap_err();
        assert_eq!(e.key, "stages[0].http.url");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let u = "url = \"http://127.0.0.1:1/\"";
        for (extra, key) in [
            ("timeout = \"0s\"", "stages[0].http.timeout"),
            ("max_concurrency = 0", "stages[0].http.max_concurrency"),
            ("retry_after_max = \"0s\"", "stages[0].http.retry_after_max"),
            ("slow_down_limit = \"1s\"", "stages[0].http.slow_down_limit"),
            (
                "max_response_bytes = 0",
                "stages[0].http.max_response_bytes",
            ),
            (
                "headers = { \"x-amqp-stage\" = \"v\" }",
                "stages[0].http.headers.x-amqp-stage",
            ),
            (
                "headers = { \"Content-Type\" = \"v\" }",
                "stages[0].http.headers.Content-Type",
            ),
            (
                "headers = { \"bad name\" = \"v\" }",
                "stages[0].http.headers.bad name",
            ),
            (
                "headers = { auth = \"tok\\nen-s3cret\" }",
                "stages[0].http.headers.auth",
            ),
        ] {
            let e = with(&format!("http = {{ {u}, {extra} }}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
        assert!(with(&format!("http = {{ {u}, unknown = 1 }}")).is_err());
        assert!(with(&format!(
            "http = {{ {u}, headers = {{ authorization = \"Bearer t\" }} }}"
        ))
        .is_ok());
    }
}

/// `[telemetry]`: a ratio in range, an HTTP endpoint and a service name
/// (checked even while off, so turning it on cannot fail at start).
fn validate_telemetry(t: &super::TelemetryConfig) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&t.sampling_ratio) {
        return Err(ConfigError::new(
            "telemetry.sampling_ratio",
            format!("must be between 0 and 1, not {}", t.sampling_ratio),
        ));
    }
    match url::Url::parse(&t.endpoint) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host_str().is_some() => {}
        Ok(u) => {
            return Err(ConfigError::new(
                "telemetry.endpoint",
                format!("must be an http:// or https:// URL, not `{}:`", u.scheme()),
            ))
        }
        // Never echo the URL: it may hold a password.
        Err(e) => {
            return Err(ConfigError::new(
                "telemetry.endpoint",
                format!("malformed URL ({e})"),
            ))
        }
    }
    if t.service_name.trim().is_empty() {
        return Err(ConfigError::new(
            "telemetry.service_name",
            "must not be empty",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod telemetry_tests {
    use crate::Config;

    #[test]
    fn telemetry_keys_are_checked() {
        let ok = Config::from_toml("[telemetry]\nenabled = true\nsampling_ratio = 0.5\n").unwrap();
        assert!(ok.telemetry.enabled);
        assert_eq!(ok.telemetry.service_name, "flowgate");
        for (text, key) in [
            (
                "[telemetry]\nsampling_ratio = 1.5\n",
                "telemetry.sampling_ratio",
            ),
            (
                "[telemetry]\nsampling_ratio = nan\n",
                "telemetry.sampling_ratio",
            ),
            (
                "[telemetry]\nendpoint = \"grpc://x:4317\"\n",
                "telemetry.endpoint",
            ),
            (
                "[telemetry]\nendpoint = \"not a url\"\n",
                "telemetry.endpoint",
            ),
            (
                "[telemetry]\nservice_name = \" \"\n",
                "telemetry.service_name",
            ),
        ] {
            let e = Config::from_toml(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
        assert!(Config::from_toml("[log]\nformat = \"xml\"\n").is_err());
        let json = Config::from_toml("[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(json.log.format, crate::config::LogFormat::Json);
    }
}
