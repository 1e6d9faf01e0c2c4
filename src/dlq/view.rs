//! How a dead letter reads for people: every byte from a DLQ is hostile.
//!
//! Text is shown with control and bidirectional-override characters made
//! visible (`\u{202e}`), bodies as pretty-printed JSON, text, or a hex dump
//! when they are not UTF-8, and everything is cut to a bound (a list
//! preview, a page's body, a header's value). HTML escaping is the page's
//! job (the console's templates escape every value); this module makes the
//! text itself safe to look at, in a terminal too.

use lapin::types::AMQPValue;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Characters of a body preview in a list.
pub const PREVIEW_CHARS: usize = 120;
/// Bytes of a body shown on a message's page (text or JSON).
pub const SHOWN_TEXT_BYTES: usize = 64 * 1024;
/// Bytes of a binary body shown as a hex dump on a message's page.
pub const SHOWN_HEX_BYTES: usize = 4 * 1024;
/// Characters of one header value shown.
pub const SHOWN_VALUE_CHARS: usize = 1024;
/// Nesting of header tables and arrays shown (deeper ones are elided).
const MAX_DEPTH: usize = 4;

/// What a body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyKind {
    /// Valid UTF-8 that parses as JSON.
    Json,
    /// Valid UTF-8, not JSON.
    Text,
    /// Not UTF-8.
    Binary,
}

/// A body as shown on a message's page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BodyView {
    /// JSON, text or binary.
    pub kind: BodyKind,
    /// Pretty-printed JSON, the text (made visible), or a hex dump.
    pub shown: String,
    /// The body's size in bytes.
    pub size: usize,
    /// True when `shown` is cut (the rest is not shown).
    pub truncated: bool,
}

/// Makes every control character but newline and tab, and every
/// bidirectional formatting character, visible as `\u{..}`; keeps at most
/// `max` characters (appending `…` when cut).
pub fn visible(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max.saturating_mul(2)));
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        if hidden(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters that would hide or disguise text when printed.
fn hidden(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || c == '\u{feff}'
}

/// What a body is, without copying it.
pub fn body_kind(body: &[u8]) -> BodyKind {
    match std::str::from_utf8(body) {
        Ok(s) if serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok() => BodyKind::Json,
        Ok(_) => BodyKind::Text,
        Err(_) => BodyKind::Binary,
    }
}

/// A one-line preview of a body for a list: text on one line (newlines
/// shown as `⏎`), or the first bytes in hex for a binary body.
pub fn preview(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(s) => visible(&s.replace(['\n', '\r'], "⏎"), PREVIEW_CHARS),
        Err(_) => {
            let n = PREVIEW_CHARS / 3;
            let mut hex = hex_bytes(&body[..body.len().min(n)]);
            if body.len() > n {
                hex.push('…');
            }
            hex
        }
    }
}

fn hex_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 3);
    for (i, x) in b.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// A classic hex dump (offset, 16 bytes in hex, the printable ASCII).
pub fn hex_dump(b: &[u8]) -> String {
    let mut out = String::new();
    for (row, chunk) in b.chunks(16).enumerate() {
        let ascii: String = chunk
            .iter()
            .map(|&c| {
                if (0x20..0x7f).contains(&c) {
                    c as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(out, "{:08x}  {:<47}  {ascii}", row * 16, hex_bytes(chunk));
    }
    out
}

/// A body as its page shows it: pretty JSON, text, or a hex dump, bounded.
pub fn body_view(body: &[u8]) -> BodyView {
    let size = body.len();
    match std::str::from_utf8(body) {
        Ok(s) => {
            let pretty = serde_json::from_str::<serde_json::Value>(s)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok());
            let (kind, text) = match pretty {
                Some(p) => (BodyKind::Json, p),
                None => (BodyKind::Text, s.to_owned()),
            };
            let cut = cut_at_char(&text, SHOWN_TEXT_BYTES);
            BodyView {
                kind,
                truncated: cut.len() < text.len(),
                shown: visible(cut, usize::MAX),
                size,
            }
        }
        Err(_) => BodyView {
            kind: BodyKind::Binary,
            shown: hex_dump(&body[..size.min(SHOWN_HEX_BYTES)]),
            size,
            truncated: size > SHOWN_HEX_BYTES,
        },
    }
}

/// The longest prefix of `s` of at most `max` bytes ending on a char boundary.
fn cut_at_char(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A header value as text: strings made visible, bytes that are not UTF-8
/// in hex, tables and arrays inline (nesting bounded), all cut to
/// [`SHOWN_VALUE_CHARS`].
pub fn value_text(v: &AMQPValue) -> String {
    let mut s = String::new();
    write_value(&mut s, v, 0);
    visible(&s, SHOWN_VALUE_CHARS)
}

fn write_value(out: &mut String, v: &AMQPValue, depth: usize) {
    if out.len() > SHOWN_VALUE_CHARS * 4 {
        return;
    }
    match v {
        AMQPValue::LongString(l) => match std::str::from_utf8(l.as_bytes()) {
            Ok(s) => out.push_str(s),
            Err(_) => {
                let _ = write!(out, "0x{}", hex_bytes(l.as_bytes()).replace(' ', ""));
            }
        },
        AMQPValue::ShortString(s) => out.push_str(s.as_str()),
        AMQPValue::ByteArray(b) => {
            let _ = write!(out, "0x{}", hex_bytes(b.as_slice()).replace(' ', ""));
        }
        AMQPValue::Timestamp(t) => {
            let _ = write!(
                out,
                "{}",
                time_text(i64::try_from(*t).unwrap_or(i64::MAX), 1)
            );
        }
        AMQPValue::FieldTable(t) if depth < MAX_DEPTH => {
            out.push('{');
            for (i, (k, v)) in t.inner().iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{}: ", k.as_str());
                write_value(out, v, depth + 1);
            }
            out.push('}');
        }
        AMQPValue::FieldArray(a) if depth < MAX_DEPTH => {
            out.push('[');
            for (i, v) in a.as_slice().iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, v, depth + 1);
            }
            out.push(']');
        }
        AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_) => out.push('…'),
        AMQPValue::Boolean(b) => {
            let _ = write!(out, "{b}");
        }
        AMQPValue::Void => out.push_str("(void)"),
        other => match flowgate_actors::envelope::header_int(other) {
            Some(i) => {
                let _ = write!(out, "{i}");
            }
            None => {
                let _ = write!(out, "{other:?}");
            }
        },
    }
}

/// A time in `unit`s (1: seconds, 1000: milliseconds) since the unix epoch
/// as RFC 3339 UTC, to the second; the number itself when out of range.
pub fn time_text(t: i64, unit: i64) -> String {
    let secs = t / unit.max(1);
    match u64::try_from(secs) {
        Ok(s) => {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
            humantime::format_rfc3339_seconds(at).to_string()
        }
        Err(_) => t.to_string(),
    }
}

/// A list page as text (`flowgate dlq list`).
pub fn page_text(p: &super::Page) -> String {
    let mut out = format!(
        "{}: {} dead letters; {} shown from match {}{}\n",
        p.queue,
        p.depth,
        p.entries.len(),
        p.offset + 1,
        if p.more { " (more follow)" } else { "" }
    );
    if !p.complete {
        out.push_str("(the read stopped at its deadline: not every dead letter was read)\n");
    }
    for e in &p.entries {
        let _ = writeln!(
            out,
            "{}  #{:<6} {:<24} {:<16} {:<12} attempts {:<3} last {}",
            e.id,
            e.position,
            e.message_id.as_deref().unwrap_or("-"),
            e.reason,
            e.stage,
            e.attempts.map_or("-".into(), |a| a.to_string()),
            e.last_death.as_deref().unwrap_or("-"),
        );
        let _ = writeln!(out, "    {}", e.preview);
    }
    out
}

/// One dead letter in full as text (`flowgate dlq show`).
pub fn shown_text(s: &super::Shown) -> String {
    let e = &s.entry;
    let mut out = format!(
        "id {}  position {}\nmessage id  {}\nreason      {}\nstage       {}\nattempts    {}\nfirst death {}\nlast death  {}\n",
        e.id,
        e.position,
        e.message_id.as_deref().unwrap_or("-"),
        e.reason,
        e.stage,
        e.attempts.map_or("-".into(), |a| a.to_string()),
        e.first_death.as_deref().unwrap_or("-"),
        e.last_death.as_deref().unwrap_or("-"),
    );
    if let Some((x, k)) = &e.origin {
        let _ = writeln!(out, "origin      exchange `{x}`, routing key `{k}`");
    }
    if let Some(err) = &e.error {
        let _ = writeln!(out, "error       {err}");
    }
    out.push_str("properties:\n");
    for (k, v) in &s.properties {
        let _ = writeln!(out, "  {k}: {v}");
    }
    out.push_str("headers:\n");
    for (k, v) in &s.headers {
        let _ = writeln!(out, "  {k}: {v}");
    }
    let _ = writeln!(
        out,
        "body ({:?}, {} bytes{}):\n{}\n",
        s.body.kind,
        s.body.size,
        if s.body.truncated { ", cut" } else { "" },
        s.body.shown
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_made_visible_and_bounded() {
        let s = "ok\u{202e}gnp.exe\u{0}\u{1b}[31m\nnext";
        let v = visible(s, 100);
        assert_eq!(v, "ok\\u{202e}gnp.exe\\u{0}\\u{1b}[31m\nnext");
        assert_eq!(visible("abcdef", 3), "abc…");
    }

    #[test]
    fn bodies_are_json_text_or_hex() {
        let j = body_view(br#"{"a":[1,2]}"#);
        assert_eq!(j.kind, BodyKind::Json);
        assert!(j.shown.contains("\n  \"a\": ["), "{}", j.shown);
        assert_eq!(body_view(b"plain <b>").kind, BodyKind::Text);
        let b = body_view(&[0xff, 0xfe, b'A', 0]);
        assert_eq!(b.kind, BodyKind::Binary);
        assert_eq!(b.shown, format!("00000000  {:<47}  ..A.\n", "ff fe 41 00"));
        let big = vec![0xffu8; SHOWN_HEX_BYTES + 1];
        let v = body_view(&big);
        assert!(v.truncated && v.size == SHOWN_HEX_BYTES + 1);
        assert_eq!(v.shown.lines().count(), SHOWN_HEX_BYTES / 16);
        assert_eq!(preview(&[0xff, 0x00]), "ff 00");
        assert_eq!(preview(b"a\nb"), "a⏎b");
        assert_eq!(body_kind(b"[1]"), BodyKind::Json);
    }

    #[test]
    fn a_long_text_body_is_cut_on_a_char_boundary() {
        let s = "é".repeat(SHOWN_TEXT_BYTES);
        let v = body_view(s.as_bytes());
        assert!(v.truncated);
        assert!(v.shown.len() <= SHOWN_TEXT_BYTES);
    }
}
