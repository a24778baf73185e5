//! The exchange tested whole against an in-memory Envoy ([`FakeHost`]): every callback, every
//! metric; limits, the memory budget and resilience have a file each.

use super::*;
use crate::config::Config;
use crate::memory::Pool;
use crate::meter::classify::flags;
use crate::meter::labels::tests::FakeStore;
use crate::meter::labels::SharedStore;
use crate::meter::labels::StoreError;
use crate::scan::body::tests::{CHAT_JSON, CHAT_SSE};
use crate::scan::body::RESPONSE_SCAN_BYTES;
use std::collections::{BTreeMap, HashMap};

/// A local reply: status, headers, body.
type Sent = (u16, Vec<(String, String)>, String);

/// An in-memory Envoy: headers, a settable clock and properties, and the stats it holds.
#[derive(Default)]
struct FakeHost {
    store: FakeStore,
    request_headers: HashMap<String, Vec<u8>>,
    response_headers: HashMap<String, Vec<u8>>,
    now: u64,
    code: Option<u16>,
    flags: Option<u64>,
    counters: BTreeMap<String, u64>,
    gauges: BTreeMap<String, i64>,
    /// The highest value each gauge had.
    gauge_peaks: BTreeMap<String, i64>,
    histograms: BTreeMap<String, Vec<u64>>,
    /// Defined metrics by id.
    metric_names: Vec<(MetricKind, String)>,
    warnings: std::cell::RefCell<Vec<String>>,
    client_address: Option<Vec<u8>>,
    sent: Option<Sent>,
    request_body: Option<Vec<u8>>,
    request_body_reads: std::cell::Cell<usize>,
    /// gRPC calls made: (GrpcService, message, timeout); the token is the index + 1.
    grpc_calls: Vec<(Vec<u8>, Vec<u8>, u64)>,
    /// Every gRPC dispatch fails.
    grpc_down: bool,
    /// Records published: (filter state name, the record).
    records: Vec<(String, crate::record::Record<'static>)>,
}

impl SharedStore for FakeHost {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.store.set(key, value, cas)
    }
}

impl Host for FakeHost {
    fn grpc_call(
        &mut self,
        grpc_service: &[u8],
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u64,
    ) -> Option<u32> {
        if self.grpc_down {
            return None;
        }
        assert_eq!((service, method), (crate::limit::rls::SERVICE, crate::limit::rls::METHOD));
        self.grpc_calls.push((grpc_service.to_vec(), message.to_vec(), timeout_ms));
        Some(self.grpc_calls.len() as u32)
    }
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.request_headers.get(name).cloned()
    }
    fn response_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.response_headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
    fn now_nanos(&self) -> u64 {
        self.now
    }
    fn response_code(&self) -> Option<u16> {
        self.code
    }
    fn response_flags(&self) -> Option<u64> {
        self.flags
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(i) = self.metric_names.iter().position(|(_, n)| n == name) {
            assert_eq!(self.metric_names[i].0, kind, "{name} defined as two kinds");
            return Some(i as u32);
        }
        self.metric_names.push((kind, name.to_string()));
        match kind {
            MetricKind::Counter => drop(self.counters.entry(name.to_string()).or_default()),
            MetricKind::Gauge => drop(self.gauges.entry(name.to_string()).or_default()),
            MetricKind::Histogram => drop(self.histograms.entry(name.to_string()).or_default()),
        }
        Some(self.metric_names.len() as u32 - 1)
    }
    fn metric_add(&mut self, id: u32, delta: i64) {
        let (kind, name) = self.metric_names[id as usize].clone();
        match kind {
            MetricKind::Counter => {
                assert!(delta > 0, "Envoy rejects counter increments of {delta} ({name})");
                *self.counters.get_mut(&name).unwrap() += delta as u64;
            }
            MetricKind::Gauge => {
                let value = self.gauges.get_mut(&name).unwrap();
                *value += delta;
                let peak = self.gauge_peaks.entry(name).or_default();
                *peak = (*peak).max(*value);
            }
            MetricKind::Histogram => panic!("metric_add on histogram {name}"),
        }
    }
    fn metric_record(&mut self, id: u32, value: u64) {
        let (kind, name) = self.metric_names[id as usize].clone();
        match kind {
            MetricKind::Gauge => *self.gauges.get_mut(&name).unwrap() = value as i64,
            MetricKind::Histogram => self.histograms.get_mut(&name).unwrap().push(value),
            MetricKind::Counter => panic!("metric_record on counter {name}"),
        }
    }
    fn client_address(&self) -> Option<Vec<u8>> {
        self.client_address.clone()
    }
    fn send_response(&mut self, status: u16, headers: &[(String, String)], body: &[u8]) {
        self.sent = Some((status, headers.to_vec(), String::from_utf8_lossy(body).into_owned()));
    }
    fn set_response_header(&mut self, name: &str, value: &str) {
        self.response_headers.insert(name.to_string(), value.as_bytes().to_vec());
    }
    fn remove_response_header(&mut self, name: &str) {
        self.response_headers.remove(name);
    }
    fn publish_record(&mut self, name: &str, record: &crate::record::Record) {
        self.records.push((name.to_string(), record.clone().into_owned()));
    }
    fn set_request_header(&mut self, name: &str, value: &str) {
        self.request_headers.insert(name.to_string(), value.as_bytes().to_vec());
    }
    fn remove_request_header(&mut self, name: &str) {
        self.request_headers.remove(name);
    }
    fn request_body(&self) -> Option<Vec<u8>> {
        self.request_body_reads.set(self.request_body_reads.get() + 1);
        self.request_body.clone()
    }
    fn set_request_body(&mut self, body: &[u8]) {
        self.request_body = Some(body.to_vec());
    }
    fn log_warn(&self, message: &str) {
        self.warnings.borrow_mut().push(message.to_string());
    }
}

const MS: u64 = 1_000_000;

fn worker(json: &str) -> Worker {
    Worker::new(Config::parse(json.as_bytes()).unwrap())
}

/// Runs one exchange: request headers + body, response headers, body chunks (advancing the
/// clock 10 ms before each), then on_log.
fn exchange(host: &mut FakeHost, w: &mut Worker, path: &str, req: &str, status: u16, ctype: &str, chunks: &[&[u8]]) {
    host.request_headers.insert(":path".into(), path.as_bytes().to_vec());
    host.response_headers.insert(":status".into(), status.to_string().into_bytes());
    host.response_headers.insert("content-type".into(), ctype.as_bytes().to_vec());
    host.code = Some(status);
    let mut x = Exchange::new();
    x.on_request_headers(host, w, false);
    x.on_request_body(host, w, req.as_bytes(), true);
    host.now += 100 * MS;
    x.on_response_headers(host, w);
    for (i, c) in chunks.iter().enumerate() {
        host.now += 10 * MS;
        x.on_response_body(host, c, i + 1 == chunks.len());
    }
    x.on_log(host, w);
    x.on_log(host, w); // idempotent
}

/// One non-streaming chat exchange for `gpt-4o` answered 200 with [`CHAT_JSON`].
fn chat_json(host: &mut FakeHost, w: &mut Worker) {
    exchange(
        host,
        w,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o"}"#,
        200,
        "application/json",
        &[CHAT_JSON.as_bytes()],
    );
}

fn counter(host: &FakeHost, name: &str) -> u64 {
    host.counters.get(name).copied().unwrap_or(0)
}

mod limits;
mod memory;
mod records;
mod resilience;

#[test]
fn streaming_requests_get_include_usage_and_the_client_does_not_see_the_usage_chunk() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    let body = br#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    host.request_headers.insert("content-length".into(), body.len().to_string().into_bytes());
    host.request_body = Some(body.to_vec());
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(&mut host, &mut w, false), Flow::Hold);
    // The model is known after this chunk, but `stream` decides: held to the end.
    assert_eq!(x.on_request_body(&mut host, &mut w, &body[..20], false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, &body[20..], true), Flow::Continue);
    let sent = host.request_body.clone().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&sent).unwrap();
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(host.request_headers["content-length"], sent.len().to_string().into_bytes());

    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"text/event-stream".to_vec());
    host.code = Some(200);
    x.on_response_headers(&mut host, &mut w);
    assert!(x.rewrites_response());
    let (a, b) = CHAT_SSE.as_bytes().split_at(CHAT_SSE.len() - 30);
    let mut forwarded = x.on_response_body(&mut host, a, false).unwrap_or_else(|| a.to_vec());
    forwarded.extend(x.on_response_body(&mut host, b, true).unwrap_or_else(|| b.to_vec()));
    let forwarded = String::from_utf8(forwarded).unwrap();
    assert!(!forwarded.contains("prompt_tokens"), "{forwarded}");
    assert!(forwarded.ends_with("data: [DONE]\n\n"));
    x.on_log(&mut host, &mut w);
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;token_type=.=input;.;llm_tokens_total"), 7);

    // A client that asked for usage gets its stream untouched; so does a non-streaming one.
    for body in
        [&br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#[..], br#"{"model":"gpt-4o"}"#]
    {
        host.request_body = Some(body.to_vec());
        let mut x = Exchange::new();
        x.on_request_headers(&mut host, &mut w, false);
        x.on_request_body(&mut host, &mut w, body, true);
        assert_eq!(host.request_body.as_deref(), Some(body));
        x.on_response_headers(&mut host, &mut w);
        assert!(!x.rewrites_response());
        assert_eq!(x.on_response_body(&mut host, CHAT_SSE.as_bytes(), true), None);
    }
}

#[test]
fn only_streams_without_usage_are_read_again_or_counted_as_not_injected() {
    let mut w = worker(r#"{"request":{"model_lookahead_bytes":64}}"#);
    let mut host = FakeHost::default();
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    let mut skipped = 0;
    for (body, streaming) in [
        (br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#.to_vec(), false),
        (br#"{"model":"gpt-4o","stream":true,"messages":[]}"#.to_vec(), true),
    ] {
        // A body within the lookahead: only the stream's body is read back for the rewrite.
        host.request_body = Some(body.clone());
        let reads = host.request_body_reads.get();
        let mut x = Exchange::new();
        x.on_request_headers(&mut host, &mut w, false);
        x.on_request_body(&mut host, &mut w, &body, true);
        assert_eq!(host.request_body_reads.get() - reads, usize::from(streaming));
        x.on_log(&mut host, &mut w);

        // A body beyond the lookahead cannot be rewritten: a skip only if it is a stream.
        let mut big = body.clone();
        big.truncate(big.len() - 1);
        big.extend(format!(r#","pad":"{}"}}"#, "x".repeat(100)).bytes());
        let mut x = Exchange::new();
        x.on_request_headers(&mut host, &mut w, false);
        let (a, b) = big.split_at(70);
        assert_eq!(x.on_request_body(&mut host, &mut w, a, false), Flow::Continue);
        x.on_request_body(&mut host, &mut w, b, true);
        host.response_headers.insert(":status".into(), b"200".to_vec());
        x.on_response_headers(&mut host, &mut w);
        x.on_log(&mut host, &mut w);
        skipped += u64::from(streaming);
        let skips = counter(&host, "reason=.=usage_not_injected;.;llm_meter_skips_total");
        assert_eq!(skips, skipped, "{}", String::from_utf8_lossy(&big));
    }
}

#[test]
fn request_is_held_only_until_the_model_is_known() {
    let mut host = FakeHost::default();
    let mut w = worker(r#"{"inject_stream_usage":false}"#);
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    let active = "model=.=gpt-4o;.;llm_active_requests";

    // The model arrives in the third chunk: held until then, then everything flows.
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(&mut host, &mut w, false), Flow::Hold);
    assert!(x.is_holding());
    assert_eq!(x.on_request_body(&mut host, &mut w, br#"{"messages":[{"role":"user","#, false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#""content":"hi"}],"mo"#, false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#"del":"gpt-4o","#, false), Flow::Continue);
    assert!(!x.is_holding());
    assert_eq!(x.on_request_body(&mut host, &mut w, br#""stream":false"#, false), Flow::Continue);
    assert_eq!(x.on_request_body(&mut host, &mut w, b"}", true), Flow::Continue);
    assert_eq!(host.gauges.get(active), Some(&1));

    // No model within the lookahead: released after it, the model still counts when found.
    let mut w = worker(r#"{"inject_stream_usage":false,"request":{"model_lookahead_bytes":10}}"#);
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(&mut host, &mut w, false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#"{"messages":"#, false), Flow::Continue);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#"[],"model":"gpt-4o"}"#, true), Flow::Continue);
    assert_eq!(host.gauges.get(active), Some(&2));

    // Lookahead 0, bodiless requests and unmetered paths are never held.
    let mut w0 = worker(r#"{"request":{"model_lookahead_bytes":0}}"#);
    assert_eq!(Exchange::new().on_request_headers(&mut host, &mut w0, false), Flow::Continue);
    assert_eq!(Exchange::new().on_request_headers(&mut host, &mut w, true), Flow::Continue);
    host.request_headers.insert(":path".into(), b"/v1/models".to_vec());
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(&mut host, &mut w, false), Flow::Continue);
    assert_eq!(x.on_request_body(&mut host, &mut w, b"{}", true), Flow::Continue);
}

#[test]
fn non_streaming_chat_records_everything() {
    let mut host = FakeHost::default();
    let mut w = worker(r#"{"pricing":{"gpt-4o":{"input":2.5,"output":10,"cached_input":1.25}}}"#);
    let (a, b) = CHAT_JSON.as_bytes().split_at(100);
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[]}"#,
        200,
        "application/json",
        &[a, b],
    );
    assert_eq!(
        counter(
            &host,
            "model=.=gpt-4o;.;app=.=unknown;.;operation=.=chat;.;status=.=200;.;error_type=.=none;.;llm_requests_total"
        ),
        1
    );
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;token_type=.=input;.;llm_tokens_total"), 19);
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"), 10);
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;token_type=.=cached_input;.;llm_tokens_total"), 3);
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;token_type=.=reasoning;.;llm_tokens_total"), 2);
    // (19-3)×2.5 + 3×1.25 + 10×10 = 40 + 3.75 + 100 = 143.75 µUSD → 143, 0.75 carried.
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;llm_cost_microusd_total"), 143);
    assert_eq!(host.histograms["model=.=gpt-4o;.;llm_request_duration_ms"], vec![120]);
    assert_eq!(host.histograms["model=.=gpt-4o;.;token_type=.=input;.;llm_tokens_per_request"], vec![19]);
    assert!(!host.histograms.contains_key("model=.=gpt-4o;.;llm_time_to_first_token_ms"));
    assert_eq!(host.gauges["model=.=gpt-4o;.;llm_active_requests"], 0);
    // A second identical request: the carried 0.75 makes 287.5 → 287 in total.
    chat_json(&mut host, &mut w);
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;llm_cost_microusd_total"), 287);
}

#[test]
fn streaming_records_ttft_and_usage() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    let chunks: Vec<&[u8]> = CHAT_SSE.as_bytes().chunks(50).collect();
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","stream":true}"#,
        200,
        "text/event-stream",
        &chunks,
    );
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;token_type=.=input;.;llm_tokens_total"), 7);
    assert_eq!(host.histograms["model=.=gpt-4o;.;llm_time_to_first_token_ms"], vec![110]);
    assert_eq!(counter(&host, "model=.=gpt-4o;.;llm_usage_missing_total"), 0);
}

#[test]
fn upstream_errors_and_missing_usage() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    exchange(&mut host, &mut w, "/v1/chat/completions", r#"{"model":"m"}"#, 429, "application/json", &[b"{}"]);
    exchange(&mut host, &mut w, "/v1/chat/completions", r#"{"model":"m"}"#, 500, "application/json", &[b"{}"]);
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"m"}"#,
        200,
        "application/json",
        &[br#"{"id":"x"}"#],
    );
    let req = |s: &str, e: &str| {
        format!("model=.=m;.;app=.=unknown;.;operation=.=chat;.;status=.={s};.;error_type=.={e};.;llm_requests_total")
    };
    assert_eq!(counter(&host, &req("429", "upstream_rate_limit")), 1);
    assert_eq!(counter(&host, &req("500", "server_error")), 1);
    assert_eq!(counter(&host, &req("200", "none")), 1);
    assert_eq!(counter(&host, "model=.=m;.;llm_usage_missing_total"), 1);
    assert_eq!(host.gauges["model=.=m;.;llm_active_requests"], 0);
}

#[test]
fn client_cancel_mid_stream_keeps_partial_usage_and_balances_gauge() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"text/event-stream".to_vec());
    let mut x = Exchange::new();
    x.on_request_headers(&mut host, &mut w, false);
    x.on_request_body(&mut host, &mut w, br#"{"model":"m"}"#, true);
    assert_eq!(host.gauges["model=.=m;.;llm_active_requests"], 1);
    x.on_response_headers(&mut host, &mut w);
    x.on_response_body(&mut host, CHAT_SSE.as_bytes().get(..40).unwrap(), false);
    host.code = Some(200);
    host.flags = Some(flags::DOWNSTREAM_REMOTE_RESET);
    host.now += 5000 * MS;
    x.on_log(&mut host, &mut w);
    assert_eq!(
        counter(
            &host,
            "model=.=m;.;app=.=unknown;.;operation=.=chat;.;status=.=200;.;error_type=.=canceled;.;llm_requests_total"
        ),
        1
    );
    assert_eq!(host.gauges["model=.=m;.;llm_active_requests"], 0);
    assert_eq!(host.histograms["model=.=m;.;llm_request_duration_ms"], vec![5000]);
}

#[test]
fn request_without_body_end_and_no_response() {
    // Upstream connect failure before the request body finished: no response headers at all.
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    host.request_headers.insert(":path".into(), b"/v1/embeddings".to_vec());
    let mut x = Exchange::new();
    x.on_request_headers(&mut host, &mut w, false);
    x.on_request_body(&mut host, &mut w, br#"{"model":"e","inp"#, false);
    host.code = Some(503);
    host.flags = Some(flags::UPSTREAM_CONNECTION_FAILURE);
    x.on_log(&mut host, &mut w);
    assert_eq!(counter(&host, "model=.=e;.;app=.=unknown;.;operation=.=embeddings;.;status=.=503;.;error_type=.=network;.;llm_requests_total"), 1);
    assert!(host.gauges.values().all(|&g| g == 0));
}

#[test]
fn unmetered_paths_record_nothing() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    exchange(&mut host, &mut w, "/v1/models", "", 200, "application/json", &[b"{}"]);
    assert!(host.counters.is_empty() && host.gauges.is_empty() && host.histograms.is_empty());
}

#[test]
fn model_and_app_labels_are_bounded() {
    let mut host = FakeHost::default();
    let mut w = worker(r#"{"metrics":{"max_models":2,"app_header":"x-app","max_apps":1}}"#);
    for (model, app) in [("a", "web"), ("b", "cli"), ("c\n\"", "web"), ("a", "batch")] {
        host.request_headers.insert("x-app".into(), app.as_bytes().to_vec());
        let req = serde_json::json!({ "model": model }).to_string();
        exchange(&mut host, &mut w, "/v1/chat/completions", &req, 200, "application/json", &[CHAT_JSON.as_bytes()]);
    }
    let series: Vec<&String> = host.counters.keys().filter(|k| k.ends_with("llm_requests_total")).collect();
    assert_eq!(
        series,
        vec![
            "model=.=a;.;app=.=other;.;operation=.=chat;.;status=.=200;.;error_type=.=none;.;llm_requests_total",
            "model=.=a;.;app=.=web;.;operation=.=chat;.;status=.=200;.;error_type=.=none;.;llm_requests_total",
            "model=.=b;.;app=.=other;.;operation=.=chat;.;status=.=200;.;error_type=.=none;.;llm_requests_total",
            "model=.=other;.;app=.=web;.;operation=.=chat;.;status=.=200;.;error_type=.=none;.;llm_requests_total",
        ]
    );
}

#[test]
fn allowlist_and_response_model_fallback() {
    let mut host = FakeHost::default();
    let mut w = worker(r#"{"metrics":{"models":["gpt-4o-2024-08-06"]}}"#);
    // No model in the request: the response's model is used, and it is on the allowlist.
    exchange(&mut host, &mut w, "/v1/chat/completions", "{}", 200, "application/json", &[CHAT_JSON.as_bytes()]);
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"llama"}"#,
        200,
        "application/json",
        &[CHAT_JSON.as_bytes()],
    );
    assert_eq!(counter(&host, "model=.=gpt-4o-2024-08-06;.;app=.=unknown;.;token_type=.=input;.;llm_tokens_total"), 19);
    assert_eq!(counter(&host, "model=.=other;.;app=.=unknown;.;token_type=.=input;.;llm_tokens_total"), 19);
}

#[test]
fn skips_are_counted_and_logged_sparsely() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    for _ in 0..10 {
        exchange(&mut host, &mut w, "/v1/completions", r#"{"model":"m"}"#, 200, "application/json", &[b"not json"]);
    }
    assert_eq!(counter(&host, "reason=.=body_malformed;.;llm_meter_skips_total"), 10);
    assert_eq!(counter(&host, "model=.=m;.;llm_usage_missing_total"), 10);
    // Logged at the 1st, 2nd, 4th and 8th occurrence.
    assert_eq!(host.warnings.borrow().len(), 4);
}

#[test]
fn unsupported_or_corrupt_compressed_responses_are_counted_not_parsed() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    host.response_headers.insert("content-encoding".into(), b"zstd".to_vec());
    exchange(&mut host, &mut w, "/v1/chat/completions", r#"{"model":"m"}"#, 200, "application/json", &[b"\x28\xb5"]);
    assert_eq!(counter(&host, "reason=.=compressed;.;llm_meter_skips_total"), 1);
    host.response_headers.insert("content-encoding".into(), b"gzip".to_vec());
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"m"}"#,
        200,
        "application/json",
        &[b"\x1f\x8b\x09"],
    );
    assert_eq!(counter(&host, "reason=.=compressed;.;llm_meter_skips_total"), 2);
}

#[test]
fn compressed_responses_are_decoded_for_the_meter() {
    use std::io::Write;
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(CHAT_JSON.as_bytes()).unwrap();
    let body = gz.finish().unwrap();
    host.response_headers.insert("content-encoding".into(), b"gzip".to_vec());
    let (a, b) = body.split_at(body.len() / 2);
    exchange(&mut host, &mut w, "/v1/chat/completions", r#"{"model":"m"}"#, 200, "application/json", &[a, b]);
    assert_eq!(counter(&host, "model=.=m;.;app=.=unknown;.;token_type=.=input;.;llm_tokens_total"), 19);
    assert_eq!(counter(&host, "reason=.=compressed;.;llm_meter_skips_total"), 0);
}

#[test]
fn shared_data_failure_is_counted_and_labelled_other() {
    let mut host = FakeHost::default();
    host.store.broken.set(true);
    let mut w = worker("{}");
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"m"}"#,
        200,
        "application/json",
        &[CHAT_JSON.as_bytes()],
    );
    assert!(counter(&host, "kind=.=shared_data;.;llm_meter_errors_total") >= 1);
    assert_eq!(counter(&host, "model=.=other;.;app=.=unknown;.;token_type=.=input;.;llm_tokens_total"), 19);
}
