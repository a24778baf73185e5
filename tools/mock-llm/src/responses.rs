//! OpenAI's Responses API, `POST …/responses`, streaming (`"stream": true`) or not. The answer is
//! a `response` object with one assistant `message` output item; a stream is the named SSE
//! events `response.created`, `response.in_progress`, `response.output_item.added`,
//! `response.content_part.added`, `response.output_text.delta`…, `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done` and the final `response.completed`
//! (or `response.incomplete` / `response.failed`, see `x-mock-responses-final`), each with a
//! `sequence_number` from 0. Errors are OpenAI's, as for chat completions.

use crate::http::{Plan, Request};
use crate::knobs::{Knobs, ResponsesFinal, Scenario};
use crate::openai::{invalid, json_plan, request_id, request_json, scenario_error};
use crate::shape::{usage_headers, HeaderUsage};
use crate::text::{self, content_pieces, now, sse_event, text_tokens, DEFAULT_COMPLETION_TOKENS};
use serde_json::{json, Value};

/// Prompt tokens of `instructions` and `input` (a string, or items whose `content` is a string or
/// parts with `text`): 4 bytes a token, plus 4 per input item as for chat messages.
fn estimate_input(body: &Value) -> u64 {
    let instructions = body.get("instructions").and_then(Value::as_str).map_or(0, text_tokens);
    let input = match body.get("input") {
        Some(Value::String(s)) => text_tokens(s).max(1),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                4 + match item.get("content") {
                    Some(Value::String(s)) => text_tokens(s),
                    Some(Value::Array(parts)) => {
                        parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(text_tokens).sum()
                    }
                    _ => 0,
                }
            })
            .sum(),
        _ => 0,
    };
    instructions + input
}

/// The usage numbers of one answer.
struct Counts {
    input: u64,
    output: u64,
    cached: u64,
    reasoning: u64,
}

impl Counts {
    fn usage(&self) -> Value {
        json!({
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.input + self.output,
        })
    }
}

/// What stays the same across the response objects of one answer.
struct Ctx<'a> {
    id: String,
    created: u64,
    model: &'a str,
    body: &'a Value,
}

impl Ctx<'_> {
    /// A `response` object.
    fn response(&self, status: &str, output: Value, usage: Option<Value>) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": false, "error": null, "incomplete_details": null,
            "instructions": self.body.get("instructions").cloned().unwrap_or(Value::Null),
            "max_output_tokens": self.body.get("max_output_tokens").cloned().unwrap_or(Value::Null),
            "model": self.model, "output": output, "parallel_tool_calls": true,
            "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
            "service_tier": "default", "store": true, "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
            "user": null, "metadata": {},
        });
        if let Some(u) = usage {
            r["usage"] = u;
        }
        r
    }

    /// The final `response` object, as `x-mock-responses-final` says it ends.
    fn last(&self, end: ResponsesFinal, item: &Value, usage: Option<Value>) -> Value {
        let (status, field, value) = match end {
            ResponsesFinal::Completed => ("completed", "", Value::Null),
            ResponsesFinal::Incomplete => ("incomplete", "incomplete_details", json!({"reason": "max_output_tokens"})),
            ResponsesFinal::Failed => (
                "failed",
                "error",
                json!({"code": "server_error", "message": "The model failed to generate a response."}),
            ),
        };
        let mut r = self.response(status, json!([item]), usage);
        if !field.is_empty() {
            r[field] = value;
        }
        r
    }
}

/// The output message item.
fn message(id: &str, status: &str, text: Option<&str>) -> Value {
    let content = match text {
        Some(t) => json!([{"type": "output_text", "text": t, "annotations": []}]),
        None => json!([]),
    };
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": content})
}

/// The answer to a Responses request, before [`crate::shape::finish`].
pub fn answer(req: &Request, knobs: &Knobs) -> Plan {
    match respond(req, knobs) {
        Ok(p) | Err(p) => p,
    }
}

fn respond(req: &Request, knobs: &Knobs) -> Result<Plan, Plan> {
    let (body, model) = request_json(req)?;
    if let Some(p) = scenario_error(knobs, &model) {
        return Ok(p);
    }
    if !body.get("input").is_some_and(|i| i.is_string() || i.is_array()) {
        return Err(invalid("Missing required parameter: 'input'."));
    }
    let input = knobs.prompt_tokens.unwrap_or_else(|| estimate_input(&body));
    let output = knobs
        .completion_tokens
        .or_else(|| body.get("max_output_tokens").and_then(Value::as_u64))
        .unwrap_or(DEFAULT_COMPLETION_TOKENS);
    knobs.check_cached(input).and_then(|_| knobs.check_reasoning(output)).map_err(invalid)?;
    let counts = Counts { input, output, cached: knobs.cached_tokens, reasoning: knobs.reasoning_tokens };
    let pieces = content_pieces(knobs, output - knobs.reasoning_tokens);
    let text = pieces.concat();
    let ctx = Ctx { id: text::id("resp_"), created: now(), model: &model, body: &body };
    let item_id = text::id("msg_");
    let item_status = if knobs.responses_final == ResponsesFinal::Completed { "completed" } else { "incomplete" };
    let item = message(&item_id, item_status, Some(&text));
    let usage = knobs.usage_in_body().then(|| counts.usage());
    let end = knobs.responses_final;

    let mut plan = if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let mut plan = json_plan(ctx.last(end, &item, usage));
        if knobs.scenario == Scenario::Malformed {
            let body = plan.body();
            plan.pieces = vec![body[..body.len() / 2].to_vec()];
        }
        plan
    } else {
        let mut seq = 0u64;
        let mut events = Vec::new();
        let mut push = |kind: &str, mut data: Value| {
            data["type"] = kind.into();
            data["sequence_number"] = seq.into();
            seq += 1;
            events.push(sse_event(kind, &data.to_string()));
        };
        let created = ctx.response("in_progress", json!([]), Some(Value::Null));
        push("response.created", json!({"response": created}));
        if knobs.scenario == Scenario::Malformed {
            let mut events = std::mem::take(&mut events);
            events.push(sse_event(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","sequence_number":1,"delta":"Hel"#,
            ));
            events.push(sse_event("response.output_text.delta", "not json at all"));
            events.push(sse_event(
                "response.completed",
                r#"{"type":"response.completed","sequence_number":3,"response":{"usage":{"input_tokens":"twelve","output_tokens":-1}}}"#,
            ));
            stream_plan(events, knobs)
        } else {
            push("response.in_progress", json!({"response": created}));
            let at = |extra: Value| {
                let mut v = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
                for (k, x) in extra.as_object().into_iter().flatten() {
                    v[k] = x.clone();
                }
                v
            };
            push(
                "response.output_item.added",
                json!({"output_index": 0, "item": message(&item_id, "in_progress", None)}),
            );
            let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": []});
            push("response.content_part.added", at(json!({"part": part("")})));
            for p in &pieces {
                push("response.output_text.delta", at(json!({"delta": p, "logprobs": []})));
            }
            push("response.output_text.done", at(json!({"text": text, "logprobs": []})));
            push("response.content_part.done", at(json!({"part": part(&text)})));
            push("response.output_item.done", json!({"output_index": 0, "item": item}));
            let kind = match end {
                ResponsesFinal::Completed => "response.completed",
                ResponsesFinal::Incomplete => "response.incomplete",
                ResponsesFinal::Failed => "response.failed",
            };
            push(kind, json!({"response": ctx.last(end, &item, usage)}));
            stream_plan(events, knobs)
        }
    };
    usage_headers(
        &mut plan,
        knobs,
        HeaderUsage { input, output, cached: counts.cached, reasoning: counts.reasoning, cache_creation: 0 },
    );
    Ok(plan)
}

fn stream_plan(events: Vec<Vec<u8>>, knobs: &Knobs) -> Plan {
    Plan::sse(events, knobs.chunk_delay, request_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::plan;

    fn post(headers: &[(&str, &str)], body: Value) -> Plan {
        plan(&Request {
            method: "POST".into(),
            path: "/v1/responses".into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.to_string().into_bytes(),
            keep_alive: true,
        })
    }

    fn request(stream: bool) -> Value {
        json!({"model": "gpt-4.1", "input": "Say hello to the meter", "stream": stream})
    }

    fn header<'a>(p: &'a Plan, name: &str) -> Option<&'a str> {
        p.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn events(p: &Plan) -> Vec<(String, Value)> {
        let body = String::from_utf8(p.body()).unwrap();
        body.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_string();
                let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect()
    }

    const COUNTS: [(&str, &str); 4] = [
        ("x-mock-prompt-tokens", "1200"),
        ("x-mock-completion-tokens", "300"),
        ("x-mock-cached-tokens", "200"),
        ("x-mock-reasoning-tokens", "100"),
    ];

    fn want_usage() -> Value {
        json!({
            "input_tokens": 1200, "input_tokens_details": {"cached_tokens": 200},
            "output_tokens": 300, "output_tokens_details": {"reasoning_tokens": 100}, "total_tokens": 1500,
        })
    }

    #[test]
    fn non_streaming_response_object() {
        let p = post(&COUNTS, request(false));
        assert_eq!((p.status, p.framing), (200, crate::http::Framing::Length));
        assert_eq!(header(&p, "x-ratelimit-limit-requests"), Some("5000"));
        assert_eq!(header(&p, "x-ratelimit-remaining-tokens"), Some("1999000"));
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!((v["object"].as_str(), v["status"].as_str()), (Some("response"), Some("completed")));
        assert!(v["id"].as_str().unwrap().starts_with("resp_"));
        assert_eq!(v["model"], "gpt-4.1");
        assert_eq!(v["usage"], want_usage());
        let out = v["output"].as_array().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0]["type"].as_str(), out[0]["role"].as_str()), (Some("message"), Some("assistant")));
        let content = &out[0]["content"][0];
        assert_eq!((content["type"].as_str(), content["annotations"].clone()), (Some("output_text"), json!([])));
        assert_eq!(content["text"].as_str().unwrap().split(' ').count(), 200, "output minus reasoning");
        assert_eq!((v["error"].clone(), v["incomplete_details"].clone()), (Value::Null, Value::Null));
    }

    #[test]
    fn defaults() {
        let v: Value = serde_json::from_slice(&post(&[], request(false)).body()).unwrap();
        assert_eq!(v["usage"]["input_tokens"], 6, "ceil(22 / 4)");
        assert_eq!(v["usage"]["output_tokens"], 16);
        let mut req = request(false);
        req["max_output_tokens"] = 7.into();
        req["instructions"] = "Be brief.".into();
        let v: Value = serde_json::from_slice(&post(&[], req).body()).unwrap();
        assert_eq!((v["usage"]["input_tokens"].as_u64(), v["usage"]["output_tokens"].as_u64()), (Some(9), Some(7)));
        assert_eq!((v["max_output_tokens"].as_u64(), v["instructions"].as_str()), (Some(7), Some("Be brief.")));
    }

    #[test]
    fn stream_events_in_order_with_sequence_numbers() {
        let p = post(&COUNTS, request(true));
        assert_eq!(header(&p, "content-type"), Some("text/event-stream; charset=utf-8"));
        let ev = events(&p);
        assert_eq!(p.pieces.len(), ev.len());
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        let mut want = vec![
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ];
        want.extend(["response.output_text.delta"; 200]);
        want.extend([
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]);
        assert_eq!(names, want);
        for (i, (_, d)) in ev.iter().enumerate() {
            assert_eq!(d["sequence_number"], i);
        }
        let created = &ev[0].1["response"];
        assert_eq!((created["status"].as_str(), created["usage"].clone()), (Some("in_progress"), Value::Null));
        assert!(created.get("usage").is_some(), "usage: null, present");
        assert_eq!(ev[2].1["item"]["content"], json!([]));
        let delta = &ev[4].1;
        assert_eq!((delta["delta"].as_str(), delta["output_index"].as_u64()), (Some("Hello"), Some(0)));
        assert_eq!(delta["item_id"], ev[2].1["item"]["id"]);
        let text: String = ev[4..204].iter().map(|(_, d)| d["delta"].as_str().unwrap()).collect();
        assert_eq!(ev[204].1["text"], text.as_str());
        let last = &ev.last().unwrap().1["response"];
        assert_eq!((last["status"].as_str(), last["usage"].clone()), (Some("completed"), want_usage()));
        assert_eq!(last["output"][0]["content"][0]["text"], text.as_str());
        assert!(!String::from_utf8(p.body()).unwrap().contains("[DONE]"));
    }

    #[test]
    fn incomplete_and_failed_endings() {
        let mut headers = COUNTS.to_vec();
        headers.push(("x-mock-responses-final", "incomplete"));
        let ev = events(&post(&headers, request(true)));
        let (name, last) = ev.last().unwrap();
        assert_eq!(name, "response.incomplete");
        assert_eq!(last["response"]["status"], "incomplete");
        assert_eq!(last["response"]["incomplete_details"], json!({"reason": "max_output_tokens"}));
        assert_eq!(last["response"]["usage"], want_usage());
        let v: Value = serde_json::from_slice(&post(&headers, request(false)).body()).unwrap();
        assert_eq!((v["status"].as_str(), v["usage"].clone()), (Some("incomplete"), want_usage()));

        headers.pop();
        headers.push(("x-mock-responses-final", "failed"));
        let ev = events(&post(&headers, request(true)));
        let (name, last) = ev.last().unwrap();
        assert_eq!(name, "response.failed");
        assert_eq!(last["response"]["status"], "failed");
        assert_eq!(last["response"]["error"]["code"], "server_error");
        assert_eq!(last["response"]["usage"], want_usage());
    }

    #[test]
    fn scenarios_and_usage_in_headers() {
        let p = post(&[("x-mock-scenario", "rate_limit")], request(true));
        assert_eq!((p.status, header(&p, "retry-after")), (429, Some("1")));
        assert_eq!(post(&[("x-mock-scenario", "unavailable")], request(true)).status, 503);
        let p = post(&[("x-mock-scenario", "no_usage")], request(true));
        let ev = events(&p);
        assert!(ev.last().unwrap().1["response"].get("usage").is_none());
        let p = post(&[("x-mock-scenario", "malformed")], request(true));
        let body = String::from_utf8(p.body()).unwrap();
        assert!(body.starts_with("event: response.created\n") && body.contains("not json at all"));
        let p = post(&[("x-mock-scenario", "reset_mid_stream")], request(true));
        assert_eq!(p.reset_before, Some(p.pieces.len() / 2));

        let mut headers = COUNTS.to_vec();
        headers.push(("x-mock-usage-in-headers", "true"));
        let p = post(&headers, request(false));
        assert_eq!(header(&p, "x-usage-input-tokens"), Some("1200"));
        assert_eq!(header(&p, "x-usage-output-tokens"), Some("300"));
        assert_eq!(header(&p, "x-usage-cached-tokens"), Some("200"));
        assert_eq!(header(&p, "x-usage-reasoning-tokens"), Some("100"));
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        assert!(v.get("usage").is_none());

        assert_eq!(post(&[], json!({"model": "m"})).status, 400);
        let p = post(&[("x-mock-responses-final", "done")], request(false));
        assert_eq!(p.status, 400);
        assert!(String::from_utf8(p.body()).unwrap().contains("x-mock-responses-final"));
    }
}
