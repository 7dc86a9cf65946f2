//! The `dkim` check (DKIM verification, DMARC, `Authentication-Results:`) against messages
//! signed in the test with a fresh Ed25519 key whose public part the in-process DNS server
//! publishes at `sel._domainkey.<domain>`, next to `_dmarc.<domain>` policies. The check is
//! driven directly with a `Context` at `Stage::Data`, as the session does.

mod common;

use common::dns::{Records, TestDns};
use thassp::policy::dkim::{
    AuthStatus, DkimCheck, DkimConfig, Envelope, authentication_results_header, ed25519_key_record,
    generate_ed25519_key, sign_ed25519,
};
use thassp::policy::spf::SpfResult;
use thassp::policy::{
    Check, CheckAction, Context, Exemptions, SessionFacts, SessionInfo, SharedMessage, Stage, Verdict,
};
use thassp::smtp::address::parse_path;

/// A message from `alice@<domain>`.
fn message(domain: &str) -> String {
    format!(
        "From: Alice <alice@{domain}>\r\nTo: bob@example.com\r\nSubject: Quarterly report\r\n\
         Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@{domain}>\r\n\r\n\
         Hello Bob,\r\nthe numbers are attached.\r\n"
    )
}

/// `message(domain)` with a valid signature by `d=domain; s=sel` in front.
fn signed(key: &[u8], domain: &str) -> String {
    let body = message(domain);
    let sig = sign_ed25519(body.as_bytes(), domain, "sel", key).expect("signed");
    assert!(
        sig.starts_with("DKIM-Signature: ") && sig.ends_with("\r\n"),
        "{sig}"
    );
    format!("{sig}{body}")
}

struct Setup {
    dns: TestDns,
    key: Vec<u8>,
}

/// Domains: `signed.example` (key, p=reject), `quiet.example` (key, no DMARC record),
/// `spf.example` (SPF for 203.0.113.5, p=reject, no key), `down.example` (key and DMARC
/// lookups SERVFAIL).
async fn setup() -> Setup {
    let key = generate_ed25519_key().expect("key");
    let record = ed25519_key_record(&key).expect("record");
    assert!(record.starts_with("v=DKIM1; k=ed25519; p="));
    let dns = TestDns::start(
        Records::new()
            .txt("sel._domainkey.signed.example", &record)
            .txt("_dmarc.signed.example", "v=DMARC1; p=reject")
            .txt("sel._domainkey.quiet.example", &record)
            .txt("spf.example", "v=spf1 ip4:203.0.113.5 -all")
            .txt("_dmarc.spf.example", "v=DMARC1; p=reject; aspf=s")
            .txt("_dmarc.quarantine.example", "v=DMARC1; p=quarantine")
            .servfail("sel._domainkey.down.example")
            .servfail("_dmarc.down.example"),
    )
    .await;
    Setup { dns, key }
}

fn session(peer: &str) -> SessionInfo {
    SessionInfo {
        id: "t".into(),
        peer: format!("{peer}:40000").parse().unwrap(),
        local: "192.0.2.1:25".parse().unwrap(),
        hostname: "mx.thassp.test".into(),
        helo: Some("mail.sender.example".into()),
        esmtp: true,
        authenticated: None,
        tls: None,
        proxied_by: None,
        health_check: false,
    }
}

struct Outcome {
    verdict: Result<Verdict, String>,
    headers: Vec<String>,
    dkim: String,
    dmarc: String,
}

impl Outcome {
    /// The `Authentication-Results:` header, unfolded.
    fn ar(&self) -> String {
        let found: Vec<&String> = self
            .headers
            .iter()
            .filter(|h| h.starts_with("Authentication-Results: "))
            .collect();
        assert_eq!(found.len(), 1, "{:?}", self.headers);
        found[0].replace("\r\n\t", " ")
    }
}

/// Runs the check at DATA for a client at `peer` that said `MAIL FROM:<sender>`, with the
/// `spf` check's result `spf` ("" when it did not run).
async fn run(check: &DkimCheck, info: &SessionInfo, sender: &str, spf: &str, message: &str) -> Outcome {
    let facts = SessionFacts::default();
    facts.results.lock().unwrap().spf = spf.into();
    let exempt = Exemptions::default();
    let (sender, _) = parse_path(sender).unwrap();
    let message = SharedMessage::new(message.as_bytes());
    let cx = Context {
        stage: Stage::Data,
        session: info,
        sender: Some(&sender),
        recipient: None,
        recipients: &[],
        message: Some(&message),
        facts: &facts,
        exempt: &exempt,
    };
    let verdict = check.check(&cx).await.map_err(|e| e.to_string());
    let results = facts.results.lock().unwrap().clone();
    Outcome {
        verdict,
        headers: facts.headers.lock().unwrap().clone(),
        dkim: results.dkim,
        dmarc: results.dmarc,
    }
}

fn build(setup: &Setup, config: DkimConfig) -> DkimCheck {
    DkimCheck::build(&config, setup.dns.resolver()).expect("check")
}

#[tokio::test]
async fn valid_signature_passes_dkim_and_dmarc() {
    let s = setup().await;
    let check = build(&s, DkimConfig::default());
    assert_eq!(
        (check.name(), check.stages(), check.needs_io()),
        ("dkim", &[Stage::Data][..], true)
    );
    let msg = signed(&s.key, "signed.example");
    let out = run(
        &check,
        &session("203.0.113.9"),
        "<bounce@other.example>",
        "none",
        &msg,
    )
    .await;
    assert_eq!(out.verdict, Ok(Verdict::Pass));
    assert_eq!((out.dkim.as_str(), out.dmarc.as_str()), ("pass", "pass"));
    let ar = out.ar();
    assert!(
        ar.starts_with(
            "Authentication-Results: mx.thassp.test; spf=none smtp.mailfrom=other.example; \
             dkim=pass header.d=signed.example header.s=sel header.a=ed25519-sha256 header.b="
        ),
        "{ar}"
    );
    assert!(
        ar.ends_with("; dmarc=pass (p=reject) header.from=signed.example\r\n"),
        "{ar}"
    );
    // The header is folded: one result per line.
    assert_eq!(
        out.headers[0].matches("\r\n\t").count(),
        3,
        "{:?}",
        out.headers[0]
    );
    assert!(s.dns.queried("sel._domainkey.signed.example") >= 1);
}

#[tokio::test]
async fn altered_body_fails_dkim() {
    let s = setup().await;
    let check = build(&s, DkimConfig::default());
    let msg = signed(&s.key, "quiet.example").replace("the numbers", "the invoice");
    let out = run(&check, &session("203.0.113.9"), "<a@quiet.example>", "none", &msg).await;
    assert_eq!((out.dkim.as_str(), out.dmarc.as_str()), ("fail", "none"));
    let ar = out.ar();
    assert!(
        ar.contains("; dkim=fail (body hash did not verify) header.d=quiet.example header.s=sel "),
        "{ar}"
    );
    // No DMARC record: dmarc=none, without a policy.
    assert!(ar.ends_with("; dmarc=none header.from=quiet.example\r\n"), "{ar}");
    // dkim_fail is monitored by default: logged, nothing done.
    match out.verdict {
        Ok(Verdict::Monitor(r)) => assert!(
            r.reply
                .to_string()
                .starts_with("550 5.7.20 No passing DKIM signature found (d=quiet.example: body hash"),
            "{r:?}"
        ),
        other => panic!("{other:?}"),
    }

    // Configured to refuse.
    let strict = build(
        &s,
        DkimConfig {
            dkim_fail: Some(CheckAction::Reject),
            ..DkimConfig::default()
        },
    );
    let out = run(
        &strict,
        &session("203.0.113.9"),
        "<a@quiet.example>",
        "none",
        &msg,
    )
    .await;
    assert!(
        matches!(out.verdict, Ok(Verdict::Reject(ref r)) if r.reply.code == 550),
        "{:?}",
        out.verdict
    );
}

#[tokio::test]
async fn missing_dmarc_record_is_none() {
    let s = setup().await;
    let check = build(&s, DkimConfig::default());
    let msg = signed(&s.key, "quiet.example");
    let out = run(&check, &session("203.0.113.9"), "<a@quiet.example>", "pass", &msg).await;
    assert_eq!(out.verdict, Ok(Verdict::Pass));
    assert_eq!((out.dkim.as_str(), out.dmarc.as_str()), ("pass", "none"));
    let ar = out.ar();
    assert!(ar.contains("spf=pass smtp.mailfrom=quiet.example;"), "{ar}");
    assert!(ar.ends_with("; dmarc=none header.from=quiet.example\r\n"), "{ar}");
}

#[tokio::test]
async fn p_reject_is_monitored_by_default_and_honoured_when_configured() {
    let s = setup().await;
    // From signed.example (p=reject), body altered after signing, SPF failed for the
    // envelope domain: DMARC fails.
    let msg = signed(&s.key, "signed.example").replace("Hello Bob", "Hello Eve");
    let info = session("203.0.113.9");

    let monitor = build(&s, DkimConfig::default());
    let out = run(&monitor, &info, "<alice@signed.example>", "fail", &msg).await;
    assert_eq!((out.dkim.as_str(), out.dmarc.as_str()), ("fail", "fail"));
    match &out.verdict {
        Ok(Verdict::Monitor(r)) => assert_eq!(
            r.reply.to_string(),
            "550 5.7.26 Unauthenticated email from signed.example is not accepted due to the \
             domain's DMARC policy"
        ),
        other => panic!("{other:?}"),
    }
    assert!(
        out.ar()
            .ends_with("; dmarc=fail (p=reject) header.from=signed.example\r\n")
    );

    let honour = build(
        &s,
        DkimConfig {
            dmarc_reject: Some(CheckAction::Reject),
            ..DkimConfig::default()
        },
    );
    let out = run(&honour, &info, "<alice@signed.example>", "fail", &msg).await;
    match &out.verdict {
        Ok(Verdict::Reject(r)) => {
            assert!(r.reply.to_string().starts_with("550 5.7.26 "), "{r:?}");
            assert_eq!(r.category, thassp::policy::Category::Other);
        }
        other => panic!("{other:?}"),
    }
    // The same domain's properly signed mail is not affected.
    let good = signed(&s.key, "signed.example");
    let out = run(&honour, &info, "<alice@signed.example>", "fail", &good).await;
    assert_eq!(out.verdict, Ok(Verdict::Pass));
    assert_eq!(out.dmarc, "pass");
}

#[tokio::test]
async fn spf_alignment_and_spf_evaluated_here_when_the_spf_check_did_not_run() {
    let s = setup().await;
    let check = build(
        &s,
        DkimConfig {
            dmarc_reject: Some(CheckAction::Reject),
            ..DkimConfig::default()
        },
    );
    // Unsigned mail from spf.example: DMARC passes through aligned SPF alone. The SPF
    // check did not run (""), so this check asks SPF itself.
    let msg = message("spf.example");
    let out = run(&check, &session("203.0.113.5"), "<alice@spf.example>", "", &msg).await;
    assert_eq!(out.verdict, Ok(Verdict::Pass));
    assert_eq!((out.dkim.as_str(), out.dmarc.as_str()), ("none", "pass"));
    let ar = out.ar();
    assert!(
        ar.contains("spf=pass smtp.mailfrom=spf.example; dkim=none; dmarc=pass (p=reject)"),
        "{ar}"
    );
    // From another address SPF fails, and with it DMARC.
    let out = run(&check, &session("203.0.113.6"), "<alice@spf.example>", "", &msg).await;
    assert_eq!(out.dmarc, "fail");
    assert!(out.ar().contains("spf=fail smtp.mailfrom=spf.example;"));
    assert!(matches!(out.verdict, Ok(Verdict::Reject(_))), "{:?}", out.verdict);
    // A passing SPF result for a non-aligned envelope domain (aspf=s) does not help.
    let out = run(
        &check,
        &session("203.0.113.5"),
        "<x@mail.spf.example>",
        "pass",
        &msg,
    )
    .await;
    assert_eq!(out.dmarc, "fail");
}

#[tokio::test]
async fn quarantine_scores_and_skips() {
    let s = setup().await;
    let check = build(
        &s,
        DkimConfig {
            dmarc_quarantine: Some(CheckAction::Score(3.0)),
            ..DkimConfig::default()
        },
    );
    let msg = message("quarantine.example");
    let out = run(&check, &session("203.0.113.9"), "<a@other.example>", "pass", &msg).await;
    assert_eq!(out.dmarc, "fail");
    assert!(
        matches!(out.verdict, Ok(Verdict::Score { points, .. }) if points == 3.0),
        "{:?}",
        out.verdict
    );

    // Authenticated sessions and internal clients are not checked; disabled is disabled.
    let mut authed = session("203.0.113.9");
    authed.authenticated = Some("user".into());
    for (check, info) in [
        (&check, authed),
        (&check, session("10.1.2.3")),
        (
            &build(
                &s,
                DkimConfig {
                    enabled: false,
                    ..DkimConfig::default()
                },
            ),
            session("203.0.113.9"),
        ),
    ] {
        let out = run(check, &info, "<a@other.example>", "pass", &msg).await;
        assert_eq!(out.verdict, Ok(Verdict::Skip));
        assert!(out.headers.is_empty() && out.dkim.is_empty());
    }

    // No header when not wanted.
    let quiet = build(
        &s,
        DkimConfig {
            authentication_results: false,
            ..DkimConfig::default()
        },
    );
    let out = run(&quiet, &session("203.0.113.9"), "<a@other.example>", "pass", &msg).await;
    assert!(out.headers.is_empty());
    assert_eq!(out.dmarc, "fail");
}

#[tokio::test]
async fn dns_failures_are_temperror_and_undecided_only_when_nothing_was_evaluated() {
    let s = setup().await;
    let check = build(&s, DkimConfig::default());
    let msg = signed(&s.key, "down.example");
    let out = run(&check, &session("203.0.113.9"), "<a@down.example>", "pass", &msg).await;
    assert_eq!(
        (out.dkim.as_str(), out.dmarc.as_str()),
        ("temperror", "temperror")
    );
    assert!(
        out.verdict.as_ref().is_err_and(|e| e.contains("DNS failure")),
        "{:?}",
        out.verdict
    );
    // The header is still queued, for a pipeline whose on_error passes.
    assert!(out.ar().contains("dkim=temperror"));

    // One of the two evaluated: a result, not an error.
    let mixed = format!(
        "{}{}",
        sign_ed25519(msg.as_bytes(), "quiet.example", "sel", &s.key).unwrap(),
        msg
    );
    let out = run(
        &check,
        &session("203.0.113.9"),
        "<a@down.example>",
        "pass",
        &mixed,
    )
    .await;
    assert_eq!((out.dkim.as_str(), out.dmarc.as_str()), ("pass", "temperror"));
    assert_eq!(out.verdict, Ok(Verdict::Pass));
}

#[tokio::test]
async fn signatures_beyond_the_limit_are_not_verified() {
    let s = setup().await;
    let check = build(
        &s,
        DkimConfig {
            max_signatures: 2,
            ..DkimConfig::default()
        },
    );
    let mut msg = message("quiet.example");
    for _ in 0..4 {
        msg = format!(
            "{}{msg}",
            sign_ed25519(msg.as_bytes(), "quiet.example", "sel", &s.key).unwrap()
        );
    }
    let out = run(&check, &session("203.0.113.9"), "<a@quiet.example>", "none", &msg).await;
    assert_eq!(out.dkim, "pass");
    assert_eq!(out.ar().matches("dkim=pass").count(), 2, "{}", out.ar());

    // Hostile input never panics: no header section, garbage signatures, binary.
    for garbage in [
        "",
        "\r\n\r\nbody only\r\n",
        "DKIM-Signature: v=1; a=rsa-sha256; d=; s=\r\nFrom: a@quiet.example\r\n\r\nx\r\n",
        "From: \u{0}\u{7f}é\r\nDKIM-Signature: garbage(\"\r\n\r\n",
    ] {
        let out = run(
            &check,
            &session("203.0.113.9"),
            "<a@quiet.example>",
            "none",
            garbage,
        )
        .await;
        assert!(out.verdict.is_ok(), "{garbage:?}: {:?}", out.verdict);
        for line in out.headers.concat().split("\r\n") {
            assert!(line.is_ascii() && line.len() <= 998);
        }
    }
}

#[tokio::test]
async fn evaluate_and_header_without_a_session() {
    let s = setup().await;
    let check = build(&s, DkimConfig::default());
    let msg = signed(&s.key, "signed.example");
    let envelope = Envelope {
        ip: "203.0.113.9".parse().unwrap(),
        helo: "mail.sender.example",
        mail_from: "",
        spf: Some(SpfResult::Neutral),
        receiver: "mx.thassp.test",
    };
    let e = check.evaluate(msg.as_bytes(), &envelope).await;
    assert_eq!(e.dkim(), AuthStatus::Pass);
    assert_eq!(e.dmarc.status, AuthStatus::Pass);
    assert_eq!(e.dmarc.policy, Some("reject"));
    assert!(!e.timed_out && !e.undecided() && !e.dkim_failed());
    // The null sender: SPF is about the HELO identity.
    let h = authentication_results_header("mx.thassp.test", &e);
    assert!(
        h.contains("\tspf=neutral smtp.helo=mail.sender.example;\r\n"),
        "{h}"
    );
}
