//! Anthropic's Messages API, `POST …/v1/messages`, streaming (`"stream": true`) or not. Bodies
//! follow Anthropic's wire format: the `message` object, the named SSE events `message_start`,
//! `content_block_start`, `ping`, `content_block_delta`…, `content_block_stop`, `message_delta`,
//! `message_stop`, and errors as `{"type": "error", "error": {"type", "message"}}`.
//!
//! Anthropic's `input_tokens` excludes both cache counts; the mock reports every count exactly as
//! the headers script it: `x-mock-prompt-tokens` is `input_tokens`, `x-mock-cached-tokens` is
//! `cache_read_input_tokens`, `x-mock-cache-creation-tokens` is `cache_creation_input_tokens`.

use crate::http::{Framing, Plan, Request};
use crate::knobs::{Knobs, Scenario};
use crate::shape::{usage_headers, HeaderUsage};
use crate::text::{self, content_pieces, sse_event, text_tokens, DEFAULT_COMPLETION_TOKENS};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Every message ends this way: the mock never reports `max_tokens` or `stop_sequence`.
const STOP_REASON: &str = "end_turn";

fn request_id() -> (String, String) {
    static N: AtomicU64 = AtomicU64::new(1);
    ("request-id".into(), format!("req_mock{:016}", N.fetch_add(1, Ordering::Relaxed)))
}

/// An error in Anthropic's shape.
pub fn error_plan(status: u16, kind: &str, message: &str) -> Plan {
    let id = request_id();
    let body = json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": id.1});
    Plan {
        status,
        headers: vec![("content-type".into(), "application/json".into()), id],
        delay: Duration::ZERO,
        framing: Framing::Length,
        pieces: vec![body.to_string().into_bytes()],
        gap: Duration::ZERO,
        reset_before: None,
    }
}

/// A 400 `invalid_request_error`.
pub fn invalid(msg: impl Into<String>) -> Plan {
    error_plan(400, "invalid_request_error", &msg.into())
}

fn rate_limit_plan(knobs: &Knobs) -> Plan {
    let limit = knobs.rate_limit.limit_requests.unwrap_or(1000);
    let msg = format!(
        "This request would exceed the rate limit for your organization (mock) of {limit} requests per minute. \
         For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for \
         current usage. Please reduce the prompt length or the maximum tokens requested, or try again later."
    );
    let mut plan = error_plan(429, "rate_limit_error", &msg);
    let reset = text::rfc3339(text::now() + 1);
    let tokens_limit = knobs.rate_limit.limit_tokens.unwrap_or(100_000);
    let tokens_remaining = knobs.rate_limit.remaining_tokens.unwrap_or(tokens_limit.saturating_sub(1000));
    for (k, v) in [
        ("retry-after", "1".to_string()),
        ("anthropic-ratelimit-requests-limit", limit.to_string()),
        ("anthropic-ratelimit-requests-remaining", "0".to_string()),
        ("anthropic-ratelimit-requests-reset", reset.clone()),
        ("anthropic-ratelimit-tokens-limit", tokens_limit.to_string()),
        ("anthropic-ratelimit-tokens-remaining", tokens_remaining.to_string()),
        ("anthropic-ratelimit-tokens-reset", reset),
    ] {
        plan.headers.push((k.into(), v));
    }
    plan
}

/// Prompt tokens estimated like the OpenAI side's chat estimate, plus the `system` prompt.
fn estimate_input(body: &Value) -> u64 {
    let system = match body.get("system") {
        Some(Value::String(s)) => text_tokens(s),
        Some(Value::Array(blocks)) => {
            blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).map(text_tokens).sum()
        }
        _ => 0,
    };
    crate::openai::chat_prompt_tokens(body) + system
}

/// The four usage counts, as the headers scripted them.
#[derive(Clone, Copy)]
struct Counts {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_creation: u64,
}

impl Counts {
    /// A `usage` object with all four counts, `output_tokens` as given.
    fn usage(&self, output: u64) -> Value {
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": output,
        })
    }
}

/// The answer to a Messages request, before [`crate::shape::finish`].
pub fn answer(req: &Request, knobs: &Knobs) -> Plan {
    match respond(req, knobs) {
        Ok(p) | Err(p) => p,
    }
}

fn respond(req: &Request, knobs: &Knobs) -> Result<Plan, Plan> {
    let body: Value =
        serde_json::from_slice(&req.body).map_err(|e| invalid(format!("The request body is not valid JSON: {e}")))?;
    if !body.is_object() {
        return Err(invalid("The request body must be a JSON object."));
    }
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return Err(invalid("model: Field required"));
    };
    if !body.get("messages").is_some_and(Value::is_array) {
        return Err(invalid("messages: Field required"));
    }
    match knobs.scenario {
        Scenario::RateLimit => return Ok(rate_limit_plan(knobs)),
        Scenario::ServerError => return Ok(error_plan(500, "api_error", "Internal server error")),
        Scenario::Unavailable => return Ok(error_plan(529, "overloaded_error", "Overloaded")),
        _ => {}
    }
    let counts = Counts {
        input: knobs.prompt_tokens.unwrap_or_else(|| estimate_input(&body)),
        output: knobs
            .completion_tokens
            .or_else(|| body.get("max_tokens").and_then(Value::as_u64))
            .unwrap_or(DEFAULT_COMPLETION_TOKENS),
        cache_read: knobs.cached_tokens,
        cache_creation: knobs.cache_creation_tokens,
    };
    let pieces = content_pieces(knobs, counts.output);
    let id = text::id("msg_");
    let with_usage = knobs.usage_in_body();
    let mut plan = if body.get("stream").and_then(Value::as_bool) == Some(true) {
        stream(model, &id, &pieces, &counts, knobs, with_usage)
    } else {
        let mut out = json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": pieces.concat()}],
            "stop_reason": STOP_REASON, "stop_sequence": null,
        });
        if with_usage {
            out["usage"] = counts.usage(counts.output);
        }
        let mut body = out.to_string().into_bytes();
        if knobs.scenario == Scenario::Malformed {
            body.truncate(body.len() / 2);
        }
        let rid = request_id();
        Plan {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into()), rid],
            delay: Duration::ZERO,
            framing: Framing::Length,
            pieces: vec![body],
            gap: Duration::ZERO,
            reset_before: None,
        }
    };
    usage_headers(
        &mut plan,
        knobs,
        HeaderUsage {
            input: counts.input,
            output: counts.output,
            cached: counts.cache_read,
            reasoning: 0,
            cache_creation: counts.cache_creation,
        },
    );
    Ok(plan)
}

/// The SSE stream: `message_start`, `content_block_start`, `ping`, one `content_block_delta` per
/// piece, `content_block_stop`, `message_delta`, `message_stop`.
fn stream(model: &str, id: &str, pieces: &[String], counts: &Counts, knobs: &Knobs, with_usage: bool) -> Plan {
    let ev = |v: Value| sse_event(v["type"].as_str().unwrap_or_default(), &v.to_string());
    let mut events = Vec::new();
    if knobs.scenario == Scenario::Malformed {
        events.push(sse_event(
            "message_start",
            &format!(
                r#"{{"type":"message_start","message":{{"id":"{id}","type":"message","role":"assistant","model":"#
            ),
        ));
        events.push(sse_event("content_block_delta", "not json at all"));
        events.push(sse_event(
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":"many"}}"#,
        ));
        events.push(ev(json!({"type": "message_stop"})));
    } else {
        let mut message = json!({
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
        });
        if with_usage {
            message["usage"] = counts.usage(1);
        }
        events.push(ev(json!({"type": "message_start", "message": message})));
        events.push(ev(
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ));
        events.push(ev(json!({"type": "ping"})));
        for p in pieces {
            events.push(ev(json!({
                "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p},
            })));
        }
        events.push(ev(json!({"type": "content_block_stop", "index": 0})));
        let mut delta = json!({
            "type": "message_delta", "delta": {"stop_reason": STOP_REASON, "stop_sequence": null},
        });
        if with_usage {
            delta["usage"] = if knobs.anthropic_full_final_usage {
                Counts { input: knobs.delta_input_tokens.unwrap_or(counts.input), ..*counts }.usage(counts.output)
            } else {
                json!({"output_tokens": counts.output})
            };
        }
        events.push(ev(delta));
        events.push(ev(json!({"type": "message_stop"})));
    }
    Plan::sse(events, knobs.chunk_delay, request_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::plan;

    fn post(headers: &[(&str, &str)], body: Value) -> Plan {
        plan(&Request {
            method: "POST".into(),
            path: "/v1/messages".into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.to_string().into_bytes(),
            keep_alive: true,
        })
    }

    fn request(stream: bool) -> Value {
        json!({
            "model": "claude-sonnet-4-5", "max_tokens": 5, "stream": stream,
            "system": "Be brief.",
            "messages": [{"role": "user", "content": "Say hello to the meter"}],
        })
    }

    fn header<'a>(p: &'a Plan, name: &str) -> Option<&'a str> {
        p.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// `(event name, data as JSON)` of every event.
    fn events(p: &Plan) -> Vec<(String, Value)> {
        let body = String::from_utf8(p.body()).unwrap();
        assert!(body.ends_with("\n\n"));
        body.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_string();
                let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name.as_str(), "event name = data type");
                (name, data)
            })
            .collect()
    }

    const COUNTS: [(&str, &str); 4] = [
        ("x-mock-prompt-tokens", "1200"),
        ("x-mock-completion-tokens", "300"),
        ("x-mock-cached-tokens", "2000"),
        ("x-mock-cache-creation-tokens", "50"),
    ];

    #[test]
    fn non_streaming_message() {
        let p = post(&COUNTS, request(false));
        assert_eq!((p.status, p.framing), (200, Framing::Length));
        assert_eq!(header(&p, "content-type"), Some("application/json"));
        assert!(header(&p, "request-id").unwrap().starts_with("req_"));
        assert_eq!(header(&p, "anthropic-ratelimit-requests-limit"), Some("1000"));
        assert_eq!(header(&p, "anthropic-ratelimit-requests-remaining"), Some("999"));
        assert_eq!(header(&p, "anthropic-ratelimit-tokens-limit"), Some("100000"));
        assert_eq!(header(&p, "anthropic-ratelimit-tokens-remaining"), Some("99000"));
        assert!(header(&p, "x-ratelimit-limit-requests").is_none());
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["content", "id", "model", "role", "stop_reason", "stop_sequence", "type", "usage"]);
        assert!(v["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!((v["type"].as_str(), v["role"].as_str()), (Some("message"), Some("assistant")));
        assert_eq!(v["model"], "claude-sonnet-4-5");
        assert_eq!((v["stop_reason"].as_str(), v["stop_sequence"].clone()), (Some("end_turn"), Value::Null));
        assert_eq!(v["content"][0]["type"], "text");
        assert_eq!(v["content"][0]["text"].as_str().unwrap().split(' ').count(), 300);
        // Cache reads exceed the input: Anthropic's input_tokens excludes them.
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 1200, "cache_creation_input_tokens": 50, "cache_read_input_tokens": 2000,
                   "output_tokens": 300})
        );
    }

    #[test]
    fn defaults() {
        let v: Value = serde_json::from_slice(&post(&[], request(false)).body()).unwrap();
        // 3 + 4 + ceil(22 / 4) for the message, ceil(9 / 4) for the system prompt.
        assert_eq!(v["usage"]["input_tokens"], 3 + 4 + 6 + 3);
        assert_eq!(v["usage"]["output_tokens"], 5, "max_tokens");
        assert_eq!(v["usage"]["cache_read_input_tokens"], 0);
        assert_eq!(v["usage"]["cache_creation_input_tokens"], 0);
        let mut req = request(false);
        req.as_object_mut().unwrap().remove("max_tokens");
        let v: Value = serde_json::from_slice(&post(&[], req).body()).unwrap();
        assert_eq!(v["usage"]["output_tokens"], 16);
    }

    #[test]
    fn stream_follows_anthropics_event_order() {
        let p = post(&COUNTS[..2], request(true));
        assert_eq!(p.framing, Framing::Chunked);
        assert_eq!(header(&p, "content-type"), Some("text/event-stream; charset=utf-8"));
        let ev = events(&p);
        assert_eq!(p.pieces.len(), ev.len(), "one event per piece");
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        let mut want = vec!["message_start", "content_block_start", "ping"];
        want.extend(["content_block_delta"; 300]);
        want.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, want);
        let start = &ev[0].1["message"];
        assert_eq!(start["content"], json!([]));
        assert_eq!((start["stop_reason"].clone(), start["model"].as_str()), (Value::Null, Some("claude-sonnet-4-5")));
        assert_eq!(
            start["usage"],
            json!({"input_tokens": 1200, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                   "output_tokens": 1})
        );
        assert_eq!(ev[1].1["content_block"], json!({"type": "text", "text": ""}));
        assert_eq!(ev[3].1["delta"], json!({"type": "text_delta", "text": "Hello"}));
        let text: String = ev[3..303].iter().map(|(_, d)| d["delta"]["text"].as_str().unwrap()).collect();
        assert_eq!(text.split(' ').count(), 300);
        assert_eq!(ev[303].1, json!({"type": "content_block_stop", "index": 0}));
        assert_eq!(
            ev[304].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"output_tokens": 300}})
        );
        assert_eq!(ev[305].1, json!({"type": "message_stop"}));
    }

    #[test]
    fn full_final_usage_repeats_or_overrides_the_input_counts() {
        let mut headers = COUNTS.to_vec();
        headers.push(("x-mock-anthropic-final-usage", "full"));
        let ev = events(&post(&headers, request(true)));
        let delta = &ev[ev.len() - 2].1;
        assert_eq!(
            delta["usage"],
            json!({"input_tokens": 1200, "cache_creation_input_tokens": 50, "cache_read_input_tokens": 2000,
                   "output_tokens": 300})
        );
        headers.push(("x-mock-delta-input-tokens", "1300"));
        let ev = events(&post(&headers, request(true)));
        assert_eq!(ev[0].1["message"]["usage"]["input_tokens"], 1200);
        let usage = &ev[ev.len() - 2].1["usage"];
        assert_eq!(
            (usage["input_tokens"].as_u64(), usage["cache_read_input_tokens"].as_u64()),
            (Some(1300), Some(2000))
        );
    }

    #[test]
    fn failure_scenarios_in_anthropics_shape() {
        let p = post(&[("x-mock-scenario", "rate_limit")], request(true));
        assert_eq!(p.status, 429);
        assert_eq!(header(&p, "retry-after"), Some("1"));
        assert_eq!(header(&p, "anthropic-ratelimit-requests-remaining"), Some("0"));
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!((v["type"].as_str(), v["error"]["type"].as_str()), (Some("error"), Some("rate_limit_error")));
        assert!(v["error"]["message"].is_string());
        let p = post(&[("x-mock-scenario", "server_error")], request(false));
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!((p.status, v["error"]["type"].as_str()), (500, Some("api_error")));
        let p = post(&[("x-mock-scenario", "unavailable")], request(false));
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!((p.status, v["error"]["type"].as_str()), (529, Some("overloaded_error")));
        assert!(header(&p, "anthropic-ratelimit-requests-limit").is_none(), "2xx only");

        // Reset: message_start and half of the 10 deltas.
        let p = post(&[("x-mock-scenario", "reset_mid_stream"), ("x-mock-completion-tokens", "10")], request(true));
        assert_eq!(p.reset_before, Some(3 + 5));
        let sent = String::from_utf8(p.pieces[..8].concat()).unwrap();
        assert!(sent.starts_with("event: message_start\n") && !sent.contains("message_delta"));

        let p = post(&[("x-mock-scenario", "no_usage")], request(true));
        let ev = events(&p);
        assert!(ev.iter().all(|(_, d)| d.get("usage").is_none() && d["message"].get("usage").is_none()));
        let v: Value =
            serde_json::from_slice(&post(&[("x-mock-scenario", "no_usage")], request(false)).body()).unwrap();
        assert!(v.get("usage").is_none());

        let p = post(&[("x-mock-scenario", "malformed")], request(false));
        assert!(serde_json::from_slice::<Value>(&p.body()).is_err());
        let body = String::from_utf8(post(&[("x-mock-scenario", "malformed")], request(true)).body()).unwrap();
        assert!(
            body.contains("data: not json at all\n\n")
                && body.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
        );
    }

    #[test]
    fn usage_in_headers_and_rate_limit_overrides() {
        let mut headers = COUNTS.to_vec();
        headers.extend([
            ("x-mock-usage-in-headers", "1"),
            ("x-mock-ratelimit-remaining-requests", "3"),
            ("x-mock-ratelimit-limit-tokens", "5000"),
        ]);
        let p = post(&headers, request(true));
        assert_eq!(header(&p, "x-usage-input-tokens"), Some("1200"));
        assert_eq!(header(&p, "x-usage-output-tokens"), Some("300"));
        assert_eq!(header(&p, "x-usage-cached-tokens"), Some("2000"));
        assert_eq!(header(&p, "x-usage-cache-creation-tokens"), Some("50"));
        assert_eq!(header(&p, "x-usage-reasoning-tokens"), None);
        assert!(!String::from_utf8(p.body()).unwrap().contains("usage"));
        assert_eq!(header(&p, "anthropic-ratelimit-requests-remaining"), Some("3"));
        assert_eq!(header(&p, "anthropic-ratelimit-tokens-limit"), Some("5000"));
        assert_eq!(header(&p, "anthropic-ratelimit-tokens-remaining"), Some("4000"));
    }

    #[test]
    fn bad_requests_in_anthropics_shape() {
        for (headers, body, needle) in [
            (&[("x-mock-completion-tokens", "x")][..], request(false), "x-mock-completion-tokens"),
            (&[], json!({"messages": []}), "model"),
            (&[], json!({"model": "m"}), "messages"),
        ] {
            let p = post(headers, body);
            assert_eq!(p.status, 400);
            let v: Value = serde_json::from_slice(&p.body()).unwrap();
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{v}");
        }
    }
}
