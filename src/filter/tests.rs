//! The exchange tested whole against an in-memory Envoy ([`FakeHost`]): every callback, every
//! metric, limits, injection, memory budget.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

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

fn counter(host: &FakeHost, name: &str) -> u64 {
    host.counters.get(name).copied().unwrap_or(0)
}

#[test]
fn limits_hold_the_whole_body_reject_with_a_local_reply_and_reconcile() {
    let mut host = FakeHost { now: 1_000 * 60_000 * MS, ..FakeHost::default() };
    let mut w = worker(
        r#"{"limits":[{"name":"rpm","key":"global","requests_per_minute":1},
                      {"name":"tpm","key":"global","tokens_per_minute":1000}]}"#,
    );
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    host.code = Some(200);

    // The model is in the first chunk, but `max_tokens` may follow: held to the end.
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(&mut host, &mut w, false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o","#, false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#""max_tokens":100}"#, true), Flow::Continue);
    x.on_response_headers(&mut host, &mut w);
    let h = |host: &FakeHost, n: &str| host.response_headers.get(n).map(|v| String::from_utf8_lossy(v).into_owned());
    assert_eq!(h(&host, "x-ratelimit-remaining-requests").as_deref(), Some("0"));
    // 34 bytes -> 9 input tokens + 100 output reserved.
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens").as_deref(), Some("891"));
    x.on_response_body(&mut host, CHAT_JSON.as_bytes(), true);
    x.on_log(&mut host, &mut w);
    // Reconciled to the real usage (19 input + 10 output).
    let mut y = Exchange::new();
    host.request_headers.insert(":path".into(), b"/v1/embeddings".to_vec());
    y.on_request_headers(&mut host, &mut w, true);
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(429), "the request rule is exhausted");
    let (_, headers, body) = host.sent.clone().unwrap();
    assert!(headers.contains(&("retry-after".to_string(), "60".to_string())), "{headers:?}");
    assert!(body.contains("\"code\":\"rpm\""), "{body}");
    host.code = Some(429);
    y.on_log(&mut host, &mut w);
    assert_eq!(counter(&host, "model=.=unknown;.;rule=.=rpm;.;llm_ratelimit_rejected_total"), 1);
    assert_eq!(
        counter(&host, "model=.=unknown;.;app=.=unknown;.;operation=.=embeddings;.;status=.=429;.;error_type=.=rate_limited;.;llm_requests_total"),
        1
    );
    assert_eq!(host.gauges.get("model=.=unknown;.;llm_active_requests"), None, "rejected requests never become active");
    // The next window: the token bucket holds exactly the real usage.
    host.now += 60_000 * MS;
    host.sent = None;
    let mut z = Exchange::new();
    z.on_request_headers(&mut host, &mut w, true);
    assert_eq!(host.sent, None);
    host.response_headers.clear();
    host.response_headers.insert(":status".into(), b"200".to_vec());
    z.on_response_headers(&mut host, &mut w);
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens").as_deref(), Some("1000"));

    // The upstream's own token limit is the tighter one: its three headers stay together;
    // the request family is still this filter's.
    host.response_headers.clear();
    for (k, v) in [
        (":status", "200"),
        ("x-ratelimit-limit-tokens", "30000"),
        ("x-ratelimit-remaining-tokens", "29"),
        ("x-ratelimit-reset-tokens", "6ms"),
    ] {
        host.response_headers.insert(k.into(), v.as_bytes().to_vec());
    }
    host.now += 60_000 * MS;
    let mut z = Exchange::new();
    z.on_request_headers(&mut host, &mut w, true);
    z.on_response_headers(&mut host, &mut w);
    assert_eq!(h(&host, "x-ratelimit-limit-tokens").as_deref(), Some("30000"));
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens").as_deref(), Some("29"));
    assert_eq!(h(&host, "x-ratelimit-reset-tokens").as_deref(), Some("6ms"));
    assert_eq!(h(&host, "x-ratelimit-limit-requests").as_deref(), Some("1"));
}

#[test]
fn global_rules_wait_for_the_service_then_forward_reject_or_follow_the_failure_mode() {
    let config = r#"{"limits":[
        {"name":"local","key":"global","tokens_per_minute":1000},
        {"name":"g-rpm","key":"header:authorization","requests_per_minute":100,"scope":"global",
         "service":{"cluster":"rls","domain":"llm","timeout_ms":50}},
        {"name":"g-tpm","key":"global","tokens_per_hour":5000,"token_type":"output","scope":"global",
         "service":{"cluster":"rls","domain":"llm-t","failure_mode":"deny"}}]}"#;
    let mut host = FakeHost { now: 1_000 * 60_000 * MS, ..FakeHost::default() };
    let mut w = worker(config);
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.request_headers.insert("authorization".into(), b"Bearer sk-1".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    host.code = Some(200);
    let ok = [0x08, 1];
    let over = [0x08, 2];

    // Admitted by both services: forwarded, then the output tokens are reported, less the
    // one token the check added.
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(&mut host, &mut w, false), Flow::Hold);
    assert_eq!(x.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true), Flow::Hold);
    assert!(x.is_waiting() && !x.is_holding() && x.is_buffering());
    assert_eq!(host.grpc_calls.len(), 2);
    let (service, message, timeout) = host.grpc_calls[0].clone();
    assert_eq!((service, timeout), (crate::limit::rls::encode_grpc_service("rls"), 50));
    let d = |key: &str| crate::limit::rls::Descriptor {
        entries: vec![("rule".into(), "g-rpm".into()), ("key".into(), key.into())],
        limit: Some((100, crate::limit::rls::Unit::Minute)),
    };
    assert_eq!(message, crate::limit::rls::encode_request("llm", &[d(&key_entry(&message))], 1));
    assert_eq!(x.on_global_answer(&mut host, &mut w, 2, Ok(&ok)), None, "one answer of two");
    assert_eq!(x.on_global_answer(&mut host, &mut w, 2, Ok(&ok)), None, "a token answers once");
    assert_eq!(x.on_global_answer(&mut host, &mut w, 1, Ok(&ok)), Some(Flow::Continue));
    assert!(!x.is_waiting());
    assert_eq!(host.gauges.get("model=.=gpt-4o;.;llm_active_requests"), Some(&1));
    x.on_response_headers(&mut host, &mut w);
    x.on_response_body(&mut host, CHAT_JSON.as_bytes(), true);
    x.on_log(&mut host, &mut w);
    let reports = w.take_reports();
    assert_eq!(reports.len(), 1, "only the token rule reports");
    assert_eq!(reports[0].rule, 2);
    let tpm = crate::limit::rls::Descriptor {
        entries: vec![("rule".into(), "g-tpm".into()), ("key".into(), "global".into())],
        limit: Some((5000, crate::limit::rls::Unit::Hour)),
    };
    assert_eq!(reports[0].message, crate::limit::rls::encode_request("llm-t", &[tpm], 9), "10 output tokens - 1");

    // Over the limit: a 429 naming the rule; the local reservation is given back.
    host.grpc_calls.clear();
    let mut y = Exchange::new();
    y.on_request_headers(&mut host, &mut w, false);
    assert_eq!(y.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true), Flow::Hold);
    assert_eq!(y.on_global_answer(&mut host, &mut w, 1, Ok(&over)), Some(Flow::Respond));
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(429));
    assert!(host.sent.as_ref().unwrap().2.contains("\"code\":\"g-rpm\""));
    assert_eq!(y.on_global_answer(&mut host, &mut w, 2, Ok(&ok)), None, "answered already");
    host.code = Some(429);
    y.on_log(&mut host, &mut w);
    assert!(w.take_reports().is_empty());
    assert_eq!(counter(&host, "model=.=gpt-4o;.;rule=.=g-rpm;.;llm_ratelimit_rejected_total"), 1);
    assert_eq!(host.gauges.get("model=.=gpt-4o;.;llm_active_requests"), Some(&0));

    // A failed call: g-rpm follows the top-level failure_mode (allow), g-tpm its own (deny).
    host.grpc_calls.clear();
    host.sent = None;
    let mut z = Exchange::new();
    z.on_request_headers(&mut host, &mut w, false);
    z.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true);
    assert_eq!(z.on_global_answer(&mut host, &mut w, 1, Err(())), None, "allowed; g-tpm still awaited");
    assert_eq!(counter(&host, "rule=.=g-rpm;.;llm_ratelimit_service_errors_total"), 1);
    assert_eq!(z.on_global_answer(&mut host, &mut w, 2, Ok(&[0x08])), Some(Flow::Respond), "undecodable");
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(503));
    assert_eq!(counter(&host, "rule=.=g-tpm;.;llm_ratelimit_service_errors_total"), 1);
    assert!(host.warnings.borrow().iter().any(|w| w.contains("rate limit service of rule 'g-rpm'")));

    // The service cannot even be called: the same, at once.
    host.grpc_down = true;
    host.sent = None;
    let mut v = Exchange::new();
    v.on_request_headers(&mut host, &mut w, false);
    assert_eq!(v.on_request_body(&mut host, &mut w, br#"{"model":"gpt-4o"}"#, true), Flow::Respond);
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(503));
    assert_eq!(counter(&host, "rule=.=g-rpm;.;llm_ratelimit_service_errors_total"), 2);
    assert_eq!(counter(&host, "rule=.=g-tpm;.;llm_ratelimit_service_errors_total"), 2);
}

#[test]
fn a_global_rejection_gives_back_every_local_charge() {
    let config = r#"{"limits":[
        {"name":"rpm","key":"header:authorization","requests_per_minute":10},
        {"name":"tpm","key":"header:authorization","tokens_per_minute":1000},
        {"name":"conc","key":"global","max_concurrent":1},
        {"name":"g","key":"global","requests_per_minute":5,"scope":"global",
         "service":{"cluster":"rls","domain":"llm"}}]}"#;
    let mut host = FakeHost { now: 1_000 * 60_000 * MS, ..FakeHost::default() };
    let mut w = worker(config);
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.request_headers.insert("authorization".into(), b"Bearer sk-1".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    let body = br#"{"model":"gpt-4o","max_tokens":50}"#;
    let estimate = crate::limit::enforce::estimate_input(&w.config, body.len() as u64) + 50;
    let h = |host: &FakeHost, n: &str| host.response_headers.get(n).map(|v| String::from_utf8_lossy(v).into_owned());

    // The local rules admit it, the service refuses it.
    let mut x = Exchange::new();
    x.on_request_headers(&mut host, &mut w, false);
    assert_eq!(x.on_request_body(&mut host, &mut w, body, true), Flow::Hold);
    assert_eq!(x.on_global_answer(&mut host, &mut w, 1, Ok(&[0x08, 2])), Some(Flow::Respond));
    assert_eq!(host.sent.as_ref().map(|s| s.0), Some(429));

    // While the rejected exchange has not even ended, the next one sees all of its limits:
    // its request, tokens and the one concurrency slot were given back.
    let mut y = Exchange::new();
    y.on_request_headers(&mut host, &mut w, false);
    assert_eq!(y.on_request_body(&mut host, &mut w, body, true), Flow::Hold, "the slot is free");
    assert_eq!(y.on_global_answer(&mut host, &mut w, 2, Ok(&[0x08, 1])), Some(Flow::Continue));
    y.on_response_headers(&mut host, &mut w);
    assert_eq!(h(&host, "x-ratelimit-remaining-requests").as_deref(), Some("9"));
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens"), Some((1000 - estimate).to_string()));

    // The rejected exchange ends: nothing is given back twice.
    host.code = Some(429);
    x.on_log(&mut host, &mut w);
    y.on_response_body(&mut host, CHAT_JSON.as_bytes(), true);
    host.code = Some(200);
    y.on_log(&mut host, &mut w);
    let mut z = Exchange::new();
    z.on_request_headers(&mut host, &mut w, false);
    z.on_request_body(&mut host, &mut w, body, true);
    assert_eq!(z.on_global_answer(&mut host, &mut w, 3, Ok(&[0x08, 1])), Some(Flow::Continue));
    z.on_response_headers(&mut host, &mut w);
    assert_eq!(h(&host, "x-ratelimit-remaining-requests").as_deref(), Some("8"));
    // y used 19 + 10 tokens (CHAT_JSON), z reserved its estimate.
    assert_eq!(h(&host, "x-ratelimit-remaining-tokens"), Some((1000 - 29 - estimate).to_string()));
    assert_eq!(counter(&host, "kind=.=ratelimit;.;llm_meter_errors_total"), 0);
}

#[test]
fn usage_missing_counts_only_completed_responses() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"text/event-stream".to_vec());
    host.code = Some(200);
    let start = "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    // The client leaves mid-stream, then the upstream resets one: failures, not blind spots.
    for flag in [flags::DOWNSTREAM_CONNECTION_TERMINATION, flags::UPSTREAM_CONNECTION_TERMINATION] {
        host.flags = Some(flag);
        let mut x = Exchange::new();
        x.on_request_headers(&mut host, &mut w, false);
        x.on_request_body(&mut host, &mut w, br#"{"model":"m","stream":true}"#, true);
        x.on_response_headers(&mut host, &mut w);
        x.on_response_body(&mut host, start.as_bytes(), false);
        x.on_log(&mut host, &mut w);
    }
    assert_eq!(counter(&host, "model=.=m;.;llm_usage_missing_total"), 0);
    let failed: u64 = host
        .counters
        .iter()
        .filter(|(k, _)| k.contains("llm_requests_total") && !k.contains("error_type=.=none;"))
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(failed, 2, "{:?}", host.counters);
    // The same stream completed without usage is one.
    host.flags = Some(0);
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"m"}"#,
        200,
        "text/event-stream",
        &[start.as_bytes(), b"data: [DONE]\n\n"],
    );
    assert_eq!(counter(&host, "model=.=m;.;llm_usage_missing_total"), 1);
}

#[test]
fn cost_and_usd_budgets_price_by_the_same_model() {
    // The request names an unpriced alias, the response the priced model.
    let mut host = FakeHost { now: 1_000 * 3_600_000 * MS, ..FakeHost::default() };
    let mut w = worker(
        r#"{"pricing":{"gpt-4o-2024-08-06":{"input":100,"output":100}},
            "limits":[{"name":"usd","key":"global","usd_per_hour":1}]}"#,
    );
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o"}"#,
        200,
        "application/json",
        &[CHAT_JSON.as_bytes()],
    );
    // 29 tokens at 100 USD per 1M: 2,900 µUSD in the metric ...
    assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;llm_cost_microusd_total"), 2900);
    assert_eq!(counter(&host, "reason=.=unpriced;.;llm_meter_skips_total"), 0);
    // ... and the same in the budget.
    let bucket = host
        .store
        .data
        .borrow()
        .iter()
        .find(|(k, _)| k.contains(".rl.usd."))
        .map(|(_, (v, _))| u64::from_le_bytes(v[8..16].try_into().unwrap()));
    assert_eq!(bucket, Some(2_900_000_000), "pico-USD charged to the budget");
    // A model no price resolves for: counted as unpriced, not charged.
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"free"}"#,
        200,
        "application/json",
        &[br#"{"model":"free","usage":{"prompt_tokens":5,"completion_tokens":5}}"#],
    );
    assert_eq!(counter(&host, "reason=.=unpriced;.;llm_meter_skips_total"), 1);
}

/// A chat completion of about `pad` bytes, brotli-compressed with a 16 MiB window, usage at
/// the end.
fn big_brotli_chat(pad: usize) -> (Vec<u8>, Vec<u8>) {
    use std::io::Write;
    let body = format!(
        r#"{{"model":"m","choices":[{{"message":{{"content":"{}"}}}}],"usage":{{"prompt_tokens":3,"completion_tokens":7}}}}"#,
        "abcdefghij".repeat(pad / 10)
    )
    .into_bytes();
    let mut w = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 24);
    w.write_all(&body).unwrap();
    (body, w.into_inner())
}

fn brotli_exchange(host: &mut FakeHost, w: &mut Worker, compressed: &[u8]) -> Vec<Option<Vec<u8>>> {
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    host.response_headers.insert("content-encoding".into(), b"br".to_vec());
    host.code = Some(200);
    let mut x = Exchange::new();
    x.on_request_headers(host, w, false);
    x.on_request_body(host, w, br#"{"model":"m"}"#, true);
    x.on_response_headers(host, w);
    let chunks: Vec<&[u8]> = compressed.chunks(16 * 1024).collect();
    let mut forwarded = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        forwarded.push(x.on_response_body(host, c, i + 1 == chunks.len()));
        x.sync_memory(host, w);
    }
    x.on_log(host, w);
    forwarded
}

#[test]
fn the_memory_budget_skips_what_does_not_fit_and_gives_everything_back() {
    let (_, compressed) = big_brotli_chat(6_000_000);
    // Default budget: the body decodes (its ring buffer grows to 8 MiB) and is metered; the
    // gauge saw it and is back at 0.
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    w.init_shared(&mut host);
    assert_eq!(host.gauges.get("llm_meter_memory_budget_bytes"), Some(&(256 << 20)));
    let forwarded = brotli_exchange(&mut host, &mut w, &compressed);
    assert!(forwarded.iter().all(Option::is_none), "the client's bytes pass untouched");
    assert_eq!(counter(&host, "model=.=m;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"), 7);
    assert_eq!(host.gauges.get("llm_meter_memory_bytes"), Some(&0));
    assert!(host.gauge_peaks["llm_meter_memory_bytes"] > 8 << 20, "{:?}", host.gauge_peaks);
    assert_eq!(Pool::with(Pool::held), 0);
    assert!(Pool::with(Pool::peak) > 8 << 20, "peak {}", Pool::with(Pool::peak));

    // A stream cap below what the body needs: refused mid-body, counted, unmetered, bytes
    // untouched, everything given back.
    let mut host = FakeHost::default();
    let mut w = worker(r#"{"memory":{"max_stream_bytes":1048576}}"#);
    let forwarded = brotli_exchange(&mut host, &mut w, &compressed);
    assert!(forwarded.iter().all(Option::is_none));
    assert_eq!(counter(&host, "reason=.=memory_budget;.;llm_meter_skips_total"), 1);
    assert_eq!(counter(&host, "model=.=m;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"), 0);
    assert_eq!(counter(&host, "reason=.=compressed;.;llm_meter_skips_total"), 0, "not a corrupt body");
    assert_eq!(Pool::with(Pool::held), 0);

    // A VM budget full of open streams refuses the next one at its headers.
    let mut host = FakeHost::default();
    let mut w = worker(r#"{"memory":{"max_stream_bytes_total":262144}}"#);
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.response_headers.insert(":status".into(), b"200".to_vec());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    host.code = Some(200);
    let fit = 262_144 / RESPONSE_SCAN_BYTES;
    let mut open: Vec<Exchange> = (0..=fit)
        .map(|_| {
            let mut x = Exchange::new();
            x.on_request_headers(&mut host, &mut w, false);
            x.on_request_body(&mut host, &mut w, br#"{"model":"m"}"#, true);
            x.on_response_headers(&mut host, &mut w);
            x
        })
        .collect();
    assert_eq!(open.iter().filter(|x| x.scans_response()).count(), fit);
    for x in &mut open {
        x.on_response_body(&mut host, CHAT_JSON.as_bytes(), true);
        x.on_log(&mut host, &mut w);
    }
    assert_eq!(counter(&host, "reason=.=memory_budget;.;llm_meter_skips_total"), 1);
    assert_eq!(counter(&host, "model=.=m;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"), 10 * fit as u64);
    assert_eq!(Pool::with(Pool::held), 0);
    Pool::with(|p| p.set_max_total(crate::memory::DEFAULT_MAX_TOTAL));
}

/// The value of the `key` entry of the first descriptor of an encoded request (a hash:
/// tests cannot predict it without re-hashing).
fn key_entry(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message);
    let start = text.find("key").unwrap() + 5;
    text[start..start + 32].to_string()
}

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
    exchange(
        &mut host,
        &mut w,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o"}"#,
        200,
        "application/json",
        &[CHAT_JSON.as_bytes()],
    );
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

/// One chat request for `model` through the exchange: the upstream answers `status` (with
/// `extra` response headers) and, for a 200, a body naming the model it received. Returns the
/// local reply if the filter answered, and the body the upstream got.
fn resilient_exchange(
    host: &mut FakeHost,
    w: &mut Worker,
    model: &str,
    status: u16,
    extra: &[(&str, &str)],
) -> (Option<Sent>, Vec<u8>) {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    host.sent = None;
    host.request_headers.clear();
    host.request_headers.insert(":path".into(), b"/v1/chat/completions".to_vec());
    host.request_headers.insert("content-length".into(), body.len().to_string().into_bytes());
    host.request_body = Some(body.clone().into_bytes());
    host.response_headers.clear();
    let mut x = Exchange::new();
    assert_eq!(x.on_request_headers(host, w, false), Flow::Hold);
    if x.on_request_body(host, w, body.as_bytes(), true) == Flow::Respond {
        host.code = host.sent.as_ref().map(|s| s.0);
        x.on_log(host, w);
        return (host.sent.clone(), Vec::new());
    }
    let upstream_got = host.request_body.clone().unwrap();
    let served: serde_json::Value = serde_json::from_slice(&upstream_got).unwrap();
    host.response_headers.insert(":status".into(), status.to_string().into_bytes());
    host.response_headers.insert("content-type".into(), b"application/json".to_vec());
    for (k, v) in extra {
        host.response_headers.insert(k.to_string(), v.as_bytes().to_vec());
    }
    host.code = Some(status);
    x.on_response_headers(host, w);
    let answer =
        format!(r#"{{"model":{},"choices":[],"usage":{{"prompt_tokens":4,"completion_tokens":2}}}}"#, served["model"]);
    x.on_response_body(host, answer.as_bytes(), true);
    x.on_log(host, w);
    (None, upstream_got)
}

#[test]
fn an_open_circuit_sends_requests_down_the_fallback_chain_then_answers_503() {
    let mut host = FakeHost { now: 1_000_000 * MS, ..FakeHost::default() };
    let mut w = worker(
        r#"{"resilience":{"circuit_breaker":{"failures":3,"open_seconds":2},
            "fallbacks":{"gpt-4.1":["claude-sonnet-4","gemini-2.5-flash"]}}}"#,
    );
    let model_of = |body: &[u8]| serde_json::from_slice::<serde_json::Value>(body).unwrap()["model"].clone();
    // Three 503s open gpt-4.1's circuit.
    for _ in 0..3 {
        let (sent, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 503, &[]);
        assert_eq!((sent, model_of(&got)), (None, serde_json::json!("gpt-4.1")));
    }
    assert_eq!(host.gauges.get("model=.=gpt-4.1;.;llm_model_state"), Some(&2));
    assert_eq!(counter(&host, "model=.=gpt-4.1;.;state=.=open;.;llm_circuit_transitions_total"), 1);
    // The 4th goes to claude-sonnet-4: rewritten body, metered as claude, header for the client.
    let (sent, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 200, &[]);
    assert_eq!((sent, model_of(&got)), (None, serde_json::json!("claude-sonnet-4")));
    assert_eq!(host.request_headers.get("content-length"), Some(&got.len().to_string().into_bytes()));
    assert_eq!(host.response_headers.get("x-llm-fallback-from").map(Vec::as_slice), Some(&b"gpt-4.1"[..]));
    assert_eq!(counter(&host, "model=.=gpt-4.1;.;to=.=claude-sonnet-4;.;llm_fallbacks_total"), 1);
    assert_eq!(counter(&host, "model=.=claude-sonnet-4;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"), 2);
    assert_eq!(
        counter(&host, "model=.=claude-sonnet-4;.;app=.=unknown;.;operation=.=chat;.;status=.=200;.;error_type=.=none;.;llm_requests_total"),
        1
    );
    // claude says when to come back (3 s): open until then, whatever the failure count.
    let (_, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 429, &[("retry-after", "3")]);
    assert_eq!(model_of(&got), serde_json::json!("claude-sonnet-4"));
    assert_eq!(host.gauges.get("model=.=claude-sonnet-4;.;llm_model_state"), Some(&2));
    // gemini fails three times too: the whole chain is open, answered here, not forwarded.
    for _ in 0..3 {
        let (_, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 500, &[]);
        assert_eq!(model_of(&got), serde_json::json!("gemini-2.5-flash"));
    }
    host.now += 100 * MS;
    let (sent, _) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 200, &[]);
    let (status, headers, body) = sent.expect("answered locally");
    assert_eq!(status, 503);
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (reply["error"]["type"].clone(), reply["error"]["code"].clone()),
        (serde_json::json!("server_error"), serde_json::json!("model_unavailable"))
    );
    assert!(body.contains("gpt-4.1, claude-sonnet-4, gemini-2.5-flash"), "{body}");
    // gpt-4.1 opened at t0 for 2 s; 100 ms have passed, so it reopens first, in 2 s (rounded up).
    assert_eq!(headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.as_str()), Some("2"));
    assert_eq!(
        counter(&host, "model=.=gpt-4.1;.;app=.=unknown;.;operation=.=chat;.;status=.=503;.;error_type=.=circuit_open;.;llm_requests_total"),
        1
    );
    assert_eq!(
        counter(&host, "model=.=gpt-4.1;.;rule=.=circuit_open;.;llm_ratelimit_rejected_total"),
        0,
        "not a rate limit"
    );
    // After open_seconds gpt-4.1 is half-open: one probe goes, its success closes the circuit.
    host.now += 2_000 * MS;
    let (sent, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 200, &[]);
    assert_eq!((sent, model_of(&got)), (None, serde_json::json!("gpt-4.1")));
    assert_eq!(counter(&host, "model=.=gpt-4.1;.;state=.=half_open;.;llm_circuit_transitions_total"), 1);
    assert_eq!(counter(&host, "model=.=gpt-4.1;.;state=.=closed;.;llm_circuit_transitions_total"), 1);
    assert_eq!(host.gauges.get("model=.=gpt-4.1;.;llm_model_state"), Some(&0));
    let (_, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 200, &[]);
    assert_eq!(model_of(&got), serde_json::json!("gpt-4.1"));
}

#[test]
fn without_resilience_nothing_changes() {
    let mut host = FakeHost::default();
    let mut w = worker("{}");
    for _ in 0..5 {
        let (sent, got) = resilient_exchange(&mut host, &mut w, "gpt-4.1", 503, &[]);
        assert!(sent.is_none());
        assert!(String::from_utf8(got).unwrap().contains("gpt-4.1"));
    }
    assert!(host.store.data.borrow().keys().all(|k| !k.contains(".cb.")), "no circuit kept");
    assert!(host.counters.keys().all(|k| !k.contains("circuit") && !k.contains("fallbacks")));
}
