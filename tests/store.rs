//! The state store's contract, run against every backend: memory and SQLite (with a manual
//! clock), and Redis when `THASSP_TEST_REDIS_URL` is set (real TTLs of a few hundred
//! milliseconds; under `CI=true` a missing URL fails). Plus what only one backend promises:
//! SQLite state surviving a reopen, migrations and purging; two Redis "nodes" seeing each
//! other's writes; and Redis cut off mid-test through a proxy this test controls: the store
//! keeps answering from its local copy, reports itself degraded, and replays its journal
//! when Redis is back.
//!
//! Each Redis test uses its own key prefix and deletes its keys at the end (also when it
//! fails, from a drop guard).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use thassp::store::memory::MemoryStore;
use thassp::store::redis::{RedisOptions, RedisStore};
use thassp::store::sqlite::SqliteStore;
use thassp::store::{
    self, Clock, ManualClock, Ns, Store, StoreBackend, StoreConfig, StoreError, SystemClock,
};

/// Every bound on waiting in these tests.
const WAIT: Duration = Duration::from_secs(10);

// === the subject under test ===

/// How a test lets time pass for the store under test.
#[derive(Clone)]
enum Time {
    /// Expiry follows this clock: time passes instantly.
    Manual(Arc<ManualClock>),
    /// Expiry is Redis's own: time passes by sleeping (short TTLs).
    Real,
}

struct Subject {
    store: Arc<dyn Store>,
    time: Time,
}

impl Subject {
    fn manual(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> Self {
        Self {
            store,
            time: Time::Manual(clock),
        }
    }

    /// A TTL the test can wait out: any length with a manual clock; 300 ms in real time.
    fn short_ttl(&self) -> Duration {
        match self.time {
            Time::Manual(_) => Duration::from_secs(300),
            Time::Real => Duration::from_millis(300),
        }
    }

    fn now(&self) -> SystemTime {
        match &self.time {
            Time::Manual(c) => c.now(),
            Time::Real => SystemTime::now(),
        }
    }

    /// Lets `d` pass.
    async fn pass(&self, d: Duration) {
        match &self.time {
            Time::Manual(c) => c.advance(d),
            Time::Real => tokio::time::sleep(d).await,
        }
    }

    /// Lets a `short_ttl` entry written just now expire, then polls (bounded) until `key`
    /// reads as absent: Redis expires keys on its own clock.
    async fn expire(&self, ns: Ns, key: &str) {
        self.pass(self.short_ttl() + Duration::from_millis(1)).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.store.get(ns, key).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "{ns}:{key} did not expire");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How far a reported expiry may be from the one expected.
    fn slack(&self) -> Duration {
        match self.time {
            Time::Manual(_) => Duration::ZERO,
            Time::Real => Duration::from_secs(2),
        }
    }
}

fn close_to(actual: Option<SystemTime>, expected: SystemTime, slack: Duration) -> bool {
    actual.is_some_and(|a| {
        let diff = a
            .duration_since(expected)
            .or_else(|_| expected.duration_since(a).map_err(|_| ()));
        diff.is_ok_and(|d| d <= slack)
    })
}

// === the contract ===

async fn contract(s: &Subject) {
    get_put_delete(s).await;
    expiry(s).await;
    put_if_absent(s).await;
    put_if_absent_race(s).await;
    counters(s).await;
    counters_concurrent(s).await;
    counter_window(s).await;
    scan(s).await;
    namespaces(s).await;
}

async fn get_put_delete(s: &Subject) {
    let st = &s.store;
    assert_eq!(st.get(Ns::List, "gpd:missing").await.unwrap(), None);
    st.put(Ns::List, "gpd:k", "v1", None).await.unwrap();
    let r = st.get(Ns::List, "gpd:k").await.unwrap().expect("written");
    assert_eq!((r.value.as_str(), r.expires), ("v1", None));

    // Overwrite with a TTL: the value and the expiry both change.
    st.put(Ns::List, "gpd:k", "v2", Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    let r = st.get(Ns::List, "gpd:k").await.unwrap().expect("overwritten");
    assert_eq!(r.value, "v2");
    assert!(
        close_to(r.expires, s.now() + Duration::from_secs(3600), s.slack()),
        "{r:?}"
    );
    // And back to no expiry.
    st.put(Ns::List, "gpd:k", "v3", None).await.unwrap();
    assert_eq!(
        st.get(Ns::List, "gpd:k").await.unwrap().map(|r| r.expires),
        Some(None)
    );

    // Keys and values are opaque text.
    for (key, value) in [
        ("gpd:a b:c*?[x]", "é ünïcode ✓"),
        ("gpd:empty", ""),
        ("gpd:\\", "%s {} '\""),
    ] {
        st.put(Ns::List, key, value, None).await.unwrap();
        assert_eq!(
            st.get(Ns::List, key).await.unwrap().map(|r| r.value).as_deref(),
            Some(value),
            "{key}"
        );
    }

    assert!(st.delete(Ns::List, "gpd:k").await.unwrap());
    assert_eq!(st.get(Ns::List, "gpd:k").await.unwrap(), None);
    assert!(!st.delete(Ns::List, "gpd:k").await.unwrap(), "deleting twice");
    assert!(!st.delete(Ns::List, "gpd:never").await.unwrap());
}

async fn expiry(s: &Subject) {
    let st = &s.store;
    let ttl = s.short_ttl();
    st.put(Ns::Block, "exp:k", "reason", Some(ttl)).await.unwrap();
    st.put(Ns::Block, "exp:keep", "reason", Some(ttl * 100))
        .await
        .unwrap();
    let r = st
        .get(Ns::Block, "exp:k")
        .await
        .unwrap()
        .expect("live before its TTL");
    assert!(close_to(r.expires, s.now() + ttl, s.slack()), "{r:?}");
    s.expire(Ns::Block, "exp:k").await;
    assert_eq!(st.get(Ns::Block, "exp:k").await.unwrap(), None);
    assert!(
        !st.delete(Ns::Block, "exp:k").await.unwrap(),
        "an expired key does not count as deleted"
    );
    assert_eq!(
        st.scan(Ns::Block, "exp:", 10).await.unwrap().len(),
        1,
        "scan skips expired entries"
    );
    assert!(st.get(Ns::Block, "exp:keep").await.unwrap().is_some());
}

async fn put_if_absent(s: &Subject) {
    let st = &s.store;
    let ttl = s.short_ttl();
    assert!(
        st.put_if_absent(Ns::Grey, "pia:k", "first", Some(ttl))
            .await
            .unwrap()
    );
    assert!(
        !st.put_if_absent(Ns::Grey, "pia:k", "second", Some(ttl))
            .await
            .unwrap()
    );
    assert_eq!(st.get(Ns::Grey, "pia:k").await.unwrap().unwrap().value, "first");
    // An expired entry counts as absent.
    s.expire(Ns::Grey, "pia:k").await;
    assert!(st.put_if_absent(Ns::Grey, "pia:k", "third", None).await.unwrap());
    let r = st.get(Ns::Grey, "pia:k").await.unwrap().unwrap();
    assert_eq!((r.value.as_str(), r.expires), ("third", None));
    assert!(!st.put_if_absent(Ns::Grey, "pia:k", "fourth", None).await.unwrap());
    // After a delete too.
    assert!(st.delete(Ns::Grey, "pia:k").await.unwrap());
    assert!(
        st.put_if_absent(Ns::Grey, "pia:k", "fifth", Some(ttl))
            .await
            .unwrap()
    );
}

/// Many callers racing on a first greylist attempt agree on one winner and one value.
async fn put_if_absent_race(s: &Subject) {
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let st = s.store.clone();
            tokio::spawn(async move {
                let v = format!("v{i}");
                st.put_if_absent(Ns::Grey, "race:k", &v, Some(Duration::from_secs(3600)))
                    .await
                    .map(|w| (w, v))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (wrote, v) = t.await.unwrap().unwrap();
        if wrote {
            winners.push(v);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(
        s.store.get(Ns::Grey, "race:k").await.unwrap().unwrap().value,
        winners[0]
    );
}

async fn counters(s: &Subject) {
    let st = &s.store;
    let window = Duration::from_secs(3600);
    assert_eq!(st.incr(Ns::Reputation, "ctr:a", 1, window).await.unwrap(), 1);
    assert_eq!(st.incr(Ns::Reputation, "ctr:a", 5, window).await.unwrap(), 6);
    assert_eq!(st.get(Ns::Reputation, "ctr:a").await.unwrap().unwrap().value, "6");
    // A counter over a value written without expiry keeps "never".
    st.put(Ns::Reputation, "ctr:b", "10", None).await.unwrap();
    assert_eq!(st.incr(Ns::Reputation, "ctr:b", 2, window).await.unwrap(), 12);
    assert_eq!(
        st.get(Ns::Reputation, "ctr:b").await.unwrap().unwrap().expires,
        None
    );
    // A value that is not a counter is an error about the data, and stays as it was.
    st.put(Ns::Reputation, "ctr:text", "abc", None).await.unwrap();
    let e = st.incr(Ns::Reputation, "ctr:text", 1, window).await.unwrap_err();
    assert!(matches!(e, StoreError::Backend(_)), "{e:?}");
    assert_eq!(
        st.get(Ns::Reputation, "ctr:text").await.unwrap().unwrap().value,
        "abc"
    );
}

/// 50 tasks incrementing at once: no increment lost, every caller sees a distinct value.
async fn counters_concurrent(s: &Subject) {
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let st = s.store.clone();
            tokio::spawn(async move {
                st.incr(Ns::Reputation, "conc:k", 1, Duration::from_secs(3600))
                    .await
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap().unwrap());
    }
    assert_eq!(seen, (1..=50).collect::<BTreeSet<u64>>());
    assert_eq!(
        s.store
            .get(Ns::Reputation, "conc:k")
            .await
            .unwrap()
            .unwrap()
            .value,
        "50"
    );
}

/// The window is fixed when the counter is created; afterwards the counter restarts.
async fn counter_window(s: &Subject) {
    let st = &s.store;
    let window = s.short_ttl();
    assert_eq!(st.incr(Ns::Reputation, "win:k", 1, window).await.unwrap(), 1);
    let created = st.get(Ns::Reputation, "win:k").await.unwrap().unwrap().expires;
    assert!(close_to(created, s.now() + window, s.slack()), "{created:?}");
    s.pass(window / 3).await;
    // A later increment, even with a longer TTL, keeps the window's end.
    assert_eq!(st.incr(Ns::Reputation, "win:k", 1, window * 10).await.unwrap(), 2);
    let kept = st.get(Ns::Reputation, "win:k").await.unwrap().unwrap().expires;
    assert!(
        close_to(kept, created.unwrap(), s.slack() / 4 + Duration::from_millis(50)),
        "{kept:?} vs {created:?}"
    );
    s.expire(Ns::Reputation, "win:k").await;
    assert_eq!(
        st.incr(Ns::Reputation, "win:k", 1, window).await.unwrap(),
        1,
        "a new window starts at 0"
    );
}

async fn scan(s: &Subject) {
    let st = &s.store;
    st.put(Ns::List, "scan:gone", "x", Some(s.short_ttl()))
        .await
        .unwrap();
    s.expire(Ns::List, "scan:gone").await;
    for k in [
        "scan:a1", "scan:a2", "scan:a10", "scan:b1", "scan:a3", "scan:x*1", "scan:x?2", "scan:xa",
    ] {
        st.put(Ns::List, k, &format!("value of {k}"), None).await.unwrap();
    }
    let keys =
        |found: Vec<(String, thassp::store::Record)>| found.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let found = st.scan(Ns::List, "scan:a", 10).await.unwrap();
    assert_eq!(found[0].1.value, "value of scan:a1");
    assert_eq!(
        keys(found),
        ["scan:a1", "scan:a10", "scan:a2", "scan:a3"],
        "key order, only the prefix"
    );
    assert_eq!(
        keys(st.scan(Ns::List, "scan:a", 2).await.unwrap()),
        ["scan:a1", "scan:a10"],
        "limit"
    );
    assert_eq!(
        st.scan(Ns::List, "scan:", 100).await.unwrap().len(),
        8,
        "no expired entry"
    );
    assert!(st.scan(Ns::List, "scan:zz", 10).await.unwrap().is_empty());
    assert!(st.scan(Ns::List, "scan:a", 0).await.unwrap().is_empty());
    // Glob characters in a prefix are literal.
    assert_eq!(
        keys(st.scan(Ns::List, "scan:x*", 10).await.unwrap()),
        ["scan:x*1"]
    );
    assert_eq!(
        keys(st.scan(Ns::List, "scan:x?", 10).await.unwrap()),
        ["scan:x?2"]
    );
    // The empty prefix lists the namespace (other contract steps wrote List keys too).
    let all = keys(st.scan(Ns::List, "", 1000).await.unwrap());
    assert!(
        all.windows(2).all(|w| w[0] < w[1]) && all.contains(&"scan:b1".to_string()),
        "{all:?}"
    );
}

async fn namespaces(s: &Subject) {
    let st = &s.store;
    for ns in Ns::ALL {
        st.put(ns, "ns:same", ns.as_str(), None).await.unwrap();
    }
    for ns in Ns::ALL {
        assert_eq!(st.get(ns, "ns:same").await.unwrap().unwrap().value, ns.as_str());
        assert_eq!(st.scan(ns, "ns:", 10).await.unwrap().len(), 1, "{ns}");
    }
    assert!(st.delete(Ns::Block, "ns:same").await.unwrap());
    assert_eq!(st.get(Ns::Block, "ns:same").await.unwrap(), None);
    assert!(st.get(Ns::Awl, "ns:same").await.unwrap().is_some());
    assert_eq!(
        st.incr(Ns::Tarpit, "ns:ctr", 3, Duration::from_secs(60))
            .await
            .unwrap(),
        3
    );
    assert_eq!(st.get(Ns::Reputation, "ns:ctr").await.unwrap(), None);
}

fn start_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

// === memory ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_meets_the_contract() {
    let clock = ManualClock::new(start_time());
    let store = Arc::new(MemoryStore::new(clock.clone(), 10_000));
    contract(&Subject::manual(store.clone(), clock)).await;
    assert_eq!(store.evicted(), 0);
}

#[tokio::test]
async fn memory_through_open() {
    let clock = ManualClock::new(start_time());
    let config = StoreConfig {
        backend: StoreBackend::Memory,
        ..StoreConfig::default()
    };
    let store = store::open(&config, clock.clone()).await.unwrap();
    assert_eq!(store.health().backend, "memory");
    contract(&Subject::manual(store, clock)).await;
}

// === SQLite ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_meets_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(start_time());
    let config = StoreConfig {
        path: dir.path().join("state.db"),
        ..StoreConfig::default()
    };
    let store = store::open(&config, clock.clone()).await.unwrap();
    contract(&Subject::manual(store.clone(), clock)).await;
    let health = store.health();
    assert_eq!((health.backend, health.degraded), ("sqlite", false));
    // The one error on purpose: the "not a counter" step does not count as a failure of
    // SQLite (it is an answer), so nothing failed.
    assert_eq!(health.errors, 0, "{health:?}");
}

#[tokio::test]
async fn sqlite_state_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let clock = ManualClock::new(start_time());
    let day = Duration::from_secs(86_400);
    {
        let store = SqliteStore::open(&path, clock.clone()).await.unwrap();
        store
            .put(Ns::Block, "192.0.2.7", "spam trap", Some(day))
            .await
            .unwrap();
        assert!(
            store
                .put_if_absent(Ns::Grey, "t1", "1800000000000", Some(day))
                .await
                .unwrap()
        );
        assert_eq!(store.incr(Ns::Reputation, "192.0.2.8", 3, day).await.unwrap(), 3);
        store.put(Ns::List, "white:x", "1", None).await.unwrap();
        store.close().await;
    }
    clock.advance(Duration::from_secs(60));
    let store = SqliteStore::open(&path, clock.clone()).await.unwrap();
    let block = store
        .get(Ns::Block, "192.0.2.7")
        .await
        .unwrap()
        .expect("block survives");
    assert_eq!(block.value, "spam trap");
    assert_eq!(block.expires, Some(start_time() + day), "and keeps its expiry");
    assert!(
        !store
            .put_if_absent(Ns::Grey, "t1", "later", Some(day))
            .await
            .unwrap(),
        "first-seen kept"
    );
    assert_eq!(store.incr(Ns::Reputation, "192.0.2.8", 1, day).await.unwrap(), 4);
    assert!(store.get(Ns::List, "white:x").await.unwrap().is_some());
    // Expiry still follows the clock after the reopen.
    clock.advance(day);
    assert_eq!(store.get(Ns::Block, "192.0.2.7").await.unwrap(), None);
    store.close().await;
}

async fn schema_versions(path: &Path) -> Vec<i64> {
    let url = format!("sqlite://{}", path.display());
    let mut conn = <sqlx::sqlite::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT version FROM thassp_state_schema ORDER BY version")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn sqlite_migrates_once_and_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let clock: Arc<dyn Clock> = ManualClock::new(start_time());
    SqliteStore::open(&path, clock.clone())
        .await
        .unwrap()
        .close()
        .await;
    SqliteStore::open(&path, clock.clone())
        .await
        .unwrap()
        .close()
        .await;
    assert_eq!(schema_versions(&path).await, [1], "applied once");

    let url = format!("sqlite://{}", path.display());
    let mut conn = <sqlx::sqlite::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("INSERT INTO thassp_state_schema (version, applied_ms) VALUES (99, 0)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::Connection::close(conn).await.unwrap();
    let config = StoreConfig {
        path: path.clone(),
        ..StoreConfig::default()
    };
    let e = store::open(&config, clock.clone()).await.unwrap_err();
    assert!(
        e.starts_with("store.path: cannot open") && e.contains("schema version 99 is newer"),
        "{e}"
    );

    // A path that cannot be a database file says where.
    let config = StoreConfig {
        path: dir.path().join("no/such/dir/state.db"),
        ..StoreConfig::default()
    };
    let e = store::open(&config, clock).await.unwrap_err();
    assert!(
        e.starts_with("store.path: cannot open") && e.contains("no/such/dir"),
        "{e}"
    );
}

#[tokio::test]
async fn sqlite_purges_expired_rows_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let clock = ManualClock::new(start_time());
    let store = SqliteStore::open(&path, clock.clone()).await.unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let store = SqliteStore::open(&path, clock.clone());
            async move {
                let store = store.await.unwrap();
                for i in 0..300 {
                    store
                        .put(Ns::Grey, &format!("t{t}-{i}"), "x", Some(Duration::from_secs(60)))
                        .await
                        .unwrap();
                }
                store.close().await;
            }
        })
        .collect();
    futures_util::future::join_all(tasks).await;
    store
        .put(Ns::Grey, "live", "x", Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    store.put(Ns::Block, "forever", "x", None).await.unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    clock.advance(Duration::from_secs(61));
    assert_eq!(store.purge_expired().await.unwrap(), 1200);
    assert_eq!(store.scan(Ns::Grey, "", 10).await.unwrap().len(), 1);
    assert!(store.get(Ns::Block, "forever").await.unwrap().is_some());
    store.close().await;
}

// === configuration ===

#[test]
fn config_defaults_parse_and_validation() {
    let c = StoreConfig::default();
    assert_eq!(c.backend, StoreBackend::Sqlite);
    assert_eq!(c.path, Path::new("thassp-state.db"));
    assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
    assert_eq!(c.redis_prefix, "thassp:");
    assert_eq!(c.redis_timeout, Duration::from_millis(250));
    assert_eq!(c.cache_size, 100_000);
    assert!(c.validate("store").is_empty());

    let parsed: StoreConfig = toml::from_str("").unwrap();
    assert_eq!(parsed, c);
    let parsed: StoreConfig = toml::from_str(
        "backend = \"redis\"\nredis_url = \"redis://10.0.0.5:6380/2\"\nredis_timeout = \"100ms\"\ncache_size = 5",
    )
    .unwrap();
    assert_eq!(
        (parsed.backend, parsed.redis_timeout, parsed.cache_size),
        (StoreBackend::Redis, Duration::from_millis(100), 5)
    );
    assert!(toml::from_str::<StoreConfig>("backend = \"mysql\"").is_err());
    assert!(
        toml::from_str::<StoreConfig>("redis_ttl = \"1s\"")
            .unwrap_err()
            .to_string()
            .contains("unknown field")
    );

    // TLS to Redis is not compiled in (it would need redis's rustls feature): said up front.
    let tls = StoreConfig {
        redis_url: "rediss://redis.example:6380".into(),
        ..StoreConfig::default()
    };
    let errors = tls.validate("store");
    assert!(
        errors.len() == 1 && errors[0].starts_with("store.redis_url:") && errors[0].contains("TLS"),
        "{errors:?}"
    );
    let unix = StoreConfig {
        redis_url: "redis+unix:///run/redis.sock".into(),
        ..StoreConfig::default()
    };
    assert!(unix.validate("store").is_empty());

    let bad = StoreConfig {
        path: "".into(),
        redis_url: "http://example.com".into(),
        redis_prefix: "a b".into(),
        redis_timeout: Duration::ZERO,
        cache_size: 0,
        ..StoreConfig::default()
    };
    let errors = bad.validate("store");
    for key in [
        "store.path",
        "store.redis_url",
        "store.redis_prefix",
        "store.redis_timeout",
        "store.cache_size",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{key}:"))),
            "{key} missing in {errors:?}"
        );
    }
}

// === Redis ===

/// The Redis to test against, or `None` (the test is skipped) when none is configured.
fn redis_url() -> Option<String> {
    match std::env::var("THASSP_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "THASSP_TEST_REDIS_URL must be set when CI=true"
            );
            println!("skipped: THASSP_TEST_REDIS_URL not set");
            None
        }
    }
}

/// A key prefix of this test alone; its keys are deleted when the guard drops (also after a
/// failed assertion).
struct Keys {
    url: String,
    prefix: String,
}

impl Keys {
    fn new(url: &str, test: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            url: url.to_string(),
            prefix: format!("thassp-test:{}:{nanos}:{test}:", std::process::id()),
        }
    }

    fn options(&self, url: &str) -> RedisOptions {
        RedisOptions {
            url: url.to_string(),
            prefix: self.prefix.clone(),
            timeout: Duration::from_millis(250),
            cache_size: 10_000,
            probe_interval: Duration::from_millis(100),
            hot_cache_ttl: Duration::from_millis(300),
        }
    }

    /// A direct connection, to look at Redis behind the store's back.
    fn direct(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection_with_timeout(WAIT)
            .unwrap()
    }

    fn get(&self, ns: Ns, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(format!("{}{ns}:{key}", self.prefix))
            .query(&mut self.direct())
            .unwrap()
    }

    fn all(&self) -> Vec<String> {
        scan_keys(&mut self.direct(), &self.prefix).unwrap()
    }
}

fn scan_keys(conn: &mut redis::Connection, prefix: &str) -> redis::RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query(conn)?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        // Best effort and without panicking: this also runs while a failed test unwinds.
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        for k in scan_keys(&mut conn, &self.prefix).unwrap_or_default() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(k).query(&mut conn);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_meets_the_contract() {
    let Some(url) = redis_url() else { return };
    let keys = Keys::new(&url, "contract");
    let config = StoreConfig {
        backend: StoreBackend::Redis,
        redis_url: url.clone(),
        redis_prefix: keys.prefix.clone(),
        ..StoreConfig::default()
    };
    let store = store::open(&config, Arc::new(SystemClock)).await.unwrap();
    contract(&Subject {
        store: store.clone(),
        time: Time::Real,
    })
    .await;
    let health = store.health();
    assert_eq!((health.backend, health.degraded), ("redis", false), "{health:?}");
    // Every key has the layout `{prefix}{ns}:{key}`.
    assert_eq!(keys.get(Ns::Reputation, "ctr:a").as_deref(), Some("6"));
    assert!(keys.all().iter().all(|k| {
        Ns::ALL
            .iter()
            .any(|ns| k.starts_with(&format!("{}{ns}:", keys.prefix)))
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_nodes_share_state() {
    let Some(url) = redis_url() else { return };
    let keys = Keys::new(&url, "nodes");
    let a = RedisStore::open(keys.options(&url), Arc::new(SystemClock))
        .await
        .unwrap();
    let b = RedisStore::open(keys.options(&url), Arc::new(SystemClock))
        .await
        .unwrap();
    let day = Duration::from_secs(86_400);

    // A greylist entry made on A is the one B finds; B cannot restart the embargo.
    assert!(
        a.put_if_absent(Ns::Grey, "triplet", "1000", Some(day))
            .await
            .unwrap()
    );
    assert!(
        !b.put_if_absent(Ns::Grey, "triplet", "2000", Some(day))
            .await
            .unwrap()
    );
    assert_eq!(b.get(Ns::Grey, "triplet").await.unwrap().unwrap().value, "1000");
    // Counters add up across nodes.
    for i in 0..10u64 {
        let node = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            node.incr(Ns::Reputation, "192.0.2.9", 1, day).await.unwrap(),
            i + 1
        );
    }
    // A block made on A holds on B (B never read the key before, so nothing is cached).
    a.put(Ns::Block, "192.0.2.9", "autoblacklist", Some(day))
        .await
        .unwrap();
    assert_eq!(
        b.get(Ns::Block, "192.0.2.9").await.unwrap().unwrap().value,
        "autoblacklist"
    );
    // Released on A: A sees it at once; B within its hot-cache TTL (300 ms here, 5 s by
    // default) — the staleness the hot path allows.
    assert!(a.delete(Ns::Block, "192.0.2.9").await.unwrap());
    assert_eq!(a.get(Ns::Block, "192.0.2.9").await.unwrap(), None);
    let deadline = Instant::now() + Duration::from_secs(2);
    while b.get(Ns::Block, "192.0.2.9").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "B still sees the released block");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Admin listings on either node show everything.
    a.put(Ns::List, "white:1", "x", Some(day)).await.unwrap();
    b.put(Ns::List, "white:2", "x", Some(day)).await.unwrap();
    assert_eq!(a.scan(Ns::List, "white:", 10).await.unwrap().len(), 2);
    assert!(!a.health().degraded && !b.health().degraded);
}

/// What the proxy in front of Redis does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Connections are refused (accepted and closed at once) and open ones are cut.
    Cut,
    /// Nothing is forwarded, but connections (open or new) stay open: Redis looks hung.
    Stall,
}

/// A TCP proxy on 127.0.0.1 in front of the real Redis. Leaving `Up` cuts or stalls the
/// connections open so far; stalled connections stay silent even after the link is back
/// up, so the store must open new ones.
struct Proxy {
    addr: SocketAddr,
    link: watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(redis: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, rx) = watch::channel(Link::Up);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut rx = rx.clone();
                let mode = *rx.borrow_and_update();
                tokio::spawn(async move {
                    match mode {
                        Link::Cut => {}
                        Link::Stall => {
                            let _hold = client;
                            std::future::pending::<()>().await;
                        }
                        Link::Up => {
                            let Ok(mut upstream) = TcpStream::connect(redis).await else {
                                return;
                            };
                            let mut client = client;
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                                _ = rx.changed() => {
                                    // Stalled: the connection stays open and silent for good,
                                    // like a half-open TCP connection.
                                    if *rx.borrow_and_update() == Link::Stall {
                                        std::future::pending::<()>().await;
                                    }
                                }
                            }
                        }
                    }
                });
            }
        });
        Self { addr, link, task }
    }

    fn set(&self, link: Link) {
        self.link.send_replace(link);
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn redis_addr(url: &str) -> SocketAddr {
    let info = redis::Client::open(url).unwrap().get_connection_info().clone();
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => {
            let host = if host == "localhost" {
                "127.0.0.1"
            } else {
                host.as_str()
            };
            format!("{host}:{port}")
                .parse()
                .unwrap_or_else(|e| panic!("{host}:{port}: {e}"))
        }
        other => panic!("the proxy test needs a TCP Redis URL, not {other:?}"),
    }
}

/// Runs `op`, checking that it answers without error and within the Redis timeout (plus
/// scheduling slack): mail never waits on a dead Redis.
async fn quick<T>(what: &str, op: impl std::future::Future<Output = Result<T, StoreError>>) -> T {
    let started = Instant::now();
    let r = tokio::time::timeout(WAIT, op)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung"));
    let took = started.elapsed();
    assert!(took < Duration::from_millis(750), "{what} took {took:?}");
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_locally_and_replays() {
    let Some(url) = redis_url() else { return };
    let keys = Keys::new(&url, "outage");
    let proxy = Proxy::start(redis_addr(&url)).await;
    let a = RedisStore::open(keys.options(&proxy.url()), Arc::new(SystemClock))
        .await
        .unwrap();
    // Node B talks to Redis directly and stays healthy.
    let b = RedisStore::open(keys.options(&url), Arc::new(SystemClock))
        .await
        .unwrap();
    let day = Duration::from_secs(86_400);

    // Healthy: writes reach Redis (and A's local copy).
    a.put(Ns::Block, "192.0.2.1", "trap", Some(day)).await.unwrap();
    assert_eq!(a.incr(Ns::Reputation, "ctr", 2, day).await.unwrap(), 2);
    a.put(Ns::Grey, "to-delete", "x", Some(day)).await.unwrap();
    assert!(!a.health().degraded);
    let errors_before = a.health().errors;

    proxy.set(Link::Cut);
    // Every operation still answers, quickly, from what A has seen.
    assert_eq!(
        quick("get block", a.get(Ns::Block, "192.0.2.1"))
            .await
            .unwrap()
            .value,
        "trap"
    );
    assert_eq!(quick("incr", a.incr(Ns::Reputation, "ctr", 3, day)).await, 5);
    quick("put", a.put(Ns::Awl, "198.51.100.0/24", "1", Some(day))).await;
    assert!(
        quick(
            "put_if_absent",
            a.put_if_absent(Ns::Grey, "contested", "from-a", Some(day))
        )
        .await
    );
    assert!(quick("delete", a.delete(Ns::Grey, "to-delete")).await);
    assert!(quick("scan", a.scan(Ns::Block, "", 10)).await.len() == 1);
    let health = a.health();
    assert!(health.degraded, "{health:?}");
    assert!(health.errors > errors_before, "{health:?}");
    assert!(health.last_error.is_some());
    assert_eq!(a.journal_len(), 4);

    // Meanwhile the cluster goes on: B counts and wins the contested first-seen time.
    assert_eq!(b.incr(Ns::Reputation, "ctr", 10, day).await.unwrap(), 12);
    assert!(
        b.put_if_absent(Ns::Grey, "contested", "from-b", Some(day))
            .await
            .unwrap()
    );
    assert_eq!(
        keys.get(Ns::Awl, "198.51.100.0/24"),
        None,
        "A's write waits in its journal"
    );

    proxy.set(Link::Up);
    until("A to leave degraded mode", || !a.health().degraded).await;
    assert_eq!(a.journal_len(), 0);
    assert_eq!(
        keys.get(Ns::Awl, "198.51.100.0/24").as_deref(),
        Some("1"),
        "put replayed"
    );
    assert_eq!(
        keys.get(Ns::Reputation, "ctr").as_deref(),
        Some("15"),
        "local increments added"
    );
    assert_eq!(
        keys.get(Ns::Grey, "contested").as_deref(),
        Some("from-b"),
        "put_if_absent only if absent"
    );
    assert_eq!(keys.get(Ns::Grey, "to-delete"), None, "delete replayed");
    // Replayed TTLs are kept, not dropped.
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("{}awl:198.51.100.0/24", keys.prefix))
        .query(&mut keys.direct())
        .unwrap();
    assert!(pttl > 0 && pttl <= 86_400_000, "{pttl}");
    // And A reads the cluster's state again.
    assert_eq!(
        a.get(Ns::Grey, "contested").await.unwrap().unwrap().value,
        "from-b"
    );
    assert_eq!(a.incr(Ns::Reputation, "ctr", 1, day).await.unwrap(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_is_bounded_by_the_timeout() {
    let Some(url) = redis_url() else { return };
    let keys = Keys::new(&url, "hung");
    let proxy = Proxy::start(redis_addr(&url)).await;
    // Only one-sided wall-clock bounds here (at least the timeout; the local fallback well
    // under it): an upper bound on "waited for the timeout" failed once on a machine busy
    // compiling, and WAIT bounds it anyway.
    let timeout = Duration::from_secs(2);
    let options = RedisOptions {
        timeout,
        ..keys.options(&proxy.url())
    };
    let a = RedisStore::open(options, Arc::new(SystemClock)).await.unwrap();
    a.put(Ns::Grey, "k", "1", Some(Duration::from_secs(60)))
        .await
        .unwrap();

    proxy.set(Link::Stall);
    // The first operation waits for the timeout, then answers from the local copy.
    let started = Instant::now();
    let got = tokio::time::timeout(WAIT, a.get(Ns::Grey, "k"))
        .await
        .expect("bounded")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(got.unwrap().value, "1");
    assert!(took >= timeout - Duration::from_millis(50), "{took:?}");
    assert!(a.health().degraded);
    // The next ones do not wait for Redis at all (two local operations; waiting for Redis
    // would take the timeout each).
    let started = Instant::now();
    a.put(Ns::Grey, "k2", "2", Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(a.get(Ns::Grey, "k2").await.unwrap().unwrap().value, "2");
    let took = started.elapsed();
    assert!(took < timeout, "degraded operations took {took:?}");

    proxy.set(Link::Up);
    until("recovery", || !a.health().degraded).await;
    assert_eq!(keys.get(Ns::Grey, "k2").as_deref(), Some("2"));
}

#[tokio::test]
async fn redis_down_at_start_starts_degraded_with_a_bounded_journal() {
    let Some(url) = redis_url() else { return };
    let keys = Keys::new(&url, "down-at-start");
    let proxy = Proxy::start(redis_addr(&url)).await;
    proxy.set(Link::Cut);
    // A journal of 3 keys (and a local copy so small that it may evict too, so this test
    // does not look at it).
    let options = RedisOptions {
        cache_size: 3,
        ..keys.options(&proxy.url())
    };
    let a = RedisStore::open(options, Arc::new(SystemClock)).await.unwrap();
    assert!(a.health().degraded, "Redis down at start is no error");
    let minute = Some(Duration::from_secs(60));
    assert!(quick("put_if_absent", a.put_if_absent(Ns::Grey, "t", "1", minute)).await);
    // Writes to keys already journalled merge; writes to new keys past the bound stay local.
    for i in 0..4 {
        quick("put", a.put(Ns::Grey, &format!("j{i}"), "x", minute)).await;
    }
    quick("put again", a.put(Ns::Grey, "t", "2", minute)).await;
    assert_eq!((a.journal_len(), a.journal_dropped()), (3, 2));

    proxy.set(Link::Up);
    until("recovery", || !a.health().degraded).await;
    assert_eq!(keys.get(Ns::Grey, "t").as_deref(), Some("2"));
    let replayed: Vec<_> = (0..4)
        .map(|i| keys.get(Ns::Grey, &format!("j{i}")).is_some())
        .collect();
    assert_eq!(replayed, [true, true, false, false]);
}
