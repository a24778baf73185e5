//! Usage objects: the allocation-free reader (`scan::flat_json`) gives what serde_json gives,
//! error included, for every format and any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llm_meter::scan::usage::{
    parse_anthropic, parse_anthropic_with_serde, parse_usage, parse_usage_with_serde, UsageFormat,
};

fuzz_target!(|raw: &[u8]| {
    for format in [UsageFormat::OpenAiChat, UsageFormat::OpenAiResponses, UsageFormat::Anthropic, UsageFormat::Gemini] {
        assert_eq!(parse_usage(format, raw), parse_usage_with_serde(format, raw), "{format:?}");
    }
    assert_eq!(parse_anthropic(raw), parse_anthropic_with_serde(raw));
});
