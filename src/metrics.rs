//! Every metric name, description and label in one place, exported in the OpenMetrics text
//! format for `GET /metrics`.
//!
//! The values live where the work happens (the process counters in [`crate::app::Counters`],
//! the event log's live counters and writer statistics, the store's health, the DNSBL
//! zones); a collector reads them at scrape time, so the hot path never touches a metrics
//! object. The [`Registry`] is built once per [`Metrics`]; front ends add their own
//! counters to it before sharing it (the admin's authentication failures).
//!
//! Labels are low-cardinality only: outcome categories (a fixed vocabulary), backend
//! names, and configured names (upstreams, DNSBL zones), never client addresses.

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::app::{App, Counters};

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics registry of one application.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// The registry with the application's collector registered.
    pub fn new(app: Arc<App>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(AppCollector { app }));
        Self { registry }
    }

    /// For front ends registering their own metrics (before the registry is shared).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Everything, in the OpenMetrics text format (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a `fmt::Write` into a String can fail here, which it does not; keep the
            // output well-formed anyway.
            tracing::warn!(error = %e, "Encoding the metrics failed.");
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }
}

/// [`Metrics::new`] and [`Metrics::render`] at once (tools, tests). A server keeps one
/// [`Metrics`] instead.
pub fn render(app: &Arc<App>) -> String {
    Metrics::new(app.clone()).render()
}

/// Reads the application's state at scrape time.
struct AppCollector {
    app: Arc<App>,
}

impl std::fmt::Debug for AppCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppCollector").finish_non_exhaustive()
    }
}

/// Writes one unlabelled counter.
fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

/// Writes one unlabelled gauge.
fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for AppCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let app = &self.app;
        let snap = app.snapshot();
        let c = &snap.counters;

        {
            let mut m =
                enc.encode_descriptor("thassp_build", "Build information.", None, MetricType::Info)?;
            m.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        }
        gauge(
            &mut enc,
            "thassp_uptime_seconds",
            "Seconds since the process started.",
            clamp(app.started.elapsed().as_secs()),
        )?;

        {
            let mut m = enc.encode_descriptor(
                "thassp_replies",
                "Replies sent to clients, by class.",
                None,
                MetricType::Counter,
            )?;
            for (class, v) in [
                ("2xx", &c.replies_2xx),
                ("3xx", &c.replies_3xx),
                ("4xx", &c.replies_4xx),
                ("5xx", &c.replies_5xx),
            ] {
                let labels = vec![("class".to_string(), class.to_string())];
                ConstCounter::new(Counters::get(v)).encode(m.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut enc,
            "thassp_upstream_errors",
            "Upstream failures (connect, timeout, reset, garbage, 421) answered with a 4xx.",
            Counters::get(&c.upstream_errors),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "thassp_upstream_connections",
                "Upstream connections a session used: opened for it, or kept from an earlier session.",
                None,
                MetricType::Counter,
            )?;
            for (how, v) in [("new", &c.upstream_connects), ("reused", &c.upstream_reuses)] {
                let labels = vec![("how".to_string(), how.to_string())];
                ConstCounter::new(Counters::get(v)).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut enc,
            "thassp_upstream_idle_connections",
            "Upstream connections kept open for the next session.",
            clamp(snap.pool.len() as u64),
        )?;
        counter(
            &mut enc,
            "thassp_upstream_messages",
            "Messages relayed upstream (DATA to the final reply).",
            Counters::get(&c.upstream_messages),
        )?;
        {
            let secs = Counters::get(&c.upstream_micros) as f64 / 1e6;
            let m = enc.encode_descriptor(
                "thassp_upstream_relay_seconds",
                "Time spent relaying messages upstream (divide by thassp_upstream_messages for the mean).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(secs).encode(m)?;
        }

        // Per check: calls, refusals, errors and a latency histogram (label: the check's
        // name, a fixed set).
        let checks = c.checks.all();
        {
            let mut m = enc.encode_descriptor(
                "thassp_check_duration_seconds",
                "Time each check took per call.",
                None,
                MetricType::Histogram,
            )?;
            for (name, stat) in &checks {
                let mut cumulative = 0;
                let mut buckets: Vec<(f64, u64)> = crate::policy::LATENCY_BUCKETS
                    .iter()
                    .zip(&stat.buckets)
                    .map(|(le, n)| {
                        cumulative += n.load(std::sync::atomic::Ordering::Relaxed);
                        (*le, cumulative)
                    })
                    .collect();
                let count = Counters::get(&stat.calls);
                buckets.push((f64::INFINITY, count));
                let sum = Counters::get(&stat.nanos) as f64 / 1e9;
                let labels = vec![("check".to_string(), name.to_string())];
                m.encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &buckets, None,
                    )?;
            }
        }
        for (metric, help, pick) in [
            (
                "thassp_check_refusals",
                "Refusals (reject or tempfail) by check.",
                0,
            ),
            (
                "thassp_check_errors",
                "Calls that could not decide (on_error applied) by check.",
                1,
            ),
            (
                "thassp_check_monitored",
                "Would-be refusals in monitor mode by check.",
                2,
            ),
        ] {
            let mut m = enc.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for (name, stat) in &checks {
                let v = match pick {
                    0 => Counters::get(&stat.refusals),
                    1 => Counters::get(&stat.errors),
                    _ => Counters::get(&stat.monitored),
                };
                let labels = vec![("check".to_string(), name.to_string())];
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }

        // Counter names lose their `_total` here: the OpenMetrics encoder appends it.
        counter(
            &mut enc,
            "thassp_sessions",
            "Client connections accepted (all listeners).",
            Counters::get(&c.sessions),
        )?;
        let live = snap.live.list(usize::MAX);
        gauge(
            &mut enc,
            "thassp_connections_current",
            "Client sessions in progress.",
            clamp(live.len() as u64),
        )?;
        gauge(
            &mut enc,
            "thassp_tarpitted_sessions",
            "Sessions in progress whose replies are delayed (tarpit).",
            clamp(live.iter().filter(|s| s.tarpitted).count() as u64),
        )?;
        counter(
            &mut enc,
            "thassp_tls_handshake_failures",
            "Failed TLS handshakes with clients (STARTTLS and implicit TLS).",
            Counters::get(&c.tls_handshake_failures),
        )?;
        counter(
            &mut enc,
            "thassp_smtp_auth_failures",
            "Failed SMTP AUTH attempts (the upstream refused the credentials).",
            Counters::get(&c.auth_failures),
        )?;
        counter(
            &mut enc,
            "thassp_proxy_protocol_refused",
            "Connections refused for a missing, invalid or untrusted PROXY header.",
            Counters::get(&c.proxy_protocol_refused),
        )?;

        {
            let mut m = enc.encode_descriptor(
                "thassp_outcomes",
                "Attempts by outcome category since start (each attempt in exactly one).",
                None,
                MetricType::Counter,
            )?;
            for (category, n) in app.events().since_start() {
                let labels = [("category", category.as_str())];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }

        let ev = app.events().status();
        gauge(
            &mut enc,
            "thassp_event_log_enabled",
            "1 when the event log writes to a database.",
            i64::from(ev.enabled),
        )?;
        gauge(
            &mut enc,
            "thassp_event_log_connected",
            "1 while the event log writer has a working database connection.",
            i64::from(ev.connected),
        )?;
        gauge(
            &mut enc,
            "thassp_event_log_queued",
            "Event rows waiting to be written.",
            clamp(ev.queued as u64),
        )?;
        counter(
            &mut enc,
            "thassp_event_log_dropped",
            "Event rows lost (queue full, refused by the database, left at shutdown).",
            ev.dropped,
        )?;
        counter(
            &mut enc,
            "thassp_event_log_written",
            "Event rows committed to the database.",
            ev.written,
        )?;
        counter(
            &mut enc,
            "thassp_event_log_errors",
            "Failed connects, writes and prune steps of the event log writer.",
            ev.write_errors,
        )?;
        counter(
            &mut enc,
            "thassp_event_log_pruned",
            "Event rows deleted by retention.",
            ev.pruned,
        )?;

        let store = app.store().health();
        {
            let mut m = enc.encode_descriptor(
                "thassp_store_degraded",
                "1 while the state store serves from its local fallback (shared backend away).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(store.degraded))
                .encode(m.encode_family(&[("backend", store.backend)])?)?;
        }
        {
            let mut m = enc.encode_descriptor(
                "thassp_store_errors",
                "State store operations that failed on the backend.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(store.errors).encode(m.encode_family(&[("backend", store.backend)])?)?;
        }

        if let Some(dnsbl) = &snap.dnsbl {
            let zones = dnsbl.zone_status();
            let mut m = enc.encode_descriptor(
                "thassp_dnsbl_zone_enabled",
                "1 when the DNSBL zone passed its last RFC 5782 self-test and is used.",
                None,
                MetricType::Gauge,
            )?;
            for z in &zones {
                ConstGauge::new(i64::from(z.enabled))
                    .encode(m.encode_family(&[("zone", z.zone.as_str())])?)?;
            }
        }

        {
            let mut m = enc.encode_descriptor(
                "thassp_upstream_up",
                "1 when the upstream's last capability probe succeeded.",
                None,
                MetricType::Gauge,
            )?;
            for u in &snap.routes.upstreams {
                let h = u.health();
                let up = h.last_probe.is_some() && h.last_error.is_none();
                ConstGauge::new(i64::from(up)).encode(m.encode_family(&[("upstream", u.name.as_str())])?)?;
            }
        }
        Ok(())
    }
}
