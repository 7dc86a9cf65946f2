//! The process's one DNS resolver: its configuration (`[dns]`), lookups that tell "no such
//! record" apart from "could not find out", and reverse DNS with forward confirmation. Every
//! check (PTR, DNSBL, HELO, SPF through mail-auth) shares it, and with it one response cache.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use serde::{Deserialize, Serialize};

use crate::policy::Ptr;

/// At most this many PTR names are forward-checked: a hostile reverse zone could list
/// hundreds, and each costs a lookup.
const MAX_PTR_NAMES: usize = 10;

/// `[dns]`: how thassp resolves names.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Recursive resolvers to ask, as `ip:port` (e.g. `["127.0.0.1:53"]`). Empty (the
    /// default): the name servers of the system's `/etc/resolv.conf`. A DNSBL needs a
    /// resolver of your own: public resolvers are refused by most lists.
    pub servers: Vec<SocketAddr>,
    /// Time to wait for one answer from one server. Default "2s".
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// Tries per query (the first and the retries after a timeout or SERVFAIL). Default 2.
    pub attempts: usize,
    /// Longest time one check may spend on DNS in total (all its lookups together); a check
    /// that runs out decides as on a DNS failure. Default "5s".
    #[serde(with = "crate::config::duration")]
    pub check_deadline: Duration,
    /// Answers kept in the response cache (honouring their TTLs). Default 8192.
    pub cache_size: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            check_deadline: Duration::from_secs(5),
            cache_size: 8192,
        }
    }
}

impl DnsConfig {
    /// Every problem, each prefixed with `key` (the section's name, e.g. `dns`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            errors.push(format!("{key}.timeout: must be more than 0 and at most 60s"));
        }
        if !(1..=10).contains(&self.attempts) {
            errors.push(format!("{key}.attempts: must be between 1 and 10"));
        }
        if self.check_deadline.is_zero() || self.check_deadline > Duration::from_secs(300) {
            errors.push(format!(
                "{key}.check_deadline: must be more than 0 and at most 5m"
            ));
        }
        if self.cache_size > 10_000_000 {
            errors.push(format!("{key}.cache_size: must be at most 10000000"));
        }
        for (i, s) in self.servers.iter().enumerate() {
            if s.port() == 0 || s.ip().is_unspecified() {
                errors.push(format!("{key}.servers[{i}]: {s} is not a server address"));
            }
        }
        errors
    }
}

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist (NXDOMAIN) or has no records of the type asked (NODATA): a
    /// definite answer.
    #[error("no such record")]
    NotFound,
    /// No server answered in time.
    #[error("DNS lookup timed out")]
    Timeout,
    /// Anything else that leaves the question open: SERVFAIL, REFUSED, I/O, a bad name.
    #[error("DNS lookup failed: {0}")]
    Failure(String),
}

impl DnsError {
    fn from_net(e: &NetError) -> Self {
        match e {
            e if e.is_no_records_found() => Self::NotFound,
            NetError::Timeout => Self::Timeout,
            NetError::Dns(HickoryDnsError::ResponseCode(code)) => {
                Self::Failure(format!("server answered {code}"))
            }
            e => Self::Failure(e.to_string()),
        }
    }
}

/// The shared resolver: cheap to use from many tasks at once (put it in an `Arc`).
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
    check_deadline: Duration,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("check_deadline", &self.check_deadline)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Builds the resolver; reads `/etc/resolv.conf` when `config.servers` is empty.
    /// Building needs no runtime; lookups run on tokio.
    pub fn new(config: &DnsConfig) -> Result<Self, String> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.servers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| format!("dns: cannot read the system resolver configuration: {e}"))?
        } else {
            let servers = config
                .servers
                .iter()
                .map(|s| {
                    let conn = |mut c: ConnectionConfig| {
                        c.port = s.port();
                        c
                    };
                    // UDP first; TCP for truncated answers (large TXT sets).
                    NameServerConfig::new(
                        s.ip(),
                        true,
                        vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
                    )
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = config.timeout;
        // hickory counts retries after the first try; the configuration counts tries.
        opts.attempts = config.attempts.saturating_sub(1);
        opts.cache_size = config.cache_size as u64;
        // Checks judge what the world's DNS says about a client, never a local hosts file.
        opts.use_hosts_file = ResolveHosts::Never;
        let inner = builder
            .build()
            .map_err(|e| format!("dns: cannot build the resolver: {e}"))?;
        Ok(Self {
            inner,
            check_deadline: config.check_deadline,
        })
    }

    /// The hickory resolver underneath, for crates that take one (mail-auth), so they share
    /// the cache and the servers.
    pub fn hickory(&self) -> &TokioResolver {
        &self.inner
    }

    /// The configured time budget for all DNS work of one check.
    pub fn check_deadline(&self) -> Duration {
        self.check_deadline
    }

    /// Records of type `rtype` at `name` (CNAMEs followed), in answer order.
    async fn records(&self, name: Name, rtype: RecordType) -> Result<Vec<RData>, DnsError> {
        let lookup = self
            .inner
            .lookup(name, rtype)
            .await
            .map_err(|e| DnsError::from_net(&e))?;
        // The answer also holds the CNAMEs that led here; keep only what was asked for.
        let found: Vec<RData> = lookup
            .answers()
            .iter()
            .filter(|r| r.record_type() == rtype)
            .map(|r| r.data.clone())
            .collect();
        if found.is_empty() {
            return Err(DnsError::NotFound);
        }
        Ok(found)
    }

    /// IPv4 addresses of `name`.
    pub async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        let found = self.records(parse_name(name)?, RecordType::A).await?;
        Ok(found
            .into_iter()
            .filter_map(|r| match r {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    /// IPv6 addresses of `name`.
    pub async fn aaaa(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsError> {
        let found = self.records(parse_name(name)?, RecordType::AAAA).await?;
        Ok(found
            .into_iter()
            .filter_map(|r| match r {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    /// All addresses of `name`: A and AAAA asked concurrently, IPv4 first. One family may be
    /// missing; an error is returned only when neither gave an address, and a failure wins
    /// over `NotFound` then (the name might have addresses we could not see).
    pub async fn ips(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        let (v4, v6) = futures_util::future::join(self.a(name), self.aaaa(name)).await;
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Ok(v4) = &v4 {
            ips.extend(v4.iter().copied().map(IpAddr::V4));
        }
        if let Ok(v6) = &v6 {
            ips.extend(v6.iter().copied().map(IpAddr::V6));
        }
        if !ips.is_empty() {
            return Ok(ips);
        }
        match (v4, v6) {
            (Err(e), _) | (_, Err(e)) if e != DnsError::NotFound => Err(e),
            _ => Err(DnsError::NotFound),
        }
    }

    /// PTR names of `ip` (lower-case, no trailing dot).
    pub async fn ptr_names(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        let found = self
            .records(Name::from(ip.to_canonical()), RecordType::PTR)
            .await?;
        Ok(found
            .into_iter()
            .filter_map(|r| match r {
                RData::PTR(p) => Some(name_text(&p.0)),
                _ => None,
            })
            .collect())
    }

    /// TXT records of `name`, each record's strings joined (as SPF and DKIM expect), bytes
    /// that are not UTF-8 replaced.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let found = self.records(parse_name(name)?, RecordType::TXT).await?;
        Ok(found
            .into_iter()
            .filter_map(|r| match r {
                RData::TXT(t) => Some(
                    t.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect())
    }

    /// MX records of `name` as (preference, exchange), lowest preference first. A null MX
    /// (RFC 7505, "no mail here") appears as an empty exchange name.
    pub async fn mx(&self, name: &str) -> Result<Vec<(u16, String)>, DnsError> {
        let found = self.records(parse_name(name)?, RecordType::MX).await?;
        let mut mx: Vec<(u16, String)> = found
            .into_iter()
            .filter_map(|r| match r {
                RData::MX(m) => Some((m.preference, name_text(&m.exchange))),
                _ => None,
            })
            .collect();
        mx.sort();
        Ok(mx)
    }

    /// Reverse DNS of `ip` with forward confirmation (FCrDNS), within the check deadline:
    /// the first PTR name whose A (or AAAA) records contain `ip` is `Confirmed`; otherwise
    /// the first name is `Unconfirmed`. No PTR (NXDOMAIN or no data) is `None`. A failed PTR
    /// lookup, or forward lookups that failed (rather than said "no") with nothing
    /// confirmed, is `Error`: a DNS hiccup must not look like a bad reverse zone.
    pub async fn reverse(&self, ip: IpAddr) -> Ptr {
        let ip = ip.to_canonical();
        match tokio::time::timeout(self.check_deadline, self.reverse_inner(ip)).await {
            Ok(ptr) => ptr,
            Err(_) => Ptr::Error(format!(
                "reverse DNS of {ip} took longer than {:?}",
                self.check_deadline
            )),
        }
    }

    async fn reverse_inner(&self, ip: IpAddr) -> Ptr {
        let names = match self.ptr_names(ip).await {
            Ok(names) => names,
            Err(DnsError::NotFound) => return Ptr::None,
            Err(e) => return Ptr::Error(format!("PTR lookup for {ip}: {e}")),
        };
        // Only names that can be looked up forward; a PTR "name" such as `\000` cannot.
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| !n.is_empty())
            .take(MAX_PTR_NAMES)
            .collect();
        let Some(first) = names.first().cloned() else {
            return Ptr::None;
        };
        // Only the client's address family matters. `a`/`aaaa` never treat a PTR name that
        // looks like an address literal ("192.0.2.1") as resolving to itself.
        let forward = names.iter().map(|name| async move {
            match ip {
                IpAddr::V4(v4) => self.a(name).await.map(|a| a.contains(&v4)),
                IpAddr::V6(v6) => self.aaaa(name).await.map(|a| a.contains(&v6)),
            }
        });
        let results = futures_util::future::join_all(forward).await;
        let mut failure = None;
        for (name, result) in names.iter().zip(results) {
            match result {
                Ok(true) => return Ptr::Confirmed(name.clone()),
                Ok(false) | Err(DnsError::NotFound) => {}
                Err(e) => {
                    failure.get_or_insert_with(|| format!("forward lookup of {name}: {e}"));
                }
            }
        }
        match failure {
            Some(msg) => Ptr::Error(msg),
            None => Ptr::Unconfirmed(first),
        }
    }
}

/// True for addresses no public DNS list or reverse zone speaks about: loopback, private
/// (RFC 1918, RFC 6598 shared space, IPv6 unique-local), link-local, unspecified. Checks
/// skip them: asking a third-party list about `10.0.0.5` only leaks the internal network.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// A query name from text: absolute (no search-list expansion: `2.0.0.127.zen.example`
/// must not also be tried as `2.0.0.127.zen.example.corp.lan`).
fn parse_name(name: &str) -> Result<Name, DnsError> {
    let trimmed = name.trim();
    let mut parsed = Name::from_str_relaxed(trimmed)
        .map_err(|e| DnsError::Failure(format!("{trimmed:?} is not a domain name: {e}")))?;
    if parsed.num_labels() == 0 {
        return Err(DnsError::Failure(format!("{trimmed:?} is not a domain name")));
    }
    parsed.set_fqdn(true);
    Ok(parsed)
}

/// A name as text: ASCII (odd bytes escaped by hickory, so never CR/LF), lower-case, no
/// trailing dot.
fn name_text(name: &Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let c: DnsConfig = toml::from_str("").unwrap();
        assert_eq!(c, DnsConfig::default());
        assert_eq!(c.timeout, Duration::from_secs(2));
        let c: DnsConfig =
            toml::from_str("servers = [\"127.0.0.1:5353\"]\ntimeout = \"300ms\"\nattempts = 1").unwrap();
        assert_eq!(c.timeout, Duration::from_millis(300));
        assert!(c.validate("dns").is_empty());
        assert!(toml::from_str::<DnsConfig>("timeouts = \"1s\"").is_err());
        let bad = DnsConfig {
            servers: vec!["0.0.0.0:53".parse().unwrap()],
            timeout: Duration::ZERO,
            attempts: 0,
            check_deadline: Duration::ZERO,
            cache_size: 1,
        };
        let errors = bad.validate("dns").join("\n");
        for key in [
            "dns.timeout",
            "dns.attempts",
            "dns.check_deadline",
            "dns.servers[0]",
        ] {
            assert!(errors.contains(key), "{key} missing in {errors}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(parse_name("Example.COM").unwrap().to_ascii(), "example.com.");
        assert!(parse_name("").is_err());
        assert!(parse_name("a..b").is_err());
        let n = Name::from_ascii("MX1.Example.com.").unwrap();
        assert_eq!(name_text(&n), "mx1.example.com");
        assert_eq!(name_text(&Name::root()), "");
    }

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.1.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "192.0.2.1",
            "8.8.8.8",
            "100.128.0.1",
            "2001:db8::1",
            "::ffff:192.0.2.1",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(DnsError::from_net(&NetError::Timeout), DnsError::Timeout);
        let servfail = NetError::Dns(HickoryDnsError::ResponseCode(
            hickory_resolver::proto::op::ResponseCode::ServFail,
        ));
        assert!(
            matches!(DnsError::from_net(&servfail), DnsError::Failure(m) if m.contains("Server Failure"))
        );
    }
}
