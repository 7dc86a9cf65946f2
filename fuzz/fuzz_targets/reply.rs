//! Upstream replies: `ReplyParser` whole vs split, bounded, relayed form parses back.
//! The invariants are in `fuzz/src/lib.rs` (shared with `tests/fuzz_corpus.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| thassp_fuzz::reply(data));
