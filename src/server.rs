//! Listeners and connection tasks: bind every configured address, accept with a global
//! connection cap, run one task per connection, probe the upstreams, and drain on shutdown
//! (stop accepting, let sessions finish up to the grace period, then `421 4.3.2`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::app::{App, Counters, Phase};
use crate::config::{ListenerConfig, ListenerTls};
use crate::policy::SessionInfo;
use crate::proxy_protocol;
use crate::smtp::relay;
use crate::smtp::session::{ListenerPolicy, Session};
use crate::stream::Prefixed;

/// How long sessions still running after the grace period get to write their `421`.
const HARD_STOP_AFTER_DEADLINE: Duration = Duration::from_secs(5);

/// A started server: its bound addresses and the handles to stop it.
pub struct Running {
    /// The SMTP listeners' addresses, in configuration order (real ports when 0 was given).
    pub smtp_addrs: Vec<SocketAddr>,
    /// The development upstream's address when it is enabled.
    pub devsink_addr: Option<SocketAddr>,
    app: Arc<App>,
    tracker: TaskTracker,
    /// Stops the accept loops and the prober.
    stop_accepting: CancellationToken,
    /// Ends every session task at once (after the deadline).
    kill: CancellationToken,
    /// The development upstream outlives the sessions that relay to it.
    devsink: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

/// Binds the listeners (and the development upstream), probes the upstreams once (bounded)
/// and starts accepting.
///
/// # Errors
/// When an address cannot be bound; the message names the config key.
pub async fn start(app: Arc<App>) -> anyhow::Result<Running> {
    let snap = app.snapshot();
    let config = snap.config.clone();
    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    let kill = CancellationToken::new();

    let mut devsink = None;
    let devsink_addr = if config.devsink.enabled {
        let listener = TcpListener::bind(&config.devsink.address)
            .await
            .with_context(|| format!("devsink.address: cannot listen on {}", config.devsink.address))?;
        let addr = listener.local_addr()?;
        let sink = crate::devsink::Devsink::new(config.devsink.directory.clone(), config.hostname());
        let stop = CancellationToken::new();
        devsink = Some((stop.clone(), tokio::spawn(sink.serve(listener, stop))));
        info!(address = %addr, directory = %config.devsink.directory.display(), "Development upstream listening (for trying out only).");
        Some(addr)
    } else {
        None
    };

    let mut listeners = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let listener = bind(&l.address)
            .with_context(|| format!("listener[{i}].address: cannot listen on {}", l.address))?;
        listeners.push((listener, l.address.clone()));
    }

    // A bounded first probe, so the first EHLO already reflects the upstreams' extensions.
    let first = futures_util::future::join_all(snap.routes.upstreams.iter().map(probe_one));
    let self_test = async {
        if let Some(d) = &snap.dnsbl {
            d.self_test().await;
        }
    };
    // DNSBL zones are used only after their RFC 5782 self-test passed.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join(first, self_test),
    )
    .await;
    tracker.spawn(probe_loop(app.clone(), stop_accepting.clone()));

    let connections = Arc::new(Semaphore::new(config.server.max_connections));
    let mut smtp_addrs = Vec::new();
    for (listener, configured) in listeners {
        let addr = listener.local_addr()?;
        smtp_addrs.push(addr);
        info!(address = %addr, "Listening for SMTP.");
        let acceptor = Acceptor {
            listener,
            configured,
            app: app.clone(),
            connections: connections.clone(),
            tracker: tracker.clone(),
            kill: kill.clone(),
        };
        tracker.spawn(acceptor.run(stop_accepting.clone()));
    }
    Ok(Running {
        smtp_addrs,
        devsink_addr,
        app,
        tracker,
        stop_accepting,
        kill,
        devsink,
    })
}

impl Running {
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Graceful shutdown: stop accepting, let sessions finish within the configured grace,
    /// then tell the rest `421 4.3.2` and end them. Returns once every task has ended.
    pub async fn shutdown(self) {
        let grace = self.app.snapshot().config.server.shutdown_grace;
        self.stop_accepting.cancel();
        self.app.set_phase(Phase::Draining);
        // Sessions that end from now on close their upstream connections themselves.
        crate::smtp::pool::quit_all(self.app.snapshot().pool.close()).await;
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            warn!(
                sessions = self.tracker.len(),
                "Shutdown grace period over; closing the remaining sessions with 421."
            );
            self.app.set_phase(Phase::Deadline);
            if tokio::time::timeout(HARD_STOP_AFTER_DEADLINE, self.tracker.wait())
                .await
                .is_err()
            {
                self.kill.cancel();
                self.tracker.wait().await;
            }
        }
        self.app.close_events(Duration::from_secs(5)).await;
        if let Some((stop, handle)) = self.devsink {
            stop.cancel();
            let _ = handle.await;
        }
        info!("All sessions ended.");
    }
}

struct Acceptor {
    listener: TcpListener,
    /// The `listener.address` this socket was bound for; its settings are looked up in the
    /// current snapshot at each accept, so a reload applies to new sessions.
    configured: String,
    app: Arc<App>,
    connections: Arc<Semaphore>,
    tracker: TaskTracker,
    kill: CancellationToken,
}

impl Acceptor {
    async fn run(self, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                () = stop.cancelled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "Accept failed; retrying shortly.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let snap = self.app.snapshot();
            let index = snap
                .config
                .listeners
                .iter()
                .position(|l| l.address == self.configured);
            let listener = index.and_then(|i| snap.config.listeners.get(i));
            let hostname = listener
                .and_then(|l| l.hostname.clone())
                .unwrap_or_else(|| snap.hostname.clone());
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                self.tracker.spawn(refuse_busy(stream, hostname));
                continue;
            };
            let policy = ListenerPolicy {
                tls: snap.listener_tls.get(&self.configured).cloned(),
                implicit_tls: listener.is_some_and(|l| l.tls_mode() == ListenerTls::Implicit),
                require_tls: listener.is_some_and(|l| l.require_tls),
                auth: listener.map(|l| l.auth).unwrap_or_default(),
            };
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let local = stream.local_addr().unwrap_or(peer);
            let id = session_id();
            let span = info_span!("session", id = %id, client = %peer);
            let phase = self.app.phase();
            let kill = self.kill.clone();
            // One allocation per connection, sized to the session: boxed, the connection's
            // future is not laid out twice by select!, and the task stays small. It captures
            // as little as possible: captured values stay in it for the whole session.
            let connection = Box::pin(async move {
                Counters::bump(&snap.counters.sessions);
                let info = SessionInfo {
                    id,
                    peer,
                    local,
                    hostname,
                    helo: None,
                    esmtp: false,
                    authenticated: None,
                    tls: None,
                    proxied_by: None,
                    health_check: false,
                };
                let listener = index.and_then(|i| snap.config.listeners.get(i));
                let Some((stream, info)) = accept_proxy(stream, info, listener, &snap.counters).await else {
                    return;
                };
                Session::new(stream, snap, info, policy, phase).run().await;
            });
            self.tracker.spawn(
                async move {
                    let _permit = permit;
                    tokio::select! {
                        () = connection => {}
                        () = kill.cancelled() => {}
                    }
                }
                .instrument(span),
            );
        }
    }
}

/// On a PROXY protocol listener, reads the header (bounded in size and time) from a trusted
/// balancer and takes the real client's address from it. `None`: the connection is closed.
async fn accept_proxy(
    mut stream: TcpStream,
    mut info: SessionInfo,
    listener: Option<&ListenerConfig>,
    counters: &Counters,
) -> Option<(Prefixed<TcpStream>, SessionInfo)> {
    let Some(l) = listener.filter(|l| l.proxy_protocol) else {
        return Some((Prefixed::new(Bytes::new(), stream), info));
    };
    let balancer = info.peer;
    if !l.proxy_trusted.iter().any(|net| net.contains(&balancer.ip())) {
        Counters::bump(&counters.proxy_protocol_refused);
        warn!(peer = %balancer, listener = %l.address, "PROXY protocol listener: connection from a source not in proxy_trusted; closed.");
        return None;
    }
    let deadline = tokio::time::Instant::now() + l.proxy_timeout;
    let mut buf = Vec::with_capacity(256);
    let (header, consumed) = loop {
        match proxy_protocol::parse(&buf) {
            Ok(Some(done)) => break done,
            Ok(None) => {}
            Err(e) => {
                Counters::bump(&counters.proxy_protocol_refused);
                warn!(peer = %balancer, error = %e, "Bad PROXY protocol header; connection closed.");
                return None;
            }
        }
        let mut chunk = [0u8; 1024];
        let room = proxy_protocol::MAX_HEADER
            .saturating_sub(buf.len())
            .clamp(1, chunk.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..room])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                warn!(peer = %balancer, "No PROXY protocol header in time; connection closed.");
                return None;
            }
        }
    };
    match header {
        proxy_protocol::Header::Proxy { source, destination } => {
            info.peer = SocketAddr::new(source.ip().to_canonical(), source.port());
            info.local = destination;
            info.proxied_by = Some(balancer);
        }
        proxy_protocol::Header::Local => info.health_check = true,
    }
    let rest = Bytes::copy_from_slice(buf.get(consumed..).unwrap_or_default());
    Some((Prefixed::new(rest, stream), info))
}

/// Binds a listening socket. IPv6 sockets are IPv6-only, so `0.0.0.0:25` and `[::]:25` can
/// both be listeners (Linux would otherwise give `[::]` the IPv4 addresses too, and the
/// second bind fails with "address in use").
fn bind(address: &str) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr: SocketAddr = address
        .parse()
        .with_context(|| format!("{address:?} is not ip:port"))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into())?)
}

async fn refuse_busy(mut stream: TcpStream, hostname: String) {
    let reply = format!("421 4.7.0 {hostname} Too many connections, try again later\r\n");
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(reply.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Unique, sortable session ids: seconds since the epoch at start-up, then a counter.
fn session_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    format!("{base:X}{:06X}", NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn probe_one(up: &Arc<crate::upstream::Upstream>) {
    match relay::probe(up).await {
        Ok(_) => up.record_probe(None),
        Err(e) => {
            warn!(upstream = %up.name, error = %e, "Upstream probe failed.");
            up.record_probe(Some(e.to_string()));
        }
    }
}

/// Re-probes each upstream of the current snapshot when its interval has passed, closes
/// expired idle upstream connections, and runs
/// the DNSBL self-test periodically and after a reload.
async fn probe_loop(app: Arc<App>, stop: CancellationToken) {
    let mut tested: Option<(Arc<crate::policy::dnsbl::DnsblCheck>, tokio::time::Instant)> = app
        .snapshot()
        .dnsbl
        .clone()
        .map(|d| (d, tokio::time::Instant::now()));
    let mut last_lists = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
        let snap = app.snapshot();
        let due = snap.routes.upstreams.iter().filter(|u| {
            u.health()
                .last_probe
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age >= u.probe_interval)
        });
        let probes = futures_util::future::join_all(due.map(probe_one));
        // Kept upstream connections that waited too long are closed with QUIT, not left
        // for the MTA to time out.
        let expired = crate::smtp::pool::quit_all(snap.pool.sweep(&snap.routes.upstreams));
        let probes = futures_util::future::join(probes, expired);
        let dnsbl = snap.dnsbl.clone().filter(|d| match &tested {
            Some((t, at)) => !Arc::ptr_eq(t, d) || at.elapsed() >= d.self_test_interval(),
            None => true,
        });
        let self_test = async {
            if let Some(d) = &dnsbl {
                d.self_test().await;
            }
        };
        tokio::select! {
            _ = futures_util::future::join(probes, self_test) => {}
            () = stop.cancelled() => return,
        }
        if let Some(d) = dnsbl {
            tested = Some((d, tokio::time::Instant::now()));
        }
        // Admin list changes made on other nodes of a cluster.
        if last_lists.elapsed() >= Duration::from_secs(15) {
            app.refresh_admin_lists().await;
            last_lists = tokio::time::Instant::now();
        }
    }
}
