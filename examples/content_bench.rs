//! Cost per message of the content rules (50 rules) and the attachment check, on a 2 KiB and
//! on 1 MiB messages. Run in release mode:
//!
//! ```text
//! cargo run --release --example content_bench
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use thassp::policy::CheckAction;
use thassp::policy::attachments::{AttachmentsCheck, AttachmentsConfig};
use thassp::policy::content::{ContentCheck, ContentConfig, RuleConfig};

const WORDS: &[&str] = &[
    "viagra",
    "cialis",
    "casino",
    "lottery",
    "winner",
    "bitcoin",
    "crypto",
    "investment",
    "inheritance",
    "beneficiary",
    "unsubscribe",
    "pharmacy",
    "replica",
    "rolex",
    "weight loss",
    "diet pill",
    "loan",
    "mortgage",
    "refinance",
    "credit score",
    "wire transfer",
    "western union",
    "gift card",
    "prize",
    "claim now",
    "act now",
    "limited time",
    "risk free",
    "100% free",
    "no obligation",
    "password",
    "verify your account",
    "suspended",
    "urgent",
    "confidential",
    "dear friend",
    "million dollars",
    "bank account",
    "social security",
    "click here",
];

/// 50 rules over every target; `backtracking`: two of the body rules need the backtracking
/// engine (a look-ahead and a back-reference), else they are linear too.
fn rules(backtracking: bool) -> Vec<RuleConfig> {
    let mut rules = Vec::new();
    let mut add = |name: String, target: &str, pattern: String, action: &str| {
        rules.push(RuleConfig {
            name,
            target: target.into(),
            pattern,
            action: CheckAction::parse(action).unwrap(),
            reply: None,
        })
    };
    // 10 subject rules, 5 named-header rules, 3 any-header rules, 2 raw-header rules.
    for (i, w) in WORDS[..10].iter().enumerate() {
        add(
            format!("subject-{i}"),
            "subject",
            format!(r"/\b{w}\b/i"),
            "score:1",
        );
    }
    for (i, h) in ["X-Mailer", "From", "Reply-To", "Message-ID", "List-Unsubscribe"]
        .iter()
        .enumerate()
    {
        add(
            format!("header-{i}"),
            &format!("header:{h}"),
            format!(r"/bulk|{}\d+/i", WORDS[i]),
            "reject",
        );
    }
    for i in 0..3 {
        add(
            format!("headers-{i}"),
            "headers",
            format!(r"/^X-Spam-{i}: yes/i"),
            "reject",
        );
    }
    add(
        "raw-0".into(),
        "raw_headers",
        r"/^X-Campaign-ID:/mi".into(),
        "reject",
    );
    add(
        "raw-1".into(),
        "raw_headers",
        r"/=\?utf-8\?b\?[a-z0-9+\/]{200,}/i".into(),
        "score:1",
    );
    // 30 body rules: 26 words or phrases, 2 with classes and repetitions, 2 backtracking.
    for (i, w) in WORDS[10..36].iter().enumerate() {
        add(
            format!("body-{i}"),
            "body",
            format!(r"/\b{}\b/i", w.replace(' ', r"\s+")),
            "score:0.5",
        );
    }
    add(
        "body-ip-link".into(),
        "body",
        r#"/href="https?:\/\/\d+\.\d+\.\d+\.\d+/i"#.into(),
        "score:1",
    );
    add(
        "body-money".into(),
        "body",
        r"/\$\s?\d{1,3}(,\d{3}){2,}/".into(),
        "score:1",
    );
    if backtracking {
        // A look-ahead and a back-reference: the backtracking engine.
        add(
            "body-lookahead".into(),
            "body",
            r"/^(?=.{0,2000}\bverify\b)(?=.{0,2000}\bpassword\b)/is".into(),
            "score:2",
        );
        add(
            "body-doubled".into(),
            "body",
            r"/\b(\w{5,}) \1 \1\b/i".into(),
            "score:1",
        );
    } else {
        add(
            "body-verify".into(),
            "body",
            r"/\bverify\b.{0,200}\bpassword\b/is".into(),
            "score:2",
        );
        add(
            "body-shouting".into(),
            "body",
            r"/\b[A-Z]{12,}\b/".into(),
            "score:1",
        );
    }
    assert_eq!(rules.len(), 50);
    rules
}

const HEAD: &str = "Received: from mx.example.net (mx.example.net [192.0.2.1])\r\n\tby mx.example.com with ESMTPS id 4XYZ\r\n\tfor <user@example.com>; Mon, 6 Jan 2025 10:00:00 +0000\r\nFrom: \"Newsletter\" <news@example.net>\r\nTo: user@example.com\r\nSubject: =?utf-8?Q?Our_January_newsletter_=E2=80=93_what=27s_new?=\r\nDate: Mon, 6 Jan 2025 10:00:00 +0000\r\nMessage-ID: <abc123@example.net>\r\nMIME-Version: 1.0\r\n";

/// Plain prose, about `len` bytes, CRLF lines of ~70 characters.
fn prose(len: usize) -> String {
    let text = "The quarterly report is attached and the meeting moves to Thursday at ten. \
                Please bring the figures for the northern region and the draft budget; we will \
                also discuss the new office layout and the holiday schedule. ";
    let mut out = String::with_capacity(len + 100);
    let mut line = 0;
    for word in text.split(' ').cycle() {
        if out.len() >= len {
            break;
        }
        out.push_str(word);
        line += word.len() + 1;
        if line > 68 {
            out.push_str("\r\n");
            line = 0;
        } else {
            out.push(' ');
        }
    }
    out.push_str("\r\n");
    out
}

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    let t = base64::engine::general_purpose::STANDARD.encode(data);
    t.as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// A multipart/alternative message of about `len` bytes: text plus HTML.
fn text_message(len: usize) -> Vec<u8> {
    let body = prose(len / 2);
    let html = format!(
        "<html><body><p>{}</p></body></html>",
        prose(len / 2 - 40).replace("\r\n", "<br>\r\n")
    );
    format!(
        "{HEAD}Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--b1--\r\n"
    )
    .into_bytes()
}

/// A short text plus a base64 attachment (a zip of a few documents) of about `len` bytes.
fn attachment_message(len: usize) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut seed = 0x2545f4914f6cdd1du64;
    let chunk = len * 3 / 4 / 8;
    for i in 0..8 {
        w.start_file(format!("docs/report-{i}.pdf"), opts).unwrap();
        let data: Vec<u8> = (0..chunk)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        w.write_all(&data).unwrap();
    }
    let zip = w.finish().unwrap().into_inner();
    format!(
        "{HEAD}Content-Type: multipart/mixed; boundary=\"b2\"\r\n\r\n--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}\r\n--b2\r\nContent-Type: application/zip; name=\"reports.zip\"\r\nContent-Disposition: attachment; filename=\"reports.zip\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--b2--\r\n",
        prose(1000),
        b64(&zip)
    )
    .into_bytes()
}

fn measure(label: &str, message: &[u8], f: impl Fn(&[u8])) {
    // Warm up (lazy DFA caches fill on first use), then time enough runs for ~1 s.
    f(message);
    let start = Instant::now();
    let mut runs = 0u32;
    let mut times = Vec::new();
    while start.elapsed() < Duration::from_secs(1) || runs < 5 {
        let t = Instant::now();
        f(black_box(message));
        times.push(t.elapsed());
        runs += 1;
    }
    times.sort();
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<Duration>() / runs;
    println!(
        "{label:<44} {:>9} bytes  median {:>10.1?}  mean {:>10.1?}  ({runs} runs)",
        message.len(),
        median,
        mean
    );
}

fn main() {
    let linear = ContentCheck::build(&ContentConfig {
        rules: rules(false),
        ..ContentConfig::default()
    })
    .unwrap();
    let mixed = ContentCheck::build(&ContentConfig {
        rules: rules(true),
        ..ContentConfig::default()
    })
    .unwrap();
    let attachments = AttachmentsCheck::build(&AttachmentsConfig::default()).unwrap();
    let small = text_message(2048);
    let big_text = text_message(1 << 20);
    let big_attachment = attachment_message(1 << 20);
    for (name, m) in [
        ("2 KiB text+html", &small),
        ("1 MiB text+html", &big_text),
        ("1 MiB text + zip attachment", &big_attachment),
    ] {
        for (label, check) in [
            ("50 linear rules", &linear),
            ("48 linear + 2 backtracking", &mixed),
        ] {
            let o = check.evaluate(m);
            assert!(o.matched.is_empty(), "{name}: {:?}", o.matched);
            measure(&format!("content, {label}: {name}"), m, |m| {
                black_box(check.evaluate(m));
            });
        }
        measure(&format!("attachments: {name}"), m, |m| {
            black_box(attachments.inspect(m));
        });
    }
}
