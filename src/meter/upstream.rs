//! Signals the upstream sends in response headers: its own rate-limit state, and (for gateways
//! that report usage out of band) token usage.
//!
//! Rate-limit headers come in three families: OpenAI's `x-ratelimit-{limit,remaining}-{requests,
//! tokens}`, Anthropic's `anthropic-ratelimit-{requests,tokens}-{limit,remaining}`, and the generic
//! `x-ratelimit-limit` / `x-ratelimit-remaining` (taken as requests). Exporting them as gauges per
//! model shows how close each upstream quota is to exhaustion before the 429s start.

use crate::scan::usage::Usage;
use serde::Deserialize;

/// Response headers that carry usage (`usage_headers`), the fallback when a body has none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageHeaders {
    /// Input tokens header.
    pub input: Option<String>,
    /// Output tokens header.
    pub output: Option<String>,
    /// Cached input tokens header.
    pub cached_input: Option<String>,
    /// Reasoning tokens header.
    pub reasoning: Option<String>,
    /// Cache-creation input tokens header.
    pub cache_creation_input: Option<String>,
}

impl UsageHeaders {
    /// True when no header is configured.
    pub fn is_empty(&self) -> bool {
        *self == UsageHeaders::default()
    }
}

/// Which quota a rate-limit value is about (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    /// Requests.
    Requests,
    /// Tokens.
    Tokens,
}

impl QuotaKind {
    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaKind::Requests => "requests",
            QuotaKind::Tokens => "tokens",
        }
    }
}

/// One quota as the upstream reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// The quota's size.
    pub limit: Option<u64>,
    /// What is left of it.
    pub remaining: Option<u64>,
}

/// The upstream's rate-limit state from its response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Request quota.
    pub requests: Quota,
    /// Token quota.
    pub tokens: Quota,
}

impl RateLimits {
    /// Reads every family; the first header found for a value wins (OpenAI, then Anthropic,
    /// then generic).
    pub fn from_headers(header: impl Fn(&str) -> Option<Vec<u8>>) -> Self {
        let first = |names: &[&str]| names.iter().find_map(|n| header(n).and_then(|v| number(&v)));
        RateLimits {
            requests: Quota {
                limit: first(&[
                    "x-ratelimit-limit-requests",
                    "anthropic-ratelimit-requests-limit",
                    "x-ratelimit-limit",
                ]),
                remaining: first(&[
                    "x-ratelimit-remaining-requests",
                    "anthropic-ratelimit-requests-remaining",
                    "x-ratelimit-remaining",
                ]),
            },
            tokens: Quota {
                limit: first(&["x-ratelimit-limit-tokens", "anthropic-ratelimit-tokens-limit"]),
                remaining: first(&["x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-remaining"]),
            },
        }
    }

    /// The quotas with at least one value.
    pub fn reported(&self) -> impl Iterator<Item = (QuotaKind, Quota)> + '_ {
        [(QuotaKind::Requests, self.requests), (QuotaKind::Tokens, self.tokens)]
            .into_iter()
            .filter(|(_, q)| q.limit.is_some() || q.remaining.is_some())
    }
}

/// A non-negative integer header value (surrounding whitespace allowed).
fn number(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Usage from the configured response headers; `None` when none of them is present. A present
/// header that is not a count is ignored (and the caller counts the skip) — `Err` tells it so.
pub fn usage_from_headers(
    names: &UsageHeaders,
    header: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<Option<Usage>, &'static str> {
    let mut any = false;
    let mut read = |name: &Option<String>| -> Result<u64, &'static str> {
        let Some(value) = name.as_deref().and_then(&header) else { return Ok(0) };
        any = true;
        number(&value).filter(|&n| n <= crate::scan::usage::MAX_TOKENS).ok_or("not a plausible token count")
    };
    let input = read(&names.input)?;
    let output = read(&names.output)?;
    let cached_input = read(&names.cached_input)?;
    let reasoning = read(&names.reasoning)?;
    let cache_creation_input = read(&names.cache_creation_input)?;
    Ok(any.then_some(Usage {
        input,
        output,
        cached_input: cached_input.min(input),
        reasoning: reasoning.min(output),
        cache_creation_input: cache_creation_input.min(input),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn headers(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<Vec<u8>> {
        let map: HashMap<String, Vec<u8>> = pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn openai_anthropic_and_generic_families() {
        let openai = RateLimits::from_headers(headers(&[
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-remaining-requests", "4999"),
            ("x-ratelimit-limit-tokens", "2000000"),
            ("x-ratelimit-remaining-tokens", " 1999000 "),
            ("x-ratelimit-reset-requests", "12ms"),
        ]));
        assert_eq!(openai.requests, Quota { limit: Some(5000), remaining: Some(4999) });
        assert_eq!(openai.tokens, Quota { limit: Some(2_000_000), remaining: Some(1_999_000) });
        let anthropic = RateLimits::from_headers(headers(&[
            ("anthropic-ratelimit-requests-limit", "1000"),
            ("anthropic-ratelimit-requests-remaining", "999"),
            ("anthropic-ratelimit-tokens-remaining", "99000"),
        ]));
        assert_eq!(anthropic.requests, Quota { limit: Some(1000), remaining: Some(999) });
        assert_eq!(anthropic.tokens, Quota { limit: None, remaining: Some(99_000) });
        let generic = RateLimits::from_headers(headers(&[("x-ratelimit-limit", "60"), ("x-ratelimit-remaining", "0")]));
        assert_eq!(generic.requests, Quota { limit: Some(60), remaining: Some(0) });
        assert_eq!(generic.reported().count(), 1);
        let junk = RateLimits::from_headers(headers(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-limit", "1e3"),
        ]));
        assert_eq!(junk, RateLimits::default());
        assert_eq!(junk.reported().count(), 0);
    }

    #[test]
    fn usage_headers() {
        let names = UsageHeaders {
            input: Some("x-usage-input-tokens".into()),
            output: Some("x-usage-output-tokens".into()),
            cached_input: Some("x-usage-cached-tokens".into()),
            reasoning: None,
            cache_creation_input: None,
        };
        let got =
            usage_from_headers(&names, headers(&[("x-usage-input-tokens", "120"), ("x-usage-output-tokens", "30")]));
        assert_eq!(got, Ok(Some(Usage { input: 120, output: 30, ..Usage::default() })));
        let got =
            usage_from_headers(&names, headers(&[("x-usage-output-tokens", "7"), ("x-usage-cached-tokens", "99")]));
        assert_eq!(got, Ok(Some(Usage { output: 7, ..Usage::default() })), "cached is a subset of input");
        assert_eq!(usage_from_headers(&names, headers(&[])), Ok(None));
        assert!(usage_from_headers(&names, headers(&[("x-usage-input-tokens", "lots")])).is_err());
        for big in ["1000000001", "9223372036854775808", "18446744073709551615"] {
            assert!(usage_from_headers(&names, headers(&[("x-usage-input-tokens", big)])).is_err(), "{big}");
        }
        assert_eq!(usage_from_headers(&UsageHeaders::default(), headers(&[("x-usage-input-tokens", "1")])), Ok(None));
    }
}
