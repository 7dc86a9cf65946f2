//! Real sessions produce the expected event-log rows: one per attempt, each in exactly one
//! outcome category with the check that decided, and the statistics table adds up.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Client, MESSAGE, Sink, wire};
use thassp::config::Config;
use thassp::events::{EventQuery, Stats};
use thassp::policy::Category;

/// Every client presents the same public address through the PROXY header: the checks skip
/// internal addresses, and the trap's block must hit the next connection.
async fn connect(addr: std::net::SocketAddr) -> Client {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.50 192.0.2.1 40000 25\r\n")
        .await
        .unwrap();
    Client::over(tcp)
}

async fn greeted(addr: std::net::SocketAddr) -> Client {
    let mut c = connect(addr).await;
    assert!(c.reply().await.starts_with("220 "));
    c
}

#[tokio::test]
async fn sessions_become_rows_in_exactly_one_category() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    let sink = Sink::start().await;
    let text = format!(
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
        max_message_size = "4KiB"
        [upstream.main]
        address = "{}"
        [domains]
        local = ["example.com"]
        [store]
        backend = "memory"
        [events]
        url = "{url}"
        flush_interval = "100ms"
        [checks.reputation]
        enabled = false
        [checks.spf]
        enabled = false
        [checks.traps]
        local_parts = ["spamtrap"]
        [[checks.lists.blacklist]]
        senders = ["spammer.example"]
        "#,
        sink.addr
    );
    let running = common::start(Config::from_toml(&text, "t").unwrap()).await;
    let addr = running.smtp_addrs[0];

    // 1. delivered
    let mut c = greeted(addr).await;
    assert!(
        c.send_mail("a@sender.example", &["b@example.com"], &wire(MESSAGE))
            .await
            .starts_with("250")
    );
    // 2. relay attempt, then 3. unknown user, in new transactions of the same session
    c.cmd("MAIL FROM:<a@sender.example>").await;
    assert!(
        c.cmd("RCPT TO:<x@elsewhere.example>")
            .await
            .starts_with("550 5.7.1")
    );
    c.cmd("RSET").await;
    c.cmd("MAIL FROM:<a@sender.example>").await;
    assert!(
        c.cmd("RCPT TO:<unknown@example.com>")
            .await
            .starts_with("550 5.1.1")
    );
    c.cmd("QUIT").await;
    // 4. blacklisted sender
    let mut c = greeted(addr).await;
    c.cmd("EHLO client.example.net").await;
    assert!(
        c.cmd("MAIL FROM:<x@spammer.example>")
            .await
            .starts_with("550 5.7.1")
    );
    // 5. oversize message
    c.cmd("MAIL FROM:<a@sender.example>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    c.cmd("DATA").await;
    c.send(wire(
        &[
            b"Subject: big\r\n\r\n".as_slice(),
            &b"0123456789abcdef\r\n".repeat(400),
        ]
        .concat(),
    ))
    .await;
    assert!(c.reply().await.starts_with("552 5.3.4"));
    // 6. a client that disconnects in the middle of a transaction
    c.cmd("MAIL FROM:<a@sender.example>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    drop(c);
    // 7. invalid HELO, then gone (a connection without transactions)
    let mut c = greeted(addr).await;
    assert!(c.cmd("EHLO justaname").await.starts_with("504 5.5.2"));
    c.cmd("QUIT").await;
    // 8. spam trap (then the client is blocked: 9. connection refused)
    let mut c = greeted(addr).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<bot@sender.example>").await;
    assert!(
        c.cmd("RCPT TO:<spamtrap@example.com>")
            .await
            .starts_with("550 5.1.1")
    );
    c.cmd("QUIT").await;
    let mut c = connect(addr).await;
    assert!(c.reply().await.starts_with("554 5.7.1"));
    assert!(c.closed().await);
    // Let the server see every session end before stopping it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.shutdown().await;

    let stats = Stats::open_with(&url, "thassp_").await.unwrap();
    let all = EventQuery {
        limit: 1000,
        ..Default::default()
    };
    let txs = stats.transactions(&all).await.unwrap();
    let conns = stats.connections(&all).await.unwrap();
    let mut by_category: HashMap<Category, Vec<Option<String>>> = HashMap::new();
    for t in &txs {
        by_category.entry(t.outcome).or_default().push(t.check.clone());
    }
    for c in conns.iter().filter(|c| c.transactions == 0) {
        by_category.entry(c.outcome).or_default().push(c.check.clone());
    }
    let check = |cat: Category| by_category.get(&cat).cloned().unwrap_or_default();
    assert_eq!(check(Category::Delivered).len(), 1, "{by_category:?}");
    assert_eq!(
        check(Category::RelayAttempt),
        vec![Some("relay_control".to_string())]
    );
    assert_eq!(check(Category::UnknownUser), vec![Some("upstream".to_string())]);
    assert_eq!(check(Category::Blacklist), vec![Some("lists".to_string())]);
    assert_eq!(check(Category::Size), vec![Some("smtp".to_string())]);
    assert_eq!(check(Category::Aborted).len(), 1, "{by_category:?}");
    assert_eq!(check(Category::HeloInvalid), vec![Some("helo".to_string())]);
    assert_eq!(
        check(Category::Trap),
        vec![Some("traps".to_string()), Some("blocks".to_string())]
    );
    let attempts: usize = by_category.values().map(Vec::len).sum();
    assert_eq!(attempts, 9, "{by_category:?}");

    // Every connection's transaction count matches its transaction rows.
    for c in &conns {
        let rows = txs.iter().filter(|t| t.session_id == c.session_id).count();
        assert_eq!(rows as u32, c.transactions, "{c:?}");
    }
    let delivered = txs.iter().find(|t| t.outcome == Category::Delivered).unwrap();
    assert_eq!(delivered.message_id.as_deref(), Some("1@example.net"));
    assert_eq!(delivered.subject.as_deref(), Some("test"));
    assert_eq!(delivered.queue_id.as_deref(), Some("SINK1"));
    assert_eq!(delivered.recipients[0].address, "b@example.com");
    assert!(delivered.recipients[0].reply.starts_with("250"));

    // The classic table: the same nine attempts, percentages adding up to 100.
    let now = chrono::Utc::now();
    let table = stats
        .outcome_table(now - chrono::Duration::hours(1), now + chrono::Duration::hours(1))
        .await
        .unwrap();
    let total: u64 = table.iter().map(|r| r.count).sum();
    assert_eq!(total, 9);
    let percent: f64 = table.iter().map(|r| r.percent).sum();
    assert!((percent - 100.0).abs() < 0.5, "{percent}");

    // The same attempts per hour (the dashboard's traffic chart), all in this hour or the last.
    let hourly = stats
        .hourly(now - chrono::Duration::hours(2), now + chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(hourly.iter().map(|h| h.count).sum::<u64>(), 9);
    assert!(
        hourly.iter().all(|h| (now - h.hour) < chrono::Duration::hours(2)),
        "{hourly:?}"
    );

    // The same table from the command line.
    let cfg = dir.path().join("thassp.toml");
    std::fs::write(&cfg, &text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thassp"))
        .args(["stats", "--config", cfg.to_str().unwrap(), "--since", "1h"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for word in [
        "delivered",
        "trap",
        "relay_attempt",
        "unknown_user",
        "helo_invalid",
    ] {
        assert!(printed.contains(word), "{word} missing:\n{printed}");
    }
}
