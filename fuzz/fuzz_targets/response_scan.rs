//! Response scanning (SSE or JSON framing × every usage format): never panics, bounded carry,
//! the same usage and model however the body is cut, and event templates change nothing: the
//! scanner finds, counts and marks exactly what one that scans every event in full does.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llm_meter::scan::body::{BodyFormat, ResponseScanner, Skips};
use llm_meter::scan::template::TEMPLATE_BYTES;
use llm_meter::scan::usage::{Usage, UsageFormat};

mod common;

const FORMATS: [UsageFormat; 4] =
    [UsageFormat::OpenAiChat, UsageFormat::OpenAiResponses, UsageFormat::Anthropic, UsageFormat::Gemini];

/// Everything a scan makes observable: usage, model, skips, and what each `feed` returned (the
/// first-data mark).
type Outcome = (Option<Usage>, Option<String>, Skips, Vec<bool>);

/// With seed bit 6, the body is a list of event data separated by NUL bytes, each sent three
/// times as an SSE event (`data: …` and a blank line): streams of repeated shapes, which is
/// where templates are recorded and matched, and where libFuzzer's edits of one copy make the
/// near-misses a template must not be fooled by.
fn stream_of(seed: u8, body: &[u8]) -> Vec<u8> {
    if seed & 0x40 == 0 {
        return body.to_vec();
    }
    let mut out = Vec::new();
    for data in body.split(|&b| b == 0) {
        for _ in 0..3 {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\n\n");
        }
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, body)) = input.split_first() else { return };
    let framing = if seed & 1 == 0 { BodyFormat::Json } else { BodyFormat::Sse };
    let format = FORMATS[usize::from(seed >> 1) % FORMATS.len()];
    let interrupted = seed & 0x80 != 0;
    let body = stream_of(seed, body);
    let scan = |templates: bool, chunks: &[&[u8]]| -> (Outcome, Vec<usize>) {
        let mut r = if templates {
            ResponseScanner::new(framing, format)
        } else {
            ResponseScanner::without_templates(framing, format)
        };
        let mut firsts = Vec::new();
        let mut carries = Vec::new();
        for chunk in chunks {
            firsts.push(r.feed(chunk));
            // Captures are capped (usage 16 KiB, model 1 KiB) plus a little parser state.
            assert!(r.carry_len() <= 18 * 1024, "carry {}", r.carry_len());
            assert!(r.template_len() <= TEMPLATE_BYTES, "template {}", r.template_len());
            carries.push(r.carry_len());
        }
        if interrupted {
            r.abandon();
        } else {
            r.finish();
        }
        ((r.usage(), r.model().map(str::to_string), *r.skips(), firsts), carries)
    };
    let whole: Vec<&[u8]> = vec![&body];
    let split = common::chunks(seed, &body);
    let (full, _) = scan(false, &whole);
    let (full_split, full_carries) = scan(false, &split);
    // However the body is cut, the same findings (the first-data mark is per chunk).
    assert_eq!((&full.0, &full.1, full.2), (&full_split.0, &full_split.1, full_split.2));
    // Templates change nothing, and hold no more parser state between chunks.
    assert_eq!(scan(true, &whole).0, full);
    let (fast_split, fast_carries) = scan(true, &split);
    assert_eq!(fast_split, full_split);
    for (fast, full) in fast_carries.iter().zip(&full_carries) {
        assert!(fast <= full, "carry {fast} > {full}");
    }
    // One event per chunk, as streams usually arrive.
    if framing == BodyFormat::Sse {
        let mut events = Vec::new();
        let mut at = 0;
        for i in 1..body.len() {
            if body.get(i - 1..=i) == Some(b"\n\n") {
                events.push(&body[at..=i]);
                at = i + 1;
            }
        }
        events.push(&body[at..]);
        assert_eq!(scan(true, &events).0, scan(false, &events).0);
    }
});
