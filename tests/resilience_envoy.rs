//! Retries and provider failover in Envoy, below the filter (issue 16): the shipped
//! `envoy/envoy-resilience.yaml` (route `retry_policy`, aggregate cluster over a primary and a
//! secondary gateway, outlier detection, health checks) with only its ports, the `.wasm` path and
//! the filter configuration swapped, in front of two mocks named `primary` and `secondary` (every
//! answer says which one served it: `x-mock-server`).
//!
//! Whatever Envoy retried below it, the filter meters one request per client request, with the
//! final attempt's status and usage, and counts the retries from `x-envoy-attempt-count`.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, raw_post, read_reply, render_resilience, send, shipped_filter_config, Envoy, Mock, Reply};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

/// Two named gateways and Envoy with the shipped resilience configuration and filter
/// configuration.
fn start() -> (Mock, Mock, Envoy) {
    let primary = Mock::start_named("primary");
    let secondary = Mock::start_named("secondary");
    let yaml = render_resilience(primary.port, secondary.port, &shipped_filter_config());
    let envoy = Envoy::try_start_yaml(&yaml).unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"));
    (primary, secondary, envoy)
}

fn chat(stream: bool) -> String {
    let mut v = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}]});
    if stream {
        v["stream"] = true.into();
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v.to_string()
}

/// Scripted usage of every answer: 100 prompt and 20 completion tokens.
const USAGE: [(&str, &str); 2] = [("x-mock-prompt-tokens", "100"), ("x-mock-completion-tokens", "20")];

fn post(envoy: &Envoy, headers: &[(&str, &str)]) -> Reply {
    let headers: Vec<(&str, &str)> = USAGE.iter().chain(headers).copied().collect();
    send(&client(), &envoy.url(CHAT), &headers, &chat(false))
}

fn requests(status: u16, error: &str) -> String {
    format!(
        r#"llm_requests_total{{model="gpt-4o",app="unknown",operation="chat",status="{status}",error_type="{error}"}}"#
    )
}

fn tokens(token_type: &str) -> String {
    format!(r#"llm_tokens_total{{model="gpt-4o",app="unknown",token_type="{token_type}"}}"#)
}

/// The llm_* series, for failure messages.
fn llm(m: &common::Metrics) -> Vec<String> {
    m.series
        .iter()
        .filter(|(k, _)| k.starts_with("llm_") && !k.contains("_bucket{"))
        .map(|(k, v)| format!("{k} {v}"))
        .collect()
}

const RETRIES: &str = r#"llm_upstream_retries_total{model="gpt-4o"}"#;

fn attempts(r: &Reply) -> u64 {
    r.header_u64("x-envoy-attempt-count")
}

/// The test's own `x-mock-fail-key`: the mocks count failures per key for their whole life.
fn key(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

#[test]
fn the_resilience_configuration_meters_like_envoy_yaml() {
    // Same filter configuration block and stats_config as envoy/envoy.yaml: what is metered and
    // how it is labelled does not depend on which of the two an operator starts from.
    let read = |f: &str| std::fs::read_to_string(common::root().join(f)).unwrap();
    let (plain, resilient) = (read("envoy/envoy.yaml"), read("envoy/envoy-resilience.yaml"));
    let section = |s: &str, from: &str, to: &str| -> String {
        let a = s.find(from).unwrap_or_else(|| panic!("{from:?}"));
        let b = a + s[a..].find(to).unwrap_or_else(|| panic!("{to:?}"));
        s[a..b].to_string()
    };
    for (from, to) in [("          http_filters:\n", "  clusters:\n"), ("stats_flush_interval:", "admin:\n")] {
        assert_eq!(section(&plain, from, to), section(&resilient, from, to), "{from:?} differs");
    }
}

#[test]
fn a_429_with_retry_after_is_retried_after_the_wait_and_metered_once() {
    let (_primary, _secondary, envoy) = start();
    let key = key("rate-limited");
    // The primary is rate limited once and says to come back in 1 s; the secondary is not.
    let fail = [
        ("x-mock-fail-times", "1"),
        ("x-mock-fail-key", key.as_str()),
        ("x-mock-fail-status", "429"),
        ("x-mock-retry-after", "1"),
        ("x-mock-fail-on", "primary"),
    ];
    let start = Instant::now();
    let r = post(&envoy, &fail);
    let took = start.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(took >= Duration::from_secs(1), "Envoy waited the retry-after: {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(attempts(&r), 2);
    assert_eq!(r.header("x-mock-server"), Some("secondary"), "the retry went to the gateway not tried yet");
    assert_eq!(r.header("retry-after"), None, "the client sees the answer, not the 429");
    assert_eq!(envoy.stat("cluster.llm_gateways.upstream_rq_retry_backoff_ratelimited"), 1, "waited by retry-after");

    let m = envoy.wait_value(&requests(200, "none"), 1.0);
    assert_eq!(m.sum("llm_requests_total", &[]), 1.0, "one client request, one count: {:?}", llm(&m));
    assert_eq!(m.value(&tokens("input")), Some(100.0));
    assert_eq!(m.value(&tokens("output")), Some(20.0));
    assert_eq!(m.value(RETRIES), Some(1.0));
    // 100 × 2.50 + 20 × 10.00 µUSD, once.
    assert_eq!(m.value(r#"llm_cost_microusd_total{model="gpt-4o",app="unknown"}"#), Some(450.0));
    println!("429 + retry-after 1, then 200 from the secondary: {took:?}");
}

#[test]
fn two_503s_then_200_alternate_gateways_and_count_two_retries() {
    let (_primary, _secondary, envoy) = start();
    let key = key("unavailable");
    // Each gateway answers this key's first request 503: primary 503, secondary 503, primary 200.
    let start = Instant::now();
    let r = post(&envoy, &[("x-mock-fail-times", "1"), ("x-mock-fail-key", key.as_str())]);
    let took = start.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!((attempts(&r), r.header("x-mock-server")), (3, Some("primary")));
    // Attempts per gateway (the member clusters' connection pools count them; the status stats
    // go to the route's cluster, llm_gateways).
    assert_eq!(envoy.stat("cluster.llm_primary.upstream_rq_total"), 2);
    assert_eq!(envoy.stat("cluster.llm_secondary.upstream_rq_total"), 1);
    assert_eq!(envoy.stat("cluster.llm_gateways.retry.upstream_rq_503"), 2, "both retried");
    assert_eq!(envoy.stat("cluster.llm_gateways.upstream_rq_retry_backoff_exponential"), 2);

    let m = envoy.wait_value(&requests(200, "none"), 1.0);
    assert_eq!(m.sum("llm_requests_total", &[]), 1.0, "{:?}", llm(&m));
    assert_eq!((m.value(&tokens("input")), m.value(&tokens("output"))), (Some(100.0), Some(20.0)));
    assert_eq!(m.value(RETRIES), Some(2.0));
    // Two 503s do not eject a gateway (five in a row do).
    assert_eq!(envoy.stat("cluster.llm_primary.outlier_detection.ejections_active"), 0);
    println!("503, 503, 200: {took:?}");
}

#[test]
fn exhausted_retries_pass_the_last_answer_on_and_meter_it_as_that_answer() {
    let (_primary, _secondary, envoy) = start();
    // Every attempt fails: 3 attempts (num_retries 2), the last answer reaches the client.
    let r = post(&envoy, &[("x-mock-fail-model", "gpt-4o=503")]);
    assert_eq!((r.status, attempts(&r)), (503, 3), "{}", r.body);
    assert!(r.body.contains("scripted failure"), "the gateway's own error body: {}", r.body);
    // A retry-after beyond rate_limited_retry_back_off.max_interval (30 s) is not waited: the
    // exponential back-off applies and the client gets the 429 with its retry-after.
    let start = Instant::now();
    let r = post(&envoy, &[("x-mock-fail-model", "gpt-4o=429"), ("x-mock-retry-after", "60")]);
    assert_eq!((r.status, attempts(&r), r.header("retry-after")), (429, 3, Some("60")), "{}", r.body);
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());

    // Each is one request, labelled by the status the client got (not as a network failure:
    // Envoy's "retry limit exceeded" flag says retries ran out, not how the last one ended).
    let m = envoy.wait_value(RETRIES, 4.0);
    assert_eq!(m.sum("llm_requests_total", &[]), 2.0, "{:?}", llm(&m));
    assert_eq!(m.value(&requests(503, "server_error")), Some(1.0), "{:?}", llm(&m));
    assert_eq!(m.value(&requests(429, "upstream_rate_limit")), Some(1.0), "{:?}", llm(&m));
    assert_eq!(m.sum("llm_tokens_total", &[("token_type", "input")]), 0.0, "errors carry no usage");
}

#[test]
fn a_dead_primary_fails_over_to_the_secondary_with_exact_metering() {
    let (primary, _secondary, envoy) = start();
    let r = post(&envoy, &[]);
    assert_eq!((r.status, r.header("x-mock-server"), attempts(&r)), (200, Some("primary"), 1));
    drop(primary); // killed: its port now refuses connections
    let start = Instant::now();
    let mut seen = Vec::new();
    for _ in 0..8 {
        let r = post(&envoy, &[]);
        assert_eq!((r.status, r.header("x-mock-server")), (200, Some("secondary")), "{}", r.body);
        seen.push(attempts(&r));
    }
    let took = start.elapsed();
    // Each request first tries the primary (refused) and retries on the secondary, until three
    // local failures in a row eject the primary (or its health check fails first): from then on
    // the secondary is the first attempt.
    assert_eq!(seen[0], 2, "{seen:?}");
    assert!(seen.iter().all(|a| *a <= 2), "{seen:?}");
    assert_eq!(*seen.last().unwrap(), 1, "the primary is out of the way: {seen:?}");
    assert!(
        envoy.stat("cluster.llm_primary.outlier_detection.ejections_enforced_total") >= 1
            || envoy.stat("cluster.llm_primary.health_check.failure") >= 1,
        "ejected or failed its health check"
    );

    let m = envoy.wait_value(&requests(200, "none"), 9.0);
    assert_eq!(m.sum("llm_requests_total", &[]), 9.0, "{:?}", llm(&m));
    assert_eq!(m.value(&tokens("input")), Some(900.0));
    assert_eq!(m.value(&tokens("output")), Some(180.0));
    let retries: u64 = seen.iter().map(|a| a - 1).sum();
    assert_eq!(m.value(RETRIES), Some(retries as f64), "{seen:?}");
    println!("primary killed: 8 requests in {took:?}, attempts {seen:?}");
}

#[test]
fn a_stream_that_started_is_not_retried() {
    let (_primary, _secondary, envoy) = start();
    // The primary sends the response head and half the stream, then resets the connection.
    let mut s = TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
    let headers = [("x-mock-scenario", "reset_mid_stream"), ("x-mock-completion-tokens", "40")];
    raw_post(&mut s, CHAT, &headers, &chat(true)).unwrap();
    let reply = read_reply(&mut s, Duration::from_secs(10));
    assert_eq!((reply.status, reply.complete), (200, false), "cut, not replayed: {}", reply.text());
    assert_eq!(reply.header("x-mock-server"), Some("primary"));
    assert_eq!(reply.header("x-envoy-attempt-count"), Some("1"));
    assert!(reply.text().contains("data: ") && !reply.text().contains("[DONE]"), "{}", reply.text());
    assert_eq!(reply.text().matches("\"role\":\"assistant\"").count(), 1, "the stream's start, once");

    let m = envoy.wait_value(&requests(200, "network"), 1.0);
    assert_eq!(m.sum("llm_requests_total", &[]), 1.0, "{:?}", llm(&m));
    assert_eq!(m.value(RETRIES), None);
    assert_eq!(envoy.stat("cluster.llm_gateways.upstream_rq_retry"), 0);
    assert_eq!(envoy.stat("cluster.llm_secondary.upstream_rq_total"), 0, "nothing resent to the secondary");
    // One cut stream does not eject the gateway.
    assert_eq!(envoy.stat("cluster.llm_primary.outlier_detection.ejections_active"), 0);
    let r = post(&envoy, &[]);
    assert_eq!((r.status, r.header("x-mock-server"), attempts(&r)), (200, Some("primary"), 1));
}
