//! Shared by the console's tests: a `flowgate run` daemon with the console
//! on a free port, an HTTP client that keeps the session cookie, and a
//! small W3C WebDriver client for Debian's `chromedriver` + `chromium`
//! (headless; nothing downloaded).

#![allow(dead_code)]

pub mod webdriver;

use flowgate_testkit::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The operator's token (named `alice` in the token file).
pub const TOKEN: &str = "console-token-alice-0123456789abcdef";
/// A second, unnamed token.
pub const OTHER_TOKEN: &str = "console-token-anon-0123456789abcdef";

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A daemon under test: its process, its console's base URL, its log.
pub struct Daemon {
    pub child: ChildGuard,
    pub base: String,
    pub log: PathBuf,
    pub config: PathBuf,
}

/// Writes `toml` (plus `[management]` on a free port and the token file)
/// into `dir` and starts `flowgate run` on it; waits until `/readyz`
/// answers 200.
pub async fn start_daemon(dir: &Path, toml: &str) -> Daemon {
    start_daemon_with(dir, toml, "").await
}

/// [`start_daemon`] with more `[management]` keys (`key = value` lines).
pub async fn start_daemon_with(dir: &Path, toml: &str, management: &str) -> Daemon {
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("# name: alice\n{TOKEN}\n# no name\n{OTHER_TOKEN}\n"),
    )
    .unwrap();
    let port = free_port();
    let config = dir.join("flowgate.toml");
    std::fs::write(
        &config,
        format!(
            "{toml}\n[management]\nbind = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\n{management}\n",
            tokens.display()
        ),
    )
    .unwrap();
    let log = dir.join("daemon.log");
    let child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info,lapin=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start flowgate run");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not get ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Daemon {
        child: ChildGuard(child),
        base,
        log,
        config,
    }
}

impl Daemon {
    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Where a test writes its screenshots and logs:
/// `$FLOWGATE_TEST_OUTPUT/<name>` if set, else `target/tmp/<name>`.
pub fn output_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("FLOWGATE_TEST_OUTPUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A value between `start` and `end` markers in `html`.
pub fn between<'a>(html: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = html.find(start)? + start.len();
    let j = html[i..].find(end)? + i;
    Some(&html[i..j])
}

/// An HTTP client for the console (no redirects followed, cookies kept by
/// hand): signs in with `token` and returns the client, the session cookie
/// and the CSRF token of the pipeline page.
pub async fn sign_in(base: &str, token: &str) -> (reqwest::Client, String, String) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (login_cookie, login_csrf) = login_form(&http, base).await;
    let r = http
        .post(format!("{base}/ui/login"))
        .header("cookie", login_cookie)
        .form(&[("csrf", login_csrf.as_str()), ("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "sign-in redirects");
    let cookie = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("flowgate_session=") && !c.contains("Max-Age=0"))
        .expect("a session cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = http
        .get(format!("{base}/ui/pipeline"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = between(&page, "name=\"csrf\" value=\"", "\"")
        .expect("a CSRF token on the page")
        .to_owned();
    (http, cookie, csrf)
}

/// The login form's cookie and CSRF token.
pub async fn login_form(http: &reqwest::Client, base: &str) -> (String, String) {
    let r = http.get(format!("{base}/ui/login")).send().await.unwrap();
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a login cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = r.text().await.unwrap();
    let csrf = between(&page, "name=\"csrf\" value=\"", "\"")
        .unwrap()
        .to_owned();
    (cookie, csrf)
}
