//! The on-disk form of a spool record: flowgate's own, versioned.
//!
//! A stored value is [`MAGIC`], one format-version byte, then the bincode
//! (standard configuration) of that version's record struct. The structs
//! here are flowgate's, not lapin's: a dependency upgrade that reorders
//! lapin's `BasicProperties` or `AMQPValue` cannot change what a stored
//! record means. Rules for changing them:
//!
//! * never reorder or remove a field or an enum variant of a released
//!   version; a different layout is a new version (`RecordV2`), and
//!   [`decode`] keeps reading every older one;
//! * every AMQP field-table type has a variant in [`Value`], so every header
//!   a message can carry round-trips.
//!
//! Values written before records carried a version (bincode of lapin's
//! struct layout, no [`MAGIC`]) are still read when they decode with the
//! lapin in use; otherwise they are quarantined like any undecodable record.

use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};

use super::{SpoolError, SpoolRecord};

/// The first bytes of every versioned record.
pub(super) const MAGIC: [u8; 3] = *b"fgs";
/// The format version this build writes.
pub(super) const VERSION: u8 = 1;

/// Version 1 of a stored record.
#[derive(Serialize, Deserialize)]
struct RecordV1 {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: PropertiesV1,
}

/// The fourteen AMQP basic properties, by name.
#[derive(Serialize, Deserialize)]
struct PropertiesV1 {
    content_type: Option<String>,
    content_encoding: Option<String>,
    headers: Option<Vec<(String, Value)>>,
    delivery_mode: Option<u8>,
    priority: Option<u8>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    expiration: Option<String>,
    message_id: Option<String>,
    timestamp: Option<u64>,
    kind: Option<String>,
    user_id: Option<String>,
    app_id: Option<String>,
    cluster_id: Option<String>,
}

/// Every AMQP field-table value type (RabbitMQ's dialect included).
#[derive(Serialize, Deserialize)]
enum Value {
    Boolean(bool),
    ShortShortInt(i8),
    ShortShortUInt(u8),
    ShortInt(i16),
    ShortUInt(u16),
    LongInt(i32),
    LongUInt(u32),
    LongLongInt(i64),
    Float(f32),
    Double(f64),
    Decimal { scale: u8, value: u32 },
    ShortString(String),
    LongString(Vec<u8>),
    Array(Vec<Value>),
    Timestamp(u64),
    Table(Vec<(String, Value)>),
    ByteArray(Vec<u8>),
    Void,
}

/// The record as it was stored before versions (lapin's layout).
#[derive(Deserialize)]
struct Legacy {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

/// A bincode error, kept as the source.
fn codec(e: impl std::error::Error + Send + Sync + 'static) -> SpoolError {
    SpoolError::Codec {
        reason: "bincode".into(),
        source: Some(std::sync::Arc::new(e)),
    }
}

fn table_out(t: &FieldTable) -> Vec<(String, Value)> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), value_out(v)))
        .collect()
}

fn value_out(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Boolean(*b),
        AMQPValue::ShortShortInt(n) => Value::ShortShortInt(*n),
        AMQPValue::ShortShortUInt(n) => Value::ShortShortUInt(*n),
        AMQPValue::ShortInt(n) => Value::ShortInt(*n),
        AMQPValue::ShortUInt(n) => Value::ShortUInt(*n),
        AMQPValue::LongInt(n) => Value::LongInt(*n),
        AMQPValue::LongUInt(n) => Value::LongUInt(*n),
        AMQPValue::LongLongInt(n) => Value::LongLongInt(*n),
        AMQPValue::Float(n) => Value::Float(*n),
        AMQPValue::Double(n) => Value::Double(*n),
        AMQPValue::DecimalValue(d) => Value::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => Value::ShortString(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::LongString(s.as_bytes().to_vec()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_out).collect()),
        AMQPValue::Timestamp(t) => Value::Timestamp(*t),
        AMQPValue::FieldTable(t) => Value::Table(table_out(t)),
        AMQPValue::ByteArray(b) => Value::ByteArray(b.as_slice().to_vec()),
        AMQPValue::Void => Value::Void,
    }
}

/// A stored short string; a corrupted length past 255 bytes is an error.
fn short(s: String) -> Result<ShortString, SpoolError> {
    ShortString::try_new(s).map_err(codec)
}

fn table_in(t: Vec<(String, Value)>) -> Result<FieldTable, SpoolError> {
    let mut out = FieldTable::default();
    for (k, v) in t {
        out.insert(short(k)?, value_in(v)?);
    }
    Ok(out)
}

fn value_in(v: Value) -> Result<AMQPValue, SpoolError> {
    Ok(match v {
        Value::Boolean(b) => AMQPValue::Boolean(b),
        Value::ShortShortInt(n) => AMQPValue::ShortShortInt(n),
        Value::ShortShortUInt(n) => AMQPValue::ShortShortUInt(n),
        Value::ShortInt(n) => AMQPValue::ShortInt(n),
        Value::ShortUInt(n) => AMQPValue::ShortUInt(n),
        Value::LongInt(n) => AMQPValue::LongInt(n),
        Value::LongUInt(n) => AMQPValue::LongUInt(n),
        Value::LongLongInt(n) => AMQPValue::LongLongInt(n),
        Value::Float(n) => AMQPValue::Float(n),
        Value::Double(n) => AMQPValue::Double(n),
        Value::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue { scale, value }),
        Value::ShortString(s) => AMQPValue::ShortString(short(s)?),
        Value::LongString(b) => AMQPValue::LongString(LongString::from(b)),
        Value::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.into_iter().map(value_in).collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Timestamp(t) => AMQPValue::Timestamp(t),
        Value::Table(t) => AMQPValue::FieldTable(table_in(t)?),
        Value::ByteArray(b) => AMQPValue::ByteArray(ByteArray::from(b)),
        Value::Void => AMQPValue::Void,
    })
}

fn opt(s: &Option<ShortString>) -> Option<String> {
    s.as_ref().map(|s| s.as_str().to_owned())
}

fn properties_out(p: &BasicProperties) -> PropertiesV1 {
    PropertiesV1 {
        content_type: opt(p.content_type()),
        content_encoding: opt(p.content_encoding()),
        headers: p.headers().as_ref().map(table_out),
        delivery_mode: *p.delivery_mode(),
        priority: *p.priority(),
        correlation_id: opt(p.correlation_id()),
        reply_to: opt(p.reply_to()),
        expiration: opt(p.expiration()),
        message_id: opt(p.message_id()),
        timestamp: *p.timestamp(),
        kind: opt(p.kind()),
        user_id: opt(p.user_id()),
        app_id: opt(p.app_id()),
        cluster_id: opt(p.cluster_id()),
    }
}

fn properties_in(p: PropertiesV1) -> Result<BasicProperties, SpoolError> {
    let mut out = BasicProperties::default();
    let set = |out: BasicProperties,
               v: Option<String>,
               f: fn(BasicProperties, ShortString) -> BasicProperties|
     -> Result<BasicProperties, SpoolError> {
        Ok(match v {
            Some(s) => f(out, short(s)?),
            None => out,
        })
    };
    out = set(out, p.content_type, BasicProperties::with_content_type)?;
    out = set(
        out,
        p.content_encoding,
        BasicProperties::with_content_encoding,
    )?;
    if let Some(h) = p.headers {
        out = out.with_headers(table_in(h)?);
    }
    if let Some(d) = p.delivery_mode {
        out = out.with_delivery_mode(d);
    }
    if let Some(n) = p.priority {
        out = out.with_priority(n);
    }
    out = set(out, p.correlation_id, BasicProperties::with_correlation_id)?;
    out = set(out, p.reply_to, BasicProperties::with_reply_to)?;
    out = set(out, p.expiration, BasicProperties::with_expiration)?;
    out = set(out, p.message_id, BasicProperties::with_message_id)?;
    if let Some(t) = p.timestamp {
        out = out.with_timestamp(t);
    }
    out = set(out, p.kind, BasicProperties::with_type)?;
    out = set(out, p.user_id, BasicProperties::with_user_id)?;
    out = set(out, p.app_id, BasicProperties::with_app_id)?;
    out = set(out, p.cluster_id, BasicProperties::with_cluster_id)?;
    Ok(out)
}

/// Decodes all of `bytes` as a `T`; trailing bytes are an error, so a
/// truncated or concatenated value is not silently accepted.
fn exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, SpoolError> {
    let (v, used): (T, usize) =
        bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map_err(codec)?;
    if used != bytes.len() {
        return Err(SpoolError::codec(format!(
            "{} trailing bytes after record",
            bytes.len() - used
        )));
    }
    Ok(v)
}

/// The stored form of `rec` in the current [`VERSION`].
pub(super) fn encode(rec: &SpoolRecord) -> Result<Vec<u8>, SpoolError> {
    let v1 = RecordV1 {
        exchange: rec.exchange.clone(),
        routing_key: rec.routing_key.clone(),
        body: rec.body.clone(),
        properties: properties_out(&rec.properties),
    };
    let mut out = Vec::with_capacity(MAGIC.len() + 1 + 64 + rec.body.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    bincode::serde::encode_into_std_write(&v1, &mut out, bincode::config::standard())
        .map_err(codec)?;
    Ok(out)
}

/// Reads a stored record of any version this build knows.
pub(super) fn decode(bytes: &[u8]) -> Result<SpoolRecord, SpoolError> {
    let Some(rest) = bytes.strip_prefix(&MAGIC) else {
        let old: Legacy = exact(bytes).map_err(|e| match e {
            SpoolError::Codec { reason, source } => SpoolError::Codec {
                reason: format!("unversioned record: {reason}"),
                source,
            },
            other => other,
        })?;
        return Ok(SpoolRecord {
            exchange: old.exchange,
            routing_key: old.routing_key,
            body: old.body,
            properties: old.properties,
        });
    };
    match rest.split_first() {
        Some((1, v1)) => {
            let r: RecordV1 = exact(v1)?;
            Ok(SpoolRecord {
                exchange: r.exchange,
                routing_key: r.routing_key,
                body: r.body,
                properties: properties_in(r.properties)?,
            })
        }
        Some((v, _)) => Err(SpoolError::codec(format!(
            "record format version {v} is newer than this build reads ({VERSION})"
        ))),
        None => Err(SpoolError::codec("record has no format version")),
    }
}
