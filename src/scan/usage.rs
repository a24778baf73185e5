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

use crate::scan::flat_json::{self, Path, Slot};
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

/// The fields each format reads; a nested path is a count inside the object under its key.
const CHAT: &[Path] = &[
    ("prompt_tokens", None),
    ("completion_tokens", None),
    ("total_tokens", None),
    ("prompt_tokens_details", Some("cached_tokens")),
    ("completion_tokens_details", Some("reasoning_tokens")),
];
const RESPONSES: &[Path] = &[
    ("input_tokens", None),
    ("output_tokens", None),
    ("input_tokens_details", Some("cached_tokens")),
    ("output_tokens_details", Some("reasoning_tokens")),
];
const ANTHROPIC: &[Path] = &[
    ("input_tokens", None),
    ("output_tokens", None),
    ("cache_creation_input_tokens", None),
    ("cache_read_input_tokens", None),
];
const GEMINI: &[Path] = &[
    ("promptTokenCount", None),
    ("candidatesTokenCount", None),
    ("thoughtsTokenCount", None),
    ("totalTokenCount", None),
    ("toolUsePromptTokenCount", None),
    ("cachedContentTokenCount", None),
];

/// The most paths a format reads.
const MAX_PATHS: usize = 6;
// A path beyond `MAX_PATHS` would read as absent: the build fails instead.
const _: () = assert!(
    CHAT.len() <= MAX_PATHS
        && RESPONSES.len() <= MAX_PATHS
        && ANTHROPIC.len() <= MAX_PATHS
        && GEMINI.len() <= MAX_PATHS
);

/// What a usage object holds at the paths its format reads.
struct Fields {
    paths: &'static [Path],
    slots: [Slot; MAX_PATHS],
    /// Anthropic's `iterations[]` summed (see [`AnthropicUsage`]): read only when the object
    /// has the key, and only then is an error in it reported (after the counts', as before).
    iterations: Result<Option<AnthropicCounts>, UsageError>,
}

impl Fields {
    /// Reads `raw`: `Ok(None)` for `null`. A plain object is read by [`flat_json::read`]
    /// without building it; anything else (and an object with `iterations`) by `serde_json`.
    /// `Reader::Serde` skips the flat reader (the reference it is tested against).
    fn read(raw: &[u8], paths: &'static [Path], reader: Reader) -> Result<Option<Fields>, UsageError> {
        let mut slots = [Slot::Absent; MAX_PATHS];
        if reader == Reader::Flat {
            match flat_json::read(raw, paths, &["iterations"], &mut slots) {
                Some(false) => return Ok(None),
                Some(true) => return Ok(Some(Fields { paths, slots, iterations: Ok(None) })),
                None => {}
            }
        }
        let obj = match serde_json::from_slice(raw).map_err(|_| UsageError::Syntax)? {
            Value::Null => return Ok(None),
            Value::Object(o) => o,
            _ => return Err(UsageError::NotAnObject),
        };
        for (slot, &(outer, inner)) in slots.iter_mut().zip(paths) {
            *slot = match (obj.get(outer), inner) {
                (value, None) => slot_of(value),
                (Some(Value::Object(o)), Some(inner)) => slot_of(o.get(inner)),
                (_, Some(_)) => Slot::Absent,
            };
        }
        Ok(Some(Fields { paths, slots, iterations: iterations(&obj) }))
    }

    fn slot(&self, path: Path) -> Slot {
        let i = self.paths.iter().position(|&p| p == path);
        debug_assert!(i.is_some(), "{path:?} is not in its format's paths");
        i.and_then(|i| self.slots.get(i)).copied().unwrap_or_default()
    }
}

fn slot_of(value: Option<&Value>) -> Slot {
    match value {
        None => Slot::Absent,
        Some(Value::Null) => Slot::Null,
        Some(Value::Number(n)) => n.as_u64().map_or(Slot::Other, Slot::Count),
        Some(_) => Slot::Other,
    }
}

/// How a usage object is read: [`flat_json`] first, or `serde_json` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    Flat,
    Serde,
}

/// Parses an Anthropic usage object (`null` gives `Ok(None)`).
pub fn parse_anthropic(raw: &[u8]) -> Result<Option<AnthropicUsage>, UsageError> {
    anthropic_with(raw, Reader::Flat)
}

fn anthropic_with(raw: &[u8], reader: Reader) -> Result<Option<AnthropicUsage>, UsageError> {
    let Some(obj) = Fields::read(raw, ANTHROPIC, reader)? else { return Ok(None) };
    let u = AnthropicUsage {
        input: field(&obj, "input_tokens")?,
        output: field(&obj, "output_tokens")?,
        cache_creation: field(&obj, "cache_creation_input_tokens")?,
        cache_read: field(&obj, "cache_read_input_tokens")?,
        iterations: obj.iterations?,
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
            *total = total.saturating_add(count(slot_of(e.get(name)), name)?.unwrap_or(0));
            Ok(())
        };
        add(&mut sum.input, "input_tokens")?;
        add(&mut sum.output, "output_tokens")?;
        add(&mut sum.cache_creation, "cache_creation_input_tokens")?;
        add(&mut sum.cache_read, "cache_read_input_tokens")?;
    }
    Ok(Some(sum))
}

/// Parses the raw JSON of a usage object. `Ok(None)` for `null` (OpenAI streams send
/// `"usage":null` in every chunk but the last).
pub fn parse_usage(format: UsageFormat, raw: &[u8]) -> Result<Option<Usage>, UsageError> {
    parse_unchecked(format, raw, Reader::Flat)?.map(Usage::checked).transpose()
}

/// [`parse_usage`] decoded by `serde_json` alone: the reference the allocation-free reader is
/// held to (the tests and the `usage` fuzz target).
pub fn parse_usage_with_serde(format: UsageFormat, raw: &[u8]) -> Result<Option<Usage>, UsageError> {
    parse_unchecked(format, raw, Reader::Serde)?.map(Usage::checked).transpose()
}

/// [`parse_anthropic`] decoded by `serde_json` alone (see [`parse_usage_with_serde`]).
pub fn parse_anthropic_with_serde(raw: &[u8]) -> Result<Option<AnthropicUsage>, UsageError> {
    anthropic_with(raw, Reader::Serde)
}

fn parse_unchecked(format: UsageFormat, raw: &[u8], reader: Reader) -> Result<Option<Usage>, UsageError> {
    let paths = match format {
        UsageFormat::Anthropic => return Ok(anthropic_with(raw, reader)?.map(AnthropicUsage::to_usage)),
        UsageFormat::OpenAiChat => CHAT,
        UsageFormat::OpenAiResponses => RESPONSES,
        UsageFormat::Gemini => GEMINI,
    };
    let Some(obj) = Fields::read(raw, paths, reader)? else { return Ok(None) };
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

/// A token count: absent or null is `None`; anything but a non-negative integer is an error,
/// and so is a count above [`MAX_TOKENS`].
fn count(slot: Slot, name: &'static str) -> Result<Option<u64>, UsageError> {
    match slot {
        Slot::Absent | Slot::Null => Ok(None),
        Slot::Count(n) if n <= MAX_TOKENS => Ok(Some(n)),
        Slot::Count(_) => Err(UsageError::Implausible),
        Slot::Other => Err(UsageError::BadNumber(name)),
    }
}

/// A top-level token count field.
fn field(obj: &Fields, name: &'static str) -> Result<Option<u64>, UsageError> {
    count(obj.slot((name, None)), name)
}

/// A count inside the object under `outer`; 0 when `outer` is not an object.
fn nested(obj: &Fields, outer: &'static str, inner: &'static str) -> Result<u64, UsageError> {
    Ok(count(obj.slot((outer, Some(inner))), inner)?.unwrap_or(0))
}

#[cfg(test)]
mod tests {
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

    /// The allocation-free reader and serde_json give the same result, error included, for
    /// every format, on random usage objects: plain ones (the reader's), and ones with what it
    /// leaves to serde_json (escapes, fractions, negatives, big numbers, `iterations`, repeated
    /// keys, deep nesting, syntax errors).
    #[test]
    fn the_flat_reader_agrees_with_serde_json() {
        use crate::scan::flat_json;
        use crate::scan::test_rng::Rng;

        const KEYS: &[&str] = &[
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "prompt_tokens_details",
            "completion_tokens_details",
            "cached_tokens",
            "reasoning_tokens",
            "input_tokens",
            "output_tokens",
            "input_tokens_details",
            "output_tokens_details",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "iterations",
            "promptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "totalTokenCount",
            "toolUsePromptTokenCount",
            "cachedContentTokenCount",
            "service_tier",
            "audio_tokens",
            r"prompt\u005ftokens",
        ];
        const SCALARS: &[&str] = &[
            "0",
            "7",
            "120",
            "1000000000",
            "1000000001",
            "18446744073709551615",
            "18446744073709551616",
            "01",
            "-0",
            "-1",
            "1.0",
            "1e2",
            "1E2",
            "0.5",
            "1e400",
            "-1e400",
            "123456789012345678901234",
            "true",
            "false",
            "null",
            r#""""#,
            r#""standard""#,
            r#""a\"b""#,
            r#""\u0041""#,
            "\"\u{e9}\"",
        ];
        fn value(rng: &mut Rng, depth: usize, out: &mut String) {
            let space = [" ", "", "", "\n", "\t"];
            match if depth > 3 { 0 } else { rng.below(6) } {
                0..=2 => out.push_str(rng.pick(SCALARS)),
                3 | 4 => {
                    out.push('{');
                    for i in 0..rng.below(6) {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(rng.pick(&space));
                        out.push('"');
                        out.push_str(rng.pick(KEYS));
                        out.push_str("\":");
                        out.push_str(rng.pick(&space));
                        value(rng, depth + 1, out);
                    }
                    out.push('}');
                }
                _ => {
                    out.push('[');
                    for i in 0..rng.below(4) {
                        if i > 0 {
                            out.push(',');
                        }
                        value(rng, depth + 1, out);
                    }
                    out.push(']');
                }
            }
        }
        let formats =
            [UsageFormat::OpenAiChat, UsageFormat::OpenAiResponses, UsageFormat::Anthropic, UsageFormat::Gemini];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut flat, mut ok) = (0, 0);
        for n in 0..20_000 {
            let mut raw = String::from("{");
            for i in 0..rng.below(7) {
                if i > 0 {
                    raw.push(',');
                }
                raw.push('"');
                raw.push_str(rng.pick(KEYS));
                raw.push_str("\":");
                // Mostly plain counts and details objects, as providers send them.
                if rng.below(3) > 0 {
                    raw.push_str(&(rng.next() % 2000).to_string());
                } else {
                    value(&mut rng, 1, &mut raw);
                }
            }
            raw.push('}');
            let mut raw = raw.into_bytes();
            if n % 5 == 0 && !raw.is_empty() {
                let at = rng.below(raw.len());
                match rng.below(3) {
                    0 => drop(raw.remove(at)),
                    1 => raw.insert(at, b",}]:\"0 -.e"[rng.below(10)]),
                    _ => raw[at] = rng.next() as u8,
                }
            }
            if n % 97 == 0 {
                raw = b"null".to_vec();
            }
            let mut slots = [flat_json::Slot::Absent; 6];
            flat += usize::from(flat_json::read(&raw, CHAT, &["iterations"], &mut slots[..5]).is_some());
            for format in formats {
                let fast = parse_usage(format, &raw);
                ok += usize::from(matches!(fast, Ok(Some(_))));
                assert_eq!(fast, parse_usage_with_serde(format, &raw), "{format:?} {}", String::from_utf8_lossy(&raw));
            }
            assert_eq!(parse_anthropic(&raw), parse_anthropic_with_serde(&raw), "{}", String::from_utf8_lossy(&raw));
        }
        // Both readers were exercised.
        assert!((5_000..15_000).contains(&flat), "the flat reader took {flat} of 20000");
        assert!(ok > 10_000, "{ok} usages were read");
    }
}
