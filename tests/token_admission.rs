//! How many tokens a tokens-per-minute rule admits under a burst, through the real Envoy
//! (`--concurrency 2`) running the filter in front of the mock gateway.
//!
//! The scenario of the issue: 64 concurrent clients (4 API keys × 16 clients), a
//! `tokens_per_minute` rule per key, non-streaming chat completions without `max_tokens`,
//! every response the same size. A client that gets a 429 sleeps for its `Retry-After`, as the
//! provider SDKs do, then tries again, so each window starts with the whole burst at once. Every
//! 200 is attributed to the epoch-aligned minute window its request was sent in (the window the
//! test starts in, W0, possibly partial, then W1 and W2; the clients stop at the end of W2).
//!
//! What it proves, for every key:
//! - no window admits more than the limit + 10 %: a request whose output size nobody declared
//!   must still count against the limit when it is admitted, not only once it has answered;
//! - the three windows together admit the limit three times over, within 2 %: what a window
//!   admits beyond its limit is carried into the next as debt, so the sum is 3 × limit plus the
//!   debt the last window leaves; and a reservation so large that it turns clients away while
//!   tokens are left (they sleep out the window) falls short of it.
//!
//! The tokens counted are `usage.total_tokens` of the responses (what a rule with the default
//! `token_type: total` charges). `LLM_METER_TEST_WASM` (a path, relative to the crate root) runs
//! the test against another build of the filter; the table of what was admitted is printed to
//! stderr (`-- --nocapture`). It takes two to three minutes: the rest of the current minute (at
//! least 10 s), then two more.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, render_config_with_wasm, root, send, Envoy, Mock};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CHAT: &str = "/v1/chat/completions";
/// The rule's limit, per key.
const LIMIT: u64 = 5000;
const KEYS: usize = 4;
const CLIENTS_PER_KEY: usize = 16;
/// Output tokens of every response (scripted with `x-mock-completion-tokens`).
const COMPLETION_TOKENS: u64 = 150;
/// How long the mock takes to answer, standing in for generation time: a client's request is
/// in flight for at least this long.
const LATENCY_MS: u64 = 200;
const WINDOW_MS: u64 = 60_000;
/// W0, W1, W2.
const WINDOWS: usize = 3;
/// The test waits for the next window when fewer seconds than this are left in the current one.
const MIN_FIRST_WINDOW_S: u64 = 10;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

/// `HH:MM:SS` UTC of a Unix time in milliseconds.
fn utc(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The filter under test: `LLM_METER_TEST_WASM`, or the release build.
fn filter_wasm() -> PathBuf {
    let wasm = match std::env::var_os("LLM_METER_TEST_WASM") {
        Some(path) => root().join(path),
        None => root().join("target/wasm32-wasip1/release/llm_meter.wasm"),
    };
    assert!(wasm.exists(), "{} is missing (LLM_METER_TEST_WASM, or `just build`)", wasm.display());
    wasm
}

/// A chat request without `max_tokens`, and its prompt tokens: its size in bytes / 4, the
/// filter's default estimate, so the estimate of the input is exact and only the output is
/// unknown when the request is admitted.
fn chat() -> (String, u64) {
    let body = serde_json::json!({"model": "gpt-4o", "messages": [
        {"role": "user", "content": "Summarise these notes in three bullet points."}]})
    .to_string();
    let prompt = (body.len() as u64).div_ceil(4);
    (body, prompt)
}

/// One admitted request: when it was sent, and the tokens its response reported.
struct Admitted {
    sent_ms: u64,
    tokens: u64,
}

/// What one client saw.
#[derive(Default)]
struct ClientLog {
    admitted: Vec<Admitted>,
    rejected: u64,
}

/// One client: sends `body` with `key` until `end_ms`; on a 429 sleeps for its `Retry-After`.
fn run_client(url: &str, key: &str, body: &str, prompt: u64, start: &Barrier, end_ms: u64) -> ClientLog {
    // One keep-alive connection per client; the kernel spreads them over the two workers.
    let agent = client();
    let (prompt, completion, latency) = (prompt.to_string(), COMPLETION_TOKENS.to_string(), LATENCY_MS.to_string());
    let headers = [
        ("x-api-key", key),
        ("x-mock-prompt-tokens", prompt.as_str()),
        ("x-mock-completion-tokens", completion.as_str()),
        ("x-mock-delay-ms", latency.as_str()),
    ];
    let mut log = ClientLog::default();
    start.wait();
    loop {
        let sent_ms = now_ms();
        if sent_ms >= end_ms {
            return log;
        }
        let r = send(&agent, url, &headers, body);
        match r.status {
            200 => {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
                let tokens = v["usage"]["total_tokens"].as_u64().unwrap_or_else(|| panic!("no usage: {}", r.body));
                log.admitted.push(Admitted { sent_ms, tokens });
            }
            429 => {
                log.rejected += 1;
                let wait_ms = (r.header_u64("retry-after") * 1000).min(end_ms.saturating_sub(now_ms()));
                std::thread::sleep(Duration::from_millis(wait_ms));
            }
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
}

#[test]
fn a_burst_is_admitted_within_the_tokens_per_minute_limit_and_debt_evens_out_over_three_windows() {
    let mock = Mock::start();
    let config = format!(r#"{{"limits":[{{"name":"key-tpm","key":"header:x-api-key","tokens_per_minute":{LIMIT}}}]}}"#);
    let wasm = filter_wasm();
    let envoy = Envoy::try_start_yaml(&render_config_with_wasm(mock.port, &config, &wasm))
        .unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"));
    let (body, prompt) = chat();

    // W0 is the window the clients start in; it needs room for the first burst.
    let left_ms = WINDOW_MS - now_ms() % WINDOW_MS;
    if left_ms < MIN_FIRST_WINDOW_S * 1000 {
        std::thread::sleep(Duration::from_millis(left_ms + 50));
    }
    let started_ms = now_ms();
    let w0 = started_ms / WINDOW_MS;
    let end_ms = (w0 + WINDOWS as u64) * WINDOW_MS;

    let start = Arc::new(Barrier::new(KEYS * CLIENTS_PER_KEY));
    let url = envoy.url(CHAT);
    let clients: Vec<_> = (0..KEYS)
        .flat_map(|k| (0..CLIENTS_PER_KEY).map(move |_| k))
        .map(|k| {
            let (url, body, start) = (url.clone(), body.clone(), start.clone());
            std::thread::spawn(move || (k, run_client(&url, &format!("sk-burst-{k}"), &body, prompt, &start, end_ms)))
        })
        .collect();

    // Per key and window: requests and tokens admitted; per key: 429s.
    let mut admitted = [[(0u64, 0u64); WINDOWS]; KEYS];
    let mut rejected = [0u64; KEYS];
    for c in clients {
        let (k, log) = c.join().expect("a client panicked");
        rejected[k] += log.rejected;
        for a in log.admitted {
            let w = (a.sent_ms / WINDOW_MS - w0) as usize;
            let cell = &mut admitted[k][w];
            cell.0 += 1;
            cell.1 += a.tokens;
        }
    }
    let elapsed_s = (now_ms() - started_ms) as f64 / 1000.0;

    eprintln!(
        "\ntoken admission: {} ({} bytes)\n  tokens_per_minute {LIMIT} per key, {KEYS} keys x {CLIENTS_PER_KEY} \
         clients, 2 workers; every response {} tokens ({prompt} in + {COMPLETION_TOKENS} out) after {LATENCY_MS} ms\n  \
         W0 = {} UTC, started {:.1} s before its end; {elapsed_s:.1} s in all",
        wasm.display(),
        std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0),
        prompt + COMPLETION_TOKENS,
        utc(w0 * WINDOW_MS),
        (w0 * WINDOW_MS + WINDOW_MS - started_ms) as f64 / 1000.0,
    );
    eprintln!(
        "  {:<12}{:>16}{:>16}{:>16}{:>10}{:>9}{:>12}{:>8}",
        "key", "W0 req/tokens", "W1 req/tokens", "W2 req/tokens", "max/limit", "sum", "sum/3limit", "429s"
    );
    let three = 3 * LIMIT;
    let mut failures = Vec::new();
    for (k, windows) in admitted.iter().enumerate() {
        let max = windows.iter().map(|w| w.1).max().unwrap_or(0);
        let sum: u64 = windows.iter().map(|w| w.1).sum();
        let cells: Vec<String> = windows.iter().map(|(n, t)| format!("{n}/{t}")).collect();
        eprintln!(
            "  {:<12}{:>16}{:>16}{:>16}{:>9.1}%{:>9}{:>11.1}%{:>8}",
            format!("sk-burst-{k}"),
            cells[0],
            cells[1],
            cells[2],
            max as f64 * 100.0 / LIMIT as f64,
            sum,
            sum as f64 * 100.0 / three as f64,
            rejected[k]
        );
        if max * 100 > LIMIT * 110 {
            failures.push(format!("sk-burst-{k}: a window admitted {max} tokens, above {LIMIT} + 10 %"));
        }
        if sum.abs_diff(three) * 100 > three * 2 {
            failures.push(format!("sk-burst-{k}: three windows admitted {sum} tokens, not within 2 % of {three}"));
        }
    }
    eprintln!();

    // The burst went through both workers (each has its own VM; the buckets are shared).
    let workers = envoy.accepted_by_worker();
    assert!(workers.values().filter(|&&n| n > 0).count() >= 2, "not spread over both workers: {workers:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
