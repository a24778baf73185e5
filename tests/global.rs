//! Global limits (issue 8): two real Envoys running `envoy/envoy-global.yaml` share limits
//! through one rate limit service (`llm-rls`: Envoy's RLS v3 API on Limitador's Redis storage)
//! and a real `redis-server`.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, free_port, render_shipped, root, send, Envoy, Mock};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CHAT: &str = "/v1/chat/completions";

/// A throwaway `redis-server` (Debian package) on a free port, no persistence.
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("llm-meter-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed: .ci/run installs it");
        common::eventually(Duration::from_secs(10), "redis-server up", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        Redis { child, port, dir }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bundled rate limit service (`target/release/llm-rls`).
struct Rls {
    child: Child,
    port: u16,
}

impl Rls {
    fn start(redis: &Redis) -> Rls {
        let bin = root().join("target/release/llm-rls");
        assert!(bin.exists(), "{} is missing: run `just rls` first (or `just test`)", bin.display());
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--redis", &format!("redis://127.0.0.1:{}", redis.port)])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn llm-rls");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{line:?}"));
        Rls { child, port }
    }
}

impl Drop for Rls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An Envoy running the shipped envoy-global.yaml with `filter_config`, calling `rls_port`.
fn envoy(mock: &Mock, rls_port: u16, filter_config: &str) -> Envoy {
    let yaml = render_shipped("envoy/envoy-global.yaml", mock.port, filter_config);
    assert!(yaml.contains("port_value: 8081"));
    Envoy::try_start_yaml(&yaml.replace("port_value: 8081", &format!("port_value: {rls_port}")))
        .unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"))
}

/// A global rule keyed on `authorization`; `service_extra` is added to its `service` object.
fn rule(name: &str, limit: &str, service_extra: &str) -> String {
    format!(
        r#"{{"name":"{name}","key":"header:authorization",{limit},"scope":"global",
            "service":{{"cluster":"rate_limit_service","domain":"llm"{service_extra}}}}}"#
    )
}

fn chat() -> String {
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#.to_string()
}

#[test]
fn two_envoys_admit_one_global_limit_between_them() {
    const LIMIT: u64 = 200;
    const SENT: u64 = 600;
    let (redis, mock) = (Redis::start(), Mock::start());
    let rls = Rls::start(&redis);
    // A late answer must not admit (failure_mode allow would): deny, and time enough.
    let limit = format!(r#""requests_per_hour":{LIMIT}"#);
    let config = format!(r#"{{"limits":[{}]}}"#, rule("rph", &limit, r#","timeout_ms":10000,"failure_mode":"deny""#));
    let envoys = [envoy(&mock, rls.port, &config), envoy(&mock, rls.port, &config)];
    let admitted = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let url = envoys[t % 2].url(CHAT);
            let (admitted, rejected) = (admitted.clone(), rejected.clone());
            std::thread::spawn(move || {
                let agent = client();
                for _ in 0..SENT / 16 + u64::from(t < (SENT % 16) as usize) {
                    let r = send(&agent, &url, &[("authorization", "Bearer team-a")], &chat());
                    match r.status {
                        200 => admitted.fetch_add(1, Ordering::Relaxed),
                        429 => {
                            assert!(r.body.contains("\"code\":\"rph\""), "{}", r.body);
                            assert!(r.header("retry-after").is_some());
                            rejected.fetch_add(1, Ordering::Relaxed)
                        }
                        s => panic!("status {s}: {}", r.body),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (admitted, rejected) = (admitted.load(Ordering::Relaxed), rejected.load(Ordering::Relaxed));
    println!("two Envoys, {SENT} requests, global limit {LIMIT}: {admitted} admitted, {rejected} rejected");
    assert_eq!(admitted + rejected, SENT);
    assert_eq!(admitted, LIMIT, "admitted {admitted} of a global limit of {LIMIT}");
    // Each Envoy admitted part of it: the limit really is shared.
    for e in &envoys {
        let m = e.metrics();
        let ok = m.sum("llm_requests_total", &[("status", "200")]);
        assert!(ok > 0.0 && ok < LIMIT as f64, "one Envoy admitted {ok}");
        assert_eq!(m.sum("llm_ratelimit_service_errors_total", &[]), 0.0);
    }
    // Another key has its own budget.
    let r = send(&client(), &envoys[0].url(CHAT), &[("authorization", "Bearer team-b")], &chat());
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn a_global_rejection_gives_back_the_local_charges() {
    let (redis, mock) = (Redis::start(), Mock::start());
    let rls = Rls::start(&redis);
    // Local request and token rules for everyone; the global rule allows one request per team.
    let global = r#"{"name":"per-team","key":"header:x-team","requests_per_hour":1,"scope":"global",
        "service":{"cluster":"rate_limit_service","domain":"llm","timeout_ms":10000,"failure_mode":"deny"}}"#;
    let config = format!(
        r#"{{"limits":[{{"name":"rpm","key":"global","requests_per_minute":100}},
                       {{"name":"tpm","key":"global","tokens_per_minute":100000}},{global}]}}"#
    );
    let e = envoy(&mock, rls.port, &config);
    let body = chat();
    let estimate = (body.len() as u64).div_ceil(4);
    let usage = [("x-mock-prompt-tokens", "5"), ("x-mock-completion-tokens", "7")];
    let post = |team: &str| send(&client(), &e.url(CHAT), &[("x-team", team), usage[0], usage[1]], &body);
    let first = post("a");
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.header_u64("x-ratelimit-remaining-requests"), 99);
    assert_eq!(first.header_u64("x-ratelimit-remaining-tokens"), 100_000 - estimate);
    // Team a's second request: admitted by the local rules, refused by the service.
    let refused = post("a");
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.body.contains("\"code\":\"per-team\""), "{}", refused.body);
    // Team b: the local buckets show one request and its 12 tokens spent, nothing of the refused one.
    let next = post("b");
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(next.header_u64("x-ratelimit-remaining-requests"), 98, "the refused request was given back");
    assert_eq!(next.header_u64("x-ratelimit-remaining-tokens"), 100_000 - 12 - estimate);
    let m = e.wait_value(r#"llm_ratelimit_rejected_total{model="gpt-4o",rule="per-team"}"#, 1.0);
    assert_eq!(m.sum("llm_meter_errors_total", &[]), 0.0);
    assert_eq!(m.sum("llm_ratelimit_service_errors_total", &[]), 0.0);
}

#[test]
fn token_usage_reported_by_one_envoy_is_enforced_on_the_other() {
    let (redis, mock) = (Redis::start(), Mock::start());
    let rls = Rls::start(&redis);
    let config = format!(r#"{{"limits":[{}]}}"#, rule("tph", r#""tokens_per_hour":1000"#, r#","timeout_ms":10000"#));
    let (a, b) = (envoy(&mock, rls.port, &config), envoy(&mock, rls.port, &config));
    let key = ("authorization", "Bearer team-a");
    // Within the limit before: B admits.
    let r = send(
        &client(),
        &b.url(CHAT),
        &[key, ("x-mock-prompt-tokens", "2"), ("x-mock-completion-tokens", "3")],
        &chat(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // A's request uses 1,500 tokens: admitted (the window had room), then reported.
    let r = send(
        &client(),
        &a.url(CHAT),
        &[key, ("x-mock-prompt-tokens", "500"), ("x-mock-completion-tokens", "1000")],
        &chat(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // B refuses once the report landed (it is sent within ~100 ms of the response's end).
    let refused = common::eventually(Duration::from_secs(5), "B to refuse", || {
        let r = send(&client(), &b.url(CHAT), &[key, ("x-mock-completion-tokens", "1")], &chat());
        (r.status == 429).then_some(r)
    });
    assert!(refused.body.contains("\"code\":\"tph\""), "{}", refused.body);
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("0"));
    // The other key is untouched.
    let r = send(&client(), &b.url(CHAT), &[("authorization", "Bearer team-b")], &chat());
    assert_eq!(r.status, 200);
    for e in [&a, &b] {
        assert_eq!(e.metrics().sum("llm_ratelimit_service_errors_total", &[]), 0.0);
    }
    b.wait_value(r#"llm_ratelimit_rejected_total{model="gpt-4o",rule="tph"}"#, 1.0);
}

#[test]
fn redis_down_follows_each_rules_failure_mode_and_is_counted() {
    let (mut redis, mock) = (Redis::start(), Mock::start());
    let rls = Rls::start(&redis);
    let allow = format!(
        r#"{{"limits":[{}]}}"#,
        rule("rpm", r#""requests_per_minute":1000"#, r#","timeout_ms":500,"failure_mode":"allow""#)
    );
    let deny = format!(
        r#"{{"limits":[{}]}}"#,
        rule("rpm", r#""requests_per_minute":1000"#, r#","timeout_ms":500,"failure_mode":"deny""#)
    );
    let (open, closed) = (envoy(&mock, rls.port, &allow), envoy(&mock, rls.port, &deny));
    let key = [("authorization", "Bearer team-a")];
    assert_eq!(send(&client(), &open.url(CHAT), &key, &chat()).status, 200);
    assert_eq!(send(&client(), &closed.url(CHAT), &key, &chat()).status, 200);
    redis.stop();
    let started = std::time::Instant::now();
    let r = send(&client(), &open.url(CHAT), &key, &chat());
    assert_eq!(r.status, 200, "failure_mode allow: {}", r.body);
    let r = send(&client(), &closed.url(CHAT), &key, &chat());
    assert_eq!(r.status, 503, "failure_mode deny: {}", r.body);
    assert!(r.body.contains("rate_limiter_unavailable"), "{}", r.body);
    // Bounded by the service timeout (500 ms each), never a hang.
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    open.wait_value(r#"llm_ratelimit_service_errors_total{rule="rpm"}"#, 1.0);
    closed.wait_value(r#"llm_ratelimit_service_errors_total{rule="rpm"}"#, 1.0);
    let m = closed.wait_value(
        r#"llm_requests_total{model="gpt-4o",app="unknown",operation="chat",status="503",error_type="rate_limited"}"#,
        1.0,
    );
    assert_eq!(m.sum("llm_active_requests", &[]), 0.0);
    // The service itself down (not only its Redis): the same.
    drop(rls);
    assert_eq!(send(&client(), &open.url(CHAT), &key, &chat()).status, 200);
    assert_eq!(send(&client(), &closed.url(CHAT), &key, &chat()).status, 503);
    open.wait_value(r#"llm_ratelimit_service_errors_total{rule="rpm"}"#, 2.0);
    for e in [&open, &closed] {
        assert!(!e.log().contains("panicked"), "{}", e.log());
    }
}

#[test]
fn a_cluster_envoy_does_not_have_is_a_counted_failure_not_a_crash() {
    let mock = Mock::start();
    let config = r#"{"limits":[{"name":"rpm","key":"global","requests_per_minute":10,"scope":"global",
        "service":{"cluster":"no_such_cluster","domain":"llm"}}]}"#;
    let mut e = envoy(&mock, free_port(), config);
    for _ in 0..3 {
        let r = send(&client(), &e.url(CHAT), &[], &chat());
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let m = e.wait_value(r#"llm_ratelimit_service_errors_total{rule="rpm"}"#, 3.0);
    assert_eq!(m.sum("llm_meter_errors_total", &[]), 0.0, "a service failure, not an internal error");
    assert!(e.log().contains("could not be called (unknown cluster?)"), "{}", e.log());
    assert!(e.is_running());
    assert!(!e.log().contains("panicked"), "{}", e.log());
    // Still metering: the VM is alive.
    e.wait_value(
        r#"llm_requests_total{model="gpt-4o",app="unknown",operation="chat",status="200",error_type="none"}"#,
        3.0,
    );
}
