//! Upstream MTAs at run time: their settings, their probed EHLO capabilities and health, and
//! the routing table that maps a recipient domain to one of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;

use crate::config::{Config, UpstreamTls};
use crate::smtp::codec::Reply;

/// What an MTA announced in its EHLO reply, as far as thassp cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// `SIZE n`; `Some(0)` means SIZE without a limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
    pub starttls: bool,
    pub chunking: bool,
    /// Attributes from `XCLIENT NAME ADDR …`; empty when XCLIENT is not offered.
    pub xclient: Vec<String>,
    /// Attributes from `XFORWARD NAME ADDR …`.
    pub xforward: Vec<String>,
    /// SASL mechanisms from `AUTH ...`.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Reads the keyword lines of an EHLO reply (the first line is the greeting).
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Self::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else { continue };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "STARTTLS" => caps.starttls = true,
                "CHUNKING" => caps.chunking = true,
                "XCLIENT" => caps.xclient = words.map(str::to_ascii_uppercase).collect(),
                "XFORWARD" => caps.xforward = words.map(str::to_ascii_uppercase).collect(),
                "AUTH" => caps.auth = words.map(str::to_ascii_uppercase).collect(),
                _ => {}
            }
        }
        caps
    }
}

/// Outcome of the last capability probe, for logs and the admin status page.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub last_probe: Option<SystemTime>,
    /// `None` when the last probe succeeded.
    pub last_error: Option<String>,
}

/// One upstream MTA at run time.
pub struct Upstream {
    pub name: String,
    pub address: String,
    pub helo_name: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub probe_interval: Duration,
    pub tls: UpstreamTls,
    /// The rustls client configuration (built from `tls_verify`), unless `tls = "off"`.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    pub tls_server_name: rustls::pki_types::ServerName<'static>,
    /// Send XCLIENT/XFORWARD when offered.
    pub xclient: bool,
    /// Reuse of idle connections across client sessions (see `smtp::pool`).
    pub reuse_idle: Duration,
    pub reuse_max_age: Duration,
    pub reuse_max_idle: usize,
    /// Last known EHLO capabilities; `None` until the MTA was reached once.
    caps: ArcSwapOption<Capabilities>,
    health: Mutex<Health>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn capabilities(&self) -> Option<Arc<Capabilities>> {
        self.caps.load_full()
    }

    /// Records capabilities seen by a probe or by a relaying session.
    pub fn set_capabilities(&self, caps: Capabilities) {
        let unchanged = self.caps.load().as_deref() == Some(&caps);
        if !unchanged {
            self.caps.store(Some(Arc::new(caps)));
        }
    }

    pub fn health(&self) -> Health {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }

    pub fn record_probe(&self, error: Option<String>) {
        if let Ok(mut h) = self.health.lock() {
            h.last_probe = Some(SystemTime::now());
            h.last_error = error;
        }
    }
}

/// Maps a recipient domain to its upstream. A domain is local exactly when it has a route.
#[derive(Debug)]
pub struct Routes {
    exact: HashMap<String, Arc<Upstream>>,
    /// `(".example.com", upstream)` for `*.example.com`, longest suffix first.
    suffixes: Vec<(String, Arc<Upstream>)>,
    /// Every upstream, by name.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Where `<postmaster>` without a domain goes.
    pub default: Option<Arc<Upstream>>,
}

impl Routes {
    /// Builds the routing table from a validated configuration, reading TLS files anew.
    /// Upstreams that keep their name and address keep their probed capabilities.
    ///
    /// # Errors
    /// Every TLS file that cannot be loaded, with its key.
    pub fn build(config: &Config, previous: Option<&Self>) -> Result<Self, Vec<String>> {
        let hostname = config.hostname();
        let mut errors = Vec::new();
        let mut upstreams: Vec<Arc<Upstream>> = Vec::new();
        for (name, u) in &config.upstreams {
            let tls_config = match u.tls {
                UpstreamTls::Off => None,
                _ => match crate::tls::client_config(
                    &u.tls_verify,
                    u.tls_ca_file.as_deref(),
                    &u.tls_pin_sha256,
                ) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        errors.push(format!("upstream.{name}.tls_verify: {e}"));
                        None
                    }
                },
            };
            let tls_server_name = match crate::tls::server_name(&u.address, u.tls_server_name.as_deref()) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(format!("upstream.{name}.tls_server_name: {e}"));
                    continue;
                }
            };
            let old = previous.and_then(|p| {
                p.upstreams
                    .iter()
                    .find(|o| o.name == *name && o.address == u.address)
            });
            upstreams.push(Arc::new(Upstream {
                name: name.clone(),
                address: u.address.clone(),
                helo_name: u.helo_name.clone().unwrap_or_else(|| hostname.clone()),
                connect_timeout: u.connect_timeout,
                command_timeout: u.command_timeout,
                data_timeout: u.data_timeout,
                probe_interval: u.probe_interval,
                tls: u.tls,
                tls_config,
                tls_server_name,
                xclient: u.xclient,
                reuse_idle: u.reuse_idle,
                reuse_max_age: u.reuse_max_age,
                reuse_max_idle: u.reuse_max_idle,
                caps: ArcSwapOption::new(old.and_then(|o| o.capabilities())),
                health: Mutex::new(old.map(|o| o.health()).unwrap_or_default()),
            }));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let by_name = |n: &str| upstreams.iter().find(|u| u.name == n).cloned();
        let default = config.default_upstream().and_then(by_name);
        let mut exact = HashMap::new();
        let mut suffixes = Vec::new();
        let mut add = |domain: &str, up: Arc<Upstream>| {
            let d = domain.to_lowercase();
            match d.strip_prefix('*') {
                Some(suffix) => suffixes.push((suffix.to_string(), up)),
                None => {
                    exact.insert(d, up);
                }
            }
        };
        if let Some(def) = &default {
            for d in &config.domains.local {
                add(d, def.clone());
            }
        }
        for (d, name) in &config.domains.routes {
            if let Some(up) = by_name(name) {
                add(d, up);
            }
        }
        suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Ok(Self {
            exact,
            suffixes,
            upstreams,
            default,
        })
    }

    /// The upstream for a lower-cased domain, or `None` when the domain is not local.
    pub fn route(&self, domain_lower: &str) -> Option<&Arc<Upstream>> {
        if let Some(up) = self.exact.get(domain_lower) {
            return Some(up);
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| domain_lower.len() > suffix.len() && domain_lower.ends_with(suffix.as_str()))
            .map(|(_, up)| up)
    }

    /// Where AUTH is relayed: the default upstream, else the first one.
    pub fn auth_upstream(&self) -> Option<&Arc<Upstream>> {
        self.default.as_ref().or_else(|| self.upstreams.first())
    }

    /// Capabilities every upstream offers (thassp may advertise only those), or `None` when
    /// no upstream has been reached yet.
    pub fn common_capabilities(&self) -> Option<Capabilities> {
        let mut known = self.upstreams.iter().filter_map(|u| u.capabilities());
        let first = known.next()?;
        let mut c = (*first).clone();
        for other in known {
            c.pipelining &= other.pipelining;
            c.eight_bit_mime &= other.eight_bit_mime;
            c.smtputf8 &= other.smtputf8;
            c.dsn &= other.dsn;
            c.enhanced_status_codes &= other.enhanced_status_codes;
            c.starttls &= other.starttls;
            c.chunking &= other.chunking;
            c.xclient.retain(|a| other.xclient.contains(a));
            c.xforward.retain(|a| other.xforward.contains(a));
            c.auth.retain(|m| other.auth.contains(m));
            c.size = match (c.size, other.size) {
                (Some(0), s) | (s, Some(0)) => s,
                (Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            };
        }
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml(
            &format!(
                r#"
                [[listener]]
                address = "127.0.0.1:0"
                [upstream.a]
                address = "127.0.0.1:1"
                [upstream.b]
                address = "127.0.0.1:2"
                [domains]
                default_upstream = "a"
                local = ["example.com", "*.sub.example.com"]
                {extra}
                "#
            ),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn routing() {
        let r = Routes::build(&config(r#"routes = { "example.org" = "b" }"#), None).unwrap();
        assert_eq!(r.route("example.com").unwrap().name, "a");
        assert_eq!(r.route("example.org").unwrap().name, "b");
        assert_eq!(r.route("x.sub.example.com").unwrap().name, "a");
        assert!(r.route("sub.example.com").is_none());
        assert!(r.route("example.com.").is_none());
        assert!(r.route("evil.example.com").is_none());
        assert!(r.route("xexample.com").is_none());
    }

    #[test]
    fn capabilities_from_ehlo() {
        let reply = Reply {
            code: 250,
            enhanced: None,
            lines: vec![
                "mx".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "8BITMIME".into(),
                "AUTH PLAIN login".into(),
            ],
        };
        let c = Capabilities::from_ehlo(&reply);
        assert!(c.pipelining && c.eight_bit_mime && !c.dsn);
        assert_eq!(c.size, Some(1000));
        assert_eq!(c.auth, vec!["PLAIN", "LOGIN"]);
    }

    #[test]
    fn reload_keeps_probed_upstreams() {
        let c = config("");
        let r1 = Routes::build(&c, None).unwrap();
        r1.upstreams[0].set_capabilities(Capabilities {
            dsn: true,
            ..Default::default()
        });
        let r2 = Routes::build(&c, Some(&r1)).unwrap();
        assert!(r2.upstreams[0].capabilities().unwrap().dsn);
    }
}
