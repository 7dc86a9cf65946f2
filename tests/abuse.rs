//! Abuse through real sockets (DESIGN.md promise 4, "hostile input costs bounded work"):
//! slowloris, connection floods from one address and from many (PROXY protocol), 10,000
//! recipients, a message four times the size cap, an endless header line, binary garbage as
//! commands and garbage instead of a TLS handshake. Each case checks the replies, that memory
//! stays bounded where it could grow, and that a normal client is served meanwhile.
//!
//! Everything is loopback, every loop is bounded, and each test takes a few seconds at most.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Client, MESSAGE, Sink, WAIT, start, wire};
use thassp::app::Counters;
use thassp::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The tests that measure time or memory run one at a time, so they do not measure each other.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: u64 = 1024 * 1024;

/// A configuration with `server`, `listener`, `smtp` lines added to those sections and `extra`
/// sections appended. Stateful checks, SPF (DNS) and the event log are off, as they would only
/// slow these tests down.
fn cfg(upstream: SocketAddr, server: &str, listener: &str, smtp: &str, extra: &str) -> Config {
    let text = format!(
        r#"
        [server]
        hostname = "mx.thassp.test"
        shutdown_grace = "1s"
        {server}
        [[listener]]
        address = "127.0.0.1:0"
        {listener}
        [smtp]
        {smtp}
        [upstream.main]
        address = "{upstream}"
        command_timeout = "5s"
        data_timeout = "5s"
        connect_timeout = "2s"
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
        {extra}
        "#
    );
    Config::from_toml(&text, "abuse").unwrap_or_else(|e| panic!("{e}"))
}

/// This process's resident set (thassp runs in it), from /proc/self/status.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure can be reproduced.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 32) as u8).collect()
    }
}

/// Reads everything until the server closes (EOF or reset) or `WAIT` passes; returns the bytes
/// and whether the connection was closed.
async fn drain(stream: &mut (impl AsyncReadExt + Unpin)) -> (Vec<u8>, bool) {
    let mut all = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (all, false),
            Ok(Ok(0) | Err(_)) => return (all, true),
            Ok(Ok(n)) => all.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A normal client delivering one message; returns how long it took.
async fn deliver(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut c = Client::greeted(addr).await;
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250 "), "{r}");
    assert!(c.cmd("QUIT").await.starts_with("221"));
    started.elapsed()
}

/// Polls `f` every 20 ms until it is true, for `WAIT` at most.
async fn eventually(mut f: impl AsyncFnMut() -> bool) -> bool {
    for _ in 0..(WAIT.as_millis() / 20) {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------------------------

/// 200 connections each trickle one byte every 200 ms, never finishing a command: each gets
/// `421 4.4.2` once `command_timeout` (1 s) has passed for the command, however many bytes
/// keep arriving, and is closed. A normal client is served at full speed meanwhile.
#[tokio::test]
async fn slowloris_connections_time_out_and_others_are_served() {
    let _heavy = HEAVY.lock().await;
    let sink = Sink::start().await;
    let running = start(cfg(
        sink.addr,
        "",
        "",
        "greeting_timeout = \"1s\"\ncommand_timeout = \"1s\"",
        "[checks.limits]\nmax_connections_per_ip = 0",
    ))
    .await;
    let addr = running.smtp_addrs[0];
    const SLOW: usize = 200;
    let trickling = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SLOW {
        let trickling = trickling.clone();
        tasks.spawn(async move {
            let mut c = Client::greeted(addr).await;
            // Half trickle their first command (greeting_timeout), half a later one.
            if i % 2 == 1 {
                assert!(c.cmd("EHLO slow.example.net").await.starts_with("250"));
            }
            trickling.fetch_add(1, Ordering::SeqCst);
            let started = Instant::now();
            let text = b"MAIL FROM:<slow@example.net> SIZE=1000";
            // 50 bytes x 200 ms = 10 s at most; the line never ends.
            for k in 0..50 {
                if c.stream.write_all(&text[k % text.len()..][..1]).await.is_err() {
                    break;
                }
                if let Some(reply) = c.try_reply(Duration::from_millis(200)).await {
                    let closed = c.closed().await;
                    return (reply, started.elapsed(), closed);
                }
            }
            let reply = c.try_reply(Duration::from_millis(200)).await.unwrap_or_default();
            (reply, started.elapsed(), false)
        });
    }
    assert!(
        eventually(async || trickling.load(Ordering::SeqCst) == SLOW).await,
        "the slow clients were not all greeted"
    );
    // All 200 are holding a connection and trickling: a real client is not slowed down.
    let took = deliver(addr).await;
    assert!(took < Duration::from_secs(2), "normal delivery took {took:?}");

    let mut slowest = Duration::ZERO;
    while let Some(joined) = tasks.join_next().await {
        let (reply, elapsed, closed) = joined.unwrap();
        assert_eq!(
            reply, "421 4.4.2 mx.thassp.test Error: timeout exceeded\r\n",
            "after {elapsed:?} of trickling"
        );
        assert!(closed, "still open after the 421");
        slowest = slowest.max(elapsed);
    }
    // One second per command, whatever trickles in; a little slack for a loaded machine.
    assert!(
        slowest < Duration::from_secs(4),
        "slowest timeout after {slowest:?}"
    );
    eprintln!("slowloris: {SLOW} connections timed out, slowest after {slowest:?}; normal delivery {took:?}");
    assert_eq!(sink.deliveries().len(), 1);
    running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Connection floods
// ---------------------------------------------------------------------------------------------

/// One address opens connection after connection: the 11th concurrent one gets `421 4.7.0`
/// and is closed, and so does every further one while ten are held; one closing frees a slot.
#[tokio::test]
async fn connection_flood_from_one_address() {
    let sink = Sink::start().await;
    let running = start(cfg(
        sink.addr,
        "",
        "",
        "",
        "[checks.limits]\nmax_connections_per_ip = 10",
    ))
    .await;
    let addr = running.smtp_addrs[0];
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(Client::greeted(addr).await);
    }
    for _ in 0..50 {
        let mut c = Client::connect(addr).await;
        let r = c.reply().await;
        assert!(
            r.starts_with("421 4.7.0 mx.thassp.test Too many connections from your address (limit 10)"),
            "{r}"
        );
        assert!(c.closed().await);
    }
    // The ten held sessions are untouched.
    for c in &mut held {
        assert!(c.cmd("NOOP").await.starts_with("250"));
    }
    // One leaves: its slot is free again once thassp has seen it go.
    drop(held.pop());
    assert!(
        eventually(async || {
            let mut c = Client::connect(addr).await;
            let r = c.reply().await;
            if r.starts_with("220 ") {
                held.push(c);
                true
            } else {
                false
            }
        })
        .await,
        "no slot after a connection closed"
    );
    assert_eq!(held.len(), 10);
    drop(held);
    // And mail flows.
    assert!(eventually(async || Client::connect(addr).await.reply().await.starts_with("220 ")).await);
    deliver(addr).await;
    running.shutdown().await;
}

/// Connects through the PROXY protocol as `ip`; returns the client and the first reply.
async fn as_client(addr: SocketAddr, ip: &str) -> (Client, String) {
    Client::proxied(addr, ip).await
}

/// Many addresses (through a trusted balancer speaking the PROXY protocol) fill
/// `server.max_connections`: the next connection gets `421 4.7.0` before anything is read
/// from it; held sessions keep working and a freed slot is taken again.
#[tokio::test]
async fn connection_flood_from_many_addresses() {
    let sink = Sink::start().await;
    let running = start(cfg(
        sink.addr,
        "max_connections = 30",
        "proxy_protocol = true\nproxy_trusted = [\"127.0.0.0/8\"]",
        "",
        "[checks.limits]\nmax_connections_per_ip = 10",
    ))
    .await;
    let addr = running.smtp_addrs[0];
    let mut held = Vec::new();
    for i in 0..30 {
        let (c, first) = as_client(addr, &format!("203.0.113.{}", i + 1)).await;
        assert!(first.starts_with("220 "), "client {i}: {first}");
        held.push(c);
    }
    for _ in 0..20 {
        // Refused before the PROXY header is even read.
        let mut c = Client::connect(addr).await;
        assert_eq!(
            c.reply().await,
            "421 4.7.0 mx.thassp.test Too many connections, try again later\r\n"
        );
        assert!(c.closed().await);
    }
    // A held session delivers mail as usual.
    let r = held[7]
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250 "), "{r}");
    // Five leave; five new addresses get in once thassp has seen them go.
    held.truncate(25);
    let mut next = 0;
    assert!(
        eventually(async || {
            next += 1;
            let ip = format!("198.51.{}.{}", next / 200, next % 200 + 1);
            let (c, first) = as_client(addr, &ip).await;
            if first.starts_with("220 ") {
                held.push(c);
            }
            held.len() == 30
        })
        .await,
        "freed slots were not taken again ({} held)",
        held.len()
    );
    assert_eq!(sink.deliveries().len(), 1);
    running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 10,000 recipients
// ---------------------------------------------------------------------------------------------

/// 10,000 RCPT commands in one transaction, pipelined: the first `max_recipients` (100) are
/// accepted, every further one gets `452 4.5.3`; the session survives and delivers to the 100,
/// and another client is served while the flood goes on.
#[tokio::test]
async fn ten_thousand_recipients() {
    let sink = Sink::start().await;
    let running = start(cfg(sink.addr, "", "", "", "")).await;
    let addr = running.smtp_addrs[0];
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        let mut c = Client::greeted(addr).await;
        assert!(c.cmd("EHLO many.example.net").await.starts_with("250"));
        assert!(c.cmd("MAIL FROM:<a@example.net>").await.starts_with("250"));
        const BATCH: usize = 500;
        for batch in 0..10_000 / BATCH {
            let lines: String = (0..BATCH)
                .map(|j| format!("RCPT TO:<user{}@example.com>\r\n", batch * BATCH + j))
                .collect();
            c.send(lines).await;
            for j in 0..BATCH {
                let i = batch * BATCH + j;
                let r = c.reply().await;
                if i < 100 {
                    assert!(r.starts_with("250 "), "recipient {i}: {r}");
                } else {
                    assert!(r.starts_with("452 4.5.3 "), "recipient {i}: {r}");
                }
            }
        }
        assert!(c.cmd("DATA").await.starts_with("354"));
        c.send(wire(MESSAGE)).await;
        let r = c.reply().await;
        assert!(r.starts_with("250 "), "{r}");
        assert!(c.cmd("NOOP").await.starts_with("250"));
        assert!(c.cmd("QUIT").await.starts_with("221"));
    });
    // Another client meanwhile.
    let took = deliver(addr).await;
    assert!(took < Duration::from_secs(2), "normal delivery took {took:?}");
    tokio::time::timeout(Duration::from_secs(60), flood)
        .await
        .expect("10,000 recipients in a minute")
        .unwrap();
    eprintln!("10,000 recipients: {:?} in all", started.elapsed());
    let d = sink.deliveries();
    assert_eq!(d.len(), 2);
    let big = d
        .iter()
        .find(|d| d.rcpts.len() > 1)
        .expect("the flooded transaction");
    assert_eq!(big.rcpts.len(), 100);
    running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Oversized messages
// ---------------------------------------------------------------------------------------------

/// Opens a transaction and sends DATA; returns the client at the `354`.
async fn at_data(addr: SocketAddr) -> Client {
    let mut c = Client::greeted(addr).await;
    assert!(c.cmd("EHLO big.example.net").await.starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@example.net>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@example.com>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c
}

/// Writes `chunk` `times` times; returns the highest RSS seen (sampled every ~1 MiB).
async fn send_repeated(c: &mut Client, chunk: &[u8], times: usize) -> u64 {
    let every = (MIB as usize / chunk.len()).max(1);
    let mut peak = rss();
    for i in 0..times {
        c.stream.write_all(chunk).await.unwrap();
        if i % every == 0 {
            peak = peak.max(rss());
        }
    }
    c.stream.flush().await.unwrap();
    peak
}

/// 100 MiB against the default 25 MiB cap: `552 5.3.4` at the end, nothing delivered, the
/// session goes on, and the process grows by far less than the message.
#[tokio::test]
async fn hundred_mib_message_against_a_25_mib_cap() {
    let _heavy = HEAVY.lock().await;
    let sink = Sink::start().await;
    let running = start(cfg(sink.addr, "", "", "max_message_size = \"25MiB\"", "")).await;
    let mut c = at_data(running.smtp_addrs[0]).await;
    let before = rss();
    // 64 lines of 1,000 bytes (CRLF included, the RFC line limit) per write.
    let line = [vec![b'x'; 998], b"\r\n".to_vec()].concat();
    let chunk = line.repeat(64);
    let times = (100 * MIB) as usize / chunk.len() + 1;
    let started = Instant::now();
    let mut peak = send_repeated(&mut c, &chunk, times).await;
    c.send(".\r\n").await;
    let r = c.reply().await;
    peak = peak.max(rss());
    assert!(r.starts_with("552 5.3.4 "), "{r}");
    assert!(c.cmd("NOOP").await.starts_with("250"), "the session goes on");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "100 MiB message: {} bytes in {:?}; RSS {} MiB before, peak growth {:.1} MiB",
        times * chunk.len(),
        started.elapsed(),
        before / MIB,
        growth as f64 / MIB as f64
    );
    assert!(growth < 40 * MIB, "RSS grew by {growth} bytes");
    assert!(sink.deliveries().is_empty());
    running.shutdown().await;
}

/// A header line of 50 MiB without CRLF: once the message ends it is refused (`550 5.6.0`, the
/// line limit, or `552` for the size), nothing is delivered and memory stays flat: nothing past
/// the first 1,000 bytes of the line is kept.
#[tokio::test]
async fn endless_header_line() {
    let _heavy = HEAVY.lock().await;
    let sink = Sink::start().await;
    let running = start(cfg(sink.addr, "", "", "", "")).await;
    let mut c = at_data(running.smtp_addrs[0]).await;
    let before = rss();
    c.send("Subject: ").await;
    let chunk = vec![b'a'; 64 * 1024];
    let mut peak = send_repeated(&mut c, &chunk, 50 * 16).await;
    c.send("\r\n\r\nbody\r\n.\r\n").await;
    let r = c.reply().await;
    peak = peak.max(rss());
    assert!(r.starts_with("550 5.6.0 ") || r.starts_with("552 "), "{r}");
    assert!(c.cmd("NOOP").await.starts_with("250"), "the session goes on");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "50 MiB header line: refused with {:?}; peak RSS growth {:.1} MiB",
        r.trim_end(),
        growth as f64 / MIB as f64
    );
    assert!(growth < 40 * MIB, "RSS grew by {growth} bytes");
    assert!(sink.deliveries().is_empty());
    running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Garbage
// ---------------------------------------------------------------------------------------------

/// Random bytes (NUL, control and high bytes included) as command lines: each gets a `5xx`,
/// the `max_errors`th is followed by `421 4.7.0` and the close; the same for a 256 KiB blob
/// sent without waiting; the server serves the next client as usual.
#[tokio::test]
async fn binary_garbage_as_commands() {
    let sink = Sink::start().await;
    let running = start(cfg(sink.addr, "", "", "max_errors = 10", "")).await;
    let addr = running.smtp_addrs[0];
    let mut rng = Rng(0x7468_6173_7370);

    // Line by line.
    let mut c = Client::greeted(addr).await;
    for i in 0..10 {
        let len = 1 + (rng.next() % 300) as usize;
        let mut line: Vec<u8> = rng.bytes(len).into_iter().filter(|&b| b != b'\n').collect();
        // Every other line starts with NUL; the rest are random, high bytes and all.
        if i % 2 == 0 {
            line.insert(0, 0);
        }
        line.extend_from_slice(b"\r\n");
        c.send(&line).await;
        let r = c.reply().await;
        assert!(r.starts_with("500 ") || r.starts_with("501 "), "line {i}: {r}");
    }
    assert_eq!(
        c.reply().await,
        "421 4.7.0 mx.thassp.test Error: too many errors\r\n"
    );
    assert!(c.closed().await);

    // A blob, pipelined: thassp stops reading after the tenth error.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let blob = rng.bytes(256 * 1024);
    // The server may close (and reset) before it has all of it.
    let _ = tokio::time::timeout(WAIT, tcp.write_all(&blob)).await;
    let (got, closed) = drain(&mut tcp).await;
    assert!(closed, "still open after garbage");
    let text = String::from_utf8_lossy(&got);
    let replies: Vec<&str> = text.split_terminator("\r\n").collect();
    assert!(replies[0].starts_with("220 "), "{text}");
    assert_eq!(
        replies.last().copied(),
        Some("421 4.7.0 mx.thassp.test Error: too many errors"),
        "{text}"
    );
    let errors = &replies[1..replies.len() - 1];
    assert_eq!(errors.len(), 10, "{text}");
    assert!(
        errors
            .iter()
            .all(|r| r.starts_with("500 ") || r.starts_with("501 ")),
        "{text}"
    );

    deliver(addr).await;
    assert_eq!(sink.deliveries().len(), 1);
    running.shutdown().await;
}

/// Garbage instead of a TLS handshake on an implicit-TLS listener: random bytes, a record
/// header with a garbage body, a truncated ClientHello, plaintext SMTP, many at once. Each
/// session ends, the failures are counted, and TLS clients are served meanwhile, also while a
/// connection sits in the middle of a handshake.
#[tokio::test]
async fn tls_handshake_garbage() {
    let pki = common::pki();
    let sink = Sink::start().await;
    let running = start(cfg(
        sink.addr,
        "",
        &format!(
            "tls = \"implicit\"\ntls_cert = {:?}\ntls_key = {:?}",
            pki.cert_file, pki.key_file
        ),
        "",
        "[checks.limits]\nmax_connections_per_ip = 0",
    ))
    .await;
    let addr = running.smtp_addrs[0];
    let mut rng = Rng(0x746c_7367);

    // A handshake record announcing 16 KiB, of which 100 bytes arrive: the handshake waits.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let mut partial = vec![0x16, 0x03, 0x01, 0x40, 0x00];
    partial.extend(rng.bytes(100));
    stalled.write_all(&partial).await.unwrap();

    let mut variants: Vec<(String, Vec<u8>)> = vec![
        ("plaintext EHLO".into(), b"EHLO plaintext.example\r\n".to_vec()),
        (
            "handshake record with a garbage body".into(),
            [&[0x16, 0x03, 0x01, 0x00, 0x40][..], &rng.bytes(64)].concat(),
        ),
        (
            "alert record".into(),
            vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
        ),
        (
            "SSLv2-style hello".into(),
            [&[0x80, 0x2e, 0x01][..], &rng.bytes(45)].concat(),
        ),
    ];
    for i in 0..20 {
        let len = 1 + (rng.next() % 8192) as usize;
        variants.push((format!("random bytes #{i}"), rng.bytes(len)));
    }
    let garbage = variants.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (name, bytes) in variants {
        tasks.spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let _ = tcp.write_all(&bytes).await;
            // Half-close: a handshake waiting for more bytes sees the end of them.
            let _ = tcp.shutdown().await;
            let (_, closed) = drain(&mut tcp).await;
            (name, closed)
        });
    }
    // TLS clients are served while the garbage arrives and the stalled handshake waits.
    let c = Client::connect(addr).await;
    let mut c = c.tls(pki.client.clone()).await;
    assert!(c.reply().await.starts_with("220 mx.thassp.test"));
    let r = c
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(r.starts_with("250 "), "{r}");
    while let Some(joined) = tasks.join_next().await {
        let (name, closed) = joined.unwrap();
        assert!(closed, "{name}: the session did not end");
    }
    let counters = running.app().snapshot().counters.clone();
    assert!(
        eventually(async || Counters::get(&counters.tls_handshake_failures) >= garbage as u64).await,
        "{} handshake failures counted, {garbage} expected",
        Counters::get(&counters.tls_handshake_failures)
    );
    // The stalled handshake does not hold anything up; once its client goes, it ends too.
    let c = Client::connect(addr).await;
    let mut c = c.tls(pki.client.clone()).await;
    assert!(c.reply().await.starts_with("220 "));
    assert!(c.cmd("QUIT").await.starts_with("221"));
    drop(stalled);
    assert!(
        eventually(async || Counters::get(&counters.tls_handshake_failures) > garbage as u64).await,
        "the abandoned handshake was not counted"
    );
    assert_eq!(sink.deliveries().len(), 1);
    running.shutdown().await;
}
