//! The `spf` check (`[checks.spf]`, stage MAIL): RFC 7208 Sender Policy Framework. The
//! client's address is checked against the SPF record of the MAIL FROM domain (or, for the
//! null sender `<>`, of the HELO name, RFC 7208 §2.3/§2.4); each of the seven results maps
//! to a configured action, and relayed mail gets an RFC 7208 §9.1 `Received-SPF:` header.
//!
//! The evaluator is mail-auth (pinned, see DEPENDENCIES.md §1). Every use of mail-auth is in
//! this file, so a later upgrade touches this file only. mail-auth shares the process's
//! hickory resolver (and with it the servers, timeouts and response cache of `[dns]`).
//!
//! thassp adds what RFC 7208 asks and mail-auth 0.13.3 does not do, each covered by the
//! openspf conformance suite in `tests/spf_suite.rs` (197 of 203 cases pass; the six left
//! are listed there with their reasons):
//! - a malformed domain (empty label, label over 63 octets, a single label, an address
//!   literal) is `none` before any lookup (§4.3); a sender without a local part is
//!   `postmaster` (§4.3); an IPv4-mapped IPv6 client is its IPv4 address (§5);
//! - every SPF record evaluated must be its name's only one (§4.5) and follow the grammar
//!   (§4.6, §12), else `permerror`; mail-auth takes the first record it can parse and
//!   accepts bad CIDR lengths, bad top labels, stray characters and bad modifiers;
//! - more than two lookups that find nothing are `permerror` (§4.6.4, void lookups);
//! - PTR names for `ptr` and `%{p}` are validated, at most ten, without the trailing dot
//!   mail-auth keeps (which made `ptr` miss an exact match and `%{p}` expand to `a..b`);
//! - a macro-expanded name hickory cannot parse (a space, an empty or long label) is asked
//!   label by label or matches nothing (§4.8, §7.3) instead of giving `temperror`;
//! - `ip6` never matches an IPv4 client (§5.6; mail-auth compared the mapped address, so
//!   `ip6:::/0` passed every IPv4 client); unknown modifiers mail-auth cannot parse are
//!   ignored (§6.3); an `exp=` name without exactly one ASCII TXT record gives no
//!   explanation (§6.2).
//!
//! How: mail-auth asks a per-evaluation cache before each DNS lookup. thassp's cache
//! answers nothing by itself but records each question and answer; from that record
//! thassp checks the records mail-auth evaluated and counts void lookups, and where
//! mail-auth went wrong it evaluates again with its own answers for those names (records
//! and addresses come from hickory's cache by then).

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::proto::rr::{Name, RData, RecordType};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::spf::{Mechanism, Spf};
use mail_auth::{
    DnssecStatus, MX, MessageAuthenticator, Parameters, RecordSet, ResolverCache,
    SpfResult as MailAuthResult, Txt,
};
use serde::{Deserialize, Serialize};

use super::helo::optional_action;
use super::{BoxFuture, Category, Check, CheckAction, CheckError, Context, Refusal, Stage, Verdict};
use crate::dns::{DnsError, Resolver};
use crate::smtp::codec::Reply;

/// `[checks.spf]`: what each SPF result does. Each action is `reject`, `tempfail`,
/// `score:N`, `monitor` or `"off"` (the result is only recorded in `Received-SPF:`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpfConfig {
    /// Run the check. Default true.
    pub enabled: bool,
    /// The domain says the client may not send its mail (`-all`). Default "reject"
    /// (`550 5.7.23`).
    #[serde(with = "optional_action")]
    pub fail: Option<CheckAction>,
    /// The domain says the client probably may not send its mail (`~all`). Default "score:2".
    #[serde(with = "optional_action")]
    pub softfail: Option<CheckAction>,
    /// The domain makes no statement about the client (`?all`). Default "off".
    #[serde(with = "optional_action")]
    pub neutral: Option<CheckAction>,
    /// The domain publishes no SPF record (or the name is not a domain). Default "off".
    #[serde(with = "optional_action")]
    pub none: Option<CheckAction>,
    /// A DNS failure (timeout, SERVFAIL) kept the result open. Default "tempfail"
    /// (`451 4.7.24`): the sender retries, so a DNS hiccup never loses mail.
    #[serde(with = "optional_action")]
    pub temperror: Option<CheckAction>,
    /// The domain's SPF record is broken (syntax, more than 10 DNS-querying terms, more
    /// than 2 lookups that found nothing, several SPF records). Default "off": the record's
    /// owner made a mistake, which says nothing about the client.
    #[serde(with = "optional_action")]
    pub permerror: Option<CheckAction>,
    /// Add a `Received-SPF:` header (RFC 7208 §9.1) to relayed mail. Default true.
    pub received_spf_header: bool,
    /// For the null sender `<>` (bounces), evaluate the HELO name's SPF record (RFC 7208
    /// §2.3): bounces have no other identity to check. Default true; when false, mail from
    /// `<>` is not checked.
    pub check_helo: bool,
}

impl Default for SpfConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            fail: Some(CheckAction::Reject),
            softfail: Some(CheckAction::Score(2.0)),
            neutral: None,
            none: None,
            temperror: Some(CheckAction::TempFail),
            permerror: None,
            received_spf_header: true,
            check_helo: true,
        }
    }
}

impl SpfConfig {
    /// Every problem, each prefixed with `key` (e.g. `checks.spf`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, action) in self.actions() {
            if let Some(CheckAction::Score(n)) = action
                && !(-1000.0..=1000.0).contains(&n)
            {
                errors.push(format!("{key}.{name}: score {n} is out of range (-1000 to 1000)"));
            }
        }
        errors
    }

    fn actions(&self) -> [(&'static str, Option<CheckAction>); 6] {
        [
            ("fail", self.fail),
            ("softfail", self.softfail),
            ("neutral", self.neutral),
            ("none", self.none),
            ("temperror", self.temperror),
            ("permerror", self.permerror),
        ]
    }

    /// The configured action for `result`; `None` for `pass` and for results set "off".
    pub fn action(&self, result: SpfResult) -> Option<CheckAction> {
        match result {
            SpfResult::Pass => None,
            SpfResult::Fail => self.fail,
            SpfResult::SoftFail => self.softfail,
            SpfResult::Neutral => self.neutral,
            SpfResult::None => self.none,
            SpfResult::TempError => self.temperror,
            SpfResult::PermError => self.permerror,
        }
    }
}

/// The result of an SPF evaluation (RFC 7208 §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl SpfResult {
    /// The RFC 7208 name: `pass`, `fail`, `softfail`, `neutral`, `none`, `temperror`,
    /// `permerror`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::SoftFail => "softfail",
            Self::Neutral => "neutral",
            Self::None => "none",
            Self::TempError => "temperror",
            Self::PermError => "permerror",
        }
    }

    /// Parses an RFC 7208 name (case-insensitive).
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.trim().to_ascii_lowercase().as_str() {
            "pass" => Self::Pass,
            "fail" => Self::Fail,
            "softfail" => Self::SoftFail,
            "neutral" => Self::Neutral,
            "none" => Self::None,
            "temperror" => Self::TempError,
            "permerror" => Self::PermError,
            _ => return None,
        })
    }

    fn from_mail_auth(result: MailAuthResult) -> Self {
        match result {
            MailAuthResult::Pass => Self::Pass,
            MailAuthResult::Fail => Self::Fail,
            MailAuthResult::SoftFail => Self::SoftFail,
            MailAuthResult::Neutral => Self::Neutral,
            MailAuthResult::None => Self::None,
            MailAuthResult::TempError => Self::TempError,
            MailAuthResult::PermError => Self::PermError,
        }
    }
}

impl std::fmt::Display for SpfResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which identity was checked (RFC 7208 §2.3, §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// The MAIL FROM address's domain.
    MailFrom,
    /// The HELO/EHLO name (for the null sender).
    Helo,
}

impl Identity {
    /// `mailfrom` or `helo`, as in `Received-SPF: … identity=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MailFrom => "mailfrom",
            Self::Helo => "helo",
        }
    }
}

/// What one evaluation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfEvaluation {
    pub result: SpfResult,
    /// The domain whose record was evaluated (lower case, no trailing dot).
    pub domain: String,
    /// The identity checked.
    pub identity: Identity,
    /// The domain's explanation (`exp=`) for a `fail`, as published: third-party text.
    pub explanation: Option<String>,
    /// Why the result is `permerror` or `temperror`, when known.
    pub problem: Option<String>,
}

/// The SPF check. Cheap to share; one per configuration.
pub struct SpfCheck {
    config: SpfConfig,
    resolver: Arc<Resolver>,
    authenticator: MessageAuthenticator,
}

impl std::fmt::Debug for SpfCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpfCheck")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Longest text taken from the client or from DNS into a reply or header.
const TEXT_MAX: usize = 255;

impl SpfCheck {
    /// Builds the check on the process resolver. mail-auth's `MessageAuthenticator` is a
    /// thin wrapper around a hickory resolver; it gets a clone of the shared one, which
    /// shares its servers, options and response cache.
    pub fn build(config: &SpfConfig, resolver: Arc<Resolver>) -> Result<Self, Vec<String>> {
        let errors = config.validate("checks.spf");
        if !errors.is_empty() {
            return Err(errors);
        }
        let authenticator = MessageAuthenticator(resolver.hickory().clone());
        Ok(Self {
            config: config.clone(),
            resolver,
            authenticator,
        })
    }

    /// The configuration this check was built from.
    pub fn config(&self) -> &SpfConfig {
        &self.config
    }

    /// Evaluates SPF for a client at `ip` that said `HELO helo` and `MAIL FROM:<mail_from>`.
    /// An empty `mail_from` (the null sender), or one without a domain, checks the HELO
    /// identity (`postmaster@helo`); otherwise the MAIL FROM identity. Bounded by the
    /// resolver's check deadline (`[dns] check_deadline`): running out is `temperror`.
    pub async fn evaluate(&self, ip: IpAddr, helo: &str, mail_from: &str) -> SpfEvaluation {
        self.evaluate_as(ip, helo, mail_from, "unknown").await
    }

    /// As [`evaluate`](Self::evaluate), with `receiver` as the checking host's name (the
    /// `%{r}` macro of explanations).
    pub async fn evaluate_as(
        &self,
        ip: IpAddr,
        helo: &str,
        mail_from: &str,
        receiver: &str,
    ) -> SpfEvaluation {
        // §5: an IPv4-mapped IPv6 address is the IPv4 client it stands for.
        let ip = ip.to_canonical();
        let helo = helo.trim();
        let (identity, domain, sender) = match mail_from.trim().rsplit_once('@') {
            Some((local, domain)) if !domain.is_empty() => {
                // §4.3: a sender without a local part is postmaster.
                let local = if local.is_empty() { "postmaster" } else { local };
                (Identity::MailFrom, domain, format!("{local}@{domain}"))
            }
            _ => (Identity::Helo, helo, format!("postmaster@{helo}")),
        };
        let domain_key = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut evaluation = SpfEvaluation {
            result: SpfResult::None,
            domain: domain_key.clone(),
            identity,
            explanation: None,
            problem: None,
        };
        // §4.3: a malformed domain, or one that is not multi-label, is "none" (no lookup).
        if !is_spf_domain(domain) {
            evaluation.problem = Some("not a domain name".into());
            return evaluation;
        }
        let deadline = self.resolver.check_deadline();
        let run = self.check_host(ip, &domain_key, helo, &sender, receiver);
        match tokio::time::timeout(deadline, run).await {
            Ok(found) => {
                evaluation.result = found.result;
                evaluation.explanation = found.explanation;
                evaluation.problem = found.problem;
            }
            Err(_) => {
                evaluation.result = SpfResult::TempError;
                evaluation.problem = Some(format!("took longer than {}", human(deadline)));
            }
        }
        evaluation
    }

    /// One RFC 7208 `check_host()`: mail-auth evaluates; thassp watches every DNS question
    /// mail-auth asks (through its per-evaluation cache hooks, see [`Recorder`]), answers a
    /// few itself where mail-auth would go wrong, and evaluates again when it did (at most
    /// `MAX_ROUNDS` times; later rounds are answered from hickory's cache). Then it applies
    /// the RFC's record checks and the void-lookup limit that mail-auth lacks.
    async fn check_host(&self, ip: IpAddr, domain: &str, helo: &str, sender: &str, receiver: &str) -> Found {
        let mut overrides = Overrides::default();
        let mut round = 1;
        loop {
            let recorder = Recorder::default();
            let output = {
                let txt = recorder.hook(Kind::Txt, &overrides.txt);
                let mx = recorder.hook(Kind::Mx, &overrides.mx);
                let a = recorder.hook(Kind::A, &overrides.a);
                let aaaa = recorder.hook(Kind::Aaaa, &overrides.aaaa);
                let ptr = PtrHook(&recorder, overrides.ptr.as_ref());
                let params = Parameters::new(SpfParameters::new(ip, domain, helo, receiver, sender))
                    .with_txt_cache(&txt)
                    .with_mx_cache(&mx)
                    .with_ipv4_cache(&a)
                    .with_ipv6_cache(&aaaa)
                    .with_ptr_cache(&ptr);
                self.authenticator.check_host(params).await
            };
            let events = recorder.into_events();
            let result = SpfResult::from_mail_auth(output.result());
            if round < MAX_ROUNDS && self.amend(&mut overrides, ip, result, &events).await {
                round += 1;
                continue;
            }
            let explanation = output.explanation().map(str::to_string);
            return self.conclude(result, explanation, &overrides, &events).await;
        }
    }

    /// Adds one answer mail-auth should get differently next round; false when there is
    /// nothing to amend.
    async fn amend(
        &self,
        overrides: &mut Overrides,
        ip: IpAddr,
        result: SpfResult,
        events: &[Event],
    ) -> bool {
        // mail-auth keeps the trailing dot of PTR names (so `ptr` never matches the exact
        // domain and `%{p}` expands to `name..rest`) and uses the first name unvalidated.
        if overrides.ptr.is_none() && events.iter().any(|e| e.kind == Kind::Ptr) {
            overrides.ptr = Some(self.validated_names(ip).await);
            return true;
        }
        // mail-auth's parser refuses some valid records (an unknown modifier whose name has
        // a dot; RFC 7208 §6.3 says ignore it), and its `ip6` matches an IPv4 client through
        // the IPv4-mapped address (`ip6:::/0` would pass every IPv4 client; §5.6 says `ip6`
        // never matches IPv4). Give it the corrected record.
        let mut asked = HashSet::new();
        for e in events {
            if e.kind != Kind::Txt
                || !matches!(e.stored, Some(Stored::Spf | Stored::SpfUnparsable))
                || overrides.txt.contains_key(e.name.as_str())
                || !asked.insert(e.name.as_str())
            {
                continue;
            }
            if let Ok(records) = self.spf_records(&e.name).await
                && let [record] = records.as_slice()
                && validate_record(record).is_ok()
                && let Some(spf) = corrected(record, ip)
            {
                overrides
                    .txt
                    .insert(e.name.clone().into_boxed_str(), Txt::Spf(Arc::new(spf)));
                return true;
            }
        }
        // A name hickory cannot parse (a space or a `:` from a macro, an empty or a 64-octet
        // label) makes mail-auth give temperror. RFC 7208 §4.8, §5: look it up label by
        // label when it is a DNS name, else it matches nothing.
        if result == SpfResult::TempError
            && let Some((i, e)) = events
                .iter()
                .enumerate()
                .rev()
                .find(|(_, e)| e.is_address_question())
            && Name::from_str_relaxed(&e.name).is_err()
            && !overrides.has(e.kind, &e.name)
        {
            let key = e.name.clone().into_boxed_str();
            if is_exists(events, i) || (i > 0 && is_exists(events, i - 1)) {
                // `exists` matches whenever the cache answers, so only an answer with
                // addresses can be given; a name with none stays a temperror.
                if let Some(set) = self.raw_lookup_a(&e.name).await
                    && !set.rrset.is_empty()
                {
                    overrides.a.insert(key, set);
                    return true;
                }
                return false;
            }
            match e.kind {
                Kind::A => {
                    if let Some(set) = self.raw_lookup_a(&e.name).await {
                        overrides.a.insert(key, set);
                        return true;
                    }
                }
                Kind::Aaaa => {
                    if let Some(set) = self.raw_lookup_aaaa(&e.name).await {
                        overrides.aaaa.insert(key, set);
                        return true;
                    }
                }
                Kind::Mx => {
                    if let Some(set) = self.raw_lookup_mx(&e.name).await {
                        overrides.mx.insert(key, set);
                        return true;
                    }
                }
                Kind::Txt | Kind::Ptr => {}
            }
        }
        false
    }

    /// The final result: mail-auth's, unless a record it evaluated breaks RFC 7208 §4.5
    /// (one SPF record per name) or §4.6 (syntax), or there were more than two void
    /// lookups (§4.6.4); all three are `permerror` at the point they happen, and every
    /// lookup mail-auth made happened before it stopped.
    async fn conclude(
        &self,
        result: SpfResult,
        mut explanation: Option<String>,
        overrides: &Overrides,
        events: &[Event],
    ) -> Found {
        let mut problem = None;
        let mut checked = HashSet::new();
        // Every TXT answer mail-auth took as a record (not an explanation), in order.
        for e in events {
            if e.kind != Kind::Txt
                || matches!(e.stored, None | Some(Stored::Explanation))
                || !checked.insert(e.name.as_str())
            {
                continue;
            }
            let name = e.name.trim_end_matches('.');
            match self.spf_records(&e.name).await {
                Ok(records) if records.len() > 1 => {
                    problem = Some(format!("{name} has {} SPF records", records.len()));
                }
                Ok(records) => {
                    if let Some(Err(why)) = records.first().map(|r| validate_record(r)) {
                        problem = Some(format!("invalid SPF record at {name}: {why}"));
                    }
                }
                // A lookup that worked a moment ago failed: nothing to judge.
                Err(()) => {}
            }
            if problem.is_some() {
                break;
            }
        }
        if problem.is_none() && result != SpfResult::PermError {
            problem = self.void_lookups(overrides, events).await;
        }
        if let Some(problem) = problem {
            return Found {
                result: SpfResult::PermError,
                explanation: None,
                problem: Some(problem),
            };
        }
        // RFC 7208 §6.2: an explanation name with no or several TXT records, or text that is
        // not ASCII, is as if there were no `exp=`.
        if result == SpfResult::Fail && explanation.is_some() {
            let exp = events
                .iter()
                .find(|e| e.kind == Kind::Txt && e.stored == Some(Stored::Explanation));
            let fine = match exp {
                Some(e) => self
                    .txt_records(&e.name)
                    .await
                    .is_ok_and(|r| r.len() == 1 && r[0].iter().all(|b| (0x20..0x7f).contains(b))),
                None => false,
            };
            if !fine {
                explanation = None;
            }
        }
        Found {
            result,
            explanation: explanation.filter(|_| result == SpfResult::Fail),
            problem: match result {
                // What mail-auth refuses beyond the checks above: the lookup limits, or an
                // include or redirect to a name without an SPF record.
                SpfResult::PermError => Some(
                    "more than 10 DNS lookups, or include/redirect to a domain without an SPF record".into(),
                ),
                SpfResult::TempError => Some("DNS lookup failed".into()),
                _ => None,
            },
        }
    }

    /// RFC 7208 §4.6.4: a third lookup (A, AAAA, MX, `exists`) that finds nothing is a
    /// `permerror`. Lookups mail-auth stored found something; the others found nothing or
    /// failed, which a lookup of our own (from hickory's cache) tells apart. Returns the
    /// problem when over the limit.
    async fn void_lookups(&self, overrides: &Overrides, events: &[Event]) -> Option<String> {
        let mut candidates: Vec<(Question, &str)> = Vec::new();
        let mut voids = 0;
        let mut i = 0;
        while i < events.len() {
            let e = &events[i];
            i += 1;
            if !e.is_address_question() {
                continue;
            }
            if e.served {
                voids += usize::from(overrides.is_empty_answer(e.kind, &e.name));
                continue;
            }
            if events.get(i).is_some_and(|n| n.is_answer_to(e)) {
                continue;
            }
            if is_exists(events, i - 1) {
                // `exists`: one term, asked as A then AAAA.
                i += 1;
                candidates.push((Question::Exists, &e.name));
            } else {
                candidates.push((Question::Of(e.kind), &e.name));
            }
        }
        if voids + candidates.len() <= MAX_VOID_LOOKUPS {
            return None;
        }
        for (kind, name) in candidates {
            let found = match kind {
                Question::Of(Kind::A) => self.resolver.a(name).await.map(drop),
                Question::Of(Kind::Aaaa) => self.resolver.aaaa(name).await.map(drop),
                Question::Of(_) => self.resolver.mx(name).await.map(drop),
                Question::Exists => self.resolver.ips(name).await.map(drop),
            };
            voids += usize::from(found == Err(DnsError::NotFound));
            if voids > MAX_VOID_LOOKUPS {
                return Some(format!(
                    "more than {MAX_VOID_LOOKUPS} DNS lookups found nothing (the last: {})",
                    name.trim_end_matches('.')
                ));
            }
        }
        None
    }

    /// The PTR names of `ip` whose addresses include `ip` (at most 10, RFC 7208 §4.6.4),
    /// lower case without the trailing dot; `unknown` when there is none (§7.3, `%{p}`).
    async fn validated_names(&self, ip: IpAddr) -> RecordSet<Box<str>> {
        let names: Vec<String> = self
            .resolver
            .ptr_names(ip)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|n| !n.is_empty())
            .take(MAX_PTR_NAMES)
            .collect();
        let confirmed = futures_util::future::join_all(names.iter().map(|name| async move {
            match ip {
                IpAddr::V4(v4) => self.resolver.a(name).await.is_ok_and(|a| a.contains(&v4)),
                IpAddr::V6(v6) => self.resolver.aaaa(name).await.is_ok_and(|a| a.contains(&v6)),
            }
        }))
        .await;
        let mut valid: Vec<Box<str>> = names
            .into_iter()
            .zip(confirmed)
            .filter(|(_, ok)| *ok)
            .map(|(n, _)| n.into_boxed_str())
            .collect();
        if valid.is_empty() {
            valid.push("unknown".into());
        }
        RecordSet {
            rrset: valid.into(),
            dnssec_status: DnssecStatus::Indeterminate,
        }
    }

    /// The TXT records at `name` (each record's strings joined, raw bytes). `Err` when
    /// the lookup failed; NXDOMAIN and no data are an empty list.
    async fn txt_records(&self, name: &str) -> Result<Vec<Vec<u8>>, ()> {
        let Ok(parsed) = Name::from_str_relaxed(name) else {
            return Ok(Vec::new());
        };
        match self.resolver.hickory().lookup(parsed, RecordType::TXT).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(txt.txt_data.iter().flat_map(|s| s.iter().copied()).collect()),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(_) => Err(()),
        }
    }

    /// The SPF records among the TXT records at `name` (RFC 7208 §4.5: `v=spf1`, any
    /// case, then a space or the end).
    async fn spf_records(&self, name: &str) -> Result<Vec<Vec<u8>>, ()> {
        let records = self.txt_records(name).await?;
        Ok(records.into_iter().filter(|r| is_spf_record(r)).collect())
    }

    /// Addresses of a name hickory cannot parse, asked label by label. `None` when the
    /// lookup failed (a genuine temperror); an empty set when the name is not a DNS name
    /// or has no addresses.
    async fn raw_lookup_a(&self, name: &str) -> Option<RecordSet<Ipv4Addr>> {
        let found = self.raw_lookup(name, RecordType::A).await?;
        Some(record_set(found.iter().filter_map(|r| match r {
            RData::A(a) => Some(a.0),
            _ => None,
        })))
    }

    async fn raw_lookup_aaaa(&self, name: &str) -> Option<RecordSet<Ipv6Addr>> {
        let found = self.raw_lookup(name, RecordType::AAAA).await?;
        Some(record_set(found.iter().filter_map(|r| match r {
            RData::AAAA(a) => Some(a.0),
            _ => None,
        })))
    }

    async fn raw_lookup_mx(&self, name: &str) -> Option<RecordSet<MX>> {
        let found = self.raw_lookup(name, RecordType::MX).await?;
        // As mail-auth groups them: by preference, lowest first.
        let mut groups: Vec<(u16, Vec<Box<str>>)> = Vec::new();
        for r in &found {
            if let RData::MX(mx) = r {
                let exchange = mx.exchange.to_lowercase().to_ascii().into_boxed_str();
                match groups.iter_mut().find(|g| g.0 == mx.preference) {
                    Some(g) => g.1.push(exchange),
                    None => groups.push((mx.preference, vec![exchange])),
                }
            }
        }
        groups.sort_by_key(|g| g.0);
        Some(record_set(groups.into_iter().map(|(preference, exchanges)| MX {
            preference,
            exchanges: exchanges.into_boxed_slice(),
        })))
    }

    async fn raw_lookup(&self, name: &str, rtype: RecordType) -> Option<Vec<RData>> {
        let Some(parsed) = raw_name(name) else {
            return Some(Vec::new());
        };
        match self.resolver.hickory().lookup(parsed, rtype).await {
            Ok(lookup) => Some(lookup.answers().iter().map(|r| r.data.clone()).collect()),
            Err(e) if e.is_no_records_found() => Some(Vec::new()),
            Err(_) => None,
        }
    }

    /// The verdict for an evaluation under the configured actions.
    pub fn verdict(&self, evaluation: &SpfEvaluation, ip: IpAddr) -> Verdict {
        let Some(action) = self.config.action(evaluation.result) else {
            return Verdict::Pass;
        };
        if evaluation.result == SpfResult::TempError && action == CheckAction::TempFail {
            return Verdict::TempFail(refusal(evaluation, ip, true));
        }
        action.verdict(refusal(evaluation, ip, false))
    }
}

impl Check for SpfCheck {
    fn name(&self) -> &'static str {
        "spf"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Mail]
    }

    fn needs_io(&self) -> bool {
        true
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(async move {
            // Authenticated clients send as themselves from anywhere; the upstream decides.
            if !self.config.enabled || cx.session.authenticated.is_some() {
                return Ok(Verdict::Skip);
            }
            let Some(sender) = cx.sender else {
                return Ok(Verdict::Skip);
            };
            let helo = cx.session.helo.as_deref().unwrap_or("").trim();
            let mail_from = match sender.domain.as_deref() {
                Some(domain) if !sender.is_null() => format!("{}@{domain}", sender.local),
                // The null sender (or no domain): the HELO identity, if wanted and given.
                _ if !self.config.check_helo || helo.is_empty() => return Ok(Verdict::Skip),
                _ => String::new(),
            };
            let ip = cx.session.peer.ip().to_canonical();
            // No published SPF record speaks about internal addresses: mail from them is a
            // local relay or a test, and evaluating would only cost lookups.
            if crate::dns::is_internal(ip) {
                return Ok(Verdict::Skip);
            }
            let evaluation = self.evaluate_as(ip, helo, &mail_from, &cx.session.hostname).await;
            tracing::debug!(
                session = %cx.session.id,
                result = %evaluation.result,
                domain = %evaluation.domain,
                identity = evaluation.identity.as_str(),
                "SPF evaluated."
            );
            if let Ok(mut r) = cx.facts.results.lock() {
                r.spf = evaluation.result.to_string();
            }
            if self.config.received_spf_header {
                cx.facts.add_header(received_spf_header(
                    &evaluation,
                    ip,
                    &cx.session.hostname,
                    helo,
                    &mail_from,
                ));
            }
            Ok(self.verdict(&evaluation, ip))
        })
    }
}

// ---------------------------------------------------------------------------------------
// Watching mail-auth's DNS questions.
//
// mail-auth asks a per-evaluation cache before each lookup (`get`) and stores each answer
// it got (`insert`; failed lookups are not stored). The hooks below serve nothing unless
// thassp decided an answer (`Overrides`), and record every question and stored answer in
// order, which tells thassp what mail-auth looked up and what it found.

/// What one evaluation found.
#[derive(Debug)]
struct Found {
    result: SpfResult,
    explanation: Option<String>,
    problem: Option<String>,
}

/// Rounds of evaluation at most (each later one answered from hickory's cache).
const MAX_ROUNDS: usize = 12;
/// RFC 7208 §4.6.4: at most two lookups may find nothing.
const MAX_VOID_LOOKUPS: usize = 2;
/// RFC 7208 §4.6.4: at most ten PTR names are looked at.
const MAX_PTR_NAMES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Txt,
    Mx,
    A,
    Aaaa,
    Ptr,
}

/// A lookup counted for the void-lookup limit.
#[derive(Debug, Clone, Copy)]
enum Question {
    Of(Kind),
    /// `exists`, which mail-auth asks as A, then AAAA.
    Exists,
}

/// What mail-auth stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// A TXT answer holding an SPF record mail-auth parsed.
    Spf,
    /// A TXT answer none of whose records mail-auth could parse.
    SpfUnparsable,
    /// A TXT answer read as an explanation (`exp=`).
    Explanation,
    /// Anything else (addresses, MX, TXT without an SPF record).
    Other,
}

/// One question (`stored` is `None`) or one stored answer.
#[derive(Debug, Clone)]
struct Event {
    kind: Kind,
    /// The name asked (lower case, with the trailing dot); empty for PTR.
    name: String,
    /// Answered by thassp's override.
    served: bool,
    stored: Option<Stored>,
}

impl Event {
    /// An A, AAAA or MX question.
    fn is_address_question(&self) -> bool {
        self.stored.is_none() && matches!(self.kind, Kind::A | Kind::Aaaa | Kind::Mx)
    }

    fn is_answer_to(&self, question: &Event) -> bool {
        self.stored.is_some() && self.kind == question.kind && self.name == question.name
    }
}

/// True when `events[i]` and `events[i + 1]` are one `exists` term: an A question and an
/// AAAA question for the same name in a row, with nothing stored (no other term asks a
/// name as both).
fn is_exists(events: &[Event], i: usize) -> bool {
    match (events.get(i), events.get(i + 1)) {
        (Some(a), Some(aaaa)) => {
            a.stored.is_none()
                && aaaa.stored.is_none()
                && a.kind == Kind::A
                && aaaa.kind == Kind::Aaaa
                && a.name == aaaa.name
        }
        _ => false,
    }
}

/// Answers thassp gives mail-auth instead of a lookup.
#[derive(Default)]
struct Overrides {
    txt: HashMap<Box<str>, Txt>,
    mx: HashMap<Box<str>, RecordSet<MX>>,
    a: HashMap<Box<str>, RecordSet<Ipv4Addr>>,
    aaaa: HashMap<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: Option<RecordSet<Box<str>>>,
}

impl Overrides {
    fn has(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Txt => self.txt.contains_key(name),
            Kind::Mx => self.mx.contains_key(name),
            Kind::A => self.a.contains_key(name),
            Kind::Aaaa => self.aaaa.contains_key(name),
            Kind::Ptr => self.ptr.is_some(),
        }
    }

    /// True when the override for an address question holds nothing (a void lookup).
    fn is_empty_answer(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Mx => self.mx.get(name).is_some_and(|s| s.rrset.is_empty()),
            Kind::A => self.a.get(name).is_some_and(|s| s.rrset.is_empty()),
            Kind::Aaaa => self.aaaa.get(name).is_some_and(|s| s.rrset.is_empty()),
            Kind::Txt | Kind::Ptr => false,
        }
    }
}

/// The record of one evaluation's questions and stored answers.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    fn hook<'r, V>(&'r self, kind: Kind, served: &'r HashMap<Box<str>, V>) -> Hook<'r, V> {
        Hook {
            kind,
            recorder: self,
            served,
        }
    }

    fn push(&self, event: Event) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }

    fn into_events(self) -> Vec<Event> {
        self.events
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How a stored value is recorded.
trait Classify {
    fn stored(&self) -> Stored;
}

impl Classify for Txt {
    fn stored(&self) -> Stored {
        match self {
            Txt::Spf(_) => Stored::Spf,
            Txt::SpfMacro(_) => Stored::Explanation,
            Txt::Error(mail_auth::Error::ParseError) => Stored::SpfUnparsable,
            _ => Stored::Other,
        }
    }
}

impl<T> Classify for RecordSet<T> {
    fn stored(&self) -> Stored {
        Stored::Other
    }
}

/// mail-auth's cache for names: records, and serves only overrides.
struct Hook<'r, V> {
    kind: Kind,
    recorder: &'r Recorder,
    served: &'r HashMap<Box<str>, V>,
}

impl<V: Clone + Classify> ResolverCache<Box<str>, V> for Hook<'_, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let answer = self.served.get(name).cloned();
        self.recorder.push(Event {
            kind: self.kind,
            name: key_text(name).unwrap_or_default(),
            served: answer.is_some(),
            stored: None,
        });
        answer
    }

    fn remove<Q>(&self, _: &Q) -> Option<V>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, name: Box<str>, value: V, _: std::time::Instant) {
        self.recorder.push(Event {
            kind: self.kind,
            name: name.into(),
            served: false,
            stored: Some(value.stored()),
        });
    }
}

/// mail-auth's PTR cache (keyed by the client's address): records, serves the override.
struct PtrHook<'r>(&'r Recorder, Option<&'r RecordSet<Box<str>>>);

impl ResolverCache<IpAddr, RecordSet<Box<str>>> for PtrHook<'_> {
    fn get<Q>(&self, _: &Q) -> Option<RecordSet<Box<str>>>
    where
        IpAddr: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.push(Event {
            kind: Kind::Ptr,
            name: String::new(),
            served: self.1.is_some(),
            stored: None,
        });
        self.1.cloned()
    }

    fn remove<Q>(&self, _: &Q) -> Option<RecordSet<Box<str>>>
    where
        IpAddr: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, _: IpAddr, _: RecordSet<Box<str>>, _: std::time::Instant) {}
}

/// The text of a cache key. mail-auth's cache trait hands over a name only as `&Q` where
/// `Q: Hash` (it is a `str`); std hashes a `str` as its bytes followed by `0xff`, so a
/// hasher that keeps what it is fed gives the text back. A unit test pins this; anything
/// else gives `None` and the name is recorded as empty (it then matches nothing).
fn key_text<Q: Hash + ?Sized>(key: &Q) -> Option<String> {
    #[derive(Default)]
    struct Keep(Vec<u8>);
    impl Hasher for Keep {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
    }
    let mut keep = Keep::default();
    key.hash(&mut keep);
    let text = keep.0.strip_suffix(&[0xff])?;
    String::from_utf8(text.to_vec()).ok()
}

fn record_set<T>(items: impl Iterator<Item = T>) -> RecordSet<T> {
    RecordSet {
        rrset: items.collect::<Vec<T>>().into(),
        dnssec_status: DnssecStatus::Indeterminate,
    }
}

/// A DNS name from text label by label (any octets but `.`), as a macro may produce;
/// over 253 octets, labels are dropped from the left until it fits (RFC 7208 §7.3).
/// `None` when it is not a DNS name (an empty label, a label over 63 octets).
fn raw_name(text: &str) -> Option<Name> {
    let mut text = text.strip_suffix('.').unwrap_or(text);
    while text.len() > 253 {
        text = text.split_once('.')?.1;
    }
    let labels: Vec<&[u8]> = text.split('.').map(str::as_bytes).collect();
    if text.is_empty() || labels.iter().any(|l| l.is_empty() || l.len() > 63) {
        return None;
    }
    Name::from_labels(labels).ok()
}

// ---------------------------------------------------------------------------------------
// RFC 7208 record syntax (§4.5, §4.6, §12), checked on the records mail-auth evaluated:
// mail-auth's parser accepts some records the RFC calls errors (a CIDR length over 32,
// a `:` where a domain ends, a bad modifier name, control characters, non-ASCII).

/// `v=spf1` (any case) followed by a space or the end (RFC 7208 §4.5).
fn is_spf_record(record: &[u8]) -> bool {
    record.len() >= 6
        && record[..6].eq_ignore_ascii_case(b"v=spf1")
        && record.get(6).is_none_or(|&b| b == b' ')
}

/// Checks one SPF record against the RFC 7208 grammar; the error says what is wrong.
fn validate_record(record: &[u8]) -> Result<(), String> {
    if let Some(b) = record.iter().find(|b| !(0x20..0x7f).contains(*b)) {
        return Err(format!("byte 0x{b:02x} is not allowed"));
    }
    let text = String::from_utf8_lossy(record);
    let mut terms = text.split(' ').filter(|t| !t.is_empty());
    if !terms.next().is_some_and(|v| v.eq_ignore_ascii_case("v=spf1")) {
        return Err("it does not start with v=spf1".into());
    }
    let (mut redirect, mut exp) = (false, false);
    for term in terms {
        validate_term(term, &mut redirect, &mut exp).map_err(|e| format!("{}: {e}", printable(term, 64)))?;
    }
    Ok(())
}

/// The modifier name and value of a term that is a modifier (`name=value`, the `=` before
/// any `:` or `/`).
fn as_modifier(term: &str) -> Option<(&str, &str)> {
    let at = term.find([':', '/', '='])?;
    (term.as_bytes()[at] == b'=').then(|| (&term[..at], &term[at + 1..]))
}

fn validate_term(term: &str, redirect: &mut bool, exp: &mut bool) -> Result<(), String> {
    if let Some((name, value)) = as_modifier(term) {
        let mut chars = name.chars();
        if !chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err("not a modifier name".into());
        }
        let seen = match name.to_ascii_lowercase().as_str() {
            "redirect" => Some(redirect),
            "exp" => Some(exp),
            _ => None,
        };
        return match seen {
            Some(seen) if *seen => Err("appears twice".into()),
            Some(seen) => {
                *seen = true;
                domain_spec(value)
            }
            None => macro_string(value).map(drop),
        };
    }
    let body = term.strip_prefix(['+', '-', '~', '?']).unwrap_or(term);
    let split = body.find([':', '/']).unwrap_or(body.len());
    let (mechanism, rest) = body.split_at(split);
    let spec = |rest: &str| match rest.strip_prefix(':') {
        Some(spec) => domain_spec(spec),
        None => Err("needs :domain".to_string()),
    };
    match mechanism.to_ascii_lowercase().as_str() {
        "all" if rest.is_empty() => Ok(()),
        "all" => Err("all takes no argument".into()),
        "include" | "exists" => spec(rest),
        "ptr" if rest.is_empty() => Ok(()),
        "ptr" => spec(rest),
        "a" | "mx" => {
            let rest = dual_cidr(rest)?;
            if rest.is_empty() { Ok(()) } else { spec(rest) }
        }
        "ip4" => {
            let value = rest.strip_prefix(':').ok_or("needs :address")?;
            let (net, len) = value.split_once('/').map_or((value, None), |(n, l)| (n, Some(l)));
            if !is_ip4_network(net) {
                return Err("not an IPv4 address".into());
            }
            len.map_or(Ok(()), |l| cidr(l, 32))
        }
        "ip6" => {
            let value = rest.strip_prefix(':').ok_or("needs :address")?;
            let (net, len) = value.split_once('/').map_or((value, None), |(n, l)| (n, Some(l)));
            if net.parse::<Ipv6Addr>().is_err() {
                return Err("not an IPv6 address".into());
            }
            len.map_or(Ok(()), |l| cidr(l, 128))
        }
        _ => Err("unknown mechanism".into()),
    }
}

/// Strips and checks a trailing `[/ip4-len][//ip6-len]`; returns what comes before it.
fn dual_cidr(rest: &str) -> Result<&str, String> {
    let Some((before, digits)) = tail(rest) else {
        return Ok(rest);
    };
    if let Some(before) = before.strip_suffix('/') {
        cidr(digits, 128)?;
        return match tail(before) {
            Some((before, v4)) => cidr(v4, 32).map(|()| before),
            None => Ok(before),
        };
    }
    cidr(digits, 32).map(|()| before)
}

/// A trailing `/` and digits: (what comes before, the digits).
fn tail(s: &str) -> Option<(&str, &str)> {
    let cut = s.trim_end_matches(|c: char| c.is_ascii_digit());
    if cut.len() == s.len() {
        return None;
    }
    let before = cut.strip_suffix('/')?;
    Some((before, &s[cut.len()..]))
}

/// A CIDR length: digits without a leading zero, at most `max`.
fn cidr(digits: &str, max: u32) -> Result<(), String> {
    let ok = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && digits.parse::<u32>().is_ok_and(|n| n <= max);
    if ok {
        Ok(())
    } else {
        Err(format!("bad CIDR length /{digits}"))
    }
}

/// Four decimal numbers 0–255 without leading zeros.
fn is_ip4_network(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    parts.len() == 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 3
                && p.bytes().all(|b| b.is_ascii_digit())
                && (*p == "0" || !p.starts_with('0'))
                && p.parse::<u8>().is_ok()
        })
}

/// A macro-string (§7.1); returns whether it ends with a macro expansion.
fn macro_string(text: &str) -> Result<bool, String> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut ends_with_macro = false;
    while i < bytes.len() {
        ends_with_macro = bytes[i] == b'%';
        match bytes[i] {
            b'%' => match bytes.get(i + 1) {
                Some(b'%' | b'_' | b'-') => i += 2,
                Some(b'{') => {
                    let close = text[i..].find('}').ok_or("unterminated macro")? + i;
                    macro_body(&text[i + 2..close])?;
                    i = close + 1;
                }
                _ => return Err("bad macro (a % must start %{…}, %%, %_ or %-)".into()),
            },
            0x21..=0x7e => i += 1,
            _ => return Err("bad character".into()),
        }
    }
    Ok(ends_with_macro)
}

/// The inside of `%{…}`: a letter, an optional non-zero count, optional `r`, delimiters.
fn macro_body(body: &str) -> Result<(), String> {
    let mut chars = body.chars();
    if !chars
        .next()
        .is_some_and(|c| "slodiphcrtv".contains(c.to_ascii_lowercase()))
    {
        return Err("unknown macro letter".into());
    }
    let rest = chars.as_str();
    let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let (digits, rest) = rest.split_at(digits_end);
    if !digits.is_empty() && digits.parse::<u32>().is_ok_and(|n| n == 0) {
        return Err("a macro part count must not be zero".into());
    }
    let rest = rest.strip_prefix(['r', 'R']).unwrap_or(rest);
    if rest.chars().all(|c| ".-+,/_=".contains(c)) {
        Ok(())
    } else {
        Err("bad macro transformer or delimiter".into())
    }
}

/// A domain-spec: a macro-string ending in a macro or in `.toplabel` (one trailing dot
/// allowed). A toplabel has a letter, or is alphanumerics joined by hyphens.
fn domain_spec(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("empty domain".into());
    }
    let trimmed = text.strip_suffix('.').unwrap_or(text);
    if macro_string(text)? || macro_string(trimmed)? {
        return Ok(());
    }
    let Some((_, top)) = trimmed.rsplit_once('.') else {
        return Err("not a domain name".into());
    };
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let ok = !top.is_empty()
        && top.chars().all(|c| alnum(c) || c == '-')
        && (top.chars().all(alnum) && top.chars().any(|c| c.is_ascii_alphabetic())
            || top.contains('-') && top.starts_with(alnum) && top.ends_with(alnum));
    if ok {
        Ok(())
    } else {
        Err("the domain does not end in a valid top label".into())
    }
}

/// The record as mail-auth should see it, when that differs from how mail-auth parses it:
/// unknown modifiers left out when mail-auth cannot parse them, and for an IPv4 client
/// every `ip6` that would match the client's IPv4-mapped address made to match nothing.
fn corrected(record: &[u8], ip: IpAddr) -> Option<Spf> {
    let (mut spf, mut changed) = match Spf::parse(record) {
        Ok(spf) => (spf, false),
        Err(_) => (Spf::parse(&without_unknown_modifiers(record)).ok()?, true),
    };
    if let IpAddr::V4(v4) = ip {
        let mapped = u128::from(v4.to_ipv6_mapped());
        for directive in spf.directives.iter_mut() {
            if let Mechanism::Ip6 { addr, mask } = &mut directive.mechanism
                && mapped & *mask == u128::from(*addr) & *mask
            {
                // `::` with a /128: no IPv4-mapped address is that.
                *addr = Ipv6Addr::UNSPECIFIED;
                *mask = u128::MAX;
                changed = true;
            }
        }
    }
    changed.then_some(spf)
}

/// The record with unknown modifiers left out (RFC 7208 §6.3: they are ignored).
fn without_unknown_modifiers(record: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(record);
    let kept: Vec<&str> = text
        .split(' ')
        .filter(|t| !t.is_empty())
        .enumerate()
        // The first term is the version, `v=spf1`, which looks like a modifier.
        .filter(|(i, t)| {
            *i == 0
                || as_modifier(t).is_none_or(|(name, _)| {
                    name.eq_ignore_ascii_case("redirect") || name.eq_ignore_ascii_case("exp")
                })
        })
        .map(|(_, t)| t)
        .collect();
    kept.join(" ").into_bytes()
}

/// The refusal for a result that has an action. `temporary` asks for the 4xx form of a
/// `temperror` (its 5xx form is for operators who set `temperror = "reject"`).
fn refusal(evaluation: &SpfEvaluation, ip: IpAddr, temporary: bool) -> Refusal {
    let domain = printable(&evaluation.domain, TEXT_MAX);
    let reply = match evaluation.result {
        SpfResult::Fail => {
            let mut text = format!("SPF fail: {domain} does not allow [{ip}] to send mail");
            if let Some(exp) = evaluation.explanation.as_deref().map(|e| printable(e, TEXT_MAX))
                && !exp.is_empty()
            {
                text.push_str(&format!(" (see {exp})"));
            }
            Reply::build(550, "5.7.23", text)
        }
        SpfResult::SoftFail => Reply::build(
            550,
            "5.7.1",
            format!("SPF softfail: {domain} does not designate [{ip}] as a permitted sender"),
        ),
        SpfResult::Neutral => Reply::build(
            550,
            "5.7.1",
            format!("SPF neutral: {domain} neither permits nor denies mail from [{ip}]"),
        ),
        SpfResult::None => Reply::build(
            550,
            "5.7.1",
            format!("SPF none: {domain} publishes no SPF record, sender of mail from [{ip}] unverified"),
        ),
        SpfResult::TempError if temporary => Reply::build(
            451,
            "4.7.24",
            format!("SPF temporary error for {domain}, try again later"),
        ),
        SpfResult::TempError => Reply::build(550, "5.7.24", format!("SPF temporary error for {domain}")),
        SpfResult::PermError => {
            let reason = evaluation
                .problem
                .as_deref()
                .map(|p| printable(p, TEXT_MAX))
                .unwrap_or_else(|| "the SPF record is invalid".into());
            Reply::build(
                550,
                "5.7.24",
                format!("SPF permanent error for {domain}: {reason}"),
            )
        }
        // Pass has no action, so never a refusal; this keeps the match total.
        SpfResult::Pass => Reply::build(550, "5.7.1", format!("SPF pass for {domain}")),
    };
    Refusal {
        reply: fit(reply),
        category: Category::SpfFail,
    }
}

/// Longest reply text: an SMTP reply line is at most 512 octets (RFC 5321 §4.5.3.1.5),
/// and the pipeline may append a score note.
const REPLY_TEXT_MAX: usize = 440;

/// Cuts a reply's text (printable ASCII here) to `REPLY_TEXT_MAX`.
fn fit(mut reply: Reply) -> Reply {
    for line in &mut reply.lines {
        if line.len() > REPLY_TEXT_MAX {
            line.truncate(REPLY_TEXT_MAX - 3);
            line.push_str("...");
        }
    }
    reply
}

/// RFC 7208 §4.3: a domain we may look up. Labels of 1 to 63 octets (one trailing dot
/// allowed), at least two labels, at most 253 octets, not an address literal.
fn is_spf_domain(domain: &str) -> bool {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let labels: Vec<&str> = domain.split('.').collect();
    !domain.is_empty()
        && domain.len() <= 253
        && !domain.starts_with('[')
        && labels.len() >= 2
        && labels.iter().all(|l| (1..=63).contains(&l.len()))
}

/// Text from the client or from DNS made safe for a reply or header: printable ASCII only
/// (anything else becomes `?`, so never CR or LF), at most `max` characters.
fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if text.chars().count() > max {
        out.push_str("...");
    }
    out
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The `Received-SPF:` header (RFC 7208 §9.1) for an evaluation, folded into lines of at
/// most 78 characters where possible (never over 998), each ending in CRLF.
pub fn received_spf_header(
    evaluation: &SpfEvaluation,
    ip: IpAddr,
    receiver: &str,
    helo: &str,
    mail_from: &str,
) -> String {
    let receiver = printable(receiver, TEXT_MAX);
    let who = match evaluation.identity {
        Identity::MailFrom => printable(mail_from, TEXT_MAX),
        Identity::Helo => printable(helo, TEXT_MAX),
    };
    let domain = printable(&evaluation.domain, TEXT_MAX);
    let comment = match evaluation.result {
        SpfResult::Pass => format!("{receiver}: domain of {who} designates {ip} as permitted sender"),
        SpfResult::Fail => {
            format!("{receiver}: domain of {who} does not designate {ip} as permitted sender")
        }
        SpfResult::SoftFail => {
            format!("{receiver}: domain of transitioning {who} does not designate {ip} as permitted sender")
        }
        SpfResult::Neutral => {
            format!("{receiver}: {ip} is neither permitted nor denied by domain of {who}")
        }
        SpfResult::None => {
            format!("{receiver}: domain of {who} does not designate permitted sender hosts")
        }
        SpfResult::TempError => {
            format!("{receiver}: temporary error looking up the SPF record of {domain}")
        }
        SpfResult::PermError => {
            format!("{receiver}: permanent error in the SPF record of {domain}")
        }
    };
    let mut tokens: Vec<String> = vec![
        format!("Received-SPF: {}", evaluation.result),
        // The comment is split into words so it can fold; ( ) \ are quoted in a comment.
    ];
    let escaped = comment
        .replace('\\', "\\\\")
        .replace('(', "\\(")
        .replace(')', "\\)");
    let words: Vec<&str> = escaped.split(' ').filter(|w| !w.is_empty()).collect();
    for (i, word) in words.iter().enumerate() {
        let mut w = String::new();
        if i == 0 {
            w.push('(');
        }
        w.push_str(word);
        if i + 1 == words.len() {
            w.push(')');
        }
        tokens.push(w);
    }
    let mut pairs = vec![
        ("receiver", receiver.clone()),
        ("client-ip", ip.to_string()),
        ("envelope-from", printable(mail_from, TEXT_MAX)),
        ("helo", printable(helo, TEXT_MAX)),
        ("identity", evaluation.identity.as_str().to_string()),
    ];
    if let Some(problem) = &evaluation.problem
        && matches!(evaluation.result, SpfResult::PermError | SpfResult::TempError)
    {
        pairs.push(("problem", printable(problem, TEXT_MAX)));
    }
    let last = pairs.len() - 1;
    for (i, (key, value)) in pairs.into_iter().enumerate() {
        let value = if key == "envelope-from" || !is_dot_atom(&value) {
            quoted(&value)
        } else {
            value
        };
        let sep = if i == last { "" } else { ";" };
        tokens.push(format!("{key}={value}{sep}"));
    }
    fold(&tokens)
}

/// RFC 5322 dot-atom: atext runs joined by single dots.
fn is_dot_atom(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|atom| {
            !atom.is_empty()
                && atom
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c))
        })
}

/// RFC 5322 quoted-string of printable text: `"` and `\` are quoted-pairs.
fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Joins header tokens with spaces into lines of at most 78 characters (a token longer
/// than that gets a line of its own); continuation lines start with a tab.
fn fold(tokens: &[String]) -> String {
    const WIDTH: usize = 78;
    let mut out = String::new();
    let mut line_len = 0;
    for (i, token) in tokens.iter().enumerate() {
        if i == 0 {
            out.push_str(token);
            line_len = token.len();
        } else if line_len + 1 + token.len() > WIDTH {
            out.push_str("\r\n\t");
            out.push_str(token);
            line_len = 1 + token.len();
        } else {
            out.push(' ');
            out.push_str(token);
            line_len += 1 + token.len();
        }
    }
    out.push_str("\r\n");
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::dns::DnsConfig;
    use crate::policy::{Exemptions, SessionFacts, SessionInfo};
    use crate::smtp::address::parse_path;

    fn parse(toml_text: &str) -> Result<SpfConfig, String> {
        toml::from_str(toml_text).map_err(|e| e.to_string())
    }

    #[test]
    fn config_defaults_and_keys() {
        let config = parse("").unwrap();
        assert_eq!(config, SpfConfig::default());
        assert!(config.enabled && config.received_spf_header && config.check_helo);
        assert_eq!(config.fail, Some(CheckAction::Reject));
        assert_eq!(config.softfail, Some(CheckAction::Score(2.0)));
        assert_eq!(
            (config.neutral, config.none, config.permerror),
            (None, None, None)
        );
        assert_eq!(config.temperror, Some(CheckAction::TempFail));

        let config = parse(
            r#"
            enabled = false
            fail = "monitor"
            softfail = "off"
            neutral = "score:0.5"
            none = "score:1"
            temperror = "off"
            permerror = "reject"
            received_spf_header = false
            check_helo = false
            "#,
        )
        .unwrap();
        assert!(!config.enabled && !config.received_spf_header && !config.check_helo);
        assert_eq!(config.fail, Some(CheckAction::Monitor));
        assert_eq!(config.softfail, None);
        assert_eq!(config.neutral, Some(CheckAction::Score(0.5)));
        assert_eq!(config.temperror, None);
        assert_eq!(config.permerror, Some(CheckAction::Reject));
        // Round trip through TOML.
        assert_eq!(parse(&toml::to_string(&config).unwrap()).unwrap(), config);

        assert!(parse("fial = \"reject\"").unwrap_err().contains("fial"));
        assert!(parse("fail = \"drop\"").is_err());
        assert!(parse("fail = \"score:x\"").is_err());
        let config = parse("softfail = \"score:5000\"").unwrap();
        assert_eq!(
            config.validate("checks.spf"),
            vec!["checks.spf.softfail: score 5000 is out of range (-1000 to 1000)"]
        );
    }

    /// A resolver whose server never answers: for paths that must not ask DNS.
    fn dead_resolver() -> Arc<Resolver> {
        let config = DnsConfig {
            servers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: Duration::from_millis(200),
            attempts: 1,
            check_deadline: Duration::from_millis(500),
            cache_size: 16,
        };
        Arc::new(Resolver::new(&config).unwrap())
    }

    fn build(config: &SpfConfig) -> SpfCheck {
        SpfCheck::build(config, dead_resolver()).unwrap()
    }

    fn eval(result: SpfResult) -> SpfEvaluation {
        SpfEvaluation {
            result,
            domain: "example.org".into(),
            identity: Identity::MailFrom,
            explanation: None,
            problem: None,
        }
    }

    fn reply_of(v: &Verdict) -> String {
        let r = match v {
            Verdict::Reject(r) | Verdict::TempFail(r) | Verdict::Monitor(r) => r,
            Verdict::Score { refusal, .. } => refusal,
            other => panic!("no refusal in {other:?}"),
        };
        assert_eq!(r.category, Category::SpfFail);
        String::from_utf8(r.reply.to_bytes()).unwrap()
    }

    #[tokio::test]
    async fn build_rejects_bad_config() {
        let config = SpfConfig {
            fail: Some(CheckAction::Score(f32::MAX)),
            ..SpfConfig::default()
        };
        let errors = SpfCheck::build(&config, dead_resolver()).unwrap_err();
        assert!(errors[0].starts_with("checks.spf.fail: "), "{errors:?}");
    }

    #[tokio::test]
    async fn results_map_to_actions_and_replies() {
        let check = build(&SpfConfig::default());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(check.verdict(&eval(SpfResult::Pass), ip), Verdict::Pass);
        for off in [SpfResult::Neutral, SpfResult::None, SpfResult::PermError] {
            assert_eq!(check.verdict(&eval(off), ip), Verdict::Pass, "{off}");
        }

        let mut fail = eval(SpfResult::Fail);
        let v = check.verdict(&fail, ip);
        assert!(matches!(v, Verdict::Reject(_)));
        assert_eq!(
            reply_of(&v),
            "550 5.7.23 SPF fail: example.org does not allow [192.0.2.7] to send mail\r\n"
        );
        // The explanation is the domain's text: shown, but never with control characters.
        fail.explanation = Some("See http://example.org/why\r\n250 ok".into());
        assert_eq!(
            reply_of(&check.verdict(&fail, ip)),
            "550 5.7.23 SPF fail: example.org does not allow [192.0.2.7] to send mail \
             (see See http://example.org/why??250 ok)\r\n"
        );

        // However long the domain and its explanation, the reply line stays within 512.
        fail.domain = "d".repeat(300);
        fail.explanation = Some("x".repeat(1000));
        assert!(reply_of(&check.verdict(&fail, ip)).len() <= 460);

        let v = check.verdict(&eval(SpfResult::TempError), ip);
        assert!(matches!(v, Verdict::TempFail(_)));
        assert_eq!(
            reply_of(&v),
            "451 4.7.24 SPF temporary error for example.org, try again later\r\n"
        );
        let v = check.verdict(&eval(SpfResult::SoftFail), ip);
        assert!(matches!(v, Verdict::Score { points, .. } if points == 2.0));
        assert!(reply_of(&v).starts_with("550 5.7.1 SPF softfail: example.org "));

        let strict = build(&SpfConfig {
            fail: Some(CheckAction::TempFail),
            neutral: Some(CheckAction::Monitor),
            none: Some(CheckAction::Score(1.0)),
            temperror: Some(CheckAction::Reject),
            permerror: Some(CheckAction::Reject),
            ..SpfConfig::default()
        });
        let v = strict.verdict(&eval(SpfResult::Fail), ip);
        assert!(matches!(v, Verdict::TempFail(_)));
        assert!(reply_of(&v).starts_with("450 4.7.23 SPF fail: "));
        assert!(matches!(
            strict.verdict(&eval(SpfResult::Neutral), ip),
            Verdict::Monitor(_)
        ));
        assert!(matches!(
            strict.verdict(&eval(SpfResult::None), ip),
            Verdict::Score { .. }
        ));
        let v = strict.verdict(&eval(SpfResult::TempError), ip);
        assert_eq!(reply_of(&v), "550 5.7.24 SPF temporary error for example.org\r\n");
        let mut perm = eval(SpfResult::PermError);
        perm.problem = Some("example.org has 2 SPF records".into());
        assert_eq!(
            reply_of(&strict.verdict(&perm, ip)),
            "550 5.7.24 SPF permanent error for example.org: example.org has 2 SPF records\r\n"
        );
    }

    fn header_lines(h: &str) -> Vec<&str> {
        assert!(h.ends_with("\r\n"), "{h:?}");
        let lines: Vec<&str> = h[..h.len() - 2].split("\r\n").collect();
        for (i, line) in lines.iter().enumerate() {
            assert!(!line.contains(['\r', '\n']), "bare CR or LF in {line:?}");
            assert!(line.len() <= 998, "line of {} octets", line.len());
            assert!(i == 0 || line.starts_with('\t'), "continuation {line:?}");
        }
        lines
    }

    #[test]
    fn received_spf_header_format() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let h = received_spf_header(
            &eval(SpfResult::Pass),
            ip,
            "mx.example.net",
            "mail.example.org",
            "a@example.org",
        );
        assert_eq!(
            h,
            "Received-SPF: pass (mx.example.net: domain of a@example.org designates\r\n\
             \t192.0.2.1 as permitted sender) receiver=mx.example.net; client-ip=192.0.2.1;\r\n\
             \tenvelope-from=\"a@example.org\"; helo=mail.example.org; identity=mailfrom\r\n"
        );
        header_lines(&h);

        // The HELO identity of a bounce, an IPv6 client (quoted: `:` is not atext), a
        // problem for permerror, and a HELO that needs quoting.
        let mut perm = eval(SpfResult::PermError);
        perm.identity = Identity::Helo;
        perm.domain = "helo.example".into();
        perm.problem = Some("invalid SPF record at helo.example: x: unknown mechanism".into());
        let ip6: IpAddr = "2001:db8::1".parse().unwrap();
        let h = received_spf_header(&perm, ip6, "mx.example.net", "helo \"x\" (y)", "");
        let unfolded = h.replace("\r\n\t", " ");
        assert!(unfolded.starts_with("Received-SPF: permerror (mx.example.net: permanent error in"));
        assert!(unfolded.contains("client-ip=\"2001:db8::1\";"), "{h}");
        assert!(unfolded.contains("envelope-from=\"\";"), "{h}");
        assert!(unfolded.contains("helo=\"helo \\\"x\\\" (y)\";"), "{h}");
        assert!(unfolded.contains(
            "identity=helo; problem=\"invalid SPF record at helo.example: x: unknown mechanism\"\r\n"
        ));
        header_lines(&h);

        // Hostile input: CR/LF, non-ASCII, parentheses in the comment, huge values.
        let long = format!("{}\r\nX-Injected: yes ({})", "h".repeat(3000), "é".repeat(500));
        let mut fail = eval(SpfResult::Fail);
        fail.domain = long.clone();
        let h = received_spf_header(&fail, ip, &long, &long, &format!("{long}@{long}"));
        let lines = header_lines(&h);
        assert!(!lines.iter().any(|l| l.starts_with("X-Injected")));
        let mut helo = eval(SpfResult::Neutral);
        helo.identity = Identity::Helo;
        let h = received_spf_header(&helo, ip, "mx", "a(b)\\c", "");
        assert!(
            h.contains(" a\\(b\\)\\\\c)"),
            "( ) \\ are quoted in a comment: {h}"
        );
    }

    #[test]
    fn record_syntax() {
        for ok in [
            "v=spf1",
            "v=spf1 -all",
            "V=SPF1 ip4:192.0.2.0/24 ip6:2001:db8::/32 a mx/24 a:mail.example.com//64 ~all",
            "v=spf1 include:_spf.example.com exists:%{ir}.%{v}._spf.%{d2} -all",
            "v=spf1 a/24//64 mx:foo.example.com/0 ptr ptr:example.com ?all",
            "v=spf1 redirect=%{d}.d.spf.example.com. exp=explain.%{d}",
            "v=spf1 moo.cow-far_out=man:dog/cat ip4:1.2.3.4 -all",
            "v=spf1 a:foo:bar/baz.example.com a:foo.example.xn--zckzah default=pass",
            "v=spf1 exists:%{l2r+-}.user.%{d2} a:macro%%percent%_%_space%-url-space.example.com",
            "v=spf1  a   -all  ",
        ] {
            assert_eq!(validate_record(ok.as_bytes()), Ok(()), "{ok}");
        }
        for bad in [
            "v=spf1 ip4:1.2.3.4 -all moo",
            "v=spf1 a/33",
            "v=spf1 a//129",
            "v=spf1 a/24/64",
            "v=spf1 ip4:1.2.3.4/032",
            "v=spf1 ip4:1.2.3",
            "v=spf1 ip4:1.2.3.4//32",
            "v=spf1 ip6::CAFE::BABE",
            "v=spf1 -all.",
            "v=spf1 -all:foobar",
            "v=spf1 ptr/0",
            "v=spf1 include",
            "v=spf1 include:",
            "v=spf1 a:museum",
            "v=spf1 a:museum.",
            "v=spf1 a:111.222.33.44",
            "v=spf1 a:example.-com",
            "v=spf1 a:foo-bar",
            "v=spf1 a:example.com:8080",
            "v=spf1 moo.cow/far_out=man:dog/cat",
            "v=spf1 1up=foo",
            "v=spf1 =all",
            "v=spf1 foo=%abc",
            "v=spf1 exp=",
            "v=spf1 redirect=-all ?all",
            "v=spf1 exp=a.example.com exp=b.example.com",
            "v=spf1 exists:%(ir).sbl.example.com",
            "v=spf1 exists:foo%.sbl.example.com",
            "v=spf1 a:%{d0}.example.com",
            "v=spf1 a:ctrl.example.com\rptr -all",
            "v=spf1 a:\u{feff}garbage.example.net",
        ] {
            assert!(
                validate_record(bad.as_bytes()).is_err(),
                "{bad:?} should be invalid"
            );
        }
        assert!(is_spf_record(b"v=spf1") && is_spf_record(b"V=Spf1 -all"));
        assert!(!is_spf_record(b"v=spf10") && !is_spf_record(b"v=spf1-all") && !is_spf_record(b"spf1"));
        assert_eq!(
            without_unknown_modifiers(b"v=spf1 moo.cow=x a redirect=r.example exp=e.example foo=bar -all"),
            b"v=spf1 a redirect=r.example exp=e.example -all".to_vec()
        );
    }

    #[test]
    fn names() {
        // mail-auth passes cache keys as `&str`; the recorder reads them back.
        assert_eq!(key_text("example.com.").as_deref(), Some("example.com."));
        let boxed: Box<str> = "Ab.example.".into();
        assert_eq!(key_text::<str>(boxed.borrow()).as_deref(), Some("Ab.example."));
        assert_eq!(key_text(&42u32), None);

        assert!(is_spf_domain("example.com") && is_spf_domain("example.com."));
        for bad in [
            "",
            "com",
            "a..example.com",
            "[1.2.3.5]",
            &format!("{}.com", "a".repeat(64)),
        ] {
            assert!(!is_spf_domain(bad), "{bad:?}");
        }
        assert!(raw_name("macro%percent  space.example.com.").is_some());
        assert!(raw_name("mail.example...com").is_none());
        assert!(raw_name(&format!("{}.example.com", "a".repeat(64))).is_none());
        let long = format!("{}example.com.", "abcdefghi.".repeat(30));
        let name = raw_name(&long).unwrap();
        assert!(
            name.len() <= 255 && name.to_ascii().ends_with("abcdefghi.example.com."),
            "{name}"
        );
        assert_eq!(printable("a\r\nb\u{e9}", 10), "a??b?");
        assert_eq!(printable("abcdef", 3), "abc...");
    }

    /// A DNS server on 127.0.0.1 (UDP) with one SPF record and one exp text.
    async fn stub_dns() -> SocketAddr {
        use hickory_proto::op::{Message, OpCode, ResponseCode};
        use hickory_proto::rr::Record;
        use hickory_proto::rr::rdata::TXT;

        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries.first().cloned() else {
                    continue;
                };
                let qname = q.name().clone();
                let mut resp = Message::response(query.metadata.id, OpCode::Query);
                resp.metadata.recursion_desired = query.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                let rtype = q.query_type();
                resp.add_query(q);
                let txt = |text: &str| {
                    Record::from_rdata(qname.clone(), 60, RData::TXT(TXT::new(vec![text.into()])))
                };
                match (qname.to_ascii().to_ascii_lowercase().as_str(), rtype) {
                    ("example.org.", RecordType::TXT) => {
                        resp.add_answer(txt("v=spf1 ip4:192.0.2.1 exp=why.example.org -all"));
                    }
                    ("why.example.org.", RecordType::TXT) => {
                        resp.add_answer(txt("%{i} may not send for %{d}"));
                    }
                    ("example.org." | "why.example.org.", _) => {}
                    _ => resp.metadata.response_code = ResponseCode::NXDomain,
                }
                let _ = sock.send_to(&resp.to_vec().unwrap(), from).await;
            }
        });
        addr
    }

    fn session(peer: &str, helo: &str) -> SessionInfo {
        SessionInfo {
            id: "t".into(),
            peer: format!("{peer}:1234").parse().unwrap(),
            local: "127.0.0.1:25".parse().unwrap(),
            hostname: "mx.example.net".into(),
            helo: Some(helo.into()),
            esmtp: true,
            authenticated: None,
            tls: None,
            proxied_by: None,
            health_check: false,
        }
    }

    async fn run(check: &SpfCheck, info: &SessionInfo, sender: &str) -> (Verdict, Vec<String>) {
        let facts = SessionFacts::default();
        let exempt = Exemptions::default();
        let (sender, _) = parse_path(sender).unwrap();
        let cx = Context {
            stage: Stage::Mail,
            session: info,
            sender: Some(&sender),
            recipient: None,
            recipients: &[],
            message: None,
            facts: &facts,
            exempt: &exempt,
        };
        let verdict = check.check(&cx).await.unwrap();
        let headers = facts.headers.lock().unwrap().clone();
        (verdict, headers)
    }

    #[tokio::test]
    async fn check_in_a_session() {
        let dns = DnsConfig {
            servers: vec![stub_dns().await],
            timeout: Duration::from_millis(500),
            attempts: 1,
            check_deadline: Duration::from_secs(2),
            cache_size: 64,
        };
        let check = SpfCheck::build(&SpfConfig::default(), Arc::new(Resolver::new(&dns).unwrap())).unwrap();
        assert_eq!(
            (check.name(), check.stages(), check.needs_io()),
            ("spf", &[Stage::Mail][..], true)
        );

        let (v, headers) = run(
            &check,
            &session("192.0.2.1", "mail.example.org"),
            "<a@example.org>",
        )
        .await;
        assert_eq!(v, Verdict::Pass);
        assert_eq!(headers.len(), 1);
        assert!(headers[0].starts_with("Received-SPF: pass (mx.example.net: domain of a@example.org"));

        // An IPv4-mapped peer is the IPv4 client; the explanation is expanded.
        let (v, headers) = run(
            &check,
            &session("[::ffff:192.0.2.9]", "x.example"),
            "<b@Example.ORG>",
        )
        .await;
        assert_eq!(
            reply_of(&v),
            "550 5.7.23 SPF fail: example.org does not allow [192.0.2.9] to send mail \
             (see 192.0.2.9 may not send for example.org)\r\n"
        );
        assert!(headers[0].starts_with("Received-SPF: fail "), "{headers:?}");

        // The null sender checks the HELO name: example.org's record, as postmaster.
        let (v, _) = run(&check, &session("192.0.2.9", "example.org"), "<>").await;
        assert!(matches!(v, Verdict::Reject(_)), "{v:?}");
        let (v, headers) = run(&check, &session("192.0.2.9", "nospf.example"), "<>").await;
        assert_eq!(v, Verdict::Pass);
        assert!(headers[0].starts_with("Received-SPF: none "), "{headers:?}");

        // Skipped: authenticated sessions, and bounces when check_helo is off.
        let mut authed = session("192.0.2.9", "example.org");
        authed.authenticated = Some("user".into());
        assert_eq!(
            run(&check, &authed, "<a@example.org>").await,
            (Verdict::Skip, vec![])
        );
        let quiet = SpfCheck::build(
            &SpfConfig {
                check_helo: false,
                received_spf_header: false,
                ..SpfConfig::default()
            },
            check.resolver.clone(),
        )
        .unwrap();
        assert_eq!(
            run(&quiet, &session("192.0.2.9", "example.org"), "<>").await,
            (Verdict::Skip, vec![])
        );
        let (v, headers) = run(&quiet, &session("192.0.2.9", "x.example"), "<a@example.org>").await;
        assert!(matches!(v, Verdict::Reject(_)) && headers.is_empty());
    }
}
