//! The real `thassp` binary: version, check-config exit codes, and a full run with a message
//! relayed, SIGHUP reloads (a broken file keeps the running config) and SIGTERM draining.

mod common;

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_thassp");

fn example() -> String {
    format!("{}/config/thassp.example.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn version_and_check_config() {
    let out = std::process::Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("thassp {}", env!("CARGO_PKG_VERSION"))
    );

    let out = std::process::Command::new(BIN)
        .args(["check-config", &example()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[smtp]\nmax_recipients = 0\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["smtp.max_recipients", "listener", "upstream", "domains.local"] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }

    let out = std::process::Command::new(BIN)
        .args(["check-config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the file"));
}

fn config_text(upstream: std::net::SocketAddr, hostname: &str) -> String {
    format!(
        r#"
        [server]
        hostname = "{hostname}"
        shutdown_grace = "5s"
        [[listener]]
        address = "127.0.0.1:0"
        [upstream.main]
        address = "{upstream}"
        [domains]
        local = ["example.com"]
        [store]
        backend = "memory"
        [events]
        url = ""
        "#
    )
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn run_relay_reload_and_terminate() {
    let sink = common::Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thassp.toml");
    std::fs::write(&path, config_text(sink.addr, "mx.one.test")).unwrap();
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "run", "--config", path.to_str().unwrap()])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = common::Log::capture(&mut child);
    let addr = log.address("Listening for SMTP.").await;

    let mut c = common::Client::greeted(addr).await;
    let r = c
        .send_mail(
            "a@example.net",
            &["b@example.com"],
            &common::wire(common::MESSAGE),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT").await;
    log.wait("\"outcome\":\"delivered\"").await;

    // A broken file: the reload is refused, the running configuration stays.
    std::fs::write(&path, "[smtp]\nmax_recipients = \"many\"\n").unwrap();
    signal(child.id().unwrap(), "HUP");
    log.wait("Reload failed").await;
    let mut c = common::Client::connect(addr).await;
    assert!(c.reply().await.contains("mx.one.test"));

    // A good file: new sessions use it.
    std::fs::write(&path, config_text(sink.addr, "mx.two.test")).unwrap();
    signal(child.id().unwrap(), "HUP");
    log.wait("Configuration reloaded.").await;
    let mut c2 = common::Client::connect(addr).await;
    assert!(c2.reply().await.contains("mx.two.test"));

    // SIGTERM: idle sessions get 421, the process exits 0.
    signal(child.id().unwrap(), "TERM");
    assert!(c.reply().await.starts_with("421 4.3.2"));
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
