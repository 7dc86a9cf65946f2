//! The Redis backend: one Redis shared by a cluster of thassp nodes, so a greylist pass seen
//! by one node is honoured by every node, a block made by one node holds on every node, and
//! failure counters add up across nodes.
//!
//! # Keys and memory
//!
//! Every entry is one Redis string `{prefix}{ns}:{key}` (e.g. `thassp:grey:…`,
//! `thassp:block:192.0.2.7`), written with `PX` when it has a TTL, so Redis forgets expired
//! state by itself and its memory is bounded by the TTLs the checks choose. Expiry is
//! Redis's own (the injected clock does not apply to Redis); `Record::expires` is the
//! clock's now plus the key's `PTTL`.
//!
//! Redis needs about 40–50 bytes of its own per key (dict entry, object headers) plus
//! about 30 for the TTL entry, plus the key and value bytes, rounded up by jemalloc.
//! Measured with `MEMORY USAGE` on Redis 7.0 (which leaves out the TTL entry), with the
//! default prefix:
//!
//! | entry | key + value | `MEMORY USAGE` | with TTL entry |
//! |---|---|---|---|
//! | greylist triplet (`grey`: network, sender, recipient → first-seen ms) | 82 + 13 B | 136 B | ~170 B |
//! | auto-whitelisted network (`awl`: `203.0.113.0/24` → `1`) | 25 + 1 B | 72 B | ~100 B |
//! | auto-whitelisted domain/network tuple (`awl`) | 37 + 1 B | 88 B | ~120 B |
//! | failure counter (`rep`: IPv6 + window bucket → integer) | 41 B + int | 88 B | ~120 B |
//! | block (`block`: IP → a 47-byte reason) | 23 + 47 B | 136 B | ~170 B |
//!
//! So a million greylist triplets take about 170 MB. Give Redis a `maxmemory` with room to
//! spare and the `volatile-ttl` policy: if it ever fills up, the entries closest to expiry
//! go first (every entry the checks write has a TTL; admin list entries may not, and are
//! then never evicted).
//!
//! # Operations
//!
//! `get` is `GET` + `PTTL` in one `MULTI`; `put` is `SET … PX`; `put_if_absent` is
//! `SET … NX PX` (two nodes racing on a first attempt agree on one first-seen time);
//! `delete` is `DEL`; `incr` is a small Lua script (`INCRBY`, and `PEXPIRE` only when it
//! created the key), atomic on the server: no read-modify-write races between nodes;
//! `scan` is `SCAN MATCH` bounded in keys examined and time (see [`SCAN_MAX_KEYS`]). Every
//! round trip is bounded by `redis_timeout`.
//!
//! # Hot-path cache
//!
//! Reads of `block` and `awl` keys (asked on every connection and recipient) are served from
//! an in-process cache for up to `hot_cache_ttl` (5 s by default), including "absent"
//! answers. This node's own writes invalidate it at once; **another node's block, unblock or
//! whitelisting reaches this node up to 5 s late**. Greylist, counter and list reads always
//! go to Redis, because their correctness (first-seen times, counts) depends on it.
//!
//! # Degraded mode (Redis down or slow)
//!
//! Mail must keep flowing. When a Redis round trip fails or times out, the store marks itself
//! degraded ([`Store::health`]), logs once, and from then on answers every operation from a
//! local [`MemoryStore`] without waiting for Redis again. That local copy is kept warm while
//! Redis is healthy: every value this node reads or writes is mirrored into it (bounded by
//! `cache_size`, closest-to-expiry first out), so blocks and whitelistings this node has seen
//! recently still hold. Writes made while degraded go to the local copy and to a journal
//! holding one pending operation per key (bounded by `cache_size` keys; writes to new keys
//! past that are applied locally only, and counted). A background task pings Redis every
//! `probe_interval`; once it answers, the journal is replayed: puts and deletes as such,
//! counters by adding this node's local increments to whatever the cluster counted meanwhile
//! (if their window has not ended), `put_if_absent` with `NX` (only if still absent, so
//! another node's first-seen time wins). Then the store leaves degraded mode and logs once.
//! A server-side error about the data itself (a counter that is not one) is returned to the
//! caller and does not degrade the store.
//!
//! While degraded, nodes do not see each other's writes, and two nodes may each greylist
//! a triplet with their own first-seen time; both converge after the replay.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, RedisResult};

use super::memory::{Entry, MemoryStore};
use super::{
    Clock, Ns, Record, Store, StoreConfig, StoreError, StoreHealth, epoch_ms, from_epoch_ms, ttl_ms,
};
use crate::policy::BoxFuture;

/// `scan` stops collecting after this many matching keys (then returns the first `limit`
/// of those in key order): an admin listing must not walk a huge shared keyspace forever.
pub const SCAN_MAX_KEYS: usize = 100_000;
/// Keys per `SCAN` round trip (a hint to Redis).
const SCAN_COUNT: usize = 1_000;
/// A whole `scan` may take this many `redis_timeout`s (each round trip takes at most one).
const SCAN_TIMEOUTS: u32 = 8;
/// Journal entries replayed between two checks of the journal lock.
const REPLAY_BATCH: usize = 256;

/// `incr`: refuses a value that is not a decimal counter, adds, sets the window's expiry only
/// when this call created the key, and returns the new value with the remaining TTL.
const INCR_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v and not string.match(v, '^%d+$') then
  return redis.error_reply('NOTCOUNTER value is not a counter')
end
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if not v and tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {n, redis.call('PTTL', KEYS[1])}
";

/// Run-time settings of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://…` or `redis+unix://…`.
    pub url: String,
    /// Prepended to every key.
    pub prefix: String,
    /// Bound of each round trip to Redis.
    pub timeout: Duration,
    /// Entries of the hot cache, of the local fallback copy, and keys of the journal.
    pub cache_size: usize,
    /// How often a degraded store asks Redis whether it is back. Default 500 ms.
    pub probe_interval: Duration,
    /// How long a `block`/`awl` read may be answered from the hot cache. Default 5 s.
    pub hot_cache_ttl: Duration,
}

impl RedisOptions {
    /// The options of a `[store]` section, with the default probe interval and cache TTL.
    pub fn from_config(config: &StoreConfig) -> Self {
        Self {
            url: config.redis_url.clone(),
            prefix: config.redis_prefix.clone(),
            timeout: config.redis_timeout,
            cache_size: config.cache_size,
            probe_interval: Duration::from_millis(500),
            hot_cache_ttl: Duration::from_secs(5),
        }
    }
}

/// A write made while degraded, waiting to be replayed to Redis. One per key: later writes
/// to the same key merge into it (see [`merge`]). Expiry times are epoch milliseconds of the
/// local clock.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Delete,
    Put {
        value: String,
        expires_ms: Option<u64>,
    },
    PutIfAbsent {
        value: String,
        expires_ms: Option<u64>,
    },
    /// `by` added locally to a counter whose window ends at `expires_ms`.
    Incr {
        by: u64,
        expires_ms: Option<u64>,
    },
}

/// The one pending operation equivalent to `earlier` followed by `later` on the same key.
fn merge(earlier: Pending, later: Pending) -> Pending {
    use Pending::*;
    match (earlier, later) {
        (_, later @ (Delete | Put { .. })) => later,
        // Locally the key was absent (deleted, or its value expired): after a delete or put
        // the replay must overwrite what Redis may hold from before; otherwise only fill a gap.
        (Delete | Put { .. }, PutIfAbsent { value, expires_ms }) => Put { value, expires_ms },
        (_, later @ PutIfAbsent { .. }) => later,
        // The same window: the increments add up. A different one: the earlier window ended.
        (
            Incr {
                by: a,
                expires_ms: e1,
            },
            Incr {
                by: b,
                expires_ms: e2,
            },
        ) if e1 == e2 => Incr {
            by: a.saturating_add(b),
            expires_ms: e2,
        },
        (
            Put {
                value,
                expires_ms: e1,
            },
            Incr { by, expires_ms: e2 },
        ) if e1 == e2 => match value.parse::<u64>() {
            Ok(n) => Put {
                value: n.saturating_add(by).to_string(),
                expires_ms: e2,
            },
            Err(_) => Incr { by, expires_ms: e2 },
        },
        (
            PutIfAbsent {
                value,
                expires_ms: e1,
            },
            Incr { by, expires_ms: e2 },
        ) if e1 == e2 => match value.parse::<u64>() {
            Ok(n) => PutIfAbsent {
                value: n.saturating_add(by).to_string(),
                expires_ms: e2,
            },
            Err(_) => Incr { by, expires_ms: e2 },
        },
        // After a delete the increment created the counter afresh: its value is `by`.
        (Delete, Incr { by, expires_ms }) => Put {
            value: by.to_string(),
            expires_ms,
        },
        (_, later @ Incr { .. }) => later,
    }
}

/// Why a Redis round trip gave no answer.
enum Failure {
    /// Redis is unreachable, slow or not serving (I/O, timeout, LOADING, READONLY, …):
    /// degrade and answer locally. `timed_out` asks for a fresh connection.
    Down { message: String, timed_out: bool },
    /// Redis answered, but about the data (a counter that is not one): the caller's error.
    Data(String),
}

fn classify(e: &RedisError) -> Failure {
    let data = matches!(e.code(), Some("NOTCOUNTER" | "WRONGTYPE"))
        || e.kind() == ErrorKind::UnexpectedReturnType
        || (e.code() == Some("ERR")
            && e.detail()
                .is_some_and(|d| d.contains("not an integer") || d.contains("overflow")));
    if data {
        Failure::Data(e.to_string())
    } else {
        Failure::Down {
            message: e.to_string(),
            timed_out: e.is_timeout(),
        }
    }
}

/// Writes made while degraded, and whether the store is degraded. One lock for both, so a
/// write cannot land in the journal after the recovery found it empty and left degraded mode.
#[derive(Debug, Default)]
struct Journal {
    degraded: bool,
    pending: HashMap<(Ns, String), Pending>,
    /// Writes applied locally but not journalled because the journal was full, this episode.
    dropped: u64,
    since: Option<Instant>,
}

/// The Redis store; see the module documentation.
pub struct RedisStore {
    inner: Arc<Inner>,
    _recovery: AbortOnDrop,
}

/// Aborts the recovery task with the store: the task holds the store's internals.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Inner {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    /// Replaced by a fresh one when a probe times out: a connection that hangs (rather than
    /// fails) is never given up by the manager itself.
    manager: RwLock<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    probe_interval: Duration,
    clock: Arc<dyn Clock>,
    /// This node's copy: mirrored while healthy, authoritative while degraded.
    local: MemoryStore,
    hot: moka::future::Cache<(Ns, String), Option<Entry>>,
    /// Bumped by every write to a hot-cached namespace: a read that started before a write
    /// must not put its (older) answer into the cache after the write invalidated it.
    hot_generation: AtomicU64,
    journal: Mutex<Journal>,
    journal_capacity: usize,
    /// Mirror of `journal.degraded` for the lock-free check on every operation.
    degraded: AtomicBool,
    errors: AtomicU64,
    journal_dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
    incr_script: redis::Script,
    /// One recovery at a time (the background task and [`RedisStore::recover`]), so the
    /// replay of a key's journalled writes is never reordered.
    recovering: tokio::sync::Mutex<()>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("degraded", &self.inner.degraded.load(Ordering::Relaxed))
            .field("local", &self.inner.local)
            .finish_non_exhaustive()
    }
}

fn hot_cached(ns: Ns) -> bool {
    matches!(ns, Ns::Block | Ns::Awl)
}

/// Escapes `*?[]\` for a `SCAN MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections are single map or field updates; a poisoned lock is still coherent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RedisStore {
    /// Connects to Redis. A Redis that does not answer is no error: the store starts
    /// degraded and catches up when Redis is back.
    ///
    /// # Errors
    ///
    /// The URL is unusable.
    pub async fn open(options: RedisOptions, clock: Arc<dyn Clock>) -> Result<Self, String> {
        let client = redis::Client::open(options.url.as_str())
            .map_err(|e| format!("{:?} is not a usable Redis URL: {e}", options.url))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            // Few, short retries inside the manager: the store's own probe does the waiting,
            // and a long back-off would delay noticing that Redis is back.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
            .map_err(|e| format!("{:?}: {e}", options.url))?;
        let cache_size = options.cache_size.max(1);
        let inner = Arc::new(Inner {
            client,
            manager_config,
            manager: RwLock::new(manager),
            prefix: options.prefix,
            timeout: options.timeout,
            probe_interval: options.probe_interval,
            local: MemoryStore::new(clock.clone(), cache_size),
            clock,
            hot: moka::future::Cache::builder()
                .max_capacity(cache_size as u64)
                .time_to_live(options.hot_cache_ttl)
                .build(),
            hot_generation: AtomicU64::new(0),
            journal: Mutex::new(Journal::default()),
            journal_capacity: cache_size,
            degraded: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            journal_dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
            incr_script: redis::Script::new(INCR_SCRIPT),
            recovering: tokio::sync::Mutex::new(()),
        });
        if let Err(Failure::Down { message, .. } | Failure::Data(message)) = inner
            .remote(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
        {
            inner.enter_degraded(message);
        }
        let recovery = tokio::spawn(recovery_loop(inner.clone()));
        Ok(Self {
            inner,
            _recovery: AbortOnDrop(recovery),
        })
    }

    /// Writes waiting in the journal for Redis to come back.
    pub fn journal_len(&self) -> usize {
        lock(&self.inner.journal).pending.len()
    }

    /// Writes applied only locally since start because the journal was full.
    pub fn journal_dropped(&self) -> u64 {
        self.inner.journal_dropped.load(Ordering::Relaxed)
    }

    /// Asks Redis now whether it is back and, if so, replays the journal and leaves degraded
    /// mode (the background task does this every `probe_interval`). True when healthy.
    pub async fn recover(&self) -> bool {
        self.inner.try_recover().await
    }
}

async fn recovery_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if inner.degraded.load(Ordering::Acquire) {
            inner.try_recover().await;
        }
    }
}

impl Inner {
    fn redis_key(&self, ns: Ns, key: &str) -> String {
        format!("{}{}:{}", self.prefix, ns.as_str(), key)
    }

    fn now_ms(&self) -> u64 {
        epoch_ms(self.clock.now())
    }

    /// The expiry (local epoch ms) of a key whose `PTTL` is `pttl`; `Err(())` for a key that
    /// does not exist (-2).
    fn expiry_from_pttl(&self, pttl: i64) -> Result<Option<u64>, ()> {
        match pttl {
            -2 => Err(()),
            p if p < 0 => Ok(None),
            p => Ok(Some(self.now_ms().saturating_add(p.unsigned_abs()))),
        }
    }

    fn connection(&self) -> ConnectionManager {
        self.manager
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs one round trip on a connection, bounded by the timeout.
    async fn remote<T, F, Fut>(&self, f: F) -> Result<T, Failure>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        match tokio::time::timeout(self.timeout, f(self.connection())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Failure::Down {
                message: format!("no answer from Redis within {:?}", self.timeout),
                timed_out: true,
            }),
        }
    }

    fn note_error(&self, message: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(message.to_owned());
    }

    fn enter_degraded(&self, message: String) {
        self.note_error(&message);
        self.mark_degraded(&mut lock(&self.journal), &message);
    }

    /// The one place degraded mode starts, and the one log line for it.
    fn mark_degraded(&self, journal: &mut Journal, why: &str) {
        if !journal.degraded {
            journal.degraded = true;
            journal.since = Some(Instant::now());
            self.degraded.store(true, Ordering::Release);
            tracing::warn!(
                error = %why,
                "State store: Redis is unreachable; answering from the local copy and journalling writes until it is back."
            );
        }
    }

    /// A remote failure of an operation: `Some(error)` for the caller when it is about the
    /// data, `None` (after degrading) when the caller should answer locally.
    fn failed(&self, failure: Failure) -> Option<StoreError> {
        match failure {
            Failure::Data(message) => {
                self.note_error(&message);
                Some(StoreError::Backend(message))
            }
            Failure::Down { message, .. } => {
                self.enter_degraded(message);
                None
            }
        }
    }

    /// Applies a write locally and journals it, if (still) degraded; `None` when a recovery
    /// finished meanwhile and the caller should try Redis again. With `force` the store is
    /// put back into degraded mode instead, so the write is never lost.
    fn local_write<T>(
        &self,
        ns: Ns,
        key: &str,
        force: bool,
        apply: impl FnOnce(&MemoryStore) -> (T, Option<Pending>),
    ) -> Option<T> {
        let mut journal = lock(&self.journal);
        if !journal.degraded {
            if !force {
                return None;
            }
            self.mark_degraded(&mut journal, "Redis failed right after recovering");
        }
        let (result, pending) = apply(&self.local);
        if let Some(op) = pending {
            let slot = (ns, key.to_owned());
            if let Some(old) = journal.pending.remove(&slot) {
                journal.pending.insert(slot, merge(old, op));
            } else if journal.pending.len() < self.journal_capacity {
                journal.pending.insert(slot, op);
            } else {
                journal.dropped += 1;
                self.journal_dropped.fetch_add(1, Ordering::Relaxed);
                if journal.dropped == 1 {
                    tracing::warn!(
                        capacity = self.journal_capacity,
                        "State store: the journal of writes for Redis is full; further writes to new keys stay local."
                    );
                }
            }
        }
        Some(result)
    }

    async fn invalidate_hot(&self, ns: Ns, key: &str) {
        if hot_cached(ns) {
            self.hot_generation.fetch_add(1, Ordering::AcqRel);
            self.hot.invalidate(&(ns, key.to_owned())).await;
        }
    }

    /// One write: to Redis (mirrored into the local copy) unless degraded, else locally and
    /// journalled. `remote` may be called more than once (only after a failure).
    async fn write<T, F, Fut>(
        &self,
        ns: Ns,
        key: &str,
        remote: F,
        local: impl Fn(&MemoryStore) -> (Result<T, StoreError>, Option<Pending>),
    ) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<(T, Mirror)>>,
    {
        // Before, so no read served from the cache overlaps the write; after, because a read
        // that began before the write may have cached the old value meanwhile.
        self.invalidate_hot(ns, key).await;
        let result = self.write_through(ns, key, remote, local).await;
        self.invalidate_hot(ns, key).await;
        result
    }

    async fn write_through<T, F, Fut>(
        &self,
        ns: Ns,
        key: &str,
        remote: F,
        local: impl Fn(&MemoryStore) -> (Result<T, StoreError>, Option<Pending>),
    ) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<(T, Mirror)>>,
    {
        // At most one round trip per operation, so the operation is bounded by one timeout.
        let mut tried = false;
        loop {
            if !tried && !self.degraded.load(Ordering::Acquire) {
                tried = true;
                match self.remote(&remote).await {
                    Ok((result, mirror)) => {
                        match mirror {
                            Mirror::Set { value, expires_ms } => {
                                self.local.insert_entry(ns, key, &value, expires_ms)
                            }
                            Mirror::Remove => {
                                self.local.remove(ns, key);
                            }
                            Mirror::Keep => {}
                        }
                        return Ok(result);
                    }
                    Err(f) => {
                        if let Some(e) = self.failed(f) {
                            return Err(e);
                        }
                    }
                }
            }
            // After a failed round trip the write stays local whatever a concurrent recovery
            // did meanwhile (`force`). Without one, a recovery that just finished sends the
            // write back to Redis on the next pass.
            if let Some(result) = self.local_write(ns, key, tried, &local) {
                return result;
            }
        }
    }

    async fn get(&self, ns: Ns, key: &str) -> Result<Option<Record>, StoreError> {
        let now = self.now_ms();
        if hot_cached(ns)
            && let Some(cached) = self.hot.get(&(ns, key.to_owned())).await
        {
            return Ok(cached
                .filter(|e| e.expires_ms.is_none_or(|x| x > now))
                .map(|e| record(&e)));
        }
        if !self.degraded.load(Ordering::Acquire) {
            let generation = self.hot_generation.load(Ordering::Acquire);
            let k = self.redis_key(ns, key);
            let answer = self
                .remote(|mut c| async move {
                    redis::pipe()
                        .atomic()
                        .cmd("GET")
                        .arg(&k)
                        .cmd("PTTL")
                        .arg(&k)
                        .query_async::<(Option<String>, i64)>(&mut c)
                        .await
                })
                .await;
            match answer {
                Ok((value, pttl)) => {
                    let entry = match (value, self.expiry_from_pttl(pttl)) {
                        (Some(value), Ok(expires_ms)) => Some(Entry { value, expires_ms }),
                        _ => None,
                    };
                    match &entry {
                        Some(e) => self.local.insert_entry(ns, key, &e.value, e.expires_ms),
                        None => {
                            self.local.remove(ns, key);
                        }
                    }
                    if hot_cached(ns) && self.hot_generation.load(Ordering::Acquire) == generation {
                        self.hot.insert((ns, key.to_owned()), entry.clone()).await;
                    }
                    return Ok(entry.map(|e| record(&e)));
                }
                Err(f) => {
                    if let Some(e) = self.failed(f) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(self.local.lookup(ns, key).map(|e| record(&e)))
    }

    async fn scan(&self, ns: Ns, prefix: &str, limit: usize) -> Result<Vec<(String, Record)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        if !self.degraded.load(Ordering::Acquire) {
            match self.scan_remote(ns, prefix, limit).await {
                Ok(found) => return Ok(found),
                Err(f) => {
                    if let Some(e) = self.failed(f) {
                        return Err(e);
                    }
                }
            }
        }
        // Degraded: only what this node has seen.
        Ok(self.local.list(ns, prefix, limit))
    }

    async fn scan_remote(
        &self,
        ns: Ns,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, Failure> {
        let base = self.redis_key(ns, "");
        let pattern = format!("{}*", glob_escape(&format!("{base}{prefix}")));
        let deadline = Instant::now() + self.timeout * SCAN_TIMEOUTS;
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let pattern = &pattern;
            let (next, batch) = self
                .remote(|mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async::<(u64, Vec<Vec<u8>>)>(&mut c)
                        .await
                })
                .await?;
            // Keys that are not UTF-8 were not written by thassp.
            keys.extend(
                batch
                    .into_iter()
                    .filter_map(|k| String::from_utf8(k).ok())
                    .filter_map(|k| k.strip_prefix(&base).map(str::to_owned)),
            );
            cursor = next;
            if cursor == 0 || keys.len() >= SCAN_MAX_KEYS || Instant::now() >= deadline {
                break;
            }
        }
        // SCAN may return a key twice.
        keys.sort_unstable();
        keys.dedup();
        let mut found = Vec::new();
        for chunk in keys.chunks(limit.clamp(16, 1000)) {
            let mut pipe = redis::pipe();
            for k in chunk {
                let rk = self.redis_key(ns, k);
                pipe.cmd("GET").arg(&rk).cmd("PTTL").arg(rk);
            }
            let pipe = &pipe;
            let answers = self
                .remote(|mut c| async move { pipe.query_async::<Vec<(Option<String>, i64)>>(&mut c).await })
                .await?;
            for (k, (value, pttl)) in chunk.iter().zip(answers) {
                // A key may have expired between SCAN and GET.
                if let (Some(value), Ok(expires_ms)) = (value, self.expiry_from_pttl(pttl)) {
                    found.push((k.clone(), record(&Entry { value, expires_ms })));
                }
            }
            if found.len() >= limit {
                break;
            }
        }
        found.truncate(limit);
        Ok(found)
    }

    /// Probes Redis and, when it answers, replays the journal; true when healthy afterwards.
    async fn try_recover(&self) -> bool {
        if !self.degraded.load(Ordering::Acquire) {
            return true;
        }
        // Another recovery is under way: it reports on its own.
        let Ok(_recovering) = self.recovering.try_lock() else {
            return false;
        };
        match self
            .remote(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
        {
            Ok(_) => {}
            Err(Failure::Down { message, timed_out }) => {
                if timed_out {
                    self.fresh_connection();
                }
                *lock(&self.last_error) = Some(message);
                return false;
            }
            Err(Failure::Data(message)) => {
                *lock(&self.last_error) = Some(message);
                return false;
            }
        }
        let mut replayed = 0u64;
        loop {
            let batch: Vec<((Ns, String), Pending)> = {
                let mut journal = lock(&self.journal);
                if journal.pending.is_empty() {
                    journal.degraded = false;
                    self.degraded.store(false, Ordering::Release);
                    let dropped = std::mem::take(&mut journal.dropped);
                    let since = journal.since.take().map(|s| s.elapsed()).unwrap_or_default();
                    drop(journal);
                    // Answers cached while degraded came from the local copy.
                    self.hot.invalidate_all();
                    self.hot_generation.fetch_add(1, Ordering::AcqRel);
                    if dropped > 0 {
                        tracing::warn!(replayed, dropped, degraded_for = ?since,
                            "State store: Redis is back; journalled writes replayed, some writes stayed local.");
                    } else {
                        tracing::info!(replayed, degraded_for = ?since,
                            "State store: Redis is back; journalled writes replayed.");
                    }
                    return true;
                }
                let keys: Vec<(Ns, String)> = journal.pending.keys().take(REPLAY_BATCH).cloned().collect();
                keys.into_iter()
                    .filter_map(|k| journal.pending.remove(&k).map(|op| (k, op)))
                    .collect()
            };
            let mut rest = batch.into_iter();
            while let Some((slot, op)) = rest.next() {
                match self.replay(slot.0, &slot.1, &op).await {
                    Ok(()) => replayed += 1,
                    Err(Failure::Data(message)) => {
                        // Redis refuses this write for good (e.g. a counter that another node
                        // turned into text): retrying cannot help.
                        self.note_error(&message);
                    }
                    Err(Failure::Down { message, timed_out }) => {
                        self.note_error(&message);
                        if timed_out {
                            self.fresh_connection();
                        }
                        // Back into the journal, before any write made meanwhile to the key.
                        let mut journal = lock(&self.journal);
                        for (slot, op) in std::iter::once((slot, op)).chain(rest) {
                            let op = match journal.pending.remove(&slot) {
                                Some(newer) => merge(op, newer),
                                None => op,
                            };
                            journal.pending.insert(slot, op);
                        }
                        return false;
                    }
                }
            }
        }
    }

    async fn replay(&self, ns: Ns, key: &str, op: &Pending) -> Result<(), Failure> {
        let k = self.redis_key(ns, key);
        let now = self.now_ms();
        // What is left of a TTL in ms (`None`: no TTL); `Err` when it ran out meanwhile.
        let left = |expires_ms: Option<u64>| match expires_ms {
            None => Ok(None),
            Some(e) if e > now => Ok(Some(e - now)),
            Some(_) => Err(()),
        };
        match op {
            Pending::Delete => self.del(&k).await,
            Pending::Put { value, expires_ms } => match left(*expires_ms) {
                // Replayed in full, the put would have expired by now: the key is gone.
                Err(()) => self.del(&k).await,
                Ok(ttl) => self.set(&k, value, ttl, false).await.map(drop),
            },
            Pending::PutIfAbsent { value, expires_ms } => match left(*expires_ms) {
                Err(()) => Ok(()),
                Ok(ttl) => self.set(&k, value, ttl, true).await.map(drop),
            },
            Pending::Incr { by, expires_ms } => match left(*expires_ms) {
                // The window ended while Redis was away: its increments no longer count.
                Err(()) => Ok(()),
                Ok(ttl) => {
                    let script = &self.incr_script;
                    let k = &k;
                    self.remote(|mut c| async move {
                        script
                            .key(k)
                            .arg(i64::try_from(*by).unwrap_or(i64::MAX))
                            .arg(ttl.unwrap_or(0))
                            .invoke_async::<(i64, i64)>(&mut c)
                            .await
                    })
                    .await
                    .map(drop)
                }
            },
        }
    }

    async fn del(&self, k: &str) -> Result<(), Failure> {
        self.remote(|mut c| async move { redis::cmd("DEL").arg(k).query_async::<i64>(&mut c).await })
            .await
            .map(drop)
    }

    /// `SET k value [NX] [PX ttl_ms]`; true when it wrote.
    async fn set(&self, k: &str, value: &str, ttl_ms: Option<u64>, nx: bool) -> Result<bool, Failure> {
        self.remote(|mut c| async move {
            set_cmd(k, value, ttl_ms, nx)
                .query_async::<Option<String>>(&mut c)
                .await
        })
        .await
        .map(|r| r.is_some())
    }

    /// Swaps in a new connection manager (connecting lazily).
    fn fresh_connection(&self) {
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager_config.clone()) {
            Ok(m) => *self.manager.write().unwrap_or_else(PoisonError::into_inner) = m,
            Err(e) => tracing::debug!(error = %e, "State store: cannot create a Redis connection manager."),
        }
    }
}

fn record(e: &Entry) -> Record {
    Record {
        value: e.value.clone(),
        expires: e.expires_ms.map(from_epoch_ms),
    }
}

fn set_cmd(k: &str, value: &str, ttl_ms: Option<u64>, nx: bool) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(k).arg(value);
    if nx {
        cmd.arg("NX");
    }
    if let Some(ms) = ttl_ms {
        cmd.arg("PX").arg(ms);
    }
    cmd
}

/// What a successful remote write tells the local copy.
enum Mirror {
    /// Nothing new is known (a `put_if_absent` that found the key).
    Keep,
    Set {
        value: String,
        expires_ms: Option<u64>,
    },
    Remove,
}

impl Store for RedisStore {
    fn get<'a>(&'a self, ns: Ns, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(self.inner.get(ns, key))
    }

    fn put<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        value: &'a str,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let inner = &*self.inner;
        Box::pin(async move {
            let k = &inner.redis_key(ns, key);
            let ttl = ttl.map(ttl_ms);
            let remote = move |mut c: ConnectionManager| async move {
                let expires_ms = ttl.map(|t| inner.now_ms().saturating_add(t));
                set_cmd(k, value, ttl, false).query_async::<()>(&mut c).await?;
                Ok((
                    (),
                    Mirror::Set {
                        value: value.to_owned(),
                        expires_ms,
                    },
                ))
            };
            let local = |local: &MemoryStore| {
                let expires_ms = ttl.map(|t| local.now_ms().saturating_add(t));
                local.insert_entry(ns, key, value, expires_ms);
                (
                    Ok(()),
                    Some(Pending::Put {
                        value: value.to_owned(),
                        expires_ms,
                    }),
                )
            };
            inner.write(ns, key, remote, local).await
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        value: &'a str,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let inner = &*self.inner;
        Box::pin(async move {
            let k = &inner.redis_key(ns, key);
            let remote = move |mut c: ConnectionManager| async move {
                let ttl = ttl.map(ttl_ms);
                let expires_ms = ttl.map(|t| inner.now_ms().saturating_add(t));
                let wrote = set_cmd(k, value, ttl, true)
                    .query_async::<Option<String>>(&mut c)
                    .await?
                    .is_some();
                let mirror = if wrote {
                    Mirror::Set {
                        value: value.to_owned(),
                        expires_ms,
                    }
                } else {
                    Mirror::Keep
                };
                Ok((wrote, mirror))
            };
            let local = |local: &MemoryStore| match local.insert_if_absent(ns, key, value, ttl) {
                Some(expires_ms) => (
                    Ok(true),
                    Some(Pending::PutIfAbsent {
                        value: value.to_owned(),
                        expires_ms,
                    }),
                ),
                None => (Ok(false), None),
            };
            inner.write(ns, key, remote, local).await
        })
    }

    fn delete<'a>(&'a self, ns: Ns, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        let inner = &*self.inner;
        Box::pin(async move {
            let k = &inner.redis_key(ns, key);
            let remote = move |mut c: ConnectionManager| async move {
                let n = redis::cmd("DEL").arg(k).query_async::<i64>(&mut c).await?;
                Ok((n > 0, Mirror::Remove))
            };
            // Journalled even when absent locally: Redis may hold the key.
            let local = |local: &MemoryStore| (Ok(local.remove(ns, key)), Some(Pending::Delete));
            inner.write(ns, key, remote, local).await
        })
    }

    fn incr<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        by: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let inner = &*self.inner;
        Box::pin(async move {
            let k = &inner.redis_key(ns, key);
            let remote = move |mut c: ConnectionManager| async move {
                let (n, pttl) = inner
                    .incr_script
                    .key(k)
                    // Redis counters are i64: a larger step saturates.
                    .arg(i64::try_from(by).unwrap_or(i64::MAX))
                    .arg(ttl_ms(ttl))
                    .invoke_async::<(i64, i64)>(&mut c)
                    .await?;
                // The script only counts decimal digits, so `n` is never negative.
                let n = u64::try_from(n).unwrap_or(0);
                let mirror = match inner.expiry_from_pttl(pttl) {
                    Ok(expires_ms) => Mirror::Set {
                        value: n.to_string(),
                        expires_ms,
                    },
                    Err(()) => Mirror::Remove,
                };
                Ok((n, mirror))
            };
            let local = |local: &MemoryStore| match local.add(ns, key, by, ttl) {
                Ok(c) => (
                    Ok(c.value),
                    Some(Pending::Incr {
                        by,
                        expires_ms: c.expires_ms,
                    }),
                ),
                Err(e) => (Err(e), None),
            };
            inner.write(ns, key, remote, local).await
        })
    }

    fn scan<'a>(
        &'a self,
        ns: Ns,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(String, Record)>, StoreError>> {
        Box::pin(self.inner.scan(ns, prefix, limit))
    }

    fn health(&self) -> StoreHealth {
        StoreHealth {
            backend: "redis",
            degraded: self.inner.degraded.load(Ordering::Acquire),
            errors: self.inner.errors.load(Ordering::Relaxed),
            last_error: lock(&self.inner.last_error).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Pending::*;

    fn put(v: &str, e: u64) -> Pending {
        Put {
            value: v.into(),
            expires_ms: Some(e),
        }
    }

    #[test]
    fn journal_merges_follow_the_local_history() {
        let incr = |by, e| Incr {
            by,
            expires_ms: Some(e),
        };
        let pia = |v: &str, e| PutIfAbsent {
            value: v.into(),
            expires_ms: Some(e),
        };
        assert_eq!(merge(incr(2, 10), incr(3, 10)), incr(5, 10));
        // A new window: the old one's increments no longer count.
        assert_eq!(merge(incr(2, 10), incr(1, 20)), incr(1, 20));
        assert_eq!(merge(put("4", 10), incr(3, 10)), put("7", 10));
        assert_eq!(merge(pia("4", 10), incr(3, 10)), pia("7", 10));
        assert_eq!(merge(Delete, incr(3, 10)), put("3", 10));
        assert_eq!(merge(Delete, pia("x", 10)), put("x", 10));
        assert_eq!(merge(put("a", 5), pia("x", 10)), put("x", 10));
        assert_eq!(merge(pia("a", 5), pia("x", 10)), pia("x", 10));
        assert_eq!(merge(incr(1, 5), pia("x", 10)), pia("x", 10));
        assert_eq!(merge(incr(1, 5), Delete), Delete);
        assert_eq!(merge(pia("a", 5), put("b", 9)), put("b", 9));
    }

    #[test]
    fn scan_patterns_escape_glob_characters() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
