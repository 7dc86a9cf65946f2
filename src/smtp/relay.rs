//! The client side towards the upstream MTA: connect, greeting, EHLO, then commands —
//! pipelined (RFC 2920) when the MTA offers it, else one at a time — and the message in one
//! write. Every failure is a [`RelayError`] that says which stage failed, so the session can
//! answer the client 4xx.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::warn;

use super::codec::{Reply, ReplyError, ReplyParser};
use crate::config::UpstreamTls;
use crate::stream::MaybeTls;
use crate::upstream::{Capabilities, Upstream};

type UpstreamStream = MaybeTls<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// Who the real client is, for XCLIENT/XFORWARD.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub addr: IpAddr,
    pub port: u16,
    /// Forward-confirmed PTR name, when known.
    pub name: Option<String>,
    pub helo: Option<String>,
    pub esmtp: bool,
    /// The address the client connected to.
    pub local: SocketAddr,
}

impl ClientIdentity {
    /// The same client as far as an MTA told with XCLIENT can tell, except the port.
    pub fn same_client(&self, other: &Self) -> bool {
        self.addr.to_canonical() == other.addr.to_canonical()
            && self.name == other.name
            && self.helo == other.helo
            && self.esmtp == other.esmtp
            && self.local.ip().to_canonical() == other.local.ip().to_canonical()
            && self.local.port() == other.local.port()
    }

    /// `ATTR=value` pairs for the attributes the MTA offers, values in xtext (RFC 3461).
    fn attributes(&self, offered: &[String], xforward: bool) -> Vec<String> {
        // Postfix wants IPv6 addresses tagged, and an IPv4 client seen on a dual-stack
        // socket (::ffff:a.b.c.d) as plain IPv4.
        let tagged = |ip: IpAddr| match ip.to_canonical() {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("IPV6:{a}"),
        };
        let addr = tagged(self.addr);
        let mut out = Vec::new();
        for attr in offered {
            let value = match attr.as_str() {
                "ADDR" => addr.clone(),
                "PORT" => self.port.to_string(),
                "NAME" => self.name.clone().unwrap_or_else(|| "[UNAVAILABLE]".into()),
                "HELO" => match &self.helo {
                    Some(h) => h.clone(),
                    None => continue,
                },
                "PROTO" => if self.esmtp { "ESMTP" } else { "SMTP" }.to_string(),
                "DESTADDR" if !xforward => tagged(self.local.ip()),
                "DESTPORT" if !xforward => self.local.port().to_string(),
                "SOURCE" if xforward => "REMOTE".to_string(),
                _ => continue,
            };
            out.push(format!("{attr}={}", xtext(&value)));
        }
        out
    }
}

/// RFC 3461 xtext: printable ASCII except `+` and `=` as is, the rest as `+XX`.
fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// A connection that carried more RSETs is not kept for another session (Postfix counts
/// them as junk commands, 100 by default before it slows the connection down).
const MAX_RSETS_TO_KEEP: u32 = 20;

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
    #[error("TLS with upstream {name} failed: {reason}")]
    Tls { name: String, reason: String },
}

impl RelayError {
    /// The connection went away (EOF, reset, broken pipe) rather than the MTA answering.
    pub fn connection_lost(&self) -> bool {
        matches!(self, Self::Closed { .. } | Self::Io { .. })
    }
}

/// An open SMTP session to an upstream MTA.
pub struct UpstreamConn {
    stream: UpstreamStream,
    rbuf: Vec<u8>,
    parser: ReplyParser,
    pub upstream: Arc<Upstream>,
    pub caps: Capabilities,
    /// MAIL FROM was accepted and the transaction is not finished.
    pub in_transaction: bool,
    /// The connection can no longer be used (error, 421, or timeout).
    pub broken: bool,
    /// TLS version and cipher when STARTTLS succeeded.
    pub tls: Option<(String, String)>,
    /// The MTA accepted XCLIENT: it sees the real client for the whole connection.
    pub xclient_done: bool,
    /// DATA was written and its reply not read yet (see [`Self::send_data_early`]).
    data_sent: bool,
    client: Option<ClientIdentity>,
    /// When the connection was made (kept connections have a maximum age).
    pub opened: tokio::time::Instant,
    /// An AUTH exchange went over this connection: it may be authenticated as a user, so
    /// it must never serve another client.
    pub auth_used: bool,
    /// Taken from the pool and not yet answered a command since: a failure now most likely
    /// means the MTA closed it while it waited, and a fresh connection can be tried.
    pub unproven: bool,
    /// Transactions begun on this connection (MAIL accepted).
    pub transactions: u32,
    /// Replies of 4xx/5xx and RSETs sent: MTAs count both per connection (Postfix's
    /// smtpd_soft/hard_error_limit and smtpd_junk_command_limit slow down and then drop a
    /// connection past them), so a connection with any is not handed to another session.
    error_replies: u32,
    rsets: u32,
}

impl std::fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConn")
            .field("upstream", &self.upstream.name)
            .finish_non_exhaustive()
    }
}

impl UpstreamConn {
    /// Connects, reads the greeting, says EHLO (HELO if EHLO is refused), upgrades to TLS
    /// when the MTA offers STARTTLS (as configured), and tells the MTA the real client with
    /// XCLIENT when offered. The capabilities seen are stored on the `Upstream` for
    /// thassp's own EHLO reply.
    pub async fn connect(
        upstream: &Arc<Upstream>,
        client: Option<&ClientIdentity>,
    ) -> Result<Self, RelayError> {
        match Self::connect_with(upstream, client, true).await {
            Err(RelayError::Tls { reason, .. }) if upstream.tls == UpstreamTls::Opportunistic => {
                warn!(upstream = %upstream.name, reason = %reason, "Opportunistic TLS with the upstream failed; retrying in plaintext.");
                Self::connect_with(upstream, client, false).await
            }
            other => other,
        }
    }

    async fn connect_with(
        upstream: &Arc<Upstream>,
        client: Option<&ClientIdentity>,
        allow_tls: bool,
    ) -> Result<Self, RelayError> {
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
            stream: MaybeTls::Plain(stream),
            rbuf: Vec::new(),
            parser: ReplyParser::default(),
            upstream: upstream.clone(),
            caps: Capabilities::default(),
            in_transaction: false,
            broken: false,
            tls: None,
            xclient_done: false,
            data_sent: false,
            client: client.cloned(),
            opened: tokio::time::Instant::now(),
            auth_used: false,
            unproven: false,
            transactions: 0,
            error_replies: 0,
            rsets: 0,
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
        conn.ehlo().await?;
        let tls_config = upstream
            .tls_config
            .clone()
            .filter(|_| allow_tls && upstream.tls != UpstreamTls::Off);
        match tls_config {
            Some(config) if conn.caps.starttls => conn.starttls(config).await?,
            _ if upstream.tls == UpstreamTls::Require => {
                conn.broken = true;
                return Err(RelayError::Tls {
                    name,
                    reason: "the MTA does not offer STARTTLS and tls = \"require\"".into(),
                });
            }
            _ => {}
        }
        if upstream.xclient && !conn.caps.xclient.is_empty() {
            conn.xclient().await?;
        }
        upstream.set_capabilities(conn.caps.clone());
        Ok(conn)
    }

    /// Whether the connection can wait in the pool for another client: clean, between
    /// transactions, nothing unread, and never one that carried AUTH.
    pub fn reusable(&self) -> bool {
        !self.broken
            && !self.data_sent
            && !self.in_transaction
            && !self.auth_used
            && self.error_replies == 0
            && self.rsets < MAX_RSETS_TO_KEEP
            && self.rbuf.is_empty()
            && self.client.is_some()
    }

    /// Polls the socket once without waiting: a kept connection the MTA has closed reads
    /// EOF (or a `421` it sent before closing), an open one has nothing to read. (The pool
    /// holds only [`Self::reusable`] connections.)
    pub fn still_open(&mut self) -> bool {
        use futures_util::FutureExt as _;
        let mut byte = [0u8; 1];
        self.stream.read(&mut byte).now_or_never().is_none()
    }

    /// Whether the MTA can be told about `client` on this connection (or need not be).
    fn xclient_offered(&self) -> bool {
        self.upstream.xclient && !self.caps.xclient.is_empty()
    }

    /// Whether this kept connection may carry `client`'s mail. Once the MTA was told a
    /// client with XCLIENT it attributes everything on the connection to that client, and
    /// Postfix offers no second XCLIENT (its authorisation is re-checked against the client
    /// it was told): such a connection then serves only the same client again (address,
    /// name, HELO and destination; the port stays the first session's).
    pub fn can_serve(&self, client: &ClientIdentity) -> bool {
        !self.xclient_done
            || self.xclient_offered()
            || self.client.as_ref().is_some_and(|c| c.same_client(client))
    }

    /// Readies a kept connection for another client: unless the MTA already knows this
    /// client, it is told with XCLIENT, and when it was told another client before, that
    /// must succeed — a refusal would leave this client's mail attributed to the previous
    /// one, so the connection is then not used.
    pub async fn reassign(&mut self, client: &ClientIdentity) -> Result<(), RelayError> {
        let told_before = self.xclient_done;
        let known = told_before && self.client.as_ref().is_some_and(|c| c.same_client(client));
        if !self.can_serve(client) {
            self.broken = true;
            return Err(RelayError::Closed {
                name: self.upstream.name.clone(),
                stage: "XCLIENT",
            });
        }
        self.client = Some(client.clone());
        self.unproven = true;
        if known || !self.xclient_offered() {
            // Known already, or the MTA sees thassp itself (XFORWARD, per transaction,
            // picks up the new client by itself).
            return Ok(());
        }
        self.xclient_done = false;
        match self.xclient().await? {
            Some(reply) if told_before => {
                self.broken = true;
                Err(RelayError::Refused {
                    name: self.upstream.name.clone(),
                    stage: "XCLIENT",
                    reply,
                })
            }
            _ => Ok(()),
        }
    }

    async fn ehlo(&mut self) -> Result<(), RelayError> {
        let name = self.upstream.helo_name.clone();
        self.ehlo_as(&name).await
    }

    async fn ehlo_as(&mut self, name: &str) -> Result<(), RelayError> {
        let ehlo = format!("EHLO {name}\r\n");
        let reply = self.command(ehlo.as_bytes(), "EHLO").await?;
        if reply.code == 250 {
            self.caps = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        let helo = format!("HELO {name}\r\n");
        let reply = self.command(helo.as_bytes(), "HELO").await?;
        if reply.code != 250 {
            self.broken = true;
            return Err(RelayError::Refused {
                name: self.upstream.name.clone(),
                stage: "HELO",
                reply,
            });
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    async fn starttls(&mut self, config: Arc<rustls::ClientConfig>) -> Result<(), RelayError> {
        let name = self.upstream.name.clone();
        let reply = self.command(b"STARTTLS\r\n", "STARTTLS").await?;
        if reply.code != 220 {
            self.broken = true;
            return Err(RelayError::Tls {
                name,
                reason: format!("STARTTLS refused: {reply}"),
            });
        }
        if !self.rbuf.is_empty() {
            // Bytes after the 220 would be injected into the TLS session.
            self.broken = true;
            return Err(RelayError::Tls {
                name,
                reason: "data received after the 220 to STARTTLS".into(),
            });
        }
        let Some(tcp) = self.stream.take_plain() else {
            self.broken = true;
            return Err(RelayError::Tls {
                name,
                reason: "connection already uses TLS".into(),
            });
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        let server_name = self.upstream.tls_server_name.clone();
        let handshake =
            tokio::time::timeout(self.upstream.command_timeout, connector.connect(server_name, tcp)).await;
        match handshake {
            Ok(Ok(tls)) => {
                let (_, state) = tls.get_ref();
                self.tls = Some(crate::tls::describe(
                    state.protocol_version(),
                    state.negotiated_cipher_suite(),
                ));
                self.stream = MaybeTls::Tls(Box::new(tls));
            }
            Ok(Err(e)) => {
                self.broken = true;
                return Err(RelayError::Tls {
                    name,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                self.broken = true;
                return Err(RelayError::Tls {
                    name,
                    reason: "handshake timed out".into(),
                });
            }
        }
        // RFC 3207 §4.2: forget everything learnt before TLS and ask again.
        self.ehlo().await
    }

    /// XCLIENT: the MTA then logs and applies its policies to the real client. A refusal is
    /// logged and returned; the session goes on without it.
    async fn xclient(&mut self) -> Result<Option<Reply>, RelayError> {
        let Some(client) = self.client.clone() else {
            return Ok(None);
        };
        let attrs = client.attributes(&self.caps.xclient, false);
        if attrs.is_empty() {
            return Ok(None);
        }
        let line = format!("XCLIENT {}\r\n", attrs.join(" "));
        let reply = self.command(line.as_bytes(), "XCLIENT").await?;
        // Postfix answers 220 (a new greeting); other implementations (smtp-sink) say 250.
        if !reply.is_positive() {
            warn!(upstream = %self.upstream.name, reply = %reply, "Upstream refused XCLIENT; it will see thassp as the client.");
            return Ok(Some(reply));
        }
        self.xclient_done = true;
        // After XCLIENT the MTA takes the next EHLO as the client's own (Postfix's
        // XCLIENT_README does the same): say the client's name so its HELO is what gets
        // logged and checked, and fall back to ours if the MTA refuses that name.
        match client
            .helo
            .as_deref()
            .filter(|h| crate::smtp::address::is_hostname(h) || h.starts_with('['))
        {
            Some(helo) => match self.ehlo_as(helo).await {
                Err(RelayError::Refused { .. }) => {
                    // A refused EHLO/HELO leaves the connection usable.
                    self.broken = false;
                    self.ehlo().await?;
                }
                other => other?,
            },
            None => self.ehlo().await?,
        }
        Ok(None)
    }

    /// XFORWARD before a transaction, when XCLIENT is not available.
    pub async fn xforward(&mut self) -> Result<(), RelayError> {
        if self.xclient_done || !self.upstream.xclient || self.caps.xforward.is_empty() {
            return Ok(());
        }
        let Some(client) = self.client.clone() else {
            return Ok(());
        };
        let attrs = client.attributes(&self.caps.xforward, true);
        if attrs.is_empty() {
            return Ok(());
        }
        let reply = self
            .command(format!("XFORWARD {}\r\n", attrs.join(" ")).as_bytes(), "XFORWARD")
            .await?;
        if reply.code != 250 {
            warn!(upstream = %self.upstream.name, reply = %reply, "Upstream refused XFORWARD.");
        }
        Ok(())
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
        self.refuse_inside_data(stage)?;
        self.write(line, stage).await?;
        let timeout = self.upstream.command_timeout;
        self.read_reply(stage, timeout).await
    }

    /// Sends a group of commands and reads their replies. When the MTA offers PIPELINING
    /// (RFC 2920) the group goes out in one write and every reply is read, saving a round
    /// trip per command; otherwise one command at a time, stopping after the first reply
    /// that is not positive (the rest would only be answered 503). Either way the replies
    /// come back in order, possibly fewer than the commands.
    pub async fn pipeline(&mut self, lines: &[(&[u8], &'static str)]) -> Result<Vec<Reply>, RelayError> {
        let timeout = self.upstream.command_timeout;
        self.refuse_inside_data(lines.first().map_or("MAIL", |l| l.1))?;
        let mut replies = Vec::with_capacity(lines.len());
        if self.caps.pipelining && lines.len() > 1 {
            let group: Vec<u8> = lines.iter().flat_map(|(l, _)| l.iter().copied()).collect();
            self.write(&group, lines[0].1).await?;
            for (_, stage) in lines {
                let reply = self.read_reply(stage, timeout).await?;
                let closing = reply.code == 421;
                replies.push(reply);
                if closing {
                    break;
                }
            }
            return Ok(replies);
        }
        for (line, stage) in lines {
            let reply = self.command(line, stage).await?;
            let go_on = reply.is_positive();
            replies.push(reply);
            if !go_on {
                break;
            }
        }
        Ok(replies)
    }

    /// Sends DATA without waiting for its reply, so the MTA's `354` travels while the client
    /// is still sending the message; [`Self::data`] collects it. Until then the
    /// connection is inside DATA: if the message is not sent after all, the connection must
    /// be dropped (there is no way to cancel DATA in SMTP).
    pub async fn send_data_early(&mut self) -> Result<(), RelayError> {
        self.write(b"DATA\r\n", "DATA").await?;
        self.data_sent = true;
        Ok(())
    }

    /// The reply to DATA: the one sent early, or DATA sent now.
    pub async fn data(&mut self) -> Result<Reply, RelayError> {
        if std::mem::take(&mut self.data_sent) {
            let timeout = self.upstream.command_timeout;
            return self.read_reply("DATA", timeout).await;
        }
        self.command(b"DATA\r\n", "DATA").await
    }

    /// After an early DATA only the message may follow: a command would become message text.
    fn refuse_inside_data(&mut self, stage: &'static str) -> Result<(), RelayError> {
        if self.data_sent {
            self.broken = true;
            return Err(RelayError::Closed {
                name: self.upstream.name.clone(),
                stage,
            });
        }
        Ok(())
    }

    /// DATA was sent early and its message will not follow: the connection cannot be used.
    pub fn inside_data(&self) -> bool {
        self.data_sent
    }

    /// Sends the prepared message (dot-stuffed, ending in `.\r\n`) in one write and reads the
    /// final reply.
    pub async fn send_message(&mut self, wire: &[u8]) -> Result<Reply, RelayError> {
        self.write(wire, "message transfer").await?;
        let timeout = self.upstream.data_timeout;
        self.read_reply("end of data", timeout).await
    }

    async fn write(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), RelayError> {
        if bytes.starts_with(b"RSET\r\n") {
            self.rsets += 1;
        }
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
                    self.unproven = false;
                    if reply.code >= 400 {
                        self.error_replies += 1;
                    }
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
            // Straight into the buffer's spare room: a zeroed stack chunk per read cost 4 %
            // of the instructions per message (scripts/callgrind).
            self.rbuf.reserve(4096);
            let n = match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
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
        // Inside DATA, "QUIT" would be message text: just close.
        if self.broken || self.data_sent {
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
    let conn = UpstreamConn::connect(upstream, None).await?;
    let caps = conn.caps.clone();
    conn.quit().await;
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xclient_attributes() {
        let id = ClientIdentity {
            addr: "2001:db8::1".parse().unwrap(),
            port: 4321,
            name: None,
            helo: Some("odd+name=x".into()),
            esmtp: true,
            local: "192.0.2.1:25".parse().unwrap(),
        };
        let offered: Vec<String> = ["NAME", "ADDR", "PORT", "HELO", "PROTO", "LOGIN", "DESTADDR"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            id.attributes(&offered, false).join(" "),
            "NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 PORT=4321 HELO=odd+2Bname+3Dx PROTO=ESMTP DESTADDR=192.0.2.1"
        );
        let mut other = id.clone();
        other.port = 1;
        other.addr = "::ffff:192.0.2.9".parse().unwrap();
        let mut v4 = other.clone();
        v4.addr = "192.0.2.9".parse().unwrap();
        assert!(
            other.same_client(&v4),
            "the port and the address's notation do not matter"
        );
        assert!(!other.same_client(&id));
        v4.helo = None;
        assert!(!other.same_client(&v4), "a different HELO is a different client");
        let fwd: Vec<String> = ["NAME", "ADDR", "SOURCE"].map(String::from).to_vec();
        assert_eq!(
            id.attributes(&fwd, true).join(" "),
            "NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 SOURCE=REMOTE"
        );
    }
}
