//! Google's Gemini API: `POST …/models/{model}:generateContent` and
//! `POST …/models/{model}:streamGenerateContent` (SSE with `?alt=sse`, else one JSON array
//! streamed element by element). Every answer is a `GenerateContentResponse` (or a stream of
//! them) with `candidates`, `usageMetadata`, `modelVersion` and `responseId`; errors are Google's
//! `{"error": {"code", "message", "status"}}`.
//!
//! Gemini's counts: `promptTokenCount` includes `cachedContentTokenCount`; `candidatesTokenCount`
//! excludes `thoughtsTokenCount`; `totalTokenCount` is prompt + candidates + thoughts. So
//! `x-mock-completion-tokens` is the candidates count (the visible text) and
//! `x-mock-reasoning-tokens` the thoughts count on top of it.

use crate::http::{Framing, Plan, Request};
use crate::knobs::{Knobs, Scenario};
use crate::shape::{usage_headers, HeaderUsage};
use crate::text::{self, content_pieces, text_tokens, DEFAULT_COMPLETION_TOKENS};
use serde_json::{json, Value};
use std::time::Duration;

const JSON: &str = "application/json; charset=UTF-8";

/// A Gemini call, from the request path.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub model: String,
    pub stream: bool,
    /// `alt=sse` in the query: SSE rather than a JSON array.
    pub sse: bool,
}

impl Call {
    /// Recognises `…/models/{model}:generateContent` and `…:streamGenerateContent`.
    pub fn parse(path: &str, query: &str) -> Option<Call> {
        let at = path.rfind("/models/")?;
        let (model, method) = path[at + "/models/".len()..].rsplit_once(':')?;
        let stream = match method {
            "generateContent" => false,
            "streamGenerateContent" => true,
            _ => return None,
        };
        let sse = query.split('&').any(|kv| kv == "alt=sse");
        Some(Call { model: model.to_string(), stream, sse })
    }
}

/// An error in Google's shape.
pub fn error_plan(code: u16, status: &str, message: &str) -> Plan {
    error_with(code, status, message, None)
}

fn error_with(code: u16, status: &str, message: &str, details: Option<Value>) -> Plan {
    let mut error = json!({"code": code, "message": message, "status": status});
    if let Some(d) = details {
        error["details"] = d;
    }
    Plan {
        status: code,
        headers: vec![("content-type".into(), JSON.into())],
        delay: Duration::ZERO,
        framing: Framing::Length,
        pieces: vec![json!({"error": error}).to_string().into_bytes()],
        gap: Duration::ZERO,
        reset_before: None,
    }
}

/// A 400 `INVALID_ARGUMENT`.
pub fn invalid(msg: impl Into<String>) -> Plan {
    error_plan(400, "INVALID_ARGUMENT", &msg.into())
}

/// Prompt tokens of the `contents` and `systemInstruction` texts, at least 1.
fn estimate_prompt(body: &Value) -> u64 {
    let parts_text = |content: &Value| -> u64 {
        content
            .get("parts")
            .and_then(Value::as_array)
            .map(|parts| parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(text_tokens).sum())
            .unwrap_or(0)
    };
    let contents: u64 =
        body.get("contents").and_then(Value::as_array).map(|c| c.iter().map(parts_text).sum()).unwrap_or(0);
    let system = body.get("systemInstruction").map_or(0, parts_text);
    (contents + system).max(1)
}

/// The usage numbers of one answer.
#[derive(Clone, Copy)]
struct Counts {
    prompt: u64,
    candidates: u64,
    thoughts: u64,
    cached: u64,
}

impl Counts {
    /// `usageMetadata` with `candidates` candidate tokens so far.
    fn usage(&self, candidates: u64) -> Value {
        let mut u = json!({
            "promptTokenCount": self.prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": self.prompt + candidates + self.thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": self.prompt}],
        });
        if self.thoughts > 0 {
            u["thoughtsTokenCount"] = self.thoughts.into();
        }
        if self.cached > 0 {
            u["cachedContentTokenCount"] = self.cached.into();
            u["cacheTokensDetails"] = json!([{"modality": "TEXT", "tokenCount": self.cached}]);
        }
        u
    }
}

/// The answer to a Gemini call, before [`crate::shape::finish`].
pub fn answer(call: &Call, req: &Request, knobs: &Knobs) -> Plan {
    match respond(call, req, knobs) {
        Ok(p) | Err(p) => p,
    }
}

fn respond(call: &Call, req: &Request, knobs: &Knobs) -> Result<Plan, Plan> {
    let body: Value =
        serde_json::from_slice(&req.body).map_err(|e| invalid(format!("Invalid JSON payload received. {e}")))?;
    if !body.is_object() {
        return Err(invalid("Invalid JSON payload received. Expected an object."));
    }
    if !body.get("contents").is_some_and(Value::is_array) {
        return Err(invalid("* GenerateContentRequest.contents: contents is not specified\n"));
    }
    match knobs.scenario {
        Scenario::RateLimit => {
            let details = json!([
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"},
            ]);
            let msg = "You exceeded your current quota, please check your plan and billing details.";
            return Ok(error_with(429, "RESOURCE_EXHAUSTED", msg, Some(details)));
        }
        Scenario::ServerError => {
            let msg = "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting";
            return Ok(error_plan(500, "INTERNAL", msg));
        }
        Scenario::Unavailable => {
            return Ok(error_plan(503, "UNAVAILABLE", "The model is overloaded. Please try again later."));
        }
        _ => {}
    }
    let prompt = knobs.prompt_tokens.unwrap_or_else(|| estimate_prompt(&body));
    knobs.check_cached(prompt).map_err(invalid)?;
    let counts = Counts {
        prompt,
        candidates: knobs
            .completion_tokens
            .or_else(|| body.pointer("/generationConfig/maxOutputTokens").and_then(Value::as_u64))
            .unwrap_or(DEFAULT_COMPLETION_TOKENS),
        thoughts: knobs.reasoning_tokens,
        cached: knobs.cached_tokens,
    };
    let pieces = content_pieces(knobs, counts.candidates);
    let response_id = text::id("");
    let with_usage = knobs.usage_in_body();
    // Chunk `i` of `n`: its text, `finishReason` on the last, usage counted up to it.
    let chunk = |text: &str, i: usize, n: usize| {
        let mut candidate = json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
        if i + 1 == n {
            candidate["finishReason"] = "STOP".into();
        }
        let mut c = json!({"candidates": [candidate], "modelVersion": call.model, "responseId": response_id});
        if with_usage {
            c["usageMetadata"] = counts.usage(counts.candidates * (i as u64 + 1) / n as u64);
        }
        c.to_string()
    };
    let malformed = knobs.scenario == Scenario::Malformed;
    let mut plan = if !call.stream {
        let mut body = chunk(&pieces.concat(), 0, 1).into_bytes();
        if malformed {
            body.truncate(body.len() / 2);
        }
        Plan {
            status: 200,
            headers: vec![("content-type".into(), JSON.into())],
            delay: Duration::ZERO,
            framing: Framing::Length,
            pieces: vec![body],
            gap: Duration::ZERO,
            reset_before: None,
        }
    } else {
        let n = pieces.len();
        let chunks: Vec<String> = if malformed {
            vec![
                chunk(&pieces[0], 0, n + 1),
                r#"{"candidates":[{"content":{"parts":[{"text":"Hel"#.to_string(),
                "not json at all".to_string(),
                r#"{"usageMetadata":{"promptTokenCount":"twelve","candidatesTokenCount":-1}}"#.to_string(),
            ]
        } else {
            pieces.iter().enumerate().map(|(i, p)| chunk(p, i, n)).collect()
        };
        let (content_type, events) = if call.sse {
            ("text/event-stream", chunks.iter().map(|c| format!("data: {c}\r\n\r\n").into_bytes()).collect())
        } else {
            // One JSON array, an element per piece: `[{…}`, `,\r\n{…}`, …, `]`.
            let mut events: Vec<Vec<u8>> = chunks
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{}{c}", if i == 0 { "[" } else { ",\r\n" }).into_bytes())
                .collect();
            events.push(b"]".to_vec());
            (JSON, events)
        };
        Plan {
            status: 200,
            headers: vec![("content-type".into(), content_type.into())],
            delay: Duration::ZERO,
            framing: Framing::Chunked,
            pieces: events,
            gap: knobs.chunk_delay,
            reset_before: None,
        }
    };
    usage_headers(
        &mut plan,
        knobs,
        HeaderUsage {
            input: counts.prompt,
            output: counts.candidates,
            cached: counts.cached,
            reasoning: counts.thoughts,
            cache_creation: 0,
        },
    );
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
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

    const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
    const SSE: &str = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
    const ARRAY: &str = "/v1beta/models/gemini-2.5-flash:streamGenerateContent";

    fn request() -> Value {
        json!({"contents": [{"role": "user", "parts": [{"text": "Say hello to the meter"}]}],
               "generationConfig": {"maxOutputTokens": 5}})
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
    fn paths() {
        let c = Call::parse("/v1beta/models/gemini-2.5-flash:generateContent", "").unwrap();
        assert_eq!(c, Call { model: "gemini-2.5-flash".into(), stream: false, sse: false });
        let c = Call::parse("/gemini/v1/models/gemini-pro:streamGenerateContent", "key=k&alt=sse").unwrap();
        assert_eq!(c, Call { model: "gemini-pro".into(), stream: true, sse: true });
        assert!(Call::parse("/v1beta/models/gemini-pro:countTokens", "").is_none());
        assert!(Call::parse("/v1/models", "").is_none());
        assert!(Call::parse("/v1beta/models/gemini-pro:streamGenerateContent", "alt=json").is_some_and(|c| !c.sse));
    }

    #[test]
    fn non_streaming() {
        let p = post(GENERATE, &COUNTS, request());
        assert_eq!((p.status, p.framing), (200, Framing::Length));
        assert_eq!(header(&p, "content-type"), Some(JSON));
        assert!(!p.headers.iter().any(|(k, _)| k.contains("ratelimit")), "Gemini sends none");
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["candidates", "modelVersion", "responseId", "usageMetadata"]);
        let c = &v["candidates"][0];
        assert_eq!((c["finishReason"].as_str(), c["index"].as_u64()), (Some("STOP"), Some(0)));
        assert_eq!(c["content"]["role"], "model");
        assert_eq!(c["content"]["parts"][0]["text"].as_str().unwrap().split(' ').count(), 300);
        assert_eq!(v["modelVersion"], "gemini-2.5-flash");
        assert_eq!(
            v["usageMetadata"],
            json!({
                "promptTokenCount": 1200, "candidatesTokenCount": 300, "totalTokenCount": 1600,
                "thoughtsTokenCount": 100, "cachedContentTokenCount": 200,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}],
                "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 200}],
            })
        );
        // Defaults: estimated prompt, maxOutputTokens; zero counts omitted.
        let v: Value = serde_json::from_slice(&post(GENERATE, &[], request()).body()).unwrap();
        assert_eq!(
            v["usageMetadata"],
            json!({"promptTokenCount": 6, "candidatesTokenCount": 5, "totalTokenCount": 11,
                   "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 6}]})
        );
    }

    fn sse_chunks(p: &Plan) -> Vec<Value> {
        let body = String::from_utf8(p.body()).unwrap();
        assert!(body.ends_with("\r\n\r\n"));
        body.split("\r\n\r\n")
            .filter(|e| !e.is_empty())
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn sse_stream_counts_up() {
        let p = post(SSE, &[("x-mock-chunks", "4"), ("x-mock-reasoning-tokens", "7")], request());
        assert_eq!((p.framing, header(&p, "content-type")), (Framing::Chunked, Some("text/event-stream")));
        let chunks = sse_chunks(&p);
        assert_eq!((chunks.len(), p.pieces.len()), (4, 4));
        let cands: Vec<u64> =
            chunks.iter().map(|c| c["usageMetadata"]["candidatesTokenCount"].as_u64().unwrap()).collect();
        assert_eq!(cands, [1, 2, 3, 5]);
        for c in &chunks {
            assert_eq!(c["usageMetadata"]["promptTokenCount"], 6);
            assert_eq!(c["usageMetadata"]["thoughtsTokenCount"], 7);
            assert_eq!(c["modelVersion"], "gemini-2.5-flash");
        }
        assert_eq!(chunks[3]["usageMetadata"]["totalTokenCount"], 6 + 5 + 7);
        assert!(chunks[..3].iter().all(|c| c["candidates"][0].get("finishReason").is_none()));
        assert_eq!(chunks[3]["candidates"][0]["finishReason"], "STOP");
        let text: String =
            chunks.iter().map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap()).collect();
        assert_eq!(text, "Hello there this is a");
    }

    #[test]
    fn json_array_stream() {
        let p = post(ARRAY, &COUNTS, request());
        assert_eq!((p.framing, header(&p, "content-type")), (Framing::Chunked, Some(JSON)));
        assert_eq!(p.pieces.len(), 300 + 1, "an element per piece, then the closing bracket");
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        let items = v.as_array().unwrap();
        assert_eq!(items.len(), 300, "one word per candidate token: thoughts are not text");
        assert!(p.pieces[0].starts_with(b"[{") && p.pieces[1].starts_with(b",\r\n{"));
        assert_eq!(items[299]["usageMetadata"]["candidatesTokenCount"], 300);
        assert_eq!(items[299]["usageMetadata"]["totalTokenCount"], 1600);
    }

    #[test]
    fn errors_and_scenarios() {
        let p = post(GENERATE, &[("x-mock-scenario", "rate_limit")], request());
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!(p.status, 429);
        assert_eq!(
            (v["error"]["code"].as_u64(), v["error"]["status"].as_str()),
            (Some(429), Some("RESOURCE_EXHAUSTED"))
        );
        assert!(v["error"]["message"].is_string());
        let p = post(SSE, &[("x-mock-scenario", "server_error")], request());
        assert_eq!((p.status, p.framing), (500, Framing::Length));
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!(v["error"]["status"], "INTERNAL");
        let v: Value =
            serde_json::from_slice(&post(GENERATE, &[("x-mock-scenario", "unavailable")], request()).body()).unwrap();
        assert_eq!((v["error"]["code"].as_u64(), v["error"]["status"].as_str()), (Some(503), Some("UNAVAILABLE")));

        let p = post(GENERATE, &[("x-mock-chunks", "zero")], request());
        let v: Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!((p.status, v["error"]["status"].as_str()), (400, Some("INVALID_ARGUMENT")));
        assert!(v["error"]["message"].as_str().unwrap().contains("x-mock-chunks"));
        assert_eq!(post(GENERATE, &[], json!({"model": "x"})).status, 400);
        assert_eq!(
            post(GENERATE, &[("x-mock-cached-tokens", "50"), ("x-mock-prompt-tokens", "5")], request()).status,
            400
        );

        let p = post(SSE, &[("x-mock-scenario", "no_usage")], request());
        assert!(sse_chunks(&p).iter().all(|c| c.get("usageMetadata").is_none()));
        let p = post(SSE, &[("x-mock-scenario", "malformed")], request());
        let body = String::from_utf8(p.body()).unwrap();
        assert!(body.contains("data: not json at all\r\n\r\n"));
        let p = post(SSE, &[("x-mock-scenario", "reset_mid_stream")], request());
        assert_eq!(p.reset_before, Some(p.pieces.len() / 2));

        let mut headers = COUNTS.to_vec();
        headers.push(("x-mock-usage-in-headers", "1"));
        let p = post(SSE, &headers, request());
        assert_eq!(header(&p, "x-usage-input-tokens"), Some("1200"));
        assert_eq!(header(&p, "x-usage-output-tokens"), Some("300"));
        assert_eq!(header(&p, "x-usage-cached-tokens"), Some("200"));
        assert_eq!(header(&p, "x-usage-reasoning-tokens"), Some("100"));
        assert!(!String::from_utf8(p.body()).unwrap().contains("usageMetadata"));

        let p = post(GENERATE, &[("x-mock-ratelimit-style", "generic")], request());
        assert_eq!((header(&p, "x-ratelimit-limit"), header(&p, "x-ratelimit-remaining")), (Some("1000"), Some("999")));
    }
}
