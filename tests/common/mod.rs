//! Test harness: a real upstream SMTP sink written independently of thassp's codec (it
//! records every byte it receives and can misbehave on purpose), a raw SMTP client, and a
//! helper that starts thassp in-process on 127.0.0.1:0 in front of the sink.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

async fn sink_session(mut stream: TcpStream, st: Arc<Mutex<SinkState>>) -> std::io::Result<()> {
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
    stream.write_all(format!("{}\r\n", b.greeting).as_bytes()).await?;
    let mut buf: Vec<u8> = Vec::new();
    let mut from = String::new();
    let mut rcpts = Vec::new();
    loop {
        // One command line.
        let line = loop {
            if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&buf[..p]).into_owned();
                buf.drain(..p + 2);
                break line;
            }
            let mut chunk = [0u8; 65536];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            st.lock().unwrap().transcripts[idx].extend_from_slice(&chunk[..n]);
            buf.extend_from_slice(&chunk[..n]);
        };
        st.lock().unwrap().commands.push(line.clone());
        let b = st.lock().unwrap().behaviour.clone();
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            let mut r = String::from("250-sink.test\r\n");
            for (i, k) in b.ehlo_keywords.iter().enumerate() {
                let sep = if i + 1 == b.ehlo_keywords.len() { ' ' } else { '-' };
                r.push_str(&format!("250{sep}{k}\r\n"));
            }
            if b.ehlo_keywords.is_empty() {
                r = "250 sink.test\r\n".into();
            }
            r
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
                    return Ok(());
                }
                received += n;
                if b.drop_after_data_bytes.is_some_and(|limit| received >= limit) {
                    return Ok(());
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
                    "250 2.0.0 Ok: queued as SINK1\r\n".into()
                }
                Final::Reply(r) => {
                    st.lock().unwrap().deliveries.push(delivery);
                    format!("{r}\r\n")
                }
                Final::Drop => {
                    st.lock().unwrap().deliveries.push(delivery);
                    return Ok(());
                }
                Final::Stall => {
                    st.lock().unwrap().deliveries.push(delivery);
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return Ok(());
                }
            }
        } else if upper == "RSET" {
            rcpts.clear();
            "250 2.0.0 Ok\r\n".into()
        } else if upper == "QUIT" {
            stream.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else if upper == "NOOP" {
            "250 2.0.0 Ok\r\n".into()
        } else {
            "502 5.5.2 Error: command not recognized\r\n".into()
        };
        stream.write_all(reply.as_bytes()).await?;
    }
}

/// A raw SMTP client.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        Self {
            stream,
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
        {extra}
        "#
    );
    Config::from_toml(&text, "test").unwrap()
}

pub async fn start(config: Config) -> Running {
    server::start(App::new(config).unwrap()).await.unwrap()
}

/// thassp in front of a fresh default sink.
pub async fn proxy() -> (Running, Sink) {
    let sink = Sink::start().await;
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
