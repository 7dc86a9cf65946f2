//! Two thassp nodes sharing one real Redis: a greylist pass seen by node A is honoured by
//! node B, a block made by A holds on B, and with Redis cut off mid-test both nodes keep
//! answering (degraded, counted) and catch up once it is back. Needs THASSP_TEST_REDIS_URL
//! (CI sets it); skipped with a message otherwise.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use common::{Client, MESSAGE, Sink, wire};
use thassp::app::{App, Shared};
use thassp::config::Config;
use thassp::store::{Clock, ManualClock, Store, StoreBackend, StoreConfig};
use tokio::net::{TcpListener, TcpStream};

fn redis_url() -> Option<String> {
    match std::env::var("THASSP_TEST_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "THASSP_TEST_REDIS_URL must be set in CI"
            );
            println!("skipped: THASSP_TEST_REDIS_URL not set");
            None
        }
    }
}

/// A TCP relay to Redis that the test can cut (every connection dropped, new ones refused)
/// and restore, standing in for Redis going away.
struct Cuttable {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl Cuttable {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    continue;
                }
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let relay = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let watch = async {
                        while !flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    };
                    tokio::select! {
                        _ = relay => {}
                        () = watch => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

async fn node(
    sink: &Sink,
    redis: &str,
    prefix: &str,
    clock: Arc<ManualClock>,
) -> (thassp::server::Running, Arc<dyn Store>) {
    let text = format!(
        r#"
        [server]
        hostname = "mx.thassp.test"
        shutdown_grace = "2s"
        [[listener]]
        address = "127.0.0.1:0"
        proxy_protocol = true
        proxy_trusted = ["127.0.0.0/8"]
        [upstream.main]
        address = "{}"
        [domains]
        local = ["example.com"]
        [checks.greylist]
        enabled = true
        by_ptr_domain = false
        [checks.traps]
        local_parts = ["spamtrap"]
        [checks.reputation]
        enabled = false
        [checks.spf]
        enabled = false
        "#,
        sink.addr
    );
    let config = Config::from_toml(&text, "test").unwrap();
    let store_config = StoreConfig {
        backend: StoreBackend::Redis,
        redis_url: redis.to_string(),
        redis_prefix: prefix.to_string(),
        redis_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let store = thassp::store::open(&store_config, clock.clone() as Arc<dyn Clock>)
        .await
        .unwrap();
    let app = App::with_parts(
        config,
        Vec::new(),
        Shared {
            store: store.clone(),
            clock,
            events: thassp::events::EventLog::disabled(),
        },
    )
    .unwrap();
    (thassp::server::start(app).await.unwrap(), store)
}

/// A client presenting `ip` through the PROXY header; returns it and its first reply.
async fn as_client(addr: SocketAddr, ip: &str) -> (Client, String) {
    Client::proxied(addr, ip).await
}

async fn rcpt(addr: SocketAddr, ip: &str, from: &str, to: &str) -> (Client, String) {
    let (mut c, banner) = as_client(addr, ip).await;
    assert!(banner.starts_with("220"), "{banner}");
    c.cmd("EHLO client.example.net").await;
    assert!(c.cmd(&format!("MAIL FROM:<{from}>")).await.starts_with("250"));
    let r = c.cmd(&format!("RCPT TO:<{to}>")).await;
    (c, r)
}

#[tokio::test]
async fn two_nodes_share_state_and_survive_redis_going_away() {
    let Some(url) = redis_url() else { return };
    let target: SocketAddr = {
        let hostport = url
            .trim_start_matches("redis://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        tokio::net::lookup_host(hostport).await.unwrap().next().unwrap()
    };
    let relay = Cuttable::start(target).await;
    let relay_url = format!("redis://{}", relay.addr);
    let prefix = format!(
        "thassp-cluster-{}-{}:",
        std::process::id(),
        SystemTime::now().elapsed().map(|d| d.as_nanos()).unwrap_or(0)
    );
    let clock = ManualClock::new(SystemTime::now());
    let sink = Sink::start().await;
    let (a, store_a) = node(&sink, &relay_url, &prefix, clock.clone()).await;
    let (b, store_b) = node(&sink, &relay_url, &prefix, clock.clone()).await;
    let (addr_a, addr_b) = (a.smtp_addrs[0], b.smtp_addrs[0]);

    // Greylisted on A; the retry goes to B after the embargo and passes there.
    let good = "203.0.113.10";
    assert!(
        rcpt(addr_a, good, "alice@sender.example", "bob@example.com")
            .await
            .1
            .starts_with("451 4.7.1")
    );
    clock.advance(Duration::from_secs(301));
    let (mut c, r) = rcpt(addr_b, good, "alice@sender.example", "bob@example.com").await;
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250"));

    // A trap hit on B blocks the client on A too.
    let bad = "203.0.113.66";
    assert!(
        rcpt(addr_b, bad, "bot@sender.example", "spamtrap@example.com")
            .await
            .1
            .starts_with("550 5.1.1")
    );
    let (_, banner) = as_client(addr_a, bad).await;
    assert!(banner.starts_with("554 5.7.1"), "{banner}");

    // Redis goes away. Both nodes keep answering promptly from their local copies, degraded
    // and counting: the block each has seen still holds, mail keeps flowing.
    relay.set_cut(true);
    // Let the relay drop the open connections (it checks every 5 ms).
    tokio::time::sleep(Duration::from_millis(50)).await;
    for addr in [addr_a, addr_b] {
        let started = tokio::time::Instant::now();
        let (_, banner) = as_client(addr, bad).await;
        assert!(banner.starts_with("554 5.7.1"), "{banner}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // B wrote the auto-whitelist: it delivers at once.
    let (mut c, r) = rcpt(addr_b, good, "carol@other.example", "dave@example.com").await;
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250"));
    // A never read it: greylisting from its local copy is a valid answer, a hang is not.
    let started = tokio::time::Instant::now();
    let (_, r) = rcpt(addr_a, good, "carol@other.example", "dave@example.com").await;
    assert!(r.starts_with("250") || r.starts_with("451 4.7.1"), "{r}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        store_a.health().degraded && store_b.health().degraded,
        "{:?} {:?}",
        store_a.health(),
        store_b.health()
    );
    assert!(store_a.health().errors > 0 && store_b.health().errors > 0);
    assert_eq!(sink.deliveries().len(), 2);

    // Redis is back: both catch up and leave degraded mode.
    relay.set_cut(false);
    for _ in 0..100 {
        if !store_a.health().degraded && !store_b.health().degraded {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !store_a.health().degraded && !store_b.health().degraded,
        "{:?} {:?}",
        store_a.health(),
        store_b.health()
    );

    a.shutdown().await;
    b.shutdown().await;
    // Clean up this run's keys.
    if let Ok(client) = redis::Client::open(url.as_str())
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
    }
}
