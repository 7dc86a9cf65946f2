//! The admin interfaces over real sockets: the web API and UI (HTTP on 127.0.0.1:0, spoken
//! by a tiny HTTP/1.1 client here), the line console (TCP), and `/metrics`, in front of a
//! running thassp with real SMTP sessions.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use common::{Client, MESSAGE, Sink, WAIT, wire};
use thassp::admin::{self, AdminConfig, AdminHandle};
use thassp::app::App;
use thassp::config::Config;
use thassp::server::Running;
use thassp::store::Ns;

const TOKEN: &str = "test-token-0123456789abcdef";
const PASSWORD: &str = "correct horse battery";

// ---------------------------------------------------------------------------------------
// Harness

struct Admin {
    running: Running,
    sink: Sink,
    handle: AdminHandle,
    stop: CancellationToken,
    web: SocketAddr,
    console: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Admin {
    fn app(&self) -> &Arc<App> {
        self.running.app()
    }

    fn smtp(&self) -> SocketAddr {
        self.running.smtp_addrs[0]
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.handle.stopped()).await.unwrap();
        self.running.shutdown().await;
    }
}

fn admin_config(tweak: impl FnOnce(&mut AdminConfig)) -> AdminConfig {
    let mut c = AdminConfig {
        enabled: true,
        listen: "127.0.0.1:0".into(),
        console_listen: "127.0.0.1:0".into(),
        token: TOKEN.into(),
        user: "admin".into(),
        // The minimum iterations keep debug-build tests fast; production hashes use more.
        password_hash: admin::hash_password(PASSWORD, admin::MIN_ITERATIONS).unwrap(),
        max_auth_failures: 3,
        ..Default::default()
    };
    tweak(&mut c);
    assert!(c.validate("admin").is_empty(), "{:?}", c.validate("admin"));
    c
}

/// thassp in front of a sink, with the event log in a temporary SQLite file, the admin
/// servers started with `admin`, and reloads reading `config_file` when given.
async fn start(extra: &str, tweak_config: impl FnOnce(&mut Config), admin: AdminConfig) -> Admin {
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(sink.addr, "max_errors = 50", extra);
    config.events.url = format!("sqlite://{}/events.db", dir.path().display());
    config.events.flush_interval = Duration::from_millis(50);
    tweak_config(&mut config);
    start_with(sink, dir, config, admin, None).await
}

async fn start_with(
    sink: Sink,
    dir: tempfile::TempDir,
    config: Config,
    admin: AdminConfig,
    path: Option<std::path::PathBuf>,
) -> Admin {
    let running = common::start(config).await;
    let stop = CancellationToken::new();
    let handle = admin::start(running.app().clone(), &admin, path, stop.clone())
        .await
        .unwrap();
    let web = handle.web_addr.unwrap();
    let console = handle.console_addr.unwrap();
    Admin {
        running,
        sink,
        handle,
        stop,
        web,
        console,
        _dir: dir,
    }
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (one request per connection)

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {TOKEN}"))
}

fn basic(user: &str, password: &str) -> (&'static str, String) {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    ("Authorization", format!("Basic {b}"))
}

async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Resp {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let p = rest.windows(2).position(|w| w == b"\r\n").unwrap();
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
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Resp {
    http(addr, "GET", path, &[bearer()], b"").await
}

async fn post_json(addr: SocketAddr, path: &str, body: serde_json::Value) -> Resp {
    http(
        addr,
        "POST",
        path,
        &[bearer(), ("Content-Type", "application/json".into())],
        body.to_string().as_bytes(),
    )
    .await
}

async fn delete(addr: SocketAddr, path: &str) -> Resp {
    http(addr, "DELETE", path, &[bearer()], b"").await
}

// ---------------------------------------------------------------------------------------
// A console client

struct Console {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Console {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Everything up to and including `marker` (or up to EOF), as text.
    async fn until(&mut self, marker: &str) -> String {
        loop {
            if let Some(p) = self
                .buf
                .windows(marker.len())
                .position(|w| w == marker.as_bytes())
            {
                let out: Vec<u8> = self.buf.drain(..p + marker.len()).collect();
                return String::from_utf8_lossy(&out).into_owned();
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no {marker:?} in time; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    )
                })
                .unwrap_or(0);
            if n == 0 {
                return String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }

    /// Logs in with `secret` and returns what followed the password prompt.
    async fn login(addr: SocketAddr, secret: &str) -> Self {
        let mut c = Self::connect(addr).await;
        c.until("password: ").await;
        c.send(secret).await;
        let r = c.until("thassp> ").await;
        assert!(r.contains("welcome"), "{r}");
        c
    }

    /// Runs a command and returns its answer (without the prompt).
    async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.until("thassp> ")
            .await
            .trim_end_matches("thassp> ")
            .to_string()
    }

    async fn closed(&mut self) -> bool {
        let rest = self.until("\u{0}never\u{0}").await;
        !rest.contains("thassp> ")
    }
}

// ---------------------------------------------------------------------------------------
// SMTP helpers

async fn deliver(addr: SocketAddr, from: &str, to: &str) {
    let mut c = Client::greeted(addr).await;
    let r = c.send_mail(from, &[to], &wire(MESSAGE)).await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;
}

async fn relay_attempt(addr: SocketAddr) {
    let mut c = Client::greeted(addr).await;
    assert!(c.cmd("EHLO client.example.net").await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<spammer@example.net>").await.starts_with("250"));
    let r = c.cmd("RCPT TO:<victim@elsewhere.example>").await;
    assert!(r.starts_with("550"), "{r}");
    c.cmd("QUIT").await;
}

/// Waits until the event log has written at least `rows` rows.
async fn written(app: &Arc<App>, rows: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.events().written() < rows {
        assert!(
            tokio::time::Instant::now() < deadline,
            "event log: {:?}",
            app.events().status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn web_auth_is_required_and_rate_limited() {
    let a = start("", |_| {}, admin_config(|_| {})).await;
    let r = http(a.web, "GET", "/health", &[], b"").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));

    let r = http(a.web, "GET", "/api/status", &[], b"").await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    assert!(r.json()["error"].is_string());
    assert_eq!(http(a.web, "GET", "/metrics", &[], b"").await.status, 401);
    assert_eq!(http(a.web, "GET", "/", &[], b"").await.status, 401);

    assert_eq!(get(a.web, "/api/status").await.status, 200);
    let ok = http(a.web, "GET", "/api/status", &[basic("admin", PASSWORD)], b"").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.header("cache-control"), Some("no-store"));

    // Three wrong credentials (max_auth_failures = 3), then even the right ones get 429.
    for creds in [
        basic("admin", "wrong"),
        basic("root", PASSWORD),
        ("Authorization", "Bearer nope".to_string()),
    ] {
        let r = http(a.web, "GET", "/api/status", &[creds], b"").await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let r = get(a.web, "/api/status").await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("60"));
    // The console shares the limit.
    let mut c = Console::connect(a.console).await;
    assert!(c.until("\n").await.contains("too many failed logins"));
    // Health stays open.
    assert_eq!(http(a.web, "GET", "/health", &[], b"").await.status, 200);
    a.stop().await;
}

#[tokio::test]
async fn cross_site_form_posts_are_refused() {
    let a = start("", |_| {}, admin_config(|_| {})).await;
    let form = b"list=black&entry=192.0.2.1&note=";
    let ct = ("Content-Type", "application/x-www-form-urlencoded".to_string());
    let r = http(
        a.web,
        "POST",
        "/ui/lists/add",
        &[
            basic("admin", PASSWORD),
            ct.clone(),
            ("Origin", "https://evil.example".into()),
        ],
        form,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        a.app()
            .store()
            .get(Ns::List, "black:192.0.2.1")
            .await
            .unwrap()
            .is_none()
    );
    let r = http(
        a.web,
        "POST",
        "/ui/lists/add",
        &[
            basic("admin", PASSWORD),
            ct,
            ("Origin", format!("http://{}", a.web)),
        ],
        form,
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(r.header("location").unwrap().starts_with("/ui/lists?msg="));
    assert!(
        a.app()
            .store()
            .get(Ns::List, "black:192.0.2.1")
            .await
            .unwrap()
            .is_some()
    );
    let page = http(
        a.web,
        "GET",
        "/ui/lists?msg=added",
        &[basic("admin", PASSWORD)],
        b"",
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("192.0.2.1") && page.body.contains("id=\"msg\""),
        "{}",
        page.body
    );
    a.stop().await;
}

#[tokio::test]
async fn status_stats_events_and_dashboard_after_real_sessions() {
    let a = start("", |_| {}, admin_config(|_| {})).await;
    deliver(a.smtp(), "alice@example.net", "bob@example.com").await;
    deliver(a.smtp(), "carol@other.example", "bob@example.com").await;
    relay_attempt(a.smtp()).await;
    // Two delivered transactions + their connections, a relay-attempt transaction + its
    // connection: six rows.
    written(a.app(), 6).await;
    assert_eq!(a.sink.deliveries().len(), 2);

    let s = get(a.web, "/api/status").await.json();
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["counters"]["sessions"], 3);
    assert_eq!(s["upstreams"][0]["name"], "main");
    assert_eq!(s["upstreams"][0]["healthy"], true);
    assert_eq!(s["store"]["backend"], "memory");
    assert_eq!(s["events"]["enabled"], true);
    assert!(s["sessions"].is_array());

    let st = get(a.web, "/api/stats?since=1d").await;
    assert_eq!(st.status, 200, "{}", st.body);
    let st = st.json();
    let outcomes = st["outcomes"].as_array().unwrap();
    let count = |c: &str| {
        outcomes
            .iter()
            .find(|o| o["category"] == c)
            .and_then(|o| o["count"].as_u64())
            .unwrap_or(0)
    };
    assert_eq!((count("delivered"), count("relay_attempt")), (2, 1), "{st}");
    assert_eq!(st["totals"]["attempts"], 3);
    assert_eq!(st["daily"].as_array().unwrap().len(), 1);
    assert_eq!(st["top_clients"][0]["name"], "127.0.0.1");
    let bad = get(a.web, "/api/stats?since=banana").await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("banana"));
    assert_eq!(get(a.web, "/api/stats?category=nonsense").await.status, 400);

    let ev = get(a.web, "/api/events?sender=carol@other.example").await.json();
    let items = ev["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{ev}");
    assert_eq!(items[0]["type"], "transaction");
    assert!(
        items[0]["recipients"][0]["address"]
            .as_str()
            .unwrap()
            .contains("bob@example.com")
    );
    assert_eq!(items[0]["outcome"], "delivered");
    // Paging: one per page, newest first, then the next with the cursor.
    let p1 = get(a.web, "/api/events?limit=1").await.json();
    assert_eq!(p1["items"].as_array().unwrap().len(), 1);
    assert_eq!(p1["items"][0]["outcome"], "relay_attempt");
    let p2 = get(a.web, "/api/events?limit=1&offset=1").await.json();
    assert_eq!(p2["items"][0]["outcome"], "delivered");
    assert!(p1["next_before"].is_string());
    let conns = get(a.web, "/api/events?kind=connections&client=127.0.0.1")
        .await
        .json();
    assert_eq!(conns["items"].as_array().unwrap().len(), 3, "{conns}");
    assert_eq!(
        get(a.web, "/api/events?kind=connections&sender=x@y").await.status,
        400
    );

    let dash = http(a.web, "GET", "/?since=1d", &[basic("admin", PASSWORD)], b"").await;
    assert_eq!(dash.status, 200);
    assert!(dash.header("content-type").unwrap().starts_with("text/html"));
    for needle in [
        "id=\"outcomes\"",
        "relay_attempt",
        "<svg id=\"daily\"",
        "id=\"upstreams\"",
        "66.7 %",
    ] {
        assert!(dash.body.contains(needle), "{needle} missing from the dashboard");
    }
    for path in [
        "/ui/events",
        "/ui/lists",
        "/ui/greylist",
        "/ui/blocks",
        "/ui/config",
    ] {
        let r = http(a.web, "GET", path, &[basic("admin", PASSWORD)], b"").await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let evp = http(
        a.web,
        "GET",
        "/ui/events?sender=carol@other.example",
        &[basic("admin", PASSWORD)],
        b"",
    )
    .await;
    assert!(evp.body.contains("carol@other.example"));

    let mut c = Console::login(a.console, TOKEN).await;
    let stats = c.cmd("stats 1d").await;
    assert!(stats.contains("delivered") && stats.contains("66.7 %"), "{stats}");
    let status = c.cmd("status").await;
    assert!(
        status.contains("upstream main") && status.contains("connections 3"),
        "{status}"
    );
    let events = c.cmd("events 5").await;
    assert!(events.contains("<carol@other.example>"), "{events}");
    a.stop().await;
}

#[tokio::test]
async fn list_entries_are_persisted_in_the_store() {
    let a = start("", |_| {}, admin_config(|_| {})).await;
    let r = post_json(
        a.web,
        "/api/lists",
        serde_json::json!({"list": "black", "entry": " 192.0.2.77/24 ", "note": "spam run"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["entry"]["entry"], "192.0.2.0/24");
    let stored = a
        .app()
        .store()
        .get(Ns::List, "black:192.0.2.0/24")
        .await
        .unwrap()
        .unwrap();
    assert!(stored.value.contains("spam run"));
    // Adding it again is no error and creates nothing new.
    let again = post_json(
        a.web,
        "/api/lists",
        serde_json::json!({"list": "black", "entry": "192.0.2.0/24"}),
    )
    .await;
    assert_eq!(again.status, 200);

    let bad = post_json(
        a.web,
        "/api/lists",
        serde_json::json!({"list": "black", "entry": "300.1.2.3"}),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("300.1.2.3"));
    assert_eq!(
        post_json(
            a.web,
            "/api/lists",
            serde_json::json!({"list": "grey", "entry": "a.example"})
        )
        .await
        .status,
        400
    );
    let junk = http(a.web, "POST", "/api/lists", &[bearer()], b"{not json").await;
    assert_eq!(junk.status, 400);
    assert!(junk.json()["error"].is_string());

    let l = get(a.web, "/api/lists?list=black").await.json();
    assert_eq!(l["entries"][0]["kind"], "ip");
    assert_eq!(l["entries"][0]["note"], "spam run");

    // The console sees and changes the same entries.
    let mut c = Console::login(a.console, &format!("admin {PASSWORD}")).await;
    let r = c.cmd("list add white Partner.Example").await;
    assert!(r.contains("partner.example added to the whitelist"), "{r}");
    let show = c.cmd("list show").await;
    assert!(
        show.contains("white partner.example") && show.contains("black 192.0.2.0/24  # spam run"),
        "{show}"
    );
    assert!(c.cmd("list add purple x.example").await.starts_with("error:"));
    let lists = thassp::service::admin_list_entries(a.app().store().as_ref())
        .await
        .unwrap();
    assert_eq!(lists.white, vec!["partner.example".to_string()]);
    assert_eq!(lists.black, vec!["192.0.2.0/24".to_string()]);
    let r = c.cmd("list remove white partner.example").await;
    assert!(r.contains("removed"), "{r}");

    let r = delete(a.web, "/api/lists?list=black&entry=192.0.2.0%2F24").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        a.app()
            .store()
            .get(Ns::List, "black:192.0.2.0/24")
            .await
            .unwrap()
            .is_none()
    );
    let r = delete(a.web, "/api/lists?list=black&entry=192.0.2.0%2F24").await;
    assert_eq!(r.status, 404);
    assert!(
        get(a.web, "/api/lists").await.json()["entries"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    a.stop().await;
}

#[tokio::test]
async fn greylist_release_lets_the_triplet_through() {
    let a = start(
        "[checks.greylist]\nenabled = true\nby_ptr_domain = false",
        |_| {},
        admin_config(|_| {}),
    )
    .await;
    let attempt = async |smtp: SocketAddr| {
        let mut c = Client::greeted(smtp).await;
        assert!(c.cmd("EHLO client.example.net").await.starts_with("250"));
        assert!(c.cmd("MAIL FROM:<news@sender.example>").await.starts_with("250"));
        let r = c.cmd("RCPT TO:<bob@example.com>").await;
        (c, r)
    };
    let (mut c, r) = attempt(a.smtp()).await;
    assert!(r.starts_with("451 4.7.1"), "{r}");
    c.cmd("QUIT").await;
    // A second triplet from the same network, for the console below (after the release, the
    // network is auto-whitelisted and would not be greylisted any more).
    let mut c = Client::greeted(a.smtp()).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<other@unknown.example>").await;
    assert!(c.cmd("RCPT TO:<bob@example.com>").await.starts_with("451"));
    c.cmd("QUIT").await;

    let g = get(a.web, "/api/greylist?q=sender.example").await.json();
    let entries = g["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{g}");
    let key = entries[0]["key"].as_str().unwrap().to_string();
    assert_eq!(key, "n:127.0.0.0/24|news@sender.example|bob@example.com");
    assert!(entries[0]["retry_in_secs"].as_u64().unwrap() > 0);
    assert!(
        get(a.web, "/api/greylist?q=nothing-like-this").await.json()["entries"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Still greylisted on an early retry, until released.
    let (mut c, r) = attempt(a.smtp()).await;
    assert!(r.starts_with("451"), "{r}");
    c.cmd("QUIT").await;
    let r = post_json(a.web, "/api/greylist/release", serde_json::json!({"key": key})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["retry_in_secs"], 0);
    let (mut c, r) = attempt(a.smtp()).await;
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250"));
    c.cmd("QUIT").await;
    assert_eq!(a.sink.deliveries().len(), 1);

    let missing = post_json(
        a.web,
        "/api/greylist/release",
        serde_json::json!({"key": "n:nope|a|b"}),
    )
    .await;
    assert_eq!(missing.status, 404);

    // The second triplet through the console: listed, then deleted.
    let mut con = Console::login(a.console, TOKEN).await;
    let list = con.cmd("grey list unknown.example").await;
    let key2 = "n:127.0.0.0/24|other@unknown.example|bob@example.com";
    assert!(list.contains(key2), "{list}");
    assert!(con.cmd(&format!("grey delete {key2}")).await.contains("deleted"));
    assert!(
        con.cmd("grey list unknown.example")
            .await
            .contains("no greylist entries")
    );
    assert!(
        delete(a.web, &format!("/api/greylist?key={}", "n:x|y|z"))
            .await
            .status
            == 404
    );
    a.stop().await;
}

#[tokio::test]
async fn blocks_and_tarpit_list_and_clear() {
    let a = start("", |_| {}, admin_config(|_| {})).await;
    let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let rep = a.app().snapshot().reputation.clone().unwrap();
    for _ in 0..3 {
        rep.record_failure(ip).await.unwrap();
    }
    rep.block(ip, "trap:trap@example.com", Duration::from_secs(3600))
        .await
        .unwrap();

    // Blocked: refused at connect (or at MAIL, when AUTH could still exempt it).
    let blocked = async |smtp: SocketAddr| {
        let mut c = Client::connect(smtp).await;
        let banner = c.reply().await;
        if banner.starts_with('5') {
            return true;
        }
        c.cmd("EHLO client.example.net").await;
        c.cmd("MAIL FROM:<a@example.net>").await.starts_with('5')
    };
    assert!(blocked(a.smtp()).await);

    let b = get(a.web, "/api/blocks").await.json();
    assert_eq!(b["entries"][0]["key"], "127.0.0.1", "{b}");
    assert_eq!(b["entries"][0]["reason"], "trap:trap@example.com");
    let t = get(a.web, "/api/tarpit").await.json();
    assert_eq!(t["entries"][0]["key"], "127.0.0.1", "{t}");
    assert_eq!(t["entries"][0]["failures"], 3);

    let mut c = Console::login(a.console, PASSWORD).await;
    let list = c.cmd("block list").await;
    assert!(list.contains("127.0.0.1  trap:trap@example.com"), "{list}");
    assert!(c.cmd("tarpit list").await.contains("127.0.0.1  failures 3"));
    assert!(c.cmd("block remove not-an-ip").await.starts_with("error:"));
    let r = c.cmd("block remove 127.0.0.1").await;
    assert!(r.contains("unblocked 127.0.0.1"), "{r}");
    assert!(!blocked(a.smtp()).await);
    // Unblocking cleared the failures too, so the next failure does not block again.
    assert!(
        get(a.web, "/api/tarpit").await.json()["entries"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(delete(a.web, "/api/blocks?client=127.0.0.1").await.status, 404);

    rep.record_failure(ip).await.unwrap();
    let r = delete(a.web, "/api/tarpit?client=127.0.0.1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(delete(a.web, "/api/tarpit?client=127.0.0.1").await.status, 404);
    assert_eq!(delete(a.web, "/api/tarpit").await.status, 400);
    a.stop().await;
}

fn config_file_text(upstream: SocketAddr, hostname: &str, extra: &str) -> String {
    format!(
        r#"
        [server]
        hostname = "{hostname}"
        shutdown_grace = "2s"
        [[listener]]
        address = "127.0.0.1:0"
        [upstream.main]
        address = "{upstream}"
        [domains]
        local = ["example.com"]
        [store]
        backend = "memory"
        redis_url = "redis://thassp:hunter2@127.0.0.1:6379/0"
        [events]
        url = ""
        {extra}
        "#
    )
}

#[tokio::test]
async fn config_view_redacts_and_reload_keeps_the_old_config_on_errors() {
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thassp.toml");
    std::fs::write(&path, config_file_text(sink.addr, "one.thassp.test", "")).unwrap();
    let config = Config::load(&path).unwrap();
    let a = start_with(sink, dir, config, admin_config(|_| {}), Some(path.clone())).await;

    let json = get(a.web, "/api/config").await;
    assert_eq!(json.status, 200);
    assert!(!json.body.contains("hunter2"), "{}", json.body);
    let v = json.json();
    assert_eq!(v["store"]["redis_url"], "redis://thassp:***@127.0.0.1:6379/0");
    assert_eq!(v["server"]["hostname"], "one.thassp.test");
    let t = get(a.web, "/api/config?format=toml").await;
    assert_eq!(t.status, 200);
    assert!(!t.body.contains("hunter2"));
    let parsed: toml::Table = toml::from_str(&t.body).unwrap_or_else(|e| panic!("{e}\n{}", t.body));
    assert_eq!(parsed["server"]["hostname"].as_str(), Some("one.thassp.test"));
    assert_eq!(get(a.web, "/api/config?format=yaml").await.status, 400);
    let page = http(a.web, "GET", "/ui/config", &[basic("admin", PASSWORD)], b"").await;
    assert!(page.body.contains("redis://thassp:***@") && !page.body.contains("hunter2"));

    // A broken file: refused with the reasons (passwords in them hidden), old config stays.
    std::fs::write(
        &path,
        config_file_text(a.sink.addr, "two.thassp.test", "").replace(
            "redis://thassp:hunter2@127.0.0.1",
            "nosuch://thassp:hunter2@127.0.0.1",
        ),
    )
    .unwrap();
    let r = http(a.web, "POST", "/api/reload", &[bearer()], b"").await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(!r.body.contains("hunter2"), "{}", r.body);
    let report = r.json();
    assert_eq!(report["reloaded"], false);
    let why = report["errors"][0].as_str().unwrap();
    assert!(
        why.contains("store.redis_url") && !why.contains("hunter2"),
        "{why}"
    );
    assert_eq!(
        get(a.web, "/api/status").await.json()["hostname"],
        "one.thassp.test"
    );
    let mut c = Console::login(a.console, TOKEN).await;
    assert!(c.cmd("reload").await.contains("reload refused"));
    assert!(!c.cmd("config").await.contains("hunter2"));

    // A good file is applied.
    std::fs::write(&path, config_file_text(a.sink.addr, "two.thassp.test", "")).unwrap();
    let r = http(a.web, "POST", "/api/reload", &[bearer()], b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["reloaded"], true);
    assert_eq!(
        get(a.web, "/api/status").await.json()["hostname"],
        "two.thassp.test"
    );
    let mut smtp = Client::connect(a.smtp()).await;
    assert!(smtp.reply().await.contains("two.thassp.test"));

    // Checking candidates applies nothing.
    let good = config_file_text(a.sink.addr, "three.thassp.test", "");
    let r = http(a.web, "POST", "/api/check", &[bearer()], good.as_bytes()).await;
    assert_eq!(
        (r.status, r.json()["valid"].as_bool()),
        (200, Some(true)),
        "{}",
        r.body
    );
    let r = http(
        a.web,
        "POST",
        "/api/check",
        &[bearer()],
        b"[server]\nmax_connections = \"lots\"",
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(
        r.json()["errors"][0]
            .as_str()
            .unwrap()
            .contains("max_connections"),
        "{}",
        r.body
    );
    assert_eq!(
        get(a.web, "/api/status").await.json()["hostname"],
        "two.thassp.test"
    );
    a.stop().await;
}

#[tokio::test]
async fn metrics_text_parses() {
    let a = start("", |_| {}, admin_config(|c| c.max_auth_failures = 10)).await;
    deliver(a.smtp(), "alice@example.net", "bob@example.com").await;
    assert_eq!(
        http(a.web, "GET", "/metrics", &[basic("admin", "wrong")], b"")
            .await
            .status,
        401
    );
    let r = get(a.web, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(r.body.ends_with("# EOF\n"), "{}", r.body);
    for line in r.body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok(), "{line}");
        assert!(name.starts_with("thassp_"), "{line}");
    }
    for needle in [
        "thassp_build_info{version=",
        "thassp_sessions_total 1",
        "thassp_connections_current ",
        "thassp_outcomes_total{category=\"delivered\"} 1",
        "thassp_event_log_queued ",
        "thassp_event_log_dropped_total 0",
        "thassp_store_degraded{backend=\"memory\"} 0",
        "thassp_store_errors_total{backend=\"memory\"} 0",
        "thassp_upstream_up{upstream=\"main\"} 1",
        "thassp_admin_auth_failures_total 1",
        "# TYPE thassp_outcomes counter",
        "# TYPE thassp_check_duration_seconds histogram",
        "thassp_check_duration_seconds_count{check=\"relay_control\"} 1",
        "thassp_check_duration_seconds_bucket{le=\"+Inf\",check=\"relay_control\"} 1",
        "thassp_check_refusals_total{check=\"relay_control\"} 0",
        "thassp_replies_total{class=\"2xx\"} ",
        "thassp_upstream_errors_total 0",
        "thassp_upstream_messages_total 1",
        "thassp_upstream_relay_seconds_total ",
    ] {
        assert!(r.body.contains(needle), "{needle} missing:\n{}", r.body);
    }
    a.stop().await;

    let public = start("", |_| {}, admin_config(|c| c.metrics_public = true)).await;
    assert_eq!(http(public.web, "GET", "/metrics", &[], b"").await.status, 200);
    assert_eq!(http(public.web, "GET", "/api/status", &[], b"").await.status, 401);
    public.stop().await;
}

#[tokio::test]
async fn console_session_over_tcp() {
    let a = start("", |_| {}, admin_config(|c| c.max_auth_failures = 5)).await;
    let mut c = Console::connect(a.console).await;
    assert!(c.until("password: ").await.contains("admin console"));
    c.send("guess").await;
    assert!(c.until("password: ").await.contains("wrong credentials"));
    c.send(TOKEN).await;
    assert!(c.until("thassp> ").await.contains("welcome"));
    assert!(c.cmd("help").await.contains("grey release KEY"));
    assert!(c.cmd("sessions").await.contains("no sessions in progress"));
    // A session in progress shows up.
    let mut smtp = Client::greeted(a.smtp()).await;
    let s = c.cmd("sessions").await;
    assert!(s.contains("127.0.0.1:"), "{s}");
    smtp.cmd("QUIT").await;
    assert!(c.cmd("frobnicate").await.starts_with("error: unknown command"));
    assert!(c.cmd("grey").await.starts_with("error:"));
    assert!(c.cmd(&"x".repeat(5000)).await.contains("line longer than"));
    assert!(c.cmd("stats banana").await.starts_with("error:"));
    assert_eq!(c.cmd("").await, "");
    c.send("quit").await;
    assert!(c.until("bye").await.contains("bye"));
    assert!(c.closed().await);

    // Three wrong answers end the connection.
    let mut c = Console::connect(a.console).await;
    for _ in 0..3 {
        c.until("password: ").await;
        c.send("nope").await;
    }
    assert!(c.closed().await);
    a.stop().await;
}

#[tokio::test]
async fn console_idle_sessions_are_closed() {
    let a = start(
        "",
        |_| {},
        admin_config(|c| c.console_idle_timeout = Duration::from_secs(1)),
    )
    .await;
    let mut c = Console::login(a.console, TOKEN).await;
    let rest = c.until("bye").await;
    assert!(rest.contains("idle too long"), "{rest}");
    assert!(c.closed().await);
    a.stop().await;
}

#[tokio::test]
async fn disabled_admin_starts_nothing() {
    let (running, _sink) = common::proxy().await;
    let h = admin::start(
        running.app().clone(),
        &AdminConfig::default(),
        None,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(h.web_addr.is_none() && h.console_addr.is_none());
    running.shutdown().await;
}
