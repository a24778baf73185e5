//! OpenAI-compatible answers (chat completions, legacy completions, embeddings and the plain GET
//! endpoints), built as [`Plan`]s from the request and its `x-mock-*` headers (documented in the
//! crate docs). Bodies follow the shapes the OpenAI API returns today, key for key where the meter
//! cares (`usage` and its details, `stream_options.include_usage`, the final `choices: []` usage
//! chunk, `data: [DONE]`). The Responses API lives in [`crate::responses`].

use crate::http::{Framing, Plan, Request};
use crate::knobs::{Knobs, Scenario, MAX_DIMENSIONS};
use crate::shape::{usage_headers, HeaderUsage};
use crate::text::{content_pieces, now, sse, text_tokens, DEFAULT_COMPLETION_TOKENS};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const DEFAULT_DIMENSIONS: usize = 1536;

const MODELS: &[&str] = &["gpt-4o", "gpt-4o-mini", "o3-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small"];

/// A 400 in OpenAI's shape.
pub fn invalid(msg: impl Into<String>) -> Plan {
    error_plan(400, "invalid_request_error", &msg.into(), None)
}

/// An OpenAI-style error response.
pub fn error_plan(status: u16, kind: &str, message: &str, code: Option<&str>) -> Plan {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    Plan {
        status,
        headers: vec![("content-type".into(), "application/json".into()), request_id()],
        delay: Duration::ZERO,
        framing: Framing::Length,
        pieces: vec![body.to_string().into_bytes()],
        gap: Duration::ZERO,
        reset_before: None,
    }
}

/// The `x-request-id` header OpenAI sends with every answer.
pub fn request_id() -> (String, String) {
    static N: AtomicU64 = AtomicU64::new(1);
    ("x-request-id".into(), format!("req_mock{:08}", N.fetch_add(1, Ordering::Relaxed)))
}

/// The GET endpoints, and a 404 for any path that no API claims.
pub fn other(req: &Request, path: &str) -> Plan {
    let get = req.method == "GET";
    if path.ends_with("/healthz") && get {
        text_plan(200, "ok\n")
    } else if path.ends_with("/models") && get {
        let data: Vec<Value> = MODELS
            .iter()
            .map(|m| json!({"id": m, "object": "model", "created": 1_715_367_049, "owned_by": "mock"}))
            .collect();
        json_plan(json!({"object": "list", "data": data}))
    } else {
        let msg = format!("Unknown request URL: {} {path}.", req.method);
        error_plan(404, "invalid_request_error", &msg, Some("unknown_url"))
    }
}

/// A 405 for a non-POST request to a POST endpoint.
pub fn method_not_allowed(req: &Request, path: &str) -> Plan {
    let msg = format!("Method {} is not allowed for {path}: use POST.", req.method);
    error_plan(405, "invalid_request_error", &msg, None)
}

/// The OpenAI endpoints answered here.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

/// The request body as a JSON object and its `model`, or a 400 saying what is wrong.
pub fn request_json(req: &Request) -> Result<(Value, String), Plan> {
    let body: Value = serde_json::from_slice(&req.body).map_err(|e| {
        invalid(format!(
            "We could not parse the JSON body of your request ({e}). (HINT: This likely means you aren't using your HTTP library correctly.)"
        ))
    })?;
    if !body.is_object() {
        return Err(invalid("The request body must be a JSON object."));
    }
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return Err(invalid("You must provide a model parameter."));
    };
    let model = model.to_string();
    Ok((body, model))
}

/// The error answer of the `rate_limit`, `server_error` and `unavailable` scenarios.
pub fn scenario_error(knobs: &Knobs, model: &str) -> Option<Plan> {
    match knobs.scenario {
        Scenario::RateLimit => Some(rate_limit_plan(model)),
        Scenario::ServerError => {
            let msg = "The server had an error while processing your request. Sorry about that!";
            Some(error_plan(500, "server_error", msg, None))
        }
        Scenario::Unavailable => {
            let msg = "The engine is currently overloaded, please try again later.";
            Some(error_plan(503, "server_error", msg, Some("overloaded")))
        }
        _ => None,
    }
}

/// The answer of `endpoint` to `req`, before [`crate::shape::finish`].
pub fn answer(endpoint: Endpoint, req: &Request, knobs: &Knobs) -> Plan {
    let result = request_json(req).and_then(|(body, model)| {
        if let Some(p) = scenario_error(knobs, &model) {
            return Ok(p);
        }
        match endpoint {
            Endpoint::Chat | Endpoint::Completions => generate(endpoint, &model, &body, knobs),
            Endpoint::Embeddings => embed(&model, &body, knobs),
        }
    });
    match result {
        Ok(p) | Err(p) => p,
    }
}

fn text_plan(status: u16, text: &str) -> Plan {
    Plan {
        status,
        headers: vec![("content-type".into(), "text/plain".into())],
        delay: Duration::ZERO,
        framing: Framing::Length,
        pieces: vec![text.as_bytes().to_vec()],
        gap: Duration::ZERO,
        reset_before: None,
    }
}

pub fn json_plan(body: Value) -> Plan {
    json_bytes_plan(body.to_string().into_bytes())
}

/// A 200 `application/json` answer with this body.
pub fn json_bytes_plan(body: Vec<u8>) -> Plan {
    Plan {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into()), request_id()],
        delay: Duration::ZERO,
        framing: Framing::Length,
        pieces: vec![body],
        gap: Duration::ZERO,
        reset_before: None,
    }
}

pub fn rate_limit_plan(model: &str) -> Plan {
    let msg = format!(
        "Rate limit reached for {model} in organization org-mock on requests per min (RPM): Limit 500, Used 500, \
         Requested 1. Please try again in 1s. Visit https://platform.openai.com/account/rate-limits to learn more."
    );
    let mut plan = error_plan(429, "requests", &msg, Some("rate_limit_exceeded"));
    for (k, v) in [
        ("retry-after", "1"),
        ("x-ratelimit-limit-requests", "500"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-limit-tokens", "30000"),
        ("x-ratelimit-remaining-tokens", "29000"),
        ("x-ratelimit-reset-tokens", "2ms"),
    ] {
        plan.headers.push((k.into(), v.into()));
    }
    plan
}

/// Tokens of a prompt given as a string, strings, a token array or token arrays.
pub fn prompt_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => text_tokens(s).max(1),
        Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
        Value::Array(items) => items.iter().map(prompt_tokens).sum(),
        _ => 0,
    }
}

/// Chat prompt tokens, counted the way OpenAI's cookbook estimates them: 3 to prime the reply,
/// 4 per message, plus the text.
pub fn chat_prompt_tokens(body: &Value) -> u64 {
    let messages = body.get("messages").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    let text = |m: &Value| -> u64 {
        match m.get("content") {
            Some(Value::String(s)) => text_tokens(s),
            Some(Value::Array(parts)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(text_tokens).sum()
            }
            _ => 0,
        }
    };
    3 + messages.iter().map(|m| 4 + text(m)).sum::<u64>()
}

struct Counts {
    prompt: u64,
    completion: u64,
    cached: u64,
    reasoning: u64,
}

impl Counts {
    fn usage(&self, endpoint: Endpoint) -> Value {
        let mut usage = json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        });
        // The legacy completions API reports only the three totals, unless there is more to say.
        if endpoint == Endpoint::Chat || self.cached > 0 || self.reasoning > 0 {
            usage["prompt_tokens_details"] = json!({"cached_tokens": self.cached, "audio_tokens": 0});
            usage["completion_tokens_details"] = json!({
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            });
        }
        usage
    }
}

/// Chat completions and legacy completions, streaming or not.
fn generate(endpoint: Endpoint, model: &str, body: &Value, knobs: &Knobs) -> Result<Plan, Plan> {
    let chat = endpoint == Endpoint::Chat;
    if chat && !body.get("messages").is_some_and(Value::is_array) {
        return Err(invalid("Missing required parameter: 'messages'."));
    }
    if !chat && body.get("prompt").is_none() {
        return Err(invalid("Missing required parameter: 'prompt'."));
    }
    let prompt = knobs.prompt_tokens.unwrap_or_else(|| {
        if chat {
            chat_prompt_tokens(body)
        } else {
            body.get("prompt").map(prompt_tokens).unwrap_or(0)
        }
    });
    let max_tokens = body.get("max_completion_tokens").or_else(|| body.get("max_tokens")).and_then(Value::as_u64);
    let (completion, limited) = match (knobs.completion_tokens, max_tokens) {
        (Some(n), _) => (n, false),
        (None, Some(n)) => (n, true),
        (None, None) => (DEFAULT_COMPLETION_TOKENS, false),
    };
    knobs.check_cached(prompt).and_then(|_| knobs.check_reasoning(completion)).map_err(invalid)?;
    let counts = Counts { prompt, completion, cached: knobs.cached_tokens, reasoning: knobs.reasoning_tokens };
    let finish = if limited { "length" } else { "stop" };
    let pieces = content_pieces(knobs, completion - knobs.reasoning_tokens);
    let (id, object) = if chat {
        (crate::text::id("chatcmpl-"), "chat.completion")
    } else {
        (crate::text::id("cmpl-"), "text_completion")
    };
    let created = now();
    let with_usage = knobs.usage_in_body();
    let header_usage = HeaderUsage {
        input: prompt,
        output: completion,
        cached: knobs.cached_tokens,
        reasoning: knobs.reasoning_tokens,
        cache_creation: 0,
    };

    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    if stream && knobs.pad_bytes.is_some() {
        return Err(invalid("mock-llm: header x-mock-pad-bytes: only for non-streaming answers"));
    }
    if !stream {
        let build = || {
            let mut text = pieces.concat();
            if let Some(len) = knobs.pad_bytes {
                crate::text::pad(&mut text, len);
            }
            let choice = if chat {
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []},
                    "logprobs": null,
                    "finish_reason": finish,
                })
            } else {
                json!({"text": text, "index": 0, "logprobs": null, "finish_reason": finish})
            };
            let mut out = json!({
                "id": id, "object": object, "created": created, "model": model,
                "choices": [choice], "system_fingerprint": "fp_mock",
            });
            if chat {
                out["service_tier"] = "default".into();
            }
            if with_usage {
                // Serialized last (keys in order): after the whole text, however long.
                out["usage"] = counts.usage(endpoint);
            }
            let mut bytes = out.to_string().into_bytes();
            if knobs.scenario == Scenario::Malformed {
                bytes.truncate(bytes.len() / 2);
            }
            bytes
        };
        let mut plan = match knobs.pad_bytes {
            None => json_bytes_plan(build()),
            // Built and compressed once per distinct answer; repeats carry the first one's id
            // and timestamp.
            Some(len) => {
                let key = format!(
                    "{endpoint:?} {model:?} {prompt} {completion} {} {} {finish} {with_usage} {:?} {:?} {len} {:?} {}",
                    knobs.cached_tokens,
                    knobs.reasoning_tokens,
                    knobs.content,
                    knobs.scenario,
                    knobs.encoding,
                    knobs.lgwin()
                );
                let (encoding, lgwin) = (knobs.encoding, knobs.lgwin());
                let bytes = crate::cache::body(&key, || {
                    let raw = build();
                    match encoding {
                        Some(e) => crate::encoding::compress(e, &raw, lgwin),
                        None => raw,
                    }
                });
                let mut plan = json_bytes_plan(bytes.to_vec());
                if let Some(e) = encoding {
                    plan.headers.push(("content-encoding".into(), e.header().into()));
                }
                plan
            }
        };
        usage_headers(&mut plan, knobs, header_usage);
        return Ok(plan);
    }

    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let chunk_object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = |choice: Value| {
        let mut c = json!({
            "id": id, "object": chunk_object, "created": created, "model": model,
            "system_fingerprint": "fp_mock", "choices": [choice],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c.to_string()
    };
    let delta = |delta: Value, finish: Option<&str>| json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish});
    let text =
        |text: &str, finish: Option<&str>| json!({"text": text, "index": 0, "logprobs": null, "finish_reason": finish});

    let mut events = Vec::new();
    if knobs.scenario == Scenario::Malformed {
        events.push(sse(&chunk(delta(json!({"role": "assistant", "content": ""}), None))));
        events.push(sse(r#"{"id":"chatcmpl-mock","choices":[{"delta":{"content":"Hel"#));
        events.push(sse("not json at all"));
        events.push(sse(r#"{"choices":[],"usage":{"prompt_tokens":"twelve","completion_tokens":-1}}"#));
    } else {
        if chat {
            events.push(sse(&chunk(delta(json!({"role": "assistant", "content": "", "refusal": null}), None))));
            for p in &pieces {
                events.push(sse(&chunk(delta(json!({"content": p}), None))));
            }
            events.push(sse(&chunk(delta(json!({}), Some(finish)))));
        } else {
            let n = pieces.len();
            for (i, p) in pieces.iter().enumerate() {
                events.push(sse(&chunk(text(p, (i + 1 == n).then_some(finish)))));
            }
            if n == 0 {
                events.push(sse(&chunk(text("", Some(finish)))));
            }
        }
        if include_usage && with_usage {
            let last = json!({
                "id": id, "object": chunk_object, "created": created, "model": model,
                "system_fingerprint": "fp_mock", "choices": [], "usage": counts.usage(endpoint),
            });
            events.push(sse(&last.to_string()));
        }
    }
    events.push(sse("[DONE]"));
    let mut plan = Plan::sse(events, knobs.chunk_delay, request_id());
    usage_headers(&mut plan, knobs, header_usage);
    Ok(plan)
}

/// A deterministic unit vector for one input.
fn vector(seed: &[u8], dims: usize) -> Vec<f64> {
    // FNV-1a for the seed, xorshift64* for the values.
    let mut x = seed.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    x |= 1;
    let mut v: Vec<f64> = (0..dims)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    v.iter_mut().for_each(|a| *a /= norm);
    v
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn embed(model: &str, body: &Value, knobs: &Knobs) -> Result<Plan, Plan> {
    let inputs: Vec<&Value> = match body.get("input") {
        Some(v @ Value::String(_)) => vec![v],
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![body.get("input").unwrap_or(&Value::Null)]
        }
        Some(Value::Array(items)) if !items.is_empty() => items.iter().collect(),
        _ => return Err(invalid("'input' must be a non-empty string, array of strings or array of token arrays.")),
    };
    let dims = match (knobs.dimensions, body.get("dimensions")) {
        (Some(d), _) => d,
        (None, None) => DEFAULT_DIMENSIONS,
        (None, Some(d)) => match d.as_u64() {
            Some(d) if (1..=MAX_DIMENSIONS as u64).contains(&d) => d as usize,
            _ => return Err(invalid(format!("'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}."))),
        },
    };
    let base64_encoded = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let v = vector(input.to_string().as_bytes(), dims);
            let embedding = if base64_encoded {
                let bytes: Vec<u8> = v.iter().flat_map(|a| (*a as f32).to_le_bytes()).collect();
                Value::from(base64(&bytes))
            } else {
                Value::from(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens = knobs.prompt_tokens.unwrap_or_else(|| inputs.iter().map(|v| prompt_tokens(v)).sum());
    let mut out = json!({"object": "list", "data": data, "model": model});
    if knobs.usage_in_body() {
        out["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    let mut plan = json_plan(out);
    if knobs.scenario == Scenario::Malformed {
        let body = plan.body();
        plan.pieces = vec![body[..body.len() / 2].to_vec()];
    }
    usage_headers(&mut plan, knobs, HeaderUsage { input: tokens, ..HeaderUsage::default() });
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knobs::{SLOW_CHUNK_DELAY, SLOW_DELAY};
    use crate::route::plan;

    fn post(path: &str, headers: &[(&str, &str)], body: Value) -> Plan {
        plan(&Request {
            method: "POST".into(),
            path: path.into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.to_string().into_bytes(),
            keep_alive: true,
        })
    }

    fn chat(stream: bool, include_usage: bool) -> Value {
        let mut v = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello to the meter"}]});
        if stream {
            v["stream"] = true.into();
            v["stream_options"] = json!({"include_usage": include_usage});
        }
        v
    }

    fn body_json(p: &Plan) -> Value {
        serde_json::from_slice(&p.body()).unwrap()
    }

    /// The `data:` payloads of an SSE body.
    fn events(p: &Plan) -> Vec<String> {
        let body = String::from_utf8(p.body()).unwrap();
        assert!(body.ends_with("\n\n"));
        body.split("\n\n").filter(|e| !e.is_empty()).map(|e| e.strip_prefix("data: ").unwrap().to_string()).collect()
    }

    fn header<'a>(p: &'a Plan, name: &str) -> Option<&'a str> {
        p.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    const COUNTS: [(&str, &str); 4] = [
        ("x-mock-prompt-tokens", "1200"),
        ("x-mock-completion-tokens", "300"),
        ("x-mock-cached-tokens", "200"),
        ("x-mock-reasoning-tokens", "100"),
    ];

    #[test]
    fn non_streaming_chat_reports_the_scripted_usage() {
        let p = post("/v1/chat/completions", &COUNTS, chat(false, false));
        assert_eq!((p.status, p.framing), (200, Framing::Length));
        assert_eq!(header(&p, "content-type"), Some("application/json"));
        let v = body_json(&p);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let usage = &v["usage"];
        assert_eq!((usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()), (Some(1200), Some(300)));
        assert_eq!(usage["total_tokens"], 1500);
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 200);
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 100);
        // 200 visible words (completion minus reasoning).
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(content.split(' ').count(), 200);
    }

    #[test]
    fn defaults_estimate_the_prompt_and_follow_max_tokens() {
        let v = body_json(&post("/v1/chat/completions", &[], chat(false, false)));
        // 3 + 4 + ceil(22 / 4) = 13.
        assert_eq!(v["usage"]["prompt_tokens"], 13);
        assert_eq!(v["usage"]["completion_tokens"], DEFAULT_COMPLETION_TOKENS);
        let mut req = chat(false, false);
        req["max_tokens"] = 5.into();
        let v = body_json(&post("/v1/chat/completions", &[], req.clone()));
        assert_eq!(
            (v["usage"]["completion_tokens"].as_u64(), v["choices"][0]["finish_reason"].as_str()),
            (Some(5), Some("length"))
        );
        req["max_completion_tokens"] = 9.into();
        assert_eq!(body_json(&post("/v1/chat/completions", &[], req))["usage"]["completion_tokens"], 9);
    }

    #[test]
    fn streaming_chat_follows_openai_include_usage() {
        let p = post("/v1/chat/completions", &[("x-mock-completion-tokens", "5")], chat(true, true));
        assert_eq!(p.framing, Framing::Chunked);
        assert_eq!(header(&p, "content-type"), Some("text/event-stream; charset=utf-8"));
        let ev = events(&p);
        assert_eq!(ev.len(), 1 + 5 + 1 + 1 + 1, "role, 5 words, finish, usage, [DONE]: {ev:?}");
        assert_eq!(p.pieces.len(), ev.len(), "one event per piece");
        assert_eq!(ev.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        for c in &chunks[..chunks.len() - 1] {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert!(c["usage"].is_null() && c.get("usage").is_some(), "usage: null before the last chunk");
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks[1..6].iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap()).collect();
        assert_eq!(text, "Hello there this is a");
        assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["completion_tokens"], 5);

        // Without include_usage: no usage anywhere, as OpenAI does.
        let p = post("/v1/chat/completions", &[("x-mock-completion-tokens", "5")], chat(true, false));
        let body = String::from_utf8(p.body()).unwrap();
        assert!(!body.contains("usage"), "{body}");
        assert_eq!(events(&p).len(), 8);
    }

    #[test]
    fn chunks_content_and_split() {
        let headers = [("x-mock-content", "abcdefghij"), ("x-mock-chunks", "3"), ("x-mock-chunk-delay-ms", "20")];
        let p = post("/v1/chat/completions", &headers, chat(true, true));
        assert_eq!(p.gap, Duration::from_millis(20));
        let ev = events(&p);
        let parts: Vec<String> = ev[1..4]
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"].as_str().unwrap().into()
            })
            .collect();
        assert_eq!(parts, ["abcd", "efg", "hij"]);

        let whole = post("/v1/chat/completions", &[], chat(true, true)).body();
        let split =
            post("/v1/chat/completions", &[("x-mock-split", "7"), ("x-mock-split-delay-ms", "1")], chat(true, true));
        assert_eq!(split.gap, Duration::from_millis(1));
        assert!(split.pieces.iter().all(|p| p.len() <= 7));
        assert!(split.pieces.len() > 50);
        // Same stream, bar the ids and timestamps.
        assert_eq!(split.body().len(), whole.len());
    }

    #[test]
    fn legacy_completions() {
        let req = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time", "max_tokens": 7});
        let v = body_json(&post("/v1/completions", &[], req.clone()));
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["usage"], json!({"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}));
        assert_eq!(v["choices"][0]["text"].as_str().unwrap().split(' ').count(), 7);
        let mut req = req;
        req["stream"] = true.into();
        req["stream_options"] = json!({"include_usage": true});
        let ev = events(&post("/v1/completions", &[], req));
        assert_eq!(ev.len(), 7 + 1 + 1);
        let seventh: Value = serde_json::from_str(&ev[6]).unwrap();
        assert_eq!(seventh["choices"][0]["finish_reason"], "length");
        let usage: Value = serde_json::from_str(&ev[7]).unwrap();
        assert_eq!(usage["usage"]["total_tokens"], 11);
    }

    #[test]
    fn embeddings() {
        let req = json!({"model": "text-embedding-3-small", "input": ["alpha", "beta gamma delta"], "dimensions": 8});
        let v = body_json(&post("/v1/embeddings", &[], req.clone()));
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        let e: Vec<f64> = serde_json::from_value(v["data"][1]["embedding"].clone()).unwrap();
        assert_eq!(e.len(), 8);
        assert!((e.iter().map(|a| a * a).sum::<f64>() - 1.0).abs() < 1e-9, "unit length");
        assert_eq!(v["usage"], json!({"prompt_tokens": 2 + 4, "total_tokens": 6}));
        assert_eq!(body_json(&post("/v1/embeddings", &[], req.clone())), v, "deterministic");

        let v = body_json(&post("/v1/embeddings", &[("x-mock-dimensions", "3"), ("x-mock-prompt-tokens", "50")], req));
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 3);
        assert_eq!(v["usage"]["prompt_tokens"], 50);

        let req = json!({"model": "m", "input": [1, 2, 3], "encoding_format": "base64"});
        let v = body_json(&post("/v1/embeddings", &[], req));
        assert_eq!(v["data"].as_array().unwrap().len(), 1, "a token array is one input");
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["data"][0]["embedding"].as_str().unwrap().len(), 1536 * 4 / 3 * 4, "1536 f32 values in base64");
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"hell"), "aGVsbA==");
        assert_eq!(base64(b"hel"), "aGVs");
    }

    #[test]
    fn failure_scenarios() {
        let p = post("/v1/chat/completions", &[("x-mock-scenario", "rate_limit")], chat(false, false));
        assert_eq!(p.status, 429);
        assert_eq!(header(&p, "retry-after"), Some("1"));
        assert_eq!(header(&p, "x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(body_json(&p)["error"]["code"], "rate_limit_exceeded");
        assert_eq!(post("/v1/chat/completions", &[("x-mock-scenario", "server_error")], chat(true, true)).status, 500);
        assert_eq!(
            post("/v1/embeddings", &[("x-mock-scenario", "unavailable")], json!({"model": "m", "input": "x"})).status,
            503
        );

        let p = post("/v1/chat/completions", &[("x-mock-scenario", "slow")], chat(true, true));
        assert_eq!((p.status, p.delay, p.gap), (200, SLOW_DELAY, SLOW_CHUNK_DELAY));
        let p =
            post("/v1/chat/completions", &[("x-mock-scenario", "slow"), ("x-mock-delay-ms", "10")], chat(false, false));
        assert_eq!(p.delay, Duration::from_millis(10));

        let p = post("/v1/chat/completions", &[("x-mock-scenario", "reset_mid_stream")], chat(true, true));
        let n = p.pieces.len();
        assert_eq!(p.reset_before, Some(n / 2));
        let sent = p.pieces[..n / 2].concat();
        assert!(!String::from_utf8(sent).unwrap().contains("\"usage\":{"), "cut before the usage chunk");
        let p = post("/v1/chat/completions", &[("x-mock-scenario", "reset_mid_stream")], chat(false, false));
        assert_eq!((p.pieces.len(), p.reset_before), (2, Some(1)));

        let p = post("/v1/chat/completions", &[("x-mock-scenario", "no_usage")], chat(true, true));
        assert!(!String::from_utf8(p.body()).unwrap().contains("\"usage\":{"));
        assert!(body_json(&post("/v1/chat/completions", &[("x-mock-scenario", "no_usage")], chat(false, false)))
            .get("usage")
            .is_none());

        let p = post("/v1/chat/completions", &[("x-mock-scenario", "malformed")], chat(false, false));
        assert_eq!(p.status, 200);
        assert!(serde_json::from_slice::<Value>(&p.body()).is_err());
        let p = post("/v1/chat/completions", &[("x-mock-scenario", "malformed")], chat(true, true));
        assert_eq!(events(&p).last().unwrap(), "[DONE]");
        assert!(events(&p)[1..4]
            .iter()
            .all(|e| serde_json::from_str::<Value>(e).map_or(true, |v| v["usage"]["prompt_tokens"].is_string())));
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        for (headers, needle) in [
            (&[("x-mock-prompt-tokens", "lots")][..], "x-mock-prompt-tokens"),
            (&[("x-mock-split", "0")], "x-mock-split"),
            (&[("x-mock-delay-ms", "-5")], "x-mock-delay-ms"),
            (&[("x-mock-scenario", "explode")], "unknown scenario \\\"explode\\\""),
            (&[("x-mock-cached-tokens", "50"), ("x-mock-prompt-tokens", "10")], "x-mock-cached-tokens"),
            (&[("x-mock-reasoning-tokens", "50"), ("x-mock-completion-tokens", "10")], "x-mock-reasoning-tokens"),
        ] {
            let p = post("/v1/chat/completions", headers, chat(false, false));
            assert_eq!(p.status, 400);
            let body = String::from_utf8(p.body()).unwrap();
            assert!(body.contains(needle), "{needle}: {body}");
        }
        let raw = |method: &str, path: &str, body: &str| {
            plan(&Request {
                method: method.into(),
                path: path.into(),
                headers: vec![],
                body: body.into(),
                keep_alive: true,
            })
        };
        assert_eq!(raw("POST", "/v1/chat/completions", "{not json").status, 400);
        assert_eq!(raw("POST", "/v1/chat/completions", "[1]").status, 400);
        assert_eq!(raw("POST", "/v1/chat/completions", r#"{"messages": []}"#).status, 400);
        assert_eq!(raw("POST", "/v1/chat/completions", r#"{"model": "m"}"#).status, 400);
        assert_eq!(raw("POST", "/v1/embeddings", r#"{"model": "m", "input": []}"#).status, 400);
        assert_eq!(raw("GET", "/v1/chat/completions", "").status, 405);
        assert_eq!(raw("GET", "/v2/unknown", "").status, 404);
        assert_eq!(raw("GET", "/healthz", "").status, 200);
        assert_eq!(raw("GET", "/v1/models?x=1", "").status, 200);
        // Gateways mount the API under prefixes.
        assert_eq!(raw("POST", "/openai/v1/chat/completions", &chat(false, false).to_string()).status, 200);
    }
}
