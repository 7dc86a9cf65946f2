//! The stateful defences through real SMTP sessions: greylisting, tarpit, autoblacklist and
//! spam traps, with a manual clock instead of sleeps; state surviving a restart on SQLite;
//! and two nodes sharing one Redis (when THASSP_TEST_REDIS_URL is set).

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{Client, MESSAGE, Sink, wire};
use thassp::app::{App, Shared};
use thassp::config::Config;
use thassp::server::Running;
use thassp::store::{Clock, ManualClock, Ns, Store};

fn config_text(upstream: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"
        [server]
        hostname = "mx.thassp.test"
        shutdown_grace = "2s"
        [[listener]]
        address = "127.0.0.1:0"
        [smtp]
        max_errors = 50
        [upstream.main]
        address = "{upstream}"
        [domains]
        local = ["example.com"]
        {extra}
        "#
    )
}

struct Node {
    running: Running,
    clock: Arc<ManualClock>,
    store: Arc<dyn Store>,
}

async fn node_with(sink: &Sink, extra: &str, store: Arc<dyn Store>, clock: Arc<ManualClock>) -> Node {
    let config = Config::from_toml(&config_text(sink.addr, extra), "test").unwrap_or_else(|e| panic!("{e}"));
    let shared = Shared {
        store: store.clone(),
        clock: clock.clone(),
        events: thassp::events::EventLog::disabled(),
    };
    let app = App::with_parts(config, Vec::new(), shared).unwrap();
    let running = thassp::server::start(app).await.unwrap();
    Node {
        running,
        clock,
        store,
    }
}

async fn memory_node(sink: &Sink, extra: &str) -> Node {
    let clock = ManualClock::new(SystemTime::now());
    let store: Arc<dyn Store> = Arc::new(thassp::store::memory::MemoryStore::new(clock.clone(), 10_000));
    node_with(sink, extra, store, clock).await
}

const GREY: &str = "[checks.greylist]\nenabled = true\nby_ptr_domain = false";

/// EHLO + MAIL + one RCPT; returns the RCPT reply and the client (transaction open).
async fn rcpt(node: &Node, from: &str, to: &str) -> (String, Client) {
    let mut c = Client::greeted(node.running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    assert!(c.cmd(&format!("MAIL FROM:<{from}>")).await.starts_with("250"));
    let r = c.cmd(&format!("RCPT TO:<{to}>")).await;
    (r, c)
}

#[tokio::test]
async fn greylisting_embargo_window_and_auto_whitelist() {
    let sink = Sink::start().await;
    let node = memory_node(&sink, GREY).await;

    let (r, _) = rcpt(&node, "alice@sender.example", "bob@example.com").await;
    assert!(r.starts_with("451 4.7.1 Greylisted"), "{r}");
    assert!(r.contains("try again in 5 minute(s)"), "{r}");
    // Retrying too early: still greylisted, with the time left.
    node.clock.advance(Duration::from_secs(120));
    let (r, _) = rcpt(&node, "alice@sender.example", "bob@example.com").await;
    assert!(r.starts_with("451 4.7.1") && r.contains("3 minute(s)"), "{r}");
    // After the embargo: accepted and delivered.
    node.clock.advance(Duration::from_secs(181));
    let (r, mut c) = rcpt(&node, "alice@sender.example", "bob@example.com").await;
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250"));
    // The network is now auto-whitelisted: any sender and recipient pass at once.
    let (r, _) = rcpt(&node, "carol@other.example", "dave@example.com").await;
    assert!(r.starts_with("250"), "{r}");
    // …until the auto-whitelist expires (36 days).
    node.clock.advance(Duration::from_secs(37 * 86400));
    let (r, _) = rcpt(&node, "carol@other.example", "dave@example.com").await;
    assert!(r.starts_with("451 4.7.1"), "{r}");
    // A retry after the retry window (48 h) starts over.
    node.clock.advance(Duration::from_secs(49 * 3600));
    let (r, _) = rcpt(&node, "carol@other.example", "dave@example.com").await;
    assert!(r.starts_with("451 4.7.1") && r.contains("5 minute(s)"), "{r}");
    node.running.shutdown().await;
}

#[tokio::test]
async fn greylisting_keys_normalise_per_message_senders() {
    let sink = Sink::start().await;
    let node = memory_node(&sink, GREY).await;
    let (r, _) = rcpt(&node, "prvs=1111aaaa=bounces@lists.example", "bob@example.com").await;
    assert!(r.starts_with("451"), "{r}");
    node.clock.advance(Duration::from_secs(301));
    // Another BATV tag for the same sender: the same triplet, so it passes.
    let (r, _) = rcpt(&node, "prvs=2222bbbb=bounces@lists.example", "bob@example.com").await;
    assert!(r.starts_with("250"), "{r}");
    node.running.shutdown().await;
}

#[tokio::test]
async fn unknown_users_are_refused_as_such_never_greylisted() {
    let sink = Sink::start().await;
    let node = memory_node(&sink, GREY).await;
    let (r, _) = rcpt(&node, "alice@sender.example", "unknown@example.com").await;
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(node.store.scan(Ns::Grey, "", 10).await.unwrap().is_empty());
    node.running.shutdown().await;
}

#[tokio::test]
async fn greylisted_recipient_accepted_upstream_is_not_delivered() {
    let sink = Sink::start().await;
    let extra = format!(
        "{GREY}\n[[checks.lists.whitelist]]\nrecipients = [\"postmaster@example.com\"]\nexempt = [\"greylist\"]"
    );
    let node = memory_node(&sink, &extra).await;
    let mut c = Client::greeted(node.running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<alice@sender.example>").await;
    assert!(c.cmd("RCPT TO:<bob@example.com>").await.starts_with("451 4.7.1"));
    assert!(c.cmd("RCPT TO:<postmaster@example.com>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250"));
    let d = sink.deliveries();
    assert_eq!(d.len(), 1);
    // The upstream had accepted bob; the envelope was rebuilt without him.
    assert_eq!(d[0].rcpts, vec!["RCPT TO:<postmaster@example.com>"]);
    assert!(sink.commands().iter().any(|l| l == "RSET"));
    node.running.shutdown().await;
}

#[tokio::test]
async fn greylisting_after_data() {
    let sink = Sink::start().await;
    let node = memory_node(&sink, &format!("{GREY}\nat = \"data\"")).await;
    let (r, mut c) = rcpt(&node, "alice@sender.example", "bob@example.com").await;
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("451 4.7.1"));
    assert!(sink.deliveries().is_empty());
    node.clock.advance(Duration::from_secs(301));
    let (r, mut c) = rcpt(&node, "alice@sender.example", "bob@example.com").await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("DATA").await;
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250"));
    assert_eq!(sink.deliveries().len(), 1);
    node.running.shutdown().await;
}

/// Waits (bounded) until the background failure counting reached the store.
async fn until(mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn tarpit_then_autoblacklist_then_expiry() {
    let sink = Sink::start().await;
    let node = memory_node(
        &sink,
        "[checks.reputation]\ntarpit_after = 2\ntarpit_delay = \"300ms\"\nblock_after = 4\nblock_for = \"12h\"",
    )
    .await;
    let addr = node.running.smtp_addrs[0];
    let mut c = Client::greeted(addr).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@sender.example>").await;
    for i in 0..2 {
        assert!(
            c.cmd(&format!("RCPT TO:<x{i}@elsewhere.example>"))
                .await
                .starts_with("550 5.7.1")
        );
    }
    // Two failures: every further reply waits.
    let t = tokio::time::Instant::now();
    assert!(c.cmd("NOOP").await.starts_with("250"));
    assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
    // A new connection is tarpitted from the banner on.
    let store = node.store.clone();
    until(async || {
        store
            .scan(Ns::Reputation, "127.0.0.1|", 10)
            .await
            .unwrap()
            .iter()
            .map(|(_, r)| r.value.parse::<u64>().unwrap())
            .sum::<u64>()
            >= 2
    })
    .await;
    let t = tokio::time::Instant::now();
    let mut c2 = Client::greeted(addr).await;
    assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
    // Two more failures reach block_after: new connections are refused at once.
    c2.cmd("EHLO client.example.net").await;
    c2.cmd("MAIL FROM:<a@sender.example>").await;
    c2.cmd("RCPT TO:<y1@elsewhere.example>").await;
    c2.cmd("RCPT TO:<y2@elsewhere.example>").await;
    until(async || store.get(Ns::Block, "127.0.0.1").await.unwrap().is_some()).await;
    let mut c3 = Client::connect(addr).await;
    let r = c3.reply().await;
    assert!(r.starts_with("554 5.7.1 Client [127.0.0.1] is blocked"), "{r}");
    // The block expires with the clock.
    node.clock.advance(Duration::from_secs(13 * 3600));
    let mut c4 = Client::connect(addr).await;
    assert!(c4.reply().await.starts_with("220"));
    node.running.shutdown().await;
}

#[tokio::test]
async fn spam_trap_blocks_on_first_touch() {
    let sink = Sink::start().await;
    let node = memory_node(
        &sink,
        &format!(
            "{GREY}\n[checks.traps]\naddresses = [\"old-sales@example.com\"]\nlocal_parts = [\"spamtrap\"]"
        ),
    )
    .await;
    let addr = node.running.smtp_addrs[0];
    let (r, _) = rcpt(&node, "bot@sender.example", "Old-Sales@example.com").await;
    // Answered like an unknown user, not greylisted first.
    assert_eq!(
        r,
        "550 5.1.1 <Old-Sales@example.com>: Recipient address rejected: User unknown\r\n"
    );
    let mut c = Client::connect(addr).await;
    assert!(c.reply().await.starts_with("554 5.7.1"));
    assert!(
        !sink
            .commands()
            .iter()
            .any(|l| l.to_lowercase().contains("old-sales"))
    );
    // A trap local part works in every local domain; the block lasts 24 h by default.
    node.clock.advance(Duration::from_secs(25 * 3600));
    let (r, _) = rcpt(&node, "bot@sender.example", "spamtrap@example.com").await;
    assert!(r.starts_with("550 5.1.1"), "{r}");
    node.running.shutdown().await;
}

#[tokio::test]
async fn state_survives_a_restart_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let clock = ManualClock::new(SystemTime::now());
    let extra = format!("{GREY}\n[checks.traps]\nlocal_parts = [\"spamtrap\"]");
    let open = || async {
        let config = thassp::store::StoreConfig {
            path: dir.path().join("state.db"),
            ..Default::default()
        };
        thassp::store::open(&config, clock.clone() as Arc<dyn Clock>)
            .await
            .unwrap()
    };
    let node = node_with(&sink, &extra, open().await, clock.clone()).await;
    let (r, _) = rcpt(&node, "alice@sender.example", "bob@example.com").await;
    assert!(r.starts_with("451"), "{r}");
    let Node { running, store, .. } = node;
    running.shutdown().await;
    drop(store);

    // A restart must neither re-greylist nor forget.
    let node = node_with(&sink, &extra, open().await, clock.clone()).await;
    clock.advance(Duration::from_secs(301));
    let (r, _) = rcpt(&node, "alice@sender.example", "bob@example.com").await;
    assert!(r.starts_with("250"), "{r}");
    node.running.shutdown().await;
}
