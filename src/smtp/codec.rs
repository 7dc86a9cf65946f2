//! Sans-IO SMTP wire format: command lines, replies, DATA framing with dot-unstuffing and
//! smuggling-safe end detection, dot-stuffing for output. No tokio, no other `crate::` module
//! except the address parser, so it can be fuzzed and table-tested on its own.

use std::fmt;

use super::address::{Address, AddressError, parse_path};

/// RFC 5321 §4.5.3.1.4: a command line, CRLF included, is at most 512 octets.
pub const COMMAND_LINE_MAX: usize = 512;
/// MAIL and RCPT lines may grow by what the advertised extensions add (RFC 1870: 26, RFC 6152:
/// 14, RFC 3461: 100 on MAIL and 500 on RCPT, RFC 6531: 10); a round 1024 covers them all.
pub const ENVELOPE_LINE_MAX: usize = 1024;
/// A reply line from the upstream; RFC 5321 says 512, real MTAs stay well below 1000.
pub const REPLY_LINE_MAX: usize = 2048;
/// Lines in one upstream reply (EHLO replies have ~15); a bound so a hostile peer costs little.
pub const REPLY_LINES_MAX: usize = 64;

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Appends `n` in decimal. Replies are written several times per message: `write!` with its
/// formatter machinery was a tenth of the work of relaying one.
fn push_decimal(out: &mut Vec<u8>, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

impl Enhanced {
    fn write_to(self, out: &mut Vec<u8>) {
        push_decimal(out, u16::from(self.0));
        out.push(b'.');
        push_decimal(out, self.1);
        out.push(b'.');
        push_decimal(out, self.2);
    }
}

impl Enhanced {
    /// Parses `x.y.z` at the start of `text`, followed by a space or the end.
    /// Returns the code and the rest of the text.
    pub fn parse_prefix(text: &str) -> Option<(Self, &str)> {
        let end = text.find(' ').unwrap_or(text.len());
        let mut parts = text[..end].split('.');
        let class: u8 = parse_digits(parts.next()?, 1)?;
        let subject: u16 = parse_digits(parts.next()?, 3)?;
        let detail: u16 = parse_digits(parts.next()?, 3)?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some((Self(class, subject, detail), text[end..].trim_start_matches(' ')))
    }
}

fn parse_digits<T: std::str::FromStr>(s: &str, max_len: usize) -> Option<T> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// One SMTP reply: a code, an optional enhanced code and one or more text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, enhanced: Enhanced, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A reply whose enhanced code is given as `"x.y.z"` for readability at call sites.
    /// Panics only on a malformed literal, which is a programming error caught by tests.
    pub fn build(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        let (e, rest) = Enhanced::parse_prefix(enhanced).expect("enhanced code literal");
        debug_assert!(rest.is_empty());
        Self::new(code, e, text)
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Fills in an enhanced code derived from the basic code when the peer gave none, since
    /// thassp advertises ENHANCEDSTATUSCODES and must then put one on every reply.
    pub fn with_default_enhanced(mut self, default_detail: (u16, u16)) -> Self {
        if self.enhanced.is_none() {
            let class = (self.code / 100) as u8;
            if matches!(class, 2 | 4 | 5) {
                self.enhanced = Some(Enhanced(class, default_detail.0, default_detail.1));
            }
        }
        self
    }

    /// The first line, for logs: `550 5.1.1 text`.
    pub fn summary(&self) -> String {
        let text = self.lines.first().map(String::as_str).unwrap_or("");
        let mut out = Vec::with_capacity(12 + text.len());
        push_decimal(&mut out, self.code);
        out.push(b' ');
        if let Some(e) = self.enhanced {
            e.write_to(&mut out);
            out.push(b' ');
        }
        out.extend_from_slice(text.as_bytes());
        // Digits, dots, spaces and a `str`: valid UTF-8.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Appends the wire form (CRLF line ends) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            push_decimal(out, self.code);
            out.push(if i + 1 == n { b' ' } else { b'-' });
            match self.enhanced {
                Some(e) => {
                    e.write_to(out);
                    if !text.is_empty() {
                        out.push(b' ');
                        out.extend_from_slice(text.as_bytes());
                    }
                }
                None => out.extend_from_slice(text.as_bytes()),
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        self.write_to(&mut v);
        v
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Why an upstream reply could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line is not `ddd text`: {0:?}")]
    Syntax(String),
    #[error("reply line longer than {REPLY_LINE_MAX} bytes")]
    LineTooLong,
    #[error("reply has more than {REPLY_LINES_MAX} lines")]
    TooManyLines,
    #[error("multi-line reply changed its code from {0} to {1}")]
    CodeChanged(u16, u16),
}

/// Incremental parser for replies from the upstream MTA.
#[derive(Debug, Default)]
pub struct ReplyParser {
    code: Option<u16>,
    enhanced: Option<Enhanced>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// Consumes complete lines from `buf` (removing them) until a reply is complete.
    /// Returns `Ok(None)` when more input is needed.
    pub fn parse(&mut self, buf: &mut Vec<u8>) -> Result<Option<Reply>, ReplyError> {
        loop {
            let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                if buf.len() > REPLY_LINE_MAX {
                    return Err(ReplyError::LineTooLong);
                }
                return Ok(None);
            };
            if nl > REPLY_LINE_MAX {
                return Err(ReplyError::LineTooLong);
            }
            let mut line_end = nl;
            if line_end > 0 && buf[line_end - 1] == b'\r' {
                line_end -= 1;
            }
            let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            buf.drain(..=nl);
            if let Some(reply) = self.line(&line)? {
                return Ok(Some(reply));
            }
        }
    }

    fn line(&mut self, line: &str) -> Result<Option<Reply>, ReplyError> {
        let bytes = line.as_bytes();
        if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) || bytes[0] < b'2' || bytes[0] > b'5'
        {
            return Err(ReplyError::Syntax(line.chars().take(80).collect()));
        }
        let code: u16 = line[..3].parse().map_err(|_| ReplyError::Syntax(line.into()))?;
        let (last, rest) = match bytes.get(3) {
            None => (true, ""),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Err(ReplyError::Syntax(line.chars().take(80).collect())),
        };
        if let Some(prev) = self.code
            && prev != code
        {
            return Err(ReplyError::CodeChanged(prev, code));
        }
        self.code = Some(code);
        let text = match Enhanced::parse_prefix(rest) {
            Some((e, text)) if e.0 as u16 == code / 100 => {
                if self.enhanced.is_none() && self.lines.is_empty() {
                    self.enhanced = Some(e);
                }
                text
            }
            _ => rest,
        };
        if self.lines.len() >= REPLY_LINES_MAX {
            return Err(ReplyError::TooManyLines);
        }
        self.lines.push(text.to_string());
        if last {
            let reply = Reply {
                code,
                enhanced: self.enhanced.take(),
                lines: std::mem::take(&mut self.lines),
            };
            self.code = None;
            return Ok(Some(reply));
        }
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------------
// Command lines
// ---------------------------------------------------------------------------------------------

/// Result of looking for one line in the input buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum LineStatus {
    /// A line of this many bytes (terminator included) is at the start of the buffer.
    Complete { len: usize, content: usize },
    /// No terminator yet and the buffer is below the limit.
    Incomplete,
    /// No terminator within `limit` bytes: the caller refuses the line and discards up to the
    /// next LF without buffering it.
    TooLong,
}

/// Finds the first command line. LF ends a command line (with or without CR before it):
/// commands are re-generated by thassp before they reach the upstream, so a lenient command
/// terminator cannot smuggle anything, and it keeps hand-typed sessions working.
pub fn find_line(buf: &[u8], limit: usize) -> LineStatus {
    let window = &buf[..buf.len().min(limit)];
    match window.iter().position(|&b| b == b'\n') {
        Some(nl) => {
            let content = if nl > 0 && buf[nl - 1] == b'\r' {
                nl - 1
            } else {
                nl
            };
            LineStatus::Complete { len: nl + 1, content }
        }
        None if buf.len() >= limit => LineStatus::TooLong,
        None => LineStatus::Incomplete,
    }
}

/// An ESMTP parameter of MAIL or RCPT, `KEYWORD[=value]`; the keyword is upper-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub key: String,
    pub value: Option<String>,
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={}", self.key, v),
            None => f.write_str(&self.key),
        }
    }
}

/// A parsed client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    Mail {
        from: Address,
        params: Vec<Param>,
    },
    Rcpt {
        to: Address,
        params: Vec<Param>,
    },
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth(String),
    /// A verb thassp does not implement (TURN, ETRN, XCLIENT from a client, …).
    Unknown(String),
}

/// Why a command line was refused; each maps to one reply in the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command line is not valid text")]
    BadCharacters,
    #[error("syntax error in {0} command")]
    Syntax(&'static str),
    #[error("{verb} needs an argument")]
    MissingArgument { verb: &'static str },
    #[error("{verb} takes no argument")]
    UnexpectedArgument { verb: &'static str },
    #[error("bad address in {verb}: {error}")]
    Address { verb: &'static str, error: AddressError },
    #[error("bad parameter {0:?}")]
    Parameter(String),
    #[error("command line too long")]
    TooLong,
}

/// Parses one command line (without its terminator).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    // Control characters (bare CR, NUL, …) never belong in a command; TAB is tolerated.
    if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(CommandError::BadCharacters);
    }
    let line = std::str::from_utf8(line).map_err(|_| CommandError::BadCharacters)?;
    // C1 controls (U+0080–U+009F) too: a HELO name ends up in Received headers and logs.
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(CommandError::BadCharacters);
    }
    let line = line.trim_end_matches([' ', '\t']);
    let (verb, rest) = match line.find([' ', '\t']) {
        Some(i) => (&line[..i], line[i..].trim_start_matches([' ', '\t'])),
        None => (line, ""),
    };
    let upper = verb.to_ascii_uppercase();
    let no_arg = |c: Command, verb: &'static str| {
        if rest.is_empty() {
            Ok(c)
        } else {
            Err(CommandError::UnexpectedArgument { verb })
        }
    };
    match upper.as_str() {
        "HELO" | "EHLO" => {
            if rest.is_empty() {
                return Err(CommandError::MissingArgument {
                    verb: if upper == "HELO" { "HELO" } else { "EHLO" },
                });
            }
            // RFC 5321 has one domain or address literal; some clients add words after it.
            let name = rest.split([' ', '\t']).next().unwrap_or(rest).to_string();
            Ok(if upper == "HELO" {
                Command::Helo(name)
            } else {
                Command::Ehlo(name)
            })
        }
        "MAIL" => {
            let arg = strip_keyword(rest, "FROM:").ok_or(CommandError::Syntax("MAIL"))?;
            let (from, params) = parse_path_and_params(arg, "MAIL")?;
            Ok(Command::Mail { from, params })
        }
        "RCPT" => {
            let arg = strip_keyword(rest, "TO:").ok_or(CommandError::Syntax("RCPT"))?;
            let (to, params) = parse_path_and_params(arg, "RCPT")?;
            Ok(Command::Rcpt { to, params })
        }
        "DATA" => no_arg(Command::Data, "DATA"),
        "BDAT" => Ok(Command::Bdat),
        "RSET" => no_arg(Command::Rset, "RSET"),
        // NOOP and HELP may carry an argument, which is ignored (RFC 5321 §4.1.1.9, §4.1.1.8).
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "QUIT" => no_arg(Command::Quit, "QUIT"),
        "VRFY" => {
            if rest.is_empty() {
                Err(CommandError::MissingArgument { verb: "VRFY" })
            } else {
                Ok(Command::Vrfy)
            }
        }
        "EXPN" => Ok(Command::Expn),
        "STARTTLS" => no_arg(Command::StartTls, "STARTTLS"),
        "AUTH" => Ok(Command::Auth(rest.to_string())),
        _ => Ok(Command::Unknown(verb.chars().take(32).collect())),
    }
}

/// `FROM:` / `TO:` case-insensitively, then optional spaces (RFC 5321 has none, but many
/// clients send `MAIL FROM: <a@b>`).
fn strip_keyword<'a>(rest: &'a str, keyword: &str) -> Option<&'a str> {
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    Some(rest[keyword.len()..].trim_start_matches([' ', '\t']))
}

fn parse_path_and_params(arg: &str, verb: &'static str) -> Result<(Address, Vec<Param>), CommandError> {
    if arg.is_empty() {
        return Err(CommandError::Syntax(verb));
    }
    let (addr, rest) = parse_path(arg).map_err(|error| CommandError::Address { verb, error })?;
    let mut params = Vec::new();
    for word in rest.split([' ', '\t']).filter(|w| !w.is_empty()) {
        params.push(parse_param(word)?);
    }
    Ok((addr, params))
}

fn parse_param(word: &str) -> Result<Param, CommandError> {
    let (key, value) = match word.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (word, None),
    };
    let key_ok = !key.is_empty()
        && key.len() <= 32
        && key.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    // esmtp-value: any printable except '=' and SP (RFC 5321 §4.1.2); UTF-8 allowed for
    // SMTPUTF8 (RFC 6531).
    let value_ok = value.is_none_or(|v| !v.is_empty() && v.len() <= 500 && !v.contains('='));
    if !key_ok || !value_ok {
        return Err(CommandError::Parameter(word.chars().take(64).collect()));
    }
    Ok(Param {
        key: key.to_ascii_uppercase(),
        value: value.map(str::to_string),
    })
}

// ---------------------------------------------------------------------------------------------
// DATA framing
// ---------------------------------------------------------------------------------------------

/// What to do with a bare CR or bare LF inside DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareLineEnd {
    /// Refuse the whole message (`550 5.6.0`) once it ends.
    Reject,
    /// Turn it into CRLF in the message; it still never ends the message.
    Normalize,
}

/// Why a message read through [`DataReader`] must be refused. The reader keeps framing
/// after a violation so the message is consumed up to its real end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataViolation {
    TooBig,
    BareLineEnd,
    LineTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DState {
    /// At the start of a line (after CRLF, or right after the DATA command).
    LineStart,
    /// Inside a line.
    InLine,
    /// Saw CR inside a line; LF would end the line.
    Cr,
    /// Saw `.` at the start of a line.
    Dot,
    /// Saw `.` CR at the start of a line; LF ends the message.
    DotCr,
}

/// Reads a message after `354`: only `<CRLF>.<CRLF>` ends it (RFC 5321 §4.1.1.4); dot-stuffing
/// is removed; bare CR / bare LF are refused or normalised but never start a line, so they
/// can neither end the message nor shift where it is unstuffed (SMTP smuggling).
#[derive(Debug)]
pub struct DataReader {
    state: DState,
    /// Bytes of the current line, terminator excluded.
    line_len: usize,
    max_size: usize,
    /// Longest line allowed, CRLF excluded.
    max_line: usize,
    bare: BareLineEnd,
    /// What is wrong with the message, each kept on its own so the verdict does not depend
    /// on the order it was found in (that order depends on how the input was split).
    too_big: bool,
    long_line: bool,
    bare_seen: bool,
    /// Size of the message as it would be emitted, counted even after a refusal.
    size: usize,
    /// Bytes received on the wire, for accounting.
    wire_bytes: usize,
}

impl DataReader {
    /// `max_size` bounds the unstuffed message; `max_line` is the RFC text-line limit
    /// including CRLF (1000).
    pub fn new(max_size: usize, max_line: usize, bare: BareLineEnd) -> Self {
        Self {
            state: DState::LineStart,
            line_len: 0,
            max_size,
            max_line: max_line.saturating_sub(2),
            bare,
            too_big: false,
            long_line: false,
            bare_seen: false,
            size: 0,
            wire_bytes: 0,
        }
    }

    /// Why the message must be refused, by a fixed priority: size (the most useful hint to
    /// the sender), then line length, then bare line ends.
    pub fn violation(&self) -> Option<DataViolation> {
        if self.too_big {
            Some(DataViolation::TooBig)
        } else if self.long_line {
            Some(DataViolation::LineTooLong)
        } else if self.bare_seen {
            Some(DataViolation::BareLineEnd)
        } else {
            None
        }
    }

    fn refused(&self) -> bool {
        self.too_big || self.long_line || self.bare_seen
    }

    pub fn wire_bytes(&self) -> usize {
        self.wire_bytes
    }

    fn violate(&mut self, v: DataViolation, out: &mut Vec<u8>) {
        match v {
            DataViolation::TooBig => self.too_big = true,
            DataViolation::LineTooLong => self.long_line = true,
            DataViolation::BareLineEnd => self.bare_seen = true,
        }
        // Nothing more is kept once the message is refused: memory stays bounded.
        out.clear();
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.size = self.size.saturating_add(bytes.len());
        if self.size > self.max_size {
            if !self.too_big {
                self.violate(DataViolation::TooBig, out);
            }
            return;
        }
        if !self.refused() {
            out.extend_from_slice(bytes);
        }
    }

    fn check_line_length(&mut self, out: &mut Vec<u8>) {
        if self.line_len > self.max_line && !self.long_line {
            self.violate(DataViolation::LineTooLong, out);
        }
    }

    fn content_byte(&mut self, b: u8, out: &mut Vec<u8>) {
        self.line_len += 1;
        self.check_line_length(out);
        self.emit(&[b], out);
        self.state = DState::InLine;
    }

    fn line_end(&mut self, out: &mut Vec<u8>) {
        self.emit(b"\r\n", out);
        self.line_len = 0;
        self.state = DState::LineStart;
    }

    /// A bare CR or LF: never a line start, so no unstuffing or end detection after it.
    fn bare_line_end(&mut self, out: &mut Vec<u8>) {
        match self.bare {
            BareLineEnd::Reject => self.violate(DataViolation::BareLineEnd, out),
            BareLineEnd::Normalize => self.emit(b"\r\n", out),
        }
        self.line_len = 0;
        self.state = DState::InLine;
    }

    /// Feeds `input`, appending message bytes to `out`. Returns `Some(n)` when the end of
    /// data was found after consuming `n` bytes of `input` (the rest is pipelined commands),
    /// `None` when all of `input` was consumed and more is needed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            // Fast path: copy a run of ordinary bytes inside a line in one go.
            if self.state == DState::InLine || self.state == DState::LineStart {
                let start = i;
                let first_special = memchr::memchr2(b'\r', b'\n', &input[i..]);
                let stop = first_special.map_or(input.len(), |p| i + p);
                let run_start = if self.state == DState::LineStart && stop > start && input[start] == b'.' {
                    start // the dot needs the slow path
                } else {
                    stop
                };
                if run_start > start {
                    let run = &input[start..run_start];
                    self.line_len += run.len();
                    self.check_line_length(out);
                    self.emit(run, out);
                    self.state = DState::InLine;
                    i = run_start;
                    continue;
                }
            }
            let b = input[i];
            i += 1;
            match (self.state, b) {
                (DState::LineStart, b'.') => self.state = DState::Dot,
                (DState::LineStart | DState::InLine, b'\r') => self.state = DState::Cr,
                (DState::LineStart | DState::InLine, b'\n') => self.bare_line_end(out),
                (DState::LineStart | DState::InLine, _) => self.content_byte(b, out),
                (DState::Cr, b'\n') => self.line_end(out),
                (DState::Cr, b'\r') => {
                    // The first CR was bare; the second may still start a CRLF.
                    self.bare_line_end(out);
                    self.state = DState::Cr;
                }
                (DState::Cr, _) => {
                    self.bare_line_end(out);
                    self.content_byte(b, out);
                }
                // A leading dot followed by anything but CR is removed (RFC 5321 §4.5.2).
                (DState::Dot, b'\r') => self.state = DState::DotCr,
                (DState::Dot, b'\n') => {
                    self.bare_line_end(out);
                }
                (DState::Dot, _) => self.content_byte(b, out),
                (DState::DotCr, b'\n') => {
                    self.wire_bytes += i;
                    return Some(i);
                }
                (DState::DotCr, b'\r') => {
                    self.bare_line_end(out);
                    self.state = DState::Cr;
                }
                (DState::DotCr, _) => {
                    self.bare_line_end(out);
                    self.content_byte(b, out);
                }
            }
        }
        self.wire_bytes += input.len();
        None
    }
}

/// Appends `msg` (an unstuffed message whose lines end in CRLF) dot-stuffed, followed by the
/// end-of-data marker, to `out`.
pub fn stuff_into(msg: &[u8], out: &mut Vec<u8>) {
    out.reserve(msg.len() + 8);
    let mut at_line_start = true;
    let mut rest = msg;
    while !rest.is_empty() {
        if at_line_start && rest[0] == b'.' {
            out.push(b'.');
        }
        match memchr::memchr(b'\n', rest) {
            Some(nl) => {
                out.extend_from_slice(&rest[..=nl]);
                rest = &rest[nl + 1..];
                at_line_start = true;
            }
            None => {
                out.extend_from_slice(rest);
                rest = &[];
                at_line_start = false;
            }
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], bare: BareLineEnd) -> (Option<usize>, Vec<u8>, Option<DataViolation>) {
        let mut r = DataReader::new(1 << 20, 1000, bare);
        let mut out = Vec::new();
        let end = r.feed(input, &mut out);
        (end, out, r.violation())
    }

    /// Feeds byte by byte; the result must equal feeding everything at once.
    fn read_split(input: &[u8], bare: BareLineEnd) -> (Option<usize>, Vec<u8>, Option<DataViolation>) {
        let mut r = DataReader::new(1 << 20, 1000, bare);
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            if let Some(n) = r.feed(std::slice::from_ref(b), &mut out) {
                assert_eq!(n, 1);
                return (Some(i + 1), out, r.violation());
            }
        }
        (None, out, r.violation())
    }

    #[test]
    fn plain_message_and_unstuffing() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n";
        let (end, out, v) = read_all(input, BareLineEnd::Reject);
        assert_eq!(end, Some(input.len() - 6));
        assert_eq!(out, b"Subject: x\r\n\r\n.leading dot\r\n");
        assert_eq!(v, None);
    }

    #[test]
    fn empty_message() {
        let (end, out, _) = read_all(b".\r\n", BareLineEnd::Reject);
        assert_eq!(end, Some(3));
        assert!(out.is_empty());
    }

    #[test]
    fn smuggling_variants_never_end_data() {
        // Each would end the message on some MTA; only CRLF.CRLF may end it here.
        let variants: &[&[u8]] = &[
            b"a\n.\nMAIL FROM:<x@y>\r\n",
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\r.\rMAIL FROM:<x@y>\r\n",
            b"a\r\r\n.\r\r\nMAIL FROM:<x@y>\r\n",
            b"a\n\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\r\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n..\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n\x00.\r\nMAIL FROM:<x@y>\r\n",
        ];
        for bare in [BareLineEnd::Reject, BareLineEnd::Normalize] {
            for v in variants {
                let (end, out, _) = read_all(v, bare);
                assert_eq!(
                    end,
                    None,
                    "{:?} ended data ({bare:?})",
                    String::from_utf8_lossy(v)
                );
                let (end2, out2, _) = read_split(v, bare);
                assert_eq!(end2, None);
                assert_eq!(out, out2);
                // Once the real end arrives, the smuggled text is inside the one message.
                let mut full = v.to_vec();
                full.extend_from_slice(b"\r\n.\r\n");
                let (end, out, viol) = read_all(&full, bare);
                assert_eq!(end, Some(full.len()));
                if bare == BareLineEnd::Normalize {
                    assert!(out.windows(4).any(|w| w == b"MAIL"), "{out:?}");
                    // No bare CR/LF survives normalisation.
                    for (i, &b) in out.iter().enumerate() {
                        if b == b'\n' {
                            assert_eq!(out[i - 1], b'\r');
                        }
                        if b == b'\r' {
                            assert_eq!(out.get(i + 1), Some(&b'\n'));
                        }
                    }
                } else if v.iter().any(|&b| b == b'\n' || b == b'\r')
                    && !v.starts_with(b"a\r\n..")
                    && !v.starts_with(b"a\r\n\x00")
                {
                    assert_eq!(
                        viol,
                        Some(DataViolation::BareLineEnd),
                        "{:?}",
                        String::from_utf8_lossy(v)
                    );
                }
            }
        }
    }

    #[test]
    fn normalised_dot_after_bare_lf_is_restuffed() {
        let (end, out, _) = read_all(b"a\n.\r\n\r\n.\r\n", BareLineEnd::Normalize);
        assert!(end.is_some());
        assert_eq!(out, b"a\r\n.\r\n\r\n");
        let mut wire = Vec::new();
        stuff_into(&out, &mut wire);
        assert_eq!(wire, b"a\r\n..\r\n\r\n.\r\n");
    }

    #[test]
    fn split_input_matches_whole_input() {
        let inputs: &[&[u8]] = &[
            b"Subject: hi\r\n\r\nbody\r\n..dot\r\n.x\r\n\r\n.\r\nRSET\r\n",
            b"x\r\r\ny\n\rz\r\n.\r\n",
            b".\r\n",
            b"..\r\n.\r\n",
        ];
        for bare in [BareLineEnd::Reject, BareLineEnd::Normalize] {
            for input in inputs {
                let whole = read_all(input, bare);
                let split = read_split(input, bare);
                assert_eq!(whole, split, "{:?}", String::from_utf8_lossy(input));
            }
        }
    }

    #[test]
    fn size_and_line_limits() {
        let mut r = DataReader::new(10, 1000, BareLineEnd::Reject);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"0123456789abc\r\n.\r\n", &mut out), Some(18));
        assert_eq!(r.violation(), Some(DataViolation::TooBig));
        assert!(out.is_empty());

        let mut r = DataReader::new(1 << 20, 10, BareLineEnd::Reject);
        let mut out = Vec::new();
        assert_eq!(r.feed(b"12345678\r\n.\r\n", &mut out), Some(13));
        assert_eq!(r.violation(), None);
        let mut r = DataReader::new(1 << 20, 10, BareLineEnd::Reject);
        assert_eq!(r.feed(b"123456789\r\n.\r\n", &mut out), Some(14));
        assert_eq!(r.violation(), Some(DataViolation::LineTooLong));
    }

    #[test]
    fn stuffing_roundtrip() {
        let msg = b"a\r\n.b\r\n..c\r\n.\r\n";
        let mut wire = Vec::new();
        stuff_into(msg, &mut wire);
        assert_eq!(wire, b"a\r\n..b\r\n...c\r\n..\r\n.\r\n");
        let (end, out, _) = read_all(&wire, BareLineEnd::Reject);
        assert_eq!(end, Some(wire.len()));
        assert_eq!(out, msg);
        let mut wire = Vec::new();
        stuff_into(b"", &mut wire);
        assert_eq!(wire, b".\r\n");
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse_command(b"EHLO mail.example.com"),
            Ok(Command::Ehlo("mail.example.com".into()))
        );
        assert_eq!(parse_command(b"helo x y"), Ok(Command::Helo("x".into())));
        assert!(matches!(
            parse_command(b"EHLO"),
            Err(CommandError::MissingArgument { .. })
        ));
        let Ok(Command::Mail { from, params }) =
            parse_command(b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME")
        else {
            panic!()
        };
        assert_eq!(from.raw, "a@b.example");
        assert_eq!(
            params[0],
            Param {
                key: "SIZE".into(),
                value: Some("100".into())
            }
        );
        assert_eq!(params[1].key, "BODY");
        assert!(matches!(
            parse_command(b"mail from: <>"),
            Ok(Command::Mail { .. })
        ));
        assert!(matches!(
            parse_command(b"RCPT TO:<x@y.example> NOTIFY=SUCCESS,FAILURE"),
            Ok(Command::Rcpt { .. })
        ));
        assert_eq!(
            parse_command(b"RCPT TO:<x@y> FOO=a=b"),
            Err(CommandError::Parameter("FOO=a=b".into()))
        );
        assert_eq!(parse_command(b"MAIL TO:<x@y>"), Err(CommandError::Syntax("MAIL")));
        assert_eq!(
            parse_command(b"DATA x"),
            Err(CommandError::UnexpectedArgument { verb: "DATA" })
        );
        assert_eq!(parse_command(b"RSET\r"), Err(CommandError::BadCharacters));
        assert_eq!(
            parse_command("EHLO a\u{85}b.example".as_bytes()),
            Err(CommandError::BadCharacters)
        );
        assert_eq!(parse_command(b"noop anything"), Ok(Command::Noop));
        assert_eq!(parse_command(b"XYZZY"), Ok(Command::Unknown("XYZZY".into())));
    }

    #[test]
    fn line_finding() {
        assert_eq!(
            find_line(b"NOOP\r\nQUIT\r\n", 512),
            LineStatus::Complete { len: 6, content: 4 }
        );
        assert_eq!(
            find_line(b"NOOP\nQUIT", 512),
            LineStatus::Complete { len: 5, content: 4 }
        );
        assert_eq!(find_line(b"NOOP", 512), LineStatus::Incomplete);
        assert_eq!(find_line(&[b'a'; 600], 512), LineStatus::TooLong);
        let mut line = vec![b'a'; 510];
        line.extend_from_slice(b"\r\n");
        assert_eq!(
            find_line(&line, 512),
            LineStatus::Complete {
                len: 512,
                content: 510
            }
        );
        line.insert(0, b'a');
        assert_eq!(find_line(&line, 512), LineStatus::TooLong);
    }

    #[test]
    fn replies() {
        let mut p = ReplyParser::default();
        let mut buf = b"250-mx.example.com\r\n250-PIPELINING\r\n250 SIZE 1000\r\n".to_vec();
        let r = p.parse(&mut buf).unwrap().unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.lines, vec!["mx.example.com", "PIPELINING", "SIZE 1000"]);
        let mut buf = b"550-5.1.1 no such\r\n550 5.1.1 user\r\n".to_vec();
        let r = p.parse(&mut buf).unwrap().unwrap();
        assert_eq!(r.enhanced, Some(Enhanced(5, 1, 1)));
        assert_eq!(r.lines, vec!["no such", "user"]);
        assert_eq!(r.to_bytes(), b"550-5.1.1 no such\r\n550 5.1.1 user\r\n");
        let mut buf = b"250 2.0.0 Ok: queued as ABC\r\n".to_vec();
        assert_eq!(
            p.parse(&mut buf).unwrap().unwrap().summary(),
            "250 2.0.0 Ok: queued as ABC"
        );
        let mut buf = b"hello\r\n".to_vec();
        assert!(p.parse(&mut buf).is_err());
        let mut buf = b"250".to_vec();
        assert_eq!(p.parse(&mut buf), Ok(None));
        buf.extend_from_slice(b"\r\n");
        assert_eq!(p.parse(&mut buf).unwrap().unwrap().lines, vec![""]);

        // The wire form and the summary, written without the formatter, against `format!`.
        for code in [0u16, 7, 42, 220, 554, 65535] {
            for enhanced in [
                None,
                Some(Enhanced(2, 0, 0)),
                Some(Enhanced(5, 7, 26)),
                Some(Enhanced(4, 123, 999)),
            ] {
                for lines in [vec![], vec![""], vec!["one"], vec!["first", "", "last line"]] {
                    let r = Reply {
                        code,
                        enhanced,
                        lines: lines.iter().map(|l| l.to_string()).collect(),
                    };
                    let mut want = String::new();
                    let n = lines.len().max(1);
                    for i in 0..n {
                        let text = lines.get(i).copied().unwrap_or("");
                        let sep = if i + 1 == n { ' ' } else { '-' };
                        want += &match enhanced {
                            Some(e) if !text.is_empty() => format!("{code}{sep}{e} {text}\r\n"),
                            Some(e) => format!("{code}{sep}{e}\r\n"),
                            None => format!("{code}{sep}{text}\r\n"),
                        };
                    }
                    assert_eq!(String::from_utf8(r.to_bytes()).unwrap(), want);
                    let first = lines.first().copied().unwrap_or("");
                    let summary = match enhanced {
                        Some(e) => format!("{code} {e} {first}"),
                        None => format!("{code} {first}"),
                    };
                    assert_eq!(r.summary(), summary);
                }
            }
        }
    }
}
