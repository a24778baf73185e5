//! Per-request records through the real Envoy: the filter publishes each metered exchange as
//! filter state `wasm.llm_meter`, and the shipped `envoy/envoy.yaml` prints it in the `llm` field
//! of its JSON access log (`%FILTER_STATE(wasm.llm_meter:TYPED)%`). For every kind of exchange
//! (OpenAI chat and streams, Anthropic, Gemini, a client leaving mid-stream, an upstream 429, a
//! rejection by a local limit, a route timeout) the record must carry exactly what the counters
//! of `/stats/prometheus` moved by for that request: tokens, cost, status and error type; time
//! per output token exactly for streams of two or more output tokens (record and histogram); a
//! hash of the API key, never the key. `tools/llm_cost.py` run on the same log must agree with
//! the counters.
//!
//! Each scenario has an `app` of its own, so its counter series (model, app) are its own and the
//! cost counter's carried fraction starts from 0. Requests of one test go over one keep-alive
//! connection (one Envoy worker), so a series' cost counter is the floor of the summed record
//! costs. Envoy writes its access log in batches (every 10 s by default, see `wait_for_lines`):
//! the records are read once every request of a test was sent and measured.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::{client, eventually, render_config, send, Envoy, Metrics, Mock};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CHAT: &str = "/v1/chat/completions";

/// Prices in USD per 1M tokens, i.e. micro-USD per token.
const PRICING: &str = r#""pricing": {
    "gpt-4o": {"input": 2.5, "output": 10, "cached_input": 1.25},
    "gpt-4o-mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075},
    "claude-sonnet-4-5": {"input": 3, "output": 15, "cached_input": 0.3, "cache_creation_input": 3.75},
    "gemini-2.5-flash": {"input": 0.3, "output": 2.5, "cached_input": 0.075}
  }"#;

const TOKEN_TYPES: [(&str, &str); 5] = [
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cached_input", "cached_input_tokens"),
    ("cache_creation_input", "cache_creation_input_tokens"),
    ("reasoning", "reasoning_tokens"),
];

fn config(extra: &str) -> String {
    format!("{{\n  \"metrics\": {{\"app_header\": \"x-app-id\"}},\n  {PRICING}{extra}\n}}")
}

/// A key nobody else uses, so that finding it anywhere in Envoy's log is a leak.
fn api_key(scenario: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("Bearer sk-records-{scenario}-{}-{nanos:x}", std::process::id())
}

fn request_id(scenario: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("records-{scenario}-{nanos:x}")
}

/// The first 12 hex digits of SHA-256 of the header value.
fn sha12(value: &str) -> String {
    Sha256::digest(value.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn chat_body(model: &str, stream: bool) -> String {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]});
    if stream {
        v["stream"] = true.into();
        v["stream_options"] = json!({"include_usage": true});
    }
    v.to_string()
}

fn anthropic_body(stream: bool) -> String {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": stream,
           "messages": [{"role": "user", "content": "Hello, Claude"}]})
    .to_string()
}

fn gemini_body() -> String {
    json!({"contents": [{"role": "user", "parts": [{"text": "Explain"}]}]}).to_string()
}

/// What a scenario must produce.
#[derive(Clone, Debug)]
struct Want {
    model: &'static str,
    operation: &'static str,
    provider: &'static str,
    stream: bool,
    status: u16,
    error_type: &'static str,
    /// input, output, cached_input, cache_creation_input, reasoning; `None`: no usage.
    tokens: Option<[u64; 5]>,
    /// The record's cost, micro-USD (by hand from the prices above).
    cost: Option<f64>,
    rejected_by: Option<&'static str>,
}

impl Want {
    fn ok(model: &'static str, operation: &'static str, provider: &'static str, stream: bool) -> Want {
        Want {
            model,
            operation,
            provider,
            stream,
            status: 200,
            error_type: "none",
            tokens: None,
            cost: None,
            rejected_by: None,
        }
    }
    fn tokens(mut self, t: [u64; 5], cost: f64) -> Want {
        self.tokens = Some(t);
        self.cost = Some(cost);
        self
    }
    fn failed(mut self, status: u16, error_type: &'static str) -> Want {
        self.status = status;
        self.error_type = error_type;
        self
    }
    /// Time per output token is due: a stream with at least 2 output tokens.
    fn tpot(&self) -> bool {
        self.stream && self.tokens.is_some_and(|t| t[1] >= 2)
    }
}

/// One request sent, with `/stats/prometheus` just before it and once it was wholly accounted.
struct Sent {
    name: &'static str,
    app: &'static str,
    key: String,
    request_id: String,
    want: Want,
    before: Metrics,
    after: Metrics,
    http_status: u16,
}

/// Sends requests and keeps what the checks need.
struct Driver<'a> {
    envoy: &'a Envoy,
    agent: ureq::Agent,
    sent: Vec<Sent>,
}

impl<'a> Driver<'a> {
    fn new(envoy: &'a Envoy) -> Driver<'a> {
        Driver { envoy, agent: client(), sent: Vec::new() }
    }

    /// Runs `send` (which returns the HTTP status the client saw) between two scrapes. The
    /// second waits until the request's duration histogram moved: the filter records it in the
    /// callback that also moves every counter and publishes the record, and Envoy merges
    /// histograms into `/stats/prometheus` at its next flush (0.2 s here), so by then the
    /// whole exchange is accounted.
    fn measure(
        &mut self,
        name: &'static str,
        app: &'static str,
        key: String,
        request_id: String,
        want: Want,
        send: impl FnOnce(&ureq::Agent) -> u16,
    ) {
        let series = format!(r#"llm_request_duration_ms_count{{model="{}"}}"#, want.model);
        let before = self.envoy.settled();
        let n = before.value(&series).unwrap_or(0.0);
        let http_status = send(&self.agent);
        let after = self.envoy.wait_value(&series, n + 1.0);
        self.sent.push(Sent { name, app, key, request_id, want, before, after, http_status });
    }

    /// A POST through the shared keep-alive connection, with the scenario's app, key and id.
    fn post(
        &mut self,
        name: &'static str,
        app: &'static str,
        path: &str,
        mock: &[(&'static str, &'static str)],
        body: &str,
        want: Want,
    ) {
        let key = api_key(name);
        let id = request_id(name);
        let url = self.envoy.url(path);
        let mut headers = vec![("authorization", key.as_str()), ("x-app-id", app), ("x-request-id", id.as_str())];
        headers.extend_from_slice(mock);
        let headers: Vec<(&str, &str)> = headers;
        let want_status = want.status;
        self.measure(name, app, key.clone(), id.clone(), want, |agent| {
            let r = send(agent, &url, &headers, body);
            assert_eq!(r.status, want_status, "{name}: {}", r.body);
            r.status
        });
    }
}

fn counter(m: &Metrics, series: &str) -> f64 {
    m.value(series).unwrap_or(0.0)
}

fn requests_series(model: &str, app: &str, op: &str, status: u64, error: &str) -> String {
    format!(
        r#"llm_requests_total{{model="{model}",app="{app}",operation="{op}",status="{status}",error_type="{error}"}}"#
    )
}

/// The access log lines of Envoy's log (stdout and stderr share the file), by request id.
fn access_log(envoy: &Envoy) -> BTreeMap<String, Value> {
    envoy
        .log()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("access log line is no JSON ({e}): {l}")))
        .map(|v| (v["request_id"].as_str().unwrap_or_default().to_string(), v))
        .collect()
}

/// Waits until the access log has a line for each id; returns the lines by id. Envoy writes
/// access logs in batches: when 64 KiB are pending or every `--file-flush-interval-msec`, 10 s by
/// default (the harness does not change it), so this usually waits several seconds.
fn wait_for_lines(envoy: &Envoy, ids: &[&str]) -> BTreeMap<String, Value> {
    eventually(Duration::from_secs(20), "every request's access log line", || {
        let lines = access_log(envoy);
        ids.iter().all(|id| lines.contains_key(*id)).then_some(lines)
    })
}

/// The record (the Struct's fields) of an access log line; panics unless it is the typed form.
fn record_of<'v>(line: &'v Value, name: &str) -> &'v serde_json::Map<String, Value> {
    let llm = &line["llm"];
    assert_eq!(llm["@type"], "type.googleapis.com/google.protobuf.Struct", "{name}: {line}");
    llm["value"].as_object().unwrap_or_else(|| panic!("{name}: no record in {line}"))
}

fn num(rec: &serde_json::Map<String, Value>, field: &str) -> Option<f64> {
    rec.get(field).map(|v| v.as_f64().unwrap_or_else(|| panic!("{field} is not a number: {v}")))
}

/// Like `assert_eq!`, but adds the failure to `$fails` (a `Vec<String>`), so that one run shows
/// every mismatch of every scenario.
macro_rules! check_eq {
    ($fails:expr, $got:expr, $want:expr, $($msg:tt)+) => {{
        match (&$got, &$want) {
            (got, want) if got != want => $fails.push(format!("{}: got {got:?}, want {want:?}", format!($($msg)+))),
            _ => {}
        }
    }};
}

/// Checks every scenario's record against its expectations and against what the counters moved
/// by (all of them, then fails listing every mismatch with the log lines); returns the records
/// by scenario.
fn check_records(envoy: &Envoy, sent: &[Sent]) -> BTreeMap<&'static str, serde_json::Map<String, Value>> {
    let ids: Vec<&str> = sent.iter().map(|s| s.request_id.as_str()).collect();
    let lines = wait_for_lines(envoy, &ids);
    // Running sums of the records' costs per (model, app), in pico-USD: the counter is its floor.
    let mut cost_sums: BTreeMap<(String, String), u128> = BTreeMap::new();
    let mut records = BTreeMap::new();
    let mut report = Vec::new();
    for s in sent {
        let line = &lines[&s.request_id];
        let rec = record_of(line, s.name);
        let n = s.name;
        let w = &s.want;
        let mut fails: Vec<String> = Vec::new();
        let str_of = |f: &str| rec.get(f).and_then(Value::as_str);

        // Who and what.
        check_eq!(fails, str_of("app"), Some(s.app), "{n}: app");
        check_eq!(fails, str_of("model"), Some(w.model), "{n}: model");
        check_eq!(fails, str_of("model_label"), Some(w.model), "{n}: model_label");
        check_eq!(fails, str_of("request_model"), Some(w.model), "{n}: request_model");
        check_eq!(fails, str_of("operation"), Some(w.operation), "{n}: operation");
        check_eq!(fails, str_of("provider"), Some(w.provider), "{n}: provider");
        check_eq!(fails, rec.get("stream").and_then(Value::as_bool), Some(w.stream), "{n}: stream");
        check_eq!(
            fails,
            str_of("key_hash"),
            Some(sha12(&s.key).as_str()),
            "{n}: key_hash = sha256(authorization)[..12]"
        );
        check_eq!(fails, str_of("rejected_by"), w.rejected_by, "{n}: rejected_by");
        check_eq!(fails, line["response_code"].as_u64(), Some(u64::from(s.http_status)), "{n}: response_code");

        // Status and error type: the record's labels name the requests_total series that moved,
        // by one, and no other series of this app moved.
        let status = num(rec, "status").unwrap_or(-1.0);
        let error = str_of("error_type").unwrap_or("(absent)");
        check_eq!(fails, (status, error), (f64::from(w.status), w.error_type), "{n}: status, error_type");
        let series = requests_series(w.model, s.app, w.operation, status as u64, error);
        let moved = counter(&s.after, &series) - counter(&s.before, &series);
        check_eq!(fails, moved, 1.0, "{n}: {series} moved by");
        let app = [("app", s.app)];
        let moved = s.after.sum("llm_requests_total", &app) - s.before.sum("llm_requests_total", &app);
        check_eq!(fails, moved, 1.0, "{n}: llm_requests_total{{app={}}} (all series) moved by", s.app);

        // Tokens: each record field is what llm_tokens_total moved by; without usage, no fields
        // and no movement.
        for (i, (token_type, field)) in TOKEN_TYPES.iter().enumerate() {
            let series =
                format!(r#"llm_tokens_total{{model="{}",app="{}",token_type="{token_type}"}}"#, w.model, s.app);
            let moved = counter(&s.after, &series) - counter(&s.before, &series);
            let want = w.tokens.map(|t| t[i] as f64);
            check_eq!(fails, num(rec, field), want, "{n}: record {field}");
            check_eq!(fails, moved, want.unwrap_or(0.0), "{n}: {series} moved by");
            if let Some(got) = num(rec, field) {
                check_eq!(fails, moved, got, "{n}: {series} moved by the record's {field}");
            }
        }

        // Cost: the counter drops the fraction and carries it per series, so after this request
        // it is the floor of the series' summed record costs.
        let cost = num(rec, "cost_microusd");
        check_eq!(fails, cost, w.cost, "{n}: record cost_microusd");
        let cost_series = format!(r#"llm_cost_microusd_total{{model="{}",app="{}"}}"#, w.model, s.app);
        let moved = counter(&s.after, &cost_series) - counter(&s.before, &cost_series);
        let sum = cost_sums.entry((w.model.to_string(), s.app.to_string())).or_default();
        let floor_before = *sum / 1_000_000;
        *sum += cost.map_or(0, |c| (c * 1e6).round() as u128);
        let floor_after = *sum / 1_000_000;
        check_eq!(fails, moved, (floor_after - floor_before) as f64, "{n}: {cost_series} moved by (record {cost:?})");
        check_eq!(fails, counter(&s.after, &cost_series), floor_after as f64, "{n}: {cost_series} = floor(sum)");

        // Timings: time to first token for streams only; time per output token for streams of
        // two or more output tokens only, in the record and in the histogram alike.
        let duration = num(rec, "duration_ms");
        let ttft = num(rec, "ttft_ms");
        check_eq!(fails, duration.is_some(), true, "{n}: duration_ms present");
        check_eq!(fails, ttft.is_some(), w.stream, "{n}: ttft_ms present (streams only)");
        let tpot = num(rec, "tpot_ms");
        check_eq!(fails, tpot.is_some(), w.tpot(), "{n}: tpot_ms present (streams of >= 2 output tokens only)");
        if let (Some(tpot), Some(ttft), Some(duration), Some(t)) = (tpot, ttft, duration, w.tokens) {
            // (duration − ttft) / (output − 1), from nanosecond clocks, rounded to 0.001 ms.
            let rounded = (tpot * 1000.0).round() / 1000.0;
            check_eq!(fails, tpot, rounded, "{n}: tpot_ms rounded to 0.001");
            let from_ms = (duration - ttft) / (t[1] - 1) as f64;
            let close = (tpot - from_ms).abs() <= 1.0 / (t[1] - 1) as f64 + 1e-9;
            check_eq!(fails, close, true, "{n}: tpot_ms {tpot} ≈ (duration − ttft) / (output − 1) = {from_ms}");
        }
        let hist = format!(r#"llm_time_per_output_token_ms_count{{model="{}"}}"#, w.model);
        let moved = counter(&s.after, &hist) - counter(&s.before, &hist);
        check_eq!(fails, moved, if w.tpot() { 1.0 } else { 0.0 }, "{n}: {hist} moved by");

        if !fails.is_empty() {
            report.push(format!("{}\n  log line: {line}", fails.join("\n")));
        }
        records.insert(s.name, rec.clone());
    }
    assert!(report.is_empty(), "records disagree:\n{}", report.join("\n"));
    records
}

/// An API key a Gemini client sends as `?key=`.
const GEMINI_QUERY_KEY: &str = "AIzaRecordsQuerySecret0123456789";

/// No raw key anywhere in Envoy's log (access log and Envoy's own lines).
fn assert_no_key_in_log(envoy: &Envoy, sent: &[Sent]) {
    let log = envoy.log();
    for s in sent {
        let secret = s.key.trim_start_matches("Bearer ");
        assert!(!log.contains(secret), "{}: the key {secret} is in Envoy's log", s.name);
    }
    for bad in ["panicked", "RuntimeError", "VM failed"] {
        assert!(!log.contains(bad), "{bad:?} in Envoy's log:\n{log}");
    }
}

// ---- tools/llm_cost.py ----

/// Runs `python3 tools/llm_cost.py args…` and returns its stdout.
fn llm_cost(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(common::root().join("tools/llm_cost.py"))
        .args(args)
        .output()
        .expect("run python3 tools/llm_cost.py");
    assert!(out.status.success(), "llm_cost.py {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A file for the tool to read, removed on drop (kept when the test fails, to look at).
struct LogFile(std::path::PathBuf);

impl LogFile {
    fn new(name: &str, text: &str) -> LogFile {
        let path = std::env::temp_dir().join(format!("llm-meter-records-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        LogFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Runs the tool on Envoy's log (`--format json`) and compares every (app, model) group, summed
/// over days, with the counters: requests, errors, input/output/cached tokens, and the floor of
/// the exact summed cost with llm_cost_microusd_total. Returns the tool's total.
fn check_cost_tool(envoy: &Envoy, log_name: &str) -> Value {
    let m = envoy.settled();
    let log = LogFile::new(log_name, &envoy.log());
    let out: Value = serde_json::from_str(&llm_cost(&["--format", "json", log.path()]))
        .expect("llm_cost.py --format json prints JSON");
    assert_eq!(out["group_by"], json!(["day", "app", "model"]), "{out}");

    // The tool's groups, summed over days: (app, model) → [requests, errors, in, out, cached, µUSD].
    let mut tool: BTreeMap<(String, String), [f64; 6]> = BTreeMap::new();
    for row in out["rows"].as_array().expect("rows") {
        let day = row["day"].as_str().unwrap();
        assert!(day.len() == 10 && day.as_bytes()[4] == b'-', "UTC date: {row}");
        let key = (row["app"].as_str().unwrap().to_string(), row["model"].as_str().unwrap().to_string());
        let g = tool.entry(key).or_default();
        for (i, f) in ["requests", "errors", "input_tokens", "output_tokens", "cached_input_tokens", "cost_microusd"]
            .iter()
            .enumerate()
        {
            g[i] += row[f].as_f64().unwrap_or_else(|| panic!("{f} in {row}"));
        }
        let usd = row["cost_usd"].as_f64().unwrap();
        assert!((usd * 1e6 - row["cost_microusd"].as_f64().unwrap()).abs() <= 0.5 + 1e-6, "6 decimals: {row}");
    }

    // The counters, by (app, model).
    let mut counted: BTreeMap<(String, String), [f64; 6]> = BTreeMap::new();
    for (series, v) in &m.series {
        let Some(labels) = series.strip_prefix("llm_requests_total{") else { continue };
        let label = |k: &str| {
            let start = labels.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
            labels[start..].split('"').next().unwrap().to_string()
        };
        let (app, model) = (label("app"), label("model"));
        let c = counted.entry((app.clone(), model.clone())).or_default();
        c[0] += v;
        if label("error_type") != "none" {
            c[1] += v;
        }
        let tokens =
            |t: &str| counter(&m, &format!(r#"llm_tokens_total{{model="{model}",app="{app}",token_type="{t}"}}"#));
        c[2] = tokens("input");
        c[3] = tokens("output");
        c[4] = tokens("cached_input");
        c[5] = counter(&m, &format!(r#"llm_cost_microusd_total{{model="{model}",app="{app}"}}"#));
    }
    assert_eq!(tool.keys().collect::<Vec<_>>(), counted.keys().collect::<Vec<_>>(), "the same (app, model) groups");
    for (key, c) in &counted {
        let t = tool[key];
        assert_eq!(t[..5], c[..5], "{key:?}: requests, errors, input, output, cached (tool vs counters)");
        assert_eq!(t[5].floor(), c[5], "{key:?}: floor of the tool's cost_microusd {} vs the counter", t[5]);
    }
    let total = &out["total"];
    assert_eq!(total["requests"].as_f64(), Some(m.sum("llm_requests_total", &[])), "{total}");
    assert_eq!(total["input_tokens"].as_f64(), Some(m.sum("llm_tokens_total", &[("token_type", "input")])));
    assert_eq!(total["output_tokens"].as_f64(), Some(m.sum("llm_tokens_total", &[("token_type", "output")])));

    // The other formats run on the same log.
    let table = llm_cost(&[log.path()]);
    assert!(table.starts_with("day ") && table.lines().last().unwrap().starts_with("TOTAL"), "{table}");
    let csv = llm_cost(&["--format", "csv", log.path()]);
    assert_eq!(
        csv.lines().next(),
        Some("day,app,model,requests,errors,input_tokens,output_tokens,cached_input_tokens,cost_usd")
    );
    assert_eq!(csv.lines().count(), 1 + out["rows"].as_array().unwrap().len(), "{csv}");
    out["total"].clone()
}

/// `--by key_hash`: one group per key hash, with that key's requests.
fn check_chargeback(envoy: &Envoy, log_name: &str, sent: &[Sent]) {
    let log = LogFile::new(log_name, &envoy.log());
    let out: Value = serde_json::from_str(&llm_cost(&["--by", "key_hash", "--format", "json", log.path()])).unwrap();
    assert_eq!(out["group_by"], json!(["day", "key_hash", "model"]), "{out}");
    let mut by_key: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for row in out["rows"].as_array().unwrap() {
        let e = by_key.entry(row["key_hash"].as_str().unwrap().to_string()).or_default();
        e.0 += row["requests"].as_f64().unwrap();
        e.1 += row["errors"].as_f64().unwrap();
    }
    let mut want: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for s in sent {
        let e = want.entry(sha12(&s.key)).or_default();
        e.0 += 1.0;
        e.1 += if s.want.error_type == "none" { 0.0 } else { 1.0 };
    }
    assert_eq!(by_key, want, "requests and errors per key hash");
}

// ---- The tests ----

#[test]
fn records_carry_what_the_counters_moved_by() {
    let mock = Mock::start();
    let envoy = Envoy::start(mock.port, &config(""));
    let mut d = Driver::new(&envoy);
    let started = std::time::Instant::now();

    // Non-streaming OpenAI chat, twice in one series: 1001 × 2.5 + 200 × 1.25 + 300 × 10 =
    // 5752.5 µUSD each, so the counter moves by 5752, then 5753 (the carried half).
    let usage = [
        ("x-mock-prompt-tokens", "1201"),
        ("x-mock-completion-tokens", "300"),
        ("x-mock-cached-tokens", "200"),
        ("x-mock-reasoning-tokens", "100"),
    ];
    let want = Want::ok("gpt-4o", "chat", "openai", false).tokens([1201, 300, 200, 0, 100], 5752.5);
    d.post("chat", "chat", CHAT, &usage, &chat_body("gpt-4o", false), want.clone());
    d.post("chat again", "chat", CHAT, &usage, &chat_body("gpt-4o", false), want);

    // A stream of 12 output tokens, 10 ms apart, after 50 ms: 42 × 2.5 + 12 × 10 = 225 µUSD.
    let h = [
        ("x-mock-prompt-tokens", "42"),
        ("x-mock-completion-tokens", "12"),
        ("x-mock-delay-ms", "50"),
        ("x-mock-chunk-delay-ms", "10"),
    ];
    let want = Want::ok("gpt-4o", "chat", "openai", true).tokens([42, 12, 0, 0, 0], 225.0);
    d.post("stream", "stream", CHAT, &h, &chat_body("gpt-4o", true), want);

    // A stream of one output token: no time per output token. 10 × 2.5 + 10 = 35 µUSD.
    let h = [("x-mock-prompt-tokens", "10"), ("x-mock-completion-tokens", "1"), ("x-mock-chunk-delay-ms", "10")];
    let want = Want::ok("gpt-4o", "chat", "openai", true).tokens([10, 1, 0, 0, 0], 35.0);
    d.post("one-token stream", "one-token", CHAT, &h, &chat_body("gpt-4o", true), want);

    // Anthropic Messages: input = 101 + 2001 cache reads + 300 cache writes;
    // 101 × 3 + 2001 × 0.3 + 300 × 3.75 + 50 × 15 = 303 + 600.3 + 1125 + 750 = 2778.3 µUSD.
    let h = [
        ("x-mock-prompt-tokens", "101"),
        ("x-mock-completion-tokens", "50"),
        ("x-mock-cached-tokens", "2001"),
        ("x-mock-cache-creation-tokens", "300"),
    ];
    let want = Want::ok("claude-sonnet-4-5", "messages", "anthropic", false).tokens([2402, 50, 2001, 300, 0], 2778.3);
    d.post("anthropic", "anthropic", "/v1/messages", &h, &anthropic_body(false), want);

    // An Anthropic stream of 20 output tokens: 100 × 3 + 20 × 15 = 600 µUSD.
    let h = [("x-mock-prompt-tokens", "100"), ("x-mock-completion-tokens", "20"), ("x-mock-chunk-delay-ms", "5")];
    let want = Want::ok("claude-sonnet-4-5", "messages", "anthropic", true).tokens([100, 20, 0, 0, 0], 600.0);
    d.post("anthropic stream", "anthropic-stream", "/v1/messages", &h, &anthropic_body(true), want);

    // Gemini: output = 200 candidates + 300 thoughts; 400 × 0.3 + 600 × 0.075 + 500 × 2.5 =
    // 120 + 45 + 1250 = 1415 µUSD.
    let h = [
        ("x-mock-prompt-tokens", "1000"),
        ("x-mock-completion-tokens", "200"),
        ("x-mock-reasoning-tokens", "300"),
        ("x-mock-cached-tokens", "600"),
    ];
    let want =
        Want::ok("gemini-2.5-flash", "generate_content", "gcp.gemini", false).tokens([1000, 500, 600, 0, 300], 1415.0);
    // Gemini clients may send their API key in the query: the log keeps the path without it.
    let path = format!("/v1beta/models/gemini-2.5-flash:generateContent?key={GEMINI_QUERY_KEY}");
    d.post("gemini", "gemini", &path, &h, &gemini_body(), want);

    // A Gemini stream (SSE) of 8 output tokens: 50 × 0.3 + 8 × 2.5 = 35 µUSD.
    let h = [("x-mock-prompt-tokens", "50"), ("x-mock-completion-tokens", "8"), ("x-mock-chunk-delay-ms", "5")];
    let want = Want::ok("gemini-2.5-flash", "generate_content", "gcp.gemini", true).tokens([50, 8, 0, 0, 0], 35.0);
    let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
    d.post("gemini stream", "gemini-stream", path, &h, &gemini_body(), want);

    // An upstream 429: no usage, no cost.
    let want = Want::ok("gpt-4o", "chat", "openai", false).failed(429, "upstream_rate_limit");
    d.post(
        "upstream 429",
        "upstream-429",
        CHAT,
        &[("x-mock-scenario", "rate_limit")],
        &chat_body("gpt-4o", false),
        want,
    );

    // A client that leaves a 200-token stream (50 ms apart) after its first events.
    let key = api_key("cancel");
    let id = request_id("cancel");
    let want = Want::ok("gpt-4o", "chat", "openai", true).failed(200, "canceled");
    let port = envoy.port;
    let (k, i) = (key.clone(), id.clone());
    d.measure("cancel", "cancel", key, id, want, move |_| {
        let body = chat_body("gpt-4o", true);
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "POST {CHAT} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\nauthorization: {k}\r\n\
             x-app-id: cancel\r\nx-request-id: {i}\r\nx-mock-completion-tokens: 200\r\n\
             x-mock-chunk-delay-ms: 50\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        200
    });

    // Not an LLM operation: no record.
    let unmetered = request_id("models");
    let r = d.agent.get(envoy.url("/v1/models")).header("x-request-id", &unmetered).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let sent_in = started.elapsed();

    let mut ids: Vec<&str> = d.sent.iter().map(|s| s.request_id.as_str()).collect();
    ids.push(&unmetered);
    let lines = wait_for_lines(&envoy, &ids);
    assert_eq!(lines[&unmetered]["llm"], Value::Null, "an unmetered request has no record: {}", lines[&unmetered]);
    let records = check_records(&envoy, &d.sent);
    println!("sent {} requests in {sent_in:?}; records checked after {:?}", d.sent.len() + 1, started.elapsed());
    for (name, rec) in &records {
        println!("  {name}: {}", Value::Object(rec.clone()));
    }
    // The first token came after the mock's 50 ms; time per output token excludes that wait.
    let stream = &records["stream"];
    let (ttft, duration, tpot) =
        (stream["ttft_ms"].as_f64(), stream["duration_ms"].as_f64(), stream["tpot_ms"].as_f64());
    let (ttft, duration, tpot) = (ttft.unwrap(), duration.unwrap(), tpot.unwrap());
    assert!(ttft >= 50.0 && ttft < duration, "ttft {ttft}, duration {duration}");
    assert!((10.0..(duration - 50.0) / 11.0 + 1.0).contains(&tpot), "tpot {tpot}, duration {duration}");
    assert_no_key_in_log(&envoy, &d.sent);
    assert!(!envoy.log().contains(GEMINI_QUERY_KEY), "the key in a Gemini path's query is in Envoy's log");
    // Every metered access log line is one of ours, and none was logged twice.
    let metered: Vec<Value> = access_log(&envoy).into_values().filter(|l| !l["llm"].is_null()).collect();
    assert_eq!(metered.len(), d.sent.len());

    let total = check_cost_tool(&envoy, "records.log");
    println!("llm_cost.py total: {total}");
    // 2 × 5752.5 + 225 + 35 + 2778.3 + 600 + 1415 + 35 µUSD, summed exactly.
    assert_eq!(total["cost_microusd"].as_f64(), Some(16593.3), "{total}");
    assert_eq!(total["cost_usd"].as_f64(), Some(0.016593), "{total}");
    assert_eq!((total["requests"].as_u64(), total["errors"].as_u64()), (Some(10), Some(2)), "{total}");
    check_chargeback(&envoy, "records.log", &d.sent);
}

#[test]
fn rejections_by_a_local_limit_and_timeouts_have_records() {
    let mock = Mock::start();
    let limits = r#",
  "limits": [{"name": "key-rpm", "key": "header:authorization", "requests_per_minute": 1}]"#;
    let yaml = render_config(mock.port, &config(limits));
    assert!(yaml.contains("timeout: 300s"), "envoy.yaml no longer has the route timeout");
    let envoy = Envoy::try_start_yaml(&yaml.replace("timeout: 300s", "timeout: 0.5s")).unwrap();
    let mut d = Driver::new(&envoy);

    // Windows are aligned to the minute: make sure both requests of one key share one.
    let left_ms = 60_000 - SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() % 60_000;
    if left_ms < 5_000 {
        std::thread::sleep(Duration::from_millis(left_ms as u64 + 50));
    }
    // One request per minute per key: the first is served (7 × 0.15 + 3 × 0.6 = 2.85 µUSD),
    // the second rejected by the filter before reaching the upstream.
    let key = api_key("limited");
    let h = [("x-mock-prompt-tokens", "7"), ("x-mock-completion-tokens", "3")];
    for (name, want) in [
        ("admitted", Want::ok("gpt-4o-mini", "chat", "openai", false).tokens([7, 3, 0, 0, 0], 2.85)),
        (
            "rejected",
            Want {
                rejected_by: Some("key-rpm"),
                ..Want::ok("gpt-4o-mini", "chat", "openai", false).failed(429, "rate_limited")
            },
        ),
    ] {
        let id = request_id(name);
        let url = envoy.url(CHAT);
        let mut headers = vec![("authorization", key.as_str()), ("x-app-id", "limited"), ("x-request-id", id.as_str())];
        headers.extend_from_slice(&h);
        let want_status = want.status;
        d.measure(name, "limited", key.clone(), id.clone(), want, |agent| {
            let r = send(agent, &url, &headers, &chat_body("gpt-4o-mini", false));
            assert_eq!(r.status, want_status, "{name}: {}", r.body);
            r.status
        });
    }
    let rejected = r#"llm_ratelimit_rejected_total{model="gpt-4o-mini",rule="key-rpm",mode="enforce"}"#;
    let s = &d.sent[1];
    assert_eq!(counter(&s.after, rejected) - counter(&s.before, rejected), 1.0);

    // The upstream answers after 2 s, the route gives up after 0.5 s: Envoy's 504.
    let want = Want::ok("gpt-4o", "chat", "openai", false).failed(504, "timeout");
    d.post("timeout", "slow", CHAT, &[("x-mock-delay-ms", "2000")], &chat_body("gpt-4o", false), want);

    let records = check_records(&envoy, &d.sent);
    for (name, rec) in &records {
        println!("  {name}: {}", Value::Object(rec.clone()));
    }
    let duration = records["timeout"]["duration_ms"].as_f64().unwrap();
    assert!((450.0..1500.0).contains(&duration), "the route timeout ends the request: {duration} ms");
    let timeout_line = &access_log(&envoy)[&d.sent[2].request_id];
    assert_eq!(timeout_line["response_flags"], "UT", "{timeout_line}");
    assert_no_key_in_log(&envoy, &d.sent);

    let total = check_cost_tool(&envoy, "limits.log");
    println!("llm_cost.py total: {total}");
    assert_eq!((total["requests"].as_u64(), total["errors"].as_u64()), (Some(3), Some(2)), "{total}");
    assert_eq!(total["cost_microusd"].as_f64(), Some(2.85), "{total}");
    check_chargeback(&envoy, "limits.log", &d.sent);
}

#[test]
fn the_cost_tool_reads_every_form_of_the_record_and_skips_the_rest() {
    let record = json!({"app": "web", "model": "gpt-4o", "error_type": "none", "input_tokens": 8,
                        "output_tokens": 16, "cached_input_tokens": 4, "cost_microusd": 172.5, "key_hash": "0fd3043131f4"});
    let text = record.to_string();
    let b64 = {
        // A BytesValue's base64 (what `:TYPED` prints for filter state set as bytes).
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in text.as_bytes().chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                out.push(if i <= c.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
            }
        }
        out
    };
    let time = "2026-11-30T19:26:08.937Z";
    let lines = [
        "[2026-11-30 19:26:08.000][12][info][main] starting main dispatch loop".to_string(),
        json!({"time": time, "llm": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": record}})
            .to_string(),
        json!({"time": time, "llm": record}).to_string(),
        json!({"time": time, "llm": text}).to_string(),
        json!({"time": time, "llm": {"@type": "type.googleapis.com/google.protobuf.BytesValue", "value": b64}})
            .to_string(),
        json!({"time": time, "llm": null, "path": "/v1/models"}).to_string(),
        // 23:30 at UTC−2 is the next day in UTC; a rejected request without usage or cost.
        json!({"time": "2026-11-30T23:30:00.000-02:00",
               "llm": {"app": "web", "model": "gpt-4o", "error_type": "rate_limited", "status": 429}})
        .to_string(),
        "{\"time\": \"2026-11-30T19:26:09.000Z\", \"llm\": {\"app\": \"web\"".to_string(),
        "[1, 2, 3]".to_string(),
        String::new(),
    ];
    let log = LogFile::new("forms.log", &lines.join("\n"));
    let out: Value = serde_json::from_str(&llm_cost(&["--format", "json", log.path()])).unwrap();
    let rows = out["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(
        rows[0],
        json!({"day": "2026-11-30", "app": "web", "model": "gpt-4o", "requests": 4, "errors": 0, "input_tokens": 32,
               "output_tokens": 64, "cached_input_tokens": 16, "cost_usd": 0.00069, "cost_microusd": 690})
    );
    assert_eq!(
        rows[1],
        json!({"day": "2026-12-01", "app": "web", "model": "gpt-4o", "requests": 1, "errors": 1, "input_tokens": 0,
               "output_tokens": 0, "cached_input_tokens": 0, "cost_usd": 0.0, "cost_microusd": 0})
    );
    // Standard input, grouped by key hash (a record without one is "-"), as CSV.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "python3 {} --by key_hash --format csv < {}",
            common::root().join("tools/llm_cost.py").display(),
            log.path()
        ))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "day,key_hash,model,requests,errors,input_tokens,output_tokens,cached_input_tokens,cost_usd\n\
         2026-11-30,0fd3043131f4,gpt-4o,4,0,32,64,16,0.000690\n\
         2026-12-01,-,gpt-4o,1,1,0,0,0,0.000000\n"
    );
}
