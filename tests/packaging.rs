//! `dist/` and `docs/`: the systemd unit and its sysusers file, and the deployment guide.
//! The unit is parsed here (every key the guide promises is there, with the value it
//! promises), and, where `systemd-analyze` exists, checked by systemd itself: `verify`
//! (syntax, unknown keys, executables) and the offline `security` score; no systemd needs to
//! be running. The guide must show every configuration file verbatim, and hold no TOML that
//! is not such a file (tests/configs.rs validates every `.toml` under `docs/`); the HAProxy
//! file is checked by `haproxy -c` where HAProxy is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

const SYSTEMD_ANALYZE: &str = "/usr/bin/systemd-analyze";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `(section, key, value)` for every assignment, in order (keys may repeat).
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "line {}: continuation lines are not used",
            n + 1
        );
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not KEY=VALUE: {line}", n + 1));
        assert!(
            !section.is_empty(),
            "line {}: assignment outside a section",
            n + 1
        );
        out.push((section.clone(), key.trim().to_string(), value.trim().to_string()));
    }
    out
}

fn values<'a>(unit: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    unit.iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

#[test]
fn unit_has_the_promised_settings() {
    let text = std::fs::read_to_string(repo("dist/thassp.service")).unwrap();
    let unit = parse_unit(&text);
    let one = |key: &str| -> &str {
        let v = values(&unit, "Service", key);
        assert_eq!(v.len(), 1, "[Service] {key}: expected once, found {v:?}");
        v[0]
    };
    // thassp does not speak sd_notify.
    assert_eq!(one("Type"), "simple");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/thassp run --config /etc/thassp/thassp.toml"
    );
    assert_eq!(
        one("ExecStartPre"),
        "/usr/local/bin/thassp check-config /etc/thassp/thassp.toml"
    );
    assert_eq!(
        values(&unit, "Service", "ExecReload"),
        [
            "/usr/local/bin/thassp check-config /etc/thassp/thassp.toml",
            "/bin/kill -HUP $MAINPID"
        ]
    );
    assert_eq!(one("User"), "thassp");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("StateDirectory", "thassp"),
        ("ConfigurationDirectory", "thassp"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ] {
        assert_eq!(one(key), value, "[Service] {key}");
    }
    assert!(values(&unit, "Service", "SystemCallFilter").contains(&"@system-service"));
    // Enough descriptors for the default max_connections (two per session).
    let nofile: u64 = one("LimitNOFILE").parse().unwrap();
    assert!(nofile >= 2 * 5000 + 1024, "LimitNOFILE={nofile}");
    // systemd must not kill thassp before its own drain (server.shutdown_grace, 30s by
    // default) is over.
    let stop = one("TimeoutStopSec");
    let secs: u64 = stop.strip_suffix('s').unwrap_or(stop).parse().unwrap();
    let grace = thassp::config::Config::from_toml(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[upstream.mta]\naddress = \"127.0.0.1:10025\"\n\
         [domains]\nlocal = [\"example.com\"]\n",
        "default",
    )
    .unwrap()
    .server
    .shutdown_grace;
    assert!(
        secs > grace.as_secs() + 5,
        "TimeoutStopSec={stop} vs shutdown_grace {grace:?}"
    );
    assert_eq!(values(&unit, "Install", "WantedBy"), ["multi-user.target"]);

    // The user the unit runs as is the one the sysusers file creates.
    let sysusers = std::fs::read_to_string(repo("dist/thassp.sysusers")).unwrap();
    let line = sysusers
        .lines()
        .find(|l| l.starts_with("u "))
        .expect("a `u` line");
    assert_eq!(line.split_whitespace().nth(1), Some("thassp"), "{line}");
}

/// The unit with `/usr/local/bin/thassp` replaced by the binary cargo built (verify checks
/// that executables exist), in a folder of its own.
fn unit_for_analysis() -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(repo("dist/thassp.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thassp.service");
    std::fs::write(
        &path,
        text.replace("/usr/local/bin/thassp", env!("CARGO_BIN_EXE_thassp")),
    )
    .unwrap();
    (dir, path)
}

fn systemd_analyze_available() -> bool {
    if Path::new(SYSTEMD_ANALYZE).exists() {
        return true;
    }
    println!("skipped: systemd-analyze not installed (Debian package systemd)");
    false
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    if !systemd_analyze_available() {
        return;
    }
    let (_dir, path) = unit_for_analysis();
    let out = Command::new(SYSTEMD_ANALYZE)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on an unknown or misspelt key and only warns: any output is a failure.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn systemd_rates_the_unit_well_hardened() {
    if !systemd_analyze_available() {
        return;
    }
    let (_dir, path) = unit_for_analysis();
    // --threshold is the exposure × 10: fail above 2.0 of 10 ("OK" goes up to 4.9; an
    // unhardened unit scores 9.6). The unit scores 1.4 with systemd 252.
    let out = Command::new(SYSTEMD_ANALYZE)
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files the deployment guide shows, each in full.
fn guide_files() -> Vec<PathBuf> {
    let mut files = vec![
        repo("dist/thassp.service"),
        repo("dist/thassp.sysusers"),
        repo("docs/postfix/master.cf"),
        repo("docs/exim/thassp.conf"),
        repo("docs/haproxy/haproxy.cfg"),
    ];
    let mut examples: Vec<PathBuf> = std::fs::read_dir(repo("docs/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 5, "{examples:?}");
    files.extend(examples);
    files
}

/// The fenced code blocks of a Markdown text: (info string, body).
fn code_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut body = String::new();
        for l in lines.by_ref() {
            if l.trim_start() == "```" {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        blocks.push((info.trim().to_string(), body));
    }
    blocks
}

#[test]
fn the_guide_shows_every_configuration_file_verbatim() {
    let guide = std::fs::read_to_string(repo("docs/deployment.md")).unwrap();
    let blocks = code_blocks(&guide);
    let files = guide_files();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            blocks.iter().any(|(_, body)| *body == text),
            "docs/deployment.md does not show {} verbatim",
            f.display()
        );
    }
    // Every TOML block is one of the validated files: no hand-written snippet can drift.
    for (info, body) in blocks.iter().filter(|(info, _)| info == "toml") {
        assert!(
            files.iter().any(|f| std::fs::read_to_string(f).unwrap() == *body),
            "a ```{info} block in docs/deployment.md is not a file under docs/examples:\n{body}"
        );
    }
    // The README links the guide.
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    assert!(
        readme.contains("docs/deployment.md"),
        "README.md does not link the guide"
    );
}

#[test]
fn haproxy_accepts_the_guides_configuration() {
    let haproxy = Path::new("/usr/sbin/haproxy");
    if !haproxy.exists() {
        println!("skipped: haproxy not installed (Debian package haproxy)");
        return;
    }
    let out = Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(repo("docs/haproxy/haproxy.cfg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "haproxy -c ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
