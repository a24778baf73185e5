//! Soak (issue 7): mixed traffic at a high rate through the real Envoy with metering and rate
//! limits on, for `LLM_METER_SOAK_SECS` seconds (30 by default, as in `just test`; `just soak`
//! runs 600). Streaming and not, five APIs' shapes, injected include_usage, compressed bodies,
//! and failures (upstream 500 and 429, resets mid-stream, bad requests). Asserts that every
//! counter equals exactly what was sent and that Envoy's memory stays flat after warm-up:
//! heap (`/memory` `allocated`) and process RSS (which holds the Wasm VMs' memory) each grow
//! by less than [`HEAP_BOUND`] / [`RSS_BOUND`] from the end of warm-up to the end of the run.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{Envoy, Mock};
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest growth of Envoy's heap allowed after warm-up.
const HEAP_BOUND: u64 = 8 << 20;
/// Largest growth of Envoy's resident set allowed after warm-up.
const RSS_BOUND: u64 = 16 << 20;
const THREADS: usize = 16;

const CONFIG: &str = r#"{
  "metrics": {"app_header": "x-app-id"},
  "pricing": {"gpt-4o": {"input": 2.5, "output": 10}},
  "limits": [
    {"name": "key-rpm", "key": "header:authorization", "requests_per_minute": 1000000000},
    {"name": "key-tpm", "key": "header:authorization", "tokens_per_minute": 1000000000000}
  ]
}"#;

/// What was sent: requests by (operation, status, error_type), tokens by type.
#[derive(Default)]
struct Sent {
    requests: BTreeMap<(&'static str, u16, &'static str), u64>,
    input: u64,
    output: u64,
    /// Time spent per kind of request (for the report).
    time: [Duration; 10],
    count: [u64; 10],
}

/// What the meter must record for a request: operation, status, error_type, input and output
/// tokens.
type Expect = (&'static str, u16, &'static str, u64, u64);

/// One request of `kind` (0–9); adds what the meter must record for it to `sent`.
fn one(agent: &ureq::Agent, base: &str, kind: u64, thread: usize, sent: &mut Sent) {
    let i = kind;
    let chat = |stream: bool, include: bool| {
        let mut v =
            serde_json::json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
        if include {
            v["stream_options"] = serde_json::json!({"include_usage": true});
        }
        v.to_string()
    };
    let (path, body, headers, expect): (&str, String, Vec<(&str, &str)>, Expect) =
        match kind {
            0 => ("/v1/chat/completions", chat(false, false), vec![("x-mock-prompt-tokens", "10"), ("x-mock-completion-tokens", "20")], ("chat", 200, "none", 10, 20)),
            1 => ("/v1/chat/completions", chat(true, true), vec![("x-mock-prompt-tokens", "5"), ("x-mock-completion-tokens", "7")], ("chat", 200, "none", 5, 7)),
            // No include_usage: the filter asks for it and cuts it from the client's stream.
            2 => ("/v1/chat/completions", chat(true, false), vec![("x-mock-prompt-tokens", "3"), ("x-mock-completion-tokens", "4")], ("chat", 200, "none", 3, 4)),
            3 => ("/v1/embeddings", r#"{"model":"text-embedding-3-small","input":"hi"}"#.into(), vec![("x-mock-prompt-tokens", "8")], ("embeddings", 200, "none", 8, 0)),
            4 => (
                "/v1/messages",
                r#"{"model":"claude-sonnet-4-5","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#.into(),
                vec![("x-mock-prompt-tokens", "6"), ("x-mock-completion-tokens", "9")],
                ("messages", 200, "none", 6, 9),
            ),
            5 => ("/v1/chat/completions", chat(false, false), vec![("x-mock-scenario", "server_error")], ("chat", 500, "server_error", 0, 0)),
            6 => ("/v1/chat/completions", chat(false, false), vec![("x-mock-scenario", "rate_limit")], ("chat", 429, "upstream_rate_limit", 0, 0)),
            7 => ("/v1/chat/completions", chat(true, true), vec![("x-mock-scenario", "reset_mid_stream")], ("chat", 200, "network", 0, 0)),
            8 => ("/v1/chat/completions", chat(false, false), vec![("x-mock-encoding", "gzip"), ("x-mock-prompt-tokens", "2"), ("x-mock-completion-tokens", "2")], ("chat", 200, "none", 2, 2)),
            _ => ("/v1/chat/completions", chat(false, false), vec![("x-mock-split", "0")], ("chat", 400, "client_error", 0, 0)),
        };
    let key = format!("Bearer key-{thread}");
    let mut req = agent
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .header("authorization", &key)
        .header("x-app-id", "soak");
    for (k, v) in &headers {
        req = req.header(*k, *v);
    }
    let t0 = Instant::now();
    match req.send(&body) {
        Ok(mut resp) => {
            assert_eq!(resp.status().as_u16(), expect.1, "kind {i}");
            let mut bytes = Vec::new();
            let read = resp.body_mut().as_reader().read_to_end(&mut bytes);
            if expect.2 == "none" {
                read.unwrap_or_else(|e| panic!("kind {i}: {e}"));
            }
            if i == 2 {
                let text = String::from_utf8_lossy(&bytes);
                assert!(text.contains("[DONE]") && !text.contains("\"usage\":{"), "{text}");
            }
        }
        // A reset mid-stream may also surface as an error before the body.
        Err(e) => assert_eq!(expect.2, "network", "kind {i}: {e}"),
    }
    sent.time[i as usize] += t0.elapsed();
    sent.count[i as usize] += 1;
    *sent.requests.entry((expect.0, expect.1, expect.2)).or_default() += 1;
    sent.input += expect.3;
    sent.output += expect.4;
}

#[test]
fn soak_counts_exactly_and_memory_stays_flat() {
    let secs: u64 = std::env::var("LLM_METER_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let warmup = Duration::from_secs((secs / 5).max(10));
    let mock = Mock::start();
    let mut envoy = Envoy::start(mock.port, CONFIG);
    let stop = Arc::new(AtomicBool::new(false));
    let base = envoy.url("");
    let start = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, base) = (stop.clone(), base.clone());
            std::thread::spawn(move || {
                let agent = common::client();
                let mut sent = Sent::default();
                // Thread 0 only resets streams mid-way (Envoy closes the client connection after
                // a short delay, so each takes about a second); the others cycle the rest.
                const MIX: [u64; 9] = [0, 1, 2, 3, 4, 5, 6, 8, 9];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let kind = if t == 0 { 7 } else { MIX[i % MIX.len()] };
                    one(&agent, &base, kind, t, &mut sent);
                    i += 1;
                }
                sent
            })
        })
        .collect();

    // Memory every 2 s; the baseline is the sample at the end of warm-up.
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(2));
        assert!(envoy.is_running(), "Envoy exited:\n{}", envoy.log());
        samples.push((start.elapsed(), envoy.memory()));
    }
    stop.store(true, Ordering::Relaxed);
    let mut sent = Sent::default();
    for w in workers {
        let s = w.join().unwrap();
        for (k, v) in s.requests {
            *sent.requests.entry(k).or_default() += v;
        }
        sent.input += s.input;
        sent.output += s.output;
        for k in 0..10 {
            sent.time[k] += s.time[k];
            sent.count[k] += s.count[k];
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let total: u64 = sent.requests.values().sum();

    let m = common::eventually(Duration::from_secs(20), "every request counted", || {
        let m = envoy.metrics();
        (m.sum("llm_requests_total", &[]) == total as f64).then_some(m)
    });
    let mib = |b: u64| b as f64 / 1048576.0;
    let base = samples.iter().find(|(t, _)| *t >= warmup).map(|s| s.1).expect("a sample after warm-up");
    let last = samples.last().expect("samples").1;
    let after: Vec<_> = samples.iter().filter(|(t, _)| *t >= warmup).collect();
    let peak = (after.iter().map(|s| s.1 .0).max().unwrap_or(0), after.iter().map(|s| s.1 .1).max().unwrap_or(0));
    println!(
        "soak {secs} s: {total} requests ({:.0}/s), {} input + {} output tokens; heap MiB at warm-up {:.1}, peak {:.1}, end {:.1}; RSS MiB at warm-up {:.1}, peak {:.1}, end {:.1}",
        total as f64 / elapsed,
        sent.input,
        sent.output,
        mib(base.0),
        mib(peak.0),
        mib(last.0),
        mib(base.1),
        mib(peak.1),
        mib(last.1)
    );
    let per_kind: Vec<String> = sent
        .time
        .iter()
        .zip(sent.count)
        .map(|(t, n)| format!("{:.1}", t.as_secs_f64() * 1000.0 / n.max(1) as f64))
        .collect();
    println!("mean ms per request by kind: {}", per_kind.join(" "));
    for ((op, status, error), n) in &sent.requests {
        let got =
            m.sum("llm_requests_total", &[("operation", op), ("status", &status.to_string()), ("error_type", error)]);
        assert_eq!(got, *n as f64, "{op} {status} {error}");
    }
    assert_eq!(m.sum("llm_tokens_total", &[("token_type", "input")]), sent.input as f64);
    assert_eq!(m.sum("llm_tokens_total", &[("token_type", "output")]), sent.output as f64);
    assert_eq!(m.sum("llm_active_requests", &[]), 0.0);
    assert_eq!(m.sum("llm_meter_errors_total", &[]), 0.0);
    assert_eq!(m.sum("llm_meter_skips_total", &[]), 0.0);
    assert_eq!(m.sum("llm_ratelimit_rejected_total", &[]), 0.0);
    common::promtool_check(&m.raw).unwrap();
    let log = envoy.log();
    assert!(!log.contains("panicked") && !log.contains("RuntimeError"), "{log}");
    // Flat: the peak after warm-up stays within the bound of the warm-up level.
    assert!(peak.0 < base.0 + HEAP_BOUND, "Envoy's heap grew {:.1} MiB after warm-up", mib(peak.0 - base.0));
    assert!(peak.1 < base.1 + RSS_BOUND, "Envoy's RSS grew {:.1} MiB after warm-up", mib(peak.1 - base.1));
}
