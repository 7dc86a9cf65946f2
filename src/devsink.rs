//! The development upstream: a tiny SMTP server on loopback that accepts every message and
//! stores it as a file, so a newcomer sees the whole path work without installing an MTA.
//! For trying out and tests only; it never relays anything anywhere.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::smtp::codec::{self, BareLineEnd, Command, DataReader, LineStatus};

const MAX_MESSAGE: usize = 64 << 20;
const IDLE: Duration = Duration::from_secs(120);

pub struct Devsink {
    directory: PathBuf,
    hostname: String,
    counter: AtomicU64,
}

impl Devsink {
    pub fn new(directory: PathBuf, hostname: String) -> Arc<Self> {
        Arc::new(Self {
            directory,
            hostname,
            counter: AtomicU64::new(0),
        })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        if let Err(e) = tokio::fs::create_dir_all(&self.directory).await {
            warn!(directory = %self.directory.display(), error = %e, "devsink.directory: cannot create it; messages will be refused.");
        }
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            let sink = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = sink.session(stream) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    }

    async fn session(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut buf = Vec::with_capacity(4096);
        let mut out = format!(
            "220 {} ESMTP thassp development upstream (stores mail as files)\r\n",
            self.hostname
        )
        .into_bytes();
        let mut from = String::new();
        let mut rcpts: Vec<String> = Vec::new();
        loop {
            let line = loop {
                match codec::find_line(&buf, 4096) {
                    LineStatus::Complete { len, content } => {
                        let line = buf[..content].to_vec();
                        buf.drain(..len);
                        break line;
                    }
                    LineStatus::TooLong => return Ok(()),
                    LineStatus::Incomplete => {}
                }
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                    out.clear();
                }
                if read_more(&mut stream, &mut buf).await? == 0 {
                    return Ok(());
                }
            };
            let reply: &[u8] = match codec::parse_command(&line) {
                Ok(Command::Ehlo(_)) => {
                    out.extend_from_slice(format!("250-{}\r\n", self.hostname).as_bytes());
                    b"250-PIPELINING\r\n250-SIZE 67108864\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 DSN\r\n"
                }
                Ok(Command::Helo(_)) => b"250 devsink\r\n",
                Ok(Command::Mail { from: f, .. }) => {
                    from = f.raw;
                    rcpts.clear();
                    b"250 2.1.0 Ok\r\n"
                }
                Ok(Command::Rcpt { to, .. }) => {
                    rcpts.push(to.raw);
                    b"250 2.1.5 Ok\r\n"
                }
                Ok(Command::Data) if rcpts.is_empty() => b"554 5.5.1 No valid recipients\r\n",
                Ok(Command::Data) => {
                    stream.write_all(&out).await?;
                    out.clear();
                    stream
                        .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        .await?;
                    let mut reader = DataReader::new(MAX_MESSAGE, usize::MAX, BareLineEnd::Normalize);
                    let mut message = Vec::new();
                    loop {
                        if let Some(n) = reader.feed(&buf, &mut message) {
                            buf.drain(..n);
                            break;
                        }
                        buf.clear();
                        if read_more(&mut stream, &mut buf).await? == 0 {
                            return Ok(());
                        }
                    }
                    let reply = if reader.violation().is_some() {
                        "552 5.3.4 Message too big for the development upstream\r\n".to_string()
                    } else {
                        match self.store(&from, &rcpts, &message).await {
                            Ok(name) => format!("250 2.0.0 Ok: stored as {name}\r\n"),
                            Err(e) => {
                                warn!(error = %e, "devsink: cannot store a message.");
                                "451 4.3.0 Cannot store the message\r\n".to_string()
                            }
                        }
                    };
                    rcpts.clear();
                    out.extend_from_slice(reply.as_bytes());
                    continue;
                }
                Ok(Command::Rset) => {
                    rcpts.clear();
                    b"250 2.0.0 Ok\r\n"
                }
                Ok(Command::Noop) => b"250 2.0.0 Ok\r\n",
                Ok(Command::Quit) => {
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    stream.write_all(&out).await?;
                    return Ok(());
                }
                Ok(_) => b"502 5.5.1 Not implemented\r\n",
                Err(_) => b"501 5.5.4 Syntax error\r\n",
            };
            out.extend_from_slice(reply);
        }
    }

    async fn store(&self, from: &str, rcpts: &[String], message: &[u8]) -> std::io::Result<String> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{n}.eml",
            chrono::Local::now().format("%Y%m%dT%H%M%S"),
            std::process::id()
        );
        let mut content = format!("Return-Path: <{from}>\r\n").into_bytes();
        for r in rcpts {
            content.extend_from_slice(format!("Delivered-To: {r}\r\n").as_bytes());
        }
        content.extend_from_slice(message);
        tokio::fs::write(self.directory.join(&name), content).await?;
        info!(file = %name, from = %from, rcpts = rcpts.len(), "devsink: message stored.");
        Ok(name)
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 8192];
    match tokio::time::timeout(IDLE, stream.read(&mut chunk)).await {
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(n)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(0),
    }
}
