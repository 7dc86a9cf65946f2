//! Configuration text: `Config::from_toml` never panics; a loaded config writes out and loads again.
//! The invariants are in `fuzz/src/lib.rs` (shared with `tests/fuzz_corpus.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| thassp_fuzz::config(data));
