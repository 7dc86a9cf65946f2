//! Upstream connections kept between client sessions: a later session uses a clean kept
//! connection (telling the MTA its own client with XCLIENT), never one that carried AUTH or an
//! open transaction, and a kept connection the MTA closed costs a new connection, not a 4xx.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Behaviour, Client, HangUp, MESSAGE, Sink, WAIT, start, wire};
use thassp::app::Counters;
use thassp::config::{AuthPolicy, Config};
use thassp::server::Running;

/// The common test configuration, its listener taking PROXY from loopback (so each session
/// can come from an address of its own) with AUTH offered as `auth` says.
fn cfg(upstream: SocketAddr, auth: AuthPolicy) -> Config {
    let mut config = common::config(upstream, "", "");
    let listener = &mut config.listeners[0];
    listener.proxy_protocol = true;
    listener.proxy_trusted = vec!["127.0.0.0/8".parse().unwrap()];
    listener.auth = auth;
    config
}

/// thassp ([`cfg`]) in front of a sink that behaves as told,
/// and the sink's connection count once the start-up probe is done.
async fn setup(behaviour: Behaviour, auth: AuthPolicy) -> (Sink, Running, usize) {
    let sink = Sink::start_with(behaviour).await;
    let running = start(cfg(sink.addr, auth)).await;
    let before = connections(&sink);
    (sink, running, before)
}

fn connections(sink: &Sink) -> usize {
    sink.state.lock().unwrap().connections
}

/// One client session from `ip` (through PROXY) that sends one message, sees it accepted
/// (`250`, so the upstream took it) and quits.
async fn one_message(running: &Running, ip: &str) {
    let (mut c, banner) = Client::proxied(running.smtp_addrs[0], ip).await;
    assert!(banner.starts_with("220"), "{banner}");
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "from {ip}: {r}");
    c.cmd("QUIT").await;
    common::sessions_ended(running).await;
}

fn reuses(running: &Running) -> (u64, u64) {
    let c = &running.app().snapshot().counters;
    (
        Counters::get(&c.upstream_connects),
        Counters::get(&c.upstream_reuses),
    )
}

#[tokio::test]
async fn sequential_clients_share_one_upstream_connection_each_told_by_xclient() {
    let (sink, running, before) = setup(
        Behaviour {
            xclient: true,
            ..Default::default()
        },
        AuthPolicy::default(),
    )
    .await;

    one_message(&running, "203.0.113.1").await;
    assert_eq!(running.app().snapshot().pool.len(), 1);
    one_message(&running, "203.0.113.2").await;

    assert_eq!(
        connections(&sink) - before,
        1,
        "the second session used the kept connection"
    );
    assert_eq!(reuses(&running), (1, 1));
    let deliveries = sink.deliveries();
    assert_eq!(deliveries.len(), 2);
    // The MTA was told each client before its message.
    let forwarded = sink.state.lock().unwrap().forwarded.clone();
    assert_eq!(forwarded.len(), 2, "{forwarded:?}");
    assert!(forwarded[0].contains("ADDR=203.0.113.1"), "{forwarded:?}");
    assert!(forwarded[1].contains("ADDR=203.0.113.2"), "{forwarded:?}");
    let commands = sink.commands();
    let second_xclient = commands.iter().rposition(|l| l.starts_with("XCLIENT")).unwrap();
    let second_mail = commands.iter().rposition(|l| l.starts_with("MAIL")).unwrap();
    assert!(second_xclient < second_mail, "{commands:?}");
    // The Received header names each session's own client.
    assert!(String::from_utf8_lossy(&deliveries[1].data).contains("[203.0.113.2]"));

    // Shutdown closes the kept connection with QUIT.
    let pool = running.app().snapshot().pool.clone();
    running.shutdown().await;
    assert!(pool.is_empty());
    assert_eq!(sink.commands().last().map(String::as_str), Some("QUIT"));
}

#[tokio::test]
async fn a_connection_told_one_client_serves_only_that_client_when_xclient_is_once_only() {
    let (sink, running, before) = setup(
        Behaviour {
            xclient: true,
            xclient_once: true,
            ..Default::default()
        },
        AuthPolicy::default(),
    )
    .await;
    for ip in ["203.0.113.1", "203.0.113.2", "203.0.113.1", "203.0.113.2"] {
        one_message(&running, ip).await;
    }
    // The second client cannot use the first one's connection (the MTA would attribute its
    // mail to the first); the third and fourth find their own client's connection.
    assert_eq!(connections(&sink) - before, 2);
    assert_eq!(reuses(&running), (2, 2));
    let forwarded = sink.state.lock().unwrap().forwarded.clone();
    assert_eq!(forwarded.len(), 2, "{forwarded:?}");
    // No XCLIENT was refused: none was tried on a connection told another client.
    assert!(
        !sink
            .commands()
            .iter()
            .any(|l| l.starts_with("XCLIENT") && !forwarded.contains(l))
    );
    assert_eq!(sink.deliveries().len(), 4);
    running.shutdown().await;
}

#[tokio::test]
async fn a_kept_connection_the_mta_closed_is_not_used() {
    let (sink, running, before) = setup(
        Behaviour {
            hang_up: HangUp::AfterMessage,
            ..Default::default()
        },
        AuthPolicy::default(),
    )
    .await;
    one_message(&running, "203.0.113.1").await;
    one_message(&running, "203.0.113.2").await;
    assert_eq!(connections(&sink) - before, 2);
    assert_eq!(reuses(&running), (2, 0));
    assert_eq!(sink.deliveries().len(), 2);
    running.shutdown().await;
}

#[tokio::test]
async fn a_kept_connection_closed_at_its_first_command_is_replaced_without_a_4xx() {
    let (sink, running, before) = setup(
        Behaviour {
            hang_up: HangUp::AtNextCommand,
            ..Default::default()
        },
        AuthPolicy::default(),
    )
    .await;
    one_message(&running, "203.0.113.1").await;
    // The kept connection looks open; the MTA hangs up when MAIL arrives on it.
    one_message(&running, "203.0.113.2").await;
    assert_eq!(connections(&sink) - before, 2);
    assert_eq!(reuses(&running), (2, 1));
    assert_eq!(sink.deliveries().len(), 2);
    let errors = Counters::get(&running.app().snapshot().counters.upstream_errors);
    assert_eq!(errors, 0, "a replaced kept connection is no upstream error");
    running.shutdown().await;
}

#[tokio::test]
async fn a_refused_xclient_for_the_next_client_means_a_new_connection() {
    let (sink, running, before) = setup(
        Behaviour {
            xclient: true,
            ..Default::default()
        },
        AuthPolicy::default(),
    )
    .await;
    one_message(&running, "203.0.113.1").await;
    // The MTA no longer accepts XCLIENT: the kept connection (which told it 203.0.113.1)
    // must not carry 203.0.113.2's mail.
    sink.set(|b| b.xclient = false);
    one_message(&running, "203.0.113.2").await;
    assert_eq!(connections(&sink) - before, 2);
    let commands = sink.commands();
    let refused = commands
        .iter()
        .rposition(|l| l.starts_with("XCLIENT") && l.contains("ADDR=203.0.113.2"))
        .expect("XCLIENT tried on the kept connection");
    let second_mail = commands.iter().rposition(|l| l.starts_with("MAIL")).unwrap();
    // The message went on the new connection: EHLO between the refused XCLIENT and MAIL.
    assert!(
        commands[refused..second_mail]
            .iter()
            .any(|l| l.starts_with("EHLO")),
        "{commands:?}"
    );
    assert_eq!(sink.deliveries().len(), 2);
    running.shutdown().await;
}

#[tokio::test]
async fn open_transactions_and_authenticated_sessions_never_leave_their_connection() {
    let (_sink, running, _) = setup(
        Behaviour {
            auth_users: vec![("alice".into(), "s3cret".into())],
            ..Default::default()
        },
        AuthPolicy::Always,
    )
    .await;
    let addr = running.smtp_addrs[0];
    let pool = running.app().snapshot().pool.clone();

    // A client that quits with recipients given: the upstream transaction is open.
    let (mut c, _) = Client::proxied(addr, "203.0.113.1").await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@example.net>").await;
    assert!(c.cmd("RCPT TO:<b@example.com>").await.starts_with("250"));
    c.cmd("QUIT").await;
    common::sessions_ended(&running).await;
    assert!(pool.is_empty(), "a connection inside a transaction was kept");

    // An authenticated client.
    let (mut c, _) = Client::proxied(addr, "203.0.113.2").await;
    c.cmd("EHLO client.example.net").await;
    use base64::Engine as _;
    let plain = base64::engine::general_purpose::STANDARD.encode("\0alice\0s3cret");
    assert!(c.cmd(&format!("AUTH PLAIN {plain}")).await.starts_with("235"));
    let r = c
        .send_mail("alice@example.com", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;
    common::sessions_ended(&running).await;
    assert!(pool.is_empty(), "an authenticated connection was kept");

    // A failed AUTH taints the connection too (it may be half-way through SASL).
    let (mut c, _) = Client::proxied(addr, "203.0.113.3").await;
    c.cmd("EHLO client.example.net").await;
    let wrong = base64::engine::general_purpose::STANDARD.encode("\0alice\0wrong");
    assert!(c.cmd(&format!("AUTH PLAIN {wrong}")).await.starts_with("535"));
    c.cmd("QUIT").await;
    common::sessions_ended(&running).await;
    assert!(pool.is_empty(), "a connection that carried AUTH was kept");
    running.shutdown().await;
}

#[tokio::test]
async fn reuse_off_opens_a_connection_per_session() {
    let sink = Sink::start().await;
    let mut config = cfg(sink.addr, AuthPolicy::default());
    config.upstreams.get_mut("main").unwrap().reuse_idle = Duration::ZERO;
    let running = start(config).await;
    let before = connections(&sink);
    one_message(&running, "203.0.113.1").await;
    one_message(&running, "203.0.113.2").await;
    assert_eq!(connections(&sink) - before, 2);
    assert!(running.app().snapshot().pool.is_empty());
    running.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_replaces_the_upstream_stops_using_its_kept_connections() {
    let (sink, running, before) = setup(Behaviour::default(), AuthPolicy::default()).await;
    one_message(&running, "203.0.113.1").await;
    let pool = running.app().snapshot().pool.clone();
    assert_eq!(pool.len(), 1);
    // Same settings, but the reload builds new upstreams: sessions started after it open
    // their own connection, and the old one goes at the next sweep.
    running
        .app()
        .reload(cfg(sink.addr, AuthPolicy::default()))
        .unwrap();
    one_message(&running, "203.0.113.2").await;
    assert_eq!(connections(&sink) - before, 2);
    // The periodic sweep may get there first; either way the old connection is closed with
    // QUIT (the first QUIT is the start-up probe's) and the new one stays.
    let current = running.app().snapshot().routes.upstreams.clone();
    thassp::smtp::pool::quit_all(pool.sweep(&current)).await;
    assert_eq!(pool.len(), 1, "the new upstream's connection stays");
    let deadline = tokio::time::Instant::now() + WAIT;
    while sink.commands().iter().filter(|l| *l == "QUIT").count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replaced connection was not closed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.shutdown().await;
}

#[tokio::test]
async fn a_421_at_the_next_transaction_of_a_used_connection_costs_a_new_connection() {
    let (sink, running, before) = setup(
        Behaviour {
            hang_up: HangUp::With421AtNextCommand,
            ..Default::default()
        },
        AuthPolicy::default(),
    )
    .await;
    // One client session, two messages: the MTA ends the connection with 421 at the second
    // MAIL; the client never hears of it.
    let (mut c, _) = Client::proxied(running.smtp_addrs[0], "203.0.113.1").await;
    for _ in 0..2 {
        let r = c
            .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
            .await;
        assert!(r.starts_with("250"), "{r}");
    }
    c.cmd("QUIT").await;
    common::sessions_ended(&running).await;
    assert_eq!(connections(&sink) - before, 2);
    assert_eq!(sink.deliveries().len(), 2);
    let errors = Counters::get(&running.app().snapshot().counters.upstream_errors);
    assert_eq!(errors, 0);
    running.shutdown().await;
}

#[tokio::test]
async fn a_connection_that_saw_an_error_reply_is_not_kept() {
    // MTAs count errors per connection (Postfix slows down past smtpd_soft_error_limit):
    // one session's unknown recipients must not slow the next session down.
    let (_sink, running, _) = setup(Behaviour::default(), AuthPolicy::default()).await;
    let (mut c, _) = Client::proxied(running.smtp_addrs[0], "203.0.113.1").await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@example.net>").await;
    assert!(c.cmd("RCPT TO:<unknown@example.com>").await.starts_with("550"));
    assert!(c.cmd("RCPT TO:<b@example.com>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250"));
    c.cmd("QUIT").await;
    common::sessions_ended(&running).await;
    assert!(running.app().snapshot().pool.is_empty());

    // Without the error the same session's connection is kept.
    let (mut c, _) = Client::proxied(running.smtp_addrs[0], "203.0.113.1").await;
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;
    common::sessions_ended(&running).await;
    assert_eq!(running.app().snapshot().pool.len(), 1);
    running.shutdown().await;
}
