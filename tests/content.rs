//! The `content` and `attachments` checks, driven directly with a `Context` at `Stage::Data`
//! (SMTP-level tests come with the wiring). Text fixtures live in
//! `tests/fixtures/messages/` (written by its `generate.py`); zip archives and executables are
//! built here.

use std::io::Write;
use std::time::{Duration, Instant};

use thassp::policy::SharedMessage;
use thassp::policy::attachments::{
    AttachmentsCheck, AttachmentsConfig, DEFAULT_BLOCKED_EXTENSIONS, Finding, normalize_name, sniff,
};
use thassp::policy::content::{ContentCheck, ContentConfig, RuleConfig};
use thassp::policy::{
    Category, Check, CheckAction, Context, Exemptions, SessionFacts, SessionInfo, Stage, Verdict,
};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A fixture with CRLF line ends, as it arrives in DATA.
fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/messages/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    crlf(&text)
}

fn crlf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 20);
    for (i, &b) in text.iter().enumerate() {
        if b == b'\n' && (i == 0 || text[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

fn rule(name: &str, target: &str, pattern: &str, action: &str) -> RuleConfig {
    RuleConfig {
        name: name.into(),
        target: target.into(),
        pattern: pattern.into(),
        action: CheckAction::parse(action).unwrap(),
        reply: None,
    }
}

fn content(rules: Vec<RuleConfig>) -> ContentCheck {
    ContentCheck::build(&ContentConfig {
        rules,
        ..ContentConfig::default()
    })
    .unwrap_or_else(|e| panic!("{e:#?}"))
}

/// Whether one rule matches the message.
fn matches(target: &str, pattern: &str, message: &[u8]) -> bool {
    let check = content(vec![rule("r", target, pattern, "reject")]);
    let outcome = check.evaluate(message);
    outcome.matched == ["r"]
}

fn info(authenticated: bool) -> SessionInfo {
    SessionInfo {
        id: "test".into(),
        peer: "192.0.2.1:1234".parse().unwrap(),
        local: "127.0.0.1:25".parse().unwrap(),
        hostname: "mx.example".into(),
        helo: Some("client.example".into()),
        esmtp: true,
        authenticated: authenticated.then(|| "user".into()),
        tls: None,
        proxied_by: None,
        health_check: false,
    }
}

async fn run_check(check: &dyn Check, stage: Stage, message: &[u8], authenticated: bool) -> Verdict {
    let info = info(authenticated);
    let facts = SessionFacts::default();
    let exempt = Exemptions::default();
    let message = SharedMessage::new(message);
    let cx = Context {
        stage,
        session: &info,
        sender: None,
        recipient: None,
        recipients: &[],
        message: Some(&message),
        facts: &facts,
        exempt: &exempt,
    };
    check.check(&cx).await.expect("check")
}

fn reply(v: &Verdict) -> String {
    match v {
        Verdict::Reject(r)
        | Verdict::TempFail(r)
        | Verdict::Monitor(r)
        | Verdict::Score { refusal: r, .. } => String::from_utf8(r.reply.to_bytes()).unwrap(),
        other => panic!("no reply in {other:?}"),
    }
}

fn category(v: &Verdict) -> Category {
    match v {
        Verdict::Reject(r)
        | Verdict::TempFail(r)
        | Verdict::Monitor(r)
        | Verdict::Score { refusal: r, .. } => r.category,
        other => panic!("no refusal in {other:?}"),
    }
}

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    text.as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// Quoted-printable: printable ASCII as is, everything else `=XX`, soft breaks at 76.
fn quoted_printable(data: &[u8]) -> String {
    let mut out = String::new();
    let mut line = 0;
    for &b in data {
        let piece = if (33..127).contains(&b) && b != b'=' {
            (b as char).to_string()
        } else {
            format!("={b:02X}")
        };
        if line + piece.len() > 75 {
            out.push_str("=\r\n");
            line = 0;
        }
        line += piece.len();
        out.push_str(&piece);
    }
    out
}

/// A message with one text part and one base64 attachment.
fn with_attachment(name: &str, content_type: &str, data: &[u8]) -> Vec<u8> {
    format!(
        "From: a@example.net\r\nTo: b@example.com\r\nSubject: attachment\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"zz\"\r\n\r\n--zz\r\nContent-Type: text/plain\r\n\r\n\
         See attached.\r\n--zz\r\nContent-Type: {content_type}; name=\"{name}\"\r\n\
         Content-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         {}\r\n--zz--\r\n",
        b64(data)
    )
    .into_bytes()
}

/// A plain message with this body.
fn with_body(body: &str) -> Vec<u8> {
    format!(
        "From: a@example.net\r\nTo: b@example.com\r\nSubject: test\r\nContent-Type: text/plain; \
         charset=utf-8\r\n\r\n{body}"
    )
    .into_bytes()
}

/// A zip archive of these entries (deflated unless `stored`).
fn zip_of(entries: &[(&str, &[u8])], stored: bool) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let method = if stored {
        zip::CompressionMethod::Stored
    } else {
        zip::CompressionMethod::Deflated
    };
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, data) in entries {
        w.start_file(*name, options).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Offsets of every central directory header.
fn central_headers(zip: &[u8]) -> Vec<usize> {
    zip.windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"PK\x01\x02")
        .map(|(i, _)| i)
        .collect()
}

/// Marks every entry as encrypted (general purpose flag bit 0, local and central headers).
/// Names stay readable, as in a real ZipCrypto or AES archive.
fn mark_encrypted(zip: &mut [u8]) {
    let locals: Vec<usize> = zip
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"PK\x03\x04")
        .map(|(i, _)| i)
        .collect();
    for i in locals {
        zip[i + 6] |= 1;
    }
    for i in central_headers(zip) {
        zip[i + 8] |= 1;
    }
}

/// Rewrites the uncompressed size the central directory declares for entry `n`.
fn set_declared_size(zip: &mut [u8], n: usize, size: u32) {
    let at = central_headers(zip)[n] + 24;
    zip[at..at + 4].copy_from_slice(&size.to_le_bytes());
}

/// A minimal PE file: `MZ`, `e_lfanew` = 0x80, `PE\0\0` there.
fn pe() -> Vec<u8> {
    let mut v = vec![0u8; 512];
    v[0..2].copy_from_slice(b"MZ");
    v[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    v[0x80..0x84].copy_from_slice(b"PE\0\0");
    v
}

fn attachments(config: AttachmentsConfig) -> AttachmentsCheck {
    AttachmentsCheck::build(&config).unwrap_or_else(|e| panic!("{e:#?}"))
}

fn inspect(message: &[u8]) -> (Vec<Finding>, Verdict) {
    let o = attachments(AttachmentsConfig::default()).inspect(message);
    (o.findings, o.verdict)
}

fn extension_of(findings: &[Finding]) -> Option<&str> {
    findings.iter().find_map(|f| match f {
        Finding::Extension { extension, .. } => Some(extension.as_str()),
        _ => None,
    })
}

fn is_unscannable(findings: &[Finding]) -> bool {
    findings.iter().any(|f| matches!(f, Finding::Unscannable { .. }))
}

// ---------------------------------------------------------------------------------------------
// Content rules: targets, decoding, flags

#[test]
fn subject_is_decoded_from_encoded_words() {
    let m = fixture("encoded-subject.mime");
    assert!(matches("subject", "/v1agra für alle/i", &m));
    assert!(matches("subject", "/^Billige Pillen:/", &m));
    // The encoded form is not what subject rules see, but raw_headers do.
    assert!(!matches("subject", "/=\\?utf-8\\?B\\?/i", &m));
    assert!(matches("raw_headers", "/^Subject: =\\?utf-8\\?B\\?/mi", &m));
    // ISO-8859-1 Q encoding.
    assert!(matches(
        "subject",
        "/^Grüße aus München$/",
        &fixture("qp-latin1.mime")
    ));
}

#[test]
fn named_header_and_any_header() {
    let m = fixture("encoded-subject.mime");
    assert!(matches("header:X-Mailer", "/^bulkmailer pro/i", &m));
    assert!(matches("header:x-mailer", "/^BulkMailer/", &m));
    assert!(!matches("header:X-Other", "/./", &m));
    // `headers` sees `Name: decoded value`, one header at a time.
    assert!(matches("headers", "/^x-mailer: bulkmailer/i", &m));
    assert!(matches("headers", "/^Subject: Billige Pillen/", &m));
    assert!(!matches("headers", "/X-Mailer.*Subject/s", &m));
    // MIME headers are matched as received.
    assert!(matches(
        "header:Content-Type",
        "/^text\\/plain; charset=us-ascii$/",
        &m
    ));
    // Header rules never see the body, body rules never see headers.
    assert!(!matches("headers", "/short message/", &m));
    assert!(!matches("body", "/BulkMailer/", &m));
    assert!(matches("body", "/this is a short message/", &m));
}

#[test]
fn missing_subject_is_matched_as_empty() {
    let m = b"From: a@example.net\r\nTo: b@example.com\r\n\r\nhi\r\n";
    assert!(matches("subject", r"/^\s*$/", m));
    assert!(!matches("subject", r"/^\s*$/", &fixture("encoded-subject.mime")));
}

#[test]
fn quoted_printable_latin1_body() {
    let m = fixture("qp-latin1.mime");
    assert!(matches("body", "/Schöne Grüße, Ihr Konto wurde gesperrt/", &m));
    // The soft line break is gone.
    assert!(matches("body", "/bestätigen Sie Ihre Daten/", &m));
    assert!(!matches("body", "/=F6/", &m));
}

#[test]
fn base64_windows_1252_body() {
    let m = fixture("base64-cp1252.mime");
    assert!(matches("body", "/1000 € „jetzt“!/", &m));
}

#[test]
fn html_part_is_matched_as_markup_and_text_part_too() {
    let m = fixture("alternative.mime");
    assert!(matches("body", r#"/href="http:\/\/phish\.example\/login"/"#, &m));
    assert!(matches("body", "/Please log in to confirm your account/", &m));
    // A bare pattern may contain slashes.
    assert!(matches("body", "http://phish.example", &m));
}

#[test]
fn attached_message_text_is_scanned() {
    let m = fixture("nested-rfc822.mime");
    assert!(matches("body", "/you won € 1\\.000\\.000/", &m));
    // Its headers are not header targets of the outer message.
    assert!(!matches("headers", "/someone@example.org/", &m));
}

#[test]
fn flags_i_m_s_x() {
    let m = with_body("First line\r\nsecond line\r\n");
    assert!(!matches("body", "/^first/", &m));
    assert!(matches("body", "/^first/i", &m));
    // Without m, $ is the end of the text only; with m, at each CRLF.
    assert!(!matches("body", r"/First line$/", &m));
    assert!(matches("body", r"/First line$/m", &m));
    assert!(matches("body", r"/^second line$/m", &m));
    // Without s, . matches neither CR nor LF.
    assert!(!matches("body", "/line.second/", &m));
    assert!(matches("body", "/line..second/s", &m));
    assert!(matches("body", r"/ First \s+ line  # a comment/x", &m));
    assert!(matches("body", r"/ first \s line /xi", &m));
}

#[test]
fn look_around_and_back_references() {
    let m = fixture("encoded-subject.mime");
    assert!(matches("subject", "/^(?=.*pillen)(?=.*v1agra)/i", &m));
    assert!(!matches("subject", "/^(?=.*pillen)(?=.*cialis)/i", &m));
    assert!(matches("subject", "/(?<!cheap )V1agra/", &m));
    assert!(!matches("subject", "/(?<=Billige )Pillen(?!:)/", &m));
    let m = with_body("Please please read the the offer\r\n");
    assert!(matches("body", r"/\b(\w+) \1\b/", &m));
    assert!(matches(
        "body",
        r"/\b(\w+) \1\b/i",
        &with_body("Please please\r\n")
    ));
    assert!(!matches(
        "body",
        r"/\b(\w+) \1\b/",
        &with_body("Please please\r\n")
    ));
    // Atomic groups and possessive quantifiers are fancy too.
    assert!(matches("body", r"/(?>the )+offer/", &m));
}

#[test]
fn redos_against_a_back_reference_rule_is_bounded() {
    // `(a+)+` before a back-reference: exponential for a backtracking engine on a run of 'a'
    // that ends without the 'b'.
    let check = content(vec![rule("redos", "body", r"/(a+)+\1b/", "reject")]);
    let body = "a".repeat(30_000) + "\r\n";
    let message = with_body(&body);
    let start = Instant::now();
    let outcome = check.evaluate(&message);
    let took = start.elapsed();
    println!("ReDoS input (30,000 'a', rule /(a+)+\\1b/): {took:?}");
    assert_eq!(
        outcome.verdict,
        Verdict::Pass,
        "hitting the limit counts as no match"
    );
    assert!(took < Duration::from_secs(1), "{took:?}");

    // The same rule on a 4 MiB body (the default scan limit): fancy rules see a capped text.
    let big = with_body(&"a".repeat(4 << 20));
    let start = Instant::now();
    assert_eq!(check.evaluate(&big).verdict, Verdict::Pass);
    let took = start.elapsed();
    println!("ReDoS rule on a 4 MiB body: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Many texts, each driving the rule to its limit: the rule gives up on the message at the
    // first, not once per part. Likewise for 1,000 hostile headers.
    let mut many = b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n".to_vec();
    for _ in 0..900 {
        many.extend(b"--b\r\nContent-Type: text/plain\r\n\r\n");
        many.extend("a".repeat(200).as_bytes());
        many.extend(b"\r\n");
    }
    many.extend(b"--b--\r\n");
    let start = Instant::now();
    assert_eq!(check.evaluate(&many).verdict, Verdict::Pass);
    let took = start.elapsed();
    println!("ReDoS rule on 900 hostile text parts: {took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    let headers_rule = content(vec![rule("redos", "headers", r"/(a+)+\1b/", "reject")]);
    let mut m = b"Subject: x\r\n".to_vec();
    for i in 0..1000 {
        m.extend(format!("X-H{i}: {}\r\n", "a".repeat(60)).as_bytes());
    }
    m.extend(b"\r\nbody\r\n");
    let start = Instant::now();
    assert_eq!(headers_rule.evaluate(&m).verdict, Verdict::Pass);
    let took = start.elapsed();
    println!("ReDoS rule on 1,000 hostile headers: {took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");

    // A linear rule that would be catastrophic in PCRE is just linear.
    let check = content(vec![rule("nested", "body", r"/^(a+)+$/", "reject")]);
    let start = Instant::now();
    assert_eq!(
        check.evaluate(&with_body(&(body.clone() + "!"))).verdict,
        Verdict::Pass
    );
    println!(
        "/^(a+)+$/ on 30,000 'a' + '!' (linear engine): {:?}",
        start.elapsed()
    );
}

#[test]
fn first_deciding_rule_wins_scores_add_monitor_never_acts() {
    let m = fixture("encoded-subject.mime");
    let all = vec![
        rule("watch", "subject", "/pillen/i", "monitor"),
        rule("pills-score", "subject", "/v1agra/i", "score:2"),
        rule("mailer-score", "header:X-Mailer", "/bulk/i", "score:1.5"),
        rule("later-tempfail", "body", "/short/", "tempfail"),
        rule("reject-too", "subject", "/Billige/", "reject"),
        rule("nomatch", "subject", "/nothing here/", "reject"),
    ];
    let check = content(all.clone());
    let o = check.evaluate(&m);
    assert!(
        matches!(o.verdict, Verdict::TempFail(ref r) if r.reply.to_bytes() == b"450 4.7.1 Message refused by content rule later-tempfail\r\n"),
        "{o:?}"
    );
    assert_eq!(
        o.matched,
        [
            "watch",
            "pills-score",
            "mailer-score",
            "later-tempfail",
            "reject-too"
        ]
    );

    // Without deciding rules the scores add up; the top scorer explains.
    let check = content(all[..3].to_vec());
    let o = check.evaluate(&m);
    match &o.verdict {
        Verdict::Score { points, refusal } => {
            assert_eq!(*points, 3.5);
            assert_eq!(
                refusal.reply.lines,
                ["Message refused by content rule pills-score"]
            );
        }
        v => panic!("{v:?}"),
    }
    // Only a monitor rule: a monitor verdict, which the pipeline only logs.
    let o = content(all[..1].to_vec()).evaluate(&m);
    assert!(matches!(o.verdict, Verdict::Monitor(_)), "{o:?}");
    // Nothing matches: pass.
    assert_eq!(content(all[5..].to_vec()).evaluate(&m).verdict, Verdict::Pass);

    // A backtracking rule earlier in the order beats a linear one that matched.
    let check = content(vec![
        rule("fancy-first", "subject", "/(?<=Billige )Pillen/", "reject"),
        rule("linear-second", "subject", "/Pillen/", "reject"),
    ]);
    let o = check.evaluate(&m);
    assert_eq!(
        reply(&o.verdict),
        "550 5.7.1 Message refused by content rule fancy-first\r\n"
    );
    // And a linear one earlier beats a backtracking one (which is then not even tried).
    let check = content(vec![
        rule("linear-first", "subject", "/Pillen/", "reject"),
        rule("fancy-second", "subject", "/(?<=Billige )Pillen/", "reject"),
    ]);
    let o = check.evaluate(&m);
    assert_eq!(o.matched, ["linear-first"]);
    assert_eq!(category(&o.verdict), Category::Content);
}

/// A few rules of one target run one by one, many as one set: both report the same matches,
/// in rule order, also when several texts (subjects) are matched.
#[test]
fn few_and_many_rules_of_one_target_match_alike() {
    use thassp::policy::content::EACH_MAX;
    let m = crlf(
        b"Subject: cheap pills\nSubject: second subject with a prize\nX-Mailer: x\n\n\
          Hello, send bitcoin to this wallet now.\n",
    );
    for n in [1, 3, EACH_MAX, EACH_MAX + 1, 3 * EACH_MAX] {
        let mut rules = Vec::new();
        let mut expected = Vec::new();
        for i in 0..n {
            // Every third rule matches: alternately the first subject, the second one and the
            // body; the others look for words the message does not have.
            let (target, pattern) = match i % 6 {
                0 => ("subject", "/PILLS/i"),
                3 => ("subject", "/\\bprize$/"),
                1 | 4 => ("body", "/send (btc|bitcoin) to/i"),
                _ => ("body", "/\\bviagra\\b/i"),
            };
            if i % 6 != 2 && i % 6 != 5 {
                expected.push(format!("r{i}"));
            }
            rules.push(rule(&format!("r{i}"), target, pattern, "monitor"));
        }
        let o = content(rules).evaluate(&m);
        assert_eq!(o.matched, expected, "{n} rules");
    }
}

#[test]
fn custom_reply_and_matched_text_never_echoed() {
    let mut r = rule("pills", "subject", "/v1agra/i", "reject");
    r.reply = Some("We do not accept this kind of offer".into());
    let o = content(vec![r]).evaluate(&fixture("encoded-subject.mime"));
    assert_eq!(
        reply(&o.verdict),
        "550 5.7.1 We do not accept this kind of offer\r\n"
    );
    let o = content(vec![rule("pills", "subject", "/v1agra/i", "reject")])
        .evaluate(&fixture("encoded-subject.mime"));
    let text = reply(&o.verdict);
    assert_eq!(text, "550 5.7.1 Message refused by content rule pills\r\n");
    assert!(!text.to_lowercase().contains("v1agra"));
}

#[test]
fn max_scan_bytes_bounds_the_body() {
    let body = "x".repeat(2000) + " needle\r\n";
    let m = with_body(&body);
    let config = |max| ContentConfig {
        rules: vec![rule("n", "body", "/needle/", "reject")],
        max_scan_bytes: max,
        ..ContentConfig::default()
    };
    assert_eq!(
        ContentCheck::build(&config(1024)).unwrap().evaluate(&m).verdict,
        Verdict::Pass
    );
    assert!(matches!(
        ContentCheck::build(&config(4096)).unwrap().evaluate(&m).verdict,
        Verdict::Reject(_)
    ));
}

#[test]
fn rule_files_config_toml_and_keyed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.txt");
    std::fs::write(
        &path,
        "# comment\n\n  pills  subject  reject  /v1agra/i\n\
         mailer\theader:X-Mailer\tscore:2\t/^bulk/i   Bulk mail is not welcome here\n\
         slash body monitor /http:\\/\\/phish/\n",
    )
    .unwrap();
    let toml_text = format!(
        r#"
        max_scan_bytes = "1MiB"
        files = [{path:?}]
        [[rules]]
        name = "first"
        where = "body"
        pattern = "/confirm your account/i"
        action = "tempfail"
        reply = "Try again later"
        "#
    );
    let config: ContentConfig = toml::from_str(&toml_text).unwrap();
    assert_eq!(config.max_scan_bytes, 1 << 20);
    let check = ContentCheck::build(&config).unwrap();
    assert_eq!(check.len(), 4);
    let o = check.evaluate(&fixture("encoded-subject.mime"));
    assert_eq!(o.matched, ["pills", "mailer"]);
    assert_eq!(
        reply(&o.verdict),
        "550 5.7.1 Message refused by content rule pills\r\n"
    );
    let o = check.evaluate(&fixture("alternative.mime"));
    assert_eq!(reply(&o.verdict), "450 4.7.1 Try again later\r\n");

    // Errors: keyed by rule and field, or by file and line.
    std::fs::write(
        &path,
        "ok body reject /fine/\nbad-where bodies reject /x/\nbad-pattern body reject /(unclosed/\n\
         no-slashes body reject plain words\nbad-flag body reject /x/q\nok body reject /dup/\n",
    )
    .unwrap();
    let config = ContentConfig {
        rules: vec![
            rule("good", "subject", "/x/", "reject"),
            rule("broken", "subject", "/(x/", "reject"),
            rule("bad name", "subject", "/x/", "reject"),
            rule("where", "header:", "/x/", "reject"),
            rule("flags", "body", "/x/z", "reject"),
            rule("slash", "body", "/a/b/", "reject"),
            RuleConfig {
                reply: Some("line\r\nbreak".into()),
                ..rule("reply", "body", "/x/", "reject")
            },
        ],
        files: vec![path.clone(), dir.path().join("missing.txt")],
        ..ContentConfig::default()
    };
    let errors = ContentCheck::build(&config).unwrap_err();
    let shown = path.display().to_string();
    let expect = [
        "checks.content.rules[1].pattern: regex parse error: unclosed group".to_string(),
        "checks.content.rules[2].name: ".into(),
        "checks.content.rules[3].where: ".into(),
        "checks.content.rules[4].pattern: unknown flag 'z'".into(),
        "checks.content.rules[5].pattern: \"/a/b/\" starts with '/' but is not /pattern/flags".into(),
        "checks.content.rules[6].reply: ".into(),
        format!("checks.content.files: {shown}:2: \"bodies\" is not a place to look"),
        format!("checks.content.files: {shown}:3: regex parse error: unclosed group"),
        format!(
            "checks.content.files: {shown}:4: \"plain words\": the pattern must be written /pattern/flags"
        ),
        format!("checks.content.files: {shown}:5: unknown flag 'q'"),
        format!(
            "checks.content.files: {shown}:6: rule name \"ok\" is already used by checks.content.files: {shown}:1"
        ),
        "checks.content.files: ".to_string()
            + &dir.path().join("missing.txt").display().to_string()
            + ": cannot read",
    ];
    for e in &expect {
        assert!(
            errors.iter().any(|x| x.starts_with(e.as_str())),
            "missing {e:?} in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), expect.len(), "{errors:#?}");
    assert!(errors.iter().all(|e| !e.contains('\n')), "{errors:#?}");
    assert_eq!(config.validate(), errors);
}

#[test]
fn shipped_rule_file_example_builds() {
    let path = format!("{}/config/rules.example.txt", env!("CARGO_MANIFEST_DIR"));
    let config = ContentConfig {
        files: vec![path.into()],
        ..ContentConfig::default()
    };
    let check = ContentCheck::build(&config).unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(check.len() >= 5);
    // Innocent mail passes it.
    for f in ["innocent.mime", "qp-latin1.mime", "alternative.mime"] {
        assert_eq!(check.evaluate(&fixture(f)).verdict, Verdict::Pass, "{f}");
    }
}

#[tokio::test]
async fn content_check_runs_at_data_only_and_skips_authenticated_sessions() {
    let check = content(vec![rule("pills", "subject", "/v1agra/i", "reject")]);
    let m = fixture("encoded-subject.mime");
    assert_eq!(check.stages(), [Stage::Data]);
    assert!(matches!(
        run_check(&check, Stage::Data, &m, false).await,
        Verdict::Reject(_)
    ));
    assert_eq!(run_check(&check, Stage::Data, &m, true).await, Verdict::Skip);
    // A message over the inline limit is matched on the blocking pool, same verdict.
    let mut big = m.clone();
    big.extend(std::iter::repeat_n(b'x', 1 << 20));
    assert!(matches!(
        run_check(&check, Stage::Data, &big, false).await,
        Verdict::Reject(_)
    ));
}

// ---------------------------------------------------------------------------------------------
// Hostile MIME: no panic, no stack overflow, bounded time

/// Runs `f` on a thread with a 2 MiB stack, a tokio worker's default.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .expect("no panic, no stack overflow")
}

#[test]
fn hostile_mime_is_bounded() {
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("no headers", b"just some text without a header\r\n".to_vec()),
        ("binary", (0..=255u8).cycle().take(100_000).collect()),
        ("unterminated multipart", {
            let mut m = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n".to_vec();
            m.extend(b"--x\r\nContent-Type: multipart/mixed; boundary=y\r\n\r\n--y\r\n".repeat(2000));
            m
        }),
    ];
    // 200,000 tiny parts (would be ~100 bytes of parser structure each).
    let mut parts = b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n".to_vec();
    parts.extend(b"--b\r\n\r\nx\r\n".repeat(200_000));
    cases.push(("200k parts", parts));
    // 100,000 nested message/rfc822 levels: a recursive drop would overflow the stack.
    let mut deep = b"Subject: deep\r\n".to_vec();
    deep.extend(b"Content-Type: message/rfc822\r\n\r\n".repeat(100_000));
    deep.extend(b"Subject: bottom\r\n\r\nbottom text\r\n");
    cases.push(("100k nested messages", deep));
    // 300,000 tiny header lines.
    let mut headers = b"Subject: many headers\r\n".to_vec();
    headers.extend(b"X-A: b\r\n".repeat(300_000));
    headers.extend(b"\r\nbody v1agra\r\n");
    cases.push(("300k headers", headers));

    for (name, message) in cases {
        let took = on_small_stack(move || {
            let start = Instant::now();
            let c = content(vec![
                rule("s", "subject", "/v1agra/i", "reject"),
                rule("h", "headers", "/^x-b/i", "reject"),
                rule("b", "body", "/v1agra/i", "reject"),
                rule("f", "body", r"/(\w+)\1{5}/", "score:1"),
            ]);
            let _ = c.evaluate(&message);
            let a = attachments(AttachmentsConfig::default()).inspect(&message);
            (start.elapsed(), a.findings)
        });
        println!("{name}: {:?}, attachment findings {:?}", took.0, took.1);
        assert!(took.0 < Duration::from_secs(5), "{name}: {:?}", took.0);
    }
}

#[test]
fn hostile_headers_fall_back_to_raw_fields() {
    // Too many tiny header lines to parse safely: rules still see the raw fields and body.
    let mut m = b"X-Spam-Tool: mass\r\nSubject: =?utf-8?B?VjFhZ3Jh?= now\r\n".to_vec();
    m.extend(b"X-A: b\r\n".repeat(250_000));
    m.extend(b"X-Mailer: BulkMailer\r\n\r\nbody with a lottery win\r\n");
    assert!(matches("headers", "/^X-Spam-Tool: mass$/", &m));
    assert!(matches("subject", "/^=\\?utf-8\\?B\\?VjFhZ3Jh\\?= now$/", &m));
    assert!(matches("body", "/lottery win/", &m));
    assert!(matches("raw_headers", "/^X-Spam-Tool:/", &m));
    // Beyond the first 10,000 headers nothing is looked at.
    assert!(!matches("header:X-Mailer", "/bulk/i", &m));
    // 5,000 junk headers do not hide a Subject from a parsed message.
    let mut m = "X-Junk: a header long enough not to look like a flood of tiny ones\r\n"
        .repeat(5000)
        .into_bytes();
    m.extend(b"Subject: =?utf-8?B?VjFhZ3Jh?=\r\n\r\nbody\r\n");
    assert!(matches("subject", "/^V1agra$/", &m));
}

#[test]
fn deep_nesting_and_part_floods_are_unscannable() {
    let mut parts = b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n".to_vec();
    parts.extend(b"--b\r\n\r\nx\r\n".repeat(5_000));
    let (f, v) = inspect(&parts);
    assert!(is_unscannable(&f), "{f:?}");
    assert_eq!(
        reply(&v),
        "552 5.7.1 Message refused: attachment cannot be inspected\r\n"
    );

    // Attached messages five deep, default depth 3.
    let mut m = String::new();
    for _ in 0..5 {
        m.push_str("Subject: fwd\r\nContent-Type: multipart/mixed; boundary=\"q\"\r\n\r\n--q\r\nContent-Type: message/rfc822\r\n\r\n");
    }
    m.push_str("Subject: bottom\r\n\r\nhi\r\n");
    let (f, _) = inspect(m.as_bytes());
    assert!(is_unscannable(&f), "{f:?}");
    let o = attachments(AttachmentsConfig {
        max_message_depth: 8,
        ..AttachmentsConfig::default()
    })
    .inspect(m.as_bytes());
    assert_eq!(o.verdict, Verdict::Pass, "{o:?}");
}

// ---------------------------------------------------------------------------------------------
// Attachments: names and types

#[test]
fn attachment_corpus() {
    let cases: &[(&str, Option<&str>)] = &[
        ("mixed-double-extension.mime", Some("exe")),
        ("rfc2231-name.mime", Some("exe")),
        ("rfc2231-continuation.mime", Some("scr")),
        ("rfc2047-name.mime", Some("js")),
        ("trailing-dots.mime", Some("exe")),
        ("name-mismatch.mime", Some("vbs")),
        ("nested-rfc822.mime", Some("vbs")),
        ("innocent.mime", None),
        ("alternative.mime", None),
        ("encoded-subject.mime", None),
        ("qp-latin1.mime", None),
        ("base64-cp1252.mime", None),
    ];
    for (file, ext) in cases {
        let (findings, verdict) = inspect(&fixture(file));
        println!("{file}: {findings:?}");
        assert_eq!(extension_of(&findings), *ext, "{file}: {findings:?}");
        match ext {
            Some(e) => {
                assert_eq!(
                    reply(&verdict),
                    format!("552 5.7.1 Message refused: attachment type .{e} not accepted\r\n"),
                    "{file}"
                );
                assert_eq!(category(&verdict), Category::Attachment);
            }
            None => assert_eq!(verdict, Verdict::Pass, "{file}: {findings:?}"),
        }
    }
    // Decoded names, as logged.
    let (f, _) = inspect(&fixture("rfc2231-name.mime"));
    assert!(
        matches!(&f[0], Finding::Extension { name, .. } if name == "résumé.pdf.exe"),
        "{f:?}"
    );
    let (f, _) = inspect(&fixture("rfc2231-continuation.mime"));
    assert!(
        matches!(&f[0], Finding::Extension { name, .. } if name == "rechnung 2024.pdf.scr"),
        "{f:?}"
    );
    let (f, _) = inspect(&fixture("rfc2047-name.mime"));
    assert!(
        matches!(&f[0], Finding::Extension { name, .. } if name == "facture.js"),
        "{f:?}"
    );
}

#[test]
fn declared_mime_type() {
    let (f, v) = inspect(&fixture("mime-type.mime"));
    assert!(
        matches!(&f[..], [Finding::MimeType { mime_type, .. }] if mime_type == "application/x-msdownload"),
        "{f:?}"
    );
    assert_eq!(
        reply(&v),
        "552 5.7.1 Message refused: attachment type application/x-msdownload not accepted\r\n"
    );
    let o = attachments(AttachmentsConfig {
        blocked_mime_types: vec!["application/*".into()],
        ..AttachmentsConfig::default()
    })
    .inspect(&fixture("innocent.mime"));
    assert!(
        matches!(&o.findings[..], [Finding::MimeType { mime_type, .. }] if mime_type == "application/*"),
        "{o:?}"
    );
}

#[test]
fn names_are_normalised_like_windows() {
    assert_eq!(normalize_name("Evil.EXE. . "), ["evil.exe"]);
    assert_eq!(normalize_name("C:\\Users\\x\\run.bat"), ["run.bat"]);
    assert_eq!(normalize_name("dir/sub/tool.js\t"), ["tool.js"]);
    assert_eq!(normalize_name("evil.exe\0.txt"), ["evil.exe\0.txt", "evil.exe"]);
    let (f, _) = inspect(&with_attachment(
        "evil.exe\0.txt",
        "application/octet-stream",
        b"x",
    ));
    assert_eq!(extension_of(&f), Some("exe"), "{f:?}");
    // Only the end counts: a PDF whose name mentions exe is fine.
    let (f, v) = inspect(&with_attachment("exe.pdf", "application/pdf", b"%PDF-1.4"));
    assert!(f.is_empty() && v == Verdict::Pass, "{f:?}");
    // A name that is only the extension is not "something.exe".
    let (f, _) = inspect(&with_attachment(".exe", "application/octet-stream", b"x"));
    assert!(extension_of(&f).is_none(), "{f:?}");
}

#[test]
fn defaults_cover_the_common_list() {
    for e in [
        "exe", "scr", "com", "bat", "cmd", "pif", "vbs", "vbe", "js", "jse", "wsf", "wsh", "hta", "msi",
        "msp", "lnk", "cpl", "jar", "ps1", "reg", "iso", "img", "vhd", "vhdx",
    ] {
        assert!(DEFAULT_BLOCKED_EXTENSIONS.contains(&e), "{e}");
    }
    let d = AttachmentsConfig::default();
    assert!(d.enabled && d.sniff && d.scan_archives && d.message_rfc822);
    assert_eq!(
        (d.max_archive_depth, d.max_nested_size, d.max_message_depth),
        (2, 10 << 20, 3)
    );
    assert_eq!(d.encrypted_archives, Some(CheckAction::Reject));
    // The TOML form, with "off".
    let c: AttachmentsConfig = toml::from_str(
        "allowed_extensions = [\"iso\"]\nencrypted_archives = \"off\"\nunscannable = \"score:3\"\n\
         max_nested_size = \"1MiB\"\naction = \"tempfail\"",
    )
    .unwrap();
    assert_eq!(c.encrypted_archives, None);
    assert_eq!(c.unscannable, Some(CheckAction::Score(3.0)));
    assert_eq!(c.max_nested_size, 1 << 20);
    let (_, v) = {
        let o = attachments(c).inspect(&fixture("mixed-double-extension.mime"));
        (o.findings, o.verdict)
    };
    assert_eq!(
        reply(&v),
        "452 4.7.1 Message refused: attachment type .exe not accepted\r\n"
    );
}

#[test]
fn attachment_config_errors_are_keyed() {
    let errors = AttachmentsCheck::build(&AttachmentsConfig {
        blocked_extensions: vec!["exe".into(), "e x e".into()],
        allowed_extensions: vec![".".into()],
        blocked_mime_types: vec!["application".into(), "text/*".into()],
        max_archive_depth: 0,
        ..AttachmentsConfig::default()
    })
    .unwrap_err();
    for e in [
        "checks.attachments.blocked_extensions[1]: ",
        "checks.attachments.allowed_extensions[0]: ",
        "checks.attachments.blocked_mime_types[0]: ",
        "checks.attachments.max_archive_depth: ",
    ] {
        assert!(
            errors.iter().any(|x| x.starts_with(e)),
            "missing {e} in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

// ---------------------------------------------------------------------------------------------
// Attachments: sniffing and the allow-list

#[test]
fn executables_are_sniffed_whatever_their_name() {
    assert_eq!(sniff(&pe()), Some("Windows"));
    assert_eq!(sniff(b"\x7fELF\x02\x01\x01"), Some("ELF"));
    assert_eq!(sniff(b"\xcf\xfa\xed\xfe\x07\x00"), Some("Mach-O"));
    assert_eq!(
        sniff(
            b"MZ-1001 Mazowieckie region code list, not a program, long enough to reach e_lfanew at 0x3c...."
        ),
        None
    );
    assert_eq!(sniff(b"%PDF-1.4"), None);

    // A PE named like a document.
    let (f, v) = inspect(&with_attachment("report.pdf", "application/pdf", &pe()));
    assert!(
        matches!(&f[..], [Finding::Executable { kind: "Windows", .. }]),
        "{f:?}"
    );
    assert_eq!(
        reply(&v),
        "552 5.7.1 Message refused: executable attachment not accepted\r\n"
    );
    // Declared as text and base64-encoded: decoded again as bytes.
    let (f, _) = inspect(&with_attachment("notes.txt", "text/plain", &pe()));
    assert!(matches!(&f[..], [Finding::Executable { .. }]), "{f:?}");
    // Quoted-printable, declared as binary or as text.
    let qp = quoted_printable(&pe());
    for ct in ["application/octet-stream", "text/plain; charset=us-ascii"] {
        let m = format!(
            "Subject: x\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Type: {ct}\r\n\
             Content-Disposition: attachment; filename=\"photo.jpg\"\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\n{qp}\r\n--q--\r\n"
        );
        let (f, _) = inspect(m.as_bytes());
        assert!(
            matches!(&f[..], [Finding::Executable { kind: "Windows", .. }]),
            "{ct}: {f:?}"
        );
    }
    // An ELF without a name, inline.
    let m = format!(
        "Subject: x\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
        b64(b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00")
    );
    let (f, _) = inspect(m.as_bytes());
    assert!(
        matches!(&f[..], [Finding::Executable { kind: "ELF", .. }]),
        "{f:?}"
    );
    // Sniffing off: the name decides alone.
    let o = attachments(AttachmentsConfig {
        sniff: false,
        ..AttachmentsConfig::default()
    })
    .inspect(&with_attachment("report.pdf", "application/pdf", &pe()));
    assert_eq!(o.verdict, Verdict::Pass);
}

#[test]
fn allow_list_overrides() {
    let allow = |exts: &[&str]| {
        attachments(AttachmentsConfig {
            allowed_extensions: exts.iter().map(|s| s.to_string()).collect(),
            ..AttachmentsConfig::default()
        })
    };
    let exe = with_attachment("setup.exe", "application/octet-stream", &pe());
    assert!(matches!(inspect(&exe).1, Verdict::Reject(_)));
    // Allowing exe lets the name and the executable content through.
    assert_eq!(allow(&["exe"]).inspect(&exe).verdict, Verdict::Pass);
    assert_eq!(
        allow(&[".EXE"])
            .inspect(&fixture("mixed-double-extension.mime"))
            .verdict,
        Verdict::Pass
    );
    // Allowing pdf does not let a disguised executable through.
    let o = allow(&["pdf"]).inspect(&with_attachment("report.pdf", "application/pdf", &pe()));
    assert!(matches!(&o.findings[..], [Finding::Executable { .. }]), "{o:?}");
    // Nor does it save a double extension whose last one is blocked.
    let o = allow(&["pdf"]).inspect(&fixture("mixed-double-extension.mime"));
    assert_eq!(extension_of(&o.findings), Some("exe"));
    // Disk images, blocked by default, allowed.
    let iso = with_attachment("install.iso", "application/octet-stream", b"CD001");
    assert_eq!(extension_of(&inspect(&iso).0), Some("iso"));
    assert_eq!(allow(&["iso"]).inspect(&iso).verdict, Verdict::Pass);
}

// ---------------------------------------------------------------------------------------------
// Attachments: zip archives

#[test]
fn names_inside_zip_archives() {
    let z = zip_of(
        &[("docs/readme.txt", b"hello"), ("tools/Run.BAT", b"@echo off")],
        false,
    );
    let (f, v) = inspect(&with_attachment("tools.zip", "application/zip", &z));
    assert!(
        matches!(&f[..], [Finding::Extension { extension, name, archive: Some(a) }]
            if extension == "bat" && name == "tools/Run.BAT" && a == "tools.zip"),
        "{f:?}"
    );
    assert_eq!(
        reply(&v),
        "552 5.7.1 Message refused: attachment type .bat not accepted\r\n"
    );
    // A harmless archive passes; so does an office document (a zip by its magic).
    let z = zip_of(&[("a.txt", b"hello"), ("b.pdf", b"%PDF-1.4")], false);
    assert_eq!(
        inspect(&with_attachment("docs.zip", "application/zip", &z)).1,
        Verdict::Pass
    );
    let docx = zip_of(
        &[
            ("[Content_Types].xml", b"<Types/>"),
            ("word/document.xml", b"<w:document/>"),
        ],
        false,
    );
    assert_eq!(
        inspect(&with_attachment("letter.docx", "application/octet-stream", &docx)).1,
        Verdict::Pass
    );
    // A zip found by its magic bytes under another name.
    let z = zip_of(&[("evil.js", b"x")], false);
    let (f, _) = inspect(&with_attachment("photo.jpg", "image/jpeg", &z));
    assert_eq!(extension_of(&f), Some("js"), "{f:?}");
    // An executable with an innocent name inside an archive.
    let z = zip_of(&[("scan.pdf", &pe())], false);
    let (f, _) = inspect(&with_attachment("scan.zip", "application/zip", &z));
    assert!(
        matches!(&f[..], [Finding::Executable { archive: Some(_), .. }]),
        "{f:?}"
    );
    // Scanning archives off.
    let z = zip_of(&[("tools/run.bat", b"@echo off")], false);
    let o = attachments(AttachmentsConfig {
        scan_archives: false,
        ..AttachmentsConfig::default()
    })
    .inspect(&with_attachment("tools.zip", "application/zip", &z));
    assert_eq!(o.verdict, Verdict::Pass);
}

#[test]
fn zip_inside_zip() {
    let inner = zip_of(&[("payload/evil.exe", b"MZ")], false);
    let outer = zip_of(&[("readme.txt", b"hi"), ("inner.zip", &inner)], false);
    let m = with_attachment("outer.zip", "application/zip", &outer);
    let (f, _) = inspect(&m);
    assert!(
        matches!(&f[..], [Finding::Extension { extension, archive: Some(a), .. }]
            if extension == "exe" && a == "outer.zip/inner.zip"),
        "{f:?}"
    );
    // Depth 1 opens the attached archive only: the nested one cannot be inspected.
    let o = attachments(AttachmentsConfig {
        max_archive_depth: 1,
        ..AttachmentsConfig::default()
    })
    .inspect(&m);
    assert!(
        matches!(&o.findings[..], [Finding::Unscannable { reason, .. }] if reason == "archive nested too deep"),
        "{o:?}"
    );
    // Three levels with the default depth 2: unscannable, unless that is off.
    let third = zip_of(&[("inner.zip", &outer)], true);
    let m = with_attachment("third.zip", "application/zip", &third);
    assert!(is_unscannable(&inspect(&m).0));
    let o = attachments(AttachmentsConfig {
        unscannable: None,
        ..AttachmentsConfig::default()
    })
    .inspect(&m);
    assert_eq!(o.verdict, Verdict::Pass);
    // A nested zip that does not say so in its name is found by its magic.
    let outer = zip_of(&[("data.bin", &inner)], false);
    let (f, _) = inspect(&with_attachment("outer.zip", "application/zip", &outer));
    assert_eq!(extension_of(&f), Some("exe"), "{f:?}");
}

#[test]
fn encrypted_archives() {
    let mut z = zip_of(&[("invoice.pdf", b"%PDF-1.4 secret")], true);
    mark_encrypted(&mut z);
    let m = with_attachment("invoice.zip", "application/zip", &z);
    let (f, v) = inspect(&m);
    assert!(
        matches!(&f[..], [Finding::Encrypted { archive }] if archive == "invoice.zip"),
        "{f:?}"
    );
    assert_eq!(
        reply(&v),
        "552 5.7.1 Message refused: encrypted archive not accepted\r\n"
    );
    // Allowed encrypted archives still have their names checked.
    let off = attachments(AttachmentsConfig {
        encrypted_archives: None,
        ..AttachmentsConfig::default()
    });
    assert_eq!(off.inspect(&m).verdict, Verdict::Pass);
    let mut z = zip_of(&[("invoice.pdf.exe", b"MZ")], true);
    mark_encrypted(&mut z);
    let o = off.inspect(&with_attachment("invoice.zip", "application/zip", &z));
    assert_eq!(extension_of(&o.findings), Some("exe"), "{o:?}");
    // Monitor: found and logged, not refused.
    let o = attachments(AttachmentsConfig {
        encrypted_archives: Some(CheckAction::Monitor),
        ..AttachmentsConfig::default()
    })
    .inspect(&m);
    assert!(matches!(o.verdict, Verdict::Monitor(_)), "{o:?}");
}

#[test]
fn zip_bombs_are_never_inflated() {
    // A nested archive of 8 MiB of zeros, stored, deflated to a few KiB by the outer one:
    // declared ratio about 1000.
    let zeros = vec![0u8; 8 << 20];
    let inner = zip_of(&[("zeros.bin", &zeros)], true);
    let outer = zip_of(&[("bomb.zip", &inner)], false);
    println!(
        "bomb: {} bytes attached, nested archive {} bytes",
        outer.len(),
        inner.len()
    );
    let m = with_attachment("bomb.zip", "application/zip", &outer);
    let start = Instant::now();
    let (f, v) = inspect(&m);
    println!("bomb inspected in {:?}", start.elapsed());
    assert!(
        matches!(&f[..], [Finding::Unscannable { reason, .. }] if reason.contains("zip bomb")),
        "{f:?}"
    );
    assert_eq!(
        reply(&v),
        "552 5.7.1 Message refused: attachment cannot be inspected\r\n"
    );

    // The top-level archive is never inflated: a central directory claiming 4 GiB for an
    // entry costs nothing and hides no name.
    let mut z = zip_of(&[("huge.txt", b"small really"), ("x.vbs", b"1")], false);
    set_declared_size(&mut z, 0, u32::MAX - 1);
    let (f, _) = inspect(&with_attachment("claims.zip", "application/zip", &z));
    assert_eq!(extension_of(&f), Some("vbs"), "{f:?}");
    // A nested archive claiming 4 GiB is not inflated.
    let outer = zip_of(&[("nested.zip", &zip_of(&[("a.txt", b"a")], false))], false);
    let mut claims = outer.clone();
    set_declared_size(&mut claims, 0, u32::MAX - 1);
    let (f, _) = inspect(&with_attachment("claims.zip", "application/zip", &claims));
    assert!(
        matches!(&f[..], [Finding::Unscannable { reason, .. }] if reason == "nested archive too large"),
        "{f:?}"
    );
    // A nested archive that inflates past its declared size is not opened.
    let inner = zip_of(&[("a.txt", &[b'a'; 3000][..])], true);
    let mut lying = zip_of(&[("nested.zip", &inner)], false);
    set_declared_size(&mut lying, 0, 1000);
    let (f, _) = inspect(&with_attachment("lying.zip", "application/zip", &lying));
    assert!(is_unscannable(&f), "{f:?}");
    // The per-message total.
    let inner = zip_of(&[("a.txt", &vec![b'x'; 200_000][..])], true);
    let outer = zip_of(&[("one.zip", &inner), ("two.zip", &inner)], true);
    let o = attachments(AttachmentsConfig {
        max_total_inflated: 300_000,
        ..AttachmentsConfig::default()
    })
    .inspect(&with_attachment("two.zip", "application/zip", &outer));
    assert!(
        matches!(&o.findings[..], [Finding::Unscannable { reason, .. }] if reason == "too much to inflate"),
        "{o:?}"
    );
}

#[test]
fn corrupt_and_oversized_archives() {
    let (f, _) = inspect(&with_attachment(
        "broken.zip",
        "application/zip",
        b"PK\x03\x04 truncated",
    ));
    assert!(
        matches!(&f[..], [Finding::Unscannable { reason, .. }] if reason.starts_with("not a readable zip")),
        "{f:?}"
    );
    let names: Vec<String> = (0..10_001).map(|i| format!("f{i}.txt")).collect();
    let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
    let z = zip_of(&entries, true);
    let start = Instant::now();
    let (f, _) = inspect(&with_attachment("many.zip", "application/zip", &z));
    println!("10,001 entries: {:?}", start.elapsed());
    assert!(
        matches!(&f[..], [Finding::Unscannable { reason, .. }] if reason.contains("archive entries")),
        "{f:?}"
    );
}

#[test]
fn attached_messages() {
    let o = attachments(AttachmentsConfig {
        message_rfc822: false,
        ..AttachmentsConfig::default()
    })
    .inspect(&fixture("nested-rfc822.mime"));
    assert_eq!(o.verdict, Verdict::Pass, "{o:?}");
    // A base64-encoded attached message is opened too.
    let inner = std::fs::read(format!(
        "{}/tests/fixtures/messages/mixed-double-extension.mime",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let m = with_attachment("fwd.eml", "message/rfc822", &crlf(&inner));
    let (f, _) = inspect(&m);
    assert_eq!(extension_of(&f), Some("exe"), "{f:?}");
}

#[tokio::test]
async fn attachment_check_runs_at_data_only_and_skips_authenticated_sessions() {
    let check = attachments(AttachmentsConfig::default());
    let m = fixture("mixed-double-extension.mime");
    assert_eq!(check.stages(), [Stage::Data]);
    assert!(matches!(
        run_check(&check, Stage::Data, &m, false).await,
        Verdict::Reject(_)
    ));
    assert_eq!(run_check(&check, Stage::Data, &m, true).await, Verdict::Skip);
    let mut big = with_attachment("big.exe", "application/octet-stream", &vec![b'x'; 200_000]);
    big.extend(b"\r\n");
    assert!(matches!(
        run_check(&check, Stage::Data, &big, false).await,
        Verdict::Reject(_)
    ));
    let disabled = attachments(AttachmentsConfig {
        enabled: false,
        ..AttachmentsConfig::default()
    });
    assert_eq!(run_check(&disabled, Stage::Data, &m, false).await, Verdict::Skip);
}
