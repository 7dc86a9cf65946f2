//! The fuzz corpus as a regression test, on the stable toolchain: every file under
//! `fuzz/corpus/<target>/` (the seeds) and `fuzz/artifacts/<target>/` (inputs that once broke an
//! invariant, kept once fixed) goes through the same function the fuzz target `<target>` calls,
//! with the same invariants: `fuzz/src/lib.rs` is included here as it is.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::path::{Path, PathBuf};

type Check = fn(&[u8]);

/// Every fuzz target and the invariants it checks.
const TARGETS: &[(&str, Check)] = &[
    ("command", checks::command),
    ("data", checks::data),
    ("reply", checks::reply),
    ("address", checks::address),
    ("proxy_protocol", checks::proxy_protocol),
    ("config", checks::config),
    ("mime", checks::mime),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files directly in `dir` (none when it does not exist), sorted for stable output.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Runs every seed and artifact of `target`; returns how many seeds there were.
fn replay(target: &str, check: Check) -> usize {
    let seeds = files(&fuzz_dir().join("corpus").join(target));
    let artifacts = files(&fuzz_dir().join("artifacts").join(target));
    let mut failed = Vec::new();
    for path in seeds.iter().chain(&artifacts) {
        let bytes = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| check(&bytes)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: invariants broken by {failed:#?}");
    seeds.len()
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let seeds = replay(stringify!($name), checks::$name);
                assert!(seeds > 0, "fuzz/corpus/{} has no seed", stringify!($name));
            }
        )*
    };
}

replay_tests!(command, data, reply, address, proxy_protocol, config, mime);

#[test]
fn every_fuzz_target_is_replayed() {
    let targets: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    assert!(!targets.is_empty());
    for t in &targets {
        assert!(
            TARGETS.iter().any(|(name, _)| name == t),
            "fuzz target {t} has no entry in TARGETS"
        );
    }
    assert_eq!(targets.len(), TARGETS.len(), "{targets:?}");
}
