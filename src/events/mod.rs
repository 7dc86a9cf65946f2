//! The event log: one row per connection and per mail transaction, written to SQL (SQLite by
//! default, MySQL/MariaDB or PostgreSQL) by a background writer, and the statistics computed
//! from it.
//!
//! Promise 5 ("mail flow never waits on bookkeeping") shapes everything here. Sessions call
//! [`EventLog::log_connection`] and [`EventLog::log_transaction`], which are synchronous,
//! O(1) and infallible: they push onto a bounded in-memory queue. When the queue is full the
//! *oldest* queued row is dropped and counted ([`EventLog::dropped`]). One writer task takes
//! batches off the queue (up to `batch_size` rows, or whatever is there after
//! `flush_interval`), writes each batch in one database transaction, reconnects with
//! exponential backoff when the database is down or slow (rows wait in the queue meanwhile,
//! up to the bound), creates and migrates its schema itself and prunes old rows in small
//! batches.
//!
//! Delivery to the database is at least once: if the connection breaks during `COMMIT`, the
//! batch is written again and may appear twice. Rows the database refuses (a value its
//! schema rejects) are isolated one by one and dropped, so one bad row never jams the log.
//!
//! # How attempts are counted
//!
//! The statistics count *attempts*, and every attempt ends in exactly one [`Category`]:
//!
//! - every transaction row is one attempt, in its own outcome;
//! - a connection row is one attempt, in the connection's outcome, when no transaction row
//!   was logged for it (`tx_count = 0`: refused at connect or HELO, early talker, aborted
//!   before MAIL, a client that only said QUIT, …). A connection with transactions is
//!   represented by them and not counted again.
//!
//! So the caller must set [`ConnectionEvent::transactions`] to the number of
//! [`TransactionEvent`]s it logged for that session. Connection attempts are dated by their
//! connect time, transactions by their end. The same rule drives the live counters
//! ([`EventLog::since_start`]), which also count rows the database never got.

pub mod sql;
pub mod stats;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, AssertSqlSafe, Connection as _};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::duration;
use crate::policy::Category;
pub use sql::{Backend, Tables};
pub use stats::{DayCount, EventQuery, OutcomeRow, Stats, Totals, format_table};

// ---------------------------------------------------------------------------------------
// Categories

/// Every category, in the order of the vocabulary (DESIGN.md).
pub const CATEGORIES: [Category; 20] = [
    Category::Trap,
    Category::HeloInvalid,
    Category::Tarpit,
    Category::Autoblacklist,
    Category::UnknownUser,
    Category::Greylisted,
    Category::Aborted,
    Category::RelayAttempt,
    Category::SpfFail,
    Category::Dnsbl,
    Category::Blacklist,
    Category::Ptr,
    Category::Pregreet,
    Category::Content,
    Category::Attachment,
    Category::Size,
    Category::RateLimit,
    Category::UpstreamError,
    Category::Other,
    Category::Delivered,
];

/// The position of `c` in [`CATEGORIES`]. The match is exhaustive on purpose: a new
/// category fails to compile here until it is added to the list.
pub fn category_index(c: Category) -> usize {
    match c {
        Category::Trap => 0,
        Category::HeloInvalid => 1,
        Category::Tarpit => 2,
        Category::Autoblacklist => 3,
        Category::UnknownUser => 4,
        Category::Greylisted => 5,
        Category::Aborted => 6,
        Category::RelayAttempt => 7,
        Category::SpfFail => 8,
        Category::Dnsbl => 9,
        Category::Blacklist => 10,
        Category::Ptr => 11,
        Category::Pregreet => 12,
        Category::Content => 13,
        Category::Attachment => 14,
        Category::Size => 15,
        Category::RateLimit => 16,
        Category::UpstreamError => 17,
        Category::Other => 18,
        Category::Delivered => 19,
    }
}

/// Serialises a [`Category`] as its name (`policy` keeps serde off the type).
pub fn serialize_category<S: serde::Serializer>(c: &Category, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(c.as_str())
}

/// The category named `s` (as written by [`Category::as_str`]).
pub fn parse_category(s: &str) -> Option<Category> {
    CATEGORIES.iter().copied().find(|c| c.as_str() == s)
}

// ---------------------------------------------------------------------------------------
// Events

/// One client connection, logged when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionEvent {
    /// The session id (as in the log lines and the Received header).
    pub session_id: String,
    pub connect_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    /// The client (after PROXY protocol, when that is enabled).
    pub client: SocketAddr,
    /// The load balancer the connection came through (PROXY protocol), if any.
    pub proxied_by: Option<SocketAddr>,
    /// The client's forward-confirmed PTR name, if looked up.
    pub ptr: Option<String>,
    pub helo: Option<String>,
    pub tls_version: Option<String>,
    pub tls_cipher: Option<String>,
    /// The SASL user once the upstream said 235.
    pub auth_user: Option<String>,
    /// Number of [`TransactionEvent`]s logged for this session (see "How attempts are
    /// counted" in the module docs).
    pub transactions: u32,
    pub outcome: Category,
    /// The check that decided the outcome (`dnsbl`, `helo`, `smtp`, `upstream`, …).
    pub check: Option<String>,
    /// The last reply sent to the client.
    pub last_reply: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// One recipient of a transaction and the reply the client got for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    pub address: String,
    /// The RCPT reply as sent, e.g. `250 2.1.5 Ok` or `550 5.1.1 User unknown`.
    pub reply: String,
}

/// Where a transaction's time went, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timings {
    /// From MAIL FROM to the end of the transaction.
    pub total_ms: u32,
    /// Checks at MAIL FROM.
    pub mail_ms: u32,
    /// All RCPT TO commands (checks and the upstream's answers).
    pub rcpt_ms: u32,
    /// Reading the message and the DATA checks.
    pub data_ms: u32,
    /// Relaying the message until the upstream's final reply.
    pub upstream_ms: u32,
}

/// One mail transaction (MAIL FROM to its end: final reply to DATA, RSET, or the session
/// ending), logged when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct TransactionEvent {
    pub session_id: String,
    /// The transaction's number in its session, from 1; joins recipients to it.
    pub seq: u32,
    /// When the transaction ended.
    pub time: DateTime<Utc>,
    /// The client, repeated here so transaction statistics need no join.
    pub client_ip: IpAddr,
    /// The envelope sender; empty for the null sender `<>`. Stored lower case.
    pub sender: String,
    /// Every RCPT TO of the transaction with its reply, accepted or not. Stored lower case.
    pub recipients: Vec<RecipientResult>,
    /// Message size in bytes (0 when there was no DATA).
    pub size: u64,
    pub message_id: Option<String>,
    /// Dropped by the log when `log_subject` is off.
    pub subject: Option<String>,
    pub outcome: Category,
    pub check: Option<String>,
    /// The last reply the client got in this transaction.
    pub reply: Option<String>,
    /// The upstream's final reply to DATA.
    pub upstream_reply: Option<String>,
    /// The upstream's queue id, from its final reply.
    pub queue_id: Option<String>,
    /// SPF, DKIM and DMARC results (`pass`, `fail`, …); empty when not evaluated.
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    pub score: f32,
    pub timings: Timings,
}

/// What the queue holds. Boxed so the queue itself is small and can be allocated whole up
/// front (no reallocation on the sessions' path).
#[derive(Debug)]
enum Event {
    Connection(Box<ConnectionEvent>),
    Transaction(Box<TransactionEvent>),
}

// ---------------------------------------------------------------------------------------
// Configuration

/// `[events]`: the event log.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Where rows go: `sqlite://path` (created if missing), `mysql://user:pw@host/db`
    /// (MariaDB too; a password user over TCP: sqlx cannot do MariaDB's ed25519 or
    /// unix_socket authentication) or `postgres://user:pw@host/db`. `""` disables the event
    /// log (live counters still work). Default `"sqlite://thassp-events.db"`.
    pub url: String,
    /// Rows held in memory while the database is slow or down; beyond that the oldest are
    /// dropped and counted. Default 10000.
    pub queue_size: usize,
    /// Rows written per database transaction at most. Default 500.
    pub batch_size: usize,
    /// A row waits at most this long before it is written. Default "1s".
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// Rows older than this many days are deleted (hourly, in small batches). 0 = keep
    /// everything. Default 90.
    pub retention_days: u32,
    /// Rows deleted per statement when pruning, so pruning never holds long locks.
    /// Default 1000.
    pub prune_batch: u32,
    /// Store the Subject of each message (turn off for privacy). Default true.
    pub log_subject: bool,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://thassp-events.db".into(),
            queue_size: 10_000,
            batch_size: 500,
            flush_interval: Duration::from_secs(1),
            retention_days: 90,
            prune_batch: 1000,
            log_subject: true,
        }
    }
}

/// More rows than this in memory is a configuration mistake, not a buffer.
const MAX_QUEUE: usize = 10_000_000;

impl EventsConfig {
    /// Every problem, each prefixed with `key` (e.g. `events`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        if !self.url.is_empty()
            && let Err(e) = Backend::from_url(&self.url)
        {
            errors.push(format!("{key}.url: {e}"));
        }
        if self.queue_size == 0 || self.queue_size > MAX_QUEUE {
            errors.push(format!("{key}.queue_size: must be between 1 and {MAX_QUEUE}"));
        }
        if self.batch_size == 0 {
            errors.push(format!("{key}.batch_size: must be at least 1"));
        } else if self.batch_size > self.queue_size {
            errors.push(format!(
                "{key}.batch_size: {} is more than queue_size ({})",
                self.batch_size, self.queue_size
            ));
        }
        if self.flush_interval.is_zero() {
            errors.push(format!("{key}.flush_interval: must be more than 0"));
        }
        if self.retention_days > 0 && self.prune_batch == 0 {
            errors.push(format!(
                "{key}.prune_batch: must be at least 1 when retention_days is set"
            ));
        }
        errors
    }

    /// Whether rows go to a database at all.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

/// Writer settings that are not configuration keys: fixed in production, short in tests.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Prefix of every table and index name (default `thassp_`); tests use their own so
    /// runs against a shared database never collide.
    pub table_prefix: String,
    /// Connecting (including the TLS and auth handshake and the migration check). Default
    /// 10 s.
    pub connect_timeout: Duration,
    /// Writing one batch or one prune step; past it the connection is dropped and the rows
    /// requeued. Default 30 s.
    pub write_timeout: Duration,
    /// First wait after a failure, doubled up to `backoff_max`. Default 250 ms.
    pub backoff_min: Duration,
    /// Default 30 s.
    pub backoff_max: Duration,
    /// How often old rows are pruned. Default 1 h.
    pub prune_interval: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            table_prefix: sql::DEFAULT_PREFIX.into(),
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            prune_interval: Duration::from_secs(3600),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The handle sessions use

/// State shared by the log handles and the writer.
struct Shared {
    /// `None` when the log is disabled: only the live counters run.
    backend: Option<Backend>,
    /// A `std` mutex: it is held for a push or a pop, never across an await, so sessions
    /// never wait behind the database.
    queue: Mutex<VecDeque<Event>>,
    capacity: usize,
    batch_size: usize,
    log_subject: bool,
    /// Wakes the writer when a full batch is waiting (or a prune is asked for).
    wake: Notify,
    /// Rows taken off the queue and being written.
    in_flight: AtomicUsize,
    dropped: AtomicU64,
    written: AtomicU64,
    write_errors: AtomicU64,
    pruned: AtomicU64,
    last_error: Mutex<Option<String>>,
    connected: AtomicBool,
    /// Set once the writer is gone: later rows can only be counted as dropped.
    closed: AtomicBool,
    prune_requested: AtomicBool,
    /// When a draining writer must give up (set by shutdown).
    drain_deadline: Mutex<Option<Instant>>,
    /// Attempts per category since start, whatever happens to the rows.
    live: [AtomicU64; CATEGORIES.len()],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a VecDeque or an Option half-updated in
    // a way that matters here; keep logging rather than propagate the poison.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn new(backend: Option<Backend>, capacity: usize, batch_size: usize, log_subject: bool) -> Self {
        Self {
            backend,
            queue: Mutex::new(VecDeque::with_capacity(if backend.is_some() {
                capacity
            } else {
                0
            })),
            capacity,
            batch_size: batch_size.max(1),
            log_subject,
            wake: Notify::new(),
            in_flight: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            pruned: AtomicU64::new(0),
            last_error: Mutex::new(None),
            connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            prune_requested: AtomicBool::new(false),
            drain_deadline: Mutex::new(None),
            live: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn push(&self, event: Event) {
        if self.backend.is_none() {
            return;
        }
        if self.closed.load(Ordering::Relaxed) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut q = lock(&self.queue);
        let evicted = if q.len() >= self.capacity {
            q.pop_front()
        } else {
            None
        };
        q.push_back(event);
        let len = q.len();
        drop(q);
        if evicted.is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        // Only the crossing wakes the writer; below a batch it wakes on its flush timer.
        if len == self.batch_size {
            self.wake.notify_one();
        }
        // `evicted` (its strings) is freed here, outside the lock.
    }

    fn take(&self, max: usize) -> Vec<Event> {
        let mut q = lock(&self.queue);
        let n = q.len().min(max);
        let batch: Vec<Event> = q.drain(..n).collect();
        self.in_flight.store(batch.len(), Ordering::Relaxed);
        batch
    }

    /// Puts an unwritten batch back at the head of the queue (it is older than anything
    /// queued since), then enforces the bound by dropping the oldest.
    fn requeue(&self, batch: Vec<Event>) {
        let mut q = lock(&self.queue);
        for ev in batch.into_iter().rev() {
            q.push_front(ev);
        }
        let mut evicted = Vec::new();
        while q.len() > self.capacity {
            if let Some(ev) = q.pop_front() {
                evicted.push(ev);
            }
        }
        self.in_flight.store(0, Ordering::Relaxed);
        drop(q);
        self.dropped.fetch_add(evicted.len() as u64, Ordering::Relaxed);
    }

    /// Rows of the current batch still unwritten; under the queue lock so that
    /// [`EventLog::queued`] sees a consistent sum.
    fn set_in_flight(&self, n: usize) {
        let _q = lock(&self.queue);
        self.in_flight.store(n, Ordering::Relaxed);
    }

    fn queue_len(&self) -> usize {
        lock(&self.queue).len()
    }

    fn set_error(&self, msg: String) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(msg);
    }
}

/// The event log as sessions see it: cheap to clone, every method non-blocking.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("backend", &self.shared.backend)
            .field("queued", &self.queued())
            .field("dropped", &self.dropped())
            .finish()
    }
}

/// A snapshot of the log's counters, for metrics and the admin view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventLogStatus {
    pub enabled: bool,
    pub backend: Option<&'static str>,
    pub connected: bool,
    pub queued: usize,
    pub dropped: u64,
    pub written: u64,
    pub write_errors: u64,
    pub pruned: u64,
    pub last_error: Option<String>,
}

impl EventLog {
    /// A log that writes nothing; the live counters still count.
    pub fn disabled() -> Self {
        Self {
            shared: Arc::new(Shared::new(None, 0, 1, false)),
        }
    }

    /// Starts the writer task for `config` (which should have passed
    /// [`EventsConfig::validate`]). With an empty URL it returns a disabled log and an idle
    /// handle. Must be called inside a tokio runtime. Never waits for the database: the
    /// writer connects (and creates the schema) in the background and keeps retrying.
    pub fn start(config: &EventsConfig) -> Result<(EventLog, WriterHandle), String> {
        Self::start_with(config, WriterOptions::default())
    }

    /// [`EventLog::start`] with explicit writer options (tests, benchmarks).
    pub fn start_with(
        config: &EventsConfig,
        options: WriterOptions,
    ) -> Result<(EventLog, WriterHandle), String> {
        if !config.enabled() {
            return Ok((Self::disabled(), WriterHandle::idle()));
        }
        let errors = config.validate("events");
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let backend = Backend::from_url(&config.url)?;
        let tables = Tables::new(&options.table_prefix)?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the event log writer needs a tokio runtime".to_string())?;
        sqlx::any::install_default_drivers();
        let shared = Arc::new(Shared::new(
            Some(backend),
            config.queue_size,
            config.batch_size,
            config.log_subject,
        ));
        let cancel = CancellationToken::new();
        let writer = Writer {
            shared: shared.clone(),
            url: writer_url(&config.url, backend),
            backend,
            tables,
            flush_interval: config.flush_interval,
            retention: (config.retention_days > 0)
                .then(|| chrono::Duration::days(i64::from(config.retention_days))),
            prune_batch: config.prune_batch.max(1),
            backoff: options.backoff_min,
            options,
            cancel: cancel.clone(),
            conn: None,
            prune: Prune::Idle { next: Instant::now() },
            dropped_reported: 0,
            last_drop_warning: None,
        };
        let task = runtime.spawn(writer.run());
        let handle = WriterHandle {
            shared: Some(shared.clone()),
            cancel,
            task: Some(task),
        };
        Ok((EventLog { shared }, handle))
    }

    /// Queues a connection row. Never blocks, never fails.
    pub fn log_connection(&self, event: ConnectionEvent) {
        if event.transactions == 0 {
            self.count(event.outcome);
        }
        self.shared.push(Event::Connection(Box::new(event)));
    }

    /// Queues a transaction row. Never blocks, never fails. Drops the subject when
    /// `log_subject` is off.
    pub fn log_transaction(&self, mut event: TransactionEvent) {
        self.count(event.outcome);
        if !self.shared.log_subject {
            event.subject = None;
        }
        self.shared.push(Event::Transaction(Box::new(event)));
    }

    fn count(&self, c: Category) {
        self.shared.live[category_index(c)].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether rows go to a database.
    pub fn is_enabled(&self) -> bool {
        self.shared.backend.is_some()
    }

    pub fn backend(&self) -> Option<Backend> {
        self.shared.backend
    }

    /// Rows waiting to be written (the queue plus the batch being written).
    pub fn queued(&self) -> usize {
        // Under the lock: the writer moves rows between the two under it too.
        let q = lock(&self.shared.queue);
        q.len() + self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Rows lost: evicted from a full queue, refused by the database, or left at shutdown.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Rows committed to the database.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Failed connects, writes and prune steps.
    pub fn write_errors(&self) -> u64 {
        self.shared.write_errors.load(Ordering::Relaxed)
    }

    /// Rows deleted by retention pruning.
    pub fn pruned(&self) -> u64 {
        self.shared.pruned.load(Ordering::Relaxed)
    }

    /// The most recent error, if any.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.shared.last_error).clone()
    }

    /// Whether the writer currently has a working database connection.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Attempts per category since start (counted as rows are logged, whether or not they
    /// reach the database), in vocabulary order, zeros included.
    pub fn since_start(&self) -> Vec<(Category, u64)> {
        CATEGORIES
            .iter()
            .map(|&c| (c, self.shared.live[category_index(c)].load(Ordering::Relaxed)))
            .collect()
    }

    /// All counters at once.
    pub fn status(&self) -> EventLogStatus {
        EventLogStatus {
            enabled: self.is_enabled(),
            backend: self.backend().map(Backend::name),
            connected: self.connected(),
            queued: self.queued(),
            dropped: self.dropped(),
            written: self.written(),
            write_errors: self.write_errors(),
            pruned: self.pruned(),
            last_error: self.last_error(),
        }
    }
}

/// Owns the writer task. Dropping it without [`WriterHandle::shutdown`] lets the writer
/// drain for a few seconds in the background.
pub struct WriterHandle {
    shared: Option<Arc<Shared>>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// How long a writer whose handle was dropped keeps draining.
const DROP_DRAIN: Duration = Duration::from_secs(5);

impl WriterHandle {
    fn idle() -> Self {
        Self {
            shared: None,
            cancel: CancellationToken::new(),
            task: None,
        }
    }

    /// Asks the writer to prune old rows now rather than at its next hourly run.
    pub fn prune_now(&self) {
        if let Some(s) = &self.shared {
            s.prune_requested.store(true, Ordering::Relaxed);
            s.wake.notify_one();
        }
    }

    /// Stops the writer: it writes what is queued, as fast as the database allows, until
    /// the queue is empty or `deadline` has passed. Rows still unwritten then are lost;
    /// their number is returned (and added to [`EventLog::dropped`]). Rows logged after
    /// this returns are counted as dropped.
    pub async fn shutdown(mut self, deadline: Duration) -> u64 {
        let (Some(shared), Some(task)) = (self.shared.take(), self.task.take()) else {
            return 0;
        };
        *lock(&shared.drain_deadline) = Some(Instant::now() + deadline);
        self.cancel.cancel();
        let abort = task.abort_handle();
        // The writer watches the deadline itself; the margin covers a statement that does
        // not notice its timeout at once.
        if tokio::time::timeout(deadline + Duration::from_millis(500), task)
            .await
            .is_err()
        {
            abort.abort();
        }
        shared.closed.store(true, Ordering::Relaxed);
        let left = {
            let mut q = lock(&shared.queue);
            let n = q.len();
            q.clear();
            n
        } + shared.in_flight.swap(0, Ordering::Relaxed);
        shared.dropped.fetch_add(left as u64, Ordering::Relaxed);
        shared.connected.store(false, Ordering::Relaxed);
        if left > 0 {
            warn!(rows = left, "Event log stopped with rows unwritten.");
        }
        left as u64
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared
            && self.task.is_some()
        {
            *lock(&shared.drain_deadline) = Some(Instant::now() + DROP_DRAIN);
            self.cancel.cancel();
        }
    }
}

/// The URL the writer connects with: a SQLite file is created when missing.
fn writer_url(url: &str, backend: Backend) -> String {
    if backend != Backend::Sqlite || url.contains("mode=") {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}mode=rwc")
}

// ---------------------------------------------------------------------------------------
// The writer task

enum Prune {
    /// Next run due at `next`.
    Idle { next: Instant },
    /// Deleting rows older than `cutoff_ms` from `Tables::timed()[table]`.
    Running { table: usize, cutoff_ms: i64 },
}

struct Writer {
    shared: Arc<Shared>,
    url: String,
    backend: Backend,
    tables: Tables,
    options: WriterOptions,
    flush_interval: Duration,
    retention: Option<chrono::Duration>,
    prune_batch: u32,
    cancel: CancellationToken,
    conn: Option<AnyConnection>,
    backoff: Duration,
    prune: Prune,
    /// `dropped` when we last warned, so drops are logged once a minute, not per row.
    dropped_reported: u64,
    last_drop_warning: Option<Instant>,
}

/// What went wrong with one database operation.
enum Failure {
    /// The rows are bad: retrying them cannot work.
    Data(sqlx::Error),
    /// The connection, the server or the time limit: retry after reconnecting.
    Transient(String),
}

impl Writer {
    async fn run(mut self) {
        let mut last_flush = Instant::now();
        loop {
            self.report_drops();
            let draining = self.cancel.is_cancelled();
            if draining && self.past_drain_deadline() {
                break;
            }
            if self.conn.is_none() {
                if draining && self.shared.queue_len() == 0 {
                    break;
                }
                match self.connect().await {
                    Ok(conn) => {
                        if !self.shared.connected.swap(true, Ordering::Relaxed) {
                            info!(backend = self.backend.name(), url = %sql::redact_url(&self.url), "Event log database connected.");
                        }
                        self.conn = Some(conn);
                        self.backoff = self.options.backoff_min;
                    }
                    Err(msg) => {
                        self.failed(msg, "connect");
                        self.pause().await;
                        continue;
                    }
                }
            }

            let len = self.shared.queue_len();
            let due = len >= self.shared.batch_size
                || (len > 0 && (draining || last_flush.elapsed() >= self.flush_interval));
            if due {
                let batch = self.shared.take(self.shared.batch_size);
                self.write(batch).await;
                last_flush = Instant::now();
                continue;
            }
            if draining {
                break;
            }
            if self.prune_due() {
                self.prune_step().await;
                continue;
            }
            // Nothing due: sleep until the flush deadline (rows below a batch wait at most
            // flush_interval), a full batch, or shutdown.
            let base = if len > 0 { last_flush } else { Instant::now() };
            if len == 0 {
                last_flush = base;
            }
            tokio::select! {
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep_until(base + self.flush_interval) => {}
                _ = self.cancel.cancelled() => {}
            }
        }
        if let Some(conn) = self.conn.take() {
            // Bounded: a stalled server must not keep the task alive.
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
        }
        self.shared.connected.store(false, Ordering::Relaxed);
        debug!("Event log writer stopped.");
    }

    fn past_drain_deadline(&self) -> bool {
        lock(&self.shared.drain_deadline).is_some_and(|d| Instant::now() >= d)
    }

    /// The time limit for one operation: `limit`, cut short by the drain deadline.
    fn limit(&self, limit: Duration) -> Duration {
        match *lock(&self.shared.drain_deadline) {
            Some(d) if self.cancel.is_cancelled() => limit.min(d.saturating_duration_since(Instant::now())),
            _ => limit,
        }
    }

    // `&mut`: a shared borrow of the writer (which owns a non-`Sync` connection) would make
    // the task's future non-`Send`.
    async fn connect(&mut self) -> Result<AnyConnection, String> {
        let work = async {
            let mut conn = AnyConnection::connect(&self.url).await?;
            sql::prepare_connection(&mut conn, self.backend).await?;
            let version = sql::migrate(&mut conn, self.backend, &self.tables).await?;
            if version > sql::LATEST_VERSION {
                warn!(
                    version,
                    known = sql::LATEST_VERSION,
                    "The event log schema is newer than this thassp; writing anyway."
                );
            }
            Ok::<_, sqlx::Error>(conn)
        };
        match tokio::time::timeout(self.limit(self.options.connect_timeout), work).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(format!("connect: {e}")),
            Err(_) => Err(format!(
                "connect: no answer within {}",
                duration::format(&self.options.connect_timeout)
            )),
        }
    }

    /// Records a failure, drops the connection and logs on the first failure of a run.
    fn failed(&mut self, msg: String, what: &str) {
        self.conn = None;
        if self.shared.connected.swap(false, Ordering::Relaxed)
            || self.shared.write_errors.load(Ordering::Relaxed) == 0
        {
            warn!(backend = self.backend.name(), error = %msg, "Event log database unavailable ({what}); rows are queued.");
        } else {
            debug!(error = %msg, "Event log database still unavailable ({what}).");
        }
        self.shared.set_error(msg);
    }

    /// Waits out the backoff (cut short by shutdown, or by the drain deadline), then
    /// doubles it.
    async fn pause(&mut self) {
        let wait = self.limit(self.backoff);
        if self.cancel.is_cancelled() {
            tokio::time::sleep(wait).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.cancel.cancelled() => {}
            }
        }
        self.backoff = (self.backoff * 2).min(self.options.backoff_max);
    }

    async fn write(&mut self, batch: Vec<Event>) {
        let n = batch.len() as u64;
        match self.write_batch(&batch).await {
            Ok(()) => {
                self.shared.written.fetch_add(n, Ordering::Relaxed);
                self.shared.set_in_flight(0);
            }
            Err(Failure::Data(e)) => {
                warn!(error = %e, rows = n, "The database refused an event log batch; writing its rows one by one.");
                self.write_one_by_one(batch).await;
            }
            Err(Failure::Transient(msg)) => {
                self.shared.requeue(batch);
                self.failed(msg, "write");
                self.pause().await;
            }
        }
    }

    /// After a data error: each row in its own transaction; rows the database refuses are
    /// dropped and counted, the others written. A connection failure requeues the rest.
    async fn write_one_by_one(&mut self, batch: Vec<Event>) {
        let mut rest = batch.into_iter();
        while let Some(ev) = rest.next() {
            match self.write_batch(std::slice::from_ref(&ev)).await {
                Ok(()) => {
                    self.shared.written.fetch_add(1, Ordering::Relaxed);
                }
                Err(Failure::Data(e)) => {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    self.shared.set_error(format!("row refused and dropped: {e}"));
                }
                Err(Failure::Transient(msg)) => {
                    let mut left = vec![ev];
                    left.extend(rest);
                    self.shared.requeue(left);
                    self.failed(msg, "write");
                    self.pause().await;
                    return;
                }
            }
            self.shared.set_in_flight(rest.len());
        }
        self.shared.set_in_flight(0);
    }

    async fn write_batch(&mut self, batch: &[Event]) -> Result<(), Failure> {
        let limit = self.limit(self.options.write_timeout);
        let (backend, tables) = (self.backend, &self.tables);
        let Some(conn) = self.conn.as_mut() else {
            return Err(Failure::Transient("not connected".into()));
        };
        match tokio::time::timeout(limit, insert_batch(conn, backend, tables, batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if sql::is_data_error(&e) => Err(Failure::Data(e)),
            Ok(Err(e)) => Err(Failure::Transient(format!("write: {e}"))),
            Err(_) => Err(Failure::Transient(format!(
                "write: no answer within {}",
                duration::format(&limit)
            ))),
        }
    }

    fn prune_due(&mut self) -> bool {
        let Some(retention) = self.retention else {
            self.shared.prune_requested.store(false, Ordering::Relaxed);
            return false;
        };
        if let Prune::Idle { next } = self.prune {
            let asked = self.shared.prune_requested.swap(false, Ordering::Relaxed);
            if !asked && Instant::now() < next {
                return false;
            }
            let cutoff_ms = (Utc::now() - retention).timestamp_millis();
            self.prune = Prune::Running { table: 0, cutoff_ms };
        }
        true
    }

    /// Deletes one batch of old rows from one table.
    async fn prune_step(&mut self) {
        let Prune::Running { table, cutoff_ms } = self.prune else {
            return;
        };
        let timed = self.tables.timed();
        let Some(&(name, col)) = timed.get(table) else {
            self.prune = Prune::Idle {
                next: Instant::now() + self.options.prune_interval,
            };
            return;
        };
        let stmt = sql::prune_sql(self.backend, name, col, self.prune_batch);
        let limit = self.limit(self.options.write_timeout);
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let run = sqlx::query(AssertSqlSafe(stmt)).bind(cutoff_ms).execute(conn);
        match tokio::time::timeout(limit, run).await {
            Ok(Ok(done)) => {
                let n = done.rows_affected();
                self.shared.pruned.fetch_add(n, Ordering::Relaxed);
                if n < u64::from(self.prune_batch) {
                    let next_table = table + 1;
                    self.prune = if next_table < timed.len() {
                        Prune::Running {
                            table: next_table,
                            cutoff_ms,
                        }
                    } else {
                        Prune::Idle {
                            next: Instant::now() + self.options.prune_interval,
                        }
                    };
                }
            }
            Ok(Err(e)) => {
                self.failed(format!("prune: {e}"), "prune");
                self.pause().await;
            }
            Err(_) => {
                self.failed("prune: no answer in time".into(), "prune");
                self.pause().await;
            }
        }
    }

    fn report_drops(&mut self) {
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        if dropped == self.dropped_reported {
            return;
        }
        if self
            .last_drop_warning
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        warn!(
            dropped = dropped - self.dropped_reported,
            total = dropped,
            "Event log rows dropped (queue full or rows refused)."
        );
        self.dropped_reported = dropped;
        self.last_drop_warning = Some(Instant::now());
    }
}

// ---------------------------------------------------------------------------------------
// Inserting rows

/// At most this many bound parameters per statement (SQLite's historical limit is 999).
const MAX_PARAMS: usize = 990;

/// Splits `rows` into chunks whose lengths are powers of two, the largest that keeps
/// `columns` × rows within [`MAX_PARAMS`] first. A multi-row INSERT is one statement per
/// row count: with every batch length its own statement, the connection's statement cache
/// kept missing and SQLite parsed a statement of hundreds of placeholders again for most
/// batches (a few percent of the work per message). Now each table has at most ten shapes,
/// prepared once.
fn pow2_chunks<T>(rows: &[T], columns: usize) -> Vec<&[T]> {
    let max = MAX_PARAMS / columns.max(1);
    let largest = if max == 0 { 1 } else { 1 << max.ilog2() };
    let mut out = Vec::new();
    let mut rest = rows;
    while !rest.is_empty() {
        let n = largest.min(1 << rest.len().ilog2());
        let (chunk, tail) = rest.split_at(n);
        out.push(chunk);
        rest = tail;
    }
    out
}

/// Writes `batch` in one database transaction, with multi-row inserts.
async fn insert_batch(
    conn: &mut AnyConnection,
    backend: Backend,
    t: &Tables,
    batch: &[Event],
) -> Result<(), sqlx::Error> {
    let mut connections = Vec::new();
    let mut transactions = Vec::new();
    for ev in batch {
        match ev {
            Event::Connection(c) => connections.push(&**c),
            Event::Transaction(tx) => transactions.push(&**tx),
        }
    }
    let recipients: Vec<(&TransactionEvent, &RecipientResult)> = transactions
        .iter()
        .flat_map(|tx| tx.recipients.iter().map(move |r| (*tx, r)))
        .collect();

    let mut db = conn.begin().await?;
    for chunk in pow2_chunks(&connections, sql::CONNECTION_COLUMNS.len()) {
        let stmt = sql::insert_sql(backend, &t.connections, sql::CONNECTION_COLUMNS, chunk.len());
        let mut q = sqlx::query(AssertSqlSafe(stmt));
        for c in chunk {
            q = bind_connection(q, c);
        }
        q.execute(&mut *db).await?;
    }
    for chunk in pow2_chunks(&transactions, sql::TRANSACTION_COLUMNS.len()) {
        let stmt = sql::insert_sql(backend, &t.transactions, sql::TRANSACTION_COLUMNS, chunk.len());
        let mut q = sqlx::query(AssertSqlSafe(stmt));
        for tx in chunk {
            q = bind_transaction(q, tx);
        }
        q.execute(&mut *db).await?;
    }
    for chunk in pow2_chunks(&recipients, sql::RECIPIENT_COLUMNS.len()) {
        let stmt = sql::insert_sql(backend, &t.recipients, sql::RECIPIENT_COLUMNS, chunk.len());
        let mut q = sqlx::query(AssertSqlSafe(stmt));
        for (tx, r) in chunk {
            q = q
                .bind(clip(&tx.session_id, sql::width::SESSION))
                .bind(to_i32(tx.seq))
                .bind(tx.time.timestamp_millis())
                .bind(clip(&r.address.to_lowercase(), sql::width::ADDRESS))
                .bind(clip(&r.reply, sql::width::REPLY));
        }
        q.execute(&mut *db).await?;
    }
    db.commit().await
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

fn bind_connection<'q>(q: AnyQuery<'q>, c: &ConnectionEvent) -> AnyQuery<'q> {
    use sql::width::*;
    q.bind(clip(&c.session_id, SESSION))
        .bind(c.connect_time.timestamp_millis())
        .bind(c.end_time.timestamp_millis())
        .bind(ip_text(c.client.ip()))
        .bind(i32::from(c.client.port()))
        .bind(c.proxied_by.map(|a| ip_text(a.ip())))
        .bind(c.proxied_by.map(|a| i32::from(a.port())))
        .bind(clip_opt(&c.ptr, NAME))
        .bind(clip_opt(&c.helo, NAME))
        .bind(clip_opt(&c.tls_version, SHORT))
        .bind(clip_opt(&c.tls_cipher, CIPHER))
        .bind(clip_opt(&c.auth_user, NAME))
        .bind(to_i32(c.transactions))
        .bind(c.outcome.as_str())
        .bind(clip_opt(&c.check, CHECK))
        .bind(clip_opt(&c.last_reply, REPLY))
        .bind(to_i64(c.bytes_in))
        .bind(to_i64(c.bytes_out))
}

fn bind_transaction<'q>(q: AnyQuery<'q>, tx: &TransactionEvent) -> AnyQuery<'q> {
    use sql::width::*;
    let sender = tx.sender.to_lowercase();
    let domain = sender.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    let score = if tx.score.is_finite() {
        f64::from(tx.score)
    } else {
        0.0
    };
    q.bind(clip(&tx.session_id, SESSION))
        .bind(to_i32(tx.seq))
        .bind(tx.time.timestamp_millis())
        .bind(ip_text(tx.client_ip))
        .bind(clip(&sender, ADDRESS))
        .bind(clip(domain, NAME))
        .bind(to_i32(u32::try_from(tx.recipients.len()).unwrap_or(u32::MAX)))
        .bind(to_i64(tx.size))
        .bind(clip_opt(&tx.message_id, NAME))
        .bind(clip_opt(&tx.subject, SUBJECT))
        .bind(tx.outcome.as_str())
        .bind(clip_opt(&tx.check, CHECK))
        .bind(clip_opt(&tx.reply, REPLY))
        .bind(clip_opt(&tx.upstream_reply, REPLY))
        .bind(clip_opt(&tx.queue_id, QUEUE_ID))
        .bind(clip(&tx.spf, NAME))
        .bind(clip(&tx.dkim, NAME))
        .bind(clip(&tx.dmarc, NAME))
        .bind(score)
        .bind(i64::from(tx.timings.total_ms))
        .bind(i64::from(tx.timings.mail_ms))
        .bind(i64::from(tx.timings.rcpt_ms))
        .bind(i64::from(tx.timings.data_ms))
        .bind(i64::from(tx.timings.upstream_ms))
}

/// `s` without NUL characters (PostgreSQL refuses them in text) and cut to `max`
/// characters (MySQL strict mode and PostgreSQL refuse a longer value, and with it the
/// whole batch).
fn clip(s: &str, max: usize) -> String {
    // Nearly every value is short and clean: copied as it is.
    if s.len() <= max && !s.as_bytes().contains(&0) {
        return s.to_owned();
    }
    let mut out: String = s.chars().filter(|&c| c != '\0').take(max).collect();
    out.shrink_to_fit();
    out
}

fn clip_opt(s: &Option<String>, max: usize) -> Option<String> {
    s.as_deref().map(|s| clip(s, max))
}

/// An address as text; IPv4-mapped IPv6 addresses as plain IPv4, so one search finds both.
fn ip_text(ip: IpAddr) -> String {
    ip.to_canonical().to_string()
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_into_power_of_two_chunks_within_the_parameter_limit() {
        for columns in [1, 6, 18, 24, 500, 990, 2000] {
            let max = (MAX_PARAMS / columns).max(1);
            let mut shapes = std::collections::BTreeSet::new();
            for n in 0..=700 {
                let rows: Vec<usize> = (0..n).collect();
                let chunks = pow2_chunks(&rows, columns);
                // Every row once, in order.
                assert_eq!(chunks.concat(), rows, "{columns} columns, {n} rows");
                for c in &chunks {
                    assert!(
                        c.len().is_power_of_two() && c.len() <= max,
                        "{columns} columns, {n} rows: {}",
                        c.len()
                    );
                    shapes.insert(c.len());
                }
            }
            assert!(shapes.len() <= 10, "{columns} columns: {shapes:?}");
        }
    }

    #[test]
    fn categories_round_trip() {
        for (i, c) in CATEGORIES.iter().enumerate() {
            assert_eq!(category_index(*c), i);
            assert_eq!(parse_category(c.as_str()), Some(*c));
        }
        assert_eq!(parse_category("nonsense"), None);
    }

    #[test]
    fn config_defaults_and_validation() {
        let c: EventsConfig = toml::from_str("").unwrap();
        assert_eq!(c, EventsConfig::default());
        assert!(c.validate("events").is_empty());
        let c: EventsConfig = toml::from_str("url = \"\"\nflush_interval = \"250ms\"").unwrap();
        assert!(!c.enabled());
        assert_eq!(c.flush_interval, Duration::from_millis(250));
        assert!(toml::from_str::<EventsConfig>("bogus = 1").is_err());
        let bad = EventsConfig {
            url: "redis://x".into(),
            queue_size: 10,
            batch_size: 20,
            flush_interval: Duration::ZERO,
            retention_days: 1,
            prune_batch: 0,
            log_subject: true,
        };
        let errors = bad.validate("events");
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors.iter().all(|e| e.starts_with("events.")));
    }

    #[test]
    fn values_are_clipped_for_strict_databases() {
        assert_eq!(clip("a\0bc", 2), "ab");
        assert_eq!(clip("ééé", 2), "éé");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(ip_text(mapped), "192.0.2.1");
        assert_eq!(to_i64(u64::MAX), i64::MAX);
    }

    #[test]
    fn sqlite_files_are_created() {
        assert_eq!(
            writer_url("sqlite://x.db", Backend::Sqlite),
            "sqlite://x.db?mode=rwc"
        );
        assert_eq!(
            writer_url("sqlite://x.db?mode=ro", Backend::Sqlite),
            "sqlite://x.db?mode=ro"
        );
        assert_eq!(writer_url("mysql://h/db", Backend::MySql), "mysql://h/db");
    }

    #[test]
    fn full_queue_drops_the_oldest() {
        let s = Shared::new(Some(Backend::Sqlite), 3, 2, true);
        for i in 0..5u32 {
            s.push(Event::Connection(Box::new(conn_event(i))));
        }
        assert_eq!(s.dropped.load(Ordering::Relaxed), 2);
        let batch = s.take(10);
        let ids: Vec<u32> = batch
            .iter()
            .map(|e| match e {
                Event::Connection(c) => c.transactions,
                Event::Transaction(t) => t.seq,
            })
            .collect();
        assert_eq!(ids, [2, 3, 4]);
        // Requeued behind newer rows, the old batch is still the oldest and goes first.
        s.push(Event::Connection(Box::new(conn_event(5))));
        s.requeue(batch);
        assert_eq!(s.queue_len(), 3);
        assert_eq!(s.dropped.load(Ordering::Relaxed), 3);
    }

    fn conn_event(n: u32) -> ConnectionEvent {
        ConnectionEvent {
            session_id: format!("s{n}"),
            connect_time: Utc::now(),
            end_time: Utc::now(),
            client: "192.0.2.1:25".parse().unwrap(),
            proxied_by: None,
            ptr: None,
            helo: None,
            tls_version: None,
            tls_cipher: None,
            auth_user: None,
            transactions: n,
            outcome: Category::Other,
            check: None,
            last_reply: None,
            bytes_in: 0,
            bytes_out: 0,
        }
    }
}
