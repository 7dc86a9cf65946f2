//! Envelope paths: `parse_path`; the relayed form `<raw>` parses to the same address.
//! The invariants are in `fuzz/src/lib.rs` (shared with `tests/fuzz_corpus.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| thassp_fuzz::address(data));
