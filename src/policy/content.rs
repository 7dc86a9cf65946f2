//! The `content` check (`[checks.content]`): PCRE-style regex rules on the Subject, named
//! headers, any header, the raw header section and the decoded text body parts, from the
//! configuration and from rule files. Also the MIME plumbing the `attachments` check shares
//! (`parse_message`, `walk`: crate-internal).
//!
//! # What a rule sees (`where`)
//!
//! - `subject`: each `Subject:` header, RFC 2047 encoded words decoded, unfolded. A message
//!   without one is matched as one empty subject (so `/^\s*$/` catches both).
//! - `header:NAME`: each header named NAME (case-insensitive), decoded and unfolded, without
//!   the name. MIME headers (`Content-Type`, `Content-Disposition`) are matched as their raw,
//!   unfolded value.
//! - `headers`: each header of the message as one `Name: decoded value` line.
//! - `raw_headers`: the header section as received (folded, encoded words not decoded), as one
//!   text; use the `m` flag for `^`/`$` at line boundaries.
//! - `body`: each text part (`text/plain`, `text/html` and other `text/*`, also those of
//!   attached `message/rfc822` messages up to [`MAX_MESSAGE_DEPTH`] deep), decoded from
//!   quoted-printable or base64 and converted from its charset to UTF-8. HTML is matched as
//!   markup (so rules can see link targets). At most `max_scan_bytes` of decoded text per
//!   message are looked at.
//!
//! Only the top-level message's headers are header targets (the first [`MAX_HEADERS`]);
//! headers of MIME parts are not. A message too hostile to parse safely (hundreds of
//! thousands of MIME parts or tiny header lines) is matched on its raw, unfolded header fields
//! (encoded words not decoded) and its raw body.
//! Line ends in the text are CRLF as received, and all rules run in CRLF mode: with the `m`
//! flag `^` and `$` match at `\r\n` line boundaries, and `.` matches neither `\r` nor `\n`.
//!
//! # Patterns
//!
//! `/pattern/flags` (flags `i` case-insensitive, `m` multi-line, `s` dot matches newline,
//! `x` extended) or a bare pattern. A pattern that the linear-time `regex` crate accepts runs
//! there (up to [`EACH_MAX`] rules of one target run one by one, more share one `RegexSet`,
//! one pass over each text for all of them); a pattern that
//! needs look-around, back-references, atomic groups or possessive quantifiers runs on
//! `fancy-regex`, a backtracking engine, with a backtrack limit (`backtrack_limit`) per search.
//! Such a rule sees at most [`MAX_FANCY_BYTES`] of its target per message, and gives up on a
//! message when one search hits the limit or when it has spent [`FANCY_TIME_BUDGET`] on it:
//! it then counts as not matching, and a warning is logged (at most one a minute, with the
//! count of those not logged). Backtracking rules cost about 50–100 ns per byte each even when
//! nothing matches (linear ones a few ns for all of them together): prefer linear patterns.
//!
//! # Verdict
//!
//! The first matching `reject` or `tempfail` rule in order (configuration rules first, then
//! the files in order, lines in order) decides. When none matches, the matching `score:N`
//! rules add up into one score verdict. `monitor` rules that match are logged, never acted on.
//! The reply is `550 5.7.1 Message refused by content rule NAME` (or the rule's `reply`
//! text); `tempfail` turns it into `450 4.7.1`. Matched text is never echoed or logged.
//!
//! # Rule files
//!
//! One rule a line, fields separated by spaces or tabs:
//!
//! ```text
//! # name        where            action     /pattern/flags               [reply text]
//! pills         subject          reject     /v[i1]agra|c[i1]al[i1]s/i
//! bulk-mailer   header:X-Mailer  score:2.5  /^(bulk|mass) ?mailer/i
//! link-farm     body             monitor    /(https?:\/\/\S+\s+){20}/    Too many links
//! ```
//!
//! A line whose first non-blank character is `#` is a comment; blank lines are ignored. The
//! pattern must be written between slashes; a `/` inside it is written `\/`. Everything after
//! the flags is the optional reply text. Names are letters, digits, `-`, `_` and `.`, unique
//! across the configuration and all files.

use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use mail_parser::{HeaderValue, Message, MessageParser, MessagePart, PartType};
use regex::{RegexBuilder, RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize};

use super::{BoxFuture, Category, Check, CheckAction, CheckError, Context, Refusal, Stage, Verdict};
use crate::config::bytesize;
use crate::smtp::codec::Reply;

/// How deep attached `message/rfc822` messages are followed for `body` rules.
pub const MAX_MESSAGE_DEPTH: usize = 3;
/// Text one backtracking (fancy) rule looks at per message, all its texts together (the
/// first bytes of each, in order). The engine costs about 50 to 100 ns per byte and rule even
/// when nothing matches; the cap keeps a rule at milliseconds on any message.
pub const MAX_FANCY_BYTES: usize = 256 << 10;
/// Time one backtracking rule may spend on one message, all its texts together, before it
/// gives up (no match, warning). A safety net: each search is bounded by the step limit, but a
/// message may have many texts.
pub const FANCY_TIME_BUDGET: std::time::Duration = std::time::Duration::from_millis(10);
/// Headers of the message looked at by header rules; later ones are not (a legitimate header
/// section has a few dozen, a hostile one could have hundreds of thousands).
pub const MAX_HEADERS: usize = 10_000;
/// Compiled size allowed for one pattern.
const REGEX_SIZE_LIMIT: usize = 2 << 20;
/// Compiled size allowed for the patterns of one target together.
const REGEX_SET_SIZE_LIMIT: usize = 32 << 20;
/// Lazy DFA cache for one pattern or set: past it the engine falls back to a slower (still
/// linear) one rather than grow.
const DFA_SIZE_LIMIT: usize = 8 << 20;
/// Up to this many linear rules of one target run one regex after the other; more run as one
/// set. A single regex searches with its literal prefilter (SIMD, hundreds of bytes per step),
/// while a set search reports every pattern that matches and so steps the lazy DFA through
/// every byte: on 2 KiB of text one rule costs 0.2–0.7 µs alone and 3.5 µs as a set, eight
/// 1.3–2.3 µs one by one and 3.7–4.3 µs as a set, sixteen about the same either way.
pub const EACH_MAX: usize = 8;
/// A rule file larger than this is refused (a mistaken path such as a log file or a device).
const MAX_FILE_BYTES: u64 = 16 << 20;
/// Errors reported per rule file; a wrong file would otherwise produce one per line.
const MAX_FILE_ERRORS: usize = 20;
/// Messages larger than this are matched on the blocking thread pool, so a big message does
/// not hold up the other sessions on the same runtime worker for milliseconds.
pub(crate) const INLINE_LIMIT: usize = 64 << 10;
/// MIME parts walked per message for `body` rules.
const MAX_PARTS: usize = 1000;

/// `[checks.content]`: regex rules on headers and decoded text. Default: no rules.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentConfig {
    /// Run the check at all. Default true (it does nothing without rules).
    pub enabled: bool,
    /// `[[checks.content.rules]]`, in order. Default none.
    pub rules: Vec<RuleConfig>,
    /// Rule files, one rule a line (syntax in the module documentation and in
    /// `config/rules.example.txt`); their rules come after `rules`, in file order. Read when
    /// the configuration is loaded or reloaded. Default none.
    pub files: Vec<PathBuf>,
    /// Decoded body text looked at per message, all text parts together; the rest is not
    /// matched. Also caps `raw_headers`. Default "4MiB".
    #[serde(with = "bytesize")]
    pub max_scan_bytes: u64,
    /// Backtracking steps one look-around/back-reference rule may take in one search before
    /// it gives up on the message (counts as no match, logs a warning); 1000 to 10000000.
    /// Default 100000.
    pub backtrack_limit: usize,
}

impl Default for ContentConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rules: Vec::new(),
            files: Vec::new(),
            max_scan_bytes: 4 << 20,
            backtrack_limit: 100_000,
        }
    }
}

impl ContentConfig {
    /// True when there is nothing to check (the check need not be built).
    pub fn is_empty(&self) -> bool {
        !self.enabled || (self.rules.is_empty() && self.files.is_empty())
    }

    /// Every error in the rules and rule files, keyed (`checks.content.rules[3].pattern: …`).
    pub fn validate(&self) -> Vec<String> {
        ContentCheck::build(self).err().unwrap_or_default()
    }
}

/// One `[[checks.content.rules]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// For logs and the default reply: letters, digits, `-`, `_`, `.`; unique.
    pub name: String,
    /// What the pattern is matched on: `subject`, `header:NAME`, `headers`, `raw_headers` or
    /// `body`.
    #[serde(rename = "where")]
    pub target: String,
    /// `/pattern/flags` (flags `i`, `m`, `s`, `x`) or a bare pattern.
    pub pattern: String,
    /// `reject` (default), `tempfail`, `score:N` or `monitor`.
    #[serde(default = "default_action")]
    pub action: CheckAction,
    /// Reply text instead of `Message refused by content rule NAME` (printable ASCII, at most
    /// 200 characters). The code stays `550 5.7.1` (`450 4.7.1` for `tempfail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

fn default_action() -> CheckAction {
    CheckAction::Reject
}

/// Where a rule looks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Subject,
    /// Lower case.
    Header(String),
    Headers,
    RawHeaders,
    Body,
}

impl Target {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let lower = t.to_ascii_lowercase();
        match lower.as_str() {
            "subject" => Ok(Self::Subject),
            "headers" => Ok(Self::Headers),
            "raw_headers" => Ok(Self::RawHeaders),
            "body" => Ok(Self::Body),
            _ => match lower.strip_prefix("header:") {
                // RFC 5322 field names: printable ASCII except ':'.
                Some(name)
                    if !name.is_empty() && name.bytes().all(|b| (33..127).contains(&b) && b != b':') =>
                {
                    Ok(Self::Header(name.to_string()))
                }
                _ => Err(format!(
                    "{t:?} is not a place to look (subject, header:NAME, headers, raw_headers or body)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Subject => f.write_str("subject"),
            Self::Header(n) => write!(f, "header:{n}"),
            Self::Headers => f.write_str("headers"),
            Self::RawHeaders => f.write_str("raw_headers"),
            Self::Body => f.write_str("body"),
        }
    }
}

/// A pattern split from its `/…/flags` form: the source handed to the engines, flags inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pub source: String,
}

impl Pattern {
    /// Parses `/pattern/flags` or a bare pattern (one that does not start with `/`).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with('/') {
            match split_delimited(text) {
                Some((pattern, flags, "")) if flags.chars().all(|c| c.is_ascii_alphabetic()) => {
                    Self::from_parts(&pattern, flags)
                }
                _ => Err(format!(
                    "{text:?} starts with '/' but is not /pattern/flags (flags i, m, s, x); write a \
                     leading slash of a bare pattern as \\/"
                )),
            }
        } else {
            Self::from_parts(text, "")
        }
    }

    fn from_parts(pattern: &str, flags: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        let mut inline = String::new();
        for f in flags.chars() {
            if !matches!(f, 'i' | 'm' | 's' | 'x') {
                return Err(format!("unknown flag {f:?} (use i, m, s or x)"));
            }
            if !inline.contains(f) {
                inline.push(f);
            }
        }
        let source = if inline.is_empty() {
            pattern.to_string()
        } else {
            format!("(?{inline}){pattern}")
        };
        Ok(Self { source })
    }
}

/// Splits `/pattern/flags rest` at the first unescaped `/` after the opening one. `\/` in the
/// pattern becomes `/` (the escape only protects the delimiter); other escapes stay. Returns
/// the pattern, the flags (letters up to the first blank) and the trimmed rest.
fn split_delimited(text: &str) -> Option<(String, &str, &str)> {
    let body = text.strip_prefix('/')?;
    let mut pattern = String::with_capacity(body.len());
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, '/')) => pattern.push('/'),
                Some((_, n)) => {
                    pattern.push('\\');
                    pattern.push(n);
                }
                None => return None,
            },
            '/' => {
                let after = &body[i + 1..];
                let end = after.find([' ', '\t']).unwrap_or(after.len());
                return Some((pattern, &after[..end], after[end..].trim()));
            }
            c => pattern.push(c),
        }
    }
    None
}

/// A rule as read, before compiling.
#[derive(Debug, Clone)]
struct RuleSource {
    name: String,
    target: Target,
    pattern: Pattern,
    action: CheckAction,
    reply: Option<String>,
}

/// Rules compiled so far, in order.
struct Builder {
    backtrack_limit: usize,
    /// Lower-case name → where it was defined.
    seen: std::collections::HashMap<String, String>,
    rules: Vec<Rule>,
    groups: Vec<Group>,
    /// Per group, the sources of its linear rules and, while the group has at most
    /// [`EACH_MAX`], each compiled alone (to run one by one); past that only the sources
    /// are kept, compiled into one set at the end (a rule file of thousands would otherwise
    /// hold every compiled rule until then).
    patterns: Vec<Vec<(String, Option<regex::Regex>)>>,
}

impl Builder {
    /// Compiles and adds one rule defined at `origin`; the error names the bad field.
    fn add(&mut self, s: RuleSource, origin: &str) -> Result<(), (&'static str, String)> {
        let key = s.name.to_ascii_lowercase();
        if let Some(first) = self.seen.get(&key) {
            return Err((
                "name",
                format!("rule name {:?} is already used by {first}", s.name),
            ));
        }
        let compiled = compile(&s.pattern, self.backtrack_limit).map_err(|e| ("pattern", e))?;
        self.seen.insert(key, origin.to_string());
        let g = match self.groups.iter().position(|g| g.target == s.target) {
            Some(g) => g,
            None => {
                self.groups.push(Group {
                    target: s.target.clone(),
                    linear: None,
                    members: Vec::new(),
                    fancy: Vec::new(),
                });
                self.patterns.push(Vec::new());
                self.groups.len() - 1
            }
        };
        let index = self.rules.len();
        let fancy = match compiled {
            Matcher::Linear(re) => {
                self.groups[g].members.push(index);
                let patterns = &mut self.patterns[g];
                let fits = patterns.len() < EACH_MAX;
                patterns.push((s.pattern.source.clone(), fits.then_some(re)));
                if patterns.len() == EACH_MAX + 1 {
                    // This target's rules will run as a set: none is needed alone.
                    patterns.iter_mut().for_each(|(_, re)| *re = None);
                }
                None
            }
            Matcher::Fancy(re) => {
                self.groups[g].fancy.push(index);
                Some(re)
            }
        };
        let text = s
            .reply
            .unwrap_or_else(|| format!("Message refused by content rule {}", s.name));
        self.rules.push(Rule {
            name: s.name,
            action: s.action,
            refusal: Refusal {
                reply: Reply::build(550, "5.7.1", text),
                category: Category::Content,
            },
            fancy,
        });
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{name:?} is not a rule name (1 to 64 letters, digits, '-', '_', '.')"
        ));
    }
    Ok(())
}

fn check_reply(reply: &str) -> Result<(), String> {
    if reply.trim().is_empty() || reply.len() > 200 || !reply.bytes().all(|b| (32..127).contains(&b)) {
        return Err(format!(
            "{reply:?} is not a reply text (1 to 200 printable ASCII characters)"
        ));
    }
    Ok(())
}

/// Parses one rule-file line (comments and blank lines already skipped).
fn parse_line(line: &str) -> Result<RuleSource, String> {
    let mut rest = line.trim();
    let mut field = || {
        let end = rest.find([' ', '\t']).unwrap_or(rest.len());
        let f = &rest[..end];
        rest = rest[end..].trim_start();
        f
    };
    let (name, target, action) = (field(), field(), field());
    if rest.is_empty() {
        return Err("a rule is: name  where  action  /pattern/flags  [reply text]".into());
    }
    check_name(name)?;
    let target = Target::parse(target)?;
    let action = CheckAction::parse(action)?;
    let Some((pattern, flags, reply)) = split_delimited(rest) else {
        return Err(format!(
            "{rest:?}: the pattern must be written /pattern/flags (a '/' inside as \\/)"
        ));
    };
    if !flags.is_empty() && !flags.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(format!(
            "{flags:?}: flags are letters i, m, s, x right after the closing '/'"
        ));
    }
    let pattern = Pattern::from_parts(&pattern, flags)?;
    let reply = if reply.is_empty() {
        None
    } else {
        check_reply(reply)?;
        Some(reply.to_string())
    };
    Ok(RuleSource {
        name: name.to_string(),
        target,
        action,
        pattern,
        reply,
    })
}

fn read_limited(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {} MiB", MAX_FILE_BYTES >> 20));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())
}

/// One pattern compiled for the engine it needs.
enum Matcher {
    /// Linear time; it goes to its target's [`Linear`].
    Linear(regex::Regex),
    /// Backtracking, with a step limit.
    Fancy(fancy_regex::Regex),
}

struct Rule {
    name: String,
    action: CheckAction,
    refusal: Refusal,
    /// The backtracking engine of a rule that needs one; a linear rule runs in its target's
    /// [`Linear`].
    fancy: Option<fancy_regex::Regex>,
}

/// How the linear rules of one target run; pattern `i` is the group's rule `members[i]`.
enum Linear {
    /// Each on its own (at most [`EACH_MAX`]), in order.
    Each(Vec<regex::Regex>),
    /// All in one set.
    Set(RegexSet),
}

/// The rules of one target.
struct Group {
    target: Target,
    /// The linear rules, in order (none when the target has only backtracking rules).
    linear: Option<Linear>,
    members: Vec<usize>,
    /// Indexes of the fancy rules, in order.
    fancy: Vec<usize>,
}

/// One linear pattern on its own. The lazy DFA cache is a share of the set's, so a target's
/// rules together may grow no more caches than one set would.
fn linear_regex(source: &str) -> Result<regex::Regex, regex::Error> {
    RegexBuilder::new(source)
        .crlf(true)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(DFA_SIZE_LIMIT / EACH_MAX)
        .build()
}

/// Compiles one pattern: linear when the `regex` crate accepts it, else backtracking.
fn compile(pattern: &Pattern, backtrack_limit: usize) -> Result<Matcher, String> {
    match linear_regex(&pattern.source) {
        Ok(re) => Ok(Matcher::Linear(re)),
        Err(regex::Error::CompiledTooBig(n)) => {
            Err(format!("pattern too large (compiled size over {} KiB)", n >> 10))
        }
        Err(e) => {
            let linear_error = one_line(&e.to_string());
            match fancy_regex::RegexBuilder::new(&pattern.source)
                .crlf(true)
                .backtrack_limit(backtrack_limit)
                .delegate_size_limit(REGEX_SIZE_LIMIT)
                .delegate_dfa_size_limit(DFA_SIZE_LIMIT)
                .build()
            {
                Ok(re) => Ok(Matcher::Fancy(re)),
                // The `regex` message is the clearer one for plain syntax errors; the fancy
                // one when the pattern uses what only fancy-regex supports.
                Err(fe) if linear_error.contains("look-around") || linear_error.contains("backreference") => {
                    Err(one_line(&fe.to_string()))
                }
                Err(_) => Err(linear_error),
            }
        }
    }
}

/// `regex` errors draw a caret diagram over several lines; a config error is one line.
fn one_line(message: &str) -> String {
    match message.lines().find_map(|l| l.trim().strip_prefix("error: ")) {
        Some(e) => format!("regex parse error: {e}"),
        None => message.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// Counts warnings so a flood of hostile messages logs one line a minute.
struct WarnLimiter {
    start: Instant,
    /// Seconds since `start` of the last logged warning, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnLimiter {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Some(number suppressed since the last one) when this warning should be logged.
    fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now >= last + 60)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// What the rules found in one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Names of the rules that matched, in rule order. Backtracking rules that could not change
    /// the verdict (after an earlier deciding match) are not tried, so not listed.
    pub matched: Vec<String>,
    pub verdict: Verdict,
}

struct Inner {
    enabled: bool,
    rules: Vec<Rule>,
    groups: Vec<Group>,
    max_scan_bytes: usize,
    warn: WarnLimiter,
}

/// The compiled content rules.
pub struct ContentCheck {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ContentCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentCheck")
            .field(
                "rules",
                &self.inner.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ContentCheck {
    /// Reads the rule files and compiles every rule.
    ///
    /// # Errors
    /// Every bad rule, keyed: `checks.content.rules[3].pattern: …`,
    /// `checks.content.files: path:12: …`.
    pub fn build(config: &ContentConfig) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        if !(1000..=10_000_000).contains(&config.backtrack_limit) {
            errors.push("checks.content.backtrack_limit: must be between 1000 and 10000000".into());
        }
        if config.max_scan_bytes < 1024 {
            errors.push("checks.content.max_scan_bytes: must be at least 1KiB".into());
        }
        let mut b = Builder {
            backtrack_limit: config.backtrack_limit,
            seen: std::collections::HashMap::new(),
            rules: Vec::new(),
            groups: Vec::new(),
            patterns: Vec::new(),
        };
        for (i, r) in config.rules.iter().enumerate() {
            let key = format!("checks.content.rules[{i}]");
            let mut ok = true;
            let mut fail = |field: &str, e: String| {
                errors.push(format!("{key}.{field}: {e}"));
                ok = false;
            };
            if let Err(e) = check_name(&r.name) {
                fail("name", e);
            }
            let target = Target::parse(&r.target).map_err(|e| fail("where", e)).ok();
            let pattern = Pattern::parse(&r.pattern).map_err(|e| fail("pattern", e)).ok();
            if let Some(reply) = &r.reply
                && let Err(e) = check_reply(reply)
            {
                fail("reply", e);
            }
            if let (true, Some(target), Some(pattern)) = (ok, target, pattern) {
                let source = RuleSource {
                    name: r.name.clone(),
                    target,
                    pattern,
                    action: r.action,
                    reply: r.reply.clone(),
                };
                if let Err((field, e)) = b.add(source, &key) {
                    errors.push(format!("{key}.{field}: {e}"));
                }
            }
        }
        for path in &config.files {
            let shown = path.display();
            let text = match read_limited(path) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!("checks.content.files: {shown}: {e}"));
                    continue;
                }
            };
            let mut file_errors = 0;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let origin = format!("checks.content.files: {shown}:{}", n + 1);
                let added = parse_line(line).and_then(|source| b.add(source, &origin).map_err(|(_, e)| e));
                if let Err(e) = added {
                    file_errors += 1;
                    if file_errors <= MAX_FILE_ERRORS {
                        errors.push(format!("{origin}: {e}"));
                    }
                }
            }
            if file_errors > MAX_FILE_ERRORS {
                errors.push(format!(
                    "checks.content.files: {shown}: {} more bad lines not shown",
                    file_errors - MAX_FILE_ERRORS
                ));
            }
        }
        let Builder {
            rules,
            mut groups,
            patterns,
            ..
        } = b;
        for (group, patterns) in groups.iter_mut().zip(patterns) {
            if patterns.is_empty() {
                continue;
            }
            if patterns.len() <= EACH_MAX {
                group.linear = Some(Linear::Each(
                    patterns.into_iter().filter_map(|(_, re)| re).collect(),
                ));
                continue;
            }
            match RegexSetBuilder::new(patterns.iter().map(|(source, _)| source))
                .crlf(true)
                .size_limit(REGEX_SET_SIZE_LIMIT)
                .dfa_size_limit(DFA_SIZE_LIMIT)
                .build()
            {
                Ok(set) => group.linear = Some(Linear::Set(set)),
                Err(e) => errors.push(format!(
                    "checks.content.rules: the {} patterns together are too large: {}",
                    group.target,
                    one_line(&e.to_string())
                )),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                enabled: config.enabled,
                rules,
                groups,
                max_scan_bytes: usize::try_from(config.max_scan_bytes).unwrap_or(usize::MAX),
                warn: WarnLimiter::new(),
            }),
        })
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.inner.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.rules.is_empty()
    }

    /// Matches the rules against one message (the unstuffed DATA): what matched and the
    /// verdict. Synchronous; [`Check::check`] runs it on the blocking pool for big messages.
    pub fn evaluate(&self, message: &[u8]) -> Outcome {
        self.inner.evaluate(&SharedMessage::new(message), "-")
    }
}

impl Inner {
    fn evaluate(&self, message: &dyn MessageView, session: &str) -> Outcome {
        let texts = Texts::new(message, self.max_scan_bytes, &self.groups);
        let mut matched = vec![false; self.rules.len()];
        for (g, group) in self.groups.iter().enumerate() {
            let Some(linear) = &group.linear else { continue };
            let mut left = group.members.len();
            for text in texts.of(g) {
                match linear {
                    Linear::Set(set) => {
                        for m in set.matches(text).iter() {
                            if !std::mem::replace(&mut matched[group.members[m]], true) {
                                left -= 1;
                            }
                        }
                    }
                    Linear::Each(each) => {
                        for (m, re) in each.iter().enumerate() {
                            let rule = group.members[m];
                            if !matched[rule] && re.is_match(text) {
                                matched[rule] = true;
                                left -= 1;
                            }
                        }
                    }
                }
                if left == 0 {
                    break;
                }
            }
        }
        let deciding = |a: CheckAction| matches!(a, CheckAction::Reject | CheckAction::TempFail);
        let mut decided = (0..self.rules.len()).find(|&i| matched[i] && deciding(self.rules[i].action));
        // Backtracking rules are the expensive ones: a deciding one runs only when it could
        // come before the decision found so far, a scoring or monitor one only when nothing
        // decided at all.
        let mut fancy: Vec<(usize, usize)> = self
            .groups
            .iter()
            .enumerate()
            .flat_map(|(g, group)| group.fancy.iter().map(move |&i| (i, g)))
            .collect();
        fancy.sort_unstable();
        for &(i, g) in &fancy {
            if decided.is_some_and(|d| d < i) || !deciding(self.rules[i].action) {
                continue;
            }
            if self.fancy_match(i, &texts, g, session) {
                matched[i] = true;
                decided = Some(i);
                break;
            }
        }
        if decided.is_none() {
            for &(i, g) in &fancy {
                if !deciding(self.rules[i].action) && self.fancy_match(i, &texts, g, session) {
                    matched[i] = true;
                }
            }
        }

        let names = (0..self.rules.len())
            .filter(|&i| matched[i])
            .map(|i| self.rules[i].name.clone())
            .collect();
        let verdict = self.verdict(&matched, decided, session);
        Outcome {
            matched: names,
            verdict,
        }
    }

    fn verdict(&self, matched: &[bool], decided: Option<usize>, session: &str) -> Verdict {
        let hits = || {
            self.rules
                .iter()
                .zip(matched)
                .filter(|(_, m)| **m)
                .map(|(r, _)| r)
        };
        let mut verdict = match decided {
            Some(d) => self.rules[d].action.verdict(self.rules[d].refusal.clone()),
            None => Verdict::Pass,
        };
        if decided.is_none() {
            let mut score = 0.0;
            let mut top: Option<(f32, &Rule)> = None;
            for rule in hits() {
                if let CheckAction::Score(points) = rule.action {
                    score += points;
                    if top.is_none_or(|(p, _)| points > p) {
                        top = Some((points, rule));
                    }
                }
            }
            if let Some((_, rule)) = top {
                // The rule that scored most explains a too-high total.
                verdict = Verdict::Score {
                    points: score,
                    refusal: rule.refusal.clone(),
                };
            }
        }
        // Monitor rules never act. When nothing else did, the first one is the verdict (the
        // pipeline logs it); every other match is logged here.
        for rule in hits().filter(|r| r.action == CheckAction::Monitor) {
            if verdict == Verdict::Pass {
                verdict = Verdict::Monitor(rule.refusal.clone());
            } else {
                tracing::info!(session, rule = %rule.name, reply = %rule.refusal.reply, "Monitor: content rule matched.");
            }
        }
        verdict
    }

    /// Tries one backtracking rule on its target's texts, within its per-message budget.
    fn fancy_match(&self, rule: usize, texts: &Texts, group: usize, session: &str) -> bool {
        let Some(re) = &self.rules[rule].fancy else {
            return false;
        };
        let start = Instant::now();
        let mut budget = MAX_FANCY_BYTES;
        let give_up = |why: &dyn std::fmt::Display| {
            if let Some(suppressed) = self.warn.allow() {
                tracing::warn!(
                    session,
                    rule = %self.rules[rule].name,
                    why = %why,
                    suppressed,
                    "Content rule gave up on this message: counted as no match."
                );
            }
            false
        };
        for text in texts.of(group) {
            if budget == 0 {
                break;
            }
            // The step limit bounds one search, not how many texts a message has: the time
            // budget bounds them all (normal mail stays far below it).
            if start.elapsed() > FANCY_TIME_BUDGET {
                return give_up(&"time budget used up");
            }
            let text = &text[..text.floor_char_boundary(budget)];
            budget -= text.len();
            match re.is_match(text) {
                Ok(true) => return true,
                Ok(false) => {}
                // A message that drives a rule to its limit once would do it again in every
                // part: stop trying this rule on it.
                Err(e) => return give_up(&e),
            }
        }
        false
    }
}

/// The texts each group matches on, extracted once per message.
struct Texts {
    /// Per group, in group order.
    per_group: Vec<Vec<String>>,
}

impl Texts {
    fn of(&self, group: usize) -> impl Iterator<Item = &str> {
        self.per_group[group].iter().map(String::as_str)
    }

    fn new(view: &dyn MessageView, max_scan: usize, groups: &[Group]) -> Self {
        let message = view.raw();
        let wants = |f: fn(&Target) -> bool| groups.iter().any(|g| f(&g.target));
        let header_end = header_section_end(message);
        let parsed = if wants(|t| *t != Target::RawHeaders) && view.fits(MAX_PARTS) {
            view.parsed()
        } else {
            None
        };
        // Header fields: decoded when the message parsed; raw and unfolded when it did not (no
        // header at all, or too hostile to parse safely).
        let fields = if wants(|t| matches!(t, Target::Subject | Target::Header(_) | Target::Headers)) {
            match parsed {
                Some(p) => decoded_fields(p, message),
                None => raw_fields(&message[..header_end]),
            }
        } else {
            Vec::new()
        };
        let mut body = if wants(|t| *t == Target::Body) {
            match parsed {
                Some(p) => body_texts(p, max_scan),
                None => {
                    let raw = &message[header_end..];
                    vec![String::from_utf8_lossy(&raw[..raw.len().min(max_scan)]).into_owned()]
                }
            }
        } else {
            Vec::new()
        };
        let named = |name: &str| -> Vec<String> {
            fields
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .collect()
        };
        let per_group = groups
            .iter()
            .map(|g| match &g.target {
                Target::Subject => {
                    let subjects = named("subject");
                    // A missing Subject is an empty one, so `^\s*$` catches both.
                    if subjects.is_empty() {
                        vec![String::new()]
                    } else {
                        subjects
                    }
                }
                Target::Header(name) => named(name),
                Target::Headers => fields.iter().map(|(n, v)| format!("{n}: {v}")).collect(),
                Target::RawHeaders => {
                    vec![String::from_utf8_lossy(&message[..header_end.min(max_scan)]).into_owned()]
                }
                // One group per target: the body texts are used once.
                Target::Body => std::mem::take(&mut body),
            })
            .collect();
        Self { per_group }
    }
}

/// The first [`MAX_HEADERS`] header fields of a parsed message: name and value, encoded words
/// decoded, unfolded.
fn decoded_fields(msg: &Message<'_>, raw: &[u8]) -> Vec<(String, String)> {
    let Some(root) = msg.parts.first() else {
        return Vec::new();
    };
    root.headers
        .iter()
        .take(MAX_HEADERS)
        .map(|h| {
            let value = match &h.value {
                HeaderValue::Text(t) => t.to_string(),
                HeaderValue::TextList(l) => l.join(", "),
                // Structured values (the MIME headers) are matched as received, unfolded.
                _ => {
                    let start = (h.offset_start as usize).min(raw.len());
                    let end = (h.offset_end as usize).clamp(start, raw.len());
                    unfold(&String::from_utf8_lossy(&raw[start..end]))
                }
            };
            (h.name.as_str().to_string(), value)
        })
        .collect()
}

/// The decoded text parts, at most `max_scan` bytes together.
fn body_texts(msg: &Message<'_>, max_scan: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut budget = max_scan;
    let _ = walk(msg, MAX_MESSAGE_DEPTH, MAX_PARTS, |_, part, _| {
        if let PartType::Text(t) | PartType::Html(t) = &part.body {
            let cut = t.floor_char_boundary(budget);
            if cut > 0 {
                out.push(t[..cut].to_string());
            }
            budget -= cut;
            if budget == 0 {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    out
}

/// Removes folding (CRLF followed by blanks) and surrounding blanks.
fn unfold(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, line) in value.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if i > 0 {
            out.push(' ');
            out.push_str(line.trim_start());
        } else {
            out.push_str(line);
        }
    }
    out.trim().to_string()
}

/// Where the header section ends: after the empty line (or the whole message when there is
/// no body).
pub(crate) fn header_section_end(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 2;
    }
    if message.starts_with(b"\n") {
        return 1;
    }
    let mut i = 0;
    while let Some(nl) = message[i..].iter().position(|&b| b == b'\n') {
        let next = i + nl + 1;
        match message.get(next..) {
            Some([b'\r', b'\n', ..]) => return next + 2,
            Some([b'\n', ..]) => return next + 1,
            _ => i = next,
        }
    }
    message.len()
}

/// The first [`MAX_HEADERS`] header fields of a raw header section, unfolded, not decoded:
/// the fallback when the message is not parsed.
fn raw_fields(section: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(section);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = fields.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            if fields.len() == MAX_HEADERS {
                break;
            }
            fields.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    fields
}

/// The parser for content rules: MIME headers structured (the parser needs them for the body
/// structure), every other header as unstructured text with encoded words decoded. Built once:
/// building one allocates its table of header parsers.
fn content_parser() -> &'static MessageParser {
    static PARSER: std::sync::LazyLock<MessageParser> =
        std::sync::LazyLock::new(|| MessageParser::new().with_mime_headers().default_header_text());
    &PARSER
}

/// Counts from cheap passes over the raw message, before parsing. mail-parser builds about
/// 100 bytes of structure per part and per header line, so a hostile message of tiny parts or
/// tiny header lines would cost 20 times its size in memory; and each attached message costs
/// it about a microsecond, so a message of nothing but nested `message/rfc822` headers would
/// cost a second per 30 MB.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Prescan {
    /// Lines starting with `--` (every MIME boundary is one).
    pub boundary_lines: usize,
    /// Lines shorter than 32 bytes containing `:` (what a flood of tiny headers looks like).
    pub short_field_lines: usize,
    /// Mentions of `message/rfc822`, `message/global` or `multipart/digest` (whose parts are
    /// messages), any case.
    pub message_types: usize,
}

/// Attached messages a message may declare and still be parsed.
const MAX_MESSAGE_TYPES: usize = 1000;
/// Tiny header lines a message may have and still be parsed.
const MAX_SHORT_FIELD_LINES: usize = 200_000;

impl Prescan {
    /// True when parsing is safe for a walk of at most `max_parts` parts.
    pub fn fits(&self, max_parts: usize) -> bool {
        self.boundary_lines <= max_parts.saturating_mul(2) + 100
            && self.short_field_lines <= MAX_SHORT_FIELD_LINES
            && self.message_types <= MAX_MESSAGE_TYPES
    }
}

pub(crate) fn prescan(message: &[u8]) -> Prescan {
    static MESSAGE_TYPES: std::sync::LazyLock<regex::bytes::Regex> = std::sync::LazyLock::new(|| {
        regex::bytes::Regex::new(r"(?i-u)message/(rfc822|global)|multipart/digest").expect("valid regex")
    });
    let mut p = Prescan::default();
    // Line by line as `split(b'\n')` would, the last (possibly empty) piece included; memchr
    // finds the line ends many bytes at a time.
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', message).chain(std::iter::once(message.len())) {
        let line = &message[start..end];
        start = end + 1;
        if line.starts_with(b"--") {
            p.boundary_lines += 1;
        } else if line.len() < 32 && line.contains(&b':') {
            p.short_field_lines += 1;
        }
    }
    p.message_types = MESSAGE_TYPES
        .find_iter(message)
        .take(MAX_MESSAGE_TYPES + 1)
        .count();
    p
}

/// A parsed message. Nested `message/rfc822` parts are nested `Message` values, as deep as the
/// sender nests them (mail-parser parses them iteratively); dropping them recursively could
/// overflow the stack, so `Drop` takes them apart iteratively.
pub(crate) struct ParsedMessage<'x> {
    message: Message<'x>,
}

impl<'x> ParsedMessage<'x> {
    pub fn message(&self) -> &Message<'x> {
        &self.message
    }
}

impl Drop for ParsedMessage<'_> {
    fn drop(&mut self) {
        let mut stack = vec![std::mem::take(&mut self.message)];
        while let Some(mut m) = stack.pop() {
            for part in &mut m.parts {
                if let PartType::Message(inner) = &mut part.body {
                    stack.push(std::mem::take(inner));
                }
            }
        }
    }
}

/// One message as the DATA-stage checks see it: its bytes, and the prescan and the parse
/// computed once for every check that asks (the content rules and the attachment walk each
/// used to parse it: a tenth of the instructions spent per message). A trait object so that
/// [`Context`] stays covariant in its lifetime (the cache inside is not).
pub trait MessageView: Send + Sync {
    /// The unstuffed message as received.
    fn raw(&self) -> &[u8];
    /// Whether the cheap pass over the raw bytes allows parsing it with at most `max_parts`
    /// MIME parts: parsing a hostile message costs many times its size. Ask before
    /// [`Self::parsed`].
    fn fits(&self, max_parts: usize) -> bool;
    /// The parsed message (`None` without any header): MIME headers structured, every other
    /// header as text with encoded words decoded.
    fn parsed(&self) -> Option<&Message<'_>>;
}

/// The [`MessageView`] of a message in memory.
pub struct SharedMessage<'m> {
    raw: &'m [u8],
    prescan: OnceLock<Prescan>,
    parsed: OnceLock<Option<ParsedMessage<'m>>>,
}

impl<'m> SharedMessage<'m> {
    pub fn new(raw: &'m [u8]) -> Self {
        Self {
            raw,
            prescan: OnceLock::new(),
            parsed: OnceLock::new(),
        }
    }
}

impl MessageView for SharedMessage<'_> {
    fn raw(&self) -> &[u8] {
        self.raw
    }

    fn fits(&self, max_parts: usize) -> bool {
        self.prescan.get_or_init(|| prescan(self.raw)).fits(max_parts)
    }

    fn parsed(&self) -> Option<&Message<'_>> {
        self.parsed
            .get_or_init(|| parse_message(self.raw, content_parser()))
            .as_ref()
            .map(ParsedMessage::message)
    }
}

impl std::fmt::Debug for dyn MessageView + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "message of {} bytes", self.raw().len())
    }
}

/// Parses a message with `parser`; `None` when it has no header at all.
pub(crate) fn parse_message<'x>(raw: &'x [u8], parser: &MessageParser) -> Option<ParsedMessage<'x>> {
    parser.parse(raw).map(|message| ParsedMessage { message })
}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WalkEnd {
    /// Every part was visited.
    Complete,
    /// The callback stopped it.
    Stopped,
    /// Attached messages deeper than the limit were not opened.
    TooDeep,
    /// The part limit was reached.
    TooManyParts,
}

/// Visits every part of `root` and of attached messages up to `max_depth` levels (the root
/// is level 0), in order, iteratively; `f` gets the message a part belongs to (whose
/// `raw_message` its offsets refer to), the part and its depth. The `message/rfc822` part
/// itself is visited, then its message's parts.
pub(crate) fn walk<'m, 'x>(
    root: &'m Message<'x>,
    max_depth: usize,
    max_parts: usize,
    mut f: impl FnMut(&'m Message<'x>, &'m MessagePart<'x>, usize) -> ControlFlow<()>,
) -> WalkEnd {
    let mut stack: Vec<(&'m Message<'x>, usize, usize)> = vec![(root, 0, 0)];
    let mut visited = 0usize;
    let mut end = WalkEnd::Complete;
    while let Some((msg, depth, next)) = stack.pop() {
        let Some(part) = msg.parts.get(next) else { continue };
        stack.push((msg, depth, next + 1));
        visited += 1;
        if visited > max_parts {
            return WalkEnd::TooManyParts;
        }
        if f(msg, part, depth).is_break() {
            return WalkEnd::Stopped;
        }
        if let PartType::Message(inner) = &part.body {
            if depth < max_depth {
                stack.push((inner, depth + 1, 0));
            } else {
                end = WalkEnd::TooDeep;
            }
        }
    }
    end
}

impl Check for ContentCheck {
    fn name(&self) -> &'static str {
        "content"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Data]
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(async move {
            // Authenticated senders are our own users: not filtered (DESIGN.md).
            let Some(message) = cx
                .message
                .filter(|_| self.inner.enabled && cx.session.authenticated.is_none())
            else {
                return Ok(Verdict::Skip);
            };
            let outcome = if message.raw().len() <= INLINE_LIMIT {
                self.inner.evaluate(message, &cx.session.id)
            } else {
                let inner = Arc::clone(&self.inner);
                let bytes = message.raw().to_vec();
                let session = cx.session.id.clone();
                tokio::task::spawn_blocking(move || inner.evaluate(&SharedMessage::new(&bytes), &session))
                    .await
                    .map_err(|e| CheckError(format!("content rules failed: {e}")))?
            };
            if !outcome.matched.is_empty() {
                tracing::debug!(session = %cx.session.id, rules = ?outcome.matched, "Content rules matched.");
            }
            Ok(outcome.verdict)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prescan_counts_lines_as_split_does() {
        let reference = |m: &[u8]| {
            let (mut boundaries, mut short) = (0, 0);
            for line in m.split(|&b| b == b'\n') {
                if line.starts_with(b"--") {
                    boundaries += 1;
                } else if line.len() < 32 && line.contains(&b':') {
                    short += 1;
                }
            }
            (boundaries, short)
        };
        for m in [
            &b""[..],
            b"--",
            b"a:b",
            b"a:b\n",
            b"\n--x\n--y",
            b"To: a\r\n\r\n--b\r\nX: y\r\n--b--\r\n",
            b"no newline at all but a : colon and more than thirty-two bytes",
        ] {
            let p = prescan(m);
            assert_eq!((p.boundary_lines, p.short_field_lines), reference(m), "{m:?}");
        }
    }

    #[test]
    fn deeply_nested_messages_drop_without_overflowing_the_stack() {
        // 100,000 levels: the pre-scan keeps such a message from the parser, but a
        // `ParsedMessage` must be safe to drop whatever it holds. A recursive drop overflows a
        // 2 MiB stack (a tokio worker's) at a few tens of thousands of levels.
        let mut deep = b"Subject: deep\r\n".to_vec();
        deep.extend(b"Content-Type: message/rfc822\r\n\r\n".repeat(100_000));
        deep.extend(b"Subject: bottom\r\n\r\nbottom\r\n");
        assert!(!prescan(&deep).fits(MAX_PARTS));
        let depth = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let parsed = parse_message(&deep, &MessageParser::new().with_mime_headers()).expect("parsed");
                let mut depth = 0;
                let end = walk(parsed.message(), usize::MAX, usize::MAX, |_, _, d| {
                    depth = depth.max(d);
                    ControlFlow::Continue(())
                });
                assert_eq!(end, WalkEnd::Complete);
                depth
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert_eq!(depth, 100_000);
    }

    #[test]
    fn delimited_patterns() {
        assert_eq!(Pattern::parse("/a\\/b/i").unwrap().source, "(?i)a/b");
        assert_eq!(Pattern::parse("/a\\\\/").unwrap().source, "a\\\\");
        assert_eq!(Pattern::parse("plain/text").unwrap().source, "plain/text");
        assert_eq!(Pattern::parse("/x/mis").unwrap().source, "(?mis)x");
        assert!(Pattern::parse("/a/b/").is_err());
        assert!(Pattern::parse("/unclosed").is_err());
        assert!(Pattern::parse("//").is_err());
        assert_eq!(
            split_delimited("/a b\\/c/x  reply text / with slash"),
            Some(("a b/c".to_string(), "x", "reply text / with slash"))
        );
        assert_eq!(header_section_end(b"A: b\r\n\r\nbody"), 8);
        assert_eq!(header_section_end(b"A: b\nB: c\n\nbody"), 11);
        assert_eq!(header_section_end(b"A: b\r\n"), 6);
        assert_eq!(unfold("a\r\n\tb\r\n c "), "a b c");
    }
}
