//! The line console (ThASSP's telnet-style admin interface): `telnet 127.0.0.1 8026` or
//! `nc`, password first, then one command per line over [`Service`]. Output lines end in
//! CRLF; each answer is followed by the prompt `thassp> `.
//!
//! At the `password:` prompt: the bearer token, or `USER PASSWORD`, or just the configured
//! user's password. Three wrong answers end the connection; wrong answers count towards the
//! same per-client limit as the web interface, and a limited client is disconnected at once.
//!
//! Bounded: lines up to [`MAX_LINE`] bytes (longer ones are refused, not buffered), an idle
//! timeout (`admin.console_idle_timeout`), and at most [`MAX_SESSIONS`] sessions at once.
//! Telnet option negotiation (IAC sequences) is ignored.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::{Auth, AuthOutcome, Credentials};
use crate::events::format_table;
use crate::service::{self, EventKind, EventSearch, ListKind, Service, ServiceError};

/// Longest command line, in bytes (a list entry or greylist key fits easily).
pub const MAX_LINE: usize = 2048;
/// Console sessions at once.
pub const MAX_SESSIONS: usize = 8;
/// Password attempts per connection.
const MAX_ATTEMPTS: u32 = 3;
/// The prompt after every answer.
pub const PROMPT: &str = "thassp> ";

const HELP: &str = "\
commands:
  help                              this text
  status                            version, uptime, upstreams, store, event log, counters
  stats [PERIOD]                    outcome table for the last PERIOD (default 10d; 24h, 30m, ...)
  sessions                          sessions in progress
  events [N]                        the last N transactions (default 20)
  grey list [TEXT]                  greylist entries (containing TEXT)
  grey release KEY                  let a greylisted triplet through on its next retry
  grey delete KEY                   forget a greylist entry
  block list                        blocked clients
  block remove IP                   unblock a client (and clear its failures)
  tarpit list                       clients with failures
  tarpit clear IP                   clear a client's failures
  list show [white|black]           admin list entries
  list add white|black ENTRY        add an entry (IP/CIDR, helo:NAME, rcpt:ADDR, sender)
  list remove white|black ENTRY     remove an entry
  config                            the running configuration (secrets redacted)
  reload                            re-read the configuration file
  quit                              end the session";

/// The console server.
pub struct Console {
    service: Arc<Service>,
    auth: Arc<Auth>,
    idle: Duration,
    slots: Arc<Semaphore>,
}

/// One line read from the client.
enum Line {
    Text(String),
    TooLong,
    Eof,
    Idle,
}

impl Console {
    pub fn new(service: Arc<Service>, auth: Arc<Auth>, idle: Duration) -> Self {
        Self {
            service,
            auth,
            idle,
            slots: Arc::new(Semaphore::new(MAX_SESSIONS)),
        }
    }

    /// Accepts console connections until `stop` is cancelled, then ends every session.
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        let this = Arc::new(self);
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    warn!(error = %e, "Admin console accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let this = this.clone();
            let stop = stop.clone();
            tracker.spawn(async move {
                let Ok(_slot) = this.slots.clone().try_acquire_owned() else {
                    let mut stream = stream;
                    let _ = stream
                        .write_all(b"too many console sessions, try later\r\n")
                        .await;
                    return;
                };
                if let Err(e) = this.session(stream, peer, stop).await {
                    debug!(client = %peer, error = %e, "Admin console session ended with an error.");
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn session(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = Vec::new();
        let ip = peer.ip();
        if self.auth.limited(ip) {
            self.auth.limited_total.inc();
            wr.write_all(b"too many failed logins, try again in a minute\r\n")
                .await?;
            return Ok(());
        }
        wr.write_all(format!("thassp {} admin console\r\n", env!("CARGO_PKG_VERSION")).as_bytes())
            .await?;
        let mut attempts = 0;
        loop {
            wr.write_all(b"password: ").await?;
            let line = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                l = read_line(&mut rd, &mut buf, self.idle) => l?,
            };
            let text = match line {
                Line::Text(t) => t,
                Line::TooLong => String::new(),
                Line::Eof | Line::Idle => return Ok(()),
            };
            match self.auth.check(ip, Credentials::ConsoleLine(&text)).await {
                AuthOutcome::Ok => break,
                AuthOutcome::Limited => {
                    wr.write_all(b"too many failed logins, try again in a minute\r\n")
                        .await?;
                    return Ok(());
                }
                AuthOutcome::Missing | AuthOutcome::Wrong => {
                    attempts += 1;
                    wr.write_all(b"wrong credentials\r\n").await?;
                    if attempts >= MAX_ATTEMPTS {
                        return Ok(());
                    }
                }
            }
        }
        info!(client = %peer, "Admin console login.");
        wr.write_all(b"welcome; type help for the commands\r\n").await?;
        loop {
            wr.write_all(PROMPT.as_bytes()).await?;
            let line = tokio::select! {
                () = stop.cancelled() => {
                    let _ = wr.write_all(b"\r\nthassp is stopping\r\n").await;
                    return Ok(());
                }
                l = read_line(&mut rd, &mut buf, self.idle) => l?,
            };
            let text = match line {
                Line::Text(t) => t,
                Line::TooLong => {
                    wr.write_all(format!("error: line longer than {MAX_LINE} bytes\r\n").as_bytes())
                        .await?;
                    continue;
                }
                Line::Eof => return Ok(()),
                Line::Idle => {
                    wr.write_all(b"\r\nidle too long, bye\r\n").await?;
                    return Ok(());
                }
            };
            let (answer, quit) = self.execute(&text).await;
            if !answer.is_empty() {
                wr.write_all(crlf(&answer).as_bytes()).await?;
            }
            if quit {
                return Ok(());
            }
        }
    }

    /// Runs one command line; returns the answer and whether the session ends.
    pub async fn execute(&self, line: &str) -> (String, bool) {
        let line = line.trim();
        let (cmd, rest) = split_word(line);
        let (sub, arg) = split_word(rest);
        let result = match (
            cmd.to_ascii_lowercase().as_str(),
            sub.to_ascii_lowercase().as_str(),
        ) {
            ("", _) => Ok(String::new()),
            ("help" | "?", _) => Ok(HELP.to_string()),
            ("quit" | "exit" | "logout", _) => return ("bye".into(), true),
            ("status", _) => Ok(self.status()),
            ("stats", _) => self.stats(rest).await,
            ("sessions", _) => Ok(self.sessions()),
            ("events", _) => self.events(rest).await,
            ("grey", "list") => self.grey_list(arg).await,
            ("grey", "release") => self
                .service
                .grey_release(arg)
                .await
                .map(|e| format!("released {} (the next retry passes)", e.key)),
            ("grey", "delete") => self
                .service
                .grey_delete(arg)
                .await
                .map(|()| format!("deleted {arg}")),
            ("block", "list") => self.block_list().await,
            ("block", "remove") => self
                .service
                .unblock(arg)
                .await
                .map(|keys| format!("unblocked {}", keys.join(", "))),
            ("tarpit", "list") => self.tarpit_list().await,
            ("tarpit", "clear") => self
                .service
                .tarpit_clear(arg)
                .await
                .map(|n| format!("cleared {n} counter(s) of {arg}")),
            ("list", "show") => self.list_show(arg).await,
            ("list", "add") => {
                let (list, entry) = split_word(arg);
                match ListKind::parse(list) {
                    Ok(list) => self.service.list_add(list, entry, "").await.map(|c| {
                        format!(
                            "{} {} the {}list",
                            c.entry.entry,
                            if c.created { "added to" } else { "already in" },
                            list.as_str()
                        )
                    }),
                    Err(e) => Err(e),
                }
            }
            ("list", "remove") => {
                let (list, entry) = split_word(arg);
                match ListKind::parse(list) {
                    Ok(list) => self
                        .service
                        .list_remove(list, entry)
                        .await
                        .map(|()| format!("{} removed from the {}list", entry.trim(), list.as_str())),
                    Err(e) => Err(e),
                }
            }
            ("config", _) => self.service.config_toml(),
            ("reload", _) => {
                let r = self.service.reload().await;
                Ok(if r.reloaded {
                    let mut s = format!("reloaded from {}", r.source);
                    for w in &r.warnings {
                        let _ = write!(s, "\nwarning: {w}");
                    }
                    s
                } else {
                    let mut s = String::from("reload refused, the running configuration stays:");
                    for e in &r.errors {
                        let _ = write!(s, "\n  - {e}");
                    }
                    s
                })
            }
            ("grey" | "block" | "tarpit" | "list", _) => Err(ServiceError::BadRequest(format!(
                "{cmd}: unknown sub-command {sub:?} (type help)"
            ))),
            _ => Err(ServiceError::BadRequest(format!(
                "unknown command {:?} (type help)",
                truncate(cmd, 40)
            ))),
        };
        match result {
            Ok(s) => (s, false),
            Err(ServiceError::Internal(m)) => {
                error!(error = %m, "Admin console command failed.");
                ("error: internal error (see the log)".into(), false)
            }
            Err(e) => (format!("error: {e}"), false),
        }
    }

    fn status(&self) -> String {
        let s = self.service.status();
        let mut out = String::new();
        let attempts: u64 = s.since_start.iter().map(|r| r.count).sum();
        let delivered = s
            .since_start
            .iter()
            .find(|r| r.category.as_str() == "delivered")
            .map_or(0, |r| r.count);
        let _ = writeln!(
            out,
            "thassp {} on {}, up {}s",
            s.version, s.hostname, s.uptime_secs
        );
        let _ = writeln!(
            out,
            "connections {} · attempts {attempts} · delivered {delivered} (since start)",
            s.counters.sessions
        );
        let _ = writeln!(
            out,
            "tls handshake failures {} · smtp auth failures {} · proxy refused {}",
            s.counters.tls_handshake_failures, s.counters.auth_failures, s.counters.proxy_protocol_refused
        );
        for l in &s.listeners {
            let _ = writeln!(out, "listener {} tls={}", l.address, l.tls);
        }
        for u in &s.upstreams {
            let _ = writeln!(
                out,
                "upstream {} {}: {}",
                u.name,
                u.address,
                if u.healthy {
                    "up".to_string()
                } else {
                    format!("down ({})", u.last_error.as_deref().unwrap_or("not probed yet"))
                }
            );
        }
        let e = &s.events;
        let _ = writeln!(
            out,
            "event log: {} · queued {} · dropped {} · written {} · errors {}",
            match (e.enabled, e.connected) {
                (false, _) => "off",
                (true, true) => "connected",
                (true, false) => "disconnected",
            },
            e.queued,
            e.dropped,
            e.written,
            e.write_errors
        );
        let _ = writeln!(
            out,
            "store: {}{} · errors {}",
            s.store.backend,
            if s.store.degraded { " (degraded)" } else { "" },
            s.store.errors
        );
        for z in &s.dnsbl {
            let _ = writeln!(
                out,
                "dnsbl {}: {}",
                z.zone,
                if z.enabled { "in use" } else { "disabled" }
            );
        }
        out.trim_end().to_string()
    }

    fn sessions(&self) -> String {
        let sessions = self.service.sessions(200);
        if sessions.is_empty() {
            return "no sessions in progress".into();
        }
        let mut out = String::new();
        for s in &sessions {
            let stage = serde_json::to_value(s.stage)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{}  {}  {}  {}s{}",
                s.id,
                s.client,
                stage,
                s.seconds,
                if s.tarpitted { "  tarpitted" } else { "" }
            );
        }
        out.trim_end().to_string()
    }

    async fn stats(&self, arg: &str) -> Result<String, ServiceError> {
        let period = if arg.trim().is_empty() {
            Duration::from_secs(10 * 86400)
        } else {
            service::parse_period(arg)?
        };
        match self.service.stats_for(period, None, 10).await {
            Ok(r) => Ok(format!(
                "{}{} connections, {} transactions, {} recipients",
                format_table(&r.outcomes),
                r.totals.connections,
                r.totals.transactions,
                r.totals.recipients
            )),
            Err(ServiceError::Unavailable(why)) => Ok(format!(
                "the event log is not available ({why}); live counters since start:\n{}",
                format_table(&self.service.status().since_start)
            )),
            Err(e) => Err(e),
        }
    }

    async fn events(&self, arg: &str) -> Result<String, ServiceError> {
        let n = if arg.trim().is_empty() {
            20
        } else {
            arg.trim()
                .parse::<u32>()
                .map_err(|_| ServiceError::BadRequest("events N: N is a number".into()))?
                .min(200)
        };
        let page = self
            .service
            .events(&EventSearch {
                kind: EventKind::Transactions,
                limit: n,
                ..Default::default()
            })
            .await?;
        let mut out = String::new();
        for item in &page.items {
            if let service::EventItem::Transaction(t) = item {
                let rcpts: Vec<&str> = t.recipients.iter().map(|r| r.address.as_str()).collect();
                let _ = writeln!(
                    out,
                    "{} {} <{}> -> {} {}",
                    t.time.format("%Y-%m-%d %H:%M:%S"),
                    t.client_ip,
                    t.sender,
                    rcpts.join(","),
                    t.outcome
                );
            }
        }
        if out.is_empty() {
            out.push_str("no transactions");
        }
        Ok(out.trim_end().to_string())
    }

    async fn grey_list(&self, text: &str) -> Result<String, ServiceError> {
        let list = self.service.greylist("", text, 50).await?;
        let mut out = String::new();
        for e in &list.entries {
            let _ = writeln!(
                out,
                "{}  first seen {}  retry {}",
                e.key,
                e.first_seen
                    .map_or_else(|| "?".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
                if e.retry_in_secs == 0 {
                    "passes".to_string()
                } else {
                    format!("in {}s", e.retry_in_secs)
                }
            );
        }
        if list.entries.is_empty() {
            out.push_str("no greylist entries");
        } else if list.truncated {
            out.push_str("(more entries; narrow with grey list TEXT)");
        }
        Ok(out.trim_end().to_string())
    }

    async fn block_list(&self) -> Result<String, ServiceError> {
        let list = self.service.blocks(200).await?;
        let mut out = String::new();
        for e in &list.entries {
            let _ = writeln!(
                out,
                "{}  {}  until {}",
                e.key,
                e.reason,
                e.expires
                    .map_or_else(|| "forever".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            );
        }
        if list.entries.is_empty() {
            out.push_str("no blocked clients");
        }
        Ok(out.trim_end().to_string())
    }

    async fn tarpit_list(&self) -> Result<String, ServiceError> {
        let list = self.service.tarpit(200).await?;
        let mut out = String::new();
        for e in &list.entries {
            let _ = writeln!(
                out,
                "{}  failures {}{}",
                e.key,
                e.failures,
                if e.tarpitted { "  tarpitted" } else { "" }
            );
        }
        if list.entries.is_empty() {
            out.push_str("no failures counted");
        }
        Ok(out.trim_end().to_string())
    }

    async fn list_show(&self, arg: &str) -> Result<String, ServiceError> {
        let list = if arg.trim().is_empty() {
            None
        } else {
            Some(ListKind::parse(arg)?)
        };
        let listing = self.service.lists(list).await?;
        let mut out = String::new();
        for e in &listing.entries {
            let _ = writeln!(
                out,
                "{} {}{}",
                e.list.as_str(),
                e.entry,
                if e.note.is_empty() {
                    String::new()
                } else {
                    format!("  # {}", e.note)
                }
            );
        }
        if listing.entries.is_empty() {
            out.push_str("no admin list entries");
        }
        Ok(out.trim_end().to_string())
    }
}

fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.split_once(char::is_whitespace) {
        Some((w, rest)) => (w, rest.trim()),
        None => (s, ""),
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Text with every line ending in CRLF (telnet clients need the CR).
fn crlf(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.lines() {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out
}

/// Reads one line (LF-terminated; a CR before it and telnet IAC sequences are removed),
/// waiting at most `idle`. Bytes after the line stay in `buf`. A line longer than
/// [`MAX_LINE`] is consumed up to its end and reported as `TooLong`, so memory stays bounded.
async fn read_line<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    idle: Duration,
) -> std::io::Result<Line> {
    let mut too_long = false;
    loop {
        if let Some(p) = buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = buf.drain(..=p).collect();
            if too_long {
                return Ok(Line::TooLong);
            }
            let text = String::from_utf8_lossy(&strip_telnet(&raw[..p]))
                .trim_end_matches(['\r', '\0'])
                .to_string();
            return Ok(Line::Text(text));
        }
        if buf.len() > MAX_LINE {
            too_long = true;
            buf.clear();
        }
        let mut chunk = [0u8; 1024];
        let n = match tokio::time::timeout(idle, rd.read(&mut chunk)).await {
            Err(_) => return Ok(Line::Idle),
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok(Line::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Removes telnet IAC command sequences (a telnet client negotiates options first).
fn strip_telnet(bytes: &[u8]) -> Vec<u8> {
    const IAC: u8 = 255;
    const SB: u8 = 250;
    const SE: u8 = 240;
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != IAC {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(&IAC) => {
                out.push(IAC);
                i += 2;
            }
            // WILL, WONT, DO, DONT carry one option byte.
            Some(251..=254) => i += 3,
            Some(&SB) => {
                // Sub-negotiation runs to IAC SE.
                let end = bytes[i..].windows(2).position(|w| w == [IAC, SE]);
                i = end.map_or(bytes.len(), |e| i + e + 2);
            }
            _ => i += 2,
        }
    }
    out
}

/// Every line of a stream, for tests of the line reader.
#[cfg(test)]
async fn read_all_lines<R: AsyncRead + Unpin>(mut rd: R) -> Vec<String> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        match read_line(&mut rd, &mut buf, Duration::from_secs(5)).await {
            Ok(Line::Text(t)) => out.push(t),
            Ok(Line::TooLong) => out.push("<too long>".into()),
            _ => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_cleaned() {
        let mut input = Vec::new();
        input.extend_from_slice(b"\xff\xfb\x01\xff\xfd\x03help\r\n");
        input.extend_from_slice(&vec![b'x'; MAX_LINE * 3]);
        input.extend_from_slice(b"\nstatus\r\nquit");
        let lines = read_all_lines(&input[..]).await;
        assert_eq!(lines, vec!["help", "<too long>", "status"]);
    }

    #[test]
    fn words() {
        assert_eq!(
            split_word("  list add white 192.0.2.1 "),
            ("list", "add white 192.0.2.1")
        );
        assert_eq!(split_word("help"), ("help", ""));
        assert_eq!(crlf("a\nb"), "a\r\nb\r\n");
    }
}
