//! A small W3C WebDriver client (the protocol is JSON over HTTP) for
//! Debian's `chromedriver` driving headless `chromium`.

use base64::Engine as _;
use flowgate_testkit::ChildGuard;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Debian's binaries (`apt-get install chromium chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A browser session; the driver process ends with it.
pub struct Browser {
    http: reqwest::Client,
    url: String,
    _driver: ChildGuard,
    _profile: tempfile::TempDir,
}

/// An element handle.
#[derive(Clone, Debug)]
pub struct El(String);

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session.
    pub async fn start() -> Browser {
        assert!(
            Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
            "the browser test needs Debian's chromium and chromium-driver \
             (scripts/services.sh installs them)"
        );
        let port = super::free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = ChildGuard(driver);
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = match http.get(format!("{base}/status")).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .ok()
                    .is_some_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        } } });
        let v: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .unwrap();
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {v}"))
            .to_owned();
        Browser {
            http,
            url: format!("{base}/session/{id}"),
            _driver: driver,
            _profile: profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some(b) = body {
            r = r.json(&b);
        } else if method == reqwest::Method::POST {
            r = r.json(&json!({}));
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        if v["value"]["error"].is_string() {
            panic!("webdriver {method} {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    /// Opens a URL.
    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// The current URL.
    pub async fn current_url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The first element matching a CSS selector, if any.
    pub async fn try_find(&self, css: &str) -> Option<El> {
        let r: Value = self
            .http
            .post(format!("{}/element", self.url))
            .json(&json!({ "using": "css selector", "value": css }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["value"][ELEMENT].as_str().map(|s| El(s.to_owned()))
    }

    /// The first element matching a CSS selector; panics without one.
    pub async fn find(&self, css: &str) -> El {
        match self.try_find(css).await {
            Some(e) => e,
            None => panic!("no element `{css}` on {}", self.current_url().await),
        }
    }

    /// Clicks an element.
    pub async fn click(&self, e: &El) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/click", e.0),
            None,
        )
        .await;
    }

    /// Types into an element.
    pub async fn type_into(&self, e: &El, text: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// An element's visible text.
    pub async fn text(&self, e: &El) -> String {
        self.call(
            reqwest::Method::GET,
            &format!("/element/{}/text", e.0),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// The visible text of the first element matching `css` ("" if none),
    /// read in one script (the live part of a page is replaced every
    /// second: an element found in one call may be gone by the next).
    pub async fn text_of(&self, css: &str) -> String {
        self.execute(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';",
            vec![Value::from(css)],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Waits (polling the page every 100 ms) until the text of `css`
    /// satisfies `ok`; returns it. Panics after `timeout`.
    pub async fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.text_of(css).await;
            if ok(&t) {
                return t;
            }
            if Instant::now() >= deadline {
                let page = self
                    .execute(
                        "return document.body ? document.body.innerText : '';",
                        vec![],
                    )
                    .await;
                panic!(
                    "`{css}` never got the expected text; last: {t:?}; at {}: {page}",
                    self.current_url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a script (with its `arguments`) and returns its value; a
    /// promise is awaited.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/async",
            Some(json!({
                "script": format!("const done = arguments[arguments.length - 1]; Promise.resolve((function() {{ {script} }}).apply(null, Array.from(arguments).slice(0, -1))).then(done, e => done('error: ' + e));"),
                "args": args
            })),
        )
        .await
    }

    /// Deletes every cookie (a new visitor).
    pub async fn clear_cookies(&self) {
        self.call(reqwest::Method::DELETE, "/cookie", None).await;
    }

    /// Writes a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("a base64 screenshot");
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session.
    pub async fn quit(self) {
        let _ = self.http.delete(&self.url).send().await;
    }
}
