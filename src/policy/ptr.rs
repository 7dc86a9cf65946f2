//! PTR check (connect stage): the client's reverse DNS. Three findings, each with its own
//! action: no PTR at all, a PTR name that does not resolve back to the client (no
//! forward-confirmed reverse DNS, FCrDNS), and a name that looks like an ISP's generic name
//! for a dynamic or residential address (the address's digits in the name, or words such as
//! `dsl`, `pool`, `dynamic`). Real mail servers have a stable, confirmed, chosen name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{BoxFuture, Category, Check, CheckAction, CheckError, Context, Ptr, Refusal, Stage, Verdict};
use crate::dns::Resolver;
use crate::smtp::codec::Reply;

/// The default `dynamic_tokens`.
pub const DEFAULT_DYNAMIC_TOKENS: &[&str] = &[
    "dyn",
    "dynamic",
    "dynip",
    "dsl",
    "adsl",
    "vdsl",
    "xdsl",
    "dhcp",
    "pool",
    "cable",
    "ppp",
    "pppoe",
    "dialup",
    "dial-up",
    "dial",
    "client",
    "cust",
    "customer",
    "broadband",
    "residential",
    "cpe",
    "ftth",
    "unassigned",
];

/// `[checks.ptr]`: the client's reverse DNS.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PtrConfig {
    /// Run the check. Default false.
    pub enabled: bool,
    /// No PTR record at all (NXDOMAIN or no data). `reject`, `tempfail`, `score:N`,
    /// `monitor` or `off`. Default "tempfail": a real server whose reverse zone is broken
    /// retries and gets through once it is fixed; spam bots rarely retry.
    #[serde(with = "optional_action")]
    pub missing: Option<CheckAction>,
    /// A PTR name that does not resolve back to the client's address. Default "score:2".
    #[serde(with = "optional_action")]
    pub unconfirmed: Option<CheckAction>,
    /// A PTR name that looks dynamic or residential (see `dynamic_tokens`). Default
    /// "score:3".
    #[serde(with = "optional_action")]
    pub dynamic: Option<CheckAction>,
    /// Words that mark a generic name for a dynamic or residential address. A token matches
    /// a whole word of the name (split at `.`, `-`, `_`, …) or the letters of a word
    /// (`dsl123` counts as `dsl`); `dial-up` matches the words `dial`, `up` in a row. The
    /// last two labels (the provider's own domain, roughly) are not searched.
    ///
    /// Trade-off: every token catches bots on home lines and also the odd real server on a
    /// business line whose provider never set a custom PTR (`static-dsl-…`). Keep the
    /// action a score, not `reject`, unless your mail is all from big providers. Default:
    /// dyn, dynamic, dynip, dsl, adsl, vdsl, xdsl, dhcp, pool, cable, ppp, pppoe, dialup,
    /// dial-up, dial, client, cust, customer, broadband, residential, cpe, ftth, unassigned.
    pub dynamic_tokens: Vec<String>,
    /// Further regular expressions (Rust `regex` syntax, linear time) tried on the whole
    /// lower-case PTR name, e.g. `"^host-\\d+\\.example\\.net$"`. Default none.
    pub dynamic_patterns: Vec<String>,
}

impl Default for PtrConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            missing: Some(CheckAction::TempFail),
            unconfirmed: Some(CheckAction::Score(2.0)),
            dynamic: Some(CheckAction::Score(3.0)),
            dynamic_tokens: DEFAULT_DYNAMIC_TOKENS.iter().map(|t| t.to_string()).collect(),
            dynamic_patterns: Vec::new(),
        }
    }
}

impl PtrConfig {
    /// Every problem, each prefixed with `key` (e.g. `checks.ptr`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        for (i, t) in self.dynamic_tokens.iter().enumerate() {
            if token_parts(t).is_empty()
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                errors.push(format!(
                    "{key}.dynamic_tokens[{i}]: {t:?} must be letters and digits, optionally joined by - _ ."
                ));
            }
        }
        if let Err(e) = compile_patterns(&self.dynamic_patterns) {
            errors.push(format!("{key}.{e}"));
        }
        errors
    }
}

/// Serde for an action that may be `"off"` (`None`): the one shared helper.
pub use super::helo::optional_action;

/// Bounds on what operators' patterns may cost to compile and run.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

fn compile_patterns(patterns: &[String]) -> Result<Option<regex::RegexSet>, String> {
    for (i, p) in patterns.iter().enumerate() {
        regex::RegexBuilder::new(p)
            .size_limit(PATTERN_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("dynamic_patterns[{i}]: {e}"))?;
    }
    if patterns.is_empty() {
        return Ok(None);
    }
    regex::RegexSetBuilder::new(patterns)
        .size_limit(PATTERN_SIZE_LIMIT * 4)
        .build()
        .map(Some)
        .map_err(|e| format!("dynamic_patterns: {e}"))
}

/// The check, built from `PtrConfig` (the app adds it only when `enabled`).
pub struct PtrCheck {
    missing: Option<CheckAction>,
    unconfirmed: Option<CheckAction>,
    dynamic: Option<CheckAction>,
    /// Each token as its parts (`dial-up` → `dial`, `up`).
    tokens: Vec<Vec<String>>,
    patterns: Option<regex::RegexSet>,
    resolver: Arc<Resolver>,
}

impl std::fmt::Debug for PtrCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtrCheck")
            .field("missing", &self.missing)
            .field("unconfirmed", &self.unconfirmed)
            .field("dynamic", &self.dynamic)
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl PtrCheck {
    /// Builds the check; errors are prefixed `checks.ptr.`.
    pub fn build(config: &PtrConfig, resolver: Arc<Resolver>) -> Result<Self, Vec<String>> {
        let errors = config.validate("checks.ptr");
        if !errors.is_empty() {
            return Err(errors);
        }
        let patterns =
            compile_patterns(&config.dynamic_patterns).map_err(|e| vec![format!("checks.ptr.{e}")])?;
        Ok(Self {
            missing: config.missing,
            unconfirmed: config.unconfirmed,
            dynamic: config.dynamic,
            tokens: config.dynamic_tokens.iter().map(|t| token_parts(t)).collect(),
            patterns,
            resolver,
        })
    }

    /// Why `name` (lower-case, no trailing dot) looks like a generic name for the dynamic
    /// address `ip`, or `None`.
    pub fn dynamic_reason(&self, ip: IpAddr, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        if ip_in_name(ip, &name) {
            return Some("contains the address".into());
        }
        if let Some(t) = self.tokens.iter().find(|t| has_token(&name, t)) {
            return Some(format!("contains {:?}", t.join("-")));
        }
        if let Some(i) = self
            .patterns
            .as_ref()
            .and_then(|p| p.matches(&name).iter().next())
        {
            return Some(format!("matches dynamic_patterns[{i}]"));
        }
        None
    }

    fn verdict(&self, ip: IpAddr, ptr: &Ptr) -> Result<Verdict, CheckError> {
        let mut findings: Vec<(CheckAction, Refusal)> = Vec::new();
        let name = match ptr {
            Ptr::Error(e) => return Err(CheckError(e.clone())),
            Ptr::None => {
                if let Some(action) = self.missing {
                    findings.push((
                        action,
                        refusal(550, "5.7.25", format!("Client host {ip} has no PTR record")),
                    ));
                }
                None
            }
            Ptr::Unconfirmed(name) => {
                if let Some(action) = self.unconfirmed {
                    findings.push((
                        action,
                        refusal(
                            550,
                            "5.7.25",
                            format!(
                                "Client host {ip}: its PTR name {} does not resolve back to it",
                                printable(name)
                            ),
                        ),
                    ));
                }
                Some(name)
            }
            Ptr::Confirmed(name) => Some(name),
        };
        if let (Some(action), Some(name)) = (self.dynamic, name)
            && let Some(reason) = self.dynamic_reason(ip, name)
        {
            findings.push((
                action,
                refusal(
                    550,
                    "5.7.1",
                    format!(
                        "Client host {ip}: PTR name {} looks like a dynamic address ({reason}); send through your provider's mail server",
                        printable(name)
                    ),
                ),
            ));
        }
        Ok(combine(findings))
    }
}

impl Check for PtrCheck {
    fn name(&self) -> &'static str {
        "ptr"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Connect]
    }

    fn needs_io(&self) -> bool {
        true
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(async move {
            let ip = cx.session.peer.ip().to_canonical();
            if crate::dns::is_internal(ip) {
                return Ok(Verdict::Skip);
            }
            // Shared with other checks and the Received header: one lookup per session.
            let ptr = cx.facts.ptr.get_or_init(|| self.resolver.reverse(ip)).await;
            self.verdict(ip, ptr)
        })
    }
}

fn refusal(code: u16, enhanced: &str, text: String) -> Refusal {
    Refusal {
        reply: Reply::build(code, enhanced, text),
        category: Category::Ptr,
    }
}

/// One verdict from several findings: the strongest action wins (reject, tempfail, score,
/// monitor); scores add up. A monitor finding that does not become the verdict is logged
/// here, as the pipeline would have logged it.
fn combine(findings: Vec<(CheckAction, Refusal)>) -> Verdict {
    let rank = |a: &CheckAction| match a {
        CheckAction::Reject => 3,
        CheckAction::TempFail => 2,
        CheckAction::Score(_) => 1,
        CheckAction::Monitor => 0,
    };
    let Some(top) = findings.iter().map(|(a, _)| rank(a)).max() else {
        return Verdict::Pass;
    };
    let mut verdict = None;
    let mut points = 0.0;
    let mut best_points = f32::NEG_INFINITY;
    for (action, refusal) in findings {
        match action {
            CheckAction::Score(n) if top == 1 => {
                points += n;
                if n > best_points {
                    best_points = n;
                    verdict = Some(refusal);
                }
            }
            a if rank(&a) == top && verdict.is_none() => verdict = Some(refusal),
            CheckAction::Monitor => {
                tracing::info!(check = "ptr", reply = %refusal.reply, "Monitor: the check would have refused.")
            }
            _ => {}
        }
    }
    let Some(refusal) = verdict else {
        return Verdict::Pass;
    };
    match top {
        3 => Verdict::Reject(refusal),
        2 => Verdict::TempFail(refusal.temporary()),
        1 => Verdict::Score { points, refusal },
        _ => Verdict::Monitor(refusal),
    }
}

/// A name from DNS as it may appear in a reply: printable ASCII, bounded length.
fn printable(name: &str) -> String {
    name.chars()
        .take(255)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// The parts of a token: `dial-up` → `["dial", "up"]`.
fn token_parts(token: &str) -> Vec<String> {
    token
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|p| !p.is_empty())
        .map(|p| p.to_ascii_lowercase())
        .collect()
}

/// True when the token's parts appear as consecutive words of the name, leaving out the
/// last two labels (the provider's domain: `pool.ntp.org`'s `pool` would otherwise count
/// as `pool`, and so would a provider called `cable.example`).
fn has_token(name: &str, parts: &[String]) -> bool {
    if parts.is_empty() {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    let host_labels = &labels[..labels.len().saturating_sub(2)];
    let words: Vec<&str> = host_labels
        .iter()
        .flat_map(|l| l.split(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(parts.len())
        .any(|w| w.iter().zip(parts).all(|(word, part)| word_matches(word, part)))
}

/// `dsl123` matches `dsl`; `adsl2plus` matches `adsl` and `plus`; `mx1` matches `mx`.
fn word_matches(word: &str, part: &str) -> bool {
    word == part
        || word
            .split(|c: char| !c.is_ascii_alphabetic())
            .any(|letters| letters == part)
}

/// Runs of characters for which `digit` holds, joined by single `-`, `.` or `_`: the
/// groups in which an address may be spelled out. Any other character ends a group.
fn digit_groups(name: &str, digit: impl Fn(u8) -> bool) -> Vec<Vec<&str>> {
    let b = name.as_bytes();
    let mut groups = Vec::new();
    let mut current = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !digit(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && digit(b[i]) {
            i += 1;
        }
        current.push(&name[start..i]);
        if i + 1 < b.len() && matches!(b[i], b'-' | b'.' | b'_') && digit(b[i + 1]) {
            i += 1;
        } else {
            groups.push(std::mem::take(&mut current));
        }
    }
    groups
}

/// True when the client's address is spelled out in the name, in one of the forms ISPs
/// use for generic names.
pub fn ip_in_name(ip: IpAddr, name: &str) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => ipv4_in_name(v4, name),
        IpAddr::V6(v6) => ipv6_in_name(v6, name),
    }
}

fn ipv4_in_name(ip: Ipv4Addr, name: &str) -> bool {
    let o = ip.octets();
    let r = [o[3], o[2], o[1], o[0]];
    // 1.2.3.4 as 1-2-3-4, 001.002.003.004, 4_3_2_1, host1-2-3-4, … (forward or reversed).
    let decimal = digit_groups(name, |b| b.is_ascii_digit()).into_iter().any(|g| {
        let octets: Vec<Option<u8>> = g.iter().map(|d| d.parse::<u8>().ok()).collect();
        octets.windows(4).any(|w| {
            let w: Vec<u8> = w.iter().map_while(|d| *d).collect();
            w == o || w == r
        })
    });
    if decimal {
        return true;
    }
    // Zero-padded and hexadecimal forms are long enough that a chance match is negligible,
    // so they count anywhere in the name: 001002003004, 01020304 (hex), reversed too.
    let forms = [
        format!("{:03}{:03}{:03}{:03}", o[0], o[1], o[2], o[3]),
        format!("{:03}{:03}{:03}{:03}", r[0], r[1], r[2], r[3]),
        format!("{:02x}{:02x}{:02x}{:02x}", o[0], o[1], o[2], o[3]),
        format!("{:02x}{:02x}{:02x}{:02x}", r[0], r[1], r[2], r[3]),
    ];
    if forms.iter().any(|f| name.contains(f.as_str())) {
        return true;
    }
    // The address as one 32-bit number (16909060 for 1.2.3.4), as a whole run of digits.
    let number = u32::from(ip).to_string();
    digit_groups(name, |b| b.is_ascii_digit())
        .iter()
        .flatten()
        .any(|run| *run == number)
}

fn ipv6_in_name(ip: Ipv6Addr, name: &str) -> bool {
    let nibbles = format!("{:032x}", u128::from(ip));
    let reversed: String = nibbles.chars().rev().collect();
    if name.contains(&nibbles) || name.contains(&reversed) {
        return true;
    }
    let segments = ip.segments();
    digit_groups(name, |b| b.is_ascii_hexdigit()).iter().any(|g| {
        // 2001-db8-0-0-1-2-3-4 (hex groups, zero-padded or not).
        let groups = g.windows(8).any(|w| {
            w.iter()
                .zip(segments)
                .all(|(s, seg)| u16::from_str_radix(s, 16) == Ok(seg))
        });
        // 2.0.0.0.1.0…(ip6.arpa order) or 2-0-0-1-0-d-b-8… (one nibble per group).
        let nibble_run = g
            .split(|s| s.len() != 1)
            .map(|stretch| stretch.concat())
            .any(|s| s.contains(&nibbles) || s.contains(&reversed));
        groups || nibble_run
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> PtrCheck {
        let resolver = Resolver::new(&crate::dns::DnsConfig {
            servers: vec!["127.0.0.1:9".parse().unwrap()],
            ..Default::default()
        })
        .unwrap();
        PtrCheck::build(&PtrConfig::default(), Arc::new(resolver)).unwrap()
    }

    fn dynamic(ip: &str, name: &str) -> bool {
        check().dynamic_reason(ip.parse().unwrap(), name).is_some()
    }

    #[test]
    fn dynamic_names() {
        for (ip, name) in [
            ("73.12.34.56", "c-73-12-34-56.hsd1.ma.comcast.net"),
            ("94.212.58.91", "5ed43a5b.dynamic.example.net"),
            ("94.212.58.91", "5ed43a5b.example.net"),
            ("123.45.67.89", "dsl-123-45-67-89.example.de"),
            ("86.150.12.34", "host86-150-12-34.range86-150.btcentralplus.com"),
            ("1.2.3.4", "4.3.2.1.example.net"),
            ("1.2.3.4", "ip001002003004.example.net"),
            ("1.2.3.4", "4_3_2_1.example.net"),
            ("1.2.3.4", "h16909060.example.net"),
            ("203.0.113.7", "cpe-some-place.example.org"),
            ("203.0.113.7", "dsl123.example.org"),
            ("203.0.113.7", "x.dial-up.provider.example"),
            ("203.0.113.7", "pool-xyz.isp.example"),
            ("2001:db8::1:2", "2001-db8-0-0-0-0-1-2.dyn.example"),
            ("2001:db8::1:2", "2001-0db8-0000-0000-0000-0000-0001-0002.example"),
            ("2001:db8::1:2", "20010db8000000000000000000010002.example"),
            (
                "2001:db8::1:2",
                "2.0.0.0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.example",
            ),
            ("::ffff:73.12.34.56", "c-73-12-34-56.example.net"),
        ] {
            assert!(dynamic(ip, name), "{name} should look dynamic for {ip}");
        }
        for (ip, name) in [
            ("209.85.167.170", "mail-oi1-f170.google.com"),
            ("54.240.8.12", "a8-12.smtp-out.amazonses.com"),
            ("192.0.2.1", "mx1.example.com"),
            ("192.0.2.1", "mail.cable.example"),
            ("192.0.2.1", "ntp.pool.example"),
            ("192.0.2.1", "mailclient-relay.example.com"),
            ("192.0.2.1", "host-192-0-2-10.example.net"),
            ("192.0.2.1", "1192-0-2-1.example.net"),
            ("192.0.2.1", "o1.ptr1234.sendgrid.net"),
            ("2001:db8::1:2", "mail.example.com"),
            ("192.0.2.1", ""),
            ("192.0.2.1", "-.-._.."),
        ] {
            assert!(!dynamic(ip, name), "{name} should not look dynamic for {ip}");
        }
    }

    #[test]
    fn verdicts() {
        let c = check();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let v = c.verdict(ip, &Ptr::None).unwrap();
        assert!(
            matches!(&v, Verdict::TempFail(r) if r.reply.to_string().starts_with("450 4.7.25 Client host 192.0.2.1 has no PTR")),
            "{v:?}"
        );
        assert_eq!(
            c.verdict(ip, &Ptr::Confirmed("mx.example.com".into())).unwrap(),
            Verdict::Pass
        );
        let v = c.verdict(ip, &Ptr::Unconfirmed("mx.example.com".into())).unwrap();
        assert!(
            matches!(v, Verdict::Score { points, .. } if points == 2.0),
            "{v:?}"
        );
        // Both unconfirmed and dynamic: the scores add up, the bigger one explains.
        let v = c
            .verdict(ip, &Ptr::Unconfirmed("dsl-1.example.com".into()))
            .unwrap();
        assert!(
            matches!(&v, Verdict::Score { points, refusal } if *points == 5.0 && refusal.reply.to_string().contains("dynamic")),
            "{v:?}"
        );
        assert!(c.verdict(ip, &Ptr::Error("timeout".into())).is_err());
        // Names from DNS never put control characters into a reply.
        let v = c.verdict(ip, &Ptr::Unconfirmed("a\r\nb.example".into())).unwrap();
        assert!(matches!(&v, Verdict::Score { refusal, .. } if !refusal.reply.lines[0].contains('\r')));
    }

    #[test]
    fn config() {
        let c: PtrConfig = toml::from_str("").unwrap();
        assert_eq!(c, PtrConfig::default());
        let c: PtrConfig = toml::from_str(
            "enabled = true\nmissing = \"off\"\ndynamic = \"reject\"\nunconfirmed = \"score:1.5\"",
        )
        .unwrap();
        assert_eq!(
            (c.missing, c.dynamic, c.unconfirmed),
            (None, Some(CheckAction::Reject), Some(CheckAction::Score(1.5)))
        );
        assert!(toml::from_str::<PtrConfig>("missing = \"drop\"").is_err());
        assert!(toml::from_str::<PtrConfig>("dynamic_token = []").is_err());
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("missing = \"off\""), "{text}");
        let bad = PtrConfig {
            dynamic_tokens: vec!["ok".into(), "".into(), "a b".into()],
            dynamic_patterns: vec!["(".into()],
            ..Default::default()
        };
        let errors = bad.validate("checks.ptr").join("\n");
        for key in [
            "checks.ptr.dynamic_tokens[1]",
            "checks.ptr.dynamic_tokens[2]",
            "checks.ptr.dynamic_patterns[0]",
        ] {
            assert!(errors.contains(key), "{key} missing in {errors}");
        }
    }

    #[test]
    fn combining_findings() {
        let r = |t: &str| refusal(550, "5.7.25", t.into());
        assert_eq!(combine(vec![]), Verdict::Pass);
        let v = combine(vec![
            (CheckAction::Monitor, r("m")),
            (CheckAction::Reject, r("x")),
        ]);
        assert!(matches!(v, Verdict::Reject(ref f) if f.reply.lines[0] == "x"));
        let v = combine(vec![(CheckAction::Monitor, r("m"))]);
        assert!(matches!(v, Verdict::Monitor(_)));
    }
}
