//! Differential tests of event templates: a [`ResponseScanner`] that matches stream events with
//! templates finds, counts and marks exactly what one that scans every event in full does, for
//! every fixture at every split, and for random streams (real shapes, the cases templates must
//! not be fooled by, and random byte mutations of them) cut at random places, byte by byte and
//! one event per chunk.

use crate::scan::body::tests::{
    ANTHROPIC_COMPACTION_SSE, ANTHROPIC_SSE, CHAT_JSON, CHAT_SSE, GEMINI_SSE, RESPONSES_SSE,
};
use crate::scan::body::{BodyFormat, ResponseScanner, Skips};
use crate::scan::template::TEMPLATE_BYTES;
use crate::scan::test_rng::Rng;
use crate::scan::usage::{Usage, UsageFormat};

const FORMATS: [UsageFormat; 4] =
    [UsageFormat::OpenAiChat, UsageFormat::OpenAiResponses, UsageFormat::Anthropic, UsageFormat::Gemini];

/// Everything a scan makes observable.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    usage: Option<Usage>,
    model: Option<String>,
    skips: Skips,
    /// What each `feed` returned (the first-data mark).
    firsts: Vec<bool>,
    streaming: bool,
}

/// Scans `chunks` and ends the body (`finish`, or `abandon` if `interrupted`); returns what it
/// found, the carry after each chunk and how many events matched a template.
fn run(
    templates: bool,
    framing: BodyFormat,
    format: UsageFormat,
    chunks: &[&[u8]],
    interrupted: bool,
) -> (Outcome, Vec<usize>, u64) {
    let mut r = if templates {
        ResponseScanner::new(framing, format)
    } else {
        ResponseScanner::without_templates(framing, format)
    };
    let mut firsts = Vec::new();
    let mut carries = Vec::new();
    for chunk in chunks {
        firsts.push(r.feed(chunk));
        carries.push(r.carry_len());
        assert!(r.template_len() <= TEMPLATE_BYTES, "template {}", r.template_len());
    }
    if interrupted {
        r.abandon();
    } else {
        r.finish();
    }
    let outcome = Outcome {
        usage: r.usage(),
        model: r.model().map(str::to_string),
        skips: *r.skips(),
        firsts,
        streaming: r.is_streaming(),
    };
    (outcome, carries, r.events_matched())
}

/// Asserts that templates change nothing observable for `chunks`, and never hold more parser
/// state between chunks than the full scan; returns the events matched.
fn same(framing: BodyFormat, format: UsageFormat, chunks: &[&[u8]], interrupted: bool) -> u64 {
    let (full, full_carries, none) = run(false, framing, format, chunks, interrupted);
    assert_eq!(none, 0);
    let (fast, fast_carries, matched) = run(true, framing, format, chunks, interrupted);
    let body: Vec<u8> = chunks.concat();
    let show = || format!("{format:?} {framing:?} {:?} in {} chunks", String::from_utf8_lossy(&body), chunks.len());
    assert_eq!(fast, full, "{}", show());
    for (fast, full) in fast_carries.iter().zip(&full_carries) {
        assert!(fast <= full, "carry {fast} > {full}: {}", show());
    }
    matched
}

/// A stream cut in one chunk per event (after each blank line).
fn per_event(body: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    for i in 1..body.len() {
        if body.get(i - 1..=i) == Some(b"\n\n") {
            out.push(&body[at..=i]);
            at = i + 1;
        }
    }
    out.push(&body[at..]);
    out
}

/// Every fixture, and longer streams built from them (more events of the same shapes, so that
/// templates are used): whole, at every split, three ways, byte by byte, one event per chunk,
/// finished and interrupted.
#[test]
fn templates_change_nothing_for_every_fixture_and_split() {
    let chat_delta = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\\\"y\\\\\"}}],\"usage\":null}\n\n";
    let long_chat = format!(
        "{}{}{}",
        &CHAT_SSE[..CHAT_SSE
            .find("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],")
            .unwrap()],
        chat_delta.repeat(3),
        &CHAT_SSE[CHAT_SSE
            .find("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],")
            .unwrap()..],
    );
    let anthropic_delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"more \\\"text\\\"\"}}\n\n";
    let at = ANTHROPIC_SSE.find("event: content_block_stop").unwrap();
    let long_anthropic = format!("{}{}{}", &ANTHROPIC_SSE[..at], anthropic_delta.repeat(3), &ANTHROPIC_SSE[at..]);
    let responses_delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":17,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\" there\"}\n\n";
    let at = RESPONSES_SSE.find("event: response.completed").unwrap();
    let long_responses = format!("{}{}{}", &RESPONSES_SSE[..at], responses_delta.repeat(3), &RESPONSES_SSE[at..]);
    let fixtures: [(UsageFormat, &str); 9] = [
        (UsageFormat::OpenAiChat, CHAT_SSE),
        (UsageFormat::OpenAiChat, &long_chat),
        (UsageFormat::Anthropic, ANTHROPIC_SSE),
        (UsageFormat::Anthropic, &long_anthropic),
        (UsageFormat::Anthropic, ANTHROPIC_COMPACTION_SSE),
        (UsageFormat::OpenAiResponses, RESPONSES_SSE),
        (UsageFormat::OpenAiResponses, &long_responses),
        (UsageFormat::Gemini, GEMINI_SSE),
        (UsageFormat::OpenAiChat, CHAT_JSON),
    ];
    let mut matched = 0;
    for (format, body) in fixtures {
        let bytes = body.as_bytes();
        for framing in [BodyFormat::Sse, BodyFormat::Json] {
            for interrupted in [false, true] {
                matched += same(framing, format, &[bytes], interrupted);
                matched += same(framing, format, &per_event(bytes), interrupted);
                let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
                matched += same(framing, format, &one_by_one, interrupted);
            }
        }
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            matched += same(BodyFormat::Sse, format, &[a, b], false);
            // Three ways: a second cut at a few distances from the first.
            for d in [1, 7, 61] {
                let j = (i + d).min(bytes.len());
                matched += same(BodyFormat::Sse, format, &[&bytes[..i], &bytes[i..j], &bytes[j..]], i % 2 == 0);
            }
        }
    }
    assert!(matched > 10_000, "templates were used: {matched} events matched");
}

/// String values, as raw JSON: plain, empty, with escapes (a trailing backslash pair, escaped
/// quotes), usage and model keys written inside strings, brackets, unicode escapes.
const STRINGS: &[&str] = &[
    r#""hi""#,
    r#""""#,
    r#""Hello world, how are you""#,
    r#""a\\""#,
    r#""\\\"""#,
    r#""\"usage\":{\"prompt_tokens\":5}""#,
    r#""\"model\":\"other\"""#,
    r#""usage""#,
    r#""}]{[""#,
    r#""line\nbreak\ttab""#,
    r#""\u00e9\ud83d\ude00""#,
    r#""\u0022usage\u0022:1""#,
    r#""x\\\\""#,
    r#""日本語""#,
];

/// Numbers and literals: plain, negative, float, exponent, literals, a malformed one.
const SCALARS: &[&str] = &["0", "1", "12", "123456789", "-1", "1.5", "1e3", "null", "true", "false", "nul"];

/// Model values: the same name in two spellings (raw bytes differ, decoded equal), others, and
/// values that are not strings.
const MODELS: &[&str] = &[r#""gpt-4o""#, r#""gpt-4o""#, r#""gpt\u002d4o""#, r#""gpt-4o-mini""#, r#""m""#, "42", "null"];

/// Usage values: the `null` of every OpenAI chunk, real objects, invalid ones.
const USAGES: &[&str] = &[
    "null",
    "null",
    "null",
    r#"{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}"#,
    r#"{"input_tokens":25,"output_tokens":1}"#,
    r#"{"promptTokenCount":9,"candidatesTokenCount":3}"#,
    r#"{"prompt_tokens":-5}"#,
    "[1]",
    "{}",
];

/// Event shapes, with holes: `$S` a string, `$N` a scalar, `$M` a model, `$U` a usage value.
const SHAPES: &[&str] = &[
    r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":$N,"model":$M,"choices":[{"index":$N,"delta":{"content":$S},"logprobs":null,"finish_reason":null}],"usage":$U,"obfuscation":$S}"#,
    r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","model":$M,"choices":[{"index":0,"delta":{"tool_calls":[{"index":$N,"function":{"arguments":$S}}]}}],"usage":$U}"#,
    r#"{"type":"content_block_delta","index":$N,"delta":{"type":"text_delta","text":$S}}"#,
    r#"{"type":"message_start","message":{"id":"msg_1","model":$M,"content":[],"usage":$U}}"#,
    r#"{"type":"message_delta","delta":{"stop_reason":$S},"usage":$U}"#,
    r#"{"type":"response.output_text.delta","sequence_number":$N,"item_id":"msg_1","delta":$S,"logprobs":[]}"#,
    r#"{"type":"response.completed","response":{"model":$M,"output":[{"text":$S}],"usage":$U}}"#,
    r#"{"candidates":[{"content":{"parts":[{"text":$S}],"role":"model"}}],"usageMetadata":$U,"modelVersion":$M}"#,
    r#"{"a":{"model":$M,"usage":$U},"b":[{"model":$M}],"model":$M,"usage":$U}"#,
    r#"{"model" : $M , "usage" :$U,"x" : $S}"#,
    r#"{"us\u0061ge":$U,"m\u006fdel":$M,"x":$S}"#,
    r#"{"x":$S,"model":$M,"model":$M,"usage":$U}"#,
    r#"{"list":[$N,[$N,{"k":$S}],$S],"n":$N,"s":$S}"#,
    r#"{"n":$N}"#,
    r#"{"message":{"id" $S},"x":$S}"#,
    r#"{"response":{"a":$N,},"x":$S}"#,
    r#"{}"#,
    r#"[{"usage":$U,"model":$M}]"#,
    "[DONE]",
    " [DONE] ",
    "not json",
    r#""a string""#,
    "42",
    "\u{feff}{\"usage\":$U}",
    r#"{"a":$S} trailing"#,
];

/// One event's data: a shape with its holes filled.
fn fill(rng: &mut Rng, shape: &str) -> String {
    let mut out = String::new();
    let mut rest = shape;
    while let Some(p) = rest.find('$') {
        out.push_str(&rest[..p]);
        let hole = rest.as_bytes().get(p + 1).copied();
        out.push_str(match hole {
            Some(b'S') => rng.pick(STRINGS),
            Some(b'N') => rng.pick(SCALARS),
            Some(b'M') => rng.pick(MODELS),
            Some(b'U') => rng.pick(USAGES),
            _ => "$",
        });
        rest = &rest[(p + 2).min(rest.len())..];
    }
    out.push_str(rest);
    out
}

/// Changes a few bytes of an event's data: replaced by JSON's structural bytes or others,
/// removed, inserted, or the data cut short.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    const BYTES: &[u8] = b"\"\\{}[]:, 0a\n\r\xff";
    for _ in 0..1 + rng.below(3) {
        if data.is_empty() {
            return;
        }
        let at = rng.below(data.len());
        let b = BYTES[rng.below(BYTES.len())];
        match rng.below(4) {
            0 => data[at] = b,
            1 => {
                data.remove(at);
            }
            2 => data.insert(at, b),
            _ => data.truncate(at),
        }
    }
}

/// A random stream: runs of events of one shape (so templates are recorded and used), some
/// mutated, framed with LF or CRLF, some with `event:` lines, comments, data on several lines
/// or without the space, and maybe no blank line at the end.
fn random_stream(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let runs = 1 + rng.below(5);
    let crlf = rng.below(4) == 0;
    let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
    for _ in 0..runs {
        let shape = if rng.below(3) == 0 { SHAPES[rng.below(SHAPES.len())] } else { SHAPES[rng.below(3)] };
        for _ in 0..1 + rng.below(8) {
            let mut data = fill(rng, shape).into_bytes();
            if rng.below(6) == 0 {
                mutate(rng, &mut data);
            }
            if rng.below(8) == 0 {
                out.extend_from_slice(b"event: delta");
                out.extend_from_slice(eol);
            }
            if rng.below(12) == 0 {
                out.extend_from_slice(b": keep-alive");
                out.extend_from_slice(eol);
                out.extend_from_slice(eol);
            }
            // Data lines end at CR or LF: such bytes a mutation put in cut the data there.
            let lines: Vec<&[u8]> = if rng.below(10) == 0 && data.len() > 2 {
                let cut = rng.below(data.len());
                vec![&data[..cut], &data[cut..]]
            } else {
                vec![&data[..]]
            };
            for line in lines {
                out.extend_from_slice(if rng.below(10) == 0 { b"data:" } else { b"data: " });
                out.extend_from_slice(line);
                out.extend_from_slice(eol);
            }
            out.extend_from_slice(eol);
        }
    }
    if rng.below(4) == 0 {
        out.extend_from_slice(b"data: [DONE]");
        out.extend_from_slice(eol);
        out.extend_from_slice(eol);
    }
    if rng.below(5) == 0 {
        // No blank line after the last event, or a cut inside it.
        let keep = out.len() - rng.below(40.min(out.len()));
        out.truncate(keep);
    }
    out
}

/// Random cuts of `body`: 1 to 6 chunks.
fn random_chunks<'a>(rng: &mut Rng, body: &'a [u8]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = (0..rng.below(6)).map(|_| rng.below(body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for cut in cuts {
        out.push(&body[at..cut]);
        at = cut;
    }
    out.push(&body[at..]);
    out
}

#[test]
fn templates_change_nothing_for_random_and_mutated_streams() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut matched = 0;
    for k in 0..3000 {
        let body = random_stream(&mut rng);
        let format = FORMATS[rng.below(FORMATS.len())];
        let interrupted = rng.below(4) == 0;
        matched += same(BodyFormat::Sse, format, &[&body], interrupted);
        matched += same(BodyFormat::Sse, format, &per_event(&body), interrupted);
        for _ in 0..3 {
            let chunks = random_chunks(&mut rng, &body);
            matched += same(BodyFormat::Sse, format, &chunks, interrupted);
        }
        if k % 10 == 0 {
            let one_by_one: Vec<&[u8]> = body.chunks(1).collect();
            matched += same(BodyFormat::Sse, format, &one_by_one, interrupted);
            same(BodyFormat::Json, format, &[&body], interrupted);
        }
    }
    assert!(matched > 10_000, "templates were used: {matched} events matched");
}

/// The shapes templates must not be fooled by, each after a run of events that recorded a
/// template they differ from in one place only.
#[test]
fn templates_fall_back_on_every_difference_that_matters() {
    let base = r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1}"#;
    let variants = [
        // The usage of the stream.
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":4},"n":1}"#,
        // Another model, another spelling of the same one, a model that is not a string.
        r#"{"id":"c","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1}"#,
        r#"{"id":"c","model":"gpt\u002d4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1}"#,
        r#"{"id":"c","model":7,"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1}"#,
        // A key where the template has another, written with escapes, or added in a string.
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"usage":{"prompt_tokens":1}}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"\u006e":1}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1,"usage":{"prompt_tokens":1}}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi\"}}],\"usage\":{\"prompt_tokens\":1}}"}}],"usage":null,"n":1}"#,
        r#"{"id":"c\",\"usage\":{\"prompt_tokens\":1},\"x\":\"","model":"gpt-4o","choices":[],"usage":null,"n":1}"#,
        // A string that ends early and lets a key out, one that never ends, an escape at the end.
        r#"{"id":"c","usage":{"prompt_tokens":2},"x":"","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi}}],"usage":null,"n":1}"#,
        r#"{"id":"c\"#,
        // Broken structure where the template has a value, brackets, a number or a delimiter.
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}}],"usage":null,"n":1}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}],"usage":null,"n":1}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0 1,"delta":{"content":"hi"}}],"usage":null,"n":1}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1 2}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":"1"}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":12345}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1}x"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"n":1,}"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null,"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":nul"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi\"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":12"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"inde"#,
        r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}]"#,
        r#"{"id":"c"#,
        "{",
        "[DONE]",
        "",
    ];
    for variant in variants {
        for eol in ["\n", "\r\n"] {
            let event = |data: &str| format!("data: {data}{eol}{eol}");
            let body = format!("{}{}{}{}{}", event(base), event(base), event(base), event(variant), event(base));
            let bytes = body.as_bytes();
            for format in FORMATS {
                let matched = same(BodyFormat::Sse, format, &[bytes], false);
                assert!(matched >= 1, "{variant}: a template was used");
                for i in 0..=bytes.len() {
                    let (a, b) = bytes.split_at(i);
                    same(BodyFormat::Sse, format, &[a, b], false);
                    same(BodyFormat::Sse, format, &[a, b], true);
                }
                // And as the stream's last event, finished or cut.
                let body = format!("{}{}data: {variant}", event(base), event(base));
                for interrupted in [false, true] {
                    same(BodyFormat::Sse, format, &[body.as_bytes()], interrupted);
                }
            }
        }
    }
}

/// Only events the scanner read whole become templates: an object on a path is parsed (and found
/// malformed) where the template's reading only counts brackets, so a malformed event of a shape
/// that would otherwise qualify is scanned, and counted, every time.
#[test]
fn malformed_events_never_become_templates() {
    for (format, data) in [
        (UsageFormat::Anthropic, r#"{"type":"x","message":{"id" 1}}"#),
        (UsageFormat::Anthropic, r#"{"message":{"a":1,},"usage":null}"#),
        (UsageFormat::OpenAiResponses, r#"{"response":{"usage":}}"#),
        (UsageFormat::OpenAiResponses, r#"{"response":{"a":1 "b":2}}"#),
    ] {
        let body = format!(
            "data: {data}

"
        )
        .repeat(4);
        let (outcome, _, matched) = run(true, BodyFormat::Sse, format, &[body.as_bytes()], false);
        assert_eq!((outcome.skips.count(crate::scan::body::Skip::BodyMalformed), matched), (4, 0), "{data}");
        same(BodyFormat::Sse, format, &per_event(body.as_bytes()), false);
    }
}

/// Events that match skip the scan; the rest, and what they find, are as before.
#[test]
fn a_stream_of_one_shape_is_matched_after_its_first_events() {
    let mut body = String::from("data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n");
    for k in 0..100 {
        body.push_str(&format!("data: {{\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{k} \\\"q\\\" \\\\\"}}}}],\"usage\":null,\"obfuscation\":\"{}\"}}\n\n", "z".repeat(k % 7)));
    }
    body.push_str("data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":100}}\n\ndata: [DONE]\n\n");
    let chunks = per_event(body.as_bytes());
    // The first event sets the model and the second becomes the template: 99 match.
    assert_eq!(same(BodyFormat::Sse, UsageFormat::OpenAiChat, &chunks, false), 99);
    let (outcome, _, _) = run(true, BodyFormat::Sse, UsageFormat::OpenAiChat, &chunks, false);
    assert_eq!(outcome.usage, Some(Usage { input: 7, output: 100, ..Usage::default() }));
    assert_eq!(outcome.model.as_deref(), Some("gpt-4o"));
    assert_eq!(outcome.skips, Skips::default());
    assert_eq!(outcome.firsts.iter().filter(|&&f| f).count(), 1);
    // Split anywhere, the same.
    for i in (0..body.len()).step_by(7) {
        let (a, b) = body.as_bytes().split_at(i);
        assert!(same(BodyFormat::Sse, UsageFormat::OpenAiChat, &[a, b], false) >= 98);
    }
}

/// A template is recorded for the model of its time only: an event that repeats an older model
/// after the model changed is scanned (and changes it back).
#[test]
fn a_model_change_retires_the_template() {
    let event = |model: &str, text: &str| {
        format!(
            "data: {{\"model\":\"{model}\",\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}\n\n"
        )
    };
    let body =
        [event("a", "1"), event("a", "2"), event("a", "3"), event("b", "4"), event("a", "5"), event("a", "6")].concat();
    let chunks = per_event(body.as_bytes());
    let (outcome, _, matched) = run(true, BodyFormat::Sse, UsageFormat::OpenAiChat, &chunks, false);
    assert_eq!(outcome.model.as_deref(), Some("a"));
    assert_eq!(matched, 1, "only the third event matches: the template of model a is retired when b comes");
    same(BodyFormat::Sse, UsageFormat::OpenAiChat, &chunks, false);
}

/// Events far longer than a template are scanned in full, and nothing of them is kept.
#[test]
fn long_events_are_scanned_and_not_kept() {
    let long = format!("data: {{\"model\":\"m\",\"x\":\"{}\",\"usage\":null}}\n\n", "y".repeat(4 * TEMPLATE_BYTES));
    let body =
        [long.as_str(), &long, &long, "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n"].concat();
    for chunks in [vec![body.as_bytes()], body.as_bytes().chunks(100).collect()] {
        assert_eq!(same(BodyFormat::Sse, UsageFormat::OpenAiChat, &chunks, false), 0);
    }
    // A long string in a matched event is skimmed, however it is cut.
    let short = "data: {\"model\":\"m\",\"x\":\"y\",\"usage\":null}\n\n";
    let body = [short, short, &long, short].concat();
    for chunks in [vec![body.as_bytes()], body.as_bytes().chunks(100).collect()] {
        assert_eq!(same(BodyFormat::Sse, UsageFormat::OpenAiChat, &chunks, false), 2);
    }
}
