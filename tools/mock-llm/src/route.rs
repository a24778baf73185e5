//! Which API a request is for (by path suffix, so gateways can mount the APIs under prefixes),
//! and the order every POST answer is built in: method check, `x-mock-*` headers (a 400 in the
//! API's own error shape when one is bad), the API's answer, then [`shape::finish`].

use crate::fail::{self, Cause};
use crate::http::{Plan, Request};
use crate::knobs::Knobs;
use crate::shape::{self, Family};
use crate::{anthropic, gemini, openai, responses};

/// The POST APIs.
#[derive(Debug, PartialEq)]
enum Api {
    OpenAi(openai::Endpoint),
    Responses,
    Anthropic,
    Gemini(gemini::Call),
}

impl Api {
    fn of(path: &str, query: &str) -> Option<Api> {
        Some(if path.ends_with("/v1/messages") {
            Api::Anthropic
        } else if path.ends_with("/responses") {
            Api::Responses
        } else if let Some(call) = gemini::Call::parse(path, query) {
            Api::Gemini(call)
        } else if path.ends_with("/chat/completions") {
            Api::OpenAi(openai::Endpoint::Chat)
        } else if path.ends_with("/completions") {
            Api::OpenAi(openai::Endpoint::Completions)
        } else if path.ends_with("/embeddings") {
            Api::OpenAi(openai::Endpoint::Embeddings)
        } else {
            return None;
        })
    }

    fn family(&self) -> Family {
        match self {
            Api::OpenAi(_) | Api::Responses => Family::OpenAi,
            Api::Anthropic => Family::Anthropic,
            Api::Gemini(_) => Family::Gemini,
        }
    }

    /// A 400 in this API's error shape.
    fn invalid(&self, msg: &str) -> Plan {
        match self {
            Api::OpenAi(_) | Api::Responses => openai::invalid(msg),
            Api::Anthropic => anthropic::invalid(msg),
            Api::Gemini(_) => gemini::invalid(msg),
        }
    }

    /// A scripted failure (`x-mock-fail-*`) in this API's error shape: `status` with the error
    /// type the API gives that status, and `retry-after` on a 429 when `x-mock-retry-after` says.
    fn failure(&self, status: u16, cause: Cause, model: Option<&str>, knobs: &Knobs) -> Plan {
        let msg = match (cause, model) {
            (Cause::Model, Some(m)) => format!("mock-llm: scripted failure (x-mock-fail-model) for model {m:?}"),
            _ => format!("mock-llm: scripted failure ({})", cause.header()),
        };
        let mut plan = match self {
            Api::OpenAi(_) | Api::Responses => {
                let (kind, code) = match status {
                    429 => ("requests", Some("rate_limit_exceeded")),
                    500..=599 => ("server_error", None),
                    _ => ("invalid_request_error", None),
                };
                openai::error_plan(status, kind, &msg, code)
            }
            Api::Anthropic => {
                let kind = match status {
                    401 => "authentication_error",
                    403 => "permission_error",
                    404 => "not_found_error",
                    413 => "request_too_large",
                    429 => "rate_limit_error",
                    529 => "overloaded_error",
                    500..=599 => "api_error",
                    _ => "invalid_request_error",
                };
                anthropic::error_plan(status, kind, &msg)
            }
            Api::Gemini(_) => {
                let kind = match status {
                    401 => "UNAUTHENTICATED",
                    403 => "PERMISSION_DENIED",
                    404 => "NOT_FOUND",
                    429 => "RESOURCE_EXHAUSTED",
                    503 => "UNAVAILABLE",
                    504 => "DEADLINE_EXCEEDED",
                    500..=599 => "INTERNAL",
                    _ => "INVALID_ARGUMENT",
                };
                gemini::error_plan(status, kind, &msg)
            }
        };
        if let Some(secs) = knobs.retry_after.filter(|_| status == 429) {
            plan.headers.push(("retry-after".into(), secs.to_string()));
        }
        plan
    }

    /// The model the request names: the body's `model`, or a Gemini path's.
    fn model(&self, req: &Request) -> Option<String> {
        match self {
            Api::Gemini(call) => Some(call.model.clone()),
            _ => {
                serde_json::from_slice::<serde_json::Value>(&req.body).ok()?.get("model")?.as_str().map(str::to_string)
            }
        }
    }

    fn method_not_allowed(&self, req: &Request, path: &str) -> Plan {
        let msg = format!("Method {} is not allowed for {path}: use POST.", req.method);
        match self {
            Api::OpenAi(_) | Api::Responses => openai::method_not_allowed(req, path),
            Api::Anthropic => anthropic::error_plan(405, "invalid_request_error", &msg),
            Api::Gemini(_) => gemini::error_plan(405, "INVALID_ARGUMENT", &msg),
        }
    }
}

/// The response to `req`.
pub fn plan(req: &Request) -> Plan {
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let Some(api) = Api::of(path, query) else { return openai::other(req, path) };
    if req.method != "POST" {
        return api.method_not_allowed(req, path);
    }
    let knobs = match Knobs::from(req) {
        Ok(k) => k,
        Err(msg) => return api.invalid(&msg),
    };
    if knobs.pad_bytes.is_some() && !matches!(api, Api::OpenAi(openai::Endpoint::Chat | openai::Endpoint::Completions))
    {
        return api.invalid("mock-llm: header x-mock-pad-bytes: only for chat and completions");
    }
    // Scripted failures first: they answer whatever the scenario, streaming or not.
    let model = if knobs.fail_models.is_empty() { None } else { api.model(req) };
    let mut plan = match (fail::status(&knobs, model.as_deref()), &api) {
        (Some((status, cause)), _) => api.failure(status, cause, model.as_deref(), &knobs),
        // Hostile-input tests: answer with exactly the bytes sent, as `x-mock-content-type`.
        _ if req.header("x-mock-echo").is_some() => echo(req),
        (None, Api::OpenAi(endpoint)) => openai::answer(*endpoint, req, &knobs),
        (None, Api::Responses) => responses::answer(req, &knobs),
        (None, Api::Anthropic) => anthropic::answer(req, &knobs),
        (None, Api::Gemini(call)) => gemini::answer(call, req, &knobs),
    };
    shape::finish(&mut plan, api.family(), &knobs);
    plan
}

/// `x-mock-echo`: the request body as the response body, with the status from `x-mock-echo`
/// (200–599; anything else is 200) and the content type from `x-mock-content-type`
/// (default `application/json`).
fn echo(req: &Request) -> Plan {
    let status = req
        .header("x-mock-echo")
        .and_then(|s| s.trim().parse().ok())
        .filter(|s| (200..=599).contains(s))
        .unwrap_or(200);
    let content_type = req.header("x-mock-content-type").unwrap_or("application/json").to_string();
    Plan {
        status,
        headers: vec![("content-type".into(), content_type)],
        delay: std::time::Duration::ZERO,
        framing: crate::http::Framing::Length,
        pieces: vec![req.body.clone()],
        gap: std::time::Duration::ZERO,
        reset_before: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Endpoint;

    #[test]
    fn echo_answers_with_the_request_body() {
        let req = Request {
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            headers: vec![
                ("x-mock-echo".into(), "1".into()),
                ("x-mock-content-type".into(), "text/event-stream".into()),
            ],
            body: b"data: {\"usage\":\x00\xff}\r\r".to_vec(),
            keep_alive: true,
        };
        let p = plan(&req);
        assert_eq!((p.status, p.body()), (200, req.body.clone()));
        assert!(p.headers.contains(&("content-type".into(), "text/event-stream".into())));
    }

    #[test]
    fn routing_by_suffix() {
        assert_eq!(Api::of("/v1/messages", ""), Some(Api::Anthropic));
        assert_eq!(Api::of("/anthropic/v1/messages", ""), Some(Api::Anthropic));
        assert_eq!(Api::of("/v1/responses", ""), Some(Api::Responses));
        assert_eq!(Api::of("/openai/v1/chat/completions", ""), Some(Api::OpenAi(Endpoint::Chat)));
        assert_eq!(Api::of("/v1/completions", ""), Some(Api::OpenAi(Endpoint::Completions)));
        assert_eq!(Api::of("/v1/embeddings", ""), Some(Api::OpenAi(Endpoint::Embeddings)));
        assert!(matches!(Api::of("/v1beta/models/g:generateContent", ""), Some(Api::Gemini(_))));
        assert_eq!(Api::of("/v1/models", ""), None);
        assert_eq!(Api::of("/healthz", ""), None);
    }

    #[test]
    fn methods_and_bad_headers_answer_in_the_apis_shape() {
        let req = |method: &str, path: &str, headers: &[(&str, &str)]| Request {
            method: method.into(),
            path: path.into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: vec![],
            keep_alive: true,
        };
        let json = |p: &Plan| serde_json::from_slice::<serde_json::Value>(&p.body()).unwrap();
        let p = plan(&req("GET", "/v1/messages", &[]));
        assert_eq!((p.status, json(&p)["type"].as_str()), (405, Some("error")));
        let p = plan(&req("GET", "/v1beta/models/g:generateContent", &[]));
        assert_eq!((p.status, json(&p)["error"]["code"].as_u64()), (405, Some(405)));
        let p = plan(&req("POST", "/v1/messages", &[("x-mock-split", "0")]));
        assert_eq!(p.status, 400);
        assert_eq!(json(&p)["error"]["type"], "invalid_request_error");
        let p = plan(&req("POST", "/v1beta/models/g:generateContent", &[("x-mock-encoding", "zip")]));
        assert_eq!((p.status, json(&p)["error"]["status"].as_str()), (400, Some("INVALID_ARGUMENT")));
        let p = plan(&req("POST", "/v1/responses", &[("x-mock-ratelimit-style", "x")]));
        assert!(json(&p)["error"]["message"].as_str().unwrap().contains("x-mock-ratelimit-style"));
    }

    fn post(path: &str, headers: &[(&str, &str)], body: serde_json::Value) -> Plan {
        plan(&Request {
            method: "POST".into(),
            path: path.into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.to_string().into_bytes(),
            keep_alive: true,
        })
    }

    fn header<'a>(p: &'a Plan, name: &str) -> Option<&'a str> {
        p.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn json(p: &Plan) -> serde_json::Value {
        serde_json::from_slice(&p.body()).unwrap()
    }

    /// One request of each API for `model`, streaming or not: (path, body).
    fn requests(model: &str, stream: bool) -> Vec<(String, serde_json::Value)> {
        use serde_json::json;
        let messages = json!([{"role": "user", "content": "hi"}]);
        let gemini = if stream { ":streamGenerateContent?alt=sse" } else { ":generateContent" };
        vec![
            (
                "/v1/chat/completions".into(),
                json!({"model": model, "messages": messages, "stream": stream,
                       "stream_options": {"include_usage": true}}),
            ),
            ("/v1/completions".into(), json!({"model": model, "prompt": "hi", "stream": stream})),
            ("/v1/responses".into(), json!({"model": model, "input": "hi", "stream": stream})),
            ("/v1/messages".into(), json!({"model": model, "messages": messages, "max_tokens": 5, "stream": stream})),
            (format!("/v1beta/models/{model}{gemini}"), json!({"contents": [{"parts": [{"text": "hi"}]}]})),
        ]
    }

    #[test]
    fn fail_model_fails_only_the_named_models_in_the_apis_error_shape() {
        let fail = [("x-mock-fail-model", "gpt-4o=503,claude-x=429"), ("x-mock-retry-after", "2")];
        for stream in [false, true] {
            for (path, body) in requests("gpt-4o", stream) {
                let p = post(&path, &fail, body);
                assert_eq!((p.status, p.framing), (503, crate::http::Framing::Length), "{path}");
                assert_eq!(header(&p, "retry-after"), None, "retry-after only on a 429: {path}");
                assert!(header(&p, "x-ratelimit-limit-requests").is_none(), "no 2xx headers: {path}");
                let v = json(&p);
                let text = v.to_string();
                assert!(!text.contains("usage") && !text.contains("Usage"), "no usage: {path}: {text}");
                assert!(text.contains("scripted failure (x-mock-fail-model) for model \\\"gpt-4o\\\""), "{text}");
                if path.ends_with("/v1/messages") {
                    assert_eq!((v["type"].as_str(), v["error"]["type"].as_str()), (Some("error"), Some("api_error")));
                } else if path.contains("/models/") {
                    assert_eq!(
                        (v["error"]["code"].as_u64(), v["error"]["status"].as_str()),
                        (Some(503), Some("UNAVAILABLE"))
                    );
                } else {
                    assert_eq!(v["error"]["type"], "server_error", "{path}");
                }
            }
            for (path, body) in requests("claude-x", stream) {
                let p = post(&path, &fail, body);
                assert_eq!((p.status, header(&p, "retry-after")), (429, Some("2")), "{path}");
                let v = json(&p);
                if path.ends_with("/v1/messages") {
                    assert_eq!(v["error"]["type"], "rate_limit_error");
                } else if path.contains("/models/") {
                    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
                } else {
                    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
                }
            }
            // Any other model answers normally.
            for (path, body) in requests("gpt-4o-mini", stream) {
                assert_eq!(post(&path, &fail, body).status, 200, "{path}");
            }
        }
        // 429 without x-mock-retry-after: no retry-after.
        let (path, body) = requests("m", false).remove(0);
        let p = post(&path, &[("x-mock-fail-model", "m=429")], body);
        assert_eq!((p.status, header(&p, "retry-after")), (429, None));
        // Anthropic's 529 and a compressed failure.
        let (path, body) = requests("m", true).remove(3);
        let p = post(&path, &[("x-mock-fail-model", "m=529")], body);
        assert_eq!((p.status, json(&p)["error"]["type"].as_str()), (529, Some("overloaded_error")));
    }

    #[test]
    fn fail_times_fails_the_first_n_requests_of_a_key() {
        for stream in [false, true] {
            for (i, (path, body)) in requests("gpt-4o", stream).into_iter().enumerate() {
                let key = format!("route-test-{stream}-{i}");
                let headers = [
                    ("x-mock-fail-times", "2"),
                    ("x-mock-fail-key", key.as_str()),
                    ("x-mock-fail-status", "429"),
                    ("x-mock-retry-after", "1"),
                ];
                for _ in 0..2 {
                    let p = post(&path, &headers, body.clone());
                    assert_eq!((p.status, header(&p, "retry-after")), (429, Some("1")), "{path}");
                    assert!(!String::from_utf8(p.body()).unwrap().to_lowercase().contains("usage"), "no usage: {path}");
                }
                for _ in 0..2 {
                    let p = post(&path, &headers, body.clone());
                    assert_eq!((p.status, header(&p, "retry-after")), (200, None), "{path}");
                }
            }
        }
        // Default 503, no retry-after on it; another key counts on its own.
        let (path, body) = requests("m", false).remove(0);
        let key = |k: &'static str| [("x-mock-fail-times", "1"), ("x-mock-fail-key", k), ("x-mock-retry-after", "5")];
        let p = post(&path, &key("route-test-default"), body.clone());
        assert_eq!((p.status, header(&p, "retry-after")), (503, None));
        assert_eq!(json(&p)["error"]["message"], "mock-llm: scripted failure (x-mock-fail-times)");
        assert_eq!(post(&path, &key("route-test-other"), body.clone()).status, 503);
        assert_eq!(post(&path, &key("route-test-default"), body.clone()).status, 200);
        // 0 times: never fails. x-mock-fail-model first, and not counted against the key.
        let zero = [("x-mock-fail-times", "0"), ("x-mock-fail-key", "route-test-zero")];
        assert_eq!(post(&path, &zero, body.clone()).status, 200);
        let both = [("x-mock-fail-model", "m=500"), ("x-mock-fail-times", "1"), ("x-mock-fail-key", "route-test-both")];
        assert_eq!(post(&path, &both, body.clone()).status, 500);
        assert_eq!(post(&path, &both, body.clone()).status, 500);
        let (path2, body2) = requests("n", false).remove(0);
        assert_eq!(post(&path2, &both, body2.clone()).status, 503, "the key's first request");
        assert_eq!(post(&path2, &both, body2).status, 200);
    }

    #[test]
    fn answers_report_the_model_they_received() {
        for stream in [false, true] {
            for (path, body) in requests("some-model-7", stream) {
                let p = post(&path, &[], body);
                assert_eq!(p.status, 200, "{path}");
                let text = String::from_utf8(p.body()).unwrap();
                let field = if path.contains("/models/") {
                    "\"modelVersion\":\"some-model-7\""
                } else {
                    "\"model\":\"some-model-7\""
                };
                assert!(text.contains(field), "{path}: {text}");
                assert!(!text.contains("\"model\":\"gpt") && !text.contains("\"modelVersion\":\"gemini"), "{path}");
            }
        }
        let p = post("/v1/embeddings", &[], serde_json::json!({"model": "emb-9", "input": "x"}));
        assert_eq!(json(&p)["model"], "emb-9");
    }
}
