//! The TOML configuration: serde types with documented defaults, and `validate()`, which
//! reports every error with its key. Plain data only: runtime handles are built in `app.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Addresses to accept SMTP on; at least one.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub smtp: SmtpConfig,
    /// Upstream MTAs by name; `[upstream.NAME]`.
    #[serde(default, rename = "upstream")]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub domains: DomainsConfig,
    /// The development upstream: for trying thassp out without an MTA. Never for production.
    #[serde(default)]
    pub devsink: DevsinkConfig,
    /// The resolver every DNS-based check shares.
    #[serde(default)]
    pub dns: crate::dns::DnsConfig,
    /// Where the stateful defences keep their state.
    #[serde(default)]
    pub store: crate::store::StoreConfig,
    /// The event log (one row per connection and per transaction) and its database.
    #[serde(default)]
    pub events: crate::events::EventsConfig,
    /// The web UI, JSON API, metrics and console.
    #[serde(default)]
    pub admin: crate::admin::AdminConfig,
    /// How check verdicts combine.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Each check's settings, `[checks.NAME]`.
    #[serde(default)]
    pub checks: ChecksConfig,
}

/// `[policy]`: how the checks' verdicts combine.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// What a check that cannot decide (DNS timeout, store error) means: `tempfail`
    /// (default: `451 4.3.0`, the sender retries; no mail is refused for our failure) or
    /// `pass`.
    pub on_error: crate::policy::OnError,
    /// A stage whose `score:N` verdicts add up to this is refused (with the reply of the
    /// check that scored most). 0 = scores never refuse. Default 5.
    pub score_limit: f32,
    /// A message whose scores from every stage (connect, HELO, MAIL, RCPT, DATA) add up
    /// to this is refused after DATA. 0 = off. Default 8.
    pub message_score_limit: f32,
    /// Add `X-Thassp-Score: N (check=points, …)` to relayed mail with a score. Default true.
    pub score_header: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            on_error: crate::policy::OnError::TempFail,
            score_limit: 5.0,
            message_score_limit: 8.0,
            score_header: true,
        }
    }
}

/// `[checks]`: one section per check.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    pub limits: crate::limits::LimitsConfig,
    pub pregreet: PregreetConfig,
    pub lists: crate::policy::lists::ListsConfig,
    pub helo: crate::policy::helo::HeloConfig,
    pub ptr: crate::policy::ptr::PtrConfig,
    pub dnsbl: crate::policy::dnsbl::DnsblConfig,
    pub greylist: crate::policy::greylist::GreylistConfig,
    pub reputation: crate::policy::reputation::ReputationConfig,
    pub traps: crate::policy::traps::TrapsConfig,
    pub spf: crate::policy::spf::SpfConfig,
    pub content: crate::policy::content::ContentConfig,
    pub attachments: crate::policy::attachments::AttachmentsConfig,
    pub dkim: crate::policy::dkim::DkimConfig,
}

/// `[checks.pregreet]`: early talkers. Before the banner thassp sends a `220-` line and
/// waits; a client that speaks before the final `220 ` line is not a patient MTA (postscreen's
/// pregreet test). In sessions without PIPELINING (HELO, or before EHLO), a client that sends
/// a command before the previous reply fails it too.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PregreetConfig {
    /// Default false: every connection then waits `wait` for its banner.
    pub enabled: bool,
    /// Time between the `220-` teaser and the banner. Default "6s" (as postscreen).
    #[serde(with = "duration")]
    pub wait: Duration,
    /// What an early talker gets: `reject` (default: `554 5.5.1` and close), `tempfail`,
    /// `score:N` or `monitor`.
    pub action: crate::policy::CheckAction,
}

impl Default for PregreetConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            wait: Duration::from_secs(6),
            action: crate::policy::CheckAction::Reject,
        }
    }
}

/// `[server]`: process-wide settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Name in the banner, EHLO reply and Received header. Default: the system host name.
    pub hostname: Option<String>,
    /// Concurrent client connections over all listeners; more are answered `421 4.7.0`.
    /// Default 5000.
    pub max_connections: usize,
    /// On SIGTERM, how long sessions in flight may finish before they get `421 4.3.2`.
    /// Default "30s".
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            hostname: None,
            max_connections: 5000,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// `[[listener]]`: one address to accept SMTP on.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `ip:port`, e.g. `0.0.0.0:25` or `[::]:25`.
    pub address: String,
    /// Banner/EHLO host name for this listener. Default: `server.hostname`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// `starttls` (offer STARTTLS), `implicit` (TLS from the first byte, port 465 style) or
    /// `none`. Default: `starttls` when `tls_cert` is set, else `none`.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// PEM file with the certificate chain (leaf first). Re-read on reload.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key. Re-read on reload.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Refuse MAIL and AUTH before STARTTLS with `530 5.7.0`. Default false (port 25 must
    /// accept plaintext from the world).
    #[serde(default)]
    pub require_tls: bool,
    /// When AUTH (relayed to the upstream) is offered: `after_tls` (default), `always`, `never`.
    #[serde(default)]
    pub auth: AuthPolicy,
    /// Expect a PROXY protocol v1 or v2 header first (behind HAProxy or a load balancer).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Sources allowed to send a PROXY header (`["10.0.0.5/32"]`); others are disconnected.
    #[serde(default)]
    pub proxy_trusted: Vec<ipnet::IpNet>,
    /// Time allowed for the PROXY header. Default "5s".
    #[serde(default = "default_proxy_timeout", with = "duration")]
    pub proxy_timeout: Duration,
}

fn default_proxy_timeout() -> Duration {
    Duration::from_secs(5)
}

impl ListenerConfig {
    /// The effective TLS mode.
    pub fn tls_mode(&self) -> ListenerTls {
        self.tls.unwrap_or(if self.tls_cert.is_some() {
            ListenerTls::Starttls
        } else {
            ListenerTls::None
        })
    }
}

/// TLS on a listener.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    None,
    Starttls,
    Implicit,
}

/// When AUTH is advertised to clients.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthPolicy {
    #[default]
    AfterTls,
    Always,
    Never,
}

/// What to do with a bare CR or bare LF inside DATA.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndPolicy {
    Reject,
    Normalize,
}

/// `[smtp]`: protocol limits and timeouts for client sessions (RFC 5321 §4.5.3).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Largest message accepted, in bytes (also advertised as SIZE). Default 25 MiB.
    #[serde(with = "bytesize")]
    pub max_message_size: u64,
    /// Recipients per transaction; more get `452 4.5.3`. Default 100 (RFC 5321 minimum).
    pub max_recipients: usize,
    /// Refused commands per session before `421 4.7.0` and close. Default 10.
    pub max_errors: u32,
    /// Longest text line in DATA, CRLF included; longer lines get the message refused with
    /// `550 5.6.0`. Default 1000 (RFC 5321 §4.5.3.1.6).
    pub max_line_length: usize,
    /// Bare CR or LF inside DATA: `reject` (default, `550 5.6.0`) or `normalize` (to CRLF).
    pub bare_line_end: BareLineEndPolicy,
    /// Time from the banner until the first command line has arrived whole. Default "5m".
    #[serde(with = "duration")]
    pub greeting_timeout: Duration,
    /// Time for each further command line to arrive whole (a client trickling bytes cannot
    /// stretch it). Default "5m" (RFC 5321 §4.5.3.2.7).
    #[serde(with = "duration")]
    pub command_timeout: Duration,
    /// Longest silence while receiving DATA. Default "3m" (data block, §4.5.3.2.5).
    #[serde(with = "duration")]
    pub data_timeout: Duration,
    /// Longest time to receive one whole message. Default "10m".
    #[serde(with = "duration")]
    pub data_total_timeout: Duration,
    /// Add a `Received:` header to relayed mail. Default true.
    pub received_header: bool,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_errors: 10,
            max_line_length: 1000,
            bare_line_end: BareLineEndPolicy::Reject,
            greeting_timeout: Duration::from_secs(300),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            data_total_timeout: Duration::from_secs(600),
            received_header: true,
        }
    }
}

/// `[upstream.NAME]`: an MTA that accepted mail is relayed to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` of the MTA, e.g. `127.0.0.1:10025`.
    pub address: String,
    /// Name thassp gives in its EHLO to this MTA. Default: `server.hostname`.
    #[serde(default)]
    pub helo_name: Option<String>,
    /// TCP connect timeout. Default "10s".
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Wait for the reply to each command (greeting, EHLO, MAIL, RCPT, DATA). Default "60s".
    #[serde(default = "default_command_timeout", with = "duration")]
    pub command_timeout: Duration,
    /// Wait for the final reply after the message was sent. Default "5m".
    #[serde(default = "default_data_timeout", with = "duration")]
    pub data_timeout: Duration,
    /// How often the MTA's EHLO capabilities are probed. Default "60s".
    #[serde(default = "default_probe_interval", with = "duration")]
    pub probe_interval: Duration,
    /// STARTTLS towards this MTA: `opportunistic` (default: when offered; a failed handshake
    /// falls back to plaintext with a warning), `require` (no TLS → 4xx to the client),
    /// `off`.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// Certificate check: `none` (default; encrypts, as Postfix's `may`), `system` (the
    /// system CA bundle), `ca_file` (`tls_ca_file`), `pin` (`tls_pin_sha256`).
    #[serde(default)]
    pub tls_verify: UpstreamTlsVerify,
    /// PEM file of CAs for `tls_verify = "ca_file"`.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// SHA-256 fingerprints of accepted leaf certificates for `tls_verify = "pin"`.
    #[serde(default)]
    pub tls_pin_sha256: Vec<String>,
    /// Name to verify and send as SNI. Default: the host part of `address`.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Tell the MTA the real client (address, HELO, …) with XCLIENT, or XFORWARD when only
    /// that is offered. Default true; the MTA must authorise thassp (Postfix:
    /// `smtpd_authorized_xclient_hosts`), otherwise it does not offer them.
    #[serde(default = "yes")]
    pub xclient: bool,
    /// How long a connection to this MTA that a finished client session leaves stays open
    /// for the next session (which then skips connect, greeting, EHLO and STARTTLS). After
    /// XCLIENT only a session of the same client may use it, unless the MTA offers XCLIENT
    /// again (Postfix does not). "0s" closes it at once. Default "2s", Postfix's own
    /// `smtp_connection_cache_time_limit`.
    #[serde(default = "default_reuse_idle", with = "duration")]
    pub reuse_idle: Duration,
    /// A connection older than this is not reused. Default "300s".
    #[serde(default = "default_reuse_max_age", with = "duration")]
    pub reuse_max_age: Duration,
    /// At most this many idle connections to this MTA are kept (each holds one smtpd
    /// process there). Default 32.
    #[serde(default = "default_reuse_max_idle")]
    pub reuse_max_idle: usize,
}

fn yes() -> bool {
    true
}

/// STARTTLS towards an upstream.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    #[default]
    Opportunistic,
    Require,
    Off,
}

/// How an upstream's certificate is checked.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamTlsVerify {
    #[default]
    None,
    System,
    CaFile,
    Pin,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_probe_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_reuse_idle() -> Duration {
    Duration::from_secs(2)
}
fn default_reuse_max_age() -> Duration {
    Duration::from_secs(300)
}
fn default_reuse_max_idle() -> usize {
    32
}

/// `[domains]`: which recipient domains are local, and where each is relayed.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DomainsConfig {
    /// Local domains relayed to `default_upstream`. Matching is exact and case-insensitive;
    /// `*.example.com` means every sub-domain of example.com (not example.com itself).
    pub local: Vec<String>,
    /// Upstream for `local` domains. Default: the only upstream when there is exactly one.
    pub default_upstream: Option<String>,
    /// Further local domains, each with its own upstream: `"example.org" = "other"`.
    pub routes: BTreeMap<String, String>,
}

/// `[devsink]`: a built-in development upstream that stores each message as a file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DevsinkConfig {
    /// Start it inside the thassp process. Default false.
    pub enabled: bool,
    /// Loopback address it listens on. Default "127.0.0.1:2526".
    pub address: String,
    /// Directory that receives one `.eml` file per message. Default "devmail".
    pub directory: PathBuf,
}

impl Default for DevsinkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: "127.0.0.1:2526".into(),
            directory: PathBuf::from("devmail"),
        }
    }
}

/// Every problem found in a configuration, each prefixed with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source_name: String,
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} error(s) in the configuration:",
            self.source_name,
            self.errors.len()
        )?;
        for e in &self.errors {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            errors: vec![format!("cannot read the file: {e}")],
        })?;
        Self::from_toml(&text, &name)
    }

    /// Parses and validates configuration text; `name` labels the errors.
    pub fn from_toml(text: &str, name: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError {
            source_name: name.to_string(),
            errors: vec![e.to_string()],
        })?;
        let errors = config.validate();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                source_name: name.to_string(),
                errors,
            })
        }
    }

    /// The host name used where a listener or upstream does not set its own.
    pub fn hostname(&self) -> String {
        self.server.hostname.clone().unwrap_or_else(system_hostname)
    }

    /// The upstream used for `domains.local`.
    pub fn default_upstream(&self) -> Option<&str> {
        match &self.domains.default_upstream {
            Some(n) => Some(n.as_str()),
            None if self.upstreams.len() == 1 => self.upstreams.keys().next().map(String::as_str),
            None => None,
        }
    }

    /// Every error, each with its key; empty when the configuration is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut errors_extra = Vec::new();
        let mut e = |key: String, msg: String| errors.push(format!("{key}: {msg}"));

        if let Some(h) = &self.server.hostname
            && !crate::smtp::address::is_hostname(h)
        {
            e(
                "server.hostname".into(),
                format!("{h:?} is not a valid host name"),
            );
        }
        if self.server.max_connections == 0 {
            e("server.max_connections".into(), "must be at least 1".into());
        }
        if self.listeners.is_empty() {
            e(
                "listener".into(),
                "at least one [[listener]] with an address is needed".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            match l.address.parse::<SocketAddr>() {
                Ok(a) if !seen.insert(a) => {
                    e(format!("listener[{i}].address"), format!("{a} is listed twice"))
                }
                Ok(_) => {}
                Err(_) => e(
                    format!("listener[{i}].address"),
                    format!("{:?} is not ip:port (use [::]:25 for IPv6)", l.address),
                ),
            }
            if let Some(h) = &l.hostname
                && !crate::smtp::address::is_hostname(h)
            {
                e(
                    format!("listener[{i}].hostname"),
                    format!("{h:?} is not a valid host name"),
                );
            }
            let tls = l.tls_mode();
            if tls != ListenerTls::None && (l.tls_cert.is_none() || l.tls_key.is_none()) {
                e(format!("listener[{i}].tls"), "needs tls_cert and tls_key".into());
            }
            if tls == ListenerTls::None && (l.tls_cert.is_some() || l.tls_key.is_some()) {
                e(
                    format!("listener[{i}].tls_cert"),
                    "set, but tls = \"none\"".into(),
                );
            }
            if l.require_tls && tls != ListenerTls::Starttls {
                e(
                    format!("listener[{i}].require_tls"),
                    "needs tls = \"starttls\" with a certificate".into(),
                );
            }
            if l.proxy_protocol && l.proxy_trusted.is_empty() {
                e(
                    format!("listener[{i}].proxy_trusted"),
                    "proxy_protocol needs the balancer's networks here; otherwise every connection is refused".into(),
                );
            }
            if l.proxy_timeout.is_zero() {
                e(
                    format!("listener[{i}].proxy_timeout"),
                    "must be more than 0".into(),
                );
            }
        }

        let s = &self.smtp;
        if s.max_message_size < 1024 || s.max_message_size > (1 << 31) {
            e(
                "smtp.max_message_size".into(),
                "must be between 1 KiB and 2 GiB".into(),
            );
        }
        if s.max_recipients == 0 || s.max_recipients > 100_000 {
            e(
                "smtp.max_recipients".into(),
                "must be between 1 and 100000".into(),
            );
        }
        if s.max_errors == 0 {
            e("smtp.max_errors".into(), "must be at least 1".into());
        }
        if s.max_line_length < 1000 || s.max_line_length > 1 << 20 {
            e(
                "smtp.max_line_length".into(),
                "must be between 1000 (RFC 5321) and 1048576".into(),
            );
        }
        for (key, d) in [
            ("smtp.greeting_timeout", s.greeting_timeout),
            ("smtp.command_timeout", s.command_timeout),
            ("smtp.data_timeout", s.data_timeout),
            ("smtp.data_total_timeout", s.data_total_timeout),
        ] {
            if d.is_zero() {
                e(key.into(), "must be more than 0".into());
            }
        }

        if self.upstreams.is_empty() {
            e(
                "upstream".into(),
                "at least one [upstream.NAME] with an address is needed".into(),
            );
        }
        for (name, u) in &self.upstreams {
            if !valid_host_port(&u.address) {
                e(
                    format!("upstream.{name}.address"),
                    format!("{:?} is not host:port", u.address),
                );
            }
            for (key, d) in [
                ("connect_timeout", u.connect_timeout),
                ("command_timeout", u.command_timeout),
                ("data_timeout", u.data_timeout),
                ("probe_interval", u.probe_interval),
            ] {
                if d.is_zero() {
                    e(format!("upstream.{name}.{key}"), "must be more than 0".into());
                }
            }
            if u.reuse_max_idle > 10_000 {
                e(
                    format!("upstream.{name}.reuse_max_idle"),
                    format!("{} is more than 10000", u.reuse_max_idle),
                );
            }
            match u.tls_verify {
                UpstreamTlsVerify::CaFile if u.tls_ca_file.is_none() => e(
                    format!("upstream.{name}.tls_ca_file"),
                    "needed for tls_verify = \"ca_file\"".into(),
                ),
                UpstreamTlsVerify::Pin if u.tls_pin_sha256.is_empty() => e(
                    format!("upstream.{name}.tls_pin_sha256"),
                    "needed for tls_verify = \"pin\"".into(),
                ),
                _ => {}
            }
            for (j, pin) in u.tls_pin_sha256.iter().enumerate() {
                if let Err(msg) = crate::tls::parse_pin(pin) {
                    e(format!("upstream.{name}.tls_pin_sha256[{j}]"), msg);
                }
            }
            if u.tls == UpstreamTls::Off && u.tls_verify != UpstreamTlsVerify::None {
                e(
                    format!("upstream.{name}.tls_verify"),
                    "set, but tls = \"off\"".into(),
                );
            }
            if let Some(h) = &u.helo_name
                && !crate::smtp::address::is_hostname(h)
            {
                e(
                    format!("upstream.{name}.helo_name"),
                    format!("{h:?} is not a valid host name"),
                );
            }
        }

        let d = &self.domains;
        if d.local.is_empty() && d.routes.is_empty() {
            e(
                "domains.local".into(),
                "no local domain: thassp would refuse every recipient".into(),
            );
        }
        if !d.local.is_empty() {
            match self.default_upstream() {
                None => e(
                    "domains.default_upstream".into(),
                    "needed when there is more than one upstream".into(),
                ),
                Some(n) if !self.upstreams.contains_key(n) => {
                    e("domains.default_upstream".into(), format!("no [upstream.{n}]"))
                }
                Some(_) => {}
            }
        }
        let mut domains_seen = std::collections::HashSet::new();
        for (i, dom) in d.local.iter().enumerate() {
            if !valid_domain_pattern(dom) {
                e(
                    format!("domains.local[{i}]"),
                    format!("{dom:?} is not a domain name (no trailing dot, no IP literal)"),
                );
            } else if !domains_seen.insert(dom.to_lowercase()) {
                e(format!("domains.local[{i}]"), format!("{dom:?} is listed twice"));
            }
        }
        for (dom, up) in &d.routes {
            if !valid_domain_pattern(dom) {
                e(format!("domains.routes.{dom:?}"), "is not a domain name".into());
            } else if !domains_seen.insert(dom.to_lowercase()) {
                e(
                    format!("domains.routes.{dom:?}"),
                    "is also listed elsewhere".into(),
                );
            }
            if !self.upstreams.contains_key(up) {
                e(format!("domains.routes.{dom:?}"), format!("no [upstream.{up}]"));
            }
        }

        if !(0.0..=1e6).contains(&self.policy.score_limit) || self.policy.score_limit.is_nan() {
            e(
                "policy.score_limit".into(),
                "must be between 0 and 1000000".into(),
            );
        }
        errors_extra.extend(self.checks.limits.validate("checks.limits"));
        errors_extra.extend(self.dns.validate("dns"));
        errors_extra.extend(self.checks.ptr.validate("checks.ptr"));
        errors_extra.extend(self.checks.dnsbl.validate("checks.dnsbl"));
        errors_extra.extend(self.store.validate("store"));
        errors_extra.extend(self.events.validate("events"));
        errors_extra.extend(self.admin.validate("admin"));
        errors_extra.extend(self.checks.greylist.validate("checks.greylist"));
        errors_extra.extend(self.checks.reputation.validate("checks.reputation"));
        errors_extra.extend(self.checks.spf.validate("checks.spf"));
        errors_extra.extend(self.checks.content.validate());
        errors_extra.extend(self.checks.attachments.validate());
        errors_extra.extend(self.checks.dkim.validate("checks.dkim"));
        if self.checks.pregreet.enabled
            && (self.checks.pregreet.wait.is_zero() || self.checks.pregreet.wait > Duration::from_secs(60))
        {
            e(
                "checks.pregreet.wait".into(),
                "must be between 1ms and 60s".into(),
            );
        }
        if self.devsink.enabled {
            match self.devsink.address.parse::<SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(_) => e(
                    "devsink.address".into(),
                    "the development upstream listens on loopback only".into(),
                ),
                Err(_) => e(
                    "devsink.address".into(),
                    format!("{:?} is not ip:port", self.devsink.address),
                ),
            }
        }
        errors.extend(errors_extra);
        errors
    }
}

fn valid_domain_pattern(d: &str) -> bool {
    let d = d.strip_prefix("*.").unwrap_or(d);
    crate::smtp::address::is_hostname(d)
}

fn valid_host_port(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            crate::smtp::address::is_hostname(host) && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

/// The kernel's host name, falling back to `localhost` when it cannot be read.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| crate::smtp::address::is_hostname(s))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Durations written as `"30s"`, `"5m"`, `"2h"`, `"1d"`, `"250ms"` or a number of seconds.
pub mod duration {
    use super::*;

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like \"30s\" or \"5m\""))?;
        let mult = match unit.trim() {
            "ms" => return Ok(Duration::from_millis(n)),
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            u => return Err(format!("unknown duration unit {u:?} (use ms, s, m, h or d)")),
        };
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long"))
    }

    pub fn format(d: &Duration) -> String {
        let ms = d.as_millis();
        if !ms.is_multiple_of(1000) {
            return format!("{ms}ms");
        }
        let s = d.as_secs();
        match s {
            s if s != 0 && s % 86400 == 0 => format!("{}d", s / 86400),
            s if s != 0 && s % 3600 == 0 => format!("{}h", s / 3600),
            s if s != 0 && s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Duration::from_secs(n)),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Sizes written as a number of bytes or `"25MiB"`, `"512KiB"`, `"10M"`, `"1G"`.
pub mod bytesize {
    use super::*;

    pub fn parse(s: &str) -> Result<u64, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like \"25MiB\""))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1024,
            "m" | "mb" | "mib" => 1024 * 1024,
            "g" | "gb" | "gib" => 1024 * 1024 * 1024,
            u => return Err(format!("unknown size unit {u:?} (use KiB, MiB or GiB)")),
        };
        n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
    }

    pub fn serialize<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*n)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(n),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[listener]]
        address = "127.0.0.1:2525"
        [upstream.mta]
        address = "127.0.0.1:10025"
        [domains]
        local = ["example.com"]
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL, "t").unwrap();
        assert_eq!(c.smtp.max_recipients, 100);
        assert_eq!(c.smtp.max_message_size, 25 * 1024 * 1024);
        assert_eq!(c.default_upstream(), Some("mta"));
        assert_eq!(c.upstreams["mta"].command_timeout, Duration::from_secs(60));
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let text = r#"
            [server]
            hostname = "bad host"
            [[listener]]
            address = "nope"
            [smtp]
            max_recipients = 0
            greeting_timeout = "0s"
            [upstream.a]
            address = "x"
            [upstream.b]
            address = "127.0.0.1:25"
            [domains]
            local = ["example.com", "EXAMPLE.com", "1.2.3.4.", "[1.2.3.4]"]
            routes = { "example.org" = "missing" }
        "#;
        let err = Config::from_toml(text, "t").unwrap_err();
        let all = err.errors.join("\n");
        for key in [
            "server.hostname",
            "listener[0].address",
            "smtp.max_recipients",
            "smtp.greeting_timeout",
            "upstream.a.address",
            "domains.default_upstream",
            "domains.local[1]",
            "domains.local[2]",
            "domains.local[3]",
            "domains.routes.\"example.org\"",
        ] {
            assert!(all.contains(key), "missing {key} in:\n{all}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml(&format!("{MINIMAL}\n[smtp]\nmax_recipient = 5\n"), "t").unwrap_err();
        assert!(err.errors[0].contains("max_recipient"), "{err}");
    }

    #[test]
    fn units() {
        assert_eq!(duration::parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration::parse("5m").unwrap(), Duration::from_secs(300));
        assert!(duration::parse("5 weeks").is_err());
        assert_eq!(duration::format(&Duration::from_secs(300)), "5m");
        assert_eq!(bytesize::parse("25MiB").unwrap(), 25 << 20);
        assert_eq!(bytesize::parse("100").unwrap(), 100);
        assert!(bytesize::parse("1x").is_err());
    }
}
