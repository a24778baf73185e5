//! Applying the configured limits to one request: which rules apply, whose bucket each charges,
//! what a request is estimated to cost, the rejection response, the `x-ratelimit-*` headers, and
//! reconciliation with the real usage at the end.
//!
//! The bucket arithmetic is in [`crate::limit::limiter`]; this module turns a request into charges.

use crate::config::{Config, FailureMode, KeySource, Limit, Rule, TokenType};
use crate::limit::limiter::{Acquire, AdmittedKeys, BucketKind, Charge, Held, Limiter};
use crate::meter::labels::{sanitized, SharedStore};
use crate::meter::pricing::Price;
use crate::scan::usage::Usage;
use std::borrow::Cow;

/// What the filter knows about a request when it decides.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The request's model, if found.
    pub model: Option<&'a str>,
    /// Body size in bytes (content-length, or bytes seen).
    pub body_bytes: u64,
    /// `max_tokens` / `max_completion_tokens` / `max_output_tokens`.
    pub max_output: Option<u64>,
    /// The model's recent average output tokens (see [`crate::limit::estimate`]), looked up
    /// when the request does not say `max_output` and a rule reserves output.
    pub output_average: Option<u64>,
}

/// The parts of the host the limits need besides shared data.
pub trait LimitHost: SharedStore {
    /// A request header value.
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// The client's address (Envoy's `source.address`, `ip:port`).
    fn client_address(&self) -> Option<Vec<u8>>;
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// The bucket id of a key's value: the first 16 bytes of its SHA-256, hex. The glue
    /// remembers them per worker ([`crate::record::KeyHashes`]).
    fn bucket_id(&self, value: &[u8]) -> String {
        hash_hex(value)
    }
}

/// A local reply rejecting the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status (429, 413 or 503).
    pub status: u16,
    /// The `rule` label: a rule name, `max_input_tokens` or `failure_mode`.
    pub rule: String,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// OpenAI-style JSON error body.
    pub body: String,
}

/// What happened besides the verdict, for the filter's counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Notes {
    /// Rules whose key went to the overflow bucket.
    pub overflowed: Vec<String>,
    /// The limiter failed (store failure, undeterminable key) this many times.
    pub failures: u32,
    /// Rules in `mode: shadow` that would have rejected the request.
    pub shadow_rejected: Vec<String>,
    /// Buckets that crossed their rule's `warn_at`: (rule index, bucket id, used, limit).
    pub crossed: Vec<Crossing>,
    /// Rules keyed `global`, what their bucket has used now (`llm_ratelimit_used`, in the
    /// rule's unit) and when its window ends (ms).
    pub used: Vec<(usize, u64, u64)>,
}

/// A bucket that crossed its rule's `warn_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// Index of the rule.
    pub rule: usize,
    /// The bucket's key id (`global`, or a hash: never a raw key).
    pub key: String,
    /// Used in the window.
    pub used: u64,
    /// The limit.
    pub max: u64,
}

/// An admitted request's charges, released at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservation {
    held: Vec<Held>,
    /// Token type of each held token bucket (`None` for other kinds), parallel to `held`.
    meters: Vec<Meter>,
    /// The `x-ratelimit-*` family of each enforced rule that has one.
    pub shown: Vec<Shown>,
    /// The enforced rules whose bucket is at or above its `warn_at`.
    pub warned: Vec<String>,
}

impl Reservation {
    /// The response headers of the local rules alone (see [`response_headers`]).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let warned: Vec<&str> = self.warned.iter().map(String::as_str).collect();
        response_headers(&self.shown.iter().collect::<Vec<_>>(), &warned)
    }
}

/// One rule's `x-ratelimit-{limit,remaining,reset}-<family>`, with its remaining and limit (in
/// the rule's unit) to find the rule of a family with the smallest share left. The header text
/// is written only for the rule that is shown ([`Shown::headers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    /// `requests`, `tokens` or `usd`.
    pub family: &'static str,
    pub remaining: u64,
    pub max: u64,
    reset_ms: u64,
}

impl Shown {
    /// `rule`'s family headers (`None` for `max_concurrent`); `max` and `remaining` in the rule's
    /// unit (pico-USD for USD rules, shown in USD).
    pub fn of(rule: &Rule, max: u64, remaining: u64, reset_ms: u64) -> Option<Shown> {
        Some(Shown { family: family(&rule.limit)?, remaining, max, reset_ms })
    }

    /// The three headers.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        let amount = |v: u64| if self.family == "usd" { usd(v) } else { v.to_string() };
        let [limit, remaining, reset] = match self.family {
            "tokens" => ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
            "usd" => ["x-ratelimit-limit-usd", "x-ratelimit-remaining-usd", "x-ratelimit-reset-usd"],
            _ => ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
        };
        [(limit, amount(self.max)), (remaining, amount(self.remaining)), (reset, duration(self.reset_ms))]
    }

    /// True when `self` has a smaller share of its limit left than `other` (remaining/max,
    /// compared without floats).
    fn tighter_than(&self, other: &Shown) -> bool {
        u128::from(self.remaining) * u128::from(other.max) < u128::from(other.remaining) * u128::from(self.max)
    }
}

/// The `x-ratelimit-*` headers of an admitted request: per family, the rule (local or global)
/// with the smallest share left; and `x-ratelimit-warning` naming every rule at or above its
/// `warn_at`.
pub fn response_headers(shown: &[&Shown], warned: &[&str]) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(3 * shown.len().min(3) + 1);
    for f in ["requests", "tokens", "usd"] {
        let mut tightest: Option<&Shown> = None;
        for s in shown.iter().copied().filter(|s| s.family == f) {
            if tightest.is_none_or(|t| s.tighter_than(t)) {
                tightest = Some(s);
            }
        }
        if let Some(s) = tightest {
            out.extend(s.headers());
        }
    }
    if !warned.is_empty() {
        out.push(("x-ratelimit-warning", warned.join(", ")));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meter {
    None,
    Tokens(TokenType),
    Usd,
}

/// Outcome of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the request; release the reservation when it ends.
    Admit(Reservation),
    /// Send this reply instead.
    Reject(Rejection),
}

/// Estimated input tokens of a request body, at most [`crate::scan::usage::MAX_TOKENS`] (a client's
/// `content-length` can claim anything; the bound keeps an estimate's cost exact, and is far
/// above any limit a rule can be configured to admit in one request).
pub fn estimate_input(config: &Config, body_bytes: u64) -> u64 {
    body_bytes.div_ceil(config.limits.estimate.bytes_per_token.max(1)).min(crate::scan::usage::MAX_TOKENS)
}

/// Checks a request against `max_input_tokens` and every rule that applies, charging the rules'
/// buckets if it fits.
/// `admitted`: this worker's memory of admitted buckets (see [`AdmittedKeys`]).
pub fn check<H: LimitHost>(
    host: &H,
    config: &Config,
    facts: RequestFacts<'_>,
    admitted: &mut AdmittedKeys,
) -> (Verdict, Notes) {
    let mut notes = Notes::default();
    let limits = &config.limits;
    let input = estimate_input(config, facts.body_bytes);
    if let Some(max) = limits.max_input_tokens {
        if input > max {
            let message = format!(
                "This request is estimated at {input} input tokens, above this gateway's limit of {max} \
                 (max_input_tokens). Shorten the messages."
            );
            let rejection = Rejection {
                status: 413,
                rule: "max_input_tokens".into(),
                headers: vec![json_header()],
                body: error_body(&message, "invalid_request_error", Some("messages"), "max_input_tokens"),
            };
            return (Verdict::Reject(rejection), notes);
        }
    }
    let estimate = usage_estimate(config, &facts);
    let output_estimated = facts.max_output.is_none();

    let mut charges = Vec::new();
    let mut meters = Vec::new();
    let mut shadow = Vec::new();
    // Rules usually share a key (rpm and tpm per API key): read and hash it once.
    let mut key_ids = KeyIds::default();
    for (i, rule) in limits.rules.iter().enumerate() {
        if rule.global.is_some() {
            // Counted by the rate limit service (see `crate::limit::global`).
            continue;
        }
        if !applies(rule, facts.model) {
            continue;
        }
        let period = |per| crate::limit::calendar::Period { window: per, offset_hours: rule.offset_hours };
        // An estimated output never makes a request too large for an empty window on its own:
        // it is cut to the limit (the first request of a cold start takes the whole window).
        let fit = |amount: u64, max: u64| if output_estimated { amount.min(max) } else { amount };
        let (kind, max, amount, meter) = match rule.limit {
            Limit::Requests { per, max } => (BucketKind::Requests { period: period(per) }, max, 1, Meter::None),
            Limit::Tokens { per, max, token_type } => (
                BucketKind::Metered { period: period(per) },
                max,
                fit(tokens_of(&estimate, token_type), max),
                Meter::Tokens(token_type),
            ),
            Limit::Usd { per, max_pico } => {
                // Only the request's model is known yet: an unpriced one reserves nothing, and
                // is charged at the end at the price the response's model resolves to, if any
                // (see `release`).
                let cost = estimated_cost(config, facts.model, &estimate);
                (BucketKind::Metered { period: period(per) }, max_pico, fit(cost, max_pico), Meter::Usd)
            }
            Limit::Concurrent { max } => (BucketKind::Concurrent, max, 1, Meter::None),
        };
        let Some(id) = key_ids.get(host, &rule.key) else {
            notes.failures += 1;
            return (on_failure(config, &rule.name), notes);
        };
        let key = if id == "global" && !rule.per_model {
            global_bucket(&rule_base(config, rule))
        } else {
            let model =
                rule.per_model.then(|| facts.model.map_or(Cow::Borrowed("unknown"), |m| sanitized(m.as_bytes())));
            let mut bucket = String::with_capacity(64 + config.metrics.prefix.len() + rule.bucket_tag.len());
            for part in ["llm_meter.", &config.metrics.prefix, ".", &rule.bucket_tag, ".", id] {
                bucket.push_str(part);
            }
            if let Some(model) = model {
                bucket.push('.');
                bucket.push_str(&model);
            }
            // The key count is read only for a key this worker has not seen admitted.
            let count_key = || key_count(&rule_base(config, rule));
            match Limiter::admit(host, admitted, count_key, &bucket, limits.max_keys as u64) {
                Ok(true) => bucket,
                Ok(false) => {
                    notes.overflowed.push(rule.name.clone());
                    overflow_bucket(&rule_base(config, rule))
                }
                Err(_) => {
                    notes.failures += 1;
                    return (on_failure(config, &rule.name), notes);
                }
            }
        };
        let charge = Charge { rule: i, key, kind, max, amount, warn: rule.warn_threshold(max) };
        if rule.shadow {
            shadow.push((charge, meter));
        } else {
            charges.push(charge);
            meters.push(meter);
        }
    }

    let now = host.now_ms();
    match Limiter::acquire(host, now, charges) {
        Acquire::Admitted(mut held) => {
            // Shadow rules, each on its own: a would-be rejection is noted, nothing is held.
            for (charge, meter) in shadow {
                let rule = charge.rule;
                match Limiter::acquire(host, now, vec![charge]) {
                    Acquire::Admitted(h) => {
                        held.extend(h);
                        meters.push(meter);
                    }
                    Acquire::Rejected { .. } => {
                        notes.shadow_rejected.push(limits.rules.get(rule).map_or_else(String::new, |r| r.name.clone()))
                    }
                    Acquire::Failed { .. } => notes.failures += 1,
                }
            }
            observe(config, &held, now, &mut notes);
            let (shown, warned) = admitted_headers(config, &held);
            (Verdict::Admit(Reservation { held, meters, shown, warned }), notes)
        }
        Acquire::Rejected { charge, remaining, reset_ms } => match limits.rules.get(charge.rule) {
            Some(rule) => {
                // Before a model's first response, a request without max_tokens reserves the
                // cap: a guess that lasts until that response completes, not until the window
                // ends. A request it alone turned away may come back in a second.
                let cold = output_estimated && facts.output_average.is_none();
                let guess = cold && matches!(rule.limit, Limit::Tokens { .. } | Limit::Usd { .. });
                (Verdict::Reject(rejection(rule, &charge, remaining, reset_ms, guess)), notes)
            }
            None => (Verdict::Admit(Reservation::default()), notes),
        },
        Acquire::Failed { rule } => {
            notes.failures += 1;
            let name = limits.rules.get(rule).map_or("?", |r| r.name.as_str());
            (on_failure(config, name), notes)
        }
    }
}

/// The estimated cost of a request in pico-USD at the request model's price (0 when unpriced).
pub(crate) fn estimated_cost(config: &Config, model: Option<&str>, estimate: &Usage) -> u64 {
    config.pricing.resolve(model, None).and_then(|p| p.cost_pico(estimate)).unwrap_or(0)
}

/// The request's usage estimate as [`check`] reserves it: input from the body size; output what
/// the request says (`max_output`), else the model's recent average, else (no response seen
/// yet: a cold start) the cap, so a burst of unknown size cannot be admitted; never above the
/// cap (`token_estimate.max_output_tokens`).
pub fn usage_estimate(config: &Config, facts: &RequestFacts<'_>) -> Usage {
    let cap = config.limits.estimate.max_output_tokens;
    let output = facts.max_output.or(facts.output_average).unwrap_or(cap).min(cap);
    Usage { input: estimate_input(config, facts.body_bytes), output, ..Usage::default() }
}

/// Notes what the held charges show at `now`: `warn_at` crossings and the use of rules keyed
/// `global`.
fn observe(config: &Config, held: &[Held], now: u64, notes: &mut Notes) {
    for h in held {
        if h.crossed {
            notes.crossed.push(Crossing {
                rule: h.charge.rule,
                key: bucket_id(&h.charge.key),
                used: h.used,
                max: h.charge.max,
            });
        }
        if config.limits.rules.get(h.charge.rule).is_some_and(Rule::exports_use) {
            notes.used.push((h.charge.rule, h.used, now.saturating_add(h.reset_ms)));
        }
    }
}

/// The key id at the end of a bucket's shared-data key (a hash, `global`, `absent` or the
/// overflow bucket): what a log may name.
fn bucket_id(key: &str) -> String {
    let tail = key.rsplit(['.', '#']).next().unwrap_or_default();
    tail.chars().take(16).collect()
}

/// What the bucket of rule `rule` (keyed `global`) has used in the window at `now_ms`, in the
/// rule's unit: a local bucket is read (one shared-data read; a window that starts with debt
/// shows it), a rate limit service's counter starts anew (0).
pub fn global_use<S: SharedStore + ?Sized>(store: &S, config: &Config, rule: usize, now_ms: u64) -> Option<u64> {
    let r = config.limits.rules.get(rule)?;
    if r.global.is_some() {
        return Some(0);
    }
    let period = r.period()?;
    let (max, kind) = match r.limit {
        Limit::Requests { max, .. } => (max, BucketKind::Requests { period }),
        Limit::Tokens { max, .. } => (max, BucketKind::Metered { period }),
        Limit::Usd { max_pico, .. } => (max_pico, BucketKind::Metered { period }),
        Limit::Concurrent { .. } => return None,
    };
    Limiter::used(store, &global_bucket(&rule_base(config, r)), now_ms, kind, max)
}

/// The shared-data key prefix of a rule's buckets.
fn rule_base(config: &Config, rule: &Rule) -> String {
    ["llm_meter.", &config.metrics.prefix, ".", &rule.bucket_tag].concat()
}

/// The bucket of a rule keyed `global` (without `per_model`).
fn global_bucket(base: &str) -> String {
    [base, ".global"].concat()
}

/// The count of keys a keyed rule admitted.
fn key_count(base: &str) -> String {
    [base, "#keys"].concat()
}

/// The bucket keys beyond `max_limit_keys` share.
fn overflow_bucket(base: &str) -> String {
    [base, "#overflow"].concat()
}

/// Creates the shared-data keys every worker updates from the first request on: a global rule's
/// bucket, a keyed rule's key count and overflow bucket. Run at configuration time, before
/// traffic: proxy-wasm cannot express "create if absent", so two workers creating a key at
/// the same moment would both succeed and one's count would be lost (a keyed rule would then
/// admit one key too many). Once a key exists, every update is a compare-and-swap. Returns the
/// number of store failures.
pub fn create_buckets<S: SharedStore + ?Sized>(store: &S, config: &Config) -> u32 {
    let mut failures = 0;
    for rule in config.limits.rules.iter().filter(|r| r.global.is_none()) {
        let base = rule_base(config, rule);
        let keys = match (&rule.key, rule.per_model) {
            (KeySource::Global, false) => vec![global_bucket(&base)],
            _ => vec![key_count(&base), overflow_bucket(&base)],
        };
        for key in keys {
            if Limiter::create(store, &key).is_err() {
                failures += 1;
            }
        }
    }
    failures
}

/// What [`release`] did besides releasing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Released {
    /// Store failures.
    pub failures: u32,
    /// A USD budget held the request and no price applies to it (`unpriced` skip).
    pub unpriced: bool,
    /// Buckets the real usage took across their `warn_at`.
    pub crossed: Vec<Crossing>,
    /// Rules keyed `global` whose bucket changed, their use now and when the window ends (as
    /// [`Notes::used`]).
    pub used: Vec<(usize, u64, u64)>,
}

/// Releases a reservation when the exchange ends. `price`: the exchange's price as
/// [`crate::meter::pricing::Pricing::resolve`] finds it (the same the cost metric uses); `usage`: the
/// real usage, if any was reported; `failed`: the request did not complete (error status,
/// reset, client gone), so an unreported usage is taken as none.
pub fn release<H: LimitHost>(
    host: &H,
    config: &Config,
    price: Option<&Price>,
    r: &Reservation,
    usage: Option<&Usage>,
    failed: bool,
) -> Released {
    if r.held.is_empty() {
        // Nothing to settle (global rules only): no clock read.
        return Released::default();
    }
    let now = host.now_ms();
    let mut out = Released::default();
    for (held, meter) in r.held.iter().zip(&r.meters) {
        out.unpriced |= *meter == Meter::Usd && price.is_none();
        let actual = match (meter, usage) {
            (Meter::None, _) => None,
            (Meter::Tokens(t), Some(u)) => Some(tokens_of(u, *t)),
            // Exact for every accepted usage (see `Price::cost_pico`); otherwise the
            // reservation stands.
            (Meter::Usd, Some(u)) => price.map_or(Some(0), |p| p.cost_pico(u)),
            (_, None) if failed => Some(0),
            (_, None) => None,
        };
        match Limiter::release(host, now, held, actual) {
            Ok(settled) => {
                if settled.crossed {
                    out.crossed.push(Crossing {
                        rule: held.charge.rule,
                        key: bucket_id(&held.charge.key),
                        used: settled.used.unwrap_or(held.used),
                        max: held.charge.max,
                    });
                }
                let exported = config.limits.rules.get(held.charge.rule).filter(|r| r.exports_use());
                if let (Some(used), Some(rule)) = (settled.used, exported) {
                    let end = rule.period().map_or(0, |p| p.at(now).end_ms);
                    out.used.push((held.charge.rule, used, end));
                }
            }
            Err(_) => out.failures += 1,
        }
    }
    out
}

/// Gives every local charge of an admitted request back (requests, tokens, USD, concurrency),
/// as if the local rules had not admitted it: a rate limit service rejected it after them, so
/// it never reached the upstream. Returns the number of store failures.
pub fn give_back<H: LimitHost>(host: &H, r: &Reservation) -> u32 {
    if r.held.is_empty() {
        return 0;
    }
    let now = host.now_ms();
    let failures = r.held.iter().filter(|held| Limiter::undo(host, now, held).is_err()).count();
    u32::try_from(failures).unwrap_or(u32::MAX)
}

pub(crate) fn tokens_of(u: &Usage, t: TokenType) -> u64 {
    match t {
        TokenType::Input => u.input,
        TokenType::Output => u.output,
        TokenType::Total => u.input.saturating_add(u.output),
    }
}

/// True if `rule` applies to a request for `model` (its `models` filter, if any).
pub(crate) fn applies(rule: &Rule, model: Option<&str>) -> bool {
    rule.models.as_ref().is_none_or(|models| model.is_some_and(|m| models.contains(m)))
}

/// Key ids of one request: rules usually share a key (rpm and tpm per API key), so each key is
/// read and hashed once.
#[derive(Default)]
pub(crate) struct KeyIds<'a>(Vec<(&'a KeySource, Option<String>)>);

impl<'a> KeyIds<'a> {
    /// The id of `key` for this request (see [`key_id`]).
    pub(crate) fn get<H: LimitHost>(&mut self, host: &H, key: &'a KeySource) -> Option<&str> {
        let i = match self.0.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.0.push((key, key_id(host, key)));
                self.0.len() - 1
            }
        };
        self.0.get(i).and_then(|(_, id)| id.as_deref())
    }
}

/// The bucket id of a key: `global`, or a hash of the header value / client IP (never the raw
/// value: API keys must not reach shared data, stats or logs). An absent header is its own
/// bucket (`absent`). `None`: the key cannot be determined (no client address).
fn key_id<H: LimitHost>(host: &H, key: &KeySource) -> Option<String> {
    match key {
        KeySource::Global => Some("global".into()),
        KeySource::Header(name) => match host.request_header(name).filter(|v| !v.is_empty()) {
            Some(value) => Some(host.bucket_id(&value)),
            None => Some("absent".into()),
        },
        KeySource::Ip => {
            let addr = host.client_address()?;
            let ip = client_ip(&addr)?;
            Some(host.bucket_id(ip.to_string().as_bytes()))
        }
    }
}

/// The IP of `ip:port`, `[v6]:port` or a bare address; `None` when the peer has no IP (a Unix
/// socket listener reports a path).
pub(crate) fn client_ip(addr: &[u8]) -> Option<std::net::IpAddr> {
    let addr = std::str::from_utf8(addr).ok()?;
    if let Ok(sock) = addr.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    addr.parse().ok()
}

/// First 16 bytes of SHA-256, hex.
fn hash_hex(value: &[u8]) -> String {
    crate::record::sha256_hex(value, crate::record::BUCKET_ID_BYTES)
}

fn on_failure(config: &Config, rule: &str) -> Verdict {
    match config.limits.failure_mode {
        FailureMode::Allow => Verdict::Admit(Reservation::default()),
        FailureMode::Deny => Verdict::Reject(unavailable(rule)),
    }
}

/// The 503 of `failure_mode: deny` when `rule` could not be checked.
pub(crate) fn unavailable(rule: &str) -> Rejection {
    Rejection {
        status: 503,
        rule: "failure_mode".into(),
        headers: vec![json_header(), ("retry-after".into(), "1".into())],
        body: error_body(
            &format!("The gateway's rate limiter could not check rule '{rule}'; try again shortly."),
            "server_error",
            None,
            "rate_limiter_unavailable",
        ),
    }
}

fn json_header() -> (String, String) {
    ("content-type".into(), "application/json".into())
}

fn error_body(message: &str, kind: &str, param: Option<&str>, code: &str) -> String {
    serde_json::json!({"error": {"message": message, "type": kind, "param": param, "code": code}}).to_string()
}

/// Which `x-ratelimit-*` family a limit reports in.
fn family(limit: &Limit) -> Option<&'static str> {
    match limit {
        Limit::Requests { .. } => Some("requests"),
        Limit::Tokens { .. } => Some("tokens"),
        Limit::Usd { .. } => Some("usd"),
        Limit::Concurrent { .. } => None,
    }
}

/// A count of `limit`'s unit as a header or message shows it: USD (from pico-USD) as a decimal
/// amount, to the micro-USD (`4.9991`), anything else as the integer.
pub(crate) fn amount(limit: &Limit, v: u64) -> String {
    match limit {
        Limit::Usd { .. } => usd(v),
        _ => v.to_string(),
    }
}

/// Pico-USD as a decimal USD amount, rounded down to the micro-USD: `5`, `0.0012`.
fn usd(pico: u64) -> String {
    let micro = pico / 1_000_000;
    let (whole, frac) = (micro / 1_000_000, micro % 1_000_000);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:06}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

fn describe(limit: &Limit) -> String {
    match limit {
        Limit::Requests { per, max } => format!("{max} requests per {}", per.name()),
        Limit::Tokens { per, max, .. } => format!("{max} tokens per {}", per.name()),
        Limit::Usd { per, max_pico } => format!("{} USD per {}", usd(*max_pico), per.name()),
        Limit::Concurrent { max } => format!("{max} concurrent requests"),
    }
}

/// The 429 of a local rule. `guess`: the request's output was the cold-start guess (the cap,
/// before the model's first response): `Retry-After: 1`, as the guess lasts only until a response
/// of the model completes.
fn rejection(rule: &Rule, charge: &Charge, remaining: u64, reset_ms: u64, guess: bool) -> Rejection {
    let retry_after = if charge.kind == BucketKind::Concurrent || guess { 1 } else { reset_ms.div_ceil(1000).max(1) };
    let n = |v| amount(&rule.limit, v);
    let what = if matches!(rule.limit, Limit::Concurrent { .. }) {
        format!("{} are in flight", charge.max)
    } else if guess {
        format!(
            "{} left in this window, and this model's output size is not known yet (no response since the \
             gateway started), so the request reserves the most it may use",
            n(remaining)
        )
    } else if charge.amount > charge.max {
        format!("this request alone needs {} of {}", n(charge.amount), n(charge.max))
    } else {
        format!("{} left in this window, this request needs {}", n(remaining), n(charge.amount))
    };
    too_many(rule, charge.max, remaining, reset_ms, retry_after, &what)
}

/// The 429 of a rule (local or global): `Retry-After`, the rule family's `x-ratelimit-*` and an
/// OpenAI-style error whose message says `what` happened.
pub(crate) fn too_many(
    rule: &Rule,
    max: u64,
    remaining: u64,
    reset_ms: u64,
    retry_after: u64,
    what: &str,
) -> Rejection {
    let mut headers = vec![json_header(), ("retry-after".into(), retry_after.to_string())];
    if let Some(shown) = Shown::of(rule, max, remaining, reset_ms) {
        headers.extend(shown.headers().map(|(name, value)| (name.to_string(), value)));
    }
    let message =
        format!("Rate limit '{}' reached ({}): {what}. Retry after {retry_after} s.", rule.name, describe(&rule.limit));
    Rejection {
        status: 429,
        rule: rule.name.clone(),
        headers,
        body: error_body(&message, "rate_limit_error", None, &rule.name),
    }
}

/// What an admitted request's held charges show a client: the `x-ratelimit-*` family of each
/// enforced rule that has one, and the enforced rules at or above their `warn_at` (shadow rules
/// change nothing a client sees).
fn admitted_headers(config: &Config, held: &[Held]) -> (Vec<Shown>, Vec<String>) {
    let enforced =
        || held.iter().filter_map(|h| Some((h, config.limits.rules.get(h.charge.rule).filter(|r| !r.shadow)?)));
    let shown = enforced().filter_map(|(h, r)| Shown::of(r, h.charge.max, h.remaining, h.reset_ms)).collect();
    let warned =
        enforced().filter(|(h, _)| h.charge.warn.is_some_and(|t| h.used >= t)).map(|(_, r)| r.name.clone()).collect();
    (shown, warned)
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `59s`, `6m0s`, `1h0m0s`.
pub fn duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms.div_ceil(1000);
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, m, sec) => format!("{h}h{m}m{sec}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::labels::tests::FakeStore;
    use crate::meter::labels::StoreError;
    use std::collections::HashMap;

    #[test]
    fn a_records_key_hash_is_the_start_of_the_limiters_bucket_id() {
        // docs/records.md promises it: a record's key_hash finds the key's buckets and warnings.
        for key in [&b"Bearer sk-1"[..], b"10.0.0.1", b""] {
            assert!(hash_hex(key).starts_with(&crate::record::key_hash(key)));
        }
    }

    /// An exchange that holds nothing (a global rule only) settles without the clock: Envoy's
    /// clock is a hostcall.
    #[test]
    fn nothing_held_reads_no_clock() {
        struct NoClock(FakeStore);
        impl SharedStore for NoClock {
            fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
                self.0.get(key)
            }
            fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
                self.0.set(key, value, cas)
            }
        }
        impl LimitHost for NoClock {
            fn request_header(&self, _: &str) -> Option<Vec<u8>> {
                None
            }
            fn client_address(&self) -> Option<Vec<u8>> {
                None
            }
            fn now_ms(&self) -> u64 {
                panic!("the clock was read")
            }
        }
        let host = NoClock(FakeStore::default());
        let c = config("{}");
        let none = Reservation::default();
        let usage = Usage { input: 1, output: 2, ..Usage::default() };
        assert_eq!(release(&host, &c, None, &none, Some(&usage), false), Released::default());
        assert_eq!(give_back(&host, &none), 0);
    }

    #[derive(Default)]
    struct H {
        store: FakeStore,
        headers: HashMap<String, Vec<u8>>,
        addr: Option<Vec<u8>>,
        now: u64,
    }

    impl SharedStore for H {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.store.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.store.set(key, value, cas)
        }
    }

    impl LimitHost for H {
        fn request_header(&self, name: &str) -> Option<Vec<u8>> {
            self.headers.get(name).cloned()
        }
        fn client_address(&self) -> Option<Vec<u8>> {
            self.addr.clone()
        }
        fn now_ms(&self) -> u64 {
            self.now
        }
    }

    fn config(json: &str) -> Config {
        Config::parse(json.as_bytes()).unwrap()
    }

    /// A check by a worker that remembers no admitted bucket.
    fn check<H: LimitHost>(h: &H, c: &Config, f: RequestFacts<'_>) -> (Verdict, Notes) {
        super::check(h, c, f, &mut AdmittedKeys::default())
    }

    fn facts(model: &str, body_bytes: u64, max_output: Option<u64>) -> RequestFacts<'_> {
        RequestFacts { model: Some(model), body_bytes, max_output, output_average: None }
    }

    fn admit(v: (Verdict, Notes)) -> Reservation {
        match v.0 {
            Verdict::Admit(r) => r,
            Verdict::Reject(r) => panic!("rejected: {r:?}"),
        }
    }

    fn reject(v: (Verdict, Notes)) -> Rejection {
        match v.0 {
            Verdict::Reject(r) => r,
            Verdict::Admit(r) => panic!("admitted: {r:?}"),
        }
    }

    fn header<'a, N: AsRef<str>>(headers: &'a [(N, String)], name: &str) -> Option<&'a str> {
        headers.iter().find(|(k, _)| k.as_ref() == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn requests_per_key_with_headers_and_a_precise_retry_after() {
        let c = config(r#"{"limits":[{"name":"per-key","key":"header:authorization","requests_per_minute":2}]}"#);
        let mut h = H { now: 60_000 * 100 + 12_500, ..H::default() };
        h.headers.insert("authorization".into(), b"Bearer sk-secret-1".to_vec());
        let r = admit(check(&h, &c, facts("m", 100, None)));
        assert_eq!(header(&r.headers(), "x-ratelimit-remaining-requests"), Some("1"));
        assert_eq!(header(&r.headers(), "x-ratelimit-limit-requests"), Some("2"));
        assert_eq!(header(&r.headers(), "x-ratelimit-reset-requests"), Some("48s"));
        admit(check(&h, &c, facts("m", 100, None)));
        let rej = reject(check(&h, &c, facts("m", 100, None)));
        assert_eq!((rej.status, rej.rule.as_str()), (429, "per-key"));
        assert_eq!(header(&rej.headers, "retry-after"), Some("48"));
        assert_eq!(header(&rej.headers, "x-ratelimit-remaining-requests"), Some("0"));
        let body: serde_json::Value = serde_json::from_str(&rej.body).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "per-key");
        // Another key has its own bucket; the raw key is nowhere in shared data.
        h.headers.insert("authorization".into(), b"Bearer sk-secret-2".to_vec());
        admit(check(&h, &c, facts("m", 100, None)));
        for key in h.store.data.borrow().keys() {
            assert!(!key.contains("secret"), "{key}");
        }
        // Without the header: the `absent` bucket.
        h.headers.clear();
        admit(check(&h, &c, facts("m", 100, None)));
        assert!(h.store.data.borrow().keys().any(|k| k.ends_with(".absent")));
    }

    #[test]
    fn tokens_are_estimated_reserved_and_reconciled() {
        let c = config(
            r#"{"limits":[{"name":"tpm","key":"global","tokens_per_minute":1000}],
                "token_estimate":{"bytes_per_token":4,"max_output_tokens":500}}"#,
        );
        let h = H::default();
        // 400 bytes -> 100 input tokens; max_tokens 2000 capped at 500.
        let r = admit(check(&h, &c, facts("m", 400, Some(2000))));
        assert_eq!(header(&r.headers(), "x-ratelimit-remaining-tokens"), Some("400"));
        // 600 reserved: a second identical request does not fit.
        let rej = reject(check(&h, &c, facts("m", 400, Some(2000))));
        assert_eq!(header(&rej.headers, "x-ratelimit-remaining-tokens"), Some("400"));
        // Real usage 150: 450 given back (the rule keyed `global` shows its use).
        let used = Usage { input: 100, output: 50, ..Usage::default() };
        let released = release(&h, &c, c.pricing.get("m"), &r, Some(&used), false);
        assert_eq!(released, Released { used: vec![(0, 150, 60_000)], ..Released::default() });
        let r2 = admit(check(&h, &c, facts("m", 400, Some(2000))));
        assert_eq!(header(&r2.headers(), "x-ratelimit-remaining-tokens"), Some("250"));
        // A failed request without usage releases its reservation.
        assert_eq!(release(&h, &c, None, &r2, None, true).failures, 0);
        // Without max_tokens: the model's average output is reserved (here 40)...
        let avg = RequestFacts { output_average: Some(40), ..facts("m", 0, None) };
        let r3 = admit(check(&h, &c, avg));
        assert_eq!(header(&r3.headers(), "x-ratelimit-remaining-tokens"), Some("810"));
        release(&h, &c, None, &r3, None, true);
        // ...and before any response of the model was seen, the cap (500).
        let r4 = admit(check(&h, &c, facts("m", 0, None)));
        assert_eq!(header(&r4.headers(), "x-ratelimit-remaining-tokens"), Some("350"));
        // That guess lasts until a response completes: a request it turns away may retry in 1 s;
        // one turned away by a known average waits for the window.
        let rej = reject(check(&h, &c, facts("m", 400, None)));
        assert_eq!(header(&rej.headers, "retry-after"), Some("1"));
        assert!(rej.body.contains("output size is not known yet"), "{}", rej.body);
        let rej = reject(check(&h, &c, RequestFacts { output_average: Some(400), ..facts("m", 400, None) }));
        assert_eq!(header(&rej.headers, "retry-after"), Some("60"));
    }

    #[test]
    fn usd_budgets_use_pricing() {
        let c = config(
            r#"{"pricing":{"m":{"input":1000,"output":0}},
                "limits":[{"name":"usd","key":"global","usd_per_day":0.003}]}"#,
        );
        let h = H::default();
        // 1 mUSD per input token: 8 bytes = 2 tokens = 2 mUSD (output is free here).
        let r = admit(check(&h, &c, facts("m", 8, None)));
        assert_eq!(header(&r.headers(), "x-ratelimit-limit-usd"), Some("0.003"));
        assert_eq!(header(&r.headers(), "x-ratelimit-remaining-usd"), Some("0.001"));
        let rej = reject(check(&h, &c, RequestFacts { output_average: Some(0), ..facts("m", 8, None) }));
        assert!(rej.body.contains("0.003 USD per day"), "{}", rej.body);
        assert!(rej.body.contains("0.001 left in this window, this request needs 0.002"), "{}", rej.body);
        assert_eq!(header(&rej.headers, "x-ratelimit-remaining-usd"), Some("0.001"));
        // Unpriced models reserve nothing, and the end says so when no price applied.
        let (v, _) = check(&h, &c, facts("free", 8000, None));
        let Verdict::Admit(free) = v else { panic!("rejected") };
        let used = Usage { input: 1, ..Usage::default() };
        assert_eq!(
            release(&h, &c, None, &free, Some(&used), false),
            Released { unpriced: true, ..Released::default() }
        );
        assert!(release(&h, &c, None, &r, Some(&used), false).unpriced);
    }

    #[test]
    fn usd_budgets_charge_the_price_the_cost_metric_uses() {
        // The request names an alias without a price; the response names the priced model.
        let c = config(
            r#"{"pricing":{"gpt-4o-2024-08-06":{"input":1000,"output":1000}},
                "limits":[{"name":"usd","key":"global","usd_per_day":0.01}]}"#,
        );
        let h = H::default();
        let r = admit(check(&h, &c, facts("gpt-4o", 8, None)));
        let price = c.pricing.resolve(Some("gpt-4o"), Some("gpt-4o-2024-08-06"));
        assert!(price.is_some(), "resolved through the response model");
        // 3 input + 2 output tokens at 1 mUSD each: 5 mUSD of the 10 charged.
        let used = Usage { input: 3, output: 2, ..Usage::default() };
        assert_eq!(release(&h, &c, price, &r, Some(&used), false).used, vec![(0, 5_000_000_000, 86_400_000)]);
        // 5 mUSD left: a request estimated at 6 does not fit, one at 5 does.
        let no_output = |bytes| RequestFacts { output_average: Some(0), ..facts("gpt-4o-2024-08-06", bytes, None) };
        let rej = reject(check(&h, &c, no_output(24)));
        assert!(rej.body.contains("0.005 left"), "{}", rej.body);
        admit(check(&h, &c, no_output(20)));
    }

    #[test]
    fn give_back_returns_every_local_charge() {
        let c = config(
            r#"{"pricing":{"m":{"input":1000,"output":1000}},
                "limits":[{"name":"rpm","key":"global","requests_per_minute":10},
                          {"name":"tpm","key":"global","tokens_per_minute":1000},
                          {"name":"usd","key":"global","usd_per_hour":1},
                          {"name":"conc","key":"global","max_concurrent":1}]}"#,
        );
        let h = H::default();
        let before = h.store.data.borrow().clone();
        let r = admit(check(&h, &c, facts("m", 400, Some(100))));
        assert_ne!(*h.store.data.borrow(), before);
        assert_eq!(give_back(&h, &r), 0);
        // Every bucket is as before the request (fresh buckets: created, and at 0).
        for (key, (value, _)) in h.store.data.borrow().iter() {
            let used = u64::from_le_bytes(value[8..16].try_into().unwrap());
            assert_eq!(used, 0, "{key} still charged");
        }
        // So the next request sees the full limits.
        let r = admit(check(&h, &c, facts("m", 400, Some(100))));
        assert_eq!(header(&r.headers(), "x-ratelimit-remaining-requests"), Some("9"));
        assert_eq!(header(&r.headers(), "x-ratelimit-remaining-tokens"), Some("800"));
    }

    #[test]
    fn warn_at_is_crossed_once_per_key_and_window_and_announced_while_above() {
        let c = config(
            r#"{"limits":[{"name":"daily","key":"header:x-api-key","requests_per_day":10,"warn_at":0.8},
                          {"name":"rpm","key":"header:x-api-key","requests_per_minute":100}]}"#,
        );
        let mut h = H { now: 1_000 * 86_400_000, ..H::default() };
        h.headers.insert("x-api-key".into(), b"sk-a".to_vec());
        let mut crossings = 0;
        for i in 1..=10u64 {
            let (v, notes) = check(&h, &c, facts("m", 4, None));
            let Verdict::Admit(r) = v else { panic!("rejected") };
            crossings += notes.crossed.len();
            // From the 8th request on (8 of 10), every response says so; rpm never does.
            let want = (i >= 8).then_some("daily");
            assert_eq!(header(&r.headers(), "x-ratelimit-warning"), want, "request {i}");
            if i == 8 {
                let c = &notes.crossed[0];
                assert_eq!((c.rule, c.used, c.max), (0, 8, 10));
                assert_eq!(c.key.len(), 16, "a hash prefix, never the key");
                assert!(!c.key.contains("sk-a"));
            }
        }
        assert_eq!(crossings, 1, "once per key and window");
        // Another key crosses on its own.
        h.headers.insert("x-api-key".into(), b"sk-b".to_vec());
        let n: usize = (0..8).map(|_| check(&h, &c, facts("m", 4, None)).1.crossed.len()).sum();
        assert_eq!(n, 1);
        // The next day starts below the threshold again.
        h.now += 86_400_000;
        h.headers.insert("x-api-key".into(), b"sk-a".to_vec());
        let (_, notes) = check(&h, &c, facts("m", 4, None));
        assert!(notes.crossed.is_empty());
    }

    #[test]
    fn a_reconciliation_and_a_window_starting_in_debt_cross_too() {
        let c = config(r#"{"limits":[{"name":"tpd","key":"global","tokens_per_day":1000,"warn_at":0.5}]}"#);
        let mut h = H { now: 1_000 * 86_400_000, ..H::default() };
        let (v, notes) = check(&h, &c, RequestFacts { output_average: Some(10), ..facts("m", 40, None) });
        let Verdict::Admit(r) = v else { panic!() };
        assert!(notes.crossed.is_empty());
        assert_eq!(notes.used, vec![(0, 20, 1_001 * 86_400_000)], "used, and the end of the day");
        // The response used 1,400 tokens: the bucket crosses 500 at the end (and goes into debt).
        let released = release(&h, &c, None, &r, Some(&Usage { input: 400, output: 1000, ..Usage::default() }), false);
        assert_eq!(released.crossed.len(), 1);
        assert_eq!(released.used, vec![(0, 1400, 1_001 * 86_400_000)]);
        // The next day starts with 400 of debt: below 500, no crossing yet...
        h.now += 86_400_000;
        let (_, notes) = check(&h, &c, RequestFacts { output_average: Some(10), ..facts("m", 40, None) });
        assert_eq!((notes.crossed.len(), notes.used.clone()), (0, vec![(0, 420, 1_002 * 86_400_000)]));
        // ...a day that starts above it counts the crossing with its first request.
        let c2 = config(r#"{"limits":[{"name":"tpd","key":"global","tokens_per_day":1000,"warn_at":0.3}]}"#);
        h.now += 86_400_000;
        let (v, _) = check(&h, &c2, RequestFacts { output_average: Some(0), ..facts("m", 4, None) });
        let Verdict::Admit(r) = v else { panic!() };
        release(&h, &c, None, &r, Some(&Usage { input: 1800, ..Usage::default() }), false);
        h.now += 86_400_000;
        let (_, notes) = check(&h, &c2, RequestFacts { output_average: Some(0), ..facts("m", 4, None) });
        assert_eq!(notes.crossed.len(), 1, "{notes:?}");
    }

    #[test]
    fn shadow_rules_count_would_be_rejections_and_change_nothing() {
        let c = config(
            r#"{"limits":[{"name":"new-rpm","key":"global","requests_per_minute":2,"mode":"shadow"},
                          {"name":"rpm","key":"global","requests_per_minute":5}]}"#,
        );
        let h = H::default();
        let mut shadowed = 0;
        for i in 0..5 {
            let (v, notes) = check(&h, &c, facts("m", 4, None));
            let Verdict::Admit(r) = v else { panic!("request {i} rejected") };
            shadowed += notes.shadow_rejected.len();
            // The headers are the enforced rule's.
            assert_eq!(header(&r.headers(), "x-ratelimit-limit-requests"), Some("5"));
            assert_eq!(header(&r.headers(), "x-ratelimit-remaining-requests"), Some((4 - i).to_string().as_str()));
        }
        assert_eq!(shadowed, 3, "requests 3 to 5 would have been rejected");
        // The enforced rule still rejects; the shadow rule is not charged for it.
        assert_eq!(reject(check(&h, &c, facts("m", 4, None))).rule, "rpm");
    }

    #[test]
    fn calendar_windows_reset_at_month_end_with_offsets() {
        use crate::limit::calendar::days_from_civil;
        let c = config(
            r#"{"limits":[{"name":"monthly","key":"global","requests_per_day":1000000},
                          {"name":"m","key":"global","tokens_per_month":100,"window_offset_hours":5}]}"#,
        );
        // 2026-12-31 18:59:59 UTC is 23:59:59 on the 31st in UTC+5: 1 s left in the month.
        let now = days_from_civil(2026, 12, 31) as u64 * 86_400_000 + 18 * 3_600_000 + 59 * 60_000 + 59_000;
        let h = H { now, ..H::default() };
        let r = admit(check(&h, &c, RequestFacts { output_average: Some(0), ..facts("m", 400, None) }));
        assert_eq!(header(&r.headers(), "x-ratelimit-reset-tokens"), Some("1s"));
        assert_eq!(header(&r.headers(), "x-ratelimit-reset-requests"), Some("5h0m1s"), "the UTC day ends later");
        let rej = reject(check(&h, &c, RequestFacts { output_average: Some(0), ..facts("m", 4, None) }));
        assert_eq!(header(&rej.headers, "retry-after"), Some("1"));
        assert!(rej.body.contains("100 tokens per month"), "{}", rej.body);
        // A second later, January.
        let h = H { now: now + 1000, store: h.store, ..H::default() };
        let r = admit(check(&h, &c, RequestFacts { output_average: Some(0), ..facts("m", 4, None) }));
        assert_eq!(header(&r.headers(), "x-ratelimit-remaining-tokens"), Some("99"));
        assert_eq!(header(&r.headers(), "x-ratelimit-reset-tokens"), Some("744h0m0s"), "31 days");
        assert!(h.store.data.borrow().keys().any(|k| k == "llm_meter.llm.rl.m.month+5.global"));
    }

    #[test]
    fn model_filters_and_per_model_buckets() {
        let c = config(
            r#"{"limits":[{"name":"big","key":"global","models":["gpt-4o"],"per_model":true,"requests_per_minute":1},
                          {"name":"each","key":"global","per_model":true,"requests_per_minute":1}]}"#,
        );
        let h = H::default();
        admit(check(&h, &c, facts("gpt-4o", 1, None)));
        assert_eq!(reject(check(&h, &c, facts("gpt-4o", 1, None))).rule, "big");
        admit(check(&h, &c, facts("mini", 1, None)));
        assert_eq!(reject(check(&h, &c, facts("mini", 1, None))).rule, "each");
    }

    #[test]
    fn concurrency_and_max_input_tokens() {
        let c = config(r#"{"max_input_tokens":10,"limits":[{"name":"c","key":"ip","max_concurrent":1}]}"#);
        let h = H { addr: Some(b"10.0.0.1:5555".to_vec()), ..H::default() };
        let rej = reject(check(&h, &c, facts("m", 41, None)));
        assert_eq!((rej.status, rej.rule.as_str()), (413, "max_input_tokens"));
        assert!(rej.body.contains("invalid_request_error"));
        let r = admit(check(&h, &c, facts("m", 40, None)));
        let rej = reject(check(&h, &c, facts("m", 40, None)));
        assert_eq!(header(&rej.headers, "retry-after"), Some("1"));
        // Another port of the same client is the same key.
        let h2 = H { addr: Some(b"10.0.0.1:6000".to_vec()), store: FakeStore::default(), ..H::default() };
        h2.store.data.replace(h.store.data.borrow().clone());
        reject(check(&h2, &c, facts("m", 40, None)));
        release(&h, &c, None, &r, None, false);
        admit(check(&h, &c, facts("m", 40, None)));
    }

    #[test]
    fn failures_follow_failure_mode_and_keys_overflow() {
        let allow = config(r#"{"limits":[{"name":"c","key":"ip","requests_per_minute":5}]}"#);
        let deny = config(r#"{"failure_mode":"deny","limits":[{"name":"c","key":"ip","requests_per_minute":5}]}"#);
        let h = H::default(); // no client address: the key cannot be determined
        let (v, notes) = check(&h, &allow, facts("m", 1, None));
        assert!(matches!(v, Verdict::Admit(_)));
        assert_eq!(notes.failures, 1);
        let rej = reject(check(&h, &deny, facts("m", 1, None)));
        assert_eq!((rej.status, rej.rule.as_str()), (503, "failure_mode"));
        let h = H { addr: Some(b"[::1]:80".to_vec()), ..H::default() };
        h.store.broken.set(true);
        assert_eq!(check(&h, &allow, facts("m", 1, None)).1.failures, 1);

        let c = config(
            r#"{"max_limit_keys":2,"limits":[{"name":"k","key":"header:x-api-key","requests_per_minute":1000}]}"#,
        );
        let mut h = H::default();
        for i in 0..10 {
            h.headers.insert("x-api-key".into(), format!("key-{i}").into_bytes());
            let (_, notes) = check(&h, &c, facts("m", 1, None));
            assert_eq!(notes.overflowed.len(), usize::from(i >= 2), "key {i}");
        }
        assert_eq!(h.store.data.borrow().len(), 4, "2 keys, the overflow bucket and the key count");
    }

    #[test]
    fn buckets_every_worker_updates_exist_before_traffic() {
        let c = config(
            r#"{"limits":[{"name":"g","key":"global","requests_per_minute":10},
                {"name":"k","key":"header:x-api-key","tokens_per_hour":10},
                {"name":"m","key":"global","per_model":true,"max_concurrent":2}]}"#,
        );
        let h = H::default();
        h.store.set("llm_meter.llm.rl.g.60.global", &[7; 16], None).unwrap();
        assert_eq!(create_buckets(&h, &c), 0);
        let mut keys: Vec<String> = h.store.data.borrow().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "llm_meter.llm.rl.g.60.global",
                "llm_meter.llm.rl.k.3600#keys",
                "llm_meter.llm.rl.k.3600#overflow",
                "llm_meter.llm.rl.m.0#keys",
                "llm_meter.llm.rl.m.0#overflow"
            ]
        );
        // An existing bucket is left alone (another worker, or an earlier configuration).
        assert_eq!(h.store.data.borrow()["llm_meter.llm.rl.g.60.global"].0, vec![7; 16]);
        // And the first request's admission counts on the created key count.
        let mut h = h;
        h.headers.insert("x-api-key".into(), b"a".to_vec());
        admit(check(&h, &c, facts("m", 4, None)));
        assert_eq!(h.store.data.borrow()["llm_meter.llm.rl.k.3600#keys"].1, 2, "created, then one CAS update");
        h.store.broken.set(true);
        assert_eq!(create_buckets(&H { store: h.store, ..H::default() }, &c), 0, "existing keys need no write");
    }

    #[test]
    fn a_worker_that_remembers_admitted_keys_admits_and_overflows_the_same_with_fewer_reads() {
        let c = config(
            r#"{"max_limit_keys":2,"limits":[{"name":"rpm","key":"header:x-api-key","requests_per_minute":1000},
                {"name":"tpm","key":"header:x-api-key","tokens_per_minute":100000}]}"#,
        );
        let (mut fresh, mut remembering) = (H::default(), H::default());
        let mut admitted = AdmittedKeys::default();
        for round in 0..3 {
            for i in 0..4 {
                let key = format!("key-{i}").into_bytes();
                fresh.headers.insert("x-api-key".into(), key.clone());
                remembering.headers.insert("x-api-key".into(), key);
                let (_, a) = check(&fresh, &c, facts("m", 40, None));
                let reads = remembering.store.reads.get();
                let (_, b) = super::check(&remembering, &c, facts("m", 40, None), &mut admitted);
                assert_eq!(a.overflowed, b.overflowed, "round {round} key {i}");
                assert_eq!(b.overflowed.len(), if i >= 2 { 2 } else { 0 });
                if round > 0 && i < 2 {
                    // Known keys: only the two bucket updates read shared data.
                    assert_eq!(remembering.store.reads.get() - reads, 2, "round {round} key {i}");
                }
            }
        }
        assert_eq!(*fresh.store.data.borrow(), *remembering.store.data.borrow());
    }

    #[test]
    fn addresses_and_durations() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(client_ip(b"1.2.3.4:80"), ip("1.2.3.4"));
        assert_eq!(client_ip(b"[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(client_ip(b"2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(client_ip(b"/tmp/envoy.sock"), None);
        assert_eq!(client_ip(b""), None);
        assert_eq!(client_ip(b"\xff"), None);
        assert_eq!(duration(20), "20ms");
        assert_eq!(duration(59_000), "59s");
        assert_eq!(duration(58_001), "59s");
        assert_eq!(duration(360_000), "6m0s");
        assert_eq!(duration(3_600_000), "1h0m0s");
    }
}
