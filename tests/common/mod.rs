//! Test harness: a real upstream SMTP sink written independently of thassp's codec (it
//! records every byte it receives and can misbehave on purpose), a raw SMTP client, and a
//! helper that starts thassp in-process on 127.0.0.1:0 in front of the sink.

#![allow(dead_code)]

pub mod dns;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use thassp::app::App;
use thassp::config::Config;
use thassp::server::{self, Running};

/// Every bound on waiting in these tests; nothing legitimate takes this long on loopback.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the sink does after receiving the end of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Final {
    Accept,
    /// Reply this line (e.g. "554 5.7.1 rejected") instead of 250.
    Reply(String),
    /// Close the connection without a reply.
    Drop,
    /// Never answer.
    Stall,
}

/// When the sink hangs up on its own, as an MTA with a per-connection message limit does or
/// one that restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HangUp {
    #[default]
    Never,
    /// Right after answering a message.
    AfterMessage,
    /// On the first command after a message, without answering it.
    AtNextCommand,
    /// On the first command after a message, with `421` (Exim past
    /// smtp_accept_max_per_connection, an MTA shutting down).
    With421AtNextCommand,
}

/// How the sink behaves; tests may change it while the sink runs.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub greeting: String,
    pub ehlo_keywords: Vec<String>,
    /// Recipients (lower-case local part before '@') answered with this reply.
    pub rcpt_replies: Vec<(String, String)>,
    pub mail_reply: String,
    /// Close the connection after this many bytes of message data.
    pub drop_after_data_bytes: Option<usize>,
    pub final_reply: Final,
    /// Refuse connections (close at once).
    pub refuse: bool,
    /// Offer STARTTLS with this server configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Offer AUTH PLAIN LOGIN and accept these user/password pairs.
    pub auth_users: Vec<(String, String)>,
    /// Offer XCLIENT (as Postfix does to authorised clients).
    pub xclient: bool,
    /// As Postfix: after an accepted XCLIENT, offer and accept no further XCLIENT on that
    /// connection (its authorisation is checked against the client it was told).
    pub xclient_once: bool,
    /// Offer XFORWARD.
    pub xforward: bool,
    pub hang_up: HangUp,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            greeting: "220 sink.test ESMTP".into(),
            ehlo_keywords: [
                "PIPELINING",
                "SIZE 100000000",
                "8BITMIME",
                "ENHANCEDSTATUSCODES",
                "DSN",
                "SMTPUTF8",
            ]
            .map(String::from)
            .to_vec(),
            rcpt_replies: vec![(
                "unknown".into(),
                "550 5.1.1 <unknown>: Recipient address rejected: User unknown".into(),
            )],
            mail_reply: "250 2.1.0 Ok".into(),
            drop_after_data_bytes: None,
            final_reply: Final::Accept,
            refuse: false,
            tls: None,
            auth_users: Vec::new(),
            xclient: false,
            xclient_once: false,
            xforward: false,
            hang_up: HangUp::Never,
        }
    }
}

/// One message the sink received completely.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub mail_from: String,
    pub rcpts: Vec<String>,
    /// Unstuffed message as received (Received header included).
    pub data: Vec<u8>,
    /// The sink answered 250 to it.
    pub acked: bool,
}

#[derive(Debug, Default)]
pub struct SinkState {
    pub behaviour: Behaviour,
    pub deliveries: Vec<Delivery>,
    /// Every command line received, across connections, in order.
    pub commands: Vec<String>,
    /// Raw bytes of each connection.
    pub transcripts: Vec<Vec<u8>>,
    pub connections: usize,
    /// Connections upgraded with STARTTLS.
    pub tls_sessions: usize,
    /// Users that authenticated successfully.
    pub authenticated: Vec<String>,
    /// XCLIENT and XFORWARD command lines received.
    pub forwarded: Vec<String>,
    /// Command lines that arrived with more input already behind them (pipelined).
    pub pipelined: Vec<String>,
}

#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<SinkState>>,
}

impl Sink {
    pub async fn start() -> Self {
        Self::start_with(Behaviour::default()).await
    }

    pub async fn start_with(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(SinkState {
            behaviour,
            ..Default::default()
        }));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = sink_session(stream, st).await;
                });
            }
        });
        Self { addr, state }
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.lock().unwrap().behaviour);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().unwrap().deliveries.clone()
    }

    pub fn commands(&self) -> Vec<String> {
        self.state.lock().unwrap().commands.clone()
    }

    pub fn all_bytes(&self) -> Vec<u8> {
        self.state.lock().unwrap().transcripts.concat()
    }
}

async fn sink_session(stream: TcpStream, st: Arc<Mutex<SinkState>>) -> std::io::Result<()> {
    let idx = {
        let mut s = st.lock().unwrap();
        s.connections += 1;
        s.transcripts.push(Vec::new());
        s.transcripts.len() - 1
    };
    let b = st.lock().unwrap().behaviour.clone();
    if b.refuse {
        return Ok(());
    }
    if let Some(stream) = sink_conn(stream, &st, idx, true, false).await? {
        let Some(config) = b.tls.clone() else {
            return Ok(());
        };
        let tls = tokio_rustls::TlsAcceptor::from(config).accept(stream).await?;
        st.lock().unwrap().tls_sessions += 1;
        sink_conn(tls, &st, idx, false, true).await?;
    }
    Ok(())
}

/// Reads one CRLF line, recording the raw bytes; `None` at EOF.
async fn sink_line<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    st: &Mutex<SinkState>,
    idx: usize,
) -> std::io::Result<Option<String>> {
    loop {
        if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..p]).into_owned();
            buf.drain(..p + 2);
            return Ok(Some(line));
        }
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        st.lock().unwrap().transcripts[idx].extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(s: &str) -> String {
    use base64::Engine as _;
    String::from_utf8_lossy(
        &base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .unwrap_or_default(),
    )
    .into_owned()
}

/// One sink session over a plain or TLS stream. Returns the stream when the client asked
/// for STARTTLS (the caller runs the handshake and calls again).
async fn sink_conn<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    st: &Mutex<SinkState>,
    idx: usize,
    greet: bool,
    tls_active: bool,
) -> std::io::Result<Option<S>> {
    let b = st.lock().unwrap().behaviour.clone();
    if greet {
        stream.write_all(format!("{}\r\n", b.greeting).as_bytes()).await?;
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut from = String::new();
    let mut rcpts = Vec::new();
    let mut after_message = false;
    let mut told_xclient = false;
    loop {
        let Some(line) = sink_line(&mut stream, &mut buf, st, idx).await? else {
            return Ok(None);
        };
        let hang_up = st.lock().unwrap().behaviour.hang_up;
        if after_message && matches!(hang_up, HangUp::AtNextCommand | HangUp::With421AtNextCommand) {
            st.lock().unwrap().commands.push(line);
            if hang_up == HangUp::With421AtNextCommand {
                stream
                    .write_all(b"421 4.7.0 sink.test Error: too many messages\r\n")
                    .await?;
            }
            return Ok(None);
        }
        {
            let mut s = st.lock().unwrap();
            s.commands.push(line.clone());
            if !buf.is_empty() {
                s.pipelined.push(line.clone());
            }
        }
        let b = st.lock().unwrap().behaviour.clone();
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            let mut keywords = b.ehlo_keywords.clone();
            if b.tls.is_some() && !tls_active {
                keywords.push("STARTTLS".into());
            }
            if !b.auth_users.is_empty() {
                keywords.push("AUTH PLAIN LOGIN".into());
            }
            if b.xclient && !told_xclient {
                keywords.push("XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT".into());
            }
            if b.xforward {
                keywords.push("XFORWARD NAME ADDR PROTO HELO SOURCE".into());
            }
            let mut r = String::from("250-sink.test\r\n");
            for (i, k) in keywords.iter().enumerate() {
                let sep = if i + 1 == keywords.len() { ' ' } else { '-' };
                r.push_str(&format!("250{sep}{k}\r\n"));
            }
            if keywords.is_empty() {
                r = "250 sink.test\r\n".into();
            }
            r
        } else if upper == "STARTTLS" && b.tls.is_some() && !tls_active {
            stream.write_all(b"220 2.0.0 Ready to start TLS\r\n").await?;
            return Ok(Some(stream));
        } else if upper.starts_with("XCLIENT ") && b.xclient && told_xclient {
            "550 5.7.0 Error: insufficient authorization\r\n".into()
        } else if upper.starts_with("XCLIENT ") && b.xclient {
            st.lock().unwrap().forwarded.push(line.clone());
            told_xclient = b.xclient_once;
            "220 sink.test ESMTP\r\n".into()
        } else if upper.starts_with("XFORWARD ") && b.xforward {
            st.lock().unwrap().forwarded.push(line.clone());
            "250 2.0.0 Ok\r\n".into()
        } else if upper.starts_with("AUTH ") && !b.auth_users.is_empty() {
            let mut words = line.split_whitespace().skip(1);
            let mech = words.next().unwrap_or("").to_ascii_uppercase();
            let initial = words.next().map(str::to_string);
            let ask =
                async |stream: &mut S, buf: &mut Vec<u8>, prompt: &str| -> std::io::Result<Option<String>> {
                    stream.write_all(format!("334 {prompt}\r\n").as_bytes()).await?;
                    sink_line(stream, buf, st, idx).await
                };
            let creds = match mech.as_str() {
                "PLAIN" => {
                    let resp = match initial {
                        Some(i) => Some(i),
                        None => ask(&mut stream, &mut buf, "").await?,
                    };
                    resp.filter(|r| r != "*").map(|r| {
                        let d = unb64(&r);
                        let mut parts = d.split('\0').skip(1);
                        (
                            parts.next().unwrap_or("").to_string(),
                            parts.next().unwrap_or("").to_string(),
                        )
                    })
                }
                "LOGIN" => {
                    let user = match initial {
                        Some(i) => Some(i),
                        None => ask(&mut stream, &mut buf, &b64("Username:")).await?,
                    };
                    match user.filter(|u| u != "*") {
                        Some(u) => ask(&mut stream, &mut buf, &b64("Password:"))
                            .await?
                            .filter(|p| p != "*")
                            .map(|p| (unb64(&u), unb64(&p))),
                        None => None,
                    }
                }
                _ => {
                    stream
                        .write_all(b"504 5.5.4 Unrecognized authentication type\r\n")
                        .await?;
                    continue;
                }
            };
            match creds {
                None => "501 5.7.0 Authentication aborted\r\n".into(),
                Some((u, p)) if b.auth_users.iter().any(|(uu, pp)| *uu == u && *pp == p) => {
                    st.lock().unwrap().authenticated.push(u);
                    "235 2.7.0 Authentication successful\r\n".into()
                }
                Some(_) => "535 5.7.8 Error: authentication failed\r\n".into(),
            }
        } else if upper.starts_with("HELO") {
            "250 sink.test\r\n".into()
        } else if upper.starts_with("MAIL FROM:") {
            from = line.clone();
            rcpts.clear();
            format!("{}\r\n", b.mail_reply)
        } else if upper.starts_with("RCPT TO:") {
            let addr = line[8..].trim().trim_start_matches('<').to_ascii_lowercase();
            let local = addr.split('@').next().unwrap_or("").to_string();
            match b.rcpt_replies.iter().find(|(l, _)| *l == local) {
                Some((_, r)) => format!("{r}\r\n"),
                None => {
                    rcpts.push(line.clone());
                    "250 2.1.5 Ok\r\n".into()
                }
            }
        } else if upper == "DATA" {
            stream.write_all(b"354 go ahead\r\n").await?;
            // Read to CRLF.CRLF (the message starts right after the DATA line's CRLF).
            let mut data: Vec<u8> = Vec::new();
            let mut received = 0usize;
            let end = loop {
                let hay = [b"\r\n".as_slice(), &buf].concat();
                if let Some(p) = hay.windows(5).position(|w| w == b"\r\n.\r\n") {
                    // hay = CRLF + buf, so buf[..p] is the message including the CRLF that
                    // precedes the dot, and the marker ends at buf[p + 3].
                    let msg = buf[..p].to_vec();
                    buf.drain(..p + 3);
                    break msg;
                }
                let mut chunk = [0u8; 65536];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(None);
                }
                received += n;
                if b.drop_after_data_bytes.is_some_and(|limit| received >= limit) {
                    return Ok(None);
                }
                st.lock().unwrap().transcripts[idx].extend_from_slice(&chunk[..n]);
                buf.extend_from_slice(&chunk[..n]);
            };
            // Unstuff.
            for line in end.split_inclusive(|&c| c == b'\n') {
                data.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            }
            let mut delivery = Delivery {
                mail_from: from.clone(),
                rcpts: rcpts.clone(),
                data,
                acked: false,
            };
            match &b.final_reply {
                Final::Accept => {
                    delivery.acked = true;
                    st.lock().unwrap().deliveries.push(delivery);
                    after_message = true;
                    if b.hang_up == HangUp::AfterMessage {
                        stream.write_all(b"250 2.0.0 Ok: queued as SINK1\r\n").await?;
                        return Ok(None);
                    }
                    "250 2.0.0 Ok: queued as SINK1\r\n".into()
                }
                Final::Reply(r) => {
                    st.lock().unwrap().deliveries.push(delivery);
                    format!("{r}\r\n")
                }
                Final::Drop => {
                    st.lock().unwrap().deliveries.push(delivery);
                    return Ok(None);
                }
                Final::Stall => {
                    st.lock().unwrap().deliveries.push(delivery);
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return Ok(None);
                }
            }
        } else if upper == "RSET" {
            rcpts.clear();
            "250 2.0.0 Ok\r\n".into()
        } else if upper == "QUIT" {
            stream.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(None);
        } else if upper == "NOOP" {
            "250 2.0.0 Ok\r\n".into()
        } else {
            "502 5.5.2 Error: command not recognized\r\n".into()
        };
        stream.write_all(reply.as_bytes()).await?;
    }
}

/// Any byte stream a test client talks over (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A raw SMTP client.
pub struct Client {
    pub stream: Box<dyn Io>,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream: Box::new(stream),
            buf: Vec::new(),
        }
    }

    /// Connects through a PROXY protocol v1 header presenting `ip` as the client (the
    /// listener must trust loopback); returns the client and the first reply.
    pub async fn proxied(addr: SocketAddr, ip: &str) -> (Self, String) {
        let mut tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.write_all(format!("PROXY TCP4 {ip} 192.0.2.1 40000 25\r\n").as_bytes())
            .await
            .unwrap();
        let mut c = Self::over(tcp);
        let first = c.reply().await;
        (c, first)
    }

    /// A client over an already connected stream (e.g. after writing a PROXY header).
    pub fn over(stream: impl Io + 'static) -> Self {
        Self {
            stream: Box::new(stream),
            buf: Vec::new(),
        }
    }

    /// Runs a TLS handshake on the current stream (after `220` to STARTTLS, or at once for
    /// implicit TLS).
    pub async fn tls(self, config: Arc<rustls::ClientConfig>) -> Self {
        assert!(self.buf.is_empty(), "unread bytes before the TLS handshake");
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio::time::timeout(
            WAIT,
            tokio_rustls::TlsConnector::from(config).connect(name, self.stream),
        )
        .await
        .unwrap()
        .unwrap();
        Self {
            stream: Box::new(tls),
            buf: Vec::new(),
        }
    }

    /// Connects and reads the banner.
    pub async fn greeted(addr: SocketAddr) -> Self {
        let mut c = Self::connect(addr).await;
        let banner = c.reply().await;
        assert!(banner.starts_with("220 "), "banner: {banner}");
        c
    }

    /// Reads one whole reply (all lines), as text with CRLF line ends. Panics on timeout.
    pub async fn reply(&mut self) -> String {
        self.try_reply(WAIT).await.expect("a reply in time")
    }

    /// One whole reply, `None` on timeout, "" on EOF.
    pub async fn try_reply(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // A reply ends with a line whose 4th byte is a space (or a 3-byte line).
            let mut start = 0;
            while let Some(p) = self.buf[start..].windows(2).position(|w| w == b"\r\n") {
                let line = &self.buf[start..start + p];
                if line.len() == 3 || line.get(3) == Some(&b' ') {
                    let end = start + p + 2;
                    let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                    self.buf.drain(..end);
                    return Some(text);
                }
                start += p + 2;
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(String::new()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Sends one command (CRLF added) and returns the reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n")).await;
        self.reply().await
    }

    /// True once the server has closed the connection (reads EOF within `WAIT`).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// EHLO, MAIL, RCPT…, DATA, message, returns the final reply (the message is sent as
    /// given: it must already be dot-stuffed and end with CRLF.CRLF).
    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], wire: &[u8]) -> String {
        let r = self.cmd("EHLO client.example.net").await;
        assert!(r.starts_with("250"), "{r}");
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert!(r.starts_with("250"), "{r}");
        for rc in rcpts {
            let r = self.cmd(&format!("RCPT TO:<{rc}>")).await;
            assert!(r.starts_with("250"), "{r}");
        }
        let r = self.cmd("DATA").await;
        assert!(r.starts_with("354"), "{r}");
        self.send(wire).await;
        self.reply().await
    }
}

/// A thassp configuration in front of `upstream`, with `extra` TOML appended (sections
/// given there must not repeat the ones here, except as documented per test).
pub fn config(upstream: SocketAddr, smtp_extra: &str, extra: &str) -> Config {
    let text = format!(
        r#"
        [server]
        hostname = "mx.thassp.test"
        shutdown_grace = "2s"
        [[listener]]
        address = "127.0.0.1:0"
        [smtp]
        {smtp_extra}
        [upstream.main]
        address = "{upstream}"
        command_timeout = "2s"
        data_timeout = "2s"
        connect_timeout = "2s"
        [domains]
        local = ["example.com", "example.org"]
        [store]
        backend = "memory"
        [events]
        url = ""
        [checks.reputation]
        enabled = false
        {extra}
        "#
    );
    Config::from_toml(&text, "test").unwrap()
}

pub async fn start(config: Config) -> Running {
    server::start(App::new(config).await.unwrap()).await.unwrap()
}

/// Waits (bounded) until every session of `running` has ended, so each has handed its
/// upstream connection to the pool or closed it.
pub async fn sessions_ended(running: &Running) {
    let snap = running.app().snapshot();
    let deadline = tokio::time::Instant::now() + WAIT;
    while snap.live.count() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "sessions did not end");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// thassp in front of a fresh default sink.
pub async fn proxy() -> (Running, Sink) {
    proxy_with(Behaviour::default()).await
}

/// [`proxy`] in front of a sink that behaves as told.
pub async fn proxy_with(behaviour: Behaviour) -> (Running, Sink) {
    let sink = Sink::start_with(behaviour).await;
    let running = start(config(sink.addr, "", "")).await;
    (running, sink)
}

pub const MESSAGE: &[u8] =
    b"From: a@example.net\r\nTo: b@example.com\r\nSubject: test\r\nMessage-ID: <1@example.net>\r\n\r\nHello.\r\n..dot line\r\n";

/// `MESSAGE` as it goes over the wire (dot-stuffed line, end marker).
pub fn wire(msg: &[u8]) -> Vec<u8> {
    let mut w = Vec::new();
    for line in msg.split_inclusive(|&c| c == b'\n') {
        if line.starts_with(b".") {
            w.push(b'.');
        }
        w.extend_from_slice(line);
    }
    w.extend_from_slice(b".\r\n");
    w
}

/// The message the sink got, with thassp's Received header removed.
pub fn strip_received(data: &[u8]) -> Vec<u8> {
    assert!(
        data.starts_with(b"Received: "),
        "no Received header first: {}",
        String::from_utf8_lossy(data)
    );
    // The header ends at the first CRLF not followed by a folding space/tab.
    let mut i = 0;
    loop {
        let p = data[i..].windows(2).position(|w| w == b"\r\n").unwrap() + i;
        if !matches!(data.get(p + 2), Some(b' ' | b'\t')) {
            return data[p + 2..].to_vec();
        }
        i = p + 2;
    }
}

/// Test certificates: a CA and a leaf for `localhost` / 127.0.0.1 signed by it, as files
/// (for thassp's config) and as rustls configurations (for test peers).
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_file: std::path::PathBuf,
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    pub leaf_der: rustls::pki_types::CertificateDer<'static>,
    pub server: Arc<rustls::ServerConfig>,
    /// Trusts the test CA.
    pub client: Arc<rustls::ClientConfig>,
}

pub fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    };
    thassp::tls::install_default_provider();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "thassp test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    let server = thassp::tls::server_config(&cert_file, &key_file).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    Pki {
        leaf_der: leaf.der().clone(),
        dir,
        ca_file,
        cert_file,
        key_file,
        server,
        client,
    }
}

/// The JSON log lines a spawned `thassp` binary writes to stderr, collected as they come.
#[derive(Clone, Default)]
pub struct Log(pub Arc<Mutex<Vec<String>>>);

impl Log {
    /// Starts collecting the child's stderr (it must be piped).
    pub fn capture(child: &mut tokio::process::Child) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let log = Self::default();
        let reader = tokio::io::BufReader::new(child.stderr.take().expect("stderr piped"));
        let lines = log.0.clone();
        tokio::spawn(async move {
            let mut it = reader.lines();
            while let Ok(Some(l)) = it.next_line().await {
                lines.lock().unwrap().push(l);
            }
        });
        log
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// Waits (bounded) until a line contains `needle`; returns that line.
    pub async fn wait(&self, needle: &str) -> String {
        for _ in 0..500 {
            if let Some(l) = self.0.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no log line with {needle:?} in:\n{}", self.text());
    }

    /// Waits for a line containing `needle` and returns its `address` field (listeners).
    pub async fn address(&self, needle: &str) -> SocketAddr {
        let line = self.wait(needle).await;
        let start = line.find("\"address\":\"").expect("an address field") + 11;
        line[start..].split('"').next().unwrap().parse().unwrap()
    }
}
