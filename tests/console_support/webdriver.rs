//! A small W3C WebDriver client (the protocol is JSON over HTTP) for
//! Debian's `chromedriver` driving headless `chromium`.

use base64::Engine as _;
use flowgate_testkit::ChildGuard;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// The longest a step waits for what it needs (an element, a text, a
/// page): generous, as the test shares two cores with builds and suites.
pub const STEP: Duration = Duration::from_secs(60);
/// How often a waiting step looks at the page again.
const POLL: Duration = Duration::from_millis(100);
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
        let deadline = Instant::now() + STEP;
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

    /// One WebDriver command; a failure (no answer, or the driver's error
    /// object) is `Err` naming the command and the error.
    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut r = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some(b) = body {
            r = r.json(&b);
        } else if method == reqwest::Method::POST {
            r = r.json(&json!({}));
        }
        let what = format!("{method} {path}");
        let v: Value = r
            .send()
            .await
            .map_err(|e| format!("{what}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        match v["value"]["error"].as_str() {
            Some(e) => Err(format!(
                "{what}: {e}: {}",
                v["value"]["message"].as_str().unwrap_or_default()
            )),
            None => Ok(v["value"].clone()),
        }
    }

    /// Retries `probe` until it yields a value, for at most [`STEP`]:
    /// `Ok(None)` is "not yet", and an `Err` too (a page being replaced
    /// makes element and script calls fail: stale elements, a document
    /// unloaded under a script). Panics after that naming `step`, with the
    /// last answer, the URL and the page's text.
    pub async fn wait_for<T, F, Fut>(&self, step: &str, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, String>>,
    {
        let deadline = Instant::now() + STEP;
        loop {
            let last = match probe().await {
                Ok(Some(v)) => return v,
                Ok(None) => "the condition did not hold yet".to_owned(),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let url = self
                    .try_call(reqwest::Method::GET, "/url", None)
                    .await
                    .unwrap_or_default();
                let page = self
                    .try_execute(
                        "return document.body ? document.body.innerText : '';",
                        vec![],
                    )
                    .await
                    .unwrap_or_default();
                panic!("step `{step}`: not done within {STEP:?}; last: {last}; at {url}: {page}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Opens a URL (the driver answers once it has loaded).
    pub async fn goto(&self, url: &str) {
        self.wait_for(&format!("open {url}"), || async {
            self.try_call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
                .await
                .map(Some)
        })
        .await;
    }

    /// Waits until the current URL satisfies `ok`; returns it.
    pub async fn wait_url(&self, step: &str, ok: impl Fn(&str) -> bool) -> String {
        self.wait_for(step, || async {
            let v = self.try_call(reqwest::Method::GET, "/url", None).await?;
            let u = v.as_str().unwrap_or_default();
            Ok(ok(u).then(|| u.to_owned()))
        })
        .await
    }

    /// The first element matching a CSS selector, if any.
    async fn try_find(&self, css: &str) -> Result<Option<El>, String> {
        match self
            .try_call(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await
        {
            Ok(v) => Ok(v[ELEMENT].as_str().map(|s| El(s.to_owned()))),
            Err(e) if e.contains("no such element") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The first element matching `css` once it is shown and enabled.
    async fn ready(&self, css: &str) -> Result<Option<El>, String> {
        let Some(e) = self.try_find(css).await? else {
            return Ok(None);
        };
        let shown = self
            .try_call(
                reqwest::Method::GET,
                &format!("/element/{}/displayed", e.0),
                None,
            )
            .await?;
        let enabled = self
            .try_call(
                reqwest::Method::GET,
                &format!("/element/{}/enabled", e.0),
                None,
            )
            .await?;
        Ok((shown == json!(true) && enabled == json!(true)).then_some(e))
    }

    /// Waits for the element `css` to be shown and enabled, then clicks it
    /// (again if the page replaced it meanwhile). `step` names it in a
    /// failure.
    pub async fn click_on(&self, step: &str, css: &str) {
        self.wait_for(&format!("{step} (click `{css}`)"), || async {
            let Some(e) = self.ready(css).await? else {
                return Ok(None);
            };
            self.try_call(
                reqwest::Method::POST,
                &format!("/element/{}/click", e.0),
                None,
            )
            .await
            .map(Some)
        })
        .await;
    }

    /// Waits for the field `css`, clears it and types `text` into it.
    pub async fn type_in(&self, step: &str, css: &str, text: &str) {
        self.wait_for(&format!("{step} (type into `{css}`)"), || async {
            let Some(e) = self.ready(css).await? else {
                return Ok(None);
            };
            self.try_call(
                reqwest::Method::POST,
                &format!("/element/{}/clear", e.0),
                None,
            )
            .await?;
            self.try_call(
                reqwest::Method::POST,
                &format!("/element/{}/value", e.0),
                Some(json!({ "text": text })),
            )
            .await
            .map(Some)
        })
        .await;
    }

    /// The visible text of the first element matching `css` ("" if none),
    /// read in one script (the live part of a page is replaced every
    /// second: an element found in one call may be gone by the next).
    async fn try_text_of(&self, css: &str) -> Result<String, String> {
        Ok(self
            .try_execute(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';",
                vec![Value::from(css)],
            )
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Waits until the text of `css` satisfies `ok`; returns it. `step`
    /// names the wait in a failure.
    pub async fn wait_text(&self, step: &str, css: &str, ok: impl Fn(&str) -> bool) -> String {
        self.wait_for(&format!("{step} (`{css}`)"), || async {
            let t = self.try_text_of(css).await?;
            Ok(ok(&t).then_some(t))
        })
        .await
    }

    /// Runs a script (with its `arguments`) and returns its value; a
    /// promise is awaited; a thrown error is `Err`.
    async fn try_execute(&self, script: &str, args: Vec<Value>) -> Result<Value, String> {
        let v = self
            .try_call(
                reqwest::Method::POST,
                "/execute/async",
                Some(json!({
                    "script": format!("const done = arguments[arguments.length - 1]; Promise.resolve((function() {{ {script} }}).apply(null, Array.from(arguments).slice(0, -1))).then(v => done({{ ok: v }}), e => done({{ err: String(e) }}));"),
                    "args": args
                })),
            )
            .await?;
        match v.get("err") {
            Some(e) => Err(format!("script: {e}")),
            None => Ok(v["ok"].clone()),
        }
    }

    /// Runs a script once it runs to its end on the current page (see
    /// [`wait_for`](Self::wait_for)); returns its value.
    pub async fn execute(&self, step: &str, script: &str, args: Vec<Value>) -> Value {
        self.wait_for(step, || async {
            self.try_execute(script, args.clone()).await.map(Some)
        })
        .await
    }

    /// Deletes every cookie (a new visitor).
    pub async fn clear_cookies(&self) {
        self.wait_for("delete the cookies", || async {
            self.try_call(reqwest::Method::DELETE, "/cookie", None)
                .await
                .map(Some)
        })
        .await;
    }

    /// Writes a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self
            .wait_for(&format!("screenshot {}", path.display()), || async {
                self.try_call(reqwest::Method::GET, "/screenshot", None)
                    .await
                    .map(Some)
            })
            .await;
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
