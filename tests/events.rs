//! The event log: the same suite against SQLite (always, a temporary file), MariaDB and
//! PostgreSQL (when `THASSP_TEST_MYSQL_URL` / `THASSP_TEST_POSTGRES_URL` are set; with
//! `CI=true` a missing URL fails). Each test uses its own table prefix, so runs against a
//! shared database never collide; its tables are dropped at the end.
//!
//! Outages: for MariaDB and PostgreSQL the writer talks through a local TCP relay that can
//! stall (accept, then never answer or forward); for SQLite the file's directory is missing
//! or another connection holds an exclusive lock.
//!
//! `cargo test --test events -- --ignored --nocapture throughput` measures how many events
//! per second the writer sustains.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, DurationRound, FixedOffset, TimeDelta, Utc};
use sqlx::{AssertSqlSafe, Connection as _, Row as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use thassp::events::{
    Backend, ConnectionEvent, EventLog, EventQuery, EventsConfig, RecipientResult, Stats, Timings,
    TransactionEvent, WriterHandle, WriterOptions, format_table,
};
use thassp::policy::Category;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Databases

struct Db {
    backend: Backend,
    /// The real database.
    url: String,
    prefix: String,
    dir: Option<tempfile::TempDir>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn unique_prefix() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = Utc::now().timestamp_subsec_nanos() % 1_000_000;
    format!("t{}_{n}_{nanos}_", std::process::id())
}

impl Db {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/events.db", dir.path().display());
        Self {
            backend: Backend::Sqlite,
            url,
            prefix: unique_prefix(),
            dir: Some(dir),
        }
    }

    /// The database named by `var`, or `None` (skipped) when it is not set.
    fn from_env(var: &str, backend: Backend) -> Option<Self> {
        match std::env::var(var) {
            Ok(url) if !url.is_empty() => Some(Self {
                backend,
                url,
                prefix: unique_prefix(),
                dir: None,
            }),
            _ => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "{var} must be set when CI=true"
                );
                println!("skipped: {var} not set");
                None
            }
        }
    }

    fn config(&self, url: &str) -> EventsConfig {
        EventsConfig {
            url: url.to_string(),
            retention_days: 0,
            ..EventsConfig::default()
        }
    }

    fn options(&self) -> WriterOptions {
        WriterOptions {
            table_prefix: self.prefix.clone(),
            connect_timeout: Duration::from_millis(700),
            write_timeout: Duration::from_millis(700),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            prune_interval: Duration::from_secs(3600),
        }
    }

    fn start(&self, config: &EventsConfig) -> (EventLog, WriterHandle) {
        EventLog::start_with(config, self.options()).expect("writer starts")
    }

    async fn stats(&self) -> Stats {
        Stats::open_with(&self.url, &self.prefix)
            .await
            .expect("stats open")
    }

    fn table(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    async fn count(&self, stats: &Stats, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {}", self.table(table));
        let row = sqlx::query(AssertSqlSafe(sql))
            .fetch_one(stats.pool())
            .await
            .expect("count");
        row.try_get::<i64, _>(0).expect("count value")
    }

    async fn exec(&self, stats: &Stats, sql: String) {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(stats.pool())
            .await
            .expect("statement");
    }

    /// Drops the test's tables (SQLite's go with the temporary directory).
    async fn cleanup(self) {
        if self.backend == Backend::Sqlite {
            return;
        }
        let stats = self.stats().await;
        for t in ["recipients", "transactions", "connections", "schema"] {
            let sql = format!("DROP TABLE IF EXISTS {}", self.table(t));
            let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(stats.pool()).await;
        }
        stats.close().await;
    }

    /// A way to take this database away from a writer and give it back.
    async fn outage(&self) -> Outage {
        match self.backend {
            Backend::Sqlite => Outage::Lock(None),
            Backend::MySql | Backend::Postgres => Outage::Relay(Relay::start(&self.url).await),
        }
    }

    /// The URL a writer uses during an outage test.
    fn url_via(&self, outage: &Outage) -> String {
        match outage {
            Outage::Relay(relay) => relay.url.clone(),
            Outage::Lock(_) => self.url.clone(),
        }
    }
}

/// Takes the database away from the writer (`begin`) and gives it back (`end`).
enum Outage {
    /// MariaDB/PostgreSQL: a relay that forwards or stalls.
    Relay(Relay),
    /// SQLite: another connection holding an exclusive lock.
    Lock(Option<sqlx::SqliteConnection>),
}

impl Outage {
    async fn begin(&mut self, db: &Db) {
        match self {
            Outage::Relay(r) => r.stall(true),
            Outage::Lock(slot) => {
                let mut conn = sqlx::SqliteConnection::connect(&db.url)
                    .await
                    .expect("sqlite lock conn");
                sqlx::raw_sql("BEGIN EXCLUSIVE")
                    .execute(&mut conn)
                    .await
                    .expect("lock");
                *slot = Some(conn);
            }
        }
    }

    async fn end(&mut self) {
        match self {
            Outage::Relay(r) => r.stall(false),
            Outage::Lock(slot) => {
                if let Some(mut conn) = slot.take() {
                    sqlx::raw_sql("COMMIT").execute(&mut conn).await.expect("unlock");
                    let _ = conn.close().await;
                }
            }
        }
    }
}

/// A TCP relay in front of a database that can stall: new connections are accepted and
/// never answered, established ones stop forwarding (a hung server, a dead network path).
struct Relay {
    url: String,
    stalled: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn start(real_url: &str) -> Self {
        let (host_port, rewrite) = split_url(real_url);
        let target = tokio::net::lookup_host(host_port.as_str())
            .await
            .expect("database address")
            .next()
            .expect("an address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                conns.spawn(relay_one(client, target, flag.clone()));
            }
        });
        Self {
            url: rewrite(&addr.to_string()),
            stalled,
            task,
        }
    }

    fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }
}

async fn relay_one(client: TcpStream, target: SocketAddr, stalled: Arc<AtomicBool>) {
    let (mut cr, mut cw) = client.into_split();
    if stalled.load(Ordering::SeqCst) {
        // Accept, read, never answer.
        let mut buf = [0u8; 4096];
        while matches!(cr.read(&mut buf).await, Ok(n) if n > 0) {}
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut sr, mut sw) = server.into_split();
    let frozen = Arc::new(AtomicBool::new(false));
    let pump = |stalled: Arc<AtomicBool>, frozen: Arc<AtomicBool>| {
        move |n: usize| {
            if stalled.load(Ordering::SeqCst) {
                frozen.store(true, Ordering::SeqCst);
            }
            n > 0 && !frozen.load(Ordering::SeqCst)
        }
    };
    let up = pump(stalled.clone(), frozen.clone());
    let down = pump(stalled, frozen);
    let a = async move {
        let mut buf = vec![0u8; 16384];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            // Once frozen, bytes are swallowed: the peer waits for an answer that never comes.
            if up(n) && sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let b = async move {
        let mut buf = vec![0u8; 16384];
        while let Ok(n) = sr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if down(n) && cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = a => {}
        _ = b => {}
    }
}

/// `host:port` of a database URL and a function that puts another `host:port` in its place.
fn split_url(url: &str) -> (String, impl Fn(&str) -> String + use<>) {
    let start = url.find("://").map(|i| i + 3).expect("URL with ://");
    let rest = &url[start..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host_start = authority.rfind('@').map(|i| i + 1).unwrap_or(0);
    let host = &authority[host_start..];
    let default_port = if url.starts_with("postgres") { 5432 } else { 3306 };
    let host_port = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:{default_port}")
    };
    let before = url[..start + host_start].to_string();
    let after = rest[end..].to_string();
    (host_port, move |hp: &str| format!("{before}{hp}{after}"))
}

// ---------------------------------------------------------------------------------------
// Helpers

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::milliseconds(1)).expect("truncate")
}

fn connection(
    id: &str,
    at: DateTime<Utc>,
    ip: &str,
    outcome: Category,
    transactions: u32,
) -> ConnectionEvent {
    ConnectionEvent {
        session_id: id.to_string(),
        connect_time: ms(at),
        end_time: ms(at + TimeDelta::seconds(2)),
        client: SocketAddr::new(ip.parse().expect("ip"), 40000),
        proxied_by: None,
        ptr: Some("mail.example.net".into()),
        helo: Some("mail.example.net".into()),
        tls_version: None,
        tls_cipher: None,
        auth_user: None,
        transactions,
        outcome,
        check: None,
        last_reply: Some("221 2.0.0 Bye".into()),
        bytes_in: 100,
        bytes_out: 200,
    }
}

fn transaction(
    id: &str,
    seq: u32,
    at: DateTime<Utc>,
    ip: &str,
    sender: &str,
    rcpts: &[&str],
    outcome: Category,
) -> TransactionEvent {
    TransactionEvent {
        session_id: id.to_string(),
        seq,
        time: ms(at),
        client_ip: ip.parse().expect("ip"),
        sender: sender.to_string(),
        recipients: rcpts
            .iter()
            .map(|r| RecipientResult {
                address: r.to_string(),
                reply: "250 2.1.5 Ok".into(),
            })
            .collect(),
        size: 1234,
        message_id: Some(format!("<{id}.{seq}@example.net>")),
        subject: Some("Hello".into()),
        outcome,
        check: None,
        reply: Some("250 2.0.0 Ok: queued as ABC".into()),
        upstream_reply: Some("250 2.0.0 Ok: queued as ABC".into()),
        queue_id: Some("ABC".into()),
        spf: "pass".into(),
        dkim: String::new(),
        dmarc: String::new(),
        score: 0.5,
        timings: Timings {
            total_ms: 40,
            mail_ms: 1,
            rcpt_ms: 2,
            data_ms: 3,
            upstream_ms: 30,
        },
    }
}

fn all() -> EventQuery {
    EventQuery {
        limit: 10_000,
        ..EventQuery::default()
    }
}

// ---------------------------------------------------------------------------------------
// The suite

/// The schema is created on first start, re-opened (migration idempotent) on the next.
async fn schema_created_and_reopened(db: Db) {
    let config = db.config(&db.url);
    for round in 0..2 {
        let (log, writer) = db.start(&config);
        wait_for("the writer to connect", || log.connected()).await;
        log.log_connection(connection(
            &format!("s{round}"),
            Utc::now(),
            "192.0.2.1",
            Category::Other,
            0,
        ));
        assert_eq!(writer.shutdown(WAIT).await, 0);
        assert_eq!(log.written(), 1, "round {round}: {:?}", log.last_error());
        assert_eq!(log.write_errors(), 0, "{:?}", log.last_error());
    }
    let stats = db.stats().await;
    let sql = format!("SELECT version FROM {} ORDER BY version", db.table("schema"));
    let versions: Vec<i64> = sqlx::query(AssertSqlSafe(sql))
        .fetch_all(stats.pool())
        .await
        .expect("versions")
        .iter()
        .map(|r| r.try_get::<i64, _>(0).expect("version"))
        .collect();
    assert_eq!(versions, [thassp::events::sql::LATEST_VERSION]);
    assert_eq!(db.count(&stats, "connections").await, 2);
    // Opening the reader again migrates nothing and fails nothing.
    stats.close().await;
    let again = db.stats().await;
    assert_eq!(db.count(&again, "connections").await, 2);
    again.close().await;
    db.cleanup().await;
}

/// What goes in comes back: every field, long values clipped, addresses lower case, the
/// subject dropped when `log_subject` is off; searches by IP, sender, recipient, outcome.
async fn rows_round_trip(db: Db) {
    let mut config = db.config(&db.url);
    let (log, writer) = db.start(&config);
    let now = ms(Utc::now());
    let conn = ConnectionEvent {
        session_id: "RT1".into(),
        connect_time: now - TimeDelta::seconds(5),
        end_time: now,
        client: "[2001:db8::7]:41234".parse().expect("addr"),
        proxied_by: Some("10.1.2.3:51000".parse().expect("addr")),
        ptr: Some("host.example.org".into()),
        helo: Some(format!("{}.example", "h".repeat(300))),
        tls_version: Some("TLSv1.3".into()),
        tls_cipher: Some("TLS13_AES_256_GCM_SHA384".into()),
        auth_user: Some("alice".into()),
        transactions: 2,
        outcome: Category::Delivered,
        check: None,
        last_reply: Some("221 2.0.0 Bye".into()),
        bytes_in: 5_000_000_000,
        bytes_out: 321,
    };
    let mut tx1 = transaction(
        "RT1",
        1,
        now - TimeDelta::seconds(3),
        "2001:db8::7",
        "Bob@Example.COM",
        &["Carol@Example.net", "nobody@example.net"],
        Category::Delivered,
    );
    tx1.recipients[1].reply = "550 5.1.1 User unknown".into();
    tx1.subject = Some("nul\0in subject".into());
    tx1.dkim = "pass".into();
    tx1.dmarc = "pass".into();
    tx1.score = 2.25;
    let mut tx2 = transaction(
        "RT1",
        2,
        now - TimeDelta::seconds(1),
        "2001:db8::7",
        "",
        &["postmaster@example.net"],
        Category::Content,
    );
    tx2.check = Some("content".into());
    tx2.reply = Some("550 5.7.1 Content refused".into());
    tx2.upstream_reply = None;
    tx2.queue_id = None;
    log.log_transaction(tx1.clone());
    log.log_transaction(tx2.clone());
    log.log_connection(conn.clone());
    assert_eq!(writer.shutdown(WAIT).await, 0, "{:?}", log.last_error());
    assert_eq!(log.written(), 3, "{:?}", log.last_error());

    // A second writer with log_subject off.
    config.log_subject = false;
    let (log2, writer2) = db.start(&config);
    let tx3 = transaction(
        "RT2",
        1,
        now,
        "192.0.2.9",
        "x@y.example",
        &["a@b.example"],
        Category::Delivered,
    );
    log2.log_transaction(tx3.clone());
    assert_eq!(writer2.shutdown(WAIT).await, 0);

    let stats = db.stats().await;
    let conns = stats.connections(&all()).await.expect("connections");
    let mut want = conn.clone();
    want.helo = Some("h".repeat(255));
    assert_eq!(conns, [want]);

    let txs = stats.transactions(&all()).await.expect("transactions");
    assert_eq!(txs.len(), 3);
    let lower = |mut t: TransactionEvent| {
        t.sender = t.sender.to_lowercase();
        for r in &mut t.recipients {
            r.address = r.address.to_lowercase();
        }
        t
    };
    let mut want1 = lower(tx1.clone());
    want1.subject = Some("nulin subject".into());
    let mut want3 = lower(tx3.clone());
    want3.subject = None;
    // Newest first.
    assert_eq!(txs, [want3.clone(), lower(tx2.clone()), want1.clone()]);

    let by = |f: fn(&mut EventQuery)| {
        let mut q = all();
        f(&mut q);
        q
    };
    let found = stats
        .transactions(&by(|q| q.recipient = Some("CAROL@example.net".into())))
        .await
        .expect("by recipient");
    assert_eq!(found, [want1.clone()]);
    let found = stats
        .transactions(&by(|q| q.sender = Some("bob@example.com".into())))
        .await
        .expect("by sender");
    assert_eq!(found, [want1.clone()]);
    let found = stats
        .transactions(&by(|q| {
            q.client_ip = Some("2001:db8::7".parse::<IpAddr>().expect("ip"))
        }))
        .await
        .expect("by ip");
    assert_eq!(found.len(), 2);
    let found = stats
        .transactions(&by(|q| q.outcome = Some(Category::Content)))
        .await
        .expect("by outcome");
    assert_eq!(found, [lower(tx2)]);
    let found = stats
        .connections(&by(|q| {
            q.client_ip = Some("192.0.2.200".parse::<IpAddr>().expect("ip"))
        }))
        .await
        .expect("by ip");
    assert!(found.is_empty());
    stats.close().await;
    db.cleanup().await;
}

/// Full batches are written at once; a partial batch waits for flush_interval (or
/// shutdown, which drains it).
async fn batching(db: Db) {
    let config = EventsConfig {
        batch_size: 50,
        flush_interval: Duration::from_secs(3600),
        ..db.config(&db.url)
    };
    let (log, writer) = db.start(&config);
    wait_for("the writer to connect", || log.connected()).await;
    let now = Utc::now();
    for i in 0..120 {
        log.log_connection(connection(&format!("b{i}"), now, "192.0.2.1", Category::Other, 0));
    }
    wait_for("two full batches", || log.written() == 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        log.written(),
        100,
        "a partial batch is not written before flush_interval"
    );
    assert_eq!(log.queued(), 20);
    assert_eq!(writer.shutdown(WAIT).await, 0);
    assert_eq!(log.written(), 120);
    assert_eq!(log.dropped(), 0);

    // A short flush interval writes a partial batch by itself.
    let config = EventsConfig {
        batch_size: 50,
        flush_interval: Duration::from_millis(100),
        ..db.config(&db.url)
    };
    let (log, writer) = db.start(&config);
    log.log_connection(connection("b-last", now, "192.0.2.1", Category::Other, 0));
    wait_for("the flush interval", || log.written() == 1).await;
    assert_eq!(writer.shutdown(WAIT).await, 0);
    let stats = db.stats().await;
    assert_eq!(db.count(&stats, "connections").await, 121);
    stats.close().await;
    db.cleanup().await;
}

/// The fixture: 1000 attempts shaped like ThASSP's published table, plus rows that must not
/// count (connections that had transactions, rows outside the period).
async fn stats_match_fixture(db: Db) {
    let day0 = (Utc::now() - TimeDelta::days(3))
        .duration_trunc(TimeDelta::days(1))
        .expect("midnight");
    let day1 = day0 + TimeDelta::days(1);
    let since = day0 - TimeDelta::days(1);
    let until = day1 + TimeDelta::days(2);
    let (log, writer) = db.start(&EventsConfig {
        queue_size: 5000,
        ..db.config(&db.url)
    });
    let mut n = 0;
    let mut id = || {
        n += 1;
        format!("f{n}")
    };
    let at = |day: DateTime<Utc>, i: usize| day + TimeDelta::hours(1) + TimeDelta::seconds(i as i64);
    // Connection-only attempts.
    for i in 0..240 {
        let day = if i < 140 { day0 } else { day1 };
        let ip = format!("198.51.100.{}", i % 4);
        log.log_connection(connection(&id(), at(day, i), &ip, Category::HeloInvalid, 0));
    }
    for (cat, count, ip) in [
        (Category::Tarpit, 100, "203.0.113.9"),
        (Category::Autoblacklist, 60, "203.0.113.10"),
        (Category::Aborted, 40, "203.0.113.11"),
        (Category::Other, 6, "203.0.113.12"),
    ] {
        for i in 0..count {
            log.log_connection(connection(&id(), at(day0, i), ip, cat, 0));
        }
    }
    // Period boundaries: `since` is in, `until` is out.
    log.log_connection(connection(&id(), since, "203.0.113.12", Category::Other, 0));
    log.log_connection(connection(&id(), until, "203.0.113.12", Category::Other, 0));
    // Outside the period.
    log.log_connection(connection(
        &id(),
        since - TimeDelta::days(5),
        "203.0.113.13",
        Category::Trap,
        0,
    ));
    log.log_transaction(transaction(
        &id(),
        1,
        until + TimeDelta::days(1),
        "203.0.113.13",
        "a@spam.example",
        &["x@example.net"],
        Category::Trap,
    ));
    // Transactions, each in a session whose connection row must not count again.
    let txs: [(Category, usize, &str, &str, usize); 8] = [
        (Category::Trap, 150, "192.0.2.1", "spam.example", 1),
        (Category::Trap, 50, "192.0.2.2", "spam.example", 1),
        (Category::Trap, 50, "192.0.2.2", "junk.example", 1),
        (Category::UnknownUser, 160, "192.0.2.3", "junk.example", 1),
        (Category::Greylisted, 60, "192.0.2.4", "grey.example", 1),
        (Category::RelayAttempt, 10, "192.0.2.5", "relay.example", 1),
        (Category::SpfFail, 6, "192.0.2.6", "forged.example", 1),
        (Category::Delivered, 67, "10.0.0.1", "good.example", 2),
    ];
    for (cat, count, ip, domain, rcpts) in txs {
        for i in 0..count {
            let sid = id();
            let sender = format!("user{i}@{domain}");
            let rcpt_list = ["a@example.net", "b@example.net"];
            log.log_transaction(transaction(
                &sid,
                1,
                at(day1, i),
                ip,
                &sender,
                &rcpt_list[..rcpts],
                cat,
            ));
            log.log_connection(connection(&sid, at(day1, i), ip, cat, 1));
        }
    }
    assert_eq!(writer.shutdown(WAIT).await, 0, "{:?}", log.last_error());
    assert_eq!(log.dropped(), 0);

    let stats = db.stats().await;
    let table = stats.outcome_table(since, until).await.expect("outcome table");
    let got: Vec<(Category, u64, f64)> = table.iter().map(|r| (r.category, r.count, r.percent)).collect();
    assert_eq!(
        got,
        [
            (Category::Trap, 250, 25.0),
            (Category::HeloInvalid, 240, 24.0),
            (Category::UnknownUser, 160, 16.0),
            (Category::Tarpit, 100, 10.0),
            (Category::Delivered, 67, 6.7),
            (Category::Autoblacklist, 60, 6.0),
            (Category::Greylisted, 60, 6.0),
            (Category::Aborted, 40, 4.0),
            (Category::RelayAttempt, 10, 1.0),
            (Category::Other, 7, 0.7),
            (Category::SpfFail, 6, 0.6),
        ]
    );
    assert_eq!(
        format_table(&table),
        "\
category           attempts  percent
trap                    250   25.0 %
helo_invalid            240   24.0 %
unknown_user            160   16.0 %
tarpit                  100   10.0 %
delivered                67    6.7 %
autoblacklist            60    6.0 %
greylisted               60    6.0 %
aborted                  40    4.0 %
relay_attempt            10    1.0 %
other                     7    0.7 %
spf_fail                  6    0.6 %
------------------------------------
total                  1000  100.0 %
"
    );

    let totals = stats.totals(since, until).await.expect("totals");
    assert_eq!(totals.attempts, 1000);
    assert_eq!(totals.transactions, 553);
    assert_eq!(totals.connections, 447 + 553);
    assert_eq!(totals.recipients, 553 + 67);
    assert_eq!(totals.delivered, 67);
    assert_eq!(totals.bytes_in, 100 * 1000);
    assert_eq!(totals.bytes_out, 200 * 1000);
    assert_eq!(totals.message_bytes, 1234 * 553);

    let utc = FixedOffset::east_opt(0).expect("utc");
    let daily = stats.daily(since, until, utc).await.expect("daily");
    let per_day = |d: DateTime<Utc>| -> Vec<(Category, u64)> {
        daily
            .iter()
            .filter(|c| c.day == d.date_naive())
            .map(|c| (c.category, c.count))
            .collect()
    };
    assert_eq!(per_day(since), [(Category::Other, 1)]);
    assert_eq!(
        per_day(day0),
        [
            (Category::HeloInvalid, 140),
            (Category::Tarpit, 100),
            (Category::Autoblacklist, 60),
            (Category::Aborted, 40),
            (Category::Other, 6),
        ]
    );
    assert_eq!(per_day(day1).iter().map(|(_, n)| n).sum::<u64>(), 100 + 553);
    assert_eq!(daily.iter().map(|c| c.count).sum::<u64>(), 1000);
    // Local days: at UTC-2, day0's attempts (01:00 UTC) fall on the day before, and the
    // row at `since` (00:00 UTC) on the day before that.
    let minus2 = FixedOffset::west_opt(2 * 3600).expect("offset");
    let shifted = stats.daily(since, until, minus2).await.expect("daily");
    let day_before: u64 = shifted
        .iter()
        .filter(|c| c.day == since.date_naive())
        .map(|c| c.count)
        .sum();
    assert_eq!(day_before, 140 + 100 + 60 + 40 + 6);

    let top = stats
        .top_clients(since, until, Some(Category::Trap), 5)
        .await
        .expect("top clients");
    assert_eq!(
        top,
        [("192.0.2.1".to_string(), 150), ("192.0.2.2".to_string(), 100)]
    );
    let top = stats
        .top_clients(since, until, None, 2)
        .await
        .expect("top clients");
    assert_eq!(
        top,
        [("192.0.2.3".to_string(), 160), ("192.0.2.1".to_string(), 150)]
    );
    let top = stats
        .top_sender_domains(since, until, Some(Category::Trap), 5)
        .await
        .expect("top domains");
    assert_eq!(
        top,
        [
            ("spam.example".to_string(), 200),
            ("junk.example".to_string(), 50)
        ]
    );
    let top = stats
        .top_sender_domains(since, until, None, 1)
        .await
        .expect("top domains");
    assert_eq!(top, [("junk.example".to_string(), 210)]);

    // The live counters follow the same rule (and see the rows outside the period too).
    let live: u64 = log.since_start().iter().map(|(_, n)| n).sum();
    assert_eq!(live, 1000 + 3);
    stats.close().await;
    db.cleanup().await;
}

/// Rows older than retention_days are deleted in batches of prune_batch, at start and
/// when asked.
async fn retention_pruning(db: Db) {
    let now = Utc::now();
    let old = now - TimeDelta::days(10);
    let (log, writer) = db.start(&db.config(&db.url));
    for i in 0..7 {
        log.log_connection(connection(
            &format!("old{i}"),
            old,
            "192.0.2.1",
            Category::Other,
            0,
        ));
    }
    for i in 0..5 {
        let rc = ["a@example.net", "b@example.net"];
        log.log_transaction(transaction(
            &format!("oldtx{i}"),
            1,
            old,
            "192.0.2.1",
            "s@x.example",
            &rc,
            Category::Trap,
        ));
    }
    for i in 0..4 {
        log.log_connection(connection(
            &format!("new{i}"),
            now,
            "192.0.2.1",
            Category::Other,
            0,
        ));
        log.log_transaction(transaction(
            &format!("new{i}"),
            1,
            now,
            "192.0.2.1",
            "s@x.example",
            &["c@example.net"],
            Category::Trap,
        ));
    }
    assert_eq!(writer.shutdown(WAIT).await, 0);

    let config = EventsConfig {
        retention_days: 1,
        prune_batch: 3,
        ..db.config(&db.url)
    };
    let (log, writer) = db.start(&config);
    // 7 connections, 5 transactions, 10 recipients, three at a time.
    wait_for("pruning at start", || log.pruned() == 22).await;
    let stats = db.stats().await;
    assert_eq!(db.count(&stats, "connections").await, 4);
    assert_eq!(db.count(&stats, "transactions").await, 4);
    assert_eq!(db.count(&stats, "recipients").await, 4);

    // Old rows written later go at the next run, here asked for at once.
    log.log_connection(connection("late-old", old, "192.0.2.1", Category::Other, 0));
    wait_for("the old row written", || log.written() == 1).await;
    writer.prune_now();
    wait_for("pruning on request", || log.pruned() == 23).await;
    assert_eq!(db.count(&stats, "connections").await, 4);
    assert_eq!(writer.shutdown(WAIT).await, 0);
    assert_eq!(log.write_errors(), 0, "{:?}", log.last_error());
    stats.close().await;
    db.cleanup().await;
}

/// With the database unreachable from the start, a full queue drops its oldest rows and
/// counts them; once the database is there, the newest rows are written.
async fn overflow_drops_oldest(db: Db) {
    // SQLite: a file in a directory that does not exist yet. Others: a stalled relay.
    let mut relay = None;
    let (url, missing_dir) = match db.backend {
        Backend::Sqlite => {
            let dir = db.dir.as_ref().expect("temp dir").path().join("later");
            (format!("sqlite://{}/events.db", dir.display()), Some(dir))
        }
        _ => {
            let r = Relay::start(&db.url).await;
            r.stall(true);
            let url = r.url.clone();
            relay = Some(r);
            (url, None)
        }
    };
    let config = EventsConfig {
        queue_size: 10,
        batch_size: 5,
        flush_interval: Duration::from_millis(50),
        ..db.config(&url)
    };
    let (log, writer) = db.start(&config);
    let now = Utc::now();
    for i in 0..25 {
        log.log_connection(connection(
            &format!("o{i:02}"),
            now,
            "192.0.2.1",
            Category::Other,
            0,
        ));
    }
    assert_eq!(log.dropped(), 15);
    assert_eq!(log.queued(), 10);
    wait_for("a failed connection attempt", || log.write_errors() > 0).await;
    assert!(log.last_error().is_some());
    assert!(!log.connected());

    if let Some(dir) = &missing_dir {
        std::fs::create_dir_all(dir).expect("create dir");
    }
    if let Some(r) = &relay {
        r.stall(false);
    }
    wait_for("the queued rows written", || log.written() == 10).await;
    assert_eq!(writer.shutdown(WAIT).await, 0);
    assert_eq!(log.dropped(), 15);

    let reader_url = match &missing_dir {
        Some(dir) => format!("sqlite://{}/events.db", dir.display()),
        None => db.url.clone(),
    };
    let stats = Stats::open_with(&reader_url, &db.prefix).await.expect("stats");
    let mut ids: Vec<String> = stats
        .connections(&all())
        .await
        .expect("rows")
        .into_iter()
        .map(|c| c.session_id)
        .collect();
    ids.sort();
    let want: Vec<String> = (15..25).map(|i| format!("o{i:02}")).collect();
    assert_eq!(ids, want);
    stats.close().await;
    db.cleanup().await;
}

/// The database hangs mid-run: log calls stay instant, rows queue up to the bound, the
/// excess is dropped and counted, and everything queued is written once it answers again.
async fn unreachable_database(db: Db) {
    let mut outage = db.outage().await;
    let url = db.url_via(&outage);
    let config = EventsConfig {
        queue_size: 100,
        batch_size: 20,
        flush_interval: Duration::from_millis(20),
        ..db.config(&url)
    };
    let (log, writer) = db.start(&config);
    let now = Utc::now();
    for i in 0..10 {
        log.log_connection(connection(
            &format!("u{i:03}"),
            now,
            "192.0.2.1",
            Category::Other,
            0,
        ));
    }
    wait_for("rows written before the outage", || log.written() == 10).await;

    outage.begin(&db).await;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for i in 10..160 {
        let ev = connection(&format!("u{i:03}"), now, "192.0.2.1", Category::Other, 0);
        let t = Instant::now();
        log.log_connection(ev);
        slowest = slowest.max(t.elapsed());
        if i % 10 == 0 {
            // Give the writer the chance to take batches and hang on them.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let total = started.elapsed();
    assert!(
        slowest < Duration::from_millis(20),
        "slowest log call took {slowest:?}"
    );
    assert!(total < Duration::from_secs(1), "150 log calls took {total:?}");
    // A batch in flight when the database hung is requeued at the head once the write times
    // out; then exactly queue_size rows are kept.
    wait_for("the hung write to time out", || log.write_errors() > 0).await;
    wait_for("the bound enforced", || log.dropped() == 50).await;
    assert_eq!(log.written(), 10);
    assert_eq!(log.queued(), 100);

    outage.end().await;
    wait_for("the queue drained", || log.written() == 110 && log.queued() == 0).await;
    assert!(log.connected());
    assert_eq!(writer.shutdown(WAIT).await, 0);
    assert_eq!(log.dropped(), 50);

    let stats = db.stats().await;
    let mut ids: Vec<String> = stats
        .connections(&all())
        .await
        .expect("rows")
        .into_iter()
        .map(|c| c.session_id)
        .collect();
    ids.sort();
    // The ten before the outage, then the newest hundred; the oldest fifty were dropped.
    let want: Vec<String> = (0..10).chain(60..160).map(|i| format!("u{i:03}")).collect();
    assert_eq!(ids, want);
    stats.close().await;
    db.cleanup().await;
}

/// A row the database refuses is dropped and counted; the rest of its batch is written and
/// the log keeps going.
async fn refused_rows_do_not_jam(db: Db) {
    let (log, writer) = db.start(&db.config(&db.url));
    wait_for("the writer to connect", || log.connected()).await;
    let stats = db.stats().await;
    let conns = db.table("connections");
    let poison = db.table("poison");
    let ddl = match db.backend {
        Backend::Sqlite => format!(
            "CREATE TRIGGER {poison} BEFORE INSERT ON {conns} WHEN NEW.outcome = 'trap' \
             BEGIN SELECT RAISE(ABORT, 'poison'); END"
        ),
        _ => format!("ALTER TABLE {conns} ADD CONSTRAINT {poison} CHECK (outcome <> 'trap')"),
    };
    db.exec(&stats, ddl).await;
    let now = Utc::now();
    for (i, cat) in [Category::Other, Category::Trap, Category::Other, Category::Other]
        .into_iter()
        .enumerate()
    {
        log.log_connection(connection(&format!("p{i}"), now, "192.0.2.1", cat, 0));
    }
    assert_eq!(writer.shutdown(WAIT).await, 0);
    assert_eq!(log.written(), 3, "{:?}", log.last_error());
    assert_eq!(log.dropped(), 1);
    assert!(
        log.last_error().is_some_and(|e| e.contains("refused")),
        "{:?}",
        log.last_error()
    );
    assert_eq!(db.count(&stats, "connections").await, 3);
    stats.close().await;
    db.cleanup().await;
}

/// Shutdown with the database unreachable returns by its deadline and counts what it
/// could not write; rows logged afterwards are counted as dropped.
async fn shutdown_deadline(db: Db) {
    let relay = match db.backend {
        Backend::Sqlite => None,
        _ => {
            let r = Relay::start(&db.url).await;
            r.stall(true);
            Some(r)
        }
    };
    let url = match &relay {
        Some(r) => r.url.clone(),
        None => {
            let dir = db.dir.as_ref().expect("temp dir").path().join("never");
            format!("sqlite://{}/events.db", dir.display())
        }
    };
    let (log, writer) = db.start(&db.config(&url));
    for i in 0..5 {
        log.log_connection(connection(
            &format!("d{i}"),
            Utc::now(),
            "192.0.2.1",
            Category::Other,
            0,
        ));
    }
    let started = Instant::now();
    assert_eq!(writer.shutdown(Duration::from_millis(300)).await, 5);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(log.dropped(), 5);
    log.log_connection(connection("late", Utc::now(), "192.0.2.1", Category::Other, 0));
    assert_eq!(log.dropped(), 6);
    assert_eq!(log.queued(), 0);
    drop(relay);
    db.cleanup().await;
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Db::sqlite()).await;
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(db) = super::Db::from_env("THASSP_TEST_MYSQL_URL", super::Backend::MySql) {
                        super::$name(db).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(db) = super::Db::from_env("THASSP_TEST_POSTGRES_URL", super::Backend::Postgres) {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}

suite!(
    schema_created_and_reopened,
    rows_round_trip,
    batching,
    stats_match_fixture,
    retention_pruning,
    overflow_drops_oldest,
    unreachable_database,
    refused_rows_do_not_jam,
    shutdown_deadline,
);

/// Without a URL nothing is written, but the live counters count attempts by the same rule
/// as the statistics.
#[tokio::test]
async fn disabled_log_counts_live() {
    let config = EventsConfig {
        url: String::new(),
        ..EventsConfig::default()
    };
    let (log, writer) = EventLog::start(&config).expect("start");
    assert!(!log.is_enabled());
    let now = Utc::now();
    log.log_connection(connection("a", now, "192.0.2.1", Category::Pregreet, 0));
    log.log_connection(connection("b", now, "192.0.2.1", Category::Delivered, 2));
    log.log_transaction(transaction(
        "b",
        1,
        now,
        "192.0.2.1",
        "",
        &[],
        Category::Delivered,
    ));
    log.log_transaction(transaction(
        "b",
        2,
        now,
        "192.0.2.1",
        "",
        &[],
        Category::UnknownUser,
    ));
    let live: Vec<(Category, u64)> = log.since_start().into_iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(
        live,
        [
            (Category::UnknownUser, 1),
            (Category::Pregreet, 1),
            (Category::Delivered, 1)
        ]
    );
    assert_eq!((log.queued(), log.written(), log.dropped()), (0, 0, 0));
    assert_eq!(writer.shutdown(Duration::from_secs(1)).await, 0);
}

// ---------------------------------------------------------------------------------------
// Throughput

/// Sessions' worth of events (a connection and a transaction with two recipients each),
/// logged as fast as possible into a queue big enough to hold them all; reports how fast
/// the writer empties it.
async fn throughput(db: Db) {
    const SESSIONS: usize = 50_000;
    let config = EventsConfig {
        queue_size: 2 * SESSIONS,
        ..db.config(&db.url)
    };
    let (log, writer) = db.start(&config);
    wait_for("the writer to connect", || log.connected()).await;
    let now = Utc::now();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..SESSIONS {
        let sid = format!("bench{i}");
        let tx = transaction(
            &sid,
            1,
            now,
            "192.0.2.1",
            "s@example.org",
            &["a@example.net", "b@example.net"],
            Category::Delivered,
        );
        let conn = connection(&sid, now, "192.0.2.1", Category::Delivered, 1);
        let t = Instant::now();
        log.log_transaction(tx);
        log.log_connection(conn);
        slowest = slowest.max(t.elapsed());
    }
    let logged = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while log.written() < (2 * SESSIONS) as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let events = log.written();
    println!(
        "{}: {events} events ({} rows with recipients) in {:.2} s = {:.0} events/s ({:.0} rows/s); \
         logging took {:?} (slowest pair {:?}); dropped {}, errors {}",
        db.backend.name(),
        events + SESSIONS as u64 * 2,
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        (events + SESSIONS as u64 * 2) as f64 / elapsed.as_secs_f64(),
        logged,
        slowest,
        log.dropped(),
        log.write_errors()
    );
    assert_eq!(writer.shutdown(WAIT).await, 0);
    db.cleanup().await;
}

mod bench {
    #[tokio::test]
    #[ignore = "measurement: cargo test --release --test events -- --ignored --nocapture throughput"]
    async fn throughput_sqlite() {
        super::throughput(super::Db::sqlite()).await;
    }

    #[tokio::test]
    #[ignore = "measurement: cargo test --release --test events -- --ignored --nocapture throughput"]
    async fn throughput_mysql() {
        if let Some(db) = super::Db::from_env("THASSP_TEST_MYSQL_URL", super::Backend::MySql) {
            super::throughput(db).await;
        }
    }

    #[tokio::test]
    #[ignore = "measurement: cargo test --release --test events -- --ignored --nocapture throughput"]
    async fn throughput_postgres() {
        if let Some(db) = super::Db::from_env("THASSP_TEST_POSTGRES_URL", super::Backend::Postgres) {
            super::throughput(db).await;
        }
    }
}
