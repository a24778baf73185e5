//! Request scanning: never panics, and finds the same model, output cap and stream options
//! however the body is cut.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llm_meter::scan::body::RequestScanner;

mod common;

fuzz_target!(|input: &[u8]| {
    let Some((&seed, body)) = input.split_first() else { return };
    let scan = |chunks: Vec<&[u8]>| {
        let mut r = RequestScanner::default();
        for chunk in chunks {
            r.feed(chunk);
        }
        (r.model().map(str::to_string), r.max_output_tokens(), r.stream_lacks_usage(), *r.skips())
    };
    assert_eq!(scan(vec![body]), scan(common::chunks(seed, body)));
});
