//! DATA framing: `DataReader` whole vs split, no bare CR/LF out, re-stuffing round trip.
//! The invariants are in `fuzz/src/lib.rs` (shared with `tests/fuzz_corpus.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| thassp_fuzz::data(data));
