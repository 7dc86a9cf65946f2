//! The `helo` check (`[checks.helo]`): the HELO/EHLO name must be a fully-qualified host name,
//! or an address literal that is the client's own address; it must not be a bare IP, our own
//! name or address, or localhost; optionally it must resolve. Also [`optional_action`], the
//! serde helper for actions that can be `"off"`, shared with other checks.
//!
//! Normalisation: surrounding spaces are ignored, names compare case-insensitively, and one
//! trailing dot is ignored (`mx.example.com.` is the absolute form of `mx.example.com`, the
//! same name). Address literals are compared as addresses: `[IPv6:::ffff:192.0.2.1]`,
//! `[192.0.2.1]` and a client at `::ffff:192.0.2.1` are all the same IPv4 address.
//!
//! When several rules fire (`[127.0.0.1]` from a remote client is both `localhost` and
//! `literal_mismatch`), the strongest action wins (reject, then tempfail, then score, then
//! monitor), and among equals the most specific rule, in this order: `own_name`,
//! `localhost`, `literal_mismatch`, `bare_ip`, `not_fqdn`, `unresolvable`. DNS is only asked
//! when its answer could change the outcome.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{BoxFuture, Category, Check, CheckAction, CheckError, Context, Refusal, Stage, Verdict};
use crate::dns::{DnsError, Resolver};
use crate::smtp::codec::Reply;

/// Serde helper for an `Option<CheckAction>` written as an action (`reject`, `tempfail`,
/// `score:N`, `monitor`) or `"off"` (`None`: the rule is disabled). Use with
/// `#[serde(with = "crate::policy::helo::optional_action")]`.
pub mod optional_action {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::policy::CheckAction;

    /// Parses `off` or an action.
    pub fn parse(text: &str) -> Result<Option<CheckAction>, String> {
        match text.trim() {
            "off" => Ok(None),
            t => CheckAction::parse(t)
                .map(Some)
                .map_err(|_| format!("{t:?} is not an action (reject, tempfail, monitor, score:N or off)")),
        }
    }

    pub fn serialize<S: Serializer>(action: &Option<CheckAction>, s: S) -> Result<S::Ok, S::Error> {
        match action {
            Some(a) => a.serialize(s),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CheckAction>, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `[checks.helo]`: rules on the HELO/EHLO name. Each rule takes an action (`reject`,
/// `tempfail`, `score:N`, `monitor`) or `"off"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeloConfig {
    /// Run the check at all. Default true.
    pub enabled: bool,
    /// Not a fully-qualified host name (at least two labels of letters, digits, `-`, `_`;
    /// no numeric top label) nor an address literal: `friend`, `user-PC`, `a..b`,
    /// `[garbage]`. Default "reject" (`504 5.5.2` or, for bad syntax, `501 5.5.2`).
    #[serde(with = "optional_action")]
    pub not_fqdn: Option<CheckAction>,
    /// An IP address without brackets (`192.0.2.1` instead of `[192.0.2.1]`). Default "reject".
    #[serde(with = "optional_action")]
    pub bare_ip: Option<CheckAction>,
    /// An address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) that is not the client's
    /// address. Default "reject".
    #[serde(with = "optional_action")]
    pub literal_mismatch: Option<CheckAction>,
    /// One of our host names or addresses, bracketed or not, from a client that is not one
    /// of our addresses or loopback. Default "reject".
    #[serde(with = "optional_action")]
    pub own_name: Option<CheckAction>,
    /// `localhost`, `localhost.localdomain` and the like, or a loopback or unspecified
    /// address, from a client that is not on loopback. Default "reject".
    #[serde(with = "optional_action")]
    pub localhost: Option<CheckAction>,
    /// A fully-qualified name with no A, AAAA or MX record (a DNS timeout or failure is a
    /// check error, decided by the pipeline's `on_error`). Needs the resolver. Default "off".
    #[serde(with = "optional_action")]
    pub unresolvable: Option<CheckAction>,
}

impl Default for HeloConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            not_fqdn: Some(CheckAction::Reject),
            bare_ip: Some(CheckAction::Reject),
            literal_mismatch: Some(CheckAction::Reject),
            own_name: Some(CheckAction::Reject),
            localhost: Some(CheckAction::Reject),
            unresolvable: None,
        }
    }
}

/// The sub-rules, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    OwnName,
    Localhost,
    LiteralMismatch,
    BareIp,
    NotFqdn,
    Unresolvable,
}

impl Rule {
    fn as_str(self) -> &'static str {
        match self {
            Self::OwnName => "own_name",
            Self::Localhost => "localhost",
            Self::LiteralMismatch => "literal_mismatch",
            Self::BareIp => "bare_ip",
            Self::NotFqdn => "not_fqdn",
            Self::Unresolvable => "unresolvable",
        }
    }
}

/// What a HELO argument is, syntactically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `[192.0.2.1]` or `[IPv6:…]`; the address in canonical form (IPv4-mapped as IPv4).
    Literal(IpAddr),
    /// Bracketed but not a valid RFC 5321 address literal.
    BadLiteral,
    /// An IP address without brackets, canonical.
    BareIp(IpAddr),
    /// A valid host name with at least two labels.
    Fqdn,
    /// A valid single label (`localhost`, `friend`).
    SingleLabel,
    /// Not a host name: empty, bad characters, empty or over-long labels, numeric top label.
    Invalid,
}

/// A HELO argument, parsed once.
struct Helo {
    shape: Shape,
    /// Lower case, trimmed, one trailing dot removed (for names).
    name: String,
    /// Safe to echo in a reply.
    echo: String,
}

impl Helo {
    fn parse(raw: &str) -> Self {
        let t = raw.trim();
        let echo = echo(t);
        if let Some(inner) = t.strip_prefix('[') {
            let ip = inner.strip_suffix(']').and_then(parse_literal);
            let shape = ip.map_or(Shape::BadLiteral, |ip| Shape::Literal(ip.to_canonical()));
            return Self {
                shape,
                name: t.to_ascii_lowercase(),
                echo,
            };
        }
        let name = t.strip_suffix('.').unwrap_or(t).to_ascii_lowercase();
        let shape = if let Ok(ip) = name.parse::<IpAddr>() {
            Shape::BareIp(ip.to_canonical())
        } else if !valid_labels(&name) {
            Shape::Invalid
        } else if !name.contains('.') {
            Shape::SingleLabel
        } else if name
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            // `192.168.1` or `host.123`: no top-level domain is numeric (RFC 3696 §2).
            Shape::Invalid
        } else {
            Shape::Fqdn
        };
        Self { shape, name, echo }
    }
}

/// The content of `[…]`: a dotted-quad IPv4 address or `IPv6:` (any case) and an IPv6
/// address (RFC 5321 §4.1.3). General literals (`[tag:…]`) and zone ids are not addresses.
fn parse_literal(inner: &str) -> Option<IpAddr> {
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..].parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        _ => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// Labels of letters, digits, `-` and `_` (seen from real, misconfigured but legitimate
/// servers), 1 to 63 octets, no leading or trailing hyphen; at most 253 octets in all.
/// Non-ASCII names are refused: a HELO name is sent as A-labels (`xn--…`).
fn valid_labels(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The HELO argument as it may appear in a reply: printable ASCII only, at most 255 characters.
fn echo(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(255)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if text.chars().count() > 255 {
        out.push_str("...");
    }
    out
}

/// `localhost`, `localhost.localdomain`, `localhost.anything`, `anything.localhost` (RFC
/// 6761) and the Red Hat/Debian `/etc/hosts` variants.
fn is_localhost_name(name: &str) -> bool {
    let first = name.split('.').next().unwrap_or("");
    let last = name.rsplit('.').next().unwrap_or("");
    matches!(
        first,
        "localhost" | "localhost4" | "localhost6" | "ip6-localhost" | "ip6-loopback"
    ) || matches!(
        last,
        "localhost" | "localdomain" | "localdomain4" | "localdomain6"
    )
}

/// How strongly an action refuses: the strongest firing rule decides.
fn strength(action: CheckAction) -> u8 {
    match action {
        CheckAction::Reject => 3,
        CheckAction::TempFail => 2,
        CheckAction::Score(_) => 1,
        CheckAction::Monitor => 0,
    }
}

/// A rule that fired.
struct Finding {
    rule: Rule,
    action: CheckAction,
    refusal: Refusal,
}

/// The index of the finding that decides: strongest action, earliest (most specific) on ties.
fn pick(findings: &[Finding]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, f) in findings.iter().enumerate() {
        if best.is_none_or(|b| strength(f.action) > strength(findings[b].action)) {
            best = Some(i);
        }
    }
    best
}

/// The `helo` check.
pub struct HeloCheck {
    config: HeloConfig,
    /// Lower case, no trailing dot.
    own_names: HashSet<String>,
    /// Canonical (IPv4-mapped as IPv4).
    own_ips: Vec<IpAddr>,
    resolver: Option<Arc<Resolver>>,
}

impl std::fmt::Debug for HeloCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeloCheck")
            .field("config", &self.config)
            .field("own_names", &self.own_names)
            .field("own_ips", &self.own_ips)
            .field("resolver", &self.resolver.is_some())
            .finish()
    }
}

impl HeloCheck {
    /// Builds the check. `own_names` are our host names (server and listeners) and `own_ips`
    /// our addresses; the listener's own name and the address the client connected to are
    /// added per session. `resolver` is needed when `unresolvable` is on. Errors are keyed
    /// `checks.helo.…`.
    pub fn build(
        config: &HeloConfig,
        own_names: Vec<String>,
        own_ips: Vec<IpAddr>,
        resolver: Option<Arc<Resolver>>,
    ) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        if config.enabled && config.unresolvable.is_some() && resolver.is_none() {
            errors.push(
                "checks.helo.unresolvable: needs the DNS resolver; set it to \"off\" or configure [dns]"
                    .to_string(),
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let own_names = own_names
            .iter()
            .map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        let own_ips = own_ips
            .into_iter()
            .map(|ip| ip.to_canonical())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        Ok(Self {
            config: config.clone(),
            own_names,
            own_ips,
            resolver,
        })
    }

    fn action(&self, rule: Rule) -> Option<CheckAction> {
        let c = &self.config;
        match rule {
            Rule::OwnName => c.own_name,
            Rule::Localhost => c.localhost,
            Rule::LiteralMismatch => c.literal_mismatch,
            Rule::BareIp => c.bare_ip,
            Rule::NotFqdn => c.not_fqdn,
            Rule::Unresolvable => c.unresolvable,
        }
    }

    /// The enabled local (no DNS) rules that fire, most specific first.
    fn local_findings(
        &self,
        helo: &Helo,
        client: IpAddr,
        local: IpAddr,
        listener_name: &str,
    ) -> Vec<Finding> {
        let mut findings = Vec::new();
        let mut fire = |rule: Rule, code: u16, enhanced: &str, reason: String| {
            if let Some(action) = self.action(rule) {
                findings.push(Finding {
                    rule,
                    action,
                    refusal: Refusal {
                        reply: Reply::build(
                            code,
                            enhanced,
                            format!("<{}>: Helo command rejected: {reason}", helo.echo),
                        ),
                        category: Category::HeloInvalid,
                    },
                });
            }
        };
        let ip = match helo.shape {
            Shape::Literal(ip) | Shape::BareIp(ip) => Some(ip),
            _ => None,
        };
        let named = matches!(helo.shape, Shape::Fqdn | Shape::SingleLabel);

        // A client connecting from one of our own addresses may well use our names (a local
        // application, the MTA behind us); anyone else claiming them is lying.
        let client_is_us = client.is_loopback() || client == local || self.own_ips.contains(&client);
        if !client_is_us {
            let own_ip = ip.is_some_and(|ip| ip == local || self.own_ips.contains(&ip));
            let own_name = named
                && (self.own_names.contains(&helo.name)
                    || listener_name
                        .trim_end_matches('.')
                        .eq_ignore_ascii_case(&helo.name));
            if own_ip {
                fire(
                    Rule::OwnName,
                    550,
                    "5.7.1",
                    "that is my address, not yours".into(),
                );
            } else if own_name {
                fire(
                    Rule::OwnName,
                    550,
                    "5.7.1",
                    "that is my host name, not yours".into(),
                );
            }
        }
        // Local monitoring often says `EHLO localhost`; only a remote client is refused.
        if !client.is_loopback() {
            if ip.is_some_and(|ip| ip.is_loopback() || ip.is_unspecified()) {
                fire(
                    Rule::Localhost,
                    550,
                    "5.7.1",
                    "a loopback address is not a valid name for a remote client".into(),
                );
            } else if named && is_localhost_name(&helo.name) {
                fire(
                    Rule::Localhost,
                    550,
                    "5.7.1",
                    "localhost is not a valid name for a remote client".into(),
                );
            }
        }
        match helo.shape {
            Shape::Literal(ip) if ip != client => fire(
                Rule::LiteralMismatch,
                550,
                "5.7.1",
                format!("address literal does not match your address {}", literal(client)),
            ),
            Shape::Literal(_) | Shape::Fqdn => {}
            Shape::BareIp(ip) => fire(
                Rule::BareIp,
                550,
                "5.7.1",
                format!("an address must be written as a literal, {}", literal(ip)),
            ),
            // Postfix's codes: 504 for "not fully qualified", 501 for bad syntax.
            Shape::SingleLabel => fire(
                Rule::NotFqdn,
                504,
                "5.5.2",
                "need fully-qualified hostname".into(),
            ),
            Shape::BadLiteral => fire(Rule::NotFqdn, 501, "5.5.2", "invalid ip address literal".into()),
            Shape::Invalid => fire(Rule::NotFqdn, 501, "5.5.2", "invalid host name".into()),
        }
        findings
    }

    /// True when `name` has an A, AAAA or MX record. `NotFound` everywhere is `false`; a
    /// timeout or failure that leaves the question open is an error. Bounded by the
    /// resolver's per-check deadline.
    async fn resolves(resolver: &Resolver, name: &str) -> Result<bool, CheckError> {
        let lookup = async {
            let addr_error = match resolver.ips(name).await {
                Ok(ips) if !ips.is_empty() => return Ok(true),
                Ok(_) | Err(DnsError::NotFound) => None,
                Err(e) => Some(e),
            };
            // A null MX (RFC 7505) still shows that the name exists: it counts.
            match resolver.mx(name).await {
                Ok(mx) if !mx.is_empty() => Ok(true),
                Ok(_) | Err(DnsError::NotFound) => addr_error.map_or(Ok(false), Err),
                Err(e) => Err(e),
            }
        };
        let deadline = resolver.check_deadline();
        match tokio::time::timeout(deadline, lookup).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(e)) => Err(CheckError(format!("cannot resolve the HELO name {name}: {e}"))),
            Err(_) => Err(CheckError(format!(
                "resolving the HELO name {name} took longer than {deadline:?}"
            ))),
        }
    }

    async fn decide(&self, cx: &Context<'_>) -> Result<Verdict, CheckError> {
        if !self.config.enabled || cx.stage != Stage::Helo || cx.session.authenticated.is_some() {
            return Ok(Verdict::Skip);
        }
        let Some(raw) = cx.session.helo.as_deref() else {
            return Ok(Verdict::Skip);
        };
        let client = cx.session.peer.ip().to_canonical();
        // Internal clients (loopback, RFC 1918, …) are the site's own machines and scripts,
        // which often say `EHLO localhost` or a short name; as the DNS checks do, skip them
        // (Postfix sites get the same with permit_mynetworks before the HELO rules).
        if crate::dns::is_internal(client) {
            return Ok(Verdict::Skip);
        }
        let helo = Helo::parse(raw);
        let local = cx.session.local.ip().to_canonical();
        let mut findings = self.local_findings(&helo, client, local, &cx.session.hostname);

        if let (Some(action), Some(resolver), Shape::Fqdn) =
            (self.config.unresolvable, &self.resolver, helo.shape)
            && pick(&findings).is_none_or(|b| strength(action) > strength(findings[b].action))
            && !Self::resolves(resolver, &helo.name).await?
        {
            findings.push(Finding {
                rule: Rule::Unresolvable,
                action,
                refusal: Refusal {
                    reply: Reply::build(
                        550,
                        "5.7.1",
                        format!(
                            "<{}>: Helo command rejected: Host not found (no A, AAAA or MX record)",
                            helo.echo
                        ),
                    ),
                    category: Category::HeloInvalid,
                },
            });
        }

        let Some(chosen) = pick(&findings) else {
            return Ok(Verdict::Pass);
        };
        // The pipeline logs the monitor verdict returned; rules being tried out in monitor
        // mode next to a deciding one are logged here, so their roll-out can be judged.
        for (i, f) in findings.iter().enumerate() {
            if i != chosen && f.action == CheckAction::Monitor {
                tracing::info!(session = %cx.session.id, check = "helo", rule = f.rule.as_str(), reply = %f.refusal.reply, "Monitor: the check would have refused.");
            }
        }
        let f = findings.swap_remove(chosen);
        tracing::debug!(session = %cx.session.id, rule = f.rule.as_str(), action = %f.action, "HELO rule fired.");
        Ok(f.action.verdict(f.refusal))
    }
}

/// An address as an RFC 5321 literal.
fn literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

impl Check for HeloCheck {
    fn name(&self) -> &'static str {
        "helo"
    }

    fn stages(&self) -> &'static [Stage] {
        &[Stage::Helo]
    }

    fn check<'a>(&'a self, cx: &'a Context<'a>) -> BoxFuture<'a, Result<Verdict, CheckError>> {
        Box::pin(self.decide(cx))
    }

    fn needs_io(&self) -> bool {
        self.config.enabled && self.config.unresolvable.is_some() && self.resolver.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::DnsConfig;
    use crate::policy::{Exemptions, SessionFacts, SessionInfo};
    use std::net::SocketAddr;
    use std::time::Duration;

    const CLIENT: &str = "203.0.113.5";

    fn info(peer: &str, helo: &str) -> SessionInfo {
        SessionInfo {
            id: "t".into(),
            peer: SocketAddr::new(peer.parse().unwrap(), 40000),
            local: "198.51.100.25:25".parse().unwrap(),
            hostname: "mx.ours.example".into(),
            helo: Some(helo.to_string()),
            esmtp: true,
            authenticated: None,
            tls: None,
            proxied_by: None,
            health_check: false,
        }
    }

    async fn run_session(check: &HeloCheck, session: &SessionInfo) -> Result<Verdict, CheckError> {
        let facts = SessionFacts::default();
        let exempt = Exemptions::default();
        let cx = Context {
            stage: Stage::Helo,
            session,
            sender: None,
            recipient: None,
            recipients: &[],
            message: None,
            facts: &facts,
            exempt: &exempt,
        };
        check.check(&cx).await
    }

    async fn run_from(check: &HeloCheck, peer: &str, helo: &str) -> Verdict {
        run_session(check, &info(peer, helo)).await.unwrap()
    }

    fn default_check() -> HeloCheck {
        HeloCheck::build(
            &HeloConfig::default(),
            vec!["Relay.Ours.Example.".into()],
            vec![
                "198.51.100.26".parse().unwrap(),
                "2001:db8:25::1".parse().unwrap(),
            ],
            None,
        )
        .unwrap()
    }

    /// The reply text of a refusal, `None` for a pass.
    fn reply(v: &Verdict) -> Option<String> {
        match v {
            Verdict::Reject(r)
            | Verdict::TempFail(r)
            | Verdict::Monitor(r)
            | Verdict::Score { refusal: r, .. } => {
                assert_eq!(r.category, Category::HeloInvalid);
                Some(
                    String::from_utf8(r.reply.to_bytes())
                        .unwrap()
                        .trim_end()
                        .to_string(),
                )
            }
            Verdict::Pass | Verdict::Skip => None,
            v => panic!("unexpected {v:?}"),
        }
    }

    async fn refused(check: &HeloCheck, peer: &str, helo: &str) -> Option<String> {
        reply(&run_from(check, peer, helo).await)
    }

    #[test]
    fn shapes() {
        let shape = |s: &str| Helo::parse(s).shape;
        let v4 = |s: &str| IpAddr::V4(s.parse().unwrap());
        assert_eq!(shape("mx.example.com"), Shape::Fqdn);
        assert_eq!(shape(" MX.Example.COM. "), Shape::Fqdn);
        assert_eq!(Helo::parse("MX.Example.COM.").name, "mx.example.com");
        assert_eq!(shape("mail_1.example.com"), Shape::Fqdn);
        assert_eq!(shape("xn--bcher-kva.example"), Shape::Fqdn);
        assert_eq!(shape("friend"), Shape::SingleLabel);
        assert_eq!(shape("friend."), Shape::SingleLabel);
        for invalid in [
            "",
            ".",
            "..",
            "mx.example.com..",
            "a..b",
            ".a.b",
            "-a.example",
            "a-.example",
            "a b.example",
            "bücher.example",
            "host.123",
            "192.168.1",
            "a.example/x",
            &"a".repeat(64),
        ] {
            assert_eq!(shape(invalid), Shape::Invalid, "{invalid:?}");
        }
        assert_eq!(shape(&format!("{}.example", "a.".repeat(120))), Shape::Invalid);
        assert_eq!(shape("192.0.2.1"), Shape::BareIp(v4("192.0.2.1")));
        assert_eq!(shape("192.0.2.1."), Shape::BareIp(v4("192.0.2.1")));
        assert_eq!(shape("::ffff:192.0.2.1"), Shape::BareIp(v4("192.0.2.1")));
        assert_eq!(
            shape("2001:db8::1"),
            Shape::BareIp("2001:db8::1".parse().unwrap())
        );
        assert_eq!(shape("[192.0.2.1]"), Shape::Literal(v4("192.0.2.1")));
        assert_eq!(shape("[IPv6:::ffff:192.0.2.1]"), Shape::Literal(v4("192.0.2.1")));
        assert_eq!(
            shape("[ipv6:2001:DB8::1]"),
            Shape::Literal("2001:db8::1".parse().unwrap())
        );
        for bad in [
            "[192.0.2.1",
            "[2001:db8::1]",
            "[IPv6:192.0.2.1]",
            "[01.2.3.4]",
            "[1.2.3]",
            "[256.1.1.1]",
            "[]",
            "[IPv6:]",
            "[IPv6:fe80::1%eth0]",
            "[x-tag:abc]",
            "[192.0.2.1].",
        ] {
            assert_eq!(shape(bad), Shape::BadLiteral, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn valid_names_and_honest_literals_pass() {
        let c = default_check();
        for ok in [
            "mx.example.com",
            "MX.EXAMPLE.COM",
            "mx.example.com.",
            "a-b.c_d.example",
        ] {
            assert_eq!(refused(&c, CLIENT, ok).await, None, "{ok}");
        }
        assert_eq!(refused(&c, CLIENT, "[203.0.113.5]").await, None);
        assert_eq!(refused(&c, "::ffff:203.0.113.5", "[203.0.113.5]").await, None);
        assert_eq!(refused(&c, CLIENT, "[IPv6:::ffff:203.0.113.5]").await, None);
        assert_eq!(refused(&c, "2001:db8::7", "[IPv6:2001:DB8:0::7]").await, None);
    }

    #[tokio::test]
    async fn not_fqdn() {
        let c = default_check();
        assert_eq!(
            refused(&c, CLIENT, "friend").await.unwrap(),
            "504 5.5.2 <friend>: Helo command rejected: need fully-qualified hostname"
        );
        assert_eq!(
            refused(&c, CLIENT, "a..b").await.unwrap(),
            "501 5.5.2 <a..b>: Helo command rejected: invalid host name"
        );
        assert_eq!(
            refused(&c, CLIENT, "[2001:db8::1]").await.unwrap(),
            "501 5.5.2 <[2001:db8::1]>: Helo command rejected: invalid ip address literal"
        );
        assert!(
            refused(&c, CLIENT, "host.123")
                .await
                .unwrap()
                .starts_with("501 5.5.2")
        );
        // Whatever the client sends, the echo is printable and bounded.
        let r = refused(&c, CLIENT, "bad\u{7}name\u{e9}").await.unwrap();
        assert!(r.contains("<bad?name?>"), "{r}");
        let r = refused(&c, CLIENT, &"x".repeat(600)).await.unwrap();
        assert!(r.len() < 340 && r.contains("..."), "{r}");
    }

    #[tokio::test]
    async fn bare_ip_and_literal_mismatch() {
        let c = default_check();
        assert_eq!(
            refused(&c, CLIENT, "203.0.113.5").await.unwrap(),
            "550 5.7.1 <203.0.113.5>: Helo command rejected: an address must be written as a literal, [203.0.113.5]"
        );
        assert!(
            refused(&c, CLIENT, "2001:db8::9")
                .await
                .unwrap()
                .contains("[IPv6:2001:db8::9]")
        );
        assert_eq!(
            refused(&c, CLIENT, "[192.0.2.1]").await.unwrap(),
            "550 5.7.1 <[192.0.2.1]>: Helo command rejected: address literal does not match your address [203.0.113.5]"
        );
        assert!(
            refused(&c, "2001:db8::7", "[IPv6:2001:db8::8]")
                .await
                .unwrap()
                .contains("[IPv6:2001:db8::7]")
        );
        assert!(refused(&c, "2001:db8::7", "[203.0.113.5]").await.is_some());
        // CIDR-adjacent is still another address.
        assert!(refused(&c, CLIENT, "[203.0.113.4]").await.is_some());
    }

    #[tokio::test]
    async fn own_names_and_addresses() {
        let c = default_check();
        let mine = "that is my host name, not yours";
        for name in [
            "relay.ours.example",
            "RELAY.ours.example.",
            "mx.ours.example",
            "Mx.Ours.Example.",
        ] {
            assert!(refused(&c, CLIENT, name).await.unwrap().ends_with(mine), "{name}");
        }
        for ip in [
            "[198.51.100.26]",
            "198.51.100.26",
            "[198.51.100.25]",
            "[IPv6:2001:db8:25::1]",
            "[IPv6:::ffff:198.51.100.26]",
        ] {
            let r = refused(&c, CLIENT, ip).await.unwrap();
            assert!(r.ends_with("that is my address, not yours"), "{ip}: {r}");
        }
        assert_eq!(refused(&c, CLIENT, "other.ours.example").await, None);
        assert_eq!(refused(&c, CLIENT, "ours.example").await, None);
        // Our own machines may use our names.
        for us in [
            "198.51.100.26",
            "198.51.100.25",
            "127.0.0.1",
            "::1",
            "::ffff:198.51.100.26",
        ] {
            assert_eq!(refused(&c, us, "relay.ours.example").await, None, "{us}");
        }
        // A single-label own name is still our name (checked before not_fqdn).
        let c = HeloCheck::build(&HeloConfig::default(), vec!["gateway".into()], vec![], None).unwrap();
        assert!(refused(&c, CLIENT, "GATEWAY").await.unwrap().ends_with(mine));
    }

    #[tokio::test]
    async fn localhost() {
        let c = default_check();
        for name in [
            "localhost",
            "LOCALHOST.localdomain",
            "localhost.localdomain.",
            "localhost.example.com",
            "box.localdomain",
            "foo.localhost",
            "localhost4.localdomain4",
        ] {
            let r = refused(&c, CLIENT, name).await.unwrap();
            assert!(
                r.ends_with("localhost is not a valid name for a remote client"),
                "{name}: {r}"
            );
        }
        for ip in [
            "[127.0.0.1]",
            "127.0.0.1",
            "[127.1.2.3]",
            "[IPv6:::1]",
            "::1",
            "[IPv6:::ffff:127.0.0.1]",
            "[0.0.0.0]",
        ] {
            let r = refused(&c, CLIENT, ip).await.unwrap();
            assert!(
                r.ends_with("a loopback address is not a valid name for a remote client"),
                "{ip}: {r}"
            );
        }
        assert_eq!(refused(&c, CLIENT, "notlocalhost.example").await, None);
        assert_eq!(refused(&c, CLIENT, "localhosts.example").await, None);
        // Internal clients are not checked at all.
        assert_eq!(refused(&c, "127.0.0.1", "[127.0.0.1]").await, None);
        assert_eq!(refused(&c, "::1", "[IPv6:::1]").await, None);
        assert_eq!(refused(&c, "127.0.0.1", "localhost.localdomain").await, None);
        assert_eq!(refused(&c, "127.0.0.1", "localhost").await, None);
        assert_eq!(refused(&c, "10.1.2.3", "justaname").await, None);
    }

    #[tokio::test]
    async fn actions_off_monitor_and_priority() {
        let config = HeloConfig {
            own_name: Some(CheckAction::Monitor),
            localhost: None,
            literal_mismatch: Some(CheckAction::TempFail),
            bare_ip: Some(CheckAction::Score(2.0)),
            ..HeloConfig::default()
        };
        let c = HeloCheck::build(&config, vec![], vec![], None).unwrap();
        // Own address literal: own_name only monitors; the mismatch (tempfail) decides.
        let v = run_from(&c, CLIENT, "[198.51.100.25]").await;
        assert!(matches!(&v, Verdict::TempFail(_)), "{v:?}");
        assert!(
            reply(&v).unwrap().starts_with("450 4.7.1 ") && reply(&v).unwrap().contains("does not match")
        );
        // Localhost is off: a remote `[127.0.0.1]` is still a mismatch.
        assert!(matches!(
            run_from(&c, CLIENT, "[127.0.0.1]").await,
            Verdict::TempFail(_)
        ));
        assert_eq!(run_from(&c, CLIENT, "localhost.localdomain").await, Verdict::Pass);
        // Our listener name alone: monitored, not refused.
        assert!(matches!(
            run_from(&c, CLIENT, "mx.ours.example").await,
            Verdict::Monitor(_)
        ));
        // A bare own address: score (bare_ip) beats monitor (own_name).
        let v = run_from(&c, CLIENT, "198.51.100.25").await;
        assert!(matches!(v, Verdict::Score { points: 2.0, .. }), "{v:?}");

        let all_off = HeloConfig {
            not_fqdn: None,
            bare_ip: None,
            literal_mismatch: None,
            own_name: None,
            localhost: None,
            unresolvable: None,
            enabled: true,
        };
        let c = HeloCheck::build(&all_off, vec![], vec![], None).unwrap();
        for h in [
            "friend",
            "1.2.3.4",
            "[1.2.3.4]",
            "localhost",
            "mx.ours.example",
            "[x]",
        ] {
            assert_eq!(run_from(&c, CLIENT, h).await, Verdict::Pass, "{h}");
        }
    }

    #[tokio::test]
    async fn skipped_when_disabled_authenticated_or_no_helo() {
        let disabled = HeloConfig {
            enabled: false,
            unresolvable: Some(CheckAction::Reject),
            ..HeloConfig::default()
        };
        // Disabled: no resolver needed, nothing checked.
        let c = HeloCheck::build(&disabled, vec![], vec![], None).unwrap();
        assert!(!c.needs_io());
        assert_eq!(run_from(&c, CLIENT, "friend").await, Verdict::Skip);
        let c = default_check();
        let mut s = info(CLIENT, "friend");
        s.authenticated = Some("u".into());
        assert_eq!(run_session(&c, &s).await.unwrap(), Verdict::Skip);
        s.authenticated = None;
        s.helo = None;
        assert_eq!(run_session(&c, &s).await.unwrap(), Verdict::Skip);
        assert_eq!(c.name(), "helo");
        assert_eq!(c.stages(), &[Stage::Helo]);
        assert!(!c.needs_io());
    }

    #[test]
    fn config_serde() {
        let c: HeloConfig = toml::from_str("").unwrap();
        assert_eq!(c, HeloConfig::default());
        assert!(c.enabled && c.unresolvable.is_none());
        let c: HeloConfig = toml::from_str(
            "not_fqdn = \"off\"\nbare_ip = \"score:1.5\"\nunresolvable = \"tempfail\"\nown_name = \"monitor\"",
        )
        .unwrap();
        assert_eq!(c.not_fqdn, None);
        assert_eq!(c.bare_ip, Some(CheckAction::Score(1.5)));
        assert_eq!(c.unresolvable, Some(CheckAction::TempFail));
        assert_eq!(c.own_name, Some(CheckAction::Monitor));
        let e = toml::from_str::<HeloConfig>("bare_ip = \"drop\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("or off"), "{e}");
        assert!(toml::from_str::<HeloConfig>("not_fqnd = \"off\"").is_err());
        // Round trip: "off" is written back as "off".
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("not_fqdn = \"off\""), "{text}");
        assert_eq!(toml::from_str::<HeloConfig>(&text).unwrap(), c);
    }

    #[test]
    fn build_needs_a_resolver_for_unresolvable() {
        let config = HeloConfig {
            unresolvable: Some(CheckAction::Reject),
            ..HeloConfig::default()
        };
        let e = HeloCheck::build(&config, vec![], vec![], None).unwrap_err();
        assert!(e[0].starts_with("checks.helo.unresolvable: "), "{e:?}");
    }

    /// A tiny DNS server on 127.0.0.1 answering from a fixed table (see the match below).
    async fn stub_dns() -> SocketAddr {
        use hickory_proto::op::{Message, OpCode, ResponseCode};
        use hickory_proto::rr::rdata::{A, AAAA, MX};
        use hickory_proto::rr::{Name, RData, Record, RecordType};

        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries.first().cloned() else {
                    continue;
                };
                let qname = q.name().clone();
                let rtype = q.query_type();
                let mut resp = Message::response(query.metadata.id, OpCode::Query);
                resp.metadata.recursion_desired = query.metadata.recursion_desired;
                resp.metadata.recursion_available = true;
                resp.add_query(q);
                let answer = |rdata| Record::from_rdata(qname.clone(), 60, rdata);
                let text = qname.to_ascii().to_ascii_lowercase();
                match (text.trim_end_matches('.'), rtype) {
                    ("silent.example", _) => continue,
                    ("servfail.example", _) => resp.metadata.response_code = ResponseCode::ServFail,
                    ("a.example", RecordType::A) => {
                        resp.add_answer(answer(RData::A(A("192.0.2.1".parse().unwrap()))));
                    }
                    ("aaaa.example", RecordType::AAAA) => {
                        resp.add_answer(answer(RData::AAAA(AAAA("2001:db8::1".parse().unwrap()))));
                    }
                    ("mx.example" | "afail-mx.example", RecordType::MX) => {
                        let exchange = Name::from_ascii("mail.example.").unwrap();
                        resp.add_answer(answer(RData::MX(MX::new(10, exchange))));
                    }
                    ("afail-mx.example" | "afail.example", RecordType::A | RecordType::AAAA) => {
                        resp.metadata.response_code = ResponseCode::ServFail
                    }
                    // The name exists, without records of this type (NODATA).
                    ("a.example" | "aaaa.example" | "mx.example" | "afail.example" | "empty.example", _) => {}
                    _ => resp.metadata.response_code = ResponseCode::NXDomain,
                }
                let _ = sock.send_to(&resp.to_vec().unwrap(), from).await;
            }
        });
        addr
    }

    async fn resolving_check(action: CheckAction) -> HeloCheck {
        let dns = DnsConfig {
            servers: vec![stub_dns().await],
            timeout: Duration::from_millis(300),
            attempts: 1,
            check_deadline: Duration::from_secs(3),
            cache_size: 64,
        };
        let resolver = Arc::new(Resolver::new(&dns).unwrap());
        let config = HeloConfig {
            unresolvable: Some(action),
            ..HeloConfig::default()
        };
        HeloCheck::build(&config, vec![], vec![], Some(resolver)).unwrap()
    }

    #[tokio::test]
    async fn unresolvable_with_dns() {
        let c = resolving_check(CheckAction::Reject).await;
        assert!(c.needs_io());
        for ok in ["a.example", "AAAA.example.", "mx.example", "afail-mx.example"] {
            assert_eq!(run_from(&c, CLIENT, ok).await, Verdict::Pass, "{ok}");
        }
        assert_eq!(
            refused(&c, CLIENT, "nowhere.example").await.unwrap(),
            "550 5.7.1 <nowhere.example>: Helo command rejected: Host not found (no A, AAAA or MX record)"
        );
        // The name exists but has neither addresses nor MX (NODATA for every type).
        assert!(
            refused(&c, CLIENT, "empty.example")
                .await
                .unwrap()
                .contains("Host not found")
        );
        let resolver = c.resolver.as_ref().unwrap();
        assert!(!HeloCheck::resolves(resolver, "empty.example").await.unwrap());
        assert!(HeloCheck::resolves(resolver, "a.example").await.unwrap());
        // A DNS failure is a check error for the pipeline's on_error, never a verdict.
        for broken in ["servfail.example", "silent.example", "afail.example"] {
            let e = run_session(&c, &info(CLIENT, broken)).await;
            assert!(e.is_err(), "{broken}: {e:?}");
        }
        // Names refused locally are not looked up (the name does not exist either way).
        assert!(refused(&c, CLIENT, "friend").await.unwrap().starts_with("504 "));
        assert!(refused(&c, CLIENT, "[192.0.2.9]").await.is_some());
        assert_eq!(refused(&c, CLIENT, "[203.0.113.5]").await, None);
    }

    #[tokio::test]
    async fn dns_only_when_it_could_change_the_outcome() {
        // Monitor: a local reject is not looked up (silent.example would be an error otherwise).
        let c = resolving_check(CheckAction::Monitor).await;
        assert!(matches!(
            run_from(&c, CLIENT, "localhost.silent.example").await,
            Verdict::Reject(_)
        ));
        assert!(matches!(
            run_from(&c, CLIENT, "nowhere.example").await,
            Verdict::Monitor(_)
        ));
        // A stronger resolve rule is asked even when a weaker local rule fired.
        let config = HeloConfig {
            unresolvable: Some(CheckAction::Reject),
            localhost: Some(CheckAction::Monitor),
            ..HeloConfig::default()
        };
        let resolver = resolving_check(CheckAction::Reject).await.resolver;
        let c = HeloCheck::build(&config, vec![], vec![], resolver).unwrap();
        let v = run_from(&c, CLIENT, "localhost.nowhere.example").await;
        assert!(reply(&v).unwrap().contains("Host not found"), "{v:?}");
        assert!(matches!(v, Verdict::Reject(_)));
    }
}
