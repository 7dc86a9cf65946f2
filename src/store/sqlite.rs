//! The SQLite backend, the embedded default: state survives a restart of thassp (a restart
//! must neither re-greylist everyone nor unblock a spammer).
//!
//! sqlx runs every SQLite connection on its own thread, so no statement blocks a tokio
//! worker. The file is opened in WAL mode (readers never wait for the writer) with
//! `synchronous = NORMAL` (a power cut may lose the last transactions, never corrupt the
//! file: acceptable for anti-spam state) and a busy timeout, since several pool connections
//! and possibly a second process (an admin tool) share the file.
//!
//! Each operation is one SQL statement, so it is atomic per key without explicit
//! transactions: `put_if_absent` and `incr` are `INSERT … ON CONFLICT DO UPDATE … WHERE …
//! RETURNING`, which SQLite executes under its write lock. Expiry decisions compare with the
//! injected clock, passed as a parameter, never SQLite's own `now`.
//!
//! # Schema (version 1)
//!
//! - `thassp_state_schema (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)`: one
//!   row per migration applied; the store applies missing ones itself when it opens the
//!   file, and refuses a file whose version is newer than it knows.
//! - `thassp_state (ns TEXT, key TEXT, value TEXT NOT NULL, expires_ms INTEGER NULL,
//!   PRIMARY KEY (ns, key))`: `ns` is [`Ns::as_str`]; `expires_ms` is epoch milliseconds
//!   (NULL: never). A row whose `expires_ms <= now` is gone for every operation.
//! - `thassp_state_expires` on `thassp_state (expires_ms) WHERE expires_ms IS NOT NULL`:
//!   the purge finds expired rows without a table scan.
//!
//! # Hot cache
//!
//! Every connection reads its client's blocks and reputation counters, and every accepted
//! recipient the auto-whitelist: three or four statements, each a hop to an SQLite worker
//! thread and back (measured: about a quarter of thassp's CPU with one connection per
//! message). Those namespaces ([`HOT`]) are answered from an in-process copy, "absent"
//! included. The copy is exact because this process is the file's only writer: every write
//! goes through this store and updates or drops the entry, and an entry read from the file
//! is kept only if no write happened meanwhile. It holds at most [`HOT_MAX`] keys (cleared
//! when full). A second process writing the same file is not seen until the entry is
//! dropped: do not share a state file between running thassp instances (use Redis).
//!
//! Expired rows are deleted every minute by a background task, in batches of 500 with a
//! pause between batches so mail-path writes are never queued behind one long delete.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::Row as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};

use super::{Clock, Ns, Record, Store, StoreError, StoreHealth, epoch_ms, expiry_ms, from_epoch_ms, ttl_ms};
use crate::policy::BoxFuture;

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pool size: SQLite has one writer at a time anyway; a few connections let reads (WAL)
/// run beside a write.
const MAX_CONNECTIONS: u32 = 4;
/// Expired rows are purged this often.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Rows per purge statement: small, so the write lock is held for milliseconds.
const PURGE_BATCH: i64 = 500;
/// Pause between purge batches, letting queued writers in.
const PURGE_PAUSE: Duration = Duration::from_millis(20);

/// The migrations, in order; each runs once, in one transaction with its version row.
const MIGRATIONS: &[(i64, &[&str])] = &[(
    1,
    &[
        "CREATE TABLE thassp_state (
            ns TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            expires_ms INTEGER,
            PRIMARY KEY (ns, key)
        )",
        "CREATE INDEX thassp_state_expires ON thassp_state (expires_ms) WHERE expires_ms IS NOT NULL",
    ],
)];

const GET: &str = "SELECT value, expires_ms FROM thassp_state
    WHERE ns = ?1 AND key = ?2 AND (expires_ms IS NULL OR expires_ms > ?3)";

const PUT: &str = "INSERT INTO thassp_state (ns, key, value, expires_ms) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires_ms = excluded.expires_ms";

/// Writes only over a missing or expired row; the RETURNING row says whether it wrote.
///
/// Writes with RETURNING (this, `DELETE`, `INCR`) are read with `fetch_all`, never
/// `fetch_optional`: SQLite commits an autocommit statement only when it is stepped to the
/// end, and a commit that fails there (a full disk: SQLITE_FULL) would go unseen if the
/// statement were dropped after its first row — the write reported done, yet rolled back.
const PUT_IF_ABSENT: &str = "INSERT INTO thassp_state (ns, key, value, expires_ms) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires_ms = excluded.expires_ms
    WHERE thassp_state.expires_ms IS NOT NULL AND thassp_state.expires_ms <= ?5
    RETURNING 1";

/// The deleted row's expiry tells whether it was still live.
const DELETE: &str = "DELETE FROM thassp_state WHERE ns = ?1 AND key = ?2 RETURNING expires_ms";

/// A missing or expired counter restarts at `?3` with a new window (`?4`); a live one adds
/// `?6` (saturating at i64::MAX) and keeps its expiry. A live value that is not a decimal
/// counter matches no branch, so no row comes back: the caller reports "not a counter".
const INCR: &str = "INSERT INTO thassp_state (ns, key, value, expires_ms) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (ns, key) DO UPDATE SET
        value = CASE
            WHEN thassp_state.expires_ms IS NOT NULL AND thassp_state.expires_ms <= ?5 THEN excluded.value
            WHEN CAST(thassp_state.value AS INTEGER) > 9223372036854775807 - ?6 THEN '9223372036854775807'
            ELSE CAST(CAST(thassp_state.value AS INTEGER) + ?6 AS TEXT)
        END,
        expires_ms = CASE
            WHEN thassp_state.expires_ms IS NOT NULL AND thassp_state.expires_ms <= ?5 THEN excluded.expires_ms
            ELSE thassp_state.expires_ms
        END
    WHERE (thassp_state.expires_ms IS NOT NULL AND thassp_state.expires_ms <= ?5)
        OR (thassp_state.value <> '' AND thassp_state.value NOT GLOB '*[^0-9]*')
    RETURNING value, expires_ms";

const SCAN_RANGE: &str = "SELECT key, value, expires_ms FROM thassp_state
    WHERE ns = ?1 AND key >= ?2 AND key < ?3 AND (expires_ms IS NULL OR expires_ms > ?4)
    ORDER BY key LIMIT ?5";

const SCAN_FROM: &str = "SELECT key, value, expires_ms FROM thassp_state
    WHERE ns = ?1 AND key >= ?2 AND (expires_ms IS NULL OR expires_ms > ?4)
    ORDER BY key LIMIT ?5";

const PURGE: &str = "DELETE FROM thassp_state WHERE rowid IN
    (SELECT rowid FROM thassp_state WHERE expires_ms <= ?1 LIMIT ?2)";

/// Aborts the background task when the store goes away, so the task (which holds a pool
/// handle) does not keep the database open.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The SQLite store; see the module documentation.
#[derive(Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    clock: Arc<dyn Clock>,
    hot: Mutex<HotCache>,
    /// Failed statements since start, for [`Store::health`].
    errors: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
    purger: AbortOnDrop,
}

/// Namespaces read on every connection or recipient, kept in the [hot cache](self).
const HOT: [Ns; 3] = [Ns::Block, Ns::Reputation, Ns::Awl];
/// Keys the hot cache holds before it starts over.
const HOT_MAX: usize = 100_000;

/// A hot key's value and expiry (epoch ms); `None` = known absent.
type Cached = Option<(String, Option<i64>)>;

#[derive(Default)]
struct HotCache {
    entries: std::collections::HashMap<(Ns, String), Cached>,
    /// Bumped by every write: a read that raced with one does not fill the cache.
    writes: u64,
}

impl HotCache {
    /// Sets a key, starting over when the cache is full.
    fn fill(&mut self, ns: Ns, key: &str, value: Cached) {
        if self.entries.len() >= HOT_MAX {
            self.entries.clear();
        }
        self.entries.insert((ns, key.to_string()), value);
    }
}

impl std::fmt::Debug for HotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotCache")
            .field("keys", &self.entries.len())
            .finish()
    }
}

impl SqliteStore {
    fn hot(&self) -> std::sync::MutexGuard<'_, HotCache> {
        self.hot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached answer for a hot key: `Some(None)` = known absent (or expired).
    fn hot_get(&self, ns: Ns, key: &str) -> Option<Option<Record>> {
        if !HOT.contains(&ns) {
            return None;
        }
        let now = self.now_ms();
        let hot = self.hot();
        let entry = hot.entries.get(&(ns, key.to_string()))?;
        Some(match entry {
            Some((value, expires)) if expires.is_none_or(|e| e > now) => {
                Some(record(value.clone(), *expires))
            }
            _ => None,
        })
    }

    /// Records what a write left behind (`None`: unknown, drop the entry).
    fn hot_write(&self, ns: Ns, key: &str, after: Option<Cached>) {
        if !HOT.contains(&ns) {
            return;
        }
        let mut hot = self.hot();
        hot.writes += 1;
        match after {
            Some(v) => hot.fill(ns, key, v),
            None => {
                hot.entries.remove(&(ns, key.to_string()));
            }
        }
    }

    /// Opens (creating if needed) the database at `path`, applies missing migrations and
    /// starts the purge of expired rows.
    ///
    /// # Errors
    ///
    /// The file cannot be created or opened, is not an SQLite database, or has a schema
    /// newer than this version of thassp knows.
    pub async fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<Self, String> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .min_connections(1)
            .acquire_timeout(BUSY_TIMEOUT * 2)
            .connect_with(options)
            .await
            .map_err(|e| e.to_string())?;
        if let Err(e) = migrate(&pool, clock.as_ref()).await {
            pool.close().await;
            return Err(e);
        }
        let errors = Arc::new(AtomicU64::new(0));
        let last_error = Arc::new(Mutex::new(None));
        let purger = tokio::spawn(purge_loop(
            pool.clone(),
            clock.clone(),
            errors.clone(),
            last_error.clone(),
        ));
        Ok(Self {
            pool,
            clock,
            hot: Mutex::new(HotCache::default()),
            errors,
            last_error,
            purger: AbortOnDrop(purger),
        })
    }

    /// Stops the purge and closes every connection, waiting for them (a clean shutdown
    /// checkpoints the WAL into the main file).
    pub async fn close(&self) {
        self.purger.0.abort();
        self.pool.close().await;
    }

    /// Deletes every expired row now, in batches; returns how many.
    ///
    /// # Errors
    ///
    /// A statement failed; rows deleted by earlier batches stay deleted.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        purge(&self.pool, self.clock.as_ref())
            .await
            .map_err(|e| self.failed(e))
    }

    fn now_ms(&self) -> i64 {
        to_i64(epoch_ms(self.clock.now()))
    }

    /// Counts and remembers a failure, then classifies it for the caller.
    fn failed(&self, e: sqlx::Error) -> StoreError {
        note_error(&self.errors, &self.last_error, &e);
        classify(e)
    }
}

/// Epoch milliseconds fit i64 for the next 292 million years; clamp rather than wrap.
fn to_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn note_error(errors: &AtomicU64, last_error: &Mutex<Option<String>>, e: &sqlx::Error) {
    errors.fetch_add(1, Ordering::Relaxed);
    *last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
}

/// A busy database, a closed pool or an I/O failure is "unavailable" (retrying later may
/// work); anything else is a backend error.
fn classify(e: sqlx::Error) -> StoreError {
    let busy = match &e {
        sqlx::Error::Database(d) => {
            // SQLite's primary result code is the low byte of the extended one:
            // 5 = SQLITE_BUSY, 6 = SQLITE_LOCKED.
            d.code()
                .and_then(|c| c.parse::<i64>().ok())
                .is_some_and(|c| matches!(c & 0xff, 5 | 6))
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    };
    if busy {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

async fn migrate(pool: &SqlitePool, clock: &dyn Clock) -> Result<(), String> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS thassp_state_schema (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)",
    )
    .execute(pool)
    .await
    .map_err(|e| format!("creating the schema table: {e}"))?;
    // IMMEDIATE takes the write lock at once: two processes opening a new file at the same
    // time migrate one after the other instead of failing half-way.
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| format!("locking for migration: {e}"))?;
    let current: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM thassp_state_schema")
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| format!("reading the schema version: {e}"))?;
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > latest {
        return Err(format!(
            "schema version {current} is newer than this thassp knows ({latest}); upgrade thassp or use another file"
        ));
    }
    for (version, statements) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        for statement in *statements {
            sqlx::query(*statement)
                .execute(&mut *tx)
                .await
                .map_err(|e| format!("migration {version}: {e}"))?;
        }
        sqlx::query("INSERT INTO thassp_state_schema (version, applied_ms) VALUES (?1, ?2)")
            .bind(version)
            .bind(to_i64(epoch_ms(clock.now())))
            .execute(&mut *tx)
            .await
            .map_err(|e| format!("migration {version}: {e}"))?;
    }
    tx.commit()
        .await
        .map_err(|e| format!("committing the migration: {e}"))
}

async fn purge(pool: &SqlitePool, clock: &dyn Clock) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let now = to_i64(epoch_ms(clock.now()));
        let done = sqlx::query(PURGE)
            .bind(now)
            .bind(PURGE_BATCH)
            .execute(pool)
            .await?
            .rows_affected();
        total += done;
        if done < PURGE_BATCH as u64 {
            return Ok(total);
        }
        tokio::time::sleep(PURGE_PAUSE).await;
    }
}

async fn purge_loop(
    pool: SqlitePool,
    clock: Arc<dyn Clock>,
    errors: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    loop {
        tokio::time::sleep(PURGE_INTERVAL).await;
        match purge(&pool, clock.as_ref()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "Purged expired state rows."),
            Err(e) => {
                note_error(&errors, &last_error, &e);
                tracing::warn!(error = %e, "Purging expired state rows failed; retrying in a minute.");
            }
        }
    }
}

/// The least string greater than every string starting with `prefix`, or `None` when there
/// is none (empty prefix, or only U+10FFFF characters). SQLite compares TEXT bytewise and
/// UTF-8 keeps code point order, so `key >= prefix AND key < end` is exactly "starts with"
/// and can use the primary key's index.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn record(value: String, expires_ms: Option<i64>) -> Record {
    Record {
        value,
        expires: expires_ms.map(|ms| from_epoch_ms(u64::try_from(ms).unwrap_or(0))),
    }
}

fn row_record(row: &SqliteRow, value_col: usize) -> Result<Record, sqlx::Error> {
    Ok(record(row.try_get(value_col)?, row.try_get(value_col + 1)?))
}

impl Store for SqliteStore {
    fn get<'a>(&'a self, ns: Ns, key: &'a str) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(async move {
            if let Some(cached) = self.hot_get(ns, key) {
                return Ok(cached);
            }
            let writes = HOT.contains(&ns).then(|| self.hot().writes);
            let row = sqlx::query(GET)
                .bind(ns.as_str())
                .bind(key)
                .bind(self.now_ms())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.failed(e))?;
            let found = row
                .map(|r| Ok::<_, sqlx::Error>((r.try_get::<String, _>(0)?, r.try_get::<Option<i64>, _>(1)?)))
                .transpose()
                .map_err(|e| self.failed(e))?;
            if let Some(writes) = writes {
                let mut hot = self.hot();
                if hot.writes == writes {
                    hot.fill(ns, key, found.clone());
                }
            }
            Ok(found.map(|(value, expires)| record(value, expires)))
        })
    }

    fn put<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        value: &'a str,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let expires = expiry_ms(epoch_ms(self.clock.now()), ttl).map(to_i64);
            let result = sqlx::query(PUT)
                .bind(ns.as_str())
                .bind(key)
                .bind(value)
                .bind(expires)
                .execute(&self.pool)
                .await;
            // A failed write leaves the key unknown: dropped from the cache.
            self.hot_write(
                ns,
                key,
                result.is_ok().then(|| Some((value.to_string(), expires))),
            );
            result.map_err(|e| self.failed(e))?;
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
        Box::pin(async move {
            let now = epoch_ms(self.clock.now());
            let expires = expiry_ms(now, ttl).map(to_i64);
            let rows = sqlx::query(PUT_IF_ABSENT)
                .bind(ns.as_str())
                .bind(key)
                .bind(value)
                .bind(expires)
                .bind(to_i64(now))
                .fetch_all(&self.pool)
                .await;
            let wrote = rows.as_ref().is_ok_and(|r| !r.is_empty());
            // Not written (or failed): someone's value may be there; the next read fetches it.
            self.hot_write(ns, key, wrote.then(|| Some((value.to_string(), expires))));
            rows.map_err(|e| self.failed(e))?;
            Ok(wrote)
        })
    }

    fn delete<'a>(&'a self, ns: Ns, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let now = self.now_ms();
            let rows = sqlx::query(DELETE)
                .bind(ns.as_str())
                .bind(key)
                .fetch_all(&self.pool)
                .await;
            self.hot_write(ns, key, rows.is_ok().then_some(None));
            let rows = rows.map_err(|e| self.failed(e))?;
            let Some(row) = rows.first() else { return Ok(false) };
            let expires: Option<i64> = row.try_get(0).map_err(|e| self.failed(e))?;
            Ok(expires.is_none_or(|e| e > now))
        })
    }

    fn incr<'a>(
        &'a self,
        ns: Ns,
        key: &'a str,
        by: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let now = epoch_ms(self.clock.now());
            // SQLite integers are i64: a larger step saturates, as the counter does.
            let by = to_i64(by);
            let rows = sqlx::query(INCR)
                .bind(ns.as_str())
                .bind(key)
                .bind(by.to_string())
                .bind(to_i64(now.saturating_add(ttl_ms(ttl))))
                .bind(to_i64(now))
                .bind(by)
                .fetch_all(&self.pool)
                .await;
            // The counter's expiry is decided in SQL: the next read fetches both.
            self.hot_write(ns, key, None);
            let rows = rows.map_err(|e| self.failed(e))?;
            let Some(row) = rows.into_iter().next() else {
                return Err(StoreError::Backend(format!("{ns}:{key} is not a counter")));
            };
            let value: String = row.try_get(0).map_err(|e| self.failed(e))?;
            value
                .parse()
                .map_err(|_| StoreError::Backend(format!("{ns}:{key} holds {value:?}, not a counter")))
        })
    }

    fn scan<'a>(
        &'a self,
        ns: Ns,
        prefix: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(String, Record)>, StoreError>> {
        Box::pin(async move {
            let end = prefix_end(prefix);
            let query = match &end {
                Some(_) => sqlx::query(SCAN_RANGE),
                None => sqlx::query(SCAN_FROM),
            };
            let rows = query
                .bind(ns.as_str())
                .bind(prefix)
                .bind(end)
                .bind(self.now_ms())
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.failed(e))?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, row_record(r, 1)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(|e| self.failed(e))
        })
    }

    fn health(&self) -> StoreHealth {
        StoreHealth {
            backend: "sqlite",
            degraded: false,
            errors: self.errors.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_least_upper_bound() {
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end("x\u{D7FF}").as_deref(), Some("x\u{E000}"));
        for key in ["ab", "ab\u{10FFFF}\u{10FFFF}", "ab\0", "abzzz"] {
            assert!(key >= "ab" && key < prefix_end("ab").unwrap().as_str(), "{key:?}");
        }
        assert!("ac" >= prefix_end("ab").unwrap().as_str());
    }
}
