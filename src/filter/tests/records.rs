//! Per-request records, time per output token and the OpenTelemetry naming, through the
//! exchange: a record carries exactly what the counters moved by.

use super::*;
use crate::record::{key_hash, Record, RecordUsage};

const PRICED: &str = r#""pricing":{"gpt-4o":{"input":2.5,"output":10,"cached_input":1.25}}"#;

fn last_record(host: &FakeHost) -> Record<'static> {
    let (name, record) = host.records.last().expect("a record").clone();
    assert_eq!(name, "llm_meter");
    record
}

/// Three SSE chunks: the role delta, a content delta, the usage chunk and `[DONE]`.
fn sse_chunks() -> Vec<&'static [u8]> {
    let events: Vec<&str> = CHAT_SSE.split_inclusive("\n\n").collect();
    let (a, b) = CHAT_SSE.split_at(events[0].len());
    let (b, c) = b.split_at(events[1].len());
    vec![a.as_bytes(), b.as_bytes(), c.as_bytes()]
}

#[test]
fn a_non_streaming_record_carries_what_the_counters_moved_by() {
    let mut host = FakeHost::default();
    host.request_headers.insert("authorization".into(), b"Bearer sk-secret-key".to_vec());
    let mut w = worker(&format!("{{{PRICED}}}"));
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[]}"#,
        200,
        "application/json",
        &[CHAT_JSON.as_bytes()],
    );
    assert_eq!(host.records.len(), 1, "one record per exchange, however often on_log runs");
    let r = last_record(&host);
    let tokens =
        |t: &str| counter(&host, &format!("model=.=gpt-4o;.;app=.=unknown;.;token_type=.={t};.;llm_tokens_total"));
    let u = r.usage.expect("usage");
    assert_eq!(
        (u.input, u.output, u.cached_input, u.reasoning, u.cache_creation_input),
        (
            tokens("input"),
            tokens("output"),
            tokens("cached_input"),
            tokens("reasoning"),
            tokens("cache_creation_input")
        )
    );
    assert_eq!(u, RecordUsage { input: 19, output: 10, cached_input: 3, reasoning: 2, cache_creation_input: 0 });
    // 16 × 2.5 + 3 × 1.25 + 10 × 10 = 143.75 micro-USD; the counter keeps the fraction as carry.
    assert_eq!(r.cost_microusd, Some(143.75));
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;llm_cost_microusd_total"), 143);
    assert_eq!(
        (r.request_model.as_deref(), r.model.as_deref(), r.response_model.as_deref()),
        (Some("gpt-4o"), Some("gpt-4o"), Some("gpt-4o-2024-08-06"))
    );
    assert_eq!((r.operation, r.provider, r.status, r.error_type, r.stream), ("chat", "openai", 200, "none", false));
    assert_eq!((r.ttft_ms, r.tpot_ms, r.duration_ms), (None, None, 110));
    assert_eq!(r.key_hash.as_deref(), Some(key_hash(b"Bearer sk-secret-key").as_str()));
    assert!(!r.to_json().contains("sk-secret"));
    // No time per output token without a stream.
    assert!(host.histograms.keys().all(|k| !k.contains("time_per_output_token")));
}

#[test]
fn a_stream_records_time_per_output_token_and_a_single_token_stream_does_not() {
    let mut host = FakeHost::default();
    let mut w = worker(&format!("{{{PRICED},\"inject_stream_usage\":false}}"));
    let chunks = sse_chunks();
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true}"#,
        200,
        "text/event-stream",
        &chunks,
    );
    let r = last_record(&host);
    assert!(r.stream);
    assert_eq!(r.usage.map(|u| (u.input, u.output)), Some((7, 2)));
    // First data 110 ms after the request, the end at 130 ms: (130 − 110) / (2 − 1).
    assert_eq!((r.ttft_ms, r.duration_ms, r.tpot_ms), (Some(110), 130, Some(20.0)));
    assert_eq!(host.histograms["model=.=gpt-4o;.;llm_time_per_output_token_ms"], [20]);

    // One output token: nothing to divide.
    let one = CHAT_SSE.replace("\"completion_tokens\":2", "\"completion_tokens\":1");
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true}"#,
        200,
        "text/event-stream",
        &[one.as_bytes()],
    );
    assert_eq!(last_record(&host).tpot_ms, None);
    assert_eq!(host.histograms["model=.=gpt-4o;.;llm_time_per_output_token_ms"], [20]);
}

#[test]
fn a_rejected_request_names_its_rule_and_an_upstream_error_its_type() {
    let mut host = FakeHost { now: 1_000 * 60_000 * MS, ..FakeHost::default() };
    host.request_headers.insert("x-api-key".into(), b"key-1".to_vec());
    let mut w = worker(
        r#"{"limits":[{"name":"rpm","key":"header:x-api-key","requests_per_minute":1}],
            "records":{"key":"header:x-api-key"}}"#,
    );
    for _ in 0..2 {
        chat_json(&mut host, &mut w);
    }
    let r = last_record(&host);
    assert_eq!((r.status, r.error_type, r.rejected_by.as_deref()), (429, "rate_limited", Some("rpm")));
    assert_eq!(r.usage, None);
    assert_eq!(r.key_hash.as_deref(), Some(key_hash(b"key-1").as_str()));

    let mut w = worker("{}");
    exchange(&mut host, &mut w, "/v1/messages", r#"{"model":"claude"}"#, 429, "application/json", &[b"{}"]);
    let r = last_record(&host);
    assert_eq!((r.status, r.error_type, r.provider, r.rejected_by), (429, "upstream_rate_limit", "anthropic", None));
}

#[test]
fn records_can_be_turned_off_and_unmetered_paths_have_none() {
    let mut host = FakeHost::default();
    let mut w = worker(r#"{"records":{"enabled":false}}"#);
    chat_json(&mut host, &mut w);
    let mut w = worker(r#"{"records":{"filter_state":"meter2"}}"#);
    exchange(&mut host, &mut w, "/v1/models", "", 200, "application/json", &[b"{}"]);
    assert!(host.records.is_empty());
    chat_json(&mut host, &mut w);
    assert_eq!(host.records.len(), 1);
    assert_eq!(host.records[0].0, "meter2");
}

#[test]
fn otel_naming_exports_the_gen_ai_instruments_instead_of_the_default_histograms() {
    for (naming, default, otel) in [("default", true, false), ("otel", false, true), ("both", true, true)] {
        let mut host = FakeHost::default();
        let mut w = worker(&format!(r#"{{"metrics":{{"naming":"{naming}"}},"inject_stream_usage":false}}"#));
        exchange(
            &mut host,
            &mut w,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","stream":true}"#,
            200,
            "text/event-stream",
            &sse_chunks(),
        );
        exchange(
            &mut host,
            &mut w,
            "/v1/models/gemini-2.0-flash:generateContent",
            "{}",
            500,
            "application/json",
            &[b"{}"],
        );
        let h = |name: &str| host.histograms.get(name).cloned();
        assert_eq!(h("model=.=gpt-4o;.;llm_request_duration_ms").is_some(), default, "{naming}");
        assert_eq!(h("model=.=gpt-4o;.;token_type=.=input;.;llm_tokens_per_request").is_some(), default, "{naming}");
        assert_eq!(h("model=.=gpt-4o;.;llm_time_per_output_token_ms").is_some(), default, "{naming}");
        let op = "gen_ai_operation_name_=.=chat;.;gen_ai_provider_name_=.=openai;.;gen_ai_request_model_=.=gpt-4o;.;";
        let usage = |t: &str| h(&format!("{op}gen_ai_token_type_=.={t};.;gen_ai_client_token_usage"));
        let expect = |v: Vec<u64>| if otel { Some(v) } else { None };
        assert_eq!(usage("input"), expect(vec![7]), "{naming}");
        assert_eq!(usage("output"), expect(vec![2]), "{naming}");
        assert_eq!(h(&format!("{op}error_type=.=none;.;gen_ai_server_request_duration_ms")), expect(vec![130]));
        assert_eq!(h(&format!("{op}gen_ai_server_time_to_first_token_ms")), expect(vec![110]));
        assert_eq!(h(&format!("{op}gen_ai_server_time_per_output_token_ms")), expect(vec![20]));
        let gemini = "gen_ai_operation_name_=.=generate_content;.;gen_ai_provider_name_=.=gcp.gemini;.;\
                      gen_ai_request_model_=.=gemini-2.0-flash;.;error_type=.=server_error;.;\
                      gen_ai_server_request_duration_ms";
        assert_eq!(h(gemini), expect(vec![110]), "{naming}");
        // Counters are exported in every mode.
        assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;token_type=.=input;.;llm_tokens_total"), 7);
    }
}

#[test]
fn the_key_hash_follows_records_key() {
    let mut host = FakeHost { client_address: Some(b"10.0.0.1:5123".to_vec()), ..FakeHost::default() };
    host.request_headers.insert("authorization".into(), b"Bearer sk-1".to_vec());
    for (config, want) in [
        (r#"{"records":{"key":"ip"}}"#, Some(key_hash(b"10.0.0.1"))),
        (r#"{"records":{"key":"global"}}"#, None),
        ("{}", Some(key_hash(b"Bearer sk-1"))),
    ] {
        let mut w = worker(config);
        chat_json(&mut host, &mut w);
        assert_eq!(last_record(&host).key_hash.as_deref(), want.as_deref(), "{config}");
    }
    // No key in the request: no hash (an empty header is no key either).
    host.request_headers.insert("authorization".into(), Vec::new());
    let mut w = worker("{}");
    chat_json(&mut host, &mut w);
    assert_eq!(last_record(&host).key_hash, None);
}
