//! Who is using the console: the login (a management token), the session
//! it opens (an HttpOnly, SameSite=Strict cookie) and the CSRF token every
//! change must carry.
//!
//! A session id is 32 random bytes (the OS's generator), sent only in the
//! cookie and kept here only as its SHA-256; the session remembers the
//! token's name (logged with every change) and its own CSRF token. At most
//! [`MAX_SESSIONS`] live at once (the least recently used goes first); one
//! ends [`IDLE`] after its last request, [`LIFETIME`] after the login, or
//! at logout.

use sha2::Digest;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The session cookie's name.
pub(super) const COOKIE: &str = "flowgate_session";
/// The login form's own cookie (double-submit CSRF for the login itself).
pub(super) const LOGIN_COOKIE: &str = "flowgate_login";
/// Most sessions held.
pub(super) const MAX_SESSIONS: usize = 256;
/// A session unused this long ends.
pub(super) const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after its login, used or not.
pub(super) const LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// What a request's session says.
#[derive(Clone, Debug)]
pub(super) struct Who {
    /// The name of the token that logged in.
    pub(super) name: String,
    /// The CSRF token forms must carry.
    pub(super) csrf: String,
}

struct Session {
    who: Who,
    created: Instant,
    last: Instant,
}

/// The live sessions, by the SHA-256 of their id.
#[derive(Default)]
pub(super) struct Sessions(Mutex<HashMap<[u8; 32], Session>>);

/// 32 random bytes as hex; `None` if the OS's generator fails (the
/// console then refuses the login rather than use weak randomness).
pub(super) fn random_hex() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn key(id: &str) -> [u8; 32] {
    sha2::Sha256::digest(id.as_bytes()).into()
}

/// Byte strings equal, compared in constant time for equal lengths.
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    /// Opens a session for the token named `name`; its id (for the cookie).
    pub(super) fn open(&self, name: &str) -> Option<String> {
        let id = random_hex()?;
        let csrf = random_hex()?;
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| live(s, now));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(
            key(&id),
            Session {
                who: Who {
                    name: name.to_owned(),
                    csrf,
                },
                created: now,
                last: now,
            },
        );
        Some(id)
    }

    /// The session of cookie value `id`, if it is live (and marks it used).
    pub(super) fn get(&self, id: &str) -> Option<Who> {
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(id);
        match map.get_mut(&k) {
            Some(s) if live(s, now) => {
                s.last = now;
                Some(s.who.clone())
            }
            Some(_) => {
                map.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Ends the session of cookie value `id`.
    pub(super) fn close(&self, id: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&key(id));
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last) < IDLE && now.duration_since(s.created) < LIFETIME
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, path `/ui`, ending
/// with the browser session (or deleting the cookie when `value` is empty).
pub(super) fn set_cookie(name: &str, value: &str) -> String {
    let expire = if value.is_empty() { "; Max-Age=0" } else { "" };
    format!("{name}={value}; Path=/ui; HttpOnly; SameSite=Strict{expire}")
}

/// The value of cookie `name` in a `Cookie` request header.
pub(super) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_id_only_and_ends_at_logout() {
        let s = Sessions::default();
        let id = s.open("alice").unwrap();
        assert_eq!(id.len(), 64);
        let who = s.get(&id).unwrap();
        assert_eq!(who.name, "alice");
        assert_eq!(who.csrf.len(), 64);
        assert!(s.get(&id[1..]).is_none());
        s.close(&id);
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::default();
        let first = s.open("a").unwrap();
        for _ in 0..MAX_SESSIONS {
            s.open("b").unwrap();
        }
        assert!(s.get(&first).is_none(), "the least recently used went");
        assert!(s.0.lock().unwrap().len() <= MAX_SESSIONS);
    }

    #[test]
    fn cookies_are_http_only_and_strict() {
        let c = set_cookie(COOKIE, "abc");
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/ui"));
        assert_eq!(
            cookie("a=1; flowgate_session=xyz; b=2", COOKIE),
            Some("xyz")
        );
        assert_eq!(cookie("flowgate_sessionx=1", COOKIE), None);
    }
}
