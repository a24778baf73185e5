//! Hostile conditions through the real Envoy (issue 7): label cardinality under a flood of
//! distinct model names and app header values.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, send, Envoy, Mock};
use std::collections::BTreeSet;

const CHAT: &str = "/v1/chat/completions";

/// The distinct values of `label` over every `llm_*` series of a `/stats/prometheus` text.
fn label_values(raw: &str, label: &str) -> BTreeSet<String> {
    let key = format!("{label}=\"");
    raw.lines()
        .filter(|l| l.starts_with("llm_"))
        .filter_map(|l| {
            let start = l.find(&key)? + key.len();
            let end = start + l.get(start..)?.find('"')?;
            l.get(start..end).map(str::to_string)
        })
        .collect()
}

#[test]
fn a_flood_of_distinct_models_and_apps_leaves_the_series_bounded() {
    const REQUESTS: usize = 100_000;
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, r#"{"metrics": {"max_models": 20, "app_header": "x-app-id", "max_apps": 10}}"#);
    let url = envoy.url(CHAT);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = client();
                for i in (t..REQUESTS).step_by(16) {
                    let body = format!(r#"{{"model":"model-{i}","messages":[{{"role":"user","content":"hi"}}]}}"#);
                    let app = format!("app-{i}");
                    let r = send(&agent, &url, &[("x-app-id", app.as_str()), ("x-mock-completion-tokens", "1")], &body);
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let m = envoy.wait_value(r#"llm_active_requests{model="other"}"#, 0.0);
    let m = if m.sum("llm_requests_total", &[]) == REQUESTS as f64 {
        m
    } else {
        envoy.wait_for(std::time::Duration::from_secs(10), "every request counted", |m| {
            m.sum("llm_requests_total", &[]) == REQUESTS as f64
        })
    };
    // 20 first-seen models and 10 apps get their own label; the other 99,980 / 99,990 are `other`.
    let models = label_values(&m.raw, "model");
    let apps = label_values(&m.raw, "app");
    assert_eq!(models.len(), 21, "{models:?}");
    assert!(models.contains("other"));
    assert_eq!(apps.len(), 11, "{apps:?}");
    assert!(apps.contains("other"));
    let series = m.raw.lines().filter(|l| l.starts_with("llm_")).count();
    println!("{REQUESTS} requests, {} model labels, {} app labels, {series} llm_* lines", models.len(), apps.len());
    // Requests and tokens per (model, app) pair that occurred, histograms per model: far below
    // one series per request.
    assert!(series < 2_000, "{series} llm_* lines");
    assert_eq!(m.sum("llm_tokens_total", &[("token_type", "output")]), REQUESTS as f64);
}
