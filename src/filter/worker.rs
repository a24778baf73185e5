//! What one Envoy worker's exchanges share (one wasm VM): the configuration, this worker's view
//! of the label registries, the stat ids of every `(model, app)` series with their cost
//! remainders, the rate-limit buckets known to exist, the usage reports waiting for the timer,
//! and log throttling.

use super::hold::HoldWatch;
use super::host::{add_to_counter, Host, InternalError, MetricKind};
use crate::config::FailureMode;
use crate::config::{Config, KeySource, ModelLabels};
use crate::limit::enforce;
use crate::limit::global;
use crate::limit::limiter::AdmittedKeys;
use crate::memory::Pool;
use crate::meter::classify::ErrorType;
use crate::meter::labels::{sanitize, sanitized, LabelSet, OTHER, UNKNOWN};
use crate::meter::metrics::{stat_name, Metric};
use crate::meter::pricing::CostCarry;
use crate::meter::upstream::QuotaKind;
use crate::resilience::breaker::State;
use crate::scan::body::{Skip, Skips};
use crate::scan::operation::Operation;
use std::collections::HashMap;

/// How model names become `model` labels on this worker.
#[derive(Debug)]
pub(crate) enum ModelLabeler {
    Allowlist(std::collections::HashSet<String>),
    FirstSeen(LabelSet),
}

/// State shared by all exchanges of one Envoy worker (one wasm VM): configuration, this worker's
/// view of the label registries, and the cost remainders.
#[derive(Debug)]
pub struct Worker {
    pub(crate) config: Config,
    /// The records' key hashes, remembered (see [`crate::record::KeyHashes`]).
    pub(crate) key_hashes: crate::record::KeyHashes,
    /// The request headers an exchange keeps when its request headers arrive: those the limits
    /// read (with limits), and the one the record's `key_hash` is made of (with records).
    pub(crate) kept_headers: Vec<String>,
    /// Every request header an exchange reads when its request headers arrive, read together:
    /// `:path`, the app header (if configured), then the kept headers.
    pub(crate) request_header_names: Vec<String>,
    pub(crate) models: ModelLabeler,
    pub(crate) apps: Option<LabelSet>,
    pub(crate) skips_logged: [u64; Skip::ALL.len()],
    /// Held requests of this worker; driven by the glue, which knows context ids and timers.
    pub holds: HoldWatch,
    /// Rate-limit failures on this worker, for log throttling.
    pub(crate) limit_failures: u64,
    /// Stat ids per `(model, app)` label pair, so that an exchange neither builds stat names
    /// nor hashes them after the first exchange of its pair. Bounded like the labels:
    /// `(max_models + 2) × (max_apps + 2)` pairs at most.
    pub(crate) series: Vec<Series>,
    pub(crate) series_index: HashMap<String, HashMap<String, usize>>,
    /// Rate-limit buckets known to be admitted (see [`AdmittedKeys`]).
    pub(crate) admitted: AdmittedKeys,
    /// Per rule: the serialized `GrpcService` of a global rule's service and its timeout.
    pub(crate) services: Vec<Option<(Vec<u8>, u64)>>,
    /// Token usage reports for global rules, sent by the root context (see [`crate::limit::global`]).
    pub(crate) reports: Vec<global::Call>,
    /// Failed rate limit service calls on this worker, for log throttling.
    pub(crate) service_failures: u64,
    /// The id of `meter_memory_bytes`, once defined.
    pub(crate) memory_gauge: Option<u32>,
    /// Circuits this worker last showed as not closed, by model, with the state shown: their
    /// `model_state` gauge is kept true by [`Worker::refresh_circuits`] (an open circuit turns
    /// half-open with time alone, no request telling).
    pub(crate) circuits_shown: HashMap<String, State>,
    /// When [`Worker::refresh_circuits`] looks next, ms.
    pub(crate) next_circuit_refresh_ms: u64,
    /// What this worker knows of global USD budgets (see [`global::Ledger`]).
    pub(crate) ledger: global::Ledger,
    /// `output_tokens_estimate` gauge ids by model label.
    pub(crate) estimate_gauges: HashMap<String, u32>,
    /// Response sizes not added to their model's output average yet (see [`Worker::learn_output`]).
    pub(crate) pending_outputs: crate::limit::estimate::Pending,
    /// Per rule whose use is exported: the `ratelimit_used` gauge, the value shown and when
    /// its window ends (see [`Worker::refresh_use`]).
    pub(crate) use_shown: Vec<Option<UseShown>>,
}

/// A rule's `ratelimit_used` gauge as this worker last set it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UseShown {
    id: u32,
    value: u64,
    window_end_ms: u64,
}

/// Most token usage reports a worker queues between two timer ticks; beyond, a report is
/// dropped and counted as a service error (the service is then far behind anyway).
const MAX_QUEUED_REPORTS: usize = 10_000;

/// The `token_type` values of `tokens_total`, in [`crate::scan::usage::Usage`] field order.
pub(crate) const TOKEN_TYPES: [&str; 5] = ["input", "output", "cached_input", "reasoning", "cache_creation_input"];

/// One stat of a [`Series`] (besides `requests_total`, which also has per-exchange labels).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stat {
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
    /// `time_per_output_token_ms`.
    Tpot,
}

impl Stat {
    const COUNT: usize = 5 + TOKEN_TYPES.len() + 2 + 4 + 1;

    pub(crate) fn slot(self) -> usize {
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
            Stat::Tpot => 5 + TOKEN_TYPES.len() + 6,
        }
    }

    /// The stat name: the metric's labels filled from the series and the stat's own label
    /// (`token_type` or `kind`).
    pub(crate) fn name(self, prefix: &str, model: &str, app: &str) -> String {
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

    pub(crate) fn metric(self) -> Metric {
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
            Stat::Tpot => Metric::TimePerOutputTokenMs,
        }
    }
}

/// The stat ids of one `(model, app)` label pair, each defined on its first use (defining a
/// stat creates it, so a stat never used is never shown), and the pair's cost remainder.
#[derive(Debug)]
pub(crate) struct Series {
    pub(crate) model: String,
    pub(crate) app: String,
    pub(crate) ids: [Option<u32>; Stat::COUNT],
    /// `requests_total` ids by (operation, status, error_type).
    pub(crate) requests: Vec<(&'static str, u16, ErrorType, u32)>,
    /// OpenTelemetry instrument ids by (instrument, operation, token type or error type).
    pub(crate) otel: Vec<(Metric, Operation, &'static str, u32)>,
    pub(crate) cost: CostCarry,
}

impl Worker {
    /// Worker state for a validated configuration.
    pub fn new(config: Config) -> Self {
        // The VM's budget is the configuration's (the latest, when a reload runs two at once).
        Pool::with(|p| p.set_max_total(config.memory.max_stream_bytes_total));
        let mut kept_headers: Vec<String> = Vec::new();
        if config.limits.is_active() {
            kept_headers.extend(config.limits.request_headers().into_iter().map(str::to_string));
        }
        if let (true, KeySource::Header(name)) = (config.records.enabled, &config.records.key) {
            if !kept_headers.contains(name) {
                kept_headers.push(name.clone());
            }
        }
        let mut request_header_names = vec![":path".to_string()];
        for name in config.metrics.app_header.iter().chain(&kept_headers) {
            if !request_header_names.contains(name) {
                request_header_names.push(name.clone());
            }
        }
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
            key_hashes: crate::record::KeyHashes::default(),
            kept_headers,
            request_header_names,
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
                .map(|r| r.global.as_ref().map(|g| (crate::limit::rls::encode_grpc_service(&g.cluster), g.timeout_ms)))
                .collect(),
            reports: Vec::new(),
            service_failures: 0,
            memory_gauge: None,
            circuits_shown: HashMap::new(),
            next_circuit_refresh_ms: 0,
            ledger: global::Ledger::default(),
            estimate_gauges: HashMap::new(),
            pending_outputs: Default::default(),
            use_shown: Vec::new(),
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
        // The limit of every rule whose use is exported, and its use (defined at 0: a budget
        // nobody spent yet shows as 0 %, not as missing).
        let mut shown = Vec::new();
        for rule in &self.config.limits.rules {
            if !rule.exports_use() {
                shown.push(None);
                continue;
            }
            if let Some(id) = host.define_metric(MetricKind::Gauge, &self.name(Metric::RatelimitLimit, &[&rule.name])) {
                host.metric_record(id, rule.gauge_value(rule.enforced_max()));
            }
            let used = host.define_metric(MetricKind::Gauge, &self.name(Metric::RatelimitUsed, &[&rule.name]));
            shown.push(used.map(|id| UseShown { id, value: 0, window_end_ms: 0 }));
        }
        self.use_shown = shown;
    }

    /// True when the root context's timer must run for the limits: usage reports to send, or
    /// exported budgets whose window may end without a request.
    pub fn limits_need_tick(&self) -> bool {
        self.has_global_limits() || self.config.limits.rules.iter().any(crate::config::Rule::exports_use)
    }

    /// Shows what a rule keyed `global` has used (`ratelimit_used`) in the window that ends at
    /// `window_end_ms`, when it changed.
    pub(crate) fn show_use<H: Host>(&mut self, host: &mut H, rule: usize, used: u64, window_end_ms: u64) {
        let Some(Some(shown)) = self.use_shown.get_mut(rule) else { return };
        shown.window_end_ms = window_end_ms;
        if shown.value != used {
            shown.value = used;
            host.metric_record(shown.id, used);
        }
    }

    /// A window of a rule keyed `global` ended with no request since: its use is what the new
    /// window starts with (a local rule's debt, read from its bucket; 0 for a rate limit
    /// service's counter, which starts anew). Run from the root context's timer.
    pub fn refresh_use<H: Host>(&mut self, host: &mut H) {
        let now_ms = host.now_nanos() / 1_000_000;
        for i in 0..self.use_shown.len() {
            let Some(Some(shown)) = self.use_shown.get(i).copied() else { continue };
            if shown.window_end_ms == 0 || now_ms < shown.window_end_ms {
                continue;
            }
            let used = enforce::global_use(&*host, &self.config, i, now_ms).unwrap_or(0);
            let Some(rule) = self.config.limits.rules.get(i) else { continue };
            let (used, end) = (rule.gauge_value(used), rule.period().map_or(0, |p| p.at(now_ms).end_ms));
            self.show_use(host, i, used, end);
        }
    }

    /// Counts what a check noted besides its verdict: shadow would-be rejections, `warn_at`
    /// crossings, the use of rules keyed `global`.
    pub(crate) fn note_limits<H: Host>(
        &mut self,
        host: &mut H,
        model_label: &str,
        shadow: &[String],
        crossed: &[enforce::Crossing],
        used: &[(usize, u64, u64)],
    ) {
        for rule in shadow {
            self.count_rejection(host, model_label, rule, true);
        }
        for c in crossed {
            self.count_warning(host, c);
        }
        for &(rule, value, end) in used {
            let value = self.config.limits.rules.get(rule).map_or(value, |r| r.gauge_value(value));
            self.show_use(host, rule, value, end);
        }
    }

    /// Counts a rejection (`mode="enforce"`) or a shadow rule's would-be rejection.
    pub(crate) fn count_rejection<H: Host>(&self, host: &mut H, model_label: &str, rule: &str, shadow: bool) {
        let mode = if shadow { "shadow" } else { "enforce" };
        host.counter_add(&self.name(Metric::RatelimitRejectedTotal, &[model_label, rule, mode]), 1);
    }

    /// A key crossed its rule's `warn_at`: counted, and logged (the key as the hash the
    /// buckets know it by: never the raw key).
    pub(crate) fn count_warning<H: Host>(&self, host: &mut H, c: &enforce::Crossing) {
        let Some(rule) = self.config.limits.rules.get(c.rule) else { return };
        host.counter_add(&self.name(Metric::RatelimitWarningsTotal, &[&rule.name]), 1);
        let unit = if matches!(rule.limit, crate::config::Limit::Usd { .. }) { " USD" } else { "" };
        let (used, max) =
            (format!("{}{unit}", enforce::amount(&rule.limit, c.used)), enforce::amount(&rule.limit, c.max));
        host.log_warn(&format!(
            "llm-meter: rule '{}' key {} passed its warning threshold: {used} of {max} used in this window",
            rule.name, c.key
        ));
    }

    /// A completed response of `output` tokens for `model_label`, ended at `end_nanos`, teaches
    /// its model's output average: at once on a quiet worker, else with the next flush of the
    /// counters ([`Worker::flush_estimates`]): two hostcalls per model and interval, not per
    /// response.
    pub(crate) fn learn_output<H: Host>(&mut self, host: &mut H, model_label: &str, output: u64, end_nanos: u64) {
        let interval = self.config.metrics.flush_interval_ms.saturating_mul(1_000_000);
        if let Some(sizes) = self.pending_outputs.add(model_label, output, end_nanos, interval) {
            self.add_outputs(host, model_label, &sizes);
        }
    }

    /// Adds every held response size to its model's output average (on the root context's
    /// tick, and when the VM stops).
    pub fn flush_estimates<H: Host>(&mut self, host: &mut H) {
        for (label, sizes) in self.pending_outputs.take() {
            self.add_outputs(host, &label, &sizes);
        }
    }

    fn add_outputs<H: Host>(&mut self, host: &mut H, model_label: &str, sizes: &[u64]) {
        let key = crate::limit::estimate::key(&self.config.metrics.prefix, model_label);
        match crate::limit::estimate::update(&*host, &key, sizes) {
            Some((before, after)) if before != Some(after) => self.show_estimate(host, model_label, after),
            Some(_) => {}
            None => self.count_error(host, InternalError::SharedData),
        }
    }

    /// Shows `output_tokens_estimate` of a model label.
    pub(crate) fn show_estimate<H: Host>(&mut self, host: &mut H, model_label: &str, value: u64) {
        let id = match self.estimate_gauges.get(model_label) {
            Some(&id) => Some(id),
            None => {
                let id =
                    host.define_metric(MetricKind::Gauge, &self.name(Metric::OutputTokensEstimate, &[model_label]));
                if let Some(id) = id {
                    self.estimate_gauges.insert(model_label.to_string(), id);
                }
                id
            }
        };
        if let Some(id) = id {
            host.metric_record(id, value);
        }
    }

    /// `model`'s circuit entered `state`: counted, and the model's state gauge set.
    pub fn circuit_entered<H: Host>(&mut self, host: &mut H, model: &str, state: State) {
        let label = self.model_label(host, Some(model));
        host.counter_add(&self.name(Metric::CircuitTransitionsTotal, &[&label, state.as_str()]), 1);
        self.show_circuit(host, model, &label, state);
        host.log_warn(&format!("llm-meter: the circuit of model {label} is now {}", state.as_str()));
    }

    fn show_circuit<H: Host>(&mut self, host: &mut H, model: &str, label: &str, state: State) {
        if let Some(id) = host.define_metric(MetricKind::Gauge, &self.name(Metric::ModelState, &[label])) {
            host.metric_record(id, state.gauge());
        }
        if state == State::Closed {
            self.circuits_shown.remove(model);
        } else {
            self.circuits_shown.insert(model.to_string(), state);
        }
    }

    /// Keeps the `model_state` gauge of every circuit this worker showed as not closed true to
    /// the shared state, at most once a second (run from the root context's timer): an open
    /// circuit turns half-open when its time is up, with no request to tell, and another worker
    /// may have closed it. One shared-data read per such circuit.
    pub fn refresh_circuits<H: Host>(&mut self, host: &mut H) {
        if self.circuits_shown.is_empty() {
            return;
        }
        let now_ms = host.now_nanos() / 1_000_000;
        if now_ms < self.next_circuit_refresh_ms {
            return;
        }
        self.next_circuit_refresh_ms = now_ms.saturating_add(1000);
        let shown: Vec<(String, State)> = self.circuits_shown.iter().map(|(m, s)| (m.clone(), *s)).collect();
        for (model, was) in shown {
            let key = crate::resilience::circuit_key(&self.config.metrics.prefix, &model);
            let now = crate::resilience::breaker::read(&*host, &key).state(now_ms);
            if now != was {
                let label = self.model_label(host, Some(&model));
                self.show_circuit(host, &model, &label, now);
            }
        }
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

    /// The answer to a usage report of a global rule: counted as a service error when it is not
    /// one, else what it says of the rule's use and `warn_at`.
    pub fn report_answered<H: Host>(&mut self, host: &mut H, call: &global::Call, result: Result<&[u8], ()>) {
        let (rule, hits) = (call.rule, call.hits);
        let Some(response) = global::decision(result) else {
            self.count_service_error(host, rule);
            return;
        };
        let now_ms = host.now_nanos() / 1_000_000;
        let Some(status) = response.statuses.first() else { return };
        let Some(seen) = global::seen(&self.config, rule, &call.key, hits, status, now_ms, None) else { return };
        self.note_global(host, rule, &seen, now_ms);
    }

    /// What a rate limit service said at `now_ms` of a global rule: its use (rules keyed
    /// `global`) and a `warn_at` crossing.
    pub(crate) fn note_global<H: Host>(&mut self, host: &mut H, rule: usize, seen: &global::Seen, now_ms: u64) {
        let Some(r) = self.config.limits.rules.get(rule) else { return };
        if r.exports_use() {
            let (used, end) = (r.gauge_value(seen.amounts.0), r.period().map_or(0, |p| p.at(now_ms).end_ms));
            self.show_use(host, rule, used, end);
        }
        if seen.crossed {
            let (used, max) = seen.amounts;
            let crossing = enforce::Crossing { rule, key: seen.key.clone(), used, max };
            self.count_warning(host, &crossing);
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn name(&self, metric: Metric, values: &[&str]) -> String {
        stat_name(&self.config.metrics.prefix, metric, values)
    }

    /// The series of a `(model, app)` label pair (both already bounded label values).
    pub(crate) fn series(&mut self, model: &str, app: &str) -> usize {
        if let Some(&i) = self.series_index.get(model).and_then(|apps| apps.get(app)) {
            return i;
        }
        let i = self.series.len();
        self.series.push(Series {
            model: model.to_string(),
            app: app.to_string(),
            ids: [None; Stat::COUNT],
            requests: Vec::new(),
            otel: Vec::new(),
            cost: CostCarry::default(),
        });
        self.series_index.entry(model.to_string()).or_default().insert(app.to_string(), i);
        i
    }

    /// The id of `stat` in `series`, defined on first use.
    pub(crate) fn stat<H: Host>(&mut self, host: &mut H, series: usize, stat: Stat) -> Option<u32> {
        let s = self.series.get_mut(series)?;
        let slot = s.ids.get_mut(stat.slot())?;
        if slot.is_none() {
            let name = stat.name(&self.config.metrics.prefix, &s.model, &s.app);
            *slot = host.define_metric(stat.metric().kind(), &name);
        }
        *slot
    }

    /// The id of `requests_total` in `series` for these per-exchange labels.
    pub(crate) fn requests_stat<H: Host>(
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

    /// Records `value` in an OpenTelemetry GenAI instrument of `series` (its model is
    /// `gen_ai_request_model`) for `operation`; `extra` is the token type
    /// (`gen_ai_client_token_usage`) or the error type (`gen_ai_server_request_duration_ms`).
    pub(crate) fn record_otel<H: Host>(
        &mut self,
        host: &mut H,
        series: usize,
        metric: Metric,
        operation: Operation,
        extra: &'static str,
        value: u64,
    ) {
        let Some(s) = self.series.get_mut(series) else { return };
        let found = s.otel.iter().find(|o| o.0 == metric && o.1 == operation && o.2 == extra).map(|o| o.3);
        let id = match found {
            Some(id) => id,
            None => {
                let values = [operation.otel_name(), operation.provider(), s.model.as_str(), extra];
                let name = stat_name(&self.config.metrics.prefix, metric, &values);
                let Some(id) = host.define_metric(MetricKind::Histogram, &name) else { return };
                s.otel.push((metric, operation, extra, id));
                id
            }
        };
        host.metric_record(id, value);
    }

    /// Adds to a counter of `series`.
    pub(crate) fn add<H: Host>(&mut self, host: &mut H, series: usize, stat: Stat, value: u64) {
        if let Some(id) = self.stat(host, series, stat) {
            add_to_counter(host, id, value);
        }
    }

    /// Sets a gauge or records a histogram value of `series`.
    pub(crate) fn record<H: Host>(&mut self, host: &mut H, series: usize, stat: Stat, value: u64) {
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
    pub(crate) fn limiter_failed<H: Host>(&mut self, host: &mut H) {
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
        host.grpc_call(service, crate::limit::rls::SERVICE, crate::limit::rls::METHOD, &call.message, *timeout_ms)
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

    pub(crate) fn queue_report<H: Host>(&mut self, host: &mut H, call: global::Call) {
        if self.reports.len() >= MAX_QUEUED_REPORTS {
            self.count_service_error(host, call.rule);
            return;
        }
        self.reports.push(call);
    }

    pub(crate) fn model_label<H: Host>(&mut self, host: &mut H, model: Option<&str>) -> String {
        let Some(model) = model else { return UNKNOWN.to_string() };
        let resolved = match &mut self.models {
            ModelLabeler::Allowlist(set) => {
                return if set.contains(model) { sanitize(model) } else { OTHER.to_string() }
            }
            ModelLabeler::FirstSeen(set) => set.resolve(&*host, &sanitized(model.as_bytes())),
        };
        if resolved.store_failed {
            self.count_error(host, InternalError::SharedData);
        }
        resolved.label
    }

    /// The `app` label for the app header's value (`value`: as the request sent it, if it did).
    pub(crate) fn app_label<H: Host>(&mut self, host: &mut H, value: Option<&[u8]>) -> String {
        let Some(apps) = self.apps.as_mut() else { return UNKNOWN.to_string() };
        let Some(value) = value.filter(|v| !v.is_empty()) else { return UNKNOWN.to_string() };
        let resolved = apps.resolve(&*host, &sanitized(value));
        if resolved.store_failed {
            self.count_error(host, InternalError::SharedData);
        }
        resolved.label
    }

    /// Counts skips and logs them, each reason on its 1st, 2nd, 4th, 8th… occurrence on this
    /// worker, so a flood of bad input cannot flood the log.
    pub(crate) fn record_skips<H: Host>(&mut self, host: &mut H, skips: &Skips, model: &str) {
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
