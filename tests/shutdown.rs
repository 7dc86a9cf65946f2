//! After a shutdown nothing is left behind: every socket thassp opened (listeners, client
//! sessions, upstream connections) is closed. Alone in its own test binary so no other test
//! opens descriptors meanwhile.

mod common;

use std::time::Duration;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn shutdown_leaks_no_descriptors() {
    let sink = common::Sink::start().await;
    let before = open_fds();
    let running = common::start(common::config(sink.addr, "", "")).await;
    let addr = running.smtp_addrs[0];
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = common::Client::greeted(addr).await;
        if i % 2 == 0 {
            let r = c
                .send_mail(
                    "a@example.net",
                    &["b@example.com"],
                    &common::wire(common::MESSAGE),
                )
                .await;
            assert!(r.starts_with("250"));
        }
        clients.push(c);
    }
    // Half the clients vanish without QUIT, half stay connected until the shutdown.
    clients.truncate(10);
    running.shutdown().await;
    drop(clients);
    let mut now = open_fds();
    for _ in 0..100 {
        if now <= before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = open_fds();
    }
    assert!(now <= before, "{before} descriptors before, {now} after shutdown");
    assert_eq!(sink.deliveries().len(), 10);
}
