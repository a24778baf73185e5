//! Metric names and how labels are encoded into Envoy stat names.
//!
//! Wasm filters can only define flat stat names. Labels are encoded Istio-style as
//! `key=.=value;.;` segments in front of the metric name:
//! `model=.=gpt-4o;.;app=.=web;.;llm_requests_total`. The `stats_tags` in `envoy/envoy.yaml`
//! (regex `(key=\.=(.*?);\.;)` per key) cut each segment out of the name and turn it into a tag, so
//! `/stats/prometheus` prints `llm_requests_total{model="gpt-4o",app="web"}`. Envoy adds the
//! `wasmcustom.` namespace when the filter defines the stat and strips it again for Prometheus.
//!
//! Label values are re-checked here, whatever the caller did: a byte outside the label character
//! set ([`crate::meter::labels::is_label_byte`]) becomes `_`, so no stat name can break the tag regexes or
//! the Prometheus text format.

use crate::meter::labels::is_label_byte;

/// Kind of an Envoy stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic counter.
    Counter,
    /// Gauge, may go up and down.
    Gauge,
    /// Histogram (Envoy buckets set by `histogram_bucket_settings`).
    Histogram,
}

/// Every metric the filter exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// `requests_total{model,app,operation,status,error_type}`
    RequestsTotal,
    /// `tokens_total{model,app,token_type}`
    TokensTotal,
    /// `cost_microusd_total{model,app}`
    CostMicrousdTotal,
    /// `request_duration_ms{model}`
    RequestDurationMs,
    /// `time_to_first_token_ms{model}`
    TimeToFirstTokenMs,
    /// `tokens_per_request{model,token_type}`
    TokensPerRequest,
    /// `active_requests{model}`
    ActiveRequests,
    /// `usage_missing_total{model}`
    UsageMissingTotal,
    /// `meter_skips_total{reason}`: input the filter could not meter (counted, never fatal).
    MeterSkipsTotal,
    /// `meter_errors_total{kind}`: internal failures the filter survived (fail-open).
    MeterErrorsTotal,
    /// `ratelimit_rejected_total{model,rule,mode}`: requests this filter rejected (`enforce`), or
    /// a rule in `mode: shadow` would have (`shadow`: the request went on).
    RatelimitRejectedTotal,
    /// `ratelimit_warnings_total{rule}`: a key's bucket crossed its rule's `warn_at` (once per
    /// key and window).
    RatelimitWarningsTotal,
    /// `ratelimit_used{rule}`: what the window has used of a rule keyed `global` (requests,
    /// tokens, or micro-USD), as this Envoy last saw it.
    RatelimitUsed,
    /// `ratelimit_limit{rule}`: that rule's limit, in the same unit.
    RatelimitLimit,
    /// `output_tokens_estimate{model}`: the output tokens a request without `max_tokens`
    /// reserves (the model's moving average; see [`crate::limit::estimate`]).
    OutputTokensEstimate,
    /// `ratelimit_key_overflow_total{rule}`: requests charged to a rule's shared overflow bucket
    /// because the rule already tracks `max_limit_keys` keys.
    RatelimitKeyOverflowTotal,
    /// `ratelimit_service_errors_total{rule}`: calls to a global rule's rate limit service that
    /// failed (unreachable, timeout, error status, unreadable answer); `failure_mode` decided.
    RatelimitServiceErrorsTotal,
    /// `upstream_ratelimit_remaining{model,kind}`: what the upstream says is left of its quota.
    UpstreamRatelimitRemaining,
    /// `upstream_ratelimit_limit{model,kind}`: the upstream's quota.
    UpstreamRatelimitLimit,
    /// `meter_memory_bytes`: bytes held by in-flight streams (decoders, stripper lookahead,
    /// scanners), summed over the VMs of the process (see [`crate::memory`]).
    MeterMemoryBytes,
    /// `meter_memory_budget_bytes`: one VM's budget (`memory.max_stream_bytes_total`).
    MeterMemoryBudgetBytes,
    /// `model_state{model}`: a model's circuit, 0 closed, 1 half-open, 2 open.
    ModelState,
    /// `circuit_transitions_total{model,state}`: circuits entering a state.
    CircuitTransitionsTotal,
    /// `fallbacks_total{model,to}`: requests for `model` served by `to`.
    FallbacksTotal,
    /// `upstream_retries_total{model}`: retries Envoy made below the filter
    /// (`x-envoy-attempt-count` − 1).
    UpstreamRetriesTotal,
    /// `time_per_output_token_ms{model}`: a stream's time per output token after the first,
    /// (duration − time to first token) / (output tokens − 1), for streams with ≥ 2 output tokens.
    TimePerOutputTokenMs,
    /// OpenTelemetry GenAI `gen_ai.client.token.usage` (tokens per request), with
    /// `gen_ai_token_type` `input` / `output` (`metrics.naming: otel`).
    GenAiClientTokenUsage,
    /// OpenTelemetry GenAI `gen_ai.server.request.duration`, in milliseconds.
    GenAiServerRequestDuration,
    /// OpenTelemetry GenAI `gen_ai.server.time_to_first_token`, in milliseconds.
    GenAiServerTimeToFirstToken,
    /// OpenTelemetry GenAI `gen_ai.server.time_per_output_token`, in milliseconds.
    GenAiServerTimePerOutputToken,
}

impl Metric {
    /// Every metric, for documentation and configuration checks.
    pub const ALL: [Metric; 30] = [
        Metric::RequestsTotal,
        Metric::TokensTotal,
        Metric::CostMicrousdTotal,
        Metric::RequestDurationMs,
        Metric::TimeToFirstTokenMs,
        Metric::TokensPerRequest,
        Metric::ActiveRequests,
        Metric::UsageMissingTotal,
        Metric::MeterSkipsTotal,
        Metric::MeterErrorsTotal,
        Metric::RatelimitRejectedTotal,
        Metric::RatelimitWarningsTotal,
        Metric::RatelimitUsed,
        Metric::RatelimitLimit,
        Metric::OutputTokensEstimate,
        Metric::RatelimitKeyOverflowTotal,
        Metric::RatelimitServiceErrorsTotal,
        Metric::UpstreamRatelimitRemaining,
        Metric::UpstreamRatelimitLimit,
        Metric::MeterMemoryBytes,
        Metric::MeterMemoryBudgetBytes,
        Metric::ModelState,
        Metric::CircuitTransitionsTotal,
        Metric::FallbacksTotal,
        Metric::UpstreamRetriesTotal,
        Metric::TimePerOutputTokenMs,
        Metric::GenAiClientTokenUsage,
        Metric::GenAiServerRequestDuration,
        Metric::GenAiServerTimeToFirstToken,
        Metric::GenAiServerTimePerOutputToken,
    ];

    /// An OpenTelemetry GenAI instrument: its name is not prefixed.
    pub fn is_otel(self) -> bool {
        matches!(
            self,
            Metric::GenAiClientTokenUsage
                | Metric::GenAiServerRequestDuration
                | Metric::GenAiServerTimeToFirstToken
                | Metric::GenAiServerTimePerOutputToken
        )
    }

    /// Name after the prefix (`requests_total`).
    pub fn suffix(self) -> &'static str {
        match self {
            Metric::RequestsTotal => "requests_total",
            Metric::TokensTotal => "tokens_total",
            Metric::CostMicrousdTotal => "cost_microusd_total",
            Metric::RequestDurationMs => "request_duration_ms",
            Metric::TimeToFirstTokenMs => "time_to_first_token_ms",
            Metric::TokensPerRequest => "tokens_per_request",
            Metric::ActiveRequests => "active_requests",
            Metric::UsageMissingTotal => "usage_missing_total",
            Metric::MeterSkipsTotal => "meter_skips_total",
            Metric::MeterErrorsTotal => "meter_errors_total",
            Metric::RatelimitRejectedTotal => "ratelimit_rejected_total",
            Metric::RatelimitWarningsTotal => "ratelimit_warnings_total",
            Metric::RatelimitUsed => "ratelimit_used",
            Metric::RatelimitLimit => "ratelimit_limit",
            Metric::OutputTokensEstimate => "output_tokens_estimate",
            Metric::RatelimitKeyOverflowTotal => "ratelimit_key_overflow_total",
            Metric::RatelimitServiceErrorsTotal => "ratelimit_service_errors_total",
            Metric::UpstreamRatelimitRemaining => "upstream_ratelimit_remaining",
            Metric::UpstreamRatelimitLimit => "upstream_ratelimit_limit",
            Metric::MeterMemoryBytes => "meter_memory_bytes",
            Metric::MeterMemoryBudgetBytes => "meter_memory_budget_bytes",
            Metric::ModelState => "model_state",
            Metric::CircuitTransitionsTotal => "circuit_transitions_total",
            Metric::FallbacksTotal => "fallbacks_total",
            Metric::UpstreamRetriesTotal => "upstream_retries_total",
            Metric::TimePerOutputTokenMs => "time_per_output_token_ms",
            Metric::GenAiClientTokenUsage => "gen_ai_client_token_usage",
            Metric::GenAiServerRequestDuration => "gen_ai_server_request_duration_ms",
            Metric::GenAiServerTimeToFirstToken => "gen_ai_server_time_to_first_token_ms",
            Metric::GenAiServerTimePerOutputToken => "gen_ai_server_time_per_output_token_ms",
        }
    }

    /// Stat kind.
    pub fn kind(self) -> Kind {
        match self {
            Metric::RequestDurationMs
            | Metric::TimeToFirstTokenMs
            | Metric::TimePerOutputTokenMs
            | Metric::TokensPerRequest
            | Metric::GenAiClientTokenUsage
            | Metric::GenAiServerRequestDuration
            | Metric::GenAiServerTimeToFirstToken
            | Metric::GenAiServerTimePerOutputToken => Kind::Histogram,
            Metric::ActiveRequests
            | Metric::UpstreamRatelimitRemaining
            | Metric::UpstreamRatelimitLimit
            | Metric::MeterMemoryBytes
            | Metric::MeterMemoryBudgetBytes
            | Metric::ModelState
            | Metric::RatelimitUsed
            | Metric::RatelimitLimit
            | Metric::OutputTokensEstimate => Kind::Gauge,
            _ => Kind::Counter,
        }
    }

    /// Label keys, in encoding order.
    pub fn label_keys(self) -> &'static [&'static str] {
        match self {
            Metric::RequestsTotal => &["model", "app", "operation", "status", "error_type"],
            Metric::TokensTotal => &["model", "app", "token_type"],
            Metric::CostMicrousdTotal => &["model", "app"],
            Metric::TokensPerRequest => &["model", "token_type"],
            Metric::RequestDurationMs
            | Metric::TimeToFirstTokenMs
            | Metric::TimePerOutputTokenMs
            | Metric::ActiveRequests
            | Metric::UsageMissingTotal => &["model"],
            Metric::MeterSkipsTotal => &["reason"],
            Metric::MeterErrorsTotal => &["kind"],
            Metric::RatelimitRejectedTotal => &["model", "rule", "mode"],
            Metric::RatelimitKeyOverflowTotal
            | Metric::RatelimitServiceErrorsTotal
            | Metric::RatelimitWarningsTotal
            | Metric::RatelimitUsed
            | Metric::RatelimitLimit => &["rule"],
            Metric::OutputTokensEstimate => &["model"],
            Metric::UpstreamRatelimitRemaining | Metric::UpstreamRatelimitLimit => &["model", "kind"],
            Metric::MeterMemoryBytes | Metric::MeterMemoryBudgetBytes => &[],
            Metric::ModelState | Metric::UpstreamRetriesTotal => &["model"],
            Metric::CircuitTransitionsTotal => &["model", "state"],
            Metric::FallbacksTotal => &["model", "to"],
            Metric::GenAiClientTokenUsage => &[OP, PROVIDER, REQUEST_MODEL, TOKEN_TYPE],
            Metric::GenAiServerRequestDuration => &[OP, PROVIDER, REQUEST_MODEL, "error_type"],
            Metric::GenAiServerTimeToFirstToken | Metric::GenAiServerTimePerOutputToken => {
                &[OP, PROVIDER, REQUEST_MODEL]
            }
        }
    }
}

/// OpenTelemetry GenAI label keys (`gen_ai.operation.name` and so on, with `_` for `.`).
const OP: &str = "gen_ai_operation_name";
const PROVIDER: &str = "gen_ai_provider_name";
const REQUEST_MODEL: &str = "gen_ai_request_model";
const TOKEN_TYPE: &str = "gen_ai_token_type";

/// How a label key is written into stat names. The OpenTelemetry keys get a trailing `_`:
/// `gen_ai_request_model=.=` ends in `model=.=`, which the `model` tag regex would match too
/// (and `gen_ai_token_type=.=` the `token_type` one); `gen_ai_request_model_=.=` matches only
/// its own regex. The `stats_tags` entry names the tag without the `_`.
pub fn encoded_key(key: &str) -> std::borrow::Cow<'static, str> {
    if key.starts_with("gen_ai_") {
        format!("{key}_").into()
    } else {
        key.to_string().into()
    }
}

/// Every label key used by any metric: each needs a `stats_tags` entry in `envoy.yaml`.
pub const LABEL_KEYS: [&str; 16] = [
    "model",
    "app",
    "operation",
    "status",
    "error_type",
    "token_type",
    "reason",
    "kind",
    "rule",
    "state",
    "to",
    "mode",
    OP,
    PROVIDER,
    REQUEST_MODEL,
    TOKEN_TYPE,
];

/// Builds the Envoy stat name of `metric` with label `values` (in [`Metric::label_keys`] order).
///
/// `values` must have one entry per key; extra values are ignored and missing ones are encoded as
/// `unknown`, so a caller bug shows up as a visible label rather than a broken name.
pub fn stat_name(prefix: &str, metric: Metric, values: &[&str]) -> String {
    let keys = metric.label_keys();
    let mut name = String::with_capacity(prefix.len() + 32 + keys.len() * 24);
    for (i, key) in keys.iter().enumerate() {
        name.push_str(key);
        if key.starts_with("gen_ai_") {
            name.push('_');
        }
        name.push_str("=.=");
        match values.get(i) {
            Some(v) if !v.is_empty() => {
                name.extend(v.bytes().map(|b| if is_label_byte(b) { b as char } else { '_' }));
            }
            _ => name.push_str(crate::meter::labels::UNKNOWN),
        }
        name.push_str(";.;");
    }
    if !metric.is_otel() {
        name.push_str(prefix);
        name.push('_');
    }
    name.push_str(metric.suffix());
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_labels_in_order() {
        assert_eq!(
            stat_name("llm", Metric::TokensTotal, &["gpt-4.1", "web", "input"]),
            "model=.=gpt-4.1;.;app=.=web;.;token_type=.=input;.;llm_tokens_total"
        );
        assert_eq!(stat_name("ai", Metric::ActiveRequests, &["m"]), "model=.=m;.;ai_active_requests");
    }

    #[test]
    fn otel_instruments_are_not_prefixed_and_their_keys_cannot_be_taken_for_others() {
        let n = stat_name("llm", Metric::GenAiClientTokenUsage, &["chat", "openai", "gpt-4o", "input"]);
        assert_eq!(
            n,
            "gen_ai_operation_name_=.=chat;.;gen_ai_provider_name_=.=openai;.;gen_ai_request_model_=.=gpt-4o;.;\
             gen_ai_token_type_=.=input;.;gen_ai_client_token_usage"
        );
        // No other key's `key=.=` occurs in it, so only the OpenTelemetry tag regexes match.
        for key in LABEL_KEYS.iter().filter(|k| !k.starts_with("gen_ai_")) {
            assert!(!n.contains(&format!("{key}=.=")), "{key}");
        }
    }

    #[test]
    fn hostile_values_cannot_break_the_name() {
        let n = stat_name("llm", Metric::CostMicrousdTotal, &["a;.;app=.=x", "\"\n"]);
        assert_eq!(n, "model=.=a_._app_._x;.;app=.=__;.;llm_cost_microusd_total");
        assert_eq!(
            stat_name("llm", Metric::CostMicrousdTotal, &["m"]),
            "model=.=m;.;app=.=unknown;.;llm_cost_microusd_total"
        );
    }

    #[test]
    fn every_label_key_is_listed() {
        for m in Metric::ALL {
            for k in m.label_keys() {
                assert!(LABEL_KEYS.contains(k), "{k} of {m:?} missing from LABEL_KEYS");
            }
        }
    }

    #[test]
    fn shipped_envoy_config_extracts_every_label_and_buckets_every_histogram() {
        let yaml = include_str!("../../envoy/envoy.yaml");
        for key in LABEL_KEYS {
            let encoded = encoded_key(key);
            let entry = format!("- tag_name: {key}\n    regex: '({encoded}=\\.=(.*?);\\.;)'");
            assert!(yaml.contains(&entry), "envoy.yaml lacks the stats_tags entry {entry}");
        }
        for m in Metric::ALL.into_iter().filter(|m| m.kind() == Kind::Histogram) {
            // The stat's name as Envoy sees it ends with the metric's (prefixed unless OpenTelemetry).
            let name = stat_name("llm", m, &[]);
            let first = yaml
                .lines()
                .filter_map(|l| l.trim().strip_prefix("- match: { suffix: \"")?.strip_suffix("\" }"))
                .find(|suffix| name.ends_with(suffix));
            assert!(first.is_some(), "envoy.yaml lacks histogram_bucket_settings for {}", m.suffix());
            // Envoy uses the first entry that matches: an OpenTelemetry instrument must not fall
            // into a default histogram's entry.
            let own = if m.is_otel() { m.suffix().to_string() } else { format!("_{}", m.suffix()) };
            assert_eq!(first, Some(own.as_str()), "{} is bucketed by another metric's entry", m.suffix());
        }
    }
}
