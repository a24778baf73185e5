//! Throughput of the body scanners, as the filter runs them: response bodies handed over in
//! 16 KiB chunks (Envoy's usual buffer slice size), and streams one event per chunk.
//! `response_scan_without_templates` runs the same streams through the full JSON scan of every
//! event (no event templates, `scan::template`): the cost before them, in the same run.
//!
//! `cargo bench -p llm-meter --bench scanners` (native only: on wasm32 this is an empty binary).

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use criterion::{BenchmarkId, Criterion, Throughput};
    use llm_meter::scan::body::{BodyFormat, ResponseScanner};
    use llm_meter::scan::json_scan::{Found, JsonScanner};
    use llm_meter::scan::sse::{SseScanner, SseSink};
    use llm_meter::scan::usage::UsageFormat;
    use std::hint::black_box;

    /// Body chunk size handed to the scanners.
    const CHUNK: usize = 16 * 1024;
    /// Content deltas of a "realistic" stream.
    const EVENTS: usize = 200;
    /// Size of the large stream and body variants.
    const BIG: usize = 10 << 20;

    const WORDS: &[&str] = &["Hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"];

    /// One OpenAI chat content chunk, in the compact shape the brief describes.
    fn openai_chunk(out: &mut String, k: usize) {
        let w = WORDS[k % WORDS.len()];
        out.push_str(
            "data: {\"id\":\"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012\",\"object\":\"chat.completion.chunk\",\
             \"choices\":[{\"index\":0,\"delta\":{\"content\":\"",
        );
        out.push_str(w);
        out.push_str(" \"}}],\"usage\":null}\n\n");
    }

    /// One OpenAI chat content chunk with every field the API really sends (`created`, `model`,
    /// `system_fingerprint`, `logprobs`, `finish_reason`): `model` is a path, so it is captured
    /// and decoded in every event.
    fn openai_full_chunk(out: &mut String, k: usize) {
        let w = WORDS[k % WORDS.len()];
        out.push_str(
            "data: {\"id\":\"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012\",\"object\":\"chat.completion.chunk\",\
             \"created\":1727000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\
             \"choices\":[{\"index\":0,\"delta\":{\"content\":\"",
        );
        out.push_str(w);
        out.push_str(" \"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n");
    }

    const OPENAI_TAIL: &str = concat!(
        "data: {\"id\":\"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012\",\"object\":\"chat.completion.chunk\",",
        "\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012\",\"object\":\"chat.completion.chunk\",",
        "\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":200,\"total_tokens\":219,",
        "\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},",
        "\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0}}}\n\n",
        "data: [DONE]\n\n",
    );

    /// An OpenAI chat stream with `events` content chunks, or as many as fill `min_len` bytes.
    fn openai_stream(events: usize, min_len: usize, full: bool) -> Vec<u8> {
        let mut s = String::new();
        let mut k = 0;
        while k < events || s.len() < min_len {
            if full {
                openai_full_chunk(&mut s, k);
            } else {
                openai_chunk(&mut s, k);
            }
            k += 1;
        }
        s.push_str(OPENAI_TAIL);
        s.into_bytes()
    }

    const ANTHROPIC_HEAD: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",",
        "\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,",
        "\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
    );

    const ANTHROPIC_TAIL: &str = concat!(
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},",
        "\"usage\":{\"output_tokens\":200}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    fn anthropic_stream(events: usize, min_len: usize) -> Vec<u8> {
        let mut s = String::from(ANTHROPIC_HEAD);
        let mut k = 0;
        while k < events || s.len() < min_len {
            s.push_str("event: content_block_delta\n");
            s.push_str(
                "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"",
            );
            s.push_str(WORDS[k % WORDS.len()]);
            s.push_str(" \"}}\n\n");
            k += 1;
        }
        s.push_str(ANTHROPIC_TAIL);
        s.into_bytes()
    }

    /// A Gemini stream (`alt=sse`): every event carries `usageMetadata` (the counts so far) and
    /// `modelVersion`, so every event must be parsed whole.
    fn gemini_stream(events: usize) -> Vec<u8> {
        let mut s = String::new();
        for k in 0..events {
            s.push_str("data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"");
            s.push_str(WORDS[k % WORDS.len()]);
            s.push_str(" \"}],\"role\":\"model\"},\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":9,");
            s.push_str(&format!("\"candidatesTokenCount\":{},\"totalTokenCount\":{}}},", k + 1, k + 10));
            s.push_str("\"modelVersion\":\"gemini-2.5-flash\",\"responseId\":\"r1\"}\n\n");
        }
        s.into_bytes()
    }

    /// An OpenAI chat stream whose events alternate between two shapes (a content delta and a
    /// tool-call delta): the worst case for a scan that compares each event with the previous
    /// one, since no event has the shape of the one before.
    fn openai_alternating_stream(events: usize) -> Vec<u8> {
        let mut s = String::new();
        for k in 0..events {
            s.push_str(
                "data: {\"id\":\"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012\",\"object\":\"chat.completion.chunk\",\
                 \"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{",
            );
            if k % 2 == 0 {
                s.push_str("\"content\":\"");
            } else {
                s.push_str("\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"");
            }
            s.push_str(WORDS[k % WORDS.len()]);
            s.push_str(if k % 2 == 0 { " \"}}],\"usage\":null}\n\n" } else { " \"}}]}}],\"usage\":null}\n\n" });
        }
        s.push_str(OPENAI_TAIL);
        s.into_bytes()
    }

    /// The body cut after every blank line: one SSE event per chunk, as streams usually arrive
    /// (one event per upstream write, so one per body callback).
    fn per_event(body: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut rest = body;
        while let Some(p) = rest.windows(2).position(|w| w == b"\n\n") {
            let (event, tail) = rest.split_at(p + 2);
            out.push(event);
            rest = tail;
        }
        if !rest.is_empty() {
            out.push(rest);
        }
        out
    }

    /// A non-streaming chat completion whose message content is about `content_len` bytes of
    /// prose with the escapes real content has (`\n`, `\"`).
    fn chat_json(content_len: usize) -> Vec<u8> {
        let mut content = String::new();
        let mut k = 0;
        while content.len() < content_len {
            content.push_str(WORDS[k % WORDS.len()]);
            content.push_str(match k % 16 {
                7 => ", \\\"quoted\\\" ",
                15 => ".\\n\\n",
                _ => " ",
            });
            k += 1;
        }
        format!(
            "{{\"id\":\"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012\",\"object\":\"chat.completion\",\"created\":1727000000,\
             \"model\":\"gpt-4o-2024-08-06\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\
             \"content\":\"{content}\",\"refusal\":null,\"annotations\":[]}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\
             \"usage\":{{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\
             \"prompt_tokens_details\":{{\"cached_tokens\":0,\"audio_tokens\":0}},\
             \"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0}}}},\
             \"service_tier\":\"default\",\"system_fingerprint\":\"fp_50cad350e4\"}}"
        )
        .into_bytes()
    }

    /// Feeds `chunks` to a fresh response scanner, as the filter does.
    fn scan_response(chunks: &[&[u8]], format: BodyFormat, usage: UsageFormat) -> u64 {
        scan_response_with(ResponseScanner::new, chunks, format, usage)
    }

    /// Feeds `chunks` to a fresh scanner made by `new`.
    fn scan_response_with(
        new: fn(BodyFormat, UsageFormat) -> ResponseScanner,
        chunks: &[&[u8]],
        format: BodyFormat,
        usage: UsageFormat,
    ) -> u64 {
        let mut scanner = new(format, usage);
        for chunk in chunks {
            scanner.feed(black_box(chunk));
        }
        scanner.finish();
        scanner.usage().map_or(0, |u| u.output)
    }

    fn check_usage(chunks: &[&[u8]], format: BodyFormat, usage: UsageFormat, output: u64) {
        assert_eq!(scan_response(chunks, format, usage), output, "the benchmark input must carry its usage");
    }

    pub fn response_scans(c: &mut Criterion) {
        let cases: Vec<(&str, Vec<u8>, BodyFormat, UsageFormat, u64)> = vec![
            ("sse_openai/200_events", openai_stream(EVENTS, 0, false), BodyFormat::Sse, UsageFormat::OpenAiChat, 200),
            ("sse_openai/10MB", openai_stream(0, BIG, false), BodyFormat::Sse, UsageFormat::OpenAiChat, 200),
            (
                "sse_openai_full_fields/200_events",
                openai_stream(EVENTS, 0, true),
                BodyFormat::Sse,
                UsageFormat::OpenAiChat,
                200,
            ),
            (
                "sse_openai_alternating/200_events",
                openai_alternating_stream(EVENTS),
                BodyFormat::Sse,
                UsageFormat::OpenAiChat,
                200,
            ),
            ("sse_anthropic/200_events", anthropic_stream(EVENTS, 0), BodyFormat::Sse, UsageFormat::Anthropic, 200),
            ("sse_anthropic/10MB", anthropic_stream(0, BIG), BodyFormat::Sse, UsageFormat::Anthropic, 200),
            ("sse_gemini/200_events", gemini_stream(EVENTS), BodyFormat::Sse, UsageFormat::Gemini, 200),
            ("json_chat/1KB", chat_json(600), BodyFormat::Json, UsageFormat::OpenAiChat, 10),
            ("json_chat/1MB", chat_json(1 << 20), BodyFormat::Json, UsageFormat::OpenAiChat, 10),
        ];
        let mut group = c.benchmark_group("response_scan");
        for (name, body, format, usage, output) in &cases {
            let chunks: Vec<&[u8]> = body.chunks(CHUNK).collect();
            check_usage(&chunks, *format, *usage, *output);
            group.throughput(Throughput::Bytes(body.len() as u64));
            group.bench_with_input(BenchmarkId::from_parameter(name), &chunks, |b, chunks| {
                b.iter(|| scan_response(chunks, *format, *usage))
            });
        }
        // One event per chunk (one upstream write per event, one body callback each): the
        // per-event cost, without 16 KiB chunks to spread it over.
        let streams = one_per_chunk_streams();
        for (name, body, usage) in &streams {
            let chunks = per_event(body);
            check_usage(&chunks, BodyFormat::Sse, *usage, 200);
            group.throughput(Throughput::Bytes(body.len() as u64));
            group.bench_with_input(BenchmarkId::from_parameter(name), &chunks, |b, chunks| {
                b.iter(|| scan_response(chunks, BodyFormat::Sse, *usage))
            });
        }
        group.finish();

        // The same streams, every event scanned in full.
        let mut group = c.benchmark_group("response_scan_without_templates");
        let whole: Vec<(&str, Vec<u8>, UsageFormat)> = vec![
            ("sse_openai/200_events", openai_stream(EVENTS, 0, false), UsageFormat::OpenAiChat),
            ("sse_openai_full_fields/200_events", openai_stream(EVENTS, 0, true), UsageFormat::OpenAiChat),
            ("sse_anthropic/200_events", anthropic_stream(EVENTS, 0), UsageFormat::Anthropic),
        ];
        let cut = whole
            .iter()
            .map(|(name, body, usage)| (*name, body.chunks(CHUNK).collect::<Vec<_>>(), *usage))
            .chain(streams.iter().map(|(name, body, usage)| (*name, per_event(body), *usage)));
        for (name, chunks, usage) in cut {
            let bytes: usize = chunks.iter().map(|c| c.len()).sum();
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_with_input(BenchmarkId::from_parameter(name), &chunks, |b, chunks| {
                b.iter(|| scan_response_with(ResponseScanner::without_templates, chunks, BodyFormat::Sse, usage))
            });
        }
        group.finish();
    }

    /// The streams also measured one event per chunk.
    fn one_per_chunk_streams() -> Vec<(&'static str, Vec<u8>, UsageFormat)> {
        vec![
            ("sse_openai/200_events_one_per_chunk", openai_stream(EVENTS, 0, false), UsageFormat::OpenAiChat),
            (
                "sse_openai_full_fields/200_events_one_per_chunk",
                openai_stream(EVENTS, 0, true),
                UsageFormat::OpenAiChat,
            ),
            ("sse_anthropic/200_events_one_per_chunk", anthropic_stream(EVENTS, 0), UsageFormat::Anthropic),
            ("sse_gemini/200_events_one_per_chunk", gemini_stream(EVENTS), UsageFormat::Gemini),
        ]
    }

    /// Counts event data without parsing it: the SSE framing cost alone.
    #[derive(Default)]
    struct CountSink {
        bytes: usize,
        events: usize,
    }

    impl SseSink for CountSink {
        fn data(&mut self, bytes: &[u8]) {
            self.bytes += bytes.len();
        }
        fn dispatch(&mut self, has_data: bool) {
            self.events += usize::from(has_data);
        }
    }

    fn sse_only(body: &[u8]) -> usize {
        let mut sse = SseScanner::new();
        let mut sink = CountSink::default();
        for chunk in body.chunks(CHUNK) {
            sse.feed(black_box(chunk), &mut sink);
        }
        sse.finish(&mut sink);
        sink.bytes + sink.events
    }

    static PATHS: &[&[&str]] = &[&["usage"], &["model"]];

    /// A JSON scanner over one document, counting what it finds.
    fn json_only(doc: &[u8]) -> usize {
        let mut json = JsonScanner::new(PATHS, 16 * 1024);
        let mut found = 0;
        for chunk in doc.chunks(CHUNK) {
            json.feed(black_box(chunk), |f| {
                found += match f {
                    Found::Value { raw, .. } => raw.len(),
                    Found::TooLarge { .. } => 1,
                }
            });
        }
        found
    }

    /// A JSON scanner reset and run over each event's data, as the SSE path does.
    fn json_events(events: &[&[u8]], json: &mut JsonScanner) -> usize {
        let mut found = 0;
        for e in events {
            json.reset();
            json.feed(black_box(e), |f| {
                found += match f {
                    Found::Value { raw, .. } => raw.len(),
                    Found::TooLarge { .. } => 1,
                }
            });
        }
        found
    }

    pub fn raw_scanners(c: &mut Criterion) {
        let mut group = c.benchmark_group("sse_scanner");
        for (name, body) in [
            ("openai/200_events", openai_stream(EVENTS, 0, false)),
            ("openai/10MB", openai_stream(0, BIG, false)),
            ("anthropic/10MB", anthropic_stream(0, BIG)),
        ] {
            group.throughput(Throughput::Bytes(body.len() as u64));
            group.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| b.iter(|| sse_only(body)));
        }
        group.finish();

        let mut group = c.benchmark_group("json_scanner");
        for (name, doc) in [("chat/1KB", chat_json(600)), ("chat/1MB", chat_json(1 << 20))] {
            assert!(json_only(&doc) > 0);
            group.throughput(Throughput::Bytes(doc.len() as u64));
            group.bench_with_input(BenchmarkId::from_parameter(name), &doc, |b, doc| b.iter(|| json_only(doc)));
        }
        // The event data of the OpenAI stream (the `data: ` prefix and blank lines removed).
        let stream = openai_stream(EVENTS, 0, false);
        let events: Vec<&[u8]> = stream
            .split(|&b| b == b'\n')
            .filter_map(|line| line.strip_prefix(b"data: "))
            .filter(|d| d.first() == Some(&b'{'))
            .collect();
        let bytes: usize = events.iter().map(|e| e.len()).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function("openai_events/200", |b| {
            let mut json = JsonScanner::new(PATHS, 16 * 1024);
            b.iter(|| json_events(&events, &mut json))
        });
        group.finish();
    }
}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_group!(benches, native::response_scans, native::raw_scanners);
#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(benches);

#[cfg(target_arch = "wasm32")]
fn main() {}
