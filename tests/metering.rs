//! Metering through the real Envoy: the mock gateway behind Envoy running the release filter,
//! asserted on exact values scraped from `/stats/prometheus`.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{post, Envoy, Mock, DEFAULT_CONFIG};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const CHAT: &str = "/v1/chat/completions";

fn chat_body(model: &str, stream: bool) -> String {
    let mut v = serde_json::json!({
        "model": model,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}],
    });
    if stream {
        v["stream"] = true.into();
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v.to_string()
}

fn requests(model: &str, app: &str, op: &str, status: u16, error: &str) -> String {
    format!(
        r#"llm_requests_total{{model="{model}",app="{app}",operation="{op}",status="{status}",error_type="{error}"}}"#
    )
}

fn tokens(model: &str, app: &str, token_type: &str) -> String {
    format!(r#"llm_tokens_total{{model="{model}",app="{app}",token_type="{token_type}"}}"#)
}

/// Within 5 %: Envoy histogram sums are computed from bins holding two significant digits.
fn assert_close(got: Option<f64>, want: f64) {
    let got = got.unwrap_or_else(|| panic!("series absent, want ≈{want}"));
    assert!((got - want).abs() <= want * 0.05, "got {got}, want ≈{want}");
}

fn active(model: &str) -> String {
    format!(r#"llm_active_requests{{model="{model}"}}"#)
}

#[test]
fn non_streaming_chat_is_metered_exactly() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    let headers = [
        ("x-app-id", "web"),
        ("x-mock-prompt-tokens", "1200"),
        ("x-mock-completion-tokens", "300"),
        ("x-mock-cached-tokens", "200"),
        ("x-mock-reasoning-tokens", "100"),
    ];
    for _ in 0..3 {
        let (status, body) = post(&envoy.url(CHAT), &headers, &chat_body("gpt-4o", false));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"prompt_tokens\":1200"), "the client gets the upstream body untouched: {body}");
    }
    let m = envoy.wait_value(&requests("gpt-4o", "web", "chat", 200, "none"), 3.0);
    assert_eq!(m.value(&tokens("gpt-4o", "web", "input")), Some(3600.0));
    assert_eq!(m.value(&tokens("gpt-4o", "web", "output")), Some(900.0));
    assert_eq!(m.value(&tokens("gpt-4o", "web", "cached_input")), Some(600.0));
    assert_eq!(m.value(&tokens("gpt-4o", "web", "reasoning")), Some(300.0));
    // Per request: 1000 × 2.5 + 200 × 1.25 + 300 × 10 = 5750 µUSD.
    assert_eq!(m.value(r#"llm_cost_microusd_total{model="gpt-4o",app="web"}"#), Some(17250.0));
    assert_eq!(m.value(&active("gpt-4o")), Some(0.0));
    assert_eq!(m.value(r#"llm_usage_missing_total{model="gpt-4o"}"#), None);

    // Histograms appear at the next stats flush.
    let m = envoy.wait_value(r#"llm_request_duration_ms_count{model="gpt-4o"}"#, 3.0);
    assert_eq!(m.value(r#"llm_tokens_per_request_count{model="gpt-4o",token_type="input"}"#), Some(3.0));
    // Envoy keeps histograms in log-linear bins, so `_sum` is approximate (counts are exact).
    assert_close(m.value(r#"llm_tokens_per_request_sum{model="gpt-4o",token_type="input"}"#), 3600.0);
    assert_close(m.value(r#"llm_tokens_per_request_sum{model="gpt-4o",token_type="output"}"#), 900.0);
    // The shipped buckets: 1200 input tokens fall in (1000, 2000].
    assert_eq!(m.value(r#"llm_tokens_per_request_bucket{model="gpt-4o",token_type="input",le="1000"}"#), Some(0.0));
    assert_eq!(m.value(r#"llm_tokens_per_request_bucket{model="gpt-4o",token_type="input",le="2000"}"#), Some(3.0));
    assert_eq!(m.value(r#"llm_request_duration_ms_bucket{model="gpt-4o",le="600000"}"#), Some(3.0));
    // Non-streaming responses have no first token.
    assert_eq!(m.value(r#"llm_time_to_first_token_ms_count{model="gpt-4o"}"#), None);
}

#[test]
fn streaming_chat_split_at_odd_places_is_metered() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    // The mock writes the event stream in 7-byte pieces with a pause between them, so events,
    // lines and the usage JSON reach the filter split across many body chunks.
    for split in ["7", "1", "64"] {
        let headers = [
            ("x-app-id", "cli"),
            ("x-mock-prompt-tokens", "42"),
            ("x-mock-completion-tokens", "12"),
            ("x-mock-split", split),
            ("x-mock-split-delay-ms", "1"),
        ];
        let (status, body) = post(&envoy.url(CHAT), &headers, &chat_body("gpt-4o-mini", true));
        assert_eq!(status, 200);
        assert!(body.ends_with("data: [DONE]\n\n"), "stream passed through intact");
    }
    let m = envoy.wait_value(&requests("gpt-4o-mini", "cli", "chat", 200, "none"), 3.0);
    assert_eq!(m.value(&tokens("gpt-4o-mini", "cli", "input")), Some(126.0));
    assert_eq!(m.value(&tokens("gpt-4o-mini", "cli", "output")), Some(36.0));
    assert_eq!(m.value(&active("gpt-4o-mini")), Some(0.0));
    assert_eq!(m.value(r#"llm_usage_missing_total{model="gpt-4o-mini"}"#), None);
    // No pricing for gpt-4o-mini in this configuration: no cost series.
    assert_eq!(m.value(r#"llm_cost_microusd_total{model="gpt-4o-mini",app="cli"}"#), None);
    let m = envoy.wait_value(r#"llm_time_to_first_token_ms_count{model="gpt-4o-mini"}"#, 3.0);
    assert_eq!(m.value(r#"llm_request_duration_ms_count{model="gpt-4o-mini"}"#), Some(3.0));
}

#[test]
fn time_to_first_token_and_duration_follow_the_upstream() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    // Headers after 300 ms, then 10 events 50 ms apart: TTFT ≈ 300 ms, duration ≈ 800 ms.
    let headers = [("x-mock-delay-ms", "300"), ("x-mock-chunk-delay-ms", "50"), ("x-mock-completion-tokens", "8")];
    let (status, _) = post(&envoy.url(CHAT), &headers, &chat_body("gpt-4o", true));
    assert_eq!(status, 200);
    let m = envoy.wait_value(r#"llm_time_to_first_token_ms_count{model="gpt-4o"}"#, 1.0);
    let ttft = m.value(r#"llm_time_to_first_token_ms_sum{model="gpt-4o"}"#).unwrap();
    let duration = m.value(r#"llm_request_duration_ms_sum{model="gpt-4o"}"#).unwrap();
    assert!((300.0..700.0).contains(&ttft), "ttft {ttft}");
    assert!(duration >= ttft + 400.0 && duration < 3000.0, "duration {duration}, ttft {ttft}");
    assert_eq!(m.value(r#"llm_time_to_first_token_ms_bucket{model="gpt-4o",le="200"}"#), Some(0.0));
    assert_eq!(m.value(r#"llm_time_to_first_token_ms_bucket{model="gpt-4o",le="1000"}"#), Some(1.0));
}

#[test]
fn a_usage_key_inside_content_is_not_counted() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    let fake = r#"{"usage": {"prompt_tokens": 999999, "completion_tokens": 999999}}"#;
    let headers = [("x-mock-content", fake), ("x-mock-prompt-tokens", "5"), ("x-mock-completion-tokens", "6")];
    post(&envoy.url(CHAT), &headers, &chat_body("gpt-4o", false));
    post(&envoy.url(CHAT), &headers, &chat_body("gpt-4o", true));
    let m = envoy.wait_value(&requests("gpt-4o", "unknown", "chat", 200, "none"), 2.0);
    assert_eq!(m.value(&tokens("gpt-4o", "unknown", "input")), Some(10.0));
    assert_eq!(m.value(&tokens("gpt-4o", "unknown", "output")), Some(12.0));
}

#[test]
fn embeddings_and_legacy_completions_are_metered() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    let body = r#"{"model":"text-embedding-3-small","input":["alpha","beta","gamma"],"dimensions":1536}"#;
    let (status, _) = post(&envoy.url("/v1/embeddings"), &[("x-mock-prompt-tokens", "5000")], body);
    assert_eq!(status, 200);
    let body = r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Once upon a time","max_tokens":7}"#;
    let (status, _) = post(&envoy.url("/v1/completions"), &[("x-mock-prompt-tokens", "4")], body);
    assert_eq!(status, 200);

    let m = envoy.wait_value(&requests("text-embedding-3-small", "unknown", "embeddings", 200, "none"), 1.0);
    assert_eq!(m.value(&tokens("text-embedding-3-small", "unknown", "input")), Some(5000.0));
    assert_eq!(m.value(&tokens("text-embedding-3-small", "unknown", "output")), Some(0.0));
    // 5000 tokens at $0.02 per 1M = 100 µUSD.
    assert_eq!(m.value(r#"llm_cost_microusd_total{model="text-embedding-3-small",app="unknown"}"#), Some(100.0));
    let m = envoy.wait_value(&requests("gpt-3.5-turbo-instruct", "unknown", "completion", 200, "none"), 1.0);
    assert_eq!(m.value(&tokens("gpt-3.5-turbo-instruct", "unknown", "input")), Some(4.0));
    assert_eq!(m.value(&tokens("gpt-3.5-turbo-instruct", "unknown", "output")), Some(7.0));
}

#[test]
fn upstream_errors_are_classified() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    for scenario in ["rate_limit", "rate_limit", "server_error", "unavailable"] {
        let (status, _) = post(&envoy.url(CHAT), &[("x-mock-scenario", scenario)], &chat_body("gpt-4o", false));
        assert!(status >= 400);
    }
    let m = envoy.wait_value(&requests("gpt-4o", "unknown", "chat", 429, "upstream_rate_limit"), 2.0);
    assert_eq!(m.value(&requests("gpt-4o", "unknown", "chat", 500, "server_error")), Some(1.0));
    let m = envoy.wait_value(&requests("gpt-4o", "unknown", "chat", 503, "server_error"), 1.0);
    // Errors carry no usage, and that is not a blind spot.
    assert_eq!(m.value(r#"llm_usage_missing_total{model="gpt-4o"}"#), None);
    assert_eq!(m.sum("llm_tokens_total", &[("model", "gpt-4o")]), 0.0);
    assert_eq!(m.value(&active("gpt-4o")), Some(0.0));
}

#[test]
fn upstream_down_is_a_network_error() {
    let mock = Mock::start();
    let dead_port = mock.port;
    drop(mock);
    let envoy = Envoy::start(dead_port, DEFAULT_CONFIG);
    let (status, _) = post(&envoy.url(CHAT), &[], &chat_body("gpt-4o", false));
    assert_eq!(status, 503);
    let m = envoy.wait_value(&requests("gpt-4o", "unknown", "chat", 503, "network"), 1.0);
    assert_eq!(m.value(&active("gpt-4o")), Some(0.0));
}

#[test]
fn reset_mid_stream_counts_as_network_error_and_balances_the_gauge() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    let headers =
        [("x-mock-scenario", "reset_mid_stream"), ("x-mock-completion-tokens", "40"), ("x-mock-chunk-delay-ms", "5")];
    let result = common::client()
        .post(&envoy.url(CHAT))
        .header("content-type", "application/json")
        .header("x-mock-scenario", headers[0].1)
        .header("x-mock-completion-tokens", headers[1].1)
        .header("x-mock-chunk-delay-ms", headers[2].1)
        .send(&chat_body("gpt-4o", true));
    // The client sees the 200 headers, then a truncated stream (or an error reading it).
    if let Ok(mut resp) = result {
        assert_eq!(resp.status().as_u16(), 200);
        let _ = resp.body_mut().read_to_string();
    }
    let m = envoy.wait_value(&requests("gpt-4o", "unknown", "chat", 200, "network"), 1.0);
    assert_eq!(m.value(&active("gpt-4o")), Some(0.0));
    // The stream was cut before its usage chunk: a failed request, not a metering blind spot
    // (`usage_missing` is for completed 2xx responses without usage; never defined here).
    assert_eq!(m.value(r#"llm_usage_missing_total{model="gpt-4o"}"#), None);
    envoy.wait_value(r#"llm_request_duration_ms_count{model="gpt-4o"}"#, 1.0);
}

#[test]
fn client_cancel_mid_stream_is_canceled_and_balances_the_gauge() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    // Read the headers and the first events, then go away mid-stream.
    let s = common::open_stream(envoy.port, &chat_body("gpt-4o", true), 200, 50);
    // While the stream runs the request is active.
    envoy.wait_value(&active("gpt-4o"), 1.0);
    drop(s);
    let m = envoy.wait_value(&requests("gpt-4o", "unknown", "chat", 200, "canceled"), 1.0);
    assert_eq!(m.value(&active("gpt-4o")), Some(0.0));
    // A stream the client left is no metering blind spot.
    assert_eq!(m.value(r#"llm_usage_missing_total{model="gpt-4o"}"#), None);
}

#[test]
fn models_outside_the_allowlist_are_other() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, r#"{"metrics": {"models": ["gpt-4o"]}}"#);
    for model in ["gpt-4o", "llama-3.1-70b", "mistral-large", "evil\"model{x}"] {
        let (status, _) = post(&envoy.url(CHAT), &[("x-mock-prompt-tokens", "10")], &chat_body(model, false));
        assert_eq!(status, 200);
    }
    let m = envoy.wait_value(&requests("other", "unknown", "chat", 200, "none"), 3.0);
    assert_eq!(m.value(&requests("gpt-4o", "unknown", "chat", 200, "none")), Some(1.0));
    assert_eq!(m.value(&tokens("other", "unknown", "input")), Some(30.0));
    let models: Vec<String> = m.names_with_prefix("llm_requests_total");
    assert_eq!(models.len(), 2, "{models:?}");
}

#[test]
fn first_seen_models_are_bounded_across_workers() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, r#"{"metrics": {"max_models": 3}}"#);
    // Fresh connections spread requests over both workers.
    for i in 0..12 {
        let (status, _) = post(&envoy.url(CHAT), &[("connection", "close")], &chat_body(&format!("model-{i}"), false));
        assert_eq!(status, 200);
    }
    let m = envoy.wait_value(
        r#"llm_requests_total{model="model-0",app="unknown",operation="chat",status="200",error_type="none"}"#,
        1.0,
    );
    let m = if m.sum("llm_requests_total", &[]) == 12.0 {
        m
    } else {
        envoy.wait_value(&requests("other", "unknown", "chat", 200, "none"), 9.0)
    };
    assert_eq!(m.value(&requests("other", "unknown", "chat", 200, "none")), Some(9.0));
    for i in 0..3 {
        assert_eq!(m.value(&requests(&format!("model-{i}"), "unknown", "chat", 200, "none")), Some(1.0));
    }
}

#[test]
fn app_label_comes_from_the_configured_header_and_is_sanitized() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, r#"{"metrics": {"app_header": "x-app-id", "max_apps": 2}}"#);
    for app in ["web", "batch job", "third"] {
        post(&envoy.url(CHAT), &[("x-app-id", app)], &chat_body("gpt-4o", false));
    }
    let m = envoy.wait_value(&requests("gpt-4o", "other", "chat", 200, "none"), 1.0);
    assert_eq!(m.value(&requests("gpt-4o", "web", "chat", 200, "none")), Some(1.0));
    assert_eq!(m.value(&requests("gpt-4o", "batch_job", "chat", 200, "none")), Some(1.0));
}

#[test]
fn hostile_header_bytes_and_unmetered_paths_pass_through() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    // A non-UTF-8 app header value: the SDK's string helpers would abort the VM on it.
    let body = chat_body("gpt-4o", false);
    let mut s = TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
    s.write_all(
        format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\nconnection: close\r\ncontent-type: application/json\r\nx-app-id: ")
            .as_bytes(),
    )
    .unwrap();
    s.write_all(b"caf\xe9\xff").unwrap();
    s.write_all(format!("\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let m = envoy.wait_value(&requests("gpt-4o", "caf__", "chat", 200, "none"), 1.0);
    // /v1/models is no LLM operation: passed through, not metered.
    let (code, _) = common::http_get(envoy.port, "/v1/models").unwrap();
    assert_eq!(code, 200);
    assert_eq!(envoy.settled().sum("llm_requests_total", &[]), m.sum("llm_requests_total", &[]));
    assert!(!envoy.log().contains("panicked"), "{}", envoy.log());
}

#[test]
fn invalid_configuration_is_refused_with_the_field_named() {
    let mock = Mock::start();
    for (config, field) in [
        (r#"{"metrics": {"max_models": 0}}"#, "metrics.max_models"),
        (r#"{"metrics": {"prefix": "llm", "colour": "blue"}}"#, "metrics.colour"),
        (r#"{"pricing": {"gpt-4o": {"input": -1, "output": 1}}}"#, "pricing.gpt-4o.input"),
    ] {
        match Envoy::try_start(mock.port, config) {
            Ok(mut e) => panic!("Envoy accepted {config}; running: {}\n{}", e.is_running(), e.log()),
            Err(log) => {
                assert!(log.contains(&format!("llm-meter: invalid configuration: {field}:")), "{config}: {log}");
            }
        }
    }
}

#[test]
fn custom_prefix_renames_every_metric() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, r#"{"metrics": {"prefix": "genai"}}"#);
    post(&envoy.url(CHAT), &[], &chat_body("gpt-4o", false));
    let m = envoy.wait_value(
        r#"genai_requests_total{model="gpt-4o",app="unknown",operation="chat",status="200",error_type="none"}"#,
        1.0,
    );
    assert!(m.names_with_prefix("llm_").is_empty());
    envoy.wait_value(r#"genai_request_duration_ms_count{model="gpt-4o"}"#, 1.0);
}

#[test]
fn large_request_bodies_stream_through_and_the_model_is_still_found() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    // 3 MiB of prompt before the model key (OpenAI's Python SDK puts `model` after `messages`):
    // beyond the model lookahead and Envoy's default 1 MiB buffer limit, so the filter must let
    // the body stream instead of holding it.
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "a".repeat(3 << 20)}],
        "model": "gpt-4o",
    })
    .to_string();
    assert!(body.find("\"model\"").unwrap() > 3 << 20);
    let (status, resp) = post(&envoy.url(CHAT), &[("x-mock-completion-tokens", "3")], &body);
    assert_eq!(status, 200, "{resp}");
    let m = envoy.wait_value(&requests("gpt-4o", "unknown", "chat", 200, "none"), 1.0);
    // The mock estimates ~4 bytes per token: 3 + 4 + 3 MiB / 4.
    assert_eq!(m.value(&tokens("gpt-4o", "unknown", "input")), Some(7.0 + (3 << 20) as f64 / 4.0));
    assert_eq!(m.value(&active("gpt-4o")), Some(0.0));
}

/// Sends a chunked POST whose body arrives in `pieces`, `gap` apart; returns the response head.
fn post_in_pieces(port: u16, path: &str, pieces: &[&str], gap: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    for piece in pieces {
        std::thread::sleep(gap);
        write!(s, "{:x}\r\n{piece}\r\n", piece.len()).unwrap();
    }
    write!(s, "0\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw
}

#[test]
fn a_body_arriving_in_pieces_is_held_until_the_model_and_forwarded_intact() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    // The model only arrives in the third piece: the request stays held (Envoy buffers the
    // pieces) and the filter reads each new piece once from the growing buffer.
    let content = "b".repeat(4000);
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{content}"}}],"model":"gpt-4o-mini"}}"#);
    let (a, rest) = body.split_at(1500);
    let (b, c) = rest.split_at(rest.len() - 12);
    let resp = post_in_pieces(envoy.port, CHAT, &[a, b, c], Duration::from_millis(100));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let m = envoy.wait_value(&requests("gpt-4o-mini", "unknown", "chat", 200, "none"), 1.0);
    // The mock counts ~4 bytes per token: 3 + 4 + 4000 / 4 means the body arrived intact.
    assert_eq!(m.value(&tokens("gpt-4o-mini", "unknown", "input")), Some(1007.0));
    assert_eq!(m.value(r#"llm_meter_errors_total{kind="hold_stalled"}"#).unwrap_or(0.0), 0.0);
}

#[test]
fn without_allow_on_headers_stop_iteration_holds_are_released_and_switched_off() {
    let mock = Mock::start();
    let yaml = common::render_config(mock.port, DEFAULT_CONFIG);
    let flag = "allow_on_headers_stop_iteration: true";
    assert!(yaml.contains(flag), "envoy.yaml must ship {flag}");
    let envoy = Envoy::try_start_yaml(&yaml.replace(flag, "allow_on_headers_stop_iteration: false")).unwrap();
    let mut slow = 0;
    for _ in 0..6 {
        let started = std::time::Instant::now();
        let (status, body) = post(
            &envoy.url(CHAT),
            &[("connection", "close"), ("x-mock-prompt-tokens", "10")],
            &chat_body("gpt-4o", false),
        );
        assert_eq!(status, 200, "{body}");
        if started.elapsed() >= Duration::from_millis(900) {
            slow += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "a stalled hold must be released within ~1 s");
    }
    // Each of Envoy's 2 workers pays the stall once at most, then stops holding.
    let m = envoy.wait_value(&requests("gpt-4o", "unknown", "chat", 200, "none"), 6.0);
    let stalls = m.value(r#"llm_meter_errors_total{kind="hold_stalled"}"#).unwrap_or(0.0);
    assert!((1.0..=2.0).contains(&stalls), "hold_stalled = {stalls}");
    assert_eq!(stalls, f64::from(slow), "every slow request is a counted stall");
    assert_eq!(m.value(&tokens("gpt-4o", "unknown", "input")), Some(60.0));
    assert!(envoy.log().contains("allow_on_headers_stop_iteration"), "the log names the fix");
}

#[test]
fn streams_without_include_usage_are_metered_and_the_client_sees_its_own_stream() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, DEFAULT_CONFIG);
    let headers = [("x-mock-prompt-tokens", "42"), ("x-mock-completion-tokens", "7"), ("x-mock-split", "13")];
    // No stream_options: the filter adds include_usage upstream and cuts the usage chunk out.
    let body = serde_json::json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (status, text) = post(&envoy.url(CHAT), &headers, &body.to_string());
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("prompt_tokens"), "the client did not ask for usage: {text}");
    // The role chunk and the 7 content chunks.
    assert_eq!(text.matches("\"content\"").count(), 8, "every content chunk arrives: {text}");
    let m = envoy.wait_value(&tokens("gpt-4o", "unknown", "input"), 42.0);
    assert_eq!(m.value(&tokens("gpt-4o", "unknown", "output")), Some(7.0));
    assert_eq!(m.value(r#"llm_usage_missing_total{model="gpt-4o"}"#).unwrap_or(0.0), 0.0);

    // A client that asks for usage gets the usage chunk, as sent.
    let mut asked = body.clone();
    asked["stream_options"] = serde_json::json!({"include_usage": true});
    let (_, text) = post(&envoy.url(CHAT), &headers, &asked.to_string());
    assert!(text.contains("\"prompt_tokens\":42"), "{text}");
    envoy.wait_value(&tokens("gpt-4o", "unknown", "input"), 84.0);

    // Switched off: a stream without include_usage is a counted blind spot.
    drop(envoy);
    let envoy = Envoy::start(mock.port, r#"{"inject_stream_usage": false}"#);
    let (_, text) = post(&envoy.url(CHAT), &headers, &body.to_string());
    assert!(!text.contains("prompt_tokens"));
    envoy.wait_value(r#"llm_usage_missing_total{model="gpt-4o"}"#, 1.0);
}

#[test]
fn upstream_timeouts_are_timeouts() {
    let mock = Mock::start();
    let yaml = common::render_config(mock.port, DEFAULT_CONFIG);
    assert!(yaml.contains("timeout: 300s"));
    let envoy = Envoy::try_start_yaml(&yaml.replace("timeout: 300s", "timeout: 0.5s")).unwrap();
    // The upstream answers after 2 s: Envoy gives up at 0.5 s with a 504 (flag UT).
    let (status, _) = post(&envoy.url(CHAT), &[("x-mock-delay-ms", "2000")], &chat_body("gpt-4o", false));
    assert_eq!(status, 504);
    let m = envoy.wait_value(&requests("gpt-4o", "unknown", "chat", 504, "timeout"), 1.0);
    assert_eq!(m.value(&active("gpt-4o")), Some(0.0));
    let m = envoy.wait_value(r#"llm_request_duration_ms_count{model="gpt-4o"}"#, 1.0);
    assert_close(m.value(r#"llm_request_duration_ms_sum{model="gpt-4o"}"#), 500.0);
}
