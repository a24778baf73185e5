//! Every supported API format, compressed bodies and upstream signals, through the real Envoy in
//! front of the mock gateway (which answers in each provider's wire format).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, send, Envoy, Metrics, Mock};
use serde_json::json;

const CONFIG: &str = r#"{
  "pricing": {"claude-sonnet-4-5": {"input": 3, "output": 15, "cached_input": 0.3, "cache_creation_input": 3.75}},
  "usage_headers": {"input": "x-usage-input-tokens", "output": "x-usage-output-tokens",
                    "cached_input": "x-usage-cached-tokens", "reasoning": "x-usage-reasoning-tokens"}
}"#;

/// `llm_tokens_total` of `model` and `token_type`. A missing series is a failure, not 0: the
/// filter defines all five token types of a request whose usage it read, zeros included.
fn tokens(m: &Metrics, model: &str, token_type: &str) -> f64 {
    let series = format!(r#"llm_tokens_total{{model="{model}",app="unknown",token_type="{token_type}"}}"#);
    m.value(&series).unwrap_or_else(|| {
        panic!("no series {series}; llm_tokens_total series: {:#?}", m.names_with_prefix("llm_tokens_total"))
    })
}

/// Asserts that no series of metric `name` exists (nothing was ever counted in it, under any
/// label), e.g. no skip of any reason.
fn assert_none_counted(m: &Metrics, name: &str) {
    let found: Vec<String> =
        m.names_with_prefix(&format!("{name}{{")).into_iter().map(|s| format!("{s} = {}", m.series[&s])).collect();
    assert!(found.is_empty(), "{name} was counted: {found:#?}");
}

fn requests(model: &str, op: &str, status: u16, error: &str) -> String {
    format!(
        r#"llm_requests_total{{model="{model}",app="unknown",operation="{op}",status="{status}",error_type="{error}"}}"#
    )
}

/// Asserts input, output, cached_input, reasoning, cache_creation_input of `model`.
fn assert_tokens(m: &Metrics, model: &str, want: [u64; 5]) {
    let got: Vec<u64> = ["input", "output", "cached_input", "reasoning", "cache_creation_input"]
        .iter()
        .map(|t| tokens(m, model, t) as u64)
        .collect();
    assert_eq!(got, want, "tokens of {model} (input, output, cached, reasoning, cache creation)");
}

fn anthropic_body(stream: bool) -> String {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": stream,
           "messages": [{"role": "user", "content": "Hello, Claude"}]})
    .to_string()
}

#[test]
fn anthropic_messages_non_streaming_and_streaming() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, CONFIG);
    let usage = [
        ("x-mock-prompt-tokens", "100"),
        ("x-mock-completion-tokens", "50"),
        ("x-mock-cached-tokens", "2000"),
        ("x-mock-cache-creation-tokens", "300"),
    ];
    let r = send(&client(), &envoy.url("/v1/messages"), &usage, &anthropic_body(false));
    assert_eq!(r.status, 200, "{}", r.body);
    let m = envoy.wait_value(&requests("claude-sonnet-4-5", "messages", 200, "none"), 1.0);
    // OpenAI semantics: input = 100 + 2000 cache reads + 300 cache writes.
    assert_tokens(&m, "claude-sonnet-4-5", [2400, 50, 2000, 0, 300]);
    // 100 × 3 + 2000 × 0.3 + 300 × 3.75 + 50 × 15 = 300 + 600 + 1125 + 750 µUSD.
    assert_eq!(m.value(r#"llm_cost_microusd_total{model="claude-sonnet-4-5",app="unknown"}"#), Some(2775.0));

    // Streaming, split into 7-byte pieces; message_delta repeats the input counts and its
    // input_tokens (10) overrides message_start's (100).
    let mut stream_usage = usage.to_vec();
    stream_usage.extend([
        ("x-mock-anthropic-final-usage", "full"),
        ("x-mock-delta-input-tokens", "10"),
        ("x-mock-split", "7"),
    ]);
    let r = send(&client(), &envoy.url("/v1/messages"), &stream_usage, &anthropic_body(true));
    assert!(r.body.contains("event: message_stop"), "{}", r.body);
    let m = envoy.wait_value(&requests("claude-sonnet-4-5", "messages", 200, "none"), 2.0);
    assert_tokens(&m, "claude-sonnet-4-5", [2400 + 2310, 100, 4000, 0, 600]);
    envoy.wait_value(r#"llm_time_to_first_token_ms_count{model="claude-sonnet-4-5"}"#, 1.0);
}

#[test]
fn an_interrupted_anthropic_stream_keeps_the_usage_seen_so_far() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, CONFIG);
    let headers = [
        ("x-mock-scenario", "reset_mid_stream"),
        ("x-mock-prompt-tokens", "500"),
        ("x-mock-completion-tokens", "40"),
        ("x-mock-chunk-delay-ms", "5"),
    ];
    let resp = client()
        .post(&envoy.url("/v1/messages"))
        .header("content-type", "application/json")
        .header(headers[0].0, headers[0].1)
        .header(headers[1].0, headers[1].1)
        .header(headers[2].0, headers[2].1)
        .header(headers[3].0, headers[3].1)
        .send(anthropic_body(true));
    if let Ok(mut r) = resp {
        let _ = r.body_mut().read_to_string();
    }
    let m = envoy.wait_value(&requests("claude-sonnet-4-5", "messages", 200, "network"), 1.0);
    // message_start said 500 input and 1 output before the reset.
    assert_tokens(&m, "claude-sonnet-4-5", [500, 1, 0, 0, 0]);
    envoy.wait_value(r#"llm_request_duration_ms_count{model="claude-sonnet-4-5"}"#, 1.0);
    assert_eq!(m.value(r#"llm_active_requests{model="claude-sonnet-4-5"}"#), Some(0.0));
}

#[test]
fn openai_responses_api_non_streaming_and_every_final_event() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, CONFIG);
    let usage = [
        ("x-mock-prompt-tokens", "300"),
        ("x-mock-completion-tokens", "80"),
        ("x-mock-cached-tokens", "100"),
        ("x-mock-reasoning-tokens", "30"),
    ];
    let body = |stream: bool| json!({"model": "o4-mini", "input": "Write a haiku", "stream": stream}).to_string();
    let r = send(&client(), &envoy.url("/v1/responses"), &usage, &body(false));
    assert_eq!(r.status, 200, "{}", r.body);
    let m = envoy.wait_value(&requests("o4-mini", "responses", 200, "none"), 1.0);
    assert_tokens(&m, "o4-mini", [300, 80, 100, 30, 0]);
    for (i, fin) in ["completed", "incomplete", "failed"].into_iter().enumerate() {
        let mut h = usage.to_vec();
        h.extend([("x-mock-split", "11"), ("x-mock-split-delay-ms", "0")]);
        if fin != "completed" {
            h.push(("x-mock-responses-final", fin));
        }
        let r = send(&client(), &envoy.url("/v1/responses"), &h, &body(true));
        assert!(r.body.contains(&format!("event: response.{fin}")), "{}", r.body);
        let n = 2.0 + i as f64;
        let m = envoy.wait_value(&requests("o4-mini", "responses", 200, "none"), n);
        assert_eq!(tokens(&m, "o4-mini", "input"), 300.0 * n, "after response.{fin}");
        assert_eq!(tokens(&m, "o4-mini", "reasoning"), 30.0 * n);
    }
}

#[test]
fn gemini_generate_content_with_the_model_in_the_path() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, CONFIG);
    let usage = [
        ("x-mock-prompt-tokens", "1000"),
        ("x-mock-completion-tokens", "200"),
        ("x-mock-reasoning-tokens", "300"),
        ("x-mock-cached-tokens", "600"),
    ];
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "Explain"}]}],
                      "generationConfig": {"maxOutputTokens": 200}})
    .to_string();
    let r = send(&client(), &envoy.url("/v1beta/models/gemini-2.5-flash:generateContent"), &usage, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let m = envoy.wait_value(&requests("gemini-2.5-flash", "generate_content", 200, "none"), 1.0);
    // Output = candidates + thoughts; reasoning = thoughts.
    assert_tokens(&m, "gemini-2.5-flash", [1000, 500, 600, 300, 0]);

    let mut h = usage.to_vec();
    h.extend([("x-mock-split", "9"), ("x-mock-split-delay-ms", "0")]);
    let r = send(&client(), &envoy.url("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"), &h, &body);
    assert!(r.body.starts_with("data: "), "{}", r.body);
    let m = envoy.wait_value(&requests("gemini-2.5-pro", "generate_content", 200, "none"), 1.0);
    // Every chunk carries running totals: the last one wins.
    assert_tokens(&m, "gemini-2.5-pro", [1000, 500, 600, 300, 0]);
    envoy.wait_value(r#"llm_time_to_first_token_ms_count{model="gemini-2.5-pro"}"#, 1.0);

    // Without alt=sse the stream is one JSON array of chunks.
    let r = send(&client(), &envoy.url("/v1beta/models/gemini-2.0-flash:streamGenerateContent"), &h, &body);
    assert!(r.body.trim_start().starts_with('['), "{}", r.body);
    let m = envoy.wait_value(&requests("gemini-2.0-flash", "generate_content", 200, "none"), 1.0);
    assert_tokens(&m, "gemini-2.0-flash", [1000, 500, 600, 300, 0]);
    // Nothing skipped: no body_malformed (nor any other reason) was ever counted.
    assert_none_counted(&m, "llm_meter_skips_total");
}

#[test]
fn upstream_rate_limit_headers_become_gauges() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, CONFIG);
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let openai = [
        ("x-mock-ratelimit-limit-requests", "500"),
        ("x-mock-ratelimit-remaining-requests", "42"),
        ("x-mock-ratelimit-limit-tokens", "30000"),
        ("x-mock-ratelimit-remaining-tokens", "1234"),
    ];
    assert_eq!(send(&client(), &envoy.url("/v1/chat/completions"), &openai, &chat).status, 200);
    let gauge = |metric: &str, model: &str, kind: &str| {
        format!(r#"llm_upstream_ratelimit_{metric}{{model="{model}",kind="{kind}"}}"#)
    };
    let m = envoy.wait_value(&gauge("remaining", "gpt-4o", "requests"), 42.0);
    assert_eq!(m.value(&gauge("limit", "gpt-4o", "requests")), Some(500.0));
    assert_eq!(m.value(&gauge("remaining", "gpt-4o", "tokens")), Some(1234.0));
    assert_eq!(m.value(&gauge("limit", "gpt-4o", "tokens")), Some(30000.0));
    // The gauge follows the latest response.
    let later = [("x-mock-ratelimit-remaining-requests", "41")];
    send(&client(), &envoy.url("/v1/chat/completions"), &later, &chat);
    envoy.wait_value(&gauge("remaining", "gpt-4o", "requests"), 41.0);

    let anthropic = [("x-mock-ratelimit-remaining-tokens", "777")];
    send(&client(), &envoy.url("/v1/messages"), &anthropic, &anthropic_body(false));
    let m = envoy.wait_value(&gauge("remaining", "claude-sonnet-4-5", "tokens"), 777.0);
    assert_eq!(m.value(&gauge("limit", "claude-sonnet-4-5", "requests")), Some(1000.0));

    let generic = [("x-mock-ratelimit-style", "generic"), ("x-mock-ratelimit-remaining-requests", "7")];
    let gem = json!({"contents": [{"parts": [{"text": "x"}]}]}).to_string();
    send(&client(), &envoy.url("/v1beta/models/gemini-2.0-flash:generateContent"), &generic, &gem);
    envoy.wait_value(&gauge("remaining", "gemini-2.0-flash", "requests"), 7.0);
}

#[test]
fn usage_from_response_headers_when_the_body_has_none() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, CONFIG);
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let h = [
        ("x-mock-usage-in-headers", "1"),
        ("x-mock-prompt-tokens", "64"),
        ("x-mock-completion-tokens", "16"),
        ("x-mock-reasoning-tokens", "4"),
    ];
    let r = send(&client(), &envoy.url("/v1/chat/completions"), &h, &chat);
    assert!(!r.body.contains("prompt_tokens"), "the body has no usage: {}", r.body);
    let m = envoy.wait_value(&requests("gpt-4o-mini", "chat", 200, "none"), 1.0);
    assert_tokens(&m, "gpt-4o-mini", [64, 16, 0, 4, 0]);
    // The series is created by its first count (as below): absent means never counted.
    assert_none_counted(&m, "llm_usage_missing_total");
    // Without usage_headers configured, the same response is a blind spot.
    drop(envoy);
    let envoy = Envoy::start(mock.port, "{}");
    send(&client(), &envoy.url("/v1/chat/completions"), &h, &chat);
    envoy.wait_value(r#"llm_usage_missing_total{model="gpt-4o-mini"}"#, 1.0);
}

/// POSTs and returns status, content-encoding and the raw (still encoded) body.
fn post_raw(url: &str, headers: &[(&str, &str)], body: &str) -> (u16, Option<String>, Vec<u8>) {
    let mut req = client().post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(body).unwrap();
    let encoding = resp.headers().get("content-encoding").and_then(|v| v.to_str().ok()).map(str::to_string);
    let bytes = resp.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap();
    (resp.status().as_u16(), encoding, bytes)
}

fn decompress(encoding: &str, bytes: &[u8]) -> String {
    use std::io::Read;
    let mut out = String::new();
    match encoding {
        "gzip" => flate2::read::MultiGzDecoder::new(bytes).read_to_string(&mut out),
        "deflate" => match flate2::read::ZlibDecoder::new(bytes).read_to_string(&mut out) {
            Ok(n) => Ok(n),
            Err(_) => {
                out.clear();
                flate2::read::DeflateDecoder::new(bytes).read_to_string(&mut out)
            }
        },
        "br" => brotli::Decompressor::new(bytes, 4096).read_to_string(&mut out),
        other => panic!("unexpected encoding {other}"),
    }
    .unwrap();
    out
}

#[test]
fn compressed_responses_are_metered_and_reach_the_client_untouched() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, CONFIG);
    let chat = |stream: bool| {
        let mut v = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
        if stream {
            v["stream"] = true.into();
            v["stream_options"] = json!({"include_usage": true});
        }
        v.to_string()
    };
    let cases =
        [("gzip", false), ("deflate", false), ("raw-deflate", false), ("br", false), ("gzip", true), ("br", true)];
    for (i, (encoding, stream)) in cases.into_iter().enumerate() {
        let headers = [
            ("x-mock-encoding", encoding),
            ("x-mock-prompt-tokens", "100"),
            ("x-mock-completion-tokens", "10"),
            ("x-mock-split", "5"),
        ];
        let (status, got, bytes) = post_raw(&envoy.url("/v1/chat/completions"), &headers, &chat(stream));
        assert_eq!(status, 200);
        let want = if encoding == "raw-deflate" { "deflate" } else { encoding };
        assert_eq!(got.as_deref(), Some(want), "the client gets the encoded body");
        let text = decompress(want, &bytes);
        assert!(text.contains("\"prompt_tokens\":100"), "{encoding}: {text}");
        let m = envoy.wait_value(
            r#"llm_requests_total{model="gpt-4o",app="unknown",operation="chat",status="200",error_type="none"}"#,
            (i + 1) as f64,
        );
        assert_eq!(tokens(&m, "gpt-4o", "input"), 100.0 * (i + 1) as f64, "{encoding} stream={stream}");
    }
    // An Anthropic stream in brotli, too.
    let (_, _, bytes) = post_raw(
        &envoy.url("/v1/messages"),
        &[("x-mock-encoding", "br"), ("x-mock-prompt-tokens", "9"), ("x-mock-completion-tokens", "3")],
        &anthropic_body(true),
    );
    assert!(decompress("br", &bytes).contains("message_stop"));
    let m = envoy.wait_value(&requests("claude-sonnet-4-5", "messages", 200, "none"), 1.0);
    assert_tokens(&m, "claude-sonnet-4-5", [9, 3, 0, 0, 0]);
    let m = envoy.settled();
    // No skip of any reason (`compressed` included) and no response without usage.
    assert_none_counted(&m, "llm_meter_skips_total");
    assert_none_counted(&m, "llm_usage_missing_total");
}
