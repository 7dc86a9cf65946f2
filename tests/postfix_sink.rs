//! thassp in front of a real, independent SMTP server: Postfix's `smtp-sink`, run as a child
//! process on a free loopback port. It dumps each mail transaction to a file, so the test
//! checks what really arrived: the envelope, thassp's `Received:` header and the body.
//!
//! Needs `/usr/sbin/smtp-sink` (Debian package `postfix`; the Postfix service itself is never
//! started). Without it the test is skipped, except under CI (`CI=true`), where it fails.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, MESSAGE, WAIT, wire};

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

/// A running `smtp-sink`; killed (and reaped) on drop, panics included.
struct SmtpSink {
    child: Child,
    port: u16,
    /// Holds `mail/` (the dumps) and `smtp-sink.stderr`.
    dir: tempfile::TempDir,
}

impl SmtpSink {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mail = dir.path().join("mail");
        std::fs::create_dir(&mail).unwrap();
        // As root, smtp-sink must drop to another user (-u), who then writes the dumps.
        let root = std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        if root {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(&mail, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let port = free_port();
        let stderr = std::fs::File::create(dir.path().join("smtp-sink.stderr")).unwrap();
        let mut cmd = Command::new(SMTP_SINK);
        if root {
            cmd.args(["-u", "nobody"]);
        }
        // -d: one dump file per transaction, named mail/msg.<random hex>.
        cmd.arg("-d")
            .arg(mail.join("msg."))
            .args(["-h", "sink.postfix.test"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("100")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SMTP_SINK}: {e}"));
        Self { child, port, dir }
    }

    fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("smtp-sink.stderr")).unwrap_or_default()
    }

    /// Waits (bounded) until smtp-sink accepts connections.
    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("smtp-sink exited early ({status}): {}", self.stderr());
            }
            if let Ok(Ok(mut s)) = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(self.addr()),
            )
            .await
            {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "smtp-sink not listening on {} after {WAIT:?}: {}",
                self.addr(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn dumps(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("mail"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago (bound with port 0, then released).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// True when the test may run; panics under CI when smtp-sink is missing.
fn smtp_sink_available() -> bool {
    if Path::new(SMTP_SINK).exists() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{SMTP_SINK} is missing on CI: .ci/run must install it (apt-get install postfix)");
    }
    println!("skipped: smtp-sink not installed (apt-get install postfix)");
    false
}

/// The values of every `name` line of a dump (smtp-sink writes LF line ends).
fn header_value<'a>(dump: &'a str, name: &str) -> Vec<&'a str> {
    dump.lines().filter_map(|l| l.strip_prefix(name)).collect()
}

/// The part of a dump after smtp-sink's own headers: everything after its three-line
/// `Received: ... by <host> (smtp-sink) ...; <date>` header, i.e. what thassp sent.
fn relayed_part(dump: &str) -> Option<&str> {
    let by = dump.find("\tby sink.postfix.test (smtp-sink) ")?;
    let date_line = by + dump[by..].find('\n')? + 1;
    let after = date_line + dump[date_line..].find('\n')? + 1;
    Some(&dump[after..])
}

/// Removes the first header (with its folded lines) from LF-terminated text.
fn strip_first_header(text: &str) -> &str {
    let mut i = 0;
    loop {
        let Some(p) = text[i..].find('\n') else {
            return "";
        };
        let next = i + p + 1;
        if !matches!(text.as_bytes().get(next), Some(b' ' | b'\t')) {
            return &text[next..];
        }
        i = next;
    }
}

#[tokio::test]
async fn relays_through_thassp_into_postfix_smtp_sink() {
    if !smtp_sink_available() {
        return;
    }
    let mut sink = SmtpSink::start();
    sink.wait_listening().await;

    let running = common::start(common::config(sink.addr(), "", "")).await;
    let mut client = Client::greeted(running.smtp_addrs[0]).await;
    let reply = client
        .send_mail("a@example.net", &["b@example.com"], &wire(MESSAGE))
        .await;
    assert!(reply.starts_with("250 "), "final reply: {reply}");
    let reply = client.cmd("QUIT").await;
    assert!(reply.starts_with("221"), "QUIT reply: {reply}");

    // smtp-sink writes the dump while it receives; wait until it is complete (it ends with
    // the message and one empty line).
    let expected_body = String::from_utf8(MESSAGE.to_vec()).unwrap().replace("\r\n", "\n");
    let deadline = Instant::now() + WAIT;
    let (file, dump) = loop {
        let dumps = sink.dumps();
        if let [file] = dumps.as_slice() {
            let dump = std::fs::read_to_string(file).unwrap();
            if dump.ends_with(&format!("{expected_body}\n")) || Instant::now() >= deadline {
                break (file.clone(), dump);
            }
        }
        assert!(
            Instant::now() < deadline,
            "expected exactly one dump file, got {dumps:?}; smtp-sink stderr: {}",
            sink.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The envelope thassp gave the real MTA. smtp-sink offers XCLIENT, so after it thassp
    // says EHLO with the client's own name.
    assert_eq!(
        header_value(&dump, "X-Helo-Args: "),
        ["client.example.net"],
        "{file:?}:\n{dump}"
    );
    let mail = header_value(&dump, "X-Mail-Args: ");
    assert!(
        mail.len() == 1 && mail[0].starts_with("<a@example.net>"),
        "{file:?}:\n{dump}"
    );
    let rcpts = header_value(&dump, "X-Rcpt-Args: ");
    assert!(
        rcpts.len() == 1 && rcpts[0].starts_with("<b@example.com>"),
        "{file:?}:\n{dump}"
    );

    // What thassp relayed: its own Received header first, then the message unchanged
    // (smtp-sink undoes the dot-stuffing, so "..dot line" is back as in MESSAGE).
    let relayed = relayed_part(&dump).unwrap_or_else(|| panic!("no smtp-sink header in {file:?}:\n{dump}"));
    assert!(
        relayed.starts_with("Received: from client.example.net "),
        "thassp's Received header is not first:\n{relayed}"
    );
    let received = &relayed[..relayed.len() - strip_first_header(relayed).len()];
    assert!(
        received.contains("\tby mx.thassp.test (thassp) with ESMTP id "),
        "{received}"
    );
    assert!(received.contains("\tfor <b@example.com>"), "{received}");
    assert_eq!(
        strip_first_header(relayed),
        format!("{expected_body}\n"),
        "{file:?}"
    );

    drop(client);
    running.shutdown().await;
    drop(sink);
}
