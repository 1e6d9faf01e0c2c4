//! The envelope: every header the engine writes on a message or reads back,
//! the closed set of dead-letter reasons, `x-death` reading, header
//! stripping, and the one fallible conversion to an AMQP short string.
//!
//! # Who may set what
//!
//! The *routing* headers ([`ROUTING_HEADERS`]: [`ATTEMPT`],
//! [`ORIGINAL_EXCHANGE`], [`ORIGINAL_ROUTING_KEY`], [`LAST_ERROR`]) steer
//! where the engine publishes. They are honoured only on a copy that came
//! back from the consuming stage's own retry tier ([`own_tier`]: delivered
//! through the default exchange with the stage's queue as routing key, and
//! the newest `x-death` entry names one of the stage's tier queues);
//! on every other delivery [`intake`] strips them, so a producer cannot
//! forge an attempt count or a destination. [`UNSIGNED`] is stripped from
//! every delivery. The dead-letter headers ([`DEAD_LETTER_HEADERS`]) are
//! left alone: a stage consuming a dead-letter queue reads them.
//!
//! # Short strings
//!
//! lapin's `ShortString::from` panics past 255 bytes. Everything that comes
//! from outside (a delivery, a handler's output) and becomes a short string
//! goes through [`short_string`], which fails instead.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use std::fmt;

/// The prefix of every header the engine owns.
pub const PREFIX: &str = "x-flowgate-";

/// The number of the handling attempt the delivery carrying it is (absent = 1).
pub const ATTEMPT: &str = "x-flowgate-attempt";
/// Where a retried or dead-lettered message was first published (exchange).
pub const ORIGINAL_EXCHANGE: &str = "x-flowgate-original-exchange";
/// Where a retried or dead-lettered message was first published (routing key).
pub const ORIGINAL_ROUTING_KEY: &str = "x-flowgate-original-routing-key";
/// The error of the previous attempt, on a retry copy.
pub const LAST_ERROR: &str = "x-flowgate-last-error";
/// Why a message was dead-lettered: a [`Reason`]'s wire value, or the
/// handler's own text for [`Reason::Handler`].
pub const REASON: &str = "x-flowgate-reason";
/// The stage that dead-lettered a message.
pub const STAGE: &str = "x-flowgate-stage";
/// How many handling attempts a dead letter had.
pub const ATTEMPTS: &str = "x-flowgate-attempts";
/// The error text of a dead letter (truncated to [`MAX_ERROR_BYTES`]).
pub const ERROR: &str = "x-flowgate-error";
/// The queue a dead letter was consumed from.
pub const QUEUE: &str = "x-flowgate-queue";
/// On a dead letter of a stage that keeps order by a key (`order_by`): the
/// key whose lane the message held (truncated to [`MAX_ERROR_BYTES`]). The
/// key's later messages went on without it.
pub const ORDER_KEY: &str = "x-flowgate-order-key";
/// The hex HMAC-SHA256 signature (see [`Keys`](crate::Keys)).
pub const SIGNATURE: &str = "x-flowgate-signature";
/// Engine-internal marker: publish without (re)signing; removed before the
/// publish and stripped from every delivery.
pub const UNSIGNED: &str = "x-flowgate-unsigned";

/// When the message was first published, in milliseconds since the unix
/// epoch: stamped by the HTTP ingress and the host's `publish` when absent,
/// carried to a stage's outputs (a forward of a message without it adds
/// nothing: foreign messages pass unchanged), read for
/// `flowgate_end_to_end_seconds`. A producer may set it itself (an integer)
/// to measure from its own publish.
pub const FIRST_PUBLISHED: &str = "x-flowgate-first-published";

/// When the engine dead-lettered the message, in milliseconds since the
/// unix epoch (its last death): set on every dead letter, stripped on replay.
pub const DEAD_LETTERED_AT: &str = "x-flowgate-dead-lettered-at";
/// When the engine first dead-lettered the message, in milliseconds since
/// the unix epoch: set with the first death and kept through replays, so a
/// dead letter that keeps coming back shows how long it has been failing.
pub const FIRST_DEAD_LETTERED_AT: &str = "x-flowgate-first-dead-lettered-at";

/// The broker's dead-letter history.
pub const X_DEATH: &str = "x-death";
/// The prefix of the broker's own last-death headers (RabbitMQ 3.13+:
/// `x-last-death-reason`, `-queue`, `-exchange`), dropped on a replay.
pub const LAST_DEATH_PREFIX: &str = "x-last-death-";
/// The W3C trace parent header (see [`crate::trace`]).
pub const TRACEPARENT: &str = "traceparent";
/// The W3C trace state header (vendor-specific trace data).
pub const TRACESTATE: &str = "tracestate";
/// The HTTP header of a batch request to an `http` handler stage: how many
/// entries it holds.
pub const BATCH_SIZE: &str = "x-flowgate-batch-size";
/// The broker's first-death summary headers.
pub const X_FIRST_DEATH: [&str; 3] = [
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
];

/// Headers that steer the engine's routing: honoured only on a copy back
/// from the stage's own retry tier, stripped from any other delivery and
/// from every handler output (the next stage starts at attempt 1).
pub const ROUTING_HEADERS: [&str; 4] =
    [ATTEMPT, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY, LAST_ERROR];

/// The headers every dead letter carries.
pub const DEAD_LETTER_HEADERS: [&str; 7] = [
    REASON,
    STAGE,
    ATTEMPTS,
    ERROR,
    QUEUE,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
];

/// Headers a message replayed from a dead-letter queue must not carry: the
/// dead-letter explanation, the routing headers (the ladder starts again)
/// and the broker's dead-letter history.
pub const REPLAY_STRIPPED: [&str; 15] = [
    REASON,
    ORDER_KEY,
    DEAD_LETTERED_AT,
    STAGE,
    ATTEMPTS,
    ERROR,
    QUEUE,
    ATTEMPT,
    LAST_ERROR,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    X_DEATH,
    X_FIRST_DEATH[0],
    X_FIRST_DEATH[1],
    X_FIRST_DEATH[2],
];

/// Longest [`ERROR`] / [`LAST_ERROR`] value; longer errors are truncated so
/// a dead letter stays far below the broker's frame and message limits.
pub const MAX_ERROR_BYTES: usize = 1024;

/// The start of the retry reason of a delivery its batch handler returned
/// no result for (`Handler::handle_batch`, an `http` stage's batch answer).
pub const MISSING_BATCH_RESULT: &str = "missing-batch-result";

/// Why the engine dead-lettered a message. A closed set: the wire value
/// ([`Reason::as_str`]) is both the [`REASON`] header and the
/// `flowgate_messages_dead_lettered_total{reason}` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Reason {
    /// The handler returned an error (and there is no retry ladder).
    HandlerError,
    /// The handler (or a task publishing its output) panicked.
    Panic,
    /// The retry ladder's attempts are used up.
    MaxAttempts,
    /// The body is not the stage's declared payload type.
    Malformed,
    /// The `message_id` was not valid UTF-8 on the wire (it was decoded
    /// lossily, so two such ids could collide in dedup).
    MalformedId,
    /// The body exceeds `max_message_bytes`.
    Oversized,
    /// No queue is bound for an output (the broker returned it).
    Unroutable,
    /// No `message_id`, and the dedup policy rejects such messages.
    MissingId,
    /// A missing or wrong HMAC signature (with `verify = "reject"`).
    BadSignature,
    /// The handler returned an output the broker cannot take (an exchange
    /// or routing key over 255 bytes, ...).
    InvalidOutput,
    /// The handler returned `Outcome::DeadLetter`: its own free-text reason
    /// goes to the [`REASON`] header, the metric label is `handler`.
    Handler,
    /// The dedup backend answered the claim with an error retrying will not
    /// fix (a wrong-type key, a refused command): the message cannot be
    /// deduplicated, so it is not handled.
    DedupError,
    /// The stage keeps order by a key (`order_by`) and the delivery has
    /// none, with `missing_key = "reject"`.
    MissingKey,
}

impl Reason {
    /// Every reason, for docs and exhaustive tests.
    pub const ALL: [Reason; 13] = [
        Reason::HandlerError,
        Reason::Panic,
        Reason::MaxAttempts,
        Reason::Malformed,
        Reason::MalformedId,
        Reason::Oversized,
        Reason::Unroutable,
        Reason::MissingId,
        Reason::BadSignature,
        Reason::InvalidOutput,
        Reason::Handler,
        Reason::DedupError,
        Reason::MissingKey,
    ];

    /// The wire value and metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::HandlerError => "handler-error",
            Reason::Panic => "panic",
            Reason::MaxAttempts => "max-attempts",
            Reason::Malformed => "malformed",
            Reason::MalformedId => "malformed-id",
            Reason::Oversized => "oversized",
            Reason::Unroutable => "unroutable",
            Reason::MissingId => "missing-id",
            Reason::BadSignature => "bad-signature",
            Reason::InvalidOutput => "invalid-output",
            Reason::Handler => "handler",
            Reason::DedupError => "dedup-error",
            Reason::MissingKey => "missing-key",
        }
    }

    /// The reason whose wire value is `s`.
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value that cannot be an AMQP short string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {len} bytes; AMQP allows at most 255")]
pub struct InvalidShortString {
    /// What the value was meant to be (`exchange`, `routing key`, ...).
    pub field: &'static str,
    /// Its length in bytes.
    pub len: usize,
}

/// The longest AMQP short string, in bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// The one fallible conversion to a short string: `field` names the value
/// in the error.
pub fn short_string(field: &'static str, value: &str) -> Result<ShortString, InvalidShortString> {
    ShortString::try_new(value).map_err(|_| InvalidShortString {
        field,
        len: value.len(),
    })
}

/// Checks that `value` can become a short string, without building one.
pub fn check_short(field: &'static str, value: &str) -> Result<(), InvalidShortString> {
    if value.len() > MAX_SHORT_STRING {
        Err(InvalidShortString {
            field,
            len: value.len(),
        })
    } else {
        Ok(())
    }
}

/// A long-string header value.
pub fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.to_owned()))
}

/// `s` cut to at most `max` bytes on a char boundary, with `…` appended
/// when cut.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// A header of a property set.
pub fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}

/// `props` without the headers in `names` (unchanged, not copied, when none is present).
pub fn without(props: BasicProperties, names: &[&str]) -> BasicProperties {
    let Some(table) = props.headers() else {
        return props;
    };
    if !names.iter().any(|n| table.inner().contains_key(*n)) {
        return props;
    }
    let kept = without_in(table, names);
    props.with_headers(kept)
}

/// A copy of `table` without the keys in `names`.
pub fn without_in(table: &FieldTable, names: &[&str]) -> FieldTable {
    let mut kept = FieldTable::default();
    for (k, v) in table.inner() {
        if !names.contains(&k.as_str()) {
            kept.insert(k.clone(), v.clone());
        }
    }
    kept
}

/// One entry of the broker's `x-death` history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Death {
    /// The queue the message died in.
    pub queue: Option<String>,
    /// Why (`expired`, `rejected`, `maxlen`, `delivery_limit`).
    pub reason: Option<String>,
    /// The exchange it had been published to.
    pub exchange: Option<String>,
    /// Its first routing key.
    pub routing_key: Option<String>,
}

/// The newest (first) `x-death` entry of a header table.
pub fn newest_death(headers: &FieldTable) -> Option<Death> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get(X_DEATH)? else {
        return None;
    };
    let t = deaths.as_slice().iter().find_map(|v| match v {
        AMQPValue::FieldTable(t) => Some(t),
        _ => None,
    })?;
    let get = |k: &str| t.inner().get(k).and_then(header_string);
    let routing_key = match t.inner().get("routing-keys") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().first().and_then(header_string),
        _ => None,
    };
    Some(Death {
        queue: get("queue"),
        reason: get("reason"),
        exchange: get("exchange"),
        routing_key,
    })
}

/// The newest `x-death` entry of a property set.
pub fn newest_death_of(props: &BasicProperties) -> Option<Death> {
    newest_death(props.headers().as_ref()?)
}

/// True when `tier` names a retry tier of `queue` (`<queue>.retry.<n>`).
pub fn is_tier_of(queue: &str, tier: &str) -> bool {
    tier.strip_prefix(queue)
        .and_then(|r| r.strip_prefix(".retry."))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The tier queue a delivery came back from, when it is a copy from one of
/// `queue`'s own retry tiers: delivered through the default exchange with
/// routing key `queue` (how tiers dead-letter back), and the newest
/// `x-death` entry names a tier of `queue`.
pub fn own_tier(
    queue: &str,
    delivered_exchange: &str,
    delivered_key: &str,
    props: &BasicProperties,
) -> Option<String> {
    if !delivered_exchange.is_empty() || delivered_key != queue {
        return None;
    }
    let tier = newest_death_of(props)?.queue?;
    is_tier_of(queue, &tier).then_some(tier)
}

/// A delivery as the engine trusts it, after [`intake`].
#[derive(Clone, Debug, PartialEq)]
pub struct Intake {
    /// The properties with untrusted engine headers removed.
    pub properties: BasicProperties,
    /// Where the message was first published: its own exchange and routing
    /// key, or for a copy back from an own retry tier, the original ones.
    pub exchange: String,
    /// See `exchange`.
    pub routing_key: String,
    /// The attempt this delivery is (1 unless it is an own retry copy).
    pub attempt: u32,
    /// The own retry tier it came back from, if any.
    pub tier: Option<String>,
}

/// Decides which engine headers of a delivery to trust (see the module docs).
pub fn intake(
    queue: &str,
    delivered_exchange: &str,
    delivered_key: &str,
    props: BasicProperties,
) -> Intake {
    let props = without(props, &[UNSIGNED]);
    let Some(tier) = own_tier(queue, delivered_exchange, delivered_key, &props) else {
        return Intake {
            properties: without(props, &ROUTING_HEADERS),
            exchange: delivered_exchange.to_owned(),
            routing_key: delivered_key.to_owned(),
            attempt: 1,
            tier: None,
        };
    };
    // Our own copy: the engine wrote these from a delivery's real routing,
    // so they are short strings; anything else is ignored all the same.
    let short = |name: &str| {
        header(&props, name)
            .and_then(header_string)
            .filter(|v| check_short("original routing", v).is_ok())
    };
    let exchange = short(ORIGINAL_EXCHANGE).unwrap_or_else(|| delivered_exchange.to_owned());
    let routing_key = short(ORIGINAL_ROUTING_KEY).unwrap_or_else(|| delivered_key.to_owned());
    let attempt = header(&props, ATTEMPT)
        .and_then(header_int)
        .and_then(|i| u32::try_from(i).ok())
        .filter(|i| *i >= 1)
        .unwrap_or(1);
    Intake {
        properties: props,
        exchange,
        routing_key,
        attempt,
        tier: Some(tier),
    }
}

/// True when a property value was decoded lossily from invalid UTF-8 (it
/// holds U+FFFD replacement characters).
pub fn is_lossy(s: &str) -> bool {
    s.contains(char::REPLACEMENT_CHARACTER)
}

/// Reads a string out of an AMQP field value.
pub fn header_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Reads an integer out of an AMQP field value.
pub fn header_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(i) => Some((*i).into()),
        AMQPValue::ShortShortUInt(i) => Some((*i).into()),
        AMQPValue::ShortInt(i) => Some((*i).into()),
        AMQPValue::ShortUInt(i) => Some((*i).into()),
        AMQPValue::LongInt(i) => Some((*i).into()),
        AMQPValue::LongUInt(i) => Some((*i).into()),
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::Timestamp(i) => i64::try_from(*i).ok(),
        _ => None,
    }
}

/// Sets one header on a property set, creating the table if needed.
///
/// # Panics
///
/// When `name` is over 255 bytes: meant for the engine's and a host's own
/// constant names; use [`try_set_header`](crate::message::try_set_header)
/// for names from outside.
pub fn set_header(props: &mut BasicProperties, name: &str, value: AMQPValue) {
    let mut table = props.headers().clone().unwrap_or_default();
    table.insert(ShortString::from(name), value);
    // Taken, not cloned: only the header table is copied.
    *props = std::mem::take(props).with_headers(table);
}

/// Milliseconds since the unix epoch now (0 if the clock is before it).
fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The [`FIRST_PUBLISHED`] stamp, if it is an integer.
pub fn first_published(props: &BasicProperties) -> Option<i64> {
    header(props, FIRST_PUBLISHED).and_then(header_int)
}

/// How long ago the message was first published, by its [`FIRST_PUBLISHED`]
/// stamp; `None` without one, or for a stamp in the future (a clock skew or
/// a forged header: nothing to measure).
pub fn since_first_published(props: &BasicProperties) -> Option<std::time::Duration> {
    let ms = now_millis().checked_sub(first_published(props)?)?;
    u64::try_from(ms).ok().map(std::time::Duration::from_millis)
}

/// Stamps [`FIRST_PUBLISHED`] with the time now unless the message carries
/// an integer stamp already (a stamp that is not an integer is replaced).
pub fn stamp_first_published(props: &mut BasicProperties) {
    if first_published(props).is_none() {
        set_header(props, FIRST_PUBLISHED, AMQPValue::LongLongInt(now_millis()));
    }
}

/// Stamps a dead letter's death times: [`DEAD_LETTERED_AT`] now, and
/// [`FIRST_DEAD_LETTERED_AT`] now unless it carries an integer one already
/// (a message replayed and dead-lettered again keeps its first).
pub fn stamp_dead_lettered(props: &mut BasicProperties) {
    let now = now_millis();
    set_header(props, DEAD_LETTERED_AT, AMQPValue::LongLongInt(now));
    if header(props, FIRST_DEAD_LETTERED_AT)
        .and_then(header_int)
        .is_none()
    {
        set_header(props, FIRST_DEAD_LETTERED_AT, AMQPValue::LongLongInt(now));
    }
}

/// Gives `to` the [`FIRST_PUBLISHED`] stamp of `from` when `to` has none, so
/// a stage's fresh outputs keep measuring from the first publish.
pub fn carry_first_published(from: &BasicProperties, to: &mut BasicProperties) {
    if let (Some(ms), None) = (first_published(from), first_published(to)) {
        set_header(to, FIRST_PUBLISHED, AMQPValue::LongLongInt(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;
    use proptest::prelude::*;

    fn with_headers(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(t)
    }

    fn death(queue: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("queue".into(), text(queue));
        t.insert("reason".into(), text("expired"));
        t.insert("exchange".into(), text(""));
        t.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![text(queue)])),
        );
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(t)]))
    }

    fn forged() -> Vec<(&'static str, AMQPValue)> {
        vec![
            (ATTEMPT, AMQPValue::LongLongInt(2)),
            (ORIGINAL_EXCHANGE, text("elsewhere")),
            (ORIGINAL_ROUTING_KEY, text(&"k".repeat(300))),
            (LAST_ERROR, text("forged")),
            (UNSIGNED, AMQPValue::Boolean(true)),
            (REASON, text("kept")),
        ]
    }

    #[test]
    fn every_reason_round_trips_and_wire_values_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
            assert!(seen.insert(r.as_str()), "duplicate wire value {r}");
        }
        assert_eq!(Reason::parse("out-of-stock"), None);
    }

    #[test]
    fn forged_routing_headers_are_stripped_from_foreign_deliveries() {
        let got = intake("q", "shop", "order.created", with_headers(&forged()));
        let h = got.properties.headers().clone().unwrap_or_default();
        for name in ROUTING_HEADERS.iter().chain([&UNSIGNED]) {
            assert!(!h.inner().contains_key(*name), "{name} stripped");
        }
        assert!(
            h.inner().contains_key(REASON),
            "dead-letter headers are kept"
        );
        assert_eq!(
            (got.exchange.as_str(), got.routing_key.as_str(), got.attempt),
            ("shop", "order.created", 1)
        );
        assert_eq!(got.tier, None);
    }

    #[test]
    fn a_forged_x_death_needs_the_default_exchange_and_an_own_tier() {
        let mut pairs = forged();
        pairs.push((X_DEATH, death("q.retry.1")));
        // Published to an exchange, not back through a tier.
        assert_eq!(intake("q", "shop", "q", with_headers(&pairs)).attempt, 1);
        // Another queue's tier.
        let mut other = forged();
        other.push((X_DEATH, death("p.retry.1")));
        assert_eq!(intake("q", "", "q", with_headers(&other)).tier, None);
        assert_eq!(intake("q", "", "q", with_headers(&other)).attempt, 1);
        // Not a tier at all.
        let mut dlq = forged();
        dlq.push((X_DEATH, death("q.retry.x")));
        assert_eq!(intake("q", "", "q", with_headers(&dlq)).tier, None);
    }

    #[test]
    fn own_retry_copies_keep_their_routing_but_never_an_over_long_one() {
        let mut pairs = forged();
        pairs.push((X_DEATH, death("q.retry.2")));
        let got = intake("q", "", "q", with_headers(&pairs));
        assert_eq!(got.tier.as_deref(), Some("q.retry.2"));
        assert_eq!(got.attempt, 2);
        assert_eq!(got.exchange, "elsewhere");
        assert_eq!(got.routing_key, "q", "a 300-byte original key is ignored");
        assert!(header(&got.properties, UNSIGNED).is_none());
    }

    #[test]
    fn short_string_fails_instead_of_panicking() {
        assert!(short_string("routing key", &"a".repeat(255)).is_ok());
        let e = short_string("routing key", &"a".repeat(256)).unwrap_err();
        assert_eq!(e.len, 256);
        assert!(e.to_string().contains("routing key"));
        assert!(check_short("exchange", &"é".repeat(128)).is_err());
        assert_eq!(
            check_short("exchange", &"a".repeat(255)),
            Ok(()),
            "255 is allowed"
        );
    }

    #[test]
    fn header_values_are_read_from_every_integer_and_string_type() {
        let ints = [
            AMQPValue::ShortShortInt(-3),
            AMQPValue::ShortShortUInt(3),
            AMQPValue::ShortInt(-300),
            AMQPValue::ShortUInt(300),
            AMQPValue::LongInt(-70_000),
            AMQPValue::LongUInt(70_000),
            AMQPValue::LongLongInt(-5_000_000_000),
            AMQPValue::Timestamp(5_000_000_000),
        ];
        let got: Vec<Option<i64>> = ints.iter().map(header_int).collect();
        assert_eq!(
            got,
            [
                -3,
                3,
                -300,
                300,
                -70_000,
                70_000,
                -5_000_000_000,
                5_000_000_000
            ]
            .map(Some)
        );
        assert_eq!(header_int(&text("7")), None);
        assert_eq!(
            header_string(&AMQPValue::ShortString("short".into())).as_deref(),
            Some("short")
        );
        assert_eq!(header_string(&text("long")).as_deref(), Some("long"));
        assert_eq!(header_string(&AMQPValue::LongLongInt(1)), None);
    }

    #[test]
    fn dead_letter_times_are_now_and_the_first_one_is_kept() {
        let wall = now_millis();
        assert!(
            wall > 1_600_000_000_000,
            "milliseconds since the epoch: {wall}"
        );
        let mut p = BasicProperties::default();
        stamp_dead_lettered(&mut p);
        let at = |p: &BasicProperties, n| header(p, n).and_then(header_int);
        let first = at(&p, DEAD_LETTERED_AT).unwrap();
        assert!((wall..wall + 60_000).contains(&first), "{first} vs {wall}");
        assert_eq!(at(&p, FIRST_DEAD_LETTERED_AT), Some(first));
        // Dead-lettered again later: the first death is kept.
        set_header(&mut p, FIRST_DEAD_LETTERED_AT, AMQPValue::LongLongInt(5));
        stamp_dead_lettered(&mut p);
        assert_eq!(at(&p, FIRST_DEAD_LETTERED_AT), Some(5));
        assert!(at(&p, DEAD_LETTERED_AT).unwrap() >= first);
    }

    #[test]
    fn newest_death_reads_the_first_entry() {
        let p = with_headers(&[(X_DEATH, death("q.retry.1"))]);
        let d = newest_death_of(&p).unwrap();
        assert_eq!(d.queue.as_deref(), Some("q.retry.1"));
        assert_eq!(d.reason.as_deref(), Some("expired"));
        assert_eq!(d.routing_key.as_deref(), Some("q.retry.1"));
        assert_eq!(newest_death_of(&BasicProperties::default()), None);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let t = truncate("é".repeat(10), 5);
        assert!(t.len() <= 5 + '…'.len_utf8());
        assert!(t.starts_with("éé"));
        assert_eq!(truncate("short".into(), 10), "short");
        assert_eq!(truncate("exact".into(), 5), "exact", "at the limit: kept");
        assert_eq!(truncate("exact!".into(), 5), "exact…");
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(ATTEMPT.to_owned()),
            Just(ORIGINAL_EXCHANGE.to_owned()),
            Just(ORIGINAL_ROUTING_KEY.to_owned()),
            Just(LAST_ERROR.to_owned()),
            Just(UNSIGNED.to_owned()),
            Just(REASON.to_owned()),
            "[a-z-]{1,20}",
        ]
    }

    proptest! {
        /// Stripping removes exactly the named headers and keeps every other one.
        #[test]
        fn without_removes_exactly_the_named(keys in proptest::collection::btree_set(name(), 0..8)) {
            let pairs: Vec<(&str, AMQPValue)> = keys.iter().map(|k| (k.as_str(), text(k))).collect();
            let out = without(with_headers(&pairs), &ROUTING_HEADERS);
            let h = out.headers().clone().unwrap_or_default();
            for k in &keys {
                let named = ROUTING_HEADERS.contains(&k.as_str());
                prop_assert_eq!(h.inner().contains_key(k.as_str()), !named);
            }
            prop_assert_eq!(h.inner().len(), keys.iter().filter(|k| !ROUTING_HEADERS.contains(&k.as_str())).count());
        }

        /// Foreign deliveries never keep a routing header, whatever they carry.
        #[test]
        fn foreign_intake_never_trusts(keys in proptest::collection::btree_set(name(), 0..8), ex in "[a-z]{0,5}", rk in "[a-z]{1,5}") {
            let pairs: Vec<(&str, AMQPValue)> = keys.iter().map(|k| (k.as_str(), text(k))).collect();
            let got = intake("queue-not-matching-rk-999", &ex, &rk, with_headers(&pairs));
            prop_assert_eq!(got.attempt, 1);
            prop_assert_eq!(&got.routing_key, &rk);
            for n in ROUTING_HEADERS.iter().chain([&UNSIGNED]) {
                prop_assert!(header(&got.properties, n).is_none());
            }
        }
    }

    #[test]
    fn first_published_is_stamped_once_carried_and_never_negative() {
        let mut p = BasicProperties::default();
        assert_eq!(since_first_published(&p), None);
        stamp_first_published(&mut p);
        let first = first_published(&p).unwrap();
        assert!(first > 1_600_000_000_000, "a wall-clock stamp: {first}");
        assert!(since_first_published(&p).unwrap() < std::time::Duration::from_secs(5));
        // A second stamp keeps the first.
        let mut later = p.clone();
        set_header(
            &mut later,
            FIRST_PUBLISHED,
            AMQPValue::LongLongInt(first - 1000),
        );
        stamp_first_published(&mut later);
        assert_eq!(first_published(&later), Some(first - 1000));
        assert!(since_first_published(&later).unwrap() >= std::time::Duration::from_secs(1));
        // A fresh output gets the input's stamp; one with its own keeps it.
        let mut fresh = BasicProperties::default();
        carry_first_published(&later, &mut fresh);
        assert_eq!(first_published(&fresh), Some(first - 1000));
        carry_first_published(&p, &mut fresh);
        assert_eq!(first_published(&fresh), Some(first - 1000));
        // Forged: text is replaced by a stamp, the future measures nothing.
        let mut forged = BasicProperties::default();
        set_header(&mut forged, FIRST_PUBLISHED, text("yesterday"));
        assert_eq!(since_first_published(&forged), None);
        stamp_first_published(&mut forged);
        assert!(first_published(&forged).is_some());
        set_header(
            &mut forged,
            FIRST_PUBLISHED,
            AMQPValue::LongLongInt(i64::MAX),
        );
        assert_eq!(since_first_published(&forged), None);
        set_header(
            &mut forged,
            FIRST_PUBLISHED,
            AMQPValue::LongLongInt(i64::MIN),
        );
        assert_eq!(since_first_published(&forged), None);
    }
}
