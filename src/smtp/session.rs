//! One client session: the SMTP state machine over any byte stream. It asks the policy
//! pipeline at each stage, relays each recipient to the upstream and passes its reply back,
//! and answers `250` to a message only after the upstream did. It never touches stores or DNS.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::address::Address;
use super::codec::{
    self, BareLineEnd, COMMAND_LINE_MAX, Command, CommandError, DataReader, DataViolation, ENVELOPE_LINE_MAX,
    LineStatus, Param, Reply,
};
use super::relay::{ClientIdentity, RelayError, UpstreamConn};
use crate::app::{Counters, Phase, Snapshot};
use crate::config::{AuthPolicy, BareLineEndPolicy};
use crate::events::{ConnectionEvent, RecipientResult, Timings, TransactionEvent};
use crate::limits::{Admission, Refused};
use crate::live::LiveStage;
use crate::policy::{
    Action, Category, Context, Exemptions, MessageView, Refusal, SessionFacts, SessionInfo, SharedMessage,
    Stage, Verdict,
};
use crate::stream::MaybeTls;
use crate::upstream::{Capabilities, Upstream};

type ClientStream<S> = MaybeTls<S, tokio_rustls::server::TlsStream<S>>;

/// RFC 4954 §4: a SASL response line may be up to 12288 octets.
const AUTH_LINE_MAX: usize = 12288;
/// Read buffer room while reading commands and inside DATA.
const COMMAND_READ: usize = 512;
const DATA_READ: usize = 16 * 1024;
/// Time allowed for a TLS handshake with the client.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the listener a session came in on allows.
#[derive(Clone, Default)]
pub struct ListenerPolicy {
    /// Server TLS configuration when the listener has a certificate.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS from the first byte (port 465 style) instead of STARTTLS.
    pub implicit_tls: bool,
    pub require_tls: bool,
    pub auth: AuthPolicy,
}

/// Why a session ends early.
#[derive(Debug)]
enum Stop {
    /// The client closed the connection (or it broke).
    ClientGone,
    Timeout,
    Shutdown,
    TooManyErrors,
    /// A refusal that closes the session (connect-stage rejection, QUIT).
    Closed,
}

/// What the session did, for the log line at its end (and the event log later).
#[derive(Debug, Clone)]
pub struct SessionSummary {
    pub outcome: Category,
    pub check: Option<&'static str>,
    pub transactions: u32,
    pub delivered: u32,
    pub last_reply: Option<String>,
    /// Failed AUTH attempts (the upstream's 535), for reputation.
    pub auth_failures: u32,
    /// A TLS handshake with the client failed.
    pub tls_failed: bool,
    /// Replies to the client were delayed (tarpit).
    pub tarpitted: bool,
    /// Sender and recipients of the last transaction, for the session's log line.
    pub last_sender: Option<String>,
    pub last_recipients: Vec<String>,
}

/// What the event log records about a transaction, gathered as it runs.
#[derive(Debug, Default)]
struct TxLog {
    started: Option<Instant>,
    recipients: Vec<RecipientResult>,
    size: u64,
    message_id: Option<String>,
    subject: Option<String>,
    score: f32,
    mail_ms: u32,
    rcpt_ms: u32,
    data_ms: u32,
    upstream_ms: u32,
    /// The final reply to DATA (or the refusal that ended the transaction).
    reply: Option<String>,
    upstream_reply: Option<String>,
}

fn ms_since(t: Instant) -> u32 {
    u32::try_from(t.elapsed().as_millis()).unwrap_or(u32::MAX)
}

/// One mail transaction, from MAIL to the end of DATA or RSET.
#[derive(Debug)]
struct Transaction {
    from: Address,
    params: Vec<Param>,
    smtputf8: bool,
    declared_size: Option<u64>,
    /// Recipients the client was told `250` for, with their parameters.
    rcpts: Vec<Address>,
    /// The parameters of each of `rcpts`, for replaying the envelope upstream.
    rcpt_params: Vec<Vec<Param>>,
    /// Whitelist exemptions for this transaction (session ones included).
    exempt: Exemptions,
    /// The upstream every recipient of this transaction goes to.
    route: Option<Arc<Upstream>>,
    /// The upstream accepted a recipient that thassp then refused to the client: the
    /// upstream envelope must be rebuilt before DATA.
    upstream_dirty: bool,
    /// The upstream failed mid-transaction: every further command of this transaction gets
    /// this reply, so nothing is acknowledged that cannot be delivered.
    failed: Option<Reply>,
    /// Most significant refusal seen in this transaction, for the outcome category.
    refusal: Option<(Category, Option<&'static str>)>,
    log: TxLog,
}

pub struct Session<S> {
    io: ClientStream<S>,
    listener: ListenerPolicy,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    snap: Arc<Snapshot>,
    info: SessionInfo,
    shutdown: watch::Receiver<Phase>,
    /// What our last EHLO reply advertised: MAIL/RCPT parameters are checked against it.
    advertised: Option<Capabilities>,
    // Boxed: most of the time a session has neither, and an idle session should be small.
    tx: Option<Box<Transaction>>,
    upstream: Option<Box<UpstreamConn>>,
    errors: u32,
    /// Shared facts (PTR) computed once for all checks.
    facts: SessionFacts,
    /// Whitelist exemptions granted at connect/HELO, for the whole session.
    session_exempt: Exemptions,
    /// This connection's slot in the per-client limits, released when the session ends.
    admission: Option<Admission>,
    /// Failed pregreet in monitor mode (later the reputation issue counts it).
    pregreet_flagged: bool,
    /// Recipients accepted over all transactions, for `checks.limits.max_recipients_per_session`.
    rcpts_total: usize,
    /// A connect- or HELO-stage refusal held until MAIL because the client may still
    /// authenticate (then it no longer applies).
    deferred: Option<(Refusal, Option<&'static str>)>,
    /// Delay before each reply when the client is tarpitted.
    tarpit: Option<Duration>,
    /// This session's entry in the live-session registry (removed on drop).
    live: crate::live::LiveGuard,
    /// Replies queued since the last flush (each costs one tarpit delay).
    pending_replies: u32,
    /// The client's failures in the reputation window when the session began.
    failure_base: u64,
    /// Failures counted during this session.
    failures: u64,
    /// Scores of the connect and HELO stages, carried into each transaction's score.
    session_score: f32,
    /// Transactions logged (the connection row's count must match).
    tx_seq: u32,
    bytes_in: u64,
    bytes_out: u64,
    connected_at: chrono::DateTime<chrono::Utc>,
    seen_command: bool,
    /// Discarding the rest of an over-long command line.
    discarding: bool,
    summary: SessionSummary,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub fn new(
        io: S,
        snap: Arc<Snapshot>,
        info: SessionInfo,
        listener: ListenerPolicy,
        shutdown: watch::Receiver<Phase>,
    ) -> Self {
        let live = snap.live.register(&info.id, info.peer);
        Self {
            io: MaybeTls::Plain(io),
            listener,
            // Both grow on first use: an idle connection should cost as little as possible.
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            snap,
            info,
            shutdown,
            advertised: None,
            tx: None,
            upstream: None,
            errors: 0,
            facts: SessionFacts::default(),
            session_exempt: Exemptions::default(),
            admission: None,
            pregreet_flagged: false,
            rcpts_total: 0,
            deferred: None,
            tarpit: None,
            live,
            pending_replies: 0,
            failure_base: 0,
            failures: 0,
            session_score: 0.0,
            tx_seq: 0,
            bytes_in: 0,
            bytes_out: 0,
            connected_at: chrono::Utc::now(),
            seen_command: false,
            discarding: false,
            summary: SessionSummary {
                outcome: Category::Aborted,
                check: None,
                transactions: 0,
                delivered: 0,
                last_reply: None,
                auth_failures: 0,
                tls_failed: false,
                tarpitted: false,
                last_sender: None,
                last_recipients: Vec::new(),
            },
        }
    }

    /// Runs the session to its end and returns what happened.
    ///
    /// Not an `async fn`: one would keep `self` twice in its future (its argument and the
    /// body's copy), and this future is what every waiting connection costs.
    #[allow(clippy::manual_async_fn, reason = "an async fn stores self twice")]
    pub fn run(mut self) -> impl Future<Output = SessionSummary> + Send
    where
        S: 'static,
    {
        async move {
            let result = self.serve().await;
            // The teardown's futures in a box of their own: inline they would enlarge the
            // future every waiting session is held in.
            Box::pin(self.finish(result)).await
        }
    }

    async fn finish(mut self, result: Result<(), Stop>) -> SessionSummary {
        let stop_reply = match &result {
            Ok(()) | Err(Stop::Closed) | Err(Stop::ClientGone) => None,
            Err(Stop::Timeout) => Some(Reply::build(
                421,
                "4.4.2",
                format!("{} Error: timeout exceeded", self.info.hostname),
            )),
            Err(Stop::Shutdown) => Some(Reply::build(
                421,
                "4.3.2",
                format!("{} Service shutting down, try again later", self.info.hostname),
            )),
            Err(Stop::TooManyErrors) => Some(Reply::build(
                421,
                "4.7.0",
                format!("{} Error: too many errors", self.info.hostname),
            )),
        };
        if let Some(r) = stop_reply {
            self.reply(&r);
        }
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
        Box::pin(self.release_upstream()).await;
        // A transaction still open when the session ended was abandoned.
        if self.tx.is_some() {
            self.end_transaction(None, None);
        }
        // A load balancer's health check (PROXY v2 LOCAL, nothing said) is no mail attempt.
        if self.info.health_check && !self.seen_command {
            return self.finish_quietly(result);
        }
        let ptr = match self.facts.ptr.get() {
            Some(crate::policy::Ptr::Confirmed(n) | crate::policy::Ptr::Unconfirmed(n)) => Some(n.clone()),
            _ => None,
        };
        self.snap.events.log_connection(ConnectionEvent {
            session_id: self.info.id.clone(),
            connect_time: self.connected_at,
            end_time: chrono::Utc::now(),
            client: self.info.peer,
            proxied_by: self.info.proxied_by,
            ptr,
            helo: self.info.helo.clone(),
            tls_version: self.info.tls.as_ref().map(|t| t.0.clone()),
            tls_cipher: self.info.tls.as_ref().map(|t| t.1.clone()),
            auth_user: self.info.authenticated.clone(),
            transactions: self.tx_seq,
            outcome: self.summary.outcome,
            check: self.summary.check.map(str::to_string),
            last_reply: self.summary.last_reply.clone(),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
        });
        let s = &self.summary;
        info!(
            session = %self.info.id,
            client = %self.info.peer.ip(),
            helo = self.info.helo.as_deref().unwrap_or(""),
            from = s.last_sender.as_deref().unwrap_or(""),
            rcpts = %s.last_recipients.join(","),
            outcome = %s.outcome,
            check = s.check.unwrap_or(""),
            transactions = s.transactions,
            delivered = s.delivered,
            reply = s.last_reply.as_deref().unwrap_or(""),
            "Session ended."
        );
        self.summary
    }

    async fn serve(&mut self) -> Result<(), Stop> {
        // Rare or one-off steps with large futures are boxed (here and for each command):
        // the session's task then stays small while it waits for the client, which is what
        // thousands of idle or tarpitted connections cost.
        if self.listener.implicit_tls {
            Box::pin(self.tls_handshake()).await?;
        }
        let decision = Box::pin(self.snap.pipeline.run(&self.context(
            Stage::Connect,
            None,
            None,
            &self.session_exempt,
        )))
        .await;
        self.session_exempt.add(&decision.exempt);
        self.session_score += decision.score;
        if let Some(refusal) = refusal_of(&decision.action) {
            if self.auth_possible() {
                // Postfix's smtpd_delay_reject: a client that may still authenticate gets
                // its refusal at MAIL, so submission users are not turned away at connect.
                self.deferred = Some((refusal.clone(), decision.check));
            } else {
                self.summary.outcome = refusal.category;
                self.summary.check = decision.check;
                let category = refusal.category;
                self.failure(category.as_str());
                // RFC 5321 §3.1: a server that refuses the session says 554 (or 421 for a
                // temporary refusal) instead of 220, whatever code the check chose.
                let mut reply = refusal.reply.clone();
                reply.code = if reply.is_transient() { 421 } else { 554 };
                self.reply(&reply);
                return Err(Stop::Closed);
            }
        }
        let checks = &self.snap.config.checks;
        if !self.session_exempt.covers("limits") {
            match self.snap.limiter.admit(self.info.peer.ip(), &checks.limits) {
                Ok(admission) => self.admission = Some(admission),
                Err(refused) => {
                    let text = match refused {
                        Refused::Concurrency(n) => {
                            format!(
                                "{} Too many connections from your address (limit {n}), try again later",
                                self.info.hostname
                            )
                        }
                        Refused::Rate(n) => {
                            format!(
                                "{} Too many connections from your address in a short time (limit {n}), try again later",
                                self.info.hostname
                            )
                        }
                    };
                    self.summary.outcome = Category::RateLimit;
                    self.summary.check = Some("limits");
                    self.reply(&Reply::build(421, "4.7.0", text));
                    return Err(Stop::Closed);
                }
            }
        }
        if let Some(rep) = self.snap.reputation.clone()
            && !self.session_exempt.covers("reputation")
        {
            match rep.failures(self.info.peer.ip()).await {
                Ok(n) => {
                    self.failure_base = n;
                    if rep.config.tarpit_after > 0 && n >= rep.config.tarpit_after {
                        self.start_tarpit();
                    }
                }
                Err(e) => {
                    warn!(session = %self.info.id, error = %e, "Reputation unavailable; no tarpit decision.")
                }
            }
        }
        let banner = format!("{} ESMTP thassp", self.info.hostname);
        let pregreet = self.pregreet_active();
        if pregreet {
            // postscreen-style: a teaser line, then silence. A real MTA waits for the final
            // `220 ` line; bots talk at once.
            self.wbuf
                .extend_from_slice(format!("220-{banner}\r\n").as_bytes());
            let wait = self.snap.config.checks.pregreet.wait;
            match self.fill(wait, true).await {
                Err(Stop::Timeout) => {}
                Ok(()) => self.early_talker("talked before the greeting")?,
                Err(e) => return Err(e),
            }
        }
        // The greeting carries no enhanced code (RFC 2034 §3).
        self.reply(&Reply {
            code: 220,
            enhanced: None,
            lines: vec![banner],
        });
        loop {
            let line = self.next_line().await?;
            // Without PIPELINING (HELO session, or before EHLO) a client must wait for each
            // reply; one that does not is a bot (postscreen's pipelining test).
            if pregreet && !self.info.esmtp && !self.rbuf.is_empty() {
                self.early_talker("sent commands without waiting for replies (no PIPELINING)")?;
            }
            self.seen_command = true;
            Box::pin(self.handle_line(&line)).await?;
        }
    }

    fn finish_quietly(self, _result: Result<(), Stop>) -> SessionSummary {
        debug!(session = %self.info.id, "Health check from the load balancer.");
        self.summary
    }

    fn pregreet_active(&self) -> bool {
        self.snap.config.checks.pregreet.enabled
            && !self.listener.implicit_tls
            && !self.session_exempt.covers("pregreet")
            && self.info.authenticated.is_none()
    }

    /// Applies `checks.pregreet.action` to a client that talked out of turn.
    fn early_talker(&mut self, what: &str) -> Result<(), Stop> {
        let action = self.snap.config.checks.pregreet.action;
        let refusal = Refusal {
            reply: Reply::build(554, "5.5.1", format!("Protocol error: client {what}")),
            category: Category::Pregreet,
        };
        warn!(session = %self.info.id, client = %self.info.peer.ip(), action = %action, "Early talker: {what}.");
        self.failure("pregreet");
        match action.verdict(refusal) {
            Verdict::Reject(r) | Verdict::TempFail(r) => {
                self.summary.outcome = r.category;
                self.summary.check = Some("pregreet");
                let mut reply = r.reply;
                if reply.is_transient() {
                    reply.code = 421;
                }
                self.rbuf.clear();
                self.reply(&reply);
                Err(Stop::Closed)
            }
            _ => {
                self.pregreet_flagged = true;
                Ok(())
            }
        }
    }

    // --------------------------------------------------------------------------------------
    // I/O
    // --------------------------------------------------------------------------------------

    fn reply(&mut self, r: &Reply) {
        let start = self.wbuf.len();
        r.write_to(&mut self.wbuf);
        let c = &self.snap.counters;
        Counters::bump(match r.code {
            200..300 => &c.replies_2xx,
            300..400 => &c.replies_3xx,
            400..500 => &c.replies_4xx,
            _ => &c.replies_5xx,
        });
        self.pending_replies += 1;
        // The summary is the first line just written ("250-" read as "250 "), copied into the
        // same String each time: formatting it anew for every reply cost 2-3 % of the
        // instructions per message.
        let written = &self.wbuf[start..];
        let line = written
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(written, |end| &written[..end]);
        let last = self.summary.last_reply.get_or_insert_with(String::new);
        last.clear();
        last.push_str(std::str::from_utf8(line).unwrap_or(""));
        if last.as_bytes().get(3) == Some(&b'-') {
            last.replace_range(3..4, " ");
        }
    }

    /// Counts a failure of this client for its reputation (tarpit, autoblacklist). The store
    /// write runs in the background: the reply never waits on it.
    fn failure(&mut self, kind: &str) {
        let Some(rep) = self.snap.reputation.clone() else {
            return;
        };
        if !rep.counts(kind) || self.session_exempt.covers("reputation") || self.info.authenticated.is_some()
        {
            return;
        }
        self.failures += 1;
        let ip = self.info.peer.ip();
        tokio::spawn(async move {
            if let Err(e) = rep.record_failure(ip).await {
                tracing::debug!(client = %ip, error = %e, "Could not count a failure.");
            }
        });
        let after = self.snap.reputation.as_ref().map_or(0, |r| r.config.tarpit_after);
        if self.tarpit.is_none() && after > 0 && self.failure_base + self.failures >= after {
            self.start_tarpit();
        }
    }

    fn start_tarpit(&mut self) {
        if let Some(rep) = &self.snap.reputation {
            self.tarpit = Some(rep.config.tarpit_delay);
            self.summary.tarpitted = true;
            self.live.entry.set_tarpitted();
            info!(session = %self.info.id, client = %self.info.peer.ip(), "Client tarpitted: every reply is delayed.");
        }
    }

    /// Sends a refusal and counts it towards `smtp.max_errors`.
    fn error_reply(&mut self, r: &Reply) -> Result<(), Stop> {
        self.reply(r);
        if matches!(r.code, 500..=504 | 555) {
            self.failure("protocol");
        }
        if r.code >= 500 {
            self.errors += 1;
            if self.errors >= self.snap.config.smtp.max_errors {
                return Err(Stop::TooManyErrors);
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        if let Some(delay) = self.tarpit {
            // One delay per reply, pipelined replies included; a timer, not a thread.
            let n = self.pending_replies.clamp(1, 10);
            tokio::time::sleep(delay * n).await;
        }
        self.pending_replies = 0;
        self.bytes_out += self.wbuf.len() as u64;
        let timeout = self.snap.config.smtp.command_timeout;
        let result = tokio::time::timeout(timeout, self.io.write_all(&self.wbuf)).await;
        self.wbuf.clear();
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::ClientGone),
            Err(_) => Err(Stop::Timeout),
        }
    }

    /// Reads more input. Replies queued so far are written first (RFC 2920: a server may
    /// hold replies only while more pipelined commands are already buffered).
    async fn fill(&mut self, timeout: Duration, interruptible: bool) -> Result<(), Stop> {
        self.fill_reserving(timeout, interruptible, COMMAND_READ).await
    }

    /// [`Self::fill`] with room for `reserve` more bytes: small while commands are read (a
    /// waiting connection holds this buffer), larger inside DATA.
    async fn fill_reserving(
        &mut self,
        timeout: Duration,
        interruptible: bool,
        reserve: usize,
    ) -> Result<(), Stop> {
        self.flush().await?;
        let stops = |p: Phase| p == Phase::Deadline || (interruptible && p == Phase::Draining);
        if stops(*self.shutdown.borrow()) {
            return Err(Stop::Shutdown);
        }
        self.rbuf.reserve(reserve);
        let shutdown = &mut self.shutdown;
        let wait_shutdown = async {
            loop {
                if shutdown.changed().await.is_err() {
                    // The app is gone without a shutdown phase: nothing more to wait for.
                    std::future::pending::<()>().await;
                }
                if stops(*shutdown.borrow()) {
                    return;
                }
            }
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, self.io.read_buf(&mut self.rbuf)) => match r {
                Err(_) => Err(Stop::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => Err(Stop::ClientGone),
                Ok(Ok(n)) => {
                    self.bytes_in += n as u64;
                    Ok(())
                }
            },
            () = wait_shutdown => Err(Stop::Shutdown),
        }
    }

    /// The next command line (without terminator). Over-long lines are refused and skipped
    /// without being buffered.
    async fn next_line(&mut self) -> Result<Vec<u8>, Stop> {
        self.next_line_within(ENVELOPE_LINE_MAX).await
    }

    async fn next_line_within(&mut self, limit: usize) -> Result<Vec<u8>, Stop> {
        let smtp = &self.snap.config.smtp;
        let timeout = if self.seen_command {
            smtp.command_timeout
        } else {
            smtp.greeting_timeout
        };
        let deadline = Instant::now() + timeout;
        loop {
            if self.discarding {
                match self.rbuf.iter().position(|&b| b == b'\n') {
                    Some(nl) => {
                        self.rbuf.advance(nl + 1);
                        self.discarding = false;
                        self.error_reply(&Reply::build(500, "5.5.2", "Line too long"))?;
                        continue;
                    }
                    None => self.rbuf.clear(),
                }
            } else {
                match codec::find_line(&self.rbuf, limit) {
                    LineStatus::Complete { len, content } => {
                        let line = self.rbuf[..content].to_vec();
                        self.rbuf.advance(len);
                        return Ok(line);
                    }
                    LineStatus::TooLong => {
                        self.discarding = true;
                        continue;
                    }
                    LineStatus::Incomplete => {}
                }
            }
            // The whole line must arrive within the timeout, not each byte: a client
            // trickling one byte at a time (slowloris) cannot hold the session.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Stop::Timeout);
            }
            let interruptible = self.tx.is_none();
            self.fill(left, interruptible).await?;
        }
    }

    // --------------------------------------------------------------------------------------
    // Commands
    // --------------------------------------------------------------------------------------

    async fn handle_line(&mut self, line: &[u8]) -> Result<(), Stop> {
        let command = match codec::parse_command(line) {
            Ok(c) => c,
            Err(e) => return self.error_reply(&syntax_reply(&e)),
        };
        let envelope = matches!(command, Command::Mail { .. } | Command::Rcpt { .. });
        if !envelope && line.len() + 2 > COMMAND_LINE_MAX {
            return self.error_reply(&Reply::build(500, "5.5.2", "Line too long"));
        }
        let stage = match &command {
            Command::Helo(_) | Command::Ehlo(_) | Command::StartTls | Command::Auth(_) => {
                Some(LiveStage::Helo)
            }
            Command::Mail { .. } => Some(LiveStage::Mail),
            Command::Rcpt { .. } => Some(LiveStage::Rcpt),
            Command::Data => Some(LiveStage::Data),
            _ => None,
        };
        if let Some(stage) = stage {
            self.live.entry.set_stage(stage);
        }
        match command {
            // Each command's future is allocated while it runs (see `run`): the ones sent once
            // a session, with big futures (DNS, TLS, an upstream exchange), are boxed on
            // their own so that this future, allocated for every MAIL, RCPT and DATA, stays
            // small.
            Command::Helo(name) => Box::pin(self.handle_helo(name, false)).await,
            Command::Ehlo(name) => Box::pin(self.handle_helo(name, true)).await,
            Command::Mail { from, params } => self.handle_mail(from, params).await,
            Command::Rcpt { to, params } => {
                // Stored bare, like the sender, so a search by recipient finds it.
                let (started, address) = (Instant::now(), to.raw.clone());
                let result = self.handle_rcpt(to, params).await;
                // Each recipient and the reply it got, for the event log.
                let reply = self.summary.last_reply.clone().unwrap_or_default();
                if let Some(tx) = self.tx.as_mut()
                    && tx.log.recipients.len() < 10_000
                {
                    tx.log.recipients.push(RecipientResult { address, reply });
                    tx.log.rcpt_ms = tx.log.rcpt_ms.saturating_add(ms_since(started));
                }
                result
            }
            Command::Data => self.handle_data().await,
            Command::Rset => {
                self.abort_transaction();
                self.reply(&Reply::build(250, "2.0.0", "Ok"));
                Ok(())
            }
            Command::Noop => {
                self.reply(&Reply::build(250, "2.0.0", "Ok"));
                Ok(())
            }
            Command::Quit => {
                self.reply(&Reply::build(221, "2.0.0", "Bye"));
                if self.summary.transactions == 0 && self.summary.outcome == Category::Aborted {
                    self.summary.outcome = Category::Other;
                }
                Err(Stop::Closed)
            }
            Command::Vrfy => {
                self.reply(&Reply::build(
                    252,
                    "2.5.0",
                    "Cannot VRFY user, but will accept message and attempt delivery",
                ));
                Ok(())
            }
            Command::Expn => self.error_reply(&Reply::build(502, "5.5.1", "EXPN not available")),
            Command::Help => {
                self.reply(&Reply {
                    code: 214,
                    enhanced: Some(codec::Enhanced(2, 0, 0)),
                    lines: vec![
                        "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP".into(),
                        "See RFC 5321; mail for this server's domains only".into(),
                    ],
                });
                Ok(())
            }
            Command::StartTls => Box::pin(self.handle_starttls()).await,
            Command::Auth(arg) => Box::pin(self.handle_auth(arg)).await,
            Command::Bdat => self.error_reply(&Reply::build(502, "5.5.1", "Command not implemented here")),
            Command::Unknown(_) => self.error_reply(&Reply::build(500, "5.5.2", "Command not recognized")),
        }
    }

    // --------------------------------------------------------------------------------------
    // TLS and AUTH
    // --------------------------------------------------------------------------------------

    /// Runs the server side of a TLS handshake on the current (plain) stream.
    async fn tls_handshake(&mut self) -> Result<(), Stop> {
        let Some(config) = self.listener.tls.clone() else {
            return Err(Stop::Closed);
        };
        let Some(plain) = self.io.take_plain() else {
            return Err(Stop::Closed);
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(plain)).await {
            Ok(Ok(tls)) => {
                let (_, state) = tls.get_ref();
                self.info.tls = Some(crate::tls::describe(
                    state.protocol_version(),
                    state.negotiated_cipher_suite(),
                ));
                self.io = MaybeTls::Tls(Box::new(tls));
                Ok(())
            }
            Ok(Err(e)) => {
                self.summary.tls_failed = true;
                Counters::bump(&self.snap.counters.tls_handshake_failures);
                warn!(session = %self.info.id, client = %self.info.peer.ip(), error = %e, "TLS handshake with the client failed.");
                Err(Stop::ClientGone)
            }
            Err(_) => {
                self.summary.tls_failed = true;
                Counters::bump(&self.snap.counters.tls_handshake_failures);
                warn!(session = %self.info.id, client = %self.info.peer.ip(), "TLS handshake with the client timed out.");
                Err(Stop::ClientGone)
            }
        }
    }

    async fn handle_starttls(&mut self) -> Result<(), Stop> {
        if self.listener.tls.is_none() {
            return self.error_reply(&Reply::build(502, "5.5.1", "STARTTLS not available"));
        }
        if self.io.is_tls() {
            return self.error_reply(&Reply::build(503, "5.5.1", "TLS already active"));
        }
        self.reply(&Reply::build(220, "2.0.0", "Ready to start TLS"));
        self.flush().await?;
        // RFC 3207 §5 / CVE-2011-0411: anything pipelined after STARTTLS arrived in plaintext
        // and must never be executed inside the TLS session.
        if !self.rbuf.is_empty() {
            warn!(session = %self.info.id, client = %self.info.peer.ip(), bytes = self.rbuf.len(), "Discarding plaintext pipelined after STARTTLS.");
            self.rbuf.clear();
        }
        self.tls_handshake().await?;
        // RFC 3207 §4.2: the session starts over; the client must EHLO again.
        self.tx = None;
        self.info.helo = None;
        self.info.esmtp = false;
        self.advertised = None;
        self.seen_command = false;
        self.release_upstream().await;
        Ok(())
    }

    /// Whether this listener can offer AUTH at some point of the session (now or after
    /// STARTTLS), so anti-spam refusals must wait until MAIL.
    fn auth_possible(&self) -> bool {
        match self.listener.auth {
            AuthPolicy::Never => false,
            AuthPolicy::Always => true,
            AuthPolicy::AfterTls => self.listener.tls.is_some(),
        }
    }

    /// SASL mechanisms offered to this client now: those of the upstream AUTH is relayed
    /// to, when the listener's policy allows AUTH in this state.
    fn auth_mechanisms(&self) -> Vec<String> {
        let allowed = match self.listener.auth {
            AuthPolicy::Never => false,
            AuthPolicy::Always => true,
            AuthPolicy::AfterTls => self.io.is_tls(),
        };
        if !allowed || self.info.authenticated.is_some() {
            return Vec::new();
        }
        self.snap
            .routes
            .auth_upstream()
            .and_then(|u| u.capabilities())
            .map(|c| c.auth.clone())
            .unwrap_or_default()
    }

    /// Relays a SASL exchange line by line to the upstream. Its 235 authenticates the
    /// session; credentials pass through and are never logged or kept.
    async fn handle_auth(&mut self, arg: String) -> Result<(), Stop> {
        if self.info.helo.is_none() || !self.info.esmtp {
            return self.error_reply(&Reply::build(503, "5.5.1", "Send EHLO first"));
        }
        if self.info.authenticated.is_some() {
            return self.error_reply(&Reply::build(503, "5.5.1", "Already authenticated"));
        }
        if self.tx.is_some() {
            return self.error_reply(&Reply::build(
                503,
                "5.5.1",
                "AUTH not allowed during a mail transaction",
            ));
        }
        if self.listener.require_tls && !self.io.is_tls() {
            return self.error_reply(&Reply::build(530, "5.7.0", "Must issue a STARTTLS command first"));
        }
        let mechanisms = self.auth_mechanisms();
        if mechanisms.is_empty() {
            if self.listener.auth == AuthPolicy::AfterTls && !self.io.is_tls() && self.listener.tls.is_some()
            {
                return self.error_reply(&Reply::build(
                    538,
                    "5.7.11",
                    "Encryption required for requested authentication mechanism",
                ));
            }
            return self.error_reply(&Reply::build(503, "5.5.1", "AUTH not available"));
        }
        let mut words = arg.split_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        if !mechanisms.contains(&mechanism) {
            return self.error_reply(&Reply::build(504, "5.5.4", "Unrecognized authentication type"));
        }
        let Some(up) = self.snap.routes.auth_upstream().cloned() else {
            return self.error_reply(&Reply::build(454, "4.7.0", "Temporary authentication failure"));
        };
        let reusable = self
            .upstream
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.upstream, &up) && !c.broken);
        if !reusable {
            self.release_upstream().await;
            match self.upstream_conn(&up, true).await {
                Ok(c) => self.upstream = Some(c),
                Err(e) => {
                    self.upstream_failure(&e);
                    return self.error_reply(&Reply::build(454, "4.7.0", "Temporary authentication failure"));
                }
            }
        }
        if let Some(conn) = self.upstream.as_mut() {
            // Authenticated or half-way through SASL, it must never serve another client.
            conn.auth_used = true;
        }
        // The user name is logged (PLAIN's authcid, LOGIN's first answer); passwords never.
        let mut user = initial.as_deref().and_then(|i| sasl_user(&mechanism, i, 0));
        let mut line = match &initial {
            Some(i) => format!("AUTH {mechanism} {i}\r\n"),
            None => format!("AUTH {mechanism}\r\n"),
        };
        let mut round = 0;
        let reply = loop {
            let Some(conn) = self.upstream.as_mut() else {
                return self.error_reply(&Reply::build(454, "4.7.0", "Temporary authentication failure"));
            };
            let reply = match conn.command(line.as_bytes(), "AUTH").await {
                Ok(r) => r,
                Err(e) => {
                    self.upstream_failure(&e);
                    return self.error_reply(&Reply::build(454, "4.7.0", "Temporary authentication failure"));
                }
            };
            if reply.code != 334 {
                break reply;
            }
            round += 1;
            if round > 10 {
                warn!(session = %self.info.id, "SASL exchange longer than 10 rounds; aborting it.");
                if let Some(conn) = self.upstream.as_mut() {
                    conn.broken = true;
                }
                return self.error_reply(&Reply::build(501, "5.5.2", "Authentication exchange too long"));
            }
            // Challenges carry no enhanced code (RFC 4954 §4).
            self.reply(&Reply {
                enhanced: None,
                ..reply
            });
            let response = self.next_line_within(AUTH_LINE_MAX).await?;
            let response = String::from_utf8_lossy(&response).into_owned();
            if user.is_none() {
                user = sasl_user(&mechanism, &response, round);
            }
            line = format!("{response}\r\n");
        };
        if reply.code == 235 {
            let user = user.unwrap_or_else(|| "unknown".into());
            info!(session = %self.info.id, client = %self.info.peer.ip(), user = %user, mechanism = %mechanism, "Client authenticated through the upstream.");
            self.info.authenticated = Some(user);
            self.reply(&reply.with_default_enhanced((7, 0)));
            return Ok(());
        }
        if reply.is_permanent() && reply.code != 501 {
            self.summary.auth_failures += 1;
            self.failure("auth");
            Counters::bump(&self.snap.counters.auth_failures);
            warn!(session = %self.info.id, client = %self.info.peer.ip(), user = user.as_deref().unwrap_or(""), mechanism = %mechanism, reply = %reply, "Authentication failed.");
        }
        self.error_reply(&reply.with_default_enhanced((7, 8)))
    }

    /// A connection to `up` for this client: a kept one when `pooled` and one is waiting
    /// (told this client with XCLIENT), else a new one.
    async fn upstream_conn(
        &mut self,
        up: &Arc<Upstream>,
        pooled: bool,
    ) -> Result<Box<UpstreamConn>, RelayError> {
        let identity = self.identity();
        let counters = &self.snap.counters;
        // A few tries at most: every kept connection that fails here costs a round trip.
        for _ in 0..3 {
            let Some(mut conn) = pooled.then(|| self.snap.pool.take(up, &identity)).flatten() else {
                break;
            };
            match conn.reassign(&identity).await {
                Ok(()) => {
                    Counters::bump(&counters.upstream_reuses);
                    return Ok(conn);
                }
                Err(e) => {
                    debug!(session = %self.info.id, error = %e, "A kept upstream connection failed; trying another.");
                    if !conn.broken {
                        conn.quit().await;
                    }
                }
            }
        }
        let conn = UpstreamConn::connect(up, Some(&identity)).await?;
        Counters::bump(&counters.upstream_connects);
        Ok(Box::new(conn))
    }

    /// Hands the upstream connection to the pool for the next session when it is clean
    /// (and this session never authenticated), else closes it.
    async fn release_upstream(&mut self) {
        let Some(conn) = self.upstream.take() else {
            return;
        };
        let kept = if self.info.authenticated.is_none() {
            self.snap.pool.put(conn)
        } else {
            Err(conn)
        };
        if let Err(conn) = kept {
            conn.quit().await;
        }
    }

    /// The real client, for XCLIENT/XFORWARD.
    fn identity(&self) -> ClientIdentity {
        ClientIdentity {
            addr: self.info.peer.ip(),
            port: self.info.peer.port(),
            name: match self.facts.ptr.get() {
                Some(crate::policy::Ptr::Confirmed(name)) => Some(name.clone()),
                _ => None,
            },
            helo: self.info.helo.clone(),
            esmtp: self.info.esmtp,
            local: self.info.local,
        }
    }

    fn context<'a>(
        &'a self,
        stage: Stage,
        rcpt: Option<&'a Address>,
        message: Option<&'a dyn MessageView>,
        exempt: &'a Exemptions,
    ) -> Context<'a> {
        Context {
            stage,
            session: &self.info,
            sender: self.tx.as_ref().map(|t| &t.from),
            recipient: rcpt,
            recipients: self.tx.as_ref().map_or(&[], |t| t.rcpts.as_slice()),
            message,
            facts: &self.facts,
            exempt,
        }
    }

    /// The exemptions in force for the current transaction (or the session).
    fn tx_exempt(&self) -> &Exemptions {
        self.tx.as_ref().map_or(&self.session_exempt, |t| &t.exempt)
    }

    async fn handle_helo(&mut self, name: String, esmtp: bool) -> Result<(), Stop> {
        self.abort_transaction();
        self.info.helo = Some(name);
        self.info.esmtp = esmtp;
        let decision = self
            .snap
            .pipeline
            .run(&self.context(Stage::Helo, None, None, &self.session_exempt))
            .await;
        self.session_exempt.add(&decision.exempt);
        self.session_score += decision.score;
        if let Some(refusal) = refusal_of(&decision.action)
            && self.auth_possible()
        {
            // As at connect: applied at MAIL unless the client authenticates first.
            if self.deferred.is_none() {
                self.deferred = Some((refusal.clone(), decision.check));
            }
        } else if let Some(refusal) = refusal_of(&decision.action) {
            self.info.helo = None;
            let category = refusal.category;
            self.failure(category.as_str());
            self.summary.outcome = refusal.category;
            self.summary.check = decision.check;
            let reply = refusal.reply.clone();
            return self.error_reply(&reply);
        }
        if !esmtp {
            self.advertised = None;
            self.reply(&Reply {
                code: 250,
                enhanced: None,
                lines: vec![self.info.hostname.clone()],
            });
            return Ok(());
        }
        // Advertise only what every upstream supports, since the route is not known yet.
        let up = self.snap.routes.common_capabilities().unwrap_or_default();
        // A message the MTA's own SIZE would refuse is better refused at MAIL than after
        // it was transferred.
        let max = match up.size {
            Some(n) if n > 0 => n.min(self.snap.config.smtp.max_message_size),
            _ => self.snap.config.smtp.max_message_size,
        };
        let adv = Capabilities {
            pipelining: true,
            size: Some(max),
            eight_bit_mime: up.eight_bit_mime,
            smtputf8: up.smtputf8,
            dsn: up.dsn,
            enhanced_status_codes: true,
            ..Capabilities::default()
        };
        let mut lines = vec![
            self.info.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {max}"),
        ];
        if adv.eight_bit_mime {
            lines.push("8BITMIME".into());
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        if adv.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if adv.dsn {
            lines.push("DSN".into());
        }
        if self.listener.tls.is_some() && !self.io.is_tls() {
            lines.push("STARTTLS".into());
        }
        let mechanisms = self.auth_mechanisms();
        if !mechanisms.is_empty() {
            lines.push(format!("AUTH {}", mechanisms.join(" ")));
        }
        self.advertised = Some(adv);
        self.reply(&Reply {
            code: 250,
            enhanced: None,
            lines,
        });
        Ok(())
    }

    async fn handle_mail(&mut self, from: Address, params: Vec<Param>) -> Result<(), Stop> {
        if self.info.helo.is_none() {
            return self.error_reply(&Reply::build(503, "5.5.1", "Send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return self.error_reply(&Reply::build(503, "5.5.1", "Nested MAIL command"));
        }
        if self.listener.require_tls && !self.io.is_tls() {
            return self.error_reply(&Reply::build(530, "5.7.0", "Must issue a STARTTLS command first"));
        }
        if self.info.authenticated.is_none()
            && let Some((refusal, check)) = self.deferred.clone()
        {
            self.summary.outcome = refusal.category;
            self.summary.check = check;
            return self.error_reply(&refusal.reply);
        }
        // Only the flags: cloning the capabilities would copy their lists on every MAIL.
        let (size_limit, eight_bit_mime, utf8, dsn) =
            self.advertised.as_ref().map_or((None, false, false, false), |a| {
                (a.size, a.eight_bit_mime, a.smtputf8, a.dsn)
            });
        let size = size_limit.is_some();
        let mut smtputf8 = false;
        let mut declared_size = None;
        for p in &params {
            let value = p.value.as_deref();
            let ok = match (p.key.as_str(), value) {
                ("SIZE", Some(v)) if size => match v.parse::<u64>() {
                    Ok(n) => {
                        declared_size = Some(n);
                        true
                    }
                    Err(_) => false,
                },
                ("BODY", Some(v)) if eight_bit_mime => {
                    v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME")
                }
                ("SMTPUTF8", None) if utf8 => {
                    smtputf8 = true;
                    true
                }
                ("RET", Some(v)) if dsn => v.eq_ignore_ascii_case("FULL") || v.eq_ignore_ascii_case("HDRS"),
                ("ENVID", Some(_)) if dsn => true,
                _ => {
                    let r = Reply::build(555, "5.5.4", format!("Unsupported MAIL parameter {}", p.key));
                    return self.error_reply(&r);
                }
            };
            if !ok {
                return self.error_reply(&Reply::build(
                    501,
                    "5.5.4",
                    format!("Bad value for MAIL parameter {}", p.key),
                ));
            }
        }
        let limit = size_limit.unwrap_or(self.snap.config.smtp.max_message_size);
        if declared_size.is_some_and(|n| n > limit) {
            self.summary.outcome = Category::Size;
            return self.error_reply(&Reply::build(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ));
        }
        if from.utf8 && !smtputf8 {
            return self.error_reply(&Reply::build(
                553,
                "5.6.7",
                "Non-ASCII address requires the SMTPUTF8 parameter",
            ));
        }
        if let Ok(mut h) = self.facts.headers.lock() {
            h.clear();
        }
        if let Ok(mut r) = self.facts.results.lock() {
            *r = Default::default();
        }
        let mail_started = Instant::now();
        self.tx = Some(Box::new(Transaction {
            from,
            params,
            smtputf8,
            declared_size,
            rcpts: Vec::new(),
            rcpt_params: Vec::new(),
            exempt: self.session_exempt.clone(),
            route: None,
            upstream_dirty: false,
            failed: None,
            refusal: None,
            log: TxLog {
                started: Some(mail_started),
                score: self.session_score,
                ..TxLog::default()
            },
        }));
        let decision = self
            .snap
            .pipeline
            .run(&self.context(Stage::Mail, None, None, self.tx_exempt()))
            .await;
        if let Some(tx) = self.tx.as_mut() {
            tx.exempt.add(&decision.exempt);
            tx.log.score += decision.score;
            tx.log.mail_ms = ms_since(mail_started);
        }
        if let Some(refusal) = refusal_of(&decision.action) {
            let refusal = refusal.clone();
            self.end_transaction(Some((refusal.category, decision.check)), Some(&refusal.reply));
            return self.error_reply(&refusal.reply);
        }
        // The upstream hears MAIL together with the first RCPT (one round trip instead of
        // two, pipelined when it offers PIPELINING); a sender it refuses is refused at that
        // RCPT, as Postfix itself does with smtpd_delay_reject.
        self.reply(&Reply::build(250, "2.1.0", "Sender ok"));
        Ok(())
    }

    /// Makes sure an upstream connection to `up` exists with MAIL FROM sent for the current
    /// transaction, and sends `rcpt` in the same group. Returns the upstream's reply to MAIL
    /// and, when MAIL was accepted, its reply to the RCPT; `Err` is the 4xx for the client
    /// when the upstream cannot be used.
    async fn open_upstream_transaction(
        &mut self,
        up: &Arc<Upstream>,
        rcpt: Option<(&Address, &[Param])>,
    ) -> Result<(Reply, Option<Reply>), Reply> {
        let unavailable = || Reply::build(451, "4.4.1", "Upstream unavailable, try again later");
        // A kept connection the MTA closed while it waited fails on its first command, and
        // an MTA may end a connection that carried earlier transactions with 421 at the next
        // (Exim after 1000 messages, any MTA shutting down): either costs one fresh
        // connection, not a 4xx to the client.
        let mut retry = true;
        let (with_rcpt, rset, replies) = loop {
            let reusable = self
                .upstream
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(&c.upstream, up) && !c.broken && !c.inside_data());
            if !reusable {
                // Connecting (TCP, TLS, EHLO, XCLIENT) is the big part of this future and the
                // rare one once connections are kept: boxed, so that the future of every
                // RCPT stays small (it is allocated per command).
                Box::pin(self.release_upstream()).await;
                if self.info.authenticated.is_some() {
                    // The upstream session that authenticated cannot be recreated without
                    // the credentials, which thassp never keeps.
                    return Err(Reply::build(
                        451,
                        "4.4.1",
                        "Upstream session lost, try again later",
                    ));
                }
                // The first try may take a kept connection; a retry opens a new one.
                match Box::pin(self.upstream_conn(up, retry)).await {
                    Ok(c) => self.upstream = Some(c),
                    Err(e) => return Err(self.upstream_failure(&e)),
                }
            }
            let Some(tx) = self.tx.as_ref() else {
                return Err(Reply::build(503, "5.5.1", "Need MAIL command"));
            };
            let Some(conn) = self.upstream.as_mut() else {
                return Err(unavailable());
            };
            let mail = mail_line(tx, &conn.caps)?;
            let rcpt = rcpt.map(|(to, params)| rcpt_line(to, params, &conn.caps));
            let rset = conn.in_transaction;
            let mut group: Vec<(&[u8], &'static str)> = Vec::with_capacity(3);
            if rset {
                group.push((b"RSET\r\n", "RSET"));
            }
            group.push((mail.as_bytes(), "MAIL"));
            if let Some(r) = &rcpt {
                group.push((r.as_bytes(), "RCPT"));
            }
            let sent = match conn.xforward().await {
                Ok(()) => conn.pipeline(&group).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(r)
                    if retry
                        && conn.transactions > 0
                        && r.iter().take(usize::from(rset) + 1).any(|r| r.code == 421) =>
                {
                    debug!(session = %self.info.id, "The MTA closed a used upstream connection with 421; opening a new one.");
                    self.upstream = None;
                    retry = false;
                }
                Ok(r) => break (rcpt.is_some(), rset, r),
                Err(e) if retry && conn.unproven && e.connection_lost() => {
                    debug!(session = %self.info.id, error = %e, "A kept upstream connection was closed by the MTA; opening a new one.");
                    self.upstream = None;
                    retry = false;
                }
                Err(e) => {
                    let r = self.upstream_failure(&e);
                    self.upstream = None;
                    return Err(r);
                }
            }
        };
        let Some(conn) = self.upstream.as_mut() else {
            return Err(unavailable());
        };
        let mut replies = replies.into_iter();
        if rset {
            conn.in_transaction = false;
            match replies.next() {
                Some(r) if r.code == 250 => {}
                Some(r) if r.code == 421 => return Err(self.upstream_closed(&r)),
                other => {
                    conn.broken = true;
                    warn!(session = %self.info.id, reply = ?other.map(|r| r.to_string()), "Upstream refused RSET.");
                    return Err(Reply::build(
                        451,
                        "4.4.1",
                        "Upstream mail server error, try again later",
                    ));
                }
            }
        }
        let Some(mail_reply) = replies.next() else {
            return Err(unavailable());
        };
        if mail_reply.code == 421 {
            return Err(self.upstream_closed(&mail_reply));
        }
        if !mail_reply.is_positive() {
            return Ok((mail_reply, None));
        }
        conn.in_transaction = true;
        conn.transactions += 1;
        let rcpt_reply = replies.next();
        if let Some(tx) = self.tx.as_mut() {
            tx.route = Some(up.clone());
        }
        if with_rcpt && rcpt_reply.is_none() {
            // Cannot happen (every command after an accepted MAIL gets a reply): 4xx rather
            // than guess.
            return Err(unavailable());
        }
        Ok((mail_reply, rcpt_reply))
    }

    fn upstream_failure(&self, e: &RelayError) -> Reply {
        Counters::bump(&self.snap.counters.upstream_errors);
        warn!(session = %self.info.id, client = %self.info.peer.ip(), error = %e, "Upstream failed; the client gets a temporary failure.");
        Reply::build(451, "4.4.1", "Upstream mail server unavailable, try again later")
    }

    fn upstream_closed(&self, reply: &Reply) -> Reply {
        Counters::bump(&self.snap.counters.upstream_errors);
        warn!(session = %self.info.id, upstream_reply = %reply, "Upstream closed the session with 421.");
        Reply::build(
            451,
            "4.4.1",
            "Upstream mail server is not accepting mail right now, try again later",
        )
    }

    async fn handle_rcpt(&mut self, to: Address, params: Vec<Param>) -> Result<(), Stop> {
        let Some(tx) = self.tx.as_ref() else {
            return self.error_reply(&Reply::build(503, "5.5.1", "Need MAIL before RCPT"));
        };
        if let Some(r) = tx.failed.clone() {
            return self.error_reply(&r);
        }
        if tx.rcpts.len() >= self.snap.config.smtp.max_recipients {
            return self.error_reply(&Reply::build(452, "4.5.3", "Too many recipients"));
        }
        let per_session = self.snap.config.checks.limits.max_recipients_per_session;
        if per_session > 0 && self.rcpts_total >= per_session && !tx.exempt.covers("limits") {
            self.note_refusal(Category::RateLimit, Some("limits"));
            return self.error_reply(&Reply::build(
                452,
                "4.5.3",
                "Too many recipients in this session, try again later",
            ));
        }
        let dsn = self.advertised.as_ref().is_some_and(|a| a.dsn);
        for p in &params {
            let ok = match (p.key.as_str(), p.value.as_deref()) {
                ("NOTIFY", Some(v)) if dsn => valid_notify(v),
                ("ORCPT", Some(v)) if dsn => v.contains(';'),
                _ => {
                    let r = Reply::build(555, "5.5.4", format!("Unsupported RCPT parameter {}", p.key));
                    return self.error_reply(&r);
                }
            };
            if !ok {
                return self.error_reply(&Reply::build(
                    501,
                    "5.5.4",
                    format!("Bad value for RCPT parameter {}", p.key),
                ));
            }
        }
        if to.utf8 && !tx.smtputf8 {
            return self.error_reply(&Reply::build(
                553,
                "5.6.7",
                "Non-ASCII address requires the SMTPUTF8 parameter",
            ));
        }

        let decision = self
            .snap
            .pipeline
            .run(&self.context(Stage::Rcpt, Some(&to), None, self.tx_exempt()))
            .await;
        // A recipient's whitelisting (e.g. from greylisting) applies to that recipient only.
        let mut rcpt_exempt = self.tx_exempt().clone();
        rcpt_exempt.add(&decision.exempt);
        if let Some(refusal) = refusal_of(&decision.action) {
            let refusal = refusal.clone();
            self.note_refusal(refusal.category, decision.check);
            info!(session = %self.info.id, client = %self.info.peer.ip(), rcpt = %to, check = decision.check.unwrap_or(""), reply = %refusal.reply, "Recipient refused.");
            return self.error_reply(&refusal.reply);
        }

        // Defence in depth: whatever the pipeline said, only a routed domain is relayed.
        let route = if to.is_bare_postmaster() {
            self.snap.routes.default.clone()
        } else if self.info.authenticated.is_some() {
            to.domain_lower()
                .and_then(|d| self.snap.routes.route(&d).cloned())
                .or_else(|| self.snap.routes.default.clone())
        } else if to.local_is_plain() && to.domain_is_hostname() && !to.source_route {
            to.domain_lower()
                .and_then(|d| self.snap.routes.route(&d).cloned())
        } else {
            None
        };
        let Some(route) = route else {
            self.note_refusal(Category::RelayAttempt, Some("relay_control"));
            return self.error_reply(&Reply::build(550, "5.7.1", "Relay access denied"));
        };
        let same_route = self
            .tx
            .as_ref()
            .and_then(|t| t.route.as_ref())
            .map(|r| Arc::ptr_eq(r, &route));
        if same_route == Some(false) {
            return self.error_reply(&Reply::build(
                452,
                "4.5.3",
                "Recipients for this domain must be sent in a separate transaction",
            ));
        }
        let upstream_reply = if same_route.is_none() {
            match self.open_upstream_transaction(&route, Some((&to, &params))).await {
                Ok((_, Some(r))) => Ok(r),
                Ok((mail, None)) => {
                    // The upstream refused the sender: that is this recipient's answer too.
                    self.note_refusal(Category::Other, Some("upstream"));
                    info!(session = %self.info.id, client = %self.info.peer.ip(), rcpt = %to, reply = %mail, "Upstream refused the sender.");
                    return self.error_reply(&mail.with_default_enhanced((0, 0)));
                }
                Err(r) => {
                    self.note_refusal(Category::UpstreamError, Some("upstream"));
                    return self.error_reply(&r);
                }
            }
        } else {
            self.upstream_rcpt(&to, &params).await
        };
        let reply = match upstream_reply.and_then(|r| {
            if r.code == 421 {
                Err(self.upstream_closed(&r))
            } else {
                Ok(r)
            }
        }) {
            Ok(r) => r,
            Err(r) => {
                if let Some(tx) = self.tx.as_mut() {
                    tx.failed = Some(r.clone());
                }
                self.note_refusal(Category::UpstreamError, Some("upstream"));
                return self.error_reply(&r);
            }
        };
        if !reply.is_positive() {
            if reply.is_permanent() {
                self.note_refusal(Category::UnknownUser, Some("upstream"));
            }
            info!(session = %self.info.id, client = %self.info.peer.ip(), rcpt = %to, reply = %reply, "Upstream refused recipient.");
            return self.error_reply(&reply.with_default_enhanced((0, 0)));
        }

        let decision = self
            .snap
            .pipeline
            .run(&self.context(Stage::RcptAccepted, Some(&to), None, &rcpt_exempt))
            .await;
        if let Some(refusal) = refusal_of(&decision.action) {
            let refusal = refusal.clone();
            self.note_refusal(refusal.category, decision.check);
            if let Some(tx) = self.tx.as_mut() {
                tx.upstream_dirty = true;
            }
            return self.error_reply(&refusal.reply);
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.rcpts.push(to);
            self.rcpts_total += 1;
            tx.rcpt_params.push(params);
        }
        self.reply(&reply.with_default_enhanced((1, 5)));
        Ok(())
    }

    /// Sends RCPT for `to` on the open upstream transaction. `Err` is the 4xx for the client
    /// when the upstream failed.
    async fn upstream_rcpt(&mut self, to: &Address, params: &[Param]) -> Result<Reply, Reply> {
        let Some(conn) = self.upstream.as_mut() else {
            return Err(Reply::build(
                451,
                "4.4.1",
                "Upstream unavailable, try again later",
            ));
        };
        let line = rcpt_line(to, params, &conn.caps);
        match conn.command(line.as_bytes(), "RCPT").await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.upstream_failure(&e)),
        }
    }

    fn note_refusal(&mut self, category: Category, check: Option<&'static str>) {
        self.failure(category.as_str());
        if let Some(tx) = self.tx.as_mut() {
            // A relay attempt or trap says more about the client than an unknown user.
            let keep = tx.refusal.is_some_and(|(c, _)| c == Category::Trap);
            if !keep {
                tx.refusal = Some((category, check));
            }
        }
    }

    async fn handle_data(&mut self) -> Result<(), Stop> {
        let Some(tx) = self.tx.as_ref() else {
            return self.error_reply(&Reply::build(503, "5.5.1", "Need MAIL command"));
        };
        if let Some(r) = tx.failed.clone() {
            return self.error_reply(&r);
        }
        if tx.rcpts.is_empty() {
            return self.error_reply(&Reply::build(554, "5.5.1", "No valid recipients"));
        }
        let expected = tx
            .declared_size
            .unwrap_or(0)
            .min(self.snap.config.smtp.max_message_size) as usize;
        // DATA goes upstream now, so its 354 travels while the client sends the message:
        // one round trip less per message. Only on a clean upstream envelope; otherwise
        // relay_message rebuilds it first. If the message is then refused, the upstream
        // connection is inside DATA and is dropped (SMTP cannot cancel DATA).
        let clean = !tx.upstream_dirty;
        if clean
            && let Some(conn) = self.upstream.as_mut().filter(|c| !c.broken && c.in_transaction)
            && conn.send_data_early().await.is_err()
        {
            debug!(session = %self.info.id, "Upstream connection lost at DATA; will reconnect after the message.");
        }
        self.reply(&Reply::build(354, "2.0.0", "End data with <CR><LF>.<CR><LF>"));
        let data_started = Instant::now();
        let (message, violation) = self.read_message(expected).await?;
        if self.rbuf.is_empty() && self.rbuf.capacity() > COMMAND_READ {
            // Give back the DATA-sized buffer: the connection may now sit idle for long.
            self.rbuf = BytesMut::new();
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.log.size = message.len() as u64;
            let (id, subject) = message_id_and_subject(&message, self.snap.config.events.log_subject);
            tx.log.message_id = id;
            tx.log.subject = subject;
        }

        if let Some(v) = violation {
            let (reply, category) = match v {
                DataViolation::TooBig => (
                    Reply::build(552, "5.3.4", "Message size exceeds fixed maximum message size"),
                    Category::Size,
                ),
                DataViolation::BareLineEnd => (
                    Reply::build(
                        550,
                        "5.6.0",
                        "Message contains bare CR or LF characters (RFC 5321 2.3.8), not accepted",
                    ),
                    Category::Other,
                ),
                DataViolation::LineTooLong => (
                    Reply::build(
                        550,
                        "5.6.0",
                        format!(
                            "Message has a line longer than {} bytes (RFC 5321 4.5.3.1.6), not accepted",
                            self.snap.config.smtp.max_line_length
                        ),
                    ),
                    Category::Other,
                ),
            };
            self.end_transaction(Some((category, Some("smtp"))), Some(&reply));
            return self.error_reply(&reply);
        }

        // One parse of the message for every check that reads its structure.
        let view = SharedMessage::new(&message);
        let decision = self
            .snap
            .pipeline
            .run(&self.context(Stage::Data, None, Some(&view), self.tx_exempt()))
            .await;
        // The parse can be several times the message's size: not kept while relaying.
        drop(view);
        if let Some(tx) = self.tx.as_mut() {
            tx.log.score += decision.score;
        }
        if let Some(refusal) = refusal_of(&decision.action) {
            let refusal = refusal.clone();
            self.end_transaction(Some((refusal.category, decision.check)), Some(&refusal.reply));
            return self.error_reply(&refusal.reply);
        }
        // The message's score: every stage's score:N verdicts added up.
        let score = self.tx.as_ref().map_or(0.0, |t| t.log.score);
        let policy = &self.snap.config.policy;
        if policy.message_score_limit > 0.0 && score >= policy.message_score_limit {
            let reply = Reply::build(
                550,
                "5.7.1",
                format!(
                    "Message refused: spam score {score:.1} reaches {:.1}",
                    policy.message_score_limit
                ),
            );
            self.end_transaction(Some((Category::Other, Some("score"))), Some(&reply));
            return self.error_reply(&reply);
        }

        let mut wire = Vec::with_capacity(message.len() + 512);
        if self.snap.config.smtp.received_header {
            wire.extend_from_slice(self.received_header().as_bytes());
        }
        // Headers the checks asked for (Received-SPF, Authentication-Results); they start
        // with a header name, so dot-stuffing cannot apply to them.
        if let Ok(headers) = self.facts.headers.lock() {
            for h in headers.iter() {
                wire.extend_from_slice(h.as_bytes());
            }
        }
        if self.snap.config.policy.score_header && score > 0.0 {
            wire.extend_from_slice(format!("X-Thassp-Score: {score:.1}\r\n").as_bytes());
        }
        codec::stuff_into(&message, &mut wire);
        drop(message);

        let relay_started = Instant::now();
        self.live.entry.set_stage(LiveStage::Relay);
        if let Some(tx) = self.tx.as_mut() {
            tx.log.data_ms = ms_since(data_started);
        }
        let reply = self.relay_message(&wire).await;
        let c = &self.snap.counters;
        Counters::bump(&c.upstream_messages);
        c.upstream_micros.fetch_add(
            u64::try_from(relay_started.elapsed().as_micros()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some(tx) = self.tx.as_mut() {
            tx.log.upstream_ms = ms_since(relay_started);
            tx.log.upstream_reply = Some(reply.summary());
        }
        let (from, rcpts) = self
            .tx
            .as_ref()
            .map(|t| {
                (
                    t.from.to_string(),
                    t.rcpts
                        .iter()
                        .map(Address::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                )
            })
            .unwrap_or_default();
        let category = if reply.is_positive() {
            self.summary.delivered += 1;
            Category::Delivered
        } else if reply.is_transient() && reply.enhanced.is_some_and(|e| e.1 == 4) {
            Category::UpstreamError
        } else {
            Category::Other
        };
        info!(session = %self.info.id, client = %self.info.peer.ip(), from = %from, rcpts = %rcpts, size = wire.len(), outcome = %category, reply = %reply, "Message relayed.");
        self.end_transaction(
            Some((category, (category != Category::Delivered).then_some("upstream"))),
            Some(&reply),
        );
        if reply.is_positive() {
            self.reply(&reply);
            return Ok(());
        }
        self.error_reply(&reply)
    }

    /// Reads the message up to `<CRLF>.<CRLF>` within the DATA timeouts.
    async fn read_message(&mut self, expected: usize) -> Result<(Vec<u8>, Option<DataViolation>), Stop> {
        let smtp = &self.snap.config.smtp;
        let bare = match smtp.bare_line_end {
            BareLineEndPolicy::Reject => BareLineEnd::Reject,
            BareLineEndPolicy::Normalize => BareLineEnd::Normalize,
        };
        let mut reader = DataReader::new(smtp.max_message_size as usize, smtp.max_line_length, bare);
        let mut message = Vec::with_capacity(expected.clamp(4096, 1 << 20));
        let (block, total) = (smtp.data_timeout, smtp.data_total_timeout);
        let deadline = Instant::now() + total;
        loop {
            if !self.rbuf.is_empty() {
                if let Some(n) = reader.feed(&self.rbuf, &mut message) {
                    self.rbuf.advance(n);
                    return Ok((message, reader.violation()));
                }
                self.rbuf.clear();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Stop::Timeout);
            }
            self.fill_reserving(block.min(left), false, DATA_READ).await?;
        }
    }

    /// Sends the message upstream: rebuilds the upstream envelope when it differs from what
    /// the client was told (or the connection died while the client was sending), then DATA,
    /// the message, and the final reply. Any failure is a 4xx: never a false 250.
    async fn relay_message(&mut self, wire: &[u8]) -> Reply {
        let mut replayed = false;
        loop {
            let needs_replay = self.tx.as_ref().is_some_and(|t| t.upstream_dirty)
                || self.upstream.as_ref().is_none_or(|c| c.broken);
            if needs_replay {
                if replayed {
                    return Reply::build(451, "4.4.1", "Upstream mail server unavailable, try again later");
                }
                replayed = true;
                // Rare, and as big as opening a connection: boxed (see open_upstream_transaction).
                if let Err(r) = Box::pin(self.replay_envelope()).await {
                    return r;
                }
            }
            let Some(conn) = self.upstream.as_mut() else {
                return Reply::build(451, "4.4.1", "Upstream mail server unavailable, try again later");
            };
            match conn.data().await {
                Ok(r) if r.code == 354 => {}
                Ok(r) if r.code == 421 => return self.upstream_closed(&r),
                Ok(r) if r.is_positive() => {
                    conn.broken = true;
                    warn!(session = %self.info.id, reply = %r, "Upstream answered DATA without 354.");
                    return Reply::build(451, "4.4.1", "Upstream mail server error, try again later");
                }
                Ok(r) => return r.with_default_enhanced((0, 0)),
                // The connection may have timed out while the client was sending: one retry
                // on a fresh connection with the same envelope.
                Err(RelayError::Closed { .. } | RelayError::Io { .. }) if !replayed => {
                    debug!(session = %self.info.id, "Upstream connection lost before DATA; reconnecting.");
                    continue;
                }
                Err(e) => return self.upstream_failure(&e),
            }
            return match conn.send_message(wire).await {
                Ok(r) if r.code == 421 => self.upstream_closed(&r),
                Ok(r) => {
                    conn.in_transaction = false;
                    r.with_default_enhanced((0, 0))
                }
                Err(e) => {
                    // Promise 1: the upstream did not confirm, so the client must retry.
                    self.upstream_failure(&e)
                }
            };
        }
    }

    /// Starts the upstream transaction again with exactly the recipients the client was
    /// told 250 for.
    async fn replay_envelope(&mut self) -> Result<(), Reply> {
        let Some(route) = self.tx.as_ref().and_then(|t| t.route.clone()) else {
            return Err(Reply::build(
                451,
                "4.4.1",
                "Upstream mail server unavailable, try again later",
            ));
        };
        let (reply, _) = self.open_upstream_transaction(&route, None).await?;
        if !reply.is_positive() {
            warn!(session = %self.info.id, reply = %reply, "Upstream refused MAIL on replay.");
            return Err(Reply::build(
                451,
                "4.4.1",
                "Upstream mail server refused the sender on retry, try again later",
            ));
        }
        let rcpts = self
            .tx
            .as_ref()
            .map(|t| (t.rcpts.clone(), t.rcpt_params.clone()))
            .unwrap_or_default();
        for (to, params) in rcpts.0.iter().zip(&rcpts.1) {
            let r = self.upstream_rcpt(to, params).await?;
            if !r.is_positive() {
                warn!(session = %self.info.id, rcpt = %to, reply = %r, "Upstream refused a recipient on replay.");
                return Err(Reply::build(
                    451,
                    "4.4.1",
                    "Upstream mail server changed its answer for a recipient, try again later",
                ));
            }
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.upstream_dirty = false;
        }
        Ok(())
    }

    fn received_header(&self) -> String {
        use std::fmt::Write as _;
        // Built with pushes into one buffer: with `format!` per piece it cost as much as
        // parsing the command lines of a whole transaction. Writing to a String cannot fail.
        let mut h = String::with_capacity(256);
        h.push_str("Received: from ");
        for c in self.info.helo.as_deref().unwrap_or("unknown").chars() {
            h.push(if c.is_control() || c == '(' || c == ')' {
                '?'
            } else {
                c
            });
        }
        // Only a forward-confirmed PTR name is written; anything else is "unknown" (as
        // Postfix does), and no lookup is made here just for the header.
        h.push_str(" (");
        h.push_str(match self.facts.ptr.get() {
            Some(crate::policy::Ptr::Confirmed(name)) => name.as_str(),
            _ => "unknown",
        });
        let _ = match self.info.peer.ip() {
            std::net::IpAddr::V4(v4) => write!(h, " [{v4}])"),
            std::net::IpAddr::V6(v6) => write!(h, " [IPv6:{v6}])"),
        };
        if let Some((version, cipher)) = &self.info.tls {
            let _ = write!(h, "\r\n\t(using {version} with cipher {cipher})");
        }
        h.push_str("\r\n\tby ");
        h.push_str(&self.info.hostname);
        h.push_str(" (thassp) with ");
        let tx = self.tx.as_ref();
        // RFC 3848 / RFC 6531 "with" keywords.
        let base = match (tx.is_some_and(|t| t.smtputf8), self.info.esmtp) {
            (true, _) => "UTF8SMTP",
            (false, true) => "ESMTP",
            (false, false) => "SMTP",
        };
        h.push_str(base);
        if base != "SMTP" {
            if self.info.tls.is_some() {
                h.push('S');
            }
            if self.info.authenticated.is_some() {
                h.push('A');
            }
        }
        h.push_str(" id ");
        h.push_str(&self.info.id);
        let _ = write!(h, ".{}", self.summary.transactions);
        if let Some([only]) = tx.map(|t| t.rcpts.as_slice()) {
            h.push_str("\r\n\tfor <");
            h.push_str(&only.raw);
            h.push('>');
        }
        h.push_str(";\r\n\t");
        h.push_str(&chrono::Local::now().to_rfc2822());
        h.push_str("\r\n");
        h
    }

    /// Client RSET/EHLO: forget the transaction; the upstream gets RSET lazily before the
    /// next MAIL, which saves a round trip when the client quits instead. The transaction
    /// is logged with the refusal it met (e.g. greylisted) or as aborted.
    fn abort_transaction(&mut self) {
        if self.tx.is_some() {
            self.end_transaction(None, None);
        }
    }

    /// Ends the transaction: its outcome (the most telling refusal it met, unless it was
    /// delivered), the session's summary, and one row for the event log.
    fn end_transaction(&mut self, outcome: Option<(Category, Option<&'static str>)>, reply: Option<&Reply>) {
        let Some(tx) = self.tx.take() else { return };
        if self.upstream.as_ref().is_some_and(|c| c.inside_data()) {
            // DATA went upstream early and its message will not follow: closing is the only
            // way out, and the MTA discards the open transaction.
            self.upstream = None;
        }
        let (category, check) = match outcome {
            Some((Category::Delivered, check)) => (Category::Delivered, check),
            Some(o) => tx.refusal.unwrap_or(o),
            None => tx.refusal.unwrap_or((Category::Aborted, None)),
        };
        // Delivered wins for the session; otherwise the latest outcome.
        if self.summary.outcome != Category::Delivered || category == Category::Delivered {
            self.summary.outcome = category;
            self.summary.check = check;
        }
        self.summary.transactions += 1;
        self.tx_seq += 1;
        self.summary.last_sender = Some(tx.from.raw.clone());
        self.summary.last_recipients = tx.log.recipients.iter().map(|r| r.address.clone()).collect();
        let results = self.facts.results.lock().map(|r| r.clone()).unwrap_or_default();
        let log = tx.log;
        let queue_id = log.upstream_reply.as_deref().and_then(queue_id);
        let ms = |d: u32| d;
        self.snap.events.log_transaction(TransactionEvent {
            session_id: self.info.id.clone(),
            seq: self.tx_seq,
            time: chrono::Utc::now(),
            client_ip: self.info.peer.ip(),
            sender: tx.from.raw.clone(),
            recipients: log.recipients,
            size: log.size,
            message_id: log.message_id,
            subject: log.subject,
            outcome: category,
            check: check.map(str::to_string),
            reply: reply.map(Reply::summary).or(log.reply),
            upstream_reply: log.upstream_reply,
            queue_id,
            spf: results.spf,
            dkim: results.dkim,
            dmarc: results.dmarc,
            score: log.score,
            timings: Timings {
                total_ms: log.started.map_or(0, ms_since),
                mail_ms: ms(log.mail_ms),
                rcpt_ms: log.rcpt_ms,
                data_ms: log.data_ms,
                upstream_ms: log.upstream_ms,
            },
        });
    }
}

/// The queue id in an upstream's final reply (`250 2.0.0 Ok: queued as 4XyZ1`).
fn queue_id(reply: &str) -> Option<String> {
    let rest = &reply[reply.find("queued as ")? + 10..];
    let id: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    (!id.is_empty()).then_some(id)
}

/// Message-ID and (when logged) the decoded Subject, from the header section only.
fn message_id_and_subject(message: &[u8], with_subject: bool) -> (Option<String>, Option<String>) {
    // Only these two fields are parsed, every other header is skipped: parsing them all
    // (addresses, dates, Received lines) cost more than the rest of the event row.
    static PARSER: std::sync::LazyLock<mail_parser::MessageParser> = std::sync::LazyLock::new(|| {
        mail_parser::MessageParser::new()
            .header_id(mail_parser::HeaderName::MessageId)
            .header_text(mail_parser::HeaderName::Subject)
            .default_header_ignore()
    });
    let end = memchr::memmem::find(message, b"\r\n\r\n").map_or(message.len(), |p| p + 4);
    let Some(parsed) = PARSER.parse_headers(&message[..end.min(64 * 1024)]) else {
        return (None, None);
    };
    let clip = |s: &str| {
        if s.len() <= 998 && s.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return s.to_owned();
        }
        s.chars()
            .filter(|c| !c.is_control())
            .take(998)
            .collect::<String>()
    };
    let id = parsed.message_id().map(clip);
    let subject = if with_subject {
        parsed.subject().map(clip)
    } else {
        None
    };
    (id, subject)
}

fn refusal_of(action: &Action) -> Option<&Refusal> {
    match action {
        Action::TempFail(r) | Action::Reject(r) => Some(r),
        Action::Continue | Action::Accept => None,
    }
}

fn syntax_reply(e: &CommandError) -> Reply {
    match e {
        CommandError::BadCharacters => Reply::build(500, "5.5.2", "Invalid characters in command"),
        CommandError::Syntax(verb) if *verb == "MAIL" => {
            Reply::build(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        }
        CommandError::Syntax(_) => Reply::build(501, "5.5.4", "Syntax: RCPT TO:<address>"),
        CommandError::MissingArgument { verb } => {
            Reply::build(501, "5.5.4", format!("Syntax: {verb} needs an argument"))
        }
        CommandError::UnexpectedArgument { verb } => {
            Reply::build(501, "5.5.4", format!("Syntax: {verb} takes no argument"))
        }
        CommandError::Address { verb, error } => {
            let enhanced = if *verb == "MAIL" { "5.1.7" } else { "5.1.3" };
            Reply::build(501, enhanced, format!("Bad address syntax: {error}"))
        }
        CommandError::Parameter(p) => Reply::build(501, "5.5.4", format!("Bad parameter syntax: {p}")),
        CommandError::TooLong => Reply::build(500, "5.5.2", "Line too long"),
    }
}

/// The user name in a SASL response: PLAIN's authcid (initial response or first answer),
/// LOGIN's first answer. Anything else is not decoded.
fn sasl_user(mechanism: &str, response: &str, round: u32) -> Option<String> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(response.trim())
        .ok()?;
    let user = match (mechanism, round) {
        ("PLAIN", 0 | 1) => decoded.split(|&b| b == 0).nth(1)?.to_vec(),
        ("LOGIN", 0 | 1) => decoded,
        _ => return None,
    };
    let user: String = String::from_utf8_lossy(&user)
        .chars()
        .filter(|c| !c.is_control())
        .take(128)
        .collect();
    (!user.is_empty()).then_some(user)
}

fn valid_notify(v: &str) -> bool {
    let words: Vec<String> = v.split(',').map(str::to_ascii_uppercase).collect();
    if words.iter().any(|w| w == "NEVER") {
        return words.len() == 1;
    }
    words
        .iter()
        .all(|w| matches!(w.as_str(), "SUCCESS" | "FAILURE" | "DELAY"))
}

/// The MAIL command for the upstream, with the parameters it supports. SMTPUTF8 and
/// 8BITMIME cannot be dropped without changing the message, so their absence upstream is a
/// temporary failure.
fn mail_line(tx: &Transaction, caps: &Capabilities) -> Result<String, Reply> {
    let mut line = format!("MAIL FROM:<{}>", tx.from.raw);
    for p in &tx.params {
        let keep = match p.key.as_str() {
            "SIZE" => caps.size.is_some(),
            "BODY" => {
                let eight = p
                    .value
                    .as_deref()
                    .is_some_and(|v| v.eq_ignore_ascii_case("8BITMIME"));
                if eight && !caps.eight_bit_mime {
                    return Err(Reply::build(
                        451,
                        "4.3.0",
                        "Upstream does not accept 8BITMIME right now, try again later",
                    ));
                }
                caps.eight_bit_mime
            }
            "SMTPUTF8" => {
                if !caps.smtputf8 {
                    return Err(Reply::build(
                        451,
                        "4.3.0",
                        "Upstream does not accept SMTPUTF8 right now, try again later",
                    ));
                }
                true
            }
            // RFC 3461 §4.1: DSN parameters are dropped towards a server without DSN.
            "RET" | "ENVID" => caps.dsn,
            _ => false,
        };
        if keep {
            line.push(' ');
            line.push_str(&p.to_string());
        }
    }
    line.push_str("\r\n");
    Ok(line)
}

fn rcpt_line(to: &Address, params: &[Param], caps: &Capabilities) -> String {
    let mut line = format!("RCPT TO:<{}>", to.raw);
    for p in params.iter().filter(|_| caps.dsn) {
        line.push(' ');
        line.push_str(&p.to_string());
    }
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::message_id_and_subject;

    /// The event log's Message-ID and Subject come from a parser that skips every other field;
    /// they must be what a full parse of the header section gives.
    #[test]
    fn message_id_and_subject_as_a_full_parse_gives_them() {
        let full = |m: &[u8]| {
            let p = mail_parser::MessageParser::new()
                .parse_headers(m)
                .expect("headers");
            let clip = |s: &str| {
                s.chars()
                    .filter(|c| !c.is_control())
                    .take(998)
                    .collect::<String>()
            };
            (p.message_id().map(clip), p.subject().map(clip))
        };
        let long = format!("Subject: {}\r\n\r\n", "x".repeat(1500));
        let messages: [&[u8]; 7] = [
            b"Received: from a (b [192.0.2.1]) by c; Sat, 5 Dec 2026 04:00:00 +0000\r\n\
              From: \"A, B\" <a@example.net>\r\nDate: Sat, 5 Dec 2026 04:00:00 +0000\r\n\
              Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus\r\n Berlin\r\n\
              Message-ID: <1.2@example.net>\r\n\r\nbody\r\n",
            b"message-id:   <x@y>  (comment)\r\nsubject: tab\there and \x7f del\r\n\r\n",
            b"Subject: first\r\nSubject: second\r\n\r\n",
            b"Subject: no body and no empty line",
            b"X-Other: 1\r\n\r\nSubject: in the body\r\n",
            b"Subject: =?iso-8859-1?b?U2No9m4=?=\r\nMessage-Id: not-in-brackets@host\r\n\r\n",
            long.as_bytes(),
        ];
        for m in messages {
            let end = memchr::memmem::find(m, b"\r\n\r\n").map_or(m.len(), |p| p + 4);
            assert_eq!(
                message_id_and_subject(m, true),
                full(&m[..end]),
                "{}",
                String::from_utf8_lossy(m)
            );
            assert_eq!(message_id_and_subject(m, false).1, None);
        }
        assert_eq!(
            message_id_and_subject(messages[0], true),
            (Some("1.2@example.net".into()), Some("Grüße aus Berlin".into()))
        );
    }
}
