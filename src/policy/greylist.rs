//! Greylisting: the first attempt of an unknown (client network, sender, recipient) triplet
//! gets `451 4.7.1`; a retry after the embargo and inside the retry window passes and
//! auto-whitelists the network (and the sender-domain/network tuple) for weeks. Runs after
//! the upstream accepted the recipient, so unknown users are refused as such, never
//! greylisted.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{BoxFuture, Category, Check, CheckError, Context, Ptr, Refusal, Stage, Verdict};
use crate::config::duration;
use crate::smtp::address::Address;
use crate::smtp::codec::Reply;
use crate::store::{Clock, Ns, Store};

/// Where the temporary refusal is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GreylistAt {
    /// At RCPT (default): cheapest, the message is never sent twice.
    #[default]
    Rcpt,
    /// After DATA: the sender transmits the message once more on retry, but senders that
    /// give up on RCPT-time 4xx (rare, broken) still retry.
    Data,
}

/// `[checks.greylist]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GreylistConfig {
    /// Default false: every first message from an unknown network waits `embargo`.
    pub enabled: bool,
    /// A retry is accepted only after this long. Default "5m".
    #[serde(with = "duration")]
    pub embargo: Duration,
    /// A first attempt is remembered this long; a retry after that starts over. Default
    /// "48h".
    #[serde(with = "duration")]
    pub retry_window: Duration,
    /// A network (and sender-domain/network tuple) that passed once skips greylisting this
    /// long, renewed by every accepted recipient. Default "36d".
    #[serde(with = "duration")]
    pub auto_whitelist: Duration,
    /// IPv4 clients are keyed by this prefix length (a sender retries from another address
    /// of the same pool). Default 24.
    pub ipv4_prefix: u8,
    /// IPv6 clients are keyed by this prefix length. Default 64.
    pub ipv6_prefix: u8,
    /// When the client has forward-confirmed reverse DNS, key by its organisational domain
    /// (`mail-ot1.google.com` → `google.com`) instead of the network: big senders retry
    /// from addresses in other networks. Default true.
    pub by_ptr_domain: bool,
    /// `rcpt` (default) or `data`.
    pub at: GreylistAt,
    /// Sender domains (and their sub-domains) never greylisted when SPF passed for them:
    /// large senders whose retries come from other networks, e.g. `["google.com",
    /// "outlook.com"]`. Needs `[checks.spf]`. Default none.
    pub skip_spf_pass: Vec<String>,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            embargo: Duration::from_secs(300),
            retry_window: Duration::from_secs(48 * 3600),
            auto_whitelist: Duration::from_secs(36 * 86400),
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            by_ptr_domain: true,
            at: GreylistAt::Rcpt,
            skip_spf_pass: Vec::new(),
        }
    }
}

impl GreylistConfig {
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if !(8..=32).contains(&self.ipv4_prefix) {
            errors.push(format!("{key}.ipv4_prefix: must be between 8 and 32"));
        }
        if !(16..=128).contains(&self.ipv6_prefix) {
            errors.push(format!("{key}.ipv6_prefix: must be between 16 and 128"));
        }
        if self.retry_window <= self.embargo {
            errors.push(format!("{key}.retry_window: must be longer than embargo"));
        }
        if self.auto_whitelist.is_zero() {
            errors.push(format!("{key}.auto_whitelist: must be more than 0"));
        }
        errors
    }
}

pub struct GreylistCheck {
    config: GreylistConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

/// What the greylist says about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Auto-whitelisted or retried in time.
    Pass,
    /// Still waiting: how long until a retry is accepted.
    Wait(Duration),
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl GreylistCheck {
    pub fn new(config: GreylistConfig, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self { config, store, clock }
    }

    /// The client part of the key: the PTR's organisational domain (when confirmed and
    /// configured) or the network.
    pub fn client_key(&self, ip: IpAddr, ptr: Option<&Ptr>) -> String {
        if self.config.by_ptr_domain
            && let Some(Ptr::Confirmed(name)) = ptr
        {
            return format!("d:{}", org_domain(name));
        }
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4)
                    & u32::MAX
                        .checked_shl(32 - u32::from(self.config.ipv4_prefix))
                        .unwrap_or(0);
                format!("n:{}/{}", std::net::Ipv4Addr::from(bits), self.config.ipv4_prefix)
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6)
                    & u128::MAX
                        .checked_shl(128 - u32::from(self.config.ipv6_prefix))
                        .unwrap_or(0);
                format!("n:{}/{}", std::net::Ipv6Addr::from(bits), self.config.ipv6_prefix)
            }
        }
    }

    /// Looks up (and, with `record`, starts or completes) the greylisting of one triplet.
    ///
    /// # Errors
    /// When the store cannot answer.
    pub async fn evaluate(
        &self,
        client: &str,
        sender: &Address,
        rcpt: &Address,
        record: bool,
    ) -> Result<Outcome, CheckError> {
        let err = |e: crate::store::StoreError| CheckError(e.to_string());
        let sender_key = normalize_sender(sender);
        let sender_domain = sender.domain_lower().unwrap_or_default();
        let awl_net = format!("net|{client}");
        let awl_tuple = format!("tuple|{sender_domain}|{client}");
        let awl = self.config.auto_whitelist;
        for key in [&awl_net, &awl_tuple] {
            if self.store.get(Ns::Awl, key).await.map_err(err)?.is_some() {
                if record {
                    // Renewed by each accepted recipient. A failed renewal (store full or
                    // away) must not refuse a sender already known good: the entry stands.
                    self.best_effort(self.store.put(Ns::Awl, key, "1", Some(awl)).await);
                }
                return Ok(Outcome::Pass);
            }
        }
        let triplet = format!("{client}|{sender_key}|{}", rcpt_key(rcpt));
        let now = self.clock.now();
        let first_seen = match self.store.get(Ns::Grey, &triplet).await.map_err(err)? {
            Some(r) => r.value.parse::<u64>().unwrap_or(0),
            None if record => {
                let now_ms = millis(now).to_string();
                let wrote = self
                    .store
                    .put_if_absent(Ns::Grey, &triplet, &now_ms, Some(self.config.retry_window))
                    .await
                    .map_err(err)?;
                if !wrote {
                    // Another node (or session) recorded it a moment ago: read its time.
                    match self.store.get(Ns::Grey, &triplet).await.map_err(err)? {
                        Some(r) => r.value.parse::<u64>().unwrap_or(0),
                        None => millis(now),
                    }
                } else {
                    millis(now)
                }
            }
            None => return Ok(Outcome::Wait(self.config.embargo)),
        };
        let age = Duration::from_millis(millis(now).saturating_sub(first_seen));
        if age < self.config.embargo {
            return Ok(Outcome::Wait(self.config.embargo - age));
        }
        if record {
            // The triplet waited its embargo: it passes even when the store cannot take the
            // auto-whitelisting now (the triplet then simply stays until it can).
            self.best_effort(self.store.put(Ns::Awl, &awl_net, "1", Some(awl)).await);
            if !sender_domain.is_empty() {
                self.best_effort(self.store.put(Ns::Awl, &awl_tuple, "1", Some(awl)).await);
            }
            self.best_effort(self.store.delete(Ns::Grey, &triplet).await.map(|_| ()));
        }
        Ok(Outcome::Pass)
    }

    /// A write whose failure must not change the verdict; the store counts its errors.
    fn best_effort(&self, result: Result<(), crate::store::StoreError>) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "Greylisting could not update the store; the verdict stands.");
        }
    }

    /// True when SPF passed for a sender domain listed in `skip_spf_pass`.
    fn spf_vouched(&self, cx: &Context<'_>, sender: &Address) -> bool {
        if self.config.skip_spf_pass.is_empty() {
            return false;
        }
        let passed = cx.facts.results.lock().map(|r| r.spf == "pass").unwrap_or(false);
        let Some(domain) = sender.domain_lower() else {
            return false;
        };
        passed
            && self.config.skip_spf_pass.iter().any(|d| {
                let d = d.to_lowercase();
                domain == d || domain.ends_with(&format!(".{d}"))
            })
    }

    fn refusal(&self, wait: Duration) -> Refusal {
        let minutes = wait.as_secs().div_ceil(60).max(1);
        Refusal {
            reply: Reply::build(
                451,
                "4.7.1",
                format!(
                    "Greylisted: this server accepts mail from new senders on retry, try again in {minutes} minute(s)"
                ),
            ),
            category: Category::Greylisted,
        }
    }
}

impl Check for GreylistCheck {
    fn name(&self) -> &'static str {
        "greylist"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::RcptAccepted, Stage::Data]
    }

    fn needs_io(&self) -> bool {
        true
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(async move {
            let Some(sender) = cx.sender else {
                return Ok(Verdict::Skip);
            };
            if self.spf_vouched(cx, sender) {
                return Ok(Verdict::Skip);
            }
            let client = self.client_key(cx.session.peer.ip(), cx.facts.ptr.get());
            match (cx.stage, self.config.at) {
                (Stage::RcptAccepted, at) => {
                    let Some(rcpt) = cx.recipient else {
                        return Ok(Verdict::Skip);
                    };
                    match self.evaluate(&client, sender, rcpt, true).await? {
                        Outcome::Pass => Ok(Verdict::Pass),
                        Outcome::Wait(_) if at == GreylistAt::Data => Ok(Verdict::Pass),
                        Outcome::Wait(w) => Ok(Verdict::TempFail(self.refusal(w))),
                    }
                }
                (Stage::Data, GreylistAt::Data) => {
                    let mut longest = None;
                    for rcpt in cx.recipients {
                        if let Outcome::Wait(w) = self.evaluate(&client, sender, rcpt, false).await? {
                            longest = Some(longest.map_or(w, |l: Duration| l.max(w)));
                        }
                    }
                    Ok(longest.map_or(Verdict::Pass, |w| Verdict::TempFail(self.refusal(w))))
                }
                _ => Ok(Verdict::Skip),
            }
        })
    }
}

/// The recipient, lower-cased (local parts are case-insensitive in practice).
fn rcpt_key(rcpt: &Address) -> String {
    rcpt.raw.to_lowercase()
}

/// The envelope sender as a greylist key: lower-cased, with per-message tags removed so a
/// VERP/SRS/BATV bounce address does not restart the embargo for every message.
pub fn normalize_sender(sender: &Address) -> String {
    if sender.is_null() {
        return "<>".into();
    }
    let mut local = sender.local.to_lowercase();
    let domain = sender.domain_lower().unwrap_or_default();
    // BATV: prvs=TAG=user or btv1==TAG==user.
    for prefix in ["prvs=", "msprvs1=", "btv1=="] {
        if let Some(rest) = local.strip_prefix(prefix) {
            let sep = if prefix.ends_with("==") { "==" } else { "=" };
            if let Some((_, user)) = rest.split_once(sep) {
                local = user.to_string();
            }
        }
    }
    // SRS0=HASH=TT=orig.domain=user: keep the original domain and user only.
    if let Some(rest) = local
        .strip_prefix("srs0=")
        .or_else(|| local.strip_prefix("srs1="))
    {
        let parts: Vec<&str> = rest.splitn(4, '=').collect();
        if parts.len() == 4 {
            local = format!("srs={}={}", parts[2], parts[3]);
        }
    }
    // Sub-address tags (list-bounces+user=example.com) and VERP counters.
    if let Some((base, _)) = local.split_once('+') {
        local = base.to_string();
    }
    let mut out = String::with_capacity(local.len());
    let mut in_digits = false;
    for c in local.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    format!("{out}@{domain}")
}

/// The organisational domain of a host name, approximated without the public suffix list:
/// the last two labels, or three when the second-level label looks like a registry suffix
/// (`co.uk`, `com.au`).
pub fn org_domain(name: &str) -> String {
    let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
    let n = labels.len();
    if n <= 2 {
        return labels.join(".").to_lowercase();
    }
    let sld = labels[n - 2];
    let take = if labels[n - 1].len() == 2
        && matches!(
            sld,
            "co" | "com" | "net" | "org" | "ac" | "gov" | "edu" | "ne" | "or"
        ) {
        3
    } else {
        2
    };
    labels[n - take..].join(".").to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::address::parse_path;

    fn a(s: &str) -> Address {
        parse_path(s).unwrap().0
    }

    #[test]
    fn sender_normalisation() {
        assert_eq!(normalize_sender(&a("<User@Example.COM>")), "user@example.com");
        assert_eq!(
            normalize_sender(&a("<prvs=0123abcd=bounce@example.com>")),
            "bounce@example.com"
        );
        assert_eq!(
            normalize_sender(&a("<SRS0=HHH=TT=orig.example=alice@fwd.example>")),
            "srs=orig.example=alice@fwd.example"
        );
        assert_eq!(
            normalize_sender(&a("<list-bounces+user=example.com@lists.example.org>")),
            "list-bounces@lists.example.org"
        );
        assert_eq!(
            normalize_sender(&a("<bounce-12345-678@mailer.example>")),
            normalize_sender(&a("<bounce-9-1@mailer.example>"))
        );
        assert_eq!(normalize_sender(&a("<>")), "<>");
    }

    #[test]
    fn org_domains() {
        assert_eq!(org_domain("mail-ot1-f41.google.com"), "google.com");
        assert_eq!(org_domain("mx1.mail.example.co.uk"), "example.co.uk");
        assert_eq!(org_domain("example.com"), "example.com");
    }
}
