//! Memory under load (issue 14) through the real Envoy (`--concurrency 2`, as shipped) with the
//! shipped filter configuration (`envoy/envoy.yaml`'s block, limits included), each client with
//! its own API key so the shipped per-key limits never refuse one.
//!
//! - The storm: 300 concurrent non-streaming chat completions whose answers are brotli with a
//!   16 MiB window (lgwin 24), 20 MB of JSON (0.86 MB on the wire) with the usage at the end,
//!   trickled by the upstream in 4 KiB pieces 100 ms apart (about 21 s each), so that all 300
//!   are being decoded at the same time. A decoder's ring buffer grows with its output up to the
//!   window, so past 8 MiB of output each holds 16 MiB: 300 at once need about 2.4 GiB per
//!   worker's VM, whose memory proxy-wasm caps at 1 GiB. The filter must stay within its memory
//!   budget (`memory.max_stream_bytes_total`, 256 MiB per VM by default), metering what fits and
//!   counting the rest as `llm_meter_skips_total{reason="memory_budget"}`, while every client
//!   gets the upstream's bytes and the VMs live on.
//! - 1,000 concurrent trickled SSE streams whose requests get `include_usage` injected (the usage
//!   chunk is cut from the client's stream, so the stripper's lookahead is in use), and 1,000
//!   concurrent gzip SSE streams.
//!
//! Every phase checks: each client got exactly what the upstream sent (less the injected usage
//! chunk), every request is counted, tokens are exact for every metered request, nothing in
//! Envoy's log says the VM failed, `llm_meter_memory_bytes` returns to 0 and requests after the
//! load are metered. Envoy's configuration differs from the shipped one only in what 1,000
//! connections need: the listener's accept queue and the cluster's circuit breakers (Envoy's
//! defaults: 128 and 1024) are raised to 4096 ([`common::for_many_connections`]).
//!
//! The phases run one at a time (a lock), each with its own Envoy and mock: on two cores, load
//! from another phase would only blur the numbers.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{Envoy, Metrics, Mock};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Connections Envoy and the cluster are configured for.
const CONNECTIONS: u32 = 4096;
/// The default `memory.max_stream_bytes_total`, per VM.
const DEFAULT_BUDGET: f64 = 256.0 * 1048576.0;
/// Envoy's workers, each with its own VM (`--concurrency 2`, as `envoy/envoy.yaml` runs).
const WORKERS: f64 = 2.0;

const CHAT: &str = "/v1/chat/completions";
const STORM_CLIENTS: usize = 300;
const STORM_PROMPT: u64 = 11;
const STORM_OUTPUT: u64 = 7;
/// The storm's answer: 20 MB of JSON, brotli with a 16 MiB window, trickled.
const STORM_HEADERS: [(&str, &str); 7] = [
    ("x-mock-encoding", "br"),
    ("x-mock-brotli-lgwin", "24"),
    ("x-mock-pad-bytes", "20000000"),
    ("x-mock-prompt-tokens", "11"),
    ("x-mock-completion-tokens", "7"),
    ("x-mock-split", "4096"),
    ("x-mock-split-delay-ms", "100"),
];
const STREAMS: usize = 1000;
const STREAM_PROMPT: u64 = 9;
const STREAM_OUTPUT: u64 = 20;
/// A stream of 20 words written in pieces 50 ms apart (see [`PLAIN`] and [`GZIP`] for their
/// size): every event, the usage chunk included, arrives in several pieces, and a stream lasts
/// about 4 s, so the 1,000 are in flight together.
const STREAM_HEADERS: [(&str, &str); 3] =
    [("x-mock-prompt-tokens", "9"), ("x-mock-completion-tokens", "20"), ("x-mock-split-delay-ms", "50")];
/// The plain stream (5.8 KB) in 64-byte pieces.
const PLAIN: [(&str, &str); 1] = [("x-mock-split", "64")];
/// The gzip stream (0.9 KB; one sync flush per event) in 16-byte pieces.
const GZIP: [(&str, &str); 2] = [("x-mock-encoding", "gzip"), ("x-mock-split", "16")];

/// Envoy and the mock for a phase: the shipped filter configuration, ready for many connections.
fn start() -> (Mock, Envoy) {
    common::ensure_fd_limit(3 * STREAMS as u64 + 1000);
    let mock = Mock::start();
    let yaml =
        common::for_many_connections(&common::render_config(mock.port, &common::shipped_filter_config()), CONNECTIONS);
    let envoy = Envoy::try_start_yaml(&yaml).unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"));
    (mock, envoy)
}

/// A client with room for slow answers under load.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(240)))
        .build()
        .into()
}

/// POSTs `body`; the status and the raw body bytes (not decoded), or what went wrong.
fn fetch(agent: &ureq::Agent, url: &str, headers: &[(&str, &str)], body: &str) -> Result<(u16, Vec<u8>), String> {
    let mut req = agent.post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(body).map_err(|e| format!("send: {e}"))?;
    let status = resp.status().as_u16();
    let mut bytes = Vec::new();
    resp.body_mut()
        .as_reader()
        .read_to_end(&mut bytes)
        .map_err(|e| format!("body after {} bytes: {e}", bytes.len()))?;
    Ok((status, bytes))
}

fn chat_body(stream: bool, include_usage: bool) -> String {
    let mut v = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    if stream {
        v["stream"] = true.into();
    }
    if include_usage {
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v.to_string()
}

/// What one client saw.
enum Outcome {
    Intact,
    /// Status, length and why it is not what the upstream sent.
    Wrong(String),
}

/// Peaks sampled while a phase runs.
#[derive(Default, Debug)]
struct Peaks {
    memory_gauge: Option<f64>,
    rss: u64,
    active: f64,
}

/// Samples the memory gauge, active requests and Envoy's RSS every 100 ms until `done`.
fn sample(envoy: &Envoy, done: &AtomicBool) -> Peaks {
    let mut p = Peaks::default();
    while !done.load(Ordering::Relaxed) {
        if let Some((200, body)) = common::http_get(envoy.admin, "/stats/prometheus") {
            let m = Metrics::parse(&body);
            if let Some(v) = m.value("llm_meter_memory_bytes") {
                p.memory_gauge = Some(p.memory_gauge.unwrap_or(0.0).max(v));
            }
            p.active = p.active.max(m.sum("llm_active_requests", &[]));
        }
        p.rss = p.rss.max(rss(envoy.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Runs `n` clients at once (released together by a barrier), each `client(i)`, while sampling;
/// returns their outcomes, the peaks and the wall time.
fn run_clients(envoy: &Envoy, n: usize, client: impl Fn(usize) -> Outcome + Sync) -> (Vec<Outcome>, Peaks, Duration) {
    let barrier = Barrier::new(n);
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let (outcomes, peaks) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(envoy, &done));
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, client) = (&barrier, &client);
                std::thread::Builder::new()
                    .stack_size(512 << 10)
                    .spawn_scoped(s, move || {
                        barrier.wait();
                        client(i)
                    })
                    .expect("spawn client")
            })
            .collect();
        let outcomes: Vec<Outcome> = threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Outcome::Wrong("client panicked".into())))
            .collect();
        done.store(true, Ordering::Relaxed);
        (outcomes, sampler.join().expect("sampler"))
    });
    (outcomes, peaks, start.elapsed())
}

/// Polls `/stats/prometheus` until `done` holds or `timeout` passes; the last scrape either way
/// (the caller asserts, after printing what it found).
fn settle(envoy: &Envoy, timeout: Duration, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let start = Instant::now();
    loop {
        let m = envoy.metrics();
        if done(&m) {
            // The filter sends counter updates in batches: a scrape a flush interval after the
            // matching one has every update made before it.
            std::thread::sleep(common::FLUSH_INTERVAL + Duration::from_millis(60));
            return envoy.metrics();
        }
        if start.elapsed() > timeout {
            return m;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lines of Envoy's log that say the VM failed or ran out of memory.
fn vm_failures(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            ["RuntimeError", "memory allocation", "panicked", "unreachable", "failed"].iter().any(|w| l.contains(w))
        })
        .collect()
}

fn summary(outcomes: &[Outcome]) -> (usize, Vec<&str>) {
    let intact = outcomes.iter().filter(|o| matches!(o, Outcome::Intact)).count();
    let wrong: Vec<&str> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Wrong(why) => Some(why.as_str()),
            Outcome::Intact => None,
        })
        .collect();
    (intact, wrong)
}

/// How many wrong outcomes of each kind: a status, a body cut short, another failure.
fn kinds(wrong: &[&str]) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for w in wrong {
        let kind = if w.starts_with("status") {
            w.split(',').next().unwrap_or(w).to_string()
        } else if w.starts_with("body after") {
            "cut short".to_string()
        } else {
            w.split(':').next().unwrap_or(w).to_string()
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

fn mib(b: f64) -> f64 {
    b / 1048576.0
}

/// Requests after the load: 2 plain, 2 streams with injected usage, 2 small brotli lgwin-24
/// answers, each with 5 input and 3 output tokens, which the caller checks were metered. Returns
/// what was wrong with the answers (status, or bytes not the upstream's).
fn later_requests(envoy: &Envoy, mock: &Mock) -> Vec<String> {
    let agent = agent();
    let mut problems = Vec::new();
    let direct = format!("http://127.0.0.1:{}{CHAT}", mock.port);
    for i in 0..6 {
        let key = format!("Bearer later-{i}");
        let mut headers =
            vec![("authorization", key.as_str()), ("x-mock-prompt-tokens", "5"), ("x-mock-completion-tokens", "3")];
        let (body, kind) = match i {
            0 | 1 => (chat_body(false, false), "plain"),
            2 | 3 => (chat_body(true, false), "injected stream"),
            _ => {
                headers.extend([
                    ("x-mock-encoding", "br"),
                    ("x-mock-brotli-lgwin", "24"),
                    ("x-mock-pad-bytes", "100000"),
                ]);
                (chat_body(false, false), "brotli lgwin 24")
            }
        };
        match fetch(&agent, &envoy.url(CHAT), &headers, &body) {
            Ok((200, bytes)) => {
                let ok = match i {
                    0 | 1 => serde_json::from_slice::<serde_json::Value>(&bytes)
                        .is_ok_and(|v| v["usage"]["completion_tokens"] == 3),
                    2 | 3 => {
                        let text = String::from_utf8_lossy(&bytes);
                        text.ends_with("data: [DONE]\n\n") && !text.contains("\"usage\":{")
                    }
                    // Cached by the mock: the very bytes a direct request gets.
                    _ => fetch(&agent, &direct, &headers[1..], &body).is_ok_and(|(_, d)| d == bytes),
                };
                if !ok {
                    problems.push(format!("later request {i} ({kind}): body not intact ({} bytes)", bytes.len()));
                }
            }
            Ok((status, _)) => problems.push(format!("later request {i} ({kind}): status {status}")),
            Err(e) => problems.push(format!("later request {i} ({kind}): {e}")),
        }
    }
    problems
}

#[test]
fn storm_of_large_brotli_answers_stays_within_the_memory_budget() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mock, mut envoy) = start();
    let agent = agent();
    let url = envoy.url(CHAT);
    let body = chat_body(false, false);

    // What the upstream sends every client (the mock builds and compresses it once; this also
    // warms its cache): 20 MB of JSON ending with the usage, as brotli with a 16 MiB window.
    let direct = format!("http://127.0.0.1:{}{CHAT}", mock.port);
    let (status, reference) = fetch(&agent, &direct, &STORM_HEADERS, &body).expect("direct request to the mock");
    assert_eq!(status, 200);
    let mut decoded = Vec::new();
    brotli::Decompressor::new(&reference[..], 4096).read_to_end(&mut decoded).expect("brotli");
    assert!(decoded.len() > 20_000_000, "{}", decoded.len());
    assert_eq!(reference[0] & 0x0f, 0x0f, "WBITS 24");
    let v: serde_json::Value = serde_json::from_slice(&decoded).expect("JSON");
    assert_eq!((v["usage"]["prompt_tokens"].as_u64(), v["usage"]["completion_tokens"].as_u64()), (Some(11), Some(7)));
    assert!(String::from_utf8_lossy(&decoded[decoded.len() - 400..]).contains("\"usage\":{"), "usage at the end");
    drop((decoded, v));
    let rss_before = rss(envoy.pid());

    let (outcomes, peaks, took) = run_clients(&envoy, STORM_CLIENTS, |i| {
        let key = format!("Bearer storm-{i}");
        let mut headers: Vec<(&str, &str)> = STORM_HEADERS.to_vec();
        headers.push(("authorization", &key));
        match fetch(&agent, &url, &headers, &body) {
            Ok((200, bytes)) if bytes == reference => Outcome::Intact,
            Ok((status, bytes)) => Outcome::Wrong(format!(
                "status {status}, {} of {} bytes{}",
                bytes.len(),
                reference.len(),
                if bytes.len() == reference.len() { " (differing)" } else { "" }
            )),
            Err(e) => Outcome::Wrong(e),
        }
    });
    let (intact, wrong) = summary(&outcomes);
    let all = STORM_CLIENTS as f64;
    let m = settle(&envoy, Duration::from_secs(60), |m| {
        m.sum("llm_requests_total", &[]) >= all && m.value("llm_meter_memory_bytes") == Some(0.0)
    });
    let output = m.sum("llm_tokens_total", &[("token_type", "output")]);
    let input = m.sum("llm_tokens_total", &[("token_type", "input")]);
    let metered = output / STORM_OUTPUT as f64;
    let skipped = m.sum("llm_meter_skips_total", &[("reason", "memory_budget")]) + 0.0;
    let log = envoy.log();
    let failures = vm_failures(&log);
    println!(
        "storm: {STORM_CLIENTS} clients, {} bytes each on the wire ({} MB decoded), {:.1} s: {intact} intact, {} not; \
         llm_requests_total {}, metered {metered}, skipped (memory_budget) {skipped}, other skips {}, errors {}; \
         llm_meter_memory_bytes peak {}, after {:?}; llm_meter_memory_budget_bytes {:?}; peak active {}; \
         Envoy RSS {:.0} MiB before, peak {:.0} MiB",
        reference.len(),
        20,
        took.as_secs_f64(),
        wrong.len(),
        m.sum("llm_requests_total", &[]),
        m.sum("llm_meter_skips_total", &[]) - skipped,
        m.sum("llm_meter_errors_total", &[]),
        peaks.memory_gauge.map_or("absent".to_string(), |p| format!("{:.1} MiB", mib(p))),
        m.value("llm_meter_memory_bytes"),
        m.value("llm_meter_memory_budget_bytes"),
        peaks.active,
        mib(rss_before as f64),
        mib(peaks.rss as f64),
    );
    println!("  clients not intact, by kind: {:?}", kinds(&wrong));
    for w in wrong.iter().take(3) {
        println!("  a client got: {w}");
    }
    for l in failures.iter().take(10) {
        println!("  envoy log: {l}");
    }

    // Requests after the storm (before asserting on it, so a failure report shows both).
    let before = envoy.settled();
    let problems = later_requests(&envoy, &mock);
    let after = settle(&envoy, Duration::from_secs(10), |m| {
        m.sum("llm_requests_total", &[]) >= before.sum("llm_requests_total", &[]) + 6.0
    });
    let delta = |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    println!(
        "after the storm: 6 requests, {} counted, +{} input +{} output tokens (want 6, +30, +18); problems: {problems:?}",
        delta("llm_requests_total", &[]),
        delta("llm_tokens_total", &[("token_type", "input")]),
        delta("llm_tokens_total", &[("token_type", "output")]),
    );

    assert!(envoy.is_running(), "Envoy exited");
    assert!(failures.is_empty(), "Envoy's log says the VM failed ({} lines)", failures.len());
    assert_eq!(
        intact,
        STORM_CLIENTS,
        "clients that did not get the upstream's bytes: {:?}",
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(m.sum("llm_requests_total", &[]), all, "every request counted");
    assert_eq!(m.sum("llm_requests_total", &[("operation", "chat"), ("status", "200"), ("error_type", "none")]), all);
    assert_eq!(output, metered.floor() * STORM_OUTPUT as f64, "output tokens: 7 per metered request");
    assert_eq!(input, metered * STORM_PROMPT as f64, "input tokens: 11 per metered request");
    assert_eq!(metered + skipped, all, "each request metered or skipped for the memory budget");
    assert_eq!(m.sum("llm_meter_skips_total", &[]), skipped, "no other skips");
    assert_eq!(m.sum("llm_meter_errors_total", &[]), 0.0);
    assert_eq!(m.sum("llm_active_requests", &[]), 0.0);
    assert_eq!(m.value("llm_meter_memory_bytes"), Some(0.0), "llm_meter_memory_bytes back to 0");
    assert!(m.value("llm_meter_memory_budget_bytes").is_some_and(|b| b > 0.0), "llm_meter_memory_budget_bytes");
    let peak = peaks.memory_gauge.expect("llm_meter_memory_bytes sampled during the storm");
    assert!(peak > 0.0, "the storm's streams held memory");
    assert!(peak <= WORKERS * DEFAULT_BUDGET, "peak {:.1} MiB over the two VMs' budgets", mib(peak));

    // The VMs live on: later requests are metered, and intact.
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(delta("llm_requests_total", &[]), 6.0, "6 later requests counted");
    assert_eq!(delta("llm_tokens_total", &[("token_type", "input")]), 30.0, "6 × 5 input tokens metered");
    assert_eq!(delta("llm_tokens_total", &[("token_type", "output")]), 18.0, "6 × 3 output tokens metered");
    assert!(vm_failures(&envoy.log()).is_empty());
}

/// `text` with the mock's per-answer values (`chatcmpl-mock` sequence numbers and `created`
/// timestamps) blanked, so answers to identical requests compare equal.
fn normalized(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let next = ["chatcmpl-mock", "\"created\":"].iter().filter_map(|m| rest.find(m).map(|at| (at, m.len()))).min();
        let Some((at, len)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..at + len]);
        rest = rest[at + len..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('#');
    }
}

/// The SSE events of `text` except the usage-only chunk (`"choices":[]` with a usage object).
fn without_usage_chunk(text: &str) -> String {
    text.split_inclusive("\n\n").filter(|e| !(e.contains("\"choices\":[]") && e.contains("\"usage\":{"))).collect()
}

fn gunzip(bytes: &[u8]) -> Result<String, String> {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes).read_to_string(&mut out).map_err(|e| format!("gunzip: {e}"))?;
    Ok(out)
}

/// 1,000 streams at once; `expected` is what each client must read (normalized), `decode`
/// turns its bytes into text.
fn streams(
    what: &str,
    request: &str,
    extra: &[(&'static str, &'static str)],
    expected: &str,
    decode: fn(&[u8]) -> Result<String, String>,
) {
    let (mock, envoy) = start();
    let agent = agent();
    let url = envoy.url(CHAT);
    let (outcomes, peaks, took) = run_clients(&envoy, STREAMS, |i| {
        let key = format!("Bearer stream-{i}");
        let mut headers: Vec<(&str, &str)> = STREAM_HEADERS.to_vec();
        headers.extend_from_slice(extra);
        headers.push(("authorization", &key));
        match fetch(&agent, &url, &headers, request) {
            Ok((200, bytes)) => match decode(&bytes) {
                Ok(text) if normalized(&text) == expected => Outcome::Intact,
                Ok(text) => Outcome::Wrong(format!("{} bytes, not the upstream's stream:\n{text}", bytes.len())),
                Err(e) => Outcome::Wrong(format!("{} bytes: {e}", bytes.len())),
            },
            Ok((status, bytes)) => Outcome::Wrong(format!("status {status}: {}", String::from_utf8_lossy(&bytes))),
            Err(e) => Outcome::Wrong(e),
        }
    });
    let (intact, wrong) = summary(&outcomes);
    let all = STREAMS as f64;
    let m = settle(&envoy, Duration::from_secs(30), |m| {
        m.sum("llm_requests_total", &[]) >= all && m.value("llm_meter_memory_bytes") == Some(0.0)
    });
    let failures = vm_failures(&envoy.log()).into_iter().map(str::to_string).collect::<Vec<_>>();
    println!(
        "{what}: {STREAMS} streams, {:.1} s: {intact} intact, {} not; llm_requests_total {}, tokens {} input {} output, \
         skips {}, errors {}; peak active {}; llm_meter_memory_bytes peak {}, after {:?}; Envoy RSS peak {:.0} MiB",
        took.as_secs_f64(),
        wrong.len(),
        m.sum("llm_requests_total", &[]),
        m.sum("llm_tokens_total", &[("token_type", "input")]),
        m.sum("llm_tokens_total", &[("token_type", "output")]),
        m.sum("llm_meter_skips_total", &[]) + 0.0,
        m.sum("llm_meter_errors_total", &[]),
        peaks.active,
        peaks.memory_gauge.map_or("absent".to_string(), |p| format!("{:.2} MiB", mib(p))),
        m.value("llm_meter_memory_bytes"),
        mib(peaks.rss as f64),
    );
    println!("  clients not intact, by kind: {:?}", kinds(&wrong));
    for w in wrong.iter().take(3) {
        println!("  a client got: {w}");
    }
    assert!(failures.is_empty(), "Envoy's log says the VM failed: {:?}", &failures[..failures.len().min(10)]);
    assert_eq!(intact, STREAMS, "clients that did not get the upstream's stream: {:?}", &wrong[..wrong.len().min(3)]);
    assert_eq!(m.sum("llm_requests_total", &[("operation", "chat"), ("status", "200"), ("error_type", "none")]), all);
    assert_eq!(m.sum("llm_requests_total", &[]), all);
    assert_eq!(m.sum("llm_tokens_total", &[("token_type", "input")]), all * STREAM_PROMPT as f64);
    assert_eq!(m.sum("llm_tokens_total", &[("token_type", "output")]), all * STREAM_OUTPUT as f64);
    assert_eq!(m.sum("llm_usage_missing_total", &[]), 0.0);
    assert_eq!(m.sum("llm_meter_skips_total", &[]), 0.0);
    assert_eq!(m.sum("llm_meter_errors_total", &[]), 0.0);
    assert_eq!(m.sum("llm_active_requests", &[]), 0.0);
    assert!(peaks.active >= 0.8 * all, "only {} streams were in flight at once", peaks.active);
    assert_eq!(m.value("llm_meter_memory_bytes"), Some(0.0), "llm_meter_memory_bytes back to 0");
    assert!(peaks.memory_gauge.is_some(), "llm_meter_memory_bytes sampled during the load");
    let problems = later_requests(&envoy, &mock);
    assert!(problems.is_empty(), "{problems:?}");
    let after = settle(&envoy, Duration::from_secs(10), |m| m.sum("llm_requests_total", &[]) >= all + 6.0);
    assert_eq!(after.sum("llm_tokens_total", &[("token_type", "output")]), all * STREAM_OUTPUT as f64 + 18.0);
}

/// What the mock sends for `request` with `extra` headers, straight from it (no Envoy).
fn upstream_sends(request: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mock = Mock::start();
    let mut headers = STREAM_HEADERS.to_vec();
    headers.extend_from_slice(extra);
    let (status, bytes) =
        fetch(&agent(), &format!("http://127.0.0.1:{}{CHAT}", mock.port), &headers, request).expect("direct request");
    assert_eq!(status, 200);
    bytes
}

#[test]
fn thousand_streams_with_injected_usage_keep_their_bytes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Envoy forwards the request with include_usage added: that is what the mock answers.
    let sent = String::from_utf8(upstream_sends(&chat_body(true, true), &PLAIN)).expect("UTF-8");
    assert!(sent.contains("\"choices\":[]") && sent.contains("\"usage\":null"), "{sent}");
    let expected = normalized(&without_usage_chunk(&sent));
    assert!(expected.len() < sent.len() && expected.ends_with("data: [DONE]\n\n"));
    streams("injected include_usage", &chat_body(true, false), &PLAIN, &expected, |b| {
        String::from_utf8(b.to_vec()).map_err(|e| e.to_string())
    });
}

#[test]
fn thousand_gzip_streams_keep_their_bytes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let expected = normalized(&gunzip(&upstream_sends(&chat_body(true, true), &GZIP)).expect("gzip"));
    assert!(expected.contains("\"usage\":{\"completion_tokens\":20"), "{expected}");
    streams("gzip", &chat_body(true, true), &GZIP, &expected, gunzip);
}
