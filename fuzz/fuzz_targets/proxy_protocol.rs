//! PROXY protocol v1/v2 headers: `parse` bounded and monotonic in the prefix.
//! The invariants are in `fuzz/src/lib.rs` (shared with `tests/fuzz_corpus.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| thassp_fuzz::proxy_protocol(data));
