//! The hostile-input matrix (issue 7) through the real Envoy: every case is a response body the
//! mock gateway echoes byte for byte (`x-mock-echo`), so the same hostile bytes cross the filter
//! twice, once as the request and once as the response. For each case: the client gets exactly
//! the bytes the upstream sent, Envoy keeps running, nothing panics, the skip (if the input is
//! unmeterable) is counted, usage that is there is counted once, and `/stats/prometheus` still
//! parses with Prometheus' own parser (`promtool check metrics`).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, Envoy, Metrics, Mock};
use std::collections::BTreeMap;

const CHAT: &str = "/v1/chat/completions";
const JSON: &str = "application/json";
const SSE: &str = "text/event-stream";

/// One hostile input and what the meter must make of it.
struct Case {
    name: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    /// `(model label, input tokens, output tokens)` the case must add; `None`: no tokens at all.
    tokens: Option<(&'static str, u64, u64)>,
    /// The `llm_meter_skips_total` reasons it must add, one each.
    skips: &'static [&'static str],
}

fn usage(input: u64, output: u64) -> String {
    format!(r#""usage":{{"prompt_tokens":{input},"completion_tokens":{output},"total_tokens":{}}}"#, input + output)
}

fn json_case(
    name: &'static str,
    body: String,
    tokens: Option<(&'static str, u64, u64)>,
    skips: &'static [&'static str],
) -> Case {
    Case { name, content_type: JSON, body: body.into_bytes(), tokens, skips }
}

fn sse_case(
    name: &'static str,
    body: String,
    tokens: Option<(&'static str, u64, u64)>,
    skips: &'static [&'static str],
) -> Case {
    Case { name, content_type: SSE, body: body.into_bytes(), tokens, skips }
}

fn cases() -> Vec<Case> {
    let ok = |model: &str, content: &str, input: u64, output: u64| {
        format!(
            r#"{{"id":"c1","object":"chat.completion","model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}}}}],{}}}"#,
            usage(input, output)
        )
    };
    let chunk = |content: &str| {
        format!(
            r#"{{"object":"chat.completion.chunk","model":"gpt-4o","choices":[{{"index":0,"delta":{{"content":"{content}"}}}}]}}"#
        )
    };
    let final_chunk = |input: u64, output: u64| {
        format!(r#"{{"object":"chat.completion.chunk","model":"gpt-4o","choices":[],{}}}"#, usage(input, output))
    };
    let nested = 100_000;
    let mut cases = vec![
        json_case(
            "malformed JSON",
            r#"{"model":"gpt-4o","choices":[}]},"usage":{"prompt_tokens":3,"completion_tokens":}}"#.into(),
            None,
            &["body_malformed"],
        ),
        json_case(
            "truncated body",
            r#"{"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"hel"#.into(),
            None,
            &["body_malformed"],
        ),
        json_case("not JSON at all", "<html><body>502 Bad Gateway</body></html>".into(), None, &["body_malformed"]),
        json_case(
            "body larger than any buffer (32 MiB)",
            ok("gpt-4o", &"x".repeat(32 << 20), 7, 11),
            Some(("gpt-4o", 7, 11)),
            &[],
        ),
        Case {
            name: "invalid UTF-8 in content and model",
            content_type: JSON,
            body: [
                &br#"{"model":"gpt-4o-"#[..],
                b"\xff\xfe",
                br#"","choices":[{"message":{"content":"caf"#,
                b"\xe9\xc3\x28",
                br#""}}],"#,
                usage(2, 3).as_bytes(),
                b"}",
            ]
            .concat(),
            // Not a JSON string: no label from it (request and response each count one).
            tokens: Some(("unknown", 2, 3)),
            skips: &["model_invalid", "model_invalid"],
        },
        Case {
            name: "NUL bytes",
            content_type: JSON,
            body: [
                &br#"{"model":"gpt-4o","choices":[{"message":{"content":"a"#[..],
                b"\0\0b\0",
                br#""}}],"#,
                usage(4, 5).as_bytes(),
                b"}\0",
            ]
            .concat(),
            tokens: Some(("gpt-4o", 4, 5)),
            skips: &[],
        },
        json_case(
            "100k levels of nesting, then usage",
            format!(r#"{{"model":"gpt-4o","deep":{}{},{}}}"#, "[".repeat(nested), "]".repeat(nested), usage(6, 7)),
            Some(("gpt-4o", 6, 7)),
            &[],
        ),
        json_case(
            "100k levels of nesting, never closed",
            format!(r#"{{"model":"gpt-4o","deep":{}"#, r#"{"a":"#.repeat(nested)),
            None,
            &["body_malformed"],
        ),
        json_case(
            "count overflowing u64",
            format!(r#"{{"model":"gpt-4o","usage":{{"prompt_tokens":{},"completion_tokens":1}}}}"#, "9".repeat(30)),
            None,
            &["usage_invalid"],
        ),
        // Counts that fit u64 but no request uses (over usage::MAX_TOKENS, 10^9): nothing of
        // them reaches a counter, a histogram or a budget.
        json_case(
            "count of 2^53",
            r#"{"model":"gpt-4o","usage":{"prompt_tokens":9007199254740992,"completion_tokens":1}}"#.into(),
            None,
            &["usage_invalid"],
        ),
        json_case(
            "count of 2^63",
            r#"{"model":"gpt-4o","usage":{"prompt_tokens":9223372036854775808,"completion_tokens":1}}"#.into(),
            None,
            &["usage_invalid"],
        ),
        sse_case(
            "count of 2^64-1 in a stream",
            format!(
                "data: {}\n\ndata: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":18446744073709551615}}}}\n\ndata: [DONE]\n\n",
                chunk("a")
            ),
            None,
            &["usage_invalid"],
        ),
        json_case(
            "negative count",
            r#"{"model":"gpt-4o","usage":{"prompt_tokens":-5,"completion_tokens":1}}"#.into(),
            None,
            &["usage_invalid"],
        ),
        json_case(
            "float count",
            r#"{"model":"gpt-4o","usage":{"prompt_tokens":1.5,"completion_tokens":1}}"#.into(),
            None,
            &["usage_invalid"],
        ),
        json_case(
            "exponent count",
            r#"{"model":"gpt-4o","usage":{"prompt_tokens":1e3,"completion_tokens":1}}"#.into(),
            None,
            &["usage_invalid"],
        ),
        json_case(
            "duplicate usage keys: counted once",
            format!(r#"{{"model":"gpt-4o",{},"choices":[],{}}}"#, usage(100, 200), usage(8, 9)),
            Some(("gpt-4o", 8, 9)),
            &[],
        ),
        json_case(
            "fake usage inside a content string",
            ok("gpt-4o", r#"\"usage\":{\"prompt_tokens\":999999,\"completion_tokens\":999999}"#, 10, 11),
            Some(("gpt-4o", 10, 11)),
            &[],
        ),
        json_case(
            "usage that is not an object",
            r#"{"model":"gpt-4o","usage":"lots"}"#.into(),
            None,
            &["usage_invalid"],
        ),
        json_case(
            "usage larger than the capture bound",
            format!(
                r#"{{"model":"gpt-4o","usage":{{"prompt_tokens":1,"completion_tokens":1,"pad":"{}"}}}}"#,
                "p".repeat(40_000)
            ),
            None,
            &["usage_too_large"],
        ),
        sse_case(
            "SSE with CR-only line endings and comments",
            format!(
                ": keep-alive\r\rdata: {}\r\r: another comment\rdata: {}\r\rdata: [DONE]\r\r",
                chunk("hi"),
                final_chunk(12, 13)
            ),
            Some(("gpt-4o", 12, 13)),
            &[],
        ),
        sse_case(
            "SSE with a 4 MiB data line",
            format!("data: {}\n\ndata: {}\n\ndata: [DONE]\n\n", chunk(&"y".repeat(4 << 20)), final_chunk(14, 15)),
            Some(("gpt-4o", 14, 15)),
            &[],
        ),
        sse_case(
            "SSE with a 4 MiB comment line and a fake usage in a comment",
            format!(": {}\n: {}\ndata: {}\n\n", "z".repeat(4 << 20), final_chunk(900, 900), final_chunk(16, 17)),
            Some(("gpt-4o", 16, 17)),
            &[],
        ),
        sse_case(
            "SSE events whose data is not a JSON object",
            format!("data: {}\n\ndata: not json\n\ndata: 42\n\ndata: {}\n\ndata: [DONE]\n\n", chunk("a"), final_chunk(24, 25)),
            Some(("gpt-4o", 24, 25)),
            &["body_malformed", "body_malformed"],
        ),
        sse_case(
            "SSE whose usage chunk is malformed",
            format!("data: {}\n\ndata: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":\n\n", chunk("a")),
            None,
            &["body_malformed"],
        ),
        Case {
            name: "wrong content-type: JSON labelled as an event stream",
            content_type: SSE,
            body: ok("gpt-4o", "hi", 18, 19).into_bytes(),
            tokens: Some(("gpt-4o", 18, 19)),
            skips: &[],
        },
        Case {
            name: "wrong content-type: JSON labelled text/html",
            content_type: "text/html; charset=iso-8859-1",
            body: ok("gpt-4o", "hi", 20, 21).into_bytes(),
            tokens: Some(("gpt-4o", 20, 21)),
            skips: &[],
        },
        Case {
            name: "wrong content-type: an event stream labelled JSON",
            content_type: JSON,
            body: format!("data: {}\n\ndata: {}\n\n", chunk("a"), final_chunk(22, 23)).into_bytes(),
            tokens: Some(("gpt-4o", 22, 23)),
            skips: &[],
        },
    ];
    for (name, model, label) in [
        ("model with quotes and braces", r#"gpt\"4o{x=\"1\"}"#, "gpt_4o_x__1__"),
        ("model with newlines", r#"gpt-4o\n# TYPE evil counter\nevil 1"#, "gpt-4o___TYPE_evil_counter_evil_1"),
        ("model with the stat-name separators", "a;.;model=.=b;.;c", "a_._model_._b_._c"),
    ] {
        cases.push(json_case(name, ok(model, "hi", 1, 2), Some((label, 1, 2)), &[]));
    }
    cases.push(json_case(
        "model of 10 KiB",
        ok(&"m".repeat(10 << 10), "hi", 1, 2),
        Some(("unknown", 1, 2)),
        &["model_invalid", "model_invalid"],
    ));
    cases
}

/// Sends `body` through `x-mock-echo` and returns the status and the bytes the client got.
fn echo(envoy: &Envoy, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut resp = client()
        .post(envoy.url(CHAT))
        .header("content-type", JSON)
        .header("x-mock-echo", "200")
        .header("x-mock-content-type", content_type)
        .send(body)
        .expect("echo request");
    let bytes = resp.body_mut().with_config().limit(1 << 30).read_to_vec().expect("echo body");
    (resp.status().as_u16(), bytes)
}

/// `(reason → skips, model → (input, output))` of a scrape.
fn counts(m: &Metrics) -> (BTreeMap<String, f64>, BTreeMap<String, (f64, f64)>) {
    let mut skips = BTreeMap::new();
    let mut tokens: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (key, v) in &m.series {
        let label = |k: &str| {
            let start = key.find(&format!("{k}=\""))? + k.len() + 2;
            Some(key.get(start..)?.split('"').next()?.to_string())
        };
        if key.starts_with("llm_meter_skips_total{") {
            skips.insert(label("reason").unwrap_or_default(), *v);
        } else if key.starts_with("llm_tokens_total{") {
            let e = tokens.entry(label("model").unwrap_or_default()).or_default();
            match label("token_type").as_deref() {
                Some("input") => e.0 += v,
                Some("output") => e.1 += v,
                _ => {}
            }
        }
    }
    (skips, tokens)
}

fn delta<K: Ord + Clone, V: Copy + PartialEq + Default>(
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
    sub: impl Fn(V, V) -> V,
) -> BTreeMap<K, V> {
    after
        .iter()
        .map(|(k, &v)| (k.clone(), sub(v, before.get(k).copied().unwrap_or_default())))
        .filter(|(_, v)| *v != V::default())
        .collect()
}

#[test]
fn hostile_bodies_pass_through_unchanged_and_are_counted_skips() {
    // The parser check is not vacuous: a label value with a raw newline is rejected.
    assert!(common::promtool_check("llm_x{model=\"a\nb\"} 1\n").is_err());
    assert!(common::promtool_check("llm_x{model=\"a\"} 1\n").is_ok());
    let mock = Mock::start();
    let mut envoy = Envoy::start(mock.port, common::DEFAULT_CONFIG);
    let mut failures = Vec::new();
    for (i, case) in cases().into_iter().enumerate() {
        let before = envoy.metrics();
        let (status, got) = echo(&envoy, case.content_type, &case.body);
        assert!(envoy.is_running(), "Envoy exited on {:?}:\n{}", case.name, envoy.log());
        assert_eq!(status, 200, "{}", case.name);
        assert!(
            got == case.body,
            "{}: the client got {} bytes, the upstream sent {}",
            case.name,
            got.len(),
            case.body.len()
        );
        let after = envoy.wait_for(std::time::Duration::from_secs(10), "the request counted", |m| {
            m.sum("llm_requests_total", &[]) == (i + 1) as f64 && m.sum("llm_active_requests", &[]) == 0.0
        });
        let (skips0, tokens0) = counts(&before);
        let (skips1, tokens1) = counts(&after);
        let skips = delta(&skips0, &skips1, |a, b| a - b);
        let tokens = delta(&tokens0, &tokens1, |a: (f64, f64), b: (f64, f64)| (a.0 - b.0, a.1 - b.1));
        let mut want_skips = BTreeMap::new();
        for s in case.skips {
            *want_skips.entry(s.to_string()).or_insert(0.0) += 1.0;
        }
        let want_tokens: BTreeMap<String, (f64, f64)> =
            case.tokens.iter().map(|&(m, i, o)| (m.to_string(), (i as f64, o as f64))).collect();
        println!("{:<62} skips {skips:?} tokens {tokens:?}", case.name);
        if skips != want_skips || tokens != want_tokens {
            failures.push(format!(
                "{}: skips {skips:?} want {want_skips:?}; tokens {tokens:?} want {want_tokens:?}",
                case.name
            ));
        }
        if let Err(e) = common::promtool_check(&after.raw) {
            failures.push(format!("{}: /stats/prometheus no longer parses: {e}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The VM is alive: an ordinary request is still metered exactly.
    let ok =
        br#"{"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":30,"completion_tokens":40,"total_tokens":70}}"#;
    let before =
        envoy.settled().value(r#"llm_tokens_total{model="gpt-4o",app="unknown",token_type="output"}"#).unwrap_or(0.0);
    assert_eq!(echo(&envoy, JSON, ok).0, 200);
    envoy.wait_value(r#"llm_tokens_total{model="gpt-4o",app="unknown",token_type="output"}"#, before + 40.0);
    let log = envoy.log();
    for bad in ["panicked", "RuntimeError", "Uncaught", "VM failed", "critical"] {
        assert!(!log.contains(bad), "{bad:?} in Envoy's log:\n{log}");
    }
    assert_eq!(envoy.settled().sum("llm_meter_errors_total", &[]), 0.0, "internal errors");
}
