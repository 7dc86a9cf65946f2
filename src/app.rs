//! Configuration turned into run-time state: the `Snapshot` (config, routes, pipeline) that
//! each session loads once, the swap on reload, and the shutdown phase every session watches.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::dns::Resolver;
use crate::events::{EventLog, WriterHandle};
use crate::policy::attachments::AttachmentsCheck;
use crate::policy::content::ContentCheck;
use crate::policy::dkim::DkimCheck;
use crate::policy::dnsbl::DnsblCheck;
use crate::policy::greylist::GreylistCheck;
use crate::policy::helo::HeloCheck;
use crate::policy::lists::ListsCheck;
use crate::policy::ptr::PtrCheck;
use crate::policy::relay_control::RelayControl;
use crate::policy::reputation::{BlockCheck, Reputation};
use crate::policy::spf::SpfCheck;
use crate::policy::traps::TrapsCheck;
use crate::policy::{Check, Pipeline};
use crate::service::AdminLists;
use crate::store::{Clock, Store, SystemClock};
use crate::upstream::Routes;

/// Where the process is in its life; sessions watch it to finish cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop accepting; idle sessions close with `421 4.3.2`, transactions may finish.
    Draining,
    /// The grace period is over: every session closes with `421 4.3.2` now.
    Deadline,
}

/// Process-wide event counters, kept across reloads (the metrics endpoint will export them).
#[derive(Debug, Default)]
pub struct Counters {
    pub sessions: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub auth_failures: AtomicU64,
    pub proxy_protocol_refused: AtomicU64,
    /// Calls, refusals, errors and latency of each check.
    pub checks: crate::policy::CheckStats,
    /// Replies sent to clients by class.
    pub replies_2xx: AtomicU64,
    pub replies_3xx: AtomicU64,
    pub replies_4xx: AtomicU64,
    pub replies_5xx: AtomicU64,
    /// Upstream failures (connect, timeout, reset, garbage, 421) that gave a client a 4xx.
    pub upstream_errors: AtomicU64,
    /// Messages relayed upstream and the time spent doing it (DATA to final reply).
    pub upstream_messages: AtomicU64,
    pub upstream_micros: AtomicU64,
    /// Upstream connections opened, and kept ones a later session used instead.
    pub upstream_connects: AtomicU64,
    pub upstream_reuses: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Everything a session needs, immutable; a reload builds a new one.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    /// `server.hostname`, or the system's name (read once per snapshot, not per session).
    pub hostname: String,
    pub routes: Arc<Routes>,
    pub pipeline: Pipeline,
    /// TLS server configuration per `listener.address`, for listeners with TLS.
    pub listener_tls: HashMap<String, Arc<rustls::ServerConfig>>,
    pub counters: Arc<Counters>,
    /// Per-client connection accounting, kept across reloads.
    pub limiter: Arc<crate::limits::ConnectionLimiter>,
    /// Sessions in progress, kept across reloads.
    pub live: Arc<crate::live::LiveSessions>,
    /// Idle upstream connections, kept across reloads.
    pub pool: Arc<crate::smtp::pool::Pool>,
    /// The DNSBL check, for its periodic RFC 5782 self-test.
    pub dnsbl: Option<Arc<DnsblCheck>>,
    /// Failure counting, tarpit and autoblacklist, when enabled.
    pub reputation: Option<Arc<crate::policy::reputation::Reputation>>,
    pub events: EventLog,
}

/// The configured checks in pipeline order. Checks without I/O decide first anyway (see
/// `Pipeline::run`); among the DNS ones the order is the order their verdicts are taken.
type BuiltChecks = (Vec<Arc<dyn Check>>, Option<Arc<DnsblCheck>>);

fn build_checks(
    config: &Config,
    routes: &Arc<Routes>,
    previous: Option<&Snapshot>,
    shared: &Shared,
    reputation: &Arc<Reputation>,
    admin_lists: &AdminLists,
) -> Result<BuiltChecks, Vec<String>> {
    let mut errors = Vec::new();
    // Blocks (autoblacklist, traps) come first among the I/O checks: a blocked client costs
    // one store lookup and no DNS.
    let mut checks: Vec<Arc<dyn Check>> = vec![
        Arc::new(RelayControl::new(routes.clone())),
        Arc::new(BlockCheck::new(reputation.clone())),
    ];
    let c = &config.checks;
    let needs_dns = (c.helo.enabled && c.helo.unresolvable.is_some())
        || c.ptr.enabled
        || !c.dnsbl.zones.is_empty()
        || c.spf.enabled
        || c.dkim.enabled;
    let resolver = if needs_dns {
        match Resolver::new(&config.dns) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                errors.push(format!("dns: {e}"));
                None
            }
        }
    } else {
        None
    };
    let mut add = |r: Result<Arc<dyn Check>, Vec<String>>| match r {
        Ok(check) => checks.push(check),
        Err(e) => errors.extend(e),
    };
    if !c.lists.whitelist.is_empty()
        || !c.lists.blacklist.is_empty()
        || !admin_lists.white.is_empty()
        || !admin_lists.black.is_empty()
    {
        // Entries added through the admin API live in the store; one that no longer parses
        // (an older version wrote it) is skipped with a warning rather than block reloads.
        let valid = |entries: &[String]| -> Vec<String> {
            entries
                .iter()
                .filter(|e| match crate::policy::lists::parse_entry(e) {
                    Ok(_) => true,
                    Err(err) => {
                        tracing::warn!(entry = %e, error = %err, "Admin list entry ignored.");
                        false
                    }
                })
                .cloned()
                .collect()
        };
        let (white, black) = (valid(&admin_lists.white), valid(&admin_lists.black));
        add(ListsCheck::with_extra(&c.lists, &white, &black).map(|l| Arc::new(l) as Arc<dyn Check>));
    }
    if c.helo.enabled {
        let mut names = vec![config.hostname()];
        names.extend(config.listeners.iter().filter_map(|l| l.hostname.clone()));
        let ips = config
            .listeners
            .iter()
            .filter_map(|l| l.address.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        add(HeloCheck::build(&c.helo, names, ips, resolver.clone()).map(|h| Arc::new(h) as Arc<dyn Check>));
    }
    if !c.content.is_empty() {
        add(ContentCheck::build(&c.content).map(|x| Arc::new(x) as Arc<dyn Check>));
    }
    if c.attachments.enabled {
        add(AttachmentsCheck::build(&c.attachments).map(|x| Arc::new(x) as Arc<dyn Check>));
    }
    let mut dnsbl = None;
    if let Some(resolver) = &resolver {
        if c.ptr.enabled {
            add(PtrCheck::build(&c.ptr, resolver.clone()).map(|p| Arc::new(p) as Arc<dyn Check>));
        }
        if c.spf.enabled {
            add(SpfCheck::build(&c.spf, resolver.clone()).map(|s| Arc::new(s) as Arc<dyn Check>));
        }
        if c.dkim.enabled {
            add(DkimCheck::build(&c.dkim, resolver.clone()).map(|d| Arc::new(d) as Arc<dyn Check>));
        }
        if !c.dnsbl.zones.is_empty() {
            match DnsblCheck::build(&c.dnsbl, resolver.clone()) {
                Ok(d) => {
                    let d = Arc::new(d);
                    if let Some(old) = previous.and_then(|p| p.dnsbl.as_ref()) {
                        d.adopt_status(old);
                    }
                    dnsbl = Some(d.clone());
                    add(Ok(d as Arc<dyn Check>));
                }
                Err(e) => errors.extend(e),
            }
        }
    }
    if !c.traps.is_empty() {
        match TrapsCheck::build(&c.traps, reputation.clone()) {
            Ok(t) => checks.push(Arc::new(t)),
            Err(e) => errors.extend(e),
        }
    }
    if c.greylist.enabled {
        checks.push(Arc::new(GreylistCheck::new(
            c.greylist.clone(),
            shared.store.clone(),
            shared.clock.clone(),
        )));
    }
    if errors.is_empty() {
        Ok((checks, dnsbl))
    } else {
        Err(errors)
    }
}

impl Snapshot {
    /// Builds the run-time state from a validated configuration, reading certificate and
    /// CA files. Upstreams unchanged since `previous` keep their probed capabilities.
    ///
    /// # Errors
    /// Every file that cannot be loaded, with its configuration key.
    pub fn build(
        config: Config,
        previous: Option<&Self>,
        extra_checks: &[Arc<dyn Check>],
        shared: &Shared,
        admin_lists: &AdminLists,
    ) -> Result<Self, ConfigError> {
        let mut errors = Vec::new();
        let mut listener_tls = HashMap::new();
        for (i, l) in config.listeners.iter().enumerate() {
            if let (Some(cert), Some(key)) = (&l.tls_cert, &l.tls_key) {
                match crate::tls::server_config(cert, key) {
                    Ok(c) => {
                        listener_tls.insert(l.address.clone(), c);
                    }
                    Err(e) => errors.push(format!("listener[{i}].tls_cert: {e}")),
                }
            }
        }
        let routes = match Routes::build(&config, previous.map(|p| p.routes.as_ref())) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                errors.extend(e);
                None
            }
        };
        let Some(routes) = routes.filter(|_| errors.is_empty()) else {
            return Err(ConfigError {
                source_name: "configuration".into(),
                errors,
            });
        };
        let reputation = Arc::new(Reputation::new(
            config.checks.reputation.clone(),
            shared.store.clone(),
            shared.clock.clone(),
        ));
        let built = build_checks(&config, &routes, previous, shared, &reputation, admin_lists);
        let (mut checks, dnsbl) = match built {
            Ok(b) => b,
            Err(e) => {
                return Err(ConfigError {
                    source_name: "configuration".into(),
                    errors: e,
                });
            }
        };
        checks.extend(extra_checks.iter().cloned());
        let counters: Arc<Counters> = previous.map(|p| p.counters.clone()).unwrap_or_default();
        let pipeline = Pipeline::new(checks, config.policy.on_error)
            .with_score_limit(Some(config.policy.score_limit).filter(|l| *l > 0.0))
            .with_stats(&counters.checks);
        Ok(Self {
            hostname: config.hostname(),
            config: Arc::new(config),
            routes,
            pipeline,
            listener_tls,
            counters,
            limiter: previous.map(|p| p.limiter.clone()).unwrap_or_default(),
            live: previous.map(|p| p.live.clone()).unwrap_or_default(),
            pool: previous.map(|p| p.pool.clone()).unwrap_or_default(),
            dnsbl,
            reputation: Some(reputation),
            events: shared.events.clone(),
        })
    }
}

/// The long-lived parts a snapshot is built with: they survive reloads.
#[derive(Debug, Clone)]
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// The event log; its database is chosen at start-up.
    pub events: EventLog,
}

/// The running application: the current snapshot and the shutdown signal.
pub struct App {
    snapshot: ArcSwap<Snapshot>,
    phase: watch::Sender<Phase>,
    /// Checks added by the embedder (tests, extensions), kept across reloads.
    extra_checks: Vec<Arc<dyn Check>>,
    shared: Shared,
    /// The event log's writer task, drained at shutdown.
    writer: std::sync::Mutex<Option<WriterHandle>>,
    /// White/black list entries added through the admin API (kept in the store, so a
    /// cluster shares them), as last read.
    admin_lists: ArcSwap<AdminLists>,
    reload_lock: std::sync::Mutex<()>,
    pub started: Instant,
}

impl App {
    /// Builds the application from a validated configuration, opening the state store.
    ///
    /// # Errors
    /// When the store cannot be opened or a file the configuration names (certificates,
    /// list files) cannot be loaded.
    pub async fn new(config: Config) -> Result<Arc<Self>, ConfigError> {
        Self::with_checks(config, Vec::new()).await
    }

    /// Like `new`, with additional checks run after the built-in ones.
    ///
    /// # Errors
    /// As [`App::new`].
    pub async fn with_checks(
        config: Config,
        extra_checks: Vec<Arc<dyn Check>>,
    ) -> Result<Arc<Self>, ConfigError> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let fail = |e: String| ConfigError {
            source_name: "configuration".into(),
            errors: vec![e],
        };
        let store = crate::store::open(&config.store, clock.clone())
            .await
            .map_err(fail)?;
        let (events, writer) = if config.events.url.is_empty() {
            (EventLog::disabled(), None)
        } else {
            let (log, writer) =
                EventLog::start(&config.events).map_err(|e| fail(format!("events.url: {e}")))?;
            (log, Some(writer))
        };
        let app = Self::with_parts(config, extra_checks, Shared { store, clock, events })?;
        app.refresh_admin_lists().await;
        if let Ok(mut w) = app.writer.lock() {
            *w = writer;
        }
        Ok(app)
    }

    /// Builds the application on a given store and clock (tests move a manual clock).
    ///
    /// # Errors
    /// As [`App::new`].
    pub fn with_parts(
        config: Config,
        extra_checks: Vec<Arc<dyn Check>>,
        shared: Shared,
    ) -> Result<Arc<Self>, ConfigError> {
        crate::tls::install_default_provider();
        let snapshot = Snapshot::build(config, None, &extra_checks, &shared, &AdminLists::default())?;
        Ok(Arc::new(Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            phase: watch::Sender::new(Phase::Running),
            extra_checks,
            shared,
            admin_lists: ArcSwap::from_pointee(AdminLists::default()),
            reload_lock: std::sync::Mutex::new(()),
            writer: std::sync::Mutex::new(None),
            started: Instant::now(),
        }))
    }

    /// What `thassp check-config` does: everything a start does (files read, checks
    /// built) except opening the state store, so no state file is created.
    ///
    /// # Errors
    /// As [`App::new`].
    pub fn check(config: Config) -> Result<(), ConfigError> {
        crate::tls::install_default_provider();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store: Arc<dyn Store> = Arc::new(crate::store::memory::MemoryStore::new(clock.clone(), 1024));
        Snapshot::build(
            config,
            None,
            &[],
            &Shared {
                store,
                clock,
                events: EventLog::disabled(),
            },
            &AdminLists::default(),
        )
        .map(|_| ())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    pub fn events(&self) -> &EventLog {
        &self.shared.events
    }

    /// Re-reads the admin-managed list entries from the store and rebuilds the checks when
    /// they changed (called after an admin change and periodically, so every node of a
    /// cluster follows).
    pub async fn refresh_admin_lists(&self) {
        let lists = match crate::service::admin_list_entries(self.shared.store.as_ref()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "Admin lists not refreshed.");
                return;
            }
        };
        if *self.admin_lists.load_full() == lists {
            return;
        }
        self.admin_lists.store(Arc::new(lists));
        let config = (*self.snapshot().config).clone();
        if let Err(e) = self.reload(config) {
            tracing::error!("Admin list change not applied: {e}");
        }
    }

    /// Writes what the event log still holds, within `deadline` (after the sessions ended).
    pub async fn close_events(&self, deadline: std::time::Duration) {
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let lost = writer.shutdown(deadline).await;
            if lost > 0 {
                tracing::warn!(rows = lost, "Event log rows not written before shutdown.");
            }
        }
    }

    /// The current snapshot; a session keeps the one it started with.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Swaps in a new configuration for new sessions (certificates are re-read). Listener
    /// addresses and the development upstream are not reloadable: changes to them are
    /// reported and take effect after a restart. Returns those warnings.
    ///
    /// # Errors
    /// When a file cannot be loaded; the running configuration then stays.
    pub fn reload(&self, config: Config) -> Result<Vec<String>, ConfigError> {
        // One reload at a time: a SIGHUP, an API reload and an admin-list refresh must not
        // interleave and put an older configuration back.
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.snapshot();
        let mut warnings = Vec::new();
        if old.config.listeners != config.listeners {
            warnings.push("listener: address changes take effect after a restart".to_string());
        }
        if old.config.devsink != config.devsink {
            warnings.push("devsink: changes take effect after a restart".to_string());
        }
        if old.config.admin != config.admin {
            warnings.push("admin: changes take effect after a restart".to_string());
        }
        if old.config.events != config.events {
            warnings.push("events: database changes take effect after a restart".to_string());
        }
        if old.config.store != config.store {
            warnings.push("store: backend changes take effect after a restart".to_string());
        }
        let lists = self.admin_lists.load_full();
        let new = Snapshot::build(config, Some(&old), &self.extra_checks, &self.shared, &lists)?;
        self.snapshot.store(Arc::new(new));
        Ok(warnings)
    }

    /// Reads, validates and applies a configuration file; on any error the running
    /// configuration stays and the error says why.
    pub fn reload_from(&self, path: &std::path::Path) -> Result<Vec<String>, ConfigError> {
        let config = Config::load(path)?;
        self.reload(config)
    }

    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }
}
