//! proxy-wasm glue: adapts Envoy's callbacks to [`crate::filter`].
//!
//! Only this module and [`crate::host::wasm_abi`] touch proxy-wasm. The SDK provides the entry points
//! (`proxy_on_*`, the context traits, the allocator); every hostcall goes through `wasm_abi`,
//! which returns the host's status instead of panicking as the SDK's wrappers do (a panic kills
//! the VM, and every later request on that worker passes unmetered). Hostcall errors are counted
//! (`meter_errors_total{kind="hostcall"}`) and logged. The one exception is the gRPC callout of
//! global limits: only the SDK's `dispatch_grpc_call` registers the call's token, without which
//! the answer never reaches the context; it panics only on `BadArgument`, which Envoy gives for
//! an unknown cluster name, and the filter passes a serialized `GrpcService` instead, for which
//! Envoy fails the call rather than the dispatch (see `WasmHost::grpc_call`).

use crate::config::Config;
use crate::filter::hold;
use crate::filter::{Exchange, Flow, Host, InternalError, MetricKind, Worker};
use crate::host::wasm_abi as abi;
use crate::meter::deltas::Batch;
use crate::meter::labels::{SharedStore, StoreError};
use crate::meter::metrics::{stat_name, Metric};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// Timer period when global rules have usage reports to send (see [`crate::limit::global`]): a
/// report leaves at most this long after its response ended.
const REPORT_EVERY_MS: u64 = 100;
use std::rc::Rc;

/// The largest record buffer a worker keeps between requests (a record is at most about 2 KB:
/// its texts are bounded).
const RECORD_BUFFER_KEPT: usize = 4096;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Per-VM (per Envoy worker) state behind the root context.
struct State {
    worker: Worker,
    metrics: MetricIds,
    /// Contexts whose stalled hold the timer released; their exchange learns it on its next
    /// callback.
    released: BTreeSet<u32>,
    /// Usage reports sent by the root context and not answered yet, by token (without their
    /// message).
    reports: HashMap<u32, crate::limit::global::Call>,
}

/// Envoy metric ids by stat name, and the counter and gauge updates not sent yet. Defining a
/// metric is a hostcall that allocates a new id each time, so ids are defined once per VM and
/// reused. The names are bounded by the label bounds. The exchange addresses a stat by its index
/// here (dense, so [`Batch`] holds updates in a vector): `envoy[index]` is Envoy's id.
#[derive(Default)]
struct MetricIds {
    ids: HashMap<String, u32>,
    envoy: Vec<u32>,
    /// Counter and gauge deltas held until the next flush (`metrics.flush_interval_ms`).
    batch: Batch,
    /// The latest clock reading on this worker (any callback).
    latest_now: std::cell::Cell<u64>,
    hostcall_errors: Option<u32>,
    /// The serialized record, reused from request to request (see [`RECORD_BUFFER_KEPT`]).
    record_buffer: Vec<u8>,
    failures_logged: std::cell::Cell<u64>,
    /// The record's filter state was declared a `google.protobuf.Struct` (see
    /// [`crate::record`]); otherwise records are published as JSON text.
    records_typed: bool,
}

impl MetricIds {
    fn get(&mut self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(&index) = self.ids.get(name) {
            return Some(index);
        }
        let index = u32::try_from(self.envoy.len()).ok()?;
        match abi::define_metric(kind, name) {
            Ok(id) => {
                self.ids.insert(name.to_string(), index);
                self.envoy.push(id);
                Some(index)
            }
            Err(status) => {
                self.hostcall_failed("define_metric", status);
                None
            }
        }
    }

    fn add(&mut self, index: u32, delta: i64) {
        if !self.batch.hold(index, delta) {
            if let Some(&id) = self.envoy.get(index as usize) {
                self.check("increment_metric", abi::increment_metric(id, delta));
            }
        }
    }

    fn record(&mut self, index: u32, value: u64) {
        // A gauge set overrides the deltas held for it (histograms have none).
        self.batch.forget(index);
        if let Some(&id) = self.envoy.get(index as usize) {
            self.check("record_metric", abi::record_metric(id, value));
        }
    }

    /// A timer tick: sends the held updates when their interval is over.
    fn tick(&mut self) {
        if self.batch.tick() {
            self.flush();
        }
    }

    /// A request ended: sends the held updates if the last flush is an interval old (see
    /// [`Batch::request_ended`]; by the latest clock reading, no new one).
    fn request_ended(&mut self) {
        if self.batch.request_ended(self.latest_now.get()) {
            self.flush();
        }
    }

    /// Sends every held update: one hostcall per changed stat.
    fn flush(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        batch.flush(self.latest_now.get(), |index, delta| {
            if let Some(&id) = self.envoy.get(index as usize) {
                self.check("increment_metric", abi::increment_metric(id, delta));
            }
        });
        self.batch = batch;
    }

    fn check(&self, call: &str, result: Result<(), Status>) {
        if let Err(status) = result {
            self.hostcall_failed(call, status);
        }
    }

    /// Counts a failed hostcall and logs it (the 1st, 2nd, 4th, 8th… time on this worker).
    fn hostcall_failed(&self, call: &str, status: Status) {
        if let Some(id) = self.hostcall_errors {
            let _ = abi::increment_metric(id, 1);
        }
        let n = self.failures_logged.get() + 1;
        self.failures_logged.set(n);
        if n.is_power_of_two() {
            log(LogLevel::Warn, &format!("llm-meter: hostcall {call} failed: {status:?} ({n} failures so far)"));
        }
    }
}

fn log(level: LogLevel, message: &str) {
    let _ = abi::log(level, message);
}

#[derive(Default)]
struct Root {
    state: Option<Rc<RefCell<State>>>,
}

impl Context for Root {
    /// The VM is stopping (the filter's configuration was replaced or Envoy shuts down): sends
    /// the counter updates still held.
    fn on_done(&mut self) -> bool {
        if let Some(mut state) = self.state.as_ref().and_then(|s| s.try_borrow_mut().ok()) {
            let State { worker, metrics, .. } = &mut *state;
            worker.flush_estimates(&mut WasmHost::new(metrics, 0));
            metrics.flush();
        }
        true
    }

    /// The answer to a usage report: a failure is counted; an answer shows the rule's use and
    /// may cross its `warn_at` (an OVER_LIMIT answer is the service counting usage beyond the
    /// limit, as it should).
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(state) = self.state.as_ref() else { return };
        let Ok(mut guard) = state.try_borrow_mut() else { return };
        let State { worker, metrics, reports, .. } = &mut *guard;
        let Some(call) = reports.remove(&token_id) else { return };
        let response = grpc_response(status_code, response_size);
        worker.report_answered(&mut WasmHost::new(metrics, 0), &call, response.as_deref().map_err(|_| ()));
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _configuration_size: usize) -> bool {
        let bytes = match abi::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log(LogLevel::Critical, &format!("llm-meter: cannot read the plugin configuration: {status:?}"));
                return false;
            }
        };
        let config = match Config::parse(&bytes) {
            Ok(config) => config,
            Err(e) => {
                log(LogLevel::Critical, &format!("llm-meter: invalid configuration: {e}"));
                return false;
            }
        };
        let mut metrics = MetricIds::default();
        let errors_name =
            stat_name(&config.metrics.prefix, Metric::MeterErrorsTotal, &[InternalError::Hostcall.as_str()]);
        metrics.hostcall_errors = abi::define_metric(MetricType::Counter, &errors_name).ok();
        if config.records.enabled {
            let args = crate::record::declare_arguments(&config.records.filter_state);
            match abi::call_foreign_function("declare_property", &args) {
                Ok(()) => metrics.records_typed = true,
                Err(status) => log(
                    LogLevel::Warn,
                    &format!(
                        "llm-meter: cannot declare filter state wasm.{} ({status:?}): records are published as \
                         JSON text, read them with %FILTER_STATE(wasm.{}:PLAIN)%",
                        config.records.filter_state, config.records.filter_state
                    ),
                ),
            }
        }
        let mut worker = Worker::new(config);
        let mut host = WasmHost::new(&mut metrics, 0);
        worker.init_shared(&mut host);
        log(LogLevel::Info, "llm-meter: configured");
        let holds = worker.config().request.model_lookahead_bytes > 0;
        start_timer(&worker, &mut metrics, holds);
        self.state =
            Some(Rc::new(RefCell::new(State { worker, metrics, released: BTreeSet::new(), reports: HashMap::new() })));
        true
    }

    /// Sends the usage reports of global rules (from the root context, whose calls outlive the
    /// streams that made them), and releases held requests that never got a body callback (see
    /// [`crate::filter::hold`]).
    fn on_tick(&mut self) {
        let Some(state) = self.state.as_ref() else { return };
        let Ok(mut guard) = state.try_borrow_mut() else { return };
        let State { worker, metrics, released, reports } = &mut *guard;
        metrics.tick();
        let mut host = WasmHost::new(metrics, 0);
        worker.refresh_circuits(&mut host);
        worker.refresh_use(&mut host);
        worker.flush_estimates(&mut host);
        for mut call in worker.take_reports() {
            match worker.call_service(&mut host, &call) {
                Some(token) => {
                    // Only the rule, hits and key are needed for the answer.
                    call.message = Vec::new();
                    reports.insert(token, call);
                }
                None => worker.count_service_error(&mut host, call.rule),
            }
        }
        if worker.holds.waiting() == 0 {
            return;
        }
        let stalled = worker.holds.stalled(host.now_nanos());
        for context in stalled.contexts {
            worker.count_error(&mut host, InternalError::HoldStalled);
            let resumed = abi::set_effective_context(context).and_then(|()| abi::resume_http_request());
            host.check("resume_http_request", resumed);
            released.insert(context);
        }
        if stalled.disabled_now {
            log(
                LogLevel::Error,
                "llm-meter: a held request got no body callback; set `allow_on_headers_stop_iteration: true` in \
                 the Wasm filter's config (Envoy >= 1.35). Holding requests for the model is off on this worker.",
            );
            start_timer(worker, metrics, false);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            state: self.state.clone(),
            context_id,
            exchange: Exchange::new(),
            request_buffered: 0,
            request_body_size: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A finished gRPC call: the response message (empty if none came), or `Err` for a status
/// other than OK.
fn grpc_response(status_code: u32, response_size: usize) -> Result<Vec<u8>, ()> {
    if status_code != 0 {
        return Err(());
    }
    Ok(Http::body(BufferType::GrpcReceiveBuffer, 0, response_size).unwrap_or_default())
}

/// Sets the root context's timer to the shortest period a configured feature needs (none: no
/// timer): global rules' reports ([`REPORT_EVERY_MS`]), the hold watchdog and circuit refresh
/// ([`hold::CHECK_EVERY_MS`]; `holds`: the watchdog is still needed), and the flush of held
/// counter updates (`metrics.flush_interval_ms`, a multiple of the period).
fn start_timer(worker: &Worker, metrics: &mut MetricIds, holds: bool) {
    let flush_ms = worker.config().metrics.flush_interval_ms;
    let needs = [
        worker.limits_need_tick().then_some(REPORT_EVERY_MS),
        (holds || worker.config().resilience.is_active()).then_some(hold::CHECK_EVERY_MS),
        (flush_ms > 0).then_some(flush_ms),
    ];
    let period = needs.into_iter().flatten().min().unwrap_or(0);
    // The tick count per flush changes with the period: send what is held under the old one.
    metrics.flush();
    metrics.batch = Batch::new(flush_ms, period);
    set_tick(period);
}

fn set_tick(ms: u64) {
    if let Err(status) = abi::set_tick_period_ms(u32::try_from(ms).unwrap_or(u32::MAX)) {
        log(LogLevel::Warn, &format!("llm-meter: cannot set the timer: {status:?}"));
    }
}

/// One HTTP stream. Callbacks forward traffic, except that request headers are held until the
/// model is read (bounded by `request.model_lookahead_bytes` and the [`crate::filter::hold`] watchdog).
struct Http {
    state: Option<Rc<RefCell<State>>>,
    context_id: u32,
    exchange: Exchange,
    /// Request body bytes Envoy holds for us (buffered while the request is held), already
    /// scanned: each body callback then sees the whole buffer, of which only the tail is new.
    request_buffered: usize,
    /// `body_size` of the current request body callback.
    request_body_size: usize,
}

impl Http {
    /// Runs `f` with the worker state. The state is only borrowed for the duration of one
    /// callback and callbacks do not nest, so the borrow cannot fail in practice; if it ever
    /// did, the event is dropped (fail-open) rather than panicking.
    fn with<R>(&mut self, f: impl FnOnce(&mut Exchange, &mut WasmHost<'_>, &mut Worker) -> R) -> Option<R> {
        let state = self.state.as_ref()?;
        let Ok(mut guard) = state.try_borrow_mut() else {
            log(LogLevel::Error, "llm-meter: worker state busy; event not metered");
            return None;
        };
        let State { worker, metrics, released, .. } = &mut *guard;
        // The watchdog may have released this request since the last callback.
        if released.remove(&self.context_id) {
            self.exchange.stop_holding();
        }
        let was_holding = self.exchange.is_holding();
        let mut host = WasmHost::new(metrics, self.request_body_size);
        let result = f(&mut self.exchange, &mut host, worker);
        match (was_holding, self.exchange.is_holding()) {
            (false, true) => worker.holds.started(self.context_id, host.now_nanos()),
            (true, false) => worker.holds.ended(self.context_id),
            _ => {}
        }
        Some(result)
    }

    fn body(kind: BufferType, start: usize, size: usize) -> Option<Vec<u8>> {
        if size <= start {
            return None;
        }
        abi::get_buffer(kind, start, size - start).ok().flatten()
    }

    /// Hold or forward; anything but a clear hold forwards (fail-open).
    fn action(flow: Option<Flow>) -> Action {
        match flow {
            Some(Flow::Hold | Flow::Respond) => Action::Pause,
            _ => Action::Continue,
        }
    }
}

impl Context for Http {
    /// A rate limit service answered (or the call failed): the request goes on or is rejected.
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let response = grpc_response(status_code, response_size);
        let result = response.as_deref().map_err(|_| ());
        let flow = self.with(|x, host, worker| x.on_global_answer(host, worker, token_id, result)).flatten();
        if flow == Some(Flow::Continue) {
            if let Err(status) = abi::resume_http_request() {
                log(LogLevel::Warn, &format!("llm-meter: cannot resume the request: {status:?}"));
            }
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        trap_on_demand("request-headers");
        // Pausing the headers makes Envoy buffer the body chunks we pause too, until a body
        // callback continues: then headers and buffered body are forwarded together.
        Self::action(self.with(|x, host, worker| x.on_request_headers(host, worker, end_of_stream)))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        trap_on_demand("request-body");
        self.request_body_size = body_size;
        if !self.exchange.wants_request_body() {
            return Action::Continue;
        }
        // A body callback on a held request proves holding works on this worker (unless the
        // watchdog released it already: `with` below then stops holding before reading it).
        if let Some(state) = self.state.as_ref().and_then(|s| s.try_borrow_mut().ok()).as_mut() {
            if state.released.remove(&self.context_id) {
                self.exchange.stop_holding();
            } else if self.exchange.is_holding() {
                state.worker.holds.body_seen(self.context_id);
            }
        }
        let start = if self.exchange.is_buffering() { self.request_buffered } else { 0 };
        let chunk = Self::body(BufferType::HttpRequestBody, start, body_size).unwrap_or_default();
        let action = Self::action(self.with(|x, host, worker| x.on_request_body(host, worker, &chunk, end_of_stream)));
        self.request_buffered = if action == Action::Pause { body_size } else { 0 };
        action
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        trap_on_demand("response-headers");
        self.with(|x, host, worker| x.on_response_headers(host, worker));
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        trap_on_demand("response-body");
        if self.exchange.wants_response_body() {
            let chunk = if self.exchange.scans_response() || self.exchange.rewrites_response() {
                Self::body(BufferType::HttpResponseBody, 0, body_size).unwrap_or_default()
            } else {
                Vec::new()
            };
            let rewritten = self
                .with(|x, host, worker| {
                    let out = x.on_response_body(host, &chunk, end_of_stream);
                    x.sync_memory(host, worker);
                    out
                })
                .flatten();
            if let Some(out) = rewritten {
                if let Err(status) = abi::set_buffer(BufferType::HttpResponseBody, 0, body_size, &out) {
                    log(LogLevel::Warn, &format!("llm-meter: cannot rewrite the response body: {status:?}"));
                }
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        self.with(|x, host, worker| {
            x.stop_holding();
            x.on_log(host, worker);
            host.metrics.request_ended();
        });
    }
}

// ---- trap-on-demand hook (test-only, cargo feature `trap-on-demand`; tests/vm_failure.rs) ----
/// With the feature: a real wasm trap (the VM fails) when the request header `x-llm-meter-trap`
/// names `callback`. Without it (the release build): nothing, and the header is never read.
#[cfg(feature = "trap-on-demand")]
fn trap_on_demand(callback: &str) {
    if let Ok(Some(value)) = abi::header(MapType::HttpRequestHeaders, "x-llm-meter-trap") {
        if value == callback.as_bytes() {
            log(LogLevel::Warn, &format!("llm-meter: trap-on-demand build: trapping in {callback}"));
            core::arch::wasm32::unreachable();
        }
    }
}

#[cfg(not(feature = "trap-on-demand"))]
#[inline(always)]
fn trap_on_demand(_callback: &str) {}
// ---- end of the trap-on-demand hook ----

/// [`Host`] over proxy-wasm hostcalls. One lives for one callback.
struct WasmHost<'a> {
    metrics: &'a mut MetricIds,
    /// Size of the request body Envoy holds in the current callback (0 outside body callbacks).
    request_body_size: usize,
    /// The time, read once per callback (a callback takes microseconds).
    now: std::cell::Cell<Option<u64>>,
}

impl<'a> WasmHost<'a> {
    fn new(metrics: &'a mut MetricIds, request_body_size: usize) -> Self {
        Self { metrics, request_body_size, now: std::cell::Cell::new(None) }
    }
}

impl WasmHost<'_> {
    fn header(&self, map: MapType, name: &str) -> Option<Vec<u8>> {
        match abi::header(map, name) {
            Ok(value) => value,
            Err(status) => {
                self.metrics.hostcall_failed("get_map_value", status);
                None
            }
        }
    }

    fn int_property(&self, path: &[&str]) -> Option<u64> {
        let bytes = abi::property(path).ok().flatten()?;
        let raw: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        Some(u64::from_le_bytes(raw))
    }

    fn check(&self, call: &str, result: Result<(), Status>) {
        self.metrics.check(call, result);
    }
}

impl SharedStore for WasmHost<'_> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match abi::shared_data(key) {
            Ok(value) => value,
            Err(status) => {
                self.metrics.hostcall_failed("get_shared_data", status);
                None
            }
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match abi::set_shared_data(key, value, cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Other),
        }
    }
}

impl Host for WasmHost<'_> {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.header(MapType::HttpRequestHeaders, name)
    }

    fn request_headers(&self, names: &[String]) -> Vec<Option<Vec<u8>>> {
        if names.len() < 2 {
            return names.iter().map(|name| self.request_header(name)).collect();
        }
        abi::header_values(MapType::HttpRequestHeaders, names).unwrap_or_else(|status| {
            self.metrics.hostcall_failed("get_header_map_pairs", status);
            vec![None; names.len()]
        })
    }

    fn response_headers(&self) -> Vec<(String, Vec<u8>)> {
        abi::header_pairs(MapType::HttpResponseHeaders).unwrap_or_else(|status| {
            self.metrics.hostcall_failed("get_header_map_pairs", status);
            Vec::new()
        })
    }

    fn now_nanos(&self) -> u64 {
        if let Some(now) = self.now.get() {
            return now;
        }
        let now = abi::now_nanos().unwrap_or(0);
        self.now.set(Some(now));
        self.metrics.latest_now.set(now);
        now
    }

    fn response_code(&self) -> Option<u16> {
        self.int_property(&["response", "code"]).and_then(|c| u16::try_from(c).ok())
    }

    fn response_flags(&self) -> Option<u64> {
        self.int_property(&["response", "flags"])
    }

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        self.metrics.get(kind, name)
    }

    fn metric_add(&mut self, id: u32, delta: i64) {
        self.metrics.add(id, delta);
    }

    fn metric_record(&mut self, id: u32, value: u64) {
        self.metrics.record(id, value);
    }

    fn log_warn(&self, message: &str) {
        log(LogLevel::Warn, message);
    }

    fn client_address(&self) -> Option<Vec<u8>> {
        abi::property(&["source", "address"]).ok().flatten()
    }

    fn send_response(&mut self, status: u16, headers: &[(String, String)], body: &[u8]) {
        self.check("send_http_response", abi::send_http_response(status, headers, body));
    }

    fn remove_response_header(&mut self, name: &str) {
        self.check("remove_header_map_value", abi::remove_header(MapType::HttpResponseHeaders, name));
    }

    fn set_request_header(&mut self, name: &str, value: &str) {
        self.check("replace_header_map_value", abi::set_header(MapType::HttpRequestHeaders, name, value.as_bytes()));
    }

    fn remove_request_header(&mut self, name: &str) {
        self.check("remove_header_map_value", abi::remove_header(MapType::HttpRequestHeaders, name));
    }

    fn request_body(&self) -> Option<Vec<u8>> {
        match abi::get_buffer(BufferType::HttpRequestBody, 0, self.request_body_size) {
            Ok(body) => body,
            Err(status) => {
                self.metrics.hostcall_failed("get_buffer", status);
                None
            }
        }
    }

    fn set_request_body(&mut self, body: &[u8]) {
        self.check("set_buffer", abi::set_buffer(BufferType::HttpRequestBody, 0, self.request_body_size, body));
        // The buffer is now `body`: a later read or rewrite in this callback (injection after a
        // fallback rewrote the model) must cover all of it, not the size it had before.
        self.request_body_size = body.len();
    }

    fn publish_record(&mut self, name: &str, record: &crate::record::Record) {
        if !self.metrics.records_typed {
            let value = record.to_json();
            self.check("set_property", abi::set_property(name, value.as_bytes()));
            return;
        }
        // One buffer per worker (Envoy copies the value): no allocation per record.
        let mut value = std::mem::take(&mut self.metrics.record_buffer);
        value.clear();
        record.write_struct(&mut value);
        self.check("set_property", abi::set_property(name, &value));
        if value.capacity() <= RECORD_BUFFER_KEPT {
            self.metrics.record_buffer = value;
        }
    }

    fn set_response_headers(&mut self, current: &[(String, Vec<u8>)], set: &[(&str, &str)]) {
        if set.len() < 2 {
            for (name, value) in set {
                self.set_response_header(name, value);
            }
            return;
        }
        let map = crate::host::header_map::replaced(current, set);
        self.check("set_header_map_pairs", abi::set_header_pairs(MapType::HttpResponseHeaders, &map));
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        self.check("replace_header_map_value", abi::set_header(MapType::HttpResponseHeaders, name, value.as_bytes()));
    }

    fn grpc_call(
        &mut self,
        grpc_service: &[u8],
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u64,
    ) -> Option<u32> {
        // The SDK's call registers the token, so the answer reaches the context that asked.
        // `grpc_service` is ASCII (config validation bounds the cluster name).
        let upstream = std::str::from_utf8(grpc_service).ok()?;
        proxy_wasm::hostcalls::dispatch_grpc_call(
            upstream,
            service,
            method,
            Vec::new(),
            Some(message),
            Duration::from_millis(timeout_ms),
        )
        // Envoy refuses the call when it cannot build a client for the cluster: the caller
        // counts that as a failure of the rule's service (with its failure_mode), not as a
        // hostcall error.
        .ok()
    }
}
