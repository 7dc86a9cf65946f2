//! The SQL of the event log: which backend a URL selects, the schema and its versioned
//! migrations per backend, and the few statements whose syntax differs between SQLite,
//! MySQL/MariaDB and PostgreSQL.
//!
//! Everything goes through sqlx's `Any` driver, which does not rewrite placeholders: queries
//! are written once with `?` and [`Backend::sql`] numbers them (`$1`, `$2`, …) for
//! PostgreSQL. Times are `BIGINT` milliseconds since the Unix epoch (UTC): the one time type
//! that the three databases and `Any` share without conversions.
//!
//! # Schema (version 1; `PREFIX` is `thassp_`)
//!
//! - `PREFIX_schema (version, applied_ms)`: one row per applied migration.
//! - `PREFIX_connections`: one row per connection: `session_id`, `connect_ms`, `end_ms`,
//!   `client_ip` (text, `VARCHAR(45)`), `client_port`, `proxy_ip`/`proxy_port` (the load
//!   balancer when PROXY protocol was used), `ptr`, `helo`, `tls_version`, `tls_cipher`,
//!   `auth_user`, `tx_count` (transaction rows logged for the session), `outcome` (a
//!   category name, see [`crate::policy::Category::as_str`]), `check_name`, `last_reply`,
//!   `bytes_in`, `bytes_out`.
//! - `PREFIX_transactions`: one row per mail transaction: `session_id`, `tx_seq` (1, 2, …
//!   within the session), `ts_ms`, `client_ip`, `sender` (lower case, `''` for `<>`),
//!   `sender_domain`, `rcpt_count`, `size_bytes`, `message_id`, `subject`, `outcome`,
//!   `check_name`, `reply` (the last reply the client got for it), `upstream_reply`,
//!   `queue_id`, `spf`, `dkim`, `dmarc`, `score`, `ms_total`, `ms_mail`, `ms_rcpt`,
//!   `ms_data`, `ms_upstream`.
//! - `PREFIX_recipients`: one row per recipient of a transaction, joined on
//!   `(session_id, tx_seq)`: `ts_ms` (the transaction's), `recipient` (lower case), `reply`.
//!   A child table rather than a serialised column so that "mail for x@example.com" is an
//!   index lookup.
//!
//! Indexes: time on every table; client IP, outcome and session on connections; client IP,
//! sender, sender domain, outcome, session and Message-ID on transactions; recipient and
//! transaction on recipients. Rows have a surrogate `id` only; there is deliberately no
//! unique key on session ids (ids are unique per node, not across a cluster).
//!
//! # Querying by hand
//!
//! ```sql
//! -- Mail for one recipient in the last day, newest first (SQLite; `?` is now - 86400000).
//! SELECT datetime(t.ts_ms / 1000, 'unixepoch') AS at, t.client_ip, t.sender, r.reply, t.outcome
//!   FROM thassp_recipients r
//!   JOIN thassp_transactions t ON t.session_id = r.session_id AND t.tx_seq = r.tx_seq
//!  WHERE r.recipient = 'alice@example.com' AND r.ts_ms >= ?
//!  ORDER BY r.ts_ms DESC;
//! ```
//!
//! Readable times: `datetime(ts_ms / 1000, 'unixepoch')` (SQLite),
//! `FROM_UNIXTIME(ts_ms / 1000)` (MySQL/MariaDB), `to_timestamp(ts_ms / 1000.0)`
//! (PostgreSQL). Addresses are stored lower case; compare with lower-case values so the
//! indexes are used.

use std::borrow::Cow;

use sqlx::AnyConnection;
use sqlx::{AssertSqlSafe, Connection as _, Row as _};

/// The database behind a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `sqlite://path` (the embedded default).
    Sqlite,
    /// `mysql://…` or `mariadb://…`.
    MySql,
    /// `postgres://…` or `postgresql://…`.
    Postgres,
}

impl Backend {
    /// The backend a URL names, from its scheme.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let scheme = url.split(':').next().unwrap_or("").to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Ok(Self::Sqlite),
            "mysql" | "mariadb" => Ok(Self::MySql),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            _ => Err(format!(
                "{:?} is not a database URL (sqlite://…, mysql://…, mariadb://…, postgres://…)",
                redact_url(url)
            )),
        }
    }

    /// The backend's name for logs and the admin view.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::MySql => "mysql",
            Self::Postgres => "postgres",
        }
    }

    /// `sql` with its `?` placeholders numbered `$1`, `$2`, … for PostgreSQL; unchanged for
    /// the others. Our statements never contain a literal `?`, so no quoting is parsed.
    pub fn sql<'a>(self, sql: &'a str) -> Cow<'a, str> {
        if self != Self::Postgres || !sql.contains('?') {
            return Cow::Borrowed(sql);
        }
        let mut out = String::with_capacity(sql.len() + sql.len() / 4);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        Cow::Owned(out)
    }

    /// Integer division of a `BIGINT` expression (MySQL's `/` yields a decimal).
    pub(crate) fn int_div(self, expr: &str, divisor: i64) -> String {
        match self {
            Self::MySql => format!("({expr} DIV {divisor})"),
            Self::Sqlite | Self::Postgres => format!("({expr} / {divisor})"),
        }
    }

    /// `SUM(expr)` as a `BIGINT` that is 0 over no rows (MySQL and PostgreSQL return a
    /// decimal, which `Any` cannot decode).
    pub(crate) fn sum_int(self, expr: &str) -> String {
        let ty = match self {
            Self::Sqlite => "INTEGER",
            Self::MySql => "SIGNED",
            Self::Postgres => "BIGINT",
        };
        format!("CAST(COALESCE(SUM({expr}), 0) AS {ty})")
    }
}

/// The URL with any password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    // scheme://user:password@host/…: hide what lies between the first ':' after "//" and
    // the last '@' before the path.
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[start..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!("{}{}:***{}", &url[..start], &authority[..colon], &rest[at..])
        }
        _ => url.to_string(),
    }
}

/// The names of the event log's tables: `<prefix>schema`, `<prefix>connections`, ….
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub prefix: String,
    pub schema: String,
    pub connections: String,
    pub transactions: String,
    pub recipients: String,
}

/// The table prefix in production.
pub const DEFAULT_PREFIX: &str = "thassp_";

impl Tables {
    /// Table names for `prefix`, which must be lower-case ASCII letters, digits and `_`
    /// (it is pasted into SQL), start with a letter and be at most 40 characters.
    pub fn new(prefix: &str) -> Result<Self, String> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 40
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(format!(
                "table prefix {prefix:?}: use 1 to 40 of a-z, 0-9 and _, starting with a letter"
            ));
        }
        Ok(Self {
            prefix: prefix.to_string(),
            schema: format!("{prefix}schema"),
            connections: format!("{prefix}connections"),
            transactions: format!("{prefix}transactions"),
            recipients: format!("{prefix}recipients"),
        })
    }

    /// All data tables with their time column, in pruning order.
    pub(crate) fn timed(&self) -> [(&str, &'static str); 3] {
        [
            (&self.recipients, "ts_ms"),
            (&self.transactions, "ts_ms"),
            (&self.connections, "connect_ms"),
        ]
    }
}

/// Columns of `connections` in insert order (all but `id`).
pub(crate) const CONNECTION_COLUMNS: &[&str] = &[
    "session_id",
    "connect_ms",
    "end_ms",
    "client_ip",
    "client_port",
    "proxy_ip",
    "proxy_port",
    "ptr",
    "helo",
    "tls_version",
    "tls_cipher",
    "auth_user",
    "tx_count",
    "outcome",
    "check_name",
    "last_reply",
    "bytes_in",
    "bytes_out",
];

/// Columns of `transactions` in insert order (all but `id`).
pub(crate) const TRANSACTION_COLUMNS: &[&str] = &[
    "session_id",
    "tx_seq",
    "ts_ms",
    "client_ip",
    "sender",
    "sender_domain",
    "rcpt_count",
    "size_bytes",
    "message_id",
    "subject",
    "outcome",
    "check_name",
    "reply",
    "upstream_reply",
    "queue_id",
    "spf",
    "dkim",
    "dmarc",
    "score",
    "ms_total",
    "ms_mail",
    "ms_rcpt",
    "ms_data",
    "ms_upstream",
];

/// Columns of `recipients` in insert order (all but `id`).
pub(crate) const RECIPIENT_COLUMNS: &[&str] = &["session_id", "tx_seq", "ts_ms", "recipient", "reply"];

/// Column sizes (characters), shared by the DDL and the clipping of values: MySQL in strict
/// mode and PostgreSQL refuse a whole statement for one value that is too long.
pub(crate) mod width {
    pub const SESSION: usize = 64;
    pub const IP: usize = 45;
    pub const NAME: usize = 255;
    pub const ADDRESS: usize = 320;
    pub const SHORT: usize = 32;
    pub const CHECK: usize = 64;
    pub const CIPHER: usize = 128;
    pub const REPLY: usize = 512;
    pub const SUBJECT: usize = 1000;
    pub const QUEUE_ID: usize = 64;
}

/// One schema migration: its version and the statements that take the previous version to
/// it. On MySQL, DDL is not transactional, so its statements must be idempotent (`IF NOT
/// EXISTS`, indexes declared inside `CREATE TABLE`); a half-applied migration is then simply
/// applied again.
pub(crate) struct Migration {
    pub version: i64,
    pub statements: Vec<String>,
}

/// The migrations for `backend`, oldest first.
pub(crate) fn migrations(backend: Backend, t: &Tables) -> Vec<Migration> {
    vec![Migration {
        version: 1,
        statements: v1(backend, t),
    }]
}

fn v1(backend: Backend, t: &Tables) -> Vec<String> {
    use width::*;
    let p = &t.prefix;
    let id = match backend {
        Backend::Sqlite => "id INTEGER PRIMARY KEY",
        Backend::MySql => "id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
        Backend::Postgres => "id BIGSERIAL PRIMARY KEY",
    };
    let connections_cols = format!(
        "{id},
        session_id VARCHAR({SESSION}) NOT NULL,
        connect_ms BIGINT NOT NULL,
        end_ms BIGINT NOT NULL,
        client_ip VARCHAR({IP}) NOT NULL,
        client_port INTEGER NOT NULL,
        proxy_ip VARCHAR({IP}) NULL,
        proxy_port INTEGER NULL,
        ptr VARCHAR({NAME}) NULL,
        helo VARCHAR({NAME}) NULL,
        tls_version VARCHAR({SHORT}) NULL,
        tls_cipher VARCHAR({CIPHER}) NULL,
        auth_user VARCHAR({NAME}) NULL,
        tx_count INTEGER NOT NULL,
        outcome VARCHAR({SHORT}) NOT NULL,
        check_name VARCHAR({CHECK}) NULL,
        last_reply VARCHAR({REPLY}) NULL,
        bytes_in BIGINT NOT NULL,
        bytes_out BIGINT NOT NULL"
    );
    let transactions_cols = format!(
        "{id},
        session_id VARCHAR({SESSION}) NOT NULL,
        tx_seq INTEGER NOT NULL,
        ts_ms BIGINT NOT NULL,
        client_ip VARCHAR({IP}) NOT NULL,
        sender VARCHAR({ADDRESS}) NOT NULL,
        sender_domain VARCHAR({NAME}) NOT NULL,
        rcpt_count INTEGER NOT NULL,
        size_bytes BIGINT NOT NULL,
        message_id VARCHAR({NAME}) NULL,
        subject VARCHAR({SUBJECT}) NULL,
        outcome VARCHAR({SHORT}) NOT NULL,
        check_name VARCHAR({CHECK}) NULL,
        reply VARCHAR({REPLY}) NULL,
        upstream_reply VARCHAR({REPLY}) NULL,
        queue_id VARCHAR({QUEUE_ID}) NULL,
        spf VARCHAR({NAME}) NOT NULL,
        dkim VARCHAR({NAME}) NOT NULL,
        dmarc VARCHAR({NAME}) NOT NULL,
        score DOUBLE PRECISION NOT NULL,
        ms_total BIGINT NOT NULL,
        ms_mail BIGINT NOT NULL,
        ms_rcpt BIGINT NOT NULL,
        ms_data BIGINT NOT NULL,
        ms_upstream BIGINT NOT NULL"
    );
    let recipients_cols = format!(
        "{id},
        session_id VARCHAR({SESSION}) NOT NULL,
        tx_seq INTEGER NOT NULL,
        ts_ms BIGINT NOT NULL,
        recipient VARCHAR({ADDRESS}) NOT NULL,
        reply VARCHAR({REPLY}) NULL"
    );
    let indexes: [(&str, &str, &str); 14] = [
        (&t.connections, "conn_time", "connect_ms"),
        (&t.connections, "conn_ip", "client_ip, connect_ms"),
        (&t.connections, "conn_outcome", "outcome, connect_ms"),
        (&t.connections, "conn_session", "session_id"),
        (&t.transactions, "tx_time", "ts_ms"),
        (&t.transactions, "tx_ip", "client_ip, ts_ms"),
        (&t.transactions, "tx_sender", "sender, ts_ms"),
        (&t.transactions, "tx_domain", "sender_domain, ts_ms"),
        (&t.transactions, "tx_outcome", "outcome, ts_ms"),
        (&t.transactions, "tx_session", "session_id, tx_seq"),
        (&t.transactions, "tx_msgid", "message_id"),
        (&t.recipients, "rcpt_addr", "recipient, ts_ms"),
        (&t.recipients, "rcpt_time", "ts_ms"),
        (&t.recipients, "rcpt_tx", "session_id, tx_seq"),
    ];
    let tables = [
        (&t.connections, connections_cols),
        (&t.transactions, transactions_cols),
        (&t.recipients, recipients_cols),
    ];
    match backend {
        Backend::MySql => tables
            .iter()
            .map(|(table, cols)| {
                let idx: String = indexes
                    .iter()
                    .filter(|(tb, _, _)| tb == table)
                    .map(|(_, name, on)| format!(",\n        INDEX {p}{name} ({on})"))
                    .collect();
                format!(
                    "CREATE TABLE IF NOT EXISTS {table} (\n        {cols}{idx}\n) \
                     ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
                )
            })
            .collect(),
        Backend::Sqlite | Backend::Postgres => {
            let mut out: Vec<String> = tables
                .iter()
                .map(|(table, cols)| format!("CREATE TABLE IF NOT EXISTS {table} (\n        {cols}\n)"))
                .collect();
            out.extend(
                indexes.iter().map(|(table, name, on)| {
                    format!("CREATE INDEX IF NOT EXISTS {p}{name} ON {table} ({on})")
                }),
            );
            out
        }
    }
}

/// The statement that creates the version table.
fn schema_table(backend: Backend, t: &Tables) -> String {
    let suffix = if backend == Backend::MySql {
        " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
    } else {
        ""
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {} (version INTEGER NOT NULL PRIMARY KEY, applied_ms BIGINT NOT NULL){suffix}",
        t.schema
    )
}

/// Records a migration as applied; a concurrent node having done the same is no error.
fn record_version(backend: Backend, t: &Tables) -> String {
    match backend {
        Backend::Sqlite => format!(
            "INSERT OR IGNORE INTO {} (version, applied_ms) VALUES (?, ?)",
            t.schema
        ),
        Backend::MySql => format!(
            "INSERT IGNORE INTO {} (version, applied_ms) VALUES (?, ?)",
            t.schema
        ),
        Backend::Postgres => format!(
            "INSERT INTO {} (version, applied_ms) VALUES ($1, $2) ON CONFLICT (version) DO NOTHING",
            t.schema
        ),
    }
}

/// The newest schema version this build knows (the last migration's).
pub const LATEST_VERSION: i64 = 1;

/// The schema version recorded in the database (0 when there is no version table yet).
pub async fn current_version(conn: &mut AnyConnection, t: &Tables) -> Result<i64, sqlx::Error> {
    let sql = format!("SELECT COALESCE(MAX(version), 0) AS v FROM {}", t.schema);
    let row = sqlx::query(AssertSqlSafe(sql)).fetch_one(&mut *conn).await?;
    row.try_get::<i64, _>(0)
}

/// Creates the tables or brings them up to the latest version. Idempotent, and safe when
/// several nodes start at once (`IF NOT EXISTS`, the version row is inserted "or ignore").
/// Returns the version the database is at afterwards; a database newer than this build is
/// left alone (new versions only add), with its version returned.
pub async fn migrate(conn: &mut AnyConnection, backend: Backend, t: &Tables) -> Result<i64, sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(schema_table(backend, t)))
        .execute(&mut *conn)
        .await?;
    let mut version = current_version(conn, t).await?;
    for m in migrations(backend, t) {
        if m.version <= version {
            continue;
        }
        let now = chrono::Utc::now().timestamp_millis();
        // SQLite and PostgreSQL have transactional DDL: a migration applies entirely or not
        // at all. MySQL commits each DDL statement; its migrations are idempotent instead.
        let mut tx = conn.begin().await?;
        for stmt in &m.statements {
            sqlx::raw_sql(AssertSqlSafe(stmt.as_str()))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(AssertSqlSafe(record_version(backend, t)))
            .bind(m.version)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        version = m.version;
    }
    Ok(version)
}

/// `INSERT INTO table (cols) VALUES (?, …), (?, …), …` for `rows` rows.
pub(crate) fn insert_sql(backend: Backend, table: &str, cols: &[&str], rows: usize) -> String {
    let mut sql = String::with_capacity(64 + cols.len() * (12 + rows * 4));
    sql.push_str("INSERT INTO ");
    sql.push_str(table);
    sql.push_str(" (");
    sql.push_str(&cols.join(", "));
    sql.push_str(") VALUES ");
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..cols.len() {
            if c > 0 {
                sql.push_str(", ");
            }
            if backend == Backend::Postgres {
                n += 1;
                sql.push('$');
                sql.push_str(&n.to_string());
            } else {
                sql.push('?');
            }
        }
        sql.push(')');
    }
    sql
}

/// Deletes at most `limit` rows of `table` older than the one bound parameter (ms), oldest
/// first, so that pruning a large backlog never holds long locks.
pub(crate) fn prune_sql(backend: Backend, table: &str, time_col: &str, limit: u32) -> String {
    match backend {
        // MariaDB refuses LIMIT inside an IN (subquery); single-table DELETE takes a LIMIT.
        Backend::MySql => {
            format!("DELETE FROM {table} WHERE {time_col} < ? ORDER BY {time_col} LIMIT {limit}")
        }
        // SQLite (without SQLITE_ENABLE_UPDATE_DELETE_LIMIT) and PostgreSQL have no DELETE …
        // LIMIT; select the ids through the time index instead.
        Backend::Sqlite => format!(
            "DELETE FROM {table} WHERE id IN \
             (SELECT id FROM {table} WHERE {time_col} < ? ORDER BY {time_col} LIMIT {limit})"
        ),
        Backend::Postgres => format!(
            "DELETE FROM {table} WHERE id IN \
             (SELECT id FROM {table} WHERE {time_col} < $1 ORDER BY {time_col} LIMIT {limit})"
        ),
    }
}

/// Session settings applied to every new connection.
pub(crate) async fn prepare_connection(
    conn: &mut AnyConnection,
    backend: Backend,
) -> Result<(), sqlx::Error> {
    if backend == Backend::Sqlite {
        // WAL lets admin queries read while the writer writes; NORMAL sync is durable
        // across process crashes (the OS still has the data) and much faster than FULL.
        // Each multi-row INSERT inside the batch's transaction keeps a statement journal
        // (to undo just that statement); in a temporary file that was two more writes per
        // message than the WAL itself. Held in memory instead: a few pages per statement.
        sqlx::raw_sql("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Whether an error is about the rows themselves (a value the schema refuses), so that
/// retrying the same batch can never succeed. Everything else (connection lost, lock
/// timeouts, disk full, a table dropped under us) is worth retrying after a reconnect.
pub(crate) fn is_data_error(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        // 1264 out of range, 1292 bad value, 1366 bad string, 1406 too long, 3819/4025
        // CHECK constraint (MySQL/MariaDB).
        return matches!(my.number(), 1264 | 1292 | 1366 | 1406 | 3819 | 4025)
            || my
                .code()
                .is_some_and(|s| s.starts_with("22") || s.starts_with("23"));
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // The extended result code; its low byte is the primary code.
        let code = db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff)
            .unwrap_or(0);
        // SQLITE_TOOBIG, SQLITE_CONSTRAINT, SQLITE_MISMATCH, SQLITE_RANGE.
        return matches!(code, 18 | 19 | 20 | 25);
    }
    // PostgreSQL: SQLSTATE classes 22 (data exception) and 23 (integrity violation).
    db.code()
        .is_some_and(|s| s.starts_with("22") || s.starts_with("23"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_placeholders_are_numbered() {
        assert_eq!(Backend::Postgres.sql("a = ? AND b < ?"), "a = $1 AND b < $2");
        assert_eq!(Backend::MySql.sql("a = ?"), "a = ?");
        assert_eq!(
            insert_sql(Backend::Postgres, "t", &["a", "b"], 2),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)"
        );
        assert_eq!(
            insert_sql(Backend::Sqlite, "t", &["a"], 2),
            "INSERT INTO t (a) VALUES (?), (?)"
        );
    }

    #[test]
    fn urls_select_backends_and_hide_passwords() {
        assert_eq!(Backend::from_url("sqlite://x.db"), Ok(Backend::Sqlite));
        assert_eq!(Backend::from_url("mariadb://h/db"), Ok(Backend::MySql));
        assert_eq!(Backend::from_url("postgresql://h/db"), Ok(Backend::Postgres));
        assert!(Backend::from_url("redis://h").is_err());
        assert_eq!(
            redact_url("mysql://u:secret@h:3306/db"),
            "mysql://u:***@h:3306/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert!(!Backend::from_url("oracle://u:pw@h").unwrap_err().contains("pw"));
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(Tables::new("thassp_").is_ok());
        assert!(Tables::new("t1_x").is_ok());
        for bad in ["", "1t", "T_", "a;drop", "a-b"] {
            assert!(Tables::new(bad).is_err(), "{bad}");
        }
        let t = Tables::new(DEFAULT_PREFIX).unwrap();
        for b in [Backend::Sqlite, Backend::MySql, Backend::Postgres] {
            assert_eq!(migrations(b, &t).last().map(|m| m.version), Some(LATEST_VERSION));
        }
    }
}
