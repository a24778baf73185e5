//! Response scanning (SSE or JSON framing × every usage format): never panics, bounded carry,
//! and the same usage and model however the body is cut.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llm_meter::scan::body::{BodyFormat, ResponseScanner};
use llm_meter::scan::usage::UsageFormat;

mod common;

const FORMATS: [UsageFormat; 4] =
    [UsageFormat::OpenAiChat, UsageFormat::OpenAiResponses, UsageFormat::Anthropic, UsageFormat::Gemini];

fuzz_target!(|input: &[u8]| {
    let Some((&seed, body)) = input.split_first() else { return };
    let framing = if seed & 1 == 0 { BodyFormat::Json } else { BodyFormat::Sse };
    let format = FORMATS[usize::from(seed >> 1) % FORMATS.len()];
    let scan = |chunks: Vec<&[u8]>| {
        let mut r = ResponseScanner::new(framing, format);
        for chunk in chunks {
            r.feed(chunk);
            // Captures are capped (usage 16 KiB, model 1 KiB) plus a little parser state.
            assert!(r.carry_len() <= 18 * 1024, "carry {}", r.carry_len());
        }
        r.finish();
        (r.usage(), r.model().map(str::to_string))
    };
    assert_eq!(scan(vec![body]), scan(common::chunks(seed, body)));
});
