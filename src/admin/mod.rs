//! Administration front ends over [`crate::service`]: the web UI and JSON API ([`web`]) and
//! the line console ([`console`]), their configuration (`[admin]`), and the authentication
//! both share: a bearer token and/or a user with a PBKDF2 password hash, with wrong
//! credentials counted and rate-limited per client address.
//!
//! # Password hashes
//!
//! `password_hash` is `pbkdf2-sha256$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA256 (ring),
//! `ITERATIONS` in decimal (at least [`MIN_ITERATIONS`]; [`DEFAULT_ITERATIONS`] when made by
//! [`hash_password`]), `SALT` (16 random bytes) and `HASH` (32 bytes) in standard base64
//! without padding. Example for the password `secret`, 600000 iterations:
//! `pbkdf2-sha256$600000$c2FsdHNhbHRzYWx0c2FsdA$…`.
//!
//! # Secrets
//!
//! The token and the password hash never appear in logs (`AdminConfig`'s `Debug` hides
//! them) nor in configuration views (the service redacts `token` and `password_hash`).

pub mod console;
pub mod web;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::app::App;
use crate::config::duration;
use crate::service::Service;

/// Fewest PBKDF2 iterations a configured hash may use.
pub const MIN_ITERATIONS: u32 = 10_000;
/// Iterations [`hash_password`] uses (OWASP's 2023 advice for PBKDF2-HMAC-SHA256).
pub const DEFAULT_ITERATIONS: u32 = 600_000;
/// The hash format's tag.
const HASH_SCHEME: &str = "pbkdf2-sha256";
/// Client addresses whose failures are remembered at once; beyond, expired windows are
/// swept and, if none are, the oldest goes (memory stays bounded under a spray of
/// addresses; loopback binding makes that unlikely anyway).
const MAX_TRACKED_CLIENTS: usize = 4096;
/// The rate-limit window for wrong credentials.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// A verified user+password is remembered this long, so a browser sending Basic
/// credentials with every request does not cost a PBKDF2 run per request.
const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// Verified credentials remembered at most.
const VERIFIED_MAX: usize = 64;

/// `[admin]`: the web UI/JSON API, the line console and `/metrics`.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin interfaces. Default false.
    pub enabled: bool,
    /// The web UI, JSON API and `/metrics` (`ip:port`). Keep it on loopback or a management
    /// network: it can change lists and reload the configuration. Default "127.0.0.1:8025".
    pub listen: String,
    /// The line console (`ip:port`), e.g. "127.0.0.1:8026". Default "" (no console).
    pub console_listen: String,
    /// Bearer token (`Authorization: Bearer TOKEN`; at the console's `password:` prompt,
    /// the token itself). At least 16 characters, no spaces. Secret: never logged, redacted
    /// in configuration views. Default "" (no token login).
    pub token: String,
    /// User name for HTTP Basic and the console (`USER PASSWORD` at the prompt). Default
    /// "admin".
    pub user: String,
    /// PBKDF2 hash of the user's password (see the module docs for the format). Default ""
    /// (no password login). At least one of `token` and `password_hash` must be set.
    pub password_hash: String,
    /// Wrong credentials per client address and minute before it gets `429` (web) or is
    /// disconnected (console) for the rest of the minute. Default 5.
    pub max_auth_failures: u32,
    /// Serve `/metrics` without credentials (for a Prometheus on the same host). Default
    /// false.
    pub metrics_public: bool,
    /// A console session silent this long is closed. Default "5m".
    #[serde(with = "duration")]
    pub console_idle_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: "127.0.0.1:8025".into(),
            console_listen: String::new(),
            token: String::new(),
            user: "admin".into(),
            password_hash: String::new(),
            max_auth_failures: 5,
            metrics_public: false,
            console_idle_timeout: Duration::from_secs(300),
        }
    }
}

impl std::fmt::Debug for AdminConfig {
    // By hand: the derived Debug would print the token and the hash into any log line that
    // formats the configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hide = |s: &str| {
            if s.is_empty() {
                ""
            } else {
                crate::service::REDACTED
            }
        };
        f.debug_struct("AdminConfig")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("console_listen", &self.console_listen)
            .field("token", &hide(&self.token))
            .field("user", &self.user)
            .field("password_hash", &hide(&self.password_hash))
            .field("max_auth_failures", &self.max_auth_failures)
            .field("metrics_public", &self.metrics_public)
            .field("console_idle_timeout", &self.console_idle_timeout)
            .finish()
    }
}

impl AdminConfig {
    /// Every problem, each prefixed with `key` (`admin`). Messages never quote secrets.
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if self.listen.parse::<SocketAddr>().is_err() {
            errors.push(format!("{key}.listen: {:?} is not an ip:port", self.listen));
        }
        if !self.console_listen.is_empty() && self.console_listen.parse::<SocketAddr>().is_err() {
            errors.push(format!(
                "{key}.console_listen: {:?} is not an ip:port (or \"\" for no console)",
                self.console_listen
            ));
        }
        if !self.token.is_empty()
            && (self.token.chars().count() < 16
                || self.token.len() > 512
                || self.token.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            errors.push(format!(
                "{key}.token: at least 16 and at most 512 characters, no spaces or control characters"
            ));
        }
        if !self.password_hash.is_empty() {
            if let Err(e) = PasswordHash::parse(&self.password_hash) {
                errors.push(format!("{key}.password_hash: {e}"));
            }
            if self.user.is_empty()
                || self.user.len() > 64
                || self
                    .user
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == ':')
            {
                errors.push(format!(
                    "{key}.user: 1 to 64 characters, no spaces, control characters or ':'"
                ));
            }
        }
        if self.enabled && self.token.is_empty() && self.password_hash.is_empty() {
            errors.push(format!(
                "{key}: set token and/or password_hash (every admin request needs credentials)"
            ));
        }
        if !(1..=1000).contains(&self.max_auth_failures) {
            errors.push(format!("{key}.max_auth_failures: must be between 1 and 1000"));
        }
        if self.console_idle_timeout < Duration::from_secs(1)
            || self.console_idle_timeout > Duration::from_secs(86400)
        {
            errors.push(format!("{key}.console_idle_timeout: must be between 1s and 1d"));
        }
        errors
    }
}

// ---------------------------------------------------------------------------------------
// Password hashes

/// A parsed `pbkdf2-sha256$…` hash.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHash")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl PasswordHash {
    /// Parses the format in the module docs.
    ///
    /// # Errors
    /// What is wrong with it (never quoting it).
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
        let mut parts = text.trim().split('$');
        let (Some(scheme), Some(iter), Some(salt), Some(hash), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(format!(
                "expected {HASH_SCHEME}$ITERATIONS$SALT$HASH (see `thassp` docs, [admin])"
            ));
        };
        if scheme != HASH_SCHEME {
            return Err(format!("unknown scheme (only {HASH_SCHEME})"));
        }
        let iterations = iter
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= MIN_ITERATIONS)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| format!("iterations must be a number of at least {MIN_ITERATIONS}"))?;
        let salt = b64
            .decode(salt.trim_end_matches('='))
            .map_err(|_| "the salt is not base64".to_string())?;
        let hash = b64
            .decode(hash.trim_end_matches('='))
            .map_err(|_| "the hash is not base64".to_string())?;
        if salt.len() < 8 {
            return Err("the salt must be at least 8 bytes".into());
        }
        if hash.len() != 32 {
            return Err("the hash must be 32 bytes (SHA-256)".into());
        }
        Ok(Self {
            iterations,
            salt,
            hash,
        })
    }

    /// Whether `password` matches (constant time in the comparison).
    pub fn verify(&self, password: &str) -> bool {
        ring::pbkdf2::verify(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            self.iterations,
            &self.salt,
            password.as_bytes(),
            &self.hash,
        )
        .is_ok()
    }
}

/// Hashes a password for `admin.password_hash` with a random salt.
///
/// # Errors
/// When the system's random source fails.
pub fn hash_password(password: &str, iterations: u32) -> Result<String, String> {
    use ring::rand::SecureRandom as _;
    let iterations = NonZeroU32::new(iterations.max(MIN_ITERATIONS)).ok_or("iterations")?;
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| "the system random source failed".to_string())?;
    let mut hash = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &salt,
        password.as_bytes(),
        &mut hash,
    );
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    Ok(format!(
        "{HASH_SCHEME}${iterations}${}${}",
        b64.encode(salt),
        b64.encode(hash)
    ))
}

// ---------------------------------------------------------------------------------------
// Authentication

/// Credentials a front end received.
pub enum Credentials<'a> {
    /// No credentials at all (a browser's first request): not counted as a failure.
    None,
    /// A bearer token (HTTP) or a console line that is the token.
    Token(&'a str),
    /// HTTP Basic or a console `USER PASSWORD` line.
    UserPassword { user: &'a str, password: &'a str },
    /// A console line: the token, `USER PASSWORD`, or the configured user's password.
    ConsoleLine(&'a str),
}

/// What [`Auth::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Ok,
    /// No credentials were given (ask for them).
    Missing,
    /// Wrong credentials (counted).
    Wrong,
    /// Too many wrong credentials from this client this minute: refused without looking.
    Limited,
}

/// Failures of one client in the current window.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

/// The shared authenticator of the web UI, the API and the console.
pub struct Auth {
    token: Option<String>,
    user: String,
    password: Option<PasswordHash>,
    max_failures: u32,
    /// `/metrics` without credentials.
    pub metrics_public: bool,
    failures: Mutex<HashMap<IpAddr, Window>>,
    /// SHA-256 of `user:password` pairs verified recently, with their expiry.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    /// Wrong credentials since start (exported as `thassp_admin_auth_failures_total`).
    pub failures_total: Counter,
    /// Requests refused by the rate limit (`thassp_admin_auth_limited_total`).
    pub limited_total: Counter,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token.is_some())
            .field("user", &self.user)
            .field("password", &self.password.is_some())
            .field("max_failures", &self.max_failures)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// The authenticator for a validated configuration. An invalid password hash disables
    /// password login (validation reports it before this runs).
    pub fn new(config: &AdminConfig) -> Self {
        Self {
            token: Some(config.token.clone()).filter(|t| !t.is_empty()),
            user: config.user.clone(),
            password: PasswordHash::parse(&config.password_hash).ok(),
            max_failures: config.max_auth_failures.max(1),
            metrics_public: config.metrics_public,
            failures: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
            failures_total: Counter::default(),
            limited_total: Counter::default(),
        }
    }

    /// Checks credentials from `client`. Wrong ones are counted; a client over the limit is
    /// refused before its credentials are looked at (so guessing stops for the minute).
    pub async fn check(&self, client: IpAddr, creds: Credentials<'_>) -> AuthOutcome {
        if self.limited(client) {
            self.limited_total.inc();
            return AuthOutcome::Limited;
        }
        let ok = match creds {
            Credentials::None => return AuthOutcome::Missing,
            Credentials::Token(t) => self.token_matches(t),
            Credentials::UserPassword { user, password } => self.password_matches(user, password).await,
            Credentials::ConsoleLine(line) => {
                let line = line.trim_end_matches(['\r', '\n']);
                if self.token_matches(line) {
                    true
                } else if let Some((user, password)) = line.split_once(' ')
                    && user == self.user
                {
                    self.password_matches(user, password).await
                } else {
                    let user = self.user.clone();
                    self.password_matches(&user, line).await
                }
            }
        };
        if ok {
            AuthOutcome::Ok
        } else {
            self.record_failure(client);
            self.failures_total.inc();
            warn!(client = %client, "Admin login failed.");
            AuthOutcome::Wrong
        }
    }

    /// Whether `client` is over the failure limit right now.
    pub fn limited(&self, client: IpAddr) -> bool {
        let key = client_key(client);
        let Ok(map) = self.failures.lock() else {
            return false;
        };
        map.get(&key)
            .is_some_and(|w| w.start.elapsed() < FAILURE_WINDOW && w.failures >= self.max_failures)
    }

    fn record_failure(&self, client: IpAddr) {
        let key = client_key(client);
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        let now = Instant::now();
        if map.len() >= MAX_TRACKED_CLIENTS && !map.contains_key(&key) {
            map.retain(|_, w| now.duration_since(w.start) < FAILURE_WINDOW);
            if map.len() >= MAX_TRACKED_CLIENTS
                && let Some(oldest) = map.iter().min_by_key(|(_, w)| w.start).map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
        }
        let w = map.entry(key).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now.duration_since(w.start) >= FAILURE_WINDOW {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }

    fn token_matches(&self, given: &str) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        // Compare digests: equal length whatever was sent, and a fold without early exit.
        let a = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let b = ring::digest::digest(&ring::digest::SHA256, given.as_bytes());
        a.as_ref()
            .iter()
            .zip(b.as_ref())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }

    async fn password_matches(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.password.clone() else {
            return false;
        };
        if user != self.user || password.len() > 1024 {
            return false;
        }
        let mut id = [0u8; 32];
        let d = ring::digest::digest(&ring::digest::SHA256, format!("{user}:{password}").as_bytes());
        id.copy_from_slice(d.as_ref());
        if let Ok(mut v) = self.verified.lock() {
            let now = Instant::now();
            match v.get(&id) {
                Some(until) if *until > now => return true,
                Some(_) => {
                    v.remove(&id);
                }
                None => {}
            }
        }
        // PBKDF2 is deliberately slow: off the async workers.
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || hash.verify(&password))
            .await
            .unwrap_or(false);
        if ok && let Ok(mut v) = self.verified.lock() {
            let now = Instant::now();
            v.retain(|_, until| *until > now);
            if v.len() < VERIFIED_MAX {
                v.insert(id, now + VERIFIED_TTL);
            }
        }
        ok
    }
}

/// Failures are counted per address, IPv6 per /64 (one host usually has a whole /64).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut s = v6.segments();
            s[4..].fill(0);
            IpAddr::from(s)
        }
        v4 => v4,
    }
}

// ---------------------------------------------------------------------------------------
// Start

/// The running admin servers.
#[derive(Debug)]
pub struct AdminHandle {
    /// The web UI/API address (the real port when 0 was configured); `None` when disabled.
    pub web_addr: Option<SocketAddr>,
    /// The console address; `None` when `console_listen` is empty or admin is disabled.
    pub console_addr: Option<SocketAddr>,
    tracker: TaskTracker,
}

impl AdminHandle {
    /// Waits until the servers have stopped (after `stop` was cancelled): the web server
    /// finishes requests in flight, console sessions end at once.
    pub async fn stopped(self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Starts the web UI/API (and the console when `console_listen` is set) if `enabled`.
/// `config_path` is the file an API reload re-reads (the one `thassp run` was given).
/// Everything stops when `stop` is cancelled.
///
/// # Errors
/// When an address cannot be bound; the message names the key.
pub async fn start(
    app: Arc<App>,
    config: &AdminConfig,
    config_path: Option<PathBuf>,
    stop: CancellationToken,
) -> Result<AdminHandle, String> {
    let tracker = TaskTracker::new();
    if !config.enabled {
        return Ok(AdminHandle {
            web_addr: None,
            console_addr: None,
            tracker,
        });
    }
    let service = Arc::new(Service::new(app, config_path));
    let auth = Arc::new(Auth::new(config));
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|e| format!("admin.listen: cannot listen on {}: {e}", config.listen))?;
    let web_addr = listener.local_addr().map_err(|e| format!("admin.listen: {e}"))?;
    let console = if config.console_listen.is_empty() {
        None
    } else {
        Some(TcpListener::bind(&config.console_listen).await.map_err(|e| {
            format!(
                "admin.console_listen: cannot listen on {}: {e}",
                config.console_listen
            )
        })?)
    };
    let router = web::router_with(service.clone(), auth.clone());
    let web_stop = stop.clone();
    tracker.spawn(async move {
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(web_stop.cancelled_owned())
        .await;
        if let Err(e) = served {
            warn!(error = %e, "Admin web server stopped.");
        }
    });
    if !web_addr.ip().is_loopback() {
        warn!(address = %web_addr, "Admin web interface listens beyond loopback; protect it.");
    }
    info!(address = %web_addr, "Admin web interface and API listening.");
    let mut console_addr = None;
    if let Some(listener) = console {
        let addr = listener
            .local_addr()
            .map_err(|e| format!("admin.console_listen: {e}"))?;
        console_addr = Some(addr);
        info!(address = %addr, "Admin console listening.");
        let console = console::Console::new(service, auth, config.console_idle_timeout);
        tracker.spawn(console.serve(listener, stop));
    }
    Ok(AdminHandle {
        web_addr: Some(web_addr),
        console_addr,
        tracker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip() {
        let h = hash_password("correct horse", MIN_ITERATIONS).unwrap();
        assert!(h.starts_with("pbkdf2-sha256$10000$"));
        let p = PasswordHash::parse(&h).unwrap();
        assert!(p.verify("correct horse"));
        assert!(!p.verify("correct horse "));
        assert!(PasswordHash::parse("pbkdf2-sha256$10$c2FsdHNhbHQ$AAAA").is_err());
        assert!(PasswordHash::parse("md5$1$2$3").is_err());
        assert!(PasswordHash::parse("").is_err());
    }

    #[test]
    fn config_validation_and_debug() {
        let c = AdminConfig {
            enabled: true,
            ..Default::default()
        };
        assert_eq!(c.validate("admin").len(), 1, "{:?}", c.validate("admin"));
        let c = AdminConfig {
            enabled: true,
            token: "0123456789abcdef-secret".into(),
            ..Default::default()
        };
        assert!(c.validate("admin").is_empty());
        assert!(!format!("{c:?}").contains("secret"));
        let c = AdminConfig {
            token: "short".into(),
            listen: "nowhere".into(),
            ..Default::default()
        };
        let errors = c.validate("admin").join("\n");
        assert!(
            errors.contains("admin.token") && errors.contains("admin.listen"),
            "{errors}"
        );
        assert!(!errors.contains("short"));
    }

    #[tokio::test]
    async fn wrong_credentials_are_limited() {
        let auth = Auth::new(&AdminConfig {
            token: "0123456789abcdef".into(),
            max_auth_failures: 2,
            ..Default::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(auth.check(ip, Credentials::None).await, AuthOutcome::Missing);
        assert_eq!(
            auth.check(ip, Credentials::Token("nope")).await,
            AuthOutcome::Wrong
        );
        assert_eq!(
            auth.check(ip, Credentials::Token("0123456789abcdef")).await,
            AuthOutcome::Ok
        );
        assert_eq!(
            auth.check(ip, Credentials::Token("nope")).await,
            AuthOutcome::Wrong
        );
        // Over the limit: even the right token is refused for the rest of the minute.
        assert_eq!(
            auth.check(ip, Credentials::Token("0123456789abcdef")).await,
            AuthOutcome::Limited
        );
        assert_eq!(
            auth.check(other, Credentials::Token("0123456789abcdef")).await,
            AuthOutcome::Ok
        );
        assert_eq!(auth.failures_total.get(), 2);
    }
}
