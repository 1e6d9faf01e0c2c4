//! HMAC-SHA256 message signing: every publish carries
//! [`envelope::SIGNATURE`](crate::envelope::SIGNATURE), and stages verify it before anything else
//! touches the message.
//!
//! # The canonical form
//!
//! The signature is the lowercase hex HMAC-SHA256, under the shared key, of
//! this byte string (other services produce the same to interoperate):
//!
//! ```text
//! len(routing_key)  routing_key
//! len(message_id)   message_id      (empty when the property is absent)
//! len(content_type) content_type    (empty when the property is absent)
//! len(body)         body
//! ```
//!
//! where each `len(x)` is the byte length of `x` as an unsigned 64-bit
//! big-endian integer (8 bytes), and the strings are their UTF-8 bytes. The
//! routing key is the one the message is *published* with. The exchange,
//! headers and other properties are not covered. Example, in Python:
//!
//! ```text
//! def canonical(rk, mid, ct, body):
//!     parts = [rk.encode(), (mid or "").encode(), (ct or "").encode(), body]
//!     return b"".join(len(p).to_bytes(8, "big") + p for p in parts)
//! sig = hmac.new(key, canonical(...), hashlib.sha256).hexdigest()
//! # publish with headers={"x-flowgate-signature": sig}
//! ```
//!
//! # Where the engine signs and checks
//!
//! The publisher signs each message just before `basic.publish` — stage
//! outputs, retry copies, dead letters, ingress and gateway publishes, and
//! spooled records when they are replayed (so a spooled message is signed
//! with the key in use at replay time). A stage with verification checks
//! the signature of each delivery against the current key and then the
//! previous one (rotation), in constant time. A copy that came back from
//! one of the stage's own retry tiers was published with the tier's name as
//! routing key; that name is accepted for it.
//!
//! A message dead-lettered for a bad signature keeps the signature it
//! arrived with (the publisher does not sign it; see [`UNSIGNED_HEADER`]),
//! so replaying it from the dead-letter queue cannot launder it.

use crate::envelope;
use hmac::{Hmac, Mac};
use lapin::types::{AMQPValue, LongString, ShortString};
use lapin::BasicProperties;
use sha2::Sha256;
use std::fmt;
use std::sync::Arc;

/// The header carrying the hex HMAC-SHA256 signature.
pub(crate) const SIGNATURE_HEADER: &str = envelope::SIGNATURE;

/// Engine-internal marker: a message carrying it is published *without*
/// (re)signing, and the marker is removed before the publish. The stage sets
/// it on the dead letters of messages that failed verification; stages strip
/// it from every delivery, so input cannot smuggle it into outputs.
pub(crate) const UNSIGNED_HEADER: &str = envelope::UNSIGNED;

type HmacSha256 = Hmac<Sha256>;

/// The canonical byte string that is signed (see the module docs).
#[cfg(test)]
pub(crate) fn canonical(
    routing_key: &str,
    message_id: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Vec<u8> {
    let fields: [&[u8]; 4] = [
        routing_key.as_bytes(),
        message_id.unwrap_or("").as_bytes(),
        content_type.unwrap_or("").as_bytes(),
        body,
    ];
    let mut out = Vec::with_capacity(32 + fields.iter().map(|f| f.len()).sum::<usize>());
    for f in fields {
        out.extend_from_slice(&(f.len() as u64).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// A secret key. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct SigningKey(Arc<[u8]>);

impl SigningKey {
    /// Wraps key bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(Arc::from(bytes.into().into_boxed_slice()))
    }

    /// A MAC already fed with the canonical form of a message, without
    /// building the canonical byte string.
    fn mac(&self, routing_key: &str, props: &BasicProperties, body: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut mac = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        let mid = props.message_id().as_ref().map(|s| s.as_str());
        let ct = props.content_type().as_ref().map(|s| s.as_str());
        let fields: [&[u8]; 4] = [
            routing_key.as_bytes(),
            mid.unwrap_or("").as_bytes(),
            ct.unwrap_or("").as_bytes(),
            body,
        ];
        for f in fields {
            mac.update(&(f.len() as u64).to_be_bytes());
            mac.update(f);
        }
        mac
    }

    /// The lowercase hex signature of a message published with `routing_key`.
    pub fn sign(&self, routing_key: &str, props: &BasicProperties, body: &[u8]) -> String {
        hex::encode(self.mac(routing_key, props, body).finalize().into_bytes())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(<{} bytes redacted>)", self.0.len())
    }
}

/// Why a signature did not verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `x-flowgate-signature` header.
    #[error("no x-flowgate-signature header")]
    Missing,
    /// The header is not a hex string of the right length.
    #[error("x-flowgate-signature is not a hex HMAC-SHA256")]
    Malformed,
    /// Well-formed, but no accepted key produced it.
    #[error("x-flowgate-signature does not match")]
    Mismatch,
}

/// Which key verified a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUsed {
    /// The current key.
    Current,
    /// The previous key (a rotation is in progress).
    Previous,
}

/// The current key (signs and verifies) and, during a rotation, the
/// previous one (verifies only).
#[derive(Clone, Debug)]
pub struct Keys {
    /// Signs every publish; verifies.
    pub current: SigningKey,
    /// Accepted for verification only.
    pub previous: Option<SigningKey>,
}

impl Keys {
    /// Keys without a previous one.
    pub fn new(current: SigningKey) -> Self {
        Self {
            current,
            previous: None,
        }
    }

    /// Sets [`envelope::SIGNATURE`](crate::envelope::SIGNATURE) on `props` for a publish with
    /// `routing_key`, replacing any signature already there.
    pub fn sign_properties(
        &self,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> BasicProperties {
        let sig = self.current.sign(routing_key, &props, body);
        let mut table = props.headers().clone().unwrap_or_default();
        // A constant name, far below 255 bytes.
        table.insert(
            ShortString::from(SIGNATURE_HEADER),
            AMQPValue::LongString(LongString::from(sig)),
        );
        props.with_headers(table)
    }

    /// Checks the signature of a message against each candidate routing key
    /// (the first is the delivery's own) and each accepted key, comparing in
    /// constant time.
    pub fn verify(
        &self,
        routing_keys: &[&str],
        props: &BasicProperties,
        body: &[u8],
    ) -> Result<KeyUsed, SignatureError> {
        let value = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(SIGNATURE_HEADER))
            .ok_or(SignatureError::Missing)?;
        let text: &[u8] = match value {
            AMQPValue::LongString(s) => s.as_bytes(),
            AMQPValue::ShortString(s) => s.as_str().as_bytes(),
            _ => return Err(SignatureError::Malformed),
        };
        let sig = hex::decode(text).map_err(|_| SignatureError::Malformed)?;
        if sig.len() != 32 {
            return Err(SignatureError::Malformed);
        }
        let keys = std::iter::once((KeyUsed::Current, &self.current))
            .chain(self.previous.iter().map(|k| (KeyUsed::Previous, k)));
        for (used, key) in keys {
            for rk in routing_keys {
                if key.mac(rk, props, body).verify_slice(&sig).is_ok() {
                    return Ok(used);
                }
            }
        }
        Err(SignatureError::Mismatch)
    }
}

/// What a stage does with a delivery whose signature is missing or wrong
/// (a stage's `verify` key: `off`, `warn`, `reject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// No check: a [`Verifier`] in this mode accepts every delivery.
    Off,
    /// Count it (`flowgate_signature_failures_total`), log, process it anyway.
    Warn,
    /// Count it and dead-letter it with reason `bad-signature`, before the
    /// dedup claim and the handler.
    Reject,
}

/// A stage's signature check.
#[derive(Clone, Debug)]
pub struct Verifier {
    /// The accepted keys.
    pub keys: Keys,
    /// What a failure leads to.
    pub mode: VerifyMode,
}

/// Prepares the properties of a publish: removes [`UNSIGNED_HEADER`] (and
/// then leaves the message as it is), or else signs with `keys` if any.
pub(crate) fn prepare(
    keys: Option<&Keys>,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> BasicProperties {
    let marked = props
        .headers()
        .as_ref()
        .is_some_and(|h| h.inner().contains_key(UNSIGNED_HEADER));
    if marked {
        return without_header(props, UNSIGNED_HEADER);
    }
    match keys {
        Some(k) => k.sign_properties(routing_key, body, props),
        None => props,
    }
}

/// `props` without the header `name` (unchanged when absent).
pub(crate) fn without_header(props: BasicProperties, name: &str) -> BasicProperties {
    envelope::without(props, &[name])
}

/// The routing key a copy that came back from one of `queue`'s retry tiers
/// was signed with: the tier's name, read from the newest `x-death` entry,
/// accepted only when the delivery arrived with routing key `queue` (how
/// tiers dead-letter back) and the entry names a tier of `queue`. Stages
/// use [`envelope::own_tier`], which also requires the default exchange.
#[cfg(test)]
pub(crate) fn retry_tier_key(
    queue: &str,
    delivered_key: &str,
    props: &BasicProperties,
) -> Option<String> {
    if delivered_key != queue {
        return None;
    }
    let tier = envelope::newest_death_of(props)?.queue?;
    envelope::is_tier_of(queue, &tier).then_some(tier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, FieldTable};

    fn keys() -> Keys {
        Keys::new(SigningKey::new(
            b"0123456789abcdef0123456789abcdef".to_vec(),
        ))
    }

    fn props() -> BasicProperties {
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
    }

    #[test]
    fn canonical_form_is_length_prefixed_fields() {
        let c = canonical("rk", Some("id"), None, b"body");
        let mut want = Vec::new();
        want.extend_from_slice(&2u64.to_be_bytes());
        want.extend_from_slice(b"rk");
        want.extend_from_slice(&2u64.to_be_bytes());
        want.extend_from_slice(b"id");
        want.extend_from_slice(&0u64.to_be_bytes());
        want.extend_from_slice(&4u64.to_be_bytes());
        want.extend_from_slice(b"body");
        assert_eq!(c, want);
        // Field boundaries matter: moving bytes between fields changes it.
        assert_ne!(
            canonical("ab", Some("c"), None, b""),
            canonical("a", Some("bc"), None, b"")
        );
    }

    #[test]
    fn signature_is_hmac_sha256_of_the_canonical_form() {
        let k = keys();
        let sig = k.current.sign("order.created", &props(), b"{}");
        let mut mac = HmacSha256::new_from_slice(b"0123456789abcdef0123456789abcdef").unwrap();
        mac.update(&canonical(
            "order.created",
            Some("m-1"),
            Some("application/json"),
            b"{}",
        ));
        assert_eq!(sig, hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sig.len(), 64);
    }

    /// RFC 4231 test case 2 pins the HMAC-SHA256 implementation.
    #[test]
    fn hmac_matches_rfc_4231() {
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signed_properties_verify_and_tampering_does_not() {
        let k = keys();
        let p = k.sign_properties("rk", b"body", props());
        assert_eq!(k.verify(&["rk"], &p, b"body"), Ok(KeyUsed::Current));
        assert_eq!(
            k.verify(&["rk"], &p, b"bodY"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            k.verify(&["other"], &p, b"body"),
            Err(SignatureError::Mismatch)
        );
        let p2 = p.clone().with_message_id("m-2".into());
        assert_eq!(
            k.verify(&["rk"], &p2, b"body"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            k.verify(&["rk"], &props(), b"body"),
            Err(SignatureError::Missing)
        );
        let mut bad = props();
        crate::message::set_header(
            &mut bad,
            SIGNATURE_HEADER,
            AMQPValue::LongString("zz".into()),
        );
        assert_eq!(
            k.verify(&["rk"], &bad, b"body"),
            Err(SignatureError::Malformed)
        );
        // Uppercase hex is accepted.
        let sig = k.current.sign("rk", &props(), b"body").to_uppercase();
        let mut upper = props();
        crate::message::set_header(
            &mut upper,
            SIGNATURE_HEADER,
            AMQPValue::LongString(sig.into()),
        );
        assert_eq!(k.verify(&["rk"], &upper, b"body"), Ok(KeyUsed::Current));
        // A short-string header (another client's choice) is read too.
        let sig = k.current.sign("rk", &props(), b"body");
        let mut short = props();
        crate::message::set_header(
            &mut short,
            SIGNATURE_HEADER,
            AMQPValue::ShortString(sig.as_str().into()),
        );
        assert_eq!(k.verify(&["rk"], &short, b"body"), Ok(KeyUsed::Current));
    }

    #[test]
    fn previous_key_verifies_but_never_signs() {
        let old = SigningKey::new(b"old-key-old-key-old-key".to_vec());
        let rotated = Keys {
            current: SigningKey::new(b"new-key-new-key-new-key".to_vec()),
            previous: Some(old.clone()),
        };
        let by_old = Keys::new(old).sign_properties("rk", b"x", props());
        assert_eq!(
            rotated.verify(&["rk"], &by_old, b"x"),
            Ok(KeyUsed::Previous)
        );
        let by_new = rotated.sign_properties("rk", b"x", props());
        assert_eq!(rotated.verify(&["rk"], &by_new, b"x"), Ok(KeyUsed::Current));
        let unrelated = Keys::new(SigningKey::new(b"other-key-other-key".to_vec()));
        assert_eq!(
            unrelated.verify(&["rk"], &by_new, b"x"),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn prepare_signs_unless_marked() {
        let k = keys();
        let signed = prepare(Some(&k), "rk", b"b", props());
        assert!(k.verify(&["rk"], &signed, b"b").is_ok());
        assert_eq!(prepare(None, "rk", b"b", props()), props());
        let mut marked = props();
        crate::message::set_header(&mut marked, UNSIGNED_HEADER, AMQPValue::Boolean(true));
        let out = prepare(Some(&k), "rk", b"b", marked);
        let h = out.headers().clone().unwrap_or_default();
        assert!(!h.inner().contains_key(UNSIGNED_HEADER));
        assert!(!h.inner().contains_key(SIGNATURE_HEADER));
        assert_eq!(out.message_id(), props().message_id(), "the rest is kept");
        assert_eq!(out.content_type(), props().content_type());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let s = format!("{:?}", keys());
        assert!(!s.contains("0123456789abcdef"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn retry_tier_key_only_for_own_tiers() {
        let death = |queue: &str| {
            let mut t = FieldTable::default();
            t.insert("queue".into(), AMQPValue::LongString(queue.into()));
            let mut p = BasicProperties::default();
            crate::message::set_header(
                &mut p,
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(t)])),
            );
            p
        };
        assert_eq!(
            retry_tier_key("q", "q", &death("q.retry.1")).as_deref(),
            Some("q.retry.1")
        );
        assert_eq!(retry_tier_key("q", "other", &death("q.retry.1")), None);
        assert_eq!(retry_tier_key("q", "q", &death("p.retry.1")), None);
        assert_eq!(retry_tier_key("q", "q", &death("q.retry.x")), None);
        assert_eq!(retry_tier_key("q", "q", &BasicProperties::default()), None);
    }
}
