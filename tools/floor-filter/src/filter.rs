//! The contexts: llm-meter's hostcalls per callback (see the crate doc), no other work.

use crate::abi;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The filter state llm-meter publishes its record in (`wasm.llm_meter`), declared as it does.
const RECORD_NAME: &str = "llm_meter";
/// llm-meter's default `metrics.flush_interval_ms`, also its timer period in the bench setups.
const FLUSH_MS: u64 = 250;
/// llm-meter's default `request.model_lookahead_bytes`: how much request body it holds.
const LOOKAHEAD_BYTES: usize = 64 * 1024;

/// Shared-data keys of the lengths llm-meter's are for the bench request (the rpm and tpm buckets
/// of an API key, the model's output estimate); values are 16 bytes, as there.
const RPM_KEY: &str = "floor_filter.rl.rpm.minute.bucket-of-an-api-key-00000001";
const TPM_KEY: &str = "floor_filter.rl.tpm.minute.bucket-of-an-api-key-00000001";
const ESTIMATE_KEY: &str = "floor_filter.estim.gpt-4o";
const _: () = assert!(RPM_KEY.len() == 56 && TPM_KEY.len() == 56 && ESTIMATE_KEY.len() == 25);

/// The headers llm-meter adds to an admitted response with (c)'s two rules, with values of the
/// lengths it writes (`x-ratelimit-reset-*` is 2 to 3 characters, by the second in the minute).
const RATELIMIT_HEADERS: [(&str, &str); 6] = [
    ("x-ratelimit-limit-requests", "100000000"),
    ("x-ratelimit-remaining-requests", "99999999"),
    ("x-ratelimit-reset-requests", "30s"),
    ("x-ratelimit-limit-tokens", "100000000000"),
    ("x-ratelimit-remaining-tokens", "99999999999"),
    ("x-ratelimit-reset-tokens", "30s"),
];

/// Histograms, recorded per request as llm-meter does (Envoy has no batched histogram call).
/// The names follow llm-meter's (labels as `key=.=value;.;` segments, the same suffixes, so the
/// same bucket settings of envoy/envoy.yaml apply), under the prefix `floor`.
const HISTOGRAMS: [&str; 5] = [
    "model=.=gpt-4o;.;token_type=.=input;.;floor_tokens_per_request",
    "model=.=gpt-4o;.;token_type=.=output;.;floor_tokens_per_request",
    "model=.=gpt-4o;.;app=.=bench;.;floor_request_duration_ms",
    "model=.=gpt-4o;.;app=.=bench;.;floor_time_to_first_token_ms",
    "model=.=gpt-4o;.;app=.=bench;.;floor_time_per_output_token_ms",
];
const TOKENS_IN: usize = 0;
const TOKENS_OUT: usize = 1;
const DURATION: usize = 2;
const TTFT: usize = 3;
const TPOT: usize = 4;

/// Counters and the active-requests gauge: held in the VM, sent in batches.
const HELD: [(MetricType, &str); 5] = [
    (
        MetricType::Counter,
        concat!(
            "model=.=gpt-4o;.;app=.=bench;.;operation=.=chat;.;status=.=200;.;",
            "error_type=.=none;.;floor_requests_total"
        ),
    ),
    (MetricType::Counter, "model=.=gpt-4o;.;app=.=bench;.;token_type=.=input;.;floor_tokens_total"),
    (MetricType::Counter, "model=.=gpt-4o;.;app=.=bench;.;token_type=.=output;.;floor_tokens_total"),
    (MetricType::Counter, "model=.=gpt-4o;.;app=.=bench;.;floor_cost_microusd_total"),
    (MetricType::Gauge, "model=.=gpt-4o;.;app=.=bench;.;floor_active_requests"),
];
const ACTIVE: usize = 4;
/// What each exchange adds to the held stats but the active gauge: a request, its input and
/// output tokens, its cost in micro-USD (fixed values: nothing is parsed).
const PER_EXCHANGE: [i64; 4] = [1, 31, 78, 858];

/// A record field's value. Numbers are 9 bytes in a `google.protobuf.Struct` whatever they are.
enum Value {
    Str(&'static str),
    Num,
    Bool,
}

/// The record llm-meter publishes for the bench's exchange, field by field in its order, with
/// its strings; `stream` adds the two per-token timings.
fn record_fields(stream: bool) -> Vec<(&'static str, Value)> {
    use Value::{Bool, Num, Str};
    let mut fields = vec![
        ("request_model", Str("gpt-4o")),
        ("model", Str("gpt-4o")),
        ("response_model", Str("gpt-4o-2024-08-06")),
        ("model_label", Str("gpt-4o")),
        ("app", Str("bench")),
        ("operation", Str("chat")),
        ("provider", Str("openai")),
        ("stream", Bool),
        ("status", Num),
        ("error_type", Str("none")),
        ("input_tokens", Num),
        ("output_tokens", Num),
        ("cached_input_tokens", Num),
        ("cache_creation_input_tokens", Num),
        ("reasoning_tokens", Num),
        ("cost_microusd", Num),
    ];
    if stream {
        fields.extend([("ttft_ms", Num), ("tpot_ms", Num)]);
    }
    fields.extend([("duration_ms", Num), ("key_hash", Str("0123456789ab"))]);
    fields
}

fn varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn bytes_field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
    out.push(number << 3 | 2);
    varint(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// The record as a serialized `Struct`, built once (470 bytes, streams 514: llm-meter's size).
fn encode_record(stream: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in record_fields(stream) {
        let mut v = Vec::new();
        match value {
            Value::Str(s) => bytes_field(&mut v, 3, s.as_bytes()),
            Value::Num => {
                v.push(2 << 3 | 1);
                v.extend_from_slice(&1.0f64.to_le_bytes());
            }
            Value::Bool => v.extend_from_slice(&[4 << 3, u8::from(stream)]),
        }
        let mut entry = Vec::new();
        bytes_field(&mut entry, 1, key.as_bytes());
        bytes_field(&mut entry, 2, &v);
        bytes_field(&mut out, 1, &entry);
    }
    out
}

/// `declare_property`'s arguments: the record is a `google.protobuf.Struct` living as long as
/// the request (llm-meter's `record::declare_arguments`).
fn declare_arguments() -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(&mut out, 1, RECORD_NAME.as_bytes());
    out.extend_from_slice(&[3 << 3, 3]);
    bytes_field(&mut out, 4, b"type.googleapis.com/google.protobuf.Struct");
    out.extend_from_slice(&[5 << 3, 1]);
    out
}

/// `{"limits": 0}` or `{}`: setup (b)'s hostcalls; `{"limits": 2}`: setup (c)'s.
fn limits_mode(config: &[u8]) -> Option<bool> {
    let text: String = std::str::from_utf8(config).ok()?.chars().filter(|c| !c.is_whitespace()).collect();
    match text.as_str() {
        "" | "{}" | r#"{"limits":0}"# => Some(false),
        r#"{"limits":2}"# => Some(true),
        _ => None,
    }
}

/// Per-VM state.
struct Vm {
    limits: bool,
    histograms: [u32; 5],
    held_ids: [u32; 5],
    /// Deltas of the held stats not sent yet.
    held: [i64; 5],
    last_flush: u64,
    /// The latest clock reading on this worker.
    latest_now: u64,
    /// The record of a non-streaming and of a streaming exchange.
    records: [Vec<u8>; 2],
    /// [`RATELIMIT_HEADERS`] as header map entries: the size pairs and the NUL-terminated data.
    ratelimit: (Vec<u8>, Vec<u8>),
}

impl Vm {
    fn new(limits: bool) -> Self {
        let mut sizes = Vec::new();
        let mut data = Vec::new();
        for (name, value) in RATELIMIT_HEADERS {
            sizes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            sizes.extend_from_slice(&(value.len() as u32).to_le_bytes());
            data.extend_from_slice(name.as_bytes());
            data.push(0);
            data.extend_from_slice(value.as_bytes());
            data.push(0);
        }
        Self {
            limits,
            histograms: HISTOGRAMS.map(|name| abi::define_metric(MetricType::Histogram, name)),
            held_ids: HELD.map(|(kind, name)| abi::define_metric(kind, name)),
            held: [0; 5],
            last_flush: 0,
            latest_now: 0,
            records: [encode_record(false), encode_record(true)],
            ratelimit: (sizes, data),
        }
    }

    /// Sends every held delta: one `increment_metric` per changed stat.
    fn flush(&mut self) {
        for (id, delta) in self.held_ids.iter().zip(self.held.iter_mut()) {
            if *delta != 0 {
                abi::increment_metric(*id, std::mem::take(delta));
            }
        }
        self.last_flush = self.latest_now;
    }

    /// `map` (serialized: header count, a (name size, value size) pair per header, then the
    /// NUL-terminated names and values) with [`RATELIMIT_HEADERS`] appended.
    fn with_ratelimit_headers(&self, map: &[u8]) -> Option<Vec<u8>> {
        let count = u32::from_le_bytes(map.get(..4)?.try_into().ok()?);
        let (sizes, data) = map.split_at_checked(4 + 8 * count as usize)?;
        let mut out = Vec::with_capacity(map.len() + self.ratelimit.0.len() + self.ratelimit.1.len());
        out.extend_from_slice(&(count + RATELIMIT_HEADERS.len() as u32).to_le_bytes());
        out.extend_from_slice(sizes.get(4..)?);
        out.extend_from_slice(&self.ratelimit.0);
        out.extend_from_slice(data);
        out.extend_from_slice(&self.ratelimit.1);
        Some(out)
    }
}

/// A read-modify-write of a shared-data value by compare-and-swap, without the modify.
fn touch(key: &str) {
    let (value, cas) = abi::shared_data(key);
    abi::set_shared_data(key, value.as_deref().unwrap_or(&[0; 16]), cas);
}

/// The clock, read at most once per callback, as llm-meter's glue reads it.
#[derive(Default)]
struct Clock(Option<u64>);

impl Clock {
    fn now(&mut self, vm: &mut Vm) -> u64 {
        *self.0.get_or_insert_with(|| {
            vm.latest_now = abi::now_nanos();
            vm.latest_now
        })
    }
}

#[derive(Default)]
struct Root {
    vm: Option<Rc<RefCell<Vm>>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _configuration_size: usize) -> bool {
        let config = abi::buffer(BufferType::PluginConfiguration, 0, usize::MAX).unwrap_or_default();
        let Some(limits) = limits_mode(&config) else {
            abi::log(LogLevel::Critical, r#"floor-filter: the configuration must be {"limits": 0} or {"limits": 2}"#);
            return false;
        };
        abi::call_foreign_function("declare_property", &declare_arguments());
        self.vm = Some(Rc::new(RefCell::new(Vm::new(limits))));
        abi::set_tick_period_ms(FLUSH_MS as u32);
        true
    }

    /// Sends the held updates, then reads the clock (llm-meter's `refresh_use` does, every tick).
    fn on_tick(&mut self) {
        let Some(mut vm) = self.vm.as_ref().and_then(|vm| vm.try_borrow_mut().ok()) else { return };
        if vm.held.iter().any(|&d| d != 0) {
            vm.flush();
        }
        Clock::default().now(&mut vm);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let vm = self.vm.clone()?;
        Some(Box::new(Http {
            vm,
            request_read: 0,
            admitted: false,
            started: 0,
            streamed: false,
            first_data: None,
            ended: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP exchange.
struct Http {
    vm: Rc<RefCell<Vm>>,
    /// Request body bytes read so far: while the request is paused Envoy buffers the body and
    /// each callback sees all of it, of which only the tail is new.
    request_read: usize,
    /// The request went on (llm-meter: the exchange became an active request).
    admitted: bool,
    started: u64,
    /// The response is a stream (`text/event-stream`).
    streamed: bool,
    first_data: Option<u64>,
    ended: Option<u64>,
}

/// The request is whole: (c)'s two rules charge their buckets; the request becomes active.
fn admit(vm: &mut Vm) {
    if vm.limits {
        touch(RPM_KEY);
        touch(TPM_KEY);
    }
    vm.held[ACTIVE] += 1;
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Ok(mut vm) = self.vm.try_borrow_mut() else { return Action::Continue };
        abi::header_map(MapType::HttpRequestHeaders);
        self.started = Clock::default().now(&mut vm);
        if end_of_stream {
            admit(&mut vm);
            self.admitted = true;
            return Action::Continue;
        }
        // Held until the body is read (llm-meter holds for the model and the limits).
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.admitted {
            return Action::Continue;
        }
        let Ok(mut vm) = self.vm.try_borrow_mut() else { return Action::Continue };
        if body_size > self.request_read {
            abi::buffer(BufferType::HttpRequestBody, self.request_read, body_size - self.request_read);
        }
        if !end_of_stream && body_size < LOOKAHEAD_BYTES {
            self.request_read = body_size;
            return Action::Pause;
        }
        admit(&mut vm);
        self.admitted = true;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Ok(vm) = self.vm.try_borrow() else { return Action::Continue };
        let map = abi::header_map(MapType::HttpResponseHeaders).unwrap_or_default();
        self.streamed = map.windows(17).any(|w| w == b"text/event-stream");
        if vm.limits {
            if let Some(map) = vm.with_ratelimit_headers(&map) {
                abi::set_header_map(MapType::HttpResponseHeaders, &map);
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Ok(mut vm) = self.vm.try_borrow_mut() else { return Action::Continue };
        let mut clock = Clock::default();
        if body_size > 0 {
            abi::buffer(BufferType::HttpResponseBody, 0, body_size);
            if self.streamed && self.first_data.is_none() {
                self.first_data = Some(clock.now(&mut vm));
            }
        }
        if end_of_stream {
            self.ended = Some(clock.now(&mut vm));
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let Ok(mut vm) = self.vm.try_borrow_mut() else { return };
        let vm = &mut *vm;
        let mut clock = Clock::default();
        if self.admitted {
            vm.held[ACTIVE] -= 1;
        }
        let end = self.ended.unwrap_or_else(|| clock.now(vm));
        for (held, add) in vm.held.iter_mut().zip(PER_EXCHANGE) {
            *held += add;
        }
        let [input, output, ..] = PER_EXCHANGE;
        abi::record_metric(vm.histograms[TOKENS_IN], input as u64);
        abi::record_metric(vm.histograms[TOKENS_OUT], output as u64);
        if vm.limits {
            // The tpm rule's reconciliation with the real usage, and the output estimate's update.
            clock.now(vm);
            touch(TPM_KEY);
            touch(ESTIMATE_KEY);
        }
        let ms = |nanos: u64| nanos.saturating_sub(self.started) / 1_000_000;
        abi::record_metric(vm.histograms[DURATION], ms(end));
        if self.streamed {
            abi::record_metric(vm.histograms[TTFT], self.first_data.map_or(0, ms));
            abi::record_metric(vm.histograms[TPOT], 1);
        }
        abi::set_property(RECORD_NAME, &vm.records[usize::from(self.streamed)]);
        if vm.latest_now >= vm.last_flush.saturating_add(FLUSH_MS * 1_000_000) {
            vm.flush();
        }
    }
}
