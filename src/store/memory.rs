//! The in-memory backend: the state lives in this process only. Used by tests, by
//! `backend = "memory"`, and by the Redis backend as its local fallback copy.
//!
//! # Bound
//!
//! The store holds at most `max_entries` entries, rounded up to a multiple of the 16 shards
//! (each shard holds `ceil(max_entries / 16)`). Expired entries are removed when they are
//! read, by a sweep of a shard at most once per second of the injected clock (on a write to
//! that shard), and whenever a shard is full. A shard that is full of live entries drops the
//! sixteenth of them closest to expiry (entries that never expire go last), so a flood of new
//! keys costs old greylist triplets before it costs blocks. Each entry costs about 100 bytes
//! plus the lengths of its key and value.
//!
//! Each shard is a `std::sync::Mutex` over a few hash maps: every operation is a short
//! critical section without `.await`, so the lock never blocks a tokio worker for long and
//! sharding keeps concurrent callers apart.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{Clock, Ns, Record, Store, StoreError, StoreHealth, epoch_ms, expiry_ms, from_epoch_ms};
use crate::policy::BoxFuture;

/// Shards: enough that 2–16 cores rarely meet on one lock, few enough that a scan (which
/// visits all) stays cheap.
const SHARDS: usize = 16;

/// A shard sweeps its expired entries at most this often (on writes).
const SWEEP_INTERVAL_MS: u64 = 1_000;

/// A stored value and its expiry in epoch milliseconds (`None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) value: String,
    pub(crate) expires_ms: Option<u64>,
}

impl Entry {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|e| e > now_ms)
    }

    fn record(&self) -> Record {
        Record {
            value: self.value.clone(),
            expires: self.expires_ms.map(from_epoch_ms),
        }
    }

    /// Eviction order: soonest expiry first, never-expiring last.
    fn rank(&self) -> u64 {
        self.expires_ms.unwrap_or(u64::MAX)
    }
}

/// The result of an increment: the new value and the counter's expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counted {
    pub(crate) value: u64,
    pub(crate) expires_ms: Option<u64>,
}

/// One namespace map per [`Ns`], so lookups borrow the key as `&str` without allocating.
#[derive(Debug, Default)]
struct Shard {
    maps: [HashMap<String, Entry>; Ns::ALL.len()],
    last_sweep_ms: u64,
}

impl Shard {
    fn len(&self) -> usize {
        self.maps.iter().map(HashMap::len).sum()
    }

    fn sweep(&mut self, now_ms: u64) -> usize {
        self.last_sweep_ms = now_ms;
        let before = self.len();
        for map in &mut self.maps {
            map.retain(|_, e| e.live(now_ms));
        }
        before - self.len()
    }

    /// Drops `count` entries, those closest to expiry first.
    fn evict(&mut self, count: usize) -> usize {
        let mut ranks: Vec<u64> = self
            .maps
            .iter()
            .flat_map(|m| m.values().map(Entry::rank))
            .collect();
        if ranks.is_empty() || count == 0 {
            return 0;
        }
        let nth = count.min(ranks.len()) - 1;
        let (_, threshold, _) = ranks.select_nth_unstable(nth);
        let threshold = *threshold;
        let mut left = count;
        // Strictly sooner first, then ties at the threshold until `count` are gone.
        for map in &mut self.maps {
            map.retain(|_, e| {
                let drop = left > 0 && e.rank() < threshold;
                left -= usize::from(drop);
                !drop
            });
        }
        for map in &mut self.maps {
            map.retain(|_, e| {
                let drop = left > 0 && e.rank() == threshold;
                left -= usize::from(drop);
                !drop
            });
        }
        count - left
    }
}

/// The in-memory store; see the module documentation for its bound.
pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    hasher: RandomState,
    /// Live entries dropped because a shard was full: non-zero means `max_entries` is too
    /// small for the traffic.
    evicted: AtomicU64,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the entries: there may be a hundred thousand.
        f.debug_struct("MemoryStore")
            .field("clock", &self.clock)
            .field("entries", &self.len())
            .field("capacity", &self.capacity())
            .field("evicted", &self.evicted())
            .finish()
    }
}

fn ns_index(ns: Ns) -> usize {
    match ns {
        Ns::Grey => 0,
        Ns::Awl => 1,
        Ns::Reputation => 2,
        Ns::Block => 3,
        Ns::Tarpit => 4,
        Ns::List => 5,
    }
}

impl MemoryStore {
    /// A store holding at most `max_entries` entries (at least one per shard), whose expiry
    /// decisions follow `clock`.
    pub fn new(clock: Arc<dyn Clock>, max_entries: usize) -> Self {
        let shard_capacity = max_entries.div_ceil(SHARDS).max(1);
        Self {
            clock,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity,
            hasher: RandomState::new(),
            evicted: AtomicU64::new(0),
        }
    }

    /// The most entries the store holds.
    pub fn capacity(&self) -> usize {
        self.shard_capacity * SHARDS
    }

    /// Entries held now, including expired ones not swept yet.
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.lock(i).len()).sum()
    }

    /// True when the store holds no entries at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live entries dropped so far because the store was full.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Removes every expired entry now; returns how many.
    pub fn purge_expired(&self) -> usize {
        let now = self.now_ms();
        (0..SHARDS).map(|i| self.lock(i).sweep(now)).sum()
    }

    pub(crate) fn now_ms(&self) -> u64 {
        epoch_ms(self.clock.now())
    }

    fn shard_of(&self, ns: Ns, key: &str) -> usize {
        // Truncation is fine: only the low bits pick the shard.
        (self.hasher.hash_one((ns, key)) as usize) % SHARDS
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        // A panic elsewhere while holding the lock cannot leave a map half-updated in a way
        // that matters here (each operation is one map call), so a poisoned lock is used as is.
        self.shards[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes room for one new entry in `shard` if it is full.
    fn make_room(&self, shard: &mut Shard, now_ms: u64) {
        if now_ms >= shard.last_sweep_ms.saturating_add(SWEEP_INTERVAL_MS) {
            shard.sweep(now_ms);
        }
        if shard.len() < self.shard_capacity {
            return;
        }
        shard.sweep(now_ms);
        if shard.len() >= self.shard_capacity {
            let batch = (self.shard_capacity / 16).max(1);
            let gone = shard.evict(batch);
            self.evicted.fetch_add(gone as u64, Ordering::Relaxed);
        }
    }

    fn set(&self, shard: &mut Shard, ns: Ns, key: &str, entry: Entry, now_ms: u64) {
        if let Some(e) = shard.maps[ns_index(ns)].get_mut(key) {
            *e = entry;
            return;
        }
        self.make_room(shard, now_ms);
        shard.maps[ns_index(ns)].insert(key.to_owned(), entry);
    }

    /// The live entry at `key`, if any.
    pub(crate) fn lookup(&self, ns: Ns, key: &str) -> Option<Entry> {
        let now = self.now_ms();
        let mut shard = self.lock(self.shard_of(ns, key));
        let map = &mut shard.maps[ns_index(ns)];
        match map.get(key) {
            Some(e) if e.live(now) => Some(e.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Sets `key` with an absolute expiry (epoch ms); the Redis backend mirrors into its
    /// fallback copy with the expiry Redis reported.
    pub(crate) fn insert_entry(&self, ns: Ns, key: &str, value: &str, expires_ms: Option<u64>) {
        let now = self.now_ms();
        let mut shard = self.lock(self.shard_of(ns, key));
        let entry = Entry {
            value: value.to_owned(),
            expires_ms,
        };
        self.set(&mut shard, ns, key, entry, now);
    }

    /// [`Store::put`] without the future; returns the entry's expiry.
    pub(crate) fn insert(&self, ns: Ns, key: &str, value: &str, ttl: Option<Duration>) -> Option<u64> {
        let expires_ms = expiry_ms(self.now_ms(), ttl);
        self.insert_entry(ns, key, value, expires_ms);
        expires_ms
    }

    /// [`Store::put_if_absent`] without the future; `Some(expiry)` when it wrote.
    pub(crate) fn insert_if_absent(
        &self,
        ns: Ns,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Option<Option<u64>> {
        let now = self.now_ms();
        let mut shard = self.lock(self.shard_of(ns, key));
        if shard.maps[ns_index(ns)].get(key).is_some_and(|e| e.live(now)) {
            return None;
        }
        let expires_ms = expiry_ms(now, ttl);
        self.set(
            &mut shard,
            ns,
            key,
            Entry {
                value: value.to_owned(),
                expires_ms,
            },
            now,
        );
        Some(expires_ms)
    }

    /// [`Store::delete`] without the future.
    pub(crate) fn remove(&self, ns: Ns, key: &str) -> bool {
        let now = self.now_ms();
        let mut shard = self.lock(self.shard_of(ns, key));
        shard.maps[ns_index(ns)].remove(key).is_some_and(|e| e.live(now))
    }

    /// [`Store::incr`] without the future.
    pub(crate) fn add(&self, ns: Ns, key: &str, by: u64, ttl: Duration) -> Result<Counted, StoreError> {
        let now = self.now_ms();
        let mut shard = self.lock(self.shard_of(ns, key));
        if let Some(e) = shard.maps[ns_index(ns)].get_mut(key)
            && e.live(now)
        {
            let current: u64 = e
                .value
                .parse()
                .map_err(|_| StoreError::Backend(format!("{ns}:{key} is not a counter")))?;
            let value = current.saturating_add(by);
            e.value = value.to_string();
            return Ok(Counted {
                value,
                expires_ms: e.expires_ms,
            });
        }
        let expires_ms = expiry_ms(now, Some(ttl));
        self.set(
            &mut shard,
            ns,
            key,
            Entry {
                value: by.to_string(),
                expires_ms,
            },
            now,
        );
        Ok(Counted {
            value: by,
            expires_ms,
        })
    }

    /// [`Store::scan`] without the future.
    pub(crate) fn list(&self, ns: Ns, prefix: &str, limit: usize) -> Vec<(String, Record)> {
        let now = self.now_ms();
        let mut out = Vec::new();
        for i in 0..SHARDS {
            let shard = self.lock(i);
            let mut hits: Vec<(&String, &Entry)> = shard.maps[ns_index(ns)]
                .iter()
                .filter(|(k, e)| k.starts_with(prefix) && e.live(now))
                .collect();
            // Only this shard's first `limit` can be among the overall first `limit`.
            hits.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.extend(hits.into_iter().take(limit).map(|(k, e)| (k.clone(), e.record())));
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out.truncate(limit);
        out
    }
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, ns: Ns, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async move { Ok(self.lookup(ns, key).map(|e| e.record())) })
    }

    fn put<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        value: &'a str,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.insert(ns, key, value, ttl);
            Ok(())
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        value: &'a str,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.insert_if_absent(ns, key, value, ttl).is_some()) })
    }

    fn delete<'a>(&'a self, ns: Ns, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move { Ok(self.remove(ns, key)) })
    }

    fn incr<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        by: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move { self.add(ns, key, by, ttl).map(|c| c.value) })
    }

    fn scan<'a>(
        &'a self,
        ns: Ns,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(String, Record)>, StoreError>> {
        Box::pin(async move { Ok(self.list(ns, prefix, limit)) })
    }

    fn health(&self) -> StoreHealth {
        StoreHealth {
            backend: "memory",
            ..StoreHealth::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManualClock;
    use std::time::SystemTime;

    #[test]
    fn full_store_evicts_soonest_expiry_first_and_sweeps_expired() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let store = MemoryStore::new(clock.clone(), 16 * 32);
        assert_eq!(store.capacity(), 512);
        // Never-expiring entries first, then many short-lived ones: the short-lived ones go.
        for i in 0..100 {
            store.insert(Ns::Block, &format!("keep{i}"), "x", None);
        }
        for i in 0..2000 {
            store.insert(Ns::Grey, &format!("g{i}"), "x", Some(Duration::from_secs(60 + i)));
        }
        assert!(store.len() <= store.capacity());
        assert!(store.evicted() > 0);
        for i in 0..100 {
            assert!(
                store.lookup(Ns::Block, &format!("keep{i}")).is_some(),
                "keep{i} evicted"
            );
        }
        // The last (latest-expiring) greylist entries survive.
        assert!(store.lookup(Ns::Grey, "g1999").is_some());
        clock.advance(Duration::from_secs(10_000));
        let before = store.len();
        assert_eq!(store.purge_expired(), before - 100);
        assert_eq!(store.len(), 100);
    }

    #[test]
    fn expired_entries_are_swept_on_writes() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let store = MemoryStore::new(clock.clone(), 100_000);
        for i in 0..1000 {
            store.insert(Ns::Grey, &format!("g{i}"), "x", Some(Duration::from_secs(1)));
        }
        clock.advance(Duration::from_secs(5));
        // One write per shard at least, after the sweep interval passed.
        for i in 0..200 {
            store.insert(Ns::Grey, &format!("n{i}"), "x", None);
        }
        assert_eq!(store.len(), 200);
    }
}
