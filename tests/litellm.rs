//! Behind a real gateway: Envoy running the release filter in front of a real LiteLLM proxy
//! (PyPI `litellm[proxy]`, `.venv-litellm`, installed by `just litellm`), which calls the mock
//! gateway as its OpenAI provider. LiteLLM's streams differ from OpenAI's: its usage chunk keeps
//! one empty choice (`"choices":[{"index":0,"delta":{}}]`) instead of `"choices":[]`, and its
//! other chunks carry no `"usage":null`. Checked here: exact usage and cost for every shape, and
//! that a client gets LiteLLM's own stream, minus only the usage chunk it did not ask for.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, send, Envoy, LiteLlm, Metrics, Mock, Reply, DEFAULT_CONFIG, LITELLM_KEY};
use std::time::Instant;

const CHAT: &str = "/v1/chat/completions";
/// The token counts LiteLLM's `gpt-4o` route asks the mock for (`extra_headers` on the route:
/// LiteLLM does not forward a client's `x-mock-*` headers).
const PROMPT: u64 = 42;
const COMPLETION: u64 = 5;

/// LiteLLM's models: `gpt-4o` answers with the counts above, `gpt-4o-limited` with the mock's
/// 429.
fn model_list(mock: u16) -> String {
    let route = |name: &str, headers: &str| {
        format!(
            "  - model_name: {name}\n    litellm_params:\n      model: openai/gpt-4o\n      \
             api_base: http://127.0.0.1:{mock}/v1\n      api_key: sk-mock-upstream\n      \
             extra_headers: {{{headers}}}\n"
        )
    };
    route("gpt-4o", &format!(r#"x-mock-prompt-tokens: "{PROMPT}", x-mock-completion-tokens: "{COMPLETION}""#))
        + &route("gpt-4o-limited", "x-mock-scenario: rate_limit")
}

fn chat(model: &str, stream: Option<bool>) -> String {
    let mut v = serde_json::json!({
        "model": model,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}],
    });
    match stream {
        None => {}
        Some(include_usage) => {
            v["stream"] = true.into();
            if include_usage {
                v["stream_options"] = serde_json::json!({"include_usage": true});
            }
        }
    }
    v.to_string()
}

/// Every `"id":"…"` and `"created":N` set to one value: they differ between two answers.
fn normalize(body: &str) -> String {
    let mut out = body.to_string();
    for (key, end) in [("\"id\":\"", '"'), ("\"created\":", ',')] {
        let mut from = 0;
        while let Some(i) = out[from..].find(key) {
            let start = from + i + key.len();
            let len = out[start..].find(end).expect("value end");
            out.replace_range(start..start + len, "X");
            from = start + 1;
        }
    }
    out
}

/// The SSE events of `body` (each with its blank line).
fn events(body: &str) -> Vec<String> {
    body.split_inclusive("\n\n").map(str::to_string).collect()
}

fn requests(m: &Metrics, model: &str, app: &str, status: u16, error: &str) -> Option<f64> {
    m.value(&format!(
        r#"llm_requests_total{{model="{model}",app="{app}",operation="chat",status="{status}",error_type="{error}"}}"#
    ))
}

fn tokens(m: &Metrics, app: &str, token_type: &str) -> Option<f64> {
    m.value(&format!(r#"llm_tokens_total{{model="gpt-4o",app="{app}",token_type="{token_type}"}}"#))
}

/// Waits for `app`'s request to be counted, then checks its usage and cost: exactly what the mock
/// reported, and the cost LiteLLM itself charged (`x-litellm-response-cost`, USD) when given.
fn assert_metered(envoy: &Envoy, app: &str, litellm_cost: Option<&str>) {
    let m = envoy.wait_value(
        &format!(r#"llm_requests_total{{model="gpt-4o",app="{app}",operation="chat",status="200",error_type="none"}}"#),
        1.0,
    );
    assert_eq!(tokens(&m, app, "input"), Some(PROMPT as f64), "{app}");
    assert_eq!(tokens(&m, app, "output"), Some(COMPLETION as f64), "{app}");
    // 42 × 2.5 + 5 × 10 µUSD (DEFAULT_CONFIG's gpt-4o price).
    let cost = m.value(&format!(r#"llm_cost_microusd_total{{model="gpt-4o",app="{app}"}}"#));
    assert_eq!(cost, Some(155.0), "{app}");
    if let Some(usd) = litellm_cost {
        let usd: f64 = usd.parse().expect("x-litellm-response-cost");
        assert!((usd * 1e6 - 155.0).abs() < 1e-6, "LiteLLM charged {usd} USD");
    }
    assert_eq!(m.value(r#"llm_usage_missing_total{model="gpt-4o"}"#), None, "{app}");
}

#[test]
fn litellm_behind_envoy_is_metered_exactly_and_its_streams_reach_the_client_as_sent() {
    let t0 = Instant::now();
    let mock = Mock::start();
    let litellm = LiteLlm::start(&model_list(mock.port));
    let envoy = Envoy::start(litellm.port, DEFAULT_CONFIG);
    eprintln!("mock, LiteLLM and Envoy up in {:.1} s", t0.elapsed().as_secs_f64());
    let agent = client();
    let auth = format!("Bearer {LITELLM_KEY}");
    let via_envoy = |app: &str, body: &str| -> Reply {
        send(&agent, &envoy.url(CHAT), &[("authorization", &auth), ("x-app-id", app)], body)
    };
    let direct = |body: &str| -> Reply { send(&agent, &litellm.url(CHAT), &[("authorization", &auth)], body) };

    // Non-streaming: the body as LiteLLM sent it, usage and cost exact.
    let reply = via_envoy("plain", &chat("gpt-4o", None));
    assert_eq!(reply.status, 200, "{}\nLiteLLM log:\n{}", reply.body, litellm.log());
    assert_eq!(normalize(&reply.body), normalize(&direct(&chat("gpt-4o", None)).body));
    assert!(reply.body.contains(&format!("\"prompt_tokens\":{PROMPT}")), "{}", reply.body);
    assert_metered(&envoy, "plain", reply.header("x-litellm-response-cost"));

    // Streaming with include_usage: LiteLLM's stream as it sent it, its usage chunk included.
    let asked = via_envoy("asked", &chat("gpt-4o", Some(true)));
    assert_eq!(asked.status, 200, "{}", asked.body);
    assert_eq!(normalize(&asked.body), normalize(&direct(&chat("gpt-4o", Some(true))).body));
    let asked_events = events(&asked.body);
    let usage_chunk = asked_events.iter().rev().nth(1).expect("usage chunk");
    assert!(
        usage_chunk
            .contains(r#""choices":[{"index":0,"delta":{}}],"usage":{"completion_tokens":5,"prompt_tokens":42,"#),
        "LiteLLM's usage chunk keeps an empty choice: {usage_chunk}"
    );
    assert_eq!(asked_events.last().map(String::as_str), Some("data: [DONE]\n\n"));
    assert_metered(&envoy, "asked", None);

    // Streaming without include_usage: the filter asks LiteLLM for usage, meters it, and the
    // client gets LiteLLM's own answer to its request: the stream above minus the usage chunk.
    let unasked = via_envoy("unasked", &chat("gpt-4o", Some(false)));
    assert_eq!(unasked.status, 200, "{}", unasked.body);
    let own = direct(&chat("gpt-4o", Some(false)));
    assert_eq!(normalize(&unasked.body), normalize(&own.body), "the client gets LiteLLM's own stream");
    let mut without_usage = asked_events.clone();
    without_usage.retain(|e| e != usage_chunk);
    assert_eq!(normalize(&unasked.body), normalize(&without_usage.concat()));
    assert!(!unasked.body.contains("usage"), "{}", unasked.body);
    assert_metered(&envoy, "unasked", None);

    // An upstream 429, passed through by LiteLLM (no retries), streaming or not.
    for stream in [None, Some(false)] {
        let reply = via_envoy("limited", &chat("gpt-4o-limited", stream));
        assert_eq!(reply.status, 429, "{}", reply.body);
        assert!(reply.body.contains("RateLimitError"), "{}", reply.body);
    }
    let m = envoy.wait_value(
        r#"llm_requests_total{model="gpt-4o-limited",app="limited",operation="chat",status="429",error_type="upstream_rate_limit"}"#,
        2.0,
    );
    assert_eq!(m.sum("llm_tokens_total", &[("model", "gpt-4o-limited")]), 0.0);
    assert_eq!(m.sum("llm_requests_total", &[]), 5.0, "nothing else was counted");
    assert_eq!(requests(&m, "gpt-4o", "unasked", 200, "none"), Some(1.0));
    assert_eq!(m.value(r#"llm_active_requests{model="gpt-4o"}"#), Some(0.0));
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
