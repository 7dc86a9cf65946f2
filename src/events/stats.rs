//! Statistics and searches over the event log: the outcome table (the percentage of all
//! attempts per category, as ThASSP published it), totals, per-day series, top clients and
//! sender domains, and event search for the admin. Attempts are counted as described in
//! the [module docs](super) ("How attempts are counted"). Periods are half-open,
//! `[since, until)`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row as _};

use super::sql::{self, Backend, Tables};
use super::{
    CATEGORIES, ConnectionEvent, EventsConfig, RecipientResult, Timings, TransactionEvent, category_index,
    parse_category,
};
use crate::policy::Category;

/// One line of the outcome table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutcomeRow {
    #[serde(serialize_with = "super::serialize_category")]
    pub category: Category,
    pub count: u64,
    /// Percent of all attempts in the period (0–100).
    pub percent: f64,
}

/// Totals over a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Totals {
    /// Every connection row.
    pub connections: u64,
    /// Every transaction row.
    pub transactions: u64,
    /// Connections without transactions plus transactions: the table's 100 %.
    pub attempts: u64,
    /// Recipients named in transactions (accepted or not).
    pub recipients: u64,
    /// Attempts that ended `delivered`.
    pub delivered: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Sum of message sizes.
    pub message_bytes: u64,
}

/// Attempts of one category on one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayCount {
    pub day: NaiveDate,
    #[serde(serialize_with = "super::serialize_category")]
    pub category: Category,
    pub count: u64,
}

/// Attempts of one category in one UTC hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HourCount {
    pub hour: DateTime<Utc>,
    #[serde(serialize_with = "super::serialize_category")]
    pub category: Category,
    pub count: u64,
}

/// Filters for [`Stats::connections`] and [`Stats::transactions`]; all optional.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub client_ip: Option<IpAddr>,
    /// Exact envelope sender (any case). Transactions only.
    pub sender: Option<String>,
    /// Exact recipient (any case). Transactions only.
    pub recipient: Option<String>,
    pub outcome: Option<Category>,
    pub session_id: Option<String>,
    /// Newest rows first, at most this many (0 = 100, at most 10000).
    pub limit: u32,
}

/// Read access to the event log: a small connection pool of its own.
#[derive(Debug, Clone)]
pub struct Stats {
    pool: AnyPool,
    backend: Backend,
    tables: Tables,
}

impl Stats {
    /// Opens the database `config.url` names (for `thassp stats` and the admin). A SQLite
    /// file must exist already; the schema is brought up to date if it is older.
    pub async fn open(config: &EventsConfig) -> Result<Self, String> {
        Self::open_with(&config.url, sql::DEFAULT_PREFIX).await
    }

    /// [`Stats::open`] with a table prefix (tests).
    pub async fn open_with(url: &str, prefix: &str) -> Result<Self, String> {
        if url.is_empty() {
            return Err("the event log is disabled (events.url is empty)".into());
        }
        let backend = Backend::from_url(url)?;
        let tables = Tables::new(prefix)?;
        sqlx::any::install_default_drivers();
        let redacted = sql::redact_url(url);
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| format!("{redacted}: {e}"))?;
        let mut conn = pool.acquire().await.map_err(|e| format!("{redacted}: {e}"))?;
        // Only touch the schema when it is missing or old: the reader may lack the right to
        // write, and an up-to-date schema needs nothing.
        let current = sql::current_version(&mut conn, &tables).await.unwrap_or(0);
        if current < sql::LATEST_VERSION {
            sql::migrate(&mut conn, backend, &tables)
                .await
                .map_err(|e| format!("{redacted}: creating the event log schema: {e}"))?;
        }
        drop(conn);
        Ok(Self {
            pool,
            backend,
            tables,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for queries of one's own.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Closes the pool.
    pub async fn close(self) {
        self.pool.close().await;
    }

    /// Attempts per category in `[since, until)`, most frequent first (ties in vocabulary
    /// order), categories without attempts left out. An outcome name this build does not
    /// know counts as `other`.
    pub async fn outcome_table(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<OutcomeRow>, sqlx::Error> {
        let t = &self.tables;
        let q = format!(
            "SELECT outcome, COUNT(*) AS n FROM (\
               SELECT outcome FROM {c} WHERE tx_count = 0 AND connect_ms >= ? AND connect_ms < ? \
               UNION ALL \
               SELECT outcome FROM {x} WHERE ts_ms >= ? AND ts_ms < ?\
             ) a GROUP BY outcome",
            c = t.connections,
            x = t.transactions
        );
        let (s, u) = (since.timestamp_millis(), until.timestamp_millis());
        let rows = sqlx::query(AssertSqlSafe(self.backend.sql(&q).into_owned()))
            .bind(s)
            .bind(u)
            .bind(s)
            .bind(u)
            .fetch_all(&self.pool)
            .await?;
        let mut counts = [0u64; CATEGORIES.len()];
        for row in &rows {
            let outcome: String = row.try_get(0)?;
            let n: i64 = row.try_get(1)?;
            let c = parse_category(&outcome).unwrap_or(Category::Other);
            counts[category_index(c)] += u64::try_from(n).unwrap_or(0);
        }
        Ok(outcome_rows(&counts))
    }

    /// Totals over `[since, until)`.
    pub async fn totals(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Result<Totals, sqlx::Error> {
        let t = &self.tables;
        let b = self.backend;
        let (s, u) = (since.timestamp_millis(), until.timestamp_millis());
        let conn_q = format!(
            "SELECT COUNT(*), {}, {}, {} FROM {} WHERE connect_ms >= ? AND connect_ms < ?",
            b.sum_int("CASE WHEN tx_count = 0 THEN 1 ELSE 0 END"),
            b.sum_int("bytes_in"),
            b.sum_int("bytes_out"),
            t.connections
        );
        let tx_q = format!(
            "SELECT COUNT(*), {}, {}, {} FROM {} WHERE ts_ms >= ? AND ts_ms < ?",
            b.sum_int("rcpt_count"),
            b.sum_int("size_bytes"),
            b.sum_int("CASE WHEN outcome = 'delivered' THEN 1 ELSE 0 END"),
            t.transactions
        );
        let c = self.one_row(&conn_q, s, u).await?;
        let x = self.one_row(&tx_q, s, u).await?;
        let delivered_conns = {
            let q = format!(
                "SELECT COUNT(*) FROM {} WHERE tx_count = 0 AND outcome = 'delivered' \
                 AND connect_ms >= ? AND connect_ms < ?",
                t.connections
            );
            self.one_row(&q, s, u).await?[0]
        };
        Ok(Totals {
            connections: c[0],
            transactions: x[0],
            attempts: c[1] + x[0],
            recipients: x[1],
            delivered: x[3] + delivered_conns,
            bytes_in: c[2],
            bytes_out: c[3],
            message_bytes: x[2],
        })
    }

    async fn one_row(&self, q: &str, since: i64, until: i64) -> Result<Vec<u64>, sqlx::Error> {
        let row = sqlx::query(AssertSqlSafe(self.backend.sql(q).into_owned()))
            .bind(since)
            .bind(until)
            .fetch_one(&self.pool)
            .await?;
        (0..row.len())
            .map(|i| Ok(u64::try_from(row.try_get::<i64, _>(i)?).unwrap_or(0)))
            .collect()
    }

    /// Attempts per day and category in `[since, until)`; days start at midnight in
    /// `offset` (use `FixedOffset::east_opt(0)` for UTC). Sorted by day, then vocabulary
    /// order; zero counts left out.
    pub async fn daily(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        offset: FixedOffset,
    ) -> Result<Vec<DayCount>, sqlx::Error> {
        const DAY_MS: i64 = 86_400_000;
        let off = i64::from(offset.local_minus_utc()) * 1000;
        let buckets = self.bucketed(since, until, DAY_MS, off).await?;
        Ok(buckets
            .into_iter()
            .filter_map(|(d, category, count)| {
                let day = DateTime::from_timestamp(d.checked_mul(86_400)?, 0)?.date_naive();
                Some(DayCount { day, category, count })
            })
            .collect())
    }

    /// Attempts per UTC hour and category in `[since, until)` (the dashboard's traffic
    /// chart), in time order; hours and categories without attempts are left out.
    pub async fn hourly(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<HourCount>, sqlx::Error> {
        const HOUR_MS: i64 = 3_600_000;
        let buckets = self.bucketed(since, until, HOUR_MS, 0).await?;
        Ok(buckets
            .into_iter()
            .filter_map(|(h, category, count)| {
                let hour = DateTime::from_timestamp(h.checked_mul(3600)?, 0)?;
                Some(HourCount {
                    hour,
                    category,
                    count,
                })
            })
            .collect())
    }

    /// Attempts per `bucket_ms`-wide bucket (shifted by `off_ms`) and category, sorted.
    async fn bucketed(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        bucket_ms: i64,
        off_ms: i64,
    ) -> Result<Vec<(i64, Category, u64)>, sqlx::Error> {
        let t = &self.tables;
        let bucket = |col: &str| self.backend.int_div(&format!("({col} + {off_ms})"), bucket_ms);
        let q = format!(
            "SELECT d, outcome, COUNT(*) AS n FROM (\
               SELECT {cd} AS d, outcome FROM {c} WHERE tx_count = 0 AND connect_ms >= ? AND connect_ms < ? \
               UNION ALL \
               SELECT {xd} AS d, outcome FROM {x} WHERE ts_ms >= ? AND ts_ms < ?\
             ) a GROUP BY d, outcome",
            cd = bucket("connect_ms"),
            xd = bucket("ts_ms"),
            c = t.connections,
            x = t.transactions
        );
        let (s, u) = (since.timestamp_millis(), until.timestamp_millis());
        let rows = sqlx::query(AssertSqlSafe(self.backend.sql(&q).into_owned()))
            .bind(s)
            .bind(u)
            .bind(s)
            .bind(u)
            .fetch_all(&self.pool)
            .await?;
        let mut acc: HashMap<(i64, usize), u64> = HashMap::new();
        for row in &rows {
            let d: i64 = row.try_get(0)?;
            let outcome: String = row.try_get(1)?;
            let n: i64 = row.try_get(2)?;
            let c = parse_category(&outcome).unwrap_or(Category::Other);
            *acc.entry((d, category_index(c))).or_default() += u64::try_from(n).unwrap_or(0);
        }
        let mut out: Vec<(i64, Category, u64)> = acc
            .into_iter()
            .map(|((d, ci), n)| (d, CATEGORIES[ci], n))
            .collect();
        out.sort_unstable_by_key(|(d, c, _)| (*d, category_index(*c)));
        Ok(out)
    }

    /// The client IPs with the most attempts in `[since, until)`, of one category or all.
    pub async fn top_clients(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        category: Option<Category>,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, sqlx::Error> {
        let t = &self.tables;
        let filter = if category.is_some() {
            " AND outcome = ?"
        } else {
            ""
        };
        let q = format!(
            "SELECT client_ip, COUNT(*) AS n FROM (\
               SELECT client_ip FROM {c} WHERE tx_count = 0 AND connect_ms >= ? AND connect_ms < ?{filter} \
               UNION ALL \
               SELECT client_ip FROM {x} WHERE ts_ms >= ? AND ts_ms < ?{filter}\
             ) a GROUP BY client_ip ORDER BY n DESC, client_ip LIMIT {limit}",
            c = t.connections,
            x = t.transactions,
            limit = limit.clamp(1, 10_000)
        );
        let (s, u) = (since.timestamp_millis(), until.timestamp_millis());
        let mut query = sqlx::query(AssertSqlSafe(self.backend.sql(&q).into_owned()));
        for _ in 0..2 {
            query = query.bind(s).bind(u);
            if let Some(c) = category {
                query = query.bind(c.as_str());
            }
        }
        pairs(query.fetch_all(&self.pool).await?)
    }

    /// The sender domains with the most transactions in `[since, until)`, of one category
    /// or all (`""` is the null sender). Connections without transactions have no sender
    /// and are not counted here.
    pub async fn top_sender_domains(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        category: Option<Category>,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, sqlx::Error> {
        let filter = if category.is_some() {
            " AND outcome = ?"
        } else {
            ""
        };
        let q = format!(
            "SELECT sender_domain, COUNT(*) AS n FROM {x} WHERE ts_ms >= ? AND ts_ms < ?{filter} \
             GROUP BY sender_domain ORDER BY n DESC, sender_domain LIMIT {limit}",
            x = self.tables.transactions,
            limit = limit.clamp(1, 10_000)
        );
        let mut query = sqlx::query(AssertSqlSafe(self.backend.sql(&q).into_owned()))
            .bind(since.timestamp_millis())
            .bind(until.timestamp_millis());
        if let Some(c) = category {
            query = query.bind(c.as_str());
        }
        pairs(query.fetch_all(&self.pool).await?)
    }

    /// Connection rows matching `q`, newest first. `sender` and `recipient` do not apply.
    pub async fn connections(&self, q: &EventQuery) -> Result<Vec<ConnectionEvent>, sqlx::Error> {
        let mut w = Where::default();
        w.range("connect_ms", q);
        if let Some(ip) = q.client_ip {
            w.text("client_ip = ?", ip.to_canonical().to_string());
        }
        if let Some(c) = q.outcome {
            w.text("outcome = ?", c.as_str().to_string());
        }
        if let Some(s) = &q.session_id {
            w.text("session_id = ?", s.clone());
        }
        let sql = format!(
            "SELECT {} FROM {}{} ORDER BY connect_ms DESC, id DESC LIMIT {}",
            sql::CONNECTION_COLUMNS.join(", "),
            self.tables.connections,
            w.clause(),
            limit(q.limit)
        );
        let rows = w
            .bind(sqlx::query(AssertSqlSafe(self.backend.sql(&sql).into_owned())))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(connection_from_row).collect()
    }

    /// Transaction rows matching `q` with their recipients, newest first.
    pub async fn transactions(&self, q: &EventQuery) -> Result<Vec<TransactionEvent>, sqlx::Error> {
        let mut w = Where::default();
        w.range("ts_ms", q);
        if let Some(ip) = q.client_ip {
            w.text("client_ip = ?", ip.to_canonical().to_string());
        }
        if let Some(s) = &q.sender {
            w.text("sender = ?", s.to_lowercase());
        }
        if let Some(r) = &q.recipient {
            // Row-value IN: the planner finds the recipients through their index first.
            w.text(
                &format!(
                    "(session_id, tx_seq) IN (SELECT session_id, tx_seq FROM {} WHERE recipient = ?)",
                    self.tables.recipients
                ),
                r.to_lowercase(),
            );
        }
        if let Some(c) = q.outcome {
            w.text("outcome = ?", c.as_str().to_string());
        }
        if let Some(s) = &q.session_id {
            w.text("session_id = ?", s.clone());
        }
        let sql = format!(
            "SELECT {} FROM {}{} ORDER BY ts_ms DESC, id DESC LIMIT {}",
            sql::TRANSACTION_COLUMNS.join(", "),
            self.tables.transactions,
            w.clause(),
            limit(q.limit)
        );
        let rows = w
            .bind(sqlx::query(AssertSqlSafe(self.backend.sql(&sql).into_owned())))
            .fetch_all(&self.pool)
            .await?;
        let mut out: Vec<TransactionEvent> =
            rows.iter().map(transaction_from_row).collect::<Result<_, _>>()?;
        self.attach_recipients(&mut out).await?;
        Ok(out)
    }

    async fn attach_recipients(&self, txs: &mut [TransactionEvent]) -> Result<(), sqlx::Error> {
        let mut sessions: Vec<&str> = txs.iter().map(|t| t.session_id.as_str()).collect();
        sessions.sort_unstable();
        sessions.dedup();
        let mut found: HashMap<(String, u32), Vec<RecipientResult>> = HashMap::new();
        for chunk in sessions.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "SELECT session_id, tx_seq, recipient, reply FROM {} WHERE session_id IN ({marks}) ORDER BY id",
                self.tables.recipients
            );
            let mut query = sqlx::query(AssertSqlSafe(self.backend.sql(&sql).into_owned()));
            for s in chunk {
                query = query.bind(*s);
            }
            for row in query.fetch_all(&self.pool).await? {
                let sid: String = row.try_get(0)?;
                let seq: i64 = row.try_get(1)?;
                found
                    .entry((sid, u32::try_from(seq).unwrap_or(0)))
                    .or_default()
                    .push(RecipientResult {
                        address: row.try_get(2)?,
                        reply: row.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
                    });
            }
        }
        for tx in txs {
            // A transaction repeated by an at-least-once retry shares its recipients' rows;
            // each copy gets them once.
            if let Some(r) = found.get(&(tx.session_id.clone(), tx.seq)) {
                tx.recipients = r.clone();
            }
        }
        Ok(())
    }
}

/// Outcome rows from per-category counts: non-zero ones, most frequent first.
fn outcome_rows(counts: &[u64; CATEGORIES.len()]) -> Vec<OutcomeRow> {
    let total: u64 = counts.iter().sum();
    let mut rows: Vec<OutcomeRow> = CATEGORIES
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(&category, &count)| OutcomeRow {
            category,
            count,
            percent: count as f64 * 100.0 / total as f64,
        })
        .collect();
    // Stable: equal counts stay in vocabulary order.
    rows.sort_by_key(|r| std::cmp::Reverse(r.count));
    rows
}

/// The classic table: category, attempts, percent, and a total line.
///
/// ```text
/// category          attempts  percent
/// trap                   250   25.0 %
/// helo_invalid           240   24.0 %
/// ------------------------------------
/// total                 1000  100.0 %
/// ```
pub fn format_table(rows: &[OutcomeRow]) -> String {
    let mut out = String::new();
    let total: u64 = rows.iter().map(|r| r.count).sum();
    let _ = writeln!(out, "{:<16} {:>10} {:>8}", "category", "attempts", "percent");
    for r in rows {
        let _ = writeln!(
            out,
            "{:<16} {:>10} {:>6.1} %",
            r.category.as_str(),
            r.count,
            r.percent
        );
    }
    let _ = writeln!(out, "{}", "-".repeat(36));
    let pct = if total > 0 { 100.0 } else { 0.0 };
    let _ = writeln!(out, "{:<16} {:>10} {:>6.1} %", "total", total, pct);
    out
}

fn limit(n: u32) -> u32 {
    if n == 0 { 100 } else { n.min(10_000) }
}

fn pairs(rows: Vec<AnyRow>) -> Result<Vec<(String, u64)>, sqlx::Error> {
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get::<String, _>(0)?,
                u64::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0),
            ))
        })
        .collect()
}

/// A WHERE clause with its parameters, in order.
#[derive(Default)]
struct Where {
    terms: Vec<String>,
    params: Vec<Param>,
}

enum Param {
    Int(i64),
    Text(String),
}

impl Where {
    fn range(&mut self, col: &str, q: &EventQuery) {
        if let Some(s) = q.since {
            self.terms.push(format!("{col} >= ?"));
            self.params.push(Param::Int(s.timestamp_millis()));
        }
        if let Some(u) = q.until {
            self.terms.push(format!("{col} < ?"));
            self.params.push(Param::Int(u.timestamp_millis()));
        }
    }

    fn text(&mut self, term: &str, value: String) {
        self.terms.push(term.to_string());
        self.params.push(Param::Text(value));
    }

    fn clause(&self) -> String {
        if self.terms.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.terms.join(" AND "))
        }
    }

    fn bind<'q>(
        self,
        mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
        for p in self.params {
            q = match p {
                Param::Int(n) => q.bind(n),
                Param::Text(s) => q.bind(s),
            };
        }
        q
    }
}

fn time_of(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn u32_of(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn ip_of(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

fn category_of(s: &str) -> Category {
    parse_category(s).unwrap_or(Category::Other)
}

fn connection_from_row(r: &AnyRow) -> Result<ConnectionEvent, sqlx::Error> {
    let client_ip: String = r.try_get("client_ip")?;
    let client_port: i64 = r.try_get("client_port")?;
    let proxy_ip: Option<String> = r.try_get("proxy_ip")?;
    let proxy_port: Option<i64> = r.try_get("proxy_port")?;
    let outcome: String = r.try_get("outcome")?;
    Ok(ConnectionEvent {
        session_id: r.try_get("session_id")?,
        connect_time: time_of(r.try_get("connect_ms")?),
        end_time: time_of(r.try_get("end_ms")?),
        client: SocketAddr::new(ip_of(&client_ip), u16::try_from(client_port).unwrap_or(0)),
        proxied_by: proxy_ip.map(|ip| {
            SocketAddr::new(
                ip_of(&ip),
                proxy_port.and_then(|p| u16::try_from(p).ok()).unwrap_or(0),
            )
        }),
        ptr: r.try_get("ptr")?,
        helo: r.try_get("helo")?,
        tls_version: r.try_get("tls_version")?,
        tls_cipher: r.try_get("tls_cipher")?,
        auth_user: r.try_get("auth_user")?,
        transactions: u32_of(r.try_get("tx_count")?),
        outcome: category_of(&outcome),
        check: r.try_get("check_name")?,
        last_reply: r.try_get("last_reply")?,
        bytes_in: u64_of(r.try_get("bytes_in")?),
        bytes_out: u64_of(r.try_get("bytes_out")?),
    })
}

fn transaction_from_row(r: &AnyRow) -> Result<TransactionEvent, sqlx::Error> {
    let client_ip: String = r.try_get("client_ip")?;
    let outcome: String = r.try_get("outcome")?;
    let score: f64 = r.try_get("score")?;
    Ok(TransactionEvent {
        session_id: r.try_get("session_id")?,
        seq: u32_of(r.try_get("tx_seq")?),
        time: time_of(r.try_get("ts_ms")?),
        client_ip: ip_of(&client_ip),
        sender: r.try_get("sender")?,
        recipients: Vec::new(),
        size: u64_of(r.try_get("size_bytes")?),
        message_id: r.try_get("message_id")?,
        subject: r.try_get("subject")?,
        outcome: category_of(&outcome),
        check: r.try_get("check_name")?,
        reply: r.try_get("reply")?,
        upstream_reply: r.try_get("upstream_reply")?,
        queue_id: r.try_get("queue_id")?,
        spf: r.try_get("spf")?,
        dkim: r.try_get("dkim")?,
        dmarc: r.try_get("dmarc")?,
        score: score as f32,
        timings: Timings {
            total_ms: u32_of(r.try_get("ms_total")?),
            mail_ms: u32_of(r.try_get("ms_mail")?),
            rcpt_ms: u32_of(r.try_get("ms_rcpt")?),
            data_ms: u32_of(r.try_get("ms_data")?),
            upstream_ms: u32_of(r.try_get("ms_upstream")?),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_formatted() {
        let mut counts = [0u64; CATEGORIES.len()];
        counts[category_index(Category::Delivered)] = 25;
        counts[category_index(Category::Trap)] = 50;
        counts[category_index(Category::HeloInvalid)] = 25;
        let rows = outcome_rows(&counts);
        let cats: Vec<_> = rows.iter().map(|r| r.category).collect();
        assert_eq!(cats, [Category::Trap, Category::HeloInvalid, Category::Delivered]);
        assert_eq!(rows[0].percent, 50.0);
        let text = format_table(&rows);
        assert!(text.contains("trap                     50   50.0 %"), "{text}");
        assert!(text.contains("total                   100  100.0 %"), "{text}");
        assert!(format_table(&[]).contains("total                     0    0.0 %"));
    }
}
