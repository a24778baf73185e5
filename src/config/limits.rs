//! The rate-limit part of the configuration: `limits`, `max_input_tokens`, `failure_mode`,
//! `max_limit_keys` and `token_estimate`.

use super::{err, ConfigError};
use serde::Deserialize;
use std::collections::HashSet;

/// Default for `max_limit_keys`.
pub const DEFAULT_MAX_LIMIT_KEYS: usize = 10_000;
/// Upper bound for `max_limit_keys` (each key is shared data Envoy never frees).
pub const MAX_MAX_LIMIT_KEYS: usize = 1_000_000;
/// Default for `token_estimate.bytes_per_token`.
pub const DEFAULT_BYTES_PER_TOKEN: u64 = 4;
/// Default for `token_estimate.max_output_tokens`.
pub const DEFAULT_MAX_OUTPUT_ESTIMATE: u64 = 4096;
/// Most rules a configuration may have (each is checked on every request).
pub const MAX_RULES: usize = 64;

/// Length of a fixed rate-limit window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// 1 s.
    Second,
    /// 60 s.
    Minute,
    /// 3600 s.
    Hour,
    /// A calendar day (00:00 to 00:00, UTC unless `window_offset_hours`).
    Day,
    /// A calendar week, Monday to Monday.
    Week,
    /// A calendar month, the 1st to the 1st (28 to 31 days).
    Month,
}

impl Window {
    /// Length in seconds (a month: its longest, 31 days).
    pub fn secs(self) -> u64 {
        match self {
            Window::Second => 1,
            Window::Minute => 60,
            Window::Hour => 3600,
            Window::Day => 86_400,
            Window::Week => 7 * 86_400,
            Window::Month => 31 * 86_400,
        }
    }

    /// True for the calendar windows (day, week, month), which `window_offset_hours` shifts.
    pub fn is_calendar(self) -> bool {
        matches!(self, Window::Day | Window::Week | Window::Month)
    }

    /// The window's name in messages (`per month`).
    pub fn name(self) -> &'static str {
        match self {
            Window::Second => "second",
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Week => "week",
            Window::Month => "month",
        }
    }
}

/// Which tokens a token limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    /// Input (prompt) tokens, cached included.
    Input,
    /// Output (completion) tokens, reasoning included.
    Output,
    /// Input + output.
    Total,
}

/// What a rule limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Admitted requests per window.
    Requests { per: Window, max: u64 },
    /// Tokens per window, reserved at request time and reconciled with the real usage.
    Tokens { per: Window, max: u64, token_type: TokenType },
    /// Cost per window, in pico-USD (from `pricing`), reserved and reconciled like tokens.
    Usd { per: Window, max_pico: u64 },
    /// Requests in flight at once.
    Concurrent { max: u64 },
}

/// Whose bucket a request is charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// One bucket for all requests.
    Global,
    /// One bucket per value of this (lower-cased) request header; the value is hashed.
    Header(String),
    /// One bucket per client IP (Envoy's `source.address`, without the port).
    Ip,
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique name: the `rule` label, the `error.code` of rejections, part of shared-data keys.
    pub name: String,
    /// Bucket key.
    pub key: KeySource,
    /// Only requests for these models (as named in the request) are checked; `None`: all.
    pub models: Option<HashSet<String>>,
    /// A separate bucket per model.
    pub per_model: bool,
    /// The limit.
    pub limit: Limit,
    /// `scope: global`: counted by a rate limit service shared by every Envoy replica instead
    /// of this Envoy's shared data.
    pub global: Option<GlobalService>,
    /// `window_offset_hours`: shifts a calendar window (day, week, month) from UTC.
    pub offset_hours: i8,
    /// `warn_at`: the fraction of the limit (0 < f < 1) whose crossing is counted, logged and
    /// announced in `x-ratelimit-warning`, in millionths.
    pub warn_at_ppm: Option<u32>,
    /// `mode: shadow`: would-be rejections are counted, and the request goes on.
    pub shadow: bool,
    /// `rl.<name>.<window tag>`: the rule's part of its shared-data keys, written once here
    /// rather than per request (see `crate::limit::enforce`).
    pub bucket_tag: String,
}

impl Rule {
    /// The rule's window (`None` for `max_concurrent`).
    pub fn period(&self) -> Option<crate::limit::calendar::Period> {
        let window = match self.limit {
            Limit::Requests { per, .. } | Limit::Tokens { per, .. } | Limit::Usd { per, .. } => per,
            Limit::Concurrent { .. } => return None,
        };
        Some(crate::limit::calendar::Period { window, offset_hours: self.offset_hours })
    }

    /// True when the rule's use is exported (`llm_ratelimit_used`, `llm_ratelimit_limit`): one
    /// bucket for everyone (keyed `global`, not per model), such as a team's monthly budget.
    pub fn exports_use(&self) -> bool {
        self.key == KeySource::Global && !self.per_model
    }

    /// A count of this rule's unit (requests, tokens, pico-USD) as `llm_ratelimit_used` and
    /// `llm_ratelimit_limit` show it: micro-USD for USD rules, else the count.
    pub fn gauge_value(&self, amount: u64) -> u64 {
        match self.limit {
            Limit::Usd { .. } => amount / 1_000_000,
            _ => amount,
        }
    }

    /// The limit in the rule's unit as it is enforced: a global USD budget counts whole cost
    /// units, so its limit is those units' worth.
    pub fn enforced_max(&self) -> u64 {
        match (self.limit, &self.global) {
            (Limit::Usd { .. }, Some(g)) => u64::from(g.max_hits).saturating_mul(g.cost_unit_pico),
            (Limit::Usd { max_pico, .. }, None) => max_pico,
            (Limit::Requests { max, .. } | Limit::Tokens { max, .. } | Limit::Concurrent { max }, _) => max,
        }
    }

    /// The count at which a bucket of this rule limited to `max` crosses `warn_at` (at least 1).
    pub fn warn_threshold(&self, max: u64) -> Option<u64> {
        let ppm = u128::from(self.warn_at_ppm?);
        let t = (u128::from(max) * ppm).div_ceil(1_000_000);
        Some(u64::try_from(t).unwrap_or(u64::MAX).max(1))
    }
}

/// Where a `scope: global` rule is counted: a service speaking Envoy's rate limit protocol
/// (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), such as envoyproxy/ratelimit
/// or Limitador, reached through an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalService {
    /// The Envoy cluster (HTTP/2) of the service.
    pub cluster: String,
    /// The rate limit domain the descriptors belong to.
    pub domain: String,
    /// How long a request waits for the service's answer.
    pub timeout_ms: u64,
    /// What a failed or late answer does to the request (default: the top-level `failure_mode`).
    pub failure_mode: FailureMode,
    /// For a `usd_per_*` rule: the pico-USD one hit stands for (`cost_unit_usd`, default
    /// 1/10,000 USD), and the limit in those units. 0 for other rules.
    pub cost_unit_pico: u64,
    /// The limit as the service counts it: requests, tokens, or cost units.
    pub max_hits: u32,
}

/// Default for `limits[].cost_unit_usd`: 1/10,000 USD.
pub const DEFAULT_COST_UNIT_USD: f64 = 0.0001;

/// Default for `limits[].service.timeout_ms`.
pub const DEFAULT_SERVICE_TIMEOUT_MS: u64 = 200;

/// What to do when the limiter itself fails (shared data unavailable, contention beyond the
/// retries, a key that cannot be determined).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Let the request through (counted).
    #[default]
    Allow,
    /// Reject it with a 503.
    Deny,
}

/// How a request's tokens are estimated before the response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEstimate {
    /// Input tokens = request body bytes / this (rounded up).
    pub bytes_per_token: u64,
    /// Cap on the output reservation taken from `max_tokens` / `max_completion_tokens`.
    pub max_output_tokens: u64,
}

/// Validated rate-limit settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Rules, checked in order; a request must fit all that apply.
    pub rules: Vec<Rule>,
    /// Requests whose estimated input exceeds this are rejected with 413.
    pub max_input_tokens: Option<u64>,
    /// Behaviour on limiter failures.
    pub failure_mode: FailureMode,
    /// Distinct keys tracked per rule; later keys share an overflow bucket.
    pub max_keys: usize,
    /// Token estimation.
    pub estimate: TokenEstimate,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            max_input_tokens: None,
            failure_mode: FailureMode::Allow,
            max_keys: DEFAULT_MAX_LIMIT_KEYS,
            estimate: TokenEstimate {
                bytes_per_token: DEFAULT_BYTES_PER_TOKEN,
                max_output_tokens: DEFAULT_MAX_OUTPUT_ESTIMATE,
            },
        }
    }
}

impl LimitsConfig {
    /// True when requests must be checked before they are forwarded.
    pub fn is_active(&self) -> bool {
        !self.rules.is_empty() || self.max_input_tokens.is_some()
    }

    /// True if some rule reserves a request's output tokens at admission (a local token rule
    /// that counts output, or a USD rule): a request without `max_tokens` then reserves its
    /// model's average output ([`crate::limit::estimate`]), which every completed response updates.
    pub fn reserves_output(&self) -> bool {
        self.rules.iter().any(|r| match r.limit {
            Limit::Tokens { token_type, .. } => r.global.is_none() && token_type != TokenType::Input,
            Limit::Usd { .. } => true,
            _ => false,
        })
    }

    /// True if any rule is counted by a rate limit service.
    pub fn has_global(&self) -> bool {
        self.rules.iter().any(|r| r.global.is_some())
    }

    /// The request headers a check reads: `content-length` (it sizes the estimate) and every
    /// header a rule keys on, each once.
    pub fn request_headers(&self) -> Vec<&str> {
        let mut names = vec!["content-length"];
        for rule in &self.rules {
            if let KeySource::Header(name) = &rule.key {
                if !names.contains(&name.as_str()) {
                    names.push(name);
                }
            }
        }
        names
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    name: String,
    key: String,
    models: Option<Vec<String>>,
    #[serde(default)]
    per_model: bool,
    requests_per_second: Option<u64>,
    requests_per_minute: Option<u64>,
    requests_per_hour: Option<u64>,
    tokens_per_minute: Option<u64>,
    tokens_per_hour: Option<u64>,
    tokens_per_day: Option<u64>,
    requests_per_day: Option<u64>,
    tokens_per_week: Option<u64>,
    tokens_per_month: Option<u64>,
    token_type: Option<TokenType>,
    usd_per_hour: Option<f64>,
    usd_per_day: Option<f64>,
    usd_per_week: Option<f64>,
    usd_per_month: Option<f64>,
    max_concurrent: Option<u64>,
    scope: Option<Scope>,
    service: Option<RawService>,
    window_offset_hours: Option<i64>,
    warn_at: Option<f64>,
    mode: Option<Mode>,
    cost_unit_usd: Option<f64>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Enforce,
    Shadow,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Scope {
    Local,
    Global,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    cluster: String,
    domain: String,
    timeout_ms: Option<u64>,
    failure_mode: Option<FailureMode>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEstimate {
    bytes_per_token: Option<u64>,
    max_output_tokens: Option<u64>,
}

/// The top-level fields this module validates.
pub(super) struct RawLimits {
    pub rules: Vec<RawRule>,
    pub max_input_tokens: Option<u64>,
    pub failure_mode: Option<FailureMode>,
    pub max_limit_keys: Option<u64>,
    pub token_estimate: Option<RawEstimate>,
}

pub(super) fn validate(raw: RawLimits) -> Result<LimitsConfig, ConfigError> {
    if raw.rules.len() > MAX_RULES {
        return Err(err("limits", format!("at most {MAX_RULES} rules")));
    }
    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(raw.rules.len());
    let failure_mode = raw.failure_mode.unwrap_or_default();
    for (i, r) in raw.rules.into_iter().enumerate() {
        let rule = validate_rule(i, r, failure_mode)?;
        if !names.insert(rule.name.clone()) {
            return Err(err(format!("limits[{i}].name"), format!("\"{}\" is used by another rule", rule.name)));
        }
        rules.push(rule);
    }
    let max_input_tokens = match raw.max_input_tokens {
        Some(0) => return Err(err("max_input_tokens", "must be at least 1")),
        v => v,
    };
    let max_keys = match raw.max_limit_keys {
        None => DEFAULT_MAX_LIMIT_KEYS,
        Some(v) if v >= 1 && v <= MAX_MAX_LIMIT_KEYS as u64 => v as usize,
        Some(_) => return Err(err("max_limit_keys", format!("must be between 1 and {MAX_MAX_LIMIT_KEYS}"))),
    };
    let e = raw.token_estimate.unwrap_or_default();
    let bytes_per_token = match e.bytes_per_token {
        None => DEFAULT_BYTES_PER_TOKEN,
        Some(v @ 1..=64) => v,
        Some(_) => return Err(err("token_estimate.bytes_per_token", "must be between 1 and 64")),
    };
    let max_output_tokens = match e.max_output_tokens {
        None => DEFAULT_MAX_OUTPUT_ESTIMATE,
        Some(v @ 0..=10_000_000) => v,
        Some(_) => return Err(err("token_estimate.max_output_tokens", "must be at most 10000000")),
    };
    Ok(LimitsConfig {
        rules,
        max_input_tokens,
        failure_mode,
        max_keys,
        estimate: TokenEstimate { bytes_per_token, max_output_tokens },
    })
}

/// A key source as configured: `global`, `ip` or `header:<name>` (`field` names it in errors).
pub(crate) fn parse_key(field: &str, key: &str) -> Result<KeySource, ConfigError> {
    Ok(match key {
        "global" => KeySource::Global,
        "ip" => KeySource::Ip,
        other => match other.strip_prefix("header:") {
            Some(h) => {
                let h = h.to_ascii_lowercase();
                let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                if h.is_empty() || h.len() > 256 || !h.bytes().all(token) {
                    return Err(err(field, "header:<name> needs a valid HTTP header name"));
                }
                KeySource::Header(h)
            }
            None => return Err(err(field, "must be \"global\", \"ip\" or \"header:<name>\"")),
        },
    })
}

fn validate_rule(i: usize, r: RawRule, failure_mode: FailureMode) -> Result<Rule, ConfigError> {
    let field = |name: &str| format!("limits[{i}].{name}");
    let valid_name = !r.name.is_empty()
        && r.name.len() <= 64
        && r.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid_name {
        return Err(err(field("name"), "must be 1 to 64 characters of [A-Za-z0-9_-]"));
    }
    let key = parse_key(&field("key"), &r.key)?;
    // Credential headers are fine as keys (unlike labels): values are hashed, never kept.
    let models = match r.models {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(err(field("models"), "must not be empty (omit it for all models)"))
        }
        Some(list) => {
            if let Some(j) = list.iter().position(|m| m.is_empty() || m.len() > 256) {
                return Err(err(format!("limits[{i}].models[{j}]"), "must be 1 to 256 characters"));
            }
            Some(list.into_iter().collect())
        }
    };

    let mut limits: Vec<(&str, Limit)> = Vec::new();
    let count = |v: Option<u64>,
                 name: &'static str,
                 make: &dyn Fn(u64) -> Limit|
     -> Result<Option<(&'static str, Limit)>, ConfigError> {
        match v {
            None => Ok(None),
            Some(0) => Err(err(field(name), "must be at least 1")),
            Some(n) => Ok(Some((name, make(n)))),
        }
    };
    let tt = r.token_type.unwrap_or(TokenType::Total);
    let candidates = [
        count(r.requests_per_second, "requests_per_second", &|max| Limit::Requests { per: Window::Second, max })?,
        count(r.requests_per_minute, "requests_per_minute", &|max| Limit::Requests { per: Window::Minute, max })?,
        count(r.requests_per_hour, "requests_per_hour", &|max| Limit::Requests { per: Window::Hour, max })?,
        count(r.requests_per_day, "requests_per_day", &|max| Limit::Requests { per: Window::Day, max })?,
        count(r.tokens_per_minute, "tokens_per_minute", &|max| Limit::Tokens {
            per: Window::Minute,
            max,
            token_type: tt,
        })?,
        count(r.tokens_per_hour, "tokens_per_hour", &|max| Limit::Tokens { per: Window::Hour, max, token_type: tt })?,
        count(r.tokens_per_day, "tokens_per_day", &|max| Limit::Tokens { per: Window::Day, max, token_type: tt })?,
        count(r.tokens_per_week, "tokens_per_week", &|max| Limit::Tokens { per: Window::Week, max, token_type: tt })?,
        count(r.tokens_per_month, "tokens_per_month", &|max| Limit::Tokens {
            per: Window::Month,
            max,
            token_type: tt,
        })?,
        usd(r.usd_per_hour, &field("usd_per_hour"), Window::Hour)?.map(|l| ("usd_per_hour", l)),
        usd(r.usd_per_day, &field("usd_per_day"), Window::Day)?.map(|l| ("usd_per_day", l)),
        usd(r.usd_per_week, &field("usd_per_week"), Window::Week)?.map(|l| ("usd_per_week", l)),
        usd(r.usd_per_month, &field("usd_per_month"), Window::Month)?.map(|l| ("usd_per_month", l)),
        count(r.max_concurrent, "max_concurrent", &|max| Limit::Concurrent { max })?,
    ];
    limits.extend(candidates.into_iter().flatten());
    let limit = match limits.as_slice() {
        [(_, limit)] => *limit,
        [] => {
            return Err(err(
                format!("limits[{i}]"),
                "needs one limit: requests_per_second|minute|hour|day, tokens_per_minute|hour|day|week|month, \
                 usd_per_hour|day|week|month or max_concurrent",
            ))
        }
        [(a, _), (b, _), ..] => {
            return Err(err(format!("limits[{i}]"), format!("has both {a} and {b}; one limit per rule")))
        }
    };
    if r.token_type.is_some() && !matches!(limit, Limit::Tokens { .. }) {
        return Err(err(field("token_type"), "only applies to tokens_per_* limits"));
    }
    let (window_name, calendar) = match limit {
        Limit::Requests { per, .. } | Limit::Tokens { per, .. } | Limit::Usd { per, .. } => {
            (limits.first().map_or("", |l| l.0), per.is_calendar())
        }
        Limit::Concurrent { .. } => ("max_concurrent", false),
    };
    let offset_hours = match r.window_offset_hours {
        None => 0,
        Some(_) if !calendar => {
            return Err(err(
                field("window_offset_hours"),
                format!("only applies to calendar windows (*_per_day, *_per_week, *_per_month), not {window_name}"),
            ))
        }
        Some(v @ -12..=14) => v as i8,
        Some(_) => return Err(err(field("window_offset_hours"), "must be between -12 and 14 (hours from UTC)")),
    };
    let warn_at_ppm = match r.warn_at {
        None => None,
        Some(_) if matches!(limit, Limit::Concurrent { .. }) => {
            return Err(err(field("warn_at"), "only applies to limits per window, not max_concurrent"))
        }
        Some(f) if f.is_finite() && f > 0.0 && f < 1.0 => Some(((f * 1e6).round() as u32).clamp(1, 999_999)),
        Some(_) => return Err(err(field("warn_at"), "must be a fraction of the limit between 0 and 1 (e.g. 0.8)")),
    };
    let shadow = r.mode == Some(Mode::Shadow);
    if r.cost_unit_usd.is_some() && !(matches!(limit, Limit::Usd { .. }) && r.scope == Some(Scope::Global)) {
        return Err(err(field("cost_unit_usd"), "only applies to usd_per_* rules with scope: global"));
    }
    let global = match (r.scope.unwrap_or(Scope::Local), r.service) {
        (Scope::Local, None) => None,
        (Scope::Local, Some(_)) => return Err(err(field("service"), "only applies to scope: global")),
        (Scope::Global, None) => {
            return Err(err(
                field("service"),
                "scope: global needs service: {cluster, domain} (the rate limit service)",
            ))
        }
        (Scope::Global, Some(service)) => {
            Some(validate_service(i, service, &limit, window_name, r.cost_unit_usd, failure_mode)?)
        }
    };
    let mut rule = Rule {
        name: r.name,
        key,
        models,
        per_model: r.per_model,
        limit,
        global,
        offset_hours,
        warn_at_ppm,
        shadow,
        bucket_tag: String::new(),
    };
    let window = rule.period().map_or_else(|| "0".to_string(), |p| p.tag());
    rule.bucket_tag = ["rl.", &rule.name, ".", &window].concat();
    Ok(rule)
}

/// A global rule's service, and the limits the protocol can carry: up to 2^32 - 1 hits per
/// window (`requests_per_unit` is a uint32): requests, tokens, or cost units for USD (one unit is
/// `cost_unit_usd`). Requests in flight need a release, which the protocol has not: they stay
/// local.
fn validate_service(
    i: usize,
    s: RawService,
    limit: &Limit,
    window_name: &str,
    cost_unit_usd: Option<f64>,
    failure_mode: FailureMode,
) -> Result<GlobalService, ConfigError> {
    let field = |name: &str| format!("limits[{i}].{name}");
    let (max_hits, cost_unit_pico) = match *limit {
        Limit::Requests { max, .. } | Limit::Tokens { max, .. } => match u32::try_from(max) {
            Ok(hits) => (hits, 0),
            Err(_) => {
                return Err(err(field(window_name), "a global limit is at most 4294967295 (the protocol's uint32)"))
            }
        },
        Limit::Usd { max_pico, .. } => {
            let unit = cost_unit_usd.unwrap_or(DEFAULT_COST_UNIT_USD);
            if !(unit.is_finite() && (1e-9..=1000.0).contains(&unit)) {
                return Err(err(field("cost_unit_usd"), "must be between 0.000000001 and 1000 (USD per cost unit)"));
            }
            let unit_pico = (unit * 1e12).round() as u64;
            let units = max_pico / unit_pico;
            match u32::try_from(units) {
                Ok(0) => {
                    return Err(err(
                        field(window_name),
                        format!("is less than one cost unit of {unit} USD (cost_unit_usd); lower cost_unit_usd"),
                    ))
                }
                Ok(hits) => (hits, unit_pico),
                Err(_) => {
                    return Err(err(
                        field(window_name),
                        format!(
                            "is {units} cost units of {unit} USD (cost_unit_usd), above the rate limit protocol's \
                             4294967295 (uint32): raise cost_unit_usd"
                        ),
                    ))
                }
            }
        }
        Limit::Concurrent { .. } => {
            return Err(err(
                field("scope"),
                "global rules count requests_per_*, tokens_per_* or usd_per_*; max_concurrent is local only",
            ))
        }
    };
    let name_ok = |v: &str, max: usize| !v.is_empty() && v.len() <= max && v.bytes().all(|b| b.is_ascii_graphic());
    // At most 120 bytes: the cluster travels in a small protobuf that must stay ASCII (see
    // `rls::encode_grpc_service`).
    if !name_ok(&s.cluster, 120) {
        return Err(err(field("service.cluster"), "must name an Envoy cluster (1 to 120 printable characters)"));
    }
    if !name_ok(&s.domain, 256) {
        return Err(err(field("service.domain"), "must be 1 to 256 printable characters"));
    }
    let timeout_ms = match s.timeout_ms {
        None => DEFAULT_SERVICE_TIMEOUT_MS,
        Some(v @ 1..=60_000) => v,
        Some(_) => return Err(err(field("service.timeout_ms"), "must be between 1 and 60000")),
    };
    Ok(GlobalService {
        cluster: s.cluster,
        domain: s.domain,
        timeout_ms,
        failure_mode: s.failure_mode.unwrap_or(failure_mode),
        cost_unit_pico,
        max_hits,
    })
}

fn usd(v: Option<f64>, field: &str, per: Window) -> Result<Option<Limit>, ConfigError> {
    match v {
        None => Ok(None),
        Some(usd) if usd.is_finite() && usd > 0.0 && usd <= 1e7 => {
            Ok(Some(Limit::Usd { per, max_pico: (usd * 1e12).round() as u64 }))
        }
        Some(_) => Err(err(field, "must be a USD amount above 0 and at most 10000000")),
    }
}
