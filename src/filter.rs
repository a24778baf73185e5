//! One HTTP exchange through the filter, independent of proxy-wasm.
//!
//! [`Exchange`] receives the same events as a proxy-wasm `HttpContext` (request headers, request
//! body chunks, response headers, response body chunks, log) and talks to Envoy only through the
//! [`Host`] trait. The `wasm` module implements [`Host`] with hostcalls; the tests below
//! implement it in memory, so the whole lifecycle, every metric included, is tested natively.
//!
//! What the filter changes, and only then: a streaming chat/completions request without
//! `stream_options.include_usage` gets it added (`inject_stream_usage`), its `accept-encoding`
//! removed (the usage chunk is cut from an uncompressed stream) and `content-length` fixed, and
//! the usage-only chunk it asked for is cut from the client's stream; a request the limits refuse
//! is answered by the filter itself (429, 413, or 503 under `failure_mode: deny`), as is an
//! admitted request's response given `x-ratelimit-*` headers. Otherwise the bytes pass
//! untouched.
//!
//! Requests are delayed only to read what decisions need: request headers are held until the
//! model is found (or the whole body, when limits or injection need it), bounded by
//! `request.model_lookahead_bytes` (see [`Flow::Hold`] and [`crate::hold`]), and while a rate
//! limit service answers. Responses are never held. Every failure inside the filter is
//! counted and ignored (fail-open).
//!
//! Accounting happens once, in [`Exchange::on_log`], which Envoy calls for every stream however
//! it ended (completed, reset upstream, cancelled by the client). That is what keeps
//! `active_requests` balanced and makes interrupted streams still count the usage seen so far.

use crate::body::{BodyFormat, RequestScanner, ResponseScanner, Skip, Skips, RESPONSE_SCAN_BYTES};
use crate::classify::{classify, ErrorType};
use crate::config::FailureMode;
use crate::config::{Config, ModelLabels};
use crate::decode::{DecodeError, Decoder, Encoding, MAX_DECODED_BYTES};
use crate::enforce::{self, LimitHost, Rejection, RequestFacts, Reservation, Verdict};
use crate::global::{self, Answer};
use crate::hold::HoldWatch;
use crate::inject::{rewrite_request, Forward, UsageChunkStripper};
use crate::labels::{sanitize, LabelSet, SharedStore, OTHER, UNKNOWN};
use crate::limiter::AdmittedKeys;
use crate::memory::{Lease, Pool};
pub use crate::metrics::Kind as MetricKind;
use crate::metrics::{stat_name, Metric};
use crate::operation::Operation;
use crate::pricing::CostCarry;
use crate::upstream::{usage_from_headers, QuotaKind, RateLimits};
use crate::usage::{Usage, UsageFormat};
use std::collections::HashMap;
use std::rc::Rc;

/// What the filter needs from Envoy. Header values are bytes: clients can send any bytes, and
/// the filter must not fail on a value that is not UTF-8.
///
/// Every method is one hostcall in the wasm glue, and a hostcall (a VM exit, often a copy into
/// the VM) costs about as much as a page of the filter's own code, so the exchange asks for
/// little: response headers come in one call, and metrics are defined once per name and then
/// updated by id.
pub trait Host: SharedStore {
    /// A request header (`:path` included), if present.
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Every response header (`:status` included), names in lower case as Envoy keeps them.
    fn response_headers(&self) -> Vec<(String, Vec<u8>)>;
    /// Wall-clock time in nanoseconds.
    fn now_nanos(&self) -> u64;
    /// Envoy's `response.code` property (0 or `None` when no response was sent).
    fn response_code(&self) -> Option<u16>;
    /// Envoy's `response.flags` property.
    fn response_flags(&self) -> Option<u64>;
    /// The id of the metric `name`, defining it (at 0) if it does not exist yet. The same name
    /// always gives the same id; `None` when the host refused (counted by the host).
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32>;
    /// Adds `delta` to a counter (only positive deltas) or a gauge.
    fn metric_add(&mut self, id: u32, delta: i64);
    /// Sets a gauge, or records a histogram value.
    fn metric_record(&mut self, id: u32, value: u64);
    /// Logs a warning.
    fn log_warn(&self, message: &str);
    /// The client's address (`source.address`: `ip:port`).
    fn client_address(&self) -> Option<Vec<u8>>;
    /// Sends a local reply instead of forwarding the request.
    fn send_response(&mut self, status: u16, headers: &[(String, String)], body: &[u8]);
    /// Sets (replaces) a response header.
    fn set_response_header(&mut self, name: &str, value: &str);
    /// Starts a unary gRPC call of `method` of `service` on the Envoy cluster `grpc_service`
    /// describes (a serialized `GrpcService`); returns the call's token (`None`: the call could
    /// not be started, counted by the host). The answer comes back
    /// through the glue ([`Exchange::on_global_answer`], or the root context for reports).
    fn grpc_call(
        &mut self,
        grpc_service: &[u8],
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u64,
    ) -> Option<u32>;
    /// Removes a response header.
    fn remove_response_header(&mut self, name: &str);
    /// Sets (replaces) a request header; only effective while the request is held.
    fn set_request_header(&mut self, name: &str, value: &str);
    /// Removes a request header; only effective while the request is held.
    fn remove_request_header(&mut self, name: &str);
    /// The whole request body buffered so far (while the request is held).
    fn request_body(&self) -> Option<Vec<u8>>;
    /// Replaces the buffered request body (while the request is held).
    fn set_request_body(&mut self, body: &[u8]);

    /// Adds to a counter by name, defining it on first use (adding 0 only defines it: Envoy
    /// rejects increments that are not positive).
    fn counter_add(&mut self, name: &str, value: u64) {
        if let Some(id) = self.define_metric(MetricKind::Counter, name) {
            add_to_counter(self, id, value);
        }
    }
}

/// Adds `value` to counter `id`; 0 is not sent (Envoy rejects it, and the counter exists).
/// Values are bounded where they are read (token counts by `usage::MAX_TOKENS`), so every one
/// fits Envoy's `i64`; one that did not would be dropped, never clamped into the counter.
fn add_to_counter<H: Host + ?Sized>(host: &mut H, id: u32, value: u64) {
    if let Ok(delta) = i64::try_from(value) {
        if delta > 0 {
            host.metric_add(id, delta);
        }
    }
}

/// A header's value from a list of headers.
fn header_value<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

/// A [`Host`] seen as the [`LimitHost`] the rate limits need, with the request headers they
/// read copied when the request headers arrived: Envoy lets a filter read request headers only
/// until it forwards them, and without a hold the limits are checked after that, at the end of
/// the body.
struct Limits<'a, H>(&'a H, &'a [(String, Vec<u8>)]);

impl<H: Host> SharedStore for Limits<'_, H> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.0.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), crate::labels::StoreError> {
        self.0.set(key, value, cas)
    }
}

impl<H: Host> LimitHost for Limits<'_, H> {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        header_value(self.1, name).map(<[u8]>::to_vec)
    }
    fn client_address(&self) -> Option<Vec<u8>> {
        self.0.client_address()
    }
    fn now_ms(&self) -> u64 {
        self.0.now_nanos() / 1_000_000
    }
}

/// Internal failures the filter survived, for `meter_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InternalError {
    /// The shared label registry could not be updated; the value was labelled `other`.
    SharedData,
    /// A proxy-wasm hostcall failed (counted by the glue).
    Hostcall,
    /// A held request saw no body in time and was released (see [`crate::hold`]).
    HoldStalled,
    /// The rate limiter could not check or release a request (see `failure_mode`).
    RateLimit,
}

impl InternalError {
    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            InternalError::SharedData => "shared_data",
            InternalError::Hostcall => "hostcall",
            InternalError::HoldStalled => "hold_stalled",
            InternalError::RateLimit => "ratelimit",
        }
    }
}

/// How model names become `model` labels on this worker.
#[derive(Debug)]
enum ModelLabeler {
    Allowlist(std::collections::HashSet<String>),
    FirstSeen(LabelSet),
}

/// State shared by all exchanges of one Envoy worker (one wasm VM): configuration, this worker's
/// view of the label registries, and the cost remainders.
#[derive(Debug)]
pub struct Worker {
    config: Config,
    models: ModelLabeler,
    apps: Option<LabelSet>,
    skips_logged: [u64; Skip::ALL.len()],
    /// Held requests of this worker; driven by the glue, which knows context ids and timers.
    pub holds: HoldWatch,
    /// Rate-limit failures on this worker, for log throttling.
    limit_failures: u64,
    /// Stat ids per `(model, app)` label pair, so that an exchange neither builds stat names
    /// nor hashes them after the first exchange of its pair. Bounded like the labels:
    /// `(max_models + 2) × (max_apps + 2)` pairs at most.
    series: Vec<Series>,
    series_index: HashMap<String, HashMap<String, usize>>,
    /// Rate-limit buckets known to be admitted (see [`AdmittedKeys`]).
    admitted: AdmittedKeys,
    /// Per rule: the serialized `GrpcService` of a global rule's service and its timeout.
    services: Vec<Option<(Vec<u8>, u64)>>,
    /// Token usage reports for global rules, sent by the root context (see [`crate::global`]).
    reports: Vec<global::Call>,
    /// Failed rate limit service calls on this worker, for log throttling.
    service_failures: u64,
    /// The id of `meter_memory_bytes`, once defined.
    memory_gauge: Option<u32>,
}

/// Most token usage reports a worker queues between two timer ticks; beyond, a report is
/// dropped and counted as a service error (the service is then far behind anyway).
const MAX_QUEUED_REPORTS: usize = 10_000;

/// The `token_type` values of `tokens_total`, in [`Usage`] field order.
const TOKEN_TYPES: [&str; 5] = ["input", "output", "cached_input", "reasoning", "cache_creation_input"];

/// One stat of a [`Series`] (besides `requests_total`, which also has per-exchange labels).
#[derive(Debug, Clone, Copy)]
enum Stat {
    Active,
    Duration,
    Ttft,
    UsageMissing,
    Cost,
    /// `tokens_total` of [`TOKEN_TYPES`]`[i]`.
    Tokens(usize),
    /// `tokens_per_request`, input (0) or output (1).
    PerRequest(usize),
    UpstreamRemaining(QuotaKind),
    UpstreamLimit(QuotaKind),
}

impl Stat {
    const COUNT: usize = 5 + TOKEN_TYPES.len() + 2 + 4;

    fn slot(self) -> usize {
        let kind = |k: QuotaKind| match k {
            QuotaKind::Requests => 0,
            QuotaKind::Tokens => 1,
        };
        match self {
            Stat::Active => 0,
            Stat::Duration => 1,
            Stat::Ttft => 2,
            Stat::UsageMissing => 3,
            Stat::Cost => 4,
            Stat::Tokens(i) => 5 + i,
            Stat::PerRequest(i) => 5 + TOKEN_TYPES.len() + i,
            Stat::UpstreamRemaining(k) => 5 + TOKEN_TYPES.len() + 2 + kind(k),
            Stat::UpstreamLimit(k) => 5 + TOKEN_TYPES.len() + 4 + kind(k),
        }
    }

    /// The stat name: the metric's labels filled from the series and the stat's own label
    /// (`token_type` or `kind`).
    fn name(self, prefix: &str, model: &str, app: &str) -> String {
        let own = match self {
            Stat::Tokens(i) | Stat::PerRequest(i) => TOKEN_TYPES.get(i).copied().unwrap_or(UNKNOWN),
            Stat::UpstreamRemaining(k) | Stat::UpstreamLimit(k) => k.as_str(),
            _ => UNKNOWN,
        };
        let metric = self.metric();
        let values: Vec<&str> = metric
            .label_keys()
            .iter()
            .map(|key| match *key {
                "model" => model,
                "app" => app,
                _ => own,
            })
            .collect();
        stat_name(prefix, metric, &values)
    }

    fn metric(self) -> Metric {
        match self {
            Stat::Active => Metric::ActiveRequests,
            Stat::Duration => Metric::RequestDurationMs,
            Stat::Ttft => Metric::TimeToFirstTokenMs,
            Stat::UsageMissing => Metric::UsageMissingTotal,
            Stat::Cost => Metric::CostMicrousdTotal,
            Stat::Tokens(_) => Metric::TokensTotal,
            Stat::PerRequest(_) => Metric::TokensPerRequest,
            Stat::UpstreamRemaining(_) => Metric::UpstreamRatelimitRemaining,
            Stat::UpstreamLimit(_) => Metric::UpstreamRatelimitLimit,
        }
    }
}

/// The stat ids of one `(model, app)` label pair, each defined on its first use (defining a
/// stat creates it, so a stat never used is never shown), and the pair's cost remainder.
#[derive(Debug)]
struct Series {
    model: String,
    app: String,
    ids: [Option<u32>; Stat::COUNT],
    /// `requests_total` ids by (operation, status, error_type).
    requests: Vec<(&'static str, u16, ErrorType, u32)>,
    cost: CostCarry,
}

impl Worker {
    /// Worker state for a validated configuration.
    pub fn new(config: Config) -> Self {
        // The VM's budget is the configuration's (the latest, when a reload runs two at once).
        Pool::with(|p| p.set_max_total(config.memory.max_stream_bytes_total));
        let prefix = &config.metrics.prefix;
        let models = match &config.metrics.models {
            ModelLabels::Allowlist(set) => ModelLabeler::Allowlist(set.clone()),
            ModelLabels::FirstSeen(n) => {
                ModelLabeler::FirstSeen(LabelSet::new(format!("llm_meter.{prefix}.models"), *n))
            }
        };
        let apps = config
            .metrics
            .app_header
            .as_ref()
            .map(|_| LabelSet::new(format!("llm_meter.{prefix}.apps"), config.metrics.max_apps));
        Self {
            models,
            apps,
            skips_logged: [0; Skip::ALL.len()],
            holds: HoldWatch::default(),
            limit_failures: 0,
            series: Vec::new(),
            series_index: HashMap::new(),
            admitted: AdmittedKeys::default(),
            services: config
                .limits
                .rules
                .iter()
                .map(|r| r.global.as_ref().map(|g| (crate::rls::encode_grpc_service(&g.cluster), g.timeout_ms)))
                .collect(),
            reports: Vec::new(),
            service_failures: 0,
            memory_gauge: None,
            config,
        }
    }

    /// Creates the shared label registries if no worker has yet. Run at configuration time: a
    /// registry that exists has a CAS token, so every later update is a real compare-and-swap
    /// (proxy-wasm cannot express "create only if absent").
    pub fn init_shared<H: Host>(&mut self, host: &mut H) {
        let sets = [
            match &self.models {
                ModelLabeler::FirstSeen(set) => Some(set),
                ModelLabeler::Allowlist(_) => None,
            },
            self.apps.as_ref(),
        ];
        for set in sets.into_iter().flatten() {
            if !set.init(&*host) {
                self.count_error(host, InternalError::SharedData);
            }
        }
        for _ in 0..enforce::create_buckets(&*host, &self.config) {
            self.count_error(host, InternalError::RateLimit);
        }
        // One VM's budget, for the memory alert (every VM sets the same value), and the gauge of
        // what streams hold, defined (at 0) so that it exists before the first large stream.
        if let Some(id) = host.define_metric(MetricKind::Gauge, &self.name(Metric::MeterMemoryBudgetBytes, &[])) {
            host.metric_record(id, self.config.memory.max_stream_bytes_total as u64);
        }
        self.memory_gauge = host.define_metric(MetricKind::Gauge, &self.name(Metric::MeterMemoryBytes, &[]));
    }

    /// Tells `meter_memory_bytes` how much this VM's streams hold, when that changed enough
    /// to be worth a hostcall (see [`Pool::gauge_delta`]).
    pub fn sync_memory<H: Host>(&mut self, host: &mut H) {
        let Some(delta) = Pool::with(Pool::gauge_delta) else { return };
        if self.memory_gauge.is_none() {
            self.memory_gauge = host.define_metric(MetricKind::Gauge, &self.name(Metric::MeterMemoryBytes, &[]));
        }
        if let Some(id) = self.memory_gauge {
            host.metric_add(id, delta);
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn name(&self, metric: Metric, values: &[&str]) -> String {
        stat_name(&self.config.metrics.prefix, metric, values)
    }

    /// The series of a `(model, app)` label pair (both already bounded label values).
    fn series(&mut self, model: &str, app: &str) -> usize {
        if let Some(&i) = self.series_index.get(model).and_then(|apps| apps.get(app)) {
            return i;
        }
        let i = self.series.len();
        self.series.push(Series {
            model: model.to_string(),
            app: app.to_string(),
            ids: [None; Stat::COUNT],
            requests: Vec::new(),
            cost: CostCarry::default(),
        });
        self.series_index.entry(model.to_string()).or_default().insert(app.to_string(), i);
        i
    }

    /// The id of `stat` in `series`, defined on first use.
    fn stat<H: Host>(&mut self, host: &mut H, series: usize, stat: Stat) -> Option<u32> {
        let s = self.series.get_mut(series)?;
        let slot = s.ids.get_mut(stat.slot())?;
        if slot.is_none() {
            let name = stat.name(&self.config.metrics.prefix, &s.model, &s.app);
            *slot = host.define_metric(stat.metric().kind(), &name);
        }
        *slot
    }

    /// The id of `requests_total` in `series` for these per-exchange labels.
    fn requests_stat<H: Host>(
        &mut self,
        host: &mut H,
        series: usize,
        operation: &'static str,
        status: u16,
        error: ErrorType,
    ) -> Option<u32> {
        let s = self.series.get_mut(series)?;
        if let Some(&(_, _, _, id)) = s.requests.iter().find(|r| r.0 == operation && r.1 == status && r.2 == error) {
            return Some(id);
        }
        let status_label = status.to_string();
        let name = stat_name(
            &self.config.metrics.prefix,
            Metric::RequestsTotal,
            &[&s.model, &s.app, operation, &status_label, error.as_str()],
        );
        let id = host.define_metric(MetricKind::Counter, &name)?;
        s.requests.push((operation, status, error, id));
        Some(id)
    }

    /// Adds to a counter of `series`.
    fn add<H: Host>(&mut self, host: &mut H, series: usize, stat: Stat, value: u64) {
        if let Some(id) = self.stat(host, series, stat) {
            add_to_counter(host, id, value);
        }
    }

    /// Sets a gauge or records a histogram value of `series`.
    fn record<H: Host>(&mut self, host: &mut H, series: usize, stat: Stat, value: u64) {
        if let Some(id) = self.stat(host, series, stat) {
            host.metric_record(id, value);
        }
    }

    /// Counts an internal error.
    pub fn count_error<H: Host>(&self, host: &mut H, error: InternalError) {
        let name = self.name(Metric::MeterErrorsTotal, &[error.as_str()]);
        host.counter_add(&name, 1);
    }

    /// The limiter could not check a request (a store failure, a key that cannot be determined):
    /// counted in `meter_errors_total{kind="ratelimit"}` and logged (1st, 2nd, 4th… time on this
    /// worker); `failure_mode` decides.
    fn limiter_failed<H: Host>(&mut self, host: &mut H) {
        self.count_error(host, InternalError::RateLimit);
        self.limit_failures = self.limit_failures.saturating_add(1);
        if self.limit_failures.is_power_of_two() {
            host.log_warn(&format!(
                "llm-meter: the rate limiter could not check a request ({} times on this worker); failure_mode \
                 {:?} applied",
                self.limit_failures, self.config.limits.failure_mode
            ));
        }
    }

    /// True when some rule is counted by a rate limit service: the glue then ticks to send the
    /// usage reports.
    pub fn has_global_limits(&self) -> bool {
        self.config.limits.has_global()
    }

    /// Starts `call` on its rule's rate limit service.
    pub fn call_service<H: Host>(&self, host: &mut H, call: &global::Call) -> Option<u32> {
        let (service, timeout_ms) = self.services.get(call.rule).and_then(Option::as_ref)?;
        host.grpc_call(service, crate::rls::SERVICE, crate::rls::METHOD, &call.message, *timeout_ms)
    }

    /// A call to `rule`'s rate limit service failed or gave no usable answer: counted in
    /// `ratelimit_service_errors_total{rule}` and logged (1st, 2nd, 4th… time on this worker).
    pub fn count_service_error<H: Host>(&mut self, host: &mut H, rule: usize) {
        let Some(r) = self.config.limits.rules.get(rule) else { return };
        let name = self.name(Metric::RatelimitServiceErrorsTotal, &[&r.name]);
        host.counter_add(&name, 1);
        self.service_failures = self.service_failures.saturating_add(1);
        if self.service_failures.is_power_of_two() {
            let mode = r.global.as_ref().map_or(FailureMode::Allow, |g| g.failure_mode);
            host.log_warn(&format!(
                "llm-meter: the rate limit service of rule '{}' could not be called (unknown cluster?), failed \
                 or did not answer in time ({} times on this worker); failure_mode {mode:?} applied",
                r.name, self.service_failures
            ));
        }
    }

    /// Token usage reports waiting to be sent; the root context sends them on its timer.
    pub fn take_reports(&mut self) -> Vec<global::Call> {
        std::mem::take(&mut self.reports)
    }

    fn queue_report<H: Host>(&mut self, host: &mut H, call: global::Call) {
        if self.reports.len() >= MAX_QUEUED_REPORTS {
            self.count_service_error(host, call.rule);
            return;
        }
        self.reports.push(call);
    }

    fn model_label<H: Host>(&mut self, host: &mut H, model: Option<&str>) -> String {
        let Some(model) = model else { return UNKNOWN.to_string() };
        let resolved = match &mut self.models {
            ModelLabeler::Allowlist(set) => {
                return if set.contains(model) { sanitize(model) } else { OTHER.to_string() }
            }
            ModelLabeler::FirstSeen(set) => set.resolve(&*host, &sanitize(model)),
        };
        if resolved.store_failed {
            self.count_error(host, InternalError::SharedData);
        }
        resolved.label
    }

    fn app_label<H: Host>(&mut self, host: &mut H) -> String {
        let (Some(header), Some(apps)) = (self.config.metrics.app_header.as_deref(), self.apps.as_mut()) else {
            return UNKNOWN.to_string();
        };
        let value = host.request_header(header).filter(|v| !v.is_empty());
        let Some(value) = value else { return UNKNOWN.to_string() };
        let resolved = apps.resolve(&*host, &sanitize(value));
        if resolved.store_failed {
            self.count_error(host, InternalError::SharedData);
        }
        resolved.label
    }

    /// Counts skips and logs them, each reason on its 1st, 2nd, 4th, 8th… occurrence on this
    /// worker, so a flood of bad input cannot flood the log.
    fn record_skips<H: Host>(&mut self, host: &mut H, skips: &Skips, model: &str) {
        for (skip, n) in skips.iter() {
            let name = self.name(Metric::MeterSkipsTotal, &[skip.as_str()]);
            host.counter_add(&name, u64::from(n));
            if let Some(seen) = self.skips_logged.get_mut(skip as usize) {
                let before = *seen;
                *seen = seen.saturating_add(u64::from(n));
                // Log when the count reaches the next power of two above the previous count.
                if before.saturating_add(1).checked_next_power_of_two().is_none_or(|p| *seen >= p) {
                    host.log_warn(&format!(
                        "llm-meter: skipped {} (model {model}); seen {} times",
                        skip.as_str(),
                        *seen
                    ));
                }
            }
        }
    }
}

/// What the glue does with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Forward what arrived.
    Continue,
    /// Hold the headers (and buffer the body so far) until the model is known: the model is
    /// what per-model decisions and labels need, and upstream may fail before the body is read.
    Hold,
    /// The filter answered the request itself (a rejection); stop forwarding it.
    Respond,
}

/// One HTTP exchange (request and its response).
#[derive(Default)]
pub struct Exchange {
    operation: Option<Operation>,
    /// The model named in the path (Gemini), if any; the body's `model` wins.
    path_model: Option<String>,
    /// Usage read from the configured response headers (`usage_headers`), the fallback when the
    /// body reports none.
    header_usage: Option<Usage>,
    /// Body bytes scanned while holding the request; `None` when not holding.
    held_bytes: Option<usize>,
    started_nanos: u64,
    request: RequestScanner,
    app: String,
    model_label: Option<String>,
    /// The `active_requests` gauge this exchange incremented.
    active: Option<u32>,
    /// The stat series of `model_label` and `app`.
    series: Option<usize>,
    response: Option<ResponseScanner>,
    response_skips: Skips,
    status: u16,
    first_data_nanos: Option<u64>,
    response_end_nanos: Option<u64>,
    finished: bool,
    /// The limits were checked (or can no longer be: the response started).
    limits_checked: bool,
    /// Charges to release when the exchange ends.
    reservation: Option<Reservation>,
    /// The request headers the limits read (see [`Limits`]).
    limit_headers: Vec<(String, Vec<u8>)>,
    /// The rule that rejected the request, when this filter answered it.
    rejected_by: Option<String>,
    /// Global rules that apply to the request (see [`crate::global`]).
    global_charges: Vec<global::Charge>,
    /// Rate limit service calls awaited before the request is forwarded: (token, charge index).
    global_pending: Vec<(u32, usize)>,
    /// Skips found while checking limits.
    limit_skips: Skips,
    /// Decodes a copy of a compressed response body for the scanner.
    decoder: Option<Decoder>,
    /// A streaming chat/completions request may need `include_usage` added: the body is held to
    /// its end to decide (see [`crate::inject`]).
    inject_pending: bool,
    /// The body was too large to hold whole for `include_usage` to be added.
    inject_abandoned: bool,
    /// `include_usage` was added: the usage-only chunk is removed from the client's stream.
    injected: bool,
    stripper: Option<UsageChunkStripper>,
    /// This stream's share of the VM's memory budget, taken when it first needs one.
    lease: Option<Rc<Lease>>,
}

fn parse_u64(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

fn parse_status(value: &[u8]) -> u16 {
    std::str::from_utf8(value).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

impl Exchange {
    /// A new exchange; nothing happens until request headers arrive.
    pub fn new() -> Self {
        Self::default()
    }

    /// The request's model: the body's top-level `model`, else the one in the path.
    fn request_model(&self) -> Option<&str> {
        self.request.model().or(self.path_model.as_deref())
    }

    /// True when the request path is an LLM operation this filter meters.
    pub fn is_metered(&self) -> bool {
        self.operation.is_some()
    }

    /// True while request body chunks are still of use (the model is not final yet), or must be
    /// stopped (the filter answered the request itself).
    pub fn wants_request_body(&self) -> bool {
        self.operation.is_some() && (self.active.is_none() || self.rejected_by.is_some()) && !self.finished
    }

    /// True when response body callbacks matter (end-of-stream time, scanning).
    pub fn wants_response_body(&self) -> bool {
        self.operation.is_some() && !self.finished
    }

    /// True when the response body bytes are scanned (a 2xx, uncompressed response).
    pub fn scans_response(&self) -> bool {
        self.response.is_some()
    }

    /// Request headers: decides whether the exchange is metered, starts its clock, and holds the
    /// headers when a body with the model follows (see [`Flow::Hold`]).
    pub fn on_request_headers<H: Host>(&mut self, host: &mut H, worker: &mut Worker, end_of_stream: bool) -> Flow {
        let path = host.request_header(":path").unwrap_or_default();
        self.operation = Operation::from_path(&path);
        if self.operation.is_none() {
            return Flow::Continue;
        }
        self.path_model = Operation::model_from_path(&path);
        self.inject_pending = worker.config.inject_stream_usage
            && matches!(self.operation, Some(Operation::Chat | Operation::Completion));
        self.started_nanos = host.now_nanos();
        self.app = worker.app_label(host);
        if worker.config.limits.is_active() {
            for name in worker.config.limits.request_headers() {
                if let Some(value) = host.request_header(name) {
                    self.limit_headers.push((name.to_string(), value));
                }
            }
        }
        if end_of_stream {
            if let Some(flow) = self.check_limits(host, worker) {
                return flow;
            }
            self.start_active(host, worker);
            return Flow::Continue;
        }
        if worker.config.request.model_lookahead_bytes == 0 || !worker.holds.allows_hold() {
            return Flow::Continue;
        }
        if self.path_model.is_some() && !worker.config.limits.is_active() && !self.inject_pending {
            // The model is known already; nothing to wait for.
            return Flow::Continue;
        }
        self.held_bytes = Some(0);
        Flow::Hold
    }

    /// A request body chunk (only the bytes not seen before): scanned for the model, passed on
    /// untouched. The request stays held until the model is found, the body ends, or
    /// `request.model_lookahead_bytes` have been held; scanning goes on after that.
    pub fn on_request_body<H: Host>(
        &mut self,
        host: &mut H,
        worker: &mut Worker,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Flow {
        if self.rejected_by.is_some() {
            // Envoy wants filters to keep stopping a stream they answered themselves.
            return Flow::Respond;
        }
        if self.operation.is_none() || self.active.is_some() {
            return self.release();
        }
        self.request.feed(chunk);
        if self.is_waiting() {
            // The rate limit service has not answered yet: the body waits with the headers.
            return Flow::Hold;
        }
        if end_of_stream {
            if self.inject_pending {
                self.inject_usage(host, worker);
                if self.lease.is_some() {
                    worker.sync_memory(host);
                }
            }
            if let Some(flow) = self.check_limits(host, worker) {
                return flow;
            }
            self.start_active(host, worker);
            return self.release();
        }
        // With limits to check or `include_usage` to add, the whole body is read first (it sizes
        // the token estimate and may name `max_tokens` or `stream` after the model), up to the
        // lookahead.
        let limits_pending = (worker.config.limits.is_active() && !self.limits_checked) || self.inject_pending;
        let Some(held) = self.held_bytes.map(|h| h.saturating_add(chunk.len())) else { return Flow::Continue };
        self.held_bytes = Some(held);
        let enough = !limits_pending && self.request_model().is_some();
        if !enough && held < worker.config.request.model_lookahead_bytes {
            return Flow::Hold;
        }
        if self.inject_pending {
            // Too large to hold whole: if it is a stream that lacks `include_usage`, it stays
            // unmetered (counted at the end, when the scan knows).
            self.inject_pending = false;
            self.inject_abandoned = true;
        }
        if let Some(flow) = self.check_limits(host, worker) {
            return flow;
        }
        self.release()
    }

    /// The whole request body is held: adds `stream_options.include_usage` if it is a streaming
    /// request without it, and fixes `content-length`.
    fn inject_usage<H: Host>(&mut self, host: &mut H, worker: &mut Worker) {
        self.inject_pending = false;
        if !self.request.stream_lacks_usage() {
            // Not a stream, or one that asks for usage: nothing to add (the scan saw the whole
            // body), so the body is neither copied nor parsed again.
            return;
        }
        if self.held_bytes.is_none() {
            // Part of the body was forwarded already (the hold was released).
            self.limit_skips.add(Skip::NotInjected);
            return;
        }
        // The body is copied into the VM, parsed and written again: about three times its size
        // for the length of this callback.
        let lease = self.lease(worker);
        let need = self.held_bytes.unwrap_or(0).saturating_mul(3);
        if !lease.try_take(need) {
            self.limit_skips.add(Skip::MemoryBudget);
            self.release_memory();
            return;
        }
        let body = host.request_body();
        let rewritten = body.as_deref().map(rewrite_request);
        lease.give(need);
        if let Some(Ok(rewritten)) = rewritten {
            host.set_request_body(&rewritten);
            if host.request_header("content-length").is_some() {
                host.set_request_header("content-length", &rewritten.len().to_string());
            }
            // The usage chunk is cut from the stream, which needs it uncompressed.
            host.remove_request_header("accept-encoding");
            self.injected = true;
        }
    }

    /// Checks the rate limits once, when the request is known as well as it will be before it is
    /// forwarded. `Some(Flow::Respond)` when it was rejected (the reply is sent).
    fn check_limits<H: Host>(&mut self, host: &mut H, worker: &mut Worker) -> Option<Flow> {
        if self.limits_checked || !worker.config.limits.is_active() {
            return None;
        }
        self.limits_checked = true;
        let content_length = header_value(&self.limit_headers, "content-length").and_then(parse_u64).unwrap_or(0);
        let facts = RequestFacts {
            model: self.request_model(),
            body_bytes: content_length.max(self.request.bytes()),
            max_output: self.request.max_output_tokens(),
        };
        let limits = Limits(&*host, &self.limit_headers);
        let (verdict, notes) = enforce::check(&limits, &worker.config, facts, &mut worker.admitted);
        for rule in &notes.overflowed {
            let name = worker.name(Metric::RatelimitKeyOverflowTotal, &[rule]);
            host.counter_add(&name, 1);
        }
        for _ in 0..notes.failures {
            worker.limiter_failed(host);
        }
        match verdict {
            Verdict::Admit(reservation) => {
                self.reservation = Some(reservation);
                self.check_global(host, worker)
            }
            Verdict::Reject(rejection) => Some(self.reject(host, worker, rejection)),
        }
    }

    /// Asks the rate limit service of every global rule that applies (the local rules admitted
    /// the request). `Some(Flow::Hold)` while answers are awaited; `Some(Flow::Respond)` when a
    /// failure under `failure_mode: deny` rejected it at once.
    fn check_global<H: Host>(&mut self, host: &mut H, worker: &mut Worker) -> Option<Flow> {
        if !worker.has_global_limits() {
            return None;
        }
        let (charges, unknown) =
            global::charges(&Limits(&*host, &self.limit_headers), &worker.config, self.request_model());
        for rule in unknown {
            worker.limiter_failed(host);
            if worker.config.limits.failure_mode == FailureMode::Deny {
                let name = worker.config.limits.rules.get(rule).map_or_else(String::new, |r| r.name.clone());
                return Some(self.reject(host, worker, enforce::unavailable(&name)));
            }
        }
        for (i, charge) in charges.iter().enumerate() {
            let Some(call) = charge.request(&worker.config) else { continue };
            match worker.call_service(host, &call) {
                Some(token) => self.global_pending.push((token, i)),
                None => {
                    if let Some(flow) = self.global_failed(host, worker, charge.rule) {
                        return Some(flow);
                    }
                }
            }
        }
        self.global_charges = charges;
        if self.global_pending.is_empty() {
            return None;
        }
        // Waiting for the service is not a hold for the model: the hold watchdog stays out of it
        // (Envoy times the calls out).
        self.held_bytes = None;
        Some(Flow::Hold)
    }

    /// A global rule's service gave no usable answer: counted; the rule's `failure_mode`
    /// decides. `Some(Flow::Respond)` when it rejects the request.
    fn global_failed<H: Host>(&mut self, host: &mut H, worker: &mut Worker, rule: usize) -> Option<Flow> {
        worker.count_service_error(host, rule);
        let r = worker.config.limits.rules.get(rule)?;
        match r.global.as_ref()?.failure_mode {
            FailureMode::Allow => None,
            FailureMode::Deny => {
                let rejection = enforce::unavailable(&r.name);
                self.global_pending.clear();
                Some(self.reject(host, worker, rejection))
            }
        }
    }

    /// True while the request waits for rate limit service answers.
    pub fn is_waiting(&self) -> bool {
        !self.global_pending.is_empty()
    }

    /// The answer to the rate limit service call `token` (`Err(())`: the call failed or timed
    /// out). `Some(Flow::Continue)` when it was the last one awaited and the request may go on
    /// (the glue resumes it); `Some(Flow::Respond)` when it was rejected (the reply is sent).
    pub fn on_global_answer<H: Host>(
        &mut self,
        host: &mut H,
        worker: &mut Worker,
        token: u32,
        result: Result<&[u8], ()>,
    ) -> Option<Flow> {
        let pos = self.global_pending.iter().position(|(t, _)| *t == token)?;
        let (_, i) = self.global_pending.swap_remove(pos);
        if self.rejected_by.is_some() || self.finished {
            return None;
        }
        let rule = self.global_charges.get(i)?.rule;
        let now_ms = host.now_nanos() / 1_000_000;
        match global::answer(&worker.config, rule, result, now_ms) {
            Answer::Admit => {}
            Answer::Reject(rejection) => {
                self.global_pending.clear();
                return Some(self.reject(host, worker, rejection));
            }
            Answer::Failed => {
                if let Some(flow) = self.global_failed(host, worker, rule) {
                    return Some(flow);
                }
            }
        }
        if !self.global_pending.is_empty() {
            return None;
        }
        self.start_active(host, worker);
        Some(self.release())
    }

    fn reject<H: Host>(&mut self, host: &mut H, worker: &mut Worker, rejection: Rejection) -> Flow {
        if let Some(reservation) = self.reservation.take() {
            // The local rules admitted it, then a rate limit service refused it: it never
            // reaches the upstream, so nothing of the local limits is spent on it.
            for _ in 0..enforce::give_back(&Limits(&*host, &self.limit_headers), &reservation) {
                worker.count_error(host, InternalError::RateLimit);
            }
        }
        let label = worker.model_label(host, self.request_model());
        host.counter_add(&worker.name(Metric::RatelimitRejectedTotal, &[&label, &rejection.rule]), 1);
        host.send_response(rejection.status, &rejection.headers, rejection.body.as_bytes());
        self.status = rejection.status;
        self.model_label = Some(label);
        self.rejected_by = Some(rejection.rule);
        self.held_bytes = None;
        Flow::Respond
    }

    fn release(&mut self) -> Flow {
        self.held_bytes = None;
        Flow::Continue
    }

    /// The glue released the request without the filter deciding to (a stalled hold, see
    /// [`crate::hold`]): body chunks that follow are new bytes again, scanned but not held.
    pub fn stop_holding(&mut self) {
        self.held_bytes = None;
    }

    /// True while the request is held for its model (watched by [`crate::hold`]).
    pub fn is_holding(&self) -> bool {
        self.held_bytes.is_some()
    }

    /// True while Envoy buffers the request body for this filter (held for the model, or
    /// waiting for the rate limit service): the glue then reads only the newly buffered bytes.
    pub fn is_buffering(&self) -> bool {
        self.held_bytes.is_some() || self.is_waiting()
    }

    /// Response headers: picks how to read the body.
    pub fn on_response_headers<H: Host>(&mut self, host: &mut H, worker: &mut Worker) {
        if self.operation.is_none() || self.rejected_by.is_some() {
            return;
        }
        // Too late for limits once the upstream answers (it may, before the body ended).
        self.limits_checked = true;
        // The upstream may answer before the request body ended (e.g. an early 4xx).
        self.start_active(host, worker);
        // One hostcall for all of them: the lookups below are many (rate-limit header families).
        let headers = host.response_headers();
        let header = |name: &str| header_value(&headers, name).map(<[u8]>::to_vec);
        let label = self.model_label.clone().unwrap_or_else(|| UNKNOWN.to_string());
        let series = self.series_of(worker, &label);
        for (kind, quota) in RateLimits::from_headers(header).reported() {
            if let Some(v) = quota.remaining {
                worker.record(host, series, Stat::UpstreamRemaining(kind), v);
            }
            if let Some(v) = quota.limit {
                worker.record(host, series, Stat::UpstreamLimit(kind), v);
            }
        }
        if !worker.config.usage_headers.is_empty() {
            match usage_from_headers(&worker.config.usage_headers, header) {
                Ok(u) => self.header_usage = u,
                Err(_) => self.response_skips.add(Skip::UsageInvalid),
            }
        }
        if let Some(r) = &self.reservation {
            // Per family (`requests`, `tokens`): when the upstream's own remaining is the lower,
            // its limit, remaining and reset stay, all three, so they describe one limit.
            let theirs_tighter = |family: &str| {
                r.headers.iter().any(|(name, ours)| {
                    name.strip_prefix("x-ratelimit-remaining-") == Some(family)
                        && header_value(&headers, name)
                            .and_then(parse_u64)
                            .is_some_and(|theirs| ours.parse::<u64>().is_ok_and(|ours| theirs < ours))
                })
            };
            let keep = [theirs_tighter("requests"), theirs_tighter("tokens")];
            for (name, value) in &r.headers {
                let family = name.rsplit('-').next().unwrap_or_default();
                if (family == "requests" && keep[0]) || (family == "tokens" && keep[1]) {
                    continue;
                }
                host.set_response_header(name, value);
            }
        }
        self.status = header_value(&headers, ":status").map_or(0, parse_status);
        if !(200..300).contains(&self.status) {
            return;
        }
        let encoding = match Encoding::from_header(header_value(&headers, "content-encoding").unwrap_or_default()) {
            Ok(encoding) => encoding,
            Err(_) => {
                self.response_skips.add(Skip::Compressed);
                return;
            }
        };
        // The scan's own bounded state comes out of the stream's memory budget first.
        let lease = self.lease(worker);
        if !lease.try_take(RESPONSE_SCAN_BYTES) {
            self.out_of_memory();
            worker.sync_memory(host);
            return;
        }
        // A copy is decoded for the scanners; the client gets the bytes as they are. The decoder
        // charges what it allocates to the same lease.
        self.decoder = encoding.map(|e| Decoder::with_lease(e, MAX_DECODED_BYTES, lease.clone()));
        let format = BodyFormat::from_content_type(header_value(&headers, "content-type").unwrap_or_default());
        let usage_format = self.operation.map_or(UsageFormat::OpenAiChat, Operation::usage_format);
        self.response = Some(ResponseScanner::new(format, usage_format));
        if self.injected && format == BodyFormat::Sse && self.decoder.is_none() {
            // The client did not ask for the usage chunk: it is cut from its stream, so the
            // length changes.
            host.remove_response_header("content-length");
            self.stripper = Some(UsageChunkStripper::with_lease(lease));
        }
        worker.sync_memory(host);
    }

    /// This stream's memory lease, taken on first use with the configured per-stream cap.
    fn lease(&mut self, worker: &Worker) -> Rc<Lease> {
        self.lease.get_or_insert_with(|| Lease::new(worker.config.memory.max_stream_bytes)).clone()
    }

    /// The memory budget refused this stream something: it is no longer decoded, scanned or
    /// stripped (its bytes pass as they come; the stripper forwards what it held with the next
    /// chunk), and what it held is given back. Counted once as `memory_budget`.
    fn out_of_memory(&mut self) {
        if self.response_skips.count(Skip::MemoryBudget) == 0 {
            self.response_skips.add(Skip::MemoryBudget);
        }
        self.decoder = None;
        self.response = None;
        if let Some(stripper) = self.stripper.as_mut() {
            stripper.abandon();
        }
        self.release_memory();
    }

    /// Gives back everything the stream holds of the budget.
    fn release_memory(&mut self) {
        if let Some(lease) = &self.lease {
            lease.release();
        }
    }

    /// After a callback that may have changed what this stream holds: tells the memory gauge
    /// (no hostcall unless the VM's total moved by a step, see [`Pool::gauge_delta`]).
    pub fn sync_memory<H: Host>(&self, host: &mut H, worker: &mut Worker) {
        if self.lease.is_some() {
            worker.sync_memory(host);
        }
    }

    /// A response body chunk: scanned for usage. Passed on untouched, except that a usage chunk
    /// the filter asked for is cut out: then the bytes to forward instead are returned.
    pub fn on_response_body<H: Host>(&mut self, host: &mut H, chunk: &[u8], end_of_stream: bool) -> Option<Vec<u8>> {
        if let Some(scanner) = self.response.as_mut() {
            let first_data = match self.decoder.as_mut() {
                None => scanner.feed(chunk),
                Some(decoder) => {
                    let mut first = false;
                    match decoder.feed(chunk, &mut |decoded| first |= scanner.feed(decoded)) {
                        Ok(()) => {}
                        Err(DecodeError::Memory) => self.out_of_memory(),
                        Err(_) => {
                            // Corrupt or beyond the size bound: stop reading this body.
                            self.response_skips.add(Skip::Compressed);
                            self.decoder = None;
                            self.response = None;
                            self.release_memory();
                        }
                    }
                    first
                }
            };
            if first_data && self.first_data_nanos.is_none() {
                self.first_data_nanos = Some(host.now_nanos());
            }
        }
        if end_of_stream && self.operation.is_some() {
            self.response_end_nanos = Some(host.now_nanos());
        }
        let stripper = self.stripper.as_mut()?;
        let forward = stripper.forward(chunk, end_of_stream);
        if stripper.gave_up() && self.response_skips.count(Skip::MemoryBudget) == 0 {
            // Refused memory: the stream falls back to passing through, unmetered.
            self.out_of_memory();
        }
        match forward {
            Forward::Unchanged => None,
            Forward::Bytes(out) => Some(out),
        }
    }

    /// True when response chunks may be rewritten (see [`Exchange::on_response_body`]).
    pub fn rewrites_response(&self) -> bool {
        self.stripper.is_some()
    }

    /// End of the stream, however it ended: records every metric of the exchange, once.
    pub fn on_log<H: Host>(&mut self, host: &mut H, worker: &mut Worker) {
        if self.operation.is_none() || self.finished {
            return;
        }
        self.finished = true;
        // First, so that a scrape that sees this request counted also sees it no longer active.
        if let Some(active) = self.active.take() {
            host.metric_add(active, -1);
        }
        let end = self.response_end_nanos.unwrap_or_else(|| host.now_nanos());
        if let Some(r) = self.response.as_mut() {
            if self.response_end_nanos.is_some() {
                r.finish();
            } else {
                r.abandon();
            }
        }
        let usage = self.response.as_ref().and_then(ResponseScanner::usage).or(self.header_usage);
        let response_model = self.response.as_ref().and_then(|r| r.model().map(str::to_string));
        let request_model = self.request_model().map(str::to_string);

        let label = match (&self.model_label, &request_model) {
            (Some(label), Some(_)) => label.clone(),
            // No model in the request: fall back to the one the response names.
            _ => worker.model_label(host, request_model.as_deref().or(response_model.as_deref())),
        };
        let series = self.series_of(worker, &label);
        // Response headers that passed through the filter carry the final status; the property
        // is only needed when none did (e.g. the client went away first).
        let status = match self.status {
            0 => host.response_code().unwrap_or(0),
            status => status,
        };
        // Flags explain failures and interruptions. A 1xx-3xx response whose end passed through
        // the filter was completed by the upstream and is counted as such (one property read
        // less per request); a client that leaves while Envoy writes its last bytes does not
        // make it `canceled`.
        let completed = self.response_end_nanos.is_some() && (100..400).contains(&status);
        let flags = if completed { 0 } else { host.response_flags().unwrap_or(0) };
        let error = classify(status, flags, self.rejected_by.is_some());
        // Ended as the upstream sent it: its end passed through the filter, or nothing (no
        // response flag) says it was cut off (a response that ended with its headers).
        let ended = completed || flags == 0;
        self.record(host, worker, series, status, error, usage, ended);
        // One price for the cost metric and the USD budgets.
        let price = worker.config.pricing.resolve(request_model.as_deref(), response_model.as_deref()).copied();

        if let Some(reservation) = self.reservation.take() {
            let failed = error != ErrorType::None;
            let released = enforce::release(
                &Limits(&*host, &self.limit_headers),
                price.as_ref(),
                &reservation,
                usage.as_ref(),
                failed,
            );
            for _ in 0..released.failures {
                worker.count_error(host, InternalError::RateLimit);
            }
            if released.unpriced {
                self.limit_skips.add(Skip::Unpriced);
            }
        }

        // Global token rules learn the real usage (a request still waiting when the client left
        // was never forwarded: nothing to report).
        if let Some(u) = usage.as_ref().filter(|_| self.rejected_by.is_none() && self.global_pending.is_empty()) {
            for c in &self.global_charges {
                if let Some(call) = c.report(&worker.config, u) {
                    worker.queue_report(host, call);
                }
            }
        }
        self.global_pending.clear();

        if let Some(pico) = usage.as_ref().zip(price).and_then(|(u, p)| p.cost_pico(u)) {
            if let Some(s) = worker.series.get_mut(series) {
                let micro = s.cost.add(pico);
                worker.add(host, series, Stat::Cost, micro);
            }
        }

        let ms = |nanos: u64| nanos.saturating_sub(self.started_nanos) / 1_000_000;
        worker.record(host, series, Stat::Duration, ms(end));
        if let Some(first) = self.first_data_nanos {
            worker.record(host, series, Stat::Ttft, ms(first));
        }

        let mut skips = *self.request.skips();
        if self.inject_abandoned && self.request.stream_lacks_usage() {
            skips.add(Skip::NotInjected);
        }
        skips.merge(&self.response_skips);
        skips.merge(&self.limit_skips);
        if let Some(r) = &self.response {
            skips.merge(r.skips());
        }
        worker.record_skips(host, &skips, &label);
        // Everything the stream held goes back to the VM's memory budget, however it ended.
        self.decoder = None;
        self.stripper = None;
        self.response = None;
        if let Some(lease) = self.lease.take() {
            lease.release();
            worker.sync_memory(host);
        }
    }

    /// Counts the request and its usage. `ended`: the response ended as the upstream sent it;
    /// only a complete 2xx without usage is a metering blind spot (`usage_missing`), a stream
    /// the client or the network cut off is a failed request (`canceled`, `network`).
    #[allow(clippy::too_many_arguments)]
    fn record<H: Host>(
        &self,
        host: &mut H,
        worker: &mut Worker,
        series: usize,
        status: u16,
        error: ErrorType,
        usage: Option<Usage>,
        ended: bool,
    ) {
        let operation = self.operation.map_or(UNKNOWN, Operation::as_str);
        if let Some(id) = worker.requests_stat(host, series, operation, status, error) {
            host.metric_add(id, 1);
        }
        match usage {
            Some(u) => {
                let counts = [u.input, u.output, u.cached_input, u.reasoning, u.cache_creation_input];
                for (i, n) in counts.into_iter().enumerate() {
                    worker.add(host, series, Stat::Tokens(i), n);
                }
                worker.record(host, series, Stat::PerRequest(0), u.input);
                worker.record(host, series, Stat::PerRequest(1), u.output);
            }
            None if ended && error == ErrorType::None && (200..300).contains(&status) => {
                worker.add(host, series, Stat::UsageMissing, 1)
            }
            None => {}
        }
    }

    /// The stat series of model label `label` and this exchange's app: the one found when the
    /// request became active, unless the label changed since (a model learnt from the response).
    fn series_of(&self, worker: &mut Worker, label: &str) -> usize {
        match self.series {
            Some(series) if self.model_label.as_deref() == Some(label) => series,
            _ => worker.series(label, &self.app),
        }
    }

    /// The request is complete (or the response started): the model is as known as it will be
    /// before the response, so the exchange becomes an active request under that model.
    fn start_active<H: Host>(&mut self, host: &mut H, worker: &mut Worker) {
        if self.active.is_some() || self.finished {
            return;
        }
        let label = worker.model_label(host, self.request_model());
        let series = worker.series(&label, &self.app);
        if let Some(id) = worker.stat(host, series, Stat::Active) {
            host.metric_add(id, 1);
            self.active = Some(id);
        }
        self.series = Some(series);
        self.model_label = Some(label);
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::body::tests::{CHAT_JSON, CHAT_SSE};
    use crate::classify::flags;
    use crate::labels::tests::FakeStore;
    use crate::labels::StoreError;
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
            assert_eq!((service, method), (crate::rls::SERVICE, crate::rls::METHOD));
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
    fn exchange(
        host: &mut FakeHost,
        w: &mut Worker,
        path: &str,
        req: &str,
        status: u16,
        ctype: &str,
        chunks: &[&[u8]],
    ) {
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
        let h =
            |host: &FakeHost, n: &str| host.response_headers.get(n).map(|v| String::from_utf8_lossy(v).into_owned());
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
        assert_eq!(
            host.gauges.get("model=.=unknown;.;llm_active_requests"),
            None,
            "rejected requests never become active"
        );
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
        assert_eq!((service, timeout), (crate::rls::encode_grpc_service("rls"), 50));
        let d = |key: &str| crate::rls::Descriptor {
            entries: vec![("rule".into(), "g-rpm".into()), ("key".into(), key.into())],
            limit: Some((100, crate::rls::Unit::Minute)),
        };
        assert_eq!(message, crate::rls::encode_request("llm", &[d(&key_entry(&message))], 1));
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
        let tpm = crate::rls::Descriptor {
            entries: vec![("rule".into(), "g-tpm".into()), ("key".into(), "global".into())],
            limit: Some((5000, crate::rls::Unit::Hour)),
        };
        assert_eq!(reports[0].message, crate::rls::encode_request("llm-t", &[tpm], 9), "10 output tokens - 1");

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
        let estimate = crate::enforce::estimate_input(&w.config, body.len() as u64) + 50;
        let h =
            |host: &FakeHost, n: &str| host.response_headers.get(n).map(|v| String::from_utf8_lossy(v).into_owned());

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
        assert_eq!(
            counter(&host, "model=.=m;.;app=.=unknown;.;token_type=.=output;.;llm_tokens_total"),
            10 * fit as u64
        );
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
        for body in [
            &br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"model":"gpt-4o"}"#,
        ] {
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
        assert_eq!(counter(&host, "model=.=gpt-4o;.;app=.=unknown;.;operation=.=chat;.;status=.=200;.;error_type=.=none;.;llm_requests_total"), 1);
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
            format!(
                "model=.=m;.;app=.=unknown;.;operation=.=chat;.;status=.={s};.;error_type=.={e};.;llm_requests_total"
            )
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
        assert_eq!(counter(&host, "model=.=m;.;app=.=unknown;.;operation=.=chat;.;status=.=200;.;error_type=.=canceled;.;llm_requests_total"), 1);
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
        assert_eq!(
            counter(&host, "model=.=gpt-4o-2024-08-06;.;app=.=unknown;.;token_type=.=input;.;llm_tokens_total"),
            19
        );
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
        exchange(
            &mut host,
            &mut w,
            "/v1/chat/completions",
            r#"{"model":"m"}"#,
            200,
            "application/json",
            &[b"\x28\xb5"],
        );
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
}
