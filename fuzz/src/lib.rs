//! The invariants thassp's fuzz targets check, one function per target. Each takes the raw
//! fuzz input and panics when an invariant breaks.
//!
//! Shared on purpose: the fuzz targets (nightly, `fuzz/fuzz_targets/*.rs`) call these, and the
//! stable regression test `tests/fuzz_corpus.rs` includes this very file with `#[path]` and
//! replays every file of `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` through the
//! function of the same name. So only `thassp`, `toml`, `base64` and `std` may be used here.
//!
//! Input formats (so seeds can be written by hand):
//! - `command`: any bytes; split into lines as the session does, each line parsed.
//! - `data`: byte 0 = settings (bit 0: normalise bare line ends; bits 1-2: size cap; bits 3-4:
//!   line cap), byte 1 = how to split the rest into chunks (0: byte by byte), then the wire
//!   bytes after `354`.
//! - `reply`: byte 0 = how to split, then upstream reply bytes.
//! - `address`: UTF-8 text after `MAIL FROM:` (non-UTF-8 inputs are skipped).
//! - `proxy_protocol`: the first bytes of a connection.
//! - `config`: UTF-8 TOML (non-UTF-8 inputs are skipped).
//! - `mime`: byte 0 = how to wrap the rest (0: as the whole message, 1: as a base64 zip
//!   attachment, 2: as an attached `message/rfc822`, 3: as a base64 attachment of unknown
//!   type), then the bytes.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use thassp::config::Config;
use thassp::policy::Verdict;
use thassp::policy::attachments::{AttachmentsCheck, AttachmentsConfig};
use thassp::proxy_protocol::{self, ProxyError};
use thassp::smtp::address::{self, Address};
use thassp::smtp::codec::{
    self, BareLineEnd, COMMAND_LINE_MAX, Command, CommandError, DataReader, DataViolation, ENVELOPE_LINE_MAX,
    LineStatus, REPLY_LINE_MAX, REPLY_LINES_MAX, Reply, ReplyError, ReplyParser,
};

/// Chunk sizes (1..=64) for splitting an input, from a one-byte seed; 0 means byte by byte.
fn chunks(seed: u8, input: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut state = u32::from(seed) | 0x9e37_7900;
    let mut rest = input;
    while !rest.is_empty() {
        let n = if seed == 0 {
            1
        } else {
            // xorshift32: deterministic, so a corpus file always splits the same way.
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            1 + (state % 64) as usize
        };
        let (head, tail) = rest.split_at(n.min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// command: find_line + parse_command
// ---------------------------------------------------------------------------------------------

pub fn command(input: &[u8]) {
    for limit in [1, 16, COMMAND_LINE_MAX, ENVELOPE_LINE_MAX] {
        check_find_line(input, limit);
    }
    // Every line, as the session cuts them (over-long ones skipped to the next LF).
    let mut rest = input;
    for _ in 0..10_000 {
        match codec::find_line(rest, ENVELOPE_LINE_MAX) {
            LineStatus::Complete { len, content } => {
                check_command(&rest[..content]);
                rest = &rest[len..];
            }
            LineStatus::TooLong => match rest.iter().position(|&b| b == b'\n') {
                Some(nl) => rest = &rest[nl + 1..],
                None => break,
            },
            LineStatus::Incomplete => {
                check_command(rest);
                break;
            }
        }
    }
}

fn check_find_line(buf: &[u8], limit: usize) {
    match codec::find_line(buf, limit) {
        LineStatus::Complete { len, content } => {
            assert!(
                len >= 1 && len <= buf.len() && len <= limit,
                "len {len} limit {limit}"
            );
            assert_eq!(buf[len - 1], b'\n');
            assert!(
                !buf[..len - 1].contains(&b'\n'),
                "a line must end at the first LF"
            );
            if len >= 2 && content == len - 2 {
                assert_eq!(buf[content], b'\r');
            } else {
                assert_eq!(content, len - 1);
                assert!(
                    content == 0 || buf[content - 1] != b'\r',
                    "a CR before the LF belongs to it"
                );
            }
        }
        LineStatus::TooLong => {
            assert!(buf.len() >= limit);
            assert!(!buf[..limit].contains(&b'\n'));
        }
        LineStatus::Incomplete => {
            assert!(buf.len() < limit);
            assert!(!buf.contains(&b'\n'));
        }
    }
}

fn check_command(line: &[u8]) {
    let parsed = codec::parse_command(line);
    // Trailing blanks never change the meaning of a command.
    let mut padded = line.to_vec();
    padded.extend_from_slice(b" \t ");
    assert_eq!(
        codec::parse_command(&padded),
        parsed,
        "trailing blanks changed {line:?}"
    );
    let command = match parsed {
        Ok(c) => c,
        Err(CommandError::Parameter(p)) => {
            assert!(p.chars().count() <= 64);
            return;
        }
        Err(_) => return,
    };
    // Anything accepted is text without ASCII control characters (TAB aside). C1 controls
    // (U+0080-U+009F) do pass: the codec only promises no bare CR, NUL or other C0 byte.
    let text = std::str::from_utf8(line).expect("accepted command is UTF-8");
    assert!(
        !text.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f),
        "control byte in {text:?}"
    );
    let blank = |s: &str| s.contains([' ', '\t']);
    match command {
        Command::Helo(name) | Command::Ehlo(name) => assert!(!name.is_empty() && !blank(&name)),
        Command::Mail { from: addr, params } | Command::Rcpt { to: addr, params } => {
            check_address(&addr);
            for p in params {
                assert!(!p.key.is_empty() && p.key.len() <= 32);
                assert!(
                    p.key
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
                );
                if let Some(v) = p.value {
                    assert!(!v.is_empty() && v.len() <= 500 && !v.contains('=') && !blank(&v));
                }
            }
        }
        Command::Unknown(verb) => assert!(verb.chars().count() <= 32 && !blank(&verb)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// address: parse_path
// ---------------------------------------------------------------------------------------------

pub fn address(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok((addr, rest)) = address::parse_path(text) else {
        return;
    };
    assert!(text.ends_with(rest), "rest {rest:?} is not the end of {text:?}");
    assert!(!rest.starts_with([' ', '\t']));
    check_address(&addr);
}

/// What every parsed address satisfies, wherever it came from. The one that matters most:
/// thassp relays `<raw>` to the upstream, so `<raw>` must mean the same address again.
fn check_address(addr: &Address) {
    assert!(addr.raw.len() <= address::PATH_MAX);
    assert!(addr.local.len() <= address::LOCAL_MAX);
    assert!(
        addr.domain
            .as_ref()
            .is_none_or(|d| d.len() <= address::DOMAIN_MAX)
    );
    assert_eq!(addr.utf8, !addr.raw.is_ascii());
    assert!(!addr.raw.chars().any(char::is_control));
    if addr.local_quoted {
        assert!(addr.local.len() >= 2 && addr.local.starts_with('"') && addr.local.ends_with('"'));
    }
    // None of the predicates may panic.
    let _ = (
        addr.is_null(),
        addr.domain_lower(),
        addr.is_bare_postmaster(),
        addr.local_is_plain(),
        addr.domain_is_hostname(),
        addr.to_string(),
    );
    let relayed = format!("<{}>", addr.raw);
    match address::parse_path(&relayed) {
        Ok((again, rest)) => {
            assert_eq!(rest, "", "{relayed:?} has text after the address");
            assert_eq!(&again, addr, "{relayed:?} parses to another address");
        }
        Err(e) => panic!("{relayed:?} (relayed form of an accepted address) does not parse: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// data: DataReader + stuff_into
// ---------------------------------------------------------------------------------------------

type DataResult = (Option<usize>, Vec<u8>, Option<DataViolation>);

fn read_chunks(settings: (usize, usize, BareLineEnd), pieces: &[&[u8]]) -> DataResult {
    let (max_size, max_line, bare) = settings;
    let mut reader = DataReader::new(max_size, max_line, bare);
    let mut out = Vec::new();
    let mut offset = 0;
    for piece in pieces {
        let end = reader.feed(piece, &mut out);
        assert!(
            out.len() <= max_size,
            "output {} over the cap {max_size}",
            out.len()
        );
        if let Some(n) = end {
            assert!(
                n >= 1 && n <= piece.len(),
                "end {n} outside the chunk of {}",
                piece.len()
            );
            assert_eq!(reader.wire_bytes(), offset + n);
            return (Some(offset + n), out, reader.violation());
        }
        offset += piece.len();
        assert_eq!(reader.wire_bytes(), offset);
    }
    (None, out, reader.violation())
}

/// True when every CR is followed by LF and every LF preceded by CR.
fn only_crlf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

pub fn data(input: &[u8]) {
    let [flags, seed, wire @ ..] = input else {
        return;
    };
    let bare = if flags & 1 == 0 {
        BareLineEnd::Reject
    } else {
        BareLineEnd::Normalize
    };
    let max_size = [1 << 20, 64, 1000, 7][usize::from((flags >> 1) & 3)];
    let max_line = [1000, 2, 78, 12][usize::from((flags >> 3) & 3)];
    let settings = (max_size, max_line, bare);

    let whole = read_chunks(settings, &[wire]);
    let split = read_chunks(settings, &chunks(*seed, wire));
    assert_eq!(whole, split, "splitting the input changed the result");
    let (end, out, violation) = whole;

    if let Some(end) = end {
        assert!(end <= wire.len());
        // Only CRLF.CRLF ends a message (or `.CRLF` right at its start).
        assert!(
            wire[..end].ends_with(b"\r\n.\r\n") || (end == 3 && wire.starts_with(b".\r\n")),
            "data ended at {end} without CRLF.CRLF"
        );
    }
    match violation {
        // A refused message is not kept.
        Some(_) => assert!(out.is_empty()),
        None => {
            // Nothing the upstream could read as a line end other than CRLF.
            assert!(only_crlf(&out), "bare CR or LF in the output");
            if end.is_some() {
                assert!(out.is_empty() || out.ends_with(b"\r\n"));
                // What thassp sends upstream reads back as the same message.
                let mut restuffed = Vec::new();
                codec::stuff_into(&out, &mut restuffed);
                let again = read_chunks(settings, &[&restuffed]);
                assert_eq!(
                    again,
                    (Some(restuffed.len()), out, None),
                    "re-stuffed message differs"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// reply: ReplyParser
// ---------------------------------------------------------------------------------------------

type ReplyResult = (Vec<Reply>, Option<ReplyError>);

fn read_replies(pieces: &[&[u8]]) -> ReplyResult {
    let mut parser = ReplyParser::default();
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match parser.parse(&mut buf) {
                Ok(Some(r)) => replies.push(r),
                Ok(None) => {
                    // What is kept between reads is one partial line, bounded.
                    assert!(buf.len() <= REPLY_LINE_MAX && !buf.contains(&b'\n'));
                    break;
                }
                Err(e) => return (replies, Some(e)),
            }
        }
    }
    (replies, None)
}

pub fn reply(input: &[u8]) {
    let [seed, stream @ ..] = input else {
        return;
    };
    let whole = read_replies(&[stream]);
    let split = read_replies(&chunks(*seed, stream));
    assert_eq!(whole, split, "splitting the input changed the result");
    for r in &whole.0 {
        assert!((200..600).contains(&r.code), "code {}", r.code);
        assert!(!r.lines.is_empty() && r.lines.len() <= REPLY_LINES_MAX);
        // Lossy UTF-8 may triple an invalid byte, nothing more.
        assert!(
            r.lines
                .iter()
                .all(|l| l.len() <= 3 * REPLY_LINE_MAX && !l.contains('\n'))
        );
        if let Some(e) = r.enhanced {
            assert_eq!(u16::from(e.0), r.code / 100);
        }
        let _ = (r.summary(), r.is_positive(), r.is_transient(), r.is_permanent());
        // The reply as thassp relays it to its client parses as the same reply.
        let wire = r.to_bytes();
        if wire.split(|&b| b == b'\n').all(|l| l.len() < REPLY_LINE_MAX) {
            let mut buf = wire.clone();
            let again = ReplyParser::default().parse(&mut buf);
            let again = match again {
                Ok(Some(a)) => a,
                other => panic!(
                    "{:?} does not parse back: {other:?}",
                    String::from_utf8_lossy(&wire)
                ),
            };
            assert!(buf.is_empty());
            assert_eq!(
                (again.code, again.enhanced, again.lines.len()),
                (r.code, r.enhanced, r.lines.len())
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// proxy_protocol: parse
// ---------------------------------------------------------------------------------------------

type ProxyResult = Result<Option<(proxy_protocol::Header, usize)>, ProxyError>;

pub fn proxy_protocol(input: &[u8]) {
    let full = proxy_protocol::parse(input);
    if let Ok(Some((header, consumed))) = full {
        assert!(consumed >= 1 && consumed <= input.len() && consumed <= proxy_protocol::MAX_HEADER);
        // The header delimits itself: what follows it does not matter.
        assert_eq!(
            proxy_protocol::parse(&input[..consumed]),
            Ok(Some((header, consumed)))
        );
    }
    if input.len() >= proxy_protocol::MAX_HEADER {
        assert_ne!(full, Ok(None), "a verdict is due with {} bytes", input.len());
    }
    // Monotonic in the prefix: as bytes arrive, "need more" may turn into a header or an error,
    // and neither ever changes again.
    let limit = input.len().min(proxy_protocol::MAX_HEADER + 8);
    let mut previous: ProxyResult = proxy_protocol::parse(&[]);
    assert_eq!(previous, Ok(None));
    for k in 1..=limit {
        let now = proxy_protocol::parse(&input[..k]);
        match (&previous, &now) {
            (Ok(None), _) => {}
            (Ok(Some(p)), Ok(Some(n))) => assert_eq!(p, n, "header changed at {k} bytes"),
            (Err(_), Err(_)) => {}
            _ => panic!("{previous:?} became {now:?} at {k} bytes"),
        }
        previous = now;
    }
}

// ---------------------------------------------------------------------------------------------
// config: Config::from_toml
// ---------------------------------------------------------------------------------------------

pub fn config(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(config) = Config::from_toml(text, "fuzz") else {
        return;
    };
    let _ = (config.hostname(), config.default_upstream());
    // A configuration that loads can be written out (config view) and loads again the same.
    let Ok(written) = toml::to_string(&config) else {
        return;
    };
    let again = match Config::from_toml(&written, "fuzz-written") {
        Ok(c) => c,
        Err(e) => panic!("written configuration does not load:\n{written}\n{e}"),
    };
    assert_eq!(toml::to_string(&again).ok().as_deref(), Some(written.as_str()));
}

// ---------------------------------------------------------------------------------------------
// mime: the attachment walker
// ---------------------------------------------------------------------------------------------

fn attachment_checks() -> &'static [AttachmentsCheck; 2] {
    static CHECKS: OnceLock<[AttachmentsCheck; 2]> = OnceLock::new();
    CHECKS.get_or_init(|| {
        let deepest = AttachmentsConfig {
            max_archive_depth: 8,
            max_message_depth: 8,
            ..AttachmentsConfig::default()
        };
        [
            AttachmentsCheck::build(&AttachmentsConfig::default()).expect("default attachments config"),
            AttachmentsCheck::build(&deepest).expect("deepest attachments config"),
        ]
    })
}

fn base64_lines(bytes: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = Vec::with_capacity(text.len() + text.len() / 76 * 2 + 2);
    for line in text.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A message carrying `part` with the given part headers.
fn wrap(part_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut m = b"From: a@example.net\r\nTo: b@example.com\r\nSubject: fuzz\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1\r\n"
        .to_vec();
    m.extend_from_slice(part_headers.as_bytes());
    m.extend_from_slice(b"\r\n");
    m.extend_from_slice(body);
    m.extend_from_slice(b"\r\n--b1--\r\n");
    m
}

pub fn mime(input: &[u8]) {
    let [mode, bytes @ ..] = input else {
        return;
    };
    let message = match mode % 4 {
        0 => bytes.to_vec(),
        1 => wrap(
            "Content-Type: application/zip; name=\"a.zip\"\r\nContent-Transfer-Encoding: base64\r\n\
Content-Disposition: attachment; filename=\"a.zip\"\r\n",
            &base64_lines(bytes),
        ),
        2 => wrap("Content-Type: message/rfc822\r\n", bytes),
        _ => wrap(
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n",
            &base64_lines(bytes),
        ),
    };
    for check in attachment_checks() {
        let outcome = check.inspect(&message);
        // Every default action is `reject`: a finding refuses, no finding passes.
        assert_eq!(
            outcome.findings.is_empty(),
            outcome.verdict == Verdict::Pass,
            "{:?} / {:?}",
            outcome.findings,
            outcome.verdict
        );
        for f in &outcome.findings {
            let _ = f.to_string();
        }
    }
}
