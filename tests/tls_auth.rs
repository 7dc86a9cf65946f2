//! The proxy in a real deployment: STARTTLS and implicit TLS towards clients, STARTTLS
//! towards the upstream with each verification mode, AUTH relayed to the upstream, PROXY
//! protocol v1/v2, and XCLIENT/XFORWARD. Certificates are generated at test time.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Behaviour, Client, MESSAGE, Sink, start, wire};
use thassp::app::Counters;
use thassp::config::Config;
use tokio::io::AsyncWriteExt;

fn cfg(upstream: SocketAddr, listener_extra: &str, upstream_extra: &str) -> Config {
    let text = format!(
        r#"
        [server]
        hostname = "mx.thassp.test"
        shutdown_grace = "2s"
        [[listener]]
        address = "127.0.0.1:0"
        {listener_extra}
        [smtp]
        max_errors = 50
        [upstream.main]
        address = "{upstream}"
        command_timeout = "3s"
        data_timeout = "3s"
        connect_timeout = "3s"
        {upstream_extra}
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
        "#
    );
    Config::from_toml(&text, "test").unwrap_or_else(|e| panic!("{e}"))
}

fn tls_listener(pki: &common::Pki) -> String {
    format!("tls_cert = {:?}\ntls_key = {:?}\n", pki.cert_file, pki.key_file)
}

async fn tls_sink(pki: &common::Pki) -> Sink {
    Sink::start_with(Behaviour {
        tls: Some(pki.server.clone()),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn starttls_both_ways() {
    let pki = common::pki();
    let sink = tls_sink(&pki).await;
    let running = start(cfg(sink.addr, &tls_listener(&pki), "")).await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let ehlo = c.cmd("EHLO client.example.net").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS\r\n");
    let mut c = c.tls(pki.client.clone()).await;
    let ehlo = c.cmd("EHLO client.example.net").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(c.cmd("STARTTLS").await.starts_with("503 5.5.1"));
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    // The upstream leg was encrypted too (opportunistic by default).
    assert_eq!(
        sink.state.lock().unwrap().tls_sessions,
        2,
        "probe and session both used TLS"
    );
    let d = sink.deliveries();
    let header = String::from_utf8_lossy(&d[0].data).into_owned();
    assert!(header.contains("(using TLSv1.3 with cipher TLS13_"), "{header}");
    assert!(header.contains("with ESMTPS id "), "{header}");
    assert_eq!(common::strip_received(&d[0].data), MESSAGE);
    running.shutdown().await;
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_discarded() {
    let pki = common::pki();
    let sink = Sink::start().await;
    let running = start(cfg(sink.addr, &tls_listener(&pki), "")).await;
    for injected in [
        "RSET\r\n",
        "EHLO evil.example\r\nMAIL FROM:<evil@example.net>\r\n",
    ] {
        let mut c = Client::greeted(running.smtp_addrs[0]).await;
        c.cmd("EHLO client.example.net").await;
        c.send(format!("STARTTLS\r\n{injected}")).await;
        assert_eq!(c.reply().await, "220 2.0.0 Ready to start TLS\r\n");
        let mut c = c.tls(pki.client.clone()).await;
        // Had the plaintext run inside TLS, a reply would be waiting (250 to RSET/EHLO) and
        // the session would be past EHLO.
        assert_eq!(c.try_reply(Duration::from_millis(200)).await, None);
        assert!(
            c.cmd("MAIL FROM:<a@example.net>")
                .await
                .starts_with("503 5.5.1 Send HELO/EHLO first")
        );
    }
    assert!(!sink.commands().iter().any(|l| l.contains("evil")));
    running.shutdown().await;
}

#[tokio::test]
async fn implicit_tls_and_handshake_failures() {
    let pki = common::pki();
    let sink = Sink::start().await;
    let running = start(cfg(
        sink.addr,
        &format!("{}tls = \"implicit\"\n", tls_listener(&pki)),
        "",
    ))
    .await;
    let addr = running.smtp_addrs[0];
    let c = Client::connect(addr).await;
    let mut c = c.tls(pki.client.clone()).await;
    assert!(c.reply().await.starts_with("220 mx.thassp.test"));
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");

    // Garbage instead of a ClientHello: the session ends, counted, the server lives on.
    let mut bad = Client::connect(addr).await;
    bad.send("EHLO plaintext.example\r\n").await;
    assert!(bad.closed().await);
    let counters = running.app().snapshot().counters.clone();
    for _ in 0..100 {
        if Counters::get(&counters.tls_handshake_failures) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(Counters::get(&counters.tls_handshake_failures), 1);
    let c = Client::connect(addr).await;
    let mut c = c.tls(pki.client.clone()).await;
    assert!(c.reply().await.starts_with("220"));
    running.shutdown().await;
}

#[tokio::test]
async fn require_tls_refuses_plaintext_mail() {
    let pki = common::pki();
    let sink = Sink::start().await;
    let running = start(cfg(
        sink.addr,
        &format!("{}require_tls = true\n", tls_listener(&pki)),
        "",
    ))
    .await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.net>").await,
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    c.cmd("STARTTLS").await;
    let mut c = c.tls(pki.client.clone()).await;
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    running.shutdown().await;
}

/// Sends one message through a thassp configured with `upstream_extra`; returns the reply to
/// the first RCPT (where the upstream session opens) and the sink.
async fn through_upstream_tls(pki: &common::Pki, sink: &Sink, upstream_extra: &str) -> String {
    let running = start(cfg(sink.addr, "", upstream_extra)).await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    assert!(c.cmd("MAIL FROM:<a@example.net>").await.starts_with("250"));
    let r = c.cmd("RCPT TO:<b@example.com>").await;
    if r.starts_with("250") {
        assert!(c.cmd("DATA").await.starts_with("354"));
        c.send(wire(MESSAGE)).await;
        assert!(c.reply().await.starts_with("250"));
    }
    running.shutdown().await;
    let _ = pki;
    r
}

#[tokio::test]
async fn upstream_certificate_verification() {
    let pki = common::pki();
    let sink = tls_sink(&pki).await;

    // The test CA is not a system root: verification fails, and `require` means 4xx.
    let r = through_upstream_tls(&pki, &sink, "tls = \"require\"\ntls_verify = \"system\"").await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
    assert!(sink.deliveries().is_empty());

    // With the CA file configured it verifies and delivers over TLS.
    let extra = format!(
        "tls = \"require\"\ntls_verify = \"ca_file\"\ntls_ca_file = {:?}",
        pki.ca_file
    );
    let r = through_upstream_tls(&pki, &sink, &extra).await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(sink.deliveries().len(), 1);

    // A pinned certificate: the right pin works, a wrong one fails.
    let pin: String = thassp::tls::fingerprint(&pki.leaf_der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let r = through_upstream_tls(
        &pki,
        &sink,
        &format!("tls = \"require\"\ntls_verify = \"pin\"\ntls_pin_sha256 = [{pin:?}]"),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    let wrong = "00".repeat(32);
    let r = through_upstream_tls(
        &pki,
        &sink,
        &format!("tls = \"require\"\ntls_verify = \"pin\"\ntls_pin_sha256 = [{wrong:?}]"),
    )
    .await;
    assert!(r.starts_with("451 4.4.1"), "{r}");

    // Opportunistic with a failing verification falls back to plaintext and delivers.
    let before = sink.deliveries().len();
    let r = through_upstream_tls(&pki, &sink, "tls_verify = \"system\"").await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(sink.deliveries().len(), before + 1);

    // `off` never tries.
    let tls_before = sink.state.lock().unwrap().tls_sessions;
    let r = through_upstream_tls(&pki, &sink, "tls = \"off\"").await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(sink.state.lock().unwrap().tls_sessions, tls_before);
}

#[tokio::test]
async fn upstream_without_starttls_and_tls_required() {
    let pki = common::pki();
    let sink = Sink::start().await;
    let r = through_upstream_tls(&pki, &sink, "tls = \"require\"").await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
    assert!(!sink.commands().iter().any(|l| l.starts_with("MAIL")));
}

fn plain(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

async fn auth_setup(listener_extra: &str) -> (common::Pki, Sink, thassp::server::Running) {
    let pki = common::pki();
    let sink = Sink::start_with(Behaviour {
        auth_users: vec![("alice".into(), "s3cret".into())],
        ..Default::default()
    })
    .await;
    let running = start(cfg(
        sink.addr,
        &format!("{}{listener_extra}", tls_listener(&pki)),
        "",
    ))
    .await;
    (pki, sink, running)
}

#[tokio::test]
async fn auth_relayed_after_tls() {
    let (pki, sink, running) = auth_setup("").await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let ehlo = c.cmd("EHLO client.example.net").await;
    // Not before TLS (the default policy).
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert!(
        c.cmd(&format!("AUTH PLAIN {}", plain("alice", "s3cret")))
            .await
            .starts_with("538 5.7.11")
    );
    c.cmd("STARTTLS").await;
    let mut c = c.tls(pki.client.clone()).await;
    let ehlo = c.cmd("EHLO client.example.net").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");

    // A wrong password: the upstream's 535 comes back, it is counted, relaying stays denied.
    let r = c.cmd(&format!("AUTH PLAIN {}", plain("alice", "wrong"))).await;
    assert_eq!(r, "535 5.7.8 Error: authentication failed\r\n");
    assert_eq!(Counters::get(&running.app().snapshot().counters.auth_failures), 1);
    c.cmd("MAIL FROM:<alice@example.net>").await;
    assert!(
        c.cmd("RCPT TO:<friend@elsewhere.example>")
            .await
            .starts_with("550 5.7.1")
    );
    c.cmd("RSET").await;

    // Cancelling with '*'.
    assert_eq!(c.cmd("AUTH LOGIN").await, format!("334 {}\r\n", b64("Username:")));
    assert!(c.cmd("*").await.starts_with("501"));

    // LOGIN, step by step: success authenticates the session.
    assert_eq!(c.cmd("AUTH LOGIN").await, format!("334 {}\r\n", b64("Username:")));
    assert_eq!(
        c.cmd(&b64("alice")).await,
        format!("334 {}\r\n", b64("Password:"))
    );
    assert_eq!(
        c.cmd(&b64("s3cret")).await,
        "235 2.7.0 Authentication successful\r\n"
    );
    assert!(c.cmd("AUTH PLAIN x").await.starts_with("503 5.5.1"));
    // Authenticated: a recipient outside the local domains is for the upstream to decide.
    let r = c
        .send_mail("alice@example.net", &["friend@elsewhere.example"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(sink.state.lock().unwrap().authenticated, vec!["alice"]);
    let d = sink.deliveries();
    assert_eq!(d[0].rcpts, vec!["RCPT TO:<friend@elsewhere.example>"]);
    let header = String::from_utf8_lossy(&d[0].data).into_owned();
    assert!(header.contains("with ESMTPSA id "), "{header}");
    running.shutdown().await;
}

#[tokio::test]
async fn auth_plain_without_initial_response_and_policy_always() {
    let (_pki, sink, running) = auth_setup("auth = \"always\"\n").await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let ehlo = c.cmd("EHLO client.example.net").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(c.cmd("AUTH CRAM-MD5").await.starts_with("504 5.5.4"));
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 \r\n");
    assert!(c.cmd(&plain("alice", "s3cret")).await.starts_with("235"));
    assert_eq!(sink.state.lock().unwrap().authenticated, vec!["alice"]);
    running.shutdown().await;

    let (_pki, _sink, running) = auth_setup("auth = \"never\"\n").await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    assert!(!c.cmd("EHLO client.example.net").await.contains("AUTH"));
    assert!(c.cmd("AUTH PLAIN x").await.starts_with("503 5.5.1"));
    running.shutdown().await;
}

fn proxy_listener(trusted: &str) -> String {
    format!("proxy_protocol = true\nproxy_trusted = [{trusted:?}]\nproxy_timeout = \"500ms\"\n")
}

fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => unreachable!(),
    }
    h
}

#[tokio::test]
async fn proxy_protocol_carries_the_client_to_xclient() {
    let sink = Sink::start_with(Behaviour {
        xclient: true,
        ..Default::default()
    })
    .await;
    let running = start(cfg(sink.addr, &proxy_listener("127.0.0.0/8"), "")).await;
    let addr = running.smtp_addrs[0];

    // v1 TCP4, with the SMTP conversation in the same packet as the header.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 25\r\n")
        .await
        .unwrap();
    let mut c = Client::over(tcp);
    assert!(c.reply().await.starts_with("220"));
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    let forwarded = sink.state.lock().unwrap().forwarded.clone();
    let last = forwarded.last().unwrap();
    assert!(
        last.starts_with("XCLIENT ") && last.contains("ADDR=203.0.113.9") && last.contains("PORT=5555"),
        "{last}"
    );
    assert!(
        last.contains("HELO=client.example.net") && last.contains("NAME=[UNAVAILABLE]"),
        "{last}"
    );
    let header = String::from_utf8_lossy(&sink.deliveries()[0].data).into_owned();
    assert!(header.contains("[203.0.113.9]"), "{header}");

    // v2 TCP6.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&v2_header(
        "[2001:db8::7]:4000".parse().unwrap(),
        "[2001:db8::1]:25".parse().unwrap(),
    ))
    .await
    .unwrap();
    let mut c = Client::over(tcp);
    assert!(c.reply().await.starts_with("220"));
    c.send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    let forwarded = sink.state.lock().unwrap().forwarded.clone();
    assert!(
        forwarded.last().unwrap().contains("ADDR=IPV6:2001:db8::7"),
        "{forwarded:?}"
    );

    // v2 LOCAL (a balancer health check): the real peer is used.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    tcp.write_all(&local).await.unwrap();
    let mut c = Client::over(tcp);
    assert!(c.reply().await.starts_with("220"));
    assert!(c.cmd("QUIT").await.starts_with("221"));

    // Malformed header: closed without a banner.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.9  192.0.2.1 5555 25\r\n")
        .await
        .unwrap();
    let mut c = Client::over(tcp);
    assert!(c.closed().await);
    // No header at all: closed once proxy_timeout passes.
    let mut c = Client::connect(addr).await;
    assert!(c.closed().await);
    // Oversize v2 length.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut huge = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    tcp.write_all(&huge).await.unwrap();
    let mut c = Client::over(tcp);
    assert!(c.closed().await);
    assert_eq!(
        Counters::get(&running.app().snapshot().counters.proxy_protocol_refused),
        2
    );
    running.shutdown().await;
}

#[tokio::test]
async fn proxy_protocol_from_an_untrusted_source_is_refused() {
    let sink = Sink::start().await;
    let running = start(cfg(sink.addr, &proxy_listener("10.0.0.0/8"), "")).await;
    let mut tcp = tokio::net::TcpStream::connect(running.smtp_addrs[0])
        .await
        .unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 25\r\n")
        .await
        .unwrap();
    let mut c = Client::over(tcp);
    assert!(c.closed().await);
    assert_eq!(
        sink.state.lock().unwrap().connections,
        1,
        "only the start-up probe reached the upstream"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn xforward_when_xclient_is_not_offered() {
    let sink = Sink::start_with(Behaviour {
        xforward: true,
        ..Default::default()
    })
    .await;
    let running = start(cfg(sink.addr, "", "")).await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"));
    let cmds = sink.commands();
    // XFORWARD precedes each MAIL.
    let pos: Vec<usize> = cmds
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("XFORWARD"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(pos.len(), 2, "{cmds:?}");
    for p in pos {
        assert!(cmds[p + 1].starts_with("MAIL FROM:"), "{cmds:?}");
        assert!(
            cmds[p].contains("ADDR=127.0.0.1") && cmds[p].contains("SOURCE=REMOTE"),
            "{}",
            cmds[p]
        );
    }
    running.shutdown().await;

    // xclient = false: neither is sent.
    let sink = Sink::start_with(Behaviour {
        xforward: true,
        xclient: true,
        ..Default::default()
    })
    .await;
    let running = start(cfg(sink.addr, "", "xclient = false")).await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(sink.state.lock().unwrap().forwarded.is_empty());
    running.shutdown().await;
}

#[tokio::test]
async fn certificates_are_reread_on_reload() {
    let pki = common::pki();
    let sink = Sink::start().await;
    let config = cfg(sink.addr, &tls_listener(&pki), "");
    let app = thassp::app::App::new(config.clone()).await.unwrap();
    let running = thassp::server::start(app.clone()).await.unwrap();
    // A missing certificate: the reload is refused with the key, the old config stays.
    let mut broken = config.clone();
    broken.listeners[0].tls_cert = Some(pki.dir.path().join("missing.pem"));
    let err = app.reload(broken).unwrap_err().to_string();
    assert!(
        err.contains("listener[0].tls_cert") && err.contains("missing.pem"),
        "{err}"
    );
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    assert!(c.cmd("EHLO x.example").await.contains("STARTTLS"));
    // New certificate files at the same paths are picked up by the next reload.
    let fresh = common::pki();
    std::fs::copy(&fresh.cert_file, &pki.cert_file).unwrap();
    std::fs::copy(&fresh.key_file, &pki.key_file).unwrap();
    app.reload(config).unwrap();
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO x.example").await;
    c.cmd("STARTTLS").await;
    let mut c = c.tls(fresh.client.clone()).await;
    assert!(c.cmd("EHLO x.example").await.starts_with("250"));
    let _ = Arc::clone(&app);
    running.shutdown().await;
}

/// Refuses every client at connect, as a DNSBL hit would.
struct RefuseAtConnect;
impl thassp::policy::Check for RefuseAtConnect {
    fn name(&self) -> &'static str {
        "refuse_at_connect"
    }
    fn stages(&self) -> &'static [thassp::policy::Stage] {
        &[thassp::policy::Stage::Connect]
    }
    fn check<'a>(
        &'a self,
        _: &'a thassp::policy::Context<'a>,
    ) -> thassp::policy::BoxFuture<'a, Result<thassp::policy::Verdict, thassp::policy::CheckError>> {
        Box::pin(async {
            Ok(thassp::policy::Verdict::Reject(thassp::policy::Refusal {
                reply: thassp::smtp::codec::Reply::build(554, "5.7.1", "Service unavailable; client listed"),
                category: thassp::policy::Category::Dnsbl,
            }))
        })
    }
}

#[tokio::test]
async fn refusals_wait_until_mail_when_the_client_may_authenticate() {
    let pki = common::pki();
    let sink = Sink::start_with(Behaviour {
        auth_users: vec![("alice".into(), "s3cret".into())],
        ..Default::default()
    })
    .await;
    let config = cfg(sink.addr, &tls_listener(&pki), "");
    let app = thassp::app::App::with_checks(config.clone(), vec![Arc::new(RefuseAtConnect)])
        .await
        .unwrap();
    let running = thassp::server::start(app).await.unwrap();
    let addr = running.smtp_addrs[0];

    // Not authenticated: the refusal comes at MAIL.
    let mut c = Client::greeted(addr).await;
    assert!(c.cmd("EHLO client.example.net").await.starts_with("250"));
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.net>").await,
        "554 5.7.1 Service unavailable; client listed\r\n"
    );

    // Authenticated: the anti-spam verdict no longer applies.
    let mut c = Client::greeted(addr).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("STARTTLS").await;
    let mut c = c.tls(pki.client.clone()).await;
    c.cmd("EHLO client.example.net").await;
    assert!(
        c.cmd(&format!("AUTH PLAIN {}", plain("alice", "s3cret")))
            .await
            .starts_with("235")
    );
    let r = c
        .send_mail("alice@example.net", &["friend@elsewhere.example"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    running.shutdown().await;

    // A listener that can never offer AUTH refuses at once.
    let running = thassp::server::start(
        thassp::app::App::with_checks(cfg(sink.addr, "", ""), vec![Arc::new(RefuseAtConnect)])
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    let mut c = Client::connect(running.smtp_addrs[0]).await;
    assert_eq!(
        c.reply().await,
        "554 5.7.1 Service unavailable; client listed\r\n"
    );
    assert!(c.closed().await);
    running.shutdown().await;
}
