//! End-to-end tests of the proxy: a real client on a real socket, thassp in-process on
//! 127.0.0.1:0, and a real upstream sink that records every byte it receives.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Client, Final, MESSAGE, Sink, config, proxy, proxy_with, start, strip_received, wire};
use thassp::app::App;
use thassp::config::Config;
use thassp::policy::{BoxFuture, Category, Check, CheckError, Context, Refusal, Stage, Verdict};
use thassp::smtp::codec::Reply;

#[tokio::test]
async fn delivers_byte_exact_with_received_header() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    // The upstream's own final reply (with its queue id) reaches the client.
    assert_eq!(r, "250 2.0.0 Ok: queued as SINK1\r\n");
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    let d = sink.deliveries();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].mail_from, "MAIL FROM:<a@example.net>");
    assert_eq!(d[0].rcpts, vec!["RCPT TO:<b@example.com>"]);
    assert_eq!(strip_received(&d[0].data), MESSAGE);
    let header = String::from_utf8_lossy(&d[0].data);
    assert!(header.starts_with("Received: from client.example.net (unknown [127.0.0.1])\r\n\tby mx.thassp.test (thassp) with ESMTP id "), "{header}");
    assert!(header.contains("\tfor <b@example.com>;"), "{header}");
    let whole = regex::Regex::new(
        r"^Received: from client\.example\.net \(unknown \[127\.0\.0\.1\]\)\r\n\tby mx\.thassp\.test \(thassp\) with ESMTP id [0-9A-F]+\.0\r\n\tfor <b@example\.com>;\r\n\t[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n[^\s]",
    )
    .unwrap();
    assert!(whole.is_match(&header), "{header}");
    running.shutdown().await;
}

#[tokio::test]
async fn ehlo_reflects_upstream_extensions_and_params_pass_through() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let ehlo = c.cmd("EHLO client.example.net").await;
    for k in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "DSN",
    ] {
        assert!(ehlo.contains(k), "{k} missing in {ehlo}");
    }
    assert!(!ehlo.contains("STARTTLS") && !ehlo.contains("CHUNKING"));
    assert!(
        c.cmd("MAIL FROM:<a@example.net> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=x1")
            .await
            .starts_with("250")
    );
    assert!(
        c.cmd("RCPT TO:<b@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@example.com")
            .await
            .starts_with("250")
    );
    assert!(
        c.cmd("MAIL FROM:<again@example.net>")
            .await
            .starts_with("503 5.5.1")
    );
    let cmds = sink.commands();
    assert!(
        cmds.contains(&"MAIL FROM:<a@example.net> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=x1".to_string()),
        "{cmds:?}"
    );
    assert!(
        cmds.contains(&"RCPT TO:<b@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@example.com".to_string())
    );
    running.shutdown().await;

    // An upstream without DSN: thassp does not advertise it and refuses its parameters.
    let (running, _sink) = proxy_with(common::Behaviour {
        ehlo_keywords: vec!["PIPELINING".into(), "8BITMIME".into()],
        ..Default::default()
    })
    .await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let ehlo = c.cmd("EHLO client.example.net").await;
    assert!(!ehlo.contains("DSN") && !ehlo.contains("SMTPUTF8"), "{ehlo}");
    assert!(
        c.cmd("MAIL FROM:<a@example.net> RET=FULL")
            .await
            .starts_with("555 5.5.4")
    );
    assert!(
        c.cmd("MAIL FROM:<a@example.net> SMTPUTF8")
            .await
            .starts_with("555 5.5.4")
    );
    assert!(c.cmd("MAIL FROM:<ü@example.net>").await.starts_with("553 5.6.7"));
    running.shutdown().await;
}

#[tokio::test]
async fn per_recipient_upstream_replies_pass_through() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.net>").await,
        "250 2.1.0 Sender ok\r\n"
    );
    assert_eq!(
        c.cmd("RCPT TO:<unknown@example.com>").await,
        "550 5.1.1 <unknown>: Recipient address rejected: User unknown\r\n"
    );
    assert_eq!(c.cmd("RCPT TO:<known@example.com>").await, "250 2.1.5 Ok\r\n");
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250 2.0.0"));
    let d = sink.deliveries();
    assert_eq!(d[0].rcpts, vec!["RCPT TO:<known@example.com>"]);
    running.shutdown().await;
}

#[tokio::test]
async fn no_valid_recipient_means_no_data() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@example.net>").await;
    c.cmd("RCPT TO:<unknown@example.com>").await;
    assert!(c.cmd("DATA").await.starts_with("554 5.5.1"));
    assert!(c.cmd("RCPT TO:<b@example.com>").await.starts_with("250"));
    assert!(!sink.commands().iter().any(|l| l == "DATA"));
    running.shutdown().await;
}

#[tokio::test]
async fn upstream_down_gives_4xx() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let running = start(config(port, "", "")).await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    assert!(c.cmd("MAIL FROM:<a@example.net>").await.starts_with("250"));
    assert_eq!(
        c.cmd("RCPT TO:<b@example.com>").await,
        "451 4.4.1 Upstream mail server unavailable, try again later\r\n"
    );
    // The session stays usable.
    assert!(c.cmd("NOOP").await.starts_with("250"));
    running.shutdown().await;
}

#[tokio::test]
async fn upstream_refusing_the_session_gives_4xx() {
    let (running, _sink) = proxy_with(common::Behaviour {
        greeting: "554 5.3.2 not now".into(),
        ..Default::default()
    })
    .await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    // The upstream is first contacted with the first RCPT (MAIL and RCPT in one group).
    assert!(c.cmd("MAIL FROM:<a@example.net>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.com>").await.starts_with("451 4.4.1"));
    assert!(c.cmd("DATA").await.starts_with("554 5.5.1"));
    running.shutdown().await;

    let (running, _sink) = proxy_with(common::Behaviour {
        refuse: true,
        ..Default::default()
    })
    .await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    // The upstream is first contacted with the first RCPT (MAIL and RCPT in one group).
    assert!(c.cmd("MAIL FROM:<a@example.net>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.com>").await.starts_with("451 4.4.1"));
    assert!(c.cmd("DATA").await.starts_with("554 5.5.1"));
    running.shutdown().await;
}

/// Sends a message whose upstream misbehaves at the end; the client must get a 4xx and
/// nothing acknowledged by the sink.
async fn final_failure(setup: impl FnOnce(&mut common::Behaviour)) -> (String, Sink) {
    let sink = Sink::start().await;
    sink.set(setup);
    let running = start(config(sink.addr, "", "")).await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let big: Vec<u8> = [MESSAGE, &b"x".repeat(900), b"\r\n"].concat().repeat(50);
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(&big))
        .await;
    running.shutdown().await;
    (r, sink)
}

#[tokio::test]
async fn upstream_dropping_mid_data_gives_4xx() {
    let (r, sink) = final_failure(|b| b.drop_after_data_bytes = Some(1000)).await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
    assert!(sink.deliveries().iter().all(|d| !d.acked));
}

#[tokio::test]
async fn upstream_dropping_before_final_reply_gives_4xx() {
    let (r, sink) = final_failure(|b| b.final_reply = Final::Drop).await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
    assert!(sink.deliveries().iter().all(|d| !d.acked));
}

#[tokio::test]
async fn upstream_stalling_gives_4xx() {
    let (r, _) = final_failure(|b| b.final_reply = Final::Stall).await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
}

#[tokio::test]
async fn upstream_garbage_gives_4xx() {
    let (r, _) = final_failure(|b| b.final_reply = Final::Reply("this is not smtp".into())).await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
}

#[tokio::test]
async fn upstream_final_refusal_passes_through() {
    let (r, _) =
        final_failure(|b| b.final_reply = Final::Reply("554 5.7.1 Message rejected as spam".into())).await;
    assert_eq!(r, "554 5.7.1 Message rejected as spam\r\n");
    let (r, _) = final_failure(|b| b.final_reply = Final::Reply("452 insufficient storage".into())).await;
    assert_eq!(r, "452 4.0.0 insufficient storage\r\n");
    // A 421 from the upstream must not make the client think thassp is closing.
    let (r, _) = final_failure(|b| b.final_reply = Final::Reply("421 4.3.0 going down".into())).await;
    assert!(r.starts_with("451 4.4.1"), "{r}");
}

#[tokio::test]
async fn relay_attempts_are_refused_and_never_reach_the_upstream() {
    let sink = Sink::start().await;
    let running = start(config(sink.addr, "max_errors = 50", "")).await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    assert!(c.cmd("MAIL FROM:<a@example.net>").await.starts_with("250"));
    let tricks = [
        "<victim@elsewhere.example>",
        "<victim%elsewhere.example@example.com>",
        "<elsewhere.example!victim@example.com>",
        "<@example.com:victim@elsewhere.example>",
        "<@elsewhere.example,@example.com:victim@example.com>",
        "<\"victim@elsewhere.example\"@example.com>",
        "<\"victim%elsewhere.example\"@example.com>",
        "<\"elsewhere!victim\"@example.com>",
        "<victim@elsewhere.example@example.com>",
        "<victim@[127.0.0.1]>",
        "<victim@[IPv6:::1]>",
        "<victim@example.com.>",
        "<victim@EXAMPLE.com.elsewhere.example>",
        "<victim@sub.example.com>",
        "<victim>",
        "<victim@example.com.elsewhere.example.>",
    ];
    for t in tricks {
        let r = c.cmd(&format!("RCPT TO:{t}")).await;
        assert!(r.starts_with("550 5.7.1"), "{t}: {r}");
    }
    // Mixed case of a local domain is local.
    assert!(c.cmd("RCPT TO:<Someone@EXAMPLE.Com>").await.starts_with("250"));
    let rcpts: Vec<String> = sink
        .commands()
        .into_iter()
        .filter(|l| l.starts_with("RCPT"))
        .collect();
    assert_eq!(rcpts, vec!["RCPT TO:<Someone@EXAMPLE.Com>"]);
    running.shutdown().await;
}

/// The smuggling variants: each tries to end DATA early and start a second message.
const SMUGGLE_ENDS: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\r\n.\r\r\n",
];

async fn smuggle(bare_policy: &str) -> Vec<(Vec<u8>, String, Sink)> {
    let mut results = Vec::new();
    for end in SMUGGLE_ENDS {
        let sink = Sink::start().await;
        let running = start(config(
            sink.addr,
            &format!("bare_line_end = \"{bare_policy}\""),
            "",
        ))
        .await;
        let mut c = Client::greeted(running.smtp_addrs[0]).await;
        let payload = [
            b"Subject: first\r\n\r\nbody".as_slice(),
            end,
            b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nhi\r\n.\r\n",
        ]
        .concat();
        let r = c.send_mail("a@example.net", &["b@example.com"], &payload).await;
        // Nothing after the real end is pending: the smuggled commands were message text.
        assert_eq!(
            c.try_reply(Duration::from_millis(200)).await,
            None,
            "extra reply for {end:?}"
        );
        running.shutdown().await;
        results.push((end.to_vec(), r, sink));
    }
    results
}

#[tokio::test]
async fn smuggling_is_rejected_by_default() {
    for (end, r, sink) in smuggle("reject").await {
        assert!(r.starts_with("550 5.6.0"), "{end:?}: {r}");
        assert!(sink.deliveries().is_empty(), "{end:?}");
        assert!(!sink.commands().iter().any(|l| l.contains("evil")), "{end:?}");
    }
}

#[tokio::test]
async fn smuggling_is_contained_when_normalising() {
    for (end, r, sink) in smuggle("normalize").await {
        assert!(r.starts_with("250"), "{end:?}: {r}");
        let d = sink.deliveries();
        assert_eq!(d.len(), 1, "{end:?}");
        // One MAIL command reached the upstream; the smuggled one is message text.
        assert_eq!(
            sink.commands().iter().filter(|l| l.starts_with("MAIL")).count(),
            1,
            "{end:?}"
        );
        let text = strip_received(&d[0].data);
        let evil = b"MAIL FROM:<evil@example.net>";
        assert!(text.windows(evil.len()).any(|w| w == evil), "{end:?}");
        // No bare CR or LF reached the upstream.
        let raw = sink.all_bytes();
        for (i, &b) in raw.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(raw[i - 1], b'\r', "{end:?}");
            }
            if b == b'\r' {
                assert_eq!(raw.get(i + 1), Some(&b'\n'), "{end:?}");
            }
        }
    }
}

#[tokio::test]
async fn split_input_one_byte_at_a_time() {
    let (running, sink) = proxy().await;
    let mut c = Client::connect(running.smtp_addrs[0]).await;
    let session = [
        b"EHLO client.example.net\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
            .as_slice(),
        &wire(MESSAGE),
        b"QUIT\r\n",
    ]
    .concat();
    for b in &session {
        c.send([*b]).await;
        c.stream.flush().await.unwrap();
    }
    let mut replies = String::new();
    loop {
        let r = c.reply().await;
        if r.is_empty() {
            break;
        }
        replies.push_str(&r);
        if r.starts_with("221") {
            break;
        }
    }
    assert!(
        replies.contains("354 ") && replies.contains("250 2.0.0 Ok: queued as SINK1"),
        "{replies}"
    );
    assert_eq!(strip_received(&sink.deliveries()[0].data), MESSAGE);
    running.shutdown().await;
}

use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn pipelined_commands_in_one_packet() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    c.send("MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<unknown@example.com>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n").await;
    assert!(c.reply().await.starts_with("250 2.1.0"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("550 5.1.1"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250 2.0.0"));
    assert_eq!(sink.deliveries()[0].rcpts.len(), 2);
    running.shutdown().await;
}

#[tokio::test]
async fn protocol_basics() {
    let sink = Sink::start().await;
    let running = start(config(sink.addr, "max_errors = 50", "")).await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    assert!(c.cmd("MAIL FROM:<a@example.net>").await.starts_with("503 5.5.1"));
    assert_eq!(c.cmd("HELO client.example.net").await, "250 mx.thassp.test\r\n");
    // No ESMTP parameters after HELO.
    assert!(
        c.cmd("MAIL FROM:<a@example.net> SIZE=10")
            .await
            .starts_with("555 5.5.4")
    );
    assert!(c.cmd("RCPT TO:<b@example.com>").await.starts_with("503 5.5.1"));
    assert!(c.cmd("DATA").await.starts_with("503 5.5.1"));
    assert!(c.cmd("VRFY someone").await.starts_with("252 2.5.0"));
    assert!(c.cmd("HELP").await.starts_with("214-2.0.0"));
    assert!(c.cmd("NOOP").await.starts_with("250 2.0.0"));
    assert!(c.cmd("RSET").await.starts_with("250 2.0.0"));
    assert!(c.cmd("EXPN list").await.starts_with("502 5.5.1"));
    assert!(c.cmd("STARTTLS").await.starts_with("502 5.5.1"));
    assert!(c.cmd("FOO").await.starts_with("500 5.5.2"));
    assert!(c.cmd("MAIL FROM:<a@b.example>x").await.starts_with("501 5.1.7"));
    assert!(
        c.cmd("MAIL FROM:<a b@example.net>")
            .await
            .starts_with("501 5.1.7")
    );
    assert!(c.cmd("EHLO").await.starts_with("501 5.5.4"));
    assert!(c.cmd("RSET\rMAIL FROM:<x@y>").await.starts_with("500 5.5.2"));
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye\r\n");
    assert!(c.closed().await);
    running.shutdown().await;
}

#[tokio::test]
async fn postmaster_without_domain_is_accepted() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let r = c.send_mail("", &["postmaster"], &wire(MESSAGE)).await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(sink.deliveries()[0].mail_from, "MAIL FROM:<>");
    assert_eq!(sink.deliveries()[0].rcpts, vec!["RCPT TO:<postmaster>"]);
    running.shutdown().await;
}

#[tokio::test]
async fn limits() {
    let sink = Sink::start().await;
    let running = start(config(
        sink.addr,
        "max_recipients = 3\nmax_message_size = \"4KiB\"\nmax_errors = 6",
        "",
    ))
    .await;
    let addr = running.smtp_addrs[0];

    // Over-long command line: refused, the session goes on.
    let mut c = Client::greeted(addr).await;
    let long = format!("NOOP {}", "x".repeat(600));
    assert!(c.cmd(&long).await.starts_with("500 5.5.2"));
    let huge = format!("NOOP {}", "x".repeat(100_000));
    assert!(c.cmd(&huge).await.starts_with("500 5.5.2"));
    assert!(c.cmd("EHLO client.example.net").await.starts_with("250"));

    // Too many recipients.
    c.cmd("MAIL FROM:<a@example.net>").await;
    for i in 0..3 {
        assert!(
            c.cmd(&format!("RCPT TO:<u{i}@example.com>"))
                .await
                .starts_with("250")
        );
    }
    assert!(c.cmd("RCPT TO:<u4@example.com>").await.starts_with("452 4.5.3"));
    assert!(c.cmd("RSET").await.starts_with("250"));

    // Declared and actual oversize.
    assert!(
        c.cmd("MAIL FROM:<a@example.net> SIZE=5000")
            .await
            .starts_with("552 5.3.4")
    );
    c.cmd("MAIL FROM:<a@example.net>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    let big = [
        b"Subject: big\r\n\r\n".as_slice(),
        &b"0123456789abcdef\r\n".repeat(400),
    ]
    .concat();
    c.send(wire(&big)).await;
    assert!(c.reply().await.starts_with("552 5.3.4"));
    assert!(sink.deliveries().is_empty());

    // Over-long text line in DATA.
    c.cmd("MAIL FROM:<a@example.net>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(
        &[b"Subject: x\r\n\r\n".as_slice(), &b"y".repeat(1200), b"\r\n"].concat(),
    ))
    .await;
    assert!(c.reply().await.starts_with("550 5.6.0"));
    assert!(sink.deliveries().is_empty());

    // Error flood: 421 and close after max_errors.
    let mut c = Client::greeted(addr).await;
    for _ in 0..5 {
        assert!(c.cmd("BOGUS").await.starts_with("500"));
    }
    let r = c.cmd("BOGUS").await;
    assert_eq!(r, "500 5.5.2 Command not recognized\r\n");
    assert!(c.reply().await.starts_with("421 4.7.0"));
    assert!(c.closed().await);
    running.shutdown().await;
}

#[tokio::test]
async fn idle_client_times_out() {
    let sink = Sink::start().await;
    let running = start(config(
        sink.addr,
        "greeting_timeout = \"300ms\"\ncommand_timeout = \"300ms\"",
        "",
    ))
    .await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let r = c.reply().await;
    assert_eq!(r, "421 4.4.2 mx.thassp.test Error: timeout exceeded\r\n");
    assert!(c.closed().await);

    // Silence in the middle of DATA: also 421, nothing delivered.
    let sink = Sink::start().await;
    let running2 = start(config(sink.addr, "data_timeout = \"300ms\"", "")).await;
    let mut c = Client::greeted(running2.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@example.net>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    c.cmd("DATA").await;
    c.send("Subject: half\r\n").await;
    assert!(c.reply().await.starts_with("421 4.4.2"));
    assert!(sink.deliveries().is_empty());
    running.shutdown().await;
    running2.shutdown().await;
}

#[tokio::test]
async fn client_disconnecting_mid_data_delivers_nothing() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@example.net>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    c.cmd("DATA").await;
    c.send("Subject: half\r\n\r\nsome text\r\n").await;
    drop(c);
    // The session ends; the upstream never saw DATA.
    for _ in 0..100 {
        if sink.commands().iter().any(|l| l == "QUIT") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sink.commands().iter().any(|l| l == "QUIT"),
        "{:?}",
        sink.commands()
    );
    assert!(!sink.commands().iter().any(|l| l == "DATA"));
    assert!(sink.deliveries().is_empty());
    running.shutdown().await;
}

#[tokio::test]
async fn routes_by_recipient_domain() {
    let sink_a = Sink::start().await;
    let sink_b = Sink::start().await;
    let text = format!(
        r#"
        [server]
        hostname = "mx.thassp.test"
        [[listener]]
        address = "127.0.0.1:0"
        [[listener]]
        address = "[::1]:0"
        [upstream.a]
        address = "{}"
        [upstream.b]
        address = "{}"
        [domains]
        default_upstream = "a"
        local = ["example.com"]
        routes = {{ "example.org" = "b" }}
        [store]
        backend = "memory"
        [events]
        url = ""
        "#,
        sink_a.addr, sink_b.addr
    );
    let running = start(Config::from_toml(&text, "t").unwrap()).await;
    assert_eq!(running.smtp_addrs.len(), 2);
    assert!(running.smtp_addrs[1].is_ipv6());
    for addr in running.smtp_addrs.clone() {
        let mut c = Client::greeted(addr).await;
        c.cmd("EHLO client.example.net").await;
        // With two upstreams the route is known only at the first recipient.
        assert_eq!(
            c.cmd("MAIL FROM:<a@example.net>").await,
            "250 2.1.0 Sender ok\r\n"
        );
        assert!(c.cmd("RCPT TO:<x@example.org>").await.starts_with("250"));
        assert!(c.cmd("RCPT TO:<y@example.com>").await.starts_with("452 4.5.3"));
        assert!(c.cmd("DATA").await.starts_with("354"));
        c.send(wire(MESSAGE)).await;
        assert!(c.reply().await.starts_with("250"));
        // The refused recipient goes in a new transaction, to the other upstream.
        let r = c
            .send_mail("a@example.net", &["y@example.com"], &wire(MESSAGE))
            .await;
        assert!(r.starts_with("250"), "{r}");
    }
    assert_eq!(sink_a.deliveries().len(), 2);
    assert_eq!(sink_b.deliveries().len(), 2);
    assert!(
        sink_a
            .deliveries()
            .iter()
            .all(|d| d.rcpts == vec!["RCPT TO:<y@example.com>"])
    );
    assert!(
        sink_b
            .deliveries()
            .iter()
            .all(|d| d.rcpts == vec!["RCPT TO:<x@example.org>"])
    );
    // The IPv6 session is recorded with an IPv6 literal.
    let last = String::from_utf8_lossy(&sink_a.deliveries()[1].data).into_owned();
    assert!(last.contains("[IPv6:::1]"), "{last}");
    running.shutdown().await;
}

/// Refuses `grey@…` after the upstream accepted it, as greylisting will.
struct LateRefusal;
impl Check for LateRefusal {
    fn name(&self) -> &'static str {
        "late_refusal"
    }
    fn stages(&self) -> &'static [Stage] {
        &[Stage::RcptAccepted]
    }
    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        let grey = cx.recipient.is_some_and(|r| r.local == "grey");
        Box::pin(async move {
            Ok(if grey {
                Verdict::TempFail(Refusal {
                    reply: Reply::build(451, "4.7.1", "Greylisted, try again later"),
                    category: Category::Greylisted,
                })
            } else {
                Verdict::Pass
            })
        })
    }
}

#[tokio::test]
async fn recipient_refused_after_upstream_accept_is_not_delivered() {
    let sink = Sink::start().await;
    let app = App::with_checks(config(sink.addr, "", ""), vec![Arc::new(LateRefusal)])
        .await
        .unwrap();
    let running = thassp::server::start(app).await.unwrap();
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@example.net>").await;
    assert!(c.cmd("RCPT TO:<ok@example.com>").await.starts_with("250"));
    assert_eq!(
        c.cmd("RCPT TO:<grey@example.com>").await,
        "451 4.7.1 Greylisted, try again later\r\n"
    );
    assert!(c.cmd("RCPT TO:<ok2@example.com>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250"));
    let d = sink.deliveries();
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].rcpts,
        vec!["RCPT TO:<ok@example.com>", "RCPT TO:<ok2@example.com>"]
    );
    // The upstream envelope was rebuilt with RSET.
    assert!(sink.commands().iter().any(|l| l == "RSET"));
    running.shutdown().await;
}

#[tokio::test]
async fn several_transactions_share_one_upstream_connection() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    for _ in 0..3 {
        let r = c
            .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
            .await;
        assert!(r.starts_with("250"));
    }
    // Abandoned transaction, then another message.
    c.cmd("MAIL FROM:<a@example.net>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    c.cmd("RSET").await;
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"));
    c.cmd("QUIT").await;
    assert_eq!(sink.deliveries().len(), 4);
    // One probe connection plus one for the session.
    assert_eq!(sink.state.lock().unwrap().connections, 2);
    running.shutdown().await;
}

#[tokio::test]
async fn mail_and_first_rcpt_go_upstream_in_one_group() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let r = c
        .send_mail(
            "a@example.net",
            &["b@example.com", "c@example.com"],
            &wire(MESSAGE),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    // An abandoned transaction: the next one starts upstream with RSET, MAIL, RCPT at once.
    c.cmd("MAIL FROM:<x@example.net>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    c.cmd("RSET").await;
    let r = c
        .send_mail("y@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    let pipelined = sink.state.lock().unwrap().pipelined.clone();
    assert!(
        pipelined.contains(&"MAIL FROM:<a@example.net>".to_string()),
        "{pipelined:?}"
    );
    assert!(pipelined.contains(&"RSET".to_string()), "{pipelined:?}");
    assert!(
        pipelined.contains(&"MAIL FROM:<y@example.net>".to_string()),
        "{pipelined:?}"
    );
    // The second recipient of a transaction waits for the first one's reply.
    assert!(!pipelined.iter().any(|l| l.starts_with("RCPT")), "{pipelined:?}");
    assert_eq!(sink.deliveries().len(), 2);
    running.shutdown().await;

    // Without PIPELINING upstream: one command at a time, same result.
    let (running, sink) = proxy_with(common::Behaviour {
        ehlo_keywords: vec!["8BITMIME".into(), "ENHANCEDSTATUSCODES".into()],
        ..Default::default()
    })
    .await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(sink.state.lock().unwrap().pipelined.is_empty());
    assert_eq!(sink.deliveries().len(), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn sender_refused_by_upstream_is_refused_at_rcpt() {
    let (running, sink) = proxy_with(common::Behaviour {
        mail_reply: "553 5.7.1 <a@example.net>: Sender address rejected".into(),
        ..Default::default()
    })
    .await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    assert!(c.cmd("MAIL FROM:<a@example.net>").await.starts_with("250"));
    assert_eq!(
        c.cmd("RCPT TO:<b@example.com>").await,
        "553 5.7.1 <a@example.net>: Sender address rejected\r\n"
    );
    assert!(c.cmd("DATA").await.starts_with("554 5.5.1"));
    // The upstream's reply to the pipelined RCPT was consumed: the session stays in step.
    sink.set(|b| b.mail_reply = "250 2.1.0 Ok".into());
    c.cmd("RSET").await;
    let r = c
        .send_mail("ok@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(sink.deliveries().len(), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn data_goes_upstream_while_the_client_sends_the_message() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@example.net>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    // The upstream already has DATA although not a byte of the message was sent.
    let mut seen = false;
    for _ in 0..200 {
        if sink.commands().iter().any(|l| l == "DATA") {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "{:?}", sink.commands());
    c.send(wire(MESSAGE)).await;
    assert!(c.reply().await.starts_with("250"));
    assert_eq!(strip_received(&sink.deliveries()[0].data), MESSAGE);
    running.shutdown().await;
}

#[tokio::test]
async fn message_refused_after_early_data_is_never_delivered() {
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@example.net>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    // A bare LF: refused by thassp after the upstream already answered DATA.
    c.send("Subject: bad\r\n\r\nbare\nline\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("550 5.6.0"));
    // The upstream connection inside DATA was closed; the next message opens a new one.
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;
    let deliveries = sink.deliveries();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(strip_received(&deliveries[0].data), MESSAGE);
    // Probe, the connection abandoned inside DATA, the one that delivered.
    assert_eq!(sink.state.lock().unwrap().connections, 3);
    running.shutdown().await;
}

#[tokio::test]
async fn upstream_size_limit_is_advertised_and_enforced_at_mail() {
    let (running, _sink) = proxy_with(common::Behaviour {
        ehlo_keywords: vec!["PIPELINING".into(), "SIZE 10000".into()],
        ..Default::default()
    })
    .await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    let ehlo = c.cmd("EHLO client.example.net").await;
    assert!(ehlo.contains("SIZE 10000\r\n"), "{ehlo}");
    assert!(
        c.cmd("MAIL FROM:<a@example.net> SIZE=20000")
            .await
            .starts_with("552 5.3.4")
    );
    assert!(
        c.cmd("MAIL FROM:<a@example.net> SIZE=5000")
            .await
            .starts_with("250")
    );
    running.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_transactions_and_closes_idle_sessions() {
    let (running, sink) = proxy().await;
    let addr = running.smtp_addrs[0];
    let mut idle = Client::greeted(addr).await;
    idle.cmd("EHLO idle.example.net").await;
    let mut busy = Client::greeted(addr).await;
    busy.cmd("EHLO busy.example.net").await;
    busy.cmd("MAIL FROM:<a@example.net>").await;
    busy.cmd("RCPT TO:<b@example.com>").await;

    let stopping = tokio::spawn(running.shutdown());
    // The idle session is told at once.
    assert_eq!(
        idle.reply().await,
        "421 4.3.2 mx.thassp.test Service shutting down, try again later\r\n"
    );
    assert!(idle.closed().await);
    // New connections are no longer accepted.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // The transaction in flight completes.
    assert!(busy.cmd("DATA").await.starts_with("354"));
    busy.send(wire(MESSAGE)).await;
    assert!(busy.reply().await.starts_with("250"));
    // …and then the session is closed instead of waiting for the next message.
    assert!(busy.reply().await.starts_with("421 4.3.2"));
    stopping.await.unwrap();
    assert_eq!(sink.deliveries().len(), 1);
}

#[tokio::test]
async fn shutdown_deadline_closes_stuck_transactions() {
    // shutdown_grace is 2s in the test config.
    let (running, sink) = proxy().await;
    let mut c = Client::greeted(running.smtp_addrs[0]).await;
    c.cmd("EHLO client.example.net").await;
    c.cmd("MAIL FROM:<a@example.net>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    c.cmd("DATA").await;
    c.send("Subject: never finished\r\n").await;
    let started = tokio::time::Instant::now();
    running.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(c.reply().await.starts_with("421 4.3.2"));
    assert!(sink.deliveries().is_empty());
}

#[tokio::test]
async fn connection_cap_answers_421() {
    let sink = Sink::start().await;
    let mut cfg = config(sink.addr, "", "");
    cfg.server.max_connections = 2;
    let running = start(cfg).await;
    let addr = running.smtp_addrs[0];
    let _a = Client::greeted(addr).await;
    let _b = Client::greeted(addr).await;
    let mut c = Client::connect(addr).await;
    assert_eq!(
        c.reply().await,
        "421 4.7.0 mx.thassp.test Too many connections, try again later\r\n"
    );
    drop(_a);
    // The slot frees when the server notices the close: retry until it has (bounded).
    let mut served = false;
    for _ in 0..200 {
        let mut d = Client::connect(addr).await;
        if d.reply().await.starts_with("220") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "the slot of the closed connection was never freed");
    running.shutdown().await;
}

#[tokio::test]
async fn ipv4_and_ipv6_wildcards_on_the_same_port() {
    let sink = Sink::start().await;
    // A free port (bound and released at once; nothing else here races for it).
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = format!(
        r#"
        [server]
        hostname = "mx.thassp.test"
        [[listener]]
        address = "0.0.0.0:{port}"
        [[listener]]
        address = "[::]:{port}"
        [upstream.main]
        address = "{}"
        [domains]
        local = ["example.com"]
        [store]
        backend = "memory"
        [events]
        url = ""
        "#,
        sink.addr
    );
    let running = start(Config::from_toml(&text, "t").unwrap()).await;
    assert_eq!(running.smtp_addrs.len(), 2);
    let v4 = Client::greeted(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let v6 = Client::greeted(format!("[::1]:{port}").parse().unwrap()).await;
    drop((v4, v6));
    running.shutdown().await;
}

/// Scores 3 at MAIL, as a soft check would.
struct ScoreAtMail;
impl Check for ScoreAtMail {
    fn name(&self) -> &'static str {
        "score_at_mail"
    }
    fn stages(&self) -> &'static [Stage] {
        &[Stage::Mail]
    }
    fn check<'a>(&'a self, _: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(async {
            Ok(Verdict::Score {
                points: 3.0,
                refusal: Refusal {
                    reply: Reply::build(550, "5.7.1", "soft"),
                    category: Category::Other,
                },
            })
        })
    }
}

#[tokio::test]
async fn message_score_adds_up_over_stages() {
    let rule = "[[checks.content.rules]]\nname = \"soft\"\nwhere = \"body\"\npattern = \"/offer/\"\naction = \"score:3\"";
    for (limit, expect) in [
        ("5", "550 5.7.1 Message refused: spam score 6.0 reaches 5.0"),
        ("8", "250"),
    ] {
        let sink = Sink::start().await;
        let cfg = config(
            sink.addr,
            "",
            &format!("[policy]\nmessage_score_limit = {limit}\n{rule}"),
        );
        let app = App::with_checks(cfg, vec![Arc::new(ScoreAtMail)]).await.unwrap();
        let running = thassp::server::start(app).await.unwrap();
        let mut c = Client::greeted(running.smtp_addrs[0]).await;
        let r = c
            .send_mail(
                "a@example.net",
                &["b@example.com"],
                &wire(b"Subject: x\r\n\r\nan offer\r\n"),
            )
            .await;
        assert!(r.starts_with(expect), "{r}");
        if expect == "250" {
            let data = String::from_utf8_lossy(&sink.deliveries()[0].data).into_owned();
            assert!(data.contains("\r\nX-Thassp-Score: 6.0\r\n"), "{data}");
        }
        running.shutdown().await;
    }
}

#[tokio::test]
async fn reload_under_load_drops_no_session() {
    let sink = Sink::start().await;
    let base = config(sink.addr, "", "");
    let app = App::new(base.clone()).await.unwrap();
    let running = thassp::server::start(app.clone()).await.unwrap();
    let addr = running.smtp_addrs[0];
    let clients: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut replies = Vec::new();
                for _ in 0..4 {
                    let mut c = Client::greeted(addr).await;
                    for _ in 0..5 {
                        replies.push(
                            c.send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
                                .await,
                        );
                    }
                    c.cmd("QUIT").await;
                }
                replies
            })
        })
        .collect();
    // Reload again and again while the clients run: new sessions take the new config,
    // running ones finish on theirs.
    let mut reloads = 0;
    while clients.iter().any(|c| !c.is_finished()) && reloads < 500 {
        let mut next = base.clone();
        next.server.hostname = Some(format!("mx{}.thassp.test", reloads % 3));
        app.reload(next).unwrap();
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for c in clients {
        for r in c.await.unwrap() {
            assert!(r.starts_with("250"), "{r}");
        }
    }
    assert!(reloads > 5, "the load ended before it overlapped reloads");
    assert_eq!(sink.deliveries().len(), 160);
    running.shutdown().await;
}
