//! The `dkim` check (`[checks.dkim]`, stage DATA): verifies the message's DKIM signatures
//! (RFC 6376), evaluates the author domain's DMARC policy (RFC 7489) with the SPF result of
//! the envelope, and adds one RFC 8601 `Authentication-Results:` header with SPF, DKIM and
//! DMARC to relayed mail. Actions are configurable; by default everything is only logged
//! (`monitor`), and a domain's `p=reject` is honoured only when `dmarc_reject = "reject"`.
//!
//! The verifier is mail-auth (pinned, see DEPENDENCIES.md §1). Every use of mail-auth for
//! DKIM and DMARC is in this file (SPF's is in `spf.rs`), so a later upgrade touches these
//! two files only; the types this file exports are thassp's own. mail-auth shares the
//! process's hickory resolver (servers, timeouts and response cache of `[dns]`).
//!
//! SPF for DMARC: the `spf` check (stage MAIL) records its result in the session facts; that
//! result and the envelope domain (MAIL FROM's, or the HELO name for the null sender) are
//! given to mail-auth's DMARC evaluation as they are, with no second lookup. Only when the
//! `spf` check did not run for the transaction (disabled, exempted) does this check evaluate
//! SPF itself, with mail-auth on the same resolver (without `spf.rs`'s RFC 7208
//! corrections, which matter for the rare records mail-auth misjudges).
//!
//! Bounded work: at most `max_signatures` signatures are verified (one key lookup each);
//! signatures with a body length (`l=`) are refused by mail-auth's strict parser, so the
//! body is hashed at most four times (two canonicalisations, two hashes); a signature
//! whose header list would make the header selection too costly (a crafted `h=` of
//! thousands of names over thousands of headers) is not verified (`policy`); the whole
//! evaluation runs under the resolver's check deadline (`[dns] check_deadline`).

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine as _;
use mail_auth::common::crypto::{Algorithm, Ed25519Key};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{DkimError, DkimSigner};
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, DmarcResult, Error as MailAuthError, MessageAuthenticator,
    Parameters, SpfOutput, SpfResult as MailAuthSpf,
};
use serde::{Deserialize, Serialize};

use super::helo::optional_action;
use super::spf::SpfResult;
use super::{BoxFuture, Category, Check, CheckAction, CheckError, Context, Refusal, Stage, Verdict};
use crate::dns::Resolver;
use crate::smtp::codec::Reply;

/// `[checks.dkim]`: DKIM verification, DMARC evaluation and the `Authentication-Results:`
/// header. Each action is `reject`, `tempfail`, `score:N`, `monitor` or `"off"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// Run the check. Default true.
    pub enabled: bool,
    /// The message carries DKIM signatures and none verifies (a signature fails, or is
    /// broken: no key, malformed, expired). Default "monitor" (`550 5.7.20`): mailing lists
    /// and forwarders break signatures all the time, so this is rarely worth refusing.
    #[serde(with = "optional_action")]
    pub dkim_fail: Option<CheckAction>,
    /// DMARC fails and the author domain's policy is `p=reject`. Default "monitor"
    /// (`550 5.7.26`, logged only); set "reject" to honour the domain's `p=reject`.
    #[serde(with = "optional_action")]
    pub dmarc_reject: Option<CheckAction>,
    /// DMARC fails and the author domain's policy is `p=quarantine`. Default "monitor";
    /// e.g. "score:3" to count it towards the message's score.
    #[serde(with = "optional_action")]
    pub dmarc_quarantine: Option<CheckAction>,
    /// Add one RFC 8601 `Authentication-Results:` header (SPF, DKIM and DMARC) to relayed
    /// mail. Default true.
    pub authentication_results: bool,
    /// Signatures verified per message, at most (1 to 50); further ones are not verified
    /// and not reported. Default 5.
    pub max_signatures: usize,
}

impl Default for DkimConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dkim_fail: Some(CheckAction::Monitor),
            dmarc_reject: Some(CheckAction::Monitor),
            dmarc_quarantine: Some(CheckAction::Monitor),
            authentication_results: true,
            max_signatures: 5,
        }
    }
}

/// Largest `max_signatures`: each signature costs a DNS lookup and a public-key operation.
const MAX_SIGNATURES_LIMIT: usize = 50;

impl DkimConfig {
    /// Every problem, each prefixed with `key` (e.g. `checks.dkim`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, action) in [
            ("dkim_fail", self.dkim_fail),
            ("dmarc_reject", self.dmarc_reject),
            ("dmarc_quarantine", self.dmarc_quarantine),
        ] {
            if let Some(CheckAction::Score(n)) = action
                && !(-1000.0..=1000.0).contains(&n)
            {
                errors.push(format!("{key}.{name}: score {n} is out of range (-1000 to 1000)"));
            }
        }
        // 0 would make DMARC fail every message that passes only through DKIM.
        if !(1..=MAX_SIGNATURES_LIMIT).contains(&self.max_signatures) {
            errors.push(format!(
                "{key}.max_signatures: {} is out of range (1 to {MAX_SIGNATURES_LIMIT})",
                self.max_signatures
            ));
        }
        errors
    }
}

/// An RFC 8601 result for DKIM or DMARC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthStatus {
    Pass,
    Fail,
    /// DKIM: the signature could not be processed (malformed, expired).
    Neutral,
    /// Nothing to evaluate: no signature, no DMARC record, no author domain.
    None,
    /// A DNS failure (timeout, SERVFAIL) kept the result open.
    TempError,
    /// A lasting error: no or a revoked key, an unsupported algorithm, a broken record.
    PermError,
    /// DKIM: a signature thassp declined to verify (RFC 8301 `rsa-sha1`, too costly).
    Policy,
}

impl AuthStatus {
    /// The RFC 8601 name: `pass`, `fail`, `neutral`, `none`, `temperror`, `permerror`,
    /// `policy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Neutral => "neutral",
            Self::None => "none",
            Self::TempError => "temperror",
            Self::PermError => "permerror",
            Self::Policy => "policy",
        }
    }
}

impl std::fmt::Display for AuthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one DKIM signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureResult {
    pub status: AuthStatus,
    /// The signing domain (`d=`); empty for a signature too malformed to parse.
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    /// The algorithm (`a=`): `rsa-sha256`, `ed25519-sha256`, `rsa-sha1`.
    pub algorithm: &'static str,
    /// The first 8 characters of the signature (`b=`), which tell signatures of one
    /// domain and selector apart (RFC 6008).
    pub b: String,
    /// Why it did not pass, when it did not.
    pub reason: Option<String>,
}

/// The DMARC outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcEvaluation {
    pub status: AuthStatus,
    /// The author domain (RFC 5322 From), lower case; empty when there is none or several.
    pub from_domain: String,
    /// The policy that applies to the author domain (after `sp=`/`np=` and `t=y`): `none`,
    /// `quarantine`, `reject`; `None` without a record.
    pub policy: Option<&'static str>,
}

/// The SPF result the evaluation used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfUsed {
    pub result: SpfResult,
    /// The domain checked: MAIL FROM's, or the HELO name for the null sender.
    pub domain: String,
    /// True when the domain is the HELO name (the null sender).
    pub helo_identity: bool,
}

/// What one message's evaluation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub spf: SpfUsed,
    /// The verified signatures, then the unparsable ones, in message order.
    pub signatures: Vec<SignatureResult>,
    pub dmarc: DmarcEvaluation,
    /// The evaluation ran out of time (`[dns] check_deadline`): nothing was decided.
    pub timed_out: bool,
}

impl Evaluation {
    /// The message's DKIM result in one word: `pass` when a signature passes, else the
    /// most telling of the others (`fail`, `temperror`, `permerror`, `neutral`, `policy`),
    /// `none` without signatures.
    pub fn dkim(&self) -> AuthStatus {
        const ORDER: [AuthStatus; 6] = [
            AuthStatus::Pass,
            AuthStatus::Fail,
            AuthStatus::TempError,
            AuthStatus::PermError,
            AuthStatus::Neutral,
            AuthStatus::Policy,
        ];
        ORDER
            .into_iter()
            .find(|s| self.signatures.iter().any(|sig| sig.status == *s))
            .unwrap_or(AuthStatus::None)
    }

    /// Signatures are present, none passes, and one failed or is broken (a DNS failure is
    /// not counted: it says nothing about the message).
    pub fn dkim_failed(&self) -> bool {
        !self.signatures.iter().any(|s| s.status == AuthStatus::Pass)
            && self.signatures.iter().any(|s| {
                matches!(
                    s.status,
                    AuthStatus::Fail | AuthStatus::PermError | AuthStatus::Neutral
                )
            })
    }

    /// Neither DKIM nor DMARC could be evaluated (DNS failures or the deadline): the check
    /// cannot decide, and the pipeline's `on_error` does.
    pub fn undecided(&self) -> bool {
        let dkim_open =
            !self.signatures.is_empty() && self.signatures.iter().all(|s| s.status == AuthStatus::TempError);
        self.timed_out || (dkim_open && self.dmarc.status == AuthStatus::TempError)
    }
}

/// The envelope of the message being evaluated.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// The client's address.
    pub ip: IpAddr,
    /// The HELO/EHLO name.
    pub helo: &'a str,
    /// The MAIL FROM address (`local@domain`); empty for the null sender.
    pub mail_from: &'a str,
    /// The `spf` check's result for this transaction; `None` when it did not run, and this
    /// check evaluates SPF itself.
    pub spf: Option<SpfResult>,
    /// Our host name (the checking host for SPF).
    pub receiver: &'a str,
}

/// The DKIM/DMARC check. Cheap to share; one per configuration.
pub struct DkimCheck {
    config: DkimConfig,
    resolver: Arc<Resolver>,
    authenticator: MessageAuthenticator,
}

impl std::fmt::Debug for DkimCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimCheck")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Most names a signature's `h=` may list to be verified (real signers list 10–30).
const MAX_SIGNED_HEADERS: usize = 200;
/// Most (`h=` names × message headers) comparisons mail-auth's header selection may make
/// for one signature.
const HEADER_WORK_BUDGET: usize = 2_000_000;
/// Longest text taken from the message or DNS into a header value or reply.
const TEXT_MAX: usize = 255;

impl DkimCheck {
    /// Builds the check on the process resolver (mail-auth gets a clone of the shared
    /// hickory resolver: same servers, options and cache).
    pub fn build(config: &DkimConfig, resolver: Arc<Resolver>) -> Result<Self, Vec<String>> {
        let errors = config.validate("checks.dkim");
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
    pub fn config(&self) -> &DkimConfig {
        &self.config
    }

    /// Verifies `message` (unstuffed, CRLF line ends) and evaluates DMARC for `envelope`.
    /// Bounded by the resolver's check deadline; running out gives `timed_out` with every
    /// result `temperror`.
    pub async fn evaluate(&self, message: &[u8], envelope: &Envelope<'_>) -> Evaluation {
        let deadline = self.resolver.check_deadline();
        match tokio::time::timeout(deadline, self.run(message, envelope)).await {
            Ok(evaluation) => evaluation,
            Err(_) => Evaluation {
                spf: spf_used(envelope, envelope.spf.unwrap_or(SpfResult::TempError)),
                signatures: vec![SignatureResult {
                    status: AuthStatus::TempError,
                    domain: String::new(),
                    selector: String::new(),
                    algorithm: "",
                    b: String::new(),
                    reason: Some(format!("took longer than {} s", deadline.as_secs_f32())),
                }],
                dmarc: DmarcEvaluation {
                    status: AuthStatus::TempError,
                    from_domain: String::new(),
                    policy: None,
                },
                timed_out: true,
            },
        }
    }

    async fn run(&self, message: &[u8], envelope: &Envelope<'_>) -> Evaluation {
        let (spf, spf_output) = self.spf(envelope).await;
        let Some(mut parsed) = AuthenticatedMessage::parse(message) else {
            // No header section: nothing is signed and there is no author domain.
            return Evaluation {
                spf,
                signatures: Vec::new(),
                dmarc: DmarcEvaluation {
                    status: AuthStatus::None,
                    from_domain: String::new(),
                    policy: None,
                },
                timed_out: false,
            };
        };

        // Bound the work before mail-auth does any (see the module docs).
        let max = self.config.max_signatures;
        if parsed.dkim_headers.len() > max {
            tracing::debug!(
                signatures = parsed.dkim_headers.len(),
                max,
                "Only the first DKIM signatures are verified."
            );
        }
        parsed.dkim_headers.truncate(max);
        parsed.errors.truncate(max);
        let header_count = parsed.headers.len();
        let mut declined = Vec::new();
        parsed.dkim_headers.retain(|h| {
            let names = h.header.h.len();
            let affordable =
                names <= MAX_SIGNED_HEADERS && names.saturating_mul(header_count) <= HEADER_WORK_BUDGET;
            if !affordable {
                declined.push(signature_result(
                    &h.header,
                    AuthStatus::Policy,
                    Some(format!("{names} signed header fields is too many to verify")),
                ));
            }
            affordable
        });

        let outputs = self.authenticator.verify_dkim(Parameters::new(&parsed)).await;
        // RFC 8301 §3.1: rsa-sha1 signatures are not valid. Downgraded before DMARC sees
        // them, so they cannot align either. (mail-auth lends the signature only for the
        // output's own lifetime, so it is found again in the parsed message.)
        let outputs: Vec<DkimOutput<'_>> = outputs
            .into_iter()
            .map(|output| {
                let sha1 = output
                    .signature()
                    .filter(|sig| sig.a == Algorithm::RsaSha1 && *output.result() == DkimResult::Pass)
                    .and_then(|sig| parsed.dkim_headers.iter().find(|h| std::ptr::eq(&h.header, sig)));
                match sha1 {
                    Some(h) => DkimOutput::perm_err(MailAuthError::Dkim(DkimError::UnsupportedAlgorithm))
                        .with_signature(&h.header),
                    None => output,
                }
            })
            .collect();
        let dmarc = self
            .authenticator
            .verify_dmarc(Parameters::new(DmarcParameters {
                message: &parsed,
                dkim_output: &outputs,
                dkim2_output: None,
                rfc5321_mail_from_domain: &spf.domain,
                spf_output: &spf_output,
            }))
            .await;

        // Signed first (message order), then the unparsable ones mail-auth lists first.
        let mut signatures: Vec<SignatureResult> = outputs
            .iter()
            .filter_map(|o| o.signature().map(|sig| (o, sig)))
            .map(|(o, sig)| {
                let (status, reason) = dkim_status(o.result());
                signature_result(sig, status, reason)
            })
            .collect();
        signatures.extend(declined);
        signatures.extend(outputs.iter().filter(|o| o.signature().is_none()).map(|o| {
            let (status, reason) = dkim_status(o.result());
            SignatureResult {
                status,
                domain: String::new(),
                selector: String::new(),
                algorithm: "",
                b: String::new(),
                reason,
            }
        }));

        let status = match dmarc.result() {
            DmarcResult::Pass => AuthStatus::Pass,
            DmarcResult::Fail(_) => AuthStatus::Fail,
            DmarcResult::TempError(_) => AuthStatus::TempError,
            DmarcResult::PermError(_) => AuthStatus::PermError,
            DmarcResult::None => AuthStatus::None,
        };
        let policy = dmarc.dmarc_record().map(|_| match dmarc.policy() {
            Policy::Reject => "reject",
            Policy::Quarantine => "quarantine",
            Policy::None | Policy::Unspecified => "none",
        });
        Evaluation {
            spf,
            signatures,
            dmarc: DmarcEvaluation {
                status,
                from_domain: dmarc.domain().to_ascii_lowercase(),
                policy,
            },
            timed_out: false,
        }
    }

    /// The SPF result for DMARC: the `spf` check's, or (when it did not run) mail-auth's.
    async fn spf(&self, envelope: &Envelope<'_>) -> (SpfUsed, SpfOutput) {
        let helo = envelope.helo.trim();
        let result = match envelope.spf {
            Some(result) => result,
            None => {
                let used = spf_used(envelope, SpfResult::None);
                if used.domain.is_empty() {
                    SpfResult::None
                } else {
                    let params = if used.helo_identity {
                        SpfParameters::verify_ehlo(envelope.ip, helo, envelope.receiver)
                    } else {
                        SpfParameters::verify_mail_from(
                            envelope.ip,
                            helo,
                            envelope.receiver,
                            envelope.mail_from,
                        )
                    };
                    let output = self.authenticator.verify_spf(Parameters::new(params)).await;
                    from_mail_auth_spf(output.result())
                }
            }
        };
        let used = spf_used(envelope, result);
        let output = SpfOutput::new(used.domain.clone()).with_result(to_mail_auth_spf(result));
        (used, output)
    }

    /// The verdict for an evaluation under the configured actions: the stronger of the
    /// DKIM and the DMARC one (two scores add up).
    pub fn verdict(&self, evaluation: &Evaluation) -> Verdict {
        let dkim = self
            .config
            .dkim_fail
            .filter(|_| evaluation.dkim_failed())
            .map(|action| (action, dkim_refusal(evaluation)));
        let dmarc = match (evaluation.dmarc.status, evaluation.dmarc.policy) {
            (AuthStatus::Fail, Some("reject")) => self.config.dmarc_reject,
            (AuthStatus::Fail, Some("quarantine")) => self.config.dmarc_quarantine,
            _ => None,
        }
        .map(|action| (action, dmarc_refusal(evaluation)));
        match (dmarc, dkim) {
            (None, None) => Verdict::Pass,
            (Some((action, refusal)), None) | (None, Some((action, refusal))) => action.verdict(refusal),
            (Some((CheckAction::Score(a), refusal)), Some((CheckAction::Score(b), _))) => {
                CheckAction::Score(a + b).verdict(refusal)
            }
            (Some((a, ra)), Some((b, rb))) => {
                if strength(b) > strength(a) {
                    b.verdict(rb)
                } else {
                    a.verdict(ra)
                }
            }
        }
    }
}

/// How strong an action is, for choosing between two.
fn strength(action: CheckAction) -> u8 {
    match action {
        CheckAction::Reject => 4,
        CheckAction::TempFail => 3,
        CheckAction::Score(_) => 2,
        CheckAction::Monitor => 1,
    }
}

fn dkim_refusal(evaluation: &Evaluation) -> Refusal {
    let why = evaluation
        .signatures
        .iter()
        .find(|s| {
            matches!(
                s.status,
                AuthStatus::Fail | AuthStatus::PermError | AuthStatus::Neutral
            )
        })
        .map(|s| {
            let reason = s.reason.as_deref().unwrap_or(s.status.as_str());
            if s.domain.is_empty() {
                format!(" ({})", printable(reason, 100))
            } else {
                format!(" (d={}: {})", printable(&s.domain, 100), printable(reason, 100))
            }
        })
        .unwrap_or_default();
    Refusal {
        reply: Reply::build(550, "5.7.20", format!("No passing DKIM signature found{why}")),
        category: Category::Other,
    }
}

fn dmarc_refusal(evaluation: &Evaluation) -> Refusal {
    Refusal {
        reply: Reply::build(
            550,
            "5.7.26",
            format!(
                "Unauthenticated email from {} is not accepted due to the domain's DMARC policy",
                printable(&evaluation.dmarc.from_domain, 100)
            ),
        ),
        category: Category::Other,
    }
}

fn spf_used(envelope: &Envelope<'_>, result: SpfResult) -> SpfUsed {
    let (domain, helo_identity) = match envelope.mail_from.rsplit_once('@') {
        Some((_, domain)) if !domain.is_empty() => (domain, false),
        _ => (envelope.helo.trim(), true),
    };
    SpfUsed {
        result,
        domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        helo_identity,
    }
}

fn to_mail_auth_spf(result: SpfResult) -> MailAuthSpf {
    match result {
        SpfResult::Pass => MailAuthSpf::Pass,
        SpfResult::Fail => MailAuthSpf::Fail,
        SpfResult::SoftFail => MailAuthSpf::SoftFail,
        SpfResult::Neutral => MailAuthSpf::Neutral,
        SpfResult::None => MailAuthSpf::None,
        SpfResult::TempError => MailAuthSpf::TempError,
        SpfResult::PermError => MailAuthSpf::PermError,
    }
}

fn from_mail_auth_spf(result: MailAuthSpf) -> SpfResult {
    match result {
        MailAuthSpf::Pass => SpfResult::Pass,
        MailAuthSpf::Fail => SpfResult::Fail,
        MailAuthSpf::SoftFail => SpfResult::SoftFail,
        MailAuthSpf::Neutral => SpfResult::Neutral,
        MailAuthSpf::None => SpfResult::None,
        MailAuthSpf::TempError => SpfResult::TempError,
        MailAuthSpf::PermError => SpfResult::PermError,
    }
}

/// RFC 8601 §2.7.1 status of a mail-auth DKIM result, and why it did not pass.
fn dkim_status(result: &DkimResult) -> (AuthStatus, Option<String>) {
    match result {
        DkimResult::Pass => (AuthStatus::Pass, None),
        // RFC 6376 §6.1.3: a body hash mismatch is a failed verification (mail-auth calls it
        // neutral).
        DkimResult::Neutral(e @ MailAuthError::Dkim(DkimError::FailedBodyHashMatch)) => {
            (AuthStatus::Fail, Some(reason(e)))
        }
        DkimResult::Neutral(e) => (AuthStatus::Neutral, Some(reason(e))),
        DkimResult::Fail(e) => (AuthStatus::Fail, Some(reason(e))),
        DkimResult::PermError(e) => (AuthStatus::PermError, Some(reason(e))),
        DkimResult::TempError(e) => (AuthStatus::TempError, Some(reason(e))),
        DkimResult::None => (AuthStatus::None, None),
    }
}

fn reason(error: &MailAuthError) -> String {
    match error {
        MailAuthError::Dkim(DkimError::FailedBodyHashMatch) => "body hash did not verify".into(),
        MailAuthError::Dkim(DkimError::UnsupportedAlgorithm) => "unsupported algorithm".into(),
        other => printable(&other.to_string(), 100),
    }
}

fn signature_result(
    sig: &mail_auth::dkim::Signature,
    status: AuthStatus,
    reason: Option<String>,
) -> SignatureResult {
    let b = base64::engine::general_purpose::STANDARD.encode(sig.b.get(..6).unwrap_or(&sig.b));
    SignatureResult {
        status,
        domain: printable(&sig.d, TEXT_MAX).to_ascii_lowercase(),
        selector: printable(&sig.s, TEXT_MAX),
        algorithm: match sig.a {
            Algorithm::RsaSha1 => "rsa-sha1",
            Algorithm::RsaSha256 => "rsa-sha256",
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
        },
        b: b.chars().take(8).collect(),
        reason,
    }
}

impl Check for DkimCheck {
    fn name(&self) -> &'static str {
        "dkim"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Data]
    }

    fn needs_io(&self) -> bool {
        true
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(async move {
            // Authenticated clients are the upstream's users, not mail from the world.
            if !self.config.enabled || cx.session.authenticated.is_some() {
                return Ok(Verdict::Skip);
            }
            let Some(message) = cx.message else {
                return Ok(Verdict::Skip);
            };
            let ip = cx.session.peer.ip().to_canonical();
            // Internal clients are local relays and tests; their mail is not from outside.
            if crate::dns::is_internal(ip) {
                return Ok(Verdict::Skip);
            }
            let mail_from = match cx.sender {
                Some(s) if !s.is_null() => match s.domain.as_deref() {
                    Some(domain) => format!("{}@{domain}", s.local),
                    None => String::new(),
                },
                _ => String::new(),
            };
            let spf = cx
                .facts
                .results
                .lock()
                .ok()
                .and_then(|r| SpfResult::parse(&r.spf));
            let envelope = Envelope {
                ip,
                helo: cx.session.helo.as_deref().unwrap_or(""),
                mail_from: &mail_from,
                spf,
                receiver: &cx.session.hostname,
            };
            let evaluation = self.evaluate(message.raw(), &envelope).await;
            let dkim = evaluation.dkim();
            tracing::debug!(
                session = %cx.session.id,
                dkim = %dkim,
                dmarc = %evaluation.dmarc.status,
                from = %evaluation.dmarc.from_domain,
                policy = evaluation.dmarc.policy.unwrap_or("-"),
                "DKIM and DMARC evaluated."
            );
            if let Ok(mut r) = cx.facts.results.lock() {
                r.dkim = dkim.to_string();
                r.dmarc = evaluation.dmarc.status.to_string();
            }
            if self.config.authentication_results {
                cx.facts
                    .add_header(authentication_results_header(&cx.session.hostname, &evaluation));
            }
            if evaluation.undecided() {
                return Err(CheckError(if evaluation.timed_out {
                    "DKIM and DMARC could not be evaluated in time".into()
                } else {
                    "DKIM and DMARC could not be evaluated (DNS failure)".into()
                }));
            }
            Ok(self.verdict(&evaluation))
        })
    }
}

/// The RFC 8601 `Authentication-Results:` header for an evaluation, with `hostname` as
/// the authserv-id: one result per line (folded with a tab), CRLF line ends, ASCII only,
/// values quoted where RFC 2045 tokens cannot hold them, at most 998 octets a line.
///
/// ```text
/// Authentication-Results: mx.example.net;
///     spf=pass smtp.mailfrom=example.org;
///     dkim=pass header.d=example.org header.s=sel header.a=ed25519-sha256 header.b="aB/c+dEf";
///     dmarc=pass (p=reject) header.from=example.org
/// ```
pub fn authentication_results_header(hostname: &str, evaluation: &Evaluation) -> String {
    let mut results = Vec::with_capacity(evaluation.signatures.len() + 2);
    let spf = &evaluation.spf;
    let mut line = format!("spf={}", spf.result.as_str());
    if !spf.domain.is_empty() {
        let property = if spf.helo_identity {
            "smtp.helo"
        } else {
            "smtp.mailfrom"
        };
        line.push_str(&format!(" {property}={}", value(&spf.domain)));
    }
    results.push(line);
    if evaluation.signatures.is_empty() {
        results.push("dkim=none".into());
    }
    for sig in &evaluation.signatures {
        let mut line = format!("dkim={}", sig.status.as_str());
        if let Some(reason) = &sig.reason {
            line.push_str(&format!(" ({})", comment(reason)));
        }
        if !sig.domain.is_empty() {
            line.push_str(&format!(" header.d={}", value(&sig.domain)));
        }
        if !sig.selector.is_empty() {
            line.push_str(&format!(" header.s={}", value(&sig.selector)));
        }
        if !sig.algorithm.is_empty() {
            line.push_str(&format!(" header.a={}", sig.algorithm));
        }
        if !sig.b.is_empty() {
            line.push_str(&format!(" header.b={}", value(&sig.b)));
        }
        results.push(line);
    }
    let dmarc = &evaluation.dmarc;
    let mut line = format!("dmarc={}", dmarc.status.as_str());
    if let Some(policy) = dmarc.policy {
        line.push_str(&format!(" (p={policy})"));
    }
    if !dmarc.from_domain.is_empty() {
        line.push_str(&format!(" header.from={}", value(&dmarc.from_domain)));
    }
    results.push(line);

    let mut header = format!("Authentication-Results: {}", value(hostname));
    for result in results {
        header.push_str(";\r\n\t");
        header.push_str(&result);
    }
    header.push_str("\r\n");
    header
}

/// Printable ASCII (and spaces) only, at most `max` characters; anything else is `?`.
fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    if text.chars().nth(max).is_some() {
        out.push_str("...");
    }
    out
}

/// An RFC 8601 value: an RFC 2045 token when it is one, else a quoted string.
fn value(text: &str) -> String {
    let text = printable(text, TEXT_MAX);
    let is_token = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&b));
    if is_token {
        return text;
    }
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Text for an RFC 5322 comment: parentheses and backslashes quoted.
fn comment(text: &str) -> String {
    let mut out = String::new();
    for c in printable(text, 100).chars() {
        if matches!(c, '(' | ')' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Signs `message` (CRLF line ends) with an Ed25519 key (PKCS#8 DER) for `domain` and
/// `selector`, over From, To, Subject, Date and Message-ID, and returns the
/// `DKIM-Signature:` header (CRLF-terminated) to put in front of it. thassp does not sign
/// relayed mail; this exists for tests and tools, so they need no mail-auth of their own.
pub fn sign_ed25519(message: &[u8], domain: &str, selector: &str, pkcs8: &[u8]) -> Result<String, String> {
    let key = Ed25519Key::from_pkcs8_der(pkcs8).map_err(|e| e.to_string())?;
    let signature = DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .sign(message)
        .map_err(|e| e.to_string())?;
    Ok(signature.to_header())
}

/// The DKIM key record (`v=DKIM1; k=ed25519; p=…`, RFC 8463) for an Ed25519 key given as
/// PKCS#8 DER, to publish at `selector._domainkey.domain`.
pub fn ed25519_key_record(pkcs8: &[u8]) -> Result<String, String> {
    let key = Ed25519Key::from_pkcs8_der(pkcs8).map_err(|e| e.to_string())?;
    let public = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    Ok(format!("v=DKIM1; k=ed25519; p={public}"))
}

/// A new Ed25519 key (PKCS#8 DER), for [`sign_ed25519`] and [`ed25519_key_record`].
pub fn generate_ed25519_key() -> Result<Vec<u8>, String> {
    Ed25519Key::generate_pkcs8().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluation() -> Evaluation {
        Evaluation {
            spf: SpfUsed {
                result: SpfResult::Pass,
                domain: "example.org".into(),
                helo_identity: false,
            },
            signatures: vec![SignatureResult {
                status: AuthStatus::Pass,
                domain: "example.org".into(),
                selector: "sel".into(),
                algorithm: "ed25519-sha256",
                b: "aB/c+dEf".into(),
                reason: None,
            }],
            dmarc: DmarcEvaluation {
                status: AuthStatus::Pass,
                from_domain: "example.org".into(),
                policy: Some("reject"),
            },
            timed_out: false,
        }
    }

    fn lines(header: &str) -> Vec<&str> {
        assert!(header.ends_with("\r\n"));
        let lines: Vec<&str> = header.trim_end_matches("\r\n").split("\r\n").collect();
        for (i, line) in lines.iter().enumerate() {
            assert!(!line.contains(['\r', '\n']), "bare CR or LF in {line:?}");
            assert!(line.is_ascii() && line.len() <= 998, "{line:?}");
            assert!(i == 0 || line.starts_with('\t'), "continuation {line:?}");
        }
        lines
    }

    #[test]
    fn header_format() {
        let h = authentication_results_header("mx.example.net", &evaluation());
        assert_eq!(
            h,
            "Authentication-Results: mx.example.net;\r\n\
             \tspf=pass smtp.mailfrom=example.org;\r\n\
             \tdkim=pass header.d=example.org header.s=sel header.a=ed25519-sha256 header.b=\"aB/c+dEf\";\r\n\
             \tdmarc=pass (p=reject) header.from=example.org\r\n"
        );
        lines(&h);

        let mut e = evaluation();
        e.signatures.clear();
        e.spf = SpfUsed {
            result: SpfResult::None,
            domain: "helo.example".into(),
            helo_identity: true,
        };
        e.dmarc = DmarcEvaluation {
            status: AuthStatus::None,
            from_domain: String::new(),
            policy: None,
        };
        assert_eq!(
            authentication_results_header("mx", &e),
            "Authentication-Results: mx;\r\n\tspf=none smtp.helo=helo.example;\r\n\tdkim=none;\r\n\tdmarc=none\r\n"
        );

        // Hostile text: CR/LF, non-ASCII, quotes and parentheses, huge values.
        let long = format!("{}\r\nX-Injected: (yes) \"é\"\\", "d".repeat(3000));
        let mut e = evaluation();
        e.signatures[0].status = AuthStatus::Fail;
        e.signatures[0].domain = long.clone();
        e.signatures[0].selector = long.clone();
        e.signatures[0].reason = Some(long.clone());
        e.dmarc.from_domain = long.clone();
        let h = authentication_results_header(&long, &e);
        let lines = lines(&h);
        assert!(!lines.iter().any(|l| l.starts_with("X-Injected")));
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn values_and_comments() {
        assert_eq!(value("example.org"), "example.org");
        assert_eq!(value("a b"), "\"a b\"");
        assert_eq!(value("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(value(""), "\"\"");
        assert_eq!(comment("a (b) \\c"), "a \\(b\\) \\\\c");
        assert_eq!(printable("a\r\nb\u{e9}", 10), "a??b?");
    }

    #[test]
    fn config_and_verdicts() {
        let mut bad = DkimConfig {
            max_signatures: 0,
            dmarc_quarantine: Some(CheckAction::Score(5000.0)),
            ..DkimConfig::default()
        };
        assert_eq!(bad.validate("checks.dkim").len(), 2);
        bad.max_signatures = 51;
        assert!(bad.validate("k")[1].contains("max_signatures"));

        let parsed: DkimConfig =
            toml::from_str("dmarc_reject = \"reject\"\ndkim_fail = \"off\"\nmax_signatures = 3").unwrap();
        assert_eq!(parsed.dmarc_reject, Some(CheckAction::Reject));
        assert_eq!(parsed.dkim_fail, None);
        assert_eq!(parsed.dmarc_quarantine, Some(CheckAction::Monitor));
        assert!(toml::from_str::<DkimConfig>("honour = true").is_err());
        assert!(toml::from_str::<DkimConfig>("dkim_fail = \"drop\"").is_err());

        // Never asked: verdicts only read the evaluation.
        let dns = crate::dns::DnsConfig {
            servers: vec!["127.0.0.1:9".parse().unwrap()],
            ..crate::dns::DnsConfig::default()
        };
        let resolver = Arc::new(Resolver::new(&dns).unwrap());
        let check = |config: DkimConfig| DkimCheck::build(&config, resolver.clone()).unwrap();
        let mut failing = evaluation();
        failing.signatures[0].status = AuthStatus::Fail;
        failing.signatures[0].reason = Some("body hash did not verify".into());
        failing.dmarc.status = AuthStatus::Fail;

        // Default: monitor (DMARC's refusal is the one shown).
        let v = check(DkimConfig::default()).verdict(&failing);
        assert!(
            matches!(&v, Verdict::Monitor(r) if r.reply.to_string().starts_with("550 5.7.26 Unauthenticated email from example.org")),
            "{v:?}"
        );
        let honour = check(DkimConfig {
            dmarc_reject: Some(CheckAction::Reject),
            ..DkimConfig::default()
        });
        assert!(matches!(honour.verdict(&failing), Verdict::Reject(ref r) if r.reply.code == 550));
        assert_eq!(honour.verdict(&evaluation()), Verdict::Pass);
        // Quarantine policy, DKIM reject stronger than a DMARC score, scores add up.
        failing.dmarc.policy = Some("quarantine");
        let both = check(DkimConfig {
            dkim_fail: Some(CheckAction::Reject),
            dmarc_quarantine: Some(CheckAction::Score(3.0)),
            ..DkimConfig::default()
        });
        assert!(
            matches!(both.verdict(&failing), Verdict::Reject(ref r) if r.reply.to_string().starts_with("550 5.7.20 No passing DKIM signature found (d=example.org: body hash did not verify)")),
        );
        let scores = check(DkimConfig {
            dkim_fail: Some(CheckAction::Score(1.0)),
            dmarc_quarantine: Some(CheckAction::Score(3.0)),
            ..DkimConfig::default()
        });
        assert!(matches!(scores.verdict(&failing), Verdict::Score { points, .. } if points == 4.0));
        // p=none: nothing to do; a temperror signature is not a DKIM failure.
        failing.dmarc.policy = Some("none");
        failing.signatures[0].status = AuthStatus::TempError;
        assert_eq!(both.verdict(&failing), Verdict::Pass);
        assert!(!failing.dkim_failed());
        failing.dmarc.status = AuthStatus::TempError;
        assert!(failing.undecided());
    }
}
