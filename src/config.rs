//! Filter configuration: the JSON given as the wasm filter's `configuration` in `envoy.yaml`.
//!
//! Parsing is strict: unknown fields and out-of-range values are errors whose message starts with
//! the path of the offending field (`metrics.max_models: …`). The filter returns `false` from
//! `on_configure` on any error, so Envoy refuses the configuration instead of running with a
//! half-understood one.

mod limits;
mod resilience;

pub use limits::{
    FailureMode, GlobalService, KeySource, Limit, LimitsConfig, Rule, TokenEstimate, TokenType, Window,
    DEFAULT_MAX_LIMIT_KEYS, DEFAULT_SERVICE_TIMEOUT_MS,
};

use crate::meter::pricing::{Price, Pricing};
pub use crate::meter::upstream::UsageHeaders;
pub use resilience::{BreakerConfig, ResilienceConfig, ANY_MODEL};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// Default for `metrics.prefix`.
pub const DEFAULT_PREFIX: &str = "llm";
/// Default for `metrics.max_models`.
pub const DEFAULT_MAX_MODELS: usize = 100;
/// Default for `metrics.flush_interval_ms`: the hold watchdog's timer period, so the default
/// configuration needs no timer of its own.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 250;
/// Upper bound for `metrics.flush_interval_ms`: counters must stay current for alerts.
const MAX_FLUSH_INTERVAL_MS: u64 = 10_000;
/// Default for `metrics.max_apps`.
pub const DEFAULT_MAX_APPS: usize = 50;
/// Upper bound for `max_models` / `max_apps` and allowlist length: every label value is a set of
/// stats that lives until Envoy exits.
pub const MAX_LABEL_VALUES: usize = 10_000;
/// Default for `request.model_lookahead_bytes`: enough for the model of nearly every request,
/// far below Envoy's default 1 MiB `per_connection_buffer_limit_bytes`.
pub const DEFAULT_MODEL_LOOKAHEAD_BYTES: usize = 64 * 1024;
/// Upper bound for `request.model_lookahead_bytes`.
pub const MAX_MODEL_LOOKAHEAD_BYTES: usize = 16 * 1024 * 1024;
pub use crate::meter::pricing::MAX_PRICE;

/// Smallest `memory.max_stream_bytes` (and total) accepted: room for a gzip decoder and a scan.
pub const MIN_MEMORY_BYTES: u64 = 256 * 1024;
/// Largest `memory.max_stream_bytes_total` accepted: a wasm32 VM has at most 4 GiB of memory,
/// some of which the filter needs for everything else.
pub const MAX_MEMORY_TOTAL: u64 = 3 * 1024 * 1024 * 1024;

/// Headers that carry credentials: their values must never become label values.
const SECRET_HEADERS: &[&str] = &["authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"];

/// A configuration error, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field (`metrics.prefix`), or `configuration` for the document itself.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

/// How model names become label values.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelLabels {
    /// Only these request model names get their own label; every other model is `other`.
    Allowlist(HashSet<String>),
    /// The first `n` distinct models seen get their own label; later ones are `other`.
    FirstSeen(usize),
}

/// Validated `metrics` section.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// Prefix of every metric name (`llm` gives `llm_requests_total`).
    pub prefix: String,
    /// How the `model` label is bounded.
    pub models: ModelLabels,
    /// Lower-cased request header whose value becomes the `app` label.
    pub app_header: Option<String>,
    /// Bound on distinct `app` label values.
    pub max_apps: usize,
    /// Which histogram names are exported (`metrics.naming`).
    pub naming: Naming,
    /// How long counter and gauge updates are held per worker before they are sent to Envoy
    /// together (`metrics.flush_interval_ms`; 0: every update at once). See
    /// [`crate::meter::deltas`].
    pub flush_interval_ms: u64,
}

/// `metrics.naming`: the default `llm_*` histograms, the OpenTelemetry GenAI instruments
/// (`gen_ai_client_token_usage`, `gen_ai_server_request_duration_ms`, …), or both. Counters and
/// gauges (requests, tokens, cost, limits) have no OpenTelemetry counterpart and are exported in
/// every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Naming {
    /// `llm_request_duration_ms`, `llm_time_to_first_token_ms`, `llm_time_per_output_token_ms`,
    /// `llm_tokens_per_request`.
    #[default]
    Default,
    /// The OpenTelemetry GenAI instruments instead of those four histograms.
    Otel,
    /// Both.
    Both,
}

impl Naming {
    /// The default `llm_*` histograms are exported.
    pub fn default_histograms(self) -> bool {
        self != Naming::Otel
    }
    /// The OpenTelemetry GenAI instruments are exported.
    pub fn otel(self) -> bool {
        self != Naming::Default
    }
}

/// Validated `records` section: the per-request record published for Envoy's access log (see
/// [`crate::record`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordsConfig {
    /// Publish a record for every metered request (default on).
    pub enabled: bool,
    /// Filter state name: the access log reads `%FILTER_STATE(wasm.<name>:TYPED)%`.
    pub filter_state: String,
    /// Whose hash the record's `key_hash` is: by default the first rate limit rule's key (a
    /// header or the client IP), else the `authorization` header; `global` leaves `key_hash` out.
    pub key: KeySource,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            filter_state: crate::record::DEFAULT_NAME.to_string(),
            key: KeySource::Header("authorization".into()),
        }
    }
}

/// Validated `request` section.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestConfig {
    /// Request headers are held back until the model is found in at most this many body bytes
    /// (Envoy buffers them meanwhile); 0 forwards headers at once.
    pub model_lookahead_bytes: usize,
}

/// Validated `memory` section: the VM's budget for what streams hold (see [`crate::memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes all streams of one VM (one Envoy worker) may hold at once.
    pub max_stream_bytes_total: usize,
    /// Bytes one stream may hold.
    pub max_stream_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_stream_bytes_total: crate::memory::DEFAULT_MAX_TOTAL,
            max_stream_bytes: crate::memory::DEFAULT_MAX_STREAM,
        }
    }
}

/// The validated filter configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Metric naming and label bounds.
    pub metrics: MetricsConfig,
    /// How requests are read.
    pub request: RequestConfig,
    /// Model prices, for `cost_microusd_total` and USD limits.
    pub pricing: Pricing,
    /// Rate limits and budgets.
    pub limits: LimitsConfig,
    /// Response headers that carry usage.
    pub usage_headers: UsageHeaders,
    /// Add `stream_options.include_usage` to streaming chat/completions requests that lack it.
    pub inject_stream_usage: bool,
    /// Memory budget for streams.
    pub memory: MemoryConfig,
    /// Circuit breaker and fallback chains.
    pub resilience: ResilienceConfig,
    /// Per-request records for the access log.
    pub records: RecordsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            metrics: MetricsConfig {
                prefix: DEFAULT_PREFIX.to_string(),
                models: ModelLabels::FirstSeen(DEFAULT_MAX_MODELS),
                app_header: None,
                max_apps: DEFAULT_MAX_APPS,
                naming: Naming::Default,
                flush_interval_ms: DEFAULT_FLUSH_INTERVAL_MS,
            },
            request: RequestConfig { model_lookahead_bytes: DEFAULT_MODEL_LOOKAHEAD_BYTES },
            pricing: Pricing::default(),
            limits: LimitsConfig::default(),
            usage_headers: UsageHeaders::default(),
            inject_stream_usage: true,
            memory: MemoryConfig::default(),
            resilience: ResilienceConfig::default(),
            records: RecordsConfig::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    request: RawRequest,
    #[serde(default)]
    pricing: BTreeMap<String, RawPrice>,
    #[serde(default)]
    limits: Vec<limits::RawRule>,
    max_input_tokens: Option<u64>,
    failure_mode: Option<FailureMode>,
    max_limit_keys: Option<u64>,
    token_estimate: Option<limits::RawEstimate>,
    usage_headers: Option<UsageHeaders>,
    inject_stream_usage: Option<bool>,
    #[serde(default)]
    memory: RawMemory,
    #[serde(default)]
    resilience: resilience::RawResilience,
    #[serde(default)]
    records: RawRecords,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRecords {
    enabled: Option<bool>,
    filter_state: Option<String>,
    key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    max_stream_bytes_total: Option<u64>,
    max_stream_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    prefix: Option<String>,
    models: Option<Vec<String>>,
    max_models: Option<u64>,
    app_header: Option<String>,
    max_apps: Option<u64>,
    naming: Option<Naming>,
    flush_interval_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    model_lookahead_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    output: f64,
    cached_input: Option<f64>,
    cache_creation_input: Option<f64>,
}

impl Config {
    /// Parses and validates the filter configuration. Empty (or whitespace-only) input gives the
    /// defaults, so the filter works with no `configuration` at all.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| err("configuration", format!("invalid JSON: {e}")))?;
        require_objects(&value)?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() { "configuration".to_string() } else { path };
            err(field, e.into_inner().to_string())
        })?;
        let limits = limits::validate(limits::RawLimits {
            rules: raw.limits,
            max_input_tokens: raw.max_input_tokens,
            failure_mode: raw.failure_mode,
            max_limit_keys: raw.max_limit_keys,
            token_estimate: raw.token_estimate,
        })?;
        let records = validate_records(raw.records, &limits)?;
        Ok(Self {
            metrics: validate_metrics(raw.metrics)?,
            request: validate_request(raw.request)?,
            pricing: validate_pricing(raw.pricing)?,
            limits,
            usage_headers: validate_usage_headers(raw.usage_headers.unwrap_or_default())?,
            inject_stream_usage: raw.inject_stream_usage.unwrap_or(true),
            memory: validate_memory(raw.memory)?,
            resilience: resilience::validate(raw.resilience)?,
            records,
        })
    }
}

/// Serde's derived structs also accept JSON arrays (fields by position); the configuration must
/// use objects wherever the schema has one, so `[]` or `"metrics": ["x"]` are rejected.
fn require_objects(value: &serde_json::Value) -> Result<(), ConfigError> {
    let root = value.as_object().ok_or_else(|| err("configuration", "must be a JSON object"))?;
    if let Some(m) = root.get("metrics") {
        if !m.is_object() {
            return Err(err("metrics", "must be an object"));
        }
    }
    if let Some(r) = root.get("request") {
        if !r.is_object() {
            return Err(err("request", "must be an object"));
        }
    }
    if let Some(r) = root.get("resilience") {
        let r = r.as_object().ok_or_else(|| err("resilience", "must be an object"))?;
        if let Some(b) = r.get("circuit_breaker") {
            if !b.is_object() {
                return Err(err("resilience.circuit_breaker", "must be an object"));
            }
        }
        if let Some(f) = r.get("fallbacks") {
            if !f.is_object() {
                return Err(err("resilience.fallbacks", "must be an object mapping models to chains"));
            }
        }
    }
    if let Some(r) = root.get("records") {
        if !r.is_object() {
            return Err(err("records", "must be an object"));
        }
    }
    if let Some(m) = root.get("memory") {
        if !m.is_object() {
            return Err(err("memory", "must be an object"));
        }
    }
    if let Some(u) = root.get("usage_headers") {
        if !u.is_object() {
            return Err(err("usage_headers", "must be an object"));
        }
    }
    if let Some(t) = root.get("token_estimate") {
        if !t.is_object() {
            return Err(err("token_estimate", "must be an object"));
        }
    }
    if let Some(l) = root.get("limits") {
        let l = l.as_array().ok_or_else(|| err("limits", "must be an array of rules"))?;
        for (i, rule) in l.iter().enumerate() {
            if !rule.is_object() {
                return Err(err(format!("limits[{i}]"), "must be an object"));
            }
        }
    }
    if let Some(p) = root.get("pricing") {
        let p = p.as_object().ok_or_else(|| err("pricing", "must be an object mapping model names to prices"))?;
        for (model, price) in p {
            if !price.is_object() {
                return Err(err(format!("pricing.{model}"), "must be an object {\"input\": …, \"output\": …}"));
            }
        }
    }
    Ok(())
}

fn validate_metrics(raw: RawMetrics) -> Result<MetricsConfig, ConfigError> {
    let prefix = raw.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    let valid_prefix = prefix.len() <= 64
        && prefix.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid_prefix {
        return Err(err("metrics.prefix", "must match [a-zA-Z_][a-zA-Z0-9_]* and be at most 64 characters"));
    }

    let models = match (raw.models, raw.max_models) {
        (Some(_), Some(_)) => {
            return Err(err(
                "metrics.max_models",
                "cannot be combined with metrics.models (the allowlist is the bound)",
            ))
        }
        (Some(list), None) => {
            if list.len() > MAX_LABEL_VALUES {
                return Err(err("metrics.models", format!("at most {MAX_LABEL_VALUES} entries")));
            }
            let mut set = HashSet::new();
            for (i, m) in list.into_iter().enumerate() {
                if m.is_empty() || m.len() > 256 {
                    return Err(err(format!("metrics.models[{i}]"), "must be 1 to 256 characters"));
                }
                if m == crate::meter::labels::OTHER || m == crate::meter::labels::UNKNOWN {
                    return Err(err(
                        format!("metrics.models[{i}]"),
                        format!("\"{m}\" is reserved for overflow/absent models"),
                    ));
                }
                set.insert(m);
            }
            ModelLabels::Allowlist(set)
        }
        (None, max) => ModelLabels::FirstSeen(bounded("metrics.max_models", max, DEFAULT_MAX_MODELS)?),
    };

    let app_header = match raw.app_header {
        None => None,
        Some(h) => {
            let h = h.to_ascii_lowercase();
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            let name = h.strip_prefix(':').unwrap_or(&h);
            if name.is_empty() || h.len() > 256 || !name.bytes().all(token) {
                return Err(err("metrics.app_header", "must be a valid HTTP header name"));
            }
            if SECRET_HEADERS.contains(&h.as_str()) {
                return Err(err(
                    "metrics.app_header",
                    format!("\"{h}\" carries credentials and would expose them as a metric label"),
                ));
            }
            Some(h)
        }
    };
    if app_header.is_none() && raw.max_apps.is_some() {
        return Err(err("metrics.max_apps", "requires metrics.app_header"));
    }
    let max_apps = bounded("metrics.max_apps", raw.max_apps, DEFAULT_MAX_APPS)?;
    let flush_interval_ms = raw.flush_interval_ms.unwrap_or(DEFAULT_FLUSH_INTERVAL_MS);
    if flush_interval_ms > MAX_FLUSH_INTERVAL_MS {
        return Err(err(
            "metrics.flush_interval_ms",
            format!("must be at most {MAX_FLUSH_INTERVAL_MS} (0 sends every update at once)"),
        ));
    }
    Ok(MetricsConfig {
        prefix,
        models,
        app_header,
        max_apps,
        naming: raw.naming.unwrap_or_default(),
        flush_interval_ms,
    })
}

fn validate_records(raw: RawRecords, limits: &LimitsConfig) -> Result<RecordsConfig, ConfigError> {
    let defaults = RecordsConfig::default();
    let filter_state = raw.filter_state.unwrap_or(defaults.filter_state);
    let valid = !filter_state.is_empty()
        && filter_state.len() <= 64
        && filter_state.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(err("records.filter_state", "must be 1 to 64 characters of [A-Za-z0-9_-]"));
    }
    // By default the rate limits' key (the first rule keyed by a header or the client IP: the
    // limits read it anyway, and the hash prefix then matches the limiter's bucket ids), else
    // the API key in `authorization`.
    let key = match raw.key {
        Some(k) => limits::parse_key("records.key", &k)?,
        None => limits
            .rules
            .iter()
            .map(|r| &r.key)
            .find(|k| !matches!(k, KeySource::Global))
            .cloned()
            .unwrap_or(defaults.key),
    };
    Ok(RecordsConfig { enabled: raw.enabled.unwrap_or(true), filter_state, key })
}

fn validate_request(raw: RawRequest) -> Result<RequestConfig, ConfigError> {
    let model_lookahead_bytes = match raw.model_lookahead_bytes {
        None => DEFAULT_MODEL_LOOKAHEAD_BYTES,
        Some(v) if v <= MAX_MODEL_LOOKAHEAD_BYTES as u64 => v as usize,
        Some(_) => {
            return Err(err(
                "request.model_lookahead_bytes",
                format!("must be at most {MAX_MODEL_LOOKAHEAD_BYTES} (and below Envoy's buffer limit)"),
            ))
        }
    };
    Ok(RequestConfig { model_lookahead_bytes })
}

fn validate_memory(raw: RawMemory) -> Result<MemoryConfig, ConfigError> {
    let defaults = MemoryConfig::default();
    let in_range = |field: &str, v: u64, max: u64| {
        if (MIN_MEMORY_BYTES..=max).contains(&v) {
            usize::try_from(v).map_err(|_| err(field, "does not fit this platform"))
        } else {
            Err(err(field, format!("must be between {MIN_MEMORY_BYTES} and {max} bytes")))
        }
    };
    let total = match raw.max_stream_bytes_total {
        None => defaults.max_stream_bytes_total,
        Some(v) => in_range("memory.max_stream_bytes_total", v, MAX_MEMORY_TOTAL)?,
    };
    let stream = match raw.max_stream_bytes {
        None => defaults.max_stream_bytes.min(total),
        Some(v) => in_range("memory.max_stream_bytes", v, MAX_MEMORY_TOTAL)?,
    };
    if stream > total {
        return Err(err("memory.max_stream_bytes", "must not exceed memory.max_stream_bytes_total"));
    }
    Ok(MemoryConfig { max_stream_bytes_total: total, max_stream_bytes: stream })
}

fn valid_header_name(h: &str) -> bool {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    !h.is_empty() && h.len() <= 256 && h.bytes().all(token)
}

fn validate_usage_headers(raw: UsageHeaders) -> Result<UsageHeaders, ConfigError> {
    let check = |field: &str, v: Option<String>| -> Result<Option<String>, ConfigError> {
        match v.map(|h| h.to_ascii_lowercase()) {
            Some(h) if !valid_header_name(&h) => {
                Err(err(format!("usage_headers.{field}"), "must be a valid HTTP header name"))
            }
            v => Ok(v),
        }
    };
    Ok(UsageHeaders {
        input: check("input", raw.input)?,
        output: check("output", raw.output)?,
        cached_input: check("cached_input", raw.cached_input)?,
        reasoning: check("reasoning", raw.reasoning)?,
        cache_creation_input: check("cache_creation_input", raw.cache_creation_input)?,
    })
}

fn bounded(field: &str, value: Option<u64>, default: usize) -> Result<usize, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if v >= 1 && v <= MAX_LABEL_VALUES as u64 => Ok(v as usize),
        Some(_) => Err(err(field, format!("must be between 1 and {MAX_LABEL_VALUES}"))),
    }
}

fn validate_pricing(raw: BTreeMap<String, RawPrice>) -> Result<Pricing, ConfigError> {
    let mut pricing = Pricing::default();
    for (model, p) in raw {
        if model.is_empty() {
            return Err(err("pricing", "model name must not be empty"));
        }
        let check = |name: &str, v: f64| {
            if v.is_finite() && (0.0..=MAX_PRICE).contains(&v) {
                Ok(v)
            } else {
                Err(err(
                    format!("pricing.{model}.{name}"),
                    format!("must be a USD price per 1M tokens between 0 and {MAX_PRICE}"),
                ))
            }
        };
        let input = check("input", p.input)?;
        let output = check("output", p.output)?;
        let cached_input = check("cached_input", p.cached_input.unwrap_or(input))?;
        let cache_creation = check("cache_creation_input", p.cache_creation_input.unwrap_or(input))?;
        pricing.insert(&model, Price::per_million_with_cache_writes(input, output, cached_input, cache_creation));
    }
    Ok(pricing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(json: &str) -> String {
        match Config::parse(json.as_bytes()) {
            Ok(c) => format!("unexpectedly valid: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_configuration_gives_defaults() {
        assert_eq!(Config::parse(b"").ok(), Some(Config::default()));
        assert_eq!(Config::parse(b" \n").ok(), Some(Config::default()));
        assert_eq!(Config::parse(b"{}").ok(), Some(Config::default()));
    }

    #[test]
    fn full_configuration_parses() {
        let c = Config::parse(
            br#"{"metrics":{"prefix":"ai","models":["gpt-4o","gpt-4o-mini"],"app_header":"X-App-Id","max_apps":3},
                "pricing":{"gpt-4o":{"input":2.5,"output":10,"cached_input":1.25}}}"#,
        );
        let c = match c {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.metrics.prefix, "ai");
        assert_eq!(c.metrics.app_header.as_deref(), Some("x-app-id"));
        assert_eq!(c.metrics.max_apps, 3);
        match &c.metrics.models {
            ModelLabels::Allowlist(s) => assert!(s.contains("gpt-4o") && s.len() == 2),
            other => panic!("{other:?}"),
        }
        assert!(c.pricing.get("gpt-4o").is_some());
        assert_eq!(c.request.model_lookahead_bytes, DEFAULT_MODEL_LOOKAHEAD_BYTES);
        let c = Config::parse(br#"{"request":{"model_lookahead_bytes":0}}"#).map_err(|e| e.to_string());
        assert_eq!(c.map(|c| c.request.model_lookahead_bytes), Ok(0));
    }

    fn expect_err(json: &str, prefix: &str) {
        let msg = parse_err(json);
        assert!(msg.starts_with(prefix), "{json}: got {msg:?}, want prefix {prefix:?}");
    }

    #[test]
    fn errors_name_the_field() {
        expect_err(
            r#"{"metric":{}}"#,
            "metric: unknown field `metric`, expected one of `metrics`, `request`, `pricing`, `limits`",
        );
        expect_err(r#"{"request":{"model_lookahead_bytes":-1}}"#, "request.model_lookahead_bytes: invalid value");
        expect_err(r#"{"request":{"model_lookahead_bytes":99999999}}"#, "request.model_lookahead_bytes: must be");
        expect_err(r#"{"request":{"lookahead":1}}"#, "request.lookahead: unknown field");
        expect_err(r#"{"request":[]}"#, "request: must be an object");
        expect_err(r#"{"metrics":{"prefx":"a"}}"#, "metrics.prefx: unknown field `prefx`");
        expect_err(r#"{"metrics":{"prefix":"9x"}}"#, "metrics.prefix:");
        expect_err(r#"{"metrics":{"prefix":"a-b"}}"#, "metrics.prefix:");
        expect_err(r#"{"metrics":{"max_models":0}}"#, "metrics.max_models:");
        expect_err(r#"{"metrics":{"max_models":"10"}}"#, "metrics.max_models: invalid type");
        expect_err(r#"{"metrics":{"max_models":10,"models":["a"]}}"#, "metrics.max_models:");
        expect_err(r#"{"metrics":{"models":["a",""]}}"#, "metrics.models[1]:");
        expect_err(r#"{"metrics":{"models":["other"]}}"#, "metrics.models[0]:");
        expect_err(r#"{"metrics":{"app_header":"Authorization"}}"#, "metrics.app_header:");
        expect_err(r#"{"metrics":{"app_header":"bad header"}}"#, "metrics.app_header:");
        expect_err(r#"{"metrics":{"max_apps":5}}"#, "metrics.max_apps: requires");
        expect_err(r#"{"pricing":{"m":{"input":-1,"output":1}}}"#, "pricing.m.input:");
        expect_err(r#"{"pricing":{"m":{"input":1}}}"#, "pricing.m: missing field `output`");
        expect_err(r#"{"pricing":{"m":{"input":1,"output":1,"cache":1}}}"#, "pricing.m.cache: unknown field `cache`");
        expect_err("not json", "configuration:");
        expect_err("[]", "configuration: must be a JSON object");
        expect_err(r#"{"metrics":["x"]}"#, "metrics: must be an object");
        expect_err(r#"{"pricing":{"m":[1,2]}}"#, "pricing.m: must be an object");
        expect_err(r#"{"pricing":{"m":{"input":1001,"output":1}}}"#, "pricing.m.input: must be a USD price");
    }

    #[test]
    fn memory_budget_parses_and_is_bounded() {
        let c = Config::parse(b"{}").unwrap();
        assert_eq!(c.memory, MemoryConfig { max_stream_bytes_total: 256 << 20, max_stream_bytes: 32 << 20 });
        let c = Config::parse(br#"{"memory":{"max_stream_bytes_total":16777216}}"#).unwrap();
        assert_eq!(c.memory.max_stream_bytes, 16 << 20, "the stream default never exceeds the total");
        let c = Config::parse(br#"{"memory":{"max_stream_bytes_total":1048576,"max_stream_bytes":262144}}"#).unwrap();
        assert_eq!((c.memory.max_stream_bytes_total, c.memory.max_stream_bytes), (1 << 20, 256 << 10));
        expect_err(r#"{"memory":{"max_stream_bytes_total":1000}}"#, "memory.max_stream_bytes_total: must be between");
        expect_err(r#"{"memory":{"max_stream_bytes_total":4294967296}}"#, "memory.max_stream_bytes_total:");
        expect_err(
            r#"{"memory":{"max_stream_bytes_total":1048576,"max_stream_bytes":2097152}}"#,
            "memory.max_stream_bytes: must not exceed",
        );
        expect_err(r#"{"memory":{"max_bytes":1}}"#, "memory.max_bytes: unknown field");
        expect_err(r#"{"memory":5}"#, "memory: must be an object");
    }

    #[test]
    fn resilience_parses_and_bad_chains_are_refused_with_the_field_named() {
        let c = Config::parse(
            br#"{"resilience":{"circuit_breaker":{"failures":3,"open_seconds":30,"half_open_requests":1,
                "on":["upstream_rate_limit","server_error","timeout","network"]},
                "fallbacks":{"gpt-4.1":["claude-sonnet-4","gemini-2.5-flash"],"*":["deepseek-v3.2"]}}}"#,
        )
        .unwrap();
        let b = c.resilience.breaker.clone().unwrap();
        assert_eq!((b.failures, b.open_ms, b.half_open_requests, b.on.len()), (3, 30_000, 1, 4));
        assert_eq!(c.resilience.chain("gpt-4.1"), ["claude-sonnet-4", "gemini-2.5-flash"]);
        assert_eq!(c.resilience.chain("o3"), ["deepseek-v3.2"]);
        assert!(c.resilience.names("gemini-2.5-flash") && !c.resilience.names("o3"));
        let d = Config::parse(br#"{"resilience":{"circuit_breaker":{}}}"#).unwrap().resilience;
        assert_eq!(d.breaker.unwrap().on.len(), 4, "defaults");
        assert!(!Config::parse(b"{}").unwrap().resilience.is_active());
        let cb = |extra: &str| format!(r#"{{"resilience":{{"circuit_breaker":{{{extra}}}}}}}"#);
        expect_err(&cb(r#""on":["server_error","bogus"]"#), "resilience.circuit_breaker.on[1]: unknown error class");
        expect_err(&cb(r#""on":[]"#), "resilience.circuit_breaker.on: must name");
        expect_err(&cb(r#""failures":0"#), "resilience.circuit_breaker.failures: must be between 1");
        expect_err(&cb(r#""open_seconds":0"#), "resilience.circuit_breaker.open_seconds:");
        expect_err(&cb(r#""half_open_requests":0"#), "resilience.circuit_breaker.half_open_requests:");
        expect_err(&cb(r#""retries":1"#), "resilience.circuit_breaker.retries: unknown field");
        let fb = |chains: &str| format!(r#"{{"resilience":{{"circuit_breaker":{{}},"fallbacks":{chains}}}}}"#);
        expect_err(&fb(r#"{"a":["b","a"]}"#), "resilience.fallbacks.a[1]: names the model itself");
        expect_err(&fb(r#"{"a":[]}"#), "resilience.fallbacks.a: must name at least one model");
        expect_err(&fb(r#"{"a":["b","b"]}"#), "resilience.fallbacks.a[1]: \"b\" is already");
        expect_err(
            &fb(r#"{"a":["b"],"b":["c"],"c":["a"]}"#),
            "resilience.fallbacks.a: a fallback cycle: a → b → c → a",
        );
        expect_err(&fb(r#"{"a":["*"]}"#), "resilience.fallbacks.a[0]:");
        expect_err(&fb(r#"{"a":"b"}"#), "resilience.fallbacks.a: invalid type");
        expect_err(
            r#"{"resilience":{"fallbacks":{"a":["b"]}}}"#,
            "resilience.fallbacks: requires resilience.circuit_breaker",
        );
        expect_err(r#"{"resilience":[]}"#, "resilience: must be an object");
        // A chain through `*` is no cycle: `*` is only for models without a chain of their own.
        assert!(Config::parse(fb(r#"{"a":["b"],"*":["a"]}"#).as_bytes()).is_ok());
    }

    #[test]
    fn limits_parse() {
        let c = Config::parse(
            br#"{"limits":[
                {"name":"rpm","key":"header:Authorization","requests_per_minute":100},
                {"name":"tpm-4o","key":"global","models":["gpt-4o"],"per_model":true,"tokens_per_minute":1000,"token_type":"output"},
                {"name":"usd","key":"ip","usd_per_day":2.5},
                {"name":"conc","key":"header:x-api-key","max_concurrent":3}],
              "max_input_tokens":8000,"failure_mode":"deny","max_limit_keys":50,
              "token_estimate":{"bytes_per_token":3,"max_output_tokens":100}}"#,
        )
        .unwrap();
        let l = &c.limits;
        assert!(l.is_active());
        assert_eq!(l.rules.len(), 4);
        assert_eq!(l.rules[0].key, KeySource::Header("authorization".into()));
        assert_eq!(l.rules[0].limit, Limit::Requests { per: Window::Minute, max: 100 });
        assert_eq!(l.rules[1].limit, Limit::Tokens { per: Window::Minute, max: 1000, token_type: TokenType::Output });
        assert!(l.rules[1].per_model && l.rules[1].models.as_ref().unwrap().contains("gpt-4o"));
        assert_eq!(l.rules[2].key, KeySource::Ip);
        assert_eq!(l.rules[2].limit, Limit::Usd { per: Window::Day, max_pico: 2_500_000_000_000 });
        assert_eq!(l.rules[3].limit, Limit::Concurrent { max: 3 });
        assert_eq!(l.max_input_tokens, Some(8000));
        assert_eq!(l.failure_mode, FailureMode::Deny);
        assert_eq!(l.max_keys, 50);
        assert_eq!(l.estimate, TokenEstimate { bytes_per_token: 3, max_output_tokens: 100 });
        let d = Config::parse(br#"{"limits":[{"name":"t","key":"global","tokens_per_hour":5}]}"#).unwrap();
        assert_eq!(d.limits.rules[0].limit, Limit::Tokens { per: Window::Hour, max: 5, token_type: TokenType::Total });
        assert_eq!(d.limits.failure_mode, FailureMode::Allow);
        assert_eq!(d.limits.max_keys, DEFAULT_MAX_LIMIT_KEYS);
        assert!(!Config::default().limits.is_active());
    }

    #[test]
    fn limit_errors_name_the_field() {
        let rule = |body: &str| format!(r#"{{"limits":[{{"name":"r","key":"global",{body}}}]}}"#);
        expect_err(&rule(r#""requests_per_minute":0"#), "limits[0].requests_per_minute: must be at least 1");
        expect_err(&rule(r#""requests_per_minute":1,"tokens_per_minute":2"#), "limits[0]: has both");
        expect_err(&rule(r#""per_model":true"#), "limits[0]: needs one limit");
        expect_err(&rule(r#""requests_per_minute":1,"token_type":"input""#), "limits[0].token_type: only applies");
        expect_err(&rule(r#""tokens_per_minute":1,"token_type":"cached""#), "limits[0].token_type: unknown variant");
        expect_err(&rule(r#""usd_per_hour":-1"#), "limits[0].usd_per_hour:");
        expect_err(&rule(r#""requests_per_minute":1,"models":[]"#), "limits[0].models: must not be empty");
        expect_err(&rule(r#""requests_per_minute":1,"burst":3"#), "limits[0].burst: unknown field");
        expect_err(&rule(r#""requests_per_minute":-5"#), "limits[0].requests_per_minute: invalid value");
        expect_err(r#"{"limits":[{"name":"a b","key":"global","max_concurrent":1}]}"#, "limits[0].name:");
        expect_err(r#"{"limits":[{"name":"a","key":"user","max_concurrent":1}]}"#, "limits[0].key:");
        expect_err(r#"{"limits":[{"name":"a","key":"header:","max_concurrent":1}]}"#, "limits[0].key:");
        expect_err(r#"{"limits":[{"key":"global","max_concurrent":1}]}"#, "limits[0]: missing field `name`");
        expect_err(
            r#"{"limits":[{"name":"a","key":"global","max_concurrent":1},{"name":"a","key":"ip","max_concurrent":1}]}"#,
            "limits[1].name:",
        );
        expect_err(r#"{"limits":{}}"#, "limits: must be an array");
        expect_err(r#"{"limits":[1]}"#, "limits[0]: must be an object");
        expect_err(r#"{"max_input_tokens":0}"#, "max_input_tokens: must be at least 1");
        expect_err(r#"{"failure_mode":"open"}"#, "failure_mode: unknown variant");
        expect_err(r#"{"max_limit_keys":0}"#, "max_limit_keys: must be between");
        expect_err(r#"{"token_estimate":{"bytes_per_token":0}}"#, "token_estimate.bytes_per_token:");
        expect_err(r#"{"token_estimate":[]}"#, "token_estimate: must be an object");
        expect_err(r#"{"usage_headers":{"input":"bad header"}}"#, "usage_headers.input: must be");
        expect_err(r#"{"usage_headers":{"prompt":"x"}}"#, "usage_headers.prompt: unknown field");
        let c = Config::parse(br#"{"usage_headers":{"input":"X-Usage-Input-Tokens"}}"#).unwrap();
        assert_eq!(c.usage_headers.input.as_deref(), Some("x-usage-input-tokens"));
    }

    #[test]
    fn budgets_windows_offsets_soft_limits_and_shadow_mode() {
        let c = Config::parse(
            br#"{"limits":[
                {"name":"day","key":"header:x-api-key","requests_per_day":1000},
                {"name":"week","key":"global","tokens_per_week":1000000,"window_offset_hours":-8},
                {"name":"month","key":"global","tokens_per_month":5000000,"warn_at":0.8,"mode":"shadow"},
                {"name":"usd-w","key":"global","usd_per_week":100},
                {"name":"usd-m","key":"global","usd_per_month":500,"window_offset_hours":14,"warn_at":0.95,
                 "scope":"global","service":{"cluster":"rls","domain":"llm"}},
                {"name":"cheap","key":"global","usd_per_month":500,"cost_unit_usd":0.01,
                 "scope":"global","service":{"cluster":"rls","domain":"llm"}}]}"#,
        )
        .unwrap();
        let r = &c.limits.rules;
        assert_eq!(r[0].limit, Limit::Requests { per: Window::Day, max: 1000 });
        assert_eq!(
            (r[1].limit, r[1].offset_hours),
            (Limit::Tokens { per: Window::Week, max: 1_000_000, token_type: TokenType::Total }, -8)
        );
        assert_eq!(
            (r[2].warn_at_ppm, r[2].shadow, r[2].warn_threshold(5_000_000)),
            (Some(800_000), true, Some(4_000_000))
        );
        assert_eq!(r[3].limit, Limit::Usd { per: Window::Week, max_pico: 100_000_000_000_000 });
        let g = r[4].global.as_ref().unwrap();
        // 500 USD in units of 1/10,000 USD.
        assert_eq!((g.cost_unit_pico, g.max_hits, r[4].offset_hours), (100_000_000, 5_000_000, 14));
        let g = r[5].global.as_ref().unwrap();
        assert_eq!((g.cost_unit_pico, g.max_hits), (10_000_000_000, 50_000));
        assert!(!r[0].shadow && r[0].warn_at_ppm.is_none());
        assert!(r[4].exports_use() && !r[0].exports_use());
        assert!(c.limits.reserves_output());

        let rule = |body: &str| format!(r#"{{"limits":[{{"name":"r","key":"global",{body}}}]}}"#);
        let service = r#""scope":"global","service":{"cluster":"rls","domain":"llm"}"#;
        expect_err(&rule(r#""tokens_per_fortnight":1"#), "limits[0].tokens_per_fortnight: unknown field");
        expect_err(&rule(r#""requests_per_year":1"#), "limits[0].requests_per_year: unknown field");
        expect_err(&rule(r#""tokens_per_month":1,"tokens_per_week":2"#), "limits[0]: has both");
        expect_err(&rule(r#""tokens_per_month":1,"window_offset_hours":15"#), "limits[0].window_offset_hours: must be");
        expect_err(
            &rule(r#""tokens_per_month":1,"window_offset_hours":-13"#),
            "limits[0].window_offset_hours: must be",
        );
        expect_err(
            &rule(r#""tokens_per_hour":1,"window_offset_hours":2"#),
            "limits[0].window_offset_hours: only applies",
        );
        for bad in ["0", "1", "1.5", "-0.2"] {
            expect_err(&rule(&format!(r#""usd_per_month":1,"warn_at":{bad}"#)), "limits[0].warn_at: must be");
        }
        expect_err(&rule(r#""max_concurrent":3,"warn_at":0.5"#), "limits[0].warn_at: only applies");
        expect_err(&rule(r#""max_concurrent":3,"mode":"dry-run""#), "limits[0].mode: unknown variant");
        expect_err(&rule(r#""usd_per_month":5,"cost_unit_usd":0.01"#), "limits[0].cost_unit_usd: only applies");
        expect_err(
            &rule(&format!(r#""usd_per_month":5,"cost_unit_usd":0,{service}"#)),
            "limits[0].cost_unit_usd: must be",
        );
        // A global budget whose units do not fit the protocol's uint32, and one below a unit.
        expect_err(
            &rule(&format!(r#""usd_per_month":500000,{service}"#)),
            "limits[0].usd_per_month: is 5000000000 cost units of 0.0001 USD (cost_unit_usd), above",
        );
        Config::parse(rule(&format!(r#""usd_per_month":500000,"cost_unit_usd":0.001,{service}"#)).as_bytes()).unwrap();
        expect_err(
            &rule(&format!(r#""usd_per_day":0.00001,{service}"#)),
            "limits[0].usd_per_day: is less than one cost unit",
        );
    }

    #[test]
    fn global_rules_name_their_service() {
        let c = Config::parse(
            br#"{"failure_mode":"deny","limits":[
                {"name":"g","key":"header:authorization","tokens_per_minute":1000,"scope":"global",
                 "service":{"cluster":"rls","domain":"llm"}},
                {"name":"h","key":"global","requests_per_second":5,"scope":"global",
                 "service":{"cluster":"rls","domain":"llm","timeout_ms":50,"failure_mode":"allow"}},
                {"name":"l","key":"global","max_concurrent":5,"scope":"local"}]}"#,
        )
        .unwrap();
        let g = c.limits.rules[0].global.clone().unwrap();
        assert_eq!(
            g,
            GlobalService {
                cluster: "rls".into(),
                domain: "llm".into(),
                timeout_ms: DEFAULT_SERVICE_TIMEOUT_MS,
                failure_mode: FailureMode::Deny,
                cost_unit_pico: 0,
                max_hits: 1000,
            }
        );
        let h = c.limits.rules[1].global.clone().unwrap();
        assert_eq!((h.timeout_ms, h.failure_mode), (50, FailureMode::Allow));
        assert!(c.limits.rules[2].global.is_none() && c.limits.has_global());

        let rule = |body: &str| format!(r#"{{"limits":[{{"name":"r","key":"global",{body}}}]}}"#);
        let service = r#""service":{"cluster":"rls","domain":"llm"}"#;
        expect_err(&rule(r#""requests_per_minute":1,"scope":"global""#), "limits[0].service: scope: global needs");
        expect_err(&rule(&format!(r#""requests_per_minute":1,{service}"#)), "limits[0].service: only applies");
        expect_err(&rule(&format!(r#""max_concurrent":1,"scope":"global",{service}"#)), "limits[0].scope:");
        expect_err(
            &rule(&format!(r#""tokens_per_day":5000000000,"scope":"global",{service}"#)),
            "limits[0].tokens_per_day: a global",
        );
        expect_err(&rule(r#""requests_per_minute":1,"scope":"everywhere""#), "limits[0].scope: unknown variant");
        expect_err(
            &rule(r#""requests_per_minute":1,"scope":"global","service":{"cluster":"","domain":"d"}"#),
            "limits[0].service.cluster:",
        );
        expect_err(
            &rule(r#""requests_per_minute":1,"scope":"global","service":{"cluster":"c","domain":"d","timeout_ms":0}"#),
            "limits[0].service.timeout_ms:",
        );
        expect_err(
            &rule(r#""requests_per_minute":1,"scope":"global","service":{"cluster":"c","domain":"d","port":1}"#),
            "limits[0].service.port: unknown field",
        );
        expect_err(
            &rule(r#""requests_per_minute":1,"scope":"global","service":{"cluster":"c"}"#),
            "limits[0].service: missing field `domain`",
        );
    }

    #[test]
    fn records_and_naming() {
        let c = Config::parse(b"{}").unwrap();
        assert_eq!(c.records, RecordsConfig::default());
        assert!(c.records.enabled && c.records.filter_state == "llm_meter");
        assert_eq!(c.metrics.naming, Naming::Default);
        let c = Config::parse(
            br#"{"records":{"enabled":false,"filter_state":"meter-2","key":"ip"},"metrics":{"naming":"otel"}}"#,
        )
        .unwrap();
        assert_eq!(c.records, RecordsConfig { enabled: false, filter_state: "meter-2".into(), key: KeySource::Ip });
        assert_eq!((c.metrics.naming.default_histograms(), c.metrics.naming.otel()), (false, true));
        let both = Config::parse(br#"{"metrics":{"naming":"both"}}"#).unwrap().metrics.naming;
        assert_eq!((both.default_histograms(), both.otel()), (true, true));
        // By default the key is the rate limits' (the first rule keyed by a header or IP).
        let key = |json: &str| Config::parse(json.as_bytes()).unwrap().records.key;
        assert_eq!(
            key(r#"{"limits":[{"name":"g","key":"global","requests_per_minute":1},
                              {"name":"k","key":"header:X-Api-Key","requests_per_minute":1},
                              {"name":"i","key":"ip","requests_per_minute":1}]}"#),
            KeySource::Header("x-api-key".into())
        );
        assert_eq!(key(r#"{"limits":[{"name":"i","key":"ip","requests_per_minute":1}]}"#), KeySource::Ip);
        assert_eq!(
            key(r#"{"limits":[{"name":"g","key":"global","requests_per_minute":1}]}"#),
            KeySource::Header("authorization".into())
        );
        assert_eq!(
            key(r#"{"records":{"key":"global"},"limits":[{"name":"i","key":"ip","requests_per_minute":1}]}"#),
            KeySource::Global
        );
        expect_err(r#"{"records":{"filter_state":"a.b"}}"#, "records.filter_state:");
        expect_err(r#"{"records":{"filter_state":""}}"#, "records.filter_state:");
        expect_err(r#"{"records":{"key":"cookie"}}"#, "records.key:");
        expect_err(r#"{"records":{"key":"header:"}}"#, "records.key:");
        expect_err(r#"{"records":{"mode":1}}"#, "records.mode: unknown field");
        expect_err(r#"{"records":[]}"#, "records:");
        expect_err(r#"{"metrics":{"naming":"prometheus"}}"#, "metrics.naming:");
        expect_err(r#"{"metrics":{"flush_interval_ms":10001}}"#, "metrics.flush_interval_ms: must be at most 10000");
        expect_err(r#"{"metrics":{"flush_interval_ms":-1}}"#, "metrics");
        let c = Config::parse(br#"{"metrics":{"flush_interval_ms":0}}"#).unwrap();
        assert_eq!(c.metrics.flush_interval_ms, 0);
        assert_eq!(Config::default().metrics.flush_interval_ms, 250);
    }
}
