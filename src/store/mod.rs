//! The state store: everything the stateful defences remember (greylist entries,
//! auto-whitelist, failure counters, blocks, admin-managed list entries) behind one small
//! key-value trait with expiry and atomic counters. Backends: `memory` (tests, no
//! persistence), `sqlite` (embedded default, survives restarts) and `redis` (shared by a
//! cluster, with a local fallback when Redis is away). The checks own the meaning of the
//! values; the store only keeps strings.
//!
//! Shared conventions of every backend: TTLs count in whole milliseconds and are at least
//! 1 ms (a zero TTL thus means "expires at once", never "never"); an entry whose expiry time
//! has come is gone (`expires <= now`); counters are decimal `u64` strings and `incr` on a
//! value that is not one is a [`StoreError::Backend`]; `scan` orders keys by their bytes.

pub mod memory;
pub mod redis;
pub mod sqlite;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::policy::BoxFuture;

/// What a key belongs to; each namespace is stored apart (a table prefix, a Redis key
/// prefix) so admin listings and memory accounting stay per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ns {
    /// Greylist triplets.
    Grey,
    /// Auto-whitelisted networks and sender-domain/network tuples.
    Awl,
    /// Failure counters per client (reputation: tarpit, autoblacklist).
    Reputation,
    /// Blocked clients (autoblacklist, spam traps) with their reason.
    Block,
    /// Tarpitted clients.
    Tarpit,
    /// Admin-managed list entries (`list:NAME` keys hold one entry each).
    List,
}

impl Ns {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grey => "grey",
            Self::Awl => "awl",
            Self::Reputation => "rep",
            Self::Block => "block",
            Self::Tarpit => "tarpit",
            Self::List => "list",
        }
    }

    pub const ALL: [Ns; 6] = [Ns::Grey, Ns::Awl, Ns::Reputation, Ns::Block, Ns::Tarpit, Ns::List];
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored value and when it expires (`None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub value: String,
    pub expires: Option<SystemTime>,
}

/// Why the store could not answer. Checks turn this into a `CheckError`, so the pipeline's
/// `on_error` decides, never the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("state store error: {0}")]
    Backend(String),
}

/// The wall clock, injectable so expiry and embargo logic is tested without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock tests move by hand.
#[derive(Debug)]
pub struct ManualClock {
    /// Milliseconds since the epoch.
    now_ms: AtomicU64,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Arc<Self> {
        let ms = start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Arc::new(Self {
            now_ms: AtomicU64::new(ms),
        })
    }

    pub fn advance(&self, by: Duration) {
        self.now_ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.now_ms.load(Ordering::SeqCst))
    }
}

/// Health of a backend, for logs, metrics and the admin status page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    pub backend: &'static str,
    /// Serving from a local fallback because the shared backend is unreachable.
    pub degraded: bool,
    /// Operations that failed on the backend since start.
    pub errors: u64,
    pub last_error: Option<String>,
}

/// The operations every backend provides. All are atomic per key; none blocks a tokio
/// worker (SQLite runs on its own threads through sqlx, Redis is async).
pub trait Store: Send + Sync + fmt::Debug {
    /// The value of `key` unless it is missing or expired.
    fn get<'a>(&'a self, ns: Ns, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;

    /// Sets `key` to `value`, expiring after `ttl` (`None`: never).
    fn put<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        value: &'a str,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Sets `key` only when it is missing or expired; true when this call wrote it. Two
    /// nodes racing on a first greylist attempt thus agree on one first-seen time.
    fn put_if_absent<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        value: &'a str,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Removes `key`; true when it existed (and had not expired).
    fn delete<'a>(&'a self, ns: Ns, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Adds `by` to the counter at `key` and returns the new value. A counter that did not
    /// exist starts at 0 and expires `ttl` after this call created it (a fixed window);
    /// later increments keep that expiry. Atomic across nodes on a shared backend.
    fn incr<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        by: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Live entries whose key starts with `prefix`, at most `limit`, in key order.
    fn scan<'a>(
        &'a self,
        ns: Ns,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(String, Record)>, StoreError>>;

    fn health(&self) -> StoreHealth;
}

/// Which backend keeps the state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// An SQLite file: survives restarts; one node.
    #[default]
    Sqlite,
    /// Process memory: nothing survives a restart (tests, trying out).
    Memory,
    /// One Redis shared by a cluster of thassp nodes, with a local fallback.
    Redis,
}

impl StoreBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Memory => "memory",
            Self::Redis => "redis",
        }
    }
}

/// `[store]`: where the stateful defences (greylisting, reputation, blocks, traps) keep
/// what they remember. The backend is chosen at start-up; a reload does not switch it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (default: a local file, survives restarts), `memory` (nothing survives a
    /// restart) or `redis` (shared by several thassp nodes).
    pub backend: StoreBackend,
    /// The SQLite file (`backend = "sqlite"`), created when missing; relative paths are
    /// relative to the working directory. Default "thassp-state.db". SQLite adds
    /// `-wal` and `-shm` files beside it.
    pub path: PathBuf,
    /// The Redis server (`backend = "redis"`): `redis://[user:password@]host:port/db` or
    /// `redis+unix:///path/to/socket`. Default "redis://127.0.0.1:6379".
    pub redis_url: String,
    /// Prepended to every Redis key, so several deployments (or other applications) can
    /// share one Redis. Keys are `{redis_prefix}{namespace}:{key}`. Default "thassp:".
    pub redis_prefix: String,
    /// Longest wait for one Redis operation; past it the operation is answered from the
    /// local fallback and the store is degraded until Redis answers again. Default "250ms".
    #[serde(with = "crate::config::duration")]
    pub redis_timeout: Duration,
    /// Entries kept in memory. `memory`: the most entries the store holds (when full, the
    /// entries closest to expiry go first). `redis`: the size of the hot-path cache, of the
    /// local fallback copy and of the journal of writes made while Redis was away.
    /// Default 100000.
    pub cache_size: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sqlite,
            path: PathBuf::from("thassp-state.db"),
            redis_url: "redis://127.0.0.1:6379".to_string(),
            redis_prefix: "thassp:".to_string(),
            redis_timeout: Duration::from_millis(250),
            cache_size: 100_000,
        }
    }
}

impl StoreConfig {
    /// Every problem, each prefixed with `key` (the section's name, e.g. `store`). Settings
    /// of the backends not selected are checked too, so a typo shows before it matters.
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if self.path.as_os_str().is_empty() {
            errors.push(format!("{key}.path: must not be empty"));
        }
        if let Err(e) = ::redis::Client::open(self.redis_url.as_str()) {
            // The URL may carry a password: never echo it.
            errors.push(format!(
                "{key}.redis_url: not a usable Redis URL (redis://[user:password@]host:port/db): {e}"
            ));
        }
        if self.redis_prefix.len() > 64 || self.redis_prefix.chars().any(|c| c.is_control() || c == ' ') {
            errors.push(format!(
                "{key}.redis_prefix: at most 64 characters, no spaces or control characters"
            ));
        }
        if self.redis_timeout < Duration::from_millis(1) || self.redis_timeout > Duration::from_secs(10) {
            errors.push(format!("{key}.redis_timeout: must be between 1ms and 10s"));
        }
        if !(1..=10_000_000).contains(&self.cache_size) {
            errors.push(format!("{key}.cache_size: must be between 1 and 10000000"));
        }
        errors
    }
}

/// Opens the configured backend: creates or migrates the SQLite file, or connects to Redis.
/// A Redis that is down at start-up is no error: the store starts degraded (serving from its
/// local fallback) and catches up once Redis answers, so mail flows from the first second.
///
/// # Errors
///
/// What failed and where, for the operator: `store.path: cannot open "x.db": …` (the file
/// cannot be created, opened or migrated) or `store.redis_url: …` (the URL is unusable).
pub async fn open(config: &StoreConfig, clock: Arc<dyn Clock>) -> Result<Arc<dyn Store>, String> {
    match config.backend {
        StoreBackend::Memory => Ok(Arc::new(memory::MemoryStore::new(clock, config.cache_size))),
        StoreBackend::Sqlite => match sqlite::SqliteStore::open(&config.path, clock).await {
            Ok(store) => Ok(Arc::new(store)),
            Err(e) => Err(format!("store.path: cannot open {:?}: {e}", config.path)),
        },
        StoreBackend::Redis => {
            let store = redis::RedisStore::open(redis::RedisOptions::from_config(config), clock)
                .await
                .map_err(|e| format!("store.redis_url: {e}"))?;
            Ok(Arc::new(store))
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it), the unit every backend stores.
pub(crate) fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`epoch_ms`].
pub(crate) fn from_epoch_ms(ms: u64) -> SystemTime {
    // Checked: an absurd stored value must not panic the hot path.
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or_else(|| {
            // 9999-12-31T23:59:59Z: far enough to mean "does not expire in practice".
            SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(253_402_300_799))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        })
}

/// A TTL in whole milliseconds, at least 1 (see the module doc).
pub(crate) fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The expiry time in epoch milliseconds of an entry written at `now_ms` with `ttl`.
pub(crate) fn expiry_ms(now_ms: u64, ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|t| now_ms.saturating_add(ttl_ms(t)))
}
