//! Token usage as reported by LLM APIs, normalised to one shape.
//!
//! Semantics (documented in docs/metrics.md): `input` includes cached input tokens and `output`
//! includes reasoning tokens, as OpenAI reports them; `cached_input`, `cache_creation_input` and
//! `reasoning` are subsets. Providers with other conventions are converted to these when parsed:
//! Anthropic's `input_tokens` excludes both cache counts, so they are added back; Gemini's
//! `candidatesTokenCount` excludes thoughts, so they are added to output.
//!
//! Counts are bounded by [`MAX_TOKENS`]: a count above it is not a real request's, and is
//! rejected ([`UsageError::Implausible`], counted as `usage_invalid`) rather than added to
//! counters, budgets and reports where one bad upstream body would spoil them for good.

use serde_json::{Map, Value};

/// The largest token count one request may report, per field and after normalisation (input
/// with cache counts added, output with thoughts added): 10⁹ tokens, a hundred times the
/// largest context window offered today. Under it every derived sum fits where it goes:
/// `input + output` ≤ 2·10⁹ fits the rate limit protocol's `uint32` `hits_addend`, a cost
/// (≤ 2·10⁹ tokens × the highest price the configuration accepts) fits `u64` pico-USD, and a
/// counter increment fits Envoy's `i64`.
pub const MAX_TOKENS: u64 = 1_000_000_000;

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub input: u64,
    /// Generated tokens, reasoning ones included.
    pub output: u64,
    /// Prompt tokens served from the provider's prompt cache (subset of `input`).
    pub cached_input: u64,
    /// Reasoning tokens (subset of `output`).
    pub reasoning: u64,
    /// Prompt tokens written to the provider's prompt cache (subset of `input`; Anthropic).
    pub cache_creation_input: u64,
}

impl Usage {
    /// True when every count is within [`MAX_TOKENS`].
    pub fn is_plausible(&self) -> bool {
        [self.input, self.output, self.cached_input, self.reasoning, self.cache_creation_input]
            .iter()
            .all(|&n| n <= MAX_TOKENS)
    }

    /// `self` if [`Usage::is_plausible`], else [`UsageError::Implausible`].
    pub fn checked(self) -> Result<Usage, UsageError> {
        if self.is_plausible() {
            Ok(self)
        } else {
            Err(UsageError::Implausible)
        }
    }
}

/// Why a usage object was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// Not valid JSON.
    Syntax,
    /// JSON, but not an object (and not null).
    NotAnObject,
    /// An object without any of the expected token fields.
    NoTokenFields,
    /// A token field that is not a non-negative integer (float, negative, string, > u64::MAX).
    BadNumber(&'static str),
    /// Counts beyond [`MAX_TOKENS`], no real request's.
    Implausible,
}

/// Which API's usage object is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageFormat {
    /// OpenAI chat/completions, legacy completions and embeddings: `prompt_tokens`,
    /// `completion_tokens`, `prompt_tokens_details.cached_tokens`,
    /// `completion_tokens_details.reasoning_tokens`.
    OpenAiChat,
    /// OpenAI Responses API: `input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`,
    /// `output_tokens_details.reasoning_tokens`.
    OpenAiResponses,
    /// Anthropic Messages: `input_tokens`, `output_tokens`, `cache_creation_input_tokens`,
    /// `cache_read_input_tokens`; streams report them in parts (see [`AnthropicUsage`]).
    Anthropic,
    /// Gemini `usageMetadata`: `promptTokenCount`, `candidatesTokenCount`, `thoughtsTokenCount`,
    /// `cachedContentTokenCount`, `toolUsePromptTokenCount`, `totalTokenCount`.
    Gemini,
}

/// Anthropic usage as reported so far: `message_start` carries input and cache counts (and an
/// output count of 1), `message_delta` the final output count and, in newer API versions, the
/// input and cache counts again. Fields present later override earlier ones.
///
/// With server-side compaction the top-level counts cover only the last sampling step; every
/// step (the `compaction` that read the whole conversation, then the `message`) is listed in
/// `usage.iterations[]`, and all of them are billed and rate-limited. When `iterations` is
/// present, the usage is its sum per token type (a later `iterations` replaces an earlier one,
/// like any field).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnthropicUsage {
    input: Option<u64>,
    output: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    /// The sum over `iterations[]`, when the object had that array.
    iterations: Option<AnthropicCounts>,
}

/// Anthropic's four token counts (an iteration's, or their sum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct AnthropicCounts {
    input: u64,
    output: u64,
    cache_creation: u64,
    cache_read: u64,
}

impl AnthropicUsage {
    /// Takes every field `later` reports.
    pub fn merge(&mut self, later: AnthropicUsage) {
        self.input = later.input.or(self.input);
        self.output = later.output.or(self.output);
        self.cache_creation = later.cache_creation.or(self.cache_creation);
        self.cache_read = later.cache_read.or(self.cache_read);
        self.iterations = later.iterations.or(self.iterations);
    }

    /// In OpenAI terms: input includes both cache counts.
    pub fn to_usage(self) -> Usage {
        let c = self.iterations.unwrap_or(AnthropicCounts {
            input: self.input.unwrap_or(0),
            output: self.output.unwrap_or(0),
            cache_creation: self.cache_creation.unwrap_or(0),
            cache_read: self.cache_read.unwrap_or(0),
        });
        Usage {
            input: c.input.saturating_add(c.cache_read).saturating_add(c.cache_creation),
            output: c.output,
            cached_input: c.cache_read,
            reasoning: 0,
            cache_creation_input: c.cache_creation,
        }
    }
}

/// Parses an Anthropic usage object (`null` gives `Ok(None)`).
pub fn parse_anthropic(raw: &[u8]) -> Result<Option<AnthropicUsage>, UsageError> {
    let Some(obj) = object(raw)? else { return Ok(None) };
    let u = AnthropicUsage {
        input: field(&obj, "input_tokens")?,
        output: field(&obj, "output_tokens")?,
        cache_creation: field(&obj, "cache_creation_input_tokens")?,
        cache_read: field(&obj, "cache_read_input_tokens")?,
        iterations: iterations(&obj)?,
    };
    if u == AnthropicUsage::default() {
        return Err(UsageError::NoTokenFields);
    }
    Ok(Some(u))
}

/// The sum of `usage.iterations[]` per token type; `None` without the array. An entry that is
/// not an object, or a count in it that is not a plausible token count, rejects the usage.
fn iterations(obj: &Map<String, Value>) -> Result<Option<AnthropicCounts>, UsageError> {
    let entries = match obj.get("iterations") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(UsageError::BadNumber("iterations")),
    };
    let mut sum = AnthropicCounts::default();
    for entry in entries {
        let Value::Object(e) = entry else { return Err(UsageError::BadNumber("iterations")) };
        let add = |total: &mut u64, name: &'static str| -> Result<(), UsageError> {
            // Each part is at most MAX_TOKENS, so a sum of fewer than 2^30 parts cannot wrap;
            // saturating keeps it above the bound (and so rejected) whatever the count.
            *total = total.saturating_add(field(e, name)?.unwrap_or(0));
            Ok(())
        };
        add(&mut sum.input, "input_tokens")?;
        add(&mut sum.output, "output_tokens")?;
        add(&mut sum.cache_creation, "cache_creation_input_tokens")?;
        add(&mut sum.cache_read, "cache_read_input_tokens")?;
    }
    Ok(Some(sum))
}

fn object(raw: &[u8]) -> Result<Option<Map<String, Value>>, UsageError> {
    match serde_json::from_slice(raw).map_err(|_| UsageError::Syntax)? {
        Value::Null => Ok(None),
        Value::Object(o) => Ok(Some(o)),
        _ => Err(UsageError::NotAnObject),
    }
}

/// Parses the raw JSON of a usage object. `Ok(None)` for `null` (OpenAI streams send
/// `"usage":null` in every chunk but the last).
pub fn parse_usage(format: UsageFormat, raw: &[u8]) -> Result<Option<Usage>, UsageError> {
    parse_unchecked(format, raw)?.map(Usage::checked).transpose()
}

fn parse_unchecked(format: UsageFormat, raw: &[u8]) -> Result<Option<Usage>, UsageError> {
    if format == UsageFormat::Anthropic {
        return Ok(parse_anthropic(raw)?.map(AnthropicUsage::to_usage));
    }
    let Some(obj) = object(raw)? else { return Ok(None) };
    match format {
        UsageFormat::Anthropic => Err(UsageError::NotAnObject),
        UsageFormat::OpenAiResponses => {
            let input = field(&obj, "input_tokens")?;
            let output = field(&obj, "output_tokens")?;
            if input.is_none() && output.is_none() {
                return Err(UsageError::NoTokenFields);
            }
            let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
            let cached = nested(&obj, "input_tokens_details", "cached_tokens")?;
            let reasoning = nested(&obj, "output_tokens_details", "reasoning_tokens")?;
            Ok(Some(Usage {
                input,
                output,
                cached_input: cached.min(input),
                reasoning: reasoning.min(output),
                cache_creation_input: 0,
            }))
        }
        UsageFormat::Gemini => {
            let prompt = field(&obj, "promptTokenCount")?;
            let candidates = field(&obj, "candidatesTokenCount")?;
            let thoughts = field(&obj, "thoughtsTokenCount")?;
            let total = field(&obj, "totalTokenCount")?;
            if prompt.is_none() && candidates.is_none() && thoughts.is_none() && total.is_none() {
                return Err(UsageError::NoTokenFields);
            }
            let tool_prompt = field(&obj, "toolUsePromptTokenCount")?.unwrap_or(0);
            let input = prompt.unwrap_or(0).saturating_add(tool_prompt);
            let thoughts = thoughts.unwrap_or(0);
            let output = candidates.unwrap_or(0).saturating_add(thoughts);
            let cached = field(&obj, "cachedContentTokenCount")?.unwrap_or(0);
            Ok(Some(Usage {
                input,
                output,
                cached_input: cached.min(input),
                reasoning: thoughts,
                cache_creation_input: 0,
            }))
        }
        UsageFormat::OpenAiChat => {
            let input = field(&obj, "prompt_tokens")?;
            let output = field(&obj, "completion_tokens")?;
            let total = field(&obj, "total_tokens")?;
            if input.is_none() && output.is_none() && total.is_none() {
                return Err(UsageError::NoTokenFields);
            }
            let cached = nested(&obj, "prompt_tokens_details", "cached_tokens")?;
            let reasoning = nested(&obj, "completion_tokens_details", "reasoning_tokens")?;
            let input = input.unwrap_or(0);
            // Embeddings report only prompt and total; a total without parts is all input.
            let output = output.unwrap_or_else(|| total.unwrap_or(input).saturating_sub(input));
            Ok(Some(Usage {
                input,
                output,
                cached_input: cached.min(input),
                reasoning: reasoning.min(output),
                cache_creation_input: 0,
            }))
        }
    }
}

/// A token count field: absent or null is `None`; anything but a non-negative integer is an
/// error, and so is a count above [`MAX_TOKENS`].
fn field(obj: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, UsageError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) if n <= MAX_TOKENS => Ok(Some(n)),
            Some(_) => Err(UsageError::Implausible),
            None => Err(UsageError::BadNumber(name)),
        },
        Some(_) => Err(UsageError::BadNumber(name)),
    }
}

fn nested(obj: &Map<String, Value>, outer: &'static str, inner: &'static str) -> Result<u64, UsageError> {
    match obj.get(outer) {
        Some(Value::Object(o)) => Ok(field(o, inner)?.unwrap_or(0)),
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn chat(raw: &str) -> Result<Option<Usage>, UsageError> {
        parse_usage(UsageFormat::OpenAiChat, raw.as_bytes())
    }

    #[test]
    fn chat_usage_with_details() {
        let u = chat(
            r#"{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,
               "prompt_tokens_details":{"cached_tokens":100,"audio_tokens":0},
               "completion_tokens_details":{"reasoning_tokens":25,"audio_tokens":0}}"#,
        );
        assert_eq!(
            u,
            Ok(Some(Usage { input: 120, output: 40, cached_input: 100, reasoning: 25, cache_creation_input: 0 }))
        );
    }

    #[test]
    fn embeddings_usage_and_null() {
        assert_eq!(chat(r#"{"prompt_tokens":8,"total_tokens":8}"#), Ok(Some(Usage { input: 8, ..Usage::default() })));
        assert_eq!(chat("null"), Ok(None));
        assert_eq!(
            chat(r#"{"prompt_tokens":5,"completion_tokens":null,"total_tokens":9}"#).map(|u| u.map(|u| u.output)),
            Ok(Some(4))
        );
    }

    #[test]
    fn rejects_bad_numbers_and_shapes() {
        assert_eq!(chat(r#"{"prompt_tokens":-1}"#), Err(UsageError::BadNumber("prompt_tokens")));
        assert_eq!(chat(r#"{"prompt_tokens":1.5}"#), Err(UsageError::BadNumber("prompt_tokens")));
        assert_eq!(chat(r#"{"prompt_tokens":"3"}"#), Err(UsageError::BadNumber("prompt_tokens")));
        assert_eq!(chat(r#"{"prompt_tokens":18446744073709551616}"#), Err(UsageError::BadNumber("prompt_tokens")));
        assert_eq!(chat(r#"{}"#), Err(UsageError::NoTokenFields));
        assert_eq!(chat(r#"[1]"#), Err(UsageError::NotAnObject));
        assert_eq!(chat(r#"{"prompt_tokens":1"#), Err(UsageError::Syntax));
    }

    #[test]
    fn subsets_never_exceed_their_totals() {
        let u = chat(
            r#"{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":50},"completion_tokens_details":{"reasoning_tokens":9}}"#,
        );
        assert_eq!(
            u,
            Ok(Some(Usage { input: 10, output: 5, cached_input: 10, reasoning: 5, cache_creation_input: 0 }))
        );
    }

    #[test]
    fn responses_usage() {
        let u = parse_usage(
            UsageFormat::OpenAiResponses,
            br#"{"input_tokens":328,"input_tokens_details":{"cached_tokens":128},"output_tokens":52,
                "output_tokens_details":{"reasoning_tokens":20},"total_tokens":380}"#,
        );
        assert_eq!(
            u,
            Ok(Some(Usage { input: 328, output: 52, cached_input: 128, reasoning: 20, cache_creation_input: 0 }))
        );
        assert_eq!(parse_usage(UsageFormat::OpenAiResponses, b"null"), Ok(None));
        assert_eq!(parse_usage(UsageFormat::OpenAiResponses, b"{}"), Err(UsageError::NoTokenFields));
    }

    #[test]
    fn anthropic_usage_adds_cache_counts_to_input_and_later_fields_override() {
        let start = parse_anthropic(
            br#"{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":1}"#,
        )
        .unwrap()
        .unwrap();
        let mut u = start;
        u.merge(parse_anthropic(br#"{"output_tokens":150}"#).unwrap().unwrap());
        assert_eq!(
            u.to_usage(),
            Usage { input: 2125, output: 150, cached_input: 2000, reasoning: 0, cache_creation_input: 100 }
        );
        // A final usage that repeats the input counts overrides them.
        u.merge(
            parse_anthropic(br#"{"input_tokens":30,"cache_read_input_tokens":0,"output_tokens":151}"#)
                .unwrap()
                .unwrap(),
        );
        assert_eq!(
            u.to_usage(),
            Usage { input: 130, output: 151, cached_input: 0, reasoning: 0, cache_creation_input: 100 }
        );
        assert_eq!(parse_anthropic(b"null"), Ok(None));
        assert_eq!(parse_anthropic(br#"{"service_tier":"standard"}"#), Err(UsageError::NoTokenFields));
        assert_eq!(parse_anthropic(br#"{"input_tokens":-3}"#), Err(UsageError::BadNumber("input_tokens")));
    }

    #[test]
    fn gemini_usage_counts_thoughts_as_output() {
        let u = parse_usage(
            UsageFormat::Gemini,
            br#"{"promptTokenCount":1000,"candidatesTokenCount":200,"thoughtsTokenCount":300,
                "cachedContentTokenCount":600,"totalTokenCount":1500,
                "promptTokensDetails":[{"modality":"TEXT","tokenCount":1000}]}"#,
        );
        assert_eq!(
            u,
            Ok(Some(Usage { input: 1000, output: 500, cached_input: 600, reasoning: 300, cache_creation_input: 0 }))
        );
        let u = parse_usage(UsageFormat::Gemini, br#"{"promptTokenCount":7,"totalTokenCount":7}"#);
        assert_eq!(u, Ok(Some(Usage { input: 7, ..Usage::default() })));
        assert_eq!(parse_usage(UsageFormat::Gemini, br#"{"promptTokensDetails":[]}"#), Err(UsageError::NoTokenFields));
    }
}
