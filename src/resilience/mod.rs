//! Keeping service up when a model fails: a circuit breaker per model and fallback chains.
//!
//! The gateway behind Envoy serves every model on one endpoint, so one model can fail (quota
//! exhausted, overloaded) while the others work: failover is per **model**, and it needs the
//! request body, which is where this filter sits. Envoy itself retries the same request and
//! fails over between gateways below the filter (route `retry_policy`, aggregate clusters);
//! this layer sends a request to *another model* when its own is failing.
//!
//! Open this folder for "why did this request go to another model (or get a 503)?":
//! [`breaker`] keeps each model's circuit (closed, open, half-open) in shared data so that
//! every worker sees one state; [`route`] picks where a request goes: its model when that
//! circuit admits it, else the first model of its chain whose circuit does, else nowhere;
//! [`retry_after`] reads when a rate-limited upstream wants to be asked again;
//! [`rewrite_model`] puts the chosen model into the request.
//!
//! Depends on [`crate::config`], [`crate::meter`] (the shared store) and the reply shape of
//! [`crate::limit::enforce`]; only the exchange
//! ([`crate::filter`]) uses it. Without `resilience.circuit_breaker` none of it runs.

pub mod breaker;
pub mod retry_after;

use crate::config::ResilienceConfig;
use crate::meter::labels::SharedStore;
use breaker::{Admit, Params, StoreFailed};

/// The breaker parameters of a configuration.
pub fn params(config: &ResilienceConfig) -> Option<Params> {
    config.breaker.as_ref().map(|b| Params {
        failures: b.failures,
        open_ms: b.open_ms,
        half_open_requests: b.half_open_requests,
    })
}

/// The shared-data key of `model`'s circuit.
pub fn circuit_key(prefix: &str, model: &str) -> String {
    format!("llm_meter.{prefix}.cb.{model}")
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To the model it asked for.
    Requested(Admit),
    /// To `to`, the first model of the chain whose circuit admitted it.
    Fallback {
        /// The model that serves it.
        to: String,
        /// What its circuit said.
        admit: Admit,
    },
    /// Nowhere: the model and every model of its chain are open.
    Unavailable {
        /// The models tried, in order.
        tried: Vec<String>,
        /// Milliseconds until the first of them lets a request through again.
        retry_after_ms: u64,
    },
}

/// Picks where a request for `model` goes at `now_ms`: the model itself if its circuit admits
/// it, else the first model of its chain whose circuit does. `tracked(m)`: whether `m` has a
/// circuit (a bounded set: models with a label of their own, and those the configuration
/// names); an untracked model is always admitted, and so is any model when the store fails
/// (fail-open). One shared-data read per model asked.
pub fn route<S: SharedStore + ?Sized>(
    store: &S,
    config: &ResilienceConfig,
    prefix: &str,
    model: &str,
    tracked: impl Fn(&str) -> bool,
    now_ms: u64,
) -> Route {
    let Some(params) = params(config) else { return Route::Requested(Admit::Closed { failures: 0 }) };
    let ask = |m: &str| -> Result<Admit, StoreFailed> {
        if tracked(m) {
            breaker::admit(store, &circuit_key(prefix, m), params, now_ms)
        } else {
            Ok(Admit::Closed { failures: 0 })
        }
    };
    let first = match ask(model) {
        Ok(Admit::Open { until_ms }) => until_ms,
        Ok(admit) => return Route::Requested(admit),
        Err(StoreFailed) => return Route::Requested(Admit::Closed { failures: 0 }),
    };
    let mut tried = vec![model.to_string()];
    let mut soonest = first;
    for m in config.chain(model) {
        if m == model {
            continue;
        }
        match ask(m) {
            Ok(Admit::Open { until_ms }) => {
                soonest = soonest.min(until_ms);
                tried.push(m.clone());
            }
            Ok(admit) => return Route::Fallback { to: m.clone(), admit },
            Err(StoreFailed) => return Route::Fallback { to: m.clone(), admit: Admit::Closed { failures: 0 } },
        }
    }
    Route::Unavailable { tried, retry_after_ms: soonest.saturating_sub(now_ms) }
}

/// The 503 a request gets when its model and every model of its chain are open: OpenAI's
/// error shape, `Retry-After` the seconds until the first of them lets a request through.
pub fn unavailable(tried: &[String], retry_after_ms: u64) -> crate::limit::enforce::Rejection {
    let retry_after = retry_after_ms.div_ceil(1000).max(1);
    let names: Vec<String> = tried.iter().map(crate::meter::labels::sanitize).collect();
    let message = format!(
        "No model is available for this request: {} failed recently and their circuits are open. Retry after {retry_after} s.",
        names.join(", ")
    );
    crate::limit::enforce::Rejection {
        status: 503,
        rule: "circuit_open".into(),
        headers: vec![("content-type".into(), "application/json".into()), ("retry-after".into(), retry_after.to_string())],
        body: serde_json::json!({"error": {"message": message, "type": "server_error", "param": null, "code": "model_unavailable"}})
            .to_string(),
    }
}

/// Why a request could not be rewritten for another model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRewritten;

/// The request body with its top-level `model` set to `to` (OpenAI and Anthropic bodies). The
/// body goes through a JSON round trip: members keep their values, not always their order.
pub fn rewrite_model(body: &[u8], to: &str) -> Result<Vec<u8>, NotRewritten> {
    let mut value: serde_json::Value = serde_json::from_slice(body).map_err(|_| NotRewritten)?;
    let obj = value.as_object_mut().ok_or(NotRewritten)?;
    if !obj.get("model").is_some_and(serde_json::Value::is_string) {
        return Err(NotRewritten);
    }
    obj.insert("model".into(), serde_json::Value::String(to.to_string()));
    serde_json::to_vec(&value).map_err(|_| NotRewritten)
}

/// A Gemini path with its model segment (`…/models/{model}:method`) set to `to`.
pub fn rewrite_path_model(path: &[u8], to: &str) -> Option<String> {
    let path = std::str::from_utf8(path).ok()?;
    let start = path.find("/models/")? + "/models/".len();
    let rest = path.get(start..)?;
    let end = rest.find([':', '?', '/']).map_or(path.len(), |i| start + i);
    Some(format!("{}{}{}", path.get(..start)?, to, path.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::breaker::{report, Outcome};
    use super::*;
    use crate::config::Config;
    use crate::meter::labels::tests::FakeStore;

    fn config() -> ResilienceConfig {
        Config::parse(
            br#"{"resilience":{"circuit_breaker":{"failures":1,"open_seconds":30},
                "fallbacks":{"gpt-4.1":["claude-sonnet-4","gemini-2.5-flash"],"*":["deepseek-v3.2"]}}}"#,
        )
        .unwrap()
        .resilience
    }

    fn open(s: &FakeStore, c: &ResilienceConfig, model: &str, now: u64) {
        let key = circuit_key("llm", model);
        report(s, &key, params(c).unwrap(), now, Admit::Closed { failures: 0 }, Outcome::Failure).unwrap();
    }

    #[test]
    fn requests_go_to_the_first_model_whose_circuit_admits_them() {
        let (s, c) = (FakeStore::default(), config());
        let all = |_: &str| true;
        assert_eq!(route(&s, &c, "llm", "gpt-4.1", all, 0), Route::Requested(Admit::Closed { failures: 0 }));
        open(&s, &c, "gpt-4.1", 0);
        assert_eq!(
            route(&s, &c, "llm", "gpt-4.1", all, 1),
            Route::Fallback { to: "claude-sonnet-4".into(), admit: Admit::Closed { failures: 0 } }
        );
        open(&s, &c, "claude-sonnet-4", 5);
        assert_eq!(
            route(&s, &c, "llm", "gpt-4.1", all, 6),
            Route::Fallback { to: "gemini-2.5-flash".into(), admit: Admit::Closed { failures: 0 } }
        );
        open(&s, &c, "gemini-2.5-flash", 10);
        // All open: the first to reopen is gpt-4.1, at 30 s.
        assert_eq!(
            route(&s, &c, "llm", "gpt-4.1", all, 1000),
            Route::Unavailable {
                tried: vec!["gpt-4.1".into(), "claude-sonnet-4".into(), "gemini-2.5-flash".into()],
                retry_after_ms: 29_000
            }
        );
        // Other models use the `*` chain; an untracked model is never held back.
        open(&s, &c, "o3", 0);
        assert_eq!(
            route(&s, &c, "llm", "o3", all, 1),
            Route::Fallback { to: "deepseek-v3.2".into(), admit: Admit::Closed { failures: 0 } }
        );
        assert_eq!(route(&s, &c, "llm", "o3", |m| m != "o3", 1), Route::Requested(Admit::Closed { failures: 0 }));
        // Half-open at 30 s: gpt-4.1 gets its probe.
        assert_eq!(route(&s, &c, "llm", "gpt-4.1", all, 30_000), Route::Requested(Admit::Probe { first: true }));
    }

    #[test]
    fn bodies_and_gemini_paths_get_the_new_model() {
        let body = br#"{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"model"}]}"#;
        let out: serde_json::Value = serde_json::from_slice(&rewrite_model(body, "claude-sonnet-4").unwrap()).unwrap();
        assert_eq!(out["model"], "claude-sonnet-4");
        assert_eq!(out["messages"][0]["content"], "model");
        assert_eq!(out["stream"], true);
        assert_eq!(rewrite_model(b"[1]", "x"), Err(NotRewritten));
        assert_eq!(rewrite_model(br#"{"messages":[]}"#, "x"), Err(NotRewritten), "no model to replace");
        assert_eq!(rewrite_model(b"{\"model\":", "x"), Err(NotRewritten));
        assert_eq!(
            rewrite_path_model(b"/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", "gemini-2.5-flash")
                .as_deref(),
            Some("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
        );
        assert_eq!(rewrite_path_model(b"/v1/chat/completions", "x"), None);
    }
}
