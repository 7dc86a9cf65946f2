//! The policy seam: stages of a session, the verdicts checks return, the `Check` trait and
//! the `Pipeline` that runs a stage's checks in order and turns verdicts into one decision.
//! Checks only look at the `Context`; they never write to the client or the upstream.

pub mod attachments;
pub mod content;
pub mod dkim;
pub mod dnsbl;
pub mod greylist;
pub mod helo;
pub mod lists;
pub mod ptr;
pub mod relay_control;
pub mod reputation;
pub mod spf;
pub mod traps;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use content::{MessageView, SharedMessage};

use crate::smtp::address::Address;
use crate::smtp::codec::Reply;

/// Where in the session a check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Right after accept, before the banner.
    Connect,
    /// HELO/EHLO received.
    Helo,
    /// MAIL FROM received.
    Mail,
    /// RCPT TO received, before the upstream is asked about the recipient.
    Rcpt,
    /// The upstream accepted the recipient (greylisting runs here, so an unknown user is
    /// refused as such and never greylisted).
    RcptAccepted,
    /// The whole message has been read.
    Data,
}

/// The outcome vocabulary: every attempt ends in exactly one of these (DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    Trap,
    HeloInvalid,
    Tarpit,
    Autoblacklist,
    UnknownUser,
    Greylisted,
    Aborted,
    RelayAttempt,
    SpfFail,
    Dnsbl,
    Blacklist,
    Ptr,
    Pregreet,
    Content,
    Attachment,
    Size,
    RateLimit,
    UpstreamError,
    Other,
    Delivered,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::HeloInvalid => "helo_invalid",
            Self::Tarpit => "tarpit",
            Self::Autoblacklist => "autoblacklist",
            Self::UnknownUser => "unknown_user",
            Self::Greylisted => "greylisted",
            Self::Aborted => "aborted",
            Self::RelayAttempt => "relay_attempt",
            Self::SpfFail => "spf_fail",
            Self::Dnsbl => "dnsbl",
            Self::Blacklist => "blacklist",
            Self::Ptr => "ptr",
            Self::Pregreet => "pregreet",
            Self::Content => "content",
            Self::Attachment => "attachment",
            Self::Size => "size",
            Self::RateLimit => "rate_limit",
            Self::UpstreamError => "upstream_error",
            Self::Other => "other",
            Self::Delivered => "delivered",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the reply for the client and the category it counts under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    pub category: Category,
}

/// What one check says.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not applicable here.
    Skip,
    Pass,
    /// Adds to the score; `refusal` is what a too-high total is refused with.
    Score {
        points: f32,
        refusal: Refusal,
    },
    /// Whitelisted: stop checking for the session or the transaction.
    Accept,
    /// Whitelisted for the named checks only (e.g. `greylist`), for the session or the
    /// transaction.
    Exempt(Arc<[String]>),
    /// The check would have refused (action `monitor`): logged and counted, nothing done.
    Monitor(Refusal),
    TempFail(Refusal),
    Reject(Refusal),
}

/// What a check does when its condition holds: `reject`, `tempfail`, `score:N` or
/// `monitor` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CheckAction {
    Reject,
    TempFail,
    Score(f32),
    Monitor,
}

impl CheckAction {
    /// The verdict for a refusal under this action. `refusal` is written as the permanent
    /// (5xx) form; `tempfail` turns it into its 4xx twin.
    pub fn verdict(self, refusal: Refusal) -> Verdict {
        match self {
            Self::Reject => Verdict::Reject(refusal),
            Self::TempFail => Verdict::TempFail(refusal.temporary()),
            Self::Score(points) => Verdict::Score { points, refusal },
            Self::Monitor => Verdict::Monitor(refusal),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "reject" => Ok(Self::Reject),
            "tempfail" => Ok(Self::TempFail),
            "monitor" => Ok(Self::Monitor),
            t => match t.strip_prefix("score:").map(|n| n.trim().parse::<f32>()) {
                Some(Ok(n)) if n.is_finite() => Ok(Self::Score(n)),
                _ => Err(format!(
                    "{t:?} is not an action (reject, tempfail, monitor or score:N)"
                )),
            },
        }
    }
}

impl fmt::Display for CheckAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reject => f.write_str("reject"),
            Self::TempFail => f.write_str("tempfail"),
            Self::Monitor => f.write_str("monitor"),
            Self::Score(n) => write!(f, "score:{n}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for CheckAction {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for CheckAction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl Refusal {
    /// The 4xx twin of a 5xx refusal (`550 5.7.1` → `450 4.7.1`, `554` → `451`).
    pub fn temporary(mut self) -> Self {
        if self.reply.code >= 500 {
            self.reply.code = match self.reply.code {
                550 | 551 | 553 => 450,
                552 => 452,
                // 554 and the syntax codes (501, 504, …) have no meaningful 4xx twin.
                _ => 451,
            };
            if let Some(e) = self.reply.enhanced.as_mut() {
                e.0 = 4;
            }
        }
        self
    }
}

/// Reverse DNS of the client, looked up once per session (see `dns.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ptr {
    /// No PTR record (NXDOMAIN or no data).
    None,
    /// A PTR name whose A/AAAA records do not include the client's address.
    Unconfirmed(String),
    /// Forward-confirmed reverse DNS (FCrDNS): the name resolves back to the client.
    Confirmed(String),
    /// The lookup failed (timeout, SERVFAIL); checks treat this as "cannot decide".
    Error(String),
}

impl Ptr {
    /// The name, confirmed or not.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Unconfirmed(n) | Self::Confirmed(n) => Some(n),
            Self::None | Self::Error(_) => None,
        }
    }
}

/// Facts about the connection that several checks (and the Received header) need,
/// computed once on first use and shared.
#[derive(Debug, Default)]
pub struct SessionFacts {
    pub ptr: tokio::sync::OnceCell<Ptr>,
    /// Headers checks want added to the relayed message of the current transaction
    /// (`Received-SPF:`, `Authentication-Results:`), complete with CRLF line ends. The
    /// session clears it at each MAIL.
    pub headers: std::sync::Mutex<Vec<String>>,
    /// Authentication results of the current transaction, for the event log.
    pub results: std::sync::Mutex<AuthResults>,
}

/// SPF/DKIM/DMARC results of a transaction (`pass`, `fail`, …; empty when not evaluated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthResults {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
}

impl SessionFacts {
    /// Queues a header (one or more CRLF-terminated lines) for the relayed message.
    pub fn add_header(&self, header: String) {
        if let Ok(mut h) = self.headers.lock() {
            h.push(header);
        }
    }
}

/// Checks a whitelist exempted the session or transaction from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exemptions {
    /// Exempt from every check.
    pub all: bool,
    pub checks: Vec<String>,
}

impl Exemptions {
    pub fn covers(&self, check: &str) -> bool {
        self.all || self.checks.iter().any(|c| c == check)
    }

    pub fn add(&mut self, other: &Self) {
        self.all |= other.all;
        for c in &other.checks {
            if !self.checks.contains(c) {
                self.checks.push(c.clone());
            }
        }
    }
}

/// A check could not decide (DNS timeout, store error); the pipeline's `on_error` decides.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckError(pub String);

/// What the session knows about the connection, as checks see it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: String,
    /// The client's address (after PROXY protocol, when that is enabled).
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Our name on this listener.
    pub hostname: String,
    pub helo: Option<String>,
    pub esmtp: bool,
    /// The SASL user once the upstream said 235.
    pub authenticated: Option<String>,
    /// TLS version and cipher once the session is encrypted.
    pub tls: Option<(String, String)>,
    /// The load balancer's address when the peer came through PROXY protocol.
    pub proxied_by: Option<SocketAddr>,
    /// A PROXY v2 LOCAL connection: the balancer checking we are alive.
    pub health_check: bool,
}

/// Everything a check may look at for one decision.
#[derive(Debug)]
pub struct Context<'a> {
    pub stage: Stage,
    pub session: &'a SessionInfo,
    pub sender: Option<&'a Address>,
    /// The recipient being decided at `Rcpt`/`RcptAccepted`.
    pub recipient: Option<&'a Address>,
    /// Recipients accepted so far in this transaction.
    pub recipients: &'a [Address],
    /// The unstuffed message at `Data`, with the parse the checks share.
    pub message: Option<&'a dyn MessageView>,
    /// Shared per-session facts (PTR).
    pub facts: &'a SessionFacts,
    /// What whitelists exempted so far; the pipeline skips those checks.
    pub exempt: &'a Exemptions,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One anti-spam check. Implementations live in their own file under `policy/`.
pub trait Check: Send + Sync {
    /// Name for logs, metrics and the event log (`relay_control`, `dnsbl`, …).
    fn name(&self) -> &'static str;
    /// The stages this check runs at.
    fn stages(&self) -> &'static [Stage];
    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>>;
    /// True when the check waits on the network or a store (DNS, SQL, Redis). Such checks
    /// of one stage run concurrently, after the local ones.
    fn needs_io(&self) -> bool {
        false
    }
    /// False for checks no whitelist may skip (relay control: promise 2).
    fn exemptible(&self) -> bool {
        true
    }
}

/// What a failing check means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// `451 4.3.0`: the sender retries later (default: never lose mail to a DNS hiccup).
    #[default]
    TempFail,
    /// Treat as passed.
    Pass,
}

/// The pipeline's answer for one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    /// The check that decided a refusal or acceptance.
    pub check: Option<&'static str>,
    /// Sum of `Score` verdicts at this stage.
    pub score: f32,
    /// Exemptions granted at this stage (`Accept` grants all).
    pub exempt: Exemptions,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Continue,
    Accept,
    TempFail(Refusal),
    Reject(Refusal),
}

/// Upper bounds (seconds) of the check latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 9] = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Per-check statistics for the metrics endpoint: atomics only, so the hot path never
/// takes a lock.
#[derive(Debug, Default)]
pub struct CheckStat {
    pub calls: AtomicU64,
    pub refusals: AtomicU64,
    pub errors: AtomicU64,
    pub monitored: AtomicU64,
    /// Total time in nanoseconds.
    pub nanos: AtomicU64,
    /// Calls that took at most `LATENCY_BUCKETS[i]` (not cumulative).
    pub buckets: [AtomicU64; LATENCY_BUCKETS.len()],
}

impl CheckStat {
    fn observe(&self, elapsed: std::time::Duration, outcome: &Result<Verdict, CheckError>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        match outcome {
            Err(_) => self.errors.fetch_add(1, Ordering::Relaxed),
            Ok(Verdict::Reject(_) | Verdict::TempFail(_)) => self.refusals.fetch_add(1, Ordering::Relaxed),
            Ok(Verdict::Monitor(_)) => self.monitored.fetch_add(1, Ordering::Relaxed),
            Ok(_) => 0,
        };
    }
}

/// Statistics of every check by name, kept across reloads (a reload builds new checks).
#[derive(Debug, Default)]
pub struct CheckStats {
    by_name: std::sync::Mutex<std::collections::BTreeMap<&'static str, Arc<CheckStat>>>,
}

impl CheckStats {
    /// The statistics of the named check (created on first use; called at build time).
    pub fn get(&self, name: &'static str) -> Arc<CheckStat> {
        let mut map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name).or_default().clone()
    }

    /// Every check's statistics, by name.
    pub fn all(&self) -> Vec<(&'static str, Arc<CheckStat>)> {
        let map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (*k, v.clone())).collect()
    }
}

/// The configured checks, in order, and how their verdicts combine.
#[derive(Clone)]
pub struct Pipeline {
    checks: Vec<Arc<dyn Check>>,
    /// Statistics of each check, in the same order.
    stats: Vec<Arc<CheckStat>>,
    on_error: OnError,
    /// A stage whose scores add up to this is refused. `None`: scores only inform.
    score_limit: Option<f32>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field(
                "checks",
                &self.checks.iter().map(|c| c.name()).collect::<Vec<_>>(),
            )
            .field("on_error", &self.on_error)
            .field("score_limit", &self.score_limit)
            .finish()
    }
}

impl Pipeline {
    pub fn new(checks: Vec<Arc<dyn Check>>, on_error: OnError) -> Self {
        let stats = checks.iter().map(|_| Arc::new(CheckStat::default())).collect();
        Self {
            checks,
            stats,
            on_error,
            score_limit: None,
        }
    }

    /// Records each check's calls and latency in `stats` (shared across reloads).
    pub fn with_stats(mut self, stats: &CheckStats) -> Self {
        self.stats = self.checks.iter().map(|c| stats.get(c.name())).collect();
        self
    }

    pub fn with_score_limit(mut self, limit: Option<f32>) -> Self {
        self.score_limit = limit;
        self
    }

    /// Adds a check at the end (embedders and tests add their own checks this way).
    pub fn push(&mut self, check: Arc<dyn Check>) {
        self.checks.push(check);
        self.stats.push(Arc::new(CheckStat::default()));
    }

    /// Names of the configured checks, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.checks.iter().map(|c| c.name()).collect()
    }

    fn error_verdict(&self, cx: &Context<'_>, check: &dyn Check, e: &CheckError) -> Verdict {
        tracing::warn!(session = %cx.session.id, check = check.name(), error = %e, "Check could not decide.");
        match self.on_error {
            OnError::Pass => Verdict::Pass,
            OnError::TempFail => Verdict::TempFail(Refusal {
                reply: Reply::build(
                    451,
                    "4.3.0",
                    "Temporary local problem checking this request, try again later",
                ),
                category: Category::Other,
            }),
        }
    }

    /// Runs the checks of `cx.stage` that the exemptions do not cover. Local checks run
    /// first, in configured order; then the checks that need I/O run concurrently (one
    /// round of DNS lookups, not one per check) and their verdicts are taken in configured
    /// order. `Accept`, `TempFail` and `Reject` end the stage; a check error becomes a
    /// verdict through `on_error` only.
    pub async fn run(&self, cx: &Context<'_>) -> Decision {
        let applicable: Vec<(&Arc<dyn Check>, &Arc<CheckStat>)> = self
            .checks
            .iter()
            .zip(&self.stats)
            // Authenticated sessions skip the anti-spam checks (the upstream vouched for the
            // user); non-exemptible checks such as relay control still run.
            .filter(|(c, _)| {
                c.stages().contains(&cx.stage)
                    && !(c.exemptible() && (cx.exempt.covers(c.name()) || cx.session.authenticated.is_some()))
            })
            .collect();
        let mut state = Combine {
            score: 0.0,
            exempt: Exemptions::default(),
            top_score: None,
        };
        for (check, stat) in applicable.iter().filter(|(c, _)| !c.needs_io()) {
            let started = std::time::Instant::now();
            let result = check.check(cx).await;
            stat.observe(started.elapsed(), &result);
            let verdict = match result {
                Ok(v) => v,
                Err(e) => self.error_verdict(cx, check.as_ref(), &e),
            };
            if let Some(d) = state.take(cx, check.name(), verdict) {
                return d;
            }
        }
        let io: Vec<(&Arc<dyn Check>, &Arc<CheckStat>)> = applicable
            .iter()
            .copied()
            .filter(|(c, _)| c.needs_io() && !(c.exemptible() && state.exempt.covers(c.name())))
            .collect();
        if !io.is_empty() {
            let timed = io.iter().map(|(c, stat)| async move {
                let started = std::time::Instant::now();
                let result = c.check(cx).await;
                stat.observe(started.elapsed(), &result);
                result
            });
            let results = futures_util::future::join_all(timed).await;
            for ((check, _), result) in io.iter().zip(results) {
                let verdict = match result {
                    Ok(v) => v,
                    Err(e) => self.error_verdict(cx, check.as_ref(), &e),
                };
                if let Some(d) = state.take(cx, check.name(), verdict) {
                    return d;
                }
            }
        }
        if let (Some(limit), Some((name, refusal, _))) = (self.score_limit, state.top_score.as_ref())
            && state.score >= limit
        {
            let mut refusal = refusal.clone();
            refusal.reply.lines = vec![format!(
                "{} (score {:.1} of {limit:.1})",
                refusal.reply.lines.join(" "),
                state.score
            )];
            return Decision {
                action: Action::Reject(refusal),
                check: Some(name),
                score: state.score,
                exempt: state.exempt,
            };
        }
        Decision {
            action: Action::Continue,
            check: None,
            score: state.score,
            exempt: state.exempt,
        }
    }
}

struct Combine {
    score: f32,
    exempt: Exemptions,
    /// The check that added the most, whose refusal explains a too-high total.
    top_score: Option<(&'static str, Refusal, f32)>,
}

impl Combine {
    fn take(&mut self, cx: &Context<'_>, name: &'static str, verdict: Verdict) -> Option<Decision> {
        let decision = |this: &Self, action| Decision {
            action,
            check: Some(name),
            score: this.score,
            exempt: this.exempt.clone(),
        };
        match verdict {
            Verdict::Skip | Verdict::Pass => None,
            Verdict::Score { points, refusal } => {
                self.score += points;
                if self.top_score.as_ref().is_none_or(|(_, _, p)| points > *p) {
                    self.top_score = Some((name, refusal, points));
                }
                None
            }
            Verdict::Monitor(refusal) => {
                tracing::info!(session = %cx.session.id, check = name, reply = %refusal.reply, category = %refusal.category, "Monitor: the check would have refused.");
                None
            }
            Verdict::Exempt(checks) => {
                self.exempt.add(&Exemptions {
                    all: false,
                    checks: checks.to_vec(),
                });
                None
            }
            Verdict::Accept => {
                self.exempt.all = true;
                Some(decision(self, Action::Accept))
            }
            Verdict::TempFail(r) => Some(decision(self, Action::TempFail(r))),
            Verdict::Reject(r) => Some(decision(self, Action::Reject(r))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        name: &'static str,
        verdict: Result<Verdict, ()>,
        io: bool,
    }

    fn fixed(name: &'static str, verdict: Result<Verdict, ()>) -> Arc<dyn Check> {
        Arc::new(Fixed {
            name,
            verdict,
            io: false,
        })
    }

    fn io(name: &'static str, verdict: Result<Verdict, ()>) -> Arc<dyn Check> {
        Arc::new(Fixed {
            name,
            verdict,
            io: true,
        })
    }

    impl Check for Fixed {
        fn name(&self) -> &'static str {
            self.name
        }
        fn stages(&self) -> &'static [Stage] {
            &[Stage::Mail]
        }
        fn check<'a>(&'a self, _: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
            let v = self.verdict.clone().map_err(|_| CheckError("dns timeout".into()));
            Box::pin(async move { v })
        }
        fn needs_io(&self) -> bool {
            self.io
        }
    }

    fn info() -> SessionInfo {
        SessionInfo {
            id: "t".into(),
            peer: "192.0.2.1:1234".parse().unwrap(),
            local: "127.0.0.1:25".parse().unwrap(),
            hostname: "mx.example".into(),
            helo: None,
            esmtp: true,
            authenticated: None,
            tls: None,
            proxied_by: None,
            health_check: false,
        }
    }

    async fn run_with(pipeline: Pipeline, stage: Stage, exempt: &Exemptions) -> Decision {
        let info = info();
        let facts = SessionFacts::default();
        let cx = Context {
            stage,
            session: &info,
            sender: None,
            recipient: None,
            recipients: &[],
            message: None,
            facts: &facts,
            exempt,
        };
        pipeline.run(&cx).await
    }

    async fn run(checks: Vec<Arc<dyn Check>>, on_error: OnError, stage: Stage) -> Decision {
        run_with(Pipeline::new(checks, on_error), stage, &Exemptions::default()).await
    }

    fn refusal(category: Category) -> Refusal {
        Refusal {
            reply: Reply::build(550, "5.7.1", "no"),
            category,
        }
    }

    #[tokio::test]
    async fn order_scores_and_errors() {
        let reject = refusal(Category::Blacklist);
        let d = run(
            vec![
                fixed(
                    "a",
                    Ok(Verdict::Score {
                        points: 1.5,
                        refusal: refusal(Category::Dnsbl),
                    }),
                ),
                fixed("b", Ok(Verdict::Reject(reject.clone()))),
                fixed("c", Ok(Verdict::Accept)),
            ],
            OnError::TempFail,
            Stage::Mail,
        )
        .await;
        assert_eq!(d.action, Action::Reject(reject));
        assert_eq!((d.check, d.score), (Some("b"), 1.5));

        let d = run(vec![fixed("e", Err(()))], OnError::TempFail, Stage::Mail).await;
        assert!(matches!(d.action, Action::TempFail(ref r) if r.reply.code == 451));
        let d = run(vec![fixed("e", Err(()))], OnError::Pass, Stage::Mail).await;
        assert_eq!(d.action, Action::Continue);
        // A check is not asked at stages it did not register for.
        let d = run(vec![fixed("e", Err(()))], OnError::TempFail, Stage::Rcpt).await;
        assert_eq!(d.action, Action::Continue);
    }

    #[tokio::test]
    async fn local_checks_decide_before_io_and_io_combines_in_order() {
        let first = refusal(Category::Dnsbl);
        let second = refusal(Category::Ptr);
        // The local accept wins although the I/O check is configured first.
        let d = run(
            vec![
                io("dnsbl", Ok(Verdict::Reject(first.clone()))),
                fixed("lists", Ok(Verdict::Accept)),
            ],
            OnError::TempFail,
            Stage::Mail,
        )
        .await;
        assert_eq!((d.action, d.check), (Action::Accept, Some("lists")));
        assert!(d.exempt.all);
        let d = run(
            vec![
                io("dnsbl", Ok(Verdict::Reject(first.clone()))),
                io("ptr", Ok(Verdict::Reject(second))),
            ],
            OnError::TempFail,
            Stage::Mail,
        )
        .await;
        assert_eq!((d.action, d.check), (Action::Reject(first), Some("dnsbl")));
    }

    #[tokio::test]
    async fn exemptions_monitor_and_score_limit() {
        let grey = refusal(Category::Greylisted);
        let exempt: Arc<[String]> = Arc::from(vec!["greylist".to_string()]);
        let d = run(
            vec![
                fixed("lists", Ok(Verdict::Exempt(exempt))),
                fixed("greylist", Ok(Verdict::Reject(grey.clone()))),
            ],
            OnError::TempFail,
            Stage::Mail,
        )
        .await;
        // The exemption is returned; a check exempted earlier in the session is skipped.
        assert_eq!(d.exempt.checks, vec!["greylist"]);
        let covered = Exemptions {
            all: false,
            checks: vec!["greylist".into()],
        };
        let p = Pipeline::new(
            vec![fixed("greylist", Ok(Verdict::Reject(grey.clone())))],
            OnError::TempFail,
        );
        assert_eq!(run_with(p, Stage::Mail, &covered).await.action, Action::Continue);

        let d = run(
            vec![fixed("new_rule", Ok(Verdict::Monitor(grey)))],
            OnError::TempFail,
            Stage::Mail,
        )
        .await;
        assert_eq!(d.action, Action::Continue);

        let score = |n| {
            Ok(Verdict::Score {
                points: n,
                refusal: refusal(Category::Dnsbl),
            })
        };
        let p = Pipeline::new(
            vec![fixed("a", score(3.0)), fixed("b", score(2.5))],
            OnError::TempFail,
        )
        .with_score_limit(Some(5.0));
        let d = run_with(p, Stage::Mail, &Exemptions::default()).await;
        assert!(
            matches!(d.action, Action::Reject(ref r) if r.reply.lines[0].contains("score 5.5 of 5.0")),
            "{d:?}"
        );
        assert_eq!(d.check, Some("a"));
    }

    #[test]
    fn actions() {
        assert_eq!(CheckAction::parse("score:2.5"), Ok(CheckAction::Score(2.5)));
        assert_eq!(CheckAction::parse("monitor"), Ok(CheckAction::Monitor));
        assert!(CheckAction::parse("score:x").is_err());
        assert!(CheckAction::parse("drop").is_err());
        let v = CheckAction::TempFail.verdict(refusal(Category::Ptr));
        assert!(matches!(v, Verdict::TempFail(ref r) if r.reply.to_bytes() == b"450 4.7.1 no\r\n"));
    }
}
