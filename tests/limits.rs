//! Rate limits and budgets through the real Envoy (2 workers) running the release filter in
//! front of the mock gateway.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, render_config, send, Envoy, Mock, Reply};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CHAT: &str = "/v1/chat/completions";

fn chat(model: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]}).to_string()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Windows are aligned to the epoch: if fewer than `need` seconds are left in the current
/// `window`-second window, waits for the next one, so a test's requests share one window.
fn room_in_window(window: u64, need: u64) {
    let left_ms = window * 1000 - now_ms() % (window * 1000);
    if left_ms < need * 1000 {
        std::thread::sleep(Duration::from_millis(left_ms + 50));
    }
}

fn post(envoy: &Envoy, headers: &[(&str, &str)], body: &str) -> Reply {
    send(&client(), &envoy.url(CHAT), headers, body)
}

fn rejected(model: &str, rule: &str) -> String {
    format!(r#"llm_ratelimit_rejected_total{{model="{model}",rule="{rule}",mode="enforce"}}"#)
}

fn error_json(r: &Reply) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
    v["error"].clone()
}

#[test]
fn requests_per_minute_are_exact_with_two_workers_and_64_clients() {
    const LIMIT: u64 = 300;
    let mock = Mock::start();
    let envoy = Envoy::start(
        mock.port,
        &format!(r#"{{"limits":[{{"name":"rpm","key":"header:x-api-key","requests_per_minute":{LIMIT}}}]}}"#),
    );
    room_in_window(60, 25);
    let ok = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let url = envoy.url(CHAT);
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let (ok, limited, url) = (ok.clone(), limited.clone(), url.clone());
            std::thread::spawn(move || {
                // One keep-alive connection per client; the kernel spreads them over the workers.
                let agent = client();
                for _ in 0..10 {
                    let r = send(&agent, &url, &[("x-api-key", "sk-shared-key")], &chat("gpt-4o"));
                    match r.status {
                        200 => ok.fetch_add(1, Ordering::SeqCst),
                        429 => limited.fetch_add(1, Ordering::SeqCst),
                        s => panic!("unexpected {s}: {}", r.body),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (ok, limited) = (ok.load(Ordering::SeqCst), limited.load(Ordering::SeqCst));
    println!("admitted {ok} of 640 with a limit of {LIMIT}; {limited} rejected");
    assert_eq!(ok + limited, 640);
    let error = ok.abs_diff(LIMIT) as f64 / LIMIT as f64;
    assert!(error <= 0.02, "admitted {ok}, limit {LIMIT}");
    assert_eq!(ok, LIMIT, "shared-data CAS makes the count exact");
    envoy.wait_value(&rejected("gpt-4o", "rpm"), limited as f64);
    // Both workers took part.
    let (_, stats) = common::http_get(envoy.admin, "/stats?filter=worker_").unwrap();
    let per_worker: Vec<u64> = stats
        .lines()
        .filter(|l| l.starts_with("listener.") && l.contains(".worker_") && l.contains("downstream_cx_total:"))
        .filter_map(|l| l.rsplit(": ").next()?.trim().parse().ok())
        .collect();
    assert!(per_worker.iter().filter(|&&n| n > 0).count() >= 2, "not spread over both workers: {per_worker:?}");
}

#[test]
fn tokens_per_minute_are_reserved_then_reconciled_streaming_or_not() {
    let mock = Mock::start();
    let envoy = Envoy::start(
        mock.port,
        r#"{"limits":[{"name":"tpm","key":"global","tokens_per_minute":1000}],
            "token_estimate":{"bytes_per_token":4,"max_output_tokens":500}}"#,
    );
    room_in_window(60, 20);
    let usage = |p: &'static str, c: &'static str| [("x-mock-prompt-tokens", p), ("x-mock-completion-tokens", c)];
    let body = chat("gpt-4o");
    let estimate = (body.len() as u64).div_ceil(4);

    // Non-streaming: 100 + 200 real tokens. No max_tokens and no response of the model yet: the
    // output reserved is the cap (500).
    let r = post(&envoy, &usage("100", "200"), &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header_u64("x-ratelimit-remaining-tokens"), 1000 - estimate - 500);
    assert_eq!(r.header_u64("x-ratelimit-limit-tokens"), 1000);
    // The reservation was replaced by the real 300, and the model's average output is now 200:
    // the next request without max_tokens reserves that.
    envoy.wait_value(r#"llm_output_tokens_estimate{model="gpt-4o"}"#, 200.0);
    let r = post(&envoy, &usage("50", "50"), &body);
    assert_eq!(r.header_u64("x-ratelimit-remaining-tokens"), 1000 - 300 - estimate - 200);

    // Streaming, with max_tokens: the reservation includes it, the real usage replaces it.
    let stream = serde_json::json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
        "max_tokens": 300, "messages": [{"role": "user", "content": "Count"}]})
    .to_string();
    let stream_estimate = (stream.len() as u64).div_ceil(4) + 300;
    let r = post(
        &envoy,
        &[("x-mock-prompt-tokens", "300"), ("x-mock-completion-tokens", "250"), ("x-mock-chunk-delay-ms", "5")],
        &stream,
    );
    assert_eq!(r.status, 200);
    assert!(r.body.contains("data: [DONE]"));
    assert_eq!(r.header_u64("x-ratelimit-remaining-tokens"), 1000 - 400 - stream_estimate);
    // Used now: 300 + 100 + 550 = 950 of 1000: a request estimated above 50 is refused.
    let capped = serde_json::json!({"model": "gpt-4o", "max_tokens": 100, "messages": []}).to_string();
    let r = post(&envoy, &[], &capped);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header_u64("x-ratelimit-remaining-tokens"), 50);
    assert_eq!(error_json(&r)["code"], "tpm");
    let retry = r.header_u64("retry-after");
    let expected = 60 - (now_ms() / 1000) % 60;
    assert!(retry.abs_diff(expected) <= 1, "retry-after {retry}, window ends in {expected} s");
    envoy.wait_value(&rejected("gpt-4o", "tpm"), 1.0);
    envoy.wait_value(
        r#"llm_requests_total{model="gpt-4o",app="unknown",operation="chat",status="429",error_type="rate_limited"}"#,
        1.0,
    );
}

#[test]
fn usage_beyond_the_limit_is_debt_and_failed_requests_release_their_reservation() {
    let mock = Mock::start();
    // Output reservations (a model's average, see tokens_per_minute_are_reserved_then_reconciled...)
    // are not what this test is about: none.
    let envoy = Envoy::start(
        mock.port,
        r#"{"limits":[{"name":"tpm","key":"global","tokens_per_minute":1000}],"token_estimate":{"max_output_tokens":0}}"#,
    );
    room_in_window(60, 20);
    let body = chat("gpt-4o");
    let estimate = (body.len() as u64).div_ceil(4);
    // Failed upstream requests give their reservation back.
    for scenario in ["server_error", "unavailable"] {
        let r = post(&envoy, &[("x-mock-scenario", scenario)], &body);
        assert!(r.status >= 500);
    }
    let r = post(&envoy, &[("x-mock-prompt-tokens", "900"), ("x-mock-completion-tokens", "700")], &body);
    assert_eq!(r.header_u64("x-ratelimit-remaining-tokens"), 1000 - estimate, "failures released everything");
    // That stream used 1600 of 1000: over the limit, the rest is refused until the window ends,
    // and the 600 over carry into the next window.
    let r = post(&envoy, &[], &body);
    assert_eq!(r.status, 429);
    assert_eq!(r.header_u64("x-ratelimit-remaining-tokens"), 0);
}

#[test]
fn usd_budget_follows_pricing() {
    let mock = Mock::start();
    // gpt-4o: 2.50 / 10.00 USD per 1M tokens. Budget 0.01 USD per hour.
    let envoy = Envoy::start(
        mock.port,
        r#"{"pricing":{"gpt-4o":{"input":2.5,"output":10}},
            "limits":[{"name":"budget","key":"header:x-team","usd_per_hour":0.01}]}"#,
    );
    room_in_window(3600, 20);
    let team = [("x-team", "search"), ("x-mock-prompt-tokens", "400"), ("x-mock-completion-tokens", "400")];
    // Each request costs 400 × 2.5 + 400 × 10 = 5000 µUSD: two fit in 10000.
    for _ in 0..2 {
        assert_eq!(post(&envoy, &team, &chat("gpt-4o")).status, 200);
    }
    let r = post(&envoy, &team, &chat("gpt-4o"));
    assert_eq!(r.status, 429, "{}", r.body);
    let e = error_json(&r);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("rate_limit_error"), Some("budget")));
    assert!(e["message"].as_str().unwrap().contains("0.01 USD per hour"), "{e}");
    // Another team has its own budget.
    let ads = [("x-team", "ads"), ("x-mock-prompt-tokens", "400"), ("x-mock-completion-tokens", "400")];
    assert_eq!(post(&envoy, &ads, &chat("gpt-4o")).status, 200);
    envoy.wait_value(r#"llm_cost_microusd_total{model="gpt-4o",app="unknown"}"#, 15_000.0);
    envoy.wait_value(&rejected("gpt-4o", "budget"), 1.0);
}

#[test]
fn concurrency_cap_with_a_slow_upstream() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, r#"{"limits":[{"name":"inflight","key":"global","max_concurrent":2}]}"#);
    let url = envoy.url(CHAT);
    let in_flight = r#"llm_active_requests{model="gpt-4o"}"#;
    // Two slow requests take both slots…
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || send(&client(), &url, &[("x-mock-delay-ms", "2000")], &chat("gpt-4o")).status)
        })
        .collect();
    envoy.wait_value(in_flight, 2.0);
    // …so the next ones are refused at once, without reaching the upstream.
    for _ in 0..4 {
        let t = Instant::now();
        let r = send(&client(), &url, &[("x-mock-delay-ms", "2000")], &chat("gpt-4o"));
        assert_eq!(r.status, 429, "{}", r.body);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(error_json(&r)["code"], "inflight");
        assert!(t.elapsed() < Duration::from_millis(1000), "rejections are immediate: {:?}", t.elapsed());
    }
    for t in slow {
        assert_eq!(t.join().unwrap(), 200);
    }
    envoy.wait_value(&rejected("gpt-4o", "inflight"), 4.0);
    // The slots are back once the slow requests ended, including one whose client went away.
    let abandoned = std::thread::spawn({
        let url = url.clone();
        move || {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().timeout_global(Some(Duration::from_millis(300))).build().into();
            let _ = agent.post(&url).header("x-mock-delay-ms", "3000").send(chat("gpt-4o"));
        }
    });
    abandoned.join().unwrap();
    // Envoy ends the abandoned stream and the filter gives its slot back.
    envoy.wait_value(in_flight, 0.0);
    let both: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || send(&client(), &url, &[("x-mock-delay-ms", "300")], &chat("gpt-4o")).status)
        })
        .collect();
    for t in both {
        assert_eq!(t.join().unwrap(), 200);
    }
}

#[test]
fn max_input_tokens_rejects_oversized_prompts_with_413() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, r#"{"max_input_tokens":1000}"#);
    let big =
        serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(8000)}]}).to_string();
    let r = post(&envoy, &[], &big);
    assert_eq!(r.status, 413, "{}", r.body);
    let e = error_json(&r);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("invalid_request_error"), Some("max_input_tokens")));
    assert_eq!(post(&envoy, &[], &chat("gpt-4o")).status, 200);
    envoy.wait_value(&rejected("gpt-4o", "max_input_tokens"), 1.0);
    envoy.wait_value(
        r#"llm_requests_total{model="gpt-4o",app="unknown",operation="chat",status="413",error_type="rate_limited"}"#,
        1.0,
    );
}

#[test]
fn per_model_buckets_and_model_filters() {
    let mock = Mock::start();
    let envoy = Envoy::start(
        mock.port,
        r#"{"limits":[{"name":"each","key":"global","per_model":true,"requests_per_hour":2},
                      {"name":"big-only","key":"global","models":["gpt-4o"],"requests_per_hour":1}]}"#,
    );
    room_in_window(3600, 20);
    assert_eq!(post(&envoy, &[], &chat("gpt-4o")).status, 200);
    let r = post(&envoy, &[], &chat("gpt-4o"));
    assert_eq!((r.status, error_json(&r)["code"].as_str()), (429, Some("big-only")));
    assert_eq!(post(&envoy, &[], &chat("gpt-4o-mini")).status, 200);
    assert_eq!(post(&envoy, &[], &chat("gpt-4o-mini")).status, 200);
    let r = post(&envoy, &[], &chat("gpt-4o-mini"));
    assert_eq!((r.status, error_json(&r)["code"].as_str()), (429, Some("each")));
    assert_eq!(post(&envoy, &[], &chat("o3")).status, 200);
    envoy.wait_value(&rejected("gpt-4o-mini", "each"), 1.0);
}

#[test]
fn api_keys_are_hashed_never_exposed() {
    let mock = Mock::start();
    let envoy = Envoy::start(
        mock.port,
        r#"{"limits":[{"name":"per-key","key":"header:authorization","requests_per_hour":1}]}"#,
    );
    room_in_window(3600, 10);
    let secret = "Bearer sk-proj-SECRET0123456789";
    assert_eq!(post(&envoy, &[("authorization", secret)], &chat("gpt-4o")).status, 200);
    assert_eq!(post(&envoy, &[("authorization", secret)], &chat("gpt-4o")).status, 429);
    assert_eq!(post(&envoy, &[("authorization", "Bearer sk-other")], &chat("gpt-4o")).status, 200);
    for path in ["/stats", "/stats/prometheus", "/config_dump", "/clusters"] {
        let (_, text) = common::http_get(envoy.admin, path).unwrap();
        assert!(!text.contains("SECRET0123"), "{path} exposes the key");
    }
    assert!(!envoy.log().contains("SECRET0123"), "the log exposes the key");
}

#[test]
fn retry_after_is_when_the_window_resets() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, r#"{"limits":[{"name":"rps","key":"global","requests_per_second":1}]}"#);
    // Two requests in one second: the second is refused. (On a loaded machine the pair may
    // straddle a second boundary: then try again.)
    let r = (0..10)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(1000 - now_ms() % 1000 + 20));
            assert_eq!(post(&envoy, &[], &chat("gpt-4o")).status, 200);
            let r = post(&envoy, &[], &chat("gpt-4o"));
            (r.status == 429).then_some(r)
        })
        .expect("a second request within the same second is refused");
    assert_eq!(r.header("retry-after"), Some("1"));
    let reset = r.header("x-ratelimit-reset-requests").unwrap().to_string();
    assert!(reset.ends_with("ms"), "{reset}");
    // After the reset time the request is admitted again.
    let ms: u64 = reset.trim_end_matches("ms").parse().unwrap();
    std::thread::sleep(Duration::from_millis(ms + 20));
    assert_eq!(post(&envoy, &[], &chat("gpt-4o")).status, 200);
}

/// Envoy on a Unix socket gives no client IP, so an `ip` rule cannot be checked: a limiter
/// failure, handled by `failure_mode`.
fn envoy_on_unix_socket(mock: &Mock, config: &str) -> (Envoy, std::path::PathBuf) {
    let sock = std::env::temp_dir().join(format!("llm-meter-{}-{}.sock", std::process::id(), now_ms()));
    let yaml = render_config(mock.port, config).replace(
        "socket_address: { address: 127.0.0.1, port_value: 0 }\n    filter_chains",
        &format!("pipe: {{ path: {} }}\n    filter_chains", sock.display()),
    );
    assert!(yaml.contains("pipe:"), "listener address not found in envoy.yaml");
    (Envoy::try_start_yaml(&yaml).unwrap(), sock)
}

fn post_unix(sock: &std::path::Path) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let body = chat("gpt-4o");
    write!(
        s,
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

#[test]
fn failure_mode_allow_lets_requests_through_and_deny_refuses_them() {
    let mock = Mock::start();
    let rule = r#""limits":[{"name":"by-ip","key":"ip","requests_per_minute":100}]"#;
    let (allow, sock) = envoy_on_unix_socket(&mock, &format!("{{{rule}}}"));
    let (status, out) = post_unix(&sock);
    assert_eq!(status, 200, "{out}");
    allow.wait_value(r#"llm_meter_errors_total{kind="ratelimit"}"#, 1.0);
    assert!(allow.log().contains("rate limiter could not check"), "the failure is logged");
    drop(allow);

    let (deny, sock) = envoy_on_unix_socket(&mock, &format!(r#"{{"failure_mode":"deny",{rule}}}"#));
    let (status, out) = post_unix(&sock);
    assert_eq!(status, 503, "{out}");
    assert!(out.contains("rate_limiter_unavailable"), "{out}");
    assert!(out.to_ascii_lowercase().contains("retry-after: 1"), "{out}");
    deny.wait_value(&rejected("gpt-4o", "failure_mode"), 1.0);
}

#[test]
fn a_flood_of_distinct_keys_shares_an_overflow_bucket_in_bounded_memory() {
    const KEYS: u64 = 100_000;
    const TRACKED: u64 = 1_000;
    let mock = Mock::start();
    let envoy = Envoy::start(
        mock.port,
        &format!(
            r#"{{"max_limit_keys":{TRACKED},
                 "limits":[{{"name":"per-key","key":"header:x-api-key","requests_per_hour":1000000}}]}}"#
        ),
    );
    let memory = || envoy.memory();
    let url = envoy.url(CHAT);
    let flood = |from: u64, to: u64| {
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let agent = client();
                    let body = chat("gpt-4o");
                    for i in (from + t..to).step_by(16) {
                        let key = format!("sk-flood-{i}");
                        let r = send(&agent, &url, &[("x-api-key", &key)], &body);
                        assert_eq!(r.status, 200, "{}", r.body);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    // Fill the tracked keys (and go past the bound), then measure the flood.
    let empty = memory();
    flood(0, 2 * TRACKED);
    let before = memory();
    println!("{TRACKED} tracked keys + {TRACKED} overflowing: Envoy (allocated, rss) {empty:?} -> {before:?} bytes");
    let t = Instant::now();
    flood(2 * TRACKED, KEYS);
    let after = memory();
    println!(
        "{} requests with distinct keys in {:?}; Envoy (allocated, rss) {before:?} -> {after:?} bytes; allocated delta {}",
        KEYS - 2 * TRACKED,
        t.elapsed(),
        after.0 as i64 - before.0 as i64
    );
    let (before, after) = (before.0, after.0);
    envoy.wait_value(r#"llm_ratelimit_key_overflow_total{rule="per-key"}"#, (KEYS - TRACKED) as f64);
    // 98,000 new keys cost no shared data. Envoy's allocated memory still moves: measured over
    // 13 runs it changed by -4 KB to +102 KB, in steps of about 17 KB, and the same flood with
    // a single key grew it as much (+82 to +86 KB in 3 runs), so that is Envoy's own churn,
    // not the keys. The bound (the number in docs/limits.md) is 2.5 times the largest change seen, and
    // under 3 bytes per key: keeping the keys would take at least their 32-character hashes,
    // over 3 MB.
    const BOUND: u64 = 256 * 1024;
    assert!(
        after <= before + BOUND,
        "Envoy's allocated memory grew by {} bytes (bound {BOUND}) from {before} to {after}",
        after - before
    );
}

#[test]
fn debt_from_one_window_is_charged_to_the_next() {
    let mock = Mock::start();
    // No output reservation (after a 700-token answer the model's average would reserve 700).
    let envoy = Envoy::start(
        mock.port,
        r#"{"limits":[{"name":"tpm","key":"global","tokens_per_minute":1000}],"token_estimate":{"max_output_tokens":0}}"#,
    );
    let body = chat("gpt-4o");
    let estimate = (body.len() as u64).div_ceil(4);
    // Overspend late in a minute: 1600 tokens used against 1000.
    let left_ms = 60_000 - now_ms() % 60_000;
    if left_ms > 10_000 {
        std::thread::sleep(Duration::from_millis(left_ms - 10_000));
    } else {
        std::thread::sleep(Duration::from_millis(left_ms + 50_000));
    }
    let before = now_ms() / 60_000;
    let r = post(&envoy, &[("x-mock-prompt-tokens", "900"), ("x-mock-completion-tokens", "700")], &body);
    assert_eq!(r.status, 200);
    assert_eq!(now_ms() / 60_000, before, "the overspending request ended in its minute");
    // Next minute: it starts with the 600 tokens over the limit.
    std::thread::sleep(Duration::from_millis(60_000 - now_ms() % 60_000 + 100));
    let r = post(&envoy, &[("x-mock-prompt-tokens", "1"), ("x-mock-completion-tokens", "1")], &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header_u64("x-ratelimit-remaining-tokens"), 1000 - 600 - estimate);
}

#[test]
fn limits_without_holding_requests_still_admit_and_reject() {
    // `model_lookahead_bytes: 0`: headers are forwarded at once; the limits are checked when the
    // body has been read, and a rejection is a local reply sent after the headers went upstream.
    let mock = Mock::start();
    let envoy = Envoy::start(
        mock.port,
        r#"{"inject_stream_usage":false,"request":{"model_lookahead_bytes":0},
            "limits":[{"name":"rpm","key":"header:x-api-key","requests_per_minute":3},
                      {"name":"tpm","key":"header:x-api-key","tokens_per_minute":100000000}]}"#,
    );
    room_in_window(60, 10);
    let key = format!("sk-nohold-{}", std::process::id());
    let statuses: Vec<u16> =
        (0..5).map(|_| post(&envoy, &[("x-api-key", key.as_str())], &chat("gpt-4o")).status).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429], "{}", envoy.log());
    envoy.wait_value(&rejected("gpt-4o", "rpm"), 2.0);
}

/// What README says of local limits: they live in the Envoy process's shared data, so a restart
/// starts them empty (the global form is what lasts, see tests/global.rs).
#[test]
fn a_local_budget_starts_empty_again_when_envoy_restarts() {
    let mock = Mock::start();
    let config = r#"{"pricing":{"gpt-4o":{"input":2.5,"output":10}},
        "limits":[{"name":"month","key":"global","usd_per_month":1}]}"#;
    let headers = [("x-mock-prompt-tokens", "1000"), ("x-mock-completion-tokens", "2000")];
    let body = r#"{"model":"gpt-4o","max_tokens":2000,"messages":[{"role":"user","content":"hi"}]}"#;
    let remaining = |envoy: &Envoy| -> f64 {
        let r = post(envoy, &headers, body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.header("x-ratelimit-remaining-usd").unwrap().parse().unwrap()
    };
    let envoy = Envoy::start(mock.port, config);
    let fresh = remaining(&envoy);
    let spent = remaining(&envoy);
    // The first request's 0.0225 USD is spent (the second reserved as much as the first).
    assert!((fresh - spent - 0.0225).abs() < 1e-6, "{fresh} then {spent}");
    drop(envoy);
    let envoy = Envoy::start(mock.port, config);
    assert_eq!(remaining(&envoy), fresh, "after a restart the local budget is whole again");
}

/// Soft limits and shadow mode through the real Envoy: `x-ratelimit-warning` from the request that
/// crosses `warn_at` on, counted once; a shadow rule rejects nothing, adds no header, and counts
/// what it would have rejected.
#[test]
fn warn_at_and_shadow_mode_through_envoy() {
    let mock = Mock::start();
    let envoy = Envoy::start(
        mock.port,
        r#"{"limits":[{"name":"daily","key":"header:x-api-key","requests_per_day":100000,"warn_at":0.00004},
                      {"name":"trial","key":"header:x-api-key","requests_per_day":2,"mode":"shadow"}]}"#,
    );
    let body = chat("gpt-4o");
    // (The mock sends no rate-limit headers of its own: those in the response are the filter's.)
    let key = [("x-api-key", "sk-soft"), ("x-mock-ratelimit-style", "none")];
    let mut warned = Vec::new();
    for _ in 0..6 {
        let r = post(&envoy, &key, &body);
        assert_eq!(r.status, 200, "a shadow rule never rejects: {}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("100000"), "the enforced rule's family only");
        warned.push(r.header("x-ratelimit-warning").map(str::to_string));
    }
    // 0.00004 of 100,000 is 4: the 4th request crosses it, every later one is above it.
    let want: Vec<Option<String>> = (1..=6).map(|i| (i >= 4).then(|| "daily".to_string())).collect();
    assert_eq!(warned, want);
    let m = envoy.wait_value(r#"llm_ratelimit_rejected_total{model="gpt-4o",rule="trial",mode="shadow"}"#, 4.0);
    assert_eq!(m.value(r#"llm_ratelimit_warnings_total{rule="daily"}"#), Some(1.0));
    assert_eq!(m.sum("llm_ratelimit_rejected_total", &[("mode", "enforce")]), 0.0);
    assert!(!envoy.log().contains("sk-soft"), "the key is logged hashed, never in clear");
    assert!(envoy.log().contains("rule 'daily' key"), "the crossing is logged");
}
