//! The operations pack against real parts: a real Prometheus (Debian's `prometheus`) scraping a
//! real Envoy running the filter in front of the mock gateway, loading the shipped alert rules.
//! Every PromQL expression of the alert rules and of the Grafana dashboard must return data after
//! a little realistic traffic, and key values must match the traffic sent.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, eventually, render_config, root, send, Envoy, Mock, Prometheus};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// Every alert expression of alerts.yml, without its threshold (the query part must return
/// data; the comparison decides whether it fires).
fn alert_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("envoy/prometheus/alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut alert = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            alert = format!("alert:{name}");
        } else if let Some(name) = line.strip_prefix("- record: ") {
            alert = format!("record:{name}");
        } else if let Some(expr) = line.strip_prefix("expr: ") {
            let cut = [" > ", " < ", " >= ", " <= "].iter().filter_map(|op| expr.rfind(op)).max();
            let query = cut.map_or(expr, |i| &expr[..i]).trim().to_string();
            out.push((alert.clone(), query));
        }
    }
    assert_eq!(out.len(), 27, "alerts.yml: every rule (22 alerts, 5 recording rules) is one `expr:` line");
    out
}

/// Every dashboard expression, with Grafana variables substituted, from tools/check_ops.py.
fn dashboard_queries() -> Vec<(String, String, bool)> {
    let out = Command::new("python3")
        .arg(root().join("tools/check_ops.py"))
        .arg("--exprs")
        .arg(root().join("envoy/grafana/llm-meter.json"))
        .output()
        .expect("python3 tools/check_ops.py");
    assert!(out.status.success(), "check_ops.py: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (
                v["source"].as_str().unwrap().to_string(),
                v["expr"].as_str().unwrap().to_string(),
                v["may_be_empty"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

const CONFIG: &str = r#"{
  "metrics": {"app_header": "x-app-id"},
  "pricing": {"gpt-4o": {"input": 2.5, "output": 10, "cached_input": 1.25},
              "claude-sonnet-4-5": {"input": 3, "output": 15}},
  "limits": [{"name": "key-rph", "key": "header:x-api-key", "models": ["gpt-4o-mini"], "requests_per_hour": 3},
             {"name": "global-rpm", "key": "global", "models": ["gpt-4o-mini"], "requests_per_minute": 1000,
              "scope": "global", "service": {"cluster": "no_rate_limit_service", "domain": "llm"}}],
  "resilience": {"circuit_breaker": {"failures": 2, "open_seconds": 600, "on": ["server_error"]},
                 "fallbacks": {"gpt-4.1": ["gpt-4.1-mini"]}}
}"#;

#[test]
fn every_alert_and_dashboard_query_returns_data_from_a_real_prometheus() {
    let mock = Mock::start();
    // The shipped envoy.yaml with a short route timeout, so a timeout can be produced quickly.
    let yaml = render_config(mock.port, CONFIG).replace("timeout: 300s", "timeout: 1s");
    let envoy = Envoy::try_start_yaml(&yaml).unwrap();
    let prom = Prometheus::start(&[envoy.admin], true);
    eventually(Duration::from_secs(30), "Prometheus scraping Envoy", || {
        prom.scalar(r#"up{job="envoy-llm-meter"}"#).filter(|&v| v == 1.0)
    });

    let agent = client();
    let chat = |model: &str, stream: bool| {
        let mut v = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        if stream {
            v["stream"] = true.into();
        }
        v.to_string()
    };
    let url = envoy.url("/v1/chat/completions");
    let usage = [("x-app-id", "web"), ("x-mock-prompt-tokens", "100"), ("x-mock-completion-tokens", "20")];
    let mut sent = 0;
    // Two rounds a few scrapes apart, so every counter has increased between samples. The
    // streamed gpt-4o requests (20 output tokens each) are what fills llm_time_per_output_token_ms
    // (streams with at least 2 output tokens), for LLMSlowTokenGeneration and its panel.
    for round in 0..2 {
        for _ in 0..5 {
            assert_eq!(send(&agent, &url, &usage, &chat("gpt-4o", false)).status, 200);
            assert_eq!(send(&agent, &url, &usage, &chat("gpt-4o", true)).status, 200);
            sent += 2;
        }
        for scenario in ["rate_limit", "server_error", "no_usage"] {
            send(&agent, &url, &[("x-mock-scenario", scenario)], &chat("gpt-4o", false));
            sent += 1;
        }
        // An upstream timeout (route timeout 1 s).
        assert_eq!(send(&agent, &url, &[("x-mock-delay-ms", "1500")], &chat("gpt-4o", false)).status, 504);
        sent += 1;
        // Local rejections: 3 gpt-4o-mini requests per hour for this key.
        let key = format!("sk-test-{}-{round}", std::process::id());
        for _ in 0..5 {
            send(&agent, &url, &[("x-api-key", key.as_str())], &chat("gpt-4o-mini", false));
            sent += 1;
        }
        // Resilience: gpt-4.1 fails twice (its circuit opens), the next request for it is served
        // by gpt-4.1-mini; then gpt-4.1-mini fails twice too, and requests for gpt-4.1 are
        // answered 503 circuit_open by the filter (once per round; the circuits stay open).
        if round == 0 {
            for model in ["gpt-4.1", "gpt-4.1-mini"] {
                let fail = format!("{model}=500");
                for _ in 0..2 {
                    assert_eq!(
                        send(&agent, &url, &[("x-mock-fail-model", fail.as_str())], &chat(model, false)).status,
                        500
                    );
                    sent += 1;
                }
                if model == "gpt-4.1" {
                    let r = send(&agent, &url, &[], &chat("gpt-4.1", false));
                    assert_eq!((r.status, r.header("x-llm-fallback-from")), (200, Some("gpt-4.1")), "{}", r.body);
                    sent += 1;
                }
            }
        }
        assert_eq!(send(&agent, &url, &[], &chat("gpt-4.1", false)).status, 503);
        sent += 1;
        let anthropic = json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]});
        let r =
            send(&agent, &envoy.url("/v1/messages"), &[("x-mock-cache-creation-tokens", "7")], &anthropic.to_string());
        assert_eq!(r.status, 200);
        sent += 1;
        std::thread::sleep(Duration::from_secs(3));
    }

    // Prometheus has the totals.
    eventually(Duration::from_secs(30), "all requests in Prometheus", || {
        prom.scalar("sum(llm_requests_total)").filter(|&v| v == sent as f64)
    });
    assert_eq!(
        prom.scalar(r#"sum(llm_ratelimit_rejected_total{model="gpt-4o-mini",rule="key-rph",mode="enforce"})"#),
        Some(4.0)
    );
    assert_eq!(prom.scalar(r#"sum(llm_requests_total{error_type="timeout"})"#), Some(2.0));
    assert_eq!(
        prom.scalar(r#"sum(llm_tokens_total{model="gpt-4o",app="web",token_type="input"})"#),
        Some(20.0 * 100.0)
    );
    assert_eq!(prom.scalar(r#"sum(llm_usage_missing_total)"#), Some(2.0));
    assert_eq!(prom.scalar(r#"sum(llm_active_requests)"#), Some(0.0));
    assert_eq!(prom.scalar(r#"sum(llm_fallbacks_total{model="gpt-4.1",to="gpt-4.1-mini"})"#), Some(1.0));
    assert_eq!(prom.scalar(r#"sum(llm_requests_total{model="gpt-4.1",error_type="circuit_open"})"#), Some(2.0));
    assert_eq!(prom.scalar(r#"max(llm_model_state{model="gpt-4.1"})"#), Some(2.0));
    assert_eq!(prom.scalar(r#"max(llm_model_state{model="gpt-4.1-mini"})"#), Some(2.0));
    // Histograms reach Prometheus at Envoy's stats flush.
    eventually(Duration::from_secs(30), "histograms in Prometheus", || {
        prom.scalar(r#"sum(llm_request_duration_ms_count)"#).filter(|&v| v == sent as f64)
    });

    let mut queries: Vec<(String, String, bool)> =
        alert_queries().into_iter().map(|(source, expr)| (source, expr, false)).collect();
    // Envoy's VM reload counter is defined (at 0) for every Wasm plugin, so it has data too.
    queries.extend(dashboard_queries());
    // Series that only exist after rare events are allowed to be empty; this traffic made the
    // circuit and fallback ones happen, so those must have data too (not Envoy's retries).
    let made = ["llm_model_state", "llm_fallbacks_total", "llm_circuit_transitions_total"];
    queries.retain(|(_, expr, may_be_empty)| !may_be_empty || made.iter().any(|m| expr.contains(m)));
    // Some expressions need history, not just a sample: `increase(x[10m:5s])` needs two
    // subquery steps (5 s apart, aligned to wall-clock multiples of 5 s) after the first scrape,
    // which a fast run can query before. So a query without data is retried for a while; a
    // typo or a wrong metric name still fails, only later.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let empty = loop {
        let empty: Vec<String> = queries
            .iter()
            .filter(|(_, expr, _)| prom.query(expr).is_empty())
            .map(|(source, expr, _)| format!("{source}: {expr}"))
            .collect();
        if empty.is_empty() || std::time::Instant::now() > deadline {
            break empty;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(empty.is_empty(), "queries without data after 30 s:\n{}", empty.join("\n"));

    // The rules loaded and evaluate without errors.
    let rules = prom.api("/api/v1/rules");
    let groups = rules["data"]["groups"].as_array().unwrap();
    let all: Vec<&Value> = groups.iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(all.len(), 27, "{rules}");
    for r in &all {
        assert_eq!(r["health"], "ok", "rule {} failed: {}\n{}", r["name"], r["lastError"], prom.log());
    }
    // The timeouts we caused are over the alert's 1 % threshold: it is at least pending.
    eventually(Duration::from_secs(15), "LLMUpstreamTimeouts pending", || {
        let alerts = prom.api("/api/v1/alerts");
        alerts["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == "LLMUpstreamTimeouts" && a["labels"]["model"] == "gpt-4o")
            .cloned()
    });
}
