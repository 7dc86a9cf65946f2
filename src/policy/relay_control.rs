//! Relay control: a recipient is accepted only for a configured local domain, written
//! plainly. Every address trick (`%` hack, `!` path, source route, quoted local part with
//! routing characters, `user@a@b`, IP literal, trailing dot) is refused as a relay attempt.

use std::sync::Arc;

use super::{BoxFuture, Category, Check, CheckError, Context, Refusal, Stage, Verdict};
use crate::smtp::codec::Reply;
use crate::upstream::Routes;

pub struct RelayControl {
    routes: Arc<Routes>,
}

impl RelayControl {
    pub fn new(routes: Arc<Routes>) -> Self {
        Self { routes }
    }

    /// True when the recipient may be relayed to a local upstream.
    pub fn is_local(&self, rcpt: &crate::smtp::address::Address) -> bool {
        if rcpt.is_bare_postmaster() {
            return true;
        }
        if rcpt.source_route || !rcpt.local_is_plain() || !rcpt.domain_is_hostname() {
            return false;
        }
        rcpt.domain_lower()
            .is_some_and(|d| self.routes.route(&d).is_some())
    }
}

impl Check for RelayControl {
    fn name(&self) -> &'static str {
        "relay_control"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Rcpt]
    }

    /// A whitelisted client is still not allowed to relay: only authentication is.
    fn exemptible(&self) -> bool {
        false
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        let verdict = match cx.recipient {
            // An authenticated client may send anywhere; the upstream decides.
            _ if cx.session.authenticated.is_some() => Verdict::Skip,
            Some(rcpt) if self.is_local(rcpt) => Verdict::Pass,
            Some(_) => Verdict::Reject(Refusal {
                reply: Reply::build(
                    550,
                    "5.7.1",
                    "Relay access denied: this server only accepts mail for its own domains",
                ),
                category: Category::RelayAttempt,
            }),
            None => Verdict::Skip,
        };
        Box::pin(async move { Ok(verdict) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::smtp::address::parse_path;

    #[test]
    fn tricks_are_not_local() {
        let config = Config::from_toml(
            r#"
            [[listener]]
            address = "127.0.0.1:0"
            [upstream.mta]
            address = "127.0.0.1:1"
            [domains]
            local = ["ours.example"]
            "#,
            "t",
        )
        .unwrap();
        let rc = RelayControl::new(Arc::new(Routes::build(&config, None).unwrap()));
        let local = |s: &str| parse_path(s).is_ok_and(|(a, _)| rc.is_local(&a));
        assert!(local("<user@ours.example>"));
        assert!(local("<User@OURS.Example>"));
        assert!(local("<\"john doe\"@ours.example>"));
        assert!(local("<postmaster>"));
        for trick in [
            "<user@other.example>",
            "<user%other.example@ours.example>",
            "<other.example!user@ours.example>",
            "<@ours.example:user@other.example>",
            "<@other.example,@ours.example:user@ours.example>",
            "<\"user@other.example\"@ours.example>",
            "<\"user%other.example\"@ours.example>",
            "<\"other!user\"@ours.example>",
            "<user@other.example@ours.example>",
            "<user@[127.0.0.1]>",
            "<user@[IPv6:::1]>",
            "<user@ours.example.>",
            "<user@ours.example.other.example>",
            "<user@sub.ours.example>",
            "<user>",
            "<>",
            "<user@>",
            "<@ours.example>",
        ] {
            assert!(!local(trick), "{trick} must not be local");
        }
    }
}
