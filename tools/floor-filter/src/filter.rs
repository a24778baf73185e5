//! The contexts: llm-meter's hostcalls per callback (see the crate doc), no other work.

use crate::abi;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use serde_json::Value as Json;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The filter state llm-meter publishes its record in (`wasm.llm_meter`), declared as it does.
const RECORD_NAME: &str = "llm_meter";
/// llm-meter's default `metrics.flush_interval_ms`, also its timer period in the bench setups
/// without a global rule.
const FLUSH_MS: u64 = 250;
/// llm-meter's timer period with a global rule (`REPORT_EVERY_MS` of its glue, for the usage
/// reports): held counters are then sent every `FLUSH_MS / REPORT_EVERY_MS` = 2 ticks.
const REPORT_EVERY_MS: u64 = 100;
/// llm-meter's default `request.model_lookahead_bytes`: how much request body it holds.
const LOOKAHEAD_BYTES: usize = 64 * 1024;

/// Shared-data keys of the lengths llm-meter's are for the bench request (the rpm and tpm buckets
/// of an API key, the model's output estimate); values are 16 bytes, as there.
const RPM_KEY: &str = "floor_filter.rl.rpm.minute.bucket-of-an-api-key-00000001";
const TPM_KEY: &str = "floor_filter.rl.tpm.minute.bucket-of-an-api-key-00000001";
const ESTIMATE_KEY: &str = "floor_filter.estim.gpt-4o";
const _: () = assert!(RPM_KEY.len() == 56 && TPM_KEY.len() == 56 && ESTIMATE_KEY.len() == 25);

/// The rate limit service's gRPC service and method (llm-meter's `limit::rls`).
const RLS_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
const RLS_METHOD: &str = "ShouldRateLimit";
/// `envoy.type.v3.RateLimitUnit.MINUTE`: the unit of a `requests_per_minute` rule.
const UNIT_MINUTE: u64 = 2;

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

/// The headers llm-meter adds to an admitted response for a global request rule, from the
/// service's answer: the limit (the bench's 10^9), what is left (9 digits from the first request
/// on) and the reset, as long as it is at a minute window's start (`1m0s`; llm-meter's follows the
/// window down: `59s`, `9s`, and `420ms` in its last second).
const GLOBAL_RATELIMIT_HEADERS: [(&str, &str); 3] = [
    ("x-ratelimit-limit-requests", "1000000000"),
    ("x-ratelimit-remaining-requests", "999999999"),
    ("x-ratelimit-reset-requests", "1m0s"),
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

fn varint_field(out: &mut Vec<u8>, number: u8, n: u64) {
    out.push(number << 3);
    let mut n = n;
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// What the configuration asks for.
struct Mode {
    /// (c)'s two local rules.
    limits: bool,
    /// (g)'s global rule.
    global: Option<GlobalRule>,
}

/// The global rule of (g), as far as its call shows it.
struct GlobalRule {
    cluster: String,
    domain: String,
    rule: String,
    requests_per_minute: u32,
    timeout_ms: u64,
    /// How many keys the requests spread over (llm-meter: the distinct x-api-key values).
    keys: usize,
}

/// `{"limits": 0}` or `{}`: setup (b)'s hostcalls; `{"limits": 2}`: setup (c)'s; `{"limits": 0,
/// "global": {"cluster": C, "domain": D, "rule": R, "requests_per_minute": N, "timeout_ms": T,
/// "keys": K}}`: setup (g)'s, whose one global rule (named R, counted by the rate limit service of
/// cluster C in domain D, N requests per minute, calls timing out after T ms, default 1000)
/// sends a descriptor keyed by one of K (default 1) fixed keys, taken in turn.
fn mode(config: &[u8]) -> Result<Mode, String> {
    if config.iter().all(u8::is_ascii_whitespace) {
        return Ok(Mode { limits: false, global: None });
    }
    let json: Json = serde_json::from_slice(config).map_err(|e| e.to_string())?;
    let top = json.as_object().ok_or("not an object")?;
    if let Some(k) = top.keys().find(|k| !matches!(k.as_str(), "limits" | "global")) {
        return Err(format!("unknown field {k}"));
    }
    let limits = match top.get("limits").map(Json::as_u64) {
        None | Some(Some(0)) => false,
        Some(Some(2)) => true,
        _ => return Err("limits must be 0 or 2".into()),
    };
    let Some(g) = top.get("global") else { return Ok(Mode { limits, global: None }) };
    if limits {
        return Err("global goes with limits 0 (setup g has no local rules)".into());
    }
    let g = g.as_object().ok_or("global must be an object")?;
    let known = ["cluster", "domain", "rule", "requests_per_minute", "timeout_ms", "keys"];
    if let Some(k) = g.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown field global.{k}"));
    }
    let text = |name: &str| -> Result<String, String> {
        let value = g.get(name).and_then(Json::as_str).unwrap_or_default();
        // Short ASCII: the serialized GrpcService then passes as a `&str` (see `Global::new`).
        if value.is_empty() || value.len() > 100 || !value.is_ascii() {
            return Err(format!("global.{name} must be 1 to 100 ASCII characters"));
        }
        Ok(value.to_string())
    };
    let number = |name: &str, default: Option<u64>, max: u64| -> Result<u64, String> {
        match g.get(name).map(Json::as_u64).unwrap_or(default) {
            Some(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!("global.{name} must be a number from 1 to {max}")),
        }
    };
    Ok(Mode {
        limits,
        global: Some(GlobalRule {
            cluster: text("cluster")?,
            domain: text("domain")?,
            rule: text("rule")?,
            requests_per_minute: u32::try_from(number("requests_per_minute", None, u64::from(u32::MAX))?)
                .map_err(|e| e.to_string())?,
            timeout_ms: number("timeout_ms", Some(1000), 60_000)?,
            keys: usize::try_from(number("keys", Some(1), 1000)?).map_err(|e| e.to_string())?,
        }),
    })
}

/// The global rule's call, built once: the serialized `GrpcService` naming the cluster and one
/// `RateLimitRequest` per key, encoded as llm-meter's `rls::encode_grpc_service` and
/// `rls::encode_request` encode them for the rule: the same bytes but the key's value (73 bytes
/// for the bench's rule).
struct Global {
    grpc_service: String,
    messages: Vec<Vec<u8>>,
    next: usize,
    timeout: Duration,
    /// `floor_global_failures_total`: calls that failed (never, in a run that measures anything).
    failures: u32,
}

impl Global {
    fn new(rule: &GlobalRule) -> Option<Self> {
        let mut envoy_grpc = Vec::new();
        bytes_field(&mut envoy_grpc, 1, rule.cluster.as_bytes());
        let mut service = Vec::new();
        bytes_field(&mut service, 1, &envoy_grpc);
        let messages = (0..rule.keys)
            .map(|i| {
                // llm-meter's key entry: the hex of 16 bytes of SHA-256 of the key; here a fixed
                // stand-in of the same length per key.
                let key = format!("f{i:031x}");
                let mut desc = Vec::new();
                for (k, v) in [("rule", rule.rule.as_str()), ("key", key.as_str())] {
                    let mut entry = Vec::new();
                    bytes_field(&mut entry, 1, k.as_bytes());
                    bytes_field(&mut entry, 2, v.as_bytes());
                    bytes_field(&mut desc, 1, &entry);
                }
                let mut limit = Vec::new();
                varint_field(&mut limit, 1, u64::from(rule.requests_per_minute));
                varint_field(&mut limit, 2, UNIT_MINUTE);
                bytes_field(&mut desc, 2, &limit);
                let mut out = Vec::new();
                bytes_field(&mut out, 1, rule.domain.as_bytes());
                bytes_field(&mut out, 2, &desc);
                varint_field(&mut out, 3, 1); // hits_addend: the request
                out
            })
            .collect();
        Some(Self {
            grpc_service: String::from_utf8(service).ok()?,
            messages,
            next: 0,
            timeout: Duration::from_millis(rule.timeout_ms),
            failures: abi::define_metric(MetricType::Counter, "floor_global_failures_total"),
        })
    }

    /// Starts the call of the next key: its token, `None` if Envoy refused it.
    fn dispatch(&mut self) -> Option<u32> {
        let message = self.messages.get(self.next)?;
        self.next = (self.next + 1) % self.messages.len();
        // As llm-meter's `WasmHost::grpc_call`: the SDK's call, which registers the token so that
        // the answer reaches this context (`Http::on_grpc_call_response`).
        proxy_wasm::hostcalls::dispatch_grpc_call(
            &self.grpc_service,
            RLS_SERVICE,
            RLS_METHOD,
            Vec::new(),
            Some(message),
            self.timeout,
        )
        .ok()
    }

    fn failed(&self) {
        abi::increment_metric(self.failures, 1);
    }
}

/// Per-VM state.
struct Vm {
    limits: bool,
    global: Option<Global>,
    histograms: [u32; 5],
    held_ids: [u32; 5],
    /// Deltas of the held stats not sent yet.
    held: [i64; 5],
    last_flush: u64,
    /// The latest clock reading on this worker.
    latest_now: u64,
    /// The timer's period, ms; ticks per flush of the held stats, and the ticks since the last.
    tick_ms: u64,
    ticks_per_flush: u32,
    ticks: u32,
    /// The record of a non-streaming and of a streaming exchange.
    records: [Vec<u8>; 2],
    /// The `x-ratelimit-*` headers of an admitted response ([`RATELIMIT_HEADERS`] for (c),
    /// [`GLOBAL_RATELIMIT_HEADERS`] for (g), none for (b)) as header map entries: their count,
    /// the size pairs and the NUL-terminated data.
    ratelimit: Option<(u32, Vec<u8>, Vec<u8>)>,
    /// (c): a response ending at or after this (ns) updates the output estimate at once; the
    /// estimate has responses held for the next tick.
    estimate_at_once: u64,
    estimate_held: bool,
}

impl Vm {
    fn new(limits: bool, global: Option<Global>) -> Self {
        let headers: &[(&str, &str)] = match (limits, &global) {
            (true, _) => &RATELIMIT_HEADERS,
            (false, Some(_)) => &GLOBAL_RATELIMIT_HEADERS,
            (false, None) => &[],
        };
        let mut sizes = Vec::new();
        let mut data = Vec::new();
        for (name, value) in headers {
            sizes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            sizes.extend_from_slice(&(value.len() as u32).to_le_bytes());
            data.extend_from_slice(name.as_bytes());
            data.push(0);
            data.extend_from_slice(value.as_bytes());
            data.push(0);
        }
        let tick_ms = if global.is_some() { REPORT_EVERY_MS } else { FLUSH_MS };
        Self {
            limits,
            global,
            histograms: HISTOGRAMS.map(|name| abi::define_metric(MetricType::Histogram, name)),
            held_ids: HELD.map(|(kind, name)| abi::define_metric(kind, name)),
            held: [0; 5],
            last_flush: 0,
            latest_now: 0,
            tick_ms,
            ticks_per_flush: (FLUSH_MS / tick_ms).max(1) as u32,
            ticks: 0,
            records: [encode_record(false), encode_record(true)],
            ratelimit: (!headers.is_empty()).then_some((headers.len() as u32, sizes, data)),
            estimate_at_once: 0,
            estimate_held: false,
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
    /// NUL-terminated names and values) with the `x-ratelimit-*` headers appended.
    fn with_ratelimit_headers(&self, map: &[u8]) -> Option<Vec<u8>> {
        let (added, added_sizes, added_data) = self.ratelimit.as_ref()?;
        let count = u32::from_le_bytes(map.get(..4)?.try_into().ok()?);
        let (sizes, data) = map.split_at_checked(4 + 8 * count as usize)?;
        let mut out = Vec::with_capacity(map.len() + added_sizes.len() + added_data.len());
        out.extend_from_slice(&(count + added).to_le_bytes());
        out.extend_from_slice(sizes.get(4..)?);
        out.extend_from_slice(added_sizes);
        out.extend_from_slice(data);
        out.extend_from_slice(added_data);
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
        let mode = match mode(&config) {
            Ok(mode) => mode,
            Err(e) => {
                let message = format!(
                    r#"floor-filter: the configuration must be {{"limits": 0}}, {{"limits": 2}} or {{"limits": 0, "global": {{...}}}} (see filter.rs): {e}"#
                );
                abi::log(LogLevel::Critical, &message);
                return false;
            }
        };
        abi::call_foreign_function("declare_property", &declare_arguments());
        let global = match mode.global.as_ref().map(Global::new) {
            None => None,
            Some(Some(global)) => Some(global),
            Some(None) => {
                abi::log(LogLevel::Critical, "floor-filter: global.cluster cannot be passed as a GrpcService");
                return false;
            }
        };
        let vm = Vm::new(mode.limits, global);
        abi::set_tick_period_ms(vm.tick_ms as u32);
        self.vm = Some(Rc::new(RefCell::new(vm)));
        true
    }

    /// Sends the held updates every `ticks_per_flush` ticks (llm-meter's `Batch::tick`), reads
    /// the clock (llm-meter's `refresh_use` does, every tick), and (c) updates the output
    /// estimate if responses were held for it (`Worker::flush_estimates`).
    fn on_tick(&mut self) {
        let Some(mut vm) = self.vm.as_ref().and_then(|vm| vm.try_borrow_mut().ok()) else { return };
        vm.ticks += 1;
        if vm.ticks >= vm.ticks_per_flush {
            vm.ticks = 0;
            if vm.held.iter().any(|&d| d != 0) {
                vm.flush();
            }
        }
        Clock::default().now(&mut vm);
        if std::mem::take(&mut vm.estimate_held) {
            touch(ESTIMATE_KEY);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let vm = self.vm.clone()?;
        Some(Box::new(Http {
            vm,
            request_read: 0,
            admitted: false,
            waiting: None,
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
    /// The global rule's call, awaited: its token.
    waiting: Option<u32>,
    started: u64,
    /// The response is a stream (`text/event-stream`).
    streamed: bool,
    first_data: Option<u64>,
    ended: Option<u64>,
}

/// The request is whole: (c)'s two rules charge their buckets, or (g)'s global rule asks the
/// service (`Exchange::check_global` calls; the descriptor's window is taken at the request's
/// arrival, no clock read) and the request waits for the answer: the call's token. Else
/// (`None`) it becomes active and goes on.
fn admit(vm: &mut Vm) -> Option<u32> {
    if vm.limits {
        touch(RPM_KEY);
        touch(TPM_KEY);
    }
    if vm.global.is_some() {
        if let Some(g) = vm.global.as_mut() {
            match g.dispatch() {
                Some(token) => return Some(token),
                // Refused: fail open, as llm-meter's `failure_mode: allow`.
                None => g.failed(),
            }
        }
    }
    vm.held[ACTIVE] += 1;
    None
}

impl Http {
    /// After [`admit`]: waits for the answer, or goes on as an active request.
    fn after_admit(&mut self, waiting: Option<u32>) -> Action {
        self.waiting = waiting;
        self.admitted = waiting.is_none();
        if self.admitted {
            Action::Continue
        } else {
            Action::Pause
        }
    }
}

impl Context for Http {
    /// The global rule's answer (llm-meter's `Http::on_grpc_call_response`): the message copied
    /// into the VM (`grpc_response`; not decoded: whatever it says, the request goes on) and
    /// the request resumed (no clock read: `Exchange::on_global_answer` takes the request's
    /// arrival as its time). Reaching it took one VM entry (`proxy_on_grpc_receive`, into the root context)
    /// and the SDK's `set_effective_context`.
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if self.waiting != Some(token_id) {
            return;
        }
        self.waiting = None;
        let Ok(mut vm) = self.vm.try_borrow_mut() else { return };
        if status_code != 0 {
            if let Some(g) = vm.global.as_ref() {
                g.failed();
            }
        } else if response_size > 0 {
            abi::buffer(BufferType::GrpcReceiveBuffer, 0, response_size);
        }
        vm.held[ACTIVE] += 1;
        drop(vm);
        self.admitted = true;
        abi::resume_request();
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Ok(mut vm) = self.vm.try_borrow_mut() else { return Action::Continue };
        abi::header_map(MapType::HttpRequestHeaders);
        let mut clock = Clock::default();
        self.started = clock.now(&mut vm);
        if end_of_stream {
            let waiting = admit(&mut vm);
            drop(vm);
            return self.after_admit(waiting);
        }
        // Held until the body is read (llm-meter holds for the model and the limits).
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.admitted {
            return Action::Continue;
        }
        if self.waiting.is_some() {
            return Action::Pause;
        }
        let Ok(mut vm) = self.vm.try_borrow_mut() else { return Action::Continue };
        if body_size > self.request_read {
            abi::buffer(BufferType::HttpRequestBody, self.request_read, body_size - self.request_read);
        }
        if !end_of_stream && body_size < LOOKAHEAD_BYTES {
            self.request_read = body_size;
            return Action::Pause;
        }
        let waiting = admit(&mut vm);
        drop(vm);
        self.after_admit(waiting)
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Ok(vm) = self.vm.try_borrow() else { return Action::Continue };
        let map = abi::header_map(MapType::HttpResponseHeaders).unwrap_or_default();
        self.streamed = map.windows(17).any(|w| w == b"text/event-stream");
        if let Some(map) = vm.with_ratelimit_headers(&map) {
            abi::set_header_map(MapType::HttpResponseHeaders, &map);
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
            // (c): the tpm rule's reconciliation with the real usage, as of the response's end
            // (llm-meter's `enforce::release`, no clock read of its own). The model's output
            // estimate learns on the timer, as llm-meter's busy worker does.
            touch(TPM_KEY);
            // The model's output estimate: at once for the first response of an interval, else
            // held for the timer, as llm-meter's `estimate::Pending`.
            if end >= vm.estimate_at_once {
                vm.estimate_at_once = end.saturating_add(FLUSH_MS * 1_000_000);
                touch(ESTIMATE_KEY);
            } else {
                vm.estimate_held = true;
            }
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
