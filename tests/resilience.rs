//! The per-model circuit breaker and fallback chains through the real Envoy (two workers), in
//! front of the mock gateway failing on command (`x-mock-fail-model: <model>=<status>`; every
//! answer names the model the mock received, so each reply tells where its request went):
//! circuits open after `failures` failures in a row and requests go to the next model of the
//! chain, metered as that model; one probe per half-open period across workers and concurrent
//! clients; an upstream 429's `retry-after` sets how long; a whole chain open is answered
//! locally without calling the upstream; usage stays exact in every format; bad configurations
//! are refused with the field named.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, raw_post, read_reply, send, Envoy, Metrics, Mock, RawReply};
use serde_json::{json, Value};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";
const ALL_CLASSES: &str = r#"["upstream_rate_limit", "server_error", "timeout", "network"]"#;

/// The issue's configuration, with `open_seconds` and `on` given, claude-sonnet-4 and
/// deepseek-v3.2 priced, and a Gemini chain.
fn config(open_seconds: u64, on: &str) -> String {
    format!(
        r#"{{
  "pricing": {{"claude-sonnet-4": {{"input": 3, "output": 15}},
               "deepseek-v3.2": {{"input": 1, "output": 2}}}},
  "resilience": {{
    "circuit_breaker": {{"failures": 3, "open_seconds": {open_seconds}, "half_open_requests": 1, "on": {on}}},
    "fallbacks": {{"gpt-4.1": ["claude-sonnet-4", "gemini-2.5-flash"],
                  "gemini-2.5-pro": ["gemini-2.5-flash"],
                  "*": ["deepseek-v3.2"]}}
  }}
}}"#
    )
}

fn chat(model: &str, stream: bool, include_usage: bool) -> String {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]});
    if stream {
        v["stream"] = true.into();
        if include_usage {
            v["stream_options"] = json!({"include_usage": true});
        }
    }
    v.to_string()
}

fn messages(model: &str, stream: bool) -> String {
    json!({"model": model, "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": "Say hello"}]})
        .to_string()
}

fn requests(model: &str, op: &str, status: u16, error: &str) -> String {
    format!(
        r#"llm_requests_total{{model="{model}",app="unknown",operation="{op}",status="{status}",error_type="{error}"}}"#
    )
}

fn tokens(model: &str, token_type: &str) -> String {
    format!(r#"llm_tokens_total{{model="{model}",app="unknown",token_type="{token_type}"}}"#)
}

fn state(model: &str) -> String {
    format!(r#"llm_model_state{{model="{model}"}}"#)
}

fn transitions(model: &str, state: &str) -> String {
    format!(r#"llm_circuit_transitions_total{{model="{model}",state="{state}"}}"#)
}

fn fallbacks(model: &str, to: &str) -> String {
    format!(r#"llm_fallbacks_total{{model="{model}",to="{to}"}}"#)
}

/// Requests Envoy sent to the gateway (the mock), from its cluster stats.
fn upstream_requests(m: &Metrics) -> f64 {
    m.value(r#"envoy_cluster_upstream_rq_total{envoy_cluster_name="llm_gateway"}"#).expect("cluster stats")
}

/// Where a request went, from its reply: answered by the filter itself, or the model the mock
/// received (its answer's `model` / `modelVersion`, or the model its scripted failure names).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Went {
    Local,
    Mock(String),
}

fn went(body: &str) -> Went {
    // A JSON body, or the first SSE event's data.
    let doc = body.lines().find_map(|l| l.strip_prefix("data: ").filter(|d| d.starts_with('{'))).map_or(body, |d| d);
    let v: Value = serde_json::from_str(doc).unwrap_or_else(|e| panic!("{e}: {body}"));
    if v["error"]["code"] == "model_unavailable" {
        return Went::Local;
    }
    let failed = v["error"]["message"].as_str().and_then(|m| m.split("for model \"").nth(1)?.split('"').next());
    let model = failed
        .or(v["model"].as_str())
        .or(v["message"]["model"].as_str())
        .or(v["modelVersion"].as_str())
        .unwrap_or_else(|| panic!("no model in {body}"));
    Went::Mock(model.to_string())
}

fn at(model: &str) -> Went {
    Went::Mock(model.to_string())
}

fn post_on(s: &mut TcpStream, path: &str, headers: &[(&str, &str)], body: &str) -> RawReply {
    raw_post(s, path, headers, body).expect("send");
    let r = read_reply(s, Duration::from_secs(10));
    assert!(r.complete, "incomplete reply: {r:?}");
    r
}

#[test]
fn three_failures_open_the_circuit_and_the_next_request_goes_to_the_chain_on_any_worker() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, &config(30, ALL_CLASSES));
    let fail = ("x-mock-fail-model", "gpt-4.1=503");
    // Three 503s for gpt-4.1, all on worker 0.
    let mut w0 = envoy.connect_on_worker(0);
    for _ in 0..3 {
        let r = post_on(&mut w0, CHAT, &[fail], &chat("gpt-4.1", false, false));
        assert_eq!((r.status, went(&r.text())), (503, at("gpt-4.1")), "{}", r.text());
        assert_eq!(r.header("x-llm-fallback-from"), None);
    }
    let m = envoy.wait_value(&state("gpt-4.1"), 2.0);
    assert_eq!(m.value(&transitions("gpt-4.1", "open")), Some(1.0));
    assert_eq!(m.value(&requests("gpt-4.1", "chat", 503, "server_error")), Some(3.0));

    // The 4th, on the other worker, reaches the mock as claude-sonnet-4: the circuit is one.
    let mut w1 = envoy.connect_on_worker(1);
    let usage = [fail, ("x-mock-prompt-tokens", "100"), ("x-mock-completion-tokens", "20")];
    let r = post_on(&mut w1, CHAT, &usage, &chat("gpt-4.1", false, false));
    assert_eq!((r.status, went(&r.text())), (200, at("claude-sonnet-4")), "{}", r.text());
    assert_eq!(r.header("x-llm-fallback-from"), Some("gpt-4.1"));
    let body: Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 100, "the upstream's answer reaches the client");

    // Metered, priced and counted as the model that served it.
    let m = envoy.wait_value(&requests("claude-sonnet-4", "chat", 200, "none"), 1.0);
    assert_eq!(m.value(&fallbacks("gpt-4.1", "claude-sonnet-4")), Some(1.0));
    assert_eq!(m.value(&tokens("claude-sonnet-4", "input")), Some(100.0));
    assert_eq!(m.value(&tokens("claude-sonnet-4", "output")), Some(20.0));
    assert_eq!(
        m.value(r#"llm_cost_microusd_total{model="claude-sonnet-4",app="unknown"}"#),
        Some(100.0 * 3.0 + 20.0 * 15.0)
    );
    assert_eq!(m.value(&tokens("gpt-4.1", "input")), None);
    assert_eq!(m.value(&requests("gpt-4.1", "chat", 200, "none")), None);
    assert_eq!(m.value(&state("gpt-4.1")), Some(2.0));
    assert_eq!(m.value(&state("claude-sonnet-4")), None, "claude's circuit never changed");
    assert_eq!(m.value(r#"llm_active_requests{model="claude-sonnet-4"}"#), Some(0.0));
    assert!(envoy.log().contains("llm-meter: the circuit of model gpt-4.1 is now open"));
}

/// One reply of a client of [`one_probe_per_half_open_period_across_workers_and_32_clients`].
#[derive(Debug)]
struct Sample {
    /// When it was sent and answered, from the moment the circuit opened.
    sent: Duration,
    answered: Duration,
    status: u16,
    went: Went,
}

#[test]
fn one_probe_per_half_open_period_across_workers_and_32_clients() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, &config(2, ALL_CLASSES));
    let agent = client();
    let fail = ("x-mock-fail-model", "gpt-4.1=503");
    for _ in 0..3 {
        let r = send(&agent, &envoy.url(CHAT), &[fail], &chat("gpt-4.1", false, false));
        assert_eq!(r.status, 503);
    }
    // Opened at about t0, for 2 s.
    let t0 = Instant::now();
    // 32 clients, a connection each (spread over both workers), send requests for gpt-4.1 that
    // take 300 ms at the mock, so a probe is in flight while many other requests arrive. Until
    // 3.5 s gpt-4.1 keeps failing: the probe at 2 s fails, the circuit reopens until ~4.3 s.
    // Then it works: the probe at ~4.3 s succeeds and closes the circuit.
    const FAILING_UNTIL: Duration = Duration::from_millis(3500);
    // Long enough for the latest close the windows below accept (first probe by 2.5 s, 300 ms at
    // the mock, reopened for up to 2.5 s, 300 ms again) plus the 500 ms checked after it; at
    // 5.8 s a 2-core CI machine under load closed the circuit too late to check (measured
    // here with the file's other tests and token_admission running beside it, as in CI: the
    // second probe answered at 4.95-5.04 s).
    const UNTIL: Duration = Duration::from_millis(6300);
    let before = envoy.accepted_by_worker();
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let port = envoy.port;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                let mut out = Vec::new();
                loop {
                    let sent = t0.elapsed();
                    if sent > UNTIL {
                        return out;
                    }
                    let mut headers = vec![("x-mock-delay-ms", "300")];
                    if sent < FAILING_UNTIL {
                        headers.push(("x-mock-fail-model", "gpt-4.1=503"));
                    }
                    let r = post_on(&mut s, CHAT, &headers, &chat("gpt-4.1", false, false));
                    out.push(Sample { sent, answered: t0.elapsed(), status: r.status, went: went(&r.text()) });
                }
            })
        })
        .collect();
    let samples: Vec<Sample> = clients.into_iter().flat_map(|c| c.join().expect("client")).collect();
    let after = envoy.accepted_by_worker();
    let per_worker: Vec<u64> = after.iter().map(|(w, n)| n - before.get(w).copied().unwrap_or(0)).collect();
    assert!(per_worker.len() == 2 && per_worker.iter().all(|&n| n > 0), "connections per worker: {per_worker:?}");

    let to = |model: &str| samples.iter().filter(|s| s.went == at(model)).collect::<Vec<_>>();
    let (gpt, claude) = (to("gpt-4.1"), to("claude-sonnet-4"));
    assert_eq!(gpt.len() + claude.len(), samples.len(), "no local 503, no other model: {samples:?}");
    assert!(claude.iter().all(|s| s.status == 200));
    // Failing phase: exactly one request reached gpt-4.1, the probe at ~2 s, and it failed.
    let failing: Vec<_> = gpt.iter().filter(|s| s.sent < FAILING_UNTIL).collect();
    assert_eq!(failing.len(), 1, "one probe while gpt-4.1 fails, of {} requests: {failing:?}", samples.len());
    let probe = failing[0];
    assert_eq!(probe.status, 503);
    assert!(
        (Duration::from_millis(1900)..Duration::from_millis(2500)).contains(&probe.sent),
        "the probe went at {:?}, want ~2 s after the circuit opened",
        probe.sent
    );
    // Working phase: the next probe at ~2 s after the failed one's end; nothing else reached
    // gpt-4.1 while it was in flight (300 ms), everything after its success did.
    let second = gpt.iter().filter(|s| s.sent >= FAILING_UNTIL).min_by_key(|s| s.sent).expect("a second probe");
    assert_eq!(second.status, 200);
    let reopened_for = second.sent.saturating_sub(probe.answered);
    assert!(
        (Duration::from_millis(1800)..Duration::from_millis(2500)).contains(&reopened_for),
        "second probe {:?} after the first failed: want ~2 s (open_seconds)",
        reopened_for
    );
    let in_flight = gpt.iter().filter(|s| s.sent < second.sent + Duration::from_millis(150)).count();
    assert_eq!(in_flight, 2, "one probe per half-open period: {gpt:?}");
    let closed_at = second.answered + Duration::from_millis(100);
    assert!(closed_at < UNTIL - Duration::from_millis(500), "the run ends too soon after the close");
    let late: Vec<_> = samples.iter().filter(|s| s.sent > closed_at && s.went != at("gpt-4.1")).collect();
    assert!(late.is_empty(), "closed, yet went elsewhere: {late:?}");

    let m = envoy.wait_value(&transitions("gpt-4.1", "closed"), 1.0);
    assert_eq!(m.value(&state("gpt-4.1")), Some(0.0));
    assert_eq!(m.value(&transitions("gpt-4.1", "open")), Some(2.0));
    assert_eq!(m.value(&transitions("gpt-4.1", "half_open")), Some(2.0));
    let m = envoy.wait_value(&requests("claude-sonnet-4", "chat", 200, "none"), claude.len() as f64);
    assert_eq!(m.value(&fallbacks("gpt-4.1", "claude-sonnet-4")), Some(claude.len() as f64));
    assert_eq!(m.value(&requests("gpt-4.1", "chat", 503, "server_error")), Some(4.0));
    assert_eq!(m.value(&requests("gpt-4.1", "chat", 200, "none")), Some(gpt.len() as f64 - 1.0));
    eprintln!(
        "{} requests from 32 clients ({per_worker:?} connections per worker): {} to gpt-4.1 \
         (probes at {:?} and {:?}), {} to claude-sonnet-4",
        samples.len(),
        gpt.len(),
        probe.sent,
        second.sent,
        claude.len()
    );
}

#[test]
fn an_upstream_429_opens_the_circuit_for_as_long_as_it_says_when_counted() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, &config(30, ALL_CLASSES));
    let agent = client();
    let url = envoy.url(CHAT);
    let limited = [("x-mock-fail-model", "gpt-4.1=429"), ("x-mock-retry-after", "3")];
    let r = send(&agent, &url, &limited, &chat("gpt-4.1", false, false));
    assert_eq!((r.status, r.header("retry-after")), (429, Some("3")), "{}", r.body);
    let t0 = Instant::now();
    // One 429 opened it (failures: 3), for 3 s, not open_seconds (30 s).
    envoy.wait_value(&state("gpt-4.1"), 2.0);
    let back = loop {
        let r = send(&agent, &url, &[], &chat("gpt-4.1", false, false));
        assert_eq!(r.status, 200);
        if went(&r.body) == at("gpt-4.1") {
            break t0.elapsed();
        }
        assert_eq!(went(&r.body), at("claude-sonnet-4"));
        assert!(t0.elapsed() < Duration::from_secs(6), "still open after 6 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!((Duration::from_millis(2800)..Duration::from_millis(3600)).contains(&back), "back after {back:?}");
    let m = envoy.wait_value(&transitions("gpt-4.1", "closed"), 1.0);
    assert_eq!(m.value(&transitions("gpt-4.1", "open")), Some(1.0));
    assert_eq!(m.value(&requests("gpt-4.1", "chat", 429, "upstream_rate_limit")), Some(1.0));

    // Without upstream_rate_limit in `on` (a gateway with per-key quotas), 429s open nothing.
    drop(envoy);
    let envoy = Envoy::start(mock.port, &config(30, r#"["server_error", "timeout", "network"]"#));
    let url = envoy.url(CHAT);
    for _ in 0..5 {
        let r = send(&agent, &url, &limited, &chat("gpt-4.1", false, false));
        assert_eq!((r.status, went(&r.body)), (429, at("gpt-4.1")));
    }
    let r = send(&agent, &url, &[], &chat("gpt-4.1", false, false));
    assert_eq!((r.status, went(&r.body)), (200, at("gpt-4.1")));
    let m = envoy.wait_value(&requests("gpt-4.1", "chat", 429, "upstream_rate_limit"), 5.0);
    assert_eq!(m.value(&state("gpt-4.1")), None);
    assert_eq!(m.names_with_prefix("llm_fallbacks_total"), Vec::<String>::new());
}

#[test]
fn a_whole_chain_open_is_answered_locally_at_once() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, &config(30, ALL_CLASSES));
    let agent = client();
    let url = envoy.url(CHAT);
    let fail = [("x-mock-fail-model", "gpt-4.1=503,claude-sonnet-4=503,gemini-2.5-flash=500")];
    // Each model of the chain fails three times in turn: the requests walk down the chain.
    for (i, model) in ["gpt-4.1", "claude-sonnet-4", "gemini-2.5-flash"].into_iter().enumerate() {
        for _ in 0..3 {
            let r = send(&agent, &url, &fail, &chat("gpt-4.1", false, false));
            assert_eq!(went(&r.body), at(model), "{}", r.body);
            assert_eq!(r.status, if model == "gemini-2.5-flash" { 500 } else { 503 });
            assert_eq!(r.header("x-llm-fallback-from"), (i > 0).then_some("gpt-4.1"));
        }
    }
    let m = envoy.wait_value(&state("gemini-2.5-flash"), 2.0);
    assert_eq!(m.value(&state("gpt-4.1")), Some(2.0));
    assert_eq!(m.value(&state("claude-sonnet-4")), Some(2.0));
    let upstream = upstream_requests(&m);
    assert_eq!(upstream, 9.0);

    // Now no model is left: 200 requests answered by the filter, on one connection, timed.
    let mut s = TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut times = Vec::new();
    for i in 0..200 {
        let start = Instant::now();
        let r = post_on(&mut s, CHAT, &fail, &chat("gpt-4.1", i % 2 == 0, false));
        times.push(start.elapsed());
        assert_eq!((r.status, went(&r.text())), (503, Went::Local), "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-llm-fallback-from"), None);
        let retry_after: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).expect("retry-after");
        assert!(
            (25..=30).contains(&retry_after),
            "retry-after {retry_after}: gpt-4.1 reopens first, 30 s after it opened"
        );
        if i == 0 {
            let v: Value = serde_json::from_str(&r.text()).unwrap();
            assert_eq!(
                (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
                (Some("server_error"), Some("model_unavailable"))
            );
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains("gpt-4.1, claude-sonnet-4, gemini-2.5-flash"), "{message}");
        }
    }
    times.sort();
    let median = times[times.len() / 2];
    let m = envoy.wait_value(&requests("gpt-4.1", "chat", 503, "circuit_open"), 200.0);
    assert_eq!(upstream_requests(&m), upstream, "the gateway was never called");
    assert_eq!(
        m.value(r#"llm_ratelimit_rejected_total{model="gpt-4.1",rule="circuit_open",mode="enforce"}"#),
        None,
        "not a rate limit"
    );
    assert_eq!(m.value(r#"llm_active_requests{model="gpt-4.1"}"#), Some(0.0));
    // The whole round trip through Envoy (connection manager, filter, local reply, loopback):
    // the filter's own share is below it.
    eprintln!("local 503: round trip median {median:?}, min {:?}, max {:?}", times[0], times[times.len() - 1]);
    assert!(median < Duration::from_millis(1), "median round trip of a local 503: {median:?}");
}

#[test]
fn fallbacks_meter_usage_exactly_in_every_format() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, &config(30, ALL_CLASSES));
    let agent = client();
    const LONG: &str = "claude-opus-4-1-20250805";
    let fail = [("x-mock-fail-model", "gpt-4.1=503,claude-opus-4=529,gemini-2.5-pro=503,claude-opus-4-1-20250805=503")];
    let gemini_path = |model: &str| format!("/v1beta/models/{model}:generateContent");
    let gemini_body = json!({"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]}).to_string();
    for _ in 0..3 {
        assert_eq!(send(&agent, &envoy.url(CHAT), &fail, &chat("gpt-4.1", false, false)).status, 503);
        // claude-opus-4 has no chain of its own: the `*` chain.
        assert_eq!(send(&agent, &envoy.url(MESSAGES), &fail, &messages("claude-opus-4", false)).status, 529);
        assert_eq!(send(&agent, &envoy.url(&gemini_path("gemini-2.5-pro")), &fail, &gemini_body).status, 503);
        assert_eq!(send(&agent, &envoy.url(CHAT), &fail, &chat(LONG, false, false)).status, 503);
    }
    envoy.wait_value(&state(LONG), 2.0);
    envoy.wait_value(&state("gemini-2.5-pro"), 2.0);
    envoy.wait_value(&state("claude-opus-4"), 2.0);
    envoy.wait_value(&state("gpt-4.1"), 2.0);

    let tokens_of =
        |p: u32, c: u32| [("x-mock-prompt-tokens", p.to_string()), ("x-mock-completion-tokens", c.to_string())];
    let with = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        fail.iter().map(|(k, v)| (*k, v.to_string())).chain(extra.iter().cloned()).collect()
    };
    let go = |path: &str, headers: Vec<(&'static str, String)>, body: &str, served: &str, from: &str| -> String {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = send(&agent, &envoy.url(path), &h, body);
        assert_eq!((r.status, went(&r.body)), (200, at(served)), "{path}: {}", r.body);
        assert_eq!(r.header("x-llm-fallback-from"), Some(from));
        r.body
    };
    // OpenAI chat: non-streaming; streaming asking for usage; streaming without (the filter
    // injects include_usage into the rewritten body and cuts the usage chunk from the stream).
    go(CHAT, with(&tokens_of(100, 20)), &chat("gpt-4.1", false, false), "claude-sonnet-4", "gpt-4.1");
    let asked = go(CHAT, with(&tokens_of(40, 6)), &chat("gpt-4.1", true, true), "claude-sonnet-4", "gpt-4.1");
    assert!(asked.contains("\"prompt_tokens\":40") && asked.ends_with("data: [DONE]\n\n"), "{asked}");
    let injected = go(CHAT, with(&tokens_of(7, 3)), &chat("gpt-4.1", true, false), "claude-sonnet-4", "gpt-4.1");
    assert!(!injected.contains("prompt_tokens") && injected.ends_with("data: [DONE]\n\n"), "{injected}");
    // The same to a model with a shorter name than the one asked for (the body shrinks).
    let shorter = go(CHAT, with(&tokens_of(60, 4)), &chat(LONG, true, false), "deepseek-v3.2", LONG);
    assert!(!shorter.contains("prompt_tokens") && shorter.ends_with("data: [DONE]\n\n"), "{shorter}");
    // Anthropic Messages, both ways, to the `*` chain's deepseek-v3.2.
    go(MESSAGES, with(&tokens_of(300, 30)), &messages("claude-opus-4", false), "deepseek-v3.2", "claude-opus-4");
    let stream =
        go(MESSAGES, with(&tokens_of(50, 5)), &messages("claude-opus-4", true), "deepseek-v3.2", "claude-opus-4");
    assert!(stream.contains("event: message_stop"), "{stream}");
    // Gemini: the model is in the path, which is rewritten.
    go(&gemini_path("gemini-2.5-pro"), with(&tokens_of(11, 2)), &gemini_body, "gemini-2.5-flash", "gemini-2.5-pro");

    envoy.wait_value(&requests("deepseek-v3.2", "chat", 200, "none"), 1.0);
    let m = envoy.wait_value(&requests("deepseek-v3.2", "messages", 200, "none"), 2.0);
    assert_eq!(m.value(&tokens("deepseek-v3.2", "input")), Some(410.0));
    assert_eq!(m.value(&tokens("deepseek-v3.2", "output")), Some(39.0));
    assert_eq!(m.value(r#"llm_cost_microusd_total{model="deepseek-v3.2",app="unknown"}"#), Some(410.0 + 39.0 * 2.0));
    assert_eq!(m.value(r#"llm_usage_missing_total{model="deepseek-v3.2"}"#), None);
    let m = envoy.wait_value(&requests("gemini-2.5-flash", "generate_content", 200, "none"), 1.0);
    assert_eq!(m.value(&tokens("gemini-2.5-flash", "input")), Some(11.0));
    assert_eq!(m.value(&tokens("gemini-2.5-flash", "output")), Some(2.0));
    let m = envoy.wait_value(&requests("claude-sonnet-4", "chat", 200, "none"), 3.0);
    assert_eq!(m.value(&tokens("claude-sonnet-4", "input")), Some(147.0));
    assert_eq!(m.value(&tokens("claude-sonnet-4", "output")), Some(29.0));
    assert_eq!(
        m.value(r#"llm_cost_microusd_total{model="claude-sonnet-4",app="unknown"}"#),
        Some(147.0 * 3.0 + 29.0 * 15.0)
    );
    assert_eq!(m.value(r#"llm_usage_missing_total{model="claude-sonnet-4"}"#), None);
    for model in ["gpt-4.1", "claude-opus-4", "gemini-2.5-pro", LONG] {
        assert_eq!(m.value(&tokens(model, "input")), None, "{model}: its failures carry no usage");
    }
    assert_eq!(m.value(&fallbacks("gpt-4.1", "claude-sonnet-4")), Some(3.0));
    assert_eq!(m.value(&fallbacks("claude-opus-4", "deepseek-v3.2")), Some(2.0));
    assert_eq!(m.value(&fallbacks(LONG, "deepseek-v3.2")), Some(1.0));
    assert_eq!(m.value(&fallbacks("gemini-2.5-pro", "gemini-2.5-flash")), Some(1.0));
    assert_eq!(m.value(&requests("claude-opus-4", "messages", 529, "server_error")), Some(3.0));
    assert_eq!(m.sum("llm_meter_skips_total", &[]), 0.0);
    assert_eq!(m.sum("llm_meter_errors_total", &[]), 0.0);
}

#[test]
fn invalid_resilience_configuration_is_refused_with_the_field_named() {
    let mock = Mock::start();
    let breaker = r#""circuit_breaker": {"failures": 3}"#;
    let cases = [
        (
            r#"{"resilience": {"circuit_breaker": {"on": ["server_error", "slow"]}}}"#.to_string(),
            "resilience.circuit_breaker.on[1]",
        ),
        (
            format!(r#"{{"resilience": {{{breaker}, "fallbacks": {{"gpt-4.1": ["o3", "gpt-4.1"]}}}}}}"#),
            "resilience.fallbacks.gpt-4.1[1]",
        ),
        (
            format!(r#"{{"resilience": {{{breaker}, "fallbacks": {{"a": ["b"], "b": ["c"], "c": ["a"]}}}}}}"#),
            "resilience.fallbacks.a",
        ),
        (format!(r#"{{"resilience": {{{breaker}, "fallbacks": {{"gpt-4.1": []}}}}}}"#), "resilience.fallbacks.gpt-4.1"),
        (r#"{"resilience": {"circuit_breaker": {"failures": 0}}}"#.to_string(), "resilience.circuit_breaker.failures"),
        (r#"{"resilience": {"fallbacks": {"gpt-4.1": ["o3"]}}}"#.to_string(), "resilience.fallbacks"),
    ];
    // In parallel: each Envoy refuses at start-up.
    let port = mock.port;
    let runs: Vec<_> = cases
        .into_iter()
        .map(|(config, field)| std::thread::spawn(move || (field, config.clone(), Envoy::try_start(port, &config))))
        .collect();
    for run in runs {
        let (field, config, result) = run.join().unwrap();
        match result {
            Ok(mut e) => panic!("Envoy accepted {config}; running: {}\n{}", e.is_running(), e.log()),
            Err(log) => {
                assert!(log.contains(&format!("llm-meter: invalid configuration: {field}:")), "{config}: {log}")
            }
        }
    }
}
