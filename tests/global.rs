//! Global limits (issue 8): two real Envoys running `envoy/envoy-global.yaml` share limits
//! through one rate limit service (`llm-rls`: Envoy's RLS v3 API on Limitador's Redis storage)
//! and a real `redis-server`.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, free_port, render_shipped, root, send, Envoy, Mock};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CHAT: &str = "/v1/chat/completions";

/// A `redis-server` (Debian package; `redis-cli` comes with it) on a free port with a data
/// directory of its own: throwaway ([`Redis::start`]) or persistent ([`Redis::start_with_config`]),
/// and restartable on the same port and directory.
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// The command line, to start it again the same way.
    args: Vec<OsString>,
}

impl Redis {
    /// No persistence: a restart empties it.
    fn start() -> Redis {
        Redis::spawn(&[], &["--save", "", "--appendonly", "no"])
    }

    /// Persistent, with `conf` (the shipped `envoy/redis.conf`) and `--dir <tempdir> --port <p>`.
    fn start_with_config(conf: &Path) -> Redis {
        assert!(conf.exists(), "{}", conf.display());
        Redis::spawn(&[conf.as_os_str()], &[])
    }

    fn spawn(conf: &[&OsStr], options: &[&str]) -> Redis {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("llm-meter-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args: Vec<OsString> = conf.iter().map(|c| c.to_os_string()).collect();
        args.extend(["--port", &port.to_string(), "--bind", "127.0.0.1"].map(OsString::from));
        args.extend(options.iter().map(OsString::from));
        args.extend([OsString::from("--dir"), dir.clone().into_os_string()]);
        let child = Redis::launch(&args, port, &dir);
        Redis { child, port, dir, args }
    }

    /// Starts `redis-server args` (its log appended to `dir/redis.log`) and waits until it
    /// answers PING, which it does only once it has loaded its data.
    fn launch(args: &[OsString], port: u16, dir: &Path) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("redis.log")).unwrap();
        let mut child = Command::new("redis-server")
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed: .ci/run installs it");
        common::eventually(Duration::from_secs(10), "redis-server up", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("redis-server exited ({status}):\n{}", std::fs::read_to_string(dir.join("redis.log")).unwrap());
            }
            Redis::cli(port, &["ping"]).filter(|out| out == "PONG").map(|_| ())
        });
        child
    }

    /// `redis-cli -p PORT args`: its output, trimmed; `None` when it fails.
    fn cli(port: u16, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).stderr(Stdio::null()).output();
        let out = out.expect("redis-cli (it comes with redis-server) must be installed");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops it gracefully (`SHUTDOWN`: with the shipped configuration, a last fsync of the
    /// append-only file) and starts it again on the same port with the same data directory.
    fn restart(&mut self) {
        let _ = Redis::cli(self.port, &["shutdown"]);
        let status = common::eventually(Duration::from_secs(10), "redis-server to exit", || {
            self.child.try_wait().ok().flatten()
        });
        assert!(status.success(), "redis-server exited with {status} on SHUTDOWN");
        self.child = Redis::launch(&self.args, self.port, &self.dir);
    }

    /// Kills it (SIGKILL: no shutdown of any kind) and starts it again like [`Redis::restart`].
    fn crash_and_restart(&mut self) {
        self.stop();
        self.child = Redis::launch(&self.args, self.port, &self.dir);
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

    /// Kills it (SIGKILL): it holds nothing of its own, every counter is in Redis.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Rls {
    fn drop(&mut self) {
        self.kill();
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
        let m = e.settled();
        let ok = m.sum("llm_requests_total", &[("status", "200")]);
        assert!(ok > 0.0 && ok < LIMIT as f64, "one Envoy admitted {ok}");
        assert_eq!(m.sum("llm_ratelimit_service_errors_total", &[]), 0.0);
    }
    // Another key has its own budget.
    let r = send(&client(), &envoys[0].url(CHAT), &[("authorization", "Bearer team-b")], &chat());
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn two_envoys_spend_one_global_usd_budget_and_stop_within_one_requests_cost() {
    // 0.1 USD a month for everyone, through both Envoys; every request costs 0.0225 USD (1,000
    // input tokens at 2.5 USD per 1M, 2,000 output at 10) and reserves about as much.
    const BUDGET: f64 = 0.1;
    const COST: f64 = 0.0225;
    let (redis, mock) = (Redis::start(), Mock::start());
    let rls = Rls::start(&redis);
    let config = r#"{"pricing":{"gpt-4o":{"input":2.5,"output":10}},
        "limits":[{"name":"team-month","key":"global","usd_per_month":0.1,"warn_at":0.5,"scope":"global",
                   "service":{"cluster":"rate_limit_service","domain":"llm","timeout_ms":10000,"failure_mode":"deny"}}]}"#;
    let envoys = [envoy(&mock, rls.port, config), envoy(&mock, rls.port, config)];
    let headers =
        [("x-mock-prompt-tokens", "1000"), ("x-mock-completion-tokens", "2000"), ("x-mock-ratelimit-style", "none")];
    let body = r#"{"model":"gpt-4o","max_tokens":2000,"messages":[{"role":"user","content":"hi"}]}"#;
    // Alternate between the Envoys, one request at a time, each usage report landed before the
    // next request, until one refuses.
    let mut admitted = 0u32;
    let refusal = loop {
        let e = &envoys[admitted as usize % 2];
        let (before, _) = service_calls(e);
        let r = send(&client(), &e.url(CHAT), &headers, body);
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-usd"), Some("0.1"));
        admitted += 1;
        assert!(admitted < 10, "a 0.1 USD budget admitted {admitted} requests of 0.0225 USD");
        common::eventually(Duration::from_secs(10), "the usage report", || {
            let (total, completed) = service_calls(e);
            (total >= before + 2 && completed == total).then_some(())
        });
    };
    let spent = f64::from(admitted) * COST;
    println!("two Envoys, a {BUDGET} USD budget: {admitted} requests admitted, {spent} USD spent");
    assert!((spent - BUDGET).abs() < COST, "spent {spent} USD of a {BUDGET} USD budget: more than one request off");
    // The Envoy that refused says so in USD, with the rule, and resets when the month ends.
    assert!(refusal.body.contains("\"code\":\"team-month\""), "{}", refusal.body);
    assert!(refusal.body.contains("0.1 USD per month"), "{}", refusal.body);
    assert_eq!(refusal.header("x-ratelimit-limit-usd"), Some("0.1"));
    let remaining: f64 = refusal.header("x-ratelimit-remaining-usd").unwrap().parse().unwrap();
    assert!(remaining < COST, "{remaining} USD left, yet refused");
    assert!(refusal.header_u64("retry-after") > 0);
    // Both Envoys served part of it, and the other one refuses too.
    let other = &envoys[(admitted as usize + 1) % 2];
    let r = send(&client(), &other.url(CHAT), &headers, body);
    assert_eq!(r.status, 429, "{}", r.body);
    for e in &envoys {
        let m = e.settled();
        assert!(m.sum("llm_requests_total", &[("status", "200")]) > 0.0);
        // The budget's use and limit in micro-USD, and the warning at half of it.
        assert_eq!(m.value(r#"llm_ratelimit_limit{rule="team-month"}"#), Some(100_000.0));
        assert!(m.value(r#"llm_ratelimit_used{rule="team-month"}"#).unwrap() > 50_000.0);
        assert_eq!(m.sum("llm_ratelimit_service_errors_total", &[]), 0.0);
    }
    let warnings: f64 = envoys.iter().map(|e| e.settled().sum("llm_ratelimit_warnings_total", &[])).sum();
    assert_eq!(warnings, 1.0, "the budget crossed warn_at once, on one of the two Envoys");
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
                       {{"name":"tpm","key":"global","tokens_per_minute":100000}},{global}],
            "token_estimate":{{"max_output_tokens":0}}}}"#
    );
    let e = envoy(&mock, rls.port, &config);
    let body = chat();
    let estimate = (body.len() as u64).div_ceil(4);
    let usage = [("x-mock-prompt-tokens", "5"), ("x-mock-completion-tokens", "7")];
    let post = |team: &str| send(&client(), &e.url(CHAT), &[("x-team", team), usage[0], usage[1]], &body);
    let first = post("a");
    assert_eq!(first.status, 200, "{}", first.body);
    // The request family shows the rule with the smallest share left: the service's per-team
    // rule (0 of 1); the local buckets show in `llm_ratelimit_used` (rules keyed `global`).
    assert_eq!(first.header_u64("x-ratelimit-remaining-requests"), 0);
    assert_eq!(first.header_u64("x-ratelimit-remaining-tokens"), 100_000 - estimate);
    e.wait_value(r#"llm_ratelimit_used{rule="rpm"}"#, 1.0);
    // Team a's second request: admitted by the local rules, refused by the service.
    let refused = post("a");
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.body.contains("\"code\":\"per-team\""), "{}", refused.body);
    // Team b: the local buckets show one request and its 12 tokens spent, nothing of the refused one.
    let next = post("b");
    assert_eq!(next.status, 200, "{}", next.body);
    assert_eq!(next.header_u64("x-ratelimit-remaining-tokens"), 100_000 - 12 - estimate);
    // Two admitted requests in the local request bucket: the refused one was given back.
    e.wait_value(r#"llm_ratelimit_used{rule="rpm"}"#, 2.0);
    assert_eq!(e.metrics().value(r#"llm_ratelimit_limit{rule="rpm"}"#), Some(100.0));
    let m = e.wait_value(r#"llm_ratelimit_rejected_total{model="gpt-4o",rule="per-team",mode="enforce"}"#, 1.0);
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
        assert_eq!(e.settled().sum("llm_ratelimit_service_errors_total", &[]), 0.0);
    }
    b.wait_value(r#"llm_ratelimit_rejected_total{model="gpt-4o",rule="tph",mode="enforce"}"#, 1.0);
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

// ---- A global budget survives restarts ----
//
// Each request of `spend` costs the same (the mock's usage is fixed, and `max_tokens` bounds
// what a filter may reserve before the response), so a restart that kept the budget shows exactly
// one more request's cost gone on the first request after it; one that lost anything shows more
// left. Two readings: the budget's counter in Redis (the rate limit service's hits), always; and
// what is left as the filter shows it on the admitted response (`REMAINING`). So far the filter
// sends `x-ratelimit-*` on admitted responses for local rules only, none for a global rule: until
// it does, the header is checked where present (`REMAINING_REQUIRED` false).

/// The budget's limit, in the rule `team-budget` (keyed `global`, see [`budget_config`]).
const LIMIT: &str = r#""usd_per_month":100"#;

/// The header showing what is left of the budget on an admitted response.
const REMAINING: &str = "x-ratelimit-remaining-usd";

/// Whether every admitted response must carry [`REMAINING`] (else it is checked where present).
const REMAINING_REQUIRED: bool = true;

/// What one request of [`spend`] costs, in [`REMAINING`]'s unit: 1,000 input tokens at $2.50 per
/// million and 2,000 output at $10 (the pricing of `budget_config`): $0.0025 + $0.02. The header
/// is a decimal amount of USD (`99.955`): each request's shows $0.0225 less than the one before,
/// across every restart too, never 100 again.
const PER_REQUEST: f64 = 0.0225;

/// The filter configuration of the restart tests: gpt-4o priced, and the budget as one global
/// rule for all traffic. failure_mode deny: a request is admitted only once the service has
/// counted it, never while Redis is away.
fn budget_config() -> String {
    format!(
        r#"{{"pricing":{{"gpt-4o":{{"input":2.5,"output":10}}}},
             "limits":[{{"name":"team-budget","key":"global",{LIMIT},"scope":"global",
                         "service":{{"cluster":"rate_limit_service","domain":"llm","timeout_ms":10000,
                                     "failure_mode":"deny"}}}}]}}"#
    )
}

/// Calls of the filter to the rate limit service (cluster `rate_limit_service`) this Envoy has
/// made, and completed.
fn service_calls(e: &Envoy) -> (u64, u64) {
    (e.stat("cluster.rate_limit_service.upstream_rq_total"), e.stat("cluster.rate_limit_service.upstream_rq_completed"))
}

/// What one request of [`spend`] showed.
#[derive(Debug, Clone, Copy)]
struct Spent {
    /// The budget's counter in Redis once the request's usage report landed (the service's hits).
    counter: u64,
    /// What is left as the admitted response showed it ([`REMAINING`]), when it did.
    remaining: Option<f64>,
}

impl Redis {
    /// The value of the one Limitador counter of rule `rule` in domain `llm`: its key is
    /// `namespace:{llm},,counter:` and the counter as JSON, which names the rule.
    fn counter(&self, rule: &str) -> u64 {
        let pattern = format!("namespace:{{llm}},*counter:*{rule}*");
        let keys = Redis::cli(self.port, &["--scan", "--pattern", &pattern]).expect("redis-cli --scan");
        let keys: Vec<&str> = keys.lines().collect();
        assert_eq!(keys.len(), 1, "one counter of {rule}: {keys:?}");
        let value = Redis::cli(self.port, &["get", keys[0]]).expect("redis-cli get");
        value.parse().unwrap_or_else(|_| panic!("counter {}: {value:?}", keys[0]))
    }
}

/// One request spending a fixed usage from the budget, once its usage report has landed. A
/// refusal because the service cannot be reached (Redis restarting: with failure_mode deny
/// nothing was counted) is sent again, for up to 10 s.
fn spend(e: &Envoy, redis: &Redis) -> Spent {
    let (before, _) = service_calls(e);
    // The mock sends no rate-limit headers of its own (it would send OpenAI's, with a constant
    // `x-ratelimit-remaining-tokens: 1999000`): any in the response is the filter's.
    let headers =
        [("x-mock-prompt-tokens", "1000"), ("x-mock-completion-tokens", "2000"), ("x-mock-ratelimit-style", "none")];
    let body = r#"{"model":"gpt-4o","max_tokens":2000,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut sent = 0;
    let r = common::eventually(Duration::from_secs(10), "an admitted request", || {
        sent += 1;
        let r = send(&client(), &e.url(CHAT), &headers, body);
        if r.status == 503 && r.body.contains("rate_limiter_unavailable") {
            return None;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        Some(r)
    });
    let answered = std::time::Instant::now();
    let remaining = r.header(REMAINING).map(|v| v.parse::<f64>().unwrap_or_else(|_| panic!("{REMAINING}: {v:?}")));
    assert!(remaining.is_some() || !REMAINING_REQUIRED, "no {REMAINING} on an admitted response: {:?}", r.headers);
    // The usage report leaves from the root context's timer after the response: wait until this
    // Envoy made it (a call beyond one per request sent) or a timer period went by, and every
    // call it made has completed.
    common::eventually(Duration::from_secs(10), "the usage report", || {
        let (total, completed) = service_calls(e);
        let reported = total > before + sent || answered.elapsed() > Duration::from_millis(1500);
        (reported && completed == total).then_some(())
    });
    Spent { counter: redis.counter("team-budget"), remaining }
}

/// Checks `after`, the first request after a restart, against the two requests before it: one
/// more request's cost is gone, no more (nothing given back) and no less (nothing lost).
fn assert_kept(before: [Spent; 2], after: Spent, what: &str) {
    let [a, b] = before;
    let cost = b.counter.checked_sub(a.counter).filter(|&c| c > 0).expect("a request costs hits");
    assert_eq!(after.counter, b.counter + cost, "{what}: the counter in Redis ({before:?}, then {after:?})");
    let (Some(a), Some(b), Some(after)) = (a.remaining, b.remaining, after.remaining) else {
        assert!(after.remaining.is_none(), "{what}: {REMAINING} on some responses only: {before:?} {after:?}");
        return;
    };
    assert!((a - b - PER_REQUEST).abs() < 1e-6, "one request's cost: {REMAINING} {a} then {b} ({before:?})");
    assert!((after - (b - PER_REQUEST)).abs() < 1e-6, "{what}: {REMAINING} = {after}, want {}", b - PER_REQUEST);
}

#[test]
fn a_global_budget_survives_killing_envoy_and_the_rate_limit_service() {
    let started = std::time::Instant::now();
    let (redis, mock) = (Redis::start(), Mock::start());
    let mut rls = Rls::start(&redis);
    let config = budget_config();
    let e = envoy(&mock, rls.port, &config);
    let before = [spend(&e, &redis), spend(&e, &redis)];
    // SIGKILL both (no shutdown of any kind); Redis stays. They come back on new ports.
    drop(e);
    rls.kill();
    let rls = Rls::start(&redis);
    let e = envoy(&mock, rls.port, &config);
    assert_kept(before, spend(&e, &redis), "after Envoy and llm-rls were killed and started again");
    assert_eq!(e.settled().sum("llm_ratelimit_service_errors_total", &[]), 0.0);
    println!("kept across killing Envoy and llm-rls ({before:?}) in {:?}", started.elapsed());
}

#[test]
fn a_global_budget_survives_restarting_redis_with_the_shipped_configuration() {
    let started = std::time::Instant::now();
    let mut redis = Redis::start_with_config(&root().join("envoy/redis.conf"));
    let mock = Mock::start();
    let rls = Rls::start(&redis);
    let e = envoy(&mock, rls.port, &budget_config());
    let first = spend(&e, &redis);
    let second = spend(&e, &redis);
    // Graceful: SHUTDOWN, then the same port and data directory. Envoy and llm-rls keep running
    // (llm-rls reconnects; a request refused meanwhile was not counted and is sent again).
    redis.restart();
    let third = spend(&e, &redis);
    assert_kept([first, second], third, "after a Redis SHUTDOWN and start");
    // A crash (SIGKILL) loses nothing Redis acknowledged either: it writes the append-only file
    // before it answers, and spend() waited for the answer to the usage report.
    redis.crash_and_restart();
    assert_kept([second, third], spend(&e, &redis), "after Redis was killed and started again");
    assert!(redis.dir.join("appendonlydir").is_dir(), "the shipped configuration persists with AOF");
    println!("kept across a Redis shutdown and a Redis crash in {:?}", started.elapsed());
}

#[test]
fn without_persistence_a_redis_restart_gives_the_budget_back() {
    // What the shipped configuration is for, and proof that the tests above would see a reset.
    let (mut redis, mock) = (Redis::start(), Mock::start());
    let rls = Rls::start(&redis);
    let e = envoy(&mock, rls.port, &budget_config());
    let fresh = spend(&e, &redis);
    assert!(spend(&e, &redis).counter > fresh.counter);
    redis.restart();
    let again = spend(&e, &redis);
    assert_eq!(again.counter, fresh.counter, "counted from zero again");
    assert_eq!(again.remaining, fresh.remaining);
}
