//! Every configuration file shipped in the repository parses and validates, and the quick
//! start works as the README says: a message sent to it lands as a file.

mod common;

use std::path::PathBuf;

use thassp::config::Config;

fn shipped_configs() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["config", "docs"] {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "toml") {
                    files.push(p);
                }
            }
        }
    }
    files
}

#[tokio::test]
async fn every_shipped_config_is_valid() {
    let files = shipped_configs();
    assert!(
        files.len() >= 2,
        "expected the example and quick-start configs, found {files:?}"
    );
    for f in files {
        // Parsed, validated and built, as `thassp check-config` does.
        if let Err(e) = Config::load(&f).and_then(thassp::app::App::check) {
            panic!("{}: {e}", f.display());
        }
    }
}

#[tokio::test]
async fn quick_start_stores_the_message_as_a_file() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/quickstart.toml");
    let mut config = Config::load(&path).unwrap();
    // Same config on free ports and a scratch directory, so tests can run side by side.
    let dir = tempfile::tempdir().unwrap();
    config.listeners[0].address = "127.0.0.1:0".into();
    config.devsink.directory = dir.path().join("devmail");
    config.store.path = dir.path().join("state.db");
    config.events.url = format!("sqlite://{}", dir.path().join("events.db").display());
    // The upstream is the devsink, so both need the same free port.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    config.devsink.address = format!("127.0.0.1:{port}");
    config.upstreams.get_mut("mta").unwrap().address = format!("127.0.0.1:{port}");
    let running = common::start(config).await;
    let mut c = common::Client::greeted(running.smtp_addrs[0]).await;
    let r = c
        .send_mail(
            "me@example.net",
            &["you@example.com"],
            &common::wire(common::MESSAGE),
        )
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: stored as "), "{r}");
    running.shutdown().await;
    let files: Vec<_> = std::fs::read_dir(dir.path().join("devmail"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(files.len(), 1);
    let content = std::fs::read(files[0].path()).unwrap();
    let text = String::from_utf8_lossy(&content);
    assert!(text.starts_with("Return-Path: <me@example.net>\r\nDelivered-To: you@example.com\r\nReceived: from client.example.net"), "{text}");
    assert!(content.ends_with(b"Hello.\r\n..dot line\r\n"));
}
