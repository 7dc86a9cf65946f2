//! thassp in front of a real Postfix, as a mail administrator runs it: a throw-away Postfix
//! instance owned by the test (its own `config_directory`, `queue_directory`, maildirs and log
//! under a temporary folder, smtpd on a free loopback port), with thassp in-process in front
//! of it. Checked against what Postfix itself wrote:
//!
//! - a clean message lands in the maildir byte for byte, apart from the headers thassp and
//!   Postfix add;
//! - an unknown recipient gets Postfix's own `550 5.1.1` through thassp;
//! - Postfix's log names the real client (a public-looking address given to thassp by PROXY
//!   protocol v2), received via XCLIENT;
//! - thassp → Postfix runs over STARTTLS with the certificate verified (`tls = "require"`,
//!   `tls_verify = "ca_file"`), and Postfix logs the TLS connection;
//! - Postfix stopped mid-transaction or down → thassp answers 4xx, and once Postfix is back
//!   every message is delivered exactly once (nothing lost, nothing stuck in the queue);
//! - SMTP AUTH relayed by thassp to Postfix's Cyrus SASL (a `sasldb` file made by the test
//!   with `saslpasswd2`, Debian package `sasl2-bin`; no daemon, nothing outside the folder);
//! - the deployment guide as written: its Postfix listener (docs/postfix/master.cf) behind
//!   thassp running its docs/examples/postfix-frontend.toml.
//!
//! Two tests pin defects found here and since fixed in src/smtp/relay.rs: Postfix must log
//! the client's HELO (not thassp's) and accept XCLIENT for IPv6 clients.
//!
//! The system's own Postfix (`/etc/postfix`, `/var/spool/postfix`, its service) is never
//! used, started or stopped: every `postfix` command here carries `-c <test folder>`. The
//! instance is stopped with its own `postfix -c DIR stop` when the test ends, panics
//! included (the `Drop` guard).
//!
//! Needs root (Postfix's master starts as root and drops to the `postfix` user) and the
//! Debian packages `postfix` and `sasl2-bin`, which `.ci/run` installs. Without them the tests
//! print "skipped: …" and pass, except under CI (`CI=true`), where they fail.

mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Client, WAIT, wire};
use thassp::config::Config;
use thassp::server::Running;
use tokio::io::AsyncWriteExt as _;

const POSTFIX: &str = "/usr/sbin/postfix";
const SASLPASSWD2: &str = "/usr/sbin/saslpasswd2";

/// The client address thassp is told about by PROXY protocol (TEST-NET-3, never routed), so
/// Postfix's log can only show it if XCLIENT carried it.
const CLIENT_IP: &str = "203.0.113.9";
const CLIENT_HELO: &str = "client.example.net";

/// The services the instance needs: the smtpd listener, queueing, the `virtual` delivery
/// agent (maildirs) and `postlog` (Postfix ≥ 3.4 writes `maillog_file` through it, so the
/// test reads the log without syslog). Nothing runs chrooted: the queue is in a temp folder.
const MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// True when the tests may run; panics under CI when something is missing.
fn available(need_sasl: bool) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let missing = if !Path::new(POSTFIX).exists() {
        Some("postfix is not installed (apt-get install postfix)")
    } else if !root {
        Some("starting a Postfix instance needs root")
    } else if need_sasl && !Path::new(SASLPASSWD2).exists() {
        Some("saslpasswd2 is not installed (apt-get install sasl2-bin)")
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{why}: .ci/run must provide it")
        }
        Some(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

/// A loopback port that was free a moment ago (bound with port 0, then released).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `id -u postfix` / `id -g postfix`: the `virtual` agent delivers with this uid and gid (it
/// refuses root), and the maildir base must belong to them.
fn postfix_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = std::process::Command::new("id")
            .args([flag, "postfix"])
            .output()
            .expect("run id");
        assert!(out.status.success(), "no postfix user: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// A Postfix instance in a temporary folder:
/// `etc/` (main.cf, master.cf, maps, certificate, `sasl/smtpd.conf`), `spool/` (queue),
/// `data/`, `mail/<domain>/<user>/` (maildirs), `sasldb2`, `maillog`.
struct Postfix {
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
}

impl Postfix {
    /// Writes the instance's files and starts it. With `sasl`, smtpd offers AUTH (after
    /// STARTTLS) against a sasldb holding `alice@example.com` / `s3cret`.
    async fn start(pki: &common::Pki, sasl: bool) -> Self {
        Self::start_with(pki, sasl, |port| {
            format!("127.0.0.1:{port} inet  n       -       n       -       -       smtpd\n")
        })
        .await
    }

    /// Like `start`, with the smtpd service lines of master.cf given for the chosen port.
    async fn start_with(pki: &common::Pki, sasl: bool, smtpd: impl FnOnce(u16) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Postfix's daemons run as `postfix`: they must be able to walk into the folder.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let etc = root.join("etc");
        for d in ["etc", "etc/sasl", "spool", "mail"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let (uid, gid) = postfix_ids();
        std::os::unix::fs::chown(root.join("mail"), Some(uid), Some(gid)).unwrap();
        // smtpd reads the certificate and key as root, before it drops privileges.
        std::fs::copy(&pki.cert_file, etc.join("cert.pem")).unwrap();
        std::fs::copy(&pki.key_file, etc.join("key.pem")).unwrap();
        // Recipients: b@example.com (local, virtual mailbox domain) and, for the AUTH test,
        // friend@elsewhere.example: a domain Postfix relays for only after AUTH, delivered to
        // a maildir too (transport_maps) instead of going out to the Internet.
        std::fs::write(
            etc.join("vmailbox"),
            "b@example.com example.com/b/\nfriend@elsewhere.example elsewhere.example/friend/\n",
        )
        .unwrap();
        std::fs::write(etc.join("transport"), "elsewhere.example virtual:\n").unwrap();
        let port = free_port();
        std::fs::write(etc.join("master.cf"), format!("{}{MASTER_CF}", smtpd(port))).unwrap();
        let r = root.display();
        let mut main_cf = format!(
            "\
compatibility_level = 3.6
queue_directory = {r}/spool
data_directory = {r}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.postfix.test
mydomain = postfix.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
# Postfix's default; with IPv4 only, XCLIENT would refuse IPv6 client addresses.
inet_protocols = all
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
# Headers stay as the client wrote them (no From/Date/Message-ID added or rewritten).
local_header_rewrite_clients =
# No DNS and no mail out: anything not delivered here fails at once.
smtp_dns_support_level = disabled
default_transport = error:this test instance sends no mail out
relay_transport = error:this test instance sends no mail out
transport_maps = texthash:{r}/etc/transport
maillog_file = {r}/maillog
maillog_file_prefixes = {r}
# What thassp needs: XCLIENT from the proxy's address.
smtpd_authorized_xclient_hosts = 127.0.0.0/8
virtual_mailbox_domains = example.com
virtual_mailbox_base = {r}/mail
virtual_mailbox_maps = texthash:{r}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtpd_tls_security_level = may
smtpd_tls_cert_file = {r}/etc/cert.pem
smtpd_tls_key_file = {r}/etc/key.pem
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
"
        );
        if sasl {
            // Cyrus SASL in smtpd itself, checking a sasldb file: no daemon to run. Debian's
            // Postfix reads `$config_directory/sasl/smtpd.conf`; upstream Postfix reads
            // `cyrus_sasl_config_path`: both point at etc/sasl.
            let db = root.join("sasldb2");
            std::fs::write(
                etc.join("sasl/smtpd.conf"),
                format!(
                    "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {}\nmech_list: PLAIN LOGIN\n",
                    db.display()
                ),
            )
            .unwrap();
            let mut child = tokio::process::Command::new(SASLPASSWD2)
                .arg("-f")
                .arg(&db)
                .args(["-p", "-c", "-u", "example.com", "alice"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("run saslpasswd2");
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"s3cret").await.unwrap();
            drop(stdin);
            let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
            assert!(status.success(), "saslpasswd2 failed: {status}");
            // smtpd opens the database as `postfix`, after dropping root.
            std::os::unix::fs::chown(&db, None, Some(gid)).unwrap();
            std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
            write!(
                main_cf,
                "\
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {r}/etc/sasl
smtpd_tls_auth_only = yes
"
            )
            .unwrap();
        }
        std::fs::write(etc.join("main.cf"), main_cf).unwrap();
        let mut pf = Self {
            dir,
            port,
            running: false,
        };
        pf.start_again().await;
        pf
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// `postfix -c DIR ARG`, bounded; its combined output.
    async fn postfix(&self, arg: &str) -> (bool, String) {
        let out = tokio::time::timeout(
            WAIT,
            tokio::process::Command::new(POSTFIX)
                .arg("-c")
                .arg(self.etc())
                .arg(arg)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("postfix {arg} took longer than {WAIT:?}"))
        .expect("run postfix");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `postfix start` (it runs `postfix check` itself and creates the queue directories),
    /// then waits until smtpd answers.
    async fn start_again(&mut self) {
        let (ok, out) = self.postfix("start").await;
        assert!(ok, "postfix start failed: {out}\nmaillog:\n{}", self.log());
        self.running = true;
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Ok(mut s)) = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(self.addr()),
            )
            .await
            {
                let _ = s.shutdown().await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Postfix not listening on {} after {WAIT:?}; maillog:\n{}",
                self.addr(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `postfix stop` (it ends the running sessions too), then waits until the master has
    /// gone (`postfix status` fails) and the port refuses connections.
    async fn stop(&mut self) {
        let (ok, out) = self.postfix("stop").await;
        assert!(ok, "postfix stop failed: {out}");
        let deadline = Instant::now() + WAIT;
        loop {
            let (running, _) = self.postfix("status").await;
            let listening = tokio::net::TcpStream::connect(self.addr()).await.is_ok();
            if !running && !listening {
                break;
            }
            assert!(Instant::now() < deadline, "Postfix still running after stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.running = false;
    }

    /// Waits (bounded) until the log satisfies `pred`; returns it.
    async fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if pred(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "Postfix's log never showed {what}; maillog:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The delivered messages of one maildir (`domain/user/new/`), sorted by name.
    fn maildir(&self, mailbox: &str) -> Vec<PathBuf> {
        let new = self.dir.path().join("mail").join(mailbox).join("new");
        let mut files: Vec<PathBuf> = std::fs::read_dir(new)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }

    /// Waits (bounded) until `mailbox` holds `n` messages (delivery runs after the 250).
    async fn wait_maildir(&self, mailbox: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let files = self.maildir(mailbox);
            if files.len() >= n {
                assert_eq!(files.len(), n, "{files:?}\nmaillog:\n{}", self.log());
                return files
                    .iter()
                    .map(|f| std::fs::read_to_string(f).unwrap())
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "{mailbox}: {} of {n} messages after {WAIT:?}; maillog:\n{}",
                files.len(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Files left in the queue (incoming, active, deferred, hold, …): none once everything
    /// accepted has been delivered.
    fn queued(&self) -> Vec<PathBuf> {
        let mut left = Vec::new();
        for q in ["maildrop", "incoming", "active", "deferred", "hold", "corrupt"] {
            let mut stack = vec![self.dir.path().join("spool").join(q)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else {
                        left.push(p);
                    }
                }
            }
        }
        left
    }
}

impl Drop for Postfix {
    /// Stops the instance with its own `postfix -c DIR stop` (panics included), before the
    /// folder goes. Should that fail, its master (whose pid the instance wrote) gets SIGTERM.
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let _ = std::process::Command::new(POSTFIX)
            .arg("-c")
            .arg(self.etc())
            .arg("stop")
            .output();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let running = std::process::Command::new(POSTFIX)
                .arg("-c")
                .arg(self.etc())
                .arg("status")
                .output()
                .is_ok_and(|o| o.status.success());
            if !running {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid_file = self.dir.path().join("spool/pid/master.pid");
        if let Ok(pid) = std::fs::read_to_string(pid_file) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", pid.trim()])
                .status();
        }
    }
}

/// thassp in front of `pf`: a listener that takes PROXY protocol from loopback (so the test
/// can present a public client address) and offers STARTTLS with the test certificate; the
/// upstream leg over STARTTLS, required and verified with the test CA.
fn thassp_config(pf: &Postfix, pki: &common::Pki) -> Config {
    let text = format!(
        r#"
        [server]
        hostname = "mx.thassp.test"
        shutdown_grace = "2s"
        [[listener]]
        address = "127.0.0.1:0"
        tls_cert = {cert:?}
        tls_key = {key:?}
        proxy_protocol = true
        proxy_trusted = ["127.0.0.0/8"]
        [upstream.postfix]
        address = "{upstream}"
        connect_timeout = "3s"
        command_timeout = "5s"
        data_timeout = "10s"
        tls = "require"
        tls_verify = "ca_file"
        tls_ca_file = {ca:?}
        [domains]
        local = ["example.com"]
        [store]
        backend = "memory"
        [events]
        url = ""
        [checks.reputation]
        enabled = false
        [checks.spf]
        enabled = false
        [checks.dkim]
        enabled = false
        "#,
        cert = pki.cert_file,
        key = pki.key_file,
        ca = pki.ca_file,
        upstream = pf.addr(),
    );
    Config::from_toml(&text, "postfix_e2e").unwrap_or_else(|e| panic!("{e}"))
}

/// Connects as `CLIENT_IP` by a PROXY protocol v2 header (as HAProxy's `send-proxy-v2`
/// would) and reads the banner.
async fn client_from_public_ip(thassp: &Running) -> Client {
    client_from(thassp, CLIENT_IP).await
}

async fn client_from(thassp: &Running, ip: &str) -> Client {
    let mut tcp = tokio::net::TcpStream::connect(thassp.smtp_addrs[0])
        .await
        .unwrap();
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]); // v2 PROXY, TCP over IPv4, 12 bytes
    header.extend_from_slice(&ip.parse::<std::net::Ipv4Addr>().unwrap().octets());
    header.extend_from_slice(&[192, 0, 2, 25]);
    header.extend_from_slice(&40000u16.to_be_bytes());
    header.extend_from_slice(&25u16.to_be_bytes());
    tcp.write_all(&header).await.unwrap();
    let mut c = Client::over(tcp);
    let banner = c.reply().await;
    assert!(banner.starts_with("220 "), "{banner}");
    c
}

/// The test message: what a byte-exact relay must keep (a line that is only a dot, leading
/// dots, "From " at a line start, trailing blanks, a tab, 8-bit UTF-8, a long line).
fn message(id: &str) -> Vec<u8> {
    let mut m = format!(
        "Date: Fri, 05 Dec 2025 10:00:00 +0000\r\n\
         From: Alice <a@example.net>\r\n\
         To: Bob <b@example.com>\r\n\
         Subject: =?UTF-8?Q?caf=C3=A9?= through thassp and Postfix\r\n\
         Message-ID: <{id}@example.net>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         Hello Bob,\r\n\
         \r\n\
         .\r\n\
         ..two dots\r\n\
         .one dot\r\n\
         From the start of a line (no > quoting in a maildir)\r\n\
         trailing blanks   \r\n\
         \tindented with a tab\r\n\
         caf\u{e9} \u{2615} na\u{ef}ve\r\n"
    );
    m.push_str(&"0123456789".repeat(90));
    m.push_str("\r\n-- \r\nAlice\r\n");
    m.into_bytes()
}

/// Splits the first header (with its folded lines) off LF-terminated text.
fn take_header(text: &str) -> (&str, &str) {
    let mut i = 0;
    loop {
        let p = text[i..].find('\n').expect("header line ends") + i;
        if !matches!(text.as_bytes().get(p + 1), Some(b' ' | b'\t')) {
            return (&text[..=p], &text[p + 1..]);
        }
        i = p + 1;
    }
}

/// Sends a command and asserts the reply's start.
async fn expect(c: &mut Client, cmd: &str, start: &str) -> String {
    let r = c.cmd(cmd).await;
    assert!(r.starts_with(start), "{cmd} -> {r}");
    r
}

#[tokio::test]
async fn delivers_into_a_real_postfix_over_starttls_with_the_client_in_its_log() {
    if !available(false) {
        return;
    }
    let started = Instant::now();
    let pki = common::pki();
    let pf = Postfix::start(&pki, false).await;
    let thassp = common::start(thassp_config(&pf, &pki)).await;

    let mut c = client_from_public_ip(&thassp).await;
    let ehlo = expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    // thassp advertises what Postfix offers (probed at start over the verified TLS leg).
    for ext in ["8BITMIME", "SMTPUTF8", "DSN", "STARTTLS"] {
        assert!(ehlo.contains(ext), "{ext} missing: {ehlo}");
    }
    expect(&mut c, "MAIL FROM:<a@example.net>", "250").await;
    // Postfix's own refusal, word for word, through thassp.
    assert_eq!(
        c.cmd("RCPT TO:<nobody@example.com>").await,
        "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown in virtual \
         mailbox table\r\n"
    );
    expect(&mut c, "RCPT TO:<b@example.com>", "250 2.1.5").await;
    expect(&mut c, "DATA", "354").await;
    let body = message("e2e-clean");
    c.send(wire(&body)).await;
    let done = c.reply().await;
    assert!(done.starts_with("250 2.0.0 Ok: queued as "), "{done}");
    expect(&mut c, "QUIT", "221").await;
    let queue_id = done.trim_end().rsplit(' ').next().unwrap().to_string();

    // The maildir file: Postfix's delivery headers, Postfix's Received, thassp's Received,
    // then the message exactly as the client sent it (a maildir stores LF line ends).
    let delivered = pf.wait_maildir("example.com/b", 1).await.remove(0);
    let (return_path, rest) = take_header(&delivered);
    assert_eq!(return_path, "Return-Path: <a@example.net>\n");
    let (original_to, rest) = take_header(rest);
    assert_eq!(original_to, "X-Original-To: b@example.com\n");
    let (delivered_to, rest) = take_header(rest);
    assert_eq!(delivered_to, "Delivered-To: b@example.com\n");
    let (postfix_received, rest) = take_header(rest);
    // The client Postfix saw is the one XCLIENT named, and the leg from thassp was TLS. (The
    // name after "from" is the HELO: see `postfix_logs_the_clients_helo`.)
    assert!(
        postfix_received.starts_with("Received: from ")
            && postfix_received.contains(&format!(" (unknown [{CLIENT_IP}])\n")),
        "{postfix_received}"
    );
    assert!(
        postfix_received.contains("(using TLSv1.3 with cipher ")
            && postfix_received.contains(&format!(
                "by mx.postfix.test (Postfix) with ESMTPS id {queue_id}\n"
            )),
        "{postfix_received}"
    );
    let (thassp_received, rest) = take_header(rest);
    assert!(
        thassp_received.starts_with(&format!("Received: from {CLIENT_HELO} "))
            && thassp_received.contains(&format!("[{CLIENT_IP}]"))
            && thassp_received.contains("by mx.thassp.test (thassp) with ESMTP id "),
        "{thassp_received}"
    );
    let expected = String::from_utf8(body).unwrap().replace("\r\n", "\n");
    assert_eq!(rest, expected, "the message changed on its way");

    // Postfix's log: the TLS connection from thassp (before XCLIENT, so under thassp's own
    // address), then the refusal and the queued message under the real client and HELO.
    let log = pf
        .wait_log("the delivery", |l| {
            l.contains("status=sent (delivered to maildir)")
        })
        .await;
    assert!(
        log.contains("TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "NOQUEUE: reject: RCPT from unknown[{CLIENT_IP}]: 550 5.1.1 <nobody@example.com>"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("{queue_id}: client=unknown[{CLIENT_IP}]")),
        "{log}"
    );
    // No warning (a host without IPv6 may say so: inet_protocols = all is Postfix's default).
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("warning: ") && !l.contains("IPv6 support is disabled"))
        .collect();
    assert!(warnings.is_empty(), "Postfix warned:\n{log}");

    thassp.shutdown().await;
    println!("real Postfix end-to-end: {:?}", started.elapsed());
}

/// Postfix should log and stamp the client's own HELO, as it does its address.
///
/// Postfix's EHLO handler replaces the HELO that XCLIENT set, so after XCLIENT thassp says
/// `EHLO <client's HELO>` as Postfix's XCLIENT_README does (falling back to `helo_name`
/// when the MTA refuses the name).
#[tokio::test]
async fn postfix_logs_the_clients_helo() {
    if !available(false) {
        return;
    }
    let pki = common::pki();
    let pf = Postfix::start(&pki, false).await;
    let thassp = common::start(thassp_config(&pf, &pki)).await;
    let mut c = client_from_public_ip(&thassp).await;
    expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    expect(&mut c, "MAIL FROM:<a@example.net>", "250").await;
    expect(&mut c, "RCPT TO:<nobody@example.com>", "550 5.1.1").await;
    expect(&mut c, "RCPT TO:<b@example.com>", "250").await;
    expect(&mut c, "DATA", "354").await;
    c.send(wire(&message("e2e-helo"))).await;
    let done = c.reply().await;
    assert!(done.starts_with("250"), "{done}");
    expect(&mut c, "QUIT", "221").await;
    let log = pf
        .wait_log("the refusal", |l| l.contains("NOQUEUE: reject: RCPT"))
        .await;
    assert!(
        log.contains(&format!(
            "NOQUEUE: reject: RCPT from unknown[{CLIENT_IP}]: 550 5.1.1 <nobody@example.com>"
        )) && log.contains(&format!("proto=ESMTP helo=<{CLIENT_HELO}>")),
        "{log}"
    );
    let delivered = pf.wait_maildir("example.com/b", 1).await.remove(0);
    assert!(
        delivered.contains(&format!("Received: from {CLIENT_HELO} (unknown [{CLIENT_IP}])\n")),
        "{delivered}"
    );
    thassp.shutdown().await;
}

/// Postfix offers no second XCLIENT on a connection (found by this test: the second
/// client's mail was logged under the first client). So a kept connection serves only a
/// later session of the same client, and Postfix sees each client as itself.
#[tokio::test]
async fn a_kept_connection_carries_each_client_to_postfix_as_itself() {
    if !available(false) {
        return;
    }
    let pki = common::pki();
    let pf = Postfix::start(&pki, false).await;
    let thassp = common::start(thassp_config(&pf, &pki)).await;
    let mut ids = Vec::new();
    let other = "203.0.113.77";
    for (ip, id) in [
        (CLIENT_IP, "e2e-reuse-1"),
        (other, "e2e-reuse-2"),
        (other, "e2e-reuse-3"),
    ] {
        let mut c = client_from(&thassp, ip).await;
        expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
        expect(&mut c, "MAIL FROM:<a@example.net>", "250").await;
        expect(&mut c, "RCPT TO:<b@example.com>", "250").await;
        expect(&mut c, "DATA", "354").await;
        c.send(wire(&message(id))).await;
        let done = c.reply().await;
        assert!(done.starts_with("250 2.0.0 Ok: queued as "), "{done}");
        expect(&mut c, "QUIT", "221").await;
        ids.push(done.trim_end().rsplit(' ').next().unwrap().to_string());
        // The session hands its upstream connection over when it ends.
        common::sessions_ended(&thassp).await;
    }
    let counters = &thassp.app().snapshot().counters;
    assert_eq!(
        thassp::app::Counters::get(&counters.upstream_reuses),
        1,
        "only the third session (same client as the second) used a kept connection"
    );
    pf.wait_maildir("example.com/b", 3).await;
    let log = pf
        .wait_log("all messages", |l| l.contains(&format!("{}: client=", ids[2])))
        .await;
    assert!(
        log.contains(&format!("{}: client=unknown[{CLIENT_IP}]", ids[0])),
        "{log}"
    );
    assert!(
        log.contains(&format!("{}: client=unknown[{other}]", ids[1])),
        "{log}"
    );
    assert!(
        log.contains(&format!("{}: client=unknown[{other}]", ids[2])),
        "{log}"
    );
    thassp.shutdown().await;
}

/// An IPv6 client must reach Postfix's log as itself, too.
///
/// Postfix refuses the whole XCLIENT command for a DESTADDR without the `IPV6:` prefix
/// (`501 5.5.4 Bad DESTADDR syntax`), and for `::ffff:a.b.c.d` from a dual-stack listener;
/// thassp tags IPv6 and makes addresses canonical first.
#[tokio::test]
async fn postfix_logs_an_ipv6_client() {
    if !available(false) {
        return;
    }
    let pki = common::pki();
    let pf = Postfix::start(&pki, false).await;
    let thassp = common::start(thassp_config(&pf, &pki)).await;
    let mut tcp = tokio::net::TcpStream::connect(thassp.smtp_addrs[0])
        .await
        .unwrap();
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x21, 0, 36]); // v2 PROXY, TCP over IPv6, 36 bytes
    header.extend_from_slice(&"2001:db8::9".parse::<std::net::Ipv6Addr>().unwrap().octets());
    header.extend_from_slice(&"2001:db8::25".parse::<std::net::Ipv6Addr>().unwrap().octets());
    header.extend_from_slice(&40000u16.to_be_bytes());
    header.extend_from_slice(&25u16.to_be_bytes());
    tcp.write_all(&header).await.unwrap();
    let mut c = Client::over(tcp);
    let banner = c.reply().await;
    assert!(banner.starts_with("220 "), "{banner}");
    expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    expect(&mut c, "MAIL FROM:<a@example.net>", "250").await;
    expect(&mut c, "RCPT TO:<nobody@example.com>", "550 5.1.1").await;
    let log = pf
        .wait_log("the refusal", |l| l.contains("NOQUEUE: reject: RCPT"))
        .await;
    assert!(
        log.contains("NOQUEUE: reject: RCPT from unknown[2001:db8::9]: 550 5.1.1"),
        "{log}"
    );
    thassp.shutdown().await;
}

/// The smtpd service of the deployment guide's docs/postfix/master.cf (the 10025 listener and
/// its `-o` lines, verbatim) on `port` instead of 10025, and without chroot (a chrooted smtpd
/// needs copies of /etc files in the queue directory, which a test instance does not have).
fn guide_listener(port: u16) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/postfix/master.cf"))
        .unwrap();
    let mut lines = text.lines().skip_while(|l| !l.starts_with("127.0.0.1:10025 "));
    let first: Vec<&str> = lines
        .next()
        .expect("the 10025 listener")
        .split_whitespace()
        .collect();
    assert_eq!(first.len(), 8, "service line: {first:?}");
    let mut service = format!(
        "127.0.0.1:{port} {} {} {} n {} {} {}\n",
        first[1], first[2], first[3], first[5], first[6], first[7]
    );
    for l in lines.take_while(|l| l.starts_with(char::is_whitespace)) {
        service.push_str(l);
        service.push('\n');
    }
    assert!(
        service.contains("smtpd_authorized_xclient_hosts=127.0.0.1"),
        "{service}"
    );
    service
}

/// The deployment guide, as written: Postfix with the guide's 10025 listener
/// (docs/postfix/master.cf) behind thassp running docs/examples/postfix-frontend.toml. Only
/// what a test host cannot have is changed: loopback ports, the test certificate, memory
/// store, no event log, no DNS-based checks (no resolver here) and no greylisting (the first
/// message would wait 5 minutes); a PROXY protocol listener presents a public client.
#[tokio::test]
async fn the_deployment_guides_postfix_setup_works() {
    if !available(true) {
        return;
    }
    let pki = common::pki();
    let pf = Postfix::start_with(&pki, true, guide_listener).await;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/postfix-frontend.toml");
    let mut config = Config::load(&path).unwrap();
    let listener = &mut config.listeners[0];
    listener.address = "127.0.0.1:0".into();
    listener.tls_cert = Some(pki.cert_file.clone());
    listener.tls_key = Some(pki.key_file.clone());
    listener.proxy_protocol = true;
    listener.proxy_trusted = vec!["127.0.0.0/8".parse().unwrap()];
    let upstream = config.upstreams.get_mut("postfix").unwrap();
    assert_eq!(upstream.address, "127.0.0.1:10025", "the guide's port");
    upstream.address = pf.addr().to_string();
    config.store.backend = thassp::store::StoreBackend::Memory;
    config.events.url = String::new();
    config.checks.dnsbl.zones.clear();
    config.checks.spf.enabled = false;
    config.checks.dkim.enabled = false;
    config.checks.greylist.enabled = false;
    let thassp = common::start(config).await;

    let mut c = client_from_public_ip(&thassp).await;
    expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    expect(&mut c, "STARTTLS", "220").await;
    let mut c = c.tls(pki.client.clone()).await;
    // AUTH is Postfix's, offered on the plaintext loopback leg (smtpd_tls_auth_only=no).
    let ehlo = expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN\r\n"), "{ehlo}");
    expect(&mut c, "MAIL FROM:<a@example.net>", "250").await;
    expect(
        &mut c,
        "RCPT TO:<nobody@example.com>",
        "550 5.1.1 <nobody@example.com>",
    )
    .await;
    expect(&mut c, "RCPT TO:<b@example.com>", "250").await;
    expect(&mut c, "DATA", "354").await;
    c.send(wire(&message("guide-inbound"))).await;
    let done = c.reply().await;
    assert!(done.starts_with("250 2.0.0 Ok: queued as "), "{done}");
    // A user relaying out: Postfix's permit_sasl_authenticated decides.
    expect(
        &mut c,
        &format!("AUTH PLAIN {}", plain("alice@example.com", "s3cret")),
        "235",
    )
    .await;
    let r = c
        .send_mail(
            "alice@example.com",
            &["friend@elsewhere.example"],
            &wire(&message("guide-relay")),
        )
        .await;
    assert!(r.starts_with("250 "), "{r}");
    expect(&mut c, "QUIT", "221").await;

    let inbound = pf.wait_maildir("example.com/b", 1).await.remove(0);
    assert!(
        inbound.contains(&format!(
            "(unknown [{CLIENT_IP}])\n\tby mx.postfix.test (Postfix) with ESMTP id "
        )),
        "{inbound}"
    );
    let relayed = pf.wait_maildir("elsewhere.example/friend", 1).await.remove(0);
    assert!(relayed.contains("(Postfix) with ESMTPA id "), "{relayed}");
    let log = pf
        .wait_log("both deliveries", |l| {
            l.matches("status=sent (delivered to maildir)").count() >= 2
        })
        .await;
    // The guide's syslog_name, and the real client in every line about the session.
    for needle in [
        "postfix/thassp/smtpd[".to_string(),
        format!("NOQUEUE: reject: RCPT from unknown[{CLIENT_IP}]: 550 5.1.1 <nobody@example.com>"),
        format!("client=unknown[{CLIENT_IP}]"),
        format!("client=unknown[{CLIENT_IP}], sasl_method=PLAIN, sasl_username=alice@example.com"),
    ] {
        assert!(log.contains(&needle), "no {needle:?} in:\n{log}");
    }
    thassp.shutdown().await;
}

/// Runs a transaction to the first reply that is not a success; `Ok` with the final `250`,
/// `Err` with the refusal.
async fn try_send(c: &mut Client, id: &str) -> Result<String, String> {
    for cmd in ["MAIL FROM:<a@example.net>", "RCPT TO:<b@example.com>", "DATA"] {
        let r = c.cmd(cmd).await;
        if !(r.starts_with('2') || r.starts_with('3')) {
            return Err(r);
        }
    }
    c.send(wire(&message(id))).await;
    let r = c.reply().await;
    if r.starts_with("250") { Ok(r) } else { Err(r) }
}

#[tokio::test]
async fn postfix_down_means_4xx_and_nothing_is_lost() {
    if !available(false) {
        return;
    }
    let pki = common::pki();
    let mut pf = Postfix::start(&pki, false).await;
    let thassp = common::start(thassp_config(&pf, &pki)).await;

    // Postfix goes away in the middle of a transaction whose recipient it had accepted.
    let mut c = client_from_public_ip(&thassp).await;
    expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    expect(&mut c, "MAIL FROM:<a@example.net>", "250").await;
    expect(&mut c, "RCPT TO:<b@example.com>", "250").await;
    pf.stop().await;
    let r = c.cmd("DATA").await;
    let refusal = if r.starts_with("354") {
        c.send(wire(&message("down-1"))).await;
        c.reply().await
    } else {
        r
    };
    assert!(refusal.starts_with("451 4.4.1"), "mid-transaction: {refusal}");
    // The session goes on: the client may try again later (here: now, Postfix still down).
    expect(&mut c, "RSET", "250").await;
    let err = try_send(&mut c, "down-1").await.unwrap_err();
    assert!(err.starts_with("451 4.4.1"), "Postfix down: {err}");
    expect(&mut c, "QUIT", "221").await;

    // A new client while Postfix is down: a temporary failure, never a 250.
    let mut c = client_from_public_ip(&thassp).await;
    expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    let err = try_send(&mut c, "down-2").await.unwrap_err();
    assert!(err.starts_with("451 4.4.1"), "Postfix down: {err}");
    drop(c);
    assert!(pf.maildir("example.com/b").is_empty());

    // Postfix is back: the senders retry (as real MTAs do after a 4xx) and both messages
    // arrive, each once.
    pf.start_again().await;
    let mut c = client_from_public_ip(&thassp).await;
    expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    for id in ["down-1", "down-2"] {
        let ok = try_send(&mut c, id).await;
        assert!(ok.is_ok(), "{id} after the restart: {ok:?}");
    }
    expect(&mut c, "QUIT", "221").await;
    let delivered = pf.wait_maildir("example.com/b", 2).await;
    let mut ids: Vec<&str> = delivered
        .iter()
        .map(|m| {
            let start = m.find("Message-ID: <").unwrap() + 13;
            &m[start..start + m[start..].find('@').unwrap()]
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["down-1", "down-2"]);
    // Nothing half-received stays in Postfix's queue (the interrupted transaction included).
    pf.wait_log("both deliveries", |l| l.matches(": removed").count() >= 2)
        .await;
    let left = pf.queued();
    assert!(left.is_empty(), "left in the queue: {left:?}\n{}", pf.log());
    thassp.shutdown().await;
}

fn plain(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
}

#[tokio::test]
async fn smtp_auth_through_thassp_against_postfix_cyrus_sasl() {
    if !available(true) {
        return;
    }
    let pki = common::pki();
    let pf = Postfix::start(&pki, true).await;
    let thassp = common::start(thassp_config(&pf, &pki)).await;

    let mut c = client_from_public_ip(&thassp).await;
    let ehlo = expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
    // Not authenticated: thassp is no open relay.
    expect(&mut c, "MAIL FROM:<alice@example.com>", "250").await;
    expect(&mut c, "RCPT TO:<friend@elsewhere.example>", "550 5.7.1").await;
    expect(&mut c, "RSET", "250").await;
    expect(&mut c, "STARTTLS", "220").await;
    let mut c = c.tls(pki.client.clone()).await;
    // The mechanisms are Postfix's (its smtpd.conf's mech_list), learnt over the TLS leg.
    let ehlo = expect(&mut c, &format!("EHLO {CLIENT_HELO}"), "250").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN\r\n"), "{ehlo}");

    // A wrong password: Postfix's 535, relaying still refused.
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("alice@example.com", "wrong")))
            .await,
        "535 5.7.8 Error: authentication failed: authentication failure\r\n"
    );
    // The right one (LOGIN, step by step, as many clients do).
    expect(&mut c, "AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    expect(&mut c, &plain_b64("alice@example.com"), "334 UGFzc3dvcmQ6").await;
    assert_eq!(
        c.cmd(&plain_b64("s3cret")).await,
        "235 2.7.0 Authentication successful\r\n"
    );
    // Authenticated: the relay decision is Postfix's (permit_sasl_authenticated).
    let r = c
        .send_mail(
            "alice@example.com",
            &["friend@elsewhere.example"],
            &wire(&message("e2e-auth")),
        )
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    expect(&mut c, "QUIT", "221").await;

    let delivered = pf.wait_maildir("elsewhere.example/friend", 1).await.remove(0);
    assert!(
        delivered.contains("by mx.postfix.test (Postfix) with ESMTPSA id "),
        "{delivered}"
    );
    assert!(
        delivered.contains("by mx.thassp.test (thassp) with ESMTPSA id "),
        "{delivered}"
    );
    let log = pf
        .wait_log("the delivery", |l| {
            l.contains("status=sent (delivered to maildir)")
        })
        .await;
    assert!(
        log.contains(&format!(
            "warning: unknown[{CLIENT_IP}]: SASL PLAIN authentication failed"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "client=unknown[{CLIENT_IP}], sasl_method=LOGIN, sasl_username=alice@example.com"
        )),
        "{log}"
    );
    thassp.shutdown().await;
}

fn plain_b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
