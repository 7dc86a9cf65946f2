//! DNSBL/DNSWL check (connect stage), in the manner of Postfix's postscreen: weighted
//! zones, one concurrent round of lookups per client, a threshold to refuse and a negative
//! threshold to whitelist. Third-party lists must never stop mail: a zone that fails, times
//! out or answers with an error code (127.255.255.x, or anything outside 127/8) counts as
//! "not listed", with a warning. Zones are used only after an RFC 5782 self-test passes.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::{BoxFuture, Category, Check, CheckAction, CheckError, Context, Refusal, Stage, Verdict};
use crate::dns::{DnsError, Resolver};
use crate::smtp::codec::Reply;

/// A zone that keeps failing warns at most this often (it may fail for every client).
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Longest zone name: the IPv6 query adds 64 characters to it, and a name has at most 253.
const MAX_ZONE_LEN: usize = 180;

/// `[checks.dnsbl]`: DNS block and allow lists. No zones: the check is off.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsblConfig {
    /// Zones in Postfix postscreen syntax, `zone[=filter][*weight]`: `zen.example*2`,
    /// `bl.example=127.0.0.[2..11]*3`, `list.dnswl.example=127.0.[0..255].[1..3]*-2`. The
    /// filter says which answers count (each octet a number, `[a..b]`, or `[a;b;c..d]`);
    /// without one, any answer in 127.0.0.0/8 counts. The weight (default 1) is added once
    /// per matching entry; a negative weight makes the zone an allow list (DNSWL). A zone
    /// may appear several times with different filters; it is asked once. Default none.
    pub zones: Vec<String>,
    /// A client whose weights add up to at least this is refused with `action`. Default 1.
    pub threshold: f32,
    /// What to do at or above `threshold`: `reject` (default: `554 5.7.1`), `tempfail`,
    /// `score:N` or `monitor`.
    pub action: CheckAction,
    /// A client whose weights add up to at most this (through negative, DNSWL weights) is
    /// exempted from the checks in `whitelist_exempt`. Default -1.
    pub whitelist_threshold: f32,
    /// Checks a DNSWL-listed client skips: `["all"]` (default: accepted, no further checks)
    /// or names such as `["greylist", "ptr"]`.
    pub whitelist_exempt: Vec<String>,
    /// How often the zones are self-tested (RFC 5782: 127.0.0.2 listed, 127.0.0.1 not). A
    /// zone that fails is not used until it passes again. Default "10m".
    #[serde(with = "crate::config::duration")]
    pub self_test_interval: Duration,
}

impl Default for DnsblConfig {
    fn default() -> Self {
        Self {
            zones: Vec::new(),
            threshold: 1.0,
            action: CheckAction::Reject,
            whitelist_threshold: -1.0,
            whitelist_exempt: vec!["all".into()],
            self_test_interval: Duration::from_secs(600),
        }
    }
}

impl DnsblConfig {
    /// Every problem, each prefixed with `key` (e.g. `checks.dnsbl`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        for (i, z) in self.zones.iter().enumerate() {
            if let Err(e) = Entry::parse(z) {
                errors.push(format!("{key}.zones[{i}]: {e}"));
            }
        }
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            errors.push(format!(
                "{key}.threshold: must be more than 0 (else every client is refused)"
            ));
        }
        if !(self.whitelist_threshold.is_finite() && self.whitelist_threshold < 0.0) {
            errors.push(format!(
                "{key}.whitelist_threshold: must be less than 0 (else every client is whitelisted)"
            ));
        }
        for (i, name) in self.whitelist_exempt.iter().enumerate() {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                errors.push(format!(
                    "{key}.whitelist_exempt[{i}]: {name:?} is not a check name (or \"all\")"
                ));
            }
        }
        if self.self_test_interval < Duration::from_secs(1) {
            errors.push(format!("{key}.self_test_interval: must be at least 1s"));
        }
        errors
    }
}

/// Which answers an entry counts: per octet, inclusive ranges.
#[derive(Debug, Clone, PartialEq)]
struct Filter([Vec<(u8, u8)>; 4]);

impl Filter {
    fn parse(text: &str) -> Result<Self, String> {
        let bad =
            || format!("filter {text:?} is not like 127.0.0.2, 127.0.0.[2..11] or 127.0.[0;1].[1;3..5]");
        let mut octets: Vec<Vec<(u8, u8)>> = Vec::new();
        let mut rest = text.trim();
        loop {
            let (octet, after) = if let Some(inner) = rest.strip_prefix('[') {
                let end = inner.find(']').ok_or_else(bad)?;
                let mut ranges = Vec::new();
                for item in inner[..end].split(';') {
                    let (lo, hi) = match item.trim().split_once("..") {
                        Some((lo, hi)) => (lo.trim(), hi.trim()),
                        None => (item.trim(), item.trim()),
                    };
                    let (lo, hi) = (
                        lo.parse::<u8>().map_err(|_| bad())?,
                        hi.parse::<u8>().map_err(|_| bad())?,
                    );
                    if lo > hi {
                        return Err(format!("range {lo}..{hi} in filter {text:?} is empty"));
                    }
                    ranges.push((lo, hi));
                }
                (ranges, &inner[end + 1..])
            } else {
                let end = rest.find('.').unwrap_or(rest.len());
                let n = rest[..end].parse::<u8>().map_err(|_| bad())?;
                (vec![(n, n)], &rest[end..])
            };
            octets.push(octet);
            if octets.len() > 4 {
                return Err(bad());
            }
            if after.is_empty() {
                break;
            }
            rest = after.strip_prefix('.').ok_or_else(bad)?;
        }
        let octets: [Vec<(u8, u8)>; 4] = octets.try_into().map_err(|_| bad())?;
        Ok(Self(octets))
    }

    fn matches(&self, answer: Ipv4Addr) -> bool {
        self.0
            .iter()
            .zip(answer.octets())
            .all(|(ranges, o)| ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&o)))
    }
}

/// One `zone[=filter][*weight]` entry.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    zone: String,
    filter: Option<Filter>,
    weight: f32,
}

impl Entry {
    fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        let (rest, weight) = match spec.rsplit_once('*') {
            Some((rest, w)) => match w.trim().parse::<f32>() {
                Ok(w) if w.is_finite() => (rest, w),
                _ => return Err(format!("weight {w:?} is not a number")),
            },
            None => (spec, 1.0),
        };
        let (zone, filter) = match rest.split_once('=') {
            Some((zone, f)) => (zone, Some(Filter::parse(f)?)),
            None => (rest, None),
        };
        let zone = zone.trim().trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if zone.is_empty() || zone.len() > MAX_ZONE_LEN || !zone.split('.').all(label_ok) {
            return Err(format!(
                "{zone:?} is not a DNS zone name (syntax: zone[=filter][*weight])"
            ));
        }
        Ok(Self { zone, filter, weight })
    }

    fn matches(&self, answers: &[Ipv4Addr]) -> bool {
        match &self.filter {
            None => !answers.is_empty(),
            Some(f) => answers.iter().any(|a| f.matches(*a)),
        }
    }
}

/// A zone's state, as the admin interfaces show it.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneStatus {
    /// The zone name, lower-case.
    pub zone: String,
    /// True once the zone passed its last self-test.
    pub enabled: bool,
    /// Why the zone is disabled, or the last error seen while it was in use.
    pub reason: Option<String>,
    /// When the last self-test ended; `None`: not tested yet (not used yet).
    pub last_test: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct ZoneState {
    enabled: bool,
    reason: Option<String>,
    last_test: Option<SystemTime>,
    last_warning: Option<Instant>,
}

#[derive(Debug)]
struct Zone {
    name: String,
    /// Indexes into `DnsblCheck::entries`.
    entries: Vec<usize>,
    state: Mutex<ZoneState>,
}

impl Zone {
    fn state(&self) -> std::sync::MutexGuard<'_, ZoneState> {
        // The lock is never held across an await or a panic point; recover regardless.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A problem while the zone is in use: kept as the reason, warned about at most once
    /// per `WARN_INTERVAL`.
    fn warn(&self, msg: &str) {
        let mut st = self.state();
        st.reason = Some(msg.to_string());
        let now = Instant::now();
        if st
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_INTERVAL)
        {
            st.last_warning = Some(now);
            drop(st);
            tracing::warn!(check = "dnsbl", zone = %self.name, "{msg}; counted as not listed.");
        } else {
            tracing::debug!(check = "dnsbl", zone = %self.name, "{msg}; counted as not listed.");
        }
    }
}

/// What a whitelisting (DNSWL) score grants.
#[derive(Debug, Clone)]
enum Whitelist {
    All,
    Checks(Arc<[String]>),
}

/// The check, built from `DnsblConfig`. Call `self_test` before use and every
/// `self_test_interval`: until a zone passes, it is not asked.
pub struct DnsblCheck {
    entries: Vec<Entry>,
    zones: Vec<Zone>,
    threshold: f32,
    action: CheckAction,
    whitelist_threshold: f32,
    whitelist: Whitelist,
    self_test_interval: Duration,
    resolver: Arc<Resolver>,
}

impl std::fmt::Debug for DnsblCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsblCheck")
            .field("entries", &self.entries)
            .field("threshold", &self.threshold)
            .field("action", &self.action)
            .field("whitelist_threshold", &self.whitelist_threshold)
            .finish_non_exhaustive()
    }
}

/// What one zone said about the client.
enum Answer {
    NotListed,
    Listed(Vec<Ipv4Addr>),
    /// Counted as not listed.
    Error(String),
}

impl DnsblCheck {
    /// Builds the check; errors are prefixed `checks.dnsbl.`. Every zone starts disabled.
    pub fn build(config: &DnsblConfig, resolver: Arc<Resolver>) -> Result<Self, Vec<String>> {
        let errors = config.validate("checks.dnsbl");
        if !errors.is_empty() {
            return Err(errors);
        }
        let entries: Vec<Entry> = config.zones.iter().filter_map(|z| Entry::parse(z).ok()).collect();
        let mut zones: Vec<Zone> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match zones.iter_mut().find(|z| z.name == e.zone) {
                Some(z) => z.entries.push(i),
                None => zones.push(Zone {
                    name: e.zone.clone(),
                    entries: vec![i],
                    state: Mutex::new(ZoneState {
                        reason: Some("not self-tested yet".into()),
                        ..Default::default()
                    }),
                }),
            }
        }
        let whitelist = if config.whitelist_exempt.iter().any(|c| c == "all") {
            Whitelist::All
        } else {
            Whitelist::Checks(config.whitelist_exempt.clone().into())
        };
        Ok(Self {
            entries,
            zones,
            threshold: config.threshold,
            action: config.action,
            whitelist_threshold: config.whitelist_threshold,
            whitelist,
            self_test_interval: config.self_test_interval,
            resolver,
        })
    }

    /// The configured self-test interval (for the server's timer).
    pub fn self_test_interval(&self) -> Duration {
        self.self_test_interval
    }

    /// Takes over the state of zones with the same name from the check this one replaces
    /// (on reload), so tested zones stay in use without waiting for a new self-test.
    pub fn adopt_status(&self, previous: &DnsblCheck) {
        for z in &self.zones {
            if let Some(old) = previous.zones.iter().find(|o| o.name == z.name) {
                let old = old.state();
                let mut st = z.state();
                st.enabled = old.enabled;
                st.reason = old.reason.clone();
                st.last_test = old.last_test;
            }
        }
    }

    /// Each zone's state, in configuration order.
    pub fn zone_status(&self) -> Vec<ZoneStatus> {
        self.zones
            .iter()
            .map(|z| {
                let st = z.state();
                ZoneStatus {
                    zone: z.name.clone(),
                    enabled: st.enabled,
                    reason: st.reason.clone(),
                    last_test: st.last_test,
                }
            })
            .collect()
    }

    /// RFC 5782 §5 self-test of every zone, concurrently: 127.0.0.2 must be listed (with a
    /// proper answer) and 127.0.0.1 must not. A zone that passes is used; one that fails is
    /// not (the reason is kept and logged) until a later test passes.
    pub async fn self_test(&self) {
        let tests = self
            .zones
            .iter()
            .map(|z| async move { (z, self.test_zone(&z.name).await) });
        for (zone, result) in futures_util::future::join_all(tests).await {
            let mut st = zone.state();
            let was_enabled = st.enabled;
            st.last_test = Some(SystemTime::now());
            match result {
                Ok(()) => {
                    st.enabled = true;
                    st.reason = None;
                    drop(st);
                    if !was_enabled {
                        tracing::info!(check = "dnsbl", zone = %zone.name, "Zone passed its self-test; in use.");
                    }
                }
                Err(reason) => {
                    st.enabled = false;
                    st.reason = Some(reason.clone());
                    drop(st);
                    tracing::warn!(check = "dnsbl", zone = %zone.name, %reason, "Zone failed its self-test; not used until it passes.");
                }
            }
        }
    }

    async fn test_zone(&self, zone: &str) -> Result<(), String> {
        let listed = self.ask(Ipv4Addr::new(127, 0, 0, 2).into(), zone);
        let unlisted = self.ask(Ipv4Addr::new(127, 0, 0, 1).into(), zone);
        let deadline = self.resolver.check_deadline();
        let both = tokio::time::timeout(deadline, futures_util::future::join(listed, unlisted));
        let (listed, unlisted) = both
            .await
            .map_err(|_| format!("self-test took longer than {deadline:?}"))?;
        match listed {
            Answer::Listed(_) => {}
            Answer::NotListed => {
                return Err(
                    "127.0.0.2 is not listed: not a DNSBL zone (misspelt?) or no RFC 5782 test entry".into(),
                );
            }
            Answer::Error(e) => return Err(format!("test query for 127.0.0.2: {e}")),
        }
        match unlisted {
            Answer::NotListed => Ok(()),
            Answer::Listed(a) => Err(format!(
                "127.0.0.1 is listed ({}): the zone lists everything",
                join(&a)
            )),
            Answer::Error(e) => Err(format!("test query for 127.0.0.1: {e}")),
        }
    }

    /// Asks `zone` about `ip`: reversed octets (IPv4) or nibbles (IPv6) under the zone.
    async fn ask(&self, ip: IpAddr, zone: &str) -> Answer {
        let name = format!("{}.{zone}", reversed(ip));
        match self.resolver.a(&name).await {
            Err(DnsError::NotFound) => Answer::NotListed,
            Err(e) => Answer::Error(e.to_string()),
            Ok(addrs) => {
                // RFC 5782 answers are in 127/8; Spamhaus-style 127.255.255.x means "your
                // query was refused" (public resolver, over quota), never "listed".
                match addrs
                    .iter()
                    .find(|a| a.octets()[0] != 127 || a.octets()[..3] == [127, 255, 255])
                {
                    Some(bad) => Answer::Error(format!(
                        "answered {bad} for {name}, an error code rather than a listing (query refused, misconfigured zone?)"
                    )),
                    None => Answer::Listed(addrs),
                }
            }
        }
    }

    /// The verdict for `ip`, asking every zone in use concurrently within the check deadline.
    pub async fn evaluate(&self, ip: IpAddr) -> Verdict {
        let ip = ip.to_canonical();
        let active: Vec<&Zone> = self.zones.iter().filter(|z| z.state().enabled).collect();
        if active.is_empty() {
            return Verdict::Skip;
        }
        let deadline = tokio::time::Instant::now() + self.resolver.check_deadline();
        let lookups = active.iter().map(|z| async move {
            match tokio::time::timeout_at(deadline, self.ask(ip, &z.name)).await {
                Ok(answer) => (*z, answer),
                Err(_) => (*z, Answer::Error("no answer within the check deadline".into())),
            }
        });
        let answers = futures_util::future::join_all(lookups).await;

        let mut score = 0.0f32;
        // The listing that weighs most names the list in the reply.
        let mut worst: Option<(&str, f32)> = None;
        let mut hits: Vec<String> = Vec::new();
        for (zone, answer) in answers {
            let addrs = match answer {
                Answer::NotListed => continue,
                Answer::Error(e) => {
                    zone.warn(&e);
                    continue;
                }
                Answer::Listed(addrs) => addrs,
            };
            for entry in zone.entries.iter().map(|&i| &self.entries[i]) {
                if entry.matches(&addrs) {
                    score += entry.weight;
                    hits.push(format!("{}*{} ({})", entry.zone, entry.weight, join(&addrs)));
                    if entry.weight > 0.0 && worst.is_none_or(|(_, w)| entry.weight > w) {
                        worst = Some((&entry.zone, entry.weight));
                    }
                }
            }
        }
        if hits.is_empty() {
            return Verdict::Pass;
        }
        tracing::debug!(check = "dnsbl", client = %ip, score, hits = %hits.join(", "), "Listed.");
        if score >= self.threshold
            && let Some((zone, _)) = worst
        {
            let refusal = Refusal {
                reply: Reply::build(
                    554,
                    "5.7.1",
                    format!("Service unavailable; client [{ip}] blocked using {zone}"),
                ),
                category: Category::Dnsbl,
            };
            return self.action.verdict(refusal);
        }
        if score <= self.whitelist_threshold {
            return match &self.whitelist {
                Whitelist::All => Verdict::Accept,
                Whitelist::Checks(names) => Verdict::Exempt(names.clone()),
            };
        }
        Verdict::Pass
    }
}

impl Check for DnsblCheck {
    fn name(&self) -> &'static str {
        "dnsbl"
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
            // Lists speak about public addresses; asking about 10.0.0.5 only leaks it.
            if crate::dns::is_internal(ip) {
                return Ok(Verdict::Skip);
            }
            Ok(self.evaluate(ip).await)
        })
    }
}

/// The DNSBL query prefix: `2.0.0.127` for 127.0.0.2; 32 reversed nibbles for IPv6.
pub fn reversed(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let hex = format!("{:032x}", u128::from(v6));
            let mut out = String::with_capacity(63);
            for (i, c) in hex.chars().rev().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push(c);
            }
            out
        }
    }
}

fn join(addrs: &[Ipv4Addr]) -> String {
    addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries() {
        let e = Entry::parse("zen.Example.*2").unwrap();
        assert_eq!(
            (e.zone.as_str(), e.filter.is_none(), e.weight),
            ("zen.example", true, 2.0)
        );
        let e = Entry::parse("bl.example=127.0.0.[2..11]*3").unwrap();
        let f = e.filter.clone().unwrap();
        assert!(f.matches(Ipv4Addr::new(127, 0, 0, 2)) && f.matches(Ipv4Addr::new(127, 0, 0, 11)));
        assert!(!f.matches(Ipv4Addr::new(127, 0, 0, 12)) && !f.matches(Ipv4Addr::new(127, 0, 1, 2)));
        let e = Entry::parse("list.dnswl.example=127.0.[0..255].[1..3]*-2").unwrap();
        assert_eq!(e.weight, -2.0);
        assert!(e.matches(&[Ipv4Addr::new(127, 0, 15, 3)]));
        assert!(!e.matches(&[Ipv4Addr::new(127, 0, 15, 0), Ipv4Addr::new(127, 0, 0, 255)]));
        let f = Filter::parse("127.0.0.[1;3;5..6]").unwrap();
        let hits: Vec<u8> = (0..10)
            .filter(|&n| f.matches(Ipv4Addr::new(127, 0, 0, n)))
            .collect();
        assert_eq!(hits, vec![1, 3, 5, 6]);
        assert_eq!(Entry::parse("plain.example").unwrap().weight, 1.0);
        for bad in [
            "",
            "*2",
            "zen.example*x",
            "zen.example*inf",
            "zen.example=127.0.0",
            "zen.example=127.0.0.2.1",
            "zen.example=127.0.0.[3..2]",
            "zen.example=127.0.0.[2..",
            "zen.example=127.0.0.256",
            "zen.example=127.0.0.2]",
            "zen..example",
            "-zen.example",
            "zen example",
            "zen.example=",
        ] {
            assert!(Entry::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn query_names() {
        assert_eq!(reversed("192.0.2.1".parse().unwrap()), "1.2.0.192");
        assert_eq!(reversed("::ffff:192.0.2.1".parse().unwrap()), "1.2.0.192");
        let v6 = reversed("2001:db8::1".parse().unwrap());
        assert_eq!(
            v6,
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
        );
    }

    #[test]
    fn config() {
        let c: DnsblConfig = toml::from_str("").unwrap();
        assert_eq!(c, DnsblConfig::default());
        let c: DnsblConfig = toml::from_str(
            "zones = [\"zen.example*2\"]\nthreshold = 3\naction = \"score:4\"\nwhitelist_exempt = [\"greylist\"]\nself_test_interval = \"1m\"",
        )
        .unwrap();
        assert!(c.validate("checks.dnsbl").is_empty());
        assert!(toml::from_str::<DnsblConfig>("zone = []").is_err());
        let bad = DnsblConfig {
            zones: vec!["ok.example".into(), "bad..example".into()],
            threshold: 0.0,
            whitelist_threshold: 0.0,
            whitelist_exempt: vec!["".into()],
            self_test_interval: Duration::ZERO,
            ..Default::default()
        };
        let errors = bad.validate("checks.dnsbl").join("\n");
        for key in [
            "checks.dnsbl.zones[1]",
            "checks.dnsbl.threshold",
            "checks.dnsbl.whitelist_threshold",
            "checks.dnsbl.whitelist_exempt[0]",
            "checks.dnsbl.self_test_interval",
        ] {
            assert!(errors.contains(key), "{key} missing in {errors}");
        }
    }
}
