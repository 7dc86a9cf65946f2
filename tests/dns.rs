//! The resolver, reverse DNS, and the PTR and DNSBL checks against a real DNS server in
//! the test process (`common::dns::TestDns`): real packets over UDP and TCP, no internet.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dns::{Fault, Records, TestDns};
use thassp::dns::DnsError;
use thassp::policy::dnsbl::{DnsblCheck, DnsblConfig};
use thassp::policy::ptr::{PtrCheck, PtrConfig};
use thassp::policy::{
    Category, Check, CheckAction, CheckError, Context, Exemptions, Ptr, SessionFacts, SessionInfo, Stage,
    Verdict,
};

fn session(ip: &str) -> SessionInfo {
    SessionInfo {
        id: "t".into(),
        peer: SocketAddr::new(ip.parse().unwrap(), 40000),
        local: "127.0.0.1:25".parse().unwrap(),
        hostname: "mx.test".into(),
        helo: None,
        esmtp: true,
        authenticated: None,
        tls: None,
        proxied_by: None,
        health_check: false,
    }
}

/// Runs `check` at the connect stage for a client at `ip`, with the given session facts.
async fn run_with(check: &dyn Check, ip: &str, facts: &SessionFacts) -> Result<Verdict, CheckError> {
    let info = session(ip);
    let exempt = Exemptions::default();
    let cx = Context {
        stage: Stage::Connect,
        session: &info,
        sender: None,
        recipient: None,
        recipients: &[],
        message: None,
        facts,
        exempt: &exempt,
    };
    check.check(&cx).await
}

async fn run(check: &dyn Check, ip: &str) -> Result<Verdict, CheckError> {
    run_with(check, ip, &SessionFacts::default()).await
}

fn reply_of(v: &Verdict) -> String {
    match v {
        Verdict::Reject(r)
        | Verdict::TempFail(r)
        | Verdict::Monitor(r)
        | Verdict::Score { refusal: r, .. } => r.reply.to_string(),
        other => format!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Resolver

#[tokio::test]
async fn lookups_of_each_type() {
    let dns = TestDns::start(
        Records::new()
            .a("Host.Example", "192.0.2.1")
            .a("host.example", "192.0.2.2")
            .aaaa("host.example", "2001:db8::1")
            .aaaa("v6only.example", "2001:db8::2")
            .ptr("192.0.2.1", "Host.Example.")
            .txt("host.example", "v=spf1 -all")
            .txt("long.example", &format!("{}{}", "a".repeat(255), "b".repeat(10)))
            .mx("example", 20, "mx2.example")
            .mx("example", 10, "MX1.example")
            .mx("nomail.example", 0, "."),
    )
    .await;
    let r = dns.resolver();
    let mut a = r.a("host.example").await.unwrap();
    a.sort();
    assert_eq!(
        a,
        vec![
            "192.0.2.1".parse::<std::net::Ipv4Addr>().unwrap(),
            "192.0.2.2".parse().unwrap()
        ]
    );
    assert_eq!(
        r.aaaa("HOST.example.").await.unwrap(),
        vec!["2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap()]
    );
    let ips = r.ips("host.example").await.unwrap();
    assert_eq!(ips.len(), 3);
    assert!(ips[0].is_ipv4() && ips[2].is_ipv6(), "{ips:?}");
    assert_eq!(
        r.ips("v6only.example").await.unwrap(),
        vec!["2001:db8::2".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        r.ptr_names("192.0.2.1".parse().unwrap()).await.unwrap(),
        vec!["host.example"]
    );
    assert_eq!(r.txt("host.example").await.unwrap(), vec!["v=spf1 -all"]);
    // A record of several strings comes back joined.
    let long = r.txt("long.example").await.unwrap();
    assert_eq!(long, vec![format!("{}{}", "a".repeat(255), "b".repeat(10))]);
    assert_eq!(
        r.mx("example").await.unwrap(),
        vec![(10, "mx1.example".to_string()), (20, "mx2.example".to_string())]
    );
    assert_eq!(r.mx("nomail.example").await.unwrap(), vec![(0, String::new())]);
}

#[tokio::test]
async fn cname_chains_are_followed() {
    let dns = TestDns::start(
        Records::new()
            .cname("www.example", "web.example")
            .cname("web.example", "edge.cdn.example")
            .a("edge.cdn.example", "192.0.2.80")
            .cname("dangling.example", "nowhere.example"),
    )
    .await;
    let r = dns.resolver();
    assert_eq!(
        r.a("www.example").await.unwrap(),
        vec!["192.0.2.80".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    // The CNAME itself is never returned as an answer of another type.
    assert_eq!(r.txt("www.example").await, Err(DnsError::NotFound));
    assert_eq!(r.a("dangling.example").await, Err(DnsError::NotFound));
}

#[tokio::test]
async fn not_found_failure_and_timeout_are_told_apart() {
    let dns = TestDns::start(
        Records::new()
            .a("exists.example", "192.0.2.1")
            .servfail("broken.example")
            .fault("refused.example", Fault::Refused)
            .silent("slow.example"),
    )
    .await;
    let r = dns.resolver();
    // NXDOMAIN and NODATA are both a definite "no".
    assert_eq!(r.a("missing.example").await, Err(DnsError::NotFound));
    assert_eq!(r.txt("exists.example").await, Err(DnsError::NotFound));
    assert_eq!(r.ips("missing.example").await, Err(DnsError::NotFound));
    assert!(matches!(r.a("broken.example").await, Err(DnsError::Failure(_))));
    assert!(matches!(r.a("refused.example").await, Err(DnsError::Failure(_))));
    // Both families failing is a failure, not "no addresses".
    assert!(matches!(r.ips("broken.example").await, Err(DnsError::Failure(_))));
    let started = Instant::now();
    assert_eq!(r.a("slow.example").await, Err(DnsError::Timeout));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Not a DNS name at all.
    assert!(matches!(r.a("a..b").await, Err(DnsError::Failure(_))));
}

#[tokio::test]
async fn truncated_udp_answers_are_retried_over_tcp() {
    // Eight 250-byte TXT records: well over the 1232 bytes the resolver offers over UDP.
    let mut records = Records::new()
        .a("forced.example", "192.0.2.7")
        .truncate_udp("forced.example");
    for i in 0..8 {
        records = records.txt("big.example", &format!("{i}{}", "x".repeat(249)));
    }
    let dns = TestDns::start(records).await;
    let r = dns.resolver();
    let txt = r.txt("big.example").await.unwrap();
    assert_eq!(txt.len(), 8);
    assert!(txt.iter().all(|t| t.len() == 250));
    assert_eq!(dns.tcp_queries(), 1);
    assert_eq!(
        r.a("forced.example").await.unwrap(),
        vec!["192.0.2.7".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(dns.tcp_queries(), 2);
    let over = |n: &str| dns.queries().iter().filter(|(q, _, tcp)| q == n && *tcp).count();
    assert_eq!((over("big.example"), over("forced.example")), (1, 1));
}

// ---------------------------------------------------------------------------------------
// Reverse DNS

#[tokio::test]
async fn reverse_dns_with_forward_confirmation() {
    let dns = TestDns::start(
        Records::new()
            // Confirmed.
            .ptr("192.0.2.1", "mail.example")
            .a("mail.example", "192.0.2.1")
            // The name resolves elsewhere.
            .ptr("192.0.2.2", "elsewhere.example")
            .a("elsewhere.example", "192.0.2.200")
            // The name does not exist.
            .ptr("192.0.2.3", "ghost.example")
            // Two names; the second confirms.
            .ptr("192.0.2.4", "first.example")
            .ptr("192.0.2.4", "second.example")
            .a("first.example", "192.0.2.44")
            .a("second.example", "192.0.2.4")
            // The reverse zone is broken.
            .servfail(&name_of("192.0.2.5"))
            // The forward zone does not answer.
            .ptr("192.0.2.6", "mute.example")
            .silent("mute.example")
            // A PTR "name" that is an address literal is not confirmed by itself.
            .ptr("192.0.2.7", "192.0.2.7")
            // IPv6, and an IPv4-mapped client address.
            .ptr("2001:db8::25", "v6.example")
            .aaaa("v6.example", "2001:db8::25"),
    )
    .await;
    let r = dns.resolver();
    let rev = |ip: &str| {
        let r = r.clone();
        let ip = ip.parse().unwrap();
        async move { r.reverse(ip).await }
    };
    assert_eq!(rev("192.0.2.1").await, Ptr::Confirmed("mail.example".into()));
    assert_eq!(
        rev("::ffff:192.0.2.1").await,
        Ptr::Confirmed("mail.example".into())
    );
    assert_eq!(
        rev("192.0.2.2").await,
        Ptr::Unconfirmed("elsewhere.example".into())
    );
    assert_eq!(rev("192.0.2.3").await, Ptr::Unconfirmed("ghost.example".into()));
    assert_eq!(rev("192.0.2.4").await, Ptr::Confirmed("second.example".into()));
    assert_eq!(rev("192.0.2.99").await, Ptr::None);
    assert!(matches!(rev("192.0.2.5").await, Ptr::Error(m) if m.contains("192.0.2.5")));
    assert!(matches!(rev("192.0.2.6").await, Ptr::Error(m) if m.contains("mute.example")));
    assert_eq!(rev("192.0.2.7").await, Ptr::Unconfirmed("192.0.2.7".into()));
    assert_eq!(rev("2001:db8::25").await, Ptr::Confirmed("v6.example".into()));
}

#[tokio::test]
async fn huge_answers_cost_bounded_work() {
    // 300 PTR names (about 9 KB, over TCP) for one address, and 240 TXT strings (60 KB).
    let mut records = Records::new();
    for i in 0..300 {
        records = records.ptr("192.0.2.50", &format!("host-{i:03}.many.example"));
    }
    for i in 0..240 {
        records = records.txt("fat.example", &format!("{i:03}{}", "t".repeat(247)));
    }
    let dns = TestDns::start(records).await;
    let r = dns.resolver();
    let started = Instant::now();
    let ptr = r.reverse("192.0.2.50".parse().unwrap()).await;
    // None of the names resolves: unconfirmed, after at most 10 forward lookups.
    assert!(
        matches!(&ptr, Ptr::Unconfirmed(n) if n.ends_with(".many.example")),
        "{ptr:?}"
    );
    let forward = dns
        .queries()
        .iter()
        .filter(|(q, _, _)| q.ends_with(".many.example"))
        .count();
    assert!(forward <= 2 * 10, "{forward} forward lookups for one client");
    let txt = r.txt("fat.example").await.unwrap();
    assert_eq!(txt.len(), 240);
    assert!(started.elapsed() < Duration::from_secs(5));
}

fn name_of(ip: &str) -> String {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    hickory_proto::rr::Name::from(ip).to_ascii()
}

// ---------------------------------------------------------------------------------------
// PTR check

#[tokio::test]
async fn ptr_check_verdicts() {
    let dns = TestDns::start(
        Records::new()
            .ptr("192.0.2.1", "mail.example.com")
            .a("mail.example.com", "192.0.2.1")
            .ptr("203.0.113.5", "c-203-0-113-5.hsd1.example.net")
            .a("c-203-0-113-5.hsd1.example.net", "203.0.113.5")
            .ptr("192.0.2.2", "mx.other.example")
            .ptr("192.0.2.3", "dsl-pool-7.isp.example")
            .servfail(&name_of("192.0.2.4")),
    )
    .await;
    let check = PtrCheck::build(&PtrConfig::default(), dns.resolver()).unwrap();
    assert_eq!(
        (check.name(), check.stages(), check.needs_io()),
        ("ptr", &[Stage::Connect][..], true)
    );

    let v = run(&check, "192.0.2.99").await.unwrap();
    assert!(matches!(v, Verdict::TempFail(_)), "{v:?}");
    assert_eq!(
        reply_of(&v),
        "450 4.7.25 Client host 192.0.2.99 has no PTR record"
    );
    if let Verdict::TempFail(r) = &v {
        assert_eq!(r.category, Category::Ptr);
    }
    assert_eq!(run(&check, "192.0.2.1").await.unwrap(), Verdict::Pass);
    let v = run(&check, "203.0.113.5").await.unwrap();
    assert!(
        matches!(v, Verdict::Score { points, .. } if points == 3.0),
        "{v:?}"
    );
    assert!(
        reply_of(&v).starts_with("550 5.7.1 Client host 203.0.113.5: PTR name c-203-0-113-5"),
        "{v:?}"
    );
    let v = run(&check, "192.0.2.2").await.unwrap();
    assert!(
        matches!(v, Verdict::Score { points, .. } if points == 2.0),
        "{v:?}"
    );
    assert!(
        reply_of(&v).contains("550 5.7.25") && reply_of(&v).contains("mx.other.example"),
        "{v:?}"
    );
    // Unconfirmed and dynamic: the scores add up.
    let v = run(&check, "192.0.2.3").await.unwrap();
    assert!(
        matches!(v, Verdict::Score { points, .. } if points == 5.0),
        "{v:?}"
    );
    // A DNS failure is the pipeline's `on_error` to decide, never a refusal by this check.
    let e = run(&check, "192.0.2.4").await.unwrap_err();
    assert!(e.0.contains("192.0.2.4"), "{e}");

    // Internal clients are not looked up at all.
    let before = dns.queries().len();
    assert_eq!(run(&check, "10.1.2.3").await.unwrap(), Verdict::Skip);
    assert_eq!(run(&check, "127.0.0.1").await.unwrap(), Verdict::Skip);
    assert_eq!(dns.queries().len(), before);

    let strict = PtrConfig {
        enabled: true,
        missing: Some(CheckAction::Reject),
        unconfirmed: None,
        ..Default::default()
    };
    let check = PtrCheck::build(&strict, dns.resolver()).unwrap();
    assert_eq!(
        reply_of(&run(&check, "192.0.2.99").await.unwrap()),
        "550 5.7.25 Client host 192.0.2.99 has no PTR record"
    );
    assert_eq!(run(&check, "192.0.2.2").await.unwrap(), Verdict::Pass);
}

#[tokio::test]
async fn ptr_is_looked_up_once_per_session() {
    let dns = TestDns::start(
        Records::new()
            .ptr("192.0.2.1", "mail.example")
            .a("mail.example", "192.0.2.1"),
    )
    .await;
    let check = PtrCheck::build(&PtrConfig::default(), dns.resolver()).unwrap();
    let facts = SessionFacts::default();
    assert_eq!(
        run_with(&check, "192.0.2.1", &facts).await.unwrap(),
        Verdict::Pass
    );
    assert_eq!(facts.ptr.get(), Some(&Ptr::Confirmed("mail.example".into())));
    let asked = dns.queries().len();
    assert_eq!(
        run_with(&check, "192.0.2.1", &facts).await.unwrap(),
        Verdict::Pass
    );
    assert_eq!(dns.queries().len(), asked);
    // A fact computed by someone else is used as it is.
    let facts = SessionFacts::default();
    facts.ptr.set(Ptr::None).unwrap();
    assert!(matches!(
        run_with(&check, "192.0.2.1", &facts).await.unwrap(),
        Verdict::TempFail(_)
    ));
    assert_eq!(dns.queries().len(), asked);
}

// ---------------------------------------------------------------------------------------
// DNSBL / DNSWL

/// RFC 5782 test entries for a zone that behaves.
fn testable(records: Records, zone: &str) -> Records {
    records.a(&format!("2.0.0.127.{zone}"), "127.0.0.2")
}

fn listing(records: Records, ip: &str, zone: &str, answer: &str) -> Records {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    records.a(&format!("{}.{zone}", thassp::policy::dnsbl::reversed(ip)), answer)
}

async fn dnsbl(dns: &TestDns, config: DnsblConfig) -> DnsblCheck {
    let check = DnsblCheck::build(&config, dns.resolver()).unwrap();
    check.self_test().await;
    check
}

fn zones(zones: &[&str]) -> DnsblConfig {
    DnsblConfig {
        zones: zones.iter().map(|z| z.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn dnsbl_weights_threshold_and_filters() {
    let mut r = Records::new();
    for zone in ["bl.example", "half.example", "half2.example", "f.example"] {
        r = testable(r, zone);
    }
    r = listing(r, "192.0.2.10", "bl.example", "127.0.0.2");
    r = listing(r, "192.0.2.11", "half.example", "127.0.0.2");
    r = listing(r, "192.0.2.12", "half.example", "127.0.0.2");
    r = listing(r, "192.0.2.12", "half2.example", "127.0.0.9");
    r = listing(r, "192.0.2.13", "f.example", "127.0.0.4");
    r = listing(r, "192.0.2.14", "f.example", "127.0.0.3");
    r = listing(r, "2001:db8::10", "bl.example", "127.0.0.2");
    let dns = TestDns::start(r).await;
    let config = zones(&[
        "bl.example*2",
        "half.example*0.5",
        "half2.example*0.5",
        "f.example=127.0.0.[2..3]*3",
    ]);
    let check = dnsbl(&dns, config.clone()).await;
    assert!(
        check.zone_status().iter().all(|z| z.enabled),
        "{:?}",
        check.zone_status()
    );
    assert_eq!((check.name(), check.needs_io()), ("dnsbl", true));

    let v = run(&check, "192.0.2.10").await.unwrap();
    assert_eq!(
        reply_of(&v),
        "554 5.7.1 Service unavailable; client [192.0.2.10] blocked using bl.example"
    );
    assert!(matches!(&v, Verdict::Reject(r) if r.category == Category::Dnsbl));
    // 0.5 alone stays under the threshold; two halves reach it.
    assert_eq!(run(&check, "192.0.2.11").await.unwrap(), Verdict::Pass);
    assert!(matches!(
        run(&check, "192.0.2.12").await.unwrap(),
        Verdict::Reject(_)
    ));
    // The filter decides which answers count.
    assert_eq!(run(&check, "192.0.2.13").await.unwrap(), Verdict::Pass);
    let v = run(&check, "192.0.2.14").await.unwrap();
    assert!(reply_of(&v).ends_with("blocked using f.example"), "{v:?}");
    assert_eq!(run(&check, "192.0.2.99").await.unwrap(), Verdict::Pass);
    // IPv6 clients are asked by reversed nibbles.
    assert!(matches!(
        run(&check, "2001:db8::10").await.unwrap(),
        Verdict::Reject(_)
    ));
    // Internal clients are never sent to third-party lists.
    let before = dns.queries().len();
    assert_eq!(run(&check, "10.0.0.5").await.unwrap(), Verdict::Skip);
    assert_eq!(dns.queries().len(), before);

    let check = dnsbl(
        &dns,
        DnsblConfig {
            action: CheckAction::TempFail,
            ..config.clone()
        },
    )
    .await;
    assert_eq!(
        reply_of(&run(&check, "192.0.2.10").await.unwrap()),
        "451 4.7.1 Service unavailable; client [192.0.2.10] blocked using bl.example"
    );
    let check = dnsbl(
        &dns,
        DnsblConfig {
            action: CheckAction::Score(4.0),
            threshold: 3.0,
            ..config
        },
    )
    .await;
    assert_eq!(run(&check, "192.0.2.10").await.unwrap(), Verdict::Pass);
    assert!(
        matches!(run(&check, "192.0.2.14").await.unwrap(), Verdict::Score { points, .. } if points == 4.0)
    );
}

#[tokio::test]
async fn dnswl_listing_exempts() {
    let mut r = testable(testable(Records::new(), "bl.example"), "wl.example");
    r = listing(r, "192.0.2.20", "wl.example", "127.0.10.2");
    r = listing(r, "192.0.2.21", "wl.example", "127.0.0.255");
    r = listing(r, "192.0.2.22", "wl.example", "127.0.10.1");
    r = listing(r, "192.0.2.22", "bl.example", "127.0.0.2");
    let dns = TestDns::start(r).await;
    let config = zones(&["bl.example*2", "wl.example=127.0.[0..255].[1..3]*-2"]);
    let check = dnsbl(&dns, config.clone()).await;
    assert_eq!(run(&check, "192.0.2.20").await.unwrap(), Verdict::Accept);
    // An answer outside the filter does not count.
    assert_eq!(run(&check, "192.0.2.21").await.unwrap(), Verdict::Pass);
    // Listed on both: 2 - 2 = 0, neither refused nor whitelisted.
    assert_eq!(run(&check, "192.0.2.22").await.unwrap(), Verdict::Pass);

    let check = dnsbl(
        &dns,
        DnsblConfig {
            whitelist_exempt: vec!["greylist".into(), "ptr".into()],
            ..config
        },
    )
    .await;
    let v = run(&check, "192.0.2.20").await.unwrap();
    assert!(
        matches!(&v, Verdict::Exempt(names) if names[..] == ["greylist".to_string(), "ptr".to_string()]),
        "{v:?}"
    );
}

#[tokio::test]
async fn failing_zones_count_as_not_listed() {
    let mut r = Records::new();
    for zone in [
        "bl.example",
        "refusing.example",
        "odd.example",
        "broken.example",
        "slow.example",
    ] {
        r = testable(r, zone);
    }
    // Every zone lists 192.0.2.30, but only bl.example answers properly.
    r = listing(r, "192.0.2.30", "bl.example", "127.0.0.2");
    r = listing(r, "192.0.2.30", "refusing.example", "127.255.255.254");
    r = listing(r, "192.0.2.30", "odd.example", "10.0.0.1");
    r = r
        .servfail("30.2.0.192.broken.example")
        .silent("30.2.0.192.slow.example");
    // Only the failing zones list 192.0.2.31.
    r = listing(r, "192.0.2.31", "refusing.example", "127.255.255.254");
    r = listing(r, "192.0.2.31", "odd.example", "10.0.0.1");
    r = r
        .servfail("31.2.0.192.broken.example")
        .silent("31.2.0.192.slow.example");
    let dns = TestDns::start(r).await;
    let check = dnsbl(
        &dns,
        zones(&[
            "bl.example*1",
            "refusing.example*5",
            "odd.example*5",
            "broken.example*5",
            "slow.example*5",
        ]),
    )
    .await;
    assert!(
        check.zone_status().iter().all(|z| z.enabled),
        "{:?}",
        check.zone_status()
    );

    let started = Instant::now();
    assert_eq!(run(&check, "192.0.2.31").await.unwrap(), Verdict::Pass);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let v = run(&check, "192.0.2.30").await.unwrap();
    assert!(reply_of(&v).ends_with("blocked using bl.example"), "{v:?}");
    let status = check.zone_status();
    let reason = |zone: &str| {
        status
            .iter()
            .find(|s| s.zone == zone)
            .unwrap()
            .reason
            .clone()
            .unwrap_or_default()
    };
    assert!(
        reason("refusing.example").contains("127.255.255.254"),
        "{status:?}"
    );
    assert!(reason("odd.example").contains("10.0.0.1"), "{status:?}");
    assert!(
        !reason("broken.example").is_empty() && !reason("slow.example").is_empty(),
        "{status:?}"
    );
    // Errors while in use do not disable a zone; only a failed self-test does.
    assert!(status.iter().all(|z| z.enabled));
}

#[tokio::test]
async fn self_test_decides_which_zones_are_used() {
    let mut r = testable(Records::new(), "good.example");
    // No 127.0.0.2 entry.
    r = r.a("1.2.3.4.empty.example", "127.0.0.2");
    // Lists everything, 127.0.0.1 included.
    r = testable(r, "all.example").a("1.0.0.127.all.example", "127.0.0.2");
    // Refuses our resolver (Spamhaus style).
    r = r.a("2.0.0.127.refusing.example", "127.255.255.254");
    // Does not answer at all.
    r = r.silent("*.dead.example");
    for zone in [
        "good.example",
        "empty.example",
        "all.example",
        "refusing.example",
        "dead.example",
    ] {
        r = listing(r, "192.0.2.40", zone, "127.0.0.2");
    }
    let dns = TestDns::start(r).await;
    let config = zones(&[
        "good.example",
        "empty.example",
        "all.example",
        "refusing.example",
        "dead.example",
    ]);
    let check = DnsblCheck::build(&config, dns.resolver()).unwrap();

    // Before the self-test nothing is used or asked.
    assert!(
        check
            .zone_status()
            .iter()
            .all(|z| !z.enabled && z.last_test.is_none())
    );
    assert_eq!(run(&check, "192.0.2.40").await.unwrap(), Verdict::Skip);
    assert!(dns.queries().is_empty());

    check.self_test().await;
    let status = check.zone_status();
    let of = |zone: &str| status.iter().find(|s| s.zone == zone).unwrap().clone();
    assert!(
        of("good.example").enabled && of("good.example").reason.is_none(),
        "{status:?}"
    );
    assert!(status.iter().all(|z| z.last_test.is_some()));
    for (zone, why) in [
        ("empty.example", "127.0.0.2 is not listed"),
        ("all.example", "127.0.0.1 is listed"),
        ("refusing.example", "127.255.255.254"),
        ("dead.example", "timed out"),
    ] {
        let s = of(zone);
        assert!(!s.enabled, "{s:?}");
        assert!(s.reason.as_deref().unwrap_or("").contains(why), "{zone}: {s:?}");
    }

    // Only the good zone is asked about clients.
    assert!(matches!(
        run(&check, "192.0.2.40").await.unwrap(),
        Verdict::Reject(_)
    ));
    for zone in ["empty.example", "all.example", "refusing.example", "dead.example"] {
        assert_eq!(dns.queried(&format!("40.2.0.192.{zone}")), 0, "{zone}");
    }
    assert!(dns.queried("40.2.0.192.good.example") >= 1);

    // A rebuilt check (reload) keeps the tested state.
    let rebuilt = DnsblCheck::build(&config, dns.resolver()).unwrap();
    rebuilt.adopt_status(&check);
    assert_eq!(rebuilt.zone_status(), check.zone_status());
    assert_eq!(rebuilt.self_test_interval(), Duration::from_secs(600));
}

#[test]
fn configs_are_checked_with_their_keys() {
    let bad = DnsblConfig {
        zones: vec!["zen.example=127.0.0.[9..2]".into()],
        ..Default::default()
    };
    let dns_resolver = || {
        Arc::new(
            thassp::dns::Resolver::new(&thassp::dns::DnsConfig {
                servers: vec!["127.0.0.1:9".parse().unwrap()],
                ..Default::default()
            })
            .unwrap(),
        )
    };
    let errors = DnsblCheck::build(&bad, dns_resolver()).unwrap_err();
    assert!(errors[0].starts_with("checks.dnsbl.zones[0]: "), "{errors:?}");
    let bad = PtrConfig {
        dynamic_patterns: vec!["[".into()],
        ..Default::default()
    };
    let errors = PtrCheck::build(&bad, dns_resolver()).unwrap_err();
    assert!(
        errors[0].starts_with("checks.ptr.dynamic_patterns[0]: "),
        "{errors:?}"
    );
}
