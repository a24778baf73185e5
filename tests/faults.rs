//! Faults through the real Envoy with metering and rate limits on (issue 7): upstream down,
//! upstream slower than the route timeout, resets mid-stream, clients leaving mid-stream and
//! upstream errors, all at once; then a listener reload with a new filter configuration while
//! traffic flows. After each: every request is counted once with the right error type, the
//! active-request gauges are back to 0, every token reservation and concurrency slot is
//! released, and nothing panicked.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, free_port, render_config, render_dynamic, send, Envoy, Mock, Reply};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CHAT: &str = "/v1/chat/completions";

fn chat(stream: bool) -> String {
    serde_json::json!({"model": "gpt-4o", "stream": stream, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string()
}

/// Windows are aligned to the epoch: waits for the next hour if fewer than `need` seconds are
/// left in this one, so a test's requests share one window.
fn room_in_hour(need: u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let left = 3_600_000 - now % 3_600_000;
    if left < need * 1000 {
        std::thread::sleep(Duration::from_millis(left + 50));
    }
}

fn requests(m: &common::Metrics, status: &str, error: &str) -> f64 {
    m.sum("llm_requests_total", &[("status", status), ("error_type", error)])
}

fn assert_clean_log(envoy: &Envoy) {
    let log = envoy.log();
    for bad in ["panicked", "RuntimeError", "Uncaught", "VM failed"] {
        assert!(!log.contains(bad), "{bad:?} in Envoy's log:\n{log}");
    }
}

#[test]
fn every_fault_counts_once_releases_its_reservation_and_balances_the_gauges() {
    const EACH: usize = 10;
    const LIMIT: u64 = 1000;
    const SLOTS: usize = 5;
    let config = format!(
        r#"{{"limits":[{{"name":"tph","key":"global","tokens_per_hour":{LIMIT}}},
                      {{"name":"conc","key":"global","max_concurrent":{SLOTS}}}],
            "token_estimate":{{"bytes_per_token":4,"max_output_tokens":0}}}}"#
    );
    // (No output reservation: requests without max_tokens would otherwise reserve the cap until
    // a response teaches the model's average, and the faults here never complete one first.)
    room_in_hour(120);
    // Envoy first, in front of a port nobody listens on yet: the upstream is down.
    let upstream = free_port();
    let yaml = render_config(upstream, &config);
    assert!(yaml.contains("timeout: 300s"));
    let mut envoy = Envoy::try_start_yaml(&yaml.replace("timeout: 300s", "timeout: 1s")).unwrap();
    for _ in 0..EACH {
        assert_eq!(send(&client(), &envoy.url(CHAT), &[], &chat(false)).status, 503);
    }
    let mock = Mock::start_on(upstream);

    // Five kinds of request, one thread each (at most 5 at once: the concurrency cap is never
    // hit), all at the same time.
    let url = envoy.url(CHAT);
    let port = envoy.port;
    let kinds: Vec<std::thread::JoinHandle<()>> = vec![
        // Completed, non-streaming and streaming: 30 and 12 tokens each.
        std::thread::spawn({
            let url = url.clone();
            move || {
                for i in 0..2 * EACH {
                    let usage = if i % 2 == 0 {
                        [("x-mock-prompt-tokens", "10"), ("x-mock-completion-tokens", "20")]
                    } else {
                        [("x-mock-prompt-tokens", "5"), ("x-mock-completion-tokens", "7")]
                    };
                    let r = send(&client(), &url, &usage, &chat(i % 2 == 1));
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            }
        }),
        // Reset by the upstream mid-stream.
        std::thread::spawn({
            let url = url.clone();
            move || {
                for _ in 0..EACH {
                    let r = client()
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-mock-scenario", "reset_mid_stream")
                        .header("x-mock-completion-tokens", "40")
                        .send(&chat(true));
                    if let Ok(mut resp) = r {
                        let _ = resp.body_mut().read_to_string();
                    }
                }
            }
        }),
        // Slower than the route timeout (1 s).
        std::thread::spawn({
            let url = url.clone();
            move || {
                for _ in 0..EACH {
                    assert_eq!(send(&client(), &url, &[("x-mock-delay-ms", "1500")], &chat(false)).status, 504);
                }
            }
        }),
        // Clients that leave mid-stream.
        std::thread::spawn(move || {
            for _ in 0..EACH {
                let stream = common::open_stream(port, &chat(true), 100, 10);
                std::thread::sleep(Duration::from_millis(100));
                drop(stream);
            }
        }),
        // Upstream errors.
        std::thread::spawn({
            let url = url.clone();
            move || {
                for _ in 0..EACH {
                    assert_eq!(send(&client(), &url, &[("x-mock-scenario", "server_error")], &chat(false)).status, 500);
                }
            }
        }),
    ];
    for k in kinds {
        k.join().unwrap();
    }
    assert!(envoy.is_running());

    let m = envoy.wait_for(Duration::from_secs(10), "every request counted", |m| {
        m.sum("llm_requests_total", &[]) == (7 * EACH) as f64
    });
    assert_eq!(requests(&m, "200", "none"), (2 * EACH) as f64);
    assert_eq!(requests(&m, "503", "network"), EACH as f64, "upstream down");
    assert_eq!(requests(&m, "200", "network"), EACH as f64, "reset mid-stream");
    assert_eq!(requests(&m, "504", "timeout"), EACH as f64);
    assert_eq!(requests(&m, "200", "canceled"), EACH as f64);
    assert_eq!(requests(&m, "500", "server_error"), EACH as f64);
    assert_eq!(m.sum("llm_active_requests", &[]), 0.0, "{:?}", m.names_with_prefix("llm_active"));
    assert_eq!(m.sum("llm_tokens_total", &[("token_type", "input")]), (EACH * 15) as f64);
    assert_eq!(m.sum("llm_tokens_total", &[("token_type", "output")]), (EACH * 27) as f64);
    assert_eq!(m.sum("llm_meter_errors_total", &[]), 0.0);

    // Tokens: only the completed requests' 420 are charged; every failure gave its reservation
    // back. A request estimated above what is left is refused, and the refusal says what is left.
    let used = (EACH * (30 + 12)) as u64;
    let big =
        serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(2400)}]}).to_string();
    let r = send(&client(), &url, &[], &big);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header_u64("x-ratelimit-remaining-tokens"), LIMIT - used, "reservations left behind");

    // Concurrency: all 5 slots are free again. Hold them with 5 slow requests; a 6th is refused.
    let slow: Vec<_> = (0..SLOTS)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || send(&client(), &url, &[("x-mock-delay-ms", "700")], &chat(false)).status)
        })
        .collect();
    common::eventually(Duration::from_secs(5), "5 requests in flight", || {
        (envoy.metrics().sum("llm_active_requests", &[]) == SLOTS as f64).then_some(())
    });
    let r: Reply = send(&client(), &url, &[], &chat(false));
    assert_eq!((r.status, r.header("x-ratelimit-limit-requests")), (429, None), "{}", r.body);
    for s in slow {
        assert_eq!(s.join().unwrap(), 200);
    }
    envoy.wait_value(r#"llm_ratelimit_rejected_total{model="gpt-4o",rule="conc",mode="enforce"}"#, 1.0);
    assert_clean_log(&envoy);
    drop(mock);
}

#[test]
fn a_listener_reload_with_a_new_filter_configuration_under_traffic_loses_nothing() {
    let mock = Mock::start();
    let dir = std::env::temp_dir().join(format!("llm-meter-lds-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let lds = dir.join("lds.yaml");
    let listen = free_port();
    // Before: no app label, a 10M tokens/hour budget. After: apps from x-app-id, 20M.
    let before = r#"{"limits":[{"name":"tph","key":"global","tokens_per_hour":10000000}]}"#;
    let after =
        r#"{"metrics":{"app_header":"x-app-id"},"limits":[{"name":"tph","key":"global","tokens_per_hour":20000000}]}"#;
    let (bootstrap, resources) = render_dynamic(mock.port, before, listen, &lds);
    std::fs::write(&lds, resources).unwrap();
    room_in_hour(120);
    let mut envoy = Envoy::try_start_yaml(&bootstrap).unwrap();
    assert_eq!(envoy.port, listen);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(AtomicU64::new(0));
    let url = envoy.url(CHAT);
    let workers: Vec<_> = (0..6)
        .map(|t| {
            let (stop, sent, tokens, url) = (stop.clone(), sent.clone(), tokens.clone(), url.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    // Streams that span the reload, plain requests, and slow ones.
                    let (stream, delay) = match (t + i) % 3 {
                        0 => (true, "20"),
                        1 => (false, "0"),
                        _ => (false, "150"),
                    };
                    let headers = [
                        ("x-app-id", "web"),
                        ("x-mock-prompt-tokens", "3"),
                        ("x-mock-completion-tokens", "4"),
                        (if stream { "x-mock-chunk-delay-ms" } else { "x-mock-delay-ms" }, delay),
                    ];
                    // A fresh connection each time: a connection Envoy drains after the reload
                    // is closed after its current request.
                    let r = send(&client(), &url, &headers, &chat(stream));
                    assert_eq!(r.status, 200, "{}", r.body);
                    if stream {
                        assert!(r.body.contains("data: [DONE]"), "{}", r.body);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    tokens.fetch_add(7, Ordering::Relaxed);
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(1500));
    let (_, resources) = render_dynamic(mock.port, after, listen, &lds);
    let tmp = dir.join("lds.yaml.tmp");
    std::fs::write(&tmp, resources).unwrap();
    std::fs::rename(&tmp, &lds).unwrap();
    common::eventually(Duration::from_secs(10), "the listener reloaded", || {
        let (_, stats) = common::http_get(envoy.admin, "/stats?filter=listener_manager.lds.update_success").unwrap();
        stats.contains("listener_manager.lds.update_success: 2").then_some(())
    });
    let reloaded_at = sent.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let sent = sent.load(Ordering::Relaxed);
    let tokens = tokens.load(Ordering::Relaxed);
    assert!(
        reloaded_at > 10 && sent > reloaded_at + 10,
        "traffic on both sides of the reload: {reloaded_at} then {sent}"
    );

    let m = envoy.wait_for(Duration::from_secs(10), "every request counted", |m| {
        m.sum("llm_requests_total", &[]) == sent as f64
    });
    assert!(envoy.is_running());
    // Both configurations metered: the old one without the app label, the new one with it.
    let old = m.sum("llm_requests_total", &[("app", "unknown")]);
    let new = m.sum("llm_requests_total", &[("app", "web")]);
    println!("{sent} requests: {old} under the old configuration, {new} under the new one");
    assert!(old > 0.0 && new > 0.0 && old + new == sent as f64, "old {old}, new {new}, sent {sent}");
    assert_eq!(m.sum("llm_requests_total", &[("error_type", "none")]), sent as f64);
    assert_eq!(
        m.sum("llm_tokens_total", &[("token_type", "input")]) + m.sum("llm_tokens_total", &[("token_type", "output")]),
        tokens as f64
    );
    assert_eq!(m.sum("llm_active_requests", &[]), 0.0);
    assert_eq!(m.sum("llm_meter_errors_total", &[]), 0.0);

    // Reservations made under either configuration were all reconciled into the bucket both
    // share: what is left is the new limit minus exactly the tokens used.
    let body = chat(false);
    // (Without the mock's own x-ratelimit-* headers: its 2M token limit would be the tighter.)
    let probe = [("x-mock-prompt-tokens", "1"), ("x-mock-completion-tokens", "1"), ("x-mock-ratelimit-style", "none")];
    let r = send(&client(), &url, &probe, &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.header_u64("x-ratelimit-limit-tokens"), 20_000_000);
    // The probe reserved its input and the model's average output (the estimate gauge).
    let average = m.sum("llm_output_tokens_estimate", &[]) as u64;
    assert!(average > 0, "every completed response teaches the average");
    let reserved = (body.len() as u64).div_ceil(4) + average;
    assert_eq!(r.header_u64("x-ratelimit-remaining-tokens"), 20_000_000 - tokens - reserved);
    assert_clean_log(&envoy);
    let _ = std::fs::remove_dir_all(&dir);
}
