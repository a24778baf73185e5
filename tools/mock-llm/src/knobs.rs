//! The `x-mock-*` request headers (documented in the crate docs), validated once for every API.
//! A bad value is an `Err` whose message names the header; each API wraps it in its own 400.

use crate::encoding::Encoding;
use crate::http::Request;
use std::time::Duration;

/// Longest delay a header may ask for.
const MAX_DELAY_MS: u64 = 600_000;
/// Largest `x-mock-pad-bytes`.
pub const MAX_PAD_BYTES: u64 = 256 << 20;
/// Largest token count a header may script.
const MAX_TOKENS: u64 = u32::MAX as u64;
pub const MAX_DIMENSIONS: usize = 16_384;
pub const SLOW_DELAY: Duration = Duration::from_secs(5);
pub const SLOW_CHUNK_DELAY: Duration = Duration::from_millis(500);

/// `x-mock-scenario`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scenario {
    Ok,
    RateLimit,
    ServerError,
    Unavailable,
    Slow,
    ResetMidStream,
    NoUsage,
    Malformed,
}

impl Scenario {
    const NAMES: &'static str =
        "ok, rate_limit, server_error, unavailable, slow, reset_mid_stream, no_usage, malformed";

    fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "ok" => Scenario::Ok,
            "rate_limit" => Scenario::RateLimit,
            "server_error" => Scenario::ServerError,
            "unavailable" => Scenario::Unavailable,
            "slow" => Scenario::Slow,
            "reset_mid_stream" => Scenario::ResetMidStream,
            "no_usage" => Scenario::NoUsage,
            "malformed" => Scenario::Malformed,
            _ => return None,
        })
    }
}

/// `x-mock-ratelimit-style`: which rate-limit headers a 2xx answer carries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RateLimitStyle {
    /// The endpoint's own family: OpenAI's `x-ratelimit-*-requests`/`-tokens`, Anthropic's
    /// `anthropic-ratelimit-*`, none for Gemini.
    Provider,
    /// Only `x-ratelimit-limit` and `x-ratelimit-remaining` (the request numbers), on every API.
    Generic,
    /// No rate-limit headers.
    None,
}

/// `x-mock-ratelimit-*`: overrides of the 2xx rate-limit numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub style: RateLimitStyle,
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
}

/// `x-mock-responses-final`: how a Responses API answer ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResponsesFinal {
    Completed,
    Incomplete,
    Failed,
}

/// The `x-mock-*` request headers, validated.
#[derive(Debug)]
pub struct Knobs {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub cache_creation_tokens: u64,
    pub content: Option<String>,
    pub chunks: Option<usize>,
    pub delay: Duration,
    pub chunk_delay: Duration,
    pub split: Option<usize>,
    pub split_delay: Duration,
    pub dimensions: Option<usize>,
    pub scenario: Scenario,
    pub encoding: Option<Encoding>,
    /// `x-mock-brotli-lgwin`: the brotli window (log2) with `x-mock-encoding: br`.
    pub brotli_lgwin: Option<u32>,
    /// `x-mock-pad-bytes`: the assistant's text is padded with generated prose to this many
    /// bytes (non-streaming chat and completions).
    pub pad_bytes: Option<usize>,
    pub rate_limit: RateLimit,
    pub usage_in_headers: bool,
    /// `x-mock-anthropic-final-usage: full`: `message_delta` repeats the input and cache counts.
    pub anthropic_full_final_usage: bool,
    /// `x-mock-delta-input-tokens`: the `input_tokens` that a full `message_delta` reports.
    pub delta_input_tokens: Option<u64>,
    pub responses_final: ResponsesFinal,
    /// `x-mock-fail-model`: `(model, status)` pairs, matched against the model the request names.
    pub fail_models: Vec<(String, u16)>,
    /// `x-mock-fail-times` and `x-mock-fail-key`: the first n requests with this key fail.
    pub fail_times: Option<(u64, String)>,
    /// `x-mock-fail-status`: the status of those failures (default 503).
    pub fail_status: u16,
    /// `x-mock-retry-after`: the `retry-after` seconds of a scripted 429.
    pub retry_after: Option<u64>,
    /// `x-mock-fail-on`: the `--name`s of the mocks the scripted failures apply on (all if
    /// absent).
    pub fail_on: Option<Vec<String>>,
}

/// Statuses a scripted failure may answer with.
const FAIL_STATUSES: std::ops::RangeInclusive<u64> = 400..=599;
/// Longest `x-mock-fail-key`.
const MAX_FAIL_KEY: usize = 256;

/// `x-mock-fail-model: <model>=<status>[,<model>=<status>…]`.
fn fail_models(req: &Request) -> Result<Vec<(String, u16)>, String> {
    let Some(v) = req.header("x-mock-fail-model") else { return Ok(vec![]) };
    v.split(',')
        .map(|pair| {
            let bad = || {
                format!(
                    "mock-llm: header x-mock-fail-model: expected <model>=<status>[,<model>=<status>…] with a status \
                     from 400 to 599, got {pair:?}"
                )
            };
            let (model, status) = pair.trim().rsplit_once('=').ok_or_else(bad)?;
            let status = status.trim().parse::<u64>().ok().filter(|s| FAIL_STATUSES.contains(s)).ok_or_else(bad)?;
            let model = model.trim();
            if model.is_empty() {
                return Err(bad());
            }
            Ok((model.to_string(), status as u16))
        })
        .collect()
}

fn number(req: &Request, name: &str, min: u64, max: u64) -> Result<Option<u64>, String> {
    let Some(v) = req.header(name) else { return Ok(None) };
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(format!("mock-llm: header {name}: expected an integer from {min} to {max}, got {v:?}")),
    }
}

fn tokens(req: &Request, name: &str) -> Result<Option<u64>, String> {
    number(req, name, 0, MAX_TOKENS)
}

fn millis(req: &Request, name: &str) -> Result<Option<Duration>, String> {
    Ok(number(req, name, 0, MAX_DELAY_MS)?.map(Duration::from_millis))
}

/// A header whose value must be one of `choices` (matched exactly), or `None` when absent.
fn choice<T: Copy>(req: &Request, name: &str, choices: &[(&str, T)]) -> Result<Option<T>, String> {
    let Some(v) = req.header(name) else { return Ok(None) };
    match choices.iter().find(|(k, _)| *k == v) {
        Some((_, t)) => Ok(Some(*t)),
        None => {
            let names: Vec<&str> = choices.iter().map(|(k, _)| *k).collect();
            Err(format!("mock-llm: header {name}: unknown value {v:?}, expected one of {}", names.join(", ")))
        }
    }
}

impl Knobs {
    pub fn from(req: &Request) -> Result<Knobs, String> {
        let scenario = match req.header("x-mock-scenario") {
            None => Scenario::Ok,
            Some(s) => Scenario::parse(s).ok_or_else(|| {
                format!("mock-llm: header x-mock-scenario: unknown scenario {s:?}, expected one of {}", Scenario::NAMES)
            })?,
        };
        let slow = scenario == Scenario::Slow;
        let encoding = match req.header("x-mock-encoding") {
            None => None,
            Some(v) => Encoding::parse(v).map_err(|names| {
                format!("mock-llm: header x-mock-encoding: unknown encoding {v:?}, expected one of {names}")
            })?,
        };
        let windows = crate::encoding::BROTLI_WINDOWS;
        let brotli_lgwin = number(req, "x-mock-brotli-lgwin", u64::from(*windows.start()), u64::from(*windows.end()))?
            .map(|n| n as u32);
        if brotli_lgwin.is_some() && encoding != Some(Encoding::Brotli) {
            return Err("mock-llm: header x-mock-brotli-lgwin: only meaningful with x-mock-encoding: br".into());
        }
        let style = choice(
            req,
            "x-mock-ratelimit-style",
            &[
                ("provider", RateLimitStyle::Provider),
                ("generic", RateLimitStyle::Generic),
                ("none", RateLimitStyle::None),
            ],
        )?;
        let usage_in_headers =
            choice(req, "x-mock-usage-in-headers", &[("1", true), ("true", true), ("0", false), ("false", false)])?;
        let full = choice(req, "x-mock-anthropic-final-usage", &[("full", true), ("output", false)])?.unwrap_or(false);
        let delta_input_tokens = tokens(req, "x-mock-delta-input-tokens")?;
        if delta_input_tokens.is_some() && !full {
            return Err(
                "mock-llm: header x-mock-delta-input-tokens: only meaningful with x-mock-anthropic-final-usage: full"
                    .into(),
            );
        }
        let responses_final = choice(
            req,
            "x-mock-responses-final",
            &[
                ("completed", ResponsesFinal::Completed),
                ("incomplete", ResponsesFinal::Incomplete),
                ("failed", ResponsesFinal::Failed),
            ],
        )?;
        let fail_times = match (number(req, "x-mock-fail-times", 0, 1_000_000)?, req.header("x-mock-fail-key")) {
            (None, None) => None,
            (Some(n), Some(key)) if !key.is_empty() && key.len() <= MAX_FAIL_KEY => Some((n, key.to_string())),
            (Some(_), Some(_)) => {
                return Err(format!("mock-llm: header x-mock-fail-key: expected 1 to {MAX_FAIL_KEY} bytes"));
            }
            (Some(_), None) => return Err("mock-llm: header x-mock-fail-times: needs x-mock-fail-key".into()),
            (None, Some(_)) => {
                return Err("mock-llm: header x-mock-fail-key: only meaningful with x-mock-fail-times".into())
            }
        };
        let fail_status = number(req, "x-mock-fail-status", *FAIL_STATUSES.start(), *FAIL_STATUSES.end())?;
        if fail_status.is_some() && fail_times.is_none() {
            return Err("mock-llm: header x-mock-fail-status: only meaningful with x-mock-fail-times".into());
        }
        let fail_on = req
            .header("x-mock-fail-on")
            .map(|v| v.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect::<Vec<_>>());
        if fail_on.as_ref().is_some_and(Vec::is_empty) {
            return Err("mock-llm: header x-mock-fail-on: expected <name>[,<name>…]".into());
        }
        if fail_on.is_some() && fail_times.is_none() && req.header("x-mock-fail-model").is_none() {
            return Err(
                "mock-llm: header x-mock-fail-on: only meaningful with x-mock-fail-model or x-mock-fail-times".into()
            );
        }
        Ok(Knobs {
            prompt_tokens: tokens(req, "x-mock-prompt-tokens")?,
            completion_tokens: tokens(req, "x-mock-completion-tokens")?,
            cached_tokens: tokens(req, "x-mock-cached-tokens")?.unwrap_or(0),
            reasoning_tokens: tokens(req, "x-mock-reasoning-tokens")?.unwrap_or(0),
            cache_creation_tokens: tokens(req, "x-mock-cache-creation-tokens")?.unwrap_or(0),
            content: req.header("x-mock-content").map(str::to_string),
            chunks: number(req, "x-mock-chunks", 1, 100_000)?.map(|n| n as usize),
            delay: millis(req, "x-mock-delay-ms")?.unwrap_or(if slow { SLOW_DELAY } else { Duration::ZERO }),
            chunk_delay: millis(req, "x-mock-chunk-delay-ms")?.unwrap_or(if slow {
                SLOW_CHUNK_DELAY
            } else {
                Duration::ZERO
            }),
            split: number(req, "x-mock-split", 1, 1 << 30)?.map(|n| n as usize),
            split_delay: millis(req, "x-mock-split-delay-ms")?.unwrap_or(Duration::from_millis(2)),
            dimensions: number(req, "x-mock-dimensions", 1, MAX_DIMENSIONS as u64)?.map(|n| n as usize),
            scenario,
            encoding,
            brotli_lgwin,
            pad_bytes: number(req, "x-mock-pad-bytes", 0, MAX_PAD_BYTES)?.map(|n| n as usize),
            rate_limit: RateLimit {
                style: style.unwrap_or(RateLimitStyle::Provider),
                limit_requests: number(req, "x-mock-ratelimit-limit-requests", 0, u64::MAX)?,
                remaining_requests: number(req, "x-mock-ratelimit-remaining-requests", 0, u64::MAX)?,
                limit_tokens: number(req, "x-mock-ratelimit-limit-tokens", 0, u64::MAX)?,
                remaining_tokens: number(req, "x-mock-ratelimit-remaining-tokens", 0, u64::MAX)?,
            },
            usage_in_headers: usage_in_headers.unwrap_or(false),
            anthropic_full_final_usage: full,
            delta_input_tokens,
            responses_final: responses_final.unwrap_or(ResponsesFinal::Completed),
            fail_models: fail_models(req)?,
            fail_times,
            fail_status: fail_status.map_or(503, |s| s as u16),
            retry_after: number(req, "x-mock-retry-after", 0, 86_400)?,
            fail_on,
        })
    }

    /// The brotli window (log2) to compress with.
    pub fn lgwin(&self) -> u32 {
        self.brotli_lgwin.unwrap_or(crate::encoding::BROTLI_WINDOW)
    }

    /// Whether the body reports usage: not with `no_usage`, nor when it goes in headers instead.
    pub fn usage_in_body(&self) -> bool {
        self.scenario != Scenario::NoUsage && !self.usage_in_headers
    }

    /// Checks that the scripted cached tokens fit in the prompt, for the APIs whose prompt count
    /// includes them (all but Anthropic).
    pub fn check_cached(&self, prompt: u64) -> Result<(), String> {
        if self.cached_tokens > prompt {
            return Err(format!(
                "mock-llm: header x-mock-cached-tokens: {} exceeds the {prompt} prompt tokens",
                self.cached_tokens
            ));
        }
        Ok(())
    }

    /// Checks that the scripted reasoning tokens fit in the completion, for the APIs whose
    /// completion count includes them (OpenAI's).
    pub fn check_reasoning(&self, completion: u64) -> Result<(), String> {
        if self.reasoning_tokens > completion {
            return Err(format!(
                "mock-llm: header x-mock-reasoning-tokens: {} exceeds the {completion} completion tokens",
                self.reasoning_tokens
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(headers: &[(&str, &str)]) -> Result<Knobs, String> {
        Knobs::from(&Request {
            method: "POST".into(),
            path: "/".into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: vec![],
            keep_alive: true,
        })
    }

    #[test]
    fn defaults() {
        let k = knobs(&[]).unwrap();
        assert_eq!(k.scenario, Scenario::Ok);
        assert_eq!((k.cached_tokens, k.reasoning_tokens, k.cache_creation_tokens), (0, 0, 0));
        assert_eq!(k.encoding, None);
        assert_eq!(k.rate_limit.style, RateLimitStyle::Provider);
        assert!(!k.usage_in_headers && !k.anthropic_full_final_usage && k.usage_in_body());
        assert_eq!(k.responses_final, ResponsesFinal::Completed);
        assert_eq!((k.brotli_lgwin, k.lgwin(), k.pad_bytes), (None, 22, None));
    }

    #[test]
    fn storm_headers_parse() {
        let k = knobs(&[("x-mock-encoding", "br"), ("x-mock-brotli-lgwin", "24"), ("x-mock-pad-bytes", "20000000")])
            .unwrap();
        assert_eq!((k.brotli_lgwin, k.lgwin(), k.pad_bytes), (Some(24), 24, Some(20_000_000)));
        assert_eq!(knobs(&[("x-mock-encoding", "br"), ("x-mock-brotli-lgwin", "10")]).unwrap().lgwin(), 10);
        for bad in [
            &[("x-mock-encoding", "br"), ("x-mock-brotli-lgwin", "25")][..],
            &[("x-mock-encoding", "br"), ("x-mock-brotli-lgwin", "9")],
            &[("x-mock-encoding", "gzip"), ("x-mock-brotli-lgwin", "24")],
            &[("x-mock-brotli-lgwin", "24")],
        ] {
            assert!(knobs(bad).unwrap_err().contains("x-mock-brotli-lgwin"), "{bad:?}");
        }
        assert!(knobs(&[("x-mock-pad-bytes", "268435457")]).unwrap_err().contains("x-mock-pad-bytes"));
        assert!(knobs(&[("x-mock-pad-bytes", "-1")]).unwrap_err().contains("x-mock-pad-bytes"));
    }

    #[test]
    fn new_headers_parse() {
        let k = knobs(&[
            ("x-mock-cache-creation-tokens", "40"),
            ("x-mock-encoding", "br"),
            ("x-mock-ratelimit-style", "generic"),
            ("x-mock-ratelimit-remaining-tokens", "7"),
            ("x-mock-usage-in-headers", "1"),
            ("x-mock-anthropic-final-usage", "full"),
            ("x-mock-delta-input-tokens", "9"),
            ("x-mock-responses-final", "failed"),
        ])
        .unwrap();
        assert_eq!(k.cache_creation_tokens, 40);
        assert_eq!(k.encoding, Some(Encoding::Brotli));
        assert_eq!((k.rate_limit.style, k.rate_limit.remaining_tokens), (RateLimitStyle::Generic, Some(7)));
        assert!(k.usage_in_headers && !k.usage_in_body());
        assert_eq!((k.anthropic_full_final_usage, k.delta_input_tokens), (true, Some(9)));
        assert_eq!(k.responses_final, ResponsesFinal::Failed);
    }

    #[test]
    fn failure_headers_parse() {
        let k = knobs(&[]).unwrap();
        assert!(k.fail_models.is_empty() && k.fail_times.is_none() && k.retry_after.is_none());
        assert_eq!(k.fail_status, 503);
        let k = knobs(&[
            ("x-mock-fail-model", "gpt-4o=503, claude-sonnet-4=429 ,models/x:y=500"),
            ("x-mock-fail-times", "2"),
            ("x-mock-fail-key", "test-1"),
            ("x-mock-fail-status", "429"),
            ("x-mock-retry-after", "3"),
        ])
        .unwrap();
        let want = [("gpt-4o", 503), ("claude-sonnet-4", 429), ("models/x:y", 500)];
        assert_eq!(k.fail_models, want.map(|(m, s)| (m.to_string(), s)));
        assert_eq!((k.fail_times, k.fail_status, k.retry_after), (Some((2, "test-1".into())), 429, Some(3)));
        assert_eq!(k.fail_on, None);
        let k = knobs(&[("x-mock-fail-model", "m=503"), ("x-mock-fail-on", "primary, eu-1")]).unwrap();
        assert_eq!(k.fail_on, Some(vec!["primary".to_string(), "eu-1".to_string()]));
        for bad in [
            &[("x-mock-fail-model", "gpt-4o")][..],
            &[("x-mock-fail-model", "gpt-4o=200")],
            &[("x-mock-fail-model", "gpt-4o=600")],
            &[("x-mock-fail-model", "=503")],
            &[("x-mock-fail-model", "a=503,")],
            &[("x-mock-fail-model", "a=x")],
        ] {
            assert!(knobs(bad).unwrap_err().contains("x-mock-fail-model"), "{bad:?}");
        }
        for (bad, name) in [
            (&[("x-mock-fail-times", "1")][..], "x-mock-fail-times"),
            (&[("x-mock-fail-times", "x"), ("x-mock-fail-key", "k")], "x-mock-fail-times"),
            (&[("x-mock-fail-key", "k")], "x-mock-fail-key"),
            (&[("x-mock-fail-times", "1"), ("x-mock-fail-key", "")], "x-mock-fail-key"),
            (&[("x-mock-fail-status", "503")], "x-mock-fail-status"),
            (
                &[("x-mock-fail-times", "1"), ("x-mock-fail-key", "k"), ("x-mock-fail-status", "302")],
                "x-mock-fail-status",
            ),
            (&[("x-mock-retry-after", "soon")], "x-mock-retry-after"),
            (&[("x-mock-fail-on", "primary")], "x-mock-fail-on"),
            (&[("x-mock-fail-model", "m=503"), ("x-mock-fail-on", " , ")], "x-mock-fail-on"),
        ] {
            assert!(knobs(bad).unwrap_err().contains(name), "{bad:?}");
        }
    }

    #[test]
    fn bad_values_name_the_header() {
        for (name, value) in [
            ("x-mock-encoding", "zstd"),
            ("x-mock-ratelimit-style", "fancy"),
            ("x-mock-ratelimit-limit-requests", "-1"),
            ("x-mock-usage-in-headers", "yes"),
            ("x-mock-anthropic-final-usage", "all"),
            ("x-mock-responses-final", "done"),
            ("x-mock-cache-creation-tokens", "many"),
            ("x-mock-delta-input-tokens", "5"),
        ] {
            let err = knobs(&[(name, value)]).unwrap_err();
            assert!(err.contains(name), "{name}: {err}");
        }
    }
}
