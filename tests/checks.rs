//! Connection and envelope checks through real SMTP sessions: early talkers, per-client
//! limits, and (with the in-process DNS server) lists, HELO, PTR and DNSBL.

mod common;

use std::time::Duration;

use common::{Client, MESSAGE, Sink, config, start, wire};

#[tokio::test]
async fn pregreet_catches_early_talkers_and_serves_patient_clients() {
    let sink = Sink::start().await;
    let running = start(config(
        sink.addr,
        "",
        "[checks.pregreet]\nenabled = true\nwait = \"300ms\"",
    ))
    .await;
    let addr = running.smtp_addrs[0];

    // A patient client sees the teaser, then the banner, and is served.
    let mut c = Client::connect(addr).await;
    assert_eq!(
        c.reply().await,
        "220-mx.thassp.test ESMTP thassp\r\n220 mx.thassp.test ESMTP thassp\r\n"
    );
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");

    // A bot that talks at once is refused and disconnected.
    let mut bot = Client::connect(addr).await;
    bot.send("EHLO bot.example\r\n").await;
    let r = bot.reply().await;
    assert!(
        r.starts_with("220-") && r.contains("554 5.5.1 Protocol error: client talked before the greeting"),
        "{r}"
    );
    assert!(bot.closed().await);

    // Pipelining in a HELO session (PIPELINING not advertised) fails too.
    let mut c = Client::connect(addr).await;
    c.reply().await;
    c.send("HELO old.example\r\nMAIL FROM:<a@example.net>\r\n").await;
    let r = c.reply().await;
    assert!(
        r.starts_with("554 5.5.1 Protocol error: client sent commands without waiting"),
        "{r}"
    );
    assert!(c.closed().await);
    assert_eq!(sink.deliveries().len(), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn pregreet_in_monitor_mode_only_logs() {
    let sink = Sink::start().await;
    let running = start(config(
        sink.addr,
        "",
        "[checks.pregreet]\nenabled = true\nwait = \"200ms\"\naction = \"monitor\"",
    ))
    .await;
    let mut bot = Client::connect(running.smtp_addrs[0]).await;
    bot.send("EHLO bot.example\r\n").await;
    assert!(bot.reply().await.starts_with("220-"));
    let r = bot.reply().await;
    assert!(r.starts_with("250-mx.thassp.test"), "{r}");
    running.shutdown().await;
}

#[tokio::test]
async fn per_client_connection_limits() {
    let sink = Sink::start().await;
    let running = start(config(
        sink.addr,
        "",
        "[checks.limits]\nmax_connections_per_ip = 2",
    ))
    .await;
    let addr = running.smtp_addrs[0];
    let a = Client::greeted(addr).await;
    let _b = Client::greeted(addr).await;
    let mut c = Client::connect(addr).await;
    assert_eq!(
        c.reply().await,
        "421 4.7.0 mx.thassp.test Too many connections from your address (limit 2), try again later\r\n"
    );
    assert!(c.closed().await);
    drop(a);
    // The slot is released when the session ends.
    let mut ok = false;
    for _ in 0..100 {
        let mut d = Client::connect(addr).await;
        if d.reply().await.starts_with("220 ") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok);
    running.shutdown().await;

    let sink = Sink::start().await;
    let running = start(config(
        sink.addr,
        "",
        "[checks.limits]\nmax_connection_rate = 3\nrate_window = \"1h\"",
    ))
    .await;
    let addr = running.smtp_addrs[0];
    for _ in 0..3 {
        let mut c = Client::greeted(addr).await;
        c.cmd("QUIT").await;
    }
    let mut c = Client::connect(addr).await;
    assert!(
        c.reply()
            .await
            .starts_with("421 4.7.0 mx.thassp.test Too many connections from your address in a short time")
    );
    running.shutdown().await;
}

#[tokio::test]
async fn recipients_per_session_are_limited() {
    let sink = Sink::start().await;
    let running = start(config(
        sink.addr,
        "",
        "[checks.limits]\nmax_recipients_per_session = 3",
    ))
    .await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    for round in 0..2 {
        c.cmd("MAIL FROM:<a@example.net>").await;
        for i in 0..2 {
            let r = c.cmd(&format!("RCPT TO:<u{round}{i}@example.com>")).await;
            if round == 1 && i == 1 {
                assert_eq!(
                    r,
                    "452 4.5.3 Too many recipients in this session, try again later\r\n"
                );
            } else {
                assert!(r.starts_with("250"), "{r}");
            }
        }
        c.cmd("RSET").await;
    }
    running.shutdown().await;
}
