//! The web front end: a JSON API under `/api/…`, `GET /metrics`, `GET /health`, and a small
//! server-rendered HTML UI (no scripts, no CDN; forms post to `/ui/…` and redirect back).
//! Every handler only translates between HTTP and [`Service`]; nothing here decides.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/health` | `ok` (no credentials) |
//! | GET | `/metrics` | OpenMetrics text (credentials unless `metrics_public`) |
//! | GET | `/api/status` | version, uptime, listeners, upstreams, store, event log, DNSBL, counters |
//! | GET | `/api/stats?since=10d&until=&category=&top=10` | outcome table, totals, per-day series, top lists |
//! | GET | `/api/events?kind=transactions\|connections&since=&until=&before=&client=&sender=&recipient=&outcome=&session=&limit=&offset=` | event search, newest first |
//! | GET | `/api/lists?list=white\|black` | admin list entries |
//! | POST | `/api/lists` `{"list","entry","note"}` | add an entry |
//! | DELETE | `/api/lists?list=&entry=` | remove an entry |
//! | GET | `/api/greylist?prefix=&q=&limit=` | greylist entries |
//! | POST | `/api/greylist/release` `{"key"}` | release a triplet |
//! | DELETE | `/api/greylist?key=` | forget a triplet |
//! | GET / DELETE | `/api/blocks[?client=]` | blocked clients / unblock |
//! | GET / DELETE | `/api/tarpit[?client=]` | failure counters / clear |
//! | GET | `/api/config?format=json\|toml` | effective configuration, secrets redacted |
//! | POST | `/api/reload` | re-read the configuration file (422 + errors when refused) |
//! | POST | `/api/check` (body: TOML) | validate a candidate configuration (422 when invalid) |
//!
//! Credentials on every path but `/health`: `Authorization: Bearer TOKEN` or HTTP Basic
//! (`admin.user` + password). Wrong ones answer `401` and are counted; after
//! `max_auth_failures` in a minute the client gets `429` for the rest of it. Requests that
//! change something are refused (`403`) when a browser marks them cross-site (`Origin` or
//! `Sec-Fetch-Site`), so another web page cannot use a logged-in browser (CSRF). Errors are
//! JSON `{"error": "…"}`; internal errors are logged and answered without detail.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tracing::error;

use super::{Auth, AuthOutcome, Credentials};
use crate::events::{CATEGORIES, OutcomeRow, category_index};
use crate::metrics::{self, Metrics};
use crate::service::{
    self, EventItem, EventKind, EventSearch, ListKind, Service, ServiceError, StatsReport, Status,
};

/// Requests handled at once; more get `503` (the admin is for a few people, not a crowd).
const MAX_IN_FLIGHT: usize = 32;
/// Largest request body (a candidate configuration is the biggest thing posted).
const MAX_BODY: usize = service::MAX_CONFIG_TEXT + 64 * 1024;

/// What every handler gets.
#[derive(Clone)]
struct Web {
    service: Arc<Service>,
    auth: Arc<Auth>,
    metrics: Arc<Metrics>,
    in_flight: Arc<Semaphore>,
}

/// The admin router over `service`, authenticating with `auth`. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so failures are counted per client
/// (without it every client shares one counter).
pub fn router(service: Arc<Service>, auth: Auth) -> Router {
    router_with(service, Arc::new(auth))
}

/// [`router`] with an authenticator shared with the console.
pub fn router_with(service: Arc<Service>, auth: Arc<Auth>) -> Router {
    let mut m = Metrics::new(service.app().clone());
    m.registry_mut().register(
        "thassp_admin_auth_failures",
        "Wrong credentials at the admin web interface, API and console.",
        auth.failures_total.clone(),
    );
    m.registry_mut().register(
        "thassp_admin_auth_limited",
        "Admin requests and console logins refused by the failure rate limit.",
        auth.limited_total.clone(),
    );
    let state = Web {
        service,
        auth,
        metrics: Arc::new(m),
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
    };
    Router::new()
        .route("/", get(dashboard))
        .route("/ui/lists", get(lists_page))
        .route("/ui/lists/add", post(ui_list_add))
        .route("/ui/lists/remove", post(ui_list_remove))
        .route("/ui/greylist", get(grey_page))
        .route("/ui/greylist/release", post(ui_grey_release))
        .route("/ui/greylist/delete", post(ui_grey_delete))
        .route("/ui/blocks", get(blocks_page))
        .route("/ui/blocks/remove", post(ui_unblock))
        .route("/ui/tarpit/clear", post(ui_tarpit_clear))
        .route("/ui/events", get(events_page))
        .route("/ui/config", get(config_page))
        .route("/ui/reload", post(ui_reload))
        .route("/ui/check", post(ui_check))
        .route("/metrics", get(metrics_text))
        .route("/api/status", get(api_status))
        .route("/api/stats", get(api_stats))
        .route("/api/events", get(api_events))
        .route(
            "/api/lists",
            get(api_lists).post(api_list_add).delete(api_list_remove),
        )
        .route("/api/greylist", get(api_greylist).delete(api_grey_delete))
        .route("/api/greylist/release", post(api_grey_release))
        .route("/api/blocks", get(api_blocks).delete(api_unblock))
        .route("/api/tarpit", get(api_tarpit).delete(api_tarpit_clear))
        .route("/api/config", get(api_config))
        .route("/api/reload", post(api_reload))
        .route("/api/check", post(api_check))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Layers added here wrap every route above; `/health` is added after them, so it
        // needs no credentials.
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------
// Errors

/// An error response: JSON `{"error": "…"}` with a status.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    message: String,
}

impl AppError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<ServiceError> for AppError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, format!("not found: {m}")),
            ServiceError::BadRequest(m) => Self::bad_request(m),
            ServiceError::Unavailable(m) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, format!("unavailable: {m}"))
            }
            ServiceError::Internal(m) => {
                // The detail is for the operator's log; the client learns only that it failed.
                error!(error = %m, "Admin request failed.");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error (see the log)")
            }
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, AppError>;

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(t)| t)
        .map_err(|e| AppError::bad_request(e.body_text()))
}

fn form<T>(f: Result<Form<T>, FormRejection>) -> ApiResult<T> {
    f.map(|Form(t)| t)
        .map_err(|e| AppError::bad_request(e.body_text()))
}

fn json_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| AppError::bad_request(format!("request body: {e}")))
}

async fn not_found() -> AppError {
    AppError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed() -> AppError {
    AppError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
}

// ---------------------------------------------------------------------------------------
// Authentication, CSRF, load

async fn guard(State(s): State<Web>, req: Request, next: Next) -> Response {
    let Ok(_permit) = s.in_flight.clone().try_acquire_owned() else {
        return AppError::new(StatusCode::SERVICE_UNAVAILABLE, "busy, try again").into_response();
    };
    let public = req.uri().path() == "/metrics" && s.auth.metrics_public;
    if !public {
        let client = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let decoded;
        let creds = match header {
            None => Credentials::None,
            Some(h) => match parse_authorization(h) {
                Some(Authorization::Bearer(t)) => Credentials::Token(t),
                Some(Authorization::Basic(raw)) => {
                    decoded = raw;
                    match decoded.split_once(':') {
                        Some((user, password)) => Credentials::UserPassword { user, password },
                        None => Credentials::Token(""),
                    }
                }
                // Something unreadable is a wrong credential, counted like one.
                None => Credentials::Token(""),
            },
        };
        match s.auth.check(client, creds).await {
            AuthOutcome::Ok => {}
            AuthOutcome::Missing | AuthOutcome::Wrong => {
                let mut r = AppError::new(StatusCode::UNAUTHORIZED, "credentials required").into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"thassp admin\", charset=\"UTF-8\""),
                );
                return r;
            }
            AuthOutcome::Limited => {
                let mut r = AppError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed logins, wait a minute",
                )
                .into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
                return r;
            }
        }
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) && cross_site(req.headers()) {
        return AppError::new(StatusCode::FORBIDDEN, "cross-site request refused").into_response();
    }
    let mut r = next.run(req).await;
    // Admin pages hold state an attacker would like to frame or cache.
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"),
    );
    r
}

enum Authorization<'a> {
    Bearer(&'a str),
    /// `user:password`, decoded.
    Basic(String),
}

fn parse_authorization(value: &[u8]) -> Option<Authorization<'_>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(Authorization::Bearer(rest))
    } else if scheme.eq_ignore_ascii_case("basic") && rest.len() <= 4096 {
        let raw = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        String::from_utf8(raw).ok().map(Authorization::Basic)
    } else {
        None
    }
}

/// Whether a browser says the request comes from another site. Non-browser clients send
/// neither header and pass.
fn cross_site(h: &HeaderMap) -> bool {
    if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return true;
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let Ok(origin) = origin.to_str() else {
            return true;
        };
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        let origin_host = origin
            .split_once("://")
            .map_or("", |(_, rest)| rest)
            .trim_end_matches('/');
        return origin == "null" || !origin_host.eq_ignore_ascii_case(host);
    }
    false
}

// ---------------------------------------------------------------------------------------
// JSON API

async fn metrics_text(State(s): State<Web>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}

async fn api_status(State(s): State<Web>) -> axum::Json<Status> {
    axum::Json(s.service.status())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StatsParams {
    since: Option<String>,
    until: Option<String>,
    category: Option<String>,
    top: Option<u32>,
}

async fn stats_of(service: &Service, p: &StatsParams) -> Result<StatsReport, ServiceError> {
    let until = match p.until.as_deref().filter(|u| !u.is_empty()) {
        Some(u) => service::parse_time(u)?,
        None => chrono::Utc::now(),
    };
    let since = match p.since.as_deref().filter(|s| !s.is_empty()) {
        // A bare period counts back from `until`.
        Some(s) => match service::parse_period(s) {
            Ok(period) => service::ago(until, period)?,
            Err(_) => service::parse_time(s)?,
        },
        None => service::ago(until, std::time::Duration::from_secs(10 * 86400))?,
    };
    let category = p
        .category
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(service::parse_outcome)
        .transpose()?;
    service.stats(since, until, category, p.top.unwrap_or(10)).await
}

async fn api_stats(
    State(s): State<Web>,
    q: Result<Query<StatsParams>, QueryRejection>,
) -> ApiResult<axum::Json<StatsReport>> {
    let p = query(q)?;
    Ok(axum::Json(stats_of(&s.service, &p).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EventParams {
    kind: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<String>,
    client: Option<String>,
    sender: Option<String>,
    recipient: Option<String>,
    outcome: Option<String>,
    session: Option<String>,
    limit: Option<u32>,
    offset: Option<u32>,
}

impl EventParams {
    fn search(&self) -> Result<EventSearch, ServiceError> {
        let set = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
        };
        let time = |v: &Option<String>| set(v).map(|t| service::parse_time(&t)).transpose();
        Ok(EventSearch {
            kind: EventKind::parse(self.kind.as_deref().unwrap_or(""))?,
            since: time(&self.since)?,
            until: time(&self.until)?,
            before: time(&self.before)?,
            client_ip: set(&self.client)
                .map(|c| {
                    c.parse::<IpAddr>()
                        .map_err(|_| ServiceError::BadRequest(format!("client: {c:?} is not an IP address")))
                })
                .transpose()?,
            sender: set(&self.sender),
            recipient: set(&self.recipient),
            outcome: set(&self.outcome)
                .map(|o| service::parse_outcome(&o))
                .transpose()?,
            session_id: set(&self.session),
            limit: self.limit.unwrap_or(0),
            offset: self.offset.unwrap_or(0),
        })
    }
}

async fn api_events(
    State(s): State<Web>,
    q: Result<Query<EventParams>, QueryRejection>,
) -> ApiResult<Response> {
    let search = query(q)?.search()?;
    Ok(axum::Json(s.service.events(&search).await?).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ListParams {
    list: Option<String>,
    entry: Option<String>,
    note: Option<String>,
}

fn list_kind(list: Option<&str>) -> Result<ListKind, ServiceError> {
    ListKind::parse(list.unwrap_or(""))
}

async fn api_lists(
    State(s): State<Web>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    let list = p
        .list
        .as_deref()
        .filter(|l| !l.is_empty())
        .map(ListKind::parse)
        .transpose()?;
    Ok(axum::Json(s.service.lists(list).await?).into_response())
}

async fn api_list_add(State(s): State<Web>, body: Bytes) -> ApiResult<Response> {
    let p: ListParams = json_body(&body)?;
    let list = list_kind(p.list.as_deref())?;
    let change = s
        .service
        .list_add(
            list,
            p.entry.as_deref().unwrap_or(""),
            p.note.as_deref().unwrap_or(""),
        )
        .await?;
    let status = if change.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(change)).into_response())
}

async fn api_list_remove(
    State(s): State<Web>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    let list = list_kind(p.list.as_deref())?;
    let entry = p.entry.unwrap_or_default();
    s.service.list_remove(list, &entry).await?;
    Ok(axum::Json(serde_json::json!({ "removed": entry.trim() })).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GreyParams {
    prefix: Option<String>,
    q: Option<String>,
    key: Option<String>,
    limit: Option<u32>,
}

async fn api_greylist(
    State(s): State<Web>,
    q: Result<Query<GreyParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    let list = s
        .service
        .greylist(
            p.prefix.as_deref().unwrap_or(""),
            p.q.as_deref().unwrap_or(""),
            p.limit.unwrap_or(0),
        )
        .await?;
    Ok(axum::Json(list).into_response())
}

async fn api_grey_release(State(s): State<Web>, body: Bytes) -> ApiResult<Response> {
    let p: GreyParams = json_body(&body)?;
    let entry = s.service.grey_release(p.key.as_deref().unwrap_or("")).await?;
    Ok(axum::Json(entry).into_response())
}

async fn api_grey_delete(
    State(s): State<Web>,
    q: Result<Query<GreyParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    let key = p.key.unwrap_or_default();
    s.service.grey_delete(&key).await?;
    Ok(axum::Json(serde_json::json!({ "deleted": key.trim() })).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ClientParams {
    client: Option<String>,
    /// Accepted as a synonym of `client` (the store key).
    key: Option<String>,
    limit: Option<u32>,
}

impl ClientParams {
    fn client(&self) -> ApiResult<&str> {
        self.client
            .as_deref()
            .or(self.key.as_deref())
            .filter(|c| !c.trim().is_empty())
            .ok_or_else(|| AppError::bad_request("client: required (an IP address or network)"))
    }
}

async fn api_blocks(
    State(s): State<Web>,
    q: Result<Query<ClientParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    Ok(axum::Json(s.service.blocks(p.limit.unwrap_or(0)).await?).into_response())
}

async fn api_unblock(
    State(s): State<Web>,
    q: Result<Query<ClientParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    let removed = s.service.unblock(p.client()?).await?;
    Ok(axum::Json(serde_json::json!({ "unblocked": removed })).into_response())
}

async fn api_tarpit(
    State(s): State<Web>,
    q: Result<Query<ClientParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    Ok(axum::Json(s.service.tarpit(p.limit.unwrap_or(0)).await?).into_response())
}

async fn api_tarpit_clear(
    State(s): State<Web>,
    q: Result<Query<ClientParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    let n = s.service.tarpit_clear(p.client()?).await?;
    Ok(axum::Json(serde_json::json!({ "cleared": n })).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConfigParams {
    format: Option<String>,
}

async fn api_config(
    State(s): State<Web>,
    q: Result<Query<ConfigParams>, QueryRejection>,
) -> ApiResult<Response> {
    let p = query(q)?;
    match p.format.as_deref().unwrap_or("json") {
        "json" => Ok(axum::Json(s.service.config_json()).into_response()),
        "toml" => Ok((
            [(header::CONTENT_TYPE, "application/toml; charset=utf-8")],
            s.service.config_toml()?,
        )
            .into_response()),
        other => Err(AppError::bad_request(format!(
            "format {other:?}: use json or toml"
        ))),
    }
}

async fn api_reload(State(s): State<Web>) -> Response {
    let report = s.service.reload().await;
    let status = if report.reloaded {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (status, axum::Json(report)).into_response()
}

async fn api_check(State(s): State<Web>, body: Bytes) -> ApiResult<Response> {
    let text =
        std::str::from_utf8(&body).map_err(|_| AppError::bad_request("the configuration must be UTF-8"))?;
    let report = s.service.check(text).await;
    let status = if report.valid {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    Ok((status, axum::Json(report)).into_response())
}

// ---------------------------------------------------------------------------------------
// HTML UI

/// HTML-escapes text for element content and quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}\
header{background:#1f2d3d;color:#fff;padding:8px 16px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}\
header a{color:#cfe3ff;text-decoration:none}header b{font-size:16px}main{padding:12px 16px;max-width:1200px}\
table{border-collapse:collapse;background:#fff;margin:6px 0 16px}td,th{border:1px solid #dde;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#eef1f5}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.bar{background:#e8ecf1;width:220px;height:12px}.bar div{height:12px}\
.cards{display:flex;gap:10px;flex-wrap:wrap}.card{background:#fff;border:1px solid #dde;padding:8px 12px;min-width:150px}\
.card b{display:block;font-size:20px}.ok{color:#17803d}.bad{color:#b42318}.msg{background:#e7f6ec;border:1px solid #9ad2ae;padding:6px 10px}\
.err{background:#fdecea;border:1px solid #f1a79f;padding:6px 10px}form.inline{display:inline;margin:0}\
input,select,textarea,button{font:inherit}pre{background:#fff;border:1px solid #dde;padding:8px;overflow:auto;max-height:600px}\
.legend span{display:inline-block;margin-right:10px}.legend i{display:inline-block;width:10px;height:10px;margin-right:3px}";

/// A colour per outcome category, in vocabulary order (red-ish for the defences that
/// caught spam, grey for neutral, green for delivered).
const PALETTE: [&str; 20] = [
    "#7f1d1d", "#b42318", "#c2410c", "#9a3412", "#a16207", "#ca8a04", "#6b7280", "#be123c", "#7e22ce",
    "#6d28d9", "#1d4ed8", "#0e7490", "#0f766e", "#4d7c0f", "#65a30d", "#78716c", "#a21caf", "#374151",
    "#9ca3af", "#17803d",
];

fn colour(category: &str) -> &'static str {
    CATEGORIES
        .iter()
        .find(|c| c.as_str() == category)
        .map_or("#9ca3af", |c| PALETTE[category_index(*c) % PALETTE.len()])
}

/// A failed service call, shown in place of the page's table.
fn push_error(b: &mut String, e: ServiceError) {
    let _ = write!(b, "<p class=\"err\">{}</p>", esc(&AppError::from(e).message));
}

fn page(title: &str, flash: &Flash, body: &str) -> Html<String> {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{t} · thassp</title><style>{CSS}</style></head><body><header><b>thassp</b>\
         <a href=\"/\">Dashboard</a><a href=\"/ui/events\">Events</a><a href=\"/ui/lists\">Lists</a>\
         <a href=\"/ui/greylist\">Greylist</a><a href=\"/ui/blocks\">Blocks</a><a href=\"/ui/config\">Config</a></header><main><h1>{t}</h1>",
        t = esc(title)
    );
    if let Some(m) = flash.msg.as_deref().filter(|m| !m.is_empty()) {
        let _ = write!(out, "<p class=\"msg\" id=\"msg\">{}</p>", esc(&truncate(m, 500)));
    }
    if let Some(e) = flash.err.as_deref().filter(|e| !e.is_empty()) {
        let _ = write!(out, "<p class=\"err\" id=\"err\">{}</p>", esc(&truncate(e, 2000)));
    }
    out.push_str(body);
    out.push_str("</main></body></html>");
    Html(out)
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A message shown once after a form post (passed in the redirect's query).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Flash {
    msg: Option<String>,
    err: Option<String>,
}

fn back(to: &str, result: Result<String, ServiceError>) -> Redirect {
    let q = match result {
        Ok(m) => format!("msg={}", pct(&m)),
        Err(e) => format!("err={}", pct(&AppError::from(e).message)),
    };
    Redirect::to(&format!("{to}?{q}"))
}

fn fmt_time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map_or_else(|| "–".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn fmt_uptime(secs: u64) -> String {
    let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else {
        format!("{h}h {m}m {}s", secs % 60)
    }
}

fn outcome_table(rows: &[OutcomeRow], id: &str, out: &mut String) {
    let total: u64 = rows.iter().map(|r| r.count).sum();
    out.push_str(&format!(
        "<table id=\"{id}\"><tr><th>category</th><th>attempts</th><th>percent</th><th></th></tr>"
    ));
    for r in rows {
        let c = r.category.as_str();
        let _ = write!(
            out,
            "<tr><td>{c}</td><td class=\"n\">{}</td><td class=\"n\">{:.1} %</td>\
             <td><div class=\"bar\"><div style=\"width:{:.1}%;background:{}\"></div></div></td></tr>",
            r.count,
            r.percent,
            r.percent.clamp(0.0, 100.0),
            colour(c)
        );
    }
    let _ = write!(
        out,
        "<tr><th>total</th><th class=\"n\">{total}</th><th class=\"n\">{}</th><th></th></tr></table>",
        if total > 0 { "100.0 %" } else { "0.0 %" }
    );
}

/// One bar of a stacked chart: its label, tooltip prefix, counts per category and total.
struct Bar<'a> {
    label: String,
    title: String,
    counts: &'a BTreeMap<&'static str, u64>,
    total: u64,
}

/// A series as stacked bars (one colour per outcome) in inline SVG.
fn stacked_chart(id: &str, what: &str, bars: &[Bar<'_>], out: &mut String) {
    if bars.is_empty() {
        out.push_str("<p>No attempts in this period.</p>");
        return;
    }
    let max = bars.iter().map(|d| d.total).max().unwrap_or(1).max(1) as f64;
    let (bar, gap, height) = (
        if bars.len() > 40 { 8.0_f64 } else { 18.0_f64 },
        4.0_f64,
        160.0_f64,
    );
    let width = bars.len() as f64 * (bar + gap) + gap;
    let _ = write!(
        out,
        "<svg id=\"{id}\" width=\"{width:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {width:.0} {h:.0}\" role=\"img\" \
         aria-label=\"{what}\" style=\"background:#fff;border:1px solid #dde\">",
        h = height + 20.0
    );
    let mut used: BTreeMap<usize, &str> = BTreeMap::new();
    for (i, b) in bars.iter().enumerate() {
        let x = gap + i as f64 * (bar + gap);
        let mut y = height;
        // Vocabulary order, so every bar stacks the same way.
        for c in CATEGORIES {
            let Some(&n) = b.counts.get(c.as_str()) else {
                continue;
            };
            let h = n as f64 / max * (height - 10.0);
            y -= h;
            used.insert(category_index(c), c.as_str());
            let _ = write!(
                out,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar}\" height=\"{h:.1}\" fill=\"{}\"><title>{} {}: {n}</title></rect>",
                colour(c.as_str()),
                b.title,
                c.as_str()
            );
        }
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.0}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
            x + bar / 2.0,
            height + 14.0,
            b.label
        );
    }
    out.push_str("</svg><p class=\"legend\">");
    for c in used.values() {
        let _ = write!(out, "<span><i style=\"background:{}\"></i>{c}</span>", colour(c));
    }
    out.push_str("</p>");
}

/// The per-day series.
fn daily_chart(report: &StatsReport, out: &mut String) {
    let bars: Vec<Bar<'_>> = report
        .daily
        .iter()
        .map(|d| Bar {
            label: d.day.format("%d").to_string(),
            title: d.day.to_string(),
            counts: &d.counts,
            total: d.total,
        })
        .collect();
    stacked_chart("daily", "attempts per day", &bars, out);
}

/// The per-hour series (UTC), every third hour labelled.
fn hourly_chart(report: &StatsReport, out: &mut String) {
    let bars: Vec<Bar<'_>> = report
        .hourly
        .iter()
        .enumerate()
        .map(|(i, h)| Bar {
            label: if i % 3 == 0 {
                h.hour.format("%H").to_string()
            } else {
                String::new()
            },
            title: h.hour.format("%Y-%m-%d %H:00").to_string(),
            counts: &h.counts,
            total: h.total,
        })
        .collect();
    stacked_chart("hourly", "attempts per hour", &bars, out);
}

async fn dashboard(
    State(s): State<Web>,
    q: Result<Query<StatsParams>, QueryRejection>,
    f: Result<Query<Flash>, QueryRejection>,
) -> Html<String> {
    let flash = f.map(|Query(f)| f).unwrap_or_default();
    let mut p = q.map(|Query(p)| p).unwrap_or_default();
    if p.since.as_deref().is_none_or(str::is_empty) {
        p.since = Some("1d".into());
    }
    let status = s.service.status();
    let stats = stats_of(&s.service, &p).await;
    let mut b = String::new();
    let attempts: u64 = status.since_start.iter().map(|r| r.count).sum();
    let delivered = status
        .since_start
        .iter()
        .find(|r| r.category.as_str() == "delivered")
        .map_or(0, |r| r.count);
    let ev = &status.events;
    let _ = write!(
        b,
        "<div class=\"cards\">\
         <div class=\"card\">version<b>{}</b>{}</div>\
         <div class=\"card\">uptime<b>{}</b></div>\
         <div class=\"card\">connections<b id=\"sessions\">{}</b>since start</div>\
         <div class=\"card\">attempts<b id=\"attempts\">{attempts}</b>since start</div>\
         <div class=\"card\">delivered<b id=\"delivered\">{delivered}</b>since start</div>\
         <div class=\"card\">event log<b class=\"{}\">{}</b>queued {} · dropped {}</div>\
         <div class=\"card\">state store<b class=\"{}\">{}</b>{} errors</div>\
         <div class=\"card\">sessions now<b id=\"sessions-now\">{}</b>in progress</div></div>",
        esc(status.version),
        esc(&status.hostname),
        fmt_uptime(status.uptime_secs),
        status.counters.sessions,
        if !ev.enabled || ev.connected { "ok" } else { "bad" },
        if !ev.enabled {
            "off"
        } else if ev.connected {
            "connected"
        } else {
            "disconnected"
        },
        ev.queued,
        ev.dropped,
        if status.store.degraded { "bad" } else { "ok" },
        esc(&format!(
            "{}{}",
            status.store.backend,
            if status.store.degraded { " (degraded)" } else { "" }
        )),
        status.store.errors,
        status.sessions_current,
    );
    b.push_str("<h2>Outcomes</h2><p>Period: ");
    for period in ["1d", "7d", "30d", "90d"] {
        let _ = write!(b, "<a href=\"/?since={period}\">{period}</a> ");
    }
    b.push_str("</p>");
    match &stats {
        Ok(report) => {
            let _ = write!(
                b,
                "<p>{} to {} (UTC): {} attempts, {} connections, {} transactions.</p>",
                report.since.format("%Y-%m-%d %H:%M"),
                report.until.format("%Y-%m-%d %H:%M"),
                report.totals.attempts,
                report.totals.connections,
                report.totals.transactions
            );
            outcome_table(&report.outcomes, "outcomes", &mut b);
            if !report.hourly.is_empty() {
                b.push_str("<h2>Traffic per hour (UTC)</h2>");
                hourly_chart(report, &mut b);
            }
            b.push_str("<h2>Attempts per day</h2>");
            daily_chart(report, &mut b);
            b.push_str(
                "<h2>Top clients</h2><table id=\"top-clients\"><tr><th>client</th><th>attempts</th></tr>",
            );
            for t in &report.top_clients {
                let _ = write!(
                    b,
                    "<tr><td><a href=\"/ui/events?kind=connections&amp;client={}\">{}</a></td><td class=\"n\">{}</td></tr>",
                    pct(&t.name),
                    esc(&t.name),
                    t.count
                );
            }
            b.push_str("</table><h2>Top sender domains</h2><table id=\"top-domains\"><tr><th>domain</th><th>transactions</th></tr>");
            for t in &report.top_sender_domains {
                let name = if t.name.is_empty() { "<>" } else { &t.name };
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td class=\"n\">{}</td></tr>",
                    esc(name),
                    t.count
                );
            }
            b.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(
                b,
                "<p class=\"err\">Statistics from the event log are not available: {}. \
                 The live counters since start follow.</p>",
                esc(&AppError::from(e.clone()).message)
            );
        }
    }
    b.push_str(
        "<h2>Sessions in progress</h2><table id=\"live\"><tr><th>session</th><th>client</th><th>stage</th>\
         <th>seconds</th><th>tarpitted</th></tr>",
    );
    for l in status.sessions.iter().take(50) {
        let stage = serde_json::to_value(l.stage)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            esc(&l.id),
            esc(&l.client),
            esc(&stage),
            l.seconds,
            if l.tarpitted { "yes" } else { "" }
        );
    }
    b.push_str("</table>");
    b.push_str("<h2>Since start (live counters)</h2>");
    outcome_table(&status.since_start, "outcomes-live", &mut b);
    b.push_str(
        "<h2>Upstreams</h2><table id=\"upstreams\"><tr><th>name</th><th>address</th><th>health</th>\
         <th>last probe</th><th>extensions</th></tr>",
    );
    for u in &status.upstreams {
        let ext = u.capabilities.as_ref().map_or_else(
            || "not reached yet".to_string(),
            |c| {
                let mut e = Vec::new();
                for (on, name) in [
                    (c.pipelining, "PIPELINING"),
                    (c.eight_bit_mime, "8BITMIME"),
                    (c.smtputf8, "SMTPUTF8"),
                    (c.dsn, "DSN"),
                    (c.starttls, "STARTTLS"),
                    (c.chunking, "CHUNKING"),
                    (!c.xclient.is_empty(), "XCLIENT"),
                    (!c.xforward.is_empty(), "XFORWARD"),
                    (!c.auth.is_empty(), "AUTH"),
                ] {
                    if on {
                        e.push(name);
                    }
                }
                e.join(" ")
            },
        );
        let health = if u.healthy {
            "<span class=\"ok\">up</span>".to_string()
        } else {
            format!(
                "<span class=\"bad\">down</span> {}",
                esc(u.last_error.as_deref().unwrap_or("not probed yet"))
            )
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{health}</td><td>{}</td><td>{}</td></tr>",
            esc(&u.name),
            esc(&u.address),
            fmt_time(u.last_probe),
            esc(&ext)
        );
    }
    b.push_str("</table>");
    if !status.dnsbl.is_empty() {
        b.push_str("<h2>DNSBL zones</h2><table><tr><th>zone</th><th>state</th><th>last test</th></tr>");
        for z in &status.dnsbl {
            let _ = write!(
                b,
                "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                esc(&z.zone),
                if z.enabled { "ok" } else { "bad" },
                esc(&if z.enabled {
                    "in use".to_string()
                } else {
                    format!("disabled: {}", z.reason.as_deref().unwrap_or("not tested yet"))
                }),
                fmt_time(z.last_test)
            );
        }
        b.push_str("</table>");
    }
    page("Dashboard", &flash, &b)
}

async fn lists_page(State(s): State<Web>, f: Result<Query<Flash>, QueryRejection>) -> Html<String> {
    let flash = f.map(|Query(f)| f).unwrap_or_default();
    let mut b = String::from(
        "<form method=\"post\" action=\"/ui/lists/add\" id=\"add-entry\"><select name=\"list\">\
         <option value=\"black\">blacklist</option><option value=\"white\">whitelist</option></select> \
         <input name=\"entry\" placeholder=\"192.0.2.0/24, helo:name, rcpt:user@example.com, sender\" size=\"44\" required> \
         <input name=\"note\" placeholder=\"note\" size=\"24\"> <button>Add</button></form>\
         <p>Entries use list-file syntax; they are kept in the state store (shared by a cluster).</p>",
    );
    match s.service.lists(None).await {
        Ok(listing) => {
            b.push_str("<table id=\"entries\"><tr><th>list</th><th>entry</th><th>kind</th><th>note</th><th>added</th><th></th></tr>");
            for e in &listing.entries {
                let _ = write!(
                    b,
                    "<tr><td>{l}</td><td>{en}</td><td>{}</td><td>{}</td><td>{}</td><td>\
                     <form class=\"inline\" method=\"post\" action=\"/ui/lists/remove\">\
                     <input type=\"hidden\" name=\"list\" value=\"{l}\"><input type=\"hidden\" name=\"entry\" value=\"{en}\">\
                     <button>Remove</button></form></td></tr>",
                    e.kind,
                    esc(&e.note),
                    fmt_time(e.added),
                    l = e.list.as_str(),
                    en = esc(&e.entry),
                );
            }
            b.push_str("</table>");
            if listing.truncated {
                b.push_str("<p>Only the first entries are shown.</p>");
            }
        }
        Err(e) => push_error(&mut b, e),
    }
    page("Lists", &flash, &b)
}

async fn ui_list_add(
    State(s): State<Web>,
    f: Result<Form<ListParams>, FormRejection>,
) -> ApiResult<Redirect> {
    let p = form(f)?;
    let result = async {
        let list = list_kind(p.list.as_deref())?;
        let change = s
            .service
            .list_add(
                list,
                p.entry.as_deref().unwrap_or(""),
                p.note.as_deref().unwrap_or(""),
            )
            .await?;
        Ok(format!(
            "{} {} the {}list",
            change.entry.entry,
            if change.created { "added to" } else { "updated in" },
            list.as_str()
        ))
    }
    .await;
    Ok(back("/ui/lists", result))
}

async fn ui_list_remove(
    State(s): State<Web>,
    f: Result<Form<ListParams>, FormRejection>,
) -> ApiResult<Redirect> {
    let p = form(f)?;
    let result = async {
        let list = list_kind(p.list.as_deref())?;
        let entry = p.entry.unwrap_or_default();
        s.service.list_remove(list, &entry).await?;
        Ok(format!("{} removed from the {}list", entry.trim(), list.as_str()))
    }
    .await;
    Ok(back("/ui/lists", result))
}

async fn grey_page(
    State(s): State<Web>,
    q: Result<Query<GreyParams>, QueryRejection>,
    f: Result<Query<Flash>, QueryRejection>,
) -> Html<String> {
    let flash = f.map(|Query(f)| f).unwrap_or_default();
    let p = q.map(|Query(p)| p).unwrap_or_default();
    let needle = p.q.clone().unwrap_or_default();
    let mut b = String::new();
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/ui/greylist\"><input name=\"q\" value=\"{}\" placeholder=\"network, sender or recipient\" size=\"40\"> \
         <button>Search</button></form>",
        esc(&needle)
    );
    match s
        .service
        .greylist(p.prefix.as_deref().unwrap_or(""), &needle, p.limit.unwrap_or(200))
        .await
    {
        Ok(list) => {
            b.push_str(
                "<table id=\"greylist\"><tr><th>client</th><th>sender</th><th>recipient</th><th>first seen</th>\
                 <th>retry in</th><th>expires</th><th></th></tr>",
            );
            for e in &list.entries {
                let k = esc(&e.key);
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>\
                     <form class=\"inline\" method=\"post\" action=\"/ui/greylist/release\"><input type=\"hidden\" name=\"key\" value=\"{k}\"><button>Release</button></form> \
                     <form class=\"inline\" method=\"post\" action=\"/ui/greylist/delete\"><input type=\"hidden\" name=\"key\" value=\"{k}\"><button>Delete</button></form></td></tr>",
                    esc(&e.client),
                    esc(&e.sender),
                    esc(&e.recipient),
                    fmt_time(e.first_seen),
                    if e.retry_in_secs == 0 {
                        "now".to_string()
                    } else {
                        format!("{}s", e.retry_in_secs)
                    },
                    fmt_time(e.expires)
                );
            }
            b.push_str("</table>");
            if list.truncated {
                b.push_str("<p>More entries match; narrow the search.</p>");
            }
        }
        Err(e) => push_error(&mut b, e),
    }
    page("Greylist", &flash, &b)
}

async fn ui_grey_release(
    State(s): State<Web>,
    f: Result<Form<GreyParams>, FormRejection>,
) -> ApiResult<Redirect> {
    let p = form(f)?;
    let result = s
        .service
        .grey_release(p.key.as_deref().unwrap_or(""))
        .await
        .map(|e| format!("released: {} → {} (next retry passes)", e.sender, e.recipient));
    Ok(back("/ui/greylist", result))
}

async fn ui_grey_delete(
    State(s): State<Web>,
    f: Result<Form<GreyParams>, FormRejection>,
) -> ApiResult<Redirect> {
    let p = form(f)?;
    let key = p.key.unwrap_or_default();
    let result = s
        .service
        .grey_delete(&key)
        .await
        .map(|()| format!("deleted {}", key.trim()));
    Ok(back("/ui/greylist", result))
}

async fn blocks_page(State(s): State<Web>, f: Result<Query<Flash>, QueryRejection>) -> Html<String> {
    let flash = f.map(|Query(f)| f).unwrap_or_default();
    let mut b = String::from("<h2>Blocked clients</h2>");
    match s.service.blocks(500).await {
        Ok(list) => {
            b.push_str(
                "<table id=\"blocks\"><tr><th>client</th><th>reason</th><th>expires</th><th></th></tr>",
            );
            for e in &list.entries {
                let _ = write!(
                    b,
                    "<tr><td>{k}</td><td>{}</td><td>{}</td><td><form class=\"inline\" method=\"post\" action=\"/ui/blocks/remove\">\
                     <input type=\"hidden\" name=\"client\" value=\"{k}\"><button>Unblock</button></form></td></tr>",
                    esc(&e.reason),
                    fmt_time(e.expires),
                    k = esc(&e.key)
                );
            }
            b.push_str("</table>");
        }
        Err(e) => push_error(&mut b, e),
    }
    b.push_str("<h2>Failures and tarpit</h2>");
    match s.service.tarpit(500).await {
        Ok(list) => {
            b.push_str(
                "<table id=\"tarpit\"><tr><th>client</th><th>failures</th><th>tarpitted</th><th></th></tr>",
            );
            for e in &list.entries {
                let _ = write!(
                    b,
                    "<tr><td>{k}</td><td class=\"n\">{}</td><td>{}</td><td><form class=\"inline\" method=\"post\" action=\"/ui/tarpit/clear\">\
                     <input type=\"hidden\" name=\"client\" value=\"{k}\"><button>Clear</button></form></td></tr>",
                    e.failures,
                    if e.tarpitted { "yes" } else { "no" },
                    k = esc(&e.key)
                );
            }
            b.push_str("</table>");
        }
        Err(e) => push_error(&mut b, e),
    }
    page("Blocks", &flash, &b)
}

async fn ui_unblock(
    State(s): State<Web>,
    f: Result<Form<ClientParams>, FormRejection>,
) -> ApiResult<Redirect> {
    let p = form(f)?;
    let client = p.client()?.to_string();
    let result = s
        .service
        .unblock(&client)
        .await
        .map(|keys| format!("unblocked {}", keys.join(", ")));
    Ok(back("/ui/blocks", result))
}

async fn ui_tarpit_clear(
    State(s): State<Web>,
    f: Result<Form<ClientParams>, FormRejection>,
) -> ApiResult<Redirect> {
    let p = form(f)?;
    let client = p.client()?.to_string();
    let result = s
        .service
        .tarpit_clear(&client)
        .await
        .map(|_| format!("failures of {} cleared", client.trim()));
    Ok(back("/ui/blocks", result))
}

async fn events_page(State(s): State<Web>, q: Result<Query<EventParams>, QueryRejection>) -> Html<String> {
    let p = q.map(|Query(p)| p).unwrap_or_default();
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let kind = p.kind.as_deref().unwrap_or("transactions");
    let mut b = String::new();
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/ui/events\" id=\"search\"><select name=\"kind\">\
         <option value=\"transactions\"{}>transactions</option><option value=\"connections\"{}>connections</option></select> \
         <input name=\"since\" value=\"{}\" placeholder=\"since (1d, 2024-05-01)\" size=\"14\"> \
         <input name=\"client\" value=\"{}\" placeholder=\"client IP\" size=\"16\"> \
         <input name=\"sender\" value=\"{}\" placeholder=\"sender\" size=\"20\"> \
         <input name=\"recipient\" value=\"{}\" placeholder=\"recipient\" size=\"20\"> <select name=\"outcome\"><option value=\"\">any outcome</option>",
        if kind.starts_with('c') { "" } else { " selected" },
        if kind.starts_with('c') { " selected" } else { "" },
        v(&p.since),
        v(&p.client),
        v(&p.sender),
        v(&p.recipient),
    );
    for c in CATEGORIES {
        let sel = if p.outcome.as_deref() == Some(c.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, "<option{sel}>{}</option>", c.as_str());
    }
    b.push_str("</select> <button>Search</button></form>");
    let result = match p.search() {
        Ok(mut search) => {
            if search.limit == 0 {
                search.limit = 50;
            }
            s.service.events(&search).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(page_) => {
            if page_.kind == EventKind::Connections {
                b.push_str("<table id=\"events\"><tr><th>time</th><th>client</th><th>HELO</th><th>outcome</th><th>check</th><th>tx</th><th>last reply</th></tr>");
            } else {
                b.push_str("<table id=\"events\"><tr><th>time</th><th>client</th><th>sender</th><th>recipients</th><th>outcome</th><th>check</th><th>reply</th><th>subject</th></tr>");
            }
            for item in &page_.items {
                match item {
                    EventItem::Connection(c) => {
                        let _ = write!(
                            b,
                            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                            fmt_time(Some(c.connect_time)),
                            esc(&c.client_ip),
                            esc(c.helo.as_deref().unwrap_or("")),
                            c.outcome,
                            esc(c.check.as_deref().unwrap_or("")),
                            c.transactions,
                            esc(c.last_reply.as_deref().unwrap_or(""))
                        );
                    }
                    EventItem::Transaction(t) => {
                        let rcpts: Vec<&str> = t.recipients.iter().map(|r| r.address.as_str()).collect();
                        let _ = write!(
                            b,
                            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                            fmt_time(Some(t.time)),
                            esc(&t.client_ip),
                            esc(if t.sender.is_empty() { "<>" } else { &t.sender }),
                            esc(&rcpts.join(", ")),
                            t.outcome,
                            esc(t.check.as_deref().unwrap_or("")),
                            esc(t.reply.as_deref().unwrap_or("")),
                            esc(t.subject.as_deref().unwrap_or(""))
                        );
                    }
                }
            }
            b.push_str("</table>");
            if let Some(before) = page_.next_before {
                let mut link = format!("/ui/events?before={}", pct(&before.to_rfc3339()));
                for (k, val) in [
                    ("kind", &p.kind),
                    ("since", &p.since),
                    ("client", &p.client),
                    ("sender", &p.sender),
                    ("recipient", &p.recipient),
                    ("outcome", &p.outcome),
                ] {
                    if let Some(val) = val.as_deref().filter(|x| !x.is_empty()) {
                        let _ = write!(link, "&{k}={}", pct(val));
                    }
                }
                let _ = write!(b, "<p><a href=\"{}\" id=\"older\">Older →</a></p>", esc(&link));
            }
        }
        Err(e) => push_error(&mut b, e),
    }
    page("Events", &Flash::default(), &b)
}

async fn config_page(State(s): State<Web>, f: Result<Query<Flash>, QueryRejection>) -> Html<String> {
    let flash = f.map(|Query(f)| f).unwrap_or_default();
    config_html(&s, &flash, None)
}

fn config_html(s: &Web, flash: &Flash, candidate: Option<(&str, &service::CheckReport)>) -> Html<String> {
    let mut b = String::from(
        "<form method=\"post\" action=\"/ui/reload\" id=\"reload\"><button>Reload the configuration file</button> \
         (running sessions finish on the configuration they started with)</form>\
         <h2>Check a candidate configuration</h2>",
    );
    if let Some((_, report)) = candidate {
        if report.valid {
            b.push_str("<p class=\"msg\" id=\"check-result\">The candidate configuration is valid.</p>");
        } else {
            b.push_str(
                "<div class=\"err\" id=\"check-result\"><p>The candidate configuration is not valid:</p><ul>",
            );
            for e in &report.errors {
                let _ = write!(b, "<li>{}</li>", esc(e));
            }
            b.push_str("</ul></div>");
        }
    }
    let _ = write!(
        b,
        "<form method=\"post\" action=\"/ui/check\"><textarea name=\"config\" rows=\"10\" cols=\"100\">{}</textarea><br>\
         <button>Check</button></form><h2>Running configuration (secrets redacted)</h2>",
        esc(candidate.map_or("", |(t, _)| t))
    );
    match s.service.config_toml() {
        Ok(t) => {
            let _ = write!(b, "<pre id=\"config\">{}</pre>", esc(&t));
        }
        Err(e) => push_error(&mut b, e),
    }
    page("Configuration", flash, &b)
}

async fn ui_reload(State(s): State<Web>) -> Redirect {
    let report = s.service.reload().await;
    let result = if report.reloaded {
        let mut m = format!("reloaded from {}", report.source);
        if !report.warnings.is_empty() {
            let _ = write!(m, "; {}", report.warnings.join("; "));
        }
        Ok(m)
    } else {
        Err(ServiceError::BadRequest(format!(
            "reload refused, the running configuration stays: {}",
            report.errors.join("; ")
        )))
    };
    back("/ui/config", result)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CheckForm {
    config: String,
}

async fn ui_check(
    State(s): State<Web>,
    f: Result<Form<CheckForm>, FormRejection>,
) -> ApiResult<Html<String>> {
    let p = form(f)?;
    let report = s.service.check(&p.config).await;
    Ok(config_html(&s, &Flash::default(), Some((&p.config, &report))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(pct("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn authorization_headers() {
        assert!(matches!(
            parse_authorization(b"Bearer abc"),
            Some(Authorization::Bearer("abc"))
        ));
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("u:p:w")
        );
        match parse_authorization(basic.as_bytes()) {
            Some(Authorization::Basic(s)) => assert_eq!(s, "u:p:w"),
            _ => panic!("basic"),
        }
        assert!(parse_authorization(b"Basic !!!").is_none());
        assert!(parse_authorization(b"Digest x").is_none());
        assert!(parse_authorization(b"Bearer").is_none());
    }

    #[test]
    fn cross_site_requests() {
        let mut h = HeaderMap::new();
        assert!(!cross_site(&h));
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8025"));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8025"));
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(cross_site(&h));
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h));
    }
}
