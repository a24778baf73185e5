//! Tests of [`super`]: every API's fixtures, every split position, against a full parse.

use super::*;

pub(crate) const CHAT_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-2024-08-06",
"choices":[{"index":0,"message":{"role":"assistant","content":"{\"usage\":{\"prompt_tokens\":999}}","refusal":null},"finish_reason":"stop"}],
"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":2,"audio_tokens":0}},
"system_fingerprint":"fp_1"}"#;

pub(crate) const CHAT_SSE: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"usage\\\": {\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

fn scan(format: BodyFormat, chunks: &[&[u8]]) -> (Option<Usage>, Option<String>, Skips, usize) {
    let mut r = ResponseScanner::new(format, UsageFormat::OpenAiChat);
    let mut firsts = 0;
    for c in chunks {
        firsts += usize::from(r.feed(c));
    }
    r.finish();
    (r.usage(), r.model().map(str::to_string), *r.skips(), firsts)
}

pub(crate) const ANTHROPIC_SSE: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2000,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"\\\"usage\\\": {\\\"output_tokens\\\": 999}\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

pub(crate) const RESPONSES_SSE: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"created_at\":1741290958,\"status\":\"in_progress\",\"model\":\"gpt-4.1-2025-04-14\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi \\\"usage\\\"\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-4.1-2025-04-14\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\",\"annotations\":[]}]}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":12},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":4},\"total_tokens\":48}}}\n\n",
    );

pub(crate) const GEMINI_SSE: &str = concat!(
        "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hel\"}],\"role\":\"model\"},\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":1,\"totalTokenCount\":10},\"modelVersion\":\"gemini-2.5-flash\",\"responseId\":\"r1\"}\r\n\r\n",
        "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"lo\"}],\"role\":\"model\"},\"finishReason\":\"STOP\",\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":12,\"thoughtsTokenCount\":30,\"cachedContentTokenCount\":4,\"totalTokenCount\":51},\"modelVersion\":\"gemini-2.5-flash\",\"responseId\":\"r1\"}\r\n\r\n",
    );

/// A claude-sonnet-4-6 stream with server-side context compaction, in the provider's shape:
/// the summarisation step read 100 input + 55,096 cache-read tokens and wrote 83; the
/// answer step read 181 and wrote 8. The top-level usage covers only the answer step.
pub(crate) const ANTHROPIC_COMPACTION_SSE: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-6\",\"id\":\"msg_01C\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":181,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"cache_creation\":{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":0},\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"compaction\",\"content\":null}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"compaction_delta\",\"content\":\"Summary: \\\"usage\\\":{\\\"input_tokens\\\":9}\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Done.\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":181,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":8,\"iterations\":[{\"type\":\"compaction\",\"input_tokens\":100,\"output_tokens\":83,\"cache_read_input_tokens\":55096,\"cache_creation_input_tokens\":0},{\"type\":\"message\",\"input_tokens\":181,\"output_tokens\":8,\"cache_read_input_tokens\":0,\"cache_creation_input_tokens\":0}]},\"context_management\":{\"applied_edits\":[]}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

/// The same exchange as one Messages response.
pub(crate) const ANTHROPIC_COMPACTION_JSON: &str = r#"{"model":"claude-sonnet-4-6","id":"msg_01C","type":"message","role":"assistant","content":[{"type":"compaction","content":"Summary: \"usage\":{\"input_tokens\":9}"},{"type":"text","text":"Done."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":181,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":8,"iterations":[{"type":"compaction","input_tokens":100,"output_tokens":83,"cache_read_input_tokens":55096,"cache_creation_input_tokens":0},{"type":"message","input_tokens":181,"output_tokens":8,"cache_read_input_tokens":0,"cache_creation_input_tokens":0}],"service_tier":"standard"}}"#;

/// What [`ANTHROPIC_COMPACTION_SSE`] and [`ANTHROPIC_COMPACTION_JSON`] used: both steps.
pub(crate) const ANTHROPIC_COMPACTION_USAGE: Usage =
    Usage { input: 100 + 55_096 + 181, output: 83 + 8, cached_input: 55_096, reasoning: 0, cache_creation_input: 0 };

#[test]
fn anthropic_compaction_counts_every_iteration_at_every_split() {
    for (framing, body) in [(BodyFormat::Sse, ANTHROPIC_COMPACTION_SSE), (BodyFormat::Json, ANTHROPIC_COMPACTION_JSON)]
    {
        let bytes = body.as_bytes();
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            let mut r = ResponseScanner::new(framing, UsageFormat::Anthropic);
            r.feed(a);
            r.feed(b);
            r.finish();
            assert_eq!(r.usage(), Some(ANTHROPIC_COMPACTION_USAGE), "{framing:?} split at {i}");
            assert_eq!(r.model(), Some("claude-sonnet-4-6"));
            assert_eq!(*r.skips(), Skips::default(), "{framing:?} split at {i}");
        }
    }
}

#[test]
fn sse_events_that_are_not_json_objects_are_malformed_at_every_split() {
    // Three events whose data is no JSON object; `[DONE]` (with or without padding), comments,
    // data-less and empty events are not documents and do not count.
    let body = concat!(
        ": keep-alive\n\n",
        "data: hello\n\n",
        "event: ping\n\n",
        "data: 42\n\n",
        "data:\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\r\n\r\n",
        "data: \"a string\"\n\n",
        "data:  [DONE] \n\n",
        "data: [DONE]\n\n",
    );
    let want = Some(Usage { input: 7, output: 2, ..Usage::default() });
    let bytes = body.as_bytes();
    for i in 0..=bytes.len() {
        let (a, b) = bytes.split_at(i);
        let (usage, _, skips, _) = scan(BodyFormat::Sse, &[a, b]);
        assert_eq!(usage, want, "split at {i}");
        assert_eq!(skips.count(Skip::BodyMalformed), 3, "split at {i}");
    }
    let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(scan(BodyFormat::Sse, &one_by_one).2.count(Skip::BodyMalformed), 3);
    // A sentinel-like prefix is not the sentinel; a stream ending on `[DONE]` unterminated is.
    assert_eq!(scan(BodyFormat::Sse, &[b"data: [DONE]x\n\n"]).2.count(Skip::BodyMalformed), 1);
    assert_eq!(scan(BodyFormat::Sse, &[b"data: [DONE]"]).2.count(Skip::BodyMalformed), 0);
    // The last, cut event of an interrupted stream is a failed request, not a bad body.
    let mut r = ResponseScanner::new(BodyFormat::Sse, UsageFormat::OpenAiChat);
    r.feed(b"data: {\"choices\":[]}\n\ndata: [DO");
    r.abandon();
    assert_eq!(r.skips().count(Skip::BodyMalformed), 0);
}

#[test]
fn implausible_counts_are_invalid_usage_not_numbers() {
    for big in ["9007199254740992", "9223372036854775808", "18446744073709551615", "1000000001"] {
        let body = format!(r#"{{"model":"m","usage":{{"prompt_tokens":{big},"completion_tokens":1}}}}"#);
        let (u, _, s, _) = scan(BodyFormat::Json, &[body.as_bytes()]);
        assert_eq!((u, s.count(Skip::UsageInvalid)), (None, 1), "{big}");
    }
    let body = r#"{"usage":{"prompt_tokens":1000000000,"completion_tokens":1000000000}}"#;
    let (u, _, s, _) = scan(BodyFormat::Json, &[body.as_bytes()]);
    assert_eq!(u.map(|u| (u.input, u.output)), Some((1_000_000_000, 1_000_000_000)), "the bound itself is fine");
    assert_eq!(s, Skips::default());
    // A stream whose last usage is implausible keeps nothing of it (the earlier usage stands).
    let sse = "data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: {\"usage\":{\"prompt_tokens\":18446744073709551615}}\n\n";
    let (u, _, s, _) = scan(BodyFormat::Sse, &[sse.as_bytes()]);
    assert_eq!((u.map(|u| u.input), s.count(Skip::UsageInvalid)), (Some(3), 1));
    // Anthropic parts within the bound whose normalised input (cache counts added) is not.
    let mut r = ResponseScanner::new(BodyFormat::Json, UsageFormat::Anthropic);
    r.feed(br#"{"usage":{"input_tokens":600000000,"cache_read_input_tokens":600000000,"output_tokens":1}}"#);
    r.finish();
    assert_eq!((r.usage(), r.skips().count(Skip::UsageInvalid)), (None, 1));
    // So is a sum of iterations.
    let mut r = ResponseScanner::new(BodyFormat::Json, UsageFormat::Anthropic);
    r.feed(br#"{"usage":{"input_tokens":1,"output_tokens":1,"iterations":[{"output_tokens":600000000},{"output_tokens":600000000}]}}"#);
    r.finish();
    assert_eq!((r.usage(), r.skips().count(Skip::UsageInvalid)), (None, 1));
}

fn scan_format(usage_format: UsageFormat, body: &str) {
    let want = match usage_format {
        UsageFormat::Anthropic => (
            Usage { input: 2125, output: 15, cached_input: 2000, reasoning: 0, cache_creation_input: 100 },
            "claude-sonnet-4-5",
        ),
        UsageFormat::OpenAiResponses => (
            Usage { input: 37, output: 11, cached_input: 12, reasoning: 4, cache_creation_input: 0 },
            "gpt-4.1-2025-04-14",
        ),
        UsageFormat::Gemini => (
            Usage { input: 9, output: 42, cached_input: 4, reasoning: 30, cache_creation_input: 0 },
            "gemini-2.5-flash",
        ),
        UsageFormat::OpenAiChat => unreachable!(),
    };
    let body = body.as_bytes();
    for i in 0..=body.len() {
        let (a, b) = body.split_at(i);
        let mut r = ResponseScanner::new(BodyFormat::Sse, usage_format);
        let firsts = usize::from(r.feed(a)) + usize::from(r.feed(b));
        r.finish();
        assert_eq!(r.usage(), Some(want.0), "{usage_format:?} split at {i}");
        assert_eq!(r.model(), Some(want.1), "{usage_format:?} split at {i}");
        assert_eq!(*r.skips(), Skips::default());
        assert_eq!(firsts, 1);
    }
    // Byte by byte, too.
    let mut r = ResponseScanner::new(BodyFormat::Sse, usage_format);
    for b in body {
        r.feed(std::slice::from_ref(b));
    }
    r.finish();
    assert_eq!(r.usage(), Some(want.0));
}

/// What a full parse finds: every document (the JSON body, each element of a top-level
/// array, or each SSE event's data) parsed whole with serde_json, the format's paths looked up
/// in it, the last usage winning (Anthropic: merged) and the last model string.
fn full_parse(framing: BodyFormat, format: UsageFormat, body: &str) -> (Option<Usage>, Option<String>) {
    let docs: Vec<serde_json::Value> = match framing {
        BodyFormat::Json => match serde_json::from_str(body).unwrap() {
            serde_json::Value::Array(items) => items,
            doc => vec![doc],
        },
        BodyFormat::Sse => body
            .replace("\r\n", "\n")
            .split("\n\n")
            .filter_map(|event| {
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                serde_json::from_str(&data.join("\n")).ok()
            })
            .collect(),
    };
    let (mut usage, mut anthropic, mut model) = (None, None::<AnthropicUsage>, None);
    for doc in &docs {
        for (i, path) in response_paths(format).iter().enumerate() {
            let value = path.iter().fold(doc, |v, k| &v[*k]);
            if value.is_null() {
                continue;
            }
            let raw = serde_json::to_vec(value).unwrap();
            if !is_usage_path(i) {
                model = value.as_str().map(str::to_string);
            } else if format == UsageFormat::Anthropic {
                if let Ok(Some(part)) = parse_anthropic(&raw) {
                    let merged = anthropic.get_or_insert_with(AnthropicUsage::default);
                    merged.merge(part);
                    usage = Some(merged.to_usage());
                }
            } else if let Ok(Some(u)) = parse_usage(format, &raw) {
                usage = Some(u);
            }
        }
    }
    (usage, model)
}

#[test]
fn the_streaming_scan_equals_a_full_parse_for_every_fixture_and_split() {
    let fixtures: [(BodyFormat, UsageFormat, &str); 11] = [
        (BodyFormat::Sse, UsageFormat::Anthropic, ANTHROPIC_COMPACTION_SSE),
        (BodyFormat::Json, UsageFormat::Anthropic, ANTHROPIC_COMPACTION_JSON),
        (BodyFormat::Json, UsageFormat::OpenAiChat, CHAT_JSON),
        (BodyFormat::Sse, UsageFormat::OpenAiChat, CHAT_SSE),
        (BodyFormat::Sse, UsageFormat::Anthropic, ANTHROPIC_SSE),
        (BodyFormat::Sse, UsageFormat::OpenAiResponses, RESPONSES_SSE),
        (BodyFormat::Sse, UsageFormat::Gemini, GEMINI_SSE),
        (
            BodyFormat::Json,
            UsageFormat::Anthropic,
            r#"{"id":"msg_1","type":"message","model":"claude-3-5-haiku","content":[{"type":"text","text":"{\"usage\":{\"input_tokens\":5}}"}],"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":5,"output_tokens":20}}"#,
        ),
        (
            BodyFormat::Json,
            UsageFormat::OpenAiResponses,
            r#"{"id":"resp_1","object":"response","model":"o4-mini","output":[],"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},"output_tokens":9,"output_tokens_details":{"reasoning_tokens":6},"total_tokens":14}}"#,
        ),
        (
            BodyFormat::Json,
            UsageFormat::Gemini,
            r#"[{"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"totalTokenCount":4},"modelVersion":"gemini-2.0-flash"},
                   {"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"thoughtsTokenCount":7,"totalTokenCount":12},"modelVersion":"gemini-2.0-flash"}]"#,
        ),
        (
            BodyFormat::Json,
            UsageFormat::OpenAiChat,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"model":"a","usage":{"prompt_tokens":4,"completion_tokens":2},"model":"b"}"#,
        ),
    ];
    for (framing, format, body) in fixtures {
        let want = full_parse(framing, format, body);
        assert!(want.0.is_some(), "{format:?}: the fixture has usage");
        let bytes = body.as_bytes();
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            let mut r = ResponseScanner::new(framing, format);
            r.feed(a);
            r.feed(b);
            r.finish();
            assert_eq!((r.usage(), r.model().map(str::to_string)), want, "{format:?} split at {i}");
        }
    }
}

#[test]
fn anthropic_responses_and_gemini_streams_at_every_split() {
    scan_format(UsageFormat::Anthropic, ANTHROPIC_SSE);
    scan_format(UsageFormat::OpenAiResponses, RESPONSES_SSE);
    scan_format(UsageFormat::Gemini, GEMINI_SSE);
}

#[test]
fn non_streaming_anthropic_responses_and_gemini() {
    let cases: [(UsageFormat, &str, Usage); 3] = [
        (
            UsageFormat::Anthropic,
            r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-3-5-haiku","content":[{"type":"text","text":"{\"usage\":{\"input_tokens\":5}}"}],"stop_reason":"end_turn","usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":5,"output_tokens":20}}"#,
            Usage { input: 15, output: 20, cached_input: 5, reasoning: 0, cache_creation_input: 0 },
        ),
        (
            UsageFormat::OpenAiResponses,
            r#"{"id":"resp_1","object":"response","status":"completed","model":"o4-mini","output":[],"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},"output_tokens":9,"output_tokens_details":{"reasoning_tokens":6},"total_tokens":14}}"#,
            Usage { input: 5, output: 9, cached_input: 0, reasoning: 6, cache_creation_input: 0 },
        ),
        (
            UsageFormat::Gemini,
            r#"{"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"totalTokenCount":5},"modelVersion":"gemini-2.0-flash"}"#,
            Usage { input: 3, output: 2, ..Usage::default() },
        ),
    ];
    for (format, body, want) in cases {
        let mut r = ResponseScanner::new(BodyFormat::Json, format);
        r.feed(body.as_bytes());
        r.finish();
        assert_eq!(r.usage(), Some(want), "{format:?}");
    }
}

#[test]
fn json_body_usage_and_model_at_every_split() {
    let body = CHAT_JSON.as_bytes();
    let want = Some(Usage { input: 19, output: 10, cached_input: 3, reasoning: 2, cache_creation_input: 0 });
    for i in 0..=body.len() {
        let (a, b) = body.split_at(i);
        let (usage, model, skips, firsts) = scan(BodyFormat::Json, &[a, b]);
        assert_eq!(usage, want, "split at {i}");
        assert_eq!(model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(skips, Skips::default());
        assert_eq!(firsts, 0);
    }
}

#[test]
fn sse_usage_at_every_split_and_first_data_once() {
    let body = CHAT_SSE.as_bytes();
    let want = Some(Usage { input: 7, output: 2, cached_input: 0, reasoning: 0, cache_creation_input: 0 });
    for i in 0..=body.len() {
        let (a, b) = body.split_at(i);
        let (usage, _, skips, firsts) = scan(BodyFormat::Sse, &[a, b]);
        assert_eq!(usage, want, "split at {i}");
        assert_eq!(skips, Skips::default(), "split at {i}");
        assert_eq!(firsts, 1, "split at {i}");
    }
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(scan(BodyFormat::Sse, &bytes).0, want);
}

#[test]
fn skips_are_counted() {
    let (_, _, s, _) = scan(BodyFormat::Json, &[b"<html>oops</html>"]);
    assert_eq!(s.count(Skip::BodyMalformed), 1);
    let (u, _, s, _) = scan(BodyFormat::Json, &[br#"{"usage":{"prompt_tokens":-5}}"#]);
    assert_eq!((u, s.count(Skip::UsageInvalid)), (None, 1));
    let big = format!(r#"{{"usage":{{"prompt_tokens":1,"pad":"{}"}}}}"#, "x".repeat(MAX_USAGE_BYTES));
    let (u, _, s, _) = scan(BodyFormat::Json, &[big.as_bytes()]);
    assert_eq!((u, s.count(Skip::UsageTooLarge)), (None, 1));
    let (_, m, s, _) = scan(BodyFormat::Json, &[br#"{"model":42}"#]);
    assert_eq!((m, s.count(Skip::ModelInvalid)), (None, 1));
    let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_BYTES));
    let (_, m, s, _) = scan(BodyFormat::Json, &[long.as_bytes()]);
    assert_eq!((m, s.count(Skip::ModelInvalid)), (None, 1), "as long a model as the request may not have");
}

#[test]
fn bodies_cut_short_are_malformed_unless_the_exchange_was_interrupted() {
    let truncated = br#"{"model":"gpt-4o","choices":[{"message":{"content":"hel"#;
    assert_eq!(scan(BodyFormat::Json, &[truncated]).2.count(Skip::BodyMalformed), 1);
    let deep = "[".repeat(100_000);
    assert_eq!(scan(BodyFormat::Json, &[deep.as_bytes()]).2.count(Skip::BodyMalformed), 1);
    let mut r = ResponseScanner::new(BodyFormat::Json, UsageFormat::OpenAiChat);
    r.feed(truncated);
    r.abandon();
    assert_eq!(r.skips().count(Skip::BodyMalformed), 0, "a reset is a failed request, not a bad body");
    // Whitespace only, or nothing: no document, nothing malformed.
    assert_eq!(scan(BodyFormat::Json, &[b" \r\n"]).2.count(Skip::BodyMalformed), 0);
    assert_eq!(scan(BodyFormat::Json, &[]).2.count(Skip::BodyMalformed), 0);
    // An event whose JSON ends early counts; `[DONE]` and the events around it do not.
    let sse = "data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_tokens\":\n\ndata: [DONE]\n\n";
    let (u, _, s, _) = scan(BodyFormat::Sse, &[sse.as_bytes()]);
    assert_eq!((u, s.count(Skip::BodyMalformed), s.count(Skip::UsageInvalid)), (None, 1, 0));
    // The last event of an interrupted stream is not counted; of a finished one it is.
    let open = "data: {\"choices\":[]}\n\ndata: {\"choi";
    let mut r = ResponseScanner::new(BodyFormat::Sse, UsageFormat::OpenAiChat);
    r.feed(open.as_bytes());
    r.abandon();
    assert_eq!(r.skips().count(Skip::BodyMalformed), 0);
    assert_eq!(scan(BodyFormat::Sse, &[open.as_bytes()]).2.count(Skip::BodyMalformed), 1);
}

#[test]
fn the_first_bytes_overrule_a_wrong_content_type_at_every_split() {
    let json = format!("\r\n {CHAT_JSON}");
    let want_json = scan(BodyFormat::Json, &[CHAT_JSON.as_bytes()]);
    let want_sse = scan(BodyFormat::Sse, &[CHAT_SSE.as_bytes()]);
    assert!(want_json.0.is_some() && want_sse.0.is_some());
    for (label, body, want) in [
        (BodyFormat::Sse, json.as_str(), &want_json),
        (BodyFormat::Json, CHAT_SSE, &want_sse),
        (
            BodyFormat::Json,
            ": ping\n\nretry: 10\ndata: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n",
            &(Some(Usage { input: 2, output: 1, ..Usage::default() }), None, Skips::default(), 1),
        ),
    ] {
        let bytes = body.as_bytes();
        for i in 0..=bytes.len().min(64) {
            for j in i..=bytes.len().min(i + 8) {
                let got = scan(label, &[&bytes[..i], &bytes[i..j], &bytes[j..]]);
                assert_eq!((&got.0, &got.1, got.2), (&want.0, &want.1, want.2), "{label:?} body split at {i}, {j}");
            }
        }
    }
    // What the label says stands when the first bytes cannot tell.
    let (_, _, s, _) = scan(BodyFormat::Json, &[b"<html>bad gateway</html>"]);
    assert_eq!(s.count(Skip::BodyMalformed), 1);
    assert_eq!(scan(BodyFormat::Sse, &[b"\n\n"]).3, 0);
}

#[test]
fn sniffing_decides_as_soon_as_the_head_can_tell() {
    use BodyFormat::{Json, Sse};
    for (hint, head, complete, want) in [
        (Sse, &b"{"[..], false, Some(Json)),
        (Sse, b"[", false, Some(Json)),
        (Json, b"d", false, None),
        (Json, b"data", false, None),
        (Json, b"data:", false, Some(Sse)),
        (Json, b"datum", false, Some(Json)),
        (Json, b"retry", false, None),
        (Json, b"retry:", false, Some(Sse)),
        (Json, b":", false, Some(Sse)),
        (Json, b"ev", true, Some(Json)),
        (Sse, b"<html", false, Some(Sse)),
        (Json, b"", false, None),
        (Sse, b"", true, Some(Sse)),
    ] {
        assert_eq!(BodyFormat::sniff(hint, head, complete), want, "{hint:?} {:?}", String::from_utf8_lossy(head));
    }
}

#[test]
fn stream_without_final_blank_line_still_counts() {
    let body = "data: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}";
    assert_eq!(scan(BodyFormat::Sse, &[body.as_bytes()]).0.map(|u| u.input), Some(4));
}

#[test]
fn carry_stays_bounded_on_a_huge_stream() {
    let mut r = ResponseScanner::new(BodyFormat::Sse, UsageFormat::OpenAiChat);
    let event = CHAT_SSE
        .as_bytes()
        .get(
            ..CHAT_SSE
                .find("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[]")
                .unwrap(),
        )
        .unwrap();
    let mut max = 0;
    for _ in 0..2000 {
        for piece in event.chunks(37) {
            r.feed(piece);
            max = max.max(r.carry_len());
        }
    }
    assert!(max < 256, "carry {max}");
}

#[test]
fn request_model_last_wins_and_invalid_is_skipped() {
    let mut r = RequestScanner::default();
    let body = br#"{"model":"a","messages":[{"role":"user","content":"\"model\":\"x\""}],"model":"gpt-4o"}"#;
    for c in body.chunks(3) {
        r.feed(c);
    }
    assert_eq!(r.model(), Some("gpt-4o"));
    let mut r = RequestScanner::default();
    r.feed(br#"{"model":["x"]}"#);
    assert_eq!((r.model(), r.skips().count(Skip::ModelInvalid)), (None, 1));
}

#[test]
fn request_output_caps_are_read_at_top_level_only() {
    let body =
        br#"{"messages":[{"content":"\"max_tokens\": 5","max_tokens":7}],"max_completion_tokens":300,"model":"m"}"#;
    for split in 1..body.len() {
        let mut r = RequestScanner::default();
        let (a, b) = body.split_at(split);
        r.feed(a);
        r.feed(b);
        assert_eq!((r.max_output_tokens(), r.model(), r.bytes()), (Some(300), Some("m"), body.len() as u64));
    }
    for (body, want) in [
        (&br#"{"max_tokens":null}"#[..], None),
        (br#"{"max_tokens":-1}"#, None),
        (br#"{"max_tokens":1e3}"#, None),
        (br#"{"max_output_tokens":64}"#, Some(64)),
    ] {
        let mut r = RequestScanner::default();
        r.feed(body);
        assert_eq!(r.max_output_tokens(), want);
    }
}

#[test]
fn request_stream_without_usage_is_recognised_like_a_full_parse() {
    for (body, want) in [
        (&br#"{"model":"m","stream":true,"messages":[]}"#[..], true),
        (br#"{"stream":true,"stream_options":{"include_usage":false}}"#, true),
        (br#"{"stream":true,"stream_options":null}"#, true),
        (br#"{"stream":true,"stream_options":{"include_usage":true}}"#, false),
        (br#"{"stream_options":{"include_usage":true},"stream":true}"#, false),
        (br#"{"stream":false}"#, false),
        (br#"{"stream":"true"}"#, false),
        (br#"{"model":"m"}"#, false),
        (br#"{"stream":true,"stream":false}"#, false),
        (br#"{"messages":[{"stream":true,"content":""stream":true"}]}"#, false),
        (br#"{"metadata":{"stream_options":{"include_usage":true}},"stream":true}"#, true),
    ] {
        for split in 1..body.len() {
            let mut r = RequestScanner::default();
            let (a, b) = body.split_at(split);
            r.feed(a);
            r.feed(b);
            assert_eq!(r.stream_lacks_usage(), want, "{} split at {split}", String::from_utf8_lossy(body));
        }
        // The same decision as the rewrite, which parses the whole body.
        assert_eq!(crate::scan::inject::rewrite_request(body).is_ok(), want, "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn content_types() {
    assert_eq!(BodyFormat::from_content_type(b"text/event-stream; charset=utf-8"), BodyFormat::Sse);
    assert_eq!(BodyFormat::from_content_type(b"Text/Event-Stream"), BodyFormat::Sse);
    assert_eq!(BodyFormat::from_content_type(b"application/json"), BodyFormat::Json);
    assert_eq!(BodyFormat::from_content_type(b""), BodyFormat::Json);
}

/// The plain-string shortcut decodes what serde_json decodes, and leaves it the rest.
#[test]
fn model_strings_decode_as_serde_json_decodes_them() {
    let serde = |raw: &[u8]| match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    let mut cases: Vec<Vec<u8>> = [
        &br#""gpt-4o-mini""#[..],
        br#""""#,
        br#"""#,
        br#""a"b""#,
        br#""a\"b""#,
        br#""a\\""#,
        br#""\u00e9""#,
        "\"mod\u{e8}le-\u{1f600}\"".as_bytes(),
        b"\"tab\there\"",
        b"\"\xff\"",
        b"\"\xe2\x82\"",
        br#"7"#,
        br#"null"#,
        br#" "x" "#,
    ]
    .iter()
    .map(|c| c.to_vec())
    .collect();
    let mut rng = crate::scan::test_rng::Rng(0xA5A5_5A5A_0F0F_F0F0);
    for _ in 0..5_000 {
        let len = rng.below(8);
        let mut raw = vec![b'"'];
        raw.extend((0..len).map(|_| *b"ab\"\\\x01\x7f\xc3\xa9\xff u/"[..].get(rng.below(13)).unwrap_or(&b'a')));
        raw.push(b'"');
        cases.push(raw);
    }
    for raw in cases {
        assert_eq!(json_string(&raw), serde(&raw), "{}", String::from_utf8_lossy(&raw));
    }
}
