//! The last steps every POST answer goes through, whatever the API: rate-limit headers on 2xx,
//! compression, splitting into pieces, the mid-stream reset and the initial delay; and the
//! `x-usage-*` headers of `x-mock-usage-in-headers`.

use crate::encoding;
use crate::http::{Framing, Plan};
use crate::knobs::{Knobs, RateLimitStyle, Scenario};
use crate::text;

/// Whose rate-limit headers an API sends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Family {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
    OpenAi,
    /// `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`.
    Anthropic,
    /// None (Gemini sends no rate-limit headers); only the generic style adds some.
    Gemini,
}

impl Family {
    /// Default request and token limits.
    fn limits(self) -> (u64, u64) {
        match self {
            Family::OpenAi => (5000, 2_000_000),
            Family::Anthropic => (1000, 100_000),
            Family::Gemini => (1000, 1_000_000),
        }
    }
}

/// Rate-limit headers for a 2xx answer. Unless overridden, remaining requests are the limit − 1
/// and remaining tokens the limit − 1000.
pub fn rate_limit_headers(family: Family, knobs: &Knobs) -> Vec<(String, String)> {
    let rl = &knobs.rate_limit;
    let (default_requests, default_tokens) = family.limits();
    let limit_requests = rl.limit_requests.unwrap_or(default_requests);
    let limit_tokens = rl.limit_tokens.unwrap_or(default_tokens);
    let remaining_requests = rl.remaining_requests.unwrap_or(limit_requests.saturating_sub(1));
    let remaining_tokens = rl.remaining_tokens.unwrap_or(limit_tokens.saturating_sub(1000));
    let h = |k: &str, v: String| (k.to_string(), v);
    match (rl.style, family) {
        (RateLimitStyle::None, _) | (RateLimitStyle::Provider, Family::Gemini) => vec![],
        (RateLimitStyle::Generic, _) => vec![
            h("x-ratelimit-limit", limit_requests.to_string()),
            h("x-ratelimit-remaining", remaining_requests.to_string()),
        ],
        (RateLimitStyle::Provider, Family::OpenAi) => vec![
            h("x-ratelimit-limit-requests", limit_requests.to_string()),
            h("x-ratelimit-limit-tokens", limit_tokens.to_string()),
            h("x-ratelimit-remaining-requests", remaining_requests.to_string()),
            h("x-ratelimit-remaining-tokens", remaining_tokens.to_string()),
            h("x-ratelimit-reset-requests", "12ms".into()),
            h("x-ratelimit-reset-tokens", "30ms".into()),
        ],
        (RateLimitStyle::Provider, Family::Anthropic) => {
            let reset = text::rfc3339(text::now() + 1);
            vec![
                h("anthropic-ratelimit-requests-limit", limit_requests.to_string()),
                h("anthropic-ratelimit-requests-remaining", remaining_requests.to_string()),
                h("anthropic-ratelimit-requests-reset", reset.clone()),
                h("anthropic-ratelimit-tokens-limit", limit_tokens.to_string()),
                h("anthropic-ratelimit-tokens-remaining", remaining_tokens.to_string()),
                h("anthropic-ratelimit-tokens-reset", reset),
            ]
        }
    }
}

/// Usage as `x-mock-usage-in-headers` reports it.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeaderUsage {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
    pub reasoning: u64,
    pub cache_creation: u64,
}

/// With `x-mock-usage-in-headers`, adds `x-usage-input-tokens` and `x-usage-output-tokens`, and
/// `x-usage-cached-tokens`, `x-usage-reasoning-tokens`, `x-usage-cache-creation-tokens` when
/// they are not 0.
pub fn usage_headers(plan: &mut Plan, knobs: &Knobs, u: HeaderUsage) {
    if !knobs.usage_in_headers {
        return;
    }
    for (name, value, always) in [
        ("x-usage-input-tokens", u.input, true),
        ("x-usage-output-tokens", u.output, true),
        ("x-usage-cached-tokens", u.cached, false),
        ("x-usage-reasoning-tokens", u.reasoning, false),
        ("x-usage-cache-creation-tokens", u.cache_creation, false),
    ] {
        if always || value > 0 {
            plan.headers.push((name.into(), value.to_string()));
        }
    }
}

/// Applies the knobs every answer shares, in this order: rate-limit headers (2xx only),
/// compression, splitting (of the compressed bytes), the mid-stream reset (2xx only), the delay.
/// A plan that carries `content-encoding` already (a cached `x-mock-pad-bytes` body, compressed
/// once) is not compressed again.
pub fn finish(plan: &mut Plan, family: Family, knobs: &Knobs) {
    let ok = (200..300).contains(&plan.status);
    if ok {
        plan.headers.extend(rate_limit_headers(family, knobs));
    }
    let encoded = plan.headers.iter().any(|(k, _)| k == "content-encoding");
    if let Some(e) = knobs.encoding.filter(|_| !encoded) {
        plan.pieces = match plan.framing {
            Framing::Length => vec![encoding::compress(e, &plan.body(), knobs.lgwin())],
            Framing::Chunked => encoding::compress_stream(e, &plan.pieces, knobs.lgwin()),
        };
        plan.headers.push(("content-encoding".into(), e.header().into()));
    }
    if let Some(n) = knobs.split {
        plan.pieces = plan.body().chunks(n).map(<[u8]>::to_vec).collect();
        plan.gap = knobs.split_delay;
    }
    if ok && knobs.scenario == Scenario::ResetMidStream {
        if plan.pieces.len() < 2 {
            let body = plan.body();
            let (a, b) = body.split_at(body.len() / 2);
            plan.pieces = vec![a.to_vec(), b.to_vec()];
        }
        plan.reset_before = Some((plan.pieces.len() / 2).max(1));
    }
    plan.delay = knobs.delay;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::plan;
    use serde_json::{json, Value};
    use std::io::Read;

    fn post(path: &str, headers: &[(&str, &str)], body: Value) -> Plan {
        plan(&crate::http::Request {
            method: "POST".into(),
            path: path.into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.to_string().into_bytes(),
            keep_alive: true,
        })
    }

    fn chat(stream: bool) -> Value {
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
               "stream_options": {"include_usage": true}})
    }

    fn header<'a>(p: &'a Plan, name: &str) -> Option<&'a str> {
        p.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn openai_rate_limit_headers_on_every_2xx() {
        let embed = json!({"model": "m", "input": "x"});
        let legacy = json!({"model": "m", "prompt": "x"});
        for p in [
            post("/v1/chat/completions", &[], chat(false)),
            post("/v1/chat/completions", &[], chat(true)),
            post("/v1/completions", &[], legacy),
            post("/v1/embeddings", &[], embed),
        ] {
            assert_eq!(header(&p, "x-ratelimit-limit-requests"), Some("5000"));
            assert_eq!(header(&p, "x-ratelimit-remaining-requests"), Some("4999"));
            assert_eq!(header(&p, "x-ratelimit-limit-tokens"), Some("2000000"));
            assert_eq!(header(&p, "x-ratelimit-remaining-tokens"), Some("1999000"));
            assert_eq!(header(&p, "x-ratelimit-reset-requests"), Some("12ms"));
            assert_eq!(header(&p, "x-ratelimit-reset-tokens"), Some("30ms"));
            assert!(header(&p, "x-ratelimit-limit").is_none());
        }
        let p = post(
            "/v1/chat/completions",
            &[
                ("x-mock-ratelimit-limit-requests", "10"),
                ("x-mock-ratelimit-remaining-tokens", "0"),
                ("x-mock-ratelimit-limit-tokens", "500"),
            ],
            chat(false),
        );
        assert_eq!(header(&p, "x-ratelimit-limit-requests"), Some("10"));
        assert_eq!(header(&p, "x-ratelimit-remaining-requests"), Some("9"), "limit − 1 unless overridden");
        assert_eq!(header(&p, "x-ratelimit-limit-tokens"), Some("500"));
        assert_eq!(header(&p, "x-ratelimit-remaining-tokens"), Some("0"));

        let p = post(
            "/v1/chat/completions",
            &[("x-mock-ratelimit-style", "generic"), ("x-mock-ratelimit-remaining-requests", "4")],
            chat(false),
        );
        let rl: Vec<_> = p.headers.iter().filter(|(k, _)| k.contains("ratelimit")).collect();
        assert_eq!(rl.len(), 2, "{rl:?}");
        assert_eq!((header(&p, "x-ratelimit-limit"), header(&p, "x-ratelimit-remaining")), (Some("5000"), Some("4")));
        let p = post("/v1/chat/completions", &[("x-mock-ratelimit-style", "none")], chat(false));
        assert!(!p.headers.iter().any(|(k, _)| k.contains("ratelimit")));

        // Errors keep their own headers.
        let p = post("/v1/chat/completions", &[("x-mock-scenario", "rate_limit")], chat(false));
        assert_eq!(header(&p, "x-ratelimit-limit-requests"), Some("500"));
        let p = post("/v1/chat/completions", &[("x-mock-scenario", "server_error")], chat(false));
        assert!(!p.headers.iter().any(|(k, _)| k.contains("ratelimit")));
    }

    #[test]
    fn usage_in_headers_on_openai_endpoints() {
        let h = [
            ("x-mock-usage-in-headers", "1"),
            ("x-mock-prompt-tokens", "20"),
            ("x-mock-completion-tokens", "4"),
            ("x-mock-reasoning-tokens", "1"),
        ];
        for stream in [false, true] {
            let p = post("/v1/chat/completions", &h, chat(stream));
            assert_eq!(header(&p, "x-usage-input-tokens"), Some("20"));
            assert_eq!(header(&p, "x-usage-output-tokens"), Some("4"));
            assert_eq!(header(&p, "x-usage-reasoning-tokens"), Some("1"));
            assert_eq!(header(&p, "x-usage-cached-tokens"), None, "0 is left out");
            assert!(!String::from_utf8(p.body()).unwrap().contains("\"usage\":{"), "usage: null at most");
        }
        let p = post("/v1/embeddings", &h[..2], json!({"model": "m", "input": "x"}));
        assert_eq!((header(&p, "x-usage-input-tokens"), header(&p, "x-usage-output-tokens")), (Some("20"), Some("0")));
        assert!(!String::from_utf8(p.body()).unwrap().contains("usage"));
    }

    #[test]
    fn padded_bodies_are_compressed_once_with_the_window_asked_for() {
        let h = [
            ("x-mock-encoding", "br"),
            ("x-mock-brotli-lgwin", "24"),
            ("x-mock-pad-bytes", "1000000"),
            ("x-mock-prompt-tokens", "11"),
            ("x-mock-completion-tokens", "7"),
            ("x-mock-split", "16384"),
            ("x-mock-split-delay-ms", "3"),
        ];
        let p = post("/v1/chat/completions", &h, chat(false));
        assert_eq!(p.status, 200);
        let encodings: Vec<_> = p.headers.iter().filter(|(k, _)| k == "content-encoding").collect();
        assert_eq!(encodings, [&("content-encoding".to_string(), "br".to_string())], "compressed once");
        assert!(p.pieces.len() > 2 && p.pieces.iter().all(|piece| piece.len() <= 16384));
        assert_eq!(p.gap, std::time::Duration::from_millis(3));
        let wire = p.body();
        assert_eq!(wire[0] & 0x0f, 0b1111, "WBITS 24: 1, then 7 (17 + 7), RFC 7932 9.1");
        let mut out = Vec::new();
        brotli::Decompressor::new(&wire[..], 4096).read_to_end(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with(r#""usage":{"completion_tokens":7,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":11,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":18}}"#), "usage last: {}", &text[text.len() - 300..]);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap().len(), 1_000_000);
        assert!(wire.len() * 10 < text.len(), "compresses like text: {} of {}", wire.len(), text.len());

        // The same answer again: the same bytes (built once), id included.
        let again = post("/v1/chat/completions", &h, chat(false));
        assert_eq!(again.body(), wire);
        // Without compression, and for the legacy API, padded too.
        let plain = post("/v1/chat/completions", &[("x-mock-pad-bytes", "5000")], chat(false));
        let v: Value = serde_json::from_slice(&plain.body()).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap().len(), 5000);
        assert!(header(&plain, "content-encoding").is_none());
        let legacy = post("/v1/completions", &[("x-mock-pad-bytes", "3000")], json!({"model": "m", "prompt": "x"}));
        let v: Value = serde_json::from_slice(&legacy.body()).unwrap();
        assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 3000);

        // Not for streams nor other APIs.
        let p = post("/v1/chat/completions", &[("x-mock-pad-bytes", "5000")], chat(true));
        assert_eq!(p.status, 400);
        assert!(String::from_utf8(p.body()).unwrap().contains("x-mock-pad-bytes"));
        let p = post(
            "/v1/messages",
            &[("x-mock-pad-bytes", "5000")],
            json!({"model": "c", "max_tokens": 5, "messages": []}),
        );
        assert_eq!(p.status, 400);
    }

    #[test]
    fn brotli_window_applies_to_streams_too() {
        let p = post("/v1/chat/completions", &[("x-mock-encoding", "br"), ("x-mock-brotli-lgwin", "24")], chat(true));
        assert_eq!(p.pieces[0][0] & 0x0f, 0b1111, "WBITS 24");
        let mut out = Vec::new();
        brotli::Decompressor::new(&p.body()[..], 4096).read_to_end(&mut out).unwrap();
        assert!(out.ends_with(b"data: [DONE]\n\n"));
        let p = post("/v1/chat/completions", &[("x-mock-brotli-lgwin", "24")], chat(true));
        assert_eq!(p.status, 400);
    }

    #[test]
    fn compression_then_split_then_reset() {
        let p = post("/v1/chat/completions", &[("x-mock-encoding", "gzip")], chat(false));
        assert_eq!(header(&p, "content-encoding"), Some("gzip"));
        let v: Value = serde_json::from_slice(&gunzip(&p.body())).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 16);

        let plain = post("/v1/chat/completions", &[], chat(true));
        let p = post("/v1/chat/completions", &[("x-mock-encoding", "gzip")], chat(true));
        assert_eq!(p.pieces.len(), plain.pieces.len(), "one compressed piece per event");
        let text = String::from_utf8(gunzip(&p.body())).unwrap();
        assert_eq!(text.len(), plain.body().len());
        assert!(text.ends_with("data: [DONE]\n\n"));

        let p = post("/v1/chat/completions", &[("x-mock-encoding", "br"), ("x-mock-split", "5")], chat(true));
        assert!(p.pieces.iter().all(|piece| piece.len() <= 5));
        let mut out = Vec::new();
        brotli::Decompressor::new(&p.body()[..], 4096).read_to_end(&mut out).unwrap();
        assert!(out.ends_with(b"data: [DONE]\n\n"));

        let p = post(
            "/v1/chat/completions",
            &[("x-mock-encoding", "deflate"), ("x-mock-scenario", "reset_mid_stream")],
            chat(false),
        );
        assert_eq!((p.pieces.len(), p.reset_before), (2, Some(1)), "the compressed body, cut in half");

        // Errors are compressed too; a bad encoding is a 400 naming the header.
        let p = post(
            "/v1/chat/completions",
            &[("x-mock-encoding", "gzip"), ("x-mock-scenario", "rate_limit")],
            chat(false),
        );
        assert_eq!((p.status, header(&p, "content-encoding")), (429, Some("gzip")));
        assert!(String::from_utf8(gunzip(&p.body())).unwrap().contains("rate_limit_exceeded"));
        let p = post("/v1/chat/completions", &[("x-mock-encoding", "lzma")], chat(false));
        assert_eq!(p.status, 400);
        assert!(String::from_utf8(p.body()).unwrap().contains("x-mock-encoding"));
    }
}
