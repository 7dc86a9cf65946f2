//! The admin web UI in a real browser: headless Chromium driven through chromedriver (the
//! W3C WebDriver protocol, spoken here over plain HTTP with serde_json), in front of a
//! running thassp with real SMTP sessions presenting public client addresses through the
//! PROXY protocol.
//!
//! The browser logs in with HTTP Basic credentials, checks the dashboard's numbers against
//! `/api/stats` and `/api/status`, adds a blacklist entry through the lists page (a new
//! connection from that address is then refused with 554), releases a greylisted triplet
//! through the greylist page (its retry is then accepted), and saves screenshots in
//! `tests/artifacts/` (`dashboard.png` is the one the README shows, copied to `docs/`).
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian packages `chromium` and
//! `chromium-driver`, installed by `.ci/run`). Without them the test prints "skipped" and
//! passes, except under `CI=true`, where it fails.

mod common;

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use common::{Client, MESSAGE, Sink, WAIT, wire};
use thassp::admin::{self, AdminConfig};
use thassp::app::App;
use thassp::config::Config;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const USER: &str = "admin";
/// URL-safe, so it can go into `http://user:password@host/` as it is.
const PASSWORD: &str = "browser-test-password";
const TOKEN: &str = "browser-test-token-0123456789";
/// Bound on one WebDriver command (a page load included).
const DRIVER_WAIT: Duration = Duration::from_secs(20);
/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Whitelisted by the configuration, so its message is delivered at once (not greylisted).
const DELIVER_FROM: &str = "198.51.100.7";
const RELAY_FROM: &str = "203.0.113.20";
const GREY_FROM: &str = "203.0.113.30";
/// Blacklisted through the lists page.
const BANNED: &str = "203.0.113.99";

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (one request per connection), for the API and for chromedriver

struct Resp {
    status: u16,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn request_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> String {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Whether `raw` holds a whole response: chromedriver keeps the connection open despite
/// `Connection: close`, so the end is found from `Content-Length` (or the last chunk).
fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    for line in head.split("\r\n").skip(1) {
        match line.split_once(':').map(|(k, v)| (k.trim(), v.trim())) {
            Some(("content-length", n)) => return n.parse().is_ok_and(|n: usize| body.len() >= n),
            Some(("transfer-encoding", v)) if v.contains("chunked") => return body.ends_with(b"0\r\n\r\n"),
            _ => {}
        }
    }
    false
}

/// Reads one response (to its end, or to EOF).
async fn read_response(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut chunk = vec![0u8; 16384];
    while !complete(&raw) {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    Ok(raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let chunked = lines.any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let p = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size");
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..p]).trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[p + 2..p + 2 + size]);
            rest = &rest[p + 4 + size..];
        }
        body = out;
    }
    Resp {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    wait: Duration,
) -> Resp {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(request_text(addr, method, path, headers, body).as_bytes())
            .await?;
        s.write_all(body).await?;
        read_response(&mut s).await
    };
    let raw = tokio::time::timeout(wait, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} at {addr}: no answer within {wait:?}"))
        .unwrap_or_else(|e| panic!("{method} {path} at {addr}: {e}"));
    parse_response(&raw)
}

/// GET on the JSON API with the bearer token; the answer must be 200.
async fn api(web: SocketAddr, path: &str) -> Value {
    let r = http(
        web,
        "GET",
        path,
        &[("Authorization", format!("Bearer {TOKEN}"))],
        b"",
        WAIT,
    )
    .await;
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

// ---------------------------------------------------------------------------------------
// WebDriver

/// chromedriver with one Chromium session. Dropping it (also on panic) ends the session,
/// which quits Chromium, and kills chromedriver; should chromedriver no longer answer, the
/// browser process it started is killed by its id.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    /// Chromium's process id, as chromedriver reports it.
    browser_pid: Option<u64>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A free loopback port (there is a short window in which another process could take it;
/// starting chromedriver is retried once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("chromedriver.log");
        let (driver, addr) = 'started: {
            let mut last = String::new();
            for _ in 0..2 {
                let port = free_port();
                let mut child = Command::new(CHROMEDRIVER)
                    .arg(format!("--port={port}"))
                    .arg(format!("--log-path={}", log.display()))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("{CHROMEDRIVER}: {e}"));
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let deadline = Instant::now() + WAIT;
                loop {
                    if let Ok(Some(exit)) = child.try_wait() {
                        last = format!("chromedriver exited: {exit}");
                        break;
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        last = "chromedriver not ready in time".into();
                        break;
                    }
                    if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), async {
                        let mut s = TcpStream::connect(addr).await?;
                        s.write_all(request_text(addr, "GET", "/status", &[], b"").as_bytes())
                            .await?;
                        read_response(&mut s).await
                    })
                    .await
                        && parse_response(&r).json()["value"]["ready"] == true
                    {
                        break 'started (child, addr);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            panic!("{last}; log: {}", read_log(&log));
        };
        let profile = dir.path().join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        // The guard first: whatever fails from here on, chromedriver is ended.
        let mut browser = Self {
            driver,
            addr,
            session: String::new(),
            browser_pid: None,
            log,
            _dir: dir,
        };
        let body = caps.to_string();
        let r = http(
            browser.addr,
            "POST",
            "/session",
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(r.status, 200, "new session: {}", r.body);
        let v = r.json();
        browser.session = v["value"]["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        browser.browser_pid = v["value"]["capabilities"]["goog:processID"].as_u64();
        browser
            .cmd(
                "POST",
                "timeouts",
                Some(json!({"pageLoad": DRIVER_WAIT.as_millis() as u64, "script": 5000, "implicit": 0})),
            )
            .await;
        browser
    }

    /// One command of the session (`path` after `/session/ID/`); returns `value`, panics on
    /// a WebDriver error.
    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        match self.try_cmd(method, path, body).await {
            Ok(v) => v,
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    async fn try_cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let r = http(
            self.addr,
            method,
            &format!("/session/{}/{path}", self.session),
            &[("Content-Type", "application/json".into())],
            body.as_bytes(),
            DRIVER_WAIT,
        )
        .await;
        let mut v = r.json();
        if r.status == 200 {
            Ok(v["value"].take())
        } else {
            Err(format!(
                "{}: {} {}",
                r.status, v["value"]["error"], v["value"]["message"]
            ))
        }
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "url", Some(json!({ "url": url }))).await;
    }

    async fn url(&self) -> String {
        self.cmd("GET", "url", None)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn find(&self, css: &str) -> Option<String> {
        self.try_cmd(
            "POST",
            "element",
            Some(json!({"using": "css selector", "value": css})),
        )
        .await
        .ok()
        .and_then(|v| v[ELEMENT].as_str().map(String::from))
    }

    async fn find_xpath(&self, xpath: &str) -> Option<String> {
        self.try_cmd("POST", "element", Some(json!({"using": "xpath", "value": xpath})))
            .await
            .ok()
            .and_then(|v| v[ELEMENT].as_str().map(String::from))
    }

    /// The element matching `css`, waiting for it (a page loading after a form post).
    async fn wait_for(&self, css: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "{css} not on {} within {WAIT:?}; the page says: {}",
                self.url().await,
                self.body_text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&self, element: &str) -> String {
        self.cmd("GET", &format!("element/{element}/text"), None)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn text_of(&self, css: &str) -> String {
        let e = self.wait_for(css).await;
        self.text(&e).await
    }

    async fn click(&self, element: &str) {
        self.cmd("POST", &format!("element/{element}/click"), Some(json!({})))
            .await;
    }

    async fn type_into(&self, element: &str, text: &str) {
        self.cmd("POST", &format!("element/{element}/clear"), Some(json!({})))
            .await;
        self.cmd(
            "POST",
            &format!("element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd("POST", "execute/sync", Some(json!({"script": js, "args": []})))
            .await
    }

    async fn body_text(&self) -> String {
        match self
            .try_cmd(
                "POST",
                "execute/sync",
                Some(json!({"script": "return document.body ? document.body.innerText : ''", "args": []})),
            )
            .await
        {
            Ok(v) => v.as_str().unwrap_or("").chars().take(2000).collect(),
            Err(e) => format!("(unreadable: {e})"),
        }
    }

    /// The rows of the table `css` as the browser renders them (cell texts).
    async fn table(&self, css: &str) -> Vec<Vec<String>> {
        self.wait_for(css).await;
        let js = format!(
            "return Array.from(document.querySelector({}).rows, \
             r => Array.from(r.cells, c => c.innerText.trim()))",
            Value::from(css)
        );
        serde_json::from_value(self.script(&js).await).unwrap()
    }

    /// A PNG of the whole page: the window is made as tall as the document first (the
    /// window's height includes what is not viewport; twice, as the layout may change).
    async fn screenshot(&self, to: &Path) -> Vec<u8> {
        for _ in 0..2 {
            let v = self
                .script(
                    "return [document.documentElement.scrollHeight, \
                     Math.max(0, window.outerHeight - window.innerHeight)]",
                )
                .await;
            let height = v[0].as_u64().unwrap_or(1000).clamp(600, 4000) + v[1].as_u64().unwrap_or(0);
            self.cmd(
                "POST",
                "window/rect",
                Some(json!({"width": 1280, "height": height})),
            )
            .await;
        }
        let b64 = self.cmd("GET", "screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("screenshot data"))
            .unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, &png).unwrap();
        png
    }
}

fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Blocking `DELETE /session/ID` (in `Drop`, where nothing can be awaited); true when
/// chromedriver confirmed.
fn delete_session(addr: SocketAddr, session: &str) -> bool {
    let run = || -> std::io::Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        let path = format!("/session/{session}");
        s.write_all(request_text(addr, "DELETE", &path, &[], b"").as_bytes())?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        while !complete(&raw) {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        Ok(raw)
    };
    run().is_ok_and(|raw| raw.starts_with(b"HTTP/1.1 200"))
}

impl Drop for Browser {
    fn drop(&mut self) {
        let ended = !self.session.is_empty() && delete_session(self.addr, &self.session);
        if !ended && let Some(pid) = self.browser_pid {
            // chromedriver did not quit the browser: end the process it started for us.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        if std::thread::panicking() {
            eprintln!("chromedriver log (last lines):\n{}", read_log(&self.log));
        }
    }
}

/// Whether Chromium and chromedriver are installed; under `CI=true` they must be.
fn browser_installed() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} missing (apt-get install chromium chromium-driver; .ci/run does)",
        missing.join(" and ")
    );
    println!(
        "skipped: {} missing (Debian packages chromium and chromium-driver)",
        missing.join(" and ")
    );
    false
}

// ---------------------------------------------------------------------------------------
// thassp and SMTP

fn config_text(upstream: SocketAddr) -> String {
    format!(
        r#"
        [server]
        hostname = "mx.thassp.test"
        shutdown_grace = "2s"
        [[listener]]
        address = "127.0.0.1:0"
        proxy_protocol = true
        proxy_trusted = ["127.0.0.0/8"]
        [smtp]
        max_errors = 50
        [upstream.main]
        address = "{upstream}"
        command_timeout = "2s"
        data_timeout = "2s"
        connect_timeout = "2s"
        [domains]
        local = ["example.com"]
        [store]
        backend = "memory"
        [events]
        url = ""
        [checks.reputation]
        enabled = false
        [checks.spf]
        enabled = false
        [checks.greylist]
        enabled = true
        by_ptr_domain = false
        [[checks.lists.whitelist]]
        name = "partners"
        ips = ["{DELIVER_FROM}"]
        "#
    )
}

fn admin_config() -> AdminConfig {
    let c = AdminConfig {
        enabled: true,
        listen: "127.0.0.1:0".into(),
        token: TOKEN.into(),
        user: USER.into(),
        // The minimum iterations keep debug-build tests fast; production hashes use more.
        password_hash: admin::hash_password(PASSWORD, admin::MIN_ITERATIONS).unwrap(),
        ..Default::default()
    };
    assert!(c.validate("admin").is_empty(), "{:?}", c.validate("admin"));
    c
}

/// Connects as `ip` through a PROXY header; returns the client and the first reply.
async fn as_client(smtp: SocketAddr, ip: &str) -> (Client, String) {
    Client::proxied(smtp, ip).await
}

/// The greylisted triplet: returns the client (after RCPT) and the RCPT reply.
async fn grey_attempt(smtp: SocketAddr) -> (Client, String) {
    let (mut c, first) = as_client(smtp, GREY_FROM).await;
    assert!(first.starts_with("220 "), "{first}");
    assert!(c.cmd("EHLO client.example.net").await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<news@sender.example>").await.starts_with("250"));
    let r = c.cmd("RCPT TO:<bob@example.com>").await;
    (c, r)
}

/// Waits until the event log has written at least `rows` rows.
async fn written(app: &App, rows: u64) {
    let deadline = Instant::now() + WAIT;
    while app.events().written() < rows {
        assert!(
            Instant::now() < deadline,
            "event log: {:?}",
            app.events().status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The dashboard against the API

/// Loads the dashboard and checks its numbers against `/api/stats?since=1d` (the period the
/// dashboard shows by default) and `/api/status`.
async fn check_dashboard(b: &Browser, web: SocketAddr) {
    let stats = api(web, "/api/stats?since=1d").await;
    let status = api(web, "/api/status").await;
    b.goto(&format!("http://{web}/")).await;
    let number = async |css: &str| -> u64 {
        let t = b.text_of(css).await;
        t.trim().parse().unwrap_or_else(|_| panic!("{css}: {t:?}"))
    };
    let count = |category: &str| {
        stats["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["category"] == category)
            .and_then(|o| o["count"].as_u64())
            .unwrap_or(0)
    };
    let attempts = stats["totals"]["attempts"].as_u64().unwrap();
    let since_start: u64 = status["since_start"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(number("#attempts").await, attempts, "attempts; stats: {stats}");
    assert_eq!(since_start, attempts, "live counters and event log disagree");
    assert_eq!(number("#delivered").await, count("delivered"), "delivered");
    assert_eq!(
        number("#sessions").await,
        status["counters"]["sessions"].as_u64().unwrap(),
        "connections"
    );
    let summary = format!(
        "{} attempts, {} connections, {} transactions.",
        stats["totals"]["attempts"], stats["totals"]["connections"], stats["totals"]["transactions"]
    );
    let page = b.body_text().await;
    assert!(
        page.contains(&summary),
        "{summary:?} not on the dashboard: {page}"
    );

    // The outcome table (the first `#outcomes`: the period's, from the event log).
    let rows = b.table("#outcomes").await;
    assert_eq!(rows[0][..3], ["category", "attempts", "percent"], "{rows:?}");
    let shown: Vec<(String, u64, String)> = rows[1..rows.len() - 1]
        .iter()
        .map(|r| (r[0].clone(), r[1].parse().unwrap(), r[2].clone()))
        .collect();
    let expected: Vec<(String, u64, String)> = stats["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["category"].as_str().unwrap().to_string(),
                o["count"].as_u64().unwrap(),
                format!("{:.1} %", o["percent"].as_f64().unwrap()),
            )
        })
        .collect();
    assert_eq!(shown, expected, "outcome table vs /api/stats");
    let total = rows.last().unwrap();
    assert_eq!(
        (total[0].as_str(), total[1].parse::<u64>().unwrap()),
        ("total", attempts)
    );
    // The chart and the upstream table are there too.
    assert!(b.find("#daily").await.is_some(), "no chart");
    assert!(b.find("#hourly").await.is_some(), "no traffic-per-hour chart");
    let upstreams = b.table("#upstreams").await;
    assert!(
        upstreams.iter().any(|r| r[0] == "main" && r[2] == "up"),
        "{upstreams:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The test

#[test]
fn admin_ui_in_headless_chromium() {
    if !browser_installed() {
        return;
    }
    // A debug build's async frames are large, and a stack overflow aborts the process
    // without running the guard that ends the browser: the scenario gets a roomy stack.
    let run = std::thread::Builder::new()
        .name("browser".into())
        .stack_size(16 << 20)
        .spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(scenario());
        })
        .unwrap()
        .join();
    if let Err(panic) = run {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario() {
    let started = Instant::now();
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::from_toml(&config_text(sink.addr), "test").unwrap_or_else(|e| panic!("{e}"));
    config.events.url = format!("sqlite://{}/events.db", dir.path().display());
    config.events.flush_interval = Duration::from_millis(50);
    let running = common::start(config).await;
    let smtp = running.smtp_addrs[0];
    let stop = CancellationToken::new();
    let handle = admin::start(running.app().clone(), &admin_config(), None, stop.clone())
        .await
        .unwrap();
    let web = handle.web_addr.unwrap();

    // Traffic: a delivered message, a relay attempt, a greylisted triplet.
    let (mut c, first) = as_client(smtp, DELIVER_FROM).await;
    assert!(first.starts_with("220 "), "{first}");
    let r = c
        .send_mail("alice@partner.example", &["bob@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;
    let (mut c, first) = as_client(smtp, RELAY_FROM).await;
    assert!(first.starts_with("220 "), "{first}");
    assert!(c.cmd("EHLO client.example.net").await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<spammer@example.net>").await.starts_with("250"));
    let r = c.cmd("RCPT TO:<victim@elsewhere.example>").await;
    assert!(r.starts_with("550"), "{r}");
    c.cmd("QUIT").await;
    let (mut c, r) = grey_attempt(smtp).await;
    assert!(r.starts_with("451 4.7.1"), "{r}");
    c.cmd("QUIT").await;
    // Three transactions and their three connections.
    written(running.app(), 6).await;
    assert_eq!(sink.deliveries().len(), 1);

    let b = Browser::start().await;
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");

    // Without credentials: nothing of the dashboard (headless Chromium answers the 401's
    // Basic challenge with an empty page, as if its login dialog were open).
    b.goto(&format!("http://{web}/")).await;
    assert!(
        b.find("#attempts").await.is_none(),
        "dashboard without credentials"
    );
    assert!(!b.body_text().await.contains("Dashboard"));

    // Log in (Basic credentials in the URL; the browser keeps them for the origin).
    b.goto(&format!("http://{USER}:{PASSWORD}@{web}/")).await;
    b.wait_for("#attempts").await;
    let title = b.cmd("GET", "title", None).await;
    assert_eq!(title, "Dashboard · thassp");
    check_dashboard(&b, web).await;
    let stats = api(web, "/api/stats?since=1d").await;
    assert_eq!(stats["totals"]["attempts"], 3, "{stats}");

    // Blacklist an address through the lists page; a new connection from it is refused.
    let (mut c, first) = as_client(smtp, BANNED).await;
    assert!(first.starts_with("220 "), "{first}");
    c.cmd("QUIT").await;
    b.goto(&format!("http://{web}/ui/lists")).await;
    let option = b
        .wait_for("#add-entry select[name=list] option[value=black]")
        .await;
    b.click(&option).await;
    let entry = b.wait_for("#add-entry input[name=entry]").await;
    b.type_into(&entry, BANNED).await;
    let note = b.wait_for("#add-entry input[name=note]").await;
    b.type_into(&note, "added in the browser").await;
    let add = b.wait_for("#add-entry button").await;
    b.click(&add).await;
    let msg = b.text_of("#msg").await;
    assert_eq!(msg, format!("{BANNED} added to the blacklist"));
    assert!(b.find("#err").await.is_none());
    let entries = b.table("#entries").await;
    assert!(
        entries
            .iter()
            .any(|r| r[0] == "black" && r[1] == BANNED && r[3] == "added in the browser"),
        "{entries:?}"
    );
    b.screenshot(&artifacts.join("lists.png")).await;
    let (mut c, first) = as_client(smtp, BANNED).await;
    assert!(first.starts_with("554 "), "{first}");
    assert!(c.closed().await);
    let lists = api(web, "/api/lists?list=black").await;
    assert_eq!(lists["entries"][0]["entry"], BANNED, "{lists}");

    // Release the greylisted triplet through the greylist page; its retry is accepted.
    let (mut c, r) = grey_attempt(smtp).await;
    assert!(r.starts_with("451"), "an early retry is still greylisted: {r}");
    c.cmd("QUIT").await;
    b.goto(&format!("http://{web}/ui/greylist")).await;
    let grey = b.table("#greylist").await;
    let row = grey
        .iter()
        .find(|r| r[1] == "news@sender.example")
        .unwrap_or_else(|| panic!("{grey:?}"));
    assert_eq!(row[2], "bob@example.com");
    assert_ne!(row[4], "now", "retry in: {row:?}");
    let release = b
        .find_xpath(
            "//table[@id='greylist']//tr[td[2]='news@sender.example']\
             //form[@action='/ui/greylist/release']/button",
        )
        .await
        .expect("a Release button");
    b.click(&release).await;
    let msg = b.text_of("#msg").await;
    assert!(
        msg.starts_with("released: news@sender.example → bob@example.com"),
        "{msg}"
    );
    let grey = b.table("#greylist").await;
    assert!(
        grey.iter()
            .any(|r| r[1] == "news@sender.example" && r[4] == "now"),
        "{grey:?}"
    );
    b.screenshot(&artifacts.join("greylist.png")).await;
    let (mut c, r) = grey_attempt(smtp).await;
    assert!(r.starts_with("250"), "after the release: {r}");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    let r = c.reply().await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;
    assert_eq!(sink.deliveries().len(), 2);

    // The dashboard follows: the blacklisted connection and the second delivery counted.
    let deadline = Instant::now() + WAIT;
    loop {
        let s = api(web, "/api/stats?since=1d").await;
        let live: u64 = api(web, "/api/status").await["since_start"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["count"].as_u64().unwrap())
            .sum();
        // Before: 3; then the control connection from the banned address (no transaction:
        // other), the early retry (greylisted), the refused connection (blacklist) and the
        // accepted retry (delivered).
        if s["totals"]["attempts"] == 7 && live == 7 {
            break;
        }
        assert!(Instant::now() < deadline, "stats did not follow: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_dashboard(&b, web).await;
    let rows = b.table("#outcomes").await;
    for category in ["delivered", "relay_attempt", "greylisted", "blacklist"] {
        assert!(rows.iter().any(|r| r[0] == category), "{category}: {rows:?}");
    }
    let png = b.screenshot(&artifacts.join("dashboard.png")).await;
    println!(
        "dashboard screenshot: {} ({} bytes); browser test took {:.1}s",
        artifacts.join("dashboard.png").display(),
        png.len(),
        started.elapsed().as_secs_f64()
    );

    drop(b);
    stop.cancel();
    tokio::time::timeout(WAIT, handle.stopped()).await.unwrap();
    running.shutdown().await;
}
