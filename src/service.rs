//! The one admin API. The web UI and JSON API ([`crate::admin::web`]), the line console
//! ([`crate::admin::console`]) and the CLI call these methods and only translate their
//! results: no front end holds admin logic of its own (DESIGN.md, "Administration").
//!
//! Every method is a plain `async fn` on [`Service`] returning a typed, serialisable result
//! or a [`ServiceError`]. Inputs are bounded here (lengths, limits, periods), so a front end
//! can pass user input through unchanged.
//!
//! # State-store keys written here
//!
//! - `Ns::List`, `white:ENTRY` / `black:ENTRY`: admin-managed list entries. `ENTRY` is the
//!   entry in list-file syntax (see [`crate::policy::lists::parse_entry`]) in a canonical
//!   form (lower case, networks with host bits cleared), so one entry has one key. The value
//!   is JSON `{"added_ms": <epoch ms>, "note": "<text>"}`; the lists check needs only the
//!   keys ([`admin_list_entries`] reads them).
//! - `Ns::Grey` (release): the triplet's first-seen time is moved back by the embargo, so
//!   the sender's next retry passes and is auto-whitelisted exactly as a normal pass.
//! - `Ns::Block` and `Ns::Reputation` (unblock, tarpit clear): deleted.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use serde::Serialize;
use tracing::{info, warn};

use crate::app::{App, Counters};
use crate::config::Config;
use crate::events::{
    ConnectionEvent, EventLogStatus, EventQuery, OutcomeRow, Stats, Totals, TransactionEvent,
};
use crate::live::LiveSession;
use crate::policy::Category;
use crate::policy::lists::{AddressPattern, Entry, HeloPattern, parse_entry};
use crate::store::{Ns, Record, Store, StoreError, StoreHealth};

/// Most store entries one listing or search looks at; beyond it the result says
/// `truncated` (the store is a cache of recent state, not a database to page through).
pub const MAX_SCAN: usize = 10_000;
/// Most rows one listing returns.
pub const MAX_LIMIT: u32 = 1000;
/// Rows a listing returns when the caller does not say.
pub const DEFAULT_LIMIT: u32 = 100;
/// Longest list entry, greylist key or search text accepted.
pub const MAX_KEY_LEN: usize = 1024;
/// Longest note on a list entry.
pub const MAX_NOTE_LEN: usize = 200;
/// Largest candidate configuration `check` parses.
pub const MAX_CONFIG_TEXT: usize = 1 << 20;
/// Events searches page at most this deep with `offset` (use the `before` cursor beyond).
pub const MAX_OFFSET: u32 = 10_000;
/// Live sessions the status includes.
pub const STATUS_SESSIONS: usize = 100;
/// Longest wait for the event database when opening the statistics pool.
const STATS_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Errors

/// Why a service call failed; front ends map each variant to a status (HTTP) or a line
/// (console). Only `Internal` hides its detail from the caller (it is logged instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The named thing does not exist (a list entry, greylist key, block).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request itself is wrong; the text says how to fix it.
    #[error("{0}")]
    BadRequest(String),
    /// A dependency is away or disabled (event database, shared store); retrying may help.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected backend answer; the text is for the log, not the client.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Unavailable(format!("state store: {m}")),
            StoreError::Backend(m) => Self::Internal(format!("state store: {m}")),
        }
    }
}

fn sql_error(e: sqlx::Error) -> ServiceError {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            ServiceError::Unavailable(format!("event database: {}", scrub_urls(&e.to_string())))
        }
        other => ServiceError::Internal(format!("event database: {}", scrub_urls(&other.to_string()))),
    }
}

// ---------------------------------------------------------------------------------------
// Result types

/// Everything the status page shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_secs: u64,
    pub hostname: String,
    pub listeners: Vec<ListenerStatus>,
    pub upstreams: Vec<UpstreamStatus>,
    pub store: StoreHealth,
    pub events: EventLogStatus,
    pub dnsbl: Vec<ZoneView>,
    pub counters: CountersView,
    /// Attempts per category since start (live counters, also rows the database never got).
    pub since_start: Vec<OutcomeRow>,
    /// Sessions in progress now.
    pub sessions_current: usize,
    /// The longest-running sessions in progress (at most [`STATUS_SESSIONS`]).
    pub sessions: Vec<LiveSession>,
}

/// A configured listener.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerStatus {
    /// As configured (a `:0` port is chosen by the system at start).
    pub address: String,
    pub hostname: Option<String>,
    /// `none`, `starttls` or `implicit`.
    pub tls: &'static str,
    pub require_tls: bool,
    pub proxy_protocol: bool,
}

/// One upstream MTA and what its last probe found.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub address: String,
    /// True when the last probe succeeded; false when it failed or none ran yet.
    pub healthy: bool,
    pub last_probe: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// `None` until the MTA was reached once.
    pub capabilities: Option<CapabilitiesView>,
}

/// An upstream's EHLO extensions.
#[derive(Debug, Clone, Serialize)]
pub struct CapabilitiesView {
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
    pub starttls: bool,
    pub chunking: bool,
    pub xclient: Vec<String>,
    pub xforward: Vec<String>,
    pub auth: Vec<String>,
}

/// A DNSBL zone's self-test state.
#[derive(Debug, Clone, Serialize)]
pub struct ZoneView {
    pub zone: String,
    pub enabled: bool,
    pub reason: Option<String>,
    pub last_test: Option<DateTime<Utc>>,
}

/// Process-wide counters since start.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CountersView {
    pub sessions: u64,
    pub tls_handshake_failures: u64,
    pub auth_failures: u64,
    pub proxy_protocol_refused: u64,
}

/// Statistics over a period from the event log.
#[derive(Debug, Clone, Serialize)]
pub struct StatsReport {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub totals: Totals,
    /// The ThASSP table: every attempt in exactly one category, most frequent first.
    pub outcomes: Vec<OutcomeRow>,
    /// Attempts per UTC day and category.
    pub daily: Vec<DaySeries>,
    /// Attempts per UTC hour and category, for periods of up to a week (empty otherwise).
    pub hourly: Vec<HourSeries>,
    /// The category the top lists are restricted to (`None`: all).
    pub category: Option<&'static str>,
    pub top_clients: Vec<TopEntry>,
    pub top_sender_domains: Vec<TopEntry>,
}

/// One hour of the per-hour series, categories with attempts only.
#[derive(Debug, Clone, Serialize)]
pub struct HourSeries {
    pub hour: DateTime<Utc>,
    pub counts: BTreeMap<&'static str, u64>,
    pub total: u64,
}

/// One day of the per-day series, categories with attempts only.
#[derive(Debug, Clone, Serialize)]
pub struct DaySeries {
    pub day: NaiveDate,
    pub counts: BTreeMap<&'static str, u64>,
    pub total: u64,
}

/// A client or domain and its attempts.
#[derive(Debug, Clone, Serialize)]
pub struct TopEntry {
    pub name: String,
    pub count: u64,
}

/// Which rows an events search returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// One row per mail transaction (default).
    #[default]
    Transactions,
    /// One row per client connection.
    Connections,
}

impl EventKind {
    pub fn parse(s: &str) -> Result<Self, ServiceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "transactions" | "transaction" | "tx" => Ok(Self::Transactions),
            "connections" | "connection" | "conn" => Ok(Self::Connections),
            other => Err(ServiceError::BadRequest(format!(
                "kind {other:?}: use transactions or connections"
            ))),
        }
    }
}

/// An events search. Every filter is optional; rows come newest first.
#[derive(Debug, Clone, Default)]
pub struct EventSearch {
    pub kind: EventKind,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Cursor: only rows strictly older than this (the `next_before` of the previous page).
    /// Rows sharing the cursor's exact millisecond with the previous page's last row are
    /// skipped; use `offset` when that matters.
    pub before: Option<DateTime<Utc>>,
    pub client_ip: Option<IpAddr>,
    /// Exact envelope sender (transactions only).
    pub sender: Option<String>,
    /// Exact recipient (transactions only).
    pub recipient: Option<String>,
    pub outcome: Option<Category>,
    pub session_id: Option<String>,
    /// Rows per page: 0 means [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`].
    pub limit: u32,
    /// Rows to skip, at most [`MAX_OFFSET`].
    pub offset: u32,
}

/// One page of events.
#[derive(Debug, Clone, Serialize)]
pub struct EventPage {
    pub kind: EventKind,
    pub items: Vec<EventItem>,
    /// More rows exist: pass this as `before` for the next page.
    pub next_before: Option<DateTime<Utc>>,
    /// More rows exist: pass this as `offset` for the next page (while under the bound).
    pub next_offset: Option<u32>,
}

/// A connection or a transaction row.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EventItem {
    Connection(ConnectionView),
    Transaction(TransactionView),
}

impl EventItem {
    fn time(&self) -> DateTime<Utc> {
        match self {
            Self::Connection(c) => c.connect_time,
            Self::Transaction(t) => t.time,
        }
    }
}

/// A connection row.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionView {
    pub session_id: String,
    pub connect_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    pub client: String,
    pub client_ip: String,
    pub proxied_by: Option<String>,
    pub ptr: Option<String>,
    pub helo: Option<String>,
    pub tls_version: Option<String>,
    pub tls_cipher: Option<String>,
    pub auth_user: Option<String>,
    pub transactions: u32,
    pub outcome: &'static str,
    pub check: Option<String>,
    pub last_reply: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl From<ConnectionEvent> for ConnectionView {
    fn from(c: ConnectionEvent) -> Self {
        Self {
            session_id: c.session_id,
            connect_time: c.connect_time,
            end_time: c.end_time,
            client: c.client.to_string(),
            client_ip: c.client.ip().to_canonical().to_string(),
            proxied_by: c.proxied_by.map(|p| p.to_string()),
            ptr: c.ptr,
            helo: c.helo,
            tls_version: c.tls_version,
            tls_cipher: c.tls_cipher,
            auth_user: c.auth_user,
            transactions: c.transactions,
            outcome: c.outcome.as_str(),
            check: c.check,
            last_reply: c.last_reply,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
        }
    }
}

/// A transaction row with its recipients.
#[derive(Debug, Clone, Serialize)]
pub struct TransactionView {
    pub session_id: String,
    pub seq: u32,
    pub time: DateTime<Utc>,
    pub client_ip: String,
    pub sender: String,
    pub recipients: Vec<RecipientView>,
    pub size: u64,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub outcome: &'static str,
    pub check: Option<String>,
    pub reply: Option<String>,
    pub upstream_reply: Option<String>,
    pub queue_id: Option<String>,
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    pub score: f32,
    pub total_ms: u32,
    pub upstream_ms: u32,
}

/// A recipient and the reply the client got for it.
#[derive(Debug, Clone, Serialize)]
pub struct RecipientView {
    pub address: String,
    pub reply: String,
}

impl From<TransactionEvent> for TransactionView {
    fn from(t: TransactionEvent) -> Self {
        Self {
            session_id: t.session_id,
            seq: t.seq,
            time: t.time,
            client_ip: t.client_ip.to_canonical().to_string(),
            sender: t.sender,
            recipients: t
                .recipients
                .into_iter()
                .map(|r| RecipientView {
                    address: r.address,
                    reply: r.reply,
                })
                .collect(),
            size: t.size,
            message_id: t.message_id,
            subject: t.subject,
            outcome: t.outcome.as_str(),
            check: t.check,
            reply: t.reply,
            upstream_reply: t.upstream_reply,
            queue_id: t.queue_id,
            spf: t.spf,
            dkim: t.dkim,
            dmarc: t.dmarc,
            score: t.score,
            total_ms: t.timings.total_ms,
            upstream_ms: t.timings.upstream_ms,
        }
    }
}

/// The admin-managed lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    White,
    Black,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::White => "white",
            Self::Black => "black",
        }
    }

    /// `white`/`whitelist` or `black`/`blacklist`, any case.
    pub fn parse(s: &str) -> Result<Self, ServiceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "white" | "whitelist" => Ok(Self::White),
            "black" | "blacklist" => Ok(Self::Black),
            other => Err(ServiceError::BadRequest(format!(
                "list {other:?}: use white or black"
            ))),
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Self::White => "white:",
            Self::Black => "black:",
        }
    }
}

/// One admin-managed list entry.
#[derive(Debug, Clone, Serialize)]
pub struct ListEntry {
    pub list: ListKind,
    /// The entry in list-file syntax, canonical form.
    pub entry: String,
    /// `ip`, `helo`, `sender` or `recipient`.
    pub kind: &'static str,
    pub note: String,
    pub added: Option<DateTime<Utc>>,
}

/// What adding an entry did.
#[derive(Debug, Clone, Serialize)]
pub struct ListChange {
    pub entry: ListEntry,
    /// False when the entry was there already (its note is updated).
    pub created: bool,
}

/// Admin list entries, as the lists check needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminLists {
    pub white: Vec<String>,
    pub black: Vec<String>,
}

/// A greylist triplet.
#[derive(Debug, Clone, Serialize)]
pub struct GreyEntry {
    /// The store key: `client|sender|recipient`.
    pub key: String,
    /// `n:NETWORK` or `d:ORGANISATIONAL-DOMAIN`.
    pub client: String,
    /// Normalised sender (`<>` for the null sender).
    pub sender: String,
    pub recipient: String,
    pub first_seen: Option<DateTime<Utc>>,
    /// When the entry is forgotten (end of the retry window).
    pub expires: Option<DateTime<Utc>>,
    /// Seconds until a retry is accepted; 0: the next retry passes.
    pub retry_in_secs: u64,
}

/// A page of greylist entries.
#[derive(Debug, Clone, Serialize)]
pub struct GreyList {
    pub entries: Vec<GreyEntry>,
    /// More entries matched than were looked at or returned.
    pub truncated: bool,
}

/// A blocked client.
#[derive(Debug, Clone, Serialize)]
pub struct BlockEntry {
    /// The client address or network.
    pub key: String,
    /// `autoblacklist` or `trap:<address>`.
    pub reason: String,
    pub expires: Option<DateTime<Utc>>,
}

/// A client with counted failures.
#[derive(Debug, Clone, Serialize)]
pub struct TarpitEntry {
    /// The client address, or its network with `per_network`.
    pub key: String,
    /// Failures in the sliding window.
    pub failures: u64,
    /// Replies to it are delayed.
    pub tarpitted: bool,
}

/// A listing with a truncation flag.
#[derive(Debug, Clone, Serialize)]
pub struct Listing<T> {
    pub entries: Vec<T>,
    pub truncated: bool,
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// False: the running configuration stays; `errors` say why.
    pub reloaded: bool,
    /// The file read, or `running configuration` when none is known.
    pub source: String,
    /// Changes that take effect only after a restart.
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

/// The verdict on a candidate configuration.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub valid: bool,
    pub errors: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// The service

/// The admin API over the running application.
pub struct Service {
    app: Arc<App>,
    /// The file a reload reads (the one `thassp run --config` named). `None`: reload
    /// re-applies the running configuration (certificates and list files are re-read).
    config_path: Option<PathBuf>,
    /// The statistics pool, opened on first use and kept (keyed by the URL it was opened
    /// for, so a changed `events.url` after a restart-free reload is noticed).
    stats: tokio::sync::Mutex<Option<(String, Stats)>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl Service {
    pub fn new(app: Arc<App>, config_path: Option<PathBuf>) -> Self {
        Self {
            app,
            config_path,
            stats: tokio::sync::Mutex::new(None),
        }
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    // --- status -----------------------------------------------------------------------

    /// Version, uptime, listeners, upstream health, store and event log health, DNSBL
    /// zones and counters. Never fails: every part is read from memory.
    pub fn status(&self) -> Status {
        let snap = self.app.snapshot();
        let config = &snap.config;
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerStatus {
                address: l.address.clone(),
                hostname: l.hostname.clone(),
                tls: match l.tls_mode() {
                    crate::config::ListenerTls::None => "none",
                    crate::config::ListenerTls::Starttls => "starttls",
                    crate::config::ListenerTls::Implicit => "implicit",
                },
                require_tls: l.require_tls,
                proxy_protocol: l.proxy_protocol,
            })
            .collect();
        let upstreams = snap
            .routes
            .upstreams
            .iter()
            .map(|u| {
                let health = u.health();
                UpstreamStatus {
                    name: u.name.clone(),
                    address: u.address.clone(),
                    healthy: health.last_probe.is_some() && health.last_error.is_none(),
                    last_probe: health.last_probe.and_then(time_of),
                    last_error: health.last_error,
                    capabilities: u.capabilities().map(|c| CapabilitiesView {
                        pipelining: c.pipelining,
                        size: c.size,
                        eight_bit_mime: c.eight_bit_mime,
                        smtputf8: c.smtputf8,
                        dsn: c.dsn,
                        enhanced_status_codes: c.enhanced_status_codes,
                        starttls: c.starttls,
                        chunking: c.chunking,
                        xclient: c.xclient.clone(),
                        xforward: c.xforward.clone(),
                        auth: c.auth.clone(),
                    }),
                }
            })
            .collect();
        let dnsbl = snap
            .dnsbl
            .as_ref()
            .map(|d| {
                d.zone_status()
                    .into_iter()
                    .map(|z| ZoneView {
                        zone: z.zone,
                        enabled: z.enabled,
                        reason: z.reason,
                        last_test: z.last_test.and_then(time_of),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let c = &snap.counters;
        let mut store = self.app.store().health();
        store.last_error = store.last_error.map(|e| scrub_urls(&e));
        let mut events = self.app.events().status();
        events.last_error = events.last_error.map(|e| scrub_urls(&e));
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: self.app.started.elapsed().as_secs(),
            hostname: snap.hostname.clone(),
            listeners,
            upstreams,
            store,
            events,
            dnsbl,
            counters: CountersView {
                sessions: Counters::get(&c.sessions),
                tls_handshake_failures: Counters::get(&c.tls_handshake_failures),
                auth_failures: Counters::get(&c.auth_failures),
                proxy_protocol_refused: Counters::get(&c.proxy_protocol_refused),
            },
            since_start: live_outcomes(&self.app.events().since_start()),
            sessions_current: snap.live.count(),
            sessions: snap.live.list(STATUS_SESSIONS),
        }
    }

    /// Sessions in progress, longest-running first, at most `limit` (0: [`DEFAULT_LIMIT`]).
    pub fn sessions(&self, limit: u32) -> Vec<LiveSession> {
        self.app.snapshot().live.list(clamp_limit(limit))
    }

    // --- statistics -------------------------------------------------------------------

    /// The statistics pool for the running `events.url`, opened once and reused.
    async fn stats_pool(&self) -> Result<Stats, ServiceError> {
        let snap = self.app.snapshot();
        let events = &snap.config.events;
        if events.url.is_empty() {
            return Err(ServiceError::Unavailable(
                "the event log is disabled (events.url is empty)".into(),
            ));
        }
        let mut cached = self.stats.lock().await;
        if let Some((url, stats)) = cached.as_ref()
            && *url == events.url
        {
            return Ok(stats.clone());
        }
        let opened = tokio::time::timeout(STATS_OPEN_TIMEOUT, Stats::open(events))
            .await
            .map_err(|_| ServiceError::Unavailable("event database: no answer".into()))?
            .map_err(|e| ServiceError::Unavailable(format!("event database: {}", scrub_urls(&e))))?;
        if let Some((_, old)) = cached.replace((events.url.clone(), opened.clone())) {
            old.close().await;
        }
        Ok(opened)
    }

    /// The outcome table, totals, per-day series and top lists for `[since, until)`.
    /// `category` restricts the top lists; `top` is their length (1–100, default 10).
    ///
    /// # Errors
    /// `Unavailable` when the event log is disabled or its database is away.
    pub async fn stats(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        category: Option<Category>,
        top: u32,
    ) -> Result<StatsReport, ServiceError> {
        if since >= until {
            return Err(ServiceError::BadRequest("since must be before until".into()));
        }
        let stats = self.stats_pool().await?;
        let top = if top == 0 { 10 } else { top.min(100) };
        let utc = FixedOffset::east_opt(0).ok_or_else(|| ServiceError::Internal("UTC offset".into()))?;
        let totals = stats.totals(since, until).await.map_err(sql_error)?;
        let outcomes = stats.outcome_table(since, until).await.map_err(sql_error)?;
        let daily = stats.daily(since, until, utc).await.map_err(sql_error)?;
        // Hourly bars stay readable up to a week (168 of them).
        let hourly = if until - since <= chrono::Duration::days(7) {
            stats.hourly(since, until).await.map_err(sql_error)?
        } else {
            Vec::new()
        };
        let mut hours: BTreeMap<DateTime<Utc>, HourSeries> = BTreeMap::new();
        for h in hourly {
            let e = hours.entry(h.hour).or_insert_with(|| HourSeries {
                hour: h.hour,
                counts: BTreeMap::new(),
                total: 0,
            });
            *e.counts.entry(h.category.as_str()).or_default() += h.count;
            e.total += h.count;
        }
        let clients = stats
            .top_clients(since, until, category, top)
            .await
            .map_err(sql_error)?;
        let domains = stats
            .top_sender_domains(since, until, category, top)
            .await
            .map_err(sql_error)?;
        let mut days: BTreeMap<NaiveDate, DaySeries> = BTreeMap::new();
        for d in daily {
            let e = days.entry(d.day).or_insert_with(|| DaySeries {
                day: d.day,
                counts: BTreeMap::new(),
                total: 0,
            });
            *e.counts.entry(d.category.as_str()).or_default() += d.count;
            e.total += d.count;
        }
        let top_entries = |v: Vec<(String, u64)>| {
            v.into_iter()
                .map(|(name, count)| TopEntry { name, count })
                .collect()
        };
        Ok(StatsReport {
            since,
            until,
            totals,
            outcomes,
            daily: days.into_values().collect(),
            hourly: hours.into_values().collect(),
            category: category.map(Category::as_str),
            top_clients: top_entries(clients),
            top_sender_domains: top_entries(domains),
        })
    }

    /// [`Service::stats`] for the last `period`.
    pub async fn stats_for(
        &self,
        period: Duration,
        category: Option<Category>,
        top: u32,
    ) -> Result<StatsReport, ServiceError> {
        let until = Utc::now();
        let since = ago(until, period)?;
        self.stats(since, until, category, top).await
    }

    // --- events -----------------------------------------------------------------------

    /// Searches the event log, newest first, one page at a time.
    ///
    /// # Errors
    /// `BadRequest` for filters that do not apply or are out of bounds, `Unavailable` when
    /// the event log is disabled or away.
    pub async fn events(&self, search: &EventSearch) -> Result<EventPage, ServiceError> {
        if search.offset > MAX_OFFSET {
            return Err(ServiceError::BadRequest(format!(
                "offset: at most {MAX_OFFSET} (use before= to page further)"
            )));
        }
        if search.kind == EventKind::Connections && (search.sender.is_some() || search.recipient.is_some()) {
            return Err(ServiceError::BadRequest(
                "sender and recipient filter transactions, not connections".into(),
            ));
        }
        for (name, v) in [
            ("sender", &search.sender),
            ("recipient", &search.recipient),
            ("session", &search.session_id),
        ] {
            if v.as_ref().is_some_and(|s| s.len() > MAX_KEY_LEN) {
                return Err(ServiceError::BadRequest(format!("{name}: too long")));
            }
        }
        let limit = if search.limit == 0 {
            DEFAULT_LIMIT
        } else {
            search.limit.min(MAX_LIMIT)
        };
        let until = match (search.until, search.before) {
            (Some(u), Some(b)) => Some(u.min(b)),
            (u, b) => u.or(b),
        };
        // One more row than the page, to know whether there is a next one.
        let want = search.offset.saturating_add(limit).saturating_add(1).min(10_000);
        let q = EventQuery {
            since: search.since,
            until,
            client_ip: search.client_ip,
            sender: search.sender.clone().filter(|s| !s.is_empty()),
            recipient: search.recipient.clone().filter(|s| !s.is_empty()),
            outcome: search.outcome,
            session_id: search.session_id.clone().filter(|s| !s.is_empty()),
            limit: want,
        };
        let stats = self.stats_pool().await?;
        let rows: Vec<EventItem> = match search.kind {
            EventKind::Transactions => stats
                .transactions(&q)
                .await
                .map_err(sql_error)?
                .into_iter()
                .map(|t| EventItem::Transaction(t.into()))
                .collect(),
            EventKind::Connections => stats
                .connections(&q)
                .await
                .map_err(sql_error)?
                .into_iter()
                .map(|c| EventItem::Connection(c.into()))
                .collect(),
        };
        let more = rows.len() > (search.offset + limit) as usize;
        let items: Vec<EventItem> = rows
            .into_iter()
            .skip(search.offset as usize)
            .take(limit as usize)
            .collect();
        let next_before = more.then(|| items.last().map(EventItem::time)).flatten();
        let next_offset = (more && search.offset + limit <= MAX_OFFSET).then_some(search.offset + limit);
        Ok(EventPage {
            kind: search.kind,
            items,
            next_before,
            next_offset,
        })
    }

    // --- lists ------------------------------------------------------------------------

    /// Admin-managed entries of one list or both, in key order.
    pub async fn lists(&self, list: Option<ListKind>) -> Result<Listing<ListEntry>, ServiceError> {
        let kinds: &[ListKind] = match list {
            Some(ListKind::White) => &[ListKind::White],
            Some(ListKind::Black) => &[ListKind::Black],
            None => &[ListKind::White, ListKind::Black],
        };
        let mut entries = Vec::new();
        let mut truncated = false;
        for &kind in kinds {
            let rows = self.app.store().scan(Ns::List, kind.prefix(), MAX_SCAN).await?;
            truncated |= rows.len() >= MAX_SCAN;
            for (key, record) in rows {
                if let Some(text) = key.strip_prefix(kind.prefix()) {
                    entries.push(list_entry(kind, text, &record));
                }
            }
        }
        Ok(Listing { entries, truncated })
    }

    /// Adds an entry (validated with the list-file parser); adding it again updates its
    /// note when one is given.
    ///
    /// # Errors
    /// `BadRequest` with the parser's message for an invalid entry.
    pub async fn list_add(
        &self,
        list: ListKind,
        entry: &str,
        note: &str,
    ) -> Result<ListChange, ServiceError> {
        let canonical = canonical_entry(entry)?;
        let note = clean_note(note)?;
        let key = format!("{}{canonical}", list.prefix());
        let existing = self.app.store().get(Ns::List, &key).await?;
        // Adding an entry again keeps when it was first added, and its note unless a new
        // one is given.
        let old: serde_json::Value = existing
            .as_ref()
            .and_then(|r| serde_json::from_str(&r.value).ok())
            .unwrap_or_default();
        let note = if note.is_empty() {
            old.get("note")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_string()
        } else {
            note
        };
        let added_ms = old
            .get("added_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| crate::store::epoch_ms(SystemTime::now()));
        let value = serde_json::json!({ "added_ms": added_ms, "note": note }).to_string();
        self.app.store().put(Ns::List, &key, &value, None).await?;
        info!(list = list.as_str(), entry = %canonical, "Admin list entry added.");
        self.lists_changed().await;
        let record = Record { value, expires: None };
        Ok(ListChange {
            entry: list_entry(list, &canonical, &record),
            created: existing.is_none(),
        })
    }

    /// Removes an entry (given in any form [`crate::policy::lists::parse_entry`] accepts).
    ///
    /// # Errors
    /// `NotFound` when the list has no such entry.
    pub async fn list_remove(&self, list: ListKind, entry: &str) -> Result<(), ServiceError> {
        let canonical = canonical_entry(entry)?;
        let key = format!("{}{canonical}", list.prefix());
        let mut removed = self.app.store().delete(Ns::List, &key).await?;
        // An entry stored verbatim (its canonical form was not re-parseable) is found too.
        if !removed && canonical != entry.trim() {
            let raw = format!("{}{}", list.prefix(), entry.trim());
            removed = self.app.store().delete(Ns::List, &raw).await?;
        }
        if !removed {
            return Err(ServiceError::NotFound(format!(
                "{} list entry {canonical:?}",
                list.as_str()
            )));
        }
        info!(list = list.as_str(), entry = %canonical, "Admin list entry removed.");
        self.lists_changed().await;
        Ok(())
    }

    /// Called after every list change, so the change reaches new sessions. The lists
    /// check does not read `Ns::List` yet: once `App` can rebuild its lists from the store
    /// (with [`admin_list_entries`]), this is where it is asked to. Until then the entries
    /// are persisted, listed and shared by a cluster, but not yet enforced.
    async fn lists_changed(&self) {
        self.app.refresh_admin_lists().await;
    }

    // --- greylist ---------------------------------------------------------------------

    /// Greylist entries whose key starts with `prefix` and (when given) contains `contains`
    /// (any case), at most `limit`.
    pub async fn greylist(&self, prefix: &str, contains: &str, limit: u32) -> Result<GreyList, ServiceError> {
        check_len("prefix", prefix)?;
        check_len("q", contains)?;
        let limit = clamp_limit(limit);
        let needle = contains.trim().to_lowercase();
        let rows = self.app.store().scan(Ns::Grey, prefix, MAX_SCAN).await?;
        let mut truncated = rows.len() >= MAX_SCAN;
        let embargo = self.app.snapshot().config.checks.greylist.embargo;
        let now = SystemTime::now();
        let mut entries = Vec::new();
        for (key, record) in rows {
            if !needle.is_empty() && !key.to_lowercase().contains(&needle) {
                continue;
            }
            if entries.len() >= limit {
                truncated = true;
                break;
            }
            entries.push(grey_entry(&key, &record, embargo, now));
        }
        Ok(GreyList { entries, truncated })
    }

    /// Releases a greylisted triplet: the sender's next retry passes (and is then
    /// auto-whitelisted like any pass). The first-seen time is moved back by the embargo
    /// rather than writing the auto-whitelist directly, so a release affects exactly this
    /// triplet and the normal pass path does the rest.
    ///
    /// # Errors
    /// `NotFound` when the key is not (or no longer) in the greylist.
    pub async fn grey_release(&self, key: &str) -> Result<GreyEntry, ServiceError> {
        let key = key.trim();
        check_len("key", key)?;
        if key.is_empty() {
            return Err(ServiceError::BadRequest("key: required".into()));
        }
        if self.app.store().get(Ns::Grey, key).await?.is_none() {
            return Err(ServiceError::NotFound(format!("greylist entry {key:?}")));
        }
        let greylist = &self.app.snapshot().config.checks.greylist;
        let now = SystemTime::now();
        let first_seen = crate::store::epoch_ms(now).saturating_sub(duration_ms(greylist.embargo));
        // A fresh retry window: the release should not expire before the sender retries.
        let ttl = greylist.retry_window;
        self.app
            .store()
            .put(Ns::Grey, key, &first_seen.to_string(), Some(ttl))
            .await?;
        info!(key = %key, "Greylist entry released.");
        let record = Record {
            value: first_seen.to_string(),
            expires: now.checked_add(ttl),
        };
        Ok(grey_entry(key, &record, greylist.embargo, now))
    }

    /// Forgets a greylist entry (the sender's next attempt starts a new embargo).
    pub async fn grey_delete(&self, key: &str) -> Result<(), ServiceError> {
        let key = key.trim();
        check_len("key", key)?;
        if !self.app.store().delete(Ns::Grey, key).await? {
            return Err(ServiceError::NotFound(format!("greylist entry {key:?}")));
        }
        info!(key = %key, "Greylist entry deleted.");
        Ok(())
    }

    // --- blocks and tarpit --------------------------------------------------------------

    /// Blocked clients (autoblacklist, spam traps), at most `limit`.
    pub async fn blocks(&self, limit: u32) -> Result<Listing<BlockEntry>, ServiceError> {
        let limit = clamp_limit(limit);
        let rows = self
            .app
            .store()
            .scan(Ns::Block, "", limit.saturating_add(1))
            .await?;
        let truncated = rows.len() > limit;
        let entries = rows
            .into_iter()
            .take(limit)
            .map(|(key, r)| BlockEntry {
                key,
                reason: r.value,
                expires: r.expires.and_then(time_of),
            })
            .collect();
        Ok(Listing { entries, truncated })
    }

    /// Unblocks a client: its address (and, with per-network counting, its network) leaves
    /// the block list and its failure counters are cleared, so the next failure does not
    /// block it again at once. Returns the keys removed.
    ///
    /// # Errors
    /// `BadRequest` for something that is not an address or network, `NotFound` when it
    /// was not blocked.
    pub async fn unblock(&self, client: &str) -> Result<Vec<String>, ServiceError> {
        let keys = self.client_keys(client)?;
        let mut removed = Vec::new();
        for key in &keys {
            if self.app.store().delete(Ns::Block, key).await? {
                removed.push(key.clone());
            }
        }
        if removed.is_empty() {
            return Err(ServiceError::NotFound(format!("block for {:?}", client.trim())));
        }
        for key in &keys {
            self.clear_counters(key).await?;
        }
        info!(client = %client.trim(), keys = ?removed, "Client unblocked.");
        Ok(removed)
    }

    /// Clients with failures counted, worst first, and whether they are tarpitted.
    pub async fn tarpit(&self, limit: u32) -> Result<Listing<TarpitEntry>, ServiceError> {
        let limit = clamp_limit(limit);
        let snap = self.app.snapshot();
        let rep = &snap.config.checks.reputation;
        let rows = self.app.store().scan(Ns::Reputation, "", MAX_SCAN).await?;
        let mut truncated = rows.len() >= MAX_SCAN;
        let window_ms = duration_ms(rep.window).max(1);
        let now = crate::store::epoch_ms(SystemTime::now());
        let (bucket, overlap) = (
            now / window_ms,
            1.0 - ((now % window_ms) as f64 / window_ms as f64),
        );
        // The same sliding-window estimate as `Reputation::failures`: this window's count
        // plus the previous one's, weighted by how much of it still overlaps.
        let mut by_client: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (key, record) in rows {
            let Some((client, b)) = key.rsplit_once('|') else {
                continue;
            };
            let (Ok(b), Ok(n)) = (b.parse::<u64>(), record.value.parse::<u64>()) else {
                continue;
            };
            let e = by_client.entry(client.to_string()).or_default();
            if b == bucket {
                e.0 += n;
            } else if b + 1 == bucket {
                e.1 += n;
            }
        }
        let mut entries: Vec<TarpitEntry> = by_client
            .into_iter()
            .map(|(key, (cur, prev))| {
                let failures = cur + (prev as f64 * overlap).round() as u64;
                TarpitEntry {
                    key,
                    failures,
                    tarpitted: rep.enabled && rep.tarpit_after > 0 && failures >= rep.tarpit_after,
                }
            })
            .filter(|e| e.failures > 0)
            .collect();
        entries.sort_by(|a, b| b.failures.cmp(&a.failures).then_with(|| a.key.cmp(&b.key)));
        truncated |= entries.len() > limit;
        entries.truncate(limit);
        Ok(Listing { entries, truncated })
    }

    /// Clears a client's failure counters (ends its tarpit). Returns the counters deleted.
    ///
    /// # Errors
    /// `NotFound` when nothing was counted for it.
    pub async fn tarpit_clear(&self, client: &str) -> Result<usize, ServiceError> {
        let mut n = 0;
        for key in self.client_keys(client)? {
            n += self.clear_counters(&key).await?;
        }
        if n == 0 {
            return Err(ServiceError::NotFound(format!(
                "failures for {:?}",
                client.trim()
            )));
        }
        info!(client = %client.trim(), "Client failure counters cleared.");
        Ok(n)
    }

    /// The keys a client may be stored under: its canonical address and its reputation
    /// key (the network with `per_network`), or a network as given.
    fn client_keys(&self, client: &str) -> Result<Vec<String>, ServiceError> {
        let t = client.trim();
        check_len("client", t)?;
        if let Ok(ip) = t.parse::<IpAddr>() {
            let exact = ip.to_canonical().to_string();
            let mut keys = vec![exact.clone()];
            if let Some(rep) = &self.app.snapshot().reputation {
                let k = rep.key(ip);
                if k != exact {
                    keys.push(k);
                }
            }
            return Ok(keys);
        }
        if let Ok(net) = t.parse::<ipnet::IpNet>() {
            return Ok(vec![net.trunc().to_string()]);
        }
        Err(ServiceError::BadRequest(format!(
            "{t:?} is not an IP address or network"
        )))
    }

    async fn clear_counters(&self, key: &str) -> Result<usize, ServiceError> {
        let prefix = format!("{key}|");
        let rows = self.app.store().scan(Ns::Reputation, &prefix, 64).await?;
        let mut n = 0;
        for (k, _) in rows {
            if self.app.store().delete(Ns::Reputation, &k).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    // --- configuration ----------------------------------------------------------------

    /// The running configuration as JSON, secrets redacted (see [`redact`]).
    pub fn config_json(&self) -> serde_json::Value {
        config_value(&self.app.snapshot().config)
    }

    /// The running configuration as TOML, secrets redacted.
    ///
    /// # Errors
    /// `Internal` if the configuration cannot be written as TOML (a bug).
    pub fn config_toml(&self) -> Result<String, ServiceError> {
        toml::to_string_pretty(&self.config_json())
            .map_err(|e| ServiceError::Internal(format!("config as TOML: {e}")))
    }

    /// Re-reads the configuration file (or re-applies the running configuration when the
    /// service knows no file) and swaps it in for new sessions. On any error the running
    /// configuration stays and the report says why.
    pub async fn reload(&self) -> ReloadReport {
        let app = self.app.clone();
        let path = self.config_path.clone();
        let source = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "running configuration".into());
        // Certificates and list files are read from disk: off the async workers.
        let outcome = tokio::task::spawn_blocking(move || match path {
            Some(p) => app.reload_from(&p),
            None => {
                let config = (*app.snapshot().config).clone();
                app.reload(config)
            }
        })
        .await;
        let report = match outcome {
            Ok(Ok(warnings)) => ReloadReport {
                reloaded: true,
                source,
                warnings: warnings.iter().map(|w| scrub_urls(w)).collect(),
                errors: Vec::new(),
            },
            Ok(Err(e)) => ReloadReport {
                reloaded: false,
                source,
                warnings: Vec::new(),
                errors: e.errors.iter().map(|w| scrub_urls(w)).collect(),
            },
            Err(e) => ReloadReport {
                reloaded: false,
                source,
                warnings: Vec::new(),
                errors: vec![format!("the reload task failed: {e}")],
            },
        };
        if report.reloaded {
            info!(config = %report.source, warnings = report.warnings.len(), "Configuration reloaded (admin).");
        } else {
            warn!(config = %report.source, errors = ?report.errors, "Reload refused, the running configuration stays.");
        }
        report
    }

    /// Parses, validates and builds a candidate configuration without applying it (files
    /// it names are read; no store is opened).
    pub async fn check(&self, text: &str) -> CheckReport {
        if text.len() > MAX_CONFIG_TEXT {
            return CheckReport {
                valid: false,
                errors: vec![format!(
                    "the configuration is larger than {MAX_CONFIG_TEXT} bytes"
                )],
            };
        }
        let text = text.to_string();
        let outcome =
            tokio::task::spawn_blocking(move || Config::from_toml(&text, "candidate").and_then(App::check))
                .await;
        match outcome {
            Ok(Ok(())) => CheckReport {
                valid: true,
                errors: Vec::new(),
            },
            Ok(Err(e)) => CheckReport {
                valid: false,
                errors: e.errors.iter().map(|w| scrub_urls(w)).collect(),
            },
            Err(e) => CheckReport {
                valid: false,
                errors: vec![format!("the check task failed: {e}")],
            },
        }
    }
}

/// Reads the admin-managed list entries (list-file syntax) from the store, for the lists
/// check: `ListsCheck::with_extra(&config.checks.lists, &lists.white, &lists.black)`.
///
/// # Errors
/// When the store cannot answer.
pub async fn admin_list_entries(store: &dyn Store) -> Result<AdminLists, StoreError> {
    let mut lists = AdminLists::default();
    for (kind, out) in [
        (ListKind::White, &mut lists.white),
        (ListKind::Black, &mut lists.black),
    ] {
        for (key, _) in store.scan(Ns::List, kind.prefix(), MAX_SCAN).await? {
            if let Some(entry) = key.strip_prefix(kind.prefix()) {
                out.push(entry.to_string());
            }
        }
    }
    Ok(lists)
}

// ---------------------------------------------------------------------------------------
// Helpers

fn live_outcomes(counts: &[(Category, u64)]) -> Vec<OutcomeRow> {
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let mut rows: Vec<OutcomeRow> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|&(category, count)| OutcomeRow {
            category,
            count,
            percent: count as f64 * 100.0 / total as f64,
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.count));
    rows
}

/// A `SystemTime` as a UTC date-time, `None` when out of chrono's range (never panics).
fn time_of(t: SystemTime) -> Option<DateTime<Utc>> {
    let ms = i64::try_from(crate::store::epoch_ms(t)).ok()?;
    DateTime::from_timestamp_millis(ms)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn clamp_limit(limit: u32) -> usize {
    (if limit == 0 {
        DEFAULT_LIMIT
    } else {
        limit.min(MAX_LIMIT)
    }) as usize
}

fn check_len(name: &str, s: &str) -> Result<(), ServiceError> {
    if s.len() > MAX_KEY_LEN {
        return Err(ServiceError::BadRequest(format!(
            "{name}: at most {MAX_KEY_LEN} bytes"
        )));
    }
    Ok(())
}

/// `now - period`, refusing periods chrono cannot represent instead of panicking.
pub fn ago(now: DateTime<Utc>, period: Duration) -> Result<DateTime<Utc>, ServiceError> {
    chrono::Duration::from_std(period)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| ServiceError::BadRequest("the period is too long".into()))
}

/// A period such as `10d`, `12h`, `30m` (the configuration's duration syntax), bounded so
/// no arithmetic on it can overflow.
pub fn parse_period(s: &str) -> Result<Duration, ServiceError> {
    let t = s.trim();
    let digits = t.chars().take_while(char::is_ascii_digit).count();
    if t.is_empty() || digits == 0 || digits > 9 || t.len() > 12 {
        return Err(ServiceError::BadRequest(format!(
            "{t:?} is not a period like \"10d\", \"12h\" or \"30m\""
        )));
    }
    crate::config::duration::parse(t).map_err(ServiceError::BadRequest)
}

/// A point in time: RFC 3339 (`2024-05-01T12:00:00Z`), a date (`2024-05-01`, midnight
/// UTC), or a period before now (`10d`).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, ServiceError> {
    let t = s.trim();
    if t.len() > 64 {
        return Err(ServiceError::BadRequest("time: too long".into()));
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return d
            .and_hms_opt(0, 0, 0)
            .map(|n| n.and_utc())
            .ok_or_else(|| ServiceError::BadRequest(format!("{t:?}: not a date")));
    }
    match parse_period(t) {
        Ok(p) => ago(Utc::now(), p),
        Err(_) => Err(ServiceError::BadRequest(format!(
            "{t:?} is not a time (2024-05-01T12:00:00Z, 2024-05-01) nor a period before now (10d)"
        ))),
    }
}

/// An outcome category by name (`greylisted`, `dnsbl`, …).
pub fn parse_outcome(s: &str) -> Result<Category, ServiceError> {
    crate::events::parse_category(s.trim())
        .ok_or_else(|| ServiceError::BadRequest(format!("{:?} is not an outcome category", s.trim())))
}

/// Validates a list entry and returns its canonical list-file text (one entry, one key).
fn canonical_entry(text: &str) -> Result<String, ServiceError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(ServiceError::BadRequest("entry: required".into()));
    }
    check_len("entry", t)?;
    if t.chars().any(char::is_control) {
        return Err(ServiceError::BadRequest("entry: no control characters".into()));
    }
    let entry = parse_entry(t).map_err(ServiceError::BadRequest)?;
    let canonical = match &entry {
        Entry::Ip(net) => {
            if net.prefix_len() == net.max_prefix_len() {
                net.addr().to_string()
            } else {
                net.to_string()
            }
        }
        Entry::Helo(HeloPattern::Exact(name)) => format!("helo:{name}"),
        // The compiled source is not list-file syntax; keep what was given.
        Entry::Helo(HeloPattern::Regex(_)) => t.to_string(),
        Entry::Sender(p) => address_text(p),
        Entry::Recipient(p) => format!("rcpt:{}", address_text(p)),
    };
    // Only use the canonical form when it means the same; otherwise store what was given.
    Ok(if parse_entry(&canonical).as_ref() == Ok(&entry) {
        canonical
    } else {
        t.to_string()
    })
}

fn address_text(p: &AddressPattern) -> String {
    match p {
        AddressPattern::Address(a) => a.clone(),
        AddressPattern::Domain(d) => d.clone(),
        AddressPattern::DomainExact(d) => format!("@{d}"),
    }
}

fn entry_kind(text: &str) -> &'static str {
    match parse_entry(text) {
        Ok(Entry::Ip(_)) => "ip",
        Ok(Entry::Helo(_)) => "helo",
        Ok(Entry::Sender(_)) => "sender",
        Ok(Entry::Recipient(_)) => "recipient",
        Err(_) => "invalid",
    }
}

fn clean_note(note: &str) -> Result<String, ServiceError> {
    let n = note.trim();
    if n.chars().count() > MAX_NOTE_LEN {
        return Err(ServiceError::BadRequest(format!(
            "note: at most {MAX_NOTE_LEN} characters"
        )));
    }
    Ok(n.chars().map(|c| if c.is_control() { ' ' } else { c }).collect())
}

fn list_entry(list: ListKind, text: &str, record: &Record) -> ListEntry {
    let meta: serde_json::Value = serde_json::from_str(&record.value).unwrap_or_default();
    ListEntry {
        list,
        entry: text.to_string(),
        kind: entry_kind(text),
        note: meta
            .get("note")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string(),
        added: meta
            .get("added_ms")
            .and_then(serde_json::Value::as_i64)
            .and_then(DateTime::from_timestamp_millis),
    }
}

fn grey_entry(key: &str, record: &Record, embargo: Duration, now: SystemTime) -> GreyEntry {
    let mut parts = key.splitn(3, '|');
    let client = parts.next().unwrap_or_default().to_string();
    let sender = parts.next().unwrap_or_default().to_string();
    let recipient = parts.next().unwrap_or_default().to_string();
    let first_ms = record.value.parse::<u64>().ok();
    let age = first_ms.map_or(0, |f| crate::store::epoch_ms(now).saturating_sub(f));
    GreyEntry {
        key: key.to_string(),
        client,
        sender,
        recipient,
        first_seen: first_ms
            .and_then(|f| i64::try_from(f).ok())
            .and_then(DateTime::from_timestamp_millis),
        expires: record.expires.and_then(time_of),
        retry_in_secs: duration_ms(embargo).saturating_sub(age).div_ceil(1000),
    }
}

// ---------------------------------------------------------------------------------------
// Redaction

/// What replaces a secret in configuration views.
pub const REDACTED: &str = "***";

/// The configuration as JSON with secrets redacted and unset options left out.
pub fn config_value(config: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(config).unwrap_or_default();
    strip_nulls(&mut v);
    redact(&mut v);
    v
}

/// Replaces secrets in a configuration tree, by key name so sections added later are
/// covered without touching this code: keys named `token`, `password`, `password_hash`,
/// `secret`, or ending in `_token`, `_password`, `_secret`, `_key_pem`, become
/// [`REDACTED`] (when set); URL-valued keys (`url`, `*_url`) keep everything but the
/// password. Non-string secrets (lists of tokens) are redacted element by element.
pub fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                if is_secret_key(&k) {
                    redact_all(child);
                } else if k == "url" || k.ends_with("_url") || k.ends_with("_urls") {
                    redact_urls(child);
                } else {
                    redact(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn is_secret_key(k: &str) -> bool {
    matches!(
        k,
        "token" | "tokens" | "password" | "password_hash" | "secret" | "api_key"
    ) || [
        "_token",
        "_tokens",
        "_password",
        "_secret",
        "_key_pem",
        "_api_key",
    ]
    .iter()
    .any(|s| k.ends_with(s))
}

fn redact_all(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => *s = REDACTED.to_string(),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_all),
        serde_json::Value::Object(map) => map.values_mut().for_each(redact_all),
        serde_json::Value::String(_) | serde_json::Value::Null | serde_json::Value::Bool(_) => {}
        serde_json::Value::Number(_) => *v = serde_json::Value::String(REDACTED.into()),
    }
}

fn redact_urls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => *s = scrub_urls(s),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_urls),
        other => redact(other),
    }
}

fn strip_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|_, c| !c.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => {
            items.retain(|c| !c.is_null());
            items.iter_mut().for_each(strip_nulls);
        }
        _ => {}
    }
}

/// Hides the password of every `scheme://user:password@host` in a text (error messages
/// quote URLs as configured, passwords included).
pub fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first character a URL authority cannot hold here.
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_by_key_and_url() {
        let mut v = serde_json::json!({
            "admin": {"token": "s3cret-token", "user": "admin", "password_hash": "pbkdf2-sha256$1$a$b"},
            "upstream": {"main": {"auth_token": "x", "address": "127.0.0.1:25"}},
            "store": {"redis_url": "redis://user:pw@redis:6379/0", "path": "state.db"},
            "events": {"url": "mysql://thassp:hunter2@db/thassp"},
            "empty": {"token": ""},
        });
        redact(&mut v);
        assert_eq!(v["admin"]["token"], REDACTED);
        assert_eq!(v["admin"]["password_hash"], REDACTED);
        assert_eq!(v["admin"]["user"], "admin");
        assert_eq!(v["upstream"]["main"]["auth_token"], REDACTED);
        assert_eq!(v["upstream"]["main"]["address"], "127.0.0.1:25");
        assert_eq!(v["store"]["redis_url"], "redis://user:***@redis:6379/0");
        assert_eq!(v["events"]["url"], "mysql://thassp:***@db/thassp");
        assert_eq!(v["empty"]["token"], "");
        let text = v.to_string();
        for secret in ["s3cret", "hunter2", ":pw@", "pbkdf2"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    #[test]
    fn scrubbing_text() {
        assert_eq!(
            scrub_urls("store.redis_url: \"redis://:pw@h:1/0\" is not usable; mysql://a:b@c/d"),
            "store.redis_url: \"redis://:***@h:1/0\" is not usable; mysql://a:***@c/d"
        );
        assert_eq!(scrub_urls("sqlite://x.db and no url"), "sqlite://x.db and no url");
        assert_eq!(scrub_urls("://"), "://");
    }

    #[test]
    fn canonical_entries() {
        assert_eq!(canonical_entry(" 192.0.2.7 ").unwrap(), "192.0.2.7");
        assert_eq!(canonical_entry("192.0.2.7/24").unwrap(), "192.0.2.0/24");
        assert_eq!(canonical_entry("::ffff:192.0.2.1").unwrap(), "192.0.2.1");
        assert_eq!(canonical_entry("HELO:MX.Example.").unwrap(), "helo:mx.example");
        assert_eq!(canonical_entry("User@Example.COM").unwrap(), "user@example.com");
        assert_eq!(canonical_entry("@Example.com").unwrap(), "@example.com");
        assert_eq!(canonical_entry("rcpt:Example.org").unwrap(), "rcpt:example.org");
        assert_eq!(canonical_entry("helo:/^dyn-\\d+/").unwrap(), "helo:/^dyn-\\d+/");
        assert!(matches!(
            canonical_entry("300.1.1.1"),
            Err(ServiceError::BadRequest(_))
        ));
        assert!(matches!(canonical_entry(""), Err(ServiceError::BadRequest(_))));
        assert!(canonical_entry(&"a".repeat(5000)).is_err());
    }

    #[test]
    fn periods_and_times() {
        assert_eq!(parse_period("10d").unwrap(), Duration::from_secs(864_000));
        assert!(parse_period("99999999999999d").is_err());
        assert!(parse_period("d").is_err());
        assert!(parse_time("999999999d").is_err());
        assert_eq!(
            parse_time("2024-05-01").unwrap(),
            DateTime::parse_from_rfc3339("2024-05-01T00:00:00Z").unwrap()
        );
        assert!(parse_time("2024-05-01T12:00:00+02:00").is_ok());
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn grey_entries_parse() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let r = Record {
            value: "900000".into(),
            expires: None,
        };
        let e = grey_entry(
            "n:192.0.2.0/24|a@b.example|c@d.example",
            &r,
            Duration::from_secs(300),
            now,
        );
        assert_eq!(e.client, "n:192.0.2.0/24");
        assert_eq!(e.sender, "a@b.example");
        assert_eq!(e.recipient, "c@d.example");
        assert_eq!(e.retry_in_secs, 200);
    }
}
