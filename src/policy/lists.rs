//! Static white- and blacklists (`[checks.lists]`): client IPs and networks, HELO names,
//! sender and recipient addresses or domains, from the configuration and from list files.
//! Whitelists are consulted before blacklists at every stage; lists never change after build.
//!
//! Matching rules, in one place:
//! - IPs: longest-prefix match in a prefix trie per list; an IPv4-mapped IPv6 client
//!   (`::ffff:192.0.2.1`) matches IPv4 entries, and `::ffff:a.b.c.d/n` entries (n ≥ 96) are
//!   stored as IPv4 networks. Host bits of an entry (`192.0.2.1/24`) are ignored.
//! - HELO: exact names (case-insensitive) or `/regex/flags`; regexes always match
//!   case-insensitively (host names are), flags `i` (accepted, implied) and `x` (extended).
//!   One trailing dot of the HELO is ignored (`mx.example.` is `mx.example`).
//! - Senders and recipients: `user@domain` (the whole address), `domain` (the domain and its
//!   sub-domains, on label boundaries), `@domain` (that domain only). Case-insensitive; one
//!   trailing dot of the address's domain is ignored; a quoted local part is compared
//!   unquoted. The null sender `<>` and a bare `<postmaster>` never match.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use prefix_trie::joint::JointPrefixMap;
use regex::{RegexBuilder, RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize};

use super::{BoxFuture, Category, Check, CheckAction, CheckError, Context, Refusal, Stage, Verdict};
use crate::smtp::address::{Address, is_hostname};
use crate::smtp::codec::Reply;

/// Compiled size allowed for one HELO regex. Host-name patterns are small; the cap keeps a
/// pathological pattern from costing memory and match time (matching is linear anyway).
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Compiled size allowed for all HELO regexes of one list together.
const REGEX_SET_SIZE_LIMIT: usize = 32 << 20;
/// A list file larger than this is refused (a mistaken path such as a log file or a device).
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Errors reported per list file; a wrong file would otherwise produce one per line.
const MAX_FILE_ERRORS: usize = 20;

/// `[checks.lists]`: static white- and blacklists. Default: none.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListsConfig {
    /// `[[checks.lists.whitelist]]`: consulted first at every stage. A hit accepts (stops
    /// checking) or exempts from the named checks. When several whitelists match, their
    /// exemptions add up.
    pub whitelist: Vec<WhitelistConfig>,
    /// `[[checks.lists.blacklist]]`: consulted when no whitelist matched; the first matching
    /// blacklist, in configured order, decides with its action.
    pub blacklist: Vec<BlacklistConfig>,
}

/// One whitelist.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WhitelistConfig {
    /// Name for logs (letters, digits, `-`, `_`, `.`). Default: `whitelist[N]`.
    #[serde(default)]
    pub name: String,
    /// Client IPs and networks: `192.0.2.7`, `192.0.2.0/24`, `2001:db8::/32`. Default none.
    #[serde(default)]
    pub ips: Vec<String>,
    /// HELO names: exact (`mx.partner.example`, case-insensitive) or `/regex/flags`
    /// (always case-insensitive; flags `i`, `x`). Default none.
    #[serde(default)]
    pub helos: Vec<String>,
    /// Senders: `user@domain`, `domain` (with its sub-domains) or `@domain` (exactly that
    /// domain). Default none.
    #[serde(default)]
    pub senders: Vec<String>,
    /// Recipients, same syntax as `senders`. Default none.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Files with one entry per line (`#` starts a comment at the line start or after a
    /// space; blank lines are ignored). Each line's kind is told by its shape: an IP or
    /// network, `helo:NAME` or `helo:/regex/`, `rcpt:ADDRESS`, otherwise a sender. Read when
    /// the configuration is loaded or reloaded. Default none.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// `["all"]` (the default): a hit accepts, every later check is skipped (for the
    /// session at connect and HELO, the transaction at MAIL, the recipient at RCPT). Or
    /// names of checks (`["greylist", "dnsbl"]`): only those are skipped.
    #[serde(default = "default_exempt")]
    pub exempt: Vec<String>,
}

fn default_exempt() -> Vec<String> {
    vec!["all".to_string()]
}

/// One blacklist.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlacklistConfig {
    /// Name for logs and the connect-stage reply (letters, digits, `-`, `_`, `.`).
    /// Default: `blacklist[N]`.
    #[serde(default)]
    pub name: String,
    /// Client IPs and networks, as in whitelists. Default none.
    #[serde(default)]
    pub ips: Vec<String>,
    /// HELO names or `/regex/flags`, as in whitelists. Default none.
    #[serde(default)]
    pub helos: Vec<String>,
    /// Senders, as in whitelists. Default none.
    #[serde(default)]
    pub senders: Vec<String>,
    /// Recipients, as in whitelists. Default none.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// List files, as in whitelists. Default none.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// What a hit does: `reject` (default), `tempfail`, `score:N` or `monitor`.
    #[serde(default = "default_action")]
    pub action: CheckAction,
}

fn default_action() -> CheckAction {
    CheckAction::Reject
}

/// A parsed list entry (the admin API validates entries with [`parse_entry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A client network (a single address is a /32 or /128).
    Ip(IpNet),
    Helo(HeloPattern),
    Sender(AddressPattern),
    Recipient(AddressPattern),
}

/// A HELO entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeloPattern {
    /// Lower case, without a trailing dot.
    Exact(String),
    /// The regex source as compiled (flags applied inline).
    Regex(String),
}

/// A sender or recipient entry; all text lower case, domains without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressPattern {
    /// `user@domain`: this address only.
    Address(String),
    /// `domain`: the domain and all its sub-domains.
    Domain(String),
    /// `@domain`: the domain only.
    DomainExact(String),
}

/// Parses one entry in list-file syntax (an IP or network, `helo:…`, `rcpt:…`, otherwise a
/// sender). Comments must already be removed.
pub fn parse_entry(text: &str) -> Result<Entry, String> {
    let text = text.trim();
    if let Some(rest) = strip_prefix_ci(text, "helo:") {
        return parse_helo(rest).map(Entry::Helo);
    }
    if let Some(rest) = strip_prefix_ci(text, "rcpt:") {
        return parse_address_pattern(rest).map(Entry::Recipient);
    }
    if let Ok(net) = parse_ip(text) {
        return Ok(Entry::Ip(net));
    }
    // Something that was meant as an address or network gets the IP error, not a puzzling
    // "not a domain" one. A sender pattern never contains '/' or ':' outside a local part.
    if !text.contains('@')
        && (text.contains(['/', ':']) || text.chars().all(|c| c.is_ascii_digit() || c == '.'))
    {
        return Err(parse_ip(text).unwrap_err());
    }
    parse_address_pattern(text)
        .map(Entry::Sender)
        .map_err(|e| format!("{e} (a line is an IP or network, helo:NAME, rcpt:ADDRESS, or a sender)"))
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// An IP address or network, normalised: host bits cleared, IPv4-mapped IPv6 as IPv4.
fn parse_ip(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    let net = if t.contains('/') {
        t.parse::<IpNet>().ok()
    } else {
        t.parse::<IpAddr>().ok().map(IpNet::from)
    };
    net.map(normalize_net).ok_or_else(|| {
        format!("{t:?} is not an IP address or network (such as 192.0.2.0/24 or 2001:db8::/32)")
    })
}

fn normalize_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net.trunc());
    }
    net.trunc()
}

fn parse_helo(text: &str) -> Result<HeloPattern, String> {
    let t = text.trim();
    let Some(body) = t.strip_prefix('/') else {
        if t.is_empty() || t.len() > 255 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{t:?} is not a HELO name (no spaces, at most 255 characters) nor a /regex/"
            ));
        }
        return Ok(HeloPattern::Exact(normalize_name(t)));
    };
    let Some(end) = body.rfind('/') else {
        return Err(format!("{t:?}: a regex needs a closing '/' (/regex/flags)"));
    };
    let (pattern, flags) = (&body[..end], &body[end + 1..]);
    if pattern.is_empty() {
        return Err(format!("{t:?}: empty regex"));
    }
    let mut extended = false;
    for f in flags.chars() {
        match f {
            // HELO regexes are always case-insensitive; `i` is accepted for familiarity.
            'i' => {}
            'x' => extended = true,
            c => return Err(format!("{t:?}: unknown regex flag {c:?} (use i or x)")),
        }
    }
    let source = if extended {
        format!("(?x){pattern}")
    } else {
        pattern.to_string()
    };
    // Compiled alone first so an error names the pattern, not the whole set.
    RegexBuilder::new(&source)
        .case_insensitive(true)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("{t:?}: {e}"))?;
    Ok(HeloPattern::Regex(source))
}

fn parse_address_pattern(text: &str) -> Result<AddressPattern, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty address or domain".into());
    }
    let lower = t.to_lowercase();
    if let Some(domain) = lower.strip_prefix('@') {
        return pattern_domain(t, domain).map(AddressPattern::DomainExact);
    }
    if let Some((local, domain)) = lower.rsplit_once('@') {
        let domain = pattern_domain(t, domain)?;
        let local = unquote_local(local);
        if local.is_empty() || local.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{t:?}: the local part before '@' is empty or has spaces"));
        }
        return Ok(AddressPattern::Address(format!("{local}@{domain}")));
    }
    pattern_domain(t, &lower).map(AddressPattern::Domain)
}

/// A domain of a sender/recipient entry: a host name whose last label is not numeric (so a
/// mistyped IP such as `192.0.2` is an error, not a domain).
fn pattern_domain(entry: &str, domain: &str) -> Result<String, String> {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if let Some(base) = d.strip_prefix("*.") {
        return Err(format!(
            "{entry:?}: no wildcards; write {base:?} (covers its sub-domains) or \"@{base}\" (that domain only)"
        ));
    }
    let numeric_tld = d
        .rsplit('.')
        .next()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()));
    if !is_hostname(d) || numeric_tld {
        return Err(format!(
            "{entry:?} is not an address (user@domain), a domain (example.com) or @domain"
        ));
    }
    Ok(d.to_string())
}

/// A local part for comparison: lower case; a quoted string without its quotes and escapes,
/// so `"boss"@example.net` is `boss@example.net`.
fn unquote_local(local: &str) -> String {
    let lower = local.to_lowercase();
    match lower.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if c == '\\' && !escaped {
                    escaped = true;
                } else {
                    out.push(c);
                    escaped = false;
                }
            }
            out
        }
        None => lower,
    }
}

/// A host name for comparison: lower case, one trailing dot removed.
fn normalize_name(name: &str) -> String {
    let name = name.trim();
    name.strip_suffix('.').unwrap_or(name).to_lowercase()
}

/// The address matchers of one list.
#[derive(Debug, Default)]
struct AddressSet {
    addresses: HashSet<String>,
    domains: HashSet<String>,
    exact_domains: HashSet<String>,
}

impl AddressSet {
    fn insert(&mut self, p: AddressPattern) {
        match p {
            AddressPattern::Address(a) => self.addresses.insert(a),
            AddressPattern::Domain(d) => self.domains.insert(d),
            AddressPattern::DomainExact(d) => self.exact_domains.insert(d),
        };
    }

    fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.domains.is_empty() && self.exact_domains.is_empty()
    }

    fn len(&self) -> usize {
        self.addresses.len() + self.domains.len() + self.exact_domains.len()
    }

    fn matches(&self, key: &AddressKey) -> bool {
        if self.addresses.contains(&key.address) || self.exact_domains.contains(&key.domain) {
            return true;
        }
        // The domain, then each parent at a label boundary: a.partner.example,
        // partner.example, example. At most 128 steps (a domain has ≤ 255 octets).
        let mut d = key.domain.as_str();
        loop {
            if self.domains.contains(d) {
                return true;
            }
            match d.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => d = parent,
                _ => return false,
            }
        }
    }
}

/// An envelope address prepared once per lookup.
struct AddressKey {
    /// `local@domain`, normalised as entries are.
    address: String,
    domain: String,
}

impl AddressKey {
    /// `None` for addresses no entry can match: `<>` and a bare local part (`<postmaster>`).
    fn of(addr: &Address) -> Option<Self> {
        if addr.is_null() {
            return None;
        }
        let domain = normalize_name(addr.domain.as_deref()?);
        let mut address = if addr.local_quoted {
            unquote_local(&addr.local)
        } else {
            addr.local.to_lowercase()
        };
        address.reserve(domain.len() + 1);
        address.push('@');
        address.push_str(&domain);
        Some(Self { address, domain })
    }
}

/// One list's matchers.
struct List {
    name: String,
    ips: JointPrefixMap<IpNet, ()>,
    helo_exact: HashSet<String>,
    helo_regex: Option<RegexSet>,
    senders: AddressSet,
    recipients: AddressSet,
}

impl List {
    fn ip(&self, ip: IpAddr) -> Option<IpNet> {
        if self.ips.is_empty() {
            return None;
        }
        self.ips.get_lpm(&IpNet::from(ip)).map(|(net, _)| net)
    }

    fn helo(&self, helo: &HeloKey) -> bool {
        self.helo_exact.contains(&helo.lower)
            || self.helo_regex.as_ref().is_some_and(|s| s.is_match(&helo.name))
    }

    fn entries(&self) -> usize {
        self.ips.len()
            + self.helo_exact.len()
            + self.helo_regex.as_ref().map_or(0, RegexSet::len)
            + self.senders.len()
            + self.recipients.len()
    }
}

/// A HELO name prepared once per lookup.
struct HeloKey {
    /// Trimmed, one trailing dot removed (regexes match this, case-insensitively).
    name: String,
    lower: String,
}

impl HeloKey {
    fn new(helo: &str) -> Self {
        let t = helo.trim();
        let name = t.strip_suffix('.').unwrap_or(t).to_string();
        let lower = name.to_lowercase();
        Self { name, lower }
    }
}

/// Collects one list's entries before the matchers are built.
#[derive(Default)]
struct ListBuilder {
    ips: JointPrefixMap<IpNet, ()>,
    helo_exact: HashSet<String>,
    helo_regex: Vec<String>,
    senders: AddressSet,
    recipients: AddressSet,
}

impl ListBuilder {
    fn add(&mut self, entry: Entry) {
        match entry {
            Entry::Ip(net) => {
                self.ips.insert(net, ());
            }
            Entry::Helo(HeloPattern::Exact(name)) => {
                self.helo_exact.insert(name);
            }
            Entry::Helo(HeloPattern::Regex(source)) => {
                if !self.helo_regex.contains(&source) {
                    self.helo_regex.push(source);
                }
            }
            Entry::Sender(p) => self.senders.insert(p),
            Entry::Recipient(p) => self.recipients.insert(p),
        }
    }

    /// Adds the entries of one configuration field, each parsed by `parse`; errors are keyed
    /// `key[i]`.
    fn add_field(
        &mut self,
        key: &str,
        items: &[String],
        parse: impl Fn(&str) -> Result<Entry, String>,
        errors: &mut Vec<String>,
    ) {
        for (i, item) in items.iter().enumerate() {
            match parse(item) {
                Ok(entry) => self.add(entry),
                Err(e) => errors.push(format!("{key}[{i}]: {e}")),
            }
        }
    }

    /// Reads a list file; errors are keyed `key: path:line:`.
    fn add_file(&mut self, key: &str, path: &Path, errors: &mut Vec<String>) {
        let shown = path.display();
        let bytes = match read_limited(path) {
            Ok(b) => b,
            Err(e) => {
                errors.push(format!("{key}: {shown}: {e}"));
                return;
            }
        };
        let mut file_errors = 0usize;
        for (n, raw) in bytes.split(|b| *b == b'\n').enumerate() {
            let result = match std::str::from_utf8(raw) {
                Err(_) => Err("not UTF-8 text".to_string()),
                Ok(line) => {
                    let line = if n == 0 {
                        line.trim_start_matches('\u{feff}')
                    } else {
                        line
                    };
                    let line = strip_comment(line).trim();
                    if line.is_empty() {
                        continue;
                    }
                    parse_entry(line)
                }
            };
            match result {
                Ok(entry) => self.add(entry),
                Err(e) => {
                    file_errors += 1;
                    if file_errors <= MAX_FILE_ERRORS {
                        errors.push(format!("{key}: {shown}:{}: {e}", n + 1));
                    }
                }
            }
        }
        if file_errors > MAX_FILE_ERRORS {
            errors.push(format!(
                "{key}: {shown}: {} more bad lines not shown",
                file_errors - MAX_FILE_ERRORS
            ));
        }
    }

    fn finish(self, name: String, key: &str, errors: &mut Vec<String>) -> List {
        let helo_regex = if self.helo_regex.is_empty() {
            None
        } else {
            match RegexSetBuilder::new(&self.helo_regex)
                .case_insensitive(true)
                .size_limit(REGEX_SET_SIZE_LIMIT)
                .build()
            {
                Ok(set) => Some(set),
                Err(e) => {
                    errors.push(format!(
                        "{key}.helos: the HELO regexes together are too large: {e}"
                    ));
                    None
                }
            }
        };
        List {
            name,
            ips: self.ips,
            helo_exact: self.helo_exact,
            helo_regex,
            senders: self.senders,
            recipients: self.recipients,
        }
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {} MiB", MAX_FILE_BYTES >> 20));
    }
    Ok(bytes)
}

/// A line without its comment: `#` at the start of the line or after a space or tab. A `#`
/// inside an entry stays (it is valid in a local part, and in a regex).
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, _) in line.match_indices('#') {
        if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') {
            return &line[..i];
        }
    }
    line
}

/// What a whitelist hit grants.
#[derive(Debug, Clone)]
enum Grant {
    All,
    Checks(Arc<[String]>),
}

struct Whitelist {
    list: List,
    grant: Grant,
}

struct Blacklist {
    list: List,
    action: CheckAction,
}

/// The entry fields shared by white- and blacklists.
struct Sources<'a> {
    name: &'a str,
    ips: &'a [String],
    helos: &'a [String],
    senders: &'a [String],
    recipients: &'a [String],
    files: &'a [PathBuf],
}

impl<'a> From<&'a WhitelistConfig> for Sources<'a> {
    fn from(c: &'a WhitelistConfig) -> Self {
        Self {
            name: &c.name,
            ips: &c.ips,
            helos: &c.helos,
            senders: &c.senders,
            recipients: &c.recipients,
            files: &c.files,
        }
    }
}

impl<'a> From<&'a BlacklistConfig> for Sources<'a> {
    fn from(c: &'a BlacklistConfig) -> Self {
        Self {
            name: &c.name,
            ips: &c.ips,
            helos: &c.helos,
            senders: &c.senders,
            recipients: &c.recipients,
            files: &c.files,
        }
    }
}

/// Builds one list; `key` is e.g. `checks.lists.whitelist[0]`, `default_name` `whitelist[0]`.
fn build_list(
    key: &str,
    default_name: &str,
    s: Sources<'_>,
    names: &mut HashSet<String>,
    errors: &mut Vec<String>,
) -> List {
    let name = if s.name.is_empty() {
        default_name.to_string()
    } else {
        s.name.to_string()
    };
    // The name appears in a reply to the client: keep it to a safe alphabet.
    if !s.name.is_empty()
        && (s.name.len() > 64
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        errors.push(format!(
            "{key}.name: {:?} must be 1 to 64 letters, digits, '-', '_' or '.'",
            s.name
        ));
    } else if !names.insert(name.clone()) {
        errors.push(format!("{key}.name: {name:?} is used by another list"));
    }
    let mut b = ListBuilder::default();
    b.add_field(
        &format!("{key}.ips"),
        s.ips,
        |t| parse_ip(t).map(Entry::Ip),
        errors,
    );
    b.add_field(
        &format!("{key}.helos"),
        s.helos,
        |t| parse_helo(t).map(Entry::Helo),
        errors,
    );
    b.add_field(
        &format!("{key}.senders"),
        s.senders,
        |t| parse_address_pattern(t).map(Entry::Sender),
        errors,
    );
    b.add_field(
        &format!("{key}.recipients"),
        s.recipients,
        |t| parse_address_pattern(t).map(Entry::Recipient),
        errors,
    );
    for path in s.files {
        b.add_file(&format!("{key}.files"), path, errors);
    }
    b.finish(name, key, errors)
}

fn build_grant(key: &str, exempt: &[String], errors: &mut Vec<String>) -> Grant {
    if exempt.is_empty() {
        errors.push(format!(
            "{key}.exempt: empty; use [\"all\"] or names of checks such as [\"greylist\"]"
        ));
        return Grant::Checks(Arc::from(Vec::new()));
    }
    if exempt.iter().any(|e| e == "all") {
        return Grant::All;
    }
    let mut checks: Vec<String> = Vec::new();
    for (i, name) in exempt.iter().enumerate() {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            errors.push(format!(
                "{key}.exempt[{i}]: {name:?} is not a check name (such as greylist, dnsbl) nor \"all\""
            ));
        } else if !checks.contains(name) {
            checks.push(name.clone());
        }
    }
    Grant::Checks(Arc::from(checks))
}

/// The `lists` check: static white- and blacklists, immutable once built (a reload builds a
/// new one, re-reading the list files).
pub struct ListsCheck {
    white: Vec<Whitelist>,
    black: Vec<Blacklist>,
}

impl fmt::Debug for ListsCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let summary = |l: &List| format!("{} ({} entries)", l.name, l.entries());
        f.debug_struct("ListsCheck")
            .field(
                "white",
                &self.white.iter().map(|w| summary(&w.list)).collect::<Vec<_>>(),
            )
            .field(
                "black",
                &self.black.iter().map(|b| summary(&b.list)).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ListsCheck {
    /// Builds the lists from `[checks.lists]`, reading every list file. Errors (all of them)
    /// are keyed like `checks.lists.blacklist[0].ips[3]: …` or
    /// `checks.lists.whitelist[1].files: /path:12: …`.
    pub fn build(config: &ListsConfig) -> Result<Self, Vec<String>> {
        Self::with_extra(config, &[], &[])
    }

    /// As [`build`](Self::build), plus admin-managed entries in list-file syntax (see
    /// [`parse_entry`]): `extra_white` becomes a whitelist named `admin` that accepts
    /// (exempt all), `extra_black` a blacklist named `admin` that rejects, each after the
    /// configured lists. Errors on them are keyed `admin whitelist[i]` / `admin blacklist[i]`.
    pub fn with_extra(
        config: &ListsConfig,
        extra_white: &[String],
        extra_black: &[String],
    ) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut names = HashSet::new();
        let mut white = Vec::new();
        for (i, w) in config.whitelist.iter().enumerate() {
            let key = format!("checks.lists.whitelist[{i}]");
            let list = build_list(
                &key,
                &format!("whitelist[{i}]"),
                w.into(),
                &mut names,
                &mut errors,
            );
            let grant = build_grant(&key, &w.exempt, &mut errors);
            white.push(Whitelist { list, grant });
        }
        let mut black = Vec::new();
        for (i, b) in config.blacklist.iter().enumerate() {
            let key = format!("checks.lists.blacklist[{i}]");
            let list = build_list(
                &key,
                &format!("blacklist[{i}]"),
                b.into(),
                &mut names,
                &mut errors,
            );
            black.push(Blacklist {
                list,
                action: b.action,
            });
        }
        let admin = |key: &str, entries: &[String], errors: &mut Vec<String>| {
            let mut b = ListBuilder::default();
            b.add_field(key, entries, parse_entry, errors);
            b.finish("admin".to_string(), key, errors)
        };
        if !extra_white.is_empty() {
            white.push(Whitelist {
                list: admin("admin whitelist", extra_white, &mut errors),
                grant: Grant::All,
            });
        }
        if !extra_black.is_empty() {
            black.push(Blacklist {
                list: admin("admin blacklist", extra_black, &mut errors),
                action: CheckAction::Reject,
            });
        }
        if errors.is_empty() {
            Ok(Self { white, black })
        } else {
            Err(errors)
        }
    }

    /// The first whitelist (in configured order) holding `ip`, by name.
    pub fn whitelisted_ip(&self, ip: IpAddr) -> Option<&str> {
        let ip = ip.to_canonical();
        self.white
            .iter()
            .find(|w| w.list.ip(ip).is_some())
            .map(|w| w.list.name.as_str())
    }

    /// The first blacklist (in configured order) holding `ip`, by name.
    pub fn blacklisted_ip(&self, ip: IpAddr) -> Option<&str> {
        let ip = ip.to_canonical();
        self.black
            .iter()
            .find(|b| b.list.ip(ip).is_some())
            .map(|b| b.list.name.as_str())
    }

    /// Check names the whitelists exempt from (not `all`), so the caller can warn about names
    /// no configured check has.
    pub fn exempt_names(&self) -> impl Iterator<Item = &str> {
        self.white
            .iter()
            .flat_map(|w| match &w.grant {
                Grant::All => &[][..],
                Grant::Checks(c) => &c[..],
            })
            .map(String::as_str)
    }

    /// Whitelists first (all matching ones combine: any `all` accepts, else the named
    /// exemptions add up), then the first matching blacklist's action.
    fn decide(
        &self,
        cx: &Context<'_>,
        what: &str,
        hit: impl Fn(&List) -> bool,
        refusal: impl FnOnce(&str) -> Refusal,
    ) -> Verdict {
        let mut first = None;
        let mut all = false;
        let mut checks: Vec<String> = Vec::new();
        for w in self.white.iter().filter(|w| hit(&w.list)) {
            first.get_or_insert(w.list.name.as_str());
            match &w.grant {
                Grant::All => {
                    all = true;
                    break;
                }
                Grant::Checks(c) => {
                    for name in c.iter() {
                        if !checks.contains(name) {
                            checks.push(name.clone());
                        }
                    }
                }
            }
        }
        if let Some(list) = first {
            tracing::debug!(session = %cx.session.id, list, what, all, "Whitelisted.");
            return if all {
                Verdict::Accept
            } else {
                Verdict::Exempt(Arc::from(checks))
            };
        }
        match self.black.iter().find(|b| hit(&b.list)) {
            Some(b) => {
                tracing::debug!(session = %cx.session.id, list = %b.list.name, what, "Blacklisted.");
                b.action.verdict(refusal(&b.list.name))
            }
            None => Verdict::Pass,
        }
    }

    fn verdict(&self, cx: &Context<'_>) -> Verdict {
        let blacklisted = |code, text: String| Refusal {
            reply: Reply::build(code, "5.7.1", text),
            category: Category::Blacklist,
        };
        match cx.stage {
            Stage::Connect => {
                let ip = cx.session.peer.ip().to_canonical();
                self.decide(
                    cx,
                    "client",
                    |l| l.ip(ip).is_some(),
                    |name| {
                        blacklisted(
                            554,
                            format!("Access denied: client [{ip}] is blacklisted (list {name})"),
                        )
                    },
                )
            }
            Stage::Helo => match cx.session.helo.as_deref() {
                Some(helo) => {
                    let key = HeloKey::new(helo);
                    self.decide(
                        cx,
                        "helo",
                        |l| l.helo(&key),
                        |_| blacklisted(550, "Helo name rejected: blacklisted".into()),
                    )
                }
                None => Verdict::Skip,
            },
            // Authenticated clients skip the anti-spam checks (DESIGN.md); AUTH comes after
            // connect and HELO, so only the envelope stages can see one.
            Stage::Mail | Stage::Rcpt if cx.session.authenticated.is_some() => Verdict::Skip,
            Stage::Mail => match cx.sender.map(|a| (a, AddressKey::of(a))) {
                Some((addr, Some(key))) => self.decide(
                    cx,
                    "sender",
                    |l| !l.senders.is_empty() && l.senders.matches(&key),
                    |_| blacklisted(550, format!("{addr}: Sender address rejected: blacklisted")),
                ),
                // `<>` (bounces) and bare local parts match no entry.
                Some((_, None)) => Verdict::Pass,
                None => Verdict::Skip,
            },
            Stage::Rcpt => match cx.recipient.map(|a| (a, AddressKey::of(a))) {
                Some((addr, Some(key))) => self.decide(
                    cx,
                    "recipient",
                    |l| !l.recipients.is_empty() && l.recipients.matches(&key),
                    |_| blacklisted(550, format!("{addr}: Recipient address rejected: blacklisted")),
                ),
                Some((_, None)) => Verdict::Pass,
                None => Verdict::Skip,
            },
            Stage::RcptAccepted | Stage::Data => Verdict::Skip,
        }
    }
}

impl Check for ListsCheck {
    fn name(&self) -> &'static str {
        "lists"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Connect, Stage::Helo, Stage::Mail, Stage::Rcpt]
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        let verdict = self.verdict(cx);
        Box::pin(async move { Ok(verdict) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Exemptions, SessionFacts, SessionInfo};
    use crate::smtp::address::parse_path;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/lists")
            .join(name)
    }

    fn info(peer: &str, helo: Option<&str>) -> SessionInfo {
        SessionInfo {
            id: "t".into(),
            peer: std::net::SocketAddr::new(peer.parse().unwrap(), 40000),
            local: "192.0.2.250:25".parse().unwrap(),
            hostname: "mx.ours.example".into(),
            helo: helo.map(str::to_string),
            esmtp: true,
            authenticated: None,
            tls: None,
            proxied_by: None,
            health_check: false,
        }
    }

    /// Runs the check at `stage` for a client, HELO, sender and recipient.
    fn run(check: &ListsCheck, stage: Stage, session: &SessionInfo, sender: &str, rcpt: &str) -> Verdict {
        let sender = (!sender.is_empty()).then(|| parse_path(sender).unwrap().0);
        let rcpt = (!rcpt.is_empty()).then(|| parse_path(rcpt).unwrap().0);
        let facts = SessionFacts::default();
        let exempt = Exemptions::default();
        let cx = Context {
            stage,
            session,
            sender: sender.as_ref(),
            recipient: rcpt.as_ref(),
            recipients: &[],
            message: None,
            facts: &facts,
            exempt: &exempt,
        };
        // The check never waits: one poll without a runtime must finish it.
        let mut task_cx = std::task::Context::from_waker(std::task::Waker::noop());
        match check.check(&cx).as_mut().poll(&mut task_cx) {
            std::task::Poll::Ready(r) => r.unwrap(),
            std::task::Poll::Pending => panic!("lists must not wait"),
        }
    }

    fn connect(check: &ListsCheck, ip: &str) -> Verdict {
        run(check, Stage::Connect, &info(ip, None), "", "")
    }

    fn helo(check: &ListsCheck, name: &str) -> Verdict {
        run(check, Stage::Helo, &info("203.0.113.9", Some(name)), "", "")
    }

    fn sender(check: &ListsCheck, addr: &str) -> Verdict {
        run(
            check,
            Stage::Mail,
            &info("203.0.113.9", Some("x.example")),
            addr,
            "",
        )
    }

    fn rcpt(check: &ListsCheck, addr: &str) -> Verdict {
        run(
            check,
            Stage::Rcpt,
            &info("203.0.113.9", Some("x.example")),
            "<a@b.example>",
            addr,
        )
    }

    fn parse(toml_text: &str) -> ListsConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn build(toml_text: &str) -> ListsCheck {
        ListsCheck::build(&parse(toml_text)).unwrap()
    }

    fn errors(toml_text: &str) -> String {
        ListsCheck::build(&parse(toml_text)).unwrap_err().join("\n")
    }

    fn refused(v: &Verdict) -> Option<String> {
        match v {
            Verdict::Reject(r) | Verdict::TempFail(r) | Verdict::Monitor(r) => {
                assert_eq!(r.category, Category::Blacklist);
                Some(
                    String::from_utf8(r.reply.to_bytes())
                        .unwrap()
                        .trim_end()
                        .to_string(),
                )
            }
            Verdict::Score { refusal, .. } => Some(refusal.reply.lines.join(" ")),
            _ => None,
        }
    }

    const BASIC: &str = r#"
        [[whitelist]]
        name = "partners"
        ips = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]
        helos = ["mx.partner.example", "/^mail[0-9]+\\.partner\\.example$/i"]
        senders = ["boss@example.net", "partner.example", "@exact.example"]
        recipients = ["postmaster@example.com"]
        [[whitelist]]
        name = "no-grey"
        ips = ["203.0.113.0/24"]
        senders = ["grey.example"]
        exempt = ["greylist", "dnsbl", "greylist"]
        [[blacklist]]
        name = "local-bans"
        ips = ["192.0.2.128/25", "10.0.0.0/8", "2001:db8:bad::/48", "::ffff:100.64.0.0/112"]
        helos = ["friend", "/^[0-9.]+$/", "BAD.example."]
        senders = ["spam.example", "@exactspam.example", "Bad.Guy@Example.org"]
        recipients = ["trap@example.com", "honeypot.example"]
    "#;

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c = parse(BASIC);
        assert_eq!(c.whitelist[0].exempt, vec!["all"]);
        assert_eq!(c.blacklist[0].action, CheckAction::Reject);
        assert_eq!(parse(""), ListsConfig::default());
        assert!(toml::from_str::<ListsConfig>("[[whitelist]]\nip = [\"1.2.3.4\"]").is_err());
        assert!(toml::from_str::<ListsConfig>("[[blacklist]]\naction = \"drop\"").is_err());
        let c = parse("[[blacklist]]\naction = \"score:2.5\"");
        assert_eq!(c.blacklist[0].action, CheckAction::Score(2.5));
    }

    #[test]
    fn ips_longest_prefix_boundaries_and_mapped() {
        let c = build(BASIC);
        // Whitelists win over a more specific blacklist entry: whitelists are consulted first.
        assert_eq!(connect(&c, "192.0.2.200"), Verdict::Accept);
        assert_eq!(connect(&c, "192.0.2.0"), Verdict::Accept);
        assert_eq!(connect(&c, "192.0.2.255"), Verdict::Accept);
        assert_eq!(connect(&c, "192.0.3.0"), Verdict::Pass);
        assert_eq!(connect(&c, "192.0.1.255"), Verdict::Pass);
        assert_eq!(connect(&c, "198.51.100.7"), Verdict::Accept);
        assert_eq!(connect(&c, "198.51.100.8"), Verdict::Pass);
        assert_eq!(connect(&c, "::ffff:198.51.100.7"), Verdict::Accept);
        assert_eq!(connect(&c, "2001:db8:ffff::1"), Verdict::Accept);
        assert_eq!(connect(&c, "2001:db9::1"), Verdict::Pass);
        assert_eq!(
            c.whitelisted_ip("::ffff:192.0.2.1".parse().unwrap()),
            Some("partners")
        );
        assert_eq!(c.whitelisted_ip("192.0.3.1".parse().unwrap()), None);
        assert_eq!(
            c.blacklisted_ip("10.255.255.255".parse().unwrap()),
            Some("local-bans")
        );

        let r = refused(&connect(&c, "10.1.2.3")).unwrap();
        assert_eq!(
            r,
            "554 5.7.1 Access denied: client [10.1.2.3] is blacklisted (list local-bans)"
        );
        // The reply names the client as IPv4 even when it arrived v4-mapped.
        let r = refused(&connect(&c, "::ffff:10.1.2.3")).unwrap();
        assert!(r.contains("client [10.1.2.3]"), "{r}");
        assert!(refused(&connect(&c, "11.0.0.0")).is_none());
        assert!(refused(&connect(&c, "9.255.255.255")).is_none());
        // A ::ffff:a.b.c.d/112 entry is stored as a.b.c.d/16 and matches IPv4 clients.
        assert!(refused(&connect(&c, "100.64.255.1")).is_some());
        assert!(refused(&connect(&c, "100.65.0.1")).is_none());
        // 2001:db8:bad::/48 is inside the whitelisted 2001:db8::/32: the whitelist wins.
        assert_eq!(connect(&c, "2001:db8:bad::1"), Verdict::Accept);
        // Named exemptions.
        assert_eq!(
            connect(&c, "203.0.113.77"),
            Verdict::Exempt(Arc::from(vec!["greylist".to_string(), "dnsbl".to_string()]))
        );
    }

    #[test]
    fn ip_entry_parsing() {
        assert_eq!(
            parse_ip("192.0.2.77/24").unwrap(),
            "192.0.2.0/24".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_ip(" 198.51.100.7 ").unwrap(),
            "198.51.100.7/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_ip("::ffff:192.0.2.1").unwrap(),
            "192.0.2.1/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_ip("::ffff:0:0/96").unwrap(),
            "0.0.0.0/0".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_ip("2001:db8::1/32").unwrap(),
            "2001:db8::/32".parse::<IpNet>().unwrap()
        );
        for bad in [
            "192.0.2.0/33",
            "192.0.2",
            "256.0.0.1",
            "2001:db8::/129",
            "1.2.3.4/",
            "",
            "example.com",
        ] {
            assert!(parse_ip(bad).is_err(), "{bad}");
        }
        let e = errors(
            r#"[[blacklist]]
               ips = ["10.0.0.0/8", "10.0.0.0/40", "x"]"#,
        );
        assert!(
            e.contains("checks.lists.blacklist[0].ips[1]: \"10.0.0.0/40\" is not an IP"),
            "{e}"
        );
        assert!(e.contains("checks.lists.blacklist[0].ips[2]:"), "{e}");
        assert!(!e.contains("ips[0]"), "{e}");
    }

    #[test]
    fn helo_exact_and_regex() {
        let c = build(BASIC);
        assert_eq!(helo(&c, "mx.partner.example"), Verdict::Accept);
        assert_eq!(helo(&c, "MX.Partner.Example."), Verdict::Accept);
        assert_eq!(helo(&c, "mail12.partner.example"), Verdict::Accept);
        assert_eq!(helo(&c, "MAIL12.PARTNER.EXAMPLE"), Verdict::Accept);
        assert_eq!(helo(&c, "mail12.partner.example."), Verdict::Accept);
        assert_eq!(helo(&c, "mail.partner.example"), Verdict::Pass);
        assert_eq!(helo(&c, "xmail1.partner.example"), Verdict::Pass);
        assert_eq!(helo(&c, "mail1.partner.example.evil"), Verdict::Pass);
        assert_eq!(helo(&c, "mail1xpartnerxexample"), Verdict::Pass);
        assert_eq!(
            refused(&helo(&c, "Friend")).unwrap(),
            "550 5.7.1 Helo name rejected: blacklisted"
        );
        assert!(refused(&helo(&c, "bad.example")).is_some());
        assert!(refused(&helo(&c, "bad.example.")).is_some());
        assert!(refused(&helo(&c, "1.2.3.4")).is_some());
        assert!(refused(&helo(&c, "friendly")).is_none());
        assert!(refused(&helo(&c, "[1.2.3.4]")).is_none());
        // No HELO yet: nothing to decide.
        let v = run(&c, Stage::Helo, &info("203.0.113.9", None), "", "");
        assert_eq!(v, Verdict::Skip);
    }

    #[test]
    fn helo_regex_flags_and_errors() {
        let c = build(
            r#"[[blacklist]]
               helos = ["/^ dyn \\d+ \\. isp \\. example $ # dial-up/x", "/^[a-z]+-pc$/"]"#,
        );
        assert!(refused(&helo(&c, "dyn42.isp.example")).is_some());
        assert!(refused(&helo(&c, "DYN42.ISP.EXAMPLE")).is_some());
        assert!(refused(&helo(&c, "dyn 42.isp.example")).is_none());
        // Case-insensitive even without the i flag: host names are.
        assert!(refused(&helo(&c, "JOHN-PC")).is_some());
        let e = errors(
            r#"[[blacklist]]
               helos = ["/a(b/", "/abc", "/abc/g", "//", "two words", "/(?:a{1000}){1000}/"]"#,
        );
        for i in 0..6 {
            assert!(
                e.contains(&format!("checks.lists.blacklist[0].helos[{i}]:")),
                "{i}: {e}"
            );
        }
        assert!(e.contains("unknown regex flag 'g'"), "{e}");
        assert!(e.contains("size limit"), "{e}");
        // A '/' inside the pattern is fine: the last one ends it.
        assert_eq!(
            parse_helo("/a/b/i").unwrap(),
            HeloPattern::Regex("a/b".to_string())
        );
    }

    #[test]
    fn senders_on_label_boundaries() {
        let c = build(BASIC);
        assert_eq!(sender(&c, "<boss@example.net>"), Verdict::Accept);
        assert_eq!(sender(&c, "<BOSS@Example.NET>"), Verdict::Accept);
        assert_eq!(sender(&c, "<\"boss\"@example.net>"), Verdict::Accept);
        assert_eq!(sender(&c, "<boss@example.net.>"), Verdict::Accept);
        assert_eq!(sender(&c, "<other@example.net>"), Verdict::Pass);
        assert_eq!(sender(&c, "<boss@sub.example.net>"), Verdict::Pass);
        assert_eq!(sender(&c, "<x@partner.example>"), Verdict::Accept);
        assert_eq!(sender(&c, "<x@a.b.Partner.Example>"), Verdict::Accept);
        assert_eq!(sender(&c, "<x@xpartner.example>"), Verdict::Pass);
        assert_eq!(sender(&c, "<x@partner.example.com>"), Verdict::Pass);
        assert_eq!(sender(&c, "<x@exact.example>"), Verdict::Accept);
        assert_eq!(sender(&c, "<x@sub.exact.example>"), Verdict::Pass);
        // The source route is not the address; the mailbox after it is.
        assert_eq!(sender(&c, "<@relay.example:x@partner.example>"), Verdict::Accept);

        assert_eq!(
            refused(&sender(&c, "<joe@mail.spam.example>")).unwrap(),
            "550 5.7.1 <joe@mail.spam.example>: Sender address rejected: blacklisted"
        );
        assert!(refused(&sender(&c, "<joe@SPAM.example>")).is_some());
        assert!(refused(&sender(&c, "<joe@notspam.example>")).is_none());
        assert!(refused(&sender(&c, "<joe@exactspam.example>")).is_some());
        assert!(refused(&sender(&c, "<joe@a.exactspam.example>")).is_none());
        assert!(refused(&sender(&c, "<bad.guy@example.org>")).is_some());
        assert!(refused(&sender(&c, "<bad.guy2@example.org>")).is_none());
        // The null sender never matches, even with a list holding every kind of entry.
        assert_eq!(sender(&c, "<>"), Verdict::Pass);
        assert_eq!(sender(&c, "<postmaster>"), Verdict::Pass);
        assert_eq!(sender(&c, "<x@[192.0.2.1]>"), Verdict::Pass);
        // Whitelisted sender domain with named exemptions.
        assert!(matches!(sender(&c, "<a@grey.example>"), Verdict::Exempt(c) if c.len() == 2));
    }

    #[test]
    fn recipients() {
        let c = build(BASIC);
        assert_eq!(rcpt(&c, "<PostMaster@example.com>"), Verdict::Accept);
        assert_eq!(rcpt(&c, "<abuse@example.com>"), Verdict::Pass);
        assert_eq!(
            refused(&rcpt(&c, "<Trap@Example.com>")).unwrap(),
            "550 5.7.1 <Trap@Example.com>: Recipient address rejected: blacklisted"
        );
        assert!(refused(&rcpt(&c, "<x@deep.honeypot.example>")).is_some());
        // A sender entry is not a recipient entry, and the other way round.
        assert!(refused(&rcpt(&c, "<x@spam.example>")).is_none());
        assert!(refused(&sender(&c, "<trap@example.com>")).is_none());
        // Stages the check does not judge.
        let s = info("10.0.0.1", None);
        assert_eq!(run(&c, Stage::Data, &s, "", ""), Verdict::Skip);
        assert_eq!(
            run(&c, Stage::RcptAccepted, &s, "", "<trap@example.com>"),
            Verdict::Skip
        );
    }

    #[test]
    fn authenticated_envelopes_are_skipped() {
        let c = build(BASIC);
        let mut s = info("203.0.113.9", Some("x.example"));
        s.authenticated = Some("user".into());
        assert_eq!(run(&c, Stage::Mail, &s, "<a@spam.example>", ""), Verdict::Skip);
        assert_eq!(
            run(&c, Stage::Rcpt, &s, "<a@b.example>", "<trap@example.com>"),
            Verdict::Skip
        );
    }

    #[test]
    fn actions_and_list_order() {
        let c = build(
            r#"
            [[blacklist]]
            name = "soft"
            ips = ["10.0.0.0/8"]
            action = "tempfail"
            [[blacklist]]
            name = "hard"
            ips = ["10.0.0.0/8", "11.0.0.0/8"]
            [[blacklist]]
            name = "watch"
            ips = ["12.0.0.0/8"]
            action = "monitor"
            [[blacklist]]
            name = "points"
            ips = ["13.0.0.0/8"]
            action = "score:3"
            "#,
        );
        // The first matching blacklist decides, with its action (4xx twin for tempfail).
        let v = connect(&c, "10.0.0.1");
        assert!(matches!(&v, Verdict::TempFail(_)), "{v:?}");
        assert!(refused(&v).unwrap().starts_with("451 4.7.1 "), "{v:?}");
        assert!(refused(&v).unwrap().contains("(list soft)"));
        assert!(matches!(connect(&c, "11.0.0.1"), Verdict::Reject(_)));
        assert!(matches!(connect(&c, "12.0.0.1"), Verdict::Monitor(_)));
        assert!(matches!(
            connect(&c, "13.0.0.1"),
            Verdict::Score { points: 3.0, .. }
        ));
    }

    #[test]
    fn several_whitelists_combine() {
        let c = build(
            r#"
            [[whitelist]]
            ips = ["10.0.0.0/8"]
            exempt = ["greylist"]
            [[whitelist]]
            ips = ["10.1.0.0/16"]
            exempt = ["dnsbl", "greylist"]
            [[whitelist]]
            ips = ["10.1.1.0/24"]
            "#,
        );
        assert_eq!(
            connect(&c, "10.2.0.1"),
            Verdict::Exempt(Arc::from(vec!["greylist".to_string()]))
        );
        assert_eq!(
            connect(&c, "10.1.2.1"),
            Verdict::Exempt(Arc::from(vec!["greylist".to_string(), "dnsbl".to_string()]))
        );
        assert_eq!(connect(&c, "10.1.1.1"), Verdict::Accept);
        let names: Vec<&str> = c.exempt_names().collect();
        assert_eq!(names, vec!["greylist", "dnsbl", "greylist"]);
    }

    #[test]
    fn address_entry_errors() {
        let e = errors(
            r#"[[whitelist]]
               senders = ["ok.example", "*.wild.example", "user@", "@", "192.0.2", "a b@c.example", "x@-bad.example", ""]
               recipients = ["@[192.0.2.1]"]
               exempt = []
               [[whitelist]]
               name = "bad name!"
               exempt = ["Greylist"]
               [[blacklist]]
               name = "dup"
               [[blacklist]]
               name = "dup""#,
        );
        for key in [
            "whitelist[0].senders[1]: \"*.wild.example\": no wildcards",
            "whitelist[0].senders[2]",
            "whitelist[0].senders[3]",
            "whitelist[0].senders[4]",
            "whitelist[0].senders[5]",
            "whitelist[0].senders[6]",
            "whitelist[0].senders[7]",
            "whitelist[0].recipients[0]",
            "whitelist[0].exempt: empty",
            "whitelist[1].name",
            "whitelist[1].exempt[0]",
            "blacklist[1].name: \"dup\" is used by another list",
        ] {
            assert!(
                e.contains(&format!("checks.lists.{key}")),
                "missing {key} in\n{e}"
            );
        }
        assert!(!e.contains("senders[0]"), "{e}");
        assert!(!e.contains("blacklist[0]"), "{e}");
    }

    #[test]
    fn list_file_kinds_comments_and_errors() {
        let path = fixture("mixed.txt");
        let config = ListsConfig {
            blacklist: vec![BlacklistConfig {
                name: "file".into(),
                ips: vec![],
                helos: vec![],
                senders: vec![],
                recipients: vec![],
                files: vec![path.clone()],
                action: CheckAction::Reject,
            }],
            ..Default::default()
        };
        let c = ListsCheck::build(&config).unwrap();
        assert!(refused(&connect(&c, "192.0.2.99")).is_some());
        assert!(refused(&connect(&c, "198.51.100.1")).is_some());
        assert!(refused(&connect(&c, "198.51.101.1")).is_none());
        assert!(refused(&connect(&c, "2001:db8:1::5")).is_some());
        assert!(refused(&helo(&c, "spammer.example")).is_some());
        assert!(refused(&helo(&c, "host-12-34.dyn.example")).is_some());
        assert!(refused(&helo(&c, "host.dyn.example")).is_none());
        assert!(refused(&sender(&c, "<x@bulk.example>")).is_some());
        assert!(refused(&sender(&c, "<x@sub.bulk.example>")).is_some());
        assert!(refused(&sender(&c, "<x#tag@only.example>")).is_some());
        assert!(refused(&sender(&c, "<x@only.example>")).is_none());
        assert!(refused(&rcpt(&c, "<trap@ours.example>")).is_some());
        assert!(refused(&sender(&c, "<trap@ours.example>")).is_none());
        // A trailing comment after a space is ignored; the entry before it counts.
        assert!(refused(&sender(&c, "<x@commented.example>")).is_some());
        // A CRLF file works the same.
        assert!(refused(&sender(&c, "<x@crlf.example>")).is_some());

        let bad = fixture("bad.txt");
        let config = ListsConfig {
            whitelist: vec![WhitelistConfig {
                name: String::new(),
                ips: vec![],
                helos: vec![],
                senders: vec![],
                recipients: vec![],
                files: vec![bad.clone(), fixture("missing.txt")],
                exempt: default_exempt(),
            }],
            ..Default::default()
        };
        let e = ListsCheck::build(&config).unwrap_err();
        let shown = bad.display().to_string();
        for line in [3, 5, 6, 7, 9] {
            let prefix = format!("checks.lists.whitelist[0].files: {shown}:{line}: ");
            assert!(
                e.iter().any(|m| m.starts_with(&prefix)),
                "line {line} missing in {e:#?}"
            );
        }
        for line in [1, 2, 4, 8] {
            let prefix = format!("{shown}:{line}: ");
            assert!(
                !e.iter().any(|m| m.contains(&prefix)),
                "line {line} is fine: {e:#?}"
            );
        }
        assert!(e.iter().any(|m| m.contains("missing.txt: cannot read")), "{e:#?}");
    }

    #[test]
    fn large_ip_list_from_a_generated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.txt");
        let mut text = String::from("# 5,000 entries: /32s, /24s and IPv6 /64s\n");
        for i in 0..2000u32 {
            // 10.x.y.z host addresses, spaced so neighbours are not listed.
            let a = i * 4 + 1;
            text.push_str(&format!("10.{}.{}.{}\n", a >> 16 & 255, a >> 8 & 255, a & 255));
        }
        for i in 0..2000u32 {
            text.push_str(&format!("172.{}.{}.0/24\n", 16 + (i >> 8), i & 255));
        }
        for i in 0..1000u32 {
            text.push_str(&format!("2001:db8:{i:x}:1::/64\n"));
        }
        std::fs::write(&path, text).unwrap();
        let config = ListsConfig {
            blacklist: vec![BlacklistConfig {
                name: "big".into(),
                ips: vec![],
                helos: vec![],
                senders: vec![],
                recipients: vec![],
                files: vec![path],
                action: CheckAction::Reject,
            }],
            ..Default::default()
        };
        let c = ListsCheck::build(&config).unwrap();
        assert_eq!(c.black[0].list.ips.len(), 5000);
        for i in [0u32, 1, 777, 1999] {
            let a = i * 4 + 1;
            let hit = format!("10.{}.{}.{}", a >> 16 & 255, a >> 8 & 255, a & 255);
            let miss = format!("10.{}.{}.{}", a >> 16 & 255, a >> 8 & 255, (a & 255) + 1);
            assert_eq!(c.blacklisted_ip(hit.parse().unwrap()), Some("big"), "{hit}");
            assert_eq!(c.blacklisted_ip(miss.parse().unwrap()), None, "{miss}");
        }
        assert_eq!(c.blacklisted_ip("172.16.0.255".parse().unwrap()), Some("big"));
        assert_eq!(c.blacklisted_ip("172.23.207.1".parse().unwrap()), Some("big"));
        // 2000 /24s end at 172.23.207.0/24.
        assert_eq!(c.blacklisted_ip("172.23.208.1".parse().unwrap()), None);
        assert_eq!(
            c.blacklisted_ip("::ffff:172.20.1.2".parse().unwrap()),
            Some("big")
        );
        assert_eq!(
            c.blacklisted_ip("2001:db8:3e7:1::ffff".parse().unwrap()),
            Some("big")
        );
        assert_eq!(c.blacklisted_ip("2001:db8:3e7:2::1".parse().unwrap()), None);
        assert_eq!(c.blacklisted_ip("2001:db8:3e8:1::1".parse().unwrap()), None);
    }

    #[test]
    fn admin_extras_and_parse_entry() {
        let config = parse(BASIC);
        let c = ListsCheck::with_extra(
            &config,
            &["172.16.0.1".into(), "helo:good.example".into()],
            &["172.16.0.0/12".into(), "rcpt:gone@example.com".into()],
        )
        .unwrap();
        assert_eq!(connect(&c, "172.16.0.1"), Verdict::Accept);
        assert!(
            refused(&connect(&c, "172.16.0.2"))
                .unwrap()
                .contains("(list admin)")
        );
        assert!(refused(&rcpt(&c, "<gone@example.com>")).is_some());
        assert_eq!(helo(&c, "good.example"), Verdict::Accept);
        let e = ListsCheck::with_extra(&config, &["nope nope".into()], &[]).unwrap_err();
        assert!(e[0].starts_with("admin whitelist[0]: "), "{e:?}");

        assert_eq!(
            parse_entry("HELO:Mx.Example."),
            Ok(Entry::Helo(HeloPattern::Exact("mx.example".into())))
        );
        assert_eq!(
            parse_entry("rcpt:@Example.com"),
            Ok(Entry::Recipient(AddressPattern::DomainExact(
                "example.com".into()
            )))
        );
        assert_eq!(
            parse_entry("User@Example.com"),
            Ok(Entry::Sender(AddressPattern::Address("user@example.com".into())))
        );
        assert!(parse_entry("2001:db8::/200").unwrap_err().contains("not an IP"));
        assert!(parse_entry("300.1.1.1").unwrap_err().contains("not an IP"));
        assert!(parse_entry("a/b@example.com").is_ok());
        assert_eq!(strip_comment("a@b.example # note"), "a@b.example ");
        assert_eq!(strip_comment("x#y@b.example"), "x#y@b.example");
        assert_eq!(strip_comment("# all comment"), "");
    }

    #[test]
    fn empty_lists_pass() {
        let c = ListsCheck::build(&ListsConfig::default()).unwrap();
        assert_eq!(connect(&c, "192.0.2.1"), Verdict::Pass);
        assert_eq!(helo(&c, "x.example"), Verdict::Pass);
        assert_eq!(sender(&c, "<a@b.example>"), Verdict::Pass);
        assert_eq!(rcpt(&c, "<a@b.example>"), Verdict::Pass);
        assert!(format!("{c:?}").contains("ListsCheck"));
    }
}
