//! The `resilience` part of the configuration: the per-model circuit breaker and the fallback
//! chains (see [`crate::resilience`]).

use super::{err, ConfigError};
use crate::meter::classify::ErrorType;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Default for `circuit_breaker.failures`.
pub const DEFAULT_FAILURES: u32 = 3;
/// Default for `circuit_breaker.open_seconds`.
pub const DEFAULT_OPEN_SECONDS: u64 = 30;
/// Default for `circuit_breaker.half_open_requests`.
pub const DEFAULT_HALF_OPEN_REQUESTS: u32 = 1;
/// Longest fallback chain (each member may cost a shared-data read per request).
pub const MAX_CHAIN: usize = 8;
/// Most models with a chain of their own.
pub const MAX_CHAINS: usize = 256;
/// The chain of every model without one of its own.
pub const ANY_MODEL: &str = "*";

/// The error classes a circuit breaker may count, and the default set.
const CLASSES: [ErrorType; 5] = [
    ErrorType::UpstreamRateLimit,
    ErrorType::ServerError,
    ErrorType::Timeout,
    ErrorType::Network,
    ErrorType::ClientError,
];
const DEFAULT_ON: [ErrorType; 4] =
    [ErrorType::UpstreamRateLimit, ErrorType::ServerError, ErrorType::Timeout, ErrorType::Network];

/// Validated `resilience.circuit_breaker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open a model's circuit.
    pub failures: u32,
    /// How long an open circuit stays open, in milliseconds.
    pub open_ms: u64,
    /// Requests let through as probes while half-open.
    pub half_open_requests: u32,
    /// The error classes that count as failures.
    pub on: Vec<ErrorType>,
}

impl BreakerConfig {
    /// True when `error` counts as a failure.
    pub fn counts(&self, error: ErrorType) -> bool {
        self.on.contains(&error)
    }
}

/// Validated `resilience` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResilienceConfig {
    /// The circuit breaker, when configured (everything here is off without it).
    pub breaker: Option<BreakerConfig>,
    /// Fallback chains by requested model; [`ANY_MODEL`] for every other model.
    pub fallbacks: BTreeMap<String, Vec<String>>,
}

impl ResilienceConfig {
    /// True when a circuit breaker is configured.
    pub fn is_active(&self) -> bool {
        self.breaker.is_some()
    }

    /// The fallback chain of `model`: its own, else the `*` chain, else none.
    pub fn chain(&self, model: &str) -> &[String] {
        self.fallbacks.get(model).or_else(|| self.fallbacks.get(ANY_MODEL)).map_or(&[], Vec::as_slice)
    }

    /// True when the configuration names `model` (as a key or in a chain): its circuit is
    /// tracked even when it has no label of its own.
    pub fn names(&self, model: &str) -> bool {
        self.fallbacks.iter().any(|(k, chain)| k == model || chain.iter().any(|m| m == model))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResilience {
    circuit_breaker: Option<RawBreaker>,
    fallbacks: Option<BTreeMap<String, Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failures: Option<u64>,
    open_seconds: Option<u64>,
    half_open_requests: Option<u64>,
    on: Option<Vec<String>>,
}

fn ranged(field: &str, value: Option<u64>, default: u64, max: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if (1..=max).contains(&v) => Ok(v),
        Some(_) => Err(err(field, format!("must be between 1 and {max}"))),
    }
}

pub(super) fn validate(raw: RawResilience) -> Result<ResilienceConfig, ConfigError> {
    let breaker = match raw.circuit_breaker {
        None => None,
        Some(b) => {
            let on = match b.on {
                None => DEFAULT_ON.to_vec(),
                Some(list) if list.is_empty() => {
                    return Err(err("resilience.circuit_breaker.on", "must name at least one error class"))
                }
                Some(list) => {
                    let mut on = Vec::new();
                    for (i, name) in list.iter().enumerate() {
                        let class = CLASSES.iter().find(|c| c.as_str() == name).ok_or_else(|| {
                            let known: Vec<&str> = CLASSES.iter().map(|c| c.as_str()).collect();
                            err(
                                format!("resilience.circuit_breaker.on[{i}]"),
                                format!("unknown error class \"{name}\" (one of {})", known.join(", ")),
                            )
                        })?;
                        if !on.contains(class) {
                            on.push(*class);
                        }
                    }
                    on
                }
            };
            Some(BreakerConfig {
                failures: ranged("resilience.circuit_breaker.failures", b.failures, DEFAULT_FAILURES.into(), 1000)?
                    as u32,
                open_ms: ranged(
                    "resilience.circuit_breaker.open_seconds",
                    b.open_seconds,
                    DEFAULT_OPEN_SECONDS,
                    86_400,
                )? * 1000,
                half_open_requests: ranged(
                    "resilience.circuit_breaker.half_open_requests",
                    b.half_open_requests,
                    DEFAULT_HALF_OPEN_REQUESTS.into(),
                    1000,
                )? as u32,
                on,
            })
        }
    };
    let fallbacks = raw.fallbacks.unwrap_or_default();
    if !fallbacks.is_empty() && breaker.is_none() {
        return Err(err(
            "resilience.fallbacks",
            "requires resilience.circuit_breaker (fallbacks follow open circuits)",
        ));
    }
    if fallbacks.len() > MAX_CHAINS {
        return Err(err("resilience.fallbacks", format!("at most {MAX_CHAINS} models")));
    }
    for (model, chain) in &fallbacks {
        let field = format!("resilience.fallbacks.{model}");
        if model.is_empty() || model.len() > 256 {
            return Err(err("resilience.fallbacks", "model names must be 1 to 256 characters"));
        }
        if chain.is_empty() {
            return Err(err(field, "must name at least one model (an empty chain falls back to nothing)"));
        }
        if chain.len() > MAX_CHAIN {
            return Err(err(field, format!("at most {MAX_CHAIN} models")));
        }
        for (i, m) in chain.iter().enumerate() {
            let field = format!("{field}[{i}]");
            if m.is_empty() || m.len() > 256 || m == ANY_MODEL {
                return Err(err(field, "must be a model name of 1 to 256 characters"));
            }
            if m == model {
                return Err(err(field, format!("names the model itself (\"{m}\")")));
            }
            if chain.iter().take(i).any(|earlier| earlier == m) {
                return Err(err(field, format!("\"{m}\" is already in the chain")));
            }
        }
    }
    if let Some(cycle) = find_cycle(&fallbacks) {
        return Err(err(
            format!("resilience.fallbacks.{}", cycle.first().map_or("", String::as_str)),
            format!("a fallback cycle: {}", cycle.join(" → ")),
        ));
    }
    Ok(ResilienceConfig { breaker, fallbacks })
}

/// A cycle among the explicit chains (`a` falls back to `b`, whose own chain names `a`), as the
/// models along it with the first repeated at the end; `None` without one. The `*` chain is
/// not followed: it is what a model without a chain of its own falls back to.
fn find_cycle(fallbacks: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    fn visit<'a>(
        model: &'a str,
        fallbacks: &'a BTreeMap<String, Vec<String>>,
        path: &mut Vec<&'a str>,
        done: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|m| *m == model) {
            let mut cycle: Vec<String> = path.iter().skip(start).map(|m| m.to_string()).collect();
            cycle.push(model.to_string());
            return Some(cycle);
        }
        if done.contains(&model) {
            return None;
        }
        path.push(model);
        for next in fallbacks.get(model).into_iter().flatten() {
            if let Some(cycle) = visit(next, fallbacks, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.push(model);
        None
    }
    let mut done = Vec::new();
    for model in fallbacks.keys().filter(|k| *k != ANY_MODEL) {
        if let Some(cycle) = visit(model, fallbacks, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}
