//! Reading request and response bodies as they stream past.
//!
//! Neither body is ever buffered: each chunk goes through a [`JsonScanner`] (non-streaming JSON)
//! or an [`SseScanner`] feeding a per-event [`JsonScanner`] (streaming), which keep only a few
//! bytes of parser state plus the bounded raw bytes of the values they capture (`model`,
//! `usage`). So a 10 MB embeddings response or a 5,000-event stream costs the same memory as a
//! small one, and a usage event split anywhere across chunks is still found. Stream events that
//! provably scan like the previous one (the same shape, differing only in bytes the JSON scan
//! skips) are not scanned again ([`crate::scan::template`]).

use crate::scan::json_scan::{Found, JsonScanner};
use crate::scan::sse::{SseScanner, SseSink};
use crate::scan::template::{Templates, TEMPLATE_BYTES};
use crate::scan::usage::{parse_anthropic, parse_usage, AnthropicUsage, Usage, UsageFormat};

/// Largest usage object captured. Real ones are a few hundred bytes.
const MAX_USAGE_BYTES: usize = 16 * 1024;
/// Largest raw (JSON-escaped) model string captured.
const MAX_MODEL_BYTES: usize = 1024;

/// What a [`ResponseScanner`] may hold on the heap at most, whatever the body: a usage object
/// being captured, a key being decoded, the last model's raw bytes and its decoded string, and
/// a stream's event template with the event copy that may replace it. Its SSE and sniffing
/// state is inline. Charged to the stream's memory lease when scanning starts.
pub const RESPONSE_SCAN_BYTES: usize = MAX_USAGE_BYTES + 64 + 2 * MAX_MODEL_BYTES + TEMPLATE_BYTES;

/// Input the filter could not meter. Each is counted (`meter_skips_total{reason}`) and logged;
/// none of them affects the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// A usage object that is not valid (bad JSON, negative or float counts, no token fields).
    UsageInvalid,
    /// A usage object larger than the capture bound.
    UsageTooLarge,
    /// A 2xx response body, or an event of a streamed one, that is not a JSON object or that
    /// ends inside its JSON (a body cut short by a network failure is not counted: that is a
    /// failed request).
    BodyMalformed,
    /// A `model` that is not a string or is longer than the capture bound.
    ModelInvalid,
    /// A compressed response body that cannot be read: an encoding other than gzip, deflate
    /// and br (`content-encoding`), or a body that is corrupt or decodes beyond the size bound.
    Compressed,
    /// A USD limit applied to a model without a price: it could not be charged.
    Unpriced,
    /// A streaming request without `include_usage` whose body was too large to hold whole (over
    /// `request.model_lookahead_bytes`), so the option could not be added.
    NotInjected,
    /// A stream the VM's memory budget had no room for (`memory.*`): not decoded or scanned
    /// (further), its bytes passed untouched (see [`crate::memory`]).
    MemoryBudget,
}

impl Skip {
    /// Every reason, in counter order.
    pub const ALL: [Skip; 8] = [
        Skip::UsageInvalid,
        Skip::UsageTooLarge,
        Skip::BodyMalformed,
        Skip::ModelInvalid,
        Skip::Compressed,
        Skip::Unpriced,
        Skip::NotInjected,
        Skip::MemoryBudget,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::UsageInvalid => "usage_invalid",
            Skip::UsageTooLarge => "usage_too_large",
            Skip::BodyMalformed => "body_malformed",
            Skip::ModelInvalid => "model_invalid",
            Skip::Compressed => "compressed",
            Skip::Unpriced => "unpriced",
            Skip::NotInjected => "usage_not_injected",
            Skip::MemoryBudget => "memory_budget",
        }
    }
}

/// Skips seen during one exchange, counted per reason (fixed size, whatever the input).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Skips([u32; Skip::ALL.len()]);

impl Skips {
    /// Records one skip.
    pub fn add(&mut self, skip: Skip) {
        if let Some(n) = self.0.get_mut(skip as usize) {
            *n = n.saturating_add(1);
        }
    }

    /// How often `skip` was recorded.
    pub fn count(&self, skip: Skip) -> u32 {
        self.0.get(skip as usize).copied().unwrap_or(0)
    }

    /// Recorded reasons with their counts.
    pub fn iter(&self) -> impl Iterator<Item = (Skip, u32)> + '_ {
        Skip::ALL.into_iter().map(|s| (s, self.count(s))).filter(|&(_, n)| n > 0)
    }

    /// Adds all of `other`'s skips.
    pub fn merge(&mut self, other: &Skips) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine = mine.saturating_add(theirs);
        }
    }
}

/// Decodes a captured raw JSON string value; `None` for anything else.
fn json_string(raw: &[u8]) -> Option<String> {
    // A model name is nearly always a plain string (no escape, no control byte): its bytes are
    // the text, and decoding it through serde_json (a `Value` built and dropped) is for the rest.
    if let [b'"', inner @ .., b'"'] = raw {
        if !inner.iter().any(|&b| b == b'\\' || b == b'"' || b < 0x20) {
            if let Ok(text) = std::str::from_utf8(inner) {
                return Some(text.to_string());
            }
        }
    }
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(serde_json::Value::String(s)) => Some(s),
        _ => None,
    }
}

/// Request fields read: the model, the output caps token limits reserve for (`max_tokens`
/// legacy, `max_completion_tokens` chat, `max_output_tokens` Responses API), and whether a
/// stream asks for usage (so that only streams without it are rewritten, see
/// [`crate::scan::inject`]).
static REQUEST_PATHS: &[&[&str]] = &[
    &["model"],
    &["max_tokens"],
    &["max_completion_tokens"],
    &["max_output_tokens"],
    &["stream"],
    &["stream_options", "include_usage"],
];
const PATH_MODEL: usize = 0;
const PATH_STREAM: usize = 4;
const PATH_INCLUDE_USAGE: usize = 5;

/// Finds the top-level `model` (and output token cap) of a JSON request body, chunk by chunk.
#[derive(Debug)]
pub struct RequestScanner {
    json: JsonScanner,
    model: Option<String>,
    max_output: Option<u64>,
    /// `"stream": true` (the last `stream` key, as in a full parse).
    stream: bool,
    /// `"stream_options": {"include_usage": true}`.
    include_usage: bool,
    bytes: u64,
    skips: Skips,
}

impl Default for RequestScanner {
    fn default() -> Self {
        Self {
            json: JsonScanner::new(REQUEST_PATHS, MAX_MODEL_BYTES),
            model: None,
            max_output: None,
            stream: false,
            include_usage: false,
            bytes: 0,
            skips: Skips::default(),
        }
    }
}

impl RequestScanner {
    /// Scans the next request body chunk. A repeated `model` key: the last one wins, as in a
    /// full JSON parse.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.bytes = self.bytes.saturating_add(chunk.len() as u64);
        let (model, max_output, skips) = (&mut self.model, &mut self.max_output, &mut self.skips);
        let (stream, include_usage) = (&mut self.stream, &mut self.include_usage);
        self.json.feed(chunk, |found| match found {
            Found::Value { path: PATH_MODEL, raw } => match json_string(raw) {
                Some(m) => *model = Some(m),
                None => skips.add(Skip::ModelInvalid),
            },
            Found::Value { path: PATH_STREAM, raw } => *stream = raw == b"true",
            Found::Value { path: PATH_INCLUDE_USAGE, raw } => *include_usage = raw == b"true",
            // An output cap that is not a plain count (null, -1, 1e3) reserves nothing.
            Found::Value { raw, .. } => {
                if let Some(n) = std::str::from_utf8(raw).ok().and_then(|r| r.parse::<u64>().ok()) {
                    *max_output = Some(n);
                }
            }
            Found::TooLarge { path: PATH_MODEL } => skips.add(Skip::ModelInvalid),
            Found::TooLarge { .. } => {}
        });
    }

    /// The request's output token cap (`max_completion_tokens`, `max_tokens` or
    /// `max_output_tokens`, whichever came last), if it was a count.
    pub fn max_output_tokens(&self) -> Option<u64> {
        self.max_output
    }

    /// True for a streaming request (`"stream": true`) that does not ask for usage
    /// (`stream_options.include_usage`): the requests [`crate::scan::inject`] rewrites.
    pub fn stream_lacks_usage(&self) -> bool {
        self.stream && !self.include_usage
    }

    /// Body bytes scanned so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The request's model, as written by the client.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Skips seen so far.
    pub fn skips(&self) -> &Skips {
        &self.skips
    }
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON document.
    Json,
    /// Server-sent events, each `data:` a JSON document.
    Sse,
}

/// The longest SSE field name a body may start with, plus its colon (`retry:`).
const SNIFF_LEN: usize = 6;

impl BodyFormat {
    /// The framing of a body that starts with `head` (leading whitespace removed) when its
    /// `content-type` says `hint`; `None` while `head` is too short to tell (`complete`: no more
    /// bytes will come). Gateways mislabel bodies, so the first bytes overrule the label where
    /// the label cannot be right: a body that starts with `{` or `[` is JSON, one that starts
    /// with an SSE field (`data:`, `event:`, `id:`, `retry:`, or a `:` comment) is an event
    /// stream. Anything else follows the label (so an HTML error page labelled JSON is still a
    /// malformed JSON body).
    pub fn sniff(hint: BodyFormat, head: &[u8], complete: bool) -> Option<BodyFormat> {
        const FIELDS: [&[u8]; 5] = [b"data:", b"event:", b"id:", b"retry:", b":"];
        match head.first() {
            None if complete => return Some(hint),
            None => return None,
            Some(b'{' | b'[') => return Some(BodyFormat::Json),
            Some(_) => {}
        }
        if FIELDS.iter().any(|f| head.starts_with(f)) {
            return Some(BodyFormat::Sse);
        }
        if !complete && FIELDS.iter().any(|f| f.starts_with(head)) {
            return None;
        }
        Some(hint)
    }

    /// From the response `content-type`.
    pub fn from_content_type(content_type: &[u8]) -> Self {
        let essence = content_type.split(|&b| b == b';').next().unwrap_or_default();
        if essence.trim_ascii().eq_ignore_ascii_case(b"text/event-stream") {
            BodyFormat::Sse
        } else {
            BodyFormat::Json
        }
    }
}

/// Where each format puts usage and the model, as (usage, model) path pairs: even indices are
/// usage objects, odd ones model names. Streams nest them in their event objects.
fn response_paths(format: UsageFormat) -> &'static [&'static [&'static str]] {
    match format {
        UsageFormat::OpenAiChat => &[&["usage"], &["model"]],
        // Non-streaming: the response object; streaming: `response.completed` & co. wrap it.
        UsageFormat::OpenAiResponses => &[&["usage"], &["model"], &["response", "usage"], &["response", "model"]],
        // Non-streaming and `message_delta`: top level; `message_start`: inside `message`.
        UsageFormat::Anthropic => &[&["usage"], &["model"], &["message", "usage"], &["message", "model"]],
        UsageFormat::Gemini => &[&["usageMetadata"], &["modelVersion"]],
    }
}

fn is_usage_path(path: usize) -> bool {
    path % 2 == 0
}

/// What the response scan found so far.
#[derive(Debug)]
struct Findings {
    usage_format: UsageFormat,
    usage: Option<Usage>,
    /// Anthropic reports usage in parts; merged here.
    anthropic: Option<AnthropicUsage>,
    model: Option<String>,
    /// Raw JSON of the last model decoded.
    model_raw: Vec<u8>,
    /// How often `model_raw` changed: an event template stands for events whose findings change
    /// nothing, which holds for the model it was recorded with only.
    model_gen: u64,
    skips: Skips,
}

impl Findings {
    /// Takes one finding; true when it changed nothing (a `null` usage, the model already
    /// decoded), what the events a template stands for find.
    fn absorb(&mut self, found: Found<'_>) -> bool {
        let unchanged = match found {
            Found::Value { path, raw } if is_usage_path(path) => raw == b"null",
            Found::Value { raw, .. } => raw == self.model_raw.as_slice(),
            Found::TooLarge { .. } => false,
        };
        match found {
            // OpenAI streams send `"usage":null` in every chunk but the last: nothing to parse.
            Found::Value { path, raw } if is_usage_path(path) && raw == b"null" => {}
            Found::Value { path, raw } if is_usage_path(path) => match self.usage_format {
                UsageFormat::Anthropic => match parse_anthropic(raw) {
                    Ok(Some(part)) => {
                        let mut merged = self.anthropic.unwrap_or_default();
                        merged.merge(part);
                        // Parts are bounded one by one; their normalised sum must be too.
                        match merged.to_usage().checked() {
                            Ok(u) => {
                                self.anthropic = Some(merged);
                                self.usage = Some(u);
                            }
                            Err(_) => self.skips.add(Skip::UsageInvalid),
                        }
                    }
                    Ok(None) => {}
                    Err(_) => self.skips.add(Skip::UsageInvalid),
                },
                format => match parse_usage(format, raw) {
                    Ok(Some(u)) => self.usage = Some(u),
                    Ok(None) => {}
                    Err(_) => self.skips.add(Skip::UsageInvalid),
                },
            },
            // Streams repeat the model in every event: decode it only when its bytes change.
            Found::Value { raw, .. } if raw == self.model_raw.as_slice() => {}
            // The request's bound: a model name no real model has is no label either.
            Found::Value { raw, .. } if raw.len() > MAX_MODEL_BYTES => self.skips.add(Skip::ModelInvalid),
            Found::Value { raw, .. } => match json_string(raw) {
                Some(m) => {
                    self.model = Some(m);
                    self.model_raw.clear();
                    self.model_raw.extend_from_slice(raw);
                    self.model_gen = self.model_gen.wrapping_add(1);
                }
                None => self.skips.add(Skip::ModelInvalid),
            },
            Found::TooLarge { path } if is_usage_path(path) => self.skips.add(Skip::UsageTooLarge),
            Found::TooLarge { .. } => self.skips.add(Skip::ModelInvalid),
        }
        unchanged
    }
}

/// The first bytes of the current SSE event's data, enough to recognise the `[DONE]` sentinel
/// (OpenAI's end of stream, not a JSON document) however the data is split.
#[derive(Debug, Default, Clone, Copy)]
struct DataHead {
    bytes: [u8; DataHead::LEN],
    /// Data bytes seen in this event (saturating).
    seen: usize,
}

impl DataHead {
    /// `[DONE]` with room for surrounding whitespace.
    const LEN: usize = 16;

    fn push(&mut self, data: &[u8]) {
        // (One copy, not a byte loop: this runs for every event, mostly with all of its data.)
        if let (0, Some(head)) = (self.seen, data.first_chunk::<{ Self::LEN }>()) {
            self.bytes = *head;
            self.seen = data.len();
            return;
        }
        let take = data.len().min(Self::LEN.saturating_sub(self.seen));
        if let (Some(slots), Some(src)) = (self.bytes.get_mut(self.seen..self.seen + take), data.get(..take)) {
            slots.copy_from_slice(src);
        }
        self.seen = self.seen.saturating_add(data.len());
    }

    fn is_done_sentinel(&self) -> bool {
        self.seen <= Self::LEN && self.bytes.get(..self.seen).is_some_and(|d| d.trim_ascii() == b"[DONE]")
    }
}

/// Feeds SSE event data into a JSON scanner that starts afresh with every event, unless the
/// event matches the stream's template.
struct EventSink<'a> {
    json: &'a mut JsonScanner,
    findings: &'a mut Findings,
    head: &'a mut DataHead,
    templates: &'a mut Templates,
    saw_data: bool,
    /// Whether an event whose JSON is broken (not a JSON object, or cut short) is counted: yes
    /// for events ended by a blank line or by the end of the body, not for the last one of an
    /// interrupted stream.
    count_broken: bool,
}

impl SseSink for EventSink<'_> {
    fn data(&mut self, bytes: &[u8]) {
        self.saw_data = true;
        self.head.push(bytes);
        let findings = &mut *self.findings;
        let model_gen = findings.model_gen;
        self.templates.data(bytes, model_gen, self.json, |f| findings.absorb(f));
    }

    fn dispatch(&mut self, _has_data: bool) {
        let findings = &mut *self.findings;
        let model_gen = findings.model_gen;
        if self.templates.dispatch(self.json, model_gen, |f| findings.absorb(f)) {
            // Scans like the template: a complete JSON object that finds nothing new. The JSON
            // scanner did not see it.
            *self.head = DataHead::default();
            return;
        }
        // Data that is not a JSON object (`[DONE]` excepted) or that ends inside its JSON.
        // Events without data (comments, `event:` alone) and empty data are no documents.
        let broken = self.json.is_truncated() || (self.json.is_malformed() && !self.head.is_done_sentinel());
        if self.count_broken && broken {
            self.findings.skips.add(Skip::BodyMalformed);
        }
        self.json.reset();
        *self.head = DataHead::default();
    }
}

/// Extracts usage (and the response's `model`) from a response body, chunk by chunk.
pub struct ResponseScanner {
    json: JsonScanner,
    sse: Option<SseScanner>,
    /// The start of the current event's data (streams only).
    head: DataHead,
    /// The stream's event template and how the current event compares with it (streams only).
    templates: Templates,
    /// Until the framing is known: what `content-type` says, and the body's first bytes (at
    /// most [`SNIFF_LEN`], leading whitespace dropped). See [`BodyFormat::sniff`].
    undecided: Option<(BodyFormat, Vec<u8>)>,
    findings: Findings,
    first_data_seen: bool,
    finished: bool,
}

impl ResponseScanner {
    /// A scanner for a body labelled as `format` (the framing is confirmed by the body's first
    /// bytes), holding usage in `usage_format`.
    pub fn new(format: BodyFormat, usage_format: UsageFormat) -> Self {
        Self::with_templates(format, usage_format, true)
    }

    /// The same scanner without event templates: every stream event goes through the full JSON
    /// scan. The reference the differential tests and the `response_scan` fuzz target compare
    /// [`Self::new`] with; the filter does not use it.
    pub fn without_templates(format: BodyFormat, usage_format: UsageFormat) -> Self {
        Self::with_templates(format, usage_format, false)
    }

    fn with_templates(format: BodyFormat, usage_format: UsageFormat, templates: bool) -> Self {
        let paths = response_paths(usage_format);
        Self {
            json: JsonScanner::new(paths, MAX_USAGE_BYTES),
            sse: None,
            head: DataHead::default(),
            templates: Templates::new(paths, templates),
            undecided: Some((format, Vec::with_capacity(SNIFF_LEN))),
            findings: Findings {
                usage_format,
                usage: None,
                anthropic: None,
                model: None,
                model_raw: Vec::new(),
                model_gen: 0,
                skips: Skips::default(),
            },
            first_data_seen: false,
            finished: false,
        }
    }

    /// Scans the next body chunk. Returns true when this chunk carried the first SSE data (the
    /// time-to-first-token mark); always false for JSON bodies.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        let Some((hint, head)) = self.undecided.as_mut() else { return self.scan(chunk) };
        let rest = if head.is_empty() { chunk.trim_ascii_start() } else { chunk };
        let take = rest.len().min(SNIFF_LEN.saturating_sub(head.len()));
        let (start, rest) = rest.split_at(take);
        head.extend_from_slice(start);
        match BodyFormat::sniff(*hint, head, false) {
            None => false,
            Some(format) => {
                let head = self.decide(format);
                let first = self.scan(&head);
                self.scan(rest) || first
            }
        }
    }

    /// Fixes the framing; returns the bytes read while it was unknown.
    fn decide(&mut self, format: BodyFormat) -> Vec<u8> {
        self.sse = (format == BodyFormat::Sse).then(SseScanner::new);
        self.undecided.take().map(|(_, head)| head).unwrap_or_default()
    }

    fn scan(&mut self, chunk: &[u8]) -> bool {
        match &mut self.sse {
            Some(sse) => {
                let mut sink = EventSink {
                    json: &mut self.json,
                    findings: &mut self.findings,
                    head: &mut self.head,
                    templates: &mut self.templates,
                    saw_data: false,
                    count_broken: true,
                };
                sse.feed(chunk, &mut sink);
                let first = sink.saw_data && !self.first_data_seen;
                self.first_data_seen |= sink.saw_data;
                first
            }
            None => {
                let findings = &mut self.findings;
                self.json.feed(chunk, |f| {
                    findings.absorb(f);
                });
                false
            }
        }
    }

    /// The body ended: flushes an SSE event left open and checks that a JSON body was a whole
    /// object. Idempotent.
    pub fn finish(&mut self) {
        self.end(true);
    }

    /// The body was cut short (reset, client gone): like [`Self::finish`], but JSON left open
    /// by the interruption is not counted as malformed.
    pub fn abandon(&mut self) {
        self.end(false);
    }

    fn end(&mut self, ended: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some((hint, head)) = &self.undecided {
            let format = BodyFormat::sniff(*hint, head, true).unwrap_or(*hint);
            let head = self.decide(format);
            self.scan(&head);
        }
        match &mut self.sse {
            Some(sse) => {
                let mut sink = EventSink {
                    json: &mut self.json,
                    findings: &mut self.findings,
                    head: &mut self.head,
                    templates: &mut self.templates,
                    saw_data: false,
                    count_broken: ended,
                };
                sse.finish(&mut sink);
            }
            None => {
                if self.json.is_malformed() || (ended && self.json.is_truncated()) {
                    self.findings.skips.add(Skip::BodyMalformed);
                }
            }
        }
    }

    /// The usage found (last one wins), if any.
    pub fn usage(&self) -> Option<Usage> {
        self.findings.usage
    }

    /// The response's top-level `model`, if any.
    pub fn model(&self) -> Option<&str> {
        self.findings.model.as_deref()
    }

    /// Skips seen so far.
    pub fn skips(&self) -> &Skips {
        &self.findings.skips
    }

    /// True for a streaming (SSE) body.
    pub fn is_streaming(&self) -> bool {
        self.sse.is_some()
    }

    /// Parser state held between chunks, in bytes (bounded whatever the body): what the current
    /// JSON document or event and the SSE framing need. The event template, the same for every
    /// chunk of a stream, is not parser state: see [`Self::template_len`].
    pub fn carry_len(&self) -> usize {
        let head = self.undecided.as_ref().map_or(0, |(_, head)| head.len());
        head + self.json.carry_len() + self.sse.as_ref().map_or(0, SseScanner::carry_len)
    }

    /// Stream events whose JSON scan was skipped because they matched the stream's template.
    pub fn events_matched(&self) -> u64 {
        self.templates.matched()
    }

    /// Bytes held for the stream's event template (at most
    /// [`TEMPLATE_BYTES`](crate::scan::template::TEMPLATE_BYTES), whatever the body).
    pub fn template_len(&self) -> usize {
        self.templates.held_len()
    }
}

#[cfg(test)]
#[path = "body_tests.rs"]
pub(crate) mod tests;
