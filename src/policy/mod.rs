//! The policy seam: stages of a session, the verdicts checks return, the `Check` trait and
//! the `Pipeline` that runs a stage's checks in order and turns verdicts into one decision.
//! Checks only look at the `Context`; they never write to the client or the upstream.

pub mod relay_control;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

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
    /// Adds to the message score.
    Score(f32),
    /// Whitelisted: stop checking this stage.
    Accept,
    TempFail(Refusal),
    Reject(Refusal),
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
    /// The unstuffed message at `Data`.
    pub message: Option<&'a [u8]>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One anti-spam check. Implementations live in their own file under `policy/`.
pub trait Check: Send + Sync {
    /// Name for logs, metrics and the event log (`relay_control`, `dnsbl`, …).
    fn name(&self) -> &'static str;
    /// The stages this check runs at.
    fn stages(&self) -> &'static [Stage];
    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>>;
}

/// What a failing check means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// `451 4.3.0`: the sender retries later (default: never lose mail to a DNS hiccup).
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
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Continue,
    Accept,
    TempFail(Refusal),
    Reject(Refusal),
}

/// The configured checks, in order.
#[derive(Clone)]
pub struct Pipeline {
    checks: Vec<Arc<dyn Check>>,
    on_error: OnError,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field(
                "checks",
                &self.checks.iter().map(|c| c.name()).collect::<Vec<_>>(),
            )
            .field("on_error", &self.on_error)
            .finish()
    }
}

impl Pipeline {
    pub fn new(checks: Vec<Arc<dyn Check>>, on_error: OnError) -> Self {
        Self { checks, on_error }
    }

    /// Adds a check at the end (embedders and tests add their own checks this way).
    pub fn push(&mut self, check: Arc<dyn Check>) {
        self.checks.push(check);
    }

    /// Runs the checks of `cx.stage` in order. `Accept`, `TempFail` and `Reject` stop the
    /// stage; a check error becomes a verdict through `on_error` only.
    pub async fn run(&self, cx: &Context<'_>) -> Decision {
        let mut score = 0.0;
        for check in self.checks.iter().filter(|c| c.stages().contains(&cx.stage)) {
            let verdict = match check.check(cx).await {
                Ok(v) => v,
                Err(e) => {
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
            };
            let name = Some(check.name());
            match verdict {
                Verdict::Skip | Verdict::Pass => {}
                Verdict::Score(n) => score += n,
                Verdict::Accept => {
                    return Decision {
                        action: Action::Accept,
                        check: name,
                        score,
                    };
                }
                Verdict::TempFail(r) => {
                    return Decision {
                        action: Action::TempFail(r),
                        check: name,
                        score,
                    };
                }
                Verdict::Reject(r) => {
                    return Decision {
                        action: Action::Reject(r),
                        check: name,
                        score,
                    };
                }
            }
        }
        Decision {
            action: Action::Continue,
            check: None,
            score,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, Result<Verdict, ()>);
    impl Check for Fixed {
        fn name(&self) -> &'static str {
            self.0
        }
        fn stages(&self) -> &'static [Stage] {
            &[Stage::Mail]
        }
        fn check<'a>(&'a self, _: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
            let v = self.1.clone().map_err(|_| CheckError("dns timeout".into()));
            Box::pin(async move { v })
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
        }
    }

    async fn run(checks: Vec<Arc<dyn Check>>, on_error: OnError, stage: Stage) -> Decision {
        let info = info();
        let cx = Context {
            stage,
            session: &info,
            sender: None,
            recipient: None,
            recipients: &[],
            message: None,
        };
        Pipeline::new(checks, on_error).run(&cx).await
    }

    #[tokio::test]
    async fn order_scores_and_errors() {
        let reject = Refusal {
            reply: Reply::build(550, "5.7.1", "no"),
            category: Category::Blacklist,
        };
        let d = run(
            vec![
                Arc::new(Fixed("a", Ok(Verdict::Score(1.5)))),
                Arc::new(Fixed("b", Ok(Verdict::Reject(reject.clone())))),
                Arc::new(Fixed("c", Ok(Verdict::Accept))),
            ],
            OnError::TempFail,
            Stage::Mail,
        )
        .await;
        assert_eq!(
            d,
            Decision {
                action: Action::Reject(reject),
                check: Some("b"),
                score: 1.5
            }
        );

        let d = run(
            vec![Arc::new(Fixed("e", Err(())))],
            OnError::TempFail,
            Stage::Mail,
        )
        .await;
        assert!(matches!(d.action, Action::TempFail(ref r) if r.reply.code == 451));
        let d = run(vec![Arc::new(Fixed("e", Err(())))], OnError::Pass, Stage::Mail).await;
        assert_eq!(d.action, Action::Continue);
        // A check is not asked at stages it did not register for.
        let d = run(
            vec![Arc::new(Fixed("e", Err(())))],
            OnError::TempFail,
            Stage::Rcpt,
        )
        .await;
        assert_eq!(d.action, Action::Continue);
    }
}
