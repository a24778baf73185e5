//! What Envoy 1.40 does when the filter's Wasm VM fails (issue 14), measured with the test-only
//! build that traps on demand (cargo feature `trap-on-demand`, `just build-trap`: the request
//! header `x-llm-meter-trap` names the callback that traps) in the shipped `envoy/envoy.yaml`
//! with `--concurrency 2`.
//!
//! Envoy runs one VM per worker thread, so each test pins raw HTTP/1.1 connections to a worker
//! (Envoy's per-worker accepted-connection counters tell which) and makes each worker's VM fail
//! in turn, with streaming responses in flight on both workers. Every request carries its own
//! `x-app-id`, so `llm_requests_total{app=…}` says exactly which requests were metered.
//!
//! - The shipped policy, `FAIL_RELOAD` (with a 100 ms reload backoff): the streams in flight on
//!   the failed worker are cut, the trapping request fails, and the next request on that worker
//!   gets a fresh VM: traffic flows and every later request is metered, exactly.
//! - `FAIL_OPEN`, recorded so that a change in Envoy is noticed: the same cuts, then the filter is
//!   skipped on that worker for good: traffic flows, unmetered, and no Envoy stat moves.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{
    raw_post, read_reply, render_config_with_wasm, root, trap_wasm, Envoy, Metrics, Mock, RawReply, DEFAULT_CONFIG,
};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";
const TRAP: &str = "x-llm-meter-trap";
const RELOADED: &str = "envoy_wasm_llm_meter_vm_reload_success";
const RELOAD_FAILED: &str = "envoy_wasm_llm_meter_vm_reload_failure";
const BACKOFF: &str = "envoy_wasm_llm_meter_vm_reload_backoff";
const VMS_CREATED: &str = "envoy_wasm_envoy_wasm_runtime_v8_created";
const VMS_ACTIVE: &str = "envoy_wasm_envoy_wasm_runtime_v8_active";

fn chat(stream: bool) -> String {
    serde_json::json!({"model": "gpt-4o", "stream": stream, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string()
}

/// The shipped envoy.yaml running the trap-on-demand build, with `policy` as its failure policy
/// (`None`: the shipped one, which must be FAIL_RELOAD with a 100 ms backoff).
fn start(policy: Option<&str>) -> (Mock, Envoy) {
    let mock = Mock::start();
    let mut yaml = render_config_with_wasm(mock.port, DEFAULT_CONFIG, &trap_wasm());
    let shipped = "failure_policy: FAIL_RELOAD\n";
    let backoff = "                reload_config: { backoff: { base_interval: 0.1s } }\n";
    assert_eq!(yaml.matches(shipped).count(), 1, "envoy.yaml ships FAIL_RELOAD");
    assert_eq!(yaml.matches(backoff).count(), 1, "envoy.yaml ships a 100 ms reload backoff");
    if let Some(policy) = policy {
        yaml = yaml.replace(shipped, &format!("failure_policy: {policy}\n")).replace(backoff, "");
    }
    let envoy = Envoy::try_start_yaml(&yaml).unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"));
    (mock, envoy)
}

fn requests(m: &Metrics, app: &str) -> f64 {
    m.sum("llm_requests_total", &[("app", app)])
}

fn stat(envoy: &Envoy, name: &str) -> f64 {
    envoy.metrics().value(name).unwrap_or_else(|| panic!("{name} not in /stats/prometheus"))
}

/// Waits until `llm_requests_total{app}` is `want`.
fn wait_requests(envoy: &Envoy, app: &str, want: f64) {
    common::eventually(Duration::from_secs(10), &format!("llm_requests_total{{app={app:?}}} = {want}"), || {
        (requests(&envoy.metrics(), app) == want).then_some(())
    });
}

/// A streaming chat request on its own connection to `worker`, 30 events 100 ms apart (3 s),
/// read to its end on a thread once its response has started flowing through the filter.
fn slow_stream(envoy: &Envoy, worker: usize, app: &str) -> JoinHandle<RawReply> {
    let mut s = envoy.connect_on_worker(worker);
    let headers = [("x-app-id", app), ("x-mock-completion-tokens", "30"), ("x-mock-chunk-delay-ms", "100")];
    raw_post(&mut s, CHAT, &headers, &chat(true)).expect("send");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.peek(&mut [0u8; 1]).expect("the response started");
    std::thread::spawn(move || read_reply(&mut s, Duration::from_secs(15)))
}

/// One request on a fresh connection to `worker`.
fn request_on(envoy: &Envoy, worker: usize, headers: &[(&str, &str)], stream: bool) -> RawReply {
    let mut s = envoy.connect_on_worker(worker);
    raw_post(&mut s, CHAT, headers, &chat(stream)).expect("send");
    read_reply(&mut s, Duration::from_secs(15))
}

/// What the clients got when worker `worker`'s VM trapped in `callback`.
struct Failure {
    /// Streams open on the failed worker when it trapped.
    victims: Vec<RawReply>,
    /// A stream open on the other worker meanwhile.
    bystander: RawReply,
    /// The request that trapped.
    trapped: RawReply,
    /// Requests sent to the failed worker afterwards, one connection each.
    later: Vec<RawReply>,
}

const LATER: usize = 5;

/// Opens two slow streams on `worker` and one on the other worker, makes `worker`'s VM trap in
/// `callback` while they flow, then sends [`LATER`] requests to `worker`. Apps: `<tag>-victim`,
/// `<tag>-bystander`, `<tag>-trap`, `<tag>-later`.
fn fail_worker(envoy: &Envoy, worker: usize, callback: &str, tag: &str) -> Failure {
    let victim_app = format!("{tag}-victim");
    let bystander_app = format!("{tag}-bystander");
    let victims = [slow_stream(envoy, worker, &victim_app), slow_stream(envoy, worker, &victim_app)];
    let bystander = slow_stream(envoy, 1 - worker, &bystander_app);
    std::thread::sleep(Duration::from_millis(300));
    let trap_app = format!("{tag}-trap");
    // A response body to trap in needs a response with a body: a stream, like the victims.
    let trapped = request_on(envoy, worker, &[("x-app-id", &trap_app), (TRAP, callback)], true);
    let later_app = format!("{tag}-later");
    let later = (0..LATER).map(|_| request_on(envoy, worker, &[("x-app-id", &later_app)], false)).collect();
    let join = |h: JoinHandle<RawReply>| h.join().expect("stream thread");
    Failure { victims: victims.map(join).into(), bystander: join(bystander), trapped, later }
}

/// A stream cut by the VM failure: its head (200) and the events before the failure arrived,
/// then nothing: no last chunk, no `[DONE]`, and the connection closed (about 1 s later: the
/// HTTP connection manager's delayed close).
fn assert_cut(r: &RawReply, what: &str) {
    assert_eq!(r.status, 200, "{what}: {r:?}");
    assert!(!r.complete && r.closed, "{what}: the stream is cut: {r:?}");
    assert!(!r.text().contains("[DONE]"), "{what}: the events before the failure only: {}", r.text());
}

fn assert_whole_stream(r: &RawReply, what: &str) {
    assert!(r.complete, "{what}: {r:?}");
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{what}: {}", r.text());
}

/// What the trapping request gets: before the response started, a 503 from Envoy with an empty
/// body (even when the upstream had answered: a trap in the response headers), and
/// `connection: close` when its body was not read; in the response body, the client has the 200
/// head and nothing of the body (it trapped in the first chunk), then the connection closes.
fn assert_trapped(r: &RawReply, callback: &str) {
    if callback == "response-body" {
        assert_eq!((r.status, r.body.len(), r.complete, r.closed), (200, 0, false, true), "{r:?}");
    } else {
        assert_eq!((r.status, r.body.len()), (503, 0), "{callback}: {r:?}");
        if callback == "request-headers" {
            // The request body was never read: the connection cannot be reused.
            assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        }
    }
}

fn assert_log(envoy: &Envoy, callback: &str) {
    let function = format!("proxy_on_{}", callback.replace('-', "_"));
    let line = format!("Function: {function} failed: Uncaught RuntimeError: unreachable");
    assert!(envoy.log().contains(&line), "{line:?} not in Envoy's log:\n{}", envoy.log());
}

#[test]
fn shipped_fail_reload_cuts_the_failed_workers_streams_then_meters_every_later_request() {
    let (_mock, envoy) = start(None);
    let before = envoy.metrics();
    assert_eq!(before.value(VMS_ACTIVE), Some(4.0), "VMs alive at start");
    let created = before.value(VMS_CREATED).expect("VMs created");

    for (phase, (worker, callback)) in [(0, "request-headers"), (1, "response-body")].into_iter().enumerate() {
        let tag = format!("reload-w{worker}");
        let f = fail_worker(&envoy, worker, callback, &tag);
        for v in &f.victims {
            assert_cut(v, "a stream in flight on the failed worker");
        }
        assert_whole_stream(&f.bystander, "the stream on the other worker");
        assert_trapped(&f.trapped, callback);
        assert_log(&envoy, callback);
        // Traffic flows on the failed worker again at once: the first later request got a new VM.
        for r in &f.later {
            assert_eq!((r.status, r.complete), (200, true), "{r:?}");
        }
        // And every one of them is metered, exactly; the other worker meters as before.
        wait_requests(&envoy, &format!("{tag}-later"), LATER as f64);
        wait_requests(&envoy, &format!("{tag}-bystander"), 1.0);
        // What the dead VM had in flight is never metered (not even as failed).
        let m = envoy.metrics();
        assert_eq!(requests(&m, &format!("{tag}-victim")), 0.0);
        assert_eq!(requests(&m, &format!("{tag}-trap")), 0.0);
        // One reload per failure, a VM created for it, the dead one gone.
        let n = (phase + 1) as f64;
        assert_eq!(m.value(RELOADED), Some(n), "{RELOADED}");
        assert_eq!(m.value(RELOAD_FAILED), Some(0.0));
        assert_eq!(m.value(BACKOFF), Some(0.0));
        assert_eq!(m.value(VMS_CREATED), Some(created + n));
        assert_eq!(m.value(VMS_ACTIVE), Some(4.0));
        // The legacy counter of the earlier alert never moves in Envoy 1.40.
        assert_eq!(m.value("envoy_wasm_llm_meter_vm_reload"), Some(0.0));
    }

    // A VM that fails again right after its reload: Envoy reloads a failed VM at the next
    // request unless its last load was less than the backoff ago (100-150 ms shipped, jittered;
    // Envoy's default is 1-1.5 s). Meanwhile that worker answers 503, each counted in
    // vm_reload_backoff; then the next request reloads it and is metered.
    let reloaded = stat(&envoy, RELOADED);
    let backoff = stat(&envoy, BACKOFF);
    let trap = request_on(&envoy, 0, &[("x-app-id", "again-trap1"), (TRAP, "request-body")], false);
    assert_trapped(&trap, "request-body");
    assert_log(&envoy, "request-body");
    let first = request_on(&envoy, 0, &[("x-app-id", "again-first")], false);
    assert_eq!(first.status, 200, "the last load was long ago: reloaded at once: {first:?}");
    let trap = request_on(&envoy, 0, &[("x-app-id", "again-trap2"), (TRAP, "request-headers")], false);
    assert_trapped(&trap, "request-headers");
    let trapped_at = Instant::now();
    let mut refused = 0.0;
    let first_ok = loop {
        let r = request_on(&envoy, 0, &[("x-app-id", "again-later")], false);
        match r.status {
            200 => break trapped_at.elapsed(),
            503 => {
                assert_eq!((r.body.len(), r.header("connection")), (0, Some("close")), "{r:?}");
                refused += 1.0;
            }
            _ => panic!("{r:?}"),
        }
        assert!(trapped_at.elapsed() < Duration::from_secs(3), "no 200 within 3 s of the failure");
    };
    eprintln!("VM failed again right after its reload: {refused} requests got 503, the first 200 after {first_ok:?}");
    assert!(first_ok < Duration::from_millis(900), "the shipped 100 ms backoff, not Envoy's 1 s: {first_ok:?}");
    wait_requests(&envoy, "again-first", 1.0);
    wait_requests(&envoy, "again-later", 1.0);
    let m = envoy.metrics();
    assert_eq!(m.value(BACKOFF), Some(backoff + refused), "every 503 is a reload put off by the backoff");
    assert_eq!(m.value(RELOADED), Some(reloaded + 2.0));
    assert_eq!(m.value(RELOAD_FAILED), Some(0.0));
    for app in ["again-trap1", "again-trap2"] {
        assert_eq!(requests(&m, app), 0.0, "{app}");
    }
}

#[test]
fn fail_open_cuts_the_failed_workers_streams_then_passes_its_traffic_unmetered_for_good() {
    let (_mock, envoy) = start(Some("FAIL_OPEN"));
    let created = stat(&envoy, VMS_CREATED);

    for (phase, (worker, callback)) in [(0, "response-headers"), (1, "request-body")].into_iter().enumerate() {
        let tag = format!("open-w{worker}");
        let f = fail_worker(&envoy, worker, callback, &tag);
        for v in &f.victims {
            assert_cut(v, "a stream in flight on the failed worker");
        }
        assert_whole_stream(&f.bystander, "the stream on the other worker");
        assert_trapped(&f.trapped, callback);
        assert_log(&envoy, callback);
        // Traffic flows on the failed worker...
        for r in &f.later {
            assert_eq!((r.status, r.complete), (200, true), "{r:?}");
        }
        // ...without the filter: a trap request passes too, and nothing is metered there.
        let passes = request_on(&envoy, worker, &[("x-app-id", &format!("{tag}-trap-again")), (TRAP, callback)], true);
        assert_eq!((passes.status, passes.complete), (200, true), "{passes:?}");
        let m = envoy.settled();
        if phase == 0 {
            // Worker 1 still meters: its VM is fine (the failed worker would have by now).
            wait_requests(&envoy, &format!("{tag}-bystander"), 1.0);
        } else {
            // Worker 0, failed in phase 0, still does not.
            assert_eq!(requests(&m, &format!("{tag}-bystander")), 0.0);
        }
        for app in ["later", "victim", "trap", "trap-again"] {
            assert_eq!(requests(&m, &format!("{tag}-{app}")), 0.0, "{tag}-{app}");
        }
        // Envoy counts nothing: no reload, no VM created or destroyed.
        for name in [RELOADED, RELOAD_FAILED, BACKOFF, "envoy_wasm_llm_meter_vm_reload"] {
            assert_eq!(m.value(name), Some(0.0), "{name}");
        }
        assert_eq!(m.value(VMS_CREATED), Some(created));
        assert_eq!(m.value(VMS_ACTIVE), Some(4.0));
    }
}

/// The hook is compiled into the test-only build and nowhere else.
#[test]
fn only_the_test_build_has_the_trap_hook() {
    let release = root().join("target/wasm32-wasip1/release/llm_meter.wasm");
    let release = std::fs::read(&release).unwrap_or_else(|e| panic!("{}: {e} (run `just build`)", release.display()));
    let trap = std::fs::read(trap_wasm()).expect("trap build");
    let has = |wasm: &[u8]| wasm.windows(TRAP.len()).any(|w| w == TRAP.as_bytes());
    assert!(has(&trap), "the test build reads {TRAP}");
    assert!(!has(&release), "the release build must not contain the trap-on-demand hook ({TRAP})");
}
