//! Rate limit service answers: any bytes decode or fail, never panic; what decodes is within the
//! protocol's ranges.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llm_meter::rls::decode_response;

fuzz_target!(|input: &[u8]| {
    if let Ok(r) = decode_response(input) {
        assert!(r.statuses.len() <= input.len());
    }
});
