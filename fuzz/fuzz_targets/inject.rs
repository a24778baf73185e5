//! `include_usage` injection: the request rewrite never panics and its output is JSON with
//! the option set; the usage-chunk stripper gives the same stream however it is cut.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llm_meter::scan::inject::{rewrite_request, UsageChunkStripper};

mod common;

fuzz_target!(|input: &[u8]| {
    let Some((&seed, body)) = input.split_first() else { return };
    if let Ok(out) = rewrite_request(body) {
        let v: serde_json::Value = serde_json::from_slice(&out).expect("the rewrite is JSON");
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
    let strip = |chunks: Vec<&[u8]>| {
        let mut s = UsageChunkStripper::default();
        let n = chunks.len();
        let mut out = Vec::new();
        for (i, chunk) in chunks.into_iter().enumerate() {
            out.extend(s.process(chunk, i + 1 == n));
        }
        out
    };
    assert_eq!(strip(vec![body]), strip(common::chunks(seed, body)));
});
