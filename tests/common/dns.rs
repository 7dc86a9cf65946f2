//! An in-process authoritative DNS server for tests, on 127.0.0.1 (UDP and TCP on the same
//! ephemeral port), answering from a few records given per test, with faults on chosen
//! names: SERVFAIL, silence (the client times out), truncation over UDP. Written directly on
//! hickory-proto's `Message` so every answer and fault is plain to see; it stops when
//! dropped.
//!
//! ```ignore
//! let dns = TestDns::start(Records::new().a("mx.example", "192.0.2.1").servfail("bad.example")).await;
//! let resolver = dns.resolver();
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

use thassp::dns::{DnsConfig, Resolver};

/// What the server does for a name instead of answering from its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer SERVFAIL.
    ServFail,
    /// Answer REFUSED.
    Refused,
    /// Never answer (UDP or TCP): the client times out.
    Silent,
    /// Over UDP, answer with the TC bit and no records, so the client must retry over TCP;
    /// over TCP, answer normally.
    TruncateUdp,
}

/// The server's data: records and faults, built with chained calls. Names are
/// case-insensitive, with or without the trailing dot. A fault name `*.zone` covers every
/// name below `zone`.
#[derive(Debug, Clone, Default)]
pub struct Records {
    records: Vec<Record>,
    faults: Vec<(String, Fault)>,
}

/// Lower-case, absolute (`example.com.`).
fn key(name: &str) -> String {
    let mut k = name.trim().to_ascii_lowercase();
    if !k.ends_with('.') {
        k.push('.');
    }
    k
}

fn name(text: &str) -> Name {
    Name::from_ascii(key(text)).unwrap_or_else(|e| panic!("test DNS name {text:?}: {e}"))
}

impl Records {
    /// No records, no faults.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(mut self, owner: &str, data: RData) -> Self {
        self.records.push(Record::from_rdata(name(owner), 300, data));
        self
    }

    /// An A record.
    pub fn a(self, owner: &str, ip: &str) -> Self {
        self.push(owner, RData::A(A(ip.parse().expect("IPv4 address"))))
    }

    /// An AAAA record.
    pub fn aaaa(self, owner: &str, ip: &str) -> Self {
        self.push(owner, RData::AAAA(AAAA(ip.parse().expect("IPv6 address"))))
    }

    /// A PTR record for `ip` (the in-addr.arpa / ip6.arpa name is worked out here).
    pub fn ptr(self, ip: &str, target: &str) -> Self {
        let ip: IpAddr = ip.parse().expect("IP address");
        let owner = Name::from(ip).to_ascii();
        self.push(&owner, RData::PTR(PTR(name(target))))
    }

    /// One TXT record; text longer than 255 bytes is split into several strings.
    pub fn txt(self, owner: &str, text: &str) -> Self {
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(255).collect();
        self.push(owner, RData::TXT(TXT::from_bytes(chunks)))
    }

    /// An MX record; exchange `.` makes a null MX (RFC 7505).
    pub fn mx(self, owner: &str, preference: u16, exchange: &str) -> Self {
        self.push(owner, RData::MX(MX::new(preference, name(exchange))))
    }

    /// A CNAME; chains are followed by the server within its own data.
    pub fn cname(self, owner: &str, target: &str) -> Self {
        self.push(owner, RData::CNAME(CNAME(name(target))))
    }

    /// A fault instead of answers for `owner` (`*.zone`: every name below `zone`).
    pub fn fault(mut self, owner: &str, fault: Fault) -> Self {
        self.faults.push((key(owner), fault));
        self
    }

    /// SERVFAIL for `owner`.
    pub fn servfail(self, owner: &str) -> Self {
        self.fault(owner, Fault::ServFail)
    }

    /// No answer for `owner`: the client times out.
    pub fn silent(self, owner: &str) -> Self {
        self.fault(owner, Fault::Silent)
    }

    /// TC over UDP for `owner`, so the answer must be fetched over TCP.
    pub fn truncate_udp(self, owner: &str) -> Self {
        self.fault(owner, Fault::TruncateUdp)
    }

    fn fault_for(&self, qname: &str) -> Option<Fault> {
        self.faults.iter().find_map(|(n, f)| {
            let hit = match n.strip_prefix("*.") {
                Some(zone) => qname.ends_with(&format!(".{zone}")),
                None => n == qname,
            };
            hit.then_some(*f)
        })
    }

    /// The response to `request`, or `None` to stay silent.
    fn answer(&self, request: &Message, udp: bool) -> Option<Vec<u8>> {
        let query = request.queries.first()?.clone();
        let mut resp = Message::response(request.metadata.id, request.metadata.op_code);
        resp.metadata.authoritative = true;
        resp.metadata.recursion_desired = request.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.add_query(query.clone());
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            resp.set_edns(edns);
        }
        let qname = key(&query.name().to_ascii());
        match self.fault_for(&qname) {
            Some(Fault::Silent) => return None,
            Some(Fault::ServFail) => resp.metadata.response_code = ResponseCode::ServFail,
            Some(Fault::Refused) => resp.metadata.response_code = ResponseCode::Refused,
            Some(Fault::TruncateUdp) if udp => resp.metadata.truncation = true,
            Some(Fault::TruncateUdp) | None => self.resolve(&mut resp, qname, query.query_type()),
        }
        let bytes = resp.to_vec().ok()?;
        // A UDP answer larger than the client said it can take goes out truncated, empty.
        if udp && bytes.len() > usize::from(request.max_payload()) {
            return resp.truncate().to_vec().ok();
        }
        Some(bytes)
    }

    /// Fills the answer section, following CNAMEs inside the data (at most 8).
    fn resolve(&self, resp: &mut Message, mut qname: String, qtype: RecordType) {
        for _ in 0..8 {
            let at_name: Vec<&Record> = self
                .records
                .iter()
                .filter(|r| key(&r.name.to_ascii()) == qname)
                .collect();
            let wanted: Vec<Record> = at_name
                .iter()
                .filter(|r| r.record_type() == qtype)
                .map(|r| (*r).clone())
                .collect();
            if !wanted.is_empty() {
                resp.add_answers(wanted);
                return;
            }
            if let Some(cname) = at_name.iter().find(|r| r.record_type() == RecordType::CNAME) {
                resp.add_answer((*cname).clone());
                if let RData::CNAME(target) = &cname.data {
                    qname = key(&target.0.to_ascii());
                    continue;
                }
            }
            // Nothing here: NXDOMAIN unless the name exists (with other types, or as the
            // parent of other names), which is NODATA.
            let below = format!(".{qname}");
            let exists = !at_name.is_empty()
                || self
                    .records
                    .iter()
                    .any(|r| key(&r.name.to_ascii()).ends_with(&below));
            if !exists {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            return;
        }
    }
}

#[derive(Default)]
struct Log {
    queries: Mutex<Vec<(String, RecordType, bool)>>,
    tcp: AtomicUsize,
}

/// A running server; stops (all its tasks) when dropped.
pub struct TestDns {
    addr: SocketAddr,
    log: Arc<Log>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl TestDns {
    /// Binds TCP on an ephemeral port, then UDP on the same port (retrying with a new port
    /// when that one is taken for UDP), and serves `records`.
    pub async fn start(records: Records) -> Self {
        let (tcp, udp) = bind_pair().await;
        let addr = tcp.local_addr().expect("local address");
        let records = Arc::new(records);
        let log = Arc::new(Log::default());
        let tasks = vec![
            tokio::spawn(serve_udp(udp, records.clone(), log.clone())),
            tokio::spawn(serve_tcp(tcp, records, log.clone())),
        ];
        Self { addr, log, tasks }
    }

    /// Where the server listens, UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A resolver configuration for this server with short timeouts (300 ms per try, two
    /// tries so a busy test machine does not fail a normal lookup, 2 s per check), so
    /// timeout cases stay fast (about 600 ms).
    pub fn config(&self) -> DnsConfig {
        DnsConfig {
            servers: vec![self.addr],
            timeout: Duration::from_millis(300),
            attempts: 2,
            check_deadline: Duration::from_secs(2),
            cache_size: 1024,
        }
    }

    /// A fresh resolver (fresh cache) built from `config()`.
    pub fn resolver(&self) -> Arc<Resolver> {
        Arc::new(Resolver::new(&self.config()).expect("resolver"))
    }

    /// Every query received so far: lower-case name without the trailing dot, type, and
    /// whether it came over TCP.
    pub fn queries(&self) -> Vec<(String, RecordType, bool)> {
        self.log.queries.lock().unwrap().clone()
    }

    /// How many queries for `name` (any type, any transport) arrived.
    pub fn queried(&self, name: &str) -> usize {
        let k = key(name);
        let k = k.trim_end_matches('.');
        self.queries().iter().filter(|(n, _, _)| n == k).count()
    }

    /// Queries that came over TCP.
    pub fn tcp_queries(&self) -> usize {
        self.log.tcp.load(Ordering::SeqCst)
    }
}

async fn bind_pair() -> (TcpListener, UdpSocket) {
    for _ in 0..50 {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind TCP");
        let port = tcp.local_addr().expect("local address").port();
        if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)).await {
            return (tcp, udp);
        }
    }
    panic!("no port free for both TCP and UDP on 127.0.0.1");
}

fn record(log: &Log, request: &Message, tcp: bool) {
    if let Some(q) = request.queries.first() {
        let name = key(&q.name().to_ascii()).trim_end_matches('.').to_string();
        log.queries.lock().unwrap().push((name, q.query_type(), tcp));
    }
    if tcp {
        log.tcp.fetch_add(1, Ordering::SeqCst);
    }
}

fn parse_query(bytes: &[u8]) -> Option<Message> {
    Message::from_vec(bytes)
        .ok()
        .filter(|m| m.metadata.message_type == MessageType::Query)
}

async fn serve_udp(socket: UdpSocket, records: Arc<Records>, log: Arc<Log>) {
    let mut buf = vec![0u8; 4096];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let Some(request) = parse_query(&buf[..n]) else {
            continue;
        };
        record(&log, &request, false);
        if let Some(reply) = records.answer(&request, true) {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, records: Arc<Records>, log: Arc<Log>) {
    // Connections live in this set, so aborting this task ends them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { return };
                connections.spawn(serve_tcp_connection(stream, records.clone(), log.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// DNS over TCP: each message preceded by its length (two bytes); several per connection.
async fn serve_tcp_connection(mut stream: TcpStream, records: Arc<Records>, log: Arc<Log>) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut buf).await.is_err() {
            return;
        }
        let Some(request) = parse_query(&buf) else {
            return;
        };
        record(&log, &request, true);
        let Some(reply) = records.answer(&request, false) else {
            continue;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}
