//! The client side towards the upstream MTA: connect, greeting, EHLO, then one command and
//! one reply at a time (lockstep), and the message in one write. Every failure is a
//! [`RelayError`] that says which stage failed, so the session can answer the client 4xx.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::{Reply, ReplyError, ReplyParser};
use crate::upstream::{Capabilities, Upstream};

/// Why talking to the upstream failed. Each variant carries the stage (`"greeting"`,
/// `"MAIL"`, `"end of data"`, …) and the upstream's name for the operator.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot connect to upstream {name} ({address}): {reason}")]
    Connect {
        name: String,
        address: String,
        reason: String,
    },
    #[error("upstream {name} did not answer {stage} within {timeout:?}")]
    Timeout {
        name: String,
        stage: &'static str,
        timeout: Duration,
    },
    #[error("upstream {name} closed the connection during {stage}")]
    Closed { name: String, stage: &'static str },
    #[error("I/O error with upstream {name} during {stage}: {source}")]
    Io {
        name: String,
        stage: &'static str,
        source: std::io::Error,
    },
    #[error("upstream {name} sent an invalid reply during {stage}: {source}")]
    Protocol {
        name: String,
        stage: &'static str,
        source: ReplyError,
    },
    #[error("upstream {name} refused the session at {stage}: {reply}")]
    Refused {
        name: String,
        stage: &'static str,
        reply: Reply,
    },
}

/// An open SMTP session to an upstream MTA.
pub struct UpstreamConn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    parser: ReplyParser,
    pub upstream: Arc<Upstream>,
    pub caps: Capabilities,
    /// MAIL FROM was accepted and the transaction is not finished.
    pub in_transaction: bool,
    /// The connection can no longer be used (error, 421, or timeout).
    pub broken: bool,
}

impl std::fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConn")
            .field("upstream", &self.upstream.name)
            .finish_non_exhaustive()
    }
}

impl UpstreamConn {
    /// Connects, reads the greeting and says EHLO (HELO if EHLO is refused). The
    /// capabilities seen are also stored on the `Upstream` for thassp's own EHLO reply.
    pub async fn connect(upstream: &Arc<Upstream>) -> Result<Self, RelayError> {
        let name = upstream.name.clone();
        let connect_err = |reason: String| RelayError::Connect {
            name: name.clone(),
            address: upstream.address.clone(),
            reason,
        };
        let stream =
            match tokio::time::timeout(upstream.connect_timeout, connect_any(&upstream.address)).await {
                Err(_) => {
                    return Err(connect_err(format!(
                        "timed out after {:?}",
                        upstream.connect_timeout
                    )));
                }
                Ok(Err(e)) => return Err(connect_err(e.to_string())),
                Ok(Ok(s)) => s,
            };
        // Lockstep request/reply traffic: Nagle plus delayed ACK would add ~40 ms a command.
        let _ = stream.set_nodelay(true);
        let mut conn = Self {
            stream,
            rbuf: Vec::with_capacity(1024),
            parser: ReplyParser::default(),
            upstream: upstream.clone(),
            caps: Capabilities::default(),
            in_transaction: false,
            broken: false,
        };
        let greeting = conn.read_reply("greeting", upstream.command_timeout).await?;
        if greeting.code != 220 {
            conn.broken = true;
            return Err(RelayError::Refused {
                name,
                stage: "greeting",
                reply: greeting,
            });
        }
        let ehlo = format!("EHLO {}\r\n", upstream.helo_name);
        let reply = conn.command(ehlo.as_bytes(), "EHLO").await?;
        if reply.code == 250 {
            conn.caps = Capabilities::from_ehlo(&reply);
        } else {
            let helo = format!("HELO {}\r\n", upstream.helo_name);
            let reply = conn.command(helo.as_bytes(), "HELO").await?;
            if reply.code != 250 {
                conn.broken = true;
                return Err(RelayError::Refused {
                    name,
                    stage: "HELO",
                    reply,
                });
            }
        }
        upstream.set_capabilities(conn.caps.clone());
        Ok(conn)
    }

    fn err_io(&self, stage: &'static str, e: std::io::Error) -> RelayError {
        RelayError::Io {
            name: self.upstream.name.clone(),
            stage,
            source: e,
        }
    }

    /// Sends one command line (CRLF included) and reads its reply.
    pub async fn command(&mut self, line: &[u8], stage: &'static str) -> Result<Reply, RelayError> {
        self.write(line, stage).await?;
        let timeout = self.upstream.command_timeout;
        self.read_reply(stage, timeout).await
    }

    /// Sends the prepared message (dot-stuffed, ending in `.\r\n`) in one write and reads the
    /// final reply.
    pub async fn send_message(&mut self, wire: &[u8]) -> Result<Reply, RelayError> {
        self.write(wire, "message transfer").await?;
        let timeout = self.upstream.data_timeout;
        self.read_reply("end of data", timeout).await
    }

    async fn write(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), RelayError> {
        let timeout = self.upstream.data_timeout.max(self.upstream.command_timeout);
        match tokio::time::timeout(timeout, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(self.err_io(stage, e))
            }
            Err(_) => {
                self.broken = true;
                Err(RelayError::Timeout {
                    name: self.upstream.name.clone(),
                    stage,
                    timeout,
                })
            }
        }
    }

    async fn read_reply(&mut self, stage: &'static str, timeout: Duration) -> Result<Reply, RelayError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.parser.parse(&mut self.rbuf) {
                Ok(Some(reply)) => {
                    if reply.code == 421 {
                        // RFC 5321 §3.8: the server is closing; nothing more will work.
                        self.broken = true;
                    }
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => {
                    self.broken = true;
                    return Err(RelayError::Protocol {
                        name: self.upstream.name.clone(),
                        stage,
                        source,
                    });
                }
            }
            let mut chunk = [0u8; 4096];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => {
                    self.broken = true;
                    return Err(RelayError::Timeout {
                        name: self.upstream.name.clone(),
                        stage,
                        timeout,
                    });
                }
                Ok(Err(e)) => {
                    self.broken = true;
                    return Err(self.err_io(stage, e));
                }
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                self.broken = true;
                return Err(RelayError::Closed {
                    name: self.upstream.name.clone(),
                    stage,
                });
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Ends an open transaction with RSET so the connection can carry the next one.
    pub async fn rset(&mut self) -> Result<(), RelayError> {
        let reply = self.command(b"RSET\r\n", "RSET").await?;
        self.in_transaction = false;
        if reply.code != 250 {
            self.broken = true;
            return Err(RelayError::Refused {
                name: self.upstream.name.clone(),
                stage: "RSET",
                reply,
            });
        }
        Ok(())
    }

    /// Says QUIT and closes, waiting briefly for the reply; errors no longer matter here.
    pub async fn quit(mut self) {
        if self.broken {
            return;
        }
        if self.write(b"QUIT\r\n", "QUIT").await.is_ok() {
            let _ = self.read_reply("QUIT", Duration::from_secs(2)).await;
        }
    }
}

/// Connects to `host:port`, trying each resolved address in turn.
async fn connect_any(address: &str) -> std::io::Result<TcpStream> {
    if let Ok(sa) = address.parse::<SocketAddr>() {
        return TcpStream::connect(sa).await;
    }
    let mut last = None;
    for sa in tokio::net::lookup_host(address).await? {
        match TcpStream::connect(sa).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "host name has no address")))
}

/// Connects once, reads the capabilities and quits: the periodic health probe.
pub async fn probe(upstream: &Arc<Upstream>) -> Result<Capabilities, RelayError> {
    let conn = UpstreamConn::connect(upstream).await?;
    let caps = conn.caps.clone();
    conn.quit().await;
    Ok(caps)
}
