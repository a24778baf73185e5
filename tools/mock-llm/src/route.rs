//! Which API a request is for (by path suffix, so gateways can mount the APIs under prefixes),
//! and the order every POST answer is built in: method check, `x-mock-*` headers (a 400 in the
//! API's own error shape when one is bad), the API's answer, then [`shape::finish`].

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
    let mut plan = match &api {
        // Hostile-input tests: answer with exactly the bytes sent, as `x-mock-content-type`.
        _ if req.header("x-mock-echo").is_some() => echo(req),
        Api::OpenAi(endpoint) => openai::answer(*endpoint, req, &knobs),
        Api::Responses => responses::answer(req, &knobs),
        Api::Anthropic => anthropic::answer(req, &knobs),
        Api::Gemini(call) => gemini::answer(call, req, &knobs),
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
}
