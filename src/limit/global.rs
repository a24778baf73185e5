//! Rules with `scope: global`: counted by a rate limit service that every Envoy replica shares
//! (Envoy's rate limit protocol, [`crate::limit::rls`]), instead of this Envoy's shared data, which is
//! per process.
//!
//! Per rule and request, one `ShouldRateLimit` call with `hits_addend` 1 decides before the
//! request is forwarded: a request rule counts the request; a token rule checks that the window
//! still has room (the protocol cannot ask without adding: 0 means 1, so the check adds one
//! token). When the response has been metered, a token rule reports the real usage minus that
//! one token in a second call that nobody waits for, so the service's count is exactly the
//! tokens used. The limits themselves travel in each descriptor's `limit` override, so this
//! filter's configuration is the one place the numbers live.
//!
//! Descriptor entries: `rule` (the rule name), `key` (`global`, `absent`, or the SHA-256 of the
//! header value or client IP: keys never leave Envoy in clear) and, with `per_model`, `model`.

use crate::config::{Config, Limit, Rule};
use crate::limit::enforce::{self, KeyIds, LimitHost, Rejection};
use crate::limit::rls::{self, Code, Descriptor, Unit};
use crate::meter::labels::sanitize;
use crate::scan::usage::Usage;

/// A global rule that applies to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// Index of the rule in `limits`.
    pub rule: usize,
    descriptor: Descriptor,
}

/// A call to make: the rule it is for and the encoded `RateLimitRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub rule: usize,
    pub message: Vec<u8>,
}

/// The global rules that apply to a request (in rule order), and the rules whose key could not
/// be determined (a client IP on a Unix socket listener), which follow `failure_mode`.
pub fn charges<H: LimitHost>(host: &H, config: &Config, model: Option<&str>) -> (Vec<Charge>, Vec<usize>) {
    let mut charges = Vec::new();
    let mut unknown = Vec::new();
    let mut key_ids = KeyIds::default();
    for (i, rule) in config.limits.rules.iter().enumerate() {
        if rule.global.is_none() || !enforce::applies(rule, model) {
            continue;
        }
        let Some(key) = key_ids.get(host, &rule.key) else {
            unknown.push(i);
            continue;
        };
        let mut entries = vec![("rule".to_string(), rule.name.clone()), ("key".to_string(), key)];
        if rule.per_model {
            entries.push(("model".into(), model.map_or_else(|| "unknown".to_string(), sanitize)));
        }
        charges.push(Charge { rule: i, descriptor: Descriptor { entries, limit: limit_override(rule) } });
    }
    (charges, unknown)
}

/// The rule's limit as a descriptor `limit` override.
fn limit_override(rule: &Rule) -> Option<(u32, Unit)> {
    match rule.limit {
        Limit::Requests { per, max } | Limit::Tokens { per, max, .. } => {
            Some((u32::try_from(max).unwrap_or(u32::MAX), Unit::from_secs(per.secs())?))
        }
        Limit::Usd { .. } | Limit::Concurrent { .. } => None,
    }
}

impl Charge {
    /// The call deciding the request: one hit.
    pub fn request(&self, config: &Config) -> Option<Call> {
        self.call(config, 1)
    }

    /// The call reporting a token rule's real usage, less the token the request's call added;
    /// `None` when there is nothing to add (a request rule, or a usage of at most 1 token).
    pub fn report(&self, config: &Config, usage: &Usage) -> Option<Call> {
        let rule = config.limits.rules.get(self.rule)?;
        let Limit::Tokens { token_type, .. } = rule.limit else { return None };
        let hits = enforce::tokens_of(usage, token_type).saturating_sub(1);
        // Usage is bounded (`usage::MAX_TOKENS` per count, so a total of at most 2·10⁹): it fits the
        // protocol's uint32. A count that did not would not be clamped into the service's counter.
        let hits = u32::try_from(hits).ok().filter(|&h| h > 0)?;
        self.call(config, hits)
    }

    fn call(&self, config: &Config, hits: u32) -> Option<Call> {
        let service = config.limits.rules.get(self.rule)?.global.as_ref()?;
        let message = rls::encode_request(&service.domain, std::slice::from_ref(&self.descriptor), hits);
        Some(Call { rule: self.rule, message })
    }
}

/// What the service's answer to a request's call means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Under the limit.
    Admit,
    /// Over the limit: send this 429.
    Reject(Rejection),
    /// No usable answer (call failed, timed out, error status, undecodable or `UNKNOWN`):
    /// counted; the rule's `failure_mode` decides.
    Failed,
}

/// Reads the answer to `rule`'s call: `Err(())` when the call itself failed.
pub fn answer(config: &Config, rule: usize, result: Result<&[u8], ()>, now_ms: u64) -> Answer {
    let (Some(r), Some(response)) = (config.limits.rules.get(rule), decision(result)) else { return Answer::Failed };
    match response.overall {
        Code::OverLimit => Answer::Reject(rejection(r, response.statuses.first().copied(), now_ms)),
        _ => Answer::Admit,
    }
}

/// The service's decision (OK or OVER_LIMIT), if the call gave one: `None` when it failed, the
/// answer does not decode, or it says UNKNOWN. Usage reports only need to know that.
pub fn decision(result: Result<&[u8], ()>) -> Option<rls::Response> {
    rls::decode_response(result.ok()?).ok().filter(|r| r.overall != Code::Unknown)
}

/// The 429 of a global rule, with what the service said (remaining, reset) where it did.
fn rejection(rule: &Rule, status: Option<rls::Status>, now_ms: u64) -> Rejection {
    let (max, window_ms) = match rule.limit {
        Limit::Requests { per, max } | Limit::Tokens { per, max, .. } => (max, per.secs() * 1000),
        Limit::Usd { .. } | Limit::Concurrent { .. } => (0, 1000),
    };
    // Without a reset from the service: the end of the epoch-aligned window, as envoyproxy/ratelimit
    // counts (Limitador's windows start at a counter's first hit, but it sends the reset).
    let reset_ms = status.and_then(|s| s.reset_ms).unwrap_or_else(|| window_ms - now_ms % window_ms.max(1));
    let remaining = status.map_or(0, |s| u64::from(s.remaining));
    let retry_after = reset_ms.div_ceil(1000).max(1);
    enforce::too_many(rule, max, remaining, reset_ms, retry_after, "its window is used up on every gateway replica")
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::meter::labels::{SharedStore, StoreError};

    struct Host(Vec<(&'static str, &'static str)>);

    impl SharedStore for Host {
        fn get(&self, _: &str) -> Option<(Vec<u8>, u32)> {
            None
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), StoreError> {
            Err(StoreError::Other)
        }
    }

    impl LimitHost for Host {
        fn request_header(&self, name: &str) -> Option<Vec<u8>> {
            self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_bytes().to_vec())
        }
        fn client_address(&self) -> Option<Vec<u8>> {
            None
        }
        fn now_ms(&self) -> u64 {
            0
        }
    }

    fn config() -> Config {
        Config::parse(
            br#"{"limits":[
                {"name":"local","key":"global","requests_per_minute":5},
                {"name":"rpm","key":"header:authorization","requests_per_minute":300,"scope":"global",
                 "service":{"cluster":"rls","domain":"llm"}},
                {"name":"tpm","key":"global","per_model":true,"tokens_per_hour":100000,"token_type":"output",
                 "scope":"global","service":{"cluster":"rls","domain":"llm-tokens"}},
                {"name":"by-ip","key":"ip","requests_per_second":9,"scope":"global",
                 "service":{"cluster":"rls","domain":"llm"}},
                {"name":"mini","key":"global","models":["gpt-4o-mini"],"requests_per_second":1,"scope":"global",
                 "service":{"cluster":"rls","domain":"llm"}}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn descriptors_carry_the_rule_a_hashed_key_the_model_and_the_limit() {
        let c = config();
        let (found, unknown) = charges(&Host(vec![("authorization", "Bearer sk-secret")]), &c, Some("gpt-4o"));
        assert_eq!(unknown, vec![3], "no client address: the ip rule cannot be keyed");
        assert_eq!(found.iter().map(|c| c.rule).collect::<Vec<_>>(), vec![1, 2], "local and other-model rules skipped");
        let rpm = &found[0].descriptor;
        assert_eq!(rpm.entries[0], ("rule".to_string(), "rpm".to_string()));
        assert_eq!(rpm.entries[1].0, "key");
        assert_eq!(rpm.entries[1].1.len(), 32);
        assert!(!rpm.entries[1].1.contains("secret"));
        assert_eq!(rpm.limit, Some((300, Unit::Minute)));
        let tpm = &found[1].descriptor;
        assert_eq!(tpm.entries[1], ("key".to_string(), "global".to_string()));
        assert_eq!(tpm.entries[2], ("model".to_string(), "gpt-4o".to_string()));
        assert_eq!(tpm.limit, Some((100_000, Unit::Hour)));
        // An absent key header is its own key.
        let (found, _) = charges(&Host(vec![]), &c, Some("gpt-4o-mini"));
        assert_eq!(found[0].descriptor.entries[1].1, "absent");
        assert_eq!(found.iter().map(|c| c.rule).collect::<Vec<_>>(), vec![1, 2, 4]);
    }

    #[test]
    fn a_request_adds_one_and_a_report_the_rest_of_the_tokens() {
        let c = config();
        let (found, _) = charges(&Host(vec![]), &c, Some("gpt-4o"));
        let rpm = found[0].request(&c).unwrap();
        assert_eq!(rpm.message, rls::encode_request("llm", &[found[0].descriptor.clone()], 1));
        let usage = Usage { input: 50, output: 120, ..Usage::default() };
        assert_eq!(found[0].report(&c, &usage), None, "request rules report nothing");
        let report = found[1].report(&c, &usage).unwrap();
        assert_eq!(report.message, rls::encode_request("llm-tokens", &[found[1].descriptor.clone()], 119));
        assert_eq!(found[1].report(&c, &Usage { output: 1, ..Usage::default() }), None);
        assert_eq!(found[1].report(&c, &Usage::default()), None);
    }

    #[test]
    fn answers() {
        let c = config();
        let ok = [0x08, 1];
        assert_eq!(answer(&c, 1, Ok(&ok), 0), Answer::Admit);
        assert_eq!(answer(&c, 1, Err(()), 0), Answer::Failed);
        assert_eq!(answer(&c, 1, Ok(&[0x08]), 0), Answer::Failed, "truncated");
        assert_eq!(answer(&c, 1, Ok(&[]), 0), Answer::Failed, "UNKNOWN");
        // OVER_LIMIT with a status: remaining 0, reset in 42 s.
        let over = [0x08, 2, 0x12, 8, 0x08, 2, 0x18, 0, 0x22, 2, 0x08, 42];
        let Answer::Reject(r) = answer(&c, 1, Ok(&over), 0) else { panic!() };
        assert_eq!((r.status, r.rule.as_str()), (429, "rpm"));
        let h = |n: &str| r.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(h("retry-after"), Some("42"));
        assert_eq!(h("x-ratelimit-limit-requests"), Some("300"));
        assert_eq!(h("x-ratelimit-remaining-requests"), Some("0"));
        assert!(r.body.contains("\"code\":\"rpm\""), "{}", r.body);
        // Without a status: the window's end.
        let Answer::Reject(r) = answer(&c, 2, Ok(&[0x08, 2]), 3_600_000 + 600_000) else { panic!() };
        assert!(r.headers.contains(&("retry-after".to_string(), "3000".to_string())), "{:?}", r.headers);
        assert!(r.headers.iter().any(|(k, _)| k == "x-ratelimit-limit-tokens"));
    }
}
